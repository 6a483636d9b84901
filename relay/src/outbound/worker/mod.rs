//! The delivery worker: takes jobs from the queue, chooses routes, attempts delivery, and moves
//! each job to its next state: delivered, retried on the route's schedule, paced, held for
//! quiet hours (logged as `scheduled`), held by a hold (bulk queue control, `spec.suspended`;
//! logged as `held`), bounced (with a DSN to the return-path, and the recipient on the
//! suppression list for a hard bounce of a configured class) or expired.
//! Several workers on several pods share one queue.
//!
//! It owns the per-job decision sequence and the order of the queue writes. SMTP I/O is behind
//! [`Transport`], pacing behind [`Pacing`]; classification (`bounce`), schedules (`retry`), DSN
//! format (`dsn`) and route order (`route`) are pure modules it calls. It must not hold message
//! bodies longer than one attempt and the writing of its outcome (kept while the store is away,
//! at most one per worker slot).
//!
//! This file holds the worker's ports ([`Transport`], [`Pacing`]); an attempt's outcome is the
//! deliverer's [`AttemptResult`], which keeps the reply it came from. Submodules: `policy` (pure: retry policy, the decision after an attempt, the
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
use crate::outbound::bounce::Reply;
use crate::outbound::delivery::AttemptResult;
use crate::queue::message::{Envelope, MessageMeta};
use crate::queue::{Leased, Queue};

/// What a [`Transport`] did with one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// It went to the route's next hop (delivered or not). `rcpt_domain`: the recipient's
    /// domain, the scope pacing hears the reply in.
    Attempted {
        result: AttemptResult,
        rcpt_domain: Option<String>,
    },
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
    /// Feedback after an attempt through `route` to `rcpt_domain`: the reply that ended it, if
    /// the server answered (rate-limit replies back the route off).
    async fn report(&self, route: &CompiledRoute, rcpt_domain: &str, reply: Option<&Reply>, now_ms: i64);
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
    /// How often the holds are read again (and `spec.suspended` mirrored into them).
    pub hold_refresh: Duration,
}

pub struct Worker {
    pub queue: Arc<dyn Queue>,
    pub config: Arc<ConfigHandle>,
    pub transport: Arc<dyn Transport>,
    pub pacing: Arc<dyn Pacing>,
    pub telemetry: Telemetry,
    /// The suppression lists hard bounces are added to (none with the memory queue).
    pub suppress: Option<Arc<crate::suppress::Suppressions>>,
    /// The holds to honour (bulk queue control).
    pub control: Arc<crate::control::Control>,
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
