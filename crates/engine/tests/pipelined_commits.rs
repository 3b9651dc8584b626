//! Goal: a partition builds its next batch while earlier ones commit, and that never
//! weakens "acknowledged means durable": every answer waits for the batch it depends on,
//! and a batch whose predecessor failed is never written.
//!
//! Method: a real engine on a real store (SQLite, and PostgreSQL started by the test)
//! behind a gate that holds every commit until the test opens it, and can fail the next
//! one. Commands sent while a commit is held are built into later batches; what each
//! caller is answered, and what the store holds, is checked once the gate opens.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::json;
use weir_engine::{Engine, StartOutcome, StartRequest};
use weir_store::{
    Announcement, DefinitionRecord, Error, EventRecord, InstanceQuery, InstanceRecord, Lease,
    Membership, PartitionBatch, PartitionSnapshot, Refusal, Store,
};

#[macro_use]
mod common;
use common::{open_store, started_engine, Backend, Place};

/// How long a caller is given to (wrongly) get an answer while its batch cannot commit.
const HELD_FOR: Duration = Duration::from_millis(300);

/// What the gate does with commits.
#[derive(Default)]
struct GateState {
    closed: bool,
    /// Commits waiting at the gate.
    waiting: usize,
    /// The next commit fails (after the gate opens) without reaching the store.
    fail_next: bool,
}

/// A store whose commits wait while the gate is closed.
struct GatedStore {
    inner: Arc<dyn Store>,
    gate: Mutex<GateState>,
    changed: Condvar,
}

impl GatedStore {
    fn close(&self) {
        self.gate.lock().unwrap().closed = true;
    }

    fn open(&self, fail_next: bool) {
        let mut gate = self.gate.lock().unwrap();
        gate.closed = false;
        gate.fail_next = fail_next;
        self.changed.notify_all();
    }

    /// Waits until a commit is held at the gate.
    async fn until_a_commit_waits(&self) {
        for _ in 0..1000 {
            if self.gate.lock().unwrap().waiting > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("no commit reached the gate");
    }
}

impl Store for GatedStore {
    fn commit(&self, batches: &[PartitionBatch]) -> Result<Vec<Result<(), Refusal>>, Error> {
        let mut gate = self.gate.lock().unwrap();
        gate.waiting += 1;
        self.changed.notify_all();
        while gate.closed {
            gate = self.changed.wait(gate).unwrap();
        }
        gate.waiting -= 1;
        if std::mem::take(&mut gate.fail_next) {
            return Err(Error::Io {
                context: "writing the log".into(),
                source: std::io::Error::other("injected failure"),
            });
        }
        drop(gate);
        self.inner.commit(batches)
    }

    fn partition_count(&self) -> u32 {
        self.inner.partition_count()
    }
    fn heartbeat(
        &self,
        node: &Announcement,
        joining: bool,
        now: u64,
        failure_timeout_ms: u64,
    ) -> Result<Membership, Error> {
        self.inner.heartbeat(node, joining, now, failure_timeout_ms)
    }
    fn membership(&self, now: u64, failure_timeout_ms: u64) -> Result<Membership, Error> {
        self.inner.membership(now, failure_timeout_ms)
    }
    fn leave(&self, node_id: &str) -> Result<(), Error> {
        self.inner.leave(node_id)
    }
    fn set_draining(&self, node_id: &str, draining: bool) -> Result<bool, Error> {
        self.inner.set_draining(node_id, draining)
    }
    fn acquire_lease(
        &self,
        partition: u32,
        owner: &str,
        now: u64,
        ttl_ms: u64,
    ) -> Result<Option<Lease>, Error> {
        self.inner.acquire_lease(partition, owner, now, ttl_ms)
    }
    fn renew_leases(
        &self,
        owner: &str,
        leases: &[(u32, u64)],
        now: u64,
        ttl_ms: u64,
    ) -> Result<Vec<u32>, Error> {
        self.inner.renew_leases(owner, leases, now, ttl_ms)
    }
    fn release_leases(&self, owner: &str, leases: &[(u32, u64)]) -> Result<(), Error> {
        self.inner.release_leases(owner, leases)
    }
    fn leases(&self) -> Result<Vec<Lease>, Error> {
        self.inner.leases()
    }
    fn load_partition(
        &self,
        partition: u32,
        instance: &mut dyn FnMut(InstanceRecord),
    ) -> Result<PartitionSnapshot, Error> {
        self.inner.load_partition(partition, instance)
    }
    fn put_definition(&self, name: &str, source: &str, now: u64) -> Result<u32, Error> {
        self.inner.put_definition(name, source, now)
    }
    fn definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<DefinitionRecord>, Error> {
        self.inner.definition(name, version)
    }
    fn definitions(&self) -> Result<Vec<DefinitionRecord>, Error> {
        self.inner.definitions()
    }
    fn instance(&self, id: &str) -> Result<Option<InstanceRecord>, Error> {
        self.inner.instance(id)
    }
    fn instances_exist(&self, ids: &[String]) -> Result<Vec<bool>, Error> {
        self.inner.instances_exist(ids)
    }
    fn step_outputs(&self, ids: &[String]) -> Result<Vec<Vec<(String, String)>>, Error> {
        self.inner.step_outputs(ids)
    }
    fn single_writer(&self) -> bool {
        self.inner.single_writer()
    }
    fn instances(&self, query: &InstanceQuery) -> Result<Vec<InstanceRecord>, Error> {
        self.inner.instances(query)
    }
    fn history(&self, instance_id: &str, partition: u32) -> Result<Vec<EventRecord>, Error> {
        self.inner.history(instance_id, partition)
    }
    fn events_after(
        &self,
        partition: u32,
        after: u64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, Error> {
        self.inner.events_after(partition, after, limit)
    }
}

const DEFINITION: &str = "name: one\nsteps:\n  - id: work\n    task: work\n";

fn start_request(id: &str) -> StartRequest {
    StartRequest {
        definition: "one".into(),
        version: None,
        input: json!({}),
        id: Some(id.into()),
        restart: None,
        parent: None,
    }
}

/// The stored row of instance `id`, read off the runtime (PostgreSQL's client blocks).
async fn stored(store: &Arc<GatedStore>, id: &str) -> Option<InstanceRecord> {
    let store = store.clone();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || store.instance(&id).unwrap())
        .await
        .unwrap()
}

/// An engine on one partition (so that every command goes through one actor) behind a gate.
async fn gated_engine(backend: Backend) -> (Engine, Arc<GatedStore>, Place) {
    let (inner, place) = open_store(backend, 1).await;
    let store = Arc::new(GatedStore {
        inner,
        gate: Mutex::new(GateState::default()),
        changed: Condvar::new(),
    });
    let engine = started_engine(store.clone(), DEFINITION).await;
    (engine, store, place)
}

on_both!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    answers_wait_for_the_batches_they_depend_on,
    batches_behind_a_failed_one_are_not_written
);

/// Goal: answers wait for their own batch even while later batches are built, and an
/// answer that depends on an earlier batch (a repeated start answered "exists") waits
/// for that batch too, so that what it names can be read.
/// Method: the gate holds the first start's commit; a second instance and a repeat of the
/// first are started meanwhile; nothing may be answered until the gate opens, then both
/// instances are stored and the repeat is answered with the stored first instance.
async fn answers_wait_for_the_batches_they_depend_on(backend: Backend) {
    let (engine, store, _place) = gated_engine(backend).await;
    store.close();
    let first = tokio::spawn({
        let engine = engine.clone();
        async move { engine.start_instance(start_request("a")).await }
    });
    store.until_a_commit_waits().await;
    let second = tokio::spawn({
        let engine = engine.clone();
        async move { engine.start_instance(start_request("b")).await }
    });
    let repeat = tokio::spawn({
        let engine = engine.clone();
        async move { engine.start_instance(start_request("a")).await }
    });
    tokio::time::sleep(HELD_FOR).await;
    assert!(
        !first.is_finished(),
        "a start was answered before it was durable"
    );
    assert!(
        !second.is_finished(),
        "a start was answered before it was durable"
    );
    if repeat.is_finished() {
        panic!(
            "a repeated start was answered before the instance it names was durable: {:?}",
            repeat.await.unwrap()
        );
    }
    assert!(stored(&store, "a").await.is_none());

    store.open(false);
    let (view, outcome) = first.await.unwrap().unwrap();
    assert_eq!((view.id.as_str(), outcome), ("a", StartOutcome::Created));
    let (view, outcome) = second.await.unwrap().unwrap();
    assert_eq!((view.id.as_str(), outcome), ("b", StartOutcome::Created));
    let (view, outcome) = repeat.await.unwrap().unwrap();
    assert_eq!((view.id.as_str(), outcome), ("a", StartOutcome::Existing));
    for id in ["a", "b"] {
        let stored = stored(&store, id).await.expect("stored");
        assert_eq!(stored.status, "running", "{id}");
    }
    engine.shutdown().await;
}

/// Goal: when a batch fails, the batches built behind it are never written (they describe
/// states that follow one the store does not hold), and every caller gets an error.
/// Method: the gate holds the first start's commit while two more starts are sent; the
/// gate then fails that commit. No start may succeed and the store must hold none of them.
async fn batches_behind_a_failed_one_are_not_written(backend: Backend) {
    let (engine, store, _place) = gated_engine(backend).await;
    store.close();
    let mut starts = Vec::new();
    for (index, id) in ["a", "b", "c"].into_iter().enumerate() {
        starts.push(tokio::spawn({
            let engine = engine.clone();
            async move { engine.start_instance(start_request(id)).await }
        }));
        if index == 0 {
            store.until_a_commit_waits().await;
        }
    }
    // Time for the later starts to be built into batches and handed to the committer.
    tokio::time::sleep(HELD_FOR).await;
    store.open(true);
    for (start, id) in starts.into_iter().zip(["a", "b", "c"]) {
        let answer = start.await.unwrap();
        assert!(answer.is_err(), "start of {id} succeeded: {answer:?}");
        assert!(stored(&store, id).await.is_none(), "{id} was written");
    }
    engine.shutdown().await;
}
