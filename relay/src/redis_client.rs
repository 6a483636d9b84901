//! The Redis connection every store of the relay uses: the workspace's shared
//! `mailroute-redis` crate (the operator uses it too), under the name the relay's modules import.

pub use mailroute_redis::*;
