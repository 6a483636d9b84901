//! The `SenderQuota` custom resource: what one sender may send. Types and schema only; the
//! arithmetic lives in the relay's `quota` module and the meaning is fixed by `compile`.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::route::CredentialsSecretRef;
use crate::status::Condition;
use crate::tenancy::{AllowedNamespaces, QuotaScope};

/// How much one sender may send, and what happens when it sends more.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailroute.io",
    version = "v1alpha1",
    kind = "SenderQuota",
    namespaced,
    status = "SenderQuotaStatus",
    shortname = "sq",
    category = "mailroute",
    doc = "A sender's quota: who (auth user, from-address, from-domain or source CIDRs), how much per minute, hour, day and month, and what happens when it is exceeded.",
    printcolumn(name = "Sender", type_ = "string", json_path = ".status.sender"),
    printcolumn(name = "Limits", type_ = "string", json_path = ".status.limits"),
    printcolumn(name = "Used This Month", type_ = "integer", json_path = ".status.usage.month.used"),
    printcolumn(
        name = "Remaining",
        type_ = "integer",
        json_path = ".status.usage.month.remaining",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    cel
)]
#[x_kube(validation = Rule::new("has(self.sender) == (!has(self.scope) || self.scope == 'Sender')").message("scope: Sender needs a sender; scope: Namespace takes none").field_path(".sender"))]
#[serde(rename_all = "camelCase")]
pub struct SenderQuotaSpec {
    /// Who this quota applies to (with `scope: Sender`, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<SenderSelector>,

    /// `Sender` (default): the sender picked by `sender`. `Namespace`: every sender of a
    /// governed namespace together, each namespace with its own budget (for example 10,000
    /// bulk messages a month for namespace `shop-42`); it counts beside the sender's own quota.
    #[serde(default, skip_serializing_if = "QuotaScope::is_sender")]
    pub scope: QuotaScope,

    /// Whose mail this quota governs, by the sender's namespace. Only quotas in a platform
    /// namespace may govern other namespaces (default there: all); a quota in a tenant's
    /// namespace governs that namespace's mail only, whatever is set here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<AllowedNamespaces>,

    /// Limits; every limit set applies. Omitted: no volume limit (sender policy only).
    #[serde(default)]
    pub limits: QuotaLimits,

    /// Count `messages` (default) or `recipients`.
    #[serde(default)]
    pub count_by: CountBy,

    /// `all` mail (default) or only `bulk` mail: `Precedence: bulk` or `list`, or the `bulkHeader`.
    #[serde(default)]
    pub applies_to: AppliesTo,

    /// A header whose presence marks a message as bulk (for example `X-Campaign-Id`), in
    /// addition to `Precedence: bulk|list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9-]+$')").message("bulkHeader must be a header name"))]
    pub bulk_header: Option<String>,

    /// Over the limit: `defer` (default; 4xx, the client retries later) or `reject` (5xx).
    #[serde(default)]
    pub on_exceeded: OnExceeded,

    /// Time zone for day and month boundaries, e.g. `Asia/Tokyo` (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,

    /// If non-empty, the sender may only use these envelope-from domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_from_domains: Vec<String>,

    /// The sender may never use these envelope-from domains (for example the platform's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_from_domains: Vec<String>,

    /// The sender's inbound SMTP AUTH credentials (user name and password) from a Secret in the
    /// same namespace. With `sender.authUser` the user name must match it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretRef>,
}

/// Identifies a sender. Exactly one of the fields is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(
    validation = Rule::new("(has(self.authUser) ? 1 : 0) + (has(self.fromAddress) ? 1 : 0) + (has(self.fromDomain) ? 1 : 0) + (has(self.sourceCidrs) && self.sourceCidrs.size() > 0 ? 1 : 0) == 1")
        .message("set exactly one of authUser, fromAddress, fromDomain, sourceCidrs")
)]
#[serde(rename_all = "camelCase")]
pub struct SenderSelector {
    /// SMTP AUTH user name (most specific).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// Envelope-from address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_address: Option<String>,
    /// Envelope-from domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_domain: Option<String>,
    /// Client source networks, e.g. `10.0.0.0/8` (least specific; a longer prefix wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_cidrs: Vec<String>,
}

/// Volume limits per period; unset means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaLimits {
    /// Per rolling minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("perMinute must not be negative"))]
    pub per_minute: Option<i64>,
    /// Per rolling hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("perHour must not be negative"))]
    pub per_hour: Option<i64>,
    /// Per calendar day in `timeZone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("perDay must not be negative"))]
    pub per_day: Option<i64>,
    /// Per calendar month in `timeZone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("perMonth must not be negative"))]
    pub per_month: Option<i64>,
}

impl QuotaLimits {
    pub fn is_empty(&self) -> bool {
        self.per_minute.is_none() && self.per_hour.is_none() && self.per_day.is_none() && self.per_month.is_none()
    }
}

/// What a quota counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CountBy {
    #[default]
    Messages,
    Recipients,
}

/// Which mail a quota counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AppliesTo {
    #[default]
    All,
    Bulk,
}

/// What happens to a recipient over the limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnExceeded {
    /// `452 4.5.3` / `451 4.7.1`: the client retries later.
    #[default]
    Defer,
    /// `550 5.7.1`: refused.
    Reject,
}

/// Observed state of a quota.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SenderQuotaStatus {
    /// `Accepted` and `Ready` conditions.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The sender selector, for display (`authUser:shop-42`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The limits, for display (`10000/month bulk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<String>,
    /// Usage in the current periods, read from the relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<QuotaUsage>,
}

/// Usage per period.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaUsage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minute: Option<PeriodUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hour: Option<PeriodUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<PeriodUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<PeriodUsage>,
}

/// Usage of one period.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeriodUsage {
    pub used: i64,
    pub limit: i64,
    pub remaining: i64,
    /// When the period resets (RFC 3339).
    pub resets_at: String,
}
