//! `compile`: custom resources + Secrets in, one `RelayConfig` + `RelaySecrets` + per-object
//! diagnostics out. Pure and deterministic: same input (in any order), byte-identical output. It
//! never fails as a whole: a broken object is left out and reported, the rest still compiles.
//!
//! This file owns the diagnostics types and the entry point; each concern has its own file (the
//! way cert-manager splits its validation): `route` (an SmtpRoute's matching, limits, retry,
//! DKIM, timeouts and the conflicts between routes), `upstream` (a smarthost route's host, TLS,
//! pins and AUTH; `oauth2` for OAuth2 clients), `quota` (SenderQuota and inbound users), `secrets` (reading Secret values),
//! `last_good` (keeping a route's last good version through a Secret rotation), `tenancy` (whose
//! mail an object governs, by namespace), `webhook` (DeliveryWebhook, compiled after the rest by
//! [`compile_webhooks`]). No I/O.

use std::collections::BTreeMap;
use std::fmt;

use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use crate::config::{Authority, CONFIG_VERSION, RelayConfig, RelaySecrets, Target};
use crate::quota::SenderQuota;
use crate::route::{AuthMechanism, SmtpRoute};

mod last_good;
mod oauth2;
mod quota;
mod route;
mod secrets;
mod tenancy;
mod upstream;
mod webhook;

pub use last_good::{is_secret_error, keep_last_good};
pub use oauth2::{GMAIL_SCOPE, GOOGLE_TOKEN_URL, OFFICE365_SCOPE, entra_token_url};
pub use quota::hash_password;
pub use secrets::SecretStore;
pub use tenancy::{SINGLE_TENANT, Tenancy, selector_matches};
pub use upstream::parse_sha256_fingerprint;
pub use webhook::{compile_webhooks, decode_signing_key};

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
    DeliveryWebhook,
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
    /// A setting only platform namespaces may use, on an object in a tenant's namespace.
    NotPlatform,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SecretNotFound => "SecretNotFound",
            Self::InvalidSpec => "InvalidSpec",
            Self::Conflict => "Conflict",
            Self::NotPlatform => "NotPlatform",
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
    /// Whose mail each route would govern now, including routes left out (what a route kept
    /// at its last good version governs: never what it governed under an older tenancy).
    pub route_authorities: BTreeMap<ObjectRef, Authority>,
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

/// Compiles every route and quota as a single-tenant install: every namespace is a platform
/// namespace (see [`compile_for`]).
pub fn compile(routes: &[SmtpRoute], quotas: &[SenderQuota], secrets: &SecretStore) -> Compiled {
    compile_for(routes, quotas, secrets, &Tenancy::single_tenant())
}

/// Compiles every route and quota, each governing the senders' namespaces `tenancy` gives it.
/// Objects with errors are left out and reported; the rest compile.
pub fn compile_for(routes: &[SmtpRoute], quotas: &[SenderQuota], secrets: &SecretStore, tenancy: &Tenancy) -> Compiled {
    let mut diagnostics = Vec::new();
    let mut summaries = BTreeMap::new();
    let mut route_authorities = BTreeMap::new();
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
        let authority = tenancy.authority(
            &object.namespace,
            r.spec.allowed_namespaces.as_ref(),
            r.spec.enforced,
            &mut d,
        );
        route_authorities.insert(object.clone(), authority.clone());
        let compiled = route::compile_route(&object, &r.spec, authority, secrets, &mut d, &mut route_secrets);
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
            secrets::merge(&mut out_secrets, route_secrets);
            compiled_routes.push(c);
        }
    }
    let compiled_routes = route::resolve_conflicts(compiled_routes, &mut diagnostics, &mut out_secrets);
    let (compiled_quotas, users) = quota::compile_quotas(quotas, secrets, tenancy, &mut diagnostics, &mut summaries);
    out_secrets.inbound_users = users;

    diagnostics.sort();
    Compiled {
        config: RelayConfig {
            version: CONFIG_VERSION,
            routes: compiled_routes,
            quotas: compiled_quotas,
            webhooks: Vec::new(),
        },
        secrets: out_secrets,
        diagnostics,
        summaries,
        route_authorities,
    }
}

/// The SASL name of a mechanism.
pub fn mechanism_name(m: AuthMechanism) -> &'static str {
    match m {
        AuthMechanism::Plain => "PLAIN",
        AuthMechanism::Login => "LOGIN",
        AuthMechanism::Xoauth2 => "XOAUTH2",
    }
}
