//! Outbound delivery against the testkit SMTP server over real TCP and TLS on loopback:
//! smarthost TLS modes and AUTH, reply reporting and classification, connection reuse and
//! limits, MX delivery through an injected resolver and through a real DNS server, From
//! override and DKIM as received on the wire.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{plain, smarthost, upstream};
use mailroute_api::config::{Credentials, Upstream};
use mailroute_api::route::{AuthMechanism, TlsMode};
use mailroute_relay::EnhancedStatusCode;
use mailroute_relay::outbound::bounce::{BounceClass, Failure, Kind};
use mailroute_relay::outbound::delivery::{
    AttemptResult, Deliverer, DelivererConfig, DeliveryTarget, DkimSigner, Envelope, HickoryResolver, MxResolver,
    Outcome, Stage, StaticResolver,
};
use mailroute_testkit::TestPki;
use mailroute_testkit::smtp::{Behaviour, Script, SmtpServer, Stage as ServerStage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const WAIT: Duration = Duration::from_secs(10);

const BODY: &[u8] = b"From: Shop <orders@shop.example>\r\n\
To: Bob <bob@example.test>\r\n\
Subject: Order 42\r\n\
Date: Sun, 1 Mar 2026 10:00:00 +0000\r\n\
Message-ID: <42@shop.example>\r\n\
\r\n\
Thanks for your order.\r\n\
.a line starting with a dot\r\n";

fn config() -> DelivererConfig {
    DelivererConfig {
        helo_name: "relay.test".into(),
        ..DelivererConfig::default()
    }
}

fn deliverer(config: DelivererConfig, resolver: impl MxResolver + 'static) -> Deliverer {
    Deliverer::new(config, Arc::new(resolver)).expect("deliverer")
}

/// A deliverer whose MX deliveries go to `mx_port` (a test server's) instead of 25.
fn mx_deliverer(mx_port: u16, resolver: impl MxResolver + 'static) -> Deliverer {
    deliverer(DelivererConfig { mx_port, ..config() }, resolver)
}

fn plain_deliverer() -> Deliverer {
    deliverer(config(), StaticResolver::new())
}

/// A smarthost target that verifies the server's certificate for `server_name` against `ca_pem`.
fn verifying(route: &str, mut up: Upstream, server_name: &str, ca_pem: &str) -> DeliveryTarget {
    up.verify_tls = true;
    up.custom_ca = true;
    up.server_name = Some(server_name.into());
    let mut t = smarthost(route, up);
    t.custom_ca_pem = Some(ca_pem.into());
    t
}

fn env(rcpt: &str) -> Envelope<'_> {
    Envelope {
        mail_from: "orders@shop.example",
        rcpt_to: rcpt,
    }
}

fn creds(user: &str, pass: &str) -> Credentials {
    Credentials {
        username: user.into(),
        password: pass.into(),
    }
}

/// Delivers [`BODY`] to `rcpt` without credentials or DKIM.
async fn send(d: &Deliverer, t: &DeliveryTarget, rcpt: &str) -> AttemptResult {
    d.deliver(t, None, None, &env(rcpt), BODY).await
}

/// Delivers [`BODY`] to `rcpt`, authenticating as `(user, password)`.
async fn send_as(d: &Deliverer, t: &DeliveryTarget, (user, pass): (&str, &str), rcpt: &str) -> AttemptResult {
    d.deliver(t, Some(&creds(user, pass)), None, &env(rcpt), BODY).await
}

fn reply_of(r: &AttemptResult) -> (Stage, u16, String) {
    match &r.outcome {
        Outcome::Rejected { stage, reply } => (*stage, reply.code, reply.text.clone()),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn failure_of(r: &AttemptResult) -> (Stage, Failure) {
    match &r.outcome {
        Outcome::Failed { stage, failure, .. } => (*stage, *failure),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn plain_delivery_is_byte_exact() {
    let server = SmtpServer::start(Script::new()).expect("server");
    let d = plain_deliverer();
    let r = send(&d, &plain("mail/plain", server.port()), "bob@example.test").await;
    assert!(r.is_delivered(), "{r:?}");
    let reply = r.reply().expect("reply");
    assert_eq!(reply.code, 250);
    assert_eq!(reply.enhanced, Some(EnhancedStatusCode::new(2, 0, 0)));
    assert_eq!(reply.text, "2.0.0 OK queued as 1");
    assert_eq!(r.verdict(), None);
    assert!(!r.tls);
    assert_eq!(r.remote_host.as_deref(), Some("127.0.0.1"));
    assert_eq!(r.remote_addr, Some(server.addr()));

    let got = server.wait_for(1, WAIT).await.expect("received");
    assert_eq!(got[0].mail_from, "orders@shop.example");
    assert_eq!(got[0].rcpts, ["bob@example.test"]);
    assert_eq!(
        got[0].data, BODY,
        "the message must arrive unchanged (dot-stuffing undone, no extra line)"
    );
    assert!(!got[0].tls);
}

#[tokio::test]
async fn required_starttls_with_auth_plain_and_login() {
    let pki = TestPki::new();
    let script = Script::new()
        .starttls(pki.server_config())
        .require_starttls(true)
        .auth("relay-user", "s3cret");
    let server = SmtpServer::start(script).expect("server");
    let d = plain_deliverer();
    for (i, mechanism) in [AuthMechanism::Plain, AuthMechanism::Login].into_iter().enumerate() {
        let mut up = upstream(server.port(), TlsMode::Starttls);
        up.auth = Some(mechanism);
        let t = verifying(&format!("mail/starttls-{i}"), up, "localhost", &pki.ca_pem);
        let r = send_as(&d, &t, ("relay-user", "s3cret"), "bob@example.test").await;
        assert!(r.is_delivered(), "{mechanism:?}: {r:?}");
        assert!(r.tls, "{mechanism:?}");
    }
    let got = server.wait_for(2, WAIT).await.expect("received");
    for m in &got {
        assert!(m.tls);
        assert_eq!(m.auth_user.as_deref(), Some("relay-user"));
    }
}

/// Forwards TCP connections to `target`, recording what clients send and optionally delaying
/// every chunk the server sends (simulated latency, so concurrent attempts overlap).
struct RecordingProxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingProxy {
    async fn start(target: SocketAddr) -> Self {
        Self::with_latency(target, Duration::ZERO).await
    }

    async fn with_latency(target: SocketAddr, latency: Duration) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            record.lock().expect("lock").extend_from_slice(&buf[..n]);
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = sr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            tokio::time::sleep(latency).await;
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Self { addr, seen, task }
    }

    fn commands(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().expect("lock")).into_owned()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn configured_auth_mechanism_is_the_one_used() {
    // Plain text so the proxy can read the dialogue; the server offers both PLAIN and LOGIN.
    let server = SmtpServer::start(Script::new().auth("u", "p")).expect("server");
    let d = plain_deliverer();
    for (mechanism, expected, other) in [
        (AuthMechanism::Login, "AUTH LOGIN\r\n", "AUTH PLAIN"),
        (AuthMechanism::Plain, "AUTH PLAIN ", "AUTH LOGIN"),
    ] {
        let proxy = RecordingProxy::start(server.addr()).await;
        let mut up = upstream(proxy.addr.port(), TlsMode::None);
        up.auth = Some(mechanism);
        let r = send_as(&d, &smarthost(&format!("mail/{expected}"), up), ("u", "p"), "b@x.test").await;
        assert!(r.is_delivered(), "{r:?}");
        let sent = proxy.commands();
        assert!(sent.contains(expected), "{mechanism:?}: {sent}");
        assert!(!sent.contains(other), "{mechanism:?}: {sent}");
        assert!(sent.starts_with("EHLO relay.test\r\n"), "{sent}");
    }
}

#[tokio::test]
async fn implicit_tls_trusting_a_custom_ca() {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().implicit_tls(pki.server_config())).expect("server");
    let d = plain_deliverer();
    let up = upstream(server.port(), TlsMode::Implicit);
    let t = verifying("mail/smtps", up, "localhost", &pki.ca_pem);
    let r = send(&d, &t, "bob@example.test").await;
    assert!(r.is_delivered(), "{r:?}");
    assert!(r.tls);
    assert!(server.wait_for(1, WAIT).await.expect("received")[0].tls);
}

#[tokio::test]
async fn certificate_verification_failure_is_a_tls_failure() {
    let pki = TestPki::new();
    let other_ca = TestPki::new();
    let server = SmtpServer::start(Script::new().implicit_tls(pki.server_config())).expect("server");
    let d = plain_deliverer();
    let up = upstream(server.port(), TlsMode::Implicit);
    // Trusting an unrelated CA: the server's certificate does not chain to it.
    let t = verifying("mail/wrong-ca", up.clone(), "localhost", &other_ca.ca_pem);
    let r = send(&d, &t, "bob@example.test").await;
    assert_eq!(failure_of(&r).1, Failure::Tls, "{r:?}");
    let v = r.verdict().expect("a failure");
    assert_eq!((v.kind, v.class), (Kind::Temporary, BounceClass::TlsFailure));

    // Right CA, wrong name.
    let t = verifying("mail/wrong-name", up, "smtp.elsewhere.test", &pki.ca_pem);
    let r = send(&d, &t, "bob@example.test").await;
    assert_eq!(failure_of(&r).1, Failure::Tls, "{r:?}");
    assert_eq!(server.received().len(), 0);

    // STARTTLS required but not offered.
    let plain = SmtpServer::start(Script::new()).expect("server");
    let r = send(
        &d,
        &smarthost("mail/no-starttls", upstream(plain.port(), TlsMode::Starttls)),
        "b@x.test",
    )
    .await;
    assert_eq!(failure_of(&r), (Stage::StartTls, Failure::Tls), "{r:?}");
    assert_eq!(plain.received().len(), 0, "nothing may be sent in plain text");
}

#[tokio::test]
async fn bad_credentials_surface_the_535_reply() {
    let pki = TestPki::new();
    let script = Script::new().starttls(pki.server_config()).auth("relay-user", "right");
    let server = SmtpServer::start(script).expect("server");
    let d = plain_deliverer();
    let mut up = upstream(server.port(), TlsMode::Starttls);
    up.auth = Some(AuthMechanism::Plain);
    let r = send_as(&d, &smarthost("mail/auth", up), ("relay-user", "wrong"), "b@x.test").await;
    assert_eq!(
        reply_of(&r),
        (
            Stage::Auth,
            535,
            "5.7.8 Username and password not accepted.".to_string()
        )
    );
    assert_eq!(
        r.reply().and_then(|x| x.enhanced),
        Some(EnhancedStatusCode::new(5, 7, 8))
    );
    let v = r.verdict().expect("failure");
    assert_eq!((v.kind, v.class), (Kind::Permanent, BounceClass::AuthFailure));
    assert!(r.tls, "AUTH happened after STARTTLS");
    assert_eq!(server.received().len(), 0);
}

#[tokio::test]
async fn a_route_that_requires_auth_never_sends_without_credentials() {
    // An upstream that would take the message without AUTH: the relay must not give it one
    // (an OAuth2 route whose token this relay cannot fetch, a Secret without the password).
    let server = SmtpServer::start(Script::new()).expect("server");
    let d = plain_deliverer();
    for mechanism in [AuthMechanism::Xoauth2, AuthMechanism::Plain] {
        let mut up = upstream(server.port(), TlsMode::None);
        up.auth = Some(mechanism);
        let r = send(&d, &smarthost("mail/oauth", up), "b@x.test").await;
        let v = r.verdict().expect("a failure");
        assert_eq!((v.kind, v.class), (Kind::Temporary, BounceClass::AuthFailure), "{r:?}");
        assert!(r.summary().contains("not sending without AUTH"), "{}", r.summary());
    }
    assert_eq!(server.received().len(), 0, "nothing may leave unauthenticated");
}

#[tokio::test]
async fn temporary_and_permanent_replies_are_reported_exactly() {
    let server = SmtpServer::start(Script::new().behaviours([
        Behaviour::TempFail("451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (AS761)".into()),
        Behaviour::PermFail("550 5.1.1 <bob@example.test>: Recipient address rejected: User unknown".into()),
    ]))
    .expect("server");
    let d = plain_deliverer();
    let t = plain("mail/replies", server.port());

    let r = send(&d, &t, "bob@example.test").await;
    let (stage, code, text) = reply_of(&r);
    assert_eq!((stage, code), (Stage::Message, 451));
    assert_eq!(
        text,
        "4.7.500 Server busy. Please try again later from [127.0.0.1]. (AS761)"
    );
    assert_eq!(
        r.reply().and_then(|x| x.enhanced),
        Some(EnhancedStatusCode::new(4, 7, 500)),
        "three-digit detail kept"
    );
    let v = r.verdict().expect("failure");
    assert_eq!((v.kind, v.class), (Kind::Temporary, BounceClass::RateLimited));

    let r = send(&d, &t, "bob@example.test").await;
    let (stage, code, text) = reply_of(&r);
    assert_eq!((stage, code), (Stage::Message, 550));
    assert_eq!(
        text,
        "5.1.1 <bob@example.test>: Recipient address rejected: User unknown"
    );
    let v = r.verdict().expect("failure");
    assert_eq!((v.kind, v.class), (Kind::Permanent, BounceClass::InvalidRecipient));
    assert_eq!(r.summary(), format!("550 {text}"));

    // Rejections at RCPT are reported at that stage and leave the connection usable.
    let rcpt_server = SmtpServer::start(
        Script::new()
            .stage(ServerStage::Rcpt)
            .then(Behaviour::PermFail("550 5.1.1 User unknown".into())),
    )
    .expect("server");
    let t = plain("mail/rcpt", rcpt_server.port());
    let r = send(&d, &t, "nobody@example.test").await;
    assert_eq!(reply_of(&r), (Stage::RcptTo, 550, "5.1.1 User unknown".to_string()));
    let r = send(&d, &t, "bob@example.test").await;
    assert!(r.is_delivered(), "{r:?}");
    assert!(r.reused_connection, "the connection survives a rejected recipient");
    assert_eq!(rcpt_server.connections(), 1);
}

#[tokio::test]
async fn dropped_and_refused_connections_are_temporary_failures() {
    let server = SmtpServer::start(Script::new().then(Behaviour::Drop)).expect("server");
    let d = plain_deliverer();
    let r = send(&d, &plain("mail/drop", server.port()), "b@x.test").await;
    assert_eq!(failure_of(&r), (Stage::Message, Failure::ConnectionLost), "{r:?}");
    assert_eq!(r.verdict().map(|v| v.kind), Some(Kind::Temporary));
    assert_eq!(server.received().len(), 0);

    let closed = {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        l.local_addr().expect("addr").port()
    };
    let r = send(&d, &plain("mail/refused", closed), "b@x.test").await;
    assert_eq!(failure_of(&r), (Stage::Connect, Failure::ConnectionRefused), "{r:?}");
    assert_eq!(r.verdict().map(|v| v.kind), Some(Kind::Temporary));

    // A 421 greeting is a reply, reported at the greeting.
    let busy = SmtpServer::start(Script::new().greeting("421 4.3.2 Too busy, try later")).expect("server");
    let r = send(&d, &plain("mail/busy", busy.port()), "b@x.test").await;
    assert_eq!(
        reply_of(&r),
        (Stage::Greeting, 421, "4.3.2 Too busy, try later".to_string())
    );
}

#[tokio::test]
async fn connections_are_reused_up_to_messages_per_connection() {
    let server = SmtpServer::start(Script::new()).expect("server");
    let d = plain_deliverer();
    let t = plain("mail/reuse", server.port());
    let mut reused = Vec::new();
    for i in 0..5 {
        let r = send(&d, &t, &format!("r{i}@example.test")).await;
        assert!(r.is_delivered(), "{r:?}");
        reused.push(r.reused_connection);
    }
    assert_eq!(reused, [false, true, true, true, true]);
    assert_eq!(server.connections(), 1, "one session carried all five messages");
    let got = server.wait_for(5, WAIT).await.expect("received");
    let rcpts: Vec<&str> = got.iter().map(|m| m.rcpts[0].as_str()).collect();
    assert_eq!(
        rcpts,
        [
            "r0@example.test",
            "r1@example.test",
            "r2@example.test",
            "r3@example.test",
            "r4@example.test"
        ]
    );

    let server = SmtpServer::start(Script::new()).expect("server");
    let mut t = plain("mail/reuse-2", server.port());
    t.messages_per_connection = Some(2);
    for i in 0..5 {
        assert!(send(&d, &t, &format!("r{i}@example.test")).await.is_delivered());
    }
    server.wait_for(5, WAIT).await.expect("received");
    assert_eq!(server.connections(), 3, "2 + 2 + 1 messages");
}

/// Delivers 12 messages at once through a route limited to `limit` connections, behind 30 ms of
/// simulated latency per server reply; returns the number of connections the server saw.
async fn concurrent_connections(limit: u32) -> usize {
    let server = SmtpServer::start(Script::new()).expect("server");
    let proxy = RecordingProxy::with_latency(server.addr(), Duration::from_millis(30)).await;
    let d = plain_deliverer();
    let mut t = plain("mail/limited", proxy.addr.port());
    t.max_connections = Some(limit);
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let d = d.clone();
            let t = t.clone();
            tokio::spawn(async move { send(&d, &t, &format!("c{i}@example.test")).await })
        })
        .collect();
    for task in tasks {
        let r = task.await.expect("task");
        assert!(r.is_delivered(), "{r:?}");
    }
    assert_eq!(server.wait_for(12, WAIT).await.expect("received").len(), 12);
    let stats = d.stats();
    assert_eq!(stats.in_use, 0);
    assert!(stats.idle <= limit as usize, "{stats:?}");
    server.connections()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_connection_limit_holds_under_concurrency() {
    let limited = concurrent_connections(2).await;
    assert!((1..=2).contains(&limited), "{limited} connections for a limit of 2");
    // The same load with a high limit opens more connections: the limit above is what held it.
    let unlimited = concurrent_connections(12).await;
    assert!(unlimited > 2, "only {unlimited} connections without a tight limit");
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let server = SmtpServer::start(Script::new()).expect("server");
    let d = deliverer(
        DelivererConfig {
            idle_timeout: Duration::from_millis(300),
            ..config()
        },
        StaticResolver::new(),
    );
    let t = plain("mail/idle", server.port());
    assert!(send(&d, &t, "a@example.test").await.is_delivered());
    assert_eq!(d.stats().idle, 1);
    let deadline = Instant::now() + WAIT;
    while d.stats().idle > 0 {
        assert!(
            Instant::now() < deadline,
            "idle connection never closed: {:?}",
            d.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = send(&d, &t, "b@example.test").await;
    assert!(r.is_delivered() && !r.reused_connection, "{r:?}");
    assert_eq!(server.connections(), 2);
}

#[tokio::test]
async fn broken_pooled_connection_is_retried_once_on_a_fresh_one() {
    // Message 1 accepted; message 2's RCPT kills the (pooled) connection; the retry on a new
    // connection is accepted.
    let server = SmtpServer::start(Script::new().stage(ServerStage::Rcpt).behaviours([
        Behaviour::Accept,
        Behaviour::Drop,
        Behaviour::Accept,
    ]))
    .expect("server");
    let d = plain_deliverer();
    let t = plain("mail/stale", server.port());
    assert!(send(&d, &t, "a@example.test").await.is_delivered());
    let r = send(&d, &t, "b@example.test").await;
    assert!(r.is_delivered(), "{r:?}");
    assert!(!r.reused_connection, "delivered on the fresh connection");
    assert_eq!(server.connections(), 2);
    assert_eq!(server.wait_for(2, WAIT).await.expect("received").len(), 2);

    // On a fresh connection the same drop is reported, not retried.
    let server = SmtpServer::start(Script::new().stage(ServerStage::Rcpt).then(Behaviour::Drop)).expect("server");
    let t = plain("mail/stale-fresh", server.port());
    let r = send(&d, &t, "a@example.test").await;
    assert_eq!(failure_of(&r), (Stage::RcptTo, Failure::ConnectionLost), "{r:?}");
    assert_eq!(server.connections(), 1);
}

fn lo() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

#[tokio::test]
async fn mx_delivery_with_opportunistic_starttls_and_preference_fallback() {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().starttls(pki.server_config())).expect("server");
    // The preferred MX is on 127.0.0.2, where nothing listens on the server's port.
    let resolver = StaticResolver::new()
        .with_mx("example.test", 20, "mx2.example.test")
        .with_mx("example.test", 10, "mx1.example.test")
        .with_host("mx1.example.test", IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .with_host("mx2.example.test", lo());
    let d = mx_deliverer(server.port(), resolver);
    let target = DeliveryTarget::direct_mx("mail/direct");
    let r = send(&d, &target, "bob@example.test").await;
    assert!(r.is_delivered(), "{r:?}");
    assert!(r.tls, "STARTTLS is used when offered (certificate not verified for MX)");
    assert_eq!(r.remote_host.as_deref(), Some("mx2.example.test"));
    let got = server.wait_for(1, WAIT).await.expect("received");
    assert!(got[0].tls);
    assert_eq!(got[0].data, BODY);

    // Without STARTTLS on offer, MX delivery goes ahead in plain text.
    let plain = SmtpServer::start(Script::new()).expect("server");
    let d = mx_deliverer(
        plain.port(),
        StaticResolver::new()
            .with_mx("plain.test", 10, "mx.plain.test")
            .with_host("mx.plain.test", lo()),
    );
    let r = send(&d, &target, "bob@plain.test").await;
    assert!(r.is_delivered() && !r.tls, "{r:?}");
}

/// A relay whose EHLO name is a bare pod name never greets MX hosts with it: the attempt fails
/// temporarily (the mail stays queued) with a reason that names the setting to fix.
#[tokio::test]
async fn mx_delivery_refuses_an_unqualified_helo_name() {
    let server = SmtpServer::start(Script::new()).expect("server");
    let resolver = StaticResolver::new()
        .with_mx("example.test", 10, "mx.example.test")
        .with_host("mx.example.test", lo());
    let d = deliverer(
        DelivererConfig {
            mx_port: server.port(),
            helo_name: "mailroute-relay-7d9f8c-x2k4q".into(),
            ..config()
        },
        resolver.clone(),
    );
    let target = DeliveryTarget::direct_mx("mail/direct");
    let r = send(&d, &target, "bob@example.test").await;
    assert!(!r.is_delivered(), "{r:?}");
    assert_eq!(r.verdict().map(|v| v.kind), Some(Kind::Temporary), "{r:?}");
    assert!(r.summary().contains("relay.hostname"), "{}", r.summary());
    assert_eq!(server.connections(), 0, "no connection to the MX host");

    // Smarthost routes are unaffected (the smarthost knows the relay).
    let r = send(&d, &plain("mail/sh", server.port()), "bob@example.test").await;
    assert!(r.is_delivered(), "{r:?}");

    // A fully qualified name delivers.
    let d = mx_deliverer(server.port(), resolver);
    let r = send(&d, &target, "bob@example.test").await;
    assert!(r.is_delivered(), "{r:?}");
}

#[tokio::test]
async fn mx_dns_failures() {
    let d = deliverer(
        config(),
        StaticResolver::new()
            .with_mx("nullmx.test", 0, ".")
            .with_mx("dangling.test", 10, "nowhere.dangling.test"),
    );
    let target = DeliveryTarget::direct_mx("mail/direct");
    for rcpt in ["a@nxdomain.test", "a@nullmx.test", "a@dangling.test"] {
        let r = send(&d, &target, rcpt).await;
        assert_eq!(failure_of(&r), (Stage::Dns, Failure::DnsNoSuchDomain), "{rcpt}: {r:?}");
        let v = r.verdict().expect("failure");
        assert_eq!((v.kind, v.class), (Kind::Permanent, BounceClass::DnsFailure), "{rcpt}");
    }
}

/// A minimal authoritative DNS server on UDP loopback answering MX and A queries from a table.
async fn dns_server(mx: Vec<(&'static str, u16, &'static str)>, a: Vec<(&'static str, Ipv4Addr)>) -> SocketAddr {
    use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
    use hickory_resolver::proto::rr::rdata::{A, MX};
    use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind dns");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(q) = query.queries.first().cloned() else {
                continue;
            };
            let name = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
            let mut resp = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
            resp.metadata.authoritative = true;
            resp.metadata.recursion_desired = query.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            resp.add_query(q.clone());
            let known = mx.iter().any(|(d, _, _)| *d == name) || a.iter().any(|(h, _)| *h == name);
            match q.query_type() {
                RecordType::MX => {
                    for (d, pref, ex) in &mx {
                        if *d == name {
                            let ex = Name::from_ascii(ex).expect("name");
                            resp.add_answer(Record::from_rdata(q.name().clone(), 60, RData::MX(MX::new(*pref, ex))));
                        }
                    }
                }
                RecordType::A => {
                    for (h, ip) in &a {
                        if *h == name {
                            resp.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(*ip))));
                        }
                    }
                }
                _ => {}
            }
            if !known {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            if let Ok(bytes) = resp.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
        }
    });
    addr
}

#[tokio::test]
async fn hickory_resolver_against_a_real_dns_server() {
    let dns = dns_server(
        vec![
            ("example.test", 10, "mx.example.test."),
            ("example.test", 5, "mx0.example.test."),
        ],
        vec![
            ("mx.example.test", Ipv4Addr::LOCALHOST),
            ("mx0.example.test", Ipv4Addr::new(127, 0, 0, 2)),
        ],
    )
    .await;
    let resolver = HickoryResolver::with_server(dns).expect("resolver");
    let mut mx = resolver.mx("example.test").await.expect("mx");
    mx.sort_by_key(|r| r.preference);
    let hosts: Vec<(u16, String)> = mx.into_iter().map(|r| (r.preference, r.exchange)).collect();
    assert_eq!(
        hosts,
        [
            (5, "mx0.example.test.".to_string()),
            (10, "mx.example.test.".to_string())
        ]
    );
    assert_eq!(resolver.ips("mx.example.test").await.expect("a"), [lo()]);
    assert!(matches!(
        resolver.mx("missing.test").await,
        Err(mailroute_relay::outbound::delivery::DnsError::NoSuchDomain(_))
    ));

    // End to end: the deliverer resolves through the DNS server and falls back from mx0.
    let server = SmtpServer::start(Script::new()).expect("server");
    let d = mx_deliverer(server.port(), resolver);
    let r = send(&d, &DeliveryTarget::direct_mx("mail/direct"), "bob@example.test").await;
    assert!(r.is_delivered(), "{r:?}");
    assert_eq!(r.remote_host.as_deref(), Some("mx.example.test"));
    let r = send(&d, &DeliveryTarget::direct_mx("mail/direct"), "bob@missing.test").await;
    assert_eq!(failure_of(&r), (Stage::Dns, Failure::DnsNoSuchDomain), "{r:?}");
}

#[tokio::test]
async fn from_override_and_dkim_as_received() {
    let server = SmtpServer::start(Script::new()).expect("server");
    let d = plain_deliverer();
    let mut t = plain("mail/override", server.port());
    t.from_override = Some("noreply@relay.example".into());
    let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIKqI1cA4MPeCfi0VBYZ2cZ0gC0dK2ajbFxVGAiHKXqmc\n-----END PRIVATE KEY-----\n";
    let signer = DkimSigner::new("relay.example", "mailroute", pem).expect("key");
    let r = d.deliver(&t, None, Some(&signer), &env("bob@example.test"), BODY).await;
    assert!(r.is_delivered(), "{r:?}");

    let got = server.wait_for(1, WAIT).await.expect("received");
    assert_eq!(got[0].mail_from, "noreply@relay.example", "envelope sender overridden");
    let text = got[0].data_str();
    assert!(text.starts_with("DKIM-Signature: "), "{text}");
    assert!(text.contains("d=relay.example"), "{text}");
    assert!(text.contains("s=mailroute"), "{text}");
    assert!(
        text.contains("\r\nFrom: Shop <noreply@relay.example>\r\nReply-To: Shop <orders@shop.example>\r\n"),
        "{text}"
    );
    assert!(
        text.ends_with("Thanks for your order.\r\n.a line starting with a dot\r\n"),
        "{text}"
    );

    // The signature on the received bytes verifies against the public key.
    let record = mailroute_testkit::dkim::ed25519_record(pem);
    let results = mailroute_testkit::dkim::verify(&got[0].data, "mailroute._domainkey.relay.example.", &record).await;
    assert_eq!(results, vec![mail_auth::DkimResult::Pass]);
}

#[tokio::test]
async fn silent_server_times_out() {
    // Accepts TCP but never greets.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            open.push(s);
        }
    });
    let d = plain_deliverer();
    let mut target = plain("mail/silent", port);
    target.timeouts.greeting_ms = 300;
    let started = Instant::now();
    let r = send(&d, &target, "b@x.test").await;
    assert_eq!(failure_of(&r), (Stage::Greeting, Failure::Timeout), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(r.verdict().map(|v| v.kind), Some(Kind::Temporary));
    hold.abort();
}

/// A scripted SMTP peer offering only AUTH XOAUTH2 and checking the token it receives.
async fn xoauth2_server(expected: &'static str) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
    use base64::Engine as _;
    use tokio::io::{AsyncBufReadExt, BufReader};
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut lines = Vec::new();
        let Ok((stream, _)) = listener.accept().await else {
            return lines;
        };
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let _ = w.write_all(b"220 xoauth.test ESMTP\r\n").await;
        let mut in_data = false;
        let mut line = String::new();
        while r.read_line(&mut line).await.unwrap_or(0) > 0 {
            let cmd = line.trim_end().to_string();
            line.clear();
            if in_data {
                if cmd == "." {
                    in_data = false;
                    let _ = w.write_all(b"250 2.0.0 queued\r\n").await;
                }
                continue;
            }
            lines.push(cmd.clone());
            let upper = cmd.to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") {
                b"250-xoauth.test\r\n250 AUTH XOAUTH2\r\n"
            } else if let Some(token) = cmd.strip_prefix("AUTH XOAUTH2 ") {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(token)
                    .unwrap_or_default();
                if decoded == expected.as_bytes() {
                    b"235 2.7.0 Accepted\r\n"
                } else {
                    b"535 5.7.8 Invalid token\r\n"
                }
            } else if upper.starts_with("MAIL") || upper.starts_with("RCPT") {
                b"250 2.1.0 OK\r\n"
            } else if upper == "DATA" {
                in_data = true;
                b"354 go ahead\r\n"
            } else if upper == "QUIT" {
                let _ = w.write_all(b"221 bye\r\n").await;
                break;
            } else {
                b"502 5.5.1 unexpected\r\n"
            };
            let _ = w.write_all(reply).await;
        }
        lines
    });
    (addr, task)
}

#[tokio::test]
async fn xoauth2_sends_the_bearer_token() {
    let (addr, server) = xoauth2_server("user=me@gmail.test\x01auth=Bearer ya29.token\x01\x01").await;
    let d = plain_deliverer();
    let mut up = upstream(addr.port(), TlsMode::None);
    up.auth = Some(AuthMechanism::Xoauth2);
    let mut t = smarthost("mail/gmail", up);
    t.messages_per_connection = Some(1);
    let r = send_as(&d, &t, ("me@gmail.test", "ya29.token"), "b@x.test").await;
    assert!(r.is_delivered(), "{r:?}");
    assert_eq!(r.reply().map(|x| x.text.as_str()), Some("2.0.0 queued"));
    let lines = tokio::time::timeout(WAIT, server)
        .await
        .expect("server done")
        .expect("server task");
    assert!(lines.iter().any(|l| l.starts_with("AUTH XOAUTH2 ")), "{lines:?}");
    assert!(
        lines.iter().any(|l| l == "QUIT"),
        "a spent connection is closed politely: {lines:?}"
    );
}

/// Reads from `s` into `buf` until it ends with `end`.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) {
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(end) {
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "client closed early; got {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn with_pipelining_the_envelope_goes_out_without_waiting_for_replies() {
    let listener = TcpListener::bind((lo(), 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = Vec::new();
        s.write_all(b"220 fake ESMTP\r\n").await.expect("greet");
        read_until(&mut s, &mut buf, b"\r\n").await;
        s.write_all(b"250-fake\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
            .await
            .expect("ehlo");
        buf.clear();
        // Nothing is answered before DATA arrives: a client waiting for each reply stalls here.
        tokio::time::timeout(WAIT, read_until(&mut s, &mut buf, b"DATA\r\n"))
            .await
            .expect("MAIL, RCPT and DATA were sent without waiting for replies");
        let envelope = String::from_utf8_lossy(&buf).into_owned();
        s.write_all(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
            .await
            .expect("replies");
        buf.clear();
        read_until(&mut s, &mut buf, b"\r\n.\r\n").await;
        s.write_all(b"250 2.0.0 queued as P1\r\n").await.expect("final");
        (envelope, buf)
    });
    let d = plain_deliverer();
    let r = send(&d, &plain("mail/pipelined", port), "bob@example.test").await;
    assert!(r.is_delivered(), "{r:?}");
    assert_eq!(r.reply().expect("reply").text, "2.0.0 queued as P1");
    let (envelope, content) = server.await.expect("server");
    assert_eq!(
        envelope,
        "MAIL FROM:<orders@shop.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    );
    assert!(content.starts_with(b"From: Shop"), "{content:?}");
    assert!(
        content.ends_with(b"\r\n..a line starting with a dot\r\n.\r\n"),
        "dot-stuffed"
    );
}

/// A server answering RCPTs with `behaviours`, offering PIPELINING only if `pipelining`.
fn rcpt_scripted(pipelining: bool, behaviours: impl IntoIterator<Item = Behaviour>) -> SmtpServer {
    let mut script = Script::new().stage(ServerStage::Rcpt).behaviours(behaviours);
    if !pipelining {
        script.ehlo_extensions.retain(|e| e != "PIPELINING");
    }
    SmtpServer::start(script).expect("server")
}

#[tokio::test]
async fn replies_are_reported_at_their_stage_with_and_without_pipelining() {
    for pipelining in [true, false] {
        let server = rcpt_scripted(
            pipelining,
            [
                Behaviour::PermFail("550 5.1.1 User unknown".into()),
                Behaviour::TempFail("452 4.2.2 Mailbox full".into()),
            ],
        );
        let d = plain_deliverer();
        let t = plain("mail/stages", server.port());
        let r = send(&d, &t, "nobody@example.test").await;
        assert_eq!(
            reply_of(&r),
            (Stage::RcptTo, 550, "5.1.1 User unknown".to_string()),
            "pipelining {pipelining}"
        );
        let r = send(&d, &t, "full@example.test").await;
        assert_eq!(
            reply_of(&r),
            (Stage::RcptTo, 452, "4.2.2 Mailbox full".to_string()),
            "pipelining {pipelining}"
        );
        let r = send(&d, &t, "bob@example.test").await;
        assert!(r.is_delivered(), "pipelining {pipelining}: {r:?}");
        assert!(r.reused_connection, "one connection carries all three");
        let got = server.wait_for(1, WAIT).await.expect("received");
        assert_eq!(got[0].rcpts, ["bob@example.test"]);
        assert_eq!(got[0].data, BODY, "pipelining {pipelining}");
        assert_eq!(server.connections(), 1);
    }
}

#[tokio::test]
async fn rset_only_after_an_unfinished_transaction_or_without_pipelining() {
    for pipelining in [true, false] {
        let server = rcpt_scripted(
            pipelining,
            [
                Behaviour::Accept,
                Behaviour::Accept,
                Behaviour::PermFail("550 5.1.1 User unknown".into()),
            ],
        );
        let d = plain_deliverer();
        let t = plain("mail/rset", server.port());
        for rcpt in ["a@example.test", "b@example.test"] {
            assert!(send(&d, &t, rcpt).await.is_delivered());
        }
        let after_two = server.resets();
        assert_eq!(reply_of(&send(&d, &t, "nobody@example.test").await).1, 550);
        let r = send(&d, &t, "c@example.test").await;
        assert!(r.is_delivered() && r.reused_connection, "{r:?}");
        if pipelining {
            assert_eq!(after_two, 0, "a delivered transaction needs no RSET before the next");
            assert_eq!(server.resets(), 1, "the refused one does");
        } else {
            assert_eq!((after_two, server.resets()), (1, 3), "RSET before every reuse");
        }
        assert_eq!(server.connections(), 1);
    }
}

/// One pipelined transaction on a fake server: greeting and EHLO already done.
async fn serve_pipelined_transaction(s: &mut TcpStream, queue_id: &str) {
    let mut buf = Vec::new();
    read_until(s, &mut buf, b"DATA\r\n").await;
    s.write_all(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
        .await
        .expect("replies");
    buf.clear();
    read_until(s, &mut buf, b"\r\n.\r\n").await;
    s.write_all(format!("250 2.0.0 queued as {queue_id}\r\n").as_bytes())
        .await
        .expect("final");
}

async fn greet_pipelining(s: &mut TcpStream) {
    let mut buf = Vec::new();
    s.write_all(b"220 fake ESMTP\r\n").await.expect("greet");
    read_until(s, &mut buf, b"\r\n").await;
    s.write_all(b"250-fake\r\n250 PIPELINING\r\n").await.expect("ehlo");
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_while_idle_is_replaced_without_an_error() {
    let listener = TcpListener::bind((lo(), 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (mut first, _) = listener.accept().await.expect("accept");
        greet_pipelining(&mut first).await;
        serve_pipelined_transaction(&mut first, "A1").await;
        // The server's idle timeout: a 421 and the connection goes.
        first.write_all(b"421 4.4.2 idle timeout\r\n").await.expect("421");
        drop(first);
        let _ = closed_tx.send(());
        let (mut second, _) = listener.accept().await.expect("accept again");
        greet_pipelining(&mut second).await;
        serve_pipelined_transaction(&mut second, "B2").await;
    });
    let d = plain_deliverer();
    let t = plain("mail/idle-closed", port);
    assert!(send(&d, &t, "a@example.test").await.is_delivered());
    closed_rx.await.expect("server closed the first connection");
    let r = send(&d, &t, "b@example.test").await;
    assert!(r.is_delivered(), "{r:?}");
    assert_eq!(r.reply().expect("reply").text, "2.0.0 queued as B2");
    assert!(!r.reused_connection, "delivered on a new connection");
    server.await.expect("server");
}

/// The SHA-256 fingerprint of the certificate in `pem`, as `openssl x509 -fingerprint -sha256`
/// prints it (upper case, colons).
fn openssl_fingerprint(pem: &str) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM");
    mailroute_tls::format_fingerprint(&mailroute_tls::sha256_fingerprint(&der))
}

/// A self-signed certificate with the CA flag (what `openssl req -x509` makes) used as the
/// upstream's own: trusting it as a CA fails (rustls: CaUsedAsEndEntity); pinning it by its
/// fingerprint delivers; a wrong fingerprint is refused with an error naming the certificate's.
#[tokio::test]
async fn a_self_signed_ca_certificate_is_trusted_by_pinning_only() {
    let own = TestPki::self_signed_ca().expect("certificate");
    let server = SmtpServer::start(Script::new().starttls(own.server_config())).expect("server");
    let d = plain_deliverer();
    let up = upstream(server.port(), TlsMode::Starttls);

    let t = verifying("mail/as-ca", up.clone(), "localhost", &own.cert_pem);
    let r = send(&d, &t, "bob@example.test").await;
    assert_eq!(failure_of(&r).1, Failure::Tls, "{r:?}");
    assert!(format!("{r:?}").contains("CaUsedAsEndEntity"), "{r:?}");

    let fp = openssl_fingerprint(&own.cert_pem);
    let pinned = |route: &str, fp: &str| {
        let mut up = up.clone();
        up.verify_tls = true;
        up.pinned_sha256 = vec![mailroute_api::compile::parse_sha256_fingerprint(fp).expect("fingerprint")];
        smarthost(route, up)
    };
    let r = send(&d, &pinned("mail/pinned", &fp), "bob@example.test").await;
    assert!(r.is_delivered(), "{r:?}");
    assert!(r.tls);

    let wrong = openssl_fingerprint(&TestPki::self_signed_ca().expect("certificate").cert_pem);
    let r = send(&d, &pinned("mail/wrong-pin", &wrong), "bob@example.test").await;
    assert_eq!(failure_of(&r).1, Failure::Tls, "{r:?}");
    let text = format!("{r:?}");
    assert!(
        text.contains(&format!(
            "the server's certificate (SHA-256 {fp}) is not the pinned one"
        )),
        "{text}"
    );
    assert_eq!(server.received().len(), 1);
}

/// The same upstream through a route's YAML: `tls.pinnedCertSecretRef` (the certificate's PEM
/// in a Secret) and `tls.pinnedSha256` both deliver through the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_route_pinned_by_certificate_or_fingerprint_delivers() {
    let own = TestPki::self_signed_ca().expect("certificate");
    let server = SmtpServer::start(Script::new().starttls(own.server_config())).expect("server");
    let pem: String = own.cert_pem.lines().map(|l| format!("    {l}\n")).collect();
    let fp = openssl_fingerprint(&own.cert_pem);
    let port = server.port();
    let routes = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: upstream-cert, namespace: mail}}\ntype: Opaque\nstringData:\n  tls.crt: |\n{pem}---\n\
         apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: by-cert, namespace: mail}}\nspec:\n  host: 127.0.0.1\n  port: {port}\n  tls: {{mode: starttls, serverName: localhost, pinnedCertSecretRef: {{name: upstream-cert, key: tls.crt}}}}\n  match: {{recipientDomains: [cert.example]}}\n---\n\
         apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: by-fp, namespace: mail}}\nspec:\n  host: 127.0.0.1\n  port: {port}\n  tls: {{mode: starttls, pinnedSha256: [\"{fp}\"]}}\n  match: {{recipientDomains: [fp.example]}}\n---\n"
    );
    let r = crate::common::start(&routes, "memory", |_| {}).await;
    assert!(
        r.relay.config.get().warnings.is_empty(),
        "{:?}",
        r.relay.config.get().warnings
    );
    for rcpt in ["a@cert.example", "b@fp.example"] {
        let t = crate::common::submit(r.smtp(), "app@app.example", &[rcpt], &crate::common::message(rcpt, "")).await;
        assert!(t.delivered(), "{t}");
    }
    let got = server
        .wait_for(2, Duration::from_secs(30))
        .await
        .expect("both delivered");
    assert!(got.iter().all(|m| m.tls));
    r.relay.shutdown().await;
}
