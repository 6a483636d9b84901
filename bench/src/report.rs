//! The results of one harness run and their Markdown rendering (the file committed under
//! `bench/results/`). Pure: the harness fills [`BenchResults`], [`render`] turns it into text.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::cpuacct::{self, CpuBreakdown};
use crate::latency::LatencySummary;
use crate::probes::Probe;
use crate::sizing::{self, Sizing, SizingInput};
use crate::sysinfo::Machine;

/// Issue 18's targets, checked in the report (relay row with `appendfsync always`).
/// Delivered rate against Postfix.
pub const TARGET_VS_POSTFIX_18: f64 = 10.0;
/// Delivered rate against the fastest durable peer (Postfix or another MTA whose 250 is durable).
pub const TARGET_VS_DURABLE_PEER: f64 = 3.0;
/// CPU per delivered message: relay and Redis together, and the relay alone.
pub const TARGET_CPU_MS: f64 = 0.25;
pub const TARGET_RELAY_CPU_MS: f64 = 0.12;
/// Accept p99 at half the maximum rate.
pub const TARGET_P99_MS: f64 = 5.0;
/// Redis bytes per queued message, as a multiple of the message's size.
pub const TARGET_REDIS_BYTES_X: f64 = 1.25;

/// What kind of system a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Ceiling,
    Postfix,
    Relay,
    /// Another MTA of the comparison (Exim, OpenSMTPD, Haraka, maddy).
    Peer,
}

/// What a row's 250 means for durability, so rows compare like with like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Commit {
    /// Each message is fsynced on its own before its 250.
    FsyncPerMessage,
    /// One fsync covers every message accepted in the same batch, before any of their 250s.
    GroupCommit,
    /// The 250 comes before the message is on disk (or nothing is stored).
    None,
}

impl Commit {
    pub fn text(self) -> &'static str {
        match self {
            Commit::FsyncPerMessage => "fsync per message",
            Commit::GroupCommit => "group commit",
            Commit::None => "none",
        }
    }
}

/// The load used for every row.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub size: usize,
    pub recipients: usize,
    pub sessions: usize,
    pub closed_secs: f64,
    pub open_secs: f64,
    pub relay_workers: usize,
}

/// Redis figures of a relay row, over the closed-loop phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RedisFigures {
    pub ops_per_msg: f64,
    /// Most frequent commands and their calls per message.
    pub top_commands: Vec<(String, f64)>,
    pub cpu_ms_per_msg: f64,
    pub peak_used_memory_mib: f64,
    /// AOF rewrites (each a fork) during the whole row, and how long the latest fork took, in ms.
    #[serde(default)]
    pub aof_rewrites: Option<u64>,
    #[serde(default)]
    pub last_fork_ms: Option<f64>,
}

/// One measured configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub kind: Kind,
    pub system: String,
    pub durability: String,
    pub accepted: u64,
    pub accepted_per_sec: f64,
    pub delivered: u64,
    pub delivered_per_sec: f64,
    /// Everything accepted reached the sink before the drain deadline.
    pub drained: bool,
    pub rejected: u64,
    pub errors: u64,
    /// Open-loop rate (50% of the sustainable rate) and the latencies measured at it.
    pub half_rate: Option<f64>,
    pub latency: Option<LatencySummary>,
    pub schedule_latency: Option<LatencySummary>,
    /// CPU of the system under test (relay + Redis, or every Postfix process) per delivered message.
    pub cpu_ms_per_msg: Option<f64>,
    /// CPU of the relay process(es) alone per delivered message.
    pub relay_cpu_ms_per_msg: Option<f64>,
    /// CPU per delivered message of every process of the row (system under test, generator,
    /// sink) and of the whole machine, over the closed-loop phase and the drain.
    #[serde(default)]
    pub cpu: Option<CpuBreakdown>,
    /// Machine-wide CPU busy and iowait shares during the throughput phase (0..=1).
    #[serde(default)]
    pub machine_cpu: Option<(f64, f64)>,
    /// Peak resident memory per component, MiB.
    pub peak_rss_mib: Vec<(String, f64)>,
    pub redis: Option<RedisFigures>,
    /// What its 250 means for durability (absent in results written before it was recorded).
    #[serde(default)]
    pub commit: Option<Commit>,
    /// Why the row was not run (a peer that could not be installed), if so.
    #[serde(default)]
    pub not_run: Option<String>,
    /// Why the row has no numbers, if it failed.
    pub error: Option<String>,
    /// Something the reader should know about this row's numbers.
    #[serde(default)]
    pub note: Option<String>,
}

impl Row {
    pub fn new(kind: Kind, system: &str, durability: &str) -> Self {
        Row {
            kind,
            system: system.into(),
            durability: durability.into(),
            accepted: 0,
            accepted_per_sec: 0.0,
            delivered: 0,
            delivered_per_sec: 0.0,
            drained: false,
            rejected: 0,
            errors: 0,
            half_rate: None,
            latency: None,
            schedule_latency: None,
            cpu_ms_per_msg: None,
            relay_cpu_ms_per_msg: None,
            cpu: None,
            machine_cpu: None,
            peak_rss_mib: vec![],
            redis: None,
            commit: None,
            not_run: None,
            error: None,
            note: None,
        }
    }

    /// The row measured something.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.not_run.is_none() && self.delivered > 0
    }
}

/// The backlog run: enqueue with delivery paused, then drain.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Backlog {
    pub messages: u64,
    pub size: usize,
    pub durability: String,
    pub enqueue_per_sec: f64,
    pub redis_used_memory_mib: f64,
    pub redis_bytes_per_msg: f64,
    /// Of `redis_bytes_per_msg`, the delivery log's stream (each message's `received` record,
    /// kept for the log's retention, 31 days by default, after delivery); the rest is the queue.
    /// 0 in results from before it was measured.
    #[serde(default)]
    pub redis_dlog_bytes_per_msg: f64,
    pub redis_peak_rss_mib: f64,
    pub aof_mib: f64,
    /// Relay that accepted the backlog (delivery workers 0).
    pub relay_enqueue_peak_rss_mib: f64,
    /// Relay that drained it.
    pub relay_drain_peak_rss_mib: f64,
    /// The same relay's peak in the short throughput run, for comparison (bounded memory).
    pub relay_reference_rss_mib: Option<f64>,
    pub delivered: u64,
    pub drain_per_sec: f64,
    pub drained: bool,
    pub error: Option<String>,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchResults {
    pub started: String,
    pub quick: bool,
    pub command: String,
    pub machine: Machine,
    pub params: Params,
    pub rows: Vec<Row>,
    pub backlog: Option<Backlog>,
    pub sizing: Option<(SizingInput, Sizing)>,
    /// The disk and Redis alone at the relay's half rate (steps fsync, redisbase).
    #[serde(default)]
    pub probes: Vec<Probe>,
    pub notes: Vec<String>,
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "—".into()
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

impl BenchResults {
    fn best(&self, kind: Kind) -> Option<&Row> {
        self.rows
            .iter()
            .filter(|r| r.kind == kind && r.ok())
            .max_by(|a, b| a.delivered_per_sec.total_cmp(&b.delivered_per_sec))
    }

    fn first(&self, kind: Kind) -> Option<&Row> {
        self.rows.iter().find(|r| r.kind == kind && r.ok())
    }
}

/// Renders the committed Markdown report.
pub fn render(r: &BenchResults) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# mailroute benchmark: {} on {}\n", r.started, m.hostname);
    let _ = writeln!(
        s,
        "{} run, produced by `{}`. How to read this file: [bench/README.md](../README.md).\n",
        if r.quick { "Quick (about two minutes)" } else { "Full" },
        r.command
    );

    let _ = writeln!(s, "## Machine\n\n| | |\n|---|---|");
    let _ = writeln!(s, "| CPU | {} ({} cores) |", m.cpu_model, m.cores);
    let _ = writeln!(s, "| RAM | {:.1} GiB |", m.ram_gib);
    let _ = writeln!(s, "| Kernel / OS | {} / {} |", m.kernel, m.os);
    let _ = writeln!(
        s,
        "| Disk (queues, AOF) | {}; 4 KiB write+fdatasync p50 {:.3} ms, p99 {:.3} ms |",
        m.disk, m.fsync_p50_ms, m.fsync_p99_ms
    );
    let _ = writeln!(s, "| Load average at start | {:.2} |", m.load_avg_1m);
    let _ = writeln!(s, "| Postfix | {} |", m.postfix_version);
    let _ = writeln!(s, "| Redis | {} |", m.redis_version);
    let _ = writeln!(s, "| mailroute | git {} |", m.git_commit);
    let _ = writeln!(s, "| Compiler | {} |\n", m.rustc_version);

    let p = &r.params;
    let _ = writeln!(
        s,
        "## Load\n\n{} byte messages, {} recipient(s) each, {} concurrent SMTP sessions reused for the whole run \
         (pipelining where offered). Throughput: closed loop for {:.0} s, then wait until the sink has every accepted \
         message; delivered/s = delivered ÷ (last delivery − first send). Latency: open loop at 50% of the sustainable \
         rate (min of accepted/s and delivered/s) for {:.0} s; accept latency = end of DATA until the 250. Relay: \
         `--workers {}`.\n",
        p.size, p.recipients, p.sessions, p.closed_secs, p.open_secs, p.relay_workers
    );

    let postfix = r.best(Kind::Postfix);
    let ceiling = r.best(Kind::Ceiling);
    let _ = writeln!(s, "## Throughput and latency\n");
    let _ = writeln!(
        s,
        "| System | Durability | 250 means | Accepted/s | Delivered/s | Delivered vs Postfix | Delivered vs ceiling | Rate for latency | \
         Accept p50 ms | Accept p99 ms | CPU ms/msg (cores used) | Machine CPU busy (iowait) | Peak memory MiB |"
    );
    let _ = writeln!(s, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for row in &r.rows {
        let commit = opt(row.commit, |c| c.text().to_string());
        let why = match (&row.not_run, &row.error) {
            (Some(n), _) => Some(format!("not run: {n}")),
            (None, Some(e)) => Some(format!("failed: {e}")),
            (None, None) => None,
        };
        if let Some(why) = why {
            let _ = writeln!(
                s,
                "| {} | {} | {commit} | {} | | | | | | | | |",
                row.system,
                row.durability,
                why.replace('|', "/").replace('\n', " ")
            );
            continue;
        }
        let rss = if row.peak_rss_mib.is_empty() {
            "—".into()
        } else {
            row.peak_rss_mib
                .iter()
                .map(|(k, v)| format!("{k} {v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let delivered = format!(
            "{}{}",
            rate(row.delivered_per_sec),
            if row.drained { "" } else { " (not drained)" }
        );
        let _ = writeln!(
            s,
            "| {} | {} | {commit} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.system,
            row.durability,
            rate(row.accepted_per_sec),
            delivered,
            if row.kind == Kind::Postfix {
                "1.00×".into()
            } else {
                ratio(row.delivered_per_sec, postfix.map_or(0.0, |p| p.delivered_per_sec))
            },
            ratio(row.delivered_per_sec, ceiling.map_or(0.0, |c| c.delivered_per_sec)),
            opt(row.half_rate, |v| format!("{v:.0}/s")),
            opt(row.latency, |l| ms(l.p50_us)),
            opt(row.latency, |l| ms(l.p99_us)),
            opt(row.cpu_ms_per_msg, |v| format!(
                "{v:.3} ({:.2})",
                v * row.delivered_per_sec / 1000.0
            )),
            opt(row.machine_cpu, |(busy, io)| format!(
                "{:.0}% ({:.0}%)",
                busy * 100.0,
                io * 100.0
            )),
            rss
        );
    }
    let _ = writeln!(
        s,
        "\nCPU ms/msg is the CPU time of the system under test (relay + Redis, or all processes of Postfix or a peer MTA) per delivered \
         message, and in brackets the cores it kept busy at its delivered rate; the generator and sink run on the same \
         cores in every row. Peak memory: the kernel's peak resident \
         set (VmHWM) of each process; for Postfix and the peers, the largest sampled sum of PSS over all its processes (shared \
         pages counted once). Machine CPU busy: share of all cores busy during the throughput phase, \
         with the share spent idle waiting for disk I/O in brackets; well under 100% busy means the row was limited \
         by latency (fsync, round trips, concurrency), not by CPU.\n"
    );
    for row in r.rows.iter().filter(|row| row.error.is_none() && row.not_run.is_none()) {
        if let Some(n) = &row.note {
            let _ = writeln!(s, "{}: {n}.\n", row.system);
        }
        // A refused message is not in accepted/s: many refusals mean the row measured a limit.
        if row.rejected > 0 {
            let _ = writeln!(
                s,
                "{}: {} messages were refused (a reply other than 250) and {} failed (connection or timeout), \
                 next to {} accepted.\n",
                row.system, row.rejected, row.errors, row.accepted
            );
        }
    }
    let late: Vec<String> = r
        .rows
        .iter()
        .filter_map(|row| Some((row, row.schedule_latency?)))
        .map(|(row, l)| format!("{} ({}) p99 {} ms", row.system, row.durability, ms(l.p99_us)))
        .collect();
    if !late.is_empty() {
        let _ = writeln!(
            s,
            "Open-loop check (scheduled send time until the 250, includes waiting for a free session): {}.\n",
            late.join("; ")
        );
    }

    cpu_section(&mut s, r);

    let relay_rows: Vec<&Row> = r.rows.iter().filter(|row| row.redis.is_some() && row.ok()).collect();
    if !relay_rows.is_empty() {
        let _ = writeln!(s, "## Redis per delivered message\n");
        let _ = writeln!(
            s,
            "| Row | Ops/msg | Busiest commands (calls/msg) | Redis CPU ms/msg | Relay CPU ms/msg | Redis used_memory peak MiB | \
             AOF rewrites (last fork ms) |"
        );
        let _ = writeln!(s, "|---|--:|---|--:|--:|--:|--:|");
        for row in relay_rows {
            let Some(x) = &row.redis else { continue };
            let top = x
                .top_commands
                .iter()
                .map(|(c, n)| format!("{c} {n:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                s,
                "| {} ({}) | {:.2} | {} | {:.3} | {} | {:.1} | {} |",
                row.system,
                row.durability,
                x.ops_per_msg,
                top,
                x.cpu_ms_per_msg,
                opt(row.relay_cpu_ms_per_msg, |v| format!("{v:.3}")),
                x.peak_used_memory_mib,
                match (x.aof_rewrites, x.last_fork_ms) {
                    (Some(n), Some(ms)) => format!("{n} ({ms:.1})"),
                    _ => "—".into(),
                }
            );
        }
        let _ = writeln!(s);
    }

    probe_section(&mut s, r);

    if let Some(b) = &r.backlog {
        let _ = writeln!(s, "## Backlog\n");
        if let Some(e) = &b.error {
            let _ = writeln!(s, "Backlog run failed: {e}\n");
        } else {
            let _ = writeln!(
                s,
                "{} messages of {} bytes enqueued with delivery paused (relay `--workers 0`), {}, then drained by a \
                 fresh relay.\n",
                b.messages, b.size, b.durability
            );
            let _ = writeln!(s, "| Figure | Value |\n|---|--:|");
            let _ = writeln!(s, "| Enqueue rate | {} msg/s |", rate(b.enqueue_per_sec));
            let _ = writeln!(
                s,
                "| Redis used_memory with the backlog | {:.0} MiB |",
                b.redis_used_memory_mib
            );
            for line in backlog_bytes_rows(b) {
                let _ = writeln!(s, "{line}");
            }
            let _ = writeln!(s, "| Redis peak RSS | {:.0} MiB |", b.redis_peak_rss_mib);
            let _ = writeln!(s, "| AOF on disk | {:.0} MiB |", b.aof_mib);
            let _ = writeln!(
                s,
                "| Relay peak RSS while accepting the backlog | {:.0} MiB |",
                b.relay_enqueue_peak_rss_mib
            );
            let _ = writeln!(
                s,
                "| Relay peak RSS while draining it | {:.0} MiB |",
                b.relay_drain_peak_rss_mib
            );
            if let Some(v) = b.relay_reference_rss_mib {
                let _ = writeln!(s, "| Relay peak RSS in the short throughput run | {v:.0} MiB |");
            }
            let _ = writeln!(
                s,
                "| Drain rate | {} msg/s ({} delivered{}) |\n",
                rate(b.drain_per_sec),
                b.delivered,
                if b.drained {
                    ""
                } else {
                    ", not drained before the deadline"
                }
            );
        }
    }

    if let Some((i, _)) = &r.sizing {
        let _ = writeln!(s, "## Sizing from these figures\n");
        let _ = writeln!(
            s,
            "With a peak {:.1}× the hourly average, {:.0}-core relay pods and every core and Redis main thread planned \
             at {:.0}% (relay {:.3} CPU ms/msg, Redis {:.3} CPU ms/msg and {:.1} ops/msg, {:.0} bytes per queued \
             message):\n",
            i.peak_factor,
            i.cores_per_pod,
            i.target_utilization * 100.0,
            i.relay_cpu_ms_per_msg,
            i.redis_cpu_ms_per_msg,
            i.redis_ops_per_msg,
            i.redis_bytes_per_queued_msg
        );
        let _ = writeln!(
            s,
            "| Messages an hour | Peak rate | Relay cores | Relay pods | Redis ops/s | Redis shards | Memory for {:.0} h of backlog |",
            i.backlog_hours
        );
        let _ = writeln!(s, "|--:|--:|--:|--:|--:|--:|--:|");
        for volume in sizing_volumes(i.messages_per_hour) {
            let z = sizing::size(&SizingInput {
                messages_per_hour: volume,
                ..*i
            });
            let _ = writeln!(
                s,
                "| {:.0} | {:.0}/s | {:.1} | {} | {:.0} | {} | {:.1} GiB |",
                volume,
                z.peak_msgs_per_sec,
                z.relay_cores,
                z.relay_pods,
                z.redis_ops_per_sec,
                z.redis_shards,
                z.backlog_gib
            );
        }
        let _ = writeln!(s);
    }

    let _ = writeln!(s, "## Targets (issue 18)\n");
    for line in targets(r) {
        let _ = writeln!(s, "- {line}");
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// CPU per delivered message of every process of each row, and what it bounds on this machine.
fn cpu_section(s: &mut String, r: &BenchResults) {
    let rows: Vec<(&Row, CpuBreakdown)> = r
        .rows
        .iter()
        .filter(|row| row.ok())
        .filter_map(|row| Some((row, row.cpu?)))
        .collect();
    if rows.is_empty() {
        return;
    }
    let cores = r.machine.cores.max(1) as f64;
    let _ = writeln!(
        s,
        "## CPU per delivered message, every process
"
    );
    let _ = writeln!(
        s,
        "| Row | System under test ms | Generator ms | Sink ms | Total ms (cores at delivered/s) | Delivered/s if the total \
         used all {cores:.0} cores | Whole machine ms (others) |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|");
    for (row, c) in &rows {
        let _ = writeln!(
            s,
            "| {} ({}) | {} | {:.3} | {:.3} | {:.3} ({:.2}) | {} | {} |",
            row.system,
            row.durability,
            opt(c.sut, |v| format!("{v:.3}")),
            c.generator,
            c.sink,
            c.total(),
            c.cores_at(row.delivered_per_sec),
            opt(c.bound_per_sec(cores), rate),
            opt(c.machine, |m| format!("{m:.3} ({:.3})", c.others().unwrap_or(0.0)))
        );
    }
    let _ = writeln!(
        s,
        "\nCPU time per delivered message over the closed-loop phase and the drain: the system under test as in the \
         table above, `bench-loadgen` (its whole run) and `bench-sink`, from /proc/PID/stat. The {cores:.0} cores give \
         {:.0} CPU ms a second, so no row delivers more than {:.0} ÷ total ms per second, whatever its latencies. \
         Whole machine: every busy CPU tick in the same window (/proc/stat) per message; what it has beyond the \
         row's total (others) is work that was not the row's.",
        cores * 1000.0,
        cores * 1000.0
    );
    if let Some(pf) = r.best(Kind::Postfix) {
        let want = pf.delivered_per_sec * TARGET_VS_POSTFIX_18;
        let _ = writeln!(
            s,
            "{TARGET_VS_POSTFIX_18:.0}× Postfix ({:.0}/s) is {want:.0} delivered/s: {} CPU ms per message for the \
             relay, Redis, the generator and the sink together.",
            pf.delivered_per_sec,
            opt(cpuacct::budget_ms_per_msg(want, cores), |v| format!("{v:.3}"))
        );
    }
    let _ = writeln!(s);
}

/// The disk and Redis alone at the relay's half rate, next to the relay's own accept latency.
fn probe_section(s: &mut String, r: &BenchResults) {
    if r.probes.is_empty() {
        return;
    }
    let _ = writeln!(s, "## The disk and Redis alone at the relay's half rate\n");
    let _ = writeln!(
        s,
        "| Probe | What | Rate | Operations | p50 ms | p90 ms | p99 ms | max ms | Scheduled → done p50 / p99 ms | Messages per fsync |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    for p in &r.probes {
        if let Some(e) = &p.error {
            let _ = writeln!(
                s,
                "| {} | failed: {} | {:.0}/s | | | | | | | |",
                p.name,
                e.replace('|', "/").replace('\n', " "),
                p.rate
            );
            continue;
        }
        let l = &p.latency;
        let _ = writeln!(
            s,
            "| {} | {} | {:.0}/s | {} | {} | {} | {} | {} | {} / {} | {} |",
            p.name,
            p.detail,
            p.rate,
            p.ops,
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.max_us),
            ms(p.schedule.p50_us),
            ms(p.schedule.p99_us),
            opt(p.per_batch, |v| format!("{v:.2}"))
        );
    }
    let _ = writeln!(
        s,
        "\nfsync: messages fall due on the open-loop schedule; each round appends every due message's bytes in one \
         write and calls fdatasync once (Redis `appendfsync always` writes and fsyncs the AOF once per event-loop \
         iteration): p50…max are one round's write + fdatasync, *scheduled → done* a message's wait until its round was \
         durable, the disk's share of an accept latency with no CPU spent. Redis: one command per message over as many \
         connections as SMTP sessions; p50…max from the command written to its reply."
    );
    let relay = r
        .rows
        .iter()
        .find(|row| row.kind == Kind::Relay && row.ok() && row.durability.contains("appendfsync always"));
    let base = r
        .probes
        .iter()
        .find(|p| p.name.starts_with("redis EVAL") && p.error.is_none());
    if let (Some(row), Some(b), Some(l)) = (relay, base, relay.and_then(|row| row.latency)) {
        let _ = writeln!(
            s,
            "\nAt {:.0}/s the relay's accept p99 is {} ms, Redis alone ({}) {} ms: the relay adds {:.2} ms at p99.",
            row.half_rate.unwrap_or(0.0),
            ms(l.p99_us),
            b.name,
            ms(b.latency.p99_us),
            (l.p99_us as f64 - b.latency.p99_us as f64) / 1000.0
        );
    }
    let _ = writeln!(s);
}

/// The hourly volumes the sizing table always shows (bench/README.md quotes them).
pub const SIZING_VOLUMES: [f64; 2] = [2_000_000.0, 20_000_000.0];

/// [`SIZING_VOLUMES`] and the run's own `--plan-per-hour`, ascending, without duplicates.
pub fn sizing_volumes(planned: f64) -> Vec<f64> {
    let mut v = SIZING_VOLUMES.to_vec();
    if planned > 0.0 && !v.contains(&planned) {
        v.push(planned);
    }
    v.sort_by(f64::total_cmp);
    v
}

/// One line per target: met, missed, or not measured.
/// The backlog table's rows on Redis memory per queued message: the total, then (where measured)
/// the queue's part and the delivery log's part, each also as a multiple of the message size.
pub fn backlog_bytes_rows(b: &Backlog) -> Vec<String> {
    let size = b.size.max(1) as f64;
    let mut rows = vec![format!(
        "| Redis memory per queued message | {:.0} bytes ({:.0} over the message size, {:.2}×) |",
        b.redis_bytes_per_msg,
        b.redis_bytes_per_msg - b.size as f64,
        b.redis_bytes_per_msg / size
    )];
    if b.redis_dlog_bytes_per_msg > 0.0 {
        let queue = b.redis_bytes_per_msg - b.redis_dlog_bytes_per_msg;
        rows.push(format!(
            "| … of which the queue (message records, jobs) | {queue:.0} bytes ({:.2}×) |",
            queue / size
        ));
        rows.push(format!(
            "| … of which the delivery log (the `received` records, kept 31 days) | {:.0} bytes |",
            b.redis_dlog_bytes_per_msg
        ));
    }
    rows
}

pub fn targets(r: &BenchResults) -> Vec<String> {
    let mut out = vec![];
    let relay = r.first(Kind::Relay);
    let verdict = |ok: bool| if ok { "**met**" } else { "**missed**" };
    match (relay, r.best(Kind::Postfix)) {
        (Some(rl), Some(pf)) => {
            let x = rl.delivered_per_sec / pf.delivered_per_sec;
            out.push(format!(
                "Delivered ≥ {TARGET_VS_POSTFIX_18}× Postfix ({}): {:.0}/s vs {:.0}/s = {x:.2}×: {}",
                rl.durability,
                rl.delivered_per_sec,
                pf.delivered_per_sec,
                verdict(x >= TARGET_VS_POSTFIX_18)
            ));
        }
        _ => out.push(format!(
            "Delivered ≥ {TARGET_VS_POSTFIX_18}× Postfix: not measured (relay or Postfix row missing)"
        )),
    }
    let durable_peer = r
        .rows
        .iter()
        .filter(|x| matches!(x.kind, Kind::Postfix | Kind::Peer) && x.ok())
        .filter(|x| matches!(x.commit, Some(Commit::FsyncPerMessage | Commit::GroupCommit)))
        .max_by(|a, b| a.delivered_per_sec.total_cmp(&b.delivered_per_sec));
    match (relay, durable_peer) {
        (Some(rl), Some(p)) => {
            let x = rl.delivered_per_sec / p.delivered_per_sec;
            out.push(format!(
                "Delivered ≥ {TARGET_VS_DURABLE_PEER}× the fastest durable peer ({}, {:.0}/s): {:.0}/s = {x:.2}×: {}",
                p.system,
                p.delivered_per_sec,
                rl.delivered_per_sec,
                verdict(x >= TARGET_VS_DURABLE_PEER)
            ));
        }
        _ => out.push(format!(
            "Delivered ≥ {TARGET_VS_DURABLE_PEER}× the fastest durable peer: not measured"
        )),
    }
    let redis_cpu = relay.and_then(|rl| rl.redis.as_ref()).map(|x| x.cpu_ms_per_msg);
    match (relay.and_then(|rl| rl.relay_cpu_ms_per_msg), redis_cpu) {
        (Some(own), Some(redis)) => {
            out.push(format!(
                "Relay + Redis CPU ≤ {TARGET_CPU_MS} ms per delivered message: {own:.3} + {redis:.3} = {:.3} ms: {}",
                own + redis,
                verdict(own + redis <= TARGET_CPU_MS)
            ));
            out.push(format!(
                "Relay alone ≤ {TARGET_RELAY_CPU_MS} ms per delivered message: {own:.3} ms: {}",
                verdict(own <= TARGET_RELAY_CPU_MS)
            ));
        }
        _ => out.push(format!(
            "Relay + Redis CPU ≤ {TARGET_CPU_MS} ms (relay alone ≤ {TARGET_RELAY_CPU_MS} ms): not measured"
        )),
    }
    match relay.and_then(|rl| rl.latency) {
        Some(l) => out.push(format!(
            "Accept p99 < {TARGET_P99_MS} ms at half the maximum rate: {} ms: {}",
            ms(l.p99_us),
            verdict((l.p99_us as f64) < TARGET_P99_MS * 1000.0)
        )),
        None => out.push(format!(
            "Accept p99 < {TARGET_P99_MS} ms at half the maximum rate: not measured"
        )),
    }
    match &r.backlog {
        Some(b) if b.error.is_none() => {
            out.push(format!(
                "Relay memory flat under a {}-message backlog: peak {:.0} MiB accepting, {:.0} MiB draining{}",
                b.messages,
                b.relay_enqueue_peak_rss_mib,
                b.relay_drain_peak_rss_mib,
                opt(b.relay_reference_rss_mib, |v| format!(" (short run: {v:.0} MiB)"))
            ));
            let x = b.redis_bytes_per_msg / b.size.max(1) as f64;
            let queue = b.redis_bytes_per_msg - b.redis_dlog_bytes_per_msg;
            out.push(format!(
                "Redis bytes per queued {}-byte message ≤ {TARGET_REDIS_BYTES_X}×: {:.0} bytes = {x:.2}× \
                 (the queue {:.0} bytes = {:.2}×, the delivery log's record {:.0}): {}",
                b.size,
                b.redis_bytes_per_msg,
                queue,
                queue / b.size.max(1) as f64,
                b.redis_dlog_bytes_per_msg,
                verdict(x <= TARGET_REDIS_BYTES_X)
            ));
        }
        _ => out.push("Relay memory and Redis bytes under a backlog: not measured".into()),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: Kind, name: &str, delivered: f64) -> Row {
        Row {
            accepted: 1000,
            accepted_per_sec: delivered * 1.1,
            delivered: 1000,
            delivered_per_sec: delivered,
            drained: true,
            half_rate: Some(delivered / 2.0),
            latency: Some(LatencySummary {
                count: 10,
                p50_us: 1500,
                p99_us: 8000,
                ..Default::default()
            }),
            ..Row::new(kind, name, "d")
        }
    }

    fn results() -> BenchResults {
        let mut relay = row(Kind::Relay, "mailroute relay", 3000.0);
        relay.redis = Some(RedisFigures {
            ops_per_msg: 11.5,
            top_commands: vec![("EVALSHA".into(), 3.0)],
            cpu_ms_per_msg: 0.05,
            peak_used_memory_mib: 12.0,
            aof_rewrites: Some(2),
            last_fork_ms: Some(1.5),
        });
        relay.peak_rss_mib = vec![("relay".into(), 40.0), ("redis".into(), 20.0)];
        relay.machine_cpu = Some((0.8, 0.05));
        relay.cpu_ms_per_msg = Some(0.5);
        relay.commit = Some(Commit::GroupCommit);
        let mut failed = Row::new(Kind::Relay, "mailroute relay ×2", "d");
        failed.error = Some("relay did not start | exit 1".into());
        let mut exim = row(Kind::Peer, "Exim 4.96", 350.0);
        exim.commit = Some(Commit::FsyncPerMessage);
        let mut maddy = Row::new(Kind::Peer, "maddy", "fsync per message");
        maddy.commit = Some(Commit::FsyncPerMessage);
        maddy.not_run = Some("go build failed:\nno space".into());
        BenchResults {
            started: "2026-01-01".into(),
            command: "bench/run.sh --quick".into(),
            rows: vec![
                row(Kind::Ceiling, "ceiling", 10_000.0),
                row(Kind::Postfix, "Postfix", 400.0),
                relay,
                failed,
                exim,
                maddy,
            ],
            ..Default::default()
        }
    }

    #[test]
    fn table_has_ratios_against_postfix_and_ceiling() {
        let md = render(&results());
        assert!(
            md.contains(
                "| mailroute relay | d | group commit | 3300 | 3000 | 7.50× | 0.30× | 1500/s | 1.50 | 8.00 | 0.500 (1.50) | 80% (5%) | relay 40, redis 20 |"
            ),
            "{md}"
        );
        assert!(md.contains("| Postfix | d | — | 440 | 400 | 1.00× | 0.04× |"), "{md}");
        assert!(md.contains("| mailroute relay ×2 | d | — | failed: relay did not start / exit 1 |"));
        assert!(
            md.contains("| Exim 4.96 | d | fsync per message | 385 | 350 | 0.88× |"),
            "{md}"
        );
        assert!(
            md.contains("| maddy | fsync per message | fsync per message | not run: go build failed: no space |"),
            "{md}"
        );
        assert!(
            md.contains("| mailroute relay (d) | 11.50 | EVALSHA 3.00 | 0.050 | — | 12.0 | 2 (1.5) |"),
            "{md}"
        );
    }

    #[test]
    fn backlog_bytes_are_split_into_queue_and_log() {
        let mut b = Backlog {
            size: 4096,
            redis_bytes_per_msg: 5430.0,
            ..Backlog::default()
        };
        assert_eq!(
            backlog_bytes_rows(&b),
            ["| Redis memory per queued message | 5430 bytes (1334 over the message size, 1.33×) |"]
        );
        b.redis_dlog_bytes_per_msg = 657.0;
        let rows = backlog_bytes_rows(&b);
        assert_eq!(rows.len(), 3);
        assert!(rows[1].contains("| 4773 bytes (1.17×) |"), "{}", rows[1]);
        assert!(rows[2].contains("| 657 bytes |"), "{}", rows[2]);
        // Results stored before the split was measured still load.
        let json = serde_json::to_value(&b).unwrap();
        let mut old = json.as_object().unwrap().clone();
        old.remove("redis_dlog_bytes_per_msg");
        let back: Backlog = serde_json::from_value(serde_json::Value::Object(old)).unwrap();
        assert_eq!(back.redis_dlog_bytes_per_msg, 0.0);
    }

    #[test]
    fn cpu_table_adds_generator_and_sink_to_the_system_under_test() {
        let mut r = results();
        r.machine.cores = 2;
        let relay = r.rows.iter_mut().find(|x| x.system == "mailroute relay").unwrap();
        relay.cpu = Some(CpuBreakdown {
            sut: Some(0.5),
            generator: 0.1,
            sink: 0.15,
            machine: Some(0.8),
        });
        let md = render(&r);
        // 0.75 ms × 3000/s = 2.25 cores; 2000 CPU ms/s ÷ 0.75 = 2667/s; others 0.05.
        assert!(
            md.contains("| mailroute relay (d) | 0.500 | 0.100 | 0.150 | 0.750 (2.25) | 2667 | 0.800 (0.050) |"),
            "{md}"
        );
        assert!(!md.contains("were refused"), "{md}");
        r.rows[1].rejected = 403_239;
        assert!(
            render(&r).contains("Postfix: 403239 messages were refused (a reply other than 250) and 0 failed"),
            "{md}"
        );
        // 10× Postfix's 400/s = 4000/s on 2 cores: 0.5 ms per message for all four.
        assert!(md.contains("is 4000 delivered/s: 0.500 CPU ms per message"), "{md}");
        let json = serde_json::to_string(&r).unwrap();
        let back: BenchResults = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        // Results written before the breakdown existed still load (and render without it).
        let before = results();
        let old = serde_json::to_string(&before).unwrap().replace(",\"cpu\":null", "");
        assert!(!old.contains("\"cpu\""));
        let old: BenchResults = serde_json::from_str(&old).unwrap();
        assert_eq!(old, before);
        assert!(!render(&old).contains("every process"));
    }

    #[test]
    fn sizing_table_has_two_and_twenty_million_an_hour() {
        assert_eq!(sizing_volumes(2_000_000.0), vec![2_000_000.0, 20_000_000.0]);
        assert_eq!(
            sizing_volumes(5_000_000.0),
            vec![2_000_000.0, 5_000_000.0, 20_000_000.0]
        );
        let mut r = results();
        let input = SizingInput {
            messages_per_hour: 2_000_000.0,
            peak_factor: 2.0,
            relay_cpu_ms_per_msg: 0.131,
            redis_cpu_ms_per_msg: 0.126,
            redis_ops_per_msg: 24.5,
            redis_bytes_per_queued_msg: 12_580.0,
            cores_per_pod: 1.0,
            target_utilization: 0.5,
            backlog_hours: 1.0,
        };
        r.sizing = Some((input, sizing::size(&input)));
        let md = render(&r);
        // The 2026-12-05 full run's figures: 2 M/h fits the floors, 20 M/h needs 3 pods and 3 shards.
        assert!(
            md.contains("| 2000000 | 1111/s | 0.3 | 2 | 27222 | 1 | 23.4 GiB |"),
            "{md}"
        );
        assert!(
            md.contains("| 20000000 | 11111/s | 2.9 | 3 | 272222 | 3 | 234.3 GiB |"),
            "{md}"
        );
    }

    #[test]
    fn targets_report_met_and_missed() {
        let t = targets(&results());
        assert!(t[0].contains("7.50×: **missed**"), "{t:?}");
        // Postfix's row has no durable 250 recorded here: Exim is the fastest durable peer.
        assert!(t[1].contains("(Exim 4.96, 350/s): 3000/s = 8.57×: **met**"), "{t:?}");
        assert!(t[2].contains("not measured"), "{t:?}");
        assert!(t[3].contains("8.00 ms: **missed**"), "{t:?}");
        assert!(t[4].contains("not measured"));
        let mut r = results();
        r.rows[2].relay_cpu_ms_per_msg = Some(0.13);
        r.backlog = Some(Backlog {
            messages: 1000,
            size: 4096,
            redis_bytes_per_msg: 5165.0,
            redis_dlog_bytes_per_msg: 383.0,
            ..Default::default()
        });
        let t = targets(&r);
        assert!(t[2].contains("0.130 + 0.050 = 0.180 ms: **met**"), "{t:?}");
        assert!(t[3].contains("0.130 ms: **missed**"), "{t:?}");
        assert!(
            t[6].contains(
                "5165 bytes = 1.26× (the queue 4782 bytes = 1.17×, the delivery log's record 383): **missed**"
            ),
            "{t:?}"
        );
        let none = targets(&BenchResults::default());
        assert!(none.iter().all(|l| l.contains("not measured")));
    }
}
