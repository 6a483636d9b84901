//! What the relay reports about its work: the delivery log ([`dlog`]), the Prometheus metrics
//! ([`metrics`]), the bridge from session and worker events to both (`telemetry`), and the
//! heartbeats of the relay's loops that `/healthz` reads ([`liveness`]).
//!
//! These modules record and export; they must not decide anything about a message.

pub mod dlog;
pub mod liveness;
pub mod metrics;
pub(crate) mod telemetry;
