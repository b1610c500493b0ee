//! The numbers of the token verification keys: how many keys are in use from each source, and how the
//! JWKS refresher (`auth.jwks_url`) fares. The refresher thread writes them, the admin thread renders them.
//!
//! It owns the numbers and their lines in `/metrics`; what is counted, and when, is `auth::jwks`' call.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::exposition::{Exposition, MetricType};

/// Label of each key source, indexed by `auth::keys::KeySource`.
pub const KEY_SOURCE_LABELS: [&str; 4] = ["secret", "public_key_file", "jwks_file", "jwks_url"];

/// Keys in use and JWKS refresh outcomes.
#[derive(Debug, Default)]
pub struct KeyMetrics {
    /// Gauge: keys in use, by source.
    pub keys: [AtomicU64; KEY_SOURCE_LABELS.len()],
    /// Counter: JWKS fetches that replaced the keys from `auth.jwks_url`.
    pub jwks_refreshes_ok: AtomicU64,
    /// Counter: JWKS fetches that failed (the last good keys stayed in use).
    pub jwks_refreshes_failed: AtomicU64,
    /// Counter: JWKS fetches made because a token named a key the set did not have.
    pub jwks_unknown_kid_refreshes: AtomicU64,
    /// Unix time in ms of the last good fetch; 0 until there is one.
    pub jwks_last_ok_unix_ms: AtomicU64,
    /// Unix time in ms the refresher started; `None` when no `auth.jwks_url` is configured.
    jwks_started_unix_ms: Option<u64>,
}

impl KeyMetrics {
    /// Numbers for a key set; `jwks_started_unix_ms` is when the JWKS refresher started, if there is one.
    pub fn new(jwks_started_unix_ms: Option<u64>) -> Self {
        KeyMetrics {
            jwks_started_unix_ms,
            ..KeyMetrics::default()
        }
    }

    /// Appends the key families; the JWKS ones only when a refresher runs. The age of the keys counts from
    /// the refresher's start while no fetch has succeeded, so an alert on it fires for an endpoint that
    /// never answered too.
    pub fn render(&self, out: &mut Exposition<'_>, now_unix_ms: u64) {
        out.family(
            "densepush_auth_keys",
            "Token verification keys in use, by source.",
            MetricType::Gauge,
            "source",
            KEY_SOURCE_LABELS
                .iter()
                .zip(&self.keys)
                .map(|(label, n)| (label, n.load(Relaxed))),
        );
        let Some(started) = self.jwks_started_unix_ms else {
            return;
        };
        out.family(
            "densepush_auth_jwks_refreshes_total",
            "JWKS fetches from auth.jwks_url, by result (a failed one keeps the last good keys).",
            MetricType::Counter,
            "result",
            [
                ("ok", self.jwks_refreshes_ok.load(Relaxed)),
                ("failed", self.jwks_refreshes_failed.load(Relaxed)),
            ],
        );
        out.counter(
            "densepush_auth_jwks_unknown_kid_refreshes_total",
            "JWKS fetches made because a token named a kid the key set did not have.",
            self.jwks_unknown_kid_refreshes.load(Relaxed),
        );
        let last_ok = match self.jwks_last_ok_unix_ms.load(Relaxed) {
            0 => started,
            ms => ms,
        };
        out.gauge(
            "densepush_auth_jwks_age_seconds",
            "Seconds since the last good JWKS fetch (since the refresher started, if none yet).",
            now_unix_ms.saturating_sub(last_ok) / 1000,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_refresher_only_the_key_counts_are_written() {
        let m = KeyMetrics::new(None);
        m.keys[0].store(2, Relaxed);
        let mut text = String::new();
        m.render(&mut Exposition::new(&mut text), 5_000);
        assert!(
            text.contains("densepush_auth_keys{source=\"secret\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("densepush_auth_keys{source=\"jwks_url\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("jwks_refreshes"), "{text}");
    }

    #[test]
    fn age_counts_from_the_start_until_a_fetch_succeeds() {
        let m = KeyMetrics::new(Some(10_000));
        m.jwks_refreshes_failed.store(3, Relaxed);
        let mut text = String::new();
        m.render(&mut Exposition::new(&mut text), 25_000);
        assert!(
            text.contains("densepush_auth_jwks_age_seconds 15\n"),
            "{text}"
        );
        assert!(
            text.contains("densepush_auth_jwks_refreshes_total{result=\"failed\"} 3\n"),
            "{text}"
        );
        m.jwks_last_ok_unix_ms.store(24_000, Relaxed);
        let mut text = String::new();
        m.render(&mut Exposition::new(&mut text), 25_000);
        assert!(
            text.contains("densepush_auth_jwks_age_seconds 1\n"),
            "{text}"
        );
    }
}
