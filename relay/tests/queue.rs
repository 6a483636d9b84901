//! The queue contract on both implementations (real Redis and the memory queue): a message
//! enqueued is fetched once, loaded alone or in a batch with a missing one, its lease renewed by
//! its holder or taken over when idle, and gone when its last recipient is final.

use std::sync::Arc;
use std::time::Duration;

use mailroute_relay::inbound::ListenerKind;
use mailroute_relay::queue::memory::MemoryQueue;
use mailroute_relay::queue::message::{Job, MessageMeta, RecipientState, RecipientStatus, new_id};
use mailroute_relay::queue::redis::{Durability, RedisQueue};
use mailroute_relay::queue::{CancelOutcome, Disposition, Queue};
use mailroute_testkit::RedisServer;

use crate::common::{eventually, redis_connection, route, start};

fn meta(id: &str, rcpts: &[&str]) -> MessageMeta {
    MessageMeta {
        id: id.to_owned(),
        received_at_ms: 1,
        source_ip: "127.0.0.1".into(),
        listener: ListenerKind::Smtp.into(),
        auth_user: None,
        namespace: None,
        service_account: None,
        tls: false,
        mail_from: "app@app.example".into(),
        rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
        message_id_header: None,
        size: 5,
        options: Default::default(),
        quota: None,
        is_dsn: false,
    }
}

/// A Redis queue under `prefix` on `redis`.
async fn redis_queue(redis: &RedisServer, prefix: &str) -> RedisQueue {
    RedisQueue::connect(&redis.url(), prefix, Durability::default())
        .await
        .expect("queue on the test's redis")
}

async fn contract(q: Arc<dyn Queue>) {
    let a = new_id(1);
    let b = new_id(2);
    q.enqueue(&meta(&a, &["x@example.com"]), b"body-a", &[(Job::new(&a, 0), None)])
        .await
        .unwrap();
    q.enqueue(&meta(&b, &["y@example.com"]), b"body-b", &[(Job::new(&b, 0), None)])
        .await
        .unwrap();
    let leased = q.fetch("c1", 10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(leased.len(), 2);
    assert!(
        q.fetch("c2", 10, Duration::from_millis(50)).await.unwrap().is_empty(),
        "fetched once"
    );

    let loaded = q.load_many(&[&a, "no-such-message", &b]).await.unwrap();
    let bodies: Vec<Option<&[u8]>> = loaded.iter().map(|s| s.as_ref().map(|s| &s.body[..])).collect();
    assert_eq!(bodies, vec![Some(&b"body-a"[..]), None, Some(&b"body-b"[..])]);
    assert_eq!(loaded[0].as_ref().unwrap().meta.rcpts, vec!["x@example.com"]);
    assert_eq!(
        q.load(&b).await.unwrap().map(|s| s.body.to_vec()),
        Some(b"body-b".to_vec())
    );

    // Renewal restarts the visibility timeout, and only of leases the consumer still holds.
    // The sleep lets both leases age past the timeout used below; it synchronises nothing.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(q.renew("c1", std::slice::from_ref(&leased[0].lease)).await.unwrap(), 1);
    let taken = q.reclaim("c2", Duration::from_millis(400), 10).await.unwrap();
    assert_eq!(taken, vec![leased[1].clone()], "the renewed lease stays with c1");
    let both = [leased[0].lease.clone(), leased[1].lease.clone()];
    assert_eq!(q.renew("c1", &both).await.unwrap(), 1, "c2 holds the other one now");
    assert_eq!(q.renew("c2", &both).await.unwrap(), 1);

    for l in &leased {
        let state = RecipientState {
            status: RecipientStatus::Delivered,
            attempts: 1,
            next_attempt_ms: None,
            last_reply: Some("250 ok".into()),
            route: None,
        };
        assert!(q.complete(l, Disposition::Final { state }).await.unwrap());
    }
    assert!(
        q.load_many(&[&a, &b]).await.unwrap().iter().all(Option::is_none),
        "records removed"
    );
    assert_eq!(q.stats(0).await.unwrap().messages, 0);
}

#[tokio::test]
async fn redis_queue_contract() {
    let redis = RedisServer::start().unwrap();
    let q = redis_queue(&redis, "{q}:").await;
    contract(Arc::new(q)).await;
}

#[tokio::test]
async fn memory_queue_contract() {
    contract(Arc::new(MemoryQueue::new())).await;
}

/// A cancel removes the scheduled and ready jobs of the message at once, leaves the leased one to
/// its holder (reported in flight), and leaves other messages alone.
async fn cancel_contract(q: Arc<dyn Queue>) {
    let a = new_id(1);
    let other = new_id(2);
    let later = Some(4_000_000_000_000);
    let rcpts = ["s@example.com", "l@example.com", "r@example.com"];
    let jobs = [
        (Job::new(&a, 0), later),
        (Job::new(&a, 1), None),
        (Job::new(&a, 2), None),
    ];
    q.enqueue(&meta(&a, &rcpts), b"a", &jobs).await.unwrap();
    q.enqueue(&meta(&other, &["o@example.com"]), b"o", &[(Job::new(&other, 0), later)])
        .await
        .unwrap();
    let leased = q.fetch("c1", 1, Duration::from_millis(100)).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].job.rcpt, 1);

    let CancelOutcome::Cancelled { mut now, in_flight } = q.cancel(&a).await.unwrap() else {
        panic!("not cancelled")
    };
    now.sort_unstable();
    assert_eq!((now, in_flight), (vec![0, 2], vec![1]));
    assert_eq!(q.cancel(&a).await.unwrap(), CancelOutcome::AlreadyCancelled);
    assert_eq!(q.cancel("no-such-message").await.unwrap(), CancelOutcome::NotFound);
    let s = q.stats(0).await.unwrap();
    assert_eq!((s.ready, s.inflight, s.scheduled, s.messages), (0, 1, 1, 2));
    let view = q.view(&a).await.unwrap().expect("the leased recipient keeps it");
    assert_eq!(view.pending, 1);
    let status: Vec<Option<RecipientStatus>> = view
        .recipients
        .iter()
        .map(|(_, st)| st.as_ref().map(|s| s.status))
        .collect();
    assert_eq!(
        status,
        [Some(RecipientStatus::Cancelled), None, Some(RecipientStatus::Cancelled)]
    );
    assert!(q.fetch("c2", 10, Duration::from_millis(50)).await.unwrap().is_empty());

    let state = RecipientState {
        status: RecipientStatus::Delivered,
        attempts: 1,
        next_attempt_ms: None,
        last_reply: None,
        route: None,
    };
    assert!(q.complete(&leased[0], Disposition::Final { state }).await.unwrap());
    assert!(q.view(&a).await.unwrap().is_none(), "gone with its last recipient");
    assert_eq!(q.stats(0).await.unwrap().messages, 1);
}

#[tokio::test]
async fn redis_queue_cancel() {
    let redis = RedisServer::start().unwrap();
    let q = redis_queue(&redis, "{q}:").await;
    cancel_contract(Arc::new(q)).await;
}

#[tokio::test]
async fn memory_queue_cancel() {
    cancel_contract(Arc::new(MemoryQueue::new())).await;
}

/// The names of the consumers of the group `relays` on `ready`, with their pending counts.
async fn consumers(c: &mut redis::aio::MultiplexedConnection, ready: &str) -> Vec<(String, i64)> {
    let v: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(ready)
        .arg("relays")
        .query_async(c)
        .await
        .unwrap();
    v.iter()
        .map(|m| {
            let name: String = redis::from_redis_value(m["name"].clone()).unwrap();
            let pending: i64 = redis::from_redis_value(m["pending"].clone()).unwrap();
            (name, pending)
        })
        .collect()
}

/// A consumer that holds nothing and has been idle longer than the limit is removed; one that
/// holds a job stays, however idle.
#[tokio::test]
async fn idle_consumers_holding_nothing_are_pruned() {
    let redis = RedisServer::start().unwrap();
    let q = redis_queue(&redis, "{q}:").await;
    let id = new_id(1);
    q.enqueue(&meta(&id, &["x@example.com"]), b"body", &[(Job::new(&id, 0), None)])
        .await
        .unwrap();
    assert_eq!(q.fetch("busy", 10, Duration::from_millis(100)).await.unwrap().len(), 1);
    let mut c = redis_connection(&redis).await;
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(q.ready_key())
        .arg("relays")
        .arg("idle")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut names: Vec<(String, i64)> = consumers(&mut c, q.ready_key()).await;
    names.sort();
    assert_eq!(names, vec![("busy".into(), 1), ("idle".into(), 0)]);

    assert_eq!(
        q.prune_consumers(Duration::from_secs(60)).await.unwrap(),
        0,
        "not idle long enough"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while q.prune_consumers(Duration::from_millis(200)).await.unwrap() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "idle consumer never pruned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(consumers(&mut c, q.ready_key()).await, vec![("busy".into(), 1)]);
}

/// A message whose enqueue was never committed (its relay died between the two steps) is inert:
/// no job of it is fetched, and the purge removes it once it is older than the cut-off, without
/// touching committed messages.
#[tokio::test]
async fn uncommitted_enqueues_are_inert_and_purged() {
    let redis = RedisServer::start().unwrap();
    let q = redis_queue(&redis, "{q}:").await;
    let mut c = redis_connection(&redis).await;
    // What the first step of an enqueue leaves behind (see queue::redis).
    let staged = new_id(1);
    let meta_json = serde_json::to_string(&meta(&staged, &["x@example.com"])).unwrap();
    let () = redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg(format!("{{q}}:msg:{staged}"))
        .arg("meta")
        .arg(meta_json)
        .arg("body")
        .arg("b")
        .arg("pending")
        .arg(1)
        .arg("staged")
        .arg(1)
        .ignore()
        .cmd("ZADD")
        .arg("{q}:staged")
        .arg(1)
        .arg(&staged)
        .ignore()
        .cmd("INCR")
        .arg("{q}:messages")
        .ignore()
        .query_async(&mut c)
        .await
        .unwrap();
    let committed = new_id(2);
    q.enqueue(
        &meta(&committed, &["y@example.com"]),
        b"body",
        &[(Job::new(&committed, 0), None)],
    )
    .await
    .unwrap();
    let n: i64 = redis::cmd("ZCARD").arg("{q}:staged").query_async(&mut c).await.unwrap();
    assert_eq!(n, 1, "a committed message is no longer listed as staged");

    assert_eq!(
        q.purge_uncommitted(0, 100).await.unwrap(),
        0,
        "younger than the cut-off"
    );
    assert_eq!(q.purge_uncommitted(10, 100).await.unwrap(), 1);
    assert!(q.load(&staged).await.unwrap().is_none());
    assert_eq!(q.stats(0).await.unwrap().messages, 1);
    let leased = q.fetch("c1", 10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].job.msg, committed);
}

/// Without replicas to wait for, an enqueue is one round trip: the stage and the commit script
/// go to Redis in one MULTI/EXEC (so with `appendfsync always` one fsync per message, not two),
/// and the message is deliverable when it returns. Redis' MONITOR lists a transaction's
/// commands when EXEC runs them, in order.
#[tokio::test]
async fn an_enqueue_without_replicas_is_one_transaction() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let redis = RedisServer::start().unwrap();
    let q = redis_queue(&redis, "{q}:").await;
    // The first enqueue loads the script (a commit outside the transaction the first time).
    let first = new_id(1);
    q.enqueue(
        &meta(&first, &["x@example.com"]),
        b"body",
        &[(Job::new(&first, 0), None)],
    )
    .await
    .unwrap();
    let addr = redis
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let mut mon = tokio::net::TcpStream::connect(&addr).await.unwrap();
    mon.write_all(b"MONITOR\r\n").await.unwrap();
    let mut lines = BufReader::new(mon).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
    let second = new_id(2);
    q.enqueue(
        &meta(&second, &["y@example.com"]),
        b"body",
        &[(Job::new(&second, 0), None)],
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|c: &String| c.starts_with("\"EXEC\"")) || !seen.iter().any(|c| c.starts_with("\"EVALSHA\""))
    {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("MONITOR shows the enqueue")
            .unwrap()
            .expect("MONITOR stays open");
        // `+<time> [0 <client>] "CMD" "arg" ...`: keep the command name onwards; the script's
        // own commands (client `lua`) are left out.
        if let Some(at) = line.find("] ")
            && !line[..at].ends_with(" lua")
        {
            seen.push(line[at + 2..].to_owned());
        }
    }
    let names: Vec<&str> = seen.iter().map(|c| c.split(' ').next().unwrap_or_default()).collect();
    assert_eq!(
        names,
        [
            "\"MULTI\"",
            "\"HSET\"",
            "\"ZADD\"",
            "\"INCR\"",
            "\"EVALSHA\"",
            "\"EXEC\""
        ],
        "{seen:?}"
    );
    let leased = q.fetch("c1", 10, Duration::from_millis(100)).await.unwrap();
    let mut got: Vec<String> = leased.iter().map(|l| l.job.msg.clone()).collect();
    got.sort();
    let mut want = vec![first, second];
    want.sort();
    assert_eq!(got, want, "both deliverable");
}

/// A full Redis (maxmemory reached, noeviction: every write refused) refuses the enqueue's
/// transaction whole (EXECABORT); the commit's retry then finds no record and answers at once,
/// so the client's 4xx comes now rather than after the settle time a lost reply waits for, and
/// nothing is left queued.
#[tokio::test]
async fn a_full_redis_refuses_an_enqueue_at_once() {
    let redis = RedisServer::start().unwrap();
    let q = redis_queue(&redis, "{q}:").await;
    let warm = new_id(1);
    q.enqueue(&meta(&warm, &["x@example.com"]), b"body", &[(Job::new(&warm, 0), None)])
        .await
        .unwrap();
    let mut c = redis_connection(&redis).await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    let id = new_id(2);
    let started = std::time::Instant::now();
    let r = q
        .enqueue(&meta(&id, &["y@example.com"]), b"body", &[(Job::new(&id, 0), None)])
        .await;
    let took = started.elapsed();
    assert!(r.is_err(), "a full Redis cannot take the message");
    assert!(
        took < mailroute_relay::queue::redis::COMMIT_SETTLE,
        "refused at once, not after the settle time: {took:?}"
    );
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(q.load(&id).await.unwrap().is_none(), "nothing of it stored");
}

/// Bulk queue control's primitives on Redis: a scan sees every job where it is (a leased one as
/// in flight), a batch applies each move only to a job still exactly there and never to a
/// leased one, and a job put on hold goes back to ready when its hold is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_moves_apply_once_and_never_to_a_leased_job() {
    use mailroute_relay::control::rules::{Hold, HoldRule, HoldSource};
    use mailroute_relay::queue::{BulkOp, Place, ScanCursor};

    let redis = RedisServer::start().unwrap();
    let q = RedisQueue::connect(
        &redis.url(),
        "{bulk}:",
        Durability {
            replicas: 0,
            timeout: Duration::from_secs(1),
        },
    )
    .await
    .unwrap();
    let (leased_id, ready_id, sched_id) = (new_id(1), new_id(2), new_id(3));
    q.enqueue(
        &meta(&leased_id, &["a@example.com"]),
        b"a",
        &[(Job::new(&leased_id, 0), None)],
    )
    .await
    .unwrap();
    let leased = q.fetch("c1", 10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(leased.len(), 1);
    q.enqueue(
        &meta(&ready_id, &["b@example.com"]),
        b"b",
        &[(Job::new(&ready_id, 0), None)],
    )
    .await
    .unwrap();
    q.enqueue(
        &meta(&sched_id, &["c@example.com"]),
        b"c",
        &[(Job::new(&sched_id, 0), Some(i64::MAX / 2))],
    )
    .await
    .unwrap();

    let mut all = Vec::new();
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let (jobs, next) = q.scan(cursor, 2).await.unwrap();
        all.extend(jobs);
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(all.len(), 3, "{all:?}");
    let find = |id: &str| all.iter().find(|j| j.job.msg == id).cloned().unwrap();
    let (l, r, s) = (find(&leased_id), find(&ready_id), find(&sched_id));
    assert!(l.in_flight && matches!(l.place, Place::Ready { .. }));
    assert!(!r.in_flight && matches!(r.place, Place::Ready { .. }));
    assert!(matches!(s.place, Place::Scheduled { .. }));
    assert_eq!(
        s.meta.as_ref().map(|m| m.rcpts.clone()),
        Some(vec!["c@example.com".to_string()])
    );

    let cancelled = RecipientState {
        status: RecipientStatus::Cancelled,
        attempts: 0,
        next_attempt_ms: None,
        last_reply: None,
        route: None,
    };
    let cancel = |j: &mailroute_relay::queue::QueuedJob| BulkOp::Cancel {
        place: j.place.clone(),
        rcpt: 0,
        msg: j.job.msg.clone(),
        state: cancelled.clone(),
    };
    let ops = [cancel(&l), cancel(&r)];
    assert_eq!(
        q.apply(&ops).await.unwrap(),
        vec![false, true],
        "a leased job is never taken"
    );
    assert_eq!(q.apply(&ops).await.unwrap(), vec![false, false], "applied once");
    assert!(
        q.view(&ready_id).await.unwrap().is_none(),
        "its last recipient final: gone"
    );
    assert!(q.view(&leased_id).await.unwrap().is_some());

    // Hold the scheduled job; its hold is in the held set, counted apart.
    let hold = Hold {
        rule: HoldRule::Domain("example.com".into()),
        namespace: None,
        by: "test".into(),
        since_ms: 1,
        until_ms: None,
        source: HoldSource::Admin,
    };
    q.put_hold(&hold).await.unwrap();
    let held_job = Job {
        held_since: Some(5),
        ..s.job.clone()
    };
    let op = BulkOp::Hold {
        place: s.place.clone(),
        msg: sched_id.clone(),
        job: held_job.clone(),
        due_ms: i64::MAX / 2,
    };
    assert_eq!(q.apply(&[op]).await.unwrap(), vec![true]);
    let stats = q.stats(10).await.unwrap();
    assert_eq!((stats.held, stats.scheduled), (1, 0));
    assert_eq!(q.holds().await.unwrap(), vec![hold.clone()]);

    // The worker holds the leased job while its hold exists; once it is gone, a hold goes back
    // to the ready stream as leased (false: not held).
    let st = RecipientState {
        status: RecipientStatus::Queued,
        ..cancelled.clone()
    };
    let as_held = |job: &Job| Disposition::Hold {
        job: Job {
            held_since: Some(7),
            ..job.clone()
        },
        due_ms: i64::MAX / 2,
        state: st.clone(),
        hold: hold.key(),
    };
    assert!(q.complete(&leased[0], as_held(&leased[0].job)).await.unwrap());
    assert_eq!(q.stats(10).await.unwrap().held, 2);
    assert_eq!(q.remove_hold(&hold.key()).await.unwrap(), Some(hold.clone()));
    assert_eq!(q.remove_hold(&hold.key()).await.unwrap(), None);
    // A held job released by a bulk move, then leased and put on hold again after its hold went.
    let (jobs, _) = q.scan(None, 10).await.unwrap();
    let h = jobs.into_iter().find(|j| j.job.msg == leased_id).unwrap();
    assert!(matches!(h.place, Place::Held { .. }));
    let back = BulkOp::Ready {
        place: h.place.clone(),
        msg: leased_id.clone(),
        job: leased[0].job.clone(),
    };
    assert_eq!(q.apply(&[back]).await.unwrap(), vec![true]);
    let again = q.fetch("c2", 10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(
        !q.complete(&again[0], as_held(&again[0].job)).await.unwrap(),
        "its hold is gone"
    );
    let back = q.fetch("c3", 10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].job, leased[0].job, "back in the ready stream as it was leased");
}

/// The fetch with the load in one script: each job comes with its message as a load reads it
/// (body and metadata, the cancelled flag), a job whose record is gone (aborted or purged)
/// comes as gone, a batch takes at most `max`, and the rest waits for the next fetch.
#[tokio::test]
async fn redis_fetch_loaded_brings_each_job_s_message() {
    let redis = RedisServer::start().unwrap();
    let q = redis_queue(&redis, "{q}:").await;
    let mut c = redis_connection(&redis).await;
    let ids: Vec<String> = (1..=4).map(new_id).collect();
    for (i, id) in ids.iter().enumerate() {
        let body = format!("body-{i}");
        q.enqueue(
            &meta(id, &["x@example.com"]),
            body.as_bytes(),
            &[(Job::new(id, 0), None)],
        )
        .await
        .unwrap();
    }
    // Cancelled while its job is ready (as the cancel script marks it), and one record gone.
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{{q}}:msg:{}", ids[1]))
        .arg("cancelled")
        .arg("1")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{{q}}:msg:{}", ids[2]))
        .query_async(&mut c)
        .await
        .unwrap();

    let first = q.fetch_loaded("c1", 3, Duration::from_millis(100)).await.unwrap();
    // (message, loaded: record gone or (body, cancelled)).
    type Got = (String, Option<Option<(Vec<u8>, bool)>>);
    let got: Vec<Got> = first
        .iter()
        .map(|f| {
            let stored = f
                .stored
                .as_ref()
                .map(|s| s.as_ref().map(|s| (s.body.to_vec(), s.cancelled)));
            (f.leased.job.msg.clone(), stored)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (ids[0].clone(), Some(Some((b"body-0".to_vec(), false)))),
            (ids[1].clone(), Some(Some((b"body-1".to_vec(), true)))),
            (ids[2].clone(), Some(None)),
        ]
    );
    let loaded = first[0].stored.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(loaded.meta.rcpts, vec!["x@example.com"]);
    assert_eq!(loaded.meta.id, ids[0]);

    let rest = q.fetch_loaded("c1", 3, Duration::from_millis(100)).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].leased.job.msg, ids[3]);
    assert!(
        q.fetch_loaded("c2", 3, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty(),
        "fetched once"
    );
    // The leases are the consumer's, as a plain fetch's: completing them applies once.
    let state = RecipientState {
        status: RecipientStatus::Delivered,
        attempts: 1,
        next_attempt_ms: None,
        last_reply: None,
        route: None,
    };
    for f in first.iter().chain(&rest) {
        let d = Disposition::Final { state: state.clone() };
        assert!(q.complete(&f.leased, d.clone()).await.unwrap() || f.leased.job.msg == ids[2]);
        assert!(!q.complete(&f.leased, d).await.unwrap(), "completed twice");
    }
}

/// `blocked_clients` of the server's INFO.
async fn blocked_clients(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("clients").query_async(c).await.unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// An idle relay does not poll: once a fetch found the stream empty, the next one waits in
/// Redis for a new entry and takes it, loaded, as soon as it comes (long before its block ends).
/// A group lost to a flush is made again and its jobs are fetched.
#[tokio::test]
async fn redis_fetch_loaded_waits_for_new_work_and_wakes_on_it() {
    let redis = RedisServer::start().unwrap();
    let q = Arc::new(redis_queue(&redis, "{q}:").await);
    let mut c = redis_connection(&redis).await;
    assert!(
        q.fetch_loaded("c1", 8, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty()
    );
    let waiting = {
        let q = q.clone();
        tokio::spawn(async move { q.fetch_loaded("c1", 8, Duration::from_secs(30)).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while blocked_clients(&mut c).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fetch never waited in Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = new_id(7);
    q.enqueue(&meta(&id, &["x@example.com"]), b"new work", &[(Job::new(&id, 0), None)])
        .await
        .unwrap();
    let woke = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting fetch did not wake on the new entry")
        .unwrap()
        .unwrap();
    assert_eq!(woke.len(), 1);
    assert_eq!(woke[0].leased.job.msg, id);
    assert_eq!(
        woke[0].stored.as_ref().unwrap().as_ref().map(|s| s.body.to_vec()),
        Some(b"new work".to_vec())
    );

    // Someone flushed Redis: the fetch makes the group again, then finds the new jobs.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    let id = new_id(8);
    q.enqueue(&meta(&id, &["x@example.com"]), b"after", &[(Job::new(&id, 0), None)])
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no job after the flush");
        got = q.fetch_loaded("c1", 8, Duration::from_millis(100)).await.unwrap();
    }
    assert_eq!(got[0].leased.job.msg, id);
}

/// A body like the bench's 4 KiB message after the relay added its Received header.
fn body_of(len: usize) -> Vec<u8> {
    let mut b = b"Received: from client.test by relay.test; Thu, 01 Jan 2026 00:00:00 +0000\r\n".to_vec();
    while b.len() < len {
        b.extend_from_slice(b"Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod\r\n");
    }
    b.truncate(len - 2);
    b.extend_from_slice(b"\r\n");
    b
}

/// Redis' own account of a queued message's record (the hash), as the backlog bench measures
/// it: the compact record keeps a 4 KiB message (4,289 bytes with its Received header) in about
/// 4,700 bytes; the JSON record with the whole body in one value took 5,728.
#[tokio::test]
async fn a_queued_4_kib_message_takes_little_more_than_its_size_in_redis() {
    let redis = RedisServer::start().unwrap();
    let q = redis_queue(&redis, "{mailroute}:").await;
    let id = new_id(1_764_932_400_000);
    let mut m = meta(&id, &["rcpt-0@bench.example"]);
    m.received_at_ms = 1_764_932_400_000;
    m.mail_from = "bench-sender@bench.example".into();
    m.message_id_header = Some("<000000019995@bench.example>".into());
    let body = body_of(4289);
    m.size = body.len();
    q.enqueue(&m, &body, &[(Job::new(&id, 0), None)]).await.unwrap();

    let mut c = redis_connection(&redis).await;
    let key = format!("{{mailroute}}:msg:{id}");
    let usage: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(usage <= 4800, "the record of a 4,289-byte body takes {usage} bytes");
    let stored = q.load(&id).await.unwrap().expect("stored");
    assert_eq!(&stored.body[..], &body[..]);
    assert_eq!(stored.meta, m);
}

/// Before a rollback: with the JSON form, an enqueue writes exactly the previous version's
/// layout (the meta as JSON, the whole body in `body`), which that version reads, and this one
/// still loads it.
#[tokio::test]
async fn the_json_record_form_writes_what_the_previous_version_reads() {
    let redis = RedisServer::start().unwrap();
    let q = redis_queue(&redis, "{mailroute}:")
        .await
        .with_record_form(mailroute_relay::queue::record::Form::Json);
    let id = new_id(1_764_932_400_000);
    let body = body_of(4289);
    let mut m = meta(&id, &["user@example.com"]);
    m.size = body.len();
    q.enqueue(&m, &body, &[(Job::new(&id, 0), None)]).await.unwrap();
    let mut c = redis_connection(&redis).await;
    let (meta_raw, body_raw): (Vec<u8>, Vec<u8>) = redis::cmd("HMGET")
        .arg(format!("{{mailroute}}:msg:{id}"))
        .arg("meta")
        .arg("body")
        .query_async(&mut c)
        .await
        .unwrap();
    let old: MessageMeta = serde_json::from_slice(&meta_raw).expect("the previous version's JSON meta");
    assert_eq!(old, m);
    assert_eq!(body_raw, body, "the whole body in `body`");
    let stored = q.load(&id).await.unwrap().expect("stored");
    assert_eq!(&stored.body[..], &body[..]);
}

/// A rolling upgrade: a message a relay of the previous version queued (its record in the JSON
/// layout, the whole body in `body`) is loaded and delivered by this one, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_queued_in_the_previous_record_layout_is_delivered() {
    use mailroute_testkit::{Script, SmtpServer};
    let redis = RedisServer::start().unwrap();
    let up = SmtpServer::start(Script::new()).unwrap();
    let id = new_id(1_764_932_400_000);
    let body = body_of(4289);
    let mut m = meta(&id, &["user@example.com"]);
    m.size = body.len();
    // The previous version's layout, written field by field as its enqueue did.
    let old_meta = serde_json::to_string(&m).unwrap();
    assert!(old_meta.starts_with('{'));
    let mut c = redis_connection(&redis).await;
    let () = redis::pipe()
        .cmd("HSET")
        .arg(format!("{{mailroute}}:msg:{id}"))
        .arg("meta")
        .arg(&old_meta)
        .arg("body")
        .arg(&body)
        .arg("pending")
        .arg(1)
        .ignore()
        .cmd("INCR")
        .arg("{mailroute}:messages")
        .ignore()
        .cmd("XADD")
        .arg("{mailroute}:ready")
        .arg("*")
        .arg("j")
        .arg(Job::new(&id, 0).encode())
        .ignore()
        .query_async(&mut c)
        .await
        .unwrap();

    // Loaded as it was written...
    let q = redis_queue(&redis, "{mailroute}:").await;
    let stored = q.load(&id).await.unwrap().expect("stored");
    assert_eq!((&stored.body[..], &stored.meta), (&body[..], &m));

    // ...and delivered by a relay of this version.
    let r = start(&route("up", up.port(), 10, &["*"]), &redis.url(), |_| {}).await;
    assert!(
        eventually(|| async { !up.received().is_empty() }).await,
        "the message queued before the upgrade was never delivered"
    );
    let got = up.received();
    assert_eq!(got.len(), 1);
    assert!(
        got[0].data == body,
        "delivered {} bytes, not the {} queued",
        got[0].data.len(),
        body.len()
    );
    assert!(
        eventually(|| async {
            let n: Option<i64> = redis::cmd("GET")
                .arg("{mailroute}:messages")
                .query_async(&mut redis_connection(&redis).await)
                .await
                .unwrap();
            n == Some(0)
        })
        .await,
        "the record is removed once delivered"
    );
    r.relay.shutdown().await;
}
