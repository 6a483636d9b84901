//! mailroute's binaries end to end against a real kube-apiserver (see tests/README.md), each with
//! the Helm chart's RBAC and a ServiceAccount token: the operator's connection test against a real
//! SMTP upstream on loopback (STARTTLS with a private CA, AUTH from a Secret) sets `Verified`, and
//! `helm uninstall` leaves none of the operator's outputs behind once the garbage collector ran.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use mailroute_testkit::{Script, SmtpServer, TestPki};
use mailroute_tests::k8s::{
    ControlPlane, apply_crds, eventually, free_port, route_resource, run, secret, workspace_root,
};
use mailroute_tests::operator::{binary, forbidden, install_chart_rbac, start_operator};

const WAIT: Duration = Duration::from_secs(120);

/// The route's `Verified` condition as (status, reason, message), once it is for `generation`.
fn verified(route: &DynamicObject) -> Option<(String, String, String)> {
    let conditions = route.data["status"]["conditions"].as_array()?;
    let c = conditions.iter().find(|c| c["type"] == "Verified")?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str().unwrap_or_default().to_string(),
        c["message"].as_str().unwrap_or_default().to_string(),
    ))
}

#[tokio::test]
async fn verified_comes_from_a_real_upstream_over_starttls_with_auth() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let ns = cp.namespace("verified").await.unwrap();
    let sa = install_chart_rbac(cp, &ns, &ns).unwrap();
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();

    // The upstream: STARTTLS with a certificate of a private CA, AUTH PLAIN relay/good-password.
    let pki = TestPki::new();
    let upstream = SmtpServer::start(
        Script::new()
            .starttls(pki.server_config())
            .require_starttls(true)
            .auth("relay@example.com", "good-password"),
    )
    .unwrap();

    let apply = PatchParams::apply("mailroute-tests").force();
    let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
    let creds = |password: &str| {
        secret(
            &ns,
            "upstream-credentials",
            serde_json::json!({"username": "relay@example.com", "password": password}),
        )
    };
    secrets
        .patch("upstream-credentials", &apply, &Patch::Apply(&creds("good-password")))
        .await
        .unwrap();
    secrets
        .patch(
            "upstream-ca",
            &apply,
            &Patch::Apply(&secret(&ns, "upstream-ca", serde_json::json!({"ca.crt": pki.ca_pem}))),
        )
        .await
        .unwrap();
    let route: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailroute.io/v1alpha1",
        "kind": "SmtpRoute",
        "metadata": {"name": "upstream", "namespace": ns},
        "spec": {
            "host": "127.0.0.1",
            "port": upstream.port(),
            "tls": {"mode": "starttls", "caSecretRef": {"name": "upstream-ca", "key": "ca.crt"}},
            "auth": {"secretRef": {"name": "upstream-credentials"}},
            "match": {"recipientDomains": ["verified.example"]},
            "testRecipient": "postmaster@verified.example",
        },
    }))
    .unwrap();
    let routes = Api::<DynamicObject>::namespaced_with(admin.clone(), &ns, &route_resource());
    routes.patch("upstream", &apply, &Patch::Apply(&route)).await.unwrap();

    let operator = std::cell::RefCell::new(start_operator(cp, &kubeconfig, &ns, "operator-verified", &[]).unwrap());
    let result: anyhow::Result<(String, String)> = async {
        let (_, _, good) = eventually("Verified=True", WAIT, || async {
            operator.borrow_mut().check_running()?;
            let r = routes.get("upstream").await?;
            Ok(verified(&r).filter(|(s, _, _)| s == "True"))
        })
        .await?;
        // The test message really went through the upstream, over TLS, as the Secret's user.
        let received = upstream.wait_for(1, Duration::from_secs(30)).await?;
        anyhow::ensure!(received[0].tls && received[0].auth_user.as_deref() == Some("relay@example.com"));
        anyhow::ensure!(
            received[0].rcpts == ["postmaster@verified.example"],
            "{:?}",
            received[0].rcpts
        );

        // A wrong password: the new Secret version is tested again and the upstream's 535 shows.
        secrets
            .patch("upstream-credentials", &apply, &Patch::Apply(&creds("wrong-password")))
            .await?;
        let (_, _, bad) = eventually("Verified=False after the password changed", WAIT, || async {
            operator.borrow_mut().check_running()?;
            let r = routes.get("upstream").await?;
            Ok(verified(&r).filter(|(s, _, _)| s == "False"))
        })
        .await?;
        Ok((good, bad))
    }
    .await;
    let mut operator = operator.into_inner();
    operator.kill();
    let (good, bad) = result.unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_tail(60)));
    // The message quotes the upstream's own reply to the test message (with its queue id).
    assert!(
        good.contains(&format!(
            "127.0.0.1:{} (STARTTLS): EHLO succeeded, AUTH PLAIN accepted",
            upstream.port()
        )) && good.contains("test message accepted: 250 2.0.0 OK queued as "),
        "{good}"
    );
    assert!(bad.contains(mailroute_testkit::smtp::DEFAULT_AUTH_FAIL_REPLY), "{bad}");
    let refused = forbidden(&operator.log_text());
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));
    eprintln!("verified test took {:?}", started.elapsed());
}

/// Whether `owner` (a Deployment) is among the ownerReferences of an object's metadata.
fn owned_by(meta: &kube::api::ObjectMeta, owner: &Deployment) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.kind == "Deployment" && Some(&r.uid) == owner.metadata.uid.as_ref())
}

#[tokio::test]
async fn helm_uninstall_leaves_nothing_once_the_operator_ran() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let ns = cp.namespace("uninstall").await.unwrap();
    let release = "rel";
    let chart = workspace_root().join("charts/mailroute");
    // No kubelet pulls the images: any tag names them (the default ones are refused).
    // The CRDs are the ones applied above (shared by the binary's tests), not the release's.
    run(cp.helm().args(["install", release]).arg(&chart).args([
        "-n",
        &ns,
        "--set",
        "image.tag=k8s-suite",
        "--set",
        "crds.enabled=false",
    ]))
    .unwrap();

    // The operator Deployment of the release, and the ServiceAccount its pods run as.
    let deployments = Api::<Deployment>::namespaced(admin.clone(), &ns);
    let owner_name = format!("{release}-mailroute-operator");
    let owner = deployments.get(&owner_name).await.unwrap();
    let sa = owner
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.service_account_name.clone())
        .expect("the operator Deployment names its ServiceAccount");
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();
    let owner_flag = format!("--owner-deployment={owner_name}");
    let operator =
        std::cell::RefCell::new(start_operator(cp, &kubeconfig, &ns, &owner_name, &[owner_flag.as_str()]).unwrap());

    let configmaps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
    let outputs = async {
        eventually("mailroute-config owned by the Deployment", WAIT, || async {
            operator.borrow_mut().check_running()?;
            Ok(configmaps
                .get_opt("mailroute-config")
                .await?
                .filter(|o| owned_by(&o.metadata, &owner)))
        })
        .await?;
        eventually("mailroute-secrets owned by the Deployment", WAIT, || async {
            Ok(secrets
                .get_opt("mailroute-secrets")
                .await?
                .filter(|o| owned_by(&o.metadata, &owner)))
        })
        .await
    }
    .await;
    // In a cluster the operator's pods go with the Deployment; here the process goes first so it
    // cannot write the outputs again.
    let mut operator = operator.into_inner();
    operator.kill();
    outputs.unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_tail(60)));
    let refused = forbidden(&operator.log_text());
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));

    run(cp.helm().args(["uninstall", release, "-n", &ns])).unwrap();
    eventually("the garbage collector removed the operator's outputs", WAIT, || async {
        let cm = configmaps.get_opt("mailroute-config").await?;
        let secret = secrets.get_opt("mailroute-secrets").await?;
        Ok((cm.is_none() && secret.is_none()).then_some(()))
    })
    .await
    .unwrap();
    eprintln!("uninstall test took {:?}", started.elapsed());
}

/// Writes files into a directory the way the kubelet projects a ConfigMap or Secret volume:
/// the data in a timestamped directory, `..data` pointing at it, and each key a symlink through
/// `..data`; an update writes a new timestamped directory and renames a `..data_tmp` symlink
/// over `..data`, so a reader sees all old or all new files.
struct Projection {
    dir: std::path::PathBuf,
    serial: u32,
}

impl Projection {
    fn new(dir: std::path::PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("projection directory");
        Self { dir, serial: 0 }
    }

    fn write(&mut self, files: &std::collections::BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
        use std::os::unix::fs::symlink;
        self.serial += 1;
        let stamp = format!("..2026_12_05_00_00_00.{:09}", self.serial);
        let fresh = self.dir.join(&stamp);
        std::fs::create_dir(&fresh)?;
        for (key, value) in files {
            std::fs::write(fresh.join(key), value)?;
        }
        let data = self.dir.join("..data");
        let old = std::fs::read_link(&data).ok();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&stamp, &tmp)?;
        std::fs::rename(&tmp, &data)?;
        for key in files.keys() {
            let link = self.dir.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(std::path::Path::new("..data").join(key), &link)?;
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old))?;
        }
        Ok(())
    }
}

/// Copies the live fleet ConfigMap and Secret of `ns` into `<dir>/config` and `<dir>/secrets`
/// whenever their data change, as the kubelet's volume sync does, counting the writes in
/// `writes`; runs until aborted.
async fn project(client: kube::Client, ns: String, dir: std::path::PathBuf, writes: Arc<AtomicUsize>) {
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let secrets = Api::<Secret>::namespaced(client, &ns);
    let mut config = Projection::new(dir.join("config"));
    let mut secret = Projection::new(dir.join("secrets"));
    let (mut last_config, mut last_secret) = (None, None);
    loop {
        if let Ok(Some(cm)) = configmaps.get_opt("mailroute-config").await {
            let files: std::collections::BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            if last_config.as_ref() != Some(&files) && config.write(&files).is_ok() {
                last_config = Some(files);
                writes.fetch_add(1, Ordering::SeqCst);
            }
        }
        if let Ok(Some(s)) = secrets.get_opt("mailroute-secrets").await {
            let files: std::collections::BTreeMap<String, Vec<u8>> =
                s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
            if last_secret.as_ref() != Some(&files) && secret.write(&files).is_ok() {
                last_secret = Some(files);
                writes.fetch_add(1, Ordering::SeqCst);
            }
        }
        // The kubelet's sync period, much shortened; not a synchronisation point of the test.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How often the relay has logged a configuration reload.
fn reloads(relay: &mailroute_tests::k8s::Process) -> usize {
    relay.log_text().matches("configuration reloaded").count()
}

/// Submits one message for `rcpt` to the relay on `port`; the relay must accept it.
async fn submit(port: u16, rcpt: &str, subject: &str) -> anyhow::Result<()> {
    let body = format!("From: app@shop.example\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nhello\r\n");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let t =
        mailroute_testkit::smtp::client::send(addr, None, false, None, "app@shop.example", &[rcpt], body.as_bytes())
            .await?;
    anyhow::ensure!(
        t.delivered(),
        "the relay did not accept the message:\n{}",
        t.lines().join("\n")
    );
    Ok(())
}

/// Waits until `server` received a message whose content contains `subject`.
async fn arrives(server: &SmtpServer, subject: &str) -> anyhow::Result<mailroute_testkit::Received> {
    eventually(&format!("{subject} at the upstream"), WAIT, || async {
        Ok(server.received().into_iter().find(|m| m.data_str().contains(subject)))
    })
    .await
}

#[tokio::test]
async fn relay_fed_like_the_kubelet_follows_route_and_password_changes() {
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.unwrap();
    apply_crds(&admin).await.unwrap();
    let ns = cp.namespace("relay").await.unwrap();
    let sa = install_chart_rbac(cp, &ns, &ns).unwrap();
    let kubeconfig = cp.service_account_kubeconfig(&ns, &sa).await.unwrap();

    let pki = TestPki::new();
    let user = "relay@example.com";
    let upstream = |password: &str| {
        SmtpServer::start(
            Script::new()
                .starttls(pki.server_config())
                .require_starttls(true)
                .auth(user, password),
        )
        .unwrap()
    };
    let (a, b) = (upstream("pw-1"), upstream("pw-1"));

    // The user's objects, applied with kubectl as a user would.
    let manifest = |port: u16, password: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: upstream-credentials, namespace: {ns}}}\n\
             stringData: {{username: \"{user}\", password: {password}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: upstream-ca, namespace: {ns}}}\n\
             stringData:\n  ca.crt: {ca:?}\n---\n\
             apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: upstream, namespace: {ns}}}\n\
             spec:\n  host: 127.0.0.1\n  port: {port}\n\
             \x20 tls: {{mode: starttls, caSecretRef: {{name: upstream-ca, key: ca.crt}}}}\n\
             \x20 auth: {{secretRef: {{name: upstream-credentials}}}}\n\
             \x20 match: {{recipientDomains: [e2e.example]}}\n",
            ca = pki.ca_pem,
        )
    };
    let path = cp.dir.join(format!("{ns}-objects.yaml"));
    let kubectl_apply = |port: u16, password: &str| {
        std::fs::write(&path, manifest(port, password))?;
        run(cp.kubectl().args(["apply", "--server-side", "-f"]).arg(&path)).map(|_| ())
    };
    kubectl_apply(a.port(), "pw-1").unwrap();

    let operator = start_operator(cp, &kubeconfig, &ns, "operator-relay", &["--connection-tests=false"]).unwrap();
    let dir = cp.dir.join(format!("{ns}-volumes"));
    let writes = Arc::new(AtomicUsize::new(0));
    let projector = tokio::spawn(project(admin.clone(), ns.clone(), dir.clone(), writes.clone()));
    let redis = mailroute_testkit::RedisServer::start().unwrap();

    let result: anyhow::Result<()> = async {
        // Both volumes hold the route before the relay starts, as the kubelet mounts them first.
        let config = dir.join("config/relay.json");
        let secrets = dir.join("secrets/secrets.json");
        let a_port = a.port().to_string();
        eventually("relay.json with the route and secrets.json", WAIT, || async {
            let text = std::fs::read_to_string(&config).unwrap_or_default();
            let secret_text = std::fs::read_to_string(&secrets).unwrap_or_default();
            Ok((text.contains("e2e.example") && text.contains(&a_port) && secret_text.contains("pw-1")).then_some(()))
        })
        .await?;
        // From here on each change of the objects changes exactly one projected file, once, so
        // a reload the relay logs after a change is the reload of that change.
        let initial = writes.load(Ordering::SeqCst);

        let (smtp, admin_port) = (free_port()?, free_port()?);
        let mut cmd = std::process::Command::new(binary("mailroute-relay")?);
        cmd.env("RUST_LOG", "info")
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--secrets")
            .arg(&secrets)
            .args([
                "--queue".to_string(),
                redis.url(),
                format!("--smtp-listen=127.0.0.1:{smtp}"),
                "--submission-listen=".to_string(),
                "--smtps-listen=".to_string(),
                format!("--admin-listen=127.0.0.1:{admin_port}"),
                "--workers=2".to_string(),
                "--hostname=relay.test".to_string(),
            ]);
        let relay = std::cell::RefCell::new(mailroute_tests::k8s::Process::start(
            "relay",
            cmd,
            cp.dir.join(format!("{ns}-relay.log")),
        )?);
        let outcome: anyhow::Result<()> = async {
            eventually("the relay accepting SMTP", WAIT, || async {
                relay.borrow_mut().check_running()?;
                Ok(std::net::TcpStream::connect(("127.0.0.1", smtp)).ok().map(|_| ()))
            })
            .await?;
            submit(smtp, "one@e2e.example", "message-one").await?;
            let one = arrives(&a, "message-one").await?;
            anyhow::ensure!(one.tls && one.auth_user.as_deref() == Some(user), "{one:?}");

            // The route moves to upstream B: the relay reloads and the next message goes there.
            let before = reloads(&relay.borrow());
            kubectl_apply(b.port(), "pw-1")?;
            eventually("the relay reloading the moved route", WAIT, || async {
                relay.borrow_mut().check_running()?;
                Ok((reloads(&relay.borrow()) > before).then_some(()))
            })
            .await?;
            let text = std::fs::read_to_string(&config)?;
            anyhow::ensure!(text.contains(&b.port().to_string()), "relay.json lacks B: {text}");
            anyhow::ensure!(
                writes.load(Ordering::SeqCst) == initial + 1,
                "{writes:?} projections after the move, {initial} at start"
            );
            submit(smtp, "two@e2e.example", "message-two").await?;
            arrives(&b, "message-two").await?;

            // The password is rotated at B and in the Secret: the next AUTH uses the new one (B
            // now refuses the old one with 535, which would bounce the message).
            let before = reloads(&relay.borrow());
            b.set_auth(user, "pw-2");
            kubectl_apply(b.port(), "pw-2")?;
            eventually("the relay reloading the rotated password", WAIT, || async {
                relay.borrow_mut().check_running()?;
                Ok((reloads(&relay.borrow()) > before).then_some(()))
            })
            .await?;
            anyhow::ensure!(
                writes.load(Ordering::SeqCst) == initial + 2,
                "{writes:?} projections after the rotation, {initial} at start"
            );
            submit(smtp, "three@e2e.example", "message-three").await?;
            let three = arrives(&b, "message-three").await?;
            anyhow::ensure!(three.auth_user.as_deref() == Some(user), "{three:?}");
            let at_a: Vec<String> = a.received().iter().map(|m| m.data_str()).collect();
            anyhow::ensure!(at_a.len() == 1, "upstream A got more than the first message: {at_a:?}");
            Ok(())
        }
        .await;
        let relay = relay.into_inner();
        outcome.map_err(|e| anyhow::anyhow!("{e:#}\nrelay log:\n{}", relay.log_tail(40)))
    }
    .await;
    projector.abort();
    let mut operator = operator;
    operator.kill();
    result.unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_tail(40)));
    let refused = forbidden(&operator.log_text());
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));
    eprintln!("relay end-to-end test took {:?}", started.elapsed());
}
