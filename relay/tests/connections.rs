//! `maxConnections` across relays, on a real redis-server and real SMTP: two relays on one Redis
//! never hold more connections to the upstream than the route allows between them; a job
//! without a free slot is paced (not failed, no attempt counted); a crashed relay's lease runs
//! out by itself; a connection gives its slot back when it closes (messages per connection
//! reached, broken, idle timeout, shutdown), and reusing a pooled connection needs no new slot.

use std::time::Duration;

use mailroute_api::Manifests;
use mailroute_api::config::{CompiledRoute, RelaySecrets};
use mailroute_relay::clock::now_ms;
use mailroute_relay::observe::dlog::{DeliveryEvent, EventFilter, EventResult};
use mailroute_relay::outbound::delivery::{
    Deliverer, DelivererConfig, DeliveryTarget, Envelope, NoSlot, Outcome, StaticResolver,
};
use mailroute_relay::outbound::pacing::ConnectionSlots;
use mailroute_relay::outbound::shaping::{Pacer, RedisPaceStore};
use mailroute_relay::outbound::transport::apply_connection_limits;
use mailroute_relay::server::RelayOptions;
use mailroute_testkit::{Behaviour, RedisServer, Script, SmtpServer};

use crate::common::*;

/// The relay's default Redis key prefix.
const PREFIX: &str = "{mailroute}:";

/// A smarthost route (see [`route`]) with `limits` (flow YAML).
fn limited(name: &str, port: u16, limits: &str) -> String {
    route(name, port, 10, &["*"]).replace("  priority: 10\n", &format!("  priority: 10\n  limits: {limits}\n"))
}

fn lease_key(route_id: &str) -> String {
    format!("{PREFIX}pace:conn:route:{route_id}")
}

/// The connection leases held for `route_id` (expired ones included until someone connects).
async fn leases(redis: &RedisServer, route_id: &str) -> Vec<String> {
    let mut c = redis_connection(redis).await;
    redis::cmd("ZRANGE")
        .arg(lease_key(route_id))
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap()
}

fn paced(r: &TestRelay, route_id: &str) -> u64 {
    r.relay
        .metrics()
        .paced_jobs
        .with_label_values(&[route_id, "connections"])
        .get()
}

fn attempts(r: &TestRelay, route_id: &str, result: &str) -> u64 {
    r.relay
        .metrics()
        .delivery_attempts
        .with_label_values(&[route_id, result, "-"])
        .get()
}

/// Every delivery log event of the relays' shared Redis.
async fn events(r: &TestRelay) -> Vec<DeliveryEvent> {
    r.relay
        .telemetry
        .dlog
        .query(&EventFilter::default(), None, 1000)
        .await
        .unwrap()
        .events
}

async fn delivered(r: &TestRelay) -> Vec<DeliveryEvent> {
    events(r)
        .await
        .into_iter()
        .filter(|e| e.result == EventResult::Delivered)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_hold_one_connection_between_them() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let cfg = limited("one", up.port(), "{maxConnections: 1}");
    // Idle connections stay long enough for the other relay to find the slot taken.
    let tweak = |o: &mut RelayOptions| o.outbound_idle_timeout = Duration::from_secs(1);
    let a = start(&cfg, &redis.url(), tweak).await;
    let b = start(&cfg, &redis.url(), tweak).await;
    const N: usize = 20;
    let send = async |addr: std::net::SocketAddr, tag: &str| {
        for i in 0..N / 2 {
            let rcpt = format!("{tag}{i}@example.com");
            let t = submit(addr, "app@app.example", &[&rcpt], &message(&format!("{tag}{i}"), "")).await;
            assert!(t.delivered(), "{t}");
        }
    };
    tokio::join!(send(a.smtp(), "a"), send(b.smtp(), "b"));
    assert_eq!(up.wait_for(N, WAIT).await.unwrap().len(), N);
    assert_eq!(
        up.max_open_sessions(),
        1,
        "the upstream saw more than one connection at once ({} in all)",
        up.connections()
    );
    assert!(
        paced(&a, "mail/one") + paced(&b, "mail/one") >= 1,
        "the slot was never contended: the test proves nothing"
    );
    // Waiting for a slot is no failed attempt: every recipient went out on its first.
    let (ar, rd) = (&a, &redis);
    assert!(eventually(move || async move { delivered(ar).await.len() == N }).await);
    let all = events(&a).await;
    assert!(
        all.iter()
            .all(|e| matches!(e.result, EventResult::Received | EventResult::Delivered)),
        "{all:#?}"
    );
    assert!(delivered(&a).await.iter().all(|e| e.attempt == Some(1)));
    for r in [&a, &b] {
        assert_eq!(attempts(r, "mail/one", "deferred"), 0);
        assert_eq!(attempts(r, "mail/one", "bounced"), 0);
    }
    // The idle connection closes after its timeout and frees the slot.
    assert!(eventually(move || async move { leases(rd, "mail/one").await.is_empty() }).await);
    assert_eq!(up.open_sessions(), 0);
    a.relay.shutdown().await;
    b.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_relays_lease_runs_out_and_the_waiting_job_is_paced_not_failed() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&limited("one", up.port(), "{maxConnections: 1}"), &redis.url(), |_| {}).await;
    // A relay that crashed while connected left its lease behind, 3 s from running out.
    let expires = now_ms() + 3_000;
    let mut c = redis_connection(&redis).await;
    let _: i64 = redis::cmd("ZADD")
        .arg(lease_key("mail/one"))
        .arg(expires)
        .arg("crashed-relay")
        .query_async(&mut c)
        .await
        .unwrap();
    let t = submit(r.smtp(), "app@app.example", &["u@example.com"], &message("c", "")).await;
    assert!(t.delivered(), "{t}");
    let rr = &r;
    assert!(eventually(move || async move { paced(rr, "mail/one") >= 1 }).await);
    let connections = up.connections();
    assert!(now_ms() < expires, "the machine is too slow for this test");
    assert_eq!(connections, 0, "connected while another relay held the only slot");
    up.wait_for(1, WAIT).await.unwrap();
    assert!(eventually(move || async move { delivered(rr).await.len() == 1 }).await);
    assert_eq!(delivered(&r).await[0].attempt, Some(1), "waiting burned no attempt");
    assert_eq!(attempts(&r, "mail/one", "deferred"), 0);
    assert_eq!(up.attempts(), 1);
    // The idle connection holds the slot (the crashed lease is gone) until shutdown frees it.
    let held = leases(&redis, "mail/one").await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_ne!(held[0], "crashed-relay");
    assert_eq!(up.open_sessions(), 1);
    r.relay.shutdown().await;
    assert_eq!(leases(&redis, "mail/one").await, Vec::<String>::new());
    assert_eq!(up.open_sessions(), 0, "QUIT before the slot was freed");
}

fn compiled(name: &str, port: u16, limits: &str) -> CompiledRoute {
    let c = Manifests::from_yaml(&limited(name, port, limits), "mail")
        .unwrap()
        .compile();
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    c.config.routes.into_iter().next().unwrap()
}

/// A relay's deliverer and pacer ("a pod"), sharing `redis` with the others.
async fn pod(redis: &RedisServer, idle_timeout: Duration) -> (Deliverer, Pacer) {
    let d = Deliverer::new(
        DelivererConfig {
            helo_name: "relay.test".into(),
            idle_timeout,
            ..DelivererConfig::default()
        },
        std::sync::Arc::new(StaticResolver::new()),
    )
    .unwrap();
    let store = RedisPaceStore::connect(&redis.url(), PREFIX).await.unwrap();
    (d, Pacer::new(std::sync::Arc::new(store)))
}

async fn send_via(
    (d, pacer): &(Deliverer, Pacer),
    route: &CompiledRoute,
    rcpt: &str,
) -> Result<mailroute_relay::outbound::delivery::AttemptResult, NoSlot> {
    let domain = rcpt.split_once('@').map_or("", |(_, d)| d);
    let gate = ConnectionSlots {
        pacer,
        route,
        rcpt_domain: domain,
    };
    let env = Envelope {
        mail_from: "app@app.example",
        rcpt_to: rcpt,
    };
    let mut target = DeliveryTarget::from_route(route, &RelaySecrets::default());
    apply_connection_limits(&mut target, route, domain);
    d.deliver_gated(&target, None, None, &env, &message(rcpt, ""), &gate)
        .await
}

#[tokio::test]
async fn a_connection_gives_its_slot_back_when_it_closes() {
    let redis = RedisServer::start().unwrap();
    let long = Duration::from_secs(30);
    let (p1, p2) = (pod(&redis, long).await, pod(&redis, long).await);

    // Held while idle; the other pod gets no connection, a reused one needs no new slot.
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = compiled("idle", up.port(), "{maxConnections: 1}");
    assert!(send_via(&p1, &r, "a@example.com").await.unwrap().is_delivered());
    assert_eq!(leases(&redis, "mail/idle").await.len(), 1);
    let before = now_ms();
    let Err(NoSlot { at_ms }) = send_via(&p2, &r, "b@example.com").await else {
        panic!("the other pod connected while the slot was held")
    };
    assert!(
        at_ms >= before + 2_000 && at_ms < now_ms() + 2_250,
        "retry in about 2 s: {at_ms}"
    );
    let again = send_via(&p1, &r, "c@example.com").await.unwrap();
    assert!(again.is_delivered() && again.reused_connection, "{again:?}");
    p1.0.close_idle().await;
    assert!(leases(&redis, "mail/idle").await.is_empty(), "closing freed the slot");
    assert!(send_via(&p2, &r, "b@example.com").await.unwrap().is_delivered());
    assert_eq!(up.max_open_sessions(), 1);
    p2.0.close_idle().await;

    // Spent after one message: closed (QUIT answered) and the slot free before the call returns.
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = compiled("spent", up.port(), "{maxConnections: 1, messagesPerConnection: 1}");
    for (i, p) in [&p1, &p2, &p1, &p2].into_iter().enumerate() {
        let res = send_via(p, &r, &format!("s{i}@example.com")).await.unwrap();
        assert!(res.is_delivered(), "{res:?}");
        assert!(leases(&redis, "mail/spent").await.is_empty());
    }
    assert_eq!((up.connections(), up.max_open_sessions()), (4, 1));

    // Broken under the message: discarded, slot freed; the next connection gets it.
    let up = SmtpServer::start(Script::new().then(Behaviour::Drop)).unwrap();
    let r = compiled("broken", up.port(), "{maxConnections: 1}");
    let res = send_via(&p1, &r, "x@example.com").await.unwrap();
    assert!(matches!(res.outcome, Outcome::Failed { .. }), "{res:?}");
    assert!(leases(&redis, "mail/broken").await.is_empty());
    assert!(send_via(&p2, &r, "y@example.com").await.unwrap().is_delivered());
    p2.0.close_idle().await;

    // Idle timeout: the pool's reaper closes the connection and frees the slot.
    let p3 = pod(&redis, Duration::from_millis(200)).await;
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = compiled("reaped", up.port(), "{maxConnections: 1}");
    assert!(send_via(&p3, &r, "z@example.com").await.unwrap().is_delivered());
    assert_eq!(leases(&redis, "mail/reaped").await.len(), 1);
    let rd = &redis;
    assert!(eventually(move || async move { leases(rd, "mail/reaped").await.is_empty() }).await);
    assert_eq!(up.open_sessions(), 0);

    // A domain with limits of its own has its own pool; the route's only slot is held by this
    // pod's idle connection in the other pool: that one is closed to make room.
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = compiled(
        "scoped",
        up.port(),
        "{maxConnections: 1, perDestination: [{domains: [strict.example], messagesPerConnection: 5}]}",
    );
    assert!(send_via(&p1, &r, "a@example.com").await.unwrap().is_delivered());
    assert!(send_via(&p1, &r, "b@strict.example").await.unwrap().is_delivered());
    assert_eq!((up.connections(), up.max_open_sessions()), (2, 1));
    assert_eq!(leases(&redis, "mail/scoped").await.len(), 1);
    // Another pod's idle connection is not ours to close.
    assert!(send_via(&p2, &r, "c@example.com").await.is_err());
    p1.0.close_idle().await;

    // No maxConnections: no lease is ever written.
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = compiled("free", up.port(), "{messagesPerConnection: 5}");
    assert!(send_via(&p1, &r, "f@example.com").await.unwrap().is_delivered());
    let mut c = redis_connection(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{PREFIX}pace:conn:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(keys.iter().all(|k| !k.contains("mail/free")), "{keys:?}");
}

/// A relay in a runtime of its own, so that the test can crash it: dropping the runtime ends
/// every task at once, as SIGKILL would (nothing completes, no lease is renewed any more).
struct CrashableRelay {
    smtp: std::net::SocketAddr,
    crash: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl CrashableRelay {
    fn start(routes: String, queue: String, workers: usize) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (crash, crash_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let relay = rt.block_on(start(&routes, &queue, |o| o.workers = workers));
            addr_tx.send(relay.smtp()).unwrap();
            let _ = crash_rx.recv();
            rt.shutdown_background();
            drop(relay);
        });
        let smtp = addr_rx.recv().expect("relay started");
        CrashableRelay { smtp, crash, thread }
    }

    fn crash(self) {
        let _ = self.crash.send(());
        self.thread.join().expect("relay thread");
    }
}

/// An upstream that accepts TCP connections and never writes a byte; counts the connections.
async fn black_hole() -> (
    u16,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    (port, accepted, task)
}

/// One black-holed route must not stall the others: with 100 jobs queued for an upstream that
/// accepts connections and never answers, the relay (64 workers, the default) still delivers a
/// healthy route's mail at once. Jobs whose route has no free connection go back to the schedule
/// instead of waiting in a worker; they stay in Redis, so a relay crash loses none of them, and
/// another relay delivers each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_route_does_not_stall_the_others() {
    let redis = RedisServer::start().unwrap();
    let (hole_port, hole_connections, hole) = black_hole().await;
    let up = SmtpServer::start(Script::new()).unwrap();
    let routes = route("hole", hole_port, 10, &["hole.example"]) + &route("ok", up.port(), 10, &["ok.example"]);
    let a = CrashableRelay::start(routes, redis.url(), 64);

    for i in 0..100 {
        let t = submit(
            a.smtp,
            "app@app.example",
            &[&format!("h{i}@hole.example")],
            &message(&format!("hole-{i}"), ""),
        )
        .await;
        assert!(t.delivered(), "{t}");
    }
    for i in 0..20 {
        let t = submit(
            a.smtp,
            "app@app.example",
            &[&format!("k{i}@ok.example")],
            &message(&format!("ok-{i}"), ""),
        )
        .await;
        assert!(t.delivered(), "{t}");
    }
    let got = up.wait_for(20, WAIT).await;
    assert!(
        got.is_ok(),
        "the healthy route delivered {} of 20 within {WAIT:?}",
        up.received().len()
    );
    let hole_seen = hole_connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        hole_seen >= 1,
        "the black hole was never reached: the test proves nothing"
    );
    // The route's connection limit in this process (10 by default) bounds what the black hole holds.
    assert!(hole_seen <= 10, "{hole_seen} connections to the black hole");

    // Every black-holed job is still queued: none bounced, expired, deferred or delivered.
    let watcher = start(&route("ok", up.port(), 10, &["ok.example"]), &redis.url(), |o| {
        o.workers = 0
    })
    .await;
    let stats = watcher.relay.queue.stats(now_ms()).await.unwrap();
    assert_eq!(stats.messages, 100, "{stats:?}");
    assert_eq!(stats.ready + stats.inflight + stats.scheduled, 100, "{stats:?}");
    let hole_results: Vec<EventResult> = events(&watcher)
        .await
        .into_iter()
        .filter(|e| e.recipient.ends_with("@hole.example"))
        .map(|e| e.result)
        .filter(|r| *r != EventResult::Received)
        .collect();
    assert!(hole_results.is_empty(), "{hole_results:?}");
    watcher.relay.shutdown().await;

    // The relay dies with jobs in flight to the black hole and jobs parked in the schedule.
    a.crash();
    hole.abort();
    // Parked jobs come back when the pool expects a free slot (up to minutes for a black hole):
    // due now, so that the next relay need not wait for them.
    let mut c = redis_connection(&redis).await;
    let _: () = redis::Script::new(
        "for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do redis.call('ZADD', KEYS[1], 0, m) end",
    )
    .key(format!("{PREFIX}sched"))
    .invoke_async(&mut c)
    .await
    .unwrap();

    // Another relay, the route's upstream repaired: each black-holed message arrives once.
    let repaired = SmtpServer::start(Script::new()).unwrap();
    let routes = route("hole", repaired.port(), 10, &["hole.example"]) + &route("ok", up.port(), 10, &["ok.example"]);
    let b = start(&routes, &redis.url(), |o| o.workers = 64).await;
    repaired.wait_for(100, WAIT * 2).await.unwrap();
    let br = &b;
    assert!(
        eventually(move || async move {
            let s = br.relay.queue.stats(now_ms()).await.unwrap();
            s.ready + s.inflight + s.scheduled == 0
        })
        .await
    );
    let mut markers: Vec<String> = repaired
        .received()
        .iter()
        .map(|m| {
            let text = m.data_str();
            let start = text.find("hole-").expect("marker");
            text[start..]
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches('.')
                .to_owned()
        })
        .collect();
    assert_eq!(markers.len(), 100, "delivered twice: {} messages", markers.len());
    markers.sort();
    markers.dedup();
    assert_eq!(markers.len(), 100);
    assert_eq!(up.received().len(), 20);
    b.relay.shutdown().await;
}

/// A route's `timeouts` reach its sessions through the compiled configuration: a greeting that
/// never comes and a final reply that comes too late each fail the attempt at that step, as a
/// timeout, after the route's time and not Postfix's default (300 s, 600 s).
#[tokio::test]
async fn route_timeouts_reach_the_session() {
    use mailroute_relay::outbound::bounce::Failure;
    use mailroute_relay::outbound::delivery::Stage;

    let with_timeouts = |name: &str, port: u16, timeouts: &str| {
        let yaml = route(name, port, 10, &["*"])
            .replace("  priority: 10\n", &format!("  priority: 10\n  timeouts: {timeouts}\n"));
        let c = Manifests::from_yaml(&yaml, "mail").unwrap().compile();
        assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
        DeliveryTarget::from_route(&c.config.routes[0], &RelaySecrets::default())
    };
    let d = Deliverer::new(
        DelivererConfig {
            helo_name: "relay.test".into(),
            ..DelivererConfig::default()
        },
        std::sync::Arc::new(StaticResolver::new()),
    )
    .unwrap();
    let env = Envelope {
        mail_from: "app@app.example",
        rcpt_to: "u@example.com",
    };
    let failure = |r: &mailroute_relay::outbound::delivery::AttemptResult| match &r.outcome {
        Outcome::Failed { stage, failure, .. } => Some((*stage, *failure)),
        _ => None,
    };

    let (hole_port, _, hole) = black_hole().await;
    let target = with_timeouts("silent", hole_port, "{greeting: 1s}");
    assert_eq!(target.timeouts.greeting_ms, 1_000);
    let started = std::time::Instant::now();
    let r = d.deliver(&target, None, None, &env, &message("silent", "")).await;
    assert_eq!(failure(&r), Some((Stage::Greeting, Failure::Timeout)), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    hole.abort();

    let slow = SmtpServer::start(Script::new().then(Behaviour::AcceptAfter(Duration::from_secs(120)))).unwrap();
    let target = with_timeouts("slow", slow.port(), "{dataDone: 1s}");
    let started = std::time::Instant::now();
    let r = d.deliver(&target, None, None, &env, &message("slow", "")).await;
    assert_eq!(failure(&r), Some((Stage::Message, Failure::Timeout)), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
}

/// The steps of a transaction share one timer per connection (`mailroute_smtp::client`'s
/// `Alarm`), and each keeps its own limit: a final reply that takes longer than the shortest
/// limit but less than its own is still awaited, and on the same (reused) connection a pipelined
/// envelope that is never answered is cut off after the envelope's limit, as a timeout at MAIL.
#[tokio::test]
async fn each_step_keeps_its_own_limit_on_the_connection_s_one_timer() {
    use mailroute_relay::outbound::bounce::Failure;
    use mailroute_relay::outbound::delivery::Stage;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    // An upstream that answers the first transaction's final dot after 1.5 s and never answers
    // the second transaction's envelope (its socket stays open).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(b"220 mute.test ESMTP\r\n").await.unwrap();
        let (mut transactions, mut in_data) = (0, false);
        while let Ok(Some(line)) = lines.next_line().await {
            if in_data {
                if line == "." {
                    in_data = false;
                    tokio::time::sleep(Duration::from_millis(1_500)).await;
                    write.write_all(b"250 2.0.0 queued\r\n").await.unwrap();
                }
                continue;
            }
            let upper = line.to_ascii_uppercase();
            if upper.starts_with("EHLO") {
                write.write_all(b"250-mute.test\r\n250 PIPELINING\r\n").await.unwrap();
            } else if upper.starts_with("MAIL") {
                transactions += 1;
                if transactions == 2 {
                    // Holds the connection without a word.
                    std::future::pending::<()>().await;
                }
                write.write_all(b"250 2.1.0 ok\r\n").await.unwrap();
            } else if upper.starts_with("RCPT") {
                write.write_all(b"250 2.1.5 ok\r\n").await.unwrap();
            } else if upper == "DATA" {
                in_data = true;
                write.write_all(b"354 go ahead\r\n").await.unwrap();
            } else {
                write.write_all(b"250 ok\r\n").await.unwrap();
            }
        }
    });

    let yaml = route("mute", port, 10, &["*"]).replace(
        "  priority: 10\n",
        "  priority: 10\n  timeouts: {mail: 1s, rcpt: 1s, dataInit: 1s}\n",
    );
    let c = Manifests::from_yaml(&yaml, "mail").unwrap().compile();
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    let target = DeliveryTarget::from_route(&c.config.routes[0], &RelaySecrets::default());
    let d = Deliverer::new(
        DelivererConfig {
            helo_name: "relay.test".into(),
            ..DelivererConfig::default()
        },
        std::sync::Arc::new(StaticResolver::new()),
    )
    .unwrap();
    let env = Envelope {
        mail_from: "app@app.example",
        rcpt_to: "u@example.com",
    };

    let r = d.deliver(&target, None, None, &env, &message("slow-dot", "")).await;
    assert!(
        matches!(r.outcome, Outcome::Delivered { .. }),
        "a reply within the end-of-data limit (600 s) is awaited past the 1 s limits: {r:?}"
    );

    let started = std::time::Instant::now();
    let r = d.deliver(&target, None, None, &env, &message("mute", "")).await;
    match &r.outcome {
        Outcome::Failed { stage, failure, .. } => assert_eq!((*stage, *failure), (Stage::MailFrom, Failure::Timeout)),
        other => panic!("expected a timeout at MAIL, got {other:?}"),
    }
    assert!(r.reused_connection, "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    server.abort();
}
