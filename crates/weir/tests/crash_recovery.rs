//! Goal: acknowledged work survives `kill -9`: every instance finishes, every step
//! completes exactly once, and outputs flow from step to step.
//!
//! Method: a real server process, a real example worker process, 1,000 instances of a
//! 3-step task workflow started over HTTP while the server is killed with SIGKILL at 5
//! random moments and restarted on the same data directory each time. Starts are
//! retried with the same id (starting is idempotent). Then every history is checked.
//! It runs on SQLite (the data directory) and on a private PostgreSQL (`--store`).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const INSTANCES: usize = 1000;
const KILLS: usize = 5;

const DEFINITION: &str = r#"
name: order
steps:
  - id: reserve
    task: inventory
    input: { order: "${ .input.n }" }
  - id: charge
    task: payments
    input: { reservation: "${ .steps.reserve.output.id }", order: "${ .input.n }" }
  - id: ship
    task: shipping
    input: { charge: "${ .steps.charge.output.id }", reserve_step: "${ .steps.reserve.output.step }" }
output: { shipped: "${ .steps.ship.output.id }", order: "${ .input.n }" }
"#;

#[test]
fn instances_survive_kill_9_and_complete_exactly_once_on_sqlite() {
    instances_survive_kill_9_and_complete_exactly_once(StoreKind::Sqlite);
}

#[test]
fn instances_survive_kill_9_and_complete_exactly_once_on_postgres() {
    instances_survive_kill_9_and_complete_exactly_once(StoreKind::Postgres);
}

fn instances_survive_kill_9_and_complete_exactly_once(kind: StoreKind) {
    let mut random = SplitMix::from_env();
    let store = TestStore::new(kind);

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let port = free_port();
    let mut server = Server::start(&data_dir, port, &store.args());
    let base = server.url();

    let (code, body) = post_raw(
        &format!("{base}/v1/definitions"),
        DEFINITION.as_bytes(),
        "application/yaml",
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");

    let _worker = start_worker(std::slice::from_ref(&base), &["--concurrency", "64"]);

    // Kill moments: random offsets within the expected run, at least 700 ms apart.
    let mut kill_at: Vec<Duration> = (0..KILLS)
        .map(|_| Duration::from_millis(300 + random.next() % 6000))
        .collect();
    kill_at.sort();
    for i in 1..kill_at.len() {
        if kill_at[i] < kill_at[i - 1] + Duration::from_millis(700) {
            kill_at[i] = kill_at[i - 1] + Duration::from_millis(700);
        }
    }
    eprintln!("kills at {kill_at:?}");

    let started_at = Instant::now();
    let mut kills_done = 0;
    let mut next = 0;
    let mut start_retries = 0;
    while next < INSTANCES || kills_done < KILLS {
        if kills_done < KILLS && started_at.elapsed() >= kill_at[kills_done] {
            eprintln!(
                "kill -9 #{} at {:?} after {next} starts",
                kills_done + 1,
                started_at.elapsed()
            );
            server.restart(&store.args());
            kills_done += 1;
            continue;
        }
        if next < INSTANCES {
            let body = json!({ "definition": "order", "id": format!("order-{next}"), "input": { "n": next } });
            match post_json(&format!("{base}/v1/instances"), &body) {
                Ok((201, _)) | Ok((200, _)) => next += 1,
                Ok((code, body)) if code >= 500 => {
                    start_retries += 1;
                    eprintln!("start answered {code}: {body}; retrying");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok((code, body)) => panic!("start answered {code}: {body}"),
                Err(_) => {
                    // The server is down (being restarted): retry the same id.
                    start_retries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // Spread starts over the kill window.
            std::thread::sleep(Duration::from_millis(5));
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!(
        "all started after {:?}, {start_retries} start retries",
        started_at.elapsed()
    );

    let completed = eventually(Duration::from_secs(240), || {
        let completed = list_all(&base, "completed").ok()?;
        (completed.len() == INSTANCES).then_some(completed)
    });
    let Some(completed) = completed else {
        let running = list_all(&base, "running").unwrap_or_default();
        let failed = list_all(&base, "failed").unwrap_or_default();
        panic!(
            "not every instance completed: {} running, {} failed; first running: {:?}",
            running.len(),
            failed.len(),
            running.first()
        );
    };
    eprintln!("all completed after {:?}", started_at.elapsed());

    let mut by_id: HashMap<String, Value> = HashMap::new();
    for instance in completed {
        by_id.insert(instance["id"].as_str().unwrap().to_string(), instance);
    }
    for n in 0..INSTANCES {
        let id = format!("order-{n}");
        let instance = by_id.get(&id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(instance["output"]["order"], json!(n), "{instance}");
        assert_eq!(
            instance["output"]["shipped"],
            json!(format!("shipping-{id}")),
            "{instance}"
        );

        let (code, history) = ureq_get(&format!("{base}/v1/instances/{id}/history")).unwrap();
        assert_eq!(code, 200);
        let events = history["events"].as_array().unwrap();
        let mut seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        let sorted = {
            let mut s = seqs.clone();
            s.sort();
            s.dedup();
            s
        };
        assert_eq!(seqs, sorted, "{id}: seqs strictly increase");
        seqs.clear();
        let completions: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "step_completed")
            .collect();
        let steps: Vec<&str> = completions
            .iter()
            .map(|e| e["step_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            steps,
            ["reserve", "charge", "ship"],
            "{id}: each step completed exactly once, in order"
        );
        assert_eq!(
            events
                .iter()
                .filter(|e| e["type"] == "instance_completed")
                .count(),
            1
        );
        // Outputs flow: each step's scheduled input carries the previous step's output.
        let inputs: HashMap<&str, &Value> = events
            .iter()
            .filter(|e| e["type"] == "step_scheduled")
            .map(|e| (e["step_id"].as_str().unwrap(), &e["input"]))
            .collect();
        assert_eq!(
            inputs["charge"]["reservation"],
            json!(format!("inventory-{id}"))
        );
        assert_eq!(inputs["ship"]["charge"], json!(format!("payments-{id}")));
        assert_eq!(inputs["ship"]["reserve_step"], json!("reserve"));
        assert_eq!(
            completions[1]["output"]["input"]["reservation"],
            json!(format!("inventory-{id}"))
        );
    }

    assert!(
        server.process.terminate(Duration::from_secs(10)),
        "graceful shutdown on SIGTERM"
    );
}
