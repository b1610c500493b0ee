//! Missed-message recovery: per-stream history inside one global byte budget, envelopes for connections that
//! opted in, and the hand-off that makes the switch from replay to live exact.
//!
//! It owns the store (`store`, sans-IO), the client-facing formats (`envelope`, sans-IO) and the publish path
//! shared by the admin thread and the cluster bridge: name the stream, store the message, frame it once bare
//! and once enveloped, and queue it on every reactor's mailbox. It does not touch sockets; the reactor asks it
//! for replays at upgrade time.
//!
//! The no-gap, no-duplicate switch without per-connection state: a publish is stored (getting offset and a
//! global sequence number) and pushed to every mailbox under one lock, so each mailbox receives stored messages
//! in sequence order. A reactor remembers one number, the last sequence it applied. At an upgrade with `since`
//! it first applies its pending mailbox (so it has applied everything the client could have received before it
//! reconnected), then replays stored messages up to that sequence and registers the connection: everything
//! stored later is still in its mailbox and arrives live, in order, exactly once.

pub mod envelope;
pub mod store;

use crate::mailbox::{Command, Mailbox, Target};
use crate::proto::frame;
use crate::proto::http;
use bytes::Bytes;
use envelope::{Position, Stamp};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use store::{Limits, Recovery, Store, REASON_LABELS};

/// The `Sec-WebSocket-Protocol` that opts a connection into envelopes, like `?recover=1`.
pub const SUBPROTOCOL: &str = "densepush.v1";

/// The kinds of stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `user:{user}` (publishes to a user's client token included).
    User,
    /// `channel:{name}`.
    Channel,
    /// `all`.
    All,
}

/// What `[history]` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// History for `user:` streams.
    pub user: bool,
    /// History for `channel:` streams.
    pub channel: bool,
    /// History for the `all` stream.
    pub all: bool,
    /// Per-stream and global limits.
    pub limits: Limits,
}

impl Settings {
    /// Whether streams of this kind keep history.
    pub fn enabled(&self, kind: Kind) -> bool {
        match kind {
            Kind::User => self.user,
            Kind::Channel => self.channel,
            Kind::All => self.all,
        }
    }
}

/// The stream a publish target belongs to, its kind, and the client tag of a client-token publish.
pub fn stream_of(target: &Target) -> (String, Kind, Option<&str>) {
    match target {
        Target::User(user) => (format!("user:{user}"), Kind::User, None),
        Target::UserClient(user, client) => (format!("user:{user}"), Kind::User, Some(client)),
        Target::Channel(channel) => (format!("channel:{channel}"), Kind::Channel, None),
        Target::All => ("all".to_owned(), Kind::All, None),
    }
}

/// The kind of a stream name; `None` for a name that is no stream.
pub fn kind_of(stream: &str) -> Option<Kind> {
    match stream {
        "all" => Some(Kind::All),
        s if s.len() > 5 && s.starts_with("user:") => Some(Kind::User),
        s if s.len() > 8 && s.starts_with("channel:") => Some(Kind::Channel),
        _ => None,
    }
}

/// Who a connection is, as far as recovery cares: the streams it may read and its client token.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    /// The user.
    pub user: &'a str,
    /// The client token, if any.
    pub client: Option<&'a str>,
    /// The subscribed channels.
    pub channels: &'a [String],
}

impl Reader<'_> {
    /// Whether this connection receives the stream's messages live (so may recover them).
    pub fn may_read(&self, stream: &str) -> bool {
        match kind_of(stream) {
            Some(Kind::All) => true,
            Some(Kind::User) => stream["user:".len()..] == *self.user,
            Some(Kind::Channel) => self
                .channels
                .iter()
                .any(|c| **c == stream["channel:".len()..]),
            None => false,
        }
    }
}

/// A message of the shared log that this node never received, for [`History::publish_stamped`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backfill {
    /// Its offset.
    pub offset: u64,
    /// The client token it was published to, if any.
    pub client: Option<String>,
    /// Binary (true) or text.
    pub binary: bool,
    /// The payload.
    pub payload: Vec<u8>,
}

/// The node's history: settings, the store behind a lock, and the clock the store is driven with.
pub struct History {
    settings: Settings,
    store: Mutex<Store<Bytes>>,
    started: Instant,
    /// Open connections that opted into envelopes, over all reactors. While there are none, a message of a
    /// stream without history is not enveloped at all, so users who do not use recovery pay nothing for it.
    recovering: AtomicUsize,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl History {
    /// A history with nothing stored; epochs are seeded from the time and the process id, so a restarted node
    /// never reuses its previous epochs.
    pub fn new(settings: Settings) -> Arc<History> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
        Arc::new(History {
            settings,
            store: Mutex::new(Store::new(settings.limits, seed)),
            started: Instant::now(),
            recovering: AtomicUsize::new(0),
        })
    }

    /// Counts a connection that opted into envelopes (`opened`) or one of them closing.
    pub fn count_recovering(&self, opened: bool) {
        if opened {
            self.recovering.fetch_add(1, Relaxed);
        } else {
            self.recovering.fetch_sub(1, Relaxed);
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether any stream kind keeps history.
    pub fn any_enabled(&self) -> bool {
        self.settings.user || self.settings.channel || self.settings.all
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn lock(&self) -> MutexGuard<'_, Store<Bytes>> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Frames a message once bare and once enveloped, stores it when its stream keeps history, and queues it on
    /// every mailbox. Stored messages are queued under the store lock, so every mailbox gets them in sequence
    /// order whichever thread (admin or cluster bridge) publishes.
    pub fn publish(
        &self,
        target: Target,
        binary: bool,
        payload: &[u8],
        mailboxes: &[Arc<Mailbox>],
    ) {
        let frame = frame::encode_message(!binary, payload);
        let (stream, kind, client) = stream_of(&target);
        let envelope_frame = |stamp: Option<Stamp<'_>>| {
            frame::encode_message(!binary, &envelope::encode(&stream, stamp, !binary, payload))
        };
        if !self.settings.enabled(kind) {
            // Empty when nobody opted in; a reactor that meets a connection which opted in meanwhile builds
            // the envelope itself (`lazy_envelope`).
            let envelope = if self.recovering.load(Relaxed) > 0 {
                envelope_frame(None)
            } else {
                Bytes::new()
            };
            send_all(mailboxes, Arc::new(target), frame, envelope, 0);
            return;
        }
        let client = client.map(str::to_owned);
        let now = self.now_ms();
        let mut store = self.lock();
        let appended = store.append(&stream, client.as_deref(), now, |slot| {
            envelope_frame(Some(slot.stamp()))
        });
        send_all(
            mailboxes,
            Arc::new(target),
            frame,
            appended.item,
            appended.seq,
        );
    }

    /// A fresh random epoch, offered to Redis when a stream starts there.
    pub fn fresh_epoch(&self) -> String {
        self.lock().fresh_epoch().to_string()
    }

    /// Whether messages published to `target` are stored.
    pub fn keeps(&self, target: &Target) -> bool {
        self.settings.enabled(stream_of(target).1)
    }

    /// The first offset before `stamp` this node lacks in `target`'s stream (within `size`), so the cluster
    /// bridge can fetch it from the shared log before delivering; `None` when nothing is missing or the stream
    /// keeps no history here.
    pub fn missing_before(&self, target: &Target, stamp: Stamp<'_>) -> Option<u64> {
        let (stream, kind, _) = stream_of(target);
        if !self.settings.enabled(kind) {
            return None;
        }
        self.lock().missing_before(&stream, stamp)
    }

    /// [`History::publish`] for a message whose epoch and offset were assigned by the cluster (Redis): stored
    /// with them, so every node holds the same offsets. `backfill` holds earlier messages of the same stream
    /// and epoch that this node never received (fetched from the shared log, in offset order): they are stored
    /// first, for replay only. Only the cluster bridge calls this, from one thread, in the order Redis assigned
    /// the offsets.
    pub fn publish_stamped(
        &self,
        target: Target,
        binary: bool,
        payload: &[u8],
        stamp: Stamp<'_>,
        backfill: &[Backfill],
        mailboxes: &[Arc<Mailbox>],
    ) {
        let frame = frame::encode_message(!binary, payload);
        let (stream, kind, client) = stream_of(&target);
        let envelope_frame = |stamp: Stamp<'_>| {
            frame::encode_message(
                !binary,
                &envelope::encode(&stream, Some(stamp), !binary, payload),
            )
        };
        if !self.settings.enabled(kind) {
            // This node's [history] differs from the publishing node's: deliver, with the cluster's stamp.
            let envelope = envelope_frame(stamp);
            send_all(mailboxes, Arc::new(target), frame, envelope, 0);
            return;
        }
        let client = client.map(str::to_owned);
        let now = self.now_ms();
        let mut store = self.lock();
        for old in backfill {
            let old_stamp = Stamp {
                epoch: stamp.epoch,
                offset: old.offset,
            };
            store.append_stamped(
                &stream,
                old_stamp,
                false,
                old.client.as_deref(),
                now,
                |slot| {
                    frame::encode_message(
                        !old.binary,
                        &envelope::encode(&stream, Some(slot.stamp()), !old.binary, &old.payload),
                    )
                },
            );
        }
        let appended = store.append_stamped(&stream, stamp, true, client.as_deref(), now, |slot| {
            envelope_frame(slot.stamp())
        });
        send_all(
            mailboxes,
            Arc::new(target),
            frame,
            appended.item,
            appended.seq,
        );
    }

    /// Appends to `out` what a connection positioned at `positions` missed, among the messages with a sequence
    /// up to `applied_seq`; `resync` notices (text frames) take the place of positions that cannot be served.
    /// Positions in streams the connection does not receive, or whose kind keeps no history, are ignored.
    pub fn recover(
        &self,
        positions: &[Position],
        reader: Reader<'_>,
        applied_seq: u64,
        out: &mut Vec<Bytes>,
    ) {
        let now = self.now_ms();
        let mut store = self.lock();
        for position in positions {
            let kind = kind_of(&position.stream);
            if !kind.is_some_and(|k| self.settings.enabled(k)) || !reader.may_read(&position.stream)
            {
                continue;
            }
            if let Recovery::Resync { epoch, offset } =
                store.recover(position, reader.client, applied_seq, now, out)
            {
                out.push(frame::encode_message(
                    true,
                    &envelope::encode_resync(&position.stream, &epoch, offset),
                ));
            }
        }
    }

    /// Up to `limit` messages of `stream` after offset `since`.
    pub fn read(&self, stream: &str, since: u64, limit: usize) -> Option<store::Page<Bytes>> {
        let now = self.now_ms();
        self.lock().read(stream, since, limit, now)
    }

    /// Forgets a stream; its next message starts a new epoch.
    pub fn delete(&self, stream: &str) -> bool {
        self.lock().delete(stream)
    }

    /// Forgets every stream: used when this node may have missed messages (its cluster link was down), so no
    /// client is told it has everything when it has not.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Appends the history numbers to a Prometheus text exposition.
    pub fn render_metrics(&self, out: &mut String) {
        use crate::metrics::{Exposition, MetricType};
        let (bytes, messages, streams, counters, limits) = {
            let now = self.now_ms();
            let mut store = self.lock();
            store.expire(now);
            (
                store.bytes(),
                store.messages(),
                store.streams(),
                store.counters(),
                store.limits(),
            )
        };
        let mut out = Exposition::new(out);
        out.gauge(
            "densepush_history_bytes",
            "Bytes held by history, overheads included.",
            bytes as u64,
        );
        out.gauge(
            "densepush_history_max_bytes",
            "The history byte budget (history.max_bytes).",
            limits.max_bytes as u64,
        );
        out.gauge(
            "densepush_history_messages",
            "Messages held by history.",
            messages as u64,
        );
        out.gauge(
            "densepush_history_streams",
            "Streams holding history.",
            streams as u64,
        );
        out.counter(
            "densepush_history_recoveries_total",
            "Reconnections served from history (possibly with nothing missed).",
            counters.recoveries,
        );
        out.counter(
            "densepush_history_replayed_total",
            "Messages replayed to reconnecting clients.",
            counters.replayed,
        );
        out.counter(
            "densepush_history_resyncs_total",
            "Resync notices sent instead of a replay.",
            counters.resyncs,
        );
        out.family(
            "densepush_history_evicted_total",
            "Messages evicted from history, by reason.",
            MetricType::Counter,
            "reason",
            REASON_LABELS.iter().zip(counters.evicted),
        );
    }
}

/// The envelope of a message of a stream without history, built from its bare frame: for a publish that was
/// queued while no connection had opted in, reaching one that has.
pub fn lazy_envelope(target: &Target, frame: &[u8]) -> Bytes {
    let text = frame.first().is_some_and(|b| b & 0x0f == 0x1);
    let (stream, _, _) = stream_of(target);
    let payload = envelope::frame_payload(frame);
    frame::encode_message(text, &envelope::encode(&stream, None, text, payload))
}

fn send_all(
    mailboxes: &[Arc<Mailbox>],
    target: Arc<Target>,
    frame: Bytes,
    envelope: Bytes,
    seq: u64,
) {
    for mailbox in mailboxes {
        mailbox.send(Command::Publish {
            target: target.clone(),
            frame: frame.clone(),
            envelope: envelope.clone(),
            seq,
        });
    }
}

/// Whether an upgrade request opts into envelopes: `?recover=1` (or `true`), a `since`, or the subprotocol.
pub fn wants_envelopes(query: &str, protocols: Option<&str>) -> bool {
    let flag = http::query_raw(query, "recover").is_some_and(|v| v == "1" || v == "true");
    flag || http::query_raw(query, "since").is_some() || offers_subprotocol(protocols)
}

/// Whether the `Sec-WebSocket-Protocol` list offers [`SUBPROTOCOL`] (RFC 6455 §4.1 item 10: comma-separated
/// tokens), compared case-sensitively.
pub fn offers_subprotocol(protocols: Option<&str>) -> bool {
    protocols.is_some_and(|list| http::list_items(list).any(|p| p == SUBPROTOCOL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_map_to_streams() {
        let t = Target::UserClient("42".into(), "phone".into());
        assert_eq!(stream_of(&t), ("user:42".into(), Kind::User, Some("phone")));
        assert_eq!(stream_of(&Target::Channel("n".into())).0, "channel:n");
        assert_eq!(stream_of(&Target::All).0, "all");
    }

    #[test]
    fn stream_kinds_need_a_name() {
        assert_eq!(kind_of("user:1"), Some(Kind::User));
        assert_eq!(kind_of("channel:x"), Some(Kind::Channel));
        assert_eq!(kind_of("all"), Some(Kind::All));
        assert_eq!(kind_of("user:"), None);
        assert_eq!(kind_of("group:x"), None);
    }

    #[test]
    fn a_connection_may_recover_only_its_own_streams() {
        let channels = vec!["news".to_string()];
        let r = Reader {
            user: "42",
            client: None,
            channels: &channels,
        };
        assert!(r.may_read("user:42"));
        assert!(!r.may_read("user:43"));
        assert!(r.may_read("channel:news"));
        assert!(!r.may_read("channel:sport"));
        assert!(r.may_read("all"));
    }

    #[test]
    fn lazy_envelope_matches_the_eager_one() {
        let target = Target::Channel("n".into());
        for (text, payload) in [(true, &b"hi"[..]), (false, &[0u8, 1, 2][..])] {
            let bare = frame::encode_message(text, payload);
            let eager =
                frame::encode_message(text, &envelope::encode("channel:n", None, text, payload));
            assert_eq!(lazy_envelope(&target, &bare), eager);
        }
    }

    #[test]
    fn opting_in() {
        assert!(wants_envelopes("recover=1", None));
        assert!(wants_envelopes("token=x&since=all@E:1", None));
        assert!(wants_envelopes("", Some("chat, densepush.v1")));
        assert!(!wants_envelopes("recover=0", Some("chat")));
        assert!(!wants_envelopes("user=1", None));
    }
}
