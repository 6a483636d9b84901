//! All integration tests of this crate in one test binary: one link instead of one per file,
//! which keeps CI's build time and disk use down. Each module is one former test file.

mod support;

mod binary;
mod cluster;
mod conntest;
mod controller_loop;
mod crd_drift;
mod lease;
mod rbac;
mod readme;
mod reconcile_fake;
mod reconcile_mock;
