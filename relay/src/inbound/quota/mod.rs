//! Sender quotas (`SenderQuota`): which quota a sender falls under, whether it may use its
//! envelope-from domain, and whether each recipient or message still fits its limits, with the
//! SMTP reply when it does not. Counters are shared by all relay pods through a [`QuotaStore`]
//! (Redis in production), so a restart or a new pod never resets usage.
//!
//! This module owns the decision and the reply text. It must not talk SMTP, touch the queue or
//! export metrics: the inbound server calls it at `MAIL FROM`, `RCPT TO` and the end of `DATA`
//! and sends the reply it gets; metric labels come from [`QuotaDecision::result_label`].
//!
//! # Semantics
//! - Minute and hour limits are rolling windows (1-second and 1-minute buckets; a unit counts
//!   for between 60 and 61 seconds or minutes, so no 60-second interval ever holds more than
//!   the limit). Day and month limits are calendar periods in the quota's `timeZone`.
//! - Several quotas may count one message (see `policy`): the sender's own per-sender quotas
//!   (the platform's and the tenant's) and every namespace quota governing its namespace, whose
//!   counters are kept per namespace. All limits of all of them must allow; then all counters
//!   move together or none does.
//! - `appliesTo: all`: counted at `RCPT` time, one unit per recipient (`countBy: recipients`) or
//!   per message at its first accepted recipient (`countBy: messages`). A recipient over the
//!   limit gets `452 4.5.3` (recipients) or `451 4.7.1` (messages) with `onExceeded: defer`, or
//!   `550 5.7.1` with `reject`; the reply names the limit and when it frees up.
//! - `appliesTo: bulk`: whether a message is bulk is known only after `DATA`, so recipients are
//!   accepted at `RCPT` and the message is counted at the end of `DATA` (1, or its number of
//!   accepted recipients). SMTP has one reply per message after `DATA`, so it is all or nothing:
//!   `451 4.7.1` (defer) or `550 5.7.1` (reject) for the whole message. A message with more
//!   recipients than a limit allows at all is refused with `550 5.7.1` (waiting cannot help).
//! - Usage is reserved when counted; a transaction that does not end in `250` after `DATA`
//!   (RSET, QUIT, a dropped connection, a refused message) gives it back with
//!   [`QuotaEngine::abort`]. Accepted mail stays counted even if it bounces later.

pub(crate) mod policy;
pub mod store;
pub(crate) mod window;

use std::sync::Arc;

use chrono_tz::Tz;
use mailroute_api::RelayConfig;
use mailroute_api::config::{CompiledQuota, Period, PeriodLimit, QuotaSelector};
use mailroute_api::quota::{AppliesTo, CountBy, OnExceeded, PeriodUsage, QuotaUsage};

pub use policy::{PolicyRejection, SenderCtx, applicable, check_from_domain, is_bulk, select};
pub use store::{Added, Counter, CounterWindow, Held, MemoryQuotaStore, QuotaError, QuotaStore, RedisQuotaStore};
use window::{Window, parse_tz, rfc3339_in};

use mailroute_smtp::{EnhancedStatusCode, Reply};

/// Calendar counters outlive their window by this much (pods with a slightly slow clock still
/// write to the window they believe current).
pub const CALENDAR_SLACK_MS: i64 = 3_600_000;

/// Reply when the counters cannot be reached: the client retries later.
pub fn unavailable_reply() -> Reply {
    Reply::with_code(
        451,
        EnhancedStatusCode::new(4, 3, 0),
        "Quota service temporarily unavailable, try again later",
    )
}

/// The quotas that apply to a sender at `MAIL FROM`, after the envelope-from domain policy of
/// each. Empty: no quota applies (no limits, no domain policy).
pub fn policy<'a>(cfg: &'a RelayConfig, ctx: &SenderCtx<'_>) -> Result<Vec<&'a CompiledQuota>, PolicyRejection> {
    let quotas = applicable(&cfg.quotas, ctx);
    for q in &quotas {
        check_from_domain(q, ctx.mail_from)?;
    }
    Ok(quotas)
}

/// The counters of a quota at an instant, in the order of `q.limits`.
pub fn counters(q: &CompiledQuota, now_ms: i64) -> Vec<Counter> {
    counters_of(q, None, now_ms)
}

/// The counters of a quota for one namespace (a namespace quota keeps its own per governed
/// namespace: `quota:<id>@<namespace>:…`; `None`: the quota's single set, `quota:<id>:…`).
pub fn counters_of(q: &CompiledQuota, namespace: Option<&str>, now_ms: i64) -> Vec<Counter> {
    let tz = parse_tz(&q.time_zone);
    let base = match namespace {
        Some(ns) => format!("quota:{}@{ns}", q.id),
        None => format!("quota:{}", q.id),
    };
    q.limits
        .iter()
        .map(|l| {
            let (key, window) = match Window::of(l.period, tz, now_ms) {
                Window::Rolling(r) => (format!("{base}:{}", l.period.as_str()), CounterWindow::Rolling(r)),
                Window::Calendar { id, ends_ms, .. } => (
                    format!("{base}:{}:{id}", l.period.as_str()),
                    CounterWindow::Calendar {
                        ends_ms,
                        expire_at_ms: ends_ms + CALENDAR_SLACK_MS,
                    },
                ),
            };
            Counter {
                key,
                max: l.max,
                window,
            }
        })
        .collect()
}

/// A refused recipient or message, with everything the reply and the delivery log need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaDenial {
    pub quota_id: String,
    /// 451, 452 or 550.
    pub code: u16,
    /// `4.7.1`, `4.5.3` or `5.7.1`.
    pub enhanced: EnhancedStatusCode,
    /// Reply text after the codes.
    pub text: String,
    pub period: Period,
    pub limit: u64,
    /// What the limit's counter held.
    pub used: u64,
    /// When the amount asked for fits again (ms since the epoch).
    pub retry_at_ms: i64,
}

impl QuotaDenial {
    /// The reply, e.g. `451 4.7.1 Sending quota exceeded: …`.
    pub fn reply(&self) -> Reply {
        Reply::with_code(self.code, self.enhanced, &self.text)
    }
}

/// The answer for one recipient (at `RCPT`) or one message (at the end of `DATA`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuotaDecision {
    Accept,
    /// A 4xx reply: the client retries later.
    Defer(QuotaDenial),
    /// A 5xx reply.
    Reject(QuotaDenial),
}

impl QuotaDecision {
    /// `accepted`, `deferred` or `rejected` (label of `mailroute_quota_decisions_total`).
    pub fn result_label(&self) -> &'static str {
        match self {
            Self::Accept => "accepted",
            Self::Defer(_) => "deferred",
            Self::Reject(_) => "rejected",
        }
    }

    /// The reply for a refusal; `None` for `Accept`.
    pub fn reply(&self) -> Option<Reply> {
        match self {
            Self::Accept => None,
            Self::Defer(d) | Self::Reject(d) => Some(d.reply()),
        }
    }
}

/// Where in the SMTP transaction a decision is made (changes the reply code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Rcpt,
    Data,
}

/// The reply for `amount` units that do not fit `limit` (which holds `used`) until `retry_at_ms`.
pub fn denial(
    q: &CompiledQuota,
    limit: PeriodLimit,
    used: u64,
    amount: u64,
    retry_at_ms: i64,
    stage: Stage,
) -> QuotaDecision {
    let tz: Tz = parse_tz(&q.time_zone);
    let unit = match (q.count_by, q.applies_to) {
        (CountBy::Messages, AppliesTo::All) => "messages",
        (CountBy::Recipients, AppliesTo::All) => "recipients",
        (CountBy::Messages, AppliesTo::Bulk) => "bulk messages",
        (CountBy::Recipients, AppliesTo::Bulk) => "bulk recipients",
    };
    let what = format!("limit of {} {unit} per {}", limit.max, limit.period.as_str());
    let when = rfc3339_in(tz, retry_at_ms);
    let d = |code, enhanced, text| QuotaDenial {
        quota_id: q.id.clone(),
        code,
        enhanced,
        text,
        period: limit.period,
        limit: limit.max,
        used,
        retry_at_ms,
    };
    if limit.max > 0 && amount > limit.max {
        return QuotaDecision::Reject(d(
            550,
            EnhancedStatusCode::new(5, 7, 1),
            format!("Message has {amount} recipients, more than the sending quota's {what}"),
        ));
    }
    match (q.on_exceeded, stage, q.count_by) {
        (OnExceeded::Reject, _, _) => QuotaDecision::Reject(d(
            550,
            EnhancedStatusCode::new(5, 7, 1),
            format!("Sending quota exceeded: {what} reached until {when}"),
        )),
        (OnExceeded::Defer, Stage::Rcpt, CountBy::Recipients) => QuotaDecision::Defer(d(
            452,
            EnhancedStatusCode::new(4, 5, 3),
            format!("Sending quota exceeded: {what} reached, try again after {when}"),
        )),
        (OnExceeded::Defer, _, _) => QuotaDecision::Defer(d(
            451,
            EnhancedStatusCode::new(4, 7, 1),
            format!("Sending quota exceeded: {what} reached, try again after {when}"),
        )),
    }
}

/// One quota counting a transaction, with the namespace whose counters it uses (namespace
/// quotas only) and whether it already counted the message.
#[derive(Debug, Clone)]
struct Applied {
    quota: CompiledQuota,
    namespace: Option<String>,
    message_counted: bool,
}

impl Applied {
    fn counters(&self, now_ms: i64) -> Vec<Counter> {
        counters_of(&self.quota, self.namespace.as_deref(), now_ms)
    }
}

/// Quota state of one SMTP transaction (one `MAIL FROM`). Finish it with
/// [`QuotaEngine::abort`] unless the message was accepted; dropping it keeps what it counted.
#[derive(Debug, Default)]
pub struct QuotaTxn {
    quotas: Vec<Applied>,
    rcpts: u64,
    held: Vec<Held>,
}

impl QuotaTxn {
    /// A transaction counted by these quotas (the first is the one named in logs and metrics);
    /// `namespace` is the sender's, whose counters namespace quotas use.
    pub fn new(quotas: Vec<CompiledQuota>, namespace: Option<&str>) -> Self {
        QuotaTxn {
            quotas: quotas
                .into_iter()
                .map(|q| Applied {
                    namespace: (q.selector == QuotaSelector::Namespace).then(|| namespace.unwrap_or("-").to_string()),
                    quota: q,
                    message_counted: false,
                })
                .collect(),
            ..QuotaTxn::default()
        }
    }

    /// The applicable quota's id (metric label), if any: the sender's own quota, else the first
    /// namespace quota.
    pub fn quota_id(&self) -> Option<&str> {
        self.quotas.first().map(|a| a.quota.id.as_str())
    }

    /// Every quota counting this transaction, by id.
    pub fn quota_ids(&self) -> impl Iterator<Item = &str> {
        self.quotas.iter().map(|a| a.quota.id.as_str())
    }

    /// Recipients accepted by the quota so far.
    pub fn recipients(&self) -> u64 {
        self.rcpts
    }

    /// The message was queued: keep what was counted (same as dropping the transaction).
    pub fn commit(self) {}
}

/// Quota decisions over a shared counter store.
#[derive(Clone)]
pub struct QuotaEngine {
    store: Arc<dyn QuotaStore>,
}

impl QuotaEngine {
    pub fn new(store: Arc<dyn QuotaStore>) -> Self {
        QuotaEngine { store }
    }

    /// At `MAIL FROM`: picks the quotas and checks their envelope-from domain policies (`Err`:
    /// answer [`PolicyRejection::reply`], `550 5.7.1`). The quotas are copied into the
    /// transaction, so a configuration reload mid-transaction does not change its answers.
    pub fn begin(&self, cfg: &RelayConfig, ctx: &SenderCtx<'_>) -> Result<QuotaTxn, PolicyRejection> {
        let quotas = policy(cfg, ctx)?.into_iter().cloned().collect();
        Ok(QuotaTxn::new(quotas, ctx.namespace))
    }

    /// At `RCPT TO`, after every other check accepted the recipient (an `Accept` here is final:
    /// the recipient is counted). On `Defer`/`Reject` send the reply for this recipient only.
    /// Every quota counting at `RCPT` takes the recipient in one atomic step, or none does.
    pub async fn rcpt(&self, txn: &mut QuotaTxn, now_ms: i64) -> Result<QuotaDecision, QuotaError> {
        let counting: Vec<usize> = txn
            .quotas
            .iter()
            .enumerate()
            .filter(|(_, a)| {
                let counted_here = match (a.quota.applies_to, a.quota.count_by) {
                    (AppliesTo::Bulk, _) => false,
                    (AppliesTo::All, CountBy::Messages) => !a.message_counted,
                    (AppliesTo::All, CountBy::Recipients) => true,
                };
                counted_here && !a.quota.limits.is_empty()
            })
            .map(|(i, _)| i)
            .collect();
        if !counting.is_empty() {
            let parts: Vec<&Applied> = counting.iter().map(|i| &txn.quotas[*i]).collect();
            match self.consume(&parts, 1, now_ms, Stage::Rcpt).await? {
                Ok(held) => store::merge_held(&mut txn.held, held),
                Err(refused) => return Ok(refused),
            }
            for i in counting {
                txn.quotas[i].message_counted = true;
            }
        }
        txn.rcpts += 1;
        Ok(QuotaDecision::Accept)
    }

    /// At the end of `DATA`, before answering: counts a bulk message against the bulk-only
    /// quotas. `message` is the received message (only its header block is read). On
    /// `Defer`/`Reject` answer the whole message with the reply and call [`abort`](Self::abort)
    /// (which also gives back what an earlier quota of this call took).
    pub async fn data(&self, txn: &mut QuotaTxn, message: &[u8], now_ms: i64) -> Result<QuotaDecision, QuotaError> {
        for i in 0..txn.quotas.len() {
            let a = &txn.quotas[i];
            let q = &a.quota;
            if q.applies_to != AppliesTo::Bulk || q.limits.is_empty() || !is_bulk(message, q.bulk_header.as_deref()) {
                continue;
            }
            let amount = match q.count_by {
                CountBy::Messages => 1,
                CountBy::Recipients => txn.rcpts,
            };
            if amount == 0 {
                continue;
            }
            match self.consume(&[a], amount, now_ms, Stage::Data).await? {
                Ok(held) => store::merge_held(&mut txn.held, held),
                Err(refused) => return Ok(refused),
            }
        }
        Ok(QuotaDecision::Accept)
    }

    /// The transaction ended without the message being accepted: give back what it counted.
    pub async fn abort(&self, txn: QuotaTxn) -> Result<(), QuotaError> {
        self.store.release(&txn.held).await
    }

    /// Adds `amount` to the counters of every part at once; on refusal, the reply of the quota
    /// whose counter refused.
    async fn consume(
        &self,
        parts: &[&Applied],
        amount: u64,
        now_ms: i64,
        stage: Stage,
    ) -> Result<Result<Vec<Held>, QuotaDecision>, QuotaError> {
        let mut cs = Vec::new();
        let mut owner = Vec::new();
        for (p, a) in parts.iter().enumerate() {
            for (l, c) in a.counters(now_ms).into_iter().enumerate() {
                cs.push(c);
                owner.push((p, l));
            }
        }
        match self.store.try_add(&cs, amount, now_ms).await? {
            Added::Yes(held) => Ok(Ok(held)),
            Added::No {
                index,
                used,
                fits_at_ms,
            } => {
                let (q, limit) = owner
                    .get(index)
                    .and_then(|(p, l)| Some((&parts[*p].quota, *parts[*p].quota.limits.get(*l)?)))
                    .ok_or_else(|| QuotaError::Protocol(format!("counter index {index} out of range")))?;
                Ok(Err(denial(q, limit, used, amount, fits_at_ms, stage)))
            }
        }
    }

    /// Usage of one quota in its current periods.
    pub async fn usage(&self, q: &CompiledQuota, now_ms: i64) -> Result<QuotaUsage, QuotaError> {
        let readings = self.store.read(&counters(q, now_ms), now_ms).await?;
        Ok(usage_of(q, &readings))
    }

    /// Usage of every quota of `cfg`, in the configuration's order (`GET /api/v1/quotas`, the
    /// usage gauges, the operator's status): one entry per sender quota, one per governed
    /// namespace of a namespace quota (none for a namespace quota governing every namespace,
    /// whose namespaces are not listed). One store round trip for all quotas.
    pub async fn usage_report(&self, cfg: &RelayConfig, now_ms: i64) -> Result<Vec<UsageEntry>, QuotaError> {
        let mut sets: Vec<(&CompiledQuota, Option<&str>)> = Vec::new();
        for q in &cfg.quotas {
            if q.selector == QuotaSelector::Namespace {
                for ns in q.authority.namespaces.iter().flatten() {
                    sets.push((q, Some(ns)));
                }
            } else {
                sets.push((q, None));
            }
        }
        let all: Vec<Counter> = sets.iter().flat_map(|(q, ns)| counters_of(q, *ns, now_ms)).collect();
        let readings = self.store.read(&all, now_ms).await?;
        let mut rest = readings.as_slice();
        let mut out = Vec::with_capacity(sets.len());
        for (q, ns) in sets {
            let (mine, tail) = rest.split_at(q.limits.len().min(rest.len()));
            rest = tail;
            out.push(UsageEntry {
                id: q.id.clone(),
                namespace: ns.map(str::to_owned),
                usage: usage_of(q, mine),
            });
        }
        Ok(out)
    }
}

/// The usage of one quota (of one namespace, for a namespace quota).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageEntry {
    pub id: String,
    /// The namespace counted, for a namespace quota.
    pub namespace: Option<String>,
    pub usage: QuotaUsage,
}

/// Usage of `q` from the readings of its counters (in the order of `q.limits`).
fn usage_of(q: &CompiledQuota, readings: &[store::Reading]) -> QuotaUsage {
    let tz = parse_tz(&q.time_zone);
    let mut u = QuotaUsage::default();
    for (l, r) in q.limits.iter().zip(readings) {
        let used = i64::try_from(r.used).unwrap_or(i64::MAX);
        let limit = i64::try_from(l.max).unwrap_or(i64::MAX);
        let p = PeriodUsage {
            used,
            limit,
            remaining: (limit - used).max(0),
            resets_at: rfc3339_in(tz, r.resets_at_ms),
        };
        let slot = match l.period {
            Period::Minute => &mut u.minute,
            Period::Hour => &mut u.hour,
            Period::Day => &mut u.day,
            Period::Month => &mut u.month,
        };
        *slot = Some(p);
    }
    u
}

#[cfg(test)]
mod tests {
    use mailroute_api::config::QuotaSelector;

    use super::*;

    fn quota(
        count_by: CountBy,
        applies_to: AppliesTo,
        on_exceeded: OnExceeded,
        limits: &[(Period, u64)],
    ) -> CompiledQuota {
        CompiledQuota {
            id: "shop/plan".into(),
            authority: Default::default(),
            selector: QuotaSelector::AuthUser("shop".into()),
            limits: limits
                .iter()
                .map(|(period, max)| PeriodLimit {
                    period: *period,
                    max: *max,
                })
                .collect(),
            count_by,
            applies_to,
            bulk_header: Some("X-Campaign-Id".into()),
            on_exceeded,
            time_zone: "Asia/Tokyo".into(),
            allowed_from_domains: vec![],
            denied_from_domains: vec![],
        }
    }

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn counter_keys_and_windows() {
        let q = quota(
            CountBy::Messages,
            AppliesTo::All,
            OnExceeded::Defer,
            &[(Period::Minute, 10), (Period::Day, 100), (Period::Month, 1000)],
        );
        let cs = counters(&q, ms("2025-03-31T15:30:00Z"));
        let keys: Vec<&str> = cs.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "quota:shop/plan:minute",
                "quota:shop/plan:day:2025-04-01",
                "quota:shop/plan:month:2025-04"
            ]
        );
        assert_eq!(
            cs[2].window,
            CounterWindow::Calendar {
                ends_ms: ms("2025-04-30T15:00:00Z"),
                expire_at_ms: ms("2025-04-30T16:00:00Z")
            }
        );
        assert_eq!(cs[1].max, 100);
    }

    #[test]
    fn reply_texts() {
        let at = ms("2025-04-30T15:00:00Z");
        let month = PeriodLimit {
            period: Period::Month,
            max: 10_000,
        };
        let q = quota(
            CountBy::Messages,
            AppliesTo::Bulk,
            OnExceeded::Defer,
            &[(Period::Month, 10_000)],
        );
        let d = denial(&q, month, 10_000, 1, at, Stage::Data);
        assert_eq!(d.result_label(), "deferred");
        assert_eq!(
            d.reply().unwrap().to_string(),
            "451 4.7.1 Sending quota exceeded: limit of 10000 bulk messages per month reached, try again after 2025-05-01T00:00:00+09:00"
        );
        let q = quota(
            CountBy::Recipients,
            AppliesTo::All,
            OnExceeded::Defer,
            &[(Period::Day, 500)],
        );
        let day = PeriodLimit {
            period: Period::Day,
            max: 500,
        };
        assert_eq!(
            denial(&q, day, 500, 1, at, Stage::Rcpt).reply().unwrap().to_string(),
            "452 4.5.3 Sending quota exceeded: limit of 500 recipients per day reached, try again after 2025-05-01T00:00:00+09:00"
        );
        // After DATA a recipient limit defers the message with 451 (452 would invite splitting).
        assert!(
            denial(&q, day, 500, 3, at, Stage::Data)
                .reply()
                .unwrap()
                .to_string()
                .starts_with("451 4.7.1 ")
        );
        let q = quota(
            CountBy::Messages,
            AppliesTo::All,
            OnExceeded::Reject,
            &[(Period::Hour, 100)],
        );
        let hour = PeriodLimit {
            period: Period::Hour,
            max: 100,
        };
        let r = denial(&q, hour, 100, 1, at, Stage::Rcpt);
        assert_eq!(r.result_label(), "rejected");
        assert_eq!(
            r.reply().unwrap().to_string(),
            "550 5.7.1 Sending quota exceeded: limit of 100 messages per hour reached until 2025-05-01T00:00:00+09:00"
        );
        // More than the limit at once can never fit: refused whatever onExceeded says.
        let q = quota(
            CountBy::Recipients,
            AppliesTo::Bulk,
            OnExceeded::Defer,
            &[(Period::Day, 500)],
        );
        let r = denial(&q, day, 0, 501, at, Stage::Data);
        assert_eq!(
            r.reply().unwrap().to_string(),
            "550 5.7.1 Message has 501 recipients, more than the sending quota's limit of 500 bulk recipients per day"
        );
    }

    fn engine() -> QuotaEngine {
        QuotaEngine::new(Arc::new(MemoryQuotaStore::new()))
    }

    fn txn(q: &CompiledQuota) -> QuotaTxn {
        QuotaTxn::new(vec![q.clone()], None)
    }

    #[tokio::test]
    async fn messages_count_once_per_transaction_and_abort_gives_back() {
        let e = engine();
        let q = quota(
            CountBy::Messages,
            AppliesTo::All,
            OnExceeded::Defer,
            &[(Period::Day, 2)],
        );
        let now = ms("2025-03-09T03:00:00Z");
        let mut t = txn(&q);
        for _ in 0..5 {
            assert_eq!(e.rcpt(&mut t, now).await.unwrap(), QuotaDecision::Accept);
        }
        assert_eq!(t.recipients(), 5);
        assert_eq!(
            e.data(&mut t, b"Subject: x\r\n\r\n", now).await.unwrap(),
            QuotaDecision::Accept
        );
        t.commit();
        let mut t2 = txn(&q);
        assert_eq!(e.rcpt(&mut t2, now).await.unwrap(), QuotaDecision::Accept);
        e.abort(t2).await.unwrap();
        let mut t3 = txn(&q);
        assert_eq!(e.rcpt(&mut t3, now).await.unwrap(), QuotaDecision::Accept);
        let mut t4 = txn(&q);
        let d = e.rcpt(&mut t4, now).await.unwrap();
        assert!(
            matches!(&d, QuotaDecision::Defer(x) if x.code == 451 && x.retry_at_ms == ms("2025-03-09T15:00:00Z")),
            "{d:?}"
        );
        let u = e.usage(&q, now).await.unwrap();
        let day = u.day.unwrap();
        assert_eq!((day.used, day.limit, day.remaining), (2, 2, 0));
        assert_eq!(day.resets_at, "2025-03-10T00:00:00+09:00");
        assert!(u.minute.is_none() && u.month.is_none());
    }

    #[tokio::test]
    async fn bulk_quota_counts_only_bulk_messages_at_data() {
        let e = engine();
        let q = quota(
            CountBy::Recipients,
            AppliesTo::Bulk,
            OnExceeded::Reject,
            &[(Period::Month, 3)],
        );
        let now = ms("2025-03-09T03:00:00Z");
        // Transactional: never counted.
        for _ in 0..3 {
            let mut t = txn(&q);
            e.rcpt(&mut t, now).await.unwrap();
            e.rcpt(&mut t, now).await.unwrap();
            assert_eq!(
                e.data(&mut t, b"Subject: order\r\n\r\n", now).await.unwrap(),
                QuotaDecision::Accept
            );
        }
        assert_eq!(e.usage(&q, now).await.unwrap().month.unwrap().used, 0);
        // Bulk with 2 recipients fits, another with 2 does not (3 left → 1).
        let bulk = b"Precedence: bulk\r\n\r\nhello";
        let mut t = txn(&q);
        e.rcpt(&mut t, now).await.unwrap();
        e.rcpt(&mut t, now).await.unwrap();
        assert_eq!(e.data(&mut t, bulk, now).await.unwrap(), QuotaDecision::Accept);
        let mut t = txn(&q);
        e.rcpt(&mut t, now).await.unwrap();
        e.rcpt(&mut t, now).await.unwrap();
        let d = e.data(&mut t, b"X-Campaign-Id: spring\r\n\r\n", now).await.unwrap();
        assert!(matches!(&d, QuotaDecision::Reject(x) if x.code == 550), "{d:?}");
        e.abort(t).await.unwrap();
        assert_eq!(e.usage(&q, now).await.unwrap().month.unwrap().used, 2);
    }

    #[tokio::test]
    async fn usage_report_covers_every_quota_in_one_read() {
        let e = engine();
        let now = ms("2025-03-09T03:00:00Z");
        let mut a = quota(
            CountBy::Messages,
            AppliesTo::All,
            OnExceeded::Defer,
            &[(Period::Minute, 5), (Period::Month, 50)],
        );
        a.id = "a/first".into();
        let mut b = quota(CountBy::Messages, AppliesTo::All, OnExceeded::Defer, &[]);
        b.id = "b/unlimited".into();
        let mut c = quota(
            CountBy::Recipients,
            AppliesTo::All,
            OnExceeded::Defer,
            &[(Period::Day, 9)],
        );
        c.id = "c/third".into();
        for (q, n) in [(&a, 2), (&c, 3)] {
            let mut t = txn(q);
            for _ in 0..n {
                e.rcpt(&mut t, now).await.unwrap();
            }
        }
        let cfg = RelayConfig {
            quotas: vec![a, b, c],
            ..RelayConfig::empty()
        };
        let r = e.usage_report(&cfg, now).await.unwrap();
        let ids: Vec<&str> = r.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["a/first", "b/unlimited", "c/third"]);
        assert_eq!(r[0].usage.minute.as_ref().unwrap().used, 1);
        assert_eq!(r[0].usage.month.as_ref().unwrap().used, 1);
        assert_eq!(
            r[0].usage.month.as_ref().unwrap().resets_at,
            "2025-04-01T00:00:00+09:00"
        );
        assert_eq!(r[1].usage, QuotaUsage::default());
        let day = r[2].usage.day.as_ref().unwrap();
        assert_eq!((day.used, day.limit, day.remaining), (3, 9, 6));
        assert!(r[2].usage.minute.is_none());
    }

    #[tokio::test]
    async fn no_quota_or_no_limits_accepts_without_counting() {
        let e = engine();
        let mut t = QuotaTxn::default();
        assert_eq!(e.rcpt(&mut t, 0).await.unwrap(), QuotaDecision::Accept);
        assert_eq!(t.quota_id(), None);
        let q = quota(CountBy::Messages, AppliesTo::All, OnExceeded::Reject, &[]);
        let mut t = txn(&q);
        assert_eq!(e.rcpt(&mut t, 0).await.unwrap(), QuotaDecision::Accept);
        assert_eq!(t.quota_id(), Some("shop/plan"));
        assert_eq!(e.usage(&q, 0).await.unwrap(), QuotaUsage::default());
    }

    /// Platform `mailroute`; team-a and shop-42 labelled `plan: basic`, team-b not.
    fn tenants(yaml: &str) -> RelayConfig {
        use std::collections::{BTreeMap, BTreeSet};
        let basic = || BTreeMap::from([("plan".to_string(), "basic".to_string())]);
        let tenancy = mailroute_api::Tenancy {
            platform_namespaces: Some(BTreeSet::from(["mailroute".to_string()])),
            namespace_labels: BTreeMap::from([
                ("team-a".to_string(), basic()),
                ("shop-42".to_string(), basic()),
                ("team-b".to_string(), BTreeMap::new()),
            ]),
        };
        let c = mailroute_api::Manifests::from_yaml(yaml, "default")
            .unwrap()
            .compile_for(&tenancy);
        assert!(c.diagnostics.is_empty(), "{:?}", c.diagnostics);
        c.config
    }

    fn sender<'a>(ns: &'a str, from: &'a str) -> SenderCtx<'a> {
        SenderCtx {
            auth_user: None,
            auth_quota: None,
            mail_from: from,
            source_ip: "10.0.0.1".parse().unwrap(),
            namespace: Some(ns),
        }
    }

    /// One message to one recipient; `true` if the quotas took it.
    async fn send(e: &QuotaEngine, cfg: &RelayConfig, ctx: &SenderCtx<'_>, now: i64) -> bool {
        let mut t = e.begin(cfg, ctx).unwrap();
        if e.rcpt(&mut t, now).await.unwrap() == QuotaDecision::Accept {
            t.commit();
            true
        } else {
            e.abort(t).await.unwrap();
            false
        }
    }

    const NAMESPACE_CAP: &str = "apiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {name: plan-basic, namespace: mailroute}\nspec:\n  scope: Namespace\n  allowedNamespaces: {from: Selector, selector: {matchLabels: {plan: basic}}}\n  limits: {perDay: 3}\n---\n";

    #[tokio::test]
    async fn a_namespace_quota_counts_every_sender_of_each_namespace_separately() {
        let e = engine();
        let cfg = tenants(NAMESPACE_CAP);
        let now = ms("2025-03-09T03:00:00Z");
        // Three different senders of team-a share team-a's budget of 3.
        for from in ["a@shop.example", "b@shop.example", "c@other.example"] {
            assert!(send(&e, &cfg, &sender("team-a", from), now).await, "{from}");
        }
        assert!(!send(&e, &cfg, &sender("team-a", "d@new.example"), now).await);
        // shop-42 has a budget of its own; team-b (not selected) and unattributed mail none.
        assert!(send(&e, &cfg, &sender("shop-42", "a@shop.example"), now).await);
        for _ in 0..5 {
            assert!(send(&e, &cfg, &sender("team-b", "a@shop.example"), now).await);
            let mut anon = sender("x", "a@shop.example");
            anon.namespace = None;
            assert!(send(&e, &cfg, &anon, now).await);
        }
        let report = e.usage_report(&cfg, now).await.unwrap();
        let used: Vec<(Option<&str>, i64)> = report
            .iter()
            .map(|u| (u.namespace.as_deref(), u.usage.day.as_ref().unwrap().used))
            .collect();
        assert_eq!(used, [(Some("shop-42"), 1), (Some("team-a"), 3)]);
    }

    #[tokio::test]
    async fn a_namespace_quota_and_the_senders_own_quotas_all_count() {
        let e = engine();
        let yaml = NAMESPACE_CAP.to_string()
            // The platform's per-sender quota and team-a's own, tighter, for the same sender.
            + "apiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {name: per-sender, namespace: mailroute}\nspec:\n  sender: {fromDomain: '*'}\n  limits: {perDay: 100}\n---\n"
            + "apiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {name: news, namespace: team-a}\nspec:\n  sender: {fromAddress: news@shop.example}\n  limits: {perDay: 1}\n---\n"
            // team-b's catch-all is not team-a's business.
            + "apiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {name: all, namespace: team-b}\nspec:\n  sender: {fromDomain: '*'}\n  limits: {perDay: 0}\n";
        let cfg = tenants(&yaml);
        let now = ms("2025-03-09T03:00:00Z");
        let t = e.begin(&cfg, &sender("team-a", "news@shop.example")).unwrap();
        let ids: Vec<&str> = t.quota_ids().collect();
        assert_eq!(ids, ["team-a/news", "mailroute/per-sender", "mailroute/plan-basic"]);
        e.abort(t).await.unwrap();
        assert!(send(&e, &cfg, &sender("team-a", "news@shop.example"), now).await);
        // The tenant's own limit of 1 refuses the second; nothing of it was counted elsewhere.
        let mut t = e.begin(&cfg, &sender("team-a", "news@shop.example")).unwrap();
        match e.rcpt(&mut t, now).await.unwrap() {
            QuotaDecision::Defer(d) => assert_eq!(d.quota_id, "team-a/news"),
            other => panic!("{other:?}"),
        }
        e.abort(t).await.unwrap();
        let report = e.usage_report(&cfg, now).await.unwrap();
        let used = |id: &str| {
            report
                .iter()
                .find(|u| u.id == id && u.namespace.as_deref() != Some("shop-42"))
                .and_then(|u| u.usage.day.as_ref())
                .map(|d| d.used)
        };
        assert_eq!(
            (
                used("team-a/news"),
                used("mailroute/per-sender"),
                used("mailroute/plan-basic")
            ),
            (Some(1), Some(1), Some(1))
        );
        // team-b's sender is stopped by team-b's own quota of 0; team-a's never saw it.
        assert!(!send(&e, &cfg, &sender("team-b", "x@b.example"), now).await);
    }
}
