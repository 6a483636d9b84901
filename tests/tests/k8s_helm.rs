//! The Helm chart with the real helm CLI against a real kube-apiserver (see tests/README.md):
//! `helm install` for the default values and each `charts/mailroute/ci/*.yaml` (every rendered
//! object accepted and present), `helm upgrade`, and `helm uninstall` leaving none of them behind.
//! There is no kubelet: Pods never run, so this proves the objects, not the workloads.

use std::path::{Path, PathBuf};

use mailroute_tests::k8s::{ControlPlane, apply_crds, run, workspace_root};

/// CRDs of other projects that the chart can render objects of (KEDA, Prometheus Operator,
/// cert-manager), reduced to "any object of this kind": enough for the API server to store them.
fn foreign_crds() -> String {
    let kinds = [
        ("keda.sh", "v1alpha1", "ScaledObject", "scaledobjects"),
        ("keda.sh", "v1alpha1", "TriggerAuthentication", "triggerauthentications"),
        ("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors"),
        ("monitoring.coreos.com", "v1", "PrometheusRule", "prometheusrules"),
        ("cert-manager.io", "v1", "Certificate", "certificates"),
    ];
    let mut out = String::new();
    for (group, version, kind, plural) in kinds {
        let crd = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.{group}")},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural},
                "versions": [{
                    "name": version, "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                }],
            },
        });
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("JSON serialises as YAML"));
    }
    out
}

fn chart() -> String {
    workspace_root().join("charts/mailroute").display().to_string()
}

/// Names the images (no kubelet pulls them here): the source tree's chart refuses its
/// unpublished default images (see `helm_install_refuses_the_unpublished_default_images`).
const IMAGES: [&str; 2] = ["--set", "image.tag=k8s-suite"];

/// The objects of a helm manifest that exist, as `kind/name` (kind in lower case); objects that
/// name no namespace are in `ns`.
fn existing(cp: &ControlPlane, ns: &str, manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    cp.manifest_objects(ns, &text)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .present
}

#[tokio::test]
async fn helm_installs_upgrades_and_uninstalls_the_chart_for_each_values_file() {
    let cp = ControlPlane::shared();
    apply_crds(&cp.admin_client().await.unwrap()).await.unwrap();
    let foreign = cp.dir.join("foreign-crds.yaml");
    std::fs::write(&foreign, foreign_crds()).unwrap();
    run(cp.kubectl().args(["apply", "--server-side", "-f"]).arg(&foreign)).unwrap();
    run(cp
        .kubectl()
        .args(["wait", "--for=condition=Established", "--timeout=60s", "-f"])
        .arg(&foreign))
    .unwrap();

    // keda-external-redis-tls-values.yaml puts the PrometheusRule into an existing namespace.
    run(cp.kubectl().args(["create", "namespace", "monitoring"])).unwrap();
    // ... and grants the operator access in its watched namespaces, which must exist.
    for ns in ["mail", "shop"] {
        run(cp.kubectl().args(["create", "namespace", ns])).unwrap();
    }

    let mut values: Vec<Option<PathBuf>> = vec![None];
    let mut ci: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("charts/mailroute/ci"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    ci.sort();
    values.extend(ci.into_iter().map(Some));

    for values in values {
        let label = values
            .as_ref()
            .map_or("default values".to_string(), |v| v.display().to_string());
        let ns = cp.namespace("helm").await.unwrap();
        let release = ns.clone();
        let with_values = |cmd: &mut std::process::Command| {
            if let Some(v) = &values {
                cmd.arg("-f").arg(v);
            }
        };

        // The CRDs are cluster-wide and applied above (one release per cluster owns them; the
        // CRD templates are tested in k8s_helm_upgrade.rs): these releases leave them alone.
        let mut install = cp.helm();
        install
            .args(["install", &release, &chart(), "-n", &ns])
            .args(["--set", "crds.enabled=false"])
            .args(IMAGES);
        with_values(&mut install);
        run(&mut install).unwrap_or_else(|e| panic!("helm install with {label}: {e:#}"));

        let manifest_text = run(cp.helm().args(["get", "manifest", &release, "-n", &ns])).unwrap();
        let manifest = cp.dir.join(format!("{release}-manifest.yaml"));
        std::fs::write(&manifest, &manifest_text).unwrap();
        let rendered = manifest_text.lines().filter(|l| l.starts_with("kind:")).count();
        let mut kept = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&manifest_text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" {
                let kind = v["kind"].as_str().unwrap_or_default().to_lowercase();
                kept.push(format!("{kind}/{}", v["metadata"]["name"].as_str().unwrap_or_default()));
            }
        }
        let present = existing(cp, &ns, &manifest);
        assert!(rendered > 0, "{label}: helm rendered nothing");
        assert_eq!(
            present.len(),
            rendered,
            "{label}: not every object of the release exists: {present:?}"
        );
        // The relays' drain needs the preStop `sleep` action (beta and on by default since 1.30;
        // the chart's kubeVersion rests on it). An API server without it drops the field
        // silently, so compare what the server stored with what helm rendered.
        let mut sleeps = 0;
        for doc in serde_yaml::Deserializer::from_str(&manifest_text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"] != "Deployment" {
                continue;
            }
            let name = v["metadata"]["name"].as_str().unwrap_or_default();
            let stored: serde_json::Value = serde_json::from_str(
                &run(cp.kubectl().args(["get", "deployment", name, "-n", &ns, "-o", "json"])).unwrap(),
            )
            .unwrap();
            let pre_stop_sleeps = |d: &serde_json::Value| -> Vec<serde_json::Value> {
                d["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| c["lifecycle"]["preStop"]["sleep"].clone())
                    .collect()
            };
            let want = pre_stop_sleeps(&v);
            sleeps += want.iter().filter(|s| !s.is_null()).count();
            assert_eq!(
                pre_stop_sleeps(&stored),
                want,
                "{label}: the API server ({}) did not keep the preStop sleep of {name}",
                cp.version
            );
        }
        assert!(sleeps > 0, "{label}: no Deployment with a preStop sleep rendered");

        // An upgrade with a changed value is accepted as well.
        let mut upgrade = cp.helm();
        upgrade
            .args(["upgrade", &release, &chart(), "-n", &ns])
            .args(["--set", "crds.enabled=false"])
            .args(IMAGES);
        with_values(&mut upgrade);
        upgrade.args(["--set", "relay.shutdown.preStopSleepSeconds=5"]);
        run(&mut upgrade).unwrap_or_else(|e| panic!("helm upgrade with {label}: {e:#}"));
        let history = run(cp.helm().args(["history", &release, "-n", &ns, "-o", "json"])).unwrap();
        assert!(
            history.contains("\"revision\":2"),
            "{label}: no second revision: {history}"
        );

        run(cp
            .helm()
            .args(["uninstall", &release, "-n", &ns, "--wait", "--timeout", "120s"]))
        .unwrap_or_else(|e| panic!("helm uninstall with {label}: {e:#}"));
        // Only what the chart marks `helm.sh/resource-policy: keep` (generated passwords that
        // must survive a reinstall) stays.
        let left: Vec<String> = existing(cp, &ns, &manifest)
            .into_iter()
            .filter(|o| !kept.contains(&o.to_lowercase()))
            .collect();
        assert!(left.is_empty(), "{label}: helm uninstall left {left:?}");
    }
}

#[test]
fn helm_refuses_a_prestop_sleep_of_zero() {
    // API servers before 1.33 refuse a preStop sleep of 0 seconds; the chart's schema says so
    // before anything reaches a cluster.
    let cp = ControlPlane::shared();
    let out = cp
        .helm()
        .args([
            "template",
            "r",
            &chart(),
            "--set",
            "relay.shutdown.preStopSleepSeconds=0",
        ])
        .args(IMAGES)
        .output()
        .unwrap();
    assert!(!out.status.success(), "helm accepted preStopSleepSeconds=0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("preStopSleepSeconds"), "unexpected refusal: {err}");
}

#[tokio::test]
async fn helm_install_refuses_the_unpublished_default_images() {
    // The source tree's chart is not a release: its appVersion images may not exist, so a default
    // install must fail with how to build and push them, never end in ImagePullBackOff.
    let cp = ControlPlane::shared();
    apply_crds(&cp.admin_client().await.unwrap()).await.unwrap();
    let ns = cp.namespace("unpublished").await.unwrap();
    let out = cp
        .helm()
        .args(["install", "unpublished", &chart(), "-n", &ns])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "helm installed the unpublished default images");
    for needle in ["unpublished images", "docker buildx build", "--set image.tag=<tag>"] {
        assert!(err.contains(needle), "the refusal does not say {needle:?}: {err}");
    }
    // helm 4 lists releases in every status by default.
    let releases = run(cp.helm().args(["list", "-q", "-n", &ns])).unwrap();
    assert!(releases.trim().is_empty(), "a release was recorded: {releases}");
}
