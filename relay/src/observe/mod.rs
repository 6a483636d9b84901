//! What the relay reports about its work: the delivery log ([`dlog`]), the Prometheus metrics
//! ([`metrics`]) and the bridge from session and worker events to both (`telemetry`).
//!
//! These modules record and export; they must not decide anything about a message.

pub mod dlog;
pub mod metrics;
pub(crate) mod telemetry;
