//! Event webhooks end to end (issue 16), with a real redis-server, real SMTP upstreams, real
//! relays and a real HTTPS receiver on 127.0.0.1 (rcgen certificates, the endpoint's CA given
//! in the webhook's `caSecretRef`) that checks every request's Standard Webhooks signature and
//! timestamp itself: every subscribed event of 1,000 messages arrives at least once and in each
//! message's order across a SIGKILL of the relay sending the webhook; mail keeps being
//! delivered while the endpoint refuses connections, answers 500, then hangs, and every event
//! arrives once it is back; a webhook receives its own namespace's events only; drops past
//! maxAge/maxBacklog are counted; a dead fan-out's pending records are taken over first; a
//! suppressed recipient is a `suppressed` event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::common::*;
use mailroute_testkit::smtp::client::SmtpClient;
use mailroute_testkit::{RedisServer, Script, SmtpServer, TestPki};

const KEY_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const KEY_B: &str = "whsec_dGVhbS1iJ3Mgb3duIHNpZ25pbmcga2V5ISE=";
const PREFIX: &str = "{mailroute}:";

/// What the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Accept,
    /// Nothing listens on the port: connections are refused.
    Refuse,
    Status(u16),
    /// Reads the request and never answers.
    Hang,
}

/// One event as the receiver saw it.
#[derive(Clone, Debug)]
struct Seen {
    id: String,
    result: String,
    recipient: String,
    namespace: Option<String>,
}

#[derive(Default)]
struct Log {
    events: Vec<Seen>,
    /// Requests refused for a bad signature or timestamp, with why.
    bad: Vec<String>,
    /// Requests answered with a failure status, and requests left hanging.
    failed: usize,
    hanging: usize,
}

/// An HTTPS webhook receiver on 127.0.0.1, verifying signatures with `key`.
struct Receiver {
    port: u16,
    key: Vec<u8>,
    pki: TestPki,
    mode: Arc<Mutex<Mode>>,
    log: Arc<Mutex<Log>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Receiver {
    async fn start(pki: &TestPki, key: &str) -> Arc<Receiver> {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = base64::engine::general_purpose::STANDARD
            .decode(key.strip_prefix("whsec_").unwrap())
            .unwrap();
        let r = Arc::new(Receiver {
            port: l.local_addr().unwrap().port(),
            key,
            pki: pki.clone(),
            mode: Arc::new(Mutex::new(Mode::Accept)),
            log: Arc::default(),
            task: Mutex::new(None),
        });
        r.serve(l);
        r
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/hooks/mail", self.port)
    }

    fn serve(self: &Arc<Self>, l: TcpListener) {
        let me = self.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.pki.server_config());
        *self.task.lock().unwrap() = Some(tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else { continue };
                let (me, acceptor) = (me.clone(), acceptor.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        me.handle(tls).await;
                    }
                });
            }
        }));
    }

    async fn set_mode(self: &Arc<Self>, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
        if mode != Mode::Refuse {
            let l = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
            self.serve(l);
        }
    }

    fn events(&self) -> Vec<Seen> {
        self.log.lock().unwrap().events.clone()
    }

    async fn handle<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(&self, mut s: S) {
        let Some((headers, body)) = read_request(&mut s).await else {
            return;
        };
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Hang => {
                self.log.lock().unwrap().hanging += 1;
                // Until the relay gives up and closes the connection.
                let mut sink = [0u8; 256];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            Mode::Status(code) => {
                self.log.lock().unwrap().failed += 1;
                let text = "busy: try again later";
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {code} Busy\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                            text.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                return;
            }
            Mode::Accept | Mode::Refuse => {}
        }
        let status = match self.verify(&headers, &body) {
            Ok(events) => {
                self.log.lock().unwrap().events.extend(events);
                "200 OK"
            }
            Err(why) => {
                self.log.lock().unwrap().bad.push(why);
                "401 Unauthorized"
            }
        };
        let _ = s
            .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
            .await;
    }

    /// Standard Webhooks verification, written out here rather than taken from the relay.
    fn verify(&self, headers: &HashMap<String, String>, body: &[u8]) -> Result<Vec<Seen>, String> {
        let h = |n: &str| headers.get(n).cloned().ok_or(format!("no {n} header"));
        let (id, ts, sigs) = (h("webhook-id")?, h("webhook-timestamp")?, h("webhook-signature")?);
        let ts_num: i64 = ts.parse().map_err(|_| format!("timestamp {ts:?}"))?;
        let now = mailroute_relay::clock::now().timestamp();
        if (now - ts_num).abs() > 300 {
            return Err(format!("timestamp {ts} is {}s away from now", now - ts_num));
        }
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key);
        let mut signed = format!("{id}.{ts}.").into_bytes();
        signed.extend_from_slice(body);
        let tag = ring::hmac::sign(&key, &signed);
        let want = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag.as_ref()));
        if !sigs.split(' ').any(|s| s == want) {
            return Err(format!("signature {sigs:?} does not verify"));
        }
        if headers.get("content-type").map(String::as_str) != Some("application/json") {
            return Err("content-type".into());
        }
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let events = v["data"]["events"].as_array().ok_or("no data.events")?;
        Ok(events
            .iter()
            .map(|e| Seen {
                id: e["id"].as_str().unwrap_or_default().into(),
                result: e["result"].as_str().unwrap_or_default().into(),
                recipient: e["recipient"].as_str().unwrap_or_default().into(),
                namespace: e["namespace"].as_str().map(String::from),
            })
            .collect())
    }
}

/// A request's lower-cased headers and body (by Content-Length).
async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Option<(HashMap<String, String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((headers, body))
}

/// A route for everyone to the upstream, an AUTH user per namespace, and one webhook per
/// (namespace, receiver, key).
fn manifests(up: u16, hooks: &[(&str, &Receiver, &str, &str)], delivery: &str) -> String {
    let mut y = route("up", up, 10, &["*"]);
    for (ns, rx, key, events) in hooks {
        let ca = base64::engine::general_purpose::STANDARD.encode(&rx.pki.ca_pem);
        let k = base64::engine::general_purpose::STANDARD.encode(key);
        y.push_str(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {ns}-smtp, namespace: {ns}}}\nstringData: {{username: {ns}-app, password: pw-{ns}}}\n---\n\
             apiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {{name: app, namespace: {ns}}}\nspec:\n  sender: {{authUser: {ns}-app}}\n  limits: {{perDay: 100000}}\n  credentialsSecretRef: {{name: {ns}-smtp}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: hook, namespace: {ns}}}\ndata: {{key: {k}, ca.crt: {ca}}}\n---\n\
             apiVersion: mailroute.io/v1alpha1\nkind: DeliveryWebhook\nmetadata: {{name: hook, namespace: {ns}}}\nspec:\n  url: {url}\n  signingKeySecretRef: {{name: hook, key: key}}\n  caSecretRef: {{name: hook, key: ca.crt}}\n  events: {events}\n  delivery: {delivery}\n---\n",
            url = rx.url(),
        ));
    }
    y
}

/// Sends one message per recipient in one authenticated session (STARTTLS, AUTH PLAIN); returns
/// the recipients answered 250 (stops at the first failure).
async fn send_as(addr: SocketAddr, pki: &TestPki, ns: &str, rcpts: &[String]) -> Vec<String> {
    let mut accepted = Vec::new();
    let Ok(mut c) = SmtpClient::connect(addr).await else {
        return accepted;
    };
    let ok = async {
        anyhow::ensure!(c.ehlo("client.test").await?.is_positive());
        anyhow::ensure!(c.starttls("localhost", pki.client_config()).await?.code == 220);
        anyhow::ensure!(c.ehlo("client.test").await?.is_positive());
        anyhow::ensure!(
            c.auth_plain(&format!("{ns}-app"), &format!("pw-{ns}"))
                .await?
                .is_positive()
        );
        Ok(())
    }
    .await;
    if ok.is_err() {
        return accepted;
    }
    for r in rcpts {
        let sent = async {
            anyhow::ensure!(c.cmd(&format!("MAIL FROM:<app@{ns}.example>")).await?.is_positive());
            anyhow::ensure!(c.cmd(&format!("RCPT TO:<{r}>")).await?.is_positive());
            Ok(c.data(&message(r, "")).await?.is_positive())
        }
        .await;
        match sent {
            Ok(true) => accepted.push(r.clone()),
            _ => break,
        }
    }
    accepted
}

/// Asserts that each recipient's events arrived in the log's order (first arrivals, by record
/// id) and returns, per recipient, the set of results seen.
fn in_order_per_message(events: &[Seen]) -> BTreeMap<String, BTreeSet<String>> {
    let mut seen_ids = BTreeSet::new();
    let mut per: BTreeMap<String, Vec<(u64, u64, String)>> = BTreeMap::new();
    for e in events {
        if !seen_ids.insert(e.id.clone()) {
            continue; // A duplicate (at least once); its first arrival counts.
        }
        let (ms, seq) = e.id.split_once('-').expect("record id ms-seq");
        per.entry(e.recipient.clone())
            .or_default()
            .push((ms.parse().unwrap(), seq.parse().unwrap(), e.result.clone()));
    }
    per.into_iter()
        .map(|(rcpt, list)| {
            let ids: Vec<(u64, u64)> = list.iter().map(|(a, b, _)| (*a, *b)).collect();
            let mut sorted = ids.clone();
            sorted.sort();
            assert_eq!(ids, sorted, "{rcpt}: events out of order: {list:?}");
            (rcpt, list.into_iter().map(|(_, _, r)| r).collect())
        })
        .collect()
}

/// Polls until every recipient of `want` has every result of `results`, or 120 s pass.
async fn wait_events(rx: &Receiver, want: &[String], results: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let got = in_order_per_message(&rx.events());
        let missing: Vec<&String> = want
            .iter()
            .filter(|r| !results.iter().all(|res| got.get(*r).is_some_and(|s| s.contains(*res))))
            .collect();
        if missing.is_empty() {
            return got;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{} of {} messages lack events; first: {:?}",
                missing.len(),
                want.len(),
                &missing[..missing.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The relay binary as a child process (so it can be SIGKILLed), with a submission listener.
fn spawn_relay(dir: &std::path::Path, redis: &str, submission: u16) -> Child {
    let tls = dir.join("tls");
    Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
        .args(["run", "--queue", redis, "--smtp-listen", "", "--admin-listen", ""])
        .args(["--submission-listen", &format!("127.0.0.1:{submission}")])
        .args(["--tls-cert", tls.join("tls.crt").to_str().unwrap()])
        .args(["--tls-key", tls.join("tls.key").to_str().unwrap()])
        .args(["--routes", dir.join("routes.yaml").to_str().unwrap()])
        .args([
            "--visibility-timeout",
            "2s",
            "--webhook-lease-ttl",
            "2s",
            "--no-log-stdout",
        ])
        .args(["--workers", "8", "--hostname", "relay.test"])
        .env("MAILROUTE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn relay")
}

async fn lease_holder(c: &mut redis::aio::MultiplexedConnection, id: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(format!("{PREFIX}webhook:{id}:lease"))
        .query_async(c)
        .await
        .unwrap()
}

/// The relay's consumer name is `<host>-<pid>-<random>`.
fn pid_of(consumer: &str) -> u32 {
    consumer
        .rsplit('-')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("pid in consumer name")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_of_1000_messages_arrives_in_order_across_a_sigkill_of_the_sending_relay() {
    let redis = RedisServer::builder().aof(true).start().unwrap();
    let mut c = redis_connection(&redis).await;
    let up = SmtpServer::start(Script::new()).unwrap();
    let pki = TestPki::new();
    let rx = Receiver::start(&pki, KEY_A).await;
    let dir = tempfile::tempdir().unwrap();
    pki.write_files(dir.path().join("tls")).unwrap();
    let yaml = manifests(
        up.port(),
        &[("team-a", &rx, KEY_A, "[received, delivered, bounced]")],
        "{maxBatch: 50, timeout: 5s, initialBackoff: 200ms, maxBackoff: 1s}",
    );
    std::fs::write(dir.path().join("routes.yaml"), yaml).unwrap();
    // Relay A starts alone and takes both leases (the fan-out's and the webhook's); B joins.
    let ports = [free_port(), free_port()];
    let mut relays: Vec<Option<Child>> = vec![Some(spawn_relay(dir.path(), &redis.url(), ports[0]))];
    let a_pid = relays[0].as_ref().unwrap().id();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let fan: Option<String> = redis::cmd("GET")
            .arg(format!("{PREFIX}webhook:fanout:lease"))
            .query_async(&mut c)
            .await
            .unwrap();
        let hook = lease_holder(&mut c, "team-a/hook").await;
        if fan.is_some_and(|f| pid_of(&f) == a_pid) && hook.as_ref().is_some_and(|h| pid_of(h) == a_pid) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay A did not take the leases"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let holder = lease_holder(&mut c, "team-a/hook").await.unwrap();
    relays.push(Some(spawn_relay(dir.path(), &redis.url(), ports[1])));
    let holder_ix = 0;
    // B takes the mail.
    let mail_port = ports[1];
    let rcpts: Vec<String> = (0..1000).map(|i| format!("u{i}@example.com")).collect();
    let sender = tokio::spawn({
        let (pki, rcpts) = (pki.clone(), rcpts.clone());
        async move {
            let addr: SocketAddr = ([127, 0, 0, 1], mail_port).into();
            let deadline = tokio::time::Instant::now() + WAIT;
            while SmtpClient::connect(addr).await.is_err() {
                assert!(tokio::time::Instant::now() < deadline, "relay did not come up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            send_as(addr, &pki, "team-a", &rcpts).await
        }
    });

    // SIGKILL the sending relay once events flow.
    let flowing = async {
        while rx.events().len() < 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), flowing)
        .await
        .expect("events reach the receiver");
    let mut killed = relays[holder_ix].take().unwrap();
    killed.kill().unwrap();
    killed.wait().unwrap();
    let at_kill = rx.events().len();

    let accepted = sender.await.unwrap();
    assert_eq!(accepted.len(), 1000, "every message accepted");
    assert!(
        at_kill < 2 * accepted.len(),
        "the kill landed mid-stream ({at_kill} events)"
    );
    let got = wait_events(&rx, &accepted, &["received", "delivered"]).await;
    assert_eq!(got.len(), 1000);
    let new_holder = lease_holder(&mut c, "team-a/hook")
        .await
        .expect("the webhook is held again");
    assert_ne!(new_holder, holder, "relay B took the webhook over");
    let distinct: BTreeSet<String> = rx.events().into_iter().map(|e| e.id).collect();
    // How often the delivery log itself holds a message's `delivered` before its `received`
    // (the webhook keeps the log's order; this measures the log's).
    let mut first: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen_ids = BTreeSet::new();
    for e in rx.events() {
        if seen_ids.insert(e.id.clone()) {
            first.entry(e.recipient).or_default().push(e.result);
        }
    }
    let inverted = first
        .values()
        .filter(|v| v.first().map(String::as_str) == Some("delivered"))
        .count();
    eprintln!(
        "messages whose log has delivered before received: {inverted} of {}",
        first.len()
    );
    eprintln!(
        "events at the kill: {at_kill}; received: {} ({} distinct, {} of them subscribed)",
        rx.events().len(),
        distinct.len(),
        2 * accepted.len()
    );
    let log = rx.log.lock().unwrap();
    assert!(log.bad.is_empty(), "requests that did not verify: {:?}", log.bad);
    assert!(log.events.iter().all(|e| e.namespace.as_deref() == Some("team-a")));
    drop(log);
    for mut r in relays.into_iter().flatten() {
        r.kill().unwrap();
        r.wait().unwrap();
    }
}

/// The value of a webhook's series `name` on `/metrics`.
fn counter(r: &TestRelay, name: &str, webhook: &str) -> f64 {
    let text = r.relay.metrics().encode();
    let prefix = format!("{name}{{webhook=\"{webhook}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

async fn health(c: &mut redis::aio::MultiplexedConnection, id: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(format!("{PREFIX}webhook:{id}:health"))
        .query_async(c)
        .await
        .unwrap()
}

/// The endpoint refuses connections, then answers 500, then hangs, for a while each (short
/// back-off and timeout settings stand in for ten minutes): mail sent meanwhile is delivered
/// while it is down, the failures are recorded with the endpoint's answer, and once it is back
/// every event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_never_holds_mail_up_and_gets_every_event_once_back() {
    let redis = RedisServer::start().unwrap();
    let mut c = redis_connection(&redis).await;
    let up = SmtpServer::start(Script::new()).unwrap();
    let pki = TestPki::new();
    let rx = Receiver::start(&pki, KEY_A).await;
    rx.set_mode(Mode::Refuse).await;
    let yaml = manifests(
        up.port(),
        &[("team-a", &rx, KEY_A, "[received, delivered]")],
        "{maxBatch: 20, timeout: 1s, initialBackoff: 100ms, maxBackoff: 400ms}",
    );
    let r = start_tls(&yaml, &redis.url(), &pki, |_| {}).await;
    let failed = || counter(&r, "mailroute_webhook_failed_attempts_total", "team-a/hook");
    let mut all = Vec::new();
    for (round, mode) in [Mode::Refuse, Mode::Status(500), Mode::Hang].into_iter().enumerate() {
        rx.set_mode(mode).await;
        let before = failed();
        let rcpts: Vec<String> = (0..30).map(|i| format!("r{round}-{i}@example.com")).collect();
        let accepted = send_as(r.submission(), &pki, "team-a", &rcpts).await;
        assert_eq!(accepted.len(), rcpts.len(), "{mode:?}");
        all.extend(accepted);
        // Delivered while the endpoint is down.
        let n = all.len();
        assert!(
            eventually(|| async { up.received().len() >= n }).await,
            "{mode:?}: {} of {n} delivered",
            up.received().len()
        );
        // The endpoint failed meanwhile (and is still failing: it stays down until switched).
        assert!(
            eventually(|| async { failed() >= before + 2.0 }).await,
            "{mode:?}: failed attempts {}",
            failed()
        );
        let h = health(&mut c, "team-a/hook").await;
        assert!(h.contains_key("last_failure_ms"), "{h:?}");
        match mode {
            Mode::Status(_) => {
                assert_eq!(h["last_failure_status"], "500");
                assert_eq!(h["last_failure_reply"], "busy: try again later");
            }
            Mode::Refuse => assert!(h["last_failure_reply"].contains("connect"), "{h:?}"),
            Mode::Hang => {
                assert!(rx.log.lock().unwrap().hanging >= 1);
                assert!(
                    eventually(|| async {
                        health(&mut c.clone(), "team-a/hook").await["last_failure_reply"].contains("no answer")
                    })
                    .await
                );
            }
            Mode::Accept => unreachable!(),
        }
        assert!(rx.events().is_empty());
    }
    assert!(counter(&r, "mailroute_webhook_lag_seconds", "team-a/hook") > 0.0);
    rx.set_mode(Mode::Accept).await;
    let got = wait_events(&rx, &all, &["received", "delivered"]).await;
    assert_eq!(got.len(), all.len());
    assert!(rx.log.lock().unwrap().bad.is_empty());
    assert!(
        eventually(|| async {
            health(&mut c.clone(), "team-a/hook")
                .await
                .contains_key("last_success_ms")
        })
        .await
    );
    assert_eq!(
        counter(&r, "mailroute_webhook_events_sent_total", "team-a/hook") as usize,
        rx.events().len()
    );
    r.relay.shutdown().await;
}

/// A webhook receives its own namespace's events only: never another tenant's, never
/// unattributed mail's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receives_only_its_namespaces_events() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let pki = TestPki::new();
    let rx_a = Receiver::start(&pki, KEY_A).await;
    let rx_b = Receiver::start(&pki, KEY_B).await;
    let yaml = manifests(
        up.port(),
        &[
            ("team-a", &rx_a, KEY_A, "[received, delivered]"),
            ("team-b", &rx_b, KEY_B, "[delivered]"),
        ],
        "{initialBackoff: 100ms}",
    );
    let r = start_tls(&yaml, &redis.url(), &pki, |_| {}).await;
    let a: Vec<String> = (0..10).map(|i| format!("a{i}@example.com")).collect();
    let b: Vec<String> = (0..10).map(|i| format!("b{i}@example.com")).collect();
    assert_eq!(send_as(r.submission(), &pki, "team-a", &a).await.len(), 10);
    assert_eq!(send_as(r.submission(), &pki, "team-b", &b).await.len(), 10);
    // Unattributed mail (a loopback client without AUTH).
    let t = submit(r.smtp(), "app@none.example", &["n0@example.com"], &message("n0", "")).await;
    assert!(t.delivered(), "{t}");
    wait_events(&rx_a, &a, &["received", "delivered"]).await;
    wait_events(&rx_b, &b, &["delivered"]).await;
    assert!(eventually(|| async { up.received().len() == 21 }).await);
    // Whatever was still on its way has had the time to arrive.
    let fanned = async {
        let mut c = redis_connection(&redis).await;
        loop {
            let pending: Vec<redis::Value> = redis::cmd("XPENDING")
                .arg(format!("{PREFIX}dlog"))
                .arg("webhooks")
                .query_async(&mut c)
                .await
                .unwrap();
            let lag: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(format!("{PREFIX}dlog"))
                .query_async(&mut c)
                .await
                .unwrap();
            let outboxes: (i64, i64) = redis::pipe()
                .xlen(format!("{PREFIX}webhook:team-a/hook:outbox"))
                .xlen(format!("{PREFIX}webhook:team-b/hook:outbox"))
                .query_async(&mut c)
                .await
                .unwrap();
            let caught_up = matches!(pending.first(), Some(redis::Value::Int(0)))
                && matches!(lag[0].get("lag"), Some(redis::Value::Int(0)))
                && outboxes == (0, 0);
            if caught_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, fanned)
        .await
        .expect("the fan-out catches up and the outboxes are sent");
    for (rx, ns, results) in [
        (&rx_a, "team-a", vec!["delivered", "received"]),
        (&rx_b, "team-b", vec!["delivered"]),
    ] {
        let events = rx.events();
        assert!(
            events.iter().all(|e| e.namespace.as_deref() == Some(ns)),
            "{ns}: {events:?}"
        );
        assert!(
            events.iter().all(|e| results.contains(&e.result.as_str())),
            "{ns}: {events:?}"
        );
        assert!(!events.iter().any(|e| e.recipient.starts_with("n0")));
        assert!(rx.log.lock().unwrap().bad.is_empty());
    }
    r.relay.shutdown().await;
}

/// Events the endpoint does not take within `maxAge` are dropped, and so are the oldest beyond
/// `maxBacklog`; both are counted (health hash for the status, metric) and the outbox never
/// holds more than its limit. Events after the endpoint is back arrive; dropped ones never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_past_max_age_or_beyond_the_backlog_are_dropped_and_counted() {
    let redis = RedisServer::start().unwrap();
    let mut c = redis_connection(&redis).await;
    let up = SmtpServer::start(Script::new()).unwrap();
    let pki = TestPki::new();
    let rx = Receiver::start(&pki, KEY_A).await;
    rx.set_mode(Mode::Refuse).await;
    let yaml = manifests(
        up.port(),
        &[("team-a", &rx, KEY_A, "[received, delivered]")],
        "{maxBacklog: 4, maxAge: 3s, initialBackoff: 100ms, maxBackoff: 200ms}",
    );
    let r = start_tls(&yaml, &redis.url(), &pki, |_| {}).await;
    let old: Vec<String> = (0..5).map(|i| format!("old{i}@example.com")).collect();
    assert_eq!(send_as(r.submission(), &pki, "team-a", &old).await.len(), 5);
    let outbox = format!("{PREFIX}webhook:team-a/hook:outbox");
    let dropped = |h: &HashMap<String, String>| -> (i64, i64) {
        let n = |k: &str| h.get(k).map(|v| v.parse().unwrap()).unwrap_or(0);
        (n("dropped_backlog"), n("dropped_expired"))
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let len: i64 = redis::cmd("XLEN").arg(&outbox).query_async(&mut c).await.unwrap();
        assert!(len <= 4, "the outbox holds {len} events, over its limit");
        let (backlog, expired) = dropped(&health(&mut c, "team-a/hook").await);
        if len == 0 && backlog + expired == 10 {
            assert!(up.received().len() == 5);
            assert_eq!(
                counter_with(&r, "mailroute_webhook_events_dropped_total", "team-a/hook", "expired") as i64,
                expired
            );
            assert!(health(&mut c, "team-a/hook").await.contains_key("last_drop_ms") || expired == 0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dropped {backlog} beyond the backlog and {expired} expired, {len} left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rx.set_mode(Mode::Accept).await;
    let new = vec!["new@example.com".to_string()];
    assert_eq!(send_as(r.submission(), &pki, "team-a", &new).await.len(), 1);
    wait_events(&rx, &new, &["received", "delivered"]).await;
    assert!(
        rx.events().iter().all(|e| e.recipient == "new@example.com"),
        "{:?}",
        rx.events()
    );
    r.relay.shutdown().await;
}

/// A deleted DeliveryWebhook's outbox and health hash go once no relay has had it configured
/// for the grace; the other webhook's keys stay. Its endpoint refuses, so its outbox holds the
/// events when it is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_webhook_s_outbox_and_health_are_removed_after_the_grace() {
    let redis = RedisServer::start().unwrap();
    let mut c = redis_connection(&redis).await;
    let up = SmtpServer::start(Script::new()).unwrap();
    let pki = TestPki::new();
    let rx_a = Receiver::start(&pki, KEY_A).await;
    let rx_b = Receiver::start(&pki, KEY_B).await;
    rx_a.set_mode(Mode::Refuse).await;
    rx_b.set_mode(Mode::Refuse).await;
    let hooks = [
        ("team-a", &*rx_a, KEY_A, "[received, delivered]"),
        ("team-b", &*rx_b, KEY_B, "[received, delivered]"),
    ];
    let delivery = "{initialBackoff: 100ms, maxBackoff: 200ms}";
    let r = start_tls(&manifests(up.port(), &hooks, delivery), &redis.url(), &pki, |o| {
        o.webhook_forget_after = Duration::from_secs(1);
    })
    .await;
    assert_eq!(
        send_as(r.submission(), &pki, "team-a", &["a@example.com".into()])
            .await
            .len(),
        1
    );
    assert_eq!(
        send_as(r.submission(), &pki, "team-b", &["b@example.com".into()])
            .await
            .len(),
        1
    );
    let keys = |ns: &str| {
        (
            format!("{PREFIX}webhook:{ns}/hook:outbox"),
            format!("{PREFIX}webhook:{ns}/hook:health"),
        )
    };
    let exists = |key: String| {
        let mut c = c.clone();
        async move { redis::cmd("EXISTS").arg(key).query_async::<i64>(&mut c).await.unwrap() == 1 }
    };
    let len = |key: String| {
        let mut c = c.clone();
        async move { redis::cmd("XLEN").arg(key).query_async::<i64>(&mut c).await.unwrap() }
    };
    assert!(
        eventually(|| async { len(keys("team-a").0).await > 0 && len(keys("team-b").0).await > 0 }).await,
        "both outboxes hold the refused events"
    );
    assert!(
        eventually(|| async { exists(keys("team-b").1).await }).await,
        "team-b has a health hash"
    );

    // team-b's DeliveryWebhook is deleted.
    std::fs::write(
        r.dir.path().join("routes.yaml"),
        manifests(up.port(), &hooks[..1], delivery),
    )
    .unwrap();
    assert!(
        eventually(|| async { !exists(keys("team-b").0).await && !exists(keys("team-b").1).await }).await,
        "team-b's outbox and health hash are removed"
    );
    assert!(len(keys("team-a").0).await > 0, "team-a's outbox stays");
    assert!(exists(keys("team-a").1).await, "team-a's health hash stays");
    let known: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{PREFIX}webhook:known"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(known, ["team-a/hook"]);
    r.relay.shutdown().await;
}

/// The value of a webhook's series `name` with a `reason` label.
fn counter_with(r: &TestRelay, name: &str, webhook: &str, reason: &str) -> f64 {
    let text = r.relay.metrics().encode();
    let prefix = format!("{name}{{reason=\"{reason}\",webhook=\"{webhook}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// A relay that died holding the fan-out's lease, with records it had read from the delivery
/// log and not yet copied (pending in the group `webhooks`): once its lease expires the next
/// relay takes them over (XAUTOCLAIM) and they reach the endpoint before anything newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_dead_fan_out_left_pending_are_taken_over_first() {
    let redis = RedisServer::start().unwrap();
    let mut c = redis_connection(&redis).await;
    let up = SmtpServer::start(Script::new()).unwrap();
    let pki = TestPki::new();
    let rx = Receiver::start(&pki, KEY_A).await;
    let dlog = format!("{PREFIX}dlog");
    // The dead relay's state: the group, three records it read, and its lease for a while yet.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&dlog)
        .arg("webhooks")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await
        .unwrap();
    let now = mailroute_relay::clock::now();
    let mut planted = Vec::new();
    for i in 0..3 {
        let mut ev = mailroute_relay::observe::dlog::DeliveryEvent::new(
            now,
            mailroute_relay::observe::dlog::EventResult::Delivered,
            format!("dead{i}"),
            "app@team-a.example",
            format!("dead{i}@example.com"),
        );
        ev.namespace = Some("team-a".into());
        let id: String = redis::cmd("XADD")
            .arg(&dlog)
            .arg("*")
            .arg("e")
            .arg(serde_json::to_string(&ev).unwrap())
            .query_async(&mut c)
            .await
            .unwrap();
        planted.push(id);
    }
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("webhooks")
        .arg("dead-relay")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&dlog)
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{PREFIX}webhook:fanout:lease"))
        .arg("dead-relay")
        .arg("PX")
        .arg(1500)
        .query_async(&mut c)
        .await
        .unwrap();

    let yaml = manifests(
        up.port(),
        &[("team-a", &rx, KEY_A, "[received, delivered]")],
        "{initialBackoff: 100ms}",
    );
    let r = start_tls(&yaml, &redis.url(), &pki, |_| {}).await;
    let new = vec!["new@example.com".to_string()];
    assert_eq!(send_as(r.submission(), &pki, "team-a", &new).await.len(), 1);
    let dead: Vec<String> = (0..3).map(|i| format!("dead{i}@example.com")).collect();
    wait_events(&rx, &dead, &["delivered"]).await;
    wait_events(&rx, &new, &["received", "delivered"]).await;
    let ids: Vec<String> = rx.events().into_iter().map(|e| e.id).collect();
    assert_eq!(&ids[..3], &planted[..], "the records left pending come first, in order");
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(&dlog)
        .arg("webhooks")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(matches!(pending.first(), Some(redis::Value::Int(0))), "{pending:?}");
    r.relay.shutdown().await;
}

/// A recipient on a suppression list (drop mode) becomes a `suppressed` event at the webhook of
/// the sender's namespace, the way every other result does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suppressed_recipient_reaches_the_webhook_as_a_suppressed_event() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let pki = TestPki::new();
    let rx = Receiver::start(&pki, KEY_A).await;
    let yaml = manifests(
        up.port(),
        &[("team-a", &rx, KEY_A, "[delivered, suppressed]")],
        "{initialBackoff: 100ms}",
    );
    let r = start_tls(&yaml, &redis.url(), &pki, |o| {
        o.admin_token = Some("webhooks-token".into());
        o.suppression.mode = mailroute_relay::suppress::Mode::Drop;
        o.suppression.poll = Duration::from_millis(100);
    })
    .await;
    let resp = reqwest::Client::new()
        .post(format!("http://{}/api/v1/suppressions", r.relay.admin_addr.unwrap()))
        .bearer_auth("webhooks-token")
        .json(&serde_json::json!({"address": "x@example.com", "reason": "complained"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let rcpts = vec!["x@example.com".to_string(), "y@example.com".to_string()];
    // The relay's copy of the list is refreshed every 100 ms; the enqueue checks it anyway.
    assert_eq!(send_as(r.submission(), &pki, "team-a", &rcpts).await.len(), 2);
    wait_events(&rx, &rcpts[..1], &["suppressed"]).await;
    wait_events(&rx, &rcpts[1..], &["delivered"]).await;
    assert!(rx.events().iter().all(|e| e.namespace.as_deref() == Some("team-a")));
    r.relay.shutdown().await;
}
