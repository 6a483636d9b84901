//! What the queue owes mail it accepted: a gap in the configuration defers instead of bouncing,
//! a cancel takes effect at once, a message's log records are in event order, and the admin API
//! says 503 with a reason while Redis is down.

use std::time::Duration;

use crate::common::*;
use mailroute_relay::observe::dlog::{DeliveryEvent, EventFilter, EventResult};
use mailroute_testkit::{Behaviour, RedisServer, Script, SmtpServer, Stage};

/// Every log record of one message, in log order.
async fn records(r: &TestRelay, id: &str) -> Vec<DeliveryEvent> {
    let filter = EventFilter {
        message_id: Some(id.to_owned()),
        ..Default::default()
    };
    r.relay
        .telemetry
        .dlog
        .query(&filter, None, 1000)
        .await
        .expect("query the delivery log")
        .events
}

/// Every log record of one result, in log order.
async fn records_of(r: &TestRelay, result: EventResult) -> Vec<DeliveryEvent> {
    let filter = EventFilter {
        result: Some(result),
        ..Default::default()
    };
    r.relay
        .telemetry
        .dlog
        .query(&filter, None, 1000)
        .await
        .expect("query the delivery log")
        .events
}

/// The queue id from the relay's reply to the end of DATA.
fn queue_id(t: &mailroute_testkit::smtp::client::Transcript) -> String {
    let reply = t.reply_to(".").expect("a reply to DATA").text();
    reply.rsplit("queued as ").next().expect("queue id").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_a_route_waits_for_one_instead_of_bouncing() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    // The configuration has a gap: no route serves example.com (its route is missing).
    let others = route("others", up.port(), 10, &["other.example"]);
    let r = start(&others, &redis.url(), |_| {}).await;
    let t = submit(
        r.smtp(),
        "app@app.example",
        &["user@example.com"],
        &message("gap", "X-Mailroute-Retry-Interval: 1s\r\n"),
    )
    .await;
    assert!(t.delivered(), "{:?}", t.lines());
    let id = queue_id(&t);
    let deferred =
        eventually(|| async { records(&r, &id).await.iter().any(|e| e.result == EventResult::Deferred) }).await;
    let log = records(&r, &id).await;
    assert!(deferred, "no deferred record: {log:?}");
    let d = log.iter().find(|e| e.result == EventResult::Deferred).unwrap();
    assert_eq!(d.bounce_class.as_deref(), Some("no_route"), "{d:?}");
    assert_eq!(d.enhanced_code.as_deref(), Some("4.4.4"), "{d:?}");
    assert!(
        log.iter().all(|e| e.result != EventResult::Bounced),
        "bounced for a gap in the configuration: {log:?}"
    );

    // The route comes back: the message is delivered on a later retry, and no DSN was sent.
    let both = format!("{others}{}", route("all", up.port(), 20, &["example.com"]));
    std::fs::write(r.dir.path().join("routes.yaml"), both).unwrap();
    let got = up.wait_for(1, WAIT).await.expect("delivered once the route is back");
    assert_eq!(got[0].rcpts, ["user@example.com"]);
    assert!(
        eventually(|| async {
            records(&r, &id)
                .await
                .iter()
                .any(|e| e.result == EventResult::Delivered)
        })
        .await
    );
    let log = records(&r, &id).await;
    assert!(log.iter().all(|e| e.result != EventResult::Bounced), "{log:?}");
    assert!(up.received().iter().all(|m| !m.mail_from.is_empty()), "a DSN was sent");
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_route_a_message_expires_at_the_end_of_its_lifetime_and_an_unroutable_dsn_is_reported() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(
        &route("others", up.port(), 10, &["other.example"]),
        &redis.url(),
        |_| {},
    )
    .await;
    let t = submit(
        r.smtp(),
        "app@app.example",
        &["user@example.com"],
        &message("gone", "X-Mailroute-Retry-Interval: 1s\r\nX-Mailroute-Expire: 3s\r\n"),
    )
    .await;
    assert!(t.delivered(), "{:?}", t.lines());
    let id = queue_id(&t);
    let expired =
        eventually(|| async { records(&r, &id).await.iter().any(|e| e.result == EventResult::Expired) }).await;
    let log = records(&r, &id).await;
    assert!(expired, "never expired: {log:?}");
    assert!(
        log.iter().filter(|e| e.result == EventResult::Deferred).count() >= 2,
        "retried within its lifetime: {log:?}"
    );
    assert!(log.iter().all(|e| e.result != EventResult::Bounced), "{log:?}");

    // Its DSN to app@app.example has no route either: the log and the metrics say so.
    let reported = eventually(|| async {
        records_of(&r, EventResult::Deferred).await.iter().any(|e| {
            e.envelope_from.is_empty()
                && e.recipient == "app@app.example"
                && e.bounce_class.as_deref() == Some("no_route")
        })
    })
    .await;
    assert!(reported, "{:?}", records_of(&r, EventResult::Deferred).await);
    let scrape = r.relay.telemetry.metrics.encode();
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("mailroute_dsn_unroutable_total ") && !l.ends_with(" 0")),
        "{scrape}"
    );
    assert!(up.received().is_empty());
    r.relay.shutdown().await;
}

const TOKEN: &str = "integrity-token";

fn api(r: &TestRelay, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    let base = format!("http://{}", r.relay.admin_addr.expect("admin listener"));
    reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(TOKEN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_503_with_a_reason_while_redis_is_down() {
    let mut redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    // A quota, so that /quotas reads Redis.
    let routes = format!(
        "{}{}",
        route("up", up.port(), 10, &["*"]),
        inbound_user("shop", "shop", "pw")
    );
    let r = start(&routes, &redis.url(), |o| o.admin_token = Some(TOKEN.into())).await;
    let ok = api(&r, reqwest::Method::GET, "/api/v1/events").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    redis.kill();
    let paths = [
        (reqwest::Method::GET, "/api/v1/events"),
        (reqwest::Method::GET, "/api/v1/events.csv"),
        (reqwest::Method::GET, "/api/v1/messages/abc"),
        (reqwest::Method::DELETE, "/api/v1/messages/abc"),
        (reqwest::Method::GET, "/api/v1/quotas"),
    ];
    for (method, path) in paths {
        let resp = api(&r, method.clone(), path).send().await.unwrap();
        let status = resp.status();
        let retry_after = resp.headers().get("retry-after").cloned();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        assert_eq!(status, 503, "{method} {path}: {body}");
        let reason = body["error"].as_str().unwrap_or_default();
        assert!(reason.contains("Redis is unreachable"), "{method} {path}: {body}");
        assert!(retry_after.is_some(), "{method} {path}");
    }
    r.relay.shutdown().await;
}

/// The value of an unlabelled series in a scrape.
async fn gauge(r: &TestRelay, name: &str) -> Option<f64> {
    let base = format!("http://{}", r.relay.admin_addr.expect("admin listener"));
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn cancelled_records(r: &TestRelay, id: &str) -> Vec<DeliveryEvent> {
    let path = format!("/api/v1/events?result=cancelled&message_id={id}");
    let v: serde_json::Value = api(r, reqwest::Method::GET, &path)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    serde_json::from_value(v["events"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_scheduled_message_takes_effect_at_once() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into())
    })
    .await;
    let t = submit(
        r.smtp(),
        "app@app.example",
        &["a@example.com", "b@example.com"],
        &message("later", "X-Mailroute-Deliver-After: 1h\r\n"),
    )
    .await;
    assert!(t.delivered(), "{:?}", t.lines());
    let id = queue_id(&t);
    assert!(
        eventually(|| async { gauge(&r, "mailroute_queue_scheduled_jobs").await == Some(2.0) }).await,
        "mailroute_queue_scheduled_jobs never 2.0"
    );
    assert!(
        eventually(|| async { gauge(&r, "mailroute_queue_messages").await == Some(1.0) }).await,
        "mailroute_queue_messages never 1.0"
    );

    let del = api(&r, reqwest::Method::DELETE, &format!("/api/v1/messages/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let body: serde_json::Value = del.json().await.unwrap();
    assert_eq!(body["recipients"], 2, "{body}");
    // No waiting: the records and the queue say so as soon as the answer came; the gauges at
    // their next background refresh.
    let log = cancelled_records(&r, &id).await;
    let mut rcpts: Vec<&str> = log.iter().map(|e| e.recipient.as_str()).collect();
    rcpts.sort_unstable();
    assert_eq!(rcpts, ["a@example.com", "b@example.com"], "{log:?}");
    assert!(
        eventually(|| async { gauge(&r, "mailroute_queue_scheduled_jobs").await == Some(0.0) }).await,
        "mailroute_queue_scheduled_jobs never 0.0"
    );
    assert!(
        eventually(|| async { gauge(&r, "mailroute_queue_messages").await == Some(0.0) }).await,
        "mailroute_queue_messages never 0.0"
    );
    let gone = api(&r, reqwest::Method::GET, &format!("/api/v1/messages/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_ready_message_removes_its_jobs_from_the_stream() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    // No workers: the jobs stay in the ready stream.
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into());
        o.workers = 0;
    })
    .await;
    let t = submit(r.smtp(), "app@app.example", &["a@example.com"], &message("now", "")).await;
    assert!(t.delivered(), "{:?}", t.lines());
    let id = queue_id(&t);
    assert!(
        eventually(|| async { gauge(&r, "mailroute_queue_ready_jobs").await == Some(1.0) }).await,
        "mailroute_queue_ready_jobs never 1.0"
    );
    let del = api(&r, reqwest::Method::DELETE, &format!("/api/v1/messages/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    assert_eq!(cancelled_records(&r, &id).await.len(), 1);
    assert!(
        eventually(|| async { gauge(&r, "mailroute_queue_ready_jobs").await == Some(0.0) }).await,
        "mailroute_queue_ready_jobs never 0.0"
    );
    assert!(
        eventually(|| async { gauge(&r, "mailroute_queue_messages").await == Some(0.0) }).await,
        "mailroute_queue_messages never 0.0"
    );
    let again = api(&r, reqwest::Method::DELETE, &format!("/api/v1/messages/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_says_which_recipients_a_worker_is_delivering_at_that_moment() {
    let redis = RedisServer::start().unwrap();
    // The upstream holds the message: the job stays leased while the cancel arrives.
    let up = SmtpServer::start(Script::new().then(Behaviour::AcceptAfter(Duration::from_secs(8)))).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into())
    })
    .await;
    let t = submit(r.smtp(), "app@app.example", &["a@example.com"], &message("held", "")).await;
    assert!(t.delivered(), "{:?}", t.lines());
    let id = queue_id(&t);
    assert!(eventually(|| async { gauge(&r, "mailroute_queue_inflight_jobs").await == Some(1.0) }).await);
    let del = api(&r, reqwest::Method::DELETE, &format!("/api/v1/messages/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let body: serde_json::Value = del.json().await.unwrap();
    assert_eq!(
        (body["recipients"].as_u64(), body["in_flight"].as_u64()),
        (Some(0), Some(1)),
        "{body}"
    );
    assert!(
        body["note"]
            .as_str()
            .is_some_and(|n| n.contains("may still be delivered")),
        "{body}"
    );
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_bounces_at_once_is_logged_received_before_bounced() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(
        Script::new()
            .stage(Stage::Rcpt)
            .default_behaviour(Behaviour::PermFail("550 5.1.1 no such user".into())),
    )
    .unwrap();
    // No automatic suppression: the same eight recipients bounce in every message, and with it
    // a message committed after the first bounce would log them `suppressed` (suppress.rs's
    // subject); this test is about the order of `received` and an immediate `bounced`.
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into());
        o.suppression.auto_classes = Vec::new();
    })
    .await;
    // Many sessions at once, several recipients each: the relay is busy while it answers.
    let rcpts: Vec<String> = (0..8).map(|i| format!("gone{i}@example.com")).collect();
    let mut sessions = tokio::task::JoinSet::new();
    for i in 0..24 {
        let (addr, rcpts) = (r.smtp(), rcpts.clone());
        sessions.spawn(async move {
            let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
            let t = submit(addr, "", &rcpts, &message(&format!("b{i}"), "")).await;
            assert!(t.delivered(), "{:?}", t.lines());
            queue_id(&t)
        });
    }
    let ids = sessions.join_all().await;
    for id in &ids {
        let path = format!("/api/v1/events?message_id={id}");
        let events = || async {
            let v: serde_json::Value = api(&r, reqwest::Method::GET, &path)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            serde_json::from_value::<Vec<DeliveryEvent>>(v["events"].clone()).unwrap()
        };
        let all = eventually(|| async { events().await.len() >= 2 * rcpts.len() }).await;
        let log = events().await;
        assert!(all, "{id}: {log:?}");
        for rcpt in &rcpts {
            let results: Vec<EventResult> = log.iter().filter(|e| &e.recipient == rcpt).map(|e| e.result).collect();
            assert_eq!(results, [EventResult::Received, EventResult::Bounced], "{id} {rcpt}");
        }
    }
    r.relay.shutdown().await;
}
