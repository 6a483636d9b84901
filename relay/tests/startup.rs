//! A relay started before its Redis is reachable waits for it instead of exiting (an exit adds
//! Kubernetes' crash-loop back-off to the outage): meanwhile `/healthz` answers 200 and
//! `/readyz` 503 with the reason; once Redis is up, the relay starts and accepts mail.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use crate::common::*;
use mailroute_testkit::{RedisServer, Script, SmtpServer};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let r = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.unwrap_or_default()))
}

#[tokio::test]
async fn a_relay_waits_for_an_unreachable_redis_and_reports_it_in_readyz() {
    let redis_port = free_port();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let up = SmtpServer::start(Script::new()).unwrap();
    let routes = route("up", up.port(), 10, &["*"]);
    let starting = tokio::spawn(async move {
        start(&routes, &format!("redis://127.0.0.1:{redis_port}"), |o| {
            o.admin_listen = Some(admin);
        })
        .await
    });

    // While Redis is down: alive, not ready, and the reason names the queue.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (ready, health) = loop {
        if let (Some(r), Some(h)) = (get(admin, "/readyz").await, get(admin, "/healthz").await) {
            break (r, h);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no admin endpoint while waiting for Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health.0, 200, "{health:?}");
    assert_eq!(ready.0, 503, "{ready:?}");
    assert!(ready.1.contains("waiting for the queue"), "{ready:?}");
    assert!(!starting.is_finished(), "the relay gave up while Redis was down");

    // Redis comes up on that port: the relay finishes starting and delivers.
    let _redis = RedisServer::builder().port(redis_port).start().unwrap();
    let r = tokio::time::timeout(Duration::from_secs(60), starting)
        .await
        .expect("the relay did not start once Redis was up")
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while get(admin, "/readyz").await.map(|r| r.0) != Some(200) {
        assert!(tokio::time::Instant::now() < deadline, "not ready after Redis came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = submit(r.smtp(), "app@app.example", &["user@example.com"], &message("late", "")).await;
    assert!(t.delivered(), "{t}");
    up.wait_for(1, WAIT).await.unwrap();
    r.relay.shutdown().await;
}

#[test]
fn a_malformed_queue_url_fails_at_once() {
    // Refused when the option is parsed, before the relay starts (and so never retried).
    let e = "redis://127.0.0.1:notaport"
        .parse::<mailroute_relay::queue::QueueUrl>()
        .expect_err("a malformed URL was accepted");
    assert!(e.to_string().contains("queue URL"), "{e}");
}
