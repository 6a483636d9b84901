//! `bench-run`: the whole benchmark (ceiling, Postfix, relay with two durability settings, two
//! relays on one Redis, a backlog run, optionally a perf profile) in one command; writes the
//! Markdown table and a JSON copy to `bench/results/`. Normally started by `bench/run.sh`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use mailroute_bench::harness::{ALL_STEPS, Options, Step, install_interrupt_cleanup, run};
use mailroute_bench::peers::{self, Peer};

#[derive(Parser, Debug)]
#[command(about = "Benchmark mailroute against Postfix and the generator-to-sink ceiling")]
struct Args {
    /// About two minutes: short phases and a 20,000-message backlog instead of 1,000,000.
    #[arg(long)]
    quick: bool,
    /// Run only these steps (default: all but profile). `peers` runs the peer MTAs that
    /// bench/install-peers.sh installed.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Step>,
    /// Also record a perf profile of the relay at saturation.
    #[arg(long)]
    profile: bool,
    /// Relay binary (default: mailroute-relay next to this binary).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Where the result files go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results: PathBuf,
    /// Scratch directory for queues and AOF files (default: a new directory under /var/tmp).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the scratch directory (logs, AOF) after the run.
    #[arg(long)]
    keep: bool,
    #[arg(long, default_value_t = 10 * 1024)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    #[arg(long, default_value_t = 32)]
    sessions: usize,
    /// Seconds of closed-loop load per row (default 8 quick, 30 full).
    #[arg(long)]
    closed_secs: Option<f64>,
    /// Seconds of open-loop load at half rate per row (default 5 quick, 20 full).
    #[arg(long)]
    open_secs: Option<f64>,
    /// Relay delivery workers.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Messages in the backlog run (default 20,000 quick, 1,000,000 full).
    #[arg(long)]
    backlog_messages: Option<u64>,
    /// Message size in the backlog run.
    #[arg(long, default_value_t = 4 * 1024)]
    backlog_size: usize,
    /// Hourly volume used in the sizing example.
    #[arg(long, default_value_t = 2_000_000.0)]
    plan_per_hour: f64,
    /// Extra redis-server arguments, space separated. The default is what the chart's redis.conf
    /// sets beyond AOF and appendfsync (its rewrite threshold); "" runs Redis' own defaults.
    #[arg(long, allow_hyphen_values = true, default_value = "--auto-aof-rewrite-min-size 1gb")]
    redis_args: String,
    /// Install manifest written by bench/install-peers.sh
    /// (default: ~/.cache/mailroute-bench/peers/manifest.tsv).
    #[arg(long)]
    peers_manifest: Option<PathBuf>,
    /// Which peers the peers step runs (default: exim,opensmtpd,haraka,maddy).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Rate (messages/s) of the fsync and redisbase steps when no relay row of the run gives its
    /// half rate.
    #[arg(long, default_value_t = 2400.0)]
    probe_rate: f64,
    /// Measure nothing: re-render the Markdown next to this results JSON (after a report change).
    #[arg(long)]
    render: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Some(json) = &a.render {
        let text = std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let results: mailroute_bench::report::BenchResults = serde_json::from_str(&text)?;
        let md = json.with_extension("md");
        std::fs::write(&md, mailroute_bench::report::render(&results))?;
        println!("{}", md.display());
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating bench-run")?;
    let bin_dir = exe.parent().context("bench-run has no parent directory")?.to_path_buf();
    let (work_dir, scratch) = match &a.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            PathBuf::from(format!("/var/tmp/mailroute-bench-{}", std::process::id())),
            true,
        ),
    };
    let mut steps = if a.only.is_empty() {
        ALL_STEPS.to_vec()
    } else {
        a.only.clone()
    };
    if a.profile && !steps.contains(&Step::Profile) {
        steps.push(Step::Profile);
    }
    let peers = if a.peers.is_empty() {
        Peer::ALL.to_vec()
    } else {
        a.peers
            .iter()
            .map(|k| Peer::from_key(k).with_context(|| format!("unknown peer {k:?} (exim, opensmtpd, haraka, maddy)")))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let opts = Options {
        quick: a.quick,
        command: format!(
            "bench/run.sh {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        )
        .trim()
        .to_string(),
        relay_bin: a.relay_bin.clone().unwrap_or_else(|| bin_dir.join("mailroute-relay")),
        bin_dir,
        results_dir: a.results.clone(),
        work_dir: work_dir.clone(),
        size: a.size,
        recipients: a.recipients,
        sessions: a.sessions,
        closed_secs: a.closed_secs.unwrap_or(if a.quick { 8.0 } else { 30.0 }),
        open_secs: a.open_secs.unwrap_or(if a.quick { 5.0 } else { 20.0 }),
        drain_timeout_secs: if a.quick { 60.0 } else { 300.0 },
        relay_workers: a.workers,
        backlog_messages: a.backlog_messages.unwrap_or(if a.quick { 20_000 } else { 1_000_000 }),
        backlog_size: a.backlog_size,
        steps,
        plan_messages_per_hour: a.plan_per_hour,
        redis_args: a.redis_args.split_whitespace().map(str::to_string).collect(),
        peers_manifest: a.peers_manifest.clone().unwrap_or_else(peers::default_manifest),
        peers,
        probe_rate: a.probe_rate,
    };
    install_interrupt_cleanup((scratch && !a.keep).then(|| work_dir.clone()))?;
    let result = run(&opts);
    if scratch && !a.keep {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    let md = result?;
    println!("{}", md.display());
    Ok(())
}
