//! The controller loop end to end on an in-memory API: it reconciles while leading, runs the due
//! connection test in the background against the scriptable SMTP server, writes the verdict,
//! reacts to a trigger after a credentials change and stops on shutdown.

use std::time::Duration;

use crate::support::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::PostParams;
use mailroute_api::SmtpRoute;
use mailroute_operator::controller::{self, LoopSettings};
use mailroute_testkit::{Script, SmtpServer, TestPki};
use tokio::sync::watch;

/// Polls the route until `done` holds, failing after `deadline`.
async fn wait_route(client: &kube::Client, deadline: Duration, done: impl Fn(&SmtpRoute) -> bool) -> SmtpRoute {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let r = route(client, "mail", "upstream").await;
        if done(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out; last status {:?}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn verified(r: &SmtpRoute) -> Option<(String, String)> {
    let s = r.status.as_ref()?;
    let c = s.conditions.iter().find(|c| c.type_ == "Verified")?;
    Some((c.status.to_string(), c.reason.clone()))
}

#[tokio::test]
async fn reconciles_tests_and_reacts_while_leading_and_stops_on_shutdown() {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().implicit_tls(pki.server_config()).auth("relay", "pw")).unwrap();
    let mut objs = objects(&upstream_route(server.port(), "implicit", ""));
    add_upstream_secrets(&mut objs, &pki.ca_pem, "relay", "pw");
    let client = fake_client(objs, None).await;
    let reconciler = reconciler(client.clone(), Some(Duration::from_secs(3600)), None);

    let (trigger, triggers) = futures::channel::mpsc::unbounded::<()>();
    let (leading_tx, leading) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let settings = LoopSettings {
        debounce: Duration::from_millis(10),
        resync: Duration::from_secs(3600),
        max_concurrent_tests: 2,
        conntest: conntest_settings(),
    };
    let task = tokio::spawn(controller::run(
        reconciler.clone(),
        triggers.boxed(),
        settings,
        leading,
        stop,
    ));

    // Reconciling starts when this replica becomes the leader.
    let cms = Api::<ConfigMap>::namespaced(client.clone(), OPERATOR_NS);
    leading_tx.send_replace(true);
    let r = wait_route(&client, Duration::from_secs(20), |r| {
        verified(r) == Some(("True".into(), "Connected".into()))
    })
    .await;
    assert_eq!(r.status.unwrap().last_connection_test.unwrap().result, "Succeeded");
    assert!(cms.get_opt("mailroute-config").await.unwrap().is_some());
    assert_eq!(server.connections(), 1, "one test, not one per reconcile");

    // New (wrong) password plus a trigger: tested again at once, the reply shows.
    let secrets = Api::<Secret>::namespaced(client.clone(), "mail");
    let mut s = secrets.get("upstream-creds").await.unwrap();
    s.data = secret("mail", "x", &[("username", "relay"), ("password", "old")]).data;
    secrets
        .replace("upstream-creds", &PostParams::default(), &s)
        .await
        .unwrap();
    trigger.unbounded_send(()).unwrap();
    let r = wait_route(&client, Duration::from_secs(20), |r| {
        verified(r) == Some(("False".into(), "AuthenticationFailed".into()))
    })
    .await;
    let last = r.status.unwrap().last_connection_test.unwrap();
    assert_eq!(
        last.reply.as_deref(),
        Some("535 5.7.8 Username and password not accepted.")
    );
    assert_eq!(server.connections(), 2);

    stop_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the loop did not stop on shutdown")
        .unwrap();
}
