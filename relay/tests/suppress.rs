//! The suppression list end to end (issue 16), with a real redis-server, real SMTP over TCP and
//! the admin API: a hard bounce (`550 5.1.1` from a scripted upstream) lists the address and
//! the next message to it is refused at RCPT with the documented reply; `--suppressed drop`
//! accepts, logs `suppressed` and delivers the other recipients; an entry written after the
//! relay read its copy is caught by the enqueue; a tenant's list governs its own mail only and
//! the platform's everyone's; entries expire; CSV import/export round-trips awkward addresses;
//! an entry added through one relay is honoured by another; and recipients that are not
//! suppressed cost no Redis command per recipient (INFO commandstats).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use mailroute_api::{Manifests, Tenancy};
use mailroute_relay::config::Source;
use mailroute_relay::suppress::Mode;
use mailroute_testkit::smtp::client::{Transcript, send};
use mailroute_testkit::{Behaviour, RedisServer, Script, SmtpServer, Stage, TestPki};
use serde_json::{Value, json};

const TOKEN: &str = "suppress-token";

fn base(r: &TestRelay) -> String {
    format!("http://{}", r.relay.admin_addr.expect("admin listener"))
}

async fn api(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("http");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn add(r: &TestRelay, namespace: Option<&str>, body: Value) {
    let q = namespace.map(|n| format!("?namespace={n}")).unwrap_or_default();
    let (status, v) = api(
        reqwest::Method::POST,
        format!("{}/api/v1/suppressions{q}", base(r)),
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{v}");
}

async fn entry(r: &TestRelay, namespace: Option<&str>, address: &str) -> Option<Value> {
    let mut q = vec![("address", address.to_string())];
    if let Some(n) = namespace {
        q.push(("namespace", n.to_string()));
    }
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/suppressions", base(r)))
        .query(&q)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("http");
    match resp.status().as_u16() {
        404 => None,
        200 => Some(resp.json().await.expect("json")),
        s => panic!("GET suppression answered {s}"),
    }
}

async fn events(r: &TestRelay, query: &str) -> Vec<Value> {
    let (status, v) = api(reqwest::Method::GET, format!("{}/api/v1/events?{query}", base(r)), None).await;
    assert_eq!(status, 200, "{v}");
    v["events"].as_array().cloned().unwrap_or_default()
}

/// The events of `query` once there are at least `n` (records are stored in the background).
async fn events_at_least(r: &TestRelay, query: &str, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let evs = events(r, query).await;
        if evs.len() >= n {
            return evs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than {n} events of {query}: {evs:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rcpt_reply(t: &Transcript, rcpt: &str) -> String {
    t.exchanges
        .iter()
        .find(|e| {
            e.command
                .as_deref()
                .is_some_and(|c| c.starts_with(&format!("RCPT TO:<{rcpt}>")))
        })
        .map(|e| e.reply.lines.join("\n"))
        .unwrap_or_default()
}

fn refused_as_suppressed(t: &Transcript) -> bool {
    t.lines()
        .iter()
        .any(|l| l.starts_with("550 5.1.1 ") && l.contains("suppressed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_bounce_suppresses_the_address_and_the_next_message_is_refused() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(
        Script::new()
            .stage(Stage::Rcpt)
            .then(Behaviour::PermFail("550 5.1.1 <gone@example.com>: user unknown".into())),
    )
    .unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into());
        o.suppression.poll = Duration::from_millis(100);
    })
    .await;

    let t = submit(
        r.smtp(),
        "app@app.example",
        &["gone@example.com"],
        &message("first", ""),
    )
    .await;
    assert!(t.delivered(), "{:?}", t.lines());
    // The bounce lists the address in the platform list (the mail had no namespace), naming
    // the bounce.
    assert!(
        eventually(|| async { entry(&r, None, "gone@example.com").await.is_some() }).await,
        "the hard bounce never reached the suppression list"
    );
    let listed = entry(&r, None, "GONE@example.com")
        .await
        .expect("listed under its compared form");
    let bounced = events_at_least(&r, "result=bounced", 1).await;
    assert_eq!(bounced.len(), 1, "{bounced:?}");
    assert_eq!(listed["source"]["kind"], "bounce");
    assert_eq!(listed["source"]["message_id"], bounced[0]["message_id"]);
    assert!(
        listed["source"]["event"].as_str().is_some_and(|e| !e.is_empty()),
        "{listed}"
    );
    assert!(
        listed["reason"].as_str().unwrap().contains("invalid_recipient"),
        "{listed}"
    );

    // Once the relay's copy has it, the next message is refused at RCPT, in any case of letters.
    let refused = eventually(|| async {
        let t = submit(
            r.smtp(),
            "app@app.example",
            &["Gone@Example.COM"],
            &message("again", ""),
        )
        .await;
        refused_as_suppressed(&t)
    })
    .await;
    assert!(refused, "the suppressed address was never refused");
    let rejected = events_at_least(&r, "result=rejected&recipient=Gone@Example.COM", 1).await;
    let text = rejected.last().expect("a rejected record")["reply_text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("suppressed"), "{text}");
    // Nothing after the bounce went to the upstream for that address.
    assert!(
        up.received()
            .iter()
            .all(|m| m.rcpts.is_empty() || !m.rcpts.iter().any(|r| r.eq_ignore_ascii_case("gone@example.com")))
    );
    let metrics = reqwest::get(format!("{}/metrics", base(&r)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("mailroute_suppressed_recipients_total{mode=\"refuse\",sender_namespace=\"-\"}"),
        "{metrics}"
    );
    // The list size gauge comes from the background read.
    assert!(
        eventually(|| async {
            let m = reqwest::get(format!("{}/metrics", base(&r)))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            m.contains("mailroute_suppression_entries{scope=\"platform\"} 1")
        })
        .await
    );
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_mode_logs_suppressed_and_delivers_the_other_recipients() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into());
        o.suppression.mode = Mode::Drop;
        o.suppression.poll = Duration::from_millis(100);
    })
    .await;
    add(&r, None, json!({"address": "x@example.com", "reason": "complained"})).await;

    let t = submit(
        r.smtp(),
        "app@app.example",
        &["x@example.com", "y@example.com"],
        &message("drop", ""),
    )
    .await;
    assert!(t.delivered(), "{:?}", t.lines());
    assert!(rcpt_reply(&t, "x@example.com").starts_with("250"), "{:?}", t.lines());
    let got = up.wait_for(1, WAIT).await.unwrap();
    assert_eq!(got[0].rcpts, ["y@example.com"]);
    let suppressed = events_at_least(&r, "result=suppressed", 1).await;
    assert_eq!(suppressed.len(), 1, "{suppressed:?}");
    assert_eq!(suppressed[0]["recipient"], "x@example.com");
    assert!(
        suppressed[0]["reply_text"].as_str().unwrap().contains("platform"),
        "{suppressed:?}"
    );
    let id = suppressed[0]["message_id"].as_str().unwrap().to_string();
    let (_, msg) = api(reqwest::Method::GET, format!("{}/api/v1/messages/{id}", base(&r)), None).await;
    // y's delivery may already have removed the record; if it is there, x is final.
    if msg.get("recipients").is_some() {
        assert!(msg.to_string().contains("suppressed"), "{msg}");
    }

    // Every recipient suppressed: still answered 250, nothing delivered, each recorded.
    let t = submit(r.smtp(), "app@app.example", &["x@example.com"], &message("all", "")).await;
    assert!(t.delivered(), "{:?}", t.lines());
    events_at_least(&r, "result=suppressed", 2).await;
    // The first message's delivery is the only one.
    assert!(up.wait_for(2, Duration::from_millis(500)).await.is_err());
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_the_relays_copy_does_not_know_yet_is_caught_by_the_enqueue() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    // The copy is read at start and then not for an hour: only the commit script can know.
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into());
        o.suppression.poll = Duration::from_secs(3600);
    })
    .await;
    add(&r, None, json!({"address": "late@example.com"})).await;
    let t = submit(
        r.smtp(),
        "app@app.example",
        &["late@example.com", "ok@example.com"],
        &message("late", ""),
    )
    .await;
    // Accepted at RCPT (the copy did not know), then not queued.
    assert!(rcpt_reply(&t, "late@example.com").starts_with("250"), "{:?}", t.lines());
    assert!(t.delivered());
    assert_eq!(up.wait_for(1, WAIT).await.unwrap()[0].rcpts, ["ok@example.com"]);
    let suppressed = events_at_least(&r, "result=suppressed", 1).await;
    assert_eq!(suppressed.len(), 1, "{suppressed:?}");
    assert_eq!(suppressed[0]["recipient"], "late@example.com");
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into());
        o.suppression.poll = Duration::from_millis(100);
    })
    .await;
    let at = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(mailroute_relay::clock::now_ms() + ms)
            .unwrap()
            .to_rfc3339()
    };
    add(&r, None, json!({"address": "past@example.com", "expires": at(-1000)})).await;
    add(&r, None, json!({"address": "soon@example.com", "expires": at(10_000)})).await;
    // An expired entry never suppresses (neither the copy nor the enqueue counts it).
    let t = submit(r.smtp(), "app@app.example", &["past@example.com"], &message("past", "")).await;
    assert!(t.delivered(), "{:?}", t.lines());
    assert_eq!(up.wait_for(1, WAIT).await.unwrap()[0].rcpts, ["past@example.com"]);
    // A live one does, until its time: refused at RCPT once the copy has it, dropped by the
    // enqueue before that (either way within its 10 s, whatever the copy's timing).
    let t = submit(r.smtp(), "app@app.example", &["soon@example.com"], &message("soon", "")).await;
    if !refused_as_suppressed(&t) {
        assert!(t.delivered(), "{:?}", t.lines());
        events_at_least(&r, "result=suppressed&recipient=soon@example.com", 1).await;
    }
    // Once expired, mail to it is delivered again (a message accepted before the relay saw the
    // expiry may still be dropped: send until one arrives).
    let delivered_again = eventually(|| async {
        let t = submit(
            r.smtp(),
            "app@app.example",
            &["soon@example.com"],
            &message("later", ""),
        )
        .await;
        assert!(t.delivered() || refused_as_suppressed(&t), "{:?}", t.lines());
        up.received().iter().any(|m| m.rcpts == ["soon@example.com"])
    })
    .await;
    assert!(delivered_again, "the entry never expired");
    // The background read removes expired entries from Redis.
    assert!(
        eventually(|| async {
            entry(&r, None, "past@example.com").await.is_none() && entry(&r, None, "soon@example.com").await.is_none()
        })
        .await
    );
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_import_and_export_round_trip_awkward_addresses() {
    let redis = RedisServer::start().unwrap();
    let r = start("", &redis.url(), |o| o.admin_token = Some(TOKEN.into())).await;
    let csv = "address,reason,expires\n\
        \"\"\"john,doe\"\"@example.com\",\"comma, in reason\",\n\
        \"\"\"say \\\"\"hi\\\"\"\"\"@example.com\",quoted,2030-01-01T00:00:00.000Z\n\
        用户@例子.广告,\"multi\nline\",\n\
        Plain@Example.COM,,\n";
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/suppressions.csv?namespace=team-x", base(&r));
    let resp = client
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["imported"], 4, "{v}");
    let exported = client
        .get(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut rd = csv::Reader::from_reader(&exported[..]);
    assert_eq!(
        rd.headers().unwrap().iter().collect::<Vec<_>>(),
        [
            "address",
            "reason",
            "source",
            "by",
            "event",
            "message_id",
            "added",
            "expires"
        ]
    );
    let rows: BTreeMap<String, csv::StringRecord> = rd
        .records()
        .map(|r| r.unwrap())
        .map(|r| (r[0].to_string(), r))
        .collect();
    let addresses: Vec<&str> = rows.keys().map(String::as_str).collect();
    assert_eq!(
        addresses,
        [
            "\"john,doe\"@example.com",
            "\"say \\\"hi\\\"\"@example.com",
            "Plain@Example.COM",
            "用户@例子.广告"
        ]
    );
    assert_eq!(&rows["\"john,doe\"@example.com"][1], "comma, in reason");
    assert_eq!(&rows["用户@例子.广告"][1], "multi\nline");
    assert_eq!(&rows["\"say \\\"hi\\\"\"@example.com"][7], "2030-01-01T00:00:00.000Z");
    assert_eq!(&rows["Plain@Example.COM"][2], "manual");
    assert_eq!(&rows["Plain@Example.COM"][3], "admin-token");
    // Importing the export into another list gives the same export.
    let other = format!("{}/api/v1/suppressions.csv?namespace=team-y", base(&r));
    let resp = client
        .post(&other)
        .bearer_auth(TOKEN)
        .body(exported.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let again = client
        .get(&other)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(again, exported);
    // The platform list was not touched; a bad file is refused whole, naming its line.
    assert!(entry(&r, None, "plain@example.com").await.is_none());
    assert!(entry(&r, Some("team-x"), "plain@example.com").await.is_some());
    let resp = client
        .post(&url)
        .bearer_auth(TOKEN)
        .body("address\nfine@example.com\nnot an address\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("line 3"));
    assert!(entry(&r, Some("team-x"), "fine@example.com").await.is_none());
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_added_through_one_relay_is_honoured_by_another() {
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let routes = route("up", up.port(), 10, &["*"]);
    let tweak = |o: &mut mailroute_relay::server::RelayOptions| {
        o.admin_token = Some(TOKEN.into());
        o.suppression.poll = Duration::from_millis(100);
    };
    let a = start(&routes, &redis.url(), tweak).await;
    let b = start(&routes, &redis.url(), tweak).await;
    add(&a, None, json!({"address": "both@example.com"})).await;
    assert!(
        eventually(|| async {
            refused_as_suppressed(&submit(b.smtp(), "app@app.example", &["both@example.com"], &message("b", "")).await)
        })
        .await
    );
    // Removed through B, accepted by A again.
    let (status, v) = api(
        reqwest::Method::DELETE,
        format!("{}/api/v1/suppressions?address=both@example.com", base(&b)),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        eventually(|| async {
            let t = submit(a.smtp(), "app@app.example", &["both@example.com"], &message("a", "")).await;
            t.delivered()
        })
        .await
    );
    let (status, _) = api(
        reqwest::Method::DELETE,
        format!("{}/api/v1/suppressions?address=both@example.com", base(&b)),
        None,
    )
    .await;
    assert_eq!(status, 404);
    a.relay.shutdown().await;
    b.relay.shutdown().await;
}

async fn commandstats(redis: &RedisServer) -> HashMap<String, u64> {
    let mut c = redis_connection(redis).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_not_suppressed_cost_no_redis_command_per_recipient() {
    const MESSAGES: u64 = 20;
    const RCPTS: u64 = 4;
    let redis = RedisServer::start().unwrap();
    // No workers: only what the inbound side sends to Redis is counted. The background reads
    // (suppression generations, gauges, config) are not per message and are left out below.
    let r = start("", &redis.url(), |o| {
        o.admin_token = Some(TOKEN.into());
        o.workers = 0;
        o.gauge_refresh = Duration::from_secs(3600);
        o.suppression.poll = Duration::from_millis(100);
    })
    .await;
    add(&r, None, json!({"address": "someone-else@example.com"})).await;
    let rcpts: Vec<String> = (0..RCPTS).map(|i| format!("r{i}@example.com")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    // Warm up: the copy holds the entry, the scripts are loaded.
    assert!(
        eventually(|| async {
            let m = reqwest::get(format!("{}/metrics", base(&r)))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            m.contains("mailroute_suppression_entries{scope=\"platform\"} 1")
        })
        .await
    );
    let t = submit(r.smtp(), "app@app.example", &rcpts, &message("warm", "")).await;
    assert!(t.delivered());
    let before = commandstats(&redis).await;
    for i in 0..MESSAGES {
        let t = submit(r.smtp(), "app@app.example", &rcpts, &message(&format!("m{i}"), "")).await;
        assert!(t.delivered(), "{:?}", t.lines());
    }
    let after = commandstats(&redis).await;
    let background = [
        "hgetall",
        "hscan",
        "info",
        "xlen",
        "xpending",
        "zcard",
        "get",
        "xrange",
        "ping",
        "zrangebyscore",
        "xinfo|consumers",
        "xinfo",
        "evalsha|prune",
    ];
    let mut delta: BTreeMap<String, u64> = BTreeMap::new();
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d > 0 && !background.contains(&k.as_str()) {
            delta.insert(k.clone(), d);
        }
    }
    eprintln!("Redis commands for {MESSAGES} messages of {RCPTS} recipients: {delta:?}");
    // Inside the commit script, per message: the record's state (one HMGET, which was an
    // EXISTS before the suppression list) and the generations (one HMGET); nothing looks a
    // recipient up.
    assert_eq!(delta.get("hmget").copied().unwrap_or(0), 2 * MESSAGES, "{delta:?}");
    assert_eq!(delta.get("exists").copied().unwrap_or(0), 0, "{delta:?}");
    assert_eq!(delta.get("hget").copied().unwrap_or(0), 0, "{delta:?}");
    assert_eq!(delta.get("hexists").copied().unwrap_or(0), 0, "{delta:?}");
    // Per recipient, only what the relay always did: one job and one `received` record (two
    // XADDs in the commit script, which stores the `received` records too).
    for (cmd, n) in &delta {
        if *n >= MESSAGES * RCPTS {
            assert!(["xadd", "evalsha"].contains(&cmd.as_str()), "{delta:?}");
        }
    }
    assert_eq!(delta["xadd"], MESSAGES * RCPTS * 2, "{delta:?}");
    assert_eq!(delta["evalsha"], MESSAGES, "{delta:?}");
    r.relay.shutdown().await;
}

// Tenancy: a tenant's list governs its own mail only; the platform's everyone's.

fn tenancy() -> Tenancy {
    Tenancy {
        platform_namespaces: Some(BTreeSet::from(["mailroute".to_string()])),
        namespace_labels: BTreeMap::from([
            ("mailroute".into(), BTreeMap::new()),
            ("team-a".into(), BTreeMap::new()),
            ("team-b".into(), BTreeMap::new()),
        ]),
    }
}

fn user(ns: &str, name: &str, password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-smtp, namespace: {ns}}}\nstringData: {{username: {name}, password: {password}}}\n---\napiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  sender: {{authUser: {name}}}\n  limits: {{perDay: 1000}}\n  credentialsSecretRef: {{name: {name}-smtp}}\n---\n"
    )
}

fn write_config(dir: &Path, yaml: &str) -> Source {
    let c = Manifests::from_yaml(yaml, "default").unwrap().compile_for(&tenancy());
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    let (config, secrets) = (dir.join("relay.json"), dir.join("secrets.json"));
    std::fs::write(&config, c.config.to_canonical_json()).unwrap();
    std::fs::write(&secrets, c.secrets.to_canonical_json()).unwrap();
    Source::Files {
        config,
        secrets: Some(secrets),
    }
}

async fn as_user(r: &TestRelay, pki: &TestPki, user: &str, rcpt: &str) -> Transcript {
    let m = message(&format!("{user}-{rcpt}"), "");
    send(
        r.submission(),
        Some(pki.client_config()),
        true,
        Some((user, "pw")),
        "app@shop.example",
        &[rcpt],
        &m,
    )
    .await
    .expect("SMTP session")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_list_governs_its_own_mail_and_the_platforms_everyones() {
    let redis = RedisServer::start().unwrap();
    let pki = TestPki::new();
    // The first recipient the upstream sees (bob's mail to team-a's entry: nothing else gets
    // past the lists) is unknown to it: bob's bounce lists it in team-b's list.
    let up = SmtpServer::start(
        Script::new()
            .stage(Stage::Rcpt)
            .then(Behaviour::PermFail("550 5.1.1 no such user".into())),
    )
    .unwrap();
    let files = tempfile::tempdir().unwrap();
    let yaml = [
        "apiVersion: mailroute.io/v1alpha1\nkind: SmtpRoute\nmetadata: {name: platform, namespace: mailroute}\nspec:\n  host: 127.0.0.1\n  port: PORT\n  tls: {mode: none}\n  priority: 50\n  match: {recipientDomains: ['*']}\n---\n".replace("PORT", &up.port().to_string()),
        user("team-a", "alice", "pw"),
        user("team-b", "bob", "pw"),
    ]
    .concat();
    let source = write_config(files.path(), &yaml);
    let r = start_tls("", &redis.url(), &pki, |o| {
        o.source = source;
        o.admin_token = Some(TOKEN.into());
        o.suppression.poll = Duration::from_millis(100);
    })
    .await;
    add(&r, Some("team-a"), json!({"address": "a-only@example.com"})).await;
    add(&r, None, json!({"address": "everyone@example.com"})).await;

    assert!(
        eventually(|| async { refused_as_suppressed(&as_user(&r, &pki, "alice", "a-only@example.com").await) }).await
    );
    assert!(
        eventually(|| async { refused_as_suppressed(&as_user(&r, &pki, "alice", "everyone@example.com").await) }).await
    );
    assert!(
        eventually(|| async { refused_as_suppressed(&as_user(&r, &pki, "bob", "everyone@example.com").await) }).await
    );
    // team-a's list does not apply to team-b's mail: accepted and tried upstream.
    let t = as_user(&r, &pki, "bob", "a-only@example.com").await;
    assert!(t.delivered(), "{:?}", t.lines());
    let bounced = events_at_least(&r, "result=bounced&namespace=team-b", 1).await;
    assert_eq!(bounced[0]["recipient"], "a-only@example.com");
    // The hard bounce lists it in the sender's namespace's list only.
    assert!(eventually(|| async { entry(&r, Some("team-b"), "a-only@example.com").await.is_some() }).await);
    assert_eq!(
        entry(&r, Some("team-b"), "a-only@example.com").await.unwrap()["source"]["message_id"],
        bounced[0]["message_id"]
    );
    assert!(entry(&r, None, "a-only@example.com").await.is_none());
    assert_eq!(
        entry(&r, Some("team-a"), "a-only@example.com").await.unwrap()["source"]["kind"],
        "manual"
    );
    // The namespace shows in the refusal's record and metric.
    let rejected = events_at_least(&r, "result=rejected&namespace=team-a", 2).await;
    assert!(
        rejected
            .iter()
            .all(|e| e["reply_text"].as_str().unwrap_or("").contains("suppressed"))
    );
    let m = reqwest::get(format!("{}/metrics", base(&r)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("mailroute_suppressed_recipients_total{mode=\"refuse\",sender_namespace=\"team-b\"}"),
        "{m}"
    );
    r.relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enqueue_backstop_handles_thousands_of_recipients() {
    use mailroute_relay::queue::Queue;
    use mailroute_relay::queue::message::{Job, MessageMeta};
    use mailroute_relay::queue::redis::{DEFAULT_PREFIX, Durability, RedisQueue};
    use mailroute_relay::suppress::Screen;

    let redis = RedisServer::start().unwrap();
    let queue = RedisQueue::connect(&redis.url(), DEFAULT_PREFIX, Durability::default())
        .await
        .unwrap();
    let mut c = redis_connection(&redis).await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{DEFAULT_PREFIX}suppress:ns:team-a"))
        .arg("r8765@example.com")
        .arg(r#"{"address":"r8765@example.com","reason":"x","source":{"kind":"manual","by":"t"},"added_ms":1}"#)
        .query_async(&mut c)
        .await
        .unwrap();
    let n = 9000u32;
    let rcpts: Vec<String> = (0..n).map(|i| format!("r{i}@example.com")).collect();
    let id = "big-message";
    let meta: MessageMeta = serde_json::from_value(json!({
        "id": id, "received_at_ms": 1, "source_ip": "10.0.0.1", "listener": "smtp",
        "namespace": "team-a", "tls": false, "mail_from": "a@b.example", "rcpts": rcpts, "size": 1,
    }))
    .unwrap();
    let jobs: Vec<(Job, Option<i64>)> = (0..n).map(|i| (Job::new(id, i), None)).collect();
    let screen = Screen {
        scopes: vec![("ns:team-a".into(), String::new()), ("platform".into(), String::new())],
        force: true,
        keys: rcpts.clone(),
        now_ms: mailroute_relay::clock::now_ms(),
    };
    let suppressed = queue.enqueue_screened(&meta, b"x", &jobs, &screen).await.unwrap();
    assert_eq!(suppressed, [(8765, "ns:team-a".to_string())]);
    let view = queue.view(id).await.unwrap().unwrap();
    assert_eq!(view.pending, i64::from(n - 1));
    let stats = queue.stats(0).await.unwrap();
    assert_eq!(stats.ready, u64::from(n - 1));
}
