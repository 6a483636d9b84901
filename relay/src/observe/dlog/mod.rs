//! The delivery log: one [`DeliveryEvent`] per thing that happened to a
//! recipient (received, scheduled, delivered, deferred, bounced, expired,
//! rejected, cancelled, suppressed, held, released, retried), written as a JSON line to stdout and kept in a store that can
//! be queried by time range with filters and cursor paging, and trimmed by age. Stores keep a
//! record without its empty fields ([`stored_json`]); it reads back as the same event.
//!
//! This module owns the event record, the filter and paging logic, the
//! stores (`memory::MemoryStore`, `redis::RedisStore`) and the CSV export.
//! It must never store a subject, display name, header other than Message-ID,
//! or body: [`DeliveryEvent`] has no field for them. It does not decide when
//! events happen (the SMTP server and the worker call [`DeliveryLog::record`]).
//!
//! Records are indexed by a [`RecordId`] `ms-seq`, like a Redis Stream ID:
//! `ms` is the event time in Unix milliseconds, raised to the newest stored
//! record's time when an event arrives out of order (another pod's clock
//! runs ahead), so ids only grow. Time filters and trimming use the id; the
//! cursor is the id of the last record a query looked at.

mod batch;
pub(crate) mod export;
pub(crate) mod memory;
pub(crate) mod redis;

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::observe::metrics::Metrics;

pub use export::{CSV_COLUMNS, write_csv};

/// How long events are kept by default: 31 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(31 * 24 * 3600);
/// Default capacity of the in-memory store.
pub const DEFAULT_MEMORY_CAPACITY: usize = 100_000;
/// Default Redis key prefix; the hash tag keeps every mailroute key in one slot.
pub const DEFAULT_PREFIX: &str = "{mailroute}:";
/// Largest page a query returns.
pub const MAX_LIMIT: usize = 1000;
/// Default page size of the admin API.
pub const DEFAULT_LIMIT: usize = 100;
/// Records one query call looks at before returning a (possibly short) page
/// with a cursor, so a selective filter over a month of events stays cheap.
pub const DEFAULT_SCAN_BUDGET: usize = 20_000;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventResult {
    /// Accepted from a client and queued.
    Received,
    /// Held until `not_before` (`X-Mailroute-Deliver-After`, quiet hours): not tried before then.
    Scheduled,
    /// The destination accepted it (2xx).
    Delivered,
    /// Temporary failure; a retry is scheduled.
    Deferred,
    /// Permanent failure.
    Bounced,
    /// Queue lifetime ran out.
    Expired,
    /// Refused at SMTP time (policy, quota, relay denied).
    Rejected,
    /// Cancelled through the admin API.
    Cancelled,
    /// Accepted but not delivered: the recipient is on a suppression list.
    Suppressed,
    /// Held by a hold (bulk queue control): not attempted, not expiring, until released.
    Held,
    /// Its hold ended (released, or lapsed at the maximum hold time).
    Released,
    /// Made ready at once by a retry through the admin API.
    Retried,
}

impl EventResult {
    pub const ALL: [EventResult; 12] = [
        EventResult::Received,
        EventResult::Scheduled,
        EventResult::Delivered,
        EventResult::Deferred,
        EventResult::Bounced,
        EventResult::Expired,
        EventResult::Rejected,
        EventResult::Cancelled,
        EventResult::Suppressed,
        EventResult::Held,
        EventResult::Released,
        EventResult::Retried,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventResult::Received => "received",
            EventResult::Scheduled => "scheduled",
            EventResult::Delivered => "delivered",
            EventResult::Deferred => "deferred",
            EventResult::Bounced => "bounced",
            EventResult::Expired => "expired",
            EventResult::Rejected => "rejected",
            EventResult::Cancelled => "cancelled",
            EventResult::Suppressed => "suppressed",
            EventResult::Held => "held",
            EventResult::Released => "released",
            EventResult::Retried => "retried",
        }
    }
}

impl fmt::Display for EventResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventResult {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventResult::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = EventResult::ALL.iter().map(|r| r.as_str()).collect();
            format!("unknown result {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// One delivery log record. Serialized as snake_case JSON; absent values are `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeliveryEvent {
    /// When it happened (RFC 3339 UTC, millisecond precision).
    #[serde(with = "time_ms")]
    pub time: DateTime<Utc>,
    pub result: EventResult,
    /// The relay's queue id of the message.
    pub message_id: String,
    /// The `Message-ID:` header value, when known.
    pub message_id_header: Option<String>,
    /// The queue job (one per recipient).
    pub job_id: Option<String>,
    /// The client that submitted the message.
    pub source_ip: Option<IpAddr>,
    /// SMTP AUTH user of the submitting client.
    pub auth_user: Option<String>,
    /// The namespace the sender belongs to; `null`: unattributed (and records written before
    /// tenancy).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The sender's ServiceAccount, where known.
    #[serde(default)]
    pub service_account: Option<String>,
    /// smtp|submission|smtps.
    pub listener: Option<String>,
    /// Envelope sender (return-path); empty for the null sender `<>`.
    pub envelope_from: String,
    pub recipient: String,
    /// Route id "ns/name" (or "mx").
    pub route: Option<String>,
    /// The server that answered (host name or address).
    pub remote_host: Option<String>,
    pub reply_code: Option<u16>,
    /// RFC 3463 code, e.g. "5.1.1".
    pub enhanced_code: Option<String>,
    pub reply_text: Option<String>,
    /// Delivery attempt number, from 1.
    pub attempt: Option<u32>,
    /// Bounce class name (see `outbound::bounce::BounceClass::as_str`).
    pub bounce_class: Option<String>,
    /// Whether the connection this event describes used TLS.
    #[serde(default)]
    pub tls: bool,
    /// `scheduled`: when delivery will be tried (RFC 3339 UTC, milliseconds).
    #[serde(default, with = "opt_time_ms")]
    pub not_before: Option<DateTime<Utc>>,
    /// Who did it, for an action through the admin API (`admin-token` or the Kubernetes user)
    /// or a hold (its author, the SmtpRoute that suspends a route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

impl DeliveryEvent {
    /// An event at `time` (truncated to milliseconds) with every optional field empty.
    pub fn new(
        time: DateTime<Utc>,
        result: EventResult,
        message_id: impl Into<String>,
        envelope_from: impl Into<String>,
        recipient: impl Into<String>,
    ) -> Self {
        DeliveryEvent {
            time: truncate_ms(time),
            result,
            message_id: message_id.into(),
            message_id_header: None,
            job_id: None,
            source_ip: None,
            auth_user: None,
            namespace: None,
            service_account: None,
            listener: None,
            envelope_from: envelope_from.into(),
            recipient: recipient.into(),
            route: None,
            remote_host: None,
            reply_code: None,
            enhanced_code: None,
            reply_text: None,
            attempt: None,
            bounce_class: None,
            tls: false,
            not_before: None,
            actor: None,
        }
    }

    /// The event time in Unix milliseconds, 0 for times before 1970.
    pub fn time_ms(&self) -> u64 {
        u64::try_from(self.time.timestamp_millis()).unwrap_or(0)
    }
}

fn truncate_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// Time as RFC 3339 UTC with milliseconds, e.g. `2025-01-31T12:00:00.250Z`.
mod time_ms {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

mod opt_time_ms {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::time_ms::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| {
                DateTime::parse_from_rfc3339(&s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(serde::de::Error::custom)
            })
            .transpose()
    }
}

/// Formats a time the way the log does.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Position of a record in the log, `ms-seq`; also the paging cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    pub ms: u64,
    pub seq: u64,
}

/// The opaque paging cursor: the id of the last record a query looked at.
pub type Cursor = RecordId;

impl RecordId {
    pub const fn new(ms: u64, seq: u64) -> Self {
        RecordId { ms, seq }
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for RecordId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid cursor {s:?}");
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(bad());
        }
        Ok(RecordId {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for RecordId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RecordId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The id of a new record with event time `event_ms`, after the newest id
/// `last`: ids never decrease, so a late event is filed at `last`'s time.
/// The Redis store does the same in a script (`XADD key <ms>-*`).
pub fn next_record_id(last: Option<RecordId>, event_ms: u64) -> RecordId {
    match last {
        Some(l) if l.ms >= event_ms => RecordId::new(l.ms, l.seq + 1),
        _ => RecordId::new(event_ms, 0),
    }
}

/// Where a scan starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At this id, inclusive.
    At(RecordId),
    /// Just after this id (the cursor).
    After(RecordId),
}

/// Which events a query returns. Empty fields match everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventFilter {
    /// Inclusive lower time bound (on the record id).
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper time bound (on the record id).
    pub to: Option<DateTime<Utc>>,
    pub result: Option<EventResult>,
    /// Case-insensitive address, or `@domain` for every address of a domain.
    pub recipient: Option<String>,
    /// Like `recipient`, on the envelope sender; `<>` selects the null sender.
    pub sender: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub bounce_class: Option<String>,
    /// The queue id of one message.
    pub message_id: Option<String>,
    /// The sender's namespace; [`UNATTRIBUTED`] selects mail of no known namespace.
    pub namespace: Option<String>,
}

/// How unattributed mail (no known sender namespace) is named in filters and metric labels.
pub const UNATTRIBUTED: &str = "-";

impl EventFilter {
    /// Whether `ev` passes every non-time condition (time is applied by the scan range).
    pub fn matches(&self, ev: &DeliveryEvent) -> bool {
        self.result.is_none_or(|r| ev.result == r)
            && self
                .recipient
                .as_deref()
                .is_none_or(|f| address_matches(f, &ev.recipient))
            && self
                .sender
                .as_deref()
                .is_none_or(|f| address_matches(f, &ev.envelope_from))
            && self.source_ip.is_none_or(|ip| ev.source_ip == Some(ip))
            && self
                .bounce_class
                .as_deref()
                .is_none_or(|c| ev.bounce_class.as_deref() == Some(c))
            && self.message_id.as_deref().is_none_or(|m| ev.message_id == m)
            && self
                .namespace
                .as_deref()
                .is_none_or(|n| ev.namespace.as_deref().unwrap_or(UNATTRIBUTED) == n)
    }

    /// True when only the time range restricts the result, so a scan can
    /// stop after exactly `limit` records.
    fn is_time_only(&self) -> bool {
        self.result.is_none()
            && self.recipient.is_none()
            && self.sender.is_none()
            && self.source_ip.is_none()
            && self.bounce_class.is_none()
            && self.message_id.is_none()
            && self.namespace.is_none()
    }

    /// First record id at or after `from`.
    fn start_id(&self) -> RecordId {
        RecordId::new(self.from.map(ceil_ms).unwrap_or(0), 0)
    }

    /// Records with `ms` below this are before `to`.
    fn end_ms(&self) -> Option<u64> {
        self.to.map(ceil_ms)
    }
}

/// Smallest whole millisecond not before `t` (0 before 1970).
fn ceil_ms(t: DateTime<Utc>) -> u64 {
    let ms = t.timestamp_millis();
    let whole = t.timestamp_subsec_nanos().is_multiple_of(1_000_000);
    let ms = if whole { ms } else { ms.saturating_add(1) };
    u64::try_from(ms).unwrap_or(0)
}

fn address_matches(filter: &str, address: &str) -> bool {
    if filter == "<>" {
        return address.is_empty();
    }
    if filter.starts_with('@') {
        let len = address.len();
        return len >= filter.len()
            && address.is_char_boundary(len - filter.len())
            && address[len - filter.len()..].eq_ignore_ascii_case(filter);
    }
    filter.eq_ignore_ascii_case(address)
}

/// One page of a query.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventPage {
    pub events: Vec<DeliveryEvent>,
    /// Pass back to continue; `None` when the range is exhausted. A page may
    /// hold fewer than `limit` events (even none) and still have a cursor
    /// when the scan budget ran out first.
    pub next_cursor: Option<Cursor>,
}

/// Errors of the delivery log.
#[derive(Debug, thiserror::Error)]
pub enum DlogError {
    #[error("delivery log store: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("delivery log record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("delivery log CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("delivery log store: {0}")]
    Store(String),
}

/// Where records are kept. Ids are assigned by the store ([`next_record_id`]).
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Stores one JSON record whose event time is `time_ms`.
    async fn append(&self, time_ms: u64, json: String) -> Result<RecordId, DlogError>;
    /// Stores several records in order (one round trip where the store can); one id each.
    async fn append_batch(&self, records: Vec<(u64, String)>) -> Result<Vec<RecordId>, DlogError> {
        let mut ids = Vec::with_capacity(records.len());
        for (time_ms, json) in records {
            ids.push(self.append(time_ms, json).await?);
        }
        Ok(ids)
    }
    /// Up to `count` records from `start` in id order, with ids below `end_ms-0`.
    async fn range(
        &self,
        start: Start,
        end_ms: Option<u64>,
        count: usize,
    ) -> Result<Vec<(RecordId, String)>, DlogError>;
    /// Removes records with `ms < min_ms`; returns how many.
    async fn trim_before(&self, min_ms: u64) -> Result<u64, DlogError>;
}

type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// A record as the store keeps it (its event time and stored JSON, see [`stored_json`]) with its
/// JSON line. The Redis queue's commit stores a message's `received` and `scheduled` records in
/// the same step as its jobs become visible (with [`redis::RedisStore`]'s id rule), so no
/// worker's record of the message precedes them.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub result: EventResult,
    pub time_ms: u64,
    /// As stored: without its empty fields.
    pub json: String,
    /// The line written to stdout (every field, `null` when empty); empty when the log writes
    /// no lines.
    pub line: String,
}

/// The record as a store keeps it: the JSON of [`DeliveryEvent`] without the fields that are
/// empty (`null`, `tls` false), which read back as empty, so the admin API, the CSV export and
/// webhooks return the same records as from the full form (older records are in the full form
/// and read as before). A `received` record of the bench's message is 310 bytes instead of 521.
pub fn stored_json(ev: &DeliveryEvent) -> Result<String, DlogError> {
    to_json(&Stored(ev), 384)
}

/// `v` as JSON into a buffer of `capacity` bytes (serde_json's own starts at 128 and grows by
/// reallocating, three times for a record).
fn to_json<T: Serialize>(v: &T, capacity: usize) -> Result<String, DlogError> {
    let mut buf = Vec::with_capacity(capacity);
    serde_json::to_writer(&mut buf, v)?;
    String::from_utf8(buf).map_err(|e| DlogError::Store(e.to_string()))
}

/// [`DeliveryEvent`]'s serialization without its empty fields (see [`stored_json`]).
struct Stored<'a>(&'a DeliveryEvent);

impl Serialize for Stored<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let e = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("time", &format_time(&e.time))?;
        m.serialize_entry("result", &e.result)?;
        m.serialize_entry("message_id", &e.message_id)?;
        fn opt<M: SerializeMap, T: Serialize>(m: &mut M, k: &str, v: &Option<T>) -> Result<(), M::Error> {
            match v {
                Some(v) => m.serialize_entry(k, v),
                None => Ok(()),
            }
        }
        opt(&mut m, "message_id_header", &e.message_id_header)?;
        opt(&mut m, "job_id", &e.job_id)?;
        opt(&mut m, "source_ip", &e.source_ip)?;
        opt(&mut m, "auth_user", &e.auth_user)?;
        opt(&mut m, "namespace", &e.namespace)?;
        opt(&mut m, "service_account", &e.service_account)?;
        opt(&mut m, "listener", &e.listener)?;
        m.serialize_entry("envelope_from", &e.envelope_from)?;
        m.serialize_entry("recipient", &e.recipient)?;
        opt(&mut m, "route", &e.route)?;
        opt(&mut m, "remote_host", &e.remote_host)?;
        opt(&mut m, "reply_code", &e.reply_code)?;
        opt(&mut m, "enhanced_code", &e.enhanced_code)?;
        opt(&mut m, "reply_text", &e.reply_text)?;
        opt(&mut m, "attempt", &e.attempt)?;
        opt(&mut m, "bounce_class", &e.bounce_class)?;
        if e.tls {
            m.serialize_entry("tls", &true)?;
        }
        opt(&mut m, "not_before", &e.not_before.as_ref().map(format_time))?;
        opt(&mut m, "actor", &e.actor)?;
        m.end()
    }
}

/// The delivery log handle; cheap to clone and shared by every task.
#[derive(Clone)]
pub struct DeliveryLog {
    store: Arc<dyn EventStore>,
    /// Started on the first record, so a log can be built outside a runtime.
    batcher: Arc<std::sync::OnceLock<batch::Batcher>>,
    sink: Option<Sink>,
    retention: Duration,
    metrics: Option<Arc<Metrics>>,
    scan_budget: usize,
}

impl DeliveryLog {
    /// A log over `store`, writing JSON lines to stdout.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        DeliveryLog {
            store,
            batcher: Arc::default(),
            sink: Some(Arc::new(Mutex::new(Box::new(std::io::stdout())))),
            retention: DEFAULT_RETENTION,
            metrics: None,
            scan_budget: DEFAULT_SCAN_BUDGET,
        }
    }

    /// A bounded in-memory log (local runs, tests): the oldest records go first.
    pub fn memory(capacity: usize) -> Self {
        Self::new(Arc::new(memory::MemoryStore::new(capacity)))
    }

    /// A log in the Redis Stream `<prefix>dlog` (e.g. `{mailroute}:dlog`).
    pub fn redis<C>(conn: C, prefix: &str) -> Self
    where
        C: ::redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    {
        Self::new(Arc::new(redis::RedisStore::new(conn, prefix)))
    }

    /// Writes the JSON lines to `w` instead of stdout.
    pub fn with_writer(mut self, w: impl Write + Send + 'static) -> Self {
        self.sink = Some(Arc::new(Mutex::new(Box::new(w))));
        self
    }

    /// Writes no JSON lines.
    pub fn without_writer(mut self) -> Self {
        self.sink = None;
        self
    }

    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Counts recorded events in `mailroute_dlog_events_total{event}`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Records one query call may look at (at least 1).
    pub fn with_scan_budget(mut self, budget: usize) -> Self {
        self.scan_budget = budget.max(1);
        self
    }

    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Writes `ev` as a JSON line and stores it. The line is written first,
    /// so an event survives on stdout when the store is unreachable.
    pub async fn record(&self, ev: &DeliveryEvent) -> Result<RecordId, DlogError> {
        let json = self.line(ev)?;
        self.batcher().append(ev.time_ms(), json).await
    }

    /// [`DeliveryLog::record`] without waiting for the store: the line is written and the record
    /// handed to the writer before this returns, so it is stored before every record handed in
    /// after it (a session's `received` before a worker's `bounced` of the same message). Store
    /// errors are logged. Must be called within a Tokio runtime.
    pub fn record_detached(&self, ev: &DeliveryEvent) {
        let json = match self.line(ev) {
            Ok(json) => json,
            Err(e) => {
                tracing::warn!(error = %e, "delivery log record not written");
                return;
            }
        };
        let stored = self.batcher().submit(ev.time_ms(), json);
        tokio::spawn(async move {
            let err = match stored.await {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => e,
                Err(_) => "delivery log writer stopped".to_owned(),
            };
            tracing::warn!(error = %err, "delivery log store unavailable; record kept on stdout only");
        });
    }

    /// The record as the store keeps it, for a writer that stores it itself (the Redis queue's
    /// commit, see [`Encoded`]); neither written as a line nor counted yet.
    pub fn encode(&self, ev: &DeliveryEvent) -> Result<Encoded, DlogError> {
        Ok(Encoded {
            result: ev.result,
            time_ms: ev.time_ms(),
            json: stored_json(ev)?,
            line: match self.sink {
                Some(_) => to_json(ev, 640)?,
                None => String::new(),
            },
        })
    }

    /// Writes the line and counts a record that another writer stored: it is not stored again.
    pub fn stored_elsewhere(&self, rec: &Encoded) {
        if let Some(sink) = &self.sink {
            let mut line = String::with_capacity(rec.line.len() + 1);
            line.push_str(&rec.line);
            line.push('\n');
            write_line(sink, &line);
        }
        if let Some(m) = &self.metrics {
            m.dlog_events.with_label_values(&[rec.result.as_str()]).inc();
        }
    }

    /// Stores a record whose line [`DeliveryLog::stored_elsewhere`] already wrote and counted
    /// (another writer was to store it and did not), waiting for the store.
    pub async fn store_encoded(&self, rec: Encoded) -> Result<RecordId, DlogError> {
        self.batcher().append(rec.time_ms, rec.json).await
    }

    /// The record as stored ([`stored_json`]), after writing it as a line (every field) and
    /// counting it.
    fn line(&self, ev: &DeliveryEvent) -> Result<String, DlogError> {
        let json = stored_json(ev)?;
        if let Some(sink) = &self.sink {
            let mut line = to_json(ev, 640)?;
            line.push('\n');
            write_line(sink, &line);
        }
        if let Some(m) = &self.metrics {
            m.dlog_events.with_label_values(&[ev.result.as_str()]).inc();
        }
        Ok(json)
    }

    fn batcher(&self) -> &batch::Batcher {
        self.batcher.get_or_init(|| batch::Batcher::spawn(self.store.clone()))
    }

    /// Events matching `filter` in record order, after `cursor`, at most
    /// `limit` (clamped to 1..=[`MAX_LIMIT`]).
    pub async fn query(
        &self,
        filter: &EventFilter,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<EventPage, DlogError> {
        let limit = limit.clamp(1, MAX_LIMIT);
        let from = filter.start_id();
        let mut start = match cursor {
            Some(c) if c >= from => Start::After(c),
            _ => Start::At(from),
        };
        let end_ms = filter.end_ms();
        if end_ms.is_some_and(|end| end <= from.ms) {
            return Ok(EventPage {
                events: Vec::new(),
                next_cursor: None,
            });
        }
        let time_only = filter.is_time_only();
        let mut events = Vec::new();
        let mut scanned = 0usize;
        loop {
            let want = if time_only {
                limit - events.len()
            } else {
                SCAN_BATCH.min(self.scan_budget - scanned)
            };
            let batch = self.store.range(start, end_ms, want).await?;
            let exhausted = batch.len() < want;
            let mut last = None;
            for (id, json) in batch {
                scanned += 1;
                last = Some(id);
                match serde_json::from_str::<DeliveryEvent>(&json) {
                    Ok(ev) if filter.matches(&ev) => {
                        events.push(ev);
                        if events.len() == limit {
                            return Ok(EventPage {
                                events,
                                next_cursor: Some(id),
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(err) => tracing::warn!(%id, %err, "skipping unreadable delivery log record"),
                }
            }
            let Some(last) = last else {
                return Ok(EventPage {
                    events,
                    next_cursor: None,
                });
            };
            if exhausted {
                return Ok(EventPage {
                    events,
                    next_cursor: None,
                });
            }
            if scanned >= self.scan_budget {
                return Ok(EventPage {
                    events,
                    next_cursor: Some(last),
                });
            }
            start = Start::After(last);
        }
    }

    /// Removes events older than the retention before `now`; returns how many.
    pub async fn trim(&self, now: DateTime<Utc>) -> Result<u64, DlogError> {
        let now_ms = u64::try_from(now.timestamp_millis()).unwrap_or(0);
        let retention_ms = u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX);
        self.store.trim_before(now_ms.saturating_sub(retention_ms)).await
    }

    /// Trims every `every` (first right away), forever; spawn it and abort
    /// the task on shutdown. Errors are logged and retried next round.
    pub async fn run_trimmer(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.trim(crate::clock::now()).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "trimmed delivery log"),
                Err(err) => tracing::warn!(%err, "trimming delivery log"),
            }
        }
    }
}

/// Records fetched from the store per round trip when filtering.
const SCAN_BATCH: usize = 1000;

/// Writes `line` (its newline included) in one `write_all`: stdout's LineWriter hands a whole
/// line to the kernel in one write(2) whatever its length (the line and its newline written
/// apart took two once the line outgrew its 1 KiB buffer), and keeps nothing buffered after.
fn write_line(sink: &Sink, line: &str) {
    // A poisoned lock only means another writer panicked mid-line; keep logging.
    let mut w = sink.lock().unwrap_or_else(|p| p.into_inner());
    let res = w.write_all(line.as_bytes()).and_then(|()| w.flush());
    if let Err(err) = res {
        tracing::warn!(%err, "writing delivery log line");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// A writer into a shared buffer, for the lines a log writes.
    struct W(Arc<Mutex<Vec<u8>>>);
    impl Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn at(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).single().unwrap()
    }

    fn ev(ms: i64, result: EventResult, rcpt: &str) -> DeliveryEvent {
        DeliveryEvent::new(at(ms), result, "q1", "app@shop.example", rcpt)
    }

    #[test]
    fn ids_never_decrease() {
        assert_eq!(next_record_id(None, 100), RecordId::new(100, 0));
        let a = RecordId::new(100, 0);
        assert_eq!(next_record_id(Some(a), 100), RecordId::new(100, 1));
        assert_eq!(next_record_id(Some(a), 50), RecordId::new(100, 1));
        assert_eq!(next_record_id(Some(a), 101), RecordId::new(101, 0));
    }

    #[test]
    fn record_id_text_round_trips_and_rejects_garbage() {
        let id = RecordId::new(1_700_000_000_123, 7);
        assert_eq!(id.to_string(), "1700000000123-7");
        assert_eq!("1700000000123-7".parse::<RecordId>(), Ok(id));
        for bad in ["", "12", "-1", "1-", "a-1", "1-2-3", "+1-2", "1- 2"] {
            assert!(bad.parse::<RecordId>().is_err(), "{bad:?} accepted");
        }
        assert!(RecordId::new(5, 9) < RecordId::new(6, 0));
    }

    #[test]
    fn event_json_is_snake_case_with_ms_utc_time() {
        let mut e = ev(1_700_000_000_250, EventResult::Bounced, "bob@example.com");
        e.reply_code = Some(550);
        e.enhanced_code = Some("5.1.1".into());
        e.source_ip = Some("10.1.2.3".parse().unwrap());
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.250Z");
        assert_eq!(v["result"], "bounced");
        assert_eq!(v["envelope_from"], "app@shop.example");
        assert_eq!(v["source_ip"], "10.1.2.3");
        assert_eq!(v["reply_code"], 550);
        assert_eq!(v["route"], serde_json::Value::Null);
        assert_eq!(v["tls"], false);
        let back: DeliveryEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    /// A stored record leaves its empty fields out and reads back as the same event, so every
    /// reader (admin API, CSV, webhooks) sees what the full form gave; the full form, as records
    /// stored before were, reads the same too.
    #[test]
    fn stored_records_leave_empty_fields_out_and_read_back_the_same() {
        let mut received = ev(1_764_932_406_952, EventResult::Received, "rcpt-0@bench.example");
        received.message_id = "1a245dc7aa803c1952b93bde53".into();
        received.message_id_header = Some("<000000019995@bench.example>".into());
        received.job_id = Some("1a245dc7aa803c1952b93bde53/0".into());
        received.source_ip = Some("127.0.0.1".parse().unwrap());
        received.listener = Some("smtp".into());
        received.envelope_from = "bench-sender@bench.example".into();
        let mut full = received.clone();
        full.result = EventResult::Scheduled;
        full.auth_user = Some("shop".into());
        full.namespace = Some("team-a".into());
        full.service_account = Some("mailer".into());
        full.route = Some("mail/up".into());
        full.remote_host = Some("mx.example".into());
        full.reply_code = Some(250);
        full.enhanced_code = Some("2.0.0".into());
        full.reply_text = Some("ok \"quoted\" ünï".into());
        full.attempt = Some(3);
        full.bounce_class = Some("other".into());
        full.tls = true;
        full.not_before = Some(at(1_764_932_500_001));
        full.actor = Some("admin-token".into());
        for e in [&received, &full, &ev(0, EventResult::Delivered, "")] {
            let stored = stored_json(e).unwrap();
            let back: DeliveryEvent = serde_json::from_str(&stored).unwrap();
            assert_eq!(&back, e, "{stored}");
            assert_eq!(serde_json::to_string(&back).unwrap(), serde_json::to_string(e).unwrap());
            assert!(!stored.contains("null"), "{stored}");
        }
        let stored = stored_json(&received).unwrap();
        let line = serde_json::to_string(&received).unwrap();
        assert_eq!((stored.len(), line.len()), (310, 521), "the bench's received record");
        assert!(!stored.contains("\"tls\""));
        let keys = |j: &str| {
            let v: serde_json::Value = serde_json::from_str(j).unwrap();
            v.as_object().unwrap().keys().cloned().collect::<Vec<_>>()
        };
        let stored = stored_json(&full).unwrap();
        assert_eq!(
            keys(&stored),
            keys(&serde_json::to_string(&full).unwrap()),
            "every field is kept"
        );
        assert_eq!(keys(&stored).len(), 22);
    }

    #[tokio::test]
    async fn the_log_stores_the_compact_record_and_writes_the_full_line() {
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let store = Arc::new(memory::MemoryStore::new(10));
        let log = DeliveryLog::new(store.clone()).with_writer(W(buf.clone()));
        let e = ev(5, EventResult::Delivered, "a@b.example");
        log.record(&e).await.unwrap();
        let stored = store.range(Start::At(RecordId::new(0, 0)), None, 10).await.unwrap();
        assert_eq!(stored[0].1, stored_json(&e).unwrap());
        let line = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        assert_eq!(line, format!("{}\n", serde_json::to_string(&e).unwrap()));
        let enc = log.encode(&e).unwrap();
        assert_eq!(
            (enc.json, enc.line),
            (stored_json(&e).unwrap(), serde_json::to_string(&e).unwrap())
        );
        let quiet = DeliveryLog::new(store).without_writer().encode(&e).unwrap();
        assert!(quiet.line.is_empty());
    }

    #[test]
    fn new_truncates_to_milliseconds() {
        let t = Utc.timestamp_opt(1_700_000_000, 123_456_789).unwrap();
        let e = DeliveryEvent::new(t, EventResult::Received, "q", "", "r@x");
        assert_eq!(e.time.timestamp_subsec_nanos(), 123_000_000);
        assert_eq!(e.time_ms(), 1_700_000_000_123);
    }

    #[test]
    fn result_parses_only_known_names() {
        for r in EventResult::ALL {
            assert_eq!(r.as_str().parse::<EventResult>(), Ok(r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        assert!("Delivered".parse::<EventResult>().is_err());
    }

    #[test]
    fn a_record_stored_before_tenancy_reads_as_unattributed() {
        let old = r#"{"time":"2025-03-01T00:00:00.000Z","result":"delivered","message_id":"q1",
            "message_id_header":null,"job_id":null,"source_ip":null,"auth_user":null,"listener":null,
            "envelope_from":"a@b.example","recipient":"c@d.example","route":null,"remote_host":null,
            "reply_code":null,"enhanced_code":null,"reply_text":null,"attempt":null,"bounce_class":null}"#;
        let e: DeliveryEvent = serde_json::from_str(old).unwrap();
        assert_eq!((e.namespace, e.service_account), (None, None));
    }

    #[test]
    fn filter_matches_each_field() {
        let mut e = ev(0, EventResult::Bounced, "Bob@Example.COM");
        e.source_ip = Some("192.0.2.7".parse().unwrap());
        e.bounce_class = Some("invalid_recipient".into());
        let yes = |f: EventFilter| assert!(f.matches(&e), "{f:?}");
        let no = |f: EventFilter| assert!(!f.matches(&e), "{f:?}");
        yes(EventFilter::default());
        yes(EventFilter {
            result: Some(EventResult::Bounced),
            ..Default::default()
        });
        no(EventFilter {
            result: Some(EventResult::Delivered),
            ..Default::default()
        });
        yes(EventFilter {
            recipient: Some("bob@example.com".into()),
            ..Default::default()
        });
        yes(EventFilter {
            recipient: Some("@example.com".into()),
            ..Default::default()
        });
        no(EventFilter {
            recipient: Some("@ample.com".into()),
            ..Default::default()
        });
        no(EventFilter {
            recipient: Some("ob@example.com".into()),
            ..Default::default()
        });
        yes(EventFilter {
            sender: Some("APP@shop.example".into()),
            ..Default::default()
        });
        no(EventFilter {
            sender: Some("<>".into()),
            ..Default::default()
        });
        yes(EventFilter {
            source_ip: Some("192.0.2.7".parse().unwrap()),
            ..Default::default()
        });
        no(EventFilter {
            source_ip: Some("192.0.2.8".parse().unwrap()),
            ..Default::default()
        });
        yes(EventFilter {
            bounce_class: Some("invalid_recipient".into()),
            ..Default::default()
        });
        no(EventFilter {
            bounce_class: Some("mailbox_full".into()),
            ..Default::default()
        });
        no(EventFilter {
            message_id: Some("q2".into()),
            ..Default::default()
        });
        // Namespace: unattributed mail is `-`; a namespace matches exactly.
        let ns = |n: &str| EventFilter {
            namespace: Some(n.into()),
            ..Default::default()
        };
        yes(ns("-"));
        no(ns("team-a"));
        e.namespace = Some("team-a".into());
        let yes = |f: EventFilter| assert!(f.matches(&e), "{f:?}");
        let no = |f: EventFilter| assert!(!f.matches(&e), "{f:?}");
        yes(ns("team-a"));
        no(ns("team-ab"));
        no(ns("-"));
        let null_sender = DeliveryEvent::new(at(0), EventResult::Delivered, "q", "", "a@b");
        assert!(
            EventFilter {
                sender: Some("<>".into()),
                ..Default::default()
            }
            .matches(&null_sender)
        );
    }

    #[test]
    fn time_bounds_round_up_to_whole_milliseconds() {
        let f = EventFilter {
            from: Some(Utc.timestamp_opt(10, 1).unwrap()),
            to: Some(Utc.timestamp_opt(20, 0).unwrap()),
            ..Default::default()
        };
        assert_eq!(f.start_id(), RecordId::new(10_001, 0));
        assert_eq!(f.end_ms(), Some(20_000));
        assert_eq!(EventFilter::default().start_id(), RecordId::new(0, 0));
        assert_eq!(ceil_ms(at(-5)), 0);
    }

    #[tokio::test]
    async fn records_are_written_as_json_lines() {
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let metrics = Arc::new(Metrics::new());
        let log = DeliveryLog::memory(10)
            .with_writer(W(buf.clone()))
            .with_metrics(metrics.clone());
        log.record(&ev(1, EventResult::Received, "a@x")).await.unwrap();
        log.record(&ev(2, EventResult::Delivered, "a@x")).await.unwrap();
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let second: DeliveryEvent = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second.result, EventResult::Delivered);
        assert_eq!(metrics.dlog_events.with_label_values(&["delivered"]).get(), 1);
    }

    #[tokio::test]
    async fn a_long_line_reaches_a_line_buffered_writer_in_one_write() {
        // As stdout is: a LineWriter with a 1 KiB buffer over the file (one write(2) per write).
        let writes = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);
        impl Write for Calls {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().push(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let log = DeliveryLog::memory(10).with_writer(std::io::LineWriter::with_capacity(1024, Calls(writes.clone())));
        let mut e = ev(1, EventResult::Deferred, "a@x");
        e.reply_text = Some("x".repeat(2000));
        log.record(&e).await.unwrap();
        log.record(&ev(2, EventResult::Received, "b@x")).await.unwrap();
        let writes = writes.lock().unwrap();
        assert_eq!(writes.len(), 2, "one write per line");
        assert!(writes.iter().all(|w| w.ends_with(b"\n") && w.len() > 50));
        let first: DeliveryEvent = serde_json::from_slice(&writes[0]).unwrap();
        assert_eq!(first, e);
    }

    #[tokio::test]
    async fn empty_range_returns_nothing_without_scanning() {
        let log = DeliveryLog::memory(10).without_writer();
        log.record(&ev(5_000, EventResult::Received, "a@x")).await.unwrap();
        let f = EventFilter {
            from: Some(at(6_000)),
            to: Some(at(6_000)),
            ..Default::default()
        };
        let page = log.query(&f, None, 10).await.unwrap();
        assert!(page.events.is_empty() && page.next_cursor.is_none());
    }
}
