//! Process figures from /proc: resident memory (current and peak), CPU time and process trees
//! (Postfix is a master with many children). Parsers are pure; the readers are one-line wrappers.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::process::Command;

/// The fields of `/proc/PID/stat` the harness uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub ppid: u32,
    /// CPU time in clock ticks: own user/system, and that of waited-for children.
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
}

impl ProcStat {
    /// Own plus reaped children's CPU ticks.
    pub fn total_ticks(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Parses `/proc/PID/stat`; the command name may contain spaces and parentheses.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        pid,
        ppid: f.get(1)?.parse().ok()?,
        utime: num(11)?,
        stime: num(12)?,
        cutime: num(13)?,
        cstime: num(14)?,
    })
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in kilobytes.
pub fn parse_status_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// A `kB` field of `/proc/meminfo` (`MemTotal`, `MemAvailable`), in kilobytes.
pub fn parse_meminfo_kb(text: &str, key: &str) -> Option<u64> {
    parse_status_kb(text, key)
}

/// Machine-wide CPU time from the `cpu` line of `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub iowait: u64,
    pub total: u64,
}

impl CpuTimes {
    /// Busy and iowait shares of the time between `self` and a later sample `after` (0..=1).
    pub fn shares_until(&self, after: &CpuTimes) -> (f64, f64) {
        let total = after.total.saturating_sub(self.total);
        if total == 0 {
            return (0.0, 0.0);
        }
        let t = total as f64;
        (
            after.busy.saturating_sub(self.busy) as f64 / t,
            after.iowait.saturating_sub(self.iowait) as f64 / t,
        )
    }
}

/// Parses the aggregate `cpu  user nice system idle iowait irq softirq steal …` line.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let (idle, iowait) = (at(3), at(4));
    // guest time is already included in user/nice.
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    Some(CpuTimes {
        busy,
        iowait,
        total: busy + idle + iowait,
    })
}

pub fn read_cpu_times() -> CpuTimes {
    parse_proc_stat(&fs::read_to_string("/proc/stat").unwrap_or_default()).unwrap_or_default()
}

/// Every descendant of `root` (and `root` itself) in a pid → ppid map.
pub fn tree_of(root: u32, parents: &HashMap<u32, u32>) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let mut kids: Vec<u32> = parents.iter().filter(|&(_, &pp)| pp == p).map(|(&c, _)| c).collect();
        kids.sort_unstable();
        out.extend(kids);
        i += 1;
    }
    out
}

pub fn read_stat(pid: u32) -> io::Result<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::other(format!("unparsable /proc/{pid}/stat")))
}

/// `VmRSS` and `VmHWM` (peak) of one process, in kilobytes.
pub fn read_rss_kb(pid: u32) -> io::Result<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok((
        parse_status_kb(&text, "VmRSS").unwrap_or(0),
        parse_status_kb(&text, "VmHWM").unwrap_or(0),
    ))
}

/// The pid → ppid map of every process.
pub fn parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(st) = read_stat(pid) {
                map.insert(pid, st.ppid);
            }
        }
    }
    map
}

/// Proportional set size of one process (shared pages divided among their users), in kilobytes.
pub fn read_pss_kb(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    parse_status_kb(&text, "Pss").ok_or_else(|| io::Error::other(format!("no Pss in /proc/{pid}/smaps_rollup")))
}

/// Sum of PSS over `root` and its descendants, in kilobytes: the memory of a multi-process
/// server without counting shared libraries once per process, as summed RSS would.
pub fn tree_pss_kb(root: u32) -> u64 {
    tree_of(root, &parents())
        .into_iter()
        .filter_map(|p| read_pss_kb(p).ok())
        .sum()
}

/// CPU ticks of `root` and its live descendants (exited ones are in their parent's `c*time`).
pub fn tree_ticks(root: u32) -> u64 {
    tree_of(root, &parents())
        .into_iter()
        .filter_map(|p| read_stat(p).ok())
        .map(|s| s.total_ticks())
        .sum()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux the harness runs on).
pub fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_hostile_command_name() {
        let text = "4242 (smtpd) x (y)) S 17 4242 4242 0 -1 4194560 500 0 0 0 123 45 6 7 20 0 1 0 100 1000000 250 18446744073709551615";
        let st = parse_stat(text).unwrap();
        assert_eq!(
            st,
            ProcStat {
                pid: 4242,
                ppid: 17,
                utime: 123,
                stime: 45,
                cutime: 6,
                cstime: 7
            }
        );
        assert_eq!(st.total_ticks(), 181);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn parses_status_and_meminfo_fields() {
        let status = "Name:\tredis-server\nVmPeak:\t  300 kB\nVmHWM:\t    9000 kB\nVmRSS:\t    8000 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS"), Some(8000));
        assert_eq!(parse_status_kb(status, "VmHWM"), Some(9000));
        assert_eq!(parse_status_kb(status, "VmSwap"), None);
        let meminfo = "MemTotal:       24000000 kB\nMemFree:        1 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(parse_meminfo_kb(meminfo, "MemAvailable"), Some(23_000_000));
    }

    #[test]
    fn machine_cpu_shares_from_proc_stat() {
        let a = parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(
            a,
            CpuTimes {
                busy: 150,
                iowait: 50,
                total: 1000
            }
        );
        let b = parse_proc_stat("cpu  200 10 90 900 100 0 0 0 0 0\n").unwrap();
        let (busy, iowait) = a.shares_until(&b);
        assert!((busy - 150.0 / 300.0).abs() < 1e-9);
        assert!((iowait - 50.0 / 300.0).abs() < 1e-9);
        assert_eq!(b.shares_until(&b), (0.0, 0.0));
        assert_eq!(parse_proc_stat("intr 1 2"), None);
    }

    #[test]
    fn tree_collects_descendants_only() {
        let parents = HashMap::from([(1, 0), (10, 1), (11, 10), (12, 10), (13, 12), (20, 1)]);
        assert_eq!(tree_of(10, &parents), vec![10, 11, 12, 13]);
        assert_eq!(tree_of(13, &parents), vec![13]);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let st = read_stat(me).unwrap();
        assert_eq!(st.pid, me);
        let (rss, hwm) = read_rss_kb(me).unwrap();
        assert!(rss > 0 && hwm >= rss);
        let pss = read_pss_kb(me).unwrap();
        assert!(pss > 0 && pss <= rss + 4);
        // Other tests of this binary allocate and free meanwhile: the tree's sum (this process,
        // no children) is read between two readings of its own PSS and must reach the lower one.
        let tree = tree_pss_kb(me);
        let after = read_pss_kb(me).unwrap();
        assert!(tree >= pss.min(after), "tree {tree} kB, own {pss}/{after} kB");
    }
}
