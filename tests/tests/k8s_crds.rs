//! The CRDs and the examples against a real kube-apiserver (see tests/README.md): `crds/` applies
//! with server-side apply and becomes Established, every object in `examples/` is accepted, and
//! every object in `examples/broken/` is either accepted (its fault is semantic: the operator
//! reports it in status) or refused with the field path its `# expect:` line names.

use std::path::Path;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, pinned_kind};
use mailroute_tests::k8s::{ControlPlane, apply_crds, workspace_root};

const MANAGER: &str = "mailroute-tests";

/// The YAML documents of a file, with their `# expect:` lines.
fn documents(path: &Path) -> anyhow::Result<(Vec<serde_json::Value>, Vec<String>)> {
    let text = std::fs::read_to_string(path)?;
    let expects = text
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(str::to_string)
        .collect();
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok((docs, expects))
}

/// Server-side applies `obj` into namespace `ns` (whatever namespace the file names).
async fn apply(client: &kube::Client, ns: &str, mut obj: serde_json::Value) -> anyhow::Result<String> {
    obj["metadata"]["namespace"] = ns.into();
    let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let (resource, _caps): (ApiResource, _) =
        pinned_kind(client, &GroupVersionKind::gvk(group, version, &kind)).await?;
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource);
    let obj: DynamicObject = serde_json::from_value(obj)?;
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&obj))
        .await?;
    Ok(format!("{kind} {name}"))
}

fn yaml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn crds_and_examples_are_accepted_by_the_api_server() {
    let cp = ControlPlane::shared();
    let client = cp.admin_client().await.unwrap();
    apply_crds(&client).await.unwrap();

    let root = workspace_root();
    let mut failures = Vec::new();
    let mut accepted = 0;
    for dir in ["examples", "examples/local", "examples/oauth2"] {
        for file in yaml_files(&root.join(dir)) {
            let ns = cp.namespace("examples").await.unwrap();
            let (docs, _) = documents(&file).unwrap();
            for doc in docs {
                match apply(&client, &ns, doc).await {
                    Ok(_) => accepted += 1,
                    Err(e) => failures.push(format!("{}: {e}", file.display())),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "the API server refused examples:\n{}",
        failures.join("\n")
    );
    assert!(accepted >= 6, "only {accepted} example objects found");
}

#[tokio::test]
async fn broken_examples_are_refused_with_the_named_field_or_accepted() {
    let cp = ControlPlane::shared();
    let client = cp.admin_client().await.unwrap();
    apply_crds(&client).await.unwrap();

    let mut problems = Vec::new();
    let mut refused = 0;
    for file in yaml_files(&workspace_root().join("examples/broken")) {
        let ns = cp.namespace("broken").await.unwrap();
        let (docs, expects) = documents(&file).unwrap();
        assert!(!expects.is_empty(), "{} names no expected fault", file.display());
        for doc in docs {
            let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let Err(e) = apply(&client, &ns, doc).await else {
                continue;
            };
            refused += 1;
            // `# expect: Kind ns/name Reason field.path[1]`: a refusal must name that field (the
            // API server reports list rules at the list, so the index is not required).
            let field = expects
                .iter()
                .filter_map(|l| {
                    let parts: Vec<&str> = l.split_whitespace().collect();
                    (parts.len() == 4 && parts[0] == kind && parts[1].ends_with(&format!("/{name}"))).then(|| parts[3])
                })
                .next();
            let message = e.to_string();
            match field {
                Some(field) if message.contains(field.split('[').next().unwrap_or(field)) => {}
                _ => problems.push(format!(
                    "{}: {kind} {name} refused with {message:?}, expected {expects:?}",
                    file.display()
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // bad-port's port 70000 is outside the schema's bounds: at least that one is refused.
    assert!(refused >= 1, "no broken example was refused by the API server");
}
