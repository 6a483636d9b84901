//! Cross-crate tests of mailroute; [`k8s`] runs a real Kubernetes control plane for them.

pub mod k8s;
