//! Outbound traffic shaping shared by all relay pods: a route's upstream limits (messages per
//! minute, recipients per day, concurrent connections), per-destination-domain limits (the
//! route's `perDestination`, built-in defaults for mobile carriers on MX routes) and automatic
//! back-off after rate-limit replies. Over a limit a job is paced, never failed: [`Pacer`]
//! answers "go now" or "not before T" and the worker puts the job back in the schedule for T.
//!
//! This module owns the pacing decision and its shared state (through a [`PaceStore`]). It must
//! not deliver, touch the queue or export metrics; labels come from [`PaceReason::as_str`].
//!
//! # Limits
//! - Route `messagesPerMinute` and destination `messagesPerMinute`: GCRA without burst, one
//!   message every 60/N seconds, so no 60-second interval carries more than N.
//! - Route `recipientsPerDay`: rolling 24 hours (hourly buckets; a recipient counts for 24 to 25
//!   hours), which never exceeds a calendar-day limit either. A message with more recipients
//!   than the whole limit goes alone once nothing else counts.
//! - Back-off: a reply classed `rate_limited` (`421`, `450 4.7.x`, `451 4.7.x`, provider
//!   throttling; the class the delivery log shows, see [`super::bounce`]) stops a smarthost
//!   route (an MX route: only that destination domain) for 1 minute, doubling per repeated
//!   reply up to 15 minutes; a success clears it.
//! - `maxConnections` (route and destination): counts the open connections of all pods
//!   together. Each new connection first takes a lease ([`Pacer::connect`]) in a Redis sorted
//!   set, holds it while open (idle in a pool included), renews it halfway through
//!   [`DEFAULT_LEASE_MS`] and gives it back when it closes; a crashed pod's leases expire by
//!   themselves. No free slot: the job waits (reason `connections`). The relay side is
//!   `crate::outbound::pacing::ConnectionSlots`.

pub(crate) mod backoff;
pub(crate) mod gcra;
pub(crate) mod limits;
pub(crate) mod recheck;
pub(crate) mod store;

use std::sync::Arc;

use mailroute_api::config::CompiledRoute;

use crate::outbound::bounce::Reply;
pub use backoff::{BackoffPolicy, BackoffState, Signal, signal};
pub use gcra::Gcra;
pub use limits::{CARRIER_DOMAINS, CARRIER_LIMITS, DestinationSource, DestinationValues, Shaping};
pub use store::{ConnRequest, MemoryPaceStore, PaceError, PaceRequest, PaceStore, RedisPaceStore};

/// A connection lease lasts this long unless renewed (longer than any single SMTP transaction).
pub const DEFAULT_LEASE_MS: i64 = 10 * 60_000;
/// When every connection slot is taken, try again after at most this long.
pub const CONNECTION_RETRY_MS: i64 = 2_000;

/// Why a job waits (label of `mailroute_paced_jobs_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PaceReason {
    RouteRate,
    RouteDaily,
    Destination,
    Backoff,
    Connections,
}

impl PaceReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RouteRate => "route_rate",
            Self::RouteDaily => "route_daily",
            Self::Destination => "destination",
            Self::Backoff => "backoff",
            Self::Connections => "connections",
        }
    }
}

/// Whether a message may go out now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Go now; the message has been counted against every limit.
    Go,
    /// Put the job back in the schedule for `at_ms` (ms since the epoch); nothing was counted.
    NotBefore { at_ms: i64, reason: PaceReason },
}

/// A granted connection slot; give it back with [`Pacer::disconnect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionPermit {
    id: String,
    keys: Vec<String>,
    /// When the lease runs out unless renewed.
    pub expires_ms: i64,
    /// Close the connection after this many messages (the stricter of route and destination).
    pub messages_per_connection: Option<u32>,
}

impl ConnectionPermit {
    /// Whether a `maxConnections` applies, i.e. the permit holds a lease that must be renewed
    /// and given back (otherwise it was granted without I/O).
    pub fn is_limited(&self) -> bool {
        !self.keys.is_empty()
    }
}

/// The answer of [`Pacer::connect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connect {
    Granted(ConnectionPermit),
    /// Every slot is taken: try again at `at_ms` (reason `connections`).
    NotBefore {
        at_ms: i64,
    },
}

/// What a reported attempt changed (for `mailroute_route_backoff_active` and the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackoffChange {
    Unchanged,
    /// A back-off started: nothing goes to the scope before `until_ms`.
    Started {
        until_ms: i64,
        level: u32,
    },
    /// A success ended a back-off (or forgot a remembered one).
    Cleared,
}

/// Pacing decisions over a shared store.
#[derive(Clone)]
pub struct Pacer {
    store: Arc<dyn PaceStore>,
    backoff: BackoffPolicy,
    lease_ms: i64,
    clear: Arc<recheck::ClearScopes>,
}

impl Pacer {
    pub fn new(store: Arc<dyn PaceStore>) -> Self {
        Pacer {
            store,
            backoff: BackoffPolicy::default(),
            lease_ms: DEFAULT_LEASE_MS,
            clear: Arc::new(recheck::ClearScopes::new(recheck::DEFAULT_RECHECK_MS)),
        }
    }

    /// How long a scope known free of back-off is trusted without asking the store (0: always
    /// ask; pods then see each other's back-offs at once, at a round trip per message).
    pub fn with_backoff_recheck_ms(mut self, ms: i64) -> Self {
        self.clear = Arc::new(recheck::ClearScopes::new(ms));
        self
    }

    pub fn with_backoff(mut self, policy: BackoffPolicy) -> Self {
        self.backoff = policy;
        self
    }

    pub fn with_lease_ms(mut self, lease_ms: i64) -> Self {
        self.lease_ms = lease_ms;
        self
    }

    /// How long a connection lease lasts unless renewed.
    pub fn lease_ms(&self) -> i64 {
        self.lease_ms
    }

    /// The request `acquire` sends to the store (pure; exposed for tests and diagnostics).
    pub fn request(route: &CompiledRoute, rcpt_domain: &str, recipients: u32) -> PaceRequest {
        let s = Shaping::resolve(route, rcpt_domain);
        PaceRequest {
            backoff_key: format!("pace:backoff:{}", s.backoff_scope()),
            route_rate: s.route_rate.map(|g| (format!("pace:route:{}:rate", s.route_id), g)),
            route_daily: s
                .route_recipients_per_day
                .map(|m| (format!("pace:route:{}:rcpt24h", s.route_id), u64::from(m))),
            destination_rate: s
                .destination_rate()
                .map(|g| (format!("pace:dest:{}:rate", s.destination_scope()), g)),
            recipients: u64::from(recipients),
        }
    }

    /// Before sending one message with `recipients` recipients in `rcpt_domain` through
    /// `route`: `Go` (counted; send it now) or `NotBefore` (reschedule the job for that instant
    /// without counting an attempt). One round trip; no limits configured means no I/O except
    /// the back-off check, and none at all while the scope is known clear (see `recheck`).
    pub async fn acquire(
        &self,
        route: &CompiledRoute,
        rcpt_domain: &str,
        recipients: u32,
        now_ms: i64,
    ) -> Result<Pace, PaceError> {
        let req = Self::request(route, rcpt_domain, recipients);
        let unlimited = req.route_rate.is_none() && req.route_daily.is_none() && req.destination_rate.is_none();
        if unlimited && self.clear.is_clear(&req.backoff_key, now_ms) {
            return Ok(Pace::Go);
        }
        self.store.acquire(&req, now_ms).await
    }

    /// After every attempt through `route` to `rcpt_domain`: the reply that ended it (the `250`
    /// after `DATA` on success, else the first failing reply; a failure without a reply is
    /// neutral). Rate-limit replies start a back-off, a success clears it.
    pub async fn report(
        &self,
        route: &CompiledRoute,
        rcpt_domain: &str,
        reply: Option<&Reply>,
        now_ms: i64,
    ) -> Result<BackoffChange, PaceError> {
        let key = format!("pace:backoff:{}", Shaping::resolve(route, rcpt_domain).backoff_scope());
        match signal(reply) {
            Signal::Neutral => Ok(BackoffChange::Unchanged),
            Signal::Success if self.clear.is_clear(&key, now_ms) => Ok(BackoffChange::Unchanged),
            Signal::Success => {
                let existed = self.store.clear_backoff(&key).await?;
                self.clear.mark_clear(&key, now_ms);
                Ok(if existed {
                    BackoffChange::Cleared
                } else {
                    BackoffChange::Unchanged
                })
            }
            Signal::RateLimited => {
                self.clear.forget(&key);
                Ok(match self.store.rate_limited(&key, self.backoff, now_ms).await? {
                    Some(s) => BackoffChange::Started {
                        until_ms: s.until_ms,
                        level: s.level,
                    },
                    None => BackoffChange::Unchanged,
                })
            }
        }
    }

    /// The active back-off for `route` and `rcpt_domain`, if any.
    pub async fn backoff(
        &self,
        route: &CompiledRoute,
        rcpt_domain: &str,
        now_ms: i64,
    ) -> Result<Option<BackoffState>, PaceError> {
        let key = format!("pace:backoff:{}", Shaping::resolve(route, rcpt_domain).backoff_scope());
        self.store.backoff(&key, now_ms).await
    }

    /// Before opening a connection through `route` for `rcpt_domain`: a slot under the route's
    /// and the destination's `maxConnections` (granted without I/O when neither is set).
    pub async fn connect(&self, route: &CompiledRoute, rcpt_domain: &str, now_ms: i64) -> Result<Connect, PaceError> {
        let s = Shaping::resolve(route, rcpt_domain);
        let mut sets = Vec::new();
        if let Some(m) = s.route_max_connections {
            sets.push((format!("pace:conn:route:{}", s.route_id), m));
        }
        if let Some(m) = s.destination.max_connections {
            sets.push((format!("pace:conn:dest:{}", s.destination_scope()), m));
        }
        let permit = ConnectionPermit {
            id: uuid::Uuid::new_v4().to_string(),
            keys: sets.iter().map(|(k, _)| k.clone()).collect(),
            expires_ms: now_ms + self.lease_ms,
            messages_per_connection: s.messages_per_connection(route),
        };
        if sets.is_empty() {
            return Ok(Connect::Granted(permit));
        }
        let req = ConnRequest {
            sets,
            permit_id: permit.id.clone(),
            expires_ms: permit.expires_ms,
            retry_ms: CONNECTION_RETRY_MS,
        };
        Ok(match self.store.connect(&req, now_ms).await? {
            None => Connect::Granted(permit),
            Some(at_ms) => Connect::NotBefore { at_ms },
        })
    }

    /// Keeps a connection slot beyond its lease (call while a connection stays open longer).
    pub async fn renew(&self, permit: &mut ConnectionPermit, now_ms: i64) -> Result<(), PaceError> {
        permit.expires_ms = now_ms + self.lease_ms;
        self.store
            .renew(&permit.keys, &permit.id, permit.expires_ms, now_ms)
            .await
    }

    /// The connection is closed: free its slot.
    pub async fn disconnect(&self, permit: ConnectionPermit) -> Result<(), PaceError> {
        self.store.disconnect(&permit.keys, &permit.id).await
    }
}

#[cfg(test)]
mod tests {
    use mailroute_api::config::RouteLimits;

    use super::limits::tests::route;
    use super::*;

    fn pacer() -> Pacer {
        Pacer::new(Arc::new(MemoryPaceStore::new()))
    }

    fn limits(mpm: Option<u32>, rpd: Option<u32>, conns: Option<u32>) -> RouteLimits {
        RouteLimits {
            messages_per_minute: mpm,
            recipients_per_day: rpd,
            max_connections: conns,
            ..Default::default()
        }
    }

    #[test]
    fn request_keys() {
        let r = route("mail/o365", false, limits(Some(30), Some(10_000), None));
        let req = Pacer::request(&r, "Example.COM", 3);
        assert_eq!(req.backoff_key, "pace:backoff:route:mail/o365");
        assert_eq!(
            req.route_rate,
            Some(("pace:route:mail/o365:rate".into(), Gcra::per_minute(30)))
        );
        assert_eq!(req.route_daily, Some(("pace:route:mail/o365:rcpt24h".into(), 10_000)));
        assert_eq!(req.destination_rate, None);
        assert_eq!(req.recipients, 3);
        let mx = route("mail/mx", true, RouteLimits::default());
        let req = Pacer::request(&mx, "ezweb.ne.jp", 1);
        assert_eq!(req.backoff_key, "pace:backoff:mx:ezweb.ne.jp");
        assert_eq!(
            req.destination_rate,
            Some(("pace:dest:mx:ezweb.ne.jp:rate".into(), Gcra::per_minute(60)))
        );
    }

    #[tokio::test]
    async fn route_rate_then_daily_recipients() {
        let p = pacer();
        let r = route("mail/o365", false, limits(Some(30), Some(5), None));
        assert_eq!(p.acquire(&r, "a.example", 2, 0).await.unwrap(), Pace::Go);
        assert_eq!(
            p.acquire(&r, "a.example", 2, 500).await.unwrap(),
            Pace::NotBefore {
                at_ms: 2_000,
                reason: PaceReason::RouteRate
            }
        );
        assert_eq!(p.acquire(&r, "a.example", 2, 2_000).await.unwrap(), Pace::Go);
        // 4 of 5 recipients used: 2 more would exceed until the first hour bucket is 25 h old.
        assert_eq!(
            p.acquire(&r, "a.example", 2, 4_000).await.unwrap(),
            Pace::NotBefore {
                at_ms: 25 * 3_600_000,
                reason: PaceReason::RouteDaily
            }
        );
        assert_eq!(p.acquire(&r, "a.example", 1, 4_000).await.unwrap(), Pace::Go);
    }

    #[tokio::test]
    async fn backoff_after_421_cleared_by_success() {
        let p = pacer();
        let r = route("mail/o365", false, RouteLimits::default());
        let busy = Reply::new(421, "4.7.0 Too many connections, slow down");
        assert_eq!(
            p.report(&r, "a.example", Some(&busy), 1_000).await.unwrap(),
            BackoffChange::Started {
                until_ms: 61_000,
                level: 1
            }
        );
        // Another in-flight attempt answered the same: no escalation.
        assert_eq!(
            p.report(&r, "b.example", Some(&busy), 2_000).await.unwrap(),
            BackoffChange::Unchanged
        );
        assert_eq!(
            p.acquire(&r, "c.example", 1, 30_000).await.unwrap(),
            Pace::NotBefore {
                at_ms: 61_000,
                reason: PaceReason::Backoff
            }
        );
        assert_eq!(p.acquire(&r, "c.example", 1, 61_000).await.unwrap(), Pace::Go);
        // Again after it ended: doubled.
        assert_eq!(
            p.report(&r, "a.example", Some(&busy), 62_000).await.unwrap(),
            BackoffChange::Started {
                until_ms: 182_000,
                level: 2
            }
        );
        let ok = Reply::new(250, "2.0.0 OK");
        assert_eq!(
            p.report(&r, "a.example", Some(&ok), 70_000).await.unwrap(),
            BackoffChange::Cleared
        );
        assert_eq!(p.backoff(&r, "a.example", 70_000).await.unwrap(), None);
        assert_eq!(p.acquire(&r, "a.example", 1, 70_000).await.unwrap(), Pace::Go);
        assert_eq!(
            p.report(&r, "a.example", Some(&ok), 71_000).await.unwrap(),
            BackoffChange::Unchanged
        );
        // After a success the next rate limit starts over at one minute.
        assert_eq!(
            p.report(&r, "a.example", Some(&busy), 72_000).await.unwrap(),
            BackoffChange::Started {
                until_ms: 132_000,
                level: 1
            }
        );
    }

    #[tokio::test]
    async fn unlimited_route_known_clear_costs_no_store_calls_and_sees_other_pods_within_the_window() {
        let store = Arc::new(store::CountingPaceStore::default());
        let here = Pacer::new(store.clone());
        let other_pod = Pacer::new(store.clone());
        let r = route("mail/relay", false, RouteLimits::default());
        let ok = Reply::new(250, "2.0.0 OK");
        let busy = Reply::new(421, "4.7.0 slow down");

        assert_eq!(here.acquire(&r, "a.example", 1, 0).await.unwrap(), Pace::Go);
        here.report(&r, "a.example", Some(&ok), 10).await.unwrap();
        assert_eq!(store.calls(), 2, "first message: the back-off check and the clear");
        for t in 20..120 {
            assert_eq!(here.acquire(&r, "a.example", 1, t).await.unwrap(), Pace::Go);
            here.report(&r, "a.example", Some(&ok), t).await.unwrap();
        }
        assert_eq!(store.calls(), 2, "known clear: no store call for 100 messages");

        // Another pod is told to slow down: seen here once the window has passed.
        other_pod.report(&r, "a.example", Some(&busy), 200).await.unwrap();
        assert_eq!(
            here.acquire(&r, "a.example", 1, 500).await.unwrap(),
            Pace::Go,
            "inside the window"
        );
        assert!(matches!(
            here.acquire(&r, "a.example", 1, 1_010).await.unwrap(),
            Pace::NotBefore {
                reason: PaceReason::Backoff,
                ..
            }
        ));

        // A rate limit seen here counts at once, inside any window.
        let fresh = Pacer::new(store.clone());
        let other = route("mail/other", false, RouteLimits::default());
        fresh.report(&other, "a.example", Some(&ok), 0).await.unwrap();
        fresh.report(&other, "a.example", Some(&busy), 1).await.unwrap();
        assert!(matches!(
            fresh.acquire(&other, "a.example", 1, 2).await.unwrap(),
            Pace::NotBefore {
                reason: PaceReason::Backoff,
                ..
            }
        ));

        // Routes with rate limits always ask the store.
        let limited = route("mail/o365", false, limits(Some(6_000), None, None));
        let before = store.calls();
        fresh.report(&limited, "a.example", Some(&ok), 0).await.unwrap();
        fresh.acquire(&limited, "a.example", 1, 1).await.unwrap();
        fresh.acquire(&limited, "a.example", 1, 100).await.unwrap();
        assert_eq!(store.calls() - before, 3);
    }

    #[tokio::test]
    async fn mx_backoff_is_per_domain() {
        let p = pacer();
        let r = route("mail/mx", true, RouteLimits::default());
        let busy = Reply::new(451, "4.7.1 Rate limited");
        p.report(&r, "slow.example", Some(&busy), 0).await.unwrap();
        assert!(matches!(
            p.acquire(&r, "slow.example", 1, 1).await.unwrap(),
            Pace::NotBefore {
                reason: PaceReason::Backoff,
                ..
            }
        ));
        assert_eq!(p.acquire(&r, "fast.example", 1, 1).await.unwrap(), Pace::Go);
    }

    #[tokio::test]
    async fn connection_slots() {
        let p = pacer().with_lease_ms(30_000);
        let r = route("mail/rental", false, limits(None, None, Some(2)));
        let Connect::Granted(a) = p.connect(&r, "x.example", 0).await.unwrap() else {
            panic!()
        };
        let Connect::Granted(mut b) = p.connect(&r, "y.example", 0).await.unwrap() else {
            panic!()
        };
        assert_eq!(
            p.connect(&r, "z.example", 100).await.unwrap(),
            Connect::NotBefore {
                at_ms: 100 + CONNECTION_RETRY_MS
            }
        );
        p.disconnect(a).await.unwrap();
        let Connect::Granted(c) = p.connect(&r, "z.example", 200).await.unwrap() else {
            panic!()
        };
        // b is renewed, c's lease runs out: a slot frees up without disconnect.
        p.renew(&mut b, 20_000).await.unwrap();
        assert!(matches!(
            p.connect(&r, "w.example", 29_000).await.unwrap(),
            Connect::NotBefore { .. }
        ));
        assert!(matches!(
            p.connect(&r, "w.example", 30_200).await.unwrap(),
            Connect::Granted(_)
        ));
        drop(c);
        // No limits: granted without state.
        let free = route("mail/free", false, RouteLimits::default());
        for _ in 0..10 {
            assert!(matches!(
                p.connect(&free, "x.example", 0).await.unwrap(),
                Connect::Granted(_)
            ));
        }
        // Carrier defaults on MX: two connections, ten messages per connection.
        let mx = route("mail/mx", true, RouteLimits::default());
        let Connect::Granted(d) = p.connect(&mx, "docomo.ne.jp", 0).await.unwrap() else {
            panic!()
        };
        assert_eq!(d.messages_per_connection, Some(10));
        assert!(matches!(
            p.connect(&mx, "docomo.ne.jp", 0).await.unwrap(),
            Connect::Granted(_)
        ));
        assert!(matches!(
            p.connect(&mx, "docomo.ne.jp", 0).await.unwrap(),
            Connect::NotBefore { .. }
        ));
        assert!(matches!(
            p.connect(&mx, "example.com", 0).await.unwrap(),
            Connect::Granted(_)
        ));
    }
}
