//! The suppression list: addresses mail must not go to, per tenant namespace and for the whole
//! platform, kept in the queue's Redis under its hash tag: one hash per scope
//! (`<prefix>suppress:<scope id>`, field = the address's compared form, value = the JSON
//! [`Entry`]) and one hash of generation counters (`<prefix>suppress:gens`, field = scope id),
//! bumped in the same transaction as every write to the scope.
//!
//! Each relay holds a copy of every list in memory ([`Suppressions`]: the sorted 64-bit
//! hashes of the active entries, 8 bytes each), re-read in the background when a scope's
//! generation moved (a large list less often, see [`ScopeCopy::reread_due`]). The hot path asks the copy only: a recipient that is not on it costs no
//! Redis command; one that is (or collides with one) is confirmed with one read before it is
//! refused. What the copy cannot know yet (an entry added since it was read) is caught by the
//! queue's commit script, which compares the generations the copy was read at with Redis' and,
//! only when they differ, checks the recipients itself (see `queue::redis`).
//!
//! This module owns the keys, the writes, the copy and its refresher, and the metrics of the
//! list. The rules (address form, expiry, CSV) are [`core`]'s. It does not decide what happens
//! to a suppressed recipient at SMTP time (the session does) nor when a bounce adds one (the
//! worker does).

pub mod core;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use redis::Script;
use tokio::sync::watch;

pub use self::core::{CoreError, Entry, Mode, Scope, ScopeCopy, Source};
use crate::redis_client::RedisConn;

/// Default time between two reads of the generation counters.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);
/// Entries read per HSCAN call when a scope is (re)loaded.
const SCAN_COUNT: usize = 1000;
/// Entries written per transaction by an import.
const IMPORT_CHUNK: usize = 1000;

/// The key of a scope's list.
pub fn list_key(prefix: &str, scope_id: &str) -> String {
    format!("{prefix}suppress:{scope_id}")
}

/// The key of the generation counters.
pub fn gens_key(prefix: &str) -> String {
    format!("{prefix}suppress:gens")
}

/// Settings of the suppression list.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mode: Mode,
    /// Bounce classes whose permanent failures add the recipient (`invalid_recipient`).
    pub auto_classes: Vec<String>,
    /// How often the generation counters are read.
    pub poll: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::Refuse,
            auto_classes: vec!["invalid_recipient".into()],
            poll: DEFAULT_POLL,
        }
    }
}

/// Metrics of the list.
#[derive(Clone)]
pub struct SuppressMetrics {
    /// `{mode, sender_namespace}`: recipients refused or dropped because they are suppressed.
    pub suppressed: IntCounterVec,
    /// `{scope}`: active entries per list, as the last background read found them.
    pub entries: IntGaugeVec,
    /// `{source}`: entries added (`bounce`, `manual`).
    pub added: IntCounterVec,
}

impl SuppressMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = SuppressMetrics {
            suppressed: IntCounterVec::new(
                Opts::new(
                    "mailroute_suppressed_recipients_total",
                    "Recipients on a suppression list, refused at RCPT (mode refuse) or accepted and dropped (mode drop, and any the enqueue found), by mode and the sender's namespace.",
                ),
                &["mode", "sender_namespace"],
            )?,
            entries: IntGaugeVec::new(
                Opts::new(
                    "mailroute_suppression_entries",
                    "Active entries of each suppression list (scope: a namespace, or platform), read in the background.",
                ),
                &["scope"],
            )?,
            added: IntCounterVec::new(
                Opts::new(
                    "mailroute_suppression_added_total",
                    "Entries this relay added to a suppression list, by source (bounce, manual).",
                ),
                &["source"],
            )?,
        };
        registry.register(Box::new(m.suppressed.clone()))?;
        registry.register(Box::new(m.entries.clone()))?;
        registry.register(Box::new(m.added.clone()))?;
        Ok(m)
    }
}

/// A failed read or write of the list.
#[derive(Debug, thiserror::Error)]
pub enum SuppressError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Input(#[from] CoreError),
}

/// What the enqueue's commit script needs to catch what the copy missed: the scopes with the
/// generation the copy holds for each, whether the copy already hit (then the script checks
/// regardless), and each job's recipient in its compared form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Screen {
    /// (scope id, generation the copy holds), the message's own scope first.
    pub scopes: Vec<(String, String)>,
    pub force: bool,
    /// Per job, in job order: the recipient's key (empty: not comparable, never suppressed).
    pub keys: Vec<String>,
    pub now_ms: i64,
}

/// One scope's copy and when it was read (ms).
#[derive(Debug)]
struct Held {
    copy: ScopeCopy,
    read_at_ms: i64,
}

type Copies = Arc<HashMap<Scope, Arc<Held>>>;

/// The lists: Redis reads and writes, and this relay's in-memory copy.
pub struct Suppressions {
    conn: RedisConn,
    prefix: String,
    gens: String,
    pub settings: Settings,
    pub metrics: SuppressMetrics,
    copies: RwLock<Copies>,
    add_new: Script,
    remove: Script,
    purge: Script,
}

// KEYS: list, gens. ARGV: scope id, key, entry. Adds only an address not listed yet (a repeated
// bounce does not overwrite an administrator's entry). 1 = added.
const ADD_NEW: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
return 1
";

// KEYS: list, gens. ARGV: scope id, keys... Returns how many went.
const REMOVE: &str = r"
local n = 0
for i = 2, #ARGV do n = n + redis.call('HDEL', KEYS[1], ARGV[i]) end
if n > 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], 1) end
return n
";

// KEYS: list, gens. ARGV: scope id, now ms, keys... Deletes those still expired at now.
const PURGE: &str = r"
local n = 0
for i = 3, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local ok, e = pcall(cjson.decode, v)
    if ok and type(e) == 'table' and type(e['expires_ms']) == 'number' and e['expires_ms'] <= tonumber(ARGV[2]) then
      n = n + redis.call('HDEL', KEYS[1], ARGV[i])
    end
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], 1) end
return n
";

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub entries: Vec<Entry>,
    /// Pass back for the next page; `None`: done.
    pub cursor: Option<String>,
}

impl Suppressions {
    pub fn new(conn: RedisConn, prefix: &str, settings: Settings, metrics: SuppressMetrics) -> Self {
        Suppressions {
            conn,
            prefix: prefix.to_owned(),
            gens: gens_key(prefix),
            settings,
            metrics,
            copies: RwLock::new(Arc::new(HashMap::new())),
            add_new: Script::new(ADD_NEW),
            remove: Script::new(REMOVE),
            purge: Script::new(PURGE),
        }
    }

    fn list(&self, scope: &Scope) -> String {
        list_key(&self.prefix, &scope.id())
    }

    fn snapshot(&self) -> Copies {
        match self.copies.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The scopes of `namespace`'s mail whose copy holds `key` (in memory; a hit may be a
    /// hash collision).
    pub fn hits(&self, namespace: Option<&str>, key: &str) -> Vec<Scope> {
        let copies = self.snapshot();
        core::scopes_for(namespace)
            .into_iter()
            .filter(|s| copies.get(s).is_some_and(|c| c.copy.may_contain(core::hash(s, key))))
            .collect()
    }

    /// The entry that suppresses `key` for `namespace`'s mail at `now_ms`, read from Redis
    /// (one command): the confirmation of a hit.
    pub async fn lookup(
        &self,
        namespace: Option<&str>,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<(Scope, Entry)>, SuppressError> {
        let scopes = core::scopes_for(namespace);
        let mut p = redis::pipe();
        for s in &scopes {
            p.cmd("HGET").arg(self.list(s)).arg(key);
        }
        let mut c = self.conn.clone();
        let found: Vec<Option<Vec<u8>>> = p.query_async(&mut c).await?;
        Ok(scopes.into_iter().zip(found).find_map(|(s, v)| {
            let e: Entry = serde_json::from_slice(&v?).ok()?;
            e.active(now_ms).then_some((s, e))
        }))
    }

    /// What the commit script needs for a message of `namespace` to `rcpts`.
    pub fn screen(&self, namespace: Option<&str>, rcpts: &[String], now_ms: i64) -> Screen {
        let copies = self.snapshot();
        let scopes = core::scopes_for(namespace);
        let keys: Vec<String> = rcpts.iter().map(|r| core::key(r).unwrap_or_default()).collect();
        let force = keys.iter().any(|k| {
            !k.is_empty()
                && scopes
                    .iter()
                    .any(|s| copies.get(s).is_some_and(|c| c.copy.may_contain(core::hash(s, k))))
        });
        Screen {
            scopes: scopes
                .iter()
                .map(|s| {
                    (
                        s.id(),
                        copies.get(s).map(|c| c.copy.generation.clone()).unwrap_or_default(),
                    )
                })
                .collect(),
            force,
            keys,
            now_ms,
        }
    }

    /// Stores `entry` in `scope` (replacing an entry of the same address); returns its key.
    pub async fn put(&self, scope: &Scope, entry: &Entry) -> Result<String, SuppressError> {
        let k = core::key(&entry.address)?;
        self.put_all(scope, std::slice::from_ref(entry)).await?;
        Ok(k)
    }

    /// Stores `entries` in `scope`, each transaction of up to [`IMPORT_CHUNK`] entries bumping
    /// the generation once.
    pub async fn put_all(&self, scope: &Scope, entries: &[Entry]) -> Result<usize, SuppressError> {
        let list = self.list(scope);
        let id = scope.id();
        for chunk in entries.chunks(IMPORT_CHUNK) {
            let mut p = redis::pipe();
            p.atomic();
            for e in chunk {
                let json = serde_json::to_string(e).unwrap_or_default();
                p.cmd("HSET").arg(&list).arg(core::key(&e.address)?).arg(json).ignore();
            }
            p.cmd("HINCRBY").arg(&self.gens).arg(&id).arg(1).ignore();
            let mut c = self.conn.clone();
            p.query_async::<()>(&mut c).await?;
            if let Some(e) = chunk.first() {
                self.metrics
                    .added
                    .with_label_values(&[e.source.kind.as_str()])
                    .inc_by(chunk.len() as u64);
            }
        }
        Ok(entries.len())
    }

    /// Adds `entry` unless its address is listed already (bounces); true if it was added.
    pub async fn add_new(&self, scope: &Scope, entry: &Entry) -> Result<bool, SuppressError> {
        let k = core::key(&entry.address)?;
        let json = serde_json::to_string(entry).unwrap_or_default();
        let mut c = self.conn.clone();
        let n: i64 = self
            .add_new
            .key(self.list(scope))
            .key(&self.gens)
            .arg(scope.id())
            .arg(k)
            .arg(json)
            .invoke_async(&mut c)
            .await?;
        if n == 1 {
            self.metrics
                .added
                .with_label_values(&[entry.source.kind.as_str()])
                .inc();
        }
        Ok(n == 1)
    }

    /// Removes `address` from `scope`; true if it was listed.
    pub async fn remove(&self, scope: &Scope, address: &str) -> Result<bool, SuppressError> {
        let k = core::key(address)?;
        let mut c = self.conn.clone();
        let n: i64 = self
            .remove
            .key(self.list(scope))
            .key(&self.gens)
            .arg(scope.id())
            .arg(k)
            .invoke_async(&mut c)
            .await?;
        Ok(n > 0)
    }

    /// `address`'s entry in `scope`, active or not.
    pub async fn get(&self, scope: &Scope, address: &str) -> Result<Option<Entry>, SuppressError> {
        let k = core::key(address)?;
        let mut c = self.conn.clone();
        let v: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.list(scope))
            .arg(k)
            .query_async(&mut c)
            .await?;
        Ok(v.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// A page of `scope`'s entries (HSCAN order; about `limit` per page).
    pub async fn page(&self, scope: &Scope, cursor: Option<&str>, limit: usize) -> Result<Page, SuppressError> {
        let mut c = self.conn.clone();
        let (next, kv): (String, Vec<(String, Vec<u8>)>) = redis::cmd("HSCAN")
            .arg(self.list(scope))
            .arg(cursor.unwrap_or("0"))
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut c)
            .await?;
        let mut entries: Vec<Entry> = kv
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        entries.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(Page {
            entries,
            cursor: (next != "0").then_some(next),
        })
    }

    /// Every entry of `scope`, sorted by address.
    pub async fn all(&self, scope: &Scope) -> Result<Vec<Entry>, SuppressError> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.page(scope, cursor.as_deref(), SCAN_COUNT).await?;
            out.extend(page.entries);
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(out)
    }

    /// Reads the generations and re-reads each scope whose generation moved or one of whose
    /// entries expired (removing the expired ones from Redis), then updates the gauges. Called by [`Self::run`]; also once at start.
    pub async fn refresh(&self, now_ms: i64) -> Result<(), SuppressError> {
        let mut c = self.conn.clone();
        let gens: HashMap<String, String> = redis::cmd("HGETALL").arg(&self.gens).query_async(&mut c).await?;
        let old = self.snapshot();
        let mut next: HashMap<Scope, Arc<Held>> = HashMap::new();
        let mut changed = false;
        let poll_ms = self.settings.poll.as_millis() as i64;
        for (id, generation) in gens {
            let Some(scope) = Scope::from_id(&id) else { continue };
            if let Some(held) = old
                .get(&scope)
                .filter(|h| !h.copy.reread_due(&generation, now_ms, h.read_at_ms, poll_ms))
            {
                next.insert(scope, held.clone());
                continue;
            }
            // Read the generation first: whatever changes during the scan moves it again, and
            // the next round reads the scope anew.
            let copy = self.load(&scope, generation, now_ms).await?;
            next.insert(
                scope,
                Arc::new(Held {
                    copy,
                    read_at_ms: now_ms,
                }),
            );
            changed = true;
        }
        changed |= next.len() != old.len();
        if changed {
            let gauge = &self.metrics.entries;
            for s in old.keys().filter(|s| !next.contains_key(*s)) {
                let _ = gauge.remove_label_values(&[s.label()]);
            }
            for (s, held) in &next {
                gauge.with_label_values(&[s.label()]).set(held.copy.len() as i64);
            }
            let next = Arc::new(next);
            match self.copies.write() {
                Ok(mut w) => *w = next,
                Err(p) => *p.into_inner() = next,
            }
        }
        Ok(())
    }

    async fn load(&self, scope: &Scope, generation: String, now_ms: i64) -> Result<ScopeCopy, SuppressError> {
        let list = self.list(scope);
        let mut c = self.conn.clone();
        // Sized once: a million entries take 8 MB, not the 16 MB a doubling Vec may reach.
        let len: usize = redis::cmd("HLEN").arg(&list).query_async(&mut c).await?;
        let mut hashes = Vec::with_capacity(len);
        let mut expired = Vec::new();
        let mut next_expiry: Option<i64> = None;
        let mut cursor = "0".to_owned();
        loop {
            let (next, kv): (String, Vec<(String, Vec<u8>)>) = redis::cmd("HSCAN")
                .arg(&list)
                .arg(&cursor)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut c)
                .await?;
            for (k, v) in kv {
                match serde_json::from_slice::<Entry>(&v) {
                    Ok(e) if !e.active(now_ms) => expired.push(k),
                    Ok(e) => {
                        if let Some(t) = e.expires_ms {
                            next_expiry = Some(next_expiry.map_or(t, |n| n.min(t)));
                        }
                        hashes.push(core::hash(scope, &k));
                    }
                    // An entry this relay cannot read still suppresses: the hit is confirmed
                    // against Redis (and the commit script) anyway.
                    Err(_) => hashes.push(core::hash(scope, &k)),
                }
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        for chunk in expired.chunks(IMPORT_CHUNK) {
            let mut inv = self.purge.key(&list);
            inv.key(&self.gens).arg(scope.id()).arg(now_ms);
            for k in chunk {
                inv.arg(k);
            }
            let n: i64 = inv.invoke_async(&mut c).await?;
            if n > 0 {
                tracing::info!(scope = %scope, removed = n, "removed expired suppression entries");
            }
        }
        Ok(ScopeCopy::new(generation, hashes, next_expiry))
    }

    /// The sizes of the copy, by scope.
    pub fn sizes(&self) -> BTreeMap<Scope, usize> {
        self.snapshot().iter().map(|(s, h)| (s.clone(), h.copy.len())).collect()
    }

    /// Refreshes the copy every `settings.poll` until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.refresh(crate::clock::now_ms()).await {
                tracing::warn!(error = %e, "reading the suppression lists failed; keeping the previous copy");
            }
        }
    }

    /// The generation of `scope` this relay's copy holds (`""`: none).
    pub fn generation(&self, scope: &Scope) -> String {
        self.snapshot()
            .get(scope)
            .map(|h| h.copy.generation.clone())
            .unwrap_or_default()
    }
}

/// The scope ids the commit script reports as a suppressed recipient's list, parsed back.
pub fn scope_of_id(id: &str) -> Scope {
    Scope::from_id(id).unwrap_or(Scope::Platform)
}
