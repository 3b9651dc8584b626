//! The v1 routes and their JSON shapes.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use weir_engine::{
    HistoryEvent, InstanceView, StartOutcome, StartRequest, TaskOffer, TaskReservation,
};
use weir_model::event::ErrorInfo;
use weir_model::machine::InstanceStatus;
use weir_store::{InstanceQuery, ListCursor};

use crate::error::ApiError;
use crate::extract::{parse_json, read_body};
use crate::AppState;

/// Most queues one poll may name.
const POLL_QUEUES_MAX: usize = 64;
/// Default page size of listings.
const LIST_LIMIT_DEFAULT: u32 = 100;

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/v1/definitions", post(deploy).get(list_definitions))
        .route("/v1/definitions/{name}", get(get_definition))
        .route("/v1/instances", post(start).get(list_instances))
        .route("/v1/instances/{id}", get(get_instance))
        .route("/v1/instances/{id}/history", get(history))
        .route("/v1/instances/{id}/cancel", post(cancel))
        .route("/v1/instances/{id}/terminate", post(terminate))
        .route("/v1/instances/{id}/pause", post(pause))
        .route("/v1/instances/{id}/resume", post(resume))
        .route("/v1/instances/{id}/retry", post(retry))
        .route("/v1/instances/{id}/rerun", post(rerun))
        .route("/v1/instances/{id}/restart", post(restart))
        .route("/v1/instances/{id}/signals/{name}", post(signal))
        .route("/v1/human-tasks", get(list_human_tasks))
        .route(
            "/v1/human-tasks/{task_id}/complete",
            post(complete_human_task),
        )
        .route("/v1/tasks/poll", post(poll))
        .route("/v1/tasks/completions", post(complete_batch))
        .route("/v1/tasks/{task_id}/complete", post(complete))
        .route("/v1/tasks/{task_id}/fail", post(fail))
        .route("/v1/tasks/{task_id}/heartbeat", post(heartbeat))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/nodes/{node_id}/drain", post(drain))
        .route("/v1/nodes/{node_id}/undrain", post(undrain))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::forward::to_owner,
        ))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
}

/// Logs every request at debug level when it ends: method, path, status and time.
async fn log_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = std::time::Instant::now();
    tracing::debug!(%method, path, "request started");
    let response = next.run(request).await;
    tracing::debug!(
        %method,
        path,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "request ended"
    );
    response
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when this node holds every partition the ring places on it (a standby
/// with none placed on it is ready too) and its last heartbeat is recent.
async fn readyz(State(state): State<AppState>) -> Response {
    let (owned, placed) = state.engine.ownership();
    if state.engine.ready() {
        Json(json!({
            "status": "ready",
            "node": state.engine.node_id(),
            "partitions": state.engine.partition_count(),
            "owned": owned.len(),
            "placed": placed,
        }))
        .into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!(
                "this node owns {} of the {placed} partitions placed on it, or its heartbeat is late",
                owned.len()
            ),
        )
        .with("owned", owned.len().into())
        .with("placed", placed.into())
        .into_response()
    }
}

async fn cluster_status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let status = state.engine.cluster_status().await?;
    let nodes: Vec<Value> = status
        .nodes
        .iter()
        .map(|n| {
            json!({
                "node_id": n.node_id,
                "url": n.url,
                "role": n.role,
                "alive": n.alive,
                "draining": n.draining,
                "heartbeat_age_ms": n.heartbeat_age_ms,
                "joined_at": rfc3339(n.joined_at),
                "partitions": n.partitions,
                "placed": n.placed,
            })
        })
        .collect();
    let partitions: Vec<Value> = status
        .partitions
        .iter()
        .map(|p| {
            json!({
                "partition": p.partition,
                "owner": p.owner,
                "epoch": p.epoch,
                "expires_in_ms": p.expires_in_ms,
                "placed_on": p.placed_on,
            })
        })
        .collect();
    Ok(Json(json!({
        "node_id": status.node_id,
        "store_time": rfc3339(status.store_now),
        "nodes": nodes,
        "partitions": partitions,
    })))
}

async fn drain(
    State(state): State<AppState>,
    Path(node_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.engine.set_draining(&node_id, true).await?;
    Ok(Json(json!({ "node_id": node_id, "draining": true })))
}

async fn undrain(
    State(state): State<AppState>,
    Path(node_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.engine.set_draining(&node_id, false).await?;
    Ok(Json(json!({ "node_id": node_id, "draining": false })))
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn instance_json(view: &InstanceView) -> Value {
    serde_json::to_value(InstanceWire::of(view)).unwrap_or(Value::Null)
}

/// An instance as the API shows it, serialized from the view without copying its
/// input and output (the fields in the order `json!`'s sorted map gave them).
#[derive(Serialize)]
struct InstanceWire<'a> {
    /// Only in a start's answer: whether the start created the instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    created_at: String,
    definition: &'a str,
    error: &'a Option<Value>,
    id: &'a str,
    input: &'a Value,
    output: &'a Option<Value>,
    status: &'a str,
    updated_at: String,
    version: u32,
}

impl<'a> InstanceWire<'a> {
    fn of(view: &'a InstanceView) -> InstanceWire<'a> {
        InstanceWire {
            created: None,
            created_at: rfc3339(view.created_at),
            definition: &view.definition,
            error: &view.error,
            id: &view.id,
            input: &view.input,
            output: &view.output,
            status: &view.status,
            updated_at: rfc3339(view.updated_at),
            version: view.version,
        }
    }
}

fn event_json(event: HistoryEvent) -> Value {
    let mut object = Map::new();
    object.insert("seq".into(), event.seq.into());
    if let Value::Object(fields) = event.event {
        // `type` first after `seq`, then the event's own fields.
        if let Some(kind) = fields.get("type") {
            object.insert("type".into(), kind.clone());
        }
        object.insert("at".into(), rfc3339(event.at).into());
        object.insert("epoch".into(), event.epoch.into());
        for (key, value) in fields {
            if key != "type" {
                object.insert(key, value);
            }
        }
    }
    Value::Object(object)
}

/// A task as a poll answers it.
#[derive(Serialize)]
struct OfferWire<'a> {
    task_id: &'a str,
    lease_token: &'a str,
    queue: &'a str,
    instance_id: &'a str,
    step_id: &'a str,
    attempt: u32,
    input: &'a Value,
    idempotency_key: &'a str,
}

impl<'a> From<&'a TaskOffer> for OfferWire<'a> {
    fn from(offer: &'a TaskOffer) -> OfferWire<'a> {
        OfferWire {
            task_id: &offer.task_id,
            lease_token: &offer.lease_token,
            queue: &offer.queue,
            instance_id: &offer.instance_id,
            step_id: &offer.step_id,
            attempt: offer.attempt,
            input: &offer.input,
            idempotency_key: &offer.idempotency_key,
        }
    }
}

/// A poll's answer, serialized from the offers as they are (a `Value` tree of them would
/// copy every input first).
fn offers_response(offers: &[TaskOffer]) -> Response {
    #[derive(Serialize)]
    struct Tasks<'a> {
        tasks: Vec<OfferWire<'a>>,
    }
    let tasks = Tasks {
        tasks: offers.iter().map(OfferWire::from).collect(),
    };
    Json(tasks).into_response()
}

async fn deploy(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.limits.definition_size_max).await?;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/yaml");
    let known = [
        "application/yaml",
        "application/x-yaml",
        "text/yaml",
        "application/json",
        "text/plain",
    ];
    if !known.iter().any(|k| content_type.starts_with(k)) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("definitions are YAML or JSON, not {content_type}"),
        ));
    }
    let source =
        std::str::from_utf8(&bytes).map_err(|_| ApiError::invalid("definition is not UTF-8"))?;
    // JSON is a subset of YAML: one parser reports positions for both.
    let (name, version) = state.engine.deploy(source).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": name, "version": version })),
    )
        .into_response())
}

async fn list_definitions(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let definitions = state.engine.definitions().await?;
    let items: Vec<Value> = definitions
        .into_iter()
        .map(|d| json!({ "name": d.name, "version": d.version, "created_at": rfc3339(d.created_at) }))
        .collect();
    Ok(Json(json!({ "definitions": items })))
}

async fn get_definition(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let version = match query.get("version") {
        None => None,
        Some(text) => Some(text.parse::<u32>().map_err(|_| {
            ApiError::invalid("version must be a positive integer")
                .with("parameter", "version".into())
        })?),
    };
    let definition = state.engine.definition(&name, version).await?;
    Ok(Json(json!({
        "name": definition.name,
        "version": definition.version,
        "source": definition.source,
        "created_at": rfc3339(definition.created_at),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    definition: String,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    id: Option<String>,
}

/// `POST /v1/instances[?wait_ms=N]`: starts an instance; with `wait_ms`, also waits
/// up to that long for it to end (a start and a `GET ?wait_ms=` in one request)
/// and answers its view then, ended or not.
async fn start(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    body: Body,
) -> Result<Response, ApiError> {
    let wait = wait_param(&query)?;
    let bytes = read_body(body, state.limits.body_size_max).await?;
    let body: StartBody = parse_json(&bytes)?;
    let request = StartRequest {
        definition: body.definition,
        version: body.version,
        input: body.input.unwrap_or_else(|| json!({})),
        id: body.id,
        restart: None,
        parent: None,
    };
    let (view, outcome) = state.engine.start_instance_and_wait(request, wait).await?;
    let status = match outcome {
        StartOutcome::Created => StatusCode::CREATED,
        StartOutcome::Existing => StatusCode::OK,
    };
    let answer = InstanceWire {
        created: Some(outcome == StartOutcome::Created),
        ..InstanceWire::of(&view)
    };
    Ok((status, Json(answer)).into_response())
}

/// The `wait_ms` query parameter (zero when absent).
fn wait_param(query: &HashMap<String, String>) -> Result<Duration, ApiError> {
    match query.get("wait_ms") {
        None => Ok(Duration::ZERO),
        Some(text) => text.parse::<u64>().map(Duration::from_millis).map_err(|_| {
            ApiError::invalid("wait_ms must be a non-negative integer")
                .with("parameter", "wait_ms".into())
        }),
    }
}

async fn get_instance(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let wait = wait_param(&query)?;
    let view = state.engine.wait_instance(&id, wait).await?;
    let view = view.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("instance {id} does not exist"),
        )
    })?;
    Ok(Json(InstanceWire::of(&view)).into_response())
}

/// A listing's `next_cursor`: the last instance's creation time, a dot, and its id (a
/// time has no dot, so the first one ends it). Clients pass it back as it is.
fn list_cursor_text(created_at: u64, id: &str) -> String {
    format!("{created_at}.{id}")
}

/// Reads [`list_cursor_text`]'s form; `None` for anything else, ids checked as a start's.
fn parse_list_cursor(text: &str) -> Option<ListCursor> {
    let (created_at, id) = text.split_once('.')?;
    if created_at.is_empty() || !created_at.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let created_at: u64 = created_at.parse().ok()?;
    // Times are stored as signed 64-bit integers.
    i64::try_from(created_at).ok()?;
    weir_engine::check_id("id", id).ok()?;
    Some(ListCursor {
        created_at,
        id: id.to_string(),
    })
}

async fn list_instances(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    for key in query.keys() {
        if !["status", "definition", "limit", "cursor"].contains(&key.as_str()) {
            return Err(
                ApiError::invalid(format!("unknown query parameter `{key}`"))
                    .with("parameter", key.clone().into()),
            );
        }
    }
    if let Some(status) = query.get("status") {
        if InstanceStatus::parse(status).is_none() {
            return Err(ApiError::invalid(format!("unknown status `{status}`"))
                .with("parameter", "status".into()));
        }
    }
    let limit = match query.get("limit") {
        None => LIST_LIMIT_DEFAULT,
        Some(text) => match text.parse::<u32>() {
            Ok(limit) if (1..=weir_engine::LIST_LIMIT_MAX).contains(&limit) => limit,
            _ => {
                return Err(ApiError::invalid(format!(
                    "limit must be an integer from 1 to {}",
                    weir_engine::LIST_LIMIT_MAX
                ))
                .with("parameter", "limit".into()))
            }
        },
    };
    let before = match query.get("cursor") {
        None => None,
        Some(text) => Some(parse_list_cursor(text).ok_or_else(|| {
            ApiError::invalid(format!(
                "cursor `{text}` is not one this server made: pass a listing's `next_cursor`"
            ))
            .with("parameter", "cursor".into())
        })?),
    };
    let views = state
        .engine
        .instances(InstanceQuery {
            status: query.get("status").cloned(),
            definition: query.get("definition").cloned(),
            before,
            limit,
        })
        .await?;
    let next_cursor = if views.len() == limit as usize {
        views
            .last()
            .map(|v| Value::String(list_cursor_text(v.created_at, &v.id)))
            .unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let items: Vec<Value> = views.iter().map(instance_json).collect();
    Ok(Json(
        json!({ "instances": items, "next_cursor": next_cursor }),
    ))
}

async fn history(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let events = state.engine.history(&id).await?;
    let events: Vec<Value> = events.into_iter().map(event_json).collect();
    Ok(Json(json!({ "events": events })))
}

/// The body of an operation on an instance; every field is optional where the
/// operation allows it.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OperationBody {
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    from_step: Option<String>,
}

/// Who asked when the body does not say.
const BY_DEFAULT: &str = "api";

async fn operation_body(state: &AppState, body: Body) -> Result<OperationBody, ApiError> {
    let bytes = read_body(body, state.limits.body_size_max).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(OperationBody::default());
    }
    parse_json(&bytes)
}

fn by(body: &OperationBody) -> &str {
    body.by.as_deref().unwrap_or(BY_DEFAULT)
}

async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = operation_body(&state, body).await?;
    Ok(Json(instance_json(
        &state.engine.cancel(&id, by(&body)).await?,
    )))
}

async fn terminate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = operation_body(&state, body).await?;
    let reason = body.reason.as_deref().unwrap_or("terminated on request");
    Ok(Json(instance_json(
        &state.engine.terminate(&id, by(&body), reason).await?,
    )))
}

async fn pause(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = operation_body(&state, body).await?;
    Ok(Json(instance_json(
        &state.engine.pause(&id, by(&body)).await?,
    )))
}

async fn resume(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = operation_body(&state, body).await?;
    Ok(Json(instance_json(
        &state.engine.resume(&id, by(&body)).await?,
    )))
}

async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = operation_body(&state, body).await?;
    Ok(Json(instance_json(
        &state.engine.retry(&id, by(&body)).await?,
    )))
}

async fn rerun(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = operation_body(&state, body).await?;
    let Some(from_step) = body.from_step.as_deref() else {
        return Err(
            ApiError::invalid("rerun needs `from_step`").with("pointer", "/from_step".into())
        );
    };
    Ok(Json(instance_json(
        &state.engine.rerun(&id, by(&body), from_step).await?,
    )))
}

async fn restart(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = operation_body(&state, body).await?;
    let view = state.engine.restart(&id, by(&body)).await?;
    let mut object = instance_json(&view);
    object["restarted_from"] = Value::String(id);
    Ok((StatusCode::CREATED, Json(object)).into_response())
}

async fn signal(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, state.limits.body_size_max).await?;
    let payload: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        parse_json(&bytes)?
    };
    Ok(Json(instance_json(
        &state.engine.signal(&id, &name, payload).await?,
    )))
}

async fn list_human_tasks(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    for key in query.keys() {
        if !["assignee", "group"].contains(&key.as_str()) {
            return Err(
                ApiError::invalid(format!("unknown query parameter `{key}`"))
                    .with("parameter", key.clone().into()),
            );
        }
    }
    let tasks = state.engine.human_tasks(
        query.get("assignee").map(String::as_str),
        query.get("group").map(String::as_str),
    );
    let tasks: Vec<Value> = tasks
        .into_iter()
        .map(|t| {
            json!({
                "task_id": t.task_id,
                "instance_id": t.instance_id,
                "step_id": t.step_id,
                "attempt": t.attempt,
                "title": t.input["title"],
                "assignee": t.input["assignee"],
                "group": t.input["group"],
                "schema": t.input["schema"],
            })
        })
        .collect();
    Ok(Json(json!({ "tasks": tasks })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteHumanBody {
    by: String,
    #[serde(default)]
    data: Value,
}

async fn complete_human_task(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, state.limits.body_size_max).await?;
    let body: CompleteHumanBody = parse_json(&bytes)?;
    if body.by.trim().is_empty() {
        return Err(
            ApiError::invalid("`by` must say who completed the task").with("pointer", "/by".into())
        );
    }
    state
        .engine
        .complete_human_task(&task_id, &body.by, body.data)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PollBody {
    queues: Vec<String>,
    #[serde(default)]
    worker_id: Option<String>,
    #[serde(default)]
    max_tasks: Option<u32>,
    #[serde(default)]
    wait_ms: Option<u64>,
}

async fn poll(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.limits.body_size_max).await?;
    let body: PollBody = parse_json(&bytes)?;
    let max_tasks = check_poll(&body.queues, body.max_tasks.unwrap_or(1), "")?;
    let wait = Duration::from_millis(body.wait_ms.unwrap_or(0)).min(crate::POLL_WAIT_MAX);
    let _ = body.worker_id;
    let forwarded = headers.contains_key(crate::FORWARDED_HEADER);
    // A node whose store no other node shares has no peers to ask. One that shares it
    // asks its peers at every slice, even with none now: a node may join during the wait
    // and take partitions whose tasks this poll would not see otherwise.
    if forwarded || !state.engine.shares_its_store() {
        let offers = state.engine.poll(&body.queues, max_tasks, wait).await;
        return Ok(offers_response(&offers));
    }
    // In a cluster: this node's board first, then the peers' (without waiting), then
    // wait a slice on this board, and again until the wait is over.
    let peer_poll = json!({ "queues": body.queues, "max_tasks": max_tasks, "wait_ms": 0 });
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if state.engine.polls_stopped() {
            return Ok(Json(json!({ "tasks": [] })).into_response());
        }
        let offers = state
            .engine
            .poll(&body.queues, max_tasks, Duration::ZERO)
            .await;
        if !offers.is_empty() {
            return Ok(offers_response(&offers));
        }
        let tasks = crate::forward::poll_peers(&state, &peer_poll).await;
        if !tasks.is_empty() {
            return Ok(Json(json!({ "tasks": tasks })).into_response());
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Ok(Json(json!({ "tasks": [] })).into_response());
        }
        let slice = remaining.min(crate::forward::POLL_SLICE);
        let offers = state.engine.poll(&body.queues, max_tasks, slice).await;
        if state.engine.polls_stopped() {
            return Ok(Json(json!({ "tasks": [] })).into_response());
        }
        if !offers.is_empty() {
            return Ok(offers_response(&offers));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Json(json!({ "tasks": [] })).into_response());
        }
    }
}

/// Checks a poll's queues and task count (`pointer` prefixes the JSON pointers of
/// errors); returns the count.
fn check_poll(queues: &[String], max_tasks: u32, pointer: &str) -> Result<usize, ApiError> {
    if queues.is_empty() || queues.len() > POLL_QUEUES_MAX {
        return Err(
            ApiError::invalid(format!("queues must name 1 to {POLL_QUEUES_MAX} queues"))
                .with("pointer", format!("{pointer}/queues").into()),
        );
    }
    for (index, queue) in queues.iter().enumerate() {
        if weir_engine::check_id("queue name", queue).is_err() {
            return Err(ApiError::invalid(format!("bad queue name `{queue}`"))
                .with("pointer", format!("{pointer}/queues/{index}").into()));
        }
    }
    let max_tasks = max_tasks as usize;
    if max_tasks == 0 || max_tasks > weir_engine::POLL_TASKS_MAX {
        return Err(ApiError::invalid(format!(
            "max_tasks must be from 1 to {}",
            weir_engine::POLL_TASKS_MAX
        ))
        .with("pointer", format!("{pointer}/max_tasks").into()));
    }
    Ok(max_tasks)
}

/// What a completing worker asks for besides the completion: up to `max_tasks` more
/// tasks of `queues`, answered in `tasks` with leases as a poll's would be.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NextTasks {
    queues: Vec<String>,
    max_tasks: u32,
}

impl NextTasks {
    /// Opens the reservation that catches the tasks the completions make. `None` when
    /// the engine keeps none now (stopping, or too many open): the answer then has no
    /// tasks and the worker polls.
    fn reserve(
        next: Option<&NextTasks>,
        state: &AppState,
    ) -> Result<Option<TaskReservation>, ApiError> {
        let Some(next) = next else {
            return Ok(None);
        };
        let max_tasks = check_poll(&next.queues, next.max_tasks, "/next")?;
        Ok(state.engine.reserve_tasks(&next.queues, max_tasks))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteBody {
    lease_token: String,
    #[serde(default)]
    output: Value,
    /// Next tasks to hand back in the answer.
    #[serde(default)]
    next: Option<NextTasks>,
}

/// `POST /v1/tasks/{task_id}/complete`. With `next`, the answer's `tasks` holds up to
/// `next.max_tasks` tasks leased to the caller, the instance's next step's first among
/// them when it is a task of one of `next.queues`: the worker needs no poll for it.
async fn complete(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.limits.body_size_max).await?;
    let body: CompleteBody = parse_json(&bytes)?;
    // Opened before the completion commits, so that the task its commit offers comes
    // here; dropped (offering its tasks again) if the completion is refused.
    let reservation = NextTasks::reserve(body.next.as_ref(), &state)?;
    state
        .engine
        .complete_task(&task_id, &body.lease_token, body.output)
        .await?;
    if body.next.is_none() {
        return Ok(Json(json!({})).into_response());
    }
    let offers = reservation.map(TaskReservation::take).unwrap_or_default();
    Ok(offers_response(&offers))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionsBody {
    completions: Vec<CompletionItem>,
    /// Next tasks to hand back in the answer.
    #[serde(default)]
    next: Option<NextTasks>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionItem {
    task_id: String,
    lease_token: String,
    #[serde(default)]
    output: Value,
}

/// `POST /v1/tasks/completions`: several completions in one request. The answer
/// is 200 with one result per completion, in order: `{"task_id", "status"}` and,
/// unless `status` is 200, the `error` a single completion would have answered.
/// In a cluster, completions of instances another node owns are sent on to it in
/// one request per node. With `next`, the answer's `tasks` holds tasks leased to the
/// caller as for one completion; only tasks offered on this node are caught, so the
/// next steps of instances another node owns reach the worker through its polls.
async fn complete_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.limits.body_size_max).await?;
    let body: CompletionsBody = parse_json(&bytes)?;
    let count = body.completions.len();
    if count == 0 || count > weir_engine::COMPLETIONS_BATCH_MAX {
        return Err(ApiError::invalid(format!(
            "completions must hold 1 to {} completions",
            weir_engine::COMPLETIONS_BATCH_MAX
        ))
        .with("pointer", "/completions".into()));
    }
    let reservation = NextTasks::reserve(body.next.as_ref(), &state)?;
    let asked = body.next.is_some();
    let forwarded = headers.contains_key(crate::FORWARDED_HEADER);
    // Which node answers each completion, keeping each one's place in the batch.
    let mut local = Vec::new();
    let mut remote: HashMap<String, Vec<(usize, Value)>> = HashMap::new();
    for (index, item) in body.completions.into_iter().enumerate() {
        let owner = match weir_model::machine::parse_task_id(&item.task_id) {
            Some((instance, _, _)) if !forwarded => state.engine.owner_url(instance),
            _ => None,
        };
        match owner {
            Some(url) => remote.entry(url).or_default().push((
                index,
                json!({ "task_id": item.task_id, "lease_token": item.lease_token, "output": item.output }),
            )),
            None => local.push((
                index,
                weir_engine::TaskCompletion {
                    task_id: item.task_id,
                    lease_token: item.lease_token,
                    output: item.output,
                },
            )),
        }
    }
    // Other nodes' completions go out first and run beside this node's.
    let mut forwarded_batches = Vec::with_capacity(remote.len());
    for (url, entries) in remote {
        let (indexes, batch): (Vec<usize>, Vec<Value>) = entries.into_iter().unzip();
        let task_ids: Vec<Value> = batch.iter().map(|b| b["task_id"].clone()).collect();
        let state = state.clone();
        let ids = task_ids.clone();
        let sent = tokio::spawn(async move {
            match crate::forward::complete_on(&state, &url, batch).await {
                Ok(answers) if answers.len() == ids.len() => answers,
                Ok(_) => unavailable_results(
                    &ids,
                    &format!("the node owning this instance ({url}) answered a different number of results; retry"),
                ),
                Err(why) => unavailable_results(
                    &ids,
                    &format!("the node owning this instance ({url}) did not take it ({why}); retry"),
                ),
            }
        });
        forwarded_batches.push((indexes, task_ids, sent));
    }
    let (local_indexes, completions): (Vec<usize>, Vec<weir_engine::TaskCompletion>) =
        local.into_iter().unzip();
    let task_ids: Vec<Value> = completions
        .iter()
        .map(|c| Value::String(c.task_id.clone()))
        .collect();
    let outcomes = state.engine.complete_tasks(completions).await;
    let mut results: Vec<Value> = vec![Value::Null; count];
    for ((index, task_id), outcome) in local_indexes.into_iter().zip(task_ids).zip(outcomes) {
        results[index] = completion_result(&task_id, outcome.map_err(ApiError::from));
    }
    for (indexes, task_ids, sent) in forwarded_batches {
        let answers = sent.await.unwrap_or_else(|err| {
            unavailable_results(
                &task_ids,
                &format!("forwarding the completion failed ({err}); retry"),
            )
        });
        for (index, answer) in indexes.into_iter().zip(answers) {
            results[index] = answer;
        }
    }
    if !asked {
        return Ok(Json(json!({ "results": results })).into_response());
    }
    #[derive(Serialize)]
    struct Answer<'a> {
        results: Vec<Value>,
        tasks: Vec<OfferWire<'a>>,
    }
    let offers = reservation.map(TaskReservation::take).unwrap_or_default();
    let answer = Answer {
        results,
        tasks: offers.iter().map(OfferWire::from).collect(),
    };
    Ok(Json(answer).into_response())
}

/// One result of a batch of completions.
fn completion_result(task_id: &Value, outcome: Result<(), ApiError>) -> Value {
    match outcome {
        Ok(()) => json!({ "task_id": task_id, "status": 200 }),
        Err(err) => {
            let status = err.status.as_u16();
            json!({ "task_id": task_id, "status": status, "error": err.into_error_object() })
        }
    }
}

/// A 503 `unavailable` result for each of `task_ids`: the client sends them again.
fn unavailable_results(task_ids: &[Value], message: &str) -> Vec<Value> {
    task_ids
        .iter()
        .map(|task_id| {
            let error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
            completion_result(task_id, Err(error))
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailBody {
    lease_token: String,
    error: FailError,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailError {
    #[serde(rename = "type")]
    error_type: String,
    #[serde(default)]
    message: String,
    #[serde(default = "retryable_default")]
    retryable: bool,
}

fn retryable_default() -> bool {
    true
}

async fn fail(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, state.limits.body_size_max).await?;
    let body: FailBody = parse_json(&bytes)?;
    if body.error.error_type.is_empty() {
        return Err(
            ApiError::invalid("error type must not be empty").with("pointer", "/error/type".into())
        );
    }
    let error = ErrorInfo {
        error_type: body.error.error_type,
        message: body.error.message,
    };
    state
        .engine
        .fail_task(&task_id, &body.lease_token, error, body.error.retryable)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatBody {
    lease_token: String,
}

async fn heartbeat(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, state.limits.body_size_max).await?;
    let body: HeartbeatBody = parse_json(&bytes)?;
    state.engine.heartbeat_task(&task_id, &body.lease_token)?;
    Ok(Json(json!({})))
}
