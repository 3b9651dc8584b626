//! Group commit: one thread merges the batches of every partition into few
//! store transactions.
//!
//! SQLite has a single writer, so merging is what makes many small commits
//! cheap: one fsync covers every partition's batch that was waiting.
//!
//! When nothing else waits (no batch with the committer, and by the partition's
//! account no message for any partition and no task out with a worker but those the
//! batch finishes), a batch is committed in place, on the runtime's thread that made it:
//! handing it to the committer thread and its outcome back would cost two thread
//! wake-ups, a third of a step's time beyond the sync at one instance in flight.
//! Under load the committer thread commits, so that the runtime prepares the next
//! group while the current one syncs.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use weir_store::{LatencyHistogram, LatencySnapshot, PartitionBatch, Refusal, Store};

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
    counts: Arc<CommitCounts>,
    /// Commits in place, and is read for its WAL syncs; the thread writes to it too.
    store: Arc<dyn Store>,
    /// Batches handed to the thread and not yet committed, and a commit in place
    /// while it runs: zero when the store's writer is free of the engine's commits.
    outstanding: Arc<AtomicUsize>,
}

/// What the committer has done since it started.
#[derive(Default)]
struct CommitCounts {
    /// Time of each store transaction, successful or not.
    transactions: LatencyHistogram,
    /// Partition batches merged into those transactions.
    batches: AtomicU64,
    /// Transactions that failed.
    failures: AtomicU64,
    /// Transactions committed in place, on a runtime's thread.
    in_place: AtomicU64,
}

/// The group commits of an engine since it started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommitStats {
    /// How long each store transaction took, the WAL sync included.
    pub transactions: LatencySnapshot,
    /// Partition batches those transactions held: divided by their count, the
    /// size of a group commit.
    pub batches: u64,
    /// Transactions that failed (their batches were refused with the error).
    pub failures: u64,
    /// Transactions committed in place, on the thread that made the batch, because
    /// nothing else waited; the committer thread made the others.
    pub in_place: u64,
    /// How long each sync of the store's write-ahead log took, when this process makes
    /// them (the embedded store).
    pub wal_syncs: Option<LatencySnapshot>,
}

impl Committer {
    /// Starts the committer thread; it stops once every handle is dropped.
    pub fn start(store: Arc<dyn Store>) -> Committer {
        let (sender, receiver) = mpsc::channel(COMMIT_QUEUE_MAX);
        let counts = Arc::new(CommitCounts::default());
        let counted = counts.clone();
        let committing = store.clone();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let committed = outstanding.clone();
        std::thread::Builder::new()
            .name("weir-committer".into())
            .spawn(move || run(committing, receiver, &counted, &committed))
            .expect("spawning the committer thread");
        Committer {
            sender,
            counts,
            store,
            outstanding,
        }
    }

    /// The group commits so far.
    pub fn stats(&self) -> CommitStats {
        CommitStats {
            transactions: self.counts.transactions.snapshot(),
            batches: self.counts.batches.load(Ordering::Relaxed),
            failures: self.counts.failures.load(Ordering::Relaxed),
            in_place: self.counts.in_place.load(Ordering::Relaxed),
            wal_syncs: self.store.wal_syncs(),
        }
    }

    /// Hands one partition's batch to the committer; the returned future resolves once
    /// it is durable (or refused). Batches are committed in the order they were handed
    /// over, so a partition may hand over its next batch before the previous one is
    /// durable.
    ///
    /// A `quiet` batch, one the partition expects nothing else to wait for, is committed
    /// in place when the committer has no batch either and the store can (see the
    /// module's comment); the future is then ready at once.
    pub async fn submit(&self, batch: PartitionBatch, quiet: bool) -> CommitOutcome {
        if quiet {
            if let Some(result) = self.commit_here(&batch) {
                return Box::pin(std::future::ready(result));
            }
        }
        let (reply, receiver) = oneshot::channel();
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        if self
            .sender
            .send(CommitRequest { batch, reply })
            .await
            .is_err()
        {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
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

    /// Commits `batch` on this thread if the committer thread has no batch and the
    /// store's writer is free; `None` when it must be handed over.
    fn commit_here(&self, batch: &PartitionBatch) -> Option<CommitResult> {
        // A current-thread runtime (tests with paused time) must not block: see `submit`.
        if tokio::runtime::Handle::current().runtime_flavor()
            != tokio::runtime::RuntimeFlavor::MultiThread
        {
            return None;
        }
        // Claimed only at zero, so that no batch handed over earlier is still to be
        // committed: batches keep the order they were handed over in. Batches handed
        // over while this commit runs wait for the writer behind it.
        self.outstanding
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        let started = Instant::now();
        let committed = self.store.try_commit_here(std::slice::from_ref(batch));
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        let committed = committed?;
        self.counts.record(started.elapsed(), 1, committed.is_err());
        self.counts.in_place.fetch_add(1, Ordering::Relaxed);
        Some(match committed {
            Ok(mut outcomes) => {
                assert_eq!(outcomes.len(), 1, "one outcome per batch");
                Ok(outcomes.pop().expect("one outcome"))
            }
            Err(err) => {
                tracing::error!(error = %err, batches = 1, "commit failed");
                Err(Arc::new(err))
            }
        })
    }
}

impl CommitCounts {
    fn record(&self, took: std::time::Duration, batches: usize, failed: bool) {
        self.transactions.record(took);
        self.batches.fetch_add(batches as u64, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The outcome of a batch handed to the committer, once it is known.
pub(crate) type CommitOutcome = Pin<Box<dyn Future<Output = CommitResult> + Send>>;

fn stopped() -> Arc<weir_store::Error> {
    Arc::new(weir_store::Error::Incompatible("committer stopped".into()))
}

fn run(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<CommitRequest>,
    counts: &CommitCounts,
    outstanding: &AtomicUsize,
) {
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
        let started = Instant::now();
        let committed = store.commit(&batches);
        counts.record(started.elapsed(), batches.len(), committed.is_err());
        // Before the replies: a partition answered may commit its next batch in place.
        outstanding.fetch_sub(requests.len(), Ordering::AcqRel);
        match committed {
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
