//! One job from load to decision: the recipient's routes, holds (bulk queue control: a held job
//! is put into the held set, neither attempted nor expired; the time it was held lengthens its
//! lifetime), expiry, quiet hours, pacing, the attempts through the routes in order, and the
//! decision after the last one.
//!
//! Must not write the delivery log's failure records or DSNs itself (`finish` does), nor talk
//! SMTP (the [`super::Transport`] does).

use mailroute_api::config::CompiledRoute;
use mailroute_api::pattern::domain_of;

use super::finish::{fill, state};
use super::policy::expired_outcome;
use super::policy::fallback_route;
use super::{Decision, Delivery, PaceDecision, Recipient, Worker, decide, no_route_outcome, policy_for};
use crate::clock::now_ms;
use crate::control::rules::{JobFacts, JobState};
use crate::control::{held_event, released};
use crate::observe::dlog::EventResult;
use crate::observe::telemetry::{event_for, scheduled_event};
use crate::outbound::delivery::AttemptResult;
use crate::outbound::retry;
use crate::queue::message::{Envelope, Job, RecipientStatus};
use crate::queue::{Disposition, Leased, QueueError, Stored};

impl Worker {
    /// One job, start to end. Never panics on stored data; a broken record is dropped loudly.
    pub async fn process(&self, leased: Leased) {
        let stored = self.queue.load(&leased.job.msg).await;
        self.process_loaded(leased, stored).await;
    }

    /// [`Worker::process`] with the message already loaded.
    pub(super) async fn process_loaded(&self, leased: Leased, stored: Result<Option<Stored>, QueueError>) {
        let job = leased.job.clone();
        let stored = match stored {
            Ok(Some(s)) => s,
            Ok(None) => {
                // Record gone (completed elsewhere after a reclaim, or cancelled and finished).
                self.complete(
                    &leased,
                    Disposition::Final {
                        state: state(RecipientStatus::Gone, job.attempts, None, None),
                    },
                )
                .await;
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, message = %job.msg, "loading message failed; will retry after the visibility timeout");
                return;
            }
        };
        let meta = &stored.meta;
        let idx = job.rcpt as usize;
        let Some(rcpt) = meta.rcpts.get(idx).cloned() else {
            tracing::error!(message = %job.msg, rcpt = job.rcpt, "job names a recipient the message does not have");
            self.complete(
                &leased,
                Disposition::Final {
                    state: state(RecipientStatus::Invalid, job.attempts, None, None),
                },
            )
            .await;
            return;
        };
        if stored.cancelled {
            let cancelled = Disposition::Final {
                state: state(RecipientStatus::Cancelled, job.attempts, None, None),
            };
            let ev = event_for(meta, EventResult::Cancelled, idx);
            self.complete_recorded(&leased, cancelled, vec![ev]).await;
            return;
        }
        let snap = self.config.get();
        let domain = domain_of(&rcpt)
            .and_then(|d| crate::outbound::route::ascii_domain(&d))
            .unwrap_or_default();
        let mut routes: Vec<CompiledRoute> = crate::outbound::route::candidates(
            &snap.config,
            meta.namespace.as_deref(),
            &meta.mail_from,
            meta.auth_user.as_deref(),
            &domain,
        )
        .into_iter()
        .cloned()
        .collect();
        if routes.is_empty() && self.settings.fallback_mx {
            routes.push(fallback_route());
        }
        let mut policy = policy_for(routes.first(), meta);
        let now = now_ms();
        // A hold comes before everything else: held mail is neither attempted nor expired.
        let facts = JobFacts {
            meta,
            rcpt_domain: &domain,
            route: routes.first().map(|r| r.id.as_str()),
            state: JobState::Ready,
        };
        if let Some((hold, until)) = self.control.held(&facts, &job, now) {
            let newly = job.held_since.is_none();
            let route = routes.first().map_or_else(|| "none".to_owned(), |r| r.id.clone());
            let st = state(
                RecipientStatus::Queued,
                job.attempts,
                Some(until),
                Some((format!("held by {}", hold.rule), route)),
            );
            let job = Job {
                held_since: Some(job.held_since.unwrap_or(now)),
                ..job
            };
            let hold_it = Disposition::Hold {
                job,
                due_ms: until,
                state: st,
                hold: hold.key(),
            };
            // Recorded once the hold is in place: a hold released meanwhile is not.
            if self.complete(&leased, hold_it).await && newly {
                self.telemetry.record_now(held_event(meta, idx, &hold, until)).await;
            }
            return;
        }
        let job = match job.held_since {
            Some(_) => {
                // Released, or the hold lapsed for it: the time held does not count against its
                // lifetime.
                let mut ev = event_for(meta, EventResult::Released, idx);
                ev.reply_text = Some("hold ended or lapsed".into());
                self.telemetry.record_now(ev).await;
                released(&job, now)
            }
            None => job,
        };
        policy.lifetime += std::time::Duration::from_millis(job.held_ms);
        let this = Recipient {
            leased: &leased,
            meta,
            body: &stored.body,
            idx,
            rcpt: &rcpt,
        };

        if now >= policy.expires_at_ms(meta.received_at_ms) && job.attempts > 0 {
            // Without a route, that is what the sender needs to read.
            let outcome = if routes.is_empty() {
                no_route_outcome(&domain)
            } else {
                expired_outcome()
            };
            return self.fail(this, None, &outcome, true).await;
        }
        if let Some(q) = meta
            .options
            .quiet_hours
            .as_deref()
            .and_then(|q| retry::parse_quiet_hours(q).ok())
            && q.contains_ms(now)
        {
            let at = retry::defer_out_of_quiet(&q, now);
            let ev = scheduled_event(meta, idx, at, &format!("quiet hours {q}"));
            self.telemetry.record_now(ev).await;
            return self.wait(&leased, job, at, "quiet hours", None).await;
        }
        let Some(first) = routes.first() else {
            return self.no_route(this, job, &domain, &policy).await;
        };
        if let PaceDecision::Wait { at_ms, reason } = self.pacing.acquire(first, &domain, now).await {
            return self.paced(&leased, job, at_ms, reason, &first.id).await;
        }

        let attempts = job.attempts + 1;
        let mut last: Option<(AttemptResult, &CompiledRoute)> = None;
        for (i, route) in routes.iter().enumerate() {
            // Later routes are only used if they have capacity now; pacing never fails a job.
            if i > 0 && self.pacing.acquire(route, &domain, now_ms()).await != PaceDecision::Go {
                continue;
            }
            let env = Envelope {
                mail_from: &meta.mail_from,
                rcpt_to: &rcpt,
            };
            let attempt = match self.transport.deliver(route, &snap.secrets, &env, &stored.body).await {
                Delivery::Attempted { result, rcpt_domain } => {
                    if let Some(d) = rcpt_domain.as_deref() {
                        self.pacing.report(route, d, result.reply(), now_ms()).await;
                    }
                    result
                }
                // No connection slot on the first route: wait for it, no attempt counted. (Its
                // rate limit already counted the message: erring on the slow side.)
                Delivery::Paced { at_ms, reason } if i == 0 => {
                    return self.paced(&leased, job, at_ms, reason, &route.id).await;
                }
                // A later route without a free slot is skipped, like one over its rate.
                Delivery::Paced { reason, .. } => {
                    tracing::debug!(message = %job.msg, route = %route.id, reason, "failover route paced; skipped");
                    continue;
                }
            };
            let temporary = attempt.is_temporary();
            let result = if attempt.is_delivered() {
                "delivered"
            } else if temporary {
                "deferred"
            } else {
                "bounced"
            };
            self.telemetry
                .metrics
                .delivery_attempts
                .with_label_values(&[
                    &route.id,
                    result,
                    crate::observe::telemetry::namespace_label(meta.namespace.as_deref()),
                ])
                .inc();
            last = Some((attempt, route));
            if !temporary {
                break;
            }
        }
        let Some((attempt, route)) = last else {
            // Every route was paced: wait for the first.
            return self.wait(&leased, job, now + 1000, "route_rate", None).await;
        };
        let now = now_ms();
        match decide(&attempt, &policy, meta, now, attempts) {
            Decision::Delivered => {
                let mut ev = event_for(meta, EventResult::Delivered, idx);
                fill(&mut ev, route, &attempt, attempts);
                let latency = (now - meta.received_at_ms).max(0) as f64 / 1000.0;
                self.telemetry
                    .metrics
                    .delivery_latency
                    .with_label_values(&[&route.id])
                    .observe(latency);
                let st = state(
                    RecipientStatus::Delivered,
                    attempts,
                    None,
                    Some((attempt.summary(), route.id.clone())),
                );
                // The record goes with the completion (one script where the queue stores the log).
                self.complete_recorded(&leased, Disposition::Final { state: st }, vec![ev])
                    .await;
            }
            Decision::Retry { at_ms } => {
                let at_ms = match meta
                    .options
                    .quiet_hours
                    .as_deref()
                    .and_then(|q| retry::parse_quiet_hours(q).ok())
                {
                    Some(q) => retry::defer_out_of_quiet(&q, at_ms),
                    None => at_ms,
                };
                let mut ev = event_for(meta, EventResult::Deferred, idx);
                fill(&mut ev, route, &attempt, attempts);
                self.telemetry.metrics.retries.with_label_values(&[&route.id]).inc();
                let st = state(
                    RecipientStatus::Deferred,
                    attempts,
                    Some(at_ms),
                    Some((attempt.summary(), route.id.clone())),
                );
                let job = Job { attempts, ..job };
                let reschedule = Disposition::Reschedule {
                    job,
                    due_ms: at_ms,
                    state: st,
                };
                self.complete_recorded(&leased, reschedule, vec![ev]).await;
            }
            d @ (Decision::Bounce { .. } | Decision::Expired) => {
                let expired = d == Decision::Expired;
                self.fail(this, Some(route), &attempt, expired).await
            }
        }
    }
}
