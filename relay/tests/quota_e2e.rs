//! Quotas and pacing through running relays on a real Redis: a limit shared by two relays,
//! bulk-only counting, forbidden sender domains, a paced route, and back-off after a 421.

use std::time::{Duration, Instant};

use crate::common::*;
use mailroute_testkit::{Behaviour, RedisServer, Script, SmtpServer};

fn quota(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {{name: {name}, namespace: mail}}\nspec:\n{spec}\n---\n"
    )
}

async fn count_accepted(addr: std::net::SocketAddr, n: usize, tag: &str, headers: &str) -> (usize, Vec<String>) {
    let mut ok = 0;
    let mut refusals = Vec::new();
    for i in 0..n {
        let t = submit(
            addr,
            "app@app.example",
            &["user@example.com"],
            &message(&format!("{tag}{i}"), headers),
        )
        .await;
        if t.delivered() {
            ok += 1;
        } else if let Some(r) = t.reply_to("RCPT").filter(|r| !r.is_positive()).or(t.reply_to(".")) {
            refusals.push(format!("{} {}", r.code, r.text()));
        }
    }
    (ok, refusals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_one_per_minute_limit() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let cfg = route("up", up.port(), 10, &["*"])
        + &quota(
            "loopback-app",
            "  sender: {sourceCidrs: [127.0.0.0/8]}\n  limits: {perMinute: 100}\n  onExceeded: defer",
        );
    let a = start(&cfg, &redis.url(), |_| {}).await;
    let b = start(&cfg, &redis.url(), |_| {}).await;
    let ((na, ra), (nb, rb)) = tokio::join!(
        count_accepted(a.smtp(), 75, "a", ""),
        count_accepted(b.smtp(), 75, "b", "")
    );
    assert_eq!(na + nb, 100, "exactly the limit across both relays");
    let refusals: Vec<String> = ra.into_iter().chain(rb).collect();
    assert_eq!(refusals.len(), 50);
    assert!(
        refusals
            .iter()
            .all(|r| r.starts_with("451 4.7.1") && r.contains("100 messages per minute")),
        "{refusals:?}"
    );
    let m = a
        .relay
        .metrics()
        .quota_decisions
        .with_label_values(&["mail/loopback-app", "deferred", "-"])
        .get()
        + b.relay
            .metrics()
            .quota_decisions
            .with_label_values(&["mail/loopback-app", "deferred", "-"])
            .get();
    assert_eq!(m, 50);
    a.relay.shutdown().await;
    b.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_only_quota_ignores_transactional_mail() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let cfg = route("up", up.port(), 10, &["*"])
        + &quota(
            "shop",
            "  sender: {sourceCidrs: [127.0.0.0/8]}\n  limits: {perMonth: 3}\n  appliesTo: bulk\n  onExceeded: reject\n  timeZone: Asia/Tokyo",
        );
    let r = start(&cfg, &redis.url(), |_| {}).await;
    let (orders, _) = count_accepted(r.smtp(), 5, "order", "").await;
    assert_eq!(orders, 5, "order confirmations are never counted");
    let (bulk, refusals) = count_accepted(r.smtp(), 5, "news", "Precedence: bulk\r\n").await;
    assert_eq!(bulk, 3);
    assert_eq!(refusals.len(), 2);
    assert!(refusals[0].starts_with("550 5.7.1"), "{refusals:?}");
    r.relay.shutdown().await;
}

#[tokio::test]
async fn forbidden_from_domain_is_refused_at_mail_from() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let cfg = route("up", up.port(), 10, &["*"])
        + &quota(
            "tenant",
            "  sender: {sourceCidrs: [127.0.0.0/8]}\n  limits: {perDay: 1000}\n  deniedFromDomains: [platform.example]",
        );
    let r = start(&cfg, "memory", |_| {}).await;
    let t = submit(
        r.smtp(),
        "noreply@platform.example",
        &["user@example.com"],
        &message("x", ""),
    )
    .await;
    let mail = t.reply_to("MAIL").unwrap();
    assert_eq!(mail.code, 550, "{t}");
    assert!(
        mail.text().contains("5.7.1") && mail.text().contains("platform.example"),
        "{t}"
    );
    assert!(
        submit(r.smtp(), "app@app.example", &["user@example.com"], &message("y", ""))
            .await
            .delivered()
    );
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_route_delivers_at_its_limit_without_failures() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    // 120 a minute: one every 500 ms.
    let cfg = route("up", up.port(), 10, &["*"]).replace(
        "  priority: 10\n",
        "  priority: 10\n  limits: {messagesPerMinute: 120}\n",
    );
    let r = start(&cfg, &redis.url(), |_| {}).await;
    let (n, _) = count_accepted(r.smtp(), 6, "p", "").await;
    assert_eq!(n, 6);
    up.wait_for(1, WAIT).await.unwrap();
    let first = Instant::now();
    up.wait_for(6, WAIT).await.unwrap();
    let spread = first.elapsed();
    // Five more sends at 500 ms spacing cannot finish in under ~2.5 s.
    assert!(spread >= Duration::from_millis(2000), "not paced: {spread:?}");
    assert_eq!(up.attempts(), 6, "pacing never fails an attempt");
    let paced = r
        .relay
        .metrics()
        .paced_jobs
        .with_label_values(&["mail/up", "route_rate"])
        .get();
    assert!(paced >= 4, "jobs waited for the rate: {paced}");
    let bounced = r
        .relay
        .metrics()
        .delivery_attempts
        .with_label_values(&["mail/up", "bounced", "-"])
        .get();
    assert_eq!(bounced, 0);
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_backs_the_route_off() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new().then(Behaviour::RateLimit)).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |_| {}).await;
    assert!(
        submit(r.smtp(), "app@app.example", &["a@example.com"], &message("r1", ""))
            .await
            .delivered()
    );
    up.wait_for_attempts(1, WAIT).await.unwrap();
    let m = r.relay.metrics().clone();
    let deadline = Instant::now() + WAIT;
    while m.route_backoff_active.with_label_values(&["mail/up"]).get() != 1 {
        assert!(Instant::now() < deadline, "no back-off after 421");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next message waits for the back-off instead of being sent.
    assert!(
        submit(r.smtp(), "app@app.example", &["b@example.com"], &message("r2", ""))
            .await
            .delivered()
    );
    while m.paced_jobs.with_label_values(&["mail/up", "backoff"]).get() < 1 {
        assert!(Instant::now() < deadline, "second message was not held back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.attempts(), 1);
    assert!(up.received().is_empty());
    r.relay.shutdown().await;
}
