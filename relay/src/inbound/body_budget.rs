//! The memory budget of message bodies: every SMTP session holding a body in memory reserves
//! its buffer's capacity from one process-wide budget before allocating it, at DATA (the
//! declared `SIZE`, or a first chunk) and then as bytes arrive. A message that does not fit is
//! discarded as it arrives and refused with `452 4.3.1`, so bodies in memory never exceed the
//! budget however many clients send at once. Handing bodies to the queue is bounded as well:
//! the Redis client copies a body about three times while sending it, so bytes being enqueued
//! at once are limited to one maximum-size message (small messages still go side by side).
//!
//! It owns the accounting and the body buffer's growth; the session decodes DATA into
//! [`Body::sink`] and decides the replies. It must not look at the content.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::observe::metrics::Metrics;

/// First buffer of a body whose size was not declared.
const FIRST_CHUNK: usize = 64 * 1024;

/// Room kept for the headers the relay adds in place (`Received:`, `Message-ID:`).
pub const HEADROOM: usize = 2048;

/// The reply to a message refused for want of memory.
pub fn reply() -> mailroute_smtp::Reply {
    mailroute_smtp::Reply::with_code(
        452,
        mailroute_smtp::EnhancedStatusCode::new(4, 3, 1),
        "Insufficient system storage, try again later",
    )
}

pub struct BodyBudget {
    limit: usize,
    usage: Mutex<Usage>,
    metrics: Arc<Metrics>,
    /// Bytes being handed to the queue, one permit per byte.
    enqueueing: Semaphore,
    enqueue_window: usize,
}

#[derive(Default)]
struct Usage {
    used: usize,
    peak: usize,
}

impl BodyBudget {
    /// `limit` bytes of bodies held at once; `max_size` (the message size limit) bytes being
    /// enqueued at once.
    pub fn new(limit: usize, max_size: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.smtp_body_budget_bytes.set(limit.min(i64::MAX as usize) as i64);
        let enqueue_window = max_size.saturating_add(HEADROOM).min(u32::MAX as usize);
        Arc::new(BodyBudget {
            limit,
            usage: Mutex::new(Usage::default()),
            metrics,
            enqueueing: Semaphore::new(enqueue_window),
            enqueue_window,
        })
    }

    /// Waits until a body of `bytes` may be handed to the queue; hold the permit until the
    /// queue answered.
    pub async fn enqueue_permit(&self, bytes: usize) -> Option<SemaphorePermit<'_>> {
        let n = bytes.clamp(1, self.enqueue_window) as u32;
        self.enqueueing.acquire_many(n).await.ok()
    }

    /// A body buffer for one DATA with its first bytes reserved: `declared` (the MAIL `SIZE`,
    /// 0 if none) up to one byte over `max_size`. `None` (counted as a refusal) when the budget
    /// cannot spare them.
    pub fn begin(self: &Arc<Self>, declared: usize, max_size: usize) -> Option<Body> {
        let limit = max_size.saturating_add(1);
        let first = if declared > 0 {
            declared.min(limit)
        } else {
            FIRST_CHUNK.min(limit)
        } + HEADROOM;
        let mut reservation = Reservation {
            budget: self.clone(),
            bytes: 0,
        };
        if !reservation.grow_to(first) {
            self.metrics.smtp_body_budget_refused.inc();
            return None;
        }
        Some(Body {
            buf: Vec::with_capacity(first),
            reservation,
            limit,
            state: State::Storing,
        })
    }

    fn take(&self, n: usize) -> bool {
        let mut u = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        if u.used.saturating_add(n) > self.limit {
            return false;
        }
        u.used += n;
        u.peak = u.peak.max(u.used);
        self.metrics.smtp_body_bytes_reserved.set(u.used as i64);
        self.metrics.smtp_body_bytes_reserved_max.set(u.peak as i64);
        true
    }

    fn give(&self, n: usize) {
        let mut u = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        u.used = u.used.saturating_sub(n);
        self.metrics.smtp_body_bytes_reserved.set(u.used as i64);
    }
}

/// Bytes taken from the budget, given back when dropped.
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Reservation {
    fn grow_to(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        if !self.budget.take(bytes - self.bytes) {
            return false;
        }
        self.bytes = bytes;
        true
    }

    fn release(&mut self) {
        self.budget.give(std::mem::take(&mut self.bytes));
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("bytes", &self.bytes).finish()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Storing,
    /// Longer than the size limit: the rest is read and discarded.
    TooBig,
    /// The budget could not cover the next bytes: the rest is read and discarded.
    OverBudget,
}

/// Why a body was not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    TooBig,
    OverBudget,
}

/// The body of one DATA while it arrives.
pub struct Body {
    buf: Vec<u8>,
    reservation: Reservation,
    /// One byte over the size limit: enough to know a message is too big.
    limit: usize,
    state: State,
}

impl Body {
    /// How many of the `available` input bytes to decode next, with room made for their
    /// output within the budget (decoded data is never longer than its input). Grows the
    /// buffer by half at a time, up to the size limit.
    pub fn room(&mut self, available: usize) -> usize {
        if self.state != State::Storing {
            return available;
        }
        let want = available.min(self.limit.saturating_sub(self.buf.len()));
        if self.buf.capacity() - self.buf.len() >= want {
            return want;
        }
        let cap = self.buf.capacity();
        let target = (self.buf.len() + want).max(cap + cap / 2).min(self.limit) + HEADROOM;
        if !self.reservation.grow_to(target) {
            self.discard(State::OverBudget);
            self.reservation.budget.metrics.smtp_body_budget_refused.inc();
            return available;
        }
        self.buf.reserve_exact(target - self.buf.len());
        if !self.reservation.grow_to(self.buf.capacity()) {
            self.discard(State::OverBudget);
            self.reservation.budget.metrics.smtp_body_budget_refused.inc();
            return available;
        }
        want
    }

    /// Where the decoder writes the bytes [`Body::room`] allowed (a scratch buffer, emptied
    /// every time, once the body is being discarded).
    pub fn sink(&mut self) -> &mut Vec<u8> {
        if self.state != State::Storing {
            self.buf.clear();
        }
        &mut self.buf
    }

    /// After each decoding step: a body over the size limit is dropped at once.
    pub fn check(&mut self) {
        if self.state == State::Storing && self.buf.len() >= self.limit {
            self.discard(State::TooBig);
        }
    }

    fn discard(&mut self, state: State) {
        self.state = state;
        self.buf = Vec::new();
        self.reservation.release();
    }

    /// The whole body and its reservation (hold it until the body is freed), or why not.
    pub fn finish(self) -> Result<(Vec<u8>, Reservation), Refused> {
        match self.state {
            State::Storing => Ok((self.buf, self.reservation)),
            State::TooBig => Err(Refused::TooBig),
            State::OverBudget => Err(Refused::OverBudget),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(b: &mut Body, mut data: &[u8]) {
        while !data.is_empty() {
            let n = b.room(data.len());
            b.sink().extend_from_slice(&data[..n]);
            b.check();
            data = &data[n..];
        }
    }

    #[test]
    fn reservations_follow_capacity_and_come_back() {
        let m = Arc::new(Metrics::new());
        let budget = BodyBudget::new(1 << 20, 500_000, m.clone());
        let mut b = budget.begin(0, 500_000).unwrap();
        feed(&mut b, &vec![b'x'; 300_000]);
        let reserved = m.smtp_body_bytes_reserved.get() as usize;
        assert!((300_000..=500_001 + HEADROOM).contains(&reserved), "{reserved}");
        let (body, held) = b.finish().unwrap();
        assert_eq!(body.len(), 300_000);
        assert!(body.capacity() <= reserved);
        drop(body);
        drop(held);
        assert_eq!(m.smtp_body_bytes_reserved.get(), 0);
        assert!(m.smtp_body_bytes_reserved_max.get() as usize >= reserved);
    }

    #[test]
    fn a_declared_size_is_reserved_at_once() {
        let m = Arc::new(Metrics::new());
        let budget = BodyBudget::new(1 << 20, 500_000, m.clone());
        let b = budget.begin(400_000, 500_000).unwrap();
        assert_eq!(m.smtp_body_bytes_reserved.get() as usize, 400_000 + HEADROOM);
        assert!(
            budget.begin(700_000, 800_000).is_none(),
            "does not fit beside the first"
        );
        assert_eq!(m.smtp_body_budget_refused.get(), 1);
        drop(b);
        assert!(budget.begin(700_000, 800_000).is_some());
    }

    #[test]
    fn over_the_budget_the_body_is_dropped_and_its_bytes_given_back() {
        let m = Arc::new(Metrics::new());
        let budget = BodyBudget::new(250_000, 1_000_000, m.clone());
        let mut a = budget.begin(0, 1_000_000).unwrap();
        feed(&mut a, &vec![b'x'; 150_000]);
        let mut b = budget.begin(0, 1_000_000).unwrap();
        feed(&mut b, &vec![b'y'; 150_000]);
        assert!(m.smtp_body_bytes_reserved.get() as usize <= 250_000);
        assert_eq!(b.finish().unwrap_err(), Refused::OverBudget);
        assert_eq!(a.finish().unwrap().0.len(), 150_000);
        assert!(m.smtp_body_bytes_reserved_max.get() as usize <= 250_000);
        assert_eq!(m.smtp_body_bytes_reserved.get(), 0);
    }

    #[test]
    fn too_big_bodies_are_dropped_as_they_arrive() {
        let m = Arc::new(Metrics::new());
        let budget = BodyBudget::new(10_000_000, 100_000, m.clone());
        let mut b = budget.begin(0, 100_000).unwrap();
        feed(&mut b, &vec![b'x'; 1_000_000]);
        assert_eq!(m.smtp_body_bytes_reserved.get(), 0);
        assert!(m.smtp_body_bytes_reserved_max.get() as usize <= 100_001 + HEADROOM);
        assert_eq!(b.finish().unwrap_err(), Refused::TooBig);
        // Exactly the limit is not too big.
        let mut b = budget.begin(0, 100_000).unwrap();
        feed(&mut b, &vec![b'x'; 100_000]);
        assert_eq!(b.finish().unwrap().0.len(), 100_000);
    }

    #[tokio::test]
    async fn bytes_being_enqueued_stay_within_one_maximum_size_message() {
        let budget = BodyBudget::new(10_000_000, 100_000, Arc::new(Metrics::new()));
        let big = budget.enqueue_permit(100_000).await.unwrap();
        let small = budget.enqueue_permit(5_000);
        tokio::pin!(small);
        assert!(
            futures::poll!(small.as_mut()).is_pending(),
            "waits while a full-size body is being enqueued"
        );
        drop(big);
        let small = small.await.unwrap();
        // Small ones go side by side.
        let other = budget.enqueue_permit(5_000).await.unwrap();
        drop((small, other));
        // A body a little over the window (the added headers) still gets through, alone.
        drop(budget.enqueue_permit(10_000_000).await.unwrap());
    }
}
