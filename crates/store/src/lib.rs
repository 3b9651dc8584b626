//! weir's durable state, behind one trait.
//!
//! Two backends: [`SqliteStore`] (embedded, one process) and [`PostgresStore`]
//! (one database shared by the nodes of a cluster).
//!
//! The store knows tables and transactions, never what a workflow step means:
//! instance states, events and tasks are opaque text it keeps and returns.
//! Every write for a partition is conditional on that partition's fencing
//! epoch, so a node that lost a partition's lease can never commit for it.
#![warn(missing_docs)]

mod latency;
mod postgres;
mod sqlite;
mod sqlite_page_cache;
mod sqlite_wal_writes;
#[cfg(test)]
mod test_rows;

pub use crate::postgres::{PostgresOptions, PostgresStore, POOL_SIZE_DEFAULT, POOL_WAIT_DEFAULT};
pub use latency::{LatencyHistogram, LatencySnapshot, LATENCY_BUCKETS_SECONDS};
pub use sqlite::SqliteStore;

/// Default number of partitions of a new store.
pub const PARTITION_COUNT_DEFAULT: u32 = 64;

/// Most partitions a store may have; partition ids fit comfortably in every index.
pub const PARTITION_COUNT_MAX: u32 = 4096;
/// Read connections a store keeps open for reuse. Readers beyond it open a
/// connection of their own and close it after use, so callers that read often
/// (the engine's API reads) run at most this many reads at once.
pub const READERS_MAX: usize = 8;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed: a statement, or the connection (the server may be down).
    #[error("postgres: {}", postgres_message(.0))]
    Postgres(#[from] ::postgres::Error),
    /// No PostgreSQL connection could be had in time: the server is unreachable or
    /// every pooled connection stayed busy.
    #[error("postgres connection pool: {0}")]
    Pool(#[from] r2d2::Error),
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Another process holds the data directory.
    #[error(
        "data directory {0} is in use by another weir process; stop it or pick another --data-dir"
    )]
    Locked(String),
    /// The stored data is not what this version understands.
    #[error("incompatible data: {0}")]
    Incompatible(String),
}

/// The message of a PostgreSQL error with its cause: the client's own text is only
/// the kind ("db error", "error connecting to server"), the cause says what happened.
fn postgres_message(err: &::postgres::Error) -> String {
    match std::error::Error::source(err) {
        Some(cause) => format!("{err}: {cause}"),
        None => err.to_string(),
    }
}

/// A partition's lease: who may write for it, under which fencing epoch, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The partition.
    pub partition: u32,
    /// The node holding it.
    pub owner: String,
    /// Fencing token; grows by one on every acquisition, never decreases.
    pub epoch: u64,
    /// Expiry, in ms since the Unix epoch.
    pub expires_at: u64,
}

/// One event of a partition's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Partition.
    pub partition: u32,
    /// Position in the partition's log; contiguous from 1.
    pub seq: u64,
    /// Fencing epoch it was written under.
    pub epoch: u64,
    /// Instance it belongs to.
    pub instance_id: String,
    /// When (ms since the Unix epoch).
    pub at: u64,
    /// Event type name.
    pub event_type: String,
    /// Serialized event.
    pub payload: String,
}

/// One instance's row: searchable columns plus its opaque state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    /// Instance id.
    pub id: String,
    /// Partition.
    pub partition: u32,
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
    /// Status name.
    pub status: String,
    /// Whether the partition must load it at start (it has not ended).
    pub active: bool,
    /// Input (JSON text).
    pub input: String,
    /// Output (JSON text), once there is one.
    pub output: Option<String>,
    /// Error (JSON text), once there is one.
    pub error: Option<String>,
    /// Created (ms since the Unix epoch).
    pub created_at: u64,
    /// Last changed (ms since the Unix epoch).
    pub updated_at: u64,
    /// The engine's serialized state.
    pub state: String,
}

/// The row of a task waiting for a worker (offered or leased), for a task the engine
/// cannot offer again from its instance's state alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// Task id.
    pub task_id: String,
    /// Partition.
    pub partition: u32,
    /// Queue.
    pub queue: String,
    /// Instance it belongs to.
    pub instance_id: String,
    /// Serialized task.
    pub payload: String,
}

/// A step's entry in its instance's context (`{"output": …}`), kept apart from the
/// instance's state: written once when the step completes, instead of again with every
/// later change of the state, so that a step's write does not grow with the steps
/// before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutputRecord {
    /// Instance it belongs to.
    pub instance_id: String,
    /// The step.
    pub step_id: String,
    /// The entry (JSON text), opaque to the store.
    pub entry: String,
}

/// A durable timer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerRecord {
    /// Partition.
    pub partition: u32,
    /// Instance it belongs to.
    pub instance_id: String,
    /// Key, unique within the instance.
    pub key: String,
    /// When it fires (ms since the Unix epoch).
    pub fire_at: u64,
}

/// Everything one partition commits at once. Applied entirely or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionBatch {
    /// Partition.
    pub partition: u32,
    /// The epoch the writer believes it holds; the batch is refused otherwise.
    pub epoch: u64,
    /// The log's last sequence number before this batch (events continue from it).
    pub seq_before: u64,
    /// Events to append, seqs `seq_before + 1 ..`.
    pub events: Vec<EventRecord>,
    /// Instance rows to insert or replace. Every instance the batch has events for is
    /// among them or already stored: [`Store::history`] finds the events of a stored
    /// instance.
    pub instances: Vec<InstanceRecord>,
    /// Tasks to insert or replace.
    pub tasks_put: Vec<TaskRecord>,
    /// Tasks to delete, by id.
    pub tasks_delete: Vec<String>,
    /// Timers to insert or replace.
    pub timers_put: Vec<TimerRecord>,
    /// Timers to delete, by (instance id, key).
    pub timers_delete: Vec<(String, String)>,
    /// Step outputs to insert or replace.
    pub outputs_put: Vec<StepOutputRecord>,
    /// Step outputs to delete, by (instance id, step id). Within a batch, deletes are
    /// applied before puts.
    pub outputs_delete: Vec<(String, String)>,
}

/// Why a partition batch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The writer's epoch is not the partition's current epoch: it lost the lease.
    #[error("partition {partition} is fenced: epoch {epoch} is no longer current")]
    Fenced {
        /// Partition.
        partition: u32,
        /// The stale epoch.
        epoch: u64,
    },
}

/// What a partition needs to resume besides its unfinished instances (which
/// [`Store::load_partition`] hands on one by one): its tasks, timers and log end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionSnapshot {
    /// Pending tasks.
    pub tasks: Vec<TaskRecord>,
    /// Armed timers.
    pub timers: Vec<TimerRecord>,
    /// Last sequence number of the log (0 when empty).
    pub last_seq: u64,
}

/// A stored definition version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionRecord {
    /// Name.
    pub name: String,
    /// Version, from 1.
    pub version: u32,
    /// The source text as deployed.
    pub source: String,
    /// Deployed (ms since the Unix epoch).
    pub created_at: u64,
}

/// What a node announces about itself in every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The node's name (its lease owner name).
    pub node_id: String,
    /// Base URL peers use to reach its API, e.g. `http://127.0.0.1:7601`.
    pub url: String,
    /// Whether it is a standby: it takes partitions only when too few active nodes live.
    pub standby: bool,
}

/// A cluster member as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node's name.
    pub node_id: String,
    /// Base URL of its API.
    pub url: String,
    /// Whether it is a standby.
    pub standby: bool,
    /// Whether an operator asked it to hand its partitions over (`weir node drain`).
    pub draining: bool,
    /// When it joined (ms since the Unix epoch, the store's clock).
    pub joined_at: u64,
    /// Its last heartbeat (ms since the Unix epoch, the store's clock).
    pub last_heartbeat: u64,
    /// Whether its last heartbeat is within the failure-detection timeout, by the store's clock.
    pub alive: bool,
}

/// The membership as of one reading of the store's clock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// The store's clock at the reading (ms since the Unix epoch).
    pub now: u64,
    /// Every recorded member, alive or not, ordered by node id.
    pub members: Vec<Member>,
}

/// Filter and page of an instance listing, newest first: by `created_at`, then by id
/// (bytewise), both descending.
///
/// Not by id alone: an index keyed by id puts the entry of every instance a client
/// names with a random id (a UUID) on a page of its own, at its start and again at its
/// end, while instances are created in time order, so that the listing indexes keyed by
/// creation take their new entries on their last pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceQuery {
    /// Only this status.
    pub status: Option<String>,
    /// Only this definition.
    pub definition: Option<String>,
    /// Only instances listed after this one (the cursor): created earlier, or at the
    /// same time with a smaller id.
    pub before: Option<ListCursor>,
    /// At most this many.
    pub limit: u32,
}

/// Where a page of an instance listing ends: its last instance's creation time and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    /// The instance's `created_at` (ms since the Unix epoch).
    pub created_at: u64,
    /// The instance's id.
    pub id: String,
}

/// Most ids one [`Store::instances_exist`] or [`Store::step_outputs`] call reads for.
/// (The two share the bound: both read for a partition's batch of instances.)
pub const EXISTENCE_CHECK_MAX: usize = 4096;

/// The store: durable state of one weir deployment.
///
/// Methods block; the engine calls them from threads meant for it.
///
/// Time: lease and membership methods take the caller's clock (`now`, ms since
/// the Unix epoch). A store shared by several nodes (PostgreSQL) ignores it and
/// uses its own clock for every expiry and heartbeat, so that the nodes' clocks
/// never decide who owns what; expiries it returns are on that clock.
pub trait Store: Send + Sync + 'static {
    /// Number of partitions, fixed when the store was created.
    fn partition_count(&self) -> u32;

    /// Records a heartbeat of `node` (inserting it if absent) and returns the
    /// membership. With `joining`, a previous `draining` flag is cleared (a node
    /// that restarts rejoins); otherwise the flag is kept. A member is alive when
    /// its last heartbeat is less than `failure_timeout_ms` old.
    fn heartbeat(
        &self,
        node: &Announcement,
        joining: bool,
        now: u64,
        failure_timeout_ms: u64,
    ) -> Result<Membership, Error>;

    /// The membership, read only (for status pages).
    fn membership(&self, now: u64, failure_timeout_ms: u64) -> Result<Membership, Error>;

    /// Removes a member (graceful shutdown).
    fn leave(&self, node_id: &str) -> Result<(), Error>;

    /// Sets or clears a member's `draining` flag; `false` if there is no such member.
    fn set_draining(&self, node_id: &str, draining: bool) -> Result<bool, Error>;

    /// Takes the lease of `partition` for `owner` if it is free, expired or already
    /// `owner`'s, incrementing its epoch. Returns `None` if another owner holds it.
    fn acquire_lease(
        &self,
        partition: u32,
        owner: &str,
        now: u64,
        ttl_ms: u64,
    ) -> Result<Option<Lease>, Error>;

    /// Extends leases that `owner` still holds at the given epochs; returns the partitions renewed.
    fn renew_leases(
        &self,
        owner: &str,
        leases: &[(u32, u64)],
        now: u64,
        ttl_ms: u64,
    ) -> Result<Vec<u32>, Error>;

    /// Gives leases up at once (graceful shutdown).
    fn release_leases(&self, owner: &str, leases: &[(u32, u64)]) -> Result<(), Error>;

    /// Every partition's lease.
    fn leases(&self) -> Result<Vec<Lease>, Error>;

    /// Loads what a partition needs to resume, in one consistent read. Its active
    /// instance rows are handed to `instance` one at a time as they are read, not
    /// returned together: a partition may hold a million sleeping instances, of which
    /// the caller keeps only a few in memory, and holding every row at once made the
    /// load's peak memory twice the steady state's.
    fn load_partition(
        &self,
        partition: u32,
        instance: &mut dyn FnMut(InstanceRecord),
    ) -> Result<PartitionSnapshot, Error>;

    /// Commits batches of several partitions; each is applied whole or refused.
    fn commit(&self, batches: &[PartitionBatch]) -> Result<Vec<Result<(), Refusal>>, Error>;

    /// Commits as [`Store::commit`] does, on the calling thread, if that waits for
    /// nothing but the store's own write and sync: `None`, committing nothing, when
    /// another write holds the store. The default is always `None`, right for a store
    /// whose commits are round trips to a server (PostgreSQL's client runs its own
    /// runtime, which must not be entered from an async runtime's thread).
    fn try_commit_here(
        &self,
        batches: &[PartitionBatch],
    ) -> Option<Result<Vec<Result<(), Refusal>>, Error>> {
        let _ = batches;
        None
    }

    /// Stores a new version of a definition; returns its version number.
    fn put_definition(&self, name: &str, source: &str, now: u64) -> Result<u32, Error>;

    /// A definition version, or the latest when `version` is `None`.
    fn definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<DefinitionRecord>, Error>;

    /// The latest version of every definition, by name.
    fn definitions(&self) -> Result<Vec<DefinitionRecord>, Error>;

    /// One instance's row.
    fn instance(&self, id: &str) -> Result<Option<InstanceRecord>, Error>;

    /// Which of `ids` are stored instances (at most [`EXISTENCE_CHECK_MAX`]), as one
    /// flag per id in order: the check a start with a caller's id makes before it
    /// creates anything, done for a partition's whole batch of starts at once.
    fn instances_exist(&self, ids: &[String]) -> Result<Vec<bool>, Error>;

    /// The step outputs of each of `ids` (at most [`EXISTENCE_CHECK_MAX`]), in order:
    /// `(step id, entry)` pairs, by step id. What an instance's state leaves out and
    /// needs back before it runs again.
    fn step_outputs(&self, ids: &[String]) -> Result<Vec<Vec<(String, String)>>, Error>;

    /// Whether this process is the store's only writer (an embedded file that this
    /// process holds locked): what the engine writes is then all there is, so that
    /// "the latest version" of a definition can be cached without reading it again.
    fn single_writer(&self) -> bool;

    /// Instance rows, newest first (see [`InstanceQuery`]).
    fn instances(&self, query: &InstanceQuery) -> Result<Vec<InstanceRecord>, Error>;

    /// One instance's events, in log order; none for an instance that is not stored.
    fn history(&self, instance_id: &str, partition: u32) -> Result<Vec<EventRecord>, Error>;

    /// How long the syncs of the write-ahead log took that made this process's commits
    /// durable, or `None` for a store whose syncs another process makes (PostgreSQL).
    fn wal_syncs(&self) -> Option<LatencySnapshot> {
        None
    }

    /// Events of a partition with `seq > after`, at most `limit`.
    fn events_after(
        &self,
        partition: u32,
        after: u64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, Error>;
}
