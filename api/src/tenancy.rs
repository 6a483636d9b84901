//! Tenancy fields shared by `SmtpRoute` and `SenderQuota`: which senders' namespaces a platform
//! object serves (`allowedNamespaces`, the shape of Gateway API listeners' `allowedRoutes.namespaces`)
//! and whether a quota caps one sender or a whole namespace. Types and schema only; what they
//! mean is decided by `compile` (see `compile::tenancy`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which namespaces' mail a platform route or quota governs. Only objects in a platform
/// namespace may serve other namespaces; in a tenant's namespace an object always governs its
/// own namespace's mail only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("self.from != 'Selector' || has(self.selector)").message("from: Selector needs a selector").field_path(".selector"))]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// `All` (default for platform objects: every namespace, and unattributed mail), `Same`
    /// (only this object's namespace) or `Selector` (namespaces whose labels match `selector`).
    #[serde(default)]
    pub from: FromNamespaces,
    /// Namespace label selector, for `from: Selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// See [`AllowedNamespaces::from`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub enum FromNamespaces {
    #[default]
    All,
    Same,
    Selector,
}

/// Whether a quota counts one sender's mail or a whole namespace's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub enum QuotaScope {
    /// The sender picked by `sender` (default).
    #[default]
    Sender,
    /// Every sender of a namespace together, each governed namespace with its own budget
    /// (`sender` is not set). Counts beside the sender's own quota: both must allow.
    Namespace,
}

impl QuotaScope {
    pub fn is_sender(&self) -> bool {
        *self == Self::Sender
    }
}
