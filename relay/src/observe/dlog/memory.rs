//! In-memory delivery log store for local runs and tests: a bounded,
//! id-ordered deque. It must not be used where events have to survive a
//! restart or be shared between relays (that is the Redis store).

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{DlogError, EventStore, RecordId, Start, next_record_id};

/// A bounded store; when full, the oldest record is dropped.
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

struct Inner {
    records: VecDeque<(RecordId, String)>,
    last: Option<RecordId>,
    capacity: usize,
}

impl MemoryStore {
    /// A store keeping at most `capacity` records (at least 1).
    pub fn new(capacity: usize) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner {
                records: VecDeque::new(),
                last: None,
                capacity: capacity.max(1),
            }),
        }
    }

    /// Number of records held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().records.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the deque consistent, so a poisoned
        // lock (a panic elsewhere) is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append(&self, time_ms: u64, json: String) -> Result<RecordId, DlogError> {
        let mut g = self.lock();
        let id = next_record_id(g.last, time_ms);
        g.last = Some(id);
        if g.records.len() >= g.capacity {
            g.records.pop_front();
        }
        g.records.push_back((id, json));
        Ok(id)
    }

    async fn range(
        &self,
        start: Start,
        end_ms: Option<u64>,
        count: usize,
    ) -> Result<Vec<(RecordId, String)>, DlogError> {
        let g = self.lock();
        let first = match start {
            Start::At(id) => g.records.partition_point(|(r, _)| *r < id),
            Start::After(id) => g.records.partition_point(|(r, _)| *r <= id),
        };
        Ok(g.records
            .range(first..)
            .take_while(|(r, _)| end_ms.is_none_or(|end| r.ms < end))
            .take(count)
            .cloned()
            .collect())
    }

    async fn trim_before(&self, min_ms: u64) -> Result<u64, DlogError> {
        let mut g = self.lock();
        let n = g.records.partition_point(|(r, _)| r.ms < min_ms);
        g.records.drain(..n);
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_capacity_and_id_order() {
        let s = MemoryStore::new(3);
        for (ms, body) in [(10, "a"), (5, "b"), (20, "c"), (30, "d")] {
            s.append(ms, body.into()).await.unwrap();
        }
        let all = s.range(Start::At(RecordId::new(0, 0)), None, 10).await.unwrap();
        let ids: Vec<String> = all.iter().map(|(id, _)| id.to_string()).collect();
        // "a" was dropped for capacity; "b" (late) was filed at 10.
        assert_eq!(ids, ["10-1", "20-0", "30-0"]);
        assert_eq!(all[0].1, "b");
    }

    #[tokio::test]
    async fn range_bounds_and_trim() {
        let s = MemoryStore::new(10);
        for ms in [1, 2, 2, 3, 4] {
            s.append(ms, ms.to_string()).await.unwrap();
        }
        let after = s.range(Start::After(RecordId::new(2, 0)), Some(4), 10).await.unwrap();
        let ids: Vec<RecordId> = after.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [RecordId::new(2, 1), RecordId::new(3, 0)]);
        let two = s.range(Start::At(RecordId::new(2, 0)), None, 2).await.unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(s.trim_before(3).await.unwrap(), 3);
        assert_eq!(s.len(), 2);
        assert_eq!(s.trim_before(3).await.unwrap(), 0);
    }
}
