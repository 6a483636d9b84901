//! Grants and the shared token cache against a real HTTPS token endpoint on 127.0.0.1 and a real
//! redis-server.

use std::sync::Arc;
use std::time::Duration;

use mailroute_oauth::jwt::Thumbprints;
use mailroute_oauth::{
    CacheSettings, ClientCredential, ClientCredentials, Grant, JwtAlg, OAuthError, RefreshTokenGrant, RsaKey,
    SecretString, ServiceAccount, TokenCache, TokenClient, TokenKey,
};
use mailroute_testkit::RedisServer;
use mailroute_testkit::token_endpoint::{AADSTS700027, AADSTS7000215, Endpoint, Settings};

const KEY: &str = include_str!("../../testkit/keys/dkim-rsa-2048.pem");
const OTHER_KEY: &str = include_str!("../../testkit/keys/dkim-rsa-3072.pem");

async fn endpoint(latency: Duration) -> Endpoint {
    Endpoint::start(Settings {
        public_key: RsaKey::from_pem(KEY).unwrap().public_key_der(),
        latency,
        ..Settings::default()
    })
    .await
}

fn client(e: &Endpoint) -> TokenClient {
    TokenClient::new(e.pki.root_store()).with_timeout(Duration::from_secs(30))
}

fn secret_grant(e: &Endpoint, secret: &str) -> Grant {
    Grant::ClientCredentials(ClientCredentials {
        token_url: e.url(),
        client_id: "app-1".into(),
        credential: ClientCredential::Secret(secret.into()),
        scope: mailroute_oauth::OFFICE365_SCOPE.into(),
    })
}

fn certificate_grant(e: &Endpoint, key: &str, alg: JwtAlg) -> Grant {
    Grant::ClientCredentials(ClientCredentials {
        token_url: e.url(),
        client_id: "app-1".into(),
        credential: ClientCredential::Certificate {
            key: Box::new(RsaKey::from_pem(key).unwrap()),
            thumbprints: Thumbprints::from_pem(&e.pki.cert_pem).unwrap(),
            alg,
        },
        scope: mailroute_oauth::OFFICE365_SCOPE.into(),
    })
}

fn refresh_grant(e: &Endpoint, refresh_token: &str) -> Grant {
    Grant::RefreshToken(RefreshTokenGrant {
        token_url: e.url(),
        client_id: "app-1".into(),
        client_secret: Some("right-secret".into()),
        refresh_token: refresh_token.into(),
        scope: None,
    })
}

async fn cache(redis: &RedisServer, e: &Endpoint, settings: CacheSettings) -> TokenCache {
    let conn = redis::aio::ConnectionManager::new(redis.client().unwrap())
        .await
        .unwrap();
    TokenCache::new(conn, "mailroute:", client(e), settings)
}

fn key() -> TokenKey {
    TokenKey {
        route: "mail/office365".into(),
        user: "relay@contoso.com".into(),
    }
}

/// `n` callers at once; their tokens.
async fn concurrently(cache: &TokenCache, grant: &Arc<Grant>, n: usize) -> Vec<Result<SecretString, OAuthError>> {
    let calls = (0..n).map(|_| {
        let (cache, grant) = (cache.clone(), grant.clone());
        tokio::spawn(async move { cache.token(&key(), &grant).await })
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test]
async fn each_grant_gets_a_token_over_https_and_provider_errors_come_verbatim() {
    let e = endpoint(Duration::ZERO).await;
    let c = client(&e);

    let t = c.fetch(&secret_grant(&e, "right-secret"), None).await.unwrap();
    assert_eq!(t.access_token.expose(), "at-1");
    assert!(t.remaining(mailroute_oauth_now()) > 3500);
    let err = c.fetch(&secret_grant(&e, "wrong-secret"), None).await.unwrap_err();
    assert_eq!(err.to_string(), format!("invalid_client: {AADSTS7000215}"));
    assert!(err.is_credential_error());
    // Nothing secret in what a log line would show.
    let shown = format!("{err} {err:?} {:?}", secret_grant(&e, "wrong-secret"));
    assert!(
        !shown.contains("wrong-secret") && !shown.contains("right-secret"),
        "{shown}"
    );

    for alg in [JwtAlg::Rs256, JwtAlg::Ps256] {
        let t = c.fetch(&certificate_grant(&e, KEY, alg), None).await.unwrap();
        assert!(t.access_token.expose().starts_with("at-"));
    }
    let err = c
        .fetch(&certificate_grant(&e, OTHER_KEY, JwtAlg::Rs256), None)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), format!("invalid_client: {AADSTS700027}"));

    let json = serde_json::json!({"client_email": "relay@p.iam.gserviceaccount.com", "private_key": KEY, "token_uri": e.url()});
    let sa =
        ServiceAccount::from_json_key(&json.to_string(), "alice@example.com", mailroute_oauth::GMAIL_SCOPE).unwrap();
    assert!(c.fetch(&Grant::ServiceAccount(sa), None).await.is_ok());

    let err = c.fetch(&refresh_grant(&e, "revoked"), None).await.unwrap_err();
    assert_eq!(err.to_string(), "invalid_grant: Bad Request");

    // An endpoint whose certificate is not trusted is a transport error, not a token.
    let untrusted = TokenClient::new(mailroute_testkit::TestPki::new().root_store());
    let err = untrusted
        .fetch(&secret_grant(&e, "right-secret"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, OAuthError::Transport { .. }), "{err:?}");
}

fn mailroute_oauth_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn fifty_callers_make_one_request_and_a_near_expiry_or_expired_token_is_refreshed_once() {
    let redis = RedisServer::start().unwrap();
    // A slow endpoint, so the callers really overlap.
    let e = endpoint(Duration::from_millis(300)).await;
    let cache = cache(&redis, &e, CacheSettings::default()).await;
    let grant = Arc::new(secret_grant(&e, "right-secret"));

    let tokens = concurrently(&cache, &grant, 50).await;
    assert_eq!(e.requests(), 1, "50 callers, one token request");
    assert!(tokens.iter().all(|t| t.as_ref().unwrap().expose() == "at-1"));

    // The token has 40 s left (refresh is due 5 min ahead): one caller refreshes, the others use
    // the still valid one meanwhile.
    let mut conn = redis
        .client()
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let name = cache.token_key_name(&key(), &grant);
    let now = mailroute_oauth_now();
    let near = serde_json::json!({"access_token": "at-1", "issued_at": now - 3560, "expires_at": now + 40}).to_string();
    let _: () = redis::cmd("SET")
        .arg(&name)
        .arg(near)
        .query_async(&mut conn)
        .await
        .unwrap();
    let tokens = concurrently(&cache, &grant, 50).await;
    assert_eq!(e.requests(), 2, "one refresh for 50 callers");
    assert!(
        tokens
            .iter()
            .all(|t| matches!(t.as_ref().unwrap().expose(), "at-1" | "at-2"))
    );
    assert_eq!(cache.token(&key(), &grant).await.unwrap().expose(), "at-2");

    // Expired (Redis dropped it): the callers wait for the one request.
    let _: () = redis::cmd("DEL").arg(&name).query_async(&mut conn).await.unwrap();
    let tokens = concurrently(&cache, &grant, 50).await;
    assert_eq!(e.requests(), 3);
    assert!(tokens.iter().all(|t| t.as_ref().unwrap().expose() == "at-3"));
    let ttl: i64 = redis::cmd("TTL").arg(&name).query_async(&mut conn).await.unwrap();
    assert!(
        (3500..=3599).contains(&ttl),
        "the token expires with its lifetime: {ttl}"
    );

    // A changed secret is another grant: a token of its own.
    let rotated = Arc::new(secret_grant(&e, "right-secret-2"));
    assert_ne!(cache.token_key_name(&key(), &rotated), name);
}

#[tokio::test]
async fn a_535_on_a_valid_token_drops_it_once_and_one_new_token_is_fetched() {
    let redis = RedisServer::start().unwrap();
    let e = endpoint(Duration::from_millis(100)).await;
    let cache = cache(&redis, &e, CacheSettings::default()).await;
    let grant = Arc::new(secret_grant(&e, "right-secret"));
    let stale = cache.token(&key(), &grant).await.unwrap();
    assert_eq!(e.requests(), 1);

    // 20 relays got 535 with it: each invalidates, then asks again.
    let calls = (0..20).map(|_| {
        let (cache, grant, stale) = (cache.clone(), grant.clone(), stale.clone());
        tokio::spawn(async move {
            cache.invalidate(&key(), &grant, &stale).await.unwrap();
            cache.token(&key(), &grant).await.unwrap()
        })
    });
    let tokens: Vec<SecretString> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(e.requests(), 2, "one refresh for 20 invalidations of the same token");
    assert!(tokens.iter().all(|t| t.expose() == "at-2"));
    assert!(
        !cache.invalidate(&key(), &grant, &stale).await.unwrap(),
        "a newer token stays"
    );
}

#[tokio::test]
async fn a_failing_endpoint_is_asked_once_and_every_caller_gets_its_words() {
    let redis = RedisServer::start().unwrap();
    let e = endpoint(Duration::from_millis(300)).await;
    let cache = cache(&redis, &e, CacheSettings::default()).await;
    let grant = Arc::new(secret_grant(&e, "wrong-secret"));
    let results = concurrently(&cache, &grant, 50).await;
    assert_eq!(e.requests(), 1);
    for r in results {
        assert_eq!(r.unwrap_err().to_string(), format!("invalid_client: {AADSTS7000215}"));
    }
}

#[tokio::test]
async fn a_rotated_refresh_token_is_kept_in_redis_until_the_secret_brings_a_new_one() {
    let redis = RedisServer::start().unwrap();
    let e = endpoint(Duration::ZERO).await;
    e.settings.lock().unwrap().rotate = true;
    let cache = cache(&redis, &e, CacheSettings::default()).await;
    let grant = Arc::new(refresh_grant(&e, "rt-0"));
    let mut conn = redis
        .client()
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let name = cache.token_key_name(&key(), &grant);

    assert_eq!(cache.token(&key(), &grant).await.unwrap().expose(), "at-1");
    // The provider rotated rt-0 into rt-1 and no longer takes rt-0: the next refresh uses rt-1.
    let _: () = redis::cmd("DEL").arg(&name).query_async(&mut conn).await.unwrap();
    assert_eq!(cache.token(&key(), &grant).await.unwrap().expose(), "at-2");
    let _: () = redis::cmd("DEL").arg(&name).query_async(&mut conn).await.unwrap();
    assert_eq!(cache.token(&key(), &grant).await.unwrap().expose(), "at-3");
    assert_eq!(*e.presented.lock().unwrap(), ["rt-0", "rt-1", "rt-2"]);

    // The user consented again: the Secret holds a new refresh token, which wins over the
    // rotated one in Redis.
    e.settings.lock().unwrap().refresh_token = "rt-fresh".into();
    let renewed = Arc::new(refresh_grant(&e, "rt-fresh"));
    let _: () = redis::cmd("DEL").arg(&name).query_async(&mut conn).await.unwrap();
    assert_eq!(cache.token(&key(), &renewed).await.unwrap().expose(), "at-4");
    assert_eq!(e.presented.lock().unwrap().last().map(String::as_str), Some("rt-fresh"));
}

/// From an SmtpRoute and its Secret, through `compile`, to a token over HTTPS: each grant.
#[tokio::test]
async fn compiled_routes_of_each_grant_get_tokens() {
    let e = endpoint(Duration::ZERO).await;
    let cert = e.pki.cert_pem.clone();
    let sa = serde_json::json!({"client_email": "relay@p.iam.gserviceaccount.com", "private_key": KEY}).to_string();
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let route = |name: &str, priority: u32, oauth2: &str| {
        format!(
            "---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: {name}, namespace: mail}}\nspec:\n  host: smtp.example.com\n  priority: {priority}\n  auth:\n    oauth2: {{{oauth2}, tokenUrl: \"{}\", secretRef: {{name: oauth}}}}\n",
            e.url()
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: oauth, namespace: mail}}\nstringData:\n  user: relay@contoso.com\n  tenant: tenant-1\n  client-id: app-1\n  client-secret: right-secret\n  refresh-token: rt-0\n  tls.crt: |\n{}  tls.key: |\n{}  service-account.json: |\n{}{}{}{}{}",
        indent(&cert),
        indent(KEY),
        indent(&sa),
        route("secret", 1, "grant: clientCredentials"),
        route(
            "certificate",
            2,
            "grant: clientCredentials, clientAuth: certificate, assertionAlgorithm: PS256"
        ),
        route("refresh", 3, "grant: refreshToken, provider: microsoft"),
        route("sa", 4, "grant: serviceAccount"),
    );
    let c = mailroute_api::Manifests::from_yaml(&yaml, "default").unwrap().compile();
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    assert_eq!(c.secrets.upstream_oauth2.len(), 4);
    let client = client(&e);
    for (id, compiled) in &c.secrets.upstream_oauth2 {
        let grant = mailroute_oauth::grant_from(compiled).unwrap_or_else(|err| panic!("{id}: {err}"));
        let token = client
            .fetch(&grant, None)
            .await
            .unwrap_or_else(|err| panic!("{id}: {err}"));
        assert!(token.access_token.expose().starts_with("at-"), "{id}");
    }
    assert_eq!(e.requests(), 4);
}

/// The same over a Redis Cluster: a route and user's keys share one hash slot.
#[tokio::test]
async fn over_a_redis_cluster_fifty_callers_make_one_request() {
    let cluster = mailroute_testkit::RedisCluster::start(3, 0).unwrap();
    let seeds: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}/", n.port()))
        .collect();
    let conn = redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let e = endpoint(Duration::from_millis(300)).await;
    let cache = TokenCache::new(conn, "mailroute:", client(&e), CacheSettings::default());
    let grant = Arc::new(secret_grant(&e, "right-secret"));
    let calls = (0..50).map(|_| {
        let (cache, grant) = (cache.clone(), grant.clone());
        tokio::spawn(async move { cache.token(&key(), &grant).await })
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap().unwrap().expose(), "at-1");
    }
    assert_eq!(e.requests(), 1);
    assert!(cache.invalidate(&key(), &grant, &"at-1".into()).await.unwrap());
    assert_eq!(cache.token(&key(), &grant).await.unwrap().expose(), "at-2");
}
