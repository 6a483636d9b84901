//! Test fixtures shared by the mailroute workspace's integration tests.
//!
//! * [`certs`]: an rcgen-generated CA and `localhost` server certificate, with
//!   ready-made rustls configs.
//! * [`redis`]: launches a real `redis-server` on a free loopback port.
//! * [`smtp`]: a scriptable SMTP server (upstream smarthost / destination MX)
//!   and a small SMTP client for driving the relay's inbound side.
//! * [`token_endpoint`]: an OAuth2 token endpoint over HTTPS, as Entra ID and
//!   Google answer.
//!
//! Everything network-related binds to `127.0.0.1` on an OS-chosen port and
//! shuts down by itself when dropped.

pub mod certs;
pub mod dkim;
pub mod redis;
pub mod redis_cluster;
pub mod smtp;
pub mod token_endpoint;

pub use certs::TestPki;
pub use redis::RedisServer;
pub use redis_cluster::RedisCluster;
pub use smtp::{Behaviour, Gate, Received, Script, SmtpServer, Stage, Tls, TokenCheck};
