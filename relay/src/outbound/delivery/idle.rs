//! Idle pooled connections: closing those past the idle timeout, forgetting unused pools,
//! renewing the connection leases of idle connections in the background, and closing them all
//! at shutdown.
//!
//! Must not open connections or send mail.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::pool::Pool;
use super::session::Session;
use super::{Deliverer, Inner, PoolStats, lock};

impl Deliverer {
    /// Pooled connection counts.
    pub fn stats(&self) -> PoolStats {
        let pools = lock(&self.inner.pools);
        PoolStats {
            pools: pools.len(),
            idle: pools.values().map(|p| p.idle_count()).sum(),
            in_use: pools.values().map(|p| p.in_use()).sum(),
        }
    }

    /// Closes idle connections older than the idle timeout now (the background task does this
    /// periodically, and renews the leases of the others) and forgets unused pools.
    pub async fn close_expired(&self) {
        let expired = self.inner.reap();
        for s in expired {
            s.quit().await;
        }
    }

    /// Sends QUIT on every idle connection and frees their connection slots (graceful shutdown).
    /// In-flight attempts finish normally.
    pub async fn close_idle(&self) {
        let sessions: Vec<Session> = lock(&self.inner.pools).values().flat_map(|p| p.drain()).collect();
        futures::future::join_all(sessions.into_iter().map(Session::quit)).await;
    }
}

impl Inner {
    /// Expired idle sessions of every pool; forgets pools unused for a while.
    fn reap(&self) -> Vec<Session> {
        let idle_timeout = self.config.idle_timeout;
        let mut pools = lock(&self.pools);
        let expired: Vec<Session> = pools.values().flat_map(|p| p.reap(idle_timeout)).collect();
        pools.retain(|_, p| Arc::strong_count(p) > 1 || !p.is_unused_for(idle_timeout * 2));
        expired
    }

    /// An idle session of `route_id` holding a lease, from any of its pools.
    pub(super) fn take_leased(&self, route_id: &str) -> Option<Session> {
        let pools = lock(&self.pools);
        pools
            .iter()
            .filter(|(key, _)| key.split('|').next() == Some(route_id))
            .find_map(|(_, p)| p.take_leased())
    }

    /// Idle sessions whose lease is due for renewal, with their pools.
    fn due_leases(&self, now_ms: i64) -> Vec<(Arc<Pool>, Session)> {
        let pools = lock(&self.pools);
        pools
            .values()
            .flat_map(|p| p.take_due(now_ms).into_iter().map(|s| (Arc::clone(p), s)))
            .collect()
    }
}

pub(super) async fn reaper(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        // At least every minute, so idle connections' leases are renewed in time.
        Some(i) => (i.config.idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(60)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let expired = inner.reap();
        let due = inner.due_leases(crate::clock::now_ms());
        drop(inner);
        for s in expired {
            tokio::spawn(s.quit());
        }
        // Idle connections keep their slot: renew before the lease runs out.
        for (pool, mut s) in due {
            if let Some(l) = s.lease.as_mut() {
                l.renew_if_due(crate::clock::now_ms()).await;
            }
            pool.put_back(s);
        }
    }
}
