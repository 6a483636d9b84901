//! Latency histograms (HdrHistogram, microsecond resolution) and their printable summary.
//! Pure; no I/O.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded without clamping: one minute.
const MAX_US: u64 = 60_000_000;

/// A histogram of durations in microseconds.
#[derive(Clone, Debug)]
pub struct LatencyHistogram(Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        // Three significant digits over 1 µs .. 60 s: constant, valid bounds.
        Self(Histogram::new_with_bounds(1, MAX_US, 3).expect("constant histogram bounds are valid"))
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_US);
        self.0.saturating_record(us);
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Same bounds on both sides, so adding cannot fail; saturate rather than panic anyway.
        let _ = self.0.add(&other.0);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn summary(&self) -> LatencySummary {
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.0.len(),
            mean_us: self.0.mean(),
            p50_us: self.0.value_at_quantile(0.50),
            p90_us: self.0.value_at_quantile(0.90),
            p99_us: self.0.value_at_quantile(0.99),
            p999_us: self.0.value_at_quantile(0.999),
            max_us: self.0.max(),
        }
    }
}

/// Percentiles of a latency distribution, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = LatencyHistogram::default();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        // HdrHistogram keeps 3 significant digits: allow 0.1% error.
        let near = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want;
        assert!(near(s.p50_us, 50_000), "{s:?}");
        assert!(near(s.p99_us, 99_000), "{s:?}");
        assert!(near(s.max_us, 100_000), "{s:?}");
    }

    #[test]
    fn merge_adds_counts_and_extremes_clamp() {
        let mut a = LatencyHistogram::default();
        let mut b = LatencyHistogram::default();
        a.record(Duration::from_nanos(10)); // below 1 µs: clamped up
        b.record(Duration::from_secs(3600)); // above a minute: clamped down
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 2);
        assert_eq!(s.p50_us, 1);
        assert!(s.max_us >= MAX_US - MAX_US / 1000);
        assert_eq!(LatencyHistogram::default().summary(), LatencySummary::default());
    }
}
