//! Shared fixtures of the operator's integration tests: objects from YAML (Secrets with
//! `stringData` turned into `data`, as the API server does), an in-memory kube client holding
//! them, and small readers for the results.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Api, Client, ResourceExt};
use kube_fake_client::{ClientBuilder, interceptor};
use mailroute_api::status::Condition;
use mailroute_api::{Manifests, SenderQuota, SmtpRoute};
use mailroute_operator::conntest;
use mailroute_operator::metrics::Metrics;
use mailroute_operator::plan::Fleet;
use mailroute_operator::reconcile::{ReconcileError, Reconciler, Settings};
use mailroute_operator::usage::UsageClient;

pub const OPERATOR_NS: &str = "mailroute-system";

/// Objects of a YAML stream, ready for the fake client.
pub struct Objects {
    pub routes: Vec<SmtpRoute>,
    pub quotas: Vec<SenderQuota>,
    pub secrets: Vec<Secret>,
}

pub fn secret(namespace: &str, name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

pub fn objects(yaml: &str) -> Objects {
    let m = Manifests::from_yaml(yaml, "default").unwrap();
    let secrets = m
        .secrets
        .names()
        .map(|(ns, name)| {
            let data = m.secrets.get(ns, name).unwrap();
            Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                },
                data: Some(data.iter().map(|(k, v)| (k.clone(), ByteString(v.clone()))).collect()),
                type_: Some("Opaque".into()),
                ..Default::default()
            }
        })
        .collect();
    let mut routes = m.routes;
    let mut quotas = m.quotas;
    // The API server sets generation 1 on create.
    routes.iter_mut().for_each(|r| r.metadata.generation = Some(1));
    quotas.iter_mut().for_each(|q| q.metadata.generation = Some(1));
    Objects {
        routes,
        quotas,
        secrets,
    }
}

/// Every example manifest (not the broken ones), plus the given extra YAML.
pub fn examples_plus(extra: &str) -> Objects {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    examples_from(&names, extra)
}

/// The named example files (e.g. `quota-shop.yaml`), plus the given extra YAML.
pub fn examples_from(files: &[&str], extra: &str) -> Objects {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut text = String::new();
    for f in files.iter().map(|f| dir.join(f)) {
        text.push_str(&std::fs::read_to_string(f).unwrap());
        text.push_str("\n---\n");
    }
    text.push_str(extra);
    objects(&text)
}

/// An SmtpRoute mail/upstream to localhost:`port` (a test SMTP server) with TLS `tls_mode`,
/// trusting Secret upstream-ca and logging in with Secret upstream-creds (see
/// [`add_upstream_secrets`]); `extra` is appended to its spec.
pub fn upstream_route(port: u16, tls_mode: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {{name: upstream, namespace: mail}}
spec:
  host: localhost
  port: {port}
  tls: {{mode: {tls_mode}, caSecretRef: {{name: upstream-ca, key: ca.crt}}}}
  auth: {{secretRef: {{name: upstream-creds}}}}
{extra}"#
    )
}

/// Adds the Secrets [`upstream_route`] refers to: the CA `ca_pem` and the login `user`/`password`.
pub fn add_upstream_secrets(objs: &mut Objects, ca_pem: &str, user: &str, password: &str) {
    objs.secrets.push(secret("mail", "upstream-ca", &[("ca.crt", ca_pem)]));
    let login = [("username", user), ("password", password)];
    objs.secrets.push(secret("mail", "upstream-creds", &login));
}

/// Connection-test settings of these tests: a fixed HELO name and a timeout loopback never reaches.
pub fn conntest_settings() -> conntest::Settings {
    conntest::Settings {
        helo_name: "operator.test".into(),
        timeout: Duration::from_secs(10),
        token_client: None,
    }
}

/// [`conntest_settings`] trusting the test token endpoint's certificate.
pub fn conntest_settings_with_tokens(endpoint: &mailroute_testkit::token_endpoint::Endpoint) -> conntest::Settings {
    conntest::Settings {
        token_client: Some(mailroute_oauth::TokenClient::new(endpoint.pki.root_store())),
        ..conntest_settings()
    }
}

/// Whether `err` is the failure to list `kind` (e.g. `SmtpRoutes`).
pub fn list_failed(err: &ReconcileError, kind: &str) -> bool {
    matches!(err, ReconcileError::List { kind: k, .. } if *k == kind)
}

pub async fn fake_client(objects: Objects, interceptors: Option<interceptor::Funcs>) -> Client {
    let mut b = ClientBuilder::new()
        .with_resource::<SmtpRoute>()
        .with_resource::<SenderQuota>()
        .with_resource::<mailroute_api::DeliveryWebhook>();
    for r in objects.routes {
        b = b.with_object(r);
    }
    for q in objects.quotas {
        b = b.with_object(q);
    }
    for s in objects.secrets {
        b = b.with_object(s);
    }
    if let Some(i) = interceptors {
        b = b.with_interceptor_funcs(i);
    }
    b.build().await.unwrap()
}

pub fn settings(test_interval: Option<Duration>) -> Settings {
    Settings {
        fleet: Fleet::new("mailroute", OPERATOR_NS),
        namespaces: Vec::new(),
        test_interval,
        instance: "operator-0".into(),
        platform_namespaces: None,
        identity: mailroute_operator::fleets::Identity {
            namespace: OPERATOR_NS.into(),
            fleet: "mailroute".into(),
            claim_unlabelled: true,
        },
        rival_window: std::time::Duration::from_secs(120),
    }
}

pub fn reconciler(
    client: Client,
    test_interval: Option<Duration>,
    usage: Option<UsageClient>,
) -> std::sync::Arc<Reconciler> {
    Reconciler::new(client, settings(test_interval), usage, Metrics::new())
}

pub async fn route(client: &Client, ns: &str, name: &str) -> SmtpRoute {
    Api::<SmtpRoute>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
}

pub async fn quota(client: &Client, ns: &str, name: &str) -> SenderQuota {
    Api::<SenderQuota>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
}

pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {conditions:?}"))
}

pub fn route_condition(r: &SmtpRoute, type_: &str) -> Condition {
    let status = r
        .status
        .as_ref()
        .unwrap_or_else(|| panic!("{} has no status", r.name_any()));
    condition(&status.conditions, type_).clone()
}

/// `(status, reason)` of a condition, for compact asserts.
pub fn sr(c: &Condition) -> (&str, &str) {
    (c.status.as_str(), c.reason.as_str())
}

pub fn secret_strings(s: &Secret) -> BTreeMap<String, String> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}
