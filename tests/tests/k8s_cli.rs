//! The `mailroute` CLI binary against a real kube-apiserver (see tests/README.md), with
//! ServiceAccount tokens and the admin's client certificate from kubeconfigs:
//! - without `--admin-url` it finds the chart's relay admin Service by its label and asks the
//!   API server's service proxy for it, as the kubeconfig's user (RBAC decides); the API server's
//!   answers (no endpoints, forbidden) become clear errors with exit code 1. The suite's pods never
//!   run (no kubelet) and the API server refuses loopback endpoints, so no request reaches a relay
//!   through the real proxy here; cli/tests/cli.rs covers that hop with a stand-in.
//! - `route test NAME` annotates the SmtpRoute; the operator binary (chart RBAC) runs the
//!   connection test at once against a scriptable upstream on 127.0.0.1, and the CLI prints the
//!   upstream's own replies, exit code 0 when it passed and 5 when it failed.

use std::path::Path;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use mailroute_testkit::{Script, SmtpServer, TestPki};
use mailroute_tests::k8s::{ControlPlane, apply_crds, route_resource, run, secret, workspace_root};
use mailroute_tests::operator::{binary, install_chart_rbac, start_operator};

const RELEASE: &str = "mail";
const ADMIN_SERVICE: &str = "mail-mailroute-relay-admin";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn mailroute(kubeconfig: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(binary("mailroute").unwrap())
        .env_clear()
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .output()
        .await
        .expect("the CLI runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Applies `yaml` in `ns` as the admin.
fn apply(cp: &ControlPlane, ns: &str, name: &str, yaml: &str) {
    let path = cp.dir.join(format!("{ns}-{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    run(cp.kubectl().args(["apply", "--server-side", "-n", ns, "-f"]).arg(&path)).unwrap();
}

/// A ServiceAccount, a Role with `rules` (YAML list) bound to it, and its kubeconfig.
async fn user(cp: &ControlPlane, ns: &str, name: &str, rules: &str) -> std::path::PathBuf {
    apply(
        cp,
        ns,
        name,
        &format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}}}\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: {name}}}\nrules: {rules}\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {name}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {name}}}\n\
             subjects: [{{kind: ServiceAccount, name: {name}, namespace: {ns}}}]\n"
        ),
    );
    cp.service_account_kubeconfig(ns, name).await.unwrap()
}

#[tokio::test]
async fn without_an_admin_url_the_cli_asks_the_api_servers_service_proxy_as_the_kubeconfigs_user() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("cli-proxy").await.unwrap();
    // The chart's relay Services, as `helm install` makes them.
    let rendered = run(cp.helm().args([
        "template",
        RELEASE,
        workspace_root().join("charts/mailroute").to_str().unwrap(),
        "--namespace",
        &ns,
        "--show-only",
        "templates/relay-services.yaml",
        "--set",
        "image.tag=k8s-suite",
    ]))
    .unwrap();
    apply(cp, &ns, "services", &rendered);

    let ops = user(
        cp,
        &ns,
        "ops",
        r#"[{apiGroups: [""], resources: [services], verbs: [list]}, {apiGroups: [""], resources: [services/proxy], verbs: [get]}]"#,
    )
    .await;
    let nobody = user(cp, &ns, "nobody", "[]").await;
    let relays = format!("--relay-namespace={ns}");

    // Found by its label, reached through the proxy as `ops` (a token): the API server has no
    // endpoint for it (no pod runs here) and says so.
    let no_endpoints = format!(
        "the Kubernetes API server answered 503 for the relays' admin Service {ns}/{ADMIN_SERVICE}: \
         no endpoints available for service \"{ADMIN_SERVICE}\""
    );
    let r = mailroute(&ops, &[&relays, "--context=test", "status"]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains(&no_endpoints), "{}", r.stderr);
    let r = mailroute(&ops, &[&relays, "--token=an-admin-token", "events", "--since=1h"]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains(&no_endpoints), "{}", r.stderr);
    assert!(!r.stderr.contains("an-admin-token"), "the token is never printed");
    // The same as the admin, authenticated by a client certificate.
    let r = mailroute(&cp.admin_kubeconfig, &[&relays, "status"]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains(&no_endpoints), "{}", r.stderr);

    // RBAC judges the kubeconfig's user: `nobody` may neither list Services nor use the proxy.
    let r = mailroute(&nobody, &[&relays, "status"]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "User \"system:serviceaccount:{ns}:nobody\" cannot list resource \"services\""
        )) && r.stderr.contains("--relay-service"),
        "{}",
        r.stderr
    );
    let r = mailroute(
        &nobody,
        &[&relays, &format!("--relay-service={ADMIN_SERVICE}"), "status"],
    )
    .await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "the Kubernetes API server answered 403 for the relays' admin Service {ns}/{ADMIN_SERVICE}"
        )) && r.stderr.contains(&format!(
            "User \"system:serviceaccount:{ns}:nobody\" cannot get resource \"services/proxy\" in API group \"\" in the namespace \"{ns}\""
        )),
        "{}",
        r.stderr
    );

    // Nothing labelled in another namespace: not found, exit 3.
    let elsewhere = cp.namespace("cli-empty").await.unwrap();
    let r = mailroute(
        &cp.admin_kubeconfig,
        &[&format!("--relay-namespace={elsewhere}"), "status"],
    )
    .await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("no relay admin Service in namespace {elsewhere}")),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn route_test_has_the_operator_test_now_and_prints_the_upstreams_words() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let ns = cp.namespace("cli-route").await.unwrap();
    let sa = install_chart_rbac(cp, &ns, &ns).unwrap();
    let operator_kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();

    // The upstream: its own greeting words, STARTTLS with a private CA, AUTH PLAIN.
    let pki = TestPki::new();
    let upstream = SmtpServer::start(
        Script::new()
            .hostname("upstream.cli.example")
            .greeting("220 upstream.cli.example ESMTP words of the upstream itself")
            .starttls(pki.server_config())
            .require_starttls(true)
            .auth("relay@example.com", "good-password"),
    )
    .unwrap();
    let applied = PatchParams::apply("mailroute-tests").force();
    let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
    for (name, data) in [
        (
            "good",
            serde_json::json!({"username": "relay@example.com", "password": "good-password"}),
        ),
        (
            "bad",
            serde_json::json!({"username": "relay@example.com", "password": "wrong-password"}),
        ),
        ("ca", serde_json::json!({"ca.crt": pki.ca_pem})),
    ] {
        secrets
            .patch(name, &applied, &Patch::Apply(&secret(&ns, name, data)))
            .await
            .unwrap();
    }
    let routes = Api::<DynamicObject>::namespaced_with(admin.clone(), &ns, &route_resource());
    for (name, creds, priority) in [("good", "good", 10), ("bad", "bad", 20)] {
        let route: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailroute.io/v1alpha1",
            "kind": "SmtpRoute",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "host": "127.0.0.1",
                "port": upstream.port(),
                "tls": {"mode": "starttls", "caSecretRef": {"name": "ca", "key": "ca.crt"}},
                "auth": {"secretRef": {"name": creds}},
                "match": {"recipientDomains": [format!("{name}.example")]},
                "priority": priority,
            },
        }))
        .unwrap();
        routes.patch(name, &applied, &Patch::Apply(&route)).await.unwrap();
    }
    // The CLI's users: one may annotate routes, the other only read them.
    let tester = user(
        cp,
        &ns,
        "tester",
        r#"[{apiGroups: [mailroute.io], resources: [smtproutes], verbs: [get, patch]}]"#,
    )
    .await;
    let reader = user(
        cp,
        &ns,
        "reader",
        r#"[{apiGroups: [mailroute.io], resources: [smtproutes], verbs: [get]}]"#,
    )
    .await;

    // No periodic reconcile within the test: only the request's own watch event can wake the
    // operator in time.
    let mut operator =
        start_operator(cp, &operator_kubeconfig, &ns, "operator-cli", &["--resync-interval=1h"]).unwrap();
    let result: anyhow::Result<()> = async {
        let ns_arg = format!("--namespace={ns}");
        // Passed: every step's reply, the upstream's own greeting first, exit 0.
        let good = mailroute(&tester, &["route", "test", "good", &ns_arg]).await;
        anyhow::ensure!(good.code == 0, "exit {}: {}{}", good.code, good.stdout, good.stderr);
        let port = upstream.port();
        for words in [
            format!("SmtpRoute {ns}/good: connection test of 127.0.0.1:{port} passed"),
            "220 upstream.cli.example ESMTP words of the upstream itself".to_string(),
            "starttls".to_string(),
            "235".to_string(),
        ] {
            anyhow::ensure!(good.stdout.contains(&words), "{words:?} missing in:\n{}", good.stdout);
        }
        // The status holds the answer under the request the CLI made.
        let r = routes.get("good").await?;
        let asked = r
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("mailroute.io/test-requested"))
            .cloned()
            .unwrap_or_default();
        anyhow::ensure!(!asked.is_empty());
        anyhow::ensure!(r.data["status"]["lastConnectionTest"]["requestId"] == asked.as_str());
        // Asked again: a new run (a new request id), JSON for scripts.
        let again = mailroute(&tester, &["route", "test", "good", "-n", &ns, "-o", "json"]).await;
        anyhow::ensure!(again.code == 0, "{}{}", again.stdout, again.stderr);
        let v: serde_json::Value = serde_json::from_str(&again.stdout)?;
        anyhow::ensure!(v["result"] == "Succeeded" && v["route"] == format!("{ns}/good"), "{v}");
        anyhow::ensure!(v["requestId"].as_str().is_some_and(|id| id != asked), "{v}");
        let steps: Vec<&str> = v["replies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["step"].as_str())
            .collect();
        anyhow::ensure!(steps == ["greeting", "ehlo", "starttls", "ehlo", "auth"], "{v}");

        // Failed: the upstream's refusal, exit 5.
        let bad = mailroute(&tester, &["route", "test", "bad", &ns_arg]).await;
        anyhow::ensure!(bad.code == 5, "exit {}: {}{}", bad.code, bad.stdout, bad.stderr);
        anyhow::ensure!(bad.stdout.contains("FAILED at auth"), "{}", bad.stdout);
        anyhow::ensure!(bad.stdout.contains("535 5.7.8"), "{}", bad.stdout);
        anyhow::ensure!(bad.stderr.contains("failed at auth: 535"), "{}", bad.stderr);
        anyhow::ensure!(!format!("{}{}", bad.stdout, bad.stderr).contains("wrong-password"));

        // Without patch on smtproutes: refused by RBAC, saying what is missing; exit 1.
        let refused = mailroute(&reader, &["route", "test", "good", &ns_arg]).await;
        anyhow::ensure!(refused.code == 1, "{}", refused.stderr);
        anyhow::ensure!(
            refused.stderr.contains("cannot patch resource \"smtproutes\"")
                && refused.stderr.contains("needs patch on smtproutes.mailroute.io"),
            "{}",
            refused.stderr
        );
        // No such route: exit 3.
        let missing = mailroute(&tester, &["route", "test", "nope", &ns_arg]).await;
        anyhow::ensure!(missing.code == 3, "{}", missing.stderr);
        anyhow::ensure!(
            missing.stderr.contains(&format!("SmtpRoute {ns}/nope not found")),
            "{}",
            missing.stderr
        );
        operator.check_running()?;
        Ok(())
    }
    .await;
    operator.kill();
    if let Err(e) = result {
        panic!("{e:#}\noperator log:\n{}", operator.log_tail(60));
    }
}
