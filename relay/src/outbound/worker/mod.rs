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
//!
//! This file holds the worker's ports ([`Transport`], [`Pacing`]) and the outcome types they
//! speak in. Submodules: `policy` (pure: retry policy, the decision after an attempt, the
//! fallback route), `run` (the fetch, renew, promote and reclaim loops and the writing of an
//! outcome), `attempt` (one job: route choice, pacing, the attempts through the routes),
//! `finish` (what a job's end writes: delivery log, metrics, recipient state, DSN).

mod attempt;
mod finish;
mod policy;
mod run;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mailroute_api::config::{CompiledRoute, RelaySecrets};

use crate::config::ConfigHandle;
use crate::observe::telemetry::Telemetry;
use crate::outbound::bounce::{self, EnhancedStatusCode, Failure, Reply};
use crate::queue::message::{Envelope, MessageMeta};
use crate::queue::{Leased, Queue};

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

pub use policy::{Decision, decide, no_route_outcome, policy_for};
pub use run::WorkerLiveness;

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
