//! weir's runtime.
//!
//! An `Engine` owns partitions (each behind a lease with a fencing epoch), one
//! actor per owned partition, the group committer, durable timers, the task
//! board workers poll, and the HTTP step executor. Callers reach it through a
//! cheap-to-clone `Engine` handle; it never sees an HTTP server type.

mod clock;
mod cluster;
mod committer;
mod definitions;
mod http_call;
mod mailbox;
mod partition;
pub mod ring;
mod taskboard;
mod waiters;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use weir_model::event::ErrorInfo;
use weir_model::machine::{self, Command};
use weir_model::Problem;
use weir_store::{EventRecord, InstanceQuery, InstanceRecord, Store};

pub use clock::{Clock, TokioClock};
pub use cluster::{ClusterConfig, ClusterStatus, NodeStatus, PartitionStatus};
pub use partition::StartOutcome;
pub use taskboard::{TaskOffer, POLL_TASKS_MAX, RESERVATIONS_MAX};

pub use committer::CommitStats;
use committer::Committer;
use definitions::Definitions;
use partition::{Message, PartitionActor};
use taskboard::TaskBoard;

/// Longest a poll may wait for a task.
pub const POLL_WAIT_MAX: Duration = Duration::from_secs(60);
/// Most completions in one batch (`POST /v1/tasks/completions`).
pub const COMPLETIONS_BATCH_MAX: usize = 256;
/// Most API reads of the store that run at once; the SQLite store keeps as many
/// reader connections open ([`weir_store::READERS_MAX`]).
pub const STORE_READS_CONCURRENT_MAX: usize = weir_store::READERS_MAX;
/// Longest instance, step and definition name or id.
pub const ID_LENGTH_MAX: usize = 128;
/// Most instances one listing returns.
pub const LIST_LIMIT_MAX: u32 = 1000;
/// Most partitions loaded at once when a node takes partitions.
const PARTITION_LOADS_MAX: usize = 4;

/// Engine errors, each mapping to one kind of answer for the caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The definition is invalid.
    #[error("definition is invalid ({} problems)", .0.len())]
    InvalidDefinition(Vec<Problem>),
    /// Something asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request makes no sense in the current state.
    #[error("{0}")]
    Conflict(String),
    /// A lease token that is not the task's current one.
    #[error("{0}")]
    StaleLease(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Form data does not match a human task's schema: (JSON pointer, message) each.
    #[error("form data does not match the schema ({} problems)", .0.len())]
    InvalidData(Vec<(String, String)>),
    /// Temporarily unable (shutting down, partition not owned, store failed): retry.
    #[error("{0}")]
    Unavailable(String),
    /// Stored data could not be read back.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] weir_store::Error),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name (lease owner).
    pub node_id: String,
    /// How long a worker holds a task without heartbeat before it is offered again.
    pub task_lease: Duration,
    /// Membership, placement and lease timing.
    pub cluster: ClusterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "node-1".into(),
            task_lease: Duration::from_secs(30),
            cluster: ClusterConfig::default(),
        }
    }
}

/// An instance as callers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    /// Id.
    pub id: String,
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
    /// Status name.
    pub status: String,
    /// Input.
    pub input: Value,
    /// Output, once completed.
    pub output: Option<Value>,
    /// Error, once failed: `{"type","message"}`.
    pub error: Option<Value>,
    /// Created (ms since the epoch).
    pub created_at: u64,
    /// Last changed (ms since the epoch).
    pub updated_at: u64,
}

/// One event of a history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEvent {
    /// Position in the partition's log.
    pub seq: u64,
    /// Fencing epoch it was written under.
    pub epoch: u64,
    /// When (ms since the epoch).
    pub at: u64,
    /// The event, as its stored JSON object (`type` plus fields).
    pub event: Value,
}

/// A definition version as callers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct DefinitionView {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Source as deployed.
    pub source: String,
    /// Deployed (ms since the epoch).
    pub created_at: u64,
}

/// A request to start an instance.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// Definition name.
    pub definition: String,
    /// Version; the latest when `None`.
    pub version: Option<u32>,
    /// Input.
    pub input: Value,
    /// Id; generated when `None`.
    pub id: Option<String>,
    /// The instance this one restarts, and who asked.
    pub restart: Option<machine::Restart>,
    /// The instance this one is a child of.
    pub parent: Option<String>,
}

/// Room kept on the task board for a completing worker (see [`Engine::reserve_tasks`]).
pub struct TaskReservation {
    shared: Arc<Shared>,
    id: u64,
    taken: bool,
}

impl TaskReservation {
    /// Closes the reservation and returns its tasks, leased to the caller: those offered
    /// while it was open, then tasks already waiting on its queues while it has room.
    pub fn take(mut self) -> Vec<TaskOffer> {
        self.taken = true;
        self.shared.board.collect(self.id)
    }
}

impl Drop for TaskReservation {
    fn drop(&mut self) {
        if !self.taken {
            self.shared.board.cancel(self.id);
        }
    }
}

/// State shared by the engine's parts.
pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub board: TaskBoard,
    pub waiters: waiters::Waiters,
    pub definitions: Definitions,
    pub http: reqwest::Client,
    /// Messages no partition actor has taken yet.
    pub unread: mailbox::Unread,
    /// The engine itself, for effects that reach other instances (child workflows).
    pub engine: std::sync::OnceLock<std::sync::Weak<Inner>>,
}

impl Shared {
    /// The engine, while it runs.
    pub fn engine(&self) -> Option<Engine> {
        let inner = self.engine.get()?.upgrade()?;
        Some(Engine { inner })
    }
}

/// The command that tells a parent its child ended.
pub(crate) fn child_ended_command(child: &machine::InstanceState) -> Command {
    Command::ChildEnded {
        child_id: child.id.clone(),
        status: child.status.as_str().to_string(),
        output: child.output.clone(),
        error: child.error.clone(),
    }
}

struct Owned {
    epoch: u64,
    sender: mailbox::MailboxSender,
    task: JoinHandle<()>,
    /// Tells the actor to stop after its current batch (handover, shutdown).
    stop: watch::Sender<bool>,
}

struct Inner {
    config: Config,
    shared: Arc<Shared>,
    committer: Committer,
    partition_count: u32,
    partitions: Mutex<HashMap<u32, Owned>>,
    /// What this node knows of the cluster, refreshed every heartbeat.
    view: RwLock<cluster::View>,
    /// Serialises ownership changes (the coordinator's ticks and shutdown).
    ownership: tokio::sync::Mutex<()>,
    /// Set once shutdown began: the coordinator takes nothing more.
    stopping: AtomicBool,
    shutdown: watch::Sender<bool>,
    /// Set when the node stops handing out tasks (before it stops).
    draining: watch::Sender<bool>,
    /// How many times this node stopped partitions (handed over or dropped): a waiter
    /// for an instance of a partition that left stops waiting for an end that another
    /// node will announce.
    released: watch::Sender<u64>,
    background: Mutex<Vec<JoinHandle<()>>>,
    /// Permits for API reads of the store (see [`STORE_READS_CONCURRENT_MAX`]).
    reads: tokio::sync::Semaphore,
}

/// How long a wait for an instance's end lasts on a node that does not own its
/// partition, where no end will be announced (see [`Engine::wait_instance`]).
const UNOWNED_WAIT: Duration = Duration::from_millis(100);

/// One task completion of a batch ([`Engine::complete_tasks`]).
#[derive(Debug, Clone)]
pub struct TaskCompletion {
    /// The task's id.
    pub task_id: String,
    /// The lease token the poll gave with the task.
    pub lease_token: String,
    /// The task's output.
    pub output: Value,
}

/// Handle to a running engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts an engine on `store`: joins the membership, takes the leases of the
    /// partitions the ring places on this node (all of them on a single node),
    /// loads them and starts their actors, the coordinator and the task reaper.
    pub async fn start(
        store: Arc<dyn Store>,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Engine, Error> {
        let partition_count = store.partition_count();
        let http = reqwest::Client::builder()
            .build()
            .map_err(|err| Error::Unavailable(format!("http client: {err}")))?;
        let shared = Arc::new(Shared {
            store: store.clone(),
            clock: clock.clone(),
            board: TaskBoard::new(clock.clone(), config.task_lease),
            waiters: waiters::Waiters::default(),
            definitions: Definitions::new(store.clone()),
            http,
            unread: mailbox::Unread::default(),
            engine: std::sync::OnceLock::new(),
        });
        let (shutdown, _) = watch::channel(false);
        let (draining, _) = watch::channel(false);
        let (released, _) = watch::channel(0);
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                committer: Committer::start(store),
                shared,
                partition_count,
                partitions: Mutex::new(HashMap::new()),
                view: RwLock::new(cluster::View::default()),
                ownership: tokio::sync::Mutex::new(()),
                stopping: AtomicBool::new(false),
                shutdown,
                released,
                draining,
                background: Mutex::new(Vec::new()),
                reads: tokio::sync::Semaphore::new(STORE_READS_CONCURRENT_MAX),
            }),
        };
        let _ = engine
            .inner
            .shared
            .engine
            .set(Arc::downgrade(&engine.inner));
        engine.tick(true).await?;
        engine.spawn_background();
        tracing::info!(
            node = %engine.inner.config.node_id,
            partitions = partition_count,
            owned = engine.inner.partitions.lock().expect("partitions lock").len(),
            "engine started"
        );
        Ok(engine)
    }

    fn lease_ttl_ms(&self) -> u64 {
        self.inner.config.cluster.failure_timeout.as_millis() as u64
    }

    /// Takes a partition's lease and starts its actor.
    async fn acquire(&self, partition: u32) -> Result<bool, Error> {
        let inner = &self.inner;
        let store = inner.shared.store.clone();
        let owner = inner.config.node_id.clone();
        let now = inner.shared.clock.now_ms();
        let ttl = self.lease_ttl_ms();
        let lease =
            tokio::task::spawn_blocking(move || store.acquire_lease(partition, &owner, now, ttl))
                .await
                .map_err(|err| Error::Unavailable(err.to_string()))??;
        let Some(lease) = lease else {
            return Ok(false);
        };
        tracing::info!(partition, epoch = lease.epoch, "lease taken");
        let (stop, stop_signal) = watch::channel(false);
        let (sender, mailbox) = mailbox::mailbox(&inner.shared.unread);
        let actor = PartitionActor::load(
            partition,
            lease.epoch,
            inner.shared.clone(),
            inner.committer.clone(),
            mailbox,
            sender.clone(),
        )
        .await?;
        let task = tokio::spawn(actor.run(stop_signal));
        let previous = inner.partitions.lock().expect("partitions lock").insert(
            partition,
            Owned {
                epoch: lease.epoch,
                sender,
                task,
                stop,
            },
        );
        assert!(previous.is_none(), "a partition has one actor at a time");
        Ok(true)
    }

    fn spawn_background(&self) {
        let mut background = self.inner.background.lock().expect("background lock");
        // Coordinator: heartbeat, lease renewal, placement, handover, takeover.
        let engine = self.clone();
        let mut shutdown = self.inner.shutdown.subscribe();
        background.push(tokio::spawn(async move {
            let period = engine.inner.config.cluster.heartbeat;
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(period) => {}
                }
                if let Err(err) = engine.tick(false).await {
                    tracing::warn!(error = %err, "heartbeat failed");
                    engine.stop_if_leases_expired();
                }
            }
        }));
        // Task reaper: offers again tasks whose worker stopped heartbeating.
        let engine = self.clone();
        let mut shutdown = self.inner.shutdown.subscribe();
        background.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                let expired = engine.inner.shared.board.expire_leases();
                if expired > 0 {
                    tracing::info!(expired, "task leases expired; tasks offered again");
                }
                for timed_out in engine.inner.shared.board.timed_out() {
                    let engine = engine.clone();
                    tokio::spawn(async move {
                        let command = Command::FailTask {
                            task_id: timed_out.task_id.clone(),
                            error: ErrorInfo {
                                error_type: machine::ERROR_TYPE_TIMEOUT.to_string(),
                                message: timed_out.message,
                            },
                            retryable: true,
                        };
                        if let Err(err) = engine.apply(&timed_out.instance_id, command).await {
                            tracing::debug!(task = %timed_out.task_id, error = %err, "timing a task out was refused");
                        }
                    });
                }
            }
        }));
    }

    /// One round of the coordinator (see the `cluster` module).
    async fn tick(&self, joining: bool) -> Result<(), Error> {
        let inner = &self.inner;
        let _ownership = inner.ownership.lock().await;
        if inner.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Actors that stopped (fenced, store failure) give their partition up here.
        let held: Vec<(u32, u64)> = {
            let mut partitions = inner.partitions.lock().expect("partitions lock");
            partitions.retain(|partition, owned| {
                let alive = !owned.task.is_finished();
                if !alive {
                    tracing::warn!(
                        partition,
                        epoch = owned.epoch,
                        "partition actor stopped; lease lost"
                    );
                }
                alive
            });
            partitions.iter().map(|(p, o)| (*p, o.epoch)).collect()
        };
        let node_id = inner.config.node_id.clone();
        let announcement = inner.config.cluster.announcement(&node_id);
        let now = self.now();
        let ttl = self.lease_ttl_ms();
        let (membership, renewed) = self
            .blocking(move |store| {
                let membership = store.heartbeat(&announcement, joining, now, ttl)?;
                let renewed = store.renew_leases(&announcement.node_id, &held, now, ttl)?;
                Ok((membership, renewed))
            })
            .await?;
        let heartbeat_ok_at = Instant::now();
        // Leases not renewed are lost: stop their actors at once.
        let lost = self
            .owned_partitions()
            .into_iter()
            .filter(|p| !renewed.contains(p));
        for partition in lost {
            self.drop_partition(partition, "lease lost; partition stopped");
        }
        // Placement.
        let draining = membership
            .members
            .iter()
            .any(|m| m.node_id == node_id && m.draining);
        let placed = cluster::placed_nodes(&membership.members, inner.config.cluster.min_active);
        let assignment = ring::assign(&placed, inner.partition_count, inner.config.cluster.vnodes);
        let mine: std::collections::BTreeSet<u32> = if draining {
            Default::default()
        } else {
            assignment.partitions_of(&node_id).into_iter().collect()
        };
        // Hand over what is placed elsewhere.
        let handover: Vec<u32> = self
            .owned_partitions()
            .into_iter()
            .filter(|p| !mine.contains(p))
            .collect();
        if !handover.is_empty() {
            self.hand_over(&handover).await;
        }
        // Take what is placed here and free (or expired).
        let missing: Vec<u32> = {
            let partitions = inner.partitions.lock().expect("partitions lock");
            mine.iter()
                .filter(|p| !partitions.contains_key(p))
                .copied()
                .collect()
        };
        // A few loads at a time: each holds a partition's unfinished instances in memory
        // while it parses them, so all at once would multiply the peak.
        let mut takes = tokio::task::JoinSet::new();
        let mut missing = missing.into_iter();
        loop {
            while takes.len() < PARTITION_LOADS_MAX {
                let Some(partition) = missing.next() else {
                    break;
                };
                let engine = self.clone();
                takes.spawn(async move { (partition, engine.acquire(partition).await) });
            }
            let Some(taken) = takes.join_next().await else {
                break;
            };
            if let Ok((partition, Err(err))) = taken {
                tracing::warn!(partition, error = %err, "taking the partition failed");
            }
        }
        let leases = self.blocking(|store| store.leases()).await?;
        let mut view = inner.view.write().expect("view lock");
        view.placement = (0..inner.partition_count)
            .filter_map(|p| assignment.owner(p).map(|node| (p, node.to_string())))
            .collect();
        view.membership = membership;
        view.leases = leases;
        view.heartbeat_ok_at = Some(heartbeat_ok_at);
        Ok(())
    }

    /// Stops a partition's actor at once (its lease is gone) and clears its tasks.
    fn drop_partition(&self, partition: u32, why: &str) {
        let owned = self
            .inner
            .partitions
            .lock()
            .expect("partitions lock")
            .remove(&partition);
        if let Some(owned) = owned {
            tracing::warn!(partition, epoch = owned.epoch, "{why}");
            owned.task.abort();
            self.inner.shared.board.remove_partition(partition);
            self.inner.released.send_modify(|count| *count += 1);
        }
    }

    /// Stops the actors of `partitions` after their current batch and releases
    /// their leases, so that the next owner takes them without waiting for expiry.
    async fn hand_over(&self, partitions: &[u32]) {
        let mut stopped = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let owned = self
                .inner
                .partitions
                .lock()
                .expect("partitions lock")
                .remove(partition);
            if let Some(owned) = owned {
                let _ = owned.stop.send_replace(true);
                stopped.push((*partition, owned));
            }
        }
        let mut leases = Vec::with_capacity(stopped.len());
        for (partition, owned) in stopped {
            let _ = owned.task.await;
            leases.push((partition, owned.epoch));
        }
        // After the actors' last batches, whose ends their waiters were told of.
        if !leases.is_empty() {
            self.inner.released.send_modify(|count| *count += 1);
        }
        let owner = self.inner.config.node_id.clone();
        let released = leases.clone();
        match self
            .blocking(move |store| store.release_leases(&owner, &released))
            .await
        {
            Ok(()) => {
                for (partition, epoch) in leases {
                    tracing::info!(partition, epoch, "lease handed over");
                }
            }
            Err(err) => tracing::warn!(error = %err, "releasing leases failed; they will expire"),
        }
    }

    /// After a failed heartbeat: once a whole lease period passed since the last
    /// good one, other nodes may own this node's partitions, so stop them all.
    fn stop_if_leases_expired(&self) {
        let last_ok = self.inner.view.read().expect("view lock").heartbeat_ok_at;
        let expired =
            last_ok.is_none_or(|at| at.elapsed() >= self.inner.config.cluster.failure_timeout);
        if !expired {
            return;
        }
        for partition in self.owned_partitions() {
            self.drop_partition(
                partition,
                "store unreachable for a lease period; partition stopped",
            );
        }
    }

    /// Whether this node holds every partition the ring places on it, with a
    /// heartbeat within the failure timeout.
    pub fn ready(&self) -> bool {
        let view = self.inner.view.read().expect("view lock");
        let fresh = view
            .heartbeat_ok_at
            .is_some_and(|at| at.elapsed() < self.inner.config.cluster.failure_timeout);
        let partitions = self.inner.partitions.lock().expect("partitions lock");
        fresh
            && view
                .placement
                .iter()
                .filter(|(_, node)| **node == self.inner.config.node_id)
                .all(|(p, _)| partitions.get(p).is_some_and(|o| !o.task.is_finished()))
    }

    /// Partitions this node holds, and how many the ring places on it.
    pub fn ownership(&self) -> (Vec<u32>, usize) {
        let placed = self
            .inner
            .view
            .read()
            .expect("view lock")
            .placement
            .values()
            .filter(|node| **node == self.inner.config.node_id)
            .count();
        (self.owned_partitions(), placed)
    }

    /// Whether this node runs an actor for `partition`.
    fn owns(&self, partition: u32) -> bool {
        self.inner
            .partitions
            .lock()
            .expect("partitions lock")
            .contains_key(&partition)
    }

    /// The partitions this node runs an actor for, ascending.
    fn owned_partitions(&self) -> Vec<u32> {
        let mut owned: Vec<u32> = self
            .inner
            .partitions
            .lock()
            .expect("partitions lock")
            .keys()
            .copied()
            .collect();
        owned.sort_unstable();
        owned
    }

    /// This node's name.
    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    /// The URL of the node that owns `instance_id`'s partition, when that is
    /// another live node; `None` when this node owns it or no owner is known.
    pub fn owner_url(&self, instance_id: &str) -> Option<String> {
        let partition = partition_of(instance_id, self.inner.partition_count);
        if self
            .inner
            .partitions
            .lock()
            .expect("partitions lock")
            .contains_key(&partition)
        {
            return None;
        }
        self.inner
            .view
            .read()
            .expect("view lock")
            .owner_url(partition, &self.inner.config.node_id)
    }

    /// Whether this node owns every partition (a single node, or the only live one):
    /// then no request needs forwarding.
    pub fn owns_every_partition(&self) -> bool {
        let owned = self.inner.partitions.lock().expect("partitions lock").len();
        owned == self.inner.partition_count as usize
    }

    /// Whether other nodes may share this node's store (PostgreSQL), so that peers may
    /// join at any moment, even when there are none now.
    pub fn shares_its_store(&self) -> bool {
        !self.inner.shared.store.single_writer()
    }

    /// URLs of the other live nodes that own partitions (for task polls).
    pub fn peer_urls(&self) -> Vec<String> {
        self.inner
            .view
            .read()
            .expect("view lock")
            .peer_urls(&self.inner.config.node_id)
    }

    /// The cluster as the store records it now.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, Error> {
        let now = self.now();
        let ttl = self.lease_ttl_ms();
        let (membership, leases) = self
            .blocking(move |store| Ok((store.membership(now, ttl)?, store.leases()?)))
            .await?;
        Ok(cluster::status(
            &self.inner.config.node_id,
            &membership,
            &leases,
            self.inner.config.cluster.min_active,
            self.inner.config.cluster.vnodes,
        ))
    }

    /// Asks a node to hand its partitions over (or to take them again). The node
    /// sees the flag at its next heartbeat; so do the others, which take over.
    pub async fn set_draining(&self, node_id: &str, draining: bool) -> Result<(), Error> {
        if draining {
            // Draining the last node that could run partitions would stop everything.
            let now = self.now();
            let ttl = self.lease_ttl_ms();
            let membership = self
                .blocking(move |store| store.membership(now, ttl))
                .await?;
            let others_left = membership
                .members
                .iter()
                .any(|m| m.alive && !m.draining && m.node_id != node_id);
            if !others_left && membership.members.iter().any(|m| m.node_id == node_id) {
                return Err(Error::Conflict(format!(
                    "draining {node_id} would leave no live node to run the partitions"
                )));
            }
        }
        let node = node_id.to_string();
        let found = self
            .blocking(move |store| store.set_draining(&node, draining))
            .await?;
        if !found {
            return Err(Error::NotFound(format!("node {node_id} is not a member")));
        }
        tracing::info!(node = node_id, draining, "drain flag set");
        Ok(())
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.inner.partition_count
    }

    /// Stops handing out tasks: open and future polls answer empty at once, so
    /// that long polls do not hold a graceful shutdown up. Completions still work.
    pub fn stop_polls(&self) {
        let _ = self.inner.draining.send_replace(true);
    }

    /// Whether polls answer empty at once (the node is stopping).
    pub fn polls_stopped(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Stops actors after their current batch, gives the leases up and leaves the
    /// membership, so that other nodes take the partitions at their next heartbeat.
    pub async fn shutdown(&self) {
        self.stop_polls();
        {
            let _ownership = self.inner.ownership.lock().await;
            self.inner.stopping.store(true, Ordering::SeqCst);
        }
        let _ = self.inner.shutdown.send_replace(true);
        self.hand_over(&self.owned_partitions()).await;
        for task in self
            .inner
            .background
            .lock()
            .expect("background lock")
            .drain(..)
        {
            task.abort();
        }
        let node = self.inner.config.node_id.clone();
        if let Err(err) = self.blocking(move |store| store.leave(&node)).await {
            tracing::warn!(error = %err, "leaving the membership failed");
        }
        tracing::info!("engine stopped");
    }

    fn now(&self) -> u64 {
        self.inner.shared.clock.now_ms()
    }

    fn sender(&self, partition: u32) -> Result<mailbox::MailboxSender, Error> {
        let partitions = self.inner.partitions.lock().expect("partitions lock");
        match partitions.get(&partition) {
            Some(owned) if !owned.task.is_finished() => Ok(owned.sender.clone()),
            _ => Err(Error::Unavailable(format!(
                "partition {partition} is not owned by this node; retry"
            ))),
        }
    }

    /// A read for the API: at most [`STORE_READS_CONCURRENT_MAX`] run at once, the
    /// others wait here (on the runtime, not in blocking threads), so that a burst
    /// of reads neither grows the blocking pool nor opens connections beyond the
    /// store's reader pool. Coordination (heartbeats, leases) does not wait here.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, weir_store::Error> + Send + 'static,
    ) -> Result<T, Error> {
        let _permit = self
            .inner
            .reads
            .acquire()
            .await
            .map_err(|err| Error::Unavailable(err.to_string()))?;
        self.blocking(f).await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, weir_store::Error> + Send + 'static,
    ) -> Result<T, Error> {
        let store = self.inner.shared.store.clone();
        Ok(tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|err| Error::Unavailable(err.to_string()))??)
    }

    /// Validates and stores a new version of a definition.
    pub async fn deploy(&self, source: &str) -> Result<(String, u32), Error> {
        let definition = weir_model::dsl::parse(source).map_err(Error::InvalidDefinition)?;
        let name = definition.name.clone();
        let now = self.now();
        let owned_source = source.to_string();
        let owned_name = name.clone();
        let version = self
            .blocking(move |store| store.put_definition(&owned_name, &owned_source, now))
            .await?;
        self.inner
            .shared
            .definitions
            .insert(version, Arc::new(definition));
        tracing::info!(%name, version, "definition deployed");
        Ok((name, version))
    }

    /// A definition version, or the latest.
    pub async fn definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<DefinitionView, Error> {
        let owned = name.to_string();
        let record = self
            .blocking(move |store| store.definition(&owned, version))
            .await?;
        let record =
            record.ok_or_else(|| Error::NotFound(format!("definition {name} does not exist")))?;
        Ok(DefinitionView {
            name: record.name,
            version: record.version,
            source: record.source,
            created_at: record.created_at,
        })
    }

    /// The latest version of every definition.
    pub async fn definitions(&self) -> Result<Vec<DefinitionView>, Error> {
        let records = self.blocking(|store| store.definitions()).await?;
        Ok(records
            .into_iter()
            .map(|record| DefinitionView {
                name: record.name,
                version: record.version,
                source: record.source,
                created_at: record.created_at,
            })
            .collect())
    }

    /// Starts an instance, or finds the one that already has the requested id.
    pub async fn start_instance(
        &self,
        request: StartRequest,
    ) -> Result<(InstanceView, StartOutcome), Error> {
        // Whether an instance with the id exists is asked of its partition, which
        // knows its running, parked and recently ended instances and reads the store
        // once for a whole batch of starts (see `PartitionActor::read_before`).
        let (id, check_existing) = self.start_id(&request)?;
        self.start_as(request, id, check_existing).await
    }

    /// Starts an instance and waits up to `wait` for it to end (`POST /v1/instances?wait_ms=`):
    /// its view when the wait was over, and what the start did.
    ///
    /// The waiter registers before the start, so the end of an instance this call created
    /// is announced to it: no question to the partition and no store read is needed,
    /// unlike [`Engine::wait_instance`]. A start that found an existing instance waits as
    /// any reader does.
    pub async fn start_instance_and_wait(
        &self,
        request: StartRequest,
        wait: Duration,
    ) -> Result<(InstanceView, StartOutcome), Error> {
        if wait.is_zero() {
            return self.start_instance(request).await;
        }
        let (id, check_existing) = self.start_id(&request)?;
        let waiter = self.inner.shared.waiters.register(&id);
        let (view, outcome) = self.start_as(request, id, check_existing).await?;
        if outcome == StartOutcome::Existing || waiter.receiver.is_none() {
            drop(waiter);
            // The start is durable: a failed wait still answers the started instance.
            let waited = self.wait_instance(&view.id, wait).await;
            return Ok((waited.ok().flatten().unwrap_or(view), outcome));
        }
        // The start is durable: a failed wait still answers the started instance.
        let waited = self.ended_or_stored(waiter, &view.id, wait).await;
        Ok((waited.ok().flatten().unwrap_or(view), outcome))
    }

    /// The id a start creates, and whether an instance with it may exist already (it
    /// came from the caller, or is a child's); generated ids are new by construction.
    fn start_id(&self, request: &StartRequest) -> Result<(String, bool), Error> {
        match &request.id {
            Some(id) => {
                // Child ids carry the separator users may not use; they come from the machine.
                if request.parent.is_none() {
                    check_id("instance id", id)?;
                }
                Ok((id.clone(), true))
            }
            None => Ok((self.generate_local_id(), false)),
        }
    }

    /// Starts instance `id` (see [`Engine::start_instance`]).
    async fn start_as(
        &self,
        request: StartRequest,
        id: String,
        check_existing: bool,
    ) -> Result<(InstanceView, StartOutcome), Error> {
        let resolved = self
            .inner
            .shared
            .definitions
            .resolve(&request.definition, request.version)
            .await;
        let (version, definition) = match resolved {
            Ok(resolved) => resolved,
            Err(err @ Error::NotFound(_)) if check_existing => {
                // A repeated start answers with the instance it made, whatever the
                // definitions have become since.
                return match self.instance(&id).await? {
                    Some(existing) => Ok((existing, StartOutcome::Existing)),
                    None => Err(err),
                };
            }
            Err(err) => return Err(err),
        };
        let partition = partition_of(&id, self.inner.partition_count);
        let (reply, receiver) = oneshot::channel();
        let message = Message::Start {
            definition: definition.clone(),
            version,
            id: id.clone(),
            input: request.input.clone(),
            restart: request.restart.clone(),
            parent: request.parent.clone(),
            check_existing,
            reply,
        };
        self.send(partition, message).await?;
        let outcome = receiver
            .await
            .map_err(|_| Error::Unavailable("partition stopped; retry".into()))??;
        match outcome {
            StartOutcome::Created => {
                let now = self.now();
                Ok((
                    InstanceView {
                        id,
                        definition: definition.name.clone(),
                        version,
                        status: "running".into(),
                        input: request.input,
                        output: None,
                        error: None,
                        created_at: now,
                        updated_at: now,
                    },
                    outcome,
                ))
            }
            StartOutcome::Existing => {
                // Committed by an earlier request: read it back.
                let existing = self.instance(&id).await?;
                let existing = existing
                    .ok_or_else(|| Error::Unavailable("instance is being started; retry".into()))?;
                Ok((existing, outcome))
            }
        }
    }

    async fn send(&self, partition: u32, message: Message) -> Result<(), Error> {
        let sender = self.sender(partition)?;
        sender
            .send(message)
            .await
            .map_err(|_| Error::Unavailable(format!("partition {partition} stopped; retry")))
    }

    /// One instance.
    pub async fn instance(&self, id: &str) -> Result<Option<InstanceView>, Error> {
        let owned = id.to_string();
        let record = self.read(move |store| store.instance(&owned)).await?;
        record.map(instance_view).transpose()
    }

    /// One instance, waiting up to `wait` for it to end if it is running.
    pub async fn wait_instance(
        &self,
        id: &str,
        wait: Duration,
    ) -> Result<Option<InstanceView>, Error> {
        let waiter = self.inner.shared.waiters.register(id);
        if wait.is_zero() || waiter.receiver.is_none() || !self.running_in_memory(id).await {
            // Not known to run here: the store says what it is.
            let view = self.instance(id).await?;
            let running = view.as_ref().is_some_and(|v| v.status == "running");
            if !running || wait.is_zero() || waiter.receiver.is_none() {
                return Ok(view);
            }
        }
        self.ended_or_stored(waiter, id, wait).await
    }

    /// Waits up to `wait` (at most `POLL_WAIT_MAX`) for the end a registered waiter is
    /// told of, and answers the committed final view; when the wait was over first or the
    /// node stops, the instance as stored.
    async fn ended_or_stored(
        &self,
        mut waiter: waiters::Waiter<'_>,
        id: &str,
        wait: Duration,
    ) -> Result<Option<InstanceView>, Error> {
        let mut draining = self.inner.draining.subscribe();
        let mut released = self.inner.released.subscribe();
        let partition = partition_of(id, self.inner.partition_count);
        if !self.owns(partition) {
            // No end will be announced here (the partition moves, or this node's view
            // is behind): the store's answer after a short pause, so that a caller
            // asking again does not spin while the partition finds its owner.
            tokio::time::sleep(wait.min(UNOWNED_WAIT)).await;
            drop(waiter);
            return self.instance(id).await;
        }
        let deadline = tokio::time::Instant::now() + wait.min(POLL_WAIT_MAX);
        let ending = match waiter.receiver.as_mut() {
            // `wait_for` also returns at once when the node already stops.
            Some(receiver) => loop {
                tokio::select! {
                    ended = tokio::time::timeout_at(deadline, receiver.wait_for(Option::is_some)) => {
                        break ended.ok().and_then(|ended| ended.ok().and_then(|view| view.clone()));
                    }
                    _ = draining.wait_for(|stopping| *stopping) => break None,
                    // The instance's partition left this node: another node will end it,
                    // and the caller, answered now, asks again there.
                    changed = released.changed() => {
                        if changed.is_err() || !self.owns(partition) {
                            break None;
                        }
                    }
                }
            },
            None => None,
        };
        drop(waiter);
        match ending {
            // The partition handed over the committed final view: no read needed.
            Some(view) => Ok(Some(InstanceView::clone(&view))),
            None => self.instance(id).await,
        }
    }

    /// Whether the instance runs in the memory of a partition this node owns. The
    /// state may be ahead of the store (its batch committing), which is why only
    /// "running" is trusted from it: a waiter that sees it waits for the end, which
    /// is announced after its commit.
    async fn running_in_memory(&self, id: &str) -> bool {
        let partition = partition_of(id, self.inner.partition_count);
        let (reply, receiver) = oneshot::channel();
        let message = Message::IsRunning {
            instance_id: id.to_string(),
            reply,
        };
        if self.send(partition, message).await.is_err() {
            return false;
        }
        receiver.await.unwrap_or(false)
    }

    /// Instances newest first, filtered; `before` is the cursor (see [`InstanceQuery`]).
    pub async fn instances(&self, mut query: InstanceQuery) -> Result<Vec<InstanceView>, Error> {
        query.limit = query.limit.clamp(1, LIST_LIMIT_MAX);
        let records = self.read(move |store| store.instances(&query)).await?;
        records.into_iter().map(instance_view).collect()
    }

    /// An instance's events, in order.
    pub async fn history(&self, id: &str) -> Result<Vec<HistoryEvent>, Error> {
        if self.instance(id).await?.is_none() {
            return Err(Error::NotFound(format!("instance {id} does not exist")));
        }
        let partition = partition_of(id, self.inner.partition_count);
        let owned = id.to_string();
        let records = self
            .read(move |store| store.history(&owned, partition))
            .await?;
        records.into_iter().map(history_event).collect()
    }

    /// Events of a partition after `seq`, for followers of the log.
    pub async fn partition_events(
        &self,
        partition: u32,
        after: u64,
        limit: u32,
    ) -> Result<Vec<HistoryEvent>, Error> {
        if partition >= self.inner.partition_count {
            return Err(Error::NotFound(format!(
                "partition {partition} does not exist"
            )));
        }
        let records = self
            .blocking(move |store| store.events_after(partition, after, limit))
            .await?;
        records.into_iter().map(history_event).collect()
    }

    /// Cancels a running instance gracefully: its compensations run, then it ends `cancelled`.
    pub async fn cancel(&self, id: &str, by: &str) -> Result<InstanceView, Error> {
        let result = self
            .operate(id, Command::Cancel { by: by.to_string() })
            .await;
        // A cancel ends a pause: the compensations must be handed out.
        if result.is_ok() {
            self.inner.shared.board.resume_instance(id);
        }
        result
    }

    /// Ends a running instance at once, without compensation.
    pub async fn terminate(&self, id: &str, by: &str, reason: &str) -> Result<InstanceView, Error> {
        let command = Command::Terminate {
            by: by.to_string(),
            reason: reason.to_string(),
        };
        let result = self.operate(id, command).await;
        if result.is_ok() {
            self.inner.shared.board.resume_instance(id);
        }
        result
    }

    /// Pauses a running instance: no new attempt starts, and tasks offered but not yet
    /// taken are held back; tasks already taken may finish.
    pub async fn pause(&self, id: &str, by: &str) -> Result<InstanceView, Error> {
        // Held before the pause commits, so that no task slips out in between; a refused
        // pause lets go again.
        self.inner.shared.board.pause_instance(id);
        let result = self
            .operate(id, Command::Pause { by: by.to_string() })
            .await;
        if result.is_err() {
            let still_paused =
                matches!(self.instance(id).await, Ok(Some(view)) if view.status == "paused");
            if !still_paused {
                self.inner.shared.board.resume_instance(id);
            }
        }
        result
    }

    /// Resumes a paused instance.
    pub async fn resume(&self, id: &str, by: &str) -> Result<InstanceView, Error> {
        let result = self
            .operate(id, Command::Resume { by: by.to_string() })
            .await;
        if result.is_ok() {
            self.inner.shared.board.resume_instance(id);
        }
        result
    }

    /// Delivers a signal; kept by the instance until a `wait` step takes it.
    pub async fn signal(
        &self,
        id: &str,
        name: &str,
        payload: Value,
    ) -> Result<InstanceView, Error> {
        check_id("signal name", name)?;
        let command = Command::Signal {
            name: name.to_string(),
            payload,
        };
        self.operate(id, command).await
    }

    /// Resumes a failed instance from its failed step; completed steps are not run again.
    pub async fn retry(&self, id: &str, by: &str) -> Result<InstanceView, Error> {
        self.revive(id, Command::Retry { by: by.to_string() }).await
    }

    /// Runs an ended instance again from `from_step`.
    pub async fn rerun(&self, id: &str, by: &str, from_step: &str) -> Result<InstanceView, Error> {
        let command = Command::Rerun {
            by: by.to_string(),
            from_step: from_step.to_string(),
        };
        self.revive(id, command).await
    }

    /// Starts a new instance with the same definition version and input as an ended one,
    /// linked to it (`restarted_from`).
    pub async fn restart(&self, id: &str, by: &str) -> Result<InstanceView, Error> {
        let old = self
            .instance(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("instance {id} does not exist")))?;
        let status = machine::InstanceStatus::parse(&old.status);
        if !status.is_some_and(|s| s.is_terminal()) {
            return Err(Error::Conflict(format!(
                "cannot restart an instance that is {}: cancel or terminate it first",
                old.status
            )));
        }
        let (view, _) = self
            .start_instance(StartRequest {
                definition: old.definition,
                version: Some(old.version),
                input: old.input,
                id: None,
                restart: Some(machine::Restart {
                    from: id.to_string(),
                    by: by.to_string(),
                }),
                parent: None,
            })
            .await?;
        Ok(view)
    }

    /// Starts (or finds) a child instance for a parent's `workflow` step, and tells the
    /// parent at once if the child has already ended (a start repeated after a crash).
    pub(crate) async fn start_child(
        self,
        parent: String,
        child_id: String,
        definition: String,
        version: Option<u32>,
        input: Value,
    ) {
        let request = StartRequest {
            definition,
            version,
            input,
            id: Some(child_id.clone()),
            restart: None,
            parent: Some(parent.clone()),
        };
        let ended = match self.start_instance(request).await {
            Ok((view, _)) => {
                let status = machine::InstanceStatus::parse(&view.status);
                if !status.is_some_and(|s| s.is_terminal()) {
                    return;
                }
                Command::ChildEnded {
                    child_id,
                    status: view.status,
                    output: view.output,
                    error: view.error.and_then(|e| serde_json::from_value(e).ok()),
                }
            }
            Err(err) => Command::ChildEnded {
                child_id,
                status: "failed".to_string(),
                output: None,
                error: Some(ErrorInfo {
                    error_type: "child_not_started".to_string(),
                    message: err.to_string(),
                }),
            },
        };
        self.tell_parent(&parent, ended).await;
    }

    /// Reports a child's end to its parent; a parent that moved on refuses it harmlessly.
    pub(crate) async fn tell_parent(&self, parent: &str, command: Command) {
        if let Err(err) = self.apply(parent, command).await {
            tracing::debug!(%parent, error = %err, "a child's end was refused by its parent");
        }
    }

    async fn operate(&self, id: &str, command: Command) -> Result<InstanceView, Error> {
        self.apply(id, command).await?;
        self.instance(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("instance {id} does not exist")))
    }

    /// Applies a command to an instance whether or not its partition holds it in memory.
    async fn revive(&self, id: &str, command: Command) -> Result<InstanceView, Error> {
        let ids = vec![id.to_string()];
        let state = self
            .read(move |store| partition::read_states(store, &ids))
            .await?
            .map_err(Error::Corrupt)?
            .pop()
            .flatten()
            .ok_or_else(|| Error::NotFound(format!("instance {id} does not exist")))?;
        let definition = self
            .inner
            .shared
            .definitions
            .get(&state.definition, state.version)
            .await?;
        let partition = partition_of(id, self.inner.partition_count);
        let (reply, receiver) = oneshot::channel();
        let message = Message::Revive {
            state: Box::new(state),
            definition,
            command,
            reply,
        };
        self.send(partition, message).await?;
        receiver
            .await
            .map_err(|_| Error::Unavailable("partition stopped; retry".into()))??;
        self.instance(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("instance {id} does not exist")))
    }

    async fn apply(&self, id: &str, command: Command) -> Result<(), Error> {
        let receiver = self.send_apply(id, command).await?;
        self.applied(id, receiver).await
    }

    /// Sends a command to its instance's partition; the receiver gets the outcome.
    async fn send_apply(
        &self,
        id: &str,
        command: Command,
    ) -> Result<oneshot::Receiver<Result<(), Error>>, Error> {
        let partition = partition_of(id, self.inner.partition_count);
        let (reply, receiver) = oneshot::channel();
        let message = Message::Apply {
            instance_id: id.to_string(),
            command,
            reply: Some(reply),
        };
        self.send(partition, message).await?;
        Ok(receiver)
    }

    /// The outcome of a command sent with [`Engine::send_apply`].
    async fn applied(
        &self,
        id: &str,
        receiver: oneshot::Receiver<Result<(), Error>>,
    ) -> Result<(), Error> {
        match receiver.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Error::NotFound(message))) => {
                // Not in memory: either it never existed or it ended.
                match self.instance(id).await? {
                    Some(view) => Err(Error::Conflict(format!(
                        "instance {id} has already ended ({})",
                        view.status
                    ))),
                    None => Err(Error::NotFound(
                        message.replace("is not running", "does not exist"),
                    )),
                }
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::Unavailable("partition stopped; retry".into())),
        }
    }

    /// Takes up to `max_tasks` tasks from `queues`, waiting up to `wait` for one.
    pub async fn poll(
        &self,
        queues: &[String],
        max_tasks: usize,
        wait: Duration,
    ) -> Vec<TaskOffer> {
        let wait = wait.min(POLL_WAIT_MAX);
        let mut draining = self.inner.draining.subscribe();
        if *draining.borrow_and_update() {
            return Vec::new();
        }
        tokio::select! {
            offers = self.inner.shared.board.poll(queues, max_tasks, wait) => offers,
            _ = draining.changed() => Vec::new(),
        }
    }

    /// Keeps room for up to `max_tasks` tasks of `queues` for a worker that is about
    /// to complete others: a task offered while the reservation is open (such as the
    /// next step of an instance whose completion is committing) goes to it, leased,
    /// instead of to a poll. [`TaskReservation::take`] hands them over; dropping the
    /// reservation offers them again. `None` while polls are stopped or when
    /// [`RESERVATIONS_MAX`] reservations are open: the worker then polls as usual.
    pub fn reserve_tasks(&self, queues: &[String], max_tasks: usize) -> Option<TaskReservation> {
        if self.polls_stopped() {
            return None;
        }
        let id = self.inner.shared.board.reserve(queues, max_tasks)?;
        Some(TaskReservation {
            shared: self.inner.shared.clone(),
            id,
            taken: false,
        })
    }

    /// A worker completed a task.
    pub async fn complete_task(
        &self,
        task_id: &str,
        lease_token: &str,
        output: Value,
    ) -> Result<(), Error> {
        let instance_id = self.check_lease(task_id, lease_token)?;
        self.apply(
            &instance_id,
            Command::CompleteTask {
                task_id: task_id.to_string(),
                output,
            },
        )
        .await
        .map_err(conflict_is_stale)
    }

    /// Several completions at once (a worker's batch), at most
    /// [`COMPLETIONS_BATCH_MAX`]: every one is sent to its partition before any
    /// outcome is awaited, so that they share the partitions' batches and the
    /// group commit. One outcome per completion, in order.
    pub async fn complete_tasks(&self, completions: Vec<TaskCompletion>) -> Vec<Result<(), Error>> {
        assert!(completions.len() <= COMPLETIONS_BATCH_MAX);
        let mut sent = Vec::with_capacity(completions.len());
        for completion in completions {
            let TaskCompletion {
                task_id,
                lease_token,
                output,
            } = completion;
            let receiver = match self.check_lease(&task_id, &lease_token) {
                Ok(instance_id) => {
                    let command = Command::CompleteTask { task_id, output };
                    self.send_apply(&instance_id, command)
                        .await
                        .map(|receiver| (instance_id, receiver))
                }
                Err(err) => Err(err),
            };
            sent.push(receiver);
        }
        let mut outcomes = Vec::with_capacity(sent.len());
        for receiver in sent {
            let outcome = match receiver {
                Ok((instance_id, receiver)) => self
                    .applied(&instance_id, receiver)
                    .await
                    .map_err(conflict_is_stale),
                Err(err) => Err(err),
            };
            outcomes.push(outcome);
        }
        outcomes
    }

    /// A worker failed a task.
    pub async fn fail_task(
        &self,
        task_id: &str,
        lease_token: &str,
        error: ErrorInfo,
        retryable: bool,
    ) -> Result<(), Error> {
        let instance_id = self.check_lease(task_id, lease_token)?;
        self.apply(
            &instance_id,
            Command::FailTask {
                task_id: task_id.to_string(),
                error,
                retryable,
            },
        )
        .await
        .map_err(conflict_is_stale)
    }

    /// A worker is still on a task.
    pub fn heartbeat_task(&self, task_id: &str, lease_token: &str) -> Result<(), Error> {
        self.inner
            .shared
            .board
            .heartbeat(task_id, lease_token)
            .map_err(|_| Error::StaleLease(format!("lease of task {task_id} is not current")))
    }

    fn check_lease(&self, task_id: &str, lease_token: &str) -> Result<String, Error> {
        let Some((instance_id, _, _)) = machine::parse_task_id(task_id) else {
            return Err(Error::StaleLease(format!("unknown task {task_id}")));
        };
        self.inner
            .shared
            .board
            .check(task_id, lease_token)
            .map_err(|_| Error::StaleLease(format!("lease of task {task_id} is not current")))?;
        Ok(instance_id.to_string())
    }

    /// Open human tasks, optionally only those of an assignee or a group.
    pub fn human_tasks(&self, assignee: Option<&str>, group: Option<&str>) -> Vec<TaskOffer> {
        let matches =
            |value: &Value, wanted: Option<&str>| wanted.is_none_or(|w| value.as_str() == Some(w));
        self.inner
            .shared
            .board
            .list(weir_model::dsl::HUMAN_QUEUE)
            .into_iter()
            .filter(|t| {
                matches(&t.input["assignee"], assignee) && matches(&t.input["group"], group)
            })
            .collect()
    }

    /// A person completed a human task with form data.
    pub async fn complete_human_task(
        &self,
        task_id: &str,
        by: &str,
        data: Value,
    ) -> Result<(), Error> {
        let Some((instance_id, _, _)) = machine::parse_task_id(task_id) else {
            return Err(Error::NotFound(format!(
                "human task {task_id} does not exist"
            )));
        };
        let command = Command::CompleteHuman {
            task_id: task_id.to_string(),
            by: by.to_string(),
            data,
        };
        self.apply(instance_id, command)
            .await
            .map_err(|err| match err {
                Error::StaleLease(_) => {
                    Error::Conflict(format!("human task {task_id} is no longer open"))
                }
                other => other,
            })
    }

    /// Tasks on the board (offered or leased).
    pub fn tasks_pending(&self) -> usize {
        self.inner.shared.board.len()
    }

    /// How long the tasks this node handed out waited on its board, from their offer
    /// (their row committed), their lease's expiry or their paused instance's resume, to a
    /// worker's lease.
    pub fn task_dispatch_waits(&self) -> weir_store::LatencySnapshot {
        self.inner.shared.board.dispatch_waits()
    }

    /// The group commits so far, with the store's WAL syncs.
    pub fn commit_stats(&self) -> CommitStats {
        self.inner.committer.stats()
    }
}

/// A completion for an instance that ended is a stale lease for the worker.
fn conflict_is_stale(err: Error) -> Error {
    match err {
        Error::Conflict(message) | Error::NotFound(message) => Error::StaleLease(message),
        other => other,
    }
}

/// The partition an instance belongs to for life: FNV-1a of its id modulo the count.
///
/// This function is part of the stored format: changing it would move instances.
/// Only the root instance's part of the id counts ([`machine::partition_key`]), so
/// that children live with their parents.
pub fn partition_of(instance_id: &str, partition_count: u32) -> u32 {
    assert!(partition_count > 0);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in machine::partition_key(instance_id).bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partition_count)) as u32
}

/// Checks a user-given id: 1 to `ID_LENGTH_MAX` of `[A-Za-z0-9_.-]`.
pub fn check_id(what: &str, id: &str) -> Result<(), Error> {
    let valid = !id.is_empty()
        && id.len() <= ID_LENGTH_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !valid {
        return Err(Error::BadRequest(format!(
            "{what} must be 1 to {ID_LENGTH_MAX} characters of A-Z, a-z, 0-9, `_`, `-` and `.`"
        )));
    }
    Ok(())
}

impl Engine {
    /// A fresh id whose partition this node owns (when it owns any), so that a
    /// start without an id never needs forwarding.
    fn generate_local_id(&self) -> String {
        /// Tries before settling for any id: owning 1 of 64 partitions, 256 tries
        /// miss with probability (63/64)^256 ≈ 2%.
        const TRIES_MAX: usize = 256;
        let partitions = self.inner.partitions.lock().expect("partitions lock");
        let mut id = generate_id();
        for _ in 0..TRIES_MAX {
            if partitions.is_empty()
                || partitions.contains_key(&partition_of(&id, self.inner.partition_count))
            {
                break;
            }
            id = generate_id();
        }
        id
    }
}

/// A new instance id: 32 hex digits of a version 7 UUID, whose leading bits are the
/// time in milliseconds and which this process makes in increasing order. Ids made in
/// order go at the end of every index they key (instances, tasks, timers, step outputs,
/// and events on PostgreSQL), so a commit writes the same few pages; random ids landed
/// each on a page of its own (see ARCHITECTURE.md, "Ids the engine makes are in the
/// order they are made").
fn generate_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// The view of an instance from its in-memory state (the same as
/// [`instance_view`] of the record the state is stored as).
pub(crate) fn view_of_state(state: &machine::InstanceState) -> InstanceView {
    let record = partition::instance_record_fields(state);
    InstanceView {
        id: state.id.clone(),
        definition: state.definition.clone(),
        version: state.version,
        status: state.status.as_str().to_string(),
        input: record.input.clone(),
        output: record.output.cloned(),
        error: record.error,
        created_at: state.created_at,
        updated_at: state.updated_at,
    }
}

fn instance_view(record: InstanceRecord) -> Result<InstanceView, Error> {
    let parse = |text: &str| {
        serde_json::from_str::<Value>(text)
            .map_err(|err| Error::Corrupt(format!("instance {}: {err}", record.id)))
    };
    Ok(InstanceView {
        input: parse(&record.input)?,
        output: record.output.as_deref().map(parse).transpose()?,
        error: record.error.as_deref().map(parse).transpose()?,
        id: record.id.clone(),
        definition: record.definition,
        version: record.version,
        status: record.status,
        created_at: record.created_at,
        updated_at: record.updated_at,
    })
}

fn history_event(record: EventRecord) -> Result<HistoryEvent, Error> {
    let event = serde_json::from_str(&record.payload).map_err(|err| {
        Error::Corrupt(format!("event {}/{}: {err}", record.partition, record.seq))
    })?;
    Ok(HistoryEvent {
        seq: record.seq,
        epoch: record.epoch,
        at: record.at,
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::generate_id;

    #[test]
    fn made_ids_increase_in_the_order_they_are_made() {
        // Goal: ids the engine makes sort in the order they were made, from every thread,
        // so the rows they key are appended to their indexes (see `generate_id`); and they
        // keep their shape, 32 lowercase hex digits.
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..5_000).map(|_| generate_id()).collect::<Vec<_>>()))
            .collect();
        let mut latest = String::new();
        for thread in threads {
            let ids = thread.join().unwrap();
            latest = latest.max(ids.last().unwrap().clone());
            for pair in ids.windows(2) {
                assert!(pair[0] < pair[1], "{} then {}", pair[0], pair[1]);
            }
            for id in &ids {
                assert_eq!(id.len(), 32, "{id}");
                assert!(
                    id.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                    "{id}"
                );
            }
        }
        // After every thread's ids, across threads too.
        let after = generate_id();
        assert!(latest < after, "{latest} then {after}");
    }
}
