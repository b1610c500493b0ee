//! The report: every figure of a run, as JSON (`--json`, `--json-file`) and as a human summary.
//!
//! It owns the report's shape, its field documentation (the doc comment on each field below is the reference
//! for the JSON), and the summary text. It does not measure.
//!
//! Conventions: rates are per second; latencies are microseconds (`*_us`); memory is bytes; CPU is
//! nanoseconds of server user+system time from /proc/PID/stat (10 ms resolution with the usual 100 Hz ticks);
//! a figure that could not be measured (no `--server-pid`, phase not run) is `null`.

use crate::procfs::{KernelMemory, ProcessMemory};
use crate::proto::Violation;
use crate::stats::{Percentiles, Reasons};
use serde::Serialize;
use std::fmt::Write as _;

/// Version of this JSON shape; bumped when a field changes meaning or goes away.
pub const REPORT_VERSION: u32 = 1;

/// The whole report.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Version of the JSON shape (`REPORT_VERSION`).
    pub version: u32,
    /// True when every selected phase finished, every connection opened, and nothing was lost, duplicated,
    /// reordered, misdelivered or malformed. The process exits 0 exactly when this is true.
    pub ok: bool,
    /// Why the run stopped early (global `--max-seconds`, a phase timeout, a worker failure), or null.
    pub aborted: Option<String>,
    /// What was asked for.
    pub config: RunConfig,
    /// The figures that matter most, repeated from the sections below.
    pub headline: Headline,
    /// Connect phase, or null if not run.
    pub connect: Option<ConnectSection>,
    /// Memory before connecting and after the connect (and idle hold), or null without `--server-pid`.
    pub memory: Option<MemorySection>,
    /// Broadcast phase, or null.
    pub broadcast: Option<BroadcastSection>,
    /// Unicast phase, or null.
    pub unicast: Option<UnicastSection>,
    /// Batch phase, or null.
    pub batch: Option<BatchSection>,
    /// Churn phase, or null.
    pub churn: Option<ChurnSection>,
    /// Slow-reader phase, or null.
    pub slow: Option<SlowSection>,
    /// Connection health over the whole run, from the workers.
    pub health: HealthSection,
    /// Server counters from /metrics at the end of the run (totals over reactors), or null if unreadable.
    pub server_metrics: Option<ServerMetrics>,
    /// Wall-clock seconds of the whole run.
    pub elapsed_secs: f64,
}

/// The options that shape the figures.
#[derive(Debug, Default, Serialize)]
pub struct RunConfig {
    /// Client listener targeted.
    pub server: String,
    /// Admin API targeted.
    pub admin: String,
    /// Server PID sampled, if given.
    pub server_pid: Option<u32>,
    /// Connections asked for.
    pub conns: u64,
    /// Worker processes used.
    pub workers: usize,
    /// Source addresses used (127.0.0.2 onwards; 0 = kernel's choice).
    pub source_ips: u8,
    /// Connections per user.
    pub conns_per_user: u64,
    /// Distinct users (`ceil(conns / conns_per_user)`).
    pub users: u64,
    /// Channels (connection i joins ch{i % channels}).
    pub channels: u64,
    /// Phases run, in order.
    pub phases: Vec<String>,
    /// Bytes per published payload.
    pub payload_bytes: usize,
    /// Payloads sent as binary frames.
    pub binary: bool,
    /// Payloads padded as JSON notifications (`--json-payload`).
    pub json_payload: bool,
    /// permessage-deflate offered (`--compression`).
    pub compression: bool,
    /// Connect rate asked for, per second (0 = unpaced).
    pub rate: f64,
}

/// The summary figures, each null if its phase did not run or could not be measured.
#[derive(Debug, Default, Serialize)]
pub struct Headline {
    /// Server VmRSS growth per open connection (`memory.server_rss_bytes_per_conn`).
    pub server_rss_bytes_per_conn: Option<f64>,
    /// Kernel memory growth per open connection (`memory.kernel_bytes_per_conn`).
    pub kernel_bytes_per_conn: Option<f64>,
    /// Completed handshakes per second (`connect.handshakes_per_sec`).
    pub handshakes_per_sec: Option<f64>,
    /// Broadcast deliveries per second (`broadcast.deliveries_per_sec`).
    pub broadcast_deliveries_per_sec: Option<f64>,
    /// Broadcast publish-to-receive p99 over every message of the burst (`broadcast.delivery.latency.p99_us`).
    pub broadcast_p99_us: Option<u64>,
    /// Broadcast p99 of the first message alone, one fanout with nothing queued ahead
    /// (`broadcast.delivery.first_message_latency.p99_us`).
    pub broadcast_first_message_p99_us: Option<u64>,
    /// Accepted unicast publishes per second (`unicast.publishes_per_sec`).
    pub unicast_publishes_per_sec: Option<f64>,
    /// Unicast publish round-trip p99 (`unicast.publish_latency.p99_us`).
    pub unicast_publish_p99_us: Option<u64>,
    /// Unicast publish-to-receive p99 (`unicast.delivery.latency.p99_us`).
    pub unicast_delivery_p99_us: Option<u64>,
    /// User targets delivered per second through batch publishes (`batch.targets_delivered_per_sec`).
    pub batch_targets_delivered_per_sec: Option<f64>,
    /// The same figure for single publishes in the unicast phase of this run
    /// (`unicast.targets_delivered_per_sec`).
    pub unicast_targets_delivered_per_sec: Option<f64>,
    /// Server CPU per broadcast delivery (`broadcast.cpu_ns_per_delivery`).
    pub cpu_ns_per_delivery: Option<f64>,
    /// Messages lost, summed over broadcast, unicast and churn.
    pub lost: u64,
    /// Messages duplicated, summed likewise.
    pub duplicated: u64,
    /// Messages reordered, summed likewise.
    pub reordered: u64,
    /// Unicast messages delivered to the wrong user, plus data frames that were not our payloads.
    pub misdelivered: u64,
}

/// Connect phase.
#[derive(Debug, Default, Serialize)]
pub struct ConnectSection {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections open at the end of the phase.
    pub open: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Failures by reason: `http_<status>` (refused upgrade), `reset`, `refused`, `timeout` (no verified 101
    /// within `--handshake-timeout-ms`), `eof`, `bad_upgrade`, `bad_response`, `no_source_port`, `errno_<n>`.
    pub failures: Reasons,
    /// Successful handshakes per second, first attempt to last success.
    pub handshakes_per_sec: f64,
    /// Milliseconds from the first attempt to the last success.
    pub elapsed_ms: f64,
    /// connect() to verified 101.
    pub handshake_latency: Option<Percentiles>,
    /// Server CPU over the phase, ns.
    pub server_cpu_ns: Option<u64>,
    /// CPU of the generator (workers and coordinator) over the phase, ns: if it nears the phase's elapsed time
    /// times the cores, the client side, not the server, set the pace.
    pub generator_cpu_ns: Option<u64>,
    /// Server CPU per successful handshake, ns.
    pub cpu_ns_per_handshake: Option<f64>,
}

/// A memory sample.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct MemorySample {
    /// Server process memory.
    pub server: ProcessMemory,
    /// Kernel memory (the whole network namespace: other processes' sockets count too).
    pub kernel: KernelMemory,
    /// Connections open when sampled (from the workers).
    pub open_conns: u64,
}

/// Memory per connection.
#[derive(Debug, Default, Serialize)]
pub struct MemorySection {
    /// Before the first connection.
    pub before: MemorySample,
    /// After connecting and holding idle for `held_secs`.
    pub after: MemorySample,
    /// Seconds held idle before the `after` sample (0 without the idle phase).
    pub held_secs: f64,
    /// Server CPU per second of the idle hold, ns (timer ticks and pings; a busy loop shows here), or null.
    pub idle_server_cpu_ns_per_sec: Option<f64>,
    /// (after.rss − before.rss) / open connections.
    pub server_rss_bytes_per_conn: f64,
    /// (after.hwm − before.hwm) / open connections: the peak, which includes handshake buffers.
    pub server_hwm_bytes_per_conn: f64,
    /// Growth of /proc/meminfo Slab per connection. On loopback both ends live in this kernel, so this is
    /// the cost of two sockets (client and server), plus their files and epoll entries.
    pub kernel_slab_bytes_per_conn: f64,
    /// Growth of sockstat TCP mem (socket buffers holding data) per connection; near 0 when idle.
    pub kernel_tcp_mem_bytes_per_conn: f64,
    /// Slab plus TCP mem per connection (both ends, see above).
    pub kernel_bytes_per_conn: f64,
    /// Sample after the broadcast phase drained, if run.
    pub after_broadcast: Option<MemorySample>,
    /// Sample after churn settled, if run.
    pub after_churn: Option<MemorySample>,
}

/// Delivery of one stream, checked per connection.
#[derive(Debug, Default, Serialize)]
pub struct Delivery {
    /// Every open connection got every expected message before the phase timeout.
    pub complete: bool,
    /// Open connections checked.
    pub conns_checked: u64,
    /// Messages expected over all checked connections.
    pub expected: u64,
    /// Distinct messages received.
    pub received: u64,
    /// Expected but never received (tail and holes; for churn also holes on connections closed since).
    pub lost: u64,
    /// Received more than once.
    pub duplicated: u64,
    /// Received after a later message of the same stream.
    pub reordered: u64,
    /// Unicast messages received by a connection of another user.
    pub misdelivered: u64,
    /// Data frames that were not our payloads.
    pub malformed: u64,
    /// Deliveries per second, first publish to last delivery.
    pub deliveries_per_sec: f64,
    /// Milliseconds from the first publish to the last delivery.
    pub elapsed_ms: f64,
    /// Publish-to-receive latency (CLOCK_MONOTONIC stamp in the payload).
    pub latency: Option<Percentiles>,
    /// Latency of the stream's first message (sequence number 0) alone. For broadcast: one message fanned out
    /// to every connection with nothing queued ahead of it, where `latency` includes queueing behind the
    /// messages published before.
    pub first_message_latency: Option<Percentiles>,
    /// The first few violations (`kind`: gap, reordered, duplicate, misdelivered, lost).
    pub violations: Vec<Violation>,
}

/// Broadcast phase.
#[derive(Debug, Default, Serialize)]
pub struct BroadcastSection {
    /// Messages accepted by /publish/all.
    pub messages: u64,
    /// Publishes refused or failed, by reason.
    pub publish_failures: Reasons,
    /// Milliseconds between publishes asked for.
    pub interval_ms: u64,
    /// What the connections received.
    pub delivery: Delivery,
    /// Deliveries per second (same as `delivery.deliveries_per_sec`).
    pub deliveries_per_sec: f64,
    /// Growth of densepush_frames_delivered_total over the phase.
    pub server_frames_delivered: Option<u64>,
    /// Growth of densepush_bytes_written_total over the phase (pings and pongs included; they are few).
    pub server_bytes_written: Option<u64>,
    /// Bytes the server wrote per delivery received: the frame on the wire (compressed with `--compression`).
    pub wire_bytes_per_delivery: Option<f64>,
    /// Server CPU over the phase, ns.
    pub server_cpu_ns: Option<u64>,
    /// Generator CPU over the phase, ns (see `connect.generator_cpu_ns`).
    pub generator_cpu_ns: Option<u64>,
    /// Server CPU per delivery received, ns.
    pub cpu_ns_per_delivery: Option<f64>,
    /// densepush_buffers_live (summed over reactors) read as soon as every delivery arrived.
    pub buffers_live_after_drain: Option<u64>,
    /// densepush_buffers_live one second later; should be 0 for idle connections.
    pub buffers_live_settled: Option<u64>,
}

/// Unicast phase.
#[derive(Debug, Default, Serialize)]
pub struct UnicastSection {
    /// Concurrent publishers.
    pub publishers: usize,
    /// Messages accepted.
    pub published: u64,
    /// Publishes refused or failed, by reason.
    pub publish_failures: Reasons,
    /// Accepted publishes per second over the publishing time.
    pub publishes_per_sec: f64,
    /// Request round trip, write to 202.
    pub publish_latency: Option<Percentiles>,
    /// What the connections received.
    pub delivery: Delivery,
    /// Server CPU over the phase, ns.
    pub server_cpu_ns: Option<u64>,
    /// Generator CPU over the phase, ns (see `connect.generator_cpu_ns`).
    pub generator_cpu_ns: Option<u64>,
    /// Server CPU per delivery received, ns.
    pub cpu_ns_per_delivery: Option<f64>,
    /// User targets delivered per second: each publish names one user, so its deliveries divided by
    /// `--conns-per-user`, first publish to last delivery (compare `batch.targets_delivered_per_sec`).
    pub targets_delivered_per_sec: f64,
}

/// Batch phase: `POST /publish/batch`, one message naming `targets_per_batch` users per request.
#[derive(Debug, Default, Serialize)]
pub struct BatchSection {
    /// Concurrent publishers.
    pub publishers: usize,
    /// User targets per batch (`--batch-targets`; the last batch of a round may name fewer).
    pub targets_per_batch: u64,
    /// Rounds every user received.
    pub rounds: u64,
    /// Batches accepted (202).
    pub batches: u64,
    /// User targets in accepted batches.
    pub targets: u64,
    /// Batches answered 503 (reactors behind) and sent again.
    pub retried: u64,
    /// Batches refused or failed otherwise, by reason.
    pub publish_failures: Reasons,
    /// Accepted batches per second over the publishing time.
    pub batches_per_sec: f64,
    /// Batch request round trip, write to 202.
    pub batch_latency: Option<Percentiles>,
    /// User targets delivered per second: deliveries divided by `--conns-per-user`, first publish to last
    /// delivery.
    pub targets_delivered_per_sec: f64,
    /// `targets_delivered_per_sec` over the unicast phase's, when both ran.
    pub vs_unicast: Option<f64>,
    /// What the connections received.
    pub delivery: Delivery,
    /// Server CPU over the phase, ns.
    pub server_cpu_ns: Option<u64>,
    /// Generator CPU over the phase, ns (see `connect.generator_cpu_ns`).
    pub generator_cpu_ns: Option<u64>,
    /// Server CPU per delivery received, ns.
    pub cpu_ns_per_delivery: Option<f64>,
}

/// Churn phase.
#[derive(Debug, Default, Serialize)]
pub struct ChurnSection {
    /// Seconds of churn.
    pub secs: f64,
    /// Fraction of connections closed per second.
    pub fraction_per_sec: f64,
    /// Connections closed (close handshake by the generator).
    pub closed: u64,
    /// Connections reopened.
    pub reopened: u64,
    /// Reopen failures by reason.
    pub failures: Reasons,
    /// Connections open at the end.
    pub open_at_end: u64,
    /// Handshake latency of reopens.
    pub reopen_latency: Option<Percentiles>,
    /// Messages published to all during churn.
    pub published: u64,
    /// What the connections received (each checked from its first message on).
    pub delivery: Delivery,
    /// Server CPU over the phase, ns.
    pub server_cpu_ns: Option<u64>,
    /// Generator CPU over the phase, ns (see `connect.generator_cpu_ns`).
    pub generator_cpu_ns: Option<u64>,
}

/// Slow-reader phase: `slow_readers` connections (small `SO_RCVBUF` and `TCP_MAXSEG`, set before connect) stop
/// reading while `messages` broadcasts of `payload_bytes` go out, stay paused `pause_ms` after the last one, then
/// read again. Each slow reader ends up lossless (open, every message), closed with a close frame (after a
/// gap-free prefix), or ended without one (a bare FIN or a reset: 1006 in a browser).
#[derive(Debug, Default, Serialize)]
pub struct SlowSection {
    /// Slow readers paused.
    pub slow_readers: u64,
    /// Their SO_RCVBUF, bytes.
    pub receive_buffer: usize,
    /// Their TCP_MAXSEG, bytes.
    pub mss: u32,
    /// Broadcasts accepted while they were paused.
    pub messages: u64,
    /// Bytes per payload.
    pub payload_bytes: usize,
    /// Publishes refused or failed, by reason.
    pub publish_failures: Reasons,
    /// Milliseconds they stayed paused after the other connections had every message.
    pub pause_ms: u64,
    /// What the other connections received meanwhile (every message, in order).
    pub healthy: Delivery,
    /// Slow readers still open with every message, in order.
    pub lossless: u64,
    /// Slow readers still open but missing messages at the end of the wait.
    pub incomplete: u64,
    /// Slow readers that ended with a close frame, by code.
    pub closed_with_frame: Reasons,
    /// Slow readers that ended without a close frame, by how (`eof`, `reset`).
    pub ended_without_frame: Reasons,
    /// Messages the ended ones received before their end, summed.
    pub messages_before_end: u64,
    /// The other connections the server closed meanwhile with a close frame, by code (a loaded host's
    /// healthy readers can fall `max_outbox_bytes` behind too).
    pub others_closed_with_frame: Reasons,
    /// The other connections that ended meanwhile without a close frame, by how.
    pub others_ended_without_frame: Reasons,
    /// Slow-stream messages duplicated, over the slow readers.
    pub duplicated: u64,
    /// Slow-stream messages reordered, over the slow readers.
    pub reordered: u64,
    /// The first few slow-stream violations (`gap`: a message missing before a later one).
    pub violations: Vec<Violation>,
    /// Server VmRSS when they paused.
    pub server_rss_before: Option<u64>,
    /// Highest server VmRSS seen while they were paused (sampled every 50 ms, as the three below).
    pub server_rss_peak: Option<u64>,
    /// Highest densepush_buffered_bytes (the buffer budget's use: real bytes) seen while they were paused.
    pub buffered_bytes_peak: Option<u64>,
    /// densepush_buffered_bytes_limit.
    pub buffered_bytes_limit: Option<u64>,
    /// densepush_buffered_bytes just before they read again.
    pub buffered_bytes_at_resume: Option<u64>,
    /// Highest densepush_outbox_bytes seen (the logical backlog: a frame queued for N counts N times).
    pub outbox_bytes_peak: Option<u64>,
    /// Highest /proc/net/sockstat TCP mem seen, bytes (whole namespace, both ends of every connection).
    pub kernel_tcp_mem_bytes_peak: Option<u64>,
    /// densepush_buffered_bytes one second after they drained or went.
    pub buffered_bytes_after: Option<u64>,
    /// densepush_outbox_bytes at the same time.
    pub outbox_bytes_after: Option<u64>,
    /// Growth of densepush_slow_consumer_closes_total over the phase.
    pub slow_consumer_closes: Option<u64>,
    /// Growth of densepush_budget_closes_total.
    pub budget_closes: Option<u64>,
    /// Growth of densepush_close_frames_written_total.
    pub close_frames_written: Option<u64>,
    /// Growth of densepush_close_frames_given_up_total.
    pub close_frames_given_up: Option<u64>,
}

impl SlowSection {
    /// Every slow reader was told or served: none ended without a close frame, none is missing messages, no
    /// gap, duplicate or reorder; the other connections got everything.
    pub fn ok(&self) -> bool {
        self.ended_without_frame.is_empty()
            && self.others_ended_without_frame.is_empty()
            && self.incomplete == 0
            && self.duplicated + self.reordered == 0
            && self.violations.is_empty()
            && self.healthy.complete
            && self.healthy.lost + self.healthy.duplicated + self.healthy.reordered == 0
    }
}

/// Connection health.
#[derive(Debug, Default, Serialize)]
pub struct HealthSection {
    /// Server pings received while open.
    pub pings: u64,
    /// Server pings received after the generator's close frame went out (correctly not answered).
    pub pings_after_close: u64,
    /// Pongs sent.
    pub pongs: u64,
    /// Close frames the server started, by code.
    pub server_closes: Reasons,
    /// Connections ended without a close handshake while open, by reason.
    pub abrupt: Reasons,
    /// Server frames that broke RFC 6455, by error.
    pub protocol_errors: Reasons,
    /// Connections whose close handshake did not finish in time at shutdown or churn.
    pub close_timeouts: u64,
}

/// Server counters at the end (summed over reactors).
#[derive(Debug, Default, Serialize)]
pub struct ServerMetrics {
    /// densepush_connections_open.
    pub connections_open: f64,
    /// densepush_buffers_live.
    pub buffers_live: f64,
    /// densepush_frames_delivered_total.
    pub frames_delivered_total: f64,
    /// densepush_handshakes_rejected_total.
    pub handshakes_rejected_total: f64,
    /// densepush_slow_consumer_closes_total.
    pub slow_consumer_closes_total: f64,
    /// densepush_protocol_error_closes_total.
    pub protocol_error_closes_total: f64,
    /// densepush_pong_timeouts_total.
    pub pong_timeouts_total: f64,
    /// densepush_abrupt_closes_total.
    pub abrupt_closes_total: f64,
    /// densepush_pongs_received_total.
    pub pongs_received_total: f64,
}

impl Report {
    /// Fills `headline` and `ok` from the sections.
    pub fn finish(&mut self) {
        let h = &mut self.headline;
        if let Some(m) = &self.memory {
            h.server_rss_bytes_per_conn = Some(m.server_rss_bytes_per_conn);
            h.kernel_bytes_per_conn = Some(m.kernel_bytes_per_conn);
        }
        if let Some(c) = &self.connect {
            h.handshakes_per_sec = Some(c.handshakes_per_sec);
        }
        let mut deliveries: Vec<&Delivery> = Vec::new();
        if let Some(b) = &self.broadcast {
            h.broadcast_deliveries_per_sec = Some(b.deliveries_per_sec);
            h.broadcast_p99_us = b.delivery.latency.map(|l| l.p99_us);
            h.broadcast_first_message_p99_us = b.delivery.first_message_latency.map(|l| l.p99_us);
            h.cpu_ns_per_delivery = b.cpu_ns_per_delivery;
            deliveries.push(&b.delivery);
        }
        if let Some(u) = &self.unicast {
            h.unicast_publishes_per_sec = Some(u.publishes_per_sec);
            h.unicast_publish_p99_us = u.publish_latency.map(|l| l.p99_us);
            h.unicast_delivery_p99_us = u.delivery.latency.map(|l| l.p99_us);
            h.unicast_targets_delivered_per_sec = Some(u.targets_delivered_per_sec);
            deliveries.push(&u.delivery);
        }
        if let Some(b) = &self.batch {
            h.batch_targets_delivered_per_sec = Some(b.targets_delivered_per_sec);
            deliveries.push(&b.delivery);
        }
        if let Some(c) = &self.churn {
            deliveries.push(&c.delivery);
        }
        h.lost = deliveries.iter().map(|d| d.lost).sum();
        h.duplicated = deliveries.iter().map(|d| d.duplicated).sum();
        h.reordered = deliveries.iter().map(|d| d.reordered).sum();
        h.misdelivered = deliveries
            .iter()
            .map(|d| d.misdelivered + d.malformed)
            .sum();
        let connected = self
            .connect
            .as_ref()
            .is_none_or(|c| c.failed == 0 && c.open == self.config.conns);
        let complete = deliveries.iter().all(|d| d.complete);
        let clean = h.lost + h.duplicated + h.reordered + h.misdelivered == 0;
        let churned = self
            .churn
            .as_ref()
            .is_none_or(|c| c.failures.is_empty() && c.reopened == c.closed);
        let slow = self.slow.as_ref().is_none_or(SlowSection::ok);
        self.ok = self.aborted.is_none()
            && connected
            && complete
            && clean
            && churned
            && slow
            && self.health.protocol_errors.is_empty();
    }

    /// The human summary: headline figures first, then each phase.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let _ = writeln!(
            s,
            "densepush loadtest: {} connections ({} users, {} channels), {} worker(s), {} source IPs, phases {}",
            c.conns,
            c.users,
            c.channels,
            c.workers,
            c.source_ips,
            c.phases.join(",")
        );
        let h = &self.headline;
        let na = || "n/a".to_string();
        line(
            &mut s,
            "server RSS per connection",
            h.server_rss_bytes_per_conn
                .map_or_else(na, |v| format!("{v:.0} B")),
        );
        line(
            &mut s,
            "kernel per connection",
            h.kernel_bytes_per_conn.map_or_else(na, |v| {
                format!("{v:.0} B  (slab + TCP buffers, both ends of each loopback connection)")
            }),
        );
        line(
            &mut s,
            "handshakes/s",
            h.handshakes_per_sec.map_or_else(na, |v| {
                let c = self.connect.as_ref().expect("headline implies section");
                let rate_cap = self.config.rate;
                let paced = if rate_cap > 0.0 && v >= 0.9 * rate_cap {
                    format!("; paced at --rate {rate_cap:.0}/s, --rate 0 for the ceiling")
                } else {
                    String::new()
                };
                format!(
                    "{}  ({} open, {} failed; handshake p50 {} p99 {}{paced})",
                    rate(v),
                    c.open,
                    c.failed,
                    us(c.handshake_latency.map(|l| l.p50_us)),
                    us(c.handshake_latency.map(|l| l.p99_us))
                )
            }),
        );
        line(
            &mut s,
            "broadcast deliveries/s",
            h.broadcast_deliveries_per_sec.map_or_else(na, |v| {
                let b = self.broadcast.as_ref().expect("headline implies section");
                format!(
                    "{}  p99 {}  ({} messages x {} connections back to back; one message alone: p99 {})",
                    rate(v),
                    us(h.broadcast_p99_us),
                    b.messages,
                    b.delivery.conns_checked,
                    us(h.broadcast_first_message_p99_us)
                )
            }),
        );
        line(
            &mut s,
            "unicast publishes/s",
            h.unicast_publishes_per_sec.map_or_else(na, |v| {
                format!(
                    "{}  p99 {} publish, {} delivery",
                    rate(v),
                    us(h.unicast_publish_p99_us),
                    us(h.unicast_delivery_p99_us)
                )
            }),
        );
        line(
            &mut s,
            "batch targets delivered/s",
            h.batch_targets_delivered_per_sec.map_or_else(na, |v| {
                let b = self.batch.as_ref().expect("headline implies section");
                let versus = h
                    .unicast_targets_delivered_per_sec
                    .map_or_else(String::new, |u| {
                        format!("; single publishes: {} = x{:.1}", rate(u), v / u.max(1e-9))
                    });
                format!(
                    "{}  ({} users per batch, {} rounds{versus})",
                    rate(v),
                    b.targets_per_batch,
                    b.rounds
                )
            }),
        );
        line(
            &mut s,
            "server CPU per delivery",
            h.cpu_ns_per_delivery
                .map_or_else(na, |v| format!("{v:.0} ns  (broadcast)")),
        );
        line(
            &mut s,
            "lost / duplicated / reordered",
            format!(
                "{} / {} / {}  (misdelivered or malformed {})",
                h.lost, h.duplicated, h.reordered, h.misdelivered
            ),
        );
        line(
            &mut s,
            "result",
            match (&self.aborted, self.ok) {
                (Some(why), _) => format!("ABORTED: {why}"),
                (None, true) => "OK".into(),
                (None, false) => "FAILED (see details)".into(),
            },
        );
        self.details(&mut s);
        s
    }

    fn details(&self, s: &mut String) {
        if let Some(c) = &self.connect {
            let _ = writeln!(s, "\nconnect");
            line(
                s,
                "attempted / open / failed",
                format!("{} / {} / {}", c.attempted, c.open, c.failed),
            );
            if !c.failures.is_empty() {
                line(s, "failures", reasons(&c.failures));
            }
            line(s, "elapsed", format!("{:.0} ms", c.elapsed_ms));
            line(s, "handshake latency", pct(c.handshake_latency));
            cpu_lines(s, c.server_cpu_ns, c.generator_cpu_ns);
            if let Some(v) = c.cpu_ns_per_handshake {
                line(s, "server CPU per handshake", format!("{v:.0} ns"));
            }
        }
        if let Some(m) = &self.memory {
            let _ = writeln!(
                s,
                "\nmemory (held idle {:.1} s, {} connections)",
                m.held_secs, m.after.open_conns
            );
            line(
                s,
                "server VmRSS before / after",
                format!(
                    "{} / {}",
                    bytes(m.before.server.rss_bytes),
                    bytes(m.after.server.rss_bytes)
                ),
            );
            if let Some(v) = m.idle_server_cpu_ns_per_sec {
                line(s, "server CPU while idle", format!("{:.2} ms/s", v / 1e6));
            }
            line(
                s,
                "server VmHWM per connection",
                format!("{:.0} B", m.server_hwm_bytes_per_conn),
            );
            line(
                s,
                "kernel slab / TCP mem per conn",
                format!(
                    "{} B / {} B",
                    m.kernel_slab_bytes_per_conn.round() as i64,
                    m.kernel_tcp_mem_bytes_per_conn.round() as i64
                ),
            );
            for (label, sample) in [
                ("after broadcast", m.after_broadcast),
                ("after churn", m.after_churn),
            ] {
                if let Some(x) = sample {
                    line(
                        s,
                        &format!("server VmRSS {label}"),
                        format!("{} ({} open)", bytes(x.server.rss_bytes), x.open_conns),
                    );
                }
            }
        }
        if let Some(b) = &self.broadcast {
            let _ = writeln!(
                s,
                "\nbroadcast ({} messages, interval {} ms)",
                b.messages, b.interval_ms
            );
            delivery(s, &b.delivery);
            cpu_lines(s, b.server_cpu_ns, b.generator_cpu_ns);
            if let Some(f) = b.server_frames_delivered {
                line(s, "server frames delivered", f.to_string());
            }
            if let Some(v) = b.cpu_ns_per_delivery {
                line(s, "server CPU per delivery", format!("{v:.0} ns"));
            }
            if let Some(v) = b.wire_bytes_per_delivery {
                line(s, "wire bytes per delivery", format!("{v:.1}"));
            }
            line(
                s,
                "buffers_live drained / settled",
                format!(
                    "{} / {}",
                    opt(b.buffers_live_after_drain),
                    opt(b.buffers_live_settled)
                ),
            );
            if !b.publish_failures.is_empty() {
                line(s, "publish failures", reasons(&b.publish_failures));
            }
        }
        if let Some(u) = &self.unicast {
            let _ = writeln!(
                s,
                "\nunicast ({} publishers, {} accepted)",
                u.publishers, u.published
            );
            line(s, "publishes/s", rate(u.publishes_per_sec));
            line(s, "publish latency", pct(u.publish_latency));
            delivery(s, &u.delivery);
            cpu_lines(s, u.server_cpu_ns, u.generator_cpu_ns);
            if let Some(v) = u.cpu_ns_per_delivery {
                line(s, "server CPU per delivery", format!("{v:.0} ns"));
            }
            if !u.publish_failures.is_empty() {
                line(s, "publish failures", reasons(&u.publish_failures));
            }
        }
        if let Some(b) = &self.batch {
            let _ = writeln!(
                s,
                "\nbatch ({} publishers, {} batches of up to {} users, {} rounds)",
                b.publishers, b.batches, b.targets_per_batch, b.rounds
            );
            line(s, "targets delivered/s", rate(b.targets_delivered_per_sec));
            if let Some(v) = b.vs_unicast {
                line(s, "vs single publishes", format!("x{v:.1}"));
            }
            line(s, "batches/s", rate(b.batches_per_sec));
            line(s, "batch latency", pct(b.batch_latency));
            delivery(s, &b.delivery);
            cpu_lines(s, b.server_cpu_ns, b.generator_cpu_ns);
            if let Some(v) = b.cpu_ns_per_delivery {
                line(s, "server CPU per delivery", format!("{v:.0} ns"));
            }
            if b.retried > 0 {
                line(s, "retried after 503", b.retried.to_string());
            }
            if !b.publish_failures.is_empty() {
                line(s, "publish failures", reasons(&b.publish_failures));
            }
        }
        if let Some(c) = &self.churn {
            let _ = writeln!(
                s,
                "\nchurn ({:.1} s at {:.1}%/s, {} published)",
                c.secs,
                c.fraction_per_sec * 100.0,
                c.published
            );
            line(
                s,
                "closed / reopened / open",
                format!("{} / {} / {}", c.closed, c.reopened, c.open_at_end),
            );
            if !c.failures.is_empty() {
                line(s, "reopen failures", reasons(&c.failures));
            }
            line(s, "reopen latency", pct(c.reopen_latency));
            delivery(s, &c.delivery);
            cpu_lines(s, c.server_cpu_ns, c.generator_cpu_ns);
        }
        if let Some(w) = &self.slow {
            let _ = writeln!(
                s,
                "\nslow readers ({} of them, SO_RCVBUF {} B, MSS {} B; {} x {} B published while paused, then {} ms more)",
                w.slow_readers, w.receive_buffer, w.mss, w.messages, w.payload_bytes, w.pause_ms
            );
            let ended_with = w.closed_with_frame.values().sum::<u64>();
            let ended_without = w.ended_without_frame.values().sum::<u64>();
            line(
                s,
                "lossless / close frame / bare end",
                format!(
                    "{} / {} / {}{}",
                    w.lossless,
                    ended_with,
                    ended_without,
                    if w.incomplete > 0 {
                        format!("  ({} INCOMPLETE)", w.incomplete)
                    } else {
                        String::new()
                    }
                ),
            );
            if !w.closed_with_frame.is_empty() {
                line(s, "close codes", reasons(&w.closed_with_frame));
            }
            if !w.ended_without_frame.is_empty() {
                line(s, "ended without a frame", reasons(&w.ended_without_frame));
            }
            if !w.others_closed_with_frame.is_empty() {
                line(
                    s,
                    "other connections closed",
                    reasons(&w.others_closed_with_frame),
                );
            }
            if !w.others_ended_without_frame.is_empty() {
                line(
                    s,
                    "others ended without a frame",
                    reasons(&w.others_ended_without_frame),
                );
            }
            if ended_with + ended_without > 0 {
                line(
                    s,
                    "messages before the end",
                    format!(
                        "{:.1} per ended reader",
                        w.messages_before_end as f64 / (ended_with + ended_without) as f64
                    ),
                );
            }
            line(
                s,
                "server VmRSS paused / peak",
                match (w.server_rss_before, w.server_rss_peak) {
                    (Some(a), Some(b)) => format!(
                        "{} / {} (+{})",
                        bytes(a),
                        bytes(b),
                        bytes(b.saturating_sub(a))
                    ),
                    _ => "n/a".into(),
                },
            );
            line(
                s,
                "budget peak / limit / after",
                format!(
                    "{} / {} / {}",
                    w.buffered_bytes_peak.map_or_else(|| "n/a".into(), bytes),
                    w.buffered_bytes_limit.map_or_else(|| "n/a".into(), bytes),
                    opt(w.buffered_bytes_after)
                ),
            );
            line(
                s,
                "logical backlog peak",
                w.outbox_bytes_peak.map_or_else(|| "n/a".into(), bytes),
            );
            line(
                s,
                "kernel TCP mem peak",
                w.kernel_tcp_mem_bytes_peak
                    .map_or_else(|| "n/a".into(), bytes),
            );
            line(
                s,
                "slow-consumer / budget closes",
                format!("{} / {}", opt(w.slow_consumer_closes), opt(w.budget_closes)),
            );
            line(
                s,
                "close frames written / given up",
                format!(
                    "{} / {}",
                    opt(w.close_frames_written),
                    opt(w.close_frames_given_up)
                ),
            );
            for v in &w.violations {
                line(
                    s,
                    "violation",
                    format!(
                        "conn {} {} {}: seq {} expected {}",
                        v.conn, v.stream, v.kind, v.seq, v.expected
                    ),
                );
            }
            let _ = writeln!(s, "  healthy readers meanwhile:");
            delivery(s, &w.healthy);
        }
        let h = &self.health;
        let _ = writeln!(s, "\nhealth");
        line(
            s,
            "pings / pongs / after close",
            format!("{} / {} / {}", h.pings, h.pongs, h.pings_after_close),
        );
        for (label, r) in [
            ("server closes", &h.server_closes),
            ("abrupt closes", &h.abrupt),
            ("protocol errors", &h.protocol_errors),
        ] {
            if !r.is_empty() {
                line(s, label, reasons(r));
            }
        }
        if h.close_timeouts > 0 {
            line(s, "close timeouts", h.close_timeouts.to_string());
        }
        if let Some(m) = &self.server_metrics {
            line(
                s,
                "server slow/protocol/pong closes",
                format!(
                    "{} / {} / {}",
                    m.slow_consumer_closes_total,
                    m.protocol_error_closes_total,
                    m.pong_timeouts_total
                ),
            );
        }
        let _ = writeln!(s, "\nelapsed {:.1} s", self.elapsed_secs);
    }
}

fn line(s: &mut String, label: &str, value: String) {
    let _ = writeln!(s, "  {label:<34}{value}");
}

fn delivery(s: &mut String, d: &Delivery) {
    line(
        s,
        "received / expected",
        format!(
            "{} / {} over {} connections{}",
            d.received,
            d.expected,
            d.conns_checked,
            if d.complete { "" } else { "  INCOMPLETE" }
        ),
    );
    line(
        s,
        "lost / dup / reordered / misdeliv",
        format!(
            "{} / {} / {} / {}",
            d.lost,
            d.duplicated,
            d.reordered,
            d.misdelivered + d.malformed
        ),
    );
    line(
        s,
        "deliveries/s",
        format!(
            "{}  over {:.0} ms",
            rate(d.deliveries_per_sec),
            d.elapsed_ms
        ),
    );
    line(s, "latency", pct(d.latency));
    if d.first_message_latency.is_some() {
        line(s, "first message latency", pct(d.first_message_latency));
    }
    for v in &d.violations {
        line(
            s,
            "violation",
            format!(
                "conn {} {} {}: seq {} expected {}",
                v.conn, v.stream, v.kind, v.seq, v.expected
            ),
        );
    }
}

fn cpu_lines(s: &mut String, server: Option<u64>, generator: Option<u64>) {
    if server.is_some() || generator.is_some() {
        let ms = |v: Option<u64>| {
            v.map_or_else(
                || "n/a".to_string(),
                |v| format!("{:.0} ms", v as f64 / 1e6),
            )
        };
        line(
            s,
            "CPU server / generator",
            format!("{} / {}", ms(server), ms(generator)),
        );
    }
}

fn reasons(r: &Reasons) -> String {
    r.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn pct(p: Option<Percentiles>) -> String {
    match p {
        None => "n/a".into(),
        Some(p) => format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {}",
            us(Some(p.p50_us)),
            us(Some(p.p90_us)),
            us(Some(p.p99_us)),
            us(Some(p.p999_us)),
            us(Some(p.max_us))
        ),
    }
}

fn us(v: Option<u64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if v < 1_000 => format!("{v} us"),
        Some(v) if v < 1_000_000 => format!("{:.1} ms", v as f64 / 1e3),
        Some(v) => format!("{:.2} s", v as f64 / 1e6),
    }
}

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn bytes(v: u64) -> String {
    if v >= 1 << 20 {
        format!("{:.1} MiB", v as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", v as f64 / 1024.0)
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean_delivery() -> Delivery {
        Delivery {
            complete: true,
            conns_checked: 10,
            expected: 10,
            received: 10,
            ..Default::default()
        }
    }

    fn report() -> Report {
        Report {
            config: RunConfig {
                conns: 10,
                ..Default::default()
            },
            connect: Some(ConnectSection {
                attempted: 10,
                open: 10,
                handshakes_per_sec: 100.0,
                ..Default::default()
            }),
            broadcast: Some(BroadcastSection {
                delivery: clean_delivery(),
                deliveries_per_sec: 1e6,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn clean_run_is_ok() {
        let mut r = report();
        r.finish();
        assert!(r.ok);
        assert_eq!(r.headline.handshakes_per_sec, Some(100.0));
        assert_eq!(r.headline.broadcast_deliveries_per_sec, Some(1e6));
    }

    #[test]
    fn any_loss_fails_the_run() {
        let mut r = report();
        r.broadcast.as_mut().unwrap().delivery.lost = 1;
        r.finish();
        assert!(!r.ok);
        assert_eq!(r.headline.lost, 1);
    }

    #[test]
    fn a_slow_reader_that_ended_without_a_close_frame_fails_the_run() {
        let mut r = report();
        r.slow = Some(SlowSection {
            slow_readers: 2,
            lossless: 1,
            healthy: clean_delivery(),
            ..Default::default()
        });
        r.slow
            .as_mut()
            .unwrap()
            .closed_with_frame
            .insert("1008".into(), 1);
        r.finish();
        assert!(r.ok, "lossless or told why");
        r.slow
            .as_mut()
            .unwrap()
            .ended_without_frame
            .insert("eof".into(), 1);
        r.finish();
        assert!(!r.ok);
        assert!(r.summary().contains("lossless / close frame / bare end"));
    }

    #[test]
    fn missing_connections_fail_the_run() {
        let mut r = report();
        r.connect.as_mut().unwrap().open = 9;
        r.finish();
        assert!(!r.ok);
    }

    #[test]
    fn summary_leads_with_the_headline_in_order() {
        let mut r = report();
        r.finish();
        let text = r.summary();
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle} missing"))
        };
        assert!(at("server RSS per connection") < at("kernel per connection"));
        assert!(at("kernel per connection") < at("handshakes/s"));
        assert!(at("handshakes/s") < at("broadcast deliveries/s"));
        assert!(at("unicast publishes/s") < at("server CPU per delivery"));
        assert!(at("server CPU per delivery") < at("lost / duplicated / reordered"));
        assert!(at("lost / duplicated / reordered") < at("\nconnect"));
    }

    #[test]
    fn json_has_the_documented_top_level_fields() {
        let mut r = report();
        r.finish();
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "version",
            "ok",
            "aborted",
            "config",
            "headline",
            "connect",
            "memory",
            "broadcast",
            "unicast",
            "churn",
            "slow",
            "health",
            "server_metrics",
            "elapsed_secs",
        ] {
            assert!(v.get(key).is_some(), "{key} missing");
        }
    }
}
