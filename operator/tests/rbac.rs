//! `deploy/base/operator-rbac.yaml` grants every request the operator makes, and nothing it does
//! not need: a reconcile, the leader election, the trigger watches and the pod identity map's Pod
//! watch run against a mocked API server that records each request as (verb, group, resource,
//! namespace); each must be allowed by the file, and every rule in the file must be used by at
//! least one request.

use std::collections::BTreeSet;
use std::path::Path;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use mailroute_operator::lease::{Elector, Params};
use mailroute_operator::metrics::Metrics;
use mailroute_operator::plan::Fleet;
use mailroute_operator::reconcile::{Reconciler, Settings};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

const NS: &str = "mailroute";

/// (verb, apiGroup, resource incl. subresource, namespace or "" for all namespaces)
type Access = (String, String, String, String);

fn classify(method: &Method, path: &str, query: &str) -> Vec<Access> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _v, rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => panic!("unexpected path {path}"),
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] => (*ns, rest),
        rest => ("", rest),
    };
    let (resource, named) = match rest {
        [r] => (r.to_string(), false),
        [r, _name] => (r.to_string(), true),
        [r, _name, sub] => (format!("{r}/{sub}"), true),
        _ => panic!("unexpected path {path}"),
    };
    let watch = query.split('&').any(|kv| kv == "watch=true");
    let verbs: &[&str] = match (method.as_str(), named, watch) {
        ("GET", false, true) => &["watch"],
        ("GET", false, false) => &["list"],
        ("GET", true, _) => &["get"],
        ("POST", _, _) => &["create"],
        ("PUT", _, _) => &["update"],
        // Server-side apply of an object that may not exist yet is authorized as create too.
        ("PATCH", _, _) if query.contains("fieldManager") && !resource.contains('/') => &["patch", "create"],
        ("PATCH", _, _) => &["patch"],
        (m, _, _) => panic!("unexpected method {m}"),
    };
    verbs
        .iter()
        .map(|v| (v.to_string(), group.to_string(), resource.clone(), ns.to_string()))
        .collect()
}

/// (verb, group, resource, namespace scope) granted by the file; "" scope = all namespaces.
fn granted() -> BTreeSet<Access> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/operator-rbac.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        let scope = match v["kind"].as_str() {
            Some("ClusterRole") => String::new(),
            Some("Role") => v["metadata"]["namespace"].as_str().unwrap().to_string(),
            _ => continue,
        };
        for rule in v["rules"].as_array().unwrap() {
            assert!(rule.get("resourceNames").is_none());
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        out.insert((
                            verb.as_str().unwrap().into(),
                            g.as_str().unwrap().into(),
                            r.as_str().unwrap().into(),
                            scope.clone(),
                        ));
                    }
                }
            }
        }
    }
    out
}

fn allowed(granted: &BTreeSet<Access>, a: &Access) -> Option<Access> {
    let cluster = (a.0.clone(), a.1.clone(), a.2.clone(), String::new());
    if granted.contains(&cluster) {
        return Some(cluster);
    }
    if !a.3.is_empty() && granted.contains(a) {
        return Some(a.clone());
    }
    None
}

fn route() -> Value {
    json!({
        "apiVersion": "mailroute.io/v1alpha1", "kind": "SmtpRoute",
        "metadata": {"name": "r", "namespace": "apps", "uid": "u1", "generation": 1, "resourceVersion": "3"},
        "spec": {"host": "smtp.example.com", "tls": {"mode": "starttls"}, "auth": {"secretRef": {"name": "creds"}}}
    })
}

fn quota() -> Value {
    json!({
        "apiVersion": "mailroute.io/v1alpha1", "kind": "SenderQuota",
        "metadata": {"name": "q", "namespace": "apps", "uid": "u2", "generation": 1, "resourceVersion": "4"},
        "spec": {"sender": {"authUser": "shop"}, "limits": {"perMonth": 10}}
    })
}

fn webhook() -> Value {
    json!({
        "apiVersion": "mailroute.io/v1alpha1", "kind": "DeliveryWebhook",
        "metadata": {"name": "w", "namespace": "apps", "uid": "u3", "generation": 1, "resourceVersion": "6"},
        "spec": {"url": "https://hooks.apps.example/", "signingKeySecretRef": {"name": "hook", "key": "key"}, "events": ["delivered"]}
    })
}

/// A generic API server: lists hold one route and one quota, the referenced Secret exists, the
/// outputs and the Lease start absent, writes echo their body, watches end at once.
fn respond(
    method: &Method,
    path: &str,
    query: &str,
    body: &Value,
    lease: &Mutex<Option<Value>>,
) -> (StatusCode, Value) {
    let not_found =
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
    let list = |items: Vec<Value>| json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "10"}, "items": items});
    if query.contains("watch=true") {
        return (StatusCode::OK, Value::Null);
    }
    match (method.as_str(), path) {
        ("GET", p) if p.ends_with("/smtproutes") => (StatusCode::OK, list(vec![route()])),
        ("GET", p) if p.ends_with("/senderquotas") => (StatusCode::OK, list(vec![quota()])),
        ("GET", p) if p.ends_with("/deliverywebhooks") => (StatusCode::OK, list(vec![webhook()])),
        ("GET", p) if p.ends_with("/secrets") || p.ends_with("/configmaps") || p.ends_with("/pods") => {
            (StatusCode::OK, list(vec![]))
        }
        ("GET", "/api/v1/namespaces") => (
            StatusCode::OK,
            list(vec![
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps", "labels": {"team": "apps"}}}),
            ]),
        ),
        ("GET", "/api/v1/namespaces/apps/secrets/creds") => (
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "apps", "resourceVersion": "5"},
                   "data": {"username": "dQ==", "password": "cA=="}}),
        ),
        ("GET", "/apis/apps/v1/namespaces/mailroute/deployments/mailroute-operator") => (
            StatusCode::OK,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "mailroute-operator", "namespace": "mailroute", "uid": "d-1"}}),
        ),
        ("GET", p) if p.contains("/leases/") => match lease.lock().unwrap().clone() {
            Some(l) => (StatusCode::OK, l),
            None => (StatusCode::NOT_FOUND, not_found),
        },
        ("GET", _) => (StatusCode::NOT_FOUND, not_found),
        ("POST" | "PUT", p) if p.contains("/leases") => {
            let mut l = body.clone();
            l["metadata"]["resourceVersion"] = json!("7");
            *lease.lock().unwrap() = Some(l.clone());
            (StatusCode::OK, l)
        }
        ("PATCH", p) if p.ends_with("/status") => {
            let mut o = if p.contains("smtproutes") {
                route()
            } else if p.contains("deliverywebhooks") {
                webhook()
            } else {
                quota()
            };
            o["status"] = body["status"].clone();
            (StatusCode::OK, o)
        }
        _ => (StatusCode::OK, body.clone()),
    }
}

fn serve(handle: Handle<Request<Body>, Response<Body>>, seen: Arc<Mutex<Vec<Access>>>) -> tokio::task::JoinHandle<()> {
    let lease = Arc::new(Mutex::new(None));
    tokio::spawn(async move {
        let mut h = pin!(handle);
        while let Some((request, send)) = h.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (path, query) = (
                parts.uri.path().to_string(),
                parts.uri.query().unwrap_or("").to_string(),
            );
            seen.lock().unwrap().extend(classify(&parts.method, &path, &query));
            let (status, reply) = respond(&parts.method, &path, &query, &body, &lease);
            let bytes = if reply.is_null() {
                Vec::new()
            } else {
                serde_json::to_vec(&reply).unwrap()
            };
            send.send_response(Response::builder().status(status).body(Body::from(bytes)).unwrap());
        }
    })
}

#[tokio::test]
async fn the_rbac_file_grants_exactly_what_the_operator_uses() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = serve(handle, seen.clone());
    let client = Client::new(service, "default");

    // The outputs' owner (--owner-deployment), read once at start-up.
    let mut fleet = Fleet::new("mailroute", NS);
    fleet.owner = Some(
        mailroute_operator::app::owner(&client, NS, "mailroute-operator")
            .await
            .unwrap(),
    );

    // Reconciles creating the outputs, writing statuses and Events.
    let settings = Settings {
        fleet,
        namespaces: Vec::new(),
        test_interval: None,
        instance: "operator-0".into(),
        platform_namespaces: Some([NS.to_string()].into()),
        identity: mailroute_operator::fleets::Identity {
            namespace: NS.into(),
            fleet: "mailroute".into(),
            claim_unlabelled: true,
        },
        rival_window: std::time::Duration::from_secs(120),
    };
    let reconciler = Reconciler::new(client.clone(), settings, None, Metrics::new());
    let outcome = reconciler.reconcile().await.unwrap();
    assert!(outcome.wrote_config && outcome.events > 0);
    // This server never stores statuses, so the same Events recur: published as a series (patch).
    assert!(reconciler.reconcile().await.unwrap().events > 0);

    // Leader election: create, renew, release.
    let mut elector = Elector::new(client.clone(), Params::new(NS, "mailroute-operator", "operator-0"));
    assert!(elector.try_acquire_or_renew().await);
    assert!(elector.try_acquire_or_renew().await);
    elector.release().await.unwrap();

    // The trigger watches: each lists and then watches.
    let mut triggers = mailroute_operator::controller::triggers(&client, reconciler.clone());
    let watched = |s: &Vec<Access>| {
        let w: BTreeSet<_> = s
            .iter()
            .filter(|a| a.0 == "watch")
            .map(|a| (a.2.clone(), a.3.clone()))
            .collect();
        w.len()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // smtproutes, senderquotas, deliverywebhooks, secrets, namespaces (all namespaces), and the
    // two outputs by name.
    while watched(&seen.lock().unwrap()) < 7 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watches not started: {:?}",
            seen.lock().unwrap()
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), triggers.next()).await;
    }
    drop(triggers);

    // The pod identity map (--redis-url): Pods of every namespace, listed then watched. As a
    // follower it never opens Redis, so the URL may point nowhere.
    let (_leading_tx, leading) = tokio::sync::watch::channel(false);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(mailroute_operator::podpublish::run(
        client.clone(),
        mailroute_operator::podpublish::Settings {
            redis_url: "redis://127.0.0.1:1".into(),
            prefix: "{mailroute}:".into(),
            namespaces: Vec::new(),
            interval: Duration::from_secs(2),
            identity: "operator-0".into(),
        },
        Metrics::new(),
        leading,
        shutdown,
    ));
    let pods_watched = |s: &Vec<Access>| s.iter().any(|a| a.0 == "watch" && a.2 == "pods");
    while !pods_watched(&seen.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Pod watch not started: {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send_replace(true);
    publisher.await.unwrap();
    drop(reconciler);
    drop(elector);
    drop(client);
    server.await.unwrap();

    let granted = granted();
    let seen: BTreeSet<Access> = seen.lock().unwrap().iter().cloned().collect();
    let mut used = BTreeSet::new();
    for a in &seen {
        match allowed(&granted, a) {
            Some(rule) => {
                used.insert(rule);
            }
            None => panic!("the operator needs {a:?}, which deploy/base/operator-rbac.yaml does not grant"),
        }
    }
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(unused.is_empty(), "granted but never used: {unused:?}");
}
