//! All integration tests of this crate in one test binary: one link instead of one per file,
//! which keeps CI's build time and disk use down. Each module is one former test file.

mod harness_run;
mod loadgen_sink;
mod redis_and_postfix;
