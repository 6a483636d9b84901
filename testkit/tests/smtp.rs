//! Integration tests of the scriptable SMTP server and the SMTP client helpers
//! (real TCP on loopback, real TLS).

use std::time::Duration;

use mailroute_testkit::TestPki;
use mailroute_testkit::smtp::{
    Behaviour, DEFAULT_TEMP_FAIL_REPLY, Reply, Script, SmtpClient, SmtpServer, Stage, Transcript, send,
};

const WAIT: Duration = Duration::from_secs(10);
const BODY: &[u8] = b"Subject: hi\r\n\r\nhello\r\n.leading dot\r\n..two dots\r\n";
const FROM: &str = "a@example.org";
const TO: &[&str] = &["b@example.net"];

/// Sends `BODY` from a@example.org to b@example.net without TLS, with `auth` if given.
async fn send_plain(server: &SmtpServer, auth: Option<(&str, &str)>) -> anyhow::Result<Transcript> {
    send(server.addr(), None, false, auth, FROM, TO, BODY).await
}

/// Sends `body` from a@example.org to b@example.net over TLS (STARTTLS or implicit) trusting `pki`.
async fn send_tls(
    server: &SmtpServer,
    pki: &TestPki,
    starttls: bool,
    auth: Option<(&str, &str)>,
    body: &[u8],
) -> anyhow::Result<Transcript> {
    let tls = Some(pki.client_config());
    send(server.addr(), tls, starttls, auth, FROM, TO, body).await
}

/// The replies to the EHLO commands of a session, in order.
fn ehlo_replies(t: &Transcript) -> Vec<&Reply> {
    t.exchanges
        .iter()
        .filter(|e| e.command.as_deref().is_some_and(|c| c.starts_with("EHLO")))
        .map(|e| &e.reply)
        .collect()
}

#[tokio::test]
async fn plain_message_is_recorded() -> anyhow::Result<()> {
    let server = SmtpServer::start(Script::new())?;
    let t = send(
        server.addr(),
        None,
        false,
        None,
        "a@example.org",
        &["b@example.net", "c@example.net"],
        BODY,
    )
    .await?;
    assert!(t.delivered(), "{t}");
    assert_eq!(t.greeting().map(|r| r.code), Some(220));
    let ehlo = t.reply_to("EHLO").expect("EHLO reply");
    for ext in ["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "SIZE"] {
        assert!(ehlo.has_extension(ext), "{ext} missing: {ehlo}");
    }
    assert!(!ehlo.has_extension("STARTTLS"));
    assert!(!ehlo.has_extension("AUTH"));
    assert_eq!(t.reply_to("QUIT").map(|r| r.code), Some(221));

    let got = server.wait_for(1, WAIT).await?;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.mail_from, "a@example.org");
    assert_eq!(m.rcpts, ["b@example.net", "c@example.net"]);
    assert_eq!(m.data, BODY);
    assert!(!m.tls);
    assert_eq!(m.auth_user, None);
    assert_eq!(server.connections(), 1);
    assert_eq!(server.attempts(), 1);
    Ok(())
}

#[tokio::test]
async fn starttls_message() -> anyhow::Result<()> {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().starttls(pki.server_config()).require_starttls(true))?;
    let t = send_tls(&server, &pki, true, None, b"body").await?;
    assert!(t.delivered(), "{t}");
    // Before TLS STARTTLS is offered, after it is not.
    let ehlos = ehlo_replies(&t);
    assert_eq!(ehlos.len(), 2);
    assert!(ehlos[0].has_extension("STARTTLS"));
    assert!(!ehlos[1].has_extension("STARTTLS"));
    assert_eq!(
        t.reply_to("STARTTLS").map(|r| r.lines.clone()),
        Some(vec!["220 2.0.0 Ready to start TLS".to_string()])
    );

    let got = server.wait_for(1, WAIT).await?;
    assert!(got[0].tls);
    assert_eq!(got[0].data, b"body\r\n");
    Ok(())
}

#[tokio::test]
async fn implicit_tls_message() -> anyhow::Result<()> {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().implicit_tls(pki.server_config()))?;
    let t = send_tls(&server, &pki, false, None, BODY).await?;
    assert!(t.delivered(), "{t}");
    assert!(!t.reply_to("EHLO").expect("EHLO").has_extension("STARTTLS"));
    let got = server.wait_for(1, WAIT).await?;
    assert!(got[0].tls);
    assert_eq!(got[0].data, BODY);
    Ok(())
}

#[tokio::test]
async fn auth_after_starttls() -> anyhow::Result<()> {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().starttls(pki.server_config()).auth("user", "s3cret"))?;
    let t = send_tls(&server, &pki, true, Some(("user", "s3cret")), BODY).await?;
    assert!(t.delivered(), "{t}");
    assert_eq!(
        t.reply_to("AUTH").map(|r| r.lines.clone()),
        Some(vec!["235 2.7.0 Authentication successful".to_string()])
    );
    // AUTH is only advertised once TLS is active.
    let ehlos = ehlo_replies(&t);
    assert!(!ehlos[0].has_extension("AUTH"));
    assert!(ehlos[1].has_extension("AUTH"));

    let got = server.wait_for(1, WAIT).await?;
    assert_eq!(got[0].auth_user.as_deref(), Some("user"));
    assert!(got[0].tls);
    Ok(())
}

#[tokio::test]
async fn bad_credentials_get_configured_reply() -> anyhow::Result<()> {
    let server = SmtpServer::start(Script::new().auth("user", "right"))?;
    let t = send_plain(&server, Some(("user", "wrong"))).await?;
    assert!(!t.delivered());
    assert_eq!(
        t.reply_to("AUTH").map(|r| r.lines.clone()),
        Some(vec!["535 5.7.8 Username and password not accepted.".to_string()])
    );
    assert!(t.reply_to("MAIL").is_none(), "{t}");

    let custom = "535 5.7.139 Authentication unsuccessful, basic auth is disabled";
    let server = SmtpServer::start(Script::new().auth("user", "right").auth_fail_reply(custom))?;
    let t = send_plain(&server, Some(("user", "wrong"))).await?;
    assert_eq!(t.last().map(|r| r.code), Some(221));
    assert_eq!(
        t.reply_to("AUTH").map(|r| r.lines.clone()),
        Some(vec![custom.to_string()])
    );
    assert!(server.received().is_empty());
    Ok(())
}

#[tokio::test]
async fn set_auth_rotates_the_accepted_password() -> anyhow::Result<()> {
    let server = SmtpServer::start(Script::new().auth("user", "old"))?;
    assert!(send_plain(&server, Some(("user", "old"))).await?.delivered());
    server.set_auth("user", "new");
    let t = send_plain(&server, Some(("user", "old"))).await?;
    assert_eq!(t.reply_to("AUTH").map(|r| r.code), Some(535), "{t}");
    assert!(send_plain(&server, Some(("user", "new"))).await?.delivered());
    assert_eq!(server.wait_for(2, WAIT).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn mail_without_auth_is_rejected_and_auth_login_works() -> anyhow::Result<()> {
    let server = SmtpServer::start(Script::new().auth("user", "pw"))?;
    let mut c = SmtpClient::connect(server.addr()).await?;
    assert!(c.ehlo("me").await?.has_extension("AUTH"));
    let r = c.cmd("MAIL FROM:<a@b>").await?;
    assert_eq!(r.lines, ["530 5.7.0 Authentication required"]);
    assert_eq!(c.cmd("AUTH LOGIN").await?.lines, ["334 VXNlcm5hbWU6"]);
    assert_eq!(c.cmd("dXNlcg==").await?.lines, ["334 UGFzc3dvcmQ6"]);
    assert_eq!(c.cmd("cHc=").await?.code, 235);
    assert_eq!(c.cmd("MAIL FROM:<a@b>").await?.code, 250);
    assert_eq!(c.cmd("RCPT TO:<c@d>").await?.code, 250);
    assert_eq!(c.data(b"x\r\n").await?.code, 250);
    assert_eq!(c.quit().await?.code, 221);
    let got = server.wait_for(1, WAIT).await?;
    assert_eq!(got[0].auth_user.as_deref(), Some("user"));
    Ok(())
}

#[tokio::test]
async fn temp_fail_twice_then_accept() -> anyhow::Result<()> {
    let server = SmtpServer::start(Script::new().fail_then_accept(2, DEFAULT_TEMP_FAIL_REPLY))?;
    for attempt in 1..=3 {
        let t = send_plain(&server, None).await?;
        let end = t.reply_to(".").expect("end-of-data reply");
        if attempt < 3 {
            assert_eq!(end.lines, ["451 4.3.0 Try again later"], "attempt {attempt}");
            assert!(!t.delivered());
        } else {
            assert!(t.delivered(), "{t}");
        }
    }
    assert_eq!(server.wait_for(1, WAIT).await?.len(), 1);
    assert_eq!(server.attempts(), 3);
    assert_eq!(server.connections(), 3);
    Ok(())
}

#[tokio::test]
async fn mail_before_starttls_is_rejected_when_required() -> anyhow::Result<()> {
    let pki = TestPki::new();
    let server = SmtpServer::start(Script::new().starttls(pki.server_config()).require_starttls(true))?;
    let t = send_plain(&server, None).await?;
    assert_eq!(
        t.reply_to("MAIL").map(|r| r.lines.clone()),
        Some(vec!["530 5.7.0 Must issue a STARTTLS command first".to_string()])
    );
    assert!(!t.delivered());
    assert!(server.received().is_empty());
    Ok(())
}

#[tokio::test]
async fn pipelining_rset_and_several_messages_per_connection() -> anyhow::Result<()> {
    let server = SmtpServer::start(Script::new())?;
    let mut c = SmtpClient::connect(server.addr()).await?;
    assert!(c.ehlo("me").await?.has_extension("PIPELINING"));
    c.send_raw(b"mail from:<x@y> SIZE=123 BODY=8BITMIME\r\nRCPT TO:<z@w>\r\nRSET\r\nNOOP\r\nMAIL FROM:<>\r\nrcpt to:<p@q>\r\nDATA\r\n")
        .await?;
    let codes = [250, 250, 250, 250, 250, 250, 354];
    for code in codes {
        assert_eq!(c.read_reply().await?.code, code);
    }
    assert_eq!(c.send_body(b"first").await?.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<s@t>").await?.code, 250);
    assert_eq!(c.cmd("RCPT TO:<u@v>").await?.code, 250);
    assert_eq!(c.data(b"second\r\n").await?.code, 250);
    assert_eq!(c.cmd("BOGUS").await?.code, 500);
    assert_eq!(c.quit().await?.code, 221);

    let got = server.wait_for(2, WAIT).await?;
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpts, ["p@q"]);
    assert_eq!(got[0].data, b"first\r\n");
    assert_eq!(got[1].mail_from, "s@t");
    assert_eq!(server.connections(), 1);
    Ok(())
}

#[tokio::test]
async fn drop_rate_limit_and_perm_fail() -> anyhow::Result<()> {
    let server = SmtpServer::start(
        Script::new()
            .then(Behaviour::Drop)
            .then(Behaviour::RateLimit)
            .then(Behaviour::perm_fail()),
    )?;
    let addr = server.addr();
    let err = send(addr, None, false, None, "a@b", &["c@d"], BODY).await;
    assert!(err.is_err(), "Drop must close without a reply");

    let mut c = SmtpClient::connect(addr).await?;
    c.ehlo("me").await?;
    c.cmd("MAIL FROM:<a@b>").await?;
    c.cmd("RCPT TO:<c@d>").await?;
    let r = c.data(BODY).await?;
    assert_eq!(r.lines, ["421 4.7.0 Too many messages, slow down"]);
    assert!(c.cmd("NOOP").await.is_err(), "connection closed after 421");

    let t = send(addr, None, false, None, "a@b", &["c@d"], BODY).await?;
    assert_eq!(
        t.reply_to(".").map(|r| r.lines.clone()),
        Some(vec!["550 5.1.1 User unknown".to_string()])
    );
    server.wait_for_attempts(3, WAIT).await?;
    assert!(server.received().is_empty());
    Ok(())
}

#[tokio::test]
async fn rcpt_stage_fails_recipients_individually() -> anyhow::Result<()> {
    let server = SmtpServer::start(
        Script::new()
            .stage(Stage::Rcpt)
            .then(Behaviour::perm_fail())
            .then(Behaviour::Accept),
    )?;
    let t = send(server.addr(), None, false, None, "a@b", &["bad@d", "good@d"], BODY).await?;
    assert!(t.delivered(), "{t}");
    let got = server.wait_for(1, WAIT).await?;
    assert_eq!(got[0].rcpts, ["good@d"]);
    assert_eq!(server.attempts(), 2);
    Ok(())
}

#[tokio::test]
async fn refused_greeting() -> anyhow::Result<()> {
    let server = SmtpServer::start(Script::new().greeting("554 No service"))?;
    let t = send(server.addr(), None, false, None, "a@b", &["c@d"], BODY).await?;
    assert_eq!(
        t.greeting().map(|r| r.lines.clone()),
        Some(vec!["554 No service".to_string()])
    );
    assert_eq!(t.last().map(|r| r.code), Some(221));
    let mut c = SmtpClient::connect(server.addr()).await?;
    assert_eq!(c.ehlo("me").await?.code, 503);
    Ok(())
}

#[tokio::test]
async fn overlong_line_closes_connection() -> anyhow::Result<()> {
    let server = SmtpServer::start(Script::new())?;
    let mut c = SmtpClient::connect(server.addr()).await?;
    let long = format!("NOOP {}\r\n", "x".repeat(20_000));
    c.send_raw(long.as_bytes()).await?;
    assert_eq!(c.read_reply().await?.code, 500);
    assert!(c.read_reply().await.is_err());
    // The server keeps serving others.
    let t = send(server.addr(), None, false, None, "a@b", &["c@d"], BODY).await?;
    assert!(t.delivered());
    Ok(())
}

#[tokio::test]
async fn wait_for_times_out_and_shutdown_closes_listener() -> anyhow::Result<()> {
    let server = SmtpServer::start(Script::new())?;
    assert!(server.wait_for(1, Duration::from_millis(50)).await.is_err());
    server.shutdown().await;
    assert!(SmtpClient::connect(server.addr()).await.is_err());
    Ok(())
}

#[tokio::test]
async fn ignore_quit_leaves_quit_unanswered_and_the_connection_open() -> anyhow::Result<()> {
    let server = SmtpServer::start(Script::new().ignore_quit(true))?;
    let mut c = SmtpClient::connect(server.addr()).await?;
    c.ehlo("me").await?;
    // The first reply after QUIT is NOOP's: QUIT got none, and the session goes on.
    c.send_raw(b"QUIT\r\nNOOP\r\n").await?;
    let r = c.read_reply().await?;
    assert_eq!((r.code, r.text()), (250, "2.0.0 OK".to_string()));
    Ok(())
}
