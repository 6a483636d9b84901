//! Quota counters shared by all relay pods: add to every counter of a quota at once or to none
//! (one atomic Lua script, one round trip), give back a reservation, read usage. Two
//! implementations with the same semantics: [`RedisQuotaStore`] (shared, survives restarts) and
//! [`MemoryQuotaStore`] (one process, for `--queue memory`). This module owns key layout and
//! storage only; which counters a decision touches and what the answer means is decided by the
//! caller (`quota::counters`, `quota::QuotaEngine`), and every instant is passed in.

use std::collections::BTreeMap;

use crate::expiring::{ExpiringMap, SharedExpiringMap};
use crate::redis_client::{RedisConn, Timeouts};
use async_trait::async_trait;
use redis::Script;

use super::window::Rolling;

/// Key prefix used when the caller does not choose one; it carries the `{mailroute}` hash tag
/// so every script's keys hash to one Redis Cluster slot, like the queue's.
pub const DEFAULT_PREFIX: &str = "{mailroute}:";

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from the quota script: {0}")]
    Protocol(String),
}

/// One counter touched by a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    /// Key without the store prefix, e.g. `quota:ns/q:minute`, `quota:ns/q:month:2025-03`.
    pub key: String,
    pub max: u64,
    pub window: CounterWindow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterWindow {
    /// A hash of buckets; `current` is ignored by the stores (they derive it from `now_ms`).
    Rolling(Rolling),
    /// A plain counter for one calendar window, reset at `ends_ms`, deleted at `expire_at_ms`.
    Calendar { ends_ms: i64, expire_at_ms: i64 },
}

/// What a successful add reserved, so an aborted transaction can give it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub key: String,
    /// The bucket of a rolling counter; `None` for a calendar counter.
    pub bucket: Option<i64>,
    pub amount: u64,
}

/// The answer of [`QuotaStore::try_add`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Added {
    /// Every counter took the amount.
    Yes(Vec<Held>),
    /// Counter `index` (of those passed) would go over: it holds `used`, and `amount` fits at
    /// `fits_at_ms` at the earliest. When several would go over, the one that frees up last.
    No { index: usize, used: u64, fits_at_ms: i64 },
}

/// Usage of one counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub used: u64,
    /// Calendar: end of the window. Rolling: when the oldest counted unit stops counting
    /// (`now_ms` when nothing counts).
    pub resets_at_ms: i64,
}

#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    /// Adds `amount` to every counter if none goes over its `max`; otherwise changes nothing.
    async fn try_add(&self, counters: &[Counter], amount: u64, now_ms: i64) -> Result<Added, QuotaError>;
    /// Takes back reservations (never below zero; a counter already expired stays gone).
    async fn release(&self, held: &[Held]) -> Result<(), QuotaError>;
    /// Current usage of each counter.
    async fn read(&self, counters: &[Counter], now_ms: i64) -> Result<Vec<Reading>, QuotaError>;
}

fn held_for(counters: &[Counter], amount: u64, now_ms: i64) -> Vec<Held> {
    counters
        .iter()
        .map(|c| Held {
            key: c.key.clone(),
            bucket: match c.window {
                CounterWindow::Rolling(r) => Some(Rolling::at(r.bucket_ms, r.span, now_ms).current),
                CounterWindow::Calendar { .. } => None,
            },
            amount,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Memory

#[derive(Debug)]
enum Slot {
    Buckets(BTreeMap<i64, u64>),
    Value(u64),
}

/// Counters in this process only: lost on exit, not shared with other pods.
#[derive(Debug, Default)]
pub struct MemoryQuotaStore {
    entries: SharedExpiringMap<Slot>,
}

impl MemoryQuotaStore {
    pub fn new() -> Self {
        Self::default()
    }
}

fn memory_used(map: &mut ExpiringMap<Slot>, c: &Counter, now_ms: i64) -> (u64, Vec<(i64, u64)>) {
    match (c.window, map.live(&c.key, now_ms)) {
        (CounterWindow::Rolling(r), Some(Slot::Buckets(b))) => {
            let r = Rolling::at(r.bucket_ms, r.span, now_ms);
            b.retain(|i, _| r.is_live(*i));
            (b.values().sum(), b.iter().map(|(i, v)| (*i, *v)).collect())
        }
        (CounterWindow::Calendar { .. }, Some(Slot::Value(v))) => (*v, vec![]),
        _ => (0, vec![]),
    }
}

#[async_trait]
impl QuotaStore for MemoryQuotaStore {
    async fn try_add(&self, counters: &[Counter], amount: u64, now_ms: i64) -> Result<Added, QuotaError> {
        let mut map = self.entries.lock();
        map.sweep(now_ms);
        let mut deny: Option<(usize, u64, i64)> = None;
        for (i, c) in counters.iter().enumerate() {
            let (used, buckets) = memory_used(&mut map, c, now_ms);
            if used.saturating_add(amount) <= c.max {
                continue;
            }
            let fits = match c.window {
                CounterWindow::Rolling(r) => Rolling::at(r.bucket_ms, r.span, now_ms).fits_at(&buckets, amount, c.max),
                CounterWindow::Calendar { ends_ms, .. } => ends_ms,
            };
            if deny.is_none_or(|(_, _, at)| fits > at) {
                deny = Some((i, used, fits));
            }
        }
        if let Some((index, used, fits_at_ms)) = deny {
            return Ok(Added::No {
                index,
                used,
                fits_at_ms,
            });
        }
        for c in counters {
            match c.window {
                CounterWindow::Rolling(r) => {
                    let r = Rolling::at(r.bucket_ms, r.span, now_ms);
                    let e = map.entry(
                        &c.key,
                        |s| matches!(s, Slot::Buckets(_)),
                        || Slot::Buckets(BTreeMap::new()),
                    );
                    if let Slot::Buckets(b) = &mut e.value {
                        *b.entry(r.current).or_default() += amount;
                    }
                    e.expire_at_ms = now_ms + r.ttl_ms();
                }
                CounterWindow::Calendar { expire_at_ms, .. } => {
                    let e = map.entry(&c.key, |s| matches!(s, Slot::Value(_)), || Slot::Value(0));
                    if let Slot::Value(v) = &mut e.value {
                        *v += amount;
                    }
                    e.expire_at_ms = expire_at_ms;
                }
            }
        }
        Ok(Added::Yes(held_for(counters, amount, now_ms)))
    }

    async fn release(&self, held: &[Held]) -> Result<(), QuotaError> {
        let mut map = self.entries.lock();
        for h in held {
            let Some(slot) = map.get_mut(&h.key) else { continue };
            match (slot, h.bucket) {
                (Slot::Buckets(b), Some(idx)) => {
                    if let Some(v) = b.get_mut(&idx) {
                        *v = v.saturating_sub(h.amount);
                        if *v == 0 {
                            b.remove(&idx);
                        }
                    }
                }
                (Slot::Value(v), None) => *v = v.saturating_sub(h.amount),
                _ => {}
            }
        }
        Ok(())
    }

    async fn read(&self, counters: &[Counter], now_ms: i64) -> Result<Vec<Reading>, QuotaError> {
        let mut map = self.entries.lock();
        Ok(counters
            .iter()
            .map(|c| {
                let (used, buckets) = memory_used(&mut map, c, now_ms);
                Reading {
                    used,
                    resets_at_ms: resets_at(c, buckets.iter().map(|(i, _)| *i).min(), now_ms),
                }
            })
            .collect())
    }
}

fn resets_at(c: &Counter, oldest_bucket: Option<i64>, now_ms: i64) -> i64 {
    match c.window {
        CounterWindow::Calendar { ends_ms, .. } => ends_ms,
        CounterWindow::Rolling(r) => oldest_bucket.map_or(now_ms, |b| r.expiry_of(b)),
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

/// ARGV per counter: kind (1 rolling, 2 calendar), max, then bucket_ms and span (rolling) or
/// ends_ms and expire_at_ms (calendar). Mirrors `MemoryQuotaStore::try_add` and `Rolling`.
/// Expiry is set relative to the caller's `now` (PEXPIRE, not PEXPIREAT), so it does not depend
/// on the Redis host's clock agreeing with the relays'.
const TRY_ADD: &str = r"
local amount = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local deny, deny_used, deny_at = 0, 0, -1
for i = 1, #KEYS do
  local o = 2 + (i - 1) * 4
  local kind, max, a, b = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4])
  local used, fits = 0, 0
  if kind == 1 then
    local cur = math.floor(now / a)
    local h = redis.call('HGETALL', KEYS[i])
    local live = {}
    for j = 1, #h, 2 do
      local idx = tonumber(h[j])
      if idx > cur - b then
        local v = tonumber(h[j + 1])
        used = used + v
        live[#live + 1] = {idx, v}
      else
        redis.call('HDEL', KEYS[i], h[j])
      end
    end
    if used + amount > max then
      table.sort(live, function(x, y) return x[1] < y[1] end)
      local left = used
      fits = (cur + b) * a
      for _, e in ipairs(live) do
        left = left - e[2]
        if left + amount <= max then
          fits = (e[1] + b) * a
          break
        end
      end
    end
  else
    used = tonumber(redis.call('GET', KEYS[i]) or '0')
    fits = a
  end
  if used + amount > max and fits > deny_at then
    deny, deny_used, deny_at = i, used, fits
  end
end
if deny > 0 then
  return {0, deny - 1, deny_used, deny_at}
end
for i = 1, #KEYS do
  local o = 2 + (i - 1) * 4
  local kind, a, b = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4])
  if kind == 1 then
    redis.call('HINCRBY', KEYS[i], math.floor(now / a), amount)
    redis.call('PEXPIRE', KEYS[i], (b + 1) * a)
  else
    redis.call('INCRBY', KEYS[i], amount)
    redis.call('PEXPIRE', KEYS[i], math.max(b - now, 1))
  end
end
return {1}
";

/// ARGV per key: bucket ('' for a calendar counter), amount.
const RELEASE: &str = r"
for i = 1, #KEYS do
  local field, amount = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  if field == '' then
    local v = tonumber(redis.call('GET', KEYS[i]) or '0')
    if v > 0 then
      redis.call('DECRBY', KEYS[i], math.min(v, amount))
    end
  else
    local v = tonumber(redis.call('HGET', KEYS[i], field) or '0')
    if v > amount then
      redis.call('HINCRBY', KEYS[i], field, -amount)
    elseif v > 0 then
      redis.call('HDEL', KEYS[i], field)
    end
  end
end
return 1
";

/// ARGV: now, then per key: kind, bucket_ms, span. Returns used and oldest live bucket (-1).
const READ: &str = r"
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local o = 1 + (i - 1) * 3
  local kind, a, b = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
  local used, oldest = 0, -1
  if kind == 1 then
    local cur = math.floor(now / a)
    local h = redis.call('HGETALL', KEYS[i])
    for j = 1, #h, 2 do
      local idx = tonumber(h[j])
      if idx > cur - b then
        used = used + tonumber(h[j + 1])
        if oldest < 0 or idx < oldest then oldest = idx end
      end
    end
  else
    used = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  out[#out + 1] = used
  out[#out + 1] = oldest
end
return out
";

/// Counters in Redis, shared by every pod using the same server and prefix.
#[derive(Clone)]
pub struct RedisQuotaStore {
    conn: RedisConn,
    prefix: String,
    try_add: Script,
    release: Script,
    read: Script,
}

impl RedisQuotaStore {
    /// `prefix` should contain a hash tag (default [`DEFAULT_PREFIX`]) so the scripts also run
    /// on Redis Cluster.
    pub fn new(conn: impl Into<RedisConn>, prefix: impl Into<String>) -> Self {
        RedisQuotaStore {
            conn: conn.into(),
            prefix: prefix.into(),
            try_add: Script::new(TRY_ADD),
            release: Script::new(RELEASE),
            read: Script::new(READ),
        }
    }

    /// Connects to `url` (`redis://…`, `rediss://…` or a cluster, see `crate::redis_client::Target::parse`).
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, QuotaError> {
        let conn = RedisConn::open(url, Timeouts::default()).await?;
        Ok(Self::new(conn, prefix))
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }
}

fn ints(v: Vec<i64>, want: usize) -> Result<Vec<i64>, QuotaError> {
    if v.len() < want {
        return Err(QuotaError::Protocol(format!("{v:?}")));
    }
    Ok(v)
}

#[async_trait]
impl QuotaStore for RedisQuotaStore {
    async fn try_add(&self, counters: &[Counter], amount: u64, now_ms: i64) -> Result<Added, QuotaError> {
        if counters.is_empty() {
            return Ok(Added::Yes(vec![]));
        }
        let mut inv = self.try_add.prepare_invoke();
        inv.arg(amount).arg(now_ms);
        for c in counters {
            inv.key(self.key(&c.key));
            match c.window {
                CounterWindow::Rolling(r) => inv.arg(1).arg(c.max).arg(r.bucket_ms).arg(r.span),
                CounterWindow::Calendar { ends_ms, expire_at_ms } => {
                    inv.arg(2).arg(c.max).arg(ends_ms).arg(expire_at_ms)
                }
            };
        }
        let mut conn = self.conn.clone();
        let r = ints(inv.invoke_async(&mut conn).await?, 1)?;
        if r[0] == 1 {
            return Ok(Added::Yes(held_for(counters, amount, now_ms)));
        }
        let r = ints(r, 4)?;
        Ok(Added::No {
            index: usize::try_from(r[1]).map_err(|_| QuotaError::Protocol(format!("{r:?}")))?,
            used: u64::try_from(r[2]).unwrap_or(0),
            fits_at_ms: r[3],
        })
    }

    async fn release(&self, held: &[Held]) -> Result<(), QuotaError> {
        if held.is_empty() {
            return Ok(());
        }
        let mut inv = self.release.prepare_invoke();
        for h in held {
            inv.key(self.key(&h.key))
                .arg(h.bucket.map(|b| b.to_string()).unwrap_or_default())
                .arg(h.amount);
        }
        let mut conn = self.conn.clone();
        let _: i64 = inv.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn read(&self, counters: &[Counter], now_ms: i64) -> Result<Vec<Reading>, QuotaError> {
        if counters.is_empty() {
            return Ok(vec![]);
        }
        let mut inv = self.read.prepare_invoke();
        inv.arg(now_ms);
        for c in counters {
            inv.key(self.key(&c.key));
            match c.window {
                CounterWindow::Rolling(r) => inv.arg(1).arg(r.bucket_ms).arg(r.span),
                CounterWindow::Calendar { .. } => inv.arg(2).arg(0).arg(0),
            };
        }
        let mut conn = self.conn.clone();
        let r = ints(inv.invoke_async(&mut conn).await?, counters.len() * 2)?;
        Ok(counters
            .iter()
            .enumerate()
            .map(|(i, c)| Reading {
                used: u64::try_from(r[2 * i]).unwrap_or(0),
                resets_at_ms: resets_at(c, (r[2 * i + 1] >= 0).then_some(r[2 * i + 1]), now_ms),
            })
            .collect())
    }
}

/// Merges reservations of the same counter bucket (a transaction adds one recipient at a time).
pub fn merge_held(into: &mut Vec<Held>, more: Vec<Held>) {
    for h in more {
        match into.iter_mut().find(|x| x.key == h.key && x.bucket == h.bucket) {
            Some(x) => x.amount += h.amount,
            None => into.push(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(key: &str, max: u64) -> Counter {
        Counter {
            key: key.into(),
            max,
            window: CounterWindow::Rolling(Rolling::at(1_000, 61, 0)),
        }
    }

    fn month(key: &str, max: u64, ends_ms: i64) -> Counter {
        Counter {
            key: key.into(),
            max,
            window: CounterWindow::Calendar {
                ends_ms,
                expire_at_ms: ends_ms + 3_600_000,
            },
        }
    }

    #[tokio::test]
    async fn memory_all_or_nothing_and_latest_reset_named() {
        let s = MemoryQuotaStore::new();
        let cs = [minute("m", 3), month("mo", 4, 1_000_000)];
        for t in 0..3 {
            assert!(matches!(s.try_add(&cs, 1, t * 10_000).await.unwrap(), Added::Yes(_)));
        }
        // Minute full (3), month has room: the minute frees at (0 + 61) s.
        assert_eq!(
            s.try_add(&cs, 1, 30_000).await.unwrap(),
            Added::No {
                index: 0,
                used: 3,
                fits_at_ms: 61_000
            }
        );
        // Nothing moved.
        let r = s.read(&cs, 30_000).await.unwrap();
        assert_eq!((r[0].used, r[1].used), (3, 3));
        assert_eq!(r[0].resets_at_ms, 61_000);
        assert_eq!(r[1].resets_at_ms, 1_000_000);
        // After the first unit leaves the minute, one more fits; then the month is full and it
        // frees later than the minute, so it is the one named.
        let Added::Yes(held) = s.try_add(&cs, 1, 61_000).await.unwrap() else {
            panic!()
        };
        assert_eq!(held[0].bucket, Some(61));
        assert_eq!(held[1].bucket, None);
        assert_eq!(
            s.try_add(&cs, 1, 200_000).await.unwrap(),
            Added::No {
                index: 1,
                used: 4,
                fits_at_ms: 1_000_000
            }
        );
        // Giving the reservation back makes room again.
        s.release(&held).await.unwrap();
        assert!(matches!(s.try_add(&cs, 1, 200_000).await.unwrap(), Added::Yes(_)));
        // Past the end of the window (and its slack) the calendar counter is gone.
        let r = s.read(&cs, 1_000_000 + 3_600_000).await.unwrap();
        assert_eq!(r[1].used, 0);
    }

    #[test]
    fn merging_reservations() {
        let mut v = vec![];
        let h = |b| Held {
            key: "k".into(),
            bucket: b,
            amount: 1,
        };
        merge_held(&mut v, vec![h(Some(1)), h(None)]);
        merge_held(&mut v, vec![h(Some(1)), h(None), h(Some(2))]);
        assert_eq!(v.iter().map(|h| h.amount).collect::<Vec<_>>(), [2, 2, 1]);
    }
}
