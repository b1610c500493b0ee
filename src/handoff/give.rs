//! The predecessor's side of a live upgrade: start the successor from the binary at this server's path with
//! the same arguments, check it, freeze the admin thread and the reactors in order, stream everything, and
//! either exit (the successor committed) or roll back (anything else), with the successor killed and reaped
//! before anything resumes, so two processes never serve the same sockets.

use super::channel::Channel;
use super::protocol::{self, kind, Accept, BusHandover, Facts, Hello};
use super::{Freeze, Order, Part};
use crate::admin::AdminHandle;
use crate::dispatch::Reactors;
use crate::history::History;
use crate::snapshot::Writer;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the successor may take to start and say hello (it loads its config, its certificate, its keys;
/// a JWKS fetch alone may take 6 s).
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a frozen part may take to report ready (a reactor applies its whole mailbox first).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the successor may take to register everything and commit.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Parts a frozen reactor may have sent ahead of the channel (each at most one batch).
const PARTS_IN_FLIGHT: usize = 4;

/// Why an upgrade rolled back: a label for `densepush_upgrades_rolled_back_total{reason}`.
pub const ROLLBACK_REASONS: [&str; 6] =
    ["spawn", "exited", "refused", "version", "timeout", "error"];

/// Upgrade counters and the last outcome, shared with `/metrics` and `/healthz`.
#[derive(Debug, Default)]
pub struct UpgradeState {
    /// Counter: upgrades started (SIGUSR2 or `densepush upgrade`).
    pub started: AtomicU64,
    /// Counter: upgrades completed (this process is the product of the last of them).
    pub completed: AtomicU64,
    /// Counter: upgrades rolled back, by [`ROLLBACK_REASONS`].
    pub rolled_back: [AtomicU64; ROLLBACK_REASONS.len()],
    /// Gauge: connections the last completed upgrade moved.
    pub moved: AtomicU64,
    /// Gauge: milliseconds from the freeze to the successor's commit in the last completed upgrade (the pause
    /// in deliveries).
    pub pause_ms: AtomicU64,
    /// The last outcome, for `/healthz` and `densepush upgrade`.
    pub last: Mutex<Option<Outcome>>,
}

impl UpgradeState {
    /// Counts a rollback and keeps it as the last outcome.
    fn rolled_back(&self, reason: &'static str, detail: String, started_ms: u64) {
        let i = ROLLBACK_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(ROLLBACK_REASONS.len() - 1);
        self.rolled_back[i].fetch_add(1, Relaxed);
        log::error!("upgrade rolled back ({reason}): {detail}; this process keeps serving");
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Outcome::RolledBack {
            reason,
            detail,
            started_ms,
        });
    }

    /// Appends the upgrade numbers to a Prometheus exposition.
    pub fn render_metrics(&self, text: &mut String) {
        use crate::metrics::{Exposition, MetricType};
        let mut out = Exposition::new(text);
        out.counter(
            "densepush_upgrades_started_total",
            "Live upgrades started (SIGUSR2 or densepush upgrade), carried across upgrades.",
            self.started.load(Relaxed),
        );
        out.counter(
            "densepush_upgrades_completed_total",
            "Live upgrades completed, carried across upgrades.",
            self.completed.load(Relaxed),
        );
        out.family(
            "densepush_upgrades_rolled_back_total",
            "Live upgrades rolled back by this process, by reason (the old process kept serving).",
            MetricType::Counter,
            "reason",
            ROLLBACK_REASONS
                .iter()
                .zip(&self.rolled_back)
                .map(|(r, n)| (*r, n.load(Relaxed))),
        );
        out.gauge(
            "densepush_upgrade_connections_moved",
            "Connections the last completed upgrade handed to this process.",
            self.moved.load(Relaxed),
        );
        out.gauge(
            "densepush_upgrade_pause_ms",
            "Milliseconds from the freeze to serving again in the last completed upgrade.",
            self.pause_ms.load(Relaxed),
        );
    }

    /// The counters as the successor carries them on.
    fn totals(&self) -> (u64, u64, u64) {
        (
            self.started.load(Relaxed),
            self.completed.load(Relaxed),
            self.rolled_back.iter().map(|c| c.load(Relaxed)).sum(),
        )
    }
}

/// How the last upgrade ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It rolled back; this process kept serving.
    RolledBack {
        /// The reason's label.
        reason: &'static str,
        /// What happened.
        detail: String,
        /// When it started (ms since the epoch).
        started_ms: u64,
    },
    /// This process is its successor.
    Completed {
        /// The predecessor's pid.
        from_pid: u32,
        /// Connections moved.
        moved: u64,
        /// Milliseconds from the freeze to the commit.
        pause_ms: u64,
        /// Milliseconds from the signal to the commit (starting the new binary included).
        total_ms: u64,
        /// When it started (ms since the epoch).
        started_ms: u64,
    },
}

/// Everything the predecessor needs to hand over.
pub struct Giver {
    /// The connection events sender, flushed before this process exits.
    pub events: Option<Arc<crate::events::Events>>,
    /// How long that flush may take (`server.shutdown_timeout_ms`).
    pub finish_within: Duration,
    /// The binary to start: this server's path as it was at start (replace the file, then upgrade).
    pub exe: PathBuf,
    /// The arguments this server was started with.
    pub args: Vec<std::ffi::OsString>,
    /// This server's unchangeable settings.
    pub facts: Facts,
    /// The reactors.
    pub reactors: Reactors,
    /// The admin thread.
    pub admin: AdminHandle,
    /// The history.
    pub history: Arc<History>,
    /// The cluster link, whose bus position moves to the successor.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The counters.
    pub state: Arc<UpgradeState>,
}

/// Why a step failed: a rollback reason and what happened.
struct Failure(&'static str, String);

impl Giver {
    /// Runs one upgrade. Returns only if it rolled back (after resuming every frozen part); on success the
    /// process exits here with status 0, the successor serving every connection.
    pub fn upgrade(&self) {
        self.state.started.fetch_add(1, Relaxed);
        let started_ms = now_ms();
        let started = Instant::now();
        log::info!("upgrade: starting {}", self.exe.display());
        let (chan, theirs) = match Channel::pair() {
            Ok(pair) => pair,
            Err(e) => return self.state.rolled_back("spawn", e.to_string(), started_ms),
        };
        let child = Command::new(&self.exe)
            .args(&self.args)
            .env(protocol::FD_ENV, theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .spawn();
        drop(theirs);
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                let detail = format!("cannot start {}: {e}", self.exe.display());
                return self.state.rolled_back("spawn", detail, started_ms);
            }
        };
        let mut run = Run {
            chan,
            parts: Vec::new(),
            admin: None,
        };
        match self.run(&mut run, &mut child, started_ms, started) {
            Ok(()) => {
                // The successor serves from here on. Exit without closing anything gracefully: the sockets are
                // its too, and a close frame or a shutdown from here would reach its clients.
                log::info!("upgrade: the new process {} serves; exiting", child.id());
                // Events queued here are this process's to send (the successor announces only what happens
                // from now on): one attempt each, within the shutdown timeout, as at a drain.
                if let Some(events) = &self.events {
                    events.finish(self.finish_within);
                }
                std::process::exit(0);
            }
            Err(Failure(reason, detail)) => {
                let _ = run.chan.send(kind::ABORT, detail.as_bytes(), &[]);
                // The successor must be gone before anything here resumes: it holds copies of every socket.
                let _ = child.kill();
                let status = child.wait();
                let detail = match (reason, status) {
                    ("exited", Ok(status)) if !detail.contains("exit status") => {
                        format!("{detail} ({status})")
                    }
                    _ => detail,
                };
                for orders in run
                    .parts
                    .iter()
                    .map(|(_, o)| o)
                    .chain(run.admin.as_ref().map(|(_, o)| o))
                {
                    let _ = orders.send(Order::Resume);
                }
                if let Some(cluster) = &self.cluster {
                    cluster.resume_after_hand_over();
                }
                crate::systemd::notify_main_pid(std::process::id());
                self.state.rolled_back(reason, detail, started_ms);
            }
        }
    }

    fn run(
        &self,
        run: &mut Run,
        child: &mut Child,
        started_ms: u64,
        started: Instant,
    ) -> Result<(), Failure> {
        let chan = &mut run.chan;
        chan.set_timeout(Some(HELLO_TIMEOUT))
            .map_err(|e| Failure("error", e.to_string()))?;
        let (k, payload, _) = chan.recv().map_err(|e| exited(child, e))?;
        if k != kind::HELLO {
            return Err(Failure("error", format!("expected hello, got message {k}")));
        }
        let hello = Hello::decode(&payload).map_err(|e| Failure("error", e.to_string()))?;
        if hello.version != protocol::VERSION {
            let reason = format!(
                "the new binary speaks handoff version {}, this one {}",
                hello.version,
                protocol::VERSION
            );
            let _ = chan.send(kind::REFUSE, reason.as_bytes(), &[]);
            return Err(Failure("version", reason));
        }
        if let Some(reason) = self.facts.refuse(&hello.facts) {
            let _ = chan.send(kind::REFUSE, reason.as_bytes(), &[]);
            return Err(Failure("refused", reason));
        }
        let (total_started, completed, rolled_back) = self.state.totals();
        let accept = Accept {
            pid: std::process::id(),
            started_ms,
            started: total_started,
            completed,
            rolled_back,
        };
        send(chan, kind::ACCEPT, &accept.encode(), &[])?;
        chan.set_timeout(Some(COMMIT_TIMEOUT))
            .map_err(|e| Failure("error", e.to_string()))?;
        let freeze_started = Instant::now();

        // 1. The admin thread: once it is ready, no request is answered here any more. The cluster bus reader
        // is asked to stop at the same time (in a cluster, the admin thread only appends to the bus, so where the
        // reader stops is independent of it).
        let (freeze, parts, orders) = freeze_pair();
        run.admin = Some((parts, orders));
        if !self.admin.freeze(freeze) {
            return Err(Failure("error", "the admin thread is gone".into()));
        }
        let (admin_parts, _) = run.admin.as_ref().expect("set above");
        ready(admin_parts)?;

        // 1b. The bus reader stops between two entries: every entry up to its position is in the mailboxes
        // (the reactors apply them next, and the connections that move carry what is unsent); the successor
        // reads on from exactly there, so a cluster publish is neither lost nor delivered twice across the cut.
        let bus = match &self.cluster {
            None => None,
            Some(cluster) => match cluster.hand_over(READY_TIMEOUT) {
                Some(position) => Some(BusHandover {
                    node_id: cluster.node_id().to_owned(),
                    position,
                }),
                None => {
                    return Err(Failure(
                        "timeout",
                        "the cluster bus reader did not stop in time".into(),
                    ))
                }
            },
        };

        // 2. The reactors: each stops accepting, applies its mailbox, and says ready.
        let mut freezes = Vec::new();
        for _ in 0..self.reactors.len() {
            let (freeze, parts, orders) = freeze_pair();
            freezes.push(freeze);
            run.parts.push((parts, orders));
        }
        self.reactors.freeze(freezes);
        let mut applied = Vec::new();
        for (parts, _) in &run.parts {
            applied.push(ready(parts)?);
        }
        log::info!(
            "upgrade: frozen in {} ms",
            freeze_started.elapsed().as_millis()
        );

        // 3. The history: nothing more can be stored now.
        let mut history = Writer::new();
        self.history.snapshot(&mut history);
        let last = applied.iter().copied().max().unwrap_or(0);
        history.u64(last);
        BusHandover::write(bus.as_ref(), &mut history);
        send(chan, kind::HISTORY, history.bytes(), &[])?;

        // 4. Each reactor's listeners and connections, in reactor order.
        let mut moved = 0;
        for (parts, orders) in &run.parts {
            let _ = orders.send(Order::Export);
            moved += stream(
                chan,
                parts,
                kind::LISTENERS,
                kind::BATCH,
                kind::REACTOR_DONE,
            )?;
        }

        // 5. The admin listener and its connections.
        let (parts, orders) = run.admin.as_ref().expect("set above");
        let _ = orders.send(Order::Export);
        stream(chan, parts, kind::ADMIN, kind::ADMIN_BATCH, kind::DONE)?;

        // 6. The successor commits; it starts serving only on our go.
        let (k, payload, _) = chan.recv().map_err(|e| exited(child, e))?;
        match k {
            kind::COMMITTED => {}
            kind::ABORT => {
                return Err(Failure(
                    "error",
                    String::from_utf8_lossy(&payload).into_owned(),
                ))
            }
            other => {
                return Err(Failure(
                    "error",
                    format!("expected commit, got message {other}"),
                ))
            }
        }
        send(chan, kind::GO, &[], &[])?;
        log::info!(
            "upgrade: {moved} connections handed over in {} ms (frozen {} ms)",
            started.elapsed().as_millis(),
            freeze_started.elapsed().as_millis()
        );
        Ok(())
    }
}

/// The channel and the frozen parts of one upgrade.
struct Run {
    chan: Channel,
    /// Each frozen reactor's parts and orders.
    parts: Vec<(Receiver<Part>, SyncSender<Order>)>,
    /// The frozen admin thread's.
    admin: Option<(Receiver<Part>, SyncSender<Order>)>,
}

fn freeze_pair() -> (Freeze, Receiver<Part>, SyncSender<Order>) {
    let (parts_tx, parts_rx) = mpsc::sync_channel(PARTS_IN_FLIGHT);
    let (orders_tx, orders_rx) = mpsc::sync_channel(2);
    (
        Freeze {
            parts: parts_tx,
            orders: orders_rx,
        },
        parts_rx,
        orders_tx,
    )
}

fn ready(parts: &Receiver<Part>) -> Result<u64, Failure> {
    match parts.recv_timeout(READY_TIMEOUT) {
        Ok(Part::Ready { applied_seq }) => Ok(applied_seq),
        Ok(other) => Err(Failure("error", format!("expected ready, got {other:?}"))),
        Err(_) => Err(Failure(
            "timeout",
            "a frozen part did not get ready in time".into(),
        )),
    }
}

/// Forwards one frozen part's listeners, batches and end; returns the connections moved.
fn stream(
    chan: &mut Channel,
    parts: &Receiver<Part>,
    listeners: u8,
    batch: u8,
    done: u8,
) -> Result<u64, Failure> {
    loop {
        match parts.recv_timeout(READY_TIMEOUT) {
            Ok(Part::Listeners(fds)) => {
                let mut w = Writer::new();
                w.u32(fds.len() as u32);
                let mut present = Vec::new();
                for fd in fds {
                    w.bool(fd.is_some());
                    present.extend(fd);
                }
                send(chan, listeners, w.bytes(), &present)?;
            }
            Ok(Part::Batch { payload, fds }) => send(chan, batch, &payload, &fds)?,
            Ok(Part::Done { moved, stayed }) => {
                if stayed > 0 {
                    log::warn!(
                        "upgrade: {stayed} connections still in their TLS handshake stay and close"
                    );
                }
                send(chan, done, &protocol::encode_counts(moved, stayed), &[])?;
                return Ok(moved);
            }
            Ok(Part::Ready { .. }) => return Err(Failure("error", "ready twice".into())),
            Err(_) => return Err(Failure("timeout", "a frozen part stopped sending".into())),
        }
    }
}

fn send(
    chan: &mut Channel,
    k: u8,
    payload: &[u8],
    fds: &[std::os::fd::RawFd],
) -> Result<(), Failure> {
    chan.send(k, payload, fds)
        .map_err(|e| Failure("exited", format!("the new process stopped reading: {e}")))
}

/// The successor went away or stopped answering.
fn exited(child: &mut Child, e: std::io::Error) -> Failure {
    match child.try_wait() {
        Ok(Some(status)) => Failure(
            "exited",
            format!("the new process exited ({status}) before it was ready"),
        ),
        _ if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            Failure("timeout", "the new process did not answer in time".into())
        }
        _ => Failure("exited", format!("the new process went away: {e}")),
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
