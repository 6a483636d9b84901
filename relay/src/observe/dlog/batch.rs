//! Group commit for log appends: records from every task go through one channel to one writer
//! task, which stores whatever has queued up in one [`EventStore::append_batch`] call (one Redis
//! round trip for the lot). Under load the log costs a round trip per batch, not per record, and
//! records are stored in the order they were handed in. It owns no record format.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{DlogError, EventStore, RecordId};

/// Most records stored in one call.
const MAX_BATCH: usize = 256;
/// Records waiting for the writer before `append` waits for room.
const QUEUE: usize = 4096;

struct Pending {
    time_ms: u64,
    json: String,
    done: oneshot::Sender<Result<RecordId, String>>,
}

/// The sending side; the writer task ends when the last clone is dropped.
#[derive(Clone)]
pub(super) struct Batcher {
    tx: mpsc::Sender<Pending>,
}

impl Batcher {
    /// Starts the writer task on the current Tokio runtime.
    pub(super) fn spawn(store: Arc<dyn EventStore>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Batcher { tx }
    }

    /// Hands a record to the writer before returning, without waiting: records handed in
    /// one after the other are stored in that order, whoever stores later. Only when the queue
    /// is full does the record wait in a task of its own (then its order is not kept).
    pub(super) fn submit(&self, time_ms: u64, json: String) -> oneshot::Receiver<Result<RecordId, String>> {
        let (done, result) = oneshot::channel();
        if let Err(mpsc::error::TrySendError::Full(p)) = self.tx.try_send(Pending { time_ms, json, done }) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(p).await;
            });
        }
        // Closed: the receiver reports the writer stopped.
        result
    }

    pub(super) async fn append(&self, time_ms: u64, json: String) -> Result<RecordId, DlogError> {
        let (done, result) = oneshot::channel();
        self.tx
            .send(Pending { time_ms, json, done })
            .await
            .map_err(|_| DlogError::Store("delivery log writer stopped".into()))?;
        result
            .await
            .map_err(|_| DlogError::Store("delivery log writer stopped".into()))?
            .map_err(DlogError::Store)
    }
}

async fn run(store: Arc<dyn EventStore>, mut rx: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (records, waiters): (Vec<_>, Vec<_>) = batch.drain(..).map(|p| ((p.time_ms, p.json), p.done)).unzip();
        match store.append_batch(records).await {
            Ok(ids) => {
                for (done, id) in waiters.into_iter().zip(ids) {
                    let _ = done.send(Ok(id));
                }
            }
            Err(e) => {
                let e = e.to_string();
                for done in waiters {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}
