//! The one error shape of the API.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// An API error: a status, a stable machine-readable code, a message, and
/// optional details merged into the error object.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code, explained in docs/errors.md.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Extra members of the error object (e.g. `problems`, `pointer`).
    pub details: Map<String, Value>,
}

impl ApiError {
    /// An error without details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    /// Adds a detail member.
    pub fn with(mut self, key: &str, value: Value) -> ApiError {
        self.details.insert(key.to_string(), value);
        self
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl ApiError {
    /// The value of the body's `error` key: `{"code", "message", ...details}`.
    pub(crate) fn into_error_object(self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), Value::String(self.code.into()));
        error.insert("message".into(), Value::String(self.message));
        error.extend(self.details);
        Value::Object(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        (
            status,
            axum::Json(json!({ "error": self.into_error_object() })),
        )
            .into_response()
    }
}

impl From<weir_engine::Error> for ApiError {
    fn from(err: weir_engine::Error) -> ApiError {
        use weir_engine::Error as E;
        match err {
            E::InvalidDefinition(problems) => {
                let message = match problems.first() {
                    Some(first) if problems.len() == 1 => format!("definition is invalid: {first}"),
                    Some(first) => format!(
                        "definition is invalid: {first} (and {} more)",
                        problems.len() - 1
                    ),
                    None => "definition is invalid".to_string(),
                };
                let problems: Vec<Value> = problems
                    .iter()
                    .map(|p| json!({ "line": p.line, "column": p.column, "message": p.message }))
                    .collect();
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_definition", message)
                    .with("problems", Value::Array(problems))
            }
            E::InvalidData(problems) => {
                let list: Vec<Value> = problems
                    .iter()
                    .map(|(pointer, message)| json!({ "pointer": pointer, "message": message }))
                    .collect();
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_data",
                    format!(
                        "form data does not match the task's schema ({} problems)",
                        problems.len()
                    ),
                )
                .with("problems", Value::Array(list))
            }
            E::NotFound(message) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
            E::Conflict(message) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            E::StaleLease(message) => ApiError::new(StatusCode::CONFLICT, "stale_lease", message),
            E::BadRequest(message) => ApiError::invalid(message),
            E::Unavailable(message) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            E::Corrupt(message) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
            E::Store(err) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                err.to_string(),
            ),
        }
    }
}
