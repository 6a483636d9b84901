//! Back-off after rate-limit replies: which replies count as "slow down", and how long a route
//! (or, for MX delivery, a destination domain) then waits. Pure; the stores keep the state.

use crate::outbound::bounce::{BounceClass, Reply, classify_parsed};

/// How long to back off: `initial_ms`, doubling per rate-limit reply that arrives after the
/// previous back-off ended, at most `max_ms`. The level is forgotten `memory_ms` after a
/// back-off ends without a new rate-limit reply, and at once by a success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial_ms: i64,
    pub max_ms: i64,
    pub memory_ms: i64,
}

impl Default for BackoffPolicy {
    /// 1 minute, doubling up to 15 minutes, remembered for an hour.
    fn default() -> Self {
        BackoffPolicy {
            initial_ms: 60_000,
            max_ms: 15 * 60_000,
            memory_ms: 3_600_000,
        }
    }
}

/// An active or remembered back-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffState {
    pub until_ms: i64,
    pub level: u32,
}

impl BackoffPolicy {
    /// Length of the back-off at `level` (1 = first).
    pub fn duration_ms(&self, level: u32) -> i64 {
        let shift = level.clamp(1, 31) - 1;
        self.initial_ms.saturating_mul(1_i64 << shift).min(self.max_ms)
    }

    /// A rate-limit reply at `now_ms` given the stored state (`None`: nothing remembered).
    /// Replies during an active back-off (other in-flight deliveries answered the same) do not
    /// escalate it: `None` is returned and nothing changes.
    pub fn escalate(&self, prev: Option<BackoffState>, now_ms: i64) -> Option<BackoffState> {
        match prev {
            Some(p) if p.until_ms > now_ms => None,
            _ => {
                let level = prev.map_or(1, |p| p.level.saturating_add(1));
                Some(BackoffState {
                    until_ms: now_ms + self.duration_ms(level),
                    level,
                })
            }
        }
    }
}

/// What a delivery attempt says about the upstream's pace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// The upstream accepted (2xx): clear any back-off.
    Success,
    /// `421`, `450 4.7.x`, `451 4.7.x` or another reply classified as a rate limit.
    RateLimited,
    /// Anything else: no effect on pacing.
    Neutral,
}

/// Classifies the reply that ended an attempt for pacing (none: neutral): a reply the bounce classification calls
/// [`BounceClass::RateLimited`] (the class the delivery log and metrics show) backs off, except
/// per-message recipient-count replies (`452 4.5.3`, `552 … too many recipients`), which are
/// about that message, not the pace.
pub fn signal(reply: Option<&Reply>) -> Signal {
    let Some(r) = reply else {
        return Signal::Neutral;
    };
    match r.code {
        200..=299 => return Signal::Success,
        452 | 552 => return Signal::Neutral,
        _ => {}
    }
    if r.enhanced.is_some_and(|e| (e.subject, e.detail) == (5, 3)) {
        return Signal::Neutral;
    }
    match classify_parsed(r) {
        Some(v) if v.class == BounceClass::RateLimited => Signal::RateLimited,
        _ => Signal::Neutral,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(code: u16, text: &str) -> Signal {
        signal(Some(&Reply::new(code, text)))
    }

    #[test]
    fn rate_limit_replies() {
        assert_eq!(sig(250, "2.0.0 OK queued"), Signal::Success);
        assert_eq!(
            sig(421, "4.7.0 Try again later, closing connection"),
            Signal::RateLimited
        );
        assert_eq!(sig(421, "Service not available"), Signal::RateLimited);
        assert_eq!(sig(450, "4.7.1 Client host rejected: too fast"), Signal::RateLimited);
        assert_eq!(sig(451, "4.7.1 Please try again later"), Signal::RateLimited);
        assert_eq!(
            sig(451, "4.7.500 Server busy. Please try again later"),
            Signal::RateLimited
        );
        assert_eq!(sig(550, "5.4.5 Daily user sending quota exceeded"), Signal::RateLimited);
        assert_eq!(sig(450, "4.2.1 Too many messages, slow down"), Signal::RateLimited);
        assert_eq!(sig(451, "4.3.0 Local error in processing"), Signal::Neutral);
        assert_eq!(sig(452, "4.5.3 Too many recipients"), Signal::Neutral);
        assert_eq!(sig(552, "5.5.3 Too many recipients"), Signal::Neutral);
        assert_eq!(sig(550, "5.1.1 User unknown"), Signal::Neutral);
        assert_eq!(sig(354, "Start mail input"), Signal::Neutral);
        assert_eq!(signal(None), Signal::Neutral);
    }

    /// The back-off and the delivery log/metrics class read a reply the same way: a reply backs
    /// the route off exactly when it is classed `rate_limited` (but for recipient counts).
    #[test]
    fn backoff_follows_the_rate_limited_class() {
        for (code, text, backs_off) in [
            (421, "4.7.0 Try again later", true),
            (421, "4.7.0 Try again later, closing connection", true),
            (421, "Service not available, closing channel", true),
            (421, "4.3.2 System shutting down", true),
            (450, "4.7.1 Client host rejected: too fast", true),
            (451, "4.7.1 Please try again later", true),
            (451, "4.7.500 Server busy. Please try again later", true),
            (550, "5.4.5 Daily user sending quota exceeded", true),
            (421, "4.7.0 Must issue a STARTTLS command first", false),
            (451, "4.7.1 Greylisted, please try again in 5 minutes", false),
            (450, "4.7.1 SPF check failed, try again", false),
            (454, "4.7.0 Temporary authentication failure", false),
            (451, "4.3.0 Local error in processing", false),
            (550, "5.7.1 Message rejected as spam", false),
        ] {
            let class = classify_parsed(&Reply::new(code, text)).map(|v| v.class);
            assert_eq!(
                sig(code, text) == Signal::RateLimited,
                backs_off,
                "{code} {text}: back-off"
            );
            assert_eq!(
                class == Some(BounceClass::RateLimited),
                backs_off,
                "{code} {text}: class {class:?}"
            );
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_ignores_replies_while_active() {
        let p = BackoffPolicy::default();
        let s1 = p.escalate(None, 0).unwrap();
        assert_eq!(
            s1,
            BackoffState {
                until_ms: 60_000,
                level: 1
            }
        );
        assert_eq!(p.escalate(Some(s1), 59_999), None);
        let s2 = p.escalate(Some(s1), 60_000).unwrap();
        assert_eq!(
            s2,
            BackoffState {
                until_ms: 180_000,
                level: 2
            }
        );
        let s3 = p.escalate(Some(s2), 200_000).unwrap();
        assert_eq!(s3.until_ms - 200_000, 240_000);
        let mut s = s3;
        for _ in 0..40 {
            s = p.escalate(Some(s), s.until_ms).unwrap();
        }
        assert_eq!(p.duration_ms(s.level), 900_000);
        assert_eq!(p.duration_ms(4), 480_000);
        assert_eq!(p.duration_ms(5), 900_000);
    }
}
