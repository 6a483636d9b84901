//! The token cache every relay shares through Redis: one access token per route, user and grant
//! (keyed also by the grant's fingerprint, so changed credentials get a token of their own), kept
//! with its expiry and dropped by Redis when it expires.
//!
//! Refreshing: a token with less than `refresh_ahead` left is replaced by one holder at a time,
//! the one that takes the lock (`SET NX PX`, released by compare-and-delete, expiring by itself
//! should the holder die). The others keep using the current token while it has more than
//! `min_valid` left, or wait for the holder's token: 50 relays starting at once make one token
//! request. A failed request leaves the provider's error for `error_ttl`, which the waiters and the
//! callers in that window get instead of asking again.
//!
//! `invalidate` is for an upstream's 535 to a token that should still be valid: it drops the
//! token only if it is still the one that failed, so many relays failing on it cause one refresh.
//!
//! Rotated refresh tokens are kept here, in Redis, not in the Kubernetes Secret (the relays cannot
//! write Secrets, and must not need to): stored with a hash of the Secret's refresh token they
//! descend from, they are used only while the Secret still holds that one, so a refresh token put
//! in the Secret again (a new consent) wins. Tokens in Redis are as protected as the mail in the
//! queue beside them; none of them is ever logged.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager};
use serde::{Deserialize, Serialize};

use crate::grant::{Grant, OAuthError, Token, refresh_ahead};
use crate::http::{TokenClient, unix_now};
use crate::secret::SecretString;

/// Whose token: the route (`namespace/name`) and the SMTP user it authenticates as.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub route: String,
    pub user: String,
}

/// Timing of the cache.
#[derive(Clone, Copy, Debug)]
pub struct CacheSettings {
    /// Fetch the next token when the current one has less than this left.
    pub refresh_ahead: Duration,
    /// A token with less than this left is not handed out (a delivery takes time).
    pub min_valid: Duration,
    /// How long the refresh lock lives when its holder dies; longer than a token request.
    pub lock_ttl: Duration,
    /// How long a caller waits for another holder's token.
    pub wait: Duration,
    /// How often a waiting caller looks again.
    pub poll: Duration,
    /// How long a failed request's error is handed out instead of asking again.
    pub error_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            refresh_ahead: Duration::from_secs(300),
            min_valid: Duration::from_secs(30),
            lock_ttl: Duration::from_secs(40),
            wait: Duration::from_secs(45),
            poll: Duration::from_millis(50),
            error_ttl: Duration::from_secs(10),
        }
    }
}

/// The shared cache, over any Redis connection (a single server's or a cluster's: a route and
/// user's keys share one hash slot). Cheap to clone.
#[derive(Clone)]
pub struct TokenCache<C = ConnectionManager> {
    redis: C,
    prefix: String,
    client: TokenClient,
    settings: CacheSettings,
}

impl<C> std::fmt::Debug for TokenCache<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("prefix", &self.prefix)
            .field("settings", &self.settings)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct StoredToken {
    access_token: String,
    issued_at: u64,
    expires_at: u64,
}

impl StoredToken {
    fn token(&self) -> SecretString {
        SecretString::new(self.access_token.clone())
    }

    fn remaining(&self, now: u64) -> u64 {
        self.expires_at.saturating_sub(now)
    }

    fn needs_refresh(&self, now: u64, ahead: Duration) -> bool {
        self.remaining(now) < refresh_ahead(self.issued_at, self.expires_at, ahead.as_secs())
    }
}

#[derive(Serialize, Deserialize)]
struct StoredRefresh {
    origin: String,
    refresh_token: String,
}

/// A failed request, shared with the waiters: only what the error's `Display` shows.
#[derive(Serialize, Deserialize)]
enum StoredError {
    Provider {
        status: u16,
        error: String,
        description: Option<String>,
    },
    Other(String),
}

const UNLOCK: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
const DROP_IF_SAME: &str = r"local v = redis.call('GET', KEYS[1])
if v then
  local ok, t = pcall(cjson.decode, v)
  if ok and t.access_token == ARGV[1] then return redis.call('DEL', KEYS[1]) end
end
return 0";

struct Keys {
    token: String,
    lock: String,
    error: String,
    refresh: String,
}

fn redis_err(e: redis::RedisError) -> OAuthError {
    OAuthError::Cache(e.to_string())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl<C: ConnectionLike + Clone + Send + Sync> TokenCache<C> {
    /// `prefix` is the relay's Redis key prefix (`mailroute:`).
    pub fn new(redis: C, prefix: impl Into<String>, client: TokenClient, settings: CacheSettings) -> Self {
        Self {
            redis,
            prefix: prefix.into(),
            client,
            settings,
        }
    }

    /// The Redis key of the token of `key` and `grant` (JSON: `access_token`, `issued_at`,
    /// `expires_at` in Unix seconds), for inspection and tests.
    pub fn token_key_name(&self, key: &TokenKey, grant: &Grant) -> String {
        self.keys(key, grant).token
    }

    fn keys(&self, key: &TokenKey, grant: &Grant) -> Keys {
        // `{route|user}` is the hash tag: one slot for all of them in a cluster.
        let slot = format!("{}oauth:{{{}|{}}}", self.prefix, key.route, key.user);
        let base = format!("{slot}:{}", grant.fingerprint());
        Keys {
            token: format!("{base}:token"),
            lock: format!("{base}:lock"),
            error: format!("{base}:error"),
            refresh: format!("{slot}:refresh"),
        }
    }

    /// A token for `key` with at least `min_valid` left, from the cache or, by one holder at a
    /// time, from the token endpoint.
    pub async fn token(&self, key: &TokenKey, grant: &Grant) -> Result<SecretString, OAuthError> {
        let keys = self.keys(key, grant);
        let s = self.settings;
        let deadline = Instant::now() + s.wait;
        let nonce = uuid::Uuid::new_v4().to_string();
        loop {
            let cached = self.read_token(&keys).await?;
            let now = unix_now();
            if let Some(t) = &cached
                && !t.needs_refresh(now, s.refresh_ahead)
            {
                return Ok(t.token());
            }
            let usable = cached.filter(|t| t.remaining(now) > s.min_valid.as_secs());
            if let Some(e) = self.read_error(&keys).await? {
                return usable.map(|t| t.token()).ok_or(e);
            }
            if self.try_lock(&keys, &nonce).await? {
                let result = self.refresh_locked(&keys, grant).await;
                self.unlock(&keys, &nonce).await;
                return match result {
                    Ok(token) => Ok(token),
                    // The next one failed, the current one still serves.
                    Err(e) => usable.map(|t| t.token()).ok_or(e),
                };
            }
            if let Some(t) = usable {
                return Ok(t.token());
            }
            if Instant::now() >= deadline {
                return Err(OAuthError::Cache(format!(
                    "no token within {:?}: another relay holds the refresh lock",
                    s.wait
                )));
            }
            tokio::time::sleep(s.poll).await;
        }
    }

    /// Drops the cached token if it is still `stale` (an upstream refused it with 535 while it
    /// should have been valid); the next `token` fetches a new one. Whether it was dropped.
    pub async fn invalidate(&self, key: &TokenKey, grant: &Grant, stale: &SecretString) -> Result<bool, OAuthError> {
        let keys = self.keys(key, grant);
        let dropped: i64 = redis::Script::new(DROP_IF_SAME)
            .key(&keys.token)
            .arg(stale.expose())
            .invoke_async(&mut self.redis.clone())
            .await
            .map_err(redis_err)?;
        Ok(dropped == 1)
    }

    /// With the lock held: the token again (another holder may have just stored one), else a new
    /// one from the endpoint, stored with the rotated refresh token; a failure is stored too.
    async fn refresh_locked(&self, keys: &Keys, grant: &Grant) -> Result<SecretString, OAuthError> {
        if let Some(t) = self.read_token(keys).await?
            && !t.needs_refresh(unix_now(), self.settings.refresh_ahead)
        {
            return Ok(t.token());
        }
        let rotated = self.read_refresh(keys, grant).await?;
        match self.client.fetch(grant, rotated.as_ref()).await {
            Ok(token) => {
                self.store(keys, grant, &token).await?;
                Ok(token.access_token)
            }
            Err(e) => {
                self.store_error(keys, &e).await?;
                Err(e)
            }
        }
    }

    async fn read_token(&self, keys: &Keys) -> Result<Option<StoredToken>, OAuthError> {
        let raw: Option<String> = redis::cmd("GET")
            .arg(&keys.token)
            .query_async(&mut self.redis.clone())
            .await
            .map_err(redis_err)?;
        Ok(raw.and_then(|r| serde_json::from_str::<StoredToken>(&r).ok()))
    }

    async fn read_error(&self, keys: &Keys) -> Result<Option<OAuthError>, OAuthError> {
        let raw: Option<String> = redis::cmd("GET")
            .arg(&keys.error)
            .query_async(&mut self.redis.clone())
            .await
            .map_err(redis_err)?;
        Ok(raw
            .and_then(|r| serde_json::from_str::<StoredError>(&r).ok())
            .map(|e| match e {
                StoredError::Provider {
                    status,
                    error,
                    description,
                } => OAuthError::Provider {
                    status,
                    error,
                    description,
                },
                StoredError::Other(m) => OAuthError::Cache(m),
            }))
    }

    /// The rotated refresh token, if it descends from the one in the grant.
    async fn read_refresh(&self, keys: &Keys, grant: &Grant) -> Result<Option<SecretString>, OAuthError> {
        let Some(origin) = grant.refresh_origin() else {
            return Ok(None);
        };
        let raw: Option<String> = redis::cmd("GET")
            .arg(&keys.refresh)
            .query_async(&mut self.redis.clone())
            .await
            .map_err(redis_err)?;
        Ok(raw
            .and_then(|r| serde_json::from_str::<StoredRefresh>(&r).ok())
            .filter(|r| r.origin == origin)
            .map(|r| SecretString::new(r.refresh_token)))
    }

    async fn store(&self, keys: &Keys, grant: &Grant, token: &Token) -> Result<(), OAuthError> {
        let now = unix_now();
        let ttl = Duration::from_secs(token.remaining(now));
        let value = serde_json::to_string(&StoredToken {
            access_token: token.access_token.expose().to_string(),
            issued_at: now,
            expires_at: token.expires_at,
        })
        .map_err(|e| OAuthError::Cache(e.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&keys.token)
            .arg(value)
            .arg("PX")
            .arg(millis(ttl))
            .ignore();
        pipe.cmd("DEL").arg(&keys.error).ignore();
        if let (Some(origin), Some(rotated)) = (grant.refresh_origin(), &token.refresh_token) {
            let value = serde_json::to_string(&StoredRefresh {
                origin,
                refresh_token: rotated.expose().to_string(),
            })
            .map_err(|e| OAuthError::Cache(e.to_string()))?;
            pipe.cmd("SET").arg(&keys.refresh).arg(value).ignore();
        }
        pipe.query_async::<()>(&mut self.redis.clone()).await.map_err(redis_err)
    }

    async fn store_error(&self, keys: &Keys, e: &OAuthError) -> Result<(), OAuthError> {
        let stored = match e {
            OAuthError::Provider {
                status,
                error,
                description,
            } => StoredError::Provider {
                status: *status,
                error: error.clone(),
                description: description.clone(),
            },
            other => StoredError::Other(other.to_string()),
        };
        let value = serde_json::to_string(&stored).map_err(|e| OAuthError::Cache(e.to_string()))?;
        redis::cmd("SET")
            .arg(&keys.error)
            .arg(value)
            .arg("PX")
            .arg(millis(self.settings.error_ttl))
            .query_async::<()>(&mut self.redis.clone())
            .await
            .map_err(redis_err)
    }

    async fn try_lock(&self, keys: &Keys, nonce: &str) -> Result<bool, OAuthError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(&keys.lock)
            .arg(nonce)
            .arg("NX")
            .arg("PX")
            .arg(millis(self.settings.lock_ttl))
            .query_async(&mut self.redis.clone())
            .await
            .map_err(redis_err)?;
        Ok(set.is_some())
    }

    /// Best effort: a lock left behind expires by itself.
    async fn unlock(&self, keys: &Keys, nonce: &str) {
        let r: Result<i64, _> = redis::Script::new(UNLOCK)
            .key(&keys.lock)
            .arg(nonce)
            .invoke_async(&mut self.redis.clone())
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "releasing the token refresh lock failed; it expires by itself");
        }
    }
}
