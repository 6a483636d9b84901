//! A string-keyed map whose entries expire like Redis keys, for the in-process stand-ins of the
//! Redis stores (quota counters, pacing state). Time is passed in by the caller; no clock, no I/O.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Above this many entries, expired ones are swept out before the next change.
const SWEEP_ABOVE: usize = 4096;

/// A value and the instant (Unix ms) it expires at.
#[derive(Debug)]
pub struct Expiring<V> {
    pub value: V,
    pub expire_at_ms: i64,
}

#[derive(Debug)]
pub struct ExpiringMap<V> {
    entries: HashMap<String, Expiring<V>>,
}

impl<V> Default for ExpiringMap<V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }
}

impl<V> ExpiringMap<V> {
    /// The value under `key` unless it expired (an expired entry is dropped, as Redis would).
    pub fn live(&mut self, key: &str, now_ms: i64) -> Option<&mut V> {
        if self.entries.get(key).is_some_and(|e| e.expire_at_ms <= now_ms) {
            self.entries.remove(key);
        }
        self.entries.get_mut(key).map(|e| &mut e.value)
    }

    /// The value under `key`, expired or not (for undoing a change just made).
    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.entries.get_mut(key).map(|e| &mut e.value)
    }

    pub fn put(&mut self, key: &str, value: V, expire_at_ms: i64) {
        self.entries.insert(key.to_owned(), Expiring { value, expire_at_ms });
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        self.entries.remove(key).is_some()
    }

    /// The entry under `key`, holding a fresh `make()` if it is missing or `is_kind` says it
    /// holds another kind of value. A new entry has expired already; set `expire_at_ms`.
    pub fn entry(&mut self, key: &str, is_kind: impl Fn(&V) -> bool, make: impl Fn() -> V) -> &mut Expiring<V> {
        let e = self.entries.entry(key.to_owned()).or_insert_with(|| Expiring {
            value: make(),
            expire_at_ms: 0,
        });
        if !is_kind(&e.value) {
            e.value = make();
        }
        e
    }

    /// Entries held, expired ones not swept yet included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drops expired entries once the map has grown large, so keys nobody reads again go.
    pub fn sweep(&mut self, now_ms: i64) {
        if self.entries.len() > SWEEP_ABOVE {
            self.entries.retain(|_, e| e.expire_at_ms > now_ms);
        }
    }
}

/// An [`ExpiringMap`] shared by the tasks of one process.
#[derive(Debug)]
pub struct SharedExpiringMap<V>(Mutex<ExpiringMap<V>>);

impl<V> Default for SharedExpiringMap<V> {
    fn default() -> Self {
        Self(Mutex::new(ExpiringMap::default()))
    }
}

impl<V> SharedExpiringMap<V> {
    pub fn lock(&self) -> MutexGuard<'_, ExpiringMap<V>> {
        // A panic while holding the lock leaves plain values behind; keep using them.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_like_redis_keys() {
        let mut m = ExpiringMap::default();
        m.put("a", 1, 100);
        assert_eq!(m.live("a", 99).copied(), Some(1));
        assert_eq!(m.live("a", 100), None, "gone at its expiry instant");
        assert_eq!(m.get_mut("a"), None, "and removed");

        // `entry` replaces a value of another kind and keeps one of the same kind.
        m.put("b", -5, 1_000);
        let e = m.entry("b", |v| *v >= 0, || 0);
        assert_eq!((e.value, e.expire_at_ms), (0, 1_000));
        e.value = 7;
        assert_eq!(m.entry("b", |v| *v >= 0, || 0).value, 7);
        assert_eq!(m.entry("new", |_| true, || 3).expire_at_ms, 0);
        assert!(m.remove("b") && !m.remove("b"));
    }

    #[test]
    fn sweep_drops_expired_entries_only_when_large() {
        let mut m = ExpiringMap::default();
        for i in 0..=SWEEP_ABOVE {
            m.put(&i.to_string(), (), if i == 0 { 10 } else { 5 });
        }
        m.put("kept", (), 1_000);
        m.sweep(20);
        assert_eq!(m.entries.len(), 1);
        m.put("old", (), 10);
        m.sweep(20);
        assert_eq!(m.entries.len(), 2, "small maps are left alone");
    }
}
