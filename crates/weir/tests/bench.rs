//! Goal: `weir bench` runs its workloads against a real server and reports what it did:
//! every instance started and ended as the report says, with ids the bench names in order
//! or at random or the engine makes, and the figures a reader of BENCHMARKS.md relies on
//! are present.
//!
//! Method: a real server and the bench with its example worker process, all on loopback;
//! the bench's JSON is checked against what the server lists afterwards.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::*;

/// Runs `weir bench` against `server` with `args`; its JSON report.
fn bench(server: &Server, args: &[&str]) -> Value {
    let output = run_bench(server, args);
    assert!(
        output.status.success(),
        "bench {args:?} failed: {}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log_tail(40)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "bench {args:?} printed no JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn run_bench(server: &Server, args: &[&str]) -> Output {
    let pid = server.process.pid().expect("the server runs").to_string();
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("--server")
        .arg(server.url())
        .arg("bench")
        .args(args)
        .args(["--server-pid", &pid, "--output", "json"])
        .output()
        .expect("running weir bench")
}

/// The ids of the instances with `status` whose definition is `definition`.
fn ids_of(server: &Server, status: &str, definition: &str) -> Vec<String> {
    list_all(&server.url(), status)
        .unwrap()
        .into_iter()
        .filter(|instance| instance["definition"] == definition)
        .map(|instance| instance["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn seq_and_start_run_with_each_kind_of_ids() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), free_port(), &[]);
    let common = ["--instances", "40", "--concurrency", "4"];

    // seq, ids named by the bench in order: every instance completes its two steps.
    let mut args = common.to_vec();
    args.extend(["--steps", "2", "--worker-concurrency", "8"]);
    let report = bench(&server, &args);
    assert_eq!(report["workload"], "seq");
    assert_eq!(report["ids"], "sequential");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["instances"], 40);
    assert_eq!(report["steps_per_instance"], 2);
    assert!(report["step_completions_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["server_cpu_s"].is_number(), "{report}");
    assert!(
        report["commits"]["count"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(
        report["wal_syncs"]["count"].as_u64().unwrap() >= 1,
        "{report}"
    );
    let named = ids_of(&server, "completed", "bench-seq-2");
    assert_eq!(named.len(), 40, "{named:?}");
    assert!(named.iter().all(|id| id.starts_with("bench-")), "{named:?}");

    // seq again, ids made by the engine, then at random by the bench: forty more each,
    // none with a bench-made ordered id, all of 32 hex digits.
    let mut seen = named.clone();
    for (ids, total) in [("engine", 80), ("random", 120)] {
        let mut more = args.clone();
        more.extend(["--ids", ids]);
        let report = bench(&server, &more);
        assert_eq!(report["ids"], ids);
        assert_eq!(report["failed"], 0, "{report}");
        let all = ids_of(&server, "completed", "bench-seq-2");
        assert_eq!(all.len(), total, "{all:?}");
        let new: Vec<String> = all.into_iter().filter(|id| !seen.contains(id)).collect();
        assert_eq!(new.len(), 40, "{new:?}");
        assert!(
            new.iter()
                .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())),
            "{new:?}"
        );
        seen.extend(new);
    }

    // start, ids made by the engine: every start left an instance running, untouched.
    let mut args = common.to_vec();
    args.extend(["--workload", "start", "--ids", "engine"]);
    let report = bench(&server, &args);
    assert_eq!(report["workload"], "start");
    assert_eq!(report["ids"], "engine");
    assert_eq!(report["pending"], 40, "{report}");
    let queue = report["queue"].as_str().unwrap();
    assert_eq!(ids_of(&server, "running", queue).len(), 40);

    // The in-process worker follows instances by the ids it gives them.
    let output = run_bench(&server, &["--inproc-worker", "--ids", "engine"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--ids engine"), "{stderr}");
}

#[test]
fn seq_runs_through_a_node_joining_the_cluster() {
    // Goal: a run survives partitions moving under it, as in a rolling restart or upgrade:
    // a node answers 503 for a partition that is moving, and the bench asks again (its
    // starts name their instances, so asking again starts nothing twice). Method: one
    // node on a private PostgreSQL runs 8,000 instances; a second node joins once the
    // first hundreds have ended and takes partitions while the run goes on; every
    // instance must end completed, once.
    const INSTANCES: usize = 8000;
    let pg = weir_pgtest::PgServer::shared();
    let store = pg.fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(
        &dir.path().join("first"),
        free_port(),
        &["--store", &store, "--node-id", "first"],
    );
    let pid = first.process.pid().expect("the node runs").to_string();
    let instances = INSTANCES.to_string();
    let mut run = Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("--server")
        .arg(first.url())
        .arg("bench")
        .args([
            "--instances",
            &instances,
            "--steps",
            "3",
            "--concurrency",
            "64",
        ])
        .args([
            "--worker-concurrency",
            "64",
            "--server-pid",
            &pid,
            "--output",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running weir bench");
    eventually(std::time::Duration::from_secs(60), || {
        (list_all(&first.url(), "completed").ok()?.len() >= 200).then_some(())
    })
    .expect("the run ends instances");
    let second = Server::start(
        &dir.path().join("second"),
        free_port(),
        &["--store", &store, "--node-id", "second"],
    );
    eventually(std::time::Duration::from_secs(60), || {
        let (_, status) = ureq_get(&format!("{}/v1/cluster", second.url())).ok()?;
        let held = status["nodes"]
            .as_array()?
            .iter()
            .find(|node| node["node_id"] == "second")?["partitions"]
            .as_array()?
            .len();
        (held > 0).then_some(())
    })
    .expect("the second node takes partitions");
    let ended_early = run.try_wait().unwrap().is_some();
    let output = run.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the run failed: {}\nfirst node:\n{}\nsecond node:\n{}",
        String::from_utf8_lossy(&output.stderr),
        first.log_tail(20),
        second.log_tail(20)
    );
    assert!(
        !ended_early,
        "the run ended before the second node held partitions: it tests nothing"
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["failed"], 0, "{report}");
    let completed = ids_of(&second, "completed", "bench-seq-3");
    let unique: std::collections::HashSet<&String> = completed.iter().collect();
    assert_eq!((completed.len(), unique.len()), (INSTANCES, INSTANCES));
}
