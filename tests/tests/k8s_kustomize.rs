//! The kustomize manifests (`deploy/base`, `deploy/overlays/example`) against a real
//! kube-apiserver (see tests/README.md): `kubectl apply --server-side -k` is accepted object by
//! object, and `kubectl delete -k` leaves nothing of mailroute behind once the garbage collector
//! ran. A test binary of its own: deleting the manifests deletes the CRDs other tests use.
//! There is no kubelet: Pods never run, so this proves the objects, not the workloads.

use std::time::{Duration, Instant};

use mailroute_tests::k8s::{ControlPlane, eventually, run, workspace_root};
use serde::Deserialize as _;

const WAIT: Duration = Duration::from_secs(120);
/// The namespace the manifests put everything in.
const NS: &str = "mailroute";

/// Stand-in CRDs for the Prometheus Operator kinds of `deploy/monitoring`: any object is stored.
fn prometheus_operator_crds() -> String {
    let mut out = String::new();
    for (kind, plural) in [
        ("ServiceMonitor", "servicemonitors"),
        ("PrometheusRule", "prometheusrules"),
    ] {
        let crd = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                }],
            },
        });
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("JSON serialises as YAML"));
    }
    out
}

/// The objects `kubectl kustomize dir` renders, as (namespace, `kind/name`).
fn rendered(cp: &ControlPlane, dir: &str) -> Vec<(Option<String>, String)> {
    let text = run(cp.kubectl().arg("kustomize").arg(workspace_root().join(dir))).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v = serde_json::Value::deserialize(doc).unwrap();
            let kind = v["kind"].as_str().unwrap().to_lowercase();
            let name = v["metadata"]["name"].as_str().unwrap();
            (
                v["metadata"]["namespace"].as_str().map(str::to_string),
                format!("{kind}/{name}"),
            )
        })
        .collect()
}

/// Which of `objects` exist.
fn existing(cp: &ControlPlane, objects: &[(Option<String>, String)]) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for (ns, object) in objects {
        let mut get = cp.kubectl();
        get.args(["get", "--ignore-not-found", "-o", "name", object]);
        if let Some(ns) = ns {
            get.args(["-n", ns]);
        }
        if !run(&mut get)?.trim().is_empty() {
            found.push(object.clone());
        }
    }
    Ok(found)
}

/// Every object in namespace `NS` of any listable kind, except what Kubernetes itself puts in
/// every namespace (the default ServiceAccount, the root CA ConfigMap) and Events.
fn namespace_contents(cp: &ControlPlane) -> anyhow::Result<Vec<String>> {
    let kinds = run(cp
        .kubectl()
        .args(["api-resources", "--verbs=list", "--namespaced", "-o", "name"]))?;
    let kinds: Vec<&str> = kinds
        .lines()
        .filter(|k| !k.is_empty() && *k != "events" && *k != "events.events.k8s.io")
        .collect();
    let out = run(cp.kubectl().args(["get", &kinds.join(","), "-n", NS, "-o", "name"]))?;
    Ok(out
        .lines()
        .filter(|l| !l.is_empty() && *l != "serviceaccount/default" && *l != "configmap/kube-root-ca.crt")
        .map(str::to_string)
        .collect())
}

async fn apply_and_delete(cp: &ControlPlane, dir: &str) {
    let objects = rendered(cp, dir);
    assert!(!objects.is_empty(), "{dir} renders nothing");
    let path = workspace_root().join(dir);
    run(cp.kubectl().args(["apply", "--server-side", "-k"]).arg(&path))
        .unwrap_or_else(|e| panic!("kubectl apply -k {dir}: {e:#}"));
    let found = existing(cp, &objects).unwrap();
    let missing: Vec<_> = objects.iter().filter(|(_, o)| !found.contains(o)).collect();
    assert!(missing.is_empty(), "{dir}: applied but absent: {missing:?}");
    // The emptiness check below sees these objects (it is not blind).
    let contents = namespace_contents(cp).unwrap();
    assert!(contents.iter().any(|o| o.starts_with("deployment")), "{contents:?}");

    run(cp.kubectl().args(["delete", "-k"]).arg(&path)).unwrap_or_else(|e| panic!("kubectl delete -k {dir}: {e:#}"));
    eventually(&format!("nothing of {dir} left"), WAIT, || async {
        let mut left = existing(cp, &objects)?;
        left.extend(namespace_contents(cp)?);
        Ok(left.is_empty().then_some(()))
    })
    .await
    .unwrap_or_else(|e| {
        let left = existing(cp, &objects).unwrap_or_default();
        let contents = namespace_contents(cp).unwrap_or_default();
        panic!("{e:#}\nleft of {dir}: {left:?}\nnamespace {NS}: {contents:?}")
    });
}

#[tokio::test]
async fn kubectl_apply_k_then_delete_leaves_nothing_behind() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    run(cp.kubectl().args(["create", "namespace", NS])).unwrap();
    apply_and_delete(cp, "deploy/base").await;

    // The example overlay adds deploy/monitoring, whose kinds come from the Prometheus Operator.
    let crds = cp.dir.join("prometheus-operator-crds.yaml");
    std::fs::write(&crds, prometheus_operator_crds()).unwrap();
    run(cp.kubectl().args(["apply", "--server-side", "-f"]).arg(&crds)).unwrap();
    run(cp
        .kubectl()
        .args(["wait", "--for=condition=Established", "--timeout=60s", "-f"])
        .arg(&crds))
    .unwrap();
    apply_and_delete(cp, "deploy/overlays/example").await;
    eprintln!("kustomize test took {:?}", started.elapsed());
}
