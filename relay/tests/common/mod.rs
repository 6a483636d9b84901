//! Shared harness of the relay's integration tests: an in-process relay on 127.0.0.1 with
//! routes written as SmtpRoute YAML, pointed at testkit SMTP servers.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use mailroute_relay::config::Source;
use mailroute_relay::delivery::StaticResolver;
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
    o.queue = queue.to_owned();
    o.smtp_listen = Some("127.0.0.1:0".parse().expect("addr"));
    o.admin_listen = Some("127.0.0.1:0".parse().expect("addr"));
    o.log_stdout = false;
    o.config_poll = Duration::from_millis(100);
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
