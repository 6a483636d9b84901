//! Graceful drain: the drain timeout bounds the whole shutdown, however many of its steps are
//! held up (a session that never finishes, a delivery at a slow upstream, an idle connection
//! whose QUIT is never answered), and mail the relay accepted stays queued.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::common::*;
use mailroute_testkit::smtp::client::SmtpClient;
use mailroute_testkit::{Behaviour, Gate, RedisServer, Script, SmtpServer};

fn delivered(r: &TestRelay, route: &str) -> u64 {
    r.relay
        .metrics()
        .delivery_attempts
        .with_label_values(&[route, "delivered", "-"])
        .get()
}

/// Every step of the drain is held up at once. Each step used to get the whole drain timeout
/// (three in a row here); one deadline now bounds them together. Asserted: under two drain
/// timeouts, a margin of a whole timeout for a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deadline_bounds_the_whole_drain_and_accepted_mail_stays_queued() {
    const DRAIN: Duration = Duration::from_secs(5);
    let redis = RedisServer::start().unwrap();
    let gate = Gate::new();
    let slow = SmtpServer::start(Script::new().default_behaviour(Behaviour::AcceptWhenOpen(gate.clone()))).unwrap();
    // Accepts every message and never answers QUIT, so closing its idle pooled connection
    // lasts until the QUIT times out (minutes with a route's default timeouts).
    let quiet = SmtpServer::start(Script::new().ignore_quit(true)).unwrap();
    let quiet_port = quiet.port();
    let routes = format!(
        "{}{}",
        route("quiet", quiet_port, 10, &["quiet.example"]),
        route("up", slow.port(), 10, &["example.com"])
    );
    let r = start(&routes, &redis.url(), |o| {
        o.drain_timeout = DRAIN;
        // The delivered connection stays pooled until the drain closes it.
        o.outbound_idle_timeout = Duration::from_secs(3600);
    })
    .await;

    // An idle pooled connection to the upstream that never answers QUIT.
    let t = submit(
        r.smtp(),
        "app@app.example",
        &["user@quiet.example"],
        &message("idle", ""),
    )
    .await;
    assert!(t.delivered(), "{t}");
    assert!(
        eventually(|| async { delivered(&r, "mail/quiet") == 1 }).await,
        "the first message is delivered and its connection pooled"
    );
    // A delivery in flight, its 250 held by the upstream.
    let t = submit(r.smtp(), "app@app.example", &["user@example.com"], &message("held", "")).await;
    assert!(t.delivered(), "{t}");
    assert!(
        eventually(|| async { gate.waiting() == 1 }).await,
        "the second delivery reaches the upstream"
    );
    // A session in DATA whose client never sends the end of the message.
    let mut stuck = SmtpClient::connect(r.smtp()).await.unwrap();
    assert_eq!(stuck.ehlo("client.example").await.unwrap().code, 250);
    assert_eq!(stuck.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
    assert_eq!(stuck.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
    assert_eq!(stuck.cmd("DATA").await.unwrap().code, 354);
    stuck
        .send_raw(b"Subject: never ends\r\n\r\nfirst half\r\n")
        .await
        .unwrap();

    let smtp = r.smtp();
    let queue = r.relay.queue.clone();
    let TestRelay { relay, dir: _dir } = r;
    let began = Instant::now();
    tokio::time::timeout(WAIT, relay.shutdown())
        .await
        .expect("shutdown returns");
    let took = began.elapsed();
    assert!(
        took < 2 * DRAIN,
        "the drain took {took:?} with a drain timeout of {DRAIN:?}: each step waited its own timeout"
    );

    // New sessions are refused once the drain began.
    assert!(TcpStream::connect(smtp).await.is_err(), "the listener is closed");
    // The held delivery has no outcome: its message is still queued, its job given back for
    // another relay to take over; nothing was delivered twice or dropped.
    let stats = queue.stats(mailroute_relay::clock::now_ms()).await.unwrap();
    assert_eq!((stats.messages, stats.inflight), (1, 1), "{stats:?}");
    assert!(slow.received().is_empty(), "the held delivery never got its 250");
}

/// A delivery still in flight at the drain deadline gives its job back: another relay takes it
/// over at its next reclaim instead of after the visibility timeout (a minute here; the test
/// waits half that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_cut_off_by_the_drain_deadline_is_taken_over_without_waiting_for_the_visibility_timeout() {
    const VISIBILITY: Duration = Duration::from_secs(60);
    let redis = RedisServer::start().unwrap();
    let gate = Gate::new();
    let slow = SmtpServer::start(Script::new().default_behaviour(Behaviour::AcceptWhenOpen(gate.clone()))).unwrap();
    let fine = SmtpServer::start(Script::new()).unwrap();
    let a = start(&route("up", slow.port(), 10, &["*"]), &redis.url(), |o| {
        o.drain_timeout = Duration::from_secs(3);
        o.visibility_timeout = VISIBILITY;
    })
    .await;
    let t = submit(a.smtp(), "app@app.example", &["user@example.com"], &message("cut", "")).await;
    assert!(t.delivered(), "{t}");
    assert!(
        eventually(|| async { gate.waiting() == 1 }).await,
        "relay A's delivery reaches the upstream that holds its 250"
    );
    // Relay B, same queue, an upstream that answers; its reclaim looks every 15 s for jobs
    // idle for the visibility timeout.
    let b = start(&route("up", fine.port(), 10, &["*"]), &redis.url(), |o| {
        o.visibility_timeout = VISIBILITY;
    })
    .await;

    let TestRelay { relay, dir: _dir } = a;
    let began = Instant::now();
    tokio::time::timeout(WAIT, relay.shutdown())
        .await
        .expect("shutdown returns");
    assert!(
        began.elapsed() < Duration::from_secs(6),
        "drain took {:?}",
        began.elapsed()
    );

    let taken_over = async {
        while fine.received().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert!(
        tokio::time::timeout(VISIBILITY / 2, taken_over).await.is_ok(),
        "relay B did not take the job over within half the visibility timeout"
    );
    assert!(slow.received().is_empty(), "relay A never got its 250");
    b.relay.shutdown().await;
}
