//! `compile`: custom resources + Secrets in, one `RelayConfig` + `RelaySecrets` + per-object
//! diagnostics out. Pure and deterministic: same input (in any order), byte-identical output. It
//! never fails as a whole: a broken object is left out and reported, the rest still compiles.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::*;
use crate::pattern::{DomainPattern, split_address};
use crate::provider::Provider;
use crate::quota::{SenderQuota, SenderQuotaSpec};
use crate::route::{
    AuthMechanism, Backoff, DeliveryMode, DestinationLimitSpec, SmtpRoute, SmtpRouteSpec, TimeoutsSpec, TlsMode,
    TlsSpec,
};

/// Secret data by (namespace, name), as the operator reads it from the API or the relay from YAML.
#[derive(Clone, Debug, Default)]
pub struct SecretStore {
    secrets: BTreeMap<(String, String), BTreeMap<String, Vec<u8>>>,
}

impl SecretStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, namespace: &str, name: &str, data: BTreeMap<String, Vec<u8>>) {
        self.secrets.insert((namespace.to_string(), name.to_string()), data);
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&BTreeMap<String, Vec<u8>>> {
        self.secrets.get(&(namespace.to_string(), name.to_string()))
    }

    /// Names of the Secrets held, for watches and tests.
    pub fn names(&self) -> impl Iterator<Item = &(String, String)> {
        self.secrets.keys()
    }
}

/// Which object a diagnostic is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ObjectKind {
    SmtpRoute,
    SenderQuota,
}

/// Why an object is not (fully) in the configuration. The names become condition reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// A referenced Secret, or a key in it, does not exist.
    SecretNotFound,
    /// The spec is invalid (the message says which field and why).
    InvalidSpec,
    /// Another object claims the same thing.
    Conflict,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SecretNotFound => "SecretNotFound",
            Self::InvalidSpec => "InvalidSpec",
            Self::Conflict => "Conflict",
        }
    }
}

/// `Error`: the object was left out of the configuration. `Warning`: it is in, but look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about one object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Diagnostic {
    pub object: ObjectRef,
    pub severity: Severity,
    pub reason: Reason,
    /// The field concerned, as a path (`spec.auth.secretRef`), when there is one.
    pub field: Option<String>,
    pub message: String,
}

/// What the operator shows in an object's status besides conditions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectSummary {
    /// Routes: effective host (`mx` for MX delivery) and port.
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Quotas: the selector and limits, for display.
    pub sender: Option<String>,
    pub limits: Option<String>,
}

/// The result of `compile`.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub config: RelayConfig,
    pub secrets: RelaySecrets,
    /// Sorted by object, then severity.
    pub diagnostics: Vec<Diagnostic>,
    /// One entry per input object, including those left out.
    pub summaries: BTreeMap<ObjectRef, ObjectSummary>,
}

impl Compiled {
    pub fn diagnostics_for<'a>(&'a self, object: &'a ObjectRef) -> impl Iterator<Item = &'a Diagnostic> + 'a {
        self.diagnostics.iter().filter(move |d| &d.object == object)
    }

    /// Whether the object is part of the compiled configuration.
    pub fn is_included(&self, object: &ObjectRef) -> bool {
        self.summaries.contains_key(object) && !self.diagnostics_for(object).any(|d| d.severity == Severity::Error)
    }
}

struct Diags<'a> {
    object: &'a ObjectRef,
    out: &'a mut Vec<Diagnostic>,
    errors: usize,
}

impl Diags<'_> {
    fn error(&mut self, reason: Reason, field: &str, message: impl Into<String>) {
        self.errors += 1;
        self.out.push(Diagnostic {
            object: self.object.clone(),
            severity: Severity::Error,
            reason,
            field: Some(field.to_string()),
            message: message.into(),
        });
    }
}

/// Compiles every route and quota. Objects with errors are left out and reported; the rest compile.
pub fn compile(routes: &[SmtpRoute], quotas: &[SenderQuota], secrets: &SecretStore) -> Compiled {
    let mut diagnostics = Vec::new();
    let mut summaries = BTreeMap::new();
    let mut out_secrets = RelaySecrets::default();

    let mut routes: Vec<&SmtpRoute> = routes.iter().collect();
    routes.sort_by_key(|r| (r.namespace().unwrap_or_default(), r.name_any()));
    let mut compiled_routes = Vec::new();
    for r in routes {
        let object = ObjectRef {
            kind: ObjectKind::SmtpRoute,
            namespace: r.namespace().unwrap_or_else(|| "default".into()),
            name: r.name_any(),
        };
        let mut d = Diags {
            object: &object,
            out: &mut diagnostics,
            errors: 0,
        };
        let mut route_secrets = RelaySecrets::default();
        let compiled = compile_route(&object, &r.spec, secrets, &mut d, &mut route_secrets);
        let summary = ObjectSummary {
            host: compiled.as_ref().map(|c| match &c.target {
                Target::Smarthost(u) => u.host.clone(),
                Target::Mx => "mx".into(),
            }),
            port: compiled.as_ref().and_then(|c| match &c.target {
                Target::Smarthost(u) => Some(u.port),
                Target::Mx => None,
            }),
            ..Default::default()
        };
        summaries.insert(object.clone(), summary);
        if let (Some(c), 0) = (compiled, d.errors) {
            merge_secrets(&mut out_secrets, route_secrets);
            compiled_routes.push(c);
        }
    }
    let compiled_routes = resolve_route_conflicts(compiled_routes, &mut diagnostics, &mut out_secrets);

    let mut quotas: Vec<&SenderQuota> = quotas.iter().collect();
    quotas.sort_by_key(|q| (q.namespace().unwrap_or_default(), q.name_any()));
    let mut compiled_quotas: Vec<CompiledQuota> = Vec::new();
    let mut users: BTreeMap<String, (ObjectRef, InboundUser)> = BTreeMap::new();
    for q in quotas {
        let object = ObjectRef {
            kind: ObjectKind::SenderQuota,
            namespace: q.namespace().unwrap_or_else(|| "default".into()),
            name: q.name_any(),
        };
        let mut d = Diags {
            object: &object,
            out: &mut diagnostics,
            errors: 0,
        };
        let compiled = compile_quota(&object, &q.spec, secrets, &mut d);
        summaries.insert(
            object.clone(),
            ObjectSummary {
                sender: compiled.as_ref().map(|(c, _)| c.selector.describe()),
                limits: compiled.as_ref().map(|(c, _)| describe_limits(c)),
                ..Default::default()
            },
        );
        let Some((mut c, user)) = compiled else { continue };
        if d.errors > 0 {
            continue;
        }
        if let Some(other) = compiled_quotas.iter().find(|o| o.selector == c.selector) {
            let message = format!("quota {} already applies to {}", other.id, c.selector.describe());
            d.error(Reason::Conflict, "spec.sender", message);
            continue;
        }
        if let Some((name, hash)) = user {
            if let Some((owner, _)) = users.get(&name) {
                let message = format!("inbound user `{name}` is already defined by SenderQuota {}", owner.id());
                d.error(Reason::Conflict, "spec.credentialsSecretRef", message);
                continue;
            }
            users.insert(
                name,
                (
                    object.clone(),
                    InboundUser {
                        password_hash: hash,
                        quota: c.id.clone(),
                    },
                ),
            );
        }
        c.limits.sort_by_key(|l| l.period);
        compiled_quotas.push(c);
    }
    out_secrets.inbound_users = users.into_iter().map(|(k, (_, u))| (k, u)).collect();

    diagnostics.sort();
    Compiled {
        config: RelayConfig {
            version: CONFIG_VERSION,
            routes: compiled_routes,
            quotas: compiled_quotas,
        },
        secrets: out_secrets,
        diagnostics,
        summaries,
    }
}

/// Whether `d` is about a Secret an object references (missing, a key missing, empty, not text,
/// not PEM): most often a rotation in progress, not a broken spec.
pub fn is_secret_error(d: &Diagnostic) -> bool {
    d.severity == Severity::Error
        && (d.reason == Reason::SecretNotFound
            || d.field
                .as_deref()
                .is_some_and(|f| f.to_ascii_lowercase().ends_with("secretref")))
}

/// Puts back the last good version of every route left out only because of a Secret error:
/// a working configuration is never replaced by one that drops a route because one object is
/// broken for a moment (a Secret missing or mistyped during a rotation). `last`/`last_secrets`
/// are the configuration in use; a route is kept only if it is there and clashes with no route
/// of `compiled`. Its diagnostics stay (its status says it runs on its last good version).
/// Returns the ids of the routes kept.
pub fn keep_last_good(compiled: &mut Compiled, last: &RelayConfig, last_secrets: &RelaySecrets) -> BTreeSet<String> {
    let failed: BTreeSet<ObjectRef> = compiled
        .diagnostics
        .iter()
        .filter(|d| d.object.kind == ObjectKind::SmtpRoute && d.severity == Severity::Error)
        .map(|d| d.object.clone())
        .collect();
    let mut kept = BTreeSet::new();
    for object in failed {
        let id = object.id();
        let only_secrets = compiled
            .diagnostics_for(&object)
            .filter(|d| d.severity == Severity::Error)
            .all(is_secret_error);
        let Some(good) = last.routes.iter().find(|r| r.id == id) else {
            continue;
        };
        let taken = compiled.config.routes.iter().any(|r| r.id == id || clashes(r, good));
        if !only_secrets || taken {
            continue;
        }
        compiled.config.routes.push(good.clone());
        if let Some(c) = last_secrets.upstream_credentials.get(&id) {
            compiled.secrets.upstream_credentials.insert(id.clone(), c.clone());
        }
        if let Some(ca) = last_secrets.upstream_ca.get(&id) {
            compiled.secrets.upstream_ca.insert(id.clone(), ca.clone());
        }
        if let Some(k) = last_secrets.dkim_keys.get(&id) {
            compiled.secrets.dkim_keys.insert(id.clone(), k.clone());
        }
        kept.insert(id);
    }
    compiled
        .config
        .routes
        .sort_by(|a, b| (a.priority, &a.id).cmp(&(b.priority, &b.id)));
    kept
}

/// Two routes are ambiguous: same priority, same senders, a shared domain pattern.
fn clashes(a: &CompiledRoute, b: &CompiledRoute) -> bool {
    a.priority == b.priority
        && a.senders == b.senders
        && a.recipient_domains.iter().any(|p| b.recipient_domains.contains(p))
}

fn merge_secrets(into: &mut RelaySecrets, from: RelaySecrets) {
    into.upstream_credentials.extend(from.upstream_credentials);
    into.upstream_ca.extend(from.upstream_ca);
    into.dkim_keys.extend(from.dkim_keys);
}

/// A SHA-256 fingerprint as 64 lower-case hex digits, from hex with or without `:` separators.
pub fn parse_sha256_fingerprint(s: &str) -> Option<String> {
    let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| hex.to_ascii_lowercase())
}

/// The DER certificates of a PEM bundle (nothing else is read from it).
fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    use base64::Engine as _;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let body = &rest[start + BEGIN.len()..];
        let end = body.find(END).ok_or("a certificate has no END line")?;
        let b64: String = body[..end].chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("a certificate is not valid base64: {e}"))?;
        out.push(der);
        rest = &body[end + END.len()..];
    }
    Ok(out)
}

/// The fingerprints a route pins: `tls.pinnedSha256` and those of the certificates in
/// `tls.pinnedCertSecretRef`; each bad one is reported.
fn pins(secrets: &SecretStore, ns: &str, tls: &TlsSpec, d: &mut Diags<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for (i, fp) in tls.pinned_sha256.iter().enumerate() {
        match parse_sha256_fingerprint(fp) {
            Some(fp) => out.push(fp),
            None => d.error(
                Reason::InvalidSpec,
                &format!("spec.tls.pinnedSha256[{i}]"),
                format!("`{fp}` is not a SHA-256 fingerprint (64 hex digits, colons allowed)"),
            ),
        }
    }
    if let Some(r) = &tls.pinned_cert_secret_ref {
        let field = "spec.tls.pinnedCertSecretRef";
        if let Some(pem) = secret_value(secrets, ns, &r.name, &r.key, field, d) {
            match pem_certificates(&pem) {
                Ok(certs) if !certs.is_empty() => {
                    out.extend(certs.iter().map(|der| hex::encode(Sha256::digest(der))));
                }
                Ok(_) => d.error(Reason::InvalidSpec, field, "the Secret holds no PEM certificate"),
                Err(e) => d.error(Reason::InvalidSpec, field, e),
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn secret_value(
    secrets: &SecretStore,
    namespace: &str,
    name: &str,
    key: &str,
    field: &str,
    d: &mut Diags<'_>,
) -> Option<String> {
    let Some(data) = secrets.get(namespace, name) else {
        d.error(
            Reason::SecretNotFound,
            field,
            format!("Secret {namespace}/{name} not found"),
        );
        return None;
    };
    let Some(value) = data.get(key) else {
        d.error(
            Reason::SecretNotFound,
            field,
            format!("Secret {namespace}/{name} has no key `{key}`"),
        );
        return None;
    };
    match String::from_utf8(value.clone()) {
        Ok(s) if !s.trim().is_empty() => Some(s.trim_end_matches(['\r', '\n']).to_string()),
        Ok(_) => {
            d.error(
                Reason::InvalidSpec,
                field,
                format!("key `{key}` of Secret {namespace}/{name} is empty"),
            );
            None
        }
        Err(_) => {
            d.error(
                Reason::InvalidSpec,
                field,
                format!("key `{key}` of Secret {namespace}/{name} is not UTF-8 text"),
            );
            None
        }
    }
}

fn parse_duration(value: &Option<String>, default: u64, field: &str, d: &mut Diags<'_>) -> u64 {
    let Some(s) = value else { return default };
    match humantime::parse_duration(s) {
        Ok(dur) if dur >= Duration::from_secs(1) => dur.as_secs(),
        Ok(_) => {
            d.error(Reason::InvalidSpec, field, format!("`{s}` is shorter than one second"));
            default
        }
        Err(e) => {
            d.error(
                Reason::InvalidSpec,
                field,
                format!("`{s}` is not a duration like `1m` or `30m`: {e}"),
            );
            default
        }
    }
}

fn compile_route(
    object: &ObjectRef,
    spec: &SmtpRouteSpec,
    secrets: &SecretStore,
    d: &mut Diags<'_>,
    out: &mut RelaySecrets,
) -> Option<CompiledRoute> {
    let id = object.id();
    let ns = object.namespace.as_str();

    let target = match spec.delivery {
        DeliveryMode::Mx => {
            if spec.host.is_some() || spec.provider.is_some() || spec.auth.is_some() {
                d.error(
                    Reason::InvalidSpec,
                    "spec.delivery",
                    "`delivery: mx` takes no host, provider or auth",
                );
            }
            Target::Mx
        }
        DeliveryMode::Smarthost => {
            if spec.region.is_some() && spec.provider != Some(Provider::Ses) {
                d.error(
                    Reason::InvalidSpec,
                    "spec.region",
                    "region is only used with provider: ses",
                );
            }
            let preset = spec.provider.and_then(|p| p.preset(spec.region.as_deref()));
            let host = spec.host.clone().or_else(|| preset.as_ref().map(|p| p.host.clone()));
            let Some(host) = host else {
                d.error(
                    Reason::InvalidSpec,
                    "spec.host",
                    "`delivery: smarthost` needs a host or a provider preset other than custom",
                );
                return None;
            };
            let host_ok = host.parse::<std::net::IpAddr>().is_ok() || crate::pattern::is_valid_domain(&host);
            if !host_ok && host != "localhost" {
                d.error(
                    Reason::InvalidSpec,
                    "spec.host",
                    format!("`{host}` is not a host name or IP address"),
                );
            }
            let tls_spec = spec.tls.clone().unwrap_or_default();
            let tls = tls_spec
                .mode
                .or(preset.as_ref().map(|p| p.tls))
                .unwrap_or(TlsMode::Starttls);
            let default_port = preset.as_ref().map(|p| p.port).unwrap_or(match tls {
                TlsMode::None => 25,
                TlsMode::Starttls => 587,
                TlsMode::Implicit => 465,
            });
            let port = match spec.port {
                None => default_port,
                Some(p) => match u16::try_from(p) {
                    Ok(p) if p > 0 => p,
                    _ => {
                        d.error(
                            Reason::InvalidSpec,
                            "spec.port",
                            format!("port {p} is not between 1 and 65535"),
                        );
                        default_port
                    }
                },
            };
            let auth = match &spec.auth {
                None => None,
                Some(a) => {
                    if tls == TlsMode::None {
                        d.error(
                            Reason::InvalidSpec,
                            "spec.auth",
                            "AUTH over `tls: none` would send the password in clear text",
                        );
                    }
                    let field = "spec.auth.secretRef";
                    let r = &a.secret_ref;
                    let user = secret_value(secrets, ns, &r.name, &r.username_key, field, d);
                    let pass = secret_value(secrets, ns, &r.name, &r.password_key, field, d);
                    if let (Some(username), Some(password)) = (user, pass) {
                        out.upstream_credentials
                            .insert(id.clone(), Credentials { username, password });
                    }
                    Some(a.mechanism)
                }
            };
            let custom_ca = match &tls_spec.ca_secret_ref {
                None => false,
                Some(r) => {
                    if let Some(pem) = secret_value(secrets, ns, &r.name, &r.key, "spec.tls.caSecretRef", d) {
                        if !pem.contains("-----BEGIN CERTIFICATE-----") {
                            d.error(Reason::InvalidSpec, "spec.tls.caSecretRef", "the CA bundle is not PEM");
                        }
                        out.upstream_ca.insert(id.clone(), pem);
                    }
                    true
                }
            };
            let pinned_sha256 = pins(secrets, ns, &tls_spec, d);
            if !pinned_sha256.is_empty() && (custom_ca || tls_spec.verify == Some(false)) {
                d.error(
                    Reason::InvalidSpec,
                    "spec.tls",
                    "a pinned certificate replaces verification: set either the pin or `caSecretRef` / `verify: false`",
                );
            }
            Target::Smarthost(Upstream {
                host,
                port,
                tls,
                verify_tls: tls_spec.verify.unwrap_or(true),
                server_name: tls_spec.server_name.clone(),
                auth,
                custom_ca,
                pinned_sha256,
            })
        }
    };

    let mut recipient_domains = Vec::new();
    for (i, p) in spec.matches.recipient_domains.iter().enumerate() {
        match DomainPattern::parse(p) {
            Ok(p) => recipient_domains.push(p),
            Err(e) => d.error(
                Reason::InvalidSpec,
                &format!("spec.match.recipientDomains[{i}]"),
                e.to_string(),
            ),
        }
    }
    if recipient_domains.is_empty() && spec.matches.recipient_domains.is_empty() {
        recipient_domains.push(DomainPattern::Any);
    }
    recipient_domains.sort();
    recipient_domains.dedup();

    let s = &spec.matches.senders;
    let mut from_domains = Vec::new();
    for (i, p) in s.from_domains.iter().enumerate() {
        match DomainPattern::parse(p) {
            Ok(p) => from_domains.push(p),
            Err(e) => d.error(
                Reason::InvalidSpec,
                &format!("spec.match.senders.fromDomains[{i}]"),
                e.to_string(),
            ),
        }
    }
    let mut from_addresses = Vec::new();
    for (i, a) in s.from_addresses.iter().enumerate() {
        match split_address(a) {
            Ok(_) => from_addresses.push(a.to_ascii_lowercase()),
            Err(e) => d.error(
                Reason::InvalidSpec,
                &format!("spec.match.senders.fromAddresses[{i}]"),
                e.to_string(),
            ),
        }
    }
    let mut auth_users = s.auth_users.clone();
    for v in [&mut auth_users, &mut from_addresses] {
        v.sort();
        v.dedup();
    }
    from_domains.sort();
    from_domains.dedup();

    if let Some(f) = &spec.from_override
        && let Err(e) = split_address(f)
    {
        d.error(Reason::InvalidSpec, "spec.fromOverride", e.to_string());
    }
    if let Some(t) = &spec.test_recipient
        && let Err(e) = split_address(t)
    {
        d.error(Reason::InvalidSpec, "spec.testRecipient", e.to_string());
    }

    let preset_limits = spec.provider.and_then(|p| p.preset(spec.region.as_deref()));
    let l = spec.limits.clone().unwrap_or_default();
    let limits = RouteLimits {
        messages_per_minute: l
            .messages_per_minute
            .or(preset_limits.as_ref().and_then(|p| p.messages_per_minute)),
        recipients_per_day: l
            .recipients_per_day
            .or(preset_limits.as_ref().and_then(|p| p.recipients_per_day)),
        max_connections: l.max_connections,
        messages_per_connection: l.messages_per_connection,
        per_destination: compile_destination_limits(&l.per_destination, d),
    };
    for (name, v) in [
        ("messagesPerMinute", limits.messages_per_minute),
        ("recipientsPerDay", limits.recipients_per_day),
        ("maxConnections", limits.max_connections),
        ("messagesPerConnection", limits.messages_per_connection),
    ] {
        if v == Some(0) {
            d.error(
                Reason::InvalidSpec,
                &format!("spec.limits.{name}"),
                format!("{name} must be at least 1"),
            );
        }
    }

    let defaults = RetryConfig::default();
    let r = spec.retry.clone().unwrap_or_default();
    let retry = RetryConfig {
        interval_secs: parse_duration(&r.interval, defaults.interval_secs, "spec.retry.interval", d),
        lifetime_secs: parse_duration(&r.lifetime, defaults.lifetime_secs, "spec.retry.lifetime", d),
        backoff: r.backoff.unwrap_or(Backoff::Fixed),
        max_interval_secs: parse_duration(&r.max_interval, defaults.max_interval_secs, "spec.retry.maxInterval", d),
    };
    if retry.interval_secs > retry.lifetime_secs {
        d.error(
            Reason::InvalidSpec,
            "spec.retry.interval",
            "the retry interval is longer than the lifetime",
        );
    }

    let dkim = match &spec.dkim {
        None => None,
        Some(k) => {
            if !crate::pattern::is_valid_domain(&k.domain) {
                d.error(
                    Reason::InvalidSpec,
                    "spec.dkim.domain",
                    format!("`{}` is not a domain", k.domain),
                );
            }
            let field = "spec.dkim.keySecretRef";
            if let Some(pem) = secret_value(secrets, ns, &k.key_secret_ref.name, &k.key_secret_ref.key, field, d) {
                // A key the relay cannot sign with would send every message unsigned.
                match crate::dkim_key::check_signing_key(&pem) {
                    Ok(_) => {
                        out.dkim_keys.insert(id.clone(), pem);
                    }
                    Err(reason) => d.error(Reason::InvalidSpec, field, reason),
                }
            }
            Some(DkimConfig {
                domain: k.domain.to_ascii_lowercase(),
                selector: k.selector.clone(),
            })
        }
    };

    Some(CompiledRoute {
        id,
        priority: spec.priority,
        target,
        recipient_domains,
        senders: CompiledSenderMatch {
            auth_users,
            from_domains,
            from_addresses,
        },
        from_override: spec.from_override.clone(),
        limits,
        retry,
        dkim,
        test_recipient: spec.test_recipient.clone(),
        timeouts: compile_timeouts(spec.timeouts.as_ref(), d),
    })
}

/// Longest accepted session timeout: longer waits only hold a connection slot.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// `spec.timeouts`: each given field replaces its default from [`SessionTimeouts::default`].
fn compile_timeouts(spec: Option<&TimeoutsSpec>, d: &mut Diags<'_>) -> SessionTimeouts {
    let mut t = SessionTimeouts::default();
    let Some(spec) = spec else { return t };
    let fields = [
        ("connect", &spec.connect, &mut t.connect_ms),
        ("greeting", &spec.greeting, &mut t.greeting_ms),
        ("mail", &spec.mail, &mut t.mail_ms),
        ("rcpt", &spec.rcpt, &mut t.rcpt_ms),
        ("dataInit", &spec.data_init, &mut t.data_init_ms),
        ("dataTransfer", &spec.data_transfer, &mut t.data_transfer_ms),
        ("dataDone", &spec.data_done, &mut t.data_done_ms),
    ];
    for (name, value, out) in fields {
        let Some(s) = value else { continue };
        let field = format!("spec.timeouts.{name}");
        match humantime::parse_duration(s) {
            Ok(dur) if dur < Duration::from_secs(1) => {
                d.error(Reason::InvalidSpec, &field, format!("`{s}` is shorter than one second"));
            }
            Ok(dur) if dur > MAX_TIMEOUT => {
                d.error(Reason::InvalidSpec, &field, format!("`{s}` is longer than one hour"));
            }
            Ok(dur) => *out = dur.as_millis() as u64,
            Err(e) => d.error(
                Reason::InvalidSpec,
                &field,
                format!("`{s}` is not a duration like `30s` or `5m`: {e}"),
            ),
        }
    }
    t
}

/// `spec.limits.perDestination`, in the route's order (the order decides ties).
fn compile_destination_limits(specs: &[DestinationLimitSpec], d: &mut Diags<'_>) -> Vec<DestinationLimits> {
    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let field = format!("spec.limits.perDestination[{i}]");
        let mut domains = Vec::new();
        for (j, p) in spec.domains.iter().enumerate() {
            match DomainPattern::parse(p) {
                Ok(p) => domains.push(p),
                Err(e) => d.error(Reason::InvalidSpec, &format!("{field}.domains[{j}]"), e.to_string()),
            }
        }
        if spec.domains.is_empty() {
            d.error(
                Reason::InvalidSpec,
                &format!("{field}.domains"),
                "domains must not be empty",
            );
        }
        domains.sort();
        domains.dedup();
        for (name, v) in [
            ("messagesPerMinute", spec.messages_per_minute),
            ("maxConnections", spec.max_connections),
            ("messagesPerConnection", spec.messages_per_connection),
        ] {
            if v == Some(0) {
                d.error(
                    Reason::InvalidSpec,
                    &format!("{field}.{name}"),
                    format!("{name} must be at least 1"),
                );
            }
        }
        if !domains.is_empty() {
            out.push(DestinationLimits {
                domains,
                messages_per_minute: spec.messages_per_minute,
                max_connections: spec.max_connections,
                messages_per_connection: spec.messages_per_connection,
            });
        }
    }
    out
}

/// Routes with the same priority, the same senders and a shared domain pattern are ambiguous: the
/// first by id stays (with a warning), the others are left out.
fn resolve_route_conflicts(
    mut routes: Vec<CompiledRoute>,
    diagnostics: &mut Vec<Diagnostic>,
    secrets: &mut RelaySecrets,
) -> Vec<CompiledRoute> {
    routes.sort_by(|a, b| (a.priority, &a.id).cmp(&(b.priority, &b.id)));
    let mut kept: Vec<CompiledRoute> = Vec::new();
    for r in routes {
        let clash = kept.iter().find(|k| clashes(k, &r));
        if let Some(k) = clash {
            let shared: BTreeSet<String> = k
                .recipient_domains
                .iter()
                .filter(|p| r.recipient_domains.contains(p))
                .map(|p| p.to_string())
                .collect();
            let shared = shared.into_iter().collect::<Vec<_>>().join(", ");
            let (kn, rn) = (route_ref(&k.id), route_ref(&r.id));
            diagnostics.push(Diagnostic {
                object: rn.clone(),
                severity: Severity::Error,
                reason: Reason::Conflict,
                field: Some("spec.priority".into()),
                message: format!(
                    "SmtpRoute {} has the same priority {} for {shared} and the same senders; this route is not used",
                    k.id, r.priority
                ),
            });
            diagnostics.push(Diagnostic {
                object: kn,
                severity: Severity::Warning,
                reason: Reason::Conflict,
                field: Some("spec.priority".into()),
                message: format!(
                    "SmtpRoute {} has the same priority {} for {shared}; it is left out",
                    rn.id(),
                    r.priority
                ),
            });
            secrets.upstream_credentials.remove(&r.id);
            secrets.upstream_ca.remove(&r.id);
            secrets.dkim_keys.remove(&r.id);
            continue;
        }
        kept.push(r);
    }
    kept
}

fn route_ref(id: &str) -> ObjectRef {
    let (namespace, name) = id.split_once('/').unwrap_or(("default", id));
    ObjectRef {
        kind: ObjectKind::SmtpRoute,
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn compile_quota(
    object: &ObjectRef,
    spec: &SenderQuotaSpec,
    secrets: &SecretStore,
    d: &mut Diags<'_>,
) -> Option<(CompiledQuota, Option<(String, String)>)> {
    let s = &spec.sender;
    let set = [
        s.auth_user.is_some(),
        s.from_address.is_some(),
        s.from_domain.is_some(),
        !s.source_cidrs.is_empty(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        d.error(
            Reason::InvalidSpec,
            "spec.sender",
            "set exactly one of authUser, fromAddress, fromDomain, sourceCidrs",
        );
        return None;
    }
    let selector = if let Some(u) = &s.auth_user {
        if u.is_empty() || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
            d.error(
                Reason::InvalidSpec,
                "spec.sender.authUser",
                "authUser must be a non-empty name without spaces",
            );
        }
        QuotaSelector::AuthUser(u.clone())
    } else if let Some(a) = &s.from_address {
        if let Err(e) = split_address(a) {
            d.error(Reason::InvalidSpec, "spec.sender.fromAddress", e.to_string());
        }
        QuotaSelector::FromAddress(a.to_ascii_lowercase())
    } else if let Some(dom) = &s.from_domain {
        match DomainPattern::parse(dom) {
            Ok(p) => QuotaSelector::FromDomain(p),
            Err(e) => {
                d.error(Reason::InvalidSpec, "spec.sender.fromDomain", e.to_string());
                return None;
            }
        }
    } else {
        let mut nets = Vec::new();
        for (i, c) in s.source_cidrs.iter().enumerate() {
            match c.parse::<IpNet>() {
                Ok(n) => nets.push(n.trunc()),
                Err(_) => d.error(
                    Reason::InvalidSpec,
                    &format!("spec.sender.sourceCidrs[{i}]"),
                    format!("`{c}` is not a CIDR such as 10.0.0.0/8"),
                ),
            }
        }
        nets.sort();
        nets.dedup();
        QuotaSelector::SourceCidrs(nets)
    };

    let mut limits = Vec::new();
    let l = &spec.limits;
    for (period, field, v) in [
        (Period::Minute, "perMinute", l.per_minute),
        (Period::Hour, "perHour", l.per_hour),
        (Period::Day, "perDay", l.per_day),
        (Period::Month, "perMonth", l.per_month),
    ] {
        match v.map(u64::try_from) {
            None => {}
            Some(Ok(max)) => limits.push(PeriodLimit { period, max }),
            Some(Err(_)) => d.error(
                Reason::InvalidSpec,
                &format!("spec.limits.{field}"),
                format!("{field} must not be negative"),
            ),
        }
    }

    let time_zone = spec.time_zone.clone().unwrap_or_else(|| "UTC".into());
    if time_zone.parse::<chrono_tz::Tz>().is_err() {
        d.error(
            Reason::InvalidSpec,
            "spec.timeZone",
            format!("`{time_zone}` is not an IANA time zone such as Asia/Tokyo"),
        );
    }

    let mut domain_list = |list: &[String], field: &str| {
        let mut out = Vec::new();
        for (i, p) in list.iter().enumerate() {
            match DomainPattern::parse(p) {
                Ok(p) => out.push(p),
                Err(e) => d.error(Reason::InvalidSpec, &format!("{field}[{i}]"), e.to_string()),
            }
        }
        out.sort();
        out.dedup();
        out
    };
    let allowed_from_domains = domain_list(&spec.allowed_from_domains, "spec.allowedFromDomains");
    let denied_from_domains = domain_list(&spec.denied_from_domains, "spec.deniedFromDomains");

    let user = match &spec.credentials_secret_ref {
        None => None,
        Some(r) => {
            let field = "spec.credentialsSecretRef";
            let ns = object.namespace.as_str();
            let name = secret_value(secrets, ns, &r.name, &r.username_key, field, d);
            let pass = secret_value(secrets, ns, &r.name, &r.password_key, field, d);
            match (name, pass) {
                (Some(name), Some(pass)) => {
                    if let QuotaSelector::AuthUser(u) = &selector
                        && u != &name
                    {
                        d.error(
                            Reason::InvalidSpec,
                            field,
                            format!("the Secret's user name `{name}` differs from sender.authUser `{u}`"),
                        );
                    }
                    Some((name.clone(), hash_password(&object.id(), &name, &pass)))
                }
                _ => None,
            }
        }
    };

    Some((
        CompiledQuota {
            id: object.id(),
            selector,
            limits,
            count_by: spec.count_by,
            applies_to: spec.applies_to,
            bulk_header: spec.bulk_header.clone(),
            on_exceeded: spec.on_exceeded,
            time_zone,
            allowed_from_domains,
            denied_from_domains,
        },
        user,
    ))
}

/// Argon2id with a salt derived from the quota and user, so the same input compiles to the same
/// bytes (the operator must not rewrite the Secret on every reconcile).
pub fn hash_password(quota_id: &str, user: &str, password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let digest = Sha256::digest(format!("mailroute-inbound\0{quota_id}\0{user}").as_bytes());
    let Ok(salt) = SaltString::encode_b64(&digest[..16]) else {
        return String::new();
    };
    match argon2::Argon2::default().hash_password(password.as_bytes(), &salt) {
        Ok(h) => h.to_string(),
        Err(_) => String::new(),
    }
}

fn describe_limits(q: &CompiledQuota) -> String {
    let mut parts: Vec<String> = q
        .limits
        .iter()
        .map(|l| format!("{}/{}", l.max, l.period.as_str()))
        .collect();
    if parts.is_empty() {
        parts.push("unlimited".into());
    }
    let mut s = parts.join(", ");
    if q.count_by == crate::quota::CountBy::Recipients {
        s.push_str(" recipients");
    }
    if q.applies_to == crate::quota::AppliesTo::Bulk {
        s.push_str(" bulk");
    }
    s
}

/// The SASL name of a mechanism.
pub fn mechanism_name(m: AuthMechanism) -> &'static str {
    match m {
        AuthMechanism::Plain => "PLAIN",
        AuthMechanism::Login => "LOGIN",
        AuthMechanism::Xoauth2 => "XOAUTH2",
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;
    use crate::Manifests;

    fn compile_with(timeouts: &str) -> Compiled {
        let yaml = format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata:\n  name: up\n  namespace: mail\nspec:\n  host: smtp.example.com\n{timeouts}"
        );
        let mut m = Manifests::default();
        m.add_yaml(&yaml, "default").unwrap();
        m.compile()
    }

    #[test]
    fn postfix_defaults_unless_overridden() {
        let c = compile_with("");
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let t = c.config.routes[0].timeouts;
        assert_eq!(
            (t.connect_ms, t.greeting_ms, t.mail_ms, t.rcpt_ms),
            (30_000, 300_000, 300_000, 300_000)
        );
        assert_eq!(
            (t.data_init_ms, t.data_transfer_ms, t.data_done_ms),
            (120_000, 180_000, 600_000)
        );
        // Default timeouts leave the compiled JSON as it was.
        assert!(!c.config.to_canonical_json().contains("timeouts"));

        let c = compile_with("  timeouts: {connect: 5s, greeting: 1m, dataDone: 20m}\n");
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let t = c.config.routes[0].timeouts;
        assert_eq!(
            t,
            SessionTimeouts {
                connect_ms: 5_000,
                greeting_ms: 60_000,
                data_done_ms: 1_200_000,
                ..SessionTimeouts::default()
            }
        );
        let json = c.config.to_canonical_json();
        let back: RelayConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.routes[0].timeouts, t, "{json}");
    }

    #[test]
    fn broken_timeouts_are_reported_and_leave_the_route_out() {
        let c = compile_with("  timeouts: {connect: soon, mail: 500ms, rcpt: 2h, dataInit: 30s}\n");
        let fields: BTreeSet<&str> = c.diagnostics.iter().filter_map(|d| d.field.as_deref()).collect();
        assert_eq!(
            fields,
            BTreeSet::from(["spec.timeouts.connect", "spec.timeouts.mail", "spec.timeouts.rcpt"])
        );
        assert!(c.config.routes.is_empty());
    }
}

#[cfg(test)]
mod per_destination_tests {
    use super::*;
    use crate::Manifests;

    fn compile_route_yaml(limits: &str) -> Compiled {
        let yaml = format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata:\n  name: mx\n  namespace: mail\nspec:\n  delivery: mx\n  limits:\n{limits}"
        );
        let mut m = Manifests::default();
        m.add_yaml(&yaml, "default").unwrap();
        m.compile()
    }

    #[test]
    fn per_destination_limits_compile_in_order() {
        let c = compile_route_yaml(
            "    messagesPerMinute: 100\n    perDestination:\n    - domains: [DoCoMo.ne.jp, '*.softbank.jp']\n      messagesPerMinute: 20\n      maxConnections: 1\n    - domains: ['*']\n      messagesPerConnection: 50\n",
        );
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        let l = &c.config.routes[0].limits;
        assert_eq!(l.messages_per_minute, Some(100));
        assert_eq!(l.per_destination.len(), 2);
        let first = &l.per_destination[0];
        assert_eq!(
            first.domains,
            vec![
                DomainPattern::parse("docomo.ne.jp").unwrap(),
                DomainPattern::parse("*.softbank.jp").unwrap()
            ]
        );
        assert_eq!(
            (
                first.messages_per_minute,
                first.max_connections,
                first.messages_per_connection
            ),
            (Some(20), Some(1), None)
        );
        assert_eq!(l.destination("docomo.ne.jp"), Some(first));
        assert_eq!(l.destination("i.softbank.jp"), Some(first));
        assert_eq!(l.destination("example.com"), Some(&l.per_destination[1]));
        // The JSON of a route without perDestination is unchanged (the field is omitted).
        let plain = compile_route_yaml("    messagesPerMinute: 5\n");
        assert!(!plain.config.to_canonical_json().contains("perDestination"));
        assert!(c.config.to_canonical_json().contains("perDestination"));
    }

    #[test]
    fn broken_per_destination_entries_are_reported() {
        let c = compile_route_yaml(
            "    perDestination:\n    - domains: ['bad domain']\n      messagesPerMinute: 0\n    - domains: []\n      maxConnections: 2\n",
        );
        let fields: BTreeSet<&str> = c.diagnostics.iter().filter_map(|d| d.field.as_deref()).collect();
        assert!(
            fields.contains("spec.limits.perDestination[0].domains[0]"),
            "{fields:?}"
        );
        assert!(
            fields.contains("spec.limits.perDestination[0].messagesPerMinute"),
            "{fields:?}"
        );
        assert!(fields.contains("spec.limits.perDestination[1].domains"), "{fields:?}");
    }
}

#[cfg(test)]
mod dkim_key_tests {
    use super::*;
    use crate::Manifests;

    fn compile_with_key(pem: &str) -> Compiled {
        let key: String = pem.lines().map(|l| format!("    {l}\n")).collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: dkim\n  namespace: mail\nstringData:\n  private.key: |\n{key}---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata:\n  name: mx\n  namespace: mail\nspec:\n  delivery: mx\n  dkim:\n    domain: example.com\n    selector: s1\n    keySecretRef:\n      name: dkim\n"
        );
        let mut m = Manifests::default();
        m.add_yaml(&yaml, "default").unwrap();
        m.compile()
    }

    #[test]
    fn a_key_the_relay_signs_with_compiles() {
        for pem in [
            include_str!("../../testkit/keys/dkim-rsa-2048.pem"),
            include_str!("../../testkit/keys/dkim-rsa-4096.pem"),
            include_str!("../../testkit/keys/dkim-ed25519.pem"),
        ] {
            let c = compile_with_key(pem);
            assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
            assert_eq!(c.config.routes.len(), 1);
            assert!(c.secrets.dkim_keys.contains_key("mail/mx"));
        }
    }

    #[test]
    fn a_1024_bit_rsa_key_is_refused_when_compiled() {
        let c = compile_with_key(include_str!("../../testkit/keys/dkim-rsa-1024.pem"));
        let [d] = c.diagnostics.as_slice() else {
            panic!("{:#?}", c.diagnostics)
        };
        assert_eq!(
            (d.severity, d.reason, d.field.as_deref()),
            (Severity::Error, Reason::InvalidSpec, Some("spec.dkim.keySecretRef"))
        );
        assert_eq!(
            d.message,
            "the DKIM key is a 1024-bit RSA key; the relay signs with RSA keys of 2048 to 4096 bits or Ed25519 keys"
        );
        // Left out, with its key: never a route that sends unsigned mail.
        assert!(c.config.routes.is_empty());
        assert!(c.secrets.dkim_keys.is_empty());
        let not_a_key = compile_with_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----");
        assert_eq!(not_a_key.diagnostics.len(), 1, "{:#?}", not_a_key.diagnostics);
        assert!(not_a_key.config.routes.is_empty());
    }
}

#[cfg(test)]
mod last_good_tests {
    use super::*;
    use crate::Manifests;

    const ROUTES: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: gmail-credentials, namespace: mail}
stringData: {username: app@example.com, password: app-password}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: gmail, namespace: mail}
spec:
  host: smtp.gmail.com
  port: 465
  tls: {mode: implicit}
  priority: 10
  auth: {secretRef: {name: gmail-credentials}}
  match: {recipientDomains: ["*"]}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: local, namespace: mail}
spec:
  host: 127.0.0.1
  port: 2525
  tls: {mode: none}
  priority: 5
  match: {recipientDomains: [local.example]}
"#;

    fn compile_yaml(yaml: &str) -> Compiled {
        Manifests::from_yaml(yaml, "default").unwrap().compile()
    }

    /// The routes with the Secret replaced (or removed when `secret` is empty).
    fn with_secret(secret: &str) -> String {
        let rest = ROUTES.split_once("---\n").unwrap().1;
        format!("{secret}{rest}")
    }

    fn ids(c: &Compiled) -> Vec<&str> {
        c.config.routes.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn a_route_whose_secret_is_missing_or_mistyped_keeps_its_last_good_version() {
        let good = compile_yaml(ROUTES);
        assert_eq!(ids(&good), ["mail/local", "mail/gmail"]);
        let broken = [
            with_secret(""),
            // Mistyped key: `user` instead of `username`.
            with_secret(
                "apiVersion: v1\nkind: Secret\nmetadata: {name: gmail-credentials, namespace: mail}\nstringData: {user: app@example.com, password: new}\n---\n",
            ),
            with_secret(
                "apiVersion: v1\nkind: Secret\nmetadata: {name: gmail-credentials, namespace: mail}\nstringData: {username: app@example.com, password: \"\"}\n---\n",
            ),
        ];
        for yaml in broken {
            let mut c = compile_yaml(&yaml);
            assert_eq!(ids(&c), ["mail/local"], "the broken route alone is left out: {yaml}");
            let kept = keep_last_good(&mut c, &good.config, &good.secrets);
            assert_eq!(kept.into_iter().collect::<Vec<_>>(), ["mail/gmail"]);
            assert_eq!(c.config, good.config, "{yaml}");
            assert_eq!(c.secrets, good.secrets);
            assert_eq!(c.config.content_hash(), good.config.content_hash());
            // The diagnostics stay, for the route's status.
            assert!(
                c.diagnostics
                    .iter()
                    .any(|d| d.object.name == "gmail" && is_secret_error(d))
            );
        }
    }

    #[test]
    fn nothing_is_kept_for_a_broken_spec_a_new_route_or_a_clash() {
        let good = compile_yaml(ROUTES);
        // A spec error is the author's to fix: the route goes.
        let bad_spec = ROUTES.replace("port: 465", "port: 0");
        let mut c = compile_yaml(&bad_spec);
        assert!(keep_last_good(&mut c, &good.config, &good.secrets).is_empty());
        assert_eq!(ids(&c), ["mail/local"]);
        // No last good version: nothing to keep.
        let mut c = compile_yaml(&with_secret(""));
        let empty = RelayConfig {
            version: CONFIG_VERSION,
            routes: Vec::new(),
            quotas: Vec::new(),
        };
        assert!(keep_last_good(&mut c, &empty, &RelaySecrets::default()).is_empty());
        assert_eq!(ids(&c), ["mail/local"]);
        // A route that took its place (same priority and domains) wins over the old version.
        let taken = format!(
            "{}---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: other, namespace: mail}}\nspec: {{host: other.example, tls: {{mode: none}}, priority: 10, match: {{recipientDomains: [\"*\"]}}}}\n",
            with_secret("")
        );
        let mut c = compile_yaml(&taken);
        assert!(keep_last_good(&mut c, &good.config, &good.secrets).is_empty());
        assert_eq!(ids(&c), ["mail/local", "mail/other"]);
    }
}

#[cfg(test)]
mod pinning_tests {
    use super::*;
    use crate::Manifests;

    // A certificate (not a real one: only its bytes matter here) and its SHA-256.
    const PEM: &str = "-----BEGIN CERTIFICATE-----\nYWJj\n-----END CERTIFICATE-----\n";
    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn compile_tls(tls: &str) -> Compiled {
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, namespace: mail}}\ntype: Opaque\nstringData:\n  tls.crt: |\n    {}\n    YWJj\n    {}\n  junk: hello\n---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: r, namespace: mail}}\nspec:\n  host: smtp.example.net\n  tls: {tls}\n",
            PEM.lines().next().unwrap(),
            PEM.lines().nth(2).unwrap()
        );
        let mut m = Manifests::default();
        m.add_yaml(&yaml, "default").unwrap();
        m.compile()
    }

    fn pins(c: &Compiled) -> Vec<String> {
        match &c.config.routes.first().map(|r| &r.target) {
            Some(Target::Smarthost(up)) => up.pinned_sha256.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fingerprints_are_normalised_or_refused() {
        let colons = "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD";
        assert_eq!(parse_sha256_fingerprint(colons).as_deref(), Some(ABC_SHA256));
        assert_eq!(parse_sha256_fingerprint(ABC_SHA256).as_deref(), Some(ABC_SHA256));
        assert_eq!(parse_sha256_fingerprint(&ABC_SHA256[2..]), None);
        assert_eq!(parse_sha256_fingerprint(&ABC_SHA256.replace('b', "g")), None);

        let c = compile_tls(&format!("{{pinnedSha256: [\"{colons}\"]}}"));
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        assert_eq!(pins(&c), vec![ABC_SHA256.to_owned()]);

        let c = compile_tls("{pinnedSha256: [\"sha256:1234\"]}");
        let d = c.diagnostics.first().expect("an error");
        assert_eq!(d.field.as_deref(), Some("spec.tls.pinnedSha256[0]"));
        assert!(d.message.contains("is not a SHA-256 fingerprint"), "{d:?}");
    }

    #[test]
    fn a_pinned_certificate_compiles_to_its_fingerprint() {
        let c = compile_tls("{pinnedCertSecretRef: {name: up, key: tls.crt}}");
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        assert_eq!(pins(&c), vec![ABC_SHA256.to_owned()]);
        // Nothing secret: the fingerprint is in the config, the certificate is not.
        assert!(!c.config.to_canonical_json().contains("YWJj"));

        let c = compile_tls("{pinnedCertSecretRef: {name: up, key: junk}}");
        assert!(
            c.diagnostics
                .iter()
                .any(|d| d.field.as_deref() == Some("spec.tls.pinnedCertSecretRef")
                    && d.message.contains("no PEM certificate")),
            "{:#?}",
            c.diagnostics
        );
        let c = compile_tls(&format!("{{verify: false, pinnedSha256: [\"{ABC_SHA256}\"]}}"));
        assert!(
            c.diagnostics
                .iter()
                .any(|d| d.message.contains("replaces verification")),
            "{:#?}",
            c.diagnostics
        );
    }
}
