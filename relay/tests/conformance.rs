//! SMTP conformance of the relay over real sockets, as a table: DATA transparency, line
//! endings, MAIL parameters, address forms (quoted, non-ASCII with and without SMTPUTF8,
//! invalid UTF-8), SIZE overflow and overlong lines. Each case says what the client sends, the
//! reply (code and enhanced code) it must get to each send, and, when the message is accepted,
//! the MAIL and RCPT lines and the content the upstream receives, byte for byte.
//!
//! Then the outbound paths one by one (smarthost with and without PIPELINING, MX, a DSN): a
//! quoted local part reaches the upstream quoted, never as an ESMTP parameter.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::common::*;
use chrono::{TimeZone, Utc};
use mailroute_api::config::SessionTimeouts;
use mailroute_relay::outbound::bounce::Kind;
use mailroute_relay::outbound::delivery::{
    Deliverer, DelivererConfig, DeliveryTarget, Envelope, Outcome, Stage, StaticResolver,
};
use mailroute_relay::outbound::dsn::{self, Action, DsnRequest, RecipientReport};
use mailroute_testkit::smtp::{Received, SmtpClient};
use mailroute_testkit::{Script, SmtpServer};

/// One send and the reply it must get (`enhanced` is a prefix of the reply text).
struct Step {
    send: Vec<u8>,
    code: u16,
    enhanced: &'static str,
}

/// Byte for byte what the upstream must receive for an accepted case. `content` is the DATA
/// as sent on the wire (dot-stuffed, with the final `.` line), after the relay's own trace
/// fields (`Received:`, and `Message-ID:` when missing) and the blank line the relay adds in
/// front of content that does not start with a header field.
struct Upstreamed {
    mail: &'static [u8],
    rcpt: &'static [u8],
    content: &'static [u8],
}

struct Case {
    name: &'static str,
    steps: Vec<Step>,
    upstream: Option<Upstreamed>,
}

fn step(send: impl AsRef<[u8]>, code: u16, enhanced: &'static str) -> Step {
    let mut send = send.as_ref().to_vec();
    if !send.ends_with(b"\n") {
        send.extend_from_slice(b"\r\n");
    }
    Step { send, code, enhanced }
}

/// Raw DATA content, sent as is (it carries its own terminator).
fn content(bytes: &[u8], code: u16, enhanced: &'static str) -> Step {
    Step {
        send: bytes.to_vec(),
        code,
        enhanced,
    }
}

fn mail_ok(line: &str) -> Step {
    step(line, 250, "2.1.0")
}

fn rcpt_ok(line: &str) -> Step {
    step(line, 250, "2.1.5")
}

fn data_open() -> Step {
    step("DATA", 354, "")
}

const SENDER: &str = "MAIL FROM:<app@app.example>";
const MAIL_LINE: &[u8] = b"MAIL FROM:<app@app.example>\r\n";

/// A whole accepted transaction from `sender`/`rcpt` with the raw `body` (terminator included).
fn accepted(name: &'static str, sender: &str, rcpt: &str, body: &[u8], upstream: Upstreamed) -> Case {
    Case {
        name,
        steps: vec![mail_ok(sender), rcpt_ok(rcpt), data_open(), content(body, 250, "2.0.0")],
        upstream: Some(upstream),
    }
}

/// A message refused at the end of DATA; `NOOP` then shows the session is in step (a
/// smuggled command would have been answered first).
fn refused_content(name: &'static str, rcpt: &str, body: &[u8]) -> Case {
    Case {
        name,
        steps: vec![
            mail_ok(SENDER),
            rcpt_ok(rcpt),
            data_open(),
            content(body, 554, "5.6.0"),
            step("NOOP", 250, "2.0.0"),
        ],
        upstream: None,
    }
}

fn refused(name: &'static str, steps: Vec<Step>) -> Case {
    Case {
        name,
        steps,
        upstream: None,
    }
}

fn cases() -> Vec<Case> {
    let long_local = format!("RCPT TO:<{}@example.com>", "l".repeat(65));
    let long_address = format!("RCPT TO:<a@{}.example.com>", "d".repeat(300));
    let long_command = format!("NOOP {}", "x".repeat(5000));
    let long_mail = format!("MAIL FROM:<app@app.example> X-LONG={}", "x".repeat(5000));
    vec![
        // --- DATA transparency (RFC 5321 §4.5.2) ---
        accepted(
            "a stuffed dot on the first line is removed once",
            SENDER,
            "RCPT TO:<t-first-line@example.com>",
            b"..hidden\r\nsecond\r\n.\r\n",
            Upstreamed {
                mail: MAIL_LINE,
                rcpt: b"RCPT TO:<t-first-line@example.com>\r\n",
                content: b"..hidden\r\nsecond\r\n.\r\n",
            },
        ),
        accepted(
            "an empty message is answered at once",
            SENDER,
            "RCPT TO:<t-empty@example.com>",
            b".\r\n",
            Upstreamed {
                mail: MAIL_LINE,
                rcpt: b"RCPT TO:<t-empty@example.com>\r\n",
                content: b".\r\n",
            },
        ),
        accepted(
            "dots at line starts are unstuffed and stuffed again",
            SENDER,
            "RCPT TO:<t-dots@example.com>",
            b"Subject: dots\r\n\r\n..\r\n...x\r\n.y\r\nz.\r\n.\r\n",
            Upstreamed {
                mail: MAIL_LINE,
                rcpt: b"RCPT TO:<t-dots@example.com>\r\n",
                content: b"Subject: dots\r\n\r\n..\r\n...x\r\ny\r\nz.\r\n.\r\n",
            },
        ),
        // --- Line endings (RFC 5321 §2.3.8): a bare CR or LF refuses the message ---
        refused_content(
            "bare LF before a dot",
            "RCPT TO:<t-bare-lf@example.com>",
            b"Subject: x\r\n\r\na\n.b\r\n.\r\n",
        ),
        refused_content(
            "bare CR before a dot",
            "RCPT TO:<t-bare-cr@example.com>",
            b"Subject: x\r\n\r\na\r.b\r\n.\r\n",
        ),
        refused_content(
            "bare LF dot LF does not end the data (smuggling)",
            "RCPT TO:<t-smuggle@example.com>",
            b"Subject: x\r\n\r\na\n.\nMAIL FROM:<evil@evil.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n",
        ),
        refused_content(
            "bare LF dot CRLF does not end the data",
            "RCPT TO:<t-smuggle2@example.com>",
            b"Subject: x\r\n\r\na\n.\r\nRSET\r\n.\r\n",
        ),
        // --- MAIL parameters ---
        refused(
            "SIZE beyond the integer range does not wrap",
            vec![step(
                "MAIL FROM:<app@app.example> SIZE=99999999999999999999999",
                552,
                "5.3.4",
            )],
        ),
        refused(
            "SIZE one above the integer range",
            vec![step(
                "MAIL FROM:<app@app.example> SIZE=18446744073709551616",
                552,
                "5.3.4",
            )],
        ),
        refused(
            "SIZE above the limit",
            vec![step("MAIL FROM:<app@app.example> SIZE=26214401", 552, "5.3.4")],
        ),
        accepted(
            "SIZE within the limit",
            "MAIL FROM:<app@app.example> SIZE=100",
            "RCPT TO:<p-size@example.com>",
            b"Subject: size\r\n\r\nx\r\n.\r\n",
            Upstreamed {
                mail: MAIL_LINE,
                rcpt: b"RCPT TO:<p-size@example.com>\r\n",
                content: b"Subject: size\r\n\r\nx\r\n.\r\n",
            },
        ),
        accepted(
            "BODY=8BITMIME with 8-bit content",
            "MAIL FROM:<app@app.example> BODY=8BITMIME",
            "RCPT TO:<p-8bit@example.com>",
            "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve\r\n.\r\n".as_bytes(),
            Upstreamed {
                mail: b"MAIL FROM:<app@app.example> BODY=8BITMIME\r\n",
                rcpt: b"RCPT TO:<p-8bit@example.com>\r\n",
                content: "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve\r\n.\r\n".as_bytes(),
            },
        ),
        refused(
            "an unknown parameter",
            vec![step("MAIL FROM:<app@app.example> X-FOO=1", 555, "5.5.4")],
        ),
        refused(
            "invalid UTF-8 in a parameter",
            vec![step(b"MAIL FROM:<app@app.example> ENVID=\xff", 501, "5.5.4")],
        ),
        // --- Address forms ---
        accepted(
            "a quoted local part cannot inject parameters",
            "MAIL FROM:<\"a> AUTH=<ceo@corp.example>\"@good.example>",
            "RCPT TO:<a-inject@example.com>",
            b"Subject: q\r\n\r\nx\r\n.\r\n",
            Upstreamed {
                mail: b"MAIL FROM:<\"a> AUTH=<ceo@corp.example>\"@good.example>\r\n",
                rcpt: b"RCPT TO:<a-inject@example.com>\r\n",
                content: b"Subject: q\r\n\r\nx\r\n.\r\n",
            },
        ),
        accepted(
            "a quoted recipient with a parameter inside",
            SENDER,
            "RCPT TO:<\"x> NOTIFY=NEVER\"@example.com>",
            b"Subject: q\r\n\r\nx\r\n.\r\n",
            Upstreamed {
                mail: MAIL_LINE,
                rcpt: b"RCPT TO:<\"x> NOTIFY=NEVER\"@example.com>\r\n",
                content: b"Subject: q\r\n\r\nx\r\n.\r\n",
            },
        ),
        accepted(
            "a quoted recipient with a space",
            SENDER,
            "RCPT TO:<\"john smith\"@example.com>",
            b"Subject: q\r\n\r\nx\r\n.\r\n",
            Upstreamed {
                mail: MAIL_LINE,
                rcpt: b"RCPT TO:<\"john smith\"@example.com>\r\n",
                content: b"Subject: q\r\n\r\nx\r\n.\r\n",
            },
        ),
        accepted(
            "quoted-pairs keep their escapes",
            SENDER,
            "RCPT TO:<\"a\\\"b\\\\c\"@example.com>",
            b"Subject: q\r\n\r\nx\r\n.\r\n",
            Upstreamed {
                mail: MAIL_LINE,
                rcpt: b"RCPT TO:<\"a\\\"b\\\\c\"@example.com>\r\n",
                content: b"Subject: q\r\n\r\nx\r\n.\r\n",
            },
        ),
        accepted(
            "needless quotes are dropped",
            SENDER,
            "RCPT TO:<\"a-plain\"@example.com>",
            b"Subject: q\r\n\r\nx\r\n.\r\n",
            Upstreamed {
                mail: MAIL_LINE,
                rcpt: b"RCPT TO:<a-plain@example.com>\r\n",
                content: b"Subject: q\r\n\r\nx\r\n.\r\n",
            },
        ),
        accepted(
            "a source route is dropped",
            SENDER,
            "RCPT TO:<@relay.test:a-route@example.com>",
            b"Subject: q\r\n\r\nx\r\n.\r\n",
            Upstreamed {
                mail: MAIL_LINE,
                rcpt: b"RCPT TO:<a-route@example.com>\r\n",
                content: b"Subject: q\r\n\r\nx\r\n.\r\n",
            },
        ),
        accepted(
            "the null reverse path",
            "MAIL FROM:<>",
            "RCPT TO:<a-null@example.com>",
            b"Subject: q\r\n\r\nx\r\n.\r\n",
            Upstreamed {
                mail: b"MAIL FROM:<>\r\n",
                rcpt: b"RCPT TO:<a-null@example.com>\r\n",
                content: b"Subject: q\r\n\r\nx\r\n.\r\n",
            },
        ),
        refused(
            "a control character in a quoted recipient",
            vec![mail_ok(SENDER), step(b"RCPT TO:<\"a\x01b\"@example.com>", 553, "5.1.3")],
        ),
        refused(
            "a CR in a quoted recipient",
            vec![mail_ok(SENDER), step(b"RCPT TO:<\"a\rb\"@example.com>", 553, "5.1.3")],
        ),
        refused(
            "a tab in a quoted sender",
            vec![step(b"MAIL FROM:<\"a\tb\"@app.example>", 553, "5.1.7")],
        ),
        refused(
            "a local part over 64 octets",
            vec![mail_ok(SENDER), step(long_local, 501, "5.1.3")],
        ),
        refused(
            "an address over 256 octets",
            vec![mail_ok(SENDER), step(long_address, 501, "5.1.3")],
        ),
        // --- Non-ASCII addresses (RFC 6531) ---
        refused(
            "a UTF-8 recipient without SMTPUTF8",
            vec![mail_ok(SENDER), step("RCPT TO:<jos\u{e9}@example.com>", 553, "5.6.7")],
        ),
        refused(
            "a UTF-8 sender without SMTPUTF8",
            vec![step("MAIL FROM:<jos\u{e9}@app.example>", 553, "5.6.7")],
        ),
        refused(
            "a U-label domain without SMTPUTF8",
            vec![mail_ok(SENDER), step("RCPT TO:<u@b\u{fc}cher.example>", 553, "5.6.7")],
        ),
        accepted(
            "a UTF-8 recipient with SMTPUTF8",
            "MAIL FROM:<app@app.example> SMTPUTF8",
            "RCPT TO:<jos\u{e9}@example.com>",
            b"Subject: u\r\n\r\nx\r\n.\r\n",
            Upstreamed {
                // 8-bit because the relay's Received field names the recipient.
                mail: b"MAIL FROM:<app@app.example> BODY=8BITMIME SMTPUTF8\r\n",
                rcpt: "RCPT TO:<jos\u{e9}@example.com>\r\n".as_bytes(),
                content: b"Subject: u\r\n\r\nx\r\n.\r\n",
            },
        ),
        accepted(
            "a U-label domain with SMTPUTF8 goes out as A-labels",
            "MAIL FROM:<app@app.example> SMTPUTF8",
            "RCPT TO:<u-label@b\u{fc}cher.example>",
            b"Subject: u\r\n\r\nx\r\n.\r\n",
            Upstreamed {
                mail: MAIL_LINE,
                rcpt: b"RCPT TO:<u-label@xn--bcher-kva.example>\r\n",
                content: b"Subject: u\r\n\r\nx\r\n.\r\n",
            },
        ),
        // --- Invalid UTF-8 ---
        refused(
            "invalid UTF-8 in the sender",
            vec![step(b"MAIL FROM:<app\xff@app.example> SMTPUTF8", 553, "5.1.7")],
        ),
        refused(
            "invalid UTF-8 in a recipient",
            vec![
                mail_ok("MAIL FROM:<app@app.example> SMTPUTF8"),
                step(b"RCPT TO:<user\xc3@example.com>", 553, "5.1.3"),
            ],
        ),
        refused(
            "invalid UTF-8 in a recipient domain",
            vec![mail_ok(SENDER), step(b"RCPT TO:<user@exa\xffmple.com>", 553, "5.1.3")],
        ),
        // --- Overlong lines ---
        refused(
            "an overlong command line, then the session goes on",
            vec![step(long_command, 500, "5.5.2"), step("NOOP", 250, "2.0.0")],
        ),
        refused("an overlong MAIL line", vec![step(long_mail, 500, "5.5.2")]),
    ]
}

/// An upstream that does not offer SIZE, so the MAIL lines the relay writes do not depend on
/// the message size.
fn no_size() -> Script {
    Script::new().ehlo_extensions(["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"])
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

/// Checks `got` against `want`: the envelope lines exactly, and the content exactly after the
/// relay's own trace fields (nothing else may come before it).
fn check_upstream(name: &str, got: &Received, want: &Upstreamed) -> Result<(), String> {
    let lines: Vec<String> = got.envelope_lines.iter().map(|l| show(l)).collect();
    if got.envelope_lines != [want.mail.to_vec(), want.rcpt.to_vec()] {
        return Err(format!(
            "{name}: envelope {lines:?}, want [{:?}, {:?}]",
            show(want.mail),
            show(want.rcpt)
        ));
    }
    let wire = &got.wire_data;
    let Some(prefix) = wire.strip_suffix(want.content) else {
        return Err(format!(
            "{name}: content\n{}\ndoes not end with\n{}",
            show(wire),
            show(want.content)
        ));
    };
    let prefix = String::from_utf8_lossy(prefix);
    let only_trace = prefix.starts_with("Received: from ")
        && prefix.ends_with("\r\n")
        && prefix.split("\r\n").all(|l| {
            l.is_empty() || l.starts_with("Received: ") || l.starts_with('\t') || l.starts_with("Message-ID: <")
        });
    if !only_trace {
        return Err(format!("{name}: unexpected bytes before the content: {prefix:?}"));
    }
    Ok(())
}

#[tokio::test]
async fn conformance_table() {
    let up = SmtpServer::start(no_size()).unwrap();
    // Routed by recipient domain, so a quoted local part must not hide the domain.
    let r = start(
        &route("up", up.port(), 10, &["example.com", "xn--bcher-kva.example"]),
        "memory",
        |_| {},
    )
    .await;
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let mut c = SmtpClient::connect(r.smtp()).await.unwrap();
        assert_eq!(c.ehlo("client.example").await.unwrap().code, 250);
        for (i, s) in case.steps.iter().enumerate() {
            c.send_raw(&s.send).await.unwrap();
            let reply = c.read_reply().await;
            match reply {
                Ok(reply) if reply.code == s.code && reply.text().starts_with(s.enhanced) => {}
                other => {
                    failures.push(format!(
                        "{}: step {i} {:?}: want {} {}, got {other:?}",
                        case.name,
                        show(&s.send).chars().take(120).collect::<String>(),
                        s.code,
                        s.enhanced
                    ));
                    break;
                }
            }
        }
        let _ = c.quit().await;
    }

    let expected: Vec<&Case> = cases.iter().filter(|c| c.upstream.is_some()).collect();
    let got = up.wait_for(expected.len(), WAIT).await.unwrap();
    for case in &expected {
        let want = case.upstream.as_ref().unwrap();
        let found: Vec<&Received> = got
            .iter()
            .filter(|m| m.envelope_lines.get(1).map(Vec::as_slice) == Some(want.rcpt))
            .collect();
        match found.as_slice() {
            [one] => {
                if let Err(e) = check_upstream(case.name, one, want) {
                    failures.push(e);
                }
            }
            _ => failures.push(format!(
                "{}: {} messages with {:?}; upstream got {:?}",
                case.name,
                found.len(),
                show(want.rcpt),
                got.iter()
                    .map(|m| m.envelope_lines.iter().map(|l| show(l)).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(got.len(), expected.len(), "nothing else reaches the upstream");
    r.relay.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Every outbound path writes envelope addresses in RFC 5321 form
// ---------------------------------------------------------------------------------------------

/// Stored (unquoted) form of `"a> AUTH=<ceo@corp.example>"@good.example`.
const INJECTING_SENDER: &str = "a> AUTH=<ceo@corp.example>@good.example";
const QUOTED_SENDER: &str = "\"a> AUTH=<ceo@corp.example>\"@good.example";

fn deliverer(mx_port: u16) -> Deliverer {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    Deliverer::new(
        DelivererConfig {
            mx_port,
            helo_name: "relay.test".into(),
            ..DelivererConfig::default()
        },
        Arc::new(
            StaticResolver::new()
                .with_mx("mx.test", 10, "mx1.mx.test")
                .with_host("mx1.mx.test", lo),
        ),
    )
    .expect("deliverer")
}

/// A plain smarthost target with 10 s per step.
fn smarthost(port: u16) -> DeliveryTarget {
    let mut t = plain("mail/up", port);
    t.timeouts = SessionTimeouts {
        connect_ms: 10_000,
        greeting_ms: 10_000,
        mail_ms: 10_000,
        rcpt_ms: 10_000,
        data_init_ms: 10_000,
        data_transfer_ms: 10_000,
        data_done_ms: 10_000,
    };
    t
}

/// Smarthost with and without PIPELINING (two code paths) and MX: the quoted sender and a
/// quoted recipient go out quoted, and a first line starting with a dot is stuffed.
#[tokio::test]
async fn every_outbound_path_quotes_local_parts_and_stuffs_the_first_line() {
    let body: &[u8] = b".hidden first line\r\nSubject: none\r\n";
    let pipelining = SmtpServer::start(no_size()).unwrap();
    let lockstep = SmtpServer::start(Script::new().ehlo_extensions(["8BITMIME", "ENHANCEDSTATUSCODES"])).unwrap();
    let mx = SmtpServer::start(no_size()).unwrap();
    let paths = [
        (
            "smarthost, pipelining",
            &pipelining,
            smarthost(pipelining.port()),
            "x y@example.com",
        ),
        (
            "smarthost, no pipelining",
            &lockstep,
            smarthost(lockstep.port()),
            "x y@example.com",
        ),
        ("MX", &mx, DeliveryTarget::direct_mx("mail/direct"), "x y@mx.test"),
    ];
    for (name, server, target, rcpt) in paths {
        let d = deliverer(mx.port());
        let env = Envelope {
            mail_from: INJECTING_SENDER,
            rcpt_to: rcpt,
        };
        let r = d.deliver(&target, None, None, &env, body).await;
        assert!(r.is_delivered(), "{name}: {r:?}");
        let got = server.wait_for(1, WAIT).await.unwrap();
        let (local, domain) = rcpt.rsplit_once('@').unwrap();
        let envelope: Vec<String> = got[0].envelope_lines.iter().map(|l| show(l)).collect();
        assert_eq!(
            (envelope, show(&got[0].wire_data)),
            (
                vec![
                    show(format!("MAIL FROM:<{QUOTED_SENDER}>\r\n").as_bytes()),
                    show(format!("RCPT TO:<\"{local}\"@{domain}>\r\n").as_bytes())
                ],
                show(b"..hidden first line\r\nSubject: none\r\n.\r\n")
            ),
            "{name}"
        );
    }
}

/// A DSN to a sender with a quoted local part: quoted in the envelope and in its header fields.
#[tokio::test]
async fn a_dsn_to_a_quoted_sender_keeps_the_quotes() {
    let up = SmtpServer::start(no_size()).unwrap();
    let t = |m| Utc.with_ymd_and_hms(2026, 3, 1, 10, m, 0).single().expect("time");
    let rcpts = [RecipientReport {
        recipient: "x y@example.com".into(),
        action: Action::Failed,
        status: mailroute_relay::EnhancedStatusCode::new(5, 1, 1),
        remote_mta: None,
        diagnostic: None,
        reason: "the recipient's server rejected the message".into(),
        last_attempt: Some(t(1)),
        will_retry_until: None,
    }];
    let dsn = dsn::build(
        &DsnRequest {
            reporting_mta: "relay.test",
            original_sender: INJECTING_SENDER,
            arrival_date: t(0),
            queue_id: Some("q1"),
            recipients: &rcpts,
            original: b"Subject: hi\r\n\r\nbody\r\n",
        },
        t(2),
        "dsn1",
    );
    let env = Envelope {
        mail_from: &dsn.mail_from,
        rcpt_to: &dsn.rcpt_to,
    };
    let r = deliverer(up.port())
        .deliver(&smarthost(up.port()), None, None, &env, &dsn.message)
        .await;
    assert!(r.is_delivered(), "{r:?}");
    let got = up.wait_for(1, WAIT).await.unwrap();
    let envelope: Vec<String> = got[0].envelope_lines.iter().map(|l| show(l)).collect();
    assert_eq!(
        envelope,
        [
            show(b"MAIL FROM:<>\r\n"),
            show(format!("RCPT TO:<{QUOTED_SENDER}>\r\n").as_bytes())
        ]
    );
    let text = got[0].data_str().replace("\r\n ", " ");
    assert!(text.contains(&format!("\r\nTo: <{QUOTED_SENDER}>\r\n")), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; \"x y\"@example.com\r\n"),
        "{text}"
    );
}

/// An address that cannot be written safely (here a CR LF that would start a new command, as
/// only a queue entry from before the inbound checks could hold) is refused before anything
/// is sent, permanently, and the connection stays usable.
#[tokio::test]
async fn an_unwritable_address_is_never_sent() {
    let up = SmtpServer::start(no_size()).unwrap();
    let d = deliverer(up.port());
    let target = smarthost(up.port());
    for (mail_from, rcpt_to, stage) in [
        ("app@app.example", "a\r\nRSET@example.com", Stage::RcptTo),
        (
            "a\r\nMAIL FROM:<x@y.example>@app.example",
            "b@example.com",
            Stage::MailFrom,
        ),
    ] {
        let env = Envelope { mail_from, rcpt_to };
        let r = d.deliver(&target, None, None, &env, b"Subject: x\r\n\r\nx\r\n").await;
        match &r.outcome {
            Outcome::Rejected { stage: s, reply } => {
                assert_eq!(*s, stage, "{r:?}");
                assert_eq!(reply.code, 553, "{r:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.verdict().map(|v| v.kind), Some(Kind::Permanent), "{r:?}");
    }
    // The same connection then delivers a good message: nothing was left half-sent.
    let env = Envelope {
        mail_from: "app@app.example",
        rcpt_to: "ok@example.com",
    };
    let r = d.deliver(&target, None, None, &env, b"Subject: x\r\n\r\nx\r\n").await;
    assert!(r.is_delivered(), "{r:?}");
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].envelope_lines,
        [
            b"MAIL FROM:<app@app.example>\r\n".to_vec(),
            b"RCPT TO:<ok@example.com>\r\n".to_vec()
        ]
    );
    assert_eq!(up.attempts(), 1, "no other transaction reached the upstream");
}
