//! Where the queue (and every Redis-backed store) lives, as the relay's options hold it: `memory`,
//! or a Redis URL (one server or a cluster) checked once, when the option is parsed, so a bad URL
//! is refused at startup with a clear message and nothing after re-parses it.
//!
//! Owns that check and how the URL is shown: only redacted (password replaced), in `Display` and
//! `Debug` alike. Must not connect; the URL syntax itself is `redis_client`'s.

use std::fmt;
use std::str::FromStr;

use crate::redis_client::{self, Target};

/// `memory` or a checked Redis URL; see the module doc.
#[derive(Clone, PartialEq, Eq)]
pub struct QueueUrl(Location);

#[derive(Clone, PartialEq, Eq)]
enum Location {
    Memory,
    Redis { url: String, target: Target },
}

/// A `--queue` value the relay cannot use; the message shows the URL redacted.
#[derive(Debug, thiserror::Error)]
#[error("the queue URL {url}: {reason}")]
pub struct QueueUrlError {
    url: String,
    reason: String,
}

impl QueueUrl {
    /// The in-memory queue (one process, not durable).
    pub fn memory() -> Self {
        QueueUrl(Location::Memory)
    }

    pub fn is_memory(&self) -> bool {
        self.0 == Location::Memory
    }

    /// The Redis server or cluster, `None` for the in-memory queue.
    pub(crate) fn redis(&self) -> Option<&Target> {
        match &self.0 {
            Location::Memory => None,
            Location::Redis { target, .. } => Some(target),
        }
    }
}

impl FromStr for QueueUrl {
    type Err = QueueUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "memory" {
            return Ok(QueueUrl::memory());
        }
        match Target::parse(s) {
            Ok(target) => Ok(QueueUrl(Location::Redis {
                url: s.to_owned(),
                target,
            })),
            Err(e) => Err(QueueUrlError {
                url: redis_client::redact(s),
                reason: e.to_string(),
            }),
        }
    }
}

impl fmt::Display for QueueUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Location::Memory => f.write_str("memory"),
            Location::Redis { url, .. } => f.write_str(&redis_client::redact(url)),
        }
    }
}

impl fmt::Debug for QueueUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QueueUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsed_once_and_shown_redacted() {
        assert!("memory".parse::<QueueUrl>().unwrap().is_memory());
        let u: QueueUrl = "rediss://:hunter2@redis:6380/0".parse().unwrap();
        assert!(!u.is_memory());
        assert_eq!(
            u.redis(),
            Some(&Target::Single("rediss://:hunter2@redis:6380/0".into()))
        );
        assert_eq!(u.to_string(), "rediss://***@redis:6380/0");
        assert!(!format!("{u:?}").contains("hunter2"));
        let c: QueueUrl = "redis+cluster://a:1,b:2".parse().unwrap();
        assert!(matches!(c.redis(), Some(Target::Cluster(n)) if n.len() == 2));
    }

    #[test]
    fn bad_urls_are_refused_with_a_clear_message_and_no_password() {
        for (bad, says) in [
            (
                "redis://:hunter2@127.0.0.1:notaport",
                "the queue URL redis://***@127.0.0.1:notaport: ",
            ),
            ("memcached://:hunter2@x", "unknown Redis URL scheme"),
            ("localhost:6379", "is not a Redis URL"),
            ("rediss+cluster://u:hunter2@", "names no cluster node"),
        ] {
            let e = bad.parse::<QueueUrl>().expect_err(bad).to_string();
            assert!(e.contains(says) && !e.contains("hunter2"), "{bad}: {e}");
        }
    }
}
