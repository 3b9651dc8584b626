//! The `http` step's effect: one outbound HTTP call.

use serde_json::{json, Map, Value};
use weir_model::event::ErrorInfo;
use weir_model::machine::{HttpFailure, HttpRequest};

/// Largest response body kept as a step's output.
pub const HTTP_RESPONSE_SIZE_MAX: usize = 1024 * 1024;
/// Error type of a failed HTTP step attempt.
pub const ERROR_TYPE_HTTP: &str = "http_error";

/// Makes the call; the output is `{"status","headers","body"}` (body as JSON when it parses).
pub(crate) async fn call(
    client: &reqwest::Client,
    request: HttpRequest,
) -> Result<Value, HttpFailure> {
    let failure = |message: String, retryable: bool| HttpFailure {
        error: ErrorInfo {
            error_type: ERROR_TYPE_HTTP.to_string(),
            message,
        },
        retryable,
    };
    let method = reqwest::Method::from_bytes(request.method.as_bytes())
        .map_err(|_| failure(format!("bad method {}", request.method), false))?;
    let mut builder = client.request(method, &request.url);
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    if let Some(body) = &request.body {
        builder = builder.json(body);
    }
    if let Some(timeout) = request.timeout {
        builder = builder.timeout(timeout);
    }
    let response = builder
        .send()
        .await
        .map_err(|err| failure(format!("{} {}: {err}", request.method, request.url), true))?;
    let status = response.status();
    let mut headers = Map::new();
    for (name, value) in response.headers() {
        if let Ok(value) = value.to_str() {
            headers.insert(name.as_str().to_string(), Value::String(value.to_string()));
        }
    }
    let bytes = response.bytes().await.map_err(|err| {
        failure(
            format!("reading the response of {}: {err}", request.url),
            true,
        )
    })?;
    if bytes.len() > HTTP_RESPONSE_SIZE_MAX {
        return Err(failure(
            format!(
                "response of {} is larger than {HTTP_RESPONSE_SIZE_MAX} bytes",
                request.url
            ),
            false,
        ));
    }
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    if !status.is_success() {
        // Server errors, throttling and request timeouts may pass; other client errors will not.
        let retryable =
            status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408;
        return Err(failure(
            format!("{} {} answered {status}", request.method, request.url),
            retryable,
        ));
    }
    Ok(json!({ "status": status.as_u16(), "headers": headers, "body": body }))
}
