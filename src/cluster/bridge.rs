//! The presence threads of a cluster node: the subscriber, which listens on the presence channel and this node's
//! reply channel, and the worker, which sends heartbeats and answers other nodes' presence queries.
//!
//! Presence is a question with a deadline, so Redis pub/sub's at-most-once delivery is enough: a lost question
//! or answer makes a count partial, and the answer says how many nodes answered. The subscriber SUBSCRIBEs on
//! a connection of its own (SUBSCRIBE blocks it for good) and hands questions to the worker through a bounded
//! queue: the worker may wait up to `dispatch::REPLY_TIMEOUT` on the reactors, and questions that arrive
//! faster than it answers are dropped and counted rather than queued without bound. The bus (publishes,
//! kicks) is the reader's (`reader`), on another connection, so nothing here can delay or lose a delivery.

use super::wire::{self, Body};
use super::{Backoff, Cluster, StateLog};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest a blocked read of the subscription waits before the thread checks for shutdown and its heartbeat.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Presence queries waiting for the worker at most. Each costs the worker one question to the reactors and one
/// PUBLISH; past this many, other nodes' queries are coming faster than this node can answer, and the askers'
/// deadlines (`cluster.presence_timeout_ms`) would pass before these were answered anyway.
pub(super) const PRESENCE_QUEUE: usize = 64;

/// A presence query from another node, for the worker.
pub(super) struct Query {
    origin: String,
    request: u64,
    user: String,
}

/// The sending side of a bounded queue that drops what does not fit, and counts it.
pub(super) struct Bounded<'a, T> {
    tx: mpsc::SyncSender<T>,
    dropped: &'a AtomicU64,
}

impl<'a, T> Bounded<'a, T> {
    pub(super) fn new(tx: mpsc::SyncSender<T>, dropped: &'a AtomicU64) -> Self {
        Bounded { tx, dropped }
    }

    /// Queues `item` unless the queue is full (or its receiver gone); false, and counted, if dropped.
    pub(super) fn offer(&self, item: T) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(1, Relaxed);
                false
            }
        }
    }
}

/// Starts the subscriber and worker threads.
pub(super) fn spawn(cluster: Arc<Cluster>) -> std::io::Result<()> {
    let (queries, inbox) = mpsc::sync_channel(PRESENCE_QUEUE);
    let worker = cluster.clone();
    std::thread::Builder::new()
        .name("cluster-worker".into())
        .spawn(move || run_worker(&worker, &inbox))?;
    std::thread::Builder::new()
        .name("cluster-presence".into())
        .spawn(move || {
            let queries = Bounded::new(queries, &cluster.metrics.presence_dropped);
            run_subscriber(&cluster, &queries)
        })?;
    Ok(())
}

fn run_subscriber(cluster: &Cluster, queries: &Bounded<'_, Query>) {
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
                    if state.0 == Some(true) {
                        backoff.reset();
                    }
                    e
                }
            },
            Err(e) => e,
        };
        // The bus reader reports the link; this one matters to presence counts only, so it is logged apart.
        state.record(false, || {
            format!("cluster presence subscription lost: {error}; presence counts may be partial until it is back")
        });
        std::thread::sleep(backoff.next_delay());
    }
}

/// Subscribes and routes presence messages until the connection fails (`Err`) or the node stops (`Ok`).
fn subscribe_and_receive(
    cluster: &Cluster,
    conn: &mut redis::Connection,
    state: &mut StateLog,
    queries: &Bounded<'_, Query>,
) -> redis::RedisResult<()> {
    let heartbeat = Duration::from_millis(cluster.settings.heartbeat_interval_ms);
    let mut pubsub = conn.as_pubsub();
    pubsub.subscribe(&[
        cluster.names.presence.as_str(),
        cluster.names.reply(cluster.node_id()).as_str(),
    ])?;
    let poll = POLL_INTERVAL.min(heartbeat);
    pubsub.set_read_timeout(Some(poll))?;
    // Logged only after a loss: the bus reader logs the link itself.
    if state.0.is_some() {
        state.record(true, || "cluster presence subscription back".into());
    } else {
        state.0 = Some(true);
    }
    let mut last_ping = Instant::now();
    loop {
        if cluster.stop.load(SeqCst) {
            return Ok(());
        }
        match pubsub.get_message() {
            Ok(msg) => route(cluster, msg.get_payload_bytes(), queries),
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(e),
        }
        // A Redis host that vanished without closing the socket is only noticed by asking it something.
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

/// Hands a presence query to the worker, or an answer to the admin thread waiting for it.
fn route(cluster: &Cluster, bytes: &[u8], queries: &Bounded<'_, Query>) {
    let message = match wire::decode(bytes) {
        Ok(message) => message,
        Err(e) => {
            if cluster.metrics.invalid.fetch_add(1, Relaxed) == 0 {
                log::warn!("dropping a presence message that does not decode: {e}");
            }
            return;
        }
    };
    match message.body {
        // The asking node counts its own connections itself.
        Body::PresenceQuery { .. } if message.origin == cluster.node_id() => {}
        Body::PresenceQuery { request, user } => {
            queries.offer(Query {
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
                // Bounded: more answers than nodes can only be duplicates.
                let _ = waiting.try_send(connections);
            }
        }
        _ => {
            if cluster.metrics.invalid.fetch_add(1, Relaxed) == 0 {
                log::warn!(
                    "dropping a publish, kick, batch or subscription change on the presence channel (they go on the bus)"
                );
            }
        }
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
        // Two live nodes with one id would count each other's connections as one node's, and wait for each
        // other's kick counts.
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
    fn a_full_presence_queue_drops_and_counts_instead_of_growing() {
        let dropped = AtomicU64::new(0);
        let (tx, rx) = mpsc::sync_channel(PRESENCE_QUEUE);
        let queue = Bounded::new(tx, &dropped);
        for i in 0..PRESENCE_QUEUE {
            assert!(queue.offer(i), "room for {PRESENCE_QUEUE}");
        }
        assert!(!queue.offer(PRESENCE_QUEUE), "the bound is hit");
        assert!(!queue.offer(PRESENCE_QUEUE + 1));
        assert_eq!(dropped.load(Relaxed), 2);
        // What was queued is intact and in order; once the worker takes one, there is room again.
        assert_eq!(rx.recv().unwrap(), 0);
        assert!(queue.offer(99));
        let rest: Vec<usize> = rx.try_iter().collect();
        assert_eq!(rest.len(), PRESENCE_QUEUE);
        assert_eq!(rest.last(), Some(&99));
        drop(rx);
        assert!(!queue.offer(1), "a gone worker drops too");
    }
}
