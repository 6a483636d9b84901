//! mailroute operator: turns SmtpRoute, SenderQuota and DeliveryWebhook objects into the relay configuration
//! (one ConfigMap and one Secret per fleet), reports honest status on every object, tests each
//! route's upstream and shows quota usage read from the relays.

pub mod app;
pub mod clock;
pub mod conditions;
pub mod conntest;
pub mod controller;
pub mod crdgen;
pub mod fleets;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod plan;
pub mod podmap;
pub mod podpublish;
pub mod reconcile;
pub mod usage;
pub mod webhooks;
