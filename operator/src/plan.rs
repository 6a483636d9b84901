//! The pure reconcile step: every SmtpRoute, SenderQuota and referenced Secret in, the
//! ConfigMap and Secret to apply (only when they differ from the live ones), the status of every
//! object whose status changes, the Events for condition transitions and the connection tests
//! that are due. No I/O and no clock: the caller passes what it read and the time.
//!
//! The live ConfigMap and Secret are the last good configuration: a route left out only because
//! of a Secret error (a rotation in progress) keeps its version from there, and its status says so.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use mailroute_api::compile::{
    Compiled, Diagnostic, ObjectKind, ObjectRef, Reason, SecretStore, Severity, Tenancy, compile_for, compile_webhooks,
    keep_last_good,
};
use mailroute_api::config::{
    CONFIG_KEY, CONFIG_VERSION, CompiledRoute, RelayConfig, RelaySecrets, SECRETS_KEY, Target, short_hash,
};
use mailroute_api::provider::Provider;
use mailroute_api::quota::{QuotaUsage, SenderQuotaStatus};
use mailroute_api::route::{AuthMechanism, SmtpRouteStatus};
use mailroute_api::status::{Condition, ConnectionTest, TEST_REQUESTED_ANNOTATION, condition_type};
use mailroute_api::webhook::DeliveryWebhookStatus;
use mailroute_api::{DeliveryWebhook, SenderQuota, SmtpRoute};

use crate::clock;
use crate::conditions::{self, Desired, Status};
use crate::conntest::{self, ConnTestJob, TestMessage};
use crate::webhooks::{self, Health};

/// Annotation carrying the content hash of the ConfigMap's / Secret's document.
pub const HASH_ANNOTATION: &str = "mailroute.io/config-hash";
/// Label naming the fleet an output belongs to.
pub const FLEET_LABEL: &str = "mailroute.io/fleet";
/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "mailroute-operator";
/// `apiVersion` of the custom resources.
pub const API_VERSION: &str = "mailroute.io/v1alpha1";

/// `Ready` reason of a route running on its last good version because a Secret it references
/// is missing or unusable.
pub const SECRET_UNAVAILABLE_USING_LAST_GOOD: &str = "SecretUnavailableUsingLastGood";

/// Where the compiled configuration goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Fleet {
    /// Fleet name (default `mailroute`): outputs are `<name>-config` and `<name>-secrets`.
    pub name: String,
    /// The operator's namespace, which holds the outputs.
    pub namespace: String,
    /// Owner of the outputs (e.g. the operator's Deployment), so uninstalling removes them.
    pub owner: Option<OwnerReference>,
    /// The EHLO name of the relays (empty: their pod name); `None` when the operator was not
    /// told, and MX routes are then not judged on it.
    pub relay_hostname: Option<String>,
}

impl Fleet {
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            owner: None,
            relay_hostname: None,
        }
    }

    pub fn config_map_name(&self) -> String {
        format!("{}-config", self.name)
    }

    pub fn secret_name(&self) -> String {
        format!("{}-secrets", self.name)
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/part-of".to_string(), "mailroute".to_string()),
            ("app.kubernetes.io/managed-by".to_string(), FIELD_MANAGER.to_string()),
            ("app.kubernetes.io/component".to_string(), "relay-config".to_string()),
            (FLEET_LABEL.to_string(), self.name.clone()),
        ])
    }

    fn metadata(&self, name: String, hash: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            annotations: Some(BTreeMap::from([(HASH_ANNOTATION.to_string(), hash.to_string())])),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..Default::default()
        }
    }
}

/// A referenced Secret as read from the API.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SecretData {
    pub data: BTreeMap<String, Vec<u8>>,
    pub resource_version: String,
}

/// Everything the plan looks at.
pub struct Inputs<'a> {
    pub fleet: &'a Fleet,
    pub routes: &'a [SmtpRoute],
    pub quotas: &'a [SenderQuota],
    /// Referenced Secrets that exist, by (namespace, name).
    pub secrets: &'a BTreeMap<(String, String), SecretData>,
    pub live_config: Option<&'a ConfigMap>,
    pub live_secret: Option<&'a Secret>,
    /// Connection-test results of this process, by route id (newer than the statuses).
    pub tests: &'a BTreeMap<String, ConnectionTest>,
    /// Routes whose test is running now.
    pub tests_in_flight: &'a BTreeSet<String>,
    /// Quota usage from the relays.
    pub usage: Usage<'a>,
    /// Interval of periodic connection tests; `None` turns them off.
    pub test_interval: Option<Duration>,
    pub now: Timestamp,
    /// Platform namespaces and namespace labels.
    pub tenancy: &'a Tenancy,
    pub webhooks: &'a [DeliveryWebhook],
    /// The webhooks' endpoint health from the relays.
    pub webhook_health: Health<'a>,
}

/// Quota usage as the relays reported it, by quota id.
#[derive(Clone, Copy, Debug)]
pub enum Usage<'a> {
    /// Read this reconcile.
    Read(&'a BTreeMap<String, QuotaUsage>),
    /// The relays could not be read: the statuses keep the usage they show.
    Unavailable,
    /// Not configured (no admin URL or token): the statuses say so.
    Disabled,
}

/// A status to write.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusWrite<S> {
    pub namespace: String,
    pub name: String,
    pub status: S,
}

/// An Event to publish about one object.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedEvent {
    pub regarding: ObjectReference,
    pub warning: bool,
    pub reason: String,
    pub note: String,
    /// `Compile` for Accepted/Ready, `ConnectionTest` for Verified.
    pub action: &'static str,
}

/// What the reconcile has to do.
#[derive(Debug)]
pub struct Plan {
    /// Content hash of the compiled `RelayConfig`.
    pub config_hash: String,
    /// The ConfigMap to apply, when the live one differs.
    pub apply_config: Option<ConfigMap>,
    /// The Secret to apply, when the live one differs.
    pub apply_secret: Option<Secret>,
    pub route_statuses: Vec<StatusWrite<SmtpRouteStatus>>,
    pub quota_statuses: Vec<StatusWrite<SenderQuotaStatus>>,
    pub webhook_statuses: Vec<StatusWrite<DeliveryWebhookStatus>>,
    pub events: Vec<PlannedEvent>,
    /// Connection tests due now.
    pub tests: Vec<ConnTestJob>,
    /// When the next periodic test falls due.
    pub next_test_in: Option<Duration>,
    /// Routes with a definite connection-test verdict (for the `mailroute_route_verified` gauge).
    pub verified: BTreeMap<String, bool>,
    /// Secrets the objects reference (changes to them trigger a reconcile).
    pub referenced_secrets: BTreeSet<(String, String)>,
    pub routes_in_config: usize,
    pub quotas_in_config: usize,
    pub webhooks_in_config: usize,
}

/// The Secrets the webhooks reference (signing key, CA), by (namespace, name).
pub fn webhook_secrets(webhooks: &[DeliveryWebhook]) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for w in webhooks {
        let ns = w.namespace().unwrap_or_else(|| "default".into());
        out.insert((ns.clone(), w.spec.signing_key_secret_ref.name.clone()));
        if let Some(ca) = &w.spec.ca_secret_ref {
            out.insert((ns, ca.name.clone()));
        }
    }
    out
}

/// The Secrets the objects reference, by (namespace, name).
pub fn referenced_secrets(routes: &[SmtpRoute], quotas: &[SenderQuota]) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for r in routes {
        let ns = r.namespace().unwrap_or_else(|| "default".into());
        for name in route_secret_names(r) {
            out.insert((ns.clone(), name));
        }
    }
    for q in quotas {
        if let Some(c) = &q.spec.credentials_secret_ref {
            out.insert((q.namespace().unwrap_or_else(|| "default".into()), c.name.clone()));
        }
    }
    out
}

fn route_secret_names(r: &SmtpRoute) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(name) = r.spec.auth.as_ref().and_then(|a| a.secret_name()) {
        names.push(name.to_string());
    }
    if let Some(c) = r.spec.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref()) {
        names.push(c.name.clone());
    }
    if let Some(d) = &r.spec.dkim {
        names.push(d.key_secret_ref.name.clone());
    }
    names
}

/// The ConfigMap holding `relay.json`.
pub fn desired_config_map(fleet: &Fleet, config_json: &str, hash: &str) -> ConfigMap {
    ConfigMap {
        metadata: fleet.metadata(fleet.config_map_name(), hash),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), config_json.to_string())])),
        ..Default::default()
    }
}

/// The Secret holding `secrets.json`.
pub fn desired_secret(fleet: &Fleet, secrets_json: &str, hash: &str) -> Secret {
    Secret {
        metadata: fleet.metadata(fleet.secret_name(), hash),
        data: Some(BTreeMap::from([(
            SECRETS_KEY.to_string(),
            ByteString(secrets_json.as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// Whether the live object already carries the desired labels, hash, owner and document.
fn metadata_current(live: &ObjectMeta, desired: &ObjectMeta) -> bool {
    let subset = |want: &Option<BTreeMap<String, String>>, have: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let owners_ok = desired
        .owner_references
        .iter()
        .flatten()
        .all(|o| live.owner_references.iter().flatten().any(|l| l.uid == o.uid));
    subset(&desired.labels, &live.labels) && subset(&desired.annotations, &live.annotations) && owners_ok
}

pub fn config_map_current(live: Option<&ConfigMap>, desired: &ConfigMap) -> bool {
    live.is_some_and(|l| {
        metadata_current(&l.metadata, &desired.metadata)
            && l.data.as_ref().and_then(|d| d.get(CONFIG_KEY)) == desired.data.as_ref().and_then(|d| d.get(CONFIG_KEY))
    })
}

pub fn secret_current(live: Option<&Secret>, desired: &Secret) -> bool {
    live.is_some_and(|l| {
        metadata_current(&l.metadata, &desired.metadata)
            && l.data.as_ref().and_then(|d| d.get(SECRETS_KEY))
                == desired.data.as_ref().and_then(|d| d.get(SECRETS_KEY))
    })
}

fn describe(d: &Diagnostic) -> String {
    match &d.field {
        Some(f) => format!("{f}: {}", d.message),
        None => d.message.clone(),
    }
}

/// The distinct messages, in order (a missing Secret is reported once per key it should hold).
fn join_distinct<'a>(ds: impl Iterator<Item = &'a Diagnostic>) -> String {
    let mut out: Vec<String> = Vec::new();
    for m in ds.map(describe) {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out.join("; ")
}

/// `Accepted` (the spec and its Secrets compile) and `Ready` (in the live configuration) from the
/// compile diagnostics. A conflict leaves the spec accepted but the object out of the config.
pub fn compile_conditions(diagnostics: &[&Diagnostic], fleet: &Fleet) -> [Desired; 2] {
    let errors: Vec<&&Diagnostic> = diagnostics.iter().filter(|d| d.severity == Severity::Error).collect();
    let warnings = join_distinct(diagnostics.iter().copied().filter(|d| d.severity == Severity::Warning));
    let spec_errors: Vec<&&&Diagnostic> = errors.iter().filter(|d| d.reason != Reason::Conflict).collect();
    let accepted = match spec_errors.first() {
        Some(first) => Desired::new(
            condition_type::ACCEPTED,
            Status::False,
            first.reason.as_str(),
            join_distinct(spec_errors.iter().map(|d| ***d)),
        ),
        None if warnings.is_empty() => {
            Desired::new(condition_type::ACCEPTED, Status::True, "Valid", "the spec is valid")
        }
        None => Desired::new(condition_type::ACCEPTED, Status::True, "Valid", warnings),
    };
    let ready = match errors.first() {
        Some(first) => Desired::new(
            condition_type::READY,
            Status::False,
            first.reason.as_str(),
            format!(
                "not in the relay configuration: {}",
                join_distinct(errors.iter().map(|d| **d))
            ),
        ),
        None => Desired::new(
            condition_type::READY,
            Status::True,
            "InConfig",
            format!(
                "in the relay configuration {}/{}",
                fleet.namespace,
                fleet.config_map_name()
            ),
        ),
    };
    [accepted, ready]
}

fn object_reference(kind: &str, meta: &ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some(API_VERSION.into()),
        kind: Some(kind.into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        ..Default::default()
    }
}

/// One Event per transition to `True` or `False`; a transition repeating the reason of an earlier
/// one in the same batch (Accepted and Ready both failing on a missing Secret) is left out, and
/// so are transitions to `Unknown` (a pending test is no news).
fn events_for(kind: &str, meta: &ObjectMeta, before: &[Condition], after: &[Condition], out: &mut Vec<PlannedEvent>) {
    let mut seen: Vec<(String, bool)> = Vec::new();
    for t in conditions::transitions(before, after) {
        if t.to.status == Status::Unknown {
            continue;
        }
        let key = (t.to.reason.clone(), t.is_warning());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        out.push(PlannedEvent {
            regarding: object_reference(kind, meta),
            warning: t.is_warning(),
            reason: t.to.reason.clone(),
            note: format!("{} is {}: {}", t.to.type_, t.to.status, t.to.message),
            action: if t.to.type_ == condition_type::VERIFIED {
                "ConnectionTest"
            } else {
                "Compile"
            },
        });
    }
}

/// Computes the whole reconcile.
pub fn plan(inputs: &Inputs<'_>) -> Plan {
    let mut store = SecretStore::new();
    for ((ns, name), s) in inputs.secrets {
        store.insert(ns, name, s.data.clone());
    }
    let mut compiled = compile_for(inputs.routes, inputs.quotas, &store, inputs.tenancy);
    compile_webhooks(inputs.webhooks, &store, &mut compiled);
    let last_good = match live_outputs(inputs.live_config, inputs.live_secret) {
        Some((config, secrets)) => keep_last_good(&mut compiled, &config, &secrets),
        None => BTreeSet::new(),
    };
    let config_json = compiled.config.to_canonical_json();
    let config_hash = compiled.config.content_hash();
    let secrets_json = compiled.secrets.to_canonical_json();
    let secrets_hash = short_hash(secrets_json.as_bytes());

    let cm = desired_config_map(inputs.fleet, &config_json, &config_hash);
    let secret = desired_secret(inputs.fleet, &secrets_json, &secrets_hash);
    let now = clock::time(inputs.now);

    let mut plan = Plan {
        apply_config: (!config_map_current(inputs.live_config, &cm)).then_some(cm),
        apply_secret: (!secret_current(inputs.live_secret, &secret)).then_some(secret),
        config_hash,
        route_statuses: Vec::new(),
        quota_statuses: Vec::new(),
        webhook_statuses: Vec::new(),
        events: Vec::new(),
        tests: Vec::new(),
        next_test_in: None,
        verified: BTreeMap::new(),
        referenced_secrets: referenced_secrets(inputs.routes, inputs.quotas)
            .into_iter()
            .chain(webhook_secrets(inputs.webhooks))
            .collect(),
        routes_in_config: compiled.config.routes.len(),
        quotas_in_config: compiled.config.quotas.len(),
        webhooks_in_config: compiled.config.webhooks.len(),
    };

    for route in inputs.routes {
        plan_route(inputs, &compiled, &last_good, route, &now, &mut plan);
    }
    for quota in inputs.quotas {
        plan_quota(inputs, &compiled, quota, &now, &mut plan);
    }
    for webhook in inputs.webhooks {
        plan_webhook(inputs, &compiled, webhook, &now, &mut plan);
    }
    plan
}

/// A webhook's status: `Accepted` from the compile, `Ready` from the compile and, once it is in
/// the configuration, from its endpoint's health as the relays report it.
fn plan_webhook(inputs: &Inputs<'_>, compiled: &Compiled, webhook: &DeliveryWebhook, now: &Time, plan: &mut Plan) {
    let object = object_ref(ObjectKind::DeliveryWebhook, &webhook.metadata);
    let id = object.id();
    let diagnostics: Vec<&Diagnostic> = compiled.diagnostics_for(&object).collect();
    let [accepted, mut ready] = compile_conditions(&diagnostics, inputs.fleet);
    let previous = webhook.status.clone().unwrap_or_default();
    let mut status = DeliveryWebhookStatus {
        observed_generation: webhook.metadata.generation,
        ..previous.clone()
    };
    let in_config = compiled.config.webhooks.iter().any(|w| w.id == id);
    let health = match inputs.webhook_health {
        Health::Read(m) => m.get(&id),
        _ => None,
    };
    if in_config {
        match webhooks::status_parts(health, inputs.webhook_health, &ready.message) {
            Some(parts) => {
                ready = parts.ready;
                status.last_success_time = parts.last_success_time;
                status.last_failure = parts.last_failure;
                status.lag_seconds = parts.lag_seconds;
                status.dropped_events = parts.dropped_events;
            }
            // Redis unreadable this round: the health shown stays.
            None => {
                if let Some(c) = previous.conditions.iter().find(|c| c.type_ == condition_type::READY) {
                    ready = Desired::new(condition_type::READY, c.status, c.reason.clone(), c.message.clone());
                }
            }
        }
    }
    status.conditions = conditions::merge(
        &previous.conditions,
        &[accepted, ready],
        webhook.metadata.generation,
        now,
    );
    if webhook.status.as_ref() != Some(&status) {
        events_for(
            "DeliveryWebhook",
            &webhook.metadata,
            &previous.conditions,
            &status.conditions,
            &mut plan.events,
        );
        plan.webhook_statuses.push(StatusWrite {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            status,
        });
    }
}

fn object_ref(kind: ObjectKind, meta: &ObjectMeta) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// The configuration the relays run now (the live outputs), if both can be read.
fn live_outputs(config: Option<&ConfigMap>, secret: Option<&Secret>) -> Option<(RelayConfig, RelaySecrets)> {
    let config: RelayConfig = serde_json::from_str(config?.data.as_ref()?.get(CONFIG_KEY)?).ok()?;
    let secrets: RelaySecrets = serde_json::from_slice(&secret?.data.as_ref()?.get(SECRETS_KEY)?.0).ok()?;
    (config.version == CONFIG_VERSION).then_some((config, secrets))
}

fn plan_route(
    inputs: &Inputs<'_>,
    compiled: &Compiled,
    last_good: &BTreeSet<String>,
    route: &SmtpRoute,
    now: &Time,
    plan: &mut Plan,
) {
    let object = object_ref(ObjectKind::SmtpRoute, &route.metadata);
    let id = object.id();
    let diagnostics: Vec<&Diagnostic> = compiled.diagnostics_for(&object).collect();
    let [accepted, mut ready] = compile_conditions(&diagnostics, inputs.fleet);
    if last_good.contains(&id) {
        ready = Desired::new(
            condition_type::READY,
            Status::True,
            SECRET_UNAVAILABLE_USING_LAST_GOOD,
            format!(
                "its last good version stays in the relay configuration {}/{} until this is fixed: {}",
                inputs.fleet.namespace,
                inputs.fleet.config_map_name(),
                join_distinct(diagnostics.iter().copied().filter(|d| d.severity == Severity::Error))
            ),
        );
    }
    let previous = route.status.clone().unwrap_or_default();
    let in_config = compiled.config.routes.iter().find(|r| r.id == id);

    let (verified, last_test) = verification(inputs, compiled, route, in_config, &previous, plan);
    let generation = route.metadata.generation;
    let mut desired = vec![accepted, ready, verified];
    let deprecated = auth_deprecation(route, in_config);
    let suspended = route.spec.suspended.then(|| {
        Desired::new(
            condition_type::SUSPENDED,
            Status::True,
            "SuspendedInSpec",
            "spec.suspended: the relays hold this route's mail (not attempted, not expiring) until it is \
             unset, each message at most the relays' maximum hold time (--max-hold-time)",
        )
    });
    // Shown only while they apply: gone once the route moves to OAuth2, or is unsuspended.
    let kept: Vec<Condition> = previous
        .conditions
        .iter()
        .filter(|c| deprecated.is_some() || c.type_ != condition_type::AUTH_DEPRECATED)
        .filter(|c| suspended.is_some() || c.type_ != condition_type::SUSPENDED)
        .cloned()
        .collect();
    desired.extend(deprecated);
    desired.extend(suspended);
    let conditions = conditions::merge(&kept, &desired, generation, now);
    let summary = compiled.summaries.get(&object).cloned().unwrap_or_default();
    let status = SmtpRouteStatus {
        conditions,
        observed_generation: generation,
        host: summary.host.or(previous.host.clone()),
        port: summary.port.map(i32::from).or(previous.port),
        last_connection_test: last_test,
    };
    if route.status.as_ref() != Some(&status) {
        events_for(
            "SmtpRoute",
            &route.metadata,
            &previous.conditions,
            &status.conditions,
            &mut plan.events,
        );
        plan.route_statuses.push(StatusWrite {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            status,
        });
    }
}

/// The Microsoft 365 SMTP endpoint; Basic authentication to it is being retired.
const OFFICE365_HOST: &str = "smtp.office365.com";

/// Where the Microsoft 365 OAuth2 example lives (relative to the repository root).
pub const OFFICE365_OAUTH2_EXAMPLE: &str = "examples/oauth2/office365-client-credentials.yaml";

/// `AuthDeprecated=True` for a route that logs in to Microsoft 365 with a password (Basic SMTP
/// AUTH, `plain` or `login`): Microsoft disables it by default for existing tenants at the end of
/// December 2026 and new tenants never have it. `None` for every other route.
pub fn auth_deprecation(route: &SmtpRoute, compiled: Option<&CompiledRoute>) -> Option<Desired> {
    let auth = route.spec.auth.as_ref()?;
    if auth.oauth2.is_some() || auth.secret_ref.is_none() || auth.mechanism == AuthMechanism::Xoauth2 {
        return None;
    }
    let host = match compiled.map(|c| &c.target) {
        Some(Target::Smarthost(up)) => Some(up.host.as_str()),
        _ => route.spec.host.as_deref(),
    };
    let office365 = route.spec.provider == Some(Provider::Office365)
        || host.is_some_and(|h| h.trim_end_matches('.').eq_ignore_ascii_case(OFFICE365_HOST));
    office365.then(|| {
        Desired::new(
            condition_type::AUTH_DEPRECATED,
            Status::True,
            "BasicAuthRetiring",
            format!(
                "the route logs in to Microsoft 365 with a password (Basic SMTP AUTH), which Microsoft \
                 disables by default at the end of December 2026 (new tenants never have it): move it to \
                 auth.oauth2 with grant clientCredentials (an Entra ID app with SMTP.SendAsApp), see \
                 {OFFICE365_OAUTH2_EXAMPLE}"
            ),
        )
    })
}

/// The test envelope: from the route's sender override, else the AUTH user when it is an
/// address, else the recipient itself.
fn test_message(route: &SmtpRoute, compiled_route: &CompiledRoute, username: Option<&str>) -> Option<TestMessage> {
    let to = compiled_route.test_recipient.clone()?;
    let from = route
        .spec
        .from_override
        .clone()
        .or_else(|| username.filter(|u| u.contains('@')).map(String::from))
        .unwrap_or_else(|| to.clone());
    Some(TestMessage { from, to })
}

/// `Verified` of an MX route: nothing fixed to test, but the relays' EHLO name must be one MX
/// hosts accept (the relays refuse to deliver to MX otherwise).
fn mx_verification(relay_hostname: Option<&str>) -> Desired {
    let problem = match relay_hostname {
        Some("") => Some(
            "not delivering to MX hosts: the relays greet with their pod name, which is not a fully qualified \
             domain name; set chart value relay.hostname (relay flag --hostname) to the name the relay's \
             outbound IP addresses resolve to"
                .to_string(),
        ),
        Some(name) => mailroute_smtp::helo::mx_helo_problem(name),
        None => None,
    };
    match problem {
        Some(message) => Desired::new(condition_type::VERIFIED, Status::False, "HeloNameNotQualified", message),
        None => Desired::new(
            condition_type::VERIFIED,
            Status::Unknown,
            "NotApplicable",
            "MX delivery has no fixed upstream to test",
        ),
    }
}

/// The `Verified` condition and `lastConnectionTest` of a route; queues a test when one is due.
fn verification(
    inputs: &Inputs<'_>,
    compiled: &Compiled,
    route: &SmtpRoute,
    in_config: Option<&CompiledRoute>,
    previous: &SmtpRouteStatus,
    plan: &mut Plan,
) -> (Desired, Option<ConnectionTest>) {
    let verified = condition_type::VERIFIED;
    let id = object_ref(ObjectKind::SmtpRoute, &route.metadata).id();
    let fresh = inputs.tests.get(&id);
    let shown = fresh.or(previous.last_connection_test.as_ref()).cloned();
    let Some(interval) = inputs.test_interval else {
        let d = Desired::new(verified, Status::Unknown, "Disabled", "connection tests are turned off");
        return (d, shown);
    };
    let Some(in_config) = in_config else {
        let d = Desired::new(
            verified,
            Status::Unknown,
            "NotTested",
            "the route is not in the relay configuration",
        );
        return (d, shown);
    };
    let Target::Smarthost(upstream) = &in_config.target else {
        let d = mx_verification(inputs.fleet.relay_hostname.as_deref());
        return (d, shown);
    };

    let ns = route.namespace().unwrap_or_else(|| "default".into());
    // Credentials and CA matter for the test; the DKIM key does not.
    let tested_secrets = [
        route
            .spec
            .auth
            .as_ref()
            .and_then(|a| a.secret_name())
            .map(str::to_string),
        route
            .spec
            .tls
            .as_ref()
            .and_then(|t| t.ca_secret_ref.as_ref())
            .map(|c| c.name.clone()),
    ];
    let versions: Vec<(String, String)> = tested_secrets
        .into_iter()
        .flatten()
        .map(|n| {
            let rv = inputs
                .secrets
                .get(&(ns.clone(), n.clone()))
                .map(|s| s.resource_version.clone())
                .unwrap_or_default();
            (n, rv)
        })
        .collect();
    let credentials = compiled.secrets.upstream_credentials.get(&id);
    let oauth2 = compiled.secrets.upstream_oauth2.get(&id);
    let user = credentials
        .map(|c| c.username.as_str())
        .or(oauth2.map(|o| o.user.as_str()));
    let message = test_message(route, in_config, user);
    let fingerprint = conntest::fingerprint(upstream, message.as_ref(), &versions);
    let current = [fresh, previous.last_connection_test.as_ref()]
        .into_iter()
        .flatten()
        .find(|t| t.fingerprint.as_deref() == Some(fingerprint.as_str()));

    // `mailroute route test`: a request no record answered yet runs at once; every record
    // carries the last answered one, so it runs once.
    let requested = route
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TEST_REQUESTED_ANNOTATION))
        .map(String::as_str);
    let answered = shown.as_ref().and_then(|t| t.request_id.as_deref());
    let pending = conntest::request_pending(requested, answered);
    if !inputs.tests_in_flight.contains(&id) {
        match conntest::decide(current, &fingerprint, message.is_some(), pending, inputs.now, interval) {
            conntest::Decision::Run { send_message } => plan.tests.push(ConnTestJob {
                route_id: id.clone(),
                upstream: upstream.clone(),
                credentials: credentials.cloned(),
                oauth2: oauth2.cloned(),
                ca_pem: compiled.secrets.upstream_ca.get(&id).cloned(),
                message: if send_message { message.clone() } else { None },
                fingerprint: fingerprint.clone(),
                previous_test_message: current.and_then(|c| c.test_message.clone()),
                request_id: if pending {
                    requested.map(str::to_string)
                } else {
                    answered.map(str::to_string)
                },
            }),
            conntest::Decision::Wait(d) => {
                plan.next_test_in = Some(plan.next_test_in.map_or(d, |n| n.min(d)));
            }
        }
    }

    let desired = match current {
        Some(record) => {
            plan.verified.insert(id, record.result == conntest::SUCCEEDED);
            conntest::verified_condition(upstream, record)
        }
        None => Desired::new(
            verified,
            Status::Unknown,
            "Pending",
            format!("connection test of {}:{} pending", upstream.host, upstream.port),
        ),
    };
    (desired, shown)
}

fn plan_quota(inputs: &Inputs<'_>, compiled: &Compiled, quota: &SenderQuota, now: &Time, plan: &mut Plan) {
    let object = object_ref(ObjectKind::SenderQuota, &quota.metadata);
    let id = object.id();
    let diagnostics: Vec<&Diagnostic> = compiled.diagnostics_for(&object).collect();
    let mut desired = compile_conditions(&diagnostics, inputs.fleet).to_vec();
    let previous = quota.status.clone().unwrap_or_default();
    let generation = quota.metadata.generation;
    let summary = compiled.summaries.get(&object).cloned().unwrap_or_default();
    let usage = match inputs.usage {
        Usage::Read(u) => u.get(&id).cloned().or(previous.usage.clone()),
        Usage::Unavailable => previous.usage.clone(),
        Usage::Disabled => {
            desired.push(Desired::new(
                condition_type::USAGE_REPORTED,
                Status::False,
                "UsageDisabled",
                "usage is not reported: the operator has no admin token for the relays' admin API \
                 (chart value relay.adminToken); limits are enforced by the relays all the same",
            ));
            None
        }
    };
    let status = SenderQuotaStatus {
        conditions: conditions::merge(&previous.conditions, &desired, generation, now),
        observed_generation: generation,
        sender: summary.sender.or(previous.sender.clone()),
        limits: summary.limits.or(previous.limits.clone()),
        usage,
    };
    if quota.status.as_ref() != Some(&status) {
        events_for(
            "SenderQuota",
            &quota.metadata,
            &previous.conditions,
            &status.conditions,
            &mut plan.events,
        );
        plan.quota_statuses.push(StatusWrite {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            status,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroute_api::Manifests;
    use mailroute_api::quota::PeriodUsage;

    const GMAIL: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: gmail-credentials, namespace: mail}
stringData: {username: notifications@example.com, password: app-password}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: gmail, namespace: mail, generation: 3, uid: u-gmail}
spec:
  provider: gmail
  auth: {secretRef: {name: gmail-credentials}}
  priority: 10
"#;

    const QUOTA: &str = r#"
apiVersion: mailroute.io/v1alpha1
kind: SenderQuota
metadata: {name: shop-42, namespace: mail, generation: 1, uid: u-shop}
spec:
  sender: {authUser: shop-42}
  limits: {perMonth: 10000}
"#;

    struct World {
        m: Manifests,
        secrets: BTreeMap<(String, String), SecretData>,
        fleet: Fleet,
        tests: BTreeMap<String, ConnectionTest>,
        in_flight: BTreeSet<String>,
    }

    impl World {
        fn new(yaml: &str) -> Self {
            let m = Manifests::from_yaml(yaml, "default").unwrap();
            let mut secrets = BTreeMap::new();
            for (ns, name) in m.secrets.names() {
                let data = m.secrets.get(ns, name).unwrap().clone();
                secrets.insert(
                    (ns.clone(), name.clone()),
                    SecretData {
                        data,
                        resource_version: "7".into(),
                    },
                );
            }
            Self {
                m,
                secrets,
                fleet: Fleet::new("mailroute", "mailroute-system"),
                tests: BTreeMap::new(),
                in_flight: BTreeSet::new(),
            }
        }

        fn inputs<'a>(&'a self, live: Option<(&'a ConfigMap, &'a Secret)>) -> Inputs<'a> {
            Inputs {
                fleet: &self.fleet,
                routes: &self.m.routes,
                quotas: &self.m.quotas,
                secrets: &self.secrets,
                live_config: live.map(|l| l.0),
                live_secret: live.map(|l| l.1),
                tests: &self.tests,
                tests_in_flight: &self.in_flight,
                usage: Usage::Unavailable,
                test_interval: Some(Duration::from_secs(3600)),
                now: "2024-05-01T12:00:00Z".parse().unwrap(),
                tenancy: &mailroute_api::compile::SINGLE_TENANT,
                webhooks: &[],
                webhook_health: Health::Disabled,
            }
        }

        fn plan(&self, live: Option<(&ConfigMap, &Secret)>, usage: Option<&BTreeMap<String, QuotaUsage>>) -> Plan {
            plan(&Inputs {
                usage: usage.map_or(Usage::Unavailable, Usage::Read),
                ..self.inputs(live)
            })
        }

        /// Writes the planned statuses back, as the API server would.
        fn apply_statuses(&mut self, p: &Plan) {
            for w in &p.route_statuses {
                let r = self.m.routes.iter_mut().find(|r| r.name_any() == w.name).unwrap();
                r.status = Some(w.status.clone());
            }
            for w in &p.quota_statuses {
                let q = self.m.quotas.iter_mut().find(|q| q.name_any() == w.name).unwrap();
                q.status = Some(w.status.clone());
            }
        }
    }

    fn cond<'a>(c: &'a [Condition], t: &str) -> &'a Condition {
        c.iter().find(|c| c.type_ == t).unwrap()
    }

    const OFFICE365_BASIC: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: o365, namespace: mail}
stringData: {username: noreply@contoso.example, password: mailbox-password, user: noreply@contoso.example, tenant: contoso.example, client-id: app-1, client-secret: cs}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: o365, namespace: mail, generation: 1, uid: u-o365}
spec:
  provider: office365
  auth: {secretRef: {name: o365}}
  priority: 20
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: o365-by-host, namespace: mail, generation: 1, uid: u-o365-host}
spec:
  host: SMTP.Office365.com
  auth: {mechanism: login, secretRef: {name: o365}}
  priority: 21
"#;

    #[test]
    fn office365_with_a_password_warns_that_basic_auth_is_retired_until_it_moves_to_oauth2() {
        let yaml = format!("{GMAIL}---{OFFICE365_BASIC}");
        let mut w = World::new(&yaml);
        let p = w.plan(None, None);
        let status = |p: &Plan, name: &str| {
            p.route_statuses
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.status.conditions.clone())
                .unwrap()
        };
        for name in ["o365", "o365-by-host"] {
            let c = status(&p, name);
            let d = cond(&c, "AuthDeprecated");
            assert_eq!((d.status, d.reason.as_str()), (Status::True, "BasicAuthRetiring"));
            assert!(d.message.contains("end of December 2026"), "{}", d.message);
            assert!(d.message.contains(OFFICE365_OAUTH2_EXAMPLE), "{}", d.message);
            // Still delivering meanwhile: ready and accepted.
            assert_eq!(cond(&c, "Ready").status, Status::True);
            let e = p
                .events
                .iter()
                .find(|e| e.regarding.name.as_deref() == Some(name) && e.reason == "BasicAuthRetiring")
                .unwrap_or_else(|| panic!("no event for {name}: {:?}", p.events));
            assert!(e.warning);
            assert!(
                e.note
                    .starts_with("AuthDeprecated is True: the route logs in to Microsoft 365"),
                "{}",
                e.note
            );
        }
        assert!(
            status(&p, "gmail").iter().all(|c| c.type_ != "AuthDeprecated"),
            "only Microsoft 365 retires Basic authentication"
        );
        w.apply_statuses(&p);
        let again = w.plan(None, None);
        assert!(
            again.events.iter().all(|e| e.reason != "BasicAuthRetiring"),
            "one Event per transition: {:?}",
            again.events
        );

        // Moved to OAuth2: the condition goes away.
        let route = w.m.routes.iter_mut().find(|r| r.name_any() == "o365").unwrap();
        route.spec.auth = Some(
            serde_json::from_value(serde_json::json!({
                "oauth2": {"grant": "clientCredentials", "secretRef": {"name": "o365"}}
            }))
            .unwrap(),
        );
        let p = w.plan(None, None);
        let c = status(&p, "o365");
        assert!(c.iter().all(|c| c.type_ != "AuthDeprecated"), "{c:?}");
        assert_eq!(cond(&c, "Ready").status, Status::True);
    }

    #[test]
    fn a_suspended_route_says_so_in_its_status_until_unsuspended() {
        let mut w = World::new(GMAIL);
        let route = w.m.routes.iter_mut().find(|r| r.name_any() == "gmail").unwrap();
        route.spec.suspended = true;
        let p = w.plan(None, None);
        let c = &p.route_statuses[0].status.conditions;
        let s = cond(c, "Suspended");
        assert_eq!((s.status, s.reason.as_str()), (Status::True, "SuspendedInSpec"));
        assert_eq!(cond(c, "Ready").status, Status::True, "still in the configuration");
        w.apply_statuses(&p);
        let route = w.m.routes.iter_mut().find(|r| r.name_any() == "gmail").unwrap();
        route.spec.suspended = false;
        let p = w.plan(None, None);
        let c = &p.route_statuses[0].status.conditions;
        assert!(c.iter().all(|c| c.type_ != "Suspended"), "{c:?}");
    }

    const MX: &str = r#"
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: direct-mx, namespace: mail, generation: 1, uid: u-mx}
spec:
  delivery: mx
  match: {recipientDomains: ["*"]}
  priority: 1000
"#;

    #[test]
    fn an_mx_route_says_when_the_relays_ehlo_name_would_be_refused() {
        let verified = |hostname: Option<&str>| {
            let mut w = World::new(MX);
            w.fleet.relay_hostname = hostname.map(str::to_string);
            let p = w.plan(None, None);
            let c = cond(&p.route_statuses[0].status.conditions, "Verified").clone();
            (c.status.as_str().to_string(), c.reason, c.message)
        };
        let (status, reason, message) = verified(Some(""));
        assert_eq!((status.as_str(), reason.as_str()), ("False", "HeloNameNotQualified"));
        assert!(
            message.contains("pod name") && message.contains("relay.hostname"),
            "{message}"
        );
        let (status, reason, message) = verified(Some("mailroute-relay-0"));
        assert_eq!((status.as_str(), reason.as_str()), ("False", "HeloNameNotQualified"));
        assert!(message.contains("`mailroute-relay-0`"), "{message}");
        for fine in [Some("mail.example.com"), None] {
            let (status, reason, _) = verified(fine);
            assert_eq!(
                (status.as_str(), reason.as_str()),
                ("Unknown", "NotApplicable"),
                "{fine:?}"
            );
        }
    }

    #[test]
    fn a_healthy_route_compiles_into_both_outputs_and_becomes_ready() {
        let w = World::new(GMAIL);
        let p = w.plan(None, None);
        let cm = p.apply_config.as_ref().expect("no live ConfigMap: apply");
        assert_eq!(cm.metadata.name.as_deref(), Some("mailroute-config"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("mailroute-system"));
        assert_eq!(
            cm.metadata.labels.as_ref().unwrap()["app.kubernetes.io/part-of"],
            "mailroute"
        );
        assert_eq!(
            cm.metadata.annotations.as_ref().unwrap()[HASH_ANNOTATION],
            p.config_hash
        );
        let json = &cm.data.as_ref().unwrap()[CONFIG_KEY];
        assert!(json.contains("smtp.gmail.com"));
        assert!(!json.contains("app-password"), "a secret in the ConfigMap");
        let secret = p.apply_secret.as_ref().unwrap();
        let doc = String::from_utf8(secret.data.as_ref().unwrap()[SECRETS_KEY].0.clone()).unwrap();
        assert!(doc.contains("app-password"));

        let [w_status] = &p.route_statuses[..] else { panic!() };
        let s = &w_status.status;
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!((s.host.as_deref(), s.port), (Some("smtp.gmail.com"), Some(465)));
        assert_eq!(cond(&s.conditions, "Accepted").status, Status::True);
        let ready = cond(&s.conditions, "Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "InConfig"));
        assert_eq!(
            ready.last_transition_time,
            clock::time("2024-05-01T12:00:00Z".parse().unwrap())
        );
        let verified = cond(&s.conditions, "Verified");
        assert_eq!(
            (verified.status.as_str(), verified.reason.as_str()),
            ("Unknown", "Pending")
        );
        // The first test is due; it carries the credentials but its Debug output does not.
        let [job] = &p.tests[..] else { panic!("{:?}", p.tests) };
        assert_eq!(job.route_id, "mail/gmail");
        assert_eq!(job.credentials.as_ref().unwrap().password, "app-password");
        assert!(!format!("{job:?}").contains("app-password"));
        // Two Normal events: Accepted and Ready appeared (Verified is Unknown: no event).
        let reasons: Vec<_> = p.events.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons, ["Valid", "InConfig"]);
        assert!(p.events.iter().all(|e| !e.warning));
        assert_eq!(p.events[0].regarding.uid.as_deref(), Some("u-gmail"));
    }

    #[test]
    fn unchanged_output_and_status_means_no_write_at_all() {
        let mut w = World::new(GMAIL);
        let p = w.plan(None, None);
        w.apply_statuses(&p);
        let (cm, secret) = (p.apply_config.unwrap(), p.apply_secret.unwrap());
        let again = w.plan(Some((&cm, &secret)), None);
        assert!(again.apply_config.is_none());
        assert!(again.apply_secret.is_none());
        assert!(again.route_statuses.is_empty(), "{:?}", again.route_statuses);
        assert!(again.events.is_empty());
    }

    #[test]
    fn an_owner_is_set_on_both_outputs_and_its_absence_is_repaired() {
        let mut w = World::new(GMAIL);
        w.fleet.owner = Some(OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "mailroute-operator".into(),
            uid: "d-1".into(),
            controller: Some(false),
            block_owner_deletion: Some(false),
        });
        let p = w.plan(None, None);
        let (cm, secret) = (p.apply_config.unwrap(), p.apply_secret.unwrap());
        for meta in [&cm.metadata, &secret.metadata] {
            assert_eq!(meta.owner_references.as_ref().unwrap()[0].uid, "d-1");
        }
        assert!(w.plan(Some((&cm, &secret)), None).apply_config.is_none());
        let mut orphan = cm.clone();
        orphan.metadata.owner_references = None;
        assert!(w.plan(Some((&orphan, &secret)), None).apply_config.is_some());
    }

    #[test]
    fn a_hand_edited_config_map_is_rewritten() {
        let w = World::new(GMAIL);
        let p = w.plan(None, None);
        let (good, secret) = (p.apply_config.unwrap(), p.apply_secret.unwrap());
        assert!(w.plan(Some((&good, &secret)), None).apply_config.is_none());
        let mut edited = good.clone();
        edited.data.as_mut().unwrap().insert(CONFIG_KEY.into(), "{}".into());
        assert!(w.plan(Some((&edited, &secret)), None).apply_config.is_some());
        let mut unlabelled = good.clone();
        unlabelled.metadata.annotations = None;
        assert!(w.plan(Some((&unlabelled, &secret)), None).apply_config.is_some());
    }

    #[test]
    fn a_missing_secret_flips_accepted_and_ready_with_warning_events() {
        let mut w = World::new(GMAIL);
        let p = w.plan(None, None);
        w.apply_statuses(&p);
        w.secrets.clear();
        let p = w.plan(None, None);
        let [s] = &p.route_statuses[..] else { panic!() };
        let accepted = cond(&s.status.conditions, "Accepted");
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "SecretNotFound")
        );
        assert_eq!(
            accepted.message,
            "spec.auth.secretRef: Secret mail/gmail-credentials not found"
        );
        let ready = cond(&s.status.conditions, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "SecretNotFound")
        );
        let verified = cond(&s.status.conditions, "Verified");
        assert_eq!(verified.reason, "NotTested");
        assert!(p.tests.is_empty(), "no test for a route outside the config");
        let warnings: Vec<_> = p
            .events
            .iter()
            .filter(|e| e.warning)
            .map(|e| e.reason.as_str())
            .collect();
        assert_eq!(warnings, ["SecretNotFound"], "one Event for both conditions");
        assert!(p.events[0].note.starts_with("Accepted is False: spec.auth.secretRef"));
        assert!(!p.apply_config.as_ref().unwrap().data.as_ref().unwrap()[CONFIG_KEY].contains("gmail"));
    }

    #[test]
    fn a_secret_missing_during_a_rotation_keeps_the_last_good_route_and_says_so() {
        let mut w = World::new(GMAIL);
        let p = w.plan(None, None);
        w.apply_statuses(&p);
        let (cm, secret) = (p.apply_config.unwrap(), p.apply_secret.unwrap());
        let saved = std::mem::take(&mut w.secrets);

        let p = w.plan(Some((&cm, &secret)), None);
        assert!(p.apply_config.is_none(), "the working configuration stays");
        assert!(p.apply_secret.is_none(), "with the route's last good credentials");
        assert_eq!(p.routes_in_config, 1);
        let [s] = &p.route_statuses[..] else { panic!() };
        let accepted = cond(&s.status.conditions, "Accepted");
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "SecretNotFound")
        );
        let ready = cond(&s.status.conditions, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", SECRET_UNAVAILABLE_USING_LAST_GOOD)
        );
        assert!(
            ready.message.contains("last good version") && ready.message.contains("gmail-credentials not found"),
            "{}",
            ready.message
        );
        let warnings: Vec<_> = p
            .events
            .iter()
            .filter(|e| e.warning)
            .map(|e| e.reason.as_str())
            .collect();
        assert_eq!(warnings, ["SecretNotFound"]);
        w.apply_statuses(&p);

        // Still missing at the next reconcile: still kept, nothing rewritten.
        let again = w.plan(Some((&cm, &secret)), None);
        assert!(again.apply_config.is_none() && again.apply_secret.is_none());
        assert!(again.route_statuses.is_empty(), "{:?}", again.route_statuses);

        // The Secret is back: the route is in the configuration as compiled.
        w.secrets = saved;
        let fixed = w.plan(Some((&cm, &secret)), None);
        let [s] = &fixed.route_statuses[..] else { panic!() };
        let ready = cond(&s.status.conditions, "Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "InConfig"));
        assert_eq!(cond(&s.status.conditions, "Accepted").status, Status::True);
    }

    #[test]
    fn conflicts_leave_the_spec_accepted_but_not_ready() {
        let yaml = r#"
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: a, namespace: mail}
spec: {host: a.example.com, tls: {mode: none}, priority: 5}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: b, namespace: mail}
spec: {host: b.example.com, tls: {mode: none}, priority: 5}
"#;
        let w = World::new(yaml);
        let p = w.plan(None, None);
        let b = &p.route_statuses.iter().find(|s| s.name == "b").unwrap().status;
        assert_eq!(cond(&b.conditions, "Accepted").status, Status::True);
        let ready = cond(&b.conditions, "Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Conflict"));
        let a = &p.route_statuses.iter().find(|s| s.name == "a").unwrap().status;
        assert_eq!(cond(&a.conditions, "Ready").status, Status::True);
        assert!(cond(&a.conditions, "Accepted").message.contains("same priority 5"));
    }

    #[test]
    fn a_requested_test_runs_before_its_time_once_and_carries_its_request() {
        let mut w = World::new(GMAIL);
        let job = w.plan(None, None).tests.pop().unwrap();
        assert_eq!(job.request_id, None);
        let done = |request_id: Option<&str>| ConnectionTest {
            time: "2024-05-01T11:59:30Z".into(),
            result: conntest::SUCCEEDED.into(),
            step: None,
            reply: None,
            error: None,
            fingerprint: Some(job.fingerprint.clone()),
            test_message: None,
            request_id: request_id.map(String::from),
            replies: Vec::new(),
        };
        w.tests.insert(job.route_id.clone(), done(None));
        assert!(w.plan(None, None).tests.is_empty(), "tested 30 s ago");
        let annotate = |w: &mut World, value: &str| {
            w.m.routes[0]
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(TEST_REQUESTED_ANNOTATION.into(), value.into());
        };
        annotate(&mut w, "n1");
        let [asked] = &w.plan(None, None).tests[..] else {
            panic!("the request runs now")
        };
        assert_eq!(asked.request_id.as_deref(), Some("n1"));
        // Not twice while it runs, nor once it is answered.
        w.in_flight.insert(job.route_id.clone());
        assert!(w.plan(None, None).tests.is_empty());
        w.in_flight.clear();
        w.tests.insert(job.route_id.clone(), done(Some("n1")));
        let p = w.plan(None, None);
        assert!(p.tests.is_empty());
        let shown = p.route_statuses[0].status.last_connection_test.as_ref().unwrap();
        assert_eq!(
            shown.request_id.as_deref(),
            Some("n1"),
            "the status answers the request"
        );
        // The next periodic run keeps the answer, so the old annotation asks nothing.
        w.tests.insert(
            job.route_id.clone(),
            ConnectionTest {
                time: "2024-05-01T10:00:00Z".into(),
                ..done(Some("n1"))
            },
        );
        let [periodic] = &w.plan(None, None).tests[..] else {
            panic!("due")
        };
        assert_eq!(periodic.request_id.as_deref(), Some("n1"));
        annotate(&mut w, "n2");
        w.tests.insert(job.route_id.clone(), done(Some("n1")));
        let [again] = &w.plan(None, None).tests[..] else {
            panic!("a new request")
        };
        assert_eq!(again.request_id.as_deref(), Some("n2"));
    }

    #[test]
    fn test_results_become_the_verified_condition_and_are_not_repeated() {
        let mut w = World::new(GMAIL);
        let job = w.plan(None, None).tests.pop().unwrap();
        w.in_flight.insert(job.route_id.clone());
        assert!(w.plan(None, None).tests.is_empty(), "no second test while one runs");
        w.in_flight.clear();
        w.tests.insert(
            job.route_id.clone(),
            ConnectionTest {
                time: "2024-05-01T11:59:30Z".into(),
                result: conntest::FAILED.into(),
                step: Some("auth".into()),
                reply: Some("535 5.7.8 Username and password not accepted.".into()),
                error: None,
                fingerprint: Some(job.fingerprint.clone()),
                test_message: None,
                request_id: None,
                replies: Vec::new(),
            },
        );
        let p = w.plan(None, None);
        assert!(p.tests.is_empty());
        assert_eq!(p.next_test_in, Some(Duration::from_secs(3600 - 30)));
        assert_eq!(p.verified.get("mail/gmail"), Some(&false));
        let s = &p.route_statuses[0].status;
        let v = cond(&s.conditions, "Verified");
        assert_eq!(
            (v.status.as_str(), v.reason.as_str()),
            ("False", "AuthenticationFailed")
        );
        assert!(v.message.ends_with("535 5.7.8 Username and password not accepted."));
        assert_eq!(s.last_connection_test.as_ref().unwrap().step.as_deref(), Some("auth"));

        // A new password (new resourceVersion) is a change: tested again at once.
        w.secrets.values_mut().for_each(|s| s.resource_version = "8".into());
        let p = w.plan(None, None);
        assert_eq!(p.tests.len(), 1);
        assert_ne!(p.tests[0].fingerprint, job.fingerprint);
    }

    #[test]
    fn quota_status_shows_usage_and_keeps_it_when_the_relays_cannot_be_read() {
        let mut w = World::new(QUOTA);
        let month = PeriodUsage {
            used: 1234,
            limit: 10000,
            remaining: 8766,
            resets_at: "2024-06-01T00:00:00Z".into(),
        };
        let usage = BTreeMap::from([(
            "mail/shop-42".to_string(),
            QuotaUsage {
                month: Some(month.clone()),
                ..Default::default()
            },
        )]);
        let p = w.plan(None, Some(&usage));
        let s = &p.quota_statuses[0].status;
        assert_eq!(s.sender.as_deref(), Some("authUser:shop-42"));
        assert_eq!(s.limits.as_deref(), Some("10000/month"));
        assert_eq!(s.usage.as_ref().unwrap().month.as_ref(), Some(&month));
        assert_eq!(cond(&s.conditions, "Ready").status, Status::True);
        w.apply_statuses(&p);
        // Relays unreachable: nothing to write, the usage shown stays.
        assert!(w.plan(None, None).quota_statuses.is_empty());
        assert!(s.conditions.iter().all(|c| c.type_ != "UsageReported"));
    }

    #[test]
    fn quota_status_says_usage_is_disabled_without_an_admin_token() {
        let w = World::new(QUOTA);
        let p = plan(&Inputs {
            usage: Usage::Disabled,
            ..w.inputs(None)
        });
        let s = &p.quota_statuses[0].status;
        assert!(s.usage.is_none());
        assert_eq!(cond(&s.conditions, "Ready").status, Status::True);
        let u = cond(&s.conditions, "UsageReported");
        assert_eq!((u.status.as_str(), u.reason.as_str()), ("False", "UsageDisabled"));
        assert!(u.message.contains("admin token"), "{}", u.message);
    }

    #[test]
    fn referenced_secrets_cover_auth_ca_dkim_and_quota_credentials() {
        let yaml = r#"
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: r, namespace: a}
spec:
  host: smtp.example.com
  auth: {secretRef: {name: creds}}
  tls: {caSecretRef: {name: ca, key: ca.crt}}
  dkim: {domain: example.com, selector: s1, keySecretRef: {name: dkim}}
---
apiVersion: mailroute.io/v1alpha1
kind: SenderQuota
metadata: {name: q, namespace: b}
spec:
  sender: {authUser: shop}
  credentialsSecretRef: {name: shop-smtp}
"#;
        let m = Manifests::from_yaml(yaml, "default").unwrap();
        let got: Vec<String> = referenced_secrets(&m.routes, &m.quotas)
            .into_iter()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .collect();
        assert_eq!(got, ["a/ca", "a/creds", "a/dkim", "b/shop-smtp"]);
    }

    /// DeliveryWebhooks compile into the config (the key only into the Secret), get `Accepted`
    /// and `Ready` from the compile and the relays' health, and a failing endpoint is a Warning
    /// Event on the transition only.
    #[test]
    fn webhooks_compile_into_the_outputs_and_their_status_follows_the_endpoint() {
        const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: hook, namespace: team-a}}\nstringData: {{key: {KEY}}}\n---\n\
             apiVersion: mailroute.io/v1alpha1\nkind: DeliveryWebhook\nmetadata: {{name: app, namespace: team-a, generation: 2, uid: u-hook}}\n\
             spec: {{url: 'https://hooks.team-a.example/mail', signingKeySecretRef: {{name: hook, key: key}}, events: [delivered, bounced]}}\n---\n\
             apiVersion: mailroute.io/v1alpha1\nkind: DeliveryWebhook\nmetadata: {{name: plain, namespace: team-a, generation: 1}}\n\
             spec: {{url: 'http://hooks.team-a.example/', signingKeySecretRef: {{name: hook, key: key}}, events: [delivered]}}\n"
        );
        let m = Manifests::from_yaml(&yaml, "default").unwrap();
        let secrets: BTreeMap<(String, String), SecretData> = m
            .secrets
            .names()
            .map(|(ns, n)| {
                let data = m.secrets.get(ns, n).unwrap().clone();
                (
                    (ns.clone(), n.clone()),
                    SecretData {
                        data,
                        resource_version: "1".into(),
                    },
                )
            })
            .collect();
        let fleet = Fleet::new("mailroute", "mailroute");
        let (tests, in_flight) = (BTreeMap::new(), BTreeSet::new());
        let mut webhooks = m.webhooks.clone();
        let run = |webhooks: &[DeliveryWebhook], health: Health<'_>| {
            plan(&Inputs {
                fleet: &fleet,
                routes: &[],
                quotas: &[],
                secrets: &secrets,
                live_config: None,
                live_secret: None,
                tests: &tests,
                tests_in_flight: &in_flight,
                usage: Usage::Disabled,
                test_interval: None,
                now: "2024-05-01T12:00:00Z".parse().unwrap(),
                tenancy: &mailroute_api::compile::SINGLE_TENANT,
                webhooks,
                webhook_health: health,
            })
        };
        let p = run(&webhooks, Health::Disabled);
        assert_eq!(p.webhooks_in_config, 1);
        assert!(
            p.referenced_secrets
                .contains(&("team-a".to_string(), "hook".to_string()))
        );
        let cm = p.apply_config.as_ref().unwrap().data.as_ref().unwrap()[CONFIG_KEY].clone();
        assert!(
            cm.contains("https://hooks.team-a.example/mail") && !cm.contains("MfKQ9r8"),
            "{cm}"
        );
        let sec = String::from_utf8(
            p.apply_secret.as_ref().unwrap().data.as_ref().unwrap()[SECRETS_KEY]
                .0
                .clone(),
        )
        .unwrap();
        assert!(sec.contains(KEY));
        let status = |p: &Plan, name: &str| {
            p.webhook_statuses
                .iter()
                .find(|w| w.name == name)
                .unwrap()
                .status
                .clone()
        };
        // The http:// one is refused with the reason.
        let bad = status(&p, "plain");
        let a = cond(&bad.conditions, "Accepted");
        assert_eq!((a.status.as_str(), a.reason.as_str()), ("False", "InvalidSpec"));
        assert!(
            a.message.contains("spec.url") && a.message.contains("plain http"),
            "{}",
            a.message
        );
        // Without --redis-url the health is unknown, and the condition says why.
        let s = status(&p, "app");
        assert_eq!(cond(&s.conditions, "Accepted").status.as_str(), "True");
        let r = cond(&s.conditions, "Ready");
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("Unknown", "HealthUnavailable"));
        assert!(r.message.contains("--redis-url"));
        assert_eq!(s.observed_generation, Some(2));

        // The relays report a failing endpoint: Ready=False with its answer, a Warning Event.
        webhooks[0].status = Some(s);
        let failing = BTreeMap::from([(
            "team-a/app".to_string(),
            crate::webhooks::EndpointHealth {
                last_success_ms: Some(1_714_564_000_000),
                last_failure_ms: Some(1_714_564_700_000),
                last_failure_status: Some(503),
                last_failure_reply: Some("maintenance".into()),
                lag_ms: Some(700_000),
                dropped: 0,
            },
        )]);
        let p = run(&webhooks, Health::Read(&failing));
        let s = status(&p, "app");
        let r = cond(&s.conditions, "Ready");
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("False", "EndpointFailing"));
        assert!(r.message.contains("answered 503: maintenance"), "{}", r.message);
        assert_eq!(s.lag_seconds, Some(700));
        assert_eq!(s.last_failure.as_ref().unwrap().http_status, Some(503));
        let e: Vec<&PlannedEvent> = p
            .events
            .iter()
            .filter(|e| e.regarding.name.as_deref() == Some("app"))
            .collect();
        assert_eq!(e.len(), 1);
        assert!(e[0].warning && e[0].reason == "EndpointFailing");
        assert!(!e[0].note.contains("MfKQ9r8"));
        // Unchanged health: no write, no Event.
        webhooks[0].status = Some(s);
        let p = run(&webhooks, Health::Read(&failing));
        assert!(p.webhook_statuses.iter().all(|w| w.name != "app"));
        assert!(p.events.iter().all(|e| e.regarding.name.as_deref() != Some("app")));
        // Redis unreadable: the status keeps what it shows.
        let p = run(&webhooks, Health::Unavailable);
        assert!(p.webhook_statuses.iter().all(|w| w.name != "app"));
    }
}
