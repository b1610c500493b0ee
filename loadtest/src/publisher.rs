//! Publishing through the admin API: a paced series to `/publish/all` (broadcast and churn streams), P
//! concurrent unicast publishers and P concurrent batch publishers, each with its own keep-alive connection and
//! thread.
//!
//! It owns what is published and the count of what the server accepted (202), which is what the workers are
//! then told to expect. A message counts as sent only once accepted, so a refused publish is never "lost".
//!
//! Order is only defined per publisher connection, so each user is published to by exactly one publisher
//! (user u by publisher u % P), and its per-user sequence numbers are in order by construction.

use crate::admin::AdminClient;
use crate::checker::{self, Stream};
use crate::rng::Rng;
use crate::stats::{self, Latency, Reasons};
use crate::sys::monotonic_ns;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Consecutive failed publishes after which a publisher gives up (the admin API is gone).
const MAX_CONSECUTIVE_FAILURES: u32 = 20;

/// What a series of publishes achieved.
#[derive(Debug, Default)]
pub struct Published {
    /// Accepted with 202; sequence numbers `0..accepted` are out (per user for unicast).
    pub accepted: u64,
    /// Refused or failed, by reason (`http_<status>` or `io`).
    pub failures: Reasons,
    /// Request round trip, write to 202.
    pub latency: Latency,
    /// CLOCK_MONOTONIC ns of the first and the last publish.
    pub first_ns: u64,
    /// See `first_ns`.
    pub last_ns: u64,
}

impl Published {
    fn merge(&mut self, other: Published) {
        self.accepted += other.accepted;
        stats::merge_reasons(&mut self.failures, &other.failures);
        self.latency.merge_data(&other.latency.to_data());
        if self.first_ns == 0 || (other.first_ns != 0 && other.first_ns < self.first_ns) {
            self.first_ns = other.first_ns;
        }
        self.last_ns = self.last_ns.max(other.last_ns);
    }
}

/// Payload settings.
#[derive(Debug, Clone, Copy)]
pub struct PayloadSpec {
    /// Bytes per payload.
    pub bytes: usize,
    /// Send as binary frames.
    pub binary: bool,
    /// Pad as a JSON notification instead of dots (`--json-payload`).
    pub json: bool,
}

/// Publishes `stream` messages to `/publish/all`, sequence numbers from 0, `interval` apart, until `count`
/// are accepted, `stop` is set, or `deadline`.
pub fn publish_all(
    client: &mut AdminClient,
    stream: Stream,
    count: Option<u64>,
    interval: Duration,
    spec: PayloadSpec,
    stop: &AtomicBool,
    deadline: Instant,
) -> Published {
    let mut out = Published::default();
    let mut failures_in_row = 0;
    let start = Instant::now();
    let mut attempts: u32 = 0;
    while count.is_none_or(|c| out.accepted < c)
        && !stop.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        if !interval.is_zero() {
            // Paced from the start, so a slow request does not push every later one back.
            let due = start + interval * attempts;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        attempts = attempts.saturating_add(1);
        let ts = monotonic_ns();
        let payload = checker::encode_as(stream, None, out.accepted, ts, spec.bytes, spec.json);
        let ok = publish_one(client, "/publish/all", &payload, spec.binary, ts, &mut out);
        failures_in_row = if ok { 0 } else { failures_in_row + 1 };
        if failures_in_row >= MAX_CONSECUTIVE_FAILURES {
            break;
        }
    }
    out
}

/// One POST; counts it in `out`; true if accepted.
fn publish_one(
    client: &mut AdminClient,
    path: &str,
    payload: &[u8],
    binary: bool,
    ts: u64,
    out: &mut Published,
) -> bool {
    match client.post(path, payload, binary) {
        Ok(resp) if resp.status == 202 => {
            let done = monotonic_ns();
            out.latency.record_between(ts, done);
            out.accepted += 1;
            if out.first_ns == 0 {
                out.first_ns = ts;
            }
            out.last_ns = done;
            true
        }
        Ok(resp) => {
            stats::count(&mut out.failures, &format!("http_{}", resp.status), 1);
            false
        }
        Err(_) => {
            stats::count(&mut out.failures, "io", 1);
            false
        }
    }
}

/// Starts `publish_all` on its own thread with its own admin connection; set the returned flag to stop it.
pub fn spawn_publish_all(
    admin: SocketAddr,
    stream: Stream,
    interval: Duration,
    spec: PayloadSpec,
    deadline: Instant,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<Published>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut client = AdminClient::new(admin);
        publish_all(&mut client, stream, None, interval, spec, &flag, deadline)
    });
    (stop, handle)
}

/// Result of the unicast phase's publishing.
#[derive(Debug, Default)]
pub struct UnicastPublished {
    /// Totals over all publishers.
    pub totals: Published,
    /// Messages accepted per user number.
    pub per_user: Vec<u64>,
    /// Publishers that ran.
    pub publishers: usize,
}

/// Sends `messages` unicast messages to random users `0..users` (named `u{first_user + k}`) from `publishers`
/// concurrent publishers, `rate` per second in all (0 = as fast as the server answers).
#[allow(clippy::too_many_arguments)]
pub fn unicast(
    admin: SocketAddr,
    publishers: usize,
    messages: u64,
    users: u64,
    first_user: u64,
    rate: f64,
    spec: PayloadSpec,
    seed: u64,
    deadline: Instant,
) -> UnicastPublished {
    let publishers = publishers.min(users.max(1) as usize).max(1);
    let handles: Vec<_> = (0..publishers)
        .map(|p| {
            let share =
                messages / publishers as u64 + u64::from((p as u64) < messages % publishers as u64);
            // Each publisher sends its share of the rate, on a fixed schedule (a late one catches up).
            let interval = (rate > 0.0).then(|| Duration::from_secs_f64(publishers as f64 / rate));
            std::thread::spawn(move || {
                unicast_publisher(
                    admin,
                    p as u64,
                    publishers as u64,
                    share,
                    users,
                    first_user,
                    interval,
                    spec,
                    seed,
                    deadline,
                )
            })
        })
        .collect();
    let mut out = UnicastPublished {
        per_user: vec![0; users as usize],
        publishers,
        ..Default::default()
    };
    for handle in handles {
        let (published, counts) = handle.join().expect("publisher thread panicked");
        out.totals.merge(published);
        for (user, n) in counts {
            out.per_user[user as usize] += n;
        }
    }
    out
}

/// One publisher: users `p, p + P, p + 2P, ...`; returns its totals and (user, accepted) pairs.
#[allow(clippy::too_many_arguments)]
fn unicast_publisher(
    admin: SocketAddr,
    p: u64,
    publishers: u64,
    messages: u64,
    users: u64,
    first_user: u64,
    interval: Option<Duration>,
    spec: PayloadSpec,
    seed: u64,
    deadline: Instant,
) -> (Published, Vec<(u64, u64)>) {
    let mut client = AdminClient::new(admin);
    let mut rng = Rng::new(seed ^ (p + 1).wrapping_mul(0x9E37_79B9));
    let mine = users.saturating_sub(p).div_ceil(publishers);
    let mut counts = vec![0u64; mine as usize];
    let mut out = Published::default();
    let mut failures_in_row = 0;
    let start = Instant::now();
    for i in 0..messages {
        if mine == 0 || Instant::now() >= deadline {
            break;
        }
        if let Some(interval) = interval {
            let due = start + interval.mul_f64(i as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let k = rng.below(mine);
        let user = p + k * publishers;
        let name = format!("u{}", first_user + user);
        let ts = monotonic_ns();
        let payload = checker::encode(
            Stream::Unicast,
            Some(&name),
            counts[k as usize],
            ts,
            spec.bytes,
        );
        let path = format!("/publish/user/{name}");
        if publish_one(&mut client, &path, &payload, spec.binary, ts, &mut out) {
            counts[k as usize] += 1;
            failures_in_row = 0;
        } else {
            failures_in_row += 1;
            if failures_in_row >= MAX_CONSECUTIVE_FAILURES {
                break;
            }
        }
    }
    let pairs = counts
        .into_iter()
        .enumerate()
        .map(|(k, n)| (p + k as u64 * publishers, n))
        .collect();
    (out, pairs)
}

/// Result of the batch phase's publishing.
#[derive(Debug, Default)]
pub struct BatchPublished {
    /// Totals over all publishers; `accepted` counts batches, `latency` is per batch.
    pub totals: Published,
    /// User targets in accepted batches.
    pub targets: u64,
    /// Rounds every user received (the rounds each publisher finished, at least).
    pub rounds: u64,
    /// Batches answered 503 (reactors behind) and sent again.
    pub retried: u64,
    /// Publishers that ran.
    pub publishers: usize,
}

/// Publishes `rounds` rounds of `Stream::Batch`: in each, every user `0..users` is named once, `per_batch` users
/// per `POST /publish/batch` holding one message (framed once by the server for all of them). Publisher `p` of
/// `publishers` owns the batches `p, p + P, …` of each round, so each user's messages come from one connection,
/// in round order. A batch refused with 503 (reactors behind) is sent again after a short pause.
pub fn batch(
    admin: SocketAddr,
    publishers: usize,
    rounds: u64,
    users: u64,
    per_batch: u64,
    spec: PayloadSpec,
    deadline: Instant,
) -> BatchPublished {
    let chunks = users.div_ceil(per_batch.max(1));
    let publishers = publishers.min(chunks.max(1) as usize).max(1);
    let handles: Vec<_> = (0..publishers as u64)
        .map(|p| {
            std::thread::spawn(move || {
                let mine: Vec<u64> = (p..chunks).step_by(publishers).collect();
                batch_publisher(admin, &mine, rounds, users, per_batch, spec, deadline)
            })
        })
        .collect();
    let mut out = BatchPublished {
        rounds,
        publishers,
        ..Default::default()
    };
    for handle in handles {
        let (published, done) = handle.join().expect("batch publisher thread panicked");
        out.totals.merge(published);
        out.targets += done.targets;
        out.retried += done.retried;
        out.rounds = out.rounds.min(done.rounds);
    }
    out
}

/// What one batch publisher got done besides its totals.
#[derive(Debug, Default)]
struct BatchDone {
    targets: u64,
    rounds: u64,
    retried: u64,
}

/// One batch publisher over its chunks of users.
fn batch_publisher(
    admin: SocketAddr,
    chunks: &[u64],
    rounds: u64,
    users: u64,
    per_batch: u64,
    spec: PayloadSpec,
    deadline: Instant,
) -> (Published, BatchDone) {
    let mut client = AdminClient::new(admin);
    let mut out = Published::default();
    let mut done = BatchDone::default();
    // The targets of each chunk, built once: `"user/u1","user/u2",…`.
    let targets: Vec<(u64, String)> = chunks
        .iter()
        .map(|&c| {
            let first = c * per_batch;
            let end = (first + per_batch).min(users);
            let list: Vec<String> = (first..end).map(|u| format!("\"user/u{u}\"")).collect();
            (end - first, list.join(","))
        })
        .collect();
    for round in 0..rounds {
        for (count, list) in &targets {
            let ts = monotonic_ns();
            let payload = checker::encode_as(Stream::Batch, None, round, ts, spec.bytes, spec.json);
            let data = if spec.binary {
                use base64::Engine as _;
                format!(
                    "\"data_base64\":\"{}\"",
                    base64::engine::general_purpose::STANDARD.encode(&payload)
                )
            } else {
                // Our payloads are ASCII letters, digits, ':' and '.': nothing to escape in a JSON string.
                format!("\"data\":\"{}\"", String::from_utf8_lossy(&payload))
            };
            let body = format!("{{\"messages\":[{{\"targets\":[{list}],{data}}}]}}");
            loop {
                if Instant::now() >= deadline {
                    done.rounds = round;
                    return (out, done);
                }
                match client.post("/publish/batch", body.as_bytes(), false) {
                    Ok(resp) if resp.status == 202 => {
                        let now = monotonic_ns();
                        out.latency.record_between(ts, now);
                        out.accepted += 1;
                        if out.first_ns == 0 {
                            out.first_ns = ts;
                        }
                        out.last_ns = now;
                        done.targets += count;
                        break;
                    }
                    Ok(resp) if resp.status == 503 => {
                        done.retried += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Ok(resp) => {
                        stats::count(&mut out.failures, &format!("http_{}", resp.status), 1);
                        done.rounds = round;
                        return (out, done);
                    }
                    Err(_) => {
                        stats::count(&mut out.failures, "io", 1);
                        done.rounds = round;
                        return (out, done);
                    }
                }
            }
        }
    }
    done.rounds = rounds;
    (out, done)
}
