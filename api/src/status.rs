//! Status building blocks shared by both resources: conditions in the Kubernetes convention and the
//! connection-test record (with the annotation that asks for a test now). Types only; the
//! operator decides when they change.

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A status condition (the `metav1.Condition` shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted`, `Ready`, `Verified` or `UsageReported` (others, written by someone else, are kept).
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// CamelCase reason, e.g. `SecretNotFound`, `InvalidSpec`, `Conflict`, `Compiled`.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339, whole seconds).
    pub last_transition_time: Time,
    /// The generation this condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A condition's status, as in `metav1.Condition`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl fmt::Display for ConditionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A condition's type: ours, or one written by someone else (kept as it is, never rejected, so a
/// foreign condition does not make the object unreadable). A string in the schema.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConditionType {
    /// The spec (and the Secrets it references) compiled without errors.
    Accepted,
    /// The object is part of the relay configuration that is live.
    Ready,
    /// The last connection test against the upstream succeeded (routes only).
    Verified,
    /// The quota's usage is read from the relays (quotas only; shown only while it is not).
    UsageReported,
    /// The route authenticates in a way its provider is retiring (routes only; shown only while
    /// it does, `True` is the warning): Basic (password) SMTP AUTH to Microsoft 365.
    AuthDeprecated,
    /// `spec.suspended`: the relays hold the route's mail (routes only; shown only while it is).
    Suspended,
    /// Any other type.
    Other(String),
}

impl ConditionType {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Accepted => "Accepted",
            Self::Ready => "Ready",
            Self::Verified => "Verified",
            Self::UsageReported => "UsageReported",
            Self::AuthDeprecated => "AuthDeprecated",
            Self::Suspended => "Suspended",
            Self::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "Accepted" => Self::Accepted,
            "Ready" => Self::Ready,
            "Verified" => Self::Verified,
            "UsageReported" => Self::UsageReported,
            "AuthDeprecated" => Self::AuthDeprecated,
            "Suspended" => Self::Suspended,
            other => Self::Other(other.to_string()),
        }
    }
}

impl fmt::Display for ConditionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for ConditionType {
    fn from(s: &str) -> Self {
        Self::parse(s)
    }
}

impl PartialEq<str> for ConditionType {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ConditionType {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for ConditionType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ConditionType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

impl JsonSchema for ConditionType {
    fn schema_name() -> Cow<'static, str> {
        "ConditionType".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }
}

/// Result of the operator's connection test against a route's upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionTest {
    /// When the test ran (RFC 3339).
    pub time: String,
    /// `Succeeded` or `Failed`.
    pub result: String,
    /// The step that failed: `token` (an OAuth2 route's token request), `connect`, `greeting`,
    /// `ehlo`, `starttls`, `tls`, `auth`, `send`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The upstream's own reply, e.g. `535 5.7.8 Username and password not accepted.`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// What went wrong when there was no SMTP reply to show, e.g. `connection refused`,
    /// `invalid peer certificate: UnknownIssuer`, or the token endpoint's error
    /// (`invalid_client: AADSTS7000215: Invalid client secret provided. ...`).
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
    /// The value of the route's `mailroute.io/test-requested` annotation (`mailroute route
    /// test`) last answered: the run that answered it and every later one carry it, so a
    /// request is run once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The upstream's own positive replies in order (greeting, EHLO, STARTTLS, AUTH); a failing
    /// step's reply is `reply`. Server text only, never what the operator sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replies: Vec<StepReply>,
}

/// One reply of the upstream in a connection test.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepReply {
    /// `greeting`, `ehlo`, `starttls` or `auth`.
    pub step: String,
    /// The reply as sent, e.g. `220 smtp.example.com ESMTP ready`.
    pub reply: String,
}

/// The SmtpRoute annotation that asks the operator to run the connection test now (any new
/// value; `mailroute route test` sets a fresh one and waits for `lastConnectionTest.requestId`
/// to show it).
pub const TEST_REQUESTED_ANNOTATION: &str = "mailroute.io/test-requested";

/// Condition types used on SmtpRoute and SenderQuota.
pub mod condition_type {
    use super::ConditionType;

    pub const ACCEPTED: ConditionType = ConditionType::Accepted;
    pub const READY: ConditionType = ConditionType::Ready;
    pub const VERIFIED: ConditionType = ConditionType::Verified;
    pub const USAGE_REPORTED: ConditionType = ConditionType::UsageReported;
    pub const AUTH_DEPRECATED: ConditionType = ConditionType::AuthDeprecated;
    pub const SUSPENDED: ConditionType = ConditionType::Suspended;
}

impl Condition {
    /// Whether `status` is `True`.
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// The condition of `type_` in a list, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &ConditionType) -> Option<&'a Condition> {
    conditions.iter().find(|c| &c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_keep_their_json_and_foreign_types() {
        let json = r#"[{"type":"Ready","status":"False","reason":"Conflict","message":"m","lastTransitionTime":"2024-05-01T12:00:00Z","observedGeneration":3},{"type":"Custom","status":"Unknown","reason":"Other","lastTransitionTime":"2023-01-01T00:00:00Z"}]"#;
        let conditions: Vec<Condition> = serde_json::from_str(json).unwrap();
        assert_eq!(conditions[0].type_, ConditionType::Ready);
        assert_eq!(conditions[0].status, ConditionStatus::False);
        assert_eq!(conditions[0].last_transition_time.0.as_second(), 1_714_564_800);
        // A condition type written by someone else is kept as it is.
        assert_eq!(conditions[1].type_, ConditionType::Other("Custom".into()));
        assert_eq!(find_condition(&conditions, &ConditionType::Ready), Some(&conditions[0]));
        let back = serde_json::to_string(&conditions).unwrap();
        assert_eq!(back, json.replace(r#""Other","#, r#""Other","message":"","#));
        // The status is one of the three values, as in metav1.Condition.
        assert!(serde_json::from_str::<ConditionStatus>(r#""Maybe""#).is_err());
    }
}
