//! The admin HTTP API over real TCP on 127.0.0.1 with a real HTTP client
//! (reqwest), the delivery log in a real redis-server, and a test backend
//! standing in for the queue and quota store.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::csv_records;
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use mailroute_api::quota::{PeriodUsage, QuotaUsage};
use mailroute_relay::admin::{self, AdminBackend, AdminState, CancelResult, QuotaReport};
use mailroute_relay::observe::dlog::{DEFAULT_PREFIX, DeliveryEvent, DeliveryLog, EventResult};
use mailroute_relay::observe::liveness::Liveness;
use mailroute_relay::observe::metrics::Metrics;
use mailroute_testkit::RedisServer;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

const TOKEN: &str = "t0ken-for-tests";
/// 2025-03-01T00:00:00Z
const T0: i64 = 1_740_787_200_000;

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap()
}

#[derive(Default)]
struct TestBackend {
    not_ready: Mutex<Option<String>>,
    messages: Mutex<HashMap<String, Value>>,
    refreshes: AtomicI64,
    /// Refreshes never finish (a hung Redis).
    hang_refresh: AtomicBool,
}

#[async_trait]
impl AdminBackend for TestBackend {
    async fn ready(&self) -> Result<(), String> {
        match self.not_ready.lock().unwrap().clone() {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    async fn message(&self, id: &str) -> anyhow::Result<Option<Value>> {
        if id == "broken" {
            anyhow::bail!("redis: connection refused (password=hunter2)");
        }
        Ok(self.messages.lock().unwrap().get(id).cloned())
    }

    async fn cancel(&self, id: &str) -> anyhow::Result<CancelResult> {
        if id == "inflight" {
            return Ok(CancelResult::Conflict(
                "every pending recipient is being delivered".into(),
            ));
        }
        Ok(match self.messages.lock().unwrap().remove(id) {
            Some(m) => CancelResult::Cancelled {
                recipients: m["recipients"].as_array().map_or(0, Vec::len),
                in_flight: 0,
            },
            None => CancelResult::NotFound,
        })
    }

    async fn quotas(&self) -> anyhow::Result<Vec<QuotaReport>> {
        Ok(vec![QuotaReport {
            id: "shop/bulk".into(),
            namespace: None,
            usage: QuotaUsage {
                month: Some(PeriodUsage {
                    used: 42,
                    limit: 200,
                    remaining: 158,
                    resets_at: "2025-04-01T00:00:00Z".into(),
                }),
                ..Default::default()
            },
        }])
    }

    async fn refresh_metrics(&self) -> bool {
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        if self.hang_refresh.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        true
    }
}

struct Harness {
    base: String,
    http: reqwest::Client,
    backend: Arc<TestBackend>,
    metrics: Arc<Metrics>,
    dlog: DeliveryLog,
    state: AdminState,
    _redis: RedisServer,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Harness {
    async fn start(token: Option<&str>) -> Self {
        let redis = RedisServer::start().unwrap();
        let conn = redis.client().unwrap().get_connection_manager().await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let dlog = DeliveryLog::redis(conn, DEFAULT_PREFIX)
            .without_writer()
            .with_metrics(metrics.clone());
        let backend = Arc::new(TestBackend::default());
        let state = AdminState {
            backend: backend.clone(),
            dlog: dlog.clone(),
            metrics: metrics.clone(),
            liveness: Liveness::default(),
            token: token.map(str::to_string),
            kubernetes: None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(admin::serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        // Workspace builds enable reqwest's rustls without a provider (via kube-fake-client);
        // installing ring keeps `Client::new()` working in every build.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Harness {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            backend,
            metrics,
            dlog,
            state,
            _redis: redis,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn state(&self) -> AdminState {
        self.state.clone()
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.base))
    }

    fn api(&self, path: &str) -> reqwest::RequestBuilder {
        self.get(&format!("/api/v1{path}")).bearer_auth(TOKEN)
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap().unwrap();
    }
}

fn sample(i: usize) -> DeliveryEvent {
    let result = [
        EventResult::Received,
        EventResult::Delivered,
        EventResult::Deferred,
        EventResult::Bounced,
    ][i % 4];
    let mut e = DeliveryEvent::new(
        at(T0 + i as i64 * 1000),
        result,
        format!("m{}", i / 4),
        "orders@shop.example",
        format!(
            "u{i}@{}",
            if i.is_multiple_of(2) {
                "docomo.ne.jp"
            } else {
                "example.com"
            }
        ),
    );
    e.source_ip = Some(format!("10.0.0.{}", i % 3).parse().unwrap());
    e.route = Some("mail/o365".into());
    if result == EventResult::Bounced {
        e.reply_code = Some(550);
        e.enhanced_code = Some("5.1.1".into());
        e.reply_text = Some(format!("5.1.1 <u{i}>, unknown \"user\""));
        e.bounce_class = Some(if i % 8 == 3 {
            "invalid_recipient".into()
        } else {
            "mailbox_full".into()
        });
    }
    e
}

async fn record(h: &Harness, n: usize) -> Vec<DeliveryEvent> {
    let events: Vec<DeliveryEvent> = (0..n).map(sample).collect();
    for e in &events {
        h.dlog.record(e).await.unwrap();
    }
    events
}

async fn json_events(resp: reqwest::Response) -> (Vec<DeliveryEvent>, Option<String>) {
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    let events = serde_json::from_value(v["events"].clone()).unwrap();
    (events, v["next_cursor"].as_str().map(str::to_string))
}

#[tokio::test]
async fn health_ready_and_metrics_need_no_token() {
    let h = Harness::start(Some(TOKEN)).await;
    let r = h.get("/healthz").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "ok");

    let r = h.get("/readyz").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    *h.backend.not_ready.lock().unwrap() = Some("redis unreachable: connection refused".into());
    let r = h.get("/readyz").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.text().await.unwrap(), "redis unreachable: connection refused");

    h.metrics.queue_ready_jobs.set(7);
    h.dlog.record(&sample(1)).await.unwrap();
    let r = h.get("/metrics").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    let text = r.text().await.unwrap();
    assert!(text.contains("mailroute_queue_ready_jobs 7"), "{text}");
    assert!(
        text.contains(r#"mailroute_dlog_events_total{event="delivered"} 1"#),
        "{text}"
    );
    assert_eq!(
        h.backend.refreshes.load(Ordering::SeqCst),
        0,
        "a scrape never reads the Redis-backed gauges itself"
    );
    h.shutdown().await;
}

/// The Redis-backed gauges are read on a timer, not by scrapes: they stay fresh with nobody
/// scraping, and a refresh that hangs (Redis stopped) never holds a scrape; the age gauge tells.
#[tokio::test]
async fn gauges_refresh_in_the_background_and_a_hung_refresh_never_holds_a_scrape() {
    let h = Harness::start(Some(TOKEN)).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let state = h.state();
    let refresher = tokio::spawn(admin::refresh_gauges(state, Duration::from_millis(50), async move {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while h.backend.refreshes.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no background refresh without scrapes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    h.backend.hang_refresh.store(true, Ordering::SeqCst);
    let hung_from = h.backend.refreshes.load(Ordering::SeqCst);
    // The refresher is now stuck in one refresh; scrapes still answer and the age grows.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = tokio::time::timeout(Duration::from_secs(10), async {
            h.get("/metrics").send().await.unwrap().text().await.unwrap()
        })
        .await
        .expect("a scrape waited for a hung refresh");
        let age = text
            .lines()
            .find_map(|l| l.strip_prefix("mailroute_redis_gauges_age_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .expect("age gauge");
        if age >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "age never grew: {age}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        h.backend.refreshes.load(Ordering::SeqCst) <= hung_from + 1,
        "one refresh at a time"
    );
    let _ = stop.send(());
    refresher.await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn api_requires_the_bearer_token() {
    let h = Harness::start(Some(TOKEN)).await;
    let url = format!("{}/api/v1/events", h.base);
    for req in [
        h.http.get(&url),
        h.http.get(&url).bearer_auth("wrong"),
        h.http.get(&url).bearer_auth(format!("{TOKEN}x")),
        h.http.get(&url).basic_auth("admin", Some(TOKEN)),
        h.http.get(&url).header("authorization", TOKEN),
        h.http.delete(format!("{}/api/v1/messages/m1", h.base)),
        h.http.get(format!("{}/api/v1/no-such-thing", h.base)),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"mailroute\"");
        let body = r.text().await.unwrap();
        assert!(!body.contains(TOKEN));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("bearer token"));
    }
    let r = h.api("/events").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = h
        .http
        .get(&url)
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the scheme is case-insensitive");
    let r = h.api("/no-such-thing").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    h.shutdown().await;
}

#[tokio::test]
async fn api_is_disabled_without_a_token() {
    for token in [None, Some("")] {
        let h = Harness::start(token).await;
        let r = h.api("/events").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("disabled"));
        let r = h.get("/api/v1/events").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Health and metrics still work.
        assert_eq!(h.get("/healthz").send().await.unwrap().status(), StatusCode::OK);
        assert_eq!(h.get("/metrics").send().await.unwrap().status(), StatusCode::OK);
        h.shutdown().await;
    }
}

type Params = Vec<(&'static str, &'static str)>;
type Pred = Box<dyn Fn(&DeliveryEvent) -> bool>;

#[tokio::test]
async fn events_are_filtered() {
    let h = Harness::start(Some(TOKEN)).await;
    let events = record(&h, 40).await;
    let cases: Vec<(Params, Pred)> = vec![
        (
            vec![("result", "bounced")],
            Box::new(|e| e.result == EventResult::Bounced),
        ),
        (
            vec![("result", "deferred"), ("recipient", "@DOCOMO.ne.jp")],
            Box::new(|e| e.result == EventResult::Deferred && e.recipient.ends_with("docomo.ne.jp")),
        ),
        (
            vec![("recipient", "u5@example.com")],
            Box::new(|e| e.recipient == "u5@example.com"),
        ),
        (
            vec![("source_ip", "10.0.0.1")],
            Box::new(|e| e.source_ip == Some("10.0.0.1".parse().unwrap())),
        ),
        (
            vec![("bounce_class", "invalid_recipient")],
            Box::new(|e| e.bounce_class.as_deref() == Some("invalid_recipient")),
        ),
        (
            vec![("from", "2025-03-01T00:00:10Z"), ("to", "2025-03-01T09:00:20+09:00")],
            Box::new(|e| (T0 + 10_000..T0 + 20_000).contains(&e.time.timestamp_millis())),
        ),
        (vec![("sender", "nobody@shop.example")], Box::new(|_| false)),
        (
            vec![("sender", "orders@shop.example"), ("limit", "1000")],
            Box::new(|_| true),
        ),
    ];
    for (params, pred) in cases {
        let expected: Vec<DeliveryEvent> = events.iter().filter(|e| pred(e)).cloned().collect();
        let (got, cursor) = json_events(h.api("/events").query(&params).send().await.unwrap()).await;
        assert_eq!(got, expected, "{params:?}");
        assert_eq!(cursor, None, "{params:?}");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn events_page_with_cursors() {
    let h = Harness::start(Some(TOKEN)).await;
    let events = record(&h, 250).await;

    // Default page size is 100.
    let (first, cursor) = json_events(h.api("/events").send().await.unwrap()).await;
    assert_eq!(first, events[..100].to_vec());
    assert!(cursor.is_some());

    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut params = vec![("limit", "33".to_string()), ("result", "bounced".to_string())];
        if let Some(c) = &cursor {
            params.push(("cursor", c.clone()));
        }
        let (page, next) = json_events(h.api("/events").query(&params).send().await.unwrap()).await;
        assert!(page.len() <= 33);
        got.extend(page);
        pages += 1;
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 100);
    }
    let expected: Vec<DeliveryEvent> = events
        .iter()
        .filter(|e| e.result == EventResult::Bounced)
        .cloned()
        .collect();
    assert_eq!(expected.len(), 62);
    assert_eq!(got, expected, "no duplicates, no gaps, in order");
    let ids: BTreeSet<String> = got.iter().map(|e| e.recipient.clone()).collect();
    assert_eq!(ids.len(), got.len());
    assert_eq!(pages, 2);
    h.shutdown().await;
}

#[tokio::test]
async fn bad_parameters_are_400_with_a_reason() {
    let h = Harness::start(Some(TOKEN)).await;
    for (path, query, needle) in [
        ("/events", "from=yesterday", "RFC 3339"),
        ("/events", "result=sent", "unknown result"),
        ("/events", "limit=0", "between 1 and 1000"),
        ("/events", "limit=5000", "between 1 and 1000"),
        ("/events", "cursor=zzz", "invalid cursor"),
        ("/events", "source_ip=300.1.1.1", "IP address"),
        ("/events", "recipent=a@b", "unknown parameter"),
        ("/events", "result=bounced&result=expired", "more than once"),
        ("/events.csv", "bounce_class=hard", "unknown bounce_class"),
        (
            "/events.csv",
            "to=2025-01-01T00:00:00Z&from=2025-02-01T00:00:00Z",
            "after",
        ),
    ] {
        let r = h.api(&format!("{path}?{query}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}?{query}");
        let v: Value = r.json().await.unwrap();
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{path}?{query}: {msg}");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn csv_export_lists_hard_bounces() {
    let h = Harness::start(Some(TOKEN)).await;
    let events = record(&h, 40).await;
    let r = h
        .api("/events.csv")
        .query(&[("result", "bounced"), ("bounce_class", "invalid_recipient")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("events.csv")
    );
    let body = r.bytes().await.unwrap();
    let rows = csv_records(&body);
    let expected: Vec<&DeliveryEvent> = events
        .iter()
        .filter(|e| e.bounce_class.as_deref() == Some("invalid_recipient"))
        .collect();
    assert_eq!(rows.len(), expected.len());
    assert_eq!(rows.len(), 5);
    for (row, e) in rows.iter().zip(expected) {
        assert_eq!(&row[1], e.recipient);
        assert_eq!(&row[2], "bounced");
        assert_eq!(&row[3], "550");
        assert_eq!(&row[5], e.reply_text.as_deref().unwrap(), "quoted text survives");
        assert_eq!(&row[7], "orders@shop.example");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn csv_export_streams_past_one_page() {
    let h = Harness::start(Some(TOKEN)).await;
    // More events than one store page (1000) so the body is streamed in parts.
    let events = record(&h, 2500).await;
    let rows = |body: &[u8]| -> Vec<csv::StringRecord> {
        csv::Reader::from_reader(body).records().map(Result::unwrap).collect()
    };
    let all = h.api("/events.csv").send().await.unwrap().bytes().await.unwrap();
    let all = rows(&all);
    assert_eq!(all.len(), 2500);
    let recipients: Vec<&str> = all.iter().map(|r| r.get(1).unwrap()).collect();
    let expected: Vec<&str> = events.iter().map(|e| e.recipient.as_str()).collect();
    assert_eq!(recipients, expected);

    let capped = h
        .api("/events.csv?limit=1500")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(rows(&capped).len(), 1500);
    let empty = h.api("/events.csv?result=expired").send().await.unwrap();
    assert_eq!(empty.status(), StatusCode::OK);
    let text = empty.text().await.unwrap();
    assert_eq!(text.lines().count(), 1, "header only: {text}");
    h.shutdown().await;
}

#[tokio::test]
async fn messages_can_be_read_and_cancelled() {
    let h = Harness::start(Some(TOKEN)).await;
    let state = json!({
        "id": "m1",
        "recipients": [
            {"address": "a@example.com", "status": "scheduled"},
            {"address": "b@example.com", "status": "delivered"}
        ]
    });
    h.backend.messages.lock().unwrap().insert("m1".into(), state.clone());

    let r = h.api("/messages/m1").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), state);

    let r = h.api("/messages/unknown").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "message not found");

    let del = |id: &str| {
        h.http
            .delete(format!("{}/api/v1/messages/{id}", h.base))
            .bearer_auth(TOKEN)
            .send()
    };
    let r = del("m1").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"id": "m1", "cancelled": true, "recipients": 2, "in_flight": 0})
    );
    assert_eq!(
        h.api("/messages/m1").send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(del("m1").await.unwrap().status(), StatusCode::NOT_FOUND);

    let r = del("inflight").await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(
        r.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("being delivered")
    );

    // Backend failures are a 500 that does not echo the internal error.
    let r = h.api("/messages/broken").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = r.text().await.unwrap();
    assert!(!body.contains("hunter2") && !body.contains("refused"), "{body}");

    let r = h.api("/messages/a%20b").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    h.shutdown().await;
}

#[tokio::test]
async fn quotas_report_usage() {
    let h = Harness::start(Some(TOKEN)).await;
    let r = h.api("/quotas").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"quotas": [{
            "id": "shop/bulk",
            "usage": {"month": {"used": 42, "limit": 200, "remaining": 158, "resetsAt": "2025-04-01T00:00:00Z"}}
        }]})
    );
    h.shutdown().await;
}
