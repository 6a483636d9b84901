//! DeliveryWebhook against a real kube-apiserver (see tests/README.md): the CRD's CEL rule
//! refuses a plain-http URL to a non-loopback host; the operator binary, with the chart's RBAC
//! (podIdentities.enabled, which gives it `--redis-url`) and a ServiceAccount token, compiles
//! the webhook into the ConfigMap (its signing key only into the Secret), reports
//! `Accepted`/`Ready`, and once the relays' health hash in a real redis-server says the endpoint
//! fails, `Ready=False EndpointFailing` with the endpoint's answer, the lag and a Warning Event.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use mailroute_tests::k8s::{ControlPlane, apply_crds, eventually, mailroute_resource};
use mailroute_tests::operator::{forbidden, install_chart_rbac_with, start_operator};

const WAIT: Duration = Duration::from_secs(120);
const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn webhooks_resource() -> ApiResource {
    mailroute_resource("DeliveryWebhook", "deliverywebhooks")
}

fn webhook(ns: &str, name: &str, url: &str) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailroute.io/v1alpha1",
        "kind": "DeliveryWebhook",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "url": url,
            "signingKeySecretRef": {"name": "hook", "key": "key"},
            "events": ["delivered", "bounced"],
        },
    }))
    .unwrap()
}

/// The webhook's condition `type_` as (status, reason, message).
fn condition(w: &DynamicObject, type_: &str) -> Option<(String, String, String)> {
    let c = w.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?
        .clone();
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str().unwrap_or_default().to_string(),
    ))
}

#[tokio::test]
async fn a_webhook_is_validated_compiled_and_shows_its_endpoints_health() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let ns = cp.namespace("webhooks").await.unwrap();
    let sa = install_chart_rbac_with(cp, &ns, &ns, &["podIdentities.enabled=true"]).unwrap();
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();
    let redis = mailroute_testkit::RedisServer::start().unwrap();

    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "hook", "namespace": ns},
        "stringData": {"key": KEY},
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let hooks = Api::<DynamicObject>::namespaced_with(admin.clone(), &ns, &webhooks_resource());
    // The CEL rule: plain http only to a loopback host.
    let refused = hooks
        .create(
            &PostParams::default(),
            &webhook(&ns, "plain", "http://hooks.example.com/"),
        )
        .await
        .expect_err("the API server refuses a plain-http URL");
    assert!(refused.to_string().contains("url must be https://"), "{refused}");
    hooks
        .create(&PostParams::default(), &webhook(&ns, "local", "http://127.0.0.1:9/"))
        .await
        .expect("plain http to a loopback host is accepted");
    hooks.delete("local", &Default::default()).await.unwrap();
    let apply = PatchParams::apply("mailroute-tests").force();
    hooks
        .patch(
            "app",
            &apply,
            &Patch::Apply(&webhook(&ns, "app", "https://hooks.example.com/mail")),
        )
        .await
        .unwrap();

    let args = [
        format!("--redis-url={}", redis.url()),
        "--resync-interval=2s".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let operator = std::cell::RefCell::new(start_operator(cp, &kubeconfig, &ns, "operator-webhooks", &args).unwrap());
    let configmaps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
    let result: anyhow::Result<()> = async {
        let cm = eventually("the webhook in the ConfigMap", WAIT, || async {
            operator.borrow_mut().check_running()?;
            let cm = configmaps.get_opt("mailroute-config").await?;
            Ok(cm.filter(|cm| {
                serde_json::to_string(&cm.data)
                    .unwrap_or_default()
                    .contains("hooks.example.com")
            }))
        })
        .await?;
        let text = serde_json::to_string(&cm.data)?;
        anyhow::ensure!(!text.contains("MfKQ9r8"), "the ConfigMap holds the signing key");
        let out = secrets.get("mailroute-secrets").await?;
        let data = out.data.unwrap_or_default();
        let secrets_json = String::from_utf8(data["secrets.json"].0.clone())?;
        anyhow::ensure!(secrets_json.contains(KEY), "the relays' Secret lacks the key");

        eventually("Accepted=True, Ready=True InConfig", WAIT, || async {
            operator.borrow_mut().check_running()?;
            let w = hooks.get("app").await?;
            let ok = condition(&w, "Accepted").is_some_and(|c| c.0 == "True")
                && condition(&w, "Ready").is_some_and(|c| c.0 == "True" && c.1 == "InConfig")
                && w.data["status"]["observedGeneration"] == 1;
            Ok(ok.then_some(()))
        })
        .await?;

        // A relay reports the endpoint failing.
        let mut c = redis.client()?.get_multiplexed_async_connection().await?;
        let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        let _: () = redis::cmd("HSET")
            .arg(format!("{{mailroute}}:webhook:{ns}/app:health"))
            .arg("last_failure_ms")
            .arg(now_ms)
            .arg("last_failure_status")
            .arg(503)
            .arg("last_failure_reply")
            .arg("maintenance until 10:00")
            .arg("lag_ms")
            .arg(42_000)
            .query_async(&mut c)
            .await?;
        let w = eventually("Ready=False EndpointFailing", WAIT, || async {
            operator.borrow_mut().check_running()?;
            let w = hooks.get("app").await?;
            Ok(condition(&w, "Ready")
                .is_some_and(|c| c.0 == "False" && c.1 == "EndpointFailing")
                .then_some(w))
        })
        .await?;
        let ready = condition(&w, "Ready").unwrap_or_default();
        anyhow::ensure!(ready.2.contains("answered 503: maintenance until 10:00"), "{ready:?}");
        let status = &w.data["status"];
        anyhow::ensure!(status["lastFailure"]["httpStatus"] == 503, "{status}");
        anyhow::ensure!(status["lastFailure"]["reply"] == "maintenance until 10:00", "{status}");
        anyhow::ensure!(status["lagSeconds"] == 42, "{status}");
        let events = Api::<Event>::namespaced(admin.clone(), &ns);
        eventually("a Warning Event EndpointFailing", WAIT, || async {
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("EndpointFailing")
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("app")
                })
                .then_some(()))
        })
        .await?;
        Ok(())
    }
    .await;
    let mut operator = operator.into_inner();
    let log = operator.log_text();
    operator.kill();
    if let Err(e) = result {
        let status = hooks.get("app").await.map(|w| w.data["status"].to_string());
        panic!(
            "{e:#}\nwebhook status: {status:?}\noperator log:\n{}",
            operator.log_tail(60)
        );
    }
    let refused = forbidden(&log);
    assert!(
        refused.is_empty(),
        "refused with the chart's RBAC:\n{}",
        refused.join("\n")
    );
}
