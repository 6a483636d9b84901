//! mailroute-bench: the benchmark harness comparing the relay with Postfix, the other MTAs of
//! [`peers`] and the machine's ceiling (generator straight to sink). Library side of the `bench-loadgen`, `bench-sink` and
//! `bench-run` binaries: pure parts (messages, SMTP parsing, statistics, /proc and Redis INFO
//! parsing, sizing, the Markdown report) are plain functions; the I/O around them is thin.

pub mod client;
pub mod cpuacct;
pub mod harness;
pub mod httpget;
pub mod latency;
pub mod loadgen;
pub mod message;
pub mod peers;
pub mod postfix;
pub mod probes;
pub mod procfs;
pub mod redis_info;
pub mod reply;
pub mod report;
pub mod sink;
pub mod sink_server;
pub mod sizing;
pub mod sysinfo;
