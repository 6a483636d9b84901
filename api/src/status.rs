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
}
