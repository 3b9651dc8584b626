//! Goal: a task is offered again after its partition is loaded, whether it has a stored
//! row or not. A main-lane `task` step's offer is derived from the instance's state, so
//! it writes no row; a lane's task and a human task keep rows, as their offers cannot
//! be derived from the state alone. Rows are deleted when their tasks finish, also
//! rows an earlier version stored for every task.
//!
//! Method: a real engine on a real store (SQLite and PostgreSQL), stopped and started
//! again on the store while tasks of each kind are open; the test acts as the worker
//! and the approver through the engine's API and reads the task rows from the store.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use weir_engine::{Config, Engine, StartRequest, TaskOffer, TokioClock};
use weir_store::{PartitionBatch, Store, TaskRecord};

#[macro_use]
mod common;
use common::{assert_completed, open_store, Backend};

on_both!(
    #[tokio::test(start_paused = true)]
    every_kind_of_task_is_offered_again_after_a_restart,
    a_row_left_for_a_derivable_task_is_offered_once_and_deleted
);

const ROWS: &str = r#"
name: rows
steps:
  - id: fetch
    task: fetch
    input: { n: "${ .input.n }" }
  - id: fan
    parallel:
      join: all
      branches:
        - steps: [{ task: lane, input: { n: "${ .input.n }", lane: a } }]
        - steps: [{ task: lane, input: { n: "${ .input.n }", lane: b } }]
  - id: approve
    human:
      title: "${ \"Approve \" + (.input.n | tostring) }"
      assignee: ann
"#;

const INSTANCES: u64 = 3;

async fn start_engine(store: &Arc<dyn Store>, clock: &Arc<TokioClock>) -> Engine {
    Engine::start(store.clone(), Config::default(), clock.clone())
        .await
        .unwrap()
}

/// Starts an instance of `rows` with id `id` and input `{"n": n}`.
async fn start_rows(engine: &Engine, id: &str, n: u64) {
    engine
        .start_instance(StartRequest {
            definition: "rows".into(),
            version: None,
            input: json!({ "n": n }),
            id: Some(id.into()),
            restart: None,
            parent: None,
        })
        .await
        .unwrap();
}

/// The ids of the stored task rows of every partition, sorted.
async fn stored_task_ids(store: &Arc<dyn Store>) -> Vec<String> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut ids = Vec::new();
        for partition in 0..store.partition_count() {
            let snapshot = store.load_partition(partition, &mut |_| {}).unwrap();
            ids.extend(snapshot.tasks.into_iter().map(|task| task.task_id));
        }
        ids.sort();
        ids
    })
    .await
    .unwrap()
}

/// Polls `queue` until `count` offers have come (it fails if more come), sorted by id.
async fn offers(engine: &Engine, queue: &str, count: usize) -> Vec<TaskOffer> {
    let queues = [queue.to_string()];
    let mut got: Vec<TaskOffer> = Vec::new();
    while got.len() < count {
        let offers = engine.poll(&queues, 100, weir_engine::POLL_WAIT_MAX).await;
        assert!(
            !offers.is_empty(),
            "{count} offers of {queue} came: {got:?}"
        );
        got.extend(offers);
    }
    assert_eq!(got.len(), count, "{got:?}");
    let extra = engine.poll(&queues, 100, Duration::from_millis(100)).await;
    assert!(extra.is_empty(), "no task is offered twice: {extra:?}");
    got.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    got
}

/// What identifies an offer apart from its lease: id, step, attempt and input.
fn described(offers: &[TaskOffer]) -> Vec<(String, String, u32, Value)> {
    offers
        .iter()
        .map(|o| {
            (
                o.task_id.clone(),
                o.step_id.clone(),
                o.attempt,
                o.input.as_ref().clone(),
            )
        })
        .collect()
}

async fn complete_all(engine: &Engine, offers: &[TaskOffer]) {
    for offer in offers {
        engine
            .complete_task(&offer.task_id, &offer.lease_token, json!({ "ok": true }))
            .await
            .unwrap();
    }
}

async fn every_kind_of_task_is_offered_again_after_a_restart(backend: Backend) {
    let (store, _place) = open_store(backend, 2).await;
    let clock = Arc::new(TokioClock::starting_at(1_000_000));
    let ids: Vec<String> = (0..INSTANCES).map(|n| format!("rows-{n}")).collect();

    // Main-lane tasks: offered, no rows.
    let engine = start_engine(&store, &clock).await;
    engine.deploy(ROWS).await.unwrap();
    for (n, id) in ids.iter().enumerate() {
        start_rows(&engine, id, n as u64).await;
    }
    let before = described(&offers(&engine, "fetch", ids.len()).await);
    assert_eq!(before[0].3, json!({ "n": 0 }));
    assert_eq!(stored_task_ids(&store).await, Vec::<String>::new());
    engine.shutdown().await;
    drop(engine);

    // The same offers again, from the states; completing them starts the lanes.
    let engine = start_engine(&store, &clock).await;
    let again = offers(&engine, "fetch", ids.len()).await;
    assert_eq!(described(&again), before);
    complete_all(&engine, &again).await;
    let lanes = described(&offers(&engine, "lane", 2 * ids.len()).await);
    let lane_ids: Vec<String> = lanes.iter().map(|l| l.0.clone()).collect();
    assert_eq!(
        stored_task_ids(&store).await,
        lane_ids,
        "lane tasks have rows"
    );
    engine.shutdown().await;
    drop(engine);

    // Lane tasks again, from their rows; completing them deletes the rows.
    let engine = start_engine(&store, &clock).await;
    let again = offers(&engine, "lane", 2 * ids.len()).await;
    assert_eq!(described(&again), lanes);
    complete_all(&engine, &again).await;
    let mut human = Vec::new();
    for _ in 0..1_000 {
        human = engine.human_tasks(Some("ann"), None);
        if human.len() == ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(human.len(), ids.len(), "{human:?}");
    human.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    let human_ids: Vec<String> = human.iter().map(|h| h.task_id.clone()).collect();
    assert_eq!(
        stored_task_ids(&store).await,
        human_ids,
        "human tasks have rows"
    );
    engine.shutdown().await;
    drop(engine);

    // Human tasks again, from their rows; approving them ends the instances.
    let engine = start_engine(&store, &clock).await;
    let mut again = engine.human_tasks(Some("ann"), None);
    again.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    assert_eq!(described(&again), described(&human));
    for task in &again {
        engine
            .complete_human_task(&task.task_id, "ann", json!({}))
            .await
            .unwrap();
    }
    assert_completed(&engine, &ids).await;
    assert_eq!(stored_task_ids(&store).await, Vec::<String>::new());
    engine.shutdown().await;
}

/// A version before derived offers stored a row for every task: such a row is offered
/// once (not again from the state as well) and deleted when its task completes.
async fn a_row_left_for_a_derivable_task_is_offered_once_and_deleted(backend: Backend) {
    let (store, _place) = open_store(backend, 2).await;
    let clock = Arc::new(TokioClock::starting_at(1_000_000));
    let engine = start_engine(&store, &clock).await;
    engine.deploy(ROWS).await.unwrap();
    start_rows(&engine, "legacy", 7).await;
    let offered = described(&offers(&engine, "fetch", 1).await);
    engine.shutdown().await;
    drop(engine);

    // The row as the earlier version wrote it, in the partition's next batch.
    let (task_id, step_id, attempt, input) = offered[0].clone();
    let writer = store.clone();
    let row_id = task_id.clone();
    tokio::task::spawn_blocking(move || {
        let partition = writer.instance("legacy").unwrap().unwrap().partition;
        let epoch = writer
            .leases()
            .unwrap()
            .into_iter()
            .find(|lease| lease.partition == partition)
            .unwrap()
            .epoch;
        let seq_before = writer
            .load_partition(partition, &mut |_| {})
            .unwrap()
            .last_seq;
        let payload = json!({
            "queue": "fetch",
            "step_id": step_id,
            "attempt": attempt,
            "input": input,
            "idempotency_key": "legacy:fetch",
            "queue_timeout_ms": null,
            "heartbeat_timeout_ms": null,
        });
        let outcomes = writer
            .commit(&[PartitionBatch {
                partition,
                epoch,
                seq_before,
                tasks_put: vec![TaskRecord {
                    task_id: row_id,
                    partition,
                    queue: "fetch".into(),
                    instance_id: "legacy".into(),
                    payload: payload.to_string(),
                }],
                ..PartitionBatch::default()
            }])
            .unwrap();
        assert_eq!(outcomes, vec![Ok(())]);
    })
    .await
    .unwrap();
    assert_eq!(stored_task_ids(&store).await, vec![task_id]);

    let engine = start_engine(&store, &clock).await;
    let again = offers(&engine, "fetch", 1).await;
    assert_eq!(described(&again), offered);
    complete_all(&engine, &again).await;
    offers(&engine, "lane", 2).await;
    // The fetch row is gone; the two lane tasks have theirs.
    let rows = stored_task_ids(&store).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|id| id.contains(":fan")), "{rows:?}");
    engine.shutdown().await;
}
