//! The fan-out: reads the delivery-log stream `<prefix>dlog` through the consumer group
//! `webhooks` and copies each record into the outbox stream of every webhook that wants it (its
//! namespace's mail, its events, its senders), in one script per batch that also XACKs the
//! records: a record is either in every outbox it belongs to and acknowledged, or in none and
//! still pending. One relay fans out at a time (a lease, checked inside the script), so the
//! outboxes keep the log's order; a new holder first takes over the records its predecessor
//! read and did not finish (XAUTOCLAIM), then reads new ones. It never talks to endpoints.

use std::collections::HashMap;
use std::time::Duration;

use mailroute_api::config::CompiledWebhook;
use redis::Value;
use serde::Deserialize;

use super::Keys;
use super::lease::Lease;
use crate::redis_client::RedisConn;

/// The consumer group on the delivery-log stream.
pub const GROUP: &str = "webhooks";
/// Records read per round trip.
const BATCH: usize = 200;

/// Copies one batch into the outboxes and acknowledges it, if the caller holds the lease.
/// KEYS: lease, dlog, then per webhook its outbox and health hash. ARGV: token, group, webhook
/// count n, n backlog limits, then per record: id, JSON, k, k webhook numbers (1-based).
/// An outbox at its limit drops its oldest entry, counted in the health hash (`dropped_backlog`).
const FAN_OUT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTHOLDER the webhook fan-out lease was lost')
end
local n = tonumber(ARGV[3])
local i = 4 + n
local acked = 0
while i <= #ARGV do
  local id, json, k = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  for j = 1, k do
    local t = tonumber(ARGV[i])
    i = i + 1
    local outbox, health, limit = KEYS[1 + 2 * t], KEYS[2 + 2 * t], tonumber(ARGV[3 + t])
    if redis.call('XLEN', outbox) >= limit then
      local cut = redis.call('XTRIM', outbox, 'MAXLEN', limit - 1)
      redis.call('HINCRBY', health, 'dropped_backlog', cut)
    end
    redis.call('XADD', outbox, '*', 'd', id, 'e', json)
  end
  acked = acked + redis.call('XACK', KEYS[2], ARGV[2], id)
end
return acked
"#;

/// Removes the outbox and health hash of webhooks no relay holding the fan-out has had in its
/// configuration for a while. KEYS: the `known` hash (webhook id -> when a holder last had it
/// configured, ms), then per candidate its outbox and health hash. ARGV: now ms, the grace in
/// ms, the candidates' ids. Each is checked again here, so one configured meanwhile stays.
const FORGET: &str = r"
local n = 0
for i = 1, #ARGV - 2 do
  local id = ARGV[2 + i]
  local seen = tonumber(redis.call('HGET', KEYS[1], id) or '')
  if seen and tonumber(ARGV[1]) - seen >= tonumber(ARGV[2]) then
    redis.call('DEL', KEYS[2 * i], KEYS[2 * i + 1])
    redis.call('HDEL', KEYS[1], id)
    n = n + 1
  end
end
return n
";

/// The webhooks of `known` (id -> last seen configured, ms) that are not `configured` and were
/// last seen at least `after_ms` before `now_ms`; an unreadable time counts as long ago.
pub fn stale<'a>(
    known: &'a HashMap<String, String>,
    configured: &[String],
    now_ms: i64,
    after_ms: i64,
) -> Vec<&'a str> {
    let mut out: Vec<&str> = known
        .iter()
        .filter(|(id, _)| !configured.contains(id))
        .filter(|(_, seen)| seen.parse::<i64>().map_or(true, |t| now_ms - t >= after_ms))
        .map(|(id, _)| id.as_str())
        .collect();
    out.sort_unstable();
    out
}

/// The fields of a record the fan-out decides on; unknown results (added to the log later) are
/// just names here.
#[derive(Deserialize)]
struct Head {
    result: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    envelope_from: String,
    #[serde(default)]
    auth_user: Option<String>,
}

/// Indexes of the webhooks that want the record `json` (none for an unreadable record).
pub fn targets(json: &str, webhooks: &[CompiledWebhook]) -> Vec<usize> {
    let Ok(h) = serde_json::from_str::<Head>(json) else {
        return Vec::new();
    };
    webhooks
        .iter()
        .enumerate()
        .filter(|(_, w)| {
            w.wants(
                &h.result,
                h.namespace.as_deref(),
                &h.envelope_from,
                h.auth_user.as_deref(),
            )
        })
        .map(|(i, _)| i)
        .collect()
}

pub(crate) struct FanOut {
    pub conn: RedisConn,
    pub keys: Keys,
    pub consumer: String,
    pub lease: Lease,
    pub script: redis::Script,
    forget: redis::Script,
}

impl FanOut {
    pub(crate) fn new(conn: RedisConn, keys: Keys, consumer: String, lease_ttl: Duration) -> Self {
        let lease = Lease::new(keys.fanout_lease(), consumer.clone(), lease_ttl);
        FanOut {
            conn,
            keys,
            consumer,
            lease,
            script: redis::Script::new(FAN_OUT),
            forget: redis::Script::new(FORGET),
        }
    }

    /// Notes `configured` as configured now and removes the outboxes and health hashes of the
    /// webhooks no holder has had configured for `after` (a deleted DeliveryWebhook; the grace
    /// covers relays that still run an older configuration). Returns how many went.
    pub(crate) async fn forget_removed(
        &self,
        configured: &[String],
        now_ms: i64,
        after: Duration,
    ) -> redis::RedisResult<usize> {
        let known_key = self.keys.known();
        let mut c = self.conn.clone();
        let mut p = redis::pipe();
        if !configured.is_empty() {
            let h = p.cmd("HSET").arg(&known_key);
            for id in configured {
                h.arg(id).arg(now_ms);
            }
            h.ignore();
        }
        p.cmd("HGETALL").arg(&known_key);
        let (known,): (HashMap<String, String>,) = p.query_async(&mut c).await?;
        let after_ms = after.as_millis() as i64;
        let gone = stale(&known, configured, now_ms, after_ms);
        if gone.is_empty() {
            return Ok(0);
        }
        let mut inv = self.forget.key(&known_key);
        for id in &gone {
            inv.key(self.keys.outbox(id)).key(self.keys.health(id));
        }
        inv.arg(now_ms).arg(after_ms);
        for id in &gone {
            inv.arg(*id);
        }
        let n: i64 = inv.invoke_async(&mut c).await?;
        Ok(n.max(0) as usize)
    }

    /// Creates the group at the stream's end (and the stream) unless it exists.
    pub(crate) async fn ensure_group(&self) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.dlog())
            .arg(GROUP)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            r => r,
        }
    }

    /// With no webhook configured, moves the group to the stream's end: a webhook created
    /// later starts with the events after it.
    pub(crate) async fn skip_all(&self) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        redis::cmd("XGROUP")
            .arg("SETID")
            .arg(self.keys.dlog())
            .arg(GROUP)
            .arg("$")
            .query_async(&mut c)
            .await
    }

    /// Records read by earlier holders and not finished, oldest first (taken over by us).
    pub(crate) async fn claim_pending(&self) -> redis::RedisResult<Vec<(String, String)>> {
        let mut c = self.conn.clone();
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(self.keys.dlog())
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(0)
            .arg("0-0")
            .arg("COUNT")
            .arg(BATCH)
            .query_async(&mut c)
            .await?;
        let Value::Array(parts) = v else {
            return Ok(Vec::new());
        };
        Ok(parts.get(1).map(entries).unwrap_or_default())
    }

    /// New records, without blocking (the connection is shared).
    pub(crate) async fn read_new(&self) -> redis::RedisResult<Vec<(String, String)>> {
        let mut c = self.conn.clone();
        let v: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(BATCH)
            .arg("STREAMS")
            .arg(self.keys.dlog())
            .arg(">")
            .query_async(&mut c)
            .await?;
        let list = match &v {
            Value::Array(streams) => streams.first().and_then(|s| match s {
                Value::Array(kv) => kv.get(1).cloned(),
                _ => None,
            }),
            Value::Map(m) => m.first().map(|(_, e)| e.clone()),
            _ => None,
        };
        Ok(list.as_ref().map(entries).unwrap_or_default())
    }

    /// Copies `records` to the outboxes of `webhooks` and acknowledges them, atomically.
    pub(crate) async fn deliver(
        &self,
        records: &[(String, String)],
        webhooks: &[CompiledWebhook],
    ) -> redis::RedisResult<usize> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut inv = self.script.key(self.lease.key());
        inv.key(self.keys.dlog());
        for w in webhooks {
            inv.key(self.keys.outbox(&w.id)).key(self.keys.health(&w.id));
        }
        inv.arg(self.lease.token()).arg(GROUP).arg(webhooks.len());
        for w in webhooks {
            inv.arg(w.max_backlog.max(1));
        }
        for (id, json) in records {
            let t = targets(json, webhooks);
            inv.arg(id).arg(json).arg(t.len());
            for i in t {
                inv.arg(i + 1);
            }
        }
        let mut c = self.conn.clone();
        let n: i64 = inv.invoke_async(&mut c).await?;
        Ok(n.max(0) as usize)
    }
}

/// `[[id, [field, value, …]], …]` as (id, field `e`) pairs; deleted entries are skipped.
pub(crate) fn entries(v: &Value) -> Vec<(String, String)> {
    fields_of(v)
        .into_iter()
        .map(|(id, mut f)| (id, f.remove("e").unwrap_or_default()))
        .collect()
}

impl FanOut {
    /// Removes the group's consumers other than this one that hold no pending record (relays
    /// that held the lease before): only the holder reads, so they are left-overs.
    pub(crate) async fn prune_consumers(&self) -> redis::RedisResult<usize> {
        let mut c = self.conn.clone();
        let v: Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(self.keys.dlog())
            .arg(GROUP)
            .query_async(&mut c)
            .await?;
        let Value::Array(list) = v else { return Ok(0) };
        let mut removed = 0;
        for consumer in list {
            let fields: HashMap<String, Value> = match consumer {
                Value::Array(kv) => kv
                    .chunks_exact(2)
                    .filter_map(|p| Some((text(&p[0])?, p[1].clone())))
                    .collect(),
                Value::Map(m) => m.into_iter().filter_map(|(k, v)| Some((text(&k)?, v))).collect(),
                _ => continue,
            };
            let name = fields.get("name").and_then(text);
            let idle_pending = matches!(fields.get("pending"), Some(Value::Int(0)));
            if let Some(name) = name
                && idle_pending
                && name != self.consumer
            {
                let _: i64 = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(self.keys.dlog())
                    .arg(GROUP)
                    .arg(&name)
                    .query_async(&mut c)
                    .await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// `[[id, [field, value, …]], …]` as (id, fields).
pub(crate) fn fields_of(v: &Value) -> Vec<(String, HashMap<String, String>)> {
    let Value::Array(list) = v else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| {
            let Value::Array(pair) = e else { return None };
            let id = text(pair.first()?)?;
            let mut fields = HashMap::new();
            if let Some(Value::Array(kv)) = pair.get(1) {
                for c in kv.chunks_exact(2) {
                    if let (Some(k), Some(v)) = (text(&c[0]), text(&c[1])) {
                        fields.insert(k, v);
                    }
                }
            }
            Some((id, fields))
        })
        .collect()
}

pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_webhooks_are_the_unconfigured_ones_past_the_grace() {
        let known: HashMap<String, String> = [
            ("a/hook", "1000"),
            ("b/hook", "9500"),
            ("c/hook", "2000"),
            ("d/hook", "junk"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let configured = vec!["c/hook".to_string()];
        // a: deleted 9 s ago; b: 0.5 s ago (within the grace); c: still configured; d: unreadable.
        assert_eq!(stale(&known, &configured, 10_000, 1000), ["a/hook", "d/hook"]);
        assert_eq!(stale(&known, &configured, 10_000, 60_000), ["d/hook"]);
    }
    use mailroute_api::config::CompiledSenderMatch;

    fn hook(id: &str, ns: &str, events: &[&str]) -> CompiledWebhook {
        CompiledWebhook {
            id: id.into(),
            namespace: ns.into(),
            url: "https://h.example/".into(),
            events: events.iter().map(|e| e.to_string()).collect(),
            senders: CompiledSenderMatch::default(),
            custom_ca: false,
            max_batch: 10,
            timeout_ms: 1000,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            max_age_secs: 60,
            max_backlog: 10,
        }
    }

    #[test]
    fn a_record_goes_to_the_webhooks_of_its_namespace_that_want_its_event() {
        let hooks = [
            hook("team-a/all", "team-a", &["received", "delivered", "suppressed"]),
            hook("team-a/bounces", "team-a", &["bounced"]),
            hook("team-b/all", "team-b", &["received", "delivered"]),
        ];
        let ev = |result: &str, ns: &str| {
            format!(
                r#"{{"result":"{result}","namespace":{ns},"envelope_from":"a@b.example","auth_user":null,"recipient":"x@y"}}"#
            )
        };
        assert_eq!(targets(&ev("delivered", "\"team-a\""), &hooks), [0]);
        assert_eq!(targets(&ev("bounced", "\"team-a\""), &hooks), [1]);
        assert_eq!(targets(&ev("received", "\"team-b\""), &hooks), [2]);
        assert!(
            targets(&ev("delivered", "null"), &hooks).is_empty(),
            "unattributed mail"
        );
        assert!(targets(&ev("scheduled", "\"team-a\""), &hooks).is_empty());
        // A result the log learns later (another feature's) is matched by name.
        assert_eq!(targets(&ev("suppressed", "\"team-a\""), &hooks), [0]);
        assert!(targets("not json", &hooks).is_empty());
    }
}
