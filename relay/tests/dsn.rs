//! A permanent rejection turned into an RFC 3464 DSN and delivered back to the sender over real
//! SMTP: the DSN carries the remote reply, travels with the null reverse path (also through a
//! route with a From override), and the sender's server receives a well-formed report.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use mail_parser::{MessageParser, MimeHeaders, PartType};
use mailroute_relay::outbound::bounce::Kind;
use mailroute_relay::outbound::delivery::{
    AttemptResult, Deliverer, DelivererConfig, DeliveryTarget, Envelope, Outcome, StaticResolver,
};
use mailroute_relay::outbound::dsn::{self, Action, DsnRequest, RecipientReport};
use mailroute_testkit::smtp::{Behaviour, Script, SmtpServer};

const WAIT: Duration = Duration::from_secs(10);

const ORIGINAL: &[u8] = b"From: Shop <orders@shop.test>\r\n\
To: alice@example.test\r\n\
Subject: Your order\r\n\
Message-ID: <order-7@shop.test>\r\n\
\r\n\
Private body text that must not come back.\r\n";

fn report_for(attempt: &AttemptResult, rcpt: &str) -> RecipientReport {
    let verdict = attempt.verdict().expect("a failed attempt");
    let (status, diagnostic) = match &attempt.outcome {
        Outcome::Rejected { reply, .. } => (dsn::status_for_reply(reply), Some(reply.clone())),
        Outcome::Failed { failure, .. } => (dsn::status_for_failure(*failure), None),
        other => panic!("unexpected outcome {other:?}"),
    };
    RecipientReport {
        recipient: rcpt.into(),
        action: if verdict.kind == Kind::Permanent {
            Action::Failed
        } else {
            Action::Delayed
        },
        status,
        remote_mta: attempt.remote_host.clone(),
        diagnostic,
        reason: format!("the recipient's server rejected the message ({})", verdict.class),
        last_attempt: Some(Utc.with_ymd_and_hms(2026, 3, 1, 10, 1, 0).single().expect("time")),
        will_retry_until: None,
    }
}

#[tokio::test]
async fn rejected_message_bounces_to_the_sender_with_null_reverse_path() {
    // The recipient's MX rejects the message permanently.
    let recipient_mx = SmtpServer::start(Script::new().then(Behaviour::PermFail(
        "550 5.1.1 <alice@example.test>: User unknown".into(),
    )))
    .expect("recipient mx");
    // The sender's MX takes the DSN.
    let sender_mx = SmtpServer::start(Script::new()).expect("sender mx");
    assert_ne!(recipient_mx.port(), sender_mx.port());

    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let recipient_side = Deliverer::new(
        DelivererConfig {
            mx_port: recipient_mx.port(),
            helo_name: "relay.test".into(),
            ..DelivererConfig::default()
        },
        Arc::new(
            StaticResolver::new()
                .with_mx("example.test", 10, "mx.example.test")
                .with_host("mx.example.test", lo),
        ),
    )
    .expect("deliverer");
    let target = DeliveryTarget::direct_mx("mail/direct");
    let original_env = Envelope {
        mail_from: "orders@shop.test",
        rcpt_to: "alice@example.test",
    };
    let attempt = recipient_side
        .deliver(&target, None, None, &original_env, ORIGINAL)
        .await;
    assert_eq!(attempt.verdict().map(|v| v.kind), Some(Kind::Permanent), "{attempt:?}");

    // Build the DSN from what the remote side said.
    assert!(dsn::should_bounce(original_env.mail_from));
    let reports = [report_for(&attempt, "alice@example.test")];
    let req = DsnRequest {
        reporting_mta: "relay.test",
        original_sender: original_env.mail_from,
        arrival_date: Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).single().expect("time"),
        queue_id: Some("q-7"),
        recipients: &reports,
        original: ORIGINAL,
    };
    let report = dsn::build(
        &req,
        Utc.with_ymd_and_hms(2026, 3, 1, 10, 2, 0).single().expect("time"),
        "dsn-7",
    );

    // Deliver it to the sender's domain, through a route that overrides the sender: the
    // envelope must stay null.
    let sender_side = Deliverer::new(
        DelivererConfig {
            mx_port: sender_mx.port(),
            helo_name: "relay.test".into(),
            ..DelivererConfig::default()
        },
        Arc::new(
            StaticResolver::new()
                .with_mx("shop.test", 10, "mx.shop.test")
                .with_host("mx.shop.test", lo),
        ),
    )
    .expect("deliverer");
    let mut route = DeliveryTarget::direct_mx("mail/overriding");
    route.from_override = Some("noreply@relay.test".into());
    let dsn_env = Envelope {
        mail_from: &report.mail_from,
        rcpt_to: &report.rcpt_to,
    };
    let sent = sender_side.deliver(&route, None, None, &dsn_env, &report.message).await;
    assert!(sent.is_delivered(), "{sent:?}");

    let got = sender_mx.wait_for(1, WAIT).await.expect("DSN received");
    assert_eq!(got[0].mail_from, "", "a DSN travels with MAIL FROM:<>");
    assert_eq!(got[0].rcpts, ["orders@shop.test"]);

    let msg = MessageParser::default().parse(&got[0].data).expect("DSN parses");
    let ct = msg.root_part().content_type().expect("content type");
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    assert_eq!(msg.header_raw("Auto-Submitted").map(str::trim), Some("auto-replied"));
    let PartType::Multipart(children) = &msg.root_part().body else {
        panic!("not multipart");
    };
    assert_eq!(children.len(), 3);
    let raw = got[0].data_str();
    assert!(raw.contains("Final-Recipient: rfc822; alice@example.test\r\n"), "{raw}");
    assert!(raw.contains("Action: failed\r\n"), "{raw}");
    assert!(raw.contains("Status: 5.1.1\r\n"), "{raw}");
    assert!(raw.contains("Remote-MTA: dns; mx.example.test\r\n"), "{raw}");
    assert!(
        raw.contains("Diagnostic-Code: smtp; 550 5.1.1 <alice@example.test>: User unknown\r\n"),
        "{raw}"
    );
    assert!(
        raw.contains("Message-ID: <order-7@shop.test>"),
        "original headers included: {raw}"
    );
    assert!(
        !raw.contains("Private body text"),
        "the original body is never returned"
    );
}

#[test]
fn a_bounce_never_bounces() {
    // The DSN's own envelope sender is null, so a failure to deliver it produces no DSN.
    let reports: [RecipientReport; 0] = [];
    let req = DsnRequest {
        reporting_mta: "relay.test",
        original_sender: "orders@shop.test",
        arrival_date: mailroute_relay::clock::now(),
        queue_id: None,
        recipients: &reports,
        original: ORIGINAL,
    };
    let d = dsn::build(&req, mailroute_relay::clock::now(), "x");
    assert!(!dsn::should_bounce(&d.mail_from));
    assert!(!dsn::should_bounce("MAILER-DAEMON@relay.test"));
}
