//! GCRA (generic cell rate algorithm) arithmetic for message pacing: one stored number per
//! limit, the theoretical arrival time (TAT). Pure; the stores run the same steps atomically.

/// A rate of one message per `interval_ms`, with up to `burst` messages at once after idling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval T.
    pub interval_ms: i64,
    /// Burst tolerance τ = (burst − 1) · T.
    pub tolerance_ms: i64,
}

impl Gcra {
    /// `rate` messages per `period_ms`, `burst` (at least 1) at once. T is rounded up, so the
    /// rate is never exceeded.
    pub fn new(rate: u32, period_ms: i64, burst: u32) -> Self {
        let rate = i64::from(rate.max(1));
        let interval_ms = (period_ms + rate - 1) / rate;
        Gcra {
            interval_ms,
            tolerance_ms: i64::from(burst.max(1) - 1) * interval_ms,
        }
    }

    /// Route and destination pacing: evenly spaced, no burst, so no 60-second interval ever
    /// carries more than `rate` messages (upstreams count in rolling minutes).
    pub fn per_minute(rate: u32) -> Self {
        Self::new(rate, 60_000, 1)
    }

    /// One decision: `Ok(new_tat)` when a message may go at `now_ms`, `Err(at)` with the
    /// earliest instant it may go otherwise. `tat` is the stored value (absent: never used).
    pub fn check(&self, tat: Option<i64>, now_ms: i64) -> Result<i64, i64> {
        let tat = tat.unwrap_or(now_ms).max(now_ms);
        if tat - now_ms > self.tolerance_ms {
            Err(tat - self.tolerance_ms)
        } else {
            Ok(tat + self.interval_ms)
        }
    }

    /// How long a stored TAT stays meaningful after `now_ms` (once it is in the past it equals
    /// "never used").
    pub fn ttl_ms(&self, new_tat: i64, now_ms: i64) -> i64 {
        (new_tat - now_ms).max(0) + 1_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender that tries at every `step_ms` and sends whenever allowed; returns send times.
    fn greedy(g: Gcra, until_ms: i64, step_ms: i64) -> Vec<i64> {
        let mut tat = None;
        let mut sent = vec![];
        let mut now = 0;
        while now < until_ms {
            if let Ok(t) = g.check(tat, now) {
                tat = Some(t);
                sent.push(now);
            } else {
                now += step_ms;
            }
        }
        sent
    }

    /// Most sends in any half-open interval of `window_ms` (times are sorted).
    fn max_in_window(times: &[i64], window_ms: i64) -> usize {
        let mut best = 0;
        let mut end = 0;
        for (start, &t) in times.iter().enumerate() {
            while end < times.len() && times[end] < t + window_ms {
                end += 1;
            }
            best = best.max(end - start);
        }
        best
    }

    #[test]
    fn interval_and_tolerance() {
        assert_eq!(
            Gcra::per_minute(30),
            Gcra {
                interval_ms: 2_000,
                tolerance_ms: 0
            }
        );
        // 7/min does not divide a minute: round the interval up.
        assert_eq!(Gcra::per_minute(7).interval_ms, 8_572);
        assert_eq!(Gcra::new(60, 60_000, 5).tolerance_ms, 4_000);
    }

    #[test]
    fn without_burst_sends_are_evenly_spaced() {
        let g = Gcra::per_minute(30);
        assert_eq!(g.check(None, 10_000), Ok(12_000));
        assert_eq!(g.check(Some(12_000), 10_000), Err(12_000));
        assert_eq!(g.check(Some(12_000), 12_000), Ok(14_000));
        // A stale TAT (idle route) is like a fresh one.
        assert_eq!(g.check(Some(1_000), 50_000), Ok(52_000));
        let sent = greedy(g, 300_000, 1);
        assert_eq!(sent.len(), 150);
        assert_eq!(max_in_window(&sent, 60_000), 30);
        for rate in [1, 7, 10, 30, 59, 60, 61, 600, 10_000] {
            let sent = greedy(Gcra::per_minute(rate), 180_000, 1);
            assert!(max_in_window(&sent, 60_000) <= rate as usize, "rate {rate}");
        }
    }

    #[test]
    fn bursts_refill_at_the_rate() {
        let g = Gcra::new(60, 60_000, 5);
        // Five at once, then one per second.
        let mut tat = None;
        for _ in 0..5 {
            tat = Some(g.check(tat, 0).unwrap());
        }
        assert_eq!(g.check(tat, 0), Err(1_000));
        assert_eq!(g.check(tat, 999), Err(1_000));
        let t = g.check(tat, 1_000).unwrap();
        assert_eq!(g.check(Some(t), 1_000), Err(2_000));
        // After idling 10 s the full burst is back, not more.
        let mut tat = Some(t);
        let mut n = 0;
        while let Ok(x) = g.check(tat, 12_000) {
            tat = Some(x);
            n += 1;
        }
        assert_eq!(n, 5);
        // A greedy sender gets burst + rate·t over any window t.
        let sent = greedy(g, 120_000, 1);
        assert_eq!(max_in_window(&sent, 1), 5);
        assert_eq!(max_in_window(&sent, 60_000), 5 + 59);
    }
}
