//! Counters and gauges, written by the thread that owns them and read by the admin thread for `/metrics`.
//!
//! It owns the numbers and their Prometheus text rendering; it does not decide what to count. Each reactor has
//! its own `ReactorMetrics` (one writer, relaxed atomics, no contention); hot loops add once per batch. The
//! text format itself is [`Exposition`]'s (in `exposition`), shared with the history and cluster numbers.

mod exposition;
pub mod heap;
mod keys;

use crate::budget::Budget;
pub use exposition::{Exposition, MetricType};
pub use keys::{KeyMetrics, KEY_SOURCE_LABELS};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Labels of handshake rejections, indexed by [`RejectKind`].
pub const REJECT_LABELS: [&str; 8] = [
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "upgrade_required",
    "head_too_large",
    "unavailable",
    "timeout",
];

/// Why a handshake was refused; the index into [`REJECT_LABELS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// 400
    BadRequest = 0,
    /// 401
    Unauthorized = 1,
    /// 403 (origin)
    Forbidden = 2,
    /// 404
    NotFound = 3,
    /// 426
    UpgradeRequired = 4,
    /// 431
    HeadTooLarge = 5,
    /// 503 (connection limit)
    Unavailable = 6,
    /// No complete request within the handshake timeout.
    Timeout = 7,
}

impl RejectKind {
    /// The kind for an HTTP status the handshake answered with.
    pub fn from_status(status: u16) -> RejectKind {
        match status {
            401 => RejectKind::Unauthorized,
            403 => RejectKind::Forbidden,
            404 => RejectKind::NotFound,
            426 => RejectKind::UpgradeRequired,
            431 => RejectKind::HeadTooLarge,
            503 => RejectKind::Unavailable,
            _ => RejectKind::BadRequest,
        }
    }
}

/// Labels of publish targets, indexed by [`TargetKind`].
pub const TARGET_LABELS: [&str; 4] = ["user", "user_client", "channel", "all"];

/// Kind of publish target; the index into [`TARGET_LABELS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// Every connection of a user.
    User = 0,
    /// The connections of a user with one client token.
    UserClient = 1,
    /// Every subscriber of a channel.
    Channel = 2,
    /// Every connection.
    All = 3,
}

/// One reactor's numbers. Gauges are plain stores; counters only grow.
#[derive(Debug, Default)]
pub struct ReactorMetrics {
    /// Gauge: upgraded WebSocket connections.
    pub connections_open: AtomicU64,
    /// Gauge: TCP connections still in the handshake.
    pub connections_handshaking: AtomicU64,
    /// Gauge: open connections that are Server-Sent Events streams (counted in `connections_open` too).
    pub sse_open: AtomicU64,
    /// Gauge: open WebSocket connections that negotiated permessage-deflate (counted in `connections_open`).
    pub deflate_open: AtomicU64,
    /// Gauge: connections currently owning a heap buffer (partial frame or unsent bytes).
    pub buffers_live: AtomicU64,
    /// Gauge: publishes, kicks and queries sent to this reactor and not yet applied.
    pub commands_pending: AtomicU64,
    /// Gauge: unsent bytes queued in this reactor's outboxes, summed over connections: the logical backlog, in
    /// which a frame queued for N connections counts N times (the buffer budget counts it once).
    pub outbox_bytes: AtomicU64,
    /// Gauge: distinct users / client tokens / channels in the fanout index.
    pub index_users: AtomicU64,
    /// Gauge: indexed connections that carry a client token.
    pub index_clients: AtomicU64,
    /// Gauge, see `index_users`.
    pub index_channels: AtomicU64,
    /// Counter: accepted TCP connections.
    pub tcp_accepted: AtomicU64,
    /// Counter: `accept` failures that paused accepting (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    pub accept_errors: AtomicU64,
    /// Counter: completed upgrades.
    pub handshakes_accepted: AtomicU64,
    /// Counter: admitted upgrades this reactor accepted and handed to their user's home reactor.
    pub handed_over: AtomicU64,
    /// Counter: refused handshakes by [`RejectKind`].
    pub handshakes_rejected: [AtomicU64; REJECT_LABELS.len()],
    /// Counter: data frames written to clients (one per message per recipient).
    pub frames_delivered: AtomicU64,
    /// Counter: bytes handed to the kernel.
    pub bytes_written: AtomicU64,
    /// Counter: connections closed for exceeding `max_outbox_bytes`.
    pub slow_consumer_closes: AtomicU64,
    /// Counter: SSE streams ended for exceeding `max_outbox_bytes` (counted in `slow_consumer_closes` too).
    pub sse_slow_consumer_closes: AtomicU64,
    /// Counter: connections failed for a protocol violation.
    pub protocol_error_closes: AtomicU64,
    /// Counter: connections closed with 1013 because the buffer budget refused a partial frame's buffer.
    pub budget_closes: AtomicU64,
    /// Counter: close frames the server started (kick, drain, protocol error, slow consumer, budget) that were
    /// handed whole to the socket.
    pub close_frames_written: AtomicU64,
    /// Counter: such close frames still unsent when the connection went (close deadline, socket error).
    pub close_frames_given_up: AtomicU64,
    /// Counter: publishes whose delivery paused after a turn's worth of sends, to serve sockets and timers
    /// before the rest of its recipients.
    pub fanout_yields: AtomicU64,
    /// Counter: connections closed for not answering a ping.
    pub pong_timeouts: AtomicU64,
    /// Counter: connections closed by an admin kick.
    pub kicked: AtomicU64,
    /// Counter: close handshakes the client started.
    pub client_closes: AtomicU64,
    /// Counter: connections that went away without a close handshake (EOF, reset).
    pub abrupt_closes: AtomicU64,
    /// Counter: pings sent.
    pub pings_sent: AtomicU64,
    /// Counter: pongs received.
    pub pongs_received: AtomicU64,
    /// Counter: pings received (answered with pongs).
    pub pings_received: AtomicU64,
    /// Counter: complete data messages received from clients (read and discarded).
    pub messages_received: AtomicU64,
}

impl ReactorMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        if n != 0 {
            counter.fetch_add(n, Relaxed);
        }
    }

    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Counts a refused handshake.
    pub fn reject(&self, kind: RejectKind) {
        Self::inc(&self.handshakes_rejected[kind as usize]);
    }
}

/// Numbers of the admin side.
#[derive(Debug, Default)]
pub struct AdminMetrics {
    /// Counter: messages accepted for publishing, by [`TargetKind`] (a batch message counts once per target).
    pub published: [AtomicU64; TARGET_LABELS.len()],
    /// Counter: kick requests.
    pub kicks: AtomicU64,
    /// Counter: batch publishes accepted (their targets are counted in `published`).
    pub batches: AtomicU64,
    /// Counter: subscription change requests: subscribe (0) and unsubscribe (1).
    pub subscriptions: [AtomicU64; 2],
    /// Counter: admin requests answered, by status class (2xx, 4xx, 5xx).
    pub requests_2xx: AtomicU64,
    /// See `requests_2xx`.
    pub requests_4xx: AtomicU64,
    /// See `requests_2xx`.
    pub requests_5xx: AtomicU64,
    /// The server-wide buffer budget, rendered as its use and its limit.
    pub buffer_budget: Option<Arc<Budget>>,
    /// The token verification keys (JWT mode only).
    pub keys: Option<Arc<KeyMetrics>>,
    /// Gauge: open admin connections.
    pub admin_connections: AtomicU64,
    /// Counter: admin connections refused (503 and closed) at `admin.max_connections`.
    pub admin_connections_refused: AtomicU64,
    /// Counter: admin connections closed because a request head was not complete within
    /// `admin.header_timeout_ms`.
    pub admin_header_timeouts: AtomicU64,
    /// Counter: admin connections closed after `admin.idle_timeout_ms` without progress.
    pub admin_idle_timeouts: AtomicU64,
}

/// Reads one of a reactor's numbers.
type Field = fn(&ReactorMetrics) -> &AtomicU64;

/// Renders everything in the Prometheus text exposition format (version 0.0.4).
pub fn render(
    reactors: &[&ReactorMetrics],
    admin: &AdminMetrics,
    rss_bytes: Option<u64>,
) -> String {
    let mut text = String::with_capacity(4096);
    let mut out = Exposition::new(&mut text);
    let gauges: [(&str, &str, Field); 10] = [
        (
            "densepush_connections_open",
            "Upgraded WebSocket connections and open SSE streams.",
            |m| &m.connections_open,
        ),
        (
            "densepush_connections_sse",
            "Open Server-Sent Events streams (also in densepush_connections_open).",
            |m| &m.sse_open,
        ),
        (
            "densepush_connections_deflate",
            "Open WebSocket connections with permessage-deflate (also in densepush_connections_open).",
            |m| &m.deflate_open,
        ),
        (
            "densepush_connections_handshaking",
            "TCP connections in the handshake.",
            |m| &m.connections_handshaking,
        ),
        (
            "densepush_buffers_live",
            "Connections owning a heap buffer.",
            |m| &m.buffers_live,
        ),
        (
            "densepush_commands_pending",
            "Commands sent to the reactor and not yet applied (publishes get 503 at 4096).",
            |m| &m.commands_pending,
        ),
        (
            "densepush_outbox_bytes",
            "Unsent bytes queued for connections, summed per connection (a frame queued for N counts N times).",
            |m| &m.outbox_bytes,
        ),
        (
            "densepush_index_users",
            "Distinct users in the fanout index.",
            |m| &m.index_users,
        ),
        (
            "densepush_index_clients",
            "Connections in the fanout index that carry a client token.",
            |m| &m.index_clients,
        ),
        (
            "densepush_index_channels",
            "Channels with subscribers.",
            |m| &m.index_channels,
        ),
    ];
    for (name, help, get) in gauges {
        per_reactor(&mut out, name, help, MetricType::Gauge, reactors, get);
    }
    let counters: [(&str, &str, Field); 21] = [
        (
            "densepush_tcp_accepted_total",
            "Accepted TCP connections.",
            |m| &m.tcp_accepted,
        ),
        (
            "densepush_accept_errors_total",
            "accept() failures that paused accepting.",
            |m| &m.accept_errors,
        ),
        (
            "densepush_handshakes_accepted_total",
            "Completed WebSocket upgrades.",
            |m| &m.handshakes_accepted,
        ),
        (
            "densepush_connections_handed_over_total",
            "Admitted upgrades handed from the accepting reactor to the user's home reactor.",
            |m| &m.handed_over,
        ),
        (
            "densepush_frames_delivered_total",
            "Data frames written to clients.",
            |m| &m.frames_delivered,
        ),
        (
            "densepush_bytes_written_total",
            "Bytes written to client sockets.",
            |m| &m.bytes_written,
        ),
        (
            "densepush_slow_consumer_closes_total",
            "Connections closed over max_outbox_bytes.",
            |m| &m.slow_consumer_closes,
        ),
        (
            "densepush_sse_slow_consumer_closes_total",
            "SSE streams ended over max_outbox_bytes (also in densepush_slow_consumer_closes_total).",
            |m| &m.sse_slow_consumer_closes,
        ),
        (
            "densepush_protocol_error_closes_total",
            "Connections failed for a protocol error.",
            |m| &m.protocol_error_closes,
        ),
        (
            "densepush_budget_closes_total",
            "Connections closed with 1013 when the buffer budget was exhausted.",
            |m| &m.budget_closes,
        ),
        (
            "densepush_close_frames_written_total",
            "Server-initiated close frames handed whole to the socket.",
            |m| &m.close_frames_written,
        ),
        (
            "densepush_close_frames_given_up_total",
            "Server-initiated close frames still unsent when the connection went.",
            |m| &m.close_frames_given_up,
        ),
        (
            "densepush_fanout_yields_total",
            "Publishes whose delivery paused to serve sockets and timers before its remaining recipients.",
            |m| &m.fanout_yields,
        ),
        (
            "densepush_pong_timeouts_total",
            "Connections closed for not answering a ping.",
            |m| &m.pong_timeouts,
        ),
        (
            "densepush_kicked_total",
            "Connections closed by an admin kick.",
            |m| &m.kicked,
        ),
        (
            "densepush_client_closes_total",
            "Close handshakes started by clients.",
            |m| &m.client_closes,
        ),
        (
            "densepush_abrupt_closes_total",
            "Connections lost without a close handshake.",
            |m| &m.abrupt_closes,
        ),
        ("densepush_pings_sent_total", "Pings sent.", |m| {
            &m.pings_sent
        }),
        ("densepush_pongs_received_total", "Pongs received.", |m| {
            &m.pongs_received
        }),
        (
            "densepush_pings_received_total",
            "Pings received from clients.",
            |m| &m.pings_received,
        ),
        (
            "densepush_messages_received_total",
            "Data messages received from clients (discarded).",
            |m| &m.messages_received,
        ),
    ];
    for (name, help, get) in counters {
        per_reactor(&mut out, name, help, MetricType::Counter, reactors, get);
    }

    out.counter(
        "densepush_deflate_compressions_total",
        "Messages compressed for permessage-deflate (once per message and encoding, however many recipients).",
        crate::proto::deflate::compressions(),
    );

    if let Some(budget) = &admin.buffer_budget {
        out.gauge(
            "densepush_buffered_bytes",
            "Bytes really held in buffers (each queued frame once, however many queues hold it), against max_buffered_bytes_total.",
            budget.used() as u64,
        );
        out.gauge(
            "densepush_buffered_bytes_limit",
            "websocket.max_buffered_bytes_total.",
            budget.limit() as u64,
        );
    }

    out.family(
        "densepush_handshakes_rejected_total",
        "Refused handshakes by reason.",
        MetricType::Counter,
        "reason",
        REJECT_LABELS.iter().enumerate().map(|(i, label)| {
            let sum: u64 = reactors
                .iter()
                .map(|m| m.handshakes_rejected[i].load(Relaxed))
                .sum();
            (label, sum)
        }),
    );

    out.family(
        "densepush_messages_published_total",
        "Messages accepted by the admin API, by target kind.",
        MetricType::Counter,
        "target",
        TARGET_LABELS
            .iter()
            .zip(&admin.published)
            .map(|(label, count)| (label, count.load(Relaxed))),
    );
    out.family(
        "densepush_admin_requests_total",
        "Admin API requests by status class.",
        MetricType::Counter,
        "class",
        [
            ("2xx", &admin.requests_2xx),
            ("4xx", &admin.requests_4xx),
            ("5xx", &admin.requests_5xx),
        ]
        .map(|(class, counter)| (class, counter.load(Relaxed))),
    );
    out.counter(
        "densepush_kick_requests_total",
        "Admin kick requests.",
        admin.kicks.load(Relaxed),
    );
    out.counter(
        "densepush_batch_publishes_total",
        "Batch publishes accepted (each target is also counted in densepush_messages_published_total).",
        admin.batches.load(Relaxed),
    );
    out.family(
        "densepush_subscription_requests_total",
        "Runtime subscription requests, by operation.",
        MetricType::Counter,
        "op",
        [("subscribe", 0), ("unsubscribe", 1)]
            .map(|(op, i)| (op, admin.subscriptions[i].load(Relaxed))),
    );
    if let Some(keys) = &admin.keys {
        keys.render(&mut out, unix_now_ms());
    }
    out.gauge(
        "densepush_admin_connections",
        "Open admin API connections, against admin.max_connections.",
        admin.admin_connections.load(Relaxed),
    );
    out.counter(
        "densepush_admin_connections_refused_total",
        "Admin connections answered 503 and closed at admin.max_connections.",
        admin.admin_connections_refused.load(Relaxed),
    );
    out.family(
        "densepush_admin_timeouts_total",
        "Admin connections closed by a timeout: header (admin.header_timeout_ms) or idle (admin.idle_timeout_ms).",
        MetricType::Counter,
        "kind",
        [
            ("header", &admin.admin_header_timeouts),
            ("idle", &admin.admin_idle_timeouts),
        ]
        .map(|(kind, counter)| (kind, counter.load(Relaxed))),
    );
    if let Some(rss) = rss_bytes {
        out.gauge(
            "densepush_process_resident_bytes",
            "Resident set size of the process.",
            rss,
        );
    }
    if let Some(heap) = heap_allocated_bytes() {
        out.gauge(
            "densepush_heap_allocated_bytes",
            "Heap bytes allocated and not freed (counted by the allocator wrapper, to within 64 KiB per thread); RSS minus this is allocator retention.",
            heap,
        );
    }
    text
}

/// Bytes the allocator has handed out and not had back, when the binary counts them ([`heap`]). Unlike RSS it
/// drops when memory is freed, so it tells a leak (this grows) from allocator retention (only RSS grows).
/// Cheap and lock-free, unlike glibc's `mallinfo2`, which it replaced (see [`heap`] for why).
pub fn heap_allocated_bytes() -> Option<u64> {
    heap::allocated_bytes()
}

/// Milliseconds since the Unix epoch; 0 if the clock is set before it.
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One family with a sample per reactor, labelled with the reactor's index.
fn per_reactor(
    out: &mut Exposition<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    reactors: &[&ReactorMetrics],
    get: Field,
) {
    let samples = reactors
        .iter()
        .enumerate()
        .map(|(i, m)| (i, get(m).load(Relaxed)));
    out.family(name, help, kind, "reactor", samples);
}

/// Resident set size of this process from /proc/self/statm, in bytes.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_sums_rejections_and_labels_each_reactor() {
        let a = ReactorMetrics::default();
        let b = ReactorMetrics::default();
        a.connections_open.store(3, Relaxed);
        b.connections_open.store(4, Relaxed);
        a.reject(RejectKind::Unauthorized);
        b.reject(RejectKind::Unauthorized);
        b.reject(RejectKind::from_status(426));
        let admin = AdminMetrics::default();
        admin.published[TargetKind::Channel as usize].fetch_add(5, Relaxed);
        let text = render(&[&a, &b], &admin, Some(1234));
        assert!(text.contains("densepush_connections_open{reactor=\"0\"} 3\n"));
        assert!(text.contains("densepush_connections_open{reactor=\"1\"} 4\n"));
        assert!(text.contains("densepush_handshakes_rejected_total{reason=\"unauthorized\"} 2\n"));
        assert!(
            text.contains("densepush_handshakes_rejected_total{reason=\"upgrade_required\"} 1\n")
        );
        assert!(text.contains("densepush_messages_published_total{target=\"channel\"} 5\n"));
        assert!(text.contains("densepush_process_resident_bytes 1234\n"));
    }

    #[test]
    fn every_sample_line_has_a_type_line_before_it() {
        let text = render(
            &[&ReactorMetrics::default()],
            &AdminMetrics::default(),
            None,
        );
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{name} has no TYPE line");
            }
        }
    }

    #[test]
    fn heap_allocated_bytes_follows_an_allocation() {
        // Other tests allocate and free concurrently, so compare with a block far larger than their churn.
        let _serial = heap::BIG_BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
        let before = heap_allocated_bytes().unwrap();
        let block = vec![0u8; 64 << 20];
        let during = heap_allocated_bytes().unwrap();
        drop(block);
        assert!(during >= before + (48 << 20), "{before} -> {during}");
    }

    #[test]
    fn the_heap_gauge_is_rendered() {
        let text = render(&[], &AdminMetrics::default(), None);
        assert!(text.contains("\ndensepush_heap_allocated_bytes "), "{text}");
    }

    #[test]
    fn resident_bytes_reads_this_process() {
        assert!(resident_bytes().unwrap() > 0);
    }
}
