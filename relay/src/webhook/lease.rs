//! A lease in Redis: one holder at a time for a key, taken over when its holder stops renewing
//! (a killed relay) after the lease's time-to-live. Scripts that must only run for the holder
//! check the token themselves (fencing), so a holder that lost its lease while paused changes
//! nothing. Only the lease; what it guards is the caller's.

use std::time::Duration;

use redis::aio::ConnectionLike;

/// Takes the lease when free, renews it when ours: 1 when held afterwards, else 0.
const ACQUIRE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Gives the lease up if ours.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

pub(crate) struct Lease {
    key: String,
    token: String,
    ttl: Duration,
    acquire: redis::Script,
    release: redis::Script,
}

impl Lease {
    pub(crate) fn new(key: String, token: String, ttl: Duration) -> Self {
        Lease {
            key,
            token,
            ttl,
            acquire: redis::Script::new(ACQUIRE),
            release: redis::Script::new(RELEASE),
        }
    }

    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// Takes or renews the lease; whether this process holds it now.
    pub(crate) async fn hold<C: ConnectionLike + Send>(&self, conn: &mut C) -> redis::RedisResult<bool> {
        let n: i64 = self
            .acquire
            .key(&self.key)
            .arg(&self.token)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(conn)
            .await?;
        Ok(n == 1)
    }

    pub(crate) async fn release<C: ConnectionLike + Send>(&self, conn: &mut C) {
        let r: redis::RedisResult<i64> = self.release.key(&self.key).arg(&self.token).invoke_async(conn).await;
        if let Err(e) = r {
            tracing::debug!(error = %e, key = %self.key, "releasing a webhook lease");
        }
    }
}
