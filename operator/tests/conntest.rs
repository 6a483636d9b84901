//! The connection test against the scriptable SMTP server over real TCP and TLS on 127.0.0.1:
//! good credentials (STARTTLS and implicit TLS, with a test message), wrong credentials (the
//! server's reply ends up in the `Verified` condition), an untrusted certificate, a closed port,
//! an upstream without STARTTLS and an AUTH mechanism the upstream does not offer; OAuth2 routes
//! against a token endpoint on 127.0.0.1 (HTTPS): token, then EHLO, STARTTLS, AUTH XOAUTH2, with
//! the endpoint's error or the upstream's reply in the condition.

use std::time::Duration;

use crate::support::{conntest_settings, conntest_settings_with_tokens};
use mailroute_api::config::{Credentials, OAuth2Credentials, Upstream};
use mailroute_api::route::{AuthMechanism, OAuth2Grant, TlsMode};
use mailroute_operator::conditions::Status;
use mailroute_operator::conntest::{self, ConnTestJob, TestMessage};
use mailroute_testkit::smtp::DEFAULT_AUTH_FAIL_REPLY;
use mailroute_testkit::token_endpoint::{AADSTS7000215, Endpoint};
use mailroute_testkit::{Script, SmtpServer, TestPki};

fn job(port: u16, tls: TlsMode, auth: Option<(&str, &str)>, ca: Option<&TestPki>) -> ConnTestJob {
    ConnTestJob {
        route_id: "mail/test".into(),
        upstream: Upstream {
            host: "localhost".into(),
            port,
            tls,
            verify_tls: true,
            server_name: None,
            auth: auth.map(|_| AuthMechanism::Plain),
            custom_ca: ca.is_some(),
            pinned_sha256: Vec::new(),
        },
        credentials: auth.map(|(u, p)| Credentials {
            username: u.into(),
            password: p.into(),
        }),
        oauth2: None,
        ca_pem: ca.map(|p| p.ca_pem.clone()),
        message: None,
        fingerprint: "fp1".into(),
        previous_test_message: None,
        request_id: None,
    }
}

#[tokio::test]
async fn good_credentials_over_starttls_verify_the_route() {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().starttls(pki.server_config()).auth("user", "secret")).unwrap();
    let j = job(server.port(), TlsMode::Starttls, Some(("user", "secret")), Some(&pki));
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.result, conntest::SUCCEEDED, "{record:?}");
    assert_eq!(record.fingerprint.as_deref(), Some("fp1"));
    assert!(record.step.is_none() && record.reply.is_none());
    let c = conntest::verified_condition(&j.upstream, &record);
    assert_eq!(c.status, Status::True);
    assert_eq!(
        c.message,
        format!(
            "localhost:{} (STARTTLS): EHLO succeeded, AUTH PLAIN accepted",
            server.port()
        )
    );
    assert!(server.received().is_empty(), "no test recipient: no message");
    // The upstream's own words, step by step (what `mailroute route test` prints).
    let steps: Vec<&str> = record.replies.iter().map(|r| r.step.as_str()).collect();
    assert_eq!(steps, ["greeting", "ehlo", "starttls", "ehlo", "auth"], "{record:?}");
    let codes: Vec<&str> = record.replies.iter().map(|r| &r.reply[..3]).collect();
    assert_eq!(codes, ["220", "250", "220", "250", "235"], "{record:?}");
    assert!(record.replies[1].reply.contains("STARTTLS"), "{record:?}");
    assert!(record.replies[3].reply.contains("AUTH"), "{record:?}");
    assert!(!format!("{record:?}").contains("secret"), "nothing the operator sent");
}

#[tokio::test]
async fn implicit_tls_with_a_test_message_delivers_it_once() {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().implicit_tls(pki.server_config()).auth("user", "secret")).unwrap();
    let mut j = job(server.port(), TlsMode::Implicit, Some(("user", "secret")), Some(&pki));
    j.message = Some(TestMessage {
        from: "ops@example.com".into(),
        to: "check@example.net".into(),
    });
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.result, conntest::SUCCEEDED, "{record:?}");
    let reply = record.test_message.clone().expect("the accepted message is recorded");
    assert!(reply.starts_with("250"), "{reply}");
    let received = server.wait_for(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(received[0].mail_from, "ops@example.com");
    assert_eq!(received[0].rcpts, ["check@example.net"]);
    assert!(received[0].tls);
    assert_eq!(received[0].auth_user.as_deref(), Some("user"));
    assert!(
        received[0]
            .data_str()
            .contains("Subject: mailroute connection test for route mail/test")
    );

    // The periodic run for the same fingerprint sends nothing but keeps the record of the message.
    let decision = conntest::decide(
        Some(&record),
        "fp1",
        true,
        false,
        conntest_later(&record.time),
        Duration::from_secs(3600),
    );
    assert_eq!(decision, conntest::Decision::Run { send_message: false });
    j.message = None;
    j.previous_test_message = record.test_message.clone();
    let again = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(again.test_message, record.test_message);
    assert_eq!(server.received().len(), 1);
}

fn conntest_later(time: &str) -> k8s_openapi::jiff::Timestamp {
    let t: k8s_openapi::jiff::Timestamp = time.parse().unwrap();
    t.checked_add(k8s_openapi::jiff::SignedDuration::from_hours(2)).unwrap()
}

#[tokio::test]
async fn wrong_credentials_show_the_upstreams_reply_in_the_condition() {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().starttls(pki.server_config()).auth("user", "secret")).unwrap();
    let j = job(server.port(), TlsMode::Starttls, Some(("user", "wrong")), Some(&pki));
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.result, conntest::FAILED);
    assert_eq!(record.step.as_deref(), Some("auth"));
    assert_eq!(record.reply.as_deref(), Some(DEFAULT_AUTH_FAIL_REPLY));
    // The steps that passed, then the failing one's reply.
    let steps: Vec<&str> = record.replies.iter().map(|r| r.step.as_str()).collect();
    assert_eq!(steps, ["greeting", "ehlo", "starttls", "ehlo"], "{record:?}");
    let c = conntest::verified_condition(&j.upstream, &record);
    assert_eq!((c.status, c.reason.as_str()), (Status::False, "AuthenticationFailed"));
    assert_eq!(
        c.message,
        format!(
            "localhost:{}: AUTH failed: 535 5.7.8 Username and password not accepted.",
            server.port()
        )
    );
}

#[tokio::test]
async fn an_untrusted_certificate_fails_at_tls_unless_verification_is_off() {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().implicit_tls(pki.server_config()).auth("user", "secret")).unwrap();
    // No CA bundle: the test CA is not among the system roots.
    let mut j = job(server.port(), TlsMode::Implicit, Some(("user", "secret")), None);
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.result, conntest::FAILED, "{record:?}");
    assert_eq!(record.step.as_deref(), Some("tls"));
    let error = record.error.clone().unwrap();
    assert!(error.contains("UnknownIssuer"), "{error}");
    let c = conntest::verified_condition(&j.upstream, &record);
    assert_eq!(c.reason, "TlsFailed");
    assert!(
        c.message.contains("TLS handshake failed: invalid peer certificate"),
        "{}",
        c.message
    );

    // The route's own CA bundle makes it trusted; `verify: false` accepts it too.
    j.ca_pem = Some(pki.ca_pem.clone());
    assert_eq!(
        conntest::run(&j, &conntest_settings()).await.result,
        conntest::SUCCEEDED
    );
    j.ca_pem = None;
    j.upstream.verify_tls = false;
    assert_eq!(
        conntest::run(&j, &conntest_settings()).await.result,
        conntest::SUCCEEDED
    );

    // The certificate is for localhost and 127.0.0.1; another name fails verification.
    j.upstream.verify_tls = true;
    j.ca_pem = Some(pki.ca_pem.clone());
    j.upstream.server_name = Some("smtp.example.com".into());
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.step.as_deref(), Some("tls"), "{record:?}");

    // A CA bundle without a certificate fails here as it would in the relay.
    j.upstream.server_name = None;
    j.ca_pem = Some("not a certificate".into());
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.step.as_deref(), Some("tls"), "{record:?}");
    let error = record.error.unwrap_or_default();
    assert!(error.contains("holds no PEM certificate"), "{error}");
}

#[tokio::test]
async fn a_closed_port_fails_at_connect() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut j = job(port, TlsMode::None, None, None);
    j.upstream.host = "127.0.0.1".into();
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.result, conntest::FAILED);
    assert_eq!(record.step.as_deref(), Some("connect"));
    assert!(
        record.error.as_deref().unwrap().to_lowercase().contains("refused"),
        "{record:?}"
    );
    let c = conntest::verified_condition(&j.upstream, &record);
    assert_eq!(c.reason, "ConnectionFailed");
    assert!(
        c.message.starts_with(&format!("127.0.0.1:{port}: connect failed: ")),
        "{}",
        c.message
    );
}

#[tokio::test]
async fn starttls_required_but_not_offered_fails_at_starttls() {
    let server = SmtpServer::start(Script::new()).unwrap();
    let j = job(server.port(), TlsMode::Starttls, None, None);
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.step.as_deref(), Some("starttls"), "{record:?}");
    assert_eq!(record.error.as_deref(), Some("the upstream does not offer STARTTLS"));
}

#[tokio::test]
async fn a_mechanism_the_upstream_does_not_offer_fails_at_auth() {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().starttls(pki.server_config()).auth("user", "secret")).unwrap();
    let mut j = job(server.port(), TlsMode::Starttls, Some(("user", "secret")), Some(&pki));
    j.upstream.auth = Some(AuthMechanism::Xoauth2);
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.step.as_deref(), Some("auth"));
    assert_eq!(
        record.error.as_deref(),
        Some("the upstream does not offer AUTH XOAUTH2 (it offers: PLAIN, LOGIN)")
    );
    // LOGIN works as well as PLAIN.
    j.upstream.auth = Some(AuthMechanism::Login);
    assert_eq!(
        conntest::run(&j, &conntest_settings()).await.result,
        conntest::SUCCEEDED
    );
}

#[tokio::test]
async fn a_route_that_requires_auth_without_credentials_is_not_verified() {
    // The upstream would accept the session without AUTH; the relay would not send that way.
    let server = SmtpServer::start(Script::new()).unwrap();
    let mut j = job(server.port(), TlsMode::None, None, None);
    j.upstream.auth = Some(AuthMechanism::Xoauth2);
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.result, conntest::FAILED, "{record:?}");
    assert_eq!(record.step.as_deref(), Some("auth"));
    assert!(record.error.as_deref().unwrap_or("").contains("OAuth2"), "{record:?}");
}

#[tokio::test]
async fn a_rejecting_greeting_is_reported_with_its_reply() {
    let server = SmtpServer::start(Script::new().greeting("554 5.3.2 No service for you")).unwrap();
    let j = job(server.port(), TlsMode::None, None, None);
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.step.as_deref(), Some("greeting"));
    assert_eq!(record.reply.as_deref(), Some("554 5.3.2 No service for you"));
}

/// A self-signed certificate with the CA flag (`openssl req -x509`): refused as a CA bundle,
/// accepted when pinned by its fingerprint, refused with a clear error for another fingerprint,
/// exactly as the relay does.
#[tokio::test]
async fn a_self_signed_ca_certificate_is_verified_by_pinning() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let own = TestPki::self_signed_ca().unwrap();
    let server = SmtpServer::start(Script::new().starttls(own.server_config())).unwrap();
    let mut j = job(server.port(), TlsMode::Starttls, None, Some(&own));
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.step.as_deref(), Some("tls"), "{record:?}");
    assert!(record.error.unwrap_or_default().contains("CaUsedAsEndEntity"));

    let fp = |pem: &str| {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        hex::encode(mailroute_tls::sha256_fingerprint(&der))
    };
    j.ca_pem = None;
    j.upstream.custom_ca = false;
    j.upstream.pinned_sha256 = vec![fp(&own.cert_pem)];
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.result, conntest::SUCCEEDED, "{record:?}");

    j.upstream.pinned_sha256 = vec![fp(&TestPki::self_signed_ca().unwrap().cert_pem)];
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.step.as_deref(), Some("tls"), "{record:?}");
    let error = record.error.unwrap_or_default();
    assert!(error.contains("is not the pinned one"), "{error}");
}

/// The condition quotes the upstream's reply as the relay's delivery log does: an enhanced code
/// with a three-digit detail is not cut to what fits in a byte (mail-send reports `4.7.255`).
#[tokio::test]
async fn the_condition_quotes_the_reply_exactly_as_the_relay_reads_it() {
    let pki = TestPki::new();
    let reply = "454 4.7.500 Server busy. Please try again later";
    let server = SmtpServer::start(
        Script::new()
            .starttls(pki.server_config())
            .auth("user", "secret")
            .auth_fail_reply(reply),
    )
    .unwrap();
    let j = job(server.port(), TlsMode::Starttls, Some(("user", "wrong")), Some(&pki));
    let record = conntest::run(&j, &conntest_settings()).await;
    assert_eq!(record.step.as_deref(), Some("auth"), "{record:?}");
    assert_eq!(record.reply.as_deref(), Some(reply));
}

/// An Entra ID client (client secret) of the token endpoint, sending as relay@contoso.example.
fn oauth2_job(port: u16, pki: &TestPki, endpoint: &Endpoint, client_secret: &str) -> ConnTestJob {
    let mut j = job(port, TlsMode::Starttls, None, Some(pki));
    j.upstream.auth = Some(AuthMechanism::Xoauth2);
    j.oauth2 = Some(OAuth2Credentials {
        grant: OAuth2Grant::ClientCredentials,
        token_url: endpoint.url(),
        scope: mailroute_oauth::OFFICE365_SCOPE.into(),
        user: "relay@contoso.example".into(),
        client_id: Some("app-1".into()),
        client_secret: Some(client_secret.into()),
        certificate: None,
        private_key: None,
        assertion_algorithm: None,
        refresh_token: None,
        service_account_key: None,
    });
    j
}

#[tokio::test]
async fn an_oauth2_route_gets_a_token_then_authenticates_with_xoauth2() {
    let endpoint = Endpoint::start(Default::default()).await;
    let pki = TestPki::new();
    let server = SmtpServer::start(
        Script::new()
            .starttls(pki.server_config())
            .xoauth2(endpoint.token_check()),
    )
    .unwrap();
    let mut j = oauth2_job(server.port(), &pki, &endpoint, "right-secret");
    j.message = Some(TestMessage {
        from: "relay@contoso.example".into(),
        to: "check@example.net".into(),
    });
    let record = conntest::run(&j, &conntest_settings_with_tokens(&endpoint)).await;
    assert_eq!(record.result, conntest::SUCCEEDED, "{record:?}");
    assert_eq!(endpoint.requests(), 1);
    assert_eq!(server.xoauth2_tokens(), ["at-1"]);
    let received = server.wait_for(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(received[0].auth_user.as_deref(), Some("relay@contoso.example"));
    assert!(received[0].tls);
    let c = conntest::verified_condition(&j.upstream, &record);
    assert_eq!(c.status, Status::True);
    assert!(
        c.message.starts_with(&format!(
            "localhost:{} (STARTTLS): EHLO succeeded, AUTH XOAUTH2 accepted",
            server.port()
        )),
        "{}",
        c.message
    );
}

#[tokio::test]
async fn a_wrong_client_secret_fails_at_the_token_with_the_providers_words() {
    let endpoint = Endpoint::start(Default::default()).await;
    let pki = TestPki::new();
    let server = SmtpServer::start(
        Script::new()
            .starttls(pki.server_config())
            .xoauth2(endpoint.token_check()),
    )
    .unwrap();
    let j = oauth2_job(server.port(), &pki, &endpoint, "wrong-secret");
    let record = conntest::run(&j, &conntest_settings_with_tokens(&endpoint)).await;
    assert_eq!(record.result, conntest::FAILED, "{record:?}");
    assert_eq!(record.step.as_deref(), Some("token"));
    assert_eq!(server.connections(), 0, "no SMTP session without a token");
    let c = conntest::verified_condition(&j.upstream, &record);
    assert_eq!((c.status, c.reason.as_str()), (Status::False, "TokenRequestFailed"));
    assert_eq!(
        c.message,
        format!(
            "localhost:{}: OAuth2 token request failed: https://127.0.0.1:{}: invalid_client: {AADSTS7000215}",
            server.port(),
            endpoint.port
        )
    );
    // Neither the secret nor the tenant (the token URL's path, from the Secret).
    let shown = format!("{record:?} {c:?} {j:?}");
    assert!(
        !shown.contains("wrong-secret") && !shown.contains("tenant-1"),
        "{shown}"
    );

    // An unreachable endpoint: the transport error, naming the endpoint.
    let mut j = j;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    j.oauth2.as_mut().unwrap().token_url = format!("https://127.0.0.1:{port}/tenant-1/oauth2/v2.0/token");
    let record = conntest::run(&j, &conntest_settings_with_tokens(&endpoint)).await;
    assert_eq!(record.step.as_deref(), Some("token"), "{record:?}");
    let error = record.error.unwrap_or_default();
    assert!(
        error.starts_with(&format!("token endpoint https://127.0.0.1:{port}: connect:")),
        "{error}"
    );
}

#[tokio::test]
async fn a_token_the_upstream_refuses_fails_at_auth_with_its_reply() {
    let endpoint = Endpoint::start(Default::default()).await;
    let pki = TestPki::new();
    let refused = "535 5.7.3 Authentication unsuccessful [SN4PR0201CA0045.namprd02.prod.outlook.com]";
    // The mailbox's app has no SMTP.SendAsApp: every token is refused.
    let server = SmtpServer::start(
        Script::new()
            .starttls(pki.server_config())
            .xoauth2(mailroute_testkit::TokenCheck::new(|_, _| false))
            .auth_fail_reply(refused),
    )
    .unwrap();
    let j = oauth2_job(server.port(), &pki, &endpoint, "right-secret");
    let record = conntest::run(&j, &conntest_settings_with_tokens(&endpoint)).await;
    assert_eq!(record.step.as_deref(), Some("auth"), "{record:?}");
    assert_eq!(record.reply.as_deref(), Some(refused));
    let c = conntest::verified_condition(&j.upstream, &record);
    assert_eq!(c.reason, "AuthenticationFailed");
    assert!(c.message.ends_with(&format!("AUTH failed: {refused}")), "{}", c.message);
    assert!(!format!("{record:?} {c:?}").contains("at-1"));
}
