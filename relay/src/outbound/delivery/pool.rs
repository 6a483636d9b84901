//! Connection reuse: one pool per route (per route and recipient domain for MX delivery) of idle,
//! authenticated sessions, with a semaphore bounding the sessions in use.
//!
//! The semaphore is the route's (destination's) concurrency limit in this process. On the
//! worker's path ([`Pool::acquire_or_come_back`]) a job waits for a slot only while the pool's
//! slots are coming back (one came back within [`STUCK_MS`]) and for at most [`MAX_SLOT_WAIT`];
//! otherwise it is turned away and comes back later, at a time spread by how fast the slots free
//! up ([`turn_away`]). So an upstream that holds its connections (a black hole) holds its limit
//! of the shared workers and no more, while a busy healthy upstream keeps its connections fed
//! without sending every queued job through the schedule.
//!
//! Invariant: a session is only opened by a permit holder who found no idle session, so open
//! sessions (idle + in use) never exceed the permits. Sessions go back to the idle list before the
//! permit is released. (Across relays the gate's leases bound them; an idle session keeps its
//! lease and leaves the list briefly only to renew it.) This module must not speak SMTP beyond
//! handing sessions out and back.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::session::Session;

/// A full pool none of whose slots came back for this long is stuck: jobs are turned away at
/// once instead of waiting for it in a worker. Pure rule: [`worth_waiting`].
pub(crate) const STUCK_MS: i64 = 1_000;
/// The longest a job waits in its worker for a slot of a pool that is not stuck.
pub(crate) const MAX_SLOT_WAIT: Duration = Duration::from_secs(1);

/// Whether a job may wait (at most [`MAX_SLOT_WAIT`]) for a slot of a pool that has been full
/// without a slot coming back for `full_for_ms`. Pure.
pub(crate) fn worth_waiting(full_for_ms: i64) -> bool {
    full_for_ms < STUCK_MS
}

/// A job turned away by a full pool comes back after at least this long ...
pub(crate) const MIN_RETRY_MS: i64 = 1_000;
/// ... and at most this long (a black hole's slots free up only at its timeouts).
pub(crate) const MAX_RETRY_MS: i64 = 5 * 60_000;

/// When a job turned away by a full pool comes back, and the pool's next reservation: jobs are
/// spread `expected_hold_ms / max_connections` apart (the rate at which slots free up) from the
/// last reservation (`horizon_ms`), no sooner than [`MIN_RETRY_MS`] and no later than
/// [`MAX_RETRY_MS`] from now. Pure.
pub(crate) fn turn_away(horizon_ms: i64, now_ms: i64, expected_hold_ms: i64, max_connections: u32) -> (i64, i64) {
    let step = expected_hold_ms.max(0) / i64::from(max_connections.max(1));
    let at = horizon_ms.max(now_ms + MIN_RETRY_MS).min(now_ms + MAX_RETRY_MS);
    (at, at + step)
}

/// How long a slot is expected to stay taken: the running average of past holds, or longer when
/// no slot has come back for longer than that (`full_for_ms`, e.g. every connection hangs). Pure.
pub(crate) fn expected_hold_ms(average_ms: Option<i64>, full_for_ms: i64) -> i64 {
    average_ms.unwrap_or(0).max(full_for_ms)
}

/// The running average after a hold of `sample_ms` (weight 1/8, the first sample as it is). Pure.
pub(crate) fn averaged(average_ms: Option<i64>, sample_ms: i64) -> i64 {
    match average_ms {
        None => sample_ms,
        Some(a) => (a * 7 + sample_ms) / 8,
    }
}

/// What the pool remembers about its slots, to time the jobs it turns away.
#[derive(Default)]
struct Holds {
    average_ms: Option<i64>,
    /// Since when every slot has been taken (the first refusal after the last release).
    full_since: Option<Instant>,
    /// The latest time given to a turned-away job plus one step (ms since the epoch).
    horizon_ms: i64,
}

/// One of the pool's slots, held while an attempt uses (or opens) a session; dropping it gives
/// the slot back and records how long it was held.
pub(crate) struct PoolSlot {
    _permit: OwnedSemaphorePermit,
    holds: Arc<Mutex<Holds>>,
    since: Instant,
}

impl Drop for PoolSlot {
    fn drop(&mut self) {
        let held = i64::try_from(self.since.elapsed().as_millis()).unwrap_or(i64::MAX);
        let mut h = lock(&self.holds);
        h.average_ms = Some(averaged(h.average_ms, held));
        h.full_since = None;
    }
}

pub(crate) struct Pool {
    sem: Arc<Semaphore>,
    holds: Arc<Mutex<Holds>>,
    max_connections: u32,
    pub messages_per_connection: u32,
    pub tls_config: Arc<rustls::ClientConfig>,
    idle: Mutex<Vec<Session>>,
    last_used: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    pub fn new(max_connections: u32, messages_per_connection: u32, tls_config: Arc<rustls::ClientConfig>) -> Self {
        let max_connections = max_connections.max(1);
        Self {
            sem: Arc::new(Semaphore::new(max_connections as usize)),
            holds: Arc::default(),
            max_connections,
            messages_per_connection: messages_per_connection.max(1),
            tls_config,
            idle: Mutex::new(Vec::new()),
            last_used: Mutex::new(Instant::now()),
        }
    }

    /// Waits for a connection slot.
    pub async fn acquire(&self) -> Option<PoolSlot> {
        *lock(&self.last_used) = Instant::now();
        let permit = Arc::clone(&self.sem).acquire_owned().await.ok()?;
        Some(self.slot(permit))
    }

    /// A connection slot if one is free now; otherwise when to come back (ms since the epoch,
    /// see [`turn_away`]).
    #[cfg(test)]
    pub fn try_acquire(&self, now_ms: i64) -> Result<PoolSlot, i64> {
        *lock(&self.last_used) = Instant::now();
        if let Ok(permit) = Arc::clone(&self.sem).try_acquire_owned() {
            return Ok(self.slot(permit));
        }
        Err(self.come_back_at(now_ms))
    }

    /// A connection slot, waiting for one (at most [`MAX_SLOT_WAIT`]) only while the pool is not
    /// stuck ([`worth_waiting`]); otherwise when to come back (ms since the epoch).
    pub async fn acquire_or_come_back(&self) -> Result<PoolSlot, i64> {
        let now = crate::clock::now_ms();
        *lock(&self.last_used) = Instant::now();
        if let Ok(permit) = Arc::clone(&self.sem).try_acquire_owned() {
            return Ok(self.slot(permit));
        }
        if worth_waiting(self.full_for_ms())
            && let Ok(Ok(permit)) = tokio::time::timeout(MAX_SLOT_WAIT, Arc::clone(&self.sem).acquire_owned()).await
        {
            return Ok(self.slot(permit));
        }
        Err(self.come_back_at(crate::clock::now_ms().max(now)))
    }

    /// How long every slot has been taken without one coming back (from the first refusal).
    fn full_for_ms(&self) -> i64 {
        let mut h = lock(&self.holds);
        let full_since = *h.full_since.get_or_insert_with(Instant::now);
        i64::try_from(full_since.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// When a job turned away now comes back; moves the pool's reservations on.
    fn come_back_at(&self, now_ms: i64) -> i64 {
        let full_for = self.full_for_ms();
        let mut h = lock(&self.holds);
        let expected = expected_hold_ms(h.average_ms, full_for);
        let (at, horizon) = turn_away(h.horizon_ms, now_ms, expected, self.max_connections);
        h.horizon_ms = horizon;
        at
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> PoolSlot {
        PoolSlot {
            _permit: permit,
            holds: Arc::clone(&self.holds),
            since: Instant::now(),
        }
    }

    /// The most recently used idle session that has not outlived `idle_timeout`; expired ones
    /// are returned in the second list for the caller to close.
    pub fn take_idle(&self, idle_timeout: Duration) -> (Option<Session>, Vec<Session>) {
        let mut idle = lock(&self.idle);
        let mut expired = Vec::new();
        while let Some(s) = idle.pop() {
            if s.idle_since.elapsed() < idle_timeout {
                return (Some(s), expired);
            }
            expired.push(s);
        }
        (None, expired)
    }

    /// Returns a healthy session after a transaction; `Some` gives it back when it has carried
    /// its share of messages and must be closed instead.
    pub fn put_idle(&self, mut s: Session) -> Option<Session> {
        if s.messages >= self.messages_per_connection {
            return Some(s);
        }
        s.idle_since = Instant::now();
        lock(&self.idle).push(s);
        None
    }

    /// Removes idle sessions older than `idle_timeout`.
    pub fn reap(&self, idle_timeout: Duration) -> Vec<Session> {
        let mut idle = lock(&self.idle);
        let (keep, expired): (Vec<Session>, Vec<Session>) =
            idle.drain(..).partition(|s| s.idle_since.elapsed() < idle_timeout);
        *idle = keep;
        expired
    }

    /// Removes the idle sessions whose lease is due for renewal at `now_ms` (see
    /// [`Pool::put_back`]).
    pub fn take_due(&self, now_ms: i64) -> Vec<Session> {
        let mut idle = lock(&self.idle);
        let (due, keep): (Vec<Session>, Vec<Session>) = idle
            .drain(..)
            .partition(|s| s.lease.as_ref().is_some_and(|l| l.is_due(now_ms)));
        *idle = keep;
        due
    }

    /// Returns a session taken by [`Pool::take_due`], still idle since it was checked in.
    pub fn put_back(&self, s: Session) {
        lock(&self.idle).push(s);
    }

    /// Removes the longest idle session that holds a lease (to free its slot for another pool).
    pub fn take_leased(&self) -> Option<Session> {
        let mut idle = lock(&self.idle);
        let i = idle.iter().position(|s| s.lease.is_some())?;
        Some(idle.remove(i))
    }

    /// Removes every idle session (shutdown).
    pub fn drain(&self) -> Vec<Session> {
        lock(&self.idle).drain(..).collect()
    }

    pub fn idle_count(&self) -> usize {
        lock(&self.idle).len()
    }

    pub fn in_use(&self) -> usize {
        (self.max_connections as usize).saturating_sub(self.sem.available_permits())
    }

    /// Nothing idle, nothing in use and untouched for `quiet`: the pool can be forgotten.
    pub fn is_unused_for(&self, quiet: Duration) -> bool {
        self.idle_count() == 0 && self.in_use() == 0 && lock(&self.last_used).elapsed() >= quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turned_away_jobs_come_back_spread_at_the_rate_slots_free_up() {
        // 10 slots, each held 2 s on average: one frees every 200 ms.
        let now = 1_000_000;
        let (a, h) = turn_away(0, now, 2_000, 10);
        assert_eq!((a, h), (now + MIN_RETRY_MS, now + MIN_RETRY_MS + 200));
        let (b, h) = turn_away(h, now, 2_000, 10);
        assert_eq!(b, a + 200);
        let (c, _) = turn_away(h, now + 50, 2_000, 10);
        assert_eq!(c, a + 400);
        // A horizon in the past starts again from the minimum wait.
        assert_eq!(turn_away(now - 5_000, now, 2_000, 10).0, now + MIN_RETRY_MS);
        // Never later than the maximum, however far the reservations reach.
        assert_eq!(turn_away(now + 10 * MAX_RETRY_MS, now, 2_000, 10).0, now + MAX_RETRY_MS);
        // Nothing known yet, or a zero limit: no spread, no division by zero.
        assert_eq!(turn_away(0, now, 0, 0), (now + MIN_RETRY_MS, now + MIN_RETRY_MS));
    }

    #[test]
    fn a_pool_full_for_longer_than_usual_expects_longer_holds() {
        assert_eq!(expected_hold_ms(None, 0), 0);
        assert_eq!(expected_hold_ms(Some(150), 20), 150);
        // Every connection hangs: the wait grows with the time nothing came back.
        assert_eq!(expected_hold_ms(Some(150), 60_000), 60_000);
        assert_eq!(averaged(None, 80), 80);
        assert_eq!(averaged(Some(80), 160), 90);
        // Waiting in a worker is only worth it while slots keep coming back.
        assert!(worth_waiting(0) && worth_waiting(STUCK_MS - 1));
        assert!(!worth_waiting(STUCK_MS) && !worth_waiting(60_000));
    }

    #[tokio::test]
    async fn a_full_pool_turns_jobs_away_and_a_returned_slot_is_free_again() {
        let tls = mailroute_tls::non_verifying().expect("tls config");
        let pool = Pool::new(2, 10, tls);
        let now = 1_000_000;
        let first = pool.try_acquire(now).expect("slot 1");
        let _second = pool.try_acquire(now).expect("slot 2");
        assert_eq!(pool.in_use(), 2);
        let a = pool.try_acquire(now).err().expect("full");
        let b = pool.try_acquire(now).err().expect("full");
        assert!(a >= now + MIN_RETRY_MS && b >= a && b <= now + MAX_RETRY_MS, "{a} {b}");
        drop(first);
        assert_eq!(pool.in_use(), 1);
        assert!(pool.try_acquire(now).is_ok(), "a returned slot is taken at once");
    }

    #[tokio::test]
    async fn a_job_waits_briefly_for_a_busy_pool_but_not_for_a_stuck_one() {
        let tls = mailroute_tls::non_verifying().expect("tls config");
        let pool = Arc::new(Pool::new(1, 10, tls));
        let held = pool.acquire_or_come_back().await.expect("free slot");
        // Busy: the slot comes back while the job waits, and it gets it.
        let waiter = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.acquire_or_come_back().await.is_ok() }
        });
        // Until the waiter found the pool full (single-threaded runtime: it waits from then on).
        while lock(&pool.holds).full_since.is_none() {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert!(
            waiter.await.expect("waiter"),
            "the slot that came back went to the waiting job"
        );
        // Stuck: nothing came back for longer than STUCK_MS, so the job is turned away at once.
        let _held = pool.acquire_or_come_back().await.expect("free slot");
        lock(&pool.holds).full_since = Some(Instant::now() - Duration::from_millis(STUCK_MS as u64 + 10));
        let started = Instant::now();
        let at = pool.acquire_or_come_back().await.err().expect("turned away");
        assert!(started.elapsed() < MAX_SLOT_WAIT, "waited for a stuck pool");
        assert!(at >= crate::clock::now_ms(), "{at}");
    }
}
