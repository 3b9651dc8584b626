//! Request bodies: size-limited, parsed with a JSON pointer for every problem.

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Reads a body of at most `limit` bytes; 413 `payload_too_large` beyond.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {limit} bytes"),
        )
        .with("limit_bytes", limit.into())
    })
}

/// Parses JSON into `T`; a problem is a 400 with the JSON pointer where it is.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "request body is empty",
        )
        .with("pointer", "".into()));
    }
    // The common case, a valid body, is parsed plainly; only a refused one is parsed again
    // to find where the problem is (tracking the path costs on every field).
    if let Ok(value) = serde_json::from_slice::<T>(bytes) {
        return Ok(value);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    let value = result.map_err(|err| {
        let pointer = pointer_of(err.path());
        let inner = err.into_inner();
        // A type error may be met before a syntax error further on; malformed JSON is
        // the more useful answer, so look for one (only on this error path).
        let syntax = match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Err(err) if err.is_syntax() || err.is_eof() => Some(err.to_string()),
            _ if inner.is_syntax() || inner.is_eof() => Some(inner.to_string()),
            _ => None,
        };
        if let Some(syntax) = syntax {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("malformed JSON: {syntax}"),
            )
            .with("pointer", "".into());
        }
        let at = if pointer.is_empty() { "/" } else { &pointer };
        let message = format!("{at}: {inner}");
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
            .with("pointer", pointer.into())
    })?;
    deserializer.end().map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("malformed JSON: {err}"),
        )
        .with("pointer", "".into())
    })?;
    Ok(value)
}

/// Renders serde_path_to_error's path as an RFC 6901 JSON pointer.
fn pointer_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut pointer = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => pointer.push_str(&format!("/{index}")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
            }
            Segment::Unknown => {}
        }
    }
    pointer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // Fields exist to be type-checked by serde.
    struct Sample {
        queues: Vec<String>,
        max_tasks: Option<u32>,
    }

    fn check(body: &str, expected: &str) {
        let err = parse_json::<Sample>(body.as_bytes()).unwrap_err();
        let rendered = format!("{} {} {}", err.code, err.details["pointer"], err.message);
        assert!(rendered.starts_with(expected), "{rendered}");
    }

    #[test]
    fn problems_carry_json_pointers() {
        check(r#"{"queues": ["a", 5]}"#, r#"invalid_request "/queues/1""#);
        check(
            r#"{"queues": [], "max_tasks": "x"}"#,
            r#"invalid_request "/max_tasks""#,
        );
        check(
            r#"{"queues": [], "extra": 1}"#,
            r#"invalid_request "/extra""#,
        );
        check(r#"{"queues": ["#, r#"malformed_json"#);
        check(r#"{"queues": []} x"#, r#"malformed_json"#);
        check("", r#"malformed_json"#);
    }
}
