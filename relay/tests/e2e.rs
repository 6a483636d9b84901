//! End-to-end delivery through an in-process relay and a real Redis: accepted over SMTP,
//! queued, delivered to scriptable upstream servers, retried, failed over, bounced with DSNs.

use crate::common::*;
use mailroute_testkit::{Behaviour, RedisServer, Script, SmtpServer};

#[tokio::test]
async fn delivers_through_the_matching_route() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |_| {}).await;
    let t = submit(r.smtp(), "app@app.example", &["user@example.com"], &message("m1", "")).await;
    assert!(t.delivered(), "{t}");
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got[0].mail_from, "app@app.example");
    assert_eq!(got[0].rcpts, ["user@example.com"]);
    let data = got[0].data_str();
    assert!(
        data.starts_with("Received: from client.testkit.localhost ([127.0.0.1])"),
        "{data}"
    );
    assert!(data.contains("Message-ID: <"), "{data}");
    assert!(data.contains("Hello m1."));
    r.relay.shutdown().await;
}

#[tokio::test]
async fn temporary_failures_are_retried_until_delivered() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new().fail_then_accept(2, "451 4.3.0 Try again later")).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |_| {}).await;
    let msg = message("retry", "X-Mailroute-Retry-Interval: 1s\r\n");
    assert!(
        submit(r.smtp(), "app@app.example", &["user@example.com"], &msg)
            .await
            .delivered()
    );
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert_eq!(up.attempts(), 3);
    assert!(
        !got[0].data_str().contains("X-Mailroute-Retry-Interval"),
        "extension headers are stripped"
    );
    r.relay.shutdown().await;
}

#[tokio::test]
async fn permanent_failure_sends_a_dsn_to_the_sender() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new().then(Behaviour::PermFail(
        "550 5.1.1 <nobody@example.com>: Recipient address rejected".into(),
    )))
    .unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |_| {}).await;
    assert!(
        submit(
            r.smtp(),
            "app@app.example",
            &["nobody@example.com"],
            &message("bounce", "")
        )
        .await
        .delivered()
    );
    // The DSN travels through the same route (it serves every sender), addressed to the sender.
    let got = up.wait_for(1, WAIT).await.unwrap();
    let dsn = &got[0];
    assert_eq!(dsn.mail_from, "", "DSNs use the null sender");
    assert_eq!(dsn.rcpts, ["app@app.example"]);
    let text = dsn.data_str();
    assert!(text.contains("multipart/report"), "{text}");
    assert!(text.contains("report-type=delivery-status"));
    assert!(text.contains("Final-Recipient: rfc822; nobody@example.com"), "{text}");
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(text.contains("Recipient address rejected"));
    assert!(text.contains("Subject: test bounce"), "original headers are included");
    assert!(!text.contains("Hello bounce."), "the original body is not");
    r.relay.shutdown().await;
}

#[tokio::test]
async fn a_bounce_is_never_bounced() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new().default_behaviour(Behaviour::perm_fail())).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |_| {}).await;
    assert!(
        submit(r.smtp(), "", &["nobody@example.com"], &message("nb", ""))
            .await
            .delivered()
    );
    up.wait_for_attempts(1, WAIT).await.unwrap();
    // The job finishes as bounced without producing a DSN: the message record goes away.
    let stats = wait_until(|| async { r.relay.queue.stats(0).await.unwrap().messages == 0 }).await;
    assert!(stats);
    assert_eq!(up.attempts(), 1);
    r.relay.shutdown().await;
}

#[tokio::test]
async fn expiry_sends_a_dsn() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new().default_behaviour(Behaviour::temp_fail())).unwrap();
    let sink = SmtpServer::start(Script::new()).unwrap();
    let routes = route("up", up.port(), 10, &["example.com"]) + &route("senders", sink.port(), 10, &["app.example"]);
    let r = start(&routes, &redis.url(), |_| {}).await;
    let msg = message("exp", "X-Mailroute-Retry-Interval: 1s\r\nX-Mailroute-Expire: 3s\r\n");
    assert!(
        submit(r.smtp(), "app@app.example", &["user@example.com"], &msg)
            .await
            .delivered()
    );
    let got = sink.wait_for(1, WAIT).await.unwrap();
    let text = got[0].data_str();
    assert_eq!(got[0].rcpts, ["app@app.example"]);
    assert!(text.contains("Action: failed"), "{text}");
    assert!(up.attempts() >= 2, "retried before expiring: {}", up.attempts());
    r.relay.shutdown().await;
}

#[tokio::test]
async fn fails_over_to_the_next_priority() {
    let redis = RedisServer::start().unwrap();
    // A port with nothing listening: connection refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let busy = SmtpServer::start(Script::new().default_behaviour(Behaviour::temp_fail())).unwrap();
    let good = SmtpServer::start(Script::new()).unwrap();
    let routes = route("dead", closed, 1, &["*"])
        + &route("busy", busy.port(), 2, &["*"])
        + &route("good", good.port(), 3, &["*"]);
    let r = start(&routes, &redis.url(), |_| {}).await;
    assert!(
        submit(r.smtp(), "app@app.example", &["user@example.com"], &message("fo", ""))
            .await
            .delivered()
    );
    good.wait_for(1, WAIT).await.unwrap();
    assert_eq!(busy.attempts(), 1);
    r.relay.shutdown().await;
}

#[tokio::test]
async fn recipient_domain_chooses_the_route() {
    let redis = RedisServer::start().unwrap();
    let carrier = SmtpServer::start(Script::new()).unwrap();
    let general = SmtpServer::start(Script::new()).unwrap();
    let routes = route(
        "carrier",
        carrier.port(),
        5,
        &["docomo.ne.jp", "ezweb.ne.jp", "softbank.jp"],
    ) + &route("general", general.port(), 10, &["*"]);
    let r = start(&routes, &redis.url(), |_| {}).await;
    let t = submit(
        r.smtp(),
        "app@app.example",
        &["a@docomo.ne.jp", "b@gmail.com", "c@softbank.jp"],
        &message("d", ""),
    )
    .await;
    assert!(t.delivered(), "{t}");
    let c = carrier.wait_for(2, WAIT).await.unwrap();
    let g = general.wait_for(1, WAIT).await.unwrap();
    let mut rc: Vec<String> = c.iter().flat_map(|m| m.rcpts.clone()).collect();
    rc.sort();
    assert_eq!(rc, ["a@docomo.ne.jp", "c@softbank.jp"]);
    assert_eq!(g[0].rcpts, ["b@gmail.com"]);
    r.relay.shutdown().await;
}

/// Mail no route serves is not bounced at once (a gap in the configuration is temporary): it
/// waits for a route, and the sender learns why when it expires.
#[tokio::test]
async fn no_matching_route_waits_then_expires_with_a_reason() {
    let redis = RedisServer::start().unwrap();
    let senders = SmtpServer::start(Script::new()).unwrap();
    let r = start(
        &route("senders", senders.port(), 10, &["app.example"]),
        &redis.url(),
        |_| {},
    )
    .await;
    assert!(
        submit(
            r.smtp(),
            "app@app.example",
            &["x@nowhere.example"],
            &message("nr", "X-Mailroute-Retry-Interval: 1s\r\nX-Mailroute-Expire: 2s\r\n")
        )
        .await
        .delivered()
    );
    let got = senders.wait_for(1, WAIT).await.unwrap();
    let dsn = got[0].data_str();
    assert!(dsn.contains("expired"), "{dsn}");
    assert!(
        dsn.contains("No route configured for recipient domain nowhere.example"),
        "{dsn}"
    );
    r.relay.shutdown().await;
}

/// Polls `f` until it is true or [`WAIT`] passes.
async fn wait_until<F, Fut>(f: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}
