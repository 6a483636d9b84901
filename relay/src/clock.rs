//! The wall clock in Unix milliseconds, the time unit of every shared timestamp (queue schedule,
//! leases, pacing, quotas). Pure code takes the instant as an argument; only the I/O edges read it,
//! through this module: it is the one place allowed to call `chrono::Utc::now` (`clippy.toml`).

use chrono::{DateTime, Utc};

/// The current time.
#[allow(clippy::disallowed_methods)]
pub fn now() -> DateTime<Utc> {
    Utc::now()
}

/// Wall-clock milliseconds since the Unix epoch (shared with other hosts through Redis).
pub fn now_ms() -> i64 {
    now().timestamp_millis()
}
