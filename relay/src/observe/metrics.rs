//! Prometheus metrics of the relay: one [`Metrics`] value owns a private
//! registry holding every relay metric family named in the relay contract,
//! as typed fields the rest of the relay updates directly.
//!
//! This module only defines, registers and encodes metrics (and keeps when the Redis-backed
//! gauges were last read, for their age gauge; the admin API refreshes them). It must not
//! decide what to count (callers do) and must never take a recipient,
//! sender, message id or any secret as a label value: every label here is
//! bounded (listener, route id, quota id, reply code, bounce class, result, and the sender's
//! namespace: one value per namespace, [`UNATTRIBUTED`](crate::observe::dlog::UNATTRIBUTED) for
//! mail of no known namespace). That label is `sender_namespace`, because Prometheus already
//! gives every series the `namespace` of the relay pod it scraped.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Content type of [`Metrics::encode`]'s output, for the `/metrics` response.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of `mailroute_accept_latency_seconds`: 0.5 ms … 1 s.
pub const ACCEPT_LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Buckets of `mailroute_delivery_latency_seconds`: 0.1 s … 2 h.
pub const DELIVERY_LATENCY_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];

/// Every metric family name the relay exports, in contract order.
pub const NAMES: &[&str] = &[
    "mailroute_messages_received_total",
    "mailroute_recipients_received_total",
    "mailroute_delivery_attempts_total",
    "mailroute_retries_total",
    "mailroute_bounces_total",
    "mailroute_expired_total",
    "mailroute_dsn_sent_total",
    "mailroute_dsn_unroutable_total",
    "mailroute_jobs_reclaimed_total",
    "mailroute_queue_ready_jobs",
    "mailroute_queue_scheduled_jobs",
    "mailroute_queue_inflight_jobs",
    "mailroute_queue_messages",
    "mailroute_queue_oldest_age_seconds",
    "mailroute_accept_latency_seconds",
    "mailroute_delivery_latency_seconds",
    "mailroute_smtp_sessions_active",
    "mailroute_smtp_auth_failures_total",
    "mailroute_smtp_auth_checks_in_flight",
    "mailroute_smtp_auth_checks_in_flight_max",
    "mailroute_smtp_auth_refused_total",
    "mailroute_smtp_body_bytes_reserved",
    "mailroute_smtp_body_bytes_reserved_max",
    "mailroute_smtp_body_budget_bytes",
    "mailroute_smtp_body_budget_refused_total",
    "mailroute_config_generation",
    "mailroute_config_info",
    "mailroute_config_reloads_total",
    "mailroute_quota_decisions_total",
    "mailroute_quota_usage",
    "mailroute_quota_limit",
    "mailroute_paced_jobs_total",
    "mailroute_route_backoff_active",
    "mailroute_dlog_events_total",
    "mailroute_redis_gauges_age_seconds",
    "mailroute_queue_held_jobs",
    "mailroute_queue_actions_total",
    "mailroute_queue_action_jobs_total",
];

/// The relay's metrics. Create one per process, share it as `Arc<Metrics>`.
///
/// Label values, in order, are given in each field's doc comment.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `{listener, result, sender_namespace}`: listener = smtp|submission|smtps, result =
    /// accepted|rejected|deferred.
    pub messages_received: IntCounterVec,
    /// `{listener, result}`, one per recipient.
    pub recipients_received: IntCounterVec,
    /// `{route, result, sender_namespace}`: result = delivered|deferred|bounced.
    pub delivery_attempts: IntCounterVec,
    /// `{route}`.
    pub retries: IntCounterVec,
    /// `{route, code, class, sender_namespace}`: code from [`code_label`], class = bounce class name.
    pub bounces: IntCounterVec,
    /// `{route}`.
    pub expired: IntCounterVec,
    pub dsn_sent: IntCounter,
    /// DSNs found without a route (each time one is deferred for it): their senders learn nothing.
    pub dsn_unroutable: IntCounter,
    /// Jobs this relay took over from another one that stopped or stalled.
    pub jobs_reclaimed: IntCounter,
    pub queue_ready_jobs: IntGauge,
    pub queue_scheduled_jobs: IntGauge,
    /// Jobs held by a hold (bulk queue control), refreshed with the other queue gauges.
    pub queue_held_jobs: IntGauge,
    /// `{action}`: bulk queue actions through the admin API (list, cancel, retry, hold,
    /// release).
    pub queue_actions: IntCounterVec,
    /// `{action}`: jobs those actions touched (cancel, retry, hold, release).
    pub queue_action_jobs: IntCounterVec,
    pub queue_inflight_jobs: IntGauge,
    pub queue_messages: IntGauge,
    pub queue_oldest_age_seconds: Gauge,
    /// End of DATA until the 250 reply is sent.
    pub accept_latency: Histogram,
    /// `{route}`: acceptance until delivered.
    pub delivery_latency: HistogramVec,
    /// `{listener}`.
    pub smtp_sessions_active: IntGaugeVec,
    /// `{listener}`.
    pub smtp_auth_failures: IntCounterVec,
    /// Password checks running now (bounded by `--auth-concurrency`).
    pub smtp_auth_checks_in_flight: IntGauge,
    /// The most password checks that ran at once since the start.
    pub smtp_auth_checks_in_flight_max: IntGauge,
    /// `{reason}`: busy (all password-check slots taken) | locked_out (too many failures from
    /// the client's address).
    pub smtp_auth_refused: IntCounterVec,
    /// Bytes of message bodies held by SMTP sessions now (reserved from the body budget).
    pub smtp_body_bytes_reserved: IntGauge,
    /// The most body bytes reserved at once since the start.
    pub smtp_body_bytes_reserved_max: IntGauge,
    /// The body budget (`--max-body-memory`).
    pub smtp_body_budget_bytes: IntGauge,
    /// Messages refused with `452 4.3.1` because the body budget was spent.
    pub smtp_body_budget_refused: IntCounter,
    pub config_generation: IntGauge,
    /// `{hash}` = 1 for the loaded configuration; set it with [`Metrics::set_config_info`].
    pub config_info: IntGaugeVec,
    /// `{result}`: ok|error.
    pub config_reloads: IntCounterVec,
    /// `{quota, result, sender_namespace}`: quota = "ns/name", result = accepted|deferred|rejected.
    pub quota_decisions: IntCounterVec,
    /// `{quota, period, sender_namespace}`: period = minute|hour|day|month; the namespace
    /// counted (a namespace quota's, else the quota's own).
    pub quota_usage: IntGaugeVec,
    /// `{quota, period, sender_namespace}`.
    pub quota_limit: IntGaugeVec,
    /// `{route, reason}`: reason = route_rate|route_daily|destination|backoff|connections.
    pub paced_jobs: IntCounterVec,
    /// `{route}`: 0 or 1.
    pub route_backoff_active: IntGaugeVec,
    /// `{event}`: the delivery log event kind.
    pub dlog_events: IntCounterVec,
    /// Seconds since the Redis-backed gauges (queue, quota) were last read in full; a scrape
    /// never waits long for Redis, so they may be older than the scrape.
    pub redis_gauges_age_seconds: Gauge,
    /// When the Redis-backed gauges were last read in full (ms since the epoch; start-up time
    /// before the first read).
    pub redis_gauges_read_ms: Arc<AtomicI64>,
}

/// Errors building the metric set (only a programming error can cause one).
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Builds and registers every relay metric in a fresh registry.
    pub fn new() -> Self {
        // Names, labels and buckets are constants of this module, so failure
        // here is a bug caught by the unit tests, never a runtime condition.
        Self::try_new().expect("relay metric definitions are valid")
    }

    /// Like [`Metrics::new`], reporting a definition error instead of panicking.
    pub fn try_new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let r = &registry;
        Ok(Metrics {
            messages_received: counter_vec(
                r,
                "mailroute_messages_received_total",
                "Messages received by listener, result and the sender's namespace.",
                &["listener", "result", "sender_namespace"],
            )?,
            recipients_received: counter_vec(
                r,
                "mailroute_recipients_received_total",
                "Recipients received by listener and result.",
                &["listener", "result"],
            )?,
            delivery_attempts: counter_vec(
                r,
                "mailroute_delivery_attempts_total",
                "Delivery attempts by route, result and the sender's namespace.",
                &["route", "result", "sender_namespace"],
            )?,
            retries: counter_vec(
                r,
                "mailroute_retries_total",
                "Deliveries rescheduled for a retry, by route.",
                &["route"],
            )?,
            bounces: counter_vec(
                r,
                "mailroute_bounces_total",
                "Permanent failures by route, reply code, bounce class and the sender's namespace.",
                &["route", "code", "class", "sender_namespace"],
            )?,
            expired: counter_vec(
                r,
                "mailroute_expired_total",
                "Recipients that ran out of queue lifetime, by route.",
                &["route"],
            )?,
            dsn_sent: counter(r, "mailroute_dsn_sent_total", "Delivery status notifications queued.")?,
            dsn_unroutable: counter(
                r,
                "mailroute_dsn_unroutable_total",
                "Delivery attempts of DSNs that found no route (the DSN waits until it expires; its sender learns nothing).",
            )?,
            jobs_reclaimed: counter(
                r,
                "mailroute_jobs_reclaimed_total",
                "Jobs taken over after their relay held them past the visibility timeout (it stopped or stalled).",
            )?,
            queue_ready_jobs: gauge_int(r, "mailroute_queue_ready_jobs", "Jobs ready for delivery.")?,
            queue_scheduled_jobs: gauge_int(
                r,
                "mailroute_queue_scheduled_jobs",
                "Jobs waiting for a retry or a scheduled time.",
            )?,
            queue_held_jobs: gauge_int(
                r,
                "mailroute_queue_held_jobs",
                "Jobs held by a hold: not attempted until released or the hold lapses.",
            )?,
            queue_actions: counter_vec(
                r,
                "mailroute_queue_actions_total",
                "Bulk queue actions through the admin API, by action.",
                &["action"],
            )?,
            queue_action_jobs: counter_vec(
                r,
                "mailroute_queue_action_jobs_total",
                "Jobs touched by bulk queue actions, by action.",
                &["action"],
            )?,
            queue_inflight_jobs: gauge_int(
                r,
                "mailroute_queue_inflight_jobs",
                "Jobs claimed by a relay and not yet acknowledged.",
            )?,
            queue_messages: gauge_int(r, "mailroute_queue_messages", "Messages stored in the queue.")?,
            queue_oldest_age_seconds: {
                let g = Gauge::new(
                    "mailroute_queue_oldest_age_seconds",
                    "Age of the oldest queued message.",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            accept_latency: {
                let h = Histogram::with_opts(
                    HistogramOpts::new("mailroute_accept_latency_seconds", "End of DATA until the 250 reply.")
                        .buckets(ACCEPT_LATENCY_BUCKETS.to_vec()),
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            delivery_latency: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "mailroute_delivery_latency_seconds",
                        "Acceptance until delivered, by route.",
                    )
                    .buckets(DELIVERY_LATENCY_BUCKETS.to_vec()),
                    &["route"],
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            smtp_sessions_active: gauge_vec(
                r,
                "mailroute_smtp_sessions_active",
                "Open SMTP sessions by listener.",
                &["listener"],
            )?,
            smtp_auth_failures: counter_vec(
                r,
                "mailroute_smtp_auth_failures_total",
                "Failed SMTP AUTH attempts by listener.",
                &["listener"],
            )?,
            smtp_auth_checks_in_flight: gauge_int(
                r,
                "mailroute_smtp_auth_checks_in_flight",
                "SMTP AUTH password checks running now.",
            )?,
            smtp_auth_checks_in_flight_max: gauge_int(
                r,
                "mailroute_smtp_auth_checks_in_flight_max",
                "The most SMTP AUTH password checks that ran at once since the start.",
            )?,
            smtp_auth_refused: counter_vec(
                r,
                "mailroute_smtp_auth_refused_total",
                "SMTP AUTH attempts refused without a password check, by reason (busy, locked_out).",
                &["reason"],
            )?,
            smtp_body_bytes_reserved: gauge_int(
                r,
                "mailroute_smtp_body_bytes_reserved",
                "Bytes of message bodies held by SMTP sessions now.",
            )?,
            smtp_body_bytes_reserved_max: gauge_int(
                r,
                "mailroute_smtp_body_bytes_reserved_max",
                "The most message body bytes held at once since the start.",
            )?,
            smtp_body_budget_bytes: gauge_int(
                r,
                "mailroute_smtp_body_budget_bytes",
                "Budget for message bodies held by SMTP sessions at once.",
            )?,
            smtp_body_budget_refused: counter(
                r,
                "mailroute_smtp_body_budget_refused_total",
                "Messages refused with 452 4.3.1 because the body budget was spent.",
            )?,
            config_generation: gauge_int(
                r,
                "mailroute_config_generation",
                "Configuration version counter of this process.",
            )?,
            config_info: gauge_vec(
                r,
                "mailroute_config_info",
                "Hash of the loaded configuration (value 1).",
                &["hash"],
            )?,
            config_reloads: counter_vec(
                r,
                "mailroute_config_reloads_total",
                "Configuration reloads by result.",
                &["result"],
            )?,
            quota_decisions: counter_vec(
                r,
                "mailroute_quota_decisions_total",
                "Quota decisions per recipient by quota, result and the sender's namespace.",
                &["quota", "result", "sender_namespace"],
            )?,
            quota_usage: gauge_vec(
                r,
                "mailroute_quota_usage",
                "Quota usage by quota, period and namespace counted.",
                &["quota", "period", "sender_namespace"],
            )?,
            quota_limit: gauge_vec(
                r,
                "mailroute_quota_limit",
                "Quota limit by quota, period and namespace counted.",
                &["quota", "period", "sender_namespace"],
            )?,
            paced_jobs: counter_vec(
                r,
                "mailroute_paced_jobs_total",
                "Jobs delayed by shaping, by route and reason.",
                &["route", "reason"],
            )?,
            route_backoff_active: gauge_vec(
                r,
                "mailroute_route_backoff_active",
                "1 while a route is backing off after rate-limit replies.",
                &["route"],
            )?,
            dlog_events: counter_vec(
                r,
                "mailroute_dlog_events_total",
                "Delivery log events by kind.",
                &["event"],
            )?,
            redis_gauges_age_seconds: {
                let g = Gauge::new(
                    "mailroute_redis_gauges_age_seconds",
                    "Seconds since the queue and quota gauges were last read from Redis.",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            redis_gauges_read_ms: Arc::new(AtomicI64::new(crate::clock::now_ms())),
            registry,
        })
    }

    /// The registry, e.g. to add process metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every metric family name this set exports.
    pub fn names() -> Vec<&'static str> {
        NAMES.to_vec()
    }

    /// Marks `hash` as the loaded configuration, dropping the previous hash series.
    pub fn set_config_info(&self, hash: &str) {
        self.config_info.reset();
        self.config_info.with_label_values(&[hash]).set(1);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String only fails on malformed families, which the
        // registry cannot produce; an empty scrape is the safe fallback.
        if let Err(err) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::error!(%err, "encoding metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `code` label of `mailroute_bounces_total`: the 3-digit reply code, or
/// "none" when the failure produced no reply (connection, DNS, TLS, expiry).
pub fn code_label(code: Option<u16>) -> String {
    match code {
        Some(c) if (100..1000).contains(&c) => c.to_string(),
        _ => "none".to_string(),
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_int(r: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn touch_all(m: &Metrics) {
        m.messages_received
            .with_label_values(&["smtp", "accepted", "team-a"])
            .inc();
        m.recipients_received
            .with_label_values(&["submission", "rejected"])
            .inc_by(3);
        m.delivery_attempts
            .with_label_values(&["mail/o365", "delivered", "team-a"])
            .inc();
        m.retries.with_label_values(&["mail/o365"]).inc();
        m.bounces
            .with_label_values(&["mail/o365", &code_label(Some(550)), "invalid_recipient", "-"])
            .inc();
        m.expired.with_label_values(&["mail/o365"]).inc();
        m.dsn_sent.inc();
        m.dsn_unroutable.inc();
        m.jobs_reclaimed.inc();
        m.queue_ready_jobs.set(4);
        m.queue_scheduled_jobs.set(2);
        m.queue_inflight_jobs.set(1);
        m.queue_messages.set(5);
        m.queue_oldest_age_seconds.set(12.5);
        m.accept_latency.observe(0.002);
        m.delivery_latency.with_label_values(&["mail/o365"]).observe(1.5);
        m.smtp_sessions_active.with_label_values(&["smtps"]).inc();
        m.smtp_auth_failures.with_label_values(&["submission"]).inc();
        m.smtp_auth_checks_in_flight.set(1);
        m.smtp_auth_checks_in_flight_max.set(2);
        m.smtp_auth_refused.with_label_values(&["busy"]).inc();
        m.smtp_body_bytes_reserved.set(1024);
        m.smtp_body_bytes_reserved_max.set(4096);
        m.smtp_body_budget_bytes.set(1 << 20);
        m.smtp_body_budget_refused.inc();
        m.config_generation.set(3);
        m.set_config_info("abc123");
        m.config_reloads.with_label_values(&["ok"]).inc();
        m.quota_decisions
            .with_label_values(&["shop/bulk", "deferred", "shop"])
            .inc();
        m.quota_usage.with_label_values(&["shop/bulk", "month", "shop"]).set(42);
        m.quota_limit
            .with_label_values(&["shop/bulk", "month", "shop"])
            .set(200);
        m.paced_jobs.with_label_values(&["mail/o365", "route_rate"]).inc();
        m.route_backoff_active.with_label_values(&["mail/o365"]).set(1);
        m.dlog_events.with_label_values(&["delivered"]).inc();
        m.queue_held_jobs.set(7);
        m.queue_actions.with_label_values(&["hold"]).inc();
        m.queue_action_jobs.with_label_values(&["hold"]).inc_by(7);
    }

    #[test]
    fn every_contract_name_is_exported_once_touched() {
        let m = Metrics::new();
        touch_all(&m);
        let text = m.encode();
        for name in Metrics::names() {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
        // The registry holds exactly the listed families, no more.
        let gathered: BTreeSet<String> = m.registry().gather().iter().map(|f| f.name().to_string()).collect();
        let listed: BTreeSet<String> = NAMES.iter().map(|s| s.to_string()).collect();
        assert_eq!(gathered, listed);
    }

    #[test]
    fn values_and_labels_are_encoded() {
        let m = Metrics::new();
        touch_all(&m);
        let text = m.encode();
        assert!(text.contains(
            r#"mailroute_bounces_total{class="invalid_recipient",code="550",route="mail/o365",sender_namespace="-"} 1"#
        ));
        assert!(text.contains(r#"mailroute_recipients_received_total{listener="submission",result="rejected"} 3"#));
        assert!(text.contains("mailroute_queue_oldest_age_seconds 12.5"));
        assert!(text.contains(r#"mailroute_accept_latency_seconds_bucket{le="0.0005"} 0"#));
        assert!(text.contains(r#"mailroute_accept_latency_seconds_bucket{le="0.0025"} 1"#));
        assert!(text.contains(r#"mailroute_delivery_latency_seconds_bucket{route="mail/o365",le="7200"} 1"#));
    }

    #[test]
    fn config_info_keeps_only_the_current_hash() {
        let m = Metrics::new();
        m.set_config_info("old");
        m.set_config_info("new");
        let text = m.encode();
        assert!(text.contains(r#"mailroute_config_info{hash="new"} 1"#));
        assert!(!text.contains(r#"hash="old""#));
    }

    #[test]
    fn code_label_is_bounded() {
        assert_eq!(code_label(Some(421)), "421");
        assert_eq!(code_label(None), "none");
        assert_eq!(code_label(Some(5)), "none");
        assert_eq!(code_label(Some(65535)), "none");
    }

    #[test]
    fn buckets_cover_the_documented_ranges() {
        assert_eq!(ACCEPT_LATENCY_BUCKETS.first(), Some(&0.0005));
        assert_eq!(ACCEPT_LATENCY_BUCKETS.last(), Some(&1.0));
        assert_eq!(DELIVERY_LATENCY_BUCKETS.first(), Some(&0.1));
        assert_eq!(DELIVERY_LATENCY_BUCKETS.last(), Some(&7200.0));
        for b in [ACCEPT_LATENCY_BUCKETS, DELIVERY_LATENCY_BUCKETS] {
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
