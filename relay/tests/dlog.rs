//! Delivery log against a real redis-server (and the same paging scenarios on
//! the in-memory store): round trip, filters, cursor paging, trimming by
//! age with an injected clock, out-of-order events, CSV, stdout lines.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::csv_records;
use chrono::{DateTime, TimeZone, Utc};
use mailroute_relay::observe::dlog::{DEFAULT_PREFIX, DeliveryEvent, DeliveryLog, EventFilter, EventResult, write_csv};
use mailroute_testkit::RedisServer;
use redis::aio::ConnectionManager;

/// 2025-03-01T00:00:00Z
const T0: i64 = 1_740_787_200_000;

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap()
}

async fn conn(redis: &RedisServer) -> ConnectionManager {
    redis.client().unwrap().get_connection_manager().await.unwrap()
}

async fn redis_log(redis: &RedisServer) -> DeliveryLog {
    DeliveryLog::redis(conn(redis).await, DEFAULT_PREFIX).without_writer()
}

/// A writer tests can read back.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// A varied event: result, recipient domain, sender, IP and class cycle with `i`.
fn sample(i: usize) -> DeliveryEvent {
    let results = [
        EventResult::Received,
        EventResult::Delivered,
        EventResult::Deferred,
        EventResult::Bounced,
    ];
    let result = results[i % results.len()];
    let mut e = DeliveryEvent::new(
        at(T0 + (i as i64) * 1000),
        result,
        format!("msg-{}", i / 4),
        if i.is_multiple_of(5) {
            "news@shop.example".to_string()
        } else {
            "orders@shop.example".to_string()
        },
        format!(
            "user{i}@{}",
            if i.is_multiple_of(2) {
                "docomo.ne.jp"
            } else {
                "example.com"
            }
        ),
    );
    e.job_id = Some(format!("job-{i}"));
    e.message_id_header = Some(format!("<{i}@shop.example>"));
    e.source_ip = Some(format!("10.0.0.{}", i % 3).parse().unwrap());
    e.listener = Some("smtp".into());
    e.route = Some("mail/o365".into());
    e.attempt = Some(1);
    if result == EventResult::Bounced {
        e.reply_code = Some(550);
        e.enhanced_code = Some("5.1.1".into());
        e.reply_text = Some(format!("5.1.1 <user{i}>: Recipient address rejected"));
        e.bounce_class = Some(if i % 8 == 3 {
            "invalid_recipient".into()
        } else {
            "mailbox_full".into()
        });
        e.remote_host = Some("mx.example.com".into());
        e.tls = true;
    }
    e
}

async fn record_all(log: &DeliveryLog, events: &[DeliveryEvent]) {
    for e in events {
        log.record(e).await.unwrap();
    }
}

/// Follows cursors to the end; checks every page respects `limit`.
async fn all_pages(log: &DeliveryLog, filter: &EventFilter, limit: usize) -> (Vec<DeliveryEvent>, usize) {
    let mut out = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = log.query(filter, cursor, limit).await.unwrap();
        pages += 1;
        assert!(page.events.len() <= limit);
        out.extend(page.events);
        match page.next_cursor {
            Some(c) => {
                assert!(cursor.is_none_or(|prev| c > prev), "cursor must advance");
                cursor = Some(c);
            }
            None => return (out, pages),
        }
        assert!(pages < 10_000, "paging does not terminate");
    }
}

#[tokio::test]
async fn round_trip_keeps_every_field() {
    let redis = RedisServer::start().unwrap();
    let log = redis_log(&redis).await;
    let events: Vec<DeliveryEvent> = (0..8).map(sample).collect();
    record_all(&log, &events).await;
    let page = log.query(&EventFilter::default(), None, 100).await.unwrap();
    assert_eq!(page.events, events);
    assert_eq!(page.next_cursor, None);

    // A second connection (another relay pod) sees the same log.
    let other = redis_log(&redis).await;
    let page = other.query(&EventFilter::default(), None, 100).await.unwrap();
    assert_eq!(page.events.len(), 8);
}

#[tokio::test]
async fn filters_select_matching_events() {
    let redis = RedisServer::start().unwrap();
    let log = redis_log(&redis).await;
    let events: Vec<DeliveryEvent> = (0..40).map(sample).collect();
    record_all(&log, &events).await;

    let check = |filter: EventFilter, pred: &dyn Fn(&DeliveryEvent) -> bool| {
        let log = log.clone();
        let expected: Vec<DeliveryEvent> = events.iter().filter(|e| pred(e)).cloned().collect();
        async move {
            let page = log.query(&filter, None, 1000).await.unwrap();
            assert!(!expected.is_empty(), "scenario must select something: {filter:?}");
            assert!(expected.len() < 40, "scenario must exclude something: {filter:?}");
            assert_eq!(page.events, expected, "{filter:?}");
        }
    };

    check(
        EventFilter {
            result: Some(EventResult::Bounced),
            ..Default::default()
        },
        &|e| e.result == EventResult::Bounced,
    )
    .await;
    check(
        EventFilter {
            recipient: Some("USER7@example.com".into()),
            ..Default::default()
        },
        &|e| e.recipient == "user7@example.com",
    )
    .await;
    check(
        EventFilter {
            recipient: Some("@docomo.ne.jp".into()),
            ..Default::default()
        },
        &|e| e.recipient.ends_with("@docomo.ne.jp"),
    )
    .await;
    check(
        EventFilter {
            sender: Some("news@shop.example".into()),
            ..Default::default()
        },
        &|e| e.envelope_from == "news@shop.example",
    )
    .await;
    check(
        EventFilter {
            source_ip: Some("10.0.0.2".parse().unwrap()),
            ..Default::default()
        },
        &|e| e.source_ip == Some("10.0.0.2".parse().unwrap()),
    )
    .await;
    check(
        EventFilter {
            result: Some(EventResult::Bounced),
            bounce_class: Some("invalid_recipient".into()),
            ..Default::default()
        },
        &|e| e.bounce_class.as_deref() == Some("invalid_recipient"),
    )
    .await;
    check(
        EventFilter {
            message_id: Some("msg-3".into()),
            ..Default::default()
        },
        &|e| e.message_id == "msg-3",
    )
    .await;
    // from inclusive, to exclusive: events 10..20.
    check(
        EventFilter {
            from: Some(at(T0 + 10_000)),
            to: Some(at(T0 + 20_000)),
            ..Default::default()
        },
        &|e| (T0 + 10_000..T0 + 20_000).contains(&e.time.timestamp_millis()),
    )
    .await;
    // Sub-millisecond bounds: from just after event 10 excludes it.
    check(
        EventFilter {
            from: Some(at(T0 + 10_000) + chrono::Duration::microseconds(1)),
            to: Some(at(T0 + 12_000) + chrono::Duration::microseconds(1)),
            ..Default::default()
        },
        &|e| (T0 + 11_000..=T0 + 12_000).contains(&e.time.timestamp_millis()),
    )
    .await;
    // Combined: bounced mail to one domain from one IP.
    check(
        EventFilter {
            result: Some(EventResult::Bounced),
            recipient: Some("@example.com".into()),
            source_ip: Some("10.0.0.0".parse().unwrap()),
            ..Default::default()
        },
        &|e| {
            e.result == EventResult::Bounced
                && e.recipient.ends_with("@example.com")
                && e.source_ip == Some("10.0.0.0".parse().unwrap())
        },
    )
    .await;
}

async fn paging_scenario(log: DeliveryLog) {
    let events: Vec<DeliveryEvent> = (0..250).map(sample).collect();
    record_all(&log, &events).await;

    // Unfiltered: full pages, no duplicates, no gaps, in order.
    let (got, pages) = all_pages(&log, &EventFilter::default(), 7).await;
    assert_eq!(got, events);
    assert_eq!(pages, 250usize.div_ceil(7));

    // Filtered with a small scan budget: short pages allowed, same union.
    let small = log.clone().with_scan_budget(13);
    let filter = EventFilter {
        result: Some(EventResult::Deferred),
        recipient: Some("@docomo.ne.jp".into()),
        ..Default::default()
    };
    let expected: Vec<DeliveryEvent> = events.iter().filter(|e| filter.matches(e)).cloned().collect();
    assert_eq!(expected.len(), 62);
    let (got, pages) = all_pages(&small, &filter, 5).await;
    assert_eq!(got, expected);
    assert!(pages >= 250 / 13, "budget must split the scan: {pages} pages");

    // Paging within a time range stops at its end.
    let ranged = EventFilter {
        from: Some(at(T0 + 100_000)),
        to: Some(at(T0 + 150_000)),
        ..Default::default()
    };
    let (got, _) = all_pages(&log, &ranged, 9).await;
    assert_eq!(got, events[100..150].to_vec());

    // A cursor from before `from` does not leak earlier events.
    let early = log.query(&EventFilter::default(), None, 3).await.unwrap();
    let page = log.query(&ranged, early.next_cursor, 1).await.unwrap();
    assert_eq!(page.events, events[100..101].to_vec());
}

#[tokio::test]
async fn cursor_paging_has_no_duplicates_or_gaps_in_redis() {
    let redis = RedisServer::start().unwrap();
    paging_scenario(redis_log(&redis).await).await;
}

#[tokio::test]
async fn cursor_paging_has_no_duplicates_or_gaps_in_memory() {
    paging_scenario(DeliveryLog::memory(1000).without_writer()).await;
}

#[tokio::test]
async fn events_recorded_while_paging_appear_on_later_pages() {
    let redis = RedisServer::start().unwrap();
    let log = redis_log(&redis).await;
    record_all(&log, &(0..10).map(sample).collect::<Vec<_>>()).await;
    let first = log.query(&EventFilter::default(), None, 10).await.unwrap();
    assert_eq!(first.events.len(), 10);
    log.record(&sample(10)).await.unwrap();
    let next = log.query(&EventFilter::default(), first.next_cursor, 10).await.unwrap();
    assert_eq!(next.events, vec![sample(10)]);
    assert_eq!(next.next_cursor, None);
}

#[tokio::test]
async fn trim_removes_events_older_than_retention() {
    let redis = RedisServer::start().unwrap();
    let log = redis_log(&redis).await;
    let day = 24 * 3600 * 1000i64;
    let now = at(T0 + 60 * day);
    let ages_days = [45, 32, 31, 30, 1, 0];
    for (i, age) in ages_days.iter().enumerate() {
        let mut e = sample(i);
        e.time = at(now.timestamp_millis() - age * day + 1);
        log.record(&e).await.unwrap();
    }
    // Default retention: 31 days; the event 31 days minus 1 ms old stays.
    assert_eq!(log.trim(now).await.unwrap(), 2);
    let left = log.query(&EventFilter::default(), None, 100).await.unwrap();
    let times: Vec<i64> = left.events.iter().map(|e| e.time.timestamp_millis()).collect();
    let expected: Vec<i64> = ages_days[2..]
        .iter()
        .map(|age| now.timestamp_millis() - age * day + 1)
        .collect();
    assert_eq!(times, expected);
    assert_eq!(log.trim(now).await.unwrap(), 0);

    // A shorter retention, one day later.
    let short = log.clone().with_retention(Duration::from_secs(7 * 24 * 3600));
    assert_eq!(short.trim(at(now.timestamp_millis() + day)).await.unwrap(), 2);
    let mut c = conn(&redis).await;
    let len: u64 = redis::cmd("XLEN")
        .arg("{mailroute}:dlog")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 2);
}

#[tokio::test]
async fn trimmer_task_trims_periodically() {
    let redis = RedisServer::start().unwrap();
    let log = redis_log(&redis).await;
    let mut old = sample(0);
    old.time = at(mailroute_relay::clock::now_ms() - 40 * 24 * 3600 * 1000);
    log.record(&old).await.unwrap();
    let mut recent = sample(1);
    recent.time = at(mailroute_relay::clock::now_ms());
    log.record(&recent).await.unwrap();

    let task = tokio::spawn(log.clone().run_trimmer(Duration::from_millis(20)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = log.query(&EventFilter::default(), None, 10).await.unwrap();
        if page.events == vec![recent.clone()] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "old event never trimmed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
}

#[tokio::test]
async fn late_events_keep_their_time_and_ids_stay_ordered() {
    let redis = RedisServer::start().unwrap();
    let log = redis_log(&redis).await;
    let newer = sample(5);
    let older = sample(2);
    let id_newer = log.record(&newer).await.unwrap();
    let id_older = log.record(&older).await.unwrap();
    assert!(id_older > id_newer);
    assert_eq!(id_older.ms, id_newer.ms);
    let page = log.query(&EventFilter::default(), None, 10).await.unwrap();
    assert_eq!(page.events, vec![newer.clone(), older.clone()]);

    // Also after the stream was emptied by trimming (Redis keeps its last id).
    log.trim(at(T0 + 400 * 24 * 3600 * 1000)).await.unwrap();
    let id_oldest = log.record(&sample(0)).await.unwrap();
    assert!(id_oldest > id_older);
    let page = log.query(&EventFilter::default(), None, 10).await.unwrap();
    assert_eq!(page.events, vec![sample(0)]);
}

#[tokio::test]
async fn keys_use_the_configured_prefix_with_hash_tag() {
    let redis = RedisServer::start().unwrap();
    let a = redis_log(&redis).await;
    let b = DeliveryLog::redis(conn(&redis).await, "{tenant-b}:").without_writer();
    a.record(&sample(0)).await.unwrap();
    b.record(&sample(1)).await.unwrap();
    b.record(&sample(2)).await.unwrap();
    let mut c = conn(&redis).await;
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut c).await.unwrap();
    keys.sort();
    assert_eq!(keys, ["{mailroute}:dlog", "{tenant-b}:dlog"]);
    let page = b.query(&EventFilter::default(), None, 10).await.unwrap();
    assert_eq!(page.events, vec![sample(1), sample(2)]);
}

#[tokio::test]
async fn stored_and_printed_records_hold_no_content_fields() {
    let redis = RedisServer::start().unwrap();
    let capture = Capture::default();
    let log = redis_log(&redis).await.with_writer(capture.clone());
    let e = sample(3);
    log.record(&e).await.unwrap();

    let expected_keys: BTreeSet<&str> = [
        "time",
        "result",
        "message_id",
        "message_id_header",
        "job_id",
        "source_ip",
        "auth_user",
        "namespace",
        "service_account",
        "listener",
        "envelope_from",
        "recipient",
        "route",
        "remote_host",
        "reply_code",
        "enhanced_code",
        "reply_text",
        "attempt",
        "bounce_class",
        "tls",
        "not_before",
    ]
    .into_iter()
    .collect();

    // The stdout line.
    let lines = capture.lines();
    assert_eq!(lines.len(), 1);
    let printed: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let keys: BTreeSet<&str> = printed.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, expected_keys);
    for forbidden in ["subject", "body", "from_name", "to_name", "headers"] {
        assert!(!lines[0].contains(&format!("\"{forbidden}\"")));
    }

    // The stored stream entry: one field, the same record without its empty fields.
    let mut c = conn(&redis).await;
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg("{mailroute}:dlog")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    let (id, fields) = &entries[0];
    assert_eq!(id, &format!("{}-0", e.time.timestamp_millis()));
    assert_eq!(fields.len(), 2);
    assert_eq!(fields[0], "e");
    let stored: serde_json::Value = serde_json::from_str(&fields[1]).unwrap();
    let stored_keys: BTreeSet<&str> = stored.as_object().unwrap().keys().map(String::as_str).collect();
    assert!(stored_keys.is_subset(&expected_keys), "{stored_keys:?}");
    assert!(!fields[1].contains("null"), "{}", fields[1]);
    let read_back: DeliveryEvent = serde_json::from_str(&fields[1]).unwrap();
    assert_eq!(serde_json::to_string(&read_back).unwrap(), lines[0]);
}

#[tokio::test]
async fn csv_export_of_bounces_quotes_reply_texts() {
    let redis = RedisServer::start().unwrap();
    let log = redis_log(&redis).await;
    let mut tricky = sample(3);
    tricky.reply_text = Some("550 5.1.1 \"user3\", unknown;\r\n see <https://x/?a=1,b=2>".into());
    record_all(&log, &[sample(0), tricky.clone(), sample(7), sample(8)]).await;
    let filter = EventFilter {
        result: Some(EventResult::Bounced),
        bounce_class: Some("invalid_recipient".into()),
        ..Default::default()
    };
    let page = log.query(&filter, None, 100).await.unwrap();
    assert_eq!(page.events, vec![tricky.clone()]);
    let bytes = write_csv(&page.events, true).unwrap();

    let rows = csv_records(&bytes);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(&row[0], "2025-03-01T00:00:03.000Z");
    assert_eq!(&row[1], "user3@example.com");
    assert_eq!(&row[2], "bounced");
    assert_eq!(&row[3], "550");
    assert_eq!(&row[5], tricky.reply_text.as_deref().unwrap());
    assert_eq!(&row[6], "invalid_recipient");
    assert_eq!(&row[7], "orders@shop.example");
    assert_eq!(&row[8], "mail/o365");
}

#[tokio::test]
async fn record_reports_an_unreachable_store_but_still_prints() {
    let mut redis = RedisServer::start().unwrap();
    let capture = Capture::default();
    let client = redis.client().unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let log = DeliveryLog::redis(conn, DEFAULT_PREFIX).with_writer(capture.clone());
    redis.stop();
    assert!(log.record(&sample(1)).await.is_err());
    assert_eq!(capture.lines().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_are_batched_without_loss_or_reordering() {
    // A fresh server has no script loaded: the first batch also covers the NOSCRIPT reload.
    let redis = RedisServer::start().unwrap();
    let log = redis_log(&redis).await;
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..100 {
                    let mut e = sample(i);
                    e.message_id = format!("t{t}-{i:03}");
                    ids.push(log.record(&e).await.unwrap());
                }
                ids
            })
        })
        .collect();
    let mut all_ids = BTreeSet::new();
    for task in tasks {
        let ids = task.await.unwrap();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "one task's records keep their order"
        );
        all_ids.extend(ids);
    }
    assert_eq!(all_ids.len(), 800, "every record has its own id");
    let (stored, _) = all_pages(&log, &EventFilter::default(), 500).await;
    assert_eq!(stored.len(), 800);
    for t in 0..8 {
        let mine: Vec<&str> = stored
            .iter()
            .filter(|e| e.message_id.starts_with(&format!("t{t}-")))
            .map(|e| e.message_id.as_str())
            .collect();
        assert_eq!(mine.len(), 100);
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "stored in submission order: {mine:?}"
        );
    }
}
