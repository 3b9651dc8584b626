//! Goal: both backends keep every promise of the `Store` trait the same way: fencing,
//! log contiguity, what survives a reopen, definition versions, listing, membership
//! and leases; and PostgreSQL, which several nodes share, also holds under racing
//! nodes and a server restart.
//!
//! Method: each check is a function over a `Place` (where a store lives: a temporary
//! SQLite directory, or a fresh database on a PostgreSQL server this process started),
//! run once per backend by `on_both!`, which makes `sqlite::<check>` and
//! `postgres::<check>` tests. Time-dependent checks pass the wall clock as `now` and
//! really wait, because PostgreSQL ignores `now` and reads its own clock.

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use weir_pgtest::PgServer;
use weir_store::{
    Announcement, Error, EventRecord, InstanceQuery, InstanceRecord, ListCursor, PartitionBatch,
    PartitionSnapshot, PostgresOptions, PostgresStore, Refusal, SqliteStore, StepOutputRecord,
    Store, TaskRecord, TimerRecord, PARTITION_COUNT_MAX,
};

/// Where a store lives; opening it again reaches the same data.
enum Place {
    Sqlite(tempfile::TempDir),
    Postgres { url: String, _server: Arc<PgServer> },
}

impl Place {
    fn sqlite() -> Place {
        Place::Sqlite(tempfile::tempdir().unwrap())
    }

    fn postgres() -> Place {
        let server = PgServer::shared();
        Place::Postgres {
            url: server.fresh_database(),
            _server: server,
        }
    }

    fn open(&self, partition_count: u32) -> Box<dyn Store> {
        match self {
            Place::Sqlite(dir) => Box::new(SqliteStore::open(dir.path(), partition_count).unwrap()),
            Place::Postgres { url, .. } => {
                Box::new(PostgresStore::connect(url, partition_count).unwrap())
            }
        }
    }

    fn try_open(&self, partition_count: u32) -> Result<Box<dyn Store>, Error> {
        Ok(match self {
            Place::Sqlite(dir) => Box::new(SqliteStore::open(dir.path(), partition_count)?),
            Place::Postgres { url, .. } => Box::new(PostgresStore::connect(url, partition_count)?),
        })
    }
}

/// Makes `sqlite::<check>` and `postgres::<check>` tests of each check.
macro_rules! on_both {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $check() { super::$check(super::Place::sqlite()); })*
        }
        mod postgres {
            $(#[test] fn $check() { super::$check(super::Place::postgres()); })*
        }
    };
}

on_both!(
    stale_epochs_commit_nothing_and_epochs_grow,
    a_batch_must_continue_the_log,
    batches_of_one_partition_apply_in_order,
    committed_state_survives_reopen,
    partition_count_is_fixed_at_creation,
    definitions_get_increasing_versions,
    listing_filters_and_pages_newest_first_then_in_byte_order,
    events_after_pages_the_log,
    membership_follows_heartbeats,
    leases_are_taken_renewed_and_released,
    step_outputs_are_put_replaced_deleted_and_fenced,
);

/// A partition's snapshot with the active instance rows it hands on, gathered.
fn load(store: &dyn Store, partition: u32) -> (PartitionSnapshot, Vec<InstanceRecord>) {
    let mut instances = Vec::new();
    let snapshot = store
        .load_partition(partition, &mut |record| instances.push(record))
        .unwrap();
    (snapshot, instances)
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn event(partition: u32, seq: u64, epoch: u64, instance_id: &str) -> EventRecord {
    EventRecord {
        partition,
        seq,
        epoch,
        instance_id: instance_id.into(),
        at: 5,
        event_type: "t".into(),
        payload: format!("{{\"seq\":{seq}}}"),
    }
}

fn instance(id: &str, partition: u32, status: &str, active: bool) -> InstanceRecord {
    InstanceRecord {
        id: id.into(),
        partition,
        definition: "d".into(),
        version: 1,
        status: status.into(),
        active,
        input: "{}".into(),
        output: None,
        error: None,
        created_at: 1,
        updated_at: 2,
        state: format!("state of {id}: {status}"),
    }
}

fn task(task_id: &str, partition: u32, instance_id: &str) -> TaskRecord {
    TaskRecord {
        task_id: task_id.into(),
        partition,
        queue: "q".into(),
        instance_id: instance_id.into(),
        payload: "{}".into(),
    }
}

fn timer(partition: u32, instance_id: &str, key: &str, fire_at: u64) -> TimerRecord {
    TimerRecord {
        partition,
        instance_id: instance_id.into(),
        key: key.into(),
        fire_at,
    }
}

/// A batch of `events` for instance `i1`, continuing the log from `seq_before`.
fn batch(partition: u32, epoch: u64, seq_before: u64, events: u64) -> PartitionBatch {
    PartitionBatch {
        partition,
        epoch,
        seq_before,
        events: (1..=events)
            .map(|n| event(partition, seq_before + n, epoch, "i1"))
            .collect(),
        ..Default::default()
    }
}

fn stale_epochs_commit_nothing_and_epochs_grow(place: Place) {
    let store = place.open(2);
    let first = store
        .acquire_lease(0, "a", wall_ms(), 300)
        .unwrap()
        .unwrap();
    assert_eq!(first.epoch, 1);
    assert_eq!(
        store.acquire_lease(0, "b", wall_ms(), 300).unwrap(),
        None,
        "held by a"
    );
    std::thread::sleep(Duration::from_millis(400));
    let second = store
        .acquire_lease(0, "b", wall_ms(), 60_000)
        .unwrap()
        .unwrap();
    assert_eq!(second.epoch, 2, "an expired lease is taken, one epoch on");

    let stale = PartitionBatch {
        instances: vec![instance("i1", 0, "stale", true)],
        tasks_put: vec![task("stale-task", 0, "i1")],
        timers_put: vec![timer(0, "i1", "stale-timer", 9)],
        ..batch(0, 1, 0, 1)
    };
    let fresh = PartitionBatch {
        instances: vec![instance("i1", 0, "running", true)],
        ..batch(0, 2, 0, 2)
    };
    let outcomes = store.commit(&[stale.clone(), fresh]).unwrap();
    assert_eq!(
        outcomes,
        vec![
            Err(Refusal::Fenced {
                partition: 0,
                epoch: 1
            }),
            Ok(())
        ]
    );
    let history = store.history("i1", 0).unwrap();
    assert_eq!(
        history.iter().map(|e| (e.seq, e.epoch)).collect::<Vec<_>>(),
        vec![(1, 2), (2, 2)]
    );
    let (snapshot, instances) = load(&*store, 0);
    assert_eq!(instances[0].status, "running");
    assert!(snapshot.tasks.is_empty() && snapshot.timers.is_empty());

    // The stale writer retrying alone, even at the right log end, still commits nothing.
    let retried = PartitionBatch {
        seq_before: 2,
        events: vec![event(0, 3, 1, "i1")],
        ..stale
    };
    assert!(store.commit(&[retried]).unwrap()[0].is_err());
    assert_eq!(load(&*store, 0).0.last_seq, 2);
    assert_eq!(store.history("i1", 0).unwrap().len(), 2);
}

fn a_batch_must_continue_the_log(place: Place) {
    let store = place.open(2);
    let lease = store
        .acquire_lease(1, "a", wall_ms(), 60_000)
        .unwrap()
        .unwrap();
    assert_eq!(
        store.commit(&[batch(1, lease.epoch, 0, 3)]).unwrap(),
        vec![Ok(())]
    );
    // A lost race on seqs: the log is at 3, the writer believes 1, or 0.
    for seq_before in [0, 1, 4] {
        let outcome = store
            .commit(&[batch(1, lease.epoch, seq_before, 1)])
            .unwrap();
        assert_eq!(
            outcome,
            vec![Err(Refusal::Fenced {
                partition: 1,
                epoch: lease.epoch
            })],
            "seq_before {seq_before}"
        );
    }
    // A partition that does not exist is refused like a fenced one.
    assert!(store.commit(&[batch(7, 1, 0, 1)]).unwrap()[0].is_err());
    assert_eq!(load(&*store, 1).0.last_seq, 3);
    assert_eq!(
        store.commit(&[batch(1, lease.epoch, 3, 1)]).unwrap(),
        vec![Ok(())]
    );
    assert_eq!(load(&*store, 1).0.last_seq, 4);
    assert_eq!(load(&*store, 0).0.last_seq, 0);
    assert!(store.commit(&[]).unwrap().is_empty());
}

fn batches_of_one_partition_apply_in_order(place: Place) {
    // Goal: a group commit holding two batches of one partition (and one of another)
    // equals committing them one after the other: the second continues the first's log,
    // sees its rows, and an instance keeps the columns of its first insert.
    let store = place.open(2);
    let p0 = store
        .acquire_lease(0, "a", wall_ms(), 60_000)
        .unwrap()
        .unwrap();
    let p1 = store
        .acquire_lease(1, "a", wall_ms(), 60_000)
        .unwrap()
        .unwrap();
    let first = PartitionBatch {
        instances: vec![instance("i1", 0, "running", true)],
        tasks_put: vec![task("t1", 0, "i1"), task("t-kept", 0, "i1")],
        timers_put: vec![timer(0, "i1", "sleep", 50), timer(0, "i1", "deadline", 60)],
        ..batch(0, p0.epoch, 0, 2)
    };
    let other = PartitionBatch {
        instances: vec![instance("j1", 1, "running", true)],
        tasks_put: vec![task("u1", 1, "j1")],
        ..batch(1, p1.epoch, 0, 1)
    };
    let second = PartitionBatch {
        instances: vec![InstanceRecord {
            definition: "changed".into(),
            version: 7,
            input: "{\"changed\":true}".into(),
            created_at: 99,
            updated_at: 100,
            output: Some("{\"done\":1}".into()),
            ..instance("i1", 0, "completed", false)
        }],
        tasks_delete: vec!["t1".into(), "never-existed".into()],
        tasks_put: vec![task("t2", 0, "i1")],
        timers_delete: vec![("i1".into(), "sleep".into())],
        timers_put: vec![timer(0, "i1", "deadline", 61)],
        ..batch(0, p0.epoch, 2, 1)
    };
    // A third batch re-puts a task the same commit deleted, then deletes one it put.
    let third = PartitionBatch {
        tasks_delete: vec!["t2".into()],
        tasks_put: vec![TaskRecord {
            payload: "{\"again\":true}".into(),
            ..task("t1", 0, "i1")
        }],
        ..batch(0, p0.epoch, 3, 0)
    };
    let outcomes = store.commit(&[first, other, second, third]).unwrap();
    assert_eq!(outcomes, vec![Ok(()), Ok(()), Ok(()), Ok(())]);

    let i1 = store.instance("i1").unwrap().unwrap();
    assert_eq!(
        (
            i1.definition.as_str(),
            i1.version,
            i1.input.as_str(),
            i1.created_at
        ),
        ("d", 1, "{}", 1),
        "fixed columns keep the first insert"
    );
    assert_eq!(
        (
            i1.status.as_str(),
            i1.active,
            i1.updated_at,
            i1.output.as_deref()
        ),
        ("completed", false, 100, Some("{\"done\":1}")),
        "changing columns take the last write"
    );
    let (snapshot, instances) = load(&*store, 0);
    assert_eq!(snapshot.last_seq, 3);
    assert!(instances.is_empty(), "i1 is no longer active");
    let mut tasks: Vec<(String, String)> = snapshot
        .tasks
        .iter()
        .map(|t| (t.task_id.clone(), t.payload.clone()))
        .collect();
    tasks.sort();
    assert_eq!(
        tasks,
        vec![
            ("t-kept".to_string(), "{}".to_string()),
            ("t1".to_string(), "{\"again\":true}".to_string())
        ]
    );
    assert_eq!(snapshot.timers, vec![timer(0, "i1", "deadline", 61)]);
    let (p1_snapshot, p1_instances) = load(&*store, 1);
    assert_eq!(p1_snapshot.last_seq, 1);
    assert_eq!(p1_instances.len(), 1);
    assert_eq!(p1_snapshot.tasks, vec![task("u1", 1, "j1")]);
    assert_eq!(
        store
            .history("i1", 0)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    // A refused batch makes the next batch of its partition in the same commit refused
    // too (it expects the log end the refused one would have left).
    let refused = batch(0, p0.epoch + 1, 3, 1);
    let follower = batch(0, p0.epoch, 4, 1);
    let outcomes = store.commit(&[refused, follower]).unwrap();
    assert!(outcomes.iter().all(|o| o.is_err()), "{outcomes:?}");
    assert_eq!(load(&*store, 0).0.last_seq, 3);
}

fn committed_state_survives_reopen(place: Place) {
    {
        let store = place.open(2);
        let lease = store
            .acquire_lease(1, "a", wall_ms(), 60_000)
            .unwrap()
            .unwrap();
        let batch = PartitionBatch {
            instances: vec![
                instance("i1", 1, "running", true),
                instance("i2", 1, "completed", false),
            ],
            tasks_put: vec![task("i1:a:1", 1, "i1")],
            timers_put: vec![timer(1, "i1", "sleep:0", 99)],
            ..batch(1, lease.epoch, 0, 1)
        };
        assert_eq!(store.commit(&[batch]).unwrap(), vec![Ok(())]);
    }
    let store = place.open(2);
    let (snapshot, instances) = load(&*store, 1);
    assert_eq!(instances, vec![instance("i1", 1, "running", true)]);
    assert_eq!(snapshot.tasks, vec![task("i1:a:1", 1, "i1")]);
    assert_eq!(snapshot.timers, vec![timer(1, "i1", "sleep:0", 99)]);
    assert_eq!(snapshot.last_seq, 1);
    assert_eq!(
        store.instance("i2").unwrap(),
        Some(instance("i2", 1, "completed", false))
    );
    let asked: Vec<String> = ["i2", "absent", "i1", "i1", "nul\0id", ""]
        .map(String::from)
        .to_vec();
    assert_eq!(
        store.instances_exist(&asked).unwrap(),
        vec![true, false, true, true, false, false]
    );
    assert_eq!(store.instances_exist(&[]).unwrap(), Vec::<bool>::new());
    // The epoch continues from the stored one (the same owner may take it at once).
    let lease = store
        .acquire_lease(1, "a", wall_ms(), 60_000)
        .unwrap()
        .unwrap();
    assert_eq!(lease.epoch, 2);
}

fn partition_count_is_fixed_at_creation(place: Place) {
    drop(place.open(4));
    let store = place.open(64);
    assert_eq!(store.partition_count(), 4);
    assert_eq!(store.leases().unwrap().len(), 4);
    drop(store);
    let too_many = place.try_open(PARTITION_COUNT_MAX + 1);
    assert!(
        matches!(too_many, Err(Error::Incompatible(_))),
        "{:?}",
        too_many.err()
    );
}

fn definitions_get_increasing_versions(place: Place) {
    let store = place.open(1);
    assert_eq!(store.put_definition("d", "v1", 1).unwrap(), 1);
    assert_eq!(store.put_definition("d", "v2", 2).unwrap(), 2);
    assert_eq!(store.put_definition("c", "c1", 3).unwrap(), 1);
    let latest = store.definition("d", None).unwrap().unwrap();
    assert_eq!(
        (latest.version, latest.source.as_str(), latest.created_at),
        (2, "v2", 2)
    );
    assert_eq!(
        store.definition("d", Some(1)).unwrap().unwrap().source,
        "v1"
    );
    assert!(store.definition("d", Some(3)).unwrap().is_none());
    assert!(store.definition("e", None).unwrap().is_none());
    assert!(store.definition("d\0", None).unwrap().is_none());
    let all = store.definitions().unwrap();
    assert_eq!(
        all.iter()
            .map(|d| (d.name.as_str(), d.version))
            .collect::<Vec<_>>(),
        vec![("c", 1), ("d", 2)],
        "the latest of each, by name"
    );
}

fn listing_filters_and_pages_newest_first_then_in_byte_order(place: Place) {
    let store = place.open(1);
    let lease = store
        .acquire_lease(0, "a", wall_ms(), 60_000)
        .unwrap()
        .unwrap();
    // Three instances created at the same time, listed by id in byte order (descending),
    // which differs from a linguistic one ("B" < "a", "a-2" < "a1").
    let rows = [
        ("a1", "order", "running", 5),
        ("B", "order", "completed", 7),
        ("a-2", "refund", "running", 5),
        ("b", "order", "failed", 3),
        ("é", "refund", "running", 5),
        ("a10", "order", "running", 9),
    ];
    let batch = PartitionBatch {
        instances: rows
            .iter()
            .map(|(id, definition, status, created_at)| InstanceRecord {
                definition: definition.to_string(),
                created_at: *created_at,
                ..instance(id, 0, status, *status == "running")
            })
            .collect(),
        ..batch(0, lease.epoch, 0, 0)
    };
    assert_eq!(store.commit(&[batch]).unwrap(), vec![Ok(())]);
    let ids = |query: InstanceQuery| -> Vec<String> {
        store
            .instances(&query)
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect()
    };
    let all = InstanceQuery {
        limit: 100,
        ..Default::default()
    };
    assert_eq!(ids(all.clone()), ["a10", "B", "é", "a1", "a-2", "b"]);
    assert_eq!(
        ids(InstanceQuery {
            status: Some("running".into()),
            ..all.clone()
        }),
        ["a10", "é", "a1", "a-2"]
    );
    assert_eq!(
        ids(InstanceQuery {
            definition: Some("order".into()),
            ..all.clone()
        }),
        ["a10", "B", "a1", "b"]
    );
    assert_eq!(
        ids(InstanceQuery {
            status: Some("running".into()),
            definition: Some("refund".into()),
            ..all.clone()
        }),
        ["é", "a-2"]
    );
    // Paging with the cursor visits every row once, whatever the filter.
    for (status, definition) in [
        (None, None),
        (Some("running"), None),
        (None, Some("order")),
        (Some("running"), Some("refund")),
    ] {
        let filtered = InstanceQuery {
            status: status.map(String::from),
            definition: definition.map(String::from),
            ..all.clone()
        };
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = store
                .instances(&InstanceQuery {
                    before: before.clone(),
                    limit: 2,
                    ..filtered.clone()
                })
                .unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 2);
            let last = page.last().unwrap();
            before = Some(ListCursor {
                created_at: last.created_at,
                id: last.id.clone(),
            });
            seen.extend(page.into_iter().map(|i| i.id));
        }
        assert_eq!(seen, ids(filtered), "{status:?} {definition:?}");
    }
    let before = |created_at: u64, id: &str| ListCursor {
        created_at,
        id: id.into(),
    };
    assert_eq!(
        ids(InstanceQuery {
            status: Some("running".into()),
            before: Some(before(5, "a1")),
            limit: 1,
            ..Default::default()
        }),
        ["a-2"]
    );
    assert_eq!(
        ids(InstanceQuery {
            before: Some(before(7, "B")),
            ..all.clone()
        }),
        ["é", "a1", "a-2", "b"],
        "a cursor at a time shared by others passes them by id"
    );
    assert_eq!(
        ids(InstanceQuery {
            before: Some(before(u64::MAX, "a")),
            ..all.clone()
        }),
        ids(all.clone()),
        "a cursor past every storable time"
    );
    assert!(ids(InstanceQuery {
        status: Some("nothing".into()),
        ..all.clone()
    })
    .is_empty());
    // Keys with NUL (which PostgreSQL cannot store) are simply not found, as on SQLite.
    assert!(store.instance("B\0").unwrap().is_none());
    assert!(ids(InstanceQuery {
        status: Some("running\0".into()),
        ..all.clone()
    })
    .is_empty());
    assert!(ids(InstanceQuery {
        definition: Some("\0".into()),
        ..all.clone()
    })
    .is_empty());
    assert_eq!(
        ids(InstanceQuery {
            before: Some(before(5, "a1\0z")),
            limit: 100,
            ..Default::default()
        }),
        ["a1", "a-2", "b"]
    );
    assert_eq!(
        store.instance("é").unwrap().unwrap().definition,
        "refund",
        "non-ASCII ids round-trip"
    );
    assert!(store.instance("missing").unwrap().is_none());
}

fn events_after_pages_the_log(place: Place) {
    let store = place.open(2);
    let lease = store
        .acquire_lease(0, "a", wall_ms(), 60_000)
        .unwrap()
        .unwrap();
    let mut first = batch(0, lease.epoch, 0, 5);
    first.events[1].instance_id = "i2".into();
    first.instances = vec![
        instance("i1", 0, "running", true),
        instance("i2", 0, "running", true),
    ];
    assert_eq!(store.commit(&[first]).unwrap(), vec![Ok(())]);
    let seqs = |after, limit| -> Vec<u64> {
        store
            .events_after(0, after, limit)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect()
    };
    assert_eq!(seqs(0, 100), [1, 2, 3, 4, 5]);
    assert_eq!(seqs(2, 2), [3, 4]);
    assert!(seqs(5, 10).is_empty());
    assert!(store.events_after(1, 0, 10).unwrap().is_empty());
    let events = store.events_after(0, 0, 1).unwrap();
    assert_eq!(events, vec![event(0, 1, lease.epoch, "i1")]);
    assert_eq!(
        store
            .history("i2", 0)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        [2]
    );
    assert!(store.history("i2", 1).unwrap().is_empty());
    assert!(store.history("i2\0", 0).unwrap().is_empty());
}

fn node(id: &str, url: &str, standby: bool) -> Announcement {
    Announcement {
        node_id: id.into(),
        url: url.into(),
        standby,
    }
}

fn membership_follows_heartbeats(place: Place) {
    const LONG: u64 = 60_000;
    const SHORT: u64 = 300;
    let store = place.open(1);
    let before = wall_ms();
    let joined = store
        .heartbeat(&node("b", "http://b", false), true, wall_ms(), LONG)
        .unwrap();
    assert_eq!(joined.members.len(), 1);
    let b = &joined.members[0];
    assert!(b.alive && !b.draining && !b.standby);
    assert_eq!(b.joined_at, b.last_heartbeat);
    assert_eq!(joined.now, b.last_heartbeat, "read at the heartbeat");
    // The store's clock is this machine's (SQLite takes ours; PostgreSQL runs here).
    assert!(joined.now.abs_diff(before) < 5_000);

    let with_a = store
        .heartbeat(&node("a", "http://a", true), true, wall_ms(), LONG)
        .unwrap();
    assert_eq!(
        with_a
            .members
            .iter()
            .map(|m| (m.node_id.as_str(), m.standby))
            .collect::<Vec<_>>(),
        [("a", true), ("b", false)],
        "ordered by node id"
    );

    assert!(store.set_draining("b", true).unwrap());
    assert!(!store.set_draining("nobody", true).unwrap());
    assert!(!store.set_draining("b\0", true).unwrap());
    std::thread::sleep(Duration::from_millis(5));
    let kept = store
        .heartbeat(&node("b", "http://b2", false), false, wall_ms(), LONG)
        .unwrap();
    let b2 = kept.members.iter().find(|m| m.node_id == "b").unwrap();
    assert!(b2.draining, "a plain heartbeat keeps the drain flag");
    assert_eq!(b2.url, "http://b2");
    assert_eq!(b2.joined_at, b.joined_at);
    assert!(b2.last_heartbeat > b.last_heartbeat);
    let rejoined = store
        .heartbeat(&node("b", "http://b2", false), true, wall_ms(), LONG)
        .unwrap();
    let b3 = rejoined.members.iter().find(|m| m.node_id == "b").unwrap();
    assert!(!b3.draining, "joining clears it");
    assert!(b3.joined_at > b.joined_at);

    // Liveness is judged by the store's clock against the last heartbeat.
    std::thread::sleep(Duration::from_millis(SHORT + 100));
    let stale = store.membership(wall_ms(), SHORT).unwrap();
    assert!(stale.members.iter().all(|m| !m.alive), "{stale:?}");
    assert!(stale.now >= b3.last_heartbeat + SHORT);
    let fresh = store
        .heartbeat(&node("a", "http://a", true), false, wall_ms(), SHORT)
        .unwrap();
    let alive: Vec<(&str, bool)> = fresh
        .members
        .iter()
        .map(|m| (m.node_id.as_str(), m.alive))
        .collect();
    assert_eq!(alive, [("a", true), ("b", false)]);
    assert!(store.membership(wall_ms(), LONG).unwrap().members[1].alive);

    store.leave("a").unwrap();
    store.leave("nobody").unwrap();
    let left = store.membership(wall_ms(), LONG).unwrap();
    assert_eq!(
        left.members
            .iter()
            .map(|m| m.node_id.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
    assert!(!store.set_draining("a", true).unwrap(), "a has left");
}

fn leases_are_taken_renewed_and_released(place: Place) {
    const TTL: u64 = 60_000;
    let store = place.open(3);
    let all = store.leases().unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|l| l.owner.is_empty() && l.epoch == 0));

    let start = wall_ms();
    let a = store
        .acquire_lease(2, "a", wall_ms(), TTL)
        .unwrap()
        .unwrap();
    assert_eq!((a.partition, a.owner.as_str(), a.epoch), (2, "a", 1));
    assert!(a.expires_at >= start + TTL - 5_000 && a.expires_at <= wall_ms() + TTL + 5_000);
    assert_eq!(store.acquire_lease(2, "b", wall_ms(), TTL).unwrap(), None);
    // The holder taking it again moves the epoch on (its old batches are fenced).
    let again = store
        .acquire_lease(2, "a", wall_ms(), TTL)
        .unwrap()
        .unwrap();
    assert_eq!(again.epoch, 2);

    std::thread::sleep(Duration::from_millis(5));
    let renewed = store
        .renew_leases(
            "a",
            &[(2, again.epoch), (1, 1), (2, a.epoch)],
            wall_ms(),
            TTL,
        )
        .unwrap();
    assert_eq!(renewed, [2], "only the held lease at its current epoch");
    let after_renew = store.leases().unwrap()[2].clone();
    assert!(after_renew.expires_at > again.expires_at);
    assert!(store
        .renew_leases("b", &[(2, again.epoch)], wall_ms(), TTL)
        .unwrap()
        .is_empty());
    assert!(store
        .renew_leases("a", &[], wall_ms(), TTL)
        .unwrap()
        .is_empty());

    // Releasing with a stale epoch does nothing; with the current one frees it.
    store.release_leases("a", &[(2, a.epoch)]).unwrap();
    assert_eq!(store.leases().unwrap()[2].owner, "a");
    store.release_leases("a", &[(2, again.epoch)]).unwrap();
    let released = store.leases().unwrap()[2].clone();
    assert_eq!(
        (released.owner.as_str(), released.epoch, released.expires_at),
        ("", 2, 0)
    );
    let b = store
        .acquire_lease(2, "b", wall_ms(), 200)
        .unwrap()
        .unwrap();
    assert_eq!(b.epoch, 3, "epochs only grow, across owners");
    // An expired lease is taken; a renewal by its old owner then fails.
    std::thread::sleep(Duration::from_millis(300));
    let c = store
        .acquire_lease(2, "c", wall_ms(), TTL)
        .unwrap()
        .unwrap();
    assert_eq!(c.epoch, 4);
    assert!(store
        .renew_leases("b", &[(2, b.epoch)], wall_ms(), TTL)
        .unwrap()
        .is_empty());
    let leases = store.leases().unwrap();
    assert_eq!(
        leases
            .iter()
            .map(|l| (l.partition, l.owner.as_str(), l.epoch))
            .collect::<Vec<_>>(),
        [(0, "", 0), (1, "", 0), (2, "c", 4)]
    );
}

// ---- PostgreSQL only: a shared store, its clock, racing nodes, a restart. ----

#[test]
fn postgres_uses_its_own_clock_not_the_callers() {
    let place = Place::postgres();
    let store = place.open(1);
    let lease = store.acquire_lease(0, "a", 0, 10_000).unwrap().unwrap();
    let now = wall_ms();
    assert!(
        lease.expires_at.abs_diff(now + 10_000) < 5_000,
        "expiry on the database clock, not 0 + ttl: {lease:?}"
    );
    // A caller whose clock is far ahead cannot take a held lease.
    assert_eq!(store.acquire_lease(0, "b", u64::MAX / 2, 1).unwrap(), None);
    let membership = store
        .heartbeat(&node("a", "http://a", false), true, 1, 60_000)
        .unwrap();
    assert!(membership.now.abs_diff(now) < 5_000);
    assert!(membership.members[0].last_heartbeat.abs_diff(now) < 5_000);
    // A caller whose clock is far behind does not keep a dead node alive.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!store.membership(0, 200).unwrap().members[0].alive);
}

#[test]
fn postgres_nodes_racing_for_a_lease_never_share_an_epoch() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 25;
    let place = Place::postgres();
    let Place::Postgres { url, .. } = &place else {
        unreachable!()
    };
    // Two stores, as two nodes would have, with their own pools.
    let stores: Vec<Arc<PostgresStore>> = (0..2)
        .map(|_| Arc::new(PostgresStore::connect(url, 2).unwrap()))
        .collect();

    // One owner name for all (a node's threads): every attempt succeeds, and the epochs
    // handed out must all differ and be exactly 1..=attempts.
    let barrier = Arc::new(Barrier::new(THREADS));
    let epochs: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let store = stores[thread % 2].clone();
                let barrier = barrier.clone();
                scope.spawn(move || {
                    barrier.wait();
                    (0..ROUNDS)
                        .map(|_| {
                            let lease = store.acquire_lease(0, "racer", 0, 60_000).unwrap();
                            lease
                                .expect("the owner may always take its own lease")
                                .epoch
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let distinct: BTreeSet<u64> = epochs.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        epochs.len(),
        "an epoch was handed out twice"
    );
    assert_eq!(distinct, (1..=(THREADS * ROUNDS) as u64).collect());

    // With a long ttl on a free partition, exactly one of the racers gets it.
    let winners: Vec<(String, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let store = stores[thread % 2].clone();
                let barrier = barrier.clone();
                scope.spawn(move || {
                    let owner = format!("node-{thread}");
                    barrier.wait();
                    store
                        .acquire_lease(1, &owner, 0, 60_000)
                        .unwrap()
                        .map(|lease| (owner, lease.epoch))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(winners.len(), 1, "{winners:?}");
    let lease = stores[0].leases().unwrap()[1].clone();
    assert_eq!((lease.owner.clone(), lease.epoch), winners[0]);
    assert_eq!(lease.epoch, 1);
}

#[test]
fn postgres_a_node_that_lost_its_lease_commits_nothing_more() {
    // Goal: fencing holds between nodes racing on one database: once another node has
    // taken a partition, the old owner's commits are all refused, and the log stays
    // contiguous with epochs that never go back. Method: node a commits one event at a
    // time with a short lease it does not renew; node b takes the partition when it
    // expires and continues the log.
    const B_BATCHES: u64 = 10;
    let place = Place::postgres();
    let Place::Postgres { url, .. } = &place else {
        unreachable!()
    };
    let a = PostgresStore::connect(url, 1).unwrap();
    let b = PostgresStore::connect(url, 1).unwrap();
    let lease_a = a.acquire_lease(0, "a", 0, 200).unwrap().unwrap();
    let (committed_by_a, lease_b) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut seq = 0;
            loop {
                let outcome = a.commit(&[batch(0, lease_a.epoch, seq, 1)]).unwrap();
                if outcome[0].is_err() {
                    // Refused for good: later tries at any log end are refused too.
                    for seq_before in [seq, seq + 1] {
                        let again = a.commit(&[batch(0, lease_a.epoch, seq_before, 1)]);
                        assert!(again.unwrap()[0].is_err());
                    }
                    return seq;
                }
                seq += 1;
            }
        });
        let lease_b = loop {
            if let Some(lease) = b.acquire_lease(0, "b", 0, 60_000).unwrap() {
                break lease;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let from = load(&b, 0).0.last_seq;
        for n in 0..B_BATCHES {
            let outcome = b.commit(&[batch(0, lease_b.epoch, from + n, 1)]).unwrap();
            assert_eq!(outcome, vec![Ok(())]);
        }
        (writer.join().unwrap(), lease_b)
    });
    assert!(committed_by_a > 0);
    assert_eq!(lease_b.epoch, lease_a.epoch + 1);
    let log = b.events_after(0, 0, 100_000).unwrap();
    assert_eq!(
        log.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=committed_by_a + B_BATCHES).collect::<Vec<_>>(),
        "contiguous"
    );
    let epochs: Vec<u64> = log.iter().map(|e| e.epoch).collect();
    assert!(
        epochs.windows(2).all(|w| w[0] <= w[1]),
        "epochs never go back"
    );
    assert_eq!(
        epochs.iter().filter(|&&e| e == lease_a.epoch).count() as u64,
        committed_by_a
    );
}

#[test]
fn postgres_a_stuck_lock_holder_blocks_calls_for_a_bounded_time() {
    // Goal: a session that holds a partition's row lock and stops (a node paused
    // mid-transaction) makes lease and commit calls fail after a bounded wait, not hang;
    // once the lock is gone they succeed. Method: a raw client holds the lock.
    let place = Place::postgres();
    let Place::Postgres { url, .. } = &place else {
        unreachable!()
    };
    let store = PostgresStore::connect(url, 1).unwrap();
    let lease = store.acquire_lease(0, "a", 0, 60_000).unwrap().unwrap();
    let mut holder = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
    let mut stuck = holder.transaction().unwrap();
    stuck
        .execute(
            "SELECT 1 FROM partitions WHERE partition = 0 FOR UPDATE",
            &[],
        )
        .unwrap();
    let started = Instant::now();
    assert!(store.acquire_lease(0, "a", 0, 60_000).is_err());
    assert!(store.commit(&[batch(0, lease.epoch, 0, 1)]).is_err());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    stuck.rollback().unwrap();
    assert_eq!(
        store.commit(&[batch(0, lease.epoch, 0, 1)]).unwrap(),
        vec![Ok(())]
    );
    assert_eq!(
        store
            .acquire_lease(0, "a", 0, 60_000)
            .unwrap()
            .unwrap()
            .epoch,
        lease.epoch + 1
    );
}

#[test]
fn postgres_nodes_starting_together_set_the_schema_up_once() {
    const NODES: u32 = 6;
    let place = Place::postgres();
    let Place::Postgres { url, .. } = &place else {
        unreachable!()
    };
    let barrier = Barrier::new(NODES as usize);
    let counts: Vec<u32> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..NODES)
            .map(|node| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    // Each asks for a different count; the first to set up decides.
                    let store = PostgresStore::connect(url, 4 + node).unwrap();
                    store.partition_count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(counts.windows(2).all(|w| w[0] == w[1]), "{counts:?}");
    let store = PostgresStore::connect(url, 1).unwrap();
    assert_eq!(store.partition_count(), counts[0]);
    assert_eq!(store.leases().unwrap().len(), counts[0] as usize);
}

#[test]
fn postgres_refuses_a_bad_url_or_an_unreachable_server() {
    let bad = PostgresStore::connect("not a url", 1);
    assert!(matches!(bad, Err(Error::Postgres(_))), "{:?}", bad.err());
    // A port nothing listens on (bound, then released): a clear error in bounded time.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = PostgresOptions {
        pool_wait: Duration::from_millis(500),
        ..Default::default()
    };
    let started = Instant::now();
    let unreachable = PostgresStore::connect_with(
        &format!("postgres://postgres@127.0.0.1:{port}/nothing"),
        1,
        &options,
    );
    let message = unreachable
        .err()
        .expect("nothing listens there")
        .to_string();
    assert!(message.contains("connect"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn postgres_store_survives_a_server_restart() {
    // Goal: a server restart fails the calls made while it is down (errors, not panics,
    // in bounded time) and loses nothing committed; once it is back, calls succeed on
    // fresh connections. Method: a private server, stopped as a crash would, started again.
    let mut server = PgServer::start();
    let url = server.fresh_database();
    let options = PostgresOptions {
        pool_size: 4,
        pool_wait: Duration::from_secs(1),
    };
    let store = PostgresStore::connect_with(&url, 2, &options).unwrap();
    let lease = store.acquire_lease(0, "a", 0, 60_000).unwrap().unwrap();
    let committed = PartitionBatch {
        instances: vec![instance("i1", 0, "running", true)],
        tasks_put: vec![task("t1", 0, "i1")],
        ..batch(0, lease.epoch, 0, 2)
    };
    assert_eq!(store.commit(&[committed]).unwrap(), vec![Ok(())]);
    // Several connections are idle in the pool when the server goes.
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| load(&store, 0).0);
        }
    });

    server.stop();
    let started = Instant::now();
    assert!(store.leases().is_err());
    assert!(store.commit(&[batch(0, lease.epoch, 2, 1)]).is_err());
    assert!(store.acquire_lease(1, "a", 0, 60_000).is_err());
    assert!(store
        .heartbeat(&node("a", "http://a", false), true, 0, 1_000)
        .is_err());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "each failing call waits at most about pool_wait"
    );

    server.start_again();
    let snapshot = load(&store, 0).0;
    assert_eq!(
        snapshot.last_seq, 2,
        "the commit before the crash is durable"
    );
    assert_eq!(snapshot.tasks, vec![task("t1", 0, "i1")]);
    assert_eq!(
        store.commit(&[batch(0, lease.epoch, 2, 1)]).unwrap(),
        vec![Ok(())]
    );
    assert_eq!(load(&store, 0).0.last_seq, 3);
    assert_eq!(
        store
            .acquire_lease(1, "a", 0, 60_000)
            .unwrap()
            .unwrap()
            .epoch,
        1
    );
}

/// Rough cost of commits: not a test of behaviour, so ignored by default. Run with
/// `cargo test -p weir-store --release --test conformance -- --ignored --nocapture commit_timing`.
#[test]
#[ignore]
fn commit_timing() {
    const EVENTS: u64 = 1_000;
    const PARTITIONS: u32 = 100;
    for place in [Place::sqlite(), Place::postgres()] {
        let name = match place {
            Place::Sqlite(_) => "sqlite",
            Place::Postgres { .. } => "postgres",
        };
        let store = place.open(PARTITIONS);
        let epochs: Vec<u64> = (0..PARTITIONS)
            .map(|p| {
                store
                    .acquire_lease(p, "a", wall_ms(), 600_000)
                    .unwrap()
                    .unwrap()
                    .epoch
            })
            .collect();
        let mut last_seq = vec![0u64; PARTITIONS as usize];
        let mut one = |p: u32, events: u64| -> PartitionBatch {
            let before = last_seq[p as usize];
            last_seq[p as usize] += events;
            PartitionBatch {
                instances: vec![instance(&format!("i{p}"), p, "running", true)],
                ..batch(p, epochs[p as usize], before, events)
            }
        };

        let started = Instant::now();
        for _ in 0..EVENTS {
            store.commit(&[one(0, 1)]).unwrap();
        }
        let single = started.elapsed();

        let started = Instant::now();
        for _ in 0..10 {
            store.commit(&[one(1, EVENTS / 10)]).unwrap();
        }
        let hundreds = started.elapsed();

        let started = Instant::now();
        for _ in 0..(EVENTS / u64::from(PARTITIONS)) {
            let group: Vec<PartitionBatch> = (0..PARTITIONS).map(|p| one(p, 1)).collect();
            assert!(store.commit(&group).unwrap().iter().all(|o| o.is_ok()));
        }
        let grouped = started.elapsed();
        println!(
            "{name}: {EVENTS} commits of 1 event: {single:?} ({:?} each); \
             10 commits of a {}-event batch: {hundreds:?}; \
             {} group commits of {PARTITIONS} one-event batches: {grouped:?}",
            single / EVENTS as u32,
            EVENTS / 10,
            EVENTS / u64::from(PARTITIONS),
        );
    }
}

#[test]
fn postgres_commits_and_lease_renewals_never_deadlock() {
    // Goal: a node's group commits and its lease renewals, which run at the same time
    // on different connections and change the same partition rows, never deadlock
    // (PostgreSQL would abort one of them, and a failed commit stops partitions).
    // Method: one thread commits groups of batches over varying sets of partitions
    // (as partition actors do), while another renews the leases of all of them, many
    // times over. Updated rows move around the table, so a statement that locks rows
    // in the order it finds them would meet the commit's partition order crosswise.
    const PARTITIONS: u32 = 64;
    const ROUNDS: usize = 400;
    const TTL: u64 = 60_000;
    let place = Place::postgres();
    let Place::Postgres { url, .. } = &place else {
        unreachable!()
    };
    let store = PostgresStore::connect(url, PARTITIONS).unwrap();
    let leases: Vec<(u32, u64)> = (0..PARTITIONS)
        .map(|p| {
            let lease = store.acquire_lease(p, "a", 0, TTL).unwrap().unwrap();
            (p, lease.epoch)
        })
        .collect();
    let start = Barrier::new(2);
    std::thread::scope(|scope| {
        let committer = scope.spawn(|| {
            start.wait();
            let mut log_end = vec![0u64; PARTITIONS as usize];
            for round in 0..ROUNDS {
                // Every partition whose number shares a factor with the round's.
                let stride = 1 + round % 7;
                let batches: Vec<PartitionBatch> = leases
                    .iter()
                    .filter(|(p, _)| (*p as usize + round).is_multiple_of(stride))
                    .map(|&(p, epoch)| {
                        let seq = log_end[p as usize];
                        log_end[p as usize] += 1;
                        batch(p, epoch, seq, 1)
                    })
                    .collect();
                let outcomes = store.commit(&batches).unwrap();
                assert!(outcomes.iter().all(Result::is_ok), "round {round}");
            }
        });
        let renewer = scope.spawn(|| {
            start.wait();
            for round in 0..ROUNDS {
                let mut order = leases.clone();
                order.rotate_left(round % PARTITIONS as usize);
                let renewed = store.renew_leases("a", &order, 0, TTL).unwrap();
                assert_eq!(renewed.len(), PARTITIONS as usize);
            }
        });
        committer.join().unwrap();
        renewer.join().unwrap();
    });
    store.release_leases("a", &leases).unwrap();
    assert!(store.leases().unwrap().iter().all(|l| l.owner.is_empty()));
}

fn output(instance_id: &str, step_id: &str, entry: &str) -> StepOutputRecord {
    StepOutputRecord {
        instance_id: instance_id.into(),
        step_id: step_id.into(),
        entry: entry.into(),
    }
}

/// Goal: step outputs stored apart follow the batch rules of every other row: put,
/// replaced by a later put, deleted (deletes before puts within a batch, batches in
/// order within a commit), never written by a fenced batch, and read back per
/// instance in the order asked, by step id.
fn step_outputs_are_put_replaced_deleted_and_fenced(place: Place) {
    let store = place.open(2);
    let lease = store
        .acquire_lease(0, "a", wall_ms(), 60_000)
        .unwrap()
        .unwrap();
    let first = PartitionBatch {
        instances: vec![instance("i1", 0, "running", true)],
        outputs_put: vec![
            output("i1", "b", r#"{"output":2}"#),
            output("i1", "a", r#"{"output":1}"#),
            output("i2", "a", r#"{"output":"other"}"#),
        ],
        ..batch(0, lease.epoch, 0, 1)
    };
    // The same commit replaces one, deletes one, and puts back one it deletes.
    let second = PartitionBatch {
        outputs_delete: vec![("i1".into(), "b".into()), ("i2".into(), "a".into())],
        outputs_put: vec![
            output("i1", "a", r#"{"output":"again"}"#),
            output("i2", "a", r#"{"output":"back"}"#),
        ],
        ..batch(0, lease.epoch, 1, 1)
    };
    assert_eq!(
        store.commit(&[first, second]).unwrap(),
        vec![Ok(()), Ok(())]
    );
    let ids = ["i2".to_string(), "none".to_string(), "i1".to_string()];
    let pairs = |entries: &[(&str, &str)]| -> Vec<(String, String)> {
        entries
            .iter()
            .map(|(step, entry)| (step.to_string(), entry.to_string()))
            .collect()
    };
    assert_eq!(
        store.step_outputs(&ids).unwrap(),
        vec![
            pairs(&[("a", r#"{"output":"back"}"#)]),
            Vec::new(),
            pairs(&[("a", r#"{"output":"again"}"#)]),
        ]
    );
    // A fenced batch writes no output.
    let stale = PartitionBatch {
        outputs_put: vec![output("i1", "z", "{}")],
        outputs_delete: vec![("i1".into(), "a".into())],
        ..batch(0, lease.epoch + 1, 2, 1)
    };
    assert!(store.commit(&[stale]).unwrap()[0].is_err());
    let third = PartitionBatch {
        outputs_put: vec![output("i1", "c", r#"{"output":3}"#)],
        ..batch(0, lease.epoch, 2, 1)
    };
    assert_eq!(store.commit(&[third]).unwrap(), vec![Ok(())]);
    assert_eq!(
        store.step_outputs(&ids[2..]).unwrap(),
        vec![pairs(&[
            ("a", r#"{"output":"again"}"#),
            ("c", r#"{"output":3}"#)
        ])]
    );
}
