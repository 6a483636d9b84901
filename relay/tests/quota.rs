//! Sender quotas against a real `redis-server`: several engine instances (as several relay
//! pods) with their own connections share one limit exactly under concurrent load; usage
//! survives a new engine and a Redis restart; bulk-only quotas ignore transactional mail;
//! recipient-counted limits answer per recipient; the memory store behaves like Redis.
//! Time is injected (no sleeps): every decision gets its instant from the test.

use std::net::IpAddr;
use std::sync::Arc;

use chrono::DateTime;
use mailroute_api::{Manifests, RelayConfig};
use mailroute_relay::inbound::quota::store::DEFAULT_PREFIX;
use mailroute_relay::inbound::quota::{
    MemoryQuotaStore, QuotaDecision, QuotaEngine, QuotaStore, RedisQuotaStore, SenderCtx,
};
use mailroute_testkit::RedisServer;
use redis::aio::ConnectionManager;

fn ms(s: &str) -> i64 {
    DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
}

fn config(yaml: &str) -> RelayConfig {
    let c = Manifests::from_yaml(yaml, "tenants").unwrap().compile();
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    c.config
}

fn quota_yaml(name: &str, sender: &str, spec: &str) -> String {
    format!(
        "apiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata:\n  name: {name}\n  namespace: tenants\nspec:\n  sender:\n    {sender}\n{spec}"
    )
}

async fn conn(redis: &RedisServer) -> ConnectionManager {
    // A client of its own per engine: separate TCP connections, like separate pods.
    redis.client().unwrap().get_connection_manager().await.unwrap()
}

async fn redis_engine(redis: &RedisServer) -> QuotaEngine {
    QuotaEngine::new(Arc::new(RedisQuotaStore::new(conn(redis).await, DEFAULT_PREFIX)))
}

fn ctx<'a>(user: &'a str, from: &'a str) -> SenderCtx<'a> {
    SenderCtx {
        auth_user: Some(user),
        auth_quota: None,
        mail_from: from,
        source_ip: IpAddr::from([10, 0, 0, 7]),
        namespace: None,
    }
}

/// One transaction: MAIL, `rcpts` RCPTs, DATA with `message`; accepted messages are committed,
/// refused ones aborted. Returns the per-recipient decisions and the DATA decision.
async fn transaction(
    e: &QuotaEngine,
    cfg: &RelayConfig,
    user: &str,
    rcpts: usize,
    message: &[u8],
    now: i64,
) -> (Vec<QuotaDecision>, Option<QuotaDecision>) {
    let mut t = e.begin(cfg, &ctx(user, "news@shop.example")).unwrap();
    let mut per_rcpt = vec![];
    for _ in 0..rcpts {
        per_rcpt.push(e.rcpt(&mut t, now).await.unwrap());
    }
    if !per_rcpt.contains(&QuotaDecision::Accept) {
        e.abort(t).await.unwrap();
        return (per_rcpt, None);
    }
    let d = e.data(&mut t, message, now).await.unwrap();
    if d == QuotaDecision::Accept {
        t.commit();
    } else {
        e.abort(t).await.unwrap();
    }
    (per_rcpt, Some(d))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_on_one_redis_enforce_one_limit_exactly() {
    let redis = RedisServer::start().unwrap();
    let cfg = Arc::new(config(&quota_yaml(
        "shop",
        "authUser: shop-42",
        "  limits:\n    perMinute: 100\n    perDay: 120\n  timeZone: Asia/Tokyo\n",
    )));
    let engines = [redis_engine(&redis).await, redis_engine(&redis).await];
    let t0 = ms("2031-05-20T01:00:00Z");

    let mut tasks = vec![];
    for i in 0..150_i64 {
        let e = engines[(i % 2) as usize].clone();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = e.begin(&cfg, &ctx("shop-42", "a@shop.example")).unwrap();
            // Spread over 1.5 s of the same minute.
            e.rcpt(&mut t, t0 + i * 10).await.unwrap()
        }));
    }
    let mut decisions = vec![];
    for t in tasks {
        decisions.push(t.await.unwrap());
    }
    let accepted = decisions.iter().filter(|d| **d == QuotaDecision::Accept).count();
    assert_eq!(accepted, 100);
    for d in decisions.iter().filter(|d| **d != QuotaDecision::Accept) {
        let QuotaDecision::Defer(x) = d else { panic!("{d:?}") };
        assert_eq!((x.code, x.enhanced.to_string().as_str(), x.limit), (451, "4.7.1", 100));
        assert!(
            x.reply().to_string().contains("limit of 100 messages per minute"),
            "{}",
            x.reply()
        );
        // The first unit leaves the window 61 s after its bucket began.
        assert_eq!(x.retry_at_ms, t0 + 61_000);
    }

    // Both engines report the same usage; the refused 50 did not move the day counter.
    for e in &engines {
        let usage = e.usage_report(&cfg, t0 + 2_000).await.unwrap();
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].id, "tenants/shop");
        let u = &usage[0].usage;
        let minute = u.minute.as_ref().unwrap();
        assert_eq!((minute.used, minute.limit, minute.remaining), (100, 100, 0));
        let day = u.day.as_ref().unwrap();
        assert_eq!((day.used, day.remaining), (100, 20));
        assert_eq!(day.resets_at, "2031-05-21T00:00:00+09:00");
        // The JSON the admin API serves.
        let json = serde_json::to_value(u).unwrap();
        assert_eq!(json["day"]["resetsAt"], "2031-05-21T00:00:00+09:00");
        assert_eq!(json["minute"]["remaining"], 0);
    }

    // A minute later the rolling window has room again, but only 20 are left for the day.
    let later = t0 + 61_500;
    let mut results = vec![];
    for i in 0..30 {
        let e = &engines[i % 2];
        let mut t = e.begin(&cfg, &ctx("shop-42", "a@shop.example")).unwrap();
        results.push(e.rcpt(&mut t, later).await.unwrap());
    }
    assert_eq!(results.iter().filter(|d| **d == QuotaDecision::Accept).count(), 20);
    let QuotaDecision::Defer(x) = &results[29] else {
        panic!()
    };
    assert_eq!(x.limit, 120);
    assert_eq!(x.retry_at_ms, ms("2031-05-20T15:00:00Z"));
    assert_eq!(
        x.reply().to_string(),
        "451 4.7.1 Sending quota exceeded: limit of 120 messages per day reached, try again after 2031-05-21T00:00:00+09:00"
    );

    // Every key carries the prefix (hash tag) and expires.
    let mut c = conn(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut c).await.unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        assert!(k.starts_with("{mailroute}:quota:tenants/shop:"), "{k}");
        let ttl: i64 = redis::cmd("PTTL").arg(&k).query_async(&mut c).await.unwrap();
        assert!(ttl > 0, "{k} has no expiry");
    }
}

#[tokio::test]
async fn month_usage_survives_a_new_engine_and_a_redis_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::builder().aof(true).dir(dir.path()).start().unwrap();
    let cfg = config(&quota_yaml(
        "plan",
        "authUser: shop-42",
        "  limits:\n    perMonth: 10\n  timeZone: America/New_York\n",
    ));
    let now = ms("2031-01-31T12:00:00Z");
    {
        let e = redis_engine(&redis).await;
        for _ in 0..7 {
            let (r, d) = transaction(&e, &cfg, "shop-42", 2, b"Subject: x\r\n\r\n", now).await;
            assert_eq!((r[0].clone(), d), (QuotaDecision::Accept, Some(QuotaDecision::Accept)));
        }
    }
    redis.restart().unwrap();
    let e = redis_engine(&redis).await;
    let month = e.usage_report(&cfg, now).await.unwrap()[0].usage.month.clone().unwrap();
    assert_eq!((month.used, month.remaining), (7, 3));
    assert_eq!(month.resets_at, "2031-02-01T00:00:00-05:00");
    for _ in 0..3 {
        let (r, _) = transaction(&e, &cfg, "shop-42", 1, b"\r\n", now).await;
        assert_eq!(r[0], QuotaDecision::Accept);
    }
    let (r, _) = transaction(&e, &cfg, "shop-42", 1, b"\r\n", now).await;
    let QuotaDecision::Defer(x) = &r[0] else {
        panic!("{r:?}")
    };
    assert_eq!(x.retry_at_ms, ms("2031-02-01T05:00:00Z"));
    // The new month (local midnight in New York) starts from zero.
    let (r, _) = transaction(&e, &cfg, "shop-42", 1, b"\r\n", ms("2031-02-01T05:00:00Z")).await;
    assert_eq!(r[0], QuotaDecision::Accept);
}

#[tokio::test]
async fn bulk_only_quota_ignores_transactional_mail() {
    let redis = RedisServer::start().unwrap();
    let cfg = config(&quota_yaml(
        "shop",
        "authUser: shop-42",
        "  limits:\n    perMonth: 5\n  appliesTo: bulk\n  bulkHeader: X-Campaign-Id\n  onExceeded: reject\n  timeZone: Asia/Tokyo\n",
    ));
    let e = redis_engine(&redis).await;
    let now = ms("2031-03-10T00:00:00Z");
    let order = b"From: shop@shop.example\r\nSubject: Your order\r\n\r\nThanks";
    for _ in 0..20 {
        let (r, d) = transaction(&e, &cfg, "shop-42", 3, order, now).await;
        assert!(r.iter().all(|d| *d == QuotaDecision::Accept));
        assert_eq!(d, Some(QuotaDecision::Accept));
    }
    let usage = e.usage_report(&cfg, now).await.unwrap();
    assert_eq!(usage[0].usage.month.as_ref().unwrap().used, 0);

    let news = b"Precedence: bulk\r\nSubject: Spring sale\r\n\r\nhi";
    let campaign = b"X-Campaign-Id: spring-2031\r\nSubject: Spring sale\r\n\r\nhi";
    for i in 0..5 {
        let m: &[u8] = if i % 2 == 0 { news } else { campaign };
        let (r, d) = transaction(&e, &cfg, "shop-42", 3, m, now).await;
        assert!(
            r.iter().all(|d| *d == QuotaDecision::Accept),
            "recipients are accepted before DATA"
        );
        assert_eq!(d, Some(QuotaDecision::Accept), "bulk message {i}");
    }
    let (_, d) = transaction(&e, &cfg, "shop-42", 3, news, now).await;
    let Some(QuotaDecision::Reject(x)) = d else {
        panic!("{d:?}")
    };
    assert_eq!(
        x.reply().to_string(),
        "550 5.7.1 Sending quota exceeded: limit of 5 bulk messages per month reached until 2031-04-01T00:00:00+09:00"
    );
    // Order mail still flows after the bulk allowance is used up.
    let (_, d) = transaction(&e, &cfg, "shop-42", 1, order, now).await;
    assert_eq!(d, Some(QuotaDecision::Accept));
    assert_eq!(
        e.usage_report(&cfg, now).await.unwrap()[0]
            .usage
            .month
            .as_ref()
            .unwrap()
            .used,
        5
    );
}

#[tokio::test]
async fn recipient_counted_limits_answer_per_recipient() {
    let redis = RedisServer::start().unwrap();
    let cfg = config(&quota_yaml(
        "app",
        "sourceCidrs: [10.0.0.0/8]",
        "  limits:\n    perHour: 10\n  countBy: recipients\n",
    ));
    let e = redis_engine(&redis).await;
    let now = ms("2031-03-10T00:00:30Z");
    // The quota is selected by source address here (no AUTH, any sender).
    let (r, d) = transaction(&e, &cfg, "nobody", 4, b"\r\n", now).await;
    assert_eq!(r, vec![QuotaDecision::Accept; 4]);
    assert_eq!(d, Some(QuotaDecision::Accept));
    let (r, _) = transaction(&e, &cfg, "nobody", 8, b"\r\n", now + 60_000).await;
    assert_eq!(r.iter().filter(|d| **d == QuotaDecision::Accept).count(), 6);
    let QuotaDecision::Defer(x) = &r[7] else {
        panic!("{r:?}")
    };
    assert_eq!((x.code, x.enhanced.to_string().as_str()), (452, "4.5.3"));
    // The first 4 leave the rolling hour 61 minutes after their bucket (00:00) began.
    assert_eq!(x.retry_at_ms, ms("2031-03-10T01:01:00Z"));
    assert!(
        x.reply()
            .to_string()
            .starts_with("452 4.5.3 Sending quota exceeded: limit of 10 recipients per hour reached")
    );

    // An aborted transaction (RSET after 3 accepted recipients) gives its recipients back.
    let t_used = |e: QuotaEngine, at: i64| {
        let cfg = cfg.clone();
        async move {
            e.usage_report(&cfg, at).await.unwrap()[0]
                .usage
                .hour
                .clone()
                .unwrap()
                .used
        }
    };
    assert_eq!(t_used(e.clone(), now + 60_000).await, 10);
    let mut t = e.begin(&cfg, &ctx("nobody", "")).unwrap();
    // Nothing left: every recipient deferred.
    for _ in 0..2 {
        assert!(matches!(
            e.rcpt(&mut t, now + 61_000).await.unwrap(),
            QuotaDecision::Defer(_)
        ));
    }
    e.abort(t).await.unwrap();
    assert_eq!(t_used(e.clone(), now + 61_000).await, 10);
    // After the first four expire there is room for four, and an abort gives three back.
    let later = ms("2031-03-10T01:01:00Z");
    let mut t = e.begin(&cfg, &ctx("nobody", "")).unwrap();
    for _ in 0..3 {
        assert_eq!(e.rcpt(&mut t, later).await.unwrap(), QuotaDecision::Accept);
    }
    assert_eq!(t_used(e.clone(), later).await, 9);
    e.abort(t).await.unwrap();
    assert_eq!(t_used(e.clone(), later).await, 6);
}

#[tokio::test]
async fn sender_domain_policy_at_mail_from() {
    let cfg = config(&quota_yaml(
        "shop",
        "authUser: shop-42",
        "  deniedFromDomains: [platform.example]\n  allowedFromDomains: ['*.shop.example', shop.example]\n",
    ));
    let e = QuotaEngine::new(Arc::new(MemoryQuotaStore::new()));
    let t = e.begin(&cfg, &ctx("shop-42", "news@mail.shop.example")).unwrap();
    assert_eq!(t.quota_id(), Some("tenants/shop"));
    let err = e.begin(&cfg, &ctx("shop-42", "admin@platform.example")).unwrap_err();
    assert_eq!(
        err.reply().to_string(),
        "550 5.7.1 Sender domain platform.example may not be used by this sender"
    );
    assert!(e.begin(&cfg, &ctx("shop-42", "x@other.example")).is_err());
    // Bounces (null sender) pass; another user has no quota at all.
    assert!(e.begin(&cfg, &ctx("shop-42", "")).is_ok());
    assert_eq!(
        e.begin(&cfg, &ctx("other", "x@platform.example")).unwrap().quota_id(),
        None
    );
}

/// The same sequence of decisions, with instants crossing rolling and calendar boundaries, on
/// both stores.
async fn scenario(store: Arc<dyn QuotaStore>) -> Vec<String> {
    let cfg = config(&quota_yaml(
        "mix",
        "fromDomain: '*.shop.example'",
        "  limits:\n    perMinute: 3\n    perHour: 6\n    perDay: 5\n  countBy: recipients\n  timeZone: Asia/Tokyo\n",
    ));
    let e = QuotaEngine::new(store);
    let mut out = vec![];
    let base = ms("2031-03-10T14:58:00Z");
    for step in 0..40_i64 {
        let now = base + step * 17_000;
        let mut t = e.begin(&cfg, &ctx("u", "a@news.shop.example")).unwrap();
        let mut line = format!("{step}:");
        for _ in 0..(step % 3 + 1) {
            let d = e.rcpt(&mut t, now).await.unwrap();
            line.push_str(&d.reply().map_or_else(|| "ok".into(), |r| r.to_string()));
            line.push('|');
        }
        if step % 5 == 4 {
            e.abort(t).await.unwrap();
        }
        let u = &e.usage_report(&cfg, now).await.unwrap()[0].usage;
        for p in [&u.minute, &u.hour, &u.day] {
            let p = p.as_ref().unwrap();
            line.push_str(&format!(" {}/{}@{}", p.used, p.limit, p.resets_at));
        }
        out.push(line);
    }
    out
}

#[tokio::test]
async fn memory_store_decides_like_redis() {
    let redis = RedisServer::start().unwrap();
    let from_redis = scenario(Arc::new(RedisQuotaStore::new(conn(&redis).await, "{test}:"))).await;
    let from_memory = scenario(Arc::new(MemoryQuotaStore::new())).await;
    assert_eq!(from_redis, from_memory);
    // The scenario exercises refusals by every limit and the day turning at Tokyo midnight.
    let all = from_redis.join("\n");
    for needle in [
        "per minute",
        "per hour",
        "per day",
        "2031-03-11T00:00:00+09:00",
        "2031-03-12T00:00:00+09:00",
    ] {
        assert!(all.contains(needle), "{needle} missing in\n{all}");
    }
}
