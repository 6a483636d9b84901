//! What SMTP AUTH may cost the relay. Password checks (argon2, about 19 MiB each) run at most
//! `concurrency` at once, off the reactor threads, each in a memory area that is allocated once
//! and reused, so their memory stays at `concurrency` × one check however many clients try.
//! AUTH failures are counted per client address (IPv6 per /64) across sessions in an expiring,
//! size-capped map; an address over the limit is locked out until its failures expire.
//!
//! It owns these limits and the password verification; the session decides what to reply.
//! It must not log, store or count passwords or user names.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use argon2::password_hash::Output;
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use mailroute_api::config::InboundUser;

use crate::expiring::SharedExpiringMap;
use crate::observe::metrics::Metrics;

/// Client addresses whose failures are remembered at once; beyond it new addresses are not
/// counted (the bound on concurrent checks still holds for them).
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// A hash asking for more memory than this (64 MiB) is refused instead of checked.
const MAX_CHECK_BLOCKS: usize = 64 * 1024;

/// Salt of the stand-in check when no user exists at all.
const DUMMY_SALT: &[u8] = b"mailroute-no-such-user";

/// Limits of [`AuthGuard`].
#[derive(Clone, Debug)]
pub struct AuthLimits {
    /// Password checks running at once; more are answered "busy".
    pub concurrency: usize,
    /// Failures from one address (within `failure_window` of each other) before it is locked
    /// out; 0 disables the lock-out.
    pub max_failures_per_address: u32,
    /// How long an address's failures are remembered after its last one.
    pub failure_window: Duration,
}

impl Default for AuthLimits {
    fn default() -> Self {
        AuthLimits {
            concurrency: 2,
            max_failures_per_address: 20,
            failure_window: Duration::from_secs(600),
        }
    }
}

/// The outcome of a password check.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The user exists and the password matches; `quota` is the user's, `namespace` the one
    /// its mail belongs to.
    Authenticated { quota: String, namespace: Option<String> },
    /// Unknown user or wrong password (indistinguishable by design).
    Refused,
    /// Every check slot is taken: try again later. Nothing was checked.
    Busy,
}

pub struct AuthGuard {
    limits: AuthLimits,
    slots: Arc<Slots>,
    failures: SharedExpiringMap<u32>,
    warned_full: AtomicBool,
}

/// The idle check memories; one taken out is one check running.
struct Slots {
    idle: Mutex<SlotState>,
    metrics: Arc<Metrics>,
}

struct SlotState {
    idle: Vec<Vec<Block>>,
    running: usize,
    peak: usize,
}

/// A check slot with its memory, given back when dropped (also when the session that asked
/// for the check is gone by the time it finishes).
struct Slot {
    slots: Arc<Slots>,
    memory: Vec<Block>,
}

impl Slots {
    fn take(self: &Arc<Self>) -> Option<Slot> {
        let mut s = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let memory = s.idle.pop()?;
        s.running += 1;
        s.peak = s.peak.max(s.running);
        self.metrics.smtp_auth_checks_in_flight.set(s.running as i64);
        self.metrics.smtp_auth_checks_in_flight_max.set(s.peak as i64);
        Some(Slot {
            slots: self.clone(),
            memory,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.idle.lock().unwrap_or_else(PoisonError::into_inner);
        s.idle.push(std::mem::take(&mut self.memory));
        s.running -= 1;
        self.slots.metrics.smtp_auth_checks_in_flight.set(s.running as i64);
    }
}

impl AuthGuard {
    pub fn new(limits: AuthLimits, metrics: Arc<Metrics>) -> Self {
        let n = limits.concurrency.max(1);
        AuthGuard {
            limits,
            slots: Arc::new(Slots {
                // Each area grows to its first hash's size on first use, then stays.
                idle: Mutex::new(SlotState {
                    idle: (0..n).map(|_| Vec::new()).collect(),
                    running: 0,
                    peak: 0,
                }),
                metrics,
            }),
            failures: SharedExpiringMap::default(),
            warned_full: AtomicBool::new(false),
        }
    }

    /// Whether `ip` has failed too often lately; counted as a refusal when it has.
    pub fn locked_out(&self, ip: IpAddr, now_ms: i64) -> bool {
        let locked = self
            .failures
            .lock()
            .live(&address_key(ip), now_ms)
            .is_some_and(|n| self.over_limit(*n));
        if locked {
            self.refused("locked_out");
        }
        locked
    }

    /// Whether `failures` from one address reach the lock-out.
    pub fn over_limit(&self, failures: u32) -> bool {
        let limit = self.limits.max_failures_per_address;
        limit > 0 && failures >= limit
    }

    /// Counts a failed AUTH from `ip`; returns the failures counted for it in the window
    /// (0 when the address could not be tracked).
    pub fn failed(&self, ip: IpAddr, now_ms: i64) -> u32 {
        let key = address_key(ip);
        let window = self.limits.failure_window.as_millis().min(i64::MAX as u128) as i64;
        let mut m = self.failures.lock();
        if m.live(&key, now_ms).is_none() && m.len() >= MAX_TRACKED_ADDRESSES {
            m.sweep(now_ms);
            if m.len() >= MAX_TRACKED_ADDRESSES {
                if !self.warned_full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        max = MAX_TRACKED_ADDRESSES,
                        "too many client addresses with AUTH failures to track; new ones are not counted"
                    );
                }
                return 0;
            }
        }
        let e = m.entry(&key, |_| true, || 0);
        if e.expire_at_ms <= now_ms {
            e.value = 0;
        }
        e.value = e.value.saturating_add(1);
        e.expire_at_ms = now_ms.saturating_add(window);
        e.value
    }

    /// Checks `user`'s `password` in a free slot, off the reactor. An unknown user is checked
    /// against another user's hash (or a stand-in with the default cost), so the answer costs
    /// and takes the same as for a real user, and is then refused.
    pub async fn verify(&self, users: &BTreeMap<String, InboundUser>, user: &str, password: String) -> Verdict {
        let Some(mut slot) = self.slots.take() else {
            self.refused("busy");
            return Verdict::Busy;
        };
        let known = users.get(user);
        let hash = known.or_else(|| users.values().next()).map(|u| u.password_hash.clone());
        let ok = tokio::task::spawn_blocking(move || {
            let ok = check(&mut slot.memory, hash.as_deref(), password.as_bytes());
            drop(slot);
            ok
        })
        .await
        .unwrap_or(false);
        match known {
            Some(u) if ok => Verdict::Authenticated {
                quota: u.quota.clone(),
                namespace: u.namespace().map(str::to_owned),
            },
            _ => Verdict::Refused,
        }
    }

    fn refused(&self, reason: &str) {
        self.slots.metrics.smtp_auth_refused.with_label_values(&[reason]).inc();
    }
}

/// The key an address's failures are counted under: IPv4 as is (also when IPv4-mapped), IPv6
/// by its /64, which one subscriber usually holds whole.
fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// An argon2 PHC hash check computed in `memory` (grown to the hash's size if needed, then
/// kept). `None` runs the same work with default parameters and fails.
fn check(memory: &mut Vec<Block>, hash: Option<&str>, password: &[u8]) -> bool {
    let mut out = [0u8; Output::MAX_LENGTH];
    let Some(phc) = hash else {
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::default());
        let len = Params::DEFAULT_OUTPUT_LEN;
        let _ = compute(&argon, memory, password, DUMMY_SALT, &mut out[..len]);
        return false;
    };
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let argon = Argon2::new(algorithm, version, params);
    let out = &mut out[..expected.len()];
    compute(&argon, memory, password, salt, out) && Output::new(out).is_ok_and(|o| o == expected)
}

fn compute(argon: &Argon2<'_>, memory: &mut Vec<Block>, password: &[u8], salt: &[u8], out: &mut [u8]) -> bool {
    let blocks = argon.params().block_count();
    if blocks > MAX_CHECK_BLOCKS {
        tracing::error!(blocks, "password hash asks for more memory than allowed; refused");
        return false;
    }
    if memory.len() < blocks {
        memory.resize(blocks, Block::new());
    }
    argon
        .hash_password_into_with_memory(password, salt, out, &mut memory[..blocks])
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(hash: String) -> BTreeMap<String, InboundUser> {
        BTreeMap::from([(
            "shop".to_owned(),
            InboundUser {
                password_hash: hash,
                quota: "mail/shop".into(),
                namespace: None,
            },
        )])
    }

    #[test]
    fn checks_agree_with_the_hasher_and_reuse_their_memory() {
        let hash = mailroute_api::compile::hash_password("mail/shop", "shop", "pw");
        let mut memory = Vec::new();
        assert!(check(&mut memory, Some(&hash), b"pw"));
        let (ptr, len) = (memory.as_ptr(), memory.len());
        assert_eq!(len, Params::DEFAULT_M_COST as usize);
        assert!(!check(&mut memory, Some(&hash), b"pW"));
        assert!(!check(&mut memory, None, b"pw"));
        assert!(!check(&mut memory, Some("$argon2id$garbage"), b"pw"));
        assert_eq!(
            (memory.as_ptr(), memory.len()),
            (ptr, len),
            "the same memory every time"
        );
    }

    #[tokio::test]
    async fn unknown_users_are_refused_even_with_another_users_password() {
        let g = AuthGuard::new(AuthLimits::default(), Arc::new(Metrics::new()));
        let u = users(mailroute_api::compile::hash_password("mail/shop", "shop", "pw"));
        assert_eq!(
            g.verify(&u, "shop", "pw".into()).await,
            Verdict::Authenticated {
                quota: "mail/shop".into(),
                namespace: Some("mail".into()),
            }
        );
        assert_eq!(g.verify(&u, "nobody", "pw".into()).await, Verdict::Refused);
        assert_eq!(g.verify(&u, "shop", "guess".into()).await, Verdict::Refused);
        assert_eq!(g.verify(&BTreeMap::new(), "shop", "pw".into()).await, Verdict::Refused);
    }

    #[tokio::test]
    async fn a_full_guard_answers_busy_without_checking() {
        let metrics = Arc::new(Metrics::new());
        let g = AuthGuard::new(
            AuthLimits {
                concurrency: 1,
                ..AuthLimits::default()
            },
            metrics.clone(),
        );
        let held = g.slots.take().expect("a free slot");
        assert_eq!(metrics.smtp_auth_checks_in_flight.get(), 1);
        let u = users(String::new());
        assert_eq!(g.verify(&u, "shop", "pw".into()).await, Verdict::Busy);
        assert_eq!(metrics.smtp_auth_refused.with_label_values(&["busy"]).get(), 1);
        drop(held);
        assert_eq!(metrics.smtp_auth_checks_in_flight.get(), 0);
        assert_eq!(g.verify(&u, "shop", "pw".into()).await, Verdict::Refused);
        assert_eq!(metrics.smtp_auth_checks_in_flight_max.get(), 1);
    }

    #[test]
    fn failures_count_per_address_and_expire() {
        let g = AuthGuard::new(
            AuthLimits {
                concurrency: 1,
                max_failures_per_address: 3,
                failure_window: Duration::from_secs(10),
            },
            Arc::new(Metrics::new()),
        );
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b_same_64: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(g.failed(a, 0), 1);
        assert_eq!(g.failed(mapped, 1_000), 2, "an IPv4-mapped address is the IPv4 address");
        assert!(!g.locked_out(a, 1_000));
        assert_eq!(g.failed(a, 2_000), 3);
        assert!(g.locked_out(a, 2_000));
        assert!(
            g.locked_out(a, 11_999),
            "remembered for the window after the last failure"
        );
        assert!(!g.locked_out(a, 12_000));
        assert_eq!(g.failed(a, 12_000), 1, "and forgotten after it");
        assert_eq!(g.failed(b, 0), 1);
        assert_eq!(g.failed(b_same_64, 0), 2, "IPv6 counts per /64");
        assert_eq!(g.failed("2001:db8:1:3::1".parse().unwrap(), 0), 1);
    }

    #[test]
    fn the_failure_map_is_bounded() {
        let g = AuthGuard::new(AuthLimits::default(), Arc::new(Metrics::new()));
        for i in 0..MAX_TRACKED_ADDRESSES as u32 {
            g.failed(IpAddr::from(i.to_be_bytes()), 0);
        }
        let extra: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(g.failed(extra, 1), 0, "not tracked while full of live entries");
        assert_eq!(g.failures.lock().len(), MAX_TRACKED_ADDRESSES);
        // Once the old ones expired, new addresses are counted again.
        assert_eq!(g.failed(extra, 600_001), 1);
        assert_eq!(g.failures.lock().len(), 1);
    }
}
