//! Connects the worker's `Pacing` hook and the deliverer's [`ConnectionGate`] to the shared
//! pacer ([`super::shaping::Pacer`]) and its metrics. When the pacer's store is unreachable the
//! job goes ahead (and a connection opens without a lease): pacing protects upstream limits, and
//! a short Redis outage should not stop delivery outright.

use std::sync::Arc;

use async_trait::async_trait;
use mailroute_api::config::CompiledRoute;

use crate::clock::now_ms;
use crate::observe::metrics::Metrics;
use crate::outbound::bounce::Reply;
use crate::outbound::delivery::{Admission, ConnectionGate, Lease, Slot};
use crate::outbound::shaping::{BackoffChange, Connect, ConnectionPermit, Pace, Pacer};
use crate::outbound::worker::{PaceDecision, Pacing};

/// A lease whose renewal failed is tried again after this long (at most a quarter lease).
pub const RENEW_RETRY_MS: i64 = 5_000;

/// Up to a quarter second, so jobs told the same instant do not all wake together.
fn jitter_ms() -> i64 {
    (uuid::Uuid::new_v4().as_u128() % 250) as i64
}

/// When to renew a connection lease next: halfway through a renewed (or new) lease; after a
/// failed renewal soon, well before the old lease runs out. Always after `now_ms`.
pub fn next_renewal(renewed: bool, expires_ms: i64, lease_ms: i64, now_ms: i64) -> i64 {
    let at = if renewed {
        expires_ms - lease_ms / 2
    } else {
        now_ms + RENEW_RETRY_MS.min(lease_ms / 4)
    };
    at.max(now_ms + 1)
}

pub struct SharedPacing {
    pub pacer: Pacer,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl Pacing for SharedPacing {
    async fn acquire(&self, route: &CompiledRoute, rcpt_domain: &str, now_ms: i64) -> PaceDecision {
        match self.pacer.acquire(route, rcpt_domain, 1, now_ms).await {
            Ok(Pace::Go) => PaceDecision::Go,
            Ok(Pace::NotBefore { at_ms, reason }) => PaceDecision::Wait {
                at_ms: at_ms + jitter_ms(),
                reason: reason.as_str(),
            },
            Err(e) => {
                tracing::warn!(route = %route.id, error = %e, "pacing store unavailable; sending unpaced");
                PaceDecision::Go
            }
        }
    }

    async fn report(&self, route: &CompiledRoute, rcpt_domain: &str, reply: Option<&Reply>, now_ms: i64) {
        // No reply: neutral for back-off.
        match self.pacer.report(route, rcpt_domain, reply, now_ms).await {
            Ok(BackoffChange::Started { until_ms, level }) => {
                self.metrics.route_backoff_active.with_label_values(&[&route.id]).set(1);
                tracing::warn!(route = %route.id, until_ms, level, "upstream rate-limits us: backing off");
            }
            Ok(BackoffChange::Cleared) => self.metrics.route_backoff_active.with_label_values(&[&route.id]).set(0),
            Ok(BackoffChange::Unchanged) => {}
            Err(e) => tracing::warn!(route = %route.id, error = %e, "pacing store unavailable"),
        }
    }
}

/// The deliverer's gate for one attempt through `route` to `rcpt_domain`: a new connection first
/// takes a lease from [`Pacer::connect`] (granted without I/O when no `maxConnections` applies)
/// and holds it until it closes; no free slot means no connection and a wait.
pub struct ConnectionSlots<'a> {
    pub pacer: &'a Pacer,
    pub route: &'a CompiledRoute,
    pub rcpt_domain: &'a str,
}

#[async_trait]
impl ConnectionGate for ConnectionSlots<'_> {
    async fn admit(&self) -> Admission {
        let now = now_ms();
        match self.pacer.connect(self.route, self.rcpt_domain, now).await {
            Ok(Connect::Granted(permit)) if !permit.is_limited() => Admission::Open(None),
            Ok(Connect::Granted(permit)) => {
                let slot = PacerSlot {
                    renew_at_ms: next_renewal(true, permit.expires_ms, self.pacer.lease_ms(), now),
                    pacer: self.pacer.clone(),
                    permit,
                    route: self.route.id.clone(),
                };
                Admission::Open(Some(Lease::new(Box::new(slot))))
            }
            Ok(Connect::NotBefore { at_ms }) => {
                tracing::debug!(route = %self.route.id, at_ms, "every connection slot is taken");
                Admission::Wait {
                    at_ms: at_ms + jitter_ms(),
                }
            }
            Err(e) => {
                tracing::warn!(route = %self.route.id, error = %e, "pacing store unavailable; connecting without a lease");
                Admission::Open(None)
            }
        }
    }
}

/// A granted lease as the deliverer holds it.
struct PacerSlot {
    pacer: Pacer,
    permit: ConnectionPermit,
    renew_at_ms: i64,
    route: String,
}

#[async_trait]
impl Slot for PacerSlot {
    fn renew_at_ms(&self) -> i64 {
        self.renew_at_ms
    }

    async fn renew(&mut self, now_ms: i64) {
        let renewed = match self.pacer.renew(&mut self.permit, now_ms).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(route = %self.route, error = %e, "renewing a connection lease failed; retrying soon");
                false
            }
        };
        self.renew_at_ms = next_renewal(renewed, self.permit.expires_ms, self.pacer.lease_ms(), now_ms);
    }

    async fn release(self: Box<Self>) {
        let PacerSlot {
            pacer, permit, route, ..
        } = *self;
        if let Err(e) = pacer.disconnect(permit).await {
            // It expires by itself.
            tracing::warn!(route = %route, error = %e, "releasing a connection lease failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use mailroute_api::config::RouteLimits;

    use super::*;
    use crate::outbound::shaping::limits::tests::route;
    use crate::outbound::shaping::store::CountingPaceStore;

    fn one_connection() -> CompiledRoute {
        route(
            "mail/rental",
            false,
            RouteLimits {
                max_connections: Some(1),
                ..Default::default()
            },
        )
    }

    #[test]
    fn renewals_come_halfway_or_soon_after_a_failure() {
        // Renewed at 1,000 for 600,000 ms: next at the half.
        assert_eq!(next_renewal(true, 601_000, 600_000, 1_000), 301_000);
        assert_eq!(next_renewal(false, 601_000, 600_000, 1_000), 1_000 + RENEW_RETRY_MS);
        // Short leases retry within a quarter; never at or before now.
        assert_eq!(next_renewal(false, 1_100, 100, 1_000), 1_025);
        assert_eq!(next_renewal(true, 1_001, 1, 1_000), 1_001);
        assert_eq!(next_renewal(false, 1_000, 0, 1_000), 1_001);
    }

    #[tokio::test]
    async fn a_slot_is_held_until_released_and_renewed_on_time() {
        let store = Arc::new(CountingPaceStore::default());
        let pacer = Pacer::new(store.clone()).with_lease_ms(60_000);
        let r = one_connection();
        let gate = ConnectionSlots {
            pacer: &pacer,
            route: &r,
            rcpt_domain: "example.com",
        };
        let Admission::Open(Some(mut lease)) = gate.admit().await else {
            panic!("the first connection gets a lease")
        };
        let before = now_ms();
        assert!(lease.renew_at_ms() > before + 20_000 && lease.renew_at_ms() <= before + 30_000);
        let Admission::Wait { at_ms } = gate.admit().await else {
            panic!("the second connection must wait")
        };
        assert!(
            (before + 2_000..before + 2_000 + 250 + 1_000).contains(&at_ms),
            "{at_ms}"
        );
        // Not due yet: no I/O; due: renewed for another lease.
        let calls = store.calls();
        assert!(!lease.renew_if_due(before).await);
        assert_eq!(store.calls(), calls);
        let due = lease.renew_at_ms();
        assert!(lease.renew_if_due(due).await);
        assert_eq!(store.calls(), calls + 1);
        assert_eq!(lease.renew_at_ms(), due + 30_000);
        // A failed renewal is retried soon, not after half a lease.
        store.down.store(true, Ordering::SeqCst);
        let due = lease.renew_at_ms();
        assert!(lease.renew_if_due(due).await);
        assert_eq!(lease.renew_at_ms(), due + RENEW_RETRY_MS);
        store.down.store(false, Ordering::SeqCst);
        lease.release().await;
        let Admission::Open(Some(lease)) = gate.admit().await else {
            panic!("the released slot is free again")
        };
        // Dropped without release (a session that died): freed in the background.
        drop(lease);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match gate.admit().await {
                Admission::Open(Some(l)) => {
                    l.release().await;
                    break;
                }
                _ => assert!(
                    tokio::time::Instant::now() < deadline,
                    "a dropped lease was never released"
                ),
            }
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn no_limit_no_io_and_an_unreachable_store_lets_connections_open() {
        let store = Arc::new(CountingPaceStore::default());
        let pacer = Pacer::new(store.clone());
        let free = route("mail/free", false, RouteLimits::default());
        let gate = ConnectionSlots {
            pacer: &pacer,
            route: &free,
            rcpt_domain: "example.com",
        };
        for _ in 0..3 {
            assert!(matches!(gate.admit().await, Admission::Open(None)));
        }
        assert_eq!(store.calls(), 0, "no maxConnections: no store calls");
        // Carrier defaults apply to MX delivery without any route limit.
        let mx = route("mail/mx", true, RouteLimits::default());
        let carrier = ConnectionSlots {
            pacer: &pacer,
            route: &mx,
            rcpt_domain: "docomo.ne.jp",
        };
        let Admission::Open(Some(l)) = carrier.admit().await else {
            panic!("carrier connections are leased")
        };
        l.release().await;
        store.down.store(true, Ordering::SeqCst);
        let r = one_connection();
        let gate = ConnectionSlots {
            pacer: &pacer,
            route: &r,
            rcpt_domain: "example.com",
        };
        assert!(matches!(gate.admit().await, Admission::Open(None)));
    }
}
