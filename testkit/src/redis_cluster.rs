//! Redis Cluster launcher: owns N real `redis-server` processes in cluster mode on 127.0.0.1
//! (primaries, optionally with replicas), joined by `redis-cli --cluster create`. It waits until
//! every node reports the cluster healthy and every replica is in sync; it does not reshard.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use crate::redis::{RedisServer, free_port};

const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// A running cluster; every node is killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `primaries` primaries (at least 3, as `redis-cli --cluster create` wants), each
    /// with `replicas` replicas, and returns once the cluster is healthy.
    pub fn start(primaries: usize, replicas: usize) -> anyhow::Result<Self> {
        let total = primaries * (1 + replicas);
        let mut nodes = Vec::with_capacity(total);
        for _ in 0..total {
            nodes.push(
                RedisServer::builder()
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", "nodes.conf"])
                    .args(["--cluster-node-timeout", "2000"])
                    // The bus port defaults to port + 10000, which may be taken or out of range.
                    .args(["--cluster-port".to_owned(), free_port()?.to_string()])
                    .start()?,
            );
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        create
            .args(["--cluster-replicas", &replicas.to_string()])
            .arg("--cluster-yes");
        let out = create
            .output()
            .context("running redis-cli --cluster create (redis-cli comes with redis-server)")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_healthy(primaries, replicas)?;
        Ok(cluster)
    }

    fn wait_healthy(&self, primaries: usize, replicas: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let Err(e) = self.health(primaries, replicas) else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                bail!("the cluster did not become healthy within {DEADLINE:?}: {e}");
            }
            std::thread::sleep(POLL);
        }
    }

    fn health(&self, primaries: usize, replicas: usize) -> anyhow::Result<()> {
        let mut synced_primaries = 0;
        for n in &self.nodes {
            let mut c = n.client()?.get_connection_with_timeout(Duration::from_secs(1))?;
            let info: String = ::redis::cmd("CLUSTER").arg("INFO").query(&mut c)?;
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_owned()))
                    .unwrap_or_default()
            };
            if field("cluster_state:") != "ok" || field("cluster_known_nodes:") != self.nodes.len().to_string() {
                bail!("node {}: {}", n.port(), info.replace("\r\n", " "));
            }
            let repl: String = ::redis::cmd("INFO").arg("replication").query(&mut c)?;
            if repl.contains("role:master") {
                let online = repl
                    .lines()
                    .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                    .count();
                if online >= replicas {
                    synced_primaries += 1;
                }
            } else if !repl.contains("master_link_status:up") {
                bail!("replica {} not in sync yet", n.port());
            }
        }
        if synced_primaries < primaries {
            bail!("{synced_primaries} of {primaries} primaries have their replicas online");
        }
        Ok(())
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The primary that serves `key`'s hash slot.
    pub fn primary_for(&self, key: &str) -> anyhow::Result<&RedisServer> {
        let first = self.nodes.first().ok_or_else(|| anyhow!("empty cluster"))?;
        let mut c = first.client()?.get_connection_with_timeout(Duration::from_secs(1))?;
        let slot: u16 = ::redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut c)?;
        for n in &self.nodes {
            let mut c = n.client()?.get_connection_with_timeout(Duration::from_secs(1))?;
            let table: String = ::redis::cmd("CLUSTER").arg("NODES").query(&mut c)?;
            let Some(me) = table.lines().find(|l| l.contains("myself")) else {
                continue;
            };
            let fields: Vec<&str> = me.split_whitespace().collect();
            if !fields.get(2).is_some_and(|f| f.contains("master")) {
                continue;
            }
            let serves = fields.iter().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if serves {
                return Ok(n);
            }
        }
        bail!("no primary serves slot {slot}")
    }
}
