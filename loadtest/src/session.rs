//! One client connection's protocol state, sans-IO: the upgrade, frames in, pongs and close frames out, and the
//! check of every delivered payload against the connection's sequence trackers.
//!
//! It owns the per-connection buffers and trackers and the worker-wide `Tally` they report into. It does not
//! touch the socket (the worker reads into `feed` and writes what `output` holds) or keep time (the caller
//! passes the CLOCK_MONOTONIC reading of the read).

use crate::checker::{self, SeqTracker, Stream, Verdict};
use crate::proto::Violation;
use crate::rng::Rng;
use crate::stats::{self, Latency, Reasons};
use crate::ws::{self, FrameError, HandshakeError, OpCode};

/// Violations kept per stream per worker (the rest are only counted).
pub const MAX_VIOLATIONS: usize = 10;

/// Normal closure (RFC 6455 §7.4.1).
pub const CLOSE_NORMAL: u16 = 1000;
/// Protocol error (RFC 6455 §7.4.1).
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for the 101.
    Handshaking,
    /// Upgraded: receiving pushes.
    Open,
    /// We sent a close frame and wait for the server's (RFC 6455 §5.5.1).
    Closing,
    /// Both close frames exchanged (or the connection failed); waiting for the server to close TCP
    /// (§7.1.1: the server closes first).
    Closed,
}

/// What feeding bytes led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// Keep reading.
    More,
    /// The upgrade was refused or broken; the connection is over.
    HandshakeFailed(String),
    /// The server broke the protocol; a close 1002 is queued and the connection should end.
    ProtocolError(FrameError),
}

/// Per-stream figures of one worker.
#[derive(Debug, Default)]
pub struct StreamTally {
    /// Distinct messages received.
    pub received: u64,
    /// Duplicates.
    pub duplicated: u64,
    /// Late arrivals (after a later message).
    pub reordered: u64,
    /// Unicast messages for another user.
    pub misdelivered: u64,
    /// Holes left on connections that have since closed.
    pub closed_holes: u64,
    /// Messages those closed connections were due (received plus holes).
    pub closed_expected: u64,
    /// Publish-to-receive latency.
    pub latency: Latency,
    /// Latency of sequence number 0 only: for broadcast, one message fanned out with nothing queued ahead.
    pub first_message_latency: Latency,
    /// First and last delivery, CLOCK_MONOTONIC ns.
    pub first_ns: u64,
    /// See `first_ns`.
    pub last_ns: u64,
    /// First few violations.
    pub violations: Vec<Violation>,
}

impl StreamTally {
    fn violation(&mut self, conn: u64, stream: Stream, kind: &str, seq: u64, expected: u64) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(Violation {
                conn,
                stream: stream.name().to_string(),
                kind: kind.to_string(),
                seq,
                expected,
            });
        }
    }
}

/// Everything one worker's connections report into.
#[derive(Debug, Default)]
pub struct Tally {
    /// Broadcast, unicast, churn, batch and slow, indexed by `stream_index`.
    pub streams: [StreamTally; 5],
    /// Data frames that are not one of our payloads.
    pub malformed: u64,
    /// Pings received while open (each answered).
    pub pings: u64,
    /// Pings received after our close frame went out (not answered: nothing may follow a close, §5.5.1).
    pub pings_after_close: u64,
    /// Pongs queued in answer.
    pub pongs: u64,
    /// Close frames the server started, by code.
    pub server_closes: Reasons,
}

/// Index of a stream in `Tally::streams`.
pub fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Broadcast => 0,
        Stream::Unicast => 1,
        Stream::Churn => 2,
        Stream::Batch => 3,
        Stream::Slow => 4,
    }
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    /// Global connection index.
    pub index: u64,
    /// User number (`u{user}`).
    pub user: u64,
    /// Where it is.
    pub phase: Phase,
    /// CLOCK_MONOTONIC ns when the connect started.
    pub started_ns: u64,
    /// Closed by the churn phase, to be reopened when done.
    pub churn_victim: bool,
    /// A slow reader (its socket has a small receive buffer and MSS).
    pub slow_reader: bool,
    /// Not read while set (the slow-reader phase pauses slow readers).
    pub paused: bool,
    /// The code of the close frame the server started, once one arrived (`Some(None)`: no code).
    pub server_close: Option<Option<u16>>,
    nonce: [u8; 16],
    /// permessage-deflate was offered (`--compression`): RSV1 frames are inflated.
    deflate: bool,
    /// Bytes read but not yet parsed (partial head or frame); empty, with no heap, when idle.
    inbuf: Vec<u8>,
    /// Bytes to write; empty when idle.
    outbuf: Vec<u8>,
    /// A fragmented data message being reassembled (RFC 6455 §5.4).
    fragments: Option<Vec<u8>>,
    broadcast: SeqTracker,
    unicast: SeqTracker,
    churn: Option<SeqTracker>,
    batch: SeqTracker,
    slow: SeqTracker,
}

impl Session {
    /// A connection about to connect.
    pub fn new(index: u64, user: u64, nonce: [u8; 16], started_ns: u64) -> Self {
        Session {
            index,
            user,
            phase: Phase::Connecting,
            started_ns,
            churn_victim: false,
            slow_reader: false,
            paused: false,
            server_close: None,
            nonce,
            deflate: false,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            fragments: None,
            broadcast: SeqTracker::new(),
            unicast: SeqTracker::new(),
            churn: None,
            batch: SeqTracker::new(),
            slow: SeqTracker::new(),
        }
    }

    /// TCP is up: queue the upgrade request for `target` (path and query).
    #[cfg(test)]
    pub fn connected(&mut self, host: &str, target: &str) {
        self.connected_offering(host, target, false);
    }

    /// [`Session::connected`], offering permessage-deflate when `deflate`.
    pub fn connected_offering(&mut self, host: &str, target: &str, deflate: bool) {
        debug_assert_eq!(self.phase, Phase::Connecting);
        let key = ws::handshake_key(self.nonce);
        self.deflate = deflate;
        self.outbuf
            .extend_from_slice(&ws::handshake_request_offering(host, target, &key, deflate));
        self.phase = Phase::Handshaking;
    }

    /// Bytes waiting to be written.
    pub fn output(&self) -> &[u8] {
        &self.outbuf
    }

    /// `n` bytes of `output` were written.
    pub fn consumed_output(&mut self, n: usize) {
        self.outbuf.drain(..n);
        if self.outbuf.is_empty() {
            self.outbuf = Vec::new();
        }
    }

    /// Starts the close handshake (RFC 6455 §5.5.1) with `code`.
    pub fn start_close(&mut self, code: u16, rng: &mut Rng) {
        if self.phase != Phase::Open {
            return;
        }
        ws::encode_client_frame(
            OpCode::Close,
            &ws::close_payload(code),
            rng.mask(),
            &mut self.outbuf,
        );
        self.phase = Phase::Closing;
    }

    /// The tracker of `stream`, if the stream has started on this connection.
    pub fn tracker(&self, stream: Stream) -> Option<&SeqTracker> {
        match stream {
            Stream::Broadcast => Some(&self.broadcast),
            Stream::Unicast => Some(&self.unicast),
            Stream::Churn => self.churn.as_ref(),
            Stream::Batch => Some(&self.batch),
            Stream::Slow => Some(&self.slow),
        }
    }

    /// Holds heap memory (a partial read or unsent bytes)?
    #[cfg(test)]
    pub fn holds_buffers(&self) -> bool {
        self.inbuf.capacity() > 0 || self.outbuf.capacity() > 0 || self.fragments.is_some()
    }

    /// Handles bytes read from the socket at `now_ns`.
    pub fn feed(&mut self, chunk: &[u8], now_ns: u64, tally: &mut Tally, rng: &mut Rng) -> Feed {
        if self.inbuf.is_empty() {
            let (used, feed) = self.process(chunk, now_ns, tally, rng);
            if feed == Feed::More && used < chunk.len() {
                self.inbuf.extend_from_slice(&chunk[used..]);
            }
            return feed;
        }
        let mut buf = std::mem::take(&mut self.inbuf);
        buf.extend_from_slice(chunk);
        let (used, feed) = self.process(&buf, now_ns, tally, rng);
        if feed == Feed::More && used < buf.len() {
            buf.drain(..used);
            self.inbuf = buf;
        }
        feed
    }

    /// Parses what `buf` holds; returns the bytes used.
    fn process(
        &mut self,
        buf: &[u8],
        now_ns: u64,
        tally: &mut Tally,
        rng: &mut Rng,
    ) -> (usize, Feed) {
        let mut used = 0;
        if self.phase == Phase::Handshaking {
            let key = ws::handshake_key(self.nonce);
            match ws::parse_handshake_response(buf, &key) {
                Ok(None) => return (0, Feed::More),
                Ok(Some(head)) => {
                    self.phase = Phase::Open;
                    used = head;
                }
                Err(e) => return (buf.len(), Feed::HandshakeFailed(handshake_reason(&e))),
            }
        }
        loop {
            let frame = match ws::decode_frame_with(&buf[used..], self.deflate) {
                Ok(Some(frame)) => frame,
                Ok(None) => return (used, Feed::More),
                Err(e) => {
                    self.fail(rng);
                    return (buf.len(), Feed::ProtocolError(e));
                }
            };
            let (frame, len) = frame;
            used += len;
            if let Err(e) = self.on_frame(frame, now_ns, tally, rng) {
                self.fail(rng);
                return (buf.len(), Feed::ProtocolError(e));
            }
        }
    }

    /// Fails the connection (RFC 6455 §7.1.7): close 1002 unless a close was already sent.
    fn fail(&mut self, rng: &mut Rng) {
        if self.phase == Phase::Open {
            ws::encode_client_frame(
                OpCode::Close,
                &ws::close_payload(CLOSE_PROTOCOL_ERROR),
                rng.mask(),
                &mut self.outbuf,
            );
        }
        self.phase = Phase::Closed;
    }

    fn on_frame(
        &mut self,
        frame: ws::Frame<'_>,
        now_ns: u64,
        tally: &mut Tally,
        rng: &mut Rng,
    ) -> Result<(), FrameError> {
        match frame.opcode {
            OpCode::Ping => {
                // §5.5.2/§5.5.3: answer with a pong carrying the same data, unless we already sent a close.
                if self.phase == Phase::Open {
                    tally.pings += 1;
                    ws::encode_client_frame(
                        OpCode::Pong,
                        frame.payload,
                        rng.mask(),
                        &mut self.outbuf,
                    );
                    tally.pongs += 1;
                } else {
                    tally.pings_after_close += 1;
                }
            }
            OpCode::Pong => {}
            OpCode::Close => {
                if self.phase == Phase::Open {
                    // The server started the close: echo its code (§5.5.1) and wait for it to close TCP.
                    let code = ws::close_code(frame.payload);
                    self.server_close = Some(code);
                    stats::count(
                        &mut tally.server_closes,
                        &code.map_or_else(|| "none".to_string(), |c| c.to_string()),
                        1,
                    );
                    let reply = code.map(ws::close_payload);
                    ws::encode_client_frame(
                        OpCode::Close,
                        reply.as_ref().map_or(&[][..], |r| &r[..]),
                        rng.mask(),
                        &mut self.outbuf,
                    );
                }
                self.phase = Phase::Closed;
            }
            OpCode::Text | OpCode::Binary => {
                // §5.4: a new data frame while a fragmented message is open is an error.
                if self.fragments.is_some() {
                    return Err(FrameError::BadOpCode);
                }
                if frame.fin && frame.compressed {
                    let mut inflated = Vec::new();
                    ws::inflate(frame.payload, &mut inflated)?;
                    self.on_message(&inflated, now_ns, tally);
                } else if frame.fin {
                    self.on_message(frame.payload, now_ns, tally);
                } else if frame.compressed {
                    // densepush never fragments; a compressed fragment is outside what this client reads.
                    return Err(FrameError::BadOpCode);
                } else {
                    self.fragments = Some(frame.payload.to_vec());
                }
            }
            OpCode::Continuation => {
                // §5.4: a continuation needs an open fragmented message.
                let mut message = self.fragments.take().ok_or(FrameError::BadOpCode)?;
                message.extend_from_slice(frame.payload);
                if frame.fin {
                    self.on_message(&message, now_ns, tally);
                } else {
                    self.fragments = Some(message);
                }
            }
        }
        Ok(())
    }

    /// Checks one complete data message.
    fn on_message(&mut self, payload: &[u8], now_ns: u64, tally: &mut Tally) {
        if !matches!(self.phase, Phase::Open | Phase::Closing) {
            return;
        }
        let Ok(msg) = checker::parse(payload) else {
            tally.malformed += 1;
            return;
        };
        let st = &mut tally.streams[stream_index(msg.stream)];
        if msg.stream == Stream::Unicast {
            let ours = msg
                .user
                .and_then(|u| u.strip_prefix('u'))
                .and_then(|n| n.parse::<u64>().ok())
                == Some(self.user);
            if !ours {
                st.misdelivered += 1;
                st.violation(self.index, msg.stream, "misdelivered", msg.seq, 0);
                return;
            }
        }
        let tracker = match msg.stream {
            Stream::Broadcast => &mut self.broadcast,
            Stream::Unicast => &mut self.unicast,
            Stream::Batch => &mut self.batch,
            Stream::Slow => &mut self.slow,
            Stream::Churn => match &mut self.churn {
                Some(t) => t,
                None => {
                    // Joined a running stream: its first message sets the starting point.
                    self.churn = Some(SeqTracker::starting_at(msg.seq));
                    st.received += 1;
                    record_latency(st, msg.seq, msg.ts_ns, now_ns);
                    return;
                }
            },
        };
        let expected = tracker.next();
        match tracker.observe(msg.seq) {
            Verdict::InOrder => {}
            Verdict::Gap { expected, .. } => {
                st.violation(self.index, msg.stream, "gap", msg.seq, expected);
            }
            Verdict::Reordered => {
                st.reordered += 1;
                st.violation(self.index, msg.stream, "reordered", msg.seq, expected);
            }
            Verdict::Duplicate => {
                st.duplicated += 1;
                st.violation(self.index, msg.stream, "duplicate", msg.seq, expected);
                return;
            }
        }
        st.received += 1;
        record_latency(st, msg.seq, msg.ts_ns, now_ns);
    }

    /// The connection is going away: holes it leaves in the churn stream count as lost there.
    pub fn retire(&self, tally: &mut Tally) {
        if let Some(t) = &self.churn {
            let st = &mut tally.streams[stream_index(Stream::Churn)];
            st.closed_holes += t.holes();
            st.closed_expected += t.received() + t.holes();
        }
    }
}

fn record_latency(st: &mut StreamTally, seq: u64, ts_ns: u64, now_ns: u64) {
    st.latency.record_between(ts_ns, now_ns);
    if seq == 0 {
        st.first_message_latency.record_between(ts_ns, now_ns);
    }
    if st.first_ns == 0 {
        st.first_ns = now_ns;
    }
    st.last_ns = st.last_ns.max(now_ns);
}

fn handshake_reason(e: &HandshakeError) -> String {
    match e {
        HandshakeError::Status(code) => format!("http_{code}"),
        HandshakeError::BadUpgrade(_) => "bad_upgrade".into(),
        HandshakeError::Malformed => "bad_response".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut out = vec![0x80 | opcode, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    fn text(payload: &[u8]) -> Vec<u8> {
        server_frame(0x1, payload)
    }

    fn open_session(user: u64) -> (Session, Tally, Rng) {
        let mut s = Session::new(7, user, [1; 16], 0);
        s.connected("h", "/ws?user=u1");
        let n = s.output().len();
        s.consumed_output(n);
        let key = ws::handshake_key([1; 16]);
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            ws::accept_key(&key)
        );
        let mut tally = Tally::default();
        let mut rng = Rng::new(1);
        assert_eq!(s.feed(head.as_bytes(), 0, &mut tally, &mut rng), Feed::More);
        assert_eq!(s.phase, Phase::Open);
        (s, tally, rng)
    }

    fn broadcast(seq: u64) -> Vec<u8> {
        text(&checker::encode(Stream::Broadcast, None, seq, 1_000, 32))
    }

    /// Unmasks the first client frame in `bytes`: (opcode bits, payload).
    fn unmask(bytes: &[u8]) -> (u8, Vec<u8>) {
        assert_eq!(bytes[1] & 0x80, 0x80, "client frames must be masked");
        let len = (bytes[1] & 0x7F) as usize;
        let mask = &bytes[2..6];
        let payload = bytes[6..6 + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        (bytes[0] & 0x0F, payload)
    }

    #[test]
    fn request_is_queued_on_connect() {
        let mut s = Session::new(0, 0, [1; 16], 0);
        s.connected("127.0.0.1:1", "/ws?user=u0");
        assert!(s.output().starts_with(b"GET /ws?user=u0 HTTP/1.1\r\n"));
        assert_eq!(s.phase, Phase::Handshaking);
    }

    #[test]
    fn refused_upgrade_names_the_status() {
        let mut s = Session::new(0, 0, [1; 16], 0);
        s.connected("h", "/ws");
        let feed = s.feed(
            b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
            0,
            &mut Tally::default(),
            &mut Rng::new(1),
        );
        assert_eq!(feed, Feed::HandshakeFailed("http_503".into()));
    }

    #[test]
    fn frames_after_the_head_in_the_same_read_are_checked() {
        let mut s = Session::new(0, 0, [1; 16], 0);
        s.connected("h", "/ws");
        let key = ws::handshake_key([1; 16]);
        let mut bytes = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            ws::accept_key(&key)
        )
        .into_bytes();
        bytes.extend(broadcast(0));
        let mut tally = Tally::default();
        s.feed(&bytes, 5_000, &mut tally, &mut Rng::new(1));
        assert_eq!(tally.streams[0].received, 1);
    }

    #[test]
    fn in_order_broadcast_is_clean_and_timed() {
        let (mut s, mut tally, mut rng) = open_session(1);
        for seq in 0..3 {
            s.feed(&broadcast(seq), 3_001_000, &mut tally, &mut rng);
        }
        let st = &tally.streams[0];
        assert_eq!((st.received, st.duplicated, st.reordered), (3, 0, 0));
        assert!(st.violations.is_empty());
        let max = st.latency.summary().unwrap().max_us;
        assert!((2_997..=3_003).contains(&max), "{max}");
        assert_eq!(s.tracker(Stream::Broadcast).unwrap().lost(3), 0);
    }

    #[test]
    fn duplicate_and_reorder_are_detected_across_split_reads() {
        let (mut s, mut tally, mut rng) = open_session(1);
        let mut bytes = Vec::new();
        for seq in [0, 2, 1, 1] {
            bytes.extend(broadcast(seq));
        }
        // Feed one byte at a time: frames straddle every read boundary.
        for b in &bytes {
            s.feed(std::slice::from_ref(b), 2_000, &mut tally, &mut rng);
        }
        let st = &tally.streams[0];
        assert_eq!((st.received, st.reordered, st.duplicated), (3, 1, 1));
        let kinds: Vec<&str> = st.violations.iter().map(|v| v.kind.as_str()).collect();
        assert_eq!(kinds, ["gap", "reordered", "duplicate"]);
        assert!(!s.holds_buffers());
    }

    #[test]
    fn loss_shows_in_the_tracker() {
        let (mut s, mut tally, mut rng) = open_session(1);
        s.feed(&broadcast(0), 2_000, &mut tally, &mut rng);
        s.feed(&broadcast(3), 2_000, &mut tally, &mut rng);
        assert_eq!(s.tracker(Stream::Broadcast).unwrap().lost(5), 3);
    }

    #[test]
    fn unicast_for_another_user_is_misdelivered() {
        let (mut s, mut tally, mut rng) = open_session(4);
        let ours = text(&checker::encode(Stream::Unicast, Some("u4"), 0, 1, 0));
        let theirs = text(&checker::encode(Stream::Unicast, Some("u5"), 0, 1, 0));
        s.feed(&ours, 2_000, &mut tally, &mut rng);
        s.feed(&theirs, 2_000, &mut tally, &mut rng);
        assert_eq!(tally.streams[1].received, 1);
        assert_eq!(tally.streams[1].misdelivered, 1);
    }

    #[test]
    fn churn_stream_starts_where_the_connection_joined() {
        let (mut s, mut tally, mut rng) = open_session(1);
        for seq in [40, 41] {
            s.feed(
                &text(&checker::encode(Stream::Churn, None, seq, 1, 0)),
                2_000,
                &mut tally,
                &mut rng,
            );
        }
        assert_eq!(s.tracker(Stream::Churn).unwrap().lost(42), 0);
        assert_eq!(tally.streams[2].received, 2);
    }

    #[test]
    fn foreign_payload_is_malformed() {
        let (mut s, mut tally, mut rng) = open_session(1);
        s.feed(&text(b"hello"), 2_000, &mut tally, &mut rng);
        assert_eq!(tally.malformed, 1);
    }

    #[test]
    fn ping_is_answered_with_a_masked_pong_of_the_same_data() {
        let (mut s, mut tally, mut rng) = open_session(1);
        s.feed(&server_frame(0x9, b"hi"), 0, &mut tally, &mut rng);
        assert_eq!(unmask(s.output()), (0xA, b"hi".to_vec()));
        assert_eq!((tally.pings, tally.pongs), (1, 1));
    }

    #[test]
    fn server_close_is_echoed_and_counted() {
        let (mut s, mut tally, mut rng) = open_session(1);
        s.feed(
            &server_frame(0x8, &1001u16.to_be_bytes()),
            0,
            &mut tally,
            &mut rng,
        );
        assert_eq!(unmask(s.output()), (0x8, 1001u16.to_be_bytes().to_vec()));
        assert_eq!(s.phase, Phase::Closed);
        assert_eq!(tally.server_closes.get("1001"), Some(&1));
    }

    #[test]
    fn our_close_then_servers_reply_ends_without_echo() {
        let (mut s, mut tally, mut rng) = open_session(1);
        s.start_close(CLOSE_NORMAL, &mut rng);
        let n = s.output().len();
        assert_eq!(unmask(s.output()), (0x8, 1000u16.to_be_bytes().to_vec()));
        s.consumed_output(n);
        s.feed(
            &server_frame(0x8, &1000u16.to_be_bytes()),
            0,
            &mut tally,
            &mut rng,
        );
        assert!(s.output().is_empty());
        assert_eq!(s.phase, Phase::Closed);
        assert!(tally.server_closes.is_empty());
    }

    #[test]
    fn masked_server_frame_fails_with_close_1002() {
        let (mut s, mut tally, mut rng) = open_session(1);
        let feed = s.feed(&[0x81, 0x81, 0, 0, 0, 0, b'x'], 0, &mut tally, &mut rng);
        assert_eq!(feed, Feed::ProtocolError(FrameError::Masked));
        assert_eq!(unmask(s.output()), (0x8, 1002u16.to_be_bytes().to_vec()));
    }

    #[test]
    fn fragmented_message_is_reassembled() {
        let (mut s, mut tally, mut rng) = open_session(1);
        let payload = checker::encode(Stream::Broadcast, None, 0, 1, 40);
        let mut first = vec![0x01, 20];
        first.extend_from_slice(&payload[..20]);
        let mut rest = vec![0x80, 20];
        rest.extend_from_slice(&payload[20..]);
        s.feed(&first, 2_000, &mut tally, &mut rng);
        assert_eq!(tally.streams[0].received, 0);
        s.feed(&rest, 2_000, &mut tally, &mut rng);
        assert_eq!(tally.streams[0].received, 1);
    }
}
