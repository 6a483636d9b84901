//! The delivery queue shared by all relay pods: messages (stored once), one job per recipient,
//! a ready stream, a schedule for retries and delayed jobs, leases reclaimed from crashed relays.
//!
//! This module owns storage and the atomic state transitions only. It must not decide when a
//! job is due or whether it failed (that is `retry`, `bounce` and the worker); callers pass in
//! every instant. Two implementations: [`redis::RedisQueue`] (durable, shared) and
//! [`memory::MemoryQueue`] (one process, lost on exit; for local runs and unit tests). The
//! records they store are in [`message`]; where the queue lives, checked once, is [`QueueUrl`].
//! Bulk queue control ([`Queue::scan`], [`Queue::apply`], holds) moves jobs between the ready
//! stream, the schedule and the held set on the caller's exact instructions; which jobs, and
//! what they become, is `control`'s to decide.

pub mod memory;
pub mod message;
pub mod record;
pub mod redis;
mod url;

pub use url::{QueueUrl, QueueUrlError};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::control::rules::Hold;
use crate::queue::message::{Job, MessageMeta, RecipientState};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("durability not reached: {0}")]
    Durability(String),
    #[error("{0}")]
    Unsupported(&'static str),
}

pub type Result<T> = std::result::Result<T, QueueError>;

/// A job handed to one consumer until it is completed or its lease expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leased {
    /// Lease handle (the stream entry id for Redis).
    pub lease: String,
    pub job: Job,
}

/// A stored message with its body.
#[derive(Clone, Debug)]
pub struct Stored {
    pub meta: MessageMeta,
    pub body: Bytes,
    pub cancelled: bool,
}

/// A job [`Queue::fetch_loaded`] took, with its message when it was loaded with the batch.
#[derive(Debug)]
pub struct Fetched {
    pub leased: Leased,
    /// `Some(None)`: the record is gone (aborted or purged); `None`: not loaded with the batch
    /// (the job loads it itself).
    pub stored: Option<Option<Stored>>,
}

/// What [`Queue::complete_logged`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    /// As [`Queue::complete`] returns it.
    pub applied: bool,
    /// The store took the log records in the same step (the lease was still this one's).
    pub logged: bool,
}

/// What happens to a leased job.
#[derive(Clone, Debug)]
pub enum Disposition {
    /// Back into the schedule, due at `due_ms`, with the updated job (attempts/waits).
    Reschedule {
        job: Job,
        due_ms: i64,
        state: RecipientState,
    },
    /// The recipient is final (delivered, bounced, expired, cancelled); the message record
    /// goes when its last recipient is final.
    Final { state: RecipientState },
    /// Into the held set (a hold applies to it), due at `due_ms` when the hold lapses for it;
    /// back into the ready stream as leased instead if the hold stored under key `hold` is gone
    /// (released meanwhile, another relay's cache was behind).
    Hold {
        job: Job,
        due_ms: i64,
        state: RecipientState,
        hold: String,
    },
}

/// Where a queued job sits, as [`Queue::scan`] found it; [`Queue::apply`] acts on it only if it
/// is still exactly there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// An entry of the ready stream.
    Ready { entry: String },
    /// A member of the schedule.
    Scheduled { member: String, due_ms: i64 },
    /// A member of the held set.
    Held { member: String, due_ms: i64 },
}

/// One queued job with its message (`None` when the record is gone).
#[derive(Clone, Debug)]
pub struct QueuedJob {
    pub place: Place,
    pub job: Job,
    /// A relay holds its lease (in the ready stream only).
    pub in_flight: bool,
    pub meta: Option<Arc<MessageMeta>>,
}

/// Where [`Queue::scan`] goes on: the held set, then the schedule, then the ready stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanCursor {
    Held(u64),
    Scheduled(u64),
    /// After this stream entry.
    Ready(String),
}

/// One step of a bulk action, applied only if the job is still at its place (and, in the
/// ready stream, no relay holds it).
#[derive(Clone, Debug)]
pub enum BulkOp {
    /// Removes the job and makes its recipient final with `state` (cancelled).
    Cancel {
        place: Place,
        rcpt: u32,
        msg: String,
        state: RecipientState,
    },
    /// Moves a scheduled or held job into the ready stream as `job`.
    Ready { place: Place, msg: String, job: Job },
    /// Moves a ready or scheduled job into the held set as `job`, due at `due_ms`.
    Hold {
        place: Place,
        msg: String,
        job: Job,
        due_ms: i64,
    },
}

/// What [`Queue::cancel`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// No such message (unknown, or every recipient already final).
    NotFound,
    /// It was cancelled before.
    AlreadyCancelled,
    Cancelled {
        /// Recipients (indexes) made final as cancelled now; their jobs are gone.
        now: Vec<u32>,
        /// Recipients whose job a worker holds at this moment: they may still be delivered.
        in_flight: Vec<u32>,
    },
}

/// Per-message view for the admin API.
#[derive(Clone, Debug, Serialize)]
pub struct MessageView {
    pub meta: MessageMeta,
    pub cancelled: bool,
    pub pending: i64,
    pub recipients: Vec<(String, Option<RecipientState>)>,
}

/// Queue depth figures for metrics and autoscaling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Jobs waiting in the ready stream, not yet handed to a consumer.
    pub ready: u64,
    /// Jobs handed out and not completed.
    pub inflight: u64,
    /// Jobs waiting for a retry or a start time.
    pub scheduled: u64,
    /// Jobs held by a hold (bulk queue control).
    pub held: u64,
    /// Stored messages.
    pub messages: u64,
    /// Age of the oldest ready or in-flight job, ms (0 when empty).
    pub oldest_age_ms: u64,
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Whether an acknowledged enqueue survives a crash of this process.
    fn durable(&self) -> bool;

    /// Stores the message and its jobs in one atomic step; returns only once the store
    /// acknowledged it (and replicas, if configured). `due_ms` None = ready now.
    async fn enqueue(&self, meta: &MessageMeta, body: &[u8], jobs: &[(Job, Option<i64>)]) -> Result<()>;

    /// [`Queue::enqueue`], except that jobs whose recipient is on a suppression list of
    /// `screen` (checked in the same step as the commit, see `crate::suppress`) are not
    /// queued: their recipients are final (`suppressed`) and returned as (recipient index,
    /// scope id). A store without the lists queues everything.
    async fn enqueue_screened(
        &self,
        meta: &MessageMeta,
        body: &[u8],
        jobs: &[(Job, Option<i64>)],
        _screen: &crate::suppress::Screen,
    ) -> Result<Vec<(u32, String)>> {
        self.enqueue(meta, body, jobs).await.map(|()| Vec::new())
    }

    /// Whether [`Queue::enqueue_logged`] stores the records it is given in the delivery log.
    fn stores_log(&self) -> bool {
        false
    }

    /// [`Queue::enqueue_screened`] (or [`Queue::enqueue`] without `screen`) that, where
    /// [`Queue::stores_log`], also stores `log` (the message's `received`/`scheduled` records) in
    /// the delivery log in the same atomic step as the jobs become visible, so no worker's
    /// record of the message can precede them; a commit retried after a lost reply stores them
    /// once. Elsewhere `log` is ignored: the caller stores it.
    async fn enqueue_logged(
        &self,
        meta: &MessageMeta,
        body: &[u8],
        jobs: &[(Job, Option<i64>)],
        screen: Option<&crate::suppress::Screen>,
        _log: &[crate::observe::dlog::Encoded],
    ) -> Result<Vec<(u32, String)>> {
        match screen {
            Some(s) => self.enqueue_screened(meta, body, jobs, s).await,
            None => self.enqueue(meta, body, jobs).await.map(|()| Vec::new()),
        }
    }

    /// Moves scheduled jobs due at `now_ms` into the ready stream. Safe to call from every pod.
    async fn promote_due(&self, now_ms: i64, max: usize) -> Result<usize>;

    /// Takes up to `max` ready jobs for `consumer`, waiting up to `block` for one to arrive.
    async fn fetch(&self, consumer: &str, max: usize, block: Duration) -> Result<Vec<Leased>>;

    /// Takes over jobs leased to any consumer longer than `min_idle` ago (a crashed relay).
    async fn reclaim(&self, consumer: &str, min_idle: Duration, max: usize) -> Result<Vec<Leased>>;

    /// Restarts the visibility timeout of leases `consumer` still holds, so a delivery that
    /// takes longer than the timeout is not taken over by another relay while this one is
    /// alive. Leases held by someone else (taken over after this relay stalled) or already
    /// completed are left alone. Returns how many were renewed.
    async fn renew(&self, consumer: &str, leases: &[String]) -> Result<usize>;

    /// Gives back leases `consumer` still holds without an outcome (a drain that reached its
    /// deadline): each looks idle for `idle`, so the next reclaim by any relay with that
    /// visibility timeout takes it over instead of waiting for the timeout to pass. Returns
    /// how many were given back; a store that cannot be shared returns 0.
    async fn release(&self, _consumer: &str, _leases: &[String], _idle: Duration) -> Result<usize> {
        Ok(0)
    }

    /// [`Queue::fetch`] with each job's message loaded (one round trip per batch where the
    /// store can). Waits up to `block` for a job as `fetch` does; a batch whose load failed is
    /// returned not loaded, so no lease taken is left unattended.
    async fn fetch_loaded(&self, consumer: &str, max: usize, block: Duration) -> Result<Vec<Fetched>> {
        let jobs = self.fetch(consumer, max, block).await?;
        let ids: Vec<&str> = jobs.iter().map(|l| l.job.msg.as_str()).collect();
        let loaded: Vec<Option<Option<Stored>>> = match self.load_many(&ids).await {
            Ok(v) if v.len() == jobs.len() => v.into_iter().map(Some).collect(),
            _ => jobs.iter().map(|_| None).collect(),
        };
        Ok(jobs
            .into_iter()
            .zip(loaded)
            .map(|(leased, stored)| Fetched { leased, stored })
            .collect())
    }

    /// The message and its body, None if it no longer exists.
    async fn load(&self, msg_id: &str) -> Result<Option<Stored>>;

    /// [`Queue::load`] for several messages at once (one round trip where the store can).
    async fn load_many(&self, msg_ids: &[&str]) -> Result<Vec<Option<Stored>>> {
        let mut out = Vec::with_capacity(msg_ids.len());
        for id in msg_ids {
            out.push(self.load(id).await?);
        }
        Ok(out)
    }

    /// Completes a lease. A lease that was already completed (reclaimed and finished elsewhere)
    /// is ignored, so a recipient is never counted final twice. Returns whether it applied; a
    /// [`Disposition::Hold`] whose hold is gone puts the job back into the ready stream as it was
    /// leased and returns false.
    async fn complete(&self, leased: &Leased, disposition: Disposition) -> Result<bool>;

    /// [`Queue::complete`] that, where [`Queue::stores_log`], also stores `log` (the outcome's
    /// delivery-log records) in the delivery log in the same atomic step, and only if the lease
    /// was still this consumer's: a complete retried after a lost reply stores them once.
    /// Elsewhere `log` is ignored (`logged` false): the caller stores it.
    async fn complete_logged(
        &self,
        leased: &Leased,
        disposition: Disposition,
        _log: &[crate::observe::dlog::Encoded],
    ) -> Result<Completed> {
        let applied = self.complete(leased, disposition).await?;
        Ok(Completed { applied, logged: false })
    }

    /// Cancels a message at once, in one atomic step: marks it cancelled, removes its scheduled
    /// and ready jobs, makes those recipients final (`cancelled`) and drops the record when none
    /// is left. Jobs leased by a worker at that moment cannot be taken back: they are reported
    /// as in flight (their delivery may still happen; a retry of theirs finishes as cancelled).
    async fn cancel(&self, msg_id: &str) -> Result<CancelOutcome>;

    async fn view(&self, msg_id: &str) -> Result<Option<MessageView>>;

    async fn stats(&self, now_ms: i64) -> Result<QueueStats>;

    /// Cheap liveness check of the store.
    async fn ping(&self) -> Result<()>;

    /// Removes messages whose enqueue was never committed (the relay answered anything but 250,
    /// or died before answering) and that were received before `before_ms`. Safe to run on
    /// every relay at once; returns how many went. Stores that commit in one step have none.
    async fn purge_uncommitted(&self, _before_ms: i64, _max: usize) -> Result<usize> {
        Ok(0)
    }

    /// Removes consumers that hold no job and were idle longer than `min_idle` (relays that
    /// stopped). Safe to run on every relay at once: a live consumer removed this way holds
    /// nothing and comes back with its next fetch. Returns how many went.
    async fn prune_consumers(&self, _min_idle: Duration) -> Result<usize> {
        Ok(0)
    }

    /// Whether [`Queue::scan`] and [`Queue::apply`] work on this store.
    fn bulk_control(&self) -> bool {
        false
    }

    /// Up to about `batch` queued jobs from `cursor` (`None`: the start) and where to go on
    /// (`None`: done). A job moved meanwhile may be seen twice or not at all.
    async fn scan(&self, _cursor: Option<ScanCursor>, _batch: usize) -> Result<(Vec<QueuedJob>, Option<ScanCursor>)> {
        Err(QueueError::Unsupported("bulk queue control needs the Redis queue"))
    }

    /// Applies `ops` in one atomic step; for each, whether it applied (the job was still there).
    async fn apply(&self, _ops: &[BulkOp]) -> Result<Vec<bool>> {
        Err(QueueError::Unsupported("bulk queue control needs the Redis queue"))
    }

    /// Every stored hold (lapsed ones included until removed).
    async fn holds(&self) -> Result<Vec<Hold>>;

    /// Stores `hold` under its key, replacing one with the same key.
    async fn put_hold(&self, hold: &Hold) -> Result<()>;

    /// Removes the hold stored under `key`; returns it if there was one.
    async fn remove_hold(&self, key: &str) -> Result<Option<Hold>>;
}
