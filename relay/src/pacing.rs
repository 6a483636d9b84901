//! Connects the worker's [`Pacing`] hook to the shared pacer ([`crate::shaping::Pacer`]) and its
//! metrics. When the pacer's store is unreachable the job goes ahead: pacing protects upstream
//! limits, and a short Redis outage should not stop delivery outright.

use std::sync::Arc;

use async_trait::async_trait;
use mailroute_api::config::CompiledRoute;

use crate::bounce::{Failure, Outcome, Reply};
use crate::metrics::Metrics;
use crate::shaping::{BackoffChange, Pace, Pacer};
use crate::worker::{Attempt, AttemptOutcome, Pacing};

pub struct SharedPacing {
    pub pacer: Pacer,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl Pacing for SharedPacing {
    async fn acquire(&self, route: &CompiledRoute, rcpt_domain: &str, now_ms: i64) -> Option<(i64, &'static str)> {
        match self.pacer.acquire(route, rcpt_domain, 1, now_ms).await {
            Ok(Pace::Go) => None,
            Ok(Pace::NotBefore { at_ms, reason }) => {
                // Spread jobs told the same instant so they do not all wake together.
                let jitter = (uuid::Uuid::new_v4().as_u128() % 250) as i64;
                Some((at_ms + jitter, reason.as_str()))
            }
            Err(e) => {
                tracing::warn!(route = %route.id, error = %e, "pacing store unavailable; sending unpaced");
                None
            }
        }
    }

    async fn report(&self, route: &CompiledRoute, attempt: &Attempt, now_ms: i64) {
        let Some(domain) = attempt.rcpt_domain.as_deref() else {
            return;
        };
        let outcome = match &attempt.outcome {
            AttemptOutcome::Delivered { code, text }
            | AttemptOutcome::Failed {
                code: Some(code), text, ..
            } => Outcome::Reply(Reply::new(*code, text)),
            // No reply: neutral for back-off.
            AttemptOutcome::Failed { .. } => Outcome::Failure(Failure::ConnectionLost),
        };
        match self.pacer.report(route, domain, &outcome, now_ms).await {
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
