//! Redis `INFO` as the harness reads it: memory, CPU and per-command call counts
//! (`commandstats`), and the difference between two snapshots (operations per delivered message).
//! Parsing is pure; [`fetch_info`] is a minimal RESP client so no driver sits between the harness
//! and the numbers.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One parsed `INFO all` reply.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Info {
    fields: BTreeMap<String, String>,
    /// command name (lower case, e.g. `xadd`, `client|setname`) → calls.
    pub commands: BTreeMap<String, u64>,
}

impl Info {
    pub fn parse(text: &str) -> Self {
        let mut info = Info::default();
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else { continue };
            if let Some(cmd) = k.strip_prefix("cmdstat_") {
                let calls = v
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                info.commands.insert(cmd.to_string(), calls);
            } else {
                info.fields.insert(k.to_string(), v.to_string());
            }
        }
        info
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    pub fn u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.parse().ok()
    }

    /// Redis' own CPU seconds (user + system, main process and threads).
    pub fn cpu_secs(&self) -> f64 {
        self.f64("used_cpu_user").unwrap_or(0.0) + self.f64("used_cpu_sys").unwrap_or(0.0)
    }
}

/// Commands the harness itself sends; left out of per-message operation counts.
const HARNESS_COMMANDS: &[&str] = &["info", "dbsize", "ping", "config|get", "config"];

/// Redis work between two snapshots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OpsDelta {
    /// Calls per command, excluding the harness' own; only commands that were called.
    pub calls: BTreeMap<String, u64>,
    pub total_calls: u64,
    pub cpu_secs: f64,
}

impl OpsDelta {
    pub fn between(before: &Info, after: &Info) -> Self {
        let mut calls = BTreeMap::new();
        for (cmd, &n) in &after.commands {
            if HARNESS_COMMANDS.contains(&cmd.as_str()) {
                continue;
            }
            let d = n.saturating_sub(before.commands.get(cmd).copied().unwrap_or(0));
            if d > 0 {
                calls.insert(cmd.clone(), d);
            }
        }
        OpsDelta {
            total_calls: calls.values().sum(),
            calls,
            cpu_secs: (after.cpu_secs() - before.cpu_secs()).max(0.0),
        }
    }

    /// Operations per message, and the most frequent commands with their per-message share.
    pub fn per_message(&self, messages: u64, top: usize) -> (f64, Vec<(String, f64)>) {
        if messages == 0 {
            return (0.0, vec![]);
        }
        let m = messages as f64;
        let mut by_calls: Vec<(&String, &u64)> = self.calls.iter().collect();
        by_calls.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let top = by_calls
            .into_iter()
            .take(top)
            .map(|(c, &n)| (c.to_uppercase(), n as f64 / m))
            .collect();
        (self.total_calls as f64 / m, top)
    }
}

/// Sends one command and returns its bulk, simple or integer reply as text.
pub fn command(addr: SocketAddr, args: &[&str]) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(req.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    reader.read_line(&mut head)?;
    let head = head.trim_end();
    let bad = |what: &str| io::Error::other(format!("redis {what}: {head}"));
    match head.as_bytes().first() {
        Some(b'+') | Some(b':') => Ok(head[1..].to_string()),
        Some(b'-') => Err(bad("error")),
        Some(b'$') | Some(b'=') => {
            let len: usize = head[1..].parse().map_err(|_| bad("bad length"))?;
            let mut body = vec![0u8; len + 2];
            reader.read_exact(&mut body)?;
            body.truncate(len);
            let text = String::from_utf8_lossy(&body).into_owned();
            // RESP3 verbatim strings start with a 4-byte format tag ("txt:").
            Ok(if head.starts_with('=') {
                text.get(4..).unwrap_or_default().to_string()
            } else {
                text
            })
        }
        _ => Err(bad("unexpected reply")),
    }
}

/// `INFO all`, parsed.
pub fn fetch_info(addr: SocketAddr) -> io::Result<Info> {
    Ok(Info::parse(&command(addr, &["INFO", "all"])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# Memory\r\nused_memory:1000\r\nused_memory_human:1000B\r\n# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:2.0\r\n\
        # Commandstats\r\ncmdstat_xadd:calls=10,usec=100,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=3,usec=30,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n";
    const AFTER: &str = "# Memory\r\nused_memory:5000\r\n# CPU\r\nused_cpu_sys:2.0\r\nused_cpu_user:3.0\r\n\
        # Commandstats\r\ncmdstat_xadd:calls=110,usec=100,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_evalsha:calls=200,usec=100,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_client|setname:calls=4,usec=1\r\n\
        cmdstat_info:calls=9,usec=30,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n";

    #[test]
    fn parses_fields_and_commandstats() {
        let info = Info::parse(BEFORE);
        assert_eq!(info.u64("used_memory"), Some(1000));
        assert_eq!(info.get("used_memory_human"), Some("1000B"));
        assert_eq!(info.commands.get("xadd"), Some(&10));
        assert!((info.cpu_secs() - 3.5).abs() < 1e-9);
    }

    #[test]
    fn delta_counts_new_calls_without_the_harness_own() {
        let d = OpsDelta::between(&Info::parse(BEFORE), &Info::parse(AFTER));
        assert_eq!(d.total_calls, 304);
        assert_eq!(d.calls.get("info"), None);
        assert_eq!(d.calls.get("client|setname"), Some(&4));
        assert!((d.cpu_secs - 1.5).abs() < 1e-9);
        let (per_msg, top) = d.per_message(100, 2);
        assert!((per_msg - 3.04).abs() < 1e-9);
        assert_eq!(top, vec![("EVALSHA".to_string(), 2.0), ("XADD".to_string(), 1.0)]);
        assert_eq!(d.per_message(0, 2), (0.0, vec![]));
    }
}
