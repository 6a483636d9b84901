//! Shared harness of the relay's integration tests: an in-process relay on 127.0.0.1 with
//! routes written as SmtpRoute YAML, pointed at testkit SMTP servers.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use mailroute_api::config::{SessionTimeouts, Target, Upstream};
use mailroute_api::route::TlsMode;
use mailroute_relay::config::Source;
use mailroute_relay::outbound::delivery::{DeliveryTarget, StaticResolver};
use mailroute_relay::server::{Overrides, Relay, RelayOptions};
use mailroute_testkit::smtp::client::{Transcript, send};

pub const WAIT: Duration = Duration::from_secs(30);

/// A smarthost route YAML to `127.0.0.1:port` without TLS.
pub fn route(name: &str, port: u16, priority: i32, domains: &[&str]) -> String {
    let domains = domains
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: {name}, namespace: mail}}\nspec:\n  host: 127.0.0.1\n  port: {port}\n  tls: {{mode: none}}\n  priority: {priority}\n  match: {{recipientDomains: [{domains}]}}\n---\n"
    )
}

pub struct TestRelay {
    pub relay: Relay,
    pub dir: tempfile::TempDir,
}

impl TestRelay {
    pub fn smtp(&self) -> std::net::SocketAddr {
        self.relay.smtp_addr.expect("smtp listener")
    }
}

/// Options for a relay under test: loopback listeners on free ports, quiet log, short timers.
pub fn options(dir: &std::path::Path, routes: &str, queue: &str) -> RelayOptions {
    let file = dir.join("routes.yaml");
    std::fs::write(&file, routes).expect("write routes");
    let mut o = RelayOptions::local();
    o.source = Source::Manifests(vec![file]);
    o.queue = queue.parse().expect("queue URL");
    o.smtp_listen = Some("127.0.0.1:0".parse().expect("addr"));
    o.admin_listen = Some("127.0.0.1:0".parse().expect("addr"));
    o.log_stdout = false;
    o.config_poll = Duration::from_millis(100);
    o.gauge_refresh = Duration::from_millis(100);
    o.visibility_timeout = Duration::from_secs(2);
    o.drain_timeout = Duration::from_secs(5);
    o.workers = 8;
    o.inbound.hostname = "relay.test".into();
    o
}

pub async fn start(routes: &str, queue: &str, tweak: impl FnOnce(&mut RelayOptions)) -> TestRelay {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = options(dir.path(), routes, queue);
    tweak(&mut o);
    let overrides = Overrides {
        resolver: Some(Arc::new(StaticResolver::new())),
        ..Default::default()
    };
    let relay = Relay::start_with(o, overrides).await.expect("relay starts");
    TestRelay { relay, dir }
}

/// A small message with a unique marker in its subject.
pub fn message(marker: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "From: App <app@app.example>\r\nTo: <user@example.com>\r\nSubject: test {marker}\r\n{extra_headers}\r\nHello {marker}.\r\n"
    )
    .into_bytes()
}

pub async fn submit(addr: std::net::SocketAddr, from: &str, rcpts: &[&str], data: &[u8]) -> Transcript {
    send(addr, None, false, None, from, rcpts, data)
        .await
        .expect("SMTP session")
}

/// A Secret with SMTP credentials and a SenderQuota that makes them an inbound AUTH user.
pub fn inbound_user(name: &str, user: &str, password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-smtp, namespace: mail}}\ntype: Opaque\nstringData:\n  username: {user}\n  password: {password}\n---\napiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {{name: {name}, namespace: mail}}\nspec:\n  sender: {{authUser: {user}}}\n  limits: {{perDay: 100000}}\n  credentialsSecretRef: {{name: {name}-smtp}}\n---\n"
    )
}

/// Like [`start`], with the test PKI's certificate and the submission (587-style) and smtps
/// (465-style) listeners on free loopback ports.
pub async fn start_tls(
    routes: &str,
    queue: &str,
    pki: &mailroute_testkit::TestPki,
    tweak: impl FnOnce(&mut RelayOptions),
) -> TestRelay {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = options(dir.path(), routes, queue);
    let (cert, key, _ca) = pki.write_files(dir.path().join("tls")).expect("write PKI");
    o.tls_cert = Some(cert);
    o.tls_key = Some(key);
    o.submission_listen = Some("127.0.0.1:0".parse().expect("addr"));
    o.smtps_listen = Some("127.0.0.1:0".parse().expect("addr"));
    tweak(&mut o);
    let overrides = Overrides {
        resolver: Some(Arc::new(StaticResolver::new())),
        ..Default::default()
    };
    let relay = Relay::start_with(o, overrides).await.expect("relay starts");
    TestRelay { relay, dir }
}

impl TestRelay {
    pub fn submission(&self) -> std::net::SocketAddr {
        self.relay.submission_addr.expect("submission listener")
    }
    pub fn smtps(&self) -> std::net::SocketAddr {
        self.relay.smtps_addr.expect("smtps listener")
    }
    /// The CA certificate written by [`start_tls`], for external clients.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("tls").join("ca.crt")
    }
}

/// The CSV export's header row, written out here (not taken from the crate's `CSV_COLUMNS`) so
/// that the tests pin the columns.
pub const CSV_HEADER: &str = "time,recipient,result,reply_code,enhanced_code,reply_text,bounce_class,sender,route";

/// The records of a delivery log CSV export, after asserting that its header is [`CSV_HEADER`].
pub fn csv_records(bytes: &[u8]) -> Vec<csv::StringRecord> {
    let mut reader = csv::Reader::from_reader(bytes);
    let header: Vec<&str> = reader.headers().unwrap().iter().collect();
    assert_eq!(header, CSV_HEADER.split(',').collect::<Vec<_>>());
    reader.records().map(Result::unwrap).collect()
}

/// A connection straight to the test Redis `server`, to read or plant keys behind the relay.
pub async fn redis_connection(server: &mailroute_testkit::RedisServer) -> redis::aio::MultiplexedConnection {
    let client = server.client().expect("redis client");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// Polls `f` until it is true or [`WAIT`] passes; returns the last result.
pub async fn eventually<F, Fut>(f: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An upstream at 127.0.0.1:`port`, not verifying its certificate.
pub fn upstream(port: u16, tls: TlsMode) -> Upstream {
    Upstream {
        host: "127.0.0.1".into(),
        port,
        tls,
        verify_tls: false,
        server_name: None,
        auth: None,
        custom_ca: false,
        pinned_sha256: Vec::new(),
    }
}

pub fn smarthost(route: &str, up: Upstream) -> DeliveryTarget {
    DeliveryTarget {
        route_id: route.into(),
        target: Target::Smarthost(up),
        from_override: None,
        custom_ca_pem: None,
        max_connections: None,
        messages_per_connection: None,
        connection_scope: None,
        timeouts: short_timeouts(),
    }
}

/// Session timeouts short enough for a failing test to end soon.
pub fn short_timeouts() -> SessionTimeouts {
    SessionTimeouts {
        connect_ms: 5_000,
        greeting_ms: 5_000,
        mail_ms: 5_000,
        rcpt_ms: 5_000,
        data_init_ms: 5_000,
        data_transfer_ms: 10_000,
        data_done_ms: 10_000,
    }
}

/// A smarthost target to 127.0.0.1:`port` without TLS, the target of most tests here.
pub fn plain(route: &str, port: u16) -> DeliveryTarget {
    smarthost(route, upstream(port, TlsMode::None))
}
