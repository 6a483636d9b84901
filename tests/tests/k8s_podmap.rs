//! Sender identity by pod IP end to end against a real kube-apiserver (see tests/README.md): the
//! operator binary, with the chart's RBAC for `podIdentities.enabled` and a ServiceAccount token,
//! watches the Pods of a tenant namespace and publishes their IPs into a real redis-server; a
//! relay binary reading that Redis picks the map up and logs a message from the pod's address (a
//! client socket bound to 127.0.0.2) with `namespace: team-a`, distrusts the map once the
//! operator is gone, and trusts the next operator's full replacement. There is no kubelet: the
//! test creates Pod objects and sets `status.podIP`/`podIPs` through the status subresource, as a
//! kubelet would.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mailroute_tests::k8s::{ControlPlane, Process, apply_crds, eventually, free_port};
use mailroute_tests::operator::{binary, forbidden, install_chart_rbac_with, start_operator};

const WAIT: Duration = Duration::from_secs(120);

/// A Pod as the API server stores it before the kubelet reports anything.
fn pod(ns: &str, name: &str, service_account: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "serviceAccountName": service_account,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
    }))
    .expect("a valid Pod")
}

/// What the kubelet reports once the sandbox runs: the phase and the pod's IP.
async fn report_ip(api: &Api<Pod>, name: &str, ip: &str) -> anyhow::Result<()> {
    let status = serde_json::json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// `GET /metrics` of a relay's admin listener (plain HTTP/1.0, no client library needed).
fn metrics(port: u16) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

const TOKEN: &str = "podmap-admin-token";

/// `GET path` on a relay's admin listener with the admin token, as JSON.
fn get_json(port: u16, path: &str) -> anyhow::Result<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: relay\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    Ok(serde_json::from_str(body)?)
}

/// One message over SMTP from `local` (the client socket bound to it, as a pod's address) to
/// the relay on 127.0.0.1:`port`; returns the reply to the end of DATA.
async fn send_from(local: std::net::IpAddr, port: u16, rcpt: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(local, 0))?;
    let stream = socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    // The last line of a reply ("250 ..." rather than "250-...").
    async fn reply(lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>) -> anyhow::Result<String> {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await??
                .ok_or_else(|| anyhow::anyhow!("the relay closed the connection"))?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(line);
            }
        }
    }
    let mut step = async |cmd: &str, want: &str| -> anyhow::Result<String> {
        if !cmd.is_empty() {
            write.write_all(format!("{cmd}\r\n").as_bytes()).await?;
        }
        let r = reply(&mut lines).await?;
        anyhow::ensure!(r.starts_with(want), "{cmd:?} answered {r:?}");
        Ok(r)
    };
    step("", "220").await?;
    step("EHLO app.team-a.example", "250").await?;
    step("MAIL FROM:<app@team-a.example>", "250").await?;
    step(&format!("RCPT TO:<{rcpt}>"), "250").await?;
    step("DATA", "354").await?;
    let done = step(
        &format!("From: app@team-a.example\r\nTo: {rcpt}\r\nSubject: pod identity\r\n\r\nhello\r\n."),
        "250",
    )
    .await?;
    let _ = step("QUIT", "221").await;
    Ok(done)
}

/// The value of an unlabelled sample in a Prometheus exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn a_pod_ip_published_by_the_operator_is_attributed_by_the_relay_until_the_pod_goes() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let ns = cp.namespace("podmap").await.unwrap();
    let team = cp.namespace("team-a").await.unwrap();
    let other = cp.namespace("team-b").await.unwrap();
    // The chart's ClusterRole (operator.watchNamespaces empty); the operator itself watches only
    // its own namespace and the tenant's.
    let sa = install_chart_rbac_with(cp, &ns, &ns, &["podIdentities.enabled=true"]).unwrap();
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();
    let redis = mailroute_testkit::RedisServer::start().unwrap();

    // The tenant's workload: ServiceAccount `mailer`, a pod that the "kubelet" gives 127.0.0.2.
    for n in [&team, &other] {
        Api::<ServiceAccount>::namespaced(admin.clone(), n)
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": "mailer"}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let pods = Api::<Pod>::namespaced(admin.clone(), &team);
    pods.create(&PostParams::default(), &pod(&team, "app", "mailer"))
        .await
        .unwrap();
    report_ip(&pods, "app", "127.0.0.2").await.unwrap();
    // A hostNetwork pod reports its node's IP: it must never be published.
    let mut host = pod(&team, "node-agent", "mailer");
    host.spec.as_mut().unwrap().host_network = Some(true);
    pods.create(&PostParams::default(), &host).await.unwrap();
    report_ip(&pods, "node-agent", "127.0.0.3").await.unwrap();

    let watch = format!("--watch-namespaces={team},{other}");
    let redis_url = format!("--redis-url={}", redis.url());
    let args = [
        "--connection-tests=false",
        &watch,
        &redis_url,
        "--pod-identity-interval=500ms",
    ];
    let operator = std::cell::RefCell::new(start_operator(cp, &kubeconfig, &ns, "operator-podmap", &args).unwrap());
    let (admin_port, smtp_port) = (free_port().unwrap(), free_port().unwrap());
    let mut cmd = std::process::Command::new(binary("mailroute-relay").unwrap());
    cmd.env("MAILROUTE_LOG", "info").args([
        "run".to_string(),
        "--queue".to_string(),
        redis.url(),
        format!("--smtp-listen=127.0.0.1:{smtp_port}"),
        "--submission-listen=".to_string(),
        "--smtps-listen=".to_string(),
        format!("--admin-listen=127.0.0.1:{admin_port}"),
        "--workers=0".to_string(),
        "--hostname=relay.test".to_string(),
        "--pod-identities".to_string(),
        "--pod-identity-poll=200ms".to_string(),
        format!("--admin-token={TOKEN}"),
    ]);
    let relay = std::cell::RefCell::new(Process::start("relay", cmd, cp.dir.join(format!("{ns}-relay.log"))).unwrap());

    let result: anyhow::Result<()> = async {
        // The relay holds exactly the pod's IP (not the hostNetwork one) and trusts the map.
        eventually("the relay holding the pod's IP", WAIT, || async {
            relay.borrow_mut().check_running()?;
            let m = metrics(admin_port).unwrap_or_default();
            Ok((sample(&m, "mailroute_pod_identities") == Some(1.0)
                && sample(&m, "mailroute_pod_identity_map_current") == Some(1.0))
            .then_some(()))
        })
        .await?;
        // A message from the pod's address (the client socket bound to 127.0.0.2) is logged
        // with the pod's namespace and ServiceAccount.
        let reply = send_from("127.0.0.2".parse()?, smtp_port, "someone@example.com").await?;
        let logged = eventually("the message logged as team-a's", WAIT, || async {
            let v = get_json(admin_port, &format!("/api/v1/events?namespace={team}&result=received"))?;
            let events = v["events"].as_array().cloned().unwrap_or_default();
            Ok((!events.is_empty()).then_some(events))
        })
        .await?;
        anyhow::ensure!(
            logged.len() == 1 && logged[0]["service_account"] == "mailer" && logged[0]["namespace"] == team.as_str(),
            "{reply}: {logged:?}"
        );
        // The operator dies without a word (SIGKILL): its heartbeat runs out (3 × 500 ms) and
        // the relay stops attributing, though it still holds the entry.
        operator.borrow_mut().kill();
        eventually("the relay distrusting the map of a dead operator", WAIT, || async {
            relay.borrow_mut().check_running()?;
            let m = metrics(admin_port).unwrap_or_default();
            Ok((sample(&m, "mailroute_pod_identity_map_current") == Some(0.0)
                && sample(&m, "mailroute_pod_identities") == Some(1.0))
            .then_some(()))
        })
        .await?;
        // Another operator (a Lease of its own, so it leads at once) replaces the map whole.
        *operator.borrow_mut() = start_operator(cp, &kubeconfig, &ns, "operator-podmap-2", &args)?;
        eventually("the relay trusting the new operator's map", WAIT, || async {
            relay.borrow_mut().check_running()?;
            let m = metrics(admin_port).unwrap_or_default();
            Ok((sample(&m, "mailroute_pod_identity_map_current") == Some(1.0)).then_some(()))
        })
        .await?;
        let mut conn = redis.client()?.get_multiplexed_async_connection().await?;
        let held: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg("{mailroute}:podmap:ips")
            .query_async(&mut conn)
            .await?;
        let entry = held.get("127.0.0.2").cloned().unwrap_or_default();
        anyhow::ensure!(
            held.len() == 1 && entry.contains(&format!("\"namespace\":\"{team}\"")) && entry.contains("\"mailer\""),
            "published map: {held:?}"
        );

        let owner = |ns: &str| format!("\"namespace\":\"{ns}\"");
        let published = |conn: redis::aio::MultiplexedConnection| async move {
            let mut conn = conn;
            let v: Option<String> = redis::cmd("HGET")
                .arg("{mailroute}:podmap:ips")
                .arg("127.0.0.2")
                .query_async(&mut conn)
                .await?;
            anyhow::Ok(v.unwrap_or_default())
        };

        // A pod in team-b reports the same IP while the old one still exists: nobody owns it.
        let successors = Api::<Pod>::namespaced(admin.clone(), &other);
        successors
            .create(&PostParams::default(), &pod(&other, "successor", "mailer"))
            .await?;
        report_ip(&successors, "successor", "127.0.0.2").await?;
        eventually("the reused IP published as ambiguous", WAIT, || async {
            Ok(published(conn.clone()).await?.contains("ambiguous").then_some(()))
        })
        .await?;
        // The old pod is deleted: the IP belongs to team-b (that a relay never answers team-a once
        // it has loaded the delete is checked by the relay's own tests against Redis).
        pods.delete("app", &DeleteParams::default().grace_period(0)).await?;
        eventually("the IP published for team-b", WAIT, || async {
            Ok(published(conn.clone()).await?.contains(&owner(&other)).then_some(()))
        })
        .await?;
        // The successor goes too: the relay's map empties within seconds.
        let deleted = Instant::now();
        successors
            .delete("successor", &DeleteParams::default().grace_period(0))
            .await?;
        eventually("the relay dropping the deleted pods' IP", WAIT, || async {
            relay.borrow_mut().check_running()?;
            let m = metrics(admin_port).unwrap_or_default();
            Ok((sample(&m, "mailroute_pod_identities") == Some(0.0)).then_some(()))
        })
        .await?;
        eprintln!(
            "a deleted pod's IP left the relay's map {:?} after the delete",
            deleted.elapsed()
        );
        Ok(())
    }
    .await;
    let mut operator = operator.into_inner();
    operator.kill();
    let relay = relay.into_inner();
    result.unwrap_or_else(|e| {
        panic!(
            "{e:#}\noperator log:\n{}\nrelay log:\n{}",
            operator.log_tail(40),
            relay.log_tail(40)
        )
    });
    let refused = forbidden(&operator.log_text());
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));
    eprintln!("pod identity end-to-end test took {:?}", started.elapsed());
}
