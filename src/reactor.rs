//! One reactor thread: a `mio::Poll` loop over its own `SO_REUSEPORT` listener, its slab of connections, its
//! fanout index and its timing wheel.
//!
//! This is the only place that calls `accept`, `read`, `write` and the clock. Protocol decisions are delegated
//! to the sans-IO cores (`handshake`, `auth`, `frame`, `outbox`, `fanout`, `timer`); the reactor moves bytes
//! between them and the sockets. Sockets are registered once, edge-triggered, for read and write, and every
//! readiness is drained until `WouldBlock`.

use crate::auth::Authenticator;
use crate::budget::Budget;
use crate::conn::{Conn, Phase, Sent, FLAG_HEARD, FLAG_PING_SENT, FLAG_RECOVER, FLAG_UPGRADED};
use crate::fanout::Fanout;
use crate::history::{self, envelope, History};
use crate::mailbox::{Command, Mailbox, Target};
use crate::metrics::{ReactorMetrics, RejectKind};
use crate::outbox::Flush;
use crate::proto::frame::{self, Event, Feed, ProtocolError, EMPTY_CLOSE_FRAME, PING_FRAME};
use crate::proto::handshake::{self, HandshakeLimits, Reject};
use crate::timer::TimerWheel;
use bytes::Bytes;
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);

/// Sends (or closes) a turn of the loop applies from the command backlog before it polls sockets again: about
/// 10-100 ms of writes here, so pongs and new connections are served between the parts of a long burst.
const SENDS_PER_TURN: usize = 8_192;

/// Reads per readiness event before the connection yields to others (each read fills up to the scratch
/// buffer); the rest is read on the next turn of the loop, so one flooding client cannot starve the reactor.
const READS_PER_TURN: usize = 16;

/// Reason given when the server-wide buffer budget (`websocket.max_buffered_bytes_total`) refuses a buffer.
const BUDGET_EXHAUSTED: &str = "server busy: buffer budget exhausted";

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
    /// Ticks a client has to complete the upgrade.
    pub handshake_timeout_ticks: u64,
    /// Ticks between pings.
    pub ping_interval_ticks: u64,
    /// Ticks a client has to send any frame after a ping.
    pub pong_timeout_ticks: u64,
    /// Ticks to wait for the client's close frame or the final flush.
    pub close_timeout_ticks: u64,
    /// Inbound frame limits.
    pub frame_limits: frame::Limits,
    /// Unsent bytes per connection before it is closed as a slow consumer.
    pub max_outbox_bytes: usize,
    /// Size of the reactor-wide read buffer.
    pub read_buffer_bytes: usize,
    /// The node's message history, read at upgrades that carry `since`.
    pub history: Arc<History>,
    /// Bytes all connections of all reactors may hold in heap buffers together (shared).
    pub budget: Arc<Budget>,
    /// `[diagnostics] echo`: send each complete client data message back (see `echo`).
    pub echo: bool,
}

impl Settings {
    /// The longest delay the timing wheel must hold.
    fn max_delay_ticks(&self) -> u64 {
        [
            self.handshake_timeout_ticks,
            self.ping_interval_ticks,
            self.pong_timeout_ticks,
            self.close_timeout_ticks,
        ]
        .into_iter()
        .max()
        .unwrap_or(1)
    }
}

/// Why a connection ends, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Close handshake done, HTTP error sent, or timeout in closing: already counted elsewhere.
    Done,
    /// EOF or socket error without a close handshake.
    Abrupt,
}

/// One reactor and everything it owns.
pub struct Reactor {
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    fanout: Fanout,
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
    /// Sequence number of the last stored message this reactor delivered (see `history`): replays stop there,
    /// later ones are still in the mailbox and arrive live.
    applied_seq: u64,
    /// Reusable list of replay frames.
    replay: Vec<Bytes>,
    started: Instant,
    next_generation: u32,
    accept_paused: bool,
    shutdown_deadline: Option<Instant>,
}

impl Reactor {
    /// A reactor around an already bound, non-blocking listener and a poll whose waker feeds `mailbox`.
    pub fn new(
        poll: Poll,
        listener: std::net::TcpListener,
        mailbox: Arc<Mailbox>,
        auth: Arc<Authenticator>,
        metrics: Arc<ReactorMetrics>,
        settings: Settings,
    ) -> io::Result<Self> {
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Reactor {
            poll,
            listener: Some(listener),
            // Reserved, not touched: the slab and the index grow into address space that is already theirs,
            // so there is no doubling slack and no copy of millions of records while clients connect.
            conns: Slab::with_capacity(settings.max_tracked),
            fanout: Fanout::with_capacity(settings.max_tracked),
            wheel: TimerWheel::new(settings.max_delay_ticks()),
            mailbox,
            auth,
            metrics,
            scratch: vec![0; settings.read_buffer_bytes],
            settings,
            recipients: Vec::new(),
            pending_reads: Vec::new(),
            backlog: VecDeque::new(),
            applied_seq: 0,
            replay: Vec::new(),
            started: Instant::now(),
            next_generation: 0,
            accept_paused: false,
            shutdown_deadline: None,
        })
    }

    /// The token a waker for this reactor's mailbox must use.
    pub const WAKER_TOKEN: Token = WAKER;

    /// Runs until a shutdown completes.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("poll failed, reactor stops: {e}");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => self.take_mailbox(),
                    token => {
                        let (key, generation) = split_token(token);
                        // An error or hang-up surfaces through the read or write that follows.
                        let readable =
                            event.is_readable() || event.is_read_closed() || event.is_error();
                        let writable = event.is_writable() || event.is_error();
                        if writable {
                            self.on_writable(key, generation);
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
            if self.finished() {
                return;
            }
        }
    }

    fn poll_timeout(&self) -> Duration {
        if !self.pending_reads.is_empty() || !self.backlog.is_empty() {
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
            let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
            for key in keys {
                self.close(key as u32, Ending::Done);
            }
            return true;
        }
        false
    }

    // ---- accepting -------------------------------------------------------------------------------------

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    self.accept_paused = false;
                    self.admit(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_resource_exhaustion(&e) => {
                    // The pending connection stays in the backlog; with edge-triggered readiness no new event
                    // may come, so the timer tick retries. Backing off keeps the loop from spinning.
                    if !self.accept_paused {
                        log::warn!(
                            "accept failed ({e}); pausing accepts until descriptors free up"
                        );
                    }
                    ReactorMetrics::inc(&self.metrics.accept_errors);
                    self.accept_paused = true;
                    return;
                }
                // The peer went away between SYN and accept (ECONNABORTED) and the like: next one.
                Err(_) => continue,
            }
        }
    }

    fn admit(&mut self, stream: TcpStream) {
        ReactorMetrics::inc(&self.metrics.tcp_accepted);
        if self.conns.len() >= self.settings.max_tracked {
            // Past the hard cap even the 503 would cost a slot; closing at once is the only bounded answer.
            self.metrics.reject(RejectKind::Unavailable);
            return;
        }
        let stream = std::net::TcpStream::from(stream);
        // Pushes are small and latency-sensitive; Nagle would hold them back for the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key() as u32;
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let token = make_token(key, generation);
        let fd = stream.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("register failed: {e}");
            return;
        }
        let mut conn = Conn::new(stream, generation);
        conn.timer_stamp = self
            .wheel
            .schedule(key, self.settings.handshake_timeout_ticks);
        entry.insert(conn);
        self.metrics.connections_handshaking.fetch_add(1, Relaxed);
        // The request may already be there (TCP Fast Open, or a fast client); edge-triggered readiness for it
        // will still be reported, so there is nothing to read eagerly here.
    }

    // ---- readiness -------------------------------------------------------------------------------------

    fn live(&self, key: u32, generation: u32) -> bool {
        self.conns
            .get(key as usize)
            .is_some_and(|c| c.generation == generation)
    }

    fn on_writable(&mut self, key: u32, generation: u32) {
        if self.live(key, generation) {
            self.flush(key);
        }
    }

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
            let Some(conn) = self.conns.get_mut(key as usize) else {
                return;
            };
            if conn.phase == Phase::Flushing {
                // Nothing more will be read; what the client still sends is discarded with the socket.
                return;
            }
            match conn.stream.read(scratch) {
                Ok(0) => {
                    self.close(key, Ending::Abrupt);
                    return;
                }
                Ok(n) => {
                    if !self.on_bytes(key, &mut scratch[..n]) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(key, Ending::Abrupt);
                    return;
                }
            }
        }
        // Budget used up and not yet WouldBlock: come back after the others had their turn.
        self.pending_reads.push((key, generation));
    }

    /// Handles bytes read from a connection; returns false if the connection is gone or reads must stop.
    fn on_bytes(&mut self, key: u32, data: &mut [u8]) -> bool {
        match self.conns[key as usize].phase {
            Phase::Handshaking => self.on_handshake_bytes(key, data),
            Phase::Open | Phase::Closing => self.on_frame_bytes(key, data),
            Phase::Flushing => false,
        }
    }

    // ---- handshake -------------------------------------------------------------------------------------

    fn on_handshake_bytes(&mut self, key: u32, data: &mut [u8]) -> bool {
        let conn = &mut self.conns[key as usize];
        let buffered = conn.spill.as_ref().is_some_and(|s| !s.head.is_empty());
        if !buffered {
            return self.try_upgrade(key, data, true);
        }
        // Join the new bytes to the partial head kept from earlier reads, if the buffer budget allows it.
        if conn.try_grow(&self.settings.budget, data.len()).is_none() {
            self.refuse(key, &Reject::Unavailable(BUDGET_EXHAUSTED));
            return false;
        }
        let spill = conn.spill.as_mut().expect("buffered head implies a spill");
        let mut head = std::mem::take(&mut spill.head);
        head.reserve_exact(data.len());
        head.extend_from_slice(data);
        let alive = self.try_upgrade(key, &mut head, false);
        if let Some(conn) = self.conns.get_mut(key as usize) {
            if conn.phase == Phase::Handshaking {
                // Still incomplete: keep the joined bytes.
                conn.spill_mut().0.head = head;
            }
            conn.settle(&self.settings.budget);
        }
        alive
    }

    /// Parses the request head in `buf`; completes the upgrade, refuses it, or keeps the bytes for later
    /// (copying them out of the scratch buffer when `from_scratch`; otherwise the caller keeps its buffer).
    fn try_upgrade(&mut self, key: u32, buf: &mut [u8], from_scratch: bool) -> bool {
        let parsed = handshake::parse_request(buf, &self.settings.handshake);
        let (response, identity, head_len, recover, since) = match parsed {
            Ok(None) => {
                if !from_scratch {
                    return true;
                }
                let conn = &mut self.conns[key as usize];
                let Some(fresh) = conn.try_grow(&self.settings.budget, buf.len()) else {
                    self.refuse(key, &Reject::Unavailable(BUDGET_EXHAUSTED));
                    return false;
                };
                let spill = conn.spill.as_mut().expect("try_grow allocates the spill");
                spill.head.reserve_exact(buf.len());
                spill.head.extend_from_slice(buf);
                conn.settle(&self.settings.budget);
                if fresh {
                    self.metrics.buffers_live.fetch_add(1, Relaxed);
                }
                return true;
            }
            Err(reject) => {
                self.refuse(key, &reject);
                return false;
            }
            Ok(Some((request, head_len))) => {
                let since = envelope::raw_query_param(request.query, "since")
                    .filter(|_| self.settings.history.any_enabled())
                    .map(envelope::parse_since)
                    .unwrap_or_default();
                if !since.is_empty() {
                    // Apply what is queued before reading history (see `history`): the client may have had
                    // those messages on another reactor's connection before it reconnected here.
                    self.drain_mailbox();
                    if !self.conns.contains(key as usize) {
                        return false; // a shutdown in the mailbox closed it
                    }
                }
                if !handshake::origin_allowed(request.origin, &self.settings.allowed_origins) {
                    self.refuse(key, &Reject::Forbidden("origin not allowed"));
                    return false;
                }
                let identity = match self.auth.authenticate(request.query, request.authorization) {
                    Ok(identity) => identity,
                    Err(e) => {
                        self.refuse(key, &Reject::Unauthorized(e.reason()));
                        return false;
                    }
                };
                // Take a slot last, so a refused request never holds one.
                if self.settings.open_total.fetch_add(1, Relaxed) >= self.settings.max_open {
                    self.settings.open_total.fetch_sub(1, Relaxed);
                    self.refuse(key, &Reject::Unavailable("connection limit reached"));
                    return false;
                }
                let protocol =
                    history::offers_subprotocol(request.protocols).then_some(history::SUBPROTOCOL);
                (
                    handshake::accept_response(request.key, protocol),
                    identity,
                    head_len,
                    history::wants_envelopes(request.query, request.protocols),
                    since,
                )
            }
        };

        self.fanout.add(
            key,
            &identity.user,
            identity.client.as_deref(),
            &identity.channels,
        );
        self.metrics.connections_handshaking.fetch_sub(1, Relaxed);
        self.metrics.connections_open.fetch_add(1, Relaxed);
        ReactorMetrics::inc(&self.metrics.handshakes_accepted);
        let conn = &mut self.conns[key as usize];
        conn.phase = Phase::Open;
        conn.set(FLAG_UPGRADED, true);
        conn.set(FLAG_RECOVER, recover);
        if recover {
            self.settings.history.count_recovering(true);
        }
        conn.timer_stamp = self.wheel.schedule(key, self.settings.ping_interval_ticks);
        if let Some(spill) = conn.spill.as_mut() {
            spill.head = Vec::new();
        }
        if !self.send(key, &Bytes::from(response)) {
            return false;
        }
        if !since.is_empty() && !self.replay_missed(key, &since, &identity) {
            return false;
        }
        // Bytes after the head are the client's first frames, sent without waiting for our 101.
        let rest = &mut buf[head_len..];
        if rest.is_empty() {
            self.release_if_idle(key);
            return true;
        }
        self.on_frame_bytes(key, rest)
    }

    /// Sends a recovering connection what it missed (or `resync` notices), right after its 101 and before any
    /// live message: the connection is already in the fanout index, but this reactor applies no publish before
    /// this returns. Returns false if the connection is gone.
    fn replay_missed(
        &mut self,
        key: u32,
        since: &[envelope::Position],
        identity: &crate::auth::Identity,
    ) -> bool {
        let mut replay = std::mem::take(&mut self.replay);
        let reader = history::Reader {
            user: &identity.user,
            client: identity.client.as_deref(),
            channels: &identity.channels,
        };
        self.settings
            .history
            .recover(since, reader, self.applied_seq, &mut replay);
        let mut alive = true;
        for frame in replay.drain(..) {
            if alive && !self.send(key, &frame) {
                alive = false;
            }
        }
        self.replay = replay;
        alive
    }

    /// Applies every command sent so far, in order, however many.
    fn drain_mailbox(&mut self) {
        self.take_mailbox();
        self.apply_backlog(usize::MAX);
    }

    /// Moves the mailbox's commands behind the backlog.
    fn take_mailbox(&mut self) {
        let mut commands = Vec::new();
        self.mailbox.take_all(&mut commands);
        self.backlog.extend(commands);
    }

    /// Applies backlog commands in order until about `budget` sends are done. Bounding a turn keeps a burst of
    /// publishes from starving socket reads (pongs) and timers: the rest waits for the next turn, which polls
    /// without sleeping.
    fn apply_backlog(&mut self, budget: usize) {
        let mut spent = 0;
        let mut applied = 0;
        while spent < budget {
            let Some(command) = self.backlog.pop_front() else {
                break;
            };
            spent += self.handle_command(command).max(1);
            applied += 1;
        }
        self.mailbox.applied(applied);
    }

    /// Answers a refused upgrade with its HTTP status and closes once it is written.
    fn refuse(&mut self, key: u32, reject: &Reject) {
        self.metrics
            .reject(RejectKind::from_status(reject.status()));
        let conn = &mut self.conns[key as usize];
        conn.phase = Phase::Flushing;
        if let Some(spill) = conn.spill.as_mut() {
            spill.head = Vec::new();
        }
        conn.timer_stamp = self.wheel.schedule(key, self.settings.close_timeout_ticks);
        // Unbounded: a refusal is a short answer that must go out even when the buffer budget is what refused
        // (a bounded send over budget would answer an HTTP client with a WebSocket close frame).
        if self.send_control(key, &Bytes::from(reject.response())) {
            self.flush(key);
        }
    }

    // ---- frames ----------------------------------------------------------------------------------------

    /// Decodes client frames; returns false if the connection is gone or reading must stop.
    fn on_frame_bytes(&mut self, key: u32, data: &mut [u8]) -> bool {
        let conn = &mut self.conns[key as usize];
        conn.set(FLAG_HEARD, true);
        // The decoder lives on the stack unless a frame straddles reads; then it waits in the spill.
        let mut decoder = conn
            .spill
            .as_mut()
            .map(|s| std::mem::take(&mut s.decoder))
            .unwrap_or_default();
        let mut pongs: Vec<Bytes> = Vec::new();
        let mut peer_close: Option<Option<u16>> = None;
        let (mut pings, mut pongs_in, mut messages) = (0u64, 0u64, 0u64);
        let mut echo = self
            .settings
            .echo
            .then(|| crate::echo::Echo::resume(conn.spill.as_deref_mut()));
        let result = decoder.feed(data, &self.settings.frame_limits, |event| match event {
            Event::Ping(payload) => {
                pings += 1;
                pongs.push(frame::encode_pong(payload));
            }
            Event::Pong(_) => pongs_in += 1,
            Event::Close { code, .. } => peer_close = Some(code),
            Event::Data {
                text, chunk, last, ..
            } => {
                messages += u64::from(last);
                if let Some(echo) = echo.as_mut() {
                    echo.chunk(text, chunk, last);
                }
            }
        });
        ReactorMetrics::add(&self.metrics.pings_received, pings);
        ReactorMetrics::add(&self.metrics.pongs_received, pongs_in);
        ReactorMetrics::add(&self.metrics.messages_received, messages);
        // A frame straddles reads: its state needs the spill, which the budget may refuse. (After an error or a
        // close the state no longer matters: the connection is ending with its own code.)
        if !decoder.is_idle() && matches!(result, Ok(Feed::More)) {
            let Some(fresh) = conn.try_grow(&self.settings.budget, 0) else {
                self.refuse_buffer(key);
                return false;
            };
            conn.spill
                .as_mut()
                .expect("try_grow allocates the spill")
                .decoder = decoder;
            if fresh {
                self.metrics.buffers_live.fetch_add(1, Relaxed);
            }
        }
        let echoes = match echo {
            Some(echo) => echo.suspend(conn, &self.metrics),
            None => Vec::new(),
        };

        // Once our close frame is out, nothing else may follow it (RFC 6455 §5.5.1), pongs included.
        if conn.phase == Phase::Open {
            for pong in pongs.iter().chain(&echoes) {
                if !self.send(key, pong) {
                    return false;
                }
            }
        }
        match result {
            Err(error) => {
                self.fail(key, error);
                false
            }
            Ok(Feed::Closed) => {
                self.on_peer_close(key, peer_close.flatten());
                false
            }
            Ok(Feed::More) => {
                self.release_if_idle(key);
                true
            }
        }
    }

    /// The client sent a close frame: answer it (RFC 6455 §5.5.1), or finish our own close, then close TCP
    /// once written — the server closes the TCP connection first (§7.1.1).
    fn on_peer_close(&mut self, key: u32, code: Option<u16>) {
        let conn = &mut self.conns[key as usize];
        let was_open = conn.phase == Phase::Open;
        conn.phase = Phase::Flushing;
        conn.timer_stamp = self.wheel.schedule(key, self.settings.close_timeout_ticks);
        if was_open {
            ReactorMetrics::inc(&self.metrics.client_closes);
            // Echo the code the client sent; an empty close is answered with an empty close.
            let reply = match code {
                Some(code) => frame::encode_close(code, ""),
                None => Bytes::from_static(&EMPTY_CLOSE_FRAME),
            };
            if !self.send_control(key, &reply) {
                return;
            }
        }
        self.flush(key);
    }

    /// Fails the connection for a protocol violation (RFC 6455 §7.1.7): close frame with the code, then close.
    fn fail(&mut self, key: u32, error: ProtocolError) {
        ReactorMetrics::inc(&self.metrics.protocol_error_closes);
        log::debug!("connection {key}: protocol error: {error}");
        let conn = &mut self.conns[key as usize];
        let was_open = conn.phase == Phase::Open;
        conn.phase = Phase::Flushing;
        conn.timer_stamp = self.wheel.schedule(key, self.settings.close_timeout_ticks);
        if was_open
            && !self.send_control(
                key,
                &frame::encode_close(error.close_code(), error.reason()),
            )
        {
            return;
        }
        self.flush(key);
    }

    /// A frame straddles reads but the server-wide buffer budget is exhausted: close with 1013 Try Again Later
    /// (RFC 6455 §7.4.1 via the IANA registry, RFC 6455 §11.7) instead of holding the frame's state.
    fn refuse_buffer(&mut self, key: u32) {
        ReactorMetrics::inc(&self.metrics.budget_closes);
        log::debug!("connection {key}: buffer budget exhausted, closing with 1013");
        let conn = &mut self.conns[key as usize];
        let was_open = conn.phase == Phase::Open;
        conn.phase = Phase::Flushing;
        conn.timer_stamp = self.wheel.schedule(key, self.settings.close_timeout_ticks);
        if was_open && !self.send_control(key, &frame::encode_close(1013, BUDGET_EXHAUSTED)) {
            return;
        }
        self.flush(key);
    }

    /// Starts a server-side close: the close frame goes behind what is queued; the client's close (or the
    /// close timeout) ends it.
    fn begin_close(&mut self, key: u32, code: u16, reason: &str) -> bool {
        let conn = &mut self.conns[key as usize];
        match conn.phase {
            Phase::Open => {
                conn.phase = Phase::Closing;
                conn.timer_stamp = self.wheel.schedule(key, self.settings.close_timeout_ticks);
                self.send_control(key, &frame::encode_close(code, reason));
                true
            }
            Phase::Handshaking => {
                self.close(key, Ending::Done);
                false
            }
            Phase::Closing | Phase::Flushing => false,
        }
    }

    // ---- writing ---------------------------------------------------------------------------------------

    /// Sends a frame within the outbox limit; a connection over it is closed as a slow consumer.
    /// Returns false if the connection is gone or closing because of it.
    fn send(&mut self, key: u32, frame: &Bytes) -> bool {
        let mut written = 0;
        let mut allocated = false;
        let conn = &mut self.conns[key as usize];
        let sent = conn.send(
            frame,
            self.settings.max_outbox_bytes,
            &self.settings.budget,
            &mut written,
            &mut allocated,
        );
        self.account_write(written, allocated);
        match sent {
            Sent::Ok => true,
            Sent::Failed => {
                self.close(key, Ending::Abrupt);
                false
            }
            Sent::Overflow => {
                self.overflow(key);
                false
            }
        }
    }

    /// Sends a control frame that must go out whatever the outbox holds (it is at most 127 bytes).
    fn send_control(&mut self, key: u32, frame: &Bytes) -> bool {
        let mut written = 0;
        let mut allocated = false;
        let sent = self.conns[key as usize].send_unbounded(
            frame,
            &self.settings.budget,
            &mut written,
            &mut allocated,
        );
        self.account_write(written, allocated);
        if sent == Sent::Failed {
            self.close(key, Ending::Abrupt);
            return false;
        }
        true
    }

    fn account_write(&self, written: u64, allocated: bool) {
        ReactorMetrics::add(&self.metrics.bytes_written, written);
        if allocated {
            self.metrics.buffers_live.fetch_add(1, Relaxed);
        }
    }

    /// A slow consumer: keep only what must finish (a partly written frame), add close 1008, and give the
    /// client the close timeout to read it. Accepted messages are not dropped silently: the connection goes.
    fn overflow(&mut self, key: u32) {
        ReactorMetrics::inc(&self.metrics.slow_consumer_closes);
        let conn = &mut self.conns[key as usize];
        if let Some(spill) = conn.spill.as_mut() {
            spill.outbox.drop_unstarted();
        }
        conn.settle(&self.settings.budget);
        conn.phase = Phase::Closing;
        conn.timer_stamp = self.wheel.schedule(key, self.settings.close_timeout_ticks);
        self.send_control(
            key,
            &frame::encode_close(1008, "slow consumer: outbox limit exceeded"),
        );
    }

    /// Writes what is queued; closes a flushing connection once drained.
    fn flush(&mut self, key: u32) {
        let mut written = 0;
        let conn = &mut self.conns[key as usize];
        let result = conn.flush(&self.settings.budget, &mut written);
        ReactorMetrics::add(&self.metrics.bytes_written, written);
        match result {
            Ok(Flush::Drained) => {
                if conn.phase == Phase::Flushing {
                    self.close(key, Ending::Done);
                } else {
                    self.release_if_idle(key);
                }
            }
            Ok(Flush::Blocked) => {}
            Err(_) => self.close(key, Ending::Abrupt),
        }
    }

    /// Frees the connection's spill if it holds nothing, else brings its budget charge up to date (a request
    /// head dropped after the upgrade, for one).
    fn release_if_idle(&mut self, key: u32) {
        let conn = &mut self.conns[key as usize];
        if conn.release_spill_if_idle(&self.settings.budget) {
            self.metrics.buffers_live.fetch_sub(1, Relaxed);
        } else {
            conn.settle(&self.settings.budget);
        }
    }

    /// Removes the connection everywhere and closes its socket (dropping the stream also drops its epoll
    /// registration, since no other descriptor refers to it).
    fn close(&mut self, key: u32, ending: Ending) {
        self.fanout.remove(key);
        let mut conn = self.conns.remove(key as usize);
        if conn.drop_spill(&self.settings.budget) {
            self.metrics.buffers_live.fetch_sub(1, Relaxed);
        }
        if conn.has(FLAG_RECOVER) {
            self.settings.history.count_recovering(false);
        }
        if conn.has(FLAG_UPGRADED) {
            self.settings.open_total.fetch_sub(1, Relaxed);
            self.metrics.connections_open.fetch_sub(1, Relaxed);
        } else {
            self.metrics.connections_handshaking.fetch_sub(1, Relaxed);
        }
        if ending == Ending::Abrupt && conn.phase != Phase::Flushing {
            ReactorMetrics::inc(&self.metrics.abrupt_closes);
        }
    }

    // ---- timers ----------------------------------------------------------------------------------------

    fn run_timers(&mut self) {
        let now = self.now_tick();
        if now <= self.wheel.now_tick() {
            return;
        }
        if self.accept_paused {
            self.accept_all();
        }
        let mut expired = Vec::new();
        self.wheel.advance(now, &mut expired);
        for entry in expired {
            let Some(conn) = self.conns.get(entry.key as usize) else {
                continue;
            };
            if conn.timer_stamp == entry.stamp {
                self.on_timer(entry.key);
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

    fn on_timer(&mut self, key: u32) {
        let settings = &self.settings;
        let conn = &mut self.conns[key as usize];
        match conn.phase {
            Phase::Handshaking => {
                self.metrics.reject(RejectKind::Timeout);
                self.close(key, Ending::Done);
            }
            Phase::Open if !conn.has(FLAG_PING_SENT) => {
                conn.set(FLAG_PING_SENT, true);
                conn.set(FLAG_HEARD, false);
                conn.timer_stamp = self.wheel.schedule(key, settings.pong_timeout_ticks);
                ReactorMetrics::inc(&self.metrics.pings_sent);
                self.send(key, &Bytes::from_static(&PING_FRAME));
            }
            Phase::Open => {
                if conn.has(FLAG_HEARD) {
                    conn.set(FLAG_PING_SENT, false);
                    let next_ping = settings
                        .ping_interval_ticks
                        .saturating_sub(settings.pong_timeout_ticks);
                    conn.timer_stamp = self.wheel.schedule(key, next_ping);
                } else {
                    // Read what may have arrived while this turn was busy before calling the peer silent:
                    // under load a pong can sit unread in the socket past its deadline.
                    let generation = conn.generation;
                    self.on_readable(key, generation);
                    let Some(conn) = self.conns.get(key as usize) else {
                        return;
                    };
                    if conn.generation != generation || conn.phase != Phase::Open {
                        return;
                    }
                    if conn.has(FLAG_HEARD) {
                        // Heard just now: back to the ping rhythm.
                        let next_ping = self
                            .settings
                            .ping_interval_ticks
                            .saturating_sub(self.settings.pong_timeout_ticks);
                        let conn = &mut self.conns[key as usize];
                        conn.set(FLAG_PING_SENT, false);
                        conn.timer_stamp = self.wheel.schedule(key, next_ping);
                        return;
                    }
                    // Silent since the ping: the peer or the path is dead, no close frame would arrive.
                    ReactorMetrics::inc(&self.metrics.pong_timeouts);
                    self.close(key, Ending::Done);
                }
            }
            // The client did not finish the close handshake, or did not read our last bytes, in time.
            Phase::Closing | Phase::Flushing => self.close(key, Ending::Done),
        }
    }

    // ---- commands from other threads -------------------------------------------------------------------

    /// Applies one command; returns how many connections it wrote to or closed.
    fn handle_command(&mut self, command: Command) -> usize {
        match command {
            Command::Publish {
                target,
                frame,
                envelope,
                seq,
            } => {
                if seq != 0 {
                    debug_assert!(seq > self.applied_seq, "stored publishes arrive in order");
                    self.applied_seq = seq;
                }
                self.publish(&target, &frame, &envelope)
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
                    if self.begin_close(key, code, &reason) {
                        closed += 1;
                    }
                }
                ReactorMetrics::add(&self.metrics.kicked, closed as u64);
                let _ = reply.send(closed);
                closed
            }
            Command::Presence { user, reply } => {
                let _ = reply.send(self.fanout.user_count(&user));
                1
            }
            Command::Shutdown { timeout } => {
                self.begin_shutdown(timeout);
                self.conns.len()
            }
        }
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
                    .filter(|(_, c)| c.phase == Phase::Open)
                    .map(|(k, _)| k as u32),
            ),
        }
    }

    /// Sends a published frame to its recipients; returns how many there were.
    fn publish(&mut self, target: &Target, frame: &Bytes, envelope: &Bytes) -> usize {
        self.collect(target);
        let recipients = std::mem::take(&mut self.recipients);
        let mut delivered = 0u64;
        // Built once for this reactor if the publisher skipped it (nobody had opted in when it was queued).
        let mut lazy: Option<Bytes> = None;
        for &key in &recipients {
            // Closing connections already have their close frame queued: nothing may follow it.
            let Some(conn) = self.conns.get(key as usize) else {
                continue;
            };
            if conn.phase != Phase::Open {
                continue;
            }
            let bytes = match conn.has(FLAG_RECOVER) {
                false => frame,
                true if !envelope.is_empty() => envelope,
                true => &*lazy.get_or_insert_with(|| history::lazy_envelope(target, frame)),
            };
            if self.send(key, bytes) {
                delivered += 1;
            }
        }
        let count = recipients.len();
        self.recipients = recipients;
        ReactorMetrics::add(&self.metrics.frames_delivered, delivered);
        count
    }

    fn begin_shutdown(&mut self, timeout: Duration) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(Instant::now() + timeout);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.begin_close(key as u32, 1001, "server shutting down");
        }
    }
}

fn make_token(key: u32, generation: u32) -> Token {
    Token(((generation as usize) << 32) | key as usize)
}

fn split_token(token: Token) -> (u32, u32) {
    (token.0 as u32, (token.0 >> 32) as u32)
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_never_collide_with_reserved_ones() {
        let token = make_token(12345, 0xdead_beef);
        assert_eq!(split_token(token), (12345, 0xdead_beef));
        assert_ne!(make_token(u32::MAX - 2, u32::MAX), LISTENER);
        assert_ne!(make_token(u32::MAX - 2, u32::MAX), WAKER);
    }
}
