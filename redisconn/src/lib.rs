//! Connections to the relays' Redis for every Redis-backed store (the relay's queue, quotas,
//! pacing, delivery log, suppression list, webhooks; the operator's pod identity map and webhook
//! health reader): one server (`redis://`, `rediss://`) or a Redis Cluster
//! (`redis+cluster://h1:p1,h2:p2`, `rediss+cluster://…`, any node of the cluster as a seed).
//! Owns the URL syntax and the one connection type they share; it knows nothing of their keys or
//! scripts.
//!
//! On a cluster, every command and MULTI/EXEC pipeline is routed by its keys; the stores keep all
//! their keys under one hash tag, so each of their transactions and scripts stays on one slot.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// Where the Redis data lives, parsed from the queue URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One server (with or without replicas): the URL as given.
    Single(String),
    /// A Redis Cluster: one `redis://` or `rediss://` URL per seed node.
    Cluster(Vec<String>),
}

impl Target {
    /// Parses `redis://…`, `rediss://…`, `unix://…` (single) or `redis+cluster://[user:pass@]h1:p1,h2:p2[/…]`
    /// and `rediss+cluster://…` (cluster seeds; credentials and anything after the host list
    /// apply to every seed).
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(TargetError(format!("{} is not a Redis URL", redact(url))));
        };
        let node_scheme = match scheme {
            "redis" | "rediss" | "unix" | "redis+unix" => return Target::Single(url.to_owned()).checked(),
            "redis+cluster" => "redis",
            "rediss+cluster" => "rediss",
            other => {
                return Err(TargetError(format!(
                    "unknown Redis URL scheme {other:?} (redis, rediss, redis+cluster, rediss+cluster)"
                )));
            }
        };
        let (userinfo, hosts_and_rest) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let split = hosts_and_rest.find(['/', '?', '#']).unwrap_or(hosts_and_rest.len());
        let (hosts, suffix) = hosts_and_rest.split_at(split);
        let nodes: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| match userinfo {
                Some(u) => format!("{node_scheme}://{u}@{h}{suffix}"),
                None => format!("{node_scheme}://{h}{suffix}"),
            })
            .collect();
        if nodes.is_empty() {
            return Err(TargetError(format!("{} names no cluster node", redact(url))));
        }
        Target::Cluster(nodes).checked()
    }

    /// Itself if the client library accepts every node URL (port, database, options).
    fn checked(self) -> Result<Target, TargetError> {
        let (nodes, what) = match &self {
            Target::Single(u) => (std::slice::from_ref(u), "server"),
            Target::Cluster(n) => (n.as_slice(), "cluster seed"),
        };
        for node in nodes {
            if let Err(e) = redis::IntoConnectionInfo::into_connection_info(node.as_str()) {
                return Err(TargetError(format!("{what} {} not usable: {e}", redact(node))));
            }
        }
        Ok(self)
    }
}

/// A queue URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TargetError(String);

impl From<TargetError> for RedisError {
    fn from(e: TargetError) -> Self {
        RedisError::from((redis::ErrorKind::InvalidClientConfig, "bad Redis URL", e.0))
    }
}

/// A URL for logs: the password (and user) replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, hosts))) => format!("{scheme}://***@{hosts}"),
        _ => url.to_owned(),
    }
}

/// How long a connection may take to open and a reply to arrive.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(10),
        }
    }
}

/// A reconnecting connection to a server or a cluster; cheap to clone (clones share it).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Parses `url` (see [`Target::parse`]) and opens a connection to it.
    pub async fn open(url: &str, timeouts: Timeouts) -> RedisResult<RedisConn> {
        Self::connect(&Target::parse(url)?, timeouts).await
    }

    /// Opens a new connection (callers that block, such as `XREADGROUP BLOCK`, open their own).
    pub async fn connect(target: &Target, timeouts: Timeouts) -> RedisResult<RedisConn> {
        match target {
            Target::Single(url) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeouts.response))
                    .set_connection_timeout(Some(timeouts.connect))
                    .set_number_of_retries(3);
                let conn = redis::Client::open(url.as_str())?
                    .get_connection_manager_with_config(cfg)
                    .await?;
                Ok(RedisConn::Single(conn))
            }
            Target::Cluster(nodes) => {
                let conn = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(timeouts.connect)
                    .response_timeout(timeouts.response)
                    .retries(3)
                    .build()?
                    .get_async_connection()
                    .await?;
                Ok(RedisConn::Cluster(conn))
            }
        }
    }

    /// `WAIT replicas timeout` on the primary that holds `key`, over the connection that wrote
    /// it (a cluster client would otherwise ask every primary and report the smallest count).
    pub async fn wait_replicas(&mut self, key: &str, replicas: u32, timeout: Duration) -> RedisResult<i64> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis() as u64);
        let v = match self {
            RedisConn::Single(c) => cmd.query_async::<Value>(c).await?,
            RedisConn::Cluster(c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                c.route_command(cmd, routing).await?
            }
        };
        redis::from_redis_value(v).map_err(RedisError::from)
    }
}

impl From<ConnectionManager> for RedisConn {
    fn from(c: ConnectionManager) -> Self {
        RedisConn::Single(c)
    }
}

impl From<ClusterConnection> for RedisConn {
    fn from(c: ClusterConnection) -> Self {
        RedisConn::Cluster(c)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_urls_pass_through() {
        for u in [
            "redis://127.0.0.1:6379",
            "rediss://:pw@redis:6380/0",
            "unix:///run/redis.sock",
        ] {
            assert_eq!(Target::parse(u).ok(), Some(Target::Single(u.to_owned())));
        }
    }

    #[test]
    fn cluster_urls_give_one_url_per_seed_with_shared_credentials_and_suffix() {
        assert_eq!(
            Target::parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").ok(),
            Some(Target::Cluster(vec![
                "redis://127.0.0.1:7000".into(),
                "redis://127.0.0.1:7001".into()
            ]))
        );
        assert_eq!(
            Target::parse("rediss+cluster://app:s3cr@t@a:6379,b:6379/#insecure").ok(),
            Some(Target::Cluster(vec![
                "rediss://app:s3cr@t@a:6379/#insecure".into(),
                "rediss://app:s3cr@t@b:6379/#insecure".into()
            ]))
        );
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_passwords() {
        let e = Target::parse("redis+cluster://user:hunter2@").unwrap_err().to_string();
        assert!(e.contains("names no cluster node") && !e.contains("hunter2"), "{e}");
        let e = Target::parse("memcached://x").unwrap_err().to_string();
        assert!(e.contains("unknown Redis URL scheme"), "{e}");
        assert!(Target::parse("localhost:6379").is_err());
        let e = Target::parse("redis+cluster://u:hunter2@a:1,b:port")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cluster seed redis://***@b:port not usable") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn redact_hides_userinfo() {
        assert_eq!(redact("rediss://:pw@redis:6380"), "rediss://***@redis:6380");
        assert_eq!(redact("redis+cluster://u:p@a:1,b:2"), "redis+cluster://***@a:1,b:2");
        assert_eq!(redact("redis://redis:6379"), "redis://redis:6379");
    }
}
