//! All integration tests of this crate in one test binary: one link instead of one per file,
//! which keeps CI's build time and disk use down. Each module is one former test file.

mod common;

mod admin;
mod admin_e2e;
mod cluster;
mod conformance;
mod connections;
mod delivery;
mod dkim_interop;
mod dlog;
mod dlog_e2e;
mod drain;
mod dsn;
mod durability;
mod e2e;
mod inbound;
mod inbound_limits;
mod integrity;
mod listen;
mod liveness;
mod oauth2;
mod pod_identity;
mod proxy_protocol;
mod queue;
mod queue_control;
mod quota;
mod quota_e2e;
mod shaping;
mod startup;
mod suppress;
mod swaks;
mod tenancy;
