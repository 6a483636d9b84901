//! Everything after the queue: the delivery `worker` and its per-job decision, route choice
//! (`route`), retry schedules (`retry`), bounce classification ([`bounce`]) and DSNs
//! ([`dsn`]) as pure modules, the shared pacer ([`shaping`]) and its relay side ([`pacing`]),
//! the SMTP client side of an attempt ([`delivery`]: next hop, pools, DKIM) and its adapter to
//! the worker ([`transport`]), which gets `auth.oauth2` routes their tokens from [`oauth2`].
//!
//! Nothing here accepts mail or answers an inbound session; the queue's records come from
//! [`crate::queue`].

pub mod bounce;
pub mod delivery;
pub mod dsn;
pub mod oauth2;
pub mod pacing;
pub(crate) mod retry;
pub(crate) mod route;
pub mod shaping;
pub mod transport;
pub(crate) mod worker;
