//! Group commit: one thread merges the batches of every partition into few
//! store transactions.
//!
//! SQLite has a single writer, so merging is what makes many small commits
//! cheap: one fsync covers every partition's batch that was waiting.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use weir_store::{PartitionBatch, Refusal, Store};

/// Most partition batches merged into one transaction.
pub const COMMIT_BATCHES_MAX: usize = 256;
/// Most batches waiting for the committer; partitions wait beyond that (backpressure).
pub const COMMIT_QUEUE_MAX: usize = 1024;

/// The outcome of one partition batch.
pub(crate) type CommitResult = Result<Result<(), Refusal>, Arc<weir_store::Error>>;

pub(crate) struct CommitRequest {
    pub batch: PartitionBatch,
    pub reply: oneshot::Sender<CommitResult>,
}

/// Handle to the committer thread.
#[derive(Clone)]
pub(crate) struct Committer {
    sender: mpsc::Sender<CommitRequest>,
}

impl Committer {
    /// Starts the committer thread; it stops once every handle is dropped.
    pub fn start(store: Arc<dyn Store>) -> Committer {
        let (sender, receiver) = mpsc::channel(COMMIT_QUEUE_MAX);
        std::thread::Builder::new()
            .name("weir-committer".into())
            .spawn(move || run(store, receiver))
            .expect("spawning the committer thread");
        Committer { sender }
    }

    /// Hands one partition's batch to the committer; the returned future resolves once
    /// it is durable (or refused). Batches are committed in the order they were handed
    /// over, so a partition may hand over its next batch before the previous one is
    /// durable.
    pub async fn submit(&self, batch: PartitionBatch) -> CommitOutcome {
        let (reply, receiver) = oneshot::channel();
        if self
            .sender
            .send(CommitRequest { batch, reply })
            .await
            .is_err()
        {
            return Box::pin(std::future::ready(Err(stopped())));
        }
        // On a current-thread runtime (where tests pause tokio's clock) the wait runs on
        // the blocking pool: a running blocking task stops paused time from jumping ahead
        // while the commit takes real time, as it would otherwise fire timeouts that are
        // minutes away in virtual time before the commit returns.
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread
        {
            let waiting = tokio::task::spawn_blocking(move || receiver.blocking_recv().ok());
            Box::pin(async move {
                waiting
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| Err(stopped()))
            })
        } else {
            Box::pin(async move { receiver.await.unwrap_or_else(|_| Err(stopped())) })
        }
    }
}

/// The outcome of a batch handed to the committer, once it is known.
pub(crate) type CommitOutcome = Pin<Box<dyn Future<Output = CommitResult> + Send>>;

fn stopped() -> Arc<weir_store::Error> {
    Arc::new(weir_store::Error::Incompatible("committer stopped".into()))
}

fn run(store: Arc<dyn Store>, mut receiver: mpsc::Receiver<CommitRequest>) {
    // Runs until every sender is gone (engine shutdown).
    while let Some(first) = receiver.blocking_recv() {
        let mut requests = vec![first];
        while requests.len() < COMMIT_BATCHES_MAX {
            match receiver.try_recv() {
                Ok(request) => requests.push(request),
                Err(_) => break,
            }
        }
        let batches: Vec<PartitionBatch> = requests
            .iter_mut()
            .map(|r| std::mem::take(&mut r.batch))
            .collect();
        match store.commit(&batches) {
            Ok(outcomes) => {
                assert_eq!(outcomes.len(), requests.len());
                for (request, outcome) in requests.into_iter().zip(outcomes) {
                    let _ = request.reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, batches = requests.len(), "group commit failed");
                let err = Arc::new(err);
                for request in requests {
                    let _ = request.reply.send(Err(err.clone()));
                }
            }
        }
    }
}
