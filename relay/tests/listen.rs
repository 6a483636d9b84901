//! Listeners bound to the IPv6 wildcard (`[::]`, for IPv6-only and dual-stack clusters) see IPv4
//! clients as IPv4-mapped addresses; relay rules must see the IPv4 address they are written for.

use std::net::SocketAddr;

use crate::common::*;
use mailroute_testkit::{RedisServer, Script, SmtpServer};

#[tokio::test]
async fn an_ipv4_client_of_a_dual_stack_listener_is_matched_against_ipv4_relay_cidrs() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.smtp_listen = Some("[::]:0".parse().expect("addr"));
        o.inbound.relay_cidrs = vec!["127.0.0.0/8".parse().expect("cidr")];
    })
    .await;
    let v4 = SocketAddr::from(([127, 0, 0, 1], r.smtp().port()));
    let t = submit(v4, "app@app.example", &["user@example.com"], &message("v4", "")).await;
    assert!(t.delivered(), "an IPv4 client in relayCidrs was refused on [::]: {t}");
    let got = up.wait_for(1, WAIT).await.unwrap();
    let data = got[0].data_str();
    assert!(
        data.contains("([127.0.0.1])"),
        "the trace header shows the mapped address: {data}"
    );
    r.relay.shutdown().await;
}
