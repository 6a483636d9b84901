//! The CLI's Kubernetes side: loads the kubeconfig (`KUBECONFIG` or `--kubeconfig`, `--context`;
//! tokens, client certificates and exec plugins as the kube crate handles them, in-cluster
//! when there is no kubeconfig), finds the relays' admin Service for the service proxy, and
//! reads and annotates SmtpRoutes for `route test`. It must not call the relays (that is
//! [`crate::client`]) nor print anything; it never puts a token in an error.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mailroute_api::SmtpRoute;
use mailroute_api::status::TEST_REQUESTED_ANNOTATION;
use secrecy::ExposeSecret as _;

use crate::client::ServiceRef;

/// The label the chart puts on the relays' admin Service.
pub const ADMIN_SERVICE_LABEL: &str = "mailroute.io/port=admin";
/// The admin Service's port name in the chart.
pub const ADMIN_PORT_NAME: &str = "admin";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Api(String),
}

/// Where the kubeconfig is and which context to use.
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
}

/// A client of the API server the kubeconfig names.
pub struct Cluster {
    pub client: kube::Client,
    /// The context's namespace (`default` when it names none).
    pub namespace: String,
    /// The kubeconfig user's own bearer token, when it has a static one (`token`, `tokenFile`).
    pub token: Option<String>,
}

impl Cluster {
    /// Loads the kubeconfig; every call is bounded by `timeout`.
    pub async fn connect(opts: &KubeOptions, timeout: Duration) -> Result<Self, ClusterError> {
        let hint = "give --admin-url, or a kubeconfig (KUBECONFIG, --kubeconfig)";
        let mut config = if opts.kubeconfig.is_none() && opts.context.is_none() {
            kube::Config::infer()
                .await
                .map_err(|e| ClusterError::Config(format!("no Kubernetes configuration ({e}): {hint}")))?
        } else {
            let kubeconfig = match &opts.kubeconfig {
                Some(p) => Kubeconfig::read_from(p),
                None => Kubeconfig::read(),
            }
            .map_err(|e| ClusterError::Config(format!("reading the kubeconfig: {e}: {hint}")))?;
            let options = KubeConfigOptions {
                context: opts.context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| ClusterError::Config(format!("kubeconfig: {e}")))?
        };
        let token = static_token(&config.auth_info)?;
        // The API server's own 503 (no endpoints) is an answer to show, not to retry.
        config.default_retry = false;
        config.connect_timeout = Some(timeout);
        config.read_timeout = Some(timeout);
        let namespace = config.default_namespace.clone();
        let client = kube::Client::try_from(config).map_err(|e| ClusterError::Config(format!("kubeconfig: {e}")))?;
        Ok(Cluster {
            client,
            namespace,
            token,
        })
    }

    /// The relays' admin Service in `namespace`: `service` (`NAME` or `NAME:PORT`, used as
    /// given, so the caller needs no right beyond the proxy), else the one Service labelled
    /// [`ADMIN_SERVICE_LABEL`] (listing Services needs `list services`).
    pub async fn admin_service(&self, namespace: &str, service: Option<&str>) -> Result<ServiceRef, ClusterError> {
        check_namespace(namespace)?;
        if let Some(s) = service {
            return named_service(namespace, s);
        }
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let list = api
            .list(&ListParams::default().labels(ADMIN_SERVICE_LABEL))
            .await
            .map_err(|e| {
                ClusterError::Api(format!(
                    "finding the relays' admin Service in namespace {namespace}: {} (name it with --relay-service)",
                    kube_message(&e)
                ))
            })?;
        choose_admin_service(namespace, &list.items)
    }

    /// The SmtpRoute `namespace/name`.
    pub async fn route(&self, namespace: &str, name: &str) -> Result<SmtpRoute, ClusterError> {
        let api: Api<SmtpRoute> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(ClusterError::NotFound(format!(
                "SmtpRoute {namespace}/{name} not found"
            ))),
            Err(e) => Err(ClusterError::Api(format!(
                "reading SmtpRoute {namespace}/{name}: {}",
                kube_message(&e)
            ))),
        }
    }

    /// Sets the route's [`TEST_REQUESTED_ANNOTATION`] to `request` (a merge patch: needs
    /// `patch` on `smtproutes.mailroute.io`, as the `edit` role grants).
    pub async fn request_test(&self, namespace: &str, name: &str, request: &str) -> Result<SmtpRoute, ClusterError> {
        let api: Api<SmtpRoute> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {TEST_REQUESTED_ANNOTATION: request}}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| match &e {
                kube::Error::Api(s) if s.code == 404 => {
                    ClusterError::NotFound(format!("SmtpRoute {namespace}/{name} not found"))
                }
                kube::Error::Api(s) if s.code == 403 => ClusterError::Api(format!(
                    "{} (`route test` annotates the route: it needs patch on smtproutes.mailroute.io, as the edit role grants)",
                    s.message
                )),
                _ => ClusterError::Api(format!(
                    "annotating SmtpRoute {namespace}/{name}: {}",
                    kube_message(&e)
                )),
            })
    }
}

/// The API server's own words for a failed call.
fn kube_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

/// The kubeconfig user's static bearer token: `token`, else the contents of `tokenFile`.
fn static_token(auth: &kube::config::AuthInfo) -> Result<Option<String>, ClusterError> {
    if let Some(t) = &auth.token {
        return Ok(Some(t.expose_secret().trim().to_string()).filter(|t| !t.is_empty()));
    }
    match &auth.token_file {
        Some(f) => std::fs::read_to_string(f)
            .map(|t| Some(t.trim().to_string()).filter(|t| !t.is_empty()))
            .map_err(|e| ClusterError::Config(format!("reading the kubeconfig's tokenFile {f}: {e}"))),
        None => Ok(None),
    }
}

/// A DNS label (namespace, Service and port names): nothing else may reach an API path.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Namespaces go into API paths: only names that can be one.
pub fn check_namespace(namespace: &str) -> Result<(), ClusterError> {
    if is_label(namespace) {
        Ok(())
    } else {
        Err(ClusterError::Config(format!("{namespace:?} is not a namespace name")))
    }
}

/// `--relay-service NAME[:PORT]` as a [`ServiceRef`] (port `admin` when not given).
pub fn named_service(namespace: &str, service: &str) -> Result<ServiceRef, ClusterError> {
    check_namespace(namespace)?;
    let (name, port) = service.split_once(':').unwrap_or((service, ADMIN_PORT_NAME));
    if !is_label(name) || !is_label(port) {
        return Err(ClusterError::Config(format!(
            "--relay-service {service:?}: expected NAME or NAME:PORT (a Service name, a port name or number)"
        )));
    }
    Ok(ServiceRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
        port: port.to_string(),
    })
}

/// The one admin Service among `services` and its port: the one named `admin`, else the only one.
pub fn choose_admin_service(namespace: &str, services: &[Service]) -> Result<ServiceRef, ClusterError> {
    let svc = match services {
        [] => {
            return Err(ClusterError::NotFound(format!(
                "no relay admin Service in namespace {namespace} (one labelled {ADMIN_SERVICE_LABEL}, as the chart makes): \
                 name the relays' namespace with --relay-namespace, or the Service with --relay-service, or give --admin-url"
            )));
        }
        [one] => one,
        many => {
            let names: Vec<&str> = many.iter().filter_map(|s| s.metadata.name.as_deref()).collect();
            return Err(ClusterError::Config(format!(
                "several relay admin Services in namespace {namespace} ({}): choose one with --relay-service",
                names.join(", ")
            )));
        }
    };
    let name = svc.metadata.name.clone().unwrap_or_default();
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .cloned()
        .unwrap_or_default();
    let port = match ports.iter().find(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME)) {
        Some(_) => ADMIN_PORT_NAME.to_string(),
        None if ports.len() == 1 => ports[0].port.to_string(),
        None => {
            return Err(ClusterError::Config(format!(
                "Service {namespace}/{name} has no port named {ADMIN_PORT_NAME}: give --relay-service {name}:PORT"
            )));
        }
    };
    Ok(ServiceRef {
        namespace: namespace.to_string(),
        name,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ports: &[(Option<&str>, i32)]) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"ports": ports.iter().map(|(n, p)| serde_json::json!({"name": n, "port": p})).collect::<Vec<_>>()},
        }))
        .unwrap()
    }

    #[test]
    fn the_admin_service_is_the_one_labelled_with_its_admin_port() {
        let chart = service("mail-mailroute-relay-admin", &[(Some("admin"), 8080)]);
        let got = choose_admin_service("mailroute", std::slice::from_ref(&chart)).unwrap();
        assert_eq!(
            got.proxy_path(),
            "/api/v1/namespaces/mailroute/services/http:mail-mailroute-relay-admin:admin/proxy"
        );
        let unnamed = service("relay-admin", &[(None, 9090)]);
        assert_eq!(choose_admin_service("ns", &[unnamed]).unwrap().port, "9090");
        let two_ports = service("relay-admin", &[(Some("http"), 80), (Some("metrics"), 9090)]);
        let e = choose_admin_service("ns", &[two_ports]).unwrap_err().to_string();
        assert!(e.contains("--relay-service relay-admin:PORT"), "{e}");
        let none = choose_admin_service("ns", &[]).unwrap_err();
        assert!(matches!(none, ClusterError::NotFound(_)));
        assert!(none.to_string().contains("--relay-namespace"), "{none}");
        let e = choose_admin_service("ns", &[chart.clone(), service("other", &[(Some("admin"), 1)])]).unwrap_err();
        assert!(e.to_string().contains("mail-mailroute-relay-admin, other"), "{e}");
    }

    #[test]
    fn a_named_service_takes_an_optional_port() {
        let s = named_service("mail", "relay-admin").unwrap();
        assert_eq!((s.name.as_str(), s.port.as_str()), ("relay-admin", "admin"));
        let s = named_service("mail", "relay-admin:8080").unwrap();
        assert_eq!(s.port, "8080");
        for bad in ["", "Relay", "a/b", "x:", "a:b:c", "../x"] {
            assert!(named_service("mail", bad).is_err(), "{bad}");
        }
        assert!(
            named_service("..", "relay-admin").is_err(),
            "a namespace is a name, not a path"
        );
    }
}
