//! Reading Secret values for `compile`: the store the operator fills from the API (or the relay
//! from YAML), one value as trimmed UTF-8 text with a diagnostic when it is missing or unusable,
//! and merging a route's secrets into the output. Values never go into a diagnostic message.

use std::collections::BTreeMap;

use super::{Diags, Reason};
use crate::config::RelaySecrets;

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

pub(super) fn secret_value(
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

/// Adds one route's secrets to the output.
pub(super) fn merge(into: &mut RelaySecrets, from: RelaySecrets) {
    into.upstream_credentials.extend(from.upstream_credentials);
    into.upstream_ca.extend(from.upstream_ca);
    into.dkim_keys.extend(from.dkim_keys);
    into.upstream_oauth2.extend(from.upstream_oauth2);
}
