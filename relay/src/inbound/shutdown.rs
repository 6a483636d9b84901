//! Ending sessions that wait for a command when the relay shuts down, so a drain does not wait
//! for idle clients. Sessions in DATA are not waiting for a command and finish first.
//!
//! It only races a command read against the shutdown signal; the session writes the reply.

use std::future::Future;

use tokio::sync::watch;

/// `read`'s result, or `None` once `shutdown` is (or turns) true. A dropped sender is not a
/// shutdown.
pub async fn between_commands<T>(read: impl Future<Output = T>, shutdown: &mut watch::Receiver<bool>) -> Option<T> {
    if *shutdown.borrow() {
        return None;
    }
    tokio::select! {
        biased;
        _ = signalled(shutdown) => None,
        r = read => Some(r),
    }
}

async fn signalled(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}
