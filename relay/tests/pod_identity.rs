//! Sender identity by pod IP in real sessions (issue 14), with a real redis-server holding the
//! map the operator publishes (written here by hand in its wire form, `mailroute_api::podmap`)
//! and real SMTP upstreams: a client whose address the map gives to `team-a` sends as
//! `team-a` (delivery log with its ServiceAccount, routed by `team-a`'s own route); once the
//! operator's heartbeat has run out the same client is unattributed (refused under
//! `--unattributed=refuse`); the address given to `team-b` in one published change sends as
//! `team-b`, never again as `team-a`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common::*;
use mailroute_api::podmap::{Entry, Keys};
use mailroute_api::{Manifests, Tenancy};
use mailroute_relay::config::Source;
use mailroute_relay::inbound::identity::{Unattributed, unknown_namespace};
use mailroute_relay::observe::dlog::DeliveryEvent;
use mailroute_testkit::{RedisServer, Script, SmtpServer};

const TOKEN: &str = "pod-identity-token";
const PREFIX: &str = "{mailroute}:";

/// team-a's own route for example.com, the platform's `*` (namespace `mailroute`).
fn write_config(dir: &Path, up_a: u16, up_p: u16) -> Source {
    let route = |ns: &str, name: &str, port: u16, priority: i32, domains: &str| {
        format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: 127.0.0.1\n  port: {port}\n  tls: {{mode: none}}\n  priority: {priority}\n  match: {{recipientDomains: {domains}}}\n---\n"
        )
    };
    let yaml = route("team-a", "own", up_a, 10, "[example.com]") + &route("mailroute", "platform", up_p, 50, "['*']");
    let tenancy = Tenancy {
        platform_namespaces: Some(BTreeSet::from(["mailroute".to_string()])),
        namespace_labels: BTreeMap::from([
            ("mailroute".into(), BTreeMap::new()),
            ("team-a".into(), BTreeMap::new()),
            ("team-b".into(), BTreeMap::new()),
        ]),
    };
    let c = Manifests::from_yaml(&yaml, "default").unwrap().compile_for(&tenancy);
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    let (config, secrets) = (dir.join("relay.json"), dir.join("secrets.json"));
    std::fs::write(&config, c.config.to_canonical_json()).unwrap();
    std::fs::write(&secrets, c.secrets.to_canonical_json()).unwrap();
    Source::Files {
        config,
        secrets: Some(secrets),
    }
}

fn pod(ns: &str, uid: &str) -> String {
    Entry::Pod {
        namespace: ns.into(),
        service_account: "mailer".into(),
        pod_uid: uid.into(),
    }
    .encode()
}

/// One published change as the operator's writer makes it: the hash, the generation and the
/// heartbeat in one transaction.
async fn publish(redis: &RedisServer, ip: &str, entry: &str, heartbeat_ms: u64) {
    let keys = Keys::new(PREFIX);
    let mut c = redis_connection(redis).await;
    redis::pipe()
        .atomic()
        .hset(&keys.ips, ip, entry)
        .ignore()
        .incr(&keys.generation, 1)
        .ignore()
        .cmd("SET")
        .arg(&keys.heartbeat)
        .arg(1)
        .arg("PX")
        .arg(heartbeat_ms)
        .ignore()
        .query_async::<()>(&mut c)
        .await
        .unwrap();
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

fn sample(r: &TestRelay, name: &str) -> Option<f64> {
    r.relay
        .metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_ip_sends_as_its_namespace_until_the_map_goes_stale_and_as_its_new_owner_after() {
    let redis = RedisServer::start().unwrap();
    let (up_a, up_p) = (
        SmtpServer::start(Script::new()).unwrap(),
        SmtpServer::start(Script::new()).unwrap(),
    );
    let files = tempfile::tempdir().unwrap();
    let source = write_config(files.path(), up_a.port(), up_p.port());
    let r = start("", &redis.url(), |o| {
        o.source = source;
        o.admin_token = Some(TOKEN.into());
        o.inbound.unattributed = Unattributed::Refuse;
        o.pod_identity_poll = Some(std::time::Duration::from_millis(100));
    })
    .await;

    // The test client connects from 127.0.0.1: the operator publishes it as a team-a pod.
    publish(&redis, "127.0.0.1", &pod("team-a", "a1"), 60_000).await;
    assert!(
        eventually(|| async { sample(&r, "mailroute_pod_identity_map_current") == Some(1.0) }).await,
        "the relay never trusted the published map"
    );
    let t = submit(r.smtp(), "app@app.example", &["x@example.com"], &message("team-a", "")).await;
    assert!(t.delivered(), "{:?}", t.lines());
    // Routed by team-a's own route, not the platform's.
    up_a.wait_for(1, WAIT).await.unwrap();
    assert!(up_p.received().is_empty());
    assert!(eventually(|| async { events(&r, "namespace=team-a&result=delivered").await.len() == 1 }).await);
    let received = events(&r, "namespace=team-a&result=received").await;
    assert!(
        received.len() == 1 && received[0].service_account.as_deref() == Some("mailer"),
        "{received:?}"
    );

    // The operator stops vouching (gone, or its Pod watch broke): the heartbeat runs out and
    // the same client is unattributed, refused under --unattributed=refuse.
    let keys = Keys::new(PREFIX);
    let mut c = redis_connection(&redis).await;
    let _: () = redis::cmd("PEXPIRE")
        .arg(&keys.heartbeat)
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(eventually(|| async { sample(&r, "mailroute_pod_identity_map_current") == Some(0.0) }).await);
    let t = submit(r.smtp(), "app@app.example", &["x@example.com"], &message("stale", "")).await;
    assert!(
        t.lines().iter().any(|l| *l == unknown_namespace().to_string()),
        "{:?}",
        t.lines()
    );
    assert!(!t.delivered());

    // The address now belongs to a team-b pod (the old pod's delete and the new one in one
    // published change): it sends as team-b, through the platform route only.
    publish(&redis, "127.0.0.1", &pod("team-b", "b1"), 60_000).await;
    assert!(eventually(|| async { sample(&r, "mailroute_pod_identity_map_current") == Some(1.0) }).await);
    let t = submit(r.smtp(), "app@app.example", &["y@example.com"], &message("team-b", "")).await;
    assert!(t.delivered(), "{:?}", t.lines());
    up_p.wait_for(1, WAIT).await.unwrap();
    assert!(eventually(|| async { events(&r, "namespace=team-b&result=delivered").await.len() == 1 }).await);
    assert_eq!(up_a.received().len(), 1, "team-a's route saw team-b's mail");
    assert_eq!(events(&r, "namespace=team-a&result=received").await.len(), 1);

    // Lookups are counted without any address in a label.
    let text = r.relay.metrics().encode();
    assert!(
        text.contains("mailroute_pod_identity_lookups_total{result=\"attributed\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("mailroute_pod_identity_lookups_total{result=\"unattributed\"} 1"),
        "{text}"
    );
    assert!(!text.contains("127.0.0.1"), "an address in a label:\n{text}");
    r.relay.shutdown().await;
}
