//! The `mailroute` binary against a real relay (admin API over TCP, a real SMTP upstream):
//! what it prints, and the exit codes scripts rely on.

use std::time::Duration;

use mailroute_relay::config::Source;
use mailroute_relay::server::{Relay, RelayOptions};
use mailroute_testkit::smtp::client::{Transcript, send};
use mailroute_testkit::{Script, SmtpServer};

const TOKEN: &str = "cli-test-token-5b1f";
const WAIT: Duration = Duration::from_secs(30);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn mailroute(admin: &str, token: &str, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailroute"))
        .env_remove("MAILROUTE_ADMIN_TOKEN")
        .arg(format!("--admin-url={admin}"))
        .arg(format!("--token={token}"))
        .args(args)
        .output()
        .await
        .expect("the binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn start(upstream_port: u16) -> (Relay, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: up, namespace: mail}}\nspec:\n  host: 127.0.0.1\n  port: {upstream_port}\n  tls: {{mode: none}}\n  match: {{recipientDomains: [\"*\"]}}\n"
        ),
    )
    .unwrap();
    let mut o = RelayOptions::local();
    o.source = Source::Manifests(vec![routes]);
    o.smtp_listen = Some("127.0.0.1:0".parse().unwrap());
    o.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    o.admin_token = Some(TOKEN.into());
    o.log_stdout = false;
    o.workers = 4;
    o.inbound.hostname = "relay.test".into();
    (Relay::start(o).await.expect("relay starts"), dir)
}

async fn submit(relay: &Relay, marker: &str, headers: &str) -> Transcript {
    let data = format!("From: <app@app.example>\r\nSubject: {marker}\r\n{headers}\r\nbody {marker}\r\n");
    let t = send(
        relay.smtp_addr.unwrap(),
        None,
        false,
        None,
        "app@app.example",
        &["user@example.com"],
        data.as_bytes(),
    )
    .await
    .unwrap();
    assert!(t.delivered(), "{t}");
    t
}

fn queue_id(t: &Transcript) -> String {
    let reply = t.reply_to(".").expect("a reply to DATA").text();
    reply.rsplit("queued as ").next().expect("queue id").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_and_acts_on_a_real_relay_with_exit_codes_scripts_can_use() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let (relay, _dir) = start(up.port()).await;
    let admin = format!("http://{}", relay.admin_addr.unwrap());

    // Delivered mail shows up in `events`.
    submit(&relay, "now", "").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = mailroute(&admin, TOKEN, &["events", "--result=delivered", "-o", "json"]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        if r.stdout.lines().count() == 1 {
            let e: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
            assert_eq!(e["recipient"], "user@example.com");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivered event: {}",
            r.stdout
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Mail from this test's client is unattributed (`-`), so a tenant's filter finds none of it.
    let unattributed = mailroute(&admin, TOKEN, &["events", "--namespace=-", "-o", "json"]).await;
    assert!(unattributed.stdout.lines().count() >= 2, "{}", unattributed.stdout);
    let team_a = mailroute(&admin, TOKEN, &["events", "--namespace=team-a", "-o", "json"]).await;
    assert_eq!((team_a.code, team_a.stdout.as_str()), (0, ""), "{}", team_a.stderr);
    let table = mailroute(&admin, TOKEN, &["events", "--since=1h"]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(table.stdout.starts_with("TIME"), "{}", table.stdout);
    assert!(
        table.stdout.contains("delivered") && table.stdout.contains("received"),
        "{}",
        table.stdout
    );

    // A message held for an hour: shown, cancelled, then gone.
    let id = queue_id(&submit(&relay, "later", "X-Mailroute-Deliver-After: 1h\r\n").await);
    let show = mailroute(&admin, TOKEN, &["message", "show", &id]).await;
    assert_eq!(show.code, 0, "{}", show.stderr);
    assert!(
        show.stdout.contains(&id) && show.stdout.contains("user@example.com"),
        "{}",
        show.stdout
    );
    let cancel = mailroute(&admin, TOKEN, &["queue", "cancel", &id]).await;
    assert_eq!(cancel.code, 0, "{}", cancel.stderr);
    assert!(cancel.stdout.contains("cancelled: 1 recipient"), "{}", cancel.stdout);
    let again = mailroute(&admin, TOKEN, &["queue", "cancel", &id]).await;
    assert_eq!(again.code, 3, "{}", again.stdout);
    assert!(again.stderr.contains("message not found"), "{}", again.stderr);
    let cancelled = mailroute(
        &admin,
        TOKEN,
        &[
            "events",
            "--result=cancelled",
            &format!("--message-id={id}"),
            "-o",
            "yaml",
        ],
    )
    .await;
    assert!(cancelled.stdout.contains("result: cancelled"), "{}", cancelled.stdout);

    // Not found, bad usage, refused, unreachable: each its own exit code and the server's words.
    let missing = mailroute(&admin, TOKEN, &["message", "show", "0000000000000000000000dead"]).await;
    assert_eq!(missing.code, 3, "{}", missing.stderr);
    assert!(missing.stderr.contains("message not found"), "{}", missing.stderr);
    let usage = mailroute(&admin, TOKEN, &["message", "show", "../quotas"]).await;
    assert_eq!(usage.code, 2, "{}", usage.stderr);
    let refused = mailroute(&admin, "wrong-token", &["quota", "ls"]).await;
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("401"), "{}", refused.stderr);
    assert!(!refused.stderr.contains("wrong-token"), "the token is never printed");
    let nowhere = mailroute("http://127.0.0.1:9", TOKEN, &["status"]).await;
    assert_eq!(nowhere.code, 1);
    assert!(
        nowhere.stderr.contains("cannot reach the admin API"),
        "{}",
        nowhere.stderr
    );

    // Status and quotas.
    let status = mailroute(&admin, TOKEN, &["status"]).await;
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert!(
        status.stdout.contains("ready") && status.stdout.contains("yes"),
        "{}",
        status.stdout
    );
    let quotas = mailroute(&admin, TOKEN, &["quota", "ls", "-o", "json"]).await;
    assert_eq!(quotas.code, 0, "{}", quotas.stderr);
    let v: serde_json::Value = serde_json::from_str(&quotas.stdout).unwrap();
    assert_eq!(v["quotas"], serde_json::json!([]));
    let scoped = mailroute(&admin, TOKEN, &["quota", "ls", "--namespace=team-a", "-o", "json"]).await;
    assert_eq!(scoped.code, 0, "{}", scoped.stderr);
    let completion = mailroute(&admin, TOKEN, &["completion", "bash"]).await;
    assert!(
        completion.code == 0 && completion.stdout.contains("_mailroute"),
        "{}",
        completion.stderr
    );

    relay.shutdown().await;
}

#[tokio::test]
async fn the_kubectl_plugin_is_the_same_command() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-mailroute"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "status",
        "events",
        "queue",
        "message",
        "quota",
        "suppress",
        "completion",
    ] {
        assert!(help.contains(cmd), "{help}");
    }
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-mailroute"))
        .arg("no-such-command")
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppress_commands_list_add_remove_import_and_export_against_a_relay() {
    let redis = mailroute_testkit::RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {{name: up, namespace: mail}}\nspec:\n  host: 127.0.0.1\n  port: {}\n  tls: {{mode: none}}\n  match: {{recipientDomains: [\"*\"]}}\n",
            up.port()
        ),
    )
    .unwrap();
    let mut o = RelayOptions::local();
    o.source = Source::Manifests(vec![routes]);
    o.queue = redis.url().parse().unwrap();
    o.smtp_listen = Some("127.0.0.1:0".parse().unwrap());
    o.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    o.admin_token = Some(TOKEN.into());
    o.log_stdout = false;
    o.workers = 2;
    o.inbound.hostname = "relay.test".into();
    o.suppression.poll = Duration::from_millis(100);
    let relay = Relay::start(o).await.expect("relay starts");
    let admin = format!("http://{}", relay.admin_addr.unwrap());
    let run = |args: &[&str]| {
        let admin = admin.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            mailroute(&admin, TOKEN, &args).await
        }
    };

    let added = run(&[
        "suppress",
        "add",
        "Blocked@Example.com",
        "--reason",
        "asked us",
        "--expires",
        "30d",
    ])
    .await;
    assert_eq!(added.code, 0, "{}", added.stderr);
    assert!(
        added.stdout.contains("Blocked@Example.com suppressed"),
        "{}",
        added.stdout
    );
    let ls = run(&["suppress", "ls"]).await;
    assert_eq!(ls.code, 0, "{}", ls.stderr);
    let lines: Vec<&str> = ls.stdout.lines().collect();
    assert!(
        lines[0].starts_with("ADDRESS") && lines[0].contains("EXPIRES"),
        "{}",
        ls.stdout
    );
    assert!(
        lines[1].contains("Blocked@Example.com")
            && lines[1].contains("asked us")
            && lines[1].contains("manual (admin-token)"),
        "{}",
        ls.stdout
    );
    let json = run(&["suppress", "ls", "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["scope"], "platform");
    assert_eq!(v["entries"][0]["source"]["by"], "admin-token");
    let yaml = run(&["suppress", "ls", "-o", "yaml", "--address", "blocked@example.com"]).await;
    assert!(yaml.stdout.contains("address: Blocked@Example.com"), "{}", yaml.stdout);
    assert_eq!(
        run(&["suppress", "ls", "--address", "nobody@example.com"]).await.code,
        3
    );
    assert_eq!(
        run(&["suppress", "add", "x@example.com", "--expires", "soon"])
            .await
            .code,
        2
    );
    let bad = run(&["suppress", "add", "not-an-address"]).await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("not an email address"), "{}", bad.stderr);

    // The relay refuses the address once its copy has the entry.
    let refused = {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let t = send(
                relay.smtp_addr.unwrap(),
                None,
                false,
                None,
                "app@app.example",
                &["blocked@example.com"],
                b"Subject: x\r\n\r\nx\r\n",
            )
            .await
            .unwrap();
            if t.lines()
                .iter()
                .any(|l| l.starts_with("550 5.1.1") && l.contains("suppressed"))
            {
                break true;
            }
            if tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(refused);

    // Import (awkward addresses) into a namespace's list, export, import the export elsewhere:
    // the same CSV.
    let file = dir.path().join("in.csv");
    std::fs::write(
        &file,
        "address,reason\n\"\"\"a,b\"\"@example.com\",\"with, comma\"\nnoël@exemple.fr,\"quote \"\"here\"\"\"\n",
    )
    .unwrap();
    let file_arg = file.display().to_string();
    let imported = run(&["suppress", "import", &file_arg, "--namespace", "team-a"]).await;
    assert_eq!(imported.code, 0, "{}", imported.stderr);
    assert!(
        imported.stdout.contains("2 entries imported into team-a"),
        "{}",
        imported.stdout
    );
    let exported = run(&["suppress", "export", "-n", "team-a"]).await;
    assert_eq!(exported.code, 0, "{}", exported.stderr);
    assert!(
        exported.stdout.contains("\"\"\"a,b\"\"@example.com\""),
        "{}",
        exported.stdout
    );
    assert!(exported.stdout.contains("noël@exemple.fr"), "{}", exported.stdout);
    let out = dir.path().join("out.csv");
    std::fs::write(&out, &exported.stdout).unwrap();
    let out_arg = out.display().to_string();
    assert_eq!(run(&["suppress", "import", &out_arg, "-n", "team-b"]).await.code, 0);
    let again = run(&["suppress", "export", "-n", "team-b"]).await;
    assert_eq!(again.stdout, exported.stdout);

    let rm = run(&["suppress", "rm", "blocked@example.com"]).await;
    assert_eq!(rm.code, 0, "{}", rm.stderr);
    assert_eq!(run(&["suppress", "rm", "blocked@example.com"]).await.code, 3);
    assert!(run(&["suppress", "ls"]).await.stdout.contains("No entries."));
    relay.shutdown().await;
}
