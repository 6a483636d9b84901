//! Real-cluster suite: with a kubeconfig (`KUBECONFIG` or `~/.kube/config`) it installs the CRDs,
//! applies the examples into a fresh namespace, runs the operator binary against the cluster,
//! waits for the ConfigMap and the Ready conditions, breaks a Secret and sees the route's
//! condition flip (and the route leave the config), restores it, then stops the operator with
//! SIGTERM and checks it exits cleanly and releases its Lease. Without a kubeconfig it prints
//! that it is skipped and passes, unless `MAILROUTE_REQUIRE_CLUSTER=1`, which makes it fail.
//! `.github/workflows/cluster.yml` runs it in a kind cluster.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use mailroute_api::{SenderQuota, SmtpRoute};
use serde_json::{Value, json};

const APPS_NS: &str = "mailroute-e2e";
const OPERATOR_NS: &str = "mailroute-e2e-system";
const FLEET: &str = "e2e";
const MANAGER: &str = "mailroute-cluster-test";

fn kubeconfig() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        return std::env::split_paths(&v).find(|p| p.is_file());
    }
    let home = std::env::var_os("HOME")?;
    Some(Path::new(&home).join(".kube/config")).filter(|p| p.is_file())
}

/// Polls `check` every half second until it returns `Some`, failing after `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn apply_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    for crd in [SmtpRoute::crd(), SenderQuota::crd()] {
        let name = crd.name_any();
        crds.patch(&name, &params, &Patch::Apply(&crd)).await.unwrap();
        eventually(&format!("CRD {name} established"), Duration::from_secs(60), || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                let c = crds.get(&name).await.ok()?;
                let established = c
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        })
        .await;
    }
}

async fn apply_namespace(client: &Client, name: &str) {
    let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body))
        .await
        .unwrap();
}

/// Applies every example (Secrets, routes, quotas) into `APPS_NS`.
async fn apply_examples(client: &Client) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let params = PatchParams::apply(MANAGER).force();
    let mut n = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            v["metadata"]["namespace"] = json!(APPS_NS);
            let name = v["metadata"]["name"].as_str().unwrap().to_string();
            match v["kind"].as_str().unwrap() {
                "Secret" => {
                    Api::<Secret>::namespaced(client.clone(), APPS_NS)
                        .patch(&name, &params, &Patch::Apply(&v))
                        .await
                        .unwrap();
                }
                "SmtpRoute" => {
                    Api::<SmtpRoute>::namespaced(client.clone(), APPS_NS)
                        .patch(&name, &params, &Patch::Apply(&v))
                        .await
                        .unwrap();
                }
                "SenderQuota" => {
                    Api::<SenderQuota>::namespaced(client.clone(), APPS_NS)
                        .patch(&name, &params, &Patch::Apply(&v))
                        .await
                        .unwrap();
                }
                other => panic!("unexpected kind {other} in {}", f.display()),
            }
            n += 1;
        }
    }
    n
}

fn condition(r: &SmtpRoute, type_: &str) -> Option<(String, String, String)> {
    let c = r.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.to_string(), c.reason.clone(), c.message.clone()))
}

async fn route_condition_is(client: &Client, name: &str, status: &str, reason: &str) -> (String, String, String) {
    let routes: Api<SmtpRoute> = Api::namespaced(client.clone(), APPS_NS);
    eventually(
        &format!("SmtpRoute {name} Ready={status} ({reason})"),
        Duration::from_secs(120),
        || {
            let routes = routes.clone();
            let name = name.to_string();
            let (status, reason) = (status.to_string(), reason.to_string());
            async move {
                let r = routes.get(&name).await.ok()?;
                let c = condition(&r, "Ready")?;
                (c.0 == status && c.1 == reason).then_some(c)
            }
        },
    )
    .await
}

async fn config_json(client: &Client) -> Option<String> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), OPERATOR_NS)
        .get_opt(&format!("{FLEET}-config"))
        .await
        .ok()??;
    cm.metadata.annotations.as_ref()?.get("mailroute.io/config-hash")?;
    cm.data?.get("relay.json").cloned()
}

async fn print_routes(client: &Client) {
    let routes = Api::<SmtpRoute>::namespaced(client.clone(), APPS_NS)
        .list(&Default::default())
        .await
        .unwrap();
    println!(
        "{:<12} {:<8} {:<10} {:<16} message",
        "NAME", "READY", "VERIFIED", "REASON"
    );
    for r in routes {
        let ready = condition(&r, "Ready").unwrap_or_default();
        let verified = condition(&r, "Verified").unwrap_or_default();
        println!(
            "{:<12} {:<8} {:<10} {:<16} {}",
            r.name_any(),
            ready.0,
            verified.0,
            ready.1,
            ready.2
        );
    }
}

#[tokio::test]
async fn operator_against_a_real_cluster() {
    let required = std::env::var("MAILROUTE_REQUIRE_CLUSTER").is_ok_and(|v| v == "1");
    let Some(config) = kubeconfig() else {
        assert!(
            !required,
            "MAILROUTE_REQUIRE_CLUSTER=1 but there is no kubeconfig (KUBECONFIG or ~/.kube/config)"
        );
        println!("skipped: no kubeconfig (set KUBECONFIG or create ~/.kube/config to run the real-cluster suite)");
        return;
    };
    println!("running against the cluster in {}", config.display());
    let client = Client::try_default()
        .await
        .expect("a kubeconfig is present but no client could be built from it");
    client
        .apiserver_version()
        .await
        .expect("the cluster in the kubeconfig does not answer");

    apply_crds(&client).await;
    apply_namespace(&client, APPS_NS).await;
    apply_namespace(&client, OPERATOR_NS).await;
    let applied = apply_examples(&client).await;
    println!("applied {applied} example objects into {APPS_NS}");

    let mut operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailroute-operator"))
        .args([
            "run",
            "--namespace",
            OPERATOR_NS,
            "--fleet",
            FLEET,
            "--watch-namespaces",
            APPS_NS,
            "--lease-name",
            "mailroute-e2e",
            "--health-listen",
            "127.0.0.1:0",
            "--debounce",
            "200ms",
            "--resync-interval",
            "15s",
            // The examples point at real providers with placeholder passwords.
            "--connection-tests=false",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the operator binary");

    let json = eventually("the relay ConfigMap", Duration::from_secs(120), || config_json(&client)).await;
    for id in ["gmail", "office365", "carriers", "direct-mx"] {
        assert!(json.contains(&format!("{APPS_NS}/{id}")), "{id} missing in relay.json");
    }
    for name in ["gmail", "office365", "carriers", "direct-mx"] {
        route_condition_is(&client, name, "True", "InConfig").await;
    }
    let quotas: Api<SenderQuota> = Api::namespaced(client.clone(), APPS_NS);
    for name in ["shop-42", "billing-app"] {
        let q = eventually(&format!("SenderQuota {name} Ready"), Duration::from_secs(60), || {
            let quotas = quotas.clone();
            async move {
                let q = quotas.get(name).await.ok()?;
                let ready = q
                    .status
                    .as_ref()?
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.is_true());
                ready.then_some(q)
            }
        })
        .await;
        assert!(q.status.unwrap().limits.is_some());
    }
    print_routes(&client).await;

    // Break the gmail credentials: the password key disappears.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), APPS_NS);
    secrets
        .patch(
            "gmail-credentials",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"password": null}})),
        )
        .await
        .unwrap();
    // The route keeps its last good version, and says so.
    let (_, _, message) = route_condition_is(&client, "gmail", "True", "SecretUnavailableUsingLastGood").await;
    assert!(message.contains("has no key `password`"), "{message}");
    let accepted = condition(
        &Api::<SmtpRoute>::namespaced(client.clone(), APPS_NS)
            .get("gmail")
            .await
            .unwrap(),
        "Accepted",
    )
    .unwrap();
    assert_eq!((accepted.0.as_str(), accepted.1.as_str()), ("False", "SecretNotFound"));
    let gmail_id = format!("{APPS_NS}/gmail");
    let json = config_json(&client).await.unwrap_or_default();
    assert!(json.contains(&gmail_id), "gmail left relay.json: {json}");
    print_routes(&client).await;

    // Restored: Ready again.
    use base64::Engine;
    let password = base64::engine::general_purpose::STANDARD.encode("abcd efgh ijkl mnop");
    secrets
        .patch(
            "gmail-credentials",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"password": password}})),
        )
        .await
        .unwrap();
    route_condition_is(&client, "gmail", "True", "InConfig").await;

    // SIGTERM: a clean exit that releases the Lease.
    let pid = operator.id().expect("the operator is running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(60), operator.wait())
        .await
        .expect("the operator did not stop within 60s of SIGTERM")
        .unwrap();
    assert!(status.success(), "the operator exited with {status}");
    let lease = Api::<Lease>::namespaced(client.clone(), OPERATOR_NS)
        .get("mailroute-e2e")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None, "the Lease was not released");

    for ns in [APPS_NS, OPERATOR_NS] {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(ns, &DeleteParams::default())
            .await;
    }
}
