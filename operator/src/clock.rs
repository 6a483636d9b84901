//! Time values as the status fields carry them: RFC 3339 in UTC with whole seconds. Formatting
//! and parsing only; the callers decide what "now" is (tests pass fixed instants).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{Timestamp, Unit};

/// `2024-05-01T12:00:00Z`: whole seconds, as Kubernetes condition times are written.
pub fn format(ts: Timestamp) -> String {
    ts.round(Unit::Second).unwrap_or(ts).to_string()
}

/// The same instant as a status time (whole seconds, as [`format`] writes it).
pub fn time(ts: Timestamp) -> Time {
    Time(ts.round(Unit::Second).unwrap_or(ts))
}

/// Parses an RFC 3339 time; `None` when it is not one.
pub fn parse(s: &str) -> Option<Timestamp> {
    s.parse().ok()
}

/// How long ago `then` was, zero when it lies in the future.
pub fn age(then: Timestamp, now: Timestamp) -> Duration {
    let secs = now.as_second() - then.as_second();
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// `ts + d`, saturating at the end of time.
pub fn add(ts: Timestamp, d: Duration) -> Timestamp {
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    Timestamp::from_second(ts.as_second().saturating_add(secs)).unwrap_or(Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_age() {
        let t: Timestamp = "2024-05-01T12:00:00.700Z".parse().unwrap();
        assert_eq!(format(t), "2024-05-01T12:00:01Z");
        let p = parse("2024-05-01T12:00:00Z").unwrap();
        assert_eq!(age(p, add(p, Duration::from_secs(90))), Duration::from_secs(90));
        assert_eq!(age(add(p, Duration::from_secs(5)), p), Duration::ZERO);
        assert!(parse("yesterday").is_none());
    }
}
