//! The coordinator: plans the workers, runs the phases in order (connect, idle, broadcast, unicast, churn,
//! slow), samples the server around each, and turns the workers' answers into the report.
//!
//! It owns the run's timeline and every cross-worker sum. It does not touch client sockets (workers do) or
//! format output (`report` does). Every wait is bounded by the phase timeout and the global `--max-seconds`.

use crate::admin::{parse_metrics, AdminClient};
use crate::checker::Stream;
use crate::cli::{Phase, RunArgs};
use crate::procfs;
use crate::progress::Progress;
use crate::proto::{
    ChurnResult, Command, ConnectResult, DeliveryResult, Event, Expectation, Health, SlowResult,
    SlowSockets, WorkerInit,
};
use crate::publisher::{self, PayloadSpec};
use crate::report::{
    BatchSection, BroadcastSection, ChurnSection, ConnectSection, Delivery, HealthSection,
    MemorySample, MemorySection, Report, RunConfig, ServerMetrics, SlowSection, UnicastSection,
    REPORT_VERSION,
};
use crate::session::MAX_VIOLATIONS;
use crate::stats::{self, Latency};
use crate::sys::{monotonic_ns, raise_open_files_limit};
use crate::worker::RESERVED_FDS;
use crate::workers::Workers;
use anyhow::{anyhow, bail, Context};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Milliseconds workers get for close handshakes at the end.
const SHUTDOWN_MS: u64 = 5_000;
/// Milliseconds after churn stops for the last reopens to finish.
const CHURN_SETTLE_MS: u64 = 10_000;

/// One worker's share: global index of its first connection and how many it owns.
pub type Share = (u64, u64);

/// Splits `conns` connections over `workers`, whole users to each (so a user's connections share a worker),
/// as evenly as possible.
pub fn split(conns: u64, conns_per_user: u64, workers: usize) -> Vec<Share> {
    let users = conns.div_ceil(conns_per_user);
    let workers = workers.max(1) as u64;
    (0..workers)
        .map(|w| {
            let u0 = users * w / workers;
            let u1 = users * (w + 1) / workers;
            let first = (u0 * conns_per_user).min(conns);
            let end = (u1 * conns_per_user).min(conns);
            (first, end - first)
        })
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// How many workers: as asked, or (0) as few as the per-process open-files allowance `cap` permits.
pub fn worker_count(
    conns: u64,
    asked: usize,
    cap: u64,
    conns_per_user: u64,
) -> Result<usize, String> {
    if cap == 0 {
        return Err("the open-files limit leaves no room for connections".into());
    }
    // Shares are whole users, so allow one user's worth of slack per worker.
    let cap_conns = cap.saturating_sub(conns_per_user).max(1);
    let needed = conns.div_ceil(cap_conns) as usize;
    let workers = if asked == 0 { needed.max(1) } else { asked };
    if workers < needed {
        return Err(format!(
            "{conns} connections need at least {needed} workers: each may open only {cap} (open-files limit); \
             raise --workers"
        ));
    }
    Ok(workers)
}

/// Runs every selected phase and returns the report (whose `ok` says whether the run passed).
pub fn run(args: &RunArgs) -> anyhow::Result<Report> {
    args.validate().map_err(|e| anyhow!(e))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_seconds);
    let fd_limit = raise_open_files_limit();
    let cap = fd_limit.saturating_sub(RESERVED_FDS);
    let count =
        worker_count(args.conns, args.workers, cap, args.conns_per_user).map_err(|e| anyhow!(e))?;
    let shares = split(args.conns, args.conns_per_user, count);
    let sources: Vec<IpAddr> = if args.server.is_ipv4() && args.server.ip().is_loopback() {
        (0..args.source_ips)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
            .collect()
    } else {
        Vec::new()
    };
    let seed = monotonic_ns() ^ u64::from(std::process::id());
    let inits: Vec<WorkerInit> = shares
        .iter()
        .enumerate()
        .map(|(w, &(first, n))| WorkerInit {
            worker: w,
            server: args.server,
            path: args.path.clone(),
            first_conn: first,
            conns: n,
            conns_per_user: args.conns_per_user,
            first_user: args.first_user,
            channels: args.channels,
            sources: sources.clone(),
            handshake_timeout_ms: args.handshake_timeout_ms,
            max_lifetime_ms: (args.max_seconds + 60) * 1000,
            seed: seed.wrapping_add(w as u64 * 0x9E37_79B9_7F4A_7C15),
            tls: args.tls.then_some(crate::proto::TlsMode {
                resume: args.tls_resume,
            }),
            slow: args.has(Phase::Slow).then(|| slow_sockets(args)),
            compression: args.compression,
        })
        .collect();

    let mut phases: Vec<Phase> = args.phases.clone();
    phases.sort();
    phases.dedup();
    let mut report = Report {
        version: REPORT_VERSION,
        config: RunConfig {
            server: args.server.to_string(),
            admin: args.admin.to_string(),
            server_pid: args.server_pid,
            conns: args.conns,
            workers: shares.len(),
            source_ips: sources.len() as u8,
            conns_per_user: args.conns_per_user,
            users: args.conns.div_ceil(args.conns_per_user),
            channels: args.channels,
            phases: phases
                .iter()
                .map(|p| format!("{p:?}").to_lowercase())
                .collect(),
            payload_bytes: args.payload_bytes,
            binary: args.binary,
            json_payload: args.json_payload,
            compression: args.compression,
            rate: args.rate,
        },
        ..Default::default()
    };

    let mut admin = AdminClient::new(args.admin);
    admin
        .get("/metrics")
        .with_context(|| format!("admin API at {} does not answer", args.admin))?;
    let mut workers = Workers::spawn(inits)?;
    let mut run = Run {
        args,
        shares,
        deadline,
        workers: &mut workers,
        admin,
        progress: Progress::new(count, !args.quiet),
        open: 0,
        seed,
    };
    if let Err(e) = run.phases(&phases, &mut report) {
        run.progress.clear();
        report.aborted = Some(format!("{e:#}"));
    }
    run.progress.clear();
    match run.shutdown() {
        Ok(health) => report.health = health,
        Err(e) => {
            if report.aborted.is_none() {
                report.aborted = Some(format!("shutdown: {e:#}"));
            }
        }
    }
    report.server_metrics = run.server_metrics();
    drop(run);
    workers.reap(Duration::from_secs(2));
    report.elapsed_secs = started.elapsed().as_secs_f64();
    report.finish();
    Ok(report)
}

struct Run<'a> {
    args: &'a RunArgs,
    shares: Vec<Share>,
    deadline: Instant,
    workers: &'a mut Workers,
    admin: AdminClient,
    progress: Progress,
    open: u64,
    seed: u64,
}

impl Run<'_> {
    fn phases(&mut self, phases: &[Phase], report: &mut Report) -> anyhow::Result<()> {
        self.workers.collect(
            Instant::now() + Duration::from_secs(10),
            |e| match e {
                Event::Ready { fd_limit } => Some(fd_limit),
                _ => None,
            },
            |_| {},
        )?;
        let before = self.sample();
        let mut held = (0.0, None);
        for &phase in phases {
            if Instant::now() >= self.deadline {
                bail!("--max-seconds reached before the {phase:?} phase");
            }
            match phase {
                Phase::Connect => report.connect = Some(self.connect()?),
                Phase::Idle => held = self.idle(),
                Phase::Broadcast => {
                    report.broadcast = Some(self.broadcast()?);
                    if let Some(m) = &mut report.memory {
                        m.after_broadcast = self.sample();
                    }
                }
                Phase::Unicast => report.unicast = Some(self.unicast()?),
                Phase::Batch => {
                    let mut section = self.batch()?;
                    let unicast = report.unicast.as_ref().map(|u| u.targets_delivered_per_sec);
                    section.vs_unicast = unicast
                        .filter(|u| *u > 0.0)
                        .map(|u| section.targets_delivered_per_sec / u);
                    report.batch = Some(section);
                }
                Phase::Churn => {
                    report.churn = Some(self.churn()?);
                    if let Some(m) = &mut report.memory {
                        m.after_churn = self.sample();
                    }
                }
                Phase::Slow => report.slow = Some(self.slow()?),
            }
            // Memory is sampled after connect, or after the idle hold when that phase runs.
            let memory_point = if phases.contains(&Phase::Idle) {
                Phase::Idle
            } else {
                Phase::Connect
            };
            if phase == memory_point {
                if let (Some(before), Some(after)) = (before, self.sample()) {
                    let mut section = memory_section(before, after, held.0);
                    section.idle_server_cpu_ns_per_sec = held
                        .1
                        .and_then(|cpu| (held.0 > 0.0).then(|| cpu as f64 / held.0));
                    report.memory = Some(section);
                }
            }
        }
        Ok(())
    }

    /// Seconds left for a phase: its timeout, cut by the global deadline.
    fn phase_deadline(&self, secs: u64) -> Instant {
        (Instant::now() + Duration::from_secs(secs)).min(self.deadline)
    }

    fn timeout_ms(&self, deadline: Instant) -> u64 {
        deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64
    }

    fn sample(&self) -> Option<MemorySample> {
        let pid = self.args.server_pid?;
        Some(MemorySample {
            server: procfs::process_memory(pid).ok()?,
            kernel: procfs::kernel_memory().ok()?,
            open_conns: self.open,
        })
    }

    fn cpu_ns(&self) -> Option<u64> {
        procfs::process_cpu_ns(self.args.server_pid?).ok()
    }

    /// CPU of the workers and this process (publisher threads), ns.
    fn generator_cpu_ns(&self) -> Option<u64> {
        let mut total = procfs::process_cpu_ns(std::process::id()).ok()?;
        for &pid in self.workers.pids() {
            total += procfs::process_cpu_ns(pid).ok()?;
        }
        Some(total)
    }

    fn metrics(&mut self) -> Option<BTreeMap<String, f64>> {
        let resp = self.admin.get("/metrics").ok()?;
        (resp.status == 200).then(|| parse_metrics(&String::from_utf8_lossy(&resp.body)))
    }

    fn metric(&mut self, name: &str) -> Option<u64> {
        self.metrics()?.get(name).map(|v| *v as u64)
    }

    fn spec(&self) -> PayloadSpec {
        PayloadSpec {
            bytes: self.args.payload_bytes,
            binary: self.args.binary,
            json: self.args.json_payload,
        }
    }

    // ---- phases --------------------------------------------------------------------------------------------

    fn connect(&mut self) -> anyhow::Result<ConnectSection> {
        let deadline = self.phase_deadline(self.args.phase_timeout_secs);
        let cpu0 = self.cpu_ns();
        let gen0 = self.generator_cpu_ns();
        let workers = self.shares.len();
        self.workers.send_all(&Command::Connect {
            rate_per_sec: self.args.rate / workers as f64,
            max_inflight: self.args.max_inflight,
            timeout_ms: self.timeout_ms(deadline),
        })?;
        self.progress.phase("connect", self.args.conns, self.open);
        let progress = &mut self.progress;
        let results: Vec<ConnectResult> = self.workers.collect(
            deadline + Duration::from_secs(5),
            |e| match e {
                Event::Connected(r) => Some(r),
                _ => None,
            },
            |e| progress.update(e),
        )?;
        self.progress.clear();
        let cpu = diff(cpu0, self.cpu_ns());
        let mut section = ConnectSection {
            generator_cpu_ns: diff(gen0, self.generator_cpu_ns()),
            ..Default::default()
        };
        let mut hist = Latency::default();
        let (mut first, mut last) = (u64::MAX, 0);
        for r in &results {
            section.attempted += r.attempted;
            section.open += r.open;
            stats::merge_reasons(&mut section.failures, &r.failures);
            hist.merge_data(&r.handshake_us);
            if r.first_start_ns != 0 {
                first = first.min(r.first_start_ns);
            }
            last = last.max(r.last_done_ns);
        }
        section.failed = section.failures.values().sum();
        let elapsed = last.saturating_sub(first);
        section.elapsed_ms = elapsed as f64 / 1e6;
        section.handshakes_per_sec = stats::per_sec(hist.count(), elapsed);
        section.handshake_latency = hist.summary();
        section.server_cpu_ns = cpu;
        section.cpu_ns_per_handshake = cpu.and_then(|c| per(c, hist.count()));
        self.open = section.open;
        Ok(section)
    }

    /// Holds the connections idle; returns the seconds held and the server CPU (ns) spent meanwhile.
    fn idle(&mut self) -> (f64, Option<u64>) {
        let hold = Duration::from_secs_f64(self.args.idle_secs);
        let end = (Instant::now() + hold).min(self.deadline);
        self.progress.phase("idle", self.args.conns, self.open);
        let cpu0 = self.cpu_ns();
        let began = Instant::now();
        while Instant::now() < end {
            std::thread::sleep(
                Duration::from_millis(100).min(end.saturating_duration_since(Instant::now())),
            );
            self.progress.update(None);
        }
        let cpu = diff(cpu0, self.cpu_ns());
        self.progress.clear();
        (began.elapsed().as_secs_f64(), cpu)
    }

    fn broadcast(&mut self) -> anyhow::Result<BroadcastSection> {
        let deadline = self.phase_deadline(self.args.phase_timeout_secs);
        let frames0 = self.metric("densepush_frames_delivered_total");
        let bytes0 = self.metric("densepush_bytes_written_total");
        let cpu0 = self.cpu_ns();
        let gen0 = self.generator_cpu_ns();
        let never = AtomicBool::new(false);
        let spec = self.spec();
        let published = publisher::publish_all(
            &mut self.admin,
            Stream::Broadcast,
            Some(self.args.broadcast_messages),
            Duration::from_millis(self.args.broadcast_interval_ms),
            spec,
            &never,
            deadline,
        );
        let delivery = self.await_delivery(
            "broadcast",
            Stream::Broadcast,
            |_| Expectation::All(published.accepted),
            published.first_ns,
            deadline,
        )?;
        let cpu = diff(cpu0, self.cpu_ns());
        let generator_cpu_ns = diff(gen0, self.generator_cpu_ns());
        let buffers_live_after_drain = self.metric("densepush_buffers_live");
        std::thread::sleep(Duration::from_secs(1));
        let buffers_live_settled = self.metric("densepush_buffers_live");
        let frames1 = self.metric("densepush_frames_delivered_total");
        let bytes1 = self.metric("densepush_bytes_written_total");
        let server_bytes_written = diff(bytes0, bytes1);
        Ok(BroadcastSection {
            server_bytes_written,
            wire_bytes_per_delivery: server_bytes_written.and_then(|b| per(b, delivery.received)),
            messages: published.accepted,
            publish_failures: published.failures,
            interval_ms: self.args.broadcast_interval_ms,
            deliveries_per_sec: delivery.deliveries_per_sec,
            server_frames_delivered: diff(frames0, frames1),
            server_cpu_ns: cpu,
            generator_cpu_ns,
            cpu_ns_per_delivery: cpu.and_then(|c| per(c, delivery.received)),
            buffers_live_after_drain,
            buffers_live_settled,
            delivery,
        })
    }

    fn unicast(&mut self) -> anyhow::Result<UnicastSection> {
        let deadline = self.phase_deadline(self.args.phase_timeout_secs);
        let cpu0 = self.cpu_ns();
        let gen0 = self.generator_cpu_ns();
        let users = self.args.conns.div_ceil(self.args.conns_per_user);
        let published = publisher::unicast(
            self.args.admin,
            self.args.publishers,
            self.args.unicast_messages,
            users,
            self.args.first_user,
            self.args.unicast_rate,
            self.spec(),
            self.seed,
            deadline,
        );
        let cpu_user = self.args.conns_per_user;
        let user_offset = self.args.first_user;
        let per_user = &published.per_user;
        let delivery = self.await_delivery(
            "unicast",
            Stream::Unicast,
            |(first, n)| {
                // Users are counted from 0 in `per_user` and named from `--first-user` on the wire.
                let first_user = first / cpu_user;
                let end_user = (first + n).div_ceil(cpu_user);
                Expectation::PerUser {
                    first_user: user_offset + first_user,
                    counts: per_user[first_user as usize..end_user as usize].to_vec(),
                }
            },
            published.totals.first_ns,
            deadline,
        )?;
        let cpu = diff(cpu0, self.cpu_ns());
        let mut delivery = delivery;
        // Sequence number 0 of each user's stream is nothing special.
        delivery.first_message_latency = None;
        let t = &published.totals;
        Ok(UnicastSection {
            publishers: published.publishers,
            published: t.accepted,
            publish_failures: t.failures.clone(),
            publishes_per_sec: stats::per_sec(t.accepted, t.last_ns.saturating_sub(t.first_ns)),
            publish_latency: t.latency.summary(),
            server_cpu_ns: cpu,
            generator_cpu_ns: diff(gen0, self.generator_cpu_ns()),
            cpu_ns_per_delivery: cpu.and_then(|c| per(c, delivery.received)),
            targets_delivered_per_sec: delivery.deliveries_per_sec / cpu_user as f64,
            delivery,
        })
    }

    fn batch(&mut self) -> anyhow::Result<BatchSection> {
        let deadline = self.phase_deadline(self.args.phase_timeout_secs);
        let cpu0 = self.cpu_ns();
        let gen0 = self.generator_cpu_ns();
        let users = self.args.conns.div_ceil(self.args.conns_per_user);
        let published = publisher::batch(
            self.args.admin,
            self.args.publishers,
            self.args.batch_rounds,
            users,
            self.args.batch_targets,
            self.spec(),
            deadline,
        );
        let rounds = published.rounds;
        let mut delivery = self.await_delivery(
            "batch",
            Stream::Batch,
            |_| Expectation::All(rounds),
            published.totals.first_ns,
            deadline,
        )?;
        // Round 0 of each connection is nothing special.
        delivery.first_message_latency = None;
        let cpu = diff(cpu0, self.cpu_ns());
        let t = &published.totals;
        Ok(BatchSection {
            publishers: published.publishers,
            targets_per_batch: self.args.batch_targets,
            rounds,
            batches: t.accepted,
            targets: published.targets,
            retried: published.retried,
            publish_failures: t.failures.clone(),
            batches_per_sec: stats::per_sec(t.accepted, t.last_ns.saturating_sub(t.first_ns)),
            batch_latency: t.latency.summary(),
            targets_delivered_per_sec: delivery.deliveries_per_sec
                / self.args.conns_per_user as f64,
            vs_unicast: None,
            server_cpu_ns: cpu,
            generator_cpu_ns: diff(gen0, self.generator_cpu_ns()),
            cpu_ns_per_delivery: cpu.and_then(|c| per(c, delivery.received)),
            delivery,
        })
    }

    fn churn(&mut self) -> anyhow::Result<ChurnSection> {
        let churn_ms = (self.args.churn_secs * 1000.0) as u64;
        let deadline = self.phase_deadline(
            self.args.phase_timeout_secs + churn_ms / 1000 + CHURN_SETTLE_MS / 1000,
        );
        let cpu0 = self.cpu_ns();
        let gen0 = self.generator_cpu_ns();
        let (stop, publishing) = publisher::spawn_publish_all(
            self.args.admin,
            Stream::Churn,
            Duration::from_millis(self.args.churn_publish_interval_ms.max(1)),
            self.spec(),
            deadline,
        );
        for (id, &(_, n)) in self.shares.clone().iter().enumerate() {
            self.workers.send(
                id,
                &Command::Churn {
                    closes_per_sec: self.args.churn_fraction * n as f64,
                    duration_ms: churn_ms,
                    settle_ms: CHURN_SETTLE_MS,
                },
            )?;
        }
        self.progress.phase("churn", self.args.conns, self.open);
        let progress = &mut self.progress;
        let churned: anyhow::Result<Vec<ChurnResult>> = self.workers.collect(
            deadline,
            |e| match e {
                Event::Churned(r) => Some(r),
                _ => None,
            },
            |e| progress.update(e),
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let published = publishing
            .join()
            .map_err(|_| anyhow!("churn publisher panicked"))?;
        self.progress.clear();
        let churned = churned?;
        let delivery = self.await_delivery(
            "churn",
            Stream::Churn,
            |_| Expectation::UpTo(published.accepted),
            published.first_ns,
            self.phase_deadline(self.args.phase_timeout_secs),
        )?;
        let mut delivery = delivery;
        delivery.first_message_latency = None;
        let mut section = ChurnSection {
            secs: self.args.churn_secs,
            fraction_per_sec: self.args.churn_fraction,
            published: published.accepted,
            server_cpu_ns: diff(cpu0, self.cpu_ns()),
            generator_cpu_ns: diff(gen0, self.generator_cpu_ns()),
            delivery,
            ..Default::default()
        };
        let mut hist = Latency::default();
        for r in &churned {
            section.closed += r.closed;
            section.reopened += r.reopened;
            section.open_at_end += r.open;
            stats::merge_reasons(&mut section.failures, &r.failures);
            hist.merge_data(&r.handshake_us);
        }
        section.reopen_latency = hist.summary();
        self.open = section.open_at_end;
        Ok(section)
    }

    /// The slow readers stop reading while `--slow-messages` broadcasts of `--slow-payload-bytes` go out, stay
    /// away `--slow-pause-ms` after the other connections have them all, then read again. A sampler thread
    /// records the server's memory and buffer budget meanwhile.
    fn slow(&mut self) -> anyhow::Result<SlowSection> {
        let args = self.args;
        let pause = Duration::from_millis(args.slow_pause_ms);
        let deadline = self.phase_deadline(args.phase_timeout_secs) + pause;
        self.workers.send_all(&Command::Pause)?;
        let paused: Vec<u64> = self.workers.collect(
            deadline,
            |e| match e {
                Event::Paused { slow } => Some(slow),
                _ => None,
            },
            |_| {},
        )?;
        let counters = [
            "densepush_slow_consumer_closes_total",
            "densepush_budget_closes_total",
            "densepush_close_frames_written_total",
            "densepush_close_frames_given_up_total",
        ];
        let before = self.metrics();
        let rss_before = args
            .server_pid
            .and_then(|pid| procfs::process_memory(pid).ok().map(|m| m.rss_bytes));
        let sampler = Sampler::start(args.admin, args.server_pid);
        let never = AtomicBool::new(false);
        let published = publisher::publish_all(
            &mut self.admin,
            Stream::Slow,
            Some(args.slow_messages),
            Duration::ZERO,
            PayloadSpec {
                bytes: args.slow_payload_bytes,
                binary: args.binary,
                json: args.json_payload,
            },
            &never,
            deadline,
        );
        // The other connections read on: they get everything.
        let healthy = self.await_delivery_of(
            "slow (healthy readers)",
            Stream::Slow,
            |_| Expectation::All(published.accepted),
            published.first_ns,
            deadline,
            true,
        )?;
        // The slow readers stay away a while: past the close deadline of any the server closed.
        self.progress
            .phase("slow (paused)", self.args.conns, self.open);
        let resume_at = (Instant::now() + pause).min(deadline);
        while Instant::now() < resume_at {
            std::thread::sleep(Duration::from_millis(100));
            self.progress.update(None);
        }
        self.progress.clear();
        let at_resume = self.metrics();
        let peaks = sampler.stop();
        self.workers.send_all(&Command::Resume {
            messages: published.accepted,
            timeout_ms: self.timeout_ms(deadline + Duration::from_secs(30)),
        })?;
        self.progress
            .phase("slow (reading again)", self.args.conns, self.open);
        let progress = &mut self.progress;
        let results: Vec<SlowResult> = self.workers.collect(
            deadline + Duration::from_secs(35),
            |e| match e {
                Event::Resumed(r) => Some(r),
                _ => None,
            },
            |e| progress.update(e),
        )?;
        self.progress.clear();
        // What is left once the readers drained (or went).
        std::thread::sleep(Duration::from_secs(1));
        let after = self.metrics();
        let mut section = SlowSection {
            slow_readers: paused.iter().sum(),
            receive_buffer: args.slow_receive_buffer,
            mss: args.slow_mss,
            messages: published.accepted,
            payload_bytes: args.slow_payload_bytes,
            publish_failures: published.failures,
            pause_ms: args.slow_pause_ms,
            healthy,
            server_rss_before: rss_before,
            server_rss_peak: peaks.rss,
            buffered_bytes_peak: peaks.buffered,
            outbox_bytes_peak: peaks.outbox,
            kernel_tcp_mem_bytes_peak: peaks.tcp_mem,
            ..Default::default()
        };
        let get = |m: &Option<BTreeMap<String, f64>>, name: &str| {
            m.as_ref().and_then(|m| m.get(name)).map(|v| *v as u64)
        };
        section.buffered_bytes_limit = get(&after, "densepush_buffered_bytes_limit");
        section.buffered_bytes_after = get(&after, "densepush_buffered_bytes");
        section.outbox_bytes_after = get(&after, "densepush_outbox_bytes");
        section.buffered_bytes_at_resume = get(&at_resume, "densepush_buffered_bytes");
        let delta = |name: &str| diff(get(&before, name), get(&after, name));
        section.slow_consumer_closes = delta(counters[0]);
        section.budget_closes = delta(counters[1]);
        section.close_frames_written = delta(counters[2]);
        section.close_frames_given_up = delta(counters[3]);
        for r in results {
            section.lossless += r.lossless;
            section.incomplete += r.incomplete;
            section.messages_before_end += r.messages_before_end;
            section.duplicated += r.duplicated;
            section.reordered += r.reordered;
            stats::merge_reasons(&mut section.closed_with_frame, &r.closed_with_frame);
            stats::merge_reasons(&mut section.ended_without_frame, &r.ended_without_frame);
            stats::merge_reasons(
                &mut section.others_closed_with_frame,
                &r.others_closed_with_frame,
            );
            stats::merge_reasons(
                &mut section.others_ended_without_frame,
                &r.others_ended_without_frame,
            );
            for v in r.violations {
                if section.violations.len() < MAX_VIOLATIONS {
                    section.violations.push(v);
                }
            }
        }
        Ok(section)
    }

    /// Tells each worker what to expect on `stream` and merges their answers.
    fn await_delivery(
        &mut self,
        label: &'static str,
        stream: Stream,
        expect: impl Fn(Share) -> Expectation,
        first_publish_ns: u64,
        deadline: Instant,
    ) -> anyhow::Result<Delivery> {
        self.await_delivery_of(label, stream, expect, first_publish_ns, deadline, false)
    }

    /// [`Run::await_delivery`], leaving the slow readers out with `skip_slow`.
    fn await_delivery_of(
        &mut self,
        label: &'static str,
        stream: Stream,
        expect: impl Fn(Share) -> Expectation,
        first_publish_ns: u64,
        deadline: Instant,
        skip_slow: bool,
    ) -> anyhow::Result<Delivery> {
        let timeout_ms = self.timeout_ms(deadline);
        for (id, &share) in self.shares.clone().iter().enumerate() {
            self.workers.send(
                id,
                &Command::Await {
                    stream,
                    expect: expect(share),
                    timeout_ms,
                    skip_slow,
                },
            )?;
        }
        self.progress.phase(label, self.args.conns, self.open);
        let progress = &mut self.progress;
        let results: Vec<DeliveryResult> = self.workers.collect(
            deadline + Duration::from_secs(5),
            |e| match e {
                Event::Delivered(r) => Some(r),
                _ => None,
            },
            |e| progress.update(e),
        )?;
        self.progress.clear();
        Ok(merge_deliveries(results, first_publish_ns))
    }

    fn shutdown(&mut self) -> anyhow::Result<HealthSection> {
        self.workers.send_all(&Command::Shutdown {
            timeout_ms: SHUTDOWN_MS,
        })?;
        let byes: Vec<Health> = self.workers.collect(
            Instant::now() + Duration::from_millis(SHUTDOWN_MS + 5_000),
            |e| match e {
                Event::Bye(h) => Some(h),
                _ => None,
            },
            |_| {},
        )?;
        let mut health = HealthSection::default();
        for h in byes {
            health.pings += h.pings;
            health.pings_after_close += h.pings_after_close;
            health.pongs += h.pongs;
            health.close_timeouts += h.close_timeouts;
            stats::merge_reasons(&mut health.server_closes, &h.server_closes);
            stats::merge_reasons(&mut health.abrupt, &h.abrupt);
            stats::merge_reasons(&mut health.protocol_errors, &h.protocol_errors);
        }
        Ok(health)
    }

    fn server_metrics(&mut self) -> Option<ServerMetrics> {
        let m = self.metrics()?;
        let get = |name: &str| m.get(name).copied().unwrap_or(0.0);
        Some(ServerMetrics {
            connections_open: get("densepush_connections_open"),
            buffers_live: get("densepush_buffers_live"),
            frames_delivered_total: get("densepush_frames_delivered_total"),
            handshakes_rejected_total: get("densepush_handshakes_rejected_total"),
            slow_consumer_closes_total: get("densepush_slow_consumer_closes_total"),
            protocol_error_closes_total: get("densepush_protocol_error_closes_total"),
            pong_timeouts_total: get("densepush_pong_timeouts_total"),
            abrupt_closes_total: get("densepush_abrupt_closes_total"),
            pongs_received_total: get("densepush_pongs_received_total"),
        })
    }
}

/// Sums the workers' delivery results; rates run from the first publish to the last delivery.
pub fn merge_deliveries(results: Vec<DeliveryResult>, first_publish_ns: u64) -> Delivery {
    let mut d = Delivery {
        complete: true,
        ..Default::default()
    };
    let mut hist = Latency::default();
    let mut first_hist = Latency::default();
    let mut last = 0;
    for r in results {
        d.complete &= r.complete;
        d.conns_checked += r.conns_checked;
        d.expected += r.expected;
        d.received += r.received;
        d.lost += r.lost;
        d.duplicated += r.duplicated;
        d.reordered += r.reordered;
        d.misdelivered += r.misdelivered;
        d.malformed += r.malformed;
        hist.merge_data(&r.latency_us);
        first_hist.merge_data(&r.first_message_latency_us);
        last = last.max(r.last_ns);
        for v in r.violations {
            if d.violations.len() < MAX_VIOLATIONS {
                d.violations.push(v);
            }
        }
    }
    let elapsed = last.saturating_sub(first_publish_ns);
    d.elapsed_ms = elapsed as f64 / 1e6;
    d.deliveries_per_sec = stats::per_sec(d.received, elapsed);
    d.latency = hist.summary();
    d.first_message_latency = first_hist.summary();
    d
}

fn memory_section(before: MemorySample, after: MemorySample, held_secs: f64) -> MemorySection {
    let per = |a: u64, b: u64| {
        if after.open_conns == 0 {
            0.0
        } else {
            (b as f64 - a as f64) / after.open_conns as f64
        }
    };
    let slab = per(before.kernel.slab_bytes, after.kernel.slab_bytes);
    let tcp = per(before.kernel.tcp_mem_bytes, after.kernel.tcp_mem_bytes);
    MemorySection {
        before,
        after,
        held_secs,
        server_rss_bytes_per_conn: per(before.server.rss_bytes, after.server.rss_bytes),
        server_hwm_bytes_per_conn: per(before.server.hwm_bytes, after.server.hwm_bytes),
        kernel_slab_bytes_per_conn: slab,
        kernel_tcp_mem_bytes_per_conn: tcp,
        kernel_bytes_per_conn: slab + tcp,
        idle_server_cpu_ns_per_sec: None,
        after_broadcast: None,
        after_churn: None,
    }
}

/// The highest samples seen during the slow-reader phase.
#[derive(Debug, Default)]
struct Peaks {
    rss: Option<u64>,
    buffered: Option<u64>,
    outbox: Option<u64>,
    tcp_mem: Option<u64>,
}

/// A thread that samples the server's RSS, buffer budget and logical backlog, and the kernel's TCP memory,
/// every 50 ms until stopped, keeping the peaks.
struct Sampler {
    stop: std::sync::Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Peaks>,
}

impl Sampler {
    fn start(admin: std::net::SocketAddr, server_pid: Option<u32>) -> Sampler {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut client = AdminClient::new(admin);
            let mut peaks = Peaks::default();
            let max = |slot: &mut Option<u64>, v: Option<u64>| {
                if let Some(v) = v {
                    *slot = Some(slot.map_or(v, |s| s.max(v)));
                }
            };
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(resp) = client.get("/metrics") {
                    let m = parse_metrics(&String::from_utf8_lossy(&resp.body));
                    let get = |name: &str| m.get(name).map(|v| *v as u64);
                    max(&mut peaks.buffered, get("densepush_buffered_bytes"));
                    max(&mut peaks.outbox, get("densepush_outbox_bytes"));
                }
                if let Some(pid) = server_pid {
                    max(
                        &mut peaks.rss,
                        procfs::process_memory(pid).ok().map(|m| m.rss_bytes),
                    );
                }
                max(
                    &mut peaks.tcp_mem,
                    procfs::kernel_memory().ok().map(|k| k.tcp_mem_bytes),
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            peaks
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> Peaks {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Which connections are slow readers, from the options.
fn slow_sockets(args: &RunArgs) -> SlowSockets {
    SlowSockets {
        every: (1.0 / args.slow_fraction).round().max(1.0) as u64,
        receive_buffer: args.slow_receive_buffer,
        mss: args.slow_mss,
    }
}

fn diff(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(b?.saturating_sub(a?))
}

fn per(total: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| total as f64 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_connection_once_with_whole_users() {
        for (conns, cpu, workers) in [
            (500, 1, 2),
            (15_000, 2, 3),
            (11, 5, 2),
            (3, 1, 8),
            (10, 5, 4),
        ] {
            let shares = split(conns, cpu, workers);
            let mut next = 0;
            for &(first, n) in &shares {
                assert_eq!(first, next, "{conns} {cpu} {workers}: {shares:?}");
                assert_eq!(first % cpu, 0, "a user split across workers: {shares:?}");
                next = first + n;
            }
            assert_eq!(next, conns);
            assert!(shares.len() <= workers);
        }
    }

    #[test]
    fn split_is_even() {
        assert_eq!(split(500, 1, 2), vec![(0, 250), (250, 250)]);
    }

    #[test]
    fn auto_worker_count_respects_the_file_limit() {
        assert_eq!(worker_count(15_000, 0, 19_936, 1), Ok(1));
        assert_eq!(worker_count(40_000, 0, 19_936, 1), Ok(3));
        assert_eq!(worker_count(500, 2, 19_936, 1), Ok(2));
        assert!(worker_count(40_000, 1, 19_936, 1)
            .unwrap_err()
            .contains("--workers"));
    }

    #[test]
    fn deliveries_merge_and_rate_from_first_publish() {
        let mut h = Latency::default();
        h.record_us(100);
        let r = |received, lost, last_ns| DeliveryResult {
            complete: lost == 0,
            conns_checked: 2,
            expected: 4,
            received,
            lost,
            latency_us: h.to_data(),
            last_ns,
            ..Default::default()
        };
        let d = merge_deliveries(
            vec![r(4, 0, 1_500_000_000), r(3, 1, 2_000_000_000)],
            1_000_000_000,
        );
        assert!(!d.complete);
        assert_eq!((d.received, d.lost, d.conns_checked), (7, 1, 4));
        assert_eq!(d.deliveries_per_sec, 7.0);
        assert_eq!(d.latency.unwrap().count, 2);
    }

    #[test]
    fn memory_per_connection_divides_growth() {
        let mut before = MemorySample::default();
        before.server.rss_bytes = 1_000;
        before.kernel.slab_bytes = 10_000;
        let mut after = before;
        after.server.rss_bytes = 3_000;
        after.kernel.slab_bytes = 30_000;
        after.kernel.tcp_mem_bytes = 4_000;
        after.open_conns = 10;
        let m = memory_section(before, after, 1.0);
        assert_eq!(m.server_rss_bytes_per_conn, 200.0);
        assert_eq!(m.kernel_bytes_per_conn, 2_400.0);
    }
}
