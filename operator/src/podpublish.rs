//! Publishes the pod-IP identity map ([`crate::podmap`]) into the relays' Redis: a Pod watch per
//! served namespace (or one over all), and, while this replica leads, a writer that keeps the
//! Redis map equal to what the watch shows (contract: `mailroute_api::podmap`).
//!
//! On becoming leader (and after any Redis error) the writer replaces the whole hash (staged
//! under a key of its own, then RENAMEd, with the generation bump in the same transaction);
//! after that it writes diffs, each in one transaction with its generation bump. The heartbeat
//! is refreshed every interval only while every Pod watch holds a complete list: a watch that
//! failed is restarted with a fresh list, and until then the heartbeat is withdrawn, so relays
//! treat every pod IP as unattributed rather than trust a map that may miss a change.
//! It owns no decision about what an IP means (that is `podmap`), and never reads the map back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use mailroute_api::podmap::{Keys, heartbeat_ttl};
use mailroute_redis::{RedisConn, Timeouts, redact};
use redis::aio::ConnectionLike;
use redis::{Pipeline, RedisResult};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::podmap::{self, IdentityMap, PodFacts};

/// Settings of the publisher.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Redis URL of the relays (`redis://`, `rediss://`, `redis+cluster://h1:p1,h2:p2`).
    pub redis_url: String,
    /// The relays' key prefix (with its hash tag).
    pub prefix: String,
    /// Namespaces whose Pods are published; empty means all.
    pub namespaces: Vec<String>,
    /// Heartbeat period; the map counts as current for three of them.
    pub interval: Duration,
    /// This replica's identity (names its staging key).
    pub identity: String,
}

/// What the Pod watches have seen, per watch.
#[derive(Default)]
struct WatchState {
    pods: HashMap<String, PodFacts>,
    /// Pods of a list in progress; they replace `pods` when it completes.
    relist: Option<HashMap<String, PodFacts>>,
    synced: bool,
}

impl WatchState {
    fn apply(&mut self, event: Event<Pod>) {
        match event {
            // A (re)list means the watch lost continuity: not current until the list completes.
            Event::Init => {
                self.relist = Some(HashMap::new());
                self.synced = false;
            }
            Event::InitApply(p) => {
                if let (Some(r), Some(f)) = (self.relist.as_mut(), podmap::facts(&p)) {
                    r.insert(f.uid.clone(), f);
                }
            }
            Event::InitDone => {
                self.pods = self.relist.take().unwrap_or_default();
                self.synced = true;
            }
            Event::Apply(p) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                match podmap::facts(&p) {
                    Some(f) => {
                        self.pods.insert(uid, f);
                    }
                    None => {
                        self.pods.remove(&uid);
                    }
                }
            }
            Event::Delete(p) => {
                self.pods.remove(&p.metadata.uid.clone().unwrap_or_default());
            }
        }
    }
}

/// Every watch's state, shared by the watch tasks and the writer.
#[derive(Clone)]
struct Pods {
    watches: Arc<Mutex<Vec<WatchState>>>,
    changed: Arc<Notify>,
}

impl Pods {
    fn update(&self, i: usize, f: impl FnOnce(&mut WatchState)) {
        if let Ok(mut w) = self.watches.lock() {
            f(&mut w[i]);
        }
        self.changed.notify_one();
    }

    /// The map at `now` when every watch holds a complete list, and when it next changes by
    /// itself (a grace period ending).
    fn compute(&self, now: Timestamp) -> Option<(IdentityMap, Option<Timestamp>)> {
        let w = self.watches.lock().ok()?;
        if !w.iter().all(|s| s.synced) {
            return None;
        }
        let all = w.iter().flat_map(|s| s.pods.values());
        Some((podmap::identity_map(all.clone(), now), podmap::next_expiry(all, now)))
    }
}

/// Watches one Api until shutdown; a failed watch is dropped (its state unsynced) and started
/// again with a fresh list, so a missed event can never survive in the map.
async fn watch_pods(api: Api<Pod>, i: usize, pods: Pods, mut shutdown: watch::Receiver<bool>) {
    let mut delay = Duration::from_secs(1);
    loop {
        let mut stream = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match next {
                Some(Ok(e)) => {
                    if matches!(e, Event::InitDone) {
                        delay = Duration::from_secs(1);
                    }
                    pods.update(i, |s| s.apply(e));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "Pod watch failed; pod IPs are unattributed until it lists again");
                    break;
                }
                None => break,
            }
        }
        pods.update(i, |s| {
            s.synced = false;
            s.relist = None;
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Opens the relays' Redis (their URL syntax: one server or a cluster), with the operator's
/// shorter timeouts: its writes are small and a stuck one is retried by the loop that made it.
pub async fn open_redis(url: &str) -> RedisResult<RedisConn> {
    let t = Timeouts {
        connect: Duration::from_secs(5),
        response: Duration::from_secs(5),
    };
    RedisConn::open(url, t).await
}

/// Writes the map into Redis (one writer at a time: the leader).
pub struct Writer<C> {
    conn: C,
    keys: Keys,
    staging: String,
    ttl: Duration,
}

/// Fields per HSET of a full replacement.
const CHUNK: usize = 500;

impl<C: ConnectionLike + Send> Writer<C> {
    pub fn new(conn: C, prefix: &str, identity: &str, interval: Duration) -> Self {
        let keys = Keys::new(prefix);
        Self {
            staging: format!("{}:{identity}", keys.staging),
            keys,
            conn,
            ttl: heartbeat_ttl(interval),
        }
    }

    fn heartbeat(&self, p: &mut Pipeline) {
        let ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        p.cmd("SET")
            .arg(&self.keys.heartbeat)
            .arg(Timestamp::now().as_millisecond())
            .arg("PX")
            .arg(ms)
            .ignore();
    }

    /// Replaces the whole map, sets a new generation and refreshes the heartbeat; returns the
    /// new generation.
    pub async fn replace(&mut self, map: &IdentityMap) -> RedisResult<i64> {
        let mut stage = redis::pipe();
        stage.del(&self.staging).ignore();
        let fields: Vec<(String, String)> = map.iter().map(|(k, v)| (k.clone(), v.encode())).collect();
        for chunk in fields.chunks(CHUNK) {
            stage.hset_multiple(&self.staging, chunk).ignore();
        }
        stage.query_async::<()>(&mut self.conn).await?;
        let mut tx = redis::pipe();
        tx.atomic();
        if map.is_empty() {
            tx.del(&self.keys.ips).ignore();
        } else {
            tx.rename(&self.staging, &self.keys.ips).ignore();
        }
        // A fresh generation, not an increment: after Redis lost its data a count from zero
        // could repeat the generation a relay holds and keep it on its old map.
        let generation = Timestamp::now().as_millisecond().saturating_mul(1000);
        tx.set(&self.keys.generation, generation).ignore();
        self.heartbeat(&mut tx);
        tx.query_async::<()>(&mut self.conn).await?;
        Ok(generation)
    }

    /// Applies the change from `old` to `new` in one transaction with the generation bump.
    pub async fn update(&mut self, old: &IdentityMap, new: &IdentityMap) -> RedisResult<i64> {
        let (set, delete) = podmap::diff(old, new);
        let mut tx = redis::pipe();
        tx.atomic();
        if !delete.is_empty() {
            tx.hdel(&self.keys.ips, delete).ignore();
        }
        let set: Vec<(String, String)> = set.into_iter().map(|(k, v)| (k, v.encode())).collect();
        if !set.is_empty() {
            tx.hset_multiple(&self.keys.ips, &set).ignore();
        }
        tx.incr(&self.keys.generation, 1);
        self.heartbeat(&mut tx);
        let (generation,): (i64,) = tx.query_async(&mut self.conn).await?;
        Ok(generation)
    }

    /// Vouches for the map for another TTL.
    pub async fn refresh(&mut self) -> RedisResult<()> {
        let mut p = redis::pipe();
        self.heartbeat(&mut p);
        p.query_async::<()>(&mut self.conn).await
    }

    /// Stops vouching at once: relays treat every pod IP as unattributed.
    pub async fn withdraw(&mut self) -> RedisResult<()> {
        redis::cmd("DEL")
            .arg(&self.keys.heartbeat)
            .query_async::<()>(&mut self.conn)
            .await
    }
}

/// Runs until `shutdown`: watches Pods always (a follower stays warm), writes while leading.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let apis: Vec<Api<Pod>> = if settings.namespaces.is_empty() {
        vec![Api::all(client)]
    } else {
        settings
            .namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let pods = Pods {
        watches: Arc::new(Mutex::new(apis.iter().map(|_| WatchState::default()).collect())),
        changed: Arc::new(Notify::new()),
    };
    let watch_tasks: Vec<_> = apis
        .into_iter()
        .enumerate()
        .map(|(i, api)| tokio::spawn(watch_pods(api, i, pods.clone(), shutdown.clone())))
        .collect();

    let mut writer: Option<Writer<RedisConn>> = None;
    // What Redis holds as far as this replica knows; None: unknown, replace it all.
    let mut published: Option<IdentityMap> = None;
    let mut vouching = false;
    let mut next_heartbeat = Instant::now();
    let mut wake = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = pods.changed.notified() => {}
            r = leading.changed() => if r.is_err() { break },
            _ = tokio::time::sleep_until(wake) => {}
        }
        wake = Instant::now() + settings.interval;
        if !*leading.borrow() {
            published = None;
            vouching = false;
            metrics.pod_identities.set(0);
            continue;
        }
        if writer.is_none() {
            match open_redis(&settings.redis_url).await {
                Ok(c) => writer = Some(Writer::new(c, &settings.prefix, &settings.identity, settings.interval)),
                Err(e) => {
                    tracing::warn!(error = %e, redis = %redact(&settings.redis_url), "connecting to Redis for the pod identity map failed; retrying");
                    continue;
                }
            }
        }
        let Some(w) = writer.as_mut() else { continue };
        let now = Timestamp::now();
        let Some((map, expiry)) = pods.compute(now) else {
            published = None;
            if vouching {
                vouching = false;
                if let Err(e) = w.withdraw().await {
                    tracing::warn!(error = %e, "withdrawing the pod identity map's heartbeat failed; it expires by itself");
                }
            }
            continue;
        };
        if let Some(t) = expiry {
            // Wake when a grace period ends: that pod's IP goes at once.
            let left = Duration::try_from(t.duration_since(now)).unwrap_or_default();
            wake = wake.min(Instant::now() + left + Duration::from_millis(1));
        }
        let written = match &published {
            Some(old) if *old == map => {
                if vouching && Instant::now() < next_heartbeat {
                    wake = wake.min(next_heartbeat);
                    continue;
                }
                w.refresh().await.map(|()| None)
            }
            Some(old) => w.update(old, &map).await.map(|g| {
                // One per pod start or stop: not worth an info line each.
                tracing::debug!(entries = map.len(), generation = g, "pod identity map updated");
                None
            }),
            None => w.replace(&map).await.map(Some),
        };
        match written {
            Ok(replaced) => {
                if let Some(g) = replaced {
                    tracing::info!(entries = map.len(), generation = g, "pod identity map replaced whole");
                }
                next_heartbeat = Instant::now() + settings.interval;
                vouching = true;
                metrics.pod_identities.set(i64::try_from(map.len()).unwrap_or(i64::MAX));
                published = Some(map);
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing the pod identity map to Redis failed; it is replaced whole on the next attempt");
                published = None;
                vouching = false;
            }
        }
    }
    // Stop vouching at once: nobody maintains the map until the next leader replaces it.
    if vouching
        && let Some(w) = writer.as_mut()
        && let Err(e) = w.withdraw().await
    {
        tracing::warn!(error = %e, "withdrawing the pod identity map's heartbeat failed; it expires by itself");
    }
    for t in watch_tasks {
        t.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(uid: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": uid, "namespace": "team-a", "uid": uid},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIP": ip},
        }))
        .unwrap()
    }

    #[test]
    fn a_relist_replaces_what_the_watch_held_and_the_map_waits_for_every_list() {
        let pods = Pods {
            watches: Arc::new(Mutex::new(vec![WatchState::default(), WatchState::default()])),
            changed: Arc::new(Notify::new()),
        };
        let now = Timestamp::now();
        pods.update(0, |s| s.apply(Event::Init));
        pods.update(0, |s| s.apply(Event::InitApply(running("a", "10.0.0.1"))));
        pods.update(0, |s| s.apply(Event::InitDone));
        assert!(pods.compute(now).is_none(), "the second watch has not listed yet");
        pods.update(1, |s| s.apply(Event::Init));
        pods.update(1, |s| s.apply(Event::InitDone));
        assert_eq!(pods.compute(now).unwrap().0.len(), 1);
        // An update without an IP drops the pod; a new pod arrives.
        pods.update(0, |s| s.apply(Event::Apply(running("b", "10.0.0.2"))));
        let (map, _) = pods.compute(now).unwrap();
        assert_eq!(map.keys().collect::<Vec<_>>(), ["10.0.0.1", "10.0.0.2"]);
        // The watch lost continuity (pod "a" was deleted meanwhile, unseen) and lists again: not
        // current until the new list completes, which replaces everything the watch held.
        pods.update(0, |s| s.apply(Event::Init));
        assert!(pods.compute(now).is_none(), "a list in progress is not complete");
        pods.update(0, |s| s.apply(Event::InitApply(running("b", "10.0.0.2"))));
        assert!(pods.compute(now).is_none(), "a list in progress is not complete");
        pods.update(0, |s| s.apply(Event::InitDone));
        let (map, _) = pods.compute(now).unwrap();
        assert_eq!(map.keys().collect::<Vec<_>>(), ["10.0.0.2"]);
        pods.update(0, |s| s.apply(Event::Delete(running("b", "10.0.0.2"))));
        assert!(pods.compute(now).unwrap().0.is_empty());
    }

    fn owner(ns: &str, uid: &str) -> mailroute_api::podmap::Entry {
        mailroute_api::podmap::Entry::Pod {
            namespace: ns.into(),
            service_account: "default".into(),
            pod_uid: uid.into(),
        }
    }

    #[tokio::test]
    async fn the_writer_replaces_then_updates_the_map_with_a_generation_bump_each_time() {
        let server = mailroute_testkit::redis::RedisServer::start().unwrap();
        let conn = open_redis(&server.url()).await.unwrap();
        let mut check = server
            .client()
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys = Keys::new("{mailroute}:");
        let mut w = Writer::new(conn, "{mailroute}:", "op-1", Duration::from_secs(2));
        let first = IdentityMap::from([
            ("10.0.0.1".to_string(), owner("team-a", "a")),
            ("10.0.0.2".to_string(), owner("team-a", "b")),
        ]);
        let g1 = w.replace(&first).await.unwrap();
        let held_generation: i64 = redis::cmd("GET")
            .arg(&keys.generation)
            .query_async(&mut check)
            .await
            .unwrap();
        assert_eq!(held_generation, g1);
        let held: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&keys.ips)
            .query_async(&mut check)
            .await
            .unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(held["10.0.0.1"], owner("team-a", "a").encode());
        let staged: bool = redis::cmd("EXISTS")
            .arg(format!("{}:op-1", keys.staging))
            .query_async(&mut check)
            .await
            .unwrap();
        assert!(!staged, "the staging key was renamed away");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&keys.heartbeat)
            .query_async(&mut check)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 6000, "heartbeat TTL is three intervals: {ttl}");

        let second = IdentityMap::from([
            ("10.0.0.2".to_string(), owner("team-b", "c")),
            ("10.0.0.3".to_string(), owner("team-a", "d")),
        ]);
        assert_eq!(w.update(&first, &second).await.unwrap(), g1 + 1);
        let held: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&keys.ips)
            .query_async(&mut check)
            .await
            .unwrap();
        let expected: HashMap<String, String> = second.iter().map(|(k, v)| (k.clone(), v.encode())).collect();
        assert_eq!(held, expected);

        // A full replacement (new leader) with nothing to publish empties the hash. Redis lost
        // its data before it: the generation still differs from any a relay may hold.
        let _: () = redis::cmd("FLUSHALL").query_async(&mut check).await.unwrap();
        let g3 = w.replace(&IdentityMap::new()).await.unwrap();
        assert!(g3 != 1 && g3 != g1 && g3 != g1 + 1, "{g3}");
        let n: i64 = redis::cmd("HLEN").arg(&keys.ips).query_async(&mut check).await.unwrap();
        assert_eq!(n, 0);
        w.withdraw().await.unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&keys.heartbeat)
            .query_async(&mut check)
            .await
            .unwrap();
        assert_eq!(ttl, -2, "no heartbeat: relays treat pod IPs as unattributed");
    }
}
