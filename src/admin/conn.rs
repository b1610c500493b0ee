//! One admin connection's state, sans-IO: its input and output queues, where it is in the request cycle, and
//! its deadlines. Bytes and time go in (`on_read`, `on_written`, `on_peer_closed`, `expired`); requests to
//! answer, bytes to send and decisions (read now? shut down? close?) come out.
//!
//! It owns the admin listener's per-connection bounds:
//! - the head of every request is handed to the caller's check before any of its body is buffered, so a
//!   request refused there (401) never makes the server hold a body;
//! - while more than [`MAX_UNSENT_BYTES`] of answers are unsent, no further request is answered and nothing
//!   more is read, so a client that pipelines requests and never reads holds at most that plus one answer;
//! - a request head must be complete within the header timeout of its first byte (of the accept, for the
//!   first request), and a connection on which nothing moves for the idle timeout (between requests, inside a
//!   body, or with answers the client does not read) is closed;
//! - after its last answer a connection is half-closed and lingers, discarding what the client still sends
//!   (bounded in time and bytes), so the answer is not destroyed by a reset.
//!
//! It does not touch sockets or the clock (the server passes `now`), route requests, or know what an answer
//! says: the caller writes answers into [`Connection::output`].

use std::time::{Duration, Instant};

use super::buffer::ByteQueue;
use super::http::{self, Head, HttpError, Request};

/// Unsent answer bytes past which a connection's further requests wait (and nothing more is read from it).
pub const MAX_UNSENT_BYTES: usize = 64 * 1024;
/// How long a connection that got its last answer keeps discarding what its client still sends.
pub const LINGER: Duration = Duration::from_secs(2);
/// Bytes a lingering connection discards at most before it is closed anyway.
pub const MAX_LINGER_BYTES: usize = 1024 * 1024;
/// Allocation an idle connection's queue may keep; a larger one is given back.
const IDLE_KEEP_BYTES: usize = 16 * 1024;

/// The admin listener's timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Time to send a complete request head, from its first byte (or from the accept, for the first request).
    pub header: Duration,
    /// Time nothing may move: between requests, inside a body, or while answers wait to be read.
    pub idle: Duration,
}

/// Why a connection's deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A request head was not complete in time (counted).
    Header,
    /// Nothing moved for the idle timeout (counted).
    Idle,
    /// A lingering connection's time is up (normal end of a closed connection, not counted).
    Linger,
}

/// What the caller must answer next.
#[derive(Debug)]
pub enum Event<R> {
    /// A whole request: answer it, keeping the connection open if `request.keep_alive`.
    Request(Request),
    /// The caller's check refused the head; answer with what it returned, then the connection closes.
    Refused {
        /// The check's refusal.
        answer: R,
        /// The request was a HEAD: answer without a body.
        head_only: bool,
    },
    /// The bytes are not a request: answer with its status, then the connection closes.
    Malformed(HttpError),
}

/// Where a connection is in its request cycle.
#[derive(Debug)]
enum Phase {
    /// A request head is due: the first since the accept, or the first bytes of the next one arrived.
    Head,
    /// Between requests, nothing buffered.
    Idle,
    /// A head was admitted; its body is arriving.
    Body(Head),
    /// The last answer is queued; once written, the connection half-closes.
    Closing,
    /// Half-closed: discarding what the client still sends until it closes or [`LINGER`] passes.
    Lingering {
        /// Bytes discarded so far.
        discarded: usize,
    },
}

/// One admin connection, without its socket.
#[derive(Debug)]
pub struct Connection {
    input: ByteQueue,
    output: ByteQueue,
    phase: Phase,
    /// The client sent EOF: no more requests will come.
    peer_closed: bool,
    /// When the current phase times out (header, idle or linger), unless output is blocked.
    phase_deadline: Instant,
    /// When answers were last written, or began to wait: output that stays blocked past this plus the idle
    /// timeout means the client is not reading.
    write_progress: Instant,
    timeouts: Timeouts,
}

impl Connection {
    /// A connection accepted at `now`: its first request head is due within the header timeout.
    pub fn new(now: Instant, timeouts: Timeouts) -> Connection {
        Connection {
            input: ByteQueue::default(),
            output: ByteQueue::default(),
            phase: Phase::Head,
            peer_closed: false,
            phase_deadline: now + timeouts.header,
            write_progress: now,
            timeouts,
        }
    }

    /// Whether the caller should read from the socket now. False while answers are blocked (so a client that
    /// does not read cannot make the server buffer more), after EOF, and while the last answer is queued.
    pub fn wants_read(&self) -> bool {
        match self.phase {
            Phase::Lingering { .. } => !self.peer_closed,
            Phase::Closing => false,
            Phase::Head | Phase::Idle | Phase::Body(_) => !self.peer_closed && !self.blocked(),
        }
    }

    /// Bytes read from the socket.
    pub fn on_read(&mut self, bytes: &[u8], now: Instant) {
        match &mut self.phase {
            Phase::Lingering { discarded } => *discarded += bytes.len(),
            Phase::Closing => debug_assert!(false, "read while closing"),
            Phase::Idle => {
                self.input.extend(bytes);
                self.phase = Phase::Head;
                self.phase_deadline = now + self.timeouts.header;
            }
            Phase::Head => self.input.extend(bytes),
            Phase::Body(_) => {
                self.input.extend(bytes);
                self.phase_deadline = now + self.timeouts.idle;
            }
        }
    }

    /// The client closed its side (read returned 0).
    pub fn on_peer_closed(&mut self) {
        self.peer_closed = true;
    }

    /// The next request to answer, if one is complete and answers are not blocked. `check` sees each head
    /// as soon as it is complete, before any of its body is buffered; refusing it closes the connection
    /// after the answer. Call until `None`, writing each answer into [`Connection::output`].
    pub fn poll_request<R>(
        &mut self,
        limits: &http::Limits,
        now: Instant,
        check: impl FnOnce(&Head) -> Result<(), R>,
    ) -> Option<Event<R>> {
        if self.blocked() {
            return None;
        }
        if matches!(self.phase, Phase::Head | Phase::Idle) {
            match http::parse_head(self.input.as_slice(), limits) {
                Ok(None) => return None,
                Err(error) => {
                    self.begin_answer(now);
                    self.close_after_answer();
                    return Some(Event::Malformed(error));
                }
                Ok(Some(head)) => {
                    if let Err(answer) = check(&head) {
                        let head_only = head.method == http::Method::Head;
                        self.begin_answer(now);
                        self.close_after_answer();
                        return Some(Event::Refused { answer, head_only });
                    }
                    // The head stays in the input until its whole request is there: the input then always
                    // holds every byte of the request in progress, so the connection can move to another
                    // process as its unanswered bytes (`snapshot`) and be parsed again there.
                    self.phase = Phase::Body(head);
                    self.phase_deadline = now + self.timeouts.idle;
                }
            }
        }
        let Phase::Body(head) = &self.phase else {
            return None;
        };
        if self.input.len() < head.len + head.body_len {
            return None;
        }
        let Phase::Body(head) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!("matched above");
        };
        self.input.consume(head.len);
        let body = self.input.take_front(head.body_len);
        let request = head.into_request(body);
        self.begin_answer(now);
        if !request.keep_alive {
            self.close_after_answer();
        } else if self.input.is_empty() {
            self.phase = Phase::Idle;
            self.phase_deadline = now + self.timeouts.idle;
            self.input.shrink_when_empty(IDLE_KEEP_BYTES);
        } else {
            // The next pipelined request has started arriving.
            self.phase = Phase::Head;
            self.phase_deadline = now + self.timeouts.header;
        }
        Some(Event::Request(request))
    }

    /// Where the caller appends answers.
    pub fn output(&mut self) -> &mut Vec<u8> {
        self.output.back()
    }

    /// Bytes waiting to be written, oldest first.
    pub fn unsent(&self) -> &[u8] {
        self.output.as_slice()
    }

    /// `n` bytes of [`Connection::unsent`] were written.
    pub fn on_written(&mut self, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        let was_blocked = self.blocked();
        self.output.consume(n);
        self.write_progress = now;
        if self.output.is_empty() {
            self.output.shrink_when_empty(IDLE_KEEP_BYTES);
        }
        if was_blocked && !self.blocked() {
            // The server stopped reading while answers waited; the clock of the request in progress restarts
            // now that it reads again, since its bytes may have been waiting in the kernel meanwhile.
            match self.phase {
                Phase::Head => self.phase_deadline = now + self.timeouts.header,
                Phase::Idle | Phase::Body(_) => self.phase_deadline = now + self.timeouts.idle,
                Phase::Closing | Phase::Lingering { .. } => {}
            }
        }
    }

    /// True once the last answer is written: the caller half-closes the socket and calls
    /// [`Connection::start_lingering`].
    pub fn wants_shutdown(&self) -> bool {
        matches!(self.phase, Phase::Closing) && self.output.is_empty()
    }

    /// The socket's sending side is shut: discard what still arrives, for a while.
    pub fn start_lingering(&mut self, now: Instant) {
        debug_assert!(self.wants_shutdown());
        self.phase = Phase::Lingering { discarded: 0 };
        self.phase_deadline = now + LINGER;
        self.input.clear();
        self.output.clear();
    }

    /// True when the connection has nothing left to do and the caller should close it. Call after
    /// [`Connection::poll_request`] returned `None` and unsent bytes were written as far as they go.
    pub fn is_done(&self) -> bool {
        match self.phase {
            Phase::Lingering { discarded } => self.peer_closed || discarded > MAX_LINGER_BYTES,
            Phase::Closing => false,
            // After EOF no request can complete; what was answered has been written.
            Phase::Head | Phase::Idle | Phase::Body(_) => {
                self.peer_closed && self.output.is_empty()
            }
        }
    }

    /// Whether a deadline passed at `now`, and which.
    pub fn expired(&self, now: Instant) -> Option<Expiry> {
        let (deadline, expiry) = self.deadline();
        (now >= deadline).then_some(expiry)
    }

    /// The deadline in force and what its passing means.
    pub fn deadline(&self) -> (Instant, Expiry) {
        if self.blocked() && !matches!(self.phase, Phase::Lingering { .. }) {
            return (self.write_progress + self.timeouts.idle, Expiry::Idle);
        }
        let expiry = match self.phase {
            Phase::Head => Expiry::Header,
            Phase::Idle | Phase::Body(_) | Phase::Closing => Expiry::Idle,
            Phase::Lingering { .. } => Expiry::Linger,
        };
        (self.phase_deadline, expiry)
    }

    /// Writes the connection for a successor process (the live upgrade): whether it is still answering requests,
    /// closing after its last answer, or lingering; every unanswered byte it received; every answer byte not yet
    /// written.
    pub fn snapshot(&self, w: &mut crate::snapshot::Writer) {
        w.u8(match self.phase {
            Phase::Head | Phase::Idle | Phase::Body(_) => 0,
            Phase::Closing => 1,
            Phase::Lingering { .. } => 2,
        });
        w.bool(self.peer_closed);
        w.bytes_field(self.input.as_slice());
        w.bytes_field(self.output.as_slice());
    }

    /// A connection written by [`Connection::snapshot`], carrying on at `now` (its deadlines start afresh; a
    /// request in progress is parsed again from its bytes).
    pub fn restore(
        r: &mut crate::snapshot::Reader<'_>,
        now: Instant,
        timeouts: Timeouts,
    ) -> Result<Connection, crate::snapshot::SnapshotError> {
        let phase = r.u8("admin phase")?;
        let peer_closed = r.bool("admin peer closed")?;
        let mut conn = Connection::new(now, timeouts);
        conn.peer_closed = peer_closed;
        conn.input.extend(r.bytes_field("admin input")?);
        conn.output.extend(r.bytes_field("admin output")?);
        match phase {
            0 if conn.input.is_empty() => {
                conn.phase = Phase::Idle;
                conn.phase_deadline = now + timeouts.idle;
            }
            0 => {}
            1 => conn.phase = Phase::Closing,
            2 => {
                conn.phase = Phase::Lingering { discarded: 0 };
                conn.phase_deadline = now + LINGER;
            }
            _ => return Err(crate::snapshot::SnapshotError::Invalid("admin phase")),
        }
        Ok(conn)
    }

    /// Heap bytes this connection holds in its queues.
    pub fn buffered_capacity(&self) -> usize {
        self.input.capacity() + self.output.capacity()
    }

    /// Answers wait for the client: too many are unsent, or the last one is.
    fn blocked(&self) -> bool {
        self.output.len() > MAX_UNSENT_BYTES
            || (matches!(self.phase, Phase::Closing) && !self.output.is_empty())
    }

    /// An answer is about to be queued: if nothing was waiting, the client's time to read it starts now.
    fn begin_answer(&mut self, now: Instant) {
        if self.output.is_empty() {
            self.write_progress = now;
        }
    }

    /// No request after this one: the input is dropped and the connection closes once its answer is out.
    fn close_after_answer(&mut self) {
        self.phase = Phase::Closing;
        self.input.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_secs(60),
        idle: Duration::from_secs(75),
    };

    fn limits() -> http::Limits {
        http::Limits {
            max_head_bytes: 1024,
            max_headers: 16,
            max_body_bytes: 1024 * 1024,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Polls once with a check that admits every head.
    fn poll(conn: &mut Connection, now: Instant) -> Option<Event<()>> {
        conn.poll_request(&limits(), now, |_| Ok(()))
    }

    /// Polls until `None`, answering each request with `answer_bytes` bytes; returns the requests' paths.
    fn serve(conn: &mut Connection, now: Instant, answer_bytes: usize) -> Vec<String> {
        let mut paths = Vec::new();
        while let Some(event) = poll(conn, now) {
            match event {
                Event::Request(request) => paths.push(request.path),
                other => panic!("unexpected {other:?}"),
            }
            conn.output()
                .extend(std::iter::repeat_n(b'a', answer_bytes));
        }
        paths
    }

    /// Writes everything unsent, as a socket that always has room would.
    fn flush(conn: &mut Connection, now: Instant) -> usize {
        let n = conn.unsent().len();
        conn.on_written(n, now);
        n
    }

    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n";

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        let mut bytes = GET.to_vec();
        bytes.extend_from_slice(
            b"POST /publish/all HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi",
        );
        bytes.extend_from_slice(b"GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n");
        conn.on_read(&bytes, t);
        assert_eq!(
            serve(&mut conn, t, 10),
            ["/healthz", "/publish/all", "/metrics"]
        );
        assert_eq!(flush(&mut conn, t), 30);
        assert!(conn.wants_read() && !conn.is_done());
    }

    #[test]
    fn a_refused_head_is_answered_before_its_body_and_closes_the_connection() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        conn.on_read(
            b"POST /publish/all HTTP/1.1\r\nHost: h\r\nContent-Length: 1048576\r\n\r\nxxxx",
            t,
        );
        let mut seen = None;
        let event = conn.poll_request(&limits(), t, |head| {
            seen = Some(head.body_len);
            Err("401")
        });
        assert_eq!(seen, Some(1 << 20), "the check saw the head");
        assert!(matches!(
            event,
            Some(Event::Refused {
                answer: "401",
                head_only: false
            })
        ));
        // The body is never buffered: input is dropped and nothing more is read.
        assert_eq!(conn.buffered_capacity(), 0);
        assert!(!conn.wants_read());
        conn.output().extend_from_slice(b"HTTP/1.1 401 ...");
        assert!(!conn.wants_shutdown());
        flush(&mut conn, t);
        assert!(conn.wants_shutdown());
        conn.start_lingering(t);
        assert!(conn.wants_read(), "lingering: reads are discarded");
        conn.on_read(&[b'x'; 1000], t);
        assert_eq!(conn.buffered_capacity(), 0);
        assert!(!conn.is_done());
        conn.on_peer_closed();
        assert!(conn.is_done());
    }

    #[test]
    fn an_admitted_head_waits_for_its_whole_body() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        conn.on_read(
            b"POST /publish/all HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab",
            t,
        );
        assert!(poll(&mut conn, t).is_none());
        conn.on_read(b"cde", t);
        match poll(&mut conn, t) {
            Some(Event::Request(request)) => assert_eq!(request.body, b"abcde"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_check_runs_once_per_head_not_per_read_of_its_body() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        conn.on_read(
            b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n",
            t,
        );
        let mut checks = 0;
        for piece in [&b"a"[..], b"b", b"c"] {
            assert!(conn
                .poll_request(&limits(), t, |_| {
                    checks += 1;
                    Ok::<(), ()>(())
                })
                .is_none());
            conn.on_read(piece, t);
        }
        assert!(matches!(
            conn.poll_request(&limits(), t, |_| Err(())),
            Some(Event::Request(_))
        ));
        assert_eq!(checks, 1);
    }

    #[test]
    fn malformed_bytes_get_their_status_and_close() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        conn.on_read(b"POST / HTTP/1.1\r\nHost: h\r\n\r\n", t);
        match poll(&mut conn, t) {
            Some(Event::Malformed(e)) => assert_eq!(e.status(), 411),
            other => panic!("{other:?}"),
        }
        assert!(poll(&mut conn, t).is_none());
        conn.output().extend_from_slice(b"411");
        flush(&mut conn, t);
        assert!(conn.wants_shutdown());
    }

    #[test]
    fn connection_close_is_answered_then_closed() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        let mut bytes = b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec();
        bytes.extend_from_slice(GET);
        conn.on_read(&bytes, t);
        assert_eq!(serve(&mut conn, t, 5), ["/healthz"], "nothing after close");
        flush(&mut conn, t);
        assert!(conn.wants_shutdown());
    }

    #[test]
    fn unread_answers_stop_further_requests_and_reads_until_they_drain() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        // 4,000 pipelined requests in one read, each answered with 12 KB (the dashboard page).
        conn.on_read(&GET.repeat(4000), t);
        let answered = serve(&mut conn, t, 12_000).len();
        assert_eq!(answered, 6, "stops once more than 64 KiB wait");
        assert!(conn.unsent().len() <= MAX_UNSENT_BYTES + 12_000);
        assert!(!conn.wants_read());
        // The client reads some, not enough: still blocked.
        conn.on_written(conn.unsent().len() - MAX_UNSENT_BYTES - 1, t);
        assert!(serve(&mut conn, t, 12_000).is_empty());
        // It reads the rest: requests are answered again, and again only up to the bound.
        flush(&mut conn, t);
        assert_eq!(serve(&mut conn, t, 12_000).len(), 6);
        let mut total = 12;
        while {
            flush(&mut conn, t);
            let n = serve(&mut conn, t, 12_000).len();
            total += n;
            n > 0
        } {}
        assert_eq!(total, 4000);
        assert!(conn.wants_read());
    }

    #[test]
    fn a_silent_connection_expires_at_the_header_timeout() {
        let t = Instant::now();
        let conn = Connection::new(t, TIMEOUTS);
        assert_eq!(conn.expired(t + secs(59)), None);
        assert_eq!(conn.expired(t + secs(60)), Some(Expiry::Header));
    }

    #[test]
    fn a_head_sent_slowly_expires_at_the_header_timeout_of_its_first_byte() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        conn.on_read(GET, t);
        assert!(matches!(poll(&mut conn, t), Some(Event::Request(_))));
        flush(&mut conn, t);
        // Idle for a while, then a head dribbles in.
        conn.on_read(b"GET / HT", t + secs(10));
        conn.on_read(b"TP/1.1\r\n", t + secs(50));
        assert!(poll(&mut conn, t + secs(50)).is_none());
        assert_eq!(conn.expired(t + secs(69)), None);
        assert_eq!(conn.expired(t + secs(70)), Some(Expiry::Header));
    }

    #[test]
    fn an_idle_keep_alive_connection_expires_at_the_idle_timeout() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        conn.on_read(GET, t + secs(1));
        assert!(matches!(
            poll(&mut conn, t + secs(1)),
            Some(Event::Request(_))
        ));
        conn.output().extend_from_slice(b"ok");
        flush(&mut conn, t + secs(1));
        assert_eq!(conn.expired(t + secs(75)), None);
        assert_eq!(conn.expired(t + secs(76)), Some(Expiry::Idle));
    }

    #[test]
    fn a_body_that_stops_arriving_expires_at_the_idle_timeout_of_its_last_byte() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        conn.on_read(
            b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\n",
            t,
        );
        assert!(poll(&mut conn, t).is_none());
        conn.on_read(b"1234", t + secs(70));
        assert!(poll(&mut conn, t + secs(70)).is_none());
        assert_eq!(conn.expired(t + secs(144)), None);
        assert_eq!(conn.expired(t + secs(145)), Some(Expiry::Idle));
    }

    #[test]
    fn a_client_that_does_not_read_its_answers_expires_at_the_idle_timeout() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        conn.on_read(&GET.repeat(100), t);
        serve(&mut conn, t, 12_000);
        // Some progress, then none: the deadline counts from the last write, whatever the phase says.
        conn.on_written(1000, t + secs(30));
        assert_eq!(conn.expired(t + secs(104)), None);
        assert_eq!(conn.expired(t + secs(105)), Some(Expiry::Idle));
    }

    #[test]
    fn the_head_clock_restarts_when_reading_resumes_after_a_block() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        let mut bytes = GET.repeat(6);
        bytes.extend_from_slice(b"GET /half");
        conn.on_read(&bytes, t);
        assert_eq!(serve(&mut conn, t, 12_000).len(), 6);
        assert!(!conn.wants_read());
        // The half head's clock started at t; the client read nothing until t + 100 s.
        flush(&mut conn, t + secs(100));
        assert!(serve(&mut conn, t + secs(100), 1).is_empty());
        assert!(conn.wants_read());
        assert_eq!(conn.expired(t + secs(159)), None);
        assert_eq!(conn.expired(t + secs(160)), Some(Expiry::Header));
    }

    #[test]
    fn lingering_ends_after_its_time_or_its_bytes() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        conn.on_read(b"GET / HTTP/1.0\r\n\r\n", t);
        assert!(matches!(poll(&mut conn, t), Some(Event::Request(_))));
        flush(&mut conn, t);
        conn.start_lingering(t);
        assert_eq!(conn.expired(t + LINGER), Some(Expiry::Linger));
        conn.on_read(&vec![0; MAX_LINGER_BYTES + 1], t);
        assert!(conn.is_done());
    }

    #[test]
    fn eof_after_pipelined_requests_answers_them_then_is_done() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        conn.on_read(&GET.repeat(3), t);
        conn.on_peer_closed();
        assert!(!conn.wants_read());
        assert_eq!(serve(&mut conn, t, 5).len(), 3);
        assert!(!conn.is_done(), "answers not written yet");
        flush(&mut conn, t);
        assert!(conn.is_done());
    }

    #[test]
    fn an_idle_connection_gives_back_the_memory_of_its_last_burst() {
        let t = Instant::now();
        let mut conn = Connection::new(t, TIMEOUTS);
        let mut bytes = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 500000\r\n\r\n".to_vec();
        bytes.resize(bytes.len() + 500_000, b'x');
        conn.on_read(&bytes, t);
        assert!(matches!(poll(&mut conn, t), Some(Event::Request(_))));
        conn.output().extend_from_slice(&[0; 200_000]);
        flush(&mut conn, t);
        assert!(conn.buffered_capacity() <= 2 * IDLE_KEEP_BYTES);
    }
}
