//! In-process queue with the same semantics as the Redis one, for local runs and unit tests.
//! Not durable: everything is lost when the process exits, and the relay says so at start-up.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Mutex, Notify};

use crate::clock::now_ms;
use crate::control::rules::Hold;

use super::{CancelOutcome, Disposition, Leased, MessageView, Queue, QueueStats, Result, Stored};
use crate::queue::message::{Job, MessageMeta, RecipientState, RecipientStatus};

struct Msg {
    meta: MessageMeta,
    body: Bytes,
    pending: i64,
    cancelled: bool,
    states: HashMap<u32, RecipientState>,
}

/// A leased job: who holds it, since when (renewed), and when it became ready (for age).
struct Inflight {
    job: Job,
    consumer: String,
    since: Instant,
    ready_at: i64,
}

#[derive(Default)]
struct State {
    messages: HashMap<String, Msg>,
    /// (lease id, job, became ready at ms)
    ready: VecDeque<(u64, Job, i64)>,
    inflight: HashMap<u64, Inflight>,
    sched: BTreeMap<(i64, u64), Job>,
    seq: u64,
    holds: HashMap<String, Hold>,
}

#[derive(Default)]
pub struct MemoryQueue {
    state: Mutex<State>,
    notify: Notify,
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    fn durable(&self) -> bool {
        false
    }

    async fn enqueue(&self, meta: &MessageMeta, body: &[u8], jobs: &[(Job, Option<i64>)]) -> Result<()> {
        let mut s = self.state.lock().await;
        s.messages.insert(
            meta.id.clone(),
            Msg {
                meta: meta.clone(),
                body: Bytes::copy_from_slice(body),
                pending: jobs.len() as i64,
                cancelled: false,
                states: HashMap::new(),
            },
        );
        let now = now_ms();
        for (job, due) in jobs {
            s.seq += 1;
            let seq = s.seq;
            match due {
                Some(due) => {
                    s.sched.insert((*due, seq), job.clone());
                }
                None => s.ready.push_back((seq, job.clone(), now)),
            }
        }
        drop(s);
        self.notify.notify_waiters();
        Ok(())
    }

    async fn promote_due(&self, now_ms: i64, max: usize) -> Result<usize> {
        let mut s = self.state.lock().await;
        let due: Vec<(i64, u64)> = s
            .sched
            .range(..=(now_ms, u64::MAX))
            .take(max)
            .map(|(k, _)| *k)
            .collect();
        for k in &due {
            if let Some(job) = s.sched.remove(k) {
                s.seq += 1;
                let seq = s.seq;
                s.ready.push_back((seq, job, now_ms));
            }
        }
        drop(s);
        if !due.is_empty() {
            self.notify.notify_waiters();
        }
        Ok(due.len())
    }

    async fn fetch(&self, consumer: &str, max: usize, block: Duration) -> Result<Vec<Leased>> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.state.lock().await;
                if !s.ready.is_empty() {
                    let mut out = Vec::new();
                    while out.len() < max {
                        let Some((lease, job, ready_at)) = s.ready.pop_front() else {
                            break;
                        };
                        s.inflight.insert(
                            lease,
                            Inflight {
                                job: job.clone(),
                                consumer: consumer.to_owned(),
                                since: Instant::now(),
                                ready_at,
                            },
                        );
                        out.push(Leased {
                            lease: lease.to_string(),
                            job,
                        });
                    }
                    return Ok(out);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn reclaim(&self, consumer: &str, min_idle: Duration, max: usize) -> Result<Vec<Leased>> {
        let mut s = self.state.lock().await;
        let mut out = Vec::new();
        for (lease, held) in s.inflight.iter_mut() {
            if out.len() >= max {
                break;
            }
            if held.since.elapsed() >= min_idle {
                held.since = Instant::now();
                consumer.clone_into(&mut held.consumer);
                out.push(Leased {
                    lease: lease.to_string(),
                    job: held.job.clone(),
                });
            }
        }
        Ok(out)
    }

    async fn renew(&self, consumer: &str, leases: &[String]) -> Result<usize> {
        let mut s = self.state.lock().await;
        let mut n = 0;
        for lease in leases.iter().filter_map(|l| l.parse::<u64>().ok()) {
            if let Some(held) = s.inflight.get_mut(&lease).filter(|h| h.consumer == consumer) {
                held.since = Instant::now();
                n += 1;
            }
        }
        Ok(n)
    }

    async fn load(&self, msg_id: &str) -> Result<Option<Stored>> {
        let s = self.state.lock().await;
        Ok(s.messages.get(msg_id).map(|m| Stored {
            meta: m.meta.clone(),
            body: m.body.clone(),
            cancelled: m.cancelled,
        }))
    }

    async fn complete(&self, leased: &Leased, disposition: Disposition) -> Result<bool> {
        let mut s = self.state.lock().await;
        let Ok(lease) = leased.lease.parse::<u64>() else {
            return Ok(false);
        };
        if s.inflight.remove(&lease).is_none() {
            return Ok(false);
        }
        let msg_id = leased.job.msg.clone();
        let Some(m) = s.messages.get_mut(&msg_id) else {
            return Ok(true);
        };
        match disposition {
            // Held jobs wait in the schedule here: one process, no gauge to feed.
            Disposition::Reschedule { job, due_ms, state } | Disposition::Hold { job, due_ms, state, .. } => {
                m.states.insert(leased.job.rcpt, state);
                s.seq += 1;
                let seq = s.seq;
                s.sched.insert((due_ms, seq), job);
            }
            Disposition::Final { state } => {
                m.states.insert(leased.job.rcpt, state);
                m.pending -= 1;
                if m.pending <= 0 {
                    s.messages.remove(&msg_id);
                }
            }
        }
        Ok(true)
    }

    async fn cancel(&self, msg_id: &str) -> Result<CancelOutcome> {
        let mut guard = self.state.lock().await;
        let s = &mut *guard;
        let Some(m) = s.messages.get_mut(msg_id) else {
            return Ok(CancelOutcome::NotFound);
        };
        if m.cancelled {
            return Ok(CancelOutcome::AlreadyCancelled);
        }
        m.cancelled = true;
        let mut now = Vec::new();
        s.sched.retain(|_, job| {
            let mine = job.msg == msg_id;
            if mine {
                now.push(job.rcpt);
            }
            !mine
        });
        s.ready.retain(|(_, job, _)| {
            let mine = job.msg == msg_id;
            if mine {
                now.push(job.rcpt);
            }
            !mine
        });
        let in_flight = s
            .inflight
            .values()
            .filter(|h| h.job.msg == msg_id)
            .map(|h| h.job.rcpt)
            .collect();
        for i in &now {
            let attempts = m.states.get(i).map_or(0, |st| st.attempts);
            m.states.insert(
                *i,
                RecipientState {
                    status: RecipientStatus::Cancelled,
                    attempts,
                    next_attempt_ms: None,
                    last_reply: None,
                    route: None,
                },
            );
        }
        m.pending -= now.len() as i64;
        if m.pending <= 0 {
            s.messages.remove(msg_id);
        }
        now.sort_unstable();
        Ok(CancelOutcome::Cancelled { now, in_flight })
    }

    async fn view(&self, msg_id: &str) -> Result<Option<MessageView>> {
        let s = self.state.lock().await;
        Ok(s.messages.get(msg_id).map(|m| MessageView {
            meta: m.meta.clone(),
            cancelled: m.cancelled,
            pending: m.pending,
            recipients: m
                .meta
                .rcpts
                .iter()
                .enumerate()
                .map(|(i, r)| (r.clone(), m.states.get(&(i as u32)).cloned()))
                .collect(),
        }))
    }

    async fn stats(&self, now_ms: i64) -> Result<QueueStats> {
        let s = self.state.lock().await;
        let oldest = s
            .ready
            .iter()
            .map(|r| r.2)
            .chain(s.inflight.values().map(|v| v.ready_at))
            .min();
        Ok(QueueStats {
            ready: s.ready.len() as u64,
            inflight: s.inflight.len() as u64,
            scheduled: s.sched.len() as u64,
            held: 0,
            messages: s.messages.len() as u64,
            oldest_age_ms: oldest.map(|t| (now_ms - t).max(0) as u64).unwrap_or(0),
        })
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn holds(&self) -> Result<Vec<Hold>> {
        Ok(self.state.lock().await.holds.values().cloned().collect())
    }

    async fn put_hold(&self, hold: &Hold) -> Result<()> {
        self.state.lock().await.holds.insert(hold.key(), hold.clone());
        Ok(())
    }

    async fn remove_hold(&self, key: &str) -> Result<Option<Hold>> {
        Ok(self.state.lock().await.holds.remove(key))
    }
}
