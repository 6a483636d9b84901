//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go does it (kube 4.2 ships no
//! helper): the pure decision (create, renew, take over an expired or released lease, or follow)
//! and the I/O that acquires, renews and releases the Lease with optimistic concurrency (every
//! update carries the resourceVersion it read, so two candidates never both win). Expiry is
//! judged by when this process *observed* the holder's last change, not by the holder's clock.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

use crate::clock;

/// What the Lease says, reduced to what the decision needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub duration_secs: i32,
    pub renew_time: Option<Timestamp>,
    pub transitions: i32,
}

impl Record {
    fn from_lease(l: &Lease) -> Self {
        let spec = l.spec.clone().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            duration_secs: spec.lease_duration_seconds.unwrap_or(0),
            renew_time: spec.renew_time.map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// What to do with the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Released or expired: take it over.
    TakeOver,
    /// Someone else holds it for at least this long.
    Follow { holder: String, expires_in: Duration },
}

/// Decides from the Lease (if any), when this record was first observed, and now.
pub fn decide(record: Option<&Record>, observed_at: Timestamp, me: &str, now: Timestamp) -> Decision {
    let Some(r) = record else { return Decision::Create };
    match r.holder.as_deref() {
        None => Decision::TakeOver,
        Some(h) if h == me => Decision::Renew,
        Some(h) => {
            let ttl = Duration::from_secs(u64::try_from(r.duration_secs).unwrap_or(0));
            let expires = clock::add(observed_at, ttl);
            if now >= expires {
                Decision::TakeOver
            } else {
                Decision::Follow {
                    holder: h.to_string(),
                    expires_in: clock::age(now, expires),
                }
            }
        }
    }
}

/// Whether a leader that last renewed at `last_renew` may still act: only within the renew
/// deadline, which is shorter than the lease duration, so it stops before others may take over.
pub fn still_leading(last_renew: Timestamp, now: Timestamp, renew_deadline: Duration) -> bool {
    clock::age(last_renew, now) < renew_deadline
}

/// Lease timing.
#[derive(Clone, Debug)]
pub struct Params {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a lease holds without renewal (default 15 s).
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down (default 10 s).
    pub renew_deadline: Duration,
    /// Time between attempts (default 2 s).
    pub retry_period: Duration,
}

impl Params {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Source of "now"; tests move it by hand.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// One candidate.
pub struct Elector {
    api: Api<Lease>,
    params: Params,
    clock: Clock,
    observed: Option<(Record, Timestamp)>,
    last_renew: Option<Timestamp>,
}

impl Elector {
    pub fn new(client: kube::Client, params: Params) -> Self {
        Self::with_clock(client, params, Arc::new(Timestamp::now))
    }

    pub fn with_clock(client: kube::Client, params: Params, clock: Clock) -> Self {
        Self {
            api: Api::namespaced(client, &params.namespace),
            params,
            clock,
            observed: None,
            last_renew: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.params.identity
    }

    fn spec(&self, now: Timestamp, acquire: Option<Timestamp>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.params.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.params.lease_duration.as_secs()).unwrap_or(15)),
            acquire_time: acquire.map(MicroTime),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt; returns whether this candidate leads afterwards. API errors count as "not
    /// renewed" (the leader keeps leading until its renew deadline passes). The attempt itself
    /// is bounded by what is left of the renew deadline: a request that hangs must not keep a
    /// leader acting after its lease may have passed to another replica.
    pub async fn try_acquire_or_renew(&mut self) -> bool {
        let budget = match self.last_renew {
            Some(t) => self.params.renew_deadline.saturating_sub(clock::age(t, (self.clock)())),
            None => self.params.renew_deadline,
        };
        let outcome = tokio::time::timeout(budget, self.attempt())
            .await
            .unwrap_or_else(|_| Err(kube::Error::Service(format!("no answer within {budget:?}").into())));
        match outcome {
            Ok(true) => {
                self.last_renew = Some((self.clock)());
                true
            }
            Ok(false) => {
                self.last_renew = None;
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = %self.params.name, "lease update failed");
                let now = (self.clock)();
                match self.last_renew {
                    Some(t) if still_leading(t, now, self.params.renew_deadline) => true,
                    _ => {
                        self.last_renew = None;
                        false
                    }
                }
            }
        }
    }

    async fn attempt(&mut self) -> Result<bool, kube::Error> {
        let now = (self.clock)();
        let current = self.api.get_opt(&self.params.name).await?;
        let record = current.as_ref().map(Record::from_lease);
        // Expiry counts from when we first saw this exact record.
        let observed_at = match (&self.observed, &record) {
            (Some((seen, at)), Some(r)) if seen == r => *at,
            _ => now,
        };
        if let Some(r) = &record {
            self.observed = Some((r.clone(), observed_at));
        }
        let decision = decide(record.as_ref(), observed_at, &self.params.identity, now);
        let write = match (decision, current) {
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.params.name.clone()),
                        namespace: Some(self.params.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(now, Some(now), 0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (Decision::Renew, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                let mut spec = self.spec(now, old.acquire_time.map(|t| t.0), old.lease_transitions.unwrap_or(0));
                spec.acquire_time = spec.acquire_time.or(Some(MicroTime(now)));
                lease.spec = Some(spec);
                self.api
                    .replace(&self.params.name, &PostParams::default(), &lease)
                    .await
            }
            (Decision::TakeOver, Some(mut lease)) => {
                let transitions = record.as_ref().map_or(0, |r| r.transitions) + 1;
                lease.spec = Some(self.spec(now, Some(now), transitions));
                self.api
                    .replace(&self.params.name, &PostParams::default(), &lease)
                    .await
            }
            (Decision::Follow { .. }, _) | (_, None) => return Ok(false),
        };
        match write {
            Ok(lease) => {
                self.observed = Some((Record::from_lease(&lease), now));
                Ok(true)
            }
            // Someone else wrote first (stale resourceVersion or a concurrent create): follow.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (holder cleared) so another replica takes over at once.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        self.last_renew = None;
        let Some(mut lease) = self.api.get_opt(&self.params.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.params.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime((self.clock)()));
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.params.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs until `shutdown` turns true: tries every retry period, publishes leadership on
    /// `leading`, and releases the lease on the way out.
    pub async fn run(mut self, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let now_leading = self.try_acquire_or_renew().await;
            leading.send_if_modified(|l| {
                let changed = *l != now_leading;
                if changed {
                    tracing::info!(identity = %self.params.identity, leading = now_leading, "leadership changed");
                }
                *l = now_leading;
                changed
            });
            tokio::select! {
                _ = tokio::time::sleep(self.params.retry_period) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        let was_leading = *leading.borrow();
        leading.send_replace(false);
        if was_leading && let Err(e) = self.release().await {
            tracing::warn!(error = %e, "releasing the lease failed; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn held_by(h: &str) -> Record {
        Record {
            holder: Some(h.into()),
            duration_secs: 15,
            renew_time: Some(t("2024-01-01T00:00:00Z")),
            transitions: 2,
        }
    }

    #[test]
    fn decisions() {
        let seen = t("2024-01-01T00:00:00Z");
        assert_eq!(decide(None, seen, "a", seen), Decision::Create);
        assert_eq!(decide(Some(&held_by("a")), seen, "a", seen), Decision::Renew);
        let released = Record {
            holder: None,
            ..held_by("b")
        };
        assert_eq!(decide(Some(&released), seen, "a", seen), Decision::TakeOver);
        assert_eq!(
            decide(Some(&held_by("b")), seen, "a", t("2024-01-01T00:00:10Z")),
            Decision::Follow {
                holder: "b".into(),
                expires_in: Duration::from_secs(5)
            }
        );
        assert_eq!(
            decide(Some(&held_by("b")), seen, "a", t("2024-01-01T00:00:15Z")),
            Decision::TakeOver
        );
    }

    #[test]
    fn a_leader_steps_down_after_the_renew_deadline() {
        let last = t("2024-01-01T00:00:00Z");
        let deadline = Duration::from_secs(10);
        assert!(still_leading(last, t("2024-01-01T00:00:09Z"), deadline));
        assert!(!still_leading(last, t("2024-01-01T00:00:10Z"), deadline));
    }
}
