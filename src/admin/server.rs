//! The admin listener: its own thread and `mio` poll, HTTP/1.1 connections with keep-alive and pipelining.
//!
//! It owns the admin sockets, the accept loop with its connection cap, the one scratch buffer reads go
//! through, and the clock: a sweep of every connection's deadline runs on the poll timeout. What a connection
//! may do next (answer, read, shut down, close) is its sans-IO state's decision (`conn`); what a request does
//! is the handlers' (`api`). This file only moves bytes and time between them and the sockets.

use super::api::{Api, Reply};
use super::conn::{Connection, Event, Expiry, Timeouts};
use super::http::{self, Method};
use crate::accept::Acceptor;
use crate::metrics::AdminMetrics;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(usize::MAX);
const CONTROL: Token = Token(usize::MAX - 1);

/// How often a paused admin listener retries `accept`.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Bytes read from a socket at a time. Reads go through one buffer for the whole listener, and a connection
/// is served after every read, so its input never holds more than one request and one read beyond it.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Bounds of the interval between deadline sweeps; within them it is a sixteenth of the shorter timeout, so a
/// timeout fires at most about 6% late (at most a second, with the default timeouts).
const SWEEP_MIN: Duration = Duration::from_millis(10);
const SWEEP_MAX: Duration = Duration::from_secs(1);

/// The admin listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Request framing limits.
    pub limits: http::Limits,
    /// Connections held at once; past it a new connection gets 503 and is closed.
    pub max_connections: usize,
    /// Header and idle timeouts.
    pub timeouts: Timeouts,
}

/// The admin listener and its connections.
pub struct AdminServer {
    poll: Poll,
    listener: TcpListener,
    acceptor: Acceptor,
    conns: Slab<Entry>,
    settings: Settings,
    api: Api,
    metrics: Arc<AdminMetrics>,
    scratch: Box<[u8]>,
    /// The answer a connection over the cap gets, built once.
    over_capacity: Vec<u8>,
    sweep_every: Duration,
    next_sweep: Instant,
    /// Reused by the sweep for the keys it closes.
    expired: Vec<(usize, Expiry)>,
    /// Freeze requests of a live upgrade (see `handoff`), with the waker that makes the loop look.
    control: std::sync::mpsc::Receiver<crate::handoff::Freeze>,
}

/// How the live upgrade reaches the admin thread: a freeze request, and a waker so it is seen at once.
#[derive(Debug, Clone)]
pub struct AdminHandle {
    waker: Arc<mio::Waker>,
    freezes: std::sync::mpsc::Sender<crate::handoff::Freeze>,
}

impl AdminHandle {
    /// Asks the admin thread to freeze (see `handoff`). False if the thread is gone.
    pub fn freeze(&self, freeze: crate::handoff::Freeze) -> bool {
        self.freezes.send(freeze).is_ok() && self.waker.wake().is_ok()
    }
}

/// One connection: its socket and its state.
struct Entry {
    stream: TcpStream,
    conn: Connection,
}

impl AdminServer {
    /// An admin server on an already bound, non-blocking listener.
    pub fn new(
        listener: std::net::TcpListener,
        settings: Settings,
        api: Api,
        metrics: Arc<AdminMetrics>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let (_, control) = std::sync::mpsc::channel();
        let mut over_capacity = Vec::new();
        http::write_error(
            &mut over_capacity,
            503,
            "too many admin connections; retry later",
            &[("Retry-After", "1")],
            false,
        );
        let shortest = settings.timeouts.header.min(settings.timeouts.idle);
        let sweep_every = (shortest / 16).clamp(SWEEP_MIN, SWEEP_MAX);
        Ok(AdminServer {
            poll,
            listener,
            acceptor: Acceptor::default(),
            conns: Slab::new(),
            settings,
            api,
            metrics,
            scratch: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
            over_capacity,
            sweep_every,
            next_sweep: Instant::now() + sweep_every,
            expired: Vec::new(),
            control,
        })
    }

    /// Joins the cluster once it is up (see `Api::set_cluster`).
    pub fn set_cluster(&mut self, cluster: Option<Arc<crate::cluster::Cluster>>) {
        self.api.set_cluster(cluster);
    }

    /// The handle a live upgrade freezes this admin thread through.
    pub fn handle(&mut self) -> io::Result<AdminHandle> {
        let waker = Arc::new(mio::Waker::new(self.poll.registry(), CONTROL)?);
        let (freezes, control) = std::sync::mpsc::channel();
        self.control = control;
        Ok(AdminHandle { waker, freezes })
    }

    /// Admin connections a predecessor handed over (a batch written by its `export`): registered here and
    /// carried on from their unanswered bytes. Called before the admin thread runs.
    pub fn adopt(
        &mut self,
        payload: &[u8],
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<usize, crate::snapshot::SnapshotError> {
        use crate::snapshot::{Reader, SnapshotError};
        let mut r = Reader::new(payload);
        let count = r.u32("admin batch size")? as usize;
        if count != fds.len() {
            return Err(SnapshotError::Invalid("admin batch size"));
        }
        let now = Instant::now();
        for fd in fds {
            let conn = Connection::restore(&mut r, now, self.settings.timeouts)?;
            let std_stream = std::net::TcpStream::from(fd);
            std_stream
                .set_nonblocking(true)
                .map_err(|_| SnapshotError::Invalid("admin socket"))?;
            let mut stream = TcpStream::from_std(std_stream);
            let entry = self.conns.vacant_entry();
            let token = Token(entry.key());
            self.poll
                .registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .map_err(|_| SnapshotError::Invalid("admin socket registration"))?;
            entry.insert(Entry { stream, conn });
        }
        self.count_open();
        Ok(count)
    }

    /// A live upgrade: report ready (no request will be answered while frozen), and on the order stream the
    /// listener and every connection's unanswered bytes to the successor; then wait. Returns when the upgrade
    /// rolled back; when it succeeds the process exits while this waits.
    fn freeze(&mut self, freeze: crate::handoff::Freeze) {
        use crate::handoff::{Order, Part};
        use std::os::fd::AsRawFd;
        if freeze.parts.send(Part::Ready { applied_seq: 0 }).is_err()
            || freeze.orders.recv() != Ok(Order::Export)
        {
            return;
        }
        if freeze
            .parts
            .send(Part::Listeners(vec![Some(self.listener.as_raw_fd())]))
            .is_err()
        {
            return;
        }
        let mut moved = 0;
        let mut keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        while !keys.is_empty() {
            let batch: Vec<usize> = keys
                .drain(..keys.len().min(crate::handoff::channel::MAX_FDS))
                .collect();
            let mut w = crate::snapshot::Writer::new();
            w.u32(batch.len() as u32);
            let mut fds = Vec::with_capacity(batch.len());
            for key in batch {
                let entry = &self.conns[key];
                entry.conn.snapshot(&mut w);
                fds.push(entry.stream.as_raw_fd());
            }
            moved += fds.len() as u64;
            if freeze
                .parts
                .send(Part::Batch {
                    payload: w.take(),
                    fds,
                })
                .is_err()
            {
                return;
            }
        }
        let _ = freeze.parts.send(Part::Done { moved, stayed: 0 });
        let _ = freeze.orders.recv();
    }

    /// Serves until the process exits.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let mut timeout = self.next_sweep.saturating_duration_since(Instant::now());
            if self.acceptor.is_paused() {
                timeout = timeout.min(ACCEPT_RETRY);
            }
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("admin poll failed, admin API stops: {e}");
                return;
            }
            if self.acceptor.is_paused() {
                self.accept_all();
            }
            // Commands reach the mailboxes as each request is handled, in order; the reactors are woken once
            // each when the turn is over, after the answers went out (`dispatch::hold_wakes`).
            crate::dispatch::hold_wakes(|| {
                for event in events.iter() {
                    match event.token() {
                        LISTENER => self.accept_all(),
                        CONTROL => {
                            while let Ok(freeze) = self.control.try_recv() {
                                self.freeze(freeze);
                                log::info!("admin: upgrade did not complete; serving again");
                                self.accept_all();
                            }
                        }
                        // Every event gets the same treatment: the connection's state says what can move.
                        Token(key) => self.drive(key),
                    }
                }
            });
            let now = Instant::now();
            if now >= self.next_sweep {
                self.sweep(now);
                self.next_sweep = now + self.sweep_every;
            }
        }
    }

    fn accept_all(&mut self) {
        let AdminServer {
            poll,
            listener,
            acceptor,
            conns,
            settings,
            metrics,
            over_capacity,
            scratch,
            ..
        } = self;
        let now = Instant::now();
        acceptor.accept_all(
            listener,
            "admin listener",
            |mut stream| {
                if conns.len() >= settings.max_connections {
                    refuse(stream, over_capacity, scratch);
                    metrics.admin_connections_refused.fetch_add(1, Relaxed);
                    return;
                }
                let entry = conns.vacant_entry();
                let token = Token(entry.key());
                // Edge-triggered, once for the socket's life: the connection's state decides when to read
                // and write, and `drive` goes until the socket would block.
                if poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                    .is_ok()
                {
                    entry.insert(Entry {
                        stream,
                        conn: Connection::new(now, settings.timeouts),
                    });
                }
            },
            || {},
        );
        self.count_open();
    }

    /// Moves everything that can move on one connection: answers complete requests, writes, reads one chunk at
    /// a time, until nothing moves (the socket would block, or the state says wait); closes it when done.
    fn drive(&mut self, key: usize) {
        let AdminServer {
            conns,
            settings,
            api,
            scratch,
            ..
        } = self;
        let Some(Entry { stream, conn }) = conns.get_mut(key) else {
            return;
        };
        let alive = loop {
            let now = Instant::now();
            let mut moved = false;
            // The key and the route's body limit are checked as soon as a head is complete, before its body
            // is read.
            while let Some(event) = conn.poll_request(&settings.limits, now, |head| api.admit(head))
            {
                answer(api, conn, event);
                moved = true;
            }
            match write_out(stream, conn, now) {
                Ok(wrote) => moved |= wrote,
                Err(_) => break false,
            }
            if conn.wants_shutdown() {
                // Half-close after the last answer and keep reading for a while, so the client's unread
                // bytes (a body after a 401, say) do not turn our close into a reset that destroys the answer.
                let _ = stream.shutdown(Shutdown::Write);
                conn.start_lingering(now);
                moved = true;
            }
            if conn.is_done() {
                break false;
            }
            // One chunk, then the loop answers what it completed: input never holds more than a request and a
            // chunk. Not reading while answers are blocked leaves the rest in the kernel; the writable event
            // that unblocks them brings the connection back here.
            if conn.wants_read() {
                match stream.read(scratch) {
                    Ok(0) => {
                        conn.on_peer_closed();
                        moved = true;
                    }
                    Ok(n) => {
                        conn.on_read(&scratch[..n], now);
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => moved = true,
                    Err(_) => break false,
                }
            }
            if !moved {
                break true;
            }
        };
        if !alive {
            self.close(key);
        }
    }

    /// Closes every connection whose deadline passed, counting header and idle timeouts.
    fn sweep(&mut self, now: Instant) {
        let mut expired = std::mem::take(&mut self.expired);
        expired.extend(
            self.conns
                .iter()
                .filter_map(|(key, entry)| Some((key, entry.conn.expired(now)?))),
        );
        for &(key, expiry) in &expired {
            let counter = match expiry {
                Expiry::Header => &self.metrics.admin_header_timeouts,
                Expiry::Idle => &self.metrics.admin_idle_timeouts,
                Expiry::Linger => {
                    self.close(key);
                    continue;
                }
            };
            counter.fetch_add(1, Relaxed);
            self.close(key);
        }
        expired.clear();
        self.expired = expired;
    }

    fn close(&mut self, key: usize) {
        if self.conns.try_remove(key).is_some() {
            self.count_open();
        }
    }

    fn count_open(&self) {
        self.metrics
            .admin_connections
            .store(self.conns.len() as u64, Relaxed);
    }
}

/// Writes one event's answer into the connection's output.
fn answer(api: &Api, conn: &mut Connection, event: Event<Reply>) {
    let (reply, keep_alive, head_only) = match event {
        Event::Request(request) => {
            let reply = api.handle(&request);
            (reply, request.keep_alive, request.method == Method::Head)
        }
        Event::Refused { answer, head_only } => (answer, false, head_only),
        Event::Malformed(error) => (Reply::error(error.status(), error.message()), false, false),
    };
    api.count(reply.status);
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let out = conn.output();
    if head_only {
        // HEAD: the GET answer's headers, Content-Length included, without its body (RFC 9110 §9.3.2).
        http::write_response_head(
            out,
            reply.status,
            reply.content_type,
            &headers,
            reply.body.len(),
            keep_alive,
        );
    } else {
        http::write_response(
            out,
            reply.status,
            reply.content_type,
            &headers,
            &reply.body,
            keep_alive,
        );
    }
}

/// Writes unsent bytes until none are left or the socket would block; `Ok(true)` if any were written.
fn write_out(stream: &mut TcpStream, conn: &mut Connection, now: Instant) -> io::Result<bool> {
    let mut wrote = false;
    while !conn.unsent().is_empty() {
        match stream.write(conn.unsent()) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.on_written(n, now);
                wrote = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(wrote)
}

/// A connection over the cap: one best-effort write of a 503, never buffered, then close. What the client sent
/// already is read first (into the shared scratch buffer, and dropped), so the close is a FIN that lets it read
/// the 503 rather than a reset that destroys it.
fn refuse(mut stream: TcpStream, answer: &[u8], scratch: &mut [u8]) {
    let _ = stream.read(scratch);
    let _ = stream.write(answer);
    let _ = stream.shutdown(Shutdown::Write);
}
