//! mailroute relay: accepts SMTP, queues in Redis, delivers through the compiled routes.
//!
//! The folders follow a message through the relay:
//! - [`inbound`]: the SMTP listeners and sessions, sender quotas, header work on arrival;
//! - [`queue`]: the shared queue and the records it stores (message, jobs, envelope);
//! - [`outbound`]: the delivery worker, route choice, retries, pacing and shaping, the SMTP
//!   client side (pools, DKIM), bounce classification and DSNs;
//! - [`observe`]: the delivery log, Prometheus metrics and the bridge that feeds both;
//! - [`suppress`]: the suppression lists (Redis, and each relay's in-memory copy);
//! - [`control`]: bulk queue control (list, cancel, retry, hold, release by filter) and the
//!   holds every worker honours;
//! - [`admin`]: the admin HTTP API, the relay's backend for it, and its Kubernetes token checks;
//! - [`server`] assembles them; [`config`], [`clock`], `redis_client` and `expiring` are
//!   shared by all of them.

pub mod admin;
pub mod clock;
pub mod config;
pub mod control;
pub(crate) mod expiring;
pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod queue;
pub(crate) mod redis_client;
pub mod server;
pub mod suppress;

pub use mailroute_smtp::{EnhancedStatusCode, Reply};
