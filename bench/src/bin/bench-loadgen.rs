//! `bench-loadgen`: sends N messages of S bytes with R recipients through M reused SMTP sessions,
//! closed loop (as fast as accepted) or open loop (`--rate`), and prints the accept-latency
//! histogram summary; `--json` prints the whole report as one JSON object instead.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use mailroute_bench::loadgen::{LoadConfig, run};

#[derive(Parser, Debug)]
#[command(about = "SMTP load generator with accept-latency histograms")]
struct Args {
    /// Server to send to (repeatable: sessions are spread round-robin).
    #[arg(long = "target", required = true)]
    targets: Vec<SocketAddr>,
    /// Messages to send (upper bound).
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Stop after this many seconds (closed loop) or schedule only this long (open loop).
    #[arg(long)]
    duration: Option<f64>,
    /// Message size in bytes.
    #[arg(long, default_value_t = 10 * 1024)]
    size: usize,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    /// Concurrent SMTP sessions.
    #[arg(long, default_value_t = 32)]
    sessions: usize,
    /// Open loop: messages per second on a fixed schedule.
    #[arg(long)]
    rate: Option<f64>,
    /// Never pipeline, even when the server offers it.
    #[arg(long)]
    no_pipelining: bool,
    /// Name sent in EHLO.
    #[arg(long, default_value = "loadgen.bench.example")]
    helo: String,
    /// Seconds one transaction may take before it counts as an error.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let secs = |s: f64| Duration::try_from_secs_f64(s).map_err(|e| anyhow::anyhow!("bad duration {s}: {e}"));
    let cfg = LoadConfig {
        targets: a.targets,
        messages: a.messages,
        duration: a.duration.map(secs).transpose()?,
        size: a.size,
        recipients: a.recipients,
        sessions: a.sessions,
        rate: a.rate,
        pipelining: !a.no_pipelining,
        helo: a.helo,
        timeout: secs(a.timeout)?,
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = a.threads {
        rt.worker_threads(n.max(1));
    }
    let report = rt.enable_all().build()?.block_on(run(cfg))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let l = &report.accept_latency;
        println!(
            "{} loop: {} accepted, {} rejected, {} errors in {:.2}s = {:.0} msg/s; accept latency p50 {:.2}ms p99 {:.2}ms max {:.2}ms",
            report.mode,
            report.accepted,
            report.rejected,
            report.errors,
            report.elapsed_secs,
            report.accepted_per_sec,
            l.p50_us as f64 / 1000.0,
            l.p99_us as f64 / 1000.0,
            l.max_us as f64 / 1000.0
        );
        if let Some(e) = &report.first_error {
            println!("first error: {e}");
        }
    }
    Ok(())
}
