//! The status output shown in operator/README.md is what the operator produces: this test runs
//! the plan for a healthy route, a route whose upstream refuses the password, a route whose
//! Secret is missing and a quota with usage (fixed clock), renders it the way `kubectl get` and
//! `kubectl describe` show it, prints it, and fails when the README differs.
//! `MAILROUTE_UPDATE_README=1 cargo test -p mailroute-operator --test integration readme` rewrites the section.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use mailroute_api::quota::{PeriodUsage, QuotaUsage};
use mailroute_api::status::ConnectionTest;
use mailroute_api::{Manifests, SenderQuota, SmtpRoute};
use mailroute_operator::conntest;
use mailroute_operator::plan::{self, Fleet, Inputs, PlannedEvent, SecretData, Usage};
use serde_json::Value;

const BEGIN: &str = "<!-- status-examples:begin -->";
const END: &str = "<!-- status-examples:end -->";

const WORLD: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: gmail-credentials, namespace: mail}
stringData: {username: notifications@example.com, password: abcd efgh ijkl mnop}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: gmail, namespace: mail}
spec:
  provider: gmail
  auth: {secretRef: {name: gmail-credentials}}
  match: {senders: {fromDomains: [example.com]}}
  priority: 10
---
apiVersion: v1
kind: Secret
metadata: {name: o365-mailbox, namespace: mail}
stringData: {username: noreply@contoso.example, password: an-old-password}
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: office365, namespace: mail}
spec:
  provider: office365
  auth: {secretRef: {name: o365-mailbox}}
  fromOverride: noreply@contoso.example
  priority: 20
---
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: carriers, namespace: mail}
spec:
  provider: softbank
  auth: {secretRef: {name: carrier-relay}}
  match: {recipientDomains: [docomo.ne.jp, ezweb.ne.jp, softbank.jp]}
  priority: 5
---
apiVersion: mailroute.io/v1alpha1
kind: SenderQuota
metadata: {name: shop-42, namespace: mail}
spec:
  sender: {authUser: shop-42}
  limits: {perMonth: 10000}
  appliesTo: bulk
  timeZone: Asia/Tokyo
"#;

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

struct World {
    routes: Vec<SmtpRoute>,
    quotas: Vec<SenderQuota>,
    secrets: BTreeMap<(String, String), SecretData>,
    events: Vec<(Timestamp, PlannedEvent)>,
}

impl World {
    fn run(
        &mut self,
        now: Timestamp,
        tests: &BTreeMap<String, ConnectionTest>,
        usage: &BTreeMap<String, QuotaUsage>,
    ) -> plan::Plan {
        let fleet = Fleet::new("mailroute", "mailroute");
        let p = plan::plan(&Inputs {
            fleet: &fleet,
            routes: &self.routes,
            quotas: &self.quotas,
            secrets: &self.secrets,
            live_config: None,
            live_secret: None,
            tests,
            tests_in_flight: &BTreeSet::new(),
            usage: Usage::Read(usage),
            test_interval: Some(Duration::from_secs(3600)),
            now,
            tenancy: &mailroute_api::compile::SINGLE_TENANT,
            webhooks: &[],
            webhook_health: mailroute_operator::webhooks::Health::Disabled,
        });
        for w in &p.route_statuses {
            let r = self.routes.iter_mut().find(|r| r.name_any() == w.name).unwrap();
            r.status = Some(w.status.clone());
        }
        for w in &p.quota_statuses {
            let q = self.quotas.iter_mut().find(|q| q.name_any() == w.name).unwrap();
            q.status = Some(w.status.clone());
        }
        self.events.extend(p.events.iter().cloned().map(|e| (now, e)));
        p
    }
}

/// `kubectl`'s human durations, as far as the examples need them.
fn age(d: i64) -> String {
    match d {
        d if d < 120 => format!("{d}s"),
        d if d < 3 * 3600 => format!("{}m", d / 60),
        d if d < 48 * 3600 => format!("{}h", d / 3600),
        d => format!("{}d", d / 86400),
    }
}

/// The rows of `kubectl get`: a header of the `(name, path)` columns and AGE, then one row per
/// object, all of the same `age`.
fn get_rows<T: serde::Serialize>(cols: &[(&str, &str)], objects: &[T], age: &str) -> Vec<Vec<String>> {
    let header = cols.iter().map(|(h, _)| h.to_string()).chain(["AGE".into()]).collect();
    let mut rows = vec![header];
    for o in objects {
        let v = serde_json::to_value(o).unwrap();
        let mut row: Vec<String> = cols.iter().map(|(_, p)| jsonpath(&v, p)).collect();
        row.push(age.to_string());
        rows.push(row);
    }
    rows
}

/// Columns padded like kubectl's tab writer (three spaces between columns).
fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap())
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == r.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i] + 3)
                }
            })
            .collect();
        out.push_str(line.concat().trim_end());
        out.push('\n');
    }
    out
}

fn jsonpath(v: &Value, path: &str) -> String {
    let mut cur = v;
    for key in path.split('.').filter(|k| !k.is_empty()) {
        if let Some(t) = key.strip_prefix("conditions[type=") {
            let t = t.trim_end_matches(']');
            let found = cur["conditions"]
                .as_array()
                .and_then(|a| a.iter().find(|c| c["type"] == t));
            match found {
                Some(c) => cur = c,
                None => return "<none>".into(),
            }
            continue;
        }
        cur = &cur[key];
    }
    match cur {
        Value::Null => "<none>".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `lastTransitionTime` → `Last Transition Time`.
fn humanize(key: &str) -> String {
    let mut out = String::new();
    for (i, ch) in key.chars().enumerate() {
        if i == 0 {
            out.extend(ch.to_uppercase());
        } else if ch.is_uppercase() {
            out.push(' ');
            out.push(ch);
        } else {
            out.push(ch);
        }
    }
    out
}

/// The generic `kubectl describe` rendering of a map: keys sorted and humanized, values aligned
/// per block, lists of maps printed item after item.
fn describe(v: &Value, indent: usize, out: &mut String) {
    let Value::Object(map) = v else { return };
    let pad = " ".repeat(indent);
    let scalars: Vec<(&String, &Value)> = map.iter().filter(|(_, v)| !v.is_object() && !v.is_array()).collect();
    let width = scalars.iter().map(|(k, _)| humanize(k).len() + 1).max().unwrap_or(0);
    for (k, val) in map {
        match val {
            Value::Object(_) => {
                out.push_str(&format!("{pad}{}:\n", humanize(k)));
                describe(val, indent + 2, out);
            }
            Value::Array(items) => {
                out.push_str(&format!("{pad}{}:\n", humanize(k)));
                for item in items {
                    describe(item, indent + 2, out);
                }
            }
            _ => {
                let text = match val {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.push_str(&format!(
                    "{pad}{:<w$}  {text}\n",
                    format!("{}:", humanize(k)),
                    w = width
                ));
            }
        }
    }
}

fn describe_route(w: &World, name: &str, now: Timestamp) -> String {
    let r = w.routes.iter().find(|r| r.name_any() == name).unwrap();
    let status = serde_json::to_value(r.status.as_ref().unwrap()).unwrap();
    let mut out = format!("$ kubectl describe smtproute {name} -n mail\n...\nStatus:\n");
    describe(&status, 2, &mut out);
    out.push_str("Events:\n");
    let mut rows = vec![
        ["Type", "Reason", "Age", "From", "Message"].map(String::from).to_vec(),
        ["----", "------", "----", "----", "-------"].map(String::from).to_vec(),
    ];
    for (when, e) in &w.events {
        if e.regarding.name.as_deref() != Some(name) {
            continue;
        }
        rows.push(vec![
            if e.warning { "Warning" } else { "Normal" }.into(),
            e.reason.clone(),
            age(now.as_second() - when.as_second()),
            "mailroute-operator".into(),
            e.note.clone(),
        ]);
    }
    for line in table(&rows).lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out
}

fn render() -> String {
    let m = Manifests::from_yaml(WORLD, "default").unwrap();
    let created = "2024-04-26T12:00:00Z";
    let mut routes = m.routes.clone();
    let mut quotas = m.quotas.clone();
    for meta in routes
        .iter_mut()
        .map(|r| &mut r.metadata)
        .chain(quotas.iter_mut().map(|q| &mut q.metadata))
    {
        meta.generation = Some(1);
        meta.creation_timestamp = Some(Time(at(created)));
    }
    let secrets = m
        .secrets
        .names()
        .map(|(ns, n)| {
            let data = m.secrets.get(ns, n).unwrap().clone();
            (
                (ns.clone(), n.clone()),
                SecretData {
                    data,
                    resource_version: "4711".into(),
                },
            )
        })
        .collect();
    let mut w = World {
        routes,
        quotas,
        secrets,
        events: Vec::new(),
    };
    let first = at("2024-05-01T11:58:00Z");
    let now = at("2024-05-01T12:00:00Z");
    let usage = BTreeMap::from([(
        "mail/shop-42".to_string(),
        QuotaUsage {
            month: Some(PeriodUsage {
                used: 7412,
                limit: 10000,
                remaining: 2588,
                resets_at: "2024-06-01T00:00:00+09:00".into(),
            }),
            ..Default::default()
        },
    )]);

    // The operator compiles and applies; the connection tests of the two smarthost routes run.
    let p = w.run(first, &BTreeMap::new(), &usage);
    let mut tests = BTreeMap::new();
    for job in &p.tests {
        let record = if job.route_id == "mail/gmail" {
            ConnectionTest {
                time: "2024-05-01T11:58:01Z".into(),
                result: conntest::SUCCEEDED.into(),
                step: None,
                reply: None,
                error: None,
                fingerprint: Some(job.fingerprint.clone()),
                test_message: None,
                request_id: None,
                replies: Vec::new(),
            }
        } else {
            ConnectionTest {
                time: "2024-05-01T11:58:02Z".into(),
                result: conntest::FAILED.into(),
                step: Some("auth".into()),
                reply: Some("535 5.7.3 Authentication unsuccessful [SN4PR0601CA0011.namprd06.prod.outlook.com]".into()),
                error: None,
                fingerprint: Some(job.fingerprint.clone()),
                test_message: None,
                request_id: None,
                replies: Vec::new(),
            }
        };
        tests.insert(job.route_id.clone(), record);
    }
    w.run(now, &tests, &usage);

    let route_cols = [
        ("NAME", ".metadata.name"),
        ("PROVIDER", ".spec.provider"),
        ("HOST", ".status.host"),
        ("PORT", ".status.port"),
        ("DOMAINS", ".spec.match.recipientDomains"),
        ("PRIORITY", ".spec.priority"),
        ("READY", ".status.conditions[type=Ready].status"),
        ("VERIFIED", ".status.conditions[type=Verified].status"),
    ];
    let object_age = age(now.as_second() - at(created).as_second());
    let mut sorted = w.routes.clone();
    sorted.sort_by_key(|r| r.name_any());
    let mut out = String::from("```console\n$ kubectl get smtproutes -n mail\n");
    out.push_str(&table(&get_rows(&route_cols, &sorted, &object_age)));
    out.push_str("```\n\nA healthy route:\n\n```console\n");
    out.push_str(&describe_route(&w, "gmail", now));
    out.push_str("```\n\nA route whose upstream refuses the credentials (it stays in the configuration; the\nrelay would get the same answer):\n\n```console\n");
    out.push_str(&describe_route(&w, "office365", now));
    out.push_str(
        "```\n\nA route whose Secret does not exist (left out of the configuration until it does):\n\n```console\n",
    );
    out.push_str(&describe_route(&w, "carriers", now));

    let quota_cols = [
        ("NAME", ".metadata.name"),
        ("SENDER", ".status.sender"),
        ("LIMITS", ".status.limits"),
        ("USED THIS MONTH", ".status.usage.month.used"),
        ("REMAINING", ".status.usage.month.remaining"),
        ("READY", ".status.conditions[type=Ready].status"),
    ];
    out.push_str("```\n\nQuota usage, read from the relays (`Remaining` is a wide column):\n\n```console\n$ kubectl get senderquotas -n mail -o wide\n");
    out.push_str(&table(&get_rows(&quota_cols, &w.quotas, &object_age)));
    out.push_str("```\n");
    out
}

#[test]
fn readme_shows_the_status_the_operator_writes() {
    let rendered = render();
    println!("{rendered}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (Some(b), Some(e)) = (readme.find(BEGIN), readme.find(END)) else {
        panic!("operator/README.md lacks the {BEGIN} … {END} section");
    };
    let current = &readme[b + BEGIN.len()..e];
    let wanted = format!("\n{rendered}");
    if std::env::var("MAILROUTE_UPDATE_README").is_ok_and(|v| v == "1") {
        let updated = format!("{}{BEGIN}{wanted}{}", &readme[..b], &readme[e..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert!(
        current == wanted,
        "operator/README.md is out of date: run MAILROUTE_UPDATE_README=1 cargo test -p mailroute-operator --test integration readme"
    );
}
