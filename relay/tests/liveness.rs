//! `/healthz` tells a wedged relay from a busy one: a delivery job that outlives every deadline
//! turns it 503 with the reason, while a delivery loop waiting for a slot held by a job that is
//! legitimately waiting on its upstream stays 200.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use mailroute_relay::outbound::delivery::{DnsError, MxRecord, MxResolver};
use mailroute_relay::server::{Overrides, Relay};
use mailroute_testkit::{Behaviour, Gate, RedisServer, Script, SmtpServer};

use crate::common::*;

/// A resolver whose MX lookups never answer: a call without a timeout, the kind of bug that
/// wedges a delivery job for good.
struct SilentResolver;

impl MxResolver for SilentResolver {
    fn mx<'a>(&'a self, _domain: &'a str) -> BoxFuture<'a, Result<Vec<MxRecord>, DnsError>> {
        Box::pin(std::future::pending())
    }

    fn ips<'a>(&'a self, _host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, DnsError>> {
        Box::pin(std::future::pending())
    }
}

async fn healthz(r: &Relay) -> (u16, String) {
    let base = format!("http://{}", r.admin_addr.expect("admin listener"));
    let resp = reqwest::get(format!("{base}/healthz")).await.expect("healthz answers");
    (resp.status().as_u16(), resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_job_that_outlives_every_deadline_turns_healthz_503() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mx = "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {name: mx, namespace: mail}\nspec:\n  delivery: mx\n  match: {recipientDomains: [\"*\"]}\n";
    let mut o = options(dir.path(), mx, &redis.url());
    o.liveness_max_silence = Duration::from_secs(2);
    o.job_stuck_after = Duration::from_secs(3);
    let overrides = Overrides {
        resolver: Some(Arc::new(SilentResolver)),
        ..Default::default()
    };
    let relay = Relay::start_with(o, overrides).await.expect("relay starts");
    assert_eq!(healthz(&relay).await, (200, "ok".into()));

    let t = submit(
        relay.smtp_addr.unwrap(),
        "app@app.example",
        &["user@example.com"],
        &message("stuck", ""),
    )
    .await;
    assert!(t.delivered(), "{t}");
    let wedged = eventually(|| async { healthz(&relay).await.0 == 503 }).await;
    let (code, body) = healthz(&relay).await;
    assert!(wedged, "healthz never reported the stuck job: {code} {body}");
    assert!(body.contains("a delivery job running for over 3s"), "{body}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_slot_held_by_a_job_at_a_slow_upstream_is_alive() {
    let redis = RedisServer::start().unwrap();
    let gate = Gate::new();
    let up = SmtpServer::start(Script::new().default_behaviour(Behaviour::AcceptWhenOpen(gate.clone()))).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.workers = 1;
        o.liveness_max_silence = Duration::from_secs(1);
        o.job_stuck_after = Duration::from_secs(600);
    })
    .await;
    for n in ["first", "second"] {
        let t = submit(r.smtp(), "app@app.example", &["user@example.com"], &message(n, "")).await;
        assert!(t.delivered(), "{t}");
    }
    // The only slot is held by the first job, its 250 held by the upstream; the delivery loop
    // waits for the slot. Four times the allowed silence, healthz must stay 200.
    assert!(
        eventually(|| async { gate.waiting() >= 1 }).await,
        "the upstream holds a delivery"
    );
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < watch_until {
        assert_eq!(
            healthz(&r.relay).await,
            (200, "ok".into()),
            "a busy relay is not a wedged one"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gate.open();
    assert!(
        eventually(|| async { up.received().len() == 2 }).await,
        "both delivered once the upstream answers"
    );
    assert_eq!(healthz(&r.relay).await, (200, "ok".into()));
    r.relay.shutdown().await;
}
