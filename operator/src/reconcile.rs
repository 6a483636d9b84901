//! The thin I/O around `plan`: read every SmtpRoute, SenderQuota, DeliveryWebhook (and their
//! endpoints' health from the relays' Redis, with `--redis-url`) and referenced Secret, the
//! namespaces' labels (for `allowedNamespaces` selectors) and the live outputs from the API, read quota usage from the relays, then apply what the plan says
//! (server-side apply: outputs with field manager `mailroute-operator`, statuses with the
//! operator's own, see `fleets`) and publish its Events. Objects outside the fleet's scope, or
//! governed by another operator too, never reach the plan; statuses of the pre-fleet field
//! manager are taken over (`adopt`). Any read
//! error aborts before the first write, so a failed list can never turn into an empty config.
//! Works on any `kube::Client` (a cluster, the in-memory fake, a mocked API server).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use mailroute_api::quota::QuotaUsage;
use mailroute_api::status::ConnectionTest;
use mailroute_api::{DeliveryWebhook, SenderQuota, SmtpRoute, Tenancy};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::conntest::ConnTestJob;
use crate::fleets::{self, Identity, Verdict};
use crate::metrics::Metrics;
use crate::plan::{self, FIELD_MANAGER, Fleet, Inputs, SecretData, Usage};
use crate::usage::UsageClient;
use crate::webhooks::{EndpointHealth, Health, HealthReader};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("listing {kind}: {source}")]
    List { kind: &'static str, source: kube::Error },
    #[error("reading Secret {namespace}/{name}: {source}")]
    ReadSecret {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("reading {what}: {source}")]
    ReadOutput { what: String, source: kube::Error },
    #[error("applying {what}: {source}")]
    Apply { what: String, source: kube::Error },
    #[error("writing the status of {count} object(s), first {object}: {source}")]
    Status {
        count: usize,
        object: String,
        source: kube::Error,
    },
}

/// Settings of the reconcile.
#[derive(Clone, Debug)]
pub struct Settings {
    pub fleet: Fleet,
    /// Namespaces to read objects from; empty means all.
    pub namespaces: Vec<String>,
    /// Connection-test interval; `None` turns the tests off.
    pub test_interval: Option<Duration>,
    /// Reporting instance for Events (the pod name).
    pub instance: String,
    /// Platform namespaces; `None`: every namespace is one (single-tenant).
    pub platform_namespaces: Option<BTreeSet<String>>,
    /// Which objects this operator governs (fleet label, unlabelled claim).
    pub identity: Identity,
    /// Another operator's status entry newer than this makes it a rival (`fleets`); about two
    /// resync intervals.
    pub rival_window: Duration,
}

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub config_hash: String,
    pub wrote_config: bool,
    pub wrote_secret: bool,
    pub status_writes: usize,
    pub events: usize,
    /// Connection tests to start now.
    pub tests: Vec<ConnTestJob>,
    /// When the next periodic test falls due.
    pub next_test_in: Option<Duration>,
    pub routes_in_config: usize,
    pub quotas_in_config: usize,
}

/// The message of the object's `Accepted=False FleetConflict` condition, if it has one.
fn standing_conflict<K: Serialize>(object: &K) -> Option<String> {
    let v = serde_json::to_value(object).ok()?;
    let c = v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted" && c["reason"] == fleets::FLEET_CONFLICT)?;
    c["message"].as_str().map(str::to_string)
}

/// Listed objects by `fleets::Verdict`: governed, contested (with the governing operators),
/// to release.
type Sorted<K> = (Vec<K>, Vec<(K, Vec<String>)>, Vec<K>);

#[derive(Default)]
struct State {
    tests: BTreeMap<String, ConnectionTest>,
    in_flight: BTreeSet<String>,
    referenced: Option<BTreeSet<(String, String)>>,
}

/// Reconciles one fleet. Cheap to share (`Arc`); reconciles must not run concurrently (the
/// controller loop runs one at a time).
pub struct Reconciler {
    client: Client,
    settings: Settings,
    recorder: Recorder,
    usage: Option<UsageClient>,
    metrics: Metrics,
    state: Mutex<State>,
    /// The webhooks' endpoint health, from the relays' Redis (`--redis-url`).
    webhook_health: std::sync::OnceLock<HealthReader>,
    /// Whether the API server served the DeliveryWebhook kind at start-up (see
    /// [`webhooks_served`]); when not, webhooks are neither watched nor listed.
    webhooks_served: std::sync::atomic::AtomicBool,
}

impl Reconciler {
    pub fn new(client: Client, settings: Settings, usage: Option<UsageClient>, metrics: Metrics) -> Arc<Self> {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(settings.instance.clone()),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            usage,
            metrics,
            state: Mutex::default(),
            webhook_health: std::sync::OnceLock::new(),
            webhooks_served: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Reads the webhooks' endpoint health from the relays' Redis for their statuses (without
    /// it, they say the health is unknown).
    pub fn read_webhook_health_from(&self, reader: HealthReader) {
        let _ = self.webhook_health.set(reader);
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks a test as running, so the plan does not queue it again.
    pub fn test_started(&self, route_id: &str) {
        self.state().in_flight.insert(route_id.to_string());
    }

    /// Stores a finished test; the next reconcile writes it into the route's status.
    pub fn test_finished(&self, route_id: &str, record: ConnectionTest) {
        let mut s = self.state();
        s.in_flight.remove(route_id);
        s.tests.insert(route_id.to_string(), record);
    }

    /// Forgets running tests (they were aborted, e.g. on losing leadership).
    pub fn tests_cancelled(&self) {
        self.state().in_flight.clear();
    }

    /// Whether a change to this Secret matters (unknown before the first reconcile: yes).
    pub fn is_referenced(&self, namespace: &str, name: &str) -> bool {
        match &self.state().referenced {
            None => true,
            Some(set) => set.contains(&(namespace.to_string(), name.to_string())),
        }
    }

    async fn list<K>(&self, kind: &'static str) -> Result<Vec<K>, ReconcileError>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let lists: Vec<Api<K>> = if self.settings.namespaces.is_empty() {
            vec![Api::all(self.client.clone())]
        } else {
            self.settings
                .namespaces
                .iter()
                .map(|ns| Api::namespaced(self.client.clone(), ns))
                .collect()
        };
        let mut out = Vec::new();
        for api in lists {
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(|source| ReconcileError::List { kind, source })?;
            out.extend(list.items);
        }
        Ok(out)
    }

    async fn read_secrets(
        &self,
        wanted: &BTreeSet<(String, String)>,
    ) -> Result<BTreeMap<(String, String), SecretData>, ReconcileError> {
        let mut out = BTreeMap::new();
        for (ns, name) in wanted {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
            // 404 is an answer (SecretNotFound); anything else is a failed read.
            let secret = api.get_opt(name).await.map_err(|source| ReconcileError::ReadSecret {
                namespace: ns.clone(),
                name: name.clone(),
                source,
            })?;
            if let Some(s) = secret {
                let data = s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
                out.insert(
                    (ns.clone(), name.clone()),
                    SecretData {
                        data,
                        resource_version: s.metadata.resource_version.unwrap_or_default(),
                    },
                );
            }
        }
        Ok(out)
    }

    /// The platform namespaces and every namespace's labels, for `allowedNamespaces` selectors
    /// (not read in single-tenant mode, where nothing selects).
    async fn tenancy(&self) -> Result<Tenancy, ReconcileError> {
        let Some(platform) = &self.settings.platform_namespaces else {
            return Ok(Tenancy::single_tenant());
        };
        let api: Api<Namespace> = Api::all(self.client.clone());
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|source| ReconcileError::List {
                kind: "Namespaces",
                source,
            })?;
        let namespace_labels = list
            .items
            .into_iter()
            .filter_map(|n| Some((n.metadata.name?, n.metadata.labels.unwrap_or_default())))
            .collect();
        Ok(Tenancy {
            platform_namespaces: Some(platform.clone()),
            namespace_labels,
        })
    }

    /// DeliveryWebhooks; none when the API server does not serve the kind (its CRD is not
    /// installed yet: an operator upgraded before its CRDs keeps working).
    async fn list_webhooks(&self) -> Result<Vec<DeliveryWebhook>, ReconcileError> {
        if !self.serves_webhooks() {
            return Ok(Vec::new());
        }
        match self.list("DeliveryWebhooks").await {
            Err(ReconcileError::List {
                source: kube::Error::Api(s),
                ..
            }) if s.code == 404 => {
                tracing::debug!("DeliveryWebhooks are not served (CRD not installed)");
                Ok(Vec::new())
            }
            r => r,
        }
    }

    /// Records whether the API server serves DeliveryWebhooks (found once at start-up).
    pub fn set_webhooks_served(&self, served: bool) {
        self.webhooks_served.store(served, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether DeliveryWebhooks are watched and listed.
    pub fn serves_webhooks(&self) -> bool {
        self.webhooks_served.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn read_webhook_health(&self, ids: &[String]) -> Option<BTreeMap<String, EndpointHealth>> {
        let reader = self.webhook_health.get()?;
        match reader.read(ids).await {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "webhook health unavailable; statuses keep what they show");
                None
            }
        }
    }

    /// `None` when no usage client is configured.
    async fn read_usage(&self) -> Option<Option<BTreeMap<String, QuotaUsage>>> {
        let client = self.usage.as_ref()?;
        match client.fetch().await {
            Ok(u) => Some(Some(u)),
            Err(e) => {
                tracing::warn!(error = %e, "quota usage unavailable; statuses keep the usage they show");
                Some(None)
            }
        }
    }

    /// One full reconcile of the fleet.
    pub async fn reconcile(&self) -> Result<Outcome, ReconcileError> {
        let started = Instant::now();
        let result = self.reconcile_inner().await;
        self.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => {
                self.metrics.reconciles.with_label_values(&["success"]).inc();
                self.metrics
                    .last_success
                    .set(Timestamp::now().as_millisecond() as f64 / 1000.0);
            }
            Err(_) => self.metrics.reconciles.with_label_values(&["error"]).inc(),
        }
        result
    }

    async fn reconcile_inner(&self) -> Result<Outcome, ReconcileError> {
        let fleet = &self.settings.fleet;
        let routes: Vec<SmtpRoute> = self.list("SmtpRoutes").await?;
        let quotas: Vec<SenderQuota> = self.list("SenderQuotas").await?;
        let (routes, contested_routes, released_routes) = self.sort_out(routes);
        let (quotas, contested_quotas, released_quotas) = self.sort_out(quotas);
        let webhooks = self.list_webhooks().await?;
        let (webhooks, contested_webhooks, released_webhooks) = self.sort_out(webhooks);
        let mut referenced = plan::referenced_secrets(&routes, &quotas);
        referenced.extend(plan::webhook_secrets(&webhooks));
        let secrets = self.read_secrets(&referenced).await?;
        let cm_api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &fleet.namespace);
        let secret_api: Api<Secret> = Api::namespaced(self.client.clone(), &fleet.namespace);
        let live_config =
            cm_api
                .get_opt(&fleet.config_map_name())
                .await
                .map_err(|source| ReconcileError::ReadOutput {
                    what: format!("ConfigMap {}/{}", fleet.namespace, fleet.config_map_name()),
                    source,
                })?;
        let live_secret =
            secret_api
                .get_opt(&fleet.secret_name())
                .await
                .map_err(|source| ReconcileError::ReadOutput {
                    what: format!("Secret {}/{}", fleet.namespace, fleet.secret_name()),
                    source,
                })?;
        let usage = self.read_usage().await;
        let tenancy = self.tenancy().await?;
        let webhook_ids: Vec<String> = webhooks
            .iter()
            .map(|w| format!("{}/{}", w.namespace().unwrap_or_default(), w.name_any()))
            .collect();
        let webhook_health = self.read_webhook_health(&webhook_ids).await;

        let (tests, in_flight) = {
            let s = self.state();
            (s.tests.clone(), s.in_flight.clone())
        };
        let plan = plan::plan(&Inputs {
            fleet,
            routes: &routes,
            quotas: &quotas,
            secrets: &secrets,
            live_config: live_config.as_ref(),
            live_secret: live_secret.as_ref(),
            tests: &tests,
            tests_in_flight: &in_flight,
            usage: match &usage {
                None => Usage::Disabled,
                Some(None) => Usage::Unavailable,
                Some(Some(u)) => Usage::Read(u),
            },
            test_interval: self.settings.test_interval,
            now: Timestamp::now(),
            tenancy: &tenancy,
            webhooks: &webhooks,
            webhook_health: match (&webhook_health, self.webhook_health.get()) {
                (Some(h), _) => Health::Read(h),
                (None, Some(_)) => Health::Unavailable,
                (None, None) => Health::Disabled,
            },
        });

        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut outcome = Outcome {
            config_hash: plan.config_hash.clone(),
            routes_in_config: plan.routes_in_config,
            quotas_in_config: plan.quotas_in_config,
            tests: plan.tests,
            next_test_in: plan.next_test_in,
            ..Default::default()
        };
        // The Secret first: a new route's credentials are there before the route is.
        if let Some(secret) = &plan.apply_secret {
            secret_api
                .patch(&fleet.secret_name(), &params, &Patch::Apply(secret))
                .await
                .map_err(|source| ReconcileError::Apply {
                    what: format!("Secret {}/{}", fleet.namespace, fleet.secret_name()),
                    source,
                })?;
            self.metrics.config_writes.inc();
            outcome.wrote_secret = true;
        }
        if let Some(cm) = &plan.apply_config {
            cm_api
                .patch(&fleet.config_map_name(), &params, &Patch::Apply(cm))
                .await
                .map_err(|source| ReconcileError::Apply {
                    what: format!("ConfigMap {}/{}", fleet.namespace, fleet.config_map_name()),
                    source,
                })?;
            self.metrics.config_writes.inc();
            outcome.wrote_config = true;
            tracing::info!(
                hash = %plan.config_hash,
                routes = plan.routes_in_config,
                quotas = plan.quotas_in_config,
                "relay configuration applied"
            );
        }

        let mut failures: Vec<(String, kube::Error)> = Vec::new();
        // Before the plan's writes: those then drop what the old manager had and the plan no
        // longer wants.
        let adopted = self
            .adopt::<SmtpRoute>("SmtpRoute", &routes)
            .await
            .into_iter()
            .chain(self.adopt::<SenderQuota>("SenderQuota", &quotas).await);
        failures.extend(adopted);
        for w in &plan.route_statuses {
            match self
                .write_status::<SmtpRoute, _>("SmtpRoute", &w.namespace, &w.name, &w.status)
                .await
            {
                Ok(true) => outcome.status_writes += 1,
                Ok(false) => {}
                Err(e) => failures.push((format!("SmtpRoute {}/{}", w.namespace, w.name), e)),
            }
        }
        for w in &plan.quota_statuses {
            match self
                .write_status::<SenderQuota, _>("SenderQuota", &w.namespace, &w.name, &w.status)
                .await
            {
                Ok(true) => outcome.status_writes += 1,
                Ok(false) => {}
                Err(e) => failures.push((format!("SenderQuota {}/{}", w.namespace, w.name), e)),
            }
        }
        for w in &plan.webhook_statuses {
            match self
                .write_status::<DeliveryWebhook, _>("DeliveryWebhook", &w.namespace, &w.name, &w.status)
                .await
            {
                Ok(true) => outcome.status_writes += 1,
                Ok(false) => {}
                Err(e) => failures.push((format!("DeliveryWebhook {}/{}", w.namespace, w.name), e)),
            }
        }
        let contested = self
            .refuse::<SmtpRoute>("SmtpRoute", &contested_routes, &released_routes, &mut outcome)
            .await
            .into_iter()
            .chain(
                self.refuse::<SenderQuota>("SenderQuota", &contested_quotas, &released_quotas, &mut outcome)
                    .await,
            )
            .chain(
                self.refuse::<DeliveryWebhook>(
                    "DeliveryWebhook",
                    &contested_webhooks,
                    &released_webhooks,
                    &mut outcome,
                )
                .await,
            );
        failures.extend(contested);
        for e in &plan.events {
            let event = Event {
                type_: if e.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: e.reason.clone(),
                note: Some(e.note.chars().take(1000).collect()),
                action: e.action.to_string(),
                secondary: None,
            };
            match self.recorder.publish(&event, &e.regarding).await {
                Ok(()) => outcome.events += 1,
                // Events are best effort: the status already tells the story.
                Err(err) => tracing::warn!(error = %err, reason = %e.reason, "publishing an Event failed"),
            }
        }
        self.metrics.set_verified(&plan.verified);
        self.state().referenced = Some(plan.referenced_secrets);

        let count = failures.len();
        if let Some((object, source)) = failures.into_iter().next() {
            return Err(ReconcileError::Status { count, object, source });
        }
        Ok(outcome)
    }

    /// Server-side applies a status; `Ok(false)` when the object is gone.
    async fn write_status<K, S>(&self, kind: &str, namespace: &str, name: &str, status: &S) -> Result<bool, kube::Error>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
        K::DynamicType: Default,
        S: Serialize,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let body = json!({
            "apiVersion": plan::API_VERSION,
            "kind": kind,
            "status": status,
        });
        let params = PatchParams::apply(&self.settings.identity.field_manager()).force();
        match api.patch_status(name, &params, &Patch::Apply(&body)).await {
            Ok(obj) => {
                tracing::debug!(kind, object = %format!("{namespace}/{}", obj.name_any()), "status written");
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Upgrade from the pre-fleet field manager: applies the object's live status under this
    /// operator's manager (so it owns every field), then an empty one under the old manager (so
    /// the old entry goes without removing a field). Returns the failures.
    async fn adopt<K>(&self, kind: &str, governed: &[K]) -> Vec<(String, kube::Error)>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Serialize
            + std::fmt::Debug,
    {
        let mut failures = Vec::new();
        for o in governed.iter().filter(|o| fleets::has_legacy_status_owner(o.meta())) {
            let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
            let live = serde_json::to_value(o)
                .ok()
                .map(|v| v["status"].clone())
                .unwrap_or_default();
            let ours = PatchParams::apply(&self.settings.identity.field_manager()).force();
            let old = PatchParams::apply(FIELD_MANAGER).force();
            let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
            let adopt = json!({"apiVersion": plan::API_VERSION, "kind": kind, "status": live});
            let release = json!({"apiVersion": plan::API_VERSION, "kind": kind});
            let result = match api.patch_status(&name, &ours, &Patch::Apply(&adopt)).await {
                Ok(_) => api.patch_status(&name, &old, &Patch::Apply(&release)).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    tracing::info!(kind, object = %format!("{ns}/{name}"), "status taken over from the pre-fleet field manager")
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => failures.push((format!("{kind} {ns}/{name}"), e)),
            }
        }
        failures
    }

    /// Splits the listed objects into the governed ones (to the plan), the contested ones (with
    /// every governing operator) and the ones whose status fields this operator must release.
    fn sort_out<K: Resource + Serialize>(&self, objects: Vec<K>) -> Sorted<K> {
        let (mut governed, mut contested, mut released) = (Vec::new(), Vec::new(), Vec::new());
        let now = Timestamp::now();
        for o in objects {
            let standing = standing_conflict(&o);
            let verdict = self
                .settings
                .identity
                .judge(o.meta(), standing.as_deref(), now, self.settings.rival_window);
            match verdict {
                Verdict::Govern => governed.push(o),
                Verdict::Conflict { operators } => contested.push((o, operators)),
                Verdict::Ignore { release: true } => released.push(o),
                Verdict::Ignore { release: false } => {}
            }
        }
        (governed, contested, released)
    }

    /// Writes `Accepted=False FleetConflict` (and a Warning Event when it is new) on contested
    /// objects and gives up this operator's status fields on released ones. Returns the failures.
    async fn refuse<K>(
        &self,
        kind: &str,
        contested: &[(K, Vec<String>)],
        released: &[K],
        outcome: &mut Outcome,
    ) -> Vec<(String, kube::Error)>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Serialize
            + std::fmt::Debug,
    {
        let mut failures = Vec::new();
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now());
        for (o, operators) in contested {
            let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
            let live = serde_json::to_value(o)
                .ok()
                .map(|v| v["status"].clone())
                .unwrap_or_default();
            let previous: Vec<mailroute_api::status::Condition> =
                serde_json::from_value(live["conditions"].clone()).unwrap_or_default();
            let condition = fleets::conflict_condition(operators, &previous, o.meta().generation, &now);
            let mut status = json!({"conditions": [condition]});
            if let Some(g) = o.meta().generation {
                status["observedGeneration"] = json!(g);
            }
            if live == status {
                continue;
            }
            tracing::warn!(kind, object = %format!("{ns}/{name}"), operators = ?operators, "object governed by more than one operator; refused");
            let written = match self.write_status::<K, _>(kind, &ns, &name, &status).await {
                Ok(true) if fleets::has_legacy_status_owner(o.meta()) => {
                    // The pre-fleet manager's fields (Ready, ...) go; the refusal stays ours.
                    let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
                    let release = json!({"apiVersion": plan::API_VERSION, "kind": kind});
                    let old = PatchParams::apply(FIELD_MANAGER).force();
                    api.patch_status(&name, &old, &Patch::Apply(&release))
                        .await
                        .map(|_| true)
                }
                other => other,
            };
            match written {
                Ok(true) => outcome.status_writes += 1,
                Ok(false) => continue,
                Err(e) => {
                    failures.push((format!("{kind} {ns}/{name}"), e));
                    continue;
                }
            }
            let was = previous.iter().find(|c| c.type_ == condition.type_);
            if was.is_some_and(|c| c.reason == condition.reason && c.message == condition.message) {
                continue;
            }
            let event = Event {
                type_: EventType::Warning,
                reason: fleets::FLEET_CONFLICT.to_string(),
                note: Some(condition.message.chars().take(1000).collect()),
                action: "Compile".to_string(),
                secondary: None,
            };
            match self.recorder.publish(&event, &o.object_ref(&())).await {
                Ok(()) => outcome.events += 1,
                Err(err) => tracing::warn!(error = %err, "publishing an Event failed"),
            }
        }
        for o in released {
            let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
            let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
            // Nothing but the type: the apply drops every status field this manager owned.
            let body = json!({"apiVersion": plan::API_VERSION, "kind": kind});
            let params = PatchParams::apply(&self.settings.identity.field_manager()).force();
            match api.patch_status(&name, &params, &Patch::Apply(&body)).await {
                Ok(_) => tracing::info!(kind, object = %format!("{ns}/{name}"), "outside this fleet; status released"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => failures.push((format!("{kind} {ns}/{name}"), e)),
            }
        }
        failures
    }
}
