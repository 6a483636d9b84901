//! The load generator against the sink over real loopback TCP: every accepted message is counted
//! by the sink, latencies are recorded, pipelining is negotiated, the open loop keeps its
//! schedule, and a server without PIPELINING is driven one command at a time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailroute_bench::loadgen::{LoadConfig, run};
use mailroute_bench::sink_server::{SinkCounters, serve_http, serve_smtp};
use mailroute_testkit::SmtpServer;
use tokio::net::TcpListener;

async fn start_sink() -> (SocketAddr, SocketAddr, Arc<SinkCounters>) {
    let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (sa, ha) = (smtp.local_addr().unwrap(), http.local_addr().unwrap());
    let counters = Arc::new(SinkCounters::default());
    tokio::spawn(serve_smtp(smtp, counters.clone()));
    tokio::spawn(serve_http(http, counters.clone()));
    (sa, ha, counters)
}

fn config(target: SocketAddr) -> LoadConfig {
    LoadConfig {
        targets: vec![target],
        messages: 300,
        duration: None,
        size: 4096,
        recipients: 2,
        sessions: 4,
        rate: None,
        pipelining: true,
        helo: "test.example".into(),
        timeout: Duration::from_secs(10),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_delivers_every_message_to_the_sink() {
    let (smtp, http, counters) = start_sink().await;
    let report = run(config(smtp)).await.unwrap();
    assert_eq!(
        (report.accepted, report.rejected, report.errors),
        (300, 0, 0),
        "{report:?}"
    );
    assert_eq!(report.pipelined_sessions, 4);
    assert_eq!(report.accept_latency.count, 300);
    assert!(report.accepted_per_sec > 0.0 && report.end_unix_ns > report.start_unix_ns);
    let s = counters.snapshot();
    assert_eq!((s.messages, s.recipients, s.bytes), (300, 600, 300 * 4096));
    assert_eq!(s.sessions_total, 4);
    assert!(s.first_ns >= report.start_unix_ns && s.last_ns >= s.first_ns);

    // The HTTP endpoint serves the same counters.
    let stats = tokio::task::spawn_blocking(move || mailroute_bench::httpget::get(http, "/stats"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stats.status, 200);
    let parsed: mailroute_bench::sink_server::SinkStats = serde_json::from_str(&stats.body).unwrap();
    assert_eq!(parsed.messages, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_rate_times_duration_on_schedule() {
    let (smtp, _, counters) = start_sink().await;
    let cfg = LoadConfig {
        messages: 10_000,
        rate: Some(200.0),
        duration: Some(Duration::from_millis(500)),
        ..config(smtp)
    };
    let report = run(cfg).await.unwrap();
    assert_eq!(report.accepted, 100, "{report:?}");
    assert_eq!(report.mode, "open");
    let sched = report.schedule_latency.unwrap();
    assert_eq!(sched.count, 100);
    // The schedule spans 0.5 s; the run cannot finish much earlier than its last slot.
    assert!(report.elapsed_secs >= 0.49, "{report:?}");
    assert_eq!(counters.snapshot().messages, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bounds_a_closed_loop_run() {
    let (smtp, _, counters) = start_sink().await;
    let cfg = LoadConfig {
        messages: u64::MAX / 2,
        duration: Some(Duration::from_millis(300)),
        ..config(smtp)
    };
    let report = run(cfg).await.unwrap();
    assert!(report.accepted > 0);
    assert!(report.elapsed_secs < 5.0, "{report:?}");
    assert_eq!(counters.snapshot().messages, report.accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_counts_errors_and_stops() {
    // Bind and drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = LoadConfig {
        messages: 5,
        sessions: 1,
        ..config(port)
    };
    let report = run(cfg).await.unwrap();
    assert_eq!((report.accepted, report.errors), (0, 5));
    assert!(report.first_error.unwrap().contains("connect"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pipelining_each_command_waits_and_the_message_arrives_intact() {
    use mailroute_testkit::smtp::Script;
    let server = SmtpServer::start(Script::new().ehlo_extensions(["8BITMIME"])).unwrap();
    let cfg = LoadConfig {
        messages: 3,
        sessions: 1,
        size: 1500,
        recipients: 3,
        ..config(server.addr())
    };
    let report = run(cfg).await.unwrap();
    assert_eq!((report.accepted, report.pipelined_sessions), (3, 0), "{report:?}");
    let got = server.received();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].mail_from, "bench-sender@bench.example");
    assert_eq!(
        got[0].rcpts,
        vec!["rcpt-0@bench.example", "rcpt-1@bench.example", "rcpt-2@bench.example"]
    );
    assert_eq!(got[0].data.len(), 1500);
    assert!(
        got[2]
            .data_str()
            .contains("Subject: mailroute bench message 000000000002\r\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_counted_by_code_and_the_session_goes_on() {
    use mailroute_testkit::smtp::{Behaviour, Script};
    let script = Script::new().behaviours([Behaviour::perm_fail(), Behaviour::temp_fail()]);
    let server = SmtpServer::start(script).unwrap();
    let cfg = LoadConfig {
        messages: 4,
        sessions: 1,
        ..config(server.addr())
    };
    let report = run(cfg).await.unwrap();
    assert_eq!(
        (report.accepted, report.rejected, report.errors),
        (2, 2, 0),
        "{report:?}"
    );
    assert_eq!(report.reject_codes.get(&550), Some(&1));
    assert_eq!(report.reject_codes.get(&451), Some(&1));
    assert_eq!(server.received().len(), 2);
    assert_eq!(server.connections(), 1);
}
