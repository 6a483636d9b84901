//! Which Kubernetes permission each admin API request needs (pure; no I/O).
//!
//! A caller authenticated by a Kubernetes token (not the admin token) is authorized, as
//! kube-rbac-proxy does, by a SubjectAccessReview on virtual resources of the `mailroute.io`
//! group in one namespace: `deliveryevents` (`list`: `/api/v1/events`, `/api/v1/events.csv`),
//! `messages` (`get`: `GET /api/v1/messages/{id}`; `delete`: its cancel), `quotausages`
//! (`list`: `/api/v1/quotas`) and `suppressions` (`list`, `create`, `delete`:
//! `/api/v1/suppressions[.csv]` of the namespace's list). Bulk queue control (`/api/v1/queue*`, `/api/v1/holds`) needs
//! `list messages` to list, `delete messages` to cancel and `update messages` to retry, hold or
//! release, in the namespace the request names; a tenant acts on that namespace's mail only. Such a caller always names the namespace of the events and
//! quotas it asks for (`?namespace=`); a message's namespace is its own. Unattributed mail
//! (no namespace) and queries over every namespace stay with the admin token.
//!
//! This module decides; it must not call the API server (that is [`super::kubernetes`]).

use std::fmt;

/// The API group of the virtual resources.
pub const GROUP: &str = "mailroute.io";

/// One permission: `verb` on `resource` of [`GROUP`] in `namespace`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Permission {
    pub verb: &'static str,
    pub resource: &'static str,
    pub namespace: String,
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}.{} in namespace {}",
            self.verb, self.resource, GROUP, self.namespace
        )
    }
}

/// A request a Kubernetes-token caller may not make whatever its permissions (answered 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "a Kubernetes token must name the namespace: add ?namespace=<your namespace> (the admin token reads every namespace)"
    )]
    NamespaceRequired,
    #[error("namespace {0:?} is not a namespace name (unattributed mail is for the admin token only)")]
    InvalidNamespace(String),
}

/// `list deliveryevents` in the namespace the events query names.
pub fn events(namespace: Option<&str>) -> Result<Permission, ScopeError> {
    Ok(permission("list", "deliveryevents", namespace_of(namespace)?))
}

/// `list quotausages` in the namespace the quotas query names.
pub fn quotas(namespace: Option<&str>) -> Result<Permission, ScopeError> {
    Ok(permission("list", "quotausages", namespace_of(namespace)?))
}

/// `verb suppressions` (`list`: read and export; `create`: add and import; `delete`: remove)
/// in the namespace whose list the request names. The platform list (no namespace) is the
/// admin token's only.
pub fn suppressions(verb: &'static str, namespace: Option<&str>) -> Result<Permission, ScopeError> {
    Ok(permission(verb, "suppressions", namespace_of(namespace)?))
}

/// `get messages` in the message's namespace; `None` (unattributed mail) is never a tenant's.
pub fn read_message(message_namespace: Option<&str>) -> Option<Permission> {
    message_namespace
        .filter(|n| is_namespace_name(n))
        .map(|n| permission("get", "messages", n.to_string()))
}

/// `delete messages` in the message's namespace (asked only once `get` was allowed).
pub fn cancel_message(message_namespace: &str) -> Permission {
    permission("delete", "messages", message_namespace.to_string())
}

/// `list messages` in the namespace a queue listing (or the holds' list) names.
pub fn queue_list(namespace: Option<&str>) -> Result<Permission, ScopeError> {
    Ok(permission("list", "messages", namespace_of(namespace)?))
}

/// `delete messages` in the namespace a bulk cancel names.
pub fn queue_cancel(namespace: Option<&str>) -> Result<Permission, ScopeError> {
    Ok(permission("delete", "messages", namespace_of(namespace)?))
}

/// `update messages` in the namespace a retry, hold or release names.
pub fn queue_update(namespace: Option<&str>) -> Result<Permission, ScopeError> {
    Ok(permission("update", "messages", namespace_of(namespace)?))
}

/// Whether a quota report entry (id `ns/name`, and the namespace a namespace quota counts)
/// belongs to `namespace`: the usage it shows is that namespace's.
pub fn quota_in(id: &str, counted: Option<&str>, namespace: &str) -> bool {
    match counted {
        Some(n) => n == namespace,
        None => id.split_once('/').is_some_and(|(ns, _)| ns == namespace),
    }
}

fn permission(verb: &'static str, resource: &'static str, namespace: String) -> Permission {
    Permission {
        verb,
        resource,
        namespace,
    }
}

fn namespace_of(namespace: Option<&str>) -> Result<String, ScopeError> {
    match namespace.map(str::trim).filter(|n| !n.is_empty()) {
        None => Err(ScopeError::NamespaceRequired),
        Some(n) if is_namespace_name(n) => Ok(n.to_string()),
        Some(n) => Err(ScopeError::InvalidNamespace(n.to_string())),
    }
}

/// A Kubernetes namespace name: an RFC 1123 label.
pub fn is_namespace_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(verb: &'static str, resource: &'static str, ns: &str) -> Permission {
        permission(verb, resource, ns.to_string())
    }

    #[test]
    fn each_endpoint_needs_its_verb_and_resource_in_the_named_namespace() {
        assert_eq!(events(Some("team-a")), Ok(p("list", "deliveryevents", "team-a")));
        assert_eq!(quotas(Some("team-b")), Ok(p("list", "quotausages", "team-b")));
        assert_eq!(read_message(Some("team-a")), Some(p("get", "messages", "team-a")));
        assert_eq!(cancel_message("team-a"), p("delete", "messages", "team-a"));
        assert_eq!(queue_list(Some("team-a")), Ok(p("list", "messages", "team-a")));
        assert_eq!(queue_cancel(Some("team-a")), Ok(p("delete", "messages", "team-a")));
        assert_eq!(queue_update(Some("team-a")), Ok(p("update", "messages", "team-a")));
        assert_eq!(queue_update(None), Err(ScopeError::NamespaceRequired));
        assert_eq!(
            suppressions("create", Some("team-a")),
            Ok(p("create", "suppressions", "team-a"))
        );
        assert_eq!(suppressions("list", None), Err(ScopeError::NamespaceRequired));
        assert_eq!(
            events(Some("team-a")).unwrap().to_string(),
            "list deliveryevents.mailroute.io in namespace team-a"
        );
    }

    #[test]
    fn a_tenant_must_name_a_real_namespace() {
        assert_eq!(events(None), Err(ScopeError::NamespaceRequired));
        assert_eq!(events(Some(" ")), Err(ScopeError::NamespaceRequired));
        assert_eq!(quotas(None), Err(ScopeError::NamespaceRequired));
        // `-` selects unattributed mail: nobody's namespace, so no tenant's.
        for bad in ["-", "Team-A", "a/b", "team-", &"a".repeat(64)] {
            assert_eq!(events(Some(bad)), Err(ScopeError::InvalidNamespace(bad.to_string())));
        }
        assert!(ScopeError::NamespaceRequired.to_string().contains("?namespace="));
    }

    #[test]
    fn unattributed_messages_are_no_tenants() {
        assert_eq!(read_message(None), None);
        assert_eq!(read_message(Some("-")), None);
    }

    #[test]
    fn quota_entries_belong_to_the_namespace_they_count() {
        assert!(quota_in("team-a/senders", None, "team-a"));
        assert!(!quota_in("team-a/senders", None, "team-b"));
        // A platform quota capping team-a as a whole shows team-a's usage.
        assert!(quota_in("mailroute/plan", Some("team-a"), "team-a"));
        assert!(!quota_in("mailroute/plan", Some("team-a"), "mailroute"));
        assert!(!quota_in("no-slash", None, "no-slash"));
    }
}
