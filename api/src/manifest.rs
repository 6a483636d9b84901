//! Reading custom resources and Secrets from YAML text (a multi-document stream, as `kubectl
//! apply -f` takes it), for the standalone relay and for tests. Text in, typed objects out.

use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;

use crate::compile::SecretStore;
use crate::quota::SenderQuota;
use crate::route::SmtpRoute;
use crate::webhook::DeliveryWebhook;

/// The objects found in a set of manifests.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub routes: Vec<SmtpRoute>,
    pub quotas: Vec<SenderQuota>,
    pub webhooks: Vec<DeliveryWebhook>,
    pub secrets: SecretStore,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: {source}")]
    Yaml { index: usize, source: serde_yaml::Error },
    #[error("document {index} ({kind} {name}): {message}")]
    Invalid {
        index: usize,
        kind: String,
        name: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretDoc {
    metadata: Meta,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    string_data: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

impl Manifests {
    /// Adds every SmtpRoute, SenderQuota, DeliveryWebhook and v1 Secret of a YAML stream; other kinds are ignored.
    /// Objects without a namespace get `default_namespace`.
    pub fn add_yaml(&mut self, text: &str, default_namespace: &str) -> Result<(), ManifestError> {
        for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc).map_err(|source| ManifestError::Yaml { index, source })?;
            if value.is_null() {
                continue;
            }
            let head: Head =
                serde_yaml::from_value(value.clone()).map_err(|source| ManifestError::Yaml { index, source })?;
            let group = head.api_version.split('/').next().unwrap_or_default();
            match (group, head.kind.as_str()) {
                ("mailroute.io", "SmtpRoute") => {
                    let mut r: SmtpRoute =
                        serde_yaml::from_value(value).map_err(|source| ManifestError::Yaml { index, source })?;
                    r.metadata
                        .namespace
                        .get_or_insert_with(|| default_namespace.to_string());
                    self.routes.push(r);
                }
                ("mailroute.io", "SenderQuota") => {
                    let mut q: SenderQuota =
                        serde_yaml::from_value(value).map_err(|source| ManifestError::Yaml { index, source })?;
                    q.metadata
                        .namespace
                        .get_or_insert_with(|| default_namespace.to_string());
                    self.quotas.push(q);
                }
                ("mailroute.io", "DeliveryWebhook") => {
                    let mut w: DeliveryWebhook =
                        serde_yaml::from_value(value).map_err(|source| ManifestError::Yaml { index, source })?;
                    w.metadata
                        .namespace
                        .get_or_insert_with(|| default_namespace.to_string());
                    self.webhooks.push(w);
                }
                ("v1", "Secret") => {
                    let s: SecretDoc =
                        serde_yaml::from_value(value).map_err(|source| ManifestError::Yaml { index, source })?;
                    let mut data = BTreeMap::new();
                    for (k, v) in s.data {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(v.trim())
                            .map_err(|e| ManifestError::Invalid {
                                index,
                                kind: "Secret".into(),
                                name: s.metadata.name.clone(),
                                message: format!("data.{k} is not base64: {e}"),
                            })?;
                        data.insert(k, bytes);
                    }
                    for (k, v) in s.string_data {
                        data.insert(k, v.into_bytes());
                    }
                    let ns = s.metadata.namespace.as_deref().unwrap_or(default_namespace);
                    self.secrets.insert(ns, &s.metadata.name, data);
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn from_yaml(text: &str, default_namespace: &str) -> Result<Self, ManifestError> {
        let mut m = Self::default();
        m.add_yaml(text, default_namespace)?;
        Ok(m)
    }

    /// Compiles as a single-tenant install (every namespace is a platform namespace).
    pub fn compile(&self) -> crate::compile::Compiled {
        let mut c = crate::compile::compile(&self.routes, &self.quotas, &self.secrets);
        crate::compile::compile_webhooks(&self.webhooks, &self.secrets, &mut c);
        c
    }

    /// Compiles with the cluster's platform namespaces and namespace labels.
    pub fn compile_for(&self, tenancy: &crate::compile::Tenancy) -> crate::compile::Compiled {
        let mut c = crate::compile::compile_for(&self.routes, &self.quotas, &self.secrets, tenancy);
        crate::compile::compile_webhooks(&self.webhooks, &self.secrets, &mut c);
        c
    }
}
