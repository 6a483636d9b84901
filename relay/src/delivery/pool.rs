//! Connection reuse: one pool per route (per route and recipient domain for MX delivery) of idle,
//! authenticated sessions, with a semaphore bounding the sessions in use.
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

pub(crate) struct Pool {
    sem: Arc<Semaphore>,
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
            max_connections,
            messages_per_connection: messages_per_connection.max(1),
            tls_config,
            idle: Mutex::new(Vec::new()),
            last_used: Mutex::new(Instant::now()),
        }
    }

    /// Waits for a connection slot.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        *lock(&self.last_used) = Instant::now();
        Arc::clone(&self.sem).acquire_owned().await.ok()
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
