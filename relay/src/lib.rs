//! mailroute relay: accepts SMTP, queues in Redis, delivers through the compiled routes.

pub mod admin;
pub mod bounce;
pub mod delivery;
pub mod dlog;
pub mod dsn;
pub mod headers;
pub mod message;
pub mod queue;
pub mod metrics;
pub mod quota;
pub mod retry;
pub mod route;
pub mod shaping;
