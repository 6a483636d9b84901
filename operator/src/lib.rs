//! mailroute operator: turns SmtpRoute and SenderQuota objects into the relay configuration.

pub mod crdgen;
