//! The pod-IP [`IdentitySource`]: answers from an in-memory copy of the map the leading operator
//! publishes in Redis (contract: `mailroute_api::podmap`). A background poller reads the
//! generation and the heartbeat's remaining TTL (one round trip, about every second) and reloads
//! the hash only when the generation moved; lookups never touch Redis.
//!
//! The copy is trusted only until the heartbeat it last saw would expire: after that (operator
//! gone, its Pod watch broken, or this relay cut off from Redis) every lookup answers `None`,
//! since an IP may have been reused by a pod in another namespace meanwhile. Ambiguous IPs
//! (two live pods) answer `None` too. It owns no decision about unattributed mail.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use mailroute_api::podmap::{Entry, Keys, canonical};
use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};
use redis::RedisResult;
use redis::aio::ConnectionLike;
use tokio::sync::watch;
use tokio::time::Instant;

use super::identity::{IdentitySource, SenderIdentity};

/// The relay's identity-map metrics; no label carries an IP.
#[derive(Clone)]
pub struct PodIdentityMetrics {
    /// Entries of the loaded map (ambiguous ones included).
    entries: IntGauge,
    /// Seconds since this relay last saw the map vouched for by a live heartbeat.
    age: Gauge,
    /// 1 while lookups may attribute, else 0.
    current: IntGauge,
    /// `{result}`: attributed | unattributed.
    lookups: IntCounterVec,
}

impl PodIdentityMetrics {
    /// Registers the metrics (e.g. into the relay's registry); fails on a name already there.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            entries: IntGauge::new(
                "mailroute_pod_identities",
                "Pod IPs in the identity map this relay holds (published by the operator).",
            )?,
            age: Gauge::new(
                "mailroute_pod_identity_map_age_seconds",
                "Seconds since this relay last saw the pod identity map vouched for by the operator's heartbeat.",
            )?,
            current: IntGauge::new(
                "mailroute_pod_identity_map_current",
                "1 while the pod identity map is current and pod IPs are attributed, 0 while every pod IP is unattributed.",
            )?,
            lookups: IntCounterVec::new(
                Opts::new(
                    "mailroute_pod_identity_lookups_total",
                    "Lookups of unauthenticated clients' addresses in the pod identity map, by result (attributed or unattributed).",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(m.entries.clone()))?;
        registry.register(Box::new(m.age.clone()))?;
        registry.register(Box::new(m.current.clone()))?;
        registry.register(Box::new(m.lookups.clone()))?;
        for r in ["attributed", "unattributed"] {
            m.lookups.with_label_values(&[r]);
        }
        Ok(m)
    }
}

/// A loaded generation of the map.
#[derive(Default)]
struct Loaded {
    generation: Option<i64>,
    map: HashMap<IpAddr, Entry>,
}

/// The source sessions ask; shared with its poller.
pub(crate) struct PodIdentities {
    loaded: RwLock<Arc<Loaded>>,
    /// Until when the last seen heartbeat vouches for the map; `None`: not current.
    valid_until: Mutex<Option<Instant>>,
    /// When the map was last seen vouched for (for the age gauge).
    confirmed_at: Mutex<Instant>,
    metrics: Option<PodIdentityMetrics>,
}

impl PodIdentities {
    pub(crate) fn new(metrics: Option<PodIdentityMetrics>) -> Arc<Self> {
        Arc::new(Self {
            loaded: RwLock::new(Arc::new(Loaded::default())),
            valid_until: Mutex::new(None),
            confirmed_at: Mutex::new(Instant::now()),
            metrics,
        })
    }

    fn current(&self) -> bool {
        self.valid_until
            .lock()
            .ok()
            .and_then(|v| *v)
            .is_some_and(|until| Instant::now() < until)
    }

    fn lookup(&self, ip: IpAddr) -> Option<SenderIdentity> {
        if !self.current() {
            return None;
        }
        let loaded = self.loaded.read().ok()?.clone();
        match loaded.map.get(&canonical(ip))? {
            Entry::Pod {
                namespace,
                service_account,
                ..
            } => Some(SenderIdentity {
                namespace: namespace.clone(),
                service_account: Some(service_account.clone()),
            }),
            Entry::Ambiguous { .. } => None,
        }
    }

    /// Entries of the loaded map.
    pub(crate) fn len(&self) -> usize {
        self.loaded.read().map(|l| l.map.len()).unwrap_or(0)
    }

    fn publish_gauges(&self) {
        let Some(m) = &self.metrics else { return };
        m.entries.set(i64::try_from(self.len()).unwrap_or(i64::MAX));
        m.current.set(i64::from(self.current()));
        if let Ok(at) = self.confirmed_at.lock() {
            m.age.set(at.elapsed().as_secs_f64());
        }
    }
}

impl IdentitySource for PodIdentities {
    fn identify(&self, ip: IpAddr) -> Option<SenderIdentity> {
        let found = self.lookup(ip);
        if let Some(m) = &self.metrics {
            let result = if found.is_some() { "attributed" } else { "unattributed" };
            m.lookups.with_label_values(&[result]).inc();
        }
        found
    }
}

/// Keeps a [`PodIdentities`] equal to the Redis map.
pub(crate) struct Poller<C> {
    conn: C,
    keys: Keys,
    source: Arc<PodIdentities>,
}

impl<C: ConnectionLike + Send> Poller<C> {
    pub(crate) fn new(conn: C, prefix: &str, source: Arc<PodIdentities>) -> Self {
        Self {
            conn,
            keys: Keys::new(prefix),
            source,
        }
    }

    /// One poll: generation and heartbeat TTL, and the hash when the generation moved.
    pub(crate) async fn poll(&mut self) -> RedisResult<()> {
        let asked = Instant::now();
        let (generation, ttl_ms): (Option<i64>, i64) = redis::pipe()
            .get(&self.keys.generation)
            .pttl(&self.keys.heartbeat)
            .query_async(&mut self.conn)
            .await?;
        let known = self.source.loaded.read().ok().and_then(|l| l.generation);
        if generation != known {
            // The hash and its generation in one transaction: never a map newer or older than
            // the generation it is recorded under.
            let (fields, generation): (HashMap<String, String>, Option<i64>) = redis::pipe()
                .atomic()
                .hgetall(&self.keys.ips)
                .get(&self.keys.generation)
                .query_async(&mut self.conn)
                .await?;
            let mut map = HashMap::with_capacity(fields.len());
            let mut malformed = 0usize;
            for (ip, value) in fields {
                match (ip.parse::<IpAddr>(), Entry::decode(&value)) {
                    (Ok(ip), Ok(entry)) => {
                        map.insert(canonical(ip), entry);
                    }
                    _ => malformed += 1,
                }
            }
            if malformed > 0 {
                tracing::warn!(
                    malformed,
                    "pod identity map entries this relay cannot read are unattributed"
                );
            }
            tracing::info!(generation = ?generation, entries = map.len(), "pod identity map loaded");
            if let Ok(mut l) = self.source.loaded.write() {
                *l = Arc::new(Loaded { generation, map });
            }
        }
        // PTTL is -2 without a heartbeat, -1 without a TTL (not written by the operator).
        let until = u64::try_from(ttl_ms)
            .ok()
            .filter(|ms| *ms > 0)
            .map(|ms| asked + Duration::from_millis(ms));
        if let Ok(mut v) = self.source.valid_until.lock() {
            *v = until;
        }
        if until.is_some()
            && let Ok(mut at) = self.source.confirmed_at.lock()
        {
            *at = asked;
        }
        self.source.publish_gauges();
        Ok(())
    }

    /// Polls every `every` until shutdown. Errors leave the copy as it is: it stops being
    /// trusted when the last heartbeat seen runs out.
    pub(crate) async fn run(mut self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            match self.poll().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("reading the pod identity map works again");
                }
                Ok(()) => {}
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "reading the pod identity map failed; pod IPs become unattributed when its heartbeat runs out");
                    }
                    failing = true;
                    self.source.publish_gauges();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroute_testkit::redis::RedisServer;
    use redis::aio::ConnectionManager;

    const PREFIX: &str = "{mailroute}:";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod(ns: &str, uid: &str) -> String {
        Entry::Pod {
            namespace: ns.into(),
            service_account: "mailer".into(),
            pod_uid: uid.into(),
        }
        .encode()
    }

    /// What the operator's writer does, by hand: the hash change, the generation bump and the
    /// heartbeat in one transaction.
    async fn publish(c: &mut ConnectionManager, set: &[(&str, String)], del: &[&str], ttl_ms: u64) {
        let keys = Keys::new(PREFIX);
        let mut p = redis::pipe();
        p.atomic();
        if !del.is_empty() {
            p.hdel(&keys.ips, del).ignore();
        }
        if !set.is_empty() {
            p.hset_multiple(&keys.ips, set).ignore();
        }
        p.incr(&keys.generation, 1).ignore();
        p.cmd("SET").arg(&keys.heartbeat).arg(1).arg("PX").arg(ttl_ms).ignore();
        p.query_async::<()>(c).await.unwrap();
    }

    async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn identity(ns: &str) -> Option<SenderIdentity> {
        Some(SenderIdentity {
            namespace: ns.into(),
            service_account: Some("mailer".into()),
        })
    }

    async fn setup() -> (
        RedisServer,
        ConnectionManager,
        Arc<PodIdentities>,
        watch::Sender<bool>,
        Registry,
    ) {
        let server = RedisServer::start().unwrap();
        let client = server.client().unwrap();
        let writer = client.get_connection_manager().await.unwrap();
        let reader = client.get_connection_manager().await.unwrap();
        let registry = Registry::new();
        let source = PodIdentities::new(Some(PodIdentityMetrics::register(&registry).unwrap()));
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(Poller::new(reader, PREFIX, source.clone()).run(Duration::from_millis(200), stopped));
        (server, writer, source, stop, registry)
    }

    fn render(r: &Registry) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&r.gather(), &mut out)
            .unwrap();
        out
    }

    #[tokio::test]
    async fn a_published_ip_is_attributed_within_a_poll_and_lookups_are_counted_without_ips() {
        let (_server, mut w, source, _stop, registry) = setup().await;
        assert_eq!(source.identify(ip("10.0.0.5")), None, "nothing published yet");
        publish(&mut w, &[("10.0.0.5", pod("team-a", "a1"))], &[], 60_000).await;
        wait_until("the published entry", || source.identify(ip("10.0.0.5")).is_some()).await;
        assert_eq!(source.identify(ip("10.0.0.5")), identity("team-a"));
        // A dual-stack listener sees IPv4 clients as mapped IPv6.
        assert_eq!(source.identify(ip("::ffff:10.0.0.5")), identity("team-a"));
        assert_eq!(source.identify(ip("10.0.0.6")), None);
        let text = render(&registry);
        assert!(text.contains("mailroute_pod_identities 1"), "{text}");
        assert!(text.contains("mailroute_pod_identity_map_current 1"), "{text}");
        assert!(
            text.contains("mailroute_pod_identity_lookups_total{result=\"attributed\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("mailroute_pod_identity_lookups_total{result=\"unattributed\"}"),
            "{text}"
        );
        assert!(!text.contains("10.0.0.5"), "an IP in a label:\n{text}");
    }

    #[tokio::test]
    async fn a_stale_heartbeat_makes_every_ip_unattributed_until_it_is_renewed() {
        let (_server, mut w, source, _stop, registry) = setup().await;
        publish(&mut w, &[("10.0.0.5", pod("team-a", "a1"))], &[], 60_000).await;
        wait_until("the published entry", || source.identify(ip("10.0.0.5")).is_some()).await;
        // The operator stops vouching (gone, or its watch broke): the heartbeat runs out.
        let keys = Keys::new(PREFIX);
        let _: () = redis::cmd("PEXPIRE")
            .arg(&keys.heartbeat)
            .arg(300)
            .query_async(&mut w)
            .await
            .unwrap();
        wait_until("the map to go stale", || source.identify(ip("10.0.0.5")).is_none()).await;
        // Still unattributed while the heartbeat stays away, though the entry is held.
        assert_eq!(source.len(), 1);
        // The gauges follow at the next poll.
        wait_until("the current gauge to say 0", || {
            render(&registry).contains("mailroute_pod_identity_map_current 0")
        })
        .await;
        // The heartbeat is back without any change of the map.
        let _: () = redis::cmd("SET")
            .arg(&keys.heartbeat)
            .arg(1)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut w)
            .await
            .unwrap();
        wait_until("the map to be current again", || {
            source.identify(ip("10.0.0.5")).is_some()
        })
        .await;
    }

    #[tokio::test]
    async fn a_relay_cut_off_from_redis_stops_attributing_when_the_heartbeat_it_saw_runs_out() {
        let (mut server, mut w, source, _stop, _registry) = setup().await;
        publish(&mut w, &[("10.0.0.5", pod("team-a", "a1"))], &[], 1_500).await;
        wait_until("the published entry", || source.identify(ip("10.0.0.5")).is_some()).await;
        server.kill();
        wait_until("the map to go stale", || source.identify(ip("10.0.0.5")).is_none()).await;
    }

    #[tokio::test]
    async fn an_ip_moved_to_another_namespace_is_never_attributed_to_the_old_owner_after_the_delete() {
        let (_server, mut w, source, _stop, _registry) = setup().await;
        publish(&mut w, &[("10.0.0.5", pod("team-a", "old"))], &[], 60_000).await;
        wait_until("the first owner", || source.identify(ip("10.0.0.5")).is_some()).await;
        // The old pod's delete is published; once this relay has seen it, team-a is never
        // answered again, before or after the new pod in team-b gets the same IP.
        publish(&mut w, &[], &["10.0.0.5"], 60_000).await;
        wait_until("the delete", || source.identify(ip("10.0.0.5")).is_none()).await;
        publish(&mut w, &[("10.0.0.5", pod("team-b", "new"))], &[], 60_000).await;
        let mut answers = Vec::new();
        wait_until("the new owner", || {
            let a = source.identify(ip("10.0.0.5"));
            answers.push(a.clone());
            a == identity("team-b")
        })
        .await;
        assert!(
            answers.iter().all(|a| a.is_none() || *a == identity("team-b")),
            "{answers:?}"
        );
        for _ in 0..20 {
            assert_eq!(source.identify(ip("10.0.0.5")), identity("team-b"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Ambiguous (two live pods) is unattributed.
        publish(
            &mut w,
            &[("10.0.0.5", Entry::Ambiguous { pods: 2 }.encode())],
            &[],
            60_000,
        )
        .await;
        wait_until("the ambiguous entry", || source.identify(ip("10.0.0.5")).is_none()).await;
    }
}
