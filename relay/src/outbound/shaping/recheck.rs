//! Which back-off scopes this process knows to be clear (no back-off record in the store, active
//! or remembered) and since when. Within [`DEFAULT_RECHECK_MS`] of learning it, a route without
//! rate limits sends without asking the store and a success skips clearing what is not there:
//! pacing then costs no Redis round trip per message. A back-off started by another pod is seen
//! here at most that long later. Pure bookkeeping; no I/O, no clock of its own.

use std::collections::HashMap;
use std::sync::Mutex;

/// How long "no back-off here" is trusted without asking the store again.
pub const DEFAULT_RECHECK_MS: i64 = 1_000;
/// Forget stale entries once the map grows past this many scopes.
const PRUNE_ABOVE: usize = 4_096;

#[derive(Debug)]
pub struct ClearScopes {
    recheck_ms: i64,
    /// Back-off key → when it was last known clear.
    clear_since: Mutex<HashMap<String, i64>>,
}

impl ClearScopes {
    /// `recheck_ms` 0 trusts nothing: every decision asks the store.
    pub fn new(recheck_ms: i64) -> Self {
        ClearScopes {
            recheck_ms: recheck_ms.max(0),
            clear_since: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        // The map holds only hints; a poisoned lock still has a usable one.
        self.clear_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` was known clear less than `recheck_ms` before `now_ms`.
    pub fn is_clear(&self, key: &str, now_ms: i64) -> bool {
        self.recheck_ms > 0
            && self
                .map()
                .get(key)
                .is_some_and(|&t| now_ms >= t && now_ms - t < self.recheck_ms)
    }

    /// The store has just confirmed that `key` holds no back-off record.
    pub fn mark_clear(&self, key: &str, now_ms: i64) {
        if self.recheck_ms == 0 {
            return;
        }
        let mut m = self.map();
        if m.len() >= PRUNE_ABOVE {
            let horizon = now_ms - self.recheck_ms;
            m.retain(|_, t| *t > horizon);
        }
        m.insert(key.to_owned(), now_ms);
    }

    /// `key` may hold a back-off record now (a rate-limit reply was seen).
    pub fn forget(&self, key: &str) {
        self.map().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_for_the_recheck_window_only() {
        let c = ClearScopes::new(1_000);
        assert!(!c.is_clear("k", 0), "unknown scopes are not clear");
        c.mark_clear("k", 10_000);
        assert!(c.is_clear("k", 10_000));
        assert!(c.is_clear("k", 10_999));
        assert!(!c.is_clear("k", 11_000), "stale after the window");
        assert!(!c.is_clear("k", 9_999), "a clock step back trusts nothing");
        assert!(!c.is_clear("other", 10_500));
    }

    #[test]
    fn a_rate_limit_forgets_the_scope() {
        let c = ClearScopes::new(1_000);
        c.mark_clear("k", 0);
        c.forget("k");
        assert!(!c.is_clear("k", 1));
    }

    #[test]
    fn zero_window_never_trusts() {
        let c = ClearScopes::new(0);
        c.mark_clear("k", 0);
        assert!(!c.is_clear("k", 0));
    }

    #[test]
    fn stale_entries_are_pruned_when_the_map_grows() {
        let c = ClearScopes::new(1_000);
        for i in 0..PRUNE_ABOVE {
            c.mark_clear(&format!("old{i}"), 0);
        }
        c.mark_clear("new", 5_000);
        assert_eq!(c.map().len(), 1);
        assert!(c.is_clear("new", 5_001));
    }
}
