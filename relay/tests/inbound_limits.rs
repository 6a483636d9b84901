//! What clients can make the relay hold, over real TCP and TLS: password checks bounded and
//! answered `454 4.7.0` beyond the bound, AUTH failures counted per client address across
//! sessions, message bodies within a global budget (`452 4.3.1` beyond it), and idle sessions
//! closed with `421 4.3.2` at shutdown while a message in DATA still finishes.
//!
//! Memory is asserted on the relay's own gauges, not on RSS.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use argon2::password_hash::{PasswordHasher, SaltString};
use mailroute_relay::config::Source;
use mailroute_relay::queue::QueueStats;
use mailroute_testkit::TestPki;
use mailroute_testkit::smtp::client::{Reply, SmtpClient, dot_stuff};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const USER: &str = "shop-42";
const PASS: &str = "s3cret-shop-password";

/// A port with nothing listening: these relays only queue (workers = 0).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn routes() -> String {
    route("up", closed_port(), 10, &["*"]) + &inbound_user("shop-42", USER, PASS)
}

/// The value of one series (`name` or `name{labels}`) in the relay's metrics; 0 when absent.
fn metric(r: &TestRelay, series: &str) -> f64 {
    r.relay
        .metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[track_caller]
fn assert_reply(r: &Reply, code: u16, enhanced: &str) {
    assert_eq!(r.code, code, "{r}");
    assert!(r.text().starts_with(enhanced), "expected {code} {enhanced}, got {r}");
}

async fn smtps_session(r: &TestRelay, pki: &TestPki) -> SmtpClient {
    let mut c = SmtpClient::connect_tls(r.smtps(), "localhost", pki.client_config())
        .await
        .unwrap();
    assert_eq!(c.ehlo("client.example").await.unwrap().code, 250);
    c
}

fn auth_plain_line(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
    format!("AUTH PLAIN {token}\r\n")
}

// ---------------------------------------------------------------------------------------------
// AUTH
// ---------------------------------------------------------------------------------------------

/// A relay whose only user's password hash is argon2id with the default memory (19 MiB) and
/// many passes, so that one check lasts long enough for other sessions to arrive meanwhile.
async fn start_with_slow_hash(
    pki: &TestPki,
    tweak: impl FnOnce(&mut mailroute_relay::server::RelayOptions),
) -> TestRelay {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("routes.yaml");
    std::fs::write(&manifests, routes()).unwrap();
    let (config, mut secrets, _) = mailroute_relay::config::load(&Source::Manifests(vec![manifests])).unwrap();
    let params = argon2::Params::new(argon2::Params::DEFAULT_M_COST, 40, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"slow-test-salt!!").unwrap();
    let hash = argon.hash_password(PASS.as_bytes(), &salt).unwrap().to_string();
    secrets.inbound_users.get_mut(USER).unwrap().password_hash = hash;
    let (config_file, secrets_file) = (dir.path().join("relay.json"), dir.path().join("secrets.json"));
    std::fs::write(&config_file, serde_json::to_string(&config).unwrap()).unwrap();
    std::fs::write(&secrets_file, secrets.to_canonical_json()).unwrap();
    let r = start_tls("", "memory", pki, |o| {
        o.source = Source::Files {
            config: config_file,
            secrets: Some(secrets_file),
        };
        o.workers = 0;
        tweak(o);
    })
    .await;
    TestRelay { relay: r.relay, dir }
}

#[tokio::test]
async fn password_checks_are_bounded_and_answered_454_beyond_the_bound() {
    let pki = TestPki::new();
    // Default limits: two checks at once.
    let r = start_with_slow_hash(&pki, |_| {}).await;
    // Thirty TLS sessions from one address, each with one AUTH for a user that does not exist.
    let mut sessions = Vec::new();
    for _ in 0..30 {
        sessions.push(smtps_session(&r, &pki).await);
    }
    // The first two start their checks (an unknown user costs what a real one does) ...
    for c in &mut sessions[..2] {
        c.send_raw(auth_plain_line("nobody", "guess").as_bytes()).await.unwrap();
    }
    assert!(
        eventually(|| async { metric(&r, "mailroute_smtp_auth_checks_in_flight") == 2.0 }).await,
        "two password checks running"
    );
    // ... and the others arrive while they run.
    let rest = futures::future::join_all(sessions[2..].iter_mut().map(|c| async {
        c.send_raw(auth_plain_line("nobody", "guess").as_bytes()).await.unwrap();
        c.read_reply().await.unwrap()
    }))
    .await;
    let mut busy = 0;
    for reply in &rest {
        match reply.code {
            454 => {
                assert_reply(reply, 454, "4.7.0");
                busy += 1;
            }
            _ => assert_reply(reply, 535, "5.7.8"),
        }
    }
    assert!(busy > 0, "no AUTH was answered busy: {rest:?}");
    for c in &mut sessions[..2] {
        assert_reply(&c.read_reply().await.unwrap(), 535, "5.7.8");
    }
    assert_eq!(
        metric(&r, "mailroute_smtp_auth_checks_in_flight_max"),
        2.0,
        "never more than the bound"
    );
    assert_eq!(metric(&r, "mailroute_smtp_auth_checks_in_flight"), 0.0);
    assert_eq!(
        metric(&r, r#"mailroute_smtp_auth_refused_total{reason="busy"}"#),
        busy as f64
    );
    // A busy answer is temporary: the right password gets through once a slot is free.
    let c = &mut sessions[2];
    assert_reply(&c.auth_plain(USER, PASS).await.unwrap(), 235, "2.7.0");
    r.relay.shutdown().await;
}

/// A client on the relay's smtps port from `source`: sends lines, reads single-line replies.
struct RawClient {
    io: BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl RawClient {
    async fn connect(addr: SocketAddr, source: &str, pki: &TestPki) -> RawClient {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let tcp = sock.connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(pki.client_config())
            .connect(name, tcp)
            .await
            .unwrap();
        let mut c = RawClient {
            io: BufReader::new(tls),
        };
        assert!(c.reply().await.starts_with("220 "));
        c.io.write_all(b"EHLO client.example\r\n").await.unwrap();
        while !c.reply().await.starts_with("250 ") {}
        c
    }

    async fn reply(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(WAIT, self.io.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        line
    }

    async fn auth(&mut self, user: &str, pass: &str) -> String {
        self.io.write_all(auth_plain_line(user, pass).as_bytes()).await.unwrap();
        self.reply().await
    }
}

#[tokio::test]
async fn auth_failures_count_per_client_address_across_sessions() {
    let pki = TestPki::new();
    let r = start_tls(&routes(), "memory", &pki, |o| {
        o.workers = 0;
        o.inbound.auth_delay = Duration::ZERO;
        o.inbound.max_auth_failures = 5;
    })
    .await;
    // Reconnecting does not start afresh: four sessions of five wrong guesses each make the
    // default twenty per address, and the address is locked out.
    for session in 0..4 {
        let mut c = RawClient::connect(r.smtps(), "127.0.0.1", &pki).await;
        for guess in 0..5 {
            let reply = c.auth(USER, &format!("guess-{session}-{guess}")).await;
            let expected = if guess < 4 { "535 5.7.8" } else { "421 4.7.0" };
            assert!(reply.starts_with(expected), "session {session}, guess {guess}: {reply}");
        }
    }
    let mut c = RawClient::connect(r.smtps(), "127.0.0.1", &pki).await;
    let reply = c.auth(USER, PASS).await;
    assert!(
        reply.starts_with("421 4.7.0 Too many authentication failures from your address"),
        "even the right password is refused while locked out: {reply}"
    );
    assert_eq!(
        metric(&r, r#"mailroute_smtp_auth_refused_total{reason="locked_out"}"#),
        1.0
    );
    assert_eq!(
        metric(&r, r#"mailroute_smtp_auth_failures_total{listener="smtps"}"#),
        20.0
    );
    // Another address is not affected.
    let mut other = RawClient::connect(r.smtps(), "127.0.0.2", &pki).await;
    assert!(other.auth(USER, PASS).await.starts_with("235 2.7.0"));
    r.relay.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Message bodies
// ---------------------------------------------------------------------------------------------

const MAX_SIZE: usize = 1_000_000;

async fn plain_session(r: &TestRelay) -> SmtpClient {
    let mut c = SmtpClient::connect(r.smtp()).await.unwrap();
    assert_eq!(c.ehlo("client.example").await.unwrap().code, 250);
    c
}

async fn stats(r: &TestRelay) -> QueueStats {
    r.relay.queue.stats(mailroute_relay::clock::now_ms()).await.unwrap()
}

fn big_message(marker: &str, size: usize) -> Vec<u8> {
    let mut m = format!("From: <app@app.example>\r\nSubject: {marker}\r\n\r\n").into_bytes();
    while m.len() < size {
        m.extend_from_slice(b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n");
    }
    m
}

#[tokio::test]
async fn declared_sizes_beyond_the_body_budget_get_452_at_data() {
    // Default budget: four times the message size limit.
    let r = start(&routes(), "memory", |o| {
        o.workers = 0;
        o.inbound.max_message_size = MAX_SIZE;
    })
    .await;
    let mut held = Vec::new();
    for i in 0..4 {
        let mut c = plain_session(&r).await;
        assert_eq!(
            c.cmd(&format!("MAIL FROM:<app@app.example> SIZE={MAX_SIZE}"))
                .await
                .unwrap()
                .code,
            250
        );
        assert_eq!(c.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
        let reply = c.cmd("DATA").await.unwrap();
        if i < 3 {
            assert_eq!(reply.code, 354, "{reply}");
            held.push(c);
        } else {
            // Three full-size messages in DATA leave less than a fourth's size.
            assert_reply(&reply, 452, "4.3.1");
            // The transaction is over; the client may try again later.
            assert_eq!(c.cmd("DATA").await.unwrap().code, 503);
            assert_eq!(c.cmd("QUIT").await.unwrap().code, 221);
        }
    }
    assert!(metric(&r, "mailroute_smtp_body_bytes_reserved") <= (4 * MAX_SIZE) as f64);
    for (i, c) in held.iter_mut().enumerate() {
        let reply = c
            .send_body(&big_message(&format!("held {i}"), MAX_SIZE - 1000))
            .await
            .unwrap();
        assert_eq!(reply.code, 250, "{reply}");
    }
    assert_eq!(stats(&r).await.messages, 3);
    assert_eq!(metric(&r, "mailroute_smtp_body_bytes_reserved"), 0.0, "given back");
    assert_eq!(metric(&r, "mailroute_smtp_body_budget_refused_total"), 1.0);
    // With the budget free again, the same declared size is accepted.
    let mut c = plain_session(&r).await;
    assert_eq!(
        c.cmd(&format!("MAIL FROM:<app@app.example> SIZE={MAX_SIZE}"))
            .await
            .unwrap()
            .code,
        250
    );
    assert_eq!(c.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
    assert_eq!(c.data(&big_message("after", 10_000)).await.unwrap().code, 250);
    r.relay.shutdown().await;
}

#[tokio::test]
async fn bodies_arriving_beyond_the_budget_are_discarded_and_refused_with_452() {
    let r = start(&routes(), "memory", |o| {
        o.workers = 0;
        o.inbound.max_message_size = MAX_SIZE;
    })
    .await;
    let budget = (4 * MAX_SIZE) as f64;
    // Five clients without SIZE, each in the middle of a 900 kB body: more than the budget.
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut c = plain_session(&r).await;
        assert_eq!(c.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
        assert_eq!(c.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
        assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
        let body = dot_stuff(&big_message(&format!("m{i}"), 900_000));
        // Everything but the final dot.
        c.send_raw(&body[..body.len() - 3]).await.unwrap();
        clients.push(c);
    }
    assert!(
        eventually(|| async { metric(&r, "mailroute_smtp_body_budget_refused_total") >= 1.0 }).await,
        "a body beyond the budget is refused as it arrives"
    );
    let mut accepted = 0u64;
    let mut refused = 0;
    for c in &mut clients {
        c.send_raw(b".\r\n").await.unwrap();
        let reply = c.read_reply().await.unwrap();
        match reply.code {
            250 => accepted += 1,
            _ => {
                assert_reply(&reply, 452, "4.3.1");
                refused += 1;
            }
        }
        // The session goes on either way.
        assert_eq!(c.cmd("NOOP").await.unwrap().code, 250);
    }
    assert!(refused >= 1 && accepted >= 3, "accepted {accepted}, refused {refused}");
    assert_eq!(stats(&r).await.messages, accepted, "only the 250s are queued");
    assert!(metric(&r, "mailroute_smtp_body_bytes_reserved_max") <= budget);
    assert_eq!(metric(&r, "mailroute_smtp_body_bytes_reserved"), 0.0);
    r.relay.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn shutdown_closes_idle_sessions_at_once_and_lets_data_finish() {
    let r = start(&routes(), "memory", |o| {
        o.workers = 0;
        // Far longer than the test's waits: the drain must not be what ends the sessions.
        o.drain_timeout = Duration::from_secs(3600);
    })
    .await;
    let queue = r.relay.queue.clone();
    let mut idle = plain_session(&r).await;
    let mut in_txn = plain_session(&r).await;
    assert_eq!(in_txn.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
    assert_eq!(in_txn.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
    let mut in_data = plain_session(&r).await;
    assert_eq!(in_data.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
    assert_eq!(in_data.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
    assert_eq!(in_data.cmd("DATA").await.unwrap().code, 354);
    in_data.send_raw(b"Subject: half\r\n\r\nfirst half\r\n").await.unwrap();

    let TestRelay { relay, dir: _dir } = r;
    let mut shutdown = tokio::spawn(relay.shutdown());
    for c in [&mut idle, &mut in_txn] {
        assert_reply(&c.read_reply().await.unwrap(), 421, "4.3.2");
        assert!(c.read_reply().await.is_err(), "closed after the 421");
    }
    // The message in DATA is still being received: it finishes and is queued, then the
    // session is closed too.
    assert!(!shutdown.is_finished());
    in_data.send_raw(b"second half\r\n.\r\n").await.unwrap();
    assert_eq!(in_data.read_reply().await.unwrap().code, 250);
    assert_reply(&in_data.read_reply().await.unwrap(), 421, "4.3.2");
    tokio::time::timeout(WAIT, &mut shutdown)
        .await
        .expect("shutdown completes without waiting for the drain timeout")
        .unwrap();
    assert_eq!(queue.stats(mailroute_relay::clock::now_ms()).await.unwrap().messages, 1);
}
