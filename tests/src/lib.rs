//! Cross-crate tests of mailroute; [`k8s`] runs a real Kubernetes control plane for them and
//! [`operator`] runs mailroute's binaries against it.

pub mod k8s;
pub mod operator;
