//! Retry scheduling: when the next delivery attempt happens, when a message
//! expires, quiet-hours deferral, and parsing of the duration / quiet-hours
//! header values that feed them.
//!
//! This module owns the arithmetic only. It is pure: no I/O, no async, no
//! clock reads — every instant is passed in as Unix milliseconds (UTC). It
//! must not classify failures (that is `bounce`), touch the queue, or sleep.
//!
//! # Schedule rule ([`next_attempt`])
//!
//! * `expires_at = accepted_at + lifetime`; an attempt may happen at any
//!   instant `t <= expires_at`.
//! * If `now >= expires_at` the message is [`Next::Expired`] — in particular
//!   after the final attempt made exactly at expiry.
//! * Otherwise the next attempt is `min(now + delay(n), expires_at)`, where
//!   `n = attempts_so_far`. So when the regular schedule would overshoot,
//!   there is exactly one last attempt at `expires_at`.
//! * `delay(0) = 0` (never attempted: go now), `Fixed`: `delay(n) = interval`,
//!   `Exponential`: `delay(n) = min(interval * factor^(n-1), max_interval)`.
//!
//! With the default policy (1 min fixed, 30 min lifetime) and instantaneous
//! attempts, the attempts are at +0, +1, …, +30 min and then it is expired.
//! Invalid policies (see `RetryPolicy::validate`) are clamped rather than
//! looping: the delay is at least one second and the factor at least 1.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDateTime, NaiveTime, Offset, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// Errors from parsing or validating retry configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetryError {
    #[error("invalid duration {input:?}: {reason}")]
    Duration { input: String, reason: String },
    #[error("invalid quiet hours {input:?}: {reason}")]
    QuietHours { input: String, reason: String },
    #[cfg(test)]
    #[error("invalid retry policy: {0}")]
    Policy(&'static str),
}

/// How the interval between attempts grows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Backoff {
    #[default]
    Fixed,
    Exponential {
        #[serde(default = "default_factor")]
        factor: f64,
        #[serde(default = "default_max_interval", with = "duration_str")]
        max_interval: Duration,
    },
}

impl Backoff {
    /// Exponential backoff with the defaults (factor 2, capped at 10 min).
    #[cfg(test)]
    pub fn exponential() -> Self {
        Backoff::Exponential {
            factor: default_factor(),
            max_interval: default_max_interval(),
        }
    }
}

fn default_factor() -> f64 {
    2.0
}
fn default_max_interval() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_lifetime() -> Duration {
    Duration::from_secs(30 * 60)
}

/// Retry policy. Durations (de)serialize as humantime strings (`"1m"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Base interval between attempts (default 60 s).
    #[serde(default = "default_interval", with = "duration_str")]
    pub interval: Duration,
    /// Total time from acceptance after which the message expires (default 30 min).
    #[serde(default = "default_lifetime", with = "duration_str")]
    pub lifetime: Duration,
    #[serde(default)]
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            interval: default_interval(),
            lifetime: default_lifetime(),
            backoff: Backoff::Fixed,
        }
    }
}

impl RetryPolicy {
    /// Rejects policies that make no sense (zero interval/lifetime, factor < 1
    /// or not finite, cap below the interval). Only the tests call it: the worker builds its
    /// policies clamped (`worker::policy_for`).
    #[cfg(test)]
    pub fn validate(&self) -> Result<(), RetryError> {
        if self.interval.is_zero() {
            return Err(RetryError::Policy("interval must be positive"));
        }
        if self.lifetime.is_zero() {
            return Err(RetryError::Policy("lifetime must be positive"));
        }
        if let Backoff::Exponential { factor, max_interval } = self.backoff {
            if !factor.is_finite() || factor < 1.0 {
                return Err(RetryError::Policy("factor must be a finite number >= 1"));
            }
            if max_interval < self.interval {
                return Err(RetryError::Policy("maxInterval must be >= interval"));
            }
        }
        Ok(())
    }

    /// `accepted_at_ms + lifetime`, saturating.
    pub fn expires_at_ms(&self, accepted_at_ms: i64) -> i64 {
        accepted_at_ms.saturating_add(ms(self.lifetime))
    }

    /// Delay before attempt number `attempts_so_far + 1`, in ms (see module docs).
    pub fn delay_ms(&self, attempts_so_far: u32) -> i64 {
        if attempts_so_far == 0 {
            return 0;
        }
        let base = ms(self.interval).max(MIN_DELAY_MS);
        match self.backoff {
            Backoff::Fixed => base,
            Backoff::Exponential { factor, max_interval } => {
                let cap = ms(max_interval).max(MIN_DELAY_MS);
                let factor = if factor.is_finite() && factor >= 1.0 {
                    factor
                } else {
                    1.0
                };
                let exp = i32::try_from(attempts_so_far - 1).unwrap_or(i32::MAX);
                let d = base as f64 * factor.powi(exp);
                if d.is_finite() && d < cap as f64 { d as i64 } else { cap }
            }
        }
    }
}

const MIN_DELAY_MS: i64 = 1000;

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Attempt again at this instant (Unix ms).
    RetryAt(i64),
    /// Lifetime exhausted: bounce.
    Expired,
}

/// Next attempt time; see the module docs for the exact rule.
pub fn next_attempt(policy: &RetryPolicy, accepted_at_ms: i64, now_ms: i64, attempts_so_far: u32) -> Next {
    let expires_at = policy.expires_at_ms(accepted_at_ms);
    if now_ms >= expires_at {
        return Next::Expired;
    }
    let at = now_ms.saturating_add(policy.delay_ms(attempts_so_far));
    Next::RetryAt(at.min(expires_at))
}

/// Parses a header duration such as `"90s"`, `"5m"`, `"2h"`, `"1h30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, RetryError> {
    humantime::parse_duration(s.trim()).map_err(|e| RetryError::Duration {
        input: s.to_owned(),
        reason: e.to_string(),
    })
}

/// A daily window `[start, end)` in local wall-clock time of `tz` during
/// which nothing is delivered. `start > end` wraps midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    pub start: NaiveTime,
    pub end: NaiveTime,
    pub tz: Tz,
}

impl QuietHours {
    /// Whether the instant falls inside the window (never, if `start == end`).
    pub fn contains_ms(&self, at_ms: i64) -> bool {
        DateTime::from_timestamp_millis(at_ms).is_some_and(|t| self.contains(t))
    }

    fn contains(&self, at: DateTime<Utc>) -> bool {
        let local = at.with_timezone(&self.tz).time();
        self.contains_local(local)
    }

    fn contains_local(&self, t: NaiveTime) -> bool {
        if self.start <= self.end {
            self.start <= t && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }

    /// The first instant at or after `at` where the window that contains
    /// `at` ends (at may be a later instant if DST interferes).
    fn window_end(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        let local = at.with_timezone(&self.tz);
        let date = local.date_naive();
        let end_date = if self.start > self.end && local.time() >= self.start {
            date.succ_opt().unwrap_or(date)
        } else {
            date
        };
        first_instant_at_or_after(self.tz, end_date.and_time(self.end), at)
    }
}

impl FromStr for QuietHours {
    type Err = RetryError;

    /// `"HH:MM-HH:MM[ Area/City]"`, e.g. `"22:00-07:00 Asia/Tokyo"`; UTC if
    /// no zone is given. An empty window (`start == end`) is rejected.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| RetryError::QuietHours {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        let s_trim = s.trim();
        let (range, tz) = match s_trim.split_once(char::is_whitespace) {
            Some((range, tz)) => {
                let tz = tz.trim();
                let tz: Tz = tz.parse().map_err(|_| err(&format!("unknown time zone {tz:?}")))?;
                (range, tz)
            }
            None => (s_trim, Tz::UTC),
        };
        let (start, end) = range.split_once('-').ok_or_else(|| err("expected HH:MM-HH:MM"))?;
        let time = |v: &str| {
            NaiveTime::parse_from_str(v, "%H:%M").map_err(|_| err(&format!("bad time {v:?}, expected HH:MM")))
        };
        let (start, end) = (time(start)?, time(end)?);
        if start == end {
            return Err(err("start and end are equal"));
        }
        Ok(QuietHours { start, end, tz })
    }
}

impl fmt::Display for QuietHours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{} {}",
            self.start.format("%H:%M"),
            self.end.format("%H:%M"),
            self.tz.name()
        )
    }
}

/// Parses `"22:00-07:00 Asia/Tokyo"` (zone optional, default UTC).
pub fn parse_quiet_hours(s: &str) -> Result<QuietHours, RetryError> {
    s.parse()
}

/// The first instant at or after `at_ms` outside the quiet window. Window
/// ends are wall-clock times: if the end falls in a DST gap the window ends
/// when the clocks jump; if it is ambiguous (clocks go back) the earliest
/// occurrence not before `at_ms` is used. Out-of-range input is returned as is.
pub fn defer_out_of_quiet(q: &QuietHours, at_ms: i64) -> i64 {
    let Some(mut t) = DateTime::from_timestamp_millis(at_ms) else {
        return at_ms;
    };
    // A window end can land inside the next window only through DST
    // oddities; a few rounds always escape.
    for _ in 0..4 {
        if !q.contains(t) {
            return t.timestamp_millis();
        }
        t = q.window_end(t).max(t);
    }
    t.timestamp_millis()
}

/// Resolves a local wall-clock time to the earliest UTC instant `>= not_before`
/// showing it, or the end of the DST gap swallowing it.
fn first_instant_at_or_after(tz: Tz, local: NaiveDateTime, not_before: DateTime<Utc>) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => {
            let (a, b) = (a.with_timezone(&Utc), b.with_timezone(&Utc));
            let (early, late) = if a <= b { (a, b) } else { (b, a) };
            if early >= not_before { early } else { late }
        }
        LocalResult::None => gap_end(tz, local),
    }
}

/// The instant the clocks jump over the non-existent local time `local`.
fn gap_end(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let offset_at = |t: NaiveDateTime| -> i64 { i64::from(tz.offset_from_utc_datetime(&t).fix().local_minus_utc()) };
    let as_utc = local;
    let day = TimeDelta::days(1);
    let before = offset_at(as_utc.checked_sub_signed(day).unwrap_or(as_utc));
    let after = offset_at(as_utc.checked_add_signed(day).unwrap_or(as_utc));
    // In UTC the transition lies in (local - after, local - before].
    let mut lo = as_utc - TimeDelta::seconds(after.max(before));
    let mut hi = as_utc - TimeDelta::seconds(before.min(after));
    let lo_offset = offset_at(lo);
    while hi - lo > TimeDelta::seconds(1) {
        let mid = lo + (hi - lo) / 2;
        if offset_at(mid) == lo_offset {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi.and_utc()
}

/// Serde helper: `Duration` as a humantime string (`"1m 30s"`).
mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const T0: i64 = 1_700_000_000_000;

    /// Runs the schedule with instantaneous failing attempts; returns the
    /// attempt offsets (minutes from acceptance, including the first at 0).
    fn schedule(policy: &RetryPolicy) -> Vec<f64> {
        let mut out = Vec::new();
        let mut now = T0;
        let mut n = 0;
        loop {
            match next_attempt(policy, T0, now, n) {
                Next::RetryAt(at) => {
                    assert!(at >= now, "never schedules in the past");
                    assert!(at <= policy.expires_at_ms(T0), "never after expiry");
                    out.push((at - T0) as f64 / MIN as f64);
                    now = at;
                    n += 1;
                }
                Next::Expired => return out,
            }
            assert!(n < 10_000, "schedule must terminate");
        }
    }

    #[test]
    fn default_policy_attempts_every_minute_until_thirty() {
        let p = RetryPolicy::default();
        p.validate().expect("default is valid");
        let expected: Vec<f64> = (0..=30).map(f64::from).collect();
        assert_eq!(schedule(&p), expected);
    }

    #[test]
    fn exponential_doubles_and_caps_then_final_attempt_at_expiry() {
        let p = RetryPolicy {
            backoff: Backoff::exponential(),
            ..RetryPolicy::default()
        };
        // delays 1, 2, 4, 8, 10 (capped), then 25 + 10 > 30 → last at 30.
        assert_eq!(schedule(&p), [0.0, 1.0, 3.0, 7.0, 15.0, 25.0, 30.0]);
        assert_eq!(p.delay_ms(1), MIN);
        assert_eq!(p.delay_ms(4), 8 * MIN);
        assert_eq!(p.delay_ms(5), 10 * MIN);
        assert_eq!(p.delay_ms(u32::MAX), 10 * MIN);
    }

    #[test]
    fn expiry_boundaries() {
        let p = RetryPolicy::default();
        let exp = T0 + 30 * MIN;
        assert_eq!(next_attempt(&p, T0, exp - 1, 5), Next::RetryAt(exp));
        assert_eq!(next_attempt(&p, T0, exp, 5), Next::Expired);
        assert_eq!(next_attempt(&p, T0, exp + 1, 5), Next::Expired);
        assert_eq!(next_attempt(&p, T0, T0 + 10 * MIN, 3), Next::RetryAt(T0 + 11 * MIN));
        // Never attempted yet: go now.
        assert_eq!(next_attempt(&p, T0, T0 + 5, 0), Next::RetryAt(T0 + 5));
    }

    #[test]
    fn slow_attempts_shift_the_schedule_from_now() {
        let p = RetryPolicy::default();
        // An attempt that finished 90 s after acceptance retries at +150 s.
        assert_eq!(next_attempt(&p, T0, T0 + 90_000, 1), Next::RetryAt(T0 + 150_000));
    }

    #[test]
    fn extreme_values_saturate_instead_of_overflowing() {
        let p = RetryPolicy {
            lifetime: Duration::from_secs(u64::MAX),
            backoff: Backoff::Exponential {
                factor: 1e300,
                max_interval: Duration::from_secs(u64::MAX),
            },
            ..RetryPolicy::default()
        };
        assert_eq!(p.expires_at_ms(T0), i64::MAX);
        assert_eq!(
            next_attempt(&p, T0, T0, 100),
            Next::RetryAt(i64::MAX),
            "capped at expiry, no overflow"
        );
    }

    #[test]
    fn invalid_policies_are_rejected_and_clamped() {
        let zero = RetryPolicy {
            interval: Duration::ZERO,
            ..RetryPolicy::default()
        };
        assert!(zero.validate().is_err());
        assert_eq!(zero.delay_ms(1), 1000, "clamped to 1 s, no busy loop");
        let shrinking = RetryPolicy {
            backoff: Backoff::Exponential {
                factor: 0.5,
                max_interval: Duration::from_secs(600),
            },
            ..RetryPolicy::default()
        };
        assert!(shrinking.validate().is_err());
        assert_eq!(shrinking.delay_ms(5), MIN, "factor clamped to 1");
        let nan = RetryPolicy {
            backoff: Backoff::Exponential {
                factor: f64::NAN,
                max_interval: Duration::from_secs(600),
            },
            ..RetryPolicy::default()
        };
        assert!(nan.validate().is_err());
        let low_cap = RetryPolicy {
            backoff: Backoff::Exponential {
                factor: 2.0,
                max_interval: Duration::from_secs(1),
            },
            ..RetryPolicy::default()
        };
        assert_eq!(
            low_cap.validate(),
            Err(RetryError::Policy("maxInterval must be >= interval"))
        );
    }

    #[test]
    fn policy_serde_camel_case_and_defaults() {
        let p = RetryPolicy {
            interval: Duration::from_secs(90),
            lifetime: Duration::from_secs(3600),
            backoff: Backoff::Exponential {
                factor: 3.0,
                max_interval: Duration::from_secs(900),
            },
        };
        let json = serde_json::to_value(p).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({
                "interval": "1m 30s",
                "lifetime": "1h",
                "backoff": {"type": "exponential", "factor": 3.0, "maxInterval": "15m"}
            })
        );
        let back: RetryPolicy = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back, p);

        let d: RetryPolicy = serde_json::from_str("{}").expect("defaults");
        assert_eq!(d, RetryPolicy::default());
        let e: RetryPolicy =
            serde_json::from_str(r#"{"interval":"2m","backoff":{"type":"exponential"}}"#).expect("partial");
        assert_eq!(e.interval, Duration::from_secs(120));
        assert_eq!(e.backoff, Backoff::exponential());
        assert!(serde_json::from_str::<RetryPolicy>(r#"{"interval":"soon"}"#).is_err());
    }

    #[test]
    fn header_durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration(" 1h30m "), Ok(Duration::from_secs(5400)));
        assert!(matches!(
            parse_duration("ten minutes"),
            Err(RetryError::Duration { .. })
        ));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5m").is_err());
    }

    fn q(s: &str) -> QuietHours {
        s.parse().expect("valid quiet hours")
    }

    fn utc_ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s)
            .expect("valid rfc3339")
            .timestamp_millis()
    }

    fn rfc(ms: i64) -> String {
        DateTime::from_timestamp_millis(ms).expect("in range").to_rfc3339()
    }

    #[test]
    fn quiet_hours_parse() {
        let tokyo = q("22:00-07:00 Asia/Tokyo");
        assert_eq!(tokyo.start, NaiveTime::from_hms_opt(22, 0, 0).expect("time"));
        assert_eq!(tokyo.end, NaiveTime::from_hms_opt(7, 0, 0).expect("time"));
        assert_eq!(tokyo.tz, chrono_tz::Asia::Tokyo);
        assert_eq!(tokyo.to_string(), "22:00-07:00 Asia/Tokyo");
        assert_eq!(q("01:30-02:00").tz, Tz::UTC);
        assert_eq!(
            parse_quiet_hours(" 9:00-17:00  Europe/Berlin ").map(|q| q.tz),
            Ok(chrono_tz::Europe::Berlin)
        );
        for bad in [
            "",
            "22:00",
            "22:00-07:00 Mars/Olympus",
            "25:00-07:00",
            "22:00-07:60",
            "10:00-10:00",
            "22-07",
        ] {
            assert!(
                matches!(parse_quiet_hours(bad), Err(RetryError::QuietHours { .. })),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn defer_with_midnight_wrap_in_tokyo() {
        let w = q("22:00-07:00 Asia/Tokyo");
        // 12:00 JST: outside, unchanged (ms preserved).
        let noon = utc_ms("2024-05-01T12:00:00.123+09:00");
        assert_eq!(defer_out_of_quiet(&w, noon), noon);
        // 23:30 JST → 07:00 JST next day.
        assert_eq!(
            rfc(defer_out_of_quiet(&w, utc_ms("2024-05-01T23:30:00+09:00"))),
            "2024-05-01T22:00:00+00:00"
        );
        // 03:00 JST → 07:00 JST same day.
        assert_eq!(
            defer_out_of_quiet(&w, utc_ms("2024-05-02T03:00:00+09:00")),
            utc_ms("2024-05-02T07:00:00+09:00")
        );
        // Start is inclusive, end exclusive.
        assert_eq!(
            defer_out_of_quiet(&w, utc_ms("2024-05-01T22:00:00+09:00")),
            utc_ms("2024-05-02T07:00:00+09:00")
        );
        let end = utc_ms("2024-05-02T07:00:00+09:00");
        assert_eq!(defer_out_of_quiet(&w, end), end);
        assert_eq!(defer_out_of_quiet(&w, end - 1), end);
        // Year boundary.
        assert_eq!(
            defer_out_of_quiet(&w, utc_ms("2024-12-31T23:59:59+09:00")),
            utc_ms("2025-01-01T07:00:00+09:00")
        );
    }

    #[test]
    fn defer_non_wrapping_window() {
        let w = q("12:00-13:00");
        assert_eq!(
            defer_out_of_quiet(&w, utc_ms("2024-05-01T12:59:59Z")),
            utc_ms("2024-05-01T13:00:00Z")
        );
        let before = utc_ms("2024-05-01T11:59:59.999Z");
        assert_eq!(defer_out_of_quiet(&w, before), before);
    }

    #[test]
    fn defer_across_spring_forward() {
        // New York, 2024-03-10: 02:00 EST jumps to 03:00 EDT.
        let w = q("22:00-07:00 America/New_York");
        // 23:00 EST on the 9th → 07:00 EDT on the 10th = 11:00 UTC (not 12:00).
        assert_eq!(
            rfc(defer_out_of_quiet(&w, utc_ms("2024-03-09T23:00:00-05:00"))),
            "2024-03-10T11:00:00+00:00"
        );
        // Window ending inside the gap ends when the clocks jump (07:00 UTC).
        let gap = q("01:00-02:30 America/New_York");
        assert_eq!(
            rfc(defer_out_of_quiet(&gap, utc_ms("2024-03-10T01:30:00-05:00"))),
            "2024-03-10T07:00:00+00:00"
        );
        // Non-quiet hours swallowed entirely by the gap: defer to the next day.
        let swallowed = q("02:30-02:00 America/New_York");
        assert_eq!(
            rfc(defer_out_of_quiet(&swallowed, utc_ms("2024-03-10T01:00:00-05:00"))),
            "2024-03-11T06:00:00+00:00" // 02:00 EDT on the 11th
        );
    }

    #[test]
    fn defer_across_fall_back() {
        // Berlin, 2024-10-27: 03:00 CEST goes back to 02:00 CET.
        let w = q("22:00-07:00 Europe/Berlin");
        // 23:00 CEST on the 26th → 07:00 CET on the 27th = 06:00 UTC.
        assert_eq!(
            rfc(defer_out_of_quiet(&w, utc_ms("2024-10-26T23:00:00+02:00"))),
            "2024-10-27T06:00:00+00:00"
        );
        // Window ending at the ambiguous 02:30.
        let amb = q("02:00-02:30 Europe/Berlin");
        // First pass (CEST): ends at the first 02:30 (00:30 UTC).
        assert_eq!(
            rfc(defer_out_of_quiet(&amb, utc_ms("2024-10-27T02:10:00+02:00"))),
            "2024-10-27T00:30:00+00:00"
        );
        // Second pass (CET): the first 02:30 is in the past, use the second.
        assert_eq!(
            rfc(defer_out_of_quiet(&amb, utc_ms("2024-10-27T02:10:00+01:00"))),
            "2024-10-27T01:30:00+00:00"
        );
        // Between the passes the wall clock reads 02:30–02:59: not quiet.
        let between = utc_ms("2024-10-27T02:45:00+02:00");
        assert_eq!(defer_out_of_quiet(&amb, between), between);
    }

    #[test]
    fn contains_ms_and_out_of_range() {
        let w = q("22:00-07:00 Asia/Tokyo");
        assert!(w.contains_ms(utc_ms("2024-05-01T23:00:00+09:00")));
        assert!(!w.contains_ms(utc_ms("2024-05-01T21:59:59+09:00")));
        assert_eq!(defer_out_of_quiet(&w, i64::MAX), i64::MAX);
    }
}
