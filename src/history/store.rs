//! The history store: the recent messages of every stream, inside one global byte budget. Sans-IO: the
//! caller passes the time (`now_ms`, any monotonic milliseconds) and the randomness seed.
//!
//! Owns offsets (per stream, from 1, no gaps), epochs, the publish sequence (one counter over all streams, so a
//! reactor can tell which stored messages it has already delivered live), eviction (per-stream `size`, `ttl`,
//! and the global `max_bytes`, oldest message of any stream first) and the counters behind `/metrics`. Does not
//! own what it stores (any [`Stored`] item the caller builds once it knows the message's place: the node stores
//! `message::Message`s, the unit tests plain `Bytes`), framing, delivery or locking.
//!
//! Memory: a stream is kept only while it holds messages; when its last message is evicted the stream is
//! forgotten, and its next message starts a new epoch (so a client positioned in it gets a `resync`, never a
//! silent gap). Each message costs what its item reports ([`Stored::cost`], recorded when it is appended so the
//! count stays exact whatever the item does later) plus a fixed overhead, all counted in `bytes()`.

use crate::message::envelope::{Position, Stamp};
use crate::snapshot::{Reader, SnapshotError, Writer};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What the store can hold: anything that can say how many heap bytes it holds.
pub trait Stored: Clone {
    /// Bytes it holds, charged against `max_bytes` when it is appended.
    fn cost(&self) -> usize;
}

impl Stored for Bytes {
    fn cost(&self) -> usize {
        self.len()
    }
}
/// Bytes charged per stream on top of its name: the record, its hash-map slot, the epoch.
pub const STREAM_OVERHEAD: usize = std::mem::size_of::<Stream<()>>() + 48 + EPOCH_LEN;
/// Characters in an epoch.
pub const EPOCH_LEN: usize = 8;

const EPOCH_ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// What the store keeps, per stream and globally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages kept per stream (at least 1).
    pub size: usize,
    /// Milliseconds a message is kept.
    pub ttl_ms: u64,
    /// Bytes all streams together may use.
    pub max_bytes: usize,
}

/// Why a message left the store before anyone asked for it to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The stream held `size` newer messages.
    Size = 0,
    /// Older than `ttl`.
    Ttl = 1,
    /// The global `max_bytes` budget was reached.
    Bytes = 2,
}

/// Labels of [`Reason`] for `/metrics`, by discriminant.
pub const REASON_LABELS: [&str; 3] = ["size", "ttl", "bytes"];

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages evicted, by [`Reason`].
    pub evicted: [u64; 3],
    /// Recoveries that replayed (possibly zero messages: the client had everything).
    pub recoveries: u64,
    /// Messages sent as replay.
    pub replayed: u64,
    /// Resync notices.
    pub resyncs: u64,
}

/// One stored message.
#[derive(Debug, Clone)]
pub struct Entry<T> {
    /// Offset in its stream.
    pub offset: u64,
    /// Publish sequence number, over all streams.
    pub seq: u64,
    /// When it was stored.
    pub at_ms: u64,
    /// The client token it was published to (`user` streams only), or `None` for the whole stream.
    pub client: Option<Arc<str>>,
    /// What the caller stored.
    pub item: T,
    /// Bytes charged for it, fixed when it was appended.
    cost: usize,
}

impl<T> Entry<T> {
    /// Bytes charged per stored message on top of its item's own cost: the entry, its slot in the global
    /// queue, slack.
    pub const OVERHEAD: usize =
        std::mem::size_of::<Entry<T>>() + std::mem::size_of::<Queued>() + 16;
}

/// Where the store put a message, handed to the caller so it can build the item to store.
#[derive(Debug, Clone, Copy)]
pub struct Slot<'a> {
    /// The stream's epoch.
    pub epoch: &'a Arc<str>,
    /// The message's offset.
    pub offset: u64,
    /// Its publish sequence number (0 for a backfilled message: see [`Store::append_stamped`]).
    pub seq: u64,
}

impl<'a> Slot<'a> {
    /// Its epoch and offset.
    pub fn stamp(&self) -> Stamp<'a> {
        Stamp {
            epoch: self.epoch,
            offset: self.offset,
        }
    }
}

#[derive(Debug)]
struct Stream<T> {
    /// Tells a stream from an earlier one of the same name in the global queue.
    id: u64,
    epoch: Arc<str>,
    /// Last offset assigned.
    last: u64,
    /// Offsets `last - len + 1 ..= last`, contiguous: eviction only ever takes the front.
    entries: VecDeque<Entry<T>>,
}

#[derive(Debug)]
struct Queued {
    stream: Arc<str>,
    id: u64,
    offset: u64,
    at_ms: u64,
}

/// The outcome of asking for what a client missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// These many messages were appended to the output, in order; the rest will come live.
    Replayed(usize),
    /// The position cannot be served: the client must refetch. `epoch` is empty when the stream has no history.
    Resync {
        /// The stream's current epoch.
        epoch: Arc<str>,
        /// The last offset the connection will not receive live.
        offset: u64,
    },
}

/// The result of storing a message.
#[derive(Debug, Clone)]
pub struct Appended<T> {
    /// Its publish sequence number.
    pub seq: u64,
    /// Its offset.
    pub offset: u64,
    /// The item the caller built for it (still returned when the limits evicted it at once).
    pub item: T,
}

/// Messages of a stream, for the admin API.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The stream's epoch.
    pub epoch: Arc<str>,
    /// First offset held.
    pub first: u64,
    /// Last offset assigned.
    pub last: u64,
    /// Messages after the asked offset, oldest first.
    pub entries: Vec<Entry<T>>,
}

/// The store.
#[derive(Debug)]
pub struct Store<T> {
    limits: Limits,
    streams: HashMap<Arc<str>, Stream<T>>,
    /// Every stored message in publish order; entries whose message already left by size are skipped lazily.
    queue: VecDeque<Queued>,
    bytes: usize,
    messages: usize,
    next_seq: u64,
    next_id: u64,
    rng: u64,
    counters: Counters,
}

impl<T: Stored> Store<T> {
    /// An empty store; `seed` drives epoch generation (pass something that differs between runs).
    pub fn new(limits: Limits, seed: u64) -> Store<T> {
        debug_assert!(limits.size >= 1);
        Store {
            limits,
            streams: HashMap::new(),
            queue: VecDeque::new(),
            bytes: 0,
            messages: 0,
            next_seq: 1,
            next_id: 1,
            // xorshift must not start at 0.
            rng: seed | 1,
            counters: Counters::default(),
        }
    }

    /// Bytes used, overheads included.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Messages held.
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// Streams held.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// The sequence number of the last message stored live (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Counters since start.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Stores a message: assigns the stream's next offset and the next publish sequence number, asks `make`
    /// for the item to keep (which may carry the epoch, offset and sequence), then evicts what the limits
    /// require — possibly this very message, when it alone exceeds `max_bytes`.
    pub fn append(
        &mut self,
        stream: &str,
        client: Option<&str>,
        now_ms: u64,
        make: impl FnOnce(Slot<'_>) -> T,
    ) -> Appended<T> {
        self.append_inner(stream, None, true, client, now_ms, make)
    }

    /// Stores a message whose epoch and offset were assigned elsewhere (by Redis, in a cluster). Anything but
    /// the stream's next offset in its epoch — a new epoch, or a gap (messages this node never received) —
    /// restarts the stream from this message, so positions before it get a resync instead of a silent hole.
    ///
    /// A `live` message is on its way to the reactors and gets the next sequence number; a backfilled one
    /// (fetched from the shared log, never delivered live here) gets sequence 0, which every reactor counts as
    /// applied, so it is replayed and never expected live.
    pub fn append_stamped(
        &mut self,
        stream: &str,
        stamp: Stamp<'_>,
        live: bool,
        client: Option<&str>,
        now_ms: u64,
        make: impl FnOnce(Slot<'_>) -> T,
    ) -> Appended<T> {
        self.expire(now_ms);
        let restart = self.streams.get(stream).map(|s| {
            *s.epoch != *stamp.epoch || stamp.offset <= s.last || stamp.offset > s.last + 1
        });
        if restart == Some(true) {
            self.delete(stream);
        }
        self.append_inner(stream, Some(stamp), live, client, now_ms, make)
    }

    /// The first offset before `stamp` this store lacks and could hold (within `size`), when a stamped message
    /// arrives: what a node that missed messages should fetch from the shared log first. `None` if nothing is
    /// missing.
    pub fn missing_before(&self, stream: &str, stamp: Stamp<'_>) -> Option<u64> {
        let next = match self.streams.get(stream) {
            Some(s) if *s.epoch == *stamp.epoch => s.last + 1,
            _ => 1,
        };
        let window = stamp
            .offset
            .saturating_sub(self.limits.size as u64 - 1)
            .max(1);
        let from = next.max(window);
        (from < stamp.offset).then_some(from)
    }

    fn append_inner(
        &mut self,
        stream: &str,
        stamp: Option<Stamp<'_>>,
        live: bool,
        client: Option<&str>,
        now_ms: u64,
        make: impl FnOnce(Slot<'_>) -> T,
    ) -> Appended<T> {
        self.expire(now_ms);
        if !self.streams.contains_key(stream) {
            let epoch = match stamp {
                Some(stamp) => Arc::from(stamp.epoch),
                None => self.new_epoch(),
            };
            let id = self.next_id;
            self.next_id += 1;
            self.bytes += stream.len() + STREAM_OVERHEAD;
            self.streams.insert(
                stream.into(),
                Stream {
                    id,
                    epoch,
                    last: stamp.map_or(0, |s| s.offset.saturating_sub(1)),
                    entries: VecDeque::new(),
                },
            );
        }
        let (name, s) = self
            .streams
            .get_key_value(stream)
            .map(|(k, _)| k.clone())
            .zip(self.streams.get_mut(stream))
            .expect("inserted above");
        s.last += 1;
        debug_assert!(stamp.is_none_or(|st| st.offset == s.last));
        let offset = s.last;
        let seq = if live { self.next_seq } else { 0 };
        self.next_seq += u64::from(live);
        let item = make(Slot {
            epoch: &s.epoch,
            offset,
            seq,
        });
        let client: Option<Arc<str>> = client.map(Arc::from);
        let cost = item.cost() + client.as_ref().map_or(0, |c| c.len()) + Entry::<T>::OVERHEAD;
        let entry = Entry {
            offset,
            seq,
            at_ms: now_ms,
            client,
            item: item.clone(),
            cost,
        };
        self.bytes += entry.cost;
        self.messages += 1;
        s.entries.push_back(entry);
        self.queue.push_back(Queued {
            stream: name,
            id: s.id,
            offset,
            at_ms: now_ms,
        });
        let mut freed = 0;
        let mut dropped = 0;
        while s.entries.len() > self.limits.size {
            let old = s.entries.pop_front().expect("longer than size >= 1");
            freed += old.cost;
            dropped += 1;
        }
        self.bytes -= freed;
        self.messages -= dropped;
        self.counters.evicted[Reason::Size as usize] += dropped as u64;
        self.evict_to_budget();
        self.compact_queue();
        debug_assert!(self.bytes <= self.limits.max_bytes || self.messages == 0);
        Appended { seq, offset, item }
    }

    /// Appends to `out` the items of the messages a connection positioned at `position` missed, among those
    /// with a sequence number up to `applied_seq` (those the caller has already delivered live to other
    /// connections; later ones will reach this connection live). Messages published to another client token
    /// than `client` are skipped. A position that cannot be served exactly gets [`Recovery::Resync`].
    pub fn recover(
        &mut self,
        position: &Position,
        client: Option<&str>,
        applied_seq: u64,
        now_ms: u64,
        out: &mut Vec<T>,
    ) -> Recovery {
        self.expire(now_ms);
        let Some(s) = self.streams.get(position.stream.as_str()) else {
            self.counters.resyncs += 1;
            return Recovery::Resync {
                epoch: Arc::from(""),
                offset: 0,
            };
        };
        // The tail the caller has not applied yet is contiguous: sequence numbers grow with offsets.
        let pending = s
            .entries
            .iter()
            .rev()
            .take_while(|e| e.seq > applied_seq)
            .count() as u64;
        let applied_last = s.last - pending;
        let first = s.entries.front().map_or(s.last + 1, |e| e.offset);
        let resync = position.epoch != *s.epoch
            || position.offset > applied_last
            // Something after the position has been evicted.
            || position.offset + 1 < first;
        if resync {
            self.counters.resyncs += 1;
            return Recovery::Resync {
                epoch: s.epoch.clone(),
                offset: applied_last,
            };
        }
        let before = out.len();
        out.extend(
            s.entries
                .iter()
                .filter(|e| e.offset > position.offset && e.seq <= applied_seq)
                .filter(|e| e.client.as_deref().is_none_or(|c| Some(c) == client))
                .map(|e| e.item.clone()),
        );
        let replayed = out.len() - before;
        self.counters.recoveries += 1;
        self.counters.replayed += replayed as u64;
        Recovery::Replayed(replayed)
    }

    /// Up to `limit` messages after offset `since`, for the admin API; `None` when the stream holds none.
    pub fn read(&mut self, stream: &str, since: u64, limit: usize, now_ms: u64) -> Option<Page<T>> {
        self.expire(now_ms);
        let s = self.streams.get(stream)?;
        Some(Page {
            epoch: s.epoch.clone(),
            first: s.entries.front().map_or(s.last + 1, |e| e.offset),
            last: s.last,
            entries: s
                .entries
                .iter()
                .filter(|e| e.offset > since)
                .take(limit)
                .cloned()
                .collect(),
        })
    }

    /// Forgets a stream (its next message starts a new epoch); false if it held nothing.
    pub fn delete(&mut self, stream: &str) -> bool {
        let Some((name, s)) = self.streams.remove_entry(stream) else {
            return false;
        };
        self.bytes -=
            name.len() + STREAM_OVERHEAD + s.entries.iter().map(|e| e.cost).sum::<usize>();
        self.messages -= s.entries.len();
        self.compact_queue();
        true
    }

    /// The names of the streams held.
    pub fn stream_names(&self) -> Vec<Arc<str>> {
        self.streams.keys().cloned().collect()
    }

    /// Forgets every stream, e.g. when messages may have been missed (every epoch changes).
    pub fn clear(&mut self) {
        self.streams.clear();
        self.queue.clear();
        self.bytes = 0;
        self.messages = 0;
    }

    /// Evicts messages older than the TTL; the queue is in publish order, so they are at its front.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(q) = self.queue.front() {
            if q.at_ms.saturating_add(self.limits.ttl_ms) > now_ms {
                break;
            }
            self.pop_queued(Reason::Ttl);
        }
    }

    /// Writes every stream and stored message, and the publish sequence, for a successor process (the live
    /// upgrade). Times are written as ages (`now_ms` minus when stored), since the two processes' clocks start
    /// at different moments; `item` writes each stored item.
    pub fn snapshot(&self, now_ms: u64, w: &mut Writer, item: impl Fn(&T, &mut Writer)) {
        w.u64(self.next_seq);
        let names: Vec<&Arc<str>> = self.streams.keys().collect();
        w.u32(names.len() as u32);
        for name in &names {
            let s = &self.streams[*name];
            w.str(name);
            w.str(&s.epoch);
            w.u64(s.last);
            w.u32(s.entries.len() as u32);
            for e in &s.entries {
                w.u64(e.offset);
                w.u64(e.seq);
                w.u64(now_ms.saturating_sub(e.at_ms));
                w.opt_str(e.client.as_deref());
                item(&e.item, w);
            }
        }
        // The global queue in publish order, so eviction stays oldest-first: (stream index, offset) of every
        // entry still stored.
        let index: HashMap<&str, u32> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (&***n, i as u32))
            .collect();
        let live: Vec<(u32, u64)> = self
            .queue
            .iter()
            .filter(|q| {
                self.streams.get(&q.stream).is_some_and(|s| {
                    s.id == q.id && s.entries.front().is_some_and(|e| e.offset <= q.offset)
                })
            })
            .map(|q| (index[&*q.stream], q.offset))
            .collect();
        w.u32(live.len() as u32);
        for (stream, offset) in live {
            w.u32(stream);
            w.u64(offset);
        }
    }

    /// A store written by [`Store::snapshot`], under this process's `limits` (which may be smaller than the
    /// predecessor's: what does not fit is evicted as usual). `item` reads each stored item; it is told the
    /// item's stream, epoch, offset and sequence.
    pub fn restore(
        limits: Limits,
        seed: u64,
        now_ms: u64,
        r: &mut Reader<'_>,
        item: impl Fn(&mut Reader<'_>, &str, Slot<'_>) -> Result<T, SnapshotError>,
    ) -> Result<Store<T>, SnapshotError> {
        let mut store = Store::new(limits, seed);
        store.next_seq = r.u64("history sequence")?.max(1);
        let count = r.u32("history streams")?;
        let mut names: Vec<Arc<str>> = Vec::new();
        for _ in 0..count {
            let name: Arc<str> = Arc::from(r.str("stream name")?);
            let epoch: Arc<str> = Arc::from(r.str("stream epoch")?);
            let last = r.u64("stream last offset")?;
            let entries = r.u32("stream entries")?;
            let id = store.next_id;
            store.next_id += 1;
            let mut stream = Stream {
                id,
                epoch: epoch.clone(),
                last,
                entries: VecDeque::new(),
            };
            for _ in 0..entries {
                let offset = r.u64("entry offset")?;
                let seq = r.u64("entry sequence")?;
                let at_ms = now_ms.saturating_sub(r.u64("entry age")?);
                let client: Option<Arc<str>> = r.opt_str("entry client")?.map(Arc::from);
                let slot = Slot {
                    epoch: &epoch,
                    offset,
                    seq,
                };
                let item = item(r, &name, slot)?;
                let cost =
                    item.cost() + client.as_ref().map_or(0, |c| c.len()) + Entry::<T>::OVERHEAD;
                if seq >= store.next_seq || offset > last {
                    return Err(SnapshotError::Invalid("history entry"));
                }
                store.bytes += cost;
                store.messages += 1;
                stream.entries.push_back(Entry {
                    offset,
                    seq,
                    at_ms,
                    client,
                    item,
                    cost,
                });
            }
            store.bytes += name.len() + STREAM_OVERHEAD;
            store.streams.insert(name.clone(), stream);
            names.push(name);
        }
        let queued = r.u32("history queue")?;
        for _ in 0..queued {
            let name = names
                .get(r.u32("queued stream")? as usize)
                .ok_or(SnapshotError::Invalid("queued stream"))?
                .clone();
            let offset = r.u64("queued offset")?;
            let s = &store.streams[&name];
            let at_ms = s
                .entries
                .iter()
                .find(|e| e.offset == offset)
                .ok_or(SnapshotError::Invalid("queued offset"))?
                .at_ms;
            store.queue.push_back(Queued {
                stream: name,
                id: s.id,
                offset,
                at_ms,
            });
        }
        // This process's limits rule from now on.
        store.expire(now_ms);
        for s in store.streams.values_mut() {
            while s.entries.len() > limits.size {
                let old = s.entries.pop_front().expect("longer than size");
                store.bytes -= old.cost;
                store.messages -= 1;
            }
        }
        store.evict_to_budget();
        store.compact_queue();
        Ok(store)
    }

    fn evict_to_budget(&mut self) {
        while self.bytes > self.limits.max_bytes && !self.queue.is_empty() {
            self.pop_queued(Reason::Bytes);
        }
    }

    /// Removes the oldest queued message if it is still stored, and its stream if that was its last message.
    fn pop_queued(&mut self, reason: Reason) {
        let Some(q) = self.queue.pop_front() else {
            return;
        };
        let Some(s) = self.streams.get_mut(&q.stream) else {
            return;
        };
        if s.id != q.id || s.entries.front().is_none_or(|e| e.offset != q.offset) {
            return; // already gone (size eviction or delete)
        }
        let entry = s.entries.pop_front().expect("front checked");
        self.bytes -= entry.cost;
        self.messages -= 1;
        self.counters.evicted[reason as usize] += 1;
        if s.entries.is_empty() {
            self.streams.remove(&q.stream);
            self.bytes -= q.stream.len() + STREAM_OVERHEAD;
        }
    }

    /// Drops queue slots of messages already gone once they outnumber the live ones, so the queue stays
    /// proportional to what is stored (amortised O(1) per message).
    fn compact_queue(&mut self) {
        if self.queue.len() <= 2 * self.messages + 64 {
            return;
        }
        let streams = &self.streams;
        self.queue.retain(|q| {
            streams.get(&q.stream).is_some_and(|s| {
                s.id == q.id && s.entries.front().is_some_and(|e| e.offset <= q.offset)
            })
        });
    }

    /// A new random epoch, for a stream whose epoch is assigned elsewhere (Redis).
    pub fn fresh_epoch(&mut self) -> Arc<str> {
        self.new_epoch()
    }

    fn new_epoch(&mut self) -> Arc<str> {
        let mut epoch = String::with_capacity(EPOCH_LEN);
        for _ in 0..EPOCH_LEN {
            // xorshift64*: plenty for epochs, which only need to differ between a stream's lifetimes.
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
            epoch.push(EPOCH_ALPHABET[(r >> 58) as usize % EPOCH_ALPHABET.len()] as char);
        }
        epoch.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: Limits = Limits {
        size: 1000,
        ttl_ms: 1_000_000,
        max_bytes: 1 << 30,
    };

    fn push(
        store: &mut Store<Bytes>,
        stream: &str,
        client: Option<&str>,
        at: u64,
    ) -> Appended<Bytes> {
        store.append(stream, client, at, |stamp| {
            Bytes::from(format!("{}@{}", stamp.offset, stamp.epoch))
        })
    }

    fn epoch_of(store: &mut Store<Bytes>, stream: &str) -> String {
        store.read(stream, 0, 0, 0).unwrap().epoch.to_string()
    }

    fn pos(stream: &str, epoch: &str, offset: u64) -> Position {
        Position {
            stream: stream.into(),
            epoch: epoch.into(),
            offset,
        }
    }

    fn offsets(out: &[Bytes]) -> Vec<u64> {
        out.iter()
            .map(|f| {
                let text = std::str::from_utf8(f).unwrap();
                text.split('@').next().unwrap().parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn offsets_count_from_one_per_stream_without_gaps() {
        let mut s = Store::new(BIG, 7);
        assert_eq!(push(&mut s, "user:1", None, 0).offset, 1);
        assert_eq!(push(&mut s, "user:2", None, 0).offset, 1);
        assert_eq!(push(&mut s, "user:1", None, 0).offset, 2);
        let seqs: Vec<u64> = (0..3).map(|_| push(&mut s, "all", None, 0).seq).collect();
        assert_eq!(seqs, [4, 5, 6]);
    }

    #[test]
    fn epochs_are_eight_alphanumerics_and_differ_between_streams() {
        let mut s = Store::new(BIG, 7);
        push(&mut s, "a", None, 0);
        push(&mut s, "b", None, 0);
        let (a, b) = (epoch_of(&mut s, "a"), epoch_of(&mut s, "b"));
        assert_eq!(a.len(), EPOCH_LEN);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn recovery_replays_exactly_what_follows_the_position() {
        let mut s = Store::new(BIG, 1);
        for _ in 0..10 {
            push(&mut s, "user:1", None, 0);
        }
        let epoch = epoch_of(&mut s, "user:1");
        let mut out = Vec::new();
        let r = s.recover(&pos("user:1", &epoch, 4), None, u64::MAX, 0, &mut out);
        assert_eq!(r, Recovery::Replayed(6));
        assert_eq!(offsets(&out), [5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn recovery_stops_at_what_the_caller_has_applied() {
        let mut s = Store::new(BIG, 1);
        let seqs: Vec<u64> = (0..5)
            .map(|_| push(&mut s, "user:1", None, 0).seq)
            .collect();
        let epoch = epoch_of(&mut s, "user:1");
        let mut out = Vec::new();
        s.recover(&pos("user:1", &epoch, 1), None, seqs[2], 0, &mut out);
        assert_eq!(offsets(&out), [2, 3]);
    }

    #[test]
    fn client_tagged_messages_replay_only_to_that_client() {
        let mut s = Store::new(BIG, 1);
        push(&mut s, "user:1", None, 0);
        push(&mut s, "user:1", Some("phone"), 0);
        push(&mut s, "user:1", Some("laptop"), 0);
        let epoch = epoch_of(&mut s, "user:1");
        let mut phone = Vec::new();
        s.recover(
            &pos("user:1", &epoch, 0),
            Some("phone"),
            u64::MAX,
            0,
            &mut phone,
        );
        assert_eq!(offsets(&phone), [1, 2]);
        let mut bare = Vec::new();
        s.recover(&pos("user:1", &epoch, 0), None, u64::MAX, 0, &mut bare);
        assert_eq!(offsets(&bare), [1]);
    }

    #[test]
    fn unknown_epoch_gets_resync_with_current_epoch_and_offset() {
        let mut s = Store::new(BIG, 1);
        push(&mut s, "user:1", None, 0);
        push(&mut s, "user:1", None, 0);
        let epoch = epoch_of(&mut s, "user:1");
        let mut out = Vec::new();
        let r = s.recover(&pos("user:1", "nope", 1), None, u64::MAX, 0, &mut out);
        assert_eq!(
            r,
            Recovery::Resync {
                epoch: epoch.into(),
                offset: 2
            }
        );
        assert!(out.is_empty());
        assert_eq!(s.counters().resyncs, 1);
    }

    #[test]
    fn position_evicted_by_size_gets_resync() {
        let mut s = Store::new(Limits { size: 3, ..BIG }, 1);
        for _ in 0..5 {
            push(&mut s, "c", None, 0);
        }
        let epoch = epoch_of(&mut s, "c");
        let mut out = Vec::new();
        assert!(matches!(
            s.recover(&pos("c", &epoch, 1), None, u64::MAX, 0, &mut out),
            Recovery::Resync { offset: 5, .. }
        ));
        // Offset 2 is the last one evicted: everything after it is still there.
        assert_eq!(
            s.recover(&pos("c", &epoch, 2), None, u64::MAX, 0, &mut out),
            Recovery::Replayed(3)
        );
        assert_eq!(s.counters().evicted[Reason::Size as usize], 2);
        assert_eq!(s.messages(), 3);
    }

    #[test]
    fn expired_messages_are_evicted_and_their_positions_resync() {
        let mut s = Store::new(Limits { ttl_ms: 100, ..BIG }, 1);
        push(&mut s, "c", None, 0);
        let epoch = epoch_of(&mut s, "c");
        push(&mut s, "c", None, 50);
        let mut out = Vec::new();
        // At 120 the first message (t=0) is gone, the second (t=50) is not.
        assert!(matches!(
            s.recover(&pos("c", &epoch, 0), None, u64::MAX, 120, &mut out),
            Recovery::Resync { .. }
        ));
        assert_eq!(
            s.recover(&pos("c", &epoch, 1), None, u64::MAX, 120, &mut out),
            Recovery::Replayed(1)
        );
        assert_eq!(s.counters().evicted[Reason::Ttl as usize], 1);
    }

    #[test]
    fn a_stream_whose_messages_all_expired_is_forgotten_and_restarts_with_a_new_epoch() {
        let mut s = Store::new(Limits { ttl_ms: 100, ..BIG }, 1);
        push(&mut s, "c", None, 0);
        let old = epoch_of(&mut s, "c");
        s.expire(200);
        assert_eq!((s.streams(), s.messages(), s.bytes()), (0, 0, 0));
        let again = push(&mut s, "c", None, 200);
        assert_eq!(again.offset, 1);
        assert_ne!(epoch_of(&mut s, "c"), old);
    }

    #[test]
    fn global_budget_evicts_oldest_messages_of_any_stream_first() {
        let one = {
            let mut s = Store::new(BIG, 1);
            push(&mut s, "s0", None, 0);
            s.bytes()
        };
        // Room for about three single-message streams.
        let mut s = Store::new(
            Limits {
                max_bytes: one * 3 + one / 2,
                ..BIG
            },
            1,
        );
        for i in 0..10 {
            push(&mut s, &format!("s{i}"), None, i);
            assert!(s.bytes() <= s.limits().max_bytes);
        }
        assert_eq!(s.streams(), 3);
        assert!(s.read("s9", 0, 10, 10).is_some());
        assert!(s.read("s0", 0, 10, 10).is_none());
        assert_eq!(s.counters().evicted[Reason::Bytes as usize], 7);
    }

    #[test]
    fn a_message_larger_than_the_budget_is_not_kept() {
        let mut s = Store::new(
            Limits {
                max_bytes: 100,
                ..BIG
            },
            1,
        );
        s.append("c", None, 0, |_| Bytes::from(vec![0u8; 500]));
        assert_eq!((s.streams(), s.messages(), s.bytes()), (0, 0, 0));
    }

    #[test]
    fn delete_forgets_the_stream_and_its_bytes() {
        let mut s = Store::new(BIG, 1);
        push(&mut s, "a", None, 0);
        push(&mut s, "b", None, 0);
        let bytes_b = {
            let mut t = Store::new(BIG, 1);
            push(&mut t, "b", None, 0);
            t.bytes()
        };
        assert!(s.delete("a"));
        assert!(!s.delete("a"));
        assert_eq!(s.bytes(), bytes_b);
        assert_eq!(push(&mut s, "a", None, 0).offset, 1);
    }

    #[test]
    fn queue_stays_proportional_to_stored_messages() {
        let mut s = Store::new(Limits { size: 2, ..BIG }, 1);
        for _ in 0..10_000 {
            push(&mut s, "hot", None, 0);
        }
        assert_eq!(s.messages(), 2);
        assert!(s.queue.len() <= 2 * s.messages() + 65, "{}", s.queue.len());
    }

    #[test]
    fn read_pages_after_an_offset() {
        let mut s = Store::new(BIG, 1);
        for _ in 0..5 {
            push(&mut s, "c", Some("x"), 0);
        }
        let page = s.read("c", 2, 2, 0).unwrap();
        assert_eq!((page.first, page.last), (1, 5));
        let got: Vec<u64> = page.entries.iter().map(|e| e.offset).collect();
        assert_eq!(got, [3, 4]);
        assert_eq!(page.entries[0].client.as_deref(), Some("x"));
    }

    fn push_stamped(
        store: &mut Store<Bytes>,
        stream: &str,
        epoch: &str,
        offset: u64,
    ) -> Appended<Bytes> {
        store.append_stamped(stream, Stamp { epoch, offset }, true, None, 0, |stamp| {
            Bytes::from(format!("{}@{}", stamp.offset, stamp.epoch))
        })
    }

    #[test]
    fn stamped_messages_keep_the_given_epoch_and_offsets() {
        let mut s = Store::new(BIG, 1);
        push_stamped(&mut s, "c", "REDIS1", 41);
        push_stamped(&mut s, "c", "REDIS1", 42);
        let page = s.read("c", 0, 10, 0).unwrap();
        assert_eq!((&*page.epoch, page.first, page.last), ("REDIS1", 41, 42));
        let mut out = Vec::new();
        assert_eq!(
            s.recover(&pos("c", "REDIS1", 41), None, u64::MAX, 0, &mut out),
            Recovery::Replayed(1)
        );
        // The messages before 41 were never seen here: resync, not a silent gap.
        assert!(matches!(
            s.recover(&pos("c", "REDIS1", 39), None, u64::MAX, 0, &mut out),
            Recovery::Resync { .. }
        ));
    }

    #[test]
    fn a_gap_in_stamped_offsets_drops_what_came_before_it() {
        let mut s = Store::new(BIG, 1);
        push_stamped(&mut s, "c", "E", 1);
        push_stamped(&mut s, "c", "E", 2);
        push_stamped(&mut s, "c", "E", 5);
        let page = s.read("c", 0, 10, 0).unwrap();
        assert_eq!((page.first, page.last, page.entries.len()), (5, 5, 1));
        let mut out = Vec::new();
        assert!(matches!(
            s.recover(&pos("c", "E", 2), None, u64::MAX, 0, &mut out),
            Recovery::Resync { offset: 5, .. }
        ));
    }

    #[test]
    fn a_new_stamped_epoch_replaces_the_stream() {
        let mut s = Store::new(BIG, 1);
        push_stamped(&mut s, "c", "OLD", 7);
        push_stamped(&mut s, "c", "NEW", 1);
        let page = s.read("c", 0, 10, 0).unwrap();
        assert_eq!((&*page.epoch, page.first, page.last), ("NEW", 1, 1));
        assert_eq!(s.messages(), 1);
    }

    #[test]
    fn backfilled_messages_replay_before_the_live_one_that_revealed_the_gap() {
        let mut s = Store::new(BIG, 1);
        let live = push_stamped(&mut s, "c", "E", 3);
        assert_eq!(
            s.missing_before(
                "c",
                Stamp {
                    epoch: "E",
                    offset: 7
                }
            ),
            Some(4)
        );
        for offset in 4..7 {
            let b = s.append_stamped("c", Stamp { epoch: "E", offset }, false, None, 0, |st| {
                Bytes::from(format!("{}@{}", st.offset, st.epoch))
            });
            assert_eq!(b.seq, 0);
        }
        let seven = push_stamped(&mut s, "c", "E", 7);
        let mut out = Vec::new();
        // A reactor that has applied offset 3 but not yet 7: 4..6 are replayed, 7 will come live.
        assert_eq!(
            s.recover(&pos("c", "E", 3), None, live.seq, 0, &mut out),
            Recovery::Replayed(3)
        );
        assert_eq!(offsets(&out), [4, 5, 6]);
        out.clear();
        s.recover(&pos("c", "E", 3), None, seven.seq, 0, &mut out);
        assert_eq!(offsets(&out), [4, 5, 6, 7]);
    }

    #[test]
    fn missing_before_looks_back_at_most_size_messages() {
        let s = Store::<Bytes>::new(Limits { size: 10, ..BIG }, 1);
        assert_eq!(
            s.missing_before(
                "c",
                Stamp {
                    epoch: "E",
                    offset: 100
                }
            ),
            Some(91)
        );
        assert_eq!(
            s.missing_before(
                "c",
                Stamp {
                    epoch: "E",
                    offset: 1
                }
            ),
            None
        );
    }

    #[test]
    fn missing_stream_resyncs_with_an_empty_epoch() {
        let mut s = Store::<Bytes>::new(BIG, 1);
        let mut out = Vec::new();
        assert_eq!(
            s.recover(&pos("user:9", "E", 3), None, u64::MAX, 0, &mut out),
            Recovery::Resync {
                epoch: "".into(),
                offset: 0
            }
        );
    }

    /// An item whose own size changes after it is stored, like a message whose lazily built encodings grow.
    #[derive(Debug, Clone)]
    struct Growing(Arc<std::sync::atomic::AtomicUsize>);

    impl Stored for Growing {
        fn cost(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    #[test]
    fn any_stored_item_is_charged_what_it_cost_when_appended() {
        let mut s = Store::new(BIG, 1);
        let size = Arc::new(std::sync::atomic::AtomicUsize::new(100));
        let appended = s.append("c", Some("tab"), 0, |slot| {
            assert_eq!((slot.offset, slot.seq), (1, 1));
            Growing(size.clone())
        });
        assert!(
            Arc::ptr_eq(&appended.item.0, &size),
            "the caller gets its item back"
        );
        let expected = "c".len() + STREAM_OVERHEAD + 100 + "tab".len() + Entry::<Growing>::OVERHEAD;
        assert_eq!(s.bytes(), expected);
        // Growing later changes nothing already counted, and leaving gives back exactly what was charged.
        size.store(5_000, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(s.bytes(), expected);
        assert!(s.delete("c"));
        assert_eq!((s.bytes(), s.messages()), (0, 0));
    }
}
