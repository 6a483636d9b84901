//! Bulk queue control: list the queue by filter, cancel, retry now, hold and release, across
//! every relay through the shared queue; the holds every relay's worker honours; and the
//! `spec.suspended` routes mirrored into holds.
//!
//! It owns the batch loop (scan a batch, select with the pure [`rules`], apply the batch's moves
//! in one atomic step), the per-job delivery-log records with the actor, and the hold cache the
//! worker reads. It must not decide a delivery (the worker does) nor store anything itself: the
//! queue does, on its exact instructions.

pub mod rules;

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use mailroute_api::pattern::domain_of;
use serde::Serialize;

use self::rules::{Hold, HoldRule, HoldSource, JobFacts, JobState, QueueFilter, hold_key};
use crate::clock::now_ms;
use crate::config::ConfigHandle;
use crate::observe::dlog::{DeliveryEvent, EventResult, format_time};
use crate::observe::telemetry::{Telemetry, event_for};
use crate::queue::message::{Job, MessageMeta, RecipientState, RecipientStatus};
use crate::queue::{BulkOp, Place, Queue, QueueError, QueuedJob, ScanCursor};

/// Jobs looked at per scan and moved per atomic step: short enough that Redis is never held
/// for long, whatever the queue's length.
pub const BATCH: usize = 500;

/// Default longest time a job stays held (`--max-hold-time`).
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(72 * 3600);

/// Who an action is recorded as (`admin-token`, or the Kubernetes user name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor(pub String);

/// One queued job as the list shows it.
#[derive(Clone, Debug, Serialize)]
pub struct QueueItem {
    pub id: String,
    pub rcpt: u32,
    pub recipient: String,
    pub sender: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub route: String,
    pub state: JobState,
    pub received_at: String,
    pub age_seconds: u64,
    pub attempts: u32,
    /// When it is due (scheduled) or its hold lapses (held).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub due_at: Option<String>,
}

/// A page of the list, with the count of every job the filter selects.
#[derive(Clone, Debug, Serialize)]
pub struct QueuePage {
    pub total: usize,
    pub items: Vec<QueueItem>,
    /// Pass as `cursor` for the next page (`id/rcpt` of the last item).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// What an action did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ActionReport {
    pub action: &'static str,
    /// Jobs it touched.
    pub touched: usize,
    /// Jobs it selected that a relay was attempting at that moment: left alone (their
    /// attempt may deliver them).
    pub in_flight: usize,
}

/// A selected job: the job, its message, recipient domain, first route and state.
type Selected = (QueuedJob, Arc<MessageMeta>, String, Option<String>, JobState);

/// Where a walk over the queue stands.
enum Walk {
    Start,
    At(ScanCursor),
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Cancel,
    Retry,
    Hold { due_ms: i64 },
    Release,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Cancel => "cancel",
            Action::Retry => "retry",
            Action::Hold { .. } => "hold",
            Action::Release => "release",
        }
    }
}

pub struct Control {
    pub queue: Arc<dyn Queue>,
    pub config: Arc<ConfigHandle>,
    pub telemetry: Telemetry,
    /// Longest time a job is held in all; past it its hold lapses.
    pub max_hold: Duration,
    /// Whether mail no route serves goes by MX (its route is then `mx`).
    pub fallback_mx: bool,
    holds: RwLock<Arc<Vec<Hold>>>,
}

impl Control {
    pub fn new(
        queue: Arc<dyn Queue>,
        config: Arc<ConfigHandle>,
        telemetry: Telemetry,
        max_hold: Duration,
        fallback_mx: bool,
    ) -> Self {
        Control {
            queue,
            config,
            telemetry,
            max_hold,
            fallback_mx,
            holds: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// The holds as last read from the store (every relay reads them often).
    pub fn cached_holds(&self) -> Arc<Vec<Hold>> {
        self.holds.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Reads the holds from the store into the cache.
    pub async fn refresh_holds(&self) -> Result<Arc<Vec<Hold>>, QueueError> {
        let holds = Arc::new(self.queue.holds().await?);
        *self.holds.write().unwrap_or_else(PoisonError::into_inner) = holds.clone();
        Ok(holds)
    }

    /// The route a message's recipient in `domain` goes through first, as the worker picks it.
    pub fn route_of(
        &self,
        cfg: &mailroute_api::config::RelayConfig,
        meta: &MessageMeta,
        domain: &str,
    ) -> Option<String> {
        let first = crate::outbound::route::candidates(
            cfg,
            meta.namespace.as_deref(),
            &meta.mail_from,
            meta.auth_user.as_deref(),
            domain,
        )
        .first()
        .map(|r| r.id.clone());
        first.or_else(|| self.fallback_mx.then(|| "mx".to_owned()))
    }

    fn state_of(q: &QueuedJob) -> JobState {
        match q.place {
            Place::Held { .. } => JobState::Held,
            Place::Scheduled { .. } => JobState::Scheduled,
            Place::Ready { .. } if q.in_flight => JobState::InFlight,
            Place::Ready { .. } => JobState::Ready,
        }
    }

    /// The selected jobs of the next batch of the queue (`walk`: where the walk stands; starts
    /// as `Walk::Start`); `None` when the walk is done.
    async fn next_batch(&self, filter: &QueueFilter, walk: &mut Walk) -> Result<Option<Vec<Selected>>, QueueError> {
        if !self.queue.bulk_control() {
            return Err(QueueError::Unsupported("bulk queue control needs the Redis queue"));
        }
        loop {
            let cursor = match std::mem::replace(walk, Walk::Done) {
                Walk::Done => return Ok(None),
                Walk::Start => None,
                Walk::At(c) => Some(c),
            };
            let (jobs, next) = self.queue.scan(cursor, BATCH).await?;
            if let Some(n) = next {
                *walk = Walk::At(n);
            }
            let now = now_ms();
            let snap = self.config.get();
            let mut selected = Vec::new();
            for q in jobs {
                let Some(meta) = q.meta.clone() else { continue };
                let Some(rcpt) = meta.rcpts.get(q.job.rcpt as usize) else {
                    continue;
                };
                let domain = domain_of(rcpt)
                    .and_then(|d| crate::outbound::route::ascii_domain(&d))
                    .unwrap_or_default();
                let route = self.route_of(&snap.config, &meta, &domain);
                let state = Self::state_of(&q);
                let facts = JobFacts {
                    meta: &meta,
                    rcpt_domain: &domain,
                    route: route.as_deref(),
                    state,
                };
                if filter.matches(&facts, now) {
                    selected.push((q, meta.clone(), domain, route, state));
                }
            }
            if !selected.is_empty() {
                return Ok(Some(selected));
            }
        }
    }

    /// Lists the selected jobs: every one counted, `limit` shown after `cursor` (`id/rcpt`), in
    /// the order they came in.
    pub async fn list(
        &self,
        filter: &QueueFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<QueuePage, QueueError> {
        let mut all: Vec<QueueItem> = Vec::new();
        let mut seen: HashSet<(String, u32)> = HashSet::new();
        let now = now_ms();
        let mut walk = Walk::Start;
        while let Some(batch) = self.next_batch(filter, &mut walk).await? {
            for (q, meta, _, route, state) in batch {
                // A job moved during the walk may be met twice.
                if !seen.insert((q.job.msg.clone(), q.job.rcpt)) {
                    continue;
                }
                let due = match &q.place {
                    Place::Scheduled { due_ms, .. } | Place::Held { due_ms, .. } => Some(*due_ms),
                    Place::Ready { .. } => None,
                };
                all.push(QueueItem {
                    id: meta.id.clone(),
                    rcpt: q.job.rcpt,
                    recipient: meta.rcpts.get(q.job.rcpt as usize).cloned().unwrap_or_default(),
                    sender: meta.mail_from.clone(),
                    namespace: meta.namespace.clone(),
                    route: route.unwrap_or_else(|| "none".into()),
                    state,
                    received_at: time_text(meta.received_at_ms),
                    age_seconds: ((now - meta.received_at_ms).max(0) / 1000) as u64,
                    attempts: q.job.attempts,
                    due_at: due.map(time_text),
                });
            }
        }
        all.sort_by(|a, b| (&a.id, a.rcpt).cmp(&(&b.id, b.rcpt)));
        let total = all.len();
        let after = cursor
            .and_then(|c| c.rsplit_once('/'))
            .and_then(|(id, r)| Some((id.to_owned(), r.parse::<u32>().ok()?)));
        let start = match &after {
            Some((id, r)) => all.partition_point(|i| (&i.id, i.rcpt) <= (id, *r)),
            None => 0,
        };
        let items: Vec<QueueItem> = all.into_iter().skip(start).take(limit).collect();
        let next_cursor = (start + items.len() < total)
            .then(|| items.last().map(|i| format!("{}/{}", i.id, i.rcpt)))
            .flatten();
        self.telemetry.metrics.queue_actions.with_label_values(&["list"]).inc();
        Ok(QueuePage {
            total,
            items,
            next_cursor,
        })
    }

    /// Cancels every selected job not in flight: its recipient is final (`cancelled`).
    pub async fn cancel(&self, filter: &QueueFilter, actor: &Actor) -> Result<ActionReport, QueueError> {
        self.act(filter, Action::Cancel, actor, "cancelled").await
    }

    /// Makes every selected scheduled job ready now (held jobs stay held: release them).
    pub async fn retry(&self, filter: &QueueFilter, actor: &Actor) -> Result<ActionReport, QueueError> {
        self.act(filter, Action::Retry, actor, "retry now").await
    }

    /// Places a hold (replacing one on the same rule and scope) and moves the ready and
    /// scheduled jobs it applies to into the held set. `max`: shorter than the maximum hold time.
    pub async fn hold(
        &self,
        rule: HoldRule,
        namespace: Option<String>,
        max: Option<Duration>,
        actor: &Actor,
    ) -> Result<(Hold, ActionReport), QueueError> {
        if !self.queue.bulk_control() {
            return Err(QueueError::Unsupported("bulk queue control needs the Redis queue"));
        }
        let now = now_ms();
        let max = max.map_or(self.max_hold, |m| m.min(self.max_hold));
        let hold = Hold {
            rule,
            namespace,
            by: actor.0.clone(),
            since_ms: now,
            until_ms: Some(now + max.as_millis() as i64),
            source: HoldSource::Admin,
        };
        self.queue.put_hold(&hold).await?;
        let _ = self.refresh_holds().await;
        let filter = scoped(hold.rule.filter(), hold.namespace.as_deref());
        let note = format!("held by {}", hold.rule);
        let report = self
            .act(
                &filter,
                Action::Hold {
                    due_ms: hold.until_ms.unwrap_or(now),
                },
                actor,
                &note,
            )
            .await?;
        Ok((hold, report))
    }

    /// Removes the hold on `rule` in scope `namespace` and moves the jobs it held into the ready
    /// stream. `None` when there was no such hold.
    pub async fn release(
        &self,
        rule: &HoldRule,
        namespace: Option<&str>,
        actor: &Actor,
    ) -> Result<Option<ActionReport>, QueueError> {
        let Some(hold) = self.queue.remove_hold(&hold_key(rule, namespace)).await? else {
            return Ok(None);
        };
        let _ = self.refresh_holds().await;
        let filter = scoped(hold.rule.filter(), namespace);
        let note = format!("released from the hold on {}", hold.rule);
        Ok(Some(self.act(&filter, Action::Release, actor, &note).await?))
    }

    async fn act(
        &self,
        filter: &QueueFilter,
        action: Action,
        actor: &Actor,
        note: &str,
    ) -> Result<ActionReport, QueueError> {
        let mut report = ActionReport {
            action: action.name(),
            ..Default::default()
        };
        let mut walk = Walk::Start;
        while let Some(batch) = self.next_batch(filter, &mut walk).await? {
            let now = now_ms();
            let mut ops = Vec::new();
            let mut whose = Vec::new();
            for (q, meta, _, _, state) in batch {
                if state == JobState::InFlight {
                    // Only what the action would have touched: a job released or retried a
                    // moment ago and already taken by a worker is none of it.
                    if matches!(action, Action::Cancel | Action::Hold { .. }) {
                        report.in_flight += 1;
                    }
                    continue;
                }
                let msg = q.job.msg.clone();
                let op = match action {
                    Action::Cancel => BulkOp::Cancel {
                        rcpt: q.job.rcpt,
                        msg,
                        state: RecipientState {
                            status: RecipientStatus::Cancelled,
                            attempts: q.job.attempts,
                            next_attempt_ms: None,
                            last_reply: Some(format!("cancelled by {}", actor.0)),
                            route: None,
                        },
                        place: q.place,
                    },
                    Action::Retry if state == JobState::Scheduled => BulkOp::Ready {
                        msg,
                        job: q.job.clone(),
                        place: q.place,
                    },
                    Action::Hold { due_ms } if matches!(state, JobState::Ready | JobState::Scheduled) => {
                        // Held before: only what is left of its maximum hold time.
                        let cap = now + self.max_hold.as_millis() as i64 - q.job.held_ms as i64;
                        BulkOp::Hold {
                            msg,
                            job: Job {
                                held_since: Some(now),
                                ..q.job.clone()
                            },
                            due_ms: due_ms.min(cap),
                            place: q.place,
                        }
                    }
                    Action::Release if state == JobState::Held => BulkOp::Ready {
                        msg,
                        job: released(&q.job, now),
                        place: q.place,
                    },
                    _ => continue,
                };
                whose.push((meta, q.job.rcpt));
                ops.push(op);
            }
            let done = self.queue.apply(&ops).await?;
            let mut records = Vec::new();
            for ((meta, rcpt), ok) in whose.iter().zip(done) {
                if !ok {
                    continue;
                }
                report.touched += 1;
                let result = match action {
                    Action::Cancel => EventResult::Cancelled,
                    Action::Retry => EventResult::Retried,
                    Action::Hold { .. } => EventResult::Held,
                    Action::Release => EventResult::Released,
                };
                let mut ev = event_for(meta, result, *rcpt as usize);
                ev.actor = Some(actor.0.clone());
                ev.reply_text = Some(note.to_owned());
                if let Action::Hold { due_ms } = action {
                    ev.not_before = chrono::DateTime::from_timestamp_millis(due_ms);
                }
                records.push(ev);
            }
            futures::future::join_all(records.into_iter().map(|ev| self.telemetry.record_now(ev))).await;
        }
        let m = &self.telemetry.metrics;
        m.queue_actions.with_label_values(&[action.name()]).inc();
        m.queue_action_jobs
            .with_label_values(&[action.name()])
            .inc_by(report.touched as u64);
        tracing::info!(action = action.name(), actor = %actor.0, touched = report.touched, in_flight = report.in_flight, "bulk queue action");
        Ok(report)
    }

    /// Mirrors `spec.suspended` into holds: a hold for each suspended route that has none, and
    /// the release of each hold of a route no longer suspended. Every relay runs it; it converges
    /// whatever order they see a new configuration in.
    pub async fn sync_suspended(&self) -> Result<(), QueueError> {
        let snap = self.config.get();
        if snap.generation == 0 {
            return Ok(());
        }
        let suspended: HashSet<&str> = snap
            .config
            .routes
            .iter()
            .filter(|r| r.suspended)
            .map(|r| r.id.as_str())
            .collect();
        let mut holds = self.refresh_holds().await?;
        let now = now_ms();
        // Lapsed admin holds go; the jobs they held come due at the lapse and are attempted.
        for h in holds.iter().filter(|h| !h.active(now)) {
            self.queue.remove_hold(&h.key()).await?;
        }
        if holds.iter().any(|h| !h.active(now)) {
            holds = self.refresh_holds().await?;
        }
        for id in &suspended {
            let key = hold_key(&HoldRule::Route((*id).to_owned()), None);
            if !holds.iter().any(|h| h.key() == key) {
                let hold = Hold {
                    rule: HoldRule::Route((*id).to_owned()),
                    namespace: None,
                    by: format!("SmtpRoute {id} (spec.suspended)"),
                    since_ms: now,
                    until_ms: None,
                    source: HoldSource::Spec,
                };
                self.queue.put_hold(&hold).await?;
                tracing::info!(route = %id, "route suspended: its mail is held");
            }
        }
        for h in holds.iter().filter(|h| h.source == HoldSource::Spec) {
            if let HoldRule::Route(id) = &h.rule
                && !suspended.contains(id.as_str())
            {
                let actor = Actor(format!("SmtpRoute {id} (unsuspended)"));
                if let Some(r) = self.release(&h.rule, None, &actor).await? {
                    tracing::info!(route = %id, released = r.touched, "route no longer suspended: its mail is released");
                }
            }
        }
        if !suspended.is_empty() {
            self.refresh_holds().await?;
        }
        Ok(())
    }

    /// The hold that applies to a job now, if any, and until when (the worker asks before each
    /// attempt).
    pub fn held(&self, j: &JobFacts<'_>, job: &Job, now_ms: i64) -> Option<(Hold, i64)> {
        let holds = self.cached_holds();
        rules::held_until(&holds, j, job.held_since, job.held_ms, self.max_hold, now_ms).map(|(h, u)| (h.clone(), u))
    }
}

/// `job` out of its hold at `now_ms`: the time held is added to what extends its lifetime.
pub fn released(job: &Job, now_ms: i64) -> Job {
    let held = job.held_since.map_or(0, |s| (now_ms - s).max(0) as u64);
    Job {
        held_since: None,
        held_ms: job.held_ms + held,
        ..job.clone()
    }
}

/// `filter` limited to `namespace`'s mail, when given.
fn scoped(mut filter: QueueFilter, namespace: Option<&str>) -> QueueFilter {
    if let Some(ns) = namespace {
        filter.namespace = Some(rules::NamespaceSel::Named(ns.to_owned()));
    }
    filter
}

fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| format_time(&t))
        .unwrap_or_default()
}

/// A `held` record for a job the worker put on hold.
pub fn held_event(meta: &MessageMeta, idx: usize, hold: &Hold, until_ms: i64) -> DeliveryEvent {
    let mut ev = event_for(meta, EventResult::Held, idx);
    ev.actor = Some(hold.by.clone());
    ev.not_before = chrono::DateTime::from_timestamp_millis(until_ms);
    ev.reply_text = Some(format!("held by {}", hold.rule));
    ev
}
