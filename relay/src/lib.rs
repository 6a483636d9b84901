//! mailroute relay: accepts SMTP, queues in Redis, delivers through the compiled routes.

pub mod bounce;
pub mod retry;
