//! The cluster: several densepush nodes joined through one Redis, so a backend can publish to, kick and count
//! the connections of any node through any node's admin API, and no node loses a message without telling the
//! connections it was for.
//!
//! It owns the node's Redis connections and threads (`reader`: the bus; `bridge`: presence and heartbeats),
//! the bus's sequence rules (`bus`, sans-IO), the scripts that append to it (`scripts`), the message layout
//! (`wire`, sans-IO) and the keys of shared history (`history`). It does not touch client connections or
//! mailboxes: what arrives from the bus takes the same publish path as a local publish (`publish`), and kicks,
//! presence and gap notices go through the reactors' handle (`dispatch`).
//!
//! Design, in short:
//! - The bus is a Redis stream, `{prefix}:bus`. Publishes and kicks are appended to it as entries `{epoch}-*`,
//!   which Redis numbers without holes within the epoch (`bus`; a script when the stream must be started,
//!   `scripts`), with a cap of `cluster.bus_max_len` entries. A 202 means the entry is in the stream.
//! - Every node, the publishing one included, applies every entry in stream order from its own reader thread
//!   (`XREAD BLOCK` from the last entry it applied). So every node delivers one cluster-wide order, exactly
//!   once: a reconnection, however long, continues from the node's position as long as that is still in the
//!   stream; and when it is not (trimmed, or the stream lost with a Redis restart), the node knows it and
//!   tells its connections (`message::missed`) before applying anything after the hole.
//! - The reader never lets a reactor's mailbox pass `dispatch::MAX_PENDING_COMMANDS`: a node whose reactors
//!   are behind stops reading and catches up later from its position; the stream holds what it has not read.
//! - Presence is a question on the pub/sub channel `{prefix}:presence` that every live node answers with its
//!   local count on the asker's `{prefix}:reply:{node}`; a heartbeat keeps an alive marker per node
//!   (`{prefix}:node:{id}`, expiring after `node_ttl_ms`, listed in `{prefix}:nodes`), so the asking node knows
//!   how many answers to wait for. A lost question or answer only makes a count partial, and says so.
//! - When Redis is unreachable the link is down: publishes and kicks get 503, the reader reconnects with
//!   exponential backoff and logs once per state change.

mod bridge;
pub mod bus;
pub mod history;
mod reader;
pub mod scripts;
pub mod wire;

use crate::config::{redact_url, ClusterConfig};
use crate::dispatch::{Answers, Subscribed, Subscription, REPLY_TIMEOUT};
use crate::message::missed::Told;
use crate::message::{stream_of, Target};
use crate::metrics::MetricType;
use crate::publish::{BatchItem, Publisher};
use bus::{BusPosition, Cursor};
use std::collections::HashMap;
use std::ops::AddAssign;
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
    /// Counter: publishes and kicks this node appended to the bus.
    pub published: AtomicU64,
    /// Counter: publishes and kicks from other nodes applied here.
    pub received: AtomicU64,
    /// Counter: publishes, kicks and presence queries answered 503 because Redis did not take them.
    pub failed: AtomicU64,
    /// Counter: bus entries or pub/sub messages that did not decode, or broke a rule such as a kick's close
    /// code (dropped).
    pub invalid: AtomicU64,
    /// Counter: times the bus link came up (the first connection included).
    pub connects: AtomicU64,
    /// Counter: bus messages over `admin.max_publish_bytes` (dropped; their target's connections were told).
    pub oversize: AtomicU64,
    /// Counter: bus gaps because entries were trimmed before this node read them.
    pub gaps_trimmed: AtomicU64,
    /// Counter: bus gaps because the stream was lost (a new bus epoch).
    pub gaps_new_epoch: AtomicU64,
    /// Counter: bus entries known to be lost to trimming.
    pub lost: AtomicU64,
    /// Counter: reconnections that found fewer entries than this node had applied (a failover lost some).
    pub rewinds: AtomicU64,
    /// Counter: times the reader paused because a reactor's mailbox was near the pending bound.
    pub stalls: AtomicU64,
    /// Gauge: the most commands pending in any mailbox right after the reader queued a batch.
    pub pending_high_water: AtomicU64,
    /// Gauge: the number of the last bus entry applied.
    pub position: AtomicU64,
    /// Gauge: entries between this node's position and the end of the bus, at the last check.
    pub lag: AtomicU64,
    /// Counter: presence queries from other nodes dropped because the worker's queue was full.
    pub presence_dropped: AtomicU64,
    /// Connections told they may have missed messages (counted by the reactors).
    pub told: Arc<Told>,
}

/// The Redis names of one cluster, derived from the channel prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The bus: a stream key.
    pub bus: String,
    /// The pub/sub channel presence queries go to.
    pub presence: String,
    /// The set listing node ids that have sent a heartbeat.
    pub nodes: String,
    prefix: String,
}

impl Names {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Names {
        Names {
            bus: format!("{prefix}:bus"),
            presence: format!("{prefix}:presence"),
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

/// Link state: the bus reader owns it; the admin thread and the worker read it.
#[derive(Debug)]
struct Link {
    up: AtomicBool,
    /// Bumped each time the reader (re)connects, so connections opened before are replaced.
    generation: AtomicU64,
    last_error: Mutex<String>,
}

/// The admin thread's connection for appends and presence look-ups.
struct PublishConn {
    conn: Option<(redis::Connection, u64)>,
}

/// A live upgrade's request to stop the reader, and the position it stopped at.
#[derive(Debug, Default)]
struct Handoff {
    requested: AtomicBool,
    stopped_at: Mutex<Option<Option<BusPosition>>>,
    /// The Redis client id of the reader's current connection (0: none yet), so a handoff can end its
    /// `XREAD BLOCK` at once (`CLIENT UNBLOCK`) instead of adding up to a poll interval to the upgrade's pause.
    reader_client: AtomicU64,
}

/// Admin requests waiting for this node's reactors to apply an entry they appended (a kick, a subscription
/// change), by request id: the reader hands the sender to the reactors when the entry comes back from the bus,
/// so the count is taken in bus order, after everything appended before it.
struct Waiters<T>(Mutex<HashMap<u64, mpsc::Sender<T>>>);

impl<T> Default for Waiters<T> {
    fn default() -> Self {
        Waiters(Mutex::new(HashMap::new()))
    }
}

impl<T> Waiters<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::Sender<T>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the reactors' answers to `request` will arrive.
    fn register(&self, request: u64) -> mpsc::Receiver<T> {
        let (reply, answers) = mpsc::channel();
        self.lock().insert(request, reply);
        answers
    }

    /// The reply channel of `request`, if its admin request still waits (the reader takes it once).
    fn take(&self, request: u64) -> Option<mpsc::Sender<T>> {
        self.lock().remove(&request)
    }
}

/// A node's handle on the cluster; shared by the admin thread and the cluster threads.
pub struct Cluster {
    settings: ClusterConfig,
    /// The largest payload a bus message may carry here (`admin.max_publish_bytes`).
    max_payload_bytes: usize,
    names: Names,
    client: redis::Client,
    /// This node's publish path: every bus publish is framed, stored and delivered through it.
    local: Publisher,
    link: Link,
    publisher: Mutex<PublishConn>,
    /// Presence queries waiting for answers, by request id; the presence subscriber routes answers here.
    pending: Mutex<HashMap<u64, mpsc::SyncSender<u64>>>,
    /// This node's kicks waiting for its reactors' count.
    kicks: Waiters<usize>,
    /// This node's subscription changes waiting for its reactors' counts.
    subscriptions: Waiters<Subscribed>,
    next_request: AtomicU64,
    /// The bus epoch the last append used (0: not known yet), so the next one is a plain `XADD {epoch}-*`.
    bus_epoch: AtomicU64,
    stop: AtomicBool,
    handoff: Handoff,
    /// Counters for `/metrics`.
    pub metrics: ClusterMetrics,
}

impl Cluster {
    /// Starts the cluster threads for the configured Redis; `None` when `cluster.redis_url` is empty. The bus
    /// reader starts at `resume` (a predecessor's position, handed over by a live upgrade) or, without one, at
    /// the end of the bus. The node starts even when Redis is unreachable: local connections work, cluster
    /// publishes get 503 until the link is up.
    pub fn start(
        settings: &ClusterConfig,
        max_payload_bytes: usize,
        local: Publisher,
        resume: Option<BusPosition>,
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
            max_payload_bytes,
            client,
            local,
            link: Link {
                up: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                last_error: Mutex::new("not connected yet".into()),
            },
            publisher: Mutex::new(PublishConn { conn: None }),
            pending: Mutex::new(HashMap::new()),
            kicks: Waiters::default(),
            subscriptions: Waiters::default(),
            next_request: AtomicU64::new(1),
            bus_epoch: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            handoff: Handoff::default(),
            metrics: ClusterMetrics::default(),
        });
        reader::spawn(cluster.clone(), Cursor::new(resume))?;
        bridge::spawn(cluster.clone())?;
        Ok(Some(cluster))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    /// True while the bus reader holds a live link.
    pub fn is_up(&self) -> bool {
        self.link.up.load(SeqCst)
    }

    /// Waits up to `timeout` for the link to come up; true if it did. The server waits for the first link
    /// before its reactors accept clients, so no client connects before the node knows where it is in the bus.
    pub fn wait_until_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_up() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Appends a publish to the bus. `Ok` means it is in the stream: every node, this one included, will
    /// deliver it in bus order (the caller must not deliver it itself).
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
        self.append(&bytes).map(drop)
    }

    /// Stamps a message of a stream that keeps history with its epoch and next offset in Redis, logs it for
    /// backfill and appends it to the bus, in one script ([`scripts::STAMPED`]). `Ok` carries the epoch and
    /// offset; as with [`Cluster::publish`], every node, this one included, delivers it from the bus.
    pub fn publish_stamped(
        &self,
        target: &Target,
        binary: bool,
        payload: &[u8],
        limits: &crate::history::store::Limits,
        candidate_epoch: &str,
    ) -> Result<(String, u64), ClusterError> {
        let (stream, _, client) = stream_of(target);
        let [epoch_key, offset_key, log_key] =
            history::keys(&self.settings.channel_prefix, &stream);
        let head = wire::encode_stamped_head(self.node_id(), target, binary);
        let result = self.with_publisher(|conn| {
            scripts::STAMPED.invoke::<(String, u64)>(conn, 4, |cmd| {
                cmd.arg(&epoch_key)
                    .arg(&offset_key)
                    .arg(&log_key)
                    .arg(&self.names.bus)
                    .arg(&head)
                    .arg(payload)
                    .arg(candidate_epoch)
                    .arg(limits.size)
                    .arg(limits.ttl_ms.max(1))
                    .arg(client.unwrap_or(""))
                    .arg(if binary { "1" } else { "0" })
                    .arg(self.settings.bus_max_len);
            })
        });
        if result.is_ok() {
            self.metrics.published.fetch_add(1, Relaxed);
        }
        result
    }

    /// Reads offsets `from..=to` of a stream's shared log on `conn` (the reader's), if the stream is still in
    /// `epoch`. An error is returned so the caller stops using a connection that may be out of step; what the
    /// log no longer holds gives a shorter backfill, and then earlier positions get a resync.
    fn fetch_backfill(
        &self,
        conn: &mut redis::Connection,
        stream: &str,
        epoch: &str,
        from: u64,
        to: u64,
    ) -> redis::RedisResult<Vec<crate::history::Backfill>> {
        let [epoch_key, _, log_key] = history::keys(&self.settings.channel_prefix, stream);
        let (current, entries): (Option<String>, Vec<history::LogEntry>) = redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(&epoch_key)
            .cmd("XRANGE")
            .arg(&log_key)
            .arg(format!("{from}-1"))
            .arg(format!("{to}-1"))
            .query(conn)?;
        if current.as_deref() != Some(epoch) {
            return Ok(Vec::new());
        }
        let mut backfill = history::parse_log(&entries);
        // Held to the same limit as a bus message: what follows an oversized one would not be contiguous.
        if let Some(cut) = backfill
            .iter()
            .position(|b| b.payload.len() > self.max_payload_bytes)
        {
            backfill.truncate(cut);
        }
        Ok(backfill)
    }

    /// Forgets a stream's shared history in Redis; its next message starts a new epoch on every node.
    pub fn delete_history(&self, stream: &str) -> Result<(), ClusterError> {
        let keys = history::keys(&self.settings.channel_prefix, stream);
        self.with_publisher(|conn| redis::cmd("DEL").arg(&keys[..]).query::<i64>(conn))
            .map(drop)
    }

    /// Appends a kick to the bus and waits (up to [`REPLY_TIMEOUT`]) until this node's reactors have applied it
    /// in bus order, after every message appended before it. `Ok(Some(n))`: `n` connections closed here (the
    /// other nodes close theirs as they apply it); `Ok(None)`: the kick is on the bus and will be applied, but
    /// this node's count did not come in time.
    pub fn kick(
        &self,
        target: &Target,
        code: u16,
        reason: &str,
    ) -> Result<Option<usize>, ClusterError> {
        let request = self.next_request.fetch_add(1, Relaxed);
        let bytes = wire::encode(
            self.node_id(),
            &Body::Kick {
                request,
                target: target.clone(),
                code,
                reason: reason.to_owned(),
            },
        );
        self.append_and_wait(&self.kicks, request, &bytes)
    }

    /// Appends a subscription change to the bus and waits (up to [`REPLY_TIMEOUT`]) for this node's reactors to
    /// apply it in bus order, as [`Cluster::kick`] does: every node changes its connections' memberships after
    /// every message appended before the change and before every one appended after it. `Ok(Some(counts))`: this
    /// node's counts; `Ok(None)`: the change is on the bus and will be applied, but this node's counts did not
    /// come in time.
    pub fn subscribe(&self, change: &Subscription) -> Result<Option<Subscribed>, ClusterError> {
        let request = self.next_request.fetch_add(1, Relaxed);
        let bytes = wire::encode(
            self.node_id(),
            &Body::Subscribe {
                request,
                change: change.clone(),
            },
        );
        self.append_and_wait(&self.subscriptions, request, &bytes)
    }

    /// Appends an entry that carries `request` and collects this node's reactors' answers once the reader has
    /// applied it, until [`REPLY_TIMEOUT`] after the append.
    fn append_and_wait<T: Default + AddAssign>(
        &self,
        waiters: &Waiters<T>,
        request: u64,
        bytes: &[u8],
    ) -> Result<Option<T>, ClusterError> {
        // Registered before the append: the reader may apply the entry before the append returns.
        let answers = waiters.register(request);
        if let Err(e) = self.append(bytes) {
            waiters.take(request);
            return Err(e);
        }
        let reactors = self.local.reactors().len();
        let counted = Answers::collect(&answers, reactors, Instant::now() + REPLY_TIMEOUT);
        waiters.take(request);
        Ok(counted.total())
    }

    /// Appends a whole batch to the bus as one entry. `kept` has one flag per target of every item, in order:
    /// the targets whose streams keep history, which Redis places in their streams' shared history in the same
    /// atomic step ([`scripts::STAMPED_BATCH`]; without any, a plain append). `Ok` carries the kept targets'
    /// epochs and offsets, in order; as with [`Cluster::publish`], every node, this one included, delivers the
    /// batch from the bus, at one point of the bus order and in the body's order. A batch is never in the bus in
    /// part: an `Err` means it went out whole (if Redis ran the script before the error) or not at all.
    pub fn publish_batch(
        &self,
        items: &[BatchItem],
        kept: &[bool],
        limits: &crate::history::store::Limits,
        candidate_epoch: &str,
    ) -> Result<Vec<(String, u64)>, ClusterError> {
        let (message, payloads) = wire::encode_batch_head(self.node_id(), items, kept);
        if !kept.contains(&true) {
            return self.append(&message).map(|()| Vec::new());
        }
        let mut keys = vec![self.names.bus.clone()];
        let mut args: Vec<String> = Vec::new();
        let targets = items.iter().zip(&payloads).flat_map(|(item, payload)| {
            item.targets
                .iter()
                .map(move |target| (target, item.binary, payload))
        });
        for ((target, binary, payload), _) in targets.zip(kept).filter(|(_, &kept)| kept) {
            let (stream, _, client) = stream_of(target);
            keys.extend(history::keys(&self.settings.channel_prefix, &stream));
            args.extend([
                (payload.start + 1).to_string(),
                payload.end.to_string(),
                client.unwrap_or("").to_owned(),
                if binary { "1" } else { "0" }.to_owned(),
            ]);
        }
        let result = self.with_publisher(|conn| {
            scripts::STAMPED_BATCH.invoke::<Vec<(String, u64)>>(conn, keys.len(), |cmd| {
                cmd.arg(&keys)
                    .arg(&message)
                    .arg(candidate_epoch)
                    .arg(limits.size)
                    .arg(limits.ttl_ms.max(1))
                    .arg(self.settings.bus_max_len)
                    .arg(&args);
            })
        });
        if result.is_ok() {
            self.metrics.published.fetch_add(1, Relaxed);
        }
        result
    }

    /// Appends one wire message to the bus. Usually one plain `XADD NOMKSTREAM {epoch}-*` with the epoch the
    /// last append used: Redis numbers the entry. When the stream is gone (`NOMKSTREAM` answers nil) or is of
    /// another epoch now (Redis refuses an id below the stream's last), [`scripts::APPEND`] appends under the
    /// stream's epoch or starts a new one, atomically.
    fn append(&self, bytes: &[u8]) -> Result<(), ClusterError> {
        let known = self.bus_epoch.load(Relaxed);
        let max_len = self.settings.bus_max_len;
        let result = self.with_publisher(|conn| {
            if known != 0 {
                let fast: redis::RedisResult<Option<String>> = redis::cmd("XADD")
                    .arg(&self.names.bus)
                    .arg("NOMKSTREAM")
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(max_len)
                    .arg(format!("{known}-*"))
                    .arg("m")
                    .arg(bytes)
                    .query(conn);
                match fast {
                    Ok(Some(id)) => return Ok(id),
                    Ok(None) => {}
                    Err(e) if e.to_string().contains("equal or smaller") => {}
                    Err(e) => return Err(e),
                }
            }
            scripts::APPEND.invoke::<String>(conn, 1, |cmd| {
                cmd.arg(&self.names.bus).arg(max_len).arg(bytes);
            })
        });
        let id = result?;
        if let Some(entry) = bus::parse_id(&id) {
            self.bus_epoch.store(entry.epoch, Relaxed);
        }
        self.metrics.published.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Asks every other live node for the user's connection count and adds `local`. Waits up to
    /// `cluster.presence_timeout_ms`, less when every node with a live alive marker has answered.
    pub fn presence(&self, user: &str, local: u64) -> Result<Presence, ClusterError> {
        let request = self.next_request.fetch_add(1, Relaxed);
        // As many answers as nodes could send fit; more (duplicates, a foreign publisher) are dropped.
        let (tx, rx) = mpsc::sync_channel(PRESENCE_ANSWERS);
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
                .arg(&self.names.presence)
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
    /// reader's current link. Any error drops the connection, so the next call starts afresh.
    fn with_publisher<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, ClusterError> {
        // Fail fast while the reader knows Redis is gone: the admin thread must not wait on timeouts.
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

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::SyncSender<u64>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the cluster threads and removes this node's alive marker, so the others stop counting it at once.
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

    /// For a live upgrade: stops the bus reader between two entries and returns its position, waiting up to
    /// `timeout`. Every entry up to the position has been handed to the reactors (their mailboxes and the
    /// connections they move to the successor hold what is not written yet); nothing after it has. A successor
    /// started with this position ([`Cluster::start`]) applies exactly the entries after it, so nothing is lost
    /// or delivered twice across the cut. `Some(None)` means the reader had never linked (the successor starts
    /// at the end, as a fresh node would); `None` that it did not stop in time. Heartbeats and presence keep
    /// running until [`Cluster::leave`] is called, or the process exits without leaving (the successor
    /// keeps the node id and renews its marker).
    pub fn hand_over(&self, timeout: Duration) -> Option<Option<BusPosition>> {
        self.handoff.requested.store(true, SeqCst);
        let deadline = Instant::now() + timeout;
        // The reader may be blocked in `XREAD BLOCK` for up to a poll interval: end that read now (it returns
        // as a timeout would, and the reader sees the request). Best effort: without it the reader still stops
        // at its next poll.
        let reader = self.handoff.reader_client.load(SeqCst);
        if reader != 0 {
            if let Ok(mut conn) = self.connect() {
                let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                    .arg("UNBLOCK")
                    .arg(reader)
                    .query(&mut conn);
            }
        }
        loop {
            if let Some(at) = *self
                .handoff
                .stopped_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
            {
                return Some(at);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// After a live upgrade that rolled back: the bus reader that [`Cluster::hand_over`] stopped carries on
    /// from the position it stopped at, so this process goes on as if nothing happened (a reader that had not
    /// stopped yet just keeps going).
    pub fn resume_after_hand_over(self: &Arc<Self>) {
        let mut stopped = self
            .handoff
            .stopped_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Under the lock the reader takes to stop: it either stopped already (and is restarted here), or sees
        // the request withdrawn and carries on.
        self.handoff.requested.store(false, SeqCst);
        if let Some(position) = stopped.take() {
            if let Err(e) = reader::spawn(self.clone(), Cursor::new(position)) {
                log::error!(
                    "cluster: cannot restart the bus reader after a rolled-back upgrade: {e}"
                );
            }
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
        let m = &self.metrics;
        let mut out = Exposition::new(out);
        out.gauge(
            "densepush_cluster_link_up",
            "1 while the Redis link is up, 0 while it is down.",
            u64::from(self.is_up()),
        );
        out.counter(
            "densepush_cluster_published_total",
            "Publishes and kicks this node appended to the cluster bus.",
            m.published.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_received_total",
            "Publishes and kicks from other nodes applied here.",
            m.received.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_failed_total",
            "Cluster publishes, kicks and presence queries answered 503 (Redis unreachable).",
            m.failed.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_invalid_messages_total",
            "Bus entries and presence messages that did not decode or broke a rule (e.g. a kick's close code); dropped.",
            m.invalid.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_connects_total",
            "Times the Redis link came up.",
            m.connects.load(Relaxed),
        );
        out.gauge(
            "densepush_cluster_bus_position",
            "Number of the last bus entry this node applied.",
            m.position.load(Relaxed),
        );
        out.gauge(
            "densepush_cluster_bus_lag",
            "Bus entries after this node's position, at the last check (every heartbeat).",
            m.lag.load(Relaxed),
        );
        out.family(
            "densepush_cluster_bus_gaps_total",
            "Times this node found bus entries it can never read, by cause; its connections were told.",
            MetricType::Counter,
            "reason",
            [
                ("trimmed", m.gaps_trimmed.load(Relaxed)),
                ("new_epoch", m.gaps_new_epoch.load(Relaxed)),
            ],
        );
        out.counter(
            "densepush_cluster_bus_lost_entries_total",
            "Bus entries trimmed before this node read them.",
            m.lost.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_bus_rewinds_total",
            "Reconnections that found fewer bus entries than this node had applied (a failover lost some).",
            m.rewinds.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_oversize_dropped_total",
            "Bus messages over admin.max_publish_bytes, dropped; their target's connections were told.",
            m.oversize.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_missed_resyncs_total",
            "Recovering connections sent resync notices because bus messages for them were lost.",
            m.told.resynced.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_missed_closes_total",
            "Connections closed with 1012 because bus messages for them were lost.",
            m.told.closed.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_bus_stalls_total",
            "Times the bus reader paused because a reactor's mailbox was near the pending bound.",
            m.stalls.load(Relaxed),
        );
        out.gauge(
            "densepush_cluster_bus_pending_high_water",
            "Most commands pending in one mailbox right after the bus reader queued a batch.",
            m.pending_high_water.load(Relaxed),
        );
        out.counter(
            "densepush_cluster_presence_dropped_total",
            "Presence queries from other nodes dropped because the worker's queue was full.",
            m.presence_dropped.load(Relaxed),
        );
    }
}

/// Answers one presence query can collect; more are dropped.
const PRESENCE_ANSWERS: usize = 256;

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

/// Whether the last state change logged was "up"; `None` before the first attempt, so the first outcome of
/// either kind is logged.
struct StateLog(Option<bool>);

impl StateLog {
    /// Logs `message` (info when up, warning when down) if `up` differs from the last state logged; true if
    /// it did.
    fn record(&mut self, up: bool, message: impl FnOnce() -> String) -> bool {
        if self.0 == Some(up) {
            return false;
        }
        self.0 = Some(up);
        let message = message();
        if up {
            log::info!("{message}");
        } else {
            log::warn!("{message}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_prefix() {
        let names = Names::new("dp");
        assert_eq!(names.bus, "dp:bus");
        assert_eq!(names.presence, "dp:presence");
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
    fn state_changes_are_logged_once_each() {
        let mut log = StateLog(None);
        assert!(log.record(false, || "down".into()), "the first outcome");
        assert!(!log.record(false, || unreachable!("not built again")));
        assert!(log.record(true, || "up".into()));
        assert!(!log.record(true, || unreachable!()));
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
