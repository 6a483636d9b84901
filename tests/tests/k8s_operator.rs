//! The operator binary against a real kube-apiserver with only the Helm chart's RBAC (see
//! tests/README.md): it runs with its ServiceAccount's token, not as admin, and must publish the
//! fleet's ConfigMap and Secret by server-side apply, set status conditions with
//! `observedGeneration`, publish Events, and never be refused (any `Forbidden` fails the test).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use mailroute_tests::k8s::{
    ControlPlane, Process, apply_crds, eventually, free_port, route_resource, run, workspace_root,
};

const WAIT: Duration = Duration::from_secs(90);

/// The operator binary `cargo test` built next to this test (`target/debug/mailroute-operator`).
fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("mailroute-operator"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p mailroute-operator` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Renders the chart's operator RBAC and ServiceAccount for release `release` in `ns`, applies
/// them, and returns (ServiceAccount name, operator full name).
fn install_chart_rbac(cp: &ControlPlane, release: &str, ns: &str) -> (String, String) {
    let rendered = run(cp.helm().args([
        "template",
        release,
        workspace_root().join("charts/mailroute").to_str().unwrap(),
        "--namespace",
        ns,
        "--show-only",
        "templates/operator-rbac.yaml",
        "--show-only",
        "templates/operator-serviceaccount.yaml",
        // The source tree's chart renders only with named images.
        "--set",
        "image.tag=k8s-suite",
    ]))
    .unwrap();
    let mut sa = None;
    let mut role = None;
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        let name = v["metadata"]["name"].as_str().map(str::to_string);
        match v["kind"].as_str() {
            Some("ServiceAccount") => sa = name,
            Some("ClusterRole") => role = name,
            _ => {}
        }
    }
    let path = cp.dir.join(format!("{release}-rbac.yaml"));
    std::fs::write(&path, &rendered).unwrap();
    run(cp
        .kubectl()
        .args(["apply", "--server-side", "-n", ns, "-f", path.to_str().unwrap()]))
    .unwrap();
    (
        sa.expect("the chart renders a ServiceAccount"),
        role.expect("the chart renders a ClusterRole"),
    )
}

fn route(ns: &str, port: u16, priority: i64) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailroute.io/v1alpha1",
        "kind": "SmtpRoute",
        "metadata": {"name": "upstream", "namespace": ns},
        "spec": {
            "host": "127.0.0.1",
            "port": port,
            "tls": {"mode": "starttls"},
            "auth": {"secretRef": {"name": "upstream-credentials"}},
            "match": {"recipientDomains": ["example.org", "*.example.net"]},
            "priority": priority,
        },
    }))
    .unwrap()
}

/// The route's condition `type_` as (status, observedGeneration), with the route's generation.
fn condition(route: &DynamicObject, type_: &str) -> Option<(String, i64, i64)> {
    let generation = route.metadata.generation?;
    let conditions = route.data["status"]["conditions"].as_array()?;
    let c = conditions.iter().find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["observedGeneration"].as_i64()?,
        generation,
    ))
}

/// Starts the operator binary as the chart runs it, authenticated by `kubeconfig`.
fn start_operator(
    cp: &ControlPlane,
    kubeconfig: &std::path::Path,
    ns: &str,
    fullname: &str,
    identity: &str,
    extra: &[&str],
) -> Process {
    let health = free_port().unwrap();
    let mut cmd = Command::new(operator_binary());
    cmd.env_clear()
        .env("KUBECONFIG", kubeconfig)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info,kube=debug")
        .args([
            "run".to_string(),
            "--fleet=mailroute".to_string(),
            format!("--namespace={ns}"),
            format!("--health-listen=127.0.0.1:{health}"),
            "--leader-elect=true".to_string(),
            format!("--lease-name={fullname}"),
            format!("--identity={identity}"),
            "--connection-test-timeout=5s".to_string(),
            "--debounce=200ms".to_string(),
        ])
        .args(extra)
        .stdin(Stdio::null());
    Process::start(identity, cmd, cp.dir.join(format!("{ns}-{identity}.log"))).unwrap()
}

/// The `Forbidden` lines of an operator log.
fn forbidden(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Forbidden") || l.contains("forbidden"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn operator_works_with_the_charts_rbac_only() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let ns = cp.namespace("operator").await.unwrap();
    let (sa, fullname) = install_chart_rbac(cp, &ns, &ns);
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();

    // The route's credentials and the route itself, written by an admin as a user would.
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "upstream-credentials", "namespace": ns},
        "stringData": {"username": "relay", "password": "s3cret-upstream-password"},
    }))
    .unwrap();
    let apply = PatchParams::apply("mailroute-tests").force();
    Api::<Secret>::namespaced(admin.clone(), &ns)
        .patch("upstream-credentials", &apply, &Patch::Apply(&secret))
        .await
        .unwrap();
    let routes = Api::<DynamicObject>::namespaced_with(admin.clone(), &ns, &route_resource());
    // Nothing listens on this port: the connection test fails, which the status reports.
    let closed_port = free_port().unwrap();
    routes
        .patch("upstream", &apply, &Patch::Apply(&route(&ns, closed_port, 10)))
        .await
        .unwrap();

    // Only its namespace: an operator watching every namespace would claim the other tests'
    // unlabelled routes too, and both would refuse them (FleetConflict).
    let watch = format!("--watch-namespaces={ns}");
    let operator = std::cell::RefCell::new(start_operator(
        cp,
        &kubeconfig,
        &ns,
        &fullname,
        "operator-test",
        &[&watch],
    ));

    let configmaps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
    let result: anyhow::Result<()> = async {
        // Outputs: the ConfigMap carries the route, the Secret its password (never the ConfigMap).
        let cm = eventually("ConfigMap mailroute-config with the route", WAIT, || async {
            operator.borrow_mut().check_running()?;
            let cm = configmaps.get_opt("mailroute-config").await?;
            Ok(cm.filter(|cm| {
                serde_json::to_string(&cm.data)
                    .unwrap_or_default()
                    .contains("example.org")
            }))
        })
        .await?;
        let cm_text = serde_json::to_string(&cm.data)?;
        anyhow::ensure!(
            cm_text.contains("example.org"),
            "the ConfigMap lacks the route: {cm_text}"
        );
        anyhow::ensure!(
            !cm_text.contains("s3cret-upstream-password"),
            "the ConfigMap holds the password"
        );
        let managers: Vec<_> = cm
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|f| f.operation.clone())
            .collect();
        anyhow::ensure!(
            managers.iter().any(|op| op == "Apply"),
            "ConfigMap not written by server-side apply: {managers:?}"
        );
        let out = eventually("Secret mailroute-secrets", WAIT, || async {
            Ok(secrets.get_opt("mailroute-secrets").await?)
        })
        .await?;
        let secret_text = format!("{:?}", out.data);
        anyhow::ensure!(!secret_text.is_empty(), "empty output Secret");

        // Status: Accepted and Ready for generation 1, then for generation 2 after a change.
        for (generation, priority) in [(1, 10), (2, 20)] {
            if generation == 2 {
                routes
                    .patch("upstream", &apply, &Patch::Apply(&route(&ns, closed_port, priority)))
                    .await?;
            }
            for type_ in ["Accepted", "Ready"] {
                eventually(&format!("{type_}=True for generation {generation}"), WAIT, || async {
                    operator.borrow_mut().check_running()?;
                    let r = routes.get("upstream").await?;
                    Ok(condition(&r, type_)
                        .filter(|(s, og, g)| s == "True" && og == g && *g == generation)
                        .map(|_| ()))
                })
                .await?;
            }
        }
        // The connection test ran against the closed port and says so.
        eventually("Verified=False", WAIT, || async {
            let r = routes.get("upstream").await?;
            Ok(condition(&r, "Verified").filter(|(s, _, _)| s == "False").map(|_| ()))
        })
        .await?;

        // Events about the route, published with the operator's own token.
        let events = Api::<Event>::namespaced(admin.clone(), &ns);
        eventually("an Event about the route", WAIT, || async {
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("upstream"))
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
        let status = routes.get("upstream").await.map(|r| r.data["status"].to_string());
        panic!(
            "{e:#}\nroute status: {status:?}\noperator log:\n{}",
            operator.log_tail(60)
        );
    }
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Forbidden") || l.contains("forbidden"))
        .collect();
    assert!(
        refused.is_empty(),
        "the API server refused the operator with the chart's RBAC:\n{}",
        refused.join("\n")
    );
}

/// Whether the operator wrote the relay configuration (it logs each apply).
fn applied(p: &Process) -> bool {
    p.log_text().contains("relay configuration applied")
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_the_other_takes_over() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let ns = cp.namespace("leader").await.unwrap();
    let (sa, fullname) = install_chart_rbac(cp, &ns, &ns);
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();
    let apply = PatchParams::apply("mailroute-tests").force();
    let routes = Api::<DynamicObject>::namespaced_with(admin.clone(), &ns, &route_resource());
    let mut r = route(&ns, free_port().unwrap(), 10);
    r.data["spec"].as_object_mut().unwrap().remove("auth");
    // Domains of its own, so the route stands alone in the compiled configuration.
    r.data["spec"]["match"]["recipientDomains"] = serde_json::json!(["leader.example"]);
    routes.patch("upstream", &apply, &Patch::Apply(&r)).await.unwrap();

    let lease_flags = ["--lease-duration=4s", "--connection-tests=false", "--watch-namespaces"];
    let extra = [lease_flags[0], lease_flags[1], lease_flags[2], ns.as_str()];
    let a = start_operator(cp, &kubeconfig, &ns, &fullname, "operator-a", &extra);
    let b = start_operator(cp, &kubeconfig, &ns, &fullname, "operator-b", &extra);
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(admin.clone(), &ns);
    let holder = || async {
        let lease = leases.get_opt(&fullname).await?;
        Ok(lease
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty()))
    };
    let first = eventually("a Lease holder", WAIT, holder).await.unwrap();
    let (mut leader, follower) = if first == "operator-a" { (a, b) } else { (b, a) };
    eventually("the leader's relay configuration", WAIT, || async {
        Ok(applied(&leader).then_some(()))
    })
    .await
    .unwrap();
    assert!(
        !applied(&follower),
        "the follower wrote while not leading:\n{}",
        follower.log_tail(20)
    );

    // Kill the leader without releasing the Lease: the follower must take over once it expires.
    leader.kill();
    let killed = std::time::Instant::now();
    let follower = std::cell::RefCell::new(follower);
    let second = eventually("a new Lease holder", WAIT, || async {
        follower.borrow_mut().check_running()?;
        Ok(holder().await?.filter(|h| *h != first))
    })
    .await
    .unwrap();
    let took = killed.elapsed();
    let follower = follower.into_inner();
    assert_eq!(second, follower.name);
    // The lease lasts 4 s; allow generous margin for 2 busy cores, not an unbounded wait.
    assert!(took < Duration::from_secs(30), "takeover took {took:?}");
    // The new leader serves changes: a new route domain reaches the ConfigMap.
    r.data["spec"]["match"]["recipientDomains"] = serde_json::json!(["leader.example", "after-failover.example"]);
    routes.patch("upstream", &apply, &Patch::Apply(&r)).await.unwrap();
    let configmaps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    eventually("the new leader's ConfigMap", WAIT, || async {
        let cm = configmaps.get_opt("mailroute-config").await?;
        Ok(cm.filter(|cm| {
            serde_json::to_string(&cm.data)
                .unwrap_or_default()
                .contains("after-failover.example")
        }))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", follower.log_tail(30)));
    for p in [&leader, &follower] {
        let refused = forbidden(&p.log_text());
        assert!(refused.is_empty(), "{} was refused:\n{}", p.name, refused.join("\n"));
    }
}

/// A route in `ns` with `spec` merged over a host on a closed port.
fn tenancy_route(ns: &str, name: &str, spec: serde_json::Value) -> DynamicObject {
    let mut s = serde_json::json!({"host": "127.0.0.1", "port": 2, "tls": {"mode": "none"}});
    for (k, v) in spec.as_object().unwrap() {
        s[k] = v.clone();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailroute.io/v1alpha1",
        "kind": "SmtpRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": s,
    }))
    .unwrap()
}

/// The authority the operator compiled for route `id` (`ns/name`), as the relays read it:
/// (tenant, enforced, governed namespaces; `None`: every namespace).
fn compiled_authority(cm: &ConfigMap, id: &str) -> Option<(bool, bool, Option<Vec<String>>)> {
    let cfg: serde_json::Value = serde_json::from_str(cm.data.as_ref()?.get("relay.json")?).ok()?;
    let r = cfg["routes"].as_array()?.iter().find(|r| r["id"] == id)?;
    let namespaces = r["namespaces"]
        .as_array()
        .map(|l| l.iter().filter_map(|n| n.as_str().map(str::to_string)).collect());
    Some((
        r["tenant"].as_bool().unwrap_or(false),
        r["enforced"].as_bool().unwrap_or(false),
        namespaces,
    ))
}

#[tokio::test]
async fn operator_compiles_tenant_and_platform_routes_into_namespace_lists() {
    use k8s_openapi::api::core::v1::Namespace;

    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let platform = cp.namespace("platform").await.unwrap();
    let team_a = cp.namespace("team-a").await.unwrap();
    let team_b = cp.namespace("team-b").await.unwrap();
    // A label no other test's namespace carries.
    let plan = format!("plan-{}", std::process::id());
    let namespaces = Api::<Namespace>::all(admin.clone());
    let label = |ns: &str| {
        let namespaces = namespaces.clone();
        let patch = serde_json::json!({"metadata": {"labels": {"mailroute.test/plan": plan.clone()}}});
        let ns = ns.to_string();
        async move {
            namespaces
                .patch(&ns, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap()
        }
    };
    label(&team_a).await;
    let (sa, fullname) = install_chart_rbac(cp, &platform, &platform);
    let kubeconfig = cp.service_account_kubeconfig(&platform, &sa).await.unwrap();

    let apply = PatchParams::apply("mailroute-tests").force();
    let put = |ns: &str, name: &str, spec: serde_json::Value| {
        let api = Api::<DynamicObject>::namespaced_with(admin.clone(), ns, &route_resource());
        let obj = tenancy_route(ns, name, spec);
        let (name, apply) = (name.to_string(), apply.clone());
        async move { api.patch(&name, &apply, &Patch::Apply(&obj)).await.unwrap() }
    };
    // Domains of their own: other tests' operators watch every namespace too.
    let domains = serde_json::json!({"recipientDomains": ["tenancy.example"]});
    put(&team_a, "own", serde_json::json!({"priority": 10, "match": domains})).await;
    // team-b asks for everyone's mail, first, enforced: it gets its own namespace's only.
    put(
        &team_b,
        "grab",
        serde_json::json!({"priority": 0, "match": domains, "enforced": true, "allowedNamespaces": {"from": "All"}}),
    )
    .await;
    put(&platform, "all", serde_json::json!({"priority": 50, "match": domains})).await;
    put(
        &platform,
        "selected",
        serde_json::json!({"priority": 60, "match": domains, "enforced": true,
            "allowedNamespaces": {"from": "Selector", "selector": {"matchLabels": {"mailroute.test/plan": plan}}}}),
    )
    .await;

    let operator = std::cell::RefCell::new(start_operator(
        cp,
        &kubeconfig,
        &platform,
        &fullname,
        "operator-tenancy",
        &[
            "--connection-tests=false",
            &format!("--platform-namespaces={platform}"),
            &format!("--watch-namespaces={platform},{team_a},{team_b}"),
        ],
    ));
    let configmaps = Api::<ConfigMap>::namespaced(admin.clone(), &platform);
    let id = |ns: &str, name: &str| format!("{ns}/{name}");
    let result: anyhow::Result<()> = async {
        let want_selected = |list: &[&String]| Some((false, true, Some(list.iter().map(|s| s.to_string()).collect())));
        let cm = eventually("the four routes compiled", WAIT, || async {
            operator.borrow_mut().check_running()?;
            let cm = configmaps.get_opt("mailroute-config").await?;
            Ok(cm.filter(|cm| {
                compiled_authority(cm, &id(&platform, "selected")) == want_selected(&[&team_a])
                    && compiled_authority(cm, &id(&team_b, "grab")).is_some()
            }))
        })
        .await?;
        anyhow::ensure!(
            compiled_authority(&cm, &id(&team_a, "own")) == Some((true, false, Some(vec![team_a.clone()]))),
            "team-a's route: {:?}",
            compiled_authority(&cm, &id(&team_a, "own"))
        );
        anyhow::ensure!(
            compiled_authority(&cm, &id(&team_b, "grab")) == Some((true, false, Some(vec![team_b.clone()]))),
            "team-b's route: {:?}",
            compiled_authority(&cm, &id(&team_b, "grab"))
        );
        anyhow::ensure!(
            compiled_authority(&cm, &id(&platform, "all")) == Some((false, false, None)),
            "the platform route for all: {:?}",
            compiled_authority(&cm, &id(&platform, "all"))
        );
        // team-b's platform-only settings are named in its status; the route still serves team-b.
        let grab = Api::<DynamicObject>::namespaced_with(admin.clone(), &team_b, &route_resource());
        eventually("team-b's route accepted with the NotPlatform warning", WAIT, || async {
            let r = grab.get("grab").await?;
            let accepted = r.data["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Accepted").cloned());
            Ok(accepted.filter(|c| {
                c["status"] == "True"
                    && c["message"].as_str().is_some_and(|m| {
                        m.contains("is not a platform namespace") && m.contains("`enforced` is ignored")
                    })
            }))
        })
        .await?;
        // A namespace labelled later joins the selected list: the operator watches namespaces.
        label(&team_b).await;
        let mut both = vec![&team_a, &team_b];
        both.sort();
        eventually("team-b selected after its label", WAIT, || async {
            operator.borrow_mut().check_running()?;
            let cm = configmaps.get_opt("mailroute-config").await?;
            Ok(cm.filter(|cm| compiled_authority(cm, &id(&platform, "selected")) == want_selected(&both)))
        })
        .await?;
        Ok(())
    }
    .await;
    let mut operator = operator.into_inner();
    let log = operator.log_text();
    operator.kill();
    if let Err(e) = result {
        panic!("{e:#}\noperator log:\n{}", operator.log_tail(60));
    }
    let refused = forbidden(&log);
    assert!(
        refused.is_empty(),
        "refused with the chart's RBAC:\n{}",
        refused.join("\n")
    );
}
