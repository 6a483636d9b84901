//! The end of a job other than a plain delivery or retry: no route, paced, waiting, bounced or
//! expired. Writes the delivery-log record, the metrics, the recipient state and, for a failure,
//! the DSN to the return-path, and adds hard-bounced recipients to the suppression list.
//!
//! DSN format is `dsn`'s, classification `bounce`'s. Must not attempt delivery.

use chrono::{DateTime, Utc};
use mailroute_api::config::CompiledRoute;

use super::{Decision, Recipient, Worker, decide, no_route_outcome};
use crate::clock::now_ms;
use crate::observe::dlog::EventResult;
use crate::observe::telemetry::event_for;
use crate::outbound::bounce::{self, EnhancedStatusCode, Failure};
use crate::outbound::delivery::AttemptResult;
use crate::outbound::dsn;
use crate::outbound::retry::RetryPolicy;
use crate::queue::message::{Job, MessageMeta, Origin, RecipientState, RecipientStatus, new_id};
use crate::queue::{Disposition, Leased};

impl Worker {
    /// No route serves the recipient: a gap in the configuration (a reload during a rollout, a
    /// route left out while its Secret is broken), not a verdict on the mail. Accepted mail
    /// waits on the retry schedule and only expires at the end of its lifetime; it is never
    /// bounced for this. A DSN without a route is reported loudly: its sender learns nothing.
    pub(super) async fn no_route(&self, r: Recipient<'_>, job: Job, domain: &str, policy: &RetryPolicy) {
        let Recipient { leased, meta, idx, .. } = r;
        let outcome = no_route_outcome(domain);
        let attempts = job.attempts + 1;
        let m = &self.telemetry.metrics;
        if meta.is_dsn {
            m.dsn_unroutable.inc();
            tracing::error!(message = %meta.id, domain, "DSN undeliverable: no route serves its recipient's domain");
        } else {
            tracing::warn!(message = %meta.id, domain, "no route serves the recipient's domain; delivery deferred");
        }
        let at_ms = match decide(&outcome, policy, meta, now_ms(), attempts) {
            Decision::Retry { at_ms } => at_ms,
            _ => {
                return self.fail(r, None, &outcome, true).await;
            }
        };
        let mut ev = event_for(meta, EventResult::Deferred, idx);
        log_outcome(&mut ev, &outcome);
        ev.attempt = Some(attempts);
        ev.bounce_class = Some(bounce::BounceClass::NoRoute.as_str().to_owned());
        m.retries.with_label_values(&["none"]).inc();
        let st = state(
            RecipientStatus::Deferred,
            attempts,
            Some(at_ms),
            Some((outcome.summary(), "none".into())),
        );
        let reschedule = Disposition::Reschedule {
            job: Job { attempts, ..job },
            due_ms: at_ms,
            state: st,
        };
        self.complete_recorded(leased, reschedule, vec![ev]).await;
    }

    /// The first route has no capacity now (rate, daily budget, back-off or connections):
    /// counted by route and reason, then the job waits.
    pub(super) async fn paced(&self, leased: &Leased, job: Job, at_ms: i64, reason: &str, route: &str) {
        self.telemetry
            .metrics
            .paced_jobs
            .with_label_values(&[route, reason])
            .inc();
        self.wait(leased, job, at_ms, reason, Some(route)).await;
    }

    pub(super) async fn wait(&self, leased: &Leased, job: Job, at_ms: i64, reason: &str, route: Option<&str>) {
        tracing::debug!(message = %job.msg, rcpt = job.rcpt, reason, route, at_ms, "waiting");
        let st = state(RecipientStatus::Queued, job.attempts, Some(at_ms), None);
        let job = Job {
            waits: job.waits + 1,
            ..job
        };
        self.complete(
            leased,
            Disposition::Reschedule {
                job,
                due_ms: at_ms,
                state: st,
            },
        )
        .await;
    }

    /// Permanent failure or expiry: log, count, send a DSN (never for a bounce), finish the job.
    /// `via`: the route of the attempt that `outcome` came from; `None` when the relay did not
    /// try (no route, or expired before this attempt).
    pub(super) async fn fail(
        &self,
        r: Recipient<'_>,
        via: Option<&CompiledRoute>,
        outcome: &AttemptResult,
        expired: bool,
    ) {
        let Recipient {
            leased,
            meta,
            body,
            idx,
            rcpt,
        } = r;
        let attempts = leased.job.attempts + u32::from(via.is_some());
        let route_id = via.map(|r| r.id.clone()).unwrap_or_else(|| "none".into());
        let class = match outcome.verdict() {
            _ if expired => bounce::BounceClass::Expired,
            Some(v) => v.class,
            None => bounce::BounceClass::Other,
        };
        let code = outcome.reply().map(|r| r.code);
        let result = if expired {
            EventResult::Expired
        } else {
            EventResult::Bounced
        };
        let mut ev = event_for(meta, result, idx);
        if let Some(r) = via {
            fill(&mut ev, r, outcome, attempts);
        } else {
            log_outcome(&mut ev, outcome);
            ev.attempt = Some(attempts);
        }
        ev.bounce_class = Some(class.as_str().to_owned());
        let event_id = match self.telemetry.dlog.record(&ev).await {
            Ok(id) => Some(id.to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "delivery log store unavailable; record kept on stdout only");
                None
            }
        };
        if !expired {
            self.auto_suppress(meta, rcpt, class, outcome, event_id).await;
        }
        let m = &self.telemetry.metrics;
        if expired {
            m.expired.with_label_values(&[&route_id]).inc();
        }
        m.bounces
            .with_label_values(&[
                &route_id,
                &crate::observe::metrics::code_label(code),
                class.as_str(),
                crate::observe::telemetry::namespace_label(meta.namespace.as_deref()),
            ])
            .inc();

        if !meta.is_dsn && dsn::should_bounce(&meta.mail_from) {
            if let Err(e) = self.send_dsn(meta, body, rcpt, outcome, expired).await {
                // The job stays leased and is retried after the visibility timeout, so the
                // sender still gets the DSN.
                tracing::error!(error = %e, message = %meta.id, "queueing DSN failed");
                return;
            }
            m.dsn_sent.inc();
        }
        let status = if expired {
            RecipientStatus::Expired
        } else {
            RecipientStatus::Bounced
        };
        let st = state(status, attempts, None, Some((outcome.summary(), route_id)));
        self.complete(leased, Disposition::Final { state: st }).await;
    }

    /// A hard bounce of a configured class (`invalid_recipient`) puts the recipient on the
    /// message's namespace list (the platform list for unattributed mail), naming the bounce's
    /// delivery-log record. An address already listed keeps its entry. Best effort: a failure
    /// is logged and the bounce goes on.
    async fn auto_suppress(
        &self,
        meta: &MessageMeta,
        rcpt: &str,
        class: bounce::BounceClass,
        outcome: &AttemptResult,
        event: Option<String>,
    ) {
        let Some(lists) = &self.suppress else { return };
        if !lists.settings.auto_classes.iter().any(|c| c == class.as_str()) {
            return;
        }
        let entry = crate::suppress::Entry {
            address: rcpt.to_owned(),
            reason: format!("hard bounce ({class}): {}", outcome.summary()),
            source: crate::suppress::Source::bounce(event, &meta.id),
            added_ms: now_ms(),
            expires_ms: None,
        };
        let scope = crate::suppress::Scope::of_message(meta.namespace.as_deref());
        match lists.add_new(&scope, &entry).await {
            Ok(true) => {
                tracing::info!(message = %meta.id, %scope, "hard-bounced recipient added to the suppression list")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, message = %meta.id, "adding a hard-bounced recipient to the suppression list failed")
            }
        }
    }

    async fn send_dsn(
        &self,
        meta: &MessageMeta,
        body: &[u8],
        rcpt: &str,
        outcome: &AttemptResult,
        expired: bool,
    ) -> anyhow::Result<()> {
        let now = crate::clock::now();
        let (status, diagnostic) = match outcome.reply() {
            Some(reply) => (dsn::status_for_reply(reply), Some(reply.clone())),
            None => {
                let class = outcome.verdict().map_or(bounce::BounceClass::Other, |v| v.class);
                (status_for_class(class, expired), None)
            }
        };
        let reason = if expired {
            format!(
                "delivery did not succeed before the message expired; last result: {}",
                outcome.summary()
            )
        } else {
            format!(
                "the receiving side refused the message permanently: {}",
                outcome.summary()
            )
        };
        let reports = [dsn::RecipientReport {
            recipient: rcpt.to_owned(),
            action: dsn::Action::Failed,
            status,
            // None when the relay did not try.
            remote_mta: outcome.remote_host.clone(),
            diagnostic,
            reason,
            last_attempt: Some(now),
            will_retry_until: None,
        }];
        let arrival: DateTime<Utc> = DateTime::from_timestamp_millis(meta.received_at_ms).unwrap_or(now);
        let req = dsn::DsnRequest {
            reporting_mta: &self.settings.hostname,
            original_sender: &meta.mail_from,
            arrival_date: arrival,
            queue_id: Some(&meta.id),
            recipients: &reports,
            original: body,
        };
        let now_ms = now.timestamp_millis();
        let id = new_id(now_ms);
        let d = dsn::build(&req, now, &id);
        let dsn_meta = MessageMeta {
            id: id.clone(),
            received_at_ms: now_ms,
            source_ip: "127.0.0.1".into(),
            listener: Origin::Dsn,
            auth_user: None,
            // A bounce returns to its sender under the original message's authority.
            namespace: meta.namespace.clone(),
            service_account: None,
            tls: false,
            mail_from: String::new(),
            rcpts: vec![d.rcpt_to.clone()],
            message_id_header: crate::inbound::headers::get(&d.message, "Message-ID"),
            size: d.message.len(),
            options: Default::default(),
            quota: None,
            is_dsn: true,
        };
        self.queue
            .enqueue(&dsn_meta, &d.message, &[(Job::new(&id, 0), None)])
            .await?;
        Ok(())
    }
}

/// DSN status for a failure that produced no reply.
fn status_for_class(class: bounce::BounceClass, expired: bool) -> EnhancedStatusCode {
    use bounce::BounceClass as C;
    let f = match class {
        _ if expired => Failure::Expired,
        C::DnsFailure => Failure::DnsNoSuchDomain,
        C::TlsFailure => Failure::Tls,
        _ => Failure::ConnectionRefused,
    };
    dsn::status_for_failure(f)
}

pub(super) fn state(
    status: RecipientStatus,
    attempts: u32,
    next: Option<i64>,
    last: Option<(String, String)>,
) -> RecipientState {
    let (last_reply, route) = match last {
        Some((r, route)) => (Some(r), Some(route)),
        None => (None, None),
    };
    RecipientState {
        status,
        attempts,
        next_attempt_ms: next,
        last_reply,
        route,
    }
}

pub(super) fn fill(
    ev: &mut crate::observe::dlog::DeliveryEvent,
    route: &CompiledRoute,
    a: &AttemptResult,
    attempt_no: u32,
) {
    ev.route = Some(route.id.clone());
    ev.remote_host = a.remote_host.clone();
    ev.tls = a.tls;
    ev.attempt = Some(attempt_no);
    log_outcome(ev, a);
    if let Some(v) = a.verdict() {
        ev.bounce_class = Some(v.class.as_str().to_owned());
    }
}

/// The reply (or what happened instead) in the delivery log's fields.
fn log_outcome(ev: &mut crate::observe::dlog::DeliveryEvent, outcome: &AttemptResult) {
    let (code, enhanced, text) = outcome.log_parts();
    ev.reply_code = code;
    ev.enhanced_code = enhanced.map(|e| e.to_string());
    ev.reply_text = Some(text);
}
