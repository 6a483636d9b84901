//! Connection slots shared with other relay processes. Before the deliverer opens a new
//! connection it asks a [`ConnectionGate`]; a granted [`Lease`] then stays with the session for
//! as long as the connection is open (idle in the pool included), is renewed before it runs out
//! ([`keep_alive`] while the session works, the pool's reaper while it is idle) and is released
//! once the connection is closed: explicitly on every orderly close, from `Drop` otherwise.
//!
//! This module owns the lease's lifecycle rules only. Which limits apply and where slots are
//! counted belong to the gate's implementation (`outbound::pacing`); this module must not open or
//! close connections.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::now_ms;

/// The answer of a [`ConnectionGate`].
pub enum Admission {
    /// Open the connection; the lease (`None`: no limit applies) goes with it.
    Open(Option<Lease>),
    /// Every slot is taken (by this or another relay): open nothing before `at_ms` (ms since
    /// the epoch).
    Wait { at_ms: i64 },
}

/// Decides whether a new connection may be opened. Reusing a pooled connection never asks.
#[async_trait]
pub trait ConnectionGate: Send + Sync {
    async fn admit(&self) -> Admission;
}

/// No limit across processes: every connection may open.
pub struct Ungated;

#[async_trait]
impl ConnectionGate for Ungated {
    async fn admit(&self) -> Admission {
        Admission::Open(None)
    }
}

/// One held slot as the gate's implementation keeps it; it logs its own errors.
#[async_trait]
pub trait Slot: Send + Sync {
    /// When (ms since the epoch) the slot needs renewing.
    fn renew_at_ms(&self) -> i64;
    /// Extends the slot; must move [`Slot::renew_at_ms`] past `now_ms`, also after a failure.
    async fn renew(&mut self, now_ms: i64);
    /// Gives the slot back.
    async fn release(self: Box<Self>);
}

/// A held connection slot. Release it after the connection is closed; one that is dropped
/// instead is released in the background.
pub struct Lease {
    slot: Option<Box<dyn Slot>>,
}

impl Lease {
    pub fn new(slot: Box<dyn Slot>) -> Self {
        Lease { slot: Some(slot) }
    }

    /// When the lease needs renewing (ms since the epoch).
    pub fn renew_at_ms(&self) -> i64 {
        self.slot.as_ref().map_or(i64::MAX, |s| s.renew_at_ms())
    }

    pub fn is_due(&self, now_ms: i64) -> bool {
        now_ms >= self.renew_at_ms()
    }

    /// Renews the lease if it is due; `true` if it was.
    pub async fn renew_if_due(&mut self, now_ms: i64) -> bool {
        match self.slot.as_mut() {
            Some(s) if now_ms >= s.renew_at_ms() => {
                s.renew(now_ms).await;
                true
            }
            _ => false,
        }
    }

    /// Gives the slot back (call once the connection is closed).
    pub async fn release(mut self) {
        if let Some(s) = self.slot.take() {
            s.release().await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A session dropped without an orderly close; without a runtime the lease expires.
        if let Some(s) = self.slot.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(s.release());
        }
    }
}

/// How long to wait from `now_ms` until `at_ms` (zero when it has passed).
pub fn until(at_ms: i64, now_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(0))
}

/// Runs `work`, renewing `lease` whenever it falls due meanwhile (a transaction may outlast
/// half a lease: the data timeout alone is as long as the default lease).
pub async fn keep_alive<F: Future>(lease: &mut Option<Lease>, work: F) -> F::Output {
    let Some(lease) = lease.as_mut() else {
        return work.await;
    };
    let mut work = std::pin::pin!(work);
    loop {
        let wait = until(lease.renew_at_ms(), now_ms());
        tokio::select! {
            out = &mut work => return out,
            _ = tokio::time::sleep(wait) => {
                lease.renew_if_due(now_ms()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::watch;

    use super::*;

    /// Renews every 10 ms; counts renewals and releases.
    struct Counting {
        renew_at: i64,
        renewals: watch::Sender<usize>,
        released: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Slot for Counting {
        fn renew_at_ms(&self) -> i64 {
            self.renew_at
        }
        async fn renew(&mut self, now_ms: i64) {
            self.renew_at = now_ms + 10;
            self.renewals.send_modify(|n| *n += 1);
        }
        async fn release(self: Box<Self>) {
            self.released.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting(renew_at: i64) -> (Lease, watch::Receiver<usize>, Arc<AtomicUsize>) {
        let (tx, rx) = watch::channel(0);
        let released = Arc::new(AtomicUsize::new(0));
        let slot = Counting {
            renew_at,
            renewals: tx,
            released: released.clone(),
        };
        (Lease::new(Box::new(slot)), rx, released)
    }

    #[test]
    fn until_never_goes_negative() {
        assert_eq!(until(1_500, 1_000), Duration::from_millis(500));
        assert_eq!(until(1_000, 1_500), Duration::ZERO);
        assert_eq!(until(i64::MIN, i64::MAX), Duration::ZERO);
    }

    #[tokio::test]
    async fn due_only_after_the_renewal_instant() {
        let (mut lease, renewals, released) = counting(1_000);
        assert!(!lease.is_due(999));
        assert!(!lease.renew_if_due(999).await);
        assert!(lease.is_due(1_000));
        assert!(lease.renew_if_due(1_000).await);
        assert_eq!(*renewals.borrow(), 1);
        assert_eq!(lease.renew_at_ms(), 1_010);
        lease.release().await;
        assert_eq!(released.load(Ordering::SeqCst), 1, "released once, not again on drop");
    }

    #[tokio::test]
    async fn keep_alive_renews_while_the_work_runs() {
        let (lease, mut renewals, released) = counting(now_ms());
        let mut lease = Some(lease);
        // The work finishes only after the lease was renewed three times: without renewals
        // it would never end (bounded by the timeout).
        let work = async { renewals.wait_for(|n| *n >= 3).await.map(|n| *n).unwrap_or(0) };
        let n = tokio::time::timeout(Duration::from_secs(10), keep_alive(&mut lease, work))
            .await
            .expect("renewed while working");
        assert!(n >= 3);
        assert!(lease.is_some(), "the lease stays with the caller");
        drop(lease);
        // A dropped lease is released in the background.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while released.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "not released on drop");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn ungated_opens_without_a_lease() {
        assert!(matches!(Ungated.admit().await, Admission::Open(None)));
        let mut none = None;
        assert_eq!(keep_alive(&mut none, async { 7 }).await, 7);
    }
}
