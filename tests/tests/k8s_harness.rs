//! The control-plane harness itself (see tests/README.md): a ServiceAccount token from the
//! TokenRequest API authenticates (TokenReview) and is authorized by RBAC only for what it was
//! granted (SubjectAccessReview), and the garbage collector deletes dependents of a deleted owner.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use mailroute_tests::k8s::{ControlPlane, client_for, eventually};

async fn can(client: &kube::Client, ns: &str, verb: &str, resource: &str) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.into()),
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let out = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    out.status.is_some_and(|s| s.allowed)
}

#[tokio::test]
async fn service_account_tokens_authenticate_and_rbac_authorizes_only_what_is_granted() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = cp.namespace("harness").await.unwrap();
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": "reader"}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let kubeconfig = cp.service_account_kubeconfig(&ns, "reader").await.unwrap();
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap()
        .trim_matches('\'')
        .to_string();

    let review = TokenReview {
        spec: TokenReviewSpec {
            token,
            ..Default::default()
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    let status = reviewed.status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.unwrap().username.unwrap();
    assert_eq!(user, format!("system:serviceaccount:{ns}:reader"));

    let client = client_for(&kubeconfig).await.unwrap();
    assert!(
        !can(&client, &ns, "list", "configmaps").await,
        "RBAC granted what nobody granted"
    );
    let err = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");
    cp.kubectl()
        .args([
            "create",
            "rolebinding",
            "reader",
            "--clusterrole=view",
            &format!("--serviceaccount={ns}:reader"),
            "-n",
            &ns,
        ])
        .status()
        .unwrap()
        .success()
        .then_some(())
        .unwrap();
    // The authorizer sees a new RoleBinding through its informer, a moment later.
    eventually("the RoleBinding to take effect", Duration::from_secs(60), || async {
        Ok(can(&client, &ns, "list", "configmaps").await.then_some(()))
    })
    .await
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_garbage_collector_deletes_dependents() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    let ns = cp.namespace("gc").await.unwrap();
    let api = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    let owner: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": "owner"}})).unwrap();
    let owner = api.create(&PostParams::default(), &owner).await.unwrap();
    let dependent: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {
        "name": "dependent",
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid.unwrap()}],
    }}))
    .unwrap();
    api.create(&PostParams::default(), &dependent).await.unwrap();
    api.delete("owner", &DeleteParams::background()).await.unwrap();
    eventually("the dependent ConfigMap deleted", Duration::from_secs(120), || async {
        Ok(api.get_opt("dependent").await?.is_none().then_some(()))
    })
    .await
    .unwrap();
}
