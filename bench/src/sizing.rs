//! Capacity planning from measured per-message costs: how many relay pods and Redis shards an
//! hourly volume needs, and how much Redis memory a backlog takes. Pure arithmetic; the README
//! explains the same formulas for hand use.

use serde::{Deserialize, Serialize};

/// Measured costs and the planner's assumptions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SizingInput {
    /// Messages per hour to plan for.
    pub messages_per_hour: f64,
    /// Peak-to-average ratio within the hour (1 = perfectly even).
    pub peak_factor: f64,
    /// Relay CPU per delivered message (accept + queue + deliver), in milliseconds.
    pub relay_cpu_ms_per_msg: f64,
    /// Redis CPU per delivered message, in milliseconds (the main thread is what saturates).
    pub redis_cpu_ms_per_msg: f64,
    /// Redis commands per delivered message.
    pub redis_ops_per_msg: f64,
    /// Redis memory per queued message, in bytes.
    pub redis_bytes_per_queued_msg: f64,
    /// CPU cores of one relay pod.
    pub cores_per_pod: f64,
    /// Planned utilisation of relay cores and of each Redis main thread (e.g. 0.5).
    pub target_utilization: f64,
    /// Hours of delivery outage the Redis memory must absorb as backlog.
    pub backlog_hours: f64,
}

/// What the input needs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sizing {
    pub peak_msgs_per_sec: f64,
    pub relay_cores: f64,
    pub relay_pods: u64,
    pub redis_ops_per_sec: f64,
    pub redis_shards: u64,
    pub backlog_gib: f64,
}

/// Applies the formulas: cores = rate × cpu-ms / 1000 / utilisation, pods = ⌈cores / cores-per-pod⌉
/// (at least 2 for availability), shards = ⌈rate × redis-cpu-ms / 1000 / utilisation⌉ (at least 1),
/// backlog = rate × hours × 3600 × bytes-per-message.
pub fn size(i: &SizingInput) -> Sizing {
    let avg = i.messages_per_hour / 3600.0;
    let peak = avg * i.peak_factor.max(1.0);
    let util = i.target_utilization.clamp(0.05, 1.0);
    let relay_cores = peak * i.relay_cpu_ms_per_msg / 1000.0 / util;
    let relay_pods = ((relay_cores / i.cores_per_pod.max(0.1)).ceil() as u64).max(2);
    let redis_shards = ((peak * i.redis_cpu_ms_per_msg / 1000.0 / util).ceil() as u64).max(1);
    Sizing {
        peak_msgs_per_sec: peak,
        relay_cores,
        relay_pods,
        redis_ops_per_sec: peak * i.redis_ops_per_msg,
        redis_shards,
        backlog_gib: avg * i.backlog_hours * 3600.0 * i.redis_bytes_per_queued_msg / f64::from(1u32 << 30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> SizingInput {
        SizingInput {
            messages_per_hour: 3_600_000.0,
            peak_factor: 2.0,
            relay_cpu_ms_per_msg: 0.5,
            redis_cpu_ms_per_msg: 0.1,
            redis_ops_per_msg: 12.0,
            redis_bytes_per_queued_msg: 12_000.0,
            cores_per_pod: 1.0,
            target_utilization: 0.5,
            backlog_hours: 1.0,
        }
    }

    #[test]
    fn worked_example() {
        // 1000/s average, 2000/s peak; 0.5 ms each at 50% → 2 cores; Redis 0.1 ms → 0.4 threads → 1 shard.
        let s = size(&input());
        assert_eq!(s.peak_msgs_per_sec, 2000.0);
        assert_eq!(s.relay_cores, 2.0);
        assert_eq!(s.relay_pods, 2);
        assert_eq!(s.redis_ops_per_sec, 24_000.0);
        assert_eq!(s.redis_shards, 1);
        // 3.6 M messages × 12,000 bytes.
        assert!((s.backlog_gib - 3_600_000.0 * 12_000.0 / 1_073_741_824.0).abs() < 1e-9);
    }

    #[test]
    fn scales_up_and_keeps_floors() {
        let big = size(&SizingInput {
            messages_per_hour: 36_000_000.0,
            ..input()
        });
        assert_eq!(big.relay_pods, 20);
        assert_eq!(big.redis_shards, 4);
        let tiny = size(&SizingInput {
            messages_per_hour: 10.0,
            ..input()
        });
        assert_eq!((tiny.relay_pods, tiny.redis_shards), (2, 1));
    }
}
