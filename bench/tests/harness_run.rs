//! The harness end to end with the crate's own binaries: a ceiling row (bench-loadgen into
//! bench-sink) whose CPU breakdown comes from /proc, and the fsync and Redis-alone probes, written
//! to a results directory as Markdown and JSON.

use std::path::PathBuf;

use mailroute_bench::harness::{Options, Step, run};
use mailroute_bench::report::BenchResults;

#[test]
fn a_quick_run_records_generator_and_sink_cpu_and_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_bench-sink"));
    let opts = Options {
        quick: true,
        command: "bench-run --quick --only ceiling,fsync,redisbase".into(),
        bin_dir: bin.parent().unwrap().to_path_buf(),
        relay_bin: dir.path().join("no-relay"),
        results_dir: dir.path().join("results"),
        work_dir: dir.path().join("run"),
        size: 1024,
        recipients: 1,
        sessions: 2,
        closed_secs: 1.0,
        open_secs: 0.0,
        drain_timeout_secs: 30.0,
        relay_workers: 1,
        backlog_messages: 10,
        backlog_size: 1024,
        steps: vec![Step::Ceiling, Step::Fsync, Step::Redisbase],
        plan_messages_per_hour: 2_000_000.0,
        redis_args: vec![],
        peers_manifest: dir.path().join("manifest.tsv"),
        peers: vec![],
        probe_rate: 200.0,
    };
    let md = run(&opts).unwrap();
    let json = std::fs::read_to_string(md.with_extension("json")).unwrap();
    let r: BenchResults = serde_json::from_str(&json).unwrap();

    let ceiling = &r.rows[0];
    assert!(ceiling.ok(), "{ceiling:?}");
    let cpu = ceiling.cpu.expect("a CPU breakdown");
    assert_eq!(cpu.sut, None);
    // Both processes did measurable work for thousands of messages; the machine did at least that.
    assert!(cpu.generator > 0.0 && cpu.sink > 0.0, "{cpu:?}");
    assert!(cpu.machine.unwrap() > 0.0, "{cpu:?}");

    // One fsync probe and two Redis probes (SET, EVAL), each with every message (1 s at 200/s).
    let names: Vec<&str> = r.probes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["fsync", "redis SET", "redis EVAL (SET + HSET + XADD)"]);
    for p in &r.probes {
        assert_eq!(p.error, None, "{p:?}");
        assert_eq!(p.schedule.count, 200, "{p:?}");
        assert_eq!(p.rate, 200.0);
    }
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.contains("## CPU per delivered message, every process"), "{text}");
    assert!(
        text.contains("## The disk and Redis alone at the relay's half rate"),
        "{text}"
    );
}
