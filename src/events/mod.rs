//! Connection events: tells the backend, through `events.webhook_url`, when a connection opens or closes and
//! when a user's first connection on this node opens (`online`) or its last one closes (`offline`).
//!
//! It owns the node's bounded event queue, the thread that sends it in batches, and their counters. The
//! reactors only ever `try_send` into the queue: when it is full the event is dropped and counted
//! (`densepush_events_dropped_total{reason="queue_full"}`), so a webhook that is down or slow can never block a
//! reactor or make the node's memory grow. A failed request is retried after a jittered, doubling delay, at
//! most `events.max_retries` times, then its events are dropped and counted (`reason="failed"`); meanwhile new
//! events wait in the same bounded queue. Held at any time: at most `events.queue_size` queued events plus the
//! one batch (at most `events.max_batch`) being sent.
//!
//! `online` and `offline` are about the node, not one reactor: a user's connections land on any reactor. Each
//! reactor's fanout index knows when a user's first connection on that reactor opens and its last one closes;
//! only at those moments the reactor updates a node-wide count of the reactors holding the user ([`Online`],
//! sharded locks held for a hash-map update, never across I/O), and the update that takes it from 0 to 1 or
//! back queues the event under the same lock, so a user's `online` and `offline` alternate in the queue. That
//! count costs about 40 bytes per user with connections on this node, only while events are on.
//!
//! When a batch is due, what its body says and how long a retry waits are `batch` (sans-IO, tested); this file
//! is the handle the reactors call and the thin shell around the HTTP client (ureq on rustls with ring, as the
//! JWKS fetcher, bounded in time). It does not decide when a connection opened or closed (the reactor calls
//! [`Events::connected`] and [`Events::disconnected`] at those points).

pub mod batch;

use crate::config::{redact_url, EventsConfig};
use crate::metrics::{Exposition, MetricType};
use batch::{Batcher, Jitter};
use compact_str::CompactString;
use hashbrown::{DefaultHashBuilder, HashMap};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest the sender waits on an empty queue before it looks at its stop flag again.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Largest webhook answer body read (and discarded) so its connection can be reused.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;
/// Locks the node-wide online count is split over, so reactors that connect different users rarely meet.
const ONLINE_SHARDS: usize = 64;

/// What happened to a connection or a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A connection completed its upgrade.
    Connect,
    /// An upgraded connection is gone; the event carries its close code.
    Disconnect,
    /// The user's first connection on this node opened.
    Online,
    /// The user's last connection on this node closed.
    Offline,
}

impl EventKind {
    /// The `type` the webhook receives.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::Online => "online",
            EventKind::Offline => "offline",
        }
    }
}

/// One event while it waits in the queue: boxed strings, about 48 bytes plus the ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The user.
    pub user: Box<str>,
    /// The connection's client token (connect and disconnect only).
    pub client: Option<Box<str>>,
    /// The close code (disconnect only): the first close frame exchanged, 1005 for a client close without a
    /// code, 1006 when the connection ended without a close handshake.
    pub code: u16,
    /// When it happened, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// Why the events sender could not start.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// `events.ca_file` could not be read or holds no certificate.
    #[error("events.ca_file {}: {why}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The sender thread could not be started.
    #[error("starting the events sender: {0}")]
    Thread(#[from] std::io::Error),
}

/// The counters of the queue and the sender, rendered on `/metrics`.
#[derive(Debug, Default)]
pub struct EventMetrics {
    /// Gauge: events in the queue.
    pub queued: AtomicU64,
    /// Counter: events the webhook accepted (a 2xx answer).
    pub sent: AtomicU64,
    /// Counter: events dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Counter: events dropped after their request failed `events.max_retries + 1` times.
    pub dropped_failed: AtomicU64,
    /// Counter: requests answered 2xx.
    pub requests_ok: AtomicU64,
    /// Counter: requests that failed (an error, a timeout, or a status other than 2xx).
    pub requests_failed: AtomicU64,
}

/// How many reactors hold connections of each user: a user is online on the node while some reactor does.
#[derive(Debug)]
struct Online {
    hasher: DefaultHashBuilder,
    shards: Box<[Mutex<HashMap<CompactString, u32>>]>,
}

impl Online {
    fn new() -> Online {
        Online {
            hasher: DefaultHashBuilder::default(),
            shards: (0..ONLINE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<CompactString, u32>> {
        let at = self.hasher.hash_one(user) as usize % self.shards.len();
        self.shards[at].lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The node's events: the queue the reactors feed and the sender thread behind it.
#[derive(Debug)]
pub struct Events {
    queue: SyncSender<Event>,
    online: Online,
    capacity: usize,
    metrics: Arc<EventMetrics>,
    stop: Arc<AtomicBool>,
    /// Signalled by the sender when it has sent what it held after a stop.
    done: Mutex<Option<Receiver<()>>>,
}

impl Events {
    /// Starts the sender for `events.webhook_url`; `None` when it is empty (events off: the reactors then pay
    /// nothing). `node` is this node's id, written into every event.
    pub fn start(config: &EventsConfig, node: &str) -> Result<Option<Arc<Events>>, EventsError> {
        let Some(url) = config.webhook_url.clone() else {
            return Ok(None);
        };
        let agent = agent(config, &url)?;
        let (events, rx, done_tx) = Events::with_queue(config.queue_size);
        let sender = Sender {
            rx,
            agent,
            url,
            authorization: config.authorization.clone(),
            node: node.to_owned(),
            max_retries: config.max_retries,
            batcher: Batcher::new(config.max_batch, Duration::from_millis(config.batch_ms)),
            metrics: events.metrics.clone(),
            stop: events.stop.clone(),
            jitter: Jitter::new(seed()),
            failing: false,
        };
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                sender.run();
                let _ = done_tx.send(());
            })?;
        Ok(Some(events))
    }

    /// The handle and its queue's receiving end, for the sender thread (or a test), and the sender's end of the
    /// channel that says it has finished.
    fn with_queue(queue_size: usize) -> (Arc<Events>, Receiver<Event>, mpsc::Sender<()>) {
        let (queue, rx) = mpsc::sync_channel(queue_size);
        let (done_tx, done_rx) = mpsc::channel();
        let events = Arc::new(Events {
            queue,
            online: Online::new(),
            capacity: queue_size,
            metrics: Arc::new(EventMetrics::default()),
            stop: Arc::new(AtomicBool::new(false)),
            done: Mutex::new(Some(done_rx)),
        });
        (events, rx, done_tx)
    }

    /// Checks what [`Events::start`] would load (the CA file), for `densepush check-config`.
    pub fn check(config: &EventsConfig) -> Result<(), EventsError> {
        match (&config.webhook_url, &config.ca_file) {
            (Some(_), Some(path)) => read_ca_file(path).map(drop),
            _ => Ok(()),
        }
    }

    /// A connection of `user` completed its upgrade; `first` when it is the user's only one on the calling
    /// reactor (the reactor's fanout index knows). The user's `online` follows when no other reactor holds one.
    pub fn connected(&self, user: &str, client: Option<&str>, first: bool) {
        let at_ms = unix_ms();
        self.push(EventKind::Connect, user, client, 0, at_ms);
        if first {
            let mut shard = self.online.shard(user);
            let reactors = shard.entry(CompactString::from(user)).or_insert(0);
            *reactors += 1;
            if *reactors == 1 {
                // Under the shard's lock: this user's online and offline reach the queue in the order they happened.
                self.push(EventKind::Online, user, None, 0, at_ms);
            }
        }
    }

    /// A connection a predecessor process announced, taken over in a live upgrade: counted towards its user's
    /// presence as [`Events::connected`] counts, without an event (its `connect` and `online` were sent).
    pub fn adopted(&self, user: &str, first: bool) {
        if first {
            let mut shard = self.online.shard(user);
            *shard.entry(CompactString::from(user)).or_insert(0) += 1;
        }
    }

    /// A connection of `user` leaves this reactor for another of this process (a live upgrade placing it on
    /// its user's home reactor), where it is counted again with [`Events::adopted`]; `last` when it was the
    /// user's last on the reactor it leaves. No event: the user stays online.
    pub fn moving(&self, user: &str, last: bool) {
        if !last {
            return;
        }
        let mut shard = self.online.shard(user);
        if let Some(reactors) = shard.get_mut(user) {
            *reactors -= 1;
            if *reactors == 0 {
                shard.remove(user);
            }
        }
    }

    /// An upgraded connection of `user` is gone with close `code`; `last` when the user has no other one on the
    /// calling reactor. The user's `offline` follows when no other reactor holds one either.
    pub fn disconnected(&self, user: &str, client: Option<&str>, code: u16, last: bool) {
        let at_ms = unix_ms();
        self.push(EventKind::Disconnect, user, client, code, at_ms);
        if last {
            let mut shard = self.online.shard(user);
            let Some(reactors) = shard.get_mut(user) else {
                debug_assert!(false, "{user} left a reactor it never joined");
                return;
            };
            *reactors -= 1;
            if *reactors == 0 {
                shard.remove(user);
                self.push(EventKind::Offline, user, None, 0, at_ms);
            }
        }
    }

    /// Queues an event without ever waiting: a full queue drops it and counts it.
    fn push(&self, kind: EventKind, user: &str, client: Option<&str>, code: u16, at_ms: u64) {
        let event = Event {
            kind,
            user: user.into(),
            client: client.map(Into::into),
            code,
            at_ms,
        };
        // Counted before the send, so the sender never sees an event it could uncount below zero.
        self.metrics.queued.fetch_add(1, Relaxed);
        match self.queue.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.queued.fetch_sub(1, Relaxed);
                self.metrics.dropped_queue_full.fetch_add(1, Relaxed);
            }
        }
    }

    /// The counters.
    pub fn metrics(&self) -> &EventMetrics {
        &self.metrics
    }

    /// At shutdown, after the reactors closed their connections: sends what is queued (one attempt per
    /// request, no retries) and returns when that is done or `within` has passed, whichever comes first.
    pub fn finish(&self, within: Duration) {
        self.stop.store(true, Relaxed);
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(done) = done {
            let _ = done.recv_timeout(within);
        }
    }

    /// Appends the events numbers to a Prometheus text exposition.
    pub fn render_metrics(&self, out: &mut String) {
        let m = &self.metrics;
        let mut out = Exposition::new(out);
        out.gauge(
            "densepush_events_queued",
            "Connection events waiting to be sent.",
            m.queued.load(Relaxed),
        );
        out.gauge(
            "densepush_events_queue_capacity",
            "Connection events the queue holds at most (events.queue_size).",
            self.capacity as u64,
        );
        out.counter(
            "densepush_events_sent_total",
            "Connection events the webhook accepted.",
            m.sent.load(Relaxed),
        );
        out.family(
            "densepush_events_dropped_total",
            "Connection events dropped: the queue was full, or their request failed every retry.",
            MetricType::Counter,
            "reason",
            [
                ("queue_full", m.dropped_queue_full.load(Relaxed)),
                ("failed", m.dropped_failed.load(Relaxed)),
            ],
        );
        out.family(
            "densepush_events_requests_total",
            "Requests to events.webhook_url, by result (failed: an error, a timeout or a status other than 2xx).",
            MetricType::Counter,
            "result",
            [
                ("ok", m.requests_ok.load(Relaxed)),
                ("failed", m.requests_failed.load(Relaxed)),
            ],
        );
    }
}

/// The sender thread's state.
struct Sender {
    rx: Receiver<Event>,
    agent: ureq::Agent,
    url: String,
    authorization: Option<String>,
    node: String,
    max_retries: u32,
    batcher: Batcher,
    metrics: Arc<EventMetrics>,
    stop: Arc<AtomicBool>,
    jitter: Jitter,
    /// The last request failed: the next failure is not logged again, the next success is.
    failing: bool,
}

impl Sender {
    /// Gathers events into batches and sends each when it is due, until stopped and empty.
    fn run(mut self) {
        loop {
            let stopping = self.stop.load(Relaxed);
            let gone = !self.gather(stopping);
            let now = Instant::now();
            if self.batcher.is_due(now) || ((stopping || gone) && !self.batcher.is_empty()) {
                let events = self.batcher.take();
                self.deliver(&events, stopping || gone);
            } else if (stopping || gone) && self.batcher.is_empty() {
                return;
            }
        }
    }

    /// Waits for events until the batch is due (never longer than [`IDLE_POLL`], so a stop is seen) and takes
    /// what is queued, up to a full batch. False when every handle is gone and the queue is empty.
    fn gather(&mut self, stopping: bool) -> bool {
        if self.batcher.is_full() {
            return true;
        }
        let now = Instant::now();
        let wait = match (stopping, self.batcher.deadline()) {
            (true, _) => Duration::ZERO,
            (false, Some(deadline)) => deadline.saturating_duration_since(now).min(IDLE_POLL),
            (false, None) => IDLE_POLL,
        };
        let first = match self.rx.recv_timeout(wait) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        };
        self.take(first);
        while !self.batcher.is_full() {
            match self.rx.try_recv() {
                Ok(event) => self.take(event),
                Err(_) => break,
            }
        }
        true
    }

    fn take(&mut self, event: Event) {
        self.metrics.queued.fetch_sub(1, Relaxed);
        self.batcher.push(event, Instant::now());
    }

    /// Sends one batch, retrying a failed request after a jittered delay (not when `last`: at shutdown each
    /// request gets one attempt); a batch that fails every attempt is dropped and counted.
    fn deliver(&mut self, events: &[Event], last: bool) {
        let body = batch::encode(events, &self.node);
        let retries = if last { 0 } else { self.max_retries };
        for retry in 0..=retries {
            if retry > 0 {
                std::thread::sleep(batch::retry_delay(retry - 1, self.jitter.next_u64()));
            }
            match self.post(&body) {
                Ok(()) => {
                    self.metrics.requests_ok.fetch_add(1, Relaxed);
                    self.metrics.sent.fetch_add(events.len() as u64, Relaxed);
                    if std::mem::take(&mut self.failing) {
                        log::info!("events: {} answers again", redact_url(&self.url));
                    }
                    return;
                }
                Err(why) => {
                    self.metrics.requests_failed.fetch_add(1, Relaxed);
                    // Logged once per run of failures: a webhook that is down would flood the log otherwise.
                    if !std::mem::replace(&mut self.failing, true) {
                        log::warn!(
                            "events: POST {} failed ({why}); retrying up to {} times per batch, then dropping \
                             (densepush_events_dropped_total)",
                            redact_url(&self.url),
                            self.max_retries
                        );
                    } else {
                        log::debug!("events: POST failed again: {why}");
                    }
                }
            }
        }
        self.metrics
            .dropped_failed
            .fetch_add(events.len() as u64, Relaxed);
    }

    /// One request: 2xx is success; the answer's body is read (bounded) and discarded so the connection can
    /// carry the next request.
    fn post(&self, body: &[u8]) -> Result<(), String> {
        let mut request = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        let mut response = request.send(body).map_err(|e| e.to_string())?;
        let status = response.status();
        let _ = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    }
}

/// The HTTP client: rustls with ring, the bundled Mozilla roots or `events.ca_file`'s, every request bounded by
/// `events.timeout_ms`, no redirects (a webhook that moved is an error to see, not to follow with the body), and
/// every status returned as it is (non-2xx is a failed request).
fn agent(config: &EventsConfig, url: &str) -> Result<ureq::Agent, EventsError> {
    use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
    let mut tls = TlsConfig::builder().provider(TlsProvider::Rustls);
    if let Some(path) = &config.ca_file {
        tls = tls.root_certs(RootCerts::from(read_ca_file(path)?));
    }
    let agent_config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(config.timeout_ms)))
        .https_only(url.starts_with("https://"))
        .max_redirects(0)
        .http_status_as_error(false)
        .user_agent(concat!("densepush/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls.build())
        .build();
    Ok(ureq::Agent::new_with_config(agent_config))
}

/// The certificates of a PEM bundle, for `events.ca_file`.
fn read_ca_file(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, EventsError> {
    let bad = |why: String| EventsError::CaFile {
        path: path.to_owned(),
        why,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&bytes) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(cert)) => certs.push(cert),
            Ok(_) => return Err(bad("holds a private key; give only CA certificates".into())),
            Err(e) => return Err(bad(format!("is not PEM ({e})"))),
        }
    }
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A seed for the retry jitter that differs between nodes and restarts.
fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, queue_size: usize) -> EventsConfig {
        EventsConfig {
            webhook_url: Some(url.into()),
            authorization: None,
            batch_ms: 10,
            max_batch: 100,
            queue_size,
            timeout_ms: 200,
            max_retries: 0,
            ca_file: None,
        }
    }

    #[test]
    fn no_webhook_means_no_events_at_all() {
        let mut c = config("http://127.0.0.1:9/", 4);
        c.webhook_url = None;
        assert!(Events::start(&c, "n").unwrap().is_none());
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        // A webhook that takes connections and never answers: the sender's first request hangs until its
        // timeout, holding one batch, while the reactors' side keeps pushing.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", silent.local_addr().unwrap());
        let events = Events::start(&config(&url, 4), "n").unwrap().unwrap();
        let started = Instant::now();
        for i in 0..10_000 {
            events.connected(&i.to_string(), None, true);
        }
        // Waiting for room would take a request timeout per batch of the 20,000 events: minutes, not seconds.
        // The bound is loose because a debug build on a busy machine is slow, not because it may wait.
        assert!(started.elapsed() < Duration::from_secs(20), "never waits");
        let m = events.metrics();
        let dropped = m.dropped_queue_full.load(Relaxed);
        // At most the queue (4) and one batch (100) per request the sender started are held or sent: one while
        // the first request hangs, one more after each request that timed out meanwhile (read after `dropped`,
        // so it can only over-count, which loosens the bound).
        let started_requests = m.requests_failed.load(Relaxed) + 1;
        assert!(
            dropped >= 20_000 - 4 - 100 * started_requests,
            "dropped {dropped} with {started_requests} requests"
        );
        assert!(m.queued.load(Relaxed) <= 4);
        events.finish(Duration::from_secs(5));
        let m = events.metrics();
        assert_eq!(m.queued.load(Relaxed), 0);
        assert_eq!(m.sent.load(Relaxed), 0);
        assert_eq!(
            m.dropped_queue_full.load(Relaxed) + m.dropped_failed.load(Relaxed),
            20_000,
            "every event is sent or counted as dropped"
        );
        assert!(m.requests_failed.load(Relaxed) >= 1);
    }

    #[test]
    fn online_and_offline_are_about_the_node_not_one_reactor() {
        let (events, rx, _done) = Events::with_queue(64);
        // The user's first connection on two reactors and a second one on one of them; then the last one on
        // each reactor; then it comes back.
        events.connected("u", Some("a"), true);
        events.connected("u", Some("b"), true);
        events.connected("u", Some("c"), false);
        events.disconnected("u", Some("c"), 1000, false);
        events.disconnected("u", Some("a"), 1000, true);
        events.disconnected("u", Some("b"), 1006, true);
        events.connected("u", None, true);
        let got: Vec<(EventKind, Option<Box<str>>, u16)> =
            rx.try_iter().map(|e| (e.kind, e.client, e.code)).collect();
        use EventKind::*;
        let some = |c: &str| Some(Box::<str>::from(c));
        assert_eq!(
            got,
            [
                (Connect, some("a"), 0),
                (Online, None, 0),
                (Connect, some("b"), 0),
                (Connect, some("c"), 0),
                (Disconnect, some("c"), 1000),
                (Disconnect, some("a"), 1000),
                (Disconnect, some("b"), 1006),
                (Offline, None, 0),
                (Connect, None, 0),
                (Online, None, 0),
            ]
        );
        assert_eq!(events.online.shard("u").get("u"), Some(&1));
        events.disconnected("u", None, 1000, true);
        assert!(
            events.online.shard("u").is_empty(),
            "an offline user costs nothing"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not pem").unwrap();
        let mut c = config("https://h.example/", 4);
        c.ca_file = Some(path);
        let err = Events::check(&c).unwrap_err().to_string();
        assert!(err.starts_with("events.ca_file"), "{err}");
    }
}
