//! Once the relay said 250, the message is delivered or bounced, whatever crashes: a relay
//! killed with SIGKILL mid-flight, Redis killed and restarted with AOF (also while outcomes
//! wait to be written), and two relays sharing one Redis (each message delivered once). Any
//! other reply means not delivered (`--wait-replicas` without a replica). Consumers of stopped
//! relays are removed.

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use mailroute_relay::queue::redis::Durability;
use mailroute_testkit::smtp::client::SmtpClient;
use mailroute_testkit::{Behaviour, Gate, RedisServer, Script, SmtpServer};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The relay binary as a child process (so it can be SIGKILLed).
fn spawn_relay(routes: &std::path::Path, redis: &str, smtp_port: u16, workers: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
        .args([
            "run",
            "--queue",
            redis,
            "--smtp-listen",
            &format!("127.0.0.1:{smtp_port}"),
            "--admin-listen",
            "",
        ])
        .args([
            "--routes",
            routes.to_str().unwrap(),
            "--visibility-timeout",
            "2s",
            "--no-log-stdout",
        ])
        .args(["--workers", &workers.to_string(), "--hostname", "relay.test"])
        .env("MAILROUTE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn relay")
}

/// Messages `r` delivered through the route `mail/up`.
fn delivered(r: &TestRelay) -> u64 {
    r.relay
        .metrics()
        .delivery_attempts
        .with_label_values(&["mail/up", "delivered", "-"])
        .get()
}

async fn connect_when_up(port: u16) -> SmtpClient {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match SmtpClient::connect(([127, 0, 0, 1], port).into()).await {
            Ok(c) => return c,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("relay did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Sends `markers` in one session; returns the markers answered 250 (stops at the first error).
async fn send_all(port: u16, markers: &[String]) -> Vec<String> {
    let mut c = connect_when_up(port).await;
    let mut accepted = Vec::new();
    if c.ehlo("client.test").await.is_err() {
        return accepted;
    }
    for m in markers {
        let ok = async {
            let r = c.cmd("MAIL FROM:<app@app.example>").await?;
            anyhow::ensure!(r.is_positive());
            let r = c.cmd("RCPT TO:<user@example.com>").await?;
            anyhow::ensure!(r.is_positive());
            let r = c.data(&message(m, "")).await?;
            Ok::<bool, anyhow::Error>(r.is_positive())
        }
        .await;
        match ok {
            Ok(true) => accepted.push(m.clone()),
            _ => break,
        }
    }
    accepted
}

fn marker_of(data: &str) -> Option<String> {
    data.lines()
        .find_map(|l| l.strip_prefix("Subject: test "))
        .map(|s| s.trim().to_owned())
}

fn delivered_markers(up: &SmtpServer) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in up.received() {
        if let Some(k) = marker_of(&r.data_str()) {
            *m.entry(k).or_insert(0) += 1;
        }
    }
    m
}

async fn wait_all_delivered(up: &SmtpServer, want: &BTreeSet<String>) -> HashMap<String, usize> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = delivered_markers(up);
        if want.iter().all(|m| got.contains_key(m)) {
            return got;
        }
        if tokio::time::Instant::now() > deadline {
            let missing: Vec<_> = want.iter().filter(|m| !got.contains_key(*m)).collect();
            panic!("{} of {} never delivered: {missing:?}", missing.len(), want.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_flight_loses_nothing() {
    let redis = RedisServer::builder().aof(true).start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(&routes, route("up", up.port(), 10, &["*"])).unwrap();
    let port = free_port();
    let mut relay = spawn_relay(&routes, &redis.url(), port, 4);

    let markers: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    let sender = tokio::spawn({
        let markers = markers.clone();
        async move { send_all(port, &markers).await }
    });
    // Kill once deliveries are flowing: some delivered, others queued or in flight.
    up.wait_for(20, WAIT).await.unwrap();
    relay.kill().unwrap();
    relay.wait().unwrap();
    let accepted_before = sender.await.unwrap();
    // 19: the message whose 250 was on its way when the kill landed may be among the 20
    // delivered (a worker can take a job before the session's reply reaches the client).
    assert!(
        accepted_before.len() >= 19 && accepted_before.len() < 200,
        "kill landed mid-run: {}",
        accepted_before.len()
    );

    // Restart; send what was not accepted before.
    let mut relay = spawn_relay(&routes, &redis.url(), port, 4);
    let rest: Vec<String> = markers
        .iter()
        .filter(|m| !accepted_before.contains(m))
        .cloned()
        .collect();
    let accepted_after = send_all(port, &rest).await;
    assert_eq!(accepted_after.len(), rest.len());

    let want: BTreeSet<String> = accepted_before.iter().chain(&accepted_after).cloned().collect();
    let got = wait_all_delivered(&up, &want).await;
    // At least once: only jobs in flight at the kill may be delivered twice.
    let dups: usize = got.values().map(|n| n - 1).sum();
    assert!(dups <= 8, "{dups} duplicates");
    relay.kill().unwrap();
    relay.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_with_aof_loses_nothing() {
    let mut redis = RedisServer::builder().aof(true).start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    // Accept only: nothing is delivered before the crash.
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| o.workers = 0).await;
    let markers: Vec<String> = (0..50).map(|i| format!("a{i}")).collect();
    let accepted = send_all(r.smtp().port(), &markers).await;
    assert_eq!(accepted.len(), 50);
    r.relay.shutdown().await;

    redis.kill();
    redis.restart().unwrap();

    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |_| {}).await;
    let got = wait_all_delivered(&up, &markers.iter().cloned().collect()).await;
    assert_eq!(got.len(), 50);
    assert!(got.values().all(|n| *n == 1));
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_redis_deliver_each_message_once() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let routes = route("up", up.port(), 10, &["*"]);
    let a = start(&routes, &redis.url(), |o| o.consumer = "relay-a".into()).await;
    let b = start(&routes, &redis.url(), |o| o.consumer = "relay-b".into()).await;
    let ma: Vec<String> = (0..100).map(|i| format!("a{i}")).collect();
    let mb: Vec<String> = (0..100).map(|i| format!("b{i}")).collect();
    let (ra, rb) = tokio::join!(send_all(a.smtp().port(), &ma), send_all(b.smtp().port(), &mb));
    assert_eq!(ra.len() + rb.len(), 200);
    let want: BTreeSet<String> = ma.iter().chain(&mb).cloned().collect();
    let got = wait_all_delivered(&up, &want).await;
    assert_eq!(got.len(), 200);
    assert!(got.values().all(|n| *n == 1), "every message exactly once");
    assert_eq!(up.received().len(), 200);
    // Both relays took part in delivering. The upstream holds a message before the relay has
    // read its 250 and counted it: wait for the counters.
    assert!(eventually(|| async { delivered(&a) + delivered(&b) == 200 }).await);
    let (da, db) = (delivered(&a), delivered(&b));
    assert_eq!(da + db, 200);
    assert!(da > 0 && db > 0, "a={da} b={db}");
    a.relay.shutdown().await;
    b.relay.shutdown().await;
}

/// A delivery slower than the visibility timeout keeps its lease: the relay working on it
/// renews it, so the other relay never takes the job over and the upstream gets it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_slower_than_the_visibility_timeout_is_not_taken_over() {
    let redis = RedisServer::start().unwrap();
    // The first message's end of DATA is answered after three visibility timeouts; a copy
    // sent by a relay that took the job over would be accepted at once.
    let up = SmtpServer::start(Script::new().then(Behaviour::AcceptAfter(Duration::from_secs(6)))).unwrap();
    let routes = route("up", up.port(), 10, &["*"]);
    let url = redis.url();
    let relay = |name: &'static str| {
        start(&routes, &url, move |o| {
            o.consumer = name.into();
            o.visibility_timeout = Duration::from_secs(2);
        })
    };
    let a = relay("relay-a").await;
    let b = relay("relay-b").await;
    assert!(
        submit(a.smtp(), "app@app.example", &["user@example.com"], &message("slow", ""))
            .await
            .delivered()
    );
    assert!(eventually(|| async { delivered(&a) + delivered(&b) == 1 }).await);
    assert_eq!(up.received().len(), 1);
    assert_eq!(up.attempts(), 1, "nobody tried a second copy");
    for r in [&a, &b] {
        assert_eq!(r.relay.metrics().jobs_reclaimed.get(), 0);
    }
    a.relay.shutdown().await;
    b.relay.shutdown().await;
}

/// The queue's keys in Redis under the default prefix: (ready stream length, jobs leased,
/// scheduled jobs, stored messages).
async fn queue_keys(c: &mut redis::aio::MultiplexedConnection) -> (i64, i64, i64, i64) {
    let (ready, pending, sched, count): (i64, redis::Value, i64, Option<i64>) = redis::pipe()
        .cmd("XLEN")
        .arg("{mailroute}:ready")
        .cmd("XPENDING")
        .arg("{mailroute}:ready")
        .arg("relays")
        .cmd("ZCARD")
        .arg("{mailroute}:sched")
        .cmd("GET")
        .arg("{mailroute}:messages")
        .query_async(c)
        .await
        .unwrap();
    let leased = match pending {
        redis::Value::Array(a) => a
            .first()
            .map(|v| redis::from_redis_value(v.clone()).unwrap())
            .unwrap_or(0),
        _ => 0,
    };
    (ready, leased, sched, count.unwrap_or(0))
}

/// With `--wait-replicas 1` and no replica, the client gets 451 and the message is not in the
/// queue at all: no job in the ready stream or the schedule, no record (so a retry by the
/// client cannot produce a second copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_refused_for_missing_replicas_is_never_deliverable() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    // No workers: the queue's state after the reply is what a worker would find.
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.workers = 0;
        o.durability = Durability {
            replicas: 1,
            timeout: Duration::from_millis(200),
        };
    })
    .await;
    let t = submit(
        r.smtp(),
        "app@app.example",
        &["user@example.com"],
        &message("norep", ""),
    )
    .await;
    assert!(!t.delivered(), "refused without a replica");
    assert!(t.to_string().contains("451 4.3.0"), "{t}");
    let mut c = redis_connection(&redis).await;
    assert_eq!(
        queue_keys(&mut c).await,
        (0, 0, 0, 0),
        "(ready, leased, scheduled, messages)"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("{mailroute}:msg:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    r.relay.shutdown().await;
}

/// With a real replica the same relay answers 250 and delivers once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_acknowledged_by_a_replica_is_delivered_once() {
    let primary = RedisServer::start().unwrap();
    let replica = RedisServer::builder()
        .args(["--replicaof", "127.0.0.1", &primary.port().to_string()])
        .start()
        .unwrap();
    let c = redis_connection(&primary).await;
    assert!(
        eventually(|| {
            let mut c = c.clone();
            async move {
                let info: String = redis::cmd("INFO").arg("replication").query_async(&mut c).await.unwrap();
                info.contains("connected_slaves:1") && info.contains("state=online")
            }
        })
        .await,
        "replica never synced"
    );
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &primary.url(), |o| {
        o.durability = Durability {
            replicas: 1,
            timeout: Duration::from_secs(5),
        };
    })
    .await;
    let t = submit(r.smtp(), "app@app.example", &["user@example.com"], &message("rep", "")).await;
    assert!(t.delivered(), "{t}");
    let got = wait_all_delivered(&up, &["rep".to_owned()].into()).await;
    assert_eq!(got.get("rep"), Some(&1));
    assert!(
        eventually(|| {
            let mut c = c.clone();
            async move { queue_keys(&mut c).await == (0, 0, 0, 0) }
        })
        .await
    );
    r.relay.shutdown().await;
    drop(replica);
}

/// Redis is killed while deliveries are in flight, and stays away longer than the visibility
/// timeout while the upstream's 250s arrive: the relays keep those outcomes, write them once
/// Redis is back (AOF, same port), and hold their leases meanwhile, so nobody delivers a
/// finished message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_finished_while_redis_is_down_are_kept_not_redelivered() {
    let data = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::builder().aof(true).dir(data.path()).start().unwrap();
    let gate = Gate::new();
    let up = SmtpServer::start(Script::new().default_behaviour(Behaviour::AcceptWhenOpen(gate.clone()))).unwrap();
    let routes = route("up", up.port(), 10, &["*"]);
    let vt = Duration::from_secs(2);
    let url = redis.url();
    let relay = |name: &'static str| {
        start(&routes, &url, move |o| {
            o.consumer = name.into();
            o.visibility_timeout = vt;
        })
    };
    let a = relay("relay-a").await;
    let b = relay("relay-b").await;
    let markers: Vec<String> = (0..6).map(|i| format!("g{i}")).collect();
    let (ra, rb) = tokio::join!(
        send_all(a.smtp().port(), &markers[..3]),
        send_all(b.smtp().port(), &markers[3..])
    );
    assert_eq!(ra.len() + rb.len(), 6);
    // Every delivery is at the upstream, its 250 held.
    let deadline = tokio::time::Instant::now() + WAIT;
    while gate.waiting() < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} deliveries in flight",
            gate.waiting()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    redis.kill();
    gate.open();
    // The relays have their 250s; their outcomes cannot be written.
    assert!(eventually(|| async { delivered(&a) + delivered(&b) == 6 }).await);
    // The outage itself (not a synchronisation): longer than the visibility timeout, so every
    // lease looks expired when Redis is back.
    tokio::time::sleep(vt + Duration::from_secs(1)).await;
    redis.restart().unwrap();

    let mut c = redis_connection(&redis).await;
    let drained = eventually(|| {
        let mut c = c.clone();
        async move { queue_keys(&mut c).await == (0, 0, 0, 0) }
    })
    .await;
    assert!(drained, "queue left: {:?}", queue_keys(&mut c).await);
    let got = delivered_markers(&up);
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(got.values().all(|n| *n == 1), "every message exactly once: {got:?}");
    assert_eq!(up.received().len(), 6);
    for r in [&a, &b] {
        assert_eq!(r.relay.metrics().jobs_reclaimed.get(), 0);
    }
    a.relay.shutdown().await;
    b.relay.shutdown().await;
}

/// A relay removes the consumer a stopped relay left in the consumer group (it holds nothing
/// and has been idle longer than the visibility timeout), so restarts do not pile them up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_stopped_relays_are_removed() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.consumer = "live".into();
        o.visibility_timeout = Duration::from_secs(1);
    })
    .await;
    let mut c = redis_connection(&redis).await;
    // What a relay that stopped leaves: a consumer holding nothing.
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg("{mailroute}:ready")
        .arg("relays")
        .arg("dead-relay")
        .query_async(&mut c)
        .await
        .unwrap();
    let names = |c: redis::aio::MultiplexedConnection| async move {
        let mut c = c;
        let v: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg("{mailroute}:ready")
            .arg("relays")
            .query_async(&mut c)
            .await
            .unwrap();
        v.iter()
            .map(|m| redis::from_redis_value::<String>(m["name"].clone()).unwrap())
            .collect::<Vec<_>>()
    };
    assert!(names(c.clone()).await.contains(&"dead-relay".to_owned()));
    assert!(
        eventually(|| {
            let c = c.clone();
            async move { !names(c).await.contains(&"dead-relay".to_owned()) }
        })
        .await,
        "the stopped relay's consumer was never removed"
    );
    // The live relay still delivers.
    assert!(
        submit(r.smtp(), "app@app.example", &["user@example.com"], &message("live", ""))
            .await
            .delivered()
    );
    wait_all_delivered(&up, &["live".to_owned()].into()).await;
    r.relay.shutdown().await;
}
