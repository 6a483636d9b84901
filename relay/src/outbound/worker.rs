//! The delivery worker: takes jobs from the queue, chooses routes, attempts delivery, and moves
//! each job to its next state: delivered, retried on the route's schedule, paced, held for
//! quiet hours (logged as `scheduled`), bounced (with a DSN to the return-path) or expired.
//! Several workers on several pods share one queue.
//!
//! It owns the per-job decision sequence and the order of the queue writes. SMTP I/O is behind
//! [`Transport`], pacing behind [`Pacing`]; classification (`bounce`), schedules (`retry`), DSN
//! format (`dsn`) and route order (`route`) are pure modules it calls. It must not hold message
//! bodies longer than one attempt and the writing of its outcome (kept while the store is away,
//! at most one per worker slot).

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mailroute_api::config::{CompiledRoute, RelaySecrets, Target};
use mailroute_api::pattern::domain_of;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::clock::now_ms;
use crate::config::ConfigHandle;
use crate::observe::dlog::EventResult;
use crate::observe::telemetry::{Telemetry, event_for, scheduled_event};
use crate::outbound::bounce::{self, EnhancedStatusCode, Failure, Reply};
use crate::outbound::dsn;
use crate::outbound::retry::{self, Next, RetryPolicy};
use crate::queue::message::{Envelope, Job, MessageMeta, RecipientState, RecipientStatus, new_id};
use crate::queue::{Disposition, Leased, Queue, QueueError, Stored};

/// What one attempt through one route produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// 2xx to the end of DATA.
    Delivered { reply: Reply },
    /// Anything else: a failure reply or none (connection, DNS, TLS, timeout).
    Failed {
        cause: Cause,
        permanent: bool,
        class: bounce::BounceClass,
    },
}

/// What a failed attempt came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The server's reply.
    Reply(Reply),
    /// No reply: what happened, and the RFC 3463 status it stands for when the relay names one.
    NoReply {
        detail: String,
        status: Option<EnhancedStatusCode>,
    },
}

impl AttemptOutcome {
    /// The outcome of a reply, classified by the bounce table.
    pub fn from_reply(reply: Reply) -> Self {
        match bounce::classify_parsed(&reply) {
            None => AttemptOutcome::Delivered { reply },
            Some(v) => AttemptOutcome::Failed {
                cause: Cause::Reply(reply),
                permanent: v.is_permanent(),
                class: v.class,
            },
        }
    }

    /// A failure without a reply.
    pub fn from_failure(f: Failure, detail: impl Into<String>) -> Self {
        let v = f.verdict();
        AttemptOutcome::Failed {
            cause: Cause::NoReply {
                detail: detail.into(),
                status: None,
            },
            permanent: v.is_permanent(),
            class: v.class,
        }
    }

    /// The server's reply, if it answered.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            AttemptOutcome::Delivered { reply }
            | AttemptOutcome::Failed {
                cause: Cause::Reply(reply),
                ..
            } => Some(reply),
            AttemptOutcome::Failed { .. } => None,
        }
    }

    /// The reply, or what happened instead, on one line (recipient state, DSN reason).
    pub fn summary(&self) -> String {
        match self {
            AttemptOutcome::Failed {
                cause: Cause::NoReply { detail, .. },
                ..
            } => detail.clone(),
            _ => self.reply().map(Reply::to_string).unwrap_or_default(),
        }
    }

    /// The reply code, the enhanced status and the text as the delivery log records them.
    fn log_parts(&self) -> (Option<u16>, Option<EnhancedStatusCode>, String) {
        match self {
            AttemptOutcome::Failed {
                cause: Cause::NoReply { detail, status },
                ..
            } => (None, *status, detail.clone()),
            _ => match self.reply() {
                Some(r) => (Some(r.code), r.enhanced, r.text.clone()),
                None => (None, None, String::new()),
            },
        }
    }

    pub fn is_temporary(&self) -> bool {
        matches!(self, AttemptOutcome::Failed { permanent: false, .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub outcome: AttemptOutcome,
    pub remote_host: Option<String>,
    pub tls: bool,
    /// Recipient domain of the attempt (pacing scope).
    pub rcpt_domain: Option<String>,
}

/// What a [`Transport`] did with one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// It went to the route's next hop (delivered or not).
    Attempted(Attempt),
    /// Nothing was sent: no connection could be opened within a limit shared by the relays
    /// (`maxConnections`). Not an attempt; the job waits until `at_ms` (`reason` labels the
    /// paced-jobs metric).
    Paced { at_ms: i64, reason: &'static str },
}

/// Sends one message to one recipient through one route (smarthost or MX).
#[async_trait]
pub trait Transport: Send + Sync {
    async fn deliver(&self, route: &CompiledRoute, secrets: &RelaySecrets, env: &Envelope<'_>, body: &[u8])
    -> Delivery;
}

/// The pacer's answer for one send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaceDecision {
    /// Go now; the send is counted.
    Go,
    /// Not before `at_ms`; `reason` labels the paced-jobs metric.
    Wait { at_ms: i64, reason: &'static str },
}

/// Outbound pacing shared by all pods.
#[async_trait]
pub trait Pacing: Send + Sync {
    async fn acquire(&self, route: &CompiledRoute, rcpt_domain: &str, now_ms: i64) -> PaceDecision;
    /// Feedback after an attempt through `route` (rate-limit replies back the route off).
    async fn report(&self, route: &CompiledRoute, attempt: &Attempt, now_ms: i64);
}

#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub consumer: String,
    /// Concurrent deliveries in this process.
    pub concurrency: usize,
    /// A job leased longer than this is taken over by another relay.
    pub visibility_timeout: Duration,
    pub hostname: String,
    /// Deliver via MX when no route matches, instead of waiting for a route.
    pub fallback_mx: bool,
    /// How often due jobs are promoted from the schedule.
    pub promote_every: Duration,
}

pub struct Worker {
    pub queue: Arc<dyn Queue>,
    pub config: Arc<ConfigHandle>,
    pub transport: Arc<dyn Transport>,
    pub pacing: Arc<dyn Pacing>,
    pub telemetry: Telemetry,
    pub settings: WorkerSettings,
}

/// The route used when nothing matches and MX fallback is on.
fn fallback_route() -> CompiledRoute {
    CompiledRoute {
        id: "mx".into(),
        priority: i32::MAX,
        target: Target::Mx,
        recipient_domains: Vec::new(),
        senders: Default::default(),
        from_override: None,
        limits: Default::default(),
        retry: Default::default(),
        dkim: None,
        test_recipient: None,
        timeouts: Default::default(),
    }
}

/// The retry policy for a message: the first candidate route's, overridden by the message's
/// `X-Mailroute-Retry-Interval` / `X-Mailroute-Expire`.
pub fn policy_for(route: Option<&CompiledRoute>, meta: &MessageMeta) -> RetryPolicy {
    let rc = route.map(|r| r.retry.clone()).unwrap_or_default();
    let mut p = RetryPolicy {
        interval: Duration::from_secs(rc.interval_secs.max(1)),
        lifetime: Duration::from_secs(rc.lifetime_secs.max(1)),
        backoff: match rc.backoff {
            mailroute_api::route::Backoff::Fixed => retry::Backoff::Fixed,
            mailroute_api::route::Backoff::Exponential => retry::Backoff::Exponential {
                factor: 2.0,
                max_interval: Duration::from_secs(rc.max_interval_secs.max(rc.interval_secs).max(1)),
            },
        },
    };
    if let Some(i) = meta.options.retry_interval_secs {
        p.interval = Duration::from_secs(i.max(1));
        if let retry::Backoff::Exponential { max_interval, .. } = &mut p.backoff {
            *max_interval = (*max_interval).max(p.interval);
        }
    }
    if let Some(exp) = meta.options.expire_at_ms {
        let ms = (exp - meta.received_at_ms).max(1000);
        p.lifetime = Duration::from_millis(ms as u64);
    }
    p
}

/// The decision after all routes were tried for one attempt. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Delivered,
    Bounce { class: bounce::BounceClass },
    Retry { at_ms: i64 },
    Expired,
}

/// What to do after an attempt whose last outcome was `last`: permanent failures bounce,
/// temporary ones retry on `policy` unless the lifetime is over.
pub fn decide(last: &AttemptOutcome, policy: &RetryPolicy, meta: &MessageMeta, now_ms: i64, attempts: u32) -> Decision {
    match last {
        AttemptOutcome::Delivered { .. } => Decision::Delivered,
        AttemptOutcome::Failed {
            permanent: true, class, ..
        } => Decision::Bounce { class: *class },
        AttemptOutcome::Failed { .. } => match retry::next_attempt(policy, meta.received_at_ms, now_ms, attempts) {
            Next::RetryAt(at) => Decision::Retry { at_ms: at },
            Next::Expired => Decision::Expired,
        },
    }
}

/// How long a job's outcome is kept and written again while the store cannot be reached.
const COMPLETE_RETRY_FOR: Duration = Duration::from_secs(600);

/// Leases this process is working on; [`Worker::renew_loop`] keeps them alive together. A job
/// keeps its lease until its outcome is written, however long the store is away.
#[derive(Clone, Default)]
struct Held(Arc<Mutex<HashSet<String>>>, Arc<AtomicI64>);

/// Removes its lease from [`Held`] when the job's task ends, however it ends.
struct HeldLease {
    held: Held,
    lease: String,
}

impl Held {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn hold(&self, lease: &str) -> HeldLease {
        self.set().insert(lease.to_owned());
        HeldLease {
            held: self.clone(),
            lease: lease.to_owned(),
        }
    }

    fn leases(&self) -> Vec<String> {
        self.set().iter().cloned().collect()
    }

    fn contains(&self, lease: &str) -> bool {
        self.set().contains(lease)
    }

    /// Notes that the store could not be reached (renewing or reclaiming failed).
    fn store_failed(&self) {
        self.1.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether the store failed within the last `window`: leases of live relays may then look
    /// idle until those relays had the time to renew them.
    fn store_failed_within(&self, window: Duration) -> bool {
        now_ms() - self.1.load(Ordering::Relaxed) < window.as_millis() as i64
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.held.set().remove(&self.lease);
    }
}

impl Worker {
    /// Runs until `shutdown` turns true; in-flight deliveries finish first.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let sem = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let held = Held::default();
        let promoter = tokio::spawn(self.clone().promote_loop(shutdown.clone()));
        let reclaimer = tokio::spawn(self.clone().reclaim_loop(sem.clone(), held.clone(), shutdown.clone()));
        // Not stopped by shutdown: the drain below still needs its leases kept.
        let renewer = tokio::spawn(self.clone().renew_loop(held.clone()));
        loop {
            if *shutdown.borrow() {
                break;
            }
            // Wait for a free slot before taking jobs, so leases never sit unattended.
            let permit = tokio::select! {
                _ = shutdown.changed() => break,
                p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let free = sem.available_permits() + 1;
            let batch = free.min(64);
            let fetched = tokio::select! {
                _ = shutdown.changed() => { drop(permit); break }
                r = self.queue.fetch(&self.settings.consumer, batch, Duration::from_millis(1000)) => r,
            };
            let jobs = match fetched {
                Ok(j) => j,
                Err(e) => {
                    drop(permit);
                    held.store_failed();
                    tracing::warn!(error = %e, "queue fetch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // Bodies for the whole batch in one round trip; on failure each job loads its own.
            let ids: Vec<&str> = jobs.iter().map(|l| l.job.msg.as_str()).collect();
            let loaded: Vec<Option<Result<Option<Stored>, QueueError>>> = match self.queue.load_many(&ids).await {
                Ok(v) if v.len() == jobs.len() => v.into_iter().map(|s| Some(Ok(s))).collect(),
                _ => jobs.iter().map(|_| None).collect(),
            };
            let mut permit = Some(permit);
            for (leased, stored) in jobs.into_iter().zip(loaded) {
                let p = match permit.take() {
                    Some(p) => p,
                    None => match sem.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                self.spawn_job(&held, p, leased, stored);
            }
        }
        // Drain: wait until every in-flight delivery returned its permit.
        let _ = sem.acquire_many(self.settings.concurrency.max(1) as u32).await;
        promoter.abort();
        reclaimer.abort();
        renewer.abort();
    }

    /// Works on `leased` in a task of its own, keeping its lease renewed and `permit` taken
    /// until the job is done. `stored`: the message if it was loaded with its batch.
    fn spawn_job(
        self: &Arc<Self>,
        held: &Held,
        permit: OwnedSemaphorePermit,
        leased: Leased,
        stored: Option<Result<Option<Stored>, QueueError>>,
    ) {
        let me = self.clone();
        let lease = held.hold(&leased.lease);
        tokio::spawn(async move {
            match stored {
                Some(stored) => me.process_loaded(leased, stored).await,
                None => me.process(leased).await,
            }
            drop((lease, permit));
        });
    }

    /// Renews every held lease a few times per visibility timeout, so only a relay that stopped
    /// (or stalled for longer than the timeout) loses its jobs to another one.
    async fn renew_loop(self: Arc<Self>, held: Held) {
        let every = (self.settings.visibility_timeout / 3).max(Duration::from_millis(50));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let leases = held.leases();
            if leases.is_empty() {
                continue;
            }
            match self.queue.renew(&self.settings.consumer, &leases).await {
                // Fewer: completed since the snapshot, or taken over after a stall.
                Ok(n) => tracing::debug!(held = leases.len(), renewed = n, "renewed leases"),
                Err(e) => {
                    held.store_failed();
                    tracing::warn!(error = %e, "renewing leases failed; retrying next tick");
                }
            }
        }
    }

    async fn promote_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.promote_every);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            loop {
                match self.queue.promote_due(now_ms(), 1000).await {
                    Ok(1000) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "promoting due jobs failed");
                        break;
                    }
                }
            }
        }
    }

    async fn reclaim_loop(self: Arc<Self>, sem: Arc<Semaphore>, held: Held, mut shutdown: watch::Receiver<bool>) {
        let every = (self.settings.visibility_timeout / 4).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let free = sem.available_permits();
            // After the store was away, every lease looks idle for as long as it was: give the
            // relays still working on theirs one visibility timeout to renew them first.
            if free == 0 || held.store_failed_within(self.settings.visibility_timeout) {
                continue;
            }
            match self
                .queue
                .reclaim(&self.settings.consumer, self.settings.visibility_timeout, free)
                .await
            {
                Ok(jobs) => {
                    // Its own jobs still running here (outcome not yet written) stay with their task.
                    for leased in jobs.into_iter().filter(|l| !held.contains(&l.lease)) {
                        tracing::info!(message = %leased.job.msg, rcpt = leased.job.rcpt, "reclaimed a job from a relay that stopped");
                        self.telemetry.metrics.jobs_reclaimed.inc();
                        let Ok(p) = sem.clone().acquire_owned().await else {
                            return;
                        };
                        self.spawn_job(&held, p, leased, None);
                    }
                }
                Err(e) => {
                    held.store_failed();
                    tracing::warn!(error = %e, "reclaiming jobs failed");
                }
            }
        }
    }

    /// Completes a lease. While the store cannot be reached the outcome is kept and written
    /// again (with back-off, for up to [`COMPLETE_RETRY_FOR`]); the job's task, its lease
    /// (renewed meanwhile) and its worker slot stay taken, so the outcomes kept are bounded by
    /// the concurrency and no other relay repeats a finished delivery. Past that the job is
    /// reclaimed after the visibility timeout: delivered at least once.
    async fn complete(&self, leased: &Leased, d: Disposition) {
        let deadline = tokio::time::Instant::now() + COMPLETE_RETRY_FOR;
        let most = (self.settings.visibility_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(2));
        let mut backoff = Duration::from_millis(50).min(most);
        loop {
            match self.queue.complete(leased, d.clone()).await {
                Ok(_) => return,
                Err(QueueError::Redis(e)) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, message = %leased.job.msg, "writing a job's outcome failed; keeping it and retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(most);
                }
                Err(e) => {
                    tracing::error!(error = %e, message = %leased.job.msg, "completing job failed; it will be reclaimed");
                    return;
                }
            }
        }
    }

    /// One job, start to end. Never panics on stored data; a broken record is dropped loudly.
    pub async fn process(&self, leased: Leased) {
        let stored = self.queue.load(&leased.job.msg).await;
        self.process_loaded(leased, stored).await;
    }

    /// [`Worker::process`] with the message already loaded.
    async fn process_loaded(&self, leased: Leased, stored: Result<Option<Stored>, QueueError>) {
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
            self.telemetry
                .record_now(event_for(meta, EventResult::Cancelled, idx))
                .await;
            self.complete(
                &leased,
                Disposition::Final {
                    state: state(RecipientStatus::Cancelled, job.attempts, None, None),
                },
            )
            .await;
            return;
        }
        let snap = self.config.get();
        let domain = domain_of(&rcpt)
            .and_then(|d| crate::outbound::route::ascii_domain(&d))
            .unwrap_or_default();
        let mut routes: Vec<CompiledRoute> =
            crate::outbound::route::candidates(&snap.config, &meta.mail_from, meta.auth_user.as_deref(), &domain)
                .into_iter()
                .cloned()
                .collect();
        if routes.is_empty() && self.settings.fallback_mx {
            routes.push(fallback_route());
        }
        let policy = policy_for(routes.first(), meta);
        let now = now_ms();
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
                AttemptOutcome::from_failure(Failure::Expired, "queue lifetime exceeded")
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
        let mut last: Option<(Attempt, &CompiledRoute)> = None;
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
                Delivery::Attempted(a) => a,
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
            self.pacing.report(route, &attempt, now_ms()).await;
            let temporary = attempt.outcome.is_temporary();
            let result = match &attempt.outcome {
                AttemptOutcome::Delivered { .. } => "delivered",
                _ if temporary => "deferred",
                _ => "bounced",
            };
            self.telemetry
                .metrics
                .delivery_attempts
                .with_label_values(&[&route.id, result])
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
        match decide(&attempt.outcome, &policy, meta, now, attempts) {
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
                    Some((attempt.outcome.summary(), route.id.clone())),
                );
                // Sent together, the record and the completion reach Redis in the same event-loop
                // turn (one fsync with appendfsync always) instead of one wait after the other.
                tokio::join!(
                    self.telemetry.record_now(ev),
                    self.complete(&leased, Disposition::Final { state: st })
                );
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
                    Some((attempt.outcome.summary(), route.id.clone())),
                );
                let job = Job { attempts, ..job };
                let reschedule = Disposition::Reschedule {
                    job,
                    due_ms: at_ms,
                    state: st,
                };
                tokio::join!(self.telemetry.record_now(ev), self.complete(&leased, reschedule));
            }
            d @ (Decision::Bounce { .. } | Decision::Expired) => {
                let expired = d == Decision::Expired;
                let via = Some((route, &attempt));
                self.fail(this, via, &attempt.outcome, expired).await
            }
        }
    }

    /// No route serves the recipient: a gap in the configuration (a reload during a rollout, a
    /// route left out while its Secret is broken), not a verdict on the mail. Accepted mail
    /// waits on the retry schedule and only expires at the end of its lifetime; it is never
    /// bounced for this. A DSN without a route is reported loudly: its sender learns nothing.
    async fn no_route(&self, r: Recipient<'_>, job: Job, domain: &str, policy: &RetryPolicy) {
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
        tokio::join!(self.telemetry.record_now(ev), self.complete(leased, reschedule));
    }

    /// The first route has no capacity now (rate, daily budget, back-off or connections):
    /// counted by route and reason, then the job waits.
    async fn paced(&self, leased: &Leased, job: Job, at_ms: i64, reason: &str, route: &str) {
        self.telemetry
            .metrics
            .paced_jobs
            .with_label_values(&[route, reason])
            .inc();
        self.wait(leased, job, at_ms, reason, Some(route)).await;
    }

    async fn wait(&self, leased: &Leased, job: Job, at_ms: i64, reason: &str, route: Option<&str>) {
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
    async fn fail(
        &self,
        r: Recipient<'_>,
        via: Option<(&CompiledRoute, &Attempt)>,
        outcome: &AttemptOutcome,
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
        let route_id = via.map(|(r, _)| r.id.clone()).unwrap_or_else(|| "none".into());
        let class = match outcome {
            _ if expired => bounce::BounceClass::Expired,
            AttemptOutcome::Failed { class, .. } => *class,
            AttemptOutcome::Delivered { .. } => bounce::BounceClass::Other,
        };
        let code = outcome.reply().map(|r| r.code);
        let result = if expired {
            EventResult::Expired
        } else {
            EventResult::Bounced
        };
        let mut ev = event_for(meta, result, idx);
        if let Some((r, a)) = via {
            fill(&mut ev, r, a, attempts);
        } else {
            log_outcome(&mut ev, outcome);
            ev.attempt = Some(attempts);
        }
        ev.bounce_class = Some(class.as_str().to_owned());
        self.telemetry.record_now(ev).await;
        let m = &self.telemetry.metrics;
        if expired {
            m.expired.with_label_values(&[&route_id]).inc();
        }
        m.bounces
            .with_label_values(&[&route_id, &crate::observe::metrics::code_label(code), class.as_str()])
            .inc();

        if !meta.is_dsn && dsn::should_bounce(&meta.mail_from) {
            if let Err(e) = self
                .send_dsn(meta, body, rcpt, via.map(|(_, a)| a), outcome, expired)
                .await
            {
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

    async fn send_dsn(
        &self,
        meta: &MessageMeta,
        body: &[u8],
        rcpt: &str,
        attempt: Option<&Attempt>,
        outcome: &AttemptOutcome,
        expired: bool,
    ) -> anyhow::Result<()> {
        let now = crate::clock::now();
        let (status, diagnostic) = match (outcome.reply(), outcome) {
            (Some(reply), _) => (dsn::status_for_reply(reply), Some(reply.clone())),
            (None, AttemptOutcome::Failed { class, .. }) => (status_for_class(*class, expired), None),
            (None, AttemptOutcome::Delivered { .. }) => (status_for_class(bounce::BounceClass::Other, expired), None),
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
            remote_mta: attempt.and_then(|a| a.remote_host.clone()),
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
            listener: "dsn".into(),
            auth_user: None,
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

/// The recipient a job is about, with its lease and message, as the failure paths need them.
#[derive(Clone, Copy)]
struct Recipient<'a> {
    leased: &'a Leased,
    meta: &'a MessageMeta,
    body: &'a [u8],
    /// Its index among the message's recipients.
    idx: usize,
    rcpt: &'a str,
}

/// What "no route serves the recipient" counts as: a temporary failure of class `no_route`.
pub fn no_route_outcome(domain: &str) -> AttemptOutcome {
    AttemptOutcome::Failed {
        cause: Cause::NoReply {
            detail: format!("4.4.4 No route configured for recipient domain {domain}"),
            status: Some(EnhancedStatusCode::new(4, 4, 4)),
        },
        permanent: false,
        class: bounce::BounceClass::NoRoute,
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

fn state(status: RecipientStatus, attempts: u32, next: Option<i64>, last: Option<(String, String)>) -> RecipientState {
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

fn fill(ev: &mut crate::observe::dlog::DeliveryEvent, route: &CompiledRoute, a: &Attempt, attempt_no: u32) {
    ev.route = Some(route.id.clone());
    ev.remote_host = a.remote_host.clone();
    ev.tls = a.tls;
    ev.attempt = Some(attempt_no);
    log_outcome(ev, &a.outcome);
    if let AttemptOutcome::Failed { class, .. } = &a.outcome {
        ev.bounce_class = Some(class.as_str().to_owned());
    }
}

/// The reply (or what happened instead) in the delivery log's fields.
fn log_outcome(ev: &mut crate::observe::dlog::DeliveryEvent, outcome: &AttemptOutcome) {
    let (code, enhanced, text) = outcome.log_parts();
    ev.reply_code = code;
    ev.enhanced_code = enhanced.map(|e| e.to_string());
    ev.reply_text = Some(text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(received: i64) -> MessageMeta {
        MessageMeta {
            id: "m".into(),
            received_at_ms: received,
            source_ip: "127.0.0.1".into(),
            listener: "smtp".into(),
            auth_user: None,
            tls: false,
            mail_from: "a@b.example".into(),
            rcpts: vec!["c@d.example".into()],
            message_id_header: None,
            size: 1,
            options: Default::default(),
            quota: None,
            is_dsn: false,
        }
    }

    #[test]
    fn decisions_follow_reply_class_and_lifetime() {
        let m = meta(0);
        let p = policy_for(None, &m);
        assert_eq!(p.interval, Duration::from_secs(60));
        assert_eq!(p.lifetime, Duration::from_secs(1800));
        let ok = AttemptOutcome::from_reply(Reply::new(250, "2.0.0 ok"));
        assert_eq!(decide(&ok, &p, &m, 10, 1), Decision::Delivered);
        let temp = AttemptOutcome::from_reply(Reply::new(451, "4.3.0 try later"));
        assert_eq!(decide(&temp, &p, &m, 10_000, 1), Decision::Retry { at_ms: 70_000 });
        assert_eq!(decide(&temp, &p, &m, 1_800_000, 31), Decision::Expired);
        let perm = AttemptOutcome::from_reply(Reply::new(550, "5.1.1 user unknown"));
        assert_eq!(
            decide(&perm, &p, &m, 10, 1),
            Decision::Bounce {
                class: bounce::BounceClass::InvalidRecipient
            }
        );
        let refused = AttemptOutcome::from_failure(Failure::ConnectionRefused, "refused");
        assert!(matches!(decide(&refused, &p, &m, 10, 1), Decision::Retry { .. }));
        let nx = AttemptOutcome::from_failure(Failure::DnsNoSuchDomain, "NXDOMAIN");
        assert!(matches!(decide(&nx, &p, &m, 10, 1), Decision::Bounce { .. }));
    }

    #[test]
    fn no_route_is_deferred_until_the_lifetime_ends() {
        let m = meta(0);
        let p = policy_for(None, &m);
        let none = no_route_outcome("d.example");
        assert!(none.is_temporary());
        assert_eq!(decide(&none, &p, &m, 10_000, 1), Decision::Retry { at_ms: 70_000 });
        assert_eq!(decide(&none, &p, &m, 1_800_000, 31), Decision::Expired);
        let AttemptOutcome::Failed { class, .. } = none else {
            unreachable!("a failure")
        };
        assert_eq!(class.as_str(), "no_route");
    }

    #[test]
    fn message_headers_override_the_route_policy() {
        let mut m = meta(1_000);
        m.options.retry_interval_secs = Some(5);
        m.options.expire_at_ms = Some(1_000 + 120_000);
        let p = policy_for(None, &m);
        assert_eq!(p.interval, Duration::from_secs(5));
        assert_eq!(p.lifetime, Duration::from_secs(120));
        let temp = AttemptOutcome::from_reply(Reply::new(421, "4.7.0 busy"));
        assert_eq!(decide(&temp, &p, &m, 2_000, 1), Decision::Retry { at_ms: 7_000 });
        assert_eq!(decide(&temp, &p, &m, 121_000, 9), Decision::Expired);
    }
}
