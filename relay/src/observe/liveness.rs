//! Liveness: heartbeats of the loops that must keep turning (the runtime itself, the delivery
//! loop, the config reloader), read by `/healthz` so that a wedged process is restarted instead
//! of answering a static "ok".
//!
//! This module owns the heartbeats and the pure judgement of which have gone silent for longer
//! than they may. It must not decide what a loop does: a loop beats at each turn, and while it
//! waits (for a job, a connection slot, an upstream) it wraps the wait in [`beating`], which
//! keeps beating only as long as the wait is still within its own deadline. A wait past its
//! deadline is the wedge this module exists to report.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How often [`beating`] and the runtime ticker beat.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// Silence after which a loop counts as wedged, unless registered with another bound.
pub const DEFAULT_MAX_SILENCE: Duration = Duration::from_secs(60);
/// Grace past a wait's own deadline before [`beating`] stops beating for it.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(30);

struct Beat {
    name: String,
    /// Milliseconds since the registry's base instant.
    last_ms: AtomicI64,
    max_silence: Duration,
}

/// The registry of heartbeats; cheap to clone.
#[derive(Clone)]
pub struct Liveness {
    base: Instant,
    beats: Arc<Mutex<Vec<Arc<Beat>>>>,
}

/// One loop's heartbeat.
#[derive(Clone)]
pub struct Heartbeat {
    base: Instant,
    beat: Arc<Beat>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            base: Instant::now(),
            beats: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl Liveness {
    /// Registers a loop, counted as having just beaten; it is wedged once silent for longer
    /// than `max_silence`.
    pub fn heartbeat(&self, name: impl Into<String>, max_silence: Duration) -> Heartbeat {
        let beat = Arc::new(Beat {
            name: name.into(),
            last_ms: AtomicI64::new(millis_since(self.base, Instant::now())),
            max_silence,
        });
        self.beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(beat.clone());
        Heartbeat { base: self.base, beat }
    }

    /// `Ok` while every loop beats; otherwise which loops stopped and for how long.
    pub fn check(&self) -> Result<(), String> {
        let now = millis_since(self.base, Instant::now());
        let beats = self.beats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen: Vec<Seen<'_>> = beats
            .iter()
            .map(|b| Seen {
                name: &b.name,
                silent_ms: now - b.last_ms.load(Ordering::Acquire),
                max_silence: b.max_silence,
            })
            .collect();
        judge(&seen)
    }
}

impl Heartbeat {
    /// The loop is turning.
    pub fn beat(&self) {
        self.beat
            .last_ms
            .store(millis_since(self.base, Instant::now()), Ordering::Release);
    }
}

fn millis_since(base: Instant, t: Instant) -> i64 {
    i64::try_from(t.saturating_duration_since(base).as_millis()).unwrap_or(i64::MAX)
}

/// What `/healthz` sees of one heartbeat.
struct Seen<'a> {
    name: &'a str,
    silent_ms: i64,
    max_silence: Duration,
}

/// Pure: every heartbeat silent for longer than it may, named, or `Ok`.
fn judge(seen: &[Seen<'_>]) -> Result<(), String> {
    let stalled: Vec<String> = seen
        .iter()
        .filter(|s| s.silent_ms > i64::try_from(s.max_silence.as_millis()).unwrap_or(i64::MAX))
        .map(|s| format!("{} has not advanced for {} s", s.name, s.silent_ms / 1000))
        .collect();
    if stalled.is_empty() {
        Ok(())
    } else {
        Err(format!("wedged: {}", stalled.join("; ")))
    }
}

/// Runs `fut`, beating `hb` every [`BEAT_EVERY`] while it runs, as long as `until` (the wait's
/// own deadline; `None` for a wait that may legitimately last, such as for the next job) plus
/// [`DEADLINE_GRACE`] has not passed. A future that outlives its deadline leaves the heartbeat
/// silent, and `/healthz` reports the loop as wedged.
pub async fn beating<F: Future>(hb: &Heartbeat, until: Option<Instant>, fut: F) -> F::Output {
    beating_while(hb, || within_deadline(Instant::now(), until), fut).await
}

/// Runs `fut`, beating `hb` every [`BEAT_EVERY`] while it runs and `alive()` holds: for a wait
/// whose legitimacy depends on others (a free slot, while the jobs holding the slots move).
pub async fn beating_while<F: Future>(hb: &Heartbeat, alive: impl Fn() -> bool, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut tick = tokio::time::interval(BEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = &mut fut => {
                hb.beat();
                return out;
            }
            _ = tick.tick() => {
                if alive() {
                    hb.beat();
                }
            }
        }
    }
}

/// Beats `hb` every [`BEAT_EVERY`] while `alive()` holds, until `shutdown` completes: a
/// watchdog for work that has no loop of its own to beat (the delivery jobs in flight).
pub async fn watch(hb: Heartbeat, alive: impl Fn() -> bool, shutdown: impl Future<Output = ()>) {
    beating_while(&hb, alive, shutdown).await
}

/// Pure: whether a wait with deadline `until` may still count as alive at `now`.
fn within_deadline(now: Instant, until: Option<Instant>) -> bool {
    until.is_none_or(|d| now < d + DEADLINE_GRACE)
}

/// Beats `hb` every [`BEAT_EVERY`] until `shutdown` completes: the heartbeat of the runtime
/// itself, silent only when no task gets to run.
pub async fn runtime_ticker(hb: Heartbeat, shutdown: impl Future<Output = ()>) {
    let ticker = async {
        let mut tick = tokio::time::interval(BEAT_EVERY);
        loop {
            tick.tick().await;
            hb.beat();
        }
    };
    tokio::select! {
        () = ticker => {}
        () = shutdown => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(name: &str, silent_ms: i64, max_s: u64) -> Seen<'_> {
        Seen {
            name,
            silent_ms,
            max_silence: Duration::from_secs(max_s),
        }
    }

    #[test]
    fn judge_names_each_silent_loop() {
        assert_eq!(judge(&[]), Ok(()));
        assert_eq!(judge(&[seen("delivery loop", 60_000, 60)]), Ok(()));
        assert_eq!(
            judge(&[
                seen("runtime", 500, 30),
                seen("delivery loop", 93_400, 60),
                seen("config reloader", 61_000, 60)
            ]),
            Err("wedged: delivery loop has not advanced for 93 s; config reloader has not advanced for 61 s".into())
        );
    }

    #[test]
    fn a_wait_counts_as_alive_until_its_deadline_plus_grace() {
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(120);
        assert!(
            within_deadline(t0 + Duration::from_secs(3600), None),
            "no deadline: alive"
        );
        assert!(within_deadline(t0, Some(until)));
        assert!(within_deadline(
            until + DEADLINE_GRACE - Duration::from_millis(1),
            Some(until)
        ));
        assert!(!within_deadline(until + DEADLINE_GRACE, Some(until)));
    }

    #[tokio::test]
    async fn check_reports_a_silent_heartbeat_and_a_beat_revives_it() {
        let l = Liveness::default();
        let alive = l.heartbeat("the runtime", Duration::from_secs(3600));
        let _strict = l.heartbeat("delivery loop", Duration::ZERO);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let err = loop {
            match l.check() {
                Err(e) => break e,
                Ok(()) => assert!(std::time::Instant::now() < deadline, "never reported"),
            }
            tokio::task::yield_now().await;
        };
        assert!(err.starts_with("wedged: delivery loop has not advanced for"), "{err}");
        assert!(!err.contains("the runtime"), "{err}");
        drop(alive);
    }
}
