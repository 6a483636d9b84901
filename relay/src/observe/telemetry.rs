//! Bridges what the SMTP sessions and the delivery worker report to the delivery log and the
//! Prometheus metrics. It owns the mapping from events to log records and metric labels and must
//! not put a recipient, sender or secret into a metric label.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::inbound::listener::ListenerKind;
use crate::inbound::session::{Observer, Reply, SenderInfo};
use crate::observe::dlog::{DeliveryEvent, DeliveryLog, Encoded, EventResult};
use crate::observe::metrics::Metrics;
use crate::queue::message::MessageMeta;

#[derive(Clone)]
pub struct Telemetry {
    pub dlog: DeliveryLog,
    pub metrics: Arc<Metrics>,
}

impl Telemetry {
    /// Records without making the caller wait for the store; the JSON line is written and the
    /// record handed to the log at once, so it is stored before anything recorded after it.
    pub fn record(&self, ev: DeliveryEvent) {
        self.dlog.record_detached(&ev);
    }

    /// [`Self::record`] for several records, stored in their order.
    pub fn record_all(&self, evs: Vec<DeliveryEvent>) {
        for ev in &evs {
            self.dlog.record_detached(ev);
        }
    }

    /// The metrics of an accepted message.
    fn count_accepted(&self, meta: &MessageMeta, accept_latency: Duration) {
        self.metrics.accept_latency.observe(accept_latency.as_secs_f64());
        self.metrics
            .messages_received
            .with_label_values(&[
                meta.listener.as_str(),
                "accepted",
                namespace_label(meta.namespace.as_deref()),
            ])
            .inc();
        self.metrics
            .recipients_received
            .with_label_values(&[meta.listener.as_str(), "accepted"])
            .inc_by(meta.rcpts.len() as u64);
    }

    /// Records and waits for the store (worker paths, where ordering matters more than latency).
    pub async fn record_now(&self, ev: DeliveryEvent) {
        if let Err(e) = self.dlog.record(&ev).await {
            tracing::warn!(error = %e, "delivery log store unavailable; record kept on stdout only");
        }
    }
}

/// The `sender_namespace` metric label of a message: its namespace, or `-` (unattributed).
pub fn namespace_label(namespace: Option<&str>) -> &str {
    namespace.unwrap_or(crate::observe::dlog::UNATTRIBUTED)
}

/// The `scheduled` record of a recipient held until `at_ms` (ms since the epoch) by `reason`.
pub fn scheduled_event(meta: &MessageMeta, rcpt_index: usize, at_ms: i64, reason: &str) -> DeliveryEvent {
    let mut ev = event_for(meta, EventResult::Scheduled, rcpt_index);
    ev.not_before = chrono::DateTime::from_timestamp_millis(at_ms);
    let until = ev
        .not_before
        .as_ref()
        .map(crate::observe::dlog::format_time)
        .unwrap_or_default();
    ev.reply_text = Some(format!("held by {reason} until {until}"));
    ev
}

/// A log record for a message event, with the submission facts filled in.
pub fn event_for(meta: &MessageMeta, result: EventResult, rcpt_index: usize) -> DeliveryEvent {
    let rcpt = meta.rcpts.get(rcpt_index).cloned().unwrap_or_default();
    let mut ev = DeliveryEvent::new(
        crate::clock::now(),
        result,
        meta.id.clone(),
        meta.mail_from.clone(),
        rcpt,
    );
    ev.message_id_header = meta.message_id_header.clone();
    ev.job_id = Some(format!("{}/{}", meta.id, rcpt_index));
    ev.source_ip = meta.source_ip.parse().ok();
    ev.auth_user = meta.auth_user.clone();
    ev.namespace = meta.namespace.clone();
    ev.service_account = meta.service_account.clone();
    ev.listener = Some(meta.listener.as_str().to_owned());
    ev.tls = meta.tls;
    ev
}

/// The `received` records of an accepted message, each recipient's followed by its `scheduled`
/// when the enqueue path holds its job for a future X-Mailroute-Deliver-After.
fn accept_events(meta: &MessageMeta) -> Vec<DeliveryEvent> {
    let held = meta.options.deliver_after_ms.filter(|t| *t > meta.received_at_ms);
    let mut evs = Vec::with_capacity(meta.rcpts.len() * 2);
    for i in 0..meta.rcpts.len() {
        evs.push(event_for(meta, EventResult::Received, i));
        if let Some(at) = held {
            evs.push(scheduled_event(meta, i, at, crate::inbound::headers::DELIVER_AFTER));
        }
    }
    evs
}

impl Observer for Telemetry {
    fn suppressed(&self, meta: &MessageMeta, rcpt_index: usize, scope: &crate::suppress::Scope) {
        let mut ev = event_for(meta, EventResult::Suppressed, rcpt_index);
        ev.reply_text = Some(format!(
            "not delivered: the recipient is on {scope} of suppressed addresses"
        ));
        self.record(ev);
    }

    fn session_opened(&self, listener: ListenerKind) {
        self.metrics
            .smtp_sessions_active
            .with_label_values(&[listener.as_str()])
            .inc();
    }

    fn session_closed(&self, listener: ListenerKind) {
        self.metrics
            .smtp_sessions_active
            .with_label_values(&[listener.as_str()])
            .dec();
    }

    fn auth_failed(&self, listener: ListenerKind, ip: IpAddr) {
        self.metrics
            .smtp_auth_failures
            .with_label_values(&[listener.as_str()])
            .inc();
        tracing::info!(listener = listener.as_str(), source_ip = %ip, "SMTP AUTH failed");
    }

    fn accepted(&self, meta: &MessageMeta, accept_latency: Duration) {
        self.count_accepted(meta, accept_latency);
        self.record_all(accept_events(meta));
    }

    fn accept_records(&self, meta: &MessageMeta) -> Vec<Encoded> {
        let encoded: Result<Vec<Encoded>, _> = accept_events(meta).iter().map(|ev| self.dlog.encode(ev)).collect();
        // Not encodable: none go with the commit, `accepted` records them the usual way.
        encoded.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "delivery log records not encoded");
            Vec::new()
        })
    }

    fn accepted_stored(&self, meta: &MessageMeta, accept_latency: Duration, records: &[Encoded]) {
        self.count_accepted(meta, accept_latency);
        for rec in records {
            self.dlog.stored_elsewhere(rec);
        }
    }

    fn quota_decision(&self, quota: &str, result: &str, namespace: Option<&str>) {
        self.metrics
            .quota_decisions
            .with_label_values(&[quota, result, namespace_label(namespace)])
            .inc();
    }

    fn rejected(&self, s: &SenderInfo, rcpt: Option<&str>, reply: &Reply) {
        let result = if reply.code >= 500 { "rejected" } else { "deferred" };
        let listener = s.listener.as_str();
        match rcpt {
            Some(_) => self
                .metrics
                .recipients_received
                .with_label_values(&[listener, result])
                .inc(),
            None => self
                .metrics
                .messages_received
                .with_label_values(&[listener, result, namespace_label(s.namespace.as_deref())])
                .inc(),
        }
        let mut ev = DeliveryEvent::new(
            crate::clock::now(),
            EventResult::Rejected,
            "",
            s.mail_from.clone(),
            rcpt.unwrap_or_default(),
        );
        ev.source_ip = Some(s.source_ip);
        ev.auth_user = s.auth_user.clone();
        ev.namespace = s.namespace.clone();
        ev.service_account = s.service_account.clone();
        ev.listener = Some(listener.to_owned());
        ev.reply_code = Some(reply.code);
        ev.enhanced_code = reply.enhanced.map(|e| e.to_string());
        ev.reply_text = Some(reply.text.clone());
        ev.tls = s.tls;
        self.record(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::dlog::EventFilter;

    fn meta() -> MessageMeta {
        MessageMeta {
            namespace: Some("team-a".into()),
            rcpts: vec!["c@d.example".into(), "e@d.example".into()],
            ..MessageMeta::sample("m1", 1)
        }
    }

    /// A worker may bounce a message right after the session accepted it: the session's
    /// `received` records must still come first in the log.
    #[tokio::test]
    async fn records_are_stored_in_the_order_they_are_reported() {
        let dlog = DeliveryLog::memory(100).without_writer();
        let t = Telemetry {
            dlog: dlog.clone(),
            metrics: Arc::new(Metrics::new()),
        };
        let meta = meta();
        t.accepted(&meta, Duration::ZERO);
        t.record_now(event_for(&meta, EventResult::Bounced, 0)).await;
        t.record_now(event_for(&meta, EventResult::Bounced, 1)).await;
        let page = dlog.query(&EventFilter::default(), None, 10).await.unwrap();
        let order: Vec<(EventResult, &str)> = page.events.iter().map(|e| (e.result, e.recipient.as_str())).collect();
        assert_eq!(
            order,
            [
                (EventResult::Received, "c@d.example"),
                (EventResult::Received, "e@d.example"),
                (EventResult::Bounced, "c@d.example"),
                (EventResult::Bounced, "e@d.example"),
            ]
        );
    }

    /// Records the queue's commit stored are written as lines and counted, not stored again.
    #[tokio::test]
    async fn records_stored_with_the_commit_are_only_reported() {
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let metrics = Arc::new(Metrics::new());
        let dlog = DeliveryLog::memory(100)
            .with_writer(lines.clone())
            .with_metrics(metrics.clone());
        let t = Telemetry {
            dlog: dlog.clone(),
            metrics: metrics.clone(),
        };
        let mut meta = meta();
        meta.options.deliver_after_ms = Some(meta.received_at_ms + 60_000);
        let records = t.accept_records(&meta);
        let results: Vec<EventResult> = records.iter().map(|r| r.result).collect();
        use EventResult::{Received, Scheduled};
        assert_eq!(results, [Received, Scheduled, Received, Scheduled]);
        t.accepted_stored(&meta, Duration::ZERO, &records);
        let written = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let written: Vec<&str> = written.lines().collect();
        let json: Vec<&str> = records.iter().map(|r| r.line.as_str()).collect();
        assert_eq!(written, json);
        assert_eq!(metrics.dlog_events.with_label_values(&["received"]).get(), 2);
        assert_eq!(
            metrics
                .recipients_received
                .with_label_values(&["smtp", "accepted"])
                .get(),
            2
        );
        t.record_now(event_for(&meta, EventResult::Bounced, 0)).await;
        let page = dlog.query(&EventFilter::default(), None, 10).await.unwrap();
        let stored: Vec<EventResult> = page.events.iter().map(|e| e.result).collect();
        assert_eq!(stored, [EventResult::Bounced]);
    }
}
