//! The operator's Prometheus metrics (names fixed by the relay contract) and their text
//! rendering. Labels are bounded: `result` takes two values, `route` is a route id. Owns no
//! HTTP; `http` serves `render()`.

use std::collections::BTreeMap;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every operator metric, registered in its own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub last_success: Gauge,
    pub is_leader: IntGauge,
    pub route_verified: IntGaugeVec,
    pub config_writes: IntCounter,
    /// Entries of the pod identity map this replica last published (0 while not leading).
    pub pod_identities: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "mailroute_operator_reconciles_total",
                "Reconciles of the relay configuration, by result (success or error).",
            ),
            &["result"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "mailroute_operator_reconcile_duration_seconds",
                "Duration of one reconcile, from the first list to the last status write.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let last_success = Gauge::new(
            "mailroute_operator_last_success_timestamp_seconds",
            "Unix time of the last successful reconcile (the live config is current as of then).",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let is_leader = IntGauge::new(
            "mailroute_operator_is_leader",
            "1 while this replica holds the leader Lease and writes, else 0.",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let route_verified = IntGaugeVec::new(
            Opts::new(
                "mailroute_route_verified",
                "1 when the route's last connection test succeeded, 0 when it failed.",
            ),
            &["route"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let config_writes = IntCounter::new(
            "mailroute_operator_config_writes_total",
            "Writes of the relay ConfigMap or Secret (only made when their content changed).",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let pod_identities = IntGauge::new(
            "mailroute_operator_pod_identities",
            "Pod IPs in the identity map this replica last published to Redis (0 while not leading).",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_duration.clone()),
            Box::new(last_success.clone()),
            Box::new(is_leader.clone()),
            Box::new(route_verified.clone()),
            Box::new(config_writes.clone()),
            Box::new(pod_identities.clone()),
        ] {
            // Names are unique within this fresh registry.
            let _ = registry.register(c);
        }
        // Both results exist from the start, so rate() works before the first error.
        reconciles.with_label_values(&["success"]);
        reconciles.with_label_values(&["error"]);
        Self {
            registry,
            reconciles,
            reconcile_duration,
            last_success,
            is_leader,
            route_verified,
            config_writes,
            pod_identities,
        }
    }

    /// Replaces the per-route verdicts; routes without a verdict (or deleted) disappear.
    pub fn set_verified(&self, verified: &BTreeMap<String, bool>) {
        self.route_verified.reset();
        for (route, ok) in verified {
            self.route_verified
                .with_label_values(&[route.as_str()])
                .set(i64::from(*ok));
        }
    }

    /// Publishes leadership. A replica that is not leading exports no route verdicts: it does
    /// not reconcile, so what it showed as leader would go stale beside the new leader's.
    pub fn set_leading(&self, leading: bool) {
        self.is_leader.set(i64::from(leading));
        if !leading {
            self.route_verified.reset();
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_names_are_exported() {
        let m = Metrics::new();
        m.reconcile_duration.observe(0.2);
        m.config_writes.inc();
        m.set_verified(&BTreeMap::from([("mail/gmail".to_string(), true)]));
        let text = m.render();
        for name in [
            "mailroute_operator_reconciles_total{result=\"success\"} 0",
            "mailroute_operator_reconciles_total{result=\"error\"} 0",
            "mailroute_operator_reconcile_duration_seconds_count 1",
            "mailroute_operator_last_success_timestamp_seconds 0",
            "mailroute_operator_is_leader 0",
            "mailroute_route_verified{route=\"mail/gmail\"} 1",
            "mailroute_operator_config_writes_total 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        m.set_verified(&BTreeMap::new());
        assert!(!m.render().contains("mail/gmail"), "a deleted route's series stays");
    }

    #[test]
    fn a_replica_that_stops_leading_drops_its_route_verdicts() {
        let m = Metrics::new();
        m.set_leading(true);
        m.set_verified(&BTreeMap::from([("mail/gmail".to_string(), false)]));
        assert!(m.render().contains("mailroute_operator_is_leader 1"));
        m.set_leading(false);
        let text = m.render();
        assert!(text.contains("mailroute_operator_is_leader 0"), "{text}");
        assert!(
            !text.contains("mail/gmail"),
            "a follower still exports a stale verdict:\n{text}"
        );
    }
}
