//! The relay's inbound SMTP side over real TCP and TLS: never an open relay, submission and
//! implicit TLS with AUTH, STARTTLS command injection, ESMTP extensions and limits, the
//! extension headers, and a `250` only once the queue holds the message.

use std::time::{Duration, Instant};

use crate::common::*;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use mailroute_relay::queue::QueueStats;
use mailroute_testkit::smtp::client::{Reply, SmtpClient, dot_stuff};
use mailroute_testkit::{RedisServer, Script, SmtpServer, TestPki};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const USER: &str = "shop-42";
const PASS: &str = "s3cret-shop-password";

/// An upstream route for every domain plus the inbound user `shop-42`.
fn routes(upstream_port: u16) -> String {
    route("up", upstream_port, 10, &["*"]) + &inbound_user("shop-42", USER, PASS)
}

/// A port with nothing listening: for relays that only queue (workers = 0).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cidrs(s: &str) -> Vec<ipnet::IpNet> {
    mailroute_relay::server::parse_cidrs(s).unwrap()
}

async fn stats(r: &TestRelay) -> QueueStats {
    r.relay.queue.stats(mailroute_relay::clock::now_ms()).await.unwrap()
}

async fn assert_nothing_queued(r: &TestRelay) {
    assert_eq!(stats(r).await, QueueStats::default(), "nothing may be queued");
}

#[track_caller]
fn assert_reply(r: &Reply, code: u16, enhanced: &str) {
    assert_eq!(r.code, code, "{r}");
    assert!(r.text().starts_with(enhanced), "expected {code} {enhanced}, got {r}");
}

/// The queue id from `250 2.0.0 Ok: queued as <id>`.
fn queue_id(r: &Reply) -> String {
    assert_eq!(r.code, 250, "{r}");
    let id = r
        .text()
        .strip_prefix("2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("no queue id in {r}"))
        .to_owned();
    assert!(!id.is_empty() && !id.contains(char::is_whitespace), "{r}");
    id
}

async fn connect(addr: std::net::SocketAddr) -> SmtpClient {
    let c = SmtpClient::connect(addr).await.unwrap();
    assert_eq!(c.greeting().code, 220, "{}", c.greeting());
    c
}

/// A plain connection upgraded with STARTTLS (verifying the test CA), EHLO sent again.
async fn connect_starttls(addr: std::net::SocketAddr, pki: &TestPki) -> SmtpClient {
    let mut c = connect(addr).await;
    assert_eq!(c.ehlo("client.example").await.unwrap().code, 250);
    assert_eq!(c.starttls("localhost", pki.client_config()).await.unwrap().code, 220);
    assert!(c.is_tls());
    assert_eq!(c.ehlo("client.example").await.unwrap().code, 250);
    c
}

/// Runs MAIL, RCPT and DATA with a small message; returns the reply to the end of data.
async fn transaction(c: &mut SmtpClient, marker: &str, extra_headers: &str) -> Reply {
    assert_reply(&c.cmd("MAIL FROM:<app@app.example>").await.unwrap(), 250, "2.1.0");
    assert_reply(&c.cmd("RCPT TO:<user@example.com>").await.unwrap(), 250, "2.1.5");
    c.data(&message(marker, extra_headers)).await.unwrap()
}

/// Expects the server to have closed the connection.
async fn assert_closed(c: &mut SmtpClient) {
    let r = c.read_reply().await;
    assert!(r.is_err(), "connection still open, got {r:?}");
}

// ---------------------------------------------------------------------------------------------
// Never an open relay
// ---------------------------------------------------------------------------------------------

/// Recipient forms used by public open-relay testers: plain external domains, the percent
/// hack, quoted local parts, double @, source routes, bang paths, address literals, bare
/// local parts. A relay with no local mailboxes must refuse every one from an untrusted source.
const RELAY_PROBES: &[&str] = &[
    "RCPT TO:<user@external.example>",
    "RCPT TO:<USER@EXTERNAL.EXAMPLE>",
    "RCPT TO:<user@external.example.>",
    "RCPT TO:user@external.example",
    "RCPT TO: <user@external.example>",
    "RCPT TO:<user%external.example@relay.test>",
    "RCPT TO:<user%external.example@[127.0.0.1]>",
    "RCPT TO:<\"user@external.example\">",
    "RCPT TO:<\"user@external.example\"@relay.test>",
    "RCPT TO:<\"user%external.example\"@relay.test>",
    "RCPT TO:<user@external.example@relay.test>",
    "RCPT TO:<@relay.test:user@external.example>",
    "RCPT TO:<@relay.test,@other.example:user@external.example>",
    "RCPT TO:<external.example!user>",
    "RCPT TO:<external.example!user@relay.test>",
    "RCPT TO:<user@[127.0.0.1]>",
    "RCPT TO:<user@127.0.0.1>",
    "RCPT TO:<user@localhost>",
    "RCPT TO:<user@relay.test>",
    "RCPT TO:<postmaster>",
    "RCPT TO:<postmaster@relay.test>",
    "RCPT TO:<abuse>",
];

/// Senders the testers combine them with: null, the relay's own domain, the target's domain,
/// an address literal.
const RELAY_PROBE_SENDERS: &[&str] = &[
    "MAIL FROM:<>",
    "MAIL FROM:<spamtest@relay.test>",
    "MAIL FROM:<spamtest@external.example>",
    "MAIL FROM:<spamtest@[127.0.0.1]>",
];

#[tokio::test]
async fn unauthenticated_clients_outside_the_relay_cidrs_cannot_relay_anywhere() {
    let r = start(&routes(closed_port()), "memory", |o| {
        o.inbound.relay_cidrs = cidrs("10.0.0.0/8");
        o.workers = 0;
    })
    .await;
    let mut refused_554 = 0u64;
    let mut table = Vec::new();
    for (i, sender) in RELAY_PROBE_SENDERS.iter().enumerate() {
        let mut c = connect(r.smtp()).await;
        // Testers use both HELO and EHLO.
        let greet = if i % 2 == 0 {
            "EHLO tester.example"
        } else {
            "HELO tester.example"
        };
        assert_eq!(c.cmd(greet).await.unwrap().code, 250);
        let m = c.cmd(sender).await.unwrap();
        // The sender alone is not the decision; refusing it would be fine too.
        if m.code != 250 {
            table.push(format!("{sender} -> {m}"));
            continue;
        }
        for probe in RELAY_PROBES {
            let rep = c.cmd(probe).await.unwrap();
            table.push(format!("{sender} {probe} -> {rep}"));
            match rep.code {
                554 => {
                    assert!(rep.text().starts_with("5.7.1"), "{probe}: {rep}");
                    refused_554 += 1;
                }
                501 => {}
                _ => panic!("{sender} {probe} was not refused: {rep}\n{}", table.join("\n")),
            }
        }
        let d = c.cmd("DATA").await.unwrap();
        assert!(matches!(d.code, 503 | 554), "DATA after refused recipients: {d}");
        // A tester pushing a body anyway: each line is a bad command, never a message.
        c.send_raw(b"Subject: relay test\r\n\r\nrelay test\r\n.\r\n")
            .await
            .unwrap();
        for _ in 0..4 {
            assert!(c.read_reply().await.unwrap().is_permanent());
        }
        assert_eq!(c.cmd("QUIT").await.unwrap().code, 221);
    }
    // The plain external address is the one every tester tries: exactly 554 5.7.1.
    assert!(
        table
            .iter()
            .any(|l| l.contains("RCPT TO:<user@external.example> -> 554 5.7.1")),
        "{}",
        table.join("\n")
    );
    assert_nothing_queued(&r).await;
    let rejected = r
        .relay
        .metrics()
        .recipients_received
        .with_label_values(&["smtp", "rejected"])
        .get();
    assert_eq!(rejected, refused_554, "each relay refusal is counted");
    r.relay.shutdown().await;
}

#[tokio::test]
async fn clients_in_the_relay_cidrs_may_relay() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&routes(up.port()), "memory", |o| {
        o.inbound.relay_cidrs = cidrs("10.0.0.0/8,127.0.0.0/8");
    })
    .await;
    let t = submit(
        r.smtp(),
        "app@app.example",
        &["user@external.example"],
        &message("ok", ""),
    )
    .await;
    assert!(t.delivered(), "{t}");
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got[0].rcpts, ["user@external.example"]);
    assert!(got[0].data_str().contains("with ESMTP id"), "{}", got[0].data_str());
    r.relay.shutdown().await;
}

#[tokio::test]
async fn authenticated_clients_may_relay_on_the_plain_listener_from_anywhere() {
    let pki = TestPki::new();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start_tls(&routes(up.port()), "memory", &pki, |o| {
        o.inbound.relay_cidrs = cidrs("10.0.0.0/8");
    })
    .await;
    let mut c = connect(r.smtp()).await;
    assert_reply(
        &c.auth_plain(USER, PASS).await.unwrap(),
        503,
        "5.5.1", // no EHLO yet
    );
    let ehlo = c.ehlo("client.example").await.unwrap();
    assert!(ehlo.has_extension("STARTTLS"), "{ehlo}");
    assert!(!ehlo.has_extension("AUTH"), "AUTH is offered only under TLS: {ehlo}");
    assert_reply(&c.auth_plain(USER, PASS).await.unwrap(), 538, "5.7.11");
    assert_reply(&c.cmd("MAIL FROM:<app@app.example>").await.unwrap(), 250, "2.1.0");
    assert_reply(&c.cmd("RCPT TO:<user@example.com>").await.unwrap(), 554, "5.7.1");
    assert_eq!(c.cmd("RSET").await.unwrap().code, 250);
    assert_eq!(c.starttls("localhost", pki.client_config()).await.unwrap().code, 220);
    // RFC 3207: the session starts over after STARTTLS, EHLO first.
    assert_reply(&c.cmd("MAIL FROM:<app@app.example>").await.unwrap(), 503, "5.5.1");
    let ehlo = c.ehlo("client.example").await.unwrap();
    assert!(ehlo.has_extension("AUTH"), "{ehlo}");
    assert_reply(&c.auth_plain(USER, PASS).await.unwrap(), 235, "2.7.0");
    queue_id(&transaction(&mut c, "plain-auth", "").await);
    c.quit().await.unwrap();
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert!(got[0].data_str().contains("with ESMTPSA id"), "{}", got[0].data_str());
    r.relay.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Submission (587) and implicit TLS (465)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn submission_never_relays_without_auth_even_from_a_relay_cidr() {
    let pki = TestPki::new();
    // Loopback is an allowed relay source for the plain listener; submission ignores that.
    let r = start_tls(&routes(closed_port()), "memory", &pki, |o| o.workers = 0).await;
    let mut c = connect(r.submission()).await;
    let ehlo = c.ehlo("client.example").await.unwrap();
    assert!(ehlo.has_extension("STARTTLS"), "{ehlo}");
    assert!(
        !ehlo.has_extension("AUTH"),
        "AUTH before TLS must not be offered: {ehlo}"
    );
    assert_reply(&c.cmd("MAIL FROM:<app@app.example>").await.unwrap(), 530, "5.7.0");
    assert_reply(&c.cmd("RCPT TO:<user@example.com>").await.unwrap(), 503, "5.5.1");
    let token = B64.encode(format!("\0{USER}\0{PASS}"));
    let r538 = c.cmd(&format!("AUTH PLAIN {token}")).await.unwrap();
    assert!(matches!(r538.code, 538 | 530), "AUTH before STARTTLS: {r538}");
    assert_reply(&r538, 538, "5.7.11");
    assert_reply(&c.cmd("AUTH LOGIN").await.unwrap(), 538, "5.7.11");
    assert_eq!(c.starttls("localhost", pki.client_config()).await.unwrap().code, 220);
    let ehlo = c.ehlo("client.example").await.unwrap();
    assert!(!ehlo.has_extension("STARTTLS"), "{ehlo}");
    assert!(
        ehlo.lines
            .iter()
            .any(|l| l == "250-AUTH PLAIN LOGIN" || l == "250 AUTH PLAIN LOGIN"),
        "{ehlo}"
    );
    assert_reply(&c.cmd("MAIL FROM:<app@app.example>").await.unwrap(), 530, "5.7.0");
    assert_reply(&c.cmd("RCPT TO:<user@example.com>").await.unwrap(), 503, "5.5.1");
    let d = c.cmd("DATA").await.unwrap();
    assert!(matches!(d.code, 503 | 554), "{d}");
    c.quit().await.unwrap();
    assert_nothing_queued(&r).await;
    r.relay.shutdown().await;
}

#[tokio::test]
async fn submission_accepts_auth_plain_and_login_after_starttls() {
    let pki = TestPki::new();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start_tls(&routes(up.port()), "memory", &pki, |_| {}).await;
    let user64 = B64.encode(USER);
    let pass64 = B64.encode(PASS);

    // PLAIN with an initial response.
    let mut c = connect_starttls(r.submission(), &pki).await;
    assert_reply(&c.auth_plain(USER, PASS).await.unwrap(), 235, "2.7.0");
    assert_reply(&c.auth_plain(USER, PASS).await.unwrap(), 503, "5.5.1");
    queue_id(&transaction(&mut c, "plain-ir", "").await);
    c.quit().await.unwrap();

    // PLAIN after an empty challenge.
    let mut c = connect_starttls(r.submission(), &pki).await;
    assert_eq!(c.cmd("AUTH PLAIN").await.unwrap().lines, ["334 "]);
    let token = B64.encode(format!("{USER}\0{USER}\0{PASS}"));
    assert_reply(&c.cmd(&token).await.unwrap(), 235, "2.7.0");
    queue_id(&transaction(&mut c, "plain-challenge", "").await);
    c.quit().await.unwrap();

    // LOGIN with both challenges.
    let mut c = connect_starttls(r.submission(), &pki).await;
    assert_eq!(c.cmd("AUTH LOGIN").await.unwrap().lines, ["334 VXNlcm5hbWU6"]);
    assert_eq!(c.cmd(&user64).await.unwrap().lines, ["334 UGFzc3dvcmQ6"]);
    assert_reply(&c.cmd(&pass64).await.unwrap(), 235, "2.7.0");
    queue_id(&transaction(&mut c, "login", "").await);
    c.quit().await.unwrap();

    // LOGIN with the user name as initial response.
    let mut c = connect_starttls(r.submission(), &pki).await;
    assert_eq!(
        c.cmd(&format!("AUTH LOGIN {user64}")).await.unwrap().lines,
        ["334 UGFzc3dvcmQ6"]
    );
    assert_reply(&c.cmd(&pass64).await.unwrap(), 235, "2.7.0");
    queue_id(&transaction(&mut c, "login-ir", "").await);
    c.quit().await.unwrap();

    // A cancelled exchange is not a success.
    let mut c = connect_starttls(r.submission(), &pki).await;
    assert_eq!(c.cmd("AUTH LOGIN").await.unwrap().code, 334);
    assert_reply(&c.cmd("*").await.unwrap(), 501, "5.0.0");
    assert_reply(&c.cmd("MAIL FROM:<app@app.example>").await.unwrap(), 530, "5.7.0");
    c.quit().await.unwrap();

    let got = up.wait_for(4, WAIT).await.unwrap();
    for m in &got {
        let data = m.data_str();
        assert!(data.contains("with ESMTPSA id"), "{data}");
        assert_eq!(m.rcpts, ["user@example.com"]);
    }
    r.relay.shutdown().await;
}

#[tokio::test]
async fn failed_auth_is_refused_then_the_connection_is_dropped() {
    let pki = TestPki::new();
    let r = start_tls(&routes(closed_port()), "memory", &pki, |o| {
        o.workers = 0;
        o.inbound.auth_delay = Duration::ZERO;
        o.inbound.max_auth_failures = 5;
    })
    .await;
    let mut c = connect_starttls(r.submission(), &pki).await;
    let wrong = [
        (USER, "wrong-password"),
        ("nobody", PASS),
        ("SHOP-42", PASS),
        (USER, ""),
    ];
    for (u, p) in wrong {
        assert_reply(&c.auth_plain(u, p).await.unwrap(), 535, "5.7.8");
    }
    // Wrong via LOGIN counts too, and the fifth failure ends the session.
    assert_eq!(c.cmd("AUTH LOGIN").await.unwrap().code, 334);
    assert_eq!(c.cmd(&B64.encode(USER)).await.unwrap().code, 334);
    assert_reply(&c.cmd(&B64.encode("guess")).await.unwrap(), 421, "4.7.0");
    assert_closed(&mut c).await;
    let failures = r
        .relay
        .metrics()
        .smtp_auth_failures
        .with_label_values(&["submission"])
        .get();
    assert_eq!(failures, 5);
    // The right password still works in a new session.
    let mut c = connect_starttls(r.submission(), &pki).await;
    assert_reply(&c.auth_plain(USER, PASS).await.unwrap(), 235, "2.7.0");
    c.quit().await.unwrap();
    r.relay.shutdown().await;
}

#[tokio::test]
async fn repeated_auth_failures_are_slowed_down() {
    let pki = TestPki::new();
    let delay = Duration::from_millis(400);
    let r = start_tls(&routes(closed_port()), "memory", &pki, |o| {
        o.workers = 0;
        o.inbound.auth_delay = delay;
        o.inbound.auth_failures_before_delay = 2;
        o.inbound.max_auth_failures = 10;
    })
    .await;
    let mut c = connect_starttls(r.submission(), &pki).await;
    for _ in 0..2 {
        assert_reply(&c.auth_plain(USER, "bad").await.unwrap(), 535, "5.7.8");
    }
    let t = Instant::now();
    assert_reply(&c.auth_plain(USER, "bad").await.unwrap(), 535, "5.7.8");
    assert!(t.elapsed() >= delay, "third failure answered after {:?}", t.elapsed());
    let t = Instant::now();
    assert_reply(&c.auth_plain(USER, "bad").await.unwrap(), 535, "5.7.8");
    assert!(
        t.elapsed() >= 2 * delay,
        "fourth failure answered after {:?}",
        t.elapsed()
    );
    c.quit().await.unwrap();
    r.relay.shutdown().await;
}

/// Reads one reply byte by byte, so nothing after it is taken from the stream.
async fn read_reply_unbuffered<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut line_start = 0;
    loop {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, s.read(&mut b)).await.unwrap().unwrap();
        assert_eq!(n, 1, "connection closed after {:?}", String::from_utf8_lossy(&out));
        out.push(b[0]);
        if b[0] == b'\n' {
            let line = &out[line_start..];
            if line.get(3) == Some(&b' ') {
                return String::from_utf8_lossy(&out).into_owned();
            }
            line_start = out.len();
        }
    }
}

#[tokio::test]
async fn starttls_discards_pipelined_plaintext_commands() {
    let pki = TestPki::new();
    let r = start_tls(&routes(closed_port()), "memory", &pki, |o| o.workers = 0).await;
    for addr in [r.submission(), r.smtp()] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(read_reply_unbuffered(&mut tcp).await.starts_with("220 "));
        tcp.write_all(b"EHLO client.example\r\n").await.unwrap();
        assert!(read_reply_unbuffered(&mut tcp).await.contains("STARTTLS"));
        // The injection: a command after STARTTLS in the same packet, sent in clear.
        tcp.write_all(b"STARTTLS\r\nRSET\r\n").await.unwrap();
        let reply = read_reply_unbuffered(&mut tcp).await;
        assert!(reply.starts_with("220 "), "{reply}");
        // An answer to RSET in clear here would break the handshake.
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(pki.client_config())
            .connect(name, tcp)
            .await
            .expect("TLS handshake right after the 220");
        tls.write_all(b"EHLO client.example\r\n").await.unwrap();
        let first = read_reply_unbuffered(&mut tls).await;
        assert!(
            first.starts_with("250-relay.test greets client.example\r\n"),
            "the first reply under TLS must answer EHLO, not the injected RSET: {first:?}"
        );
        tls.write_all(b"QUIT\r\n").await.unwrap();
        assert!(read_reply_unbuffered(&mut tls).await.starts_with("221 "));
    }
    r.relay.shutdown().await;
}

#[tokio::test]
async fn implicit_tls_requires_auth_then_accepts() {
    let pki = TestPki::new();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start_tls(&routes(up.port()), "memory", &pki, |_| {}).await;
    let mut c = SmtpClient::connect_tls(r.smtps(), "localhost", pki.client_config())
        .await
        .unwrap();
    assert_eq!(c.greeting().code, 220);
    let ehlo = c.ehlo("client.example").await.unwrap();
    assert!(!ehlo.has_extension("STARTTLS"), "{ehlo}");
    assert!(ehlo.has_extension("AUTH"), "{ehlo}");
    assert_reply(&c.cmd("MAIL FROM:<app@app.example>").await.unwrap(), 530, "5.7.0");
    assert_reply(&c.cmd("STARTTLS").await.unwrap(), 503, "5.5.1");
    assert_reply(&c.auth_plain(USER, "wrong").await.unwrap(), 535, "5.7.8");
    assert_reply(&c.auth_plain(USER, PASS).await.unwrap(), 235, "2.7.0");
    let id = queue_id(&transaction(&mut c, "smtps", "").await);
    c.quit().await.unwrap();
    let got = up.wait_for(1, WAIT).await.unwrap();
    let data = got[0].data_str();
    assert!(data.contains(&format!("with ESMTPSA id {id}")), "{data}");
    // A plaintext client on the implicit TLS port gets no SMTP greeting.
    let mut tcp = tokio::net::TcpStream::connect(r.smtps()).await.unwrap();
    tcp.write_all(b"EHLO plain.example\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf)).await.unwrap();
    assert!(!buf.starts_with(b"220"), "{:?}", String::from_utf8_lossy(&buf));
    r.relay.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// ESMTP and limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ehlo_advertises_the_extensions() {
    let pki = TestPki::new();
    let without_tls = start(&routes(closed_port()), "memory", |o| {
        o.workers = 0;
        o.inbound.max_message_size = 123_456;
    })
    .await;
    let mut c = connect(without_tls.smtp()).await;
    let ehlo = c.ehlo("client.example").await.unwrap();
    assert_eq!(ehlo.lines[0], "250-relay.test greets client.example");
    for ext in ["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"] {
        assert!(ehlo.has_extension(ext), "{ext} missing: {ehlo}");
    }
    assert!(ehlo.lines.iter().any(|l| &l[4..] == "SIZE 123456"), "{ehlo}");
    assert!(!ehlo.has_extension("STARTTLS"), "no TLS configured: {ehlo}");
    assert!(!ehlo.has_extension("AUTH"), "{ehlo}");
    assert!(!ehlo.has_extension("CHUNKING"), "{ehlo}");
    assert_reply(&c.cmd("STARTTLS").await.unwrap(), 502, "5.5.1");
    // HELO: one line, no extensions.
    let helo = c.cmd("HELO client.example").await.unwrap();
    assert_eq!(helo.lines, ["250 relay.test"]);
    c.quit().await.unwrap();
    without_tls.relay.shutdown().await;

    let with_tls = start_tls(&routes(closed_port()), "memory", &pki, |o| o.workers = 0).await;
    for addr in [with_tls.smtp(), with_tls.submission()] {
        let mut c = connect(addr).await;
        let ehlo = c.ehlo("client.example").await.unwrap();
        assert!(ehlo.has_extension("STARTTLS"), "{ehlo}");
        assert!(!ehlo.has_extension("AUTH"), "{ehlo}");
        assert!(ehlo.has_extension("PIPELINING"), "{ehlo}");
        assert_eq!(c.starttls("localhost", pki.client_config()).await.unwrap().code, 220);
        let ehlo = c.ehlo("client.example").await.unwrap();
        assert!(!ehlo.has_extension("STARTTLS"), "{ehlo}");
        assert!(ehlo.has_extension("AUTH"), "{ehlo}");
        assert!(ehlo.has_extension("SMTPUTF8"), "{ehlo}");
        assert_reply(&c.auth_plain(USER, PASS).await.unwrap(), 235, "2.7.0");
        let ehlo = c.ehlo("client.example").await.unwrap();
        assert!(!ehlo.has_extension("AUTH"), "no second AUTH: {ehlo}");
        c.quit().await.unwrap();
    }
    with_tls.relay.shutdown().await;
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&routes(up.port()), "memory", |_| {}).await;
    let mut c = connect(r.smtp()).await;
    assert_eq!(c.ehlo("client.example").await.unwrap().code, 250);
    c.send_raw(
        b"MAIL FROM:<app@app.example> BODY=8BITMIME\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<not-an-address>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
    )
    .await
    .unwrap();
    let codes: Vec<(u16, String)> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            let rep = c.read_reply().await.unwrap();
            v.push((rep.code, rep.text()));
        }
        v
    };
    let just: Vec<u16> = codes.iter().map(|c| c.0).collect();
    assert_eq!(just, [250, 250, 501, 250, 354], "{codes:?}");
    // The body, its end and QUIT in one write too.
    let mut rest = dot_stuff("Subject: pipelined\r\n\r\n8bit: \u{e9}t\u{e9}\r\n.leading dot\r\n".as_bytes());
    rest.extend_from_slice(b"QUIT\r\n");
    c.send_raw(&rest).await.unwrap();
    queue_id(&c.read_reply().await.unwrap());
    assert_eq!(c.read_reply().await.unwrap().code, 221);
    let got = up.wait_for(1, WAIT).await.unwrap();
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["a@example.com", "b@example.com"]);
    let data = got[0].data_str();
    assert!(data.contains("8bit: \u{e9}t\u{e9}\r\n.leading dot\r\n"), "{data}");
    r.relay.shutdown().await;
}

#[tokio::test]
async fn message_size_is_limited_before_and_after_data() {
    let limit = 10_000;
    let r = start(&routes(closed_port()), "memory", |o| {
        o.workers = 0;
        o.inbound.max_message_size = limit;
    })
    .await;
    let mut c = connect(r.smtp()).await;
    c.ehlo("client.example").await.unwrap();
    assert_reply(
        &c.cmd(&format!("MAIL FROM:<app@app.example> SIZE={}", limit + 1))
            .await
            .unwrap(),
        552,
        "5.3.4",
    );
    // The declared size is only a hint: a body over the limit is refused after the dot.
    assert_reply(
        &c.cmd(&format!("MAIL FROM:<app@app.example> SIZE={}", limit / 2))
            .await
            .unwrap(),
        250,
        "2.1.0",
    );
    assert_eq!(c.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() <= limit + 5_000 {
        big.extend_from_slice(b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n");
    }
    assert_reply(&c.data(&big).await.unwrap(), 552, "5.3.4");
    assert_nothing_queued(&r).await;
    // The session goes on, and a message within the limit is accepted.
    queue_id(&transaction(&mut c, "small", "").await);
    c.quit().await.unwrap();
    assert_eq!(stats(&r).await.messages, 1);
    r.relay.shutdown().await;
}

#[tokio::test]
async fn recipients_per_message_are_limited() {
    let r = start(&routes(closed_port()), "memory", |o| {
        o.workers = 0;
        o.inbound.max_recipients = 3;
    })
    .await;
    let mut c = connect(r.smtp()).await;
    c.ehlo("client.example").await.unwrap();
    assert_eq!(c.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
    for i in 0..3 {
        assert_eq!(c.cmd(&format!("RCPT TO:<u{i}@example.com>")).await.unwrap().code, 250);
    }
    assert_reply(&c.cmd("RCPT TO:<u3@example.com>").await.unwrap(), 452, "4.5.3");
    assert_reply(&c.cmd("RCPT TO:<u4@example.com>").await.unwrap(), 452, "4.5.3");
    queue_id(&c.data(&message("rcpts", "")).await.unwrap());
    c.quit().await.unwrap();
    let s = stats(&r).await;
    assert_eq!((s.messages, s.ready), (1, 3), "{s:?}");
    r.relay.shutdown().await;
}

#[tokio::test]
async fn bad_commands_get_clear_replies_and_rset_clears() {
    let r = start(&routes(closed_port()), "memory", |o| o.workers = 0).await;
    let mut c = connect(r.smtp()).await;
    assert_reply(&c.cmd("MAIL FROM:<app@app.example>").await.unwrap(), 503, "5.5.1");
    c.ehlo("client.example").await.unwrap();
    // Overlong lines: longer than the limit, and longer than one read of the server.
    for len in [5_000, 100_000] {
        let line = format!("NOOP {}", "x".repeat(len));
        assert_reply(&c.cmd(&line).await.unwrap(), 500, "5.5.2");
        assert_eq!(c.cmd("NOOP").await.unwrap().code, 250, "session goes on after {len}");
    }
    assert_reply(&c.cmd("FOO bar").await.unwrap(), 500, "5.5.1");
    assert_reply(&c.cmd("MAIL FROM:<not an address>").await.unwrap(), 501, "5.");
    assert_reply(&c.cmd("MAIL FROM:app.example").await.unwrap(), 501, "5.");
    assert_reply(&c.cmd("DATA").await.unwrap(), 503, "5.5.1");
    assert_reply(&c.cmd("RCPT TO:<user@example.com>").await.unwrap(), 503, "5.5.1");
    assert_eq!(c.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
    assert_reply(&c.cmd("MAIL FROM:<app@app.example>").await.unwrap(), 503, "5.5.1");
    for bad in [
        "RCPT TO:<>",
        "RCPT TO:<user@>",
        "RCPT TO:<user@-bad-.example>",
        "RCPT TO:<a b@example.com>",
    ] {
        assert_reply(&c.cmd(bad).await.unwrap(), 501, "5.");
    }
    let d = c.cmd("DATA").await.unwrap();
    assert!(matches!(d.code, 503 | 554), "DATA without RCPT: {d}");
    // RSET forgets the transaction: no recipient survives it, and MAIL may be given again.
    assert_eq!(c.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
    assert_reply(&c.cmd("RSET").await.unwrap(), 250, "2.0.0");
    assert_reply(&c.cmd("DATA").await.unwrap(), 503, "5.5.1");
    assert_eq!(c.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
    let d = c.cmd("DATA").await.unwrap();
    assert!(matches!(d.code, 503 | 554), "RSET kept a recipient: {d}");
    assert_eq!(c.cmd("NOOP").await.unwrap().code, 250);
    assert_eq!(c.cmd("BDAT 10 LAST").await.unwrap().code, 502);
    assert_closed(&mut c).await;
    assert_nothing_queued(&r).await;
    r.relay.shutdown().await;
}

#[tokio::test]
async fn too_many_bad_commands_end_the_session() {
    let r = start(&routes(closed_port()), "memory", |o| {
        o.workers = 0;
        o.inbound.max_errors = 3;
    })
    .await;
    let mut c = connect(r.smtp()).await;
    assert_reply(&c.cmd("FOO").await.unwrap(), 500, "5.5.1");
    assert_reply(&c.cmd("BAR").await.unwrap(), 500, "5.5.1");
    assert_reply(&c.cmd("BAZ").await.unwrap(), 500, "5.5.1");
    assert_reply(&c.read_reply().await.unwrap(), 421, "4.7.0");
    assert_closed(&mut c).await;
    r.relay.shutdown().await;
}

#[tokio::test]
async fn smtputf8_addresses_are_accepted() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&routes(up.port()), "memory", |_| {}).await;
    let mut c = connect(r.smtp()).await;
    c.ehlo("client.example").await.unwrap();
    assert_eq!(
        c.cmd("MAIL FROM:<app\u{e9}@app.example> SMTPUTF8 BODY=8BITMIME")
            .await
            .unwrap()
            .code,
        250
    );
    assert_reply(&c.cmd("RCPT TO:<jos\u{e9}@example.com>").await.unwrap(), 250, "2.1.5");
    queue_id(&c.data(&message("utf8", "")).await.unwrap());
    c.quit().await.unwrap();
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got[0].mail_from, "app\u{e9}@app.example");
    assert_eq!(got[0].rcpts, ["jos\u{e9}@example.com"]);
    r.relay.shutdown().await;
}

/// RFC 6531 3.3: with SMTPUTF8 a domain may be given as U-labels. The relay advertises
/// SMTPUTF8, so `user@bücher.example` must not be a syntax error; it is the same mailbox as
/// `user@xn--bcher-kva.example` and routes like it.
#[tokio::test]
async fn smtputf8_domains_are_accepted_and_route_like_their_a_labels() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let routes = route("idn", up.port(), 10, &["xn--bcher-kva.example"]) + &inbound_user("shop-42", USER, PASS);
    let r = start(&routes, "memory", |_| {}).await;
    let mut c = connect(r.smtp()).await;
    c.ehlo("client.example").await.unwrap();
    assert_eq!(c.cmd("MAIL FROM:<app@app.example> SMTPUTF8").await.unwrap().code, 250);
    assert_reply(
        &c.cmd("RCPT TO:<user@b\u{fc}cher.example>").await.unwrap(),
        250,
        "2.1.5",
    );
    queue_id(&c.data(&message("idn", "")).await.unwrap());
    c.quit().await.unwrap();
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert!(
        got[0].rcpts == ["user@b\u{fc}cher.example"] || got[0].rcpts == ["user@xn--bcher-kva.example"],
        "{:?}",
        got[0].rcpts
    );
    r.relay.shutdown().await;
}

#[tokio::test]
async fn sessions_per_client_ip_are_limited() {
    let r = start(&routes(closed_port()), "memory", |o| {
        o.workers = 0;
        o.inbound.max_sessions_per_ip = 2;
    })
    .await;
    let a = connect(r.smtp()).await;
    let _b = connect(r.smtp()).await;
    let mut third = SmtpClient::connect(r.smtp()).await.unwrap();
    assert_reply(third.greeting(), 421, "4.7.0");
    assert_closed(&mut third).await;
    a.quit().await.unwrap();
    // The slot is released when the server side of `a` has ended.
    let freed = eventually(|| async {
        let c = SmtpClient::connect(r.smtp()).await.unwrap();
        c.greeting().code == 220
    })
    .await;
    assert!(freed, "a closed session frees its slot");
    r.relay.shutdown().await;
}

#[tokio::test]
async fn idle_sessions_time_out() {
    let r = start(&routes(closed_port()), "memory", |o| {
        o.workers = 0;
        o.inbound.command_timeout = Duration::from_millis(300);
    })
    .await;
    let mut c = connect(r.smtp()).await;
    let t = Instant::now();
    assert_reply(&c.read_reply().await.unwrap(), 421, "4.4.2");
    assert!(t.elapsed() >= Duration::from_millis(250), "{:?}", t.elapsed());
    assert_closed(&mut c).await;
    r.relay.shutdown().await;
}

#[tokio::test]
async fn a_stalled_message_body_times_out_and_is_not_queued() {
    let r = start(&routes(closed_port()), "memory", |o| {
        o.workers = 0;
        o.inbound.data_timeout = Duration::from_millis(300);
    })
    .await;
    let mut c = connect(r.smtp()).await;
    c.ehlo("client.example").await.unwrap();
    assert_eq!(c.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
    assert_eq!(c.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
    assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
    c.send_raw(b"Subject: never finished\r\n\r\nhalf a message")
        .await
        .unwrap();
    assert_reply(&c.read_reply().await.unwrap(), 421, "4.4.2");
    assert_closed(&mut c).await;
    assert_nothing_queued(&r).await;
    r.relay.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Extension headers and acknowledgement
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_extension_headers_are_refused_naming_the_header() {
    let r = start(&routes(closed_port()), "memory", |o| o.workers = 0).await;
    let cases = [
        (
            "X-Mailroute-Deliver-After: next tuesday\r\n",
            "X-Mailroute-Deliver-After",
        ),
        (
            "x-mailroute-deliver-after: 2026-13-45T99:00:00Z\r\n",
            "X-Mailroute-Deliver-After",
        ),
        ("X-Mailroute-Expire: forever\r\n", "X-Mailroute-Expire"),
    ];
    for (header, name) in cases {
        let t = submit(
            r.smtp(),
            "app@app.example",
            &["user@example.com"],
            &message("bad", header),
        )
        .await;
        let end = t.reply_to(".").unwrap_or_else(|| panic!("{t}"));
        assert_reply(end, 550, "5.6.0");
        assert!(end.text().contains(name), "{end}");
    }
    assert_nothing_queued(&r).await;
    r.relay.shutdown().await;
}

#[tokio::test]
async fn a_future_deliver_after_schedules_the_jobs() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&routes(up.port()), "memory", |_| {}).await;
    let in_an_hour = (mailroute_relay::clock::now() + chrono::Duration::hours(1)).to_rfc3339();
    for header in [
        "X-Mailroute-Deliver-After: 1h\r\n".to_owned(),
        format!("X-Mailroute-Deliver-After: {in_an_hour}\r\n"),
    ] {
        let t = submit(
            r.smtp(),
            "app@app.example",
            &["user@example.com"],
            &message("later", &header),
        )
        .await;
        assert!(t.delivered(), "{t}");
    }
    let s = stats(&r).await;
    assert_eq!((s.messages, s.scheduled, s.ready, s.inflight), (2, 2, 0, 0), "{s:?}");
    // A time in the past means now: delivered by the running workers.
    let t = submit(
        r.smtp(),
        "app@app.example",
        &["user@example.com"],
        &message("past", "X-Mailroute-Deliver-After: 2001-01-01T00:00:00Z\r\n"),
    )
    .await;
    assert!(t.delivered(), "{t}");
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert!(got[0].data_str().contains("Subject: test past"));
    let s = stats(&r).await;
    assert_eq!(s.scheduled, 2, "{s:?}");
    assert_eq!(up.received().len(), 1);
    r.relay.shutdown().await;
}

#[tokio::test]
async fn the_250_carries_the_queue_id_and_comes_after_redis_stored_the_message() {
    let redis = RedisServer::start().unwrap();
    let r = start(&routes(closed_port()), &redis.url(), |o| o.workers = 0).await;
    let mut con = redis_connection(&redis).await;
    let mut c = connect(r.smtp()).await;
    c.ehlo("client.example").await.unwrap();
    let mut ids = Vec::new();
    for (i, rcpts) in [1usize, 3].into_iter().enumerate() {
        assert_eq!(c.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
        for n in 0..rcpts {
            assert_eq!(c.cmd(&format!("RCPT TO:<u{n}@example.com>")).await.unwrap().code, 250);
        }
        let id = queue_id(&c.data(&message(&format!("redis{i}"), "")).await.unwrap());
        // Checked right after the reply, with no delivery running: the store already has it.
        let exists: i64 = redis::cmd("EXISTS")
            .arg(format!("{{mailroute}}:msg:{id}"))
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(exists, 1, "message {id} is in Redis when 250 arrives");
        ids.push(id);
    }
    let ready: i64 = redis::cmd("XLEN")
        .arg("{mailroute}:ready")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(ready, 4, "one job per recipient in the ready stream");
    assert_ne!(ids[0], ids[1], "queue ids are unique");
    c.quit().await.unwrap();
    let s = stats(&r).await;
    assert_eq!((s.messages, s.ready), (2, 4), "{s:?}");
    r.relay.shutdown().await;
}

#[tokio::test]
async fn a_message_is_refused_with_451_when_redis_is_down() {
    let mut redis = RedisServer::start().unwrap();
    let r = start(&routes(closed_port()), &redis.url(), |o| o.workers = 0).await;
    let mut c = connect(r.smtp()).await;
    c.ehlo("client.example").await.unwrap();
    assert_eq!(c.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
    assert_eq!(c.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
    redis.kill();
    let end = c.data(&message("down", "")).await.unwrap();
    assert!(end.is_transient(), "never 250 without the store: {end}");
    assert_reply(&end, 451, "4.3.0");
    c.quit().await.unwrap();
    r.relay.shutdown().await;
}

/// SMTP smuggling (CVE-2023-51764 and relatives): only CRLF.CRLF ends the data, and a body
/// with a bare-LF "dot line" must not reach the next hop in a form that a lenient server
/// would read as the end of the data followed by a second, smuggled transaction. The testkit
/// upstream is such a lenient server (a `.` line after a bare LF ends its data).
#[tokio::test]
async fn smuggled_end_of_data_sequences_do_not_split_the_message() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&routes(up.port()), "memory", |_| {}).await;
    for eod in ["\n.\r\n", "\n.\n", "\r.\r\n", "\r\n.\r"] {
        let mut c = connect(r.smtp()).await;
        c.ehlo("client.example").await.unwrap();
        assert_eq!(c.cmd("MAIL FROM:<app@app.example>").await.unwrap().code, 250);
        assert_eq!(c.cmd("RCPT TO:<user@example.com>").await.unwrap().code, 250);
        assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
        let body = format!(
            "Subject: innocent\r\n\r\nhello{eod}MAIL FROM:<ceo@app.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
        );
        c.send_raw(body.as_bytes()).await.unwrap();
        let end = c.read_reply().await.unwrap();
        // Either refused as malformed, or accepted as one message: never a second transaction.
        assert!(end.code == 250 || end.is_permanent(), "{eod:?}: {end}");
        assert_eq!(
            c.cmd("QUIT").await.unwrap().code,
            221,
            "{eod:?}: no reply was left over"
        );
    }
    let accepted = r
        .relay
        .metrics()
        .messages_received
        .with_label_values(&["smtp", "accepted", "-"])
        .get() as usize;
    let got = up.wait_for(accepted, WAIT).await.unwrap();
    assert_eq!(got.len(), accepted, "one upstream message per accepted message");
    for m in &got {
        assert_eq!(m.rcpts, ["user@example.com"], "{}", m.data_str());
        assert!(m.data_str().contains("Subject: innocent"), "{}", m.data_str());
    }
    r.relay.shutdown().await;
}

/// Connections still in the TLS handshake of the implicit TLS port are sessions of their
/// client too: otherwise one address can hold any number of them open for the whole
/// handshake timeout.
#[tokio::test]
async fn pending_tls_handshakes_count_against_the_per_ip_limit() {
    let pki = TestPki::new();
    let r = start_tls(&routes(closed_port()), "memory", &pki, |o| {
        o.workers = 0;
        o.inbound.max_sessions_per_ip = 2;
    })
    .await;
    // Two connections to the implicit TLS port that never start their handshake.
    let _idle1 = tokio::net::TcpStream::connect(r.smtps()).await.unwrap();
    let _idle2 = tokio::net::TcpStream::connect(r.smtps()).await.unwrap();
    let limited = eventually(|| async {
        let c = SmtpClient::connect(r.smtp()).await.unwrap();
        c.greeting().code == 421
    })
    .await;
    assert!(
        limited,
        "a third session from 127.0.0.1 was allowed while two were open"
    );
    r.relay.shutdown().await;
}
