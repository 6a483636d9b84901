//! Outbound pacing against a real `redis-server`: two pacers with their own connections (two
//! relay pods) never exceed a route's rate together; daily recipient limits, destination limits
//! for mobile carriers and connection slots are shared; a real upstream answering `421` backs
//! the route off (doubling) until a success clears it; the memory store paces like Redis.
//! The clock is injected: each decision gets its instant from the test, nothing sleeps.

use std::sync::Arc;

use futures::future::join_all;
use mailroute_api::Manifests;
use mailroute_api::config::CompiledRoute;
use mailroute_relay::inbound::quota::store::DEFAULT_PREFIX;
use mailroute_relay::outbound::bounce::Reply;
use mailroute_relay::outbound::shaping::{
    BackoffChange, Connect, MemoryPaceStore, Pace, PaceReason, PaceStore, Pacer, RedisPaceStore,
};
use mailroute_testkit::smtp::send;
use mailroute_testkit::{Behaviour, RedisServer, Script, SmtpServer};

const T0: i64 = 1_900_000_000_000;

fn route(name: &str, spec: &str) -> CompiledRoute {
    let yaml = format!(
        "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata:\n  name: {name}\n  namespace: mail\nspec:\n{spec}"
    );
    let c = Manifests::from_yaml(&yaml, "mail").unwrap().compile();
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    c.config.routes.into_iter().next().unwrap()
}

fn smarthost(name: &str, port: u16, limits: &str) -> CompiledRoute {
    route(
        name,
        &format!("  host: 127.0.0.1\n  port: {port}\n  tls:\n    mode: none\n  limits:\n{limits}"),
    )
}

async fn redis_pacer(redis: &RedisServer) -> Pacer {
    let conn = redis.client().unwrap().get_connection_manager().await.unwrap();
    Pacer::new(Arc::new(RedisPaceStore::new(conn, DEFAULT_PREFIX)))
}

/// Most events in any half-open interval of `window` (sorted input).
fn max_in_window(times: &[i64], window: i64) -> usize {
    let mut best = 0;
    let mut end = 0;
    for (start, &t) in times.iter().enumerate() {
        while end < times.len() && times[end] < t + window {
            end += 1;
        }
        best = best.max(end - start);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pacers_never_exceed_the_route_rate_together() {
    let redis = RedisServer::start().unwrap();
    let pacers = [redis_pacer(&redis).await, redis_pacer(&redis).await];
    let r = smarthost("o365", 2525, "    messagesPerMinute: 30\n");
    let mut sent = vec![];
    // Three minutes in 100 ms steps; at every step four workers (two per pod) want to send.
    for step in 0..1_800 {
        let now = T0 + step * 100;
        let attempts = (0..4).map(|w| pacers[w % 2].acquire(&r, "example.com", 1, now));
        for pace in join_all(attempts).await {
            match pace.unwrap() {
                Pace::Go => sent.push(now),
                Pace::NotBefore { at_ms, reason } => {
                    assert_eq!(reason, PaceReason::RouteRate);
                    assert!(at_ms > now && at_ms <= now + 2_000, "{at_ms} vs {now}");
                }
            }
        }
    }
    assert_eq!(sent.len(), 90, "one every 2 s for 180 s");
    assert_eq!(max_in_window(&sent, 60_000), 30);
    assert!(sent.windows(2).all(|w| w[1] - w[0] == 2_000), "{sent:?}");
}

#[tokio::test]
async fn daily_recipients_and_carrier_destinations_are_shared() {
    let redis = RedisServer::start().unwrap();
    let (a, b) = (redis_pacer(&redis).await, redis_pacer(&redis).await);

    // 10 recipients a day (rolling 24 h), counted across both pods.
    let r = smarthost("small", 2525, "    recipientsPerDay: 10\n");
    assert_eq!(a.acquire(&r, "x.example", 4, T0).await.unwrap(), Pace::Go);
    assert_eq!(b.acquire(&r, "y.example", 4, T0 + 3_600_000).await.unwrap(), Pace::Go);
    let Pace::NotBefore { at_ms, reason } = a.acquire(&r, "x.example", 3, T0 + 7_200_000).await.unwrap() else {
        panic!()
    };
    assert_eq!(reason, PaceReason::RouteDaily);
    // The first 4 leave when their hour bucket is 25 buckets old.
    let first_bucket = T0 / 3_600_000 * 3_600_000;
    assert_eq!(at_ms, first_bucket + 25 * 3_600_000);
    assert_eq!(b.acquire(&r, "x.example", 2, T0 + 7_200_000).await.unwrap(), Pace::Go);
    assert_eq!(a.acquire(&r, "x.example", 3, at_ms).await.unwrap(), Pace::Go);

    // Two MX routes share the built-in docomo.ne.jp pace (60/min, one per second).
    let mx1 = route("mx-a", "  delivery: mx\n");
    let mx2 = route("mx-b", "  delivery: mx\n  priority: 200\n");
    assert_eq!(a.acquire(&mx1, "docomo.ne.jp", 1, T0).await.unwrap(), Pace::Go);
    assert_eq!(
        b.acquire(&mx2, "DOCOMO.NE.JP", 1, T0 + 500).await.unwrap(),
        Pace::NotBefore {
            at_ms: T0 + 1_000,
            reason: PaceReason::Destination
        }
    );
    assert_eq!(b.acquire(&mx2, "docomo.ne.jp", 1, T0 + 1_000).await.unwrap(), Pace::Go);
    // Other domains, and other carriers, have their own budgets.
    assert_eq!(a.acquire(&mx1, "ezweb.ne.jp", 1, T0 + 1_000).await.unwrap(), Pace::Go);
    for i in 0..20 {
        assert_eq!(
            a.acquire(&mx1, "example.com", 1, T0 + 1_000 + i).await.unwrap(),
            Pace::Go
        );
    }
    // A route entry replaces the default: 6/min for docomo through this route.
    let slow = route(
        "mx-slow",
        "  delivery: mx\n  limits:\n    perDestination:\n    - domains: [docomo.ne.jp]\n      messagesPerMinute: 6\n",
    );
    // (The MX destination counter is shared, so it starts behind the two sends above.)
    let Pace::NotBefore { at_ms, .. } = a.acquire(&slow, "docomo.ne.jp", 1, T0 + 1_500).await.unwrap() else {
        panic!()
    };
    assert_eq!(at_ms, T0 + 2_000);
    assert_eq!(a.acquire(&slow, "docomo.ne.jp", 1, T0 + 2_000).await.unwrap(), Pace::Go);
    assert_eq!(
        a.acquire(&slow, "docomo.ne.jp", 1, T0 + 3_000).await.unwrap(),
        Pace::NotBefore {
            at_ms: T0 + 12_000,
            reason: PaceReason::Destination
        }
    );

    // Connection slots: two per docomo across pods; a crashed pod's lease expires.
    let Connect::Granted(c1) = a.connect(&mx1, "docomo.ne.jp", T0).await.unwrap() else {
        panic!()
    };
    assert_eq!(c1.messages_per_connection, Some(10));
    let Connect::Granted(_crashed) = b.connect(&mx2, "docomo.ne.jp", T0).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        b.connect(&mx1, "docomo.ne.jp", T0 + 10).await.unwrap(),
        Connect::NotBefore { at_ms: T0 + 2_010 }
    );
    a.disconnect(c1).await.unwrap();
    let Connect::Granted(mut c3) = b.connect(&mx1, "docomo.ne.jp", T0 + 20).await.unwrap() else {
        panic!()
    };
    assert!(matches!(
        a.connect(&mx1, "docomo.ne.jp", T0 + 30).await.unwrap(),
        Connect::NotBefore { .. }
    ));
    // c3 is renewed; the other lease (never released) runs out after 10 minutes.
    b.renew(&mut c3, T0 + 300_000).await.unwrap();
    assert!(matches!(
        a.connect(&mx1, "docomo.ne.jp", T0 + 599_999).await.unwrap(),
        Connect::NotBefore { .. }
    ));
    assert!(matches!(
        a.connect(&mx1, "docomo.ne.jp", T0 + 600_000).await.unwrap(),
        Connect::Granted(_)
    ));
}

/// The reply that ended a session: the first refusal, else the reply to the message body.
fn final_reply(t: &mailroute_testkit::smtp::Transcript) -> (u16, String) {
    let r = t
        .exchanges
        .iter()
        .map(|e| &e.reply)
        .find(|r| r.code >= 400)
        .or(t.reply_to("."))
        .expect("a reply");
    (r.code, r.text())
}

#[tokio::test]
async fn upstream_421_backs_the_route_off_until_a_success() {
    let redis = RedisServer::start().unwrap();
    let upstream = SmtpServer::start(Script::new().behaviours([
        Behaviour::Accept,
        Behaviour::Accept,
        Behaviour::RateLimit,
        Behaviour::RateLimit,
        Behaviour::Accept,
        Behaviour::Accept,
        Behaviour::RateLimit,
    ]))
    .unwrap();
    let pacers = [redis_pacer(&redis).await, redis_pacer(&redis).await];
    let r = smarthost("rental", upstream.port(), "    messagesPerMinute: 30\n");

    // A minimal delivery loop on two pods: pace, send over real SMTP, report, reschedule.
    let mut now = T0;
    let mut attempts: Vec<(i64, u16)> = vec![];
    let mut changes = vec![];
    for msg in 0..6 {
        loop {
            let p = &pacers[attempts.len() % 2];
            match p.acquire(&r, "example.com", 1, now).await.unwrap() {
                Pace::NotBefore { at_ms, .. } => now = at_ms,
                Pace::Go => {
                    let body = format!("Subject: {msg}\r\n\r\nhello\r\n");
                    let t = send(
                        upstream.addr(),
                        None,
                        false,
                        None,
                        "a@shop.example",
                        &["u@example.com"],
                        body.as_bytes(),
                    )
                    .await
                    .unwrap();
                    let (code, text) = final_reply(&t);
                    attempts.push((now, code));
                    let change = p
                        .report(&r, "example.com", Some(&Reply::new(code, &text)), now)
                        .await
                        .unwrap();
                    if change != BackoffChange::Unchanged {
                        changes.push(change);
                    }
                    if code == 250 {
                        break;
                    }
                }
            }
        }
    }
    let codes: Vec<u16> = attempts.iter().map(|(_, c)| *c).collect();
    assert_eq!(codes, [250, 250, 421, 421, 250, 250, 421, 250, 250]);
    let gaps: Vec<i64> = attempts.windows(2).map(|w| w[1].0 - w[0].0).collect();
    // Route pace (2 s), then 1 min after the first 421, 2 min after the second (doubling),
    // pace again after the success, and after a new 421 one minute again (success reset it).
    assert_eq!(gaps, [2_000, 2_000, 60_000, 120_000, 2_000, 2_000, 60_000, 2_000]);
    let t421 = attempts[2].0;
    assert_eq!(
        changes,
        [
            BackoffChange::Started {
                until_ms: t421 + 60_000,
                level: 1
            },
            BackoffChange::Started {
                until_ms: t421 + 180_000,
                level: 2
            },
            BackoffChange::Cleared,
            BackoffChange::Started {
                until_ms: attempts[6].0 + 60_000,
                level: 1
            },
            BackoffChange::Cleared,
        ]
    );
    assert_eq!(upstream.received().len(), 6);
    assert_eq!(pacers[0].backoff(&r, "example.com", now).await.unwrap(), None);
}

/// The same decisions on both stores.
async fn scenario(store: Arc<dyn PaceStore>) -> Vec<String> {
    let p = Pacer::new(store);
    let o365 = smarthost(
        "o365",
        587,
        "    messagesPerMinute: 30\n    recipientsPerDay: 25\n    maxConnections: 2\n",
    );
    let mx = route("mx", "  delivery: mx\n");
    let busy = Reply::new(451, "4.7.500 Server busy. Please try again later");
    let ok = Reply::new(250, "2.0.0 OK");
    let mut out = vec![];
    let mut permits = vec![];
    for step in 0..200_i64 {
        let now = T0 + step * 300;
        let (r, domain) = if step % 3 == 0 {
            (&mx, "au.com")
        } else {
            (&o365, "example.com")
        };
        let pace = p.acquire(r, domain, (step % 4 + 1) as u32, now).await.unwrap();
        out.push(format!("{step} {pace:?}"));
        if step % 37 == 5 {
            out.push(format!("{:?}", p.report(r, domain, Some(&busy), now).await.unwrap()));
        }
        if step % 41 == 40 {
            out.push(format!("{:?}", p.report(r, domain, Some(&ok), now).await.unwrap()));
        }
        match p.connect(r, domain, now).await.unwrap() {
            Connect::Granted(c) => {
                out.push(format!("conn {:?}", c.messages_per_connection));
                permits.push(c);
            }
            Connect::NotBefore { at_ms } => out.push(format!("conn wait {}", at_ms - now)),
        }
        if step % 2 == 0
            && let Some(c) = permits.pop()
        {
            p.disconnect(c).await.unwrap();
        }
    }
    out
}

#[tokio::test]
async fn memory_store_paces_like_redis() {
    let redis = RedisServer::start().unwrap();
    let conn = redis.client().unwrap().get_connection_manager().await.unwrap();
    let from_redis = scenario(Arc::new(RedisPaceStore::new(conn, "{test}:"))).await;
    let from_memory = scenario(Arc::new(MemoryPaceStore::new())).await;
    assert_eq!(from_redis, from_memory);
    let all = from_redis.join("\n");
    for needle in [
        "RouteRate",
        "RouteDaily",
        "Destination",
        "Backoff",
        "Started",
        "Cleared",
        "conn wait",
        "Go",
    ] {
        assert!(all.contains(needle), "{needle} missing in\n{all}");
    }
}
