//! The PROXY protocol on the listeners: the client address a trusted load balancer sends is the
//! one the relay rules see (relay CIDRs, the delivery log); a header is required from the load
//! balancer's address and honoured from nobody else.

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::common::*;

fn cidrs(s: &str) -> Vec<ipnet::IpNet> {
    mailroute_relay::server::parse_cidrs(s).unwrap()
}

/// A raw dialogue: sends `preamble` (a PROXY header, or nothing), then each command, and
/// returns the first line of every reply (the greeting first).
async fn dialogue(addr: std::net::SocketAddr, preamble: &[u8], commands: &[&str]) -> Vec<String> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(preamble).await.unwrap();
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    let mut replies = Vec::new();
    let read_reply = async |r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>| {
        let mut first = None;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return first.unwrap_or_else(|| "<closed>".to_string());
            }
            let line = line.trim_end().to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            first.get_or_insert(line);
            if last {
                return first.unwrap_or_default();
            }
        }
    };
    replies.push(read_reply(&mut r).await);
    for c in commands {
        if replies.last().is_some_and(|l| l == "<closed>") {
            break;
        }
        w.write_all(format!("{c}\r\n").as_bytes()).await.unwrap();
        replies.push(read_reply(&mut r).await);
    }
    replies
}

const ENVELOPE: [&str; 3] = [
    "EHLO lb-client.example",
    "MAIL FROM:<app@app.example>",
    "RCPT TO:<user@example.com>",
];

#[tokio::test]
async fn the_client_address_of_a_proxy_header_is_what_relay_rules_see() {
    let r = start(&route("up", 9, 10, &["*"]), "memory", |o| {
        // The load balancer is 127.0.0.1; only pods in 10.9.0.0/16 may relay without AUTH.
        o.inbound.proxy_protocol_from = cidrs("127.0.0.1/32");
        o.inbound.relay_cidrs = cidrs("10.9.0.0/16");
        o.workers = 0;
    })
    .await;

    // v1 from an address inside the relay CIDRs: relays.
    let inside = dialogue(r.smtp(), b"PROXY TCP4 10.9.1.2 10.0.0.5 40000 25\r\n", &ENVELOPE).await;
    assert!(inside[3].starts_with("250"), "{inside:?}");
    // v1 from outside: refused at RCPT, as for a direct client there.
    let outside = dialogue(r.smtp(), b"PROXY TCP4 203.0.113.5 10.0.0.5 40000 25\r\n", &ENVELOPE).await;
    assert!(
        outside[3].starts_with("554") || outside[3].starts_with("550"),
        "{outside:?}"
    );
    // v2 from inside.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[10, 9, 3, 4, 10, 0, 0, 5, 0x9c, 0x40, 0, 25]);
    let inside_v2 = dialogue(r.smtp(), &v2, &ENVELOPE).await;
    assert!(inside_v2[3].starts_with("250"), "{inside_v2:?}");
    // The load balancer's own connection (health check): no client address, no relaying.
    let local = dialogue(r.smtp(), b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00", &ENVELOPE).await;
    assert!(local[0].starts_with("220"), "{local:?}");
    assert!(!local[3].starts_with("250"), "{local:?}");
    // No header from the load balancer's address within its time: closed, never greeted.
    let missing = dialogue(r.smtp(), b"", &[]).await;
    assert_eq!(missing, ["<closed>"]);
    r.relay.shutdown().await;
}

#[tokio::test]
async fn a_proxy_header_without_the_header_required_is_refused_with_a_reply() {
    let r = start(&route("up", 9, 10, &["*"]), "memory", |o| {
        o.inbound.proxy_protocol_from = cidrs("127.0.0.1/32");
        o.workers = 0;
    })
    .await;
    // The client speaks SMTP at once instead of sending the header.
    let mut tcp = TcpStream::connect(r.smtp()).await.unwrap();
    tcp.write_all(b"EHLO direct.example\r\n").await.unwrap();
    let mut line = String::new();
    BufReader::new(tcp).read_line(&mut line).await.unwrap();
    assert!(line.starts_with("421 4.7.0 PROXY protocol header required"), "{line}");
    r.relay.shutdown().await;
}

#[tokio::test]
async fn a_header_from_an_address_not_trusted_is_not_honoured() {
    let r = start(&route("up", 9, 10, &["*"]), "memory", |o| {
        // The trusted load balancer is elsewhere; 127.0.0.1 is a direct client outside the
        // relay CIDRs that claims, with a header, an address inside them.
        o.inbound.proxy_protocol_from = cidrs("192.0.2.10/32");
        o.inbound.relay_cidrs = cidrs("10.9.0.0/16");
        o.workers = 0;
    })
    .await;
    let mut commands = ENVELOPE.to_vec();
    commands.push("NOOP");
    let forged = dialogue(r.smtp(), b"PROXY TCP4 10.9.1.2 10.0.0.5 40000 25\r\n", &commands).await;
    // The header is just an unknown command here; the RCPT reply comes fourth after it.
    assert!(forged[0].starts_with("220"), "{forged:?}");
    assert!(forged[1].starts_with("500"), "{forged:?}");
    assert!(!forged[4].starts_with("250"), "the forged address relayed: {forged:?}");
    r.relay.shutdown().await;
}
