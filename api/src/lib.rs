//! mailroute's shared API: the `SmtpRoute`, `SenderQuota` and `DeliveryWebhook` custom resources, the compiled
//! `RelayConfig`/`RelaySecrets` that relays read, and the pure `compile` step between them.
//! Nothing in this crate performs I/O.

// kube's `printcolumn(...)` repeats `type_`/`json_path` by design; clippy reads them as duplicates.
#![allow(clippy::duplicated_attributes)]

pub mod compile;
pub mod config;
pub mod dkim_key;
pub mod manifest;
pub mod pattern;
pub mod podmap;
pub mod provider;
pub mod quota;
pub mod route;
pub mod status;
pub mod tenancy;
pub mod webhook;

pub use compile::{
    Compiled, Diagnostic, ObjectKind, ObjectRef, Reason, SecretStore, Severity, Tenancy, compile, compile_for,
};
pub use config::{RelayConfig, RelaySecrets};
pub use manifest::Manifests;
pub use quota::{SenderQuota, SenderQuotaSpec};
pub use route::{SmtpRoute, SmtpRouteSpec};
pub use tenancy::{AllowedNamespaces, FromNamespaces, QuotaScope};
pub use webhook::{DeliveryWebhook, DeliveryWebhookSpec};

/// API group of the custom resources.
pub const GROUP: &str = "mailroute.io";
