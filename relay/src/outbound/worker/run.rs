//! The worker's loops: fetching jobs into free slots, renewing held leases, promoting due jobs,
//! reclaiming jobs of relays that stopped, reading the holds, and writing a job's outcome (with
//! its delivery-log records, where the queue stores the log) while the store is away.
//!
//! Owns which leases this process holds and the order of those queue calls. Must not decide
//! what happens to a job: that is `attempt`'s and `finish`'s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::Worker;
use crate::clock::now_ms;
use crate::observe::dlog::{DeliveryEvent, Encoded};
use crate::observe::liveness::{self, Heartbeat};
use crate::queue::{Completed, Disposition, Fetched, Leased, QueueError, Stored};

/// How long a job's outcome is kept and written again while the store cannot be reached.
const COMPLETE_RETRY_FOR: Duration = Duration::from_secs(600);

/// How long a fetch with its batch load may take before the delivery loop counts as wedged (Redis
/// calls time out well before).
const QUEUE_CALL_BOUND: Duration = Duration::from_secs(60);

/// The heartbeats of the delivery side that `/healthz` reads.
pub struct WorkerLiveness {
    /// The fetch loop: beats at each turn, and while waiting for a slot only as long as the
    /// jobs holding the slots are within `job_stuck_after`.
    pub fetch_loop: Heartbeat,
    /// The jobs in flight: silent once one has run for longer than `job_stuck_after`, longer
    /// than any attempt with its timeouts and the retried write of its outcome can take.
    pub jobs: Heartbeat,
    pub job_stuck_after: Duration,
}

/// Leases this process is working on, with when each job started; [`Worker::renew_loop`] keeps
/// them alive together. A job keeps its lease until its outcome is written, however long the
/// store is away.
#[derive(Clone, Default)]
struct Held(Arc<Mutex<HashMap<String, tokio::time::Instant>>>, Arc<AtomicI64>);

/// Removes its lease from [`Held`] when the job's task ends, however it ends.
struct HeldLease {
    held: Held,
    lease: String,
}

impl Held {
    fn set(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::time::Instant>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn hold(&self, lease: &str) -> HeldLease {
        self.set().insert(lease.to_owned(), tokio::time::Instant::now());
        HeldLease {
            held: self.clone(),
            lease: lease.to_owned(),
        }
    }

    fn leases(&self) -> Vec<String> {
        self.set().keys().cloned().collect()
    }

    fn contains(&self, lease: &str) -> bool {
        self.set().contains_key(lease)
    }

    /// Whether every job held has run for at most `bound`.
    fn none_older_than(&self, bound: Duration) -> bool {
        self.set().values().all(|started| started.elapsed() <= bound)
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
    /// Runs until `shutdown` turns true; in-flight deliveries finish first, or, when
    /// `give_back_at` names an instant before they did, their jobs are given back to the queue
    /// for another relay to take over at once.
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        live: WorkerLiveness,
        mut give_back_at: watch::Receiver<Option<tokio::time::Instant>>,
    ) {
        let sem = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let held = Held::default();
        let stuck_after = live.job_stuck_after;
        let jobs_moving = {
            let held = held.clone();
            move || held.none_older_than(stuck_after)
        };
        let mut watchdog_stop = shutdown.clone();
        let watchdog = tokio::spawn(liveness::watch(live.jobs, jobs_moving.clone(), async move {
            let _ = watchdog_stop.changed().await;
        }));
        let hb = live.fetch_loop;
        let promoter = tokio::spawn(self.clone().promote_loop(shutdown.clone()));
        let holder = tokio::spawn(self.clone().hold_loop(shutdown.clone()));
        let reclaimer = tokio::spawn(self.clone().reclaim_loop(sem.clone(), held.clone(), shutdown.clone()));
        // Not stopped by shutdown: the drain below still needs its leases kept.
        let renewer = tokio::spawn(self.clone().renew_loop(held.clone()));
        loop {
            hb.beat();
            if *shutdown.borrow() {
                break;
            }
            // Wait for a free slot before taking jobs, so leases never sit unattended.
            let permit = tokio::select! {
                _ = shutdown.changed() => break,
                p = liveness::beating_while(&hb, &jobs_moving, sem.clone().acquire_owned()) => match p { Ok(p) => p, Err(_) => break },
            };
            let free = sem.available_permits() + 1;
            let batch = free.min(64);
            let bound = Some(tokio::time::Instant::now() + QUEUE_CALL_BOUND);
            let fetched = tokio::select! {
                _ = shutdown.changed() => { drop(permit); break }
                r = liveness::beating(&hb, bound, self.queue.fetch_loaded(&self.settings.consumer, batch, Duration::from_millis(1000))) => r,
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
            // Loaded with the batch; a job whose message was not loaded loads its own.
            let mut permit = Some(permit);
            for Fetched { leased, stored } in jobs {
                let p = match permit.take() {
                    Some(p) => p,
                    None => match liveness::beating_while(&hb, &jobs_moving, sem.clone().acquire_owned()).await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                self.spawn_job(&held, p, leased, stored.map(Ok));
            }
        }
        // Drain: wait until every in-flight delivery returned its permit, or give their jobs back.
        let all = self.settings.concurrency.max(1) as u32;
        let give_back = async {
            let at = match give_back_at.wait_for(Option::is_some).await {
                Ok(at) => *at,
                Err(_) => None,
            };
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sem.acquire_many(all) => {}
            () = give_back => {
                // Renewing would undo the release.
                renewer.abort();
                let leases = held.leases();
                match self.queue.release(&self.settings.consumer, &leases, self.settings.visibility_timeout).await {
                    Ok(n) => tracing::warn!(in_flight = leases.len(), given_back = n, "drain deadline: deliveries still in flight; their jobs are given back for another relay"),
                    Err(e) => tracing::warn!(error = %e, "drain deadline: giving jobs back failed; another relay takes them over after the visibility timeout"),
                }
            }
        }
        promoter.abort();
        holder.abort();
        reclaimer.abort();
        renewer.abort();
        watchdog.abort();
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
                    Ok(n) if n >= 1000 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "promoting due jobs failed");
                        break;
                    }
                }
            }
        }
    }

    /// Reads the holds into the cache the jobs consult, and mirrors `spec.suspended` into them.
    async fn hold_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.hold_refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.control.sync_suspended().await {
                tracing::warn!(error = %e, "reading the holds failed; the last ones read stay in force");
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
    pub(super) async fn complete(&self, leased: &Leased, d: Disposition) -> bool {
        self.complete_logged(leased, d, &[]).await.0.applied
    }

    /// [`Worker::complete`] with the outcome's log records (given to the queue to store in the
    /// same step where it stores the log); also says whether an attempt failed without an
    /// answer (it may have applied, records included).
    async fn complete_logged(&self, leased: &Leased, d: Disposition, log: &[Encoded]) -> (Completed, bool) {
        let deadline = tokio::time::Instant::now() + COMPLETE_RETRY_FOR;
        let most = (self.settings.visibility_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(2));
        let mut backoff = Duration::from_millis(50).min(most);
        let mut unanswered = false;
        loop {
            match self.queue.complete_logged(leased, d.clone(), log).await {
                Ok(done) => return (done, unanswered),
                Err(QueueError::Redis(e)) if tokio::time::Instant::now() < deadline => {
                    unanswered = true;
                    tracing::warn!(error = %e, message = %leased.job.msg, "writing a job's outcome failed; keeping it and retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(most);
                }
                Err(e) => {
                    tracing::error!(error = %e, message = %leased.job.msg, "completing job failed; it will be reclaimed");
                    let done = Completed {
                        applied: false,
                        logged: false,
                    };
                    return (done, true);
                }
            }
        }
    }

    /// Completes a lease and records its outcome's log records `evs`. Where the queue stores
    /// the delivery log, the records go into the complete's own step: stored with the
    /// completion, once, and no round trip of the log writer's. If the lease was gone (the job
    /// finished elsewhere after a reclaim) they are stored through the log's writer as before;
    /// not if an attempt went unanswered, since that attempt may have stored them. Elsewhere
    /// they are stored through the writer alongside the complete. The JSON lines and metrics
    /// are the same either way.
    pub(super) async fn complete_recorded(&self, leased: &Leased, d: Disposition, evs: Vec<DeliveryEvent>) -> bool {
        let dlog = &self.telemetry.dlog;
        let encoded: Option<Vec<Encoded>> = if self.queue.stores_log() {
            evs.iter()
                .map(|ev| dlog.encode(ev))
                .collect::<Result<_, _>>()
                .inspect_err(|e| tracing::warn!(error = %e, "delivery log records not encoded"))
                .ok()
        } else {
            None
        };
        let Some(encoded) = encoded else {
            let record = async {
                for ev in evs {
                    self.telemetry.record_now(ev).await;
                }
            };
            return tokio::join!(record, self.complete(leased, d)).1;
        };
        // Written as lines first, as `record` does before storing.
        for rec in &encoded {
            dlog.stored_elsewhere(rec);
        }
        let (done, unanswered) = self.complete_logged(leased, d, &encoded).await;
        if !done.logged && !unanswered {
            for rec in encoded {
                if let Err(e) = dlog.store_encoded(rec).await {
                    tracing::warn!(error = %e, "delivery log store unavailable; record kept on stdout only");
                }
            }
        }
        done.applied
    }
}
