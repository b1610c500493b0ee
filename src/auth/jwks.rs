//! `auth.jwks_url`: the identity provider's key set, kept fresh by a thread of its own. It fetches at
//! start, every `auth.jwks_refresh_secs`, and soon after a token names a `kid` the set lacks (never two
//! fetches closer than `auth.jwks_min_refresh_secs`, however many such tokens arrive), and swaps the new set
//! in atomically.
//!
//! Reactors only load the current set (an `ArcSwap`, no lock) and raise a flag when a key is missing; they
//! never wait on a fetch. A failed fetch keeps the last good keys, is counted, logged once per run of
//! failures, and retried with a doubling delay. When to fetch is [`Schedule`], a sans-IO unit with tests;
//! the thread and the HTTP client (ureq on rustls with ring, bounded in time and size) are the thin shell.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock, Weak};
use std::thread::Thread;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Guard};

use super::jwk::parse_jwks;
use super::keys::{KeySet, KeySource};
use super::SetupError;
use crate::config::redact_url;
use crate::metrics::KeyMetrics;

/// Longest a JWKS fetch may take, connection and TLS handshake included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS body read, in bytes; a longer one fails the fetch. Real sets are a few KiB.
pub const MAX_JWKS_BYTES: u64 = 1 << 20;
/// Redirects followed at most (an `https` URL never follows one to `http`).
const MAX_REDIRECTS: u32 = 3;

/// How the refresher runs.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// `auth.jwks_url`.
    pub url: String,
    /// `auth.jwks_refresh_secs`.
    pub refresh: Duration,
    /// `auth.jwks_min_refresh_secs`: the least time between two fetches.
    pub min_gap: Duration,
    /// `auth.jwks_ca_file`: trust these roots instead of the bundled Mozilla ones.
    pub ca_file: Option<PathBuf>,
}

/// The keys from `auth.jwks_url`, shared by the reactors and the refresher thread.
pub struct RemoteKeys {
    current: ArcSwap<KeySet>,
    /// Set by a reactor that met an unknown `kid`; cleared by the refresher when it fetches. While it is
    /// set, further reactors neither wake the thread nor touch anything else.
    requested: AtomicBool,
    thread: OnceLock<Thread>,
    metrics: Arc<KeyMetrics>,
}

impl RemoteKeys {
    /// The current key set: a lock-free load, held only while a token is verified.
    pub fn load(&self) -> Guard<Arc<KeySet>> {
        self.current.load()
    }

    /// Asks for a fetch soon (rate-limited by the schedule). Never blocks: one atomic swap, and a wake-up
    /// of the refresher only when the flag was not already up.
    pub fn request_refresh(&self) {
        if !self.requested.swap(true, Ordering::AcqRel) {
            if let Some(thread) = self.thread.get() {
                thread.unpark();
            }
        }
    }
}

impl std::fmt::Debug for RemoteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeys")
            .field("keys", &self.current.load().len())
            .finish_non_exhaustive()
    }
}

/// Starts the refresher and waits for its first fetch (at most [`FETCH_TIMEOUT`] and a little), so a
/// server whose identity provider answers starts with its keys. If the first fetch fails, the server starts
/// anyway: tokens that need those keys are refused until a later fetch succeeds.
pub fn start(
    settings: JwksSettings,
    metrics: Arc<KeyMetrics>,
) -> Result<Arc<RemoteKeys>, SetupError> {
    let agent = agent(&settings)?;
    let remote = Arc::new(RemoteKeys {
        current: ArcSwap::from_pointee(KeySet::default()),
        requested: AtomicBool::new(false),
        thread: OnceLock::new(),
        metrics,
    });
    let (first_done, first) = mpsc::channel();
    let weak = Arc::downgrade(&remote);
    let handle = std::thread::Builder::new()
        .name("jwks".into())
        .spawn(move || run(weak, settings, agent, first_done))
        .map_err(SetupError::Thread)?;
    let _ = remote.thread.set(handle.thread().clone());
    // The thread is not joined: it ends on its own once the last RemoteKeys is dropped.
    drop(handle);
    let _ = first.recv_timeout(FETCH_TIMEOUT + Duration::from_secs(1));
    Ok(remote)
}

/// The refresher's loop: wait until the schedule says fetch (or a reactor asks), fetch, apply.
fn run(
    remote: Weak<RemoteKeys>,
    settings: JwksSettings,
    agent: ureq::Agent,
    first_done: mpsc::Sender<()>,
) {
    let url = redact_url(&settings.url);
    let mut schedule = Schedule::new(settings.refresh, settings.min_gap, Instant::now());
    let mut first_done = Some(first_done);
    loop {
        let Some(shared) = remote.upgrade() else {
            return;
        };
        if shared.requested.load(Ordering::Acquire) {
            schedule.request();
        }
        let now = Instant::now();
        let due = schedule.due_at();
        if due > now {
            // Not holding the Arc while parked, so dropping the server ends this thread.
            drop(shared);
            std::thread::park_timeout(due - now);
            continue;
        }
        let by_request = schedule.is_requested();
        // Cleared before fetching: a kid that arrives during the fetch asks again.
        shared.requested.store(false, Ordering::Release);
        let outcome = fetch(&agent, &settings.url).and_then(|body| {
            parse_jwks(&body, KeySource::JwksUrl).map_err(|e| format!("the key set {e}"))
        });
        let failures_before = schedule.failures();
        schedule.attempted(Instant::now(), outcome.is_ok());
        apply(&shared, outcome, by_request, failures_before, &url);
        if let Some(done) = first_done.take() {
            let _ = done.send(());
        }
    }
}

/// Swaps in a good set, or keeps the old one; counts and logs either way.
fn apply(
    shared: &RemoteKeys,
    outcome: Result<super::jwk::ParsedJwks, String>,
    by_request: bool,
    failures_before: u32,
    url: &str,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &shared.metrics;
    if by_request {
        m.jwks_unknown_kid_refreshes.fetch_add(1, Relaxed);
    }
    match outcome {
        Ok(parsed) => {
            for skipped in &parsed.skipped {
                log::debug!("auth.jwks_url {url}: skipped {skipped}");
            }
            let count = parsed.keys.len();
            // Counted before the swap, so whoever sees the new keys also sees the numbers that go with them.
            m.keys[KeySource::JwksUrl as usize].store(count as u64, Relaxed);
            m.jwks_refreshes_ok.fetch_add(1, Relaxed);
            m.jwks_last_ok_unix_ms.store(super::unix_now_ms(), Relaxed);
            shared.current.store(Arc::new(KeySet::new(parsed.keys)));
            if failures_before > 0 {
                log::info!(
                    "auth.jwks_url {url}: fetched {count} keys again after {failures_before} failed attempts"
                );
            } else {
                log::debug!("auth.jwks_url {url}: fetched {count} keys");
            }
        }
        Err(why) => {
            m.jwks_refreshes_failed.fetch_add(1, Relaxed);
            // Once per run of failures: a dead endpoint must not flood the log.
            if failures_before == 0 {
                log::warn!(
                    "auth.jwks_url {url}: fetch failed ({why}); keeping the {} keys fetched before, retrying with backoff",
                    shared.current.load().len()
                );
            } else {
                log::debug!("auth.jwks_url {url}: fetch failed again ({why})");
            }
        }
    }
}

/// The HTTP client: rustls with ring, the bundled Mozilla roots or `auth.jwks_ca_file`'s, a bound on the
/// whole fetch, few redirects and never from `https` down to `http`.
fn agent(settings: &JwksSettings) -> Result<ureq::Agent, SetupError> {
    use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
    let mut tls = TlsConfig::builder().provider(TlsProvider::Rustls);
    if let Some(path) = &settings.ca_file {
        tls = tls.root_certs(RootCerts::from(read_ca_file(path)?));
    }
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .https_only(settings.url.starts_with("https://"))
        .max_redirects(MAX_REDIRECTS)
        .user_agent(concat!("densepush/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls.build())
        .build();
    Ok(ureq::Agent::new_with_config(config))
}

/// The certificates of a PEM bundle, for `auth.jwks_ca_file`.
fn read_ca_file(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, SetupError> {
    let bad = |why: String| SetupError::File {
        key: "auth.jwks_ca_file",
        path: path.to_owned(),
        why,
    };
    let bytes = super::read_bounded(path).map_err(|e| bad(e.to_string()))?;
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

/// GET the key set: 2xx only (ureq turns other statuses into errors), at most [`MAX_JWKS_BYTES`].
fn fetch(agent: &ureq::Agent, url: &str) -> Result<Vec<u8>, String> {
    let mut response = agent
        .get(url)
        .header("Accept", "application/jwk-set+json, application/json")
        .call()
        .map_err(|e| e.to_string())?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_JWKS_BYTES)
        .read_to_vec()
        .map_err(|e| e.to_string())
}

/// When to fetch: at start; `refresh` after a good fetch; after a failed one, `min_gap` doubling with each
/// further failure up to `refresh`; and, once asked (an unknown `kid`), as soon as `min_gap` has passed since
/// the last attempt. Time is an argument, so every rule is a unit test.
#[derive(Debug, Clone)]
pub struct Schedule {
    refresh: Duration,
    min_gap: Duration,
    /// The periodic (or backoff) deadline.
    next_due: Instant,
    last_attempt: Option<Instant>,
    requested: bool,
    failures: u32,
}

impl Schedule {
    /// A schedule whose first fetch is due at `now`.
    pub fn new(refresh: Duration, min_gap: Duration, now: Instant) -> Self {
        debug_assert!(min_gap <= refresh);
        Schedule {
            refresh,
            min_gap,
            next_due: now,
            last_attempt: None,
            requested: false,
            failures: 0,
        }
    }

    /// A token needs a key the set lacks: fetch as soon as the rate limit allows.
    pub fn request(&mut self) {
        self.requested = true;
    }

    /// Whether a request is pending.
    pub fn is_requested(&self) -> bool {
        self.requested
    }

    /// Failed attempts since the last good one.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the next fetch is due.
    pub fn due_at(&self) -> Instant {
        match (self.requested, self.last_attempt) {
            (true, Some(last)) => self.next_due.min(last + self.min_gap),
            _ => self.next_due,
        }
    }

    /// A fetch was attempted at `now` and succeeded or not.
    pub fn attempted(&mut self, now: Instant, ok: bool) {
        self.last_attempt = Some(now);
        self.requested = false;
        if ok {
            self.failures = 0;
            self.next_due = now + self.refresh;
        } else {
            self.failures = self.failures.saturating_add(1);
            let doublings = (self.failures - 1).min(20);
            let backoff = self
                .min_gap
                .saturating_mul(1 << doublings)
                .min(self.refresh);
            self.next_due = now + backoff;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFRESH: Duration = Duration::from_secs(300);
    const GAP: Duration = Duration::from_secs(10);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn first_fetch_is_due_at_once_then_every_refresh() {
        let t0 = Instant::now();
        let mut s = Schedule::new(REFRESH, GAP, t0);
        assert_eq!(s.due_at(), t0);
        s.attempted(t0, true);
        assert_eq!(s.due_at(), t0 + REFRESH);
    }

    #[test]
    fn a_request_is_served_once_the_gap_has_passed() {
        let t0 = Instant::now();
        let mut s = Schedule::new(REFRESH, GAP, t0);
        s.attempted(t0, true);
        s.request();
        assert_eq!(s.due_at(), t0 + GAP);
        // Many requests before then are one fetch.
        s.request();
        s.request();
        assert_eq!(s.due_at(), t0 + GAP);
        s.attempted(t0 + GAP, true);
        assert!(!s.is_requested());
        assert_eq!(s.due_at(), t0 + GAP + REFRESH);
    }

    #[test]
    fn a_request_long_after_the_last_fetch_is_due_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(REFRESH, GAP, t0);
        s.attempted(t0, true);
        s.request();
        // Due in the past: the caller fetches on its next look.
        assert!(s.due_at() <= t0 + secs(100));
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_refresh_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new(REFRESH, GAP, t0);
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            s.attempted(now, false);
            let next = s.due_at();
            gaps.push((next - now).as_secs());
            now = next;
        }
        assert_eq!(gaps, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(s.failures(), 8);
        s.attempted(now, true);
        assert_eq!(s.failures(), 0);
        assert_eq!(s.due_at(), now + REFRESH);
    }

    #[test]
    fn a_request_while_failing_is_still_rate_limited_by_the_gap() {
        let t0 = Instant::now();
        let mut s = Schedule::new(REFRESH, GAP, t0);
        s.attempted(t0, false);
        s.attempted(t0 + secs(10), false); // next periodic retry 20 s later
        s.request();
        assert_eq!(s.due_at(), t0 + secs(20));
    }

    #[test]
    fn a_request_before_the_first_fetch_does_not_delay_it() {
        let t0 = Instant::now();
        let mut s = Schedule::new(REFRESH, GAP, t0);
        s.request();
        assert_eq!(s.due_at(), t0);
    }

    #[test]
    fn backoff_never_overflows() {
        let t0 = Instant::now();
        let mut s = Schedule::new(secs(86_400), secs(3_600), t0);
        for _ in 0..100 {
            s.attempted(t0, false);
        }
        assert_eq!(s.due_at(), t0 + secs(86_400));
    }
}
