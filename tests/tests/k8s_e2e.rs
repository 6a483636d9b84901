//! mailroute's binaries end to end against a real kube-apiserver (see tests/README.md), each with
//! the Helm chart's RBAC and a ServiceAccount token: the operator's connection test against a real
//! SMTP upstream on loopback (STARTTLS with a private CA, AUTH from a Secret) sets `Verified`, and
//! `helm uninstall` leaves none of the operator's outputs behind once the garbage collector ran.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use mailroute_testkit::{Script, SmtpServer, TestPki};
use mailroute_tests::k8s::{ControlPlane, apply_crds, eventually, run, workspace_root};
use mailroute_tests::operator::{forbidden, install_chart_rbac, start_operator};

const WAIT: Duration = Duration::from_secs(120);

fn route_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("mailroute.io", "v1alpha1", "SmtpRoute"),
        "smtproutes",
    )
}

fn secret(ns: &str, name: &str, data: serde_json::Value) -> Secret {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "stringData": data,
    }))
    .expect("a valid Secret")
}

/// The route's `Verified` condition as (status, reason, message), once it is for `generation`.
fn verified(route: &DynamicObject) -> Option<(String, String, String)> {
    let conditions = route.data["status"]["conditions"].as_array()?;
    let c = conditions.iter().find(|c| c["type"] == "Verified")?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str().unwrap_or_default().to_string(),
        c["message"].as_str().unwrap_or_default().to_string(),
    ))
}

#[tokio::test]
async fn verified_comes_from_a_real_upstream_over_starttls_with_auth() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let ns = cp.namespace("verified").await.unwrap();
    let sa = install_chart_rbac(cp, &ns, &ns).unwrap();
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();

    // The upstream: STARTTLS with a certificate of a private CA, AUTH PLAIN relay/good-password.
    let pki = TestPki::new();
    let upstream = SmtpServer::start(
        Script::new()
            .starttls(pki.server_config())
            .require_starttls(true)
            .auth("relay@example.com", "good-password"),
    )
    .unwrap();

    let apply = PatchParams::apply("mailroute-tests").force();
    let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
    let creds = |password: &str| {
        secret(
            &ns,
            "upstream-credentials",
            serde_json::json!({"username": "relay@example.com", "password": password}),
        )
    };
    secrets
        .patch("upstream-credentials", &apply, &Patch::Apply(&creds("good-password")))
        .await
        .unwrap();
    secrets
        .patch(
            "upstream-ca",
            &apply,
            &Patch::Apply(&secret(&ns, "upstream-ca", serde_json::json!({"ca.crt": pki.ca_pem}))),
        )
        .await
        .unwrap();
    let route: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailroute.io/v1alpha1",
        "kind": "SmtpRoute",
        "metadata": {"name": "upstream", "namespace": ns},
        "spec": {
            "host": "127.0.0.1",
            "port": upstream.port(),
            "tls": {"mode": "starttls", "caSecretRef": {"name": "upstream-ca", "key": "ca.crt"}},
            "auth": {"secretRef": {"name": "upstream-credentials"}},
            "match": {"recipientDomains": ["verified.example"]},
            "testRecipient": "postmaster@verified.example",
        },
    }))
    .unwrap();
    let routes = Api::<DynamicObject>::namespaced_with(admin.clone(), &ns, &route_resource());
    routes.patch("upstream", &apply, &Patch::Apply(&route)).await.unwrap();

    let operator = std::cell::RefCell::new(start_operator(cp, &kubeconfig, &ns, "operator-verified", &[]).unwrap());
    let result: anyhow::Result<(String, String)> = async {
        let (_, _, good) = eventually("Verified=True", WAIT, || async {
            operator.borrow_mut().check_running()?;
            let r = routes.get("upstream").await?;
            Ok(verified(&r).filter(|(s, _, _)| s == "True"))
        })
        .await?;
        // The test message really went through the upstream, over TLS, as the Secret's user.
        let received = upstream.wait_for(1, Duration::from_secs(30)).await?;
        anyhow::ensure!(received[0].tls && received[0].auth_user.as_deref() == Some("relay@example.com"));
        anyhow::ensure!(
            received[0].rcpts == ["postmaster@verified.example"],
            "{:?}",
            received[0].rcpts
        );

        // A wrong password: the new Secret version is tested again and the upstream's 535 shows.
        secrets
            .patch("upstream-credentials", &apply, &Patch::Apply(&creds("wrong-password")))
            .await?;
        let (_, _, bad) = eventually("Verified=False after the password changed", WAIT, || async {
            operator.borrow_mut().check_running()?;
            let r = routes.get("upstream").await?;
            Ok(verified(&r).filter(|(s, _, _)| s == "False"))
        })
        .await?;
        Ok((good, bad))
    }
    .await;
    let mut operator = operator.into_inner();
    operator.kill();
    let (good, bad) = result.unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_tail(60)));
    // The message quotes the upstream's own reply to the test message (with its queue id).
    assert!(
        good.contains(&format!(
            "127.0.0.1:{} (STARTTLS): EHLO succeeded, AUTH PLAIN accepted",
            upstream.port()
        )) && good.contains("test message accepted: 250 2.0.0 OK queued as "),
        "{good}"
    );
    assert!(bad.contains(mailroute_testkit::smtp::DEFAULT_AUTH_FAIL_REPLY), "{bad}");
    let refused = forbidden(&operator.log_text());
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));
    eprintln!("verified test took {:?}", started.elapsed());
}

/// Whether `owner` (a Deployment) is among the ownerReferences of an object's metadata.
fn owned_by(meta: &kube::api::ObjectMeta, owner: &Deployment) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.kind == "Deployment" && Some(&r.uid) == owner.metadata.uid.as_ref())
}

#[tokio::test]
async fn helm_uninstall_leaves_nothing_once_the_operator_ran() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let ns = cp.namespace("uninstall").await.unwrap();
    let release = "rel";
    let chart = workspace_root().join("charts/mailroute");
    run(cp.helm().args(["install", release]).arg(&chart).args(["-n", &ns])).unwrap();

    // The operator Deployment of the release, and the ServiceAccount its pods run as.
    let deployments = Api::<Deployment>::namespaced(admin.clone(), &ns);
    let owner_name = format!("{release}-mailroute-operator");
    let owner = deployments.get(&owner_name).await.unwrap();
    let sa = owner
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.service_account_name.clone())
        .expect("the operator Deployment names its ServiceAccount");
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();
    let owner_flag = format!("--owner-deployment={owner_name}");
    let operator =
        std::cell::RefCell::new(start_operator(cp, &kubeconfig, &ns, &owner_name, &[owner_flag.as_str()]).unwrap());

    let configmaps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
    let outputs = async {
        eventually("mailroute-config owned by the Deployment", WAIT, || async {
            operator.borrow_mut().check_running()?;
            Ok(configmaps
                .get_opt("mailroute-config")
                .await?
                .filter(|o| owned_by(&o.metadata, &owner)))
        })
        .await?;
        eventually("mailroute-secrets owned by the Deployment", WAIT, || async {
            Ok(secrets
                .get_opt("mailroute-secrets")
                .await?
                .filter(|o| owned_by(&o.metadata, &owner)))
        })
        .await
    }
    .await;
    // In a cluster the operator's pods go with the Deployment; here the process goes first so it
    // cannot write the outputs again.
    let mut operator = operator.into_inner();
    operator.kill();
    outputs.unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_tail(60)));
    let refused = forbidden(&operator.log_text());
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));

    run(cp.helm().args(["uninstall", release, "-n", &ns])).unwrap();
    eventually("the garbage collector removed the operator's outputs", WAIT, || async {
        let cm = configmaps.get_opt("mailroute-config").await?;
        let secret = secrets.get_opt("mailroute-secrets").await?;
        Ok((cm.is_none() && secret.is_none()).then_some(()))
    })
    .await
    .unwrap();
    eprintln!("uninstall test took {:?}", started.elapsed());
}
