//! mailroute's SMTP client side and the reply type every part of the relay shares.
//!
//! [`reply`]: one [`Reply`] (code, typed enhanced status code, text) for inbound replies,
//! outbound results, bounce classification, DSN diagnostics and the delivery log. [`client`]:
//! the one outbound SMTP dialogue, used by the relay's delivery and the operator's connection
//! test. [`wire`]: addresses and content as written on the wire. [`helo`]: the rule for the
//! name that greets MX hosts.
//!
//! No pooling, retries, classification or logging here: callers decide what a result means.

pub mod client;
pub mod helo;
pub mod reply;
pub mod wire;

pub use self::client::{Connection, Dialogue, ErrorKind, OpenSpec, Stage, StepError, Timeouts, TlsUse};
pub use self::reply::{EnhancedStatusCode, Reply, StatusClass};
