//! Goal: the command line works against a real server as the README says, and a data
//! directory is held by one server at a time.
//!
//! Method: real `weir` processes (server, CLI commands, example worker) on loopback.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use support::*;

fn weir(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("--server")
        .arg(server)
        .args(args)
        .output()
        .expect("running weir")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn validate_reports_every_problem_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "name: bad\nsteps:\n  - id: a\n    task: q\n    tiemout: 5s\n  - id: a\n    sleep: soon\n",
    )
    .unwrap();
    let output = weir("http://127.0.0.1:1", &["validate", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    let path = file.display().to_string();
    assert!(
        stderr.contains(&format!("{path}:5:5: unknown key `tiemout`")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{path}:6:9: duplicate step id `a`")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{path}:7:12:")), "{stderr}");

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "name: good\nsteps:\n  - id: a\n    sleep: 1s\n").unwrap();
    let output = weir("http://127.0.0.1:1", &["validate", good.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
}

#[test]
fn deploy_start_wait_status_history_list_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), free_port(), &[]);
    let base = server.url();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/order.yaml");

    let output = weir(&base, &["deploy", examples]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("order"),
        "{}",
        text(&output.stdout)
    );

    let _worker = start_worker(
        std::slice::from_ref(&base),
        &[
            "--queues",
            "inventory,payments,shipping,inventory-release,payments-refund",
        ],
    );
    let output = weir(
        &base,
        &[
            "--output",
            "json",
            "start",
            "order",
            "--id",
            "cli-1",
            "--input",
            r#"{"sku": "A-1", "qty": 2}"#,
        ],
    );
    assert!(
        output.status.success(),
        "{}\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    // The example waits for a manager's approval: give it, through `weir tasks`.
    let task = eventually(Duration::from_secs(30), || {
        let listed = weir(
            &base,
            &["--output", "json", "tasks", "list", "--group", "managers"],
        );
        let listed: Value = serde_json::from_slice(&listed.stdout).ok()?;
        listed["tasks"].as_array()?.first().cloned()
    })
    .expect("the approval task appears");
    assert_eq!(task["title"], "Approve order of 2 x A-1");
    let task_id = task["task_id"].as_str().unwrap();
    let table = weir(&base, &["tasks", "list"]);
    assert!(
        text(&table.stdout).contains("Approve order of 2 x A-1"),
        "{}",
        text(&table.stdout)
    );
    let invalid = weir(
        &base,
        &[
            "tasks",
            "complete",
            task_id,
            "--data",
            r#"{"approved": "yes"}"#,
            "--by",
            "ann",
        ],
    );
    assert_eq!(invalid.status.code(), Some(1));
    assert!(
        text(&invalid.stderr).contains("invalid_data"),
        "{}",
        text(&invalid.stderr)
    );
    let done = weir(
        &base,
        &[
            "tasks",
            "complete",
            task_id,
            "--data",
            r#"{"approved": true}"#,
            "--by",
            "ann",
        ],
    );
    assert!(done.status.success(), "{}", text(&done.stderr));
    let instance = eventually(Duration::from_secs(30), || {
        let status = weir(&base, &["--output", "json", "status", "cli-1"]);
        let instance: Value = serde_json::from_slice(&status.stdout).ok()?;
        (instance["status"] == "completed").then_some(instance)
    })
    .expect("the instance completes");
    assert_eq!(instance["output"]["shipment"], "shipping-cli-1");
    assert_eq!(instance["output"]["approved_by"], "ann");

    // `start --wait` follows an instance to its end.
    std::fs::write(
        dir.path().join("quick.yaml"),
        "name: quick\nsteps:\n  - id: a\n    task: inventory\n  - id: b\n    sleep: 100ms\n",
    )
    .unwrap();
    assert!(weir(
        &base,
        &["deploy", dir.path().join("quick.yaml").to_str().unwrap()]
    )
    .status
    .success());
    let waited = weir(&base, &["start", "quick", "--id", "cli-3", "--wait"]);
    assert!(
        waited.status.success(),
        "{}\n{}",
        text(&waited.stdout),
        text(&waited.stderr)
    );

    let history = weir(&base, &["history", "cli-1"]);
    let table = text(&history.stdout);
    for kind in [
        "instance_started",
        "step_completed",
        "timer_fired",
        "instance_completed",
    ] {
        assert!(table.contains(kind), "{table}");
    }
    let list = weir(&base, &["list", "--status", "completed"]);
    assert!(text(&list.stdout).contains("cli-1"));

    // Cancel a running instance: no worker serves this queue.
    std::fs::write(
        dir.path().join("stuck.yaml"),
        "name: stuck\nsteps:\n  - id: a\n    task: nobody\n",
    )
    .unwrap();
    assert!(weir(
        &base,
        &["deploy", dir.path().join("stuck.yaml").to_str().unwrap()]
    )
    .status
    .success());
    assert!(weir(&base, &["start", "stuck", "--id", "cli-2"])
        .status
        .success());
    let cancel = weir(&base, &["cancel", "cli-2"]);
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    let again = weir(&base, &["cancel", "cli-2"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("conflict"),
        "{}",
        text(&again.stderr)
    );

    let missing = weir(&base, &["status", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("not_found"),
        "{}",
        text(&missing.stderr)
    );
    assert!(server.process.terminate(Duration::from_secs(10)));
}

#[test]
fn a_second_server_on_the_same_data_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let first = Server::start(&data_dir, free_port(), &[]);
    let output = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["server", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(&data_dir)
        .output()
        .expect("running a second server");
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("in use by another weir process"),
        "{stderr}"
    );
    // The first server is unharmed.
    assert_eq!(ureq_get(&format!("{}/readyz", first.url())).unwrap().0, 200);
}
