//! Redis delivery log store: one Redis Stream `<prefix>dlog` whose entry ids
//! are the record ids (`<event ms>-<seq>`), so the stream is its own time
//! index: `XRANGE` pages by time and cursor, `XTRIM MINID` trims by age.
//! Each entry has one field `e`, the event JSON as stored (`super::stored_json`: without empty
//! fields; records of earlier relays have them all). Needs Redis 7.0+ (`<ms>-*`
//! ids). Keys carry the prefix's hash tag, so this works on Redis Cluster.
//!
//! This module only moves records in and out of Redis; paging and filtering
//! are in the parent module. The queue's commit script (`crate::queue::redis`) also appends a
//! message's `received`/`scheduled` records, with the same id rule and field as `APPEND`.

use async_trait::async_trait;
use redis::aio::ConnectionLike;

use super::{DlogError, EventStore, RecordId, Start};

/// Appends with the event time as the id's milliseconds; if the stream
/// already holds a later id (an out-of-order event), files the record at the
/// stream's newest time instead (see `next_record_id`).
const APPEND: &str = r#"
local ok = redis.pcall('XADD', KEYS[1], ARGV[1] .. '-*', 'e', ARGV[2])
if type(ok) == 'table' and ok.err then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local last = nil
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
  if not last then return redis.error_reply(ok.err) end
  local ms = string.match(last, '^(%d+)%-')
  return redis.call('XADD', KEYS[1], ms .. '-*', 'e', ARGV[2])
end
return ok
"#;

/// The stream of the log under `prefix`, e.g. prefix `{mailroute}:` gives `{mailroute}:dlog`
/// (the Redis queue's commit appends to it too).
pub fn stream_key(prefix: &str) -> String {
    format!("{prefix}dlog")
}

/// The field holding the event JSON.
const FIELD: &str = "e";

/// A delivery log in one Redis Stream.
pub struct RedisStore<C> {
    conn: C,
    key: String,
    append: redis::Script,
}

impl<C> RedisStore<C> {
    /// The stream `<prefix>dlog`, e.g. prefix `{mailroute}:` gives `{mailroute}:dlog`.
    pub fn new(conn: C, prefix: &str) -> Self {
        RedisStore {
            conn,
            key: stream_key(prefix),
            append: redis::Script::new(APPEND),
        }
    }
}

fn parse_id(s: &str) -> Result<RecordId, DlogError> {
    s.parse()
        .map_err(|e: String| DlogError::Store(format!("stream entry id: {e}")))
}

#[async_trait]
impl<C> EventStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn append(&self, time_ms: u64, json: String) -> Result<RecordId, DlogError> {
        let mut conn = self.conn.clone();
        let id: String = self
            .append
            .key(&self.key)
            .arg(time_ms)
            .arg(json)
            .invoke_async(&mut conn)
            .await?;
        parse_id(&id)
    }

    async fn append_batch(&self, records: Vec<(u64, String)>) -> Result<Vec<RecordId>, DlogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let mut p = redis::pipe();
        for (time_ms, json) in &records {
            p.cmd("EVALSHA")
                .arg(self.append.get_hash())
                .arg(1)
                .arg(&self.key)
                .arg(*time_ms)
                .arg(json);
        }
        let ids: Vec<String> = match p.query_async(&mut conn).await {
            // Every entry failed alike (the script is not loaded yet): load it once and resend.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.append.prepare_invoke().load_async(&mut conn).await?;
                p.query_async(&mut conn).await?
            }
            r => r?,
        };
        ids.iter().map(|id| parse_id(id)).collect()
    }

    async fn range(
        &self,
        start: Start,
        end_ms: Option<u64>,
        count: usize,
    ) -> Result<Vec<(RecordId, String)>, DlogError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let start = match start {
            Start::At(id) => id.to_string(),
            Start::After(id) => format!("({id}"),
        };
        let end = match end_ms {
            Some(ms) => format!("({ms}-0"),
            None => "+".to_string(),
        };
        // An exclusive end of `0-0` is an error in Redis; nothing is below it anyway.
        if end == "(0-0" {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        entries
            .into_iter()
            .map(|(id, fields)| {
                let json = fields
                    .chunks_exact(2)
                    .find(|kv| kv[0] == FIELD)
                    .map(|kv| kv[1].clone())
                    .unwrap_or_default();
                Ok((parse_id(&id)?, json))
            })
            .collect()
    }

    async fn trim_before(&self, min_ms: u64) -> Result<u64, DlogError> {
        let mut conn = self.conn.clone();
        let n: u64 = redis::cmd("XTRIM")
            .arg(&self.key)
            .arg("MINID")
            .arg(format!("{min_ms}-0"))
            .query_async(&mut conn)
            .await?;
        Ok(n)
    }
}
