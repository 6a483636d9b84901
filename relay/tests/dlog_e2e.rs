//! What a running relay writes to its delivery log, read through the events API: a held
//! message (`X-Mailroute-Deliver-After`, quiet hours) gets a `scheduled` record with the time
//! it will be tried, and an upstream's `421 4.7.0 Try again later`, which backs the route off,
//! is classed `rate_limited` there too.

use std::time::Duration;

use chrono::{DateTime, DurationRound as _, Utc};

use crate::common::*;
use mailroute_testkit::{RedisServer, Script, SmtpServer};

const TOKEN: &str = "dlog-e2e-token";

async fn events(base: &str, query: &str, ok: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!("{base}/api/v1/events?{query}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("http")
            .json()
            .await
            .expect("json");
        let evs = v["events"].as_array().cloned().unwrap_or_default();
        if ok(&evs) {
            return evs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting on {query}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn time(v: &serde_json::Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    DateTime::parse_from_rfc3339(s).expect("RFC 3339").with_timezone(&Utc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_get_a_scheduled_record_with_the_time_they_will_be_tried() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into())
    })
    .await;
    let base = format!("http://{}", r.relay.admin_addr.unwrap());

    // Deliver-After: held from the start, for two hours.
    let before = mailroute_relay::clock::now();
    let later = message("later", "X-Mailroute-Deliver-After: +2h\r\n");
    assert!(
        submit(r.smtp(), "app@app.example", &["later@example.com"], &later)
            .await
            .delivered()
    );
    let after = mailroute_relay::clock::now();
    let evs = events(&base, "result=scheduled&recipient=later@example.com", |e| !e.is_empty()).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    let at = time(&evs[0]["not_before"]);
    let two_hours = chrono::Duration::hours(2);
    // Milliseconds: the log truncates, the relay computed it from its own clock in between.
    let lo = (before + two_hours)
        .duration_trunc(chrono::Duration::milliseconds(1))
        .unwrap();
    assert!(
        lo <= at && at <= after + two_hours,
        "{at} not 2 h after {before}..{after}"
    );
    let text = evs[0]["reply_text"].as_str().unwrap_or_default();
    assert!(text.contains("X-Mailroute-Deliver-After"), "{text}");
    assert_eq!(evs[0]["recipient"], "later@example.com");

    // Quiet hours around now (UTC): held by the worker until the window ends.
    let now = mailroute_relay::clock::now();
    let minute = chrono::Duration::minutes(1);
    let start_at = (now - chrono::Duration::hours(1)).duration_trunc(minute).unwrap();
    let end_at = (now + chrono::Duration::hours(1)).duration_trunc(minute).unwrap();
    let window = format!("{}-{} UTC", start_at.format("%H:%M"), end_at.format("%H:%M"));
    let quiet = message("quiet", &format!("X-Mailroute-Quiet-Hours: {window}\r\n"));
    assert!(
        submit(r.smtp(), "app@app.example", &["quiet@example.com"], &quiet)
            .await
            .delivered()
    );
    let evs = events(&base, "result=scheduled&recipient=quiet@example.com", |e| !e.is_empty()).await;
    assert_eq!(time(&evs[0]["not_before"]), end_at, "{evs:?}");
    let text = evs[0]["reply_text"].as_str().unwrap_or_default();
    assert!(text.contains("quiet hours") && text.contains(&window), "{text}");
    // Neither went out.
    assert!(up.received().is_empty());
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_421_try_again_later_is_logged_as_rate_limited() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new().fail_then_accept(1, "421 4.7.0 Try again later")).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into())
    })
    .await;
    let base = format!("http://{}", r.relay.admin_addr.unwrap());
    assert!(
        submit(r.smtp(), "app@app.example", &["user@example.com"], &message("busy", ""))
            .await
            .delivered()
    );
    let evs = events(&base, "result=deferred", |e| !e.is_empty()).await;
    assert_eq!(evs[0]["reply_code"], 421, "{evs:?}");
    assert_eq!(evs[0]["bounce_class"], "rate_limited", "{evs:?}");
    // The filter by class finds it as well.
    let by_class = events(&base, "bounce_class=rate_limited", |e| !e.is_empty()).await;
    assert_eq!(by_class.len(), 1, "{by_class:?}");
    r.relay.shutdown().await;
}
