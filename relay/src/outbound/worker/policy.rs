//! The pure part of the worker's decisions: the retry policy of a message, what follows an
//! attempt (delivered, bounce, retry, expired), the route used when none matches and the outcome
//! that stands for "no route".
//!
//! Plain functions, tested directly. Must not do I/O or read the clock.

use std::time::Duration;

use mailroute_api::config::{CompiledRoute, Target};

use crate::outbound::bounce::{self, EnhancedStatusCode, Failure, Kind, Verdict};
use crate::outbound::delivery::AttemptResult;
use crate::outbound::retry::{self, Next, RetryPolicy};
use crate::queue::message::MessageMeta;

/// The route used when nothing matches and MX fallback is on.
pub(super) fn fallback_route() -> CompiledRoute {
    CompiledRoute {
        id: "mx".into(),
        authority: Default::default(),
        priority: i32::MAX,
        target: Target::Mx,
        recipient_domains: Vec::new(),
        senders: Default::default(),
        from_override: None,
        limits: Default::default(),
        retry: Default::default(),
        dkim: None,
        test_recipient: None,
        timeouts: Default::default(),
        suspended: false,
    }
}

/// The retry policy for a message: the first candidate route's, overridden by the message's
/// `X-Mailroute-Retry-Interval` / `X-Mailroute-Expire`.
pub fn policy_for(route: Option<&CompiledRoute>, meta: &MessageMeta) -> RetryPolicy {
    let rc = route.map(|r| r.retry.clone()).unwrap_or_default();
    let mut p = RetryPolicy {
        interval: Duration::from_secs(rc.interval_secs.max(1)),
        lifetime: Duration::from_secs(rc.lifetime_secs.max(1)),
        backoff: match rc.backoff {
            mailroute_api::route::Backoff::Fixed => retry::Backoff::Fixed,
            mailroute_api::route::Backoff::Exponential => retry::Backoff::Exponential {
                factor: 2.0,
                max_interval: Duration::from_secs(rc.max_interval_secs.max(rc.interval_secs).max(1)),
            },
        },
    };
    if let Some(i) = meta.options.retry_interval_secs {
        p.interval = Duration::from_secs(i.max(1));
        if let retry::Backoff::Exponential { max_interval, .. } = &mut p.backoff {
            *max_interval = (*max_interval).max(p.interval);
        }
    }
    if let Some(exp) = meta.options.expire_at_ms {
        let ms = (exp - meta.received_at_ms).max(1000);
        p.lifetime = Duration::from_millis(ms as u64);
    }
    p
}

/// The decision after all routes were tried for one attempt. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Delivered,
    Bounce { class: bounce::BounceClass },
    Retry { at_ms: i64 },
    Expired,
}

/// What to do after an attempt whose last outcome was `last`: permanent failures bounce,
/// temporary ones retry on `policy` unless the lifetime is over.
pub fn decide(last: &AttemptResult, policy: &RetryPolicy, meta: &MessageMeta, now_ms: i64, attempts: u32) -> Decision {
    if last.is_delivered() {
        return Decision::Delivered;
    }
    if last.is_permanent() {
        let class = last.verdict().map_or(bounce::BounceClass::Other, |v| v.class);
        return Decision::Bounce { class };
    }
    match retry::next_attempt(policy, meta.received_at_ms, now_ms, attempts) {
        Next::RetryAt(at) => Decision::Retry { at_ms: at },
        Next::Expired => Decision::Expired,
    }
}

/// What "no route serves the recipient" counts as: a temporary failure of class `no_route`.
pub fn no_route_outcome(domain: &str) -> AttemptResult {
    AttemptResult::not_tried(
        Verdict::new(Kind::Temporary, bounce::BounceClass::NoRoute),
        format!("4.4.4 No route configured for recipient domain {domain}"),
        Some(EnhancedStatusCode::new(4, 4, 4)),
    )
}

/// What "the message's lifetime ended before this attempt" counts as: a permanent failure of
/// class `expired`.
pub fn expired_outcome() -> AttemptResult {
    AttemptResult::not_tried(Failure::Expired.verdict(), "queue lifetime exceeded", None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::bounce::Reply;
    use crate::outbound::delivery::{Outcome, Stage};

    /// An attempt that ended with `reply` at `stage`.
    fn replied(stage: Stage, reply: Reply) -> AttemptResult {
        let outcome = if reply.is_positive() {
            Outcome::Delivered { reply }
        } else {
            Outcome::Rejected { stage, reply }
        };
        AttemptResult {
            outcome,
            ..AttemptResult::failed(stage, Failure::ConnectionLost, "")
        }
    }

    fn from_reply(reply: Reply) -> AttemptResult {
        replied(Stage::Message, reply)
    }

    fn meta(received: i64) -> MessageMeta {
        MessageMeta::sample("m", received)
    }

    #[test]
    fn decisions_follow_reply_class_and_lifetime() {
        let m = meta(0);
        let p = policy_for(None, &m);
        assert_eq!(p.interval, Duration::from_secs(60));
        assert_eq!(p.lifetime, Duration::from_secs(1800));
        let ok = from_reply(Reply::new(250, "2.0.0 ok"));
        assert_eq!(decide(&ok, &p, &m, 10, 1), Decision::Delivered);
        let temp = from_reply(Reply::new(451, "4.3.0 try later"));
        assert_eq!(decide(&temp, &p, &m, 10_000, 1), Decision::Retry { at_ms: 70_000 });
        assert_eq!(decide(&temp, &p, &m, 1_800_000, 31), Decision::Expired);
        let perm = from_reply(Reply::new(550, "5.1.1 user unknown"));
        assert_eq!(
            decide(&perm, &p, &m, 10, 1),
            Decision::Bounce {
                class: bounce::BounceClass::InvalidRecipient
            }
        );
        let refused = AttemptResult::failed(Stage::Connect, Failure::ConnectionRefused, "refused");
        assert!(matches!(decide(&refused, &p, &m, 10, 1), Decision::Retry { .. }));
        let nx = AttemptResult::failed(Stage::Dns, Failure::DnsNoSuchDomain, "NXDOMAIN");
        assert!(matches!(decide(&nx, &p, &m, 10, 1), Decision::Bounce { .. }));
    }

    #[test]
    fn no_route_is_deferred_until_the_lifetime_ends() {
        let m = meta(0);
        let p = policy_for(None, &m);
        let none = no_route_outcome("d.example");
        assert!(none.is_temporary());
        assert_eq!(decide(&none, &p, &m, 10_000, 1), Decision::Retry { at_ms: 70_000 });
        assert_eq!(decide(&none, &p, &m, 1_800_000, 31), Decision::Expired);
        assert_eq!(none.verdict().map(|v| v.class.as_str()), Some("no_route"));
        assert_eq!(
            none.summary(),
            "4.4.4 No route configured for recipient domain d.example"
        );
        // The status the relay named is what the delivery log records; no text is re-parsed.
        let (code, status, text) = none.log_parts();
        assert_eq!((code, status), (None, Some(EnhancedStatusCode::new(4, 4, 4))));
        assert_eq!(text, none.summary());
        let expired = expired_outcome();
        assert!(expired.is_permanent());
        assert_eq!(expired.summary(), "queue lifetime exceeded");
        assert_eq!(expired.log_parts(), (None, None, "queue lifetime exceeded".into()));
    }

    #[test]
    fn our_credentials_failing_is_retried_not_bounced() {
        let m = meta(0);
        let p = policy_for(None, &m);
        // 535 is permanent for the bounce table; the mail waits for the credentials' fix.
        let auth = replied(Stage::Auth, Reply::new(535, "5.7.8 Authentication credentials invalid"));
        assert_eq!(auth.verdict().map(|v| v.kind), Some(Kind::Permanent));
        assert!(auth.is_temporary());
        assert_eq!(decide(&auth, &p, &m, 10_000, 1), Decision::Retry { at_ms: 70_000 });
        // Also when a server demands AUTH later in the dialogue.
        let required = replied(Stage::MailFrom, Reply::new(530, "5.7.0 Authentication required"));
        assert_eq!(
            required.verdict().map(|v| v.class),
            Some(bounce::BounceClass::AuthFailure)
        );
        assert!(matches!(decide(&required, &p, &m, 10_000, 1), Decision::Retry { .. }));
        // The reply it came from is kept as parsed.
        assert_eq!(
            auth.reply().and_then(|r| r.enhanced),
            Some(EnhancedStatusCode::new(5, 7, 8))
        );
    }

    #[test]
    fn message_headers_override_the_route_policy() {
        let mut m = meta(1_000);
        m.options.retry_interval_secs = Some(5);
        m.options.expire_at_ms = Some(1_000 + 120_000);
        let p = policy_for(None, &m);
        assert_eq!(p.interval, Duration::from_secs(5));
        assert_eq!(p.lifetime, Duration::from_secs(120));
        let temp = from_reply(Reply::new(421, "4.7.0 busy"));
        assert_eq!(decide(&temp, &p, &m, 2_000, 1), Decision::Retry { at_ms: 7_000 });
        assert_eq!(decide(&temp, &p, &m, 121_000, 9), Decision::Expired);
    }
}
