//! Goal: step outputs survive everything that reads an instance back from the store,
//! whether they are kept inside its stored state (a small state) or stored apart (a
//! state that grew past `STORED_STATE_INLINE_MAX`): a restart, a parked instance woken
//! by a signal, and a rerun, which also deletes the outputs of the steps it runs again.
//!
//! Method: a real engine on a real store (SQLite and PostgreSQL). Each step's input is
//! built from the outputs before it, so a lost or stale output changes what the next
//! task is given; the test acts as the worker and reads the rows from the store.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use weir_engine::{Config, Engine, StartRequest, TaskOffer, TokioClock};
use weir_model::machine::STORED_STATE_INLINE_MAX;
use weir_store::Store;

#[macro_use]
mod common;
use common::{open_store, Backend};

on_both!(
    #[tokio::test(start_paused = true)]
    outputs_come_back_after_a_restart_a_wake_and_a_rerun
);

const CHAIN: &str = r#"
name: chain
steps:
  - id: a
    task: work
    input: { from: input, n: "${ .input.n }" }
  - id: b
    task: work
    input: { from: a, got: "${ .steps.a.output.tag }" }
  - id: nap
    wait: go
  - id: c
    task: work
    input: { from: b, got: "${ .steps.b.output.tag }", a: "${ .steps.a.output.tag }" }
"#;

async fn start_engine(store: &Arc<dyn Store>, clock: &Arc<TokioClock>) -> Engine {
    Engine::start(store.clone(), Config::default(), clock.clone())
        .await
        .unwrap()
}

/// The one task offered on `work`.
async fn one_offer(engine: &Engine) -> TaskOffer {
    let queues = ["work".to_string()];
    let mut offers = engine.poll(&queues, 10, weir_engine::POLL_WAIT_MAX).await;
    assert_eq!(offers.len(), 1, "{offers:?}");
    let extra = engine.poll(&queues, 10, Duration::from_millis(100)).await;
    assert!(extra.is_empty(), "{extra:?}");
    offers.remove(0)
}

/// An output of about `size` bytes, tagged.
fn output(tag: &str, size: usize) -> Value {
    json!({ "tag": tag, "padding": "x".repeat(size) })
}

/// The stored state's JSON and the step outputs stored apart, by step id.
async fn stored(store: &Arc<dyn Store>, id: &str) -> (Value, Vec<String>) {
    let store = store.clone();
    let id = id.to_string();
    tokio::task::spawn_blocking(move || {
        let record = store.instance(&id).unwrap().unwrap();
        let state: Value = serde_json::from_str(&record.state).unwrap();
        let outputs = store.step_outputs(std::slice::from_ref(&id)).unwrap();
        let steps = outputs[0].iter().map(|(step, _)| step.clone()).collect();
        (state, steps)
    })
    .await
    .unwrap()
}

async fn outputs_come_back_after_a_restart_a_wake_and_a_rerun(backend: Backend) {
    let (store, _place) = open_store(backend, 2).await;
    let clock = Arc::new(TokioClock::starting_at(1_000_000));
    let engine = start_engine(&store, &clock).await;
    engine.deploy(CHAIN).await.unwrap();
    // `small` keeps its outputs inside its state; `large` outgrows the bound at `b`.
    let cases = [("small", 10), ("large", STORED_STATE_INLINE_MAX)];
    let mut engine = engine;
    for (id, size) in cases {
        engine
            .start_instance(StartRequest {
                definition: "chain".into(),
                version: None,
                input: json!({ "n": id }),
                id: Some(id.into()),
                restart: None,
                parent: None,
            })
            .await
            .unwrap();
        let a = one_offer(&engine).await;
        assert_eq!(a.input.as_ref(), &json!({ "from": "input", "n": id }));
        // Step `a` completes; after a restart, `b` must get the input built from its output.
        engine
            .complete_task(&a.task_id, &a.lease_token, output(&format!("{id}-a"), size))
            .await
            .unwrap();
        engine.shutdown().await;
        engine = start_engine(&store, &clock).await;
        let b = one_offer(&engine).await;
        assert_eq!(b.step_id, "b");
        assert_eq!(
            b.input.as_ref(),
            &json!({ "from": "a", "got": format!("{id}-a") })
        );
        engine
            .complete_task(&b.task_id, &b.lease_token, output(&format!("{id}-b"), size))
            .await
            .unwrap();
    }
    // Both wait for `go`, parked; the large one's outputs are stored apart by now.
    let (state, apart) = stored(&store, "large").await;
    assert_eq!(state["steps_apart"], json!(true), "{state}");
    assert!(state["context"].get("steps").is_none(), "{state}");
    assert_eq!(apart, ["a", "b"]);
    let (state, apart) = stored(&store, "small").await;
    assert!(state.get("steps_apart").is_none(), "{state}");
    assert_eq!(
        state["context"]["steps"]["a"]["output"]["tag"],
        json!("small-a")
    );
    assert!(apart.is_empty(), "{apart:?}");

    // Woken by the signal, each is read back from the store.
    for (id, size) in cases {
        engine.signal(id, "go", json!({ "go": id })).await.unwrap();
        let c = one_offer(&engine).await;
        assert_eq!(c.instance_id, id);
        assert_eq!(
            c.input.as_ref(),
            &json!({ "from": "b", "got": format!("{id}-b"), "a": format!("{id}-a") })
        );
        engine
            .complete_task(&c.task_id, &c.lease_token, output(&format!("{id}-c"), size))
            .await
            .unwrap();
        let done = engine
            .wait_instance(id, Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.status, "completed");
        assert_eq!(done.output.unwrap()["tag"], json!(format!("{id}-c")));
    }
    assert_eq!(stored(&store, "large").await.1, ["a", "b", "c", "nap"]);

    // A rerun from `b` forgets b, nap and c (their stored outputs too) and keeps a's,
    // also across a restart.
    for (id, _) in cases {
        engine.rerun(id, "test", "b").await.unwrap();
    }
    assert_eq!(stored(&store, "large").await.1, ["a"]);
    engine.shutdown().await;
    let engine = start_engine(&store, &clock).await;
    let queues = ["work".to_string()];
    let mut offers = Vec::new();
    while offers.len() < cases.len() {
        offers.extend(engine.poll(&queues, 10, weir_engine::POLL_WAIT_MAX).await);
    }
    offers.sort_by(|x, y| y.instance_id.cmp(&x.instance_id));
    for ((id, _), b) in cases.into_iter().zip(offers) {
        assert_eq!((b.instance_id.as_str(), b.step_id.as_str()), (id, "b"));
        assert_eq!(
            b.input.as_ref(),
            &json!({ "from": "a", "got": format!("{id}-a") })
        );
        engine
            .complete_task(&b.task_id, &b.lease_token, output(&format!("{id}-b2"), 10))
            .await
            .unwrap();
        engine.signal(id, "go", json!({})).await.unwrap();
        let c = one_offer(&engine).await;
        assert_eq!(c.input.as_ref()["got"], json!(format!("{id}-b2")));
        engine
            .complete_task(&c.task_id, &c.lease_token, json!({ "tag": "end" }))
            .await
            .unwrap();
    }
    common::assert_completed(&engine, &["small".into(), "large".into()]).await;
    engine.shutdown().await;
}
