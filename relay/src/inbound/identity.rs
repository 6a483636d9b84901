//! Who sent a message, in Kubernetes terms: the seam through which a session asks which
//! namespace (and ServiceAccount) an unauthenticated client's address belongs to.
//!
//! This module owns the [`SenderIdentity`] value, the [`IdentitySource`] trait, the rule that
//! picks a session's identity ([`resolve`]: an AUTH user's namespace first, else the client's
//! address) and the [`Unattributed`] setting with its reply. The default source, [`Nobody`],
//! knows no address; a source fed from the operator's pod-IP map plugs in here. Nothing here
//! performs I/O on the lookup path: a source answers from what it already holds, so a session
//! never waits on it.

use std::net::IpAddr;
use std::str::FromStr;

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

/// The sender of a session at MAIL FROM. An authenticated session belongs to the namespace of
/// its user's SenderQuota (`user_namespace`; `None` for a user of no known namespace: then
/// unattributed, never the client address's, which may be another tenant's pod). An
/// unauthenticated one is whoever `source` says its address is.
pub(crate) fn resolve(
    authenticated: bool,
    user_namespace: Option<&str>,
    ip: IpAddr,
    source: &dyn IdentitySource,
) -> Option<SenderIdentity> {
    if authenticated {
        return user_namespace.map(|ns| SenderIdentity {
            namespace: ns.to_owned(),
            service_account: None,
        });
    }
    source.identify(ip.to_canonical())
}

/// What happens to mail whose sender's namespace is unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unattributed {
    /// Only platform routes and quotas governing every namespace apply (the default: a
    /// single-tenant install, whose routes all live in the platform namespace, works as before).
    #[default]
    PlatformOnly,
    /// MAIL FROM is refused with [`unknown_namespace`].
    Refuse,
}

impl FromStr for Unattributed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "platformOnly" | "platform-only" => Ok(Self::PlatformOnly),
            "refuse" => Ok(Self::Refuse),
            other => Err(format!("unknown value {other:?}; expected platformOnly or refuse")),
        }
    }
}

/// The reply to MAIL FROM of an unattributed sender under [`Unattributed::Refuse`].
pub fn unknown_namespace() -> mailroute_smtp::Reply {
    mailroute_smtp::Reply::with_code(
        550,
        mailroute_smtp::EnhancedStatusCode::new(5, 7, 1),
        "Sender's namespace is unknown: authenticate, or send from a pod of a known namespace",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_knows_no_address() {
        assert_eq!(Nobody.identify("10.1.2.3".parse().unwrap()), None);
        assert_eq!(Nobody.identify("::1".parse().unwrap()), None);
    }

    struct One(IpAddr);
    impl IdentitySource for One {
        fn identify(&self, ip: IpAddr) -> Option<SenderIdentity> {
            (ip == self.0).then(|| SenderIdentity {
                namespace: "team-b".into(),
                service_account: Some("mailer".into()),
            })
        }
    }

    #[test]
    fn an_auth_user_is_its_quotas_namespace_and_never_its_addresss() {
        let pod = One("10.1.2.3".parse().unwrap());
        let ip = "10.1.2.3".parse().unwrap();
        let ns = |i: Option<SenderIdentity>| i.map(|i| (i.namespace, i.service_account));
        assert_eq!(
            ns(resolve(true, Some("team-a"), ip, &pod)),
            Some(("team-a".into(), None))
        );
        assert_eq!(ns(resolve(true, None, ip, &pod)), None);
        assert_eq!(
            ns(resolve(false, None, ip, &pod)),
            Some(("team-b".into(), Some("mailer".into())))
        );
        // IPv4-mapped IPv6 addresses are looked up as IPv4.
        assert!(resolve(false, None, "::ffff:10.1.2.3".parse().unwrap(), &pod).is_some());
        assert_eq!(resolve(false, None, ip, &Nobody), None);
    }

    #[test]
    fn unattributed_setting_parses_its_two_values() {
        assert_eq!("platformOnly".parse(), Ok(Unattributed::PlatformOnly));
        assert_eq!("refuse".parse(), Ok(Unattributed::Refuse));
        assert!("drop".parse::<Unattributed>().is_err());
        assert_eq!(Unattributed::default(), Unattributed::PlatformOnly);
    }
}
