//! What the disk and a bare Redis give at a relay row's rate, to tell how much of the relay's
//! accept latency with `appendfsync always` is the disk and Redis' group commit and how much is
//! the relay: (a) an open-loop group-commit model on a plain file (every message due so far is
//! appended in one write and covered by one `fdatasync`, as Redis does once per event-loop
//! iteration), (b) open-loop single writes of a message-sized value against `redis-server` from
//! as many connections as the SMTP load uses. Owns no process: the harness starts Redis.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::latency::{LatencyHistogram, LatencySummary};
use crate::loadgen::due_at;

/// One probe's result, as the report prints it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// `fsync` or `redis SET` / `redis EVAL`.
    pub name: String,
    /// What was done, in words.
    pub detail: String,
    /// Open-loop rate, operations (messages) a second.
    pub rate: f64,
    pub ops: u64,
    /// The operation itself: write + fdatasync, or command sent → reply read.
    pub latency: LatencySummary,
    /// From the operation's scheduled time until it was durable / answered (includes waiting
    /// for the previous fsync or a free connection).
    pub schedule: LatencySummary,
    /// Messages per fsync (the group-commit batch), for the fsync probe.
    pub per_batch: Option<f64>,
    pub error: Option<String>,
}

/// How many of `total` messages are due `elapsed` after the start at `rate` a second (message 0
/// is due at once).
pub fn due_by(elapsed: Duration, rate: f64, total: u64) -> u64 {
    if rate <= 0.0 {
        return total;
    }
    ((elapsed.as_secs_f64() * rate).floor() as u64 + 1).min(total)
}

/// (a) Group commit on a plain file under `dir`: messages fall due at `rate` a second for `secs`;
/// each round appends `bytes_per_msg` for every message due so far in one write, then one
/// `fdatasync`. Latency = one round's write + fdatasync; schedule = a message's due time until
/// its round's fdatasync returned. The file is removed afterwards.
pub fn group_commit(dir: &Path, rate: f64, secs: f64, bytes_per_msg: usize) -> io::Result<Probe> {
    let path = dir.join(".group-commit-probe");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    let total = ((rate * secs).round() as u64).max(1);
    let mut fsync = LatencyHistogram::default();
    let mut commit = LatencyHistogram::default();
    let mut buf = Vec::new();
    let (mut done, mut rounds) = (0u64, 0u64);
    let start = Instant::now();
    while done < total {
        let due = due_by(start.elapsed(), rate, total);
        if due == done {
            let next = due_at(start, done, rate);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            continue;
        }
        buf.resize((due - done) as usize * bytes_per_msg, b'x');
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        let end = Instant::now();
        fsync.record(end - t);
        for m in done..due {
            commit.record(end.saturating_duration_since(due_at(start, m, rate)));
        }
        done = due;
        rounds += 1;
    }
    drop(f);
    fs::remove_file(&path)?;
    Ok(Probe {
        name: "fsync".into(),
        detail: format!(
            "{bytes_per_msg} bytes per message appended, one write + fdatasync per round for every message due"
        ),
        rate,
        ops: rounds,
        latency: fsync.summary(),
        schedule: commit.summary(),
        per_batch: Some(total as f64 / rounds.max(1) as f64),
        error: None,
    })
}

/// The RESP encoding of one command.
pub fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// What a commit writes, in one script: the message body, a metadata hash and a stream entry.
pub const COMMIT_LIKE_SCRIPT: &str = "redis.call('SET', KEYS[1], ARGV[1]); \
     redis.call('HSET', KEYS[2], 'from', ARGV[2], 'rcpt', ARGV[3], 'size', #ARGV[1]); \
     redis.call('XADD', KEYS[3], '*', 'id', KEYS[1]); return 1";

/// Which command the Redis probe sends for message `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisOp {
    /// `SET bench:body:<n> <value>`.
    Set,
    /// [`COMMIT_LIKE_SCRIPT`] by EVAL.
    CommitLike,
}

impl RedisOp {
    pub fn name(self) -> &'static str {
        match self {
            RedisOp::Set => "redis SET",
            RedisOp::CommitLike => "redis EVAL (SET + HSET + XADD)",
        }
    }

    pub fn command(self, n: u64, value: &[u8]) -> Vec<u8> {
        let body = format!("bench:body:{n}");
        match self {
            RedisOp::Set => resp(&[b"SET", body.as_bytes(), value]),
            RedisOp::CommitLike => {
                let meta = format!("bench:meta:{n}");
                resp(&[
                    b"EVAL",
                    COMMIT_LIKE_SCRIPT.as_bytes(),
                    b"3",
                    body.as_bytes(),
                    meta.as_bytes(),
                    b"bench:stream",
                    value,
                    b"bench-sender@bench.example",
                    b"rcpt-0@bench.example",
                ])
            }
        }
    }
}

/// (b) Open-loop writes of a `value_size`-byte value at `rate` a second for `secs` over
/// `connections` connections to `redis` (messages handed out in order, like the SMTP generator's
/// sessions). Latency = command written → reply read.
pub async fn redis_open_loop(
    redis: SocketAddr,
    op: RedisOp,
    rate: f64,
    secs: f64,
    connections: usize,
    value_size: usize,
) -> anyhow::Result<Probe> {
    anyhow::ensure!(rate > 0.0 && connections > 0, "rate and connections must be positive");
    let total = ((rate * secs).round() as u64).max(1);
    let value: Arc<[u8]> = vec![b'v'; value_size].into();
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (value, next) = (value.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(redis).await?;
            stream.set_nodelay(true)?;
            let mut conn = BufReader::new(stream);
            let (mut lat, mut sched) = (LatencyHistogram::default(), LatencyHistogram::default());
            let mut line = String::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let due = due_at(start, n, rate);
                tokio::time::sleep_until(due.into()).await;
                let cmd = op.command(n, &value);
                let t = Instant::now();
                conn.get_mut().write_all(&cmd).await?;
                line.clear();
                conn.read_line(&mut line).await?;
                let end = Instant::now();
                anyhow::ensure!(
                    line.starts_with('+') || line.starts_with(':'),
                    "redis answered {:?}",
                    line.trim_end()
                );
                lat.record(end - t);
                sched.record(end.saturating_duration_since(due));
            }
            anyhow::Ok((lat, sched))
        }));
    }
    let (mut lat, mut sched) = (LatencyHistogram::default(), LatencyHistogram::default());
    for t in tasks {
        let (l, s) = t.await??;
        lat.merge(&l);
        sched.merge(&s);
    }
    Ok(Probe {
        name: op.name().into(),
        detail: format!("{value_size}-byte value, {connections} connections, open loop"),
        rate,
        ops: lat.len(),
        latency: lat.summary(),
        schedule: sched.summary(),
        per_batch: None,
        error: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_fall_due_on_the_open_loop_schedule() {
        assert_eq!(due_by(Duration::ZERO, 1000.0, 10), 1);
        assert_eq!(due_by(Duration::from_micros(999), 1000.0, 10), 1);
        assert_eq!(due_by(Duration::from_millis(1), 1000.0, 10), 2);
        assert_eq!(due_by(Duration::from_millis(4), 1000.0, 10), 5);
        assert_eq!(due_by(Duration::from_secs(1), 1000.0, 10), 10);
        assert_eq!(due_by(Duration::ZERO, 0.0, 7), 7);
    }

    #[test]
    fn commands_are_resp_arrays_of_bulk_strings() {
        assert_eq!(
            resp(&[b"SET", b"k", b"vv"]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n"
        );
        let eval = RedisOp::CommitLike.command(7, b"x");
        let text = String::from_utf8(eval).unwrap();
        assert!(text.starts_with("*9\r\n$4\r\nEVAL\r\n"), "{text}");
        assert!(
            text.contains("bench:body:7\r\n") && text.contains("bench:meta:7\r\n"),
            "{text}"
        );
    }

    #[test]
    fn group_commit_covers_every_message_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = group_commit(dir.path(), 2000.0, 0.05, 512).unwrap();
        assert_eq!(p.schedule.count, 100);
        assert_eq!(p.latency.count, p.ops);
        let per = p.per_batch.unwrap();
        assert!(per >= 1.0 && (per * p.ops as f64 - 100.0).abs() < 1e-6, "{p:?}");
        assert!(p.schedule.max_us >= p.latency.p50_us, "{p:?}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn redis_probe_writes_every_message_through_a_real_server() {
        let server = mailroute_testkit::RedisServer::builder().aof(true).start().unwrap();
        for op in [RedisOp::Set, RedisOp::CommitLike] {
            let p = redis_open_loop(server.addr(), op, 500.0, 0.1, 4, 1024).await.unwrap();
            assert_eq!((p.ops, p.schedule.count), (50, 50), "{p:?}");
            assert!(p.latency.p50_us > 0);
        }
    }
}
