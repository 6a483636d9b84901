//! Tenants' access to the relay's admin API against a real kube-apiserver (see tests/README.md):
//! the relay binary checks ServiceAccount tokens with TokenReview and SubjectAccessReview, as the
//! chart's relay ServiceAccount (its system:auth-delegator binding applied from the rendered
//! chart, its token from TokenRequest), and namespace viewers and editors hold the chart's
//! ClusterRoles through the `view`/`edit` aggregation the controller manager performs: events,
//! messages, quotas and suppression lists.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use mailroute_relay::observe::dlog::{DeliveryEvent, DeliveryLog, EventResult};
use mailroute_relay::queue::Queue;
use mailroute_relay::queue::message::{Job, MessageMeta};
use mailroute_relay::queue::redis::{DEFAULT_PREFIX, Durability, RedisQueue};
use mailroute_tests::k8s::{ControlPlane, Process, eventually, free_port, run, workspace_root};
use mailroute_tests::operator::binary;
use serde::Deserialize as _;

const WAIT: Duration = Duration::from_secs(120);
const ADMIN_TOKEN: &str = "cluster-admin-token-for-the-test";

/// The token of a fresh TokenRequest for ServiceAccount `ns/name` (created if missing).
async fn token(cp: &ControlPlane, ns: &str, name: &str) -> String {
    let admin = cp.admin_client().await.unwrap();
    let api = Api::<ServiceAccount>::namespaced(admin, ns);
    if api.get_opt(name).await.unwrap().is_none() {
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &sa).await.unwrap();
    }
    let kubeconfig = cp.service_account_kubeconfig(ns, name).await.unwrap();
    std::fs::read_to_string(kubeconfig)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap()
        .trim_matches('\'')
        .to_string()
}

/// Whether ServiceAccount `sa_ns/sa` may `verb` `resource`.mailroute.io in `ns` (asked as admin).
async fn allowed(
    cp: &ControlPlane,
    sa_ns: &str,
    sa: &str,
    verb: &str,
    resource: &str,
    ns: &str,
) -> anyhow::Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{sa_ns}:{sa}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{sa_ns}"),
            ]),
            resource_attributes: Some(ResourceAttributes {
                group: Some("mailroute.io".into()),
                namespace: Some(ns.into()),
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let out = Api::<SubjectAccessReview>::all(cp.admin_client().await?)
        .create(&PostParams::default(), &review)
        .await?;
    Ok(out.status.is_some_and(|s| s.allowed))
}

fn meta(id: &str, ns: &str) -> MessageMeta {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "received_at_ms": mailroute_relay::clock::now_ms(),
        "source_ip": "10.0.0.7",
        "listener": "smtp",
        "namespace": ns,
        "tls": false,
        "mail_from": format!("app@{ns}.example"),
        "rcpts": [format!("user@{ns}.example")],
        "size": 5,
    }))
    .unwrap()
}

/// A queued message of namespace `ns` (its one job due in a day: it stays queued) and its
/// `received` delivery-log record, as the relay writes them on accepting mail from `ns`.
async fn seed(queue: &RedisQueue, dlog: &DeliveryLog, id: &str, ns: &str) {
    let m = meta(id, ns);
    let due = mailroute_relay::clock::now_ms() + 86_400_000;
    queue
        .enqueue(&m, b"hello", &[(Job::new(id, 0), Some(due))])
        .await
        .unwrap();
    let mut ev = DeliveryEvent::new(
        mailroute_relay::clock::now(),
        EventResult::Received,
        id,
        &m.mail_from,
        &m.rcpts[0],
    );
    ev.namespace = Some(ns.into());
    dlog.record(&ev).await.unwrap();
}

struct AdminApi {
    http: reqwest::Client,
    base: String,
}

impl AdminApi {
    async fn call(&self, method: reqwest::Method, path: &str, token: &str) -> (u16, String) {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
    async fn get(&self, path: &str, token: &str) -> (u16, String) {
        self.call(reqwest::Method::GET, path, token).await
    }
    async fn delete(&self, path: &str, token: &str) -> (u16, String) {
        self.call(reqwest::Method::DELETE, path, token).await
    }
    async fn post(&self, path: &str, token: &str, body: serde_json::Value) -> (u16, String) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

/// The message ids of an events answer.
fn ids(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message_id"].as_str().unwrap().to_string())
        .collect()
}

/// Renders the chart's relay RBAC (tenant access on), applies it, returns the relay's
/// ServiceAccount and the rendered text.
fn apply_chart_rbac(cp: &ControlPlane, release: &str, ns: &str) -> (String, String) {
    let rendered = run(cp
        .helm()
        .args(["template", release])
        .arg(workspace_root().join("charts/mailroute"))
        .args([
            "--namespace",
            ns,
            "--show-only",
            "templates/relay-tenant-rbac.yaml",
            "--show-only",
            "templates/relay-serviceaccount.yaml",
            "--set",
            "image.tag=k8s-suite",
            "--set",
            "relay.adminApi.kubernetesAuth.enabled=true",
        ]))
    .unwrap();
    let mut sa = None;
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        let v = serde_json::Value::deserialize(doc).unwrap();
        if v["kind"] == "ServiceAccount" {
            sa = v["metadata"]["name"].as_str().map(str::to_string);
        }
    }
    let path = cp.dir.join(format!("{release}-relay-rbac.yaml"));
    std::fs::write(&path, &rendered).unwrap();
    run(cp.kubectl().args(["apply", "--server-side", "-n", ns, "-f"]).arg(&path)).unwrap();
    (sa.expect("the chart renders the relay's ServiceAccount"), rendered)
}

fn rolebinding(cp: &ControlPlane, ns: &str, name: &str, role: &str) {
    run(cp.kubectl().args([
        "create",
        "rolebinding",
        name,
        &format!("--clusterrole={role}"),
        &format!("--serviceaccount={ns}:{name}"),
        "-n",
        ns,
    ]))
    .unwrap();
}

fn start_relay(cp: &ControlPlane, redis_url: &str, token_file: &Path, ca_file: &Path, log: &str) -> (Process, u16) {
    let (smtp, admin) = (free_port().unwrap(), free_port().unwrap());
    let mut cmd = std::process::Command::new(binary("mailroute-relay").unwrap());
    cmd.env("RUST_LOG", "info").arg("run").args([
        "--queue".to_string(),
        redis_url.to_string(),
        format!("--smtp-listen=127.0.0.1:{smtp}"),
        "--submission-listen=".to_string(),
        "--smtps-listen=".to_string(),
        format!("--admin-listen=127.0.0.1:{admin}"),
        "--workers=0".to_string(),
        "--hostname=relay.test".to_string(),
        format!("--admin-token={ADMIN_TOKEN}"),
        "--admin-kubernetes-auth".to_string(),
        format!("--kubernetes-api-server={}", cp.server),
        format!("--kubernetes-token-file={}", token_file.display()),
        format!("--kubernetes-ca-file={}", ca_file.display()),
        // Long enough that the cache checks below cannot race an expiry on a busy machine.
        "--admin-kubernetes-cache-ttl=10m".to_string(),
        "--admin-kubernetes-deny-ttl=10m".to_string(),
    ]);
    (Process::start("relay", cmd, cp.dir.join(log)).unwrap(), admin)
}

#[tokio::test]
async fn tenants_read_and_cancel_only_their_namespaces_mail() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let relay_ns = cp.namespace("mailroute").await.unwrap();
    let team_a = cp.namespace("team-a").await.unwrap();
    let team_b = cp.namespace("team-b").await.unwrap();

    // The chart's RBAC: the relay's ServiceAccount with system:auth-delegator, and the
    // ClusterRoles aggregated into view and edit.
    let (relay_sa, rendered) = apply_chart_rbac(cp, &relay_ns, &relay_ns);
    assert!(rendered.contains("aggregate-to-view") && rendered.contains("aggregate-to-edit"));
    // Namespace viewers and editors, bound to Kubernetes' own roles only.
    rolebinding(cp, &team_a, "viewer", "view");
    rolebinding(cp, &team_a, "editor", "edit");
    rolebinding(cp, &team_b, "viewer", "view");
    let viewer_a = token(cp, &team_a, "viewer").await;
    let editor_a = token(cp, &team_a, "editor").await;
    let viewer_b = token(cp, &team_b, "viewer").await;
    // The aggregation controller copies the rules into view and edit, the authorizer sees the
    // bindings a moment later: wait until the API server itself says so.
    for (sa, verb, resource) in [
        ("viewer", "list", "deliveryevents"),
        ("viewer", "list", "quotausages"),
        ("editor", "get", "messages"),
        ("editor", "delete", "messages"),
        ("viewer", "list", "suppressions"),
        ("editor", "create", "suppressions"),
        ("editor", "delete", "suppressions"),
    ] {
        eventually(&format!("{sa} may {verb} {resource} in {team_a}"), WAIT, || async {
            Ok(allowed(cp, &team_a, sa, verb, resource, &team_a).await?.then_some(()))
        })
        .await
        .unwrap();
    }
    assert!(
        !allowed(cp, &team_a, "viewer", "delete", "messages", &team_a)
            .await
            .unwrap()
    );

    // The relay's own credentials, as the kubelet mounts them.
    let dir = cp.dir.join(format!("{relay_ns}-sa"));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, token(cp, &relay_ns, &relay_sa).await).unwrap();
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, &cp.ca_pem).unwrap();

    // Mail of both teams, queued and logged.
    let redis = mailroute_testkit::RedisServer::start().unwrap();
    let queue = RedisQueue::connect(
        &redis.url(),
        DEFAULT_PREFIX,
        Durability {
            replicas: 0,
            timeout: Duration::from_secs(1),
        },
    )
    .await
    .unwrap();
    let conn = redis.client().unwrap().get_connection_manager().await.unwrap();
    let dlog = DeliveryLog::redis(conn, DEFAULT_PREFIX).without_writer();
    seed(&queue, &dlog, "msg-a-1", &team_a).await;
    seed(&queue, &dlog, "msg-a-2", &team_a).await;
    seed(&queue, &dlog, "msg-b-1", &team_b).await;

    let (mut relay, admin_port) = start_relay(
        cp,
        &redis.url(),
        &token_file,
        &ca_file,
        &format!("{relay_ns}-relay.log"),
    );
    let api = AdminApi {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{admin_port}/api/v1"),
    };
    let outcome: anyhow::Result<()> = async {
        eventually("the relay's admin API", WAIT, || async {
            let r = reqwest::get(format!("http://127.0.0.1:{admin_port}/readyz")).await?;
            Ok((r.status() == 200).then_some(()))
        })
        .await?;
        let (a, b) = (team_a.as_str(), team_b.as_str());

        // Events: each viewer reads its own namespace, 403 for the other's, 400 without one.
        let (status, body) = api.get(&format!("/events?namespace={a}"), &viewer_a).await;
        anyhow::ensure!(status == 200, "{status} {body}");
        let mut got = ids(&body);
        got.sort();
        anyhow::ensure!(got == ["msg-a-1", "msg-a-2"], "team-a's viewer read {got:?}");
        let (status, body) = api.get(&format!("/events?namespace={b}"), &viewer_a).await;
        anyhow::ensure!(status == 403, "team-a's viewer reading team-b: {status} {body}");
        anyhow::ensure!(!body.contains("msg-b-1"), "{body}");
        let (status, body) = api.get("/events", &viewer_a).await;
        anyhow::ensure!(status == 400 && body.contains("?namespace="), "{status} {body}");
        let (status, body) = api.get("/events?namespace=-", &viewer_a).await;
        anyhow::ensure!(status == 400, "unattributed mail for a tenant: {status} {body}");
        let (status, body) = api.get(&format!("/events?namespace={b}"), &viewer_b).await;
        anyhow::ensure!(status == 200 && ids(&body) == ["msg-b-1"], "{status} {body}");
        let (status, body) = api.get(&format!("/events.csv?namespace={a}"), &viewer_a).await;
        // The CSV names recipients (user@<namespace>.example), not message ids.
        anyhow::ensure!(
            status == 200 && body.lines().count() == 3 && body.contains(a) && !body.contains(b),
            "{status} {body}"
        );
        let (status, _) = api.get(&format!("/events.csv?namespace={b}"), &viewer_a).await;
        anyhow::ensure!(status == 403, "CSV of team-b for team-a's viewer: {status}");

        // Quotas: the same rule on quotausages.
        let (status, body) = api.get(&format!("/quotas?namespace={a}"), &viewer_a).await;
        anyhow::ensure!(status == 200, "{status} {body}");
        let (status, body) = api.get(&format!("/quotas?namespace={b}"), &viewer_a).await;
        anyhow::ensure!(status == 403, "{status} {body}");
        let (status, body) = api.get("/quotas", &viewer_a).await;
        anyhow::ensure!(status == 400, "{status} {body}");

        // Suppression lists: editors add and remove in their namespace, viewers read it, nobody
        // touches another namespace's or (without the admin token) the platform's.
        let entry = serde_json::json!({"address": "gone@a.example"});
        let (status, body) = api
            .post(&format!("/suppressions?namespace={a}"), &editor_a, entry.clone())
            .await;
        anyhow::ensure!(
            status == 201 && body.contains(&format!("system:serviceaccount:{a}:editor")),
            "{status} {body}"
        );
        let (status, body) = api
            .post(&format!("/suppressions?namespace={a}"), &viewer_a, entry.clone())
            .await;
        anyhow::ensure!(status == 403, "view-bound add: {status} {body}");
        let (status, body) = api
            .post(&format!("/suppressions?namespace={b}"), &editor_a, entry.clone())
            .await;
        anyhow::ensure!(status == 403, "team-a's editor adding to team-b: {status} {body}");
        let (status, body) = api.post("/suppressions", &editor_a, entry).await;
        anyhow::ensure!(status == 400, "a tenant adding to the platform list: {status} {body}");
        let (status, body) = api.get(&format!("/suppressions?namespace={a}"), &viewer_a).await;
        anyhow::ensure!(status == 200 && body.contains("gone@a.example"), "{status} {body}");
        let (status, body) = api.get(&format!("/suppressions.csv?namespace={a}"), &viewer_a).await;
        anyhow::ensure!(status == 200 && body.contains("gone@a.example"), "{status} {body}");
        let (status, body) = api.get(&format!("/suppressions?namespace={b}"), &viewer_a).await;
        anyhow::ensure!(status == 403, "{status} {body}");
        let path = format!("/suppressions?namespace={a}&address=gone@a.example");
        let (status, body) = api.delete(&path, &viewer_a).await;
        anyhow::ensure!(status == 403, "view-bound remove: {status} {body}");
        let (status, body) = api.delete(&path, &editor_a).await;
        anyhow::ensure!(status == 200, "edit-bound remove: {status} {body}");

        // Messages: another namespace's looks exactly like one that does not exist.
        let (status, body) = api.get("/messages/msg-a-1", &viewer_a).await;
        anyhow::ensure!(status == 200 && body.contains(a), "{status} {body}");
        let (status_b, body_b) = api.get("/messages/msg-b-1", &viewer_a).await;
        let (status_none, body_none) = api.get("/messages/msg-none", &viewer_a).await;
        anyhow::ensure!(
            (status_b, &body_b) == (404, &body_none) && status_none == 404,
            "team-b's message {status_b} {body_b} vs none {status_none} {body_none}"
        );
        anyhow::ensure!(
            api.delete("/messages/msg-b-1", &editor_a).await.0 == 404,
            "team-a's editor cancelling team-b's message"
        );

        // Cancel: the viewer may not, the editor may.
        let (status, body) = api.delete("/messages/msg-a-1", &viewer_a).await;
        anyhow::ensure!(status == 403, "view-bound cancel: {status} {body}");
        let (status, body) = api.delete("/messages/msg-a-1", &editor_a).await;
        anyhow::ensure!(
            status == 200 && body.contains("\"cancelled\":true"),
            "edit-bound cancel: {status} {body}"
        );
        let view = queue.view("msg-a-1").await?;
        anyhow::ensure!(
            view.as_ref().is_none_or(|v| v.cancelled),
            "msg-a-1 still queued: {view:?}"
        );

        // Not a token the API server knows.
        let (status, _) = api.get(&format!("/events?namespace={a}"), "not-a-real-token").await;
        anyhow::ensure!(status == 401, "invalid token: {status}");
        let forged = format!("{viewer_a}x");
        let (status, _) = api.get(&format!("/events?namespace={a}"), &forged).await;
        anyhow::ensure!(status == 401, "altered token: {status}");

        // The admin token still sees everything, unfiltered.
        let (status, body) = api.get("/events", ADMIN_TOKEN).await;
        anyhow::ensure!(status == 200, "{status} {body}");
        let got = ids(&body);
        for id in ["msg-a-1", "msg-a-2", "msg-b-1"] {
            anyhow::ensure!(got.iter().any(|g| g == id), "the admin token misses {id}: {got:?}");
        }
        let (status, body) = api.get("/messages/msg-b-1", ADMIN_TOKEN).await;
        anyhow::ensure!(status == 200 && body.contains(b), "{status} {body}");
        let (status, _) = api.get("/quotas", ADMIN_TOKEN).await;
        anyhow::ensure!(status == 200);

        // Answers are cached: with the relay's own credentials broken, what it already asked
        // is answered from memory (both ways); a new question is 503 with Retry-After; the
        // token file is read again at each call (the kubelet rotates it).
        let relay_token = std::fs::read_to_string(&token_file)?;
        std::fs::write(&token_file, "not-the-relays-token")?;
        let (status, body) = api.get(&format!("/events?namespace={a}"), &viewer_a).await;
        anyhow::ensure!(status == 200, "cached allow: {status} {body}");
        let (status, _) = api.get(&format!("/events?namespace={b}"), &viewer_a).await;
        anyhow::ensure!(status == 403, "cached deny: {status}");
        let (status, _) = api.get(&format!("/events?namespace={a}"), "not-a-real-token").await;
        anyhow::ensure!(status == 401, "cached unknown token: {status}");
        let resp = api
            .http
            .get(format!("{}/quotas?namespace={b}", api.base))
            .bearer_auth(&viewer_b)
            .send()
            .await?;
        anyhow::ensure!(
            resp.status() == 503 && resp.headers().contains_key("retry-after"),
            "an unanswered review: {resp:?}"
        );
        std::fs::write(&token_file, relay_token)?;
        let (status, body) = api.get(&format!("/quotas?namespace={b}"), &viewer_b).await;
        anyhow::ensure!(status == 200, "after the token file came back: {status} {body}");

        // No token reached the relay's log.
        let log = relay.log_text();
        for t in [&viewer_a, &editor_a, &viewer_b] {
            anyhow::ensure!(!log.contains(t.as_str()), "a token in the relay's log");
        }
        Ok(())
    }
    .await;
    let tail = relay.log_tail(40);
    relay.kill();
    if let Err(e) = outcome {
        panic!("{e:#}\nrelay log:\n{tail}");
    }
    eprintln!("tenant admin API test took {:?}", started.elapsed());
}

#[tokio::test]
async fn tenants_act_in_bulk_on_their_namespaces_queue_only() {
    let cp = ControlPlane::shared();
    let relay_ns = cp.namespace("mailroute").await.unwrap();
    let team_a = cp.namespace("team-a").await.unwrap();
    let team_b = cp.namespace("team-b").await.unwrap();
    let (relay_sa, _) = apply_chart_rbac(cp, &relay_ns, &relay_ns);
    rolebinding(cp, &team_a, "viewer", "view");
    rolebinding(cp, &team_a, "editor", "edit");
    let viewer_a = token(cp, &team_a, "viewer").await;
    let editor_a = token(cp, &team_a, "editor").await;
    for (sa, verb) in [("viewer", "list"), ("editor", "delete"), ("editor", "update")] {
        eventually(&format!("{sa} may {verb} messages in {team_a}"), WAIT, || async {
            Ok(allowed(cp, &team_a, sa, verb, "messages", &team_a).await?.then_some(()))
        })
        .await
        .unwrap();
    }
    let dir = cp.dir.join(format!("{relay_ns}-sa"));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, token(cp, &relay_ns, &relay_sa).await).unwrap();
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, &cp.ca_pem).unwrap();

    let redis = mailroute_testkit::RedisServer::start().unwrap();
    let queue = RedisQueue::connect(
        &redis.url(),
        DEFAULT_PREFIX,
        Durability {
            replicas: 0,
            timeout: Duration::from_secs(1),
        },
    )
    .await
    .unwrap();
    let conn = redis.client().unwrap().get_connection_manager().await.unwrap();
    let dlog = DeliveryLog::redis(conn, DEFAULT_PREFIX).without_writer();
    seed(&queue, &dlog, "bulk-a-1", &team_a).await;
    seed(&queue, &dlog, "bulk-a-2", &team_a).await;
    seed(&queue, &dlog, "bulk-b-1", &team_b).await;

    let (mut relay, admin_port) = start_relay(cp, &redis.url(), &token_file, &ca_file, &format!("{relay_ns}-bulk.log"));
    let api = AdminApi {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{admin_port}/api/v1"),
    };
    let post = |path: String, token: String| {
        let api = &api;
        async move { api.call(reqwest::Method::POST, &path, &token).await }
    };
    let outcome: anyhow::Result<()> = async {
        eventually("the relay's admin API", WAIT, || async {
            let r = reqwest::get(format!("http://127.0.0.1:{admin_port}/readyz")).await?;
            Ok((r.status() == 200).then_some(()))
        })
        .await?;
        let (a, b) = (team_a.as_str(), team_b.as_str());
        let total = |body: &str| -> u64 {
            serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["total"].as_u64())
                .unwrap_or(u64::MAX)
        };

        // Listing: its own namespace only, and it must name it.
        let (status, body) = api.get(&format!("/queue?namespace={a}"), &viewer_a).await;
        anyhow::ensure!(
            status == 200 && total(&body) == 2 && !body.contains("bulk-b-1"),
            "{status} {body}"
        );
        let (status, body) = api.get(&format!("/queue?namespace={b}"), &viewer_a).await;
        anyhow::ensure!(status == 403, "team-a's viewer listing team-b: {status} {body}");
        let (status, body) = api.get("/queue", &viewer_a).await;
        anyhow::ensure!(status == 400 && body.contains("?namespace="), "{status} {body}");

        // A viewer may not cancel; an editor may not act on another namespace's mail.
        let (status, body) = post(format!("/queue/cancel?namespace={a}"), viewer_a.clone()).await;
        anyhow::ensure!(status == 403, "view-bound bulk cancel: {status} {body}");
        let (status, body) = post(format!("/queue/cancel?namespace={b}"), editor_a.clone()).await;
        anyhow::ensure!(
            status == 403,
            "team-a's editor cancelling team-b's mail: {status} {body}"
        );
        let (status, body) = post(
            format!("/queue/hold?domain={b}.example&namespace={b}"),
            editor_a.clone(),
        )
        .await;
        anyhow::ensure!(status == 403, "team-a's editor holding team-b's mail: {status} {body}");
        let (status, body) = post(format!("/queue/retry?domain={b}.example"), editor_a.clone()).await;
        anyhow::ensure!(status == 400, "a tenant's retry without its namespace: {status} {body}");

        // Its own: a hold scoped to its namespace, and a cancel that touches its mail only.
        let (status, body) = post(
            format!("/queue/hold?domain={a}.example&namespace={a}"),
            editor_a.clone(),
        )
        .await;
        anyhow::ensure!(status == 200 && body.contains("\"touched\":2"), "{status} {body}");
        let (status, body) = api.get("/holds", ADMIN_TOKEN).await;
        let want = format!("\"namespace\":\"{a}\"");
        anyhow::ensure!(status == 200 && body.contains(&want), "{status} {body}");
        let (status, body) = post(format!("/queue/cancel?namespace={a}"), editor_a.clone()).await;
        anyhow::ensure!(status == 200 && body.contains("\"touched\":2"), "{status} {body}");
        anyhow::ensure!(queue.view("bulk-b-1").await?.is_some(), "team-b's mail was touched");
        let (_, body) = api.get("/queue", ADMIN_TOKEN).await;
        anyhow::ensure!(total(&body) == 1 && body.contains("bulk-b-1"), "{body}");
        let (status, body) = api
            .get(&format!("/events?namespace={a}&result=cancelled"), ADMIN_TOKEN)
            .await;
        let actor = format!("\"actor\":\"system:serviceaccount:{a}:editor\"");
        anyhow::ensure!(status == 200 && body.matches(&actor).count() == 2, "{status} {body}");
        Ok(())
    }
    .await;
    let tail = relay.log_tail(40);
    relay.kill();
    if let Err(e) = outcome {
        panic!("{e:#}\nrelay log:\n{tail}");
    }
}
