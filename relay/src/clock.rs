//! The wall clock in Unix milliseconds, the time unit of every shared timestamp (queue schedule,
//! leases, pacing, quotas). Pure code takes the instant as an argument; only the I/O edges read it.

/// Wall-clock milliseconds since the Unix epoch (shared with other hosts through Redis).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
