//! Status building blocks shared by both resources: conditions in the Kubernetes convention and the
//! connection-test record. Types only; the operator decides when they change.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A status condition (the `metav1.Condition` shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted`, `Ready` or `Verified`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason, e.g. `SecretNotFound`, `InvalidSpec`, `Conflict`, `Compiled`.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation this condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Result of the operator's connection test against a route's upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionTest {
    /// When the test ran (RFC 3339).
    pub time: String,
    /// `Succeeded` or `Failed`.
    pub result: String,
    /// The step that failed: `connect`, `greeting`, `ehlo`, `starttls`, `tls`, `auth`, `send`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The upstream's own reply, e.g. `535 5.7.8 Username and password not accepted.`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// What went wrong when there was no SMTP reply to show, e.g. `connection refused` or
    /// `invalid peer certificate: UnknownIssuer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Identifies what was tested: the effective upstream settings, the test recipient and the
    /// resource versions of the referenced Secrets (never their contents). A new fingerprint
    /// means the route changed and is tested again at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The upstream's reply to the test message sent to `spec.testRecipient` for this
    /// fingerprint; set once it was accepted, so it is not sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_message: Option<String>,
}

/// Condition types used on SmtpRoute and SenderQuota.
pub mod condition_type {
    /// The spec (and the Secrets it references) compiled without errors.
    pub const ACCEPTED: &str = "Accepted";
    /// The object is part of the relay configuration that is live.
    pub const READY: &str = "Ready";
    /// The last connection test against the upstream succeeded (routes only).
    pub const VERIFIED: &str = "Verified";
    /// The quota's usage is read from the relays (quotas only; shown only while it is not).
    pub const USAGE_REPORTED: &str = "UsageReported";
}

impl Condition {
    /// Whether `status` is `True`.
    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// The condition of `type_` in a list, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}
