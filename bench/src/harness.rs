//! The orchestration behind `bench/run.sh`: starts the sink, Redis (real `redis-server` with AOF),
//! Postfix, peer MTA (configured by [`crate::peers`], installed beforehand by
//! `bench/install-peers.sh`) and relay processes, drives `bench-loadgen` against each, samples
//! memory and CPU from /proc and Redis INFO, and assembles [`BenchResults`]. Owns every process it
//! starts and stops them (also on error, via `Drop`). Measurement arithmetic lives in the pure
//! modules; it installs nothing.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use mailroute_testkit::RedisServer;

use crate::cpuacct::{self, CpuBreakdown};
use crate::httpget;
use crate::loadgen::LoadReport;
use crate::peers::{self, Install, Peer};
use crate::postfix::Postfix;
use crate::probes::{self, Probe, RedisOp};
use crate::procfs;
use crate::redis_info::{self, OpsDelta};
use crate::report::{Backlog, BenchResults, Commit, Kind, Params, RedisFigures, Row};
use crate::sink_server::{SinkStats, unix_ns};
use crate::sizing::{self, SizingInput};
use crate::sysinfo;

/// How often memory is sampled while a load runs.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const MIB: f64 = 1024.0 * 1024.0;

/// Which parts to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Step {
    Ceiling,
    Postfix,
    /// The other MTAs (Exim, OpenSMTPD, Haraka, maddy) that `bench/install-peers.sh` installed.
    Peers,
    Relay,
    Scaling,
    Backlog,
    /// The disk alone: group-commit appends + fdatasync at the relay's half rate.
    Fsync,
    /// Redis alone (`appendfsync always`): message-sized writes at the relay's half rate.
    Redisbase,
    Profile,
}

/// The steps of a complete run (profile is extra).
pub const ALL_STEPS: [Step; 8] = [
    Step::Ceiling,
    Step::Postfix,
    Step::Peers,
    Step::Relay,
    Step::Scaling,
    Step::Backlog,
    Step::Fsync,
    Step::Redisbase,
];

/// Everything `bench-run` can be told.
#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    pub command: String,
    /// Directory holding `bench-sink` and `bench-loadgen`.
    pub bin_dir: PathBuf,
    pub relay_bin: PathBuf,
    pub results_dir: PathBuf,
    /// Scratch directory for queues, AOF files and logs (on the disk being measured).
    pub work_dir: PathBuf,
    pub size: usize,
    pub recipients: usize,
    pub sessions: usize,
    pub closed_secs: f64,
    pub open_secs: f64,
    pub drain_timeout_secs: f64,
    pub relay_workers: usize,
    pub backlog_messages: u64,
    pub backlog_size: usize,
    pub steps: Vec<Step>,
    /// Hourly volume for the sizing example.
    pub plan_messages_per_hour: f64,
    /// Extra redis-server arguments for every Redis the harness starts (named in the rows).
    pub redis_args: Vec<String>,
    /// The manifest `bench/install-peers.sh` wrote, and which peers to run.
    pub peers_manifest: PathBuf,
    pub peers: Vec<Peer>,
    /// Rate of the fsync and Redis-alone probes when no relay row of this run gives one.
    pub probe_rate: f64,
}

impl Options {
    fn has(&self, s: Step) -> bool {
        self.steps.contains(&s)
    }
}

/// Pids of every child process alive right now, for cleanup when the run is interrupted.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<u32>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// On SIGINT or SIGTERM: stop every child process and private Postfix instance, then exit 130.
/// (A Postfix master daemonizes, so it would not get the terminal's signal by itself.)
/// `scratch`, if given, is removed afterwards.
pub fn install_interrupt_cleanup(scratch: Option<PathBuf>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("interrupted: stopping child processes and Postfix");
        for pid in live().iter() {
            signal(*pid, "TERM");
        }
        crate::postfix::abort_running();
        if let Some(dir) = scratch {
            // Give the children a moment to exit before their files go.
            std::thread::sleep(Duration::from_secs(1));
            let _ = fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    });
    Ok(())
}

/// A child process killed on drop (SIGTERM first, SIGKILL if it lingers).
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn new(name: &str, child: Child) -> Self {
        live().push(child.id());
        Proc {
            name: name.into(),
            child,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait up to `grace` for exit; SIGKILL after that. Returns the exit status text.
    fn terminate(&mut self, grace: Duration) -> String {
        if !self.alive() {
            return "already exited".into();
        }
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.to_string();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("{} killed after {grace:?}", self.name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(10));
        let pid = self.pid();
        live().retain(|p| *p != pid);
    }
}

/// A redis-server whose pid is known to the interrupt cleanup.
struct Redis(RedisServer);

impl Redis {
    fn pid(&self) -> anyhow::Result<u32> {
        self.0.pid().ok_or_else(|| anyhow!("redis-server pid unknown"))
    }
}

impl std::ops::Deref for Redis {
    type Target = RedisServer;
    fn deref(&self) -> &RedisServer {
        &self.0
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(pid) = self.0.pid() {
            live().retain(|p| *p != pid);
        }
    }
}

fn signal(pid: u32, sig: &str) {
    // `kill` from procps: no unsafe libc call needed for a signal to our own child.
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A free loopback port (bound and released; the tiny race is retried by callers that care).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running `bench-sink`.
struct Sink {
    proc: Proc,
    smtp: SocketAddr,
    http: SocketAddr,
}

impl Sink {
    fn start(opts: &Options) -> anyhow::Result<Self> {
        let bin = opts.bin_dir.join("bench-sink");
        let mut child = Command::new(&bin)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("sink stdout"))?;
        let proc = Proc::new("bench-sink", child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let field = |k: &str| -> anyhow::Result<SocketAddr> {
            let v = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .ok_or_else(|| anyhow!("sink said {line:?}"))?;
            Ok(v.parse()?)
        };
        Ok(Sink {
            smtp: field("smtp=")?,
            http: field("http=")?,
            proc,
        })
    }

    /// CPU ticks the sink used so far (all its threads).
    fn ticks(&self) -> u64 {
        procfs::read_stat(self.proc.pid()).map(|s| s.total_ticks()).unwrap_or(0)
    }

    fn stats(&self) -> anyhow::Result<SinkStats> {
        let r = httpget::get(self.http, "/stats")?;
        Ok(serde_json::from_str(&r.body)?)
    }
}

/// A running relay process.
struct Relay {
    proc: Proc,
    smtp: SocketAddr,
    log: PathBuf,
}

impl Relay {
    fn start(opts: &Options, redis: &RedisServer, routes: &Path, workers: usize, log: PathBuf) -> anyhow::Result<Self> {
        let mut last = anyhow!("relay never started");
        for _ in 0..3 {
            let smtp = loopback(free_port()?);
            let admin = loopback(free_port()?);
            let out = fs::File::create(&log)?;
            let err = out.try_clone()?;
            let child = Command::new(&opts.relay_bin)
                .arg("run")
                .args(["--queue", &format!("redis://127.0.0.1:{}/0", redis.port())])
                .args(["--smtp-listen", &smtp.to_string()])
                .args(["--submission-listen", "", "--smtps-listen", ""])
                .args(["--admin-listen", &admin.to_string()])
                .arg("--routes")
                .arg(routes)
                .args(["--workers", &workers.to_string()])
                .args(["--hostname", "relay.bench.example"])
                .stdout(out)
                .stderr(err)
                .spawn()
                .with_context(|| format!("starting {}", opts.relay_bin.display()))?;
            let mut relay = Relay {
                proc: Proc::new("mailroute-relay", child),
                smtp,
                log: log.clone(),
            };
            match relay.wait_ready(admin, Duration::from_secs(30)) {
                Ok(()) => return Ok(relay),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn wait_ready(&mut self, admin: SocketAddr, max: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + max;
        loop {
            if !self.proc.alive() {
                bail!("relay exited at start-up: {}", tail(&self.log, 15));
            }
            if let Ok(r) = httpget::get(admin, "/readyz")
                && r.status == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("relay not ready after {max:?}: {}", tail(&self.log, 15));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn stop(&mut self) -> String {
        self.proc.terminate(Duration::from_secs(70))
    }
}

/// Checks that the relay binary exists and its `run` takes the contract's flags.
pub fn relay_available(bin: &Path) -> Result<(), String> {
    let out = Command::new(bin)
        .args(["run", "--help"])
        .output()
        .map_err(|e| format!("{} not runnable: {e}", bin.display()))?;
    let help = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let missing: Vec<&str> = ["--queue", "--smtp-listen", "--routes", "--workers", "--admin-listen"]
        .into_iter()
        .filter(|f| !help.contains(f))
        .collect();
    if !out.status.success() || !missing.is_empty() {
        return Err(format!("`{} run --help` lacks {}", bin.display(), missing.join(", ")));
    }
    Ok(())
}

/// The standalone-mode route file sending everything to the sink.
pub fn sink_route_yaml(sink: SocketAddr) -> String {
    format!(
        "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata:\n  name: bench-sink\n  namespace: bench\n\
         spec:\n  host: \"{}\"\n  port: {}\n  tls:\n    mode: none\n  match:\n    recipientDomains: [\"*\"]\n  priority: 10\n",
        sink.ip(),
        sink.port()
    )
}

/// Peak memory of watched processes, sampled while loads run.
#[derive(Default)]
struct Watch {
    items: Vec<(String, u32, bool)>,
    peaks_kb: Vec<u64>,
}

impl Watch {
    fn add(&mut self, label: &str, pid: u32, tree: bool) {
        self.items.push((label.into(), pid, tree));
        self.peaks_kb.push(0);
    }

    fn sample(&mut self) {
        for (i, (_, pid, tree)) in self.items.iter().enumerate() {
            let kb = if *tree {
                procfs::tree_pss_kb(*pid)
            } else {
                // VmHWM is the kernel's own peak; exact for single processes.
                procfs::read_rss_kb(*pid).map(|(rss, hwm)| rss.max(hwm)).unwrap_or(0)
            };
            self.peaks_kb[i] = self.peaks_kb[i].max(kb);
        }
    }

    fn peak_mib(&self, label: &str) -> Option<f64> {
        let i = self.items.iter().position(|(l, _, _)| l == label)?;
        Some(self.peaks_kb[i] as f64 / 1024.0)
    }

    fn peaks_mib(&self) -> Vec<(String, f64)> {
        self.items
            .iter()
            .zip(&self.peaks_kb)
            .map(|((l, _, _), &kb)| (l.clone(), kb as f64 / 1024.0))
            .collect()
    }

    /// CPU ticks of every watched process (trees included).
    fn ticks(&self) -> u64 {
        self.items
            .iter()
            .map(|(_, pid, tree)| {
                if *tree {
                    procfs::tree_ticks(*pid)
                } else {
                    procfs::read_stat(*pid).map(|s| s.total_ticks()).unwrap_or(0)
                }
            })
            .sum()
    }

    fn ticks_of(&self, prefix: &str) -> u64 {
        self.items
            .iter()
            .filter(|(l, _, _)| l.starts_with(prefix))
            .map(|(_, pid, _)| procfs::read_stat(*pid).map(|s| s.total_ticks()).unwrap_or(0))
            .sum()
    }
}

/// What one `bench-loadgen` invocation does.
struct Load {
    targets: Vec<SocketAddr>,
    messages: u64,
    duration: Option<f64>,
    rate: Option<f64>,
    size: usize,
}

/// Runs `bench-loadgen`, sampling memory meanwhile.
fn run_load(opts: &Options, load: &Load, watch: &mut Watch) -> anyhow::Result<LoadReport> {
    let bin = opts.bin_dir.join("bench-loadgen");
    let mut cmd = Command::new(&bin);
    for t in &load.targets {
        cmd.arg("--target").arg(t.to_string());
    }
    cmd.args(["--messages", &load.messages.to_string()])
        .args(["--size", &load.size.to_string()])
        .args(["--recipients", &opts.recipients.to_string()])
        .args(["--sessions", &opts.sessions.to_string()])
        .arg("--json");
    if let Some(d) = load.duration {
        cmd.args(["--duration", &d.to_string()]);
    }
    if let Some(r) = load.rate {
        cmd.args(["--rate", &format!("{r:.3}")]);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut proc = Proc::new("bench-loadgen", child);
    let child = &mut proc.child;
    let status = loop {
        watch.sample();
        if let Some(st) = child.try_wait()? {
            break st;
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut err)?;
    }
    if !status.success() {
        bail!("bench-loadgen failed ({status}): {err}");
    }
    serde_json::from_str(out.trim()).with_context(|| format!("bench-loadgen output {out:?}"))
}

/// Polls the sink until it has counted `target` messages or `max` passes.
fn wait_delivered(sink: &Sink, target: u64, max: Duration, watch: &mut Watch) -> anyhow::Result<(SinkStats, bool)> {
    let deadline = Instant::now() + max;
    let mut last_sample = Instant::now();
    loop {
        let s = sink.stats()?;
        if s.messages >= target {
            return Ok((s, true));
        }
        if Instant::now() >= deadline {
            return Ok((s, false));
        }
        if last_sample.elapsed() >= SAMPLE_EVERY {
            watch.sample();
            last_sample = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// CPU ticks of this process' reaped children (`bench-loadgen` runs are the only children that
/// exit while a row is measured).
fn reaped_children_ticks() -> u64 {
    procfs::read_stat(std::process::id())
        .map(|s| s.cutime + s.cstime)
        .unwrap_or(0)
}

/// The system under test as the measurement sees it.
struct Sut<'a> {
    targets: Vec<SocketAddr>,
    sink: &'a Sink,
    redis: Option<SocketAddr>,
}

/// The closed-loop throughput phase, then the open-loop latency phase at half the sustainable rate.
fn measure(opts: &Options, row: &mut Row, sut: &Sut<'_>, watch: &mut Watch) -> anyhow::Result<()> {
    let hz = procfs::clock_ticks_per_sec() as f64;
    let s0 = sut.sink.stats()?;
    let info0 = sut.redis.map(redis_info::fetch_info).transpose()?;
    let ticks0 = watch.ticks();
    let relay_ticks0 = watch.ticks_of("relay");
    let sink_ticks0 = sut.sink.ticks();
    // The generator's CPU: it is our child, and a reaped child's ticks land in our cutime/cstime.
    let gen_ticks0 = reaped_children_ticks();
    let cpu0 = procfs::read_cpu_times();
    let closed = run_load(
        opts,
        &Load {
            targets: sut.targets.clone(),
            messages: u64::MAX / 2,
            duration: Some(opts.closed_secs),
            rate: None,
            size: opts.size,
        },
        watch,
    )?;
    let gen_ticks = reaped_children_ticks().saturating_sub(gen_ticks0);
    let (s1, drained) = wait_delivered(
        sut.sink,
        s0.messages + closed.accepted,
        Duration::from_secs_f64(opts.drain_timeout_secs),
        watch,
    )?;
    let ticks1 = watch.ticks();
    let relay_ticks1 = watch.ticks_of("relay");
    let sink_ticks = sut.sink.ticks().saturating_sub(sink_ticks0);
    let cpu1 = procfs::read_cpu_times();
    row.machine_cpu = Some(cpu0.shares_until(&cpu1));
    let info1 = sut.redis.map(redis_info::fetch_info).transpose()?;

    row.accepted = closed.accepted;
    row.accepted_per_sec = closed.accepted_per_sec;
    row.rejected = closed.rejected;
    row.errors = closed.errors;
    row.delivered = s1.messages - s0.messages;
    row.drained = drained;
    let span = if drained { s1.last_ns } else { unix_ns() }.saturating_sub(closed.start_unix_ns) as f64 / 1e9;
    row.delivered_per_sec = if span > 0.0 { row.delivered as f64 / span } else { 0.0 };
    if let Some(e) = &closed.first_error {
        eprintln!("  {}: {} errors, first: {e}", row.system, closed.errors);
    }
    if row.delivered > 0 {
        let per_msg = |ticks: u64| ticks as f64 / hz * 1000.0 / row.delivered as f64;
        if !watch.items.is_empty() {
            row.cpu_ms_per_msg = Some(per_msg(ticks1.saturating_sub(ticks0)));
        }
        if row.kind == Kind::Relay {
            row.relay_cpu_ms_per_msg = Some(per_msg(relay_ticks1.saturating_sub(relay_ticks0)));
        }
        let n = row.delivered;
        row.cpu = Some(CpuBreakdown {
            sut: row.cpu_ms_per_msg,
            generator: cpuacct::ms_per_msg(gen_ticks, hz, n).unwrap_or(0.0),
            sink: cpuacct::ms_per_msg(sink_ticks, hz, n).unwrap_or(0.0),
            machine: cpuacct::ms_per_msg(cpu1.busy.saturating_sub(cpu0.busy), hz, n),
        });
        if let (Some(a), Some(b)) = (&info0, &info1) {
            let delta = OpsDelta::between(a, b);
            let (ops, top) = delta.per_message(row.delivered, 5);
            row.redis = Some(RedisFigures {
                ops_per_msg: ops,
                top_commands: top,
                cpu_ms_per_msg: delta.cpu_secs * 1000.0 / row.delivered as f64,
                peak_used_memory_mib: b.u64("used_memory_peak").unwrap_or(0) as f64 / MIB,
                ..RedisFigures::default()
            });
        }
    }
    eprintln!(
        "  {}: accepted {:.0}/s, delivered {:.0}/s ({} of {}{})",
        row.system,
        row.accepted_per_sec,
        row.delivered_per_sec,
        row.delivered,
        row.accepted,
        if drained { "" } else { ", NOT drained" }
    );

    let sustainable = row.accepted_per_sec.min(row.delivered_per_sec);
    if sustainable > 0.0 && opts.open_secs > 0.0 {
        let half = sustainable / 2.0;
        let open = run_load(
            opts,
            &Load {
                targets: sut.targets.clone(),
                messages: u64::MAX / 2,
                duration: Some(opts.open_secs),
                rate: Some(half),
                size: opts.size,
            },
            watch,
        )?;
        let s2 = sut.sink.stats()?;
        wait_delivered(
            sut.sink,
            s2.messages.max(s1.messages + open.accepted),
            Duration::from_secs_f64(opts.drain_timeout_secs),
            watch,
        )?;
        row.half_rate = Some(half);
        row.latency = Some(open.accept_latency);
        row.schedule_latency = open.schedule_latency;
        row.rejected += open.rejected;
        row.errors += open.errors;
        eprintln!(
            "  {}: at {half:.0}/s accept p50 {:.2} ms, p99 {:.2} ms",
            row.system,
            open.accept_latency.p50_us as f64 / 1000.0,
            open.accept_latency.p99_us as f64 / 1000.0
        );
    }
    row.peak_rss_mib = watch.peaks_mib();
    // AOF rewrites fork Redis and compete for the disk: count them over the whole row.
    if let (Some(a), Some(x)) = (&info0, row.redis.as_mut()) {
        let end = redis_info::fetch_info(sut.redis.ok_or_else(|| anyhow!("redis address"))?)?;
        let rewrites = |i: &redis_info::Info| i.u64("aof_rewrites").unwrap_or(0);
        x.aof_rewrites = Some(rewrites(&end).saturating_sub(rewrites(a)));
        x.last_fork_ms = Some(end.u64("latest_fork_usec").unwrap_or(0) as f64 / 1000.0);
    }
    Ok(())
}

fn ceiling_row(opts: &Options) -> Row {
    let mut row = Row::new(Kind::Ceiling, "ceiling: loadgen → sink", "none (sink discards)");
    row.commit = Some(Commit::None);
    let r = (|| {
        let sink = Sink::start(opts)?;
        let mut watch = Watch::default();
        measure(
            opts,
            &mut row,
            &Sut {
                targets: vec![sink.smtp],
                sink: &sink,
                redis: None,
            },
            &mut watch,
        )
    })();
    if let Err(e) = r {
        row.error = Some(format!("{e:#}"));
    }
    row
}

fn postfix_row(opts: &Options, version: &str) -> Row {
    let mut row = Row::new(
        Kind::Postfix,
        &format!("Postfix {version}"),
        "fsync per message (queue file)",
    );
    row.commit = Some(Commit::FsyncPerMessage);
    let r = (|| {
        let sink = Sink::start(opts)?;
        let dir = opts.work_dir.join("postfix");
        let mut pf = Postfix::start(&dir, loopback(free_port()?), sink.smtp)?;
        let mut watch = Watch::default();
        watch.add(
            "postfix (PSS sum)",
            pf.master_pid().ok_or_else(|| anyhow!("postfix master pid unknown"))?,
            true,
        );
        let res = measure(
            opts,
            &mut row,
            &Sut {
                targets: vec![pf.listen],
                sink: &sink,
                redis: None,
            },
            &mut watch,
        );
        if res.is_err() || !row.drained {
            eprintln!("  postfix log tail:\n{}", pf.log_tail(10));
        }
        // The sink has every message; Postfix removes a queue file only after its smtp client
        // has reported back to qmgr, so give it a moment before looking.
        let deadline = Instant::now() + Duration::from_secs(30);
        while pf.queued() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let left = pf.queued();
        if left > 0 {
            row.note = Some(format!(
                "{left} messages were still in Postfix's queue 30 s after the sink had all it accepted"
            ));
        }
        pf.stop()?;
        res
    })();
    if let Err(e) = r {
        row.error = Some(format!("{e:#}"));
    }
    row
}

/// Redis with AOF and the given `appendfsync` policy, data under the work dir.
/// How a row's Redis is configured, as printed in the table.
fn redis_durability(opts: &Options, fsync: &str) -> String {
    let mut d = format!("Redis AOF appendfsync {fsync}");
    if !opts.redis_args.is_empty() {
        d.push_str(&format!(" (`{}`)", opts.redis_args.join(" ")));
    }
    d
}

fn start_redis(opts: &Options, name: &str, fsync: &str) -> anyhow::Result<Redis> {
    let dir = opts.work_dir.join(format!("redis-{name}"));
    let mut builder = RedisServer::builder()
        .aof(true)
        .dir(&dir)
        .arg("--appendfsync")
        .arg(fsync);
    for a in &opts.redis_args {
        builder = builder.arg(a);
    }
    let server = builder.start()?;
    let redis = Redis(server);
    live().push(redis.pid()?);
    Ok(redis)
}

fn relay_row(opts: &Options, fsync: &str, relays: usize) -> Row {
    let system = if relays == 1 {
        "mailroute relay".to_string()
    } else {
        format!("mailroute relay ×{relays} (one Redis)")
    };
    let mut row = Row::new(Kind::Relay, &system, &redis_durability(opts, fsync));
    // `always`: Redis fsyncs once per event-loop iteration, before replying to every client
    // served in it; `everysec`: the 250 can precede the fsync by up to a second.
    row.commit = Some(if fsync == "always" {
        Commit::GroupCommit
    } else {
        Commit::None
    });
    let r = (|| {
        let name = format!("{fsync}-{relays}");
        let redis = start_redis(opts, &name, fsync)?;
        let sink = Sink::start(opts)?;
        let routes = opts.work_dir.join(format!("routes-{name}.yaml"));
        fs::write(&routes, sink_route_yaml(sink.smtp))?;
        let mut watch = Watch::default();
        let mut procs = Vec::new();
        for i in 0..relays {
            let log = opts.work_dir.join(format!("relay-{name}-{i}.log"));
            let relay = Relay::start(opts, &redis, &routes, opts.relay_workers, log)?;
            watch.add(
                &if relays == 1 {
                    "relay".into()
                } else {
                    format!("relay{}", i + 1)
                },
                relay.pid(),
                false,
            );
            procs.push(relay);
        }
        watch.add("redis", redis.pid()?, false);
        let sut = Sut {
            targets: procs.iter().map(|p| p.smtp).collect(),
            sink: &sink,
            redis: Some(redis.addr()),
        };
        let res = measure(opts, &mut row, &sut, &mut watch);
        for p in &mut procs {
            let st = p.stop();
            if !st.contains("exit status: 0") {
                eprintln!("  relay stop: {st}; log tail:\n{}", tail(&p.log, 10));
            }
        }
        res
    })();
    if let Err(e) = r {
        row.error = Some(format!("{e:#}"));
    }
    row
}

/// The peers' rows: each installed peer measured like Postfix; one that is not installed gets a
/// row saying so and why.
fn peer_rows(opts: &Options, notes: &mut Vec<String>) -> Vec<Row> {
    let manifest = match fs::read_to_string(&opts.peers_manifest) {
        Ok(text) => peers::parse_manifest(&text).map_err(|e| e.to_string()),
        Err(e) => Err(format!(
            "no install manifest at {} ({e}); bench/install-peers.sh writes it",
            opts.peers_manifest.display()
        )),
    };
    opts.peers
        .iter()
        .map(|&peer| {
            eprintln!("{}…", peer.label());
            let install = match &manifest {
                Ok(m) => m.get(&peer).cloned().ok_or_else(|| {
                    format!(
                        "not in the install manifest {} (bench/install-peers.sh)",
                        opts.peers_manifest.display()
                    )
                }),
                Err(e) => Err(e.clone()),
            };
            let row = peer_row(opts, peer, install, notes);
            if let Some(why) = &row.not_run {
                eprintln!("  {}: not run: {why}", peer.label());
            }
            row
        })
        .collect()
}

fn peer_row(opts: &Options, peer: Peer, install: Result<Install, String>, notes: &mut Vec<String>) -> Row {
    let version = match &install {
        Ok(Install::Ready { version, .. } | Install::Failed { version, .. }) => version.as_str(),
        Err(_) => "",
    };
    let mut row = Row::new(
        Kind::Peer,
        format!("{} {version}", peer.label()).trim(),
        peer.durability(),
    );
    row.commit = Some(peer.commit());
    let program = match install {
        Ok(Install::Ready { program, .. }) => program,
        Ok(Install::Failed { reason, .. }) => {
            row.not_run = Some(reason);
            return row;
        }
        Err(why) => {
            row.not_run = Some(why);
            return row;
        }
    };
    let r = (|| {
        let sink = Sink::start(opts)?;
        let root = opts.work_dir.join(peer.key());
        let listen = loopback(free_port()?);
        let setup = peers::setup(peer, &program, &root, listen, sink.smtp);
        if let Some((spool, system)) = &setup.shared_spool {
            if system.exists() {
                bail!(
                    "{} is installed on this machine and owns {}; the bench instance would share its queue",
                    system.display(),
                    spool.display()
                );
            }
            remove_spool(spool)?;
        }
        fs::create_dir_all(&root)?;
        for d in &setup.dirs {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        for (from, to) in &setup.copies {
            fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        for (path, text) in &setup.files {
            fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some((user, dirs)) = &setup.chown {
            let st = Command::new("chown").arg("-R").arg(user).args(dirs).status()?;
            if !st.success() {
                bail!("chown -R {user} failed (bench/install-peers.sh creates the user)");
            }
        }
        let out = fs::File::create(&setup.log)?;
        let err = out.try_clone()?;
        let (exe, args) = setup.command.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let child = Command::new(exe)
            .args(args)
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let mut proc = Proc::new(peer.key(), child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
            if !proc.alive() {
                bail!("{} exited at start-up: {}", peer.label(), tail(&setup.log, 15));
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on {listen}: {}", peer.label(), tail(&setup.log, 15));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(note) = other_disk(&setup.queue, &opts.work_dir) {
            notes.push(format!("{}: {note}", peer.label()));
        }
        let mut watch = Watch::default();
        watch.add(&format!("{} (PSS sum)", peer.label()), proc.pid(), true);
        let res = measure(
            opts,
            &mut row,
            &Sut {
                targets: vec![listen],
                sink: &sink,
                redis: None,
            },
            &mut watch,
        );
        if res.is_err() || !row.drained {
            eprintln!("  {} log tail:\n{}", peer.label(), tail(&setup.log, 10));
        }
        proc.terminate(Duration::from_secs(30));
        if let Some((spool, _)) = &setup.shared_spool {
            remove_spool(spool)?;
        }
        res
    })();
    if let Err(e) = r {
        row.error = Some(format!("{e:#}"));
    }
    row
}

fn remove_spool(spool: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(spool) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", spool.display()))
        }
        _ => Ok(()),
    }
}

/// Says so when `queue` (or its nearest existing parent) is on another filesystem than `work`.
fn other_disk(queue: &Path, work: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = |p: &Path| p.ancestors().find_map(|a| fs::metadata(a).ok()).map(|m| m.dev());
    match (dev(queue), dev(work)) {
        (Some(a), Some(b)) if a != b => Some(format!(
            "its queue {} is on another filesystem than the run directory {}",
            queue.display(),
            work.display()
        )),
        _ => None,
    }
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn backlog_run(opts: &Options, messages: u64, reference_rss: Option<f64>) -> Backlog {
    let mut b = Backlog {
        messages,
        size: opts.backlog_size,
        durability: redis_durability(opts, "always"),
        relay_reference_rss_mib: reference_rss,
        ..Backlog::default()
    };
    if let Err(e) = backlog_inner(opts, &mut b) {
        b.error = Some(format!("{e:#}"));
    }
    b
}

fn backlog_inner(opts: &Options, b: &mut Backlog) -> anyhow::Result<()> {
    let redis = start_redis(opts, "backlog", "always")?;
    let redis_pid = redis.pid()?;
    let sink = Sink::start(opts)?;
    let routes = opts.work_dir.join("routes-backlog.yaml");
    fs::write(&routes, sink_route_yaml(sink.smtp))?;
    let before = redis_info::fetch_info(redis.addr())?;

    let mut paused = Relay::start(
        opts,
        &redis,
        &routes,
        0,
        opts.work_dir.join("relay-backlog-enqueue.log"),
    )?;
    let mut watch = Watch::default();
    watch.add("relay", paused.pid(), false);
    watch.add("redis", redis_pid, false);
    eprintln!(
        "  enqueueing {} messages of {} bytes with delivery paused…",
        b.messages, b.size
    );
    let enq = run_load(
        opts,
        &Load {
            targets: vec![paused.smtp],
            messages: b.messages,
            duration: None,
            rate: None,
            size: opts.backlog_size,
        },
        &mut watch,
    )?;
    b.enqueue_per_sec = enq.accepted_per_sec;
    let leaked = sink.stats()?.messages;
    if leaked > 0 {
        bail!("the relay delivered {leaked} messages with --workers 0: delivery was not paused");
    }
    let after = redis_info::fetch_info(redis.addr())?;
    let used = after.u64("used_memory").unwrap_or(0);
    b.redis_used_memory_mib = used as f64 / MIB;
    if enq.accepted > 0 {
        b.redis_bytes_per_msg =
            used.saturating_sub(before.u64("used_memory").unwrap_or(0)) as f64 / enq.accepted as f64;
    }
    b.aof_mib = dir_size(&opts.work_dir.join("redis-backlog")) as f64 / MIB;
    watch.sample();
    b.relay_enqueue_peak_rss_mib = watch.peak_mib("relay").unwrap_or(0.0);
    let st = paused.stop();
    if !st.contains("exit status: 0") {
        eprintln!("  paused relay stop: {st}");
    }
    eprintln!(
        "  enqueued {} at {:.0}/s; Redis {:.0} MiB ({:.0} B/msg); draining…",
        enq.accepted, b.enqueue_per_sec, b.redis_used_memory_mib, b.redis_bytes_per_msg
    );

    let start_ns = unix_ns();
    let drainer = Relay::start(
        opts,
        &redis,
        &routes,
        opts.relay_workers,
        opts.work_dir.join("relay-backlog-drain.log"),
    )?;
    let mut dwatch = Watch::default();
    dwatch.add("relay", drainer.pid(), false);
    dwatch.add("redis", redis_pid, false);
    // A generous deadline: the slowest plausible drain (50/s) of what was enqueued.
    let max = Duration::from_secs_f64((enq.accepted as f64 / 50.0).max(opts.drain_timeout_secs));
    let (s, drained) = wait_delivered(&sink, enq.accepted, max, &mut dwatch)?;
    b.delivered = s.messages;
    b.drained = drained;
    let end = if drained { s.last_ns } else { unix_ns() };
    let span = end.saturating_sub(start_ns) as f64 / 1e9;
    b.drain_per_sec = if span > 0.0 { s.messages as f64 / span } else { 0.0 };
    dwatch.sample();
    b.relay_drain_peak_rss_mib = dwatch.peak_mib("relay").unwrap_or(0.0);
    b.redis_peak_rss_mib = watch
        .peak_mib("redis")
        .unwrap_or(0.0)
        .max(dwatch.peak_mib("redis").unwrap_or(0.0));
    eprintln!("  drained {} at {:.0}/s", s.messages, b.drain_per_sec);
    Ok(())
}

/// Bytes one message adds to the AOF, as the probes assume: the message and ~2 KiB of metadata,
/// job and log records (the figure the sizing uses when no backlog was measured).
fn aof_bytes_per_msg(opts: &Options) -> usize {
    opts.size + 2048
}

fn fsync_probe(opts: &Options, rate: f64) -> Probe {
    let secs = opts.open_secs.max(1.0);
    probes::group_commit(&opts.work_dir, rate, secs, aof_bytes_per_msg(opts)).unwrap_or_else(|e| Probe {
        name: "fsync".into(),
        rate,
        error: Some(format!("{e:#}")),
        ..Probe::default()
    })
}

fn redis_probe(opts: &Options, op: RedisOp, rate: f64) -> Probe {
    let r = (|| {
        let redis = start_redis(opts, "probe", "always")?;
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let mut p = rt.block_on(probes::redis_open_loop(
            redis.addr(),
            op,
            rate,
            opts.open_secs.max(1.0),
            opts.sessions,
            aof_bytes_per_msg(opts),
        ))?;
        let info = redis_info::fetch_info(redis.addr())?;
        let rewrites = info.u64("aof_rewrites").unwrap_or(0);
        p.detail = format!("{} ({})", p.detail, redis_durability(opts, "always"));
        if rewrites > 0 {
            p.detail.push_str(&format!(", {rewrites} AOF rewrites"));
        }
        drop(redis);
        let _ = fs::remove_dir_all(opts.work_dir.join("redis-probe"));
        anyhow::Ok(p)
    })();
    r.unwrap_or_else(|e| Probe {
        name: op.name().into(),
        rate,
        error: Some(format!("{e:#}")),
        ..Probe::default()
    })
}

/// Records a perf profile of one relay at saturation; returns the report text.
fn profile_relay(opts: &Options, out: &Path) -> anyhow::Result<String> {
    let redis = start_redis(opts, "profile", "always")?;
    let sink = Sink::start(opts)?;
    let routes = opts.work_dir.join("routes-profile.yaml");
    fs::write(&routes, sink_route_yaml(sink.smtp))?;
    let mut relay = Relay::start(
        opts,
        &redis,
        &routes,
        opts.relay_workers,
        opts.work_dir.join("relay-profile.log"),
    )?;
    let data = opts.work_dir.join("perf.data");
    let perf = Command::new("perf")
        .args([
            "record",
            "-F",
            "499",
            "--call-graph",
            "dwarf,16384",
            "-p",
            &relay.pid().to_string(),
            "-o",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf (apt-get install linux-perf)")?;
    let mut perf = Proc::new("perf", perf);
    let mut watch = Watch::default();
    let load = run_load(
        opts,
        &Load {
            targets: vec![relay.smtp],
            messages: u64::MAX / 2,
            duration: Some(opts.closed_secs),
            rate: None,
            size: opts.size,
        },
        &mut watch,
    )?;
    let _ = wait_delivered(
        &sink,
        load.accepted,
        Duration::from_secs_f64(opts.drain_timeout_secs),
        &mut watch,
    )?;
    signal(perf.pid(), "INT");
    let deadline = Instant::now() + Duration::from_secs(120);
    while perf.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    relay.stop();
    let report = |extra: &[&str]| -> anyhow::Result<String> {
        let o = Command::new("perf")
            .arg("report")
            .arg("-i")
            .arg(&data)
            .args(["--stdio", "--percent-limit", "0.7"])
            .args(extra)
            .output()?;
        // Keep the table; drop perf's banner comments, tips and column padding.
        let text = String::from_utf8_lossy(&o.stdout);
        let kept: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| {
                !l.starts_with('#')
                    || l.starts_with("# Samples")
                    || l.starts_with("# Overhead")
                    || l.starts_with("# Children")
            })
            .map(|l| l.trim_end().chars().take(220).collect())
            .collect();
        Ok(kept.join("\n"))
    };
    let flat = report(&["--no-children", "-F", "overhead,dso,sym", "-g", "none"])?;
    let inclusive = report(&["--children", "--sort", "symbol", "-g", "none"])?;
    let text = format!(
        "# perf profile of one relay at saturation ({:.0} msg/s accepted over {:.0} s, Redis appendfsync always)\n\n\
         ## Self time\n\n{flat}\n\n## Inclusive time (children)\n\n{inclusive}\n",
        load.accepted_per_sec, opts.closed_secs
    );
    fs::write(out, &text)?;
    Ok(text)
}

/// The file name stem of a run's results: `<date>-<host>` for a full run, `-quick` for quick
/// runs, and the step names when only some steps ran, so a partial run never overwrites a
/// complete table.
pub fn result_stem(date: &str, host: &str, quick: bool, steps: &[Step]) -> String {
    let complete = ALL_STEPS.iter().all(|s| steps.contains(s));
    let mut stem = format!("{date}-{host}{}", if quick { "-quick" } else { "" });
    if !complete {
        for s in steps {
            stem.push('-');
            stem.push_str(&format!("{s:?}").to_lowercase());
        }
    }
    stem
}

/// Runs the selected steps and writes `<results>/<date>-<host>[-quick].{md,json}`; returns the Markdown path.
pub fn run(opts: &Options) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(&opts.work_dir)?;
    fs::create_dir_all(&opts.results_dir)?;
    let load = sysinfo::wait_for_quiet(0.5, Duration::from_secs(if opts.quick { 5 } else { 60 }));
    let machine = sysinfo::collect(&opts.work_dir);
    let now = chrono::Local::now();
    let mut res = BenchResults {
        started: now.format("%Y-%m-%d %H:%M %Z").to_string(),
        quick: opts.quick,
        command: opts.command.clone(),
        params: Params {
            size: opts.size,
            recipients: opts.recipients,
            sessions: opts.sessions,
            closed_secs: opts.closed_secs,
            open_secs: opts.open_secs,
            relay_workers: opts.relay_workers,
        },
        machine,
        ..BenchResults::default()
    };
    if load >= 0.5 {
        res.notes.push(format!(
            "The machine was not idle when the run started (1-minute load average {load:.2}); other work shares the cores."
        ));
    }
    eprintln!(
        "machine: {} × {}, load {:.2}",
        res.machine.cores, res.machine.cpu_model, load
    );

    if opts.has(Step::Ceiling) {
        eprintln!("ceiling (loadgen → sink)…");
        res.rows.push(ceiling_row(opts));
    }
    if opts.has(Step::Postfix) {
        eprintln!("Postfix…");
        res.rows.push(postfix_row(opts, &res.machine.postfix_version));
    }
    if opts.has(Step::Peers) {
        let mut notes = vec![];
        res.rows.extend(peer_rows(opts, &mut notes));
        res.notes.extend(notes);
    }
    let relay_ok = relay_available(&opts.relay_bin);
    let wants_relay = [Step::Relay, Step::Scaling, Step::Backlog, Step::Profile]
        .iter()
        .any(|s| opts.has(*s));
    if let (Err(why), true) = (&relay_ok, wants_relay) {
        res.notes.push(format!("Relay rows not run: {why}."));
        eprintln!("relay not available: {why}");
    }
    if relay_ok.is_ok() {
        if opts.has(Step::Relay) {
            for fsync in ["always", "everysec"] {
                eprintln!("relay, appendfsync {fsync}…");
                res.rows.push(relay_row(opts, fsync, 1));
            }
        }
        if opts.has(Step::Scaling) {
            eprintln!("scaling: two relays, one Redis…");
            res.rows.push(relay_row(opts, "always", 2));
            if let (Some(one), Some(two)) = (
                res.rows.iter().find(|r| {
                    r.kind == Kind::Relay && r.durability.contains("appendfsync always") && !r.system.contains('×')
                }),
                res.rows.iter().find(|r| r.system.contains('×')),
            ) && one.delivered_per_sec > 0.0
            {
                res.notes.push(format!(
                    "Scaling: two relay processes on one Redis deliver {:.2}× one process ({:.0}/s vs {:.0}/s, \
                     appendfsync always), on the same {} cores that Redis, the generator and the sink use; Redis \
                     operations per message: {:.1} with one process, {:.1} with two.",
                    two.delivered_per_sec / one.delivered_per_sec,
                    two.delivered_per_sec,
                    one.delivered_per_sec,
                    res.machine.cores,
                    one.redis.as_ref().map_or(0.0, |r| r.ops_per_msg),
                    two.redis.as_ref().map_or(0.0, |r| r.ops_per_msg)
                ));
            }
        }
        if opts.has(Step::Backlog) {
            let messages = opts.backlog_messages;
            if messages < 1_000_000 {
                res.notes.push(format!(
                    "Backlog run with {messages} messages instead of 1,000,000 (quick mode)."
                ));
            }
            let mem_kb =
                procfs::parse_meminfo_kb(&fs::read_to_string("/proc/meminfo").unwrap_or_default(), "MemAvailable")
                    .unwrap_or(0);
            let need = messages as f64 * (opts.backlog_size as f64 + 2048.0) * 1.3;
            let reference = res
                .rows
                .iter()
                .find(|r| r.kind == Kind::Relay && r.ok())
                .and_then(|r| r.peak_rss_mib.iter().find(|(l, _)| l == "relay").map(|(_, v)| *v));
            if need > mem_kb as f64 * 1024.0 * 0.6 {
                res.notes.push(format!(
                    "Backlog run skipped: {messages} × {} bytes needs about {:.1} GiB of Redis memory, more than 60% of what is available.",
                    opts.backlog_size,
                    need / MIB / 1024.0
                ));
            } else {
                eprintln!("backlog…");
                res.backlog = Some(backlog_run(opts, messages, reference));
            }
        }
    }

    if let Some(relay) = res
        .rows
        .iter()
        .find(|r| r.kind == Kind::Relay && r.ok() && r.redis.is_some())
    {
        let x = relay.redis.clone().unwrap_or_default();
        let bytes = res
            .backlog
            .as_ref()
            .filter(|b| b.error.is_none())
            .map_or(opts.size as f64 + 2048.0, |b| {
                b.redis_bytes_per_msg - b.size as f64 + opts.size as f64
            });
        let input = SizingInput {
            messages_per_hour: opts.plan_messages_per_hour,
            peak_factor: 2.0,
            relay_cpu_ms_per_msg: relay.relay_cpu_ms_per_msg.unwrap_or(0.0),
            redis_cpu_ms_per_msg: x.cpu_ms_per_msg,
            redis_ops_per_msg: x.ops_per_msg,
            redis_bytes_per_queued_msg: bytes,
            cores_per_pod: 1.0,
            target_utilization: 0.5,
            backlog_hours: 1.0,
        };
        res.sizing = Some((input, sizing::size(&input)));
    }

    let probe_rate = res
        .rows
        .iter()
        .find(|r| r.kind == Kind::Relay && r.ok() && r.durability.contains("appendfsync always"))
        .and_then(|r| r.half_rate)
        .unwrap_or(opts.probe_rate);
    if opts.has(Step::Fsync) {
        eprintln!("fsync: group commit on the run directory's disk at {probe_rate:.0}/s…");
        res.probes.push(fsync_probe(opts, probe_rate));
    }
    if opts.has(Step::Redisbase) {
        for op in [RedisOp::Set, RedisOp::CommitLike] {
            eprintln!("Redis alone, appendfsync always: {} at {probe_rate:.0}/s…", op.name());
            res.probes.push(redis_probe(opts, op, probe_rate));
        }
    }

    let host = res.machine.hostname.clone();
    let stem = result_stem(
        &now.format("%Y-%m-%d").to_string(),
        if host.is_empty() { "host" } else { &host },
        opts.quick,
        &opts.steps,
    );
    if opts.has(Step::Profile) && relay_ok.is_ok() {
        eprintln!("profiling the relay at saturation…");
        let path = opts.results_dir.join(format!("{stem}-perf.txt"));
        match profile_relay(opts, &path) {
            Ok(_) => res.notes.push(format!(
                "perf profile of the relay at saturation: [{0}]({0}).",
                path.file_name().unwrap_or_default().to_string_lossy()
            )),
            Err(e) => res.notes.push(format!("Profiling failed: {e:#}")),
        }
    }
    let md = opts.results_dir.join(format!("{stem}.md"));
    fs::write(&md, crate::report::render(&res))?;
    fs::write(
        opts.results_dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&res)?,
    )?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroute_api::config::{Target, Upstream};
    use mailroute_api::manifest::Manifests;
    use mailroute_api::route::TlsMode;

    #[test]
    fn sink_route_compiles_to_a_plain_smarthost_at_the_sink_for_every_domain() {
        let yaml = sink_route_yaml("127.0.0.1:40123".parse().unwrap());
        let compiled = Manifests::from_yaml(&yaml, "default").unwrap().compile();
        assert!(compiled.diagnostics.is_empty(), "{:?}", compiled.diagnostics);
        let [route] = compiled.config.routes.as_slice() else {
            panic!("one route expected: {:?}", compiled.config)
        };
        assert_eq!(route.id, "bench/bench-sink");
        assert_eq!(route.recipient_domains.len(), 1);
        assert_eq!(route.recipient_domains[0].to_string(), "*");
        let Target::Smarthost(Upstream {
            host, port, tls, auth, ..
        }) = &route.target
        else {
            panic!("{:?}", route.target)
        };
        assert_eq!(
            (host.as_str(), *port, *tls, auth),
            ("127.0.0.1", 40123, TlsMode::None, &None)
        );
    }

    #[test]
    fn partial_runs_get_their_own_file_names() {
        let all = ALL_STEPS;
        assert_eq!(result_stem("2026-01-02", "vm", false, &all), "2026-01-02-vm");
        assert_eq!(
            result_stem("2026-01-02", "vm", true, &[Step::Ceiling, Step::Peers]),
            "2026-01-02-vm-quick-ceiling-peers"
        );
        let mut with_profile = all.to_vec();
        with_profile.push(Step::Profile);
        assert_eq!(
            result_stem("2026-01-02", "vm", true, &with_profile),
            "2026-01-02-vm-quick"
        );
        assert_eq!(
            result_stem("2026-01-02", "vm", false, &[Step::Ceiling, Step::Postfix]),
            "2026-01-02-vm-ceiling-postfix"
        );
        assert_eq!(
            result_stem("2026-01-02", "vm", true, &[Step::Profile]),
            "2026-01-02-vm-quick-profile"
        );
    }

    fn options(work: &Path, manifest: PathBuf, peers: Vec<Peer>) -> Options {
        Options {
            quick: true,
            command: "bench/run.sh --quick".into(),
            bin_dir: work.join("bin"),
            relay_bin: work.join("bin/mailroute-relay"),
            results_dir: work.join("results"),
            work_dir: work.join("run"),
            size: 1024,
            recipients: 1,
            sessions: 2,
            closed_secs: 1.0,
            open_secs: 0.0,
            drain_timeout_secs: 5.0,
            relay_workers: 1,
            backlog_messages: 10,
            backlog_size: 1024,
            steps: vec![Step::Peers],
            plan_messages_per_hour: 1000.0,
            redis_args: vec![],
            peers_manifest: manifest,
            peers,
            probe_rate: 100.0,
        }
    }

    #[test]
    fn peers_that_are_not_installed_get_a_row_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("manifest.tsv");
        fs::write(&manifest, "maddy\tfailed\tv0.8.1\tgo build failed: disk full\n").unwrap();
        let mut notes = vec![];
        let rows = peer_rows(
            &options(dir.path(), manifest.clone(), vec![Peer::Maddy, Peer::OpenSmtpd]),
            &mut notes,
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].system, "maddy v0.8.1");
        assert_eq!(rows[0].not_run.as_deref(), Some("go build failed: disk full"));
        assert_eq!(rows[0].commit, Some(Commit::FsyncPerMessage));
        assert_eq!(rows[1].system, "OpenSMTPD");
        let why = rows[1].not_run.as_deref().unwrap();
        assert!(why.contains("not in the install manifest"), "{why}");
        assert!(rows.iter().all(|r| !r.ok() && r.error.is_none()));

        let missing = dir.path().join("absent.tsv");
        let rows = peer_rows(&options(dir.path(), missing, vec![Peer::Exim]), &mut notes);
        let why = rows[0].not_run.as_deref().unwrap();
        assert!(
            why.contains("no install manifest") && why.contains("install-peers.sh"),
            "{why}"
        );
        assert!(notes.is_empty());
    }

    #[test]
    fn watch_reports_peaks_and_cpu_of_live_processes() {
        let mut w = Watch::default();
        w.add("relay", std::process::id(), false);
        w.add("tree", std::process::id(), true);
        w.sample();
        let peaks = w.peaks_mib();
        assert_eq!(peaks.len(), 2);
        assert!(peaks.iter().all(|(_, v)| *v > 0.0));
        assert!(w.peak_mib("relay").unwrap() > 0.0);
        assert_eq!(w.peak_mib("absent"), None);
        assert!(w.ticks() >= w.ticks_of("relay"));
    }
}
