//! mailroute relay: accepts SMTP, queues in Redis, delivers through the compiled routes.

pub mod admin;
pub mod backend;
pub mod bounce;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod dlog;
pub mod dsn;
pub mod expiring;
pub mod headers;
pub mod message;
pub mod metrics;
pub mod pacing;
pub mod queue;
pub mod quota;
pub mod redis_client;
pub mod retry;
pub mod route;
pub mod server;
pub mod shaping;
pub mod smtp;
pub mod telemetry;
pub mod transport;
pub mod worker;

pub use mailroute_smtp::{EnhancedStatusCode, Reply};
