//! Connection test of a route's upstream: for an OAuth2 route first an access token from the
//! provider's token endpoint (`mailroute_oauth`, the grant and request code the relays use), then
//! connect (plain + STARTTLS, or implicit TLS), verify the certificate as the route says (system
//! roots plus the route's CA bundle), EHLO, AUTH with the route's credentials (XOAUTH2 with the
//! token) and optionally send a test message, through the relay's own SMTP client
//! (`mailroute_smtp::client`), so the `Verified` condition quotes a reply, or the token
//! endpoint's error, as the delivery log would; the record keeps the upstream's replies step by
//! step (what `mailroute route test` prints). Also the pure parts: the fingerprint of what is
//! tested, when a test is due (on change, on request through `mailroute.io/test-requested`, on
//! schedule), and the `Verified` condition a result gives.
//! It never writes to Kubernetes and never logs credentials or tokens. It fetches its own token
//! and does not share the relays' token cache (the operator has no Redis).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use mailroute_api::config::{Credentials, OAuth2Credentials, Upstream, short_hash};
use mailroute_api::route::AuthMechanism;
use mailroute_api::route::TlsMode;
use mailroute_api::status::{ConnectionTest, StepReply, condition_type};
use mailroute_oauth::{OAuthError, TokenClient};
use mailroute_smtp::client;
use mailroute_smtp::{Connection, Dialogue, ErrorKind, OpenSpec, Stage, StepError, Timeouts, TlsUse};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use serde_json::json;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, AUTH_XOAUTH2};

use crate::clock;
use crate::conditions::{Desired, Status};

/// `result` of a successful test.
pub const SUCCEEDED: &str = "Succeeded";
/// `result` of a failed test.
pub const FAILED: &str = "Failed";

/// One test to run. `Debug` shows no secret (`Credentials` redacts the password,
/// `OAuth2Credentials` shows the grant and the user only).
#[derive(Clone, Debug)]
pub struct ConnTestJob {
    /// `namespace/name` of the route.
    pub route_id: String,
    pub upstream: Upstream,
    pub credentials: Option<Credentials>,
    /// The OAuth2 client of an `auth.oauth2` route: the test gets a token with it first.
    pub oauth2: Option<OAuth2Credentials>,
    /// Extra trusted CA bundle (PEM).
    pub ca_pem: Option<String>,
    /// Send a test message as part of this run.
    pub message: Option<TestMessage>,
    pub fingerprint: String,
    /// The reply to an earlier test message for the same fingerprint, kept in the new record so
    /// the message is not sent again.
    pub previous_test_message: Option<String>,
    /// The test request (`mailroute.io/test-requested`) the record answers, or carries on.
    pub request_id: Option<String>,
}

/// Envelope of the test message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestMessage {
    pub from: String,
    pub to: String,
}

/// How tests talk to upstreams.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Name sent in EHLO.
    pub helo_name: String,
    /// Limit for each step (connect, each command, the TLS handshake, the token request).
    pub timeout: Duration,
    /// Fetches OAuth2 tokens (HTTPS, trusting the system's roots); `None` when this system has
    /// no trusted roots, which fails the test of OAuth2 routes at the token step.
    pub token_client: Option<TokenClient>,
}

/// Whether a route's upstream should be tested now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Run {
        send_message: bool,
    },
    /// Nothing changed and the last test is recent: test again after this long.
    Wait(Duration),
}

/// Whether the route asks for a test (`requested`, its `mailroute.io/test-requested`
/// annotation) that no record answered yet (`answered`, the newest record's `requestId`).
pub fn request_pending(requested: Option<&str>, answered: Option<&str>) -> bool {
    requested.is_some_and(|r| !r.is_empty() && Some(r) != answered)
}

/// Tests on create and change (a new fingerprint) and on request at once, otherwise once per
/// `interval`. The test message goes out once per fingerprint: only when no earlier run for the
/// same fingerprint had it accepted.
pub fn decide(
    last: Option<&ConnectionTest>,
    fingerprint: &str,
    wants_message: bool,
    requested: bool,
    now: Timestamp,
    interval: Duration,
) -> Decision {
    let Some(last) = last.filter(|l| l.fingerprint.as_deref() == Some(fingerprint)) else {
        return Decision::Run {
            send_message: wants_message,
        };
    };
    let send_message = wants_message && last.test_message.is_none();
    if requested {
        return Decision::Run { send_message };
    }
    let Some(when) = clock::parse(&last.time) else {
        return Decision::Run { send_message };
    };
    let age = clock::age(when, now);
    if age >= interval {
        Decision::Run { send_message }
    } else {
        Decision::Wait(interval - age)
    }
}

/// Identifies what a test covers: the effective upstream settings, the test envelope and the
/// resource versions of the Secrets used. It contains no secret material.
pub fn fingerprint(upstream: &Upstream, message: Option<&TestMessage>, secret_versions: &[(String, String)]) -> String {
    let doc = json!({
        "upstream": upstream,
        "message": message.map(|m| json!({"from": m.from, "to": m.to})),
        "secrets": secret_versions,
    });
    short_hash(doc.to_string().as_bytes())
}

fn endpoint(upstream: &Upstream) -> String {
    format!("{}:{}", upstream.host, upstream.port)
}

fn tls_words(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::None => "no TLS",
        TlsMode::Starttls => "STARTTLS",
        TlsMode::Implicit => "implicit TLS",
    }
}

/// The `Verified` condition a test record gives.
pub fn verified_condition(upstream: &Upstream, record: &ConnectionTest) -> Desired {
    let at = endpoint(upstream);
    if record.result == SUCCEEDED {
        let auth = match upstream.auth {
            Some(m) => format!(", AUTH {} accepted", mailroute_api::compile::mechanism_name(m)),
            None => String::new(),
        };
        let mut message = format!("{at} ({}): EHLO succeeded{auth}", tls_words(upstream.tls));
        if let Some(reply) = &record.test_message {
            message.push_str(&format!("; test message accepted: {reply}"));
        }
        return Desired::new(condition_type::VERIFIED, Status::True, "Connected", message);
    }
    let step = record.step.as_deref().unwrap_or("connect");
    let (reason, what) = match step {
        "connect" => ("ConnectionFailed", "connect"),
        "greeting" => ("GreetingRejected", "greeting"),
        "ehlo" => ("EhloRejected", "EHLO"),
        "starttls" => ("StartTlsFailed", "STARTTLS"),
        "tls" => ("TlsFailed", "TLS handshake"),
        "auth" => ("AuthenticationFailed", "AUTH"),
        "token" => ("TokenRequestFailed", "OAuth2 token request"),
        _ => ("TestMessageRejected", "test message"),
    };
    let detail = record
        .reply
        .as_deref()
        .or(record.error.as_deref())
        .unwrap_or("no reply");
    Desired::new(
        condition_type::VERIFIED,
        Status::False,
        reason,
        format!("{at}: {what} failed: {detail}"),
    )
}

struct Failure {
    step: &'static str,
    reply: Option<String>,
    error: Option<String>,
}

impl Failure {
    fn error(step: &'static str, error: impl Into<String>) -> Self {
        Self {
            step,
            reply: None,
            error: Some(error.into()),
        }
    }

    /// A step of the shared SMTP client that failed, in the test's steps and words: the
    /// upstream's reply exactly as the relay's delivery log would quote it.
    fn from_step(e: StepError) -> Self {
        let step = match (&e.kind, e.stage) {
            (ErrorKind::TlsHandshake(_) | ErrorKind::TlsTimeout | ErrorKind::Tls(_), _) => "tls",
            (_, Stage::Setup | Stage::Dns | Stage::Connect) => "connect",
            (_, Stage::Greeting) => "greeting",
            (_, Stage::Ehlo) => "ehlo",
            (_, Stage::StartTls) => "starttls",
            (_, Stage::Auth) => "auth",
            (_, Stage::Reset | Stage::MailFrom | Stage::RcptTo | Stage::Data | Stage::Message) => "send",
        };
        let error = match e.kind {
            ErrorKind::Reply(r) => {
                return Self {
                    step,
                    reply: Some(r.to_string()),
                    error: None,
                };
            }
            ErrorKind::ConnectTimeout(d) => format!("timed out after {d:?}"),
            ErrorKind::TlsHandshake(e) => e,
            ErrorKind::TlsTimeout | ErrorKind::NoGreeting | ErrorKind::Timeout(_) => "timed out".into(),
            ErrorKind::StartTlsNotOffered => "the upstream does not offer STARTTLS".into(),
            ErrorKind::AuthNotOffered { wanted, offered } => format!(
                "the upstream does not offer AUTH {} (it offers: {})",
                client::mechanism_name(wanted),
                offered_mechanisms(offered)
            ),
            other => other.detail(),
        };
        Self::error(step, error)
    }
}

/// Why a route that requires AUTH has no credentials in the compiled Secret.
fn missing_credentials(mechanism: AuthMechanism) -> String {
    match mechanism {
        AuthMechanism::Xoauth2 => "the route requires AUTH XOAUTH2 and its Secret gives neither a token nor an OAuth2 \
                                   client: the relays defer its mail"
            .to_string(),
        other => {
            format!("the route requires AUTH {other:?} and its Secret gives no credentials: the relays defer its mail")
        }
    }
}

/// A failed token request in the test's words: the endpoint's host (not the path, which holds
/// the tenant) and the provider's own error (`invalid_client: AADSTS7000215: Invalid client
/// secret provided. ...`, `invalid_grant`).
fn token_failure(url: &str, e: &OAuthError) -> Failure {
    let error = match e {
        // Says which endpoint itself.
        OAuthError::Transport { .. } => e.to_string(),
        _ => format!("{}: {e}", mailroute_oauth::endpoint_name(url)),
    };
    Failure::error("token", error)
}

/// An access token for the route's OAuth2 client, as a relay would get it (without the relays'
/// shared cache): the credentials XOAUTH2 sends.
async fn oauth2_credentials(o: &OAuth2Credentials, settings: &Settings) -> Result<Credentials, Failure> {
    let grant = mailroute_oauth::grant_from(o).map_err(|e| token_failure(&o.token_url, &e))?;
    let Some(client) = &settings.token_client else {
        return Err(Failure::error(
            "token",
            "no trusted root certificates on this system to reach the token endpoint",
        ));
    };
    let client = client.clone().with_timeout(settings.timeout);
    let token = client
        .fetch(&grant, None)
        .await
        .map_err(|e| token_failure(grant.token_url(), &e))?;
    Ok(Credentials {
        username: o.user.clone(),
        password: token.access_token.expose().to_string(),
    })
}

/// Runs one test and returns the record for `status.lastConnectionTest`. Never fails: every
/// problem is a `Failed` record naming the step and the upstream's reply or the error.
pub async fn run(job: &ConnTestJob, settings: &Settings) -> ConnectionTest {
    let mut dialogue = Dialogue::recording();
    let outcome = session(job, settings, &mut dialogue).await;
    let (result, step, reply, error, test_message) = match outcome {
        Ok(sent) => (
            SUCCEEDED,
            None,
            None,
            None,
            sent.or_else(|| job.previous_test_message.clone()),
        ),
        Err(f) => (FAILED, Some(f.step.to_string()), f.reply, f.error, None),
    };
    ConnectionTest {
        time: clock::format(Timestamp::now()),
        result: result.to_string(),
        step,
        reply,
        error,
        fingerprint: Some(job.fingerprint.clone()),
        test_message,
        request_id: job.request_id.clone(),
        replies: dialogue
            .replies()
            .iter()
            .map(|(stage, reply)| StepReply {
                step: stage_name(*stage).to_string(),
                reply: shorten(&reply.to_string()),
            })
            .collect(),
    }
}

/// A step's name in the record, as `step` names a failing one.
fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Greeting => "greeting",
        Stage::Ehlo => "ehlo",
        Stage::StartTls => "starttls",
        Stage::Auth => "auth",
        _ => "send",
    }
}

/// Longest reply kept in a record (a status is not a place for a banner novel).
const MAX_REPLY: usize = 512;

fn shorten(reply: &str) -> String {
    if reply.chars().count() <= MAX_REPLY {
        return reply.to_string();
    }
    let mut s: String = reply.chars().take(MAX_REPLY).collect();
    s.push_str(" ...");
    s
}

/// The relay's own dialogue (`mailroute_smtp::client`) with the route's settings: connect, TLS
/// as configured, EHLO, AUTH with exactly the configured mechanism, the test message if asked.
async fn session(job: &ConnTestJob, settings: &Settings, dialogue: &mut Dialogue) -> Result<Option<String>, Failure> {
    let up = &job.upstream;
    let tls_config = tls_config(up, job.ca_pem.as_deref()).map_err(|e| Failure::error("tls", e))?;
    let name = up.server_name.clone().unwrap_or_else(|| up.host.clone());
    let server_name = ServerName::try_from(name).map_err(|e| Failure::error("tls", e.to_string()))?;
    let lookup = tokio::net::lookup_host((up.host.as_str(), up.port));
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(settings.timeout, lookup).await {
        Err(_) => {
            return Err(Failure::error(
                "connect",
                format!("timed out after {:?}", settings.timeout),
            ));
        }
        Ok(Err(e)) => return Err(Failure::error("connect", e.to_string())),
        Ok(Ok(addrs)) => addrs.collect(),
    };
    let tls = match up.tls {
        TlsMode::Implicit => TlsUse::Implicit,
        TlsMode::Starttls => TlsUse::RequireStartTls,
        TlsMode::None => TlsUse::Plain,
    };
    // An OAuth2 route: the token first, as the relays do before they connect.
    let fetched = match &job.oauth2 {
        Some(o) if up.auth.is_some() => Some(oauth2_credentials(o, settings).await?),
        _ => None,
    };
    let auth = match (up.auth, fetched.as_ref().or(job.credentials.as_ref())) {
        (Some(mechanism), Some(creds)) => Some((creds, Some(mechanism))),
        // The relay never sends such a route's mail without AUTH: the test must not pass either.
        (Some(mechanism), None) => return Err(Failure::error("auth", missing_credentials(mechanism))),
        (None, _) => None,
    };
    // Each address in turn while it cannot be reached, as a TCP connect to the name would.
    let mut last = Failure::error("connect", format!("{}: no address", up.host));
    let mut opened = None;
    for addr in addrs {
        let spec = OpenSpec {
            host: &up.host,
            addr,
            tls,
            tls_config: Arc::clone(&tls_config),
            server_name: server_name.clone(),
            helo: &settings.helo_name,
            auth,
            timeouts: Timeouts::uniform(settings.timeout),
        };
        // The dialogue of the last address tried.
        *dialogue = Dialogue::recording();
        match Connection::open_recorded(spec, dialogue).await {
            Ok(c) => {
                opened = Some(c);
                break;
            }
            Err(e) => {
                let unreachable =
                    e.stage == Stage::Connect && matches!(e.kind, ErrorKind::Connect(_) | ErrorKind::ConnectTimeout(_));
                last = Failure::from_step(e);
                if !unreachable {
                    break;
                }
            }
        }
    }
    let mut conn = opened.ok_or(last)?;
    let sent = match &job.message {
        None => None,
        Some(m) => {
            let body = test_message_body(&job.route_id, m);
            let reply = conn
                .send(&m.from, &m.to, body.as_bytes())
                .await
                .map_err(Failure::from_step)?;
            Some(reply.to_string())
        }
    };
    // The verdict is in; a failing QUIT does not change it.
    conn.quit().await;
    Ok(sent)
}

fn offered_mechanisms(bits: u64) -> String {
    let names: Vec<&str> = [(AUTH_PLAIN, "PLAIN"), (AUTH_LOGIN, "LOGIN"), (AUTH_XOAUTH2, "XOAUTH2")]
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn test_message_body(route_id: &str, m: &TestMessage) -> String {
    let now = Timestamp::now();
    let date = now.strftime("%a, %d %b %Y %H:%M:%S +0000");
    let domain = m.from.rsplit_once('@').map(|(_, d)| d).unwrap_or("localhost");
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: mailroute connection test for route {route_id}\r\n\
         Date: {date}\r\nMessage-ID: <mailroute-test.{id}@{domain}>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nAuto-Submitted: auto-generated\r\n\r\n\
         This message was sent by the mailroute operator to check the route {route_id}.\r\n\
         The upstream accepted the connection, TLS and the credentials.\r\n",
        from = m.from,
        to = m.to,
        id = now.as_nanosecond(),
    )
}

/// The platform's trust anchors, read once.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(mailroute_tls::system_roots)
}

/// The relay's own client configuration for this upstream, so a route reported as verified is
/// trusted by the relay in the same way (the pinned certificates only, the route's CA bundle
/// added to the system roots, or no verification at all with `tls.verify: false`).
fn tls_config(up: &Upstream, ca_pem: Option<&str>) -> Result<Arc<ClientConfig>, String> {
    let config = if !up.pinned_sha256.is_empty() {
        mailroute_tls::pinned_hex(&up.pinned_sha256)
    } else if up.verify_tls {
        mailroute_tls::verifying(system_roots(), ca_pem)
    } else {
        mailroute_tls::non_verifying()
    };
    config.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use mailroute_api::route::AuthMechanism;

    use super::*;

    fn record(time: &str, fp: &str, message: Option<&str>) -> ConnectionTest {
        ConnectionTest {
            time: time.into(),
            result: SUCCEEDED.into(),
            step: None,
            reply: None,
            error: None,
            fingerprint: Some(fp.into()),
            test_message: message.map(String::from),
            request_id: None,
            replies: Vec::new(),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn first_test_and_changed_routes_run_at_once_with_the_message() {
        let now = at("2024-05-01T12:00:00Z");
        assert_eq!(
            decide(None, "a", true, false, now, HOUR),
            Decision::Run { send_message: true }
        );
        let last = record("2024-05-01T11:59:00Z", "old", Some("250 ok"));
        assert_eq!(
            decide(Some(&last), "a", true, false, now, HOUR),
            Decision::Run { send_message: true }
        );
        assert_eq!(
            decide(Some(&last), "a", false, false, now, HOUR),
            Decision::Run { send_message: false }
        );
    }

    #[test]
    fn nothing_changed_and_recent_means_wait_for_the_rest_of_the_interval() {
        let last = record("2024-05-01T11:45:00Z", "a", None);
        let now = at("2024-05-01T12:00:00Z");
        assert_eq!(
            decide(Some(&last), "a", true, false, now, HOUR),
            Decision::Wait(Duration::from_secs(45 * 60))
        );
    }

    #[test]
    fn periodic_runs_never_resend_an_accepted_test_message() {
        let now = at("2024-05-01T13:00:01Z");
        let sent = record("2024-05-01T12:00:00Z", "a", Some("250 2.0.0 OK"));
        assert_eq!(
            decide(Some(&sent), "a", true, false, now, HOUR),
            Decision::Run { send_message: false }
        );
        // Not accepted yet (e.g. the previous run failed at AUTH): the periodic run sends it.
        let unsent = record("2024-05-01T12:00:00Z", "a", None);
        assert_eq!(
            decide(Some(&unsent), "a", true, false, now, HOUR),
            Decision::Run { send_message: true }
        );
    }

    #[test]
    fn a_test_request_runs_at_once_and_only_once() {
        let now = at("2024-05-01T12:00:00Z");
        let recent = record("2024-05-01T11:59:00Z", "a", Some("250 ok"));
        // Nothing asked, or the request already answered: the schedule decides.
        assert!(!request_pending(None, None));
        assert!(!request_pending(None, Some("n1")));
        assert!(!request_pending(Some("n1"), Some("n1")));
        assert!(!request_pending(Some(""), None));
        // A new value is a request, whatever the last record answered.
        assert!(request_pending(Some("n1"), None));
        assert!(request_pending(Some("n2"), Some("n1")));
        assert_eq!(
            decide(Some(&recent), "a", false, false, now, HOUR),
            Decision::Wait(Duration::from_secs(59 * 60))
        );
        // Asked: at once, without sending an accepted test message again.
        assert_eq!(
            decide(Some(&recent), "a", true, true, now, HOUR),
            Decision::Run { send_message: false }
        );
        assert_eq!(
            decide(None, "a", true, true, now, HOUR),
            Decision::Run { send_message: true }
        );
    }

    #[test]
    fn an_unreadable_time_runs_the_test() {
        let last = record("garbage", "a", None);
        assert!(matches!(
            decide(Some(&last), "a", false, false, at("2024-05-01T12:00:00Z"), HOUR),
            Decision::Run { .. }
        ));
    }

    fn upstream() -> Upstream {
        Upstream {
            host: "smtp.office365.com".into(),
            port: 587,
            tls: TlsMode::Starttls,
            verify_tls: true,
            server_name: None,
            auth: Some(AuthMechanism::Login),
            custom_ca: false,
            pinned_sha256: Vec::new(),
        }
    }

    #[test]
    fn fingerprint_follows_settings_envelope_and_secret_versions() {
        let up = upstream();
        let v1 = vec![("creds".to_string(), "100".to_string())];
        let v2 = vec![("creds".to_string(), "101".to_string())];
        let base = fingerprint(&up, None, &v1);
        assert_eq!(base, fingerprint(&up, None, &v1));
        assert_ne!(base, fingerprint(&up, None, &v2));
        let mut other = up.clone();
        other.port = 25;
        assert_ne!(base, fingerprint(&other, None, &v1));
        let msg = TestMessage {
            from: "a@example.com".into(),
            to: "b@example.com".into(),
        };
        assert_ne!(base, fingerprint(&up, Some(&msg), &v1));
    }

    #[test]
    fn verified_condition_carries_the_upstream_reply() {
        let up = upstream();
        let failed = ConnectionTest {
            time: "2024-05-01T12:00:00Z".into(),
            result: FAILED.into(),
            step: Some("auth".into()),
            reply: Some("535 5.7.8 Username and password not accepted.".into()),
            error: None,
            fingerprint: None,
            test_message: None,
            request_id: None,
            replies: Vec::new(),
        };
        let c = verified_condition(&up, &failed);
        assert_eq!(c.status, Status::False);
        assert_eq!(c.reason, "AuthenticationFailed");
        assert_eq!(
            c.message,
            "smtp.office365.com:587: AUTH failed: 535 5.7.8 Username and password not accepted."
        );
        let ok = record("2024-05-01T12:00:00Z", "a", Some("250 2.0.0 OK queued"));
        let c = verified_condition(&up, &ok);
        assert_eq!(c.status, Status::True);
        assert_eq!(
            c.message,
            "smtp.office365.com:587 (STARTTLS): EHLO succeeded, AUTH LOGIN accepted; test message accepted: 250 2.0.0 OK queued"
        );
    }
}
