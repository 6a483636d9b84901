//! Event webhooks (`DeliveryWebhook`): the delivery log's records, pushed to HTTPS endpoints.
//!
//! Two stages, both through Redis so that no event is lost when a relay restarts, is killed or
//! scales down:
//! - [`fanout`]: one relay at a time (a lease) reads the delivery-log stream through the
//!   consumer group `webhooks` and copies each record into the outbox stream of every webhook
//!   that wants it (its namespace's mail only), acknowledging it in the same script;
//! - [`dispatch`]: each webhook is served by one relay at a time (its own lease), which sends
//!   its outbox in order, in signed batches ([`sign`], Standard Webhooks), removing events on a
//!   2xx and retrying with back-off otherwise, and writes the endpoint's health to Redis.
//!
//! Keys (with the queue's prefix, `{mailroute}:` by default): `webhook:fanout:lease`,
//! `webhook:<ns>/<name>:outbox` (at most `maxBacklog` entries: beyond it the oldest are
//! dropped and counted), `webhook:<ns>/<name>:lease`, `webhook:<ns>/<name>:health` (a hash
//! the operator reads for the status; field names in [`health_field`]), `webhook:known` (when
//! each webhook was last configured: the fan-out's holder removes the outbox and health hash of
//! one deleted for longer than the grace, [`DEFAULT_FORGET_AFTER`]).
//!
//! It owns these keys and tasks only. Mail delivery never waits for it: its tasks are separate,
//! use their own Redis connection without blocking commands, and every request is bounded by
//! the webhook's timeout. It must never log or export a signing key.

pub mod dispatch;
pub mod fanout;
mod http;
mod lease;
pub mod sign;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::ConfigHandle;
use crate::redis_client::RedisConn;

/// Default time-to-live of the webhook leases: a killed relay's webhooks are taken over after it.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default wait between looks at an empty stream.
pub const DEFAULT_POLL: Duration = Duration::from_millis(200);
/// Default grace before the keys of a webhook no longer configured are removed: longer than a
/// configuration takes to reach every relay (a ConfigMap update, a rollout).
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(3600);

/// How often the fan-out's holder removes the consumers earlier holders left in the group.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Field names of the health hash `webhook:<id>:health` (the contract with the operator).
pub use mailroute_api::webhook::health as health_field;

/// Redis key names.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.into() }
    }
    pub fn dlog(&self) -> String {
        format!("{}dlog", self.prefix)
    }
    pub fn fanout_lease(&self) -> String {
        format!("{}webhook:fanout:lease", self.prefix)
    }
    pub fn outbox(&self, id: &str) -> String {
        format!("{}webhook:{id}:outbox", self.prefix)
    }
    pub fn lease(&self, id: &str) -> String {
        format!("{}webhook:{id}:lease", self.prefix)
    }
    pub fn health(&self, id: &str) -> String {
        health_field::key(&self.prefix, id)
    }
    /// Hash: webhook id -> when a fan-out holder last had it configured (ms).
    pub fn known(&self) -> String {
        format!("{}webhook:known", self.prefix)
    }
}

/// The webhook metrics; the label is the webhook id (`namespace/name`), bounded by the objects.
#[derive(Clone)]
pub struct WebhookMetrics {
    pub sent: IntCounterVec,
    pub failed: IntCounterVec,
    pub dropped: IntCounterVec,
    pub lag: GaugeVec,
}

impl WebhookMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = WebhookMetrics {
            sent: IntCounterVec::new(
                Opts::new(
                    "mailroute_webhook_events_sent_total",
                    "Events the webhook's endpoint accepted (2xx), by webhook.",
                ),
                &["webhook"],
            )?,
            failed: IntCounterVec::new(
                Opts::new(
                    "mailroute_webhook_failed_attempts_total",
                    "Requests to the webhook's endpoint that failed (no answer or not 2xx), by webhook.",
                ),
                &["webhook"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "mailroute_webhook_events_dropped_total",
                    "Events given up, by webhook and reason (expired: older than maxAge).",
                ),
                &["webhook", "reason"],
            )?,
            lag: GaugeVec::new(
                Opts::new(
                    "mailroute_webhook_lag_seconds",
                    "Age of the oldest event waiting for the webhook's endpoint (exported by the relay sending it).",
                ),
                &["webhook"],
            )?,
        };
        registry.register(Box::new(m.sent.clone()))?;
        registry.register(Box::new(m.failed.clone()))?;
        registry.register(Box::new(m.dropped.clone()))?;
        registry.register(Box::new(m.lag.clone()))?;
        Ok(m)
    }

    /// This relay stopped sending the webhook: its lag is another relay's to export.
    fn forget(&self, id: &str) {
        let _ = self.lag.remove_label_values(&[id]);
    }
}

/// The trust anchors of the system, loaded once.
fn system_roots() -> &'static rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(mailroute_tls::system_roots)
}

/// What every webhook task shares.
pub(crate) struct Shared {
    pub conn: RedisConn,
    pub keys: Keys,
    pub consumer: String,
    pub config: Arc<ConfigHandle>,
    pub metrics: WebhookMetrics,
    pub lease_ttl: Duration,
    pub poll: Duration,
    pub forget_after: Duration,
}

/// The webhook stages' timers (defaults above; tests shorten them).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// A killed relay's leases (fan-out, senders) are taken over after this.
    pub lease_ttl: Duration,
    /// Wait between looks at an empty stream.
    pub poll: Duration,
    /// A webhook no longer configured keeps its outbox and health hash this long.
    pub forget_after: Duration,
}

/// The webhook stages of one relay.
pub struct Webhooks {
    shared: Arc<Shared>,
}

impl Webhooks {
    /// Prepares the stages and creates the consumer group (at the log's end) if missing, so
    /// every record written after this is fanned out.
    pub(crate) async fn start(
        conn: RedisConn,
        prefix: &str,
        consumer: String,
        config: Arc<ConfigHandle>,
        metrics: WebhookMetrics,
        timing: Timing,
    ) -> redis::RedisResult<Self> {
        let Timing {
            lease_ttl,
            poll,
            forget_after,
        } = timing;
        let shared = Arc::new(Shared {
            conn,
            keys: Keys::new(prefix),
            consumer,
            config,
            metrics,
            lease_ttl,
            poll,
            forget_after,
        });
        let w = Webhooks { shared };
        w.fanout().ensure_group().await?;
        Ok(w)
    }

    fn fanout(&self) -> fanout::FanOut {
        let s = &self.shared;
        fanout::FanOut::new(s.conn.clone(), s.keys.clone(), s.consumer.clone(), s.lease_ttl)
    }

    /// Runs the fan-out and one sender per configured webhook until shutdown.
    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let fan = tokio::spawn(run_fanout(self.fanout(), self.shared.clone(), shutdown.clone()));
        let mut senders: HashMap<String, JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            let snap = self.shared.config.get();
            senders.retain(|_, h| !h.is_finished());
            for w in &snap.config.webhooks {
                if !senders.contains_key(&w.id) {
                    let task = dispatch::run(self.shared.clone(), w.id.clone(), shutdown.clone());
                    senders.insert(w.id.clone(), tokio::spawn(task));
                }
            }
        }
        // Each sender gives its lease up on shutdown, so another relay takes over at once.
        for (_, h) in senders {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), fan).await;
    }
}

async fn run_fanout(fan: fanout::FanOut, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut conn = shared.conn.clone();
    let renew_every = shared.lease_ttl / 3;
    let mut held = false;
    let mut renewed = Instant::now() - shared.lease_ttl;
    // Whether the records earlier holders left pending were taken over since we hold the lease.
    let mut claimed = false;
    let mut pruned = Instant::now();
    let mut forgot = Instant::now() - PRUNE_EVERY;
    loop {
        if *shutdown.borrow() {
            break;
        }
        if !held || renewed.elapsed() >= renew_every {
            held = fan.lease.hold(&mut conn).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "webhook fan-out lease: Redis unavailable");
                false
            });
            renewed = Instant::now();
        }
        if !held {
            claimed = false;
            pause(&mut shutdown, renew_every).await;
            continue;
        }
        let webhooks = shared.config.get().config.webhooks.clone();
        if forgot.elapsed() >= PRUNE_EVERY.min(shared.forget_after) {
            forgot = Instant::now();
            let ids: Vec<String> = webhooks.iter().map(|w| w.id.clone()).collect();
            match fan
                .forget_removed(&ids, crate::clock::now_ms(), shared.forget_after)
                .await
            {
                Ok(n) if n > 0 => {
                    tracing::info!(removed = n, "webhook fan-out: removed the outboxes of deleted webhooks")
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "webhook fan-out: removing deleted webhooks' outboxes"),
            }
        }
        if webhooks.is_empty() {
            if let Err(e) = fan.skip_all().await {
                tracing::debug!(error = %e, "webhook fan-out: moving the group");
                let _ = fan.ensure_group().await;
            }
            pause(&mut shutdown, Duration::from_secs(1)).await;
            continue;
        }
        if claimed && pruned.elapsed() >= PRUNE_EVERY {
            pruned = Instant::now();
            match fan.prune_consumers().await {
                Ok(n) if n > 0 => tracing::debug!(removed = n, "webhook fan-out: removed consumers of earlier holders"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "webhook fan-out: removing old consumers"),
            }
        }
        let read = if claimed {
            fan.read_new().await
        } else {
            match fan.claim_pending().await {
                Ok(r) if r.is_empty() => {
                    claimed = true;
                    fan.read_new().await
                }
                r => r,
            }
        };
        let records = match read {
            Ok(r) => r,
            Err(e) => {
                if e.code() == Some("NOGROUP") {
                    let _ = fan.ensure_group().await;
                }
                tracing::warn!(error = %e, "webhook fan-out: reading the delivery log");
                claimed = false;
                pause(&mut shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        if records.is_empty() {
            pause(&mut shutdown, shared.poll).await;
            continue;
        }
        if let Err(e) = fan.deliver(&records, &webhooks).await {
            tracing::warn!(error = %e, "webhook fan-out: copying records to the outboxes");
            // Still pending: taken over again, in order, on the next round.
            claimed = false;
            held = false;
            pause(&mut shutdown, shared.poll).await;
        }
    }
    if held {
        fan.lease.release(&mut conn).await;
    }
}

async fn pause(shutdown: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = shutdown.changed() => {}
        _ = tokio::time::sleep(d) => {}
    }
}
