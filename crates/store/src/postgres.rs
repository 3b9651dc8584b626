//! The PostgreSQL backend: one database shared by every node of a cluster.
//!
//! Semantics are the SQLite backend's, method for method, with two differences
//! that come from sharing: time is the database's clock (leases and membership
//! ignore the caller's `now`, so that no node's clock decides who owns what), and
//! several processes may use the store at once (schema set-up and definition
//! versions are serialized with advisory locks, lease changes are single
//! conditional updates, commits lock their partitions' rows).
//!
//! A group commit is one statement in the common case (every batch current): it locks
//! the partitions' rows, checks their epochs and log ends, and writes everything or
//! nothing. When it writes nothing, the batches are decided one by one under the row
//! locks, exactly as SQLite decides them. A commit whose connection breaks before the
//! answer arrives returns an error though it may have committed; the engine treats a
//! failed commit by reloading the partition from the store, which is then the truth.
//!
//! Calls block. The synchronous `postgres` client runs a small tokio runtime per
//! connection, so these methods must not be called from async code: the engine
//! calls them from `spawn_blocking` threads and its committer thread.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, IsolationLevel, NoTls, Row, Statement};

use crate::{
    Announcement, DefinitionRecord, Error, EventRecord, InstanceQuery, InstanceRecord, Lease,
    Member, Membership, PartitionBatch, PartitionSnapshot, Refusal, Store, TaskRecord, TimerRecord,
    PARTITION_COUNT_MAX,
};

/// Default for the most connections one store keeps open to the server.
pub const POOL_SIZE_DEFAULT: u32 = 16;
/// Default for the longest wait for a connection (all busy, or the server
/// unreachable) before a call fails; below the engine's partition lease, so a
/// node that cannot reach the database notices before its leases run out.
pub const POOL_WAIT_DEFAULT: Duration = Duration::from_secs(5);
/// Connections kept open while idle, so that a burst does not wait for connects.
const POOL_IDLE_MIN: u32 = 2;
/// Longest wait for one new connection (TCP and start-up), unless the URL sets one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a session of ours may sit in an open transaction: a node paused (or cut
/// off) between two statements of a transaction would otherwise keep its partitions'
/// row locks, and the node taking them over would wait for it. Far above any real gap
/// between our statements, below the engine's partition lease.
const IDLE_IN_TRANSACTION_MAX_MS: u32 = 3_000;
/// Longest a statement waits for a lock (a lease, a partition's row) before failing,
/// so that one blocked partition does not stall a caller that has others to tend.
const LOCK_WAIT_MAX_MS: u32 = 3_000;
/// Longest schema set-up waits for another node's set-up (a migration may be slow).
const SET_UP_LOCK_WAIT_MAX_MS: u32 = 120_000;
/// TCP keepalive: a connection whose server vanished (no reset, e.g. a network cut)
/// is found dead after about idle + interval x retries instead of hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// Time between keepalive probes once the connection is idle (see [`KEEPALIVE_IDLE`]).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Unanswered keepalive probes before the connection is dropped.
const KEEPALIVE_RETRIES: u32 = 3;
/// Advisory lock that serializes schema set-up among nodes starting together ("weirschm").
const SCHEMA_LOCK_KEY: i64 = 0x7765_6972_7363_686d;
/// First half of the advisory lock key that serializes new versions of one
/// definition (the second half is the name's hash) ("weir").
const DEFINITION_LOCK_CLASS: i32 = 0x7765_6972;

/// The database's clock in ms since the Unix epoch. `clock_timestamp()` rather
/// than `now()`: the latter is frozen at the start of the transaction.
macro_rules! db_now_ms {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

/// Schema migrations, applied in order inside one transaction; the schema version
/// (row `schema_version` of `meta`) is the count applied. Never edit one that has
/// shipped: add a new one.
///
/// Text keys are `COLLATE "C"` so that ordering and cursors compare bytes, as
/// SQLite does, whatever the database's locale.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE partitions (
    partition BIGINT PRIMARY KEY,
    owner TEXT COLLATE "C" NOT NULL DEFAULT '',
    epoch BIGINT NOT NULL DEFAULT 0,
    expires_at BIGINT NOT NULL DEFAULT 0,
    last_seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE definitions (
    name TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    source TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE instances (
    id TEXT COLLATE "C" PRIMARY KEY,
    partition BIGINT NOT NULL,
    definition TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    active BOOLEAN NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX instances_active ON instances (partition) WHERE active;
CREATE INDEX instances_status ON instances (status, id);
CREATE INDEX instances_definition ON instances (definition, id);
CREATE TABLE events (
    partition BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    instance_id TEXT COLLATE "C" NOT NULL,
    at BIGINT NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (partition, seq)
);
CREATE INDEX events_instance ON events (instance_id);
CREATE TABLE tasks (
    task_id TEXT COLLATE "C" PRIMARY KEY,
    partition BIGINT NOT NULL,
    queue TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX tasks_partition ON tasks (partition);
CREATE TABLE timers (
    instance_id TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    partition BIGINT NOT NULL,
    fire_at BIGINT NOT NULL,
    PRIMARY KEY (instance_id, key)
);
CREATE INDEX timers_partition ON timers (partition);
CREATE TABLE members (
    node_id TEXT COLLATE "C" PRIMARY KEY,
    url TEXT NOT NULL,
    standby BOOLEAN NOT NULL,
    draining BOOLEAN NOT NULL DEFAULT false,
    joined_at BIGINT NOT NULL,
    last_heartbeat BIGINT NOT NULL
);
"#,
    r#"
CREATE TABLE step_outputs (
    instance_id TEXT COLLATE "C" NOT NULL,
    step_id TEXT COLLATE "C" NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (instance_id, step_id)
);
"#,
    // Instances are listed newest first (see `InstanceQuery`), through indexes keyed by
    // creation, whose new entries go to their last pages whatever the ids.
    r#"
CREATE INDEX instances_created ON instances (created_at, id);
CREATE INDEX instances_status_created ON instances (status, created_at, id);
CREATE INDEX instances_definition_created ON instances (definition, created_at, id);
DROP INDEX instances_status;
DROP INDEX instances_definition;
"#,
    // An instance's events are found by the seq of its first event in its partition, as
    // on SQLite: keyed by random ids (a client's UUIDs), the index by instance id took a
    // page of its own for nearly every event, and after each checkpoint a full-page
    // image in the WAL. Events written before (or by a node of an earlier version, in a
    // rolling upgrade) have no `instance_seq` and are found by id through the partial
    // index, which no event of this version enters; nothing is rewritten.
    r#"
ALTER TABLE instances ADD COLUMN first_seq BIGINT;
ALTER TABLE events ADD COLUMN instance_seq BIGINT;
CREATE INDEX events_instance_seq ON events (partition, instance_seq) WHERE instance_seq IS NOT NULL;
CREATE INDEX events_instance_unseq ON events (instance_id) WHERE instance_seq IS NULL;
DROP INDEX events_instance;
"#,
];

const INSTANCE_COLUMNS: &str =
    "id, partition, definition, version, status, active, input, output, error, created_at, updated_at, state";

/// Locks the rows of the partitions a commit touches, in partition order (see
/// [`COMMIT_IF_CURRENT`]), for deciding batch by batch.
const LOCK_PARTITIONS: &str = "SELECT partition, epoch, last_seq FROM partitions
     WHERE partition = ANY($1::bigint[]) ORDER BY partition FOR UPDATE";

/// Commits a group of batches in one statement (one round trip, its own transaction)
/// if every partition is where the batches expect it: locks the partitions' rows in
/// partition order (so that two committers never wait for each other in a cycle),
/// compares each one's epoch and log end with the batches', and only if all match
/// writes everything; returns whether it did. The rows travel as arrays expanded by
/// `unnest`, merged beforehand so that no two parts touch the same row.
///
/// Parameters: per partition `$1` partition, `$2` log end after the batches, `$34`
/// epoch and `$35` log end before them; then the rows (see [`Writes`]), the step
/// outputs last (`$36`–`$40`).
const COMMIT_IF_CURRENT: &str = r#"
WITH expected AS (
    SELECT * FROM unnest($1::bigint[], $34::bigint[], $35::bigint[])
        AS e(partition, epoch, seq_before)
), locked AS (
    SELECT partition, epoch, last_seq FROM partitions
    WHERE partition = ANY($1::bigint[]) ORDER BY partition FOR UPDATE
), fence AS (
    SELECT count(*) = cardinality($1::bigint[]) AS ok
    FROM locked l JOIN expected e ON e.partition = l.partition
    WHERE l.epoch = e.epoch AND l.last_seq = e.seq_before
), advanced AS (
    UPDATE partitions p SET last_seq = u.last_seq
    FROM unnest($1::bigint[], $2::bigint[]) AS u(partition, last_seq)
    WHERE p.partition = u.partition AND (SELECT ok FROM fence)
), appended AS (
    INSERT INTO events (partition, seq, epoch, instance_id, at, type, payload, instance_seq)
    SELECT e.partition, e.seq, e.epoch, e.instance_id, e.at, e.type, e.payload,
        CASE WHEN i.id IS NULL THEN f.first_seq ELSE i.first_seq END
    FROM unnest($3::bigint[], $4::bigint[], $5::bigint[], $6::text[], $7::bigint[],
        $8::text[], $9::text[]) AS e(partition, seq, epoch, instance_id, at, type, payload)
    LEFT JOIN instances i ON i.id = e.instance_id
    LEFT JOIN unnest($10::text[], $41::bigint[]) AS f(id, first_seq) ON f.id = e.instance_id
    WHERE (SELECT ok FROM fence)
), upserted AS (
    INSERT INTO instances (id, partition, definition, version, status, active, input, output,
        error, created_at, updated_at, state, first_seq)
    SELECT * FROM unnest($10::text[], $11::bigint[], $12::text[], $13::bigint[], $14::text[],
        $15::boolean[], $16::text[], $17::text[], $18::text[], $19::bigint[], $20::bigint[],
        $21::text[], $41::bigint[])
    WHERE (SELECT ok FROM fence)
    ON CONFLICT (id) DO UPDATE SET status = excluded.status, active = excluded.active,
        output = excluded.output, error = excluded.error, updated_at = excluded.updated_at,
        state = excluded.state
), tasks_deleted AS (
    DELETE FROM tasks WHERE task_id = ANY($22::text[]) AND (SELECT ok FROM fence)
), tasks_put AS (
    INSERT INTO tasks (task_id, partition, queue, instance_id, payload)
    SELECT * FROM unnest($23::text[], $24::bigint[], $25::text[], $26::text[], $27::text[])
    WHERE (SELECT ok FROM fence)
    ON CONFLICT (task_id) DO UPDATE SET partition = excluded.partition, queue = excluded.queue,
        instance_id = excluded.instance_id, payload = excluded.payload
), timers_deleted AS (
    DELETE FROM timers t USING unnest($28::text[], $29::text[]) AS d(instance_id, key)
    WHERE t.instance_id = d.instance_id AND t.key = d.key AND (SELECT ok FROM fence)
), timers_put AS (
    INSERT INTO timers (instance_id, key, partition, fire_at)
    SELECT * FROM unnest($30::text[], $31::text[], $32::bigint[], $33::bigint[])
    WHERE (SELECT ok FROM fence)
    ON CONFLICT (instance_id, key) DO UPDATE SET partition = excluded.partition,
        fire_at = excluded.fire_at
), outputs_deleted AS (
    DELETE FROM step_outputs o USING unnest($36::text[], $37::text[]) AS d(instance_id, step_id)
    WHERE o.instance_id = d.instance_id AND o.step_id = d.step_id AND (SELECT ok FROM fence)
), outputs_put AS (
    INSERT INTO step_outputs (instance_id, step_id, entry)
    SELECT * FROM unnest($38::text[], $39::text[], $40::text[])
    WHERE (SELECT ok FROM fence)
    ON CONFLICT (instance_id, step_id) DO UPDATE SET entry = excluded.entry
)
SELECT ok FROM fence"#;

const HEARTBEAT: &str = concat!(
    "WITH c AS (SELECT ",
    db_now_ms!(),
    " AS now)
     INSERT INTO members (node_id, url, standby, draining, joined_at, last_heartbeat)
     SELECT $1::text, $2::text, $3::boolean, false, c.now, c.now FROM c
     ON CONFLICT (node_id) DO UPDATE SET url = excluded.url, standby = excluded.standby,
         last_heartbeat = excluded.last_heartbeat,
         draining = CASE WHEN $4::boolean THEN false ELSE members.draining END,
         joined_at = CASE WHEN $4::boolean THEN excluded.joined_at ELSE members.joined_at END
     RETURNING last_heartbeat"
);

const DB_NOW: &str = concat!("SELECT ", db_now_ms!());

const MEMBERS: &str = "SELECT node_id, url, standby, draining, joined_at, last_heartbeat
     FROM members ORDER BY node_id";

/// Takes a lease in one atomic conditional update: free, already ours, or expired by
/// the database's clock. The epoch grows by one on every acquisition.
const ACQUIRE_LEASE: &str = concat!(
    "WITH c AS (SELECT ",
    db_now_ms!(),
    " AS now)
     UPDATE partitions p SET owner = $2, epoch = p.epoch + 1, expires_at = c.now + $3
     FROM c
     WHERE p.partition = $1 AND (p.owner = '' OR p.owner = $2 OR p.expires_at <= c.now)
     RETURNING p.epoch, p.expires_at"
);

/// Renews leases. Like every statement that changes several partition rows, it
/// locks them in partition order first (`locked`): an update in the join's order
/// could hold one row and wait for another that a commit (which locks in partition
/// order) holds while waiting for the first, a deadlock.
const RENEW_LEASES: &str = concat!(
    "WITH c AS (SELECT ",
    db_now_ms!(),
    " AS now), locked AS (
         SELECT partition FROM partitions WHERE partition = ANY($2::bigint[])
         ORDER BY partition FOR UPDATE
     )
     UPDATE partitions p SET expires_at = c.now + $4
     FROM c, unnest($2::bigint[], $3::bigint[]) AS l(partition, epoch)
     WHERE p.partition = l.partition AND p.owner = $1 AND p.epoch = l.epoch
         AND p.partition IN (SELECT partition FROM locked)
     RETURNING p.partition, p.epoch"
);

/// Gives leases up, locking the rows in partition order first (see [`RENEW_LEASES`]).
const RELEASE_LEASES: &str = "WITH locked AS (
         SELECT partition FROM partitions WHERE partition = ANY($2::bigint[])
         ORDER BY partition FOR UPDATE
     )
     UPDATE partitions p SET owner = '', expires_at = 0
     FROM unnest($2::bigint[], $3::bigint[]) AS l(partition, epoch)
     WHERE p.partition = l.partition AND p.owner = $1 AND p.epoch = l.epoch
         AND p.partition IN (SELECT partition FROM locked)";

/// How often a commit statement that PostgreSQL chose as a deadlock's victim is run
/// again (it was rolled back whole, so running it again is exact). Lock order makes
/// deadlocks between weir's own statements impossible; this covers anything else
/// holding the same rows (an operator's session, a future statement).
const DEADLOCK_RETRIES_MAX: u32 = 3;

/// Whether PostgreSQL rolled a statement back to break a deadlock.
fn is_deadlock(err: &postgres::Error) -> bool {
    err.code() == Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
}

/// Settings of a PostgreSQL store's connection pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Most connections kept open to the server (at least 1).
    pub pool_size: u32,
    /// Longest wait for a connection before a call fails with [`Error::Pool`].
    pub pool_wait: Duration,
}

impl Default for PostgresOptions {
    fn default() -> PostgresOptions {
        PostgresOptions {
            pool_size: POOL_SIZE_DEFAULT,
            pool_wait: POOL_WAIT_DEFAULT,
        }
    }
}

/// A pooled connection and the statements prepared on it.
struct Connection {
    client: Client,
    /// Prepared statements by their text: preparing costs a round trip, and a
    /// statement belongs to the connection that prepared it. The texts are a fixed
    /// set (the listing's filters make 8 variants), so the map stays small.
    statements: HashMap<String, Statement>,
}

impl Connection {
    fn statement(&mut self, sql: &str) -> Result<Statement, Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error> {
        let statement = self.statement(sql)?;
        Ok(self.client.query(&statement, params)?)
    }

    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error> {
        let statement = self.statement(sql)?;
        Ok(self.client.execute(&statement, params)?)
    }
}

/// Opens and checks connections for the pool.
struct Manager {
    config: postgres::Config,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Connection;
    // Ours rather than postgres::Error: r2d2 keeps the last connect error as text, and
    // ours includes the cause (refused, unknown database...) in that text.
    type Error = Error;

    fn connect(&self) -> Result<Connection, Error> {
        let mut client = self.config.connect(NoTls)?;
        // A returned commit must be durable: a server or role configured with
        // synchronous_commit=off is overridden for our sessions (stronger settings such
        // as remote_apply are kept).
        client.batch_execute(&format!(
            "SELECT set_config('synchronous_commit', 'on', false)
             WHERE current_setting('synchronous_commit') = 'off';
             SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MAX_MS};
             SET lock_timeout = {LOCK_WAIT_MAX_MS}"
        ))?;
        Ok(Connection {
            client,
            statements: HashMap::new(),
        })
    }

    fn is_valid(&self, connection: &mut Connection) -> Result<(), Error> {
        // Run at every checkout: a connection the server dropped (restart, idle
        // timeout) is found here and replaced instead of failing the caller's call.
        connection.client.simple_query("")?;
        Ok(())
    }

    fn has_broken(&self, connection: &mut Connection) -> bool {
        connection.client.is_closed()
    }
}

/// The PostgreSQL store: one database, shared by the nodes of a cluster.
pub struct PostgresStore {
    /// Always `Some` until dropped (see `Drop`).
    pool: Option<r2d2::Pool<Manager>>,
    partition_count: u32,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`, or
    /// `key=value` form), creating or migrating the schema, with `partition_count`
    /// partitions if the database is new (an existing database keeps its count).
    /// Several nodes may connect at once. TLS is not supported.
    pub fn connect(url: &str, partition_count: u32) -> Result<PostgresStore, Error> {
        PostgresStore::connect_with(url, partition_count, &PostgresOptions::default())
    }

    /// [`PostgresStore::connect`] with pool settings.
    pub fn connect_with(
        url: &str,
        partition_count: u32,
        options: &PostgresOptions,
    ) -> Result<PostgresStore, Error> {
        if partition_count == 0 || partition_count > PARTITION_COUNT_MAX {
            return Err(Error::Incompatible(format!(
                "{partition_count} partitions: the count must be between 1 and {PARTITION_COUNT_MAX}"
            )));
        }
        let mut config: postgres::Config = url.parse()?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("weir");
        }
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES);
        let pool_size = options.pool_size.max(1);
        let pool = r2d2::Pool::builder()
            .max_size(pool_size)
            .min_idle(Some(POOL_IDLE_MIN.min(pool_size)))
            .connection_timeout(options.pool_wait)
            .test_on_check_out(true)
            // Failures reach the caller as errors; r2d2 would log them through `log`.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(Manager { config })?;
        let mut store = PostgresStore {
            pool: Some(pool),
            partition_count: 0,
        };
        store.partition_count = store.with(|connection| set_up(connection, partition_count))?;
        Ok(store)
    }

    /// Commits what can be of `batches`, deciding each in order as SQLite does: under
    /// the partitions' row locks, a batch is applied if its epoch and log end are the
    /// partition's, counting the batches before it in the group.
    fn commit_batch_by_batch(
        &self,
        batches: &[PartitionBatch],
    ) -> Result<Vec<Result<(), Refusal>>, Error> {
        let mut partitions: Vec<i64> = batches.iter().map(|b| i64::from(b.partition)).collect();
        partitions.sort_unstable();
        partitions.dedup();
        self.with(|connection| {
            let lock = connection.statement(LOCK_PARTITIONS)?;
            let write = connection.statement(COMMIT_IF_CURRENT)?;
            let mut transaction = connection.client.transaction()?;
            // (epoch, last_seq) of each locked partition; a partition that does not
            // exist is absent and its batch refused, as SQLite's update would match nothing.
            let mut current: HashMap<u32, (u64, u64)> = HashMap::new();
            for row in transaction.query(&lock, &[&partitions])? {
                current.insert(
                    column_u32(&row, 0)?,
                    (column_u64(&row, 1)?, column_u64(&row, 2)?),
                );
            }
            let mut outcomes = Vec::with_capacity(batches.len());
            let mut accepted = Vec::with_capacity(batches.len());
            for batch in batches {
                match current.get_mut(&batch.partition) {
                    Some((epoch, last_seq))
                        if *epoch == batch.epoch && *last_seq == batch.seq_before =>
                    {
                        if let Some(problem) = malformation(batch) {
                            panic!("malformed partition batch: {problem}");
                        }
                        *last_seq = batch.seq_before + batch.events.len() as u64;
                        accepted.push(batch);
                        outcomes.push(Ok(()));
                    }
                    _ => outcomes.push(Err(Refusal::Fenced {
                        partition: batch.partition,
                        epoch: batch.epoch,
                    })),
                }
            }
            if !accepted.is_empty() {
                let chain = chain(&accepted).expect("accepted batches continue each other");
                let writes = Writes::merge(&accepted, &chain)?;
                let rows = transaction.query(&write, &writes.params())?;
                let written = rows.first().map(|row| row.try_get::<_, bool>(0));
                assert!(
                    matches!(written, Some(Ok(true))),
                    "partitions changed under their row locks"
                );
            }
            // synchronous_commit is on: when this returns, the batches are durable.
            transaction.commit()?;
            Ok(outcomes)
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, Error>) -> Result<T, Error> {
        let pool = self
            .pool
            .as_ref()
            .expect("the pool lives as long as the store");
        let mut connection = pool.get()?;
        f(&mut connection)
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Each connection owns a tokio runtime, and dropping one inside an async
        // context panics; the store may well be dropped there (its last `Arc` in an
        // engine task). A thread of its own closes the connections from anywhere.
        if let Some(pool) = self.pool.take() {
            let closer = std::thread::Builder::new()
                .name("weir-pg-close".into())
                .spawn(move || drop(pool));
            // If no thread could be started, the pool was dropped here already.
            if let Ok(closer) = closer {
                let _ = closer.join();
            }
        }
    }
}

/// Creates or migrates the schema and the partitions, serialized among nodes by an
/// advisory lock held until the transaction ends; returns the stored partition count.
fn set_up(connection: &mut Connection, partition_count: u32) -> Result<u32, Error> {
    let mut transaction = connection.client.transaction()?;
    transaction.batch_execute(&format!(
        "SET LOCAL lock_timeout = {SET_UP_LOCK_WAIT_MAX_MS}"
    ))?;
    transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])?;
    transaction.batch_execute(
        r#"CREATE TABLE IF NOT EXISTS meta (key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL)"#,
    )?;
    let meta =
        |transaction: &mut postgres::Transaction<'_>, key: &str| -> Result<Option<String>, Error> {
            let row = transaction.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])?;
            Ok(row.map(|row| row.try_get(0)).transpose()?)
        };
    let version = match meta(&mut transaction, "schema_version")? {
        None => 0,
        Some(text) => text
            .parse::<usize>()
            .map_err(|_| Error::Incompatible(format!("bad schema_version `{text}`")))?,
    };
    if version > MIGRATIONS.len() {
        return Err(Error::Incompatible(format!(
            "schema version {version} is newer than this weir understands ({})",
            MIGRATIONS.len()
        )));
    }
    if version < MIGRATIONS.len() {
        for migration in &MIGRATIONS[version..] {
            transaction.batch_execute(migration)?;
        }
        transaction.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&MIGRATIONS.len().to_string()],
        )?;
    }
    let count = match meta(&mut transaction, "partition_count")? {
        Some(text) => text
            .parse::<u32>()
            .map_err(|_| Error::Incompatible(format!("bad partition_count `{text}`")))?,
        None => {
            transaction.execute(
                "INSERT INTO meta (key, value) VALUES ('partition_count', $1)",
                &[&partition_count.to_string()],
            )?;
            transaction.execute(
                "INSERT INTO partitions (partition) SELECT generate_series(0, $1::bigint - 1)",
                &[&i64::from(partition_count)],
            )?;
            partition_count
        }
    };
    transaction.commit()?;
    Ok(count)
}

/// Whether PostgreSQL can hold `text`: its text type refuses the NUL character, which
/// SQLite keeps. A lookup by such a key is answered "none" without asking the server,
/// as it could not have been stored (an error would differ from SQLite's answer).
fn storable(text: &str) -> bool {
    !text.contains('\0')
}

/// A value for a BIGINT column.
fn db_int(value: u64) -> Result<i64, Error> {
    i64::try_from(value)
        .map_err(|_| Error::Incompatible(format!("{value} does not fit in a BIGINT column")))
}

/// A BIGINT column that holds a `u64`.
fn column_u64(row: &Row, index: usize) -> Result<u64, Error> {
    let value: i64 = row.try_get(index)?;
    u64::try_from(value).map_err(|_| {
        Error::Incompatible(format!(
            "negative value {value} in column {}",
            row.columns()[index].name()
        ))
    })
}

/// A BIGINT column that holds a `u32`.
fn column_u32(row: &Row, index: usize) -> Result<u32, Error> {
    let value: i64 = row.try_get(index)?;
    u32::try_from(value).map_err(|_| {
        Error::Incompatible(format!(
            "value {value} out of range in column {}",
            row.columns()[index].name()
        ))
    })
}

fn instance_from_row(row: &Row) -> Result<InstanceRecord, Error> {
    Ok(InstanceRecord {
        id: row.try_get(0)?,
        partition: column_u32(row, 1)?,
        definition: row.try_get(2)?,
        version: column_u32(row, 3)?,
        status: row.try_get(4)?,
        active: row.try_get(5)?,
        input: row.try_get(6)?,
        output: row.try_get(7)?,
        error: row.try_get(8)?,
        created_at: column_u64(row, 9)?,
        updated_at: column_u64(row, 10)?,
        state: row.try_get(11)?,
    })
}

fn event_from_row(row: &Row) -> Result<EventRecord, Error> {
    Ok(EventRecord {
        partition: column_u32(row, 0)?,
        seq: column_u64(row, 1)?,
        epoch: column_u64(row, 2)?,
        instance_id: row.try_get(3)?,
        at: column_u64(row, 4)?,
        event_type: row.try_get(5)?,
        payload: row.try_get(6)?,
    })
}

fn lease_from_row(row: &Row) -> Result<Lease, Error> {
    Ok(Lease {
        partition: column_u32(row, 0)?,
        owner: row.try_get(1)?,
        epoch: column_u64(row, 2)?,
        expires_at: column_u64(row, 3)?,
    })
}

fn definition_from_row(row: &Row) -> Result<DefinitionRecord, Error> {
    Ok(DefinitionRecord {
        name: row.try_get(0)?,
        version: column_u32(row, 1)?,
        source: row.try_get(2)?,
        created_at: column_u64(row, 3)?,
    })
}

fn rows<T>(rows: Vec<Row>, from_row: impl Fn(&Row) -> Result<T, Error>) -> Result<Vec<T>, Error> {
    rows.iter().map(from_row).collect()
}

/// The membership as of `now` (the database's clock).
fn read_membership(
    connection: &mut Connection,
    now: u64,
    failure_timeout_ms: u64,
) -> Result<Membership, Error> {
    let members = connection
        .query(MEMBERS, &[])?
        .iter()
        .map(|row| {
            let last_heartbeat = column_u64(row, 5)?;
            Ok(Member {
                node_id: row.try_get(0)?,
                url: row.try_get(1)?,
                standby: row.try_get(2)?,
                draining: row.try_get(3)?,
                joined_at: column_u64(row, 4)?,
                last_heartbeat,
                alive: now.saturating_sub(last_heartbeat) < failure_timeout_ms,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Membership { now, members })
}

/// What is wrong with a batch the engine built wrongly (a bug, not a refusal): the
/// checks SQLite asserts on the batches it applies.
fn malformation(batch: &PartitionBatch) -> Option<String> {
    for (index, event) in batch.events.iter().enumerate() {
        let seq = batch.seq_before + 1 + index as u64;
        if event.partition != batch.partition || event.epoch != batch.epoch || event.seq != seq {
            return Some(format!(
                "event (partition {}, seq {}, epoch {}) in the batch of partition {} at seq {seq}, \
                 epoch {}: event seqs are contiguous",
                event.partition, event.seq, event.epoch, batch.partition, batch.epoch
            ));
        }
    }
    let partitions = (batch.instances.iter().map(|i| i.partition))
        .chain(batch.tasks_put.iter().map(|t| t.partition))
        .chain(batch.timers_put.iter().map(|t| t.partition));
    for partition in partitions {
        if partition != batch.partition {
            return Some(format!(
                "a row of partition {partition} in the batch of partition {}",
                batch.partition
            ));
        }
    }
    None
}

/// Per partition: (epoch, log end before its first batch, log end after its last),
/// when each of its batches continues the one before under the same epoch; `None`
/// when they do not (some would be refused whatever the store holds).
fn chain(batches: &[&PartitionBatch]) -> Option<BTreeMap<u32, (u64, u64, u64)>> {
    let mut partitions: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
    for batch in batches {
        let seq_after = batch.seq_before + batch.events.len() as u64;
        match partitions.get_mut(&batch.partition) {
            None => {
                partitions.insert(batch.partition, (batch.epoch, batch.seq_before, seq_after));
            }
            Some((epoch, _, last_seq)) => {
                if *epoch != batch.epoch || *last_seq != batch.seq_before {
                    return None;
                }
                *last_seq = seq_after;
            }
        }
    }
    Some(partitions)
}

/// The rows of a group commit's batches, as the parameters of [`COMMIT_IF_CURRENT`].
///
/// Batches are merged first, in order, to the net effect of applying them one after
/// the other (as SQLite does): an instance written twice keeps its first insert's
/// fixed columns and its last write's changing ones; a task or timer keeps its last
/// put or delete. One statement must not touch a row twice.
#[derive(Default)]
struct Writes<'a> {
    partitions: Vec<i64>,
    last_seqs: Vec<i64>,
    epochs: Vec<i64>,
    seq_befores: Vec<i64>,
    event_partitions: Vec<i64>,
    event_seqs: Vec<i64>,
    event_epochs: Vec<i64>,
    event_instances: Vec<&'a str>,
    event_ats: Vec<i64>,
    event_types: Vec<&'a str>,
    event_payloads: Vec<&'a str>,
    instance_ids: Vec<&'a str>,
    instance_partitions: Vec<i64>,
    instance_definitions: Vec<&'a str>,
    instance_versions: Vec<i64>,
    instance_statuses: Vec<&'a str>,
    instance_actives: Vec<bool>,
    instance_inputs: Vec<&'a str>,
    instance_outputs: Vec<Option<&'a str>>,
    instance_errors: Vec<Option<&'a str>>,
    instance_created: Vec<i64>,
    instance_updated: Vec<i64>,
    instance_states: Vec<&'a str>,
    /// The seq of each instance's first event in the group, for a new row (`None` for an
    /// instance without events in it). A stored row keeps its own, which its events take
    /// (the statement reads rows as they were before it).
    instance_first_seqs: Vec<Option<i64>>,
    tasks_deleted: Vec<&'a str>,
    task_ids: Vec<&'a str>,
    task_partitions: Vec<i64>,
    task_queues: Vec<&'a str>,
    task_instances: Vec<&'a str>,
    task_payloads: Vec<&'a str>,
    timers_deleted_instances: Vec<&'a str>,
    timers_deleted_keys: Vec<&'a str>,
    timer_instances: Vec<&'a str>,
    timer_keys: Vec<&'a str>,
    timer_partitions: Vec<i64>,
    timer_fire_ats: Vec<i64>,
    outputs_deleted_instances: Vec<&'a str>,
    outputs_deleted_steps: Vec<&'a str>,
    output_instances: Vec<&'a str>,
    output_steps: Vec<&'a str>,
    output_entries: Vec<&'a str>,
}

impl<'a> Writes<'a> {
    /// `chain`: what [`chain`] says of `batches`.
    fn merge(
        batches: &[&'a PartitionBatch],
        chain: &BTreeMap<u32, (u64, u64, u64)>,
    ) -> Result<Writes<'a>, Error> {
        let mut writes = Writes::default();
        for (&partition, &(epoch, seq_before, last_seq)) in chain {
            writes.partitions.push(i64::from(partition));
            writes.last_seqs.push(db_int(last_seq)?);
            writes.epochs.push(db_int(epoch)?);
            writes.seq_befores.push(db_int(seq_before)?);
        }
        // (first write, last write) of each instance.
        let mut instances: BTreeMap<&str, (&InstanceRecord, &InstanceRecord)> = BTreeMap::new();
        let mut tasks: BTreeMap<&str, Option<&TaskRecord>> = BTreeMap::new();
        let mut timers: BTreeMap<(&str, &str), Option<&TimerRecord>> = BTreeMap::new();
        let mut outputs: BTreeMap<(&str, &str), Option<&str>> = BTreeMap::new();
        // Events come in seq order within a partition, and an instance is in one.
        let mut first_seqs: HashMap<&str, i64> = HashMap::new();
        for batch in batches {
            for event in &batch.events {
                first_seqs
                    .entry(&event.instance_id)
                    .or_insert(db_int(event.seq)?);
                writes.event_partitions.push(i64::from(event.partition));
                writes.event_seqs.push(db_int(event.seq)?);
                writes.event_epochs.push(db_int(event.epoch)?);
                writes.event_instances.push(&event.instance_id);
                writes.event_ats.push(db_int(event.at)?);
                writes.event_types.push(&event.event_type);
                writes.event_payloads.push(&event.payload);
            }
            for instance in &batch.instances {
                instances
                    .entry(&instance.id)
                    .and_modify(|(_, last)| *last = instance)
                    .or_insert((instance, instance));
            }
            // Within a batch, deletes come before puts (SQLite's order).
            for task_id in &batch.tasks_delete {
                tasks.insert(task_id, None);
            }
            for task in &batch.tasks_put {
                tasks.insert(&task.task_id, Some(task));
            }
            for (instance_id, key) in &batch.timers_delete {
                timers.insert((instance_id, key), None);
            }
            for timer in &batch.timers_put {
                timers.insert((&timer.instance_id, &timer.key), Some(timer));
            }
            for (instance_id, step_id) in &batch.outputs_delete {
                outputs.insert((instance_id, step_id), None);
            }
            for output in &batch.outputs_put {
                outputs.insert((&output.instance_id, &output.step_id), Some(&output.entry));
            }
        }
        for ((instance_id, step_id), entry) in outputs {
            match entry {
                None => {
                    writes.outputs_deleted_instances.push(instance_id);
                    writes.outputs_deleted_steps.push(step_id);
                }
                Some(entry) => {
                    writes.output_instances.push(instance_id);
                    writes.output_steps.push(step_id);
                    writes.output_entries.push(entry);
                }
            }
        }
        for (first, last) in instances.into_values() {
            writes.instance_ids.push(&first.id);
            writes.instance_partitions.push(i64::from(first.partition));
            writes.instance_definitions.push(&first.definition);
            writes.instance_versions.push(i64::from(first.version));
            writes.instance_inputs.push(&first.input);
            writes.instance_created.push(db_int(first.created_at)?);
            writes.instance_statuses.push(&last.status);
            writes.instance_actives.push(last.active);
            writes.instance_outputs.push(last.output.as_deref());
            writes.instance_errors.push(last.error.as_deref());
            writes.instance_updated.push(db_int(last.updated_at)?);
            writes.instance_states.push(&last.state);
            writes
                .instance_first_seqs
                .push(first_seqs.get(first.id.as_str()).copied());
        }
        for (task_id, task) in tasks {
            match task {
                None => writes.tasks_deleted.push(task_id),
                Some(task) => {
                    writes.task_ids.push(&task.task_id);
                    writes.task_partitions.push(i64::from(task.partition));
                    writes.task_queues.push(&task.queue);
                    writes.task_instances.push(&task.instance_id);
                    writes.task_payloads.push(&task.payload);
                }
            }
        }
        for ((instance_id, key), timer) in timers {
            match timer {
                None => {
                    writes.timers_deleted_instances.push(instance_id);
                    writes.timers_deleted_keys.push(key);
                }
                Some(timer) => {
                    writes.timer_instances.push(&timer.instance_id);
                    writes.timer_keys.push(&timer.key);
                    writes.timer_partitions.push(i64::from(timer.partition));
                    writes.timer_fire_ats.push(db_int(timer.fire_at)?);
                }
            }
        }
        Ok(writes)
    }

    /// The parameters of [`COMMIT_IF_CURRENT`], in order.
    fn params(&self) -> [&(dyn ToSql + Sync); 41] {
        [
            &self.partitions,
            &self.last_seqs,
            &self.event_partitions,
            &self.event_seqs,
            &self.event_epochs,
            &self.event_instances,
            &self.event_ats,
            &self.event_types,
            &self.event_payloads,
            &self.instance_ids,
            &self.instance_partitions,
            &self.instance_definitions,
            &self.instance_versions,
            &self.instance_statuses,
            &self.instance_actives,
            &self.instance_inputs,
            &self.instance_outputs,
            &self.instance_errors,
            &self.instance_created,
            &self.instance_updated,
            &self.instance_states,
            &self.tasks_deleted,
            &self.task_ids,
            &self.task_partitions,
            &self.task_queues,
            &self.task_instances,
            &self.task_payloads,
            &self.timers_deleted_instances,
            &self.timers_deleted_keys,
            &self.timer_instances,
            &self.timer_keys,
            &self.timer_partitions,
            &self.timer_fire_ats,
            &self.epochs,
            &self.seq_befores,
            &self.outputs_deleted_instances,
            &self.outputs_deleted_steps,
            &self.output_instances,
            &self.output_steps,
            &self.output_entries,
            &self.instance_first_seqs,
        ]
    }
}

/// Splits lease pairs into the two arrays the lease statements take.
fn lease_arrays(leases: &[(u32, u64)]) -> Result<(Vec<i64>, Vec<i64>), Error> {
    let partitions = leases.iter().map(|&(p, _)| i64::from(p)).collect();
    let epochs = leases
        .iter()
        .map(|&(_, e)| db_int(e))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((partitions, epochs))
}

impl Store for PostgresStore {
    fn partition_count(&self) -> u32 {
        self.partition_count
    }

    fn heartbeat(
        &self,
        node: &Announcement,
        joining: bool,
        _now: u64,
        failure_timeout_ms: u64,
    ) -> Result<Membership, Error> {
        self.with(|connection| {
            let rows = connection.query(
                HEARTBEAT,
                &[&node.node_id, &node.url, &node.standby, &joining],
            )?;
            let row = rows.first().ok_or_else(|| {
                Error::Incompatible("the heartbeat upsert returned no row".into())
            })?;
            let now = column_u64(row, 0)?;
            read_membership(connection, now, failure_timeout_ms)
        })
    }

    fn membership(&self, _now: u64, failure_timeout_ms: u64) -> Result<Membership, Error> {
        self.with(|connection| {
            let rows = connection.query(DB_NOW, &[])?;
            let row = rows
                .first()
                .ok_or_else(|| Error::Incompatible("reading the clock returned no row".into()))?;
            let now = column_u64(row, 0)?;
            read_membership(connection, now, failure_timeout_ms)
        })
    }

    fn leave(&self, node_id: &str) -> Result<(), Error> {
        if !storable(node_id) {
            return Ok(());
        }
        self.with(|connection| {
            connection.execute("DELETE FROM members WHERE node_id = $1", &[&node_id])?;
            Ok(())
        })
    }

    fn set_draining(&self, node_id: &str, draining: bool) -> Result<bool, Error> {
        if !storable(node_id) {
            return Ok(false);
        }
        self.with(|connection| {
            let changed = connection.execute(
                "UPDATE members SET draining = $1 WHERE node_id = $2",
                &[&draining, &node_id],
            )?;
            Ok(changed == 1)
        })
    }

    fn acquire_lease(
        &self,
        partition: u32,
        owner: &str,
        _now: u64,
        ttl_ms: u64,
    ) -> Result<Option<Lease>, Error> {
        assert!(partition < self.partition_count);
        let ttl = db_int(ttl_ms)?;
        self.with(|connection| {
            let rows = connection.query(ACQUIRE_LEASE, &[&i64::from(partition), &owner, &ttl])?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            Ok(Some(Lease {
                partition,
                owner: owner.to_string(),
                epoch: column_u64(row, 0)?,
                expires_at: column_u64(row, 1)?,
            }))
        })
    }

    fn renew_leases(
        &self,
        owner: &str,
        leases: &[(u32, u64)],
        _now: u64,
        ttl_ms: u64,
    ) -> Result<Vec<u32>, Error> {
        if leases.is_empty() || !storable(owner) {
            return Ok(Vec::new());
        }
        let (partitions, epochs) = lease_arrays(leases)?;
        let ttl = db_int(ttl_ms)?;
        self.with(|connection| {
            let rows = connection.query(RENEW_LEASES, &[&owner, &partitions, &epochs, &ttl])?;
            let renewed = rows
                .iter()
                .map(|row| Ok((column_u32(row, 0)?, column_u64(row, 1)?)))
                .collect::<Result<Vec<_>, Error>>()?;
            // In the caller's order, as SQLite answers.
            Ok(leases
                .iter()
                .filter(|lease| renewed.contains(lease))
                .map(|&(partition, _)| partition)
                .collect())
        })
    }

    fn release_leases(&self, owner: &str, leases: &[(u32, u64)]) -> Result<(), Error> {
        if leases.is_empty() || !storable(owner) {
            return Ok(());
        }
        let (partitions, epochs) = lease_arrays(leases)?;
        self.with(|connection| {
            connection.execute(RELEASE_LEASES, &[&owner, &partitions, &epochs])?;
            Ok(())
        })
    }

    fn leases(&self) -> Result<Vec<Lease>, Error> {
        self.with(|connection| {
            rows(
                connection.query(
                    "SELECT partition, owner, epoch, expires_at FROM partitions ORDER BY partition",
                    &[],
                )?,
                lease_from_row,
            )
        })
    }

    fn load_partition(
        &self,
        partition: u32,
        instance: &mut dyn FnMut(InstanceRecord),
    ) -> Result<PartitionSnapshot, Error> {
        assert!(partition < self.partition_count);
        let partition = i64::from(partition);
        self.with(|connection| {
            let instances_sql = format!(
                "SELECT {INSTANCE_COLUMNS} FROM instances WHERE partition = $1 AND active"
            );
            let instances = connection.statement(&instances_sql)?;
            let tasks = connection.statement(
                "SELECT task_id, partition, queue, instance_id, payload FROM tasks WHERE partition = $1",
            )?;
            let timers = connection.statement(
                "SELECT partition, instance_id, key, fire_at FROM timers WHERE partition = $1",
            )?;
            let last_seq =
                connection.statement("SELECT last_seq FROM partitions WHERE partition = $1")?;
            // One snapshot for the four reads, so the pieces agree with each other.
            let mut transaction = connection
                .client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            // Rows are handed on as they arrive, not gathered first.
            let mut stream = transaction.query_raw(&instances, [&partition])?;
            while let Some(row) = stream.next()? {
                instance(instance_from_row(&row)?);
            }
            drop(stream);
            let tasks = rows(transaction.query(&tasks, &[&partition])?, |row| {
                Ok(TaskRecord {
                    task_id: row.try_get(0)?,
                    partition: column_u32(row, 1)?,
                    queue: row.try_get(2)?,
                    instance_id: row.try_get(3)?,
                    payload: row.try_get(4)?,
                })
            })?;
            let timers = rows(transaction.query(&timers, &[&partition])?, |row| {
                Ok(TimerRecord {
                    partition: column_u32(row, 0)?,
                    instance_id: row.try_get(1)?,
                    key: row.try_get(2)?,
                    fire_at: column_u64(row, 3)?,
                })
            })?;
            let last_seq = column_u64(&transaction.query_one(&last_seq, &[&partition])?, 0)?;
            transaction.commit()?;
            Ok(PartitionSnapshot {
                tasks,
                timers,
                last_seq,
            })
        })
    }

    fn commit(&self, batches: &[PartitionBatch]) -> Result<Vec<Result<(), Refusal>>, Error> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        // The common case, every batch current, costs one statement. Refusals are rare
        // (a node that lost a lease); they take the exact path below.
        let all: Vec<&PartitionBatch> = batches.iter().collect();
        let well_formed = batches.iter().all(|b| malformation(b).is_none());
        if let Some(chain) = chain(&all).filter(|_| well_formed) {
            let writes = Writes::merge(&all, &chain)?;
            let written = self.with(|connection| {
                let mut attempt = 1;
                let rows = loop {
                    match connection.query(COMMIT_IF_CURRENT, &writes.params()) {
                        Err(Error::Postgres(err))
                            if is_deadlock(&err) && attempt < DEADLOCK_RETRIES_MAX =>
                        {
                            tracing::warn!(attempt, error = %err, "commit chosen as a deadlock victim; running it again");
                            attempt += 1;
                        }
                        result => break result?,
                    }
                };
                let row = rows.first().ok_or_else(|| {
                    Error::Incompatible("the commit statement returned no row".into())
                })?;
                Ok(row.try_get::<_, bool>(0)?)
            })?;
            if written {
                // synchronous_commit is on: the statement's commit is durable.
                return Ok(vec![Ok(()); batches.len()]);
            }
        }
        self.commit_batch_by_batch(batches)
    }

    fn put_definition(&self, name: &str, source: &str, now: u64) -> Result<u32, Error> {
        let now = db_int(now)?;
        self.with(|connection| {
            let lock = connection.statement("SELECT pg_advisory_xact_lock($1, hashtext($2))")?;
            let insert = connection.statement(
                "INSERT INTO definitions (name, version, source, created_at)
                 SELECT $1::text, coalesce(max(version), 0) + 1, $2::text, $3::bigint
                 FROM definitions WHERE name = $1::text
                 RETURNING version",
            )?;
            let mut transaction = connection.client.transaction()?;
            // Two nodes deploying the same name at once would both read the same latest
            // version; the lock makes the second read after the first commits.
            transaction.execute(&lock, &[&DEFINITION_LOCK_CLASS, &name])?;
            let row = transaction.query_one(&insert, &[&name, &source, &now])?;
            let version = column_u32(&row, 0)?;
            transaction.commit()?;
            Ok(version)
        })
    }

    fn definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<DefinitionRecord>, Error> {
        if !storable(name) {
            return Ok(None);
        }
        self.with(|connection| {
            let rows = match version {
                Some(version) => connection.query(
                    "SELECT name, version, source, created_at FROM definitions
                     WHERE name = $1 AND version = $2",
                    &[&name, &i64::from(version)],
                )?,
                None => connection.query(
                    "SELECT name, version, source, created_at FROM definitions
                     WHERE name = $1 ORDER BY version DESC LIMIT 1",
                    &[&name],
                )?,
            };
            rows.first().map(definition_from_row).transpose()
        })
    }

    fn definitions(&self) -> Result<Vec<DefinitionRecord>, Error> {
        self.with(|connection| {
            rows(
                connection.query(
                    "SELECT DISTINCT ON (name) name, version, source, created_at FROM definitions
                     ORDER BY name, version DESC",
                    &[],
                )?,
                definition_from_row,
            )
        })
    }

    fn instance(&self, id: &str) -> Result<Option<InstanceRecord>, Error> {
        if !storable(id) {
            return Ok(None);
        }
        self.with(|connection| {
            let rows = connection.query(
                &format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1"),
                &[&id],
            )?;
            rows.first().map(instance_from_row).transpose()
        })
    }

    fn instances_exist(&self, ids: &[String]) -> Result<Vec<bool>, Error> {
        assert!(ids.len() <= crate::EXISTENCE_CHECK_MAX);
        // Ids PostgreSQL cannot store cannot exist; they must not reach the query.
        let checked: Vec<&str> = ids
            .iter()
            .map(String::as_str)
            .filter(|id| storable(id))
            .collect();
        if checked.is_empty() {
            return Ok(vec![false; ids.len()]);
        }
        let found: std::collections::HashSet<String> = self.with(|connection| {
            let rows =
                connection.query("SELECT id FROM instances WHERE id = ANY($1)", &[&checked])?;
            Ok(rows.iter().map(|row| row.get::<_, String>(0)).collect())
        })?;
        Ok(ids.iter().map(|id| found.contains(id)).collect())
    }

    fn step_outputs(&self, ids: &[String]) -> Result<Vec<Vec<(String, String)>>, Error> {
        assert!(ids.len() <= crate::EXISTENCE_CHECK_MAX);
        let checked: Vec<&str> = ids
            .iter()
            .map(String::as_str)
            .filter(|id| storable(id))
            .collect();
        let mut found: HashMap<String, Vec<(String, String)>> = HashMap::new();
        if !checked.is_empty() {
            self.with(|connection| {
                let rows = connection.query(
                    "SELECT instance_id, step_id, entry FROM step_outputs
                     WHERE instance_id = ANY($1) ORDER BY instance_id, step_id",
                    &[&checked],
                )?;
                for row in rows {
                    found
                        .entry(row.try_get(0)?)
                        .or_default()
                        .push((row.try_get(1)?, row.try_get(2)?));
                }
                Ok::<_, Error>(())
            })?;
        }
        Ok(ids
            .iter()
            .map(|id| found.get(id).cloned().unwrap_or_default())
            .collect())
    }

    fn single_writer(&self) -> bool {
        // Every node of a cluster writes to the same database.
        false
    }

    fn instances(&self, query: &InstanceQuery) -> Result<Vec<InstanceRecord>, Error> {
        let filters = [&query.status, &query.definition];
        if filters
            .iter()
            .any(|f| f.as_deref().is_some_and(|f| !storable(f)))
        {
            return Ok(Vec::new());
        }
        // A stored id (without NUL) sorts before a cursor's id with NUL exactly when it
        // sorts before or equals the part before the NUL.
        let before = query.before.as_ref().and_then(|before| {
            // A cursor past every storable time (beyond BIGINT) lets every row through.
            let created_at = i64::try_from(before.created_at).ok()?;
            let (id, equal_too) = match before.id.split_once('\0') {
                Some((id, _)) => (id, true),
                None => (before.id.as_str(), false),
            };
            Some((created_at, id, equal_too))
        });
        let mut sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE true");
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if let Some(status) = &query.status {
            params.push(status);
            sql.push_str(&format!(" AND status = ${}", params.len()));
        }
        if let Some(definition) = &query.definition {
            params.push(definition);
            sql.push_str(&format!(" AND definition = ${}", params.len()));
        }
        if let Some((created_at, id, equal_too)) = &before {
            params.push(created_at);
            params.push(id);
            let operator = if *equal_too { "<=" } else { "<" };
            // A row comparison, which the index's range takes whole.
            sql.push_str(&format!(
                " AND (created_at, id) {operator} (${}, ${})",
                params.len() - 1,
                params.len()
            ));
        }
        let limit = i64::from(query.limit);
        params.push(&limit);
        sql.push_str(&format!(
            " ORDER BY created_at DESC, id DESC LIMIT ${}",
            params.len()
        ));
        self.with(|connection| rows(connection.query(&sql, &params)?, instance_from_row))
    }

    fn history(&self, instance_id: &str, partition: u32) -> Result<Vec<EventRecord>, Error> {
        if !storable(instance_id) {
            return Ok(Vec::new());
        }
        self.with(|connection| {
            rows(
                // Through the row's first seq (see the fourth migration), and by id for
                // the events written without one.
                connection.query(
                    "SELECT e.partition, e.seq, e.epoch, e.instance_id, e.at, e.type, e.payload
                     FROM instances i JOIN events e
                         ON e.partition = i.partition AND e.instance_seq = i.first_seq
                     WHERE i.id = $1 AND i.partition = $2 AND e.instance_id = $1
                     UNION ALL
                     SELECT partition, seq, epoch, instance_id, at, type, payload FROM events
                     WHERE instance_id = $1 AND partition = $2 AND instance_seq IS NULL
                     ORDER BY seq",
                    &[&instance_id, &i64::from(partition)],
                )?,
                event_from_row,
            )
        })
    }

    fn events_after(
        &self,
        partition: u32,
        after: u64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, Error> {
        let after = db_int(after)?;
        self.with(|connection| {
            rows(
                connection.query(
                    "SELECT partition, seq, epoch, instance_id, at, type, payload FROM events
                     WHERE partition = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&i64::from(partition), &after, &i64::from(limit)],
                )?,
                event_from_row,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rows::{history_seqs, one_event_each};
    use weir_pgtest::PgServer;

    #[test]
    fn a_database_of_the_third_schema_is_migrated_and_every_history_found() {
        // Goal: a database written before events were indexed by their instance's first
        // seq is migrated without rewriting its events, and every history is found: the
        // old instances' events, the ones committed after, and events a node of the
        // previous version writes during a rolling upgrade (without `instance_seq`).
        // Method: a database made with the first three migrations and rows written as
        // that version did; then commits through the store, and an event put in as the
        // previous version puts it.
        let server = PgServer::shared();
        let url = server.fresh_database();
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        for migration in &MIGRATIONS[..3] {
            client.batch_execute(migration).unwrap();
        }
        client
            .batch_execute(
                r#"CREATE TABLE meta (key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL);
                 INSERT INTO meta (key, value) VALUES ('schema_version', '3'), ('partition_count', '1');
                 INSERT INTO partitions (partition, last_seq) VALUES (0, 3);
                 INSERT INTO instances (id, partition, definition, version, status, active,
                     input, output, error, created_at, updated_at, state)
                 VALUES ('old-b', 0, 'd', 1, 'running', true, '{}', NULL, NULL, 1, 1, '{}'),
                        ('old-a', 0, 'd', 1, 'completed', false, '{}', '{}', NULL, 1, 1, '{}');
                 INSERT INTO events (partition, seq, epoch, instance_id, at, type, payload)
                 VALUES (0, 1, 0, 'old-b', 1, 't', '{}'), (0, 2, 0, 'old-a', 1, 't', '{}'),
                        (0, 3, 0, 'old-b', 1, 't', '{}');"#,
            )
            .unwrap();
        let store = PostgresStore::connect(&url, 1).unwrap();
        let seqs = |id: &str| history_seqs(&store, id);
        assert_eq!(seqs("old-b"), [1, 3]);
        assert_eq!(seqs("old-a"), [2]);
        // One group commit of two batches: a new instance's first event in the first and
        // its next in the second, beside an old instance's.
        let first = one_event_each(3, &["old-b", "new"]);
        let second = one_event_each(5, &["new", "old-b"]);
        assert_eq!(
            store.commit(&[first, second]).unwrap(),
            vec![Ok(()), Ok(())]
        );
        assert_eq!(seqs("old-b"), [1, 3, 4, 7]);
        assert_eq!(seqs("new"), [5, 6]);
        assert_eq!(seqs("old-a"), [2]);
        assert!(seqs("missing").is_empty());
        // The new instance's events are keyed by its first seq, the old one's by id.
        let keyed: Vec<(String, Option<i64>)> = client
            .query(
                "SELECT instance_id, instance_seq FROM events WHERE seq > 3 ORDER BY seq",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(
            keyed,
            [
                ("old-b".to_string(), None),
                ("new".to_string(), Some(5)),
                ("new".to_string(), Some(5)),
                ("old-b".to_string(), None)
            ]
        );
        // A node of the previous version, in a rolling upgrade, writes an event without
        // `instance_seq` for the new instance.
        client
            .batch_execute(
                "UPDATE partitions SET last_seq = 8;
                 INSERT INTO events (partition, seq, epoch, instance_id, at, type, payload)
                 VALUES (0, 8, 0, 'new', 1, 't', '{}');",
            )
            .unwrap();
        assert_eq!(seqs("new"), [5, 6, 8]);
        let indexes: Vec<String> = client
            .query(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'events' ORDER BY indexname",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(
            indexes,
            [
                "events_instance_seq",
                "events_instance_unseq",
                "events_pkey"
            ]
        );
    }
}
