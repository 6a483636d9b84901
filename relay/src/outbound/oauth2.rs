//! XOAUTH2 credentials for routes with `auth.oauth2`: the route's grant (built once from its
//! compiled OAuth2 client, `RelaySecrets::upstream_oauth2`) and an access token from the token
//! cache all relays share through Redis (`mailroute_oauth::TokenCache`: fetched, and refreshed
//! ahead of expiry, by one relay at a time). After an upstream's 535 to a token the cache still
//! holds as valid, [`OAuth2Tokens::replace`] drops that token (only if it is still the cached
//! one) and gets the next.
//!
//! A failure here is the words of the token endpoint (`invalid_client: AADSTS7000215: ...`,
//! `invalid_grant`) with the endpoint's host and the user, for the delivery log; it never holds a
//! token, refresh token, client secret, key or the tenant (in an Entra ID URL's path), and
//! nothing here logs one. It must not deliver,
//! classify or schedule: the transport does that with what it gets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use mailroute_api::config::{Credentials, OAuth2Credentials};
use mailroute_oauth::{Grant, SecretString, TokenCache, TokenKey};
use sha2::{Digest, Sha256};

use crate::redis_client::RedisConn;

/// Tokens for the relay's OAuth2 routes. Cheap to share.
pub struct OAuth2Tokens {
    /// `None` without Redis (the memory queue): OAuth2 routes then defer their mail.
    cache: Option<TokenCache<RedisConn>>,
    /// Route id → (hash of its compiled client, grant): keys and certificates are parsed once.
    grants: Mutex<HashMap<String, (String, Arc<Grant>)>>,
}

/// A token in use for one attempt: the XOAUTH2 credentials, and what is needed to replace it.
pub struct HeldToken {
    key: TokenKey,
    grant: Arc<Grant>,
    token: SecretString,
    /// The SMTP user and the access token as password (`Credentials` redacts it in `Debug`).
    pub credentials: Credentials,
}

impl OAuth2Tokens {
    pub fn new(cache: Option<TokenCache<RedisConn>>) -> Self {
        Self {
            cache,
            grants: Mutex::new(HashMap::new()),
        }
    }

    /// The route's XOAUTH2 credentials with a token from the shared cache, or why there are none
    /// (the provider's words), for the delivery log.
    pub async fn credentials(&self, route_id: &str, client: &OAuth2Credentials) -> Result<HeldToken, String> {
        let grant = self.grant(route_id, client)?;
        let key = TokenKey {
            route: route_id.to_owned(),
            user: client.user.clone(),
        };
        let token = self.fetch(&key, &grant, None).await?;
        Ok(held(key, grant, token))
    }

    /// After an upstream refused `stale` with 535: drops it from the cache (unless another relay
    /// already replaced it) and gets the next. `Ok(None)` when the cache hands out the same token
    /// again (nothing new to try).
    pub async fn replace(&self, stale: &HeldToken) -> Result<Option<HeldToken>, String> {
        let token = self.fetch(&stale.key, &stale.grant, Some(&stale.token)).await?;
        if token == stale.token {
            return Ok(None);
        }
        Ok(Some(held(stale.key.clone(), stale.grant.clone(), token)))
    }

    async fn fetch(&self, key: &TokenKey, grant: &Grant, stale: Option<&SecretString>) -> Result<SecretString, String> {
        let failed = |e: &dyn std::fmt::Display| {
            format!(
                "no OAuth2 token for {} from {}: {e}",
                key.user,
                mailroute_oauth::endpoint_name(grant.token_url())
            )
        };
        let Some(cache) = &self.cache else {
            return Err(failed(
                &"OAuth2 tokens are shared through Redis; this relay runs with the in-memory queue (--queue memory)",
            ));
        };
        if let Some(stale) = stale {
            cache.invalidate(key, grant, stale).await.map_err(|e| failed(&e))?;
        }
        cache.token(key, grant).await.map_err(|e| failed(&e))
    }

    fn grant(&self, route_id: &str, client: &OAuth2Credentials) -> Result<Arc<Grant>, String> {
        let hash = client_hash(client);
        let mut grants = self.grants.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((h, g)) = grants.get(route_id)
            && *h == hash
        {
            return Ok(g.clone());
        }
        let grant = mailroute_oauth::grant_from(client)
            .map(Arc::new)
            .map_err(|e| format!("route {route_id}: OAuth2 client for {} unusable: {e}", client.user))?;
        grants.insert(route_id.to_owned(), (hash, grant.clone()));
        Ok(grant)
    }
}

fn held(key: TokenKey, grant: Arc<Grant>, token: SecretString) -> HeldToken {
    HeldToken {
        credentials: Credentials {
            username: key.user.clone(),
            password: token.expose().to_owned(),
        },
        key,
        grant,
        token,
    }
}

/// Identifies a compiled client with its secrets (hashed, never kept in clear).
fn client_hash(c: &OAuth2Credentials) -> String {
    let json = serde_json::to_vec(c).unwrap_or_default();
    hex::encode(&Sha256::digest(&json)[..16])
}

#[cfg(test)]
mod tests {
    use mailroute_api::route::OAuth2Grant;

    use super::*;

    fn client(secret: &str) -> OAuth2Credentials {
        OAuth2Credentials {
            grant: OAuth2Grant::ClientCredentials,
            token_url: "https://login.example/t/oauth2/v2.0/token".into(),
            scope: mailroute_oauth::OFFICE365_SCOPE.into(),
            user: "relay@contoso.example".into(),
            client_id: Some("app-1".into()),
            client_secret: Some(secret.into()),
            certificate: None,
            private_key: None,
            assertion_algorithm: None,
            refresh_token: None,
            service_account_key: None,
        }
    }

    #[tokio::test]
    async fn without_redis_an_oauth2_route_gets_a_reason_and_no_token() {
        let tokens = OAuth2Tokens::new(None);
        let e = tokens
            .credentials("mail/o365", &client("cs-value"))
            .await
            .err()
            .unwrap_or_default();
        assert!(e.contains("in-memory queue"), "{e}");
        assert!(
            e.starts_with("no OAuth2 token for relay@contoso.example from https://login.example: "),
            "{e}"
        );
        assert!(!e.contains("cs-value"));
    }

    #[test]
    fn grants_are_built_once_per_client_and_again_when_it_changes() {
        let tokens = OAuth2Tokens::new(None);
        let a = tokens.grant("mail/o365", &client("one")).unwrap();
        let b = tokens.grant("mail/o365", &client("one")).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = tokens.grant("mail/o365", &client("two")).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        let mut broken = client("x");
        broken.client_id = None;
        let e = tokens.grant("mail/o365", &broken).unwrap_err();
        assert!(e.contains("has no client id"), "{e}");
    }
}
