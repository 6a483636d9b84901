//! DeliveryWebhook status: the endpoint health the relays write to Redis (the hash of
//! `mailroute_api::webhook::health`), read here with the operator's `--redis-url`, and turned
//! into the status fields and the `Ready` condition (pure: [`status_parts`]). Without
//! `--redis-url` the status says the health is unknown and why. Reading only: the relays own
//! the hashes.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::jiff::Timestamp;
use mailroute_api::status::condition_type;
use mailroute_api::webhook::{WebhookFailure, health};

use crate::clock;
use crate::conditions::{Desired, Status};
use mailroute_redis::RedisConn;

/// One webhook's health as the relay sending it wrote it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointHealth {
    pub last_success_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    /// `None`: no HTTP answer.
    pub last_failure_status: Option<u16>,
    pub last_failure_reply: Option<String>,
    pub lag_ms: Option<i64>,
    /// Events given up (too old, or beyond the backlog).
    pub dropped: i64,
}

impl EndpointHealth {
    pub fn from_hash(h: &HashMap<String, String>) -> Self {
        let int = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
        EndpointHealth {
            last_success_ms: int(health::LAST_SUCCESS_MS),
            last_failure_ms: int(health::LAST_FAILURE_MS),
            last_failure_status: int(health::LAST_FAILURE_STATUS)
                .and_then(|s| u16::try_from(s).ok())
                .filter(|s| *s != 0),
            last_failure_reply: h.get(health::LAST_FAILURE_REPLY).cloned().filter(|r| !r.is_empty()),
            lag_ms: int(health::LAG_MS),
            dropped: int(health::DROPPED_EXPIRED).unwrap_or(0) + int(health::DROPPED_BACKLOG).unwrap_or(0),
        }
    }

    /// Whether the last request failed (a failure after the last success).
    pub fn failing(&self) -> bool {
        match (self.last_failure_ms, self.last_success_ms) {
            (Some(f), Some(s)) => f > s,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// Endpoint health of the webhooks, as the plan sees it.
#[derive(Clone, Copy, Debug)]
pub enum Health<'a> {
    /// Read this reconcile, by webhook id (absent: nothing written yet).
    Read(&'a BTreeMap<String, EndpointHealth>),
    /// Redis could not be read: the statuses keep what they show.
    Unavailable,
    /// No `--redis-url`.
    Disabled,
}

/// What the health adds to a webhook's status: `Ready` (for a webhook in the configuration)
/// and the status fields.
pub struct Parts {
    pub ready: Desired,
    pub last_success_time: Option<String>,
    pub last_failure: Option<WebhookFailure>,
    pub lag_seconds: Option<i64>,
    pub dropped_events: Option<i64>,
}

fn time_of(ms: i64) -> Option<String> {
    Timestamp::from_millisecond(ms).ok().map(clock::format)
}

/// The health part of a webhook's status; `in_config` is the compile's `Ready=True` message.
/// `None` when the health is unavailable this round (the status keeps what it shows).
pub fn status_parts(h: Option<&EndpointHealth>, health: Health<'_>, in_config: &str) -> Option<Parts> {
    let ready = condition_type::READY;
    match health {
        Health::Unavailable => None,
        Health::Disabled => Some(Parts {
            ready: Desired::new(
                ready,
                Status::Unknown,
                "HealthUnavailable",
                format!(
                    "{in_config}; the endpoint's health is unknown: it is read from the relays' Redis, and the \
                     operator has no --redis-url (chart: podIdentities.enabled)"
                ),
            ),
            last_success_time: None,
            last_failure: None,
            lag_seconds: None,
            dropped_events: None,
        }),
        Health::Read(_) => {
            let h = h.cloned().unwrap_or_default();
            let dropped = (h.dropped > 0).then(|| {
                format!(
                    "; {} event(s) were dropped (older than maxAge, or beyond maxBacklog)",
                    h.dropped
                )
            });
            let ready = if h.failing() {
                let what = match (h.last_failure_status, &h.last_failure_reply) {
                    (Some(s), Some(r)) => format!("the endpoint answered {s}: {r}"),
                    (Some(s), None) => format!("the endpoint answered {s}"),
                    (None, Some(r)) => format!("the endpoint did not answer: {r}"),
                    (None, None) => "the endpoint did not answer".to_string(),
                };
                Desired::new(
                    ready,
                    Status::False,
                    "EndpointFailing",
                    format!(
                        "{what}; events wait in the webhook's outbox and are retried with back-off{}",
                        dropped.unwrap_or_default()
                    ),
                )
            } else if h.last_success_ms.is_some() {
                Desired::new(
                    ready,
                    Status::True,
                    "Delivering",
                    format!(
                        "{in_config}; the endpoint accepts events{}",
                        dropped.unwrap_or_default()
                    ),
                )
            } else {
                Desired::new(
                    ready,
                    Status::True,
                    "InConfig",
                    format!("{in_config}; no event sent yet"),
                )
            };
            Some(Parts {
                ready,
                last_success_time: h.last_success_ms.and_then(time_of),
                last_failure: h.last_failure_ms.and_then(time_of).map(|time| WebhookFailure {
                    time,
                    http_status: h.last_failure_status.map(i32::from),
                    reply: h.last_failure_reply.clone(),
                }),
                lag_seconds: Some(h.lag_ms.unwrap_or(0) / 1000),
                dropped_events: (h.dropped > 0).then_some(h.dropped),
            })
        }
    }
}

/// Reads the webhooks' health hashes from the relays' Redis (connected on first use).
pub struct HealthReader {
    url: String,
    prefix: String,
    conn: tokio::sync::Mutex<Option<RedisConn>>,
}

impl HealthReader {
    pub fn new(url: String, prefix: String) -> Self {
        HealthReader {
            url,
            prefix,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The health of each of `ids`; an error when Redis cannot be read.
    pub async fn read(&self, ids: &[String]) -> Result<BTreeMap<String, EndpointHealth>, redis::RedisError> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(crate::podpublish::open_redis(&self.url).await?);
        }
        let Some(conn) = guard.as_mut() else {
            return Ok(BTreeMap::new());
        };
        let mut out = BTreeMap::new();
        for id in ids {
            let h: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(health::key(&self.prefix, id))
                .query_async(conn)
                .await?;
            out.insert(id.clone(), EndpointHealth::from_hash(&h));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_relays_health_becomes_ready_and_the_status_fields() {
        let failing = EndpointHealth::from_hash(&hash(&[
            ("last_success_ms", "1714564800000"),
            ("last_failure_ms", "1714564860000"),
            ("last_failure_status", "500"),
            ("last_failure_reply", "busy: try again later"),
            ("lag_ms", "61000"),
            ("dropped_expired", "2"),
            ("dropped_backlog", "1"),
        ]));
        assert!(failing.failing());
        let map = BTreeMap::new();
        let p = status_parts(Some(&failing), Health::Read(&map), "in the relay configuration").unwrap();
        assert_eq!(
            (p.ready.status, p.ready.reason.as_str()),
            (Status::False, "EndpointFailing")
        );
        assert!(
            p.ready.message.contains("answered 500: busy: try again later"),
            "{}",
            p.ready.message
        );
        assert!(p.ready.message.contains("3 event(s) were dropped"));
        assert_eq!(p.last_success_time.as_deref(), Some("2024-05-01T12:00:00Z"));
        let f = p.last_failure.unwrap();
        assert_eq!((f.time.as_str(), f.http_status), ("2024-05-01T12:01:00Z", Some(500)));
        assert_eq!((p.lag_seconds, p.dropped_events), (Some(61), Some(3)));

        let refused = EndpointHealth::from_hash(&hash(&[
            ("last_failure_ms", "1714564860000"),
            ("last_failure_status", "0"),
            ("last_failure_reply", "connect: Connection refused (os error 111)"),
        ]));
        let p = status_parts(Some(&refused), Health::Read(&map), "x").unwrap();
        assert!(p.ready.message.starts_with("the endpoint did not answer: connect"));
        assert_eq!(p.last_failure.unwrap().http_status, None);

        let fine = EndpointHealth::from_hash(&hash(&[
            ("last_success_ms", "1714564900000"),
            ("last_failure_ms", "1714564860000"),
        ]));
        let p = status_parts(Some(&fine), Health::Read(&map), "x").unwrap();
        assert_eq!((p.ready.status, p.ready.reason.as_str()), (Status::True, "Delivering"));
        let p = status_parts(None, Health::Read(&map), "x").unwrap();
        assert_eq!((p.ready.status, p.ready.reason.as_str()), (Status::True, "InConfig"));

        let p = status_parts(None, Health::Disabled, "x").unwrap();
        assert_eq!(
            (p.ready.status, p.ready.reason.as_str()),
            (Status::Unknown, "HealthUnavailable")
        );
        assert!(p.ready.message.contains("--redis-url"));
        assert!(status_parts(None, Health::Unavailable, "x").is_none());
    }
}
