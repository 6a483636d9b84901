//! Who sent a message, in Kubernetes terms: the seam through which a session asks which
//! namespace (and ServiceAccount) an unauthenticated client's address belongs to.
//!
//! This module owns the [`SenderIdentity`] value and the [`IdentitySource`] trait only. The
//! default source, [`Nobody`], knows no address; a source fed from the operator's pod-IP map
//! plugs in here. Nothing here decides what happens to unattributed mail (that is the
//! session's `unattributed` setting) and nothing here performs I/O on the lookup path: a
//! source answers from what it already holds, so a session never waits on it.

// Sessions consult the source once the session split lands (issue 17); until then only tests do.
#![allow(dead_code)]

use std::net::IpAddr;

/// The namespace (and, where known, the ServiceAccount) a message's sender belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SenderIdentity {
    pub(crate) namespace: String,
    pub(crate) service_account: Option<String>,
}

/// Answers which sender an unauthenticated client's address is. `None` means unattributed:
/// unknown, or known to be stale (an address just reused by another pod must not be
/// attributed to its old owner).
pub(crate) trait IdentitySource: Send + Sync {
    fn identify(&self, ip: IpAddr) -> Option<SenderIdentity>;
}

/// The source that knows nobody: every unauthenticated client is unattributed.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Nobody;

impl IdentitySource for Nobody {
    fn identify(&self, _ip: IpAddr) -> Option<SenderIdentity> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_knows_no_address() {
        assert_eq!(Nobody.identify("10.1.2.3".parse().unwrap()), None);
        assert_eq!(Nobody.identify("::1".parse().unwrap()), None);
    }
}
