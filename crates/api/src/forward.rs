//! Any node serves the whole API: a request about an instance whose partition
//! another node owns is forwarded to that node, and a task poll looks at the
//! other nodes' task boards too.
//!
//! A forwarded request carries [`FORWARDED_HEADER`]; a node never forwards such a
//! request again (no loops while ownership moves): it answers it itself, which
//! during a move is a 503 `unavailable` the client retries.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use weir_model::machine;

use crate::extract::read_body;
use crate::AppState;

/// Marks a request one node forwarded to another; its value names the sender.
pub const FORWARDED_HEADER: &str = "x-weir-forwarded-by";
/// How long one node waits for another to connect.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a node waits for a peer to answer a poll that does not wait (a
/// paused or overloaded peer must not hold up this node's workers).
const PEER_POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a forwarded request may take: the longest wait a client may ask
/// for, and a margin for the work itself.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(weir_engine::POLL_WAIT_MAX.as_secs() + 10);
/// How long a poll waits on the local board between looks at the peers' boards.
pub(crate) const POLL_SLICE: Duration = Duration::from_millis(200);

/// The HTTP client nodes use to talk to each other.
pub(crate) fn peer_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(PEER_CONNECT_TIMEOUT)
        .pool_max_idle_per_host(64)
        .build()
        .expect("the peer client builds with static settings")
}

/// Which instance a request is about, from its path alone.
fn instance_of_path<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "instances", id, ..] => Some(id),
        ["v1", "tasks", task_id, _] if method == Method::POST && *task_id != "poll" => {
            machine::parse_task_id(task_id).map(|(instance, _, _)| instance)
        }
        ["v1", "human-tasks", task_id, "complete"] => {
            machine::parse_task_id(task_id).map(|(instance, _, _)| instance)
        }
        _ => None,
    }
}

/// Middleware: forwards requests about instances owned by another node.
pub(crate) async fn to_owner(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if request.headers().contains_key(FORWARDED_HEADER) || state.engine.owns_every_partition() {
        return next.run(request).await;
    }
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if let Some(instance) = instance_of_path(&method, &path) {
        return match state.engine.owner_url(instance) {
            Some(url) => proxy(&state, &url, request, None).await,
            None => next.run(request).await,
        };
    }
    // A start names its instance in the body (when it names one at all).
    if method == Method::POST && path == "/v1/instances" {
        let (parts, body) = request.into_parts();
        let bytes = match read_body(body, state.limits.body_size_max).await {
            Ok(bytes) => bytes,
            Err(err) => return err.into_response(),
        };
        let owner = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string))
            .and_then(|id| state.engine.owner_url(&id));
        let request = Request::from_parts(parts, Body::from(bytes.clone()));
        return match owner {
            Some(url) => proxy(&state, &url, request, Some(bytes)).await,
            None => next.run(request).await,
        };
    }
    next.run(request).await
}

/// Sends `request` to the node at `base` and relays its answer. If the node cannot
/// be reached, answers 503 so that the client retries (ownership is moving).
async fn proxy(
    state: &AppState,
    base: &str,
    request: Request,
    body: Option<axum::body::Bytes>,
) -> Response {
    let (parts, original) = request.into_parts();
    let bytes = match body {
        Some(bytes) => bytes,
        None => match read_body(original, state.limits.body_size_max).await {
            Ok(bytes) => bytes,
            Err(err) => return err.into_response(),
        },
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    let url = format!("{}{path_and_query}", base.trim_end_matches('/'));
    let mut outgoing = state
        .peers
        .request(parts.method.clone(), &url)
        .header(FORWARDED_HEADER, state.engine.node_id())
        .timeout(FORWARD_TIMEOUT)
        .body(bytes.to_vec());
    if let Some(content_type) = parts.headers.get(axum::http::header::CONTENT_TYPE) {
        outgoing = outgoing.header(axum::http::header::CONTENT_TYPE, content_type.clone());
    }
    match outgoing.send().await {
        Ok(answer) => {
            let status =
                StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = answer.headers().get(reqwest::header::CONTENT_TYPE).cloned();
            match answer.bytes().await {
                Ok(body) => {
                    let mut response = (status, body).into_response();
                    if let Some(value) =
                        content_type.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
                    {
                        response
                            .headers_mut()
                            .insert(axum::http::header::CONTENT_TYPE, value);
                    }
                    response
                }
                Err(err) => unreachable_owner(base, &err.to_string()),
            }
        }
        Err(err) => unreachable_owner(base, &err.to_string()),
    }
}

fn unreachable_owner(base: &str, why: &str) -> Response {
    tracing::debug!(owner = base, error = why, "forwarding failed");
    crate::ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        format!("the node owning this instance ({base}) did not answer; retry"),
    )
    .into_response()
}

/// POSTs `body` as JSON to `path` on the node at `base`, marked as forwarded, and
/// reads a JSON answer; why not, if the node did not answer with a success.
async fn post_to_peer(
    state: &AppState,
    base: &str,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> Result<Value, String> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let answer = state
        .peers
        .post(&url)
        .header(FORWARDED_HEADER, state.engine.node_id())
        .timeout(timeout)
        .json(body)
        .send()
        .await
        .map_err(|err| err.to_string())?;
    if !answer.status().is_success() {
        return Err(format!("it answered {}", answer.status()));
    }
    answer.json().await.map_err(|err| err.to_string())
}

/// Takes tasks from the other nodes' boards without waiting: the first peer with
/// tasks answers. `body` is the poll as the worker sent it, with `wait_ms` zeroed.
pub(crate) async fn poll_peers(state: &AppState, body: &Value) -> Vec<Value> {
    for base in state.engine.peer_urls() {
        let answer = post_to_peer(state, &base, "/v1/tasks/poll", body, PEER_POLL_TIMEOUT).await;
        if let Ok(Value::Object(mut answer)) = answer {
            if let Some(Value::Array(tasks)) = answer.remove("tasks") {
                if !tasks.is_empty() {
                    return tasks;
                }
            }
        }
    }
    Vec::new()
}

/// Sends a batch of completions to the node at `base`; its results, in order, or
/// why it did not answer.
pub(crate) async fn complete_on(
    state: &AppState,
    base: &str,
    completions: Vec<Value>,
) -> Result<Vec<Value>, String> {
    let body = serde_json::json!({ "completions": completions });
    let mut answer =
        post_to_peer(state, base, "/v1/tasks/completions", &body, FORWARD_TIMEOUT).await?;
    match answer.get_mut("results").map(Value::take) {
        Some(Value::Array(results)) => Ok(results),
        _ => Err("its answer had no results".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_the_instance_they_name() {
        let post = Method::POST;
        assert_eq!(
            instance_of_path(&Method::GET, "/v1/instances/a-1"),
            Some("a-1")
        );
        assert_eq!(
            instance_of_path(&post, "/v1/instances/a-1/cancel"),
            Some("a-1")
        );
        assert_eq!(
            instance_of_path(&post, "/v1/tasks/a-1:s:2/complete"),
            Some("a-1")
        );
        assert_eq!(instance_of_path(&post, "/v1/tasks/poll"), None);
        assert_eq!(
            instance_of_path(&post, "/v1/human-tasks/p~c~1:ok:1/complete"),
            Some("p~c~1")
        );
        assert_eq!(instance_of_path(&Method::GET, "/v1/instances"), None);
        assert_eq!(instance_of_path(&Method::GET, "/v1/definitions/x"), None);
    }
}
