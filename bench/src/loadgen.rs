//! The load generator: N messages of S bytes with R recipients through M concurrent, reused SMTP
//! sessions, either as fast as the server accepts them (closed loop) or on a fixed schedule of
//! `rate` messages per second regardless of how fast replies come (open loop, for latency at a
//! given load). Records the accept latency of every message in a histogram and, in open loop,
//! how late each reply came relative to the message's scheduled start (coordinated omission).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::time::timeout;

use crate::client::{Outcome, Session};
use crate::latency::{LatencyHistogram, LatencySummary};
use crate::message::{MessageTemplate, envelope_commands, recipients};
use crate::sink_server::unix_ns;

/// What to send and how.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Servers to connect to; session `i` uses `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    /// Upper bound on messages sent.
    pub messages: u64,
    /// Stop claiming new messages after this long (closed loop), or cap the schedule (open loop).
    pub duration: Option<Duration>,
    pub size: usize,
    pub recipients: usize,
    pub sessions: usize,
    /// Open loop at this many messages per second; `None`: closed loop.
    pub rate: Option<f64>,
    pub pipelining: bool,
    pub helo: String,
    /// Longest a single transaction (or connect) may take before it counts as an error.
    pub timeout: Duration,
}

/// Result of a run, printed as JSON by `bench-loadgen --json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// `closed` or `open`.
    pub mode: String,
    pub target_rate: Option<f64>,
    pub sessions: usize,
    pub size: usize,
    pub recipients: usize,
    /// Sessions that used pipelining.
    pub pipelined_sessions: u64,
    pub attempted: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub errors: u64,
    /// Reply code → count, for rejected messages.
    pub reject_codes: BTreeMap<u16, u64>,
    pub first_error: Option<String>,
    /// From the first message's start to the last 250.
    pub elapsed_secs: f64,
    pub accepted_per_sec: f64,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// End of DATA → final reply.
    pub accept_latency: LatencySummary,
    /// Open loop only: scheduled start → final reply (includes waiting for a free session).
    pub schedule_latency: Option<LatencySummary>,
}

#[derive(Default)]
struct SessionResult {
    accept: LatencyHistogram,
    schedule: LatencyHistogram,
    attempted: u64,
    accepted: u64,
    rejected: u64,
    errors: u64,
    reject_codes: BTreeMap<u16, u64>,
    first_error: Option<String>,
    last_accept: Option<Instant>,
    pipelined: bool,
}

/// The number of messages an open-loop run schedules: `rate × duration`, capped by `messages`.
pub fn planned_messages(messages: u64, rate: Option<f64>, duration: Option<Duration>) -> u64 {
    match (rate, duration) {
        (Some(rate), Some(d)) => messages.min((rate * d.as_secs_f64()).ceil() as u64),
        _ => messages,
    }
}

/// When message `ticket` is due in an open-loop run started at `start`.
pub fn due_at(start: Instant, ticket: u64, rate: f64) -> Instant {
    start + Duration::from_secs_f64(ticket as f64 / rate)
}

/// Runs the load and returns its report.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(!cfg.targets.is_empty(), "no target");
    anyhow::ensure!(cfg.sessions > 0, "need at least one session");
    if let Some(rate) = cfg.rate {
        anyhow::ensure!(rate > 0.0 && rate.is_finite(), "rate must be positive");
    }
    let rcpts = recipients(cfg.recipients);
    let template = Arc::new(MessageTemplate::new(cfg.size, &rcpts)?);
    let envelope: Arc<[u8]> = envelope_commands(&rcpts).into();
    let total = planned_messages(cfg.messages, cfg.rate, cfg.duration);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let start_unix_ns = unix_ns();
    let deadline = cfg.duration.map(|d| start + d);

    let mut tasks = Vec::with_capacity(cfg.sessions);
    for i in 0..cfg.sessions {
        let cfg = cfg.clone();
        let template = template.clone();
        let envelope = envelope.clone();
        let next = next.clone();
        let target = cfg.targets[i % cfg.targets.len()];
        tasks.push(tokio::spawn(async move {
            session_loop(&cfg, target, &template, &envelope, &next, total, start, deadline).await
        }));
    }

    let mut accept = LatencyHistogram::default();
    let mut schedule = LatencyHistogram::default();
    let mut report = LoadReport {
        mode: if cfg.rate.is_some() { "open" } else { "closed" }.into(),
        target_rate: cfg.rate,
        sessions: cfg.sessions,
        size: cfg.size,
        recipients: cfg.recipients,
        start_unix_ns,
        ..LoadReport::default()
    };
    let mut last_accept = None;
    for task in tasks {
        let r = task.await?;
        accept.merge(&r.accept);
        schedule.merge(&r.schedule);
        report.attempted += r.attempted;
        report.accepted += r.accepted;
        report.rejected += r.rejected;
        report.errors += r.errors;
        report.pipelined_sessions += u64::from(r.pipelined);
        for (code, n) in r.reject_codes {
            *report.reject_codes.entry(code).or_default() += n;
        }
        if report.first_error.is_none() {
            report.first_error = r.first_error;
        }
        last_accept = last_accept.max(r.last_accept);
    }
    let end = last_accept.unwrap_or_else(Instant::now);
    report.elapsed_secs = (end - start).as_secs_f64();
    report.end_unix_ns = start_unix_ns + (end - start).as_nanos() as u64;
    report.accepted_per_sec = if report.elapsed_secs > 0.0 {
        report.accepted as f64 / report.elapsed_secs
    } else {
        0.0
    };
    report.accept_latency = accept.summary();
    report.schedule_latency = cfg.rate.map(|_| schedule.summary());
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn session_loop(
    cfg: &LoadConfig,
    target: SocketAddr,
    template: &MessageTemplate,
    envelope: &[u8],
    next: &AtomicU64,
    total: u64,
    start: Instant,
    deadline: Option<Instant>,
) -> SessionResult {
    let mut r = SessionResult::default();
    let mut session: Option<Session> = None;
    let mut data = Vec::with_capacity(template.len() + 3);
    loop {
        let ticket = next.fetch_add(1, Ordering::Relaxed);
        if ticket >= total {
            break;
        }
        let due = cfg.rate.map(|rate| due_at(start, ticket, rate));
        match (due, deadline) {
            (Some(due), _) => tokio::time::sleep_until(due.into()).await,
            (None, Some(deadline)) if Instant::now() >= deadline => break,
            _ => {}
        }
        r.attempted += 1;
        if session.is_none() {
            match timeout(cfg.timeout, Session::connect(target, &cfg.helo, cfg.pipelining)).await {
                Ok(Ok(s)) => {
                    r.pipelined |= s.pipelining();
                    session = Some(s);
                }
                Ok(Err(e)) => {
                    note_error(&mut r, format!("connect {target}: {e}"));
                    // Do not spin on a server that is down.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => {
                    note_error(&mut r, format!("connect {target}: timed out"));
                    continue;
                }
            }
        }
        let Some(s) = session.as_mut() else { continue };
        template.render_data(ticket, &mut data);
        match timeout(cfg.timeout, s.send(envelope, cfg.recipients, &data)).await {
            Ok(Ok(Outcome::Accepted { latency, at })) => {
                r.accepted += 1;
                r.accept.record(latency);
                if let Some(due) = due {
                    r.schedule.record(at.saturating_duration_since(due));
                }
                r.last_accept = r.last_accept.max(Some(at));
            }
            Ok(Ok(Outcome::Rejected { code })) => {
                r.rejected += 1;
                *r.reject_codes.entry(code).or_default() += 1;
            }
            Ok(Err(e)) => {
                note_error(&mut r, format!("send to {target}: {e}"));
                session = None;
            }
            Err(_) => {
                note_error(&mut r, format!("send to {target}: timed out after {:?}", cfg.timeout));
                session = None;
            }
        }
    }
    if let Some(s) = session {
        let _ = timeout(Duration::from_secs(5), s.quit()).await;
    }
    r
}

fn note_error(r: &mut SessionResult, msg: String) {
    r.errors += 1;
    if r.first_error.is_none() {
        r.first_error = Some(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_plans_rate_times_duration_capped_by_messages() {
        assert_eq!(planned_messages(1000, Some(50.0), Some(Duration::from_secs(4))), 200);
        assert_eq!(planned_messages(100, Some(50.0), Some(Duration::from_secs(4))), 100);
        assert_eq!(planned_messages(1000, None, Some(Duration::from_secs(4))), 1000);
        assert_eq!(planned_messages(1000, Some(50.0), None), 1000);
    }

    #[test]
    fn schedule_spaces_messages_evenly() {
        let t0 = Instant::now();
        assert_eq!(due_at(t0, 0, 200.0), t0);
        assert_eq!(due_at(t0, 200, 200.0) - t0, Duration::from_secs(1));
        assert_eq!(due_at(t0, 1, 4.0) - t0, Duration::from_millis(250));
    }
}
