//! Period arithmetic for counters: which counter a unit of usage goes to and when it stops
//! counting. Pure functions of (period, time zone, instant); no I/O, no clock.
//!
//! Two kinds of window:
//! - **Rolling** (quota minute and hour, the route's 24-hour recipient count): time is cut into
//!   buckets of `bucket_ms`; a unit added in bucket `b` counts while the current bucket is below
//!   `b + span`. With `span = n + 1` buckets of `period / n`, every unit counts for at least one
//!   full period (between `period` and `period + bucket_ms`), so no interval of one period ever
//!   holds more than the limit: the window is conservative by at most one bucket.
//! - **Calendar** (quota day and month): one counter per local day or month in the quota's IANA
//!   time zone, which resets at local midnight (days of 23 or 25 hours on DST changes, a local
//!   midnight that does not exist starts the day at the first instant that does).

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use mailroute_api::config::Period;

/// Buckets in a rolling quota window: the current one and the 60 before it.
pub const QUOTA_SPAN: i64 = 61;
/// Bucket of the rolling minute.
pub const MINUTE_BUCKET_MS: i64 = 1_000;
/// Bucket of the rolling hour.
pub const HOUR_BUCKET_MS: i64 = 60_000;

/// A rolling window position: bucket width, how many buckets count, the current bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rolling {
    pub bucket_ms: i64,
    pub span: i64,
    pub current: i64,
}

impl Rolling {
    pub fn at(bucket_ms: i64, span: i64, now_ms: i64) -> Self {
        Rolling {
            bucket_ms,
            span,
            current: now_ms.div_euclid(bucket_ms),
        }
    }

    /// Whether units in bucket `idx` still count.
    pub fn is_live(&self, idx: i64) -> bool {
        idx > self.current - self.span
    }

    /// When units in bucket `idx` stop counting.
    pub fn expiry_of(&self, idx: i64) -> i64 {
        (idx + self.span) * self.bucket_ms
    }

    /// How long an idle counter must be kept: one whole window after the last write.
    pub fn ttl_ms(&self) -> i64 {
        (self.span + 1) * self.bucket_ms
    }

    /// Units in the window, counting only live buckets.
    pub fn used<'a>(&self, buckets: impl IntoIterator<Item = (&'a i64, &'a u64)>) -> u64 {
        buckets
            .into_iter()
            .filter(|(i, _)| self.is_live(**i))
            .map(|(_, v)| *v)
            .sum()
    }

    /// The earliest instant at which `amount` more units fit under `max`, given the live buckets
    /// (in any order). When even an empty window cannot take them, the instant the current
    /// bucket expires (everything counted now is gone by then).
    pub fn fits_at(&self, buckets: &[(i64, u64)], amount: u64, max: u64) -> i64 {
        let mut live: Vec<(i64, u64)> = buckets.iter().copied().filter(|(i, _)| self.is_live(*i)).collect();
        live.sort_unstable();
        let mut used: u64 = live.iter().map(|(_, v)| *v).sum();
        if used.saturating_add(amount) <= max {
            return self.current * self.bucket_ms;
        }
        for (idx, v) in live {
            used -= v;
            if used.saturating_add(amount) <= max {
                return self.expiry_of(idx);
            }
        }
        self.expiry_of(self.current)
    }

    /// Like [`fits_at`](Self::fits_at), but an empty window takes any amount (a message with more
    /// recipients than a whole day allows still goes, alone).
    pub fn fits_at_or_empty(&self, buckets: &[(i64, u64)], amount: u64, max: u64) -> i64 {
        let mut live: Vec<(i64, u64)> = buckets
            .iter()
            .copied()
            .filter(|(i, v)| self.is_live(*i) && *v > 0)
            .collect();
        live.sort_unstable();
        let mut used: u64 = live.iter().map(|(_, v)| *v).sum();
        if used == 0 || used.saturating_add(amount) <= max {
            return self.current * self.bucket_ms;
        }
        for (idx, v) in live {
            used -= v;
            if used == 0 || used.saturating_add(amount) <= max {
                return self.expiry_of(idx);
            }
        }
        self.expiry_of(self.current)
    }
}

/// Where usage of one period goes at an instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Window {
    Rolling(Rolling),
    /// `id` names the local day (`2025-03-09`) or month (`2025-03`); usage resets at `ends_ms`.
    Calendar {
        id: String,
        starts_ms: i64,
        ends_ms: i64,
    },
}

impl Window {
    /// The window of `period` containing `now_ms`, with day and month boundaries in `tz`.
    pub fn of(period: Period, tz: Tz, now_ms: i64) -> Window {
        match period {
            Period::Minute => Window::Rolling(Rolling::at(MINUTE_BUCKET_MS, QUOTA_SPAN, now_ms)),
            Period::Hour => Window::Rolling(Rolling::at(HOUR_BUCKET_MS, QUOTA_SPAN, now_ms)),
            Period::Day => {
                let date = local_date(tz, now_ms);
                let start = day_start(tz, date);
                let end = day_start(tz, date.succ_opt().unwrap_or(date));
                Window::Calendar {
                    id: date.format("%Y-%m-%d").to_string(),
                    starts_ms: start,
                    ends_ms: end,
                }
            }
            Period::Month => {
                let date = local_date(tz, now_ms);
                let first = NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap_or(date);
                let next = if date.month() == 12 {
                    NaiveDate::from_ymd_opt(date.year() + 1, 1, 1)
                } else {
                    NaiveDate::from_ymd_opt(date.year(), date.month() + 1, 1)
                }
                .unwrap_or(first);
                Window::Calendar {
                    id: date.format("%Y-%m").to_string(),
                    starts_ms: day_start(tz, first),
                    ends_ms: day_start(tz, next),
                }
            }
        }
    }
}

/// Parses an IANA zone name; the compiler already refused invalid names, so an unknown one (a
/// newer tzdata on the operator than in this binary) falls back to UTC rather than failing mail.
pub fn parse_tz(name: &str) -> Tz {
    name.parse().unwrap_or(Tz::UTC)
}

/// The local calendar date in `tz` at `ms`.
pub fn local_date(tz: Tz, ms: i64) -> NaiveDate {
    utc(ms).with_timezone(&tz).date_naive()
}

/// The first instant (ms) of local `date` in `tz`: midnight, or the end of a DST gap covering it.
pub fn day_start(tz: Tz, date: NaiveDate) -> i64 {
    let midnight = NaiveDateTime::from(date);
    // Gaps are at most a few hours; probe minute by minute for the first local time that exists.
    for minutes in 0..=24 * 60 {
        let probe = midnight + Duration::minutes(minutes);
        match tz.from_local_datetime(&probe) {
            LocalResult::Single(t) => return t.timestamp_millis(),
            LocalResult::Ambiguous(earliest, _) => return earliest.timestamp_millis(),
            LocalResult::None => continue,
        }
    }
    midnight.and_utc().timestamp_millis()
}

/// `ms` as a UTC instant (out-of-range values clamp to the epoch).
pub fn utc(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// RFC 3339 in the given zone, seconds precision: `2025-03-10T00:00:00+09:00`.
pub fn rfc3339_in(tz: Tz, ms: i64) -> String {
    utc(ms)
        .with_timezone(&tz)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    fn cal(period: Period, tz: &str, at: &str) -> (String, String, String) {
        let tz = parse_tz(tz);
        match Window::of(period, tz, ms(at)) {
            Window::Calendar { id, starts_ms, ends_ms } => {
                (id, rfc3339_in(Tz::UTC, starts_ms), rfc3339_in(Tz::UTC, ends_ms))
            }
            w => panic!("not a calendar window: {w:?}"),
        }
    }

    #[test]
    fn day_in_tokyo_turns_at_local_midnight() {
        assert_eq!(
            cal(Period::Day, "Asia/Tokyo", "2025-03-09T14:59:59.999Z"),
            (
                "2025-03-09".into(),
                "2025-03-08T15:00:00Z".into(),
                "2025-03-09T15:00:00Z".into()
            )
        );
        assert_eq!(
            cal(Period::Day, "Asia/Tokyo", "2025-03-09T15:00:00Z"),
            (
                "2025-03-10".into(),
                "2025-03-09T15:00:00Z".into(),
                "2025-03-10T15:00:00Z".into()
            )
        );
    }

    #[test]
    fn new_york_dst_days_have_23_and_25_hours() {
        let (id, start, end) = cal(Period::Day, "America/New_York", "2025-03-09T12:00:00Z");
        assert_eq!(id, "2025-03-09");
        assert_eq!((ms(&end) - ms(&start)) / 3_600_000, 23);
        assert_eq!(
            (start.as_str(), end.as_str()),
            ("2025-03-09T05:00:00Z", "2025-03-10T04:00:00Z")
        );

        let (id, start, end) = cal(Period::Day, "America/New_York", "2025-11-02T12:00:00Z");
        assert_eq!(id, "2025-11-02");
        assert_eq!((ms(&end) - ms(&start)) / 3_600_000, 25);
        assert_eq!(
            (start.as_str(), end.as_str()),
            ("2025-11-02T04:00:00Z", "2025-11-03T05:00:00Z")
        );

        // 00:30 local on the 25-hour day is still that day; 23:59 local too.
        assert_eq!(
            cal(Period::Day, "America/New_York", "2025-11-03T04:59:00Z").0,
            "2025-11-02"
        );
        assert_eq!(
            cal(Period::Day, "America/New_York", "2025-11-03T05:00:00Z").0,
            "2025-11-03"
        );
    }

    #[test]
    fn a_day_whose_midnight_does_not_exist_starts_after_the_gap() {
        // Cuba springs forward at 00:00 → 01:00: 2025-03-09 starts at 01:00 CDT (UTC-4).
        let (id, start, end) = cal(Period::Day, "America/Havana", "2025-03-09T12:00:00Z");
        assert_eq!(id, "2025-03-09");
        assert_eq!(start, "2025-03-09T05:00:00Z");
        assert_eq!(end, "2025-03-10T04:00:00Z");
        // The day before ends exactly where this one starts.
        let (_, _, prev_end) = cal(Period::Day, "America/Havana", "2025-03-08T12:00:00Z");
        assert_eq!(prev_end, start);
    }

    #[test]
    fn months_roll_over_in_the_zone_including_leap_february_and_year_end() {
        assert_eq!(
            cal(Period::Month, "Asia/Tokyo", "2025-01-31T15:00:00Z"),
            (
                "2025-02".into(),
                "2025-01-31T15:00:00Z".into(),
                "2025-02-28T15:00:00Z".into()
            )
        );
        assert_eq!(cal(Period::Month, "Asia/Tokyo", "2025-01-31T14:59:59Z").0, "2025-01");
        assert_eq!(
            cal(Period::Month, "UTC", "2024-02-10T00:00:00Z").2,
            "2024-03-01T00:00:00Z"
        );
        assert_eq!(
            cal(Period::Month, "America/New_York", "2026-01-01T04:59:59Z"),
            (
                "2025-12".into(),
                "2025-12-01T05:00:00Z".into(),
                "2026-01-01T05:00:00Z".into()
            )
        );
        assert_eq!(
            cal(Period::Month, "America/New_York", "2026-01-01T05:00:00Z").0,
            "2026-01"
        );
        // New York's March spans the DST change: 31 days minus one hour.
        let (_, s, e) = cal(Period::Month, "America/New_York", "2025-03-15T00:00:00Z");
        assert_eq!(ms(&e) - ms(&s), 31 * 86_400_000 - 3_600_000);
        assert_eq!(
            cal(Period::Day, "UTC", "2025-12-31T23:59:59.999Z"),
            (
                "2025-12-31".into(),
                "2025-12-31T00:00:00Z".into(),
                "2026-01-01T00:00:00Z".into()
            )
        );
    }

    #[test]
    fn unknown_zone_falls_back_to_utc() {
        assert_eq!(parse_tz("Mars/Olympus"), Tz::UTC);
        assert_eq!(parse_tz("Asia/Tokyo"), Tz::Asia__Tokyo);
    }

    #[test]
    fn rolling_minute_counts_a_unit_for_at_least_sixty_seconds() {
        let t0 = ms("2025-03-09T12:00:00.999Z");
        let w0 = match Window::of(Period::Minute, Tz::UTC, t0) {
            Window::Rolling(r) => r,
            w => panic!("{w:?}"),
        };
        let b = w0.current;
        // A unit at the end of its bucket still counts 60 s later …
        for later in [t0 + 59_999, t0 + 60_000] {
            assert!(Rolling::at(MINUTE_BUCKET_MS, QUOTA_SPAN, later).is_live(b), "{later}");
        }
        // … and is gone once its bucket is 61 buckets old.
        assert!(!Rolling::at(MINUTE_BUCKET_MS, QUOTA_SPAN, t0 + 60_001).is_live(b));
        assert_eq!(w0.expiry_of(b), ms("2025-03-09T12:01:01Z"));
        // A unit at the start of its bucket counts for 61 s.
        let start = ms("2025-03-09T12:00:00Z");
        assert!(Rolling::at(MINUTE_BUCKET_MS, QUOTA_SPAN, start + 60_999).is_live(b));
        // Hour buckets are minutes.
        match Window::of(Period::Hour, Tz::UTC, t0) {
            Window::Rolling(r) => assert_eq!((r.bucket_ms, r.span), (60_000, 61)),
            w => panic!("{w:?}"),
        }
    }

    #[test]
    fn rolling_fits_at_frees_the_oldest_buckets_first() {
        let r = Rolling::at(1_000, 61, 100_500);
        // Buckets 40 (3 units, 0..=39 are stale), 70 (2), 100 (5); stale bucket 39 is ignored.
        let b = [(39, 50), (100, 5), (40, 3), (70, 2)];
        let used = r.used(b.iter().map(|(i, v)| (i, v)));
        assert_eq!(used, 10);
        // Room now.
        assert_eq!(r.fits_at(&b, 2, 12), 100_000);
        // Need 1 more under max 10: bucket 40 must go (at (40 + 61) s).
        assert_eq!(r.fits_at(&b, 1, 10), 101_000);
        // Need 5 under 10: buckets 40 and 70 must go.
        assert_eq!(r.fits_at(&b, 5, 10), 131_000);
        // Need 11 under 10: never fits; answer when all of today's units are gone.
        assert_eq!(r.fits_at(&b, 11, 10), 161_000);
        // The lenient variant lets an oversized amount into an empty window: once bucket 100
        // is gone, nothing counts any more.
        assert_eq!(r.fits_at_or_empty(&b, 11, 10), 161_000);
        let b2 = [(40, 3), (70, 2)];
        assert_eq!(r.fits_at_or_empty(&b2, 50, 10), 131_000);
        assert_eq!(r.fits_at(&b2, 50, 10), 161_000);
        assert_eq!(r.fits_at_or_empty(&[], 50, 10), 100_000);
    }
}
