//! Leader election against an in-memory API: create, renew, follow, take over an expired lease
//! (judged by when the follower observed it, on a hand-moved clock), release, and the election
//! loop publishing leadership and releasing the Lease on shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube_fake_client::ClientBuilder;
use mailroute_operator::lease::{Clock, Elector, Params};
use tokio::sync::watch;

const NS: &str = "mailroute-system";

fn manual_clock(start: &str) -> (Clock, Arc<Mutex<Timestamp>>) {
    let now = Arc::new(Mutex::new(start.parse::<Timestamp>().unwrap()));
    let n = now.clone();
    (Arc::new(move || *n.lock().unwrap()), now)
}

fn advance(now: &Mutex<Timestamp>, secs: i64) {
    let mut t = now.lock().unwrap();
    *t = t.checked_add(SignedDuration::from_secs(secs)).unwrap();
}

async fn lease(client: &kube::Client) -> k8s_openapi::api::coordination::v1::LeaseSpec {
    Api::<Lease>::namespaced(client.clone(), NS)
        .get("mailroute-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
}

#[tokio::test]
async fn one_leader_at_a_time_with_takeover_after_expiry_and_release() {
    let client = ClientBuilder::new().build().await.unwrap();
    let (clock, now) = manual_clock("2024-05-01T12:00:00Z");
    let mut a = Elector::with_clock(
        client.clone(),
        Params::new(NS, "mailroute-operator", "a"),
        clock.clone(),
    );
    let mut b = Elector::with_clock(client.clone(), Params::new(NS, "mailroute-operator", "b"), clock);

    assert!(a.try_acquire_or_renew().await, "a creates the lease");
    let l = lease(&client).await;
    assert_eq!(l.holder_identity.as_deref(), Some("a"));
    assert_eq!((l.lease_duration_seconds, l.lease_transitions), (Some(15), Some(0)));
    assert!(!b.try_acquire_or_renew().await, "b follows");

    advance(&now, 5);
    assert!(a.try_acquire_or_renew().await, "a renews");
    let renewed = lease(&client).await.renew_time.unwrap().0;
    assert_eq!(renewed, "2024-05-01T12:00:05Z".parse::<Timestamp>().unwrap());

    // b sees the renewed record 14 s later: new record, so its 15 s start now.
    advance(&now, 14);
    assert!(!b.try_acquire_or_renew().await);
    // a stops renewing (crashed); 15 s after b observed the last change, b takes over.
    advance(&now, 14);
    assert!(!b.try_acquire_or_renew().await, "not expired yet");
    advance(&now, 1);
    assert!(b.try_acquire_or_renew().await, "b takes the expired lease");
    let l = lease(&client).await;
    assert_eq!(
        (l.holder_identity.as_deref(), l.lease_transitions),
        (Some("b"), Some(1))
    );

    // a comes back and finds b holding it.
    assert!(!a.try_acquire_or_renew().await);

    // b shuts down and releases: a takes over at once.
    b.release().await.unwrap();
    let l = lease(&client).await;
    assert_eq!((l.holder_identity, l.lease_duration_seconds), (None, Some(1)));
    assert!(a.try_acquire_or_renew().await);
    let l = lease(&client).await;
    assert_eq!(
        (l.holder_identity.as_deref(), l.lease_transitions),
        (Some("a"), Some(2))
    );
    // Releasing a lease one does not hold changes nothing.
    b.release().await.unwrap();
    assert_eq!(lease(&client).await.holder_identity.as_deref(), Some("a"));
}

#[tokio::test]
async fn the_election_loop_publishes_leadership_and_releases_on_shutdown() {
    let client = ClientBuilder::new().build().await.unwrap();
    let mut params = Params::new(NS, "mailroute-operator", "pod-1");
    params.retry_period = Duration::from_millis(20);
    let elector = Elector::new(client.clone(), params);
    let (leading_tx, mut leading) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(elector.run(leading_tx, stop));

    tokio::time::timeout(Duration::from_secs(10), leading.wait_for(|l| *l))
        .await
        .expect("never became leader")
        .unwrap();
    assert_eq!(lease(&client).await.holder_identity.as_deref(), Some("pod-1"));

    stop_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the loop did not stop")
        .unwrap();
    assert!(!*leading.borrow(), "leadership is withdrawn on shutdown");
    assert_eq!(lease(&client).await.holder_identity, None, "the lease is released");
}

/// A renewal whose request never gets an answer: the leader must step down within its renew
/// deadline instead of acting on a lease that may have passed to another replica meanwhile.
#[tokio::test(start_paused = true)]
async fn a_hanging_renewal_is_bounded_by_the_renew_deadline() {
    use std::pin::pin;

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use tower_test::mock;

    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    // Answers the first two requests (GET: not found, POST: created), then holds every later
    // request without an answer, as an API server behind a broken connection would.
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        let mut held = Vec::new();
        let mut n = 0;
        while let Some((request, send)) = h.next_request().await {
            n += 1;
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            match n {
                1 => send.send_response(
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Body::from(
                            br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#
                                .to_vec(),
                        ))
                        .unwrap(),
                ),
                2 => {
                    assert_eq!(parts.method, http::Method::POST);
                    let mut lease: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    lease["metadata"]["resourceVersion"] = "1".into();
                    send.send_response(
                        Response::builder()
                            .body(Body::from(serde_json::to_vec(&lease).unwrap()))
                            .unwrap(),
                    );
                }
                _ => held.push(send),
            }
        }
    });
    let client = kube::Client::new(service, NS);
    // The election's clock follows tokio's (paused, auto-advancing) time.
    let start: Timestamp = "2024-05-01T12:00:00Z".parse().unwrap();
    let base = tokio::time::Instant::now();
    let clock: Clock = Arc::new(move || start.checked_add(base.elapsed()).unwrap());
    let mut a = Elector::with_clock(client, Params::new(NS, "mailroute-operator", "a"), clock);
    assert!(a.try_acquire_or_renew().await, "a creates the lease");

    let renewal_started = tokio::time::Instant::now();
    let leading = tokio::time::timeout(Duration::from_secs(300), a.try_acquire_or_renew())
        .await
        .expect("the renewal hung past its renew deadline");
    assert!(!leading, "a leader whose renewal got no answer still leads");
    assert!(
        renewal_started.elapsed() <= Params::new(NS, "x", "a").renew_deadline,
        "stepped down only after {:?}",
        renewal_started.elapsed()
    );
    server.abort();
}
