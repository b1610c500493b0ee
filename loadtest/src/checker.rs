//! Test payloads and the delivery checker: what the generator publishes, and how a receiving connection tells
//! a lost, duplicated or reordered message from a good one.
//!
//! It owns the payload text format and the per-stream sequence bookkeeping. It does not read sockets, keep
//! clocks or add up figures across connections (the worker and `stats` do).
//!
//! Payload formats (ASCII; padded with `.` up to the requested size, never cut below the header):
//! - broadcast: `b:{seq}:{ts_ns}:`
//! - unicast:   `u:{user}:{seq}:{ts_ns}:` (`seq` counts messages to that user, from 0)
//! - churn:     `c:{seq}:{ts_ns}:` (published to all while connections come and go)
//! - batch:     `k:{round}:{ts_ns}:` (one message per `POST /publish/batch` naming `--batch-targets` users; each
//!   round reaches every user once, so every connection sees rounds 0, 1, 2, ... in order)
//! - slow:      `s:{seq}:{ts_ns}:` (published to all while the slow readers do not read)
//!
//! `ts_ns` is CLOCK_MONOTONIC at publish time; the monotonic clock is one system-wide clock on Linux, so a
//! worker process can subtract it from its own reading.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Which publish stream a message belongs to; each connection checks each stream separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// `POST /publish/all` during the broadcast phase.
    Broadcast,
    /// `POST /publish/user/{u}` during the unicast phase.
    Unicast,
    /// `POST /publish/all` during the churn phase.
    Churn,
    /// `POST /publish/batch` to every user, round after round, during the batch phase.
    Batch,
    /// `POST /publish/all` during the slow-reader phase.
    Slow,
}

impl Stream {
    /// The tag that opens the payload.
    pub fn tag(self) -> u8 {
        match self {
            Stream::Broadcast => b'b',
            Stream::Unicast => b'u',
            Stream::Churn => b'c',
            Stream::Batch => b'k',
            Stream::Slow => b's',
        }
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Broadcast => "broadcast",
            Stream::Unicast => "unicast",
            Stream::Churn => "churn",
            Stream::Batch => "batch",
            Stream::Slow => "slow",
        }
    }
}

/// A parsed payload header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload<'a> {
    /// The stream it belongs to.
    pub stream: Stream,
    /// The addressed user, for unicast.
    pub user: Option<&'a str>,
    /// Position in its stream, from 0.
    pub seq: u64,
    /// CLOCK_MONOTONIC nanoseconds when it was published.
    pub ts_ns: u64,
}

/// Why a received payload is not one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PayloadError {
    /// The first byte is not a known stream tag.
    #[error("unknown stream tag")]
    UnknownTag,
    /// A field is missing or not a number.
    #[error("malformed header")]
    Malformed,
}

/// Builds a payload: the header, then `.` padding up to `size` bytes (a header longer than `size` is kept whole).
pub fn encode(stream: Stream, user: Option<&str>, seq: u64, ts_ns: u64, size: usize) -> Vec<u8> {
    let header = match (stream, user) {
        (Stream::Unicast, Some(user)) => format!("u:{user}:{seq}:{ts_ns}:"),
        (Stream::Unicast, None) => format!("u::{seq}:{ts_ns}:"),
        (other, _) => format!("{}:{seq}:{ts_ns}:", other.tag() as char),
    };
    let mut out = header.into_bytes();
    if out.len() < size {
        out.resize(size, b'.');
    }
    out
}

/// [`encode`], padded with a JSON notification (as a push server typically carries) instead of dots when
/// `json`: what compresses like real traffic, not 30x. The JSON varies with `seq` so messages differ.
pub fn encode_as(
    stream: Stream,
    user: Option<&str>,
    seq: u64,
    ts_ns: u64,
    size: usize,
    json: bool,
) -> Vec<u8> {
    let mut out = encode(stream, user, seq, ts_ns, 0);
    if !json {
        out.resize(size.max(out.len()), b'.');
        return out;
    }
    let names = [
        "Alice Martin",
        "Bob Nguyen",
        "Chloé Dubois",
        "Dmitri Ivanov",
        "Eve Okafor",
    ];
    let name = names[(seq % names.len() as u64) as usize];
    let body = format!(
        "{{\"type\":\"comment.created\",\"id\":\"evt_{seq:08x}{ts:04x}\",\"actor\":{{\"id\":{actor},\"name\":\"{name}\",\"avatar\":\"https://cdn.example.com/a/{actor}.jpg\"}},\"post\":{{\"id\":{post},\"title\":\"Weekend ride to the lake, photos inside\"}},\"text\":\"{name} replied to your comment: great pictures, which lens did you use for the sunset one?\",\"url\":\"https://app.example.com/posts/{post}#comment-{seq}\",\"unread\":{unread},\"ts\":{ts}}}",
        actor = 10_000 + seq % 977,
        post = 500_000 + seq % 131,
        unread = seq % 17,
        ts = ts_ns / 1_000_000,
    );
    out.extend_from_slice(body.as_bytes());
    if out.len() < size {
        out.resize(size, b' ');
    } else {
        out.truncate(size.max(out.len() - body.len()));
    }
    out
}

/// Parses a payload header; the padding after it is ignored.
pub fn parse(payload: &[u8]) -> Result<Payload<'_>, PayloadError> {
    let stream = match payload.first() {
        Some(b'b') => Stream::Broadcast,
        Some(b'u') => Stream::Unicast,
        Some(b'c') => Stream::Churn,
        Some(b'k') => Stream::Batch,
        Some(b's') => Stream::Slow,
        _ => return Err(PayloadError::UnknownTag),
    };
    let mut fields = payload.split(|&b| b == b':');
    fields.next(); // the tag
    let user = if stream == Stream::Unicast {
        let raw = fields.next().ok_or(PayloadError::Malformed)?;
        Some(std::str::from_utf8(raw).map_err(|_| PayloadError::Malformed)?)
    } else {
        None
    };
    let seq = number(fields.next())?;
    let ts_ns = number(fields.next())?;
    // The header ends with ':'; without it the timestamp may have been cut short.
    if fields.next().is_none() {
        return Err(PayloadError::Malformed);
    }
    Ok(Payload {
        stream,
        user,
        seq,
        ts_ns,
    })
}

fn number(field: Option<&[u8]>) -> Result<u64, PayloadError> {
    let field = field.ok_or(PayloadError::Malformed)?;
    if field.is_empty() || field.len() > 20 || !field.iter().all(u8::is_ascii_digit) {
        return Err(PayloadError::Malformed);
    }
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(PayloadError::Malformed)
}

/// What one received sequence number says about its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next expected one.
    InOrder,
    /// Later than expected: `missing` earlier ones have not arrived (yet).
    Gap {
        /// The sequence number that was expected.
        expected: u64,
        /// How many were skipped.
        missing: u64,
    },
    /// One that was skipped earlier arrived after a later one.
    Reordered,
    /// Already received.
    Duplicate,
}

/// Gaps remembered one by one, so a late arrival can be told from a duplicate; beyond this they are only counted.
pub const MAX_TRACKED_GAPS: usize = 4096;

/// The receive side of one stream on one connection: the next expected sequence number and the holes behind it.
///
/// An idle tracker owns no heap memory; `missing` allocates only when a gap opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqTracker {
    next: u64,
    /// Skipped sequence numbers not yet seen, ascending.
    missing: Vec<u64>,
    /// Skipped sequence numbers beyond `MAX_TRACKED_GAPS` (a later arrival of one counts as a duplicate).
    untracked_missing: u64,
    /// Distinct messages received.
    received: u64,
}

impl SeqTracker {
    /// A tracker expecting 0 first.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker whose first message was `seq` (a connection that joined a stream already running).
    pub fn starting_at(seq: u64) -> Self {
        SeqTracker {
            next: seq + 1,
            received: 1,
            ..Self::default()
        }
    }

    /// Records one received sequence number.
    pub fn observe(&mut self, seq: u64) -> Verdict {
        if seq == self.next {
            self.next += 1;
            self.received += 1;
            return Verdict::InOrder;
        }
        if seq > self.next {
            let expected = self.next;
            let missing = seq - expected;
            let room = MAX_TRACKED_GAPS.saturating_sub(self.missing.len()) as u64;
            let tracked = missing.min(room);
            self.missing.extend(expected..expected + tracked);
            self.untracked_missing += missing - tracked;
            self.next = seq + 1;
            self.received += 1;
            return Verdict::Gap { expected, missing };
        }
        match self.missing.binary_search(&seq) {
            Ok(at) => {
                self.missing.remove(at);
                if self.missing.is_empty() {
                    // Give the memory back: an idle tracker owns nothing.
                    self.missing = Vec::new();
                }
                self.received += 1;
                Verdict::Reordered
            }
            Err(_) => Verdict::Duplicate,
        }
    }

    /// The next sequence number expected in order.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Distinct messages received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Messages not received, if `total` were sent (sequence numbers `0..total`, or from the starting point).
    pub fn lost(&self, total: u64) -> u64 {
        self.missing.len() as u64 + self.untracked_missing + total.saturating_sub(self.next)
    }

    /// Skipped messages that never arrived, not counting any tail after the last one received.
    pub fn holes(&self) -> u64 {
        self.missing.len() as u64 + self.untracked_missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_payload_round_trips_with_padding() {
        let bytes = encode(Stream::Broadcast, None, 7, 123_456, 64);
        assert_eq!(bytes.len(), 64);
        assert!(bytes.starts_with(b"b:7:123456:..."));
        let parsed = parse(&bytes).unwrap();
        assert_eq!(
            parsed,
            Payload {
                stream: Stream::Broadcast,
                user: None,
                seq: 7,
                ts_ns: 123_456
            }
        );
    }

    #[test]
    fn unicast_payload_carries_the_user() {
        let bytes = encode(Stream::Unicast, Some("u42"), 3, 9, 0);
        assert_eq!(bytes, b"u:u42:3:9:");
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed.user, Some("u42"));
        assert_eq!((parsed.seq, parsed.ts_ns), (3, 9));
    }

    #[test]
    fn batch_payload_carries_its_round() {
        let bytes = encode(Stream::Batch, None, 4, 77, 0);
        assert_eq!(bytes, b"k:4:77:");
        let p = parse(&bytes).unwrap();
        assert_eq!(
            (p.stream, p.user, p.seq, p.ts_ns),
            (Stream::Batch, None, 4, 77)
        );
        assert_eq!(Stream::Batch.name(), "batch");
    }

    #[test]
    fn header_longer_than_size_is_kept_whole() {
        let bytes = encode(Stream::Churn, None, 1_000_000, 1_000_000_000, 4);
        assert_eq!(parse(&bytes).unwrap().seq, 1_000_000);
    }

    #[test]
    fn foreign_payloads_are_rejected() {
        assert_eq!(parse(b"hello"), Err(PayloadError::UnknownTag));
        assert_eq!(parse(b""), Err(PayloadError::UnknownTag));
        assert_eq!(parse(b"b:1:2"), Err(PayloadError::Malformed));
        assert_eq!(parse(b"b:x:2:"), Err(PayloadError::Malformed));
        assert_eq!(parse(b"b::2:"), Err(PayloadError::Malformed));
        assert_eq!(parse(b"u:u1:5:"), Err(PayloadError::Malformed));
        assert_eq!(
            parse(b"b:99999999999999999999999:1:"),
            Err(PayloadError::Malformed)
        );
    }

    #[test]
    fn in_order_stream_is_complete() {
        let mut t = SeqTracker::new();
        for seq in 0..5 {
            assert_eq!(t.observe(seq), Verdict::InOrder);
        }
        assert_eq!(t.lost(5), 0);
        assert_eq!(t.holes(), 0);
        assert_eq!(t.lost(5), 0);
        assert_eq!(t.received(), 5);
    }

    #[test]
    fn missing_tail_counts_as_lost() {
        let mut t = SeqTracker::new();
        t.observe(0);
        t.observe(1);
        assert_eq!(t.lost(5), 3);
        assert_eq!(t.holes(), 0);
    }

    #[test]
    fn gap_counts_as_lost_until_filled() {
        let mut t = SeqTracker::new();
        t.observe(0);
        assert_eq!(
            t.observe(3),
            Verdict::Gap {
                expected: 1,
                missing: 2
            }
        );
        assert_eq!(t.lost(4), 2);
        assert_eq!(t.holes(), 2);
    }

    #[test]
    fn late_arrival_is_reordered_not_duplicate() {
        let mut t = SeqTracker::new();
        t.observe(0);
        t.observe(2);
        assert_eq!(t.observe(1), Verdict::Reordered);
        assert_eq!(t.lost(3), 0);
        assert_eq!(t.received(), 3);
    }

    #[test]
    fn repeat_is_duplicate() {
        let mut t = SeqTracker::new();
        t.observe(0);
        t.observe(1);
        assert_eq!(t.observe(1), Verdict::Duplicate);
        assert_eq!(t.observe(0), Verdict::Duplicate);
        assert_eq!(t.received(), 2);
    }

    #[test]
    fn late_arrival_delivered_twice_is_reordered_then_duplicate() {
        let mut t = SeqTracker::new();
        t.observe(1);
        assert_eq!(t.observe(0), Verdict::Reordered);
        assert_eq!(t.observe(0), Verdict::Duplicate);
    }

    #[test]
    fn filled_gaps_release_their_memory() {
        let mut t = SeqTracker::new();
        t.observe(2);
        t.observe(0);
        t.observe(1);
        assert_eq!(t, {
            let mut ok = SeqTracker::new();
            for s in 0..3 {
                ok.observe(s);
            }
            ok
        });
    }

    #[test]
    fn tracker_joining_late_expects_only_later_messages() {
        let mut t = SeqTracker::starting_at(10);
        assert_eq!(t.observe(11), Verdict::InOrder);
        assert_eq!(t.lost(12), 0);
        assert_eq!(t.observe(5), Verdict::Duplicate);
    }

    #[test]
    fn huge_gap_is_counted_without_unbounded_memory() {
        let mut t = SeqTracker::new();
        t.observe(1_000_000);
        assert_eq!(t.lost(1_000_001), 1_000_000);
        assert!(t.missing.len() <= MAX_TRACKED_GAPS);
    }
}
