//! The relay driven by SMTP clients no one here wrote: swaks (the Debian package; scripts/test.sh
//! installs it) and Python's smtplib, over plain SMTP, STARTTLS and implicit TLS with AUTH,
//! delivered to a testkit upstream.

use std::process::Output;

use crate::common::*;
use mailroute_testkit::{Received, Script, SmtpServer, TestPki};

const USER: &str = "shop-42";
const PASS: &str = "s3cret-shop-password";

fn routes(upstream_port: u16) -> String {
    route("up", upstream_port, 10, &["*"]) + &inbound_user("shop-42", USER, PASS)
}

/// Runs a client program to its end (bounded by [`WAIT`]); a missing program is a clear failure.
async fn run(program: &str, args: &[String]) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(WAIT, child).await {
        Err(_) => panic!("{program} did not finish within {WAIT:?}"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{program}` is not installed. These tests drive the relay with a client no one here \
             wrote: run scripts/test.sh, or `apt-get install swaks` (python3 for smtplib)."
        ),
        Ok(Err(e)) => panic!("running {program}: {e}"),
        Ok(Ok(out)) => out,
    }
}

fn transcript(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The queue id from the relay's `250 2.0.0 Ok: queued as <id>` in a client transcript.
fn queue_id(text: &str) -> String {
    let (_, rest) = text
        .split_once("Ok: queued as ")
        .unwrap_or_else(|| panic!("no queue id in:\n{text}"));
    rest.split_whitespace().next().unwrap_or_default().to_owned()
}

fn swaks_args(port: u16, subject: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--server",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--helo",
        "client.swaks.example",
        "--from",
        "app@app.example",
        "--to",
        "user@example.com",
        "--header",
        &format!("Subject: {subject}"),
        "--body",
        "Hello from swaks.",
        "--timeout",
        "30",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn assert_delivered(got: &Received, id: &str, subject: &str, with: &str) {
    let data = got.data_str();
    assert_eq!(got.mail_from, "app@app.example");
    assert_eq!(got.rcpts, ["user@example.com"]);
    assert!(data.contains(&format!("Subject: {subject}")), "{data}");
    assert!(data.contains(&format!("with {with} id {id}")), "{data}");
}

#[tokio::test]
async fn swaks_relays_from_loopback_without_auth() {
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&routes(up.port()), "memory", |_| {}).await;
    let out = run("swaks", &swaks_args(r.smtp().port(), "swaks plain", &["--pipeline"])).await;
    let text = transcript(&out);
    assert!(out.status.success(), "{text}");
    let id = queue_id(&text);
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert_delivered(&got[0], &id, "swaks plain", "ESMTP");
    assert!(
        got[0]
            .data_str()
            .starts_with("Received: from client.swaks.example ([127.0.0.1])"),
        "{}",
        got[0].data_str()
    );
    assert!(got[0].data_str().contains("Hello from swaks."));
    r.relay.shutdown().await;
}

#[tokio::test]
async fn swaks_submits_with_starttls_and_auth() {
    let pki = TestPki::new();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start_tls(&routes(up.port()), "memory", &pki, |_| {}).await;
    let ca = r.ca_file().display().to_string();
    let port = r.submission().port();

    // Without credentials swaks cannot get past MAIL on the submission port.
    let out = run("swaks", &swaks_args(port, "swaks anon", &["--tls"])).await;
    let text = transcript(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("530 5.7.0"), "{text}");

    for (n, (mech, subject)) in [("PLAIN", "swaks plain auth"), ("LOGIN", "swaks login auth")]
        .into_iter()
        .enumerate()
    {
        let extra = [
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            &ca,
            "--auth",
            mech,
            "--auth-user",
            USER,
            "--auth-password",
            PASS,
        ];
        let out = run("swaks", &swaks_args(port, subject, &extra)).await;
        let text = transcript(&out);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("235 2.7.0"), "{text}");
        let id = queue_id(&text);
        let got = up.wait_for(n + 1, WAIT).await.unwrap();
        let m = got
            .iter()
            .find(|m| m.data_str().contains(&format!("Subject: {subject}")))
            .unwrap_or_else(|| panic!("{subject} not delivered"));
        assert_delivered(m, &id, subject, "ESMTPSA");
    }
    // The relay serves the certificate from its files: a client trusting another CA refuses it.
    let other = tempfile::tempdir().unwrap();
    let (_, _, other_ca) = TestPki::new().write_files(other.path()).unwrap();
    let other_ca = other_ca.display().to_string();
    let extra = ["--tls", "--tls-verify", "--tls-ca-path", &other_ca];
    let out = run("swaks", &swaks_args(port, "swaks other ca", &extra)).await;
    let text = transcript(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("certificate verify failed"), "{text}");
    assert!(!text.contains("queued as"), "{text}");

    // A wrong password: refused, nothing sent.
    let extra = [
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        USER,
        "--auth-password",
        "wrong",
    ];
    let out = run("swaks", &swaks_args(port, "swaks wrong", &extra)).await;
    let text = transcript(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("535 5.7.8"), "{text}");
    assert_eq!(up.received().len(), 2);
    r.relay.shutdown().await;
}

#[tokio::test]
async fn swaks_submits_over_implicit_tls() {
    let pki = TestPki::new();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start_tls(&routes(up.port()), "memory", &pki, |_| {}).await;
    let ca = r.ca_file().display().to_string();
    let extra = [
        "--tls-on-connect",
        "--tls-verify",
        "--tls-ca-path",
        &ca,
        "--auth",
        "LOGIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASS,
    ];
    let out = run("swaks", &swaks_args(r.smtps().port(), "swaks smtps", &extra)).await;
    let text = transcript(&out);
    assert!(out.status.success(), "{text}");
    let id = queue_id(&text);
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert_delivered(&got[0], &id, "swaks smtps", "ESMTPSA");
    r.relay.shutdown().await;
}

/// smtplib: STARTTLS verified against the test CA, then AUTH LOGIN (forced: smtplib would
/// pick PLAIN by itself), then one message.
const SMTPLIB_CLIENT: &str = r#"
import smtplib, ssl, sys
host, port, ca, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
with smtplib.SMTP(host, port, local_hostname="client.python.example", timeout=30) as s:
    s.ehlo()
    assert s.has_extn("starttls"), s.esmtp_features
    assert not s.has_extn("auth"), "AUTH offered before TLS"
    s.starttls(context=ctx)
    s.ehlo()
    assert "LOGIN" in s.esmtp_features["auth"].upper().split(), s.esmtp_features
    s.user, s.password = user, password
    code, resp = s.auth("LOGIN", s.auth_login)
    print("AUTH", code, resp.decode())
    msg = ("From: App <app@app.example>\r\nTo: <user@example.com>\r\n"
           "Subject: smtplib login\r\n\r\nHello from smtplib.\r\n")
    code, resp = s.mail("app@app.example")
    assert code == 250, (code, resp)
    code, resp = s.rcpt("user@example.com")
    assert code == 250, (code, resp)
    code, resp = s.data(msg)
    print("DATA", code, resp.decode())
    assert code == 250, (code, resp)
"#;

#[tokio::test]
async fn python_smtplib_submits_with_starttls_and_auth_login() {
    let pki = TestPki::new();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start_tls(&routes(up.port()), "memory", &pki, |_| {}).await;
    let args = [
        "-c".to_owned(),
        SMTPLIB_CLIENT.to_owned(),
        "127.0.0.1".to_owned(),
        r.submission().port().to_string(),
        r.ca_file().display().to_string(),
        USER.to_owned(),
        PASS.to_owned(),
    ];
    let out = run("python3", &args).await;
    let text = transcript(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("AUTH 235 2.7.0"), "{text}");
    let id = queue_id(&text);
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert_delivered(&got[0], &id, "smtplib login", "ESMTPSA");
    assert!(got[0].data_str().contains("Hello from smtplib."));
    r.relay.shutdown().await;
}
