//! The `DeliveryWebhook` custom resource: an HTTPS endpoint that receives the delivery events of
//! its namespace's mail, signed with a key from a Secret (Standard Webhooks). Types, schema and
//! the delivery defaults (defined once, here); what it means at run time is fixed by `compile`.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::route::{SecretKeyRef, SenderMatch};
use crate::status::Condition;

/// An HTTPS endpoint that receives the delivery events of this namespace's mail.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailroute.io",
    version = "v1alpha1",
    kind = "DeliveryWebhook",
    namespaced,
    status = "DeliveryWebhookStatus",
    shortname = "dwh",
    category = "mailroute",
    doc = "An HTTPS endpoint receiving the delivery events (received, delivered, deferred, bounced, expired, suppressed, cancelled) of this namespace's mail, in signed batches (Standard Webhooks), retried for up to 24 hours.",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.lagSeconds"),
    printcolumn(name = "Last Success", type_ = "date", json_path = ".status.lastSuccessTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    cel
)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryWebhookSpec {
    /// The endpoint, `https://…`. Plain `http://` only for a loopback host (`localhost`,
    /// `127.0.0.1`, `[::1]`), for tests.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.matches('^http://(localhost|127\\\\.[0-9]+\\\\.[0-9]+\\\\.[0-9]+|\\\\[::1\\\\])(:[0-9]+)?(/.*)?$')").message("url must be https:// (http:// only for a loopback host)"))]
    pub url: String,

    /// The signing key, `whsec_<base64>` as Standard Webhooks libraries take it, from a Secret
    /// in this namespace.
    pub signing_key_secret_ref: SecretKeyRef,

    /// The events sent: `received`, `delivered`, `deferred`, `bounced`, `expired`,
    /// `suppressed`, `cancelled`.
    #[schemars(length(min = 1))]
    pub events: Vec<WebhookEvent>,

    /// Only the mail of these senders. Omitted: every sender of the namespace.
    #[serde(default, skip_serializing_if = "SenderMatch::is_empty")]
    pub senders: SenderMatch,

    /// Extra trusted CA bundle (PEM) from a Secret in this namespace, for an endpoint whose
    /// certificate a private CA issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,

    /// Batching, time-outs and retries; omitted fields keep their defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<WebhookDeliverySpec>,
}

/// An event type a webhook subscribes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    Received,
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Suppressed,
    Cancelled,
}

impl WebhookEvent {
    /// The delivery log's name of the event (`result`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Delivered => "delivered",
            Self::Deferred => "deferred",
            Self::Bounced => "bounced",
            Self::Expired => "expired",
            Self::Suppressed => "suppressed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// How events are sent; durations like `30s`, `5m`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDeliverySpec {
    /// Events per request (default 100, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<i32>,
    /// How long a request may take, connection included (default `10s`, at most `1m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// First wait after a failed request (default `5s`); doubles after each failure, with jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff: Option<String>,
    /// Longest wait between attempts (default `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<String>,
    /// An event not accepted this long after it happened is dropped (default `24h`, at most `72h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// Events waiting for the endpoint, at most (default 100000); beyond it the oldest are
    /// dropped (counted in the status and metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backlog: Option<i64>,
}

/// The delivery defaults: the one place they are defined.
pub mod defaults {
    use std::time::Duration;

    pub const MAX_BATCH: u32 = 100;
    pub const MAX_BATCH_LIMIT: u32 = 1000;
    pub const TIMEOUT: Duration = Duration::from_secs(10);
    pub const TIMEOUT_LIMIT: Duration = Duration::from_secs(60);
    pub const INITIAL_BACKOFF: Duration = Duration::from_secs(5);
    pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
    pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);
    pub const MAX_AGE_LIMIT: Duration = Duration::from_secs(72 * 3600);
    pub const MAX_BACKLOG: u64 = 100_000;
}

/// Observed state of a webhook.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryWebhookStatus {
    /// `Accepted` (the spec compiled) and `Ready` (in the live configuration, and the endpoint
    /// took the last request).
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the endpoint last accepted a request (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<String>,
    /// The endpoint's last refusal or failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<WebhookFailure>,
    /// Age of the oldest event not yet accepted by the endpoint, in seconds (0: none waiting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<i64>,
    /// Events dropped since the webhook was created (too old, or beyond the backlog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_events: Option<i64>,
}

/// One failed request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookFailure {
    /// When (RFC 3339).
    pub time: String,
    /// The endpoint's HTTP status; absent when there was no answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i32>,
    /// The start of the endpoint's answer, or what went wrong without one (`connect: Connection
    /// refused`, `no answer within 10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
}

/// The endpoint health the relays write to Redis and the operator reads for the status: a hash
/// at [`health::key`], its fields named here (times in Unix milliseconds). The shared contract
/// between the two; neither side writes anything else there.
pub mod health {
    /// `<prefix>webhook:<namespace>/<name>:health`.
    pub fn key(prefix: &str, webhook_id: &str) -> String {
        format!("{prefix}webhook:{webhook_id}:health")
    }
    pub const LAST_SUCCESS_MS: &str = "last_success_ms";
    pub const LAST_FAILURE_MS: &str = "last_failure_ms";
    /// The endpoint's HTTP status; 0 when there was no answer.
    pub const LAST_FAILURE_STATUS: &str = "last_failure_status";
    /// An excerpt of the answer, or what went wrong without one.
    pub const LAST_FAILURE_REPLY: &str = "last_failure_reply";
    /// Age of the oldest event waiting, as of `updated_ms`.
    pub const LAG_MS: &str = "lag_ms";
    pub const UPDATED_MS: &str = "updated_ms";
    /// Events dropped past `maxAge`, and beyond `maxBacklog`.
    pub const DROPPED_EXPIRED: &str = "dropped_expired";
    pub const DROPPED_BACKLOG: &str = "dropped_backlog";
    pub const LAST_DROP_MS: &str = "last_drop_ms";
}
