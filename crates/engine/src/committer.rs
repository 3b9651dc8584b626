//! Group commit: one thread merges the batches of every partition into few
//! store transactions.
//!
//! SQLite has a single writer, so merging is what makes many small commits
//! cheap: one fsync covers every partition's batch that was waiting.
//!
//! When nothing else waits (no batch with the committer, and by the partition's
//! account, once it has let the runtime's ready tasks run, no message for any partition
//! and no task out with a worker but those the batch finishes) and requests come one at
//! a time (the batch answers one message, and so did the last commit), a batch is
//! committed in place, on the runtime's thread that made it:
//! handing it to the committer thread and its outcome back would cost two thread
//! wake-ups, a third of a step's time beyond the sync at one instance in flight.
//! Under load the committer thread commits, so that the runtime prepares the next
//! group while the current one syncs.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// Messages the batch answers.
    pub answered: usize,
    pub reply: oneshot::Sender<CommitResult>,
}

/// Handle to the committer thread.
#[derive(Clone)]
pub(crate) struct Committer {
    sender: mpsc::Sender<CommitRequest>,
    counts: Arc<CommitCounts>,
    /// Commits in place, and is read for its WAL syncs; the thread writes to it too.
    store: Arc<dyn Store>,
    /// What decides whether a batch may commit in place; the thread updates it too.
    state: Arc<CommitterState>,
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
        let state = Arc::new(CommitterState {
            outstanding: AtomicUsize::new(0),
            last_answered_one: AtomicBool::new(true),
        });
        let shared = state.clone();
        std::thread::Builder::new()
            .name("weir-committer".into())
            .spawn(move || run(committing, receiver, &counted, &shared))
            .expect("spawning the committer thread");
        Committer {
            sender,
            counts,
            store,
            state,
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
    /// in place when it answers one message, the last commit answered one too, the
    /// committer has no batch and the store can (see the module's comment); the future
    /// is then ready at once. `answered` is how many messages the batch answers.
    pub async fn submit(
        &self,
        batch: PartitionBatch,
        answered: usize,
        quiet: bool,
    ) -> CommitOutcome {
        if quiet && answered == 1 && self.state.last_answered_one.load(Ordering::Acquire) {
            if let Some(result) = self.commit_here(&batch) {
                return Box::pin(std::future::ready(result));
            }
        }
        let (reply, receiver) = oneshot::channel();
        self.state.outstanding.fetch_add(1, Ordering::AcqRel);
        if self
            .sender
            .send(CommitRequest {
                batch,
                answered,
                reply,
            })
            .await
            .is_err()
        {
            self.state.outstanding.fetch_sub(1, Ordering::AcqRel);
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
        self.state
            .outstanding
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        let started = Instant::now();
        let committed = self.store.try_commit_here(std::slice::from_ref(batch));
        self.state.outstanding.fetch_sub(1, Ordering::AcqRel);
        let committed = committed?;
        self.state.last_answered_one.store(true, Ordering::Release);
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

/// What the committer thread shares with the handles, for the choice of committing in
/// place.
struct CommitterState {
    /// Batches handed to the thread and not yet committed, and a commit in place
    /// while it runs: zero when the store's writer is free of the engine's commits.
    outstanding: AtomicUsize,
    /// Whether the last commit answered a single message: requests then come one at a
    /// time, and none is likely to arrive while the next commits in place.
    last_answered_one: AtomicBool,
}

fn run(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<CommitRequest>,
    counts: &CommitCounts,
    state: &CommitterState,
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
        let answered: usize = requests.iter().map(|r| r.answered).sum();
        state
            .last_answered_one
            .store(answered == 1, Ordering::Release);
        state
            .outstanding
            .fetch_sub(requests.len(), Ordering::AcqRel);
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

#[cfg(test)]
mod tests {
    use super::*;
    use weir_store::{EventRecord, SqliteStore};

    /// A batch of partition 0 holding one event, the one after `seq_before`.
    fn one_event_batch(seq_before: u64) -> PartitionBatch {
        PartitionBatch {
            partition: 0,
            seq_before,
            events: vec![EventRecord {
                partition: 0,
                seq: seq_before + 1,
                epoch: 0,
                instance_id: "i".into(),
                at: 1,
                event_type: "t".into(),
                payload: "{}".into(),
            }],
            ..PartitionBatch::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_lone_message_after_a_lone_message_commits_in_place() {
        // Goal: a quiet batch commits in place only when it answers one message and
        // the commit before answered one too (requests come one at a time); a batch
        // of several messages, and the one after it, go to the committer thread, and
        // every batch is durable in order either way. Method: a committer on a real
        // SQLite store, batches submitted with chosen counts, the in-place count read
        // after each, and the log's end read back.
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path(), 1).unwrap());
        let committer = Committer::start(store.clone());
        let mut seq = 0;
        let mut submit = |answered: usize, quiet: bool| {
            let batch = one_event_batch(seq);
            seq += 1;
            let committer = committer.clone();
            async move {
                let outcome = committer.submit(batch, answered, quiet).await.await;
                assert!(matches!(outcome, Ok(Ok(()))));
                committer.stats().in_place
            }
        };
        assert_eq!(submit(1, true).await, 1, "alone, at the start");
        assert_eq!(submit(1, false).await, 1, "not quiet");
        assert_eq!(submit(1, true).await, 2, "alone again");
        assert_eq!(submit(2, true).await, 2, "several messages");
        assert_eq!(submit(1, true).await, 2, "after a commit of several");
        assert_eq!(submit(1, true).await, 3, "alone after one alone");
        assert_eq!(committer.stats().transactions.count(), 6);
        let events = store.events_after(0, 0, 100).unwrap();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    }
}
