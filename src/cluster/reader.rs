//! The bus reader thread: applies every bus entry to this node, in bus order, exactly once, without letting any
//! reactor's mailbox pass the pending bound; tells the connections when entries were lost; owns the link state.
//!
//! It reads with `XREAD BLOCK` from the last entry it applied, on a connection of its own, and hands each entry
//! to the one publish path (`publish`) or the reactors' handle (`dispatch`: kicks, gap notices). Which entries
//! to apply, skip or count as lost is `bus::Cursor`'s decision; this file only moves entries, time and errors
//! between Redis and it. The same connection reads shared history for backfill between reads.

use super::bus::{self, BatchSize, Cursor, Gap, Verdict};
use super::wire::{self, Body, Place};
use super::{Backoff, Cluster, StateLog};
use crate::config::redact_url;
use crate::dispatch::MAX_PENDING_COMMANDS;
use crate::history::Backfill;
use crate::message::envelope::Stamp;
use crate::message::missed::Missed;
use crate::message::{stream_of, Target};
use crate::publish::BatchItem;
use std::collections::HashSet;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest an `XREAD BLOCK` waits before the thread checks for shutdown, a handoff and the heartbeat.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Entries asked for per read at most (fewer when entries are large: `bus::BatchSize`). Each entry queues at
/// most one command per mailbox, so this is also how far one read can move a mailbox towards the bound.
const READ_BATCH: usize = 512;
/// How long the reader sleeps while the reactors are too far behind to take another read.
const STALL_SLEEP: Duration = Duration::from_millis(1);

/// One entry of an `XREAD` reply: its id and its flat field/value list.
type Entry = (String, Vec<Vec<u8>>);
/// An `XREAD` reply for one stream: nil on timeout, else `[[key, entries]]`.
type XreadReply = Option<Vec<(String, Vec<Entry>)>>;

/// Starts the reader thread at `cursor`.
pub(super) fn spawn(cluster: Arc<Cluster>, cursor: Cursor) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("cluster-bus".into())
        .spawn(move || run(&cluster, cursor))?;
    Ok(())
}

fn run(cluster: &Cluster, mut cursor: Cursor) {
    let mut backoff = Backoff::new(
        Duration::from_millis(cluster.settings.reconnect_min_ms),
        Duration::from_millis(cluster.settings.reconnect_max_ms),
    );
    let mut state = StateLog(None);
    let mut batch = BatchSize::new(READ_BATCH);
    loop {
        if cluster.stop.load(SeqCst) {
            return;
        }
        if cluster.handoff.requested.load(SeqCst) {
            let mut stopped = cluster
                .handoff
                .stopped_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Checked again under the lock: an upgrade that rolled back may have withdrawn the request
            // (`Cluster::resume_after_hand_over`), and then this reader carries on.
            if cluster.handoff.requested.load(SeqCst) {
                cluster.link.up.store(false, SeqCst);
                *stopped = Some(cursor.position().copied());
                return;
            }
        }
        let error = match connect(cluster) {
            Ok(mut conn) => match read(cluster, &mut conn, &mut cursor, &mut state, &mut batch) {
                Ok(()) => continue, // stopping or handing over: the loop's head decides
                Err(e) => {
                    // Entries were applied on this link: the next failure starts at the floor again.
                    if state.0 == Some(true) {
                        backoff.reset();
                    }
                    e
                }
            },
            Err(e) => e,
        };
        let error = error.to_string();
        cluster.link.up.store(false, SeqCst);
        // Nothing is cleared: the position is kept, and the next link continues from it. A client that
        // recovers here meanwhile gets what this node has applied; the rest reaches it live once the link is
        // back, or it is told, if the gap turns out to be unfillable.
        *cluster
            .link
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = error.clone();
        state.record(false, || {
            format!(
                "cluster link down: {error}; cluster publishes get 503, reconnecting with backoff up to {} ms",
                cluster.settings.reconnect_max_ms
            )
        });
        std::thread::sleep(backoff.next_delay());
    }
}

/// A connection whose reads may block for a whole `XREAD BLOCK` plus the command timeout, to a Redis that can
/// carry the bus.
fn connect(cluster: &Cluster) -> redis::RedisResult<redis::Connection> {
    let mut conn = cluster.connect()?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut conn)?;
    if let Err(why) = supports_the_bus(&info) {
        // The link stays down with this as its reason, which every 503 quotes.
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "unsupported Redis",
            why,
        )));
    }
    conn.set_read_timeout(Some(
        poll_interval(cluster) + Duration::from_millis(cluster.settings.command_timeout_ms),
    ))?;
    let id: u64 = redis::cmd("CLIENT").arg("ID").query(&mut conn)?;
    cluster.handoff.reader_client.store(id, SeqCst);
    Ok(conn)
}

/// Redis 7.0 or later, from `INFO server`: the bus lets Redis number its entries (`XADD {epoch}-*`, new in 7.0).
fn supports_the_bus(info: &str) -> Result<(), String> {
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
        .unwrap_or("unknown");
    let major: Option<u32> = version.split('.').next().and_then(|m| m.parse().ok());
    match major {
        Some(major) if major >= 7 => Ok(()),
        _ => Err(format!(
            "Redis {version}: the cluster bus needs Redis 7.0 or later (it appends with XADD <epoch>-*)"
        )),
    }
}

fn poll_interval(cluster: &Cluster) -> Duration {
    POLL_INTERVAL.min(Duration::from_millis(
        cluster.settings.heartbeat_interval_ms,
    ))
}

/// Resumes from the cursor's position, marks the link up, and applies entries until the connection fails
/// (`Err`) or the node stops or hands over (`Ok`).
fn read(
    cluster: &Cluster,
    conn: &mut redis::Connection,
    cursor: &mut Cursor,
    state: &mut StateLog,
    batch: &mut BatchSize,
) -> redis::RedisResult<()> {
    let mut after = resume(cluster, conn, cursor)?;
    // A new generation makes the admin thread's publisher reconnect: its old connection may be to a Redis
    // that has since restarted.
    cluster.link.generation.fetch_add(1, SeqCst);
    cluster.link.up.store(true, SeqCst);
    cluster.metrics.connects.fetch_add(1, Relaxed);
    state.record(true, || {
        format!(
            "cluster link up: node {} on {} (channel prefix {}), bus position {}",
            cluster.node_id(),
            redact_url(cluster.settings.redis_url.as_deref().unwrap_or("")),
            cluster.settings.channel_prefix,
            cursor
                .position()
                .map_or_else(String::new, |p| p.to_string()),
        )
    });
    let heartbeat = Duration::from_millis(cluster.settings.heartbeat_interval_ms);
    let block_ms = poll_interval(cluster).as_millis() as u64;
    let mut last_check = Instant::now();
    let mut backfill = BackfillBudget::new(Instant::now());
    loop {
        if cluster.stop.load(SeqCst) || cluster.handoff.requested.load(SeqCst) {
            return Ok(());
        }
        let Some(count) = wait_for_room(cluster, |fullest| {
            let room = bus::room(fullest, MAX_PENDING_COMMANDS, batch.count());
            (room > 0).then_some(room)
        }) else {
            return Ok(());
        };
        let reply: XreadReply = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&cluster.names.bus)
            .arg(&after)
            .query(conn)?;
        let entries = reply
            .and_then(|streams| streams.into_iter().next())
            .map_or_else(Vec::new, |(_, entries)| entries);
        let (read, bytes) = (entries.len(), entry_bytes(&entries));
        // A backfill read that failed leaves the connection out of step: finish the batch (it is in memory
        // and the cursor has moved over it), then reconnect.
        let mut broken = None;
        // The room checked before the read, in commands per mailbox: `count` entries that weigh one each.
        let mut allowance = count;
        for (id, fields) in entries {
            let Some(entry) = bus::parse_id(&id) else {
                debug_assert!(false, "Redis returned the stream id {id}");
                continue;
            };
            let message = field(&fields, b"m").map(wire::decode);
            // A batch weighs one command per message. Past the room checked before the read, each entry waits
            // for room of its own before it counts as applied, so a handoff meanwhile stops before it.
            let weight = match &message {
                Some(Ok(message)) => weight(&message.body),
                _ => 1,
            };
            if weight <= allowance {
                allowance -= weight;
            } else {
                allowance = 0;
                let fits = wait_for_room(cluster, |fullest| {
                    bus::fits(fullest, MAX_PENDING_COMMANDS, weight).then_some(())
                });
                if fits.is_none() {
                    break;
                }
            }
            match cursor.accept(entry) {
                Verdict::Skip => continue,
                Verdict::Resume => {
                    // Not on a connection that may be out of step: the reconnection resumes instead.
                    if broken.is_none() {
                        resume(cluster, conn, cursor)?;
                    }
                    break;
                }
                Verdict::Apply { gap } => {
                    if let Some(gap) = gap {
                        tell(cluster, gap);
                    }
                    match message {
                        Some(Ok(message)) => {
                            let use_conn = if broken.is_none() {
                                Some(&mut *conn)
                            } else {
                                None
                            };
                            if let Err(e) = apply(cluster, use_conn, message, &mut backfill) {
                                broken = Some(e);
                            }
                        }
                        Some(Err(e)) => {
                            invalid(cluster, &format!("a bus message does not decode: {e}"))
                        }
                        None => invalid(cluster, &format!("bus entry {id} has no message")),
                    }
                }
            }
        }
        after = bus::read_after(cursor.position());
        if let Some(p) = cursor.position() {
            cluster.metrics.position.store(p.applied, Relaxed);
        }
        cluster
            .metrics
            .pending_high_water
            .fetch_max(cluster.local.reactors().fullest() as u64, Relaxed);
        batch.after_read(read, bytes);
        if let Some(e) = broken {
            return Err(e);
        }
        // Also the liveness check of a quiet link, and how a stream replaced under an idle reader is noticed.
        if last_check.elapsed() >= heartbeat {
            after = resume(cluster, conn, cursor)?;
            last_check = Instant::now();
        }
    }
}

/// Asks Redis for the bus's first and last entries, lets the cursor decide where to read from, and tells the
/// connections if entries were lost. Returns the id to read after.
fn resume(
    cluster: &Cluster,
    conn: &mut redis::Connection,
    cursor: &mut Cursor,
) -> redis::RedisResult<String> {
    // Whole entries, though only their ids matter: Redis has no command for just the first and last id.
    let (head, tail): (Vec<Entry>, Vec<Entry>) = redis::pipe()
        .cmd("XRANGE")
        .arg(&cluster.names.bus)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .cmd("XREVRANGE")
        .arg(&cluster.names.bus)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(conn)?;
    let edge = |entries: &[Entry]| entries.first().and_then(|(id, _)| bus::parse_id(id));
    let tail = edge(&tail);
    let resumed = cursor.resume(edge(&head), tail);
    if resumed.rewound {
        cluster.metrics.rewinds.fetch_add(1, Relaxed);
        log::warn!(
            "cluster bus holds fewer entries than this node applied (a failover lost some); reading on from entry {}",
            resumed.after
        );
    }
    if let Some(gap) = resumed.gap {
        tell(cluster, gap);
    }
    let last = tail.map_or(0, |t| t.number);
    cluster
        .metrics
        .lag
        .store(last.saturating_sub(resumed.after), Relaxed);
    Ok(bus::read_after(cursor.position()))
}

/// Waits until `room`, given the most commands pending in any mailbox, says there is room (how many entries to
/// read, or that an entry fits); `None` when the node stops or hands over meanwhile.
/// Also none while some mailbox holds its share of the buffer budget in bytes ([`Reactors::bytes_full`]): that
/// bound is checked per read, so one read (at most about `bus::READ_BYTES_TARGET`) may pass it by its size.
///
/// [`Reactors::bytes_full`]: crate::dispatch::Reactors::bytes_full
fn wait_for_room<T>(cluster: &Cluster, room: impl Fn(usize) -> Option<T>) -> Option<T> {
    let mut stalled = false;
    loop {
        let reactors = cluster.local.reactors();
        if !reactors.bytes_full() {
            if let Some(room) = room(reactors.fullest()) {
                return Some(room);
            }
        }
        if !stalled {
            stalled = true;
            cluster.metrics.stalls.fetch_add(1, Relaxed);
        }
        if cluster.stop.load(SeqCst) || cluster.handoff.requested.load(SeqCst) {
            return None;
        }
        std::thread::sleep(STALL_SLEEP);
    }
}

/// Commands one bus message queues in each mailbox, as `dispatch` weighs them: one per message of a batch, one
/// for anything else.
fn weight(body: &Body) -> usize {
    match body {
        Body::Batch { items, .. } => items.iter().map(|i| i.targets.len()).sum::<usize>().max(1),
        _ => 1,
    }
}

/// Entries were lost before the position: this node's history copy cannot be trusted any more (every stream
/// starts over here, refilled from the shared logs as messages arrive), and every connection is told.
fn tell(cluster: &Cluster, gap: Gap) {
    match gap {
        Gap::Start => {
            // Connections that opened before the first link (the node started while Redis was unreachable)
            // may have missed what other nodes published. Without any, this queues a no-op.
            log::debug!("cluster bus: first link; connections opened before it are told");
        }
        Gap::Trimmed { lost } => {
            cluster.metrics.gaps_trimmed.fetch_add(1, Relaxed);
            cluster.metrics.lost.fetch_add(lost, Relaxed);
            log::warn!(
                "cluster bus: {lost} entries were trimmed before this node read them (more than cluster.bus_max_len \
                 behind); telling every connection: resync to recovering ones, close 1012 to the others"
            );
        }
        Gap::NewEpoch => {
            cluster.metrics.gaps_new_epoch.fetch_add(1, Relaxed);
            log::warn!(
                "cluster bus: the stream was lost (Redis restarted without persistence, failed over, or the key \
                 was deleted); telling every connection: resync to recovering ones, close 1012 to the others"
            );
        }
    }
    cluster.local.history().clear();
    cluster
        .local
        .reactors()
        .missed(Missed::Everything, &cluster.metrics.told);
}

/// Applies one bus message: a publish or batch through the publish path, a kick or subscription change through
/// the reactors' handle. `conn` (for backfill reads) is `None` once it may be out of step; an error from it is
/// returned after the message was applied anyway.
fn apply(
    cluster: &Cluster,
    mut conn: Option<&mut redis::Connection>,
    message: wire::Message,
    budget: &mut BackfillBudget,
) -> redis::RedisResult<()> {
    let own = message.origin == cluster.node_id();
    let mut result = Ok(());
    match message.body {
        Body::Publish {
            target,
            binary,
            payload,
        } => {
            if oversize(cluster, std::slice::from_ref(&target), payload.len()) {
                return Ok(());
            }
            // Framed once for every connection on this node, and stored, exactly like a local publish.
            cluster.local.publish(target, binary, &payload);
        }
        Body::Stamped {
            target,
            binary,
            epoch,
            offset,
            payload,
        } => {
            if oversize(cluster, std::slice::from_ref(&target), payload.len()) {
                return Ok(());
            }
            let stamp = Stamp {
                epoch: &epoch,
                offset,
            };
            let fetched = fetch_missing(cluster, &mut conn, &target, stamp, budget, &mut result);
            cluster
                .local
                .publish_stamped(target, binary, &payload, stamp, &fetched);
        }
        Body::Batch { items, places } => {
            apply_batch(cluster, conn, items, places, budget, &mut result);
        }
        Body::Kick {
            request,
            target,
            code,
            reason,
        } => {
            let reactors = cluster.local.reactors();
            // This node's admin request waits for the count only for its own kick, and only while it waits.
            match own.then(|| cluster.kicks.take(request)).flatten() {
                Some(reply) => reactors.kick_replying(target, code, &reason, reply),
                None => {
                    reactors.kick(target, code, &reason, false);
                }
            }
        }
        Body::Subscribe { request, change } => {
            let reactors = cluster.local.reactors();
            // As a kick: this node's admin request waits for its own change's counts.
            match own.then(|| cluster.subscriptions.take(request)).flatten() {
                Some(reply) => reactors.subscribe_replying(change, reply),
                None => {
                    reactors.subscribe(change, false);
                }
            }
        }
        Body::PresenceQuery { .. } | Body::PresenceAnswer { .. } => {
            invalid(
                cluster,
                "a presence message on the bus (they go on pub/sub)",
            );
            return Ok(());
        }
    }
    if !own {
        cluster.metrics.received.fetch_add(1, Relaxed);
    }
    result
}

/// Applies a batch: every message this node may carry goes to the reactors as one command, in the body's order,
/// the ones Redis placed in shared history with their places (after fetching what this node lacks before them,
/// as for a single stamped message). An item over `admin.max_publish_bytes` is dropped and its targets told.
fn apply_batch(
    cluster: &Cluster,
    mut conn: Option<&mut redis::Connection>,
    items: Vec<BatchItem>,
    places: Vec<Option<Place>>,
    budget: &mut BackfillBudget,
    result: &mut redis::RedisResult<()>,
) {
    let mut kept_items = Vec::with_capacity(items.len());
    let mut kept_places = Vec::with_capacity(places.len());
    let mut places = places.into_iter();
    for item in items {
        let item_places = places.by_ref().take(item.targets.len());
        if oversize(cluster, &item.targets, item.payload.len()) {
            item_places.for_each(drop);
            continue;
        }
        kept_places.extend(item_places);
        kept_items.push(item);
    }
    let targets = kept_items.iter().flat_map(|item| &item.targets);
    // Only before a stream's first message in the batch: its later ones follow it without a hole (the script
    // placed them in one atomic step), and they are not stored yet when this looks.
    let mut seen = HashSet::new();
    let fetched: Vec<Vec<Backfill>> = targets
        .zip(&kept_places)
        .map(|(target, place)| match place {
            Some(place) if seen.insert(stream_of(target).0) => {
                let stamp = Stamp {
                    epoch: &place.epoch,
                    offset: place.offset,
                };
                fetch_missing(cluster, &mut conn, target, stamp, budget, result)
            }
            _ => Vec::new(),
        })
        .collect();
    let stamps: Vec<Option<(Stamp<'_>, &[Backfill])>> = kept_places
        .iter()
        .zip(&fetched)
        .map(|(place, fetched)| {
            place.as_ref().map(|p| {
                let stamp = Stamp {
                    epoch: &p.epoch,
                    offset: p.offset,
                };
                (stamp, fetched.as_slice())
            })
        })
        .collect();
    cluster.local.publish_batch_stamped(kept_items, &stamps);
}

/// Messages of `target`'s stream this node never stored before `stamp` (it started, or its history was cleared
/// after a gap, since they were published), fetched from the shared log so they can be replayed here too.
/// Within a time budget: after a gap every stream's first message shows one, and a reader busy reading history
/// falls behind the bus. Past it, earlier positions get a resync. A failed read leaves `conn` out of step: it is
/// not used again (`None`), and the error goes to `result`.
fn fetch_missing(
    cluster: &Cluster,
    conn: &mut Option<&mut redis::Connection>,
    target: &Target,
    stamp: Stamp<'_>,
    budget: &mut BackfillBudget,
    result: &mut redis::RedisResult<()>,
) -> Vec<Backfill> {
    let Some(from) = cluster.local.history().missing_before(target, stamp) else {
        return Vec::new();
    };
    let Some(link) = conn.as_deref_mut() else {
        return Vec::new();
    };
    if !budget.allows(Instant::now()) {
        return Vec::new();
    }
    let (stream, _, _) = stream_of(target);
    let started = Instant::now();
    let fetched = cluster.fetch_backfill(link, &stream, stamp.epoch, from, stamp.offset - 1);
    budget.spend(started.elapsed());
    fetched.unwrap_or_else(|e| {
        log::debug!("reading the shared history of {stream} failed: {e}");
        *conn = None;
        *result = Err(e);
        Vec::new()
    })
}

/// Drops a bus message whose payload is over `admin.max_publish_bytes` (a node with a larger limit, or a
/// foreign writer, published it) and tells its targets' connections; true if it was dropped.
fn oversize(cluster: &Cluster, targets: &[Target], len: usize) -> bool {
    if len <= cluster.max_payload_bytes {
        return false;
    }
    if cluster.metrics.oversize.fetch_add(1, Relaxed) == 0 {
        log::warn!(
            "dropping a bus message of {len} bytes, over admin.max_publish_bytes ({}); its target's connections \
             are told (every node must use the same limit)",
            cluster.max_payload_bytes
        );
    }
    for target in targets {
        cluster
            .local
            .reactors()
            .missed(Missed::Target(target.clone()), &cluster.metrics.told);
    }
    true
}

/// Counts a dropped message; logs the first one only: a foreign writer on our keys would flood the log.
fn invalid(cluster: &Cluster, why: &str) {
    if cluster.metrics.invalid.fetch_add(1, Relaxed) == 0 {
        log::warn!("dropping: {why}");
    }
}

/// The value of field `name` in a stream entry's flat field/value list.
fn field<'a>(fields: &'a [Vec<u8>], name: &[u8]) -> Option<&'a [u8]> {
    fields
        .chunks_exact(2)
        .find(|kv| kv[0] == name)
        .map(|kv| kv[1].as_slice())
}

fn entry_bytes(entries: &[Entry]) -> usize {
    entries
        .iter()
        .map(|(id, fields)| id.len() + fields.iter().map(Vec::len).sum::<usize>())
        .sum()
}

/// At most [`BackfillBudget::SHARE`] of each second goes to backfilling, so delivery keeps up with the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BackfillBudget {
    window: Instant,
    spent: Duration,
}

impl BackfillBudget {
    const WINDOW: Duration = Duration::from_secs(1);
    const SHARE: Duration = Duration::from_millis(200);

    fn new(now: Instant) -> BackfillBudget {
        BackfillBudget {
            window: now,
            spent: Duration::ZERO,
        }
    }

    fn allows(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Self::WINDOW {
            *self = BackfillBudget::new(now);
        }
        self.spent < Self::SHARE
    }

    fn spend(&mut self, took: Duration) {
        self.spent += took;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backfill_budget_is_a_share_of_each_second() {
        let start = Instant::now();
        let mut budget = BackfillBudget::new(start);
        assert!(budget.allows(start));
        budget.spend(Duration::from_millis(150));
        assert!(budget.allows(start + Duration::from_millis(10)));
        budget.spend(Duration::from_millis(60));
        assert!(!budget.allows(start + Duration::from_millis(500)));
        assert!(budget.allows(start + Duration::from_millis(1_000)));
    }

    #[test]
    fn the_bus_needs_redis_7() {
        assert!(
            supports_the_bus("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n")
                .is_ok()
        );
        assert!(supports_the_bus("redis_version:7.2.4").is_ok());
        let old = supports_the_bus("redis_version:6.2.14\r\n").unwrap_err();
        assert!(old.contains("6.2.14") && old.contains("7.0"), "{old}");
        assert!(supports_the_bus("no version here").is_err());
    }

    #[test]
    fn fields_are_found_by_name() {
        let fields = vec![b"e".to_vec(), b"EP".to_vec(), b"m".to_vec(), vec![1, 2]];
        assert_eq!(field(&fields, b"m"), Some(&[1u8, 2][..]));
        assert_eq!(field(&fields, b"e"), Some(&b"EP"[..]));
        assert_eq!(field(&fields, b"x"), None);
        assert_eq!(
            field(&fields[..3], b"m"),
            None,
            "a dangling name has no value"
        );
    }
}
