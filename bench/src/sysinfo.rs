//! The machine description at the top of every result file: CPU, cores, RAM, kernel, OS, the
//! disk under the run directory with a measured fsync latency, load average, and the versions of
//! Postfix and Redis. Parsers are pure; collection shells out to the usual tools.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::procfs::parse_meminfo_kb;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub hostname: String,
    pub cpu_model: String,
    pub cores: usize,
    pub ram_gib: f64,
    pub kernel: String,
    pub os: String,
    /// Device, filesystem type and size of the filesystem holding the queues.
    pub disk: String,
    /// Median and 99th percentile of a 4 KiB write + fdatasync on that filesystem, in ms.
    pub fsync_p50_ms: f64,
    pub fsync_p99_ms: f64,
    /// 1-minute load average when the run started (other work on the machine skews results).
    pub load_avg_1m: f64,
    pub postfix_version: String,
    pub redis_version: String,
    pub rustc_version: String,
    pub git_commit: String,
}

/// First `model name` of `/proc/cpuinfo` and the number of `processor` entries.
pub fn parse_cpuinfo(text: &str) -> (String, usize) {
    let model = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = text.lines().filter(|l| l.starts_with("processor")).count();
    (model, cores)
}

/// `PRETTY_NAME` of `/etc/os-release`.
pub fn parse_os_release(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
}

/// `v=7.0.15` from `redis-server --version`.
pub fn parse_redis_version(text: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .map(str::to_string)
}

/// Device, type and size from the second line of `df -PT DIR` (1024-byte blocks).
pub fn parse_df(text: &str) -> Option<String> {
    let line = text.lines().nth(1)?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let blocks: f64 = f.get(2)?.parse().ok()?;
    Some(format!(
        "{} ({}, {:.0} GiB)",
        f.first()?,
        f.get(1)?,
        blocks / 1024.0 / 1024.0
    ))
}

/// The value at quantile `q` (0..=1) of `samples` (sorted in place); 0 when empty.
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let idx = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[idx.min(samples.len() - 1)]
}

/// Times `rounds` 4 KiB writes each followed by fdatasync in a scratch file under `dir`.
pub fn probe_fsync(dir: &Path, rounds: usize) -> io::Result<(f64, f64)> {
    let path = dir.join(".fsync-probe");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    let block = [b'x'; 4096];
    let mut ms = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(f);
    fs::remove_file(&path)?;
    Ok((quantile(&mut ms, 0.5), quantile(&mut ms, 0.99)))
}

fn run(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.trim().to_string()
        })
        .unwrap_or_default()
}

fn read(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_default().trim().to_string()
}

/// Describes this machine; `run_dir` is where queues and AOF files live.
pub fn collect(run_dir: &Path) -> Machine {
    let (cpu_model, cores) = parse_cpuinfo(&read("/proc/cpuinfo"));
    let mem_kb = parse_meminfo_kb(&read("/proc/meminfo"), "MemTotal").unwrap_or(0);
    let (fsync_p50_ms, fsync_p99_ms) = probe_fsync(run_dir, 200).unwrap_or((0.0, 0.0));
    let git = run("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = !run("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    Machine {
        hostname: read("/proc/sys/kernel/hostname"),
        cpu_model,
        cores,
        ram_gib: mem_kb as f64 / 1024.0 / 1024.0,
        kernel: read("/proc/sys/kernel/osrelease"),
        os: parse_os_release(&read("/etc/os-release")).unwrap_or_default(),
        disk: parse_df(&run("df", &["-PT", &run_dir.to_string_lossy()])).unwrap_or_default(),
        fsync_p50_ms,
        fsync_p99_ms,
        load_avg_1m: load_avg(),
        postfix_version: run("postconf", &["-d", "-h", "mail_version"]),
        redis_version: parse_redis_version(&run("redis-server", &["--version"])).unwrap_or_default(),
        rustc_version: run("rustc", &["--version"]),
        git_commit: if dirty {
            format!("{git} (with uncommitted changes)")
        } else {
            git
        },
    }
}

/// The 1-minute load average.
pub fn load_avg() -> f64 {
    read("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits up to `max` for the 1-minute load average to drop under `threshold`; returns the last value.
pub fn wait_for_quiet(threshold: f64, max: Duration) -> f64 {
    let deadline = Instant::now() + max;
    loop {
        let l = load_avg();
        if l < threshold || Instant::now() >= deadline {
            return l;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_os_redis_and_df() {
        let cpu = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(parse_cpuinfo(cpu), ("AMD EPYC 7B13".to_string(), 2));
        assert_eq!(
            parse_os_release("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n").unwrap(),
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(
            parse_redis_version("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0").unwrap(),
            "7.0.15"
        );
        let df = "Filesystem     Type 1024-blocks     Used Available Capacity Mounted on\n/dev/vda       ext4   264091588 19000000 76000000      21% /\n";
        assert_eq!(parse_df(df).unwrap(), "/dev/vda (ext4, 252 GiB)");
    }

    #[test]
    fn quantiles_pick_sorted_positions() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&mut v, 0.5), 3.0);
        assert_eq!(quantile(&mut v, 1.0), 5.0);
        assert_eq!(quantile(&mut v, 0.0), 1.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn fsync_probe_measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let (p50, p99) = probe_fsync(dir.path(), 5).unwrap();
        assert!(p50 > 0.0 && p99 >= p50);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
