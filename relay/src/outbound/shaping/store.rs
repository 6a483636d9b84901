//! Shared pacing state: GCRA arrival times, rolling 24-hour recipient counts, back-off records
//! and connection leases, each decision one atomic step (one Lua script, one round trip on
//! Redis). Two implementations with the same semantics: [`RedisPaceStore`] (shared by all pods)
//! and [`MemoryPaceStore`] (one process, for `--queue memory`). This module owns storage only;
//! which limits apply is decided by `limits::Shaping`, and every instant is passed in.

use std::collections::BTreeMap;

use crate::expiring::{Expiring, ExpiringMap, SharedExpiringMap};
use crate::redis_client::{RedisConn, Timeouts};
use async_trait::async_trait;
use redis::Script;

use super::backoff::{BackoffPolicy, BackoffState};
use super::gcra::Gcra;
use super::limits::{DAILY_BUCKET_MS, DAILY_SPAN};
use super::{Pace, PaceReason};
use crate::inbound::quota::window::Rolling;

#[derive(Debug, thiserror::Error)]
pub enum PaceError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from the pacing script: {0}")]
    Protocol(String),
}

/// One message about to go out. Keys are relative to the store's prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaceRequest {
    pub backoff_key: String,
    pub route_rate: Option<(String, Gcra)>,
    /// Key and maximum of the route's rolling 24-hour recipient count.
    pub route_daily: Option<(String, u64)>,
    pub destination_rate: Option<(String, Gcra)>,
    /// Recipients of the message (counted against `route_daily`).
    pub recipients: u64,
}

/// A connection about to be opened: a lease in each limited set, or none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnRequest {
    /// Lease set key and its maximum size.
    pub sets: Vec<(String, u32)>,
    pub permit_id: String,
    pub expires_ms: i64,
    /// Longest wait suggested when a set is full (leases usually end well before they expire).
    pub retry_ms: i64,
}

#[async_trait]
pub trait PaceStore: Send + Sync + 'static {
    /// Checks the back-off, the route rate, the route's daily recipients and the destination
    /// rate together; when all allow, moves all of them, else moves none and says until when
    /// (the latest of the blocking limits, earliest listed on ties).
    async fn acquire(&self, req: &PaceRequest, now_ms: i64) -> Result<Pace, PaceError>;
    /// A rate-limit reply: starts the next back-off unless one is active. `Some`: it started.
    async fn rate_limited(
        &self,
        key: &str,
        policy: BackoffPolicy,
        now_ms: i64,
    ) -> Result<Option<BackoffState>, PaceError>;
    /// A success: forgets the back-off. `true` if there was one (active or remembered).
    async fn clear_backoff(&self, key: &str) -> Result<bool, PaceError>;
    /// The active back-off, if any.
    async fn backoff(&self, key: &str, now_ms: i64) -> Result<Option<BackoffState>, PaceError>;
    /// Takes a lease in every set, or none: `None` when granted, `Some(at)` to try again at.
    async fn connect(&self, req: &ConnRequest, now_ms: i64) -> Result<Option<i64>, PaceError>;
    /// Extends the lease in `keys` (a lease already expired and reclaimed is taken again).
    async fn renew(&self, keys: &[String], permit_id: &str, expires_ms: i64, now_ms: i64) -> Result<(), PaceError>;
    /// Ends the lease in `keys`.
    async fn disconnect(&self, keys: &[String], permit_id: &str) -> Result<(), PaceError>;
}

fn daily(now_ms: i64) -> Rolling {
    Rolling::at(DAILY_BUCKET_MS, DAILY_SPAN, now_ms)
}

/// Collects the latest blocking instant; on ties the first reason stays.
#[derive(Default)]
struct Later(Option<(i64, PaceReason)>);

impl Later {
    fn add(&mut self, at: i64, reason: PaceReason) {
        if self.0.is_none_or(|(t, _)| at > t) {
            self.0 = Some((at, reason));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Memory

#[derive(Debug)]
enum Value {
    Tat(i64),
    Buckets(BTreeMap<i64, u64>),
    Backoff(BackoffState),
    Leases(BTreeMap<String, i64>),
}

/// Pacing state in this process only.
#[derive(Debug, Default)]
pub struct MemoryPaceStore {
    entries: SharedExpiringMap<Value>,
}

impl MemoryPaceStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExpiringMap<Value>> {
        self.entries.lock()
    }
}

/// The connection-lease set under `key`.
fn leases<'a>(map: &'a mut ExpiringMap<Value>, key: &str) -> &'a mut Expiring<Value> {
    map.entry(
        key,
        |v| matches!(v, Value::Leases(_)),
        || Value::Leases(BTreeMap::new()),
    )
}

#[async_trait]
impl PaceStore for MemoryPaceStore {
    async fn acquire(&self, req: &PaceRequest, now_ms: i64) -> Result<Pace, PaceError> {
        let mut map = self.lock();
        map.sweep(now_ms);
        let mut later = Later::default();
        if let Some(Value::Backoff(b)) = map.live(&req.backoff_key, now_ms)
            && b.until_ms > now_ms
        {
            later.add(b.until_ms, PaceReason::Backoff);
        }
        let tat_of = |map: &mut ExpiringMap<Value>, key: &str| match map.live(key, now_ms) {
            Some(Value::Tat(t)) => Some(*t),
            _ => None,
        };
        let route_tat = req
            .route_rate
            .as_ref()
            .map(|(k, g)| (k, g, g.check(tat_of(&mut map, k), now_ms)));
        if let Some((_, _, Err(at))) = route_tat {
            later.add(at, PaceReason::RouteRate);
        }
        let day = daily(now_ms);
        if let Some((k, max)) = &req.route_daily {
            let buckets: Vec<(i64, u64)> = match map.live(k, now_ms) {
                Some(Value::Buckets(b)) => {
                    b.retain(|i, _| day.is_live(*i));
                    b.iter().map(|(i, v)| (*i, *v)).collect()
                }
                _ => vec![],
            };
            let used: u64 = buckets.iter().map(|(_, v)| v).sum();
            if used > 0 && used.saturating_add(req.recipients) > *max {
                later.add(
                    day.fits_at_or_empty(&buckets, req.recipients, *max),
                    PaceReason::RouteDaily,
                );
            }
        }
        let dest_tat = req
            .destination_rate
            .as_ref()
            .map(|(k, g)| (k, g, g.check(tat_of(&mut map, k), now_ms)));
        if let Some((_, _, Err(at))) = dest_tat {
            later.add(at, PaceReason::Destination);
        }
        if let Some((at_ms, reason)) = later.0 {
            return Ok(Pace::NotBefore { at_ms, reason });
        }
        for (k, g, tat) in [route_tat, dest_tat].into_iter().flatten() {
            if let Ok(new_tat) = tat {
                map.put(k, Value::Tat(new_tat), now_ms + g.ttl_ms(new_tat, now_ms));
            }
        }
        if let Some((k, _)) = &req.route_daily {
            let e = map.entry(
                k,
                |v| matches!(v, Value::Buckets(_)),
                || Value::Buckets(BTreeMap::new()),
            );
            if let Value::Buckets(b) = &mut e.value {
                *b.entry(day.current).or_default() += req.recipients;
            }
            e.expire_at_ms = now_ms + day.ttl_ms();
        }
        Ok(Pace::Go)
    }

    async fn rate_limited(
        &self,
        key: &str,
        policy: BackoffPolicy,
        now_ms: i64,
    ) -> Result<Option<BackoffState>, PaceError> {
        let mut map = self.lock();
        let prev = match map.live(key, now_ms) {
            Some(Value::Backoff(b)) => Some(*b),
            _ => None,
        };
        let next = policy.escalate(prev, now_ms);
        if let Some(s) = next {
            map.put(key, Value::Backoff(s), s.until_ms + policy.memory_ms);
        }
        Ok(next)
    }

    async fn clear_backoff(&self, key: &str) -> Result<bool, PaceError> {
        Ok(self.lock().remove(key))
    }

    async fn backoff(&self, key: &str, now_ms: i64) -> Result<Option<BackoffState>, PaceError> {
        let mut map = self.lock();
        Ok(match map.live(key, now_ms) {
            Some(Value::Backoff(b)) if b.until_ms > now_ms => Some(*b),
            _ => None,
        })
    }

    async fn connect(&self, req: &ConnRequest, now_ms: i64) -> Result<Option<i64>, PaceError> {
        let mut map = self.lock();
        let mut wait: Option<i64> = None;
        for (k, max) in &req.sets {
            if let Some(Value::Leases(l)) = map.live(k, now_ms) {
                l.retain(|_, exp| *exp > now_ms);
                if l.len() >= *max as usize {
                    let first = l.values().min().copied().unwrap_or(now_ms);
                    let at = first.min(now_ms + req.retry_ms);
                    wait = Some(wait.map_or(at, |w| w.max(at)));
                }
            }
        }
        if wait.is_some() {
            return Ok(wait);
        }
        for (k, _) in &req.sets {
            let e = leases(&mut map, k);
            if let Value::Leases(l) = &mut e.value {
                l.insert(req.permit_id.clone(), req.expires_ms);
            }
            e.expire_at_ms = e.expire_at_ms.max(req.expires_ms + 60_000);
        }
        Ok(None)
    }

    async fn renew(&self, keys: &[String], permit_id: &str, expires_ms: i64, _now_ms: i64) -> Result<(), PaceError> {
        let mut map = self.lock();
        for k in keys {
            let e = leases(&mut map, k);
            if let Value::Leases(l) = &mut e.value {
                l.insert(permit_id.to_string(), expires_ms);
            }
            e.expire_at_ms = e.expire_at_ms.max(expires_ms + 60_000);
        }
        Ok(())
    }

    async fn disconnect(&self, keys: &[String], permit_id: &str) -> Result<(), PaceError> {
        let mut map = self.lock();
        for k in keys {
            if let Some(Value::Leases(l)) = map.get_mut(k) {
                l.remove(permit_id);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

/// KEYS: backoff hash, route TAT, route daily hash, destination TAT.
/// ARGV: now, recipients, route T, route τ, daily max, daily bucket ms, daily span,
/// destination T, destination τ (T = 0 or max = 0: no such limit).
/// Returns {1} or {0, at, reason} with reason 1 route rate, 2 route daily, 3 destination,
/// 4 back-off. Mirrors `MemoryPaceStore::acquire`, `Gcra::check` and `Rolling`.
const ACQUIRE: &str = r"
local now, rcpts = tonumber(ARGV[1]), tonumber(ARGV[2])
local wait, reason = nil, 0
local function later(t, r)
  if wait == nil or t > wait then wait, reason = t, r end
end
local bu = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if bu > now then later(bu, 4) end
local ri, rtol = tonumber(ARGV[3]), tonumber(ARGV[4])
local rtat = now
if ri > 0 then
  rtat = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), now)
  if rtat - now > rtol then later(rtat - rtol, 1) end
end
local dmax, dbms, dspan = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local cur = math.floor(now / dbms)
if dmax > 0 then
  local h = redis.call('HGETALL', KEYS[3])
  local live, used = {}, 0
  for j = 1, #h, 2 do
    local idx, v = tonumber(h[j]), tonumber(h[j + 1])
    if idx > cur - dspan then
      if v > 0 then
        used = used + v
        live[#live + 1] = {idx, v}
      end
    else
      redis.call('HDEL', KEYS[3], h[j])
    end
  end
  if used > 0 and used + rcpts > dmax then
    table.sort(live, function(x, y) return x[1] < y[1] end)
    local left, fits = used, (cur + dspan) * dbms
    for _, e in ipairs(live) do
      left = left - e[2]
      if left == 0 or left + rcpts <= dmax then
        fits = (e[1] + dspan) * dbms
        break
      end
    end
    later(fits, 2)
  end
end
local di, dtol = tonumber(ARGV[8]), tonumber(ARGV[9])
local dtat = now
if di > 0 then
  dtat = math.max(tonumber(redis.call('GET', KEYS[4]) or '0'), now)
  if dtat - now > dtol then later(dtat - dtol, 3) end
end
if wait ~= nil then return {0, wait, reason} end
if ri > 0 then redis.call('SET', KEYS[2], rtat + ri, 'PX', rtat + ri - now + 1000) end
if dmax > 0 then
  redis.call('HINCRBY', KEYS[3], cur, rcpts)
  redis.call('PEXPIRE', KEYS[3], (dspan + 1) * dbms)
end
if di > 0 then redis.call('SET', KEYS[4], dtat + di, 'PX', dtat + di - now + 1000) end
return {1}
";

/// KEYS: backoff hash. ARGV: now, initial, max, memory. Returns {1, until, level} when a
/// back-off started, {0} when one is active. Mirrors `BackoffPolicy::escalate`.
const RATE_LIMITED: &str = r"
local now = tonumber(ARGV[1])
local u = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if u > now then return {0} end
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or '0') + 1
local d = tonumber(ARGV[2]) * (2 ^ (math.min(math.max(level, 1), 31) - 1))
if d > tonumber(ARGV[3]) then d = tonumber(ARGV[3]) end
u = now + d
redis.call('HSET', KEYS[1], 'until', u, 'level', level)
redis.call('PEXPIRE', KEYS[1], d + tonumber(ARGV[4]))
return {1, u, level}
";

/// KEYS: lease sets. ARGV: now, expires, permit id, retry ms, then the maximum of each set.
/// Returns {1} or {0, at}.
const CONNECT: &str = r"
local now, exp, id, retry = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local wait = nil
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[4 + i]) then
    local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    local at = math.min(tonumber(first[2]), now + retry)
    if wait == nil or at > wait then wait = at end
  end
end
if wait ~= nil then return {0, wait} end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], exp, id)
  local ttl = exp - now + 60000
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return {1}
";

/// KEYS: lease sets. ARGV: now, expires, permit id.
const RENEW: &str = r"
local now, exp, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], exp, id)
  local ttl = exp - now + 60000
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
";

/// Pacing state in Redis, shared by every pod using the same server and prefix.
#[derive(Clone)]
pub struct RedisPaceStore {
    conn: RedisConn,
    prefix: String,
    acquire: Script,
    rate_limited: Script,
    connect: Script,
    renew: Script,
}

impl RedisPaceStore {
    /// `prefix` should carry a hash tag (default `crate::inbound::quota::store::DEFAULT_PREFIX`).
    pub fn new(conn: impl Into<RedisConn>, prefix: impl Into<String>) -> Self {
        RedisPaceStore {
            conn: conn.into(),
            prefix: prefix.into(),
            acquire: Script::new(ACQUIRE),
            rate_limited: Script::new(RATE_LIMITED),
            connect: Script::new(CONNECT),
            renew: Script::new(RENEW),
        }
    }

    /// Connects to `url` (`redis://…`, `rediss://…` or a cluster, see `crate::redis_client::Target::parse`).
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, PaceError> {
        let conn = RedisConn::open(url, Timeouts::default()).await?;
        Ok(Self::new(conn, prefix))
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }
}

fn reason_of(code: i64) -> Result<PaceReason, PaceError> {
    Ok(match code {
        1 => PaceReason::RouteRate,
        2 => PaceReason::RouteDaily,
        3 => PaceReason::Destination,
        4 => PaceReason::Backoff,
        c => return Err(PaceError::Protocol(format!("reason {c}"))),
    })
}

/// The script takes every key: an absent rate gets a key it never touches and a zero rate.
fn rate_or_unused<'a>(rate: &'a Option<(String, Gcra)>, unused: &'a str) -> (&'a str, Gcra) {
    let none = Gcra {
        interval_ms: 0,
        tolerance_ms: 0,
    };
    rate.as_ref().map_or((unused, none), |(k, g)| (k.as_str(), *g))
}

fn at_least(v: Vec<i64>, n: usize) -> Result<Vec<i64>, PaceError> {
    if v.len() < n {
        return Err(PaceError::Protocol(format!("{v:?}")));
    }
    Ok(v)
}

#[async_trait]
impl PaceStore for RedisPaceStore {
    async fn acquire(&self, req: &PaceRequest, now_ms: i64) -> Result<Pace, PaceError> {
        let unused = "pace:unused";
        let (rk, rg) = rate_or_unused(&req.route_rate, unused);
        let (dk, dmax) = req.route_daily.as_ref().map_or((unused, 0), |(k, m)| (k.as_str(), *m));
        let (xk, xg) = rate_or_unused(&req.destination_rate, unused);
        let mut inv = self.acquire.prepare_invoke();
        inv.key(self.key(&req.backoff_key))
            .key(self.key(rk))
            .key(self.key(dk))
            .key(self.key(xk))
            .arg(now_ms)
            .arg(req.recipients)
            .arg(rg.interval_ms)
            .arg(rg.tolerance_ms)
            .arg(dmax)
            .arg(DAILY_BUCKET_MS)
            .arg(DAILY_SPAN)
            .arg(xg.interval_ms)
            .arg(xg.tolerance_ms);
        let mut conn = self.conn.clone();
        let r = at_least(inv.invoke_async(&mut conn).await?, 1)?;
        if r[0] == 1 {
            return Ok(Pace::Go);
        }
        let r = at_least(r, 3)?;
        Ok(Pace::NotBefore {
            at_ms: r[1],
            reason: reason_of(r[2])?,
        })
    }

    async fn rate_limited(
        &self,
        key: &str,
        policy: BackoffPolicy,
        now_ms: i64,
    ) -> Result<Option<BackoffState>, PaceError> {
        let mut conn = self.conn.clone();
        let r: Vec<i64> = self
            .rate_limited
            .key(self.key(key))
            .arg(now_ms)
            .arg(policy.initial_ms)
            .arg(policy.max_ms)
            .arg(policy.memory_ms)
            .invoke_async(&mut conn)
            .await?;
        let r = at_least(r, 1)?;
        if r[0] == 0 {
            return Ok(None);
        }
        let r = at_least(r, 3)?;
        Ok(Some(BackoffState {
            until_ms: r[1],
            level: u32::try_from(r[2]).unwrap_or(u32::MAX),
        }))
    }

    async fn clear_backoff(&self, key: &str) -> Result<bool, PaceError> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("DEL").arg(self.key(key)).query_async(&mut conn).await?;
        Ok(n > 0)
    }

    async fn backoff(&self, key: &str, now_ms: i64) -> Result<Option<BackoffState>, PaceError> {
        let mut conn = self.conn.clone();
        let (until, level): (Option<i64>, Option<u32>) = redis::cmd("HMGET")
            .arg(self.key(key))
            .arg("until")
            .arg("level")
            .query_async(&mut conn)
            .await?;
        Ok(match (until, level) {
            (Some(u), Some(l)) if u > now_ms => Some(BackoffState { until_ms: u, level: l }),
            _ => None,
        })
    }

    async fn connect(&self, req: &ConnRequest, now_ms: i64) -> Result<Option<i64>, PaceError> {
        if req.sets.is_empty() {
            return Ok(None);
        }
        let mut inv = self.connect.prepare_invoke();
        inv.arg(now_ms)
            .arg(req.expires_ms)
            .arg(&req.permit_id)
            .arg(req.retry_ms);
        for (k, max) in &req.sets {
            inv.key(self.key(k)).arg(*max);
        }
        let mut conn = self.conn.clone();
        let r = at_least(inv.invoke_async(&mut conn).await?, 1)?;
        if r[0] == 1 {
            return Ok(None);
        }
        Ok(Some(at_least(r, 2)?[1]))
    }

    async fn renew(&self, keys: &[String], permit_id: &str, expires_ms: i64, now_ms: i64) -> Result<(), PaceError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut inv = self.renew.prepare_invoke();
        inv.arg(now_ms).arg(expires_ms).arg(permit_id);
        for k in keys {
            inv.key(self.key(k));
        }
        let mut conn = self.conn.clone();
        let _: i64 = inv.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn disconnect(&self, keys: &[String], permit_id: &str) -> Result<(), PaceError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        p.atomic();
        for k in keys {
            p.cmd("ZREM").arg(self.key(k)).arg(permit_id).ignore();
        }
        let mut conn = self.conn.clone();
        let () = p.query_async(&mut conn).await?;
        Ok(())
    }
}

/// Test double shared by the pacing tests: the memory store, counting every call (each would be
/// a Redis round trip in the real store); with `down` set every call fails.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct CountingPaceStore {
    pub inner: MemoryPaceStore,
    pub calls: std::sync::atomic::AtomicUsize,
    pub down: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl CountingPaceStore {
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn call(&self) -> Result<(), PaceError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(PaceError::Protocol("down".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
#[async_trait]
impl PaceStore for CountingPaceStore {
    async fn acquire(&self, req: &PaceRequest, now_ms: i64) -> Result<Pace, PaceError> {
        self.call()?;
        self.inner.acquire(req, now_ms).await
    }
    async fn rate_limited(&self, key: &str, p: BackoffPolicy, now_ms: i64) -> Result<Option<BackoffState>, PaceError> {
        self.call()?;
        self.inner.rate_limited(key, p, now_ms).await
    }
    async fn clear_backoff(&self, key: &str) -> Result<bool, PaceError> {
        self.call()?;
        self.inner.clear_backoff(key).await
    }
    async fn backoff(&self, key: &str, now_ms: i64) -> Result<Option<BackoffState>, PaceError> {
        self.call()?;
        self.inner.backoff(key, now_ms).await
    }
    async fn connect(&self, req: &ConnRequest, now_ms: i64) -> Result<Option<i64>, PaceError> {
        self.call()?;
        self.inner.connect(req, now_ms).await
    }
    async fn renew(&self, keys: &[String], id: &str, expires_ms: i64, now_ms: i64) -> Result<(), PaceError> {
        self.call()?;
        self.inner.renew(keys, id, expires_ms, now_ms).await
    }
    async fn disconnect(&self, keys: &[String], id: &str) -> Result<(), PaceError> {
        self.call()?;
        self.inner.disconnect(keys, id).await
    }
}
