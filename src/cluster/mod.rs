//! The cluster: several densepush nodes joined through Redis pub/sub, so a backend can publish to, kick and
//! count the connections of any node through any node's admin API.
//!
//! It owns the node's Redis connections and the bridge threads (`bridge`); the message layout is `wire`
//! (sans-IO). It does not touch client connections or mailboxes: what arrives from Redis takes the same publish
//! path as a local publish (`publish`), and kicks and presence go through the reactors' handle (`dispatch`).
//!
//! Design, in short:
//! - Every node SUBSCRIBEs to `{prefix}:bus` (publishes, kicks, presence queries) and `{prefix}:reply:{node}`
//!   (answers to its own presence queries) on a connection of its own, in the subscriber thread.
//! - The admin thread PUBLISHes on a second connection with short timeouts, and answers 202 only after Redis
//!   accepted the PUBLISH; then it delivers to its own reactors. Every node ignores bus messages carrying its
//!   own node id, so the origin delivers exactly once, in admin order, and the others in the order Redis
//!   relays one connection's messages: one target's messages from one node keep their order everywhere.
//! - Presence is a question on the bus that every live node answers with its local count; a heartbeat keeps
//!   an alive marker per node (`{prefix}:node:{id}`, expiring after `node_ttl_ms`, listed in
//!   `{prefix}:nodes`), so the asking node knows how many answers to wait for and reports how many came.
//! - When Redis is unreachable the link is down: publishes and kicks get 503, the subscriber thread
//!   reconnects with exponential backoff and logs once per state change.

mod bridge;
pub mod history;
pub mod wire;

use crate::config::{redact_url, ClusterConfig};
use crate::message::{stream_of, Target};
use crate::publish::Publisher;
use std::collections::HashMap;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use wire::Body;

/// Why a cluster operation did not happen. The admin API answers 503 with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The bridge has no working Redis link (the reason is the last error seen).
    #[error("cluster link down: {0}")]
    Down(String),
    /// Redis refused or did not answer the command in time.
    #[error("cluster link down: {0}")]
    Redis(String),
}

/// The cluster-wide answer to a presence query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    /// Connections of the user, summed over the nodes that answered.
    pub connections: u64,
    /// Nodes that answered, this one included.
    pub nodes: u64,
    /// Nodes with a live alive marker in Redis (at least `nodes`).
    pub nodes_known: u64,
}

/// Counters of the cluster bridge, rendered on `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// Counter: publishes and kicks this node PUBLISHed to Redis.
    pub published: AtomicU64,
    /// Counter: publishes and kicks from other nodes handed to the reactors.
    pub received: AtomicU64,
    /// Counter: publishes, kicks and presence queries answered 503 because Redis did not take them.
    pub failed: AtomicU64,
    /// Counter: messages from Redis that did not decode, or broke a rule such as a kick's close code (dropped).
    pub invalid: AtomicU64,
    /// Counter: times the link came up (the first connection included).
    pub connects: AtomicU64,
}

/// The Redis names of one cluster, derived from the channel prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The channel every node subscribes to.
    pub bus: String,
    /// The set listing node ids that have sent a heartbeat.
    pub nodes: String,
    prefix: String,
}

impl Names {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Names {
        Names {
            bus: format!("{prefix}:bus"),
            nodes: format!("{prefix}:nodes"),
            prefix: prefix.to_owned(),
        }
    }

    /// The channel on which `node` receives answers to its presence queries.
    pub fn reply(&self, node: &str) -> String {
        format!("{}:reply:{node}", self.prefix)
    }

    /// The key holding `node`'s alive marker.
    pub fn marker(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }
}

/// Link state shared by the bridge threads and the admin thread.
#[derive(Debug)]
struct Link {
    up: AtomicBool,
    /// Bumped each time the subscriber (re)connects, so connections opened before are replaced.
    generation: AtomicU64,
    last_error: Mutex<String>,
}

/// The admin thread's connection for PUBLISH and presence look-ups.
struct PublishConn {
    conn: Option<(redis::Connection, u64)>,
}

/// A node's handle on the cluster; shared by the admin thread and the bridge threads.
pub struct Cluster {
    settings: ClusterConfig,
    names: Names,
    client: redis::Client,
    /// This node's publish path: other nodes' publishes are framed, stored and delivered through it like local
    /// ones. Its history is cleared whenever the link goes down or comes up, because messages may have been
    /// missed meanwhile.
    local: Publisher,
    link: Link,
    publisher: Mutex<PublishConn>,
    /// Presence queries waiting for answers, by request id; the subscriber thread routes answers here.
    pending: Mutex<HashMap<u64, mpsc::Sender<u64>>>,
    next_request: AtomicU64,
    stop: AtomicBool,
    /// Counters for `/metrics`.
    pub metrics: ClusterMetrics,
}

impl Cluster {
    /// Starts the bridge threads for the configured Redis; `None` when `cluster.redis_url` is empty. The node
    /// starts even when Redis is unreachable: local connections work, cluster publishes get 503 until the
    /// bridge connects.
    pub fn start(
        settings: &ClusterConfig,
        local: Publisher,
    ) -> std::io::Result<Option<Arc<Cluster>>> {
        let Some(url) = settings.redis_url.as_deref() else {
            return Ok(None);
        };
        let client = redis::Client::open(url).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("cluster.redis_url {}: {e}", redact_url(url)),
            )
        })?;
        let cluster = Arc::new(Cluster {
            names: Names::new(&settings.channel_prefix),
            settings: settings.clone(),
            client,
            local,
            link: Link {
                up: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                last_error: Mutex::new("not connected yet".into()),
            },
            publisher: Mutex::new(PublishConn { conn: None }),
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            metrics: ClusterMetrics::default(),
        });
        bridge::spawn(cluster.clone())?;
        Ok(Some(cluster))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    /// True while the subscriber holds a live subscription.
    pub fn is_up(&self) -> bool {
        self.link.up.load(SeqCst)
    }

    /// Sends a publish to the other nodes. `Ok` means Redis accepted the PUBLISH; the caller then delivers to
    /// its own reactors (other nodes ignore their own messages).
    pub fn publish(
        &self,
        target: &Target,
        binary: bool,
        payload: &[u8],
    ) -> Result<(), ClusterError> {
        let bytes = wire::encode(
            self.node_id(),
            &Body::Publish {
                target: target.clone(),
                binary,
                payload: payload.to_vec(),
            },
        );
        self.send_to_bus(&bytes)
    }

    /// Stamps a message of a stream that keeps history with its epoch and next offset in Redis, stores it in
    /// the stream's shared log and publishes it to every node, this one included, in one script
    /// ([`history::PUBLISH_SCRIPT`]). `Ok` carries the epoch and offset; the caller must not deliver locally:
    /// this node's subscriber does, in the order Redis assigned the offsets.
    pub fn publish_stamped(
        &self,
        target: &Target,
        binary: bool,
        payload: &[u8],
        limits: &crate::history::store::Limits,
        candidate_epoch: &str,
    ) -> Result<(String, u64), ClusterError> {
        let script = self.stamp_script(target, binary, payload, limits, candidate_epoch);
        let result = self.with_publisher(|conn| script.query::<(String, u64)>(conn));
        if result.is_ok() {
            self.metrics.published.fetch_add(1, Relaxed);
        }
        result
    }

    /// [`Cluster::publish_stamped`] for several messages at once (a batch's messages to streams that keep
    /// history), in one round trip: the scripts run in order, so each stream's offsets follow the batch's order.
    /// `Ok` carries each one's epoch and offset; an `Err` may come after Redis ran some of them.
    pub fn publish_stamped_many(
        &self,
        messages: &[(&Target, bool, &[u8])],
        limits: &crate::history::store::Limits,
        candidate_epoch: &str,
    ) -> Result<Vec<(String, u64)>, ClusterError> {
        let mut pipe = redis::pipe();
        for &(target, binary, payload) in messages {
            pipe.add_command(self.stamp_script(target, binary, payload, limits, candidate_epoch));
        }
        let result = self.with_publisher(|conn| pipe.query::<Vec<(String, u64)>>(conn));
        if result.is_ok() {
            self.metrics
                .published
                .fetch_add(messages.len() as u64, Relaxed);
        }
        result
    }

    /// The publish script's call for one message ([`history::PUBLISH_SCRIPT`]).
    fn stamp_script(
        &self,
        target: &Target,
        binary: bool,
        payload: &[u8],
        limits: &crate::history::store::Limits,
        candidate_epoch: &str,
    ) -> redis::Cmd {
        let (stream, _, client) = stream_of(target);
        let [epoch_key, offset_key, log_key] =
            history::keys(&self.settings.channel_prefix, &stream);
        let head = wire::encode_stamped_head(self.node_id(), target, binary);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(history::PUBLISH_SCRIPT)
            .arg(3)
            .arg(&epoch_key)
            .arg(&offset_key)
            .arg(&log_key)
            .arg(&self.names.bus)
            .arg(&head)
            .arg(payload)
            .arg(candidate_epoch)
            .arg(limits.size)
            .arg(limits.ttl_ms.max(1))
            .arg(client.unwrap_or(""))
            .arg(if binary { "1" } else { "0" });
        cmd
    }

    /// Reads offsets `from..=to` of a stream's shared log, if the stream is still in `epoch`, on the subscriber's
    /// side connection (connected on first use, dropped on error). Any failure gives an empty backfill: the
    /// node then holds the stream from the new message on, and earlier positions get a resync.
    fn fetch_backfill(
        &self,
        conn: &mut Option<redis::Connection>,
        stream: &str,
        epoch: &str,
        from: u64,
        to: u64,
    ) -> Vec<crate::history::Backfill> {
        let [epoch_key, _, log_key] = history::keys(&self.settings.channel_prefix, stream);
        if conn.is_none() {
            *conn = self.connect().ok();
        }
        let Some(c) = conn.as_mut() else {
            return Vec::new();
        };
        let read: redis::RedisResult<(Option<String>, Vec<history::LogEntry>)> = redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(&epoch_key)
            .cmd("XRANGE")
            .arg(&log_key)
            .arg(format!("{from}-1"))
            .arg(format!("{to}-1"))
            .query(c);
        match read {
            Ok((Some(current), entries)) if current == epoch => history::parse_log(&entries),
            Ok(_) => Vec::new(),
            Err(e) => {
                log::debug!("reading the shared history of {stream} failed: {e}");
                *conn = None;
                Vec::new()
            }
        }
    }

    /// Forgets a stream's shared history in Redis; its next message starts a new epoch on every node.
    pub fn delete_history(&self, stream: &str) -> Result<(), ClusterError> {
        let keys = history::keys(&self.settings.channel_prefix, stream);
        self.with_publisher(|conn| redis::cmd("DEL").arg(&keys[..]).query::<i64>(conn))
            .map(drop)
    }

    /// Sends a kick to the other nodes; the caller kicks its own connections after `Ok`.
    pub fn kick(&self, target: &Target, code: u16, reason: &str) -> Result<(), ClusterError> {
        let bytes = wire::encode(
            self.node_id(),
            &Body::Kick {
                target: target.clone(),
                code,
                reason: reason.to_owned(),
            },
        );
        self.send_to_bus(&bytes)
    }

    /// Sends a subscription change to the other nodes; the caller applies it to its own connections after
    /// `Ok`, as with a kick.
    pub fn subscribe(&self, change: &crate::dispatch::Subscription) -> Result<(), ClusterError> {
        self.send_to_bus(&wire::encode(
            self.node_id(),
            &Body::Subscribe(change.clone()),
        ))
    }

    /// Sends a batch (of messages to streams without shared history) to the other nodes as one message; the
    /// caller publishes it to its own reactors after `Ok`.
    pub fn publish_batch(&self, items: &[crate::publish::BatchItem]) -> Result<(), ClusterError> {
        self.send_to_bus(&wire::encode_batch(self.node_id(), items))
    }

    fn send_to_bus(&self, bytes: &[u8]) -> Result<(), ClusterError> {
        let result = self.with_publisher(|conn| {
            redis::cmd("PUBLISH")
                .arg(&self.names.bus)
                .arg(bytes)
                .query::<i64>(conn)
        });
        if result.is_ok() {
            self.metrics.published.fetch_add(1, Relaxed);
        }
        result.map(drop)
    }

    /// Asks every other live node for the user's connection count and adds `local`. Waits up to
    /// `cluster.presence_timeout_ms`, less when every node with a live alive marker has answered.
    pub fn presence(&self, user: &str, local: u64) -> Result<Presence, ClusterError> {
        let request = self.next_request.fetch_add(1, Relaxed);
        let (tx, rx) = mpsc::channel();
        self.lock_pending().insert(request, tx);
        let query = wire::encode(
            self.node_id(),
            &Body::PresenceQuery {
                request,
                user: user.to_owned(),
            },
        );
        let asked = self.with_publisher(|conn| {
            let known = self.count_live_nodes(conn)?;
            redis::cmd("PUBLISH")
                .arg(&self.names.bus)
                .arg(&query)
                .query::<i64>(conn)?;
            Ok(known)
        });
        let known = match asked {
            Ok(known) => known,
            Err(e) => {
                self.lock_pending().remove(&request);
                return Err(e);
            }
        };
        let deadline = Instant::now() + Duration::from_millis(self.settings.presence_timeout_ms);
        let mut tally = Tally::new(local, known);
        while !tally.complete() {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(count) => tally.add(count),
                Err(_) => break,
            }
        }
        self.lock_pending().remove(&request);
        Ok(tally.presence())
    }

    /// Nodes whose alive marker has not expired, this one always included; forgets the ids of the others.
    fn count_live_nodes(&self, conn: &mut redis::Connection) -> redis::RedisResult<u64> {
        let ids: Vec<String> = redis::cmd("SMEMBERS").arg(&self.names.nodes).query(conn)?;
        if ids.is_empty() {
            return Ok(1);
        }
        let mut mget = redis::cmd("MGET");
        for id in &ids {
            mget.arg(self.names.marker(id));
        }
        let markers: Vec<Option<Vec<u8>>> = mget.query(conn)?;
        let dead: Vec<&String> = ids
            .iter()
            .zip(&markers)
            .filter(|(_, m)| m.is_none())
            .map(|(id, _)| id)
            .collect();
        if !dead.is_empty() {
            redis::cmd("SREM")
                .arg(&self.names.nodes)
                .arg(&dead)
                .query::<i64>(conn)?;
        }
        // This node is alive even before its first heartbeat lands.
        let me_listed = ids
            .iter()
            .zip(&markers)
            .any(|(id, m)| m.is_some() && id == self.node_id());
        Ok((ids.len() - dead.len()) as u64 + u64::from(!me_listed))
    }

    /// Runs `f` on the publisher connection, (re)connecting it first when it is missing or older than the
    /// subscriber's current link. Any error drops the connection, so the next call starts afresh.
    fn with_publisher<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, ClusterError> {
        // Fail fast while the subscriber knows Redis is gone: the admin thread must not wait on timeouts.
        if !self.is_up() {
            self.metrics.failed.fetch_add(1, Relaxed);
            return Err(ClusterError::Down(self.last_error()));
        }
        let generation = self.link.generation.load(SeqCst);
        let mut publisher = self.publisher.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(&publisher.conn, Some((_, g)) if *g == generation) {
            publisher.conn = None;
            match self.connect() {
                Ok(conn) => publisher.conn = Some((conn, generation)),
                Err(e) => {
                    self.metrics.failed.fetch_add(1, Relaxed);
                    return Err(ClusterError::Redis(e.to_string()));
                }
            }
        }
        let (conn, _) = publisher.conn.as_mut().expect("connected above");
        match f(conn) {
            Ok(value) => Ok(value),
            Err(e) => {
                publisher.conn = None;
                self.metrics.failed.fetch_add(1, Relaxed);
                Err(ClusterError::Redis(e.to_string()))
            }
        }
    }

    /// A new connection with `cluster.command_timeout_ms` on connect, reads and writes.
    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let timeout = Duration::from_millis(self.settings.command_timeout_ms);
        let conn = self.client.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        Ok(conn)
    }

    fn last_error(&self) -> String {
        self.link
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::Sender<u64>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the bridge and removes this node's alive marker, so the others stop counting it at once.
    pub fn leave(&self) {
        self.stop.store(true, SeqCst);
        if let Ok(mut conn) = self.connect() {
            let _ = redis::pipe()
                .cmd("DEL")
                .arg(self.names.marker(self.node_id()))
                .ignore()
                .cmd("SREM")
                .arg(&self.names.nodes)
                .arg(self.node_id())
                .ignore()
                .query::<()>(&mut conn);
        }
    }

    /// Nodes with a live alive marker in Redis (this one included), for the dashboard; `None` while the link
    /// is down (asked only when up, so a dashboard poll never counts as a failed cluster request).
    pub fn nodes_known(&self) -> Option<u64> {
        if !self.is_up() {
            return None;
        }
        self.with_publisher(|conn| self.count_live_nodes(conn)).ok()
    }

    /// `"up"` or `"down"`, for `/healthz`.
    pub fn health(&self) -> &'static str {
        if self.is_up() {
            "up"
        } else {
            "down"
        }
    }

    /// Appends the cluster's numbers to a Prometheus text exposition.
    pub fn render_metrics(&self, out: &mut String) {
        use crate::metrics::Exposition;
        let mut out = Exposition::new(out);
        out.gauge(
            "densepush_cluster_link_up",
            "1 while the Redis link is up, 0 while it is down.",
            u64::from(self.is_up()),
        );
        out.counter(
            "densepush_cluster_published_total",
            "Publishes and kicks sent to the other nodes through Redis.",
            self.metrics.published.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_received_total",
            "Publishes and kicks received from other nodes.",
            self.metrics.received.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_failed_total",
            "Cluster publishes, kicks and presence queries answered 503 (Redis unreachable).",
            self.metrics.failed.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_invalid_messages_total",
            "Messages from Redis that did not decode or broke a rule (e.g. a kick's close code) and were dropped.",
            self.metrics.invalid.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_connects_total",
            "Times the Redis link came up.",
            self.metrics.connects.load(Relaxed),
        );
    }
}

/// Counts answers to one presence query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tally {
    connections: u64,
    answered: u64,
    known: u64,
}

impl Tally {
    /// Starts with this node's own count; `known` is the number of live nodes, this one included.
    fn new(local: u64, known: u64) -> Tally {
        Tally {
            connections: local,
            answered: 1,
            known,
        }
    }

    fn add(&mut self, connections: u64) {
        self.connections += connections;
        self.answered += 1;
    }

    /// Every node with a live marker has answered; nothing more is worth waiting for.
    fn complete(&self) -> bool {
        self.answered >= self.known
    }

    fn presence(&self) -> Presence {
        Presence {
            connections: self.connections,
            nodes: self.answered,
            // A node that answered is alive even if its marker has just expired or is not written yet.
            nodes_known: self.known.max(self.answered),
        }
    }
}

/// Doubling reconnection delay between a floor and a ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        debug_assert!(min <= max);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt; each call doubles the one after, up to the ceiling.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// After a success the next failure waits the floor again.
    fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_prefix() {
        let names = Names::new("dp");
        assert_eq!(names.bus, "dp:bus");
        assert_eq!(names.nodes, "dp:nodes");
        assert_eq!(names.reply("a-1"), "dp:reply:a-1");
        assert_eq!(names.marker("a-1"), "dp:node:a-1");
    }

    #[test]
    fn backoff_doubles_up_to_the_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn tally_is_complete_once_every_known_node_answered() {
        let mut t = Tally::new(2, 3);
        assert!(!t.complete());
        t.add(1);
        assert!(!t.complete());
        t.add(4);
        assert!(t.complete());
        assert_eq!(
            t.presence(),
            Presence {
                connections: 7,
                nodes: 3,
                nodes_known: 3
            }
        );
    }

    #[test]
    fn tally_of_a_lone_node_needs_no_answers() {
        assert!(Tally::new(5, 1).complete());
    }

    #[test]
    fn tally_never_reports_fewer_known_than_answered() {
        let mut t = Tally::new(0, 1);
        t.add(1);
        assert_eq!(t.presence().nodes_known, 2);
    }

    #[test]
    fn partial_tally_reports_who_answered() {
        let mut t = Tally::new(1, 3);
        t.add(2);
        assert_eq!(
            t.presence(),
            Presence {
                connections: 3,
                nodes: 2,
                nodes_known: 3
            }
        );
    }
}
