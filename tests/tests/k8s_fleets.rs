//! Two releases in one cluster (README "Two releases in one cluster"): the operators of fleets
//! `prod` and `staging`, each in its own namespace with the chart's RBAC, watch the same
//! namespace of routes. Each compiles only the routes labelled for its fleet; an unlabelled route
//! both claim is refused by both (`Accepted=False`, reason `FleetConflict`, a Warning Event) and
//! compiled by neither; labelling it for `prod` hands it to prod alone. And an upgraded operator
//! takes statuses over from the pre-fleet field manager without leaving its entry behind.

use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use mailroute_tests::k8s::{ControlPlane, Process, apply_crds, eventually, free_port, route_resource};
use mailroute_tests::operator::{binary, forbidden, install_chart_rbac};

const WAIT: Duration = Duration::from_secs(90);

fn route(ns: &str, name: &str, fleet: Option<&str>) -> DynamicObject {
    let labels = fleet.map_or(serde_json::json!({}), |f| serde_json::json!({"mailroute.io/fleet": f}));
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailroute.io/v1alpha1",
        "kind": "SmtpRoute",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "host": "127.0.0.1",
            "port": 2,
            "tls": {"mode": "none"},
            "match": {"recipientDomains": [format!("{name}.fleets.example")]},
            "priority": 10,
        },
    }))
    .unwrap()
}

/// The operator of fleet `fleet` in `ns`, watching only `watch`, resyncing every 2 s.
fn start(cp: &ControlPlane, kubeconfig: &std::path::Path, ns: &str, fleet: &str, watch: &str) -> Process {
    let health = free_port().unwrap();
    let mut cmd = Command::new(binary("mailroute-operator").unwrap());
    cmd.env_clear()
        .env("KUBECONFIG", kubeconfig)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .args([
            "run".to_string(),
            format!("--fleet={fleet}"),
            format!("--namespace={ns}"),
            format!("--health-listen=127.0.0.1:{health}"),
            format!("--lease-name={fleet}-operator"),
            format!("--identity={fleet}-operator"),
            "--connection-tests=false".to_string(),
            "--debounce=200ms".to_string(),
            "--resync-interval=2s".to_string(),
            format!("--watch-namespaces={watch}"),
        ])
        .stdin(Stdio::null());
    Process::start(fleet, cmd, cp.dir.join(format!("{ns}-{fleet}.log"))).unwrap()
}

/// The route ids compiled into `<fleet>-config`.
async fn compiled(configmaps: &Api<ConfigMap>, fleet: &str) -> anyhow::Result<Option<Vec<String>>> {
    let Some(cm) = configmaps.get_opt(&format!("{fleet}-config")).await? else {
        return Ok(None);
    };
    let Some(json) = cm.data.as_ref().and_then(|d| d.get("relay.json")) else {
        return Ok(None);
    };
    let cfg: serde_json::Value = serde_json::from_str(json)?;
    let mut ids: Vec<String> = cfg["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    Ok(Some(ids))
}

/// The route's `Accepted` condition as (status, reason, message).
fn accepted(route: &DynamicObject) -> Option<(String, String, String)> {
    let c = route.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str()?.to_string(),
    ))
}

/// The field managers owning part of the route's status.
fn status_managers(route: &DynamicObject) -> Vec<String> {
    route
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter_map(|m| m.manager.clone())
        .collect()
}

#[tokio::test]
async fn two_fleets_in_one_cluster_stay_apart_and_refuse_a_route_both_claim() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let prod_ns = cp.namespace("fleet-prod").await.unwrap();
    let staging_ns = cp.namespace("fleet-staging").await.unwrap();
    let apps = cp.namespace("fleet-apps").await.unwrap();
    let prod_sa = install_chart_rbac(cp, &prod_ns, &prod_ns).unwrap();
    let staging_sa = install_chart_rbac(cp, &staging_ns, &staging_ns).unwrap();
    let prod_kc = cp.service_account_kubeconfig(&prod_ns, &prod_sa).await.unwrap();
    let staging_kc = cp.service_account_kubeconfig(&staging_ns, &staging_sa).await.unwrap();

    let routes = Api::<DynamicObject>::namespaced_with(admin.clone(), &apps, &route_resource());
    let apply = PatchParams::apply("mailroute-tests").force();
    for (name, fleet) in [
        ("for-prod", Some("prod")),
        ("for-staging", Some("staging")),
        ("shared", None),
    ] {
        routes
            .patch(name, &apply, &Patch::Apply(&route(&apps, name, fleet)))
            .await
            .unwrap();
    }
    let operators = std::cell::RefCell::new([
        start(cp, &prod_kc, &prod_ns, "prod", &apps),
        start(cp, &staging_kc, &staging_ns, "staging", &apps),
    ]);
    let prod_cms = Api::<ConfigMap>::namespaced(admin.clone(), &prod_ns);
    let staging_cms = Api::<ConfigMap>::namespaced(admin.clone(), &staging_ns);
    let id = |name: &str| format!("{apps}/{name}");
    let prod_manager = format!("mailroute-operator.{prod_ns}.prod");
    let staging_manager = format!("mailroute-operator.{staging_ns}.staging");
    let check = || -> anyhow::Result<()> {
        for o in operators.borrow_mut().iter_mut() {
            o.check_running()?;
        }
        Ok(())
    };

    let result: anyhow::Result<()> = async {
        // The conflict: both refuse the shared route with the same condition, naming both.
        let (_, _, message) = eventually("the shared route refused with FleetConflict", WAIT, || async {
            check()?;
            let r = routes.get("shared").await?;
            Ok(accepted(&r).filter(|(s, reason, m)| {
                s == "False" && reason == "FleetConflict" && m.contains(&prod_manager) && m.contains(&staging_manager)
            }))
        })
        .await?;
        anyhow::ensure!(message.contains("mailroute.io/fleet"), "the fix is named: {message}");
        // Each ConfigMap holds its own labelled route only; neither the contested one.
        eventually("each fleet compiles only its own route", WAIT, || async {
            check()?;
            let prod = compiled(&prod_cms, "prod").await?;
            let staging = compiled(&staging_cms, "staging").await?;
            Ok((prod == Some(vec![id("for-prod")]) && staging == Some(vec![id("for-staging")])).then_some(()))
        })
        .await?;
        // Both statuses written by their own fleet's operator alone.
        for (name, manager) in [("for-prod", &prod_manager), ("for-staging", &staging_manager)] {
            let r = eventually("the labelled route accepted", WAIT, || async {
                let r = routes.get(name).await?;
                Ok(accepted(&r).is_some_and(|(s, _, _)| s == "True").then_some(r))
            })
            .await?;
            anyhow::ensure!(
                status_managers(&r) == vec![manager.clone()],
                "{name}'s status managers: {:?}",
                status_managers(&r)
            );
        }
        let events = Api::<Event>::namespaced(admin.clone(), &apps);
        eventually("a Warning Event about the conflict", WAIT, || async {
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("FleetConflict")
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("shared")
                })
                .then_some(()))
        })
        .await?;
        // The refusal is stable: neither compiles the route across several resyncs.
        let settle = tokio::time::Instant::now() + Duration::from_secs(6);
        while tokio::time::Instant::now() < settle {
            check()?;
            let r = routes.get("shared").await?;
            anyhow::ensure!(
                accepted(&r).is_some_and(|(_, reason, _)| reason == "FleetConflict"),
                "the refusal flapped: {:?}",
                accepted(&r)
            );
            anyhow::ensure!(
                !compiled(&prod_cms, "prod")
                    .await?
                    .unwrap_or_default()
                    .contains(&id("shared"))
                    && !compiled(&staging_cms, "staging")
                        .await?
                        .unwrap_or_default()
                        .contains(&id("shared")),
                "a contested route was compiled"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        // Labelling it for prod resolves it: prod compiles it, staging lets go of it.
        let label = serde_json::json!({"metadata": {"labels": {"mailroute.io/fleet": "prod"}}});
        routes
            .patch("shared", &PatchParams::default(), &Patch::Merge(&label))
            .await?;
        eventually("prod compiles the labelled route, accepted", WAIT, || async {
            check()?;
            let prod = compiled(&prod_cms, "prod").await?;
            let r = routes.get("shared").await?;
            let ok = prod == Some(vec![id("for-prod"), id("shared")])
                && accepted(&r).is_some_and(|(s, _, _)| s == "True")
                && status_managers(&r) == vec![prod_manager.clone()];
            Ok(ok.then_some(()))
        })
        .await?;
        let staging = compiled(&staging_cms, "staging").await?;
        anyhow::ensure!(
            staging == Some(vec![id("for-staging")]),
            "staging's routes: {staging:?}"
        );
        Ok(())
    }
    .await;
    let mut operators = operators.into_inner();
    let logs: Vec<String> = operators.iter().map(Process::log_text).collect();
    for o in operators.iter_mut() {
        o.kill();
    }
    if let Err(e) = result {
        panic!(
            "{e:#}\nprod log:\n{}\nstaging log:\n{}",
            operators[0].log_tail(40),
            operators[1].log_tail(40)
        );
    }
    for log in logs {
        let refused = forbidden(&log);
        assert!(
            refused.is_empty(),
            "refused with the chart's RBAC:\n{}",
            refused.join("\n")
        );
    }
}

#[tokio::test]
async fn an_upgraded_operator_takes_the_status_over_from_the_pre_fleet_field_manager() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let op_ns = cp.namespace("fleet-upgrade").await.unwrap();
    let apps = cp.namespace("fleet-upgrade-apps").await.unwrap();
    let sa = install_chart_rbac(cp, &op_ns, &op_ns).unwrap();
    let kubeconfig = cp.service_account_kubeconfig(&op_ns, &sa).await.unwrap();
    let routes = Api::<DynamicObject>::namespaced_with(admin.clone(), &apps, &route_resource());
    routes
        .patch(
            "old",
            &PatchParams::apply("mailroute-tests").force(),
            &Patch::Apply(&route(&apps, "old", None)),
        )
        .await
        .unwrap();
    // The status as an operator before fleets wrote it, under the old field manager.
    let condition = |type_: &str, reason: &str| {
        serde_json::json!({"type": type_, "status": "True", "reason": reason, "message": "before the upgrade",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1})
    };
    let old_status = serde_json::json!({
        "apiVersion": "mailroute.io/v1alpha1", "kind": "SmtpRoute",
        "status": {"conditions": [condition("Accepted", "Valid"), condition("Ready", "InConfig")], "observedGeneration": 1},
    });
    routes
        .patch_status(
            "old",
            &PatchParams::apply("mailroute-operator").force(),
            &Patch::Apply(&old_status),
        )
        .await
        .unwrap();
    assert_eq!(
        status_managers(&routes.get("old").await.unwrap()),
        vec!["mailroute-operator"]
    );

    let operator = std::cell::RefCell::new(start(cp, &kubeconfig, &op_ns, "mailroute", &apps));
    let configmaps = Api::<ConfigMap>::namespaced(admin.clone(), &op_ns);
    let manager = format!("mailroute-operator.{op_ns}.mailroute");
    let result = eventually("the status owned by the new field manager alone", WAIT, || async {
        operator.borrow_mut().check_running()?;
        let r = routes.get("old").await?;
        let compiled = compiled(&configmaps, "mailroute").await?;
        let ok = status_managers(&r) == vec![manager.clone()]
            && accepted(&r).is_some_and(|(s, reason, _)| s == "True" && reason != "FleetConflict")
            && compiled == Some(vec![format!("{apps}/old")]);
        Ok(ok.then_some(()))
    })
    .await;
    let mut operator = operator.into_inner();
    let log = operator.log_text();
    operator.kill();
    if let Err(e) = result {
        let r = routes.get("old").await.unwrap();
        panic!(
            "{e:#}\nstatus managers: {:?}\nstatus: {}\nlog:\n{}",
            status_managers(&r),
            r.data["status"],
            operator.log_tail(40)
        );
    }
    let refused = forbidden(&log);
    assert!(
        refused.is_empty(),
        "refused with the chart's RBAC:\n{}",
        refused.join("\n")
    );
}
