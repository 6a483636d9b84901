//! The relay on a real Redis Cluster (three primaries, each with a replica, on loopback): the
//! queue, the quota counters, the pacing state and the delivery log all live on the primary
//! of the `{mailroute}` hash slot, enqueues wait for that primary's replica (and are refused
//! when more replicas are asked for than it has), and a relay given
//! a seed that does not hold the slot still finds it.

use std::time::Duration;

use crate::common::*;
use mailroute_relay::observe::dlog::{EventFilter, EventResult};
use mailroute_relay::queue::redis::Durability;
use mailroute_testkit::{RedisCluster, Script, SmtpServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_runs_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 1).unwrap();
    let owner = cluster.primary_for("{mailroute}:ready").unwrap();
    let seed = cluster.nodes().iter().find(|n| n.port() != owner.port()).unwrap();
    // One seed that does not serve the slot: the client must learn the topology from it.
    let url = format!("redis+cluster://127.0.0.1:{}", seed.port());

    let up = SmtpServer::start(Script::new()).unwrap();
    let cfg = route("up", up.port(), 10, &["*"]).replace(
        "  priority: 10\n",
        "  priority: 10\n  limits: {messagesPerMinute: 6000}\n",
    ) + "apiVersion: mailroute.io/v1alpha1\nkind: SenderQuota\nmetadata: {name: app, namespace: mail}\n\
          spec:\n  sender: {sourceCidrs: [127.0.0.0/8]}\n  limits: {perMinute: 4}\n  onExceeded: defer\n";
    let r = start(&cfg, &url, |o| {
        o.durability = Durability {
            replicas: 1,
            timeout: Duration::from_secs(5),
        }
    })
    .await;

    let mut accepted = 0;
    let mut deferred = Vec::new();
    for i in 0..5 {
        let t = submit(
            r.smtp(),
            "app@app.example",
            &["user@example.com"],
            &message(&format!("c{i}"), ""),
        )
        .await;
        if t.delivered() {
            accepted += 1;
        } else {
            deferred.push(t.to_string());
        }
    }
    assert_eq!(accepted, 4, "the quota counter lives in the cluster: {deferred:?}");
    assert!(deferred[0].contains("451 4.7.1"), "{deferred:?}");
    let got = up.wait_for(4, WAIT).await.unwrap();
    assert_eq!(got.len(), 4);

    // Every message record is final, and the log holds the deliveries.
    let queue = r.relay.queue.clone();
    assert!(
        eventually(|| {
            let q = queue.clone();
            async move {
                q.stats(0)
                    .await
                    .is_ok_and(|s| s.messages == 0 && s.ready == 0 && s.inflight == 0)
            }
        })
        .await,
        "queue did not drain"
    );
    let delivered = r
        .relay
        .telemetry
        .dlog
        .query(
            &EventFilter {
                result: Some(EventResult::Delivered),
                ..EventFilter::default()
            },
            None,
            100,
        )
        .await
        .unwrap();
    assert_eq!(delivered.events.len(), 4);

    // The keys (queue, quota counters, pacing state) live on the slot's primary.
    let mut on_owner = redis_connection(owner).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("{mailroute}:*")
        .query_async(&mut on_owner)
        .await
        .unwrap();
    assert!(keys.iter().any(|k| k == "{mailroute}:ready"), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("quota")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("pace")), "{keys:?}");
    r.relay.shutdown().await;

    // Asking for more replicas than the slot's primary has: WAIT reports one, so no 250.
    let strict = start(&route("up", up.port(), 10, &["*"]), &url, |o| {
        o.durability = Durability {
            replicas: 2,
            timeout: Duration::from_millis(300),
        }
    })
    .await;
    let t = submit(
        strict.smtp(),
        "other@app.example",
        &["user@example.com"],
        &message("w", ""),
    )
    .await;
    assert!(!t.delivered(), "{t}");
    assert_eq!(t.reply_to(".").map(|r| r.code), Some(451), "{t}");
    strict.relay.shutdown().await;
}
