//! The client's operations on instances against fake weir nodes: tiny axum servers in the test
//! that record every request, over real HTTP on 127.0.0.1.
//!
//! Goal: each operation sends the documented method, path and body and reads the instance
//! answered; none is repeated on another node where it may have taken effect (500, timeout),
//! while a refused connection and a 503 move it on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{OriginalUri, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use weir_sdk::{Client, Error, InstanceStatus};

/// How a fake node answers every request.
#[derive(Clone)]
enum Behaviour {
    /// 200 with an instance (201 for a restart).
    Answer,
    /// This status with an error body.
    Status(StatusCode),
    /// No answer for this long.
    Hang(Duration),
    /// `307 Temporary Redirect` to the same path on this base URL.
    Redirect(String),
}

struct Fake {
    behaviour: Behaviour,
    /// Path and body (`null` when empty, the raw text when not JSON) of every request.
    requests: Mutex<Vec<(String, Value)>>,
}

impl Fake {
    fn requests(&self) -> Vec<(String, Value)> {
        self.requests.lock().expect("requests lock").clone()
    }
}

fn instance(id: &str, status: &str) -> Value {
    json!({
        "id": id, "definition": "order", "version": 1, "status": status,
        "input": {"sku": "a"}, "output": null, "error": null,
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:01Z"
    })
}

async fn answer(
    State(fake): State<Arc<Fake>>,
    OriginalUri(uri): OriginalUri,
    body: Bytes,
) -> Response {
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
    };
    let path = uri.path().to_owned();
    fake.requests
        .lock()
        .expect("requests lock")
        .push((path.clone(), body));
    match &fake.behaviour {
        Behaviour::Answer => {
            let segments: Vec<&str> = path.split('/').collect();
            // /v1/instances/{id}/{action}...
            let id = segments.get(3).copied().unwrap_or_default();
            let action = segments.get(4).copied().unwrap_or_default();
            let status = match action {
                "cancel" => "compensating",
                "terminate" => "terminated",
                "pause" => "paused",
                _ => "running",
            };
            if action == "restart" {
                let mut new = instance("new-1", "running");
                new["restarted_from"] = json!(id);
                return (StatusCode::CREATED, axum::Json(new)).into_response();
            }
            axum::Json(instance(id, status)).into_response()
        }
        Behaviour::Status(status) => {
            let error = json!({"error": {"code": "conflict", "message": "no"}});
            (*status, axum::Json(error)).into_response()
        }
        Behaviour::Hang(duration) => {
            tokio::time::sleep(*duration).await;
            axum::Json(instance("late", "running")).into_response()
        }
        Behaviour::Redirect(base) => (
            StatusCode::TEMPORARY_REDIRECT,
            [(axum::http::header::LOCATION, format!("{base}{path}"))],
        )
            .into_response(),
    }
}

async fn start_fake(behaviour: Behaviour) -> (Arc<Fake>, String) {
    let fake = Arc::new(Fake {
        behaviour,
        requests: Mutex::new(Vec::new()),
    });
    let router = Router::new().fallback(answer).with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (fake, url)
}

/// A URL on which nothing listens.
fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let address = listener.local_addr().expect("local address");
    drop(listener);
    format!("http://{address}")
}

#[tokio::test]
async fn operations_send_their_documented_requests() {
    let (fake, url) = start_fake(Behaviour::Answer).await;
    let client = Client::new(vec![url]).expect("valid client");

    let cancelled = client.cancel("o-1").await.expect("cancel");
    assert_eq!(cancelled.status, InstanceStatus::Compensating);
    client
        .cancel_by("o-1", Some("alice"))
        .await
        .expect("cancel_by");
    let terminated = client
        .terminate("o-1", Some("alice"), Some("stuck"))
        .await
        .expect("terminate");
    assert_eq!(terminated.status, InstanceStatus::Terminated);
    client
        .terminate("o-1", None, None)
        .await
        .expect("terminate");
    let paused = client.pause("o-1", Some("bob")).await.expect("pause");
    assert_eq!(paused.status, InstanceStatus::Paused);
    client.resume("o-1", None).await.expect("resume");
    client.retry("o-1", Some("bob")).await.expect("retry");
    client
        .rerun("o-1", "charge", Some("bob"))
        .await
        .expect("rerun");
    let restarted = client.restart("o-1", Some("bob")).await.expect("restart");
    assert_eq!(restarted.id, "new-1");
    assert_eq!(restarted.restarted_from(), Some("o-1"));
    client
        .signal("o/1", "approved by", &json!({"ok": true}))
        .await
        .expect("signal");
    client
        .signal("o-1", "go", &Value::Null)
        .await
        .expect("signal without payload");

    let expected = [
        ("/v1/instances/o-1/cancel", json!({})),
        ("/v1/instances/o-1/cancel", json!({"by": "alice"})),
        (
            "/v1/instances/o-1/terminate",
            json!({"by": "alice", "reason": "stuck"}),
        ),
        ("/v1/instances/o-1/terminate", json!({})),
        ("/v1/instances/o-1/pause", json!({"by": "bob"})),
        ("/v1/instances/o-1/resume", json!({})),
        ("/v1/instances/o-1/retry", json!({"by": "bob"})),
        (
            "/v1/instances/o-1/rerun",
            json!({"by": "bob", "from_step": "charge"}),
        ),
        ("/v1/instances/o-1/restart", json!({"by": "bob"})),
        (
            "/v1/instances/o%2F1/signals/approved%20by",
            json!({"ok": true}),
        ),
        ("/v1/instances/o-1/signals/go", Value::Null),
    ];
    let requests = fake.requests();
    assert_eq!(requests.len(), expected.len(), "{requests:?}");
    for ((path, body), (expected_path, expected_body)) in requests.iter().zip(expected) {
        assert_eq!(path, expected_path);
        assert_eq!(body, &expected_body, "{path}");
    }
}

#[tokio::test]
async fn api_errors_come_back_as_they_are() {
    // A 409 is the server's answer, not a reason to try elsewhere.
    let (conflicting, conflicting_url) = start_fake(Behaviour::Status(StatusCode::CONFLICT)).await;
    let (good, good_url) = start_fake(Behaviour::Answer).await;
    let client = Client::new(vec![conflicting_url, good_url]).expect("valid client");
    let error = client.pause("o-1", None).await.expect_err("conflict");
    assert_eq!(error.status(), Some(409));
    assert_eq!(error.code(), Some("conflict"));
    assert_eq!(conflicting.requests().len(), 1);
    assert!(good.requests().is_empty());
}

#[tokio::test]
async fn redirects_are_not_followed() {
    // A weir node never redirects: a `Location` comes from something else on the way, and
    // following it would send a signal or a completion where the operator did not point.
    let (target, target_url) = start_fake(Behaviour::Answer).await;
    let (redirecting, redirecting_url) = start_fake(Behaviour::Redirect(target_url)).await;
    let client = Client::new(vec![redirecting_url]).expect("valid client");
    let error = client
        .signal("o-1", "go", &json!(1))
        .await
        .expect_err("a redirect is an answer, not followed");
    assert_eq!(error.status(), Some(307));
    let error = client.instance("o-1").await.expect_err("a read neither");
    assert_eq!(error.status(), Some(307));
    assert_eq!(redirecting.requests().len(), 2);
    assert!(target.requests().is_empty());
}

#[tokio::test]
async fn operations_move_on_only_where_they_surely_did_not_act() {
    // Refused connection and 503: moved on to the good node, which acts once.
    let (unavailable, unavailable_url) =
        start_fake(Behaviour::Status(StatusCode::SERVICE_UNAVAILABLE)).await;
    let (good, good_url) = start_fake(Behaviour::Answer).await;
    let client = Client::new(vec![closed_url(), unavailable_url, good_url]).expect("valid client");
    let restarted = client.restart("o-1", None).await.expect("restart");
    assert_eq!(restarted.id, "new-1");
    assert_eq!(unavailable.requests().len(), 1);
    assert_eq!(good.requests().len(), 1);

    // 500: the node may have acted; not repeated on the good node.
    let (broken, broken_url) =
        start_fake(Behaviour::Status(StatusCode::INTERNAL_SERVER_ERROR)).await;
    let (good, good_url) = start_fake(Behaviour::Answer).await;
    let client = Client::new(vec![broken_url, good_url]).expect("valid client");
    let error = client
        .signal("o-1", "go", &json!(1))
        .await
        .expect_err("500 is returned");
    assert_eq!(error.status(), Some(500));
    assert_eq!(broken.requests().len(), 1);
    assert!(good.requests().is_empty());

    // Timeout: the node may have acted; not repeated on the good node. A read, which is safe
    // to repeat, moves on.
    let (slow, slow_url) = start_fake(Behaviour::Hang(Duration::from_secs(5))).await;
    let (good, good_url) = start_fake(Behaviour::Answer).await;
    let client = Client::new(vec![slow_url, good_url])
        .expect("valid client")
        .with_request_timeout(Duration::from_millis(300));
    for result in [
        client.cancel_by("o-1", None).await,
        client.terminate("o-1", None, None).await,
        client.retry("o-1", None).await,
        client.rerun("o-1", "a", None).await,
        client.restart("o-1", None).await,
        client.signal("o-1", "go", &Value::Null).await,
    ] {
        assert!(matches!(result, Err(Error::Transport { .. })), "{result:?}");
    }
    assert_eq!(slow.requests().len(), 6);
    assert!(good.requests().is_empty());
    // Moved on to the good node (the fallback answers every path with an instance).
    client.instance("o-1").await.expect("a read moves on");
    assert_eq!(good.requests().len(), 1);
}
