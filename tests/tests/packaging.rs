//! Packaging contract tests: the Grafana dashboard and the Prometheus alert rules shipped with the
//! Helm chart parse as PromQL and use only metrics the relay and the operator export, the
//! dashboard is a complete importable Grafana dashboard (the CRD copies are checked by
//! operator/tests/crd_drift.rs). Reads committed files only; the chart rendering itself is checked by
//! scripts/check-packaging.sh (which also keeps deploy/ equal to the chart's render).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mailroute_relay::observe::metrics::Metrics;
use promql_parser::parser::{self, Expr};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Series Prometheus itself adds to every scrape target.
const PROMETHEUS_SERIES: &[&str] = &["up"];
/// Series of the standard cluster exporters a Prometheus for Kubernetes scrapes (kube-state-metrics,
/// the kubelet's volume stats and cAdvisor), used by the alerts on pods and on Redis.
const CLUSTER_SERIES: &[&str] = &[
    "kube_deployment_spec_replicas",
    "kube_deployment_status_replicas_available",
    "kube_statefulset_status_replicas_ready",
    "container_memory_working_set_bytes",
    "kubelet_volume_stats_used_bytes",
    "kubelet_volume_stats_capacity_bytes",
];

/// Metric family names a query may use (the relay's contract list and the operator's
/// exposition), and which of them are histograms (whose `_bucket`, `_sum` and `_count` series
/// exist instead of the family name).
struct Exported {
    names: BTreeSet<String>,
    histograms: BTreeSet<String>,
}

impl Exported {
    fn load() -> Self {
        let mut names: BTreeSet<String> = Metrics::names().into_iter().map(String::from).collect();
        // The relay's own exposition tells which families are histograms; observe each
        // histogram once so its family is present in the output.
        let relay = Metrics::new();
        relay.accept_latency.observe(0.001);
        relay.delivery_latency.with_label_values(&["mail/route"]).observe(1.0);
        let relay_types = exposition_types(&relay.encode());
        assert_eq!(
            relay_types.get("mailroute_accept_latency_seconds").map(String::as_str),
            Some("histogram"),
            "the relay's exposition lacks the accept latency histogram"
        );
        let mut histograms = BTreeSet::new();
        // The operator's real exposition (every family present once a route has a verdict).
        let operator = mailroute_operator::metrics::Metrics::new();
        operator.set_verified(&BTreeMap::from([("mail/route".to_string(), true)]));
        let operator_text = operator.render();
        for (name, kind) in relay_types.iter().chain(&exposition_types(&operator_text)) {
            if kind == "histogram" {
                histograms.insert(name.clone());
            }
        }
        let operator_names: BTreeSet<String> = exposition_types(&operator_text).into_keys().collect();
        assert!(operator_names.contains("mailroute_route_verified"), "{operator_text}");
        names.extend(operator_names);
        // The pod identity metrics a relay registers with --pod-identities.
        let pod_identity = prometheus::Registry::new();
        mailroute_relay::inbound::identity_podmap::PodIdentityMetrics::register(&pod_identity).expect("fresh registry");
        names.extend(pod_identity.gather().iter().map(|f| f.name().to_string()));
        names.extend(PROMETHEUS_SERIES.iter().chain(CLUSTER_SERIES).map(|s| s.to_string()));
        Exported { names, histograms }
    }

    /// Whether a series name used in a query exists in some /metrics output.
    fn has_series(&self, series: &str) -> bool {
        if self.names.contains(series) && !self.histograms.contains(series) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            series
                .strip_suffix(suffix)
                .is_some_and(|base| self.histograms.contains(base))
        })
    }
}

/// Family name -> type, from the `# TYPE` lines of a Prometheus text exposition.
fn exposition_types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

/// Every metric name selected anywhere in the expression.
fn metric_names(expr: &Expr, out: &mut BTreeSet<String>) {
    match expr {
        Expr::Aggregate(a) => {
            metric_names(&a.expr, out);
            if let Some(p) = &a.param {
                metric_names(p, out);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::VectorSelector(vs) => {
            out.insert(vs.name.clone().expect("every selector names its metric"));
        }
        Expr::MatrixSelector(ms) => {
            out.insert(ms.vs.name.clone().expect("every selector names its metric"));
        }
        Expr::Call(c) => c.args.args.iter().for_each(|a| metric_names(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// Parses a query (with Grafana's interval variables replaced by durations) and returns the
/// metric names it selects; panics with the query on a syntax error.
fn names_in_query(query: &str) -> BTreeSet<String> {
    let promql = query
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "6h");
    let expr = parser::parse(&promql).unwrap_or_else(|e| panic!("invalid PromQL {promql:?}: {e}"));
    let mut out = BTreeSet::new();
    metric_names(&expr, &mut out);
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read("charts/mailroute/dashboards/mailroute.json")).expect("dashboard is JSON")
}

/// The non-row panels of the dashboard, in order.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

/// (panel title, expr) of every query in the dashboard, template variable queries included.
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or_default().to_string(),
                t["expr"].as_str().expect("target expr").to_string(),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().expect("variable query");
            // label_values(<series selector>, <label>)
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .and_then(|s| s.rsplit_once(','))
                .map(|(selector, _label)| selector.trim())
                .unwrap_or_else(|| panic!("unsupported variable query {q}"));
            out.push((format!("variable {}", v["name"]), inner.to_string()));
        }
    }
    out
}

/// The YAML documents of a multi-document file.
fn yaml_docs(rel: &str) -> Vec<serde_yaml::Value> {
    read(rel)
        .split("\n---\n")
        .map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The rendered PrometheusRule in deploy/monitoring (kept equal to the chart's render).
fn alert_rules() -> Vec<(String, String)> {
    let mut rules = Vec::new();
    for v in yaml_docs("deploy/monitoring/monitoring.yaml") {
        if v["kind"].as_str() != Some("PrometheusRule") {
            continue;
        }
        for group in v["spec"]["groups"].as_sequence().expect("groups") {
            for rule in group["rules"].as_sequence().expect("rules") {
                let alert = rule["alert"].as_str().expect("alert name").to_string();
                let expr = rule["expr"].as_str().expect("alert expr").to_string();
                rules.push((alert, expr));
            }
        }
    }
    rules
}

#[test]
fn dashboard_queries_parse_and_use_only_exported_metrics() {
    let exported = Exported::load();
    let queries = dashboard_queries(&dashboard());
    assert!(queries.len() >= 20, "only {} dashboard queries", queries.len());
    let mut used = BTreeSet::new();
    for (title, q) in &queries {
        for name in names_in_query(q) {
            assert!(
                exported.has_series(&name),
                "dashboard panel {title:?} uses {name}, which no /metrics output has"
            );
            used.insert(name);
        }
    }
    // The dashboard shows every relay family a person needs (counters and gauges alike).
    for must in [
        "mailroute_delivery_attempts_total",
        "mailroute_retries_total",
        "mailroute_bounces_total",
        "mailroute_queue_ready_jobs",
        "mailroute_queue_scheduled_jobs",
        "mailroute_queue_oldest_age_seconds",
        "mailroute_accept_latency_seconds_bucket",
        "mailroute_quota_usage",
        "mailroute_quota_limit",
        "mailroute_messages_received_total",
    ] {
        assert!(used.contains(must), "the dashboard never queries {must}");
    }
}

#[test]
fn dashboard_has_the_required_views() {
    let d = dashboard();
    let queries = dashboard_queries(&d);
    let view = |title: &str| -> Vec<&String> {
        let hits: Vec<&String> = queries.iter().filter(|(t, _)| t == title).map(|(_, q)| q).collect();
        assert!(!hits.is_empty(), "no panel titled {title:?}");
        hits
    };
    let all = |title: &str| view(title).into_iter().cloned().collect::<Vec<_>>().join("\n");
    let delivery = all("Delivery rate by route");
    assert!(
        delivery.contains("by (route)") && delivery.contains(r#"result="delivered""#),
        "{delivery}"
    );
    let depth = all("Queue depth");
    assert!(
        depth.contains("mailroute_queue_ready_jobs") && depth.contains("mailroute_queue_scheduled_jobs"),
        "{depth}"
    );
    assert!(all("Queue age").contains("mailroute_queue_oldest_age_seconds"));
    assert!(all("Retries by route").contains("mailroute_retries_total"));
    let bounces = all("Bounces by code and class");
    assert!(
        bounces.contains("by (code, class)") && bounces.contains("mailroute_bounces_total"),
        "{bounces}"
    );
    let accept = all("Accept latency");
    assert!(
        accept.contains("histogram_quantile") && accept.contains("mailroute_accept_latency_seconds_bucket"),
        "{accept}"
    );
    let quota = all("Quota usage");
    assert!(
        quota.contains("mailroute_quota_usage") && quota.contains("mailroute_quota_limit"),
        "{quota}"
    );
}

#[test]
fn dashboard_is_an_importable_grafana_dashboard() {
    let d = dashboard();
    assert_eq!(d["uid"], "mailroute-overview");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    // Every query goes through the dashboard's data source variable, which must exist.
    let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| (v["name"].as_str().expect("name"), v))
        .collect();
    assert_eq!(vars["datasource"]["type"], "datasource");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeMap::new();
    for p in d["panels"].as_array().expect("panels") {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().expect("x"),
            g["y"].as_u64().expect("y"),
            g["w"].as_u64().expect("w"),
            g["h"].as_u64().expect("h"),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "panel {id} outside the 24-column grid");
        // Panels must not overlap, or Grafana rearranges them on import.
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), id) {
                    panic!("panels {other} and {id} overlap at {cx},{cy}");
                }
            }
        }
        let kind = p["type"].as_str().expect("panel type");
        assert!(
            ["row", "timeseries", "stat", "table", "bargauge"].contains(&kind),
            "panel {id} has type {kind}"
        );
        if kind != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {id} does not use the data source variable"
            );
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "panel {id} has no query");
            for t in targets {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "a query of panel {id} does not use the data source variable"
                );
                assert!(t["refId"].as_str().is_some(), "a query of panel {id} has no refId");
            }
            assert!(
                p["description"].as_str().is_some_and(|s| !s.is_empty()),
                "panel {id} has no description"
            );
        }
    }
}

#[test]
fn shipped_dashboard_configmap_carries_the_sidecar_label_and_the_dashboard() {
    let mut found = false;
    for v in yaml_docs("deploy/monitoring/monitoring.yaml") {
        if v["kind"].as_str() == Some("ConfigMap") && v["metadata"]["labels"]["grafana_dashboard"].as_str() == Some("1")
        {
            let json = v["data"]["mailroute.json"].as_str().expect("dashboard key");
            let shipped: Value = serde_json::from_str(json).expect("shipped dashboard is JSON");
            assert_eq!(
                shipped,
                dashboard(),
                "the ConfigMap does not carry charts/mailroute/dashboards/mailroute.json"
            );
            found = true;
        }
    }
    assert!(
        found,
        "no ConfigMap labelled grafana_dashboard=\"1\" in deploy/monitoring"
    );
}

#[test]
fn alert_rules_parse_and_use_only_exported_metrics() {
    let exported = Exported::load();
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|(a, _)| a.as_str()).collect();
    for must in [
        "MailrouteQueueAgeGrowing",
        "MailrouteBounceRateHigh",
        "MailrouteRouteNotVerified",
        "MailrouteQuotaNearLimit",
        "MailrouteRelayDown",
        "MailrouteDeliveriesStalled",
        "MailrouteOperatorReconcileErrors",
        "MailrouteOperatorStale",
        "MailrouteMailExpired",
        "MailrouteRelaysNotReady",
        "MailrouteRedisDown",
        "MailrouteRedisNearMaxmemory",
        "MailrouteRedisDiskFilling",
    ] {
        assert!(names.contains(must), "no alert {must}; have {names:?}");
    }
    // A counter without series (no attempt since start) must not make "no deliveries" unknowable.
    let stalled = rules
        .iter()
        .find(|(a, _)| a == "MailrouteDeliveriesStalled")
        .map(|(_, e)| e);
    assert!(
        stalled.is_some_and(|e| e.contains("or vector(0)")),
        "MailrouteDeliveriesStalled cannot fire while mailroute_delivery_attempts_total has no series: {stalled:?}"
    );
    for (alert, expr) in &rules {
        let used = names_in_query(expr);
        assert!(!used.is_empty(), "alert {alert} selects no metric");
        for name in used {
            assert!(
                exported.has_series(&name),
                "alert {alert} uses {name}, which no /metrics output has"
            );
        }
    }
}

#[test]
fn metric_name_check_rejects_unknown_and_misused_names() {
    // The checks above must be able to fail: a misspelt family, a histogram suffix on a
    // counter, and a bare histogram family name are all refused.
    let exported = Exported::load();
    assert!(exported.has_series("mailroute_delivery_attempts_total"));
    assert!(exported.has_series("mailroute_delivery_latency_seconds_bucket"));
    assert!(exported.has_series("mailroute_operator_reconcile_duration_seconds_count"));
    assert!(!exported.has_series("mailroute_delivery_attempt_total"));
    assert!(!exported.has_series("mailroute_retries_total_bucket"));
    assert!(!exported.has_series("mailroute_accept_latency_seconds"));
    assert_eq!(
        names_in_query(
            r#"sum by (route) (rate(mailroute_retries_total{namespace=~"$namespace"}[$__rate_interval])) / on() group_left up"#
        ),
        BTreeSet::from(["mailroute_retries_total".to_string(), "up".to_string()])
    );
}

#[test]
fn keda_scales_on_the_relays_ready_stream_and_group() {
    use mailroute_relay::queue::redis::{DEFAULT_PREFIX, GROUP};
    let values: serde_yaml::Value =
        serde_yaml::from_str(&read("charts/mailroute/values.yaml")).expect("values.yaml is YAML");
    let keda = &values["autoscaling"]["keda"];
    assert_eq!(keda["stream"].as_str(), Some(format!("{DEFAULT_PREFIX}ready").as_str()));
    assert_eq!(keda["consumerGroup"].as_str(), Some(GROUP));
}
