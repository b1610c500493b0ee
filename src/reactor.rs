//! One reactor thread: a `mio::Poll` loop over its own `SO_REUSEPORT` listener, its slab of connections, its
//! fanout index and its timing wheel.
//!
//! This is the only place that calls `accept`, `read`, `write` (through a connection's transport), `epoll`
//! and the clock. It moves bytes, events and time into each connection's machine (`conn::Machine`) and
//! carries out what the machine answers: removing a connection, scheduling its timer. It also owns what spans
//! connections: the upgrade decision (origin, identity, connection slots), the fanout index, replays from
//! history, and the commands other threads send through the mailbox. Every connection of a user lives on the
//! user's home reactor (`dispatch::home`): a reactor that accepts an upgrade for a user homed elsewhere hands
//! the admitted connection over (`Command::Adopt`) before answering it, and the home reactor finishes the
//! upgrade as if it had accepted it. Sockets are registered once,
//! edge-triggered, for read and write, and every readiness is drained until `WouldBlock`.

use crate::accept::Acceptor;
use crate::auth::{Authenticator, Identity};
use crate::budget::Budget;
use crate::conn::state::Wire;
use crate::conn::transport::{self, Plain, Transport};
use crate::conn::{Close, Conn, Ctx, Ending, Expired, Head, Machine, Next, Phase, Rules};
use crate::dispatch::{Adoption, Command, Mailbox, Reactors, Subscribed, Subscription};
use crate::events;
use crate::fanout::{Fanout, Joined};
use crate::handoff::{self, channel::MAX_FDS, Order, Part};
use crate::history::{self, History};
use crate::message::missed::{Missed, Told, MISSED_CLOSE_CODE, MISSED_CLOSE_REASON};
use crate::message::{envelope, Codec, Encoding, Message, Target};
use crate::metrics::ReactorMetrics;
use crate::proto::handshake::{self, HandshakeLimits, Kind, Reject, Request};
use crate::proto::{http, sse};
use crate::shared_frame::SharedFrame;
use crate::snapshot::{FrameTable, Reader, SnapshotError, Writer};
use crate::timer::TimerWheel;
use crate::tls::table::{Sessions, Slot};
use crate::tls::{self, Tls, TlsWire};
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
const TLS_LISTENER: Token = Token(usize::MAX - 2);
/// The largest slab key: tokens of keys above it could equal the reserved tokens above.
pub const MAX_KEY: u32 = u32::MAX - 3;

/// Sends (or closes) a turn of the loop applies from the command backlog before it polls sockets again: about
/// 10-100 ms of writes here, so pongs and new connections are served between the parts of a long burst. A
/// single publish with more recipients than this is delivered over several turns (see [`Delivery`]).
const SENDS_PER_TURN: usize = 8_192;

/// Bytes a connection's socket is read and discarded at most before it is closed (see `discard_unread`).
const DISCARD_BEFORE_CLOSE_BYTES: usize = 64 << 10;

/// How often reactor 0 hands free heap pages back to the kernel after connections came or went
/// (`metrics::heap::release_free_pages`): rare enough that walking the allocator's free lists costs nothing
/// measurable, soon enough that a server at rest after a connection storm holds only what it uses.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Change of the heap gauge (`densepush_heap_allocated_bytes`) since the last trim that makes the next one worth
/// its walk.
const TRIM_AFTER_BYTES: u64 = 64 << 10;

/// Reads per readiness event before the connection yields to others (each read fills up to the scratch
/// buffer); the rest is read on the next turn of the loop, so one flooding client cannot starve the reactor.
const READS_PER_TURN: usize = 16;

/// What a reactor needs to know, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Upgrade request limits and path.
    pub handshake: HandshakeLimits,
    /// Browser origins allowed; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Upgraded connections the whole server holds at most (counted in `open_total`); over it upgrades get 503.
    pub max_open: usize,
    /// Upgraded connections of all reactors, shared: the kernel does not spread connections evenly over the
    /// `SO_REUSEPORT` listeners, so a per-reactor share would refuse clients below the configured total.
    pub open_total: Arc<AtomicUsize>,
    /// Sockets this reactor tracks at most (open plus handshaking); over it new sockets are closed at once.
    pub max_tracked: usize,
    /// Resolution of the timing wheel.
    pub tick: Duration,
    /// The connection rules (timeouts in ticks, frame and outbox limits, echo).
    pub rules: Rules,
    /// Size of the reactor-wide read buffer.
    pub read_buffer_bytes: usize,
    /// The node's message history, read at upgrades that carry `since`.
    pub history: Arc<History>,
    /// Bytes all connections of all reactors may hold in heap buffers together (shared).
    pub budget: Arc<Budget>,
    /// The TLS configuration, when `[tls]` is on.
    pub tls: Option<Arc<Tls>>,
    /// Channels a connection may be in (`auth.max_channels`), for runtime subscriptions as for tokens.
    pub max_channels: usize,
    /// Where connection events go, when `events.webhook_url` is set.
    pub events: Option<Arc<events::Events>>,
    /// `websocket.compression`: accept permessage-deflate offers.
    pub compression: bool,
    /// How compressed encodings are built (`websocket.compression_level`, `compression_min_bytes`).
    pub codec: Codec,
    /// `server.sse_retry_ms`: the `retry:` every SSE stream starts with.
    pub sse_retry_ms: u64,
}

/// What an admitted upgrade carries to the home reactor, besides its socket and session (see [`Adoption`]).
struct Upgrade {
    identity: Identity,
    response: Vec<u8>,
    recover: bool,
    wire: Wire,
    since: Vec<envelope::Position>,
    rest: Vec<u8>,
}

/// A publish being delivered: its recipients are written to over as many turns of the loop as they need, so
/// one publish to a million connections does not keep sockets and timers waiting for a million writes.
struct Delivery {
    message: Arc<Message>,
    /// Slab keys collected when the publish was taken; those from `next` on are still to be sent to.
    recipients: Vec<u32>,
    next: usize,
    /// The reactor's `next_generation` when the recipients were collected: a key now held by a connection
    /// accepted since is skipped (it did not exist when the message was applied, and may recover it from
    /// history instead).
    generation: u32,
}

/// One reactor and everything it owns.
pub struct Reactor {
    poll: Poll,
    listener: Option<TcpListener>,
    acceptor: Acceptor,
    /// The wss:// listener, when `[tls]` is on.
    tls_listener: Option<TcpListener>,
    tls_acceptor: Acceptor,
    /// TLS sessions by slab key: only TLS connections have one, so a plain connection pays nothing for TLS.
    sessions: Sessions,
    /// A reactor-wide buffer for decrypted bytes (TLS connections' plaintext before the machine reads it).
    plain: Vec<u8>,
    /// A reactor-wide buffer TLS records are sealed into, and handshake flights are written from.
    tls_out: Vec<u8>,
    conns: Slab<Conn>,
    fanout: Fanout,
    /// This reactor's number among `reactors`, the handle that reaches every reactor (its own included).
    index: usize,
    reactors: Reactors,
    wheel: TimerWheel,
    mailbox: Arc<Mailbox>,
    auth: Arc<Authenticator>,
    metrics: Arc<ReactorMetrics>,
    settings: Settings,
    /// The reactor-wide read buffer: every connection reads through it.
    scratch: Vec<u8>,
    /// Reusable list of recipients, so a publish allocates nothing.
    recipients: Vec<u32>,
    /// Connections that still had bytes to read when their turn ended.
    pending_reads: Vec<(u32, u32)>,
    /// Commands taken from the mailbox and not yet applied (a turn applies a bounded amount).
    backlog: VecDeque<Command>,
    /// The publish being delivered, when its recipients did not all fit in one turn.
    delivery: Option<Delivery>,
    /// Replay horizon (see `history`): every stored message that concerns this reactor (its users' streams,
    /// channels, `all`) up to this sequence number has been delivered here, and every later one is still in
    /// the mailbox and arrives live, so replays stop here. It is the last stored message applied, or more: the
    /// node's last sequence number when the mailbox was drained up to a point where it was read.
    applied_seq: u64,
    /// Reusable list of replay frames.
    replay: Vec<SharedFrame>,
    started: Instant,
    /// When reactor 0 last looked at the heap, and the heap gauge when it last handed free pages back.
    trimmed: (Instant, u64),
    next_generation: u32,
    shutdown_deadline: Option<Instant>,
    /// A live upgrade asked this reactor to freeze: it stops accepting at once and freezes once TLS
    /// handshakes in flight are done or the grace deadline passes (see `handoff`).
    freeze: Option<(handoff::Freeze, Instant)>,
    /// Frames received while adopting connections from a predecessor (emptied once adopting is done).
    adopting: FrameTable,
}

impl Reactor {
    /// Reactor number `index` of `reactors`, around an already bound, non-blocking listener and a poll whose
    /// waker feeds its mailbox (`reactors.mailbox(index)`). `listener` serves ws:// and `tls_listener` wss://
    /// (at least one of them is given).
    pub fn new(
        poll: Poll,
        listener: Option<std::net::TcpListener>,
        tls_listener: Option<std::net::TcpListener>,
        (index, reactors): (usize, Reactors),
        auth: Arc<Authenticator>,
        metrics: Arc<ReactorMetrics>,
        settings: Settings,
    ) -> io::Result<Self> {
        let register = |listener: Option<std::net::TcpListener>, token| -> io::Result<_> {
            listener
                .map(|l| {
                    let mut l = TcpListener::from_std(l);
                    poll.registry()
                        .register(&mut l, token, Interest::READABLE)?;
                    Ok(l)
                })
                .transpose()
        };
        let listener = register(listener, LISTENER)?;
        let tls_listener = register(tls_listener, TLS_LISTENER)?;
        Ok(Reactor {
            poll,
            listener,
            acceptor: Acceptor::default(),
            tls_listener,
            tls_acceptor: Acceptor::default(),
            sessions: Sessions::default(),
            plain: Vec::new(),
            tls_out: Vec::new(),
            // Reserved, not touched: the slab and the index grow into address space that is already theirs,
            // so there is no doubling slack and no copy of millions of records while clients connect.
            conns: Slab::with_capacity(settings.max_tracked),
            fanout: Fanout::with_capacity(settings.max_tracked),
            mailbox: reactors.mailbox(index).clone(),
            index,
            reactors,
            wheel: TimerWheel::new(settings.rules.max_delay_ticks()),
            auth,
            metrics,
            scratch: vec![0; settings.read_buffer_bytes],
            settings,
            recipients: Vec::new(),
            pending_reads: Vec::new(),
            backlog: VecDeque::new(),
            delivery: None,
            applied_seq: 0,
            replay: Vec::new(),
            started: Instant::now(),
            trimmed: (Instant::now(), 0),
            next_generation: 0,
            shutdown_deadline: None,
            freeze: None,
            adopting: FrameTable::default(),
        })
    }

    /// The token a waker for this reactor's mailbox must use.
    pub const WAKER_TOKEN: Token = WAKER;

    /// Runs until a shutdown completes.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let mut timeout = self.poll_timeout();
            // Senders ring the waker only while the reactor says it may sleep; mail that came before that is
            // taken below without a wake-up.
            if !timeout.is_zero() && !self.mailbox.going_to_sleep() {
                timeout = Duration::ZERO;
            }
            let polled = self.poll.poll(&mut events, Some(timeout));
            self.mailbox.awake();
            if let Err(e) = polled {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("poll failed, reactor stops: {e}");
                return;
            }
            if self.mailbox.has_mail() {
                self.take_mailbox();
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(false),
                    TLS_LISTENER => self.accept_all(true),
                    WAKER => {}
                    token => {
                        let (key, generation) = split_token(token);
                        // An error or hang-up surfaces through the read or write that follows.
                        let readable =
                            event.is_readable() || event.is_read_closed() || event.is_error();
                        let writable = event.is_writable() || event.is_error();
                        if writable && self.live(key, generation) {
                            self.drive(key, |m, cx, t| m.handle_writable(cx, t));
                        }
                        if readable {
                            self.on_readable(key, generation);
                        }
                    }
                }
            }
            for (key, generation) in std::mem::take(&mut self.pending_reads) {
                self.on_readable(key, generation);
            }
            self.apply_backlog(SENDS_PER_TURN);
            self.run_timers();
            if self.freeze_is_due() {
                self.freeze_now();
            }
            if self.finished() {
                return;
            }
        }
    }

    fn poll_timeout(&self) -> Duration {
        if !self.pending_reads.is_empty() || !self.backlog.is_empty() || self.delivery.is_some() {
            return Duration::ZERO;
        }
        let tick_ns = self.settings.tick.as_nanos().max(1);
        let elapsed = self.started.elapsed().as_nanos();
        let to_next_tick = Duration::from_nanos((tick_ns - elapsed % tick_ns) as u64);
        match self.shutdown_deadline {
            Some(deadline) => to_next_tick.min(deadline.saturating_duration_since(Instant::now())),
            None => to_next_tick,
        }
    }

    fn now_tick(&self) -> u64 {
        (self.started.elapsed().as_nanos() / self.settings.tick.as_nanos().max(1)) as u64
    }

    fn finished(&mut self) -> bool {
        let Some(deadline) = self.shutdown_deadline else {
            return false;
        };
        if self.conns.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            log::warn!(
                "shutdown timeout: closing {} connections that did not finish closing",
                self.conns.len()
            );
            // Each gets the last chance a close deadline gives its close frame, then goes.
            let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
            for key in keys {
                if self.drive(key as u32, |m, cx, t| m.close_deadline(cx, t)) {
                    self.remove(key as u32, Ending::Done);
                }
            }
            return true;
        }
        false
    }

    // ---- the machine and its surroundings ----------------------------------------------------------------

    /// Runs one input of connection `key`'s machine with its context and transport (its socket, through its
    /// TLS session if it has one), and carries out the answer. Returns false if the connection is gone (or was
    /// already).
    fn drive(
        &mut self,
        key: u32,
        input: impl FnOnce(&mut Machine, &mut Ctx<'_>, &mut dyn Transport) -> Next,
    ) -> bool {
        let Some(conn) = self.conns.get_mut(key as usize) else {
            return false;
        };
        let mut cx = Ctx {
            key,
            rules: &self.settings.rules,
            budget: &self.settings.budget,
            wheel: &mut self.wheel,
            metrics: &self.metrics,
        };
        let next = if conn.machine.is_tls() {
            let Some(slot) = self.sessions.get_mut(key) else {
                debug_assert!(false, "a TLS connection without a session");
                return false;
            };
            let mut wire = TlsWire {
                socket: &conn.stream,
                session: &mut slot.session,
                seal: &mut self.tls_out,
            };
            let next = input(&mut conn.machine, &mut cx, &mut wire);
            settle_tls(slot, &self.settings);
            next
        } else {
            input(&mut conn.machine, &mut cx, &mut Plain(&conn.stream))
        };
        self.carry_out(key, next)
    }

    fn carry_out(&mut self, key: u32, next: Next) -> bool {
        match next {
            Next::Continue => true,
            Next::Remove(ending) => {
                self.remove(key, ending);
                false
            }
        }
    }

    fn live(&self, key: u32, generation: u32) -> bool {
        self.conns
            .get(key as usize)
            .is_some_and(|c| c.generation == generation)
    }

    /// Removes the connection everywhere and closes its socket (dropping the stream also drops its epoll
    /// registration, since no other descriptor refers to it).
    fn remove(&mut self, key: u32, ending: Ending) {
        self.disconnect_event(key);
        self.fanout.remove(key);
        let mut conn = self.conns.remove(key as usize);
        if ending == Ending::Done && conn.machine.was_upgraded() {
            discard_unread(&conn.stream);
        }
        let cx = Ctx {
            key,
            rules: &self.settings.rules,
            budget: &self.settings.budget,
            wheel: &mut self.wheel,
            metrics: &self.metrics,
        };
        conn.machine.teardown(&cx);
        if let Some(mut slot) = self.sessions.remove(key) {
            self.end_tls(&conn.stream, &mut slot, ending);
        }
        if conn.machine.was_upgraded() {
            self.settings.open_total.fetch_sub(1, Relaxed);
            self.metrics.connections_open.fetch_sub(1, Relaxed);
            match conn.machine.wire() {
                Wire::Sse => self.metrics.sse_open.fetch_sub(1, Relaxed),
                Wire::WebSocketDeflate => self.metrics.deflate_open.fetch_sub(1, Relaxed),
                Wire::WebSocket => 0,
            };
        } else {
            self.metrics.connections_handshaking.fetch_sub(1, Relaxed);
        }
        if ending == Ending::Abrupt {
            ReactorMetrics::inc(&self.metrics.abrupt_closes);
        }
    }

    // ---- accepting -------------------------------------------------------------------------------------

    fn accept_all(&mut self, tls: bool) {
        if self.freeze.is_some() {
            // New clients wait in the kernel's backlog: the listener moves to the successor with them in it.
            return;
        }
        let (slot, acceptor) = match tls {
            false => (&mut self.listener, &mut self.acceptor),
            true => (&mut self.tls_listener, &mut self.tls_acceptor),
        };
        let Some(listener) = slot.take() else {
            return;
        };
        let mut acceptor = std::mem::take(acceptor);
        let metrics = self.metrics.clone();
        acceptor.accept_all(
            &listener,
            if tls {
                "TLS listener"
            } else {
                "client listener"
            },
            |stream| self.admit(stream, tls),
            || ReactorMetrics::inc(&metrics.accept_errors),
        );
        match tls {
            false => (self.listener, self.acceptor) = (Some(listener), acceptor),
            true => (self.tls_listener, self.tls_acceptor) = (Some(listener), acceptor),
        }
    }

    fn admit(&mut self, stream: TcpStream, tls: bool) {
        ReactorMetrics::inc(&self.metrics.tcp_accepted);
        if self.conns.len() >= self.settings.max_tracked {
            // Past the hard cap even the 503 would cost a slot; closing at once is the only bounded answer.
            self.metrics.reject(crate::metrics::RejectKind::Unavailable);
            return;
        }
        let session = match tls.then(|| self.new_session()) {
            None => None,
            Some(Some(session)) => Some(session),
            // Out of budget for a handshake: closing at once is the bounded answer.
            Some(None) => return,
        };
        let stream = std::net::TcpStream::from(stream);
        // Pushes are small and latency-sensitive; Nagle would hold them back for the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key() as u32;
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let fd = stream.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            make_token(key, generation),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("register failed: {e}");
            if let Some(mut slot) = session {
                self.end_tls(&stream, &mut slot, Ending::Abrupt);
            }
            return;
        }
        if let Some(slot) = session {
            self.sessions.insert(key, slot);
        }
        let mut cx = Ctx {
            key,
            rules: &self.settings.rules,
            budget: &self.settings.budget,
            wheel: &mut self.wheel,
            metrics: &self.metrics,
        };
        let machine = Machine::new(&mut cx, tls);
        entry.insert(Conn {
            stream,
            generation,
            machine,
        });
        self.metrics.connections_handshaking.fetch_add(1, Relaxed);
        // The request may already be there (TCP Fast Open, or a fast client); edge-triggered readiness for it
        // will still be reported, so there is nothing to read eagerly here.
    }

    // ---- reading ---------------------------------------------------------------------------------------

    fn on_readable(&mut self, key: u32, generation: u32) {
        if !self.live(key, generation) {
            return;
        }
        // Take the scratch buffer out of `self` so the handlers can borrow the reactor freely.
        let mut scratch = std::mem::take(&mut self.scratch);
        self.read_turn(key, generation, &mut scratch);
        self.scratch = scratch;
    }

    fn read_turn(&mut self, key: u32, generation: u32, scratch: &mut [u8]) {
        for _ in 0..READS_PER_TURN {
            // A handler may have removed the connection (a shutdown applied while draining the mailbox).
            let Some(conn) = self.conns.get_mut(key as usize) else {
                return;
            };
            if conn.generation != generation || !conn.machine.reads() {
                // Once flushing, nothing more is read; what the client still sends is discarded with the socket.
                return;
            }
            match (&conn.stream).read(scratch) {
                Ok(0) => {
                    let next = conn.machine.handle_broken();
                    self.carry_out(key, next);
                    return;
                }
                Ok(n) if conn.machine.is_tls() => {
                    if !self.on_tls_bytes(key, &mut scratch[..n]) {
                        return;
                    }
                }
                Ok(n) => {
                    if !self.on_bytes(key, &mut scratch[..n]) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    let next = conn.machine.handle_broken();
                    self.carry_out(key, next);
                    return;
                }
            }
        }
        // Not yet WouldBlock: come back after the others had their turn.
        self.pending_reads.push((key, generation));
    }

    /// Hands bytes read from a connection to its machine; returns false if the connection is gone.
    fn on_bytes(&mut self, key: u32, data: &mut [u8]) -> bool {
        match self.conns[key as usize].machine.phase() {
            Phase::Handshaking => self.on_request_bytes(key, data),
            Phase::Open | Phase::Closing => {
                self.drive(key, |m, cx, t| m.handle_frames(cx, t, data))
            }
            Phase::Flushing => true,
        }
    }

    // ---- TLS ---------------------------------------------------------------------------------------------

    /// A session for a connection accepted on the TLS listener, charged to the buffer budget; `None` when the
    /// budget cannot take another handshake (or rustls refuses, which a valid configuration never makes it).
    fn new_session(&mut self) -> Option<Slot> {
        let tls = self.settings.tls.as_ref()?;
        if !self
            .settings
            .budget
            .try_reserve(tls::session::HANDSHAKE_CHARGE)
        {
            tls.metrics.fail("handshake_too_large");
            return None;
        }
        match tls.session() {
            Ok(session) => {
                let charged = session.held_bytes();
                // The reservation above covered HANDSHAKE_CHARGE; settle to what the session reports.
                self.settings
                    .budget
                    .force_reserve(charged.saturating_sub(tls::session::HANDSHAKE_CHARGE));
                tls.metrics
                    .bytes
                    .fetch_add((tls::table::SLOT_BYTES + charged) as u64, Relaxed);
                Some(Slot {
                    session,
                    charged,
                    counted: false,
                })
            }
            Err(e) => {
                log::error!("tls: cannot start a session: {e}");
                self.settings.budget.release(tls::session::HANDSHAKE_CHARGE);
                None
            }
        }
    }

    /// Ciphertext read from a TLS connection: through its session (handshake, or record decryption), then the
    /// plaintext to its machine. Returns false if the connection is gone.
    fn on_tls_bytes(&mut self, key: u32, data: &mut [u8]) -> bool {
        let (Some(conn), Some(slot)) = (self.conns.get(key as usize), self.sessions.get_mut(key))
        else {
            return false;
        };
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        self.tls_out.clear();
        let was_established = slot.session.is_established();
        let result = slot.session.receive(data, &mut plain, &mut self.tls_out);
        // Handshake flights, tickets and alerts go out now, in order; what the socket does not take waits.
        if !self.tls_out.is_empty() {
            let mut socket = &conn.stream;
            match transport::write_some(&mut socket, &self.tls_out) {
                Ok(n) if n < self.tls_out.len() => slot.session.hold_unsent(&self.tls_out[n..]),
                _ => {}
            }
        }
        settle_tls(slot, &self.settings);
        let tls = self
            .settings
            .tls
            .as_ref()
            .expect("TLS connections imply [tls]");
        let alive = match result {
            Err(failure) => {
                log::debug!("connection {key}: tls: {failure}");
                tls.metrics.fail(failure.label());
                self.remove(key, Ending::Done);
                false
            }
            Ok(received) => {
                if let Some(kind) = received.completed {
                    let counter = match kind {
                        tls::Completed::Full => &tls.metrics.handshakes_full,
                        tls::Completed::Resumed => &tls.metrics.handshakes_resumed,
                    };
                    counter.fetch_add(1, Relaxed);
                    debug_assert!(!was_established && !slot.counted);
                    tls.metrics.sessions.fetch_add(1, Relaxed);
                    slot.counted = true;
                }
                let mut alive = plain.is_empty() || self.on_bytes(key, &mut plain);
                if alive && received.peer_closed {
                    // close_notify: the client sends nothing more; without a WebSocket close it went away.
                    let next = self.conns[key as usize].machine.handle_broken();
                    alive = self.carry_out(key, next);
                }
                alive
            }
        };
        self.plain = plain;
        alive
    }

    /// A TLS connection is removed: a `close_notify` for a clean end (best effort, one write), and its
    /// session's budget and counters given back.
    fn end_tls(&mut self, stream: &std::net::TcpStream, slot: &mut Slot, ending: Ending) {
        let tls = self
            .settings
            .tls
            .as_ref()
            .expect("TLS connections imply [tls]");
        if std::mem::take(&mut slot.counted) {
            tls.metrics.sessions.fetch_sub(1, Relaxed);
        }
        if slot.session.is_established()
            && ending == Ending::Done
            && slot.session.unsent().is_empty()
        {
            self.tls_out.clear();
            slot.session.close_notify(&mut self.tls_out);
            let mut socket = stream;
            let _ = transport::write_some(&mut socket, &self.tls_out);
        }
        self.settings.budget.release(slot.charged);
        tls.metrics
            .bytes
            .fetch_sub((tls::table::SLOT_BYTES + slot.charged) as u64, Relaxed);
        slot.charged = 0;
    }

    // ---- the live upgrade: freezing, exporting, adopting ---------------------------------------------------

    /// A freeze was asked and TLS handshakes in flight are done, or their grace is over.
    fn freeze_is_due(&self) -> bool {
        match &self.freeze {
            Some((_, deadline)) => {
                Instant::now() >= *deadline
                    || self.sessions.iter().all(|s| s.session.is_established())
            }
            None => false,
        }
    }

    /// Applies the rest of the mailbox, reports ready, and on the predecessor's order streams listeners and
    /// connections to the successor; then waits. Returns when the upgrade rolled back (the reactor carries on
    /// as if nothing happened); when it succeeds the process exits while this waits.
    fn freeze_now(&mut self) {
        let Some((freeze, _)) = self.freeze.take() else {
            return;
        };
        // The admin API froze first, so every publish it answered 202 for is in the mailbox: apply them all
        // (they reach the outboxes, which move).
        self.take_mailbox();
        self.apply_backlog(usize::MAX);
        let ready = Part::Ready {
            applied_seq: self.applied_seq,
        };
        if freeze.parts.send(ready).is_ok() && freeze.orders.recv() == Ok(Order::Export) {
            // Every reactor is frozen now, but one that froze after this one may have handed a connection over
            // to it meanwhile (an upgrade request it read before freezing): take those in, so they move too.
            self.take_over_queued();
            self.export(&freeze.parts);
            // The successor takes over and this process exits while we wait here; an order (or the driver
            // going away) means the upgrade rolled back.
            let _ = freeze.orders.recv();
        }
        log::info!("upgrade did not complete; serving again");
        // Edges that came while accepts were held back are gone: look at the backlogs now.
        self.accept_all(false);
        self.accept_all(true);
    }

    /// Takes over the connections other reactors handed to this one and that are still queued, leaving every
    /// other command where it is (the admin API and the bus are frozen: nothing else can be there but what the
    /// freeze already applied).
    fn take_over_queued(&mut self) {
        self.take_mailbox();
        let mut kept = VecDeque::with_capacity(self.backlog.len());
        let mut taken = 0;
        while let Some(command) = self.backlog.pop_front() {
            match command {
                Command::Adopt(adoption) => {
                    self.take_over(*adoption);
                    taken += 1;
                }
                other => kept.push_back(other),
            }
        }
        self.backlog = kept;
        self.mailbox.applied(taken);
    }

    /// Streams this reactor's listeners and connections, in batches of at most `MAX_FDS`, to `parts`.
    fn export(&mut self, parts: &std::sync::mpsc::SyncSender<Part>) {
        let listeners = vec![
            self.listener.as_ref().map(|l| l.as_raw_fd()),
            self.tls_listener.as_ref().map(|l| l.as_raw_fd()),
        ];
        if parts.send(Part::Listeners(listeners)).is_err() {
            return;
        }
        let mut frames = FrameTable::default();
        let mut records = Writer::new();
        let mut fds = Vec::new();
        let (mut moved, mut stayed) = (0u64, 0u64);
        for (key, conn) in self.conns.iter() {
            let key = key as u32;
            let session = match conn.machine.is_tls() {
                false => None,
                true => match self.sessions.get(key) {
                    Some(slot) if slot.session.is_established() => Some(&slot.session),
                    // Still in its TLS handshake: rustls's state cannot move. It stays, and closes with this
                    // process; the client reconnects.
                    _ => {
                        stayed += 1;
                        continue;
                    }
                },
            };
            conn.machine.snapshot(&mut records, &mut frames);
            match self.fanout.membership(key) {
                Some((user, client, channels)) => {
                    records.bool(true);
                    records.str(user);
                    records.opt_str(client);
                    records.u32(channels.len() as u32);
                    for channel in channels {
                        records.str(channel);
                    }
                }
                None => records.bool(false),
            }
            records.bool(session.is_some());
            if let Some(session) = session {
                session.snapshot(&mut records);
            }
            fds.push(conn.stream.as_raw_fd());
            moved += 1;
            if fds.len() == MAX_FDS && !send_batch(parts, &mut frames, &mut records, &mut fds) {
                return;
            }
        }
        if !fds.is_empty() && !send_batch(parts, &mut frames, &mut records, &mut fds) {
            return;
        }
        let _ = parts.send(Part::Done { moved, stayed });
    }

    /// After a live upgrade's connections were adopted reactor by reactor (the predecessor's reactor i into
    /// reactor i), moves each connection whose user is homed on another reactor there: a predecessor without
    /// user affinity spread a user's connections over its reactors. Uses the upgrade's own snapshot (state,
    /// queued frames, identity and runtime channels, TLS keys), in batches per destination. Called before any
    /// reactor runs; returns how many moved.
    pub fn rehome_all(reactors: &mut [Reactor]) -> Result<usize, SnapshotError> {
        let mut moved = 0;
        for from in 0..reactors.len() {
            for (to, payload, fds) in reactors[from].export_strays() {
                // The destination's table of the predecessor's frames is no longer needed (its queues hold
                // them), and the stray batch numbers its frames afresh.
                reactors[to].adopting = FrameTable::default();
                moved += reactors[to].adopt(&payload, fds)?;
            }
        }
        Ok(moved)
    }

    /// Takes out of this reactor, without closing them, the indexed connections whose user is homed on
    /// another reactor: their snapshots in one batch per destination (as `export` writes them) and their
    /// sockets. What this reactor counted for them (open connections, TLS sessions and their budget, the
    /// user's presence here) is given back, since the destination's `adopt` counts them again.
    fn export_strays(&mut self) -> Vec<(usize, Vec<u8>, Vec<OwnedFd>)> {
        let strays: Vec<(u32, usize)> = self
            .conns
            .iter()
            .filter_map(|(key, _)| {
                let (user, _) = self.fanout.identity(key as u32)?;
                let home = self.reactors.home(user);
                (home != self.index).then_some((key as u32, home))
            })
            .collect();
        let mut batches: Vec<Option<(FrameTable, Writer, Vec<OwnedFd>)>> =
            (0..self.reactors.len()).map(|_| None).collect();
        for (key, home) in strays {
            let (frames, records, fds) = batches[home]
                .get_or_insert_with(|| (FrameTable::default(), Writer::new(), Vec::new()));
            let conn = &self.conns[key as usize];
            conn.machine.snapshot(records, frames);
            let (user, client, channels) = self.fanout.membership(key).expect("strays are indexed");
            records.bool(true);
            records.str(user);
            records.opt_str(client);
            records.u32(channels.len() as u32);
            for channel in channels {
                records.str(channel);
            }
            let session = self.sessions.get(key).map(|slot| &slot.session);
            records.bool(session.is_some());
            if let Some(session) = session {
                session.snapshot(records);
            }
            if let Some(events) = &self.settings.events {
                events.moving(user, self.fanout.alone(key));
            }
            fds.push(self.release(key));
        }
        batches
            .into_iter()
            .enumerate()
            .filter_map(|(to, batch)| {
                let (mut frames, records, fds) = batch?;
                let mut payload = Writer::new();
                frames.write_fresh(&mut payload);
                payload.u32(fds.len() as u32);
                payload.raw(records.bytes());
                Some((to, payload.take(), fds))
            })
            .collect()
    }

    /// Removes connection `key` from this reactor without closing its socket, which it returns: out of the
    /// poll, the index, the slab and the TLS table, its buffers and counts given back.
    fn release(&mut self, key: u32) -> OwnedFd {
        self.fanout.remove(key);
        let mut conn = self.conns.remove(key as usize);
        let fd = conn.stream.as_raw_fd();
        if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&fd)) {
            log::warn!("deregister failed: {e}");
        }
        let cx = Ctx {
            key,
            rules: &self.settings.rules,
            budget: &self.settings.budget,
            wheel: &mut self.wheel,
            metrics: &self.metrics,
        };
        conn.machine.teardown(&cx);
        if let Some(slot) = self.sessions.remove(key) {
            let tls = self
                .settings
                .tls
                .as_ref()
                .expect("TLS connections imply [tls]");
            self.settings.budget.release(slot.charged);
            if slot.counted {
                tls.metrics.sessions.fetch_sub(1, Relaxed);
            }
            tls.metrics
                .bytes
                .fetch_sub((tls::table::SLOT_BYTES + slot.charged) as u64, Relaxed);
        }
        if conn.machine.was_upgraded() {
            self.settings.open_total.fetch_sub(1, Relaxed);
            self.metrics.connections_open.fetch_sub(1, Relaxed);
        } else {
            self.metrics.connections_handshaking.fetch_sub(1, Relaxed);
        }
        OwnedFd::from(conn.stream)
    }

    /// Connections of a predecessor's reactor (a batch its `export` wrote), registered here as if accepted
    /// here, with their state, index entries, TLS keys and timers. Called before this reactor runs.
    pub fn adopt(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> Result<usize, SnapshotError> {
        let mut r = Reader::new(payload);
        self.adopting.read_fresh(&mut r)?;
        let count = r.u32("batch size")? as usize;
        if count != fds.len() {
            return Err(SnapshotError::Invalid("batch size"));
        }
        for fd in fds {
            // Already non-blocking: O_NONBLOCK belongs to the open file description, which SCM_RIGHTS shares
            // with the predecessor's descriptor (one syscall per connection saved, in the pause).
            let stream = std::net::TcpStream::from(fd);
            let entry = self.conns.vacant_entry();
            let key = entry.key() as u32;
            self.next_generation = self.next_generation.wrapping_add(1);
            let generation = self.next_generation;
            let mut cx = Ctx {
                key,
                rules: &self.settings.rules,
                budget: &self.settings.budget,
                wheel: &mut self.wheel,
                metrics: &self.metrics,
            };
            let machine = Machine::restore(&mut cx, &mut r, &self.adopting)?;
            if r.bool("identity present")? {
                let user = r.str("user")?.to_owned();
                let client = r.opt_str("client")?.map(str::to_owned);
                let channels = (0..r.u32("channel count")?)
                    .map(|_| r.str("channel").map(str::to_owned))
                    .collect::<Result<Vec<String>, _>>()?;
                self.fanout.add(key, &user, client.as_deref(), &channels);
                if let Some(events) = &self.settings.events {
                    events.adopted(&user, self.fanout.alone(key));
                }
            }
            if r.bool("tls present")? {
                let session = tls::Session::restore(&mut r)?;
                let tls = self
                    .settings
                    .tls
                    .as_ref()
                    .ok_or(SnapshotError::Invalid("tls connection without [tls]"))?;
                let charged = session.held_bytes();
                self.settings.budget.force_reserve(charged);
                tls.metrics.sessions.fetch_add(1, Relaxed);
                tls.metrics
                    .bytes
                    .fetch_add((tls::table::SLOT_BYTES + charged) as u64, Relaxed);
                self.sessions.insert(
                    key,
                    Slot {
                        session,
                        charged,
                        counted: true,
                    },
                );
            }
            let fd = stream.as_raw_fd();
            self.poll
                .registry()
                .register(
                    &mut SourceFd(&fd),
                    make_token(key, generation),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map_err(|_| SnapshotError::Invalid("socket registration"))?;
            if machine.was_upgraded() {
                self.settings.open_total.fetch_add(1, Relaxed);
                self.metrics.connections_open.fetch_add(1, Relaxed);
                match machine.wire() {
                    Wire::Sse => self.metrics.sse_open.fetch_add(1, Relaxed),
                    Wire::WebSocketDeflate => self.metrics.deflate_open.fetch_add(1, Relaxed),
                    Wire::WebSocket => 0,
                };
            } else {
                self.metrics.connections_handshaking.fetch_add(1, Relaxed);
            }
            entry.insert(Conn {
                stream,
                generation,
                machine,
            });
        }
        if !r.is_empty() {
            return Err(SnapshotError::Invalid("batch trailer"));
        }
        Ok(count)
    }

    /// Adopting is over: the predecessor's frames are referenced by the queues that need them, no longer here;
    /// `applied_seq` is the last stored sequence the predecessor applied (every reactor applied all of it).
    pub fn adopted(&mut self, applied_seq: u64) {
        self.adopting = FrameTable::default();
        self.applied_seq = applied_seq;
    }

    // ---- the upgrade -------------------------------------------------------------------------------------

    /// Bytes of a request head: joined to what earlier reads left, parsed, and decided once complete.
    fn on_request_bytes(&mut self, key: u32, data: &mut [u8]) -> bool {
        let mut joined = None;
        let kept = self.drive(key, |m, cx, t| match m.join_head(cx, t, data) {
            Ok(head) => {
                joined = head;
                Next::Continue
            }
            Err(next) => next,
        });
        if !kept {
            return false;
        }
        let buf: &mut [u8] = match joined.as_mut() {
            Some(head) => head,
            None => data,
        };
        match handshake::parse_request(buf, &self.settings.handshake) {
            Ok(None) => {
                let head = match joined {
                    Some(head) => Head::Joined(head),
                    None => Head::Fresh(data),
                };
                self.drive(key, |m, cx, t| m.keep_head(cx, t, head))
            }
            Err(reject) => self.drive(key, |m, cx, t| m.close(cx, t, Close::Refuse(&reject))),
            Ok(Some((request, head_len))) => {
                if !self.upgrade(key, request, &buf[head_len..]) {
                    return false;
                }
                // Bytes after the head are the client's first frames, sent without waiting for our 101.
                let rest = &mut buf[head_len..];
                if rest.is_empty() {
                    return true;
                }
                self.drive(key, |m, cx, t| m.handle_frames(cx, t, rest))
            }
        }
    }

    /// Decides a complete upgrade request: origin, identity and a connection slot; then hands the connection
    /// to its user's home reactor if that is another one, or indexes it, answers 101 and replays what a
    /// recovering client missed. `early` is what the client sent after the request head. Returns false if the
    /// connection is gone from this reactor.
    fn upgrade(&mut self, key: u32, request: Request<'_>, early: &[u8]) -> bool {
        let generation = self.conns[key as usize].generation;
        let sse = request.kind == Kind::Sse;
        let since = if self.settings.history.any_enabled() {
            since_of(&request)
        } else {
            Vec::new()
        };
        let identity = match self.admit_request(&request) {
            Ok(identity) => identity,
            Err(reject) => {
                return self.drive(key, |m, cx, t| m.close(cx, t, Close::Refuse(&reject)));
            }
        };
        let (response, recover, wire) = if sse {
            // SSE clients always get ids (their position) and resync events: EventSource sends the last id back.
            // The Origin passed the allow-list (`admit_request`): let that page read the stream (CORS).
            let head = sse::response_head(self.settings.sse_retry_ms, request.origin);
            (head, true, Wire::Sse)
        } else {
            let protocol =
                history::offers_subprotocol(request.protocols).then_some(history::SUBPROTOCOL);
            let deflate = self.settings.compression
                && request.extensions.is_some_and(handshake::negotiate_deflate);
            let response = handshake::accept_response(request.key, protocol, deflate);
            let recover = history::wants_envelopes(request.query, request.protocols);
            let wire = match deflate {
                true => Wire::WebSocketDeflate,
                false => Wire::WebSocket,
            };
            (response, recover, wire)
        };
        let home = self.reactors.home(&identity.user);
        if home != self.index {
            let parts = Upgrade {
                identity,
                response,
                recover,
                wire,
                since,
                rest: early.to_vec(),
            };
            self.hand_over(key, home, parts);
            return false;
        }
        if !since.is_empty() {
            // Apply what was published before reading history (see `history`): the client may have had
            // those messages on another reactor's connection before it reconnected here. Only up to the last
            // message stored by now: every earlier one is in this mailbox already, and later ones reach the
            // connection live, so the work done here is bounded by what was queued, not by what keeps coming.
            let upto = self.settings.history.last_seq();
            self.apply_until(upto);
            if !self.live(key, generation) {
                // A shutdown in the mailbox closed it; give its slot back.
                self.settings.open_total.fetch_sub(1, Relaxed);
                return false;
            }
        }
        self.open(key, &identity, response, recover, wire, &since)
    }

    /// Indexes an admitted connection, answers 101 and replays what it missed (from the replay horizon
    /// `applied_seq`). Returns false if the connection is gone.
    fn open(
        &mut self,
        key: u32,
        identity: &Identity,
        response: Vec<u8>,
        recover: bool,
        wire: Wire,
        since: &[envelope::Position],
    ) -> bool {
        self.fanout.add(
            key,
            &identity.user,
            identity.client.as_deref(),
            &identity.channels,
        );
        if let Some(events) = &self.settings.events {
            let first = self.fanout.alone(key);
            events.connected(&identity.user, identity.client.as_deref(), first);
        }
        self.metrics.connections_handshaking.fetch_sub(1, Relaxed);
        self.metrics.connections_open.fetch_add(1, Relaxed);
        match wire {
            Wire::Sse => self.metrics.sse_open.fetch_add(1, Relaxed),
            Wire::WebSocketDeflate => self.metrics.deflate_open.fetch_add(1, Relaxed),
            Wire::WebSocket => 0,
        };
        ReactorMetrics::inc(&self.metrics.handshakes_accepted);
        if !self.drive(key, |m, cx, t| m.accept_as(cx, t, response, recover, wire)) {
            return false;
        }
        since.is_empty() || self.replay_missed(key, since, identity)
    }

    /// Takes an admitted connection out of this reactor (its socket out of this poll, its slab record and
    /// buffers, its TLS session out of the table) and queues it for its user's home reactor `home`. Nothing
    /// was answered and nothing indexed, so it leaves no trace here but a stale timer entry (stamped, ignored).
    fn hand_over(&mut self, key: u32, home: usize, parts: Upgrade) {
        let mut conn = self.conns.remove(key as usize);
        let fd = conn.stream.as_raw_fd();
        if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&fd)) {
            log::warn!("deregister failed: {e}");
        }
        let cx = Ctx {
            key,
            rules: &self.settings.rules,
            budget: &self.settings.budget,
            wheel: &mut self.wheel,
            metrics: &self.metrics,
        };
        conn.machine.teardown(&cx);
        self.metrics.connections_handshaking.fetch_sub(1, Relaxed);
        ReactorMetrics::inc(&self.metrics.handed_over);
        let tls = self.sessions.remove(key);
        // Read last, just before queueing: every stored message up to it that concerns the home reactor is in
        // its mailbox already, ahead of the adoption.
        let stored_upto = self.settings.history.last_seq();
        let Upgrade {
            identity,
            response,
            recover,
            wire,
            since,
            rest,
        } = parts;
        self.reactors.adopt(
            home,
            Adoption {
                stream: conn.stream,
                tls,
                identity,
                response,
                recover,
                wire,
                since,
                stored_upto,
                rest,
            },
        );
    }

    /// Takes over a connection another reactor admitted for a user homed here (see [`Adoption`]): registers
    /// it, and finishes its upgrade as [`Reactor::upgrade`] does (not to be confused with [`Reactor::adopt`], a
    /// predecessor's connections in a live upgrade). No `apply_until` is needed before its replay:
    /// every stored message up to `stored_upto` that concerns this reactor was queued ahead of the adoption
    /// and has been applied, and every later one is behind it, so the replay horizon is at least
    /// `stored_upto`. Returns the connections it touched (for the turn's budget).
    fn take_over(&mut self, adoption: Adoption) -> usize {
        let Adoption {
            stream,
            tls,
            identity,
            response,
            recover,
            wire,
            since,
            stored_upto,
            rest,
        } = adoption;
        self.applied_seq = self.applied_seq.max(stored_upto);
        let entry = self.conns.vacant_entry();
        let key = entry.key() as u32;
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let fd = stream.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            make_token(key, generation),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("register failed: {e}");
            self.settings.open_total.fetch_sub(1, Relaxed);
            if let Some(mut slot) = tls {
                self.end_tls(&stream, &mut slot, Ending::Abrupt);
            }
            return 1;
        }
        let is_tls = tls.is_some();
        if let Some(slot) = tls {
            self.sessions.insert(key, slot);
        }
        let mut cx = Ctx {
            key,
            rules: &self.settings.rules,
            budget: &self.settings.budget,
            wheel: &mut self.wheel,
            metrics: &self.metrics,
        };
        let machine = Machine::new(&mut cx, is_tls);
        entry.insert(Conn {
            stream,
            generation,
            machine,
        });
        self.metrics.connections_handshaking.fetch_add(1, Relaxed);
        if self.shutdown_deadline.is_some() {
            // It came after the shutdown: the slot it holds goes back, and it gets the 503 a late client gets.
            self.settings.open_total.fetch_sub(1, Relaxed);
            let reject = Reject::Unavailable("server shutting down");
            self.drive(key, |m, cx, t| m.close(cx, t, Close::Refuse(&reject)));
            return 1;
        }
        if !self.open(key, &identity, response, recover, wire, &since) {
            return 1;
        }
        if !rest.is_empty() {
            let mut rest = rest;
            self.drive(key, |m, cx, t| m.handle_frames(cx, t, &mut rest));
        }
        // Bytes that arrived after the accepting reactor's last read are reported by the registration above
        // (epoll reports a socket that is readable when it is added, edge-triggered or not).
        1
    }

    /// The checks that decide an upgrade, in the order that names the most specific refusal; takes a
    /// connection slot last, so a refused request never holds one.
    fn admit_request(&self, request: &Request<'_>) -> Result<Identity, Reject> {
        if !handshake::origin_allowed(request.origin, &self.settings.allowed_origins) {
            return Err(Reject::Forbidden("origin not allowed"));
        }
        let identity = self
            .auth
            .authenticate(request.query, request.authorization)
            .map_err(|e| Reject::Unauthorized(e.reason()))?;
        if self.settings.open_total.fetch_add(1, Relaxed) >= self.settings.max_open {
            self.settings.open_total.fetch_sub(1, Relaxed);
            return Err(Reject::Unavailable("connection limit reached"));
        }
        Ok(identity)
    }

    /// Sends a recovering connection what it missed (or `resync` notices), right after its 101 and before any
    /// live message: the connection is already in the fanout index, but this reactor applies no publish before
    /// this returns. Returns false if the connection is gone.
    fn replay_missed(
        &mut self,
        key: u32,
        since: &[envelope::Position],
        identity: &Identity,
    ) -> bool {
        let mut replay = std::mem::take(&mut self.replay);
        let reader = history::Reader {
            user: &identity.user,
            client: identity.client.as_deref(),
            channels: &identity.channels,
        };
        let encoding = self.encoding_of(key);
        self.settings.history.recover(
            since,
            reader,
            self.applied_seq,
            encoding,
            &self.settings.codec,
            &mut replay,
        );
        let mut alive = true;
        for frame in replay.drain(..) {
            if alive {
                alive = self.drive(key, |m, cx, t| m.send(cx, t, &frame));
            }
        }
        self.replay = replay;
        alive
    }

    // ---- timers ----------------------------------------------------------------------------------------

    fn run_timers(&mut self) {
        let now = self.now_tick();
        if now <= self.wheel.now_tick() {
            return;
        }
        if self.index == 0 && self.trimmed.0.elapsed() >= TRIM_EVERY {
            self.trim_heap();
        }
        if self.acceptor.is_paused() {
            self.accept_all(false);
        }
        if self.tls_acceptor.is_paused() {
            self.accept_all(true);
        }
        let mut expired = Vec::new();
        self.wheel.advance(now, &mut expired);
        for entry in expired {
            if let (Some(slot), Some(tls)) = (self.sessions.get(entry.key), &self.settings.tls) {
                // A TLS handshake still running at the handshake deadline: count it as a TLS failure too.
                let stalled = !slot.session.is_established()
                    && self.conns.get(entry.key as usize).is_some_and(|c| {
                        c.machine.phase() == Phase::Handshaking && c.machine.owns_timer(entry.stamp)
                    });
                if stalled {
                    tls.metrics.fail("timeout");
                }
            }
            let mut silent = false;
            self.drive(entry.key, |m, cx, t| {
                match m.handle_timeout(cx, t, entry.stamp) {
                    Expired::Stale => Next::Continue,
                    Expired::Next(next) => next,
                    Expired::Silent => {
                        silent = true;
                        Next::Continue
                    }
                }
            });
            if silent {
                // Read what may have arrived while this turn was busy before calling the peer silent: under
                // load a pong can sit unread in the socket past its deadline.
                let generation = self.conns[entry.key as usize].generation;
                self.on_readable(entry.key, generation);
                if self.live(entry.key, generation) {
                    self.drive(entry.key, |m, cx, t| m.pong_deadline(cx, t));
                }
            }
        }
        let sizes = self.fanout.sizes();
        self.metrics.index_users.store(sizes.users as u64, Relaxed);
        self.metrics
            .commands_pending
            .store(self.mailbox.pending() as u64, Relaxed);
        self.metrics
            .index_clients
            .store(sizes.clients as u64, Relaxed);
        self.metrics
            .index_channels
            .store(sizes.channels as u64, Relaxed);
    }

    /// Hands free heap pages back when the heap changed by [`TRIM_AFTER_BYTES`] since the last time (a
    /// connection storm grows it; handshake deadlines firing, tables at their old sizes and hand-overs being
    /// freed shrink it); a heap at rest is not walked again.
    fn trim_heap(&mut self) {
        let allocated = crate::metrics::heap::allocated_bytes().unwrap_or(0);
        if allocated.abs_diff(self.trimmed.1) >= TRIM_AFTER_BYTES {
            crate::metrics::heap::release_free_pages();
            self.trimmed.1 = allocated;
        }
        self.trimmed.0 = Instant::now();
    }

    // ---- commands from other threads -------------------------------------------------------------------

    /// Applies commands in order until the stored message with sequence `seq` has been delivered (every
    /// stored message up to `seq` is in the mailbox when this is called; see `History::last_seq`). A publish
    /// being delivered is finished first, whatever its sequence.
    fn apply_until(&mut self, seq: u64) {
        self.take_mailbox();
        let mut applied = 0;
        loop {
            if self.delivery.is_some() {
                self.deliver_some(usize::MAX);
                applied += 1;
            }
            if self.applied_seq >= seq {
                break;
            }
            let Some(command) = self.backlog.pop_front() else {
                // Everything queued when `seq` was read has been applied; the stored messages up to it that
                // concern this reactor were among it (the others went to their users' home reactors only).
                self.applied_seq = seq;
                break;
            };
            if self.take_command(command).is_some() {
                applied += 1;
            }
        }
        self.mailbox.applied(applied);
    }

    /// Moves the mailbox's commands behind the backlog.
    fn take_mailbox(&mut self) {
        let mut commands = Vec::new();
        self.mailbox.take_all(&mut commands);
        self.backlog.extend(commands);
    }

    /// Applies backlog commands in order until about `budget` sends are done. Bounding a turn keeps a burst of
    /// publishes — or one publish to very many connections — from starving socket reads (pongs) and timers:
    /// the rest waits for the next turn, which polls without sleeping.
    fn apply_backlog(&mut self, budget: usize) {
        let mut spent = 0;
        let mut applied = 0;
        loop {
            if self.delivery.is_some() {
                spent += self.deliver_some(budget - spent).max(1);
                if self.delivery.is_some() {
                    ReactorMetrics::inc(&self.metrics.fanout_yields);
                    break;
                }
                applied += 1;
            }
            if spent >= budget {
                break;
            }
            let Some(command) = self.backlog.pop_front() else {
                break;
            };
            if let Some(cost) = self.take_command(command) {
                spent += cost.max(1);
                applied += 1;
            }
        }
        self.mailbox.applied(applied);
    }

    /// Applies one command, or starts delivering it if it is a publish (`None`: counted as applied when its
    /// delivery ends). Returns how many connections it wrote to or closed.
    fn take_command(&mut self, command: Command) -> Option<usize> {
        match command {
            Command::Publish(message) => {
                let seq = message.seq();
                if seq != 0 {
                    debug_assert!(seq > self.applied_seq, "stored publishes arrive in order");
                    self.applied_seq = seq;
                }
                self.collect(message.target());
                self.delivery = Some(Delivery {
                    message,
                    recipients: std::mem::take(&mut self.recipients),
                    next: 0,
                    generation: self.next_generation,
                });
                None
            }
            Command::Kick {
                target,
                code,
                reason,
                reply,
            } => {
                self.collect(&target);
                let mut closed = 0;
                for key in std::mem::take(&mut self.recipients) {
                    let open = self
                        .conns
                        .get(key as usize)
                        .is_some_and(|c| c.machine.is_open());
                    let kick = Close::Kick {
                        code,
                        reason: &reason,
                    };
                    self.drive(key, |m, cx, t| m.close(cx, t, kick));
                    closed += usize::from(open);
                }
                ReactorMetrics::add(&self.metrics.kicked, closed as u64);
                if let Some(reply) = reply {
                    let _ = reply.send(closed);
                }
                Some(closed)
            }
            Command::PublishBatch { messages } => {
                // Its messages become publishes at the front of the backlog, in order: each is then delivered
                // (over several turns if it must) and counted applied when its delivery ends, which makes up the
                // batch's weight of one pending command per message.
                for message in messages.iter().rev() {
                    self.backlog.push_front(Command::Publish(message.clone()));
                }
                None
            }
            Command::Missed { scope, told } => Some(self.tell_missed(&scope, &told)),
            Command::Subscribe { change, reply } => {
                let counts = self.subscribe(&change);
                if let Some(reply) = reply {
                    let _ = reply.send(counts);
                }
                Some(counts.changed)
            }
            Command::Presence { user, reply } => {
                let _ = reply.send(self.fanout.user_count(&user));
                Some(1)
            }
            Command::Adopt(adoption) => Some(self.take_over(*adoption)),
            Command::Freeze(freeze) => {
                self.freeze = Some((freeze, Instant::now() + handoff::TLS_HANDSHAKE_GRACE));
                Some(1)
            }
            Command::Shutdown { timeout } => {
                self.begin_shutdown(timeout);
                Some(self.conns.len())
            }
        }
    }

    /// Tells the connections in `scope` that they may have missed messages: `resync` notices for the streams of
    /// the scope that a recovering connection receives, close 1012 (after what is queued) for the others.
    /// Returns how many connections there were.
    fn tell_missed(&mut self, scope: &Missed, told: &Told) -> usize {
        match scope {
            Missed::Target(target) => self.collect(target),
            Missed::Everything => self.collect(&Target::All),
        }
        let recipients = std::mem::take(&mut self.recipients);
        let mut notices = Vec::new();
        for &key in &recipients {
            let Some(conn) = self.conns.get(key as usize) else {
                continue;
            };
            if !conn.machine.is_open() {
                continue;
            }
            if conn.machine.wants_envelopes() {
                notices.clear();
                let sse = conn.machine.is_sse();
                if let Some((user, channels)) = self.fanout.names_of(key) {
                    scope.notices(user, channels, sse, &mut notices);
                }
                for notice in &notices {
                    // A notice is for this connection only: charged to the budget as its own frame.
                    let frame = SharedFrame::new(notice.clone());
                    if !self.drive(key, |m, cx, t| m.send(cx, t, &frame)) {
                        break;
                    }
                }
                told.resynced.fetch_add(1, Relaxed);
            } else {
                let close = Close::Kick {
                    code: MISSED_CLOSE_CODE,
                    reason: MISSED_CLOSE_REASON,
                };
                self.drive(key, |m, cx, t| m.close(cx, t, close));
                told.closed.fetch_add(1, Relaxed);
            }
        }
        let count = recipients.len();
        self.recipients = recipients;
        count
    }

    /// Fills `self.recipients` with the open connections the target names.
    fn collect(&mut self, target: &Target) {
        self.recipients.clear();
        match target {
            Target::User(user) => self.fanout.user_conns(user, &mut self.recipients),
            Target::UserClient(user, client) => {
                self.fanout
                    .user_client_conns(user, client, &mut self.recipients)
            }
            Target::Channel(channel) => self.fanout.channel_conns(channel, &mut self.recipients),
            Target::All => self.recipients.extend(
                self.conns
                    .iter()
                    .filter(|(_, c)| c.machine.is_open())
                    .map(|(k, _)| k as u32),
            ),
        }
    }

    /// Sends the publish being delivered to up to `limit` more of its recipients, each in the encoding it asked
    /// for; when the last one is done the delivery ends and the message leaves the mailbox. Returns how many
    /// recipients it went through.
    fn deliver_some(&mut self, limit: usize) -> usize {
        let Some(mut delivery) = self.delivery.take() else {
            return 0;
        };
        let start = delivery.next;
        let end = delivery.recipients.len().min(start.saturating_add(limit));
        let mut delivered = 0u64;
        // Each encoding is looked up (or built, the first time any reactor needs it) once per call here, not
        // once per recipient of a broadcast.
        let mut frames: [Option<&SharedFrame>; Encoding::COUNT] = [None; Encoding::COUNT];
        for &key in &delivery.recipients[start..end] {
            // Closing connections already have their close frame queued: nothing may follow it.
            let Some(conn) = self.conns.get(key as usize) else {
                continue;
            };
            if !conn.machine.is_open() || newer(conn.generation, delivery.generation) {
                continue;
            }
            let m = &conn.machine;
            let encoding = Encoding::pick(m.is_sse(), m.wants_envelopes(), m.deflates());
            let codec = &self.settings.codec;
            let frame = *frames[encoding as usize]
                .get_or_insert_with(|| delivery.message.shared_in(encoding, codec));
            if self.drive(key, |m, cx, t| m.send(cx, t, frame)) {
                delivered += 1;
            }
        }
        ReactorMetrics::add(&self.metrics.frames_delivered, delivered);
        delivery.next = end;
        if end < delivery.recipients.len() {
            self.delivery = Some(delivery);
        } else {
            self.mailbox
                .delivered(&delivery.message, &self.settings.budget);
            delivery.recipients.clear();
            if self.recipients.capacity() < delivery.recipients.capacity() {
                self.recipients = delivery.recipients;
            }
        }
        end - start
    }

    /// Applies a runtime subscription change to the target's open connections in this reactor; a connection
    /// that joins with a position gets what it missed in the channel first (see [`Reactor::replay_join`]).
    fn subscribe(&mut self, change: &Subscription) -> Subscribed {
        self.collect(&change.target);
        let keys = std::mem::take(&mut self.recipients);
        let mut counts = Subscribed::default();
        for &key in &keys {
            if !self
                .conns
                .get(key as usize)
                .is_some_and(|c| c.machine.is_open())
            {
                continue;
            }
            if !change.join {
                counts.changed += usize::from(self.fanout.leave(key, &change.channel));
                continue;
            }
            match self
                .fanout
                .join(key, &change.channel, self.settings.max_channels)
            {
                Joined::Added => {
                    counts.changed += 1;
                    if let Some(position) = &change.since {
                        self.replay_join(key, position);
                    }
                }
                Joined::AtLimit => counts.at_limit += 1,
                Joined::Already => {}
            }
        }
        self.recipients = keys;
        counts
    }

    /// Sends a connection that just joined a channel what history holds after `position`, up to the last stored
    /// message this reactor applied; later ones are behind this command in the mailbox and arrive live, so the
    /// switch has no gap and no duplicate, as at an upgrade with `since`. Each message goes in the
    /// connection's encoding; the `resync` notice that replaces a position history cannot serve goes only to
    /// connections that receive envelopes (a bare client could not tell it from a message). Returns false if
    /// the connection is gone.
    fn replay_join(&mut self, key: u32, position: &envelope::Position) -> bool {
        let mut missed = Vec::new();
        // Channel streams carry no client tags: every member may read all of them.
        let encoding = self.encoding_of(key);
        let resync = self.settings.history.recover_join(
            position,
            None,
            self.applied_seq,
            encoding,
            &mut missed,
        );
        let envelopes = self.conns[key as usize].machine.wants_envelopes();
        let codec = self.settings.codec;
        let frames = missed.iter().map(|m| m.shared_in(encoding, &codec));
        for frame in frames.chain(resync.as_ref().filter(|_| envelopes)) {
            if !self.drive(key, |m, cx, t| m.send(cx, t, frame)) {
                return false;
            }
        }
        true
    }

    /// The encoding connection `key` receives messages in.
    fn encoding_of(&self, key: u32) -> Encoding {
        let m = &self.conns[key as usize].machine;
        Encoding::pick(m.is_sse(), m.wants_envelopes(), m.deflates())
    }

    /// The hook where an upgraded connection leaves: its disconnect event, while the index still knows who it
    /// was, saying whether it was the user's last connection on this reactor (`events` turns that into the
    /// user's offline event when no other reactor holds one). A connection that never upgraded was never
    /// announced, so it is not in the index and gets none.
    fn disconnect_event(&self, key: u32) {
        let Some(events) = &self.settings.events else {
            return;
        };
        let Some((user, client)) = self.fanout.identity(key) else {
            return;
        };
        // RFC 6455 §7.1.5: a connection closed without a close frame reports 1006.
        let code = self
            .conns
            .get(key as usize)
            .and_then(|c| c.machine.close_code())
            .unwrap_or(1006);
        let last = self.fanout.alone(key);
        events.disconnected(user, client, code, last);
    }

    fn begin_shutdown(&mut self, timeout: Duration) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(Instant::now() + timeout);
        for listener in [self.listener.take(), self.tls_listener.take()]
            .into_iter()
            .flatten()
        {
            let mut listener = listener;
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.drive(key as u32, |m, cx, t| m.close(cx, t, Close::Shutdown));
        }
    }
}

/// The positions a request resumes from: `since` (both kinds); for SSE also the EventSource's `Last-Event-ID`
/// header, or a `lastEventId` query parameter for clients that cannot set headers. An SSE id is one `since`
/// item (`proto::sse::event_id`), and it wins over a `since` item of the same stream: a browser reconnecting by
/// itself sends the URL it was opened with (an older `since`) and the id of the last event it got.
fn since_of(request: &Request<'_>) -> Vec<envelope::Position> {
    let mut raw = http::query_raw(request.query, "since")
        .unwrap_or_default()
        .to_owned();
    if request.kind == Kind::Sse {
        let id = match (
            request.last_event_id,
            http::query_param(request.query, "lastEventId"),
        ) {
            (Some(id), _) => Some(id.to_owned()),
            (None, Some(id)) => Some(id.into_owned()),
            (None, None) => None,
        };
        if let Some(id) = id.filter(|id| !id.is_empty()) {
            // parse_since keeps the last position given for a stream.
            raw.push(',');
            raw.push_str(&id);
        }
    }
    envelope::parse_since(&raw)
}

/// Sends one batch: the frames its records name first, then the records; clears the buffers. False if the
/// receiving end went away (the upgrade is being abandoned).
fn send_batch(
    parts: &std::sync::mpsc::SyncSender<Part>,
    frames: &mut FrameTable,
    records: &mut Writer,
    fds: &mut Vec<std::os::fd::RawFd>,
) -> bool {
    let mut payload = Writer::new();
    frames.write_fresh(&mut payload);
    payload.u32(fds.len() as u32);
    payload.raw(records.bytes());
    records.take();
    parts
        .send(Part::Batch {
            payload: payload.take(),
            fds: std::mem::take(fds),
        })
        .is_ok()
}

/// Brings a TLS session's budget charge and the TLS byte gauge in line with what it holds now.
fn settle_tls(slot: &mut Slot, settings: &Settings) {
    let now = slot.session.held_bytes();
    if now == slot.charged {
        return;
    }
    let tls = settings.tls.as_ref().expect("TLS connections imply [tls]");
    if now > slot.charged {
        settings.budget.force_reserve(now - slot.charged);
        tls.metrics
            .bytes
            .fetch_add((now - slot.charged) as u64, Relaxed);
    } else {
        settings.budget.release(slot.charged - now);
        tls.metrics
            .bytes
            .fetch_sub((slot.charged - now) as u64, Relaxed);
    }
    slot.charged = now;
}

/// Whether a connection of `generation` was accepted after the one of generation `than` (generations count
/// accepts, wrapping).
fn newer(generation: u32, than: u32) -> bool {
    (generation.wrapping_sub(than) as i32) > 0
}

/// Reads and discards what a client sent that nobody read, before its socket is closed: Linux answers the
/// close of a socket holding unread data with a reset (RFC 2525 §2.17) that throws away what is still queued
/// for the client — our close frame among it. Bounded: a client that keeps sending gets its reset.
fn discard_unread(stream: &std::net::TcpStream) {
    let mut sink = [0u8; 4096];
    let mut discarded = 0;
    while discarded < DISCARD_BEFORE_CLOSE_BYTES {
        match (&*stream).read(&mut sink) {
            Ok(0) => return,
            Ok(n) => discarded += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

fn make_token(key: u32, generation: u32) -> Token {
    Token(((generation as usize) << 32) | key as usize)
}

fn split_token(token: Token) -> (u32, u32) {
    (token.0 as u32, (token.0 >> 32) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_never_collide_with_reserved_ones() {
        let token = make_token(12345, 0xdead_beef);
        assert_eq!(split_token(token), (12345, 0xdead_beef));
        // Slab keys stay below MAX_KEY (`Settings::max_tracked` is capped there).
        for reserved in [LISTENER, WAKER, TLS_LISTENER] {
            assert_ne!(make_token(MAX_KEY, u32::MAX), reserved);
        }
    }

    #[test]
    fn unread_bytes_are_discarded_before_a_close_up_to_the_bound() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        // A little: all of it is read, so the close is a FIN.
        client.write_all(&[1u8; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        discard_unread(&server);
        assert_eq!(
            (&server).read(&mut [0u8; 16]).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // More than the bound: the rest is left (the close will reset), the reactor does not spin on it.
        let flood = vec![2u8; 4 * DISCARD_BEFORE_CLOSE_BYTES];
        client.write_all(&flood).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        discard_unread(&server);
        let mut left = 0;
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = (&server).read(&mut buf) {
            if n == 0 {
                break;
            }
            left += n;
        }
        assert!(
            left >= flood.len() - DISCARD_BEFORE_CLOSE_BYTES - 4096,
            "{left} bytes left of {}",
            flood.len()
        );
    }

    #[test]
    fn generations_compare_across_the_wrap() {
        assert!(newer(5, 4));
        assert!(!newer(4, 4));
        assert!(!newer(3, 4));
        assert!(newer(2, u32::MAX - 1), "accepted after the counter wrapped");
        assert!(!newer(u32::MAX, 2));
    }
}
