//! Routes with `auth.oauth2` end to end: relays on a real redis-server get access tokens from a
//! token endpoint on 127.0.0.1 (HTTPS, testkit) and authenticate with XOAUTH2 to an upstream over
//! STARTTLS that accepts only tokens the endpoint issued and that are still valid. Two relays
//! starting together make one token request; a token that expires between two messages is
//! replaced without a failed delivery; a token endpoint's refusal defers the mail with the
//! provider's words in the delivery log; a 535 to a token the cache holds as valid is retried
//! once with a new token; every grant (client secret, certificate, refresh token, service
//! account) delivers through the relay binary, and nothing secret reaches its log output, its
//! delivery log, /metrics or the admin API.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use mailroute_oauth::{RsaKey, TokenClient};
use mailroute_relay::outbound::delivery::StaticResolver;
use mailroute_relay::server::{Overrides, Relay};
use mailroute_testkit::token_endpoint::{AADSTS7000215, Endpoint, Settings};
use mailroute_testkit::{RedisServer, Script, SmtpServer, TestPki, TokenCheck};

use crate::common::*;

const KEY: &str = include_str!("../../testkit/keys/dkim-rsa-2048.pem");
const ADMIN_TOKEN: &str = "oauth2-admin-token";

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

/// The Secret of the upstream's CA.
fn ca_secret(pki: &TestPki) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: upstream-ca, namespace: mail}}\nstringData:\n  ca.crt: |\n{}---\n",
        indent(&pki.ca_pem)
    )
}

/// An OAuth2 route `name` for `domain` to the upstream on `port` (STARTTLS, trusting
/// upstream-ca), with a token from `token_url` for the client in Secret `<name>-oauth`
/// (`secret` lines); retried after an hour only, so a test sees exactly one attempt.
fn oauth2_route(name: &str, domain: &str, port: u16, token_url: &str, oauth2: &str, secret: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-oauth, namespace: mail}}\nstringData:\n  user: relay@contoso.example\n  tenant: tenant-1\n{secret}---\n\
         apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: {name}, namespace: mail}}\nspec:\n  host: localhost\n  port: {port}\n  \
         tls: {{mode: starttls, caSecretRef: {{name: upstream-ca, key: ca.crt}}}}\n  \
         auth: {{oauth2: {{{oauth2}, tokenUrl: \"{token_url}\", secretRef: {{name: {name}-oauth}}}}}}\n  \
         match: {{recipientDomains: [\"{domain}\"]}}\n  retry: {{interval: 1h, lifetime: 2h}}\n---\n"
    )
}

/// A client-credentials route with client secret `client_secret`.
fn client_secret_route(name: &str, domain: &str, port: u16, e: &Endpoint, client_secret: &str) -> String {
    oauth2_route(
        name,
        domain,
        port,
        &e.url(),
        "grant: clientCredentials",
        &format!("  client-id: app-1\n  client-secret: {client_secret}\n"),
    )
}

/// A relay on `redis` with `routes`, trusting the certificates of `endpoints` for token requests.
async fn relay(routes: &str, redis: &RedisServer, endpoints: &[&Endpoint]) -> TestRelay {
    let mut roots = rustls::RootCertStore::empty();
    for e in endpoints {
        roots.roots.extend(e.pki.root_store().roots);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = options(dir.path(), routes, &redis.url());
    o.admin_token = Some(ADMIN_TOKEN.into());
    let overrides = Overrides {
        resolver: Some(Arc::new(StaticResolver::new())),
        token_client: Some(TokenClient::new(roots)),
        ..Default::default()
    };
    let relay = Relay::start_with(o, overrides).await.expect("relay starts");
    TestRelay { relay, dir }
}

async fn get(r: &TestRelay, path: &str) -> String {
    reqwest::Client::new()
        .get(format!("http://{}{path}", r.relay.admin_addr.expect("admin listener")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("http")
        .text()
        .await
        .expect("body")
}

/// The delivery log records of `recipient` once `ok` holds for them.
async fn records(r: &TestRelay, recipient: &str, ok: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = get(r, &format!("/api/v1/events?recipient={recipient}")).await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let evs = v["events"].as_array().cloned().unwrap_or_default();
        if ok(&evs) {
            return evs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {recipient}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn with_result<'a>(evs: &'a [serde_json::Value], result: &str) -> Vec<&'a serde_json::Value> {
    evs.iter().filter(|e| e["result"] == result).collect()
}

async fn submit_to(r: &TestRelay, rcpt: &str) {
    let t = submit(r.smtp(), "app@contoso.example", &[rcpt], &message(rcpt, "")).await;
    assert!(t.delivered(), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_starting_together_deliver_twenty_messages_with_one_token_request() {
    let redis = RedisServer::start().unwrap();
    // A slow endpoint, so both relays' first deliveries really ask at the same time.
    let e = Endpoint::start(Settings {
        latency: Duration::from_millis(300),
        ..Settings::default()
    })
    .await;
    let pki = TestPki::new();
    let up = SmtpServer::start(Script::new().starttls(pki.server_config()).xoauth2(e.token_check())).unwrap();
    let routes = format!(
        "{}{}",
        ca_secret(&pki),
        client_secret_route("o365", "*", up.port(), &e, "right-secret")
    );
    let trusted = [&e];
    let (a, b, c, d) = tokio::join!(
        relay(&routes, &redis, &trusted),
        relay(&routes, &redis, &trusted),
        relay(&routes, &redis, &trusted),
        relay(&routes, &redis, &trusted)
    );
    let relays = [&a, &b, &c, &d];
    let rcpts: Vec<String> = (0..20).map(|i| format!("user{i}@example.com")).collect();
    let sends = rcpts
        .iter()
        .enumerate()
        .map(|(i, rcpt)| submit_to(relays[i % relays.len()], rcpt));
    futures::future::join_all(sends).await;

    let received = up.wait_for(20, WAIT).await.unwrap();
    assert_eq!(
        e.requests(),
        1,
        "four relays, twenty concurrent deliveries, one token request"
    );
    for m in &received {
        assert_eq!(m.auth_user.as_deref(), Some("relay@contoso.example"));
        assert!(m.tls);
    }
    assert!(
        up.xoauth2_tokens().iter().all(|t| t == "at-1"),
        "{:?}",
        up.xoauth2_tokens()
    );
    let evs = records(&a, "user0@example.com", |e| !with_result(e, "delivered").is_empty()).await;
    assert_eq!(with_result(&evs, "delivered")[0]["route"], "mail/o365");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_refusal_defers_the_mail_with_the_providers_words() {
    let redis = RedisServer::start().unwrap();
    let e = Endpoint::start(Settings::default()).await;
    let pki = TestPki::new();
    let up = SmtpServer::start(Script::new().starttls(pki.server_config()).xoauth2(e.token_check())).unwrap();
    let routes = format!(
        "{}{}{}",
        ca_secret(&pki),
        client_secret_route("o365", "contoso.example", up.port(), &e, "wrong-client-secret"),
        oauth2_route(
            "gmail",
            "gmail.example",
            up.port(),
            &e.url(),
            "grant: refreshToken, provider: google",
            "  client-id: app-1\n  client-secret: right-secret\n  refresh-token: revoked-refresh-token\n"
        ),
    );
    let r = relay(&routes, &redis, &[&e]).await;
    submit_to(&r, "ceo@contoso.example").await;
    submit_to(&r, "friend@gmail.example").await;

    for (rcpt, words) in [
        ("ceo@contoso.example", format!("invalid_client: {AADSTS7000215}")),
        ("friend@gmail.example", "invalid_grant: Bad Request".to_string()),
    ] {
        let evs = records(&r, rcpt, |e| !with_result(e, "deferred").is_empty()).await;
        let d = with_result(&evs, "deferred")[0];
        let text = d["reply_text"].as_str().unwrap_or_default();
        assert!(
            text.starts_with(&format!(
                "no OAuth2 token for relay@contoso.example from https://127.0.0.1:{}: {words}",
                e.port
            )),
            "{text}"
        );
        assert_eq!(d["bounce_class"], "auth_failure", "{d}");
        // Nor the tenant, which is in the token URL's path.
        for secret in [
            "wrong-client-secret",
            "right-secret",
            "revoked-refresh-token",
            "tenant-1",
        ] {
            assert!(!d.to_string().contains(secret), "{d}");
        }
        assert!(with_result(&evs, "bounced").is_empty(), "never a bounce: {evs:?}");
    }
    assert_eq!(up.connections(), 0, "nothing sent without a token");
    assert_eq!(e.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_535_to_a_valid_token_drops_it_and_authenticates_once_more_with_a_new_one() {
    let redis = RedisServer::start().unwrap();
    let pki = TestPki::new();
    // Upstream one refuses the first token it sees (revoked at the provider, or its clock) and
    // takes the next; upstream two refuses every token (the app lost SMTP.SendAsApp).
    let e1 = Endpoint::start(Settings::default()).await;
    let e2 = Endpoint::start(Settings::default()).await;
    let first: Arc<Mutex<Option<String>>> = Arc::default();
    let valid = e1.token_check();
    let check = TokenCheck::new({
        let first = first.clone();
        move |user, token| {
            let mut first = first.lock().unwrap();
            let seen = first.get_or_insert_with(|| token.to_string());
            seen != token && valid.accepts(user, token)
        }
    });
    let refused = "535 5.7.3 Authentication unsuccessful [SN4PR0201CA0045.namprd02.prod.outlook.com]";
    let up1 = SmtpServer::start(Script::new().starttls(pki.server_config()).xoauth2(check)).unwrap();
    let up2 = SmtpServer::start(
        Script::new()
            .starttls(pki.server_config())
            .xoauth2(TokenCheck::new(|_, _| false))
            .auth_fail_reply(refused),
    )
    .unwrap();
    let routes = format!(
        "{}{}{}",
        ca_secret(&pki),
        client_secret_route("one", "one.example", up1.port(), &e1, "right-secret"),
        client_secret_route("two", "two.example", up2.port(), &e2, "right-secret"),
    );
    let r = relay(&routes, &redis, &[&e1, &e2]).await;

    submit_to(&r, "a@one.example").await;
    let received = up1.wait_for(1, WAIT).await.unwrap();
    assert_eq!(received[0].auth_user.as_deref(), Some("relay@contoso.example"));
    assert_eq!(up1.xoauth2_tokens(), ["at-1", "at-2"]);
    assert_eq!(
        e1.requests(),
        2,
        "the refused token was dropped and one new one fetched"
    );
    let evs = records(&r, "a@one.example", |e| !with_result(e, "delivered").is_empty()).await;
    assert!(
        with_result(&evs, "deferred").is_empty(),
        "delivered at the first attempt: {evs:?}"
    );

    // Refused again with the new token: a temporary failure with the upstream's reply, after
    // exactly two token requests and two AUTH commands.
    submit_to(&r, "b@two.example").await;
    let evs = records(&r, "b@two.example", |e| !with_result(e, "deferred").is_empty()).await;
    let d = with_result(&evs, "deferred")[0];
    assert_eq!(d["reply_code"], 535, "{d}");
    assert!(
        d["reply_text"]
            .as_str()
            .unwrap_or_default()
            .contains("Authentication unsuccessful"),
        "{d}"
    );
    assert_eq!(d["bounce_class"], "auth_failure");
    assert_eq!(e2.requests(), 2);
    assert_eq!(up2.xoauth2_tokens(), ["at-1", "at-2"]);
    assert!(with_result(&evs, "bounced").is_empty(), "{evs:?}");
}

/// The known secret values of [`nothing_secret_reaches_logs_metrics_or_the_admin_api`].
const CLIENT_SECRET: &str = "cs-Qx81~secret-value";
const WRONG_SECRET: &str = "cs-Wq27~wrong-secret-value";
const REFRESH_TOKEN: &str = "rt-Zk55-refresh-original";
const ROTATED_PREFIX: &str = "rt-Jp03-rotated-";
const ACCESS_PREFIX: &str = "EwBat-Vv91-access-";

/// A Google service account's key file with the test key.
fn service_account_json() -> String {
    serde_json::json!({
        "type": "service_account",
        "client_email": "relay@project.iam.gserviceaccount.com",
        "private_key": KEY,
    })
    .to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads a child's pipe into a buffer until it closes.
fn drain(mut pipe: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// Every delivery path with known tokens, client secrets, a refresh token that rotates and a
/// private key, through the relay binary (its log at `trace` on stderr, its delivery log on
/// stdout, trusting the token endpoint through `SSL_CERT_FILE` as a pod would its CA bundle): a
/// grep of the log output, the delivery log (stdout, admin API, CSV export) and /metrics finds
/// none of them, nor the XOAUTH2 responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_reaches_logs_metrics_or_the_admin_api() {
    let redis = RedisServer::start().unwrap();
    let e = Endpoint::start(Settings {
        client_secret: CLIENT_SECRET.into(),
        refresh_token: REFRESH_TOKEN.into(),
        rotate: true,
        public_key: RsaKey::from_pem(KEY).unwrap().public_key_der(),
        token_prefix: ACCESS_PREFIX.into(),
        refresh_prefix: ROTATED_PREFIX.into(),
        ..Settings::default()
    })
    .await;
    let pki = TestPki::new();
    // Refuses the first token it sees: the 535 path runs too.
    let first: Arc<Mutex<Option<String>>> = Arc::default();
    let valid = e.token_check();
    let check = TokenCheck::new(move |user, token| {
        let mut first = first.lock().unwrap();
        let seen = first.get_or_insert_with(|| token.to_string());
        seen != token && valid.accepts(user, token)
    });
    let up = SmtpServer::start(Script::new().starttls(pki.server_config()).xoauth2(check)).unwrap();
    let routes = format!(
        "{}{}{}{}{}{}",
        ca_secret(&pki),
        client_secret_route("secret", "secret.example", up.port(), &e, CLIENT_SECRET),
        client_secret_route("wrong", "wrong.example", up.port(), &e, WRONG_SECRET),
        oauth2_route(
            "certificate",
            "cert.example",
            up.port(),
            &e.url(),
            "grant: clientCredentials, clientAuth: certificate",
            &format!(
                "  client-id: app-1\n  tls.crt: |\n{}  tls.key: |\n{}",
                indent(&e.pki.cert_pem),
                indent(KEY)
            ),
        ),
        oauth2_route(
            "refresh",
            "refresh.example",
            up.port(),
            &e.url(),
            "grant: refreshToken, provider: microsoft",
            &format!("  client-id: app-1\n  client-secret: {CLIENT_SECRET}\n  refresh-token: {REFRESH_TOKEN}\n"),
        ),
        oauth2_route(
            "workspace",
            "workspace.example",
            up.port(),
            &e.url(),
            "grant: serviceAccount",
            &format!("  service-account.json: |\n{}", indent(&service_account_json())),
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, routes).unwrap();
    let ca_file = dir.path().join("token-endpoint-ca.pem");
    std::fs::write(&ca_file, &e.pki.ca_pem).unwrap();
    let (smtp_port, admin_port) = (free_port(), free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
        .args(["run", "--queue", &redis.url(), "--hostname", "relay.test"])
        .args(["--smtp-listen", &format!("127.0.0.1:{smtp_port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--admin-token", ADMIN_TOKEN, "--routes", routes_file.to_str().unwrap()])
        .env("MAILROUTE_LOG", "trace")
        .env("SSL_CERT_FILE", &ca_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn relay");
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let admin = format!("http://127.0.0.1:{admin_port}");
    let get = async |path: &str| -> Option<String> {
        let r = reqwest::Client::new()
            .get(format!("{admin}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(r.text().await.ok()?)
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while get("/readyz").await.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the relay did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let smtp = std::net::SocketAddr::from(([127, 0, 0, 1], smtp_port));
    let send = async |rcpt: &str| {
        let t = submit(smtp, "app@contoso.example", &[rcpt], &message(rcpt, "")).await;
        assert!(t.delivered(), "{t:?}");
    };
    let logged = async |rcpt: &str, result: &str| {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let body = get(&format!("/api/v1/events?recipient={rcpt}&result={result}"))
                .await
                .unwrap_or_default();
            if body.contains(&format!("\"recipient\":\"{rcpt}\"")) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "no {result} record for {rcpt}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Every grant: client secret, certificate, refresh token, service account.
    for rcpt in [
        "a@secret.example",
        "b@cert.example",
        "c@refresh.example",
        "d@wrong.example",
        "f@workspace.example",
    ] {
        send(rcpt).await;
    }
    up.wait_for(4, WAIT).await.unwrap();
    logged("d@wrong.example", "deferred").await;
    for rcpt in [
        "a@secret.example",
        "b@cert.example",
        "c@refresh.example",
        "f@workspace.example",
    ] {
        logged(rcpt, "delivered").await;
    }
    // A second refresh-token request, with the rotated token.
    let mut conn = redis_connection(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*oauth*refresh*token")
        .query_async(&mut conn)
        .await
        .unwrap();
    for k in &keys {
        let _: () = redis::cmd("DEL").arg(k).query_async(&mut conn).await.unwrap();
    }
    send("e@refresh.example").await;
    logged("e@refresh.example", "delivered").await;
    assert!(
        e.presented
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.starts_with(ROTATED_PREFIX)),
        "the rotated refresh token was used: {:?}",
        e.presented.lock().unwrap()
    );
    let api = [
        (
            "delivery log (admin API)",
            get("/api/v1/events").await.unwrap_or_default(),
        ),
        (
            "delivery log (CSV export)",
            get("/api/v1/events.csv").await.unwrap_or_default(),
        ),
        ("/metrics", get("/metrics").await.unwrap_or_default()),
    ];
    // SIGKILL of our own child: its pipes close and the drains end.
    child.kill().unwrap();
    child.wait().unwrap();
    let mut outputs = vec![
        ("delivery log (stdout)", stdout.join().unwrap()),
        ("log output (stderr)", stderr.join().unwrap()),
    ];
    outputs.extend(api.map(|(what, text)| (what, text)));

    let tokens = up.xoauth2_tokens();
    assert!(
        tokens.len() >= 6 && tokens.iter().all(|t| t.starts_with(ACCESS_PREFIX)),
        "{tokens:?}"
    );
    let mut secrets: Vec<String> = vec![
        CLIENT_SECRET.into(),
        WRONG_SECRET.into(),
        REFRESH_TOKEN.into(),
        ROTATED_PREFIX.into(),
        ACCESS_PREFIX.into(),
    ];
    // The private key's lines, and what XOAUTH2 sends on the wire.
    secrets.extend(KEY.lines().filter(|l| !l.starts_with("-----")).map(String::from));
    for t in &tokens {
        let sasl = format!("user=relay@contoso.example\x01auth=Bearer {t}\x01\x01");
        secrets.push(base64::engine::general_purpose::STANDARD.encode(sasl));
    }
    for (what, text) in &outputs {
        assert!(!text.is_empty(), "{what} is empty");
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "{what} shows a secret ({s}):\n{text}");
        }
    }
    // The outputs are real: the log covers the token requests and the refused token, the
    // delivery log the refusal in the provider's words.
    let log = &outputs[1].1;
    assert!(log.contains("token request failed"), "{log}");
    assert!(log.contains("upstream refused the OAuth2 token"), "{log}");
    assert!(outputs[0].1.contains("AADSTS7000215"), "{}", outputs[0].1);
}

/// A token that expires between two messages is replaced before the second goes out: no failed
/// delivery, one more token request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_between_two_messages_is_replaced_without_a_failed_delivery() {
    let redis = RedisServer::start().unwrap();
    // Two-second tokens: refreshed once half their life is gone.
    let e = Endpoint::start(Settings {
        expires_in: 2,
        ..Settings::default()
    })
    .await;
    let pki = TestPki::new();
    let up = SmtpServer::start(Script::new().starttls(pki.server_config()).xoauth2(e.token_check())).unwrap();
    let routes = format!(
        "{}{}",
        ca_secret(&pki),
        client_secret_route("o365", "*", up.port(), &e, "right-secret")
    );
    let r = relay(&routes, &redis, &[&e]).await;
    submit_to(&r, "first@example.com").await;
    up.wait_for(1, WAIT).await.unwrap();
    assert_eq!(up.xoauth2_tokens(), ["at-1"]);
    // The upstream no longer takes at-1.
    let deadline = tokio::time::Instant::now() + WAIT;
    while e.is_valid("at-1") {
        assert!(tokio::time::Instant::now() < deadline, "at-1 never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    submit_to(&r, "second@example.com").await;
    up.wait_for(2, WAIT).await.unwrap();
    assert_eq!(up.xoauth2_tokens(), ["at-1", "at-2"]);
    assert_eq!(e.requests(), 2);
    let evs = records(&r, "second@example.com", |e| !with_result(e, "delivered").is_empty()).await;
    assert!(with_result(&evs, "deferred").is_empty(), "{evs:?}");
}

/// Gmail answers a refused token with an error challenge (`334` and base64 JSON) and gives its
/// `535` only after an empty line: the relay sends that line, sees the 535 and authenticates
/// once more with a new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gmails_error_challenge_is_answered_and_its_535_retried_with_a_new_token() {
    let redis = RedisServer::start().unwrap();
    let e = Endpoint::start(Settings::default()).await;
    let pki = TestPki::new();
    let first: Arc<Mutex<Option<String>>> = Arc::default();
    let valid = e.token_check();
    let check = TokenCheck::new(move |user, token| {
        let mut first = first.lock().unwrap();
        let seen = first.get_or_insert_with(|| token.to_string());
        seen != token && valid.accepts(user, token)
    });
    let up = SmtpServer::start(
        Script::new()
            .implicit_tls(pki.server_config())
            .xoauth2(check)
            .xoauth2_error_challenge(true)
            .auth_fail_reply("535 5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials"),
    )
    .unwrap();
    let routes = format!(
        "{}{}",
        ca_secret(&pki),
        client_secret_route("gmail", "*", up.port(), &e, "right-secret").replace("mode: starttls", "mode: implicit")
    );
    let r = relay(&routes, &redis, &[&e]).await;
    submit_to(&r, "friend@example.com").await;
    let received = up.wait_for(1, WAIT).await.unwrap();
    assert!(received[0].tls);
    assert_eq!(up.xoauth2_tokens(), ["at-1", "at-2"]);
    assert_eq!(e.requests(), 2);
}
