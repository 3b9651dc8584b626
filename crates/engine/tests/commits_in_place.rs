//! Goal: a batch is committed in place, on the runtime's thread that made it, only when
//! nothing else waits: no message for any partition, and no task leased to a worker but
//! those the batch finishes. Otherwise the committer thread commits it, so that the
//! runtime prepares the next group while it syncs. Either way the batch is durable
//! before it is answered. PostgreSQL's commits never run in place.
//!
//! A request's message is often handed to its partition before the requests that
//! arrived with it have run: the runtime runs a task it has just woken first. Such
//! concurrent requests are grouped, not committed in place one by one.
//!
//! Method: a real engine on a real store (SQLite and PostgreSQL) on a multi-thread
//! runtime; the test is the worker, through the engine's API, and reads the engine's
//! commit counts after each step. What was acknowledged is read back from the store.
//! Concurrent clients are tasks on a runtime of one thread, as the server's default.

use std::time::Duration;

use serde_json::json;
use weir_engine::{CommitStats, Engine, StartRequest, TaskOffer};
use weir_store::InstanceQuery;

#[macro_use]
mod common;
use common::{open_store, started_engine, Backend};

on_both!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_lone_step_commits_in_place_and_one_beside_a_leased_task_does_not
);

/// On one runtime thread, the server's default on two cores.
mod one_runtime_thread {
    use super::{common, concurrent_starts_are_grouped_not_committed_in_place_one_by_one};
    on_both!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
        concurrent_starts_are_grouped_not_committed_in_place_one_by_one
    );
}

const TWO_STEPS: &str = r#"
name: two
steps:
  - id: first
    task: work
  - id: second
    task: work
"#;

async fn start(engine: &Engine, id: &str) {
    start_as(engine, Some(id)).await;
}

/// Starts an instance of `two`, with `id` or one the engine makes.
async fn start_as(engine: &Engine, id: Option<&str>) {
    engine
        .start_instance(StartRequest {
            definition: "two".into(),
            version: None,
            input: json!({}),
            id: id.map(str::to_owned),
            restart: None,
            parent: None,
        })
        .await
        .unwrap();
}

/// One offer of `work`, leased to the test.
async fn take(engine: &Engine) -> TaskOffer {
    let offers = engine
        .poll(&["work".to_string()], 1, Duration::from_secs(10))
        .await;
    assert_eq!(offers.len(), 1, "{offers:?}");
    offers.into_iter().next().unwrap()
}

async fn complete(engine: &Engine, offer: &TaskOffer) {
    engine
        .complete_task(&offer.task_id, &offer.lease_token, json!({ "ok": true }))
        .await
        .unwrap();
}

/// Commits and commits in place since `before`.
fn since(before: &CommitStats, engine: &Engine) -> (u64, u64) {
    let now = engine.commit_stats();
    (
        now.transactions.count() - before.transactions.count(),
        now.in_place - before.in_place,
    )
}

async fn a_lone_step_commits_in_place_and_one_beside_a_leased_task_does_not(backend: Backend) {
    let (store, _place) = open_store(backend, 2).await;
    let engine = started_engine(store, TWO_STEPS).await;
    let in_place = matches!(backend, Backend::Sqlite);

    // Alone: the start, and the completion of the only leased task.
    let before = engine.commit_stats();
    start(&engine, "alone").await;
    assert_eq!(since(&before, &engine), (1, u64::from(in_place)));
    let first = take(&engine).await;
    let before = engine.commit_stats();
    complete(&engine, &first).await;
    assert_eq!(since(&before, &engine), (1, u64::from(in_place)));

    // Beside a leased task: "alone"'s second step stays leased while "beside" runs.
    let held = take(&engine).await;
    start(&engine, "beside").await;
    let other = take(&engine).await;
    let before = engine.commit_stats();
    complete(&engine, &other).await;
    assert_eq!(
        since(&before, &engine),
        (1, 0),
        "a task is leased beside it"
    );
    complete(&engine, &held).await;

    // Whichever thread committed, what was acknowledged is stored.
    let view = engine.instance("alone").await.unwrap().unwrap();
    assert_eq!(view.status, "completed");
    let view = engine.instance("beside").await.unwrap().unwrap();
    assert_eq!(view.status, "running");
    let history = engine.history("beside").await.unwrap();
    let completed = history
        .iter()
        .filter(|e| e.event.to_string().contains("completed"))
        .count();
    assert!(completed >= 1, "{history:?}");
    engine.shutdown().await;
}

/// Clients starting instances at once, each waiting for its start before the next.
const CLIENTS: usize = 32;
/// Starts each client makes.
const STARTS_EACH: usize = 20;

async fn concurrent_starts_are_grouped_not_committed_in_place_one_by_one(backend: Backend) {
    let (store, _place) = open_store(backend, 2).await;
    let engine = started_engine(store, TWO_STEPS).await;

    // Generated ids: no start reads the store first, which would group them anyway.
    let before = engine.commit_stats();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                for _ in 0..STARTS_EACH {
                    start_as(&engine, None).await;
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let starts = (CLIENTS * STARTS_EACH) as u64;
    let (commits, in_place) = since(&before, &engine);
    // One by one, each start would be a commit of its own, made in place.
    assert!(
        commits * 4 <= starts,
        "{commits} commits for {starts} concurrent starts"
    );
    assert!(
        in_place * 10 <= starts,
        "{in_place} of {commits} commits in place for {starts} concurrent starts"
    );

    // Every acknowledged start is stored.
    let stored = engine
        .instances(InstanceQuery {
            definition: Some("two".into()),
            limit: 10_000,
            ..InstanceQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(stored.len() as u64, starts);
    engine.shutdown().await;
}
