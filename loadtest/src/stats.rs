//! Latency histograms and counters that travel from workers to the coordinator and are merged there.
//!
//! It owns the histogram (HdrHistogram, microseconds, 3 significant digits), its compact wire form and the
//! percentile summary. It does not measure anything itself.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;

/// Highest latency recorded, in microseconds (one hour); longer values are clamped to it.
const MAX_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            hist: Histogram::new_with_bounds(1, MAX_US, 3).expect("static bounds are valid"),
        }
    }
}

/// A histogram on the wire: `[value_us, count]` pairs of its non-empty buckets.
pub type LatencyData = Vec<[u64; 2]>;

impl Latency {
    /// Records one latency in microseconds (0 is recorded as 1; beyond an hour as an hour).
    pub fn record_us(&mut self, us: u64) {
        self.hist.saturating_record(us.clamp(1, MAX_US));
    }

    /// Records a latency between two CLOCK_MONOTONIC readings.
    pub fn record_between(&mut self, start_ns: u64, end_ns: u64) {
        self.record_us(end_ns.saturating_sub(start_ns) / 1_000);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The wire form.
    pub fn to_data(&self) -> LatencyData {
        self.hist
            .iter_recorded()
            .map(|v| [v.value_iterated_to(), v.count_at_value()])
            .collect()
    }

    /// Adds a histogram received in wire form (values fall into the same buckets they came from).
    pub fn merge_data(&mut self, data: &LatencyData) {
        for &[value, count] in data {
            let _ = self.hist.record_n(value.clamp(1, MAX_US), count);
        }
    }

    /// Percentiles, or `None` when nothing was recorded.
    pub fn summary(&self) -> Option<Percentiles> {
        if self.hist.is_empty() {
            return None;
        }
        let q = |q: f64| self.hist.value_at_quantile(q);
        Some(Percentiles {
            count: self.hist.len(),
            min_us: self.hist.min(),
            mean_us: self.hist.mean().round() as u64,
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: self.hist.max(),
        })
    }
}

/// Latency percentiles in microseconds (each within 0.1% of the exact value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Smallest.
    pub min_us: u64,
    /// Mean, rounded.
    pub mean_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

/// Counts by reason (failure kinds, close codes), kept sorted for stable reports.
pub type Reasons = BTreeMap<String, u64>;

/// Adds `n` under `reason`.
pub fn count(reasons: &mut Reasons, reason: &str, n: u64) {
    if n == 0 {
        return;
    }
    match reasons.get_mut(reason) {
        Some(v) => *v += n,
        None => {
            reasons.insert(reason.to_string(), n);
        }
    }
}

/// Adds every count of `from` into `into`.
pub fn merge_reasons(into: &mut Reasons, from: &Reasons) {
    for (reason, n) in from {
        count(into, reason, *n);
    }
}

/// Events per second over `elapsed_ns`, or 0 when no time passed.
pub fn per_sec(events: u64, elapsed_ns: u64) -> f64 {
    if elapsed_ns == 0 {
        0.0
    } else {
        events as f64 * 1e9 / elapsed_ns as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_histogram_has_no_summary() {
        assert_eq!(Latency::default().summary(), None);
    }

    #[test]
    fn percentiles_follow_the_distribution() {
        let mut h = Latency::default();
        for us in 1..=1000 {
            h.record_us(us);
        }
        let s = h.summary().unwrap();
        assert_eq!(s.count, 1000);
        assert!((499..=501).contains(&s.p50_us), "{s:?}");
        assert!((989..=991).contains(&s.p99_us), "{s:?}");
        assert_eq!(s.min_us, 1);
        assert!(s.max_us >= 1000);
    }

    #[test]
    fn wire_form_merges_to_the_same_percentiles() {
        let mut a = Latency::default();
        for us in [5, 50, 500, 5_000, 50_000, 50_000] {
            a.record_us(us);
        }
        let mut b = Latency::default();
        b.merge_data(&a.to_data());
        assert_eq!(a.summary(), b.summary());
    }

    #[test]
    fn latency_between_clamps_backwards_clocks_to_one() {
        let mut h = Latency::default();
        h.record_between(2_000_000, 1_000_000);
        assert_eq!(h.summary().unwrap().max_us, 1);
    }

    #[test]
    fn reasons_add_up() {
        let mut a = Reasons::new();
        count(&mut a, "timeout", 2);
        count(&mut a, "http_503", 0);
        let mut b = Reasons::new();
        count(&mut b, "timeout", 3);
        count(&mut b, "reset", 1);
        merge_reasons(&mut a, &b);
        assert_eq!(a.get("timeout"), Some(&5));
        assert_eq!(a.get("reset"), Some(&1));
        assert!(!a.contains_key("http_503"));
    }

    #[test]
    fn per_sec_handles_zero_time() {
        assert_eq!(per_sec(10, 0), 0.0);
        assert_eq!(per_sec(10, 2_000_000_000), 5.0);
    }
}
