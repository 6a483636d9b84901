//! Bulk queue control end to end: real relays sharing a real Redis, real SMTP in and out. Cancel
//! by filter across two relays, retry now, hold and release of a recipient domain, a hold lapsing
//! at the maximum hold time, and a route suspended in its SmtpRoute spec.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use mailroute_testkit::smtp::client::SmtpClient;
use mailroute_testkit::{RedisServer, Script, SmtpServer};
use serde_json::Value;

const TOKEN: &str = "queue-control-token";

fn tweak(o: &mut mailroute_relay::server::RelayOptions) {
    o.admin_token = Some(TOKEN.into());
    o.hold_refresh = Duration::from_millis(100);
}

fn base(r: &TestRelay) -> String {
    format!("http://{}/api/v1", r.relay.admin_addr.expect("admin listener"))
}

async fn call(method: reqwest::Method, url: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("http");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn post(r: &TestRelay, path: &str) -> Value {
    let (status, v) = call(reqwest::Method::POST, &format!("{}{path}", base(r))).await;
    assert_eq!(status, 200, "POST {path}: {v}");
    v
}

/// How many jobs `GET /queue?<query>` counts.
async fn total(r: &TestRelay, query: &str) -> u64 {
    let (status, v) = call(reqwest::Method::GET, &format!("{}/queue?limit=1&{query}", base(r))).await;
    assert_eq!(status, 200, "{v}");
    v["total"].as_u64().expect("total")
}

/// Polls `f` for up to `wait`, panicking with `what` when it never holds.
async fn until<F, Fut>(what: &str, wait: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every delivery-log event of `query`, following the cursor.
async fn events(r: &TestRelay, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let url = format!("{}/events?limit=1000&{query}{cursor}", base(r));
        let (status, v) = call(reqwest::Method::GET, &url).await;
        assert_eq!(status, 200, "{v}");
        out.extend(v["events"].as_array().cloned().unwrap_or_default());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// Sends `n` one-recipient messages from `from` over `sessions` parallel SMTP sessions, many
/// transactions per session; recipient `i` is `rcpt(i)`.
async fn submit_many(addr: SocketAddr, from: &str, n: usize, sessions: usize, rcpt: fn(usize) -> String) {
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let from = from.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut c = SmtpClient::connect(addr).await.expect("connect");
            c.set_timeout(Duration::from_secs(60));
            assert!(c.ehlo("client.test").await.expect("ehlo").is_positive());
            for i in (s..n).step_by(sessions) {
                assert!(c.cmd(&format!("MAIL FROM:<{from}>")).await.expect("mail").is_positive());
                assert!(
                    c.cmd(&format!("RCPT TO:<{}>", rcpt(i)))
                        .await
                        .expect("rcpt")
                        .is_positive()
                );
                let body = format!("From: <{from}>\r\nSubject: bulk {i}\r\n\r\nbody {i}\r\n");
                let reply = c.data(body.as_bytes()).await.expect("data");
                assert!(reply.is_positive(), "message {i}: {reply:?}");
            }
            let _ = c.quit().await;
        }));
    }
    for t in tasks {
        t.await.expect("submitter");
    }
}

async fn metric(r: &TestRelay, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", r.relay.admin_addr.expect("admin")))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_cancel_by_sender_across_two_relays_touches_exactly_those() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let routes = route("up", up.port(), 10, &["*"]);
    let a = start(&routes, &redis.url(), tweak).await;
    let b = start(&routes, &redis.url(), tweak).await;

    // The route is held: everything queues behind it.
    let v = post(&a, "/queue/hold?route=mail/up").await;
    assert_eq!(v["hold"]["by"], "admin-token");
    // Each relay reads the holds through its own cache; reading them here refreshes it.
    for r in [&a, &b] {
        let (status, v) = call(reqwest::Method::GET, &format!("{}/holds", base(r))).await;
        assert_eq!((status, v["holds"].as_array().map(Vec::len)), (200, Some(1)), "{v}");
    }

    const BULK: usize = 10_000;
    const KEEP: usize = 20;
    tokio::join!(
        submit_many(a.smtp(), "bulk@shop.example", BULK / 2, 4, |i| format!(
            "a{i}@example.com"
        )),
        submit_many(b.smtp(), "bulk@shop.example", BULK / 2, 4, |i| format!(
            "b{i}@example.com"
        )),
        submit_many(a.smtp(), "keep@shop.example", KEEP / 2, 1, |i| format!(
            "ka{i}@example.com"
        )),
        submit_many(b.smtp(), "keep@shop.example", KEEP / 2, 1, |i| format!(
            "kb{i}@example.com"
        )),
    );
    // Every job reaches the held set (the workers of both relays put them there).
    until("every job held", Duration::from_secs(300), || async {
        metric(&a, "mailroute_queue_held_jobs").await == Some((BULK + KEEP) as f64)
    })
    .await;
    assert_eq!(up.received().len(), 0, "a held route delivered mail");
    assert_eq!(total(&b, "sender=bulk@shop.example").await, BULK as u64);
    assert_eq!(total(&b, "sender=keep@shop.example&state=held").await, KEEP as u64);

    // A cancel without a filter is refused.
    let (status, v) = call(reqwest::Method::POST, &format!("{}/queue/cancel", base(&a))).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap_or_default().contains("all=true"), "{v}");

    let v = post(&b, "/queue/cancel?sender=bulk@shop.example").await;
    assert_eq!(
        (v["touched"].as_u64(), v["in_flight"].as_u64()),
        (Some(BULK as u64), Some(0)),
        "{v}"
    );
    assert_eq!(total(&a, "").await, KEEP as u64);
    assert_eq!(total(&a, "sender=bulk@shop.example").await, 0);

    // Released, the other sender's mail goes, and nothing else.
    let v = post(&a, "/queue/release?route=mail/up").await;
    assert_eq!(v["touched"].as_u64(), Some(KEEP as u64), "{v}");
    until("the kept mail delivered", WAIT, || async {
        up.received().len() >= KEEP
    })
    .await;
    until("the queue empty", WAIT, || async {
        metric(&a, "mailroute_queue_messages").await == Some(0.0)
    })
    .await;
    let got = up.received();
    assert_eq!(got.len(), KEEP);
    assert!(got.iter().all(|m| m.mail_from == "keep@shop.example"));

    // One `cancelled` record per cancelled recipient, naming who did it.
    let cancelled = events(&a, "result=cancelled").await;
    assert_eq!(cancelled.len(), BULK);
    assert!(
        cancelled
            .iter()
            .all(|e| e["actor"] == "admin-token" && e["envelope_from"] == "bulk@shop.example")
    );
    let released = events(&a, "result=released").await;
    assert_eq!(released.len(), KEEP);
    assert!(released.iter().all(|e| e["actor"] == "admin-token"));
    assert!(metric(&b, "mailroute_queue_action_jobs_total{action=\"cancel\"}").await == Some(BULK as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_now_sends_a_deferred_message_at_once() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new().fail_then_accept(1, "451 4.3.0 Try again later")).unwrap();
    // An hour between attempts: without the retry the second would come much later.
    let routes = route("up", up.port(), 10, &["*"]).replace(
        "  priority: 10\n",
        "  priority: 10\n  retry: {interval: 1h, lifetime: 5d}\n",
    );
    let r = start(&routes, &redis.url(), tweak).await;
    assert!(
        submit(r.smtp(), "app@app.example", &["user@example.com"], &message("r", ""))
            .await
            .delivered()
    );
    until("the first attempt deferred", WAIT, || async {
        !events(&r, "result=deferred").await.is_empty()
    })
    .await;
    assert_eq!(total(&r, "state=scheduled").await, 1);
    assert_eq!(up.received().len(), 0);

    // Ready jobs are not touched by a retry; the scheduled one is.
    let v = post(&r, "/queue/retry?domain=example.com").await;
    assert_eq!(v["touched"].as_u64(), Some(1), "{v}");
    until("delivered at once", WAIT, || async { up.received().len() == 1 }).await;
    let retried = events(&r, "result=retried").await;
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0]["actor"], "admin-token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_domain_is_not_attempted_nor_expired_and_goes_after_release() {
    let redis = RedisServer::start().unwrap();
    // The first attempt to the held domain is deferred, so its lifetime runs; then the upstream
    // accepts everything.
    let up = SmtpServer::start(Script::new().fail_then_accept(1, "451 4.3.0 Try again later")).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), tweak).await;

    // Lifetime 3 s, retried every 1 s.
    let headers = "X-Mailroute-Expire: 3s\r\nX-Mailroute-Retry-Interval: 1s\r\n";
    assert!(
        submit(
            r.smtp(),
            "app@app.example",
            &["user@held.example"],
            &message("h", headers)
        )
        .await
        .delivered()
    );
    until("the first attempt deferred", WAIT, || async {
        !events(&r, "result=deferred").await.is_empty()
    })
    .await;
    let v = post(&r, "/queue/hold?domain=held.example").await;
    assert_eq!(v["hold"]["rule"]["domain"], "held.example", "{v}");
    // Deferred a second ago, the job may be ready or in flight at this moment; the worker holds
    // it whatever state it was in.
    until("the message held", WAIT, || async {
        total(&r, "state=held").await == 1
    })
    .await;

    // Other domains still go.
    assert!(
        submit(r.smtp(), "app@app.example", &["user@free.example"], &message("f", ""))
            .await
            .delivered()
    );
    until("free.example delivered", WAIT, || async {
        up.received().iter().any(|m| m.rcpts == ["user@free.example"])
    })
    .await;

    // Past its lifetime while held: still queued, not attempted, not expired.
    let received_ms = mailroute_relay::clock::now_ms();
    until("the message's lifetime over", WAIT, || async {
        mailroute_relay::clock::now_ms() > received_ms + 4_000
    })
    .await;
    assert_eq!(total(&r, "state=held&domain=held.example").await, 1);
    assert!(!up.received().iter().any(|m| m.rcpts == ["user@held.example"]));
    assert!(events(&r, "result=expired").await.is_empty());
    assert_eq!(up.attempts(), 2, "the held message was attempted again");

    let v = post(&r, "/queue/release?domain=held.example").await;
    assert_eq!(v["touched"].as_u64(), Some(1), "{v}");
    until("held.example delivered after release", WAIT, || async {
        up.received().iter().any(|m| m.rcpts == ["user@held.example"])
    })
    .await;
    assert!(events(&r, "result=expired").await.is_empty());
    let (status, v) = call(
        reqwest::Method::POST,
        &format!("{}/queue/release?domain=held.example", base(&r)),
    )
    .await;
    assert_eq!(status, 404, "no such hold any more: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_lapses_at_the_maximum_hold_time() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        tweak(o);
        o.max_hold = Duration::from_secs(3);
    })
    .await;
    // Asked for a day; the relay's maximum (3 s) wins.
    let v = post(&r, "/queue/hold?sender=app@app.example&max=24h").await;
    let (since, until_ms) = (
        v["hold"]["since_ms"].as_i64().unwrap(),
        v["hold"]["until_ms"].as_i64().unwrap(),
    );
    assert_eq!(until_ms - since, 3_000, "{v}");
    assert!(
        submit(r.smtp(), "app@app.example", &["user@example.com"], &message("l", ""))
            .await
            .delivered()
    );
    until("the message held", WAIT, || async {
        total(&r, "state=held").await == 1
    })
    .await;
    assert_eq!(up.received().len(), 0);
    until("delivered once the hold lapsed", WAIT, || async {
        up.received().len() == 1
    })
    .await;
    assert!(
        mailroute_relay::clock::now_ms() >= until_ms,
        "delivered before the hold lapsed"
    );
    let released = events(&r, "result=released").await;
    assert_eq!(released.len(), 1, "{released:?}");
    let (_, v) = call(reqwest::Method::GET, &format!("{}/holds", base(&r))).await;
    assert_eq!(
        v["holds"].as_array().map(Vec::len),
        Some(0),
        "a lapsed hold is not listed: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_route_holds_its_mail_until_unsuspended() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let suspended =
        route("up", up.port(), 10, &["*"]).replace("  priority: 10\n", "  priority: 10\n  suspended: true\n");
    let r = start(&suspended, &redis.url(), tweak).await;
    until("the spec's hold", WAIT, || async {
        let (_, v) = call(reqwest::Method::GET, &format!("{}/holds", base(&r))).await;
        v["holds"][0]["source"] == "spec"
    })
    .await;
    assert!(
        submit(r.smtp(), "app@app.example", &["user@example.com"], &message("s", ""))
            .await
            .delivered()
    );
    until("the message held", WAIT, || async {
        total(&r, "state=held&route=mail/up").await == 1
    })
    .await;
    assert_eq!(up.received().len(), 0);
    let held = events(&r, "result=held").await;
    assert_eq!(held[0]["actor"], "SmtpRoute mail/up (spec.suspended)");

    // GitOps unsuspends the route: the relay reloads its configuration and releases the mail.
    std::fs::write(r.dir.path().join("routes.yaml"), route("up", up.port(), 10, &["*"])).unwrap();
    until("delivered after unsuspending", WAIT, || async {
        up.received().len() == 1
    })
    .await;
    let (_, v) = call(reqwest::Method::GET, &format!("{}/holds", base(&r))).await;
    assert_eq!(v["holds"].as_array().map(Vec::len), Some(0), "{v}");
}
