//! Goal: under a chaotic worker, every instance of a saga ends `completed` or
//! `compensated`, no step's completion is applied twice, and compensations run exactly
//! for the steps that completed, in reverse order.
//!
//! Method: the real server and the real example worker with chaos flags (30% retryable
//! failures, 5% non-retryable, stalls past the step timeout, duplicate completions),
//! 2,000 instances of an order workflow with compensations and a parallel step; then
//! every history is checked. It runs on SQLite and on a private PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const INSTANCES: usize = 2000;

const DEFINITION: &str = r#"
name: chaos-order
retry: { max_attempts: 4, backoff: fixed, interval: 20ms, non_retryable: [fatal] }
steps:
  - id: reserve
    task: inventory
    timeout: 1s
    input: { order: "${ .input.n }" }
    compensate:
      task: inventory-release
      input: { reservation: "${ .steps.reserve.output.id }" }
      retry: { max_attempts: 100, backoff: fixed, interval: 20ms }
  - id: charge
    task: payments
    timeout: 1s
    input: { reservation: "${ .steps.reserve.output.id }" }
    compensate:
      task: payments-refund
      input: { charge: "${ .steps.charge.output.id }" }
      retry: { max_attempts: 100, backoff: fixed, interval: 20ms }
  - id: notify
    parallel:
      join: all
      branches:
        - steps: [{ task: email, timeout: 1s, input: { order: "${ .input.n }" } }]
        - steps: [{ task: sms, timeout: 1s }, { set: { texted: true } }]
  - id: ship
    task: shipping
    timeout: 1s
    input: { charge: "${ .steps.charge.output.id }", notified: "${ .steps.notify.output | length }" }
"#;

#[test]
fn a_chaotic_worker_cannot_break_the_saga_on_sqlite() {
    a_chaotic_worker_cannot_break_the_saga(StoreKind::Sqlite);
}

#[test]
fn a_chaotic_worker_cannot_break_the_saga_on_postgres() {
    a_chaotic_worker_cannot_break_the_saga(StoreKind::Postgres);
}

fn a_chaotic_worker_cannot_break_the_saga(kind: StoreKind) {
    let store = TestStore::new(kind);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), free_port(), &store.args());
    let base = server.url();
    let (code, body) = post_raw(
        &format!("{base}/v1/definitions"),
        DEFINITION.as_bytes(),
        "application/yaml",
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");
    let _worker = start_worker(
        std::slice::from_ref(&base),
        &[
            "--queues",
            "inventory,payments,shipping,email,sms,inventory-release,payments-refund",
            "--never-fail-queues",
            "inventory-release,payments-refund",
            "--fail-rate",
            "0.3",
            "--fatal-rate",
            "0.05",
            "--stall-rate",
            "0.01",
            "--stall-ms",
            "1500",
            "--duplicate-rate",
            "0.05",
            "--concurrency",
            "256",
        ],
    );
    let started = Instant::now();
    for n in 0..INSTANCES {
        let body =
            json!({ "definition": "chaos-order", "id": format!("c-{n}"), "input": { "n": n } });
        let (code, answer) = post_json(&format!("{base}/v1/instances"), &body).unwrap();
        assert_eq!(
            code,
            201,
            "{answer}\ndatabase log:\n{}",
            store.database_log_tail()
        );
    }
    let ended = eventually(Duration::from_secs(300), || {
        let completed = list_all(&base, "completed").ok()?;
        let compensated = list_all(&base, "compensated").ok()?;
        (completed.len() + compensated.len() == INSTANCES)
            .then_some((completed.len(), compensated.len()))
    });
    let Some((completed, compensated)) = ended else {
        let mut counts = Vec::new();
        for status in [
            "running",
            "compensating",
            "failed",
            "cancelled",
            "terminated",
        ] {
            counts.push(format!(
                "{status}: {}",
                list_all(&base, status).map(|l| l.len()).unwrap_or(0)
            ));
        }
        panic!(
            "not every instance ended completed or compensated: {}",
            counts.join(", ")
        );
    };
    eprintln!(
        "{completed} completed, {compensated} compensated after {:?}",
        started.elapsed()
    );
    assert!(
        compensated > 0,
        "with 5% fatal failures some instances compensate"
    );
    assert!(completed > 0);

    let mut stalls_refused = 0;
    for n in 0..INSTANCES {
        let id = format!("c-{n}");
        let (_, instance) = ureq_get(&format!("{base}/v1/instances/{id}")).unwrap();
        let (_, history) = ureq_get(&format!("{base}/v1/instances/{id}/history")).unwrap();
        let events = history["events"].as_array().unwrap();
        let completions: Vec<&str> = events
            .iter()
            .filter(|e| e["type"] == "step_completed")
            .map(|e| e["step_id"].as_str().unwrap())
            .collect();
        let main: Vec<&str> = completions
            .iter()
            .copied()
            .filter(|s| !s.contains('~'))
            .collect();
        let undone: Vec<&str> = completions
            .iter()
            .filter_map(|s| s.strip_suffix("~undo"))
            .collect();
        let order = ["reserve", "charge", "notify", "ship"];
        assert_eq!(
            main,
            order[..main.len()],
            "{id}: main steps complete once each, in order"
        );
        match instance["status"].as_str().unwrap() {
            "completed" => {
                assert_eq!(main, order, "{id}");
                assert!(
                    undone.is_empty(),
                    "{id}: nothing is compensated in a completed instance"
                );
            }
            "compensated" => {
                // Only reserve and charge declare compensations.
                let mut expected: Vec<&str> =
                    main.iter().copied().filter(|s| *s != "notify").collect();
                expected.reverse();
                assert_eq!(
                    undone, expected,
                    "{id}: compensations exactly for completed steps, in reverse order"
                );
                assert!(
                    main.len() < 4,
                    "{id}: a compensated instance did not complete every step"
                );
            }
            other => panic!("{id} ended {other}"),
        }
        // Every attempt of a step is scheduled once, numbered in order.
        let mut attempts: std::collections::HashMap<&str, u64> = Default::default();
        for event in events.iter().filter(|e| e["type"] == "step_scheduled") {
            let step = event["step_id"].as_str().unwrap();
            let attempt = event["attempt"].as_u64().unwrap();
            let seen = attempts.entry(step).or_default();
            assert_eq!(attempt, *seen + 1, "{id}: {step} attempts in order");
            *seen = attempt;
        }
        stalls_refused += events
            .iter()
            .filter(|e| e["type"] == "step_failed" && e["error"]["type"] == "timeout")
            .count();
        let _: &Value = &instance;
    }
    eprintln!("{stalls_refused} attempts timed out (stalls)");
}
