//! The `mailroute-operator run` binary as a process, against an in-memory API server reached
//! over HTTP on 127.0.0.1 (kube-fake-client behind a small proxy; it cannot stream watches, so
//! the periodic resync drives the reconciles here). Checks: the outputs and statuses appear, a
//! route's upstream (the scriptable SMTP server) is verified, the Lease is taken, /healthz,
//! /readyz and /metrics answer, logs are JSON lines without secrets, and SIGTERM ends the
//! process with exit code 0 after releasing the Lease.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use axum::Router;
use axum::body::Body as AxumBody;
use axum::extract::{Request, State};
use axum::response::Response;
use http_body_util::BodyExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::client::Body as KubeBody;
use mailroute_testkit::{Script, SmtpServer, TestPki};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Forwards HTTP requests to the in-memory API; answers /version itself.
async fn proxy(State(client): State<kube::Client>, req: Request) -> Response {
    if req.uri().path() == "/version" {
        let info = serde_json::json!({
            "major": "1", "minor": "36", "gitVersion": "v1.36.0-fake", "gitCommit": "0", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25", "compiler": "gc", "platform": "linux/amd64"
        });
        return Response::new(AxumBody::from(info.to_string()));
    }
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let forwarded = http::Request::from_parts(parts, KubeBody::from(bytes.to_vec()));
    let response = client.send(forwarded).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, AxumBody::from(bytes))
}

async fn http_get(port: u16, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn eventually<T>(what: &str, logs: &Mutex<Vec<String>>, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}; operator logs:\n{}",
            logs.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Who holds the operator's Lease now.
async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    let lease = leases.get("mailroute-operator").await.unwrap();
    lease.spec.unwrap().holder_identity
}

#[tokio::test]
async fn the_binary_reconciles_serves_health_and_stops_on_sigterm() {
    let pki = TestPki::new();
    let smtp = SmtpServer::start(Script::new().starttls(pki.server_config()).auth("relay", "upstream-pw")).unwrap();
    let upstream_route = upstream_route(smtp.port(), "starttls", "  match: {recipientDomains: [example.org]}\n");
    // Only examples that reach no host outside 127.0.0.1 (the others name real providers).
    let mut objs = examples_from(
        &["mx-default-route.yaml", "quota-app.yaml", "quota-shop.yaml"],
        &upstream_route,
    );
    add_upstream_secrets(&mut objs, &pki.ca_pem, "relay", "upstream-pw");
    let client = fake_client(objs, None).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_port = listener.local_addr().unwrap().port();
    let app = Router::new().fallback(proxy).with_state(client.clone());
    let api = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://127.0.0.1:{api_port}\"}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: default}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\ncurrent-context: fake\n"
        ),
    )
    .unwrap();

    let health_port = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailroute-operator"))
        .args([
            "run",
            "--namespace",
            OPERATOR_NS,
            "--identity",
            "operator-test-0",
            "--health-listen",
            &format!("127.0.0.1:{health_port}"),
            "--resync-interval",
            "1s",
            "--connection-test-timeout",
            "10s",
            "--helo-name",
            "operator.test",
            // Single tenant: the fake API serves no cluster-scoped lists (Namespaces); the
            // namespace watch is covered by rbac.rs and the control-plane suite.
            "--platform-namespaces=*",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("POD_NAME")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let logs = logs.clone();
        readers.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                logs.lock().unwrap().push(line);
            }
        }));
    }

    let cms = Api::<ConfigMap>::namespaced(client.clone(), OPERATOR_NS);
    let cm = eventually("the relay ConfigMap", &logs, async || {
        cms.get_opt("mailroute-config").await.unwrap()
    })
    .await;
    assert!(cm.data.unwrap()["relay.json"].contains("mail/upstream"));
    let up = eventually("the upstream to be verified", &logs, async || {
        let r = route(&client, "mail", "upstream").await;
        let ok = r
            .status
            .as_ref()?
            .conditions
            .iter()
            .any(|c| c.type_ == "Verified" && c.is_true());
        ok.then_some(r)
    })
    .await;
    assert_eq!(sr(&route_condition(&up, "Ready")), ("True", "InConfig"));
    let mx = route(&client, "mail", "direct-mx").await;
    assert_eq!(sr(&route_condition(&mx, "Ready")), ("True", "InConfig"));
    assert_eq!(sr(&route_condition(&mx, "Verified")), ("Unknown", "NotApplicable"));
    assert_eq!(smtp.connections(), 1, "one connection test");

    let leases = Api::<Lease>::namespaced(client.clone(), OPERATOR_NS);
    assert_eq!(lease_holder(&leases).await.as_deref(), Some("operator-test-0"));

    assert!(http_get(health_port, "/healthz").await.ends_with("\r\n\r\nok"));
    assert!(http_get(health_port, "/readyz").await.ends_with("ready (leader)"));
    let metrics = http_get(health_port, "/metrics").await;
    for needle in [
        "mailroute_operator_is_leader 1",
        "mailroute_route_verified{route=\"mail/upstream\"} 1",
        "mailroute_operator_config_writes_total 2",
    ] {
        assert!(metrics.contains(needle), "{needle} missing in\n{metrics}");
    }

    let pid = child.id().unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("no exit within 30s of SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(lease_holder(&leases).await, None, "the Lease is released on shutdown");

    let logs = logs.lock().unwrap().clone();
    assert!(!logs.is_empty());
    for line in &logs {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v.get("level").is_some() && v.get("message").is_some(), "{line}");
        for secret in ["upstream-pw", "s3cret-shop-password", "BEGIN PRIVATE KEY"] {
            assert!(!line.contains(secret), "a secret in the logs: {line}");
        }
    }
    let text = logs.join("\n");
    assert!(text.contains("relay configuration applied"), "{text}");
    assert!(text.contains("mailroute operator stopped"), "{text}");
    api.abort();
}
