//! The bridge threads of a cluster node: the subscriber, which owns the link state, and the worker, which
//! sends heartbeats and answers other nodes' presence queries.
//!
//! The subscriber SUBSCRIBEs on a connection of its own (SUBSCRIBE blocks it for good), publishes what other
//! nodes publish on this node through the one publish path (`publish`), and reconnects with backoff when Redis
//! goes away. The worker has its own connection too, so waiting for reactors' counts or for a slow heartbeat
//! never delays delivery.

use super::wire::{self, Body};
use super::{Backoff, Cluster};
use crate::config::redact_url;
use crate::message::envelope::Stamp;
use crate::message::stream_of;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest a blocked read of the subscription waits before the thread checks for shutdown and heartbeats.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A presence query from another node, for the worker.
struct Query {
    origin: String,
    request: u64,
    user: String,
}

/// Starts the subscriber and worker threads.
pub(super) fn spawn(cluster: Arc<Cluster>) -> std::io::Result<()> {
    let (queries, inbox) = mpsc::channel();
    let worker = cluster.clone();
    std::thread::Builder::new()
        .name("cluster-worker".into())
        .spawn(move || run_worker(&worker, &inbox))?;
    std::thread::Builder::new()
        .name("cluster-sub".into())
        .spawn(move || run_subscriber(&cluster, &queries))?;
    Ok(())
}

/// Whether the last state change logged was "up"; `None` before the first attempt, so the first outcome of
/// either kind is logged.
struct StateLog(Option<bool>);

impl StateLog {
    fn up(&mut self, cluster: &Cluster) {
        if self.0 != Some(true) {
            log::info!(
                "cluster link up: node {} on {} (channel prefix {})",
                cluster.node_id(),
                redact_url(cluster.settings.redis_url.as_deref().unwrap_or("")),
                cluster.settings.channel_prefix
            );
        }
        self.0 = Some(true);
    }

    fn down(&mut self, cluster: &Cluster, error: &str) {
        if self.0 != Some(false) {
            log::warn!(
                "cluster link down: {error}; cluster publishes get 503, reconnecting with backoff up to {} ms",
                cluster.settings.reconnect_max_ms
            );
        }
        self.0 = Some(false);
    }
}

fn run_subscriber(cluster: &Cluster, queries: &mpsc::Sender<Query>) {
    let mut backoff = Backoff::new(
        Duration::from_millis(cluster.settings.reconnect_min_ms),
        Duration::from_millis(cluster.settings.reconnect_max_ms),
    );
    let mut state = StateLog(None);
    while !cluster.stop.load(SeqCst) {
        let error = match cluster.connect() {
            Ok(mut conn) => match subscribe_and_receive(cluster, &mut conn, &mut state, queries) {
                Ok(()) => return, // stopping
                Err(e) => {
                    // Any message that was received was delivered; the next failure starts at the floor.
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
        // Other nodes' messages are being missed: no stored position may be served as complete any more.
        cluster.local.history().clear();
        *cluster
            .link
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = error.clone();
        state.down(cluster, &error);
        std::thread::sleep(backoff.next_delay());
    }
}

/// Subscribes, marks the link up, and delivers until the connection fails (`Err`) or the node stops (`Ok`).
fn subscribe_and_receive(
    cluster: &Cluster,
    conn: &mut redis::Connection,
    state: &mut StateLog,
    queries: &mpsc::Sender<Query>,
) -> redis::RedisResult<()> {
    let heartbeat = Duration::from_millis(cluster.settings.heartbeat_interval_ms);
    let mut pubsub = conn.as_pubsub();
    pubsub.subscribe(&[
        cluster.names.bus.as_str(),
        cluster.names.reply(cluster.node_id()).as_str(),
    ])?;
    let poll = POLL_INTERVAL.min(heartbeat);
    pubsub.set_read_timeout(Some(poll))?;
    // A new generation makes the admin thread's publisher reconnect: its old connection may be to a Redis
    // that has since restarted.
    cluster.link.generation.fetch_add(1, SeqCst);
    // Whatever was stored before this subscription may lack messages published while there was none.
    cluster.local.history().clear();
    cluster.link.up.store(true, SeqCst);
    cluster.metrics.connects.fetch_add(1, Relaxed);
    state.up(cluster);
    let mut last_ping = Instant::now();
    // For reading shared history: the subscription's connection can only receive.
    let mut side = Side {
        conn: None,
        budget: Budget::new(Instant::now()),
    };
    loop {
        if cluster.stop.load(SeqCst) {
            return Ok(());
        }
        match pubsub.get_message() {
            Ok(msg) => deliver(cluster, msg.get_payload_bytes(), queries, &mut side),
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(e),
        }
        // A Redis host that vanished without closing the socket is only noticed by asking it something.
        // The answer gets the full command timeout: a busy Redis is not a dead one.
        if last_ping.elapsed() >= heartbeat {
            pubsub.set_read_timeout(Some(Duration::from_millis(
                cluster.settings.command_timeout_ms,
            )))?;
            pubsub.ping::<redis::Value>()?;
            pubsub.set_read_timeout(Some(poll))?;
            last_ping = Instant::now();
        }
    }
}

/// Hands one message from Redis to the reactors (publish, kick), the worker (presence query) or the admin
/// thread waiting for answers (presence answer).
fn deliver(cluster: &Cluster, bytes: &[u8], queries: &mpsc::Sender<Query>, side: &mut Side) {
    let message = match wire::decode(bytes) {
        Ok(message) => message,
        Err(e) => {
            // Counted always, logged once: a foreign publisher on our channel would flood the log.
            if cluster.metrics.invalid.fetch_add(1, Relaxed) == 0 {
                log::warn!("dropping a message on the cluster bus that does not decode: {e}");
            }
            return;
        }
    };
    // The origin delivered its own publish and kick when it accepted them; stamped publishes are the
    // exception: every node, the origin included, delivers them here, in the order Redis stamped them.
    if message.origin == cluster.node_id() && !matches!(message.body, Body::Stamped { .. }) {
        return;
    }
    match message.body {
        Body::Publish {
            target,
            binary,
            payload,
        } => {
            // Framed once for every connection on this node, and stored, exactly like a local publish.
            cluster.local.publish(target, binary, &payload);
            cluster.metrics.received.fetch_add(1, Relaxed);
        }
        Body::Stamped {
            target,
            binary,
            epoch,
            offset,
            payload,
        } => {
            let stamp = Stamp {
                epoch: &epoch,
                offset,
            };
            // Messages of this stream this node never got (it started, or its link came back, since they
            // were published): fetch them from the shared log first, so they can be replayed here too.
            // Within a time budget: after a reconnection every stream's first message shows a gap, and a
            // subscriber busy reading history falls behind the bus. Past it, earlier positions get a resync.
            let backfill = match cluster.local.history().missing_before(&target, stamp) {
                Some(from) if side.budget.allows(Instant::now()) => {
                    let (stream, _, _) = stream_of(&target);
                    let started = Instant::now();
                    let got =
                        cluster.fetch_backfill(&mut side.conn, &stream, &epoch, from, offset - 1);
                    side.budget.spend(started.elapsed());
                    got
                }
                _ => Vec::new(),
            };
            cluster
                .local
                .publish_stamped(target, binary, &payload, stamp, &backfill);
            if message.origin != cluster.node_id() {
                cluster.metrics.received.fetch_add(1, Relaxed);
            }
        }
        Body::Kick {
            target,
            code,
            reason,
        } => {
            // Nobody waits for the count: the origin answers with its own.
            cluster.local.reactors().kick(target, code, &reason, false);
            cluster.metrics.received.fetch_add(1, Relaxed);
        }
        Body::Subscribe(change) => {
            // Like a kick: nobody waits for this node's count, the origin answers with its own.
            cluster.local.reactors().subscribe(change, false);
            cluster.metrics.received.fetch_add(1, Relaxed);
        }
        Body::Batch(items) => {
            // Framed once per item for every connection on this node, like a local batch.
            cluster.local.publish_batch(items);
            cluster.metrics.received.fetch_add(1, Relaxed);
        }
        Body::PresenceQuery { request, user } => {
            let _ = queries.send(Query {
                origin: message.origin,
                request,
                user,
            });
        }
        Body::PresenceAnswer {
            request,
            connections,
        } => {
            if let Some(waiting) = cluster.lock_pending().get(&request) {
                let _ = waiting.send(connections);
            }
        }
    }
}

/// The subscriber's connection for reading shared history, and the time it may spend on that.
struct Side {
    conn: Option<redis::Connection>,
    budget: Budget,
}

/// At most [`Budget::SHARE`] of each second goes to backfilling, so delivery keeps up with the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Budget {
    window: Instant,
    spent: Duration,
}

impl Budget {
    const WINDOW: Duration = Duration::from_secs(1);
    const SHARE: Duration = Duration::from_millis(200);

    fn new(now: Instant) -> Budget {
        Budget {
            window: now,
            spent: Duration::ZERO,
        }
    }

    fn allows(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Self::WINDOW {
            *self = Budget::new(now);
        }
        self.spent < Self::SHARE
    }

    fn spend(&mut self, took: Duration) {
        self.spent += took;
    }
}

/// Heartbeats every `heartbeat_interval_ms` (and at once after the link comes up), and answers presence
/// queries in between.
fn run_worker(cluster: &Cluster, inbox: &mpsc::Receiver<Query>) {
    let heartbeat = Duration::from_millis(cluster.settings.heartbeat_interval_ms);
    // Tells two processes configured with the same node id apart.
    let instance = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let mut conn: Option<redis::Connection> = None;
    let mut beaten_generation = u64::MAX;
    let mut next_beat = Instant::now();
    let mut failing = false;
    let mut first_beat = true;
    while !cluster.stop.load(SeqCst) {
        let generation = cluster.link.generation.load(SeqCst);
        if cluster.is_up() && (generation != beaten_generation || Instant::now() >= next_beat) {
            match with_conn(cluster, &mut conn, |c| {
                beat(cluster, c, &instance, first_beat)
            }) {
                Ok(()) => {
                    first_beat = false;
                    if failing {
                        log::info!("cluster heartbeat works again");
                    }
                    failing = false;
                    beaten_generation = generation;
                }
                Err(e) => {
                    if !failing {
                        log::warn!("cluster heartbeat failed: {e}");
                    }
                    failing = true;
                }
            }
            next_beat = Instant::now() + heartbeat;
        }
        let wait = next_beat
            .saturating_duration_since(Instant::now())
            .min(POLL_INTERVAL);
        match inbox.recv_timeout(wait) {
            Ok(query) => {
                let count = local_presence(cluster, &query.user);
                let answer = wire::encode(
                    cluster.node_id(),
                    &Body::PresenceAnswer {
                        request: query.request,
                        connections: count,
                    },
                );
                let channel = cluster.names.reply(&query.origin);
                let sent = with_conn(cluster, &mut conn, |c| {
                    redis::cmd("PUBLISH")
                        .arg(&channel)
                        .arg(&answer)
                        .query::<i64>(c)
                        .map(drop)
                });
                if let Err(e) = sent {
                    log::debug!(
                        "answering a presence query from {} failed: {e}",
                        query.origin
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Runs `f` on the worker's connection, connecting it first if needed and dropping it on error.
fn with_conn(
    cluster: &Cluster,
    conn: &mut Option<redis::Connection>,
    f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<()>,
) -> redis::RedisResult<()> {
    if conn.is_none() {
        *conn = Some(cluster.connect()?);
    }
    let result = f(conn.as_mut().expect("connected above"));
    if result.is_err() {
        *conn = None;
    }
    result
}

/// Renews this node's alive marker (expiring after `node_ttl_ms`, by Redis' clock) and lists the node.
fn beat(
    cluster: &Cluster,
    conn: &mut redis::Connection,
    instance: &str,
    first: bool,
) -> redis::RedisResult<()> {
    let marker = cluster.names.marker(cluster.node_id());
    let (previous,): (Option<String>,) = redis::pipe()
        .atomic()
        .cmd("GETSET")
        .arg(&marker)
        .arg(instance)
        .cmd("PEXPIRE")
        .arg(&marker)
        .arg(cluster.settings.node_ttl_ms)
        .ignore()
        .cmd("SADD")
        .arg(&cluster.names.nodes)
        .arg(cluster.node_id())
        .ignore()
        .query(conn)?;
    // Before our first marker, another instance's is a previous run of this node that has not expired yet.
    if let Some(previous) = previous.filter(|p| p != instance && !first) {
        // Two live nodes with one id would drop each other's messages as their own echoes.
        log::error!(
            "cluster.node_id {} is also used by another process (instance {previous}); node ids must be unique",
            cluster.node_id()
        );
    }
    Ok(())
}

/// The user's connections on this node, summed over its reactors (0 for a reactor that does not answer in
/// time: the asking node is waiting with its own deadline).
fn local_presence(cluster: &Cluster, user: &str) -> u64 {
    cluster.local.reactors().presence(user).partial() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backfill_budget_is_a_share_of_each_second() {
        let start = Instant::now();
        let mut budget = Budget::new(start);
        assert!(budget.allows(start));
        budget.spend(Duration::from_millis(150));
        assert!(budget.allows(start + Duration::from_millis(10)));
        budget.spend(Duration::from_millis(60));
        assert!(!budget.allows(start + Duration::from_millis(500)));
        assert!(budget.allows(start + Duration::from_millis(1_000)));
    }
}
