//! Upgrading the chart on a real kube-apiserver with the real helm CLI (see tests/README.md):
//! release 0.1.0 (`tests/fixtures/mailroute-0.1.0.tgz`, its CRDs in `crds/`) upgraded to the
//! working tree's chart (CRDs as templates): every object accepted, no immutable-field error, the
//! routes and the operator's config survive and the operator keeps serving route changes; an
//! upgrade to a chart whose CRD gained a field brings that field to the cluster; `helm uninstall`
//! with `crds.keep` (the default) leaves the CRDs and every route; with `crds.keep=false` it
//! deletes the CRDs.
//!
//! A test binary of its own: its release owns the cluster-wide CRDs, which the other suites apply
//! themselves. Needs no controller manager, so it also runs against the oldest Kubernetes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use mailroute_tests::k8s::{ControlPlane, eventually, free_port, route_resource, run, workspace_root};
use mailroute_tests::operator::{forbidden, start_operator};

const WAIT: Duration = Duration::from_secs(60);
const RELEASE: &str = "rel";
const CRDS: [&str; 2] = ["smtproutes.mailroute.io", "senderquotas.mailroute.io"];
/// Names the images (no kubelet pulls them here; a source-tree chart may refuse its defaults).
const IMAGES: [&str; 2] = ["--set", "image.tag=k8s-suite"];

/// A smarthost route for `domain` (nothing listens on `port`: only the compiled config matters).
fn route(ns: &str, domain: &str, port: u16) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailroute.io/v1alpha1",
        "kind": "SmtpRoute",
        "metadata": {"name": "upstream", "namespace": ns},
        "spec": {
            "host": "127.0.0.1",
            "port": port,
            "tls": {"mode": "none"},
            "match": {"recipientDomains": [domain]},
            "priority": 10,
        },
    }))
    .unwrap()
}

/// The objects of release `RELEASE`'s current manifest that do not exist, as `kind/name`.
fn missing_objects(cp: &ControlPlane, ns: &str) -> Vec<String> {
    let manifest = run(cp.helm().args(["get", "manifest", RELEASE, "-n", ns])).unwrap();
    cp.manifest_objects(ns, &manifest).unwrap().missing
}

/// A copy of the working tree's chart whose SmtpRoute CRD has one more field, `spec.upgradeProbe`
/// (what a release that adds a field ships).
fn chart_with_new_field(dir: &Path) -> PathBuf {
    let copy = dir.join("chart-with-new-field/mailroute");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    run(std::process::Command::new("cp")
        .arg("-r")
        .arg(workspace_root().join("charts/mailroute"))
        .arg(&copy))
    .unwrap();
    // Wherever the chart keeps the CRD (0.1.0 had crds/, which helm never upgrades).
    let file = ["files/crds/smtproutes.yaml", "crds/smtproutes.yaml"]
        .iter()
        .map(|f| copy.join(f))
        .find(|p| p.exists())
        .expect("the chart ships the SmtpRoute CRD");
    let mut crd: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    for version in crd["spec"]["versions"].as_array_mut().unwrap() {
        version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["upgradeProbe"] =
            serde_json::json!({"type": "string", "description": "Added by the upgrade test."});
    }
    std::fs::write(&file, serde_yaml::to_string(&crd).unwrap()).unwrap();
    copy
}

fn crd_has_probe(crd: &CustomResourceDefinition) -> bool {
    crd.spec.versions.iter().all(|v| {
        v.schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| s.properties.as_ref())
            .and_then(|p| p.get("spec"))
            .and_then(|s| s.properties.as_ref())
            .is_some_and(|p| p.contains_key("upgradeProbe"))
    })
}

/// Waits until the operator's ConfigMap carries `domain`.
async fn config_serves(configmaps: &Api<ConfigMap>, operator: &mut mailroute_tests::k8s::Process, domain: &str) {
    let found = eventually(&format!("mailroute-config with {domain}"), WAIT, || {
        let running = operator.check_running();
        async move {
            running?;
            let cm = configmaps.get_opt("mailroute-config").await?;
            Ok(cm.filter(|cm| serde_json::to_string(&cm.data).unwrap_or_default().contains(domain)))
        }
    })
    .await;
    if let Err(e) = found {
        panic!("{e:#}\noperator log:\n{}", operator.log_tail(60));
    }
}

/// The release's operator Deployment name and its ServiceAccount.
async fn operator_identity(admin: &kube::Client, ns: &str) -> (String, String) {
    let name = format!("{RELEASE}-mailroute-operator");
    let deployment = Api::<Deployment>::namespaced(admin.clone(), ns)
        .get(&name)
        .await
        .unwrap();
    let sa = deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.service_account_name)
        .expect("the operator Deployment names its ServiceAccount");
    (name, sa)
}

#[tokio::test]
async fn upgrade_from_0_1_0_brings_crd_changes_and_uninstall_keeps_crds_and_routes() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = cp.namespace("upgrade").await.unwrap();
    let fixture = workspace_root().join("tests/fixtures/mailroute-0.1.0.tgz");
    let chart = workspace_root().join("charts/mailroute");
    let crds = Api::<CustomResourceDefinition>::all(admin.clone());
    let routes = Api::<DynamicObject>::namespaced_with(admin.clone(), &ns, &route_resource());
    let configmaps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    let apply = PatchParams::apply("mailroute-tests").force();
    let port = free_port().unwrap();

    // Release 0.1.0, a route, and its operator (as the release's ServiceAccount) serving it.
    run(cp.helm().args(["install", RELEASE]).arg(&fixture).args(["-n", &ns])).unwrap();
    routes
        .patch("upstream", &apply, &Patch::Apply(&route(&ns, "before.example", port)))
        .await
        .unwrap();
    let (name, sa) = operator_identity(&admin, &ns).await;
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();
    // Standing in for 0.1.0's operator, this tree's reads no namespaces (0.1.0's RBAC has no
    // namespaces rule): single tenant, as every operator before tenancy was.
    let mut operator = start_operator(cp, &kubeconfig, &ns, &name, &["--platform-namespaces=*"]).unwrap();
    config_serves(&configmaps, &mut operator, "before.example").await;
    // In a cluster the upgrade rolls the operator's pods; here the process stops first.
    operator.kill();
    let mut refused = forbidden(&operator.log_text());

    // To the working tree's chart. 0.1.0 created the CRDs from crds/, outside the release:
    // helm takes them over once (chart README, "Upgrading from 0.1.0").
    run(cp
        .helm()
        .args(["upgrade", RELEASE])
        .arg(&chart)
        .args(["-n", &ns, "--take-ownership"])
        .args(IMAGES))
    .unwrap_or_else(|e| panic!("helm upgrade 0.1.0 -> working tree: {e:#}"));
    let missing = missing_objects(cp, &ns);
    assert!(missing.is_empty(), "after the upgrade, missing {missing:?}");
    for name in CRDS {
        let crd = crds.get(name).await.unwrap();
        let annotations = crd.metadata.annotations.unwrap_or_default();
        assert_eq!(
            annotations.get("meta.helm.sh/release-name").map(String::as_str),
            Some(RELEASE),
            "{name} not owned by the release after the upgrade: {annotations:?}"
        );
        assert_eq!(
            annotations.get("helm.sh/resource-policy").map(String::as_str),
            Some("keep"),
            "{name}: {annotations:?}"
        );
    }
    // The route and the config survived, and the operator (new pods, the upgraded RBAC and a new
    // token) serves the next change.
    assert!(routes.get_opt("upstream").await.unwrap().is_some(), "the route is gone");
    let (name, sa) = operator_identity(&admin, &ns).await;
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();
    let mut operator = start_operator(cp, &kubeconfig, &ns, &name, &[]).unwrap();
    config_serves(&configmaps, &mut operator, "before.example").await;
    routes
        .patch("upstream", &apply, &Patch::Apply(&route(&ns, "after.example", port)))
        .await
        .unwrap();
    config_serves(&configmaps, &mut operator, "after.example").await;
    operator.kill();
    refused.extend(forbidden(&operator.log_text()));
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));

    // A release whose CRD gained a field: `helm upgrade` brings it to the cluster.
    assert!(
        !crd_has_probe(&crds.get(CRDS[0]).await.unwrap()),
        "the field is there already"
    );
    let next = chart_with_new_field(&cp.dir);
    run(cp
        .helm()
        .args(["upgrade", RELEASE])
        .arg(&next)
        .args(["-n", &ns])
        .args(IMAGES))
    .unwrap_or_else(|e| panic!("helm upgrade to a chart with a new CRD field: {e:#}"));
    assert!(
        crd_has_probe(&crds.get(CRDS[0]).await.unwrap()),
        "helm upgrade did not bring the CRD's new field to the cluster"
    );
    // ... and the API server keeps the field (an unknown one would be pruned).
    let mut probed = route(&ns, "after.example", port);
    probed.data["spec"]["upgradeProbe"] = "kept".into();
    eventually("a route with the new field", WAIT, || {
        let routes = routes.clone();
        let apply = apply.clone();
        let probed = probed.clone();
        async move {
            routes.patch("upstream", &apply, &Patch::Apply(&probed)).await?;
            let stored = routes.get("upstream").await?;
            Ok((stored.data["spec"]["upgradeProbe"] == "kept").then_some(()))
        }
    })
    .await
    .unwrap();

    // Uninstall with crds.keep (the default): the CRDs and the routes stay.
    run(cp
        .helm()
        .args(["uninstall", RELEASE, "-n", &ns, "--wait", "--timeout", "120s"]))
    .unwrap();
    for name in CRDS {
        assert!(
            crds.get_opt(name).await.unwrap().is_some(),
            "helm uninstall deleted {name}"
        );
    }
    assert!(
        routes.get_opt("upstream").await.unwrap().is_some(),
        "helm uninstall deleted the route"
    );

    // Installed again under the same name, the release adopts its kept CRDs; with
    // crds.keep=false its uninstall deletes them (and with them every route).
    run(cp
        .helm()
        .args(["install", RELEASE])
        .arg(&chart)
        .args(["-n", &ns, "--set", "crds.keep=false"])
        .args(IMAGES))
    .unwrap_or_else(|e| panic!("helm install over the kept CRDs: {e:#}"));
    run(cp
        .helm()
        .args(["uninstall", RELEASE, "-n", &ns, "--wait", "--timeout", "120s"]))
    .unwrap();
    for name in CRDS {
        eventually(&format!("{name} deleted"), WAIT, || {
            let crds = crds.clone();
            async move { Ok(crds.get_opt(name).await?.is_none().then_some(())) }
        })
        .await
        .unwrap();
    }
}
