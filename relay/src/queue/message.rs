//! The queued message and its per-recipient jobs: the records the queue stores and the worker
//! reads (meta, jobs, recipient states), and the envelope of one delivery attempt. Plain data
//! with serde; no I/O, no policy.

use serde::{Deserialize, Serialize};

use crate::inbound::listener::ListenerKind;

/// Everything about an accepted message except its body. Stored once per message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// Queue id (also the admin API's message id).
    pub id: String,
    pub received_at_ms: i64,
    pub source_ip: String,
    /// Where it came in: a listener, or the relay itself for a DSN.
    pub listener: Origin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// The namespace the sender belongs to (its AUTH user's SenderQuota, or its pod); `None`:
    /// unattributed. Routes and quotas of other namespaces never govern the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The sender's ServiceAccount, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    pub tls: bool,
    /// Envelope sender; empty for the null sender `<>` (bounces).
    pub mail_from: String,
    pub rcpts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id_header: Option<String>,
    pub size: usize,
    #[serde(default)]
    pub options: DeliveryOptions,
    /// Quota that counted this message, if any (for the log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
    /// Set on DSNs the relay generated itself.
    #[serde(default)]
    pub is_dsn: bool,
}

/// Where a queued message came in. Stored (and written to the delivery log) as `smtp`,
/// `submission`, `smtps` or `dsn`, the strings records have always carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum Origin {
    /// Accepted by one of the relay's SMTP listeners.
    Listener(ListenerKind),
    /// A delivery status notification the relay generated itself.
    Dsn,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Listener(l) => l.as_str(),
            Origin::Dsn => "dsn",
        }
    }
}

impl From<ListenerKind> for Origin {
    fn from(l: ListenerKind) -> Self {
        Origin::Listener(l)
    }
}

impl From<Origin> for &'static str {
    fn from(o: Origin) -> Self {
        o.as_str()
    }
}

/// A stored origin that is none of the known ones.
#[derive(Debug, thiserror::Error)]
#[error("unknown message origin `{0}` (expected smtp, submission, smtps or dsn)")]
pub struct UnknownOrigin(String);

impl TryFrom<String> for Origin {
    type Error = UnknownOrigin;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Ok(match s.as_str() {
            "smtp" => Origin::Listener(ListenerKind::Smtp),
            "submission" => Origin::Listener(ListenerKind::Submission),
            "smtps" => Origin::Listener(ListenerKind::Smtps),
            "dsn" => Origin::Dsn,
            _ => return Err(UnknownOrigin(s)),
        })
    }
}

/// Per-message scheduling from the `X-Mailroute-*` extension headers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver_after_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_interval_secs: Option<u64>,
    /// `"22:00-07:00 Asia/Tokyo"`, already validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<String>,
}

/// One recipient of one message: the unit of delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Message id.
    #[serde(rename = "m")]
    pub msg: String,
    /// Index into [`MessageMeta::rcpts`].
    #[serde(rename = "r")]
    pub rcpt: u32,
    /// Delivery attempts made so far (pacing waits do not count).
    #[serde(rename = "a")]
    pub attempts: u32,
    /// Times this job was put back by pacing; keeps schedule members unique.
    #[serde(rename = "w", default)]
    pub waits: u32,
    /// When its current hold began (bulk queue control); absent while not held.
    #[serde(rename = "hs", default, skip_serializing_if = "Option::is_none")]
    pub held_since: Option<i64>,
    /// Time it was held before, ms: its lifetime is longer by that much.
    #[serde(rename = "h", default, skip_serializing_if = "is_zero")]
    pub held_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Job {
    pub fn new(msg: &str, rcpt: u32) -> Self {
        Job {
            msg: msg.to_owned(),
            rcpt,
            attempts: 0,
            waits: 0,
            held_since: None,
            held_ms: 0,
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(s: &[u8]) -> Option<Job> {
        serde_json::from_slice(s).ok()
    }
}

/// The envelope of one delivery attempt: one recipient (the queue holds one job per recipient).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Reverse path without angle brackets; empty for the null sender.
    pub mail_from: &'a str,
    pub rcpt_to: &'a str,
}

/// Where one recipient stands, as written on the message record (lowercase in JSON, also by
/// the queue's cancel script).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    /// Waiting for its first or next try (pacing, quiet hours, no capacity).
    Queued,
    /// A try failed temporarily; retried at `next_attempt_ms`.
    Deferred,
    Delivered,
    /// Failed permanently (a DSN went to the sender unless it was a bounce itself).
    Bounced,
    /// Its lifetime ran out before delivery.
    Expired,
    /// Cancelled through the admin API.
    Cancelled,
    /// Its message record was gone when the job came up.
    Gone,
    /// The job pointed at a recipient the message does not have.
    Invalid,
    /// On a suppression list when the message was queued: not delivered.
    Suppressed,
}

/// Final or current state of one recipient, kept on the message record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientState {
    pub status: RecipientStatus,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// A fresh queue id: 26 lowercase hex digits, the time in milliseconds (11 digits, so ids sort
/// by time) then 15 random-looking ones.
///
/// The random part is a keyed hash (std's `RandomState`: SipHash under a 128-bit key the OS
/// draws once per process) of a per-process counter, not a fresh draw from the OS per id: one
/// system call less per message, and just as unguessable to whoever sees other ids (the 250
/// reply shows a client its own) as long as the key stays in the process. Two processes share
/// an id only if 60 bits of their hashes and the millisecond agree, as with drawn bits.
pub fn new_id(now_ms: i64) -> String {
    use std::hash::BuildHasher;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static KEY: OnceLock<std::hash::RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let rand = KEY.get_or_init(std::hash::RandomState::new).hash_one(n) >> 4;
    format!("{:011x}{rand:015x}", now_ms.max(0))
}

/// A message for unit tests: one recipient, `c@d.example`, from `a@b.example`, received over
/// plain SMTP from loopback, one byte; tests change what they need with `..`.
#[cfg(test)]
impl MessageMeta {
    pub(crate) fn sample(id: &str, received_at_ms: i64) -> Self {
        MessageMeta {
            id: id.into(),
            received_at_ms,
            source_ip: "127.0.0.1".into(),
            listener: crate::inbound::listener::ListenerKind::Smtp.into(),
            auth_user: None,
            namespace: None,
            service_account: None,
            tls: false,
            mail_from: "a@b.example".into(),
            rcpts: vec!["c@d.example".into()],
            message_id_header: None,
            size: 1,
            options: Default::default(),
            quota: None,
            is_dsn: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_do_not_repeat() {
        let ids: Vec<String> = (0..10_000).map(|i| new_id(1_700_000_000_000 + i / 100)).collect();
        for id in &ids {
            assert_eq!(id.len(), 26, "{id}");
            assert!(
                id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        }
        assert!(ids.windows(2).all(|w| w[0][..11] <= w[1][..11]));
        let distinct: std::collections::HashSet<&str> = ids.iter().map(|id| &id[11..]).collect();
        assert_eq!(distinct.len(), ids.len(), "random parts repeat");
        assert!(new_id(-5).starts_with("00000000000"));
    }

    #[test]
    fn job_round_trip_is_compact() {
        let j = Job {
            msg: "abc".into(),
            rcpt: 2,
            attempts: 3,
            waits: 1,
            held_since: None,
            held_ms: 0,
        };
        let s = j.encode();
        assert_eq!(s, r#"{"m":"abc","r":2,"a":3,"w":1}"#);
        assert_eq!(Job::decode(s.as_bytes()), Some(j));
        assert_eq!(Job::decode(b"garbage"), None);
    }

    #[test]
    fn a_message_queued_before_tenancy_reads_as_unattributed() {
        let old = r#"{"id":"m1","received_at_ms":1,"source_ip":"10.0.0.1","listener":"smtp","auth_user":"shop",
            "tls":false,"mail_from":"a@b.example","rcpts":["c@d.example"],"size":10}"#;
        let m: MessageMeta = serde_json::from_str(old).unwrap();
        assert_eq!((m.namespace, m.service_account), (None, None));
        assert_eq!(m.auth_user.as_deref(), Some("shop"));
    }

    #[test]
    fn ids_are_unique_and_sortable_by_time() {
        let a = new_id(1_000);
        let b = new_id(2_000);
        assert_ne!(new_id(1_000), new_id(1_000));
        assert!(a < b);
        assert_eq!(a.len(), 26);
    }

    #[test]
    fn records_written_before_the_origin_was_typed_still_read() {
        // A record as relays stored them when `listener` was a plain string.
        let old = r#"{"id":"01","received_at_ms":5,"source_ip":"10.0.0.1","listener":"submission","tls":true,"mail_from":"a@b.example","rcpts":["c@d.example"],"size":3,"options":{},"is_dsn":false}"#;
        let meta: MessageMeta = serde_json::from_str(old).expect("old record");
        assert_eq!(meta.listener, Origin::Listener(ListenerKind::Submission));
        let again = serde_json::to_string(&meta).expect("json");
        assert!(again.contains(r#""listener":"submission""#), "{again}");
        for (wire, origin) in [
            ("smtp", Origin::Listener(ListenerKind::Smtp)),
            ("submission", Origin::Listener(ListenerKind::Submission)),
            ("smtps", Origin::Listener(ListenerKind::Smtps)),
            ("dsn", Origin::Dsn),
        ] {
            let json = format!("\"{wire}\"");
            assert_eq!(serde_json::from_str::<Origin>(&json).expect(wire), origin);
            assert_eq!(serde_json::to_string(&origin).expect(wire), json);
        }
        let err = serde_json::from_str::<Origin>(r#""lmtp""#).expect_err("unknown origin");
        assert!(err.to_string().contains("unknown message origin `lmtp`"), "{err}");
    }
}
