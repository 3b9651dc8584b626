//! The worker against a fake weir node: a tiny axum server in the test that hands out tasks and
//! records every call made to it, over real HTTP on 127.0.0.1.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};
use weir_sdk::{Task, TaskError, Worker, WorkerStats};

/// Bound on every wait for the worker to do something; only reached when a test fails.
const WAIT_MAX: Duration = Duration::from_secs(10);

/// A fake node: a queue of tasks and a record of the calls received.
#[derive(Default)]
struct Fake {
    state: Mutex<FakeState>,
    changed: Notify,
}

#[derive(Default)]
struct FakeState {
    /// The worker's concurrency, to check that polls ask only for free slots.
    concurrency: usize,
    pending: VecDeque<Value>,
    /// Tasks handed out and not yet completed or failed.
    leased: HashSet<String>,
    polls: Vec<Value>,
    /// How many tasks polls handed out.
    polled_tasks: usize,
    completes: HashMap<String, Value>,
    fails: HashMap<String, Value>,
    complete_calls: HashMap<String, usize>,
    heartbeats: HashMap<String, usize>,
    /// Tasks whose lease is refused (409) on complete, fail and heartbeat; a task joins once
    /// completed or failed, as on a real node.
    stale: HashSet<String>,
    /// When set, every poll is answered with this status.
    poll_status: Option<StatusCode>,
    /// Whether `POST /v1/tasks/completions` exists (a node older than batches answers
    /// 404, and the worker must then send each completion alone).
    batches_supported: bool,
    /// Sizes of the batches of completions received.
    batches: Vec<usize>,
    /// How long a single completion takes to be answered (a slow node).
    single_complete_delay: Duration,
    /// The `next` of every completion that had one.
    next_asked: Vec<Value>,
    /// Everything the fake saw that breaks the contract.
    violations: Vec<String>,
}

impl Fake {
    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake state lock")
    }

    fn add_tasks(&self, ids: &[&str]) {
        let mut state = self.state();
        for id in ids {
            state.pending.push_back(json!({
                "task_id": id, "lease_token": format!("lease-{id}"), "queue": "q",
                "instance_id": format!("instance-{id}"), "step_id": "step", "attempt": 1,
                "input": {"id": id}, "idempotency_key": format!("key-{id}"),
            }));
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Waits until `done` holds, failing the test after [`WAIT_MAX`].
    async fn wait_until(&self, what: &str, done: impl Fn(&FakeState) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT_MAX;
        loop {
            let changed = self.changed.notified();
            if done(&self.state()) {
                return;
            }
            // The short timeout covers changes made between the check and the wait.
            let _ = tokio::time::timeout(Duration::from_millis(20), changed).await;
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
        }
    }
}

async fn poll(State(fake): State<Arc<Fake>>, Json(body): Json<Value>) -> Response {
    let max_tasks = body["max_tasks"].as_u64().unwrap_or(0) as usize;
    let wait = Duration::from_millis(body["wait_ms"].as_u64().unwrap_or(0));
    {
        let mut state = fake.state();
        state.polls.push(body.clone());
        if let Some(status) = state.poll_status {
            return (
                status,
                Json(json!({"error": {"code": "unavailable", "message": "down"}})),
            )
                .into_response();
        }
        if max_tasks == 0 || max_tasks + state.leased.len() > state.concurrency {
            let violation = format!(
                "poll asked for {max_tasks} tasks with {} leased",
                state.leased.len()
            );
            state.violations.push(violation);
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        {
            let mut state = fake.state();
            if !state.pending.is_empty() {
                let count = max_tasks.min(state.pending.len());
                let tasks: Vec<Value> = state.pending.drain(..count).collect();
                state.polled_tasks += tasks.len();
                for task in &tasks {
                    let id = task["task_id"].as_str().unwrap_or_default().to_owned();
                    state.leased.insert(id);
                }
                return Json(json!({ "tasks": tasks })).into_response();
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Json(json!({ "tasks": [] })).into_response();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn task_call(
    State(fake): State<Arc<Fake>>,
    Path((task_id, action)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let delay = fake.state().single_complete_delay;
    if action == "complete" && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut state = fake.state();
    let next = body.get("next").cloned();
    let (status, mut answer) = apply_call(&mut state, task_id, &action, body);
    if let Some(next) = next {
        if status == StatusCode::OK {
            answer["tasks"] = Value::Array(hand_next(&mut state, &next));
        }
    }
    drop(state);
    fake.changed.notify_waiters();
    (status, Json(answer)).into_response()
}

/// The tasks a completion's `next` asks for, as a node answers it: pending tasks, leased,
/// at most the slots the worker has free (checked).
fn hand_next(state: &mut FakeState, next: &Value) -> Vec<Value> {
    state.next_asked.push(next.clone());
    let max_tasks = next["max_tasks"].as_u64().unwrap_or(0) as usize;
    if max_tasks == 0 || max_tasks + state.leased.len() > state.concurrency {
        let violation = format!(
            "completion asked for {max_tasks} next tasks with {} leased",
            state.leased.len()
        );
        state.violations.push(violation);
    }
    let count = max_tasks.min(state.pending.len());
    let tasks: Vec<Value> = state.pending.drain(..count).collect();
    for task in &tasks {
        let id = task["task_id"].as_str().unwrap_or_default().to_owned();
        state.leased.insert(id);
    }
    tasks
}

/// `POST /v1/tasks/completions`, as a node answers it: each completion as a single one.
async fn completions(State(fake): State<Arc<Fake>>, Json(body): Json<Value>) -> Response {
    let mut state = fake.state();
    if !state.batches_supported {
        return StatusCode::NOT_FOUND.into_response();
    }
    let items = body["completions"].as_array().cloned().unwrap_or_default();
    state.batches.push(items.len());
    let results: Vec<Value> = items
        .into_iter()
        .map(|item| {
            let task_id = item["task_id"].as_str().unwrap_or_default().to_owned();
            let (status, answer) = apply_call(&mut state, task_id.clone(), "complete", item);
            let mut result = json!({ "task_id": task_id, "status": status.as_u16() });
            if let Some(error) = answer.get("error") {
                result["error"] = error.clone();
            }
            result
        })
        .collect();
    let mut answer = json!({ "results": results });
    if let Some(next) = body.get("next") {
        answer["tasks"] = Value::Array(hand_next(&mut state, next));
    }
    drop(state);
    fake.changed.notify_waiters();
    Json(answer).into_response()
}

/// One task call on the fake's state: the status and body a node answers.
fn apply_call(
    state: &mut FakeState,
    task_id: String,
    action: &str,
    body: Value,
) -> (StatusCode, Value) {
    if body["lease_token"] != json!(format!("lease-{task_id}")) {
        state
            .violations
            .push(format!("{action} of {task_id} with {body}"));
    }
    if action == "complete" {
        *state.complete_calls.entry(task_id.clone()).or_default() += 1;
    }
    if state.stale.contains(&task_id) {
        // A refused lease is no longer this worker's: its slot counts as free.
        state.leased.remove(&task_id);
        let error = json!({"error": {"code": "stale_lease", "message": "lease expired"}});
        (StatusCode::CONFLICT, error)
    } else {
        match action {
            "complete" => {
                state.leased.remove(&task_id);
                state.stale.insert(task_id.clone());
                state.completes.insert(task_id, body);
            }
            "fail" => {
                state.leased.remove(&task_id);
                state.stale.insert(task_id.clone());
                state.fails.insert(task_id, body);
            }
            "heartbeat" => *state.heartbeats.entry(task_id).or_default() += 1,
            _ => return (StatusCode::NOT_FOUND, json!({})),
        }
        (StatusCode::OK, json!({}))
    }
}

/// Starts a fake node expecting a worker of `concurrency`; returns it and its URL.
async fn start_fake(concurrency: usize) -> (Arc<Fake>, String) {
    let fake = Arc::new(Fake::default());
    fake.state().concurrency = concurrency;
    let router = Router::new()
        .route("/v1/tasks/poll", post(poll))
        .route("/v1/tasks/completions", post(completions))
        .route("/v1/tasks/{task_id}/{action}", post(task_call))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (fake, url)
}

/// A running worker and the means to stop it.
struct Running {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<Result<(), weir_sdk::Error>>,
    stats: WorkerStats,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        let joined = tokio::time::timeout(WAIT_MAX, self.done)
            .await
            .expect("worker stops in time");
        joined
            .expect("worker task")
            .expect("worker ends without error");
    }
}

fn run(worker: Worker) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let stats = worker.stats();
    let done = tokio::spawn(worker.run(stopped));
    Running { stop, done, stats }
}

fn builder(urls: Vec<String>) -> weir_sdk::WorkerBuilder {
    Worker::builder(urls)
        .worker_id("test-worker")
        .poll_wait(Duration::from_millis(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_and_complete_bodies() {
    // Goal: no more than `concurrency` handlers run at once, polls ask only for free slots, and
    // every completion carries the lease token and the handler's output. Method: 20 tasks
    // through a worker of 3 slots whose handler counts the handlers running.
    let (fake, url) = start_fake(3).await;
    let ids: Vec<String> = (0..20).map(|index| format!("t{index}")).collect();
    fake.add_tasks(&ids.iter().map(String::as_str).collect::<Vec<_>>());
    let running_now = Arc::new(AtomicUsize::new(0));
    let running_max = Arc::new(AtomicUsize::new(0));
    let (now, max) = (running_now.clone(), running_max.clone());
    let worker = builder(vec![url])
        .concurrency(3)
        .queue("q", move |task: Task, _heartbeat| {
            let (now, max) = (now.clone(), max.clone());
            async move {
                let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(json!({"echo": task.input, "key": task.idempotency_key, "attempt": task.attempt}))
            }
        })
        .build()
        .expect("valid worker");
    let running = run(worker);
    fake.wait_until("all tasks completed", |state| state.completes.len() == 20)
        .await;
    let stats = running.stats.clone();
    running.stop().await;

    let state = fake.state();
    assert!(state.violations.is_empty(), "{:?}", state.violations);
    assert!(running_max.load(Ordering::SeqCst) <= 3);
    assert_eq!(state.polls[0]["max_tasks"], 3);
    assert_eq!(state.polls[0]["queues"], json!(["q"]));
    assert_eq!(state.polls[0]["worker_id"], "test-worker");
    assert_eq!(state.polls[0]["wait_ms"], 200);
    for id in &ids {
        let mut body = state.completes[id].clone();
        // Sent alone, a completion asks for one task to fill the slot it frees.
        if let Some(next) = body.as_object_mut().and_then(|b| b.remove("next")) {
            assert_eq!(next, json!({"queues": ["q"], "max_tasks": 1}));
        }
        assert_eq!(
            body,
            json!({"lease_token": format!("lease-{id}"),
                   "output": {"echo": {"id": id}, "key": format!("key-{id}"), "attempt": 1}})
        );
    }
    assert!(state.fails.is_empty());
    assert_eq!(stats.completed(), 20);
    assert_eq!(stats.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_panics_are_reported() {
    // Goal: a handler's error and a handler's panic both become `fail` calls with the contract's
    // body. Method: one task of each.
    let (fake, url) = start_fake(4).await;
    fake.add_tasks(&["declined", "panics"]);
    let worker = builder(vec![url])
        .concurrency(4)
        .queue("q", |task: Task, _heartbeat| async move {
            if task.task_id == "panics" {
                panic!("handler bug");
            }
            Err(TaskError::non_retryable("card_declined", "no funds"))
        })
        .build()
        .expect("valid worker");
    let running = run(worker);
    fake.wait_until("both tasks failed", |state| state.fails.len() == 2)
        .await;
    let stats = running.stats.clone();
    running.stop().await;

    let state = fake.state();
    assert!(state.violations.is_empty(), "{:?}", state.violations);
    assert_eq!(
        state.fails["declined"],
        json!({"lease_token": "lease-declined",
               "error": {"type": "card_declined", "message": "no funds", "retryable": false}})
    );
    let panicked = &state.fails["panics"]["error"];
    assert_eq!(panicked["type"], "panic");
    assert_eq!(panicked["retryable"], true);
    assert!(
        panicked["message"]
            .as_str()
            .is_some_and(|message| message.contains("handler bug")),
        "{panicked}"
    );
    assert!(state.completes.is_empty());
    assert_eq!(stats.failed(), 2);
    assert_eq!(stats.failed_retryable(), 1);
    assert_eq!(stats.failed_non_retryable(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_may_complete_its_task_itself() {
    // Goal: `Heartbeat::complete` reports the task at once; a second completion (a duplicate)
    // is sent and refused with 409; what the handler returns afterwards is ignored, and the
    // task counts once as completed, not as lease lost (not even when a heartbeat is refused
    // after the completion). Method: one task completed twice by its handler, heartbeated
    // every 10 ms.
    let (fake, url) = start_fake(1).await;
    fake.add_tasks(&["self"]);
    let (done, done_by_handler) = (Arc::new(Notify::new()), Arc::new(Mutex::new(None)));
    let (notify, outcome) = (done.clone(), done_by_handler.clone());
    let worker = builder(vec![url])
        .concurrency(1)
        .heartbeat_interval(Duration::from_millis(10))
        .queue("q", move |_task: Task, heartbeat| {
            let (notify, outcome) = (notify.clone(), outcome.clone());
            async move {
                let first = heartbeat.complete(&json!("first")).await;
                let second = heartbeat.complete(&json!("second")).await;
                // Time for heartbeats, refused now that the lease is spent.
                tokio::time::sleep(Duration::from_millis(50)).await;
                *outcome.lock().expect("outcome lock") = Some((
                    first.is_ok(),
                    second.as_ref().err().map(weir_sdk::Error::is_stale_lease),
                    heartbeat.is_reported(),
                ));
                notify.notify_one();
                Ok(json!("ignored"))
            }
        })
        .build()
        .expect("valid worker");
    let running = run(worker);
    tokio::time::timeout(WAIT_MAX, done.notified())
        .await
        .expect("handler finished");
    let stats = running.stats.clone();
    running.stop().await;

    assert_eq!(
        *done_by_handler.lock().expect("outcome lock"),
        Some((true, Some(true), true))
    );
    let state = fake.state();
    assert_eq!(state.complete_calls["self"], 2);
    assert_eq!(state.completes["self"]["output"], "first");
    assert_eq!(stats.completed(), 1);
    assert_eq!(stats.lease_lost(), 0);
    assert_eq!(stats.unreported(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_lease_on_complete_is_dropped() {
    // Goal: a 409 on complete drops the result: no retry, no fail, the worker goes on.
    // Method: two tasks, the first with a refused lease.
    let (fake, url) = start_fake(2).await;
    fake.state().stale.insert("lost".into());
    fake.add_tasks(&["lost", "kept"]);
    let worker = builder(vec![url])
        .concurrency(2)
        .queue("q", |_task: Task, _heartbeat| async { Ok(json!("done")) })
        .build()
        .expect("valid worker");
    let running = run(worker);
    fake.wait_until("both completions arrived", |state| {
        state.completes.contains_key("kept") && state.complete_calls.contains_key("lost")
    })
    .await;
    let stats = running.stats.clone();
    // Stopping waits for every task in flight, so the counts below are final.
    running.stop().await;

    let state = fake.state();
    assert_eq!(state.complete_calls["lost"], 1);
    assert!(state.fails.is_empty());
    assert_eq!(stats.lease_lost(), 1);
    assert_eq!(stats.completed(), 1);
    assert_eq!(stats.unreported(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_next_url() {
    // Goal: a node that refuses connections and a node that answers 503 are both skipped for
    // the next URL. Method: URLs [closed port, 503 node, good node], one task on the good node.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let address = listener.local_addr().expect("local address");
        drop(listener);
        format!("http://{address}")
    };
    let (unavailable, unavailable_url) = start_fake(1).await;
    unavailable.state().poll_status = Some(StatusCode::SERVICE_UNAVAILABLE);
    let (fake, url) = start_fake(1).await;
    fake.add_tasks(&["t1"]);
    let worker = builder(vec![closed, unavailable_url, url])
        .concurrency(1)
        .queue("q", |_task: Task, _heartbeat| async { Ok(json!(1)) })
        .build()
        .expect("valid worker");
    let running = run(worker);
    fake.wait_until("the task completed", |state| {
        state.completes.contains_key("t1")
    })
    .await;
    running.stop().await;

    assert!(!unavailable.state().polls.is_empty());
    assert!(fake.state().violations.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_tasks_in_flight() {
    // Goal: after shutdown the worker returns only once the task in flight has finished and been
    // reported. Method: a handler held on a gate across the shutdown signal.
    let (fake, url) = start_fake(2).await;
    fake.add_tasks(&["slow"]);
    let started = Arc::new(Notify::new());
    let gate = Arc::new(Notify::new());
    let (started_by_handler, gate_for_handler) = (started.clone(), gate.clone());
    let worker = builder(vec![url])
        .concurrency(2)
        .queue("q", move |_task: Task, _heartbeat| {
            let (started, gate) = (started_by_handler.clone(), gate_for_handler.clone());
            async move {
                started.notify_one();
                gate.notified().await;
                Ok(json!("finished"))
            }
        })
        .build()
        .expect("valid worker");
    let mut running = run(worker);
    tokio::time::timeout(WAIT_MAX, started.notified())
        .await
        .expect("handler started");
    let _ = running.stop.send(());
    let early = tokio::time::timeout(Duration::from_millis(200), &mut running.done).await;
    assert!(early.is_err(), "the worker returned with a task in flight");
    assert!(fake.state().completes.is_empty());

    gate.notify_one();
    let joined = tokio::time::timeout(WAIT_MAX, running.done)
        .await
        .expect("worker stops once the task is done");
    joined
        .expect("worker task")
        .expect("worker ends without error");
    let state = fake.state();
    assert_eq!(state.completes["slow"]["output"], "finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_long_tasks_and_notices_a_lost_lease() {
    // Goal: tasks in flight are heartbeated automatically; a 409 on heartbeat tells the handler
    // and its result is not reported. Method: one task that waits for two heartbeats, one whose
    // heartbeat is refused and that waits for `lease_lost`.
    let (fake, url) = start_fake(2).await;
    fake.state().stale.insert("lost".into());
    fake.add_tasks(&["long", "lost"]);
    let fake_for_handler = fake.clone();
    let worker = builder(vec![url])
        .concurrency(2)
        .heartbeat_interval(Duration::from_millis(20))
        .queue("q", move |task: Task, heartbeat| {
            let fake = fake_for_handler.clone();
            async move {
                if task.task_id == "lost" {
                    tokio::time::timeout(WAIT_MAX, heartbeat.lease_lost())
                        .await
                        .map_err(|_| TaskError::retryable("test", "lease never lost"))?;
                    assert!(heartbeat.is_lease_lost());
                    return Ok(json!("too late"));
                }
                fake.wait_until("two heartbeats", |state| {
                    state
                        .heartbeats
                        .get("long")
                        .is_some_and(|count| *count >= 2)
                })
                .await;
                Ok(json!("long done"))
            }
        })
        .build()
        .expect("valid worker");
    let running = run(worker);
    fake.wait_until("the long task completed", |state| {
        state.completes.contains_key("long")
    })
    .await;
    let stats = running.stats.clone();
    running.stop().await;

    let state = fake.state();
    assert!(!state.complete_calls.contains_key("lost"));
    assert!(!state.fails.contains_key("lost"));
    assert_eq!(stats.lease_lost(), 1);
    assert!(state.violations.is_empty(), "{:?}", state.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_that_finish_together_go_in_batches() {
    // Goal: completions that finish while others are on their way are sent together, and
    // each gets its own answer: a refused lease in a batch is counted as lost, the others
    // as completed, none is sent twice. Method: 60 tasks whose handlers all finish after
    // the same short pause, 3 of them with leases the node refuses; the fake node answers
    // single completions slowly, takes batches and records their sizes.
    const TASKS: usize = 60;
    let (fake, url) = start_fake(TASKS).await;
    fake.state().batches_supported = true;
    // Single completions are slow to answer, so completions that finish meanwhile wait
    // for a free request and go together.
    fake.state().single_complete_delay = Duration::from_millis(20);
    let ids: Vec<String> = (0..TASKS).map(|n| format!("t{n}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    for stale in ["t5", "t17", "t42"] {
        fake.state().stale.insert(stale.to_owned());
    }
    let worker = builder(vec![url])
        .concurrency(TASKS)
        .queue("q", |task: Task, _heartbeat| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(json!({ "done": task.task_id }))
        })
        .build()
        .expect("valid worker");
    let running = run(worker);
    fake.add_tasks(&id_refs);
    fake.wait_until("every task answered", |state| {
        state.completes.len() == TASKS - 3
    })
    .await;
    let stats = running.stats.clone();
    running.stop().await;
    let state = fake.state();
    assert!(state.violations.is_empty(), "{:?}", state.violations);
    assert!(
        state.batches.iter().any(|&size| size > 1),
        "no completions were batched: {:?}",
        state.batches
    );
    assert!(
        state.complete_calls.values().all(|&calls| calls == 1),
        "a completion was sent twice"
    );
    assert_eq!(state.completes["t0"]["output"], json!({ "done": "t0" }));
    assert_eq!(stats.completed(), (TASKS - 3) as u64);
    assert_eq!(stats.lease_lost(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_bring_the_next_tasks_unless_turned_off() {
    // Goal: a worker asks each completion's answer for a task to fill the slot it frees,
    // runs the tasks it gets without polling, never asks for more than its free slots;
    // turned off, its completions ask for nothing and every task comes from a poll.
    // Method: a worker of one slot and 6 tasks queued on the fake node, which hands a
    // pending task to every completion that asks and records the polls.
    for enabled in [true, false] {
        const TASKS: usize = 6;
        let (fake, url) = start_fake(1).await;
        let worker = builder(vec![url])
            .concurrency(1)
            .next_on_completion(enabled)
            .queue("q", |task: Task, _heartbeat| async move {
                Ok(json!({ "done": task.task_id }))
            })
            .build()
            .expect("valid worker");
        let running = run(worker);
        let ids: Vec<String> = (0..TASKS).map(|n| format!("t{n}")).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        fake.add_tasks(&id_refs);
        fake.wait_until("every task completed", |state| {
            state.completes.len() == TASKS
        })
        .await;
        let stats = running.stats.clone();
        running.stop().await;
        let state = fake.state();
        assert!(state.violations.is_empty(), "{:?}", state.violations);
        assert_eq!(stats.completed(), TASKS as u64);
        assert_eq!(state.completes["t3"]["output"], json!({ "done": "t3" }));
        if enabled {
            // The first task came from a poll; every completion brought the next.
            assert_eq!(state.polled_tasks, 1);
            assert!(
                state.next_asked.len() >= TASKS - 1,
                "{:?}",
                state.next_asked
            );
            assert_eq!(
                state.next_asked[0],
                json!({ "queues": ["q"], "max_tasks": 1 })
            );
        } else {
            assert_eq!(state.polled_tasks, TASKS);
            assert!(state.next_asked.is_empty(), "{:?}", state.next_asked);
            assert!(state
                .completes
                .values()
                .all(|body| body.get("next").is_none()));
        }
    }
}
