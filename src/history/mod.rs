//! Missed-message recovery: per-stream history inside one global byte budget, and what a reconnecting client
//! gets back from it.
//!
//! It owns the node's store (`store`, sans-IO, behind one lock, driven with this node's clock), which streams
//! keep history (`[history]`), and the replays and `resync` notices for a connection's `since` positions. It
//! is a store: it does not frame (`message`), publish (`publish`) or reach the reactors (`dispatch`); it does
//! not touch sockets either: the reactor asks it for replays at upgrade time.
//!
//! The no-gap, no-duplicate switch without per-connection state: a publish is stored (getting offset and a
//! global sequence number) and handed to every mailbox under one lock (the `deliver` closure of
//! [`History::append`], which `publish` fills in), so each mailbox receives stored messages in sequence order.
//! A reactor remembers one number, the last sequence it applied. At an upgrade with `since` it first applies
//! its pending mailbox (so it has applied everything the client could have received before it reconnected),
//! then replays stored messages up to that sequence and registers the connection: everything stored later is
//! still in its mailbox and arrives live, in order, exactly once.

pub mod store;

use crate::message::envelope::{self, Position, Stamp};
use crate::message::{kind_of, stream_of, Codec, Encoding, Kind, Message, Target};
use crate::proto::frame;
use crate::proto::http;
use crate::shared_frame::SharedFrame;
use crate::snapshot::{self, SnapshotError, Writer};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use store::{Limits, Recovery, Slot, Store, Stored, REASON_LABELS};

/// The `Sec-WebSocket-Protocol` that opts a connection into envelopes, like `?recover=1`.
pub const SUBPROTOCOL: &str = "densepush.v1";

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

/// A message of the shared log that this node never received, for [`History::append_stamped`].
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

/// A stored message costs what it holds: its record, both of its frames and its names.
impl Stored for Arc<Message> {
    fn cost(&self) -> usize {
        self.footprint()
    }
}

/// The node's history: settings, the store behind a lock, and the clock the store is driven with.
pub struct History {
    settings: Settings,
    store: Mutex<Store<Arc<Message>>>,
    started: Instant,
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
        })
    }

    /// Writes every stored message for a successor process (the live upgrade), with the publish sequence so
    /// the successor's reactors know they have applied everything stored so far.
    pub fn snapshot(&self, w: &mut Writer) {
        let now = self.now_ms();
        self.lock().snapshot(now, w, |message, w| {
            let (kind, a, b) = match message.target() {
                Target::User(user) => (0, user.as_str(), None),
                Target::UserClient(user, client) => (1, user.as_str(), Some(client.as_str())),
                Target::Channel(channel) => (2, channel.as_str(), None),
                Target::All => (3, "", None),
            };
            w.u8(kind);
            w.str(a);
            w.opt_str(b);
            w.bool(message.is_binary());
            w.bytes_field(message.payload());
        });
    }

    /// A history holding what [`History::snapshot`] wrote, under this process's settings (streams of kinds that
    /// keep no history here are dropped; tighter limits evict as usual). Returns it and the last stored sequence.
    pub fn restore(
        settings: Settings,
        r: &mut snapshot::Reader<'_>,
    ) -> Result<(Arc<History>, u64), SnapshotError> {
        let history = History::new(settings);
        let now = history.now_ms();
        let seed = history.lock().fresh_epoch().len() as u64 ^ now ^ u64::from(std::process::id());
        let store = Store::restore(settings.limits, seed, now, r, |r, stream, slot| {
            let target = match (
                r.u8("message target")?,
                r.str("message target name")?,
                r.opt_str("message client")?,
            ) {
                (0, user, None) => Target::User(user.to_owned()),
                (1, user, Some(client)) => Target::UserClient(user.to_owned(), client.to_owned()),
                (2, channel, None) => Target::Channel(channel.to_owned()),
                (3, _, None) => Target::All,
                _ => return Err(SnapshotError::Invalid("message target")),
            };
            if stream_of(&target).0 != stream {
                return Err(SnapshotError::Invalid("message stream"));
            }
            let binary = r.bool("message binary")?;
            let payload = r.bytes_field("message payload")?;
            let message = Message::new(target, binary, payload);
            let envelope = message.prepare_envelope();
            Ok(placed(message, slot, &envelope))
        })?;
        let mut restored = store;
        // Streams of kinds this process keeps no history for are forgotten.
        let names = restored.stream_names();
        for name in names {
            if !kind_of(&name).is_some_and(|k| settings.enabled(k)) {
                restored.delete(&name);
            }
        }
        let last = restored.last_seq();
        *history.lock() = restored;
        Ok((history, last))
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

    fn lock(&self) -> MutexGuard<'_, Store<Arc<Message>>> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether messages published to `target` are stored.
    pub fn keeps(&self, target: &Target) -> bool {
        // Called per target of a batch: the kind alone, no stream name built.
        self.settings.enabled(target.kind())
    }

    /// Stores a message of a stream that keeps history ([`History::keeps`]): it gets the stream's next offset
    /// and the next publish sequence number, and its envelope. `deliver` runs with the stored message before
    /// the lock is released, so whatever it queues, it queues in sequence order whichever thread publishes.
    pub fn append(&self, message: Message, deliver: impl FnOnce(&Arc<Message>)) -> Arc<Message> {
        self.append_with(message, None, deliver)
    }

    /// [`History::append`] for a message whose epoch and offset were assigned by the cluster (Redis): stored
    /// with them, so every node holds the same offsets. `backfill` holds earlier messages of the same stream
    /// and epoch that this node never received (fetched from the shared log, in offset order): they are stored
    /// first, for replay only, and not handed to `deliver`. Only the cluster bridge calls this, from one
    /// thread, in the order Redis assigned the offsets.
    pub fn append_stamped(
        &self,
        message: Message,
        stamp: Stamp<'_>,
        backfill: &[Backfill],
        deliver: impl FnOnce(&Arc<Message>),
    ) -> Arc<Message> {
        self.append_with(message, Some((stamp, backfill)), deliver)
    }

    fn append_with(
        &self,
        message: Message,
        stamped: Option<(Stamp<'_>, &[Backfill])>,
        deliver: impl FnOnce(&Arc<Message>),
    ) -> Arc<Message> {
        debug_assert!(self.keeps(message.target()), "only kept streams are stored");
        // Everything that costs in proportion to the payload (escaping it into the envelope, framing a
        // backfill) is done before the lock: publishers and the reactors' replays wait only for the copy.
        let placing = Placing::new(message, stamped);
        let now = self.now_ms();
        let mut store = self.lock();
        let stored = self.place(&mut store, now, placing);
        deliver(&stored);
        stored
    }

    /// Places one message under the lock: a kept stream's message is stored (with the cluster's stamp after its
    /// backfill, or at the stream's next local offset); another is only stamped, with sequence 0 (no reactor
    /// awaits it in sequence), when the cluster placed it in a history this node does not keep.
    fn place(
        &self,
        store: &mut Store<Arc<Message>>,
        now: u64,
        placing: Placing<'_>,
    ) -> Arc<Message> {
        let Placing {
            message,
            envelope,
            stream,
            kind,
            client,
            stamped,
        } = placing;
        if !self.settings.enabled(kind) {
            return Arc::new(match stamped {
                Some((stamp, _)) => {
                    message.stamped_prepared(stamp.epoch.into(), stamp.offset, 0, &envelope)
                }
                None => message,
            });
        }
        let appended = match stamped {
            None => store.append(&stream, client.as_deref(), now, |slot| {
                placed(message, slot, &envelope)
            }),
            Some((stamp, backfill)) => {
                for old in backfill {
                    let old_stamp = Stamp {
                        epoch: stamp.epoch,
                        offset: old.offset,
                    };
                    // Sequence 0: no reactor expects it live, so it is replayed and never awaited.
                    store.append_stamped(
                        &stream,
                        old_stamp,
                        false,
                        old.client.as_deref(),
                        now,
                        |slot| placed(old.message, slot, &old.envelope),
                    );
                }
                store.append_stamped(&stream, stamp, true, client.as_deref(), now, |slot| {
                    placed(message, slot, &envelope)
                })
            }
        };
        appended.item
    }

    /// Stores the messages of a batch publish whose streams keep history (each gets its stream's next offset and
    /// the next sequence number, in the batch's order) and hands the whole batch, stored and unstored messages
    /// alike, to `deliver` before the lock is released: a batch is one command per reactor, so its stored
    /// messages reach every mailbox in sequence order, as single publishes do.
    pub fn append_batch(
        &self,
        messages: Vec<Message>,
        deliver: impl FnOnce(&Arc<[Arc<Message>]>),
    ) -> Arc<[Arc<Message>]> {
        self.append_batch_stamped(messages.into_iter().map(|m| (m, None)), deliver)
    }

    /// [`History::append_batch`] for a batch from the cluster bus: a message Redis placed in its stream's
    /// shared history comes with that stamp and the backfill to store before it (as [`History::append_stamped`]);
    /// one without a stamp (a stream the origin keeps no history of) is placed as in a local batch. Only the
    /// cluster's bus reader calls this, from one thread, in bus order.
    pub fn append_batch_stamped<'a>(
        &self,
        messages: impl IntoIterator<Item = (Message, Option<(Stamp<'a>, &'a [Backfill])>)>,
        deliver: impl FnOnce(&Arc<[Arc<Message>]>),
    ) -> Arc<[Arc<Message>]> {
        // Prepared before the lock, as a single publish is (see `append_with`).
        let placing: Vec<Placing<'a>> = messages
            .into_iter()
            .map(|(message, stamped)| Placing::new(message, stamped))
            .collect();
        let now = self.now_ms();
        let mut store = self.lock();
        let batch: Arc<[Arc<Message>]> = placing
            .into_iter()
            .map(|placing| self.place(&mut store, now, placing))
            .collect();
        deliver(&batch);
        batch
    }

    /// The current epoch of a stream, when history holds it: what a position given as a bare offset (a
    /// subscription's `since`) is read against.
    pub fn epoch(&self, stream: &str) -> Option<Arc<str>> {
        let now = self.now_ms();
        self.lock()
            .read(stream, u64::MAX, 0, now)
            .map(|page| page.epoch)
    }

    /// The sequence number of the last message stored so far. Messages are stored and handed to every mailbox
    /// under one lock, so once this returns, every message up to it is in every reactor's mailbox: a reactor
    /// that applies its mailbox up to it has delivered everything a client can have seen anywhere.
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq()
    }

    /// A fresh random epoch, offered to Redis when a stream starts there.
    pub fn fresh_epoch(&self) -> String {
        self.lock().fresh_epoch().to_string()
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

    /// Appends to `out` what a connection positioned at `positions` missed, among the messages with a sequence
    /// up to `applied_seq`; `resync` notices (text frames) take the place of positions that cannot be served.
    /// Positions in streams the connection does not receive, or whose kind keeps no history, are ignored.
    ///
    /// Each message goes in `encoding` (built with `codec` if it was not yet: a compressed or SSE form is
    /// built once per message and shared by every replay); `resync` notices are SSE events for
    /// [`Encoding::Sse`], text frames otherwise.
    pub fn recover(
        &self,
        positions: &[Position],
        reader: Reader<'_>,
        applied_seq: u64,
        encoding: Encoding,
        codec: &Codec,
        out: &mut Vec<SharedFrame>,
    ) {
        let now = self.now_ms();
        let mut store = self.lock();
        let mut missed = Vec::new();
        for position in positions {
            let kind = kind_of(&position.stream);
            if !kind.is_some_and(|k| self.settings.enabled(k)) || !reader.may_read(&position.stream)
            {
                continue;
            }
            let recovery = store.recover(position, reader.client, applied_seq, now, &mut missed);
            // Stored messages were enveloped when they were stored: this only clones the shared frames.
            out.extend(
                missed
                    .drain(..)
                    .map(|message| message.shared_in(encoding, codec).clone()),
            );
            if let Recovery::Resync { epoch, offset } = recovery {
                out.push(resync_frame(&position.stream, &epoch, offset, encoding));
            }
        }
    }

    /// What a connection that joins a channel at `position` missed, among the messages with a sequence up to
    /// `applied_seq`, appended to `out` as messages (the caller sends each in the connection's encoding); or,
    /// when history cannot serve the position, the `resync` notice to send instead. The messages after
    /// `applied_seq` are still in the caller's mailbox and reach the connection live, as at an upgrade.
    pub fn recover_join(
        &self,
        position: &Position,
        client: Option<&str>,
        applied_seq: u64,
        encoding: Encoding,
        out: &mut Vec<Arc<Message>>,
    ) -> Option<SharedFrame> {
        if !kind_of(&position.stream).is_some_and(|k| self.settings.enabled(k)) {
            return None;
        }
        let now = self.now_ms();
        let recovery = self.lock().recover(position, client, applied_seq, now, out);
        match recovery {
            Recovery::Resync { epoch, offset } => {
                Some(resync_frame(&position.stream, &epoch, offset, encoding))
            }
            Recovery::Replayed(_) => None,
        }
    }

    /// Up to `limit` messages of `stream` after offset `since`.
    pub fn read(
        &self,
        stream: &str,
        since: u64,
        limit: usize,
    ) -> Option<store::Page<Arc<Message>>> {
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

/// A `resync` notice for a connection receiving `encoding`: a text frame (never compressed: it is small and
/// rare), or for SSE an `event: resync` whose id is the position the stream resumes from, so a reconnecting
/// EventSource sends it back.
fn resync_frame(stream: &str, epoch: &str, offset: u64, encoding: Encoding) -> SharedFrame {
    let notice = envelope::encode_resync(stream, epoch, offset);
    if encoding == Encoding::Sse {
        let id = (!epoch.is_empty()).then(|| crate::proto::sse::event_id(stream, epoch, offset));
        let event = crate::proto::sse::event(id.as_deref(), Some("resync"), false, &notice);
        return SharedFrame::new(bytes::Bytes::from(event));
    }
    SharedFrame::new(frame::encode_message(true, &notice))
}

/// The message, with the place the store gave it and its envelope finished from `envelope`.
fn placed(message: Message, slot: Slot<'_>, envelope: &envelope::Prepared) -> Arc<Message> {
    Arc::new(message.stamped_prepared(slot.epoch.clone(), slot.offset, slot.seq, envelope))
}

/// A message on its way into the store, with what can be built without the lock already built: its stream and
/// client, its envelope prepared (the escaped payload), and the backfill before it framed and prepared.
struct Placing<'a> {
    message: Message,
    envelope: envelope::Prepared,
    stream: String,
    kind: Kind,
    client: Option<String>,
    stamped: Option<(Stamp<'a>, Vec<PreparedBackfill>)>,
}

/// A backfilled message (see [`Backfill`]), framed and with its envelope prepared.
struct PreparedBackfill {
    offset: u64,
    client: Option<String>,
    message: Message,
    envelope: envelope::Prepared,
}

impl<'a> Placing<'a> {
    fn new(message: Message, stamped: Option<(Stamp<'a>, &[Backfill])>) -> Placing<'a> {
        let (stream, kind, client) = stream_of(message.target());
        let client = client.map(str::to_owned);
        let envelope = message.prepare_envelope();
        let stamped = stamped.map(|(stamp, backfill)| {
            let backfill = backfill
                .iter()
                .map(|old| {
                    let target = message.target().with_client(old.client.as_deref());
                    let old_message = Message::new(target, old.binary, &old.payload);
                    PreparedBackfill {
                        offset: old.offset,
                        client: old.client.clone(),
                        envelope: old_message.prepare_envelope(),
                        message: old_message,
                    }
                })
                .collect();
            (stamp, backfill)
        });
        Placing {
            message,
            envelope,
            stream,
            kind,
            client,
            stamped,
        }
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

    fn kept_channels() -> Arc<History> {
        History::new(Settings {
            user: false,
            channel: true,
            all: false,
            limits: Limits {
                size: 100,
                ttl_ms: 3_600_000,
                max_bytes: 1 << 20,
            },
        })
    }

    #[test]
    fn a_batch_stores_its_kept_messages_in_order_and_delivers_all_of_it_at_once() {
        let history = kept_channels();
        let messages = vec![
            Message::new(Target::Channel("n".into()), false, b"1"),
            Message::new(Target::User("u".into()), false, b"2"),
            Message::new(Target::Channel("n".into()), false, b"3"),
        ];
        let mut delivered = None;
        let batch = history.append_batch(messages, |b| delivered = Some(b.clone()));
        assert!(Arc::ptr_eq(&batch, &delivered.unwrap()));
        let places: Vec<(u64, Option<u64>)> = batch
            .iter()
            .map(|m| (m.seq(), m.stamp().map(|s| s.offset)))
            .collect();
        assert_eq!(places, [(1, Some(1)), (0, None), (2, Some(2))]);
        assert_eq!(history.read("channel:n", 0, 10).unwrap().entries.len(), 2);
        assert!(history.read("user:u", 0, 10).is_none());
    }

    #[test]
    fn a_join_replays_what_follows_its_position_up_to_what_the_reactor_applied() {
        let history = kept_channels();
        let sent: Vec<Arc<Message>> = (1..=4)
            .map(|i| {
                let m = Message::new(Target::Channel("n".into()), false, i.to_string().as_bytes());
                history.append(m, |_| {})
            })
            .collect();
        let epoch = history.epoch("channel:n").unwrap();
        let at = |offset| Position {
            stream: "channel:n".into(),
            epoch: epoch.to_string(),
            offset,
        };
        let mut out = Vec::new();
        assert!(history
            .recover_join(&at(1), None, sent[2].seq(), Encoding::Envelope, &mut out)
            .is_none());
        let payloads: Vec<&[u8]> = out.iter().map(|m| m.payload()).collect();
        assert_eq!(payloads, [b"2", b"3"], "offset 4 is still in the mailbox");
        out.clear();
        let resync =
            history.recover_join(&at(9), None, sent[3].seq(), Encoding::Envelope, &mut out);
        assert!(out.is_empty());
        let resync: serde_json::Value =
            serde_json::from_slice(envelope::frame_payload(resync.unwrap().bytes())).unwrap();
        assert_eq!(resync["type"], "resync");
        assert_eq!(resync["o"], 4);
        let other = Position {
            stream: "user:u".into(),
            epoch: String::new(),
            offset: 0,
        };
        assert!(
            history
                .recover_join(&other, None, 9, Encoding::Envelope, &mut out)
                .is_none(),
            "kind without history"
        );
        assert!(history.epoch("channel:none").is_none());
    }

    #[test]
    fn opting_in() {
        assert!(wants_envelopes("recover=1", None));
        assert!(wants_envelopes("token=x&since=all@E:1", None));
        assert!(wants_envelopes("", Some("chat, densepush.v1")));
        assert!(!wants_envelopes("recover=0", Some("chat")));
        assert!(!wants_envelopes("user=1", None));
    }

    fn settings(user: bool, channel: bool, size: usize) -> Settings {
        Settings {
            user,
            channel,
            all: false,
            limits: Limits {
                size,
                ttl_ms: 3_600_000,
                max_bytes: 1 << 20,
            },
        }
    }

    fn replay(h: &History, stream: &str, epoch: &str, after: u64, seq: u64) -> Vec<bytes::Bytes> {
        let channels = vec!["news".to_string()];
        let reader = Reader {
            user: "42",
            client: None,
            channels: &channels,
        };
        let position = Position {
            stream: stream.into(),
            epoch: epoch.into(),
            offset: after,
        };
        let mut out = Vec::new();
        h.recover(
            &[position],
            reader,
            seq,
            Encoding::Envelope,
            &Default::default(),
            &mut out,
        );
        out.iter().map(|f| f.bytes().clone()).collect()
    }

    #[test]
    fn a_history_moved_to_a_successor_replays_the_same_and_continues_its_sequence() {
        let old = History::new(settings(true, true, 100));
        for i in 0..5 {
            old.append(
                Message::new(Target::User("42".into()), false, format!("u{i}").as_bytes()),
                |_| {},
            );
            old.append(
                Message::new(Target::Channel("news".into()), true, &[i]),
                |_| {},
            );
        }
        let epoch = old.read("user:42", 0, 10).unwrap().epoch.to_string();
        let mut w = Writer::new();
        old.snapshot(&mut w);
        let bytes = w.take();

        let (new, last) = History::restore(
            settings(true, true, 100),
            &mut snapshot::Reader::new(&bytes),
        )
        .unwrap();
        assert_eq!(last, 10);
        assert_eq!(new.last_seq(), 10);
        assert_eq!(
            replay(&new, "user:42", &epoch, 2, last),
            replay(&old, "user:42", &epoch, 2, last)
        );
        assert_eq!(replay(&new, "user:42", &epoch, 2, last).len(), 3);
        // The successor's next stored message continues the offsets and the sequence.
        let next = new.append(
            Message::new(Target::User("42".into()), false, b"u5"),
            |_| {},
        );
        assert_eq!(next.seq(), 11);
        assert_eq!(new.read("user:42", 5, 10).unwrap().entries[0].offset, 6);
    }

    #[test]
    fn a_successor_keeping_less_history_drops_and_evicts_what_it_does_not_keep() {
        let old = History::new(settings(true, true, 100));
        for i in 0..5 {
            old.append(
                Message::new(Target::User("42".into()), false, format!("u{i}").as_bytes()),
                |_| {},
            );
            old.append(
                Message::new(Target::Channel("news".into()), false, b"c"),
                |_| {},
            );
        }
        let mut w = Writer::new();
        old.snapshot(&mut w);
        let bytes = w.take();
        let (new, _) =
            History::restore(settings(true, false, 2), &mut snapshot::Reader::new(&bytes)).unwrap();
        assert!(
            new.read("channel:news", 0, 10).is_none(),
            "channel history is off here"
        );
        let page = new.read("user:42", 0, 10).unwrap();
        assert_eq!(page.entries.len(), 2, "size 2 here");
        assert_eq!(page.last, 5);
    }

    #[test]
    fn a_damaged_history_snapshot_is_refused() {
        let old = History::new(settings(true, true, 100));
        old.append(Message::new(Target::User("42".into()), false, b"x"), |_| {});
        let mut w = Writer::new();
        old.snapshot(&mut w);
        let bytes = w.take();
        for cut in [0, 5, bytes.len() / 2, bytes.len() - 1] {
            assert!(History::restore(
                settings(true, true, 100),
                &mut snapshot::Reader::new(&bytes[..cut])
            )
            .is_err());
        }
    }
}
