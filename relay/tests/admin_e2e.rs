//! The admin API of a running relay: delivery log events and CSV after real deliveries,
//! message state and cancellation, readiness and the Prometheus scrape.

use std::time::Duration;

use crate::common::*;
use mailroute_testkit::{Behaviour, RedisServer, Script, SmtpServer, Stage};

const TOKEN: &str = "admin-test-token";

async fn get(base: &str, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("http")
}

async fn poll_json(base: &str, path: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v: serde_json::Value = get(base, path).await.json().await.expect("json");
        if ok(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting on {path}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_csv_messages_and_metrics() {
    let redis = RedisServer::start().unwrap();
    // First RCPT is refused permanently, the rest accepted.
    let up = SmtpServer::start(
        Script::new()
            .stage(Stage::Rcpt)
            .then(Behaviour::PermFail("550 5.1.1 <gone@example.com>: user unknown".into())),
    )
    .unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into())
    })
    .await;
    let base = format!("http://{}", r.relay.admin_addr.unwrap());

    assert!(
        submit(r.smtp(), "app@app.example", &["gone@example.com"], &message("b", ""))
            .await
            .delivered()
    );
    // The upstream's scripted 550 goes to whichever RCPT comes first: the second message is
    // sent only after the first bounced, or two workers could race for that reply.
    poll_json(&base, "/api/v1/events?result=bounced", |v| {
        v["events"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert!(
        submit(r.smtp(), "app@app.example", &["ok@example.com"], &message("d", ""))
            .await
            .delivered()
    );

    let v = poll_json(&base, "/api/v1/events?result=delivered&recipient=ok@example.com", |v| {
        v["events"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    let ev = &v["events"][0];
    assert_eq!(ev["route"], "mail/up");
    assert_eq!(ev["envelope_from"], "app@app.example");
    assert_eq!(ev["source_ip"], "127.0.0.1");
    assert_eq!(ev["reply_code"], 250);
    assert!(ev.get("subject").is_none() && ev.get("body").is_none());

    let csv = get(
        &base,
        "/api/v1/events.csv?result=bounced&bounce_class=invalid_recipient",
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(
        csv.lines().next().unwrap().starts_with("time,recipient,result"),
        "{csv}"
    );
    assert!(csv.contains("gone@example.com"), "{csv}");
    assert!(!csv.contains("ok@example.com"));
    let received = get(&base, "/api/v1/events?result=received")
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert!(received["events"].as_array().unwrap().len() >= 2);

    // A message scheduled for later can be inspected and cancelled.
    let t = submit(
        r.smtp(),
        "app@app.example",
        &["later@example.com"],
        &message("l", "X-Mailroute-Deliver-After: 1h\r\n"),
    )
    .await;
    let reply = t.reply_to(".").unwrap().text();
    let id = reply.rsplit("queued as ").next().unwrap().trim().to_owned();
    let m: serde_json::Value = get(&base, &format!("/api/v1/messages/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(m["meta"]["rcpts"][0], "later@example.com", "{m}");
    let del = reqwest::Client::new()
        .delete(format!("{base}/api/v1/messages/{id}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success(), "{}", del.status());
    let body: serde_json::Value = del.json().await.unwrap();
    assert_eq!(
        (body["cancelled"].as_bool(), body["recipients"].as_u64()),
        (Some(true), Some(1)),
        "{body}"
    );
    // Its only recipient is final at once: the message is gone.
    assert_eq!(get(&base, &format!("/api/v1/messages/{id}")).await.status(), 404);
    assert_eq!(get(&base, "/api/v1/messages/nope").await.status(), 404);

    // Without the token: 401.
    let anon = reqwest::get(format!("{base}/api/v1/events")).await.unwrap();
    assert_eq!(anon.status(), 401);
    assert_eq!(reqwest::get(format!("{base}/readyz")).await.unwrap().status(), 200);

    let series = [
        // The message to ok@ and the DSN for gone@ (it leaves through the same route).
        r#"mailroute_delivery_attempts_total{result="delivered",route="mail/up",sender_namespace="-"} 2"#,
        r#"mailroute_bounces_total{class="invalid_recipient",code="550",route="mail/up",sender_namespace="-"} 1"#,
        r#"mailroute_messages_received_total{listener="smtp",result="accepted",sender_namespace="-"} 3"#,
        // The cancelled message's job left the schedule at once.
        "mailroute_queue_scheduled_jobs 0",
        "mailroute_accept_latency_seconds_count 3",
        "mailroute_config_generation 1",
        "mailroute_dsn_sent_total 1",
    ];
    let scrape = || async {
        reqwest::get(format!("{base}/metrics"))
            .await
            .expect("http")
            .text()
            .await
            .expect("text")
    };
    // The DSN may still be on its way: wait until the counters reach these values.
    let complete = eventually(|| async {
        let m = scrape().await;
        series.iter().all(|s| m.contains(s))
    })
    .await;
    let metrics = scrape().await;
    for s in series {
        assert!(complete && metrics.contains(s), "missing {s} in\n{metrics}");
    }
    r.relay.shutdown().await;
}

/// The value of an unlabelled sample in a Prometheus text scrape.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Resumes a SIGSTOPped Redis however the test ends, so the launcher can stop it.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// A hung Redis (SIGSTOP: connections stay open, nothing answers; each read waits for the
/// client's 10 s response timeout) must not hold `/metrics` until Prometheus' scrape timeout:
/// the scrape answers promptly with the last queue gauges and their growing age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_promptly_with_last_values_while_redis_hangs() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |_| {}).await;
    let base = format!("http://{}", r.relay.admin_addr.unwrap());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let scrape = || async {
        let t = tokio::time::Instant::now();
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        (text, t.elapsed())
    };

    // Fresh while Redis answers (the first scrape may return before its refresh finishes).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (text, _) = scrape().await;
        let age = sample(&text, "mailroute_redis_gauges_age_seconds").expect("age gauge");
        if age < 5.0 && sample(&text, "mailroute_queue_messages").is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gauges never refreshed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pid = redis.pid().expect("redis pid");
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let _resume = Resume(pid);

    // Several scrapes in a row, each well inside the 10 s a single Redis read now waits.
    let mut last_age = 0.0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while last_age < 3.0 {
        let (text, took) = scrape().await;
        assert!(
            took < Duration::from_secs(8),
            "/metrics took {took:?} while Redis hangs"
        );
        assert!(
            sample(&text, "mailroute_queue_messages").is_some(),
            "last values kept:\n{text}"
        );
        last_age = sample(&text, "mailroute_redis_gauges_age_seconds").expect("age gauge");
        assert!(tokio::time::Instant::now() < deadline, "age never grew: {last_age}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
