//! Redis implementation of the queue: one hash per message (meta, body stored once, pending
//! recipient count, per-recipient state; `meta` and `body` in the compact record of
//! [`super::record`], which also reads the JSON record of earlier relays; relays of that era
//! retry a compact record rather than lose it, see there), a stream `ready` read by the consumer group `relays`
//! (each relay process one consumer), a sorted set `sched` of jobs by due time, and a counter of
//! stored messages. Every key shares one hash tag (`{mailroute}` by default) so the scripts run
//! on Redis Cluster too. State transitions that touch several keys are one MULTI/EXEC or one
//! Lua script, so a crash of a relay between two commands cannot lose or duplicate a job.
//!
//! An enqueue is two steps, so that a message answered with anything but 250 is never
//! delivered: the message is first stored *staged* (its record only, listed in the sorted set
//! `staged`, no job anywhere a worker looks), then, once Redis (and with `--wait-replicas`, the
//! replicas) acknowledged it, one script *commits* it (its jobs into `ready`/`sched`), and the
//! commit is waited for on the replicas too. Without `--wait-replicas` there is nothing to wait
//! for between the steps, so both go in one MULTI/EXEC (one round trip, and with `appendfsync
//! always` one fsync per message): it applies whole or not at all, so a lost reply leaves what a
//! lost commit reply leaves, and the commit's retry settles it. A failed step deletes the message again; a staged
//! message whose relay died or lost Redis before the commit stays inert and is purged by
//! [`Queue::purge_uncommitted`]. What remains, and the protocol cannot avoid: a commit that
//! Redis applied but whose answer never arrived (Redis crashed in that instant) is retried
//! for [`COMMIT_SETTLE`]; if Redis is still unreachable the client gets 451 while the message
//! may be delivered (a duplicate if the client sends it again), and with replicas, a commit
//! whose replication fails after the stage's succeeded is answered 451 although a worker may
//! already have taken the job in the milliseconds between.
//!
//! The commit script is also the suppression list's backstop (`crate::suppress`): it reads the
//! lists' generation counters (same hash tag) and leaves out the jobs of recipients listed
//! since the relay's in-memory copy was read.
//! Where the delivery log is the Redis store under the same prefix ([`RedisQueue::storing_log`]),
//! the commit script also appends the message's `received`/`scheduled` records to the log's
//! stream (`crate::observe::dlog::redis`'s id rule and field), so they are stored in the step
//! that makes the jobs visible and precede every record a worker writes for them. A commit
//! answered 451 afterwards (replicas missing, reply lost past the settle time) leaves its
//! `received` in the log, as it may leave its jobs delivered. The complete script stores a job
//! outcome's records the same way ([`Queue::complete_logged`]), only when the lease was still
//! there, so a retried complete stores nothing twice.
//! A worker's fetch is one script (`FETCH`: XREADGROUP and each job's message record), so a busy
//! relay has one round trip per batch; once a fetch took all there was, the next one sends a
//! blocking `XREAD` for a newer entry and the script in one write, so an idle relay waits in
//! Redis and wakes at once on new work.
//! Bulk queue control adds a sorted set `held` (jobs a hold applies to, by the time the hold
//! lapses for them; promoted like the schedule when that time comes), a hash `holds` (the holds,
//! one JSON record per rule and namespace scope) and the script `BULK`, which applies one batch
//! of moves found by [`Queue::scan`] atomically, each only if its job is still where it was.

use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, Value};
use tokio::sync::Mutex;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{
    BulkOp, CancelOutcome, Completed, Disposition, Fetched, Leased, MessageView, Place, Queue, QueueError, QueueStats,
    QueuedJob, Result, ScanCursor, Stored,
};
use crate::control::rules::Hold;
use crate::queue::message::{Job, MessageMeta, RecipientState};
use crate::redis_client::{RedisConn, Target, Timeouts};

pub const GROUP: &str = "relays";
pub const DEFAULT_PREFIX: &str = "{mailroute}:";

/// How long an enqueue keeps retrying a commit whose answer was lost before it answers 451.
pub const COMMIT_SETTLE: Duration = Duration::from_secs(10);

/// Field of a message record that is present while the message is staged (not deliverable).
const STAGED: &str = "staged";

/// How many acknowledgements an enqueue waits for beyond the primary's own.
#[derive(Clone, Copy, Debug, Default)]
pub struct Durability {
    /// `WAIT n timeout`: replicas that must have the write before we answer 250.
    pub replicas: u32,
    pub timeout: Duration,
}

pub struct RedisQueue {
    conn: RedisConn,
    /// Blocking reads hold their connection; they get their own so they never delay enqueues.
    block_conn: Mutex<BlockConn>,
    keys: Keys,
    durability: Durability,
    complete: Script,
    promote: Script,
    renew: Script,
    release: Script,
    cancel: Script,
    commit: Script,
    drop_msg: Script,
    prune: Script,
    bulk: Script,
    fetch: Script,
    /// The commit stores the session's log records (the delivery log is the Redis store).
    stores_log: bool,
    /// The record form enqueues write (`super::record`).
    record_form: super::record::Form,
}

/// The fetch's connection, and where the last fetch left the ready stream.
struct BlockConn {
    conn: RedisConn,
    /// The stream's last id when the last fetch took all there was: the next one waits for a
    /// newer entry before taking. None: there may be more to take at once.
    drained_at: Option<String>,
}

#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
    ready: String,
    sched: String,
    count: String,
    staged: String,
    suppress_gens: String,
    held: String,
    holds: String,
    dlog: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            ready: format!("{prefix}ready"),
            sched: format!("{prefix}sched"),
            count: format!("{prefix}messages"),
            staged: format!("{prefix}staged"),
            suppress_gens: crate::suppress::gens_key(prefix),
            held: format!("{prefix}held"),
            holds: format!("{prefix}holds"),
            dlog: crate::observe::dlog::redis::stream_key(prefix),
        }
    }
    fn msg(&self, id: &str) -> String {
        format!("{}msg:{id}", self.prefix)
    }
}

// KEYS: ready, sched, msg, count, held, holds, the delivery log stream. ARGV: group, lease,
// mode (r reschedule, h hold, f final), recipient field, its state, due ms, job, hold key, the
// job as leased, number of log records R, R pairs (event ms, record JSON).
// The log records are stored only when the lease was still there (the same guard as the rest:
// a complete retried after a lost reply writes nothing twice), with the dlog store's id rule
// (`<event ms>-*`, or the stream's newest ms when it holds a later id); a failed append never
// fails the complete. Reply: 0 the lease was gone, 1 applied, 2 hold gone (back to ready).
const COMPLETE: &str = r"
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
for r = 1, tonumber(ARGV[10] or '0') do
  local at = 9 + 2 * r
  local ok = redis.pcall('XADD', KEYS[7], ARGV[at] .. '-*', 'e', ARGV[at + 1])
  if type(ok) == 'table' and ok.err then
    local info = redis.pcall('XINFO', 'STREAM', KEYS[7])
    local last = nil
    if type(info) == 'table' and not info.err then
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then last = info[i + 1] end
      end
    end
    local ms = last and string.match(last, '^(%d+)%-')
    if ms then redis.pcall('XADD', KEYS[7], ms .. '-*', 'e', ARGV[at + 1]) end
  end
end
if redis.call('EXISTS', KEYS[3]) == 0 then return 1 end
redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
if ARGV[3] == 'r' then
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[7])
elseif ARGV[3] == 'h' then
  -- Held only while its hold exists: one released meanwhile leaves nothing stranded (the
  -- job goes back to the ready stream as it was, ARGV[9]).
  if redis.call('HEXISTS', KEYS[6], ARGV[8]) == 1 then
    redis.call('ZADD', KEYS[5], ARGV[6], ARGV[7])
  else
    redis.call('XADD', KEYS[1], '*', 'j', ARGV[9])
    return 2
  end
else
  local left = redis.call('HINCRBY', KEYS[3], 'pending', -1)
  if left <= 0 then
    redis.call('DEL', KEYS[3])
    redis.call('DECR', KEYS[4])
  end
end
return 1
";

// KEYS: ready. ARGV: group, consumer, count, the message keys' prefix (`<prefix>msg:`).
// XREADGROUP without BLOCK (a script cannot block), then each job's message record as the
// load reads it (HMGET meta body cancelled). The job's message id is its JSON's `m` (as CANCEL
// reads it); an entry whose job does not decode comes without its record (the worker loads it
// or skips it). Reply: {-1} no group; else {drained, id, fields, record, ...}, where drained is
// the stream's last generated id when fewer than `count` entries were there (nothing more to
// take until a newer entry comes), else false.
const FETCH: &str = r"
local r = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if type(r) == 'table' and r.err then
  if string.find(r.err, 'NOGROUP', 1, true) then return {-1} end
  return redis.error_reply(r.err)
end
local entries = {}
if r then entries = r[1][2] end
local out = {false}
for _, e in ipairs(entries) do
  local f = e[2]
  local rec = false
  if f[1] == 'j' and f[2] then
    local ok, j = pcall(cjson.decode, f[2])
    if ok and type(j) == 'table' and type(j['m']) == 'string' then
      rec = redis.call('HMGET', ARGV[4] .. j['m'], 'meta', 'body', 'cancelled')
    end
  end
  out[#out + 1] = e[1]
  out[#out + 1] = f
  out[#out + 1] = rec
end
if #entries < tonumber(ARGV[3]) then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then out[1] = info[i + 1] end
  end
end
return out
";

// KEYS: sched, ready, held. Held jobs come back when their hold lapses for them: the worker
// looks again (a hold may still apply) and then attempts them.
const PROMOTE: &str = r"
local n = 0
for _, set in ipairs({KEYS[1], KEYS[3]}) do
  local due = redis.call('ZRANGEBYSCORE', set, '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
  for _, j in ipairs(due) do
    redis.call('XADD', KEYS[2], '*', 'j', j)
    redis.call('ZREM', set, j)
  end
  n = n + #due
end
return n
";

// Bulk queue control: KEYS ready, sched, held, count, then one message key per op. ARGV[1] is
// the group, then five per op: op (c cancel, r to ready, h to held), where (x stream entry, s
// schedule, h held set), the entry id or member, the new member (c: the recipient state), and a
// number (h: due ms, c: the recipient index). An op applies only if its job is still there and,
// in the stream, not leased. Reply: 1 or 0 per op.
const BULK: &str = r"
local out = {}
local n = (#ARGV - 1) / 5
for i = 0, n - 1 do
  local b = 1 + i * 5
  local op, at, ref, new, num = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  local msg = KEYS[5 + i]
  local took = 0
  if at == 'x' then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], ref, ref, 1)
    if #p == 0 then took = redis.call('XDEL', KEYS[1], ref) end
  elseif at == 's' then
    took = redis.call('ZREM', KEYS[2], ref)
  else
    took = redis.call('ZREM', KEYS[3], ref)
  end
  if took == 1 then
    if op == 'c' then
      if redis.call('EXISTS', msg) == 1 then
        redis.call('HSET', msg, 'r:' .. num, new)
        local left = redis.call('HINCRBY', msg, 'pending', -1)
        if left <= 0 then
          redis.call('DEL', msg)
          redis.call('DECR', KEYS[4])
        end
      end
    elseif op == 'r' then
      redis.call('XADD', KEYS[1], '*', 'j', new)
    else
      redis.call('ZADD', KEYS[3], num, new)
    end
  end
  out[i + 1] = took
end
return out
";

// Cancels a message: marks it, removes its scheduled jobs and its ready jobs no consumer holds
// (found by the job's message-id prefix: a scan of the schedule and the ready stream, so it costs
// O(queue length), for a rare admin action), and makes those recipients final. Jobs a consumer
// holds are left to it and returned as in flight. Reply: {status, cancelled now, in flight},
// status 0 = no such message, 1 = cancelled, 2 = already cancelled.
const CANCEL: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, {}, {}} end
if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then return {2, {}, {}} end
redis.call('HSET', KEYS[1], 'cancelled', '1')
local now, held = {}, {}
for _, set in ipairs({KEYS[2], KEYS[5]}) do
  local cursor = '0'
  repeat
    local r = redis.call('ZSCAN', set, cursor, 'MATCH', ARGV[2], 'COUNT', 1000)
    cursor = r[1]
    for i = 1, #r[2], 2 do
      local m = r[2][i]
      if string.sub(m, 1, #ARGV[3]) == ARGV[3] and redis.call('ZREM', set, m) == 1 then
        table.insert(now, cjson.decode(m)['r'])
      end
    end
  until cursor == '0'
end
local start = '-'
while true do
  local entries = redis.call('XRANGE', KEYS[3], start, '+', 'COUNT', 1000)
  for _, e in ipairs(entries) do
    local id, f = e[1], e[2]
    local j = f[2]
    if f[1] == 'j' and j and string.sub(j, 1, #ARGV[3]) == ARGV[3] then
      local p = redis.call('XPENDING', KEYS[3], ARGV[1], id, id, 1)
      if #p > 0 then
        table.insert(held, cjson.decode(j)['r'])
      else
        redis.call('XDEL', KEYS[3], id)
        table.insert(now, cjson.decode(j)['r'])
      end
    end
  end
  if #entries < 1000 then break end
  start = '(' .. entries[#entries][1]
end
for _, i in ipairs(now) do
  local field = 'r:' .. i
  local st = {status = 'cancelled', attempts = 0}
  local old = redis.call('HGET', KEYS[1], field)
  if old then
    local o = cjson.decode(old)
    if type(o.attempts) == 'number' then st.attempts = o.attempts end
  end
  redis.call('HSET', KEYS[1], field, cjson.encode(st))
end
if #now > 0 then
  local left = redis.call('HINCRBY', KEYS[1], 'pending', -#now)
  if left <= 0 then
    redis.call('DEL', KEYS[1])
    redis.call('DECR', KEYS[4])
  end
end
return {1, now, held}
";

// XCLAIM with min-idle 0 resets the entry's idle time; JUSTID leaves its delivery count alone.
// Only entries still pending for this consumer are touched.
const RENEW: &str = r"
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
";

// Like RENEW, but sets the entry's idle time to ARGV[3] ms, as if leased that long ago: the next
// XAUTOCLAIM with that min-idle by any relay takes it over. JUSTID: no delivery count added.
const RELEASE: &str = r"
local n = 0
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    n = n + 1
  end
end
return n
";

// KEYS: msg, staged, ready, sched, count, suppression generations, one suppression list per
// scope, then the delivery log stream. ARGV: id, now ms, number of scopes S, force ('1': check
// the lists whatever the generations say), S pairs (scope id, generation the relay's copy
// holds), number of log records R, R pairs (event ms, record JSON), then per job (job, due ms or
// '' for ready now, recipient key or '', recipient index).
// The suppression backstop: when a generation differs from the copy's (an entry written since
// the relay read it) or the copy hit, the recipients are looked up (one HMGET per scope, for the
// whole message); an active entry's job is not queued and its recipient made final. Otherwise it
// costs one HMGET of the generations per message and nothing per recipient.
// The log records are appended last, with the dlog store's id rule (`<event ms>-*`, or the
// stream's newest ms when it holds a later id); a failed append never fails the commit. They
// are behind the same guard as the jobs: a retried commit that finds the message committed
// writes nothing.
// Reply: {0} the record is gone (aborted or purged); {1, idx, scope id, ...} deliverable (now or
// already), with the recipients found suppressed now.
const COMMIT: &str = r"
local rec = redis.call('HMGET', KEYS[1], 'pending', 'staged')
if not rec[1] then return {0} end
if not rec[2] then return {1} end
-- Every read (and whatever could fail) before the first write: a script that fails half-way
-- keeps its writes, and a retry would find the message committed without its jobs.
local ns = tonumber(ARGV[3])
local nr = tonumber(ARGV[5 + 2 * ns])
local first = 6 + 2 * ns + 2 * nr
local out = {1}
local skip = {}
if ns > 0 then
  local check = ARGV[4] == '1'
  if not check then
    local f = {}
    for s = 1, ns do f[s] = ARGV[3 + 2 * s] end
    local g = redis.call('HMGET', KEYS[6], unpack(f))
    for s = 1, ns do
      if (g[s] or '') ~= ARGV[4 + 2 * s] then check = true end
    end
  end
  if check then
    local addrs, at = {}, {}
    for i = first, #ARGV, 4 do
      if ARGV[i + 2] ~= '' then
        addrs[#addrs + 1] = ARGV[i + 2]
        at[#addrs] = i
      end
    end
    if #addrs > 0 then
      local now = tonumber(ARGV[2])
      for s = 1, ns do
        -- In slices: unpack() of thousands of arguments overflows Lua's stack.
        for c = 1, #addrs, 1000 do
          local part = {}
          for j = c, math.min(c + 999, #addrs) do part[#part + 1] = addrs[j] end
          local v = redis.call('HMGET', KEYS[6 + s], unpack(part))
          for p = 1, #part do
            local i = at[c + p - 1]
            if v[p] and not skip[i] then
              local ok, e = pcall(cjson.decode, v[p])
              local exp = ok and type(e) == 'table' and e['expires_ms']
              if not (type(exp) == 'number' and exp <= now) then
                skip[i] = true
                out[#out + 1] = tonumber(ARGV[i + 3])
                out[#out + 1] = ARGV[3 + 2 * s]
              end
            end
          end
        end
      end
    end
  end
end
redis.call('HDEL', KEYS[1], 'staged')
redis.call('ZREM', KEYS[2], ARGV[1])
local dropped = 0
for i = first, #ARGV, 4 do
  if skip[i] then
    redis.call('HSET', KEYS[1], 'r:' .. ARGV[i + 3], cjson.encode({status = 'suppressed', attempts = 0}))
    dropped = dropped + 1
  elseif ARGV[i + 1] == '' then
    redis.call('XADD', KEYS[3], '*', 'j', ARGV[i])
  else
    redis.call('ZADD', KEYS[4], ARGV[i + 1], ARGV[i])
  end
end
if dropped > 0 then
  local left = redis.call('HINCRBY', KEYS[1], 'pending', -dropped)
  if left <= 0 then
    redis.call('DEL', KEYS[1])
    redis.call('DECR', KEYS[5])
  end
end
local log = KEYS[7 + ns]
for r = 1, nr do
  local at = 4 + 2 * ns + 2 * r
  local ok = redis.pcall('XADD', log, ARGV[at] .. '-*', 'e', ARGV[at + 1])
  if type(ok) == 'table' and ok.err then
    local info = redis.pcall('XINFO', 'STREAM', log)
    local last = nil
    if type(info) == 'table' and not info.err then
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then last = info[i + 1] end
      end
    end
    local ms = last and string.match(last, '^(%d+)%-')
    if ms then redis.pcall('XADD', log, ms .. '-*', 'e', ARGV[at + 1]) end
  end
end
return out
";

// KEYS: msg, staged, count. ARGV: id, 'staged' (only if still staged) or 'any'.
// A committed message's jobs may stay in the stream or schedule: a worker finds the record
// gone and finishes them without delivering.
const DROP: &str = r"
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] == 'staged' and redis.call('HEXISTS', KEYS[1], 'staged') == 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('DECR', KEYS[3])
return 1
";

// KEYS: ready. ARGV: group, min idle ms. Checked and deleted in one step: DELCONSUMER would
// drop the pending entries of a consumer that took a job in between.
const PRUNE: &str = r"
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
local n = 0
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] and f['pending'] == 0 and f['idle'] and tonumber(f['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    n = n + 1
  end
end
return n
";

impl RedisQueue {
    /// Connects to `url` (one server or a cluster, see `Target::parse`) and creates the
    /// consumer group if missing. `prefix` must contain a hash tag.
    pub async fn connect(url: &str, prefix: &str, durability: Durability) -> Result<Self> {
        let target = Target::parse(url).map_err(redis::RedisError::from)?;
        Self::connect_to(&target, prefix, durability).await
    }

    /// [`RedisQueue::connect`] to an already parsed URL.
    pub(crate) async fn connect_to(target: &Target, prefix: &str, durability: Durability) -> Result<Self> {
        let conn = RedisConn::connect(target, Timeouts::default()).await?;
        // Longer than the longest BLOCK a fetch asks for.
        let block_timeouts = Timeouts {
            response: Duration::from_secs(40),
            ..Timeouts::default()
        };
        let block_conn = RedisConn::connect(target, block_timeouts).await?;
        let q = RedisQueue {
            conn,
            block_conn: Mutex::new(BlockConn {
                conn: block_conn,
                drained_at: None,
            }),
            keys: Keys::new(prefix),
            durability,
            complete: Script::new(COMPLETE),
            promote: Script::new(PROMOTE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            cancel: Script::new(CANCEL),
            commit: Script::new(COMMIT),
            drop_msg: Script::new(DROP),
            prune: Script::new(PRUNE),
            bulk: Script::new(BULK),
            fetch: Script::new(FETCH),
            stores_log: false,
            record_form: super::record::Form::default(),
        };
        q.ensure_group().await?;
        Ok(q)
    }

    async fn ensure_group(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let r: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.keys.ready)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes message `id` (`only_staged`: unless it was committed meanwhile); true if it went.
    async fn drop_message(&self, id: &str, only_staged: bool) -> Result<bool> {
        let mut c = self.conn.clone();
        let n: i64 = self
            .drop_msg
            .key(self.keys.msg(id))
            .key(&self.keys.staged)
            .key(&self.keys.count)
            .arg(id)
            .arg(if only_staged { "staged" } else { "any" })
            .invoke_async(&mut c)
            .await?;
        Ok(n == 1)
    }

    /// Takes back a message the client will be refused: best effort, since a staged record
    /// left behind is inert and purged later.
    async fn abort(&self, id: &str) {
        if let Err(e) = self.drop_message(id, false).await {
            tracing::warn!(error = %e, message = %id, "removing a refused message failed; it stays inert until purged");
        }
    }

    /// `WAIT` for the configured replicas after a write to `key`; on failure the message is
    /// taken back, so that the 451 the client gets holds.
    async fn replicated(&self, key: &str, id: &str) -> Result<()> {
        if self.durability.replicas == 0 {
            return Ok(());
        }
        let mut c = self.conn.clone();
        let acked = c
            .wait_replicas(key, self.durability.replicas, self.durability.timeout)
            .await;
        let err = match acked {
            Ok(n) if n >= i64::from(self.durability.replicas) => return Ok(()),
            Ok(n) => QueueError::Durability(format!("{n} of {} replicas acknowledged", self.durability.replicas)),
            Err(e) => e.into(),
        };
        self.abort(id).await;
        Err(err)
    }

    /// Makes a staged message deliverable, leaving out the jobs of recipients `screen` finds
    /// suppressed (returned as (recipient index, scope id)). An unanswered attempt is retried
    /// for [`COMMIT_SETTLE`] (Redis may come back and say what happened); then, or when the
    /// record is gone, the message is taken back and the error returned. A retry that finds
    /// the commit applied cannot tell which recipients it left out: their records are final
    /// (`suppressed`) on the message, but they get no `suppressed` log record.
    /// The commit script's invocation for `meta`'s jobs (see [`COMMIT`] for its keys and args).
    fn commit_invocation(
        &self,
        meta: &MessageMeta,
        jobs: &[(Job, Option<i64>)],
        screen: Option<&crate::suppress::Screen>,
        log: &[crate::observe::dlog::Encoded],
    ) -> redis::ScriptInvocation<'_> {
        let log = if self.stores_log { log } else { &[] };
        let scopes = screen.map_or(&[][..], |s| &s.scopes[..]);
        let mut inv = self.commit.key(self.keys.msg(&meta.id));
        inv.key(&self.keys.staged)
            .key(&self.keys.ready)
            .key(&self.keys.sched)
            .key(&self.keys.count)
            .key(&self.keys.suppress_gens);
        for (id, _) in scopes {
            inv.key(crate::suppress::list_key(&self.keys.prefix, id));
        }
        inv.key(&self.keys.dlog);
        inv.arg(&meta.id)
            .arg(screen.map_or(0, |s| s.now_ms))
            .arg(scopes.len())
            .arg(if screen.is_some_and(|s| s.force) { "1" } else { "0" });
        for (id, generation) in scopes {
            inv.arg(id).arg(generation);
        }
        inv.arg(log.len());
        for rec in log {
            inv.arg(rec.time_ms).arg(&rec.json);
        }
        for (n, (job, due)) in jobs.iter().enumerate() {
            let key = screen.and_then(|s| s.keys.get(n)).map_or("", String::as_str);
            inv.arg(job.encode())
                .arg(due.map(|d| d.to_string()).unwrap_or_default())
                .arg(key)
                .arg(job.rcpt);
        }
        inv
    }

    /// The commit script's reply: `Some(suppressed)` when the message is committed, `None` when
    /// its record is gone.
    fn committed(v: &[Value]) -> Option<Vec<(u32, String)>> {
        if v.first().and_then(as_i64) != Some(1) {
            return None;
        }
        Some(
            v[1..]
                .chunks(2)
                .filter_map(|p| {
                    let idx = u32::try_from(as_i64(p.first()?)?).ok()?;
                    Some((idx, as_string(p.get(1)?)?))
                })
                .collect(),
        )
    }

    /// Makes a staged message deliverable, leaving out the jobs of recipients `screen` finds
    /// suppressed (returned as (recipient index, scope id)). An unanswered attempt is retried
    /// for [`COMMIT_SETTLE`] (Redis may come back and say what happened); then, or when the
    /// record is gone, the message is taken back and the error returned. A retry that finds
    /// the commit applied cannot tell which recipients it left out: their records are final
    /// (`suppressed`) on the message, but they get no `suppressed` log record.
    async fn commit(
        &self,
        meta: &MessageMeta,
        jobs: &[(Job, Option<i64>)],
        screen: Option<&crate::suppress::Screen>,
        log: &[crate::observe::dlog::Encoded],
    ) -> Result<Vec<(u32, String)>> {
        let deadline = tokio::time::Instant::now() + COMMIT_SETTLE;
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut c = self.conn.clone();
            let inv = self.commit_invocation(meta, jobs, screen, log);
            let err = match inv.invoke_async::<Vec<Value>>(&mut c).await {
                Ok(v) => match Self::committed(&v) {
                    Some(suppressed) => return Ok(suppressed),
                    // Gone: purged, or (after an unanswered attempt) possibly committed and
                    // already finished by a worker. Refusing risks a duplicate, accepting would
                    // risk a loss.
                    None => QueueError::Durability(format!("message {} vanished before its commit", meta.id)),
                },
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, message = %meta.id, "commit unanswered; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(e) => e.into(),
            };
            self.abort(&meta.id).await;
            return Err(err);
        }
    }

    async fn enqueue_with(
        &self,
        meta: &MessageMeta,
        body: &[u8],
        jobs: &[(Job, Option<i64>)],
        screen: Option<&crate::suppress::Screen>,
        log: &[crate::observe::dlog::Encoded],
    ) -> Result<Vec<(u32, String)>> {
        // The compact record (`super::record`): meta and the body's tail in `meta`, its head in
        // `body`, cut so that neither allocation wastes a size class in Redis (or the JSON one).
        let record = super::record::encode_as(self.record_form, meta, body).map_err(QueueError::Corrupt)?;
        let key = self.keys.msg(&meta.id);
        // Stage: the record only, listed for the purge until the commit. The command's buffer is
        // sized up front: appending the body to a growing one reallocated it about ten times.
        let mut hset = redis::Cmd::with_capacity(10, key.len() + record.meta.len() + record.head + 64);
        hset.arg("HSET")
            .arg(&key)
            .arg("meta")
            .arg(&record.meta)
            .arg("body")
            .arg(&body[..record.head])
            .arg("pending")
            .arg(jobs.len())
            .arg(STAGED)
            .arg(1);
        let mut p = redis::pipe();
        p.atomic();
        p.add_command(hset).ignore();
        p.cmd("ZADD")
            .arg(&self.keys.staged)
            .arg(meta.received_at_ms)
            .arg(&meta.id)
            .ignore();
        p.cmd("INCR").arg(&self.keys.count).ignore();
        let mut c = self.conn.clone();
        if self.durability.replicas == 0 {
            // Nothing to wait for between the steps: the commit goes in the same transaction,
            // one round trip and one AOF fsync per message instead of two. A transaction
            // applies whole or not at all, so what a lost reply leaves is what a lost commit
            // reply leaves (the record committed, or nothing): the commit's retry settles it.
            let inv = self.commit_invocation(meta, jobs, screen, log);
            p.invoke_script(&inv);
            match p.query_async::<(Vec<Value>,)>(&mut c).await {
                Ok((v,)) => {
                    if let Some(suppressed) = Self::committed(&v) {
                        return Ok(suppressed);
                    }
                }
                // Nothing was sent: nothing to settle.
                Err(e) if e.is_connection_refusal() => return Err(e.into()),
                // Unanswered, or the script not loaded on this server (NOSCRIPT: the stage is
                // applied); the commit's own retry loop loads it and settles.
                Err(e) => tracing::debug!(error = %e, message = %meta.id, "staged commit unanswered; settling"),
            }
            return self.commit(meta, jobs, screen, log).await;
        }
        if let Err(e) = p.query_async::<()>(&mut c).await {
            self.abort(&meta.id).await;
            return Err(e.into());
        }
        self.replicated(&key, &meta.id).await?;
        let suppressed = self.commit(meta, jobs, screen, log).await?;
        self.replicated(&key, &meta.id).await?;
        Ok(suppressed)
    }

    /// Writes enqueued records in `form` (default compact; see `super::record`).
    pub fn with_record_form(mut self, form: super::record::Form) -> Self {
        self.record_form = form;
        self
    }

    /// Has the commit store the `received`/`scheduled` records given to
    /// [`Queue::enqueue_logged`], and the complete those given to [`Queue::complete_logged`], in
    /// the delivery log stream under this queue's prefix. Only for a relay whose delivery log is
    /// that Redis store (else they would land in a log nobody reads).
    pub fn storing_log(mut self) -> Self {
        self.stores_log = true;
        self
    }

    /// Stream key and group, for autoscalers (KEDA redis-streams) and docs.
    pub fn ready_key(&self) -> &str {
        &self.keys.ready
    }

    fn leased_from_entries(entries: &Value) -> Vec<Leased> {
        let mut out = Vec::new();
        let Value::Array(entries) = entries else { return out };
        for e in entries {
            let Value::Array(parts) = e else { continue };
            let (Some(id), Some(Value::Array(fields))) = (parts.first(), parts.get(1)) else {
                continue;
            };
            let Some(id) = as_string(id) else { continue };
            // fields = [ "j", <job json> ]
            let job = fields.get(1).and_then(as_bytes).and_then(Job::decode);
            if let Some(job) = job {
                out.push(Leased { lease: id, job });
            } else {
                tracing::warn!(entry = %id, "skipping undecodable queue entry");
            }
        }
        out
    }
}

/// The job of one stream entry (`id`, `[ "j", <job> ]`); None, with a warning, if it does not
/// decode.
fn leased_from_entry(id: &Value, fields: &Value) -> Option<Leased> {
    let id = as_string(id)?;
    let job = match fields {
        Value::Array(f) => f.get(1).and_then(as_bytes).and_then(Job::decode),
        _ => None,
    };
    if job.is_none() {
        tracing::warn!(entry = %id, "skipping undecodable queue entry");
    }
    job.map(|job| Leased { lease: id, job })
}

/// A message record from an `HMGET meta body cancelled` reply; None if it is gone. The body
/// keeps the reply's buffer (no copy) unless part of it is in `meta` (`super::record`).
fn stored_from(msg_id: &str, mut v: Vec<Value>) -> Result<Option<Stored>> {
    let (Some(_), Some(_)) = (v.first().and_then(as_bytes), v.get(1).and_then(as_bytes)) else {
        return Ok(None);
    };
    let cancelled = v.get(2).and_then(as_bytes).is_some();
    let raw = std::mem::replace(&mut v[0], Value::Nil);
    let (meta, tail) = super::record::decode(msg_id, as_bytes(&raw).unwrap_or_default())
        .map_err(|e| QueueError::Corrupt(format!("message {msg_id}: {e}")))?;
    let head = match std::mem::replace(&mut v[1], Value::Nil) {
        Value::BulkString(b) => b,
        other => as_bytes(&other).map(<[u8]>::to_vec).unwrap_or_default(),
    };
    let body = super::record::join(head, tail);
    Ok(Some(Stored { meta, body, cancelled }))
}

fn as_string(v: &Value) -> Option<String> {
    as_bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_string(other).and_then(|s| s.parse().ok()),
    }
}

#[async_trait]
impl Queue for RedisQueue {
    fn durable(&self) -> bool {
        true
    }

    async fn enqueue(&self, meta: &MessageMeta, body: &[u8], jobs: &[(Job, Option<i64>)]) -> Result<()> {
        self.enqueue_with(meta, body, jobs, None, &[]).await.map(|_| ())
    }

    async fn enqueue_screened(
        &self,
        meta: &MessageMeta,
        body: &[u8],
        jobs: &[(Job, Option<i64>)],
        screen: &crate::suppress::Screen,
    ) -> Result<Vec<(u32, String)>> {
        self.enqueue_with(meta, body, jobs, Some(screen), &[]).await
    }

    fn stores_log(&self) -> bool {
        self.stores_log
    }

    async fn enqueue_logged(
        &self,
        meta: &MessageMeta,
        body: &[u8],
        jobs: &[(Job, Option<i64>)],
        screen: Option<&crate::suppress::Screen>,
        log: &[crate::observe::dlog::Encoded],
    ) -> Result<Vec<(u32, String)>> {
        self.enqueue_with(meta, body, jobs, screen, log).await
    }

    async fn promote_due(&self, now_ms: i64, max: usize) -> Result<usize> {
        let mut c = self.conn.clone();
        let n: i64 = self
            .promote
            .key(&self.keys.sched)
            .key(&self.keys.ready)
            .key(&self.keys.held)
            .arg(now_ms)
            .arg(max)
            .invoke_async(&mut c)
            .await?;
        Ok(n.max(0) as usize)
    }

    async fn fetch_loaded(&self, consumer: &str, max: usize, block: Duration) -> Result<Vec<Fetched>> {
        let max = max.max(1);
        let mut bc = self.block_conn.lock().await;
        let msg_prefix = format!("{}msg:", self.keys.prefix);
        let mut waited = false;
        loop {
            let mut inv = self.fetch.key(&self.keys.ready);
            inv.arg(GROUP).arg(consumer).arg(max).arg(&msg_prefix);
            let reply: redis::RedisResult<Value> = match bc.drained_at.clone() {
                None => inv.invoke_async(&mut bc.conn).await,
                Some(after) => {
                    // Wait for an entry newer than the stream's last one when the last fetch
                    // took all (at once if one came meanwhile), then take the batch: the two
                    // go in one write, so an idle relay wakes at once on new work and a busy
                    // one still has one round trip per batch.
                    waited = true;
                    let mut p = redis::pipe();
                    p.cmd("XREAD")
                        .arg("COUNT")
                        .arg(1)
                        .arg("BLOCK")
                        .arg(block.as_millis() as u64)
                        .arg("STREAMS")
                        .arg(&self.keys.ready)
                        .arg(&after)
                        .ignore();
                    p.invoke_script(&inv);
                    p.query_async::<Vec<Value>>(&mut bc.conn)
                        .await
                        .map(|mut v| v.pop().unwrap_or(Value::Nil))
                }
            };
            let reply = match reply {
                Ok(v) => v,
                // Redis restarted or its scripts were flushed: a pipeline does not load them.
                Err(e) if e.code() == Some("NOSCRIPT") => {
                    inv.load_async(&mut bc.conn).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Value::Array(mut items) = reply else {
                return Err(QueueError::Corrupt("fetch: unexpected reply".into()));
            };
            // The group vanishes if someone flushed Redis; recreate it and let the caller retry.
            if items.first().and_then(as_i64) == Some(-1) {
                bc.drained_at = None;
                drop(bc);
                self.ensure_group().await?;
                return Ok(Vec::new());
            }
            let rest = items.split_off(1.min(items.len()));
            bc.drained_at = items.first().and_then(as_string);
            let mut out = Vec::with_capacity(rest.len() / 3);
            let mut rest = rest.into_iter();
            while let (Some(id), Some(fields), Some(rec)) = (rest.next(), rest.next(), rest.next()) {
                let Some(leased) = leased_from_entry(&id, &fields) else {
                    continue;
                };
                let stored = match rec {
                    // Unreadable: the job loads it again and reports it.
                    Value::Array(v) => stored_from(&leased.job.msg, v).ok(),
                    _ => None,
                };
                out.push(Fetched { leased, stored });
            }
            // Nothing there and not waited yet: wait for the next entry.
            if out.is_empty() && !waited && bc.drained_at.is_some() {
                continue;
            }
            return Ok(out);
        }
    }

    async fn fetch(&self, consumer: &str, max: usize, block: Duration) -> Result<Vec<Leased>> {
        let mut bc = self.block_conn.lock().await;
        let c = &mut bc.conn;
        let v: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.keys.ready)
            .arg(">")
            .query_async(c)
            .await;
        let v = match v {
            Ok(v) => v,
            // The group vanishes if someone flushed Redis; recreate it and let the caller retry.
            Err(e) if e.code() == Some("NOGROUP") => {
                drop(bc);
                self.ensure_group().await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        // [[stream, [entries...]]] or nil / map in RESP3
        let entries = match &v {
            Value::Array(streams) => streams.first().and_then(|s| match s {
                Value::Array(kv) => kv.get(1).cloned(),
                _ => None,
            }),
            Value::Map(m) => m.first().map(|(_, e)| e.clone()),
            _ => None,
        };
        Ok(entries.map(|e| Self::leased_from_entries(&e)).unwrap_or_default())
    }

    async fn reclaim(&self, consumer: &str, min_idle: Duration, max: usize) -> Result<Vec<Leased>> {
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        let mut cursor = "0-0".to_owned();
        loop {
            let v: Value = redis::cmd("XAUTOCLAIM")
                .arg(&self.keys.ready)
                .arg(GROUP)
                .arg(consumer)
                .arg(min_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(max.saturating_sub(out.len()).max(1))
                .query_async(&mut c)
                .await?;
            let Value::Array(parts) = v else { break };
            out.extend(parts.get(1).map(Self::leased_from_entries).unwrap_or_default());
            cursor = parts.first().and_then(as_string).unwrap_or_else(|| "0-0".into());
            if cursor == "0-0" || out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    async fn renew(&self, consumer: &str, leases: &[String]) -> Result<usize> {
        if leases.is_empty() {
            return Ok(0);
        }
        let mut c = self.conn.clone();
        let mut inv = self.renew.key(&self.keys.ready);
        inv.arg(GROUP).arg(consumer);
        for l in leases {
            inv.arg(l);
        }
        let n: i64 = inv.invoke_async(&mut c).await?;
        Ok(n.max(0) as usize)
    }

    async fn release(&self, consumer: &str, leases: &[String], idle: Duration) -> Result<usize> {
        if leases.is_empty() {
            return Ok(0);
        }
        let mut c = self.conn.clone();
        let mut inv = self.release.key(&self.keys.ready);
        // Past the visibility timeout by a margin, so a reclaim at that min-idle takes it.
        let idle_ms = (idle + Duration::from_secs(1)).as_millis() as u64;
        inv.arg(GROUP).arg(consumer).arg(idle_ms);
        for l in leases {
            inv.arg(l);
        }
        let n: i64 = inv.invoke_async(&mut c).await?;
        Ok(n.max(0) as usize)
    }

    async fn load(&self, msg_id: &str) -> Result<Option<Stored>> {
        Ok(self.load_many(&[msg_id]).await?.pop().flatten())
    }

    async fn load_many(&self, msg_ids: &[&str]) -> Result<Vec<Option<Stored>>> {
        if msg_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for id in msg_ids {
            p.cmd("HMGET")
                .arg(self.keys.msg(id))
                .arg("meta")
                .arg("body")
                .arg("cancelled");
        }
        let mut c = self.conn.clone();
        let replies: Vec<Vec<Value>> = p.query_async(&mut c).await?;
        msg_ids.iter().zip(replies).map(|(id, v)| stored_from(id, v)).collect()
    }

    async fn complete(&self, leased: &Leased, disposition: Disposition) -> Result<bool> {
        Ok(self.complete_logged(leased, disposition, &[]).await?.applied)
    }

    async fn complete_logged(
        &self,
        leased: &Leased,
        disposition: Disposition,
        log: &[crate::observe::dlog::Encoded],
    ) -> Result<Completed> {
        let log = if self.stores_log { log } else { &[] };
        let (mode, state, due, job, hold) = match &disposition {
            Disposition::Reschedule { job, due_ms, state } => ("r", state, *due_ms, job.encode(), ""),
            Disposition::Final { state } => ("f", state, 0, String::new(), ""),
            // As it was, for the ready stream if the hold is gone.
            Disposition::Hold {
                job,
                due_ms,
                state,
                hold,
            } => ("h", state, *due_ms, job.encode(), hold.as_str()),
        };
        let state = serde_json::to_string(state).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        let mut c = self.conn.clone();
        let mut inv = self.complete.key(&self.keys.ready);
        inv.key(&self.keys.sched)
            .key(self.keys.msg(&leased.job.msg))
            .key(&self.keys.count)
            .key(&self.keys.held)
            .key(&self.keys.holds)
            .key(&self.keys.dlog)
            .arg(GROUP)
            .arg(&leased.lease)
            .arg(mode)
            .arg(format!("r:{}", leased.job.rcpt))
            .arg(state)
            .arg(due)
            .arg(job)
            .arg(hold)
            .arg(leased.job.encode())
            .arg(log.len());
        for rec in log {
            inv.arg(rec.time_ms).arg(&rec.json);
        }
        let applied: i64 = inv.invoke_async(&mut c).await?;
        Ok(Completed {
            applied: applied == 1,
            logged: applied != 0 && !log.is_empty(),
        })
    }

    async fn cancel(&self, msg_id: &str) -> Result<CancelOutcome> {
        let mut c = self.conn.clone();
        // Jobs are encoded with the message id first, so a prefix finds them.
        let prefix = format!("{{\"m\":{},", serde_json::Value::from(msg_id));
        let glob: String = prefix
            .chars()
            .flat_map(|ch| match ch {
                '*' | '?' | '[' | ']' | '\\' => vec!['\\', ch],
                _ => vec![ch],
            })
            .collect();
        let (status, now, in_flight): (i64, Vec<u32>, Vec<u32>) = self
            .cancel
            .key(self.keys.msg(msg_id))
            .key(&self.keys.sched)
            .key(&self.keys.ready)
            .key(&self.keys.count)
            .key(&self.keys.held)
            .arg(GROUP)
            .arg(format!("{glob}*"))
            .arg(&prefix)
            .invoke_async(&mut c)
            .await?;
        Ok(match status {
            0 => CancelOutcome::NotFound,
            2 => CancelOutcome::AlreadyCancelled,
            _ => CancelOutcome::Cancelled { now, in_flight },
        })
    }

    async fn view(&self, msg_id: &str) -> Result<Option<MessageView>> {
        let mut c = self.conn.clone();
        let v: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(self.keys.msg(msg_id))
            .query_async(&mut c)
            .await?;
        if v.is_empty() {
            return Ok(None);
        }
        let mut meta = None;
        let mut pending = 0;
        let mut cancelled = false;
        let mut states = std::collections::HashMap::new();
        for (k, val) in v {
            match k.as_str() {
                "meta" => meta = super::record::decode(msg_id, &val).ok().map(|(m, _)| m),
                "pending" => pending = String::from_utf8_lossy(&val).parse().unwrap_or(0),
                "cancelled" => cancelled = true,
                k => {
                    if let Some(i) = k.strip_prefix("r:").and_then(|i| i.parse::<usize>().ok()) {
                        states.insert(i, serde_json::from_slice::<RecipientState>(&val).ok());
                    }
                }
            }
        }
        let meta = meta.ok_or_else(|| QueueError::Corrupt(format!("message {msg_id} has no metadata")))?;
        let recipients = meta
            .rcpts
            .iter()
            .enumerate()
            .map(|(i, r)| (r.clone(), states.remove(&i).flatten()))
            .collect();
        Ok(Some(MessageView {
            meta,
            cancelled,
            pending,
            recipients,
        }))
    }

    async fn stats(&self, now_ms: i64) -> Result<QueueStats> {
        let mut c = self.conn.clone();
        let mut p = redis::pipe();
        p.cmd("XLEN").arg(&self.keys.ready);
        p.cmd("XPENDING").arg(&self.keys.ready).arg(GROUP);
        p.cmd("ZCARD").arg(&self.keys.sched);
        p.cmd("GET").arg(&self.keys.count);
        p.cmd("ZCARD").arg(&self.keys.held);
        p.cmd("XRANGE")
            .arg(&self.keys.ready)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        let (len, pending, sched, count, held, first): (i64, Value, i64, Option<i64>, i64, Value) =
            p.query_async(&mut c).await?;
        let inflight = match &pending {
            Value::Array(a) => a.first().and_then(as_i64).unwrap_or(0),
            _ => 0,
        };
        let oldest_ms = match &first {
            Value::Array(a) => a
                .first()
                .and_then(|e| match e {
                    Value::Array(p) => p.first().and_then(as_string),
                    _ => None,
                })
                .and_then(|id| id.split('-').next().and_then(|ms| ms.parse::<i64>().ok())),
            _ => None,
        };
        Ok(QueueStats {
            ready: (len - inflight).max(0) as u64,
            inflight: inflight.max(0) as u64,
            scheduled: sched.max(0) as u64,
            held: held.max(0) as u64,
            messages: count.unwrap_or(0).max(0) as u64,
            oldest_age_ms: oldest_ms.map(|t| (now_ms - t).max(0) as u64).unwrap_or(0),
        })
    }

    async fn purge_uncommitted(&self, before_ms: i64, max: usize) -> Result<usize> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&self.keys.staged)
            .arg("-inf")
            .arg(before_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(max)
            .query_async(&mut c)
            .await?;
        let mut n = 0;
        for id in ids {
            if self.drop_message(&id, true).await? {
                tracing::info!(message = %id, "purged a message whose enqueue was never committed");
                n += 1;
            }
        }
        Ok(n)
    }

    async fn prune_consumers(&self, min_idle: Duration) -> Result<usize> {
        let mut c = self.conn.clone();
        let n: i64 = self
            .prune
            .key(&self.keys.ready)
            .arg(GROUP)
            .arg(min_idle.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(n.max(0) as usize)
    }

    async fn ping(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    fn bulk_control(&self) -> bool {
        true
    }

    async fn scan(&self, cursor: Option<ScanCursor>, batch: usize) -> Result<(Vec<QueuedJob>, Option<ScanCursor>)> {
        let mut c = self.conn.clone();
        let batch = batch.max(1);
        let cursor = cursor.unwrap_or(ScanCursor::Held(0));
        let mut found: Vec<(Place, Job, bool)> = Vec::new();
        let next = match cursor {
            ScanCursor::Held(at) | ScanCursor::Scheduled(at) => {
                let held = matches!(cursor, ScanCursor::Held(_));
                let key = if held { &self.keys.held } else { &self.keys.sched };
                let (next, items): (u64, Vec<(Vec<u8>, f64)>) = redis::cmd("ZSCAN")
                    .arg(key)
                    .arg(at)
                    .arg("COUNT")
                    .arg(batch)
                    .query_async(&mut c)
                    .await?;
                for (member, due) in items {
                    let Some(job) = Job::decode(&member) else { continue };
                    let member = String::from_utf8_lossy(&member).into_owned();
                    let due_ms = due as i64;
                    let place = if held {
                        Place::Held { member, due_ms }
                    } else {
                        Place::Scheduled { member, due_ms }
                    };
                    found.push((place, job, false));
                }
                match (next, held) {
                    (0, true) => Some(ScanCursor::Scheduled(0)),
                    (0, false) => Some(ScanCursor::Ready("-".into())),
                    (n, true) => Some(ScanCursor::Held(n)),
                    (n, false) => Some(ScanCursor::Scheduled(n)),
                }
            }
            ScanCursor::Ready(after) => {
                let start = if after == "-" {
                    after.clone()
                } else {
                    format!("({after}")
                };
                let entries: Value = redis::cmd("XRANGE")
                    .arg(&self.keys.ready)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(batch)
                    .query_async(&mut c)
                    .await?;
                let leased = Self::leased_from_entries(&entries);
                let last = leased.last().map(|l| l.lease.clone());
                let mut pending = HashSet::new();
                if let (Some(first), Some(last)) = (leased.first(), &last) {
                    let p: Value = redis::cmd("XPENDING")
                        .arg(&self.keys.ready)
                        .arg(GROUP)
                        .arg(&first.lease)
                        .arg(last)
                        .arg(batch)
                        .query_async(&mut c)
                        .await?;
                    if let Value::Array(rows) = p {
                        for r in rows {
                            if let Value::Array(f) = r
                                && let Some(id) = f.first().and_then(as_string)
                            {
                                pending.insert(id);
                            }
                        }
                    }
                }
                let more = leased.len() >= batch;
                for l in leased {
                    let in_flight = pending.contains(&l.lease);
                    found.push((Place::Ready { entry: l.lease }, l.job, in_flight));
                }
                match last {
                    Some(last) if more => Some(ScanCursor::Ready(last)),
                    _ => None,
                }
            }
        };
        // The messages of the batch, each read once.
        let mut ids: Vec<&str> = found.iter().map(|(_, j, _)| j.msg.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut metas: HashMap<String, Arc<MessageMeta>> = HashMap::new();
        if !ids.is_empty() {
            let mut p = redis::pipe();
            for id in &ids {
                p.cmd("HGET").arg(self.keys.msg(id)).arg("meta");
            }
            let raw: Vec<Option<Vec<u8>>> = p.query_async(&mut c).await?;
            for (id, raw) in ids.iter().zip(raw) {
                if let Some(m) = raw.and_then(|r| super::record::decode(id, &r).ok().map(|(m, _)| m)) {
                    metas.insert((*id).to_owned(), Arc::new(m));
                }
            }
        }
        let jobs = found
            .into_iter()
            .map(|(place, job, in_flight)| QueuedJob {
                meta: metas.get(&job.msg).cloned(),
                place,
                job,
                in_flight,
            })
            .collect();
        Ok((jobs, next))
    }

    async fn apply(&self, ops: &[BulkOp]) -> Result<Vec<bool>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.bulk.key(&self.keys.ready);
        inv.key(&self.keys.sched)
            .key(&self.keys.held)
            .key(&self.keys.count)
            .arg(GROUP);
        for op in ops {
            let (code, place, msg, new, num) = match op {
                BulkOp::Cancel {
                    place,
                    rcpt,
                    msg,
                    state,
                } => (
                    "c",
                    place,
                    msg,
                    serde_json::to_string(state).map_err(|e| QueueError::Corrupt(e.to_string()))?,
                    i64::from(*rcpt),
                ),
                BulkOp::Ready { place, msg, job } => ("r", place, msg, job.encode(), 0),
                BulkOp::Hold {
                    place,
                    msg,
                    job,
                    due_ms,
                } => ("h", place, msg, job.encode(), *due_ms),
            };
            let (at, r) = match place {
                Place::Ready { entry } => ("x", entry),
                Place::Scheduled { member, .. } => ("s", member),
                Place::Held { member, .. } => ("h", member),
            };
            inv.key(self.keys.msg(msg)).arg(code).arg(at).arg(r).arg(new).arg(num);
        }
        let mut c = self.conn.clone();
        let done: Vec<i64> = inv.invoke_async(&mut c).await?;
        Ok(done.into_iter().map(|d| d == 1).collect())
    }

    async fn holds(&self) -> Result<Vec<Hold>> {
        let mut c = self.conn.clone();
        let all: HashMap<String, Vec<u8>> = redis::cmd("HGETALL").arg(&self.keys.holds).query_async(&mut c).await?;
        let mut out = Vec::with_capacity(all.len());
        for (key, raw) in all {
            match serde_json::from_slice::<Hold>(&raw) {
                Ok(h) => out.push(h),
                Err(e) => tracing::warn!(hold = %key, error = %e, "skipping an unreadable hold record"),
            }
        }
        Ok(out)
    }

    async fn put_hold(&self, hold: &Hold) -> Result<()> {
        let mut c = self.conn.clone();
        let raw = serde_json::to_vec(hold).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        let _: i64 = redis::cmd("HSET")
            .arg(&self.keys.holds)
            .arg(hold.key())
            .arg(raw)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    async fn remove_hold(&self, key: &str) -> Result<Option<Hold>> {
        let mut c = self.conn.clone();
        let (raw, _): (Option<Vec<u8>>, i64) = redis::pipe()
            .atomic()
            .cmd("HGET")
            .arg(&self.keys.holds)
            .arg(key)
            .cmd("HDEL")
            .arg(&self.keys.holds)
            .arg(key)
            .query_async(&mut c)
            .await?;
        Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::dlog::{Encoded, EventResult};
    use mailroute_testkit::RedisServer;

    fn meta(id: &str, now_ms: i64) -> MessageMeta {
        MessageMeta::sample(id, now_ms)
    }

    fn record(ms: u64, text: &str) -> Encoded {
        Encoded {
            result: EventResult::Received,
            time_ms: ms,
            json: text.into(),
            line: String::new(),
        }
    }

    async fn log_entries(c: &mut RedisConn) -> Vec<(String, Vec<String>)> {
        redis::cmd("XRANGE")
            .arg("{mailroute}:dlog")
            .arg("-")
            .arg("+")
            .query_async(c)
            .await
            .unwrap()
    }

    /// The records go in with the jobs, once: a commit retried after a lost reply finds the
    /// message committed and writes neither jobs nor records again. A record older than the
    /// stream's newest is filed at the newest time, as the log's own append does.
    #[tokio::test]
    async fn the_commit_stores_the_log_records_once_with_the_log_id_rule() {
        let server = RedisServer::start().unwrap();
        let target = Target::parse(&server.url()).unwrap();
        let q = RedisQueue::connect_to(&target, DEFAULT_PREFIX, Durability::default())
            .await
            .unwrap()
            .storing_log();
        let mut c = q.conn.clone();
        let _: String = redis::cmd("XADD")
            .arg("{mailroute}:dlog")
            .arg("5000-0")
            .arg("e")
            .arg("later")
            .query_async(&mut c)
            .await
            .unwrap();
        let m = meta("m1", 1000);
        let jobs = [(Job::new("m1", 0), None)];
        let log = [record(1000, "r1"), record(6000, "r2")];
        q.enqueue_logged(&m, b"body", &jobs, None, &log).await.unwrap();
        q.commit(&m, &jobs, None, &log).await.unwrap();
        let entries = log_entries(&mut c).await;
        let got: Vec<(&str, &str)> = entries
            .iter()
            .map(|(id, f)| (id.split('-').next().unwrap(), f[1].as_str()))
            .collect();
        assert_eq!(got, [("5000", "later"), ("5000", "r1"), ("6000", "r2")]);
        let ready: u64 = redis::cmd("XLEN").arg(&q.keys.ready).query_async(&mut c).await.unwrap();
        assert_eq!(ready, 1);

        // Not storing: the records are the caller's to store.
        let q = RedisQueue::connect_to(&target, DEFAULT_PREFIX, Durability::default())
            .await
            .unwrap();
        let m = meta("m2", 7000);
        let jobs = [(Job::new("m2", 0), None)];
        q.enqueue_logged(&m, b"body", &jobs, None, &[record(7000, "r3")])
            .await
            .unwrap();
        assert_eq!(log_entries(&mut c).await.len(), 3);
    }

    /// The outcome's records go in with the completion, once: a complete retried after a lost
    /// reply (the lease already completed) writes nothing again and says so, so the worker
    /// does not store them a second time either. Not storing the log: nothing goes in.
    #[tokio::test]
    async fn the_complete_stores_the_outcome_records_once() {
        let server = RedisServer::start().unwrap();
        let target = Target::parse(&server.url()).unwrap();
        let q = RedisQueue::connect_to(&target, DEFAULT_PREFIX, Durability::default())
            .await
            .unwrap()
            .storing_log();
        let mut c = q.conn.clone();
        let state = RecipientState {
            status: crate::queue::message::RecipientStatus::Delivered,
            attempts: 1,
            next_attempt_ms: None,
            last_reply: None,
            route: None,
        };
        let m = meta("m1", 1000);
        q.enqueue(&m, b"body", &[(Job::new("m1", 0), None)]).await.unwrap();
        let leased = q.fetch("c1", 10, Duration::from_millis(100)).await.unwrap();
        let done = Disposition::Final { state: state.clone() };
        let log = [record(2000, "delivered")];
        let first = q.complete_logged(&leased[0], done.clone(), &log).await.unwrap();
        assert_eq!(
            first,
            Completed {
                applied: true,
                logged: true
            }
        );
        let got: Vec<String> = log_entries(&mut c)
            .await
            .into_iter()
            .map(|(_, f)| f[1].clone())
            .collect();
        assert_eq!(got, ["delivered"], "stored with the completion");
        let again = q.complete_logged(&leased[0], done.clone(), &log).await.unwrap();
        assert_eq!(
            again,
            Completed {
                applied: false,
                logged: false
            }
        );
        assert_eq!(log_entries(&mut c).await.len(), 1, "stored once");

        // A queue that does not store the log leaves the records to the caller.
        let plain = RedisQueue::connect_to(&target, DEFAULT_PREFIX, Durability::default())
            .await
            .unwrap();
        plain
            .enqueue(&meta("m2", 3000), b"body", &[(Job::new("m2", 0), None)])
            .await
            .unwrap();
        let leased = plain.fetch("c1", 10, Duration::from_millis(100)).await.unwrap();
        let r = plain
            .complete_logged(&leased[0], done, &[record(3000, "x")])
            .await
            .unwrap();
        assert_eq!(
            r,
            Completed {
                applied: true,
                logged: false
            }
        );
        assert_eq!(log_entries(&mut c).await.len(), 1);
    }
}
