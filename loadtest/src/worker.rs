//! A worker process: one mio poll loop (edge-triggered) over up to ~19,000 client connections, driven by
//! commands from the coordinator on stdin and answering with events on stdout.
//!
//! It owns the sockets, the pacing of connects and churn, the timeouts, and the answer to each command. The
//! protocol of one connection is in `session`; the wire format of commands in `proto`.

use crate::checker::Stream;
use crate::dial;
use crate::proto::{
    ChurnResult, Command, ConnectResult, DeliveryResult, Event, Expectation, Health, SlowResult,
    Violation, WorkerInit,
};
use crate::rng::Rng;
use crate::session::{self, Feed, Phase, Session, Tally, CLOSE_NORMAL};
use crate::stats::{self, Latency, Reasons};
use crate::sys::{monotonic_ns, open_files_limit};
use anyhow::{bail, Context};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, BufRead, Read, Write};
use std::sync::mpsc;

const WAKER: Token = Token(usize::MAX);
const NONE: u32 = u32::MAX;
/// How often to re-check delivery completeness and send progress while something is under way.
const TICK_NS: u64 = 20_000_000;
const PROGRESS_NS: u64 = 250_000_000;
/// Milliseconds a close handshake started by churn may take before the socket is dropped.
const CHURN_CLOSE_TIMEOUT_NS: u64 = 5_000_000_000;
/// Descriptors the worker keeps for itself (epoll, waker, pipes) under the open-files limit.
pub const RESERVED_FDS: u64 = 64;

/// A connection: its socket, its TLS client with `--tls`, and its protocol state.
struct Conn {
    stream: TcpStream,
    generation: u32,
    tls: Option<Box<rustls::ClientConnection>>,
    session: Session,
}

/// Attempts to open connections during one phase.
#[derive(Default)]
struct Attempts {
    started: u64,
    succeeded: u64,
    failures: Reasons,
    handshake: Latency,
    first_start_ns: u64,
    last_done_ns: u64,
}

impl Attempts {
    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

struct ConnectOp {
    rate_per_sec: f64,
    max_inflight: usize,
    started_ns: u64,
    deadline_ns: u64,
}

struct AwaitOp {
    stream: Stream,
    expect: Expectation,
    deadline_ns: u64,
    skip_slow: bool,
}

struct ResumeOp {
    messages: u64,
    deadline_ns: u64,
}

struct ChurnOp {
    closes_per_sec: f64,
    started_ns: u64,
    end_ns: u64,
    settle_deadline_ns: u64,
    closed: u64,
}

struct ShutdownOp {
    deadline_ns: u64,
}

/// Runs a worker until the coordinator says goodbye or goes away.
pub fn run() -> anyhow::Result<()> {
    let stdin = io::stdin();
    let mut first = String::new();
    stdin.lock().read_line(&mut first)?;
    let init = match serde_json::from_str::<Command>(&first).context("first command")? {
        Command::Init(init) => init,
        other => bail!("expected init, got {other:?}"),
    };
    let poll = Poll::new()?;
    let waker = std::sync::Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = mpsc::channel::<Option<Command>>();
    // A thread reads stdin (blocking) and wakes the poll loop; `None` means the coordinator went away.
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Command>(&line) {
                Ok(cmd) => {
                    if tx.send(Some(cmd)).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("worker: bad command {line:?}: {e}"),
            }
            let _ = waker.wake();
        }
        let _ = tx.send(None);
        let _ = waker.wake();
    });
    let mut worker = Worker::new(init, poll, rx)?;
    worker.emit(&Event::Ready {
        fd_limit: open_files_limit().0,
    })?;
    worker.run()
}

struct Worker {
    init: WorkerInit,
    /// The TLS client configuration with `--tls`, shared by every connection of this worker.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    host: String,
    poll: Poll,
    commands: mpsc::Receiver<Option<Command>>,
    conns: Slab<Conn>,
    /// Slab key of each of this worker's connection indices (relative to `first_conn`), or `NONE`.
    by_index: Vec<u32>,
    /// Connection indices waiting for their connect to start.
    to_start: VecDeque<u64>,
    /// Connections in connect or handshake.
    inflight: usize,
    open: u64,
    /// (key, generation, deadline) of connects in order of start, for the handshake timeout.
    handshake_deadlines: VecDeque<(u32, u32, u64)>,
    /// (key, generation, deadline) of close handshakes we started.
    close_deadlines: VecDeque<(u32, u32, u64)>,
    next_generation: u32,
    tally: Tally,
    attempts: Attempts,
    abrupt: Reasons,
    protocol_errors: Reasons,
    close_timeouts: u64,
    connect: Option<ConnectOp>,
    awaiting: Option<AwaitOp>,
    churn: Option<ChurnOp>,
    shutdown: Option<ShutdownOp>,
    resume: Option<ResumeOp>,
    /// From `Pause` to the answer to `Resume`: how the slow readers that ended meanwhile ended.
    slow: Option<SlowResult>,
    rng: Rng,
    scratch: Vec<u8>,
    born_ns: u64,
    last_tick_ns: u64,
    last_progress_ns: u64,
    out: io::Stdout,
}

impl Worker {
    fn new(
        init: WorkerInit,
        poll: Poll,
        commands: mpsc::Receiver<Option<Command>>,
    ) -> anyhow::Result<Self> {
        let limit = open_files_limit().0;
        if init.conns + RESERVED_FDS > limit {
            bail!(
                "worker {} asked for {} connections but may open only {} files",
                init.worker,
                init.conns,
                limit
            );
        }
        let host = init.server.to_string();
        Ok(Worker {
            tls: init.tls.map(|mode| crate::tls::client_config(mode.resume)),
            by_index: vec![NONE; init.conns as usize],
            conns: Slab::with_capacity(init.conns as usize),
            rng: Rng::new(init.seed),
            host,
            init,
            poll,
            commands,
            to_start: VecDeque::new(),
            inflight: 0,
            open: 0,
            handshake_deadlines: VecDeque::new(),
            close_deadlines: VecDeque::new(),
            next_generation: 0,
            tally: Tally::default(),
            attempts: Attempts::default(),
            abrupt: Reasons::new(),
            protocol_errors: Reasons::new(),
            close_timeouts: 0,
            connect: None,
            awaiting: None,
            churn: None,
            shutdown: None,
            resume: None,
            slow: None,
            scratch: vec![0; 64 * 1024],
            born_ns: monotonic_ns(),
            last_tick_ns: 0,
            last_progress_ns: 0,
            out: io::stdout(),
        })
    }

    fn emit(&mut self, event: &Event) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(event)?;
        line.push(b'\n');
        let mut out = self.out.lock();
        out.write_all(&line)?;
        out.flush()?;
        Ok(())
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let now = monotonic_ns();
            for event in events.iter() {
                if event.token() == WAKER {
                    continue;
                }
                let (key, generation) = split_token(event.token());
                self.on_event(key, generation, now);
            }
            // Commands after readiness, so a reply reflects everything read so far.
            while let Ok(cmd) = self.commands.try_recv() {
                match cmd {
                    Some(cmd) => self.on_command(cmd)?,
                    // The coordinator is gone: nobody will read our answers.
                    None => return Ok(()),
                }
            }
            if self.step(monotonic_ns())? {
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self) -> std::time::Duration {
        let busy = self.connect.is_some()
            || self.awaiting.is_some()
            || self.resume.is_some()
            || self.churn.is_some()
            || self.shutdown.is_some()
            || !self.to_start.is_empty()
            || !self.handshake_deadlines.is_empty()
            || !self.close_deadlines.is_empty();
        std::time::Duration::from_millis(if busy { 2 } else { 100 })
    }

    // ---- commands ------------------------------------------------------------------------------------------

    fn on_command(&mut self, cmd: Command) -> anyhow::Result<()> {
        let now = monotonic_ns();
        match cmd {
            Command::Init(_) => bail!("init sent twice"),
            Command::Connect {
                rate_per_sec,
                max_inflight,
                timeout_ms,
            } => {
                self.attempts = Attempts::default();
                let first = self.init.first_conn;
                self.to_start.extend(first..first + self.init.conns);
                self.connect = Some(ConnectOp {
                    rate_per_sec,
                    max_inflight: max_inflight.max(1),
                    started_ns: now,
                    deadline_ns: now + timeout_ms * 1_000_000,
                });
            }
            Command::Await {
                stream,
                expect,
                timeout_ms,
                skip_slow,
            } => {
                self.awaiting = Some(AwaitOp {
                    stream,
                    expect,
                    deadline_ns: now + timeout_ms * 1_000_000,
                    skip_slow,
                });
            }
            Command::Pause => {
                let mut paused = 0;
                for (_, conn) in self.conns.iter_mut() {
                    if conn.session.slow_reader && conn.session.phase == Phase::Open {
                        conn.session.paused = true;
                        paused += 1;
                    }
                }
                self.slow = Some(SlowResult {
                    paused,
                    ..Default::default()
                });
                self.emit(&Event::Paused { slow: paused })?;
            }
            Command::Resume {
                messages,
                timeout_ms,
            } => {
                let keys: Vec<u32> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.session.paused)
                    .map(|(k, _)| k as u32)
                    .collect();
                for key in keys {
                    self.conns[key as usize].session.paused = false;
                    // Edge-triggered: what arrived while paused is read now, not on the next event.
                    self.flush(key);
                    if self.conns.contains(key as usize) {
                        self.read(key, now);
                    }
                }
                self.resume = Some(ResumeOp {
                    messages,
                    deadline_ns: now + timeout_ms * 1_000_000,
                });
            }
            Command::Churn {
                closes_per_sec,
                duration_ms,
                settle_ms,
            } => {
                self.attempts = Attempts::default();
                self.churn = Some(ChurnOp {
                    closes_per_sec,
                    started_ns: now,
                    end_ns: now + duration_ms * 1_000_000,
                    settle_deadline_ns: now + (duration_ms + settle_ms) * 1_000_000,
                    closed: 0,
                });
            }
            Command::Shutdown { timeout_ms } => {
                self.to_start.clear();
                self.connect = None;
                self.churn = None;
                self.awaiting = None;
                let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                for key in keys {
                    let phase = self.conns[key].session.phase;
                    match phase {
                        Phase::Open => {
                            self.conns[key]
                                .session
                                .start_close(CLOSE_NORMAL, &mut self.rng);
                            self.flush(key as u32);
                        }
                        Phase::Connecting | Phase::Handshaking => self.remove(key as u32),
                        Phase::Closing | Phase::Closed => {}
                    }
                }
                self.shutdown = Some(ShutdownOp {
                    deadline_ns: now + timeout_ms * 1_000_000,
                });
            }
        }
        Ok(())
    }

    /// Periodic work; returns true when the worker should exit.
    fn step(&mut self, now: u64) -> anyhow::Result<bool> {
        if now.saturating_sub(self.born_ns) > self.init.max_lifetime_ms * 1_000_000 {
            self.emit(&Event::Fatal {
                message: format!("worker {} reached its lifetime limit", self.init.worker),
            })?;
            return Ok(true);
        }
        self.start_connects(now);
        self.expire(now);
        self.churn_closes(now);
        if now.saturating_sub(self.last_tick_ns) < TICK_NS {
            return Ok(false);
        }
        self.last_tick_ns = now;
        if now.saturating_sub(self.last_progress_ns) >= PROGRESS_NS
            && (self.connect.is_some()
                || self.churn.is_some()
                || self.awaiting.is_some()
                || self.resume.is_some())
        {
            self.last_progress_ns = now;
            let progress = Event::Progress {
                open: self.open,
                started: self.attempts.started,
                failed: self.attempts.failed(),
            };
            self.emit(&progress)?;
        }
        self.finish_connect(now)?;
        self.finish_await(now)?;
        self.finish_resume(now)?;
        self.finish_churn(now)?;
        self.finish_shutdown(now)
    }

    fn finish_connect(&mut self, now: u64) -> anyhow::Result<()> {
        let Some(op) = &self.connect else {
            return Ok(());
        };
        let done = self.to_start.is_empty() && self.inflight == 0;
        if !done && now < op.deadline_ns {
            return Ok(());
        }
        self.connect = None;
        // Whatever is still in flight at the deadline failed by timeout.
        self.to_start.clear();
        self.fail_all_inflight("timeout");
        let a = std::mem::take(&mut self.attempts);
        let result = ConnectResult {
            attempted: a.started,
            open: self.open,
            failures: a.failures,
            handshake_us: a.handshake.to_data(),
            first_start_ns: a.first_start_ns,
            last_done_ns: a.last_done_ns,
        };
        self.emit(&Event::Connected(result))
    }

    fn finish_await(&mut self, now: u64) -> anyhow::Result<()> {
        let Some(op) = &self.awaiting else {
            return Ok(());
        };
        let (stream, deadline, skip_slow) = (op.stream, op.deadline_ns, op.skip_slow);
        let check = self.check_delivery(stream, &op.expect, skip_slow, false);
        if check.lost > 0 && now < deadline {
            return Ok(());
        }
        let op = self.awaiting.take().expect("checked above");
        let check = self.check_delivery(stream, &op.expect, skip_slow, true);
        let st = std::mem::take(&mut self.tally.streams[session::stream_index(stream)]);
        let mut violations = st.violations;
        violations.extend(check.violations);
        violations.truncate(session::MAX_VIOLATIONS);
        let result = DeliveryResult {
            complete: check.lost == 0,
            conns_checked: check.conns,
            expected: check.expected + st.closed_expected,
            received: st.received,
            lost: check.lost + st.closed_holes,
            duplicated: st.duplicated,
            reordered: st.reordered,
            misdelivered: st.misdelivered,
            malformed: std::mem::take(&mut self.tally.malformed),
            latency_us: st.latency.to_data(),
            first_message_latency_us: st.first_message_latency.to_data(),
            first_ns: st.first_ns,
            last_ns: st.last_ns,
            violations,
        };
        self.emit(&Event::Delivered(result))
    }

    /// Answers `Resume` once every slow reader has the whole slow stream or has ended (or at the deadline).
    fn finish_resume(&mut self, now: u64) -> anyhow::Result<()> {
        let Some(op) = &self.resume else {
            return Ok(());
        };
        let messages = op.messages;
        let waiting = self.conns.iter().any(|(_, c)| {
            let s = &c.session;
            s.slow_reader
                && s.phase == Phase::Open
                && s.tracker(Stream::Slow)
                    .is_some_and(|t| t.lost(messages) > 0)
        });
        if waiting && now < op.deadline_ns {
            return Ok(());
        }
        self.resume = None;
        let mut result = self.slow.take().unwrap_or_default();
        for (_, conn) in self.conns.iter() {
            let s = &conn.session;
            if !s.slow_reader {
                if let Some(code) = s.server_close {
                    stats::count(&mut result.others_closed_with_frame, &close_label(code), 1);
                }
                continue;
            }
            let received = s.tracker(Stream::Slow).map_or(0, |t| t.received());
            match (s.server_close, s.phase) {
                (Some(code), _) => {
                    stats::count(&mut result.closed_with_frame, &close_label(code), 1);
                    result.messages_before_end += received;
                }
                (None, Phase::Open) => {
                    let complete = s
                        .tracker(Stream::Slow)
                        .is_some_and(|t| t.lost(messages) == 0);
                    if complete {
                        result.lossless += 1;
                    } else {
                        result.incomplete += 1;
                    }
                }
                _ => {}
            }
        }
        let st = std::mem::take(&mut self.tally.streams[session::stream_index(Stream::Slow)]);
        result.duplicated = st.duplicated;
        result.reordered = st.reordered;
        result.violations = st.violations;
        self.emit(&Event::Resumed(result))
    }

    /// A connection ended without a close frame while the slow-reader phase watches: counted by `reason`.
    fn slow_ended_without_frame(&mut self, key: u32, reason: &str) {
        let session = &self.conns[key as usize].session;
        let Some(result) = self.slow.as_mut() else {
            return;
        };
        if session.server_close.is_some() {
            return;
        }
        if session.slow_reader {
            stats::count(&mut result.ended_without_frame, reason, 1);
            result.messages_before_end += session.tracker(Stream::Slow).map_or(0, |t| t.received());
        } else {
            stats::count(&mut result.others_ended_without_frame, reason, 1);
        }
    }

    fn finish_churn(&mut self, now: u64) -> anyhow::Result<()> {
        let Some(op) = &self.churn else {
            return Ok(());
        };
        if now < op.end_ns {
            return Ok(());
        }
        let settled = self.to_start.is_empty()
            && self.inflight == 0
            && !self
                .conns
                .iter()
                .any(|(_, c)| c.session.churn_victim && c.session.phase != Phase::Open);
        if !settled && now < op.settle_deadline_ns {
            return Ok(());
        }
        let closed = op.closed;
        self.churn = None;
        self.to_start.clear();
        self.fail_all_inflight("timeout");
        let a = std::mem::take(&mut self.attempts);
        let result = ChurnResult {
            closed,
            reopened: a.succeeded,
            failures: a.failures,
            open: self.open,
            handshake_us: a.handshake.to_data(),
        };
        self.emit(&Event::Churned(result))
    }

    fn finish_shutdown(&mut self, now: u64) -> anyhow::Result<bool> {
        let Some(op) = &self.shutdown else {
            return Ok(false);
        };
        if !self.conns.is_empty() && now < op.deadline_ns {
            return Ok(false);
        }
        self.close_timeouts += self.conns.len() as u64;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.remove(key as u32);
        }
        let health = Health {
            pings: self.tally.pings,
            pings_after_close: self.tally.pings_after_close,
            pongs: self.tally.pongs,
            server_closes: std::mem::take(&mut self.tally.server_closes),
            abrupt: std::mem::take(&mut self.abrupt),
            protocol_errors: std::mem::take(&mut self.protocol_errors),
            close_timeouts: self.close_timeouts,
        };
        self.emit(&Event::Bye(health))?;
        Ok(true)
    }

    /// Lost messages now, over the open connections (but the slow readers with `skip_slow`), per the
    /// expectation.
    fn check_delivery(
        &self,
        stream: Stream,
        expect: &Expectation,
        skip_slow: bool,
        final_check: bool,
    ) -> Check {
        let mut check = Check::default();
        for (_, conn) in self.conns.iter() {
            let s = &conn.session;
            if !matches!(s.phase, Phase::Open) || (skip_slow && s.slow_reader) {
                continue;
            }
            let total = match expect {
                Expectation::All(n) => *n,
                Expectation::PerUser { first_user, counts } => s
                    .user
                    .checked_sub(*first_user)
                    .and_then(|k| counts.get(k as usize))
                    .copied()
                    .unwrap_or(0),
                Expectation::UpTo(n) => *n,
            };
            let Some(tracker) = s.tracker(stream) else {
                // Never saw the churn stream: joined after its last message.
                check.conns += 1;
                continue;
            };
            check.conns += 1;
            let lost = tracker.lost(total);
            check.expected += tracker.received() + lost;
            check.lost += lost;
            if lost > 0 && !final_check {
                // Enough to know we must keep waiting.
                return check;
            }
            if lost > 0 && check.violations.len() < session::MAX_VIOLATIONS {
                check.violations.push(Violation {
                    conn: s.index,
                    stream: stream.name().to_string(),
                    kind: "lost".into(),
                    seq: tracker.next().min(total),
                    expected: total,
                });
            }
        }
        check
    }

    // ---- connecting ----------------------------------------------------------------------------------------

    fn start_connects(&mut self, now: u64) {
        let (allowed, max_inflight) = match &self.connect {
            Some(op) => {
                let elapsed = now.saturating_sub(op.started_ns) as f64 / 1e9;
                let allowed = if op.rate_per_sec > 0.0 {
                    (elapsed * op.rate_per_sec).floor() as u64 + 1
                } else {
                    u64::MAX
                };
                (allowed, op.max_inflight)
            }
            // Churn reopens go at once, a few at a time.
            None if self.churn.is_some() => (u64::MAX, 256),
            None => return,
        };
        while self.attempts.started < allowed && self.inflight < max_inflight {
            let Some(index) = self.to_start.pop_front() else {
                return;
            };
            self.start(index, now);
        }
    }

    fn start(&mut self, index: u64, now: u64) {
        let init = &self.init;
        let source = (!init.sources.is_empty())
            .then(|| init.sources[(index % init.sources.len() as u64) as usize]);
        self.attempts.started += 1;
        if self.attempts.first_start_ns == 0 {
            self.attempts.first_start_ns = now;
        }
        let slow = init.slow.filter(|s| s.is_slow(index));
        let mut stream = match dial::connect(init.server, source, slow.as_ref()) {
            Ok(stream) => stream,
            Err(e) => {
                stats::count(&mut self.attempts.failures, &dial::reason(&e), 1);
                return;
            }
        };
        let user = init.first_user + index / init.conns_per_user;
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let entry = self.conns.vacant_entry();
        let key = entry.key() as u32;
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            make_token(key, generation),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            stats::count(&mut self.attempts.failures, &dial::reason(&e), 1);
            return;
        }
        let tls = match &self.tls {
            Some(config) => {
                match rustls::ClientConnection::new(
                    config.clone(),
                    crate::tls::server_name(init.server),
                ) {
                    Ok(tls) => Some(Box::new(tls)),
                    Err(e) => {
                        stats::count(&mut self.attempts.failures, &format!("tls: {e}"), 1);
                        return;
                    }
                }
            }
            None => None,
        };
        let mut session = Session::new(index, user, self.rng.nonce(), now);
        session.slow_reader = slow.is_some();
        entry.insert(Conn {
            stream,
            generation,
            tls,
            session,
        });
        self.by_index[(index - self.init.first_conn) as usize] = key;
        self.inflight += 1;
        self.handshake_deadlines.push_back((
            key,
            generation,
            now + self.init.handshake_timeout_ms * 1_000_000,
        ));
    }

    fn target(&self, index: u64) -> String {
        let init = &self.init;
        let mut target = format!(
            "{}?user=u{}&client=c{index}",
            init.path,
            init.first_user + index / init.conns_per_user
        );
        if init.channels > 0 {
            target.push_str(&format!("&channels=ch{}", index % init.channels));
        }
        target
    }

    /// A connect or handshake failed: count it and drop the socket.
    fn fail_attempt(&mut self, key: u32, reason: &str) {
        stats::count(&mut self.attempts.failures, reason, 1);
        self.remove(key);
    }

    fn fail_all_inflight(&mut self, reason: &str) {
        let keys: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.session.phase, Phase::Connecting | Phase::Handshaking))
            .map(|(k, _)| k as u32)
            .collect();
        for key in keys {
            self.fail_attempt(key, reason);
        }
    }

    /// Removes a connection everywhere and closes its socket.
    fn remove(&mut self, key: u32) {
        let conn = self.conns.remove(key as usize);
        if let (Some(result), Some(code)) = (self.slow.as_mut(), conn.session.server_close) {
            if conn.session.slow_reader {
                stats::count(&mut result.closed_with_frame, &close_label(code), 1);
                result.messages_before_end += conn
                    .session
                    .tracker(Stream::Slow)
                    .map_or(0, |t| t.received());
            } else {
                stats::count(&mut result.others_closed_with_frame, &close_label(code), 1);
            }
        }
        match conn.session.phase {
            Phase::Connecting | Phase::Handshaking => self.inflight -= 1,
            _ => self.open -= 1,
        }
        conn.session.retire(&mut self.tally);
        let slot = (conn.session.index - self.init.first_conn) as usize;
        if self.by_index[slot] == key {
            self.by_index[slot] = NONE;
        }
        // Churn victims come back; the reopened connection starts the churn stream afresh.
        if conn.session.churn_victim && self.churn.is_some() && self.shutdown.is_none() {
            self.to_start.push_back(conn.session.index);
        }
    }

    fn expire(&mut self, now: u64) {
        while let Some(&(key, generation, deadline)) = self.handshake_deadlines.front() {
            if deadline > now {
                break;
            }
            self.handshake_deadlines.pop_front();
            if self.is_live(key, generation)
                && matches!(
                    self.conns[key as usize].session.phase,
                    Phase::Connecting | Phase::Handshaking
                )
            {
                self.fail_attempt(key, "timeout");
            }
        }
        while let Some(&(key, generation, deadline)) = self.close_deadlines.front() {
            if deadline > now {
                break;
            }
            self.close_deadlines.pop_front();
            if self.is_live(key, generation) {
                self.close_timeouts += 1;
                self.remove(key);
            }
        }
    }

    // ---- churn ---------------------------------------------------------------------------------------------

    fn churn_closes(&mut self, now: u64) {
        let Some(op) = &self.churn else {
            return;
        };
        if now >= op.end_ns {
            return;
        }
        let due = (now.saturating_sub(op.started_ns) as f64 / 1e9 * op.closes_per_sec) as u64;
        let mut closed = op.closed;
        while closed < due {
            closed += 1;
            // A random open connection; a few tries, since some may be reconnecting.
            for _ in 0..8 {
                let slot = self.rng.below(self.init.conns) as usize;
                let key = self.by_index[slot];
                if key == NONE || self.conns[key as usize].session.phase != Phase::Open {
                    continue;
                }
                let conn = &mut self.conns[key as usize];
                conn.session.churn_victim = true;
                conn.session.start_close(CLOSE_NORMAL, &mut self.rng);
                let generation = conn.generation;
                self.close_deadlines
                    .push_back((key, generation, now + CHURN_CLOSE_TIMEOUT_NS));
                self.flush(key);
                break;
            }
        }
        if let Some(op) = &mut self.churn {
            op.closed = closed;
        }
    }

    // ---- readiness -----------------------------------------------------------------------------------------

    fn is_live(&self, key: u32, generation: u32) -> bool {
        self.conns
            .get(key as usize)
            .is_some_and(|c| c.generation == generation)
    }

    fn on_event(&mut self, key: u32, generation: u32, now: u64) {
        if !self.is_live(key, generation) {
            return;
        }
        if self.conns[key as usize].session.phase == Phase::Connecting {
            self.on_connecting(key);
            if !self.is_live(key, generation)
                || self.conns[key as usize].session.phase == Phase::Connecting
            {
                return;
            }
        }
        self.flush(key);
        if self.is_live(key, generation) && !self.conns[key as usize].session.paused {
            self.read(key, now);
        }
    }

    /// The connect finished one way or the other (mio: check `take_error`, then `peer_addr`).
    fn on_connecting(&mut self, key: u32) {
        let conn = &mut self.conns[key as usize];
        match conn.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                let reason = dial::reason(&e);
                self.fail_attempt(key, &reason);
                return;
            }
        }
        let index = conn.session.index;
        match conn.stream.peer_addr() {
            Ok(_) => {
                let target = self.target(index);
                let conn = &mut self.conns[key as usize];
                conn.session
                    .connected_offering(&self.host, &target, self.init.compression);
            }
            // Spurious wake-up: still connecting.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
            Err(e) => {
                let reason = dial::reason(&e);
                self.fail_attempt(key, &reason);
            }
        }
    }

    fn flush(&mut self, key: u32) {
        let conn = &mut self.conns[key as usize];
        if let Some(tls) = conn.tls.as_mut() {
            // The session's bytes become TLS records (rustls holds them until its handshake is done).
            let out = conn.session.output();
            if !out.is_empty() {
                if let Ok(n) = tls.writer().write(out) {
                    conn.session.consumed_output(n);
                }
            }
            while tls.wants_write() {
                match tls.write_tls(&mut conn.stream) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.on_socket_error(key, &e);
                        return;
                    }
                }
            }
            return;
        }
        while !conn.session.output().is_empty() {
            match conn.stream.write(conn.session.output()) {
                Ok(0) => break,
                Ok(n) => conn.session.consumed_output(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.on_socket_error(key, &e);
                    return;
                }
            }
        }
    }

    /// Reads a TLS connection: records from the socket, then its plaintext through the session.
    fn read_tls(&mut self, key: u32, now: u64) {
        loop {
            let Some(conn) = self.conns.get_mut(key as usize) else {
                return;
            };
            let tls = conn.tls.as_mut().expect("a TLS connection");
            match tls.read_tls(&mut conn.stream) {
                Ok(0) => {
                    self.on_eof(key);
                    return;
                }
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        let reason = format!("tls: {e}");
                        match conn.session.phase {
                            Phase::Connecting | Phase::Handshaking => {
                                self.fail_attempt(key, &reason)
                            }
                            _ => {
                                stats::count(&mut self.protocol_errors, &reason, 1);
                                self.remove(key);
                            }
                        }
                        return;
                    }
                    loop {
                        let Some(conn) = self.conns.get_mut(key as usize) else {
                            return;
                        };
                        let tls = conn.tls.as_mut().expect("a TLS connection");
                        match tls.reader().read(&mut self.scratch) {
                            Ok(0) => break,
                            Ok(n) => {
                                if !self.on_data(key, n, now) {
                                    return;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => break,
                        }
                    }
                    // Handshake replies, pongs and close replies go out at once.
                    self.flush(key);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.on_socket_error(key, &e);
                    return;
                }
            }
        }
    }

    fn read(&mut self, key: u32, now: u64) {
        if self
            .conns
            .get(key as usize)
            .is_some_and(|c| c.tls.is_some())
        {
            return self.read_tls(key, now);
        }
        loop {
            let Some(conn) = self.conns.get_mut(key as usize) else {
                return;
            };
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.on_eof(key);
                    return;
                }
                Ok(n) => {
                    if !self.on_data(key, n, now) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.on_socket_error(key, &e);
                    return;
                }
            }
        }
    }

    /// `self.scratch[..n]` came from connection `key`: feeds its session; returns false if the connection is
    /// gone.
    fn on_data(&mut self, key: u32, n: usize, now: u64) -> bool {
        let conn = &mut self.conns[key as usize];
        let was = conn.session.phase;
        let feed = conn
            .session
            .feed(&self.scratch[..n], now, &mut self.tally, &mut self.rng);
        let phase = conn.session.phase;
        let started_ns = conn.session.started_ns;
        if was == Phase::Handshaking && phase != Phase::Handshaking {
            self.inflight -= 1;
            self.open += 1;
            self.attempts.succeeded += 1;
            self.attempts.handshake.record_between(started_ns, now);
            self.attempts.last_done_ns = now;
        }
        match feed {
            Feed::More => {}
            Feed::HandshakeFailed(reason) => {
                self.fail_attempt(key, &reason);
                return false;
            }
            Feed::ProtocolError(e) => {
                stats::count(&mut self.protocol_errors, &e.to_string(), 1);
                self.flush(key);
                if self.conns.contains(key as usize) {
                    self.remove(key);
                }
                return false;
            }
        }
        // Pongs and close replies go out at once.
        if !self.conns[key as usize].session.output().is_empty() {
            self.flush(key);
        }
        self.conns.contains(key as usize)
    }

    fn on_eof(&mut self, key: u32) {
        match self.conns[key as usize].session.phase {
            Phase::Connecting | Phase::Handshaking => self.fail_attempt(key, "eof"),
            // The server closed without a close frame.
            Phase::Open => {
                stats::count(&mut self.abrupt, "eof", 1);
                self.slow_ended_without_frame(key, "eof");
                self.remove(key);
            }
            // Expected: the server closes TCP after the close handshake (RFC 6455 §7.1.1).
            Phase::Closing | Phase::Closed => self.remove(key),
        }
    }

    fn on_socket_error(&mut self, key: u32, e: &io::Error) {
        let reason = dial::reason(e);
        match self.conns[key as usize].session.phase {
            Phase::Connecting | Phase::Handshaking => self.fail_attempt(key, &reason),
            Phase::Open => {
                stats::count(&mut self.abrupt, &reason, 1);
                self.slow_ended_without_frame(key, &reason);
                self.remove(key);
            }
            Phase::Closing | Phase::Closed => self.remove(key),
        }
    }
}

/// A close code as a report key (`none` for a close frame without one).
fn close_label(code: Option<u16>) -> String {
    code.map_or_else(|| "none".to_string(), |c| c.to_string())
}

#[derive(Default)]
struct Check {
    conns: u64,
    expected: u64,
    lost: u64,
    violations: Vec<Violation>,
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
    fn tokens_round_trip_and_avoid_the_waker() {
        let t = make_token(123, 0xffff_ffff);
        assert_eq!(split_token(t), (123, 0xffff_ffff));
        assert_ne!(make_token(u32::MAX - 1, u32::MAX), WAKER);
    }
}
