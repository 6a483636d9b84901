//! The reconcile against a mocked API server (tower-test): asserts the exact requests — reads in
//! order, the server-side-apply patches of the Secret and ConfigMap with field manager
//! `mailroute-operator` and `force`, the status patch (the operator's own field manager,
//! `mailroute-operator.<namespace>.<fleet>`) and the Events — and that a failed list or
//! an unchanged world causes no write at all.

use std::collections::BTreeMap;
use std::pin::pin;

use crate::support::list_failed;
use base64::Engine;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use mailroute_api::Manifests;
use mailroute_operator::metrics::Metrics;
use mailroute_operator::plan::Fleet;
use mailroute_operator::reconcile::{Reconciler, Settings};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

type MockHandle = Handle<Request<Body>, Response<Body>>;

const ROUTE: &str = r#"
apiVersion: mailroute.io/v1alpha1
kind: SmtpRoute
metadata: {name: relay, namespace: mail, uid: 9d1c-route, generation: 2, resourceVersion: "41"}
spec:
  host: smtp.example.com
  tls: {mode: starttls}
  auth: {secretRef: {name: creds}}
---
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: mail}
stringData: {username: app@example.com, password: pw-123}
"#;

fn route_json(status: Option<Value>) -> Value {
    let mut r = json!({
        "apiVersion": "mailroute.io/v1alpha1",
        "kind": "SmtpRoute",
        "metadata": {"name": "relay", "namespace": "mail", "uid": "9d1c-route", "generation": 2, "resourceVersion": "41"},
        "spec": {"host": "smtp.example.com", "tls": {"mode": "starttls"}, "auth": {"secretRef": {"name": "creds"}}}
    });
    if let Some(s) = status {
        r["status"] = s;
    }
    r
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "mailroute.io/v1alpha1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": "50"}, "items": items})
}

fn creds_secret() -> Value {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "creds", "namespace": "mail", "resourceVersion": "17"},
        "type": "Opaque",
        "data": {"username": b64("app@example.com"), "password": b64("pw-123")}
    })
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// The compiled documents, straight from the api crate: what the operator must ship.
fn compiled() -> (String, String, String) {
    let c = Manifests::from_yaml(ROUTE, "default").unwrap().compile();
    (
        c.config.to_canonical_json(),
        c.config.content_hash(),
        c.secrets.to_canonical_json(),
    )
}

/// The status a fresh reconcile writes; `time` is its lastTransitionTime.
fn expected_status(time: &str) -> Value {
    let cond = |t: &str, s: &str, reason: &str, message: &str| {
        json!({"type": t, "status": s, "reason": reason, "message": message,
               "lastTransitionTime": time, "observedGeneration": 2})
    };
    json!({
        "conditions": [
            cond("Accepted", "True", "Valid", "the spec is valid"),
            cond("Ready", "True", "InConfig", "in the relay configuration mailroute-system/mailroute-config"),
            cond("Verified", "Unknown", "Disabled", "connection tests are turned off"),
        ],
        "observedGeneration": 2,
        "host": "smtp.example.com",
        "port": 587
    })
}

struct Seen {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Value,
}

async fn next(
    handle: &mut std::pin::Pin<&mut MockHandle>,
    status: StatusCode,
    reply: impl FnOnce(&Value) -> Value,
) -> Seen {
    let (request, send) = handle
        .next_request()
        .await
        .expect("the operator made no further request");
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.unwrap();
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let query = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let response = reply(&body);
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&response).unwrap()))
            .unwrap(),
    );
    Seen {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query,
        content_type: parts
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string()),
        body,
    }
}

fn reconciler() -> (std::sync::Arc<Reconciler>, MockHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let settings = Settings {
        fleet: Fleet::new("mailroute", "mailroute-system"),
        namespaces: vec!["mail".into()],
        test_interval: None,
        instance: "operator-0".into(),
        platform_namespaces: None,
        identity: mailroute_operator::fleets::Identity {
            namespace: "mailroute-system".into(),
            fleet: "mailroute".into(),
            claim_unlabelled: true,
        },
        rival_window: std::time::Duration::from_secs(120),
    };
    (Reconciler::new(client, settings, None, Metrics::new()), handle)
}

fn assert_ssa(seen: &Seen, path: &str, manager: &str) {
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(seen.path, path);
    assert_eq!(seen.query.get("fieldManager").map(String::as_str), Some(manager));
    assert_eq!(seen.query.get("force").map(String::as_str), Some("true"));
    assert_eq!(seen.content_type.as_deref(), Some("application/apply-patch+yaml"));
}

#[tokio::test]
async fn a_first_reconcile_makes_exactly_these_requests() {
    let (r, handle) = reconciler();
    let (config_json, hash, secrets_json) = compiled();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        let ok = StatusCode::OK;
        let s = next(&mut h, ok, |_| list("SmtpRoute", vec![route_json(None)])).await;
        assert_eq!(
            (s.method, s.path.as_str()),
            (Method::GET, "/apis/mailroute.io/v1alpha1/namespaces/mail/smtproutes")
        );
        let s = next(&mut h, ok, |_| list("SenderQuota", vec![])).await;
        assert_eq!(s.path, "/apis/mailroute.io/v1alpha1/namespaces/mail/senderquotas");
        let s = next(&mut h, ok, |_| list("DeliveryWebhook", vec![])).await;
        assert_eq!(s.path, "/apis/mailroute.io/v1alpha1/namespaces/mail/deliverywebhooks");
        let s = next(&mut h, ok, |_| creds_secret()).await;
        assert_eq!(
            (s.method, s.path.as_str()),
            (Method::GET, "/api/v1/namespaces/mail/secrets/creds")
        );
        let (nf, body) = not_found();
        let s = next(&mut h, nf, |_| body.clone()).await;
        assert_eq!(
            s.path,
            "/api/v1/namespaces/mailroute-system/configmaps/mailroute-config"
        );
        let s = next(&mut h, nf, |_| body.clone()).await;
        assert_eq!(s.path, "/api/v1/namespaces/mailroute-system/secrets/mailroute-secrets");

        let labels = json!({
            "app.kubernetes.io/component": "relay-config",
            "app.kubernetes.io/managed-by": "mailroute-operator",
            "app.kubernetes.io/part-of": "mailroute",
            "mailroute.io/fleet": "mailroute"
        });
        // The Secret first, so credentials are there before the routes using them.
        let s = next(&mut h, ok, |b| b.clone()).await;
        assert_ssa(
            &s,
            "/api/v1/namespaces/mailroute-system/secrets/mailroute-secrets",
            "mailroute-operator",
        );
        let secrets_hash = mailroute_api::config::short_hash(secrets_json.as_bytes());
        assert_eq!(
            s.body,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "mailroute-secrets", "namespace": "mailroute-system", "labels": labels,
                             "annotations": {"mailroute.io/config-hash": secrets_hash}},
                "type": "Opaque",
                "data": {"secrets.json": base64::engine::general_purpose::STANDARD.encode(&secrets_json)}
            })
        );
        assert!(secrets_json.contains("pw-123"));

        let s = next(&mut h, ok, |b| b.clone()).await;
        assert_ssa(
            &s,
            "/api/v1/namespaces/mailroute-system/configmaps/mailroute-config",
            "mailroute-operator",
        );
        assert_eq!(
            s.body,
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "mailroute-config", "namespace": "mailroute-system", "labels": labels,
                             "annotations": {"mailroute.io/config-hash": hash}},
                "data": {"relay.json": config_json}
            })
        );

        let s = next(&mut h, ok, |b| route_json(Some(b["status"].clone()))).await;
        assert_ssa(
            &s,
            "/apis/mailroute.io/v1alpha1/namespaces/mail/smtproutes/relay/status",
            "mailroute-operator.mailroute-system.mailroute",
        );
        let time = s.body["status"]["conditions"][0]["lastTransitionTime"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(time.parse::<k8s_openapi::jiff::Timestamp>().is_ok(), "{time}");
        assert_eq!(
            s.body,
            json!({"apiVersion": "mailroute.io/v1alpha1", "kind": "SmtpRoute", "status": expected_status(&time)})
        );

        for reason in ["Valid", "InConfig"] {
            let s = next(&mut h, StatusCode::CREATED, |b| b.clone()).await;
            assert_eq!(
                (s.method, s.path.as_str()),
                (Method::POST, "/apis/events.k8s.io/v1/namespaces/mail/events")
            );
            assert_eq!(s.body["reason"], reason);
            assert_eq!(s.body["type"], "Normal");
            assert_eq!(s.body["action"], "Compile");
            assert_eq!(s.body["reportingController"], "mailroute-operator");
            assert_eq!(s.body["reportingInstance"], "operator-0");
            assert_eq!(
                s.body["regarding"],
                json!({"apiVersion": "mailroute.io/v1alpha1", "kind": "SmtpRoute", "name": "relay", "namespace": "mail", "uid": "9d1c-route"})
            );
        }
        assert!(h.next_request().await.is_none(), "an unexpected further request");
    });
    let outcome = r.reconcile().await.unwrap();
    assert!(outcome.wrote_config && outcome.wrote_secret);
    assert_eq!((outcome.status_writes, outcome.events), (1, 2));
    drop(r);
    server.await.unwrap();
}

#[tokio::test]
async fn a_failed_list_stops_before_any_write() {
    let (r, handle) = reconciler();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        let s = next(&mut h, StatusCode::OK, |_| list("SmtpRoute", vec![route_json(None)])).await;
        assert!(s.path.ends_with("/smtproutes"));
        let s = next(&mut h, StatusCode::SERVICE_UNAVAILABLE, |_| {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "code": 503, "message": "etcd leader changed"})
        })
        .await;
        assert!(s.path.ends_with("/senderquotas"));
        assert!(h.next_request().await.is_none(), "a request after the failed list");
    });
    let err = r.reconcile().await.unwrap_err();
    assert!(list_failed(&err, "SenderQuotas"), "{err}");
    assert!(err.to_string().contains("etcd leader changed"), "{err}");
    drop(r);
    server.await.unwrap();
}

#[tokio::test]
async fn an_unchanged_world_is_only_read() {
    let (r, handle) = reconciler();
    let (config_json, hash, secrets_json) = compiled();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        let labels = json!({
            "app.kubernetes.io/component": "relay-config",
            "app.kubernetes.io/managed-by": "mailroute-operator",
            "app.kubernetes.io/part-of": "mailroute",
            "mailroute.io/fleet": "mailroute",
            "added-by-someone": "else"
        });
        let status = expected_status("2024-05-01T12:00:00Z");
        next(&mut h, StatusCode::OK, |_| {
            list("SmtpRoute", vec![route_json(Some(status))])
        })
        .await;
        next(&mut h, StatusCode::OK, |_| list("SenderQuota", vec![])).await;
        next(&mut h, StatusCode::OK, |_| list("DeliveryWebhook", vec![])).await;
        next(&mut h, StatusCode::OK, |_| creds_secret()).await;
        next(&mut h, StatusCode::OK, |_| {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "mailroute-config", "namespace": "mailroute-system", "labels": labels,
                                "annotations": {"mailroute.io/config-hash": hash}},
                   "data": {"relay.json": config_json}})
        })
        .await;
        next(&mut h, StatusCode::OK, |_| {
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "mailroute-secrets", "namespace": "mailroute-system", "labels": labels,
                                "annotations": {"mailroute.io/config-hash": mailroute_api::config::short_hash(secrets_json.as_bytes())}},
                   "data": {"secrets.json": base64::engine::general_purpose::STANDARD.encode(&secrets_json)}})
        })
        .await;
        assert!(h.next_request().await.is_none(), "a write although nothing changed");
    });
    let outcome = r.reconcile().await.unwrap();
    assert!(!outcome.wrote_config && !outcome.wrote_secret);
    assert_eq!((outcome.status_writes, outcome.events), (0, 0));
    drop(r);
    server.await.unwrap();
}
