//! The worker: polls task queues, runs handlers, reports their results.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::client::{Client, NextTasks, COMPLETIONS_BATCH_MAX};
use crate::error::Error;
use crate::wire::PolledTask;

/// Most tasks a worker may run at once.
///
/// Every task in flight holds a lease on the server and a tokio task here; beyond this many a
/// single process is better split into several.
pub const CONCURRENCY_MAX: usize = 10_000;

/// Longest long-poll wait a worker asks for. A longer wait would only delay noticing a dead
/// connection.
pub const POLL_WAIT_MAX: Duration = Duration::from_secs(60);

/// Most tasks asked for in one poll, however many slots are free, to keep responses small.
pub const POLL_TASKS_MAX: usize = 256;

/// Shortest automatic heartbeat interval, so that a misconfiguration cannot flood a node.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(10);

/// Most tries to report one task's result before leaving it to lease expiry. With the
/// backoff below the tries span about 10 s: longer than a cluster failover (the failure
/// timeout, 2 s by default, plus a heartbeat), so a result survives its node's death.
const REPORT_ATTEMPTS_MAX: u32 = 8;

/// Longest wait between two tries of a report.
const REPORT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Wait before the second try of a report; doubled after each further failure.
const REPORT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// Wait before the second poll after a failed one; doubled after each further failure.
const POLL_BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// Longest wait between failed polls, so that a node coming back is noticed soon.
const POLL_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long the poll loop waits for more slots to free up when nearly all are busy, so that
/// a saturated worker asks for several tasks per poll instead of one per completion.
const POLL_BATCH_DELAY: Duration = Duration::from_millis(2);

/// A task as a handler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The task's id.
    pub task_id: String,
    /// The queue it came from.
    pub queue: String,
    /// The workflow instance it belongs to.
    pub instance_id: String,
    /// The step it performs.
    pub step_id: String,
    /// 1 for the first attempt, counting up with every retry.
    pub attempt: u32,
    /// The step's input.
    pub input: Value,
    /// Stable across the attempts of one step: use it to make side effects idempotent, since
    /// a task may run more than once (for example when a lease expires during a long pause).
    pub idempotency_key: String,
}

/// A handler's failure, reported to the engine which retries the step or fails it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct TaskError {
    /// A short machine-readable type, matched by the definition's `non_retryable` and
    /// `catch` lists (e.g. `card_declined`).
    pub error_type: String,
    /// Human-readable explanation.
    pub message: String,
    /// False when retrying cannot help; the step then fails at once.
    pub retryable: bool,
}

impl TaskError {
    /// A failure that a later attempt may not meet (a timeout, an unavailable service).
    pub fn retryable(error_type: impl Into<String>, message: impl Into<String>) -> TaskError {
        TaskError {
            error_type: error_type.into(),
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure that every attempt would meet (invalid input, a declined card).
    pub fn non_retryable(error_type: impl Into<String>, message: impl Into<String>) -> TaskError {
        TaskError {
            error_type: error_type.into(),
            message: message.into(),
            retryable: false,
        }
    }
}

/// A handle on the lease of the task being handled.
///
/// The worker heartbeats every task in flight by itself; a handler uses this handle to send
/// one at once (after a long blocking stretch), to learn that the lease was lost, in which
/// case its result will not be accepted and it may stop early, or to report the task
/// completed before it returns ([`complete`](Heartbeat::complete)). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    inner: Arc<HeartbeatInner>,
}

#[derive(Debug)]
struct HeartbeatInner {
    /// `None` for a detached handle.
    lease: Option<Lease>,
    lost: watch::Sender<bool>,
    /// Set once [`Heartbeat::complete`] succeeded: the worker then ignores the handler's
    /// result.
    reported: AtomicBool,
}

#[derive(Debug)]
struct Lease {
    client: Client,
    task_id: String,
    lease_token: String,
    stats: WorkerStats,
}

impl Heartbeat {
    /// A handle bound to no task, for calling a handler outside a worker (in its unit tests):
    /// [`beat`](Heartbeat::beat) succeeds without sending anything and the lease is never lost.
    pub fn detached() -> Heartbeat {
        Heartbeat::with_lease(None)
    }

    fn with_lease(lease: Option<Lease>) -> Heartbeat {
        let (lost, _) = watch::channel(false);
        Heartbeat {
            inner: Arc::new(HeartbeatInner {
                lease,
                lost,
                reported: AtomicBool::new(false),
            }),
        }
    }

    /// Extends the lease now. A stale-lease answer marks the lease lost and is returned as an
    /// error for which [`Error::is_stale_lease`] is true.
    pub async fn beat(&self) -> Result<(), Error> {
        let Some(lease) = &self.inner.lease else {
            return Ok(());
        };
        let result = lease
            .client
            .heartbeat(&lease.task_id, &lease.lease_token)
            .await;
        if let Err(error) = &result {
            if error.is_stale_lease() {
                self.inner.lost.send_replace(true);
            }
        }
        result
    }

    /// Reports the task completed with `output` now, from inside the handler, instead of
    /// waiting for the handler to return (for a handler with cleanup to do after reporting).
    ///
    /// Once a call has succeeded the task counts as completed and the worker ignores what the
    /// handler returns. Every call sends a completion: one made after a success is refused
    /// by the server with 409 (the lease is spent), which is how a duplicate delivery looks.
    /// A stale-lease answer marks the lease lost. After any other error nothing is recorded:
    /// returning the output from the handler makes the worker report it with its usual
    /// retries. A detached handle succeeds without sending anything.
    ///
    /// The call goes to one node (or the next ones when that one cannot be reached) without
    /// the worker's retry backoff.
    pub async fn complete(&self, output: &Value) -> Result<(), Error> {
        let Some(lease) = &self.inner.lease else {
            self.inner.reported.store(true, Ordering::Relaxed);
            return Ok(());
        };
        let result = lease
            .client
            .complete(&lease.task_id, &lease.lease_token, output)
            .await;
        match &result {
            Ok(()) => {
                if !self.inner.reported.swap(true, Ordering::Relaxed) {
                    lease.stats.inner.completed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(error) if error.is_stale_lease() => {
                self.inner.lost.send_replace(true);
            }
            Err(_) => {}
        }
        result
    }

    /// True once [`complete`](Heartbeat::complete) has succeeded for this task.
    pub fn is_reported(&self) -> bool {
        self.inner.reported.load(Ordering::Relaxed)
    }

    /// True once the server has refused this task's lease.
    pub fn is_lease_lost(&self) -> bool {
        *self.inner.lost.borrow()
    }

    /// Resolves when the server refuses this task's lease; never, if it does not.
    /// Handy in `tokio::select!` to stop work whose result can no longer be reported.
    pub async fn lease_lost(&self) {
        let mut receiver = self.inner.lost.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = receiver.wait_for(|lost| *lost).await;
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;
type Handler = Arc<dyn Fn(Task, Heartbeat) -> HandlerFuture + Send + Sync>;

/// Counters of a worker's work since it started. Cheap to clone; read while the worker runs.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    completed: AtomicU64,
    failed_retryable: AtomicU64,
    failed_non_retryable: AtomicU64,
    lease_lost: AtomicU64,
    unreported: AtomicU64,
    in_flight: AtomicU64,
}

impl WorkerStats {
    /// Tasks reported completed.
    pub fn completed(&self) -> u64 {
        self.inner.completed.load(Ordering::Relaxed)
    }

    /// Tasks reported failed (handler errors and panics).
    pub fn failed(&self) -> u64 {
        self.failed_retryable() + self.failed_non_retryable()
    }

    /// Tasks reported failed with a retryable error (panics included).
    pub fn failed_retryable(&self) -> u64 {
        self.inner.failed_retryable.load(Ordering::Relaxed)
    }

    /// Tasks reported failed with a non-retryable error.
    pub fn failed_non_retryable(&self) -> u64 {
        self.inner.failed_non_retryable.load(Ordering::Relaxed)
    }

    /// Tasks whose result was dropped because the server refused the lease.
    pub fn lease_lost(&self) -> u64 {
        self.inner.lease_lost.load(Ordering::Relaxed)
    }

    /// Tasks whose result could not be reported (no node answered in time); the server gives
    /// them out again when their lease expires.
    pub fn unreported(&self) -> u64 {
        self.inner.unreported.load(Ordering::Relaxed)
    }

    /// Tasks being handled or reported right now.
    pub fn in_flight(&self) -> u64 {
        self.inner.in_flight.load(Ordering::Relaxed)
    }
}

/// Options of a [`Worker`]; made by [`Worker::builder`].
pub struct WorkerBuilder {
    urls: Vec<String>,
    client: Option<Client>,
    handlers: HashMap<String, Handler>,
    worker_id: Option<String>,
    concurrency: usize,
    poll_wait: Duration,
    heartbeat_interval: Duration,
    next_on_completion: bool,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("WorkerBuilder")
            .field("urls", &self.urls)
            .field("queues", &self.handlers.keys().collect::<Vec<_>>())
            .field("worker_id", &self.worker_id)
            .field("concurrency", &self.concurrency)
            .field("poll_wait", &self.poll_wait)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("next_on_completion", &self.next_on_completion)
            .finish()
    }
}

impl WorkerBuilder {
    /// Handles tasks of queue `name` with `handler`. A later call for the same queue replaces
    /// the earlier handler.
    ///
    /// The handler runs in the task that heartbeats its lease, so it must not block a runtime
    /// thread: blocking or CPU-heavy work belongs in `tokio::task::spawn_blocking`, or the
    /// lease may expire while it runs. A panic fails the attempt (retryable).
    pub fn queue<F, Fut>(mut self, name: impl Into<String>, handler: F) -> WorkerBuilder
    where
        F: Fn(Task, Heartbeat) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |task, heartbeat| -> HandlerFuture {
            Box::pin(handler(task, heartbeat))
        });
        self.handlers.insert(name.into(), handler);
        self
    }

    /// Names this worker in the server's records (default: `<host>-<process id>`).
    pub fn worker_id(mut self, worker_id: impl Into<String>) -> WorkerBuilder {
        self.worker_id = Some(worker_id.into());
        self
    }

    /// Most tasks handled at once (default 64, at most [`CONCURRENCY_MAX`]). The worker polls
    /// only for as many tasks as it has free slots.
    pub fn concurrency(mut self, concurrency: usize) -> WorkerBuilder {
        self.concurrency = concurrency;
        self
    }

    /// How long one poll waits for a task before returning empty (default 20 s, at most
    /// [`POLL_WAIT_MAX`]).
    pub fn poll_wait(mut self, wait: Duration) -> WorkerBuilder {
        self.poll_wait = wait;
        self
    }

    /// How often a task in flight is heartbeated (default 10 s, at least
    /// [`HEARTBEAT_INTERVAL_MIN`]). Choose about a third of the shortest heartbeat timeout of
    /// the steps this worker handles.
    pub fn heartbeat_interval(mut self, interval: Duration) -> WorkerBuilder {
        self.heartbeat_interval = interval;
        self
    }

    /// Whether a completion asks for the next task in its answer (default on): the slot it
    /// frees is filled in the same round trip, with the instance's next step first when
    /// that is a task of this worker's queues, and the worker needs no poll for it. Off,
    /// every task comes from a poll, so that a worker never keeps an instance's next step
    /// from an idle worker (a busy worker then takes no more than its free slots either
    /// way: a completion asks for one task per slot it frees).
    pub fn next_on_completion(mut self, enabled: bool) -> WorkerBuilder {
        self.next_on_completion = enabled;
        self
    }

    /// Uses `client` instead of making one from the URLs given to [`Worker::builder`], to
    /// share its connection pool.
    pub fn client(mut self, client: Client) -> WorkerBuilder {
        self.client = Some(client);
        self
    }

    /// Checks the options and makes the worker.
    pub fn build(self) -> Result<Worker, Error> {
        if self.handlers.is_empty() {
            return Err(Error::Config("no queue has a handler".into()));
        }
        if self.concurrency == 0 || self.concurrency > CONCURRENCY_MAX {
            return Err(Error::Config(format!(
                "concurrency must be between 1 and {CONCURRENCY_MAX}, not {}",
                self.concurrency
            )));
        }
        if self.poll_wait > POLL_WAIT_MAX {
            return Err(Error::Config(format!(
                "poll wait must be at most {POLL_WAIT_MAX:?}, not {:?}",
                self.poll_wait
            )));
        }
        if self.heartbeat_interval < HEARTBEAT_INTERVAL_MIN {
            return Err(Error::Config(format!(
                "heartbeat interval must be at least {HEARTBEAT_INTERVAL_MIN:?}, not {:?}",
                self.heartbeat_interval
            )));
        }
        let client = match self.client {
            Some(client) => client,
            None => Client::new(self.urls)?,
        };
        let mut queues: Vec<String> = self.handlers.keys().cloned().collect();
        queues.sort();
        Ok(Worker {
            client,
            handlers: Arc::new(self.handlers),
            queues,
            worker_id: self.worker_id.unwrap_or_else(default_worker_id),
            concurrency: self.concurrency,
            poll_wait: self.poll_wait,
            heartbeat_interval: self.heartbeat_interval,
            next_on_completion: self.next_on_completion,
            stats: WorkerStats::default(),
        })
    }

    /// Builds the worker and runs it until `shutdown` resolves; see [`Worker::run`].
    pub async fn run(self, shutdown: impl Future) -> Result<(), Error> {
        self.build()?.run(shutdown).await
    }
}

/// A worker process's engine: long-polls queues, runs each task's handler, and reports the
/// result, up to a set number of tasks at once.
///
/// ```no_run
/// use serde_json::json;
/// use weir_sdk::{TaskError, Worker};
///
/// #[tokio::main]
/// async fn main() -> Result<(), weir_sdk::Error> {
///     Worker::builder(vec!["http://127.0.0.1:7600".into()])
///         .queue("payments", |task, _heartbeat| async move {
///             let amount = task.input["amount"].as_u64().ok_or_else(|| {
///                 TaskError::non_retryable("invalid_input", "amount must be a whole number")
///             })?;
///             // Charge `amount`, passing `task.idempotency_key` to the payment provider.
///             Ok(json!({ "charged": amount }))
///         })
///         .concurrency(32)
///         .run(async {
///             let _ = tokio::signal::ctrl_c().await;
///         })
///         .await
/// }
/// ```
pub struct Worker {
    client: Client,
    handlers: Arc<HashMap<String, Handler>>,
    queues: Vec<String>,
    worker_id: String,
    concurrency: usize,
    poll_wait: Duration,
    heartbeat_interval: Duration,
    next_on_completion: bool,
    stats: WorkerStats,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Worker")
            .field("urls", &self.client.urls())
            .field("queues", &self.queues)
            .field("worker_id", &self.worker_id)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// What every task of one worker shares.
struct Shared {
    client: Client,
    handlers: Arc<HashMap<String, Handler>>,
    heartbeat_interval: Duration,
    stats: WorkerStats,
    /// Completions on their way to the server, batched by [`send_completions`].
    completions: mpsc::Sender<PendingCompletion>,
    /// Whether completions ask for next tasks ([`WorkerBuilder::next_on_completion`]); set
    /// off when the worker stops, so that it takes no new work.
    next_on_completion: AtomicBool,
}

impl Shared {
    /// Completes a task through the batcher: completions that finish while a request
    /// is on its way go together in the next one. With `wants_next` (and the worker's
    /// option on), the answer may bring a task for the slot the completion frees, whatever
    /// the completion's own outcome: it is leased to this worker either way.
    async fn complete_batched(
        &self,
        task_id: &str,
        lease_token: &str,
        output: &Arc<Value>,
        wants_next: bool,
    ) -> (Result<(), Error>, Option<PolledTask>) {
        let (reply, outcome) = oneshot::channel();
        let pending = PendingCompletion {
            task_id: task_id.to_owned(),
            lease_token: lease_token.to_owned(),
            output: output.clone(),
            wants_next: wants_next && self.next_on_completion.load(Ordering::Relaxed),
            reply,
        };
        if self.completions.send(pending).await.is_err() {
            // The batcher is gone (only while the worker stops): report it alone.
            return (
                self.client.complete(task_id, lease_token, output).await,
                None,
            );
        }
        match outcome.await {
            Ok(answer) => answer,
            Err(_) => (
                self.client.complete(task_id, lease_token, output).await,
                None,
            ),
        }
    }
}

/// A completion waiting for the batcher.
struct PendingCompletion {
    task_id: String,
    lease_token: String,
    /// Shared with the reporting task, which may need it again for a retry.
    output: Arc<Value>,
    /// Whether its answer may bring a task for the slot it frees.
    wants_next: bool,
    reply: oneshot::Sender<(Result<(), Error>, Option<PolledTask>)>,
}

/// Most completions waiting for the batcher; handlers wait beyond that.
const COMPLETIONS_QUEUE_MAX: usize = 4 * COMPLETIONS_BATCH_MAX;

/// Most batch requests of completions on their way at once: a few, so that a
/// batch does not wait for the previous one's round trip, and few, so that
/// completions that finish meanwhile gather into the next batch.
const COMPLETION_REQUESTS_CONCURRENT_MAX: usize = 4;

/// Sends completions: one alone with `POST /v1/tasks/{id}/complete`, several that
/// waited together in one `POST /v1/tasks/completions`, each asking for as many next
/// tasks as its completions free slots for. When a batch as a whole fails (a node
/// unreachable, a server without the batch endpoint), each of its completions is sent
/// alone, so every completion gets the answer it would have had without batching.
/// Runs until every sender is gone.
async fn send_completions(
    client: Client,
    queues: Arc<[String]>,
    mut receiver: mpsc::Receiver<PendingCompletion>,
) {
    let requests = Arc::new(Semaphore::new(COMPLETION_REQUESTS_CONCURRENT_MAX));
    loop {
        let Ok(permit) = requests.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(COMPLETIONS_BATCH_MAX);
        if receiver.recv_many(&mut batch, COMPLETIONS_BATCH_MAX).await == 0 {
            return;
        }
        let client = client.clone();
        let queues = queues.clone();
        tokio::spawn(async move {
            send_batch(&client, &queues, batch).await;
            drop(permit);
        });
    }
}

/// Sends one completion alone, with its request for a next task.
async fn send_alone(client: &Client, queues: &[String], pending: PendingCompletion) {
    let answer = if pending.wants_next {
        let next = NextTasks {
            queues,
            max_tasks: 1,
        };
        match client
            .complete_then_take(
                &pending.task_id,
                &pending.lease_token,
                &pending.output,
                next,
            )
            .await
        {
            Ok(tasks) => {
                warn_if_more(1, tasks.len());
                (Ok(()), tasks.into_iter().next())
            }
            Err(error) => (Err(error), None),
        }
    } else {
        let outcome = client
            .complete(&pending.task_id, &pending.lease_token, &pending.output)
            .await;
        (outcome, None)
    };
    let _ = pending.reply.send(answer);
}

/// A server that answers more next tasks than asked for breaks the protocol: the extra
/// tasks are left to lease expiry (this worker has no slot for them).
fn warn_if_more(asked: usize, given: usize) {
    if given > asked {
        tracing::error!(
            asked,
            given,
            "server answered more next tasks than asked for; the rest go back after their leases expire"
        );
    }
}

async fn send_batch(client: &Client, queues: &Arc<[String]>, mut batch: Vec<PendingCompletion>) {
    if batch.len() == 1 {
        let pending = batch.pop().expect("one completion");
        send_alone(client, queues, pending).await;
        return;
    }
    let items: Vec<(&str, &str, &Value)> = batch
        .iter()
        .map(|p| (p.task_id.as_str(), p.lease_token.as_str(), &*p.output))
        .collect();
    let wanted = batch.iter().filter(|p| p.wants_next).count();
    let answered = if wanted > 0 {
        let next = NextTasks {
            queues,
            max_tasks: wanted,
        };
        client.complete_many_then_take(&items, next).await
    } else {
        client
            .complete_many(&items)
            .await
            .map(|outcomes| (outcomes, Vec::new()))
    };
    match answered {
        Ok((outcomes, tasks)) => {
            warn_if_more(wanted, tasks.len());
            let mut tasks = tasks.into_iter();
            for (pending, outcome) in batch.into_iter().zip(outcomes) {
                // A slot freed by a refused completion is as free as any other's.
                let next = if pending.wants_next {
                    tasks.next()
                } else {
                    None
                };
                let _ = pending.reply.send((outcome, next));
            }
        }
        Err(error) => {
            tracing::debug!(error = %ErrorChain(&error), count = batch.len(), "batch of completions failed, sending each alone");
            for pending in batch {
                let client = client.clone();
                let queues = queues.clone();
                tokio::spawn(async move { send_alone(&client, &queues, pending).await });
            }
        }
    }
}

impl Worker {
    /// Starts configuring a worker that talks to the nodes at `urls`, trying the next one when
    /// a node cannot be reached.
    pub fn builder(urls: Vec<String>) -> WorkerBuilder {
        WorkerBuilder {
            urls,
            client: None,
            handlers: HashMap::new(),
            worker_id: None,
            concurrency: 64,
            poll_wait: Duration::from_secs(20),
            heartbeat_interval: Duration::from_secs(10),
            next_on_completion: true,
        }
    }

    /// The worker's counters, to be read while it runs.
    pub fn stats(&self) -> WorkerStats {
        self.stats.clone()
    }

    /// The name this worker gives the server.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Polls and handles tasks until `shutdown` resolves, then stops polling (abandoning a
    /// poll in progress) and waits for the tasks in flight to finish and be reported.
    ///
    /// Unreachable nodes and 5xx answers are retried with backoff for as long as it takes.
    /// Returns an error only when the server refuses the poll itself (a 4xx such as an
    /// invalid queue name), after the tasks in flight have finished.
    pub async fn run(self, shutdown: impl Future) -> Result<(), Error> {
        let semaphore = Arc::new(Semaphore::new(self.concurrency));
        let (completions, pending_completions) = mpsc::channel(COMPLETIONS_QUEUE_MAX);
        let queues: Arc<[String]> = self.queues.clone().into();
        tokio::spawn(send_completions(
            self.client.clone(),
            queues,
            pending_completions,
        ));
        let shared = Arc::new(Shared {
            client: self.client.clone(),
            handlers: self.handlers.clone(),
            heartbeat_interval: self.heartbeat_interval,
            stats: self.stats.clone(),
            completions,
            next_on_completion: AtomicBool::new(self.next_on_completion),
        });
        tokio::pin!(shutdown);
        let mut poll_backoff = POLL_BACKOFF_INITIAL;
        // Runs until shutdown or a refused poll.
        let result = loop {
            let free = tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                permits = self.free_slots(&semaphore) => permits,
            };
            let Some(mut permits) = free else {
                break Ok(());
            };
            let slots = permits.num_permits();
            let polled = tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                polled = self.client.poll(&self.queues, &self.worker_id, slots, self.poll_wait) => polled,
            };
            match polled {
                Ok(tasks) => {
                    poll_backoff = POLL_BACKOFF_INITIAL;
                    for task in tasks {
                        let permit = match permits.split(1) {
                            Some(permit) => permit,
                            None => {
                                tracing::warn!(
                                    slots,
                                    "server gave more tasks than asked for, waiting for a slot"
                                );
                                match semaphore.clone().acquire_owned().await {
                                    Ok(permit) => permit,
                                    Err(_) => break,
                                }
                            }
                        };
                        shared.stats.inner.in_flight.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(handle(shared.clone(), task, permit));
                    }
                }
                Err(error) if is_refusal(&error) => {
                    tracing::error!(%error, "server refused the poll, stopping");
                    break Err(error);
                }
                Err(error) => {
                    drop(permits);
                    tracing::warn!(error = %ErrorChain(&error), backoff = ?poll_backoff, "poll failed");
                    let backoff = jittered(poll_backoff);
                    poll_backoff = poll_backoff.saturating_mul(2).min(POLL_BACKOFF_MAX);
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        };
        // Take no new work: completions from now on ask for no next task.
        shared.next_on_completion.store(false, Ordering::Relaxed);
        // Every task in flight holds a permit until its result is reported: holding all of
        // them means none is left.
        let all = u32::try_from(self.concurrency).unwrap_or(u32::MAX);
        let _drained = semaphore.acquire_many(all).await;
        result
    }

    /// Waits for at least one free slot and takes every free slot (at most
    /// [`POLL_TASKS_MAX`]). `None` if the semaphore was closed.
    async fn free_slots(&self, semaphore: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        let mut permits = semaphore.clone().acquire_owned().await.ok()?;
        let wanted = self.concurrency.min(POLL_TASKS_MAX);
        let batch_min = (wanted / 4).max(1);
        if semaphore.available_permits() + 1 < batch_min {
            // Nearly saturated: give running tasks a moment to finish so that this poll asks
            // for several tasks.
            let more = u32::try_from(batch_min - 1).unwrap_or(u32::MAX);
            let waited =
                tokio::time::timeout(POLL_BATCH_DELAY, semaphore.clone().acquire_many_owned(more))
                    .await;
            if let Ok(Ok(more)) = waited {
                permits.merge(more);
            }
        }
        let free = semaphore
            .available_permits()
            .min(wanted.saturating_sub(permits.num_permits()));
        if free > 0 {
            let free = u32::try_from(free).unwrap_or(u32::MAX);
            if let Ok(more) = semaphore.clone().try_acquire_many_owned(free) {
                permits.merge(more);
            }
        }
        Some(permits)
    }
}

/// Runs a task's handler with heartbeats and reports its result, then the tasks the
/// reports bring back, in the same slot; the permit is released (freeing the slot) only
/// after the last report.
async fn handle(shared: Arc<Shared>, task: PolledTask, permit: OwnedSemaphorePermit) {
    let _permit = permit;
    let mut next = handle_one(&shared, task).await;
    while let Some(task) = next {
        shared.stats.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        next = handle_one(&shared, task).await;
    }
}

/// Runs one task's handler with heartbeats and reports its result; returns the task the
/// report brought back, if any.
async fn handle_one(shared: &Arc<Shared>, task: PolledTask) -> Option<PolledTask> {
    let _in_flight = InFlight(&shared.stats);
    let PolledTask {
        task_id,
        lease_token,
        queue,
        instance_id,
        step_id,
        attempt,
        input,
        idempotency_key,
    } = task;
    let Some(handler) = shared.handlers.get(&queue).cloned() else {
        let error = TaskError::retryable(
            "unknown_queue",
            format!("this worker has no handler for queue {queue:?}"),
        );
        fail(shared, &task_id, &lease_token, &error).await;
        return None;
    };
    let heartbeat = Heartbeat::with_lease(Some(Lease {
        client: shared.client.clone(),
        task_id: task_id.clone(),
        lease_token: lease_token.clone(),
        stats: shared.stats.clone(),
    }));
    let task = Task {
        task_id: task_id.clone(),
        queue,
        instance_id,
        step_id,
        attempt,
        input,
        idempotency_key,
    };
    // A panic in the handler is caught and reported as a failure instead of leaving the
    // task to lease expiry. The handler runs in this tokio task rather than a spawned one,
    // and is polled first: a handler that finishes at once then costs no spawn and arms no
    // heartbeat timer (both were a tenth of a no-op worker's CPU).
    let running = std::panic::AssertUnwindSafe(handler(task, heartbeat.clone())).catch_unwind();
    let joined = tokio::select! {
        biased;
        joined = running => joined,
        never = heartbeat_loop(&heartbeat, shared.heartbeat_interval) => match never {},
    };
    let result = match joined {
        Ok(result) => result,
        Err(panic) => Err(TaskError::retryable("panic", panic_message(panic))),
    };
    if heartbeat.is_reported() {
        // The handler completed the task itself (and was counted then).
        return None;
    }
    if heartbeat.is_lease_lost() {
        tracing::debug!(
            task_id,
            "lease lost during the handler, dropping its result"
        );
        shared
            .stats
            .inner
            .lease_lost
            .fetch_add(1, Ordering::Relaxed);
        return None;
    }
    match result {
        Ok(output) => complete(shared, &task_id, &lease_token, Arc::new(output)).await,
        Err(error) => {
            fail(shared, &task_id, &lease_token, &error).await;
            None
        }
    }
}

/// Heartbeats the task every `interval`; stops (and pends forever) once the lease is lost.
async fn heartbeat_loop(heartbeat: &Heartbeat, interval: Duration) -> Infallible {
    let start = tokio::time::Instant::now() + interval;
    let mut ticker = tokio::time::interval_at(start, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if heartbeat.is_reported() {
            // The lease is spent: a heartbeat could only be refused.
            return std::future::pending().await;
        }
        match heartbeat.beat().await {
            Ok(()) => {}
            Err(_) if heartbeat.is_reported() => return std::future::pending().await,
            Err(error) if error.is_stale_lease() => {
                tracing::warn!(%error, "heartbeat refused, lease lost");
                return std::future::pending().await;
            }
            Err(error) => tracing::warn!(error = %ErrorChain(&error), "heartbeat failed"),
        }
    }
}

/// Reports a completion; returns the task its answer brought for the freed slot, if any.
async fn complete(
    shared: &Shared,
    task_id: &str,
    lease_token: &str,
    output: Arc<Value>,
) -> Option<PolledTask> {
    // At most one next task per completion: once a try brought one, later tries (after a
    // failure the completion itself met) ask for none.
    let next: std::sync::Mutex<Option<PolledTask>> = std::sync::Mutex::new(None);
    let outcome = report(|| async {
        let wants_next = next.lock().expect("next task lock").is_none();
        let (outcome, task) = shared
            .complete_batched(task_id, lease_token, &output, wants_next)
            .await;
        if task.is_some() {
            *next.lock().expect("next task lock") = task;
        }
        outcome
    })
    .await;
    match outcome {
        Report::Done => {
            shared.stats.inner.completed.fetch_add(1, Ordering::Relaxed);
        }
        Report::Refused(error) if matches!(error.status(), Some(400 | 413 | 422)) => {
            // The output itself was refused (too large, not JSON the engine accepts): a retry
            // would produce the same output, so fail the step for good.
            tracing::warn!(task_id, %error, "output refused, failing the task");
            let error = TaskError::non_retryable("output_refused", error.to_string());
            fail(shared, task_id, lease_token, &error).await;
        }
        outcome => count_undelivered(shared, task_id, "completion", outcome),
    }
    next.into_inner().expect("next task lock")
}

async fn fail(shared: &Shared, task_id: &str, lease_token: &str, error: &TaskError) {
    let outcome = report(|| shared.client.fail(task_id, lease_token, error)).await;
    match outcome {
        Report::Done => {
            let counter = if error.retryable {
                &shared.stats.inner.failed_retryable
            } else {
                &shared.stats.inner.failed_non_retryable
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        outcome => count_undelivered(shared, task_id, "failure", outcome),
    }
}

fn count_undelivered(shared: &Shared, task_id: &str, what: &str, outcome: Report) {
    let stats = &shared.stats.inner;
    match outcome {
        Report::Done => {}
        Report::LeaseLost => {
            tracing::debug!(task_id, "lease lost, {what} dropped");
            stats.lease_lost.fetch_add(1, Ordering::Relaxed);
        }
        Report::Refused(error) => {
            tracing::error!(task_id, %error, "server refused the {what}");
            stats.unreported.fetch_add(1, Ordering::Relaxed);
        }
        Report::Unreachable(error) => {
            tracing::error!(task_id, error = %ErrorChain(&error), "cannot report the {what}, the task will be given out again after its lease expires");
            stats.unreported.fetch_add(1, Ordering::Relaxed);
        }
    }
}

enum Report {
    Done,
    /// 409: another worker has the task now, or its attempt is over.
    LeaseLost,
    /// Another 4xx: repeating would be refused again.
    Refused(Error),
    /// No node took the report in [`REPORT_ATTEMPTS_MAX`] tries.
    Unreachable(Error),
}

/// Sends a report, retrying with backoff while no node takes it (each try itself goes through
/// every node; see [`Client`]).
async fn report<F, Fut>(send: F) -> Report
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let mut backoff = REPORT_BACKOFF_INITIAL;
    let mut attempt = 1;
    loop {
        let error = match send().await {
            Ok(()) => return Report::Done,
            Err(error) if error.is_stale_lease() => return Report::LeaseLost,
            Err(error) if is_refusal(&error) => return Report::Refused(error),
            Err(error) => error,
        };
        if attempt == REPORT_ATTEMPTS_MAX {
            return Report::Unreachable(error);
        }
        tracing::debug!(error = %ErrorChain(&error), attempt, "report failed, retrying");
        tokio::time::sleep(jittered(backoff)).await;
        backoff = backoff.saturating_mul(2).min(REPORT_BACKOFF_MAX);
        attempt += 1;
    }
}

/// True for answers that repeating will not change: a 4xx other than 408 (timeout) and 429
/// (too many requests).
fn is_refusal(error: &Error) -> bool {
    match error.status() {
        Some(408 | 429) => false,
        Some(status) => (400..500).contains(&status),
        None => false,
    }
}

/// `duration` scaled by a random factor in [0.5, 1.0], so that many workers that lost the same
/// node do not all retry at the same instant.
fn jittered(duration: Duration) -> Duration {
    duration.mul_f64(rand::random_range(0.5..=1.0))
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        return format!("the handler panicked: {text}");
    }
    if let Some(text) = payload.downcast_ref::<String>() {
        return format!("the handler panicked: {text}");
    }
    "the handler panicked".to_owned()
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Counts a task in flight for as long as it lives.
struct InFlight<'a>(&'a WorkerStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inner.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Shows an error with its sources, `a: b: c`, for logs.
struct ErrorChain<'a>(&'a Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(error) = source {
            write!(formatter, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals() {
        // Goal: only answers that a repeat cannot change stop a retry loop.
        let api = |status| Error::Api(crate::ApiError::from_response(status, b""));
        assert!(is_refusal(&api(400)));
        assert!(is_refusal(&api(404)));
        assert!(!is_refusal(&api(408)));
        assert!(!is_refusal(&api(429)));
        assert!(!is_refusal(&api(500)));
        assert!(!is_refusal(&api(503)));
    }

    #[test]
    fn builder_refuses_bad_options() {
        // Goal: options that cannot work are refused at build with a reason.
        let base = || {
            Worker::builder(vec!["http://127.0.0.1:1".into()])
                .queue("q", |_task, _heartbeat| async { Ok(Value::Null) })
        };
        assert!(base().build().is_ok());
        assert!(matches!(
            base().concurrency(0).build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            base().concurrency(CONCURRENCY_MAX + 1).build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            base()
                .poll_wait(POLL_WAIT_MAX + Duration::from_secs(1))
                .build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            base().heartbeat_interval(Duration::ZERO).build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Worker::builder(vec!["http://127.0.0.1:1".into()]).build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Worker::builder(Vec::new())
                .queue("q", |_task, _heartbeat| async { Ok(Value::Null) })
                .build(),
            Err(Error::NoServer)
        ));
    }

    #[test]
    fn task_error_constructors() {
        // Goal: the constructors set `retryable` as their names say.
        assert!(TaskError::retryable("timeout", "slow").retryable);
        assert!(!TaskError::non_retryable("card_declined", "no").retryable);
        assert_eq!(
            TaskError::retryable("timeout", "slow").to_string(),
            "timeout: slow"
        );
    }

    #[tokio::test]
    async fn detached_heartbeat() {
        // Goal: a handler can be called outside a worker.
        let heartbeat = Heartbeat::detached();
        assert!(heartbeat.beat().await.is_ok());
        assert!(!heartbeat.is_lease_lost());
        assert!(!heartbeat.is_reported());
        assert!(heartbeat.complete(&Value::Null).await.is_ok());
        assert!(heartbeat.is_reported());
    }
}
