//! The embedded SQLite backend: one data directory, one process.
//!
//! One connection writes (SQLite has a single writer anyway); a small pool of
//! connections reads concurrently thanks to WAL. Every commit is fsynced
//! (`synchronous=FULL`), so a commit that returned is durable.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::sqlite_wal_writes::SyncsRecordedIn;
use crate::{
    Announcement, DefinitionRecord, Error, EventRecord, InstanceQuery, InstanceRecord,
    LatencyHistogram, LatencySnapshot, Lease, Member, Membership, PartitionBatch,
    PartitionSnapshot, Refusal, Store, TaskRecord, TimerRecord, PARTITION_COUNT_MAX,
};

/// Name of the database file inside the data directory.
const DATABASE_FILE: &str = "weir.db";
/// Name of the lock file that keeps a second process out.
const LOCK_FILE: &str = "weir.lock";

/// Schema migrations, applied in order; the schema version is the count applied.
/// Never edit one that has shipped: add a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE partitions (
    partition INTEGER PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    epoch INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE definitions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    source TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    definition TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    active INTEGER NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX instances_active ON instances (partition) WHERE active = 1;
CREATE INDEX instances_status ON instances (status, id);
CREATE INDEX instances_definition ON instances (definition, id);
CREATE TABLE events (
    partition INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    instance_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (partition, seq)
) WITHOUT ROWID;
CREATE INDEX events_instance ON events (instance_id);
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    queue TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX tasks_partition ON tasks (partition);
CREATE TABLE timers (
    instance_id TEXT NOT NULL,
    key TEXT NOT NULL,
    partition INTEGER NOT NULL,
    fire_at INTEGER NOT NULL,
    PRIMARY KEY (instance_id, key)
) WITHOUT ROWID;
CREATE INDEX timers_partition ON timers (partition);
"#,
    r#"
CREATE TABLE members (
    node_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    standby INTEGER NOT NULL,
    draining INTEGER NOT NULL DEFAULT 0,
    joined_at INTEGER NOT NULL,
    last_heartbeat INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE step_outputs (
    instance_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (instance_id, step_id)
) WITHOUT ROWID;
"#,
    // An instance's events are found by the seq of its first event in its partition,
    // not by its id: ids may be random (a client's UUIDs), and an index keyed by them
    // took a page of its own for nearly every event a commit wrote. Instances start in
    // seq order, so the events of the instances in flight go to the index's last pages.
    r#"
ALTER TABLE instances ADD COLUMN first_seq INTEGER;
UPDATE instances SET first_seq = (
    SELECT MIN(seq) FROM events
    WHERE events.instance_id = instances.id AND events.partition = instances.partition
);
ALTER TABLE events ADD COLUMN instance_seq INTEGER;
UPDATE events SET instance_seq = (
    SELECT first_seq FROM instances
    WHERE instances.id = events.instance_id AND instances.partition = events.partition
);
CREATE INDEX events_instance_seq ON events (partition, instance_seq);
DROP INDEX events_instance;
"#,
    // Instances are listed newest first (see `InstanceQuery`), through indexes keyed by
    // creation: indexes keyed by id took a page of their own for each instance named by
    // a random id, at its start and at its end.
    r#"
CREATE INDEX instances_created ON instances (created_at, id);
CREATE INDEX instances_status_created ON instances (status, created_at, id);
CREATE INDEX instances_definition_created ON instances (definition, created_at, id);
DROP INDEX instances_status;
DROP INDEX instances_definition;
"#,
];

/// The SQLite store of one data directory.
pub struct SqliteStore {
    path: PathBuf,
    partition_count: u32,
    writer: Mutex<Connection>,
    /// The first seqs of instances the writer has written, so that a step's commit need
    /// not read its instance's back. Locked only with the writer.
    first_seqs: Mutex<FirstSeqs>,
    /// The writer's WAL syncs (see `sqlite_wal_writes`), if its VFS times them.
    wal_syncs: Option<Arc<LatencyHistogram>>,
    readers: Mutex<Vec<Connection>>,
    /// Held for the store's life: the exclusive lock on the data directory.
    _lock: File,
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `data_dir`, with `partition_count`
    /// partitions if it is new. Refuses a directory another process holds.
    pub fn open(data_dir: &Path, partition_count: u32) -> Result<SqliteStore, Error> {
        assert!(partition_count > 0);
        if partition_count > PARTITION_COUNT_MAX {
            return Err(Error::Incompatible(format!(
                "{partition_count} partitions is more than the maximum of {PARTITION_COUNT_MAX}"
            )));
        }
        std::fs::create_dir_all(data_dir).map_err(|source| Error::Io {
            context: format!("creating data directory {}", data_dir.display()),
            source,
        })?;
        let lock = lock_data_dir(data_dir)?;
        let path = data_dir.join(DATABASE_FILE);
        // Before the process's first connection: SQLite takes its page cache then.
        crate::sqlite_page_cache::install();
        let mut writer = open_connection(&path, Role::Writer)?;
        migrate(&mut writer)?;
        let partition_count = init_partitions(&mut writer, partition_count)?;
        Ok(SqliteStore {
            path,
            partition_count,
            writer: Mutex::new(writer),
            first_seqs: Mutex::new(FirstSeqs::default()),
            // The writer opened through the VFS that times syncs, unless SQLite refused it.
            wal_syncs: crate::sqlite_wal_writes::register()
                .map(|_| Arc::new(LatencyHistogram::new())),
            readers: Mutex::new(Vec::new()),
            _lock: lock,
        })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        let reader = self.readers.lock().expect("reader pool lock").pop();
        let reader = match reader {
            Some(reader) => reader,
            None => open_connection(&self.path, Role::Reader)?,
        };
        let result = f(&reader);
        let mut pool = self.readers.lock().expect("reader pool lock");
        if pool.len() < crate::READERS_MAX {
            pool.push(reader);
        }
        result
    }

    fn write<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, Error>) -> Result<T, Error> {
        let writer = self.writer.lock().expect("writer lock");
        self.write_with(writer, f)
    }

    /// Writes with the writer already locked, counting the WAL syncs it makes.
    fn write_with<T>(
        &self,
        mut writer: MutexGuard<'_, Connection>,
        f: impl FnOnce(&mut Connection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let _syncs = self.wal_syncs.as_ref().map(SyncsRecordedIn::new);
        f(&mut writer)
    }
}

/// Most instances whose first seq [`FirstSeqs`] remembers; past that it forgets them all
/// and reads them back again. The instances in flight are a small part of it.
const FIRST_SEQS_KNOWN_MAX: usize = 65_536;

/// The seq of each instance's first event (the `first_seq` column), as committed, for
/// the instances the writer wrote lately. An instance's first seq never changes once
/// committed, and no instance row is ever deleted, so what is known stays true; only a
/// transaction that fails may have taught it something that is not stored, and it
/// forgets everything then.
#[derive(Default)]
struct FirstSeqs {
    known: HashMap<String, i64>,
}

impl FirstSeqs {
    fn remember(&mut self, id: &str, first_seq: i64) {
        if self.known.len() >= FIRST_SEQS_KNOWN_MAX {
            self.known.clear();
        }
        self.known.insert(id.to_owned(), first_seq);
    }
}

/// One group commit on the writer: every batch applied or refused, in one transaction.
fn commit_batches(
    connection: &mut Connection,
    first_seqs: &mut FirstSeqs,
    batches: &[PartitionBatch],
) -> Result<Vec<Result<(), Refusal>>, Error> {
    // The hot path's BEGIN and COMMIT are prepared once, like its other
    // statements: `Connection::transaction` parses them at every commit.
    connection.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let applied = (|| {
        let mut outcomes = Vec::with_capacity(batches.len());
        for batch in batches {
            // The fencing update runs first and writes nothing when it refuses,
            // so a refused partition leaves no trace and needs no savepoint
            // (savepoints cost a statement journal on every page they touch).
            if apply_batch(connection, first_seqs, batch)? {
                outcomes.push(Ok(()));
            } else {
                outcomes.push(Err(Refusal::Fenced {
                    partition: batch.partition,
                    epoch: batch.epoch,
                }));
            }
        }
        connection.prepare_cached("COMMIT")?.execute([])?;
        Ok(outcomes)
    })();
    if applied.is_err() {
        // What the failed transaction wrote is not stored.
        first_seqs.known.clear();
        if !connection.is_autocommit() {
            // Nothing of a failed commit may stay pending for the next one.
            connection.prepare_cached("ROLLBACK")?.execute([])?;
        }
    }
    applied
}

fn lock_data_dir(data_dir: &Path) -> Result<File, Error> {
    let lock_path = data_dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|source| Error::Io {
            context: format!("opening {}", lock_path.display()),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            let holder = holder.trim();
            let who = if holder.is_empty() {
                String::new()
            } else {
                format!(" (pid {holder})")
            };
            return Err(Error::Locked(format!("{}{who}", data_dir.display())));
        }
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(Error::Io {
                context: format!("locking {}", lock_path.display()),
                source,
            })
        }
    }
    // The pid is informational only: the lock, not the file's content, excludes.
    let _ = file.set_len(0);
    let _ = write!(file, "{}", std::process::id());
    let _ = file.flush();
    Ok(file)
}

/// Prepared statements a connection keeps: more than the store has (rusqlite keeps 16,
/// fewer than the writer's), so that a rare statement never evicts a hot one.
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// Page cache of the writer: it touches the hot pages of every table and index.
const WRITER_CACHE_KIB: i64 = 64 * 1024;
/// Page cache of each reader: readers mostly scan once (loading a partition, listing),
/// and up to `crate::READERS_MAX` of them live at once, so a large cache each would hold
/// hundreds of MiB of pages read once (the OS page cache keeps them anyway).
const READER_CACHE_KIB: i64 = 8 * 1024;

/// Which connection of the store: the one that writes, or one of the readers.
#[derive(Clone, Copy)]
enum Role {
    Writer,
    Reader,
}

fn open_connection(path: &Path, role: Role) -> Result<Connection, Error> {
    let (cache_kib, vfs) = match role {
        // The writer writes a commit's WAL frames in one call (`sqlite_wal_writes`).
        Role::Writer => (WRITER_CACHE_KIB, crate::sqlite_wal_writes::register()),
        Role::Reader => (READER_CACHE_KIB, None),
    };
    let connection = match vfs {
        Some(vfs) => {
            Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), vfs)?
        }
        None => Connection::open(path)?,
    };
    // WAL lets readers run beside the writer; FULL fsyncs the WAL on every commit,
    // which is what makes an acknowledged commit durable.
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    if vfs.is_some() {
        // The WAL VFS writes what it holds back at the WAL's sync, which SQLite makes
        // at every commit, before the commit is visible, only in FULL mode.
        let level: i64 = connection.pragma_query_value(None, "synchronous", |row| row.get(0))?;
        assert_eq!(level, 2, "the WAL-writing VFS needs synchronous=FULL");
    }
    connection.pragma_update(None, "foreign_keys", "OFF")?;
    // Temporary b-trees (sorts, statement journals) stay in memory; a negative cache
    // size is in KiB.
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    connection.pragma_update(None, "cache_size", -cache_kib)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    connection.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(connection)
}

fn migrate(connection: &mut Connection) -> Result<(), Error> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(Error::Incompatible(format!(
            "schema version {version} is newer than this weir understands ({})",
            MIGRATIONS.len()
        )));
    }
    // A store written by an earlier version is rewritten here, before the node is
    // ready (the fourth migration took 16 s on a million instances): say so.
    let upgrading = version > 0 && version < MIGRATIONS.len();
    if upgrading {
        tracing::info!(
            from = version,
            to = MIGRATIONS.len(),
            "migrating the store's schema"
        );
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let started = std::time::Instant::now();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        transaction.execute_batch(migration)?;
        transaction.pragma_update(None, "user_version", (index + 1) as i64)?;
        transaction.commit()?;
        if upgrading {
            tracing::info!(
                schema_version = index + 1,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "store migrated"
            );
        }
    }
    Ok(())
}

fn init_partitions(connection: &mut Connection, partition_count: u32) -> Result<u32, Error> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let stored: Option<String> = transaction
        .query_row(
            "SELECT value FROM meta WHERE key = 'partition_count'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    let count = match stored {
        Some(text) => text
            .parse::<u32>()
            .map_err(|_| Error::Incompatible(format!("bad partition_count `{text}`")))?,
        None => {
            transaction.execute(
                "INSERT INTO meta (key, value) VALUES ('partition_count', ?1)",
                params![partition_count.to_string()],
            )?;
            for partition in 0..partition_count {
                transaction.execute(
                    "INSERT INTO partitions (partition) VALUES (?1)",
                    params![partition],
                )?;
            }
            partition_count
        }
    };
    transaction.commit()?;
    Ok(count)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).expect("stored integers fit in i64")
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).expect("stored integers are not negative")
}

const INSTANCE_COLUMNS: &str =
    "id, partition, definition, version, status, active, input, output, error, created_at, updated_at, state";

fn instance_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<InstanceRecord> {
    Ok(InstanceRecord {
        id: row.get(0)?,
        partition: row.get(1)?,
        definition: row.get(2)?,
        version: row.get(3)?,
        status: row.get(4)?,
        active: row.get(5)?,
        input: row.get(6)?,
        output: row.get(7)?,
        error: row.get(8)?,
        created_at: to_u64(row.get(9)?),
        updated_at: to_u64(row.get(10)?),
        state: row.get(11)?,
    })
}

fn event_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        partition: row.get(0)?,
        seq: to_u64(row.get(1)?),
        epoch: to_u64(row.get(2)?),
        instance_id: row.get(3)?,
        at: to_u64(row.get(4)?),
        event_type: row.get(5)?,
        payload: row.get(6)?,
    })
}

fn lease_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        partition: row.get(0)?,
        owner: row.get(1)?,
        epoch: to_u64(row.get(2)?),
        expires_at: to_u64(row.get(3)?),
    })
}

/// Applies one partition's batch inside an open transaction. Returns `Ok(false)`
/// when the partition's epoch or log end is not what the batch expects.
fn read_membership(
    connection: &Connection,
    now: u64,
    failure_timeout_ms: u64,
) -> Result<Membership, Error> {
    let mut statement = connection.prepare_cached(
        "SELECT node_id, url, standby, draining, joined_at, last_heartbeat FROM members ORDER BY node_id",
    )?;
    let rows = statement.query_map([], |row| {
        let last_heartbeat = to_u64(row.get(5)?);
        Ok(Member {
            node_id: row.get(0)?,
            url: row.get(1)?,
            standby: row.get(2)?,
            draining: row.get(3)?,
            joined_at: to_u64(row.get(4)?),
            last_heartbeat,
            alive: now.saturating_sub(last_heartbeat) < failure_timeout_ms,
        })
    })?;
    Ok(Membership {
        now,
        members: rows.collect::<Result<Vec<_>, _>>()?,
    })
}

fn apply_batch(
    transaction: &Connection,
    first_seqs: &mut FirstSeqs,
    batch: &PartitionBatch,
) -> Result<bool, Error> {
    let seq_after = batch.seq_before + batch.events.len() as u64;
    // One statement both fences (epoch) and guards the log's contiguity (last_seq).
    let changed = transaction
        .prepare_cached(
            "UPDATE partitions SET last_seq = ?1 WHERE partition = ?2 AND epoch = ?3 AND last_seq = ?4",
        )?
        .execute(params![
            to_i64(seq_after),
            batch.partition,
            to_i64(batch.epoch),
            to_i64(batch.seq_before)
        ])?;
    if changed == 0 {
        return Ok(false);
    }
    assert_eq!(changed, 1);
    // Instance rows go before events: an event is indexed by the seq of its instance's
    // first event (see the fourth migration), which a new instance's row takes from its
    // first event in this batch; a stored row keeps its own. The batch's first events are
    // indexed only for a batch with a new row or a status change (starts and ends).
    let mut first_in_batch: Option<HashMap<&str, i64>> = None;
    {
        // Most rows a batch writes keep their status and activity (a step of a running
        // instance). Such a row is updated without setting those columns: SQLite rewrites
        // an index's entry whenever an UPDATE sets one of its columns, even to the value
        // it has, which cost two more pages per commit (`instances_status_created`,
        // `instances_active`). A new row, or one whose status or activity changes,
        // matches nothing here and takes the upsert.
        let mut update_same_status = transaction.prepare_cached(
            "UPDATE instances SET output = ?1, error = ?2, updated_at = ?3, state = ?4
             WHERE id = ?5 AND status = ?6 AND active = ?7",
        )?;
        let mut upsert = transaction.prepare_cached(
            "INSERT INTO instances (id, partition, definition, version, status, active, input, output, error, created_at, updated_at, state, first_seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, active = excluded.active,
                 output = excluded.output, error = excluded.error, updated_at = excluded.updated_at,
                 state = excluded.state",
        )?;
        for instance in &batch.instances {
            assert_eq!(instance.partition, batch.partition);
            let updated = update_same_status.execute(params![
                instance.output,
                instance.error,
                to_i64(instance.updated_at),
                instance.state,
                instance.id,
                instance.status,
                instance.active
            ])?;
            assert!(updated <= 1, "instance ids are unique");
            if updated == 0 {
                let first_seq = first_in_batch
                    .get_or_insert_with(|| {
                        let mut first = HashMap::new();
                        for event in &batch.events {
                            first
                                .entry(event.instance_id.as_str())
                                .or_insert(to_i64(event.seq));
                        }
                        first
                    })
                    .get(instance.id.as_str())
                    .copied();
                upsert.execute(params![
                    instance.id,
                    instance.partition,
                    instance.definition,
                    instance.version,
                    instance.status,
                    instance.active,
                    instance.input,
                    instance.output,
                    instance.error,
                    to_i64(instance.created_at),
                    to_i64(instance.updated_at),
                    instance.state,
                    first_seq
                ])?;
            }
        }
    }
    {
        let mut insert = transaction.prepare_cached(
            "INSERT INTO events (partition, seq, epoch, instance_id, at, type, payload, instance_seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        // Read back once per instance, with a plain read that sees this transaction's
        // rows: SQLite runs a `RETURNING` clause as a trigger, which cost the committer a
        // quarter more time per step, and even the read, at every step, cost a tenth.
        let mut first_seq_of =
            transaction.prepare_cached("SELECT first_seq FROM instances WHERE id = ?1")?;
        for (index, event) in batch.events.iter().enumerate() {
            assert_eq!(event.partition, batch.partition);
            assert_eq!(
                event.seq,
                batch.seq_before + 1 + index as u64,
                "event seqs are contiguous"
            );
            assert_eq!(event.epoch, batch.epoch);
            let instance_seq = match first_seqs.known.get(&event.instance_id) {
                Some(first_seq) => Some(*first_seq),
                None => {
                    let first_seq: Option<i64> = first_seq_of
                        .query_row(params![event.instance_id], |row| row.get(0))
                        .optional()?
                        .flatten();
                    if let Some(first_seq) = first_seq {
                        first_seqs.remember(&event.instance_id, first_seq);
                    }
                    first_seq
                }
            };
            insert.execute(params![
                event.partition,
                to_i64(event.seq),
                to_i64(event.epoch),
                event.instance_id,
                to_i64(event.at),
                event.event_type,
                event.payload,
                instance_seq
            ])?;
        }
    }
    {
        let mut delete = transaction.prepare_cached("DELETE FROM tasks WHERE task_id = ?1")?;
        for task_id in &batch.tasks_delete {
            delete.execute(params![task_id])?;
        }
        let mut put = transaction.prepare_cached(
            "INSERT OR REPLACE INTO tasks (task_id, partition, queue, instance_id, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for task in &batch.tasks_put {
            assert_eq!(task.partition, batch.partition);
            put.execute(params![
                task.task_id,
                task.partition,
                task.queue,
                task.instance_id,
                task.payload
            ])?;
        }
    }
    {
        let mut delete = transaction
            .prepare_cached("DELETE FROM step_outputs WHERE instance_id = ?1 AND step_id = ?2")?;
        for (instance_id, step_id) in &batch.outputs_delete {
            delete.execute(params![instance_id, step_id])?;
        }
        let mut put = transaction.prepare_cached(
            "INSERT OR REPLACE INTO step_outputs (instance_id, step_id, entry) VALUES (?1, ?2, ?3)",
        )?;
        for output in &batch.outputs_put {
            put.execute(params![output.instance_id, output.step_id, output.entry])?;
        }
    }
    {
        let mut delete =
            transaction.prepare_cached("DELETE FROM timers WHERE instance_id = ?1 AND key = ?2")?;
        for (instance_id, key) in &batch.timers_delete {
            delete.execute(params![instance_id, key])?;
        }
        let mut put = transaction.prepare_cached(
            "INSERT OR REPLACE INTO timers (instance_id, key, partition, fire_at) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for timer in &batch.timers_put {
            assert_eq!(timer.partition, batch.partition);
            put.execute(params![
                timer.instance_id,
                timer.key,
                timer.partition,
                to_i64(timer.fire_at)
            ])?;
        }
    }
    Ok(true)
}

/// The statement that lists instances for `query` (see [`InstanceQuery`]), and its
/// values: a range of one of the indexes keyed by creation, read in order.
fn listing_sql(query: &InstanceQuery) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE 1 = 1");
    let mut values: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(status) = &query.status {
        values.push(status.clone().into());
        sql.push_str(&format!(" AND status = ?{}", values.len()));
    }
    if let Some(definition) = &query.definition {
        values.push(definition.clone().into());
        sql.push_str(&format!(" AND definition = ?{}", values.len()));
    }
    // A cursor past every storable time (beyond i64) lets every row through.
    let before = query
        .before
        .as_ref()
        .and_then(|before| Some((i64::try_from(before.created_at).ok()?, &before.id)));
    if let Some((created_at, id)) = before {
        values.push(created_at.into());
        values.push(id.clone().into());
        let (created_at, id) = (values.len() - 1, values.len());
        // A row value, which the index's range takes whole (an OR of the two
        // comparisons is searched on `created_at` alone, then filtered).
        sql.push_str(&format!(" AND (created_at, id) < (?{created_at}, ?{id})"));
    }
    values.push(i64::from(query.limit).into());
    sql.push_str(&format!(
        " ORDER BY created_at DESC, id DESC LIMIT ?{}",
        values.len()
    ));
    (sql, values)
}

impl Store for SqliteStore {
    fn partition_count(&self) -> u32 {
        self.partition_count
    }

    fn heartbeat(
        &self,
        node: &Announcement,
        joining: bool,
        now: u64,
        failure_timeout_ms: u64,
    ) -> Result<Membership, Error> {
        self.write(|connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            transaction.execute(
                "INSERT INTO members (node_id, url, standby, draining, joined_at, last_heartbeat)
                 VALUES (?1, ?2, ?3, 0, ?4, ?4)
                 ON CONFLICT (node_id) DO UPDATE SET url = excluded.url, standby = excluded.standby,
                     last_heartbeat = excluded.last_heartbeat,
                     draining = CASE WHEN ?5 THEN 0 ELSE members.draining END,
                     joined_at = CASE WHEN ?5 THEN excluded.joined_at ELSE members.joined_at END",
                params![node.node_id, node.url, node.standby, to_i64(now), joining],
            )?;
            let membership = read_membership(&transaction, now, failure_timeout_ms)?;
            transaction.commit()?;
            Ok(membership)
        })
    }

    fn membership(&self, now: u64, failure_timeout_ms: u64) -> Result<Membership, Error> {
        self.read(|connection| read_membership(connection, now, failure_timeout_ms))
    }

    fn leave(&self, node_id: &str) -> Result<(), Error> {
        self.write(|connection| {
            connection.execute("DELETE FROM members WHERE node_id = ?1", params![node_id])?;
            Ok(())
        })
    }

    fn set_draining(&self, node_id: &str, draining: bool) -> Result<bool, Error> {
        self.write(|connection| {
            let changed = connection.execute(
                "UPDATE members SET draining = ?1 WHERE node_id = ?2",
                params![draining, node_id],
            )?;
            Ok(changed == 1)
        })
    }

    fn acquire_lease(
        &self,
        partition: u32,
        owner: &str,
        now: u64,
        ttl_ms: u64,
    ) -> Result<Option<Lease>, Error> {
        assert!(partition < self.partition_count);
        self.write(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let current = transaction.query_row(
                "SELECT partition, owner, epoch, expires_at FROM partitions WHERE partition = ?1",
                params![partition],
                lease_from_row,
            )?;
            let free = current.owner.is_empty() || current.owner == owner || current.expires_at <= now;
            if !free {
                return Ok(None);
            }
            let lease = Lease {
                partition,
                owner: owner.to_string(),
                epoch: current.epoch + 1,
                expires_at: now + ttl_ms,
            };
            transaction.execute(
                "UPDATE partitions SET owner = ?1, epoch = ?2, expires_at = ?3 WHERE partition = ?4 AND epoch = ?5",
                params![lease.owner, to_i64(lease.epoch), to_i64(lease.expires_at), partition, to_i64(current.epoch)],
            )?;
            transaction.commit()?;
            assert!(lease.epoch > current.epoch, "epochs only move forward");
            Ok(Some(lease))
        })
    }

    fn renew_leases(
        &self,
        owner: &str,
        leases: &[(u32, u64)],
        now: u64,
        ttl_ms: u64,
    ) -> Result<Vec<u32>, Error> {
        self.write(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut renewed = Vec::with_capacity(leases.len());
            {
                let mut update = transaction.prepare_cached(
                    "UPDATE partitions SET expires_at = ?1 WHERE partition = ?2 AND owner = ?3 AND epoch = ?4",
                )?;
                for &(partition, epoch) in leases {
                    if update.execute(params![to_i64(now + ttl_ms), partition, owner, to_i64(epoch)])? == 1 {
                        renewed.push(partition);
                    }
                }
            }
            transaction.commit()?;
            Ok(renewed)
        })
    }

    fn release_leases(&self, owner: &str, leases: &[(u32, u64)]) -> Result<(), Error> {
        self.write(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut update = transaction.prepare_cached(
                    "UPDATE partitions SET owner = '', expires_at = 0 WHERE partition = ?1 AND owner = ?2 AND epoch = ?3",
                )?;
                for &(partition, epoch) in leases {
                    update.execute(params![partition, owner, to_i64(epoch)])?;
                }
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn leases(&self) -> Result<Vec<Lease>, Error> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT partition, owner, epoch, expires_at FROM partitions ORDER BY partition",
            )?;
            let rows = statement.query_map([], lease_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn load_partition(
        &self,
        partition: u32,
        instance: &mut dyn FnMut(InstanceRecord),
    ) -> Result<PartitionSnapshot, Error> {
        assert!(partition < self.partition_count);
        self.read(|connection| {
            // One read transaction, so the pieces are consistent with each other.
            connection.execute_batch("BEGIN")?;
            let result = (|| {
                {
                    let mut statement = connection.prepare_cached(&format!(
                        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE partition = ?1 AND active = 1"
                    ))?;
                    let rows = statement.query_map(params![partition], instance_from_row)?;
                    for row in rows {
                        instance(row?);
                    }
                }
                let tasks = {
                    let mut statement = connection.prepare_cached(
                        "SELECT task_id, partition, queue, instance_id, payload FROM tasks WHERE partition = ?1",
                    )?;
                    let rows = statement.query_map(params![partition], |row| {
                        Ok(TaskRecord {
                            task_id: row.get(0)?,
                            partition: row.get(1)?,
                            queue: row.get(2)?,
                            instance_id: row.get(3)?,
                            payload: row.get(4)?,
                        })
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()?
                };
                let timers = {
                    let mut statement = connection.prepare_cached(
                        "SELECT partition, instance_id, key, fire_at FROM timers WHERE partition = ?1",
                    )?;
                    let rows = statement.query_map(params![partition], |row| {
                        Ok(TimerRecord {
                            partition: row.get(0)?,
                            instance_id: row.get(1)?,
                            key: row.get(2)?,
                            fire_at: to_u64(row.get(3)?),
                        })
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()?
                };
                let last_seq: i64 = connection.query_row(
                    "SELECT last_seq FROM partitions WHERE partition = ?1",
                    params![partition],
                    |row| row.get(0),
                )?;
                Ok::<_, Error>(PartitionSnapshot {
                    tasks,
                    timers,
                    last_seq: to_u64(last_seq),
                })
            })();
            connection.execute_batch("COMMIT")?;
            result
        })
    }

    fn commit(&self, batches: &[PartitionBatch]) -> Result<Vec<Result<(), Refusal>>, Error> {
        self.write(|connection| {
            let mut first_seqs = self.first_seqs.lock().expect("first seqs lock");
            commit_batches(connection, &mut first_seqs, batches)
        })
    }

    fn try_commit_here(
        &self,
        batches: &[PartitionBatch],
    ) -> Option<Result<Vec<Result<(), Refusal>>, Error>> {
        let writer = match self.writer.try_lock() {
            Ok(writer) => writer,
            Err(TryLockError::WouldBlock) => return None,
            Err(TryLockError::Poisoned(_)) => panic!("writer lock poisoned"),
        };
        Some(self.write_with(writer, |connection| {
            let mut first_seqs = self.first_seqs.lock().expect("first seqs lock");
            commit_batches(connection, &mut first_seqs, batches)
        }))
    }

    fn put_definition(&self, name: &str, source: &str, now: u64) -> Result<u32, Error> {
        self.write(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let latest: Option<u32> = transaction.query_row(
                "SELECT max(version) FROM definitions WHERE name = ?1",
                params![name],
                |row| row.get(0),
            )?;
            let version = latest.unwrap_or(0) + 1;
            transaction.execute(
                "INSERT INTO definitions (name, version, source, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, version, source, to_i64(now)],
            )?;
            transaction.commit()?;
            Ok(version)
        })
    }

    fn definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<DefinitionRecord>, Error> {
        self.read(|connection| {
            let map = |row: &rusqlite::Row<'_>| {
                Ok(DefinitionRecord {
                    name: row.get(0)?,
                    version: row.get(1)?,
                    source: row.get(2)?,
                    created_at: to_u64(row.get(3)?),
                })
            };
            let record = match version {
                Some(version) => connection
                    .prepare_cached(
                        "SELECT name, version, source, created_at FROM definitions WHERE name = ?1 AND version = ?2",
                    )?
                    .query_row(params![name, version], map)
                    .optional()?,
                None => connection
                    .prepare_cached(
                        "SELECT name, version, source, created_at FROM definitions WHERE name = ?1 ORDER BY version DESC LIMIT 1",
                    )?
                    .query_row(params![name], map)
                    .optional()?,
            };
            Ok(record)
        })
    }

    fn definitions(&self) -> Result<Vec<DefinitionRecord>, Error> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT d.name, d.version, d.source, d.created_at FROM definitions d
                 WHERE d.version = (SELECT max(version) FROM definitions WHERE name = d.name) ORDER BY d.name",
            )?;
            let rows = statement.query_map([], |row| {
                Ok(DefinitionRecord {
                    name: row.get(0)?,
                    version: row.get(1)?,
                    source: row.get(2)?,
                    created_at: to_u64(row.get(3)?),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn instance(&self, id: &str) -> Result<Option<InstanceRecord>, Error> {
        self.read(|connection| {
            Ok(connection
                .prepare_cached(&format!(
                    "SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = ?1"
                ))?
                .query_row(params![id], instance_from_row)
                .optional()?)
        })
    }

    fn instances_exist(&self, ids: &[String]) -> Result<Vec<bool>, Error> {
        assert!(ids.len() <= crate::EXISTENCE_CHECK_MAX);
        self.read(|connection| {
            let mut statement =
                connection.prepare_cached("SELECT 1 FROM instances WHERE id = ?1")?;
            ids.iter()
                .map(|id| Ok(statement.exists(params![id])?))
                .collect()
        })
    }

    fn step_outputs(&self, ids: &[String]) -> Result<Vec<Vec<(String, String)>>, Error> {
        assert!(ids.len() <= crate::EXISTENCE_CHECK_MAX);
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT step_id, entry FROM step_outputs WHERE instance_id = ?1 ORDER BY step_id",
            )?;
            ids.iter()
                .map(|id| {
                    let rows =
                        statement.query_map(params![id], |row| Ok((row.get(0)?, row.get(1)?)))?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .collect()
        })
    }

    fn single_writer(&self) -> bool {
        // The data directory is locked by this process (see `lock_data_dir`).
        true
    }

    fn instances(&self, query: &InstanceQuery) -> Result<Vec<InstanceRecord>, Error> {
        self.read(|connection| {
            let (sql, values) = listing_sql(query);
            let mut statement = connection.prepare_cached(&sql)?;
            let rows =
                statement.query_map(rusqlite::params_from_iter(values), instance_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn history(&self, instance_id: &str, partition: u32) -> Result<Vec<EventRecord>, Error> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT e.partition, e.seq, e.epoch, e.instance_id, e.at, e.type, e.payload
                 FROM instances i JOIN events e
                     ON e.partition = i.partition AND e.instance_seq = i.first_seq
                 WHERE i.id = ?1 AND i.partition = ?2 AND e.instance_id = i.id
                 ORDER BY e.seq",
            )?;
            let rows = statement.query_map(params![instance_id, partition], event_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn wal_syncs(&self) -> Option<LatencySnapshot> {
        self.wal_syncs.as_ref().map(|syncs| syncs.snapshot())
    }

    fn events_after(
        &self,
        partition: u32,
        after: u64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, Error> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT partition, seq, epoch, instance_id, at, type, payload FROM events
                 WHERE partition = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows =
                statement.query_map(params![partition, to_i64(after), limit], event_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }
}

#[cfg(test)]
mod tests {
    //! The SQLite-only behaviour; what every backend must do is checked on all of
    //! them in `tests/conformance.rs`.
    use super::*;
    use crate::test_rows::{history_seqs, one_event_each, running};

    /// A batch of partition 0 (epoch 0) holding one event of instance `i`, the one after
    /// `seq_before`, and the instance's row.
    fn one_event_batch(seq_before: u64) -> PartitionBatch {
        one_event_each(seq_before, &["i".to_string()])
    }

    /// A connection beside the store's writer in `dir` that has put an event of
    /// `instance_id` at `seq` of partition 0, in the way of the store's next commit.
    fn event_in_the_way(dir: &Path, seq: u64, instance_id: &str) -> Connection {
        let other = open_connection(&dir.join(DATABASE_FILE), Role::Reader).unwrap();
        other
            .execute(
                "INSERT INTO events (partition, seq, epoch, instance_id, at, type, payload) VALUES (0, ?1, 0, ?2, 0, 't', '{}')",
                params![to_i64(seq), instance_id],
            )
            .unwrap();
        other
    }

    /// Partition 0's log end, as stored.
    fn last_seq(store: &SqliteStore) -> i64 {
        store
            .read(|c| Ok(c.query_row("SELECT last_seq FROM partitions", [], |r| r.get(0))?))
            .unwrap()
    }

    #[test]
    fn second_open_of_a_data_dir_is_refused() {
        // Goal: two processes never share a data directory. Method: open twice in one process
        // (file locks are per open file description, so this exercises the same path).
        let dir = tempfile::tempdir().unwrap();
        let _first = SqliteStore::open(dir.path(), 4).unwrap();
        let second = SqliteStore::open(dir.path(), 4);
        assert!(
            matches!(second, Err(Error::Locked(_))),
            "{:?}",
            second.err()
        );
    }

    #[test]
    fn the_writer_writes_a_commits_wal_frames_together_and_readers_see_each_commit() {
        // Goal: the writer's WAL writes are coalesced (far fewer writes reach the file
        // than SQLite makes), and every commit is on file when it returns: a reader on
        // SQLite's own VFS sees it at once, and so does a fresh open after the writer
        // is gone (no frame was left unwritten). Method: commits of 1 to 300 rows of
        // 1 KiB (one run of frames up to several), a reader counting after each.
        let dir = tempfile::tempdir().unwrap();
        let _store = SqliteStore::open(dir.path(), 1).unwrap();
        let path = dir.path().join("wal.db");
        let mut writer = open_connection(&path, Role::Writer).unwrap();
        writer
            .execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
        let reader = open_connection(&path, Role::Reader).unwrap();
        let count = |connection: &Connection| -> i64 {
            connection
                .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
                .unwrap()
        };
        let [asked, passed] = &crate::sqlite_wal_writes::WRITES;
        let asked_before = asked.load(std::sync::atomic::Ordering::Relaxed);
        let passed_before = passed.load(std::sync::atomic::Ordering::Relaxed);
        let mut rows = 0i64;
        for round in 1..=60i64 {
            let transaction = writer.transaction().unwrap();
            let size = if round % 10 == 0 { 300 } else { round % 7 + 1 };
            for _ in 0..size {
                rows += 1;
                transaction
                    .execute(
                        "INSERT INTO t (k, v) VALUES (?1, ?2)",
                        params![rows, "w".repeat(1024)],
                    )
                    .unwrap();
            }
            transaction.commit().unwrap();
            assert_eq!(count(&reader), rows, "a reader sees commit {round}");
        }
        let asked = asked.load(std::sync::atomic::Ordering::Relaxed) - asked_before;
        let passed = passed.load(std::sync::atomic::Ordering::Relaxed) - passed_before;
        assert!(
            passed * 4 < asked,
            "{passed} writes reached the WAL for {asked} that SQLite made"
        );
        drop(reader);
        std::mem::forget(writer); // as if the process ended without closing
        let after = open_connection(&path, Role::Reader).unwrap();
        assert_eq!(count(&after), rows);
        let integrity: String = after
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
    }

    #[test]
    fn a_commit_that_fails_leaves_nothing_and_the_next_one_commits() {
        // Goal: a group commit that fails midway (here an event whose key is taken)
        // keeps none of its rows, not even the fencing update that ran before the
        // failure, and leaves no transaction open for the next commit. Method: an
        // event row put in the way by another connection, then the same batch twice.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), 1).unwrap();
        let other = event_in_the_way(dir.path(), 1, "x");
        assert!(
            store.commit(&[one_event_batch(0)]).is_err(),
            "the key is taken"
        );
        assert_eq!(last_seq(&store), 0, "the fencing update was rolled back");
        other
            .execute("DELETE FROM events WHERE instance_id = 'x'", [])
            .unwrap();
        assert_eq!(store.commit(&[one_event_batch(0)]).unwrap(), vec![Ok(())]);
        assert_eq!(store.commit(&[one_event_batch(1)]).unwrap(), vec![Ok(())]);
        assert_eq!(last_seq(&store), 2);
    }

    #[test]
    fn a_failed_commit_forgets_the_first_seqs_it_learnt() {
        // Goal: the writer remembers instances' first seqs only as committed: a commit
        // that fails after writing an instance row (its first event at seq 2) leaves
        // nothing that would misfile the events of the instance committed again (first
        // at seq 1). Method: an event row put in the way by another connection, so that
        // the first commit fails at its second event; then the instance's history.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), 1).unwrap();
        let other = event_in_the_way(dir.path(), 2, "z");
        let ids = ["y".to_string(), "x".to_string()];
        assert!(
            store.commit(&[one_event_each(0, &ids)]).is_err(),
            "seq 2 is taken"
        );
        other
            .execute("DELETE FROM events WHERE instance_id = 'z'", [])
            .unwrap();
        let x = ["x".to_string()];
        assert_eq!(
            store.commit(&[one_event_each(0, &x)]).unwrap(),
            vec![Ok(())]
        );
        assert_eq!(
            store.commit(&[one_event_each(1, &x)]).unwrap(),
            vec![Ok(())]
        );
        let seqs: Vec<u64> = store
            .history("x", 0)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
        assert!(store.history("y", 0).unwrap().is_empty());
    }

    #[test]
    fn a_commit_here_waits_for_no_other_write() {
        // Goal: `try_commit_here` commits at once when the writer is free, and when
        // another write holds it returns `None` having written nothing, where `commit`
        // would wait. Method: the writer held by the test while it asks, then freed.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), 1).unwrap();
        let held = store.writer.lock().unwrap();
        assert!(store.try_commit_here(&[one_event_batch(0)]).is_none());
        drop(held);
        assert_eq!(last_seq(&store), 0, "nothing was written");
        let syncs = store.wal_syncs().unwrap().count();
        let committed = store
            .try_commit_here(&[one_event_batch(0)])
            .expect("the writer is free");
        assert_eq!(committed.unwrap(), vec![Ok(())]);
        assert_eq!(last_seq(&store), 1);
        assert!(
            store.wal_syncs().unwrap().count() > syncs,
            "its sync is counted"
        );
    }

    #[test]
    fn a_row_that_keeps_its_status_leaves_the_status_indexes_alone() {
        // Goal: a batch's instance row that keeps its status and activity is written
        // without touching the status and activity indexes (two pages fewer per step),
        // and every index still finds each row as it is, through a start, two steps
        // and an end. Method: the WAL's growth in frames per commit, queries served by
        // each index, and SQLite's integrity check, on a store small enough that each
        // table and index is one page.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), 1).unwrap();
        let record = |status: &str, active: bool, state: &str| InstanceRecord {
            id: "i-1".into(),
            partition: 0,
            definition: "d".into(),
            version: 1,
            status: status.into(),
            active,
            input: "{}".into(),
            output: (!active).then(|| "{\"done\":true}".to_string()),
            error: None,
            created_at: 1,
            updated_at: 2,
            state: state.into(),
        };
        let commit = |record: InstanceRecord| {
            let batch = PartitionBatch {
                partition: 0,
                instances: vec![record],
                ..PartitionBatch::default()
            };
            assert_eq!(store.commit(&[batch]).unwrap(), vec![Ok(())]);
        };
        let wal = dir.path().join(format!("{DATABASE_FILE}-wal"));
        let frames = || std::fs::metadata(&wal).map_or(0, |m| m.len()) / (4096 + 24);
        let ids = |sql: &str| -> Vec<String> {
            store
                .read(|c| {
                    let mut statement = c.prepare(sql)?;
                    let rows = statement.query_map([], |row| row.get(0))?;
                    Ok(rows.collect::<Result<Vec<String>, _>>()?)
                })
                .unwrap()
        };
        let check = |status: &str, active: bool, state: &str| {
            let by_status = format!(
                "SELECT id FROM instances INDEXED BY instances_status_created WHERE status = '{status}'"
            );
            assert_eq!(ids(&by_status), ["i-1"]);
            let active_ids = ids("SELECT id FROM instances INDEXED BY instances_active WHERE partition = 0 AND active = 1");
            assert_eq!(active_ids.len(), usize::from(active));
            assert_eq!(store.instance("i-1").unwrap().unwrap().state, state);
            let integrity: String = store
                .read(|c| Ok(c.query_row("PRAGMA integrity_check", [], |row| row.get(0))?))
                .unwrap();
            assert_eq!(integrity, "ok");
        };

        commit(record("running", true, "started"));
        check("running", true, "started");
        for step in ["step 1", "step 2"] {
            let before = frames();
            commit(record("running", true, step));
            // The partition's row is rewritten with the same bytes (no events), which
            // SQLite does not write either.
            assert_eq!(frames() - before, 1, "the instance's page alone");
            check("running", true, step);
        }
        let before = frames();
        commit(record("completed", false, "ended"));
        assert!(frames() - before > 1, "the status indexes change");
        check("completed", false, "ended");
        assert!(ids("SELECT id FROM instances WHERE status = 'running'").is_empty());
    }

    /// 32 hex digits that look random and are the same on every run.
    fn random_id(n: u64) -> String {
        let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        format!("{:016x}{:016x}", z ^ (z >> 31), n)
    }

    #[test]
    fn the_events_of_instances_in_flight_go_to_few_pages_whatever_their_ids() {
        // Goal: an instance's events are indexed by the seq of its first event, not by
        // its id, so a commit of steps of the latest instances writes few pages even
        // when their ids are random (a client's UUIDs); by id, each event took a page of
        // the index of its own. Method: 5,000 instances with random ids, then one commit
        // of one event for each of the latest 500, counted in WAL frames; and each
        // instance's history, old events and new, found by its id.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), 1).unwrap();
        let ids: Vec<String> = (0..5_000).map(random_id).collect();
        let mut seq = 0;
        for chunk in ids.chunks(500) {
            assert_eq!(
                store.commit(&[one_event_each(seq, chunk)]).unwrap(),
                vec![Ok(())]
            );
            seq += chunk.len() as u64;
        }
        // An empty WAL before the measured commit: its frames are the WAL's length.
        store
            .write(|c| Ok(c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?))
            .unwrap();
        let wal = dir.path().join(format!("{DATABASE_FILE}-wal"));
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        let mut latest = ids[4_500..].to_vec();
        latest.sort();
        assert_eq!(
            store.commit(&[one_event_each(seq, &latest)]).unwrap(),
            vec![Ok(())]
        );
        let written = std::fs::metadata(&wal).unwrap().len() / (4096 + 24);
        // 21 pages here; with the index of events keyed by instance id, 76.
        assert!(
            written <= 40,
            "{written} pages for one event of 500 instances"
        );
        for id in [&ids[0], &ids[4_999], &latest[0]] {
            let history = store.history(id, 0).unwrap();
            let newest = history.len() == 2;
            assert!(
                history.iter().all(|event| &event.instance_id == id),
                "{history:?}"
            );
            assert_eq!(newest, ids[4_500..].contains(id), "{id}: {history:?}");
        }
        assert!(store.history("missing", 0).unwrap().is_empty());
        let integrity: String = store
            .read(|c| Ok(c.query_row("PRAGMA integrity_check", [], |row| row.get(0))?))
            .unwrap();
        assert_eq!(integrity, "ok");
    }

    /// The WAL's frames, counted by the b-tree (table or index) their page belongs to.
    fn wal_frames_by_btree(dir: &Path, store: &SqliteStore) -> HashMap<String, usize> {
        const WAL_HEADER: usize = 32;
        const FRAME_HEADER: usize = 24;
        let wal = std::fs::read(dir.join(format!("{DATABASE_FILE}-wal"))).unwrap();
        let page_size = u32::from_be_bytes(wal[8..12].try_into().unwrap()) as usize;
        let owners: HashMap<u32, String> = store
            .read(|c| {
                let mut statement = c.prepare("SELECT pageno, name FROM dbstat")?;
                let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                Ok(rows.collect::<Result<HashMap<u32, String>, _>>()?)
            })
            .unwrap();
        let mut frames = HashMap::new();
        for frame in wal[WAL_HEADER..].chunks(FRAME_HEADER + page_size) {
            let page = u32::from_be_bytes(frame[..4].try_into().unwrap());
            let owner = owners.get(&page).cloned().unwrap_or_default();
            *frames.entry(owner).or_insert(0) += 1;
        }
        frames
    }

    #[test]
    fn the_instances_started_and_ended_go_to_few_listing_index_pages_whatever_their_ids() {
        // Goal: instances are listed through indexes keyed by creation, so a commit that
        // starts and ends instances writes few of their pages even when the ids are random
        // (a client's UUIDs); keyed by id, each entry took a page of its own. Method: 5,000
        // running instances with random ids, then one commit that starts 250 more and ends
        // the latest 250, counted in WAL frames by b-tree; then the listing, newest first.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), 1).unwrap();
        let started = |ids: &[String], created_at: u64| -> Vec<InstanceRecord> {
            ids.iter()
                .enumerate()
                .map(|(index, id)| InstanceRecord {
                    created_at: created_at + index as u64,
                    ..running(id)
                })
                .collect()
        };
        let ids: Vec<String> = (0..5_000).map(random_id).collect();
        let mut seq = 0;
        for (chunk_index, chunk) in ids.chunks(500).enumerate() {
            let batch = PartitionBatch {
                instances: started(chunk, 1_000 + chunk_index as u64 * 500),
                ..one_event_each(seq, chunk)
            };
            assert_eq!(store.commit(&[batch]).unwrap(), vec![Ok(())]);
            seq += chunk.len() as u64;
        }
        store
            .write(|c| Ok(c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?))
            .unwrap();
        let new: Vec<String> = (5_000..5_250).map(random_id).collect();
        let ending = &ids[4_750..];
        let mut instances = started(&new, 10_000);
        instances.extend(
            started(ending, 1_000 + 4_750)
                .into_iter()
                .map(|row| InstanceRecord {
                    status: "completed".into(),
                    active: false,
                    output: Some("{}".into()),
                    ..row
                }),
        );
        let both: Vec<String> = new.iter().chain(ending).cloned().collect();
        let batch = PartitionBatch {
            instances,
            ..one_event_each(seq, &both)
        };
        assert_eq!(store.commit(&[batch]).unwrap(), vec![Ok(())]);
        let frames = wal_frames_by_btree(dir.path(), &store);
        let listing: usize = [
            "instances_created",
            "instances_status_created",
            "instances_definition_created",
        ]
        .iter()
        .map(|index| frames.get(*index).copied().unwrap_or(0))
        .sum();
        // 30 frames here; with the indexes by (status, id) and (definition, id), 141.
        assert!(listing <= 40, "{listing} frames: {frames:?}");
        let query = |status: Option<&str>| InstanceQuery {
            status: status.map(String::from),
            limit: 3,
            ..InstanceQuery::default()
        };
        let listed = |query: InstanceQuery| -> Vec<String> {
            store
                .instances(&query)
                .unwrap()
                .into_iter()
                .map(|row| row.id)
                .collect()
        };
        assert_eq!(
            listed(query(None)),
            [new[249].clone(), new[248].clone(), new[247].clone()]
        );
        assert_eq!(
            listed(query(Some("completed"))),
            [ids[4_999].clone(), ids[4_998].clone(), ids[4_997].clone()]
        );
        assert_eq!(
            listed(query(Some("running"))),
            [new[249].clone(), new[248].clone(), new[247].clone()]
        );
    }

    #[test]
    fn the_listing_reads_an_index_in_order_whatever_the_filter_and_cursor() {
        // Goal: a page of the listing costs a range of an index, not a sort of every
        // instance that matches (a million completed ones, say). Method: the query plan
        // of each combination of filters, with and without a cursor.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), 1).unwrap();
        for status in [None, Some("running")] {
            for definition in [None, Some("d")] {
                for before in [
                    None,
                    Some(crate::ListCursor {
                        created_at: 5,
                        id: "a".into(),
                    }),
                ] {
                    let query = InstanceQuery {
                        status: status.map(String::from),
                        definition: definition.map(String::from),
                        before,
                        limit: 10,
                    };
                    let (sql, values) = listing_sql(&query);
                    let plan: Vec<String> = store
                        .read(|c| {
                            let mut statement = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                            let rows = statement
                                .query_map(rusqlite::params_from_iter(values), |row| {
                                    row.get::<_, String>(3)
                                })?;
                            Ok(rows.collect::<Result<Vec<_>, _>>()?)
                        })
                        .unwrap();
                    assert_eq!(plan.len(), 1, "{query:?}: {plan:?}");
                    assert!(
                        plan[0].contains("USING INDEX instances_")
                            && plan[0].contains("created")
                            && !plan[0].contains("TEMP B-TREE"),
                        "{query:?}: {plan:?}"
                    );
                    if query.before.is_some() {
                        assert!(
                            plan[0].contains("(created_at,id)<(?,?)"),
                            "{query:?}: {plan:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_store_of_the_third_schema_is_migrated_with_every_history() {
        // Goal: a data directory written before events were indexed by their instance's
        // first seq opens, and every instance's history is found, its old events and the
        // ones committed after. Method: a database made with the first three migrations
        // and rows written as that version did, then opened by the store.
        let dir = tempfile::tempdir().unwrap();
        {
            let mut connection =
                open_connection(&dir.path().join(DATABASE_FILE), Role::Writer).unwrap();
            for migration in &MIGRATIONS[..3] {
                connection.execute_batch(migration).unwrap();
            }
            connection.pragma_update(None, "user_version", 3).unwrap();
            let transaction = connection.transaction().unwrap();
            transaction
                .execute_batch(
                    "INSERT INTO meta (key, value) VALUES ('partition_count', '1');
                     INSERT INTO partitions (partition, last_seq) VALUES (0, 3);
                     INSERT INTO instances (id, partition, definition, version, status, active,
                         input, output, error, created_at, updated_at, state)
                     VALUES ('old-b', 0, 'd', 1, 'running', 1, '{}', NULL, NULL, 1, 1, '{}'),
                            ('old-a', 0, 'd', 1, 'completed', 0, '{}', '{}', NULL, 1, 1, '{}');
                     INSERT INTO events (partition, seq, epoch, instance_id, at, type, payload)
                     VALUES (0, 1, 0, 'old-b', 1, 't', '{}'), (0, 2, 0, 'old-a', 1, 't', '{}'),
                            (0, 3, 0, 'old-b', 1, 't', '{}');",
                )
                .unwrap();
            transaction.commit().unwrap();
        }
        let store = SqliteStore::open(dir.path(), 1).unwrap();
        let seqs = |id: &str| history_seqs(&store, id);
        assert_eq!(seqs("old-b"), [1, 3]);
        assert_eq!(seqs("old-a"), [2]);
        let ids = ["old-b".to_string(), "new".to_string()];
        assert_eq!(
            store.commit(&[one_event_each(3, &ids)]).unwrap(),
            vec![Ok(())]
        );
        assert_eq!(seqs("old-b"), [1, 3, 4]);
        assert_eq!(seqs("new"), [5]);
        assert_eq!(seqs("old-a"), [2]);
        let indexes = |table: &str| -> Vec<String> {
            store
                .read(|c| {
                    let mut statement = c.prepare(
                        "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = ?1
                         ORDER BY name",
                    )?;
                    let rows = statement.query_map([table], |row| row.get(0))?;
                    Ok(rows.collect::<Result<Vec<String>, _>>()?)
                })
                .unwrap()
        };
        assert_eq!(indexes("events"), ["events_instance_seq"]);
        // The fifth migration lists instances through indexes keyed by creation.
        let listed: Vec<String> = store
            .instances(&InstanceQuery {
                limit: 10,
                ..InstanceQuery::default()
            })
            .unwrap()
            .into_iter()
            .map(|row| row.id)
            .collect();
        assert_eq!(listed, ["old-b", "old-a", "new"]);
        assert_eq!(
            indexes("instances"),
            [
                "instances_active",
                "instances_created",
                "instances_definition_created",
                "instances_status_created",
                "sqlite_autoindex_instances_1"
            ]
        );
    }

    #[test]
    fn each_commit_counts_its_wal_sync_in_its_own_store() {
        // Goal: every commit's WAL sync is timed, in the histogram of the store that
        // committed, and only there (the VFS is shared by every store in a process);
        // reads count nothing. Method: two stores in one thread, writes on each in turn.
        let first_dir = tempfile::tempdir().unwrap();
        let second_dir = tempfile::tempdir().unwrap();
        let first = SqliteStore::open(first_dir.path(), 1).unwrap();
        let second = SqliteStore::open(second_dir.path(), 1).unwrap();
        let count = |store: &SqliteStore| store.wal_syncs().expect("timed syncs").count();
        let (first_before, second_before) = (count(&first), count(&second));
        for version in 1..=5u32 {
            assert_eq!(first.put_definition("d", "source", 0).unwrap(), version);
        }
        assert!(first.definition("d", None).unwrap().is_some());
        let first_after = first.wal_syncs().unwrap();
        assert_eq!(first_after.count() - first_before, 5, "one sync per commit");
        assert!(first_after.sum_seconds > 0.0);
        assert_eq!(count(&second), second_before, "the other store's syncs");
        second.put_definition("d", "source", 0).unwrap();
        assert_eq!(count(&second) - second_before, 1);
        assert_eq!(count(&first), first_after.count());
    }

    #[test]
    fn the_page_cache_saves_walks_after_rebalances_and_keeps_every_row() {
        // Goal: the wrapped page cache answers the truncation after a rebalance
        // without walking the cache, and the database reads back exactly what was
        // written (so it dropped no page it needed to keep, and kept none it had to
        // drop). Method: a store opened first installs the wrapper (every SQLite
        // use in this test binary goes through a store); then a connection with a
        // small cache inserts, replaces and deletes rows of random keys in many
        // transactions (page splits, merges and evictions), some rolled back, while
        // a map records what must be there.
        let dir = tempfile::tempdir().unwrap();
        let _store = SqliteStore::open(dir.path(), 1).unwrap();
        assert!(
            crate::sqlite_page_cache::install(),
            "the wrapper is SQLite's page cache"
        );
        let saved_before = crate::sqlite_page_cache::walks_saved();

        let mut connection = open_connection(&dir.path().join("check.db"), Role::Writer).unwrap();
        connection.pragma_update(None, "cache_size", -256).unwrap();
        connection
            .execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID")
            .unwrap();
        let mut expected = std::collections::BTreeMap::new();
        let mut seed: u64 = 0x5eed;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..400 {
            let transaction = connection.transaction().unwrap();
            let mut changes = Vec::new();
            for _ in 0..40 {
                let key = format!("k{:05}", next() % 20_000);
                if next() % 4 == 0 {
                    transaction
                        .execute("DELETE FROM t WHERE k = ?1", params![key])
                        .unwrap();
                    changes.push((key, None));
                } else {
                    let value = "v".repeat((next() % 600) as usize + 1);
                    transaction
                        .execute(
                            "INSERT OR REPLACE INTO t (k, v) VALUES (?1, ?2)",
                            params![key, value],
                        )
                        .unwrap();
                    changes.push((key, Some(value)));
                }
            }
            if round % 7 == 3 {
                transaction.rollback().unwrap();
                continue;
            }
            transaction.commit().unwrap();
            for (key, value) in changes {
                match value {
                    Some(value) => expected.insert(key, value),
                    None => expected.remove(&key),
                };
            }
        }
        let integrity: String = connection
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
        let mut statement = connection.prepare("SELECT k, v FROM t ORDER BY k").unwrap();
        let stored: std::collections::BTreeMap<String, String> = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(stored.len(), expected.len());
        assert!(
            stored == expected,
            "the rows read back differ from the rows written"
        );
        assert!(
            crate::sqlite_page_cache::walks_saved() > saved_before,
            "rebalances parked pages far beyond the end, and the walks that follow were saved"
        );
    }
}
