//! Inbound mail, from the listening socket to the queue's acknowledgement: the listeners'
//! plumbing (connection, TLS, listener kinds) in `listener`, the PROXY protocol header of load
//! balancers in `proxy`, the session logic in [`session`],
//! its fixed replies by name in `replies`, DATA transparency in `data`, envelope address syntax
//! and wire form in `address`, the limits on what a session may cost in [`auth_guard`] and
//! `body_budget`, the end of idle sessions at shutdown in `shutdown`, sender quotas in
//! [`quota`], the header work on an accepted message in `headers`, the sender's namespace
//! identity for unauthenticated clients in `identity`.
//!
//! Nothing under `inbound` delivers or routes mail.
//!
//! `identity_podmap` is the pod-IP source of `identity`: the operator's map, read from Redis.

pub(crate) mod address;
pub mod auth_guard;
pub(crate) mod body_budget;
pub(crate) mod data;
pub(crate) mod headers;
pub mod identity;
pub(crate) mod listener;
pub(crate) mod proxy;
pub mod quota;
pub(crate) mod replies;
pub mod session;
pub(crate) mod shutdown;
// Listed apart from `identity` so that issue 14's two branches merge without conflict.
pub mod identity_podmap;

pub use listener::ListenerKind;
