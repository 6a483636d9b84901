//! CPU per delivered message of every process a row runs, not only the system under test: the
//! load generator and the sink share the same cores, so on a small machine the delivered rate is
//! bounded by the sum. Pure arithmetic; the harness reads the ticks from /proc.

use serde::{Deserialize, Serialize};

/// Milliseconds of CPU per delivered message for `ticks` clock ticks (`hz` ticks a second).
/// None when nothing was delivered (no meaningful per-message figure).
pub fn ms_per_msg(ticks: u64, hz: f64, delivered: u64) -> Option<f64> {
    (delivered > 0 && hz > 0.0).then(|| ticks as f64 / hz * 1000.0 / delivered as f64)
}

/// CPU per delivered message of each process group of a row, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuBreakdown {
    /// The system under test (relay + Redis, Postfix's or a peer's processes); None for the
    /// ceiling row, which has none.
    pub sut: Option<f64>,
    /// `bench-loadgen` over the closed-loop phase.
    pub generator: f64,
    /// `bench-sink` over the closed-loop phase and the drain.
    pub sink: f64,
    /// Every CPU of the machine that was busy in the same window (all processes, including
    /// work that is not the row's): `total` subtracted from it is what others used.
    pub machine: Option<f64>,
}

impl CpuBreakdown {
    /// System under test + generator + sink.
    pub fn total(&self) -> f64 {
        self.sut.unwrap_or(0.0) + self.generator + self.sink
    }

    /// Cores the row's processes kept busy at `delivered_per_sec`.
    pub fn cores_at(&self, delivered_per_sec: f64) -> f64 {
        self.total() * delivered_per_sec / 1000.0
    }

    /// The delivered rate at which the row's processes would use every one of `cores` cores:
    /// an upper bound for that machine, whatever the latencies.
    pub fn bound_per_sec(&self, cores: f64) -> Option<f64> {
        let t = self.total();
        (t > 0.0).then(|| cores * 1000.0 / t)
    }

    /// CPU per message the machine spent on other work in the same window (never negative).
    pub fn others(&self) -> Option<f64> {
        self.machine.map(|m| (m - self.total()).max(0.0))
    }
}

/// Total CPU ms per message that lets `cores` cores deliver `per_sec` messages a second.
pub fn budget_ms_per_msg(per_sec: f64, cores: f64) -> Option<f64> {
    (per_sec > 0.0).then(|| cores * 1000.0 / per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_become_milliseconds_per_delivered_message() {
        // 250 ticks at 100 Hz = 2.5 s of CPU over 5000 messages = 0.5 ms each.
        assert_eq!(ms_per_msg(250, 100.0, 5000), Some(0.5));
        assert_eq!(ms_per_msg(250, 100.0, 0), None);
        assert_eq!(ms_per_msg(0, 100.0, 10), Some(0.0));
    }

    #[test]
    fn total_bound_and_budget_follow_the_two_core_arithmetic() {
        // The 2026-12-05 quick relay row: relay + Redis 0.255, generator 0.06, sink 0.05.
        let b = CpuBreakdown {
            sut: Some(0.255),
            generator: 0.06,
            sink: 0.05,
            machine: Some(0.40),
        };
        assert!((b.total() - 0.365).abs() < 1e-12);
        // At 5030/s the four processes keep 1.84 of the 2 cores busy.
        assert!((b.cores_at(5030.0) - 1.835_95).abs() < 1e-9);
        // 2 cores = 2000 CPU ms a second: at most 2000 / 0.365 = 5479 delivered/s.
        assert!((b.bound_per_sec(2.0).unwrap() - 2000.0 / 0.365).abs() < 1e-9);
        assert!((b.others().unwrap() - 0.035).abs() < 1e-12);
        // 10× a Postfix at 796/s on 2 cores leaves 0.251 ms per message for all four.
        assert!((budget_ms_per_msg(7960.0, 2.0).unwrap() - 2000.0 / 7960.0).abs() < 1e-12);
        assert_eq!(budget_ms_per_msg(0.0, 2.0), None);
    }

    #[test]
    fn the_ceiling_row_has_no_system_under_test_and_others_never_go_negative() {
        let c = CpuBreakdown {
            sut: None,
            generator: 0.012,
            sink: 0.02,
            machine: Some(0.01),
        };
        assert!((c.total() - 0.032).abs() < 1e-12);
        assert_eq!(c.others(), Some(0.0));
        assert_eq!(CpuBreakdown::default().bound_per_sec(2.0), None);
    }
}
