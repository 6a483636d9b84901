//! The controller loop: kube-runtime watchers on SmtpRoutes, SenderQuotas, DeliveryWebhooks
//! (their endpoints' health is refreshed by the periodic resync), Secrets, the
//! namespaces' labels (which `allowedNamespaces` selectors read) and the fleet's own outputs
//! turn changes into triggers; the loop debounces them and runs one
//! fleet-wide reconcile at a time while this replica leads, requeues failures with exponential
//! back-off, runs the due connection tests in the background and wakes up for periodic work.
//!
//! One fleet-wide reconcile rather than a per-object `Controller::run`: every change can alter
//! every object's status (conflicts) and the single output, and deleting the last route must
//! still rewrite the config, which a per-object reconciler would never be called for.

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_stream};
use kube::{Client, Resource};
use mailroute_api::{DeliveryWebhook, SenderQuota, SmtpRoute};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::conntest::{self, ConnTestJob};
use crate::reconcile::Reconciler;

/// Timing of the loop.
#[derive(Clone, Debug)]
pub struct LoopSettings {
    /// Changes arriving within this window share one reconcile.
    pub debounce: Duration,
    /// Full reconcile at least this often (repairs hand edits, refreshes quota usage).
    pub resync: Duration,
    /// Connection tests running at the same time.
    pub max_concurrent_tests: usize,
    pub conntest: conntest::Settings,
}

/// Delay before retry number `failures` (1, 2, 4 … seconds, at most 5 minutes).
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(300))
}

/// Which watch events of custom resources matter: spec changes (a new generation), a changed
/// fleet label (it moves the object in or out of the fleet), a new test request (the
/// `mailroute.io/test-requested` annotation), deletions, and the end of a (re)list. Status writes bump only the resourceVersion and are ignored, so the
/// operator's own writes do not wake it up again.
#[derive(Default)]
pub struct GenerationFilter {
    seen: HashMap<String, Watched>,
}

/// What [`GenerationFilter`] compares: generation, fleet label, test request.
type Watched = (Option<i64>, Option<String>, Option<String>);

impl GenerationFilter {
    pub fn relevant<K: Resource>(&mut self, event: &Event<K>) -> bool {
        match event {
            Event::Apply(o) | Event::InitApply(o) => {
                let meta = o.meta();
                let uid = meta.uid.clone().unwrap_or_default();
                let fleet = meta
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(crate::plan::FLEET_LABEL))
                    .cloned();
                let requested = meta
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(mailroute_api::status::TEST_REQUESTED_ANNOTATION))
                    .cloned();
                let now = (meta.generation, fleet, requested);
                self.seen.insert(uid, now.clone()) != Some(now)
            }
            Event::Delete(o) => {
                self.seen.remove(&o.meta().uid.clone().unwrap_or_default());
                true
            }
            Event::Init => false,
            Event::InitDone => true,
        }
    }
}

/// Which namespace watch events matter: a namespace appearing, going, or changing its labels
/// (what selectors read), and the end of a (re)list.
#[derive(Default)]
pub struct LabelFilter {
    seen: HashMap<String, std::collections::BTreeMap<String, String>>,
}

impl LabelFilter {
    pub fn relevant<K: Resource>(&mut self, event: &Event<K>) -> bool {
        match event {
            Event::Apply(o) | Event::InitApply(o) => {
                let meta = o.meta();
                let name = meta.name.clone().unwrap_or_default();
                let labels = meta.labels.clone().unwrap_or_default();
                self.seen.insert(name, labels.clone()) != Some(labels)
            }
            Event::Delete(o) => {
                self.seen.remove(&o.meta().name.clone().unwrap_or_default());
                true
            }
            Event::Init => false,
            Event::InitDone => true,
        }
    }
}

/// Metadata-only APIs (watches carry no Secret data) for the watched namespaces.
fn apis<K>(client: &Client, namespaces: &[String]) -> Vec<Api<PartialObjectMeta<K>>>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    }
}

fn log_errors<K>(
    kind: &'static str,
) -> impl FnMut(Result<Event<K>, watcher::Error>) -> futures::future::Ready<Option<Event<K>>> {
    move |r| {
        futures::future::ready(match r {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(kind, error = %e, "watch failed; retrying with back-off");
                None
            }
        })
    }
}

fn cr_triggers<K>(client: &Client, namespaces: &[String], kind: &'static str) -> BoxStream<'static, ()>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let streams = apis::<K>(client, namespaces).into_iter().map(move |api| {
        let mut filter = GenerationFilter::default();
        watch_stream(api, watcher::Config::default())
            .default_backoff()
            .filter_map(log_errors::<PartialObjectMeta<K>>(kind))
            .filter_map(move |e| futures::future::ready(filter.relevant(&e).then_some(())))
            .boxed()
    });
    futures::stream::select_all(streams).boxed()
}

/// Every change that can alter the fleet's output or statuses, as a stream of `()`.
pub fn triggers(client: &Client, reconciler: Arc<Reconciler>) -> BoxStream<'static, ()> {
    let settings = reconciler.settings();
    let namespaces = settings.namespaces.clone();
    let fleet = settings.fleet.clone();
    let secret_streams = apis::<Secret>(client, &namespaces).into_iter().map(|api| {
        let r = reconciler.clone();
        watch_stream(api, watcher::Config::default())
            .default_backoff()
            .filter_map(log_errors::<PartialObjectMeta<Secret>>("Secret"))
            .filter_map(move |e| {
                let hit = match &e {
                    Event::Apply(s) | Event::Delete(s) => r.is_referenced(
                        s.metadata.namespace.as_deref().unwrap_or_default(),
                        s.metadata.name.as_deref().unwrap_or_default(),
                    ),
                    Event::InitDone => true,
                    Event::Init | Event::InitApply(_) => false,
                };
                futures::future::ready(hit.then_some(()))
            })
            .boxed()
    });
    // The outputs: a deleted or hand-edited ConfigMap/Secret is rewritten.
    let own = |name: String| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let cm_api: Api<PartialObjectMeta<ConfigMap>> = Api::namespaced(client.clone(), &fleet.namespace);
    let out_secret_api: Api<PartialObjectMeta<Secret>> = Api::namespaced(client.clone(), &fleet.namespace);
    let outputs = futures::stream::select(
        watch_stream(cm_api, own(fleet.config_map_name()))
            .default_backoff()
            .filter_map(log_errors::<PartialObjectMeta<ConfigMap>>("ConfigMap"))
            .filter_map(|e| futures::future::ready(matches!(e, Event::Apply(_) | Event::Delete(_)).then_some(()))),
        watch_stream(out_secret_api, own(fleet.secret_name()))
            .default_backoff()
            .filter_map(log_errors::<PartialObjectMeta<Secret>>("Secret"))
            .filter_map(|e| futures::future::ready(matches!(e, Event::Apply(_) | Event::Delete(_)).then_some(()))),
    );
    let mut all: Vec<BoxStream<'static, ()>> = vec![
        cr_triggers::<SmtpRoute>(client, &namespaces, "SmtpRoute"),
        cr_triggers::<SenderQuota>(client, &namespaces, "SenderQuota"),
        outputs.boxed(),
    ];
    if reconciler.serves_webhooks() {
        all.push(cr_triggers::<DeliveryWebhook>(client, &namespaces, "DeliveryWebhook"));
    }
    all.extend(secret_streams);
    if settings.platform_namespaces.is_some() {
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        let mut filter = LabelFilter::default();
        all.push(
            watch_stream(api, watcher::Config::default())
                .default_backoff()
                .filter_map(log_errors::<PartialObjectMeta<Namespace>>("Namespace"))
                .filter_map(move |e| futures::future::ready(filter.relevant(&e).then_some(())))
                .boxed(),
        );
    }
    futures::stream::select_all(all).boxed()
}

/// Runs until `shutdown` turns true. Reconciles only while `leading` is true.
pub async fn run(
    reconciler: Arc<Reconciler>,
    triggers: BoxStream<'static, ()>,
    settings: LoopSettings,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let forward = tokio::spawn(triggers.for_each(move |()| {
        // A full channel already holds a pending trigger.
        let _ = tx.try_send(());
        futures::future::ready(())
    }));
    let mut tests: JoinSet<(String, mailroute_api::status::ConnectionTest)> = JoinSet::new();
    let mut queued: VecDeque<ConnTestJob> = VecDeque::new();
    let mut failures = 0u32;
    let mut next = Instant::now();

    loop {
        if *shutdown.borrow() {
            break;
        }
        if !*leading.borrow() {
            tests.abort_all();
            queued.clear();
            reconciler.tests_cancelled();
            tokio::select! {
                _ = leading.wait_for(|l| *l) => next = Instant::now(),
                _ = shutdown.wait_for(|s| *s) => break,
            }
            continue;
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = leading.wait_for(|l| !*l) => continue,
            Some(()) = rx.recv() => {
                next = next.min(Instant::now() + settings.debounce);
                continue;
            }
            Some(done) = tests.join_next() => {
                if let Ok((route, record)) = done {
                    tracing::info!(
                        route = %route,
                        result = %record.result,
                        step = record.step.as_deref().unwrap_or("-"),
                        detail = record.reply.as_deref().or(record.error.as_deref()).unwrap_or("-"),
                        "connection test finished"
                    );
                    reconciler.test_finished(&route, record);
                }
                start_tests(&mut tests, &mut queued, &settings);
                next = next.min(Instant::now() + settings.debounce);
                continue;
            }
            _ = tokio::time::sleep_until(next) => {}
        }

        // Losing the Lease mid-reconcile abandons it: another replica may be writing already.
        let result = tokio::select! {
            r = reconciler.reconcile() => r,
            _ = leading.wait_for(|l| !*l) => {
                tracing::warn!("leadership lost during a reconcile; abandoned");
                continue;
            }
        };
        match result {
            Ok(outcome) => {
                failures = 0;
                tracing::debug!(
                    hash = %outcome.config_hash,
                    wrote_config = outcome.wrote_config,
                    wrote_secret = outcome.wrote_secret,
                    status_writes = outcome.status_writes,
                    tests = outcome.tests.len(),
                    "reconciled"
                );
                for job in outcome.tests {
                    reconciler.test_started(&job.route_id);
                    queued.push_back(job);
                }
                start_tests(&mut tests, &mut queued, &settings);
                let wake = outcome.next_test_in.map_or(settings.resync, |t| t.min(settings.resync));
                next = Instant::now() + wake.max(Duration::from_secs(1));
            }
            Err(e) => {
                failures += 1;
                let delay = backoff(failures);
                tracing::warn!(error = %e, retry_in = ?delay, failures, "reconcile failed; the live configuration is unchanged");
                next = Instant::now() + delay;
            }
        }
    }
    tests.abort_all();
    forward.abort();
}

fn start_tests(
    tests: &mut JoinSet<(String, mailroute_api::status::ConnectionTest)>,
    queued: &mut VecDeque<ConnTestJob>,
    settings: &LoopSettings,
) {
    while tests.len() < settings.max_concurrent_tests.max(1) {
        let Some(job) = queued.pop_front() else { break };
        let s = settings.conntest.clone();
        tests.spawn(async move {
            let record = conntest::run(&job, &s).await;
            (job.route_id, record)
        });
    }
}

/// Whether the API server serves the DeliveryWebhook kind. Discovery needs no RBAC rule, while
/// listing a kind the role does not name is refused (403) before the API server looks for it:
/// an operator upgraded before its CRDs and RBAC (or run with an older release's RBAC) keeps
/// serving routes and quotas without webhooks until it restarts. Unknown when discovery fails:
/// then the kind is assumed served, and its errors show in the reconcile.
pub async fn webhooks_served(client: &Client) -> bool {
    use kube::Resource;
    let api_version = DeliveryWebhook::api_version(&());
    match client.list_api_group_resources(&api_version).await {
        Ok(list) => {
            let plural = DeliveryWebhook::plural(&());
            list.resources.iter().any(|r| r.name == plural)
        }
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => {
            tracing::warn!(error = %e, "API discovery of {api_version} failed; assuming DeliveryWebhooks are served");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn route(uid: &str, generation: i64) -> PartialObjectMeta<SmtpRoute> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                generation: Some(generation),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    #[test]
    fn only_spec_changes_deletions_and_relists_trigger() {
        let mut f = GenerationFilter::default();
        assert!(!f.relevant(&Event::<PartialObjectMeta<SmtpRoute>>::Init));
        assert!(f.relevant(&Event::InitApply(route("a", 1))));
        assert!(f.relevant(&Event::<PartialObjectMeta<SmtpRoute>>::InitDone));
        assert!(!f.relevant(&Event::Apply(route("a", 1))), "a status write");
        assert!(f.relevant(&Event::Apply(route("a", 2))));
        assert!(f.relevant(&Event::Apply(route("b", 1))));
        let mut labelled = route("a", 2);
        labelled.metadata.labels = Some([(crate::plan::FLEET_LABEL.to_string(), "prod".to_string())].into());
        assert!(f.relevant(&Event::Apply(labelled.clone())), "a fleet label");
        assert!(!f.relevant(&Event::Apply(labelled.clone())));
        let mut asked = labelled;
        asked.metadata.annotations = Some(
            [(
                mailroute_api::status::TEST_REQUESTED_ANNOTATION.to_string(),
                "n1".to_string(),
            )]
            .into(),
        );
        assert!(f.relevant(&Event::Apply(asked.clone())), "a test request");
        assert!(!f.relevant(&Event::Apply(asked)), "the same request");
        assert!(f.relevant(&Event::Delete(route("a", 2))));
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let got: Vec<u64> = (1..=10).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(backoff(1000), Duration::from_secs(300));
    }
}
