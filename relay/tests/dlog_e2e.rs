//! What a running relay writes to its delivery log, read through the events API: a held
//! message (`X-Mailroute-Deliver-After`, quiet hours) gets a `scheduled` record with the time
//! it will be tried, and an upstream's `421 4.7.0 Try again later`, which backs the route off,
//! is classed `rate_limited` there too. With two relays on one Redis, every message's
//! `received` is stored before any other record of it, even when a worker delivered it before
//! the accepting session was back from the queue's commit; a job's `delivered` is stored with
//! the completion that finishes it, once.

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

/// Whether every one of `ids` has its `received` and `delivered` records in the stream, polled
/// until they are or [`WAIT`] passes.
async fn all_received_and_delivered(c: &redis::aio::MultiplexedConnection, ids: &[String]) -> bool {
    eventually(|| {
        let mut c = c.clone();
        async move {
            let recs = stream_records(&mut c).await;
            ids.iter().all(|id| {
                ["received", "delivered"]
                    .iter()
                    .all(|r| recs.iter().any(|(m, res)| m == id && res == r))
            })
        }
    })
    .await
}

/// The delivery log stream in order: (message id, result) of every record.
async fn stream_records(c: &mut redis::aio::MultiplexedConnection) -> Vec<(String, String)> {
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg("{mailroute}:dlog")
        .arg("-")
        .arg("+")
        .query_async(c)
        .await
        .expect("XRANGE");
    entries
        .into_iter()
        .filter_map(|(_, fields)| {
            let json = fields.chunks_exact(2).find(|kv| kv[0] == "e")?[1].clone();
            let v: serde_json::Value = serde_json::from_str(&json).ok()?;
            Some((v["message_id"].as_str()?.to_owned(), v["result"].as_str()?.to_owned()))
        })
        .collect()
}

/// Sends `n` messages in one session; returns the queue ids answered 250.
async fn send_many(addr: std::net::SocketAddr, tag: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let t = submit(
            addr,
            "app@app.example",
            &["user@example.com"],
            &message(&format!("{tag}{i}"), ""),
        )
        .await;
        let id = t
            .lines()
            .iter()
            .find_map(|l| l.strip_prefix("250 2.0.0 Ok: queued as ").map(str::to_owned));
        ids.extend(id);
    }
    ids
}

/// Two relays on one Redis, an upstream that accepts at once: a worker (of either relay) may
/// deliver a message before the accepting session is back from the queue's commit. Webhooks
/// forward the stream in order, so every message's `received` must come before any other
/// record of it in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_is_stored_before_any_other_record_of_the_message() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let routes = route("up", up.port(), 10, &["*"]);
    let a = start(&routes, &redis.url(), |o| o.consumer = "relay-a".into()).await;
    let b = start(&routes, &redis.url(), |o| o.consumer = "relay-b".into()).await;
    const PER_CLIENT: usize = 50;
    let (ia, ib, ic, id) = tokio::join!(
        send_many(a.smtp(), "a", PER_CLIENT),
        send_many(b.smtp(), "b", PER_CLIENT),
        send_many(a.smtp(), "c", PER_CLIENT),
        send_many(b.smtp(), "d", PER_CLIENT),
    );
    let ids: Vec<String> = [ia, ib, ic, id].concat();
    assert_eq!(ids.len(), 4 * PER_CLIENT);
    let mut c = redis_connection(&redis).await;
    // Every message's `received` and `delivered` stored.
    assert!(
        all_received_and_delivered(&c, &ids).await,
        "not every message was logged as received and delivered"
    );
    let recs = stream_records(&mut c).await;
    let mut inverted = Vec::new();
    for id in &ids {
        let first = recs.iter().find(|(m, _)| m == id).map(|(_, r)| r.as_str());
        if first != Some("received") {
            inverted.push((id.clone(), first.map(str::to_owned)));
        }
        let received = recs.iter().filter(|(m, r)| m == id && r == "received").count();
        assert_eq!(received, 1, "{id}: {received} received records");
    }
    assert!(
        inverted.is_empty(),
        "{} of {} messages have another record before their received: {inverted:?}",
        inverted.len(),
        ids.len()
    );
    a.relay.shutdown().await;
    b.relay.shutdown().await;
}

/// The delivery log's JSON line writer of the accepting relay: on a message's `received` line
/// it waits (bounded) until the stream holds that message's `delivered`. The line is written
/// once the commit returned, so this holds the session exactly in the window between the jobs
/// becoming visible and its `received` being handed on.
struct WaitForDelivered {
    redis: redis::Connection,
    line: Vec<u8>,
}

impl WaitForDelivered {
    fn delivered_stored(&mut self, id: &str) -> bool {
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg("{mailroute}:dlog")
            .arg("-")
            .arg("+")
            .query(&mut self.redis)
            .unwrap_or_default();
        entries.iter().any(|(_, f)| {
            f.chunks_exact(2).any(|kv| {
                serde_json::from_str::<serde_json::Value>(&kv[1])
                    .is_ok_and(|v| v["message_id"] == id && v["result"] == "delivered")
            })
        })
    }
}

impl std::io::Write for WaitForDelivered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let line = std::mem::take(&mut self.line);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line.trim_ascii()) else {
            return Ok(());
        };
        if v["result"] == "received" {
            let id = v["message_id"].as_str().unwrap_or_default().to_owned();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            // Called on a runtime thread: hand its other tasks to another thread meanwhile.
            tokio::task::block_in_place(|| {
                while !self.delivered_stored(&id) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        Ok(())
    }
}

/// Deterministic form of the above: relay A only accepts (no workers), relay B only delivers,
/// and A's session is held after the commit until B stored the message's `delivered`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_precedes_a_delivery_that_finished_before_the_session_went_on() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let routes = route("up", up.port(), 10, &["*"]);
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path(), &routes, &redis.url());
    o.consumer = "relay-a".into();
    o.workers = 0;
    let writer = WaitForDelivered {
        redis: redis.client().unwrap().get_connection().unwrap(),
        line: Vec::new(),
    };
    let overrides = mailroute_relay::server::Overrides {
        resolver: Some(std::sync::Arc::new(
            mailroute_relay::outbound::delivery::StaticResolver::new(),
        )),
        dlog_writer: Some(Box::new(writer)),
        ..Default::default()
    };
    let a = mailroute_relay::server::Relay::start_with(o, overrides).await.unwrap();
    let b = start(&routes, &redis.url(), |o| {
        o.consumer = "relay-b".into();
        o.smtp_listen = None;
    })
    .await;
    let ids = send_many(a.smtp_addr.unwrap(), "x", 10).await;
    assert_eq!(ids.len(), 10);
    let mut c = redis_connection(&redis).await;
    assert!(
        all_received_and_delivered(&c, &ids).await,
        "not every message was logged as received and delivered"
    );
    let recs = stream_records(&mut c).await;
    let inverted: Vec<&String> = ids
        .iter()
        .filter(|id| recs.iter().find(|(m, _)| m == *id).map(|(_, r)| r.as_str()) != Some("received"))
        .collect();
    assert!(
        inverted.is_empty(),
        "{} of {} messages have another record before their received: {inverted:?}",
        inverted.len(),
        ids.len()
    );
    a.shutdown().await;
    b.relay.shutdown().await;
}

/// A job's `delivered` record is stored by the complete that finishes it (where the delivery
/// log is the Redis store): once every message's record is gone (its last recipient final), the
/// stream already holds each one's `delivered`, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_is_stored_with_the_completion_and_once() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let routes = route("up", up.port(), 10, &["*"]);
    let a = start(&routes, &redis.url(), |_| {}).await;
    let ids = send_many(a.smtp(), "w", 20).await;
    assert_eq!(ids.len(), 20);
    let mut c = redis_connection(&redis).await;
    let all_final = eventually(|| {
        let mut c = c.clone();
        let ids = ids.clone();
        async move {
            for id in &ids {
                let n: i64 = redis::cmd("EXISTS")
                    .arg(format!("{{mailroute}}:msg:{id}"))
                    .query_async(&mut c)
                    .await
                    .expect("EXISTS");
                if n != 0 {
                    return false;
                }
            }
            true
        }
    })
    .await;
    assert!(all_final, "not every message was completed");
    let recs = stream_records(&mut c).await;
    for id in &ids {
        let n = recs.iter().filter(|(m, r)| m == id && r == "delivered").count();
        assert_eq!(n, 1, "{id}: {n} delivered records when its completion was stored");
    }
    a.relay.shutdown().await;
}
