//! Tenancy end to end (issue 14), with a real redis-server, real SMTP upstreams and the relay
//! reading the configuration the operator would write (compiled with platform namespace
//! `mailroute` and namespace labels): an AUTH user defined by a SenderQuota in `team-a` sends
//! as `team-a` (delivery log, events filter, metrics), is routed only by `team-a`'s and platform
//! routes (never by `team-b`'s `*` at priority 0), and is counted against the platform's
//! namespace quota for `team-a` together with every other sender of `team-a`; with
//! `--unattributed=refuse` an unattributed client gets the documented reply at MAIL FROM.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common::*;
use mailroute_api::{Manifests, Tenancy};
use mailroute_relay::config::Source;
use mailroute_relay::inbound::identity::{Unattributed, unknown_namespace};
use mailroute_relay::observe::dlog::{DeliveryEvent, EventResult};
use mailroute_testkit::smtp::client::{Transcript, send};
use mailroute_testkit::{RedisServer, Script, SmtpServer, TestPki};

const TOKEN: &str = "tenancy-token";

fn tenancy() -> Tenancy {
    let labels = |plan: &str| BTreeMap::from([("plan".to_string(), plan.to_string())]);
    Tenancy {
        platform_namespaces: Some(BTreeSet::from(["mailroute".to_string()])),
        namespace_labels: BTreeMap::from([
            ("mailroute".into(), BTreeMap::new()),
            ("team-a".into(), labels("basic")),
            ("team-b".into(), labels("pro")),
        ]),
    }
}

fn route(ns: &str, name: &str, port: u16, priority: i32, domains: &str) -> String {
    format!(
        "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: 127.0.0.1\n  port: {port}\n  tls: {{mode: none}}\n  priority: {priority}\n  match: {{recipientDomains: {domains}}}\n---\n"
    )
}

fn user(ns: &str, name: &str, password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-smtp, namespace: {ns}}}\nstringData: {{username: {name}, password: {password}}}\n---\napiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  sender: {{authUser: {name}}}\n  limits: {{perDay: 1000}}\n  credentialsSecretRef: {{name: {name}-smtp}}\n---\n"
    )
}

/// team-a's route for example.com, team-b's `*` at priority 0, the platform's `*` at 50, two
/// users in team-a, and the platform's cap of 2 messages a day for each `plan: basic` namespace.
fn manifests(up_a: u16, up_b: u16, up_p: u16) -> String {
    [
        route("team-a", "own", up_a, 10, "[example.com]"),
        route("team-b", "grab", up_b, 0, "['*']"),
        route("mailroute", "platform", up_p, 50, "['*']"),
        user("team-a", "shop", "pw-shop"),
        user("team-a", "billing", "pw-billing"),
        "apiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {name: plan-basic, namespace: mailroute}\nspec:\n  scope: Namespace\n  allowedNamespaces: {from: Selector, selector: {matchLabels: {plan: basic}}}\n  limits: {perDay: 2}\n  onExceeded: reject\n---\n".into(),
    ]
    .concat()
}

/// The ConfigMap and Secret contents the operator would write, as files the relay reads.
fn write_config(dir: &Path, yaml: &str) -> Source {
    let c = Manifests::from_yaml(yaml, "default").unwrap().compile_for(&tenancy());
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    let (config, secrets) = (dir.join("relay.json"), dir.join("secrets.json"));
    std::fs::write(&config, c.config.to_canonical_json()).unwrap();
    std::fs::write(&secrets, c.secrets.to_canonical_json()).unwrap();
    Source::Files {
        config,
        secrets: Some(secrets),
    }
}

async fn as_user(r: &TestRelay, pki: &TestPki, user: &str, password: &str, rcpt: &str) -> Transcript {
    let m = message(&format!("{user}-{rcpt}"), "");
    send(
        r.submission(),
        Some(pki.client_config()),
        true,
        Some((user, password)),
        "app@shop.example",
        &[rcpt],
        &m,
    )
    .await
    .expect("SMTP session")
}

async fn events(r: &TestRelay, query: &str) -> Vec<DeliveryEvent> {
    let base = format!("http://{}", r.relay.admin_addr.expect("admin listener"));
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/api/v1/events?{query}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    serde_json::from_value(v["events"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_user_sends_as_its_namespace_routed_and_counted_there_only() {
    let redis = RedisServer::start().unwrap();
    let pki = TestPki::new();
    let (up_a, up_b, up_p) = (
        SmtpServer::start(Script::new()).unwrap(),
        SmtpServer::start(Script::new()).unwrap(),
        SmtpServer::start(Script::new()).unwrap(),
    );
    let files = tempfile::tempdir().unwrap();
    let source = write_config(files.path(), &manifests(up_a.port(), up_b.port(), up_p.port()));
    let r = start_tls("", &redis.url(), &pki, |o| {
        o.source = source;
        o.admin_token = Some(TOKEN.into());
    })
    .await;

    // team-a's own route for example.com; the platform route for everything else. team-b's
    // `*` at priority 0 never sees team-a's mail.
    assert!(as_user(&r, &pki, "shop", "pw-shop", "a@example.com").await.delivered());
    assert!(
        as_user(&r, &pki, "shop", "pw-shop", "b@other.example")
            .await
            .delivered()
    );
    assert_eq!(up_a.wait_for(1, WAIT).await.unwrap()[0].rcpts, ["a@example.com"]);
    assert_eq!(up_p.wait_for(1, WAIT).await.unwrap()[0].rcpts, ["b@other.example"]);

    // The namespace quota (2 a day for team-a) counts every sender of team-a: another user of
    // team-a, within its own sender quota, is refused now.
    let t = as_user(&r, &pki, "billing", "pw-billing", "c@example.com").await;
    assert!(
        t.lines()
            .iter()
            .any(|l| l.starts_with("550 5.7.1 Sending quota exceeded: limit of 2 messages per day")),
        "{:?}",
        t.lines()
    );
    assert!(!t.delivered());

    // The delivery log names the namespace, and the events API filters by it.
    assert!(
        eventually(|| async { events(&r, "namespace=team-a&result=delivered").await.len() == 2 }).await,
        "{:?}",
        events(&r, "namespace=team-a").await
    );
    let all = events(&r, "namespace=team-a").await;
    assert!(all.iter().all(|e| e.namespace.as_deref() == Some("team-a")), "{all:?}");
    assert!(
        all.iter()
            .any(|e| e.result == EventResult::Rejected && e.auth_user.as_deref() == Some("billing"))
    );
    let routes: BTreeSet<_> = events(&r, "namespace=team-a&result=delivered")
        .await
        .into_iter()
        .filter_map(|e| e.route)
        .collect();
    assert_eq!(
        routes,
        BTreeSet::from(["mailroute/platform".into(), "team-a/own".into()])
    );
    assert!(events(&r, "namespace=team-b").await.is_empty());
    assert!(up_b.received().is_empty(), "team-b's route carried team-a's mail");

    // Metrics: one series per namespace.
    let m = r.relay.metrics();
    assert_eq!(
        m.messages_received
            .with_label_values(&["submission", "accepted", "team-a"])
            .get(),
        2
    );
    assert_eq!(
        m.quota_decisions
            .with_label_values(&["mailroute/plan-basic", "rejected", "team-a"])
            .get(),
        1
    );
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unattributed_mail_is_refused_at_mail_from_when_so_configured() {
    let redis = RedisServer::start().unwrap();
    let pki = TestPki::new();
    let (up_a, up_b, up_p) = (
        SmtpServer::start(Script::new()).unwrap(),
        SmtpServer::start(Script::new()).unwrap(),
        SmtpServer::start(Script::new()).unwrap(),
    );
    let files = tempfile::tempdir().unwrap();
    let source = write_config(files.path(), &manifests(up_a.port(), up_b.port(), up_p.port()));
    let r = start_tls("", &redis.url(), &pki, |o| {
        o.source = source;
        o.admin_token = Some(TOKEN.into());
        o.inbound.unattributed = Unattributed::Refuse;
    })
    .await;
    // 127.0.0.1 is inside the relay CIDRs, but nobody knows its namespace.
    let t = submit(r.smtp(), "app@app.example", &["x@example.com"], &message("anon", "")).await;
    // The reply to MAIL FROM; the session then ends without a transaction.
    assert!(
        t.lines().iter().any(|l| *l == unknown_namespace().to_string()),
        "{:?}",
        t.lines()
    );
    assert!(!t.delivered());
    assert!(
        eventually(|| async { events(&r, "namespace=-&result=rejected").await.len() == 1 }).await,
        "the refusal is logged as unattributed"
    );
    // An AUTH user is attributed by its credentials and still sends.
    assert!(as_user(&r, &pki, "shop", "pw-shop", "a@example.com").await.delivered());
    up_a.wait_for(1, WAIT).await.unwrap();
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unattributed_mail_takes_only_platform_routes_by_default() {
    let redis = RedisServer::start().unwrap();
    let (up_a, up_b, up_p) = (
        SmtpServer::start(Script::new()).unwrap(),
        SmtpServer::start(Script::new()).unwrap(),
        SmtpServer::start(Script::new()).unwrap(),
    );
    let files = tempfile::tempdir().unwrap();
    let source = write_config(files.path(), &manifests(up_a.port(), up_b.port(), up_p.port()));
    let r = start("", &redis.url(), |o| {
        o.source = source;
        o.admin_token = Some(TOKEN.into());
    })
    .await;
    let t = submit(r.smtp(), "app@app.example", &["x@example.com"], &message("anon", "")).await;
    assert!(t.delivered(), "{:?}", t.lines());
    assert_eq!(up_p.wait_for(1, WAIT).await.unwrap()[0].rcpts, ["x@example.com"]);
    assert!(up_a.received().is_empty() && up_b.received().is_empty());
    assert!(
        eventually(|| async { events(&r, "namespace=-&result=delivered").await.len() == 1 }).await,
        "logged as unattributed"
    );
    r.relay.shutdown().await;
}
