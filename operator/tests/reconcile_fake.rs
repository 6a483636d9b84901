//! The reconcile against an in-memory Kubernetes API (kube-fake-client): outputs, statuses and
//! Events from the examples, no writes when nothing changed, a broken Secret keeping the route's
//! last good version (and the status saying so), failed reads never touching the live config,
//! quota usage from a local relay admin API, and connection-test results (run against the
//! scriptable SMTP server) reaching the status, for OAuth2 routes too (a token endpoint on
//! 127.0.0.1), with no secret value in any output.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;
use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube_fake_client::{Error as FakeError, interceptor};
use mailroute_api::RelayConfig;
use mailroute_api::config::{CONFIG_KEY, SECRETS_KEY};
use mailroute_operator::conntest;
use mailroute_operator::plan::HASH_ANNOTATION;
use mailroute_operator::reconcile::ReconcileError;
use mailroute_operator::usage::UsageClient;
use mailroute_testkit::{Script, SmtpServer, TestPki};

const BROKEN: &str = r#"
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: no-secret, namespace: mail}
spec:
  provider: office365
  auth: {secretRef: {name: does-not-exist}}
"#;

async fn live_config(client: &kube::Client) -> ConfigMap {
    Api::<ConfigMap>::namespaced(client.clone(), OPERATOR_NS)
        .get("mailroute-config")
        .await
        .unwrap()
}

#[tokio::test]
async fn the_examples_compile_into_outputs_statuses_and_events() {
    let client = fake_client(examples_plus(BROKEN), None).await;
    let r = reconciler(client.clone(), None, None);
    let outcome = r.reconcile().await.unwrap();
    assert!(outcome.wrote_config && outcome.wrote_secret);
    assert_eq!(outcome.routes_in_config, 4);
    assert_eq!(outcome.quotas_in_config, 2);

    let cm = live_config(&client).await;
    let labels = cm.metadata.labels.clone().unwrap();
    assert_eq!(labels["app.kubernetes.io/part-of"], "mailroute");
    assert_eq!(
        cm.metadata.annotations.as_ref().unwrap()[HASH_ANNOTATION],
        outcome.config_hash
    );
    let json = &cm.data.as_ref().unwrap()[CONFIG_KEY];
    let config: RelayConfig = serde_json::from_str(json).unwrap();
    assert_eq!(config.content_hash(), outcome.config_hash);
    let ids: Vec<&str> = config.routes.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["mail/carriers", "mail/gmail", "mail/office365", "mail/direct-mx"]);
    for secret in [
        "abcd efgh ijkl mnop",
        "change-me",
        "s3cret-shop-password",
        "BEGIN PRIVATE KEY",
    ] {
        assert!(!json.contains(secret), "{secret} leaked into the ConfigMap");
    }
    let out = Api::<Secret>::namespaced(client.clone(), OPERATOR_NS)
        .get("mailroute-secrets")
        .await
        .unwrap();
    let doc = &secret_strings(&out)[SECRETS_KEY];
    assert!(doc.contains("abcd efgh ijkl mnop") && doc.contains("BEGIN PRIVATE KEY"));
    assert!(
        !doc.contains("s3cret-shop-password"),
        "inbound passwords are stored hashed"
    );

    let gmail = route(&client, "mail", "gmail").await;
    assert_eq!(sr(&route_condition(&gmail, "Ready")), ("True", "InConfig"));
    assert_eq!(sr(&route_condition(&gmail, "Verified")), ("Unknown", "Disabled"));
    let status = gmail.status.unwrap();
    assert_eq!(
        (status.host.as_deref(), status.port),
        (Some("smtp.gmail.com"), Some(465))
    );
    assert_eq!(status.observed_generation, Some(1));
    let broken = route(&client, "mail", "no-secret").await;
    assert_eq!(sr(&route_condition(&broken, "Accepted")), ("False", "SecretNotFound"));
    assert_eq!(sr(&route_condition(&broken, "Ready")), ("False", "SecretNotFound"));
    let shop = quota(&client, "mail", "shop-42").await.status.unwrap();
    assert_eq!(shop.limits.as_deref(), Some("10000/month bulk"));
    assert_eq!(sr(condition(&shop.conditions, "Ready")), ("True", "InConfig"));

    let events = Api::<Event>::namespaced(client.clone(), "mail")
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(events.len(), outcome.events);
    let mut warnings: Vec<_> = events
        .iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .map(|e| {
            let r = e.regarding.as_ref().unwrap();
            (r.name.clone().unwrap(), e.reason.clone().unwrap())
        })
        .collect();
    // Both Microsoft 365 routes log in with a password: Basic authentication is being retired.
    let warn = |name: &str, reason: &str| (name.to_string(), reason.to_string());
    warnings.sort();
    assert_eq!(
        warnings,
        [
            warn("no-secret", "BasicAuthRetiring"),
            warn("no-secret", "SecretNotFound"),
            warn("office365", "BasicAuthRetiring"),
        ]
    );
    let office365 = route(&client, "mail", "office365").await;
    assert_eq!(
        sr(&route_condition(&office365, "AuthDeprecated")),
        ("True", "BasicAuthRetiring")
    );
    assert_eq!(sr(&route_condition(&office365, "Ready")), ("True", "InConfig"));
    assert!(
        events
            .iter()
            .all(|e| e.reporting_controller.as_deref() == Some("mailroute-operator"))
    );

    // Nothing changed: no write of any kind.
    let again = r.reconcile().await.unwrap();
    assert!(!again.wrote_config && !again.wrote_secret, "{again:?}");
    assert_eq!((again.status_writes, again.events), (0, 0));
    assert_eq!(again.config_hash, outcome.config_hash);
    let text = r.metrics().render();
    assert!(text.contains("mailroute_operator_config_writes_total 2"), "{text}");
    assert!(text.contains("mailroute_operator_reconciles_total{result=\"success\"} 2"));
}

#[tokio::test]
async fn a_deleted_or_mistyped_secret_keeps_the_last_good_route_and_says_so() {
    let client = fake_client(examples_plus(""), None).await;
    let r = reconciler(client.clone(), None, None);
    let first = r.reconcile().await.unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), "mail");

    secrets
        .delete("gmail-credentials", &DeleteParams::default())
        .await
        .unwrap();
    let second = r.reconcile().await.unwrap();
    assert!(!second.wrote_config && !second.wrote_secret, "{second:?}");
    assert_eq!(second.config_hash, first.config_hash);
    assert_eq!(second.routes_in_config, first.routes_in_config);
    let gmail = route(&client, "mail", "gmail").await;
    assert_eq!(sr(&route_condition(&gmail, "Accepted")), ("False", "SecretNotFound"));
    let ready = route_condition(&gmail, "Ready");
    assert_eq!(sr(&ready), ("True", "SecretUnavailableUsingLastGood"));
    assert_eq!(
        ready.message,
        "its last good version stays in the relay configuration mailroute-system/mailroute-config until this is fixed: spec.auth.secretRef: Secret mail/gmail-credentials not found"
    );
    let json = live_config(&client).await.data.unwrap()[CONFIG_KEY].clone();
    assert!(json.contains("mail/gmail"));
    // The other routes did not change status.
    assert_eq!(second.status_writes, 1);

    // Recreated with a mistyped key: still the last good version.
    let mistyped = secret(
        "mail",
        "gmail-credentials",
        &[("user", "notifications@example.com"), ("password", "new password")],
    );
    secrets.create(&PostParams::default(), &mistyped).await.unwrap();
    let third = r.reconcile().await.unwrap();
    assert!(!third.wrote_config && !third.wrote_secret, "{third:?}");
    let ready = route_condition(&route(&client, "mail", "gmail").await, "Ready");
    assert_eq!(sr(&ready), ("True", "SecretUnavailableUsingLastGood"));
    assert!(ready.message.contains("has no key `username`"), "{}", ready.message);

    // Fixed: in the configuration as compiled, Ready as before.
    secrets
        .delete("gmail-credentials", &DeleteParams::default())
        .await
        .unwrap();
    let restored = secret(
        "mail",
        "gmail-credentials",
        &[
            ("username", "notifications@example.com"),
            ("password", "abcd efgh ijkl mnop"),
        ],
    );
    secrets.create(&PostParams::default(), &restored).await.unwrap();
    let fourth = r.reconcile().await.unwrap();
    assert_eq!(fourth.config_hash, first.config_hash);
    let gmail = route(&client, "mail", "gmail").await;
    assert_eq!(sr(&route_condition(&gmail, "Ready")), ("True", "InConfig"));
    assert_eq!(sr(&route_condition(&gmail, "Accepted")), ("True", "Valid"));
}

/// Fails the list calls whose (1-based) number is in `failing`.
fn failing_lists(failing: &'static [usize]) -> interceptor::Funcs {
    let calls = Arc::new(AtomicUsize::new(0));
    interceptor::Funcs::new().list(move |_ctx| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        if failing.contains(&n) {
            Err(FakeError::Internal("etcdserver: request timed out".into()))
        } else {
            Ok(None)
        }
    })
}

#[tokio::test]
async fn failed_lists_never_touch_the_live_config() {
    // Reconcile 1 lists routes (1), quotas (2) and webhooks (3); reconcile 2 fails listing
    // routes (4); reconcile 3 lists routes (5) but fails listing quotas (6).
    let client = fake_client(examples_plus(""), Some(failing_lists(&[4, 6]))).await;
    let r = reconciler(client.clone(), None, None);
    let first = r.reconcile().await.unwrap();
    let live = live_config(&client).await;

    let err = r.reconcile().await.unwrap_err();
    assert!(list_failed(&err, "SmtpRoutes"), "{err}");
    let err = r.reconcile().await.unwrap_err();
    assert!(list_failed(&err, "SenderQuotas"), "{err}");
    let after = live_config(&client).await;
    assert_eq!(after.metadata.resource_version, live.metadata.resource_version);
    assert_eq!(after.data, live.data);
    assert!(
        r.metrics()
            .render()
            .contains("mailroute_operator_reconciles_total{result=\"error\"} 2")
    );

    // The API recovers: back to normal, nothing to write.
    let ok = r.reconcile().await.unwrap();
    assert_eq!(ok.config_hash, first.config_hash);
    assert!(!ok.wrote_config);
}

#[tokio::test]
async fn a_failed_secret_read_is_an_error_not_a_missing_secret() {
    let failing = Arc::new(AtomicUsize::new(0));
    let f = failing.clone();
    let funcs = interceptor::Funcs::new().get(move |ctx| {
        if ctx.name == "gmail-credentials" && f.load(Ordering::SeqCst) == 1 {
            return Err(FakeError::Internal("connection reset by peer".into()));
        }
        Ok(None)
    });
    let client = fake_client(examples_plus(""), Some(funcs)).await;
    let r = reconciler(client.clone(), None, None);
    r.reconcile().await.unwrap();
    let live = live_config(&client).await;

    failing.store(1, Ordering::SeqCst);
    let err = r.reconcile().await.unwrap_err();
    assert!(
        matches!(&err, ReconcileError::ReadSecret { name, .. } if name == "gmail-credentials"),
        "{err}"
    );
    assert_eq!(live_config(&client).await.data, live.data);
    let gmail = route(&client, "mail", "gmail").await;
    assert_eq!(sr(&route_condition(&gmail, "Ready")), ("True", "InConfig"));
}

async fn usage_server(token: &'static str, used: i64) -> (String, tokio::task::JoinHandle<()>) {
    let app = Router::new().route(
        "/api/v1/quotas",
        get(move |headers: HeaderMap| async move {
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {token}")) {
                return (StatusCode::UNAUTHORIZED, "bad token".to_string());
            }
            let body = serde_json::json!({"quotas": [{"id": "mail/shop-42", "usage": {"month": {
                "used": used, "limit": 10000, "remaining": 10000 - used, "resetsAt": "2024-06-01T00:00:00+09:00"
            }}}]});
            (StatusCode::OK, body.to_string())
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, task)
}

#[tokio::test]
async fn quota_usage_comes_from_the_relay_admin_api() {
    let (url, server) = usage_server("admin-token", 1234).await;
    let client = fake_client(examples_plus(""), None).await;
    let good = UsageClient::new(&url, "admin-token", Duration::from_secs(5)).unwrap();
    let r = reconciler(client.clone(), None, Some(good));
    r.reconcile().await.unwrap();
    let shop = quota(&client, "mail", "shop-42").await.status.unwrap();
    let month = shop.usage.unwrap().month.unwrap();
    assert_eq!((month.used, month.limit, month.remaining), (1234, 10000, 8766));
    assert_eq!(month.resets_at, "2024-06-01T00:00:00+09:00");
    // A quota the relays do not report has no usage yet.
    assert!(
        quota(&client, "mail", "billing-app")
            .await
            .status
            .unwrap()
            .usage
            .is_none()
    );

    // A rejected token: the reconcile still succeeds and the usage shown stays.
    let bad = UsageClient::new(&url, "wrong", Duration::from_secs(5)).unwrap();
    let r2 = reconciler(client.clone(), None, Some(bad));
    let outcome = r2.reconcile().await.unwrap();
    assert_eq!(outcome.status_writes, 0);
    let kept = quota(&client, "mail", "shop-42").await.status.unwrap().usage.unwrap();
    assert_eq!(kept.month.unwrap().used, 1234);
    server.abort();
}

#[tokio::test]
async fn connection_test_results_reach_the_route_status() {
    let pki = TestPki::new();
    let server = SmtpServer::start(
        Script::new()
            .starttls(pki.server_config())
            .auth("relay", "good-password"),
    )
    .unwrap();
    let mut objs = objects(&upstream_route(server.port(), "starttls", ""));
    add_upstream_secrets(&mut objs, &pki.ca_pem, "relay", "good-password");
    let client = fake_client(objs, None).await;
    let r = reconciler(client.clone(), Some(Duration::from_secs(3600)), None);
    let settings = conntest_settings();

    let outcome = r.reconcile().await.unwrap();
    let [job] = &outcome.tests[..] else {
        panic!("{:?}", outcome.tests)
    };
    let pending = route_condition(&route(&client, "mail", "upstream").await, "Verified");
    assert_eq!(sr(&pending), ("Unknown", "Pending"));
    r.test_started(&job.route_id);
    assert!(
        r.reconcile().await.unwrap().tests.is_empty(),
        "no second test while one runs"
    );
    r.test_finished(&job.route_id, conntest::run(job, &settings).await);

    let outcome = r.reconcile().await.unwrap();
    assert!(outcome.tests.is_empty());
    let wait = outcome.next_test_in.unwrap();
    assert!(
        wait > Duration::from_secs(3500) && wait <= Duration::from_secs(3600),
        "{wait:?}"
    );
    let upstream = route(&client, "mail", "upstream").await;
    assert_eq!(sr(&route_condition(&upstream, "Verified")), ("True", "Connected"));
    let last = upstream.status.unwrap().last_connection_test.unwrap();
    assert_eq!(last.result, "Succeeded");
    assert!(
        r.metrics()
            .render()
            .contains("mailroute_route_verified{route=\"mail/upstream\"} 1")
    );

    // The password is changed to a wrong one: a new test runs at once and the reply shows.
    Api::<Secret>::namespaced(client.clone(), "mail")
        .replace("upstream-creds", &PostParams::default(), &{
            let mut s = Api::<Secret>::namespaced(client.clone(), "mail")
                .get("upstream-creds")
                .await
                .unwrap();
            s.data = secret("mail", "x", &[("username", "relay"), ("password", "stale")]).data;
            s
        })
        .await
        .unwrap();
    let outcome = r.reconcile().await.unwrap();
    let [job] = &outcome.tests[..] else {
        panic!("{:?}", outcome.tests)
    };
    r.test_started(&job.route_id);
    r.test_finished(&job.route_id, conntest::run(job, &settings).await);
    r.reconcile().await.unwrap();
    let upstream = route(&client, "mail", "upstream").await;
    let verified = route_condition(&upstream, "Verified");
    assert_eq!(sr(&verified), ("False", "AuthenticationFailed"));
    assert!(
        verified
            .message
            .ends_with("AUTH failed: 535 5.7.8 Username and password not accepted."),
        "{}",
        verified.message
    );
    let last = upstream.status.unwrap().last_connection_test.unwrap();
    assert_eq!(
        last.reply.as_deref(),
        Some("535 5.7.8 Username and password not accepted.")
    );
    assert!(
        r.metrics()
            .render()
            .contains("mailroute_route_verified{route=\"mail/upstream\"} 0")
    );
    let events = Api::<Event>::namespaced(client.clone(), "mail")
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let reasons: BTreeMap<String, String> = events
        .iter()
        .map(|e| (e.reason.clone().unwrap(), e.type_.clone().unwrap()))
        .collect();
    assert_eq!(reasons.get("AuthenticationFailed").map(String::as_str), Some("Warning"));
    assert_eq!(reasons.get("Connected").map(String::as_str), Some("Normal"));
}

/// Captured log output.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const OAUTH_CLIENT_SECRET: &str = "cs-Hh42~operator-client-secret";
const OAUTH_REFRESH_TOKEN: &str = "rt-Mm08-operator-refresh";
const OAUTH_ACCESS_PREFIX: &str = "EwBop-Tt63-access-";

/// OAuth2 routes through the whole reconcile: the connection test gets a token from the token
/// endpoint and authenticates with XOAUTH2 (`Verified=True`); a wrong client secret makes
/// `Verified=False` quote the endpoint's AADSTS error. Neither the ConfigMap, the statuses, the
/// Events nor the operator's log output (every level) show the client secret, the refresh token,
/// the private key or an access token.
#[tokio::test]
async fn oauth2_routes_are_verified_with_a_token_and_nothing_secret_reaches_the_outputs() {
    use mailroute_oauth::RsaKey;
    use mailroute_testkit::token_endpoint::{AADSTS7000215, Endpoint, Settings};
    use tracing_subscriber::layer::SubscriberExt as _;
    const KEY: &str = include_str!("../../testkit/keys/dkim-rsa-2048.pem");

    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("trace"))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_ansi(false),
        );
    // A current-thread runtime: the test's tasks log through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let e = Endpoint::start(Settings {
        client_secret: OAUTH_CLIENT_SECRET.into(),
        refresh_token: OAUTH_REFRESH_TOKEN.into(),
        rotate: true,
        public_key: RsaKey::from_pem(KEY).unwrap().public_key_der(),
        token_prefix: OAUTH_ACCESS_PREFIX.into(),
        refresh_prefix: "rt-Rr77-rotated-".into(),
        ..Settings::default()
    })
    .await;
    let pki = TestPki::new();
    let up = SmtpServer::start(Script::new().starttls(pki.server_config()).xoauth2(e.token_check())).unwrap();
    let route = |name: &str, oauth2: &str| {
        format!(
            "---\napiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: {name}, namespace: mail}}\nspec:\n  host: localhost\n  port: {}\n  tls: {{mode: starttls, caSecretRef: {{name: upstream-ca, key: ca.crt}}}}\n  auth: {{oauth2: {{{oauth2}, tokenUrl: \"{}\", secretRef: {{name: {name}-oauth}}}}}}\n  priority: {}\n  match: {{recipientDomains: [\"{name}.example\"]}}\n",
            up.port(),
            e.url(),
            name.len()
        )
    };
    let mut objs = objects(&format!(
        "{}{}{}",
        route("secret", "grant: clientCredentials"),
        route("certificate", "grant: clientCredentials, clientAuth: certificate"),
        route("refresh", "grant: refreshToken, provider: microsoft"),
    ));
    objs.secrets
        .push(secret("mail", "upstream-ca", &[("ca.crt", &pki.ca_pem)]));
    let common = [
        ("user", "relay@contoso.example"),
        ("tenant", "tenant-1"),
        ("client-id", "app-1"),
    ];
    fn with<'a>(common: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        [common, extra].concat()
    }
    objs.secrets.push(secret(
        "mail",
        "secret-oauth",
        &with(&common, &[("client-secret", OAUTH_CLIENT_SECRET)]),
    ));
    objs.secrets.push(secret(
        "mail",
        "certificate-oauth",
        &with(&common, &[("tls.crt", &e.pki.cert_pem), ("tls.key", KEY)]),
    ));
    objs.secrets.push(secret(
        "mail",
        "refresh-oauth",
        &with(
            &common,
            &[
                ("client-secret", OAUTH_CLIENT_SECRET),
                ("refresh-token", OAUTH_REFRESH_TOKEN),
            ],
        ),
    ));
    let client = fake_client(objs, None).await;
    let r = reconciler(client.clone(), Some(Duration::from_secs(3600)), None);
    let settings = conntest_settings_with_tokens(&e);

    let run_tests = async |r: &Arc<mailroute_operator::reconcile::Reconciler>| {
        let outcome = r.reconcile().await.unwrap();
        for job in &outcome.tests {
            r.test_started(&job.route_id);
            r.test_finished(&job.route_id, conntest::run(job, &settings).await);
        }
        r.reconcile().await.unwrap();
        outcome.tests.len()
    };
    assert_eq!(run_tests(&r).await, 3);
    for name in ["secret", "certificate", "refresh"] {
        let v = route_condition(&route_of(&client, name).await, "Verified");
        assert_eq!(sr(&v), ("True", "Connected"), "{name}: {v:?}");
        assert!(v.message.contains("AUTH XOAUTH2 accepted"), "{}", v.message);
    }
    assert_eq!(e.requests(), 3);
    assert_eq!(up.xoauth2_tokens().len(), 3);

    // The client secret is replaced by a wrong one: the test runs again and the condition quotes
    // the token endpoint.
    let secrets = Api::<Secret>::namespaced(client.clone(), "mail");
    let mut s = secrets.get("secret-oauth").await.unwrap();
    s.data = secret(
        "mail",
        "x",
        &with(&common, &[("client-secret", "cs-wrong-Kk19-secret")]),
    )
    .data;
    secrets
        .replace("secret-oauth", &PostParams::default(), &s)
        .await
        .unwrap();
    assert_eq!(run_tests(&r).await, 1);
    let failed = route_of(&client, "secret").await;
    let v = route_condition(&failed, "Verified");
    assert_eq!(sr(&v), ("False", "TokenRequestFailed"));
    assert_eq!(
        v.message,
        format!(
            "localhost:{}: OAuth2 token request failed: https://127.0.0.1:{}: invalid_client: {AADSTS7000215}",
            up.port(),
            e.port
        )
    );
    let last = failed.status.clone().unwrap().last_connection_test.unwrap();
    assert_eq!(last.step.as_deref(), Some("token"));

    // Every output, searched for every secret value.
    let mut outputs: Vec<(String, String)> = Vec::new();
    outputs.push((
        "ConfigMap".into(),
        serde_json::to_string(&live_config(&client).await).unwrap(),
    ));
    let events = Api::<Event>::namespaced(client.clone(), "mail")
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("TokenRequestFailed") && e.type_.as_deref() == Some("Warning"))
    );
    outputs.push(("Events".into(), serde_json::to_string(&events).unwrap()));
    for name in ["secret", "certificate", "refresh"] {
        let status = route_of(&client, name).await.status;
        outputs.push((format!("status of {name}"), serde_json::to_string(&status).unwrap()));
    }
    outputs.push(("/metrics".into(), r.metrics().render()));
    outputs.push((
        "log output".into(),
        String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned(),
    ));
    let mut values = vec![
        OAUTH_CLIENT_SECRET.to_string(),
        "cs-wrong-Kk19-secret".into(),
        OAUTH_REFRESH_TOKEN.into(),
        OAUTH_ACCESS_PREFIX.into(),
        // Rotated refresh tokens.
        "rt-Rr77-rotated-".into(),
    ];
    values.extend(KEY.lines().filter(|l| !l.starts_with("-----")).map(String::from));
    for (what, text) in &outputs {
        assert!(!text.is_empty(), "{what} is empty");
        for v in &values {
            assert!(!text.contains(v.as_str()), "{what} shows a secret ({v}):\n{text}");
        }
    }
    // The secrets are where the relays read them: the Secret the operator writes.
    let out = Api::<Secret>::namespaced(client.clone(), OPERATOR_NS)
        .get("mailroute-secrets")
        .await
        .unwrap();
    assert!(secret_strings(&out)[SECRETS_KEY].contains(OAUTH_REFRESH_TOKEN));
}

async fn route_of(client: &kube::Client, name: &str) -> mailroute_api::SmtpRoute {
    route(client, "mail", name).await
}
