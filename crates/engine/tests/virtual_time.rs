//! Goal: the engine runs durable timers, backoff and timeouts on its injected clock, so
//! a workflow that sleeps for hours and backs off for minutes finishes in virtual time.
//!
//! Method: a real engine on a real store, tokio's clock paused (it jumps ahead
//! whenever every task waits), the test acting as the worker through the engine's API.
//! It runs on SQLite and on PostgreSQL (`sqlite::<test>`, `postgres::<test>`); the
//! latter keeps partition leases on its own clock, in real time, where the test's
//! 180 s lease never runs out, while timers follow the engine's clock.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use weir_engine::{Config, Engine, StartOutcome, StartRequest, TokioClock};
use weir_model::event::ErrorInfo;

#[macro_use]
mod common;
use common::{assert_completed, open_store, Backend};

on_both!(
    #[tokio::test(start_paused = true)]
    an_hours_long_workflow_runs_in_virtual_time,
    sleeping_instances_are_parked_and_still_answer,
    repeated_starts_answer_with_the_stored_instance,
    a_short_nap_wakes_after_a_restart
);

/// Completes the tasks that polls of `queues` hand out (each waiting up to `wait`)
/// until `count` have come; the ids of their instances, sorted.
async fn complete_offers(
    engine: &Engine,
    queues: &[String],
    count: usize,
    wait: Duration,
) -> Vec<String> {
    let mut done = Vec::new();
    while done.len() < count {
        let offers = poll_until(engine, queues, wait).await;
        assert!(!offers.is_empty(), "the tasks came: {done:?}");
        for offer in offers {
            engine
                .complete_task(&offer.task_id, &offer.lease_token, json!({}))
                .await
                .unwrap();
            done.push(offer.instance_id);
        }
    }
    done.sort();
    done
}

const DEFINITION: &str = r#"
name: slow
steps:
  - id: charge
    task: payments
    timeout: 2m
    retry: { max_attempts: 3, backoff: exponential, interval: 1m, multiplier: 2 }
  - id: wait-a-day
    sleep: 1h
  - id: approve
    wait: approved
    timeout: 3h
    retry: { max_attempts: 1 }
"#;

/// Polls in turns of at most `POLL_WAIT_MAX` until a task comes or `wait` has passed.
async fn poll_until(
    engine: &Engine,
    queues: &[String],
    wait: Duration,
) -> Vec<weir_engine::TaskOffer> {
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        let offers = engine.poll(queues, 1, weir_engine::POLL_WAIT_MAX).await;
        if !offers.is_empty() {
            return offers;
        }
    }
    Vec::new()
}

async fn an_hours_long_workflow_runs_in_virtual_time(backend: Backend) {
    let (store, _place) = open_store(backend, 4).await;
    let clock = Arc::new(TokioClock::starting_at(1_000_000));
    // The worker (this test) holds tasks without heartbeats for minutes: a long task lease
    // keeps the stalled attempt from being offered again before its step timeout.
    // One node: a slow heartbeat keeps the coordinator from ticking thousands of
    // times while virtual time leaps hours ahead.
    let config = Config {
        task_lease: Duration::from_secs(3600),
        cluster: weir_engine::ClusterConfig {
            heartbeat: Duration::from_secs(60),
            failure_timeout: Duration::from_secs(180),
            ..Default::default()
        },
        ..Config::default()
    };
    let engine = Engine::start(store, config, clock).await.unwrap();
    engine.deploy(DEFINITION).await.unwrap();
    let start = |id: &str| StartRequest {
        definition: "slow".into(),
        version: None,
        input: json!({}),
        id: Some(id.into()),
        restart: None,
        parent: None,
    };
    engine.start_instance(start("v-1")).await.unwrap();
    let queues = ["payments".to_string()];

    // Attempt 1 fails; the retry comes a minute (virtual) later.
    let first = engine.poll(&queues, 1, Duration::from_secs(1)).await;
    assert_eq!(first.len(), 1);
    let error = ErrorInfo {
        error_type: "flaky".into(),
        message: "try later".into(),
    };
    // Paused time jumps ahead while the runtime waits for the committer thread, so the
    // wait is measured from before the failure is reported.
    let before = tokio::time::Instant::now();
    engine
        .fail_task(&first[0].task_id, &first[0].lease_token, error, true)
        .await
        .unwrap();
    let second = poll_until(&engine, &queues, Duration::from_secs(120)).await;
    assert_eq!(second.len(), 1, "the retry is offered after its backoff");
    assert_eq!(second[0].attempt, 2);
    let waited = before.elapsed();
    assert!(
        waited >= Duration::from_secs(60),
        "backoff of 1 min, waited {waited:?}"
    );

    // Attempt 2 stalls past its 2 min timeout; attempt 3 comes 2 min after that.
    let third = poll_until(&engine, &queues, Duration::from_secs(6 * 60)).await;
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].attempt, 3);
    let late = engine
        .complete_task(&second[0].task_id, &second[0].lease_token, json!({}))
        .await;
    assert!(late.is_err(), "a completion after the timeout is refused");
    engine
        .complete_task(
            &third[0].task_id,
            &third[0].lease_token,
            json!({"id": "c-1"}),
        )
        .await
        .unwrap();

    // An hour's sleep, then a signal the wait takes; a second instance's wait times out.
    engine.start_instance(start("v-2")).await.unwrap();
    let other = engine.poll(&queues, 1, Duration::from_secs(1)).await;
    engine
        .complete_task(&other[0].task_id, &other[0].lease_token, json!({}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(61 * 60)).await;
    let after_sleep = engine.instance("v-1").await.unwrap().unwrap();
    assert_eq!(after_sleep.status, "running", "it waits for the signal now");
    engine
        .signal("v-1", "approved", json!({"by": "ann"}))
        .await
        .unwrap();
    let done = engine
        .wait_instance("v-1", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, "completed");
    assert_eq!(done.output, Some(json!({"by": "ann"})));

    tokio::time::sleep(Duration::from_secs(5 * 3600)).await;
    let timed_out = engine.instance("v-2").await.unwrap().unwrap();
    assert_eq!(timed_out.status, "failed");
    assert_eq!(timed_out.error.unwrap()["type"], json!("timeout"));

    let history = engine.history("v-1").await.unwrap();
    let types: Vec<&str> = history
        .iter()
        .map(|e| e.event["type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"timer_fired"));
    assert_eq!(
        types
            .iter()
            .filter(|t| **t == "step_retry_scheduled")
            .count(),
        2
    );
    engine.shutdown().await;
}

const NAP: &str = r#"
name: nap
steps:
  - id: sleep
    sleep: 1h
  - id: after
    task: after-nap
"#;

/// Goal: instances waiting only for a timer leave memory (parked) and come back when a
/// command or their timer needs them, also after the partition is loaded again.
/// Method: instances asleep for an hour; a second engine takes the store over (loading
/// parks them); cancel one and pause/resume another while parked; an hour later the
/// others reach their task.
async fn sleeping_instances_are_parked_and_still_answer(backend: Backend) {
    let (store, _place) = open_store(backend, 4).await;
    let clock = Arc::new(TokioClock::starting_at(1_000_000));
    let config = Config {
        cluster: weir_engine::ClusterConfig {
            heartbeat: Duration::from_secs(60),
            failure_timeout: Duration::from_secs(180),
            ..Default::default()
        },
        ..Config::default()
    };
    let first = Engine::start(store.clone(), config.clone(), clock.clone())
        .await
        .unwrap();
    first.deploy(NAP).await.unwrap();
    for n in 0..3 {
        let request = StartRequest {
            definition: "nap".into(),
            version: None,
            input: json!({ "n": n }),
            id: Some(format!("nap-{n}")),
            restart: None,
            parent: None,
        };
        first.start_instance(request).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    first.shutdown().await;
    drop(first);

    let engine = Engine::start(store, config, clock).await.unwrap();
    let cancelled = engine.cancel("nap-0", "test").await.unwrap();
    assert_eq!(cancelled.status, "cancelled");
    assert_eq!(
        engine.pause("nap-1", "test").await.unwrap().status,
        "paused"
    );
    assert_eq!(
        engine.resume("nap-1", "test").await.unwrap().status,
        "running"
    );
    let queues = ["after-nap".to_string()];
    assert!(engine.poll(&queues, 8, Duration::ZERO).await.is_empty());
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let woke = complete_offers(&engine, &queues, 2, Duration::from_secs(600)).await;
    assert_eq!(woke, ["nap-1", "nap-2"]);
    assert_completed(&engine, &woke).await;
    engine.shutdown().await;
}

const QUICK: &str = r#"
name: quick
steps:
  - id: nap
    sleep: 1s
"#;

/// A start of `definition` with the caller's `id`.
fn start_request(definition: &str, id: &str) -> StartRequest {
    StartRequest {
        definition: definition.into(),
        version: None,
        input: json!({ "id": id }),
        id: Some(id.into()),
        restart: None,
        parent: None,
    }
}

/// Goal: a start with the id of a stored instance creates nothing and answers with that
/// instance, also when the partition no longer knows it (ended before a restart), also
/// among new starts in the same batch, and whatever the definitions have become.
/// Method: instances end, the engine is restarted on the store, then the same ids are
/// started again, together with new ones, and with a definition that does not exist;
/// a new version is deployed and a new start gets it (the cached latest version).
async fn repeated_starts_answer_with_the_stored_instance(backend: Backend) {
    let (store, _place) = open_store(backend, 4).await;
    let clock = Arc::new(TokioClock::starting_at(1_000_000));
    let first = Engine::start(store.clone(), Config::default(), clock.clone())
        .await
        .unwrap();
    first.deploy(QUICK).await.unwrap();
    let ids: Vec<String> = (0..6).map(|n| format!("q-{n}")).collect();
    for id in &ids {
        let (view, outcome) = first
            .start_instance(start_request("quick", id))
            .await
            .unwrap();
        assert_eq!((view.version, outcome), (1, StartOutcome::Created));
    }
    assert_completed(&first, &ids).await;
    first.shutdown().await;
    drop(first);

    let engine = Engine::start(store, Config::default(), clock)
        .await
        .unwrap();
    // Old and new ids at once, so that they share the partitions' batches.
    let mut starts = Vec::new();
    for n in 0..12 {
        let engine = engine.clone();
        starts.push(tokio::spawn(async move {
            engine
                .start_instance(start_request("quick", &format!("q-{n}")))
                .await
        }));
    }
    for (n, start) in starts.into_iter().enumerate() {
        let (view, outcome) = start.await.unwrap().unwrap();
        if n < ids.len() {
            assert_eq!(outcome, StartOutcome::Existing, "q-{n}");
            assert_eq!(view.status, "completed", "q-{n}");
            assert_eq!(view.input, json!({ "id": format!("q-{n}") }));
        } else {
            assert_eq!(outcome, StartOutcome::Created, "q-{n}");
        }
    }
    let (view, outcome) = engine
        .start_instance(start_request("no-such-definition", "q-0"))
        .await
        .unwrap();
    assert_eq!(
        (view.status.as_str(), outcome),
        ("completed", StartOutcome::Existing)
    );
    assert!(matches!(
        engine
            .start_instance(start_request("no-such-definition", "fresh"))
            .await,
        Err(weir_engine::Error::NotFound(_))
    ));
    let history = engine.history("q-0").await.unwrap();
    let starts = history
        .iter()
        .filter(|event| event.event["type"] == "instance_started")
        .count();
    assert_eq!(starts, 1, "one start in q-0's history");
    engine.deploy(QUICK).await.unwrap();
    let (view, outcome) = engine
        .start_instance(start_request("quick", "q-new"))
        .await
        .unwrap();
    assert_eq!((view.version, outcome), (2, StartOutcome::Created));
    engine.shutdown().await;
}

const NAPLET: &str = r#"
name: naplet
steps:
  - id: nap
    sleep: 2s
  - id: after
    task: after-naplet
"#;

/// Goal: an instance whose timer is due soon (a nap too short to park it while it
/// runs) is parked when its partition is loaded, and its timer still wakes it.
/// Method: instances start napping for 2 s; the engine stops half a second later and
/// a new engine loads the store; the naps' tasks must come, and the instances end.
async fn a_short_nap_wakes_after_a_restart(backend: Backend) {
    let (store, _place) = open_store(backend, 2).await;
    let clock = Arc::new(TokioClock::starting_at(1_000_000));
    let first = Engine::start(store.clone(), Config::default(), clock.clone())
        .await
        .unwrap();
    first.deploy(NAPLET).await.unwrap();
    let ids: Vec<String> = (0..4).map(|n| format!("naplet-{n}")).collect();
    for id in &ids {
        first
            .start_instance(start_request("naplet", id))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.shutdown().await;
    drop(first);

    let engine = Engine::start(store, Config::default(), clock)
        .await
        .unwrap();
    let queues = ["after-naplet".to_string()];
    let woke = complete_offers(&engine, &queues, ids.len(), Duration::from_secs(60)).await;
    assert_eq!(woke, ids);
    assert_completed(&engine, &ids).await;
    engine.shutdown().await;
}

/// Goal: once a node stops handing out tasks, every poll answers at once, also one
/// that arrives when no poll was open at the moment of the stop (the stop must be
/// remembered, not only announced to the polls open then).
#[tokio::test(start_paused = true)]
async fn polls_after_a_stop_answer_at_once() {
    let (store, _place) = open_store(Backend::Sqlite, 4).await;
    let clock = Arc::new(TokioClock::starting_at(1_000_000));
    let engine = Engine::start(store, Config::default(), clock)
        .await
        .unwrap();
    let queues = vec!["payments".to_string()];
    engine.stop_polls();
    let asked = tokio::time::Instant::now();
    let offers = engine.poll(&queues, 1, weir_engine::POLL_WAIT_MAX).await;
    assert!(offers.is_empty());
    assert_eq!(
        asked.elapsed(),
        Duration::ZERO,
        "a poll after the stop waited in virtual time"
    );
    let waited = engine
        .wait_instance("absent", weir_engine::POLL_WAIT_MAX)
        .await
        .unwrap();
    assert!(waited.is_none());
    assert_eq!(asked.elapsed(), Duration::ZERO);
    engine.shutdown().await;
}
