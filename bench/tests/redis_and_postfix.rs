//! The harness' external components for real: the RESP client and INFO parsing against a real
//! redis-server, and a private Postfix instance (installed by scripts/test.sh; its master must
//! run as root) relaying generator traffic to the sink.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroute_bench::loadgen::{LoadConfig, run};
use mailroute_bench::postfix::Postfix;
use mailroute_bench::redis_info::{self, OpsDelta};
use mailroute_bench::sink_server::{SinkCounters, serve_smtp};
use mailroute_testkit::RedisServer;

#[test]
fn commandstats_delta_counts_what_a_client_did() {
    let redis = RedisServer::builder()
        .aof(true)
        .arg("--appendfsync")
        .arg("everysec")
        .start()
        .unwrap();
    let before = redis_info::fetch_info(redis.addr()).unwrap();
    assert_eq!(before.get("aof_enabled"), Some("1"));
    assert!(redis_info::command(redis.addr(), &["NOSUCHCOMMAND"]).is_err());
    for i in 0..10 {
        assert_eq!(
            redis_info::command(redis.addr(), &["SET", &format!("k{i}"), "v"]).unwrap(),
            "OK"
        );
    }
    assert_eq!(redis_info::command(redis.addr(), &["GET", "k3"]).unwrap(), "v");
    assert_eq!(redis_info::command(redis.addr(), &["INCR", "n"]).unwrap(), "1");
    let after = redis_info::fetch_info(redis.addr()).unwrap();
    let d = OpsDelta::between(&before, &after);
    assert_eq!(d.calls.get("set"), Some(&10));
    assert_eq!(d.calls.get("get"), Some(&1));
    assert_eq!(d.calls.get("incr"), Some(&1));
    assert_eq!(d.calls.get("info"), None);
    assert!(after.u64("used_memory").unwrap() > 0);
}

#[test]
fn private_postfix_instance_relays_everything_to_the_sink() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let counters = Arc::new(SinkCounters::default());
    let sink = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let sink_addr = sink.local_addr().unwrap();
    rt.spawn(serve_smtp(sink, counters.clone()));

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut pf = Postfix::start(dir.path(), port, sink_addr).unwrap();
    let master = pf.master_pid().unwrap();

    let cfg = LoadConfig {
        targets: vec![port],
        messages: 20,
        duration: None,
        size: 2048,
        recipients: 1,
        sessions: 4,
        rate: None,
        pipelining: true,
        helo: "test.example".into(),
        timeout: Duration::from_secs(30),
    };
    let report = rt.block_on(run(cfg)).unwrap();
    assert_eq!(
        (report.accepted, report.errors),
        (20, 0),
        "{report:?}\n{}",
        pf.log_tail(20)
    );
    assert_eq!(report.pipelined_sessions, 4, "Postfix offers PIPELINING");

    let deadline = Instant::now() + Duration::from_secs(60);
    while counters.snapshot().messages < 20 {
        assert!(
            Instant::now() < deadline,
            "sink got {:?}; log:\n{}",
            counters.snapshot(),
            pf.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = counters.snapshot();
    assert_eq!(s.messages, 20);
    // Postfix adds its Received: header, so each delivered message is a little larger.
    assert!(s.bytes > 20 * 2048, "{s:?}");
    let queue_deadline = Instant::now() + Duration::from_secs(10);
    while pf.queued() > 0 && Instant::now() < queue_deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pf.queued(), 0);
    assert!(pf.log_tail(200).contains("status=sent"));

    pf.stop().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{master}")).exists(),
        "master still running"
    );
}
