//! The relay's side of the admin API ([`crate::admin::AdminBackend`]): message state and
//! cancellation from the queue (and the `cancelled` log records of a cancel), quota usage from
//! the quota engine, the suppression lists (`crate::suppress`), bulk queue control (handed to
//! [`crate::control::Control`]), readiness, and the queue and quota gauges refreshed for scrapes (in the background of one, see `admin::metrics`). Thin: every answer comes from the module that owns it.

use std::sync::Arc;

use async_trait::async_trait;

use crate::admin::{AdminBackend, CancelResult, QuotaReport};
use crate::config::ConfigHandle;
use crate::inbound::quota::QuotaEngine;
use crate::observe::dlog::{DeliveryLog, EventResult};
use crate::observe::metrics::Metrics;
use crate::observe::telemetry::event_for;
use crate::queue::{CancelOutcome, Queue};

pub struct RelayBackend {
    pub queue: Arc<dyn Queue>,
    pub config: Arc<ConfigHandle>,
    pub quotas: QuotaEngine,
    pub metrics: Arc<Metrics>,
    /// For the `cancelled` records of a cancel.
    pub dlog: DeliveryLog,
    /// The suppression lists (none with the memory queue).
    pub suppress: Option<Arc<crate::suppress::Suppressions>>,
    /// Bulk queue control.
    pub control: Arc<crate::control::Control>,
}

#[async_trait]
impl AdminBackend for RelayBackend {
    fn suppressions(&self) -> Option<Arc<crate::suppress::Suppressions>> {
        self.suppress.clone()
    }

    async fn ready(&self) -> Result<(), String> {
        self.queue.ping().await.map_err(|e| format!("queue unreachable: {e}"))?;
        if self.config.get().generation == 0 {
            return Err("no configuration loaded".into());
        }
        Ok(())
    }

    async fn message(&self, id: &str) -> anyhow::Result<Option<serde_json::Value>> {
        Ok(match self.queue.view(id).await? {
            Some(v) => Some(serde_json::to_value(v)?),
            None => None,
        })
    }

    async fn cancel(&self, id: &str) -> anyhow::Result<CancelResult> {
        let Some(view) = self.queue.view(id).await? else {
            return Ok(CancelResult::NotFound);
        };
        if view.cancelled {
            return Ok(CancelResult::Conflict("already cancelled".into()));
        }
        let (now, in_flight) = match self.queue.cancel(id).await? {
            CancelOutcome::NotFound => return Ok(CancelResult::NotFound),
            CancelOutcome::AlreadyCancelled => return Ok(CancelResult::Conflict("already cancelled".into())),
            CancelOutcome::Cancelled { now, in_flight } => (now, in_flight),
        };
        // The queue already made these final: their records are written before the answer.
        for i in &now {
            let ev = event_for(&view.meta, EventResult::Cancelled, *i as usize);
            if let Err(e) = self.dlog.record(&ev).await {
                tracing::warn!(error = %e, "delivery log store unavailable; record kept on stdout only");
            }
        }
        Ok(CancelResult::Cancelled {
            recipients: now.len(),
            in_flight: in_flight.len(),
        })
    }

    async fn quotas(&self) -> anyhow::Result<Vec<QuotaReport>> {
        let cfg = self.config.get();
        let report = self.quotas.usage_report(&cfg.config, crate::clock::now_ms()).await?;
        Ok(report
            .into_iter()
            .map(|e| QuotaReport {
                id: e.id,
                namespace: e.namespace,
                usage: e.usage,
            })
            .collect())
    }

    fn control(&self) -> Option<Arc<crate::control::Control>> {
        Some(self.control.clone())
    }

    async fn refresh_metrics(&self) -> bool {
        let now = crate::clock::now_ms();
        let mut complete = true;
        match self.queue.stats(now).await {
            Ok(s) => {
                let m = &self.metrics;
                m.queue_ready_jobs.set(s.ready as i64);
                m.queue_inflight_jobs.set(s.inflight as i64);
                m.queue_scheduled_jobs.set(s.scheduled as i64);
                m.queue_held_jobs.set(s.held as i64);
                m.queue_messages.set(s.messages as i64);
                m.queue_oldest_age_seconds.set(s.oldest_age_ms as f64 / 1000.0);
            }
            Err(e) => {
                complete = false;
                tracing::warn!(error = %e, "reading queue statistics failed");
            }
        }
        let cfg = self.config.get();
        match self.quotas.usage_report(&cfg.config, now).await {
            Ok(report) => {
                for e in report {
                    let (id, usage) = (e.id, e.usage);
                    // The namespace counted: a namespace quota's, else the quota's own.
                    let namespace = e
                        .namespace
                        .unwrap_or_else(|| id.split_once('/').map_or("-", |(ns, _)| ns).to_string());
                    let periods = [
                        ("minute", usage.minute),
                        ("hour", usage.hour),
                        ("day", usage.day),
                        ("month", usage.month),
                    ];
                    for (period, u) in periods {
                        if let Some(u) = u {
                            let labels = [id.as_str(), period, namespace.as_str()];
                            self.metrics.quota_usage.with_label_values(&labels).set(u.used);
                            self.metrics.quota_limit.with_label_values(&labels).set(u.limit);
                        }
                    }
                }
            }
            Err(e) => {
                complete = false;
                tracing::warn!(error = %e, "reading quota usage failed");
            }
        }
        complete
    }
}
