//! The events sender's rules, sans-IO: when a batch is due, what its request body says, and how long to wait
//! before retrying a failed request.
//!
//! It owns the JSON the webhook receives and the timing decisions, with time and randomness as arguments, so
//! every rule is a unit test. It does not read the queue, send requests or sleep (`events`, the thread).

use super::{Event, EventKind};
use serde::Serialize;
use std::time::{Duration, Instant};

/// The first retry waits a random delay below this cap; each further retry doubles the cap.
pub const RETRY_MIN: Duration = Duration::from_millis(250);
/// The retry delay's cap stops doubling here.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// The events gathered for the next request, and when it is due.
#[derive(Debug)]
pub struct Batcher {
    events: Vec<Event>,
    max_batch: usize,
    linger: Duration,
    /// When the oldest gathered event arrived.
    since: Option<Instant>,
}

impl Batcher {
    /// Batches of at most `max_batch` events, each sent at most `linger` after its first event arrived.
    pub fn new(max_batch: usize, linger: Duration) -> Batcher {
        debug_assert!(max_batch > 0);
        Batcher {
            events: Vec::new(),
            max_batch,
            linger,
            since: None,
        }
    }

    /// Events gathered.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when nothing is gathered.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// True when the batch can take no more: the caller sends it before taking more from the queue, so the
    /// events held outside the queue stay at most `max_batch`.
    pub fn is_full(&self) -> bool {
        self.events.len() >= self.max_batch
    }

    /// Adds an event that arrived at `now`.
    pub fn push(&mut self, event: Event, now: Instant) {
        debug_assert!(!self.is_full());
        self.since.get_or_insert(now);
        self.events.push(event);
    }

    /// When the batch must be sent: `linger` after its first event; `None` while empty.
    pub fn deadline(&self) -> Option<Instant> {
        self.since.map(|since| since + self.linger)
    }

    /// Whether the batch must be sent at `now`: it is full, or its first event has waited `linger`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.is_full() || self.deadline().is_some_and(|d| now >= d)
    }

    /// Takes the gathered events; the next event starts a new batch.
    pub fn take(&mut self) -> Vec<Event> {
        self.since = None;
        std::mem::take(&mut self.events)
    }
}

/// One event as the webhook receives it.
#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
    at: u64,
}

/// The request body for `events`: `{"events":[{"type","user","client","node","code","at"},…]}`, with `client`
/// only when the connection has a client token (never on `online`/`offline`) and `code` only on `disconnect`.
pub fn encode(events: &[Event], node: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        events: Vec<Wire<'a>>,
    }
    let body = Body {
        events: events
            .iter()
            .map(|e| Wire {
                kind: e.kind.as_str(),
                user: &e.user,
                client: e.client.as_deref(),
                node,
                code: (e.kind == EventKind::Disconnect).then_some(e.code),
                at: e.at_ms,
            })
            .collect(),
    };
    // Strings and integers only: serializing cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// "Full jitter" backoff: the `n`th retry waits a uniformly random delay below `RETRY_MIN * 2^n` (capped at
/// [`RETRY_MAX`]), so nodes whose webhook failed together do not all retry in the same instant. `random` is
/// any 64-bit random number.
pub fn retry_delay(retry: u32, random: u64) -> Duration {
    let cap = RETRY_MIN
        .saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
        .min(RETRY_MAX);
    let cap_ms = cap.as_millis().max(1) as u64;
    Duration::from_millis(random % (cap_ms + 1))
}

/// A small xorshift generator for the jitter: no cryptographic quality needed, only spread.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// Seeded from `seed` (zero is replaced: xorshift would stay at zero).
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, user: &str, client: Option<&str>, code: u16) -> Event {
        Event {
            kind,
            user: user.into(),
            client: client.map(Into::into),
            code,
            at_ms: 1_700_000_000_123,
        }
    }

    #[test]
    fn a_batch_is_due_when_full_or_when_its_first_event_has_waited_the_linger() {
        let t0 = Instant::now();
        let mut b = Batcher::new(3, Duration::from_millis(100));
        assert_eq!(b.deadline(), None);
        assert!(!b.is_due(t0 + Duration::from_secs(9)), "nothing to send");
        b.push(event(EventKind::Connect, "u", None, 0), t0);
        b.push(
            event(EventKind::Connect, "u", None, 0),
            t0 + Duration::from_millis(50),
        );
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(100)));
        assert!(!b.is_due(t0 + Duration::from_millis(99)));
        assert!(b.is_due(t0 + Duration::from_millis(100)));
        b.push(
            event(EventKind::Connect, "u", None, 0),
            t0 + Duration::from_millis(60),
        );
        assert!(b.is_full() && b.is_due(t0), "a full batch goes at once");
        assert_eq!(b.take().len(), 3);
        assert!(b.is_empty() && b.deadline().is_none());
        b.push(
            event(EventKind::Connect, "u", None, 0),
            t0 + Duration::from_secs(1),
        );
        assert_eq!(
            b.deadline(),
            Some(t0 + Duration::from_millis(1100)),
            "the next batch's clock starts with its own first event"
        );
    }

    #[test]
    fn the_body_names_each_event_with_only_its_fields() {
        let body = encode(
            &[
                event(EventKind::Connect, "42", Some("phone"), 0),
                event(EventKind::Online, "42", None, 0),
                event(EventKind::Disconnect, "42", None, 1001),
                event(EventKind::Offline, "4\"2", None, 0),
            ],
            "node-a",
        );
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"events": [
                {"type": "connect", "user": "42", "client": "phone", "node": "node-a", "at": 1_700_000_000_123u64},
                {"type": "online", "user": "42", "node": "node-a", "at": 1_700_000_000_123u64},
                {"type": "disconnect", "user": "42", "node": "node-a", "code": 1001, "at": 1_700_000_000_123u64},
                {"type": "offline", "user": "4\"2", "node": "node-a", "at": 1_700_000_000_123u64},
            ]})
        );
    }

    #[test]
    fn retry_delays_are_random_below_a_doubling_cap() {
        let mut jitter = Jitter::new(7);
        for retry in 0..40 {
            let cap = RETRY_MIN
                .saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
                .min(RETRY_MAX);
            for _ in 0..100 {
                assert!(
                    retry_delay(retry, jitter.next_u64()) <= cap,
                    "retry {retry}"
                );
            }
        }
        assert_eq!(retry_delay(0, 250), RETRY_MIN);
        assert_eq!(retry_delay(0, 251), Duration::ZERO);
        assert_eq!(retry_delay(30, 10_000), RETRY_MAX);
        let spread: std::collections::HashSet<Duration> =
            (0..50).map(|_| retry_delay(3, jitter.next_u64())).collect();
        assert!(spread.len() > 10, "delays spread out: {spread:?}");
    }
}
