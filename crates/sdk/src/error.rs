//! The SDK's one error type and the server's error body.

use serde::Deserialize;

/// Everything that can go wrong talking to weir.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The list of server URLs was empty.
    #[error("no server URL given")]
    NoServer,
    /// A server URL could not be used.
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// No server answered: the connection failed, was cut, or timed out.
    #[error("cannot reach {url}")]
    Transport {
        /// The last URL tried.
        url: String,
        /// What the HTTP client reported.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The server answered with a success status but a body the SDK does not understand.
    #[error("unexpected response from {url}: {reason}")]
    Protocol {
        /// The request's URL.
        url: String,
        /// What was wrong with the response.
        reason: String,
    },
    /// A worker was configured in a way that cannot work.
    #[error("invalid worker configuration: {0}")]
    Config(String),
}

impl Error {
    /// The HTTP status of an [`Error::Api`], `None` for other kinds.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api(api) => Some(api.status),
            _ => None,
        }
    }

    /// The server's machine-readable error code of an [`Error::Api`], `None` for other kinds.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api(api) => Some(&api.code),
            _ => None,
        }
    }

    /// True when the server refused a task call because the lease is no longer held
    /// (expired, or the task was given to another worker).
    pub fn is_stale_lease(&self) -> bool {
        matches!(self, Error::Api(api) if api.status == 409)
    }
}

/// An error answered by the server: a non-2xx status with the body
/// `{"error": {"code", "message", ...}}`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// The HTTP status code.
    pub status: u16,
    /// Stable machine-readable code, e.g. `invalid_definition`, `stale_lease`, `not_found`.
    /// When the body carried no code it is `http_<status>`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Positions of problems in a definition (only for `invalid_definition`).
    pub problems: Vec<Problem>,
    /// The whole body as the server sent it, `null` if it was not JSON.
    pub body: serde_json::Value,
}

/// One problem the server found in a definition's source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Problem {
    /// 1-based line, 0 when the problem has no position.
    pub line: usize,
    /// 1-based column, 0 when the problem has no position.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// Longest stretch of a non-JSON error body quoted in an [`ApiError`] message.
const ERROR_BODY_QUOTE_MAX: usize = 200;

impl ApiError {
    /// Builds the error from a response's status and body, accepting bodies that do not
    /// follow the error format (a proxy's HTML page, an empty body).
    pub(crate) fn from_response(status: u16, body: &[u8]) -> ApiError {
        #[derive(Deserialize)]
        struct Envelope {
            error: Inner,
        }
        #[derive(Deserialize)]
        struct Inner {
            code: Option<String>,
            message: Option<String>,
            #[serde(default)]
            problems: Vec<Problem>,
        }
        let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let fallback_code = format!("http_{status}");
        match Envelope::deserialize(&value) {
            Ok(envelope) => ApiError {
                status,
                code: envelope.error.code.unwrap_or(fallback_code),
                message: envelope.error.message.unwrap_or_default(),
                problems: envelope.error.problems,
                body: value,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                let quoted: String = text.chars().take(ERROR_BODY_QUOTE_MAX).collect();
                let message = if quoted.is_empty() {
                    format!("HTTP status {status}")
                } else {
                    quoted
                };
                ApiError {
                    status,
                    code: fallback_code,
                    message,
                    problems: Vec::new(),
                    body: value,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: u16, body: &str, code: &str, message: &str, problems: usize) {
        let error = ApiError::from_response(status, body.as_bytes());
        assert_eq!(error.status, status);
        assert_eq!(error.code, code);
        assert_eq!(error.message, message);
        assert_eq!(error.problems.len(), problems);
    }

    #[test]
    fn error_bodies() {
        // Goal: every shape of error body yields a code and a message; method: table of bodies.
        check(
            409,
            r#"{"error":{"code":"stale_lease","message":"lease expired"}}"#,
            "stale_lease",
            "lease expired",
            0,
        );
        check(
            400,
            r#"{"error":{"code":"invalid_definition","message":"2 problems",
                "problems":[{"line":3,"column":5,"message":"unknown key"},
                            {"line":0,"column":0,"message":"no steps"}]}}"#,
            "invalid_definition",
            "2 problems",
            2,
        );
        check(
            502,
            "<html>bad gateway</html>",
            "http_502",
            "<html>bad gateway</html>",
            0,
        );
        check(500, "", "http_500", "HTTP status 500", 0);
        check(404, r#"{"error":{}}"#, "http_404", "", 0);
    }

    #[test]
    fn problem_positions_are_kept() {
        // Goal: problem positions survive parsing exactly; method: parse one body.
        let body = r#"{"error":{"code":"invalid_definition","message":"m",
            "problems":[{"line":3,"column":5,"message":"unknown key \"tsk\""}]}}"#;
        let error = ApiError::from_response(400, body.as_bytes());
        assert_eq!(
            error.problems,
            vec![Problem {
                line: 3,
                column: 5,
                message: "unknown key \"tsk\"".into()
            }]
        );
        assert_eq!(error.body["error"]["code"], "invalid_definition");
    }

    #[test]
    fn stale_lease_is_recognised() {
        // Goal: 409 is the stale-lease signal, other statuses are not.
        let stale = Error::Api(ApiError::from_response(409, b"{}"));
        let missing = Error::Api(ApiError::from_response(404, b"{}"));
        assert!(stale.is_stale_lease());
        assert!(!missing.is_stale_lease());
        assert_eq!(missing.status(), Some(404));
        assert_eq!(Error::NoServer.status(), None);
    }
}
