//! Goal: every endpoint answers with the documented status and shape, and bad input
//! is refused with a precise error that changes nothing in the store.
//!
//! Method: a real engine on a real store, served over real HTTP on a loopback port;
//! requests made with reqwest. Every test runs twice, on SQLite (a temporary file)
//! and on PostgreSQL (a private server the test starts and stops): `on_both!` makes
//! `sqlite::<test>` and `postgres::<test>`. Bad-input cases are a table checked by
//! one function that snapshots the store before and after.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use weir_engine::{Config, Engine, TokioClock};
use weir_store::{InstanceQuery, Store};

// The stores and the both-stores macro are the engine tests' own: one copy.
#[path = "../../engine/tests/common/mod.rs"]
#[macro_use]
mod common;
use common::{open_store, Backend, Place};

on_both!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    every_endpoint_and_its_errors,
    http_and_sleep_steps_run_for_real,
    recovery_operations_signals_and_compensation,
    human_tasks_are_listed_validated_and_completed,
    child_workflows_report_to_their_parent_and_are_cancelled_with_it,
    completions_are_taken_in_batches,
    completions_hand_back_the_next_task,
    metrics_count_group_commits_and_wal_syncs,
);

struct Harness {
    base: String,
    client: reqwest::Client,
    engine: Engine,
    store: Arc<dyn Store>,
    server: tokio::task::JoinHandle<()>,
    /// Last: the data outlives the store that uses it.
    _place: Place,
}

impl Harness {
    async fn start(backend: Backend) -> Harness {
        let (store, place) = open_store(backend, 8).await;
        let config = Config {
            task_lease: Duration::from_secs(30),
            ..Config::default()
        };
        let engine = Engine::start(store.clone(), config, Arc::new(TokioClock::new()))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let limits = weir_api::Limits {
            body_size_max: 64 * 1024,
            definition_size_max: 64 * 1024,
        };
        let server = tokio::spawn({
            let engine = engine.clone();
            async move {
                weir_api::serve(listener, engine, limits, std::future::pending())
                    .await
                    .unwrap();
            }
        });
        Harness {
            base,
            client: reqwest::Client::new(),
            engine,
            store,
            server,
            _place: place,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<(&str, Vec<u8>)>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method.parse().unwrap(), url);
        if let Some((content_type, bytes)) = body {
            request = request.header("content-type", content_type).body(bytes);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(
            "POST",
            path,
            Some(("application/json", body.to_string().into_bytes())),
        )
        .await
    }

    async fn deploy(&self, yaml: &str) -> (u16, Value) {
        self.call(
            "POST",
            "/v1/definitions",
            Some(("application/yaml", yaml.as_bytes().to_vec())),
        )
        .await
    }

    /// Everything the store holds that a request could change.
    async fn snapshot(&self) -> String {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = String::new();
            for d in store.definitions().unwrap() {
                out.push_str(&format!("def {} {}\n", d.name, d.version));
            }
            let instances = store
                .instances(&InstanceQuery {
                    limit: 10_000,
                    ..InstanceQuery::default()
                })
                .unwrap();
            for i in instances {
                out.push_str(&format!(
                    "inst {} {} {} {:?}\n",
                    i.id, i.status, i.state, i.output
                ));
            }
            for partition in 0..store.partition_count() {
                let snapshot = store.load_partition(partition, &mut |_| {}).unwrap();
                out.push_str(&format!(
                    "p{partition} seq {} tasks {}\n",
                    snapshot.last_seq,
                    snapshot.tasks.len()
                ));
            }
            out
        })
        .await
        .unwrap()
    }

    async fn stop(self) {
        self.server.abort();
        self.engine.shutdown().await;
    }
}

const ORDER: &str = r#"
name: order
steps:
  - id: reserve
    task: inventory
    input: { sku: "${ .input.sku }" }
  - id: charge
    task: payments
    input: { reservation: "${ .steps.reserve.output.id }" }
    retry: { max_attempts: 2, backoff: fixed, interval: 10ms }
"#;

/// Checks one bad request: status, error code, optional pointer, and that nothing changed.
async fn check_refused(
    h: &Harness,
    method: &str,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
    status: u16,
    code: &str,
) -> Value {
    let before = h.snapshot().await;
    let (got_status, got) = h.call(method, path, body).await;
    assert_eq!(got_status, status, "{method} {path}: {got}");
    assert_eq!(got["error"]["code"], json!(code), "{method} {path}: {got}");
    assert!(got["error"]["message"].is_string(), "{got}");
    assert_eq!(
        h.snapshot().await,
        before,
        "{method} {path} changed the store"
    );
    got
}

fn json_body(value: &str) -> Option<(&'static str, Vec<u8>)> {
    Some(("application/json", value.as_bytes().to_vec()))
}

async fn every_endpoint_and_its_errors(backend: Backend) {
    let h = Harness::start(backend).await;

    // Health.
    assert_eq!(h.get("/healthz").await.0, 200);
    let (status, ready) = h.get("/readyz").await;
    assert_eq!((status, ready["partitions"].clone()), (200, json!(8)));

    // Definitions: deploy, versions, get, list.
    assert_eq!(
        h.deploy(ORDER).await,
        (201, json!({"name": "order", "version": 1}))
    );
    assert_eq!(
        h.deploy(ORDER).await,
        (201, json!({"name": "order", "version": 2}))
    );
    let (status, listed) = h.get("/v1/definitions").await;
    assert_eq!(status, 200);
    assert_eq!(listed["definitions"][0]["version"], json!(2));
    let (status, one) = h.get("/v1/definitions/order?version=1").await;
    assert_eq!((status, one["version"].clone()), (200, json!(1)));
    assert!(one["source"].as_str().unwrap().contains("reserve"));

    // Instances: start, idempotent start, get, list with cursor.
    let (status, started) = h
        .post(
            "/v1/instances",
            json!({"definition": "order", "id": "o-1", "input": {"sku": "A"}}),
        )
        .await;
    assert_eq!(
        (status, started["id"].clone(), started["status"].clone()),
        (201, json!("o-1"), json!("running"))
    );
    let (status, again) = h
        .post(
            "/v1/instances",
            json!({"definition": "order", "id": "o-1", "input": {"sku": "other"}}),
        )
        .await;
    assert_eq!(
        (status, again["input"].clone()),
        (200, json!({"sku": "A"})),
        "same instance, nothing started"
    );
    let (status, generated) = h
        .post(
            "/v1/instances",
            json!({"definition": "order", "version": 1}),
        )
        .await;
    assert_eq!((status, generated["version"].clone()), (201, json!(1)));
    let (status, got) = h.get("/v1/instances/o-1").await;
    assert_eq!(status, 200);
    for key in [
        "id",
        "definition",
        "version",
        "status",
        "input",
        "output",
        "error",
        "created_at",
        "updated_at",
    ] {
        assert!(got.get(key).is_some(), "missing {key}: {got}");
    }
    let (_, page) = h.get("/v1/instances?status=running&limit=1").await;
    assert_eq!(page["instances"].as_array().unwrap().len(), 1);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, rest) = h
        .get(&format!(
            "/v1/instances?status=running&limit=10&cursor={cursor}"
        ))
        .await;
    assert_eq!(rest["instances"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next_cursor"], Value::Null);
    let (_, both) = h.get("/v1/instances?status=running").await;
    let listed = |page: &Value| -> Vec<Value> {
        page["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].clone())
            .collect()
    };
    assert_eq!(
        [listed(&page), listed(&rest)].concat(),
        listed(&both),
        "the pages list each instance once, in the listing's order"
    );
    // Newest first: by creation time (RFC 3339 of one width, so in text order), then
    // by id, both descending.
    let created: Vec<(String, String)> = both["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let at = i["created_at"].as_str().unwrap().to_string();
            (at, i["id"].as_str().unwrap().to_string())
        })
        .collect();
    assert!(created.windows(2).all(|w| w[0] > w[1]), "{created:?}");
    for cursor in [
        "o-1",
        "12",
        ".o-1",
        "x.o-1",
        "-5.o-1",
        "99999999999999999999.o-1",
        "9223372036854775808.o-1",
        "5.",
        "5.a%20b",
    ] {
        let refused = check_refused(
            &h,
            "GET",
            &format!("/v1/instances?cursor={cursor}"),
            None,
            400,
            "invalid_request",
        )
        .await;
        assert_eq!(refused["error"]["parameter"], json!("cursor"), "{cursor}");
    }

    // Workers: poll, heartbeat, complete, stale leases, fail and retry.
    let (status, polled) = h
        .post(
            "/v1/tasks/poll",
            json!({"queues": ["inventory"], "worker_id": "w", "max_tasks": 10, "wait_ms": 1000}),
        )
        .await;
    assert_eq!(status, 200);
    let tasks = polled["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    let task = tasks
        .iter()
        .find(|t| t["instance_id"] == "o-1")
        .unwrap()
        .clone();
    assert_eq!(task["input"], json!({"sku": "A"}));
    assert_eq!(task["attempt"], json!(1));
    assert_eq!(task["idempotency_key"], json!("o-1:reserve"));
    let task_id = task["task_id"].as_str().unwrap().to_string();
    let token = task["lease_token"].as_str().unwrap().to_string();
    let hb = format!("/v1/tasks/{task_id}/heartbeat");
    assert_eq!(h.post(&hb, json!({"lease_token": token})).await.0, 200);
    check_refused(
        &h,
        "POST",
        &hb,
        json_body(r#"{"lease_token": "0000"}"#),
        409,
        "stale_lease",
    )
    .await;
    let complete = format!("/v1/tasks/{task_id}/complete");
    check_refused(
        &h,
        "POST",
        &complete,
        json_body(r#"{"lease_token": "nope", "output": {}}"#),
        409,
        "stale_lease",
    )
    .await;
    let (status, _) = h
        .post(
            &complete,
            json!({"lease_token": token, "output": {"id": "r-1"}}),
        )
        .await;
    assert_eq!(status, 200);
    // A duplicate completion is refused and changes nothing.
    check_refused(
        &h,
        "POST",
        &complete,
        json_body(&json!({"lease_token": token, "output": {}}).to_string()),
        409,
        "stale_lease",
    )
    .await;

    let (_, polled) = h
        .post(
            "/v1/tasks/poll",
            json!({"queues": ["payments"], "max_tasks": 1, "wait_ms": 2000}),
        )
        .await;
    let charge = polled["tasks"][0].clone();
    assert_eq!(
        charge["input"],
        json!({"reservation": "r-1"}),
        "outputs flow into inputs"
    );
    let fail = format!("/v1/tasks/{}/fail", charge["task_id"].as_str().unwrap());
    let (status, _) = h
        .post(&fail, json!({"lease_token": charge["lease_token"], "error": {"type": "flaky", "message": "try again", "retryable": true}}))
        .await;
    assert_eq!(status, 200);
    let (_, polled) = h
        .post(
            "/v1/tasks/poll",
            json!({"queues": ["payments"], "max_tasks": 1, "wait_ms": 5000}),
        )
        .await;
    let retry = polled["tasks"][0].clone();
    assert_eq!(retry["attempt"], json!(2));
    let (status, _) = h
        .post(
            &format!("/v1/tasks/{}/fail", retry["task_id"].as_str().unwrap()),
            json!({"lease_token": retry["lease_token"], "error": {"type": "card_declined", "message": "no", "retryable": false}}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, failed) = h.get("/v1/instances/o-1").await;
    assert_eq!(failed["status"], json!("failed"));
    assert_eq!(failed["error"]["type"], json!("card_declined"));
    let (status, history) = h.get("/v1/instances/o-1/history").await;
    assert_eq!(status, 200);
    let types: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "instance_started",
            "step_scheduled",
            "step_completed",
            "step_scheduled",
            "step_failed",
            "step_retry_scheduled",
            "step_scheduled",
            "step_failed",
            "instance_failed"
        ]
    );
    assert!(history["events"][0]["seq"].is_u64() && history["events"][0]["at"].is_string());

    // Cancel.
    let generated_id = generated["id"].as_str().unwrap().to_string();
    let (status, cancelled) = h
        .post(
            &format!("/v1/instances/{generated_id}/cancel"),
            json!({"by": "tester"}),
        )
        .await;
    assert_eq!(
        (status, cancelled["status"].clone()),
        (200, json!("cancelled"))
    );
    check_refused(
        &h,
        "POST",
        &format!("/v1/instances/{generated_id}/cancel"),
        None,
        409,
        "conflict",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/instances/o-1/cancel",
        None,
        409,
        "conflict",
    )
    .await;

    // A poll with nothing to do answers an empty list after its wait.
    let (status, empty) = h
        .post(
            "/v1/tasks/poll",
            json!({"queues": ["nothing"], "wait_ms": 50}),
        )
        .await;
    assert_eq!((status, empty), (200, json!({"tasks": []})));

    // Bad input: right status, right code, nothing changed.
    let bad_yaml = "name: x\nsteps:\n  - id: a\n    tsk: q\n";
    let refused = check_refused(
        &h,
        "POST",
        "/v1/definitions",
        Some(("application/yaml", bad_yaml.into())),
        400,
        "invalid_definition",
    )
    .await;
    let problem = &refused["error"]["problems"][0];
    assert_eq!(
        (problem["line"].clone(), problem["column"].clone()),
        (json!(4), json!(5)),
        "{refused}"
    );
    check_refused(
        &h,
        "POST",
        "/v1/definitions",
        Some(("image/png", b"x".to_vec())),
        415,
        "unsupported_media_type",
    )
    .await;
    let huge = format!(
        "name: big\ndescription: \"{}\"\nsteps: []\n",
        "x".repeat(70 * 1024)
    );
    check_refused(
        &h,
        "POST",
        "/v1/definitions",
        Some(("application/yaml", huge.into())),
        413,
        "payload_too_large",
    )
    .await;
    check_refused(&h, "GET", "/v1/definitions/nope", None, 404, "not_found").await;
    check_refused(
        &h,
        "GET",
        "/v1/definitions/order?version=x",
        None,
        400,
        "invalid_request",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/instances",
        json_body(r#"{"definition": "order""#),
        400,
        "malformed_json",
    )
    .await;
    let typed = check_refused(
        &h,
        "POST",
        "/v1/instances",
        json_body(r#"{"definition": 5}"#),
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(typed["error"]["pointer"], json!("/definition"));
    let typed = check_refused(
        &h,
        "POST",
        "/v1/instances",
        json_body(r#"{"definition": "order", "version": "x"}"#),
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(typed["error"]["pointer"], json!("/version"));
    check_refused(
        &h,
        "POST",
        "/v1/instances",
        json_body(r#"{"definition": "nope"}"#),
        404,
        "not_found",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/instances",
        json_body(r#"{"definition": "order", "version": 9}"#),
        404,
        "not_found",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/instances",
        json_body(r#"{"definition": "order", "id": "bad id/"}"#),
        400,
        "invalid_request",
    )
    .await;
    let big_input = format!(
        r#"{{"definition": "order", "input": "{}"}}"#,
        "x".repeat(70 * 1024)
    );
    check_refused(
        &h,
        "POST",
        "/v1/instances",
        json_body(&big_input),
        413,
        "payload_too_large",
    )
    .await;
    check_refused(&h, "GET", "/v1/instances/nope", None, 404, "not_found").await;
    check_refused(
        &h,
        "GET",
        "/v1/instances/nope/history",
        None,
        404,
        "not_found",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/instances/nope/cancel",
        None,
        404,
        "not_found",
    )
    .await;
    check_refused(
        &h,
        "GET",
        "/v1/instances?status=sleeping",
        None,
        400,
        "invalid_request",
    )
    .await;
    check_refused(
        &h,
        "GET",
        "/v1/instances?limit=0",
        None,
        400,
        "invalid_request",
    )
    .await;
    check_refused(
        &h,
        "GET",
        "/v1/instances?colour=red",
        None,
        400,
        "invalid_request",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/tasks/poll",
        json_body(r#"{"queues": []}"#),
        400,
        "invalid_request",
    )
    .await;
    let typed = check_refused(
        &h,
        "POST",
        "/v1/tasks/poll",
        json_body(r#"{"queues": ["a", 1]}"#),
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(typed["error"]["pointer"], json!("/queues/1"));
    check_refused(
        &h,
        "POST",
        "/v1/tasks/poll",
        json_body(r#"{"queues": ["a"], "max_tasks": 0}"#),
        400,
        "invalid_request",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/tasks/x:y:1/complete",
        json_body("[1,"),
        400,
        "malformed_json",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/tasks/unknown/complete",
        json_body(r#"{"lease_token": "t"}"#),
        409,
        "stale_lease",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/tasks/o-1:reserve:1/fail",
        json_body(r#"{"lease_token": "t", "error": {"type": ""}}"#),
        400,
        "invalid_request",
    )
    .await;
    let typed = check_refused(
        &h,
        "POST",
        "/v1/tasks/o-1:reserve:1/fail",
        json_body(r#"{"lease_token": "t", "error": {"type": "x", "retryable": "yes"}}"#),
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(typed["error"]["pointer"], json!("/error/retryable"));
    check_refused(
        &h,
        "POST",
        "/v1/tasks/o-1:reserve:1/heartbeat",
        json_body(r#"{}"#),
        400,
        "invalid_request",
    )
    .await;
    check_refused(&h, "GET", "/v1/nowhere", None, 404, "not_found").await;
    check_refused(
        &h,
        "DELETE",
        "/v1/instances",
        None,
        405,
        "method_not_allowed",
    )
    .await;

    h.stop().await;
}

async fn http_and_sleep_steps_run_for_real(backend: Backend) {
    // Goal: the built-in `http` step makes a real call and `sleep` a durable timer.
    // Method: a definition whose http step calls this very server's /healthz.
    let h = Harness::start(backend).await;
    let definition = format!(
        r#"
name: ping
steps:
  - id: nap
    sleep: 50ms
  - id: ping
    http: {{ method: GET, url: "{}/healthz", headers: {{ x-order: "${{ .input.n | tostring }}" }} }}
output: {{ status: "${{ .steps.ping.output.status }}", body: "${{ .steps.ping.output.body }}" }}
"#,
        h.base
    );
    assert_eq!(h.deploy(&definition).await.0, 201);
    let (status, _) = h
        .post(
            "/v1/instances",
            json!({"definition": "ping", "id": "p-1", "input": {"n": 7}}),
        )
        .await;
    assert_eq!(status, 201);
    // Long-poll until the instance ends.
    let (status, done) = h.get("/v1/instances/p-1?wait_ms=10000").await;
    assert_eq!(status, 200);
    assert_eq!(done["status"], json!("completed"), "{done}");
    assert_eq!(
        done["output"],
        json!({"status": 200, "body": {"status": "ok"}})
    );
    // The waited answer (made from the partition's memory) is the stored view.
    let (_, stored) = h.get("/v1/instances/p-1").await;
    assert_eq!(done, stored);
    // A start may wait for the end in the same request.
    let (status, ran) = h
        .post(
            "/v1/instances?wait_ms=10000",
            json!({"definition": "ping", "id": "p-2", "input": {"n": 8}}),
        )
        .await;
    assert_eq!(status, 201, "{ran}");
    assert_eq!(ran["status"], json!("completed"), "{ran}");
    assert_eq!(ran["created"], json!(true));
    assert_eq!(ran["output"], done["output"]);
    // A repeated start with a wait answers the stored instance, ended.
    let (status, again) = h
        .post(
            "/v1/instances?wait_ms=10000",
            json!({"definition": "ping", "id": "p-2", "input": {"n": 8}}),
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["created"], json!(false));
    assert_eq!(again["status"], json!("completed"), "{again}");
    assert_eq!(again["output"], done["output"]);
    // So does a start whose id the server makes.
    let (status, generated) = h
        .post(
            "/v1/instances?wait_ms=10000",
            json!({"definition": "ping", "input": {"n": 9}}),
        )
        .await;
    assert_eq!(status, 201, "{generated}");
    assert_eq!(generated["status"], json!("completed"), "{generated}");
    // A wait over before the end answers the instance as stored, running.
    let (status, early) = h
        .post(
            "/v1/instances?wait_ms=1",
            json!({"definition": "ping", "id": "p-4", "input": {"n": 10}}),
        )
        .await;
    assert_eq!(status, 201, "{early}");
    assert_eq!(early["status"], json!("running"), "{early}");
    assert_eq!(early["id"], json!("p-4"));
    let (_, finished) = h.get("/v1/instances/p-4?wait_ms=10000").await;
    assert_eq!(finished["status"], json!("completed"), "{finished}");
    let refused = check_refused(
        &h,
        "POST",
        "/v1/instances?wait_ms=soon",
        json_body(r#"{"definition": "ping", "id": "p-3"}"#),
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(refused["error"]["parameter"], json!("wait_ms"));
    let (_, history) = h.get("/v1/instances/p-1/history").await;
    let types: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"timer_started") && types.contains(&"timer_fired"),
        "{types:?}"
    );
    h.stop().await;
}

const SAGA: &str = r#"
name: saga
steps:
  - id: reserve
    task: inventory
    compensate: { task: inventory-release, input: { id: "${ .steps.reserve.output.id }" } }
  - id: charge
    task: payments
    retry: { max_attempts: 1 }
    compensate: { task: payments-refund }
  - id: approval
    wait: approved
  - id: ship
    task: shipping
    input: { approved_by: "${ .steps.approval.output.by }" }
"#;

impl Harness {
    /// Takes one task from `queue` (waiting up to 5 s) and returns it.
    async fn take(&self, queue: &str) -> Value {
        let (status, polled) = self
            .post(
                "/v1/tasks/poll",
                json!({"queues": [queue], "max_tasks": 1, "wait_ms": 5000}),
            )
            .await;
        assert_eq!(status, 200);
        let task = polled["tasks"][0].clone();
        assert!(task.is_object(), "no task on {queue}");
        task
    }

    async fn finish(&self, task: &Value, output: Value) {
        let path = format!("/v1/tasks/{}/complete", task["task_id"].as_str().unwrap());
        let (status, body) = self
            .post(
                &path,
                json!({"lease_token": task["lease_token"], "output": output}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    async fn history_types(&self, id: &str) -> Vec<String> {
        let (_, history) = self.get(&format!("/v1/instances/{id}/history")).await;
        history["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect()
    }
}

async fn recovery_operations_signals_and_compensation(backend: Backend) {
    // Goal: every recovery operation answers as documented, is refused with 409 where it
    // makes no sense, and is recorded in the history with who asked.
    // Method: a saga over real HTTP; tasks taken and completed by the test itself.
    let h = Harness::start(backend).await;
    assert_eq!(h.deploy(SAGA).await.0, 201);
    let start = |id: &str| json!({"definition": "saga", "id": id, "input": {}});
    assert_eq!(h.post("/v1/instances", start("s-1")).await.0, 201);

    // A signal that arrives before its wait is kept.
    let (status, _) = h
        .post("/v1/instances/s-1/signals/approved", json!({"by": "ann"}))
        .await;
    assert_eq!(status, 200);
    let reserve = h.take("inventory").await;
    h.finish(&reserve, json!({"id": "r-1"})).await;

    // Pause: a task already taken may finish; the next step waits.
    let charge = h.take("payments").await;
    let (status, paused) = h
        .post("/v1/instances/s-1/pause", json!({"by": "ops"}))
        .await;
    assert_eq!((status, paused["status"].clone()), (200, json!("paused")));
    check_refused(&h, "POST", "/v1/instances/s-1/pause", None, 409, "conflict").await;
    check_refused(&h, "POST", "/v1/instances/s-1/retry", None, 409, "conflict").await;
    h.finish(&charge, json!({"id": "c-1"})).await;
    let (_, idle) = h
        .post(
            "/v1/tasks/poll",
            json!({"queues": ["shipping"], "wait_ms": 100}),
        )
        .await;
    assert_eq!(
        idle["tasks"],
        json!([]),
        "a paused instance dispatches no new task"
    );
    let (status, resumed) = h
        .post("/v1/instances/s-1/resume", json!({"by": "ops"}))
        .await;
    assert_eq!((status, resumed["status"].clone()), (200, json!("running")));
    let ship = h.take("shipping").await;
    assert_eq!(
        ship["input"],
        json!({"approved_by": "ann"}),
        "the early signal's payload flowed on"
    );

    // Fail the last step for good: compensations run in reverse completion order.
    let fail = format!("/v1/tasks/{}/fail", ship["task_id"].as_str().unwrap());
    let body =
        json!({"lease_token": ship["lease_token"], "error": {"type": "fatal", "retryable": false}});
    assert_eq!(h.post(&fail, body).await.0, 200);
    let (_, compensating) = h.get("/v1/instances/s-1").await;
    assert_eq!(compensating["status"], json!("compensating"));
    let refund = h.take("payments-refund").await;
    assert_eq!(refund["step_id"], json!("charge~undo"));
    h.finish(&refund, json!({})).await;
    let release = h.take("inventory-release").await;
    assert_eq!(release["input"], json!({"id": "r-1"}));
    h.finish(&release, json!({})).await;
    let (_, done) = h.get("/v1/instances/s-1").await;
    assert_eq!(done["status"], json!("compensated"));
    assert_eq!(done["error"]["type"], json!("fatal"));
    check_refused(&h, "POST", "/v1/instances/s-1/retry", None, 409, "conflict").await;
    check_refused(
        &h,
        "POST",
        "/v1/instances/s-1/resume",
        None,
        409,
        "conflict",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/instances/s-1/signals/approved",
        json_body("{}"),
        409,
        "conflict",
    )
    .await;

    // Rerun from a chosen step, and restart.
    check_refused(
        &h,
        "POST",
        "/v1/instances/s-1/rerun",
        json_body("{}"),
        400,
        "invalid_request",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/instances/s-1/rerun",
        json_body(r#"{"from_step": "nope"}"#),
        400,
        "invalid_request",
    )
    .await;
    let (status, rerun) = h
        .post(
            "/v1/instances/s-1/rerun",
            json!({"from_step": "approval", "by": "ops"}),
        )
        .await;
    assert_eq!((status, rerun["status"].clone()), (200, json!("running")));
    h.post("/v1/instances/s-1/signals/approved", json!({"by": "bob"}))
        .await;
    let ship = h.take("shipping").await;
    assert_eq!(ship["input"], json!({"approved_by": "bob"}));
    h.finish(&ship, json!({})).await;
    let (_, rerun_done) = h.get("/v1/instances/s-1").await;
    assert_eq!(rerun_done["status"], json!("completed"));
    let (status, restarted) = h
        .post("/v1/instances/s-1/restart", json!({"by": "ops"}))
        .await;
    assert_eq!(status, 201);
    assert_eq!(restarted["restarted_from"], json!("s-1"));
    assert_ne!(restarted["id"], json!("s-1"));
    let restarted_id = restarted["id"].as_str().unwrap();
    let (_, history) = h
        .get(&format!("/v1/instances/{restarted_id}/history"))
        .await;
    assert_eq!(history["events"][0]["restarted_from"], json!("s-1"));
    assert_eq!(history["events"][0]["restarted_by"], json!("ops"));
    // Out of the way of what follows.
    let (status, _) = h
        .post(
            &format!("/v1/instances/{restarted_id}/terminate"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200);

    let types = h.history_types("s-1").await;
    for expected in [
        "signal_received",
        "instance_paused",
        "instance_resumed",
        "compensation_started",
        "instance_compensated",
        "instance_rerun",
        "instance_completed",
    ] {
        assert!(
            types.iter().any(|t| t == expected),
            "{expected} missing from {types:?}"
        );
    }
    let (_, history) = h.get("/v1/instances/s-1/history").await;
    let paused_by = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "instance_paused")
        .unwrap();
    assert_eq!(paused_by["by"], json!("ops"));

    // Retry from the failed step, without running again what succeeded.
    assert_eq!(h.post("/v1/instances", start("s-2")).await.0, 201);
    let reserve = h.take("inventory").await;
    h.finish(&reserve, json!({"id": "r-2"})).await;
    let charge = h.take("payments").await;
    let fail = format!("/v1/tasks/{}/fail", charge["task_id"].as_str().unwrap());
    h.post(&fail, json!({"lease_token": charge["lease_token"], "error": {"type": "declined", "retryable": false}})).await;
    // reserve compensates; the instance ends compensated.
    let release = h.take("inventory-release").await;
    h.finish(&release, json!({})).await;
    assert_eq!(
        h.get("/v1/instances/s-2").await.1["status"],
        json!("compensated")
    );

    // Terminate and cancel.
    assert_eq!(h.post("/v1/instances", start("s-3")).await.0, 201);
    let (status, terminated) = h
        .post(
            "/v1/instances/s-3/terminate",
            json!({"reason": "test", "by": "ops"}),
        )
        .await;
    assert_eq!(
        (status, terminated["status"].clone()),
        (200, json!("terminated"))
    );
    check_refused(
        &h,
        "POST",
        "/v1/instances/s-3/terminate",
        None,
        409,
        "conflict",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/instances/s-3/cancel",
        None,
        409,
        "conflict",
    )
    .await;
    assert_eq!(h.post("/v1/instances", start("s-4")).await.0, 201);
    let reserve = h.take("inventory").await;
    h.finish(&reserve, json!({"id": "r-4"})).await;
    let (status, cancelling) = h
        .post("/v1/instances/s-4/cancel", json!({"by": "ops"}))
        .await;
    assert_eq!(
        (status, cancelling["status"].clone()),
        (200, json!("compensating"))
    );
    let release = h.take("inventory-release").await;
    h.finish(&release, json!({})).await;
    assert_eq!(
        h.get("/v1/instances/s-4").await.1["status"],
        json!("cancelled")
    );
    // A paused instance's offered task is held back until it resumes.
    assert_eq!(h.post("/v1/instances", start("s-5")).await.0, 201);
    assert_eq!(h.post("/v1/instances/s-5/pause", json!({})).await.0, 200);
    let (_, held) = h
        .post(
            "/v1/tasks/poll",
            json!({"queues": ["inventory"], "wait_ms": 100}),
        )
        .await;
    assert_eq!(
        held["tasks"],
        json!([]),
        "a paused instance dispatches no task"
    );
    assert_eq!(h.post("/v1/instances/s-5/resume", json!({})).await.0, 200);
    let released = h.take("inventory").await;
    assert_eq!(released["instance_id"], json!("s-5"));
    check_refused(
        &h,
        "POST",
        "/v1/instances/nope/pause",
        None,
        404,
        "not_found",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/instances/nope/retry",
        None,
        404,
        "not_found",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/instances/s-4/pause",
        json_body(r#"{"who": 1}"#),
        400,
        "invalid_request",
    )
    .await;
    h.stop().await;
}

async fn human_tasks_are_listed_validated_and_completed(backend: Backend) {
    // Goal: people complete human tasks through the API; bad form data gets 422 with the
    // JSON pointer of each problem and changes nothing.
    let h = Harness::start(backend).await;
    let definition = r#"
name: approval
steps:
  - id: approve
    human:
      title: "${ \"Approve order \" + .input.order }"
      assignee: ann
      group: managers
      schema: { type: object, required: [approved], properties: { approved: { type: boolean }, note: { type: string } } }
output: "${ .steps.approve.output }"
"#;
    assert_eq!(h.deploy(definition).await.0, 201);
    assert_eq!(
        h.post(
            "/v1/instances",
            json!({"definition": "approval", "id": "a-1", "input": {"order": "o-1"}})
        )
        .await
        .0,
        201
    );
    let (status, listed) = h.get("/v1/human-tasks?assignee=ann").await;
    assert_eq!(status, 200);
    let task = listed["tasks"][0].clone();
    assert_eq!(task["title"], json!("Approve order o-1"));
    assert_eq!(task["group"], json!("managers"));
    assert_eq!(
        h.get("/v1/human-tasks?assignee=bob").await.1["tasks"],
        json!([])
    );
    check_refused(
        &h,
        "GET",
        "/v1/human-tasks?who=x",
        None,
        400,
        "invalid_request",
    )
    .await;
    // Workers cannot poll the human queue.
    check_refused(
        &h,
        "POST",
        "/v1/tasks/poll",
        json_body(r#"{"queues": ["~human"]}"#),
        400,
        "invalid_request",
    )
    .await;
    let complete = format!(
        "/v1/human-tasks/{}/complete",
        task["task_id"].as_str().unwrap()
    );
    let refused = check_refused(
        &h,
        "POST",
        &complete,
        json_body(r#"{"by": "ann", "data": {"approved": "yes", "note": 5}}"#),
        422,
        "invalid_data",
    )
    .await;
    let pointers: Vec<&str> = refused["error"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pointer"].as_str().unwrap())
        .collect();
    assert!(
        pointers.contains(&"/approved") && pointers.contains(&"/note"),
        "{refused}"
    );
    check_refused(
        &h,
        "POST",
        &complete,
        json_body(r#"{"data": {}}"#),
        400,
        "invalid_request",
    )
    .await;
    let (status, _) = h
        .post(&complete, json!({"by": "ann", "data": {"approved": true}}))
        .await;
    assert_eq!(status, 200);
    let (_, done) = h.get("/v1/instances/a-1").await;
    assert_eq!(done["status"], json!("completed"));
    assert_eq!(
        done["output"],
        json!({"by": "ann", "data": {"approved": true}})
    );
    check_refused(
        &h,
        "POST",
        &complete,
        json_body(r#"{"by": "ann", "data": {"approved": true}}"#),
        409,
        "conflict",
    )
    .await;
    check_refused(
        &h,
        "POST",
        "/v1/human-tasks/nope/complete",
        json_body(r#"{"by": "ann"}"#),
        404,
        "not_found",
    )
    .await;
    h.stop().await;
}

async fn child_workflows_report_to_their_parent_and_are_cancelled_with_it(backend: Backend) {
    // Goal: a `workflow` step runs a child instance, gets its output, and cancelling the
    // parent cancels the child. Method: real engine and HTTP; the test is the worker.
    let h = Harness::start(backend).await;
    let child = "name: kid\nsteps:\n  - id: work\n    task: kid-work\n    input: { n: \"${ .input.n }\" }\n";
    let parent = r#"
name: parent
steps:
  - id: spawn
    workflow: { definition: kid, input: { n: "${ .input.n }" } }
  - id: after
    task: parent-work
    input: "${ .steps.spawn.output }"
"#;
    assert_eq!(h.deploy(child).await.0, 201);
    assert_eq!(h.deploy(parent).await.0, 201);
    assert_eq!(
        h.post(
            "/v1/instances",
            json!({"definition": "parent", "id": "p-1", "input": {"n": 7}})
        )
        .await
        .0,
        201
    );
    let work = h.take("kid-work").await;
    assert_eq!(work["instance_id"], json!("p-1~spawn~1"));
    assert_eq!(work["input"], json!({"n": 7}));
    h.finish(&work, json!({"made": 7})).await;
    let after = h.take("parent-work").await;
    assert_eq!(
        after["input"],
        json!({"made": 7}),
        "the child's output is the step's output"
    );
    h.finish(&after, json!({})).await;
    assert_eq!(
        h.get("/v1/instances/p-1").await.1["status"],
        json!("completed")
    );

    // Cancelling the parent cancels the child.
    assert_eq!(
        h.post(
            "/v1/instances",
            json!({"definition": "parent", "id": "p-2", "input": {"n": 1}})
        )
        .await
        .0,
        201
    );
    let _ = h.take("kid-work").await;
    let (status, _) = h.post("/v1/instances/p-2/cancel", json!({})).await;
    assert_eq!(status, 200);
    let mut child_status = Value::Null;
    for _ in 0..100 {
        child_status = h.get("/v1/instances/p-2~spawn~1").await.1["status"].clone();
        if child_status == json!("cancelled") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(child_status, json!("cancelled"));

    // A child that fails fails its parent's step.
    assert_eq!(
        h.post(
            "/v1/instances",
            json!({"definition": "parent", "id": "p-3", "input": {"n": 2}})
        )
        .await
        .0,
        201
    );
    let work = h.take("kid-work").await;
    let fail = format!("/v1/tasks/{}/fail", work["task_id"].as_str().unwrap());
    h.post(&fail, json!({"lease_token": work["lease_token"], "error": {"type": "broken", "retryable": false}})).await;
    // The parent's step retries per the default policy; the failed attempt's record says why.
    let mut failure = None;
    for _ in 0..100 {
        let (_, history) = h.get("/v1/instances/p-3/history").await;
        failure = history["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "step_failed")
            .cloned();
        if failure.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(failure.unwrap()["error"]["type"], json!("child_failed"));
    h.stop().await;
}

/// Goal: a batch of completions is answered one result per completion, in order,
/// each as a single completion would have been answered; a bad batch changes nothing.
async fn completions_are_taken_in_batches(backend: Backend) {
    let h = Harness::start(backend).await;
    assert_eq!(h.deploy(ORDER).await.0, 201);
    for n in 0..3 {
        let (status, _) = h
            .post(
                "/v1/instances",
                json!({"definition": "order", "id": format!("b-{n}"), "input": {"sku": n}}),
            )
            .await;
        assert_eq!(status, 201);
    }
    let (_, polled) = h
        .post(
            "/v1/tasks/poll",
            json!({"queues": ["inventory"], "max_tasks": 3, "wait_ms": 2000}),
        )
        .await;
    let tasks = polled["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks.len(), 3, "{polled}");
    let item = |task: &Value, token: &Value| json!({"task_id": task["task_id"], "lease_token": token, "output": {"id": task["instance_id"]}});

    // Refused as a whole: nothing changes.
    let too_many: Vec<Value> = (0..257)
        .map(|_| item(&tasks[0], &tasks[0]["lease_token"]))
        .collect();
    for (body, pointer) in [
        (json!({"completions": []}), Some("/completions")),
        (json!({"completions": too_many}), Some("/completions")),
        (json!({"completions": [{"task_id": "x"}]}), None),
        (json!({"completions": [], "extra": 1}), None),
    ] {
        let refused = check_refused(
            &h,
            "POST",
            "/v1/tasks/completions",
            json_body(&body.to_string()),
            400,
            "invalid_request",
        )
        .await;
        if let Some(pointer) = pointer {
            assert_eq!(refused["error"]["pointer"], json!(pointer), "{refused}");
        }
    }

    // Two good completions, a stale token and an unknown task, in that order.
    let batch = json!({"completions": [
        item(&tasks[0], &tasks[0]["lease_token"]),
        item(&tasks[1], &json!("0000")),
        item(&tasks[2], &tasks[2]["lease_token"]),
        {"task_id": "nope", "lease_token": "0000"},
    ]});
    let (status, answer) = h.post("/v1/tasks/completions", batch.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    let statuses: Vec<&Value> = results.iter().map(|r| &r["status"]).collect();
    assert_eq!(
        statuses,
        [&json!(200), &json!(409), &json!(200), &json!(409)],
        "{answer}"
    );
    assert_eq!(results[0]["task_id"], tasks[0]["task_id"]);
    assert_eq!(results[3]["task_id"], json!("nope"));
    assert_eq!(results[1]["error"]["code"], json!("stale_lease"));
    assert!(results[0].get("error").is_none());

    // The same batch again: every completion is now a duplicate, nothing is applied twice.
    let (status, again) = h.post("/v1/tasks/completions", batch).await;
    assert_eq!(status, 200);
    assert!(
        again["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == json!(409)),
        "{again}"
    );

    // The completed ones moved on to their next step, with their outputs; the stale
    // one is still held by its lease.
    let (_, polled) = h
        .post(
            "/v1/tasks/poll",
            json!({"queues": ["payments"], "max_tasks": 10, "wait_ms": 2000}),
        )
        .await;
    let mut next: Vec<(String, Value)> = polled["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["instance_id"].as_str().unwrap().to_string(),
                t["input"].clone(),
            )
        })
        .collect();
    next.sort_by(|a, b| a.0.cmp(&b.0));
    let expected: Vec<(String, Value)> = [&tasks[0], &tasks[2]]
        .iter()
        .map(|t| {
            let id = t["instance_id"].as_str().unwrap().to_string();
            (id.clone(), json!({"reservation": id}))
        })
        .collect();
    let mut expected = expected;
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(next, expected);
    for task in [&tasks[0], &tasks[2]] {
        let id = task["instance_id"].as_str().unwrap();
        let (_, history) = h.get(&format!("/v1/instances/{id}/history")).await;
        let completed = history["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "step_completed")
            .count();
        assert_eq!(completed, 1, "{history}");
    }
    h.stop().await;
}

async fn completions_hand_back_the_next_task(backend: Backend) {
    // Goal: a completion that asks for `next` gets its instance's next task in its answer,
    // leased to it, ahead of a poll that is waiting; bad `next` input is refused before
    // anything is applied.
    let h = Harness::start(backend).await;
    assert_eq!(h.deploy(ORDER).await.0, 201);
    let start = |id: &str| json!({"definition": "order", "id": id, "input": {"sku": id}});
    for id in ["n-0", "n-1", "n-2"] {
        assert_eq!(h.post("/v1/instances", start(id)).await.0, 201);
    }
    let (_, polled) = h
        .post(
            "/v1/tasks/poll",
            json!({"queues": ["inventory"], "max_tasks": 3, "wait_ms": 2000}),
        )
        .await;
    let mut tasks = polled["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks.len(), 3, "{polled}");
    tasks.sort_by_key(|t| t["instance_id"].as_str().unwrap().to_string());
    let path = |task: &Value| format!("/v1/tasks/{}/complete", task["task_id"].as_str().unwrap());

    // Refused before the completion is applied: nothing changes.
    for (next, pointer) in [
        (
            json!({"queues": ["bad queue"], "max_tasks": 1}),
            "/next/queues/0",
        ),
        (json!({"queues": [], "max_tasks": 1}), "/next/queues"),
        (
            json!({"queues": ["payments"], "max_tasks": 0}),
            "/next/max_tasks",
        ),
        (
            json!({"queues": ["payments"], "max_tasks": 2000}),
            "/next/max_tasks",
        ),
    ] {
        let body =
            json!({"lease_token": tasks[0]["lease_token"], "output": {"id": "x"}, "next": next});
        let refused = check_refused(
            &h,
            "POST",
            &path(&tasks[0]),
            json_body(&body.to_string()),
            400,
            "invalid_request",
        )
        .await;
        assert_eq!(refused["error"]["pointer"], json!(pointer), "{refused}");
    }
    let body = json!({"completions": [{"task_id": tasks[0]["task_id"], "lease_token": tasks[0]["lease_token"]}], "next": {"queues": ["payments"]}});
    check_refused(
        &h,
        "POST",
        "/v1/tasks/completions",
        json_body(&body.to_string()),
        400,
        "invalid_request",
    )
    .await;

    // One completion, with a poll of the next step's queue waiting: the completion's
    // answer has the next task, the poll ends empty.
    let waiting_poll = {
        let client = h.client.clone();
        let url = format!("{}/v1/tasks/poll", h.base);
        tokio::spawn(async move {
            let answer = client
                .post(url)
                .json(&json!({"queues": ["payments"], "max_tasks": 10, "wait_ms": 1500}))
                .send()
                .await
                .unwrap();
            answer.json::<Value>().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = json!({"lease_token": tasks[0]["lease_token"], "output": {"id": "r-0"},
        "next": {"queues": ["inventory", "payments"], "max_tasks": 1}});
    let (status, answer) = h.post(&path(&tasks[0]), body).await;
    assert_eq!(status, 200, "{answer}");
    let next = answer["tasks"].as_array().unwrap();
    assert_eq!(next.len(), 1, "{answer}");
    assert_eq!(next[0]["instance_id"], json!("n-0"));
    assert_eq!(next[0]["step_id"], json!("charge"));
    assert_eq!(next[0]["input"], json!({"reservation": "r-0"}));
    assert_eq!(waiting_poll.await.unwrap(), json!({"tasks": []}));
    // Leased to this caller: its token completes it.
    let body = json!({"lease_token": next[0]["lease_token"], "output": {"charged": true}});
    assert_eq!(h.post(&path(&next[0]), body).await.0, 200);
    let (_, instance) = h.get("/v1/instances/n-0?wait_ms=2000").await;
    assert_eq!(instance["status"], json!("completed"), "{instance}");

    // Without `next` the answer is as before, and the next task waits for a poll.
    let body = json!({"lease_token": tasks[1]["lease_token"], "output": {"id": "r-1"}});
    assert_eq!(h.post(&path(&tasks[1]), body).await, (200, json!({})));
    // A `next` of other queues takes nothing of this one: the answer's tasks are empty,
    // then topped up from what waits on the queues asked for.
    let body = json!({"completions": [{"task_id": tasks[2]["task_id"], "lease_token": tasks[2]["lease_token"], "output": {"id": "r-2"}}],
        "next": {"queues": ["inventory"], "max_tasks": 4}});
    let (status, answer) = h.post("/v1/tasks/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["status"], json!(200), "{answer}");
    assert_eq!(answer["tasks"], json!([]), "{answer}");
    let body = json!({"completions": [{"task_id": "nope", "lease_token": "0000"}],
        "next": {"queues": ["payments"], "max_tasks": 4}});
    let (status, answer) = h.post("/v1/tasks/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["status"], json!(409), "{answer}");
    let mut waited: Vec<&str> = answer["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["instance_id"].as_str().unwrap())
        .collect();
    waited.sort();
    assert_eq!(waited, ["n-1", "n-2"], "{answer}");
    h.stop().await;
}

/// The value of one unlabelled sample (or one with the given labels) in Prometheus's
/// text format.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn metrics_count_group_commits_and_wal_syncs(backend: Backend) {
    // Goal: `GET /metrics` counts each group commit, with well-formed cumulative
    // buckets, and on the embedded store at least one WAL sync per commit (none is
    // reported on PostgreSQL, whose syncs another process makes); it counts each task
    // handed to a worker with the time it waited on the board.
    // Method: three starts, each acknowledged only once committed, a poll that takes
    // two of their tasks at least 50 ms after their offer, then a scrape.
    let h = Harness::start(backend).await;
    assert_eq!(h.deploy(ORDER).await.0, 201);
    for id in ["m-1", "m-2", "m-3"] {
        let start = json!({"definition": "order", "id": id, "input": {"sku": "a"}});
        assert_eq!(h.post("/v1/instances", start).await.0, 201);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, polled) = h
        .post(
            "/v1/tasks/poll",
            json!({"queues": ["inventory"], "worker_id": "w", "max_tasks": 2, "wait_ms": 0}),
        )
        .await;
    assert_eq!(status, 200, "{polled}");
    assert_eq!(polled["tasks"].as_array().unwrap().len(), 2, "{polled}");
    let response = h
        .client
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    let commits = sample(&text, "weir_commit_seconds_count").expect("commit count");
    assert!(commits >= 3.0, "{text}");
    assert_eq!(
        sample(&text, "weir_commit_seconds_bucket{le=\"+Inf\"}"),
        Some(commits)
    );
    let buckets: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with("weir_commit_seconds_bucket"))
        .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 20);
    assert!(buckets.windows(2).all(|pair| pair[0] <= pair[1]), "{text}");
    assert!(sample(&text, "weir_commit_seconds_sum").unwrap() > 0.0);
    assert_eq!(sample(&text, "weir_task_dispatch_seconds_count"), Some(2.0));
    assert_eq!(
        sample(&text, "weir_task_dispatch_seconds_bucket{le=\"0.02\"}"),
        Some(0.0),
        "{text}"
    );
    assert!(sample(&text, "weir_task_dispatch_seconds_sum").unwrap() >= 0.1);
    assert!(sample(&text, "weir_commit_batches_total").unwrap() >= commits);
    assert_eq!(sample(&text, "weir_commit_failures_total"), Some(0.0));
    let syncs = sample(&text, "weir_store_wal_sync_seconds_count");
    // Each start came alone to an idle engine: committed in place, on the embedded store.
    let in_place = sample(&text, "weir_commits_in_place_total").expect("commits in place");
    match backend {
        Backend::Sqlite => {
            assert!(syncs.expect("WAL syncs") >= commits, "{text}");
            assert!((3.0..=commits).contains(&in_place), "{text}");
        }
        Backend::Postgres => {
            assert_eq!(syncs, None, "{text}");
            assert_eq!(in_place, 0.0, "{text}");
        }
    }
    h.stop().await;
}
