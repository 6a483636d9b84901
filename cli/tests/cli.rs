//! The `mailroute` binary against a real relay (admin API over TCP, a real SMTP upstream):
//! what it prints, and the exit codes scripts rely on.

use std::time::Duration;

use mailroute_relay::config::Source;
use mailroute_relay::server::{Relay, RelayOptions};
use mailroute_testkit::smtp::client::{Transcript, send};
use mailroute_testkit::{Script, SmtpServer};

const TOKEN: &str = "cli-test-token-5b1f";
const WAIT: Duration = Duration::from_secs(30);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn mailroute(admin: &str, token: &str, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailroute"))
        .env_remove("MAILROUTE_ADMIN_TOKEN")
        .arg(format!("--admin-url={admin}"))
        .arg(format!("--token={token}"))
        .args(args)
        .output()
        .await
        .expect("the binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn start(upstream_port: u16) -> (Relay, tempfile::TempDir) {
    start_on(upstream_port, None).await
}

/// [`start`] with its queue in Redis at `queue` (bulk queue control needs it).
async fn start_on(upstream_port: u16, queue: Option<&str>) -> (Relay, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: up, namespace: mail}}\nspec:\n  host: 127.0.0.1\n  port: {upstream_port}\n  tls: {{mode: none}}\n  match: {{recipientDomains: [\"*\"]}}\n"
        ),
    )
    .unwrap();
    let mut o = RelayOptions::local();
    o.source = Source::Manifests(vec![routes]);
    o.smtp_listen = Some("127.0.0.1:0".parse().unwrap());
    o.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    o.admin_token = Some(TOKEN.into());
    o.log_stdout = false;
    o.workers = 4;
    o.inbound.hostname = "relay.test".into();
    if let Some(q) = queue {
        o.queue = q.parse().expect("queue URL");
        o.hold_refresh = Duration::from_millis(100);
    }
    (Relay::start(o).await.expect("relay starts"), dir)
}

async fn submit(relay: &Relay, marker: &str, headers: &str) -> Transcript {
    let data = format!("From: <app@app.example>\r\nSubject: {marker}\r\n{headers}\r\nbody {marker}\r\n");
    let t = send(
        relay.smtp_addr.unwrap(),
        None,
        false,
        None,
        "app@app.example",
        &["user@example.com"],
        data.as_bytes(),
    )
    .await
    .unwrap();
    assert!(t.delivered(), "{t}");
    t
}

fn queue_id(t: &Transcript) -> String {
    let reply = t.reply_to(".").expect("a reply to DATA").text();
    reply.rsplit("queued as ").next().expect("queue id").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_and_acts_on_a_real_relay_with_exit_codes_scripts_can_use() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let (relay, _dir) = start(up.port()).await;
    let admin = format!("http://{}", relay.admin_addr.unwrap());

    // Delivered mail shows up in `events`.
    submit(&relay, "now", "").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = mailroute(&admin, TOKEN, &["events", "--result=delivered", "-o", "json"]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        if r.stdout.lines().count() == 1 {
            let e: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
            assert_eq!(e["recipient"], "user@example.com");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivered event: {}",
            r.stdout
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Mail from this test's client is unattributed (`-`), so a tenant's filter finds none of it.
    let unattributed = mailroute(&admin, TOKEN, &["events", "--namespace=-", "-o", "json"]).await;
    assert!(unattributed.stdout.lines().count() >= 2, "{}", unattributed.stdout);
    let team_a = mailroute(&admin, TOKEN, &["events", "--namespace=team-a", "-o", "json"]).await;
    assert_eq!((team_a.code, team_a.stdout.as_str()), (0, ""), "{}", team_a.stderr);
    let table = mailroute(&admin, TOKEN, &["events", "--since=1h"]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(table.stdout.starts_with("TIME"), "{}", table.stdout);
    assert!(
        table.stdout.contains("delivered") && table.stdout.contains("received"),
        "{}",
        table.stdout
    );

    // A message held for an hour: shown, cancelled, then gone.
    let id = queue_id(&submit(&relay, "later", "X-Mailroute-Deliver-After: 1h\r\n").await);
    let show = mailroute(&admin, TOKEN, &["message", "show", &id]).await;
    assert_eq!(show.code, 0, "{}", show.stderr);
    assert!(
        show.stdout.contains(&id) && show.stdout.contains("user@example.com"),
        "{}",
        show.stdout
    );
    let cancel = mailroute(&admin, TOKEN, &["queue", "cancel", &id]).await;
    assert_eq!(cancel.code, 0, "{}", cancel.stderr);
    assert!(cancel.stdout.contains("cancelled: 1 recipient"), "{}", cancel.stdout);
    let again = mailroute(&admin, TOKEN, &["queue", "cancel", &id]).await;
    assert_eq!(again.code, 3, "{}", again.stdout);
    assert!(again.stderr.contains("message not found"), "{}", again.stderr);
    let cancelled = mailroute(
        &admin,
        TOKEN,
        &[
            "events",
            "--result=cancelled",
            &format!("--message-id={id}"),
            "-o",
            "yaml",
        ],
    )
    .await;
    assert!(cancelled.stdout.contains("result: cancelled"), "{}", cancelled.stdout);

    // Not found, bad usage, refused, unreachable: each its own exit code and the server's words.
    let missing = mailroute(&admin, TOKEN, &["message", "show", "0000000000000000000000dead"]).await;
    assert_eq!(missing.code, 3, "{}", missing.stderr);
    assert!(missing.stderr.contains("message not found"), "{}", missing.stderr);
    let usage = mailroute(&admin, TOKEN, &["message", "show", "../quotas"]).await;
    assert_eq!(usage.code, 2, "{}", usage.stderr);
    let refused = mailroute(&admin, "wrong-token", &["quota", "ls"]).await;
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("401"), "{}", refused.stderr);
    assert!(!refused.stderr.contains("wrong-token"), "the token is never printed");
    let nowhere = mailroute("http://127.0.0.1:9", TOKEN, &["status"]).await;
    assert_eq!(nowhere.code, 1);
    assert!(
        nowhere.stderr.contains("cannot reach the admin API"),
        "{}",
        nowhere.stderr
    );

    // Status and quotas.
    let status = mailroute(&admin, TOKEN, &["status"]).await;
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert!(
        status.stdout.contains("ready") && status.stdout.contains("yes"),
        "{}",
        status.stdout
    );
    let quotas = mailroute(&admin, TOKEN, &["quota", "ls", "-o", "json"]).await;
    assert_eq!(quotas.code, 0, "{}", quotas.stderr);
    let v: serde_json::Value = serde_json::from_str(&quotas.stdout).unwrap();
    assert_eq!(v["quotas"], serde_json::json!([]));
    let scoped = mailroute(&admin, TOKEN, &["quota", "ls", "--namespace=team-a", "-o", "json"]).await;
    assert_eq!(scoped.code, 0, "{}", scoped.stderr);
    let completion = mailroute(&admin, TOKEN, &["completion", "bash"]).await;
    assert!(
        completion.code == 0 && completion.stdout.contains("_mailroute"),
        "{}",
        completion.stderr
    );

    relay.shutdown().await;
}

/// Polls `mailroute queue ls --sender=app@app.example -o json` until its total is `n`.
async fn until_total(admin: &str, args: &[&str], n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut all = vec!["queue", "ls", "-o", "json"];
        all.extend_from_slice(args);
        let r = mailroute(admin, TOKEN, &all).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        if v["total"].as_u64() == Some(n) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "total never {n}: {}", r.stdout);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_ls_hold_release_retry_and_cancel_by_filter() {
    let redis = mailroute_testkit::RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let (relay, _dir) = start_on(up.port(), Some(&redis.url())).await;
    let admin = format!("http://{}", relay.admin_addr.unwrap());

    // Hold the sender, then its mail queues up held.
    let hold = mailroute(
        &admin,
        TOKEN,
        &["queue", "hold", "--sender=app@app.example", "--max=1h"],
    )
    .await;
    assert_eq!(hold.code, 0, "{}", hold.stderr);
    assert!(
        hold.stdout
            .starts_with("0 job(s) held\nhold on sender app@app.example until "),
        "{}",
        hold.stdout
    );
    let holds = mailroute(&admin, TOKEN, &["queue", "holds"]).await;
    assert!(
        holds.stdout.starts_with("HOLD ") && holds.stdout.contains("admin-token"),
        "{}",
        holds.stdout
    );
    submit(&relay, "one", "").await;
    submit(&relay, "two", "").await;
    until_total(&admin, &["--state=held"], 2).await;
    let ls = mailroute(&admin, TOKEN, &["queue", "ls", "--domain=example.com"]).await;
    assert_eq!(ls.code, 0, "{}", ls.stderr);
    let lines: Vec<&str> = ls.stdout.lines().collect();
    assert!(
        lines[0].starts_with("ID ") && lines[0].contains("STATE"),
        "{}",
        ls.stdout
    );
    assert_eq!(lines.len(), 4, "{}", ls.stdout);
    assert!(
        lines[1].contains("held") && lines[1].contains("mail/up"),
        "{}",
        ls.stdout
    );
    assert_eq!(lines[3], "2 of 2 matching job(s) shown");
    assert_eq!(up.received().len(), 0);

    // Refused without a filter (usage, exit 2, nothing sent); then by filter.
    let bare = mailroute(&admin, TOKEN, &["queue", "cancel"]).await;
    assert_eq!(bare.code, 2, "{}", bare.stderr);
    assert!(bare.stderr.contains("--all"), "{}", bare.stderr);
    let bad = mailroute(&admin, TOKEN, &["queue", "retry", "--state=stuck"]).await;
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert!(bad.stderr.contains("unknown state"), "{}", bad.stderr);
    let page = mailroute(&admin, TOKEN, &["queue", "ls", "--limit=1", "-o", "yaml"]).await;
    assert!(
        page.stdout.contains("total: 2") && page.stdout.contains("next_cursor:"),
        "{}",
        page.stdout
    );

    // Release: both go.
    let release = mailroute(&admin, TOKEN, &["queue", "release", "--sender=app@app.example"]).await;
    assert_eq!(
        (release.code, release.stdout.as_str()),
        (0, "2 job(s) released\n"),
        "{}",
        release.stderr
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while up.received().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "released mail not delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = mailroute(&admin, TOKEN, &["queue", "release", "--sender=app@app.example"]).await;
    assert_eq!(again.code, 3, "no such hold: {}", again.stderr);

    // A delayed message: retry sends it now; another is cancelled by filter.
    submit(&relay, "later", "X-Mailroute-Deliver-After: 1h\r\n").await;
    until_total(&admin, &["--state=scheduled"], 1).await;
    let retry = mailroute(
        &admin,
        TOKEN,
        &["queue", "retry", "--sender=app@app.example", "-o", "json"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&retry.stdout).unwrap();
    assert_eq!(
        (v["action"].as_str(), v["touched"].as_u64()),
        (Some("retry"), Some(1)),
        "{}",
        retry.stdout
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while up.received().len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "retried mail not delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    submit(&relay, "never", "X-Mailroute-Deliver-After: 1h\r\n").await;
    until_total(&admin, &[], 1).await;
    let cancel = mailroute(
        &admin,
        TOKEN,
        &["queue", "cancel", "--min-age=0s", "--sender=app@app.example"],
    )
    .await;
    assert_eq!(
        (cancel.code, cancel.stdout.as_str()),
        (0, "1 job(s) cancelled\n"),
        "{}",
        cancel.stderr
    );
    until_total(&admin, &[], 0).await;
}

#[tokio::test]
async fn the_kubectl_plugin_is_the_same_command() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-mailroute"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "status",
        "events",
        "queue",
        "message",
        "quota",
        "suppress",
        "route",
        "completion",
    ] {
        assert!(help.contains(cmd), "{help}");
    }
    for flag in [
        "--admin-url",
        "--kubeconfig",
        "--context",
        "--relay-namespace",
        "--relay-service",
        "--kube-token",
    ] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
    let route = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-mailroute"))
        .args(["route", "test", "--help"])
        .output()
        .await
        .unwrap();
    let route_help = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.status.success() && route_help.contains("--namespace") && route_help.contains("--wait"),
        "{route_help}"
    );
    // Neither an admin URL nor any Kubernetes configuration: says what to give, exit 1.
    let home = tempfile::tempdir().unwrap();
    let nothing = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-mailroute"))
        .env_clear()
        .env("HOME", home.path())
        .arg("status")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&nothing.stderr);
    assert_eq!(nothing.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("give --admin-url, or a kubeconfig"), "{stderr}");
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-mailroute"))
        .arg("no-such-command")
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// What the stand-in API server saw of one request: method, path and query, the caller's
/// `Authorization` and the token header.
#[derive(Clone, Debug)]
struct Seen {
    target: String,
    authorization: Option<String>,
    token_header: Option<String>,
}

const KUBE_TOKEN: &str = "kube-user-token-9c2e";
const ADMIN_SERVICE: &str = "mail-mailroute-relay-admin";

fn status_body(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "reason": reason, "code": code})
    .to_string()
}

/// A stand-in for kube-apiserver's service proxy (the real one refuses loopback endpoints, and
/// tests may only use loopback; `tests/tests/k8s_cli.rs` covers the real one up to that point).
/// It does what the API server does: authenticates the caller's bearer token, lists Services by
/// label, answers `no endpoints` for a Service without pods, and otherwise forwards the request
/// to the relay without `Authorization` (removed once the caller is authenticated) and with
/// every other header.
async fn fake_api_server(
    relay_admin: std::net::SocketAddr,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Seen>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Seen>::new()));
    let log = seen.clone();
    let app = axum::Router::new()
        .fallback(fake_api_answer)
        .with_state((relay_admin, log, reqwest::Client::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

type FakeState = (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    reqwest::Client,
);

async fn fake_api_answer(
    axum::extract::State((relay_admin, log, http)): axum::extract::State<FakeState>,
    req: axum::http::Request<axum::body::Body>,
) -> axum::http::Response<axum::body::Body> {
    use axum::body::Body;
    use axum::http::Response;
    // Owned: a borrow of the request (its body is not Sync) must not live across an await.
    let headers = req.headers().clone();
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let authorization = header("authorization");
    let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    log.lock().unwrap().push(Seen {
        target: target.clone(),
        authorization: authorization.clone(),
        token_header: header("x-mailroute-token"),
    });
    let answer = |code: u16, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    if authorization.as_deref() != Some(&format!("Bearer {KUBE_TOKEN}")) {
        return answer(401, status_body(401, "Unauthorized", "Unauthorized"));
    }
    let path = req.uri().path().to_string();
    let list = |items: serde_json::Value| {
        serde_json::json!({"kind": "ServiceList", "apiVersion": "v1", "metadata": {}, "items": items}).to_string()
    };
    if path == "/api/v1/namespaces/mailroute/services" {
        let items = serde_json::json!([{"metadata": {"name": ADMIN_SERVICE, "namespace": "mailroute",
            "labels": {"mailroute.io/port": "admin"}},
            "spec": {"ports": [{"name": "admin", "port": 8080, "targetPort": "admin"}]}}]);
        return answer(200, list(items));
    }
    if path.starts_with("/api/v1/namespaces/") && path.ends_with("/services") {
        return answer(200, list(serde_json::json!([])));
    }
    if path.starts_with("/api/v1/namespaces/mailroute/services/http:empty:admin/proxy") {
        return answer(
            503,
            status_body(
                503,
                "ServiceUnavailable",
                "no endpoints available for service \"empty\"",
            ),
        );
    }
    let prefix = format!("/api/v1/namespaces/mailroute/services/http:{ADMIN_SERVICE}:admin/proxy");
    let Some(rest) = target.strip_prefix(&prefix).map(str::to_string) else {
        return answer(
            404,
            status_body(404, "NotFound", "the server could not find the requested resource"),
        );
    };
    let (parts, body) = req.into_parts();
    let mut forward = http.request(parts.method, format!("http://{relay_admin}{rest}"));
    for (name, value) in &parts.headers {
        if name != "authorization" && name != "host" {
            forward = forward.header(name, value);
        }
    }
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let resp = forward.body(body).send().await.unwrap();
    let mut out = Response::builder().status(resp.status().as_u16());
    if let Some(ct) = resp.headers().get("content-type") {
        out = out.header("content-type", ct);
    }
    out.body(Body::from(resp.bytes().await.unwrap())).unwrap()
}

async fn through_kubeconfig(kubeconfig: &std::path::Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailroute"))
        .env_remove("MAILROUTE_ADMIN_URL")
        .env_remove("MAILROUTE_ADMIN_TOKEN")
        .env_remove("KUBECONFIG")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .output()
        .await
        .expect("the binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_url_the_cli_goes_through_the_service_proxy_of_the_kubeconfig() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let (relay, dir) = start(up.port()).await;
    let (api, seen) = fake_api_server(relay.admin_addr.unwrap()).await;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://{api}\"}}}}]\n\
             users: [{{name: ops, user: {{token: {KUBE_TOKEN}}}}}]\n\
             contexts: [{{name: ops, context: {{cluster: c, user: ops, namespace: mailroute}}}}]\ncurrent-context: ops\n"
        ),
    )
    .unwrap();
    let targets = |from: usize| -> Vec<Seen> { seen.lock().unwrap()[from..].to_vec() };

    // `status` needs no admin token: the Service is found by its label in the context's
    // namespace, and /readyz and /metrics come through its proxy.
    let status = through_kubeconfig(&kubeconfig, &["status"]).await;
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert!(
        status.stdout.contains("ready") && status.stdout.contains("yes"),
        "{}",
        status.stdout
    );
    let proxy = format!("/api/v1/namespaces/mailroute/services/http:{ADMIN_SERVICE}:admin/proxy");
    let got: Vec<String> = targets(0).into_iter().map(|s| s.target).collect();
    assert_eq!(
        got,
        [
            "/api/v1/namespaces/mailroute/services?&labelSelector=mailroute.io%2Fport%3Dadmin".to_string(),
            format!("{proxy}/readyz"),
            format!("{proxy}/metrics"),
        ],
    );

    // The admin token travels in X-Mailroute-Token, the kubeconfig's token in Authorization.
    let n = seen.lock().unwrap().len();
    let events = through_kubeconfig(
        &kubeconfig,
        &[&format!("--token={TOKEN}"), "events", "--since=1h", "-o", "json"],
    )
    .await;
    assert_eq!(events.code, 0, "{}", events.stderr);
    let calls = targets(n);
    let call = calls
        .iter()
        .find(|s| s.target.starts_with(&format!("{proxy}/api/v1/events?")))
        .expect("the events call");
    assert!(call.target.contains("from="), "{}", call.target);
    assert_eq!(
        call.authorization.as_deref(),
        Some(format!("Bearer {KUBE_TOKEN}").as_str())
    );
    assert_eq!(call.token_header.as_deref(), Some(TOKEN));

    // Without a token the relay's own 401; the relay's 404 stays "not found" (exit 3).
    let refused = through_kubeconfig(&kubeconfig, &["quota", "ls"]).await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("401") && refused.stderr.contains("bearer token"),
        "{}",
        refused.stderr
    );
    let missing = through_kubeconfig(
        &kubeconfig,
        &[
            &format!("--token={TOKEN}"),
            "message",
            "show",
            "0000000000000000000000dead",
        ],
    )
    .await;
    assert_eq!(missing.code, 3, "{}", missing.stderr);
    assert!(missing.stderr.contains("message not found"), "{}", missing.stderr);

    // --kube-token presents the kubeconfig's token to the relay instead (tenant access).
    let n = seen.lock().unwrap().len();
    let tenant = through_kubeconfig(&kubeconfig, &["--kube-token", "quota", "ls", "--namespace=team-a"]).await;
    assert_eq!(
        tenant.code, 1,
        "this relay takes no Kubernetes tokens: {}",
        tenant.stderr
    );
    assert!(targets(n).iter().any(|s| s.token_header.as_deref() == Some(KUBE_TOKEN)));
    assert!(!tenant.stderr.contains(KUBE_TOKEN), "the token is never printed");

    // The API server's own refusals are errors that say so, not the relay's answers.
    let empty = through_kubeconfig(&kubeconfig, &["--relay-service=empty", "status"]).await;
    assert_eq!(empty.code, 1, "{}", empty.stderr);
    assert!(
        empty.stderr.contains("the Kubernetes API server answered 503 for the relays' admin Service mailroute/empty: no endpoints available for service \"empty\""),
        "{}",
        empty.stderr
    );
    let elsewhere = through_kubeconfig(&kubeconfig, &["--relay-namespace=other", "status"]).await;
    assert_eq!(elsewhere.code, 3, "{}", elsewhere.stderr);
    assert!(
        elsewhere.stderr.contains("no relay admin Service in namespace other"),
        "{}",
        elsewhere.stderr
    );
    let bad = through_kubeconfig(&kubeconfig, &["--relay-namespace=../x", "status"]).await;
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert!(bad.stderr.contains("is not a namespace name"), "{}", bad.stderr);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppress_commands_list_add_remove_import_and_export_against_a_relay() {
    let redis = mailroute_testkit::RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: up, namespace: mail}}\nspec:\n  host: 127.0.0.1\n  port: {}\n  tls: {{mode: none}}\n  match: {{recipientDomains: [\"*\"]}}\n",
            up.port()
        ),
    )
    .unwrap();
    let mut o = RelayOptions::local();
    o.source = Source::Manifests(vec![routes]);
    o.queue = redis.url().parse().unwrap();
    o.smtp_listen = Some("127.0.0.1:0".parse().unwrap());
    o.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    o.admin_token = Some(TOKEN.into());
    o.log_stdout = false;
    o.workers = 2;
    o.inbound.hostname = "relay.test".into();
    o.suppression.poll = Duration::from_millis(100);
    let relay = Relay::start(o).await.expect("relay starts");
    let admin = format!("http://{}", relay.admin_addr.unwrap());
    let run = |args: &[&str]| {
        let admin = admin.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            mailroute(&admin, TOKEN, &args).await
        }
    };

    let added = run(&[
        "suppress",
        "add",
        "Blocked@Example.com",
        "--reason",
        "asked us",
        "--expires",
        "30d",
    ])
    .await;
    assert_eq!(added.code, 0, "{}", added.stderr);
    assert!(
        added.stdout.contains("Blocked@Example.com suppressed"),
        "{}",
        added.stdout
    );
    let ls = run(&["suppress", "ls"]).await;
    assert_eq!(ls.code, 0, "{}", ls.stderr);
    let lines: Vec<&str> = ls.stdout.lines().collect();
    assert!(
        lines[0].starts_with("ADDRESS") && lines[0].contains("EXPIRES"),
        "{}",
        ls.stdout
    );
    assert!(
        lines[1].contains("Blocked@Example.com")
            && lines[1].contains("asked us")
            && lines[1].contains("manual (admin-token)"),
        "{}",
        ls.stdout
    );
    let json = run(&["suppress", "ls", "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["scope"], "platform");
    assert_eq!(v["entries"][0]["source"]["by"], "admin-token");
    let yaml = run(&["suppress", "ls", "-o", "yaml", "--address", "blocked@example.com"]).await;
    assert!(yaml.stdout.contains("address: Blocked@Example.com"), "{}", yaml.stdout);
    assert_eq!(
        run(&["suppress", "ls", "--address", "nobody@example.com"]).await.code,
        3
    );
    assert_eq!(
        run(&["suppress", "add", "x@example.com", "--expires", "soon"])
            .await
            .code,
        2
    );
    let bad = run(&["suppress", "add", "not-an-address"]).await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("not an email address"), "{}", bad.stderr);

    // The relay refuses the address once its copy has the entry.
    let refused = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let t = send(
                relay.smtp_addr.unwrap(),
                None,
                false,
                None,
                "app@app.example",
                &["blocked@example.com"],
                b"Subject: x\r\n\r\nx\r\n",
            )
            .await
            .unwrap();
            if t.lines()
                .iter()
                .any(|l| l.starts_with("550 5.1.1") && l.contains("suppressed"))
            {
                break true;
            }
            if tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(refused);

    // Import (awkward addresses) into a namespace's list, export, import the export elsewhere:
    // the same CSV.
    let file = dir.path().join("in.csv");
    std::fs::write(
        &file,
        "address,reason\n\"\"\"a,b\"\"@example.com\",\"with, comma\"\nnoël@exemple.fr,\"quote \"\"here\"\"\"\n",
    )
    .unwrap();
    let file_arg = file.display().to_string();
    let imported = run(&["suppress", "import", &file_arg, "--namespace", "team-a"]).await;
    assert_eq!(imported.code, 0, "{}", imported.stderr);
    assert!(
        imported.stdout.contains("2 entries imported into team-a"),
        "{}",
        imported.stdout
    );
    let exported = run(&["suppress", "export", "-n", "team-a"]).await;
    assert_eq!(exported.code, 0, "{}", exported.stderr);
    assert!(
        exported.stdout.contains("\"\"\"a,b\"\"@example.com\""),
        "{}",
        exported.stdout
    );
    assert!(exported.stdout.contains("noël@exemple.fr"), "{}", exported.stdout);
    let out = dir.path().join("out.csv");
    std::fs::write(&out, &exported.stdout).unwrap();
    let out_arg = out.display().to_string();
    assert_eq!(run(&["suppress", "import", &out_arg, "-n", "team-b"]).await.code, 0);
    let again = run(&["suppress", "export", "-n", "team-b"]).await;
    assert_eq!(again.stdout, exported.stdout);

    let rm = run(&["suppress", "rm", "blocked@example.com"]).await;
    assert_eq!(rm.code, 0, "{}", rm.stderr);
    assert_eq!(run(&["suppress", "rm", "blocked@example.com"]).await.code, 3);
    assert!(run(&["suppress", "ls"]).await.stdout.contains("No entries."));
    relay.shutdown().await;
}
