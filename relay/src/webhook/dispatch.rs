//! Sending one webhook's outbox: the relay holding the webhook's lease reads the outbox from
//! its head in stream order, drops events older than the webhook's `maxAge`, POSTs up to
//! `maxBatch` events signed (Standard Webhooks), removes them on a 2xx (a script that checks
//! the lease first), and otherwise waits an exponential back-off with jitter before the same
//! events go again. It writes the endpoint's health (last success, last failure with the HTTP
//! status and an excerpt of the answer, lag, drops) to Redis for the operator. It never reads
//! the delivery log and never touches the mail queue: a dead endpoint only grows its outbox.

use std::sync::Arc;
use std::time::Duration;

use mailroute_api::config::CompiledWebhook;
use redis::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use super::fanout::fields_of;
use super::http::{self, Request};
use super::lease::Lease;
use super::sign::SigningKey;
use super::{Shared, health_field as f};

/// Removes the outbox's entries below an id, if the caller holds the lease (else -1).
const TRIM: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
return redis.call('XTRIM', KEYS[2], 'MINID', ARGV[2])
"#;

/// The wait after the `failures`-th failure in a row (from 1): `initial` doubled each time up
/// to `max`, then scaled by a jitter factor in [0.5, 1) (`jitter` in [0, 1)), so relays and
/// webhooks that failed together do not retry together.
pub fn backoff(failures: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(31);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// How often the lag is written to the health hash.
const HEALTH_EVERY: Duration = Duration::from_secs(5);

/// A random number in [0, 1).
fn jitter() -> f64 {
    (uuid::Uuid::new_v4().as_u128() as u64 >> 11) as f64 / (1u64 << 53) as f64
}

/// The id that follows `id` (`ms-seq`) in a stream, for `XTRIM MINID`.
fn next_id(id: &str) -> String {
    match id.split_once('-').map(|(ms, seq)| (ms, seq.parse::<u64>())) {
        Some((ms, Ok(seq))) => format!("{ms}-{}", seq.saturating_add(1)),
        _ => id.to_string(),
    }
}

/// The milliseconds of a record id `ms-seq` (the event's time in the delivery log).
fn id_ms(id: &str) -> i64 {
    id.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
}

/// One outbox entry: its own id, the delivery-log record id and the event JSON.
struct Entry {
    outbox_id: String,
    record_id: String,
    json: String,
}

/// The request body: the batch, each event with its record id as `id`.
pub fn body(webhook: &str, events: &[(&str, &str)], now: chrono::DateTime<chrono::Utc>) -> Vec<u8> {
    let events: Vec<serde_json::Value> = events
        .iter()
        .map(|(id, json)| {
            // Every field of the record, as the log's lines and the admin API have them (the
            // store leaves empty ones out).
            let mut v: serde_json::Value = serde_json::from_str::<crate::observe::dlog::DeliveryEvent>(json)
                .ok()
                .and_then(|ev| serde_json::to_value(ev).ok())
                .or_else(|| serde_json::from_str(json).ok())
                .unwrap_or(serde_json::Value::Null);
            if let serde_json::Value::Object(m) = &mut v {
                m.insert("id".into(), serde_json::Value::String(id.to_string()));
            }
            v
        })
        .collect();
    let doc = serde_json::json!({
        "type": "mailroute.delivery_events",
        "timestamp": crate::observe::dlog::format_time(&now),
        "data": {"webhook": webhook, "events": events},
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

struct State {
    failures: u32,
    next_attempt: Instant,
    /// The TLS configuration and the CA bundle it was built with.
    tls: Option<(Option<String>, Arc<rustls::ClientConfig>)>,
    last_health: Option<Instant>,
    /// The lag last written to the health hash.
    last_lag_ms: i64,
}

/// Serves webhook `id` while it is configured: holds its lease when it can and sends its outbox.
pub(crate) async fn run(shared: Arc<Shared>, id: String, mut shutdown: watch::Receiver<bool>) {
    let mut conn = shared.conn.clone();
    let lease = Lease::new(shared.keys.lease(&id), shared.consumer.clone(), shared.lease_ttl);
    let trim = redis::Script::new(TRIM);
    let renew_every = shared.lease_ttl / 3;
    let mut held = false;
    let mut renewed = Instant::now() - shared.lease_ttl;
    let mut st = State {
        failures: 0,
        next_attempt: Instant::now(),
        tls: None,
        last_health: None,
        last_lag_ms: 0,
    };
    loop {
        if *shutdown.borrow() {
            break;
        }
        let snap = shared.config.get();
        let Some(w) = snap.config.webhooks.iter().find(|w| w.id == id).cloned() else {
            break;
        };
        if !held || renewed.elapsed() >= renew_every {
            let was = held;
            held = match lease.hold(&mut conn).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(webhook = %id, error = %e, "webhook lease: Redis unavailable");
                    false
                }
            };
            renewed = Instant::now();
            if held && !was {
                tracing::info!(webhook = %id, "sending this webhook's events");
                st.failures = 0;
                st.next_attempt = Instant::now();
            }
            if was && !held {
                shared.metrics.forget(&id);
            }
        }
        if !held {
            pause(&mut shutdown, renew_every).await;
            continue;
        }
        let now = Instant::now();
        if now < st.next_attempt {
            pause(&mut shutdown, (st.next_attempt - now).min(renew_every)).await;
            continue;
        }
        let round = step(
            &shared,
            &w,
            &lease,
            &trim,
            &snap.secrets.webhook_keys,
            &snap.secrets.webhook_ca,
            &mut st,
        );
        // A request in flight is abandoned at shutdown: its events stay in the outbox.
        let round = tokio::select! {
            r = round => r,
            _ = shutdown.changed() => break,
        };
        match round {
            Ok(true) => {}
            Ok(false) => pause(&mut shutdown, shared.poll).await,
            Err(e) => {
                tracing::warn!(webhook = %id, error = %e, "webhook outbox: Redis unavailable");
                pause(&mut shutdown, shared.poll.max(Duration::from_secs(1))).await;
            }
        }
    }
    if held {
        lease.release(&mut conn).await;
        shared.metrics.forget(&id);
    }
}

async fn pause(shutdown: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = shutdown.changed() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Removes the outbox's entries up to and including `last` (see [`TRIM`]): how many went, or -1
/// when the lease is no longer the caller's.
async fn trim_through(
    trim: &redis::Script,
    lease: &Lease,
    outbox: &str,
    last: &str,
    conn: &mut crate::redis_client::RedisConn,
) -> redis::RedisResult<i64> {
    trim.key(lease.key())
        .key(outbox)
        .arg(lease.token())
        .arg(next_id(last))
        .invoke_async(conn)
        .await
}

/// One round: reads the head of the outbox and sends it (or drops what expired). `Ok(false)`
/// when there was nothing to do.
async fn step(
    shared: &Shared,
    w: &CompiledWebhook,
    lease: &Lease,
    trim: &redis::Script,
    keys: &std::collections::BTreeMap<String, String>,
    cas: &std::collections::BTreeMap<String, String>,
    st: &mut State,
) -> redis::RedisResult<bool> {
    let mut conn = shared.conn.clone();
    let outbox = shared.keys.outbox(&w.id);
    let health = shared.keys.health(&w.id);
    let v: Value = redis::cmd("XRANGE")
        .arg(&outbox)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(w.max_batch.max(1))
        .query_async(&mut conn)
        .await?;
    let entries: Vec<Entry> = fields_of(&v)
        .into_iter()
        .map(|(outbox_id, mut fields)| Entry {
            outbox_id,
            record_id: fields.remove("d").unwrap_or_default(),
            json: fields.remove("e").unwrap_or_default(),
        })
        .collect();
    let now_ms = crate::clock::now_ms();
    let lag_ms = entries
        .first()
        .map(|e| (now_ms - id_ms(&e.record_id)).max(0))
        .unwrap_or(0);
    shared
        .metrics
        .lag
        .with_label_values(&[&w.id])
        .set(lag_ms as f64 / 1000.0);
    // Every few seconds (the operator reads it once per resync), and at once when it caught up.
    let caught_up = lag_ms == 0 && st.last_lag_ms != 0;
    if st.last_health.is_none_or(|t| t.elapsed() >= HEALTH_EVERY) || caught_up {
        st.last_lag_ms = lag_ms;
        let _: () = redis::pipe()
            .hset(&health, f::LAG_MS, lag_ms)
            .hset(&health, f::UPDATED_MS, now_ms)
            .ignore()
            .query_async(&mut conn)
            .await?;
        st.last_health = Some(Instant::now());
    }
    if entries.is_empty() {
        return Ok(false);
    }

    // Events past their age are dropped, not sent.
    let oldest_kept = now_ms - (w.max_age_secs as i64) * 1000;
    let expired = entries.iter().take_while(|e| id_ms(&e.record_id) < oldest_kept).count();
    if expired > 0 {
        let n = trim_through(trim, lease, &outbox, &entries[expired - 1].outbox_id, &mut conn).await?;
        if n > 0 {
            let _: () = redis::pipe()
                .hincr(&health, f::DROPPED_EXPIRED, n)
                .hset(&health, f::LAST_DROP_MS, now_ms)
                .ignore()
                .query_async(&mut conn)
                .await?;
            shared
                .metrics
                .dropped
                .with_label_values(&[&w.id, "expired"])
                .inc_by(n as u64);
            tracing::warn!(webhook = %w.id, dropped = n, "webhook events older than maxAge dropped");
        }
        return Ok(true);
    }

    let key = keys.get(&w.id).map(|k| SigningKey::parse(k));
    let result = match key {
        Some(Ok(key)) => match tls_for(st, w, cas) {
            Ok(tls) => send(w, &key, &tls, &entries).await,
            Err(e) => Err(e),
        },
        Some(Err(e)) => Err(e),
        None => Err("the signing key is missing from the relay's secrets".into()),
    };
    match result {
        Ok(answer) if (200..300).contains(&answer.status) => {
            let n = trim_through(trim, lease, &outbox, &entries[entries.len() - 1].outbox_id, &mut conn).await?;
            if n < 0 {
                return Ok(true); // The lease went to another relay, which sends them again.
            }
            shared
                .metrics
                .sent
                .with_label_values(&[&w.id])
                .inc_by(entries.len() as u64);
            st.failures = 0;
            let _: () = redis::pipe()
                .hset(&health, f::LAST_SUCCESS_MS, now_ms)
                .ignore()
                .query_async(&mut conn)
                .await?;
            Ok(true)
        }
        other => {
            let (status, reply) = match other {
                Ok(a) => (a.status, a.excerpt),
                Err(e) => (0, http::excerpt(e.as_bytes())),
            };
            st.failures = st.failures.saturating_add(1);
            let wait = backoff(
                st.failures,
                Duration::from_millis(w.initial_backoff_ms),
                Duration::from_millis(w.max_backoff_ms),
                jitter(),
            );
            st.next_attempt = Instant::now() + wait;
            shared.metrics.failed.with_label_values(&[&w.id]).inc();
            tracing::info!(webhook = %w.id, status, reply = %reply, retry_in = ?wait, "webhook endpoint failed");
            let _: () = redis::pipe()
                .hset(&health, f::LAST_FAILURE_MS, now_ms)
                .hset(&health, f::LAST_FAILURE_STATUS, status)
                .hset(&health, f::LAST_FAILURE_REPLY, reply)
                .ignore()
                .query_async(&mut conn)
                .await?;
            Ok(false)
        }
    }
}

fn tls_for(
    st: &mut State,
    w: &CompiledWebhook,
    cas: &std::collections::BTreeMap<String, String>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let ca = if w.custom_ca { cas.get(&w.id).cloned() } else { None };
    if let Some((built_with, tls)) = &st.tls
        && *built_with == ca
    {
        return Ok(tls.clone());
    }
    let tls = mailroute_tls::verifying(super::system_roots(), ca.as_deref()).map_err(|e| format!("TLS setup: {e}"))?;
    st.tls = Some((ca, tls.clone()));
    Ok(tls)
}

async fn send(
    w: &CompiledWebhook,
    key: &SigningKey,
    tls: &Arc<rustls::ClientConfig>,
    entries: &[Entry],
) -> Result<http::Answer, String> {
    let events: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e.record_id.as_str(), e.json.as_str()))
        .collect();
    let now = crate::clock::now();
    let body = body(&w.id, &events, now);
    // Stable across retries of the same batch, so receivers can tell a retry.
    let msg_id = format!("msg_{}_{}", entries[0].record_id, entries.len());
    let ts = now.timestamp();
    let signature = key.sign(&msg_id, ts, &body);
    let req = Request {
        url: &w.url,
        headers: vec![
            ("webhook-id", msg_id),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", signature),
        ],
        body,
    };
    http::post(req, tls, Duration::from_millis(w.timeout_ms)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_up_to_the_maximum_with_jitter_below_it() {
        let (i, m) = (Duration::from_secs(5), Duration::from_secs(600));
        assert_eq!(backoff(1, i, m, 1.0), Duration::from_secs(5));
        assert_eq!(backoff(2, i, m, 1.0), Duration::from_secs(10));
        assert_eq!(backoff(4, i, m, 1.0), Duration::from_secs(40));
        assert_eq!(backoff(20, i, m, 1.0), m);
        assert_eq!(backoff(u32::MAX, i, m, 1.0), m, "no overflow");
        assert_eq!(backoff(1, i, m, 0.0), Duration::from_millis(2500));
        assert!(backoff(3, i, m, 0.3) < backoff(3, i, m, 0.9));
    }

    #[test]
    fn ids_and_the_batch_body() {
        assert_eq!(next_id("1700000000000-7"), "1700000000000-8");
        assert_eq!(id_ms("1700000000000-7"), 1_700_000_000_000);
        let now = chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
        let b = body("team-a/app", &[("1-0", r#"{"result":"delivered"}"#)], now);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["type"], "mailroute.delivery_events");
        assert_eq!(v["data"]["webhook"], "team-a/app");
        assert_eq!(v["data"]["events"][0]["id"], "1-0");
        assert_eq!(v["data"]["events"][0]["result"], "delivered");
    }

    /// A record stored without its empty fields is sent with every field, as one stored in the
    /// full form is.
    #[test]
    fn events_are_sent_with_every_field_whatever_form_they_were_stored_in() {
        use crate::observe::dlog::{DeliveryEvent, EventResult, stored_json};
        let now = chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
        let e = DeliveryEvent::new(now, EventResult::Delivered, "q1", "a@b.example", "c@d.example");
        let full = serde_json::to_string(&e).unwrap();
        let compact = stored_json(&e).unwrap();
        assert_ne!(full, compact);
        let a = body("w", &[("1-0", &full)], now);
        let b = body("w", &[("1-0", &compact)], now);
        assert_eq!(String::from_utf8(a).unwrap(), String::from_utf8(b.clone()).unwrap());
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["data"]["events"][0]["route"], serde_json::Value::Null);
        assert_eq!(v["data"]["events"][0]["tls"], false);
    }
}
