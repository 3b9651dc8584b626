//! The shapes of the HTTP API's requests and responses, as the SDK reads and writes them.
//!
//! Response types keep fields they do not know in an `extra` map, so that a newer server's
//! additions survive a round trip (the CLI prints them with `--output json`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A task handed to a worker by `POST /v1/tasks/poll`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolledTask {
    /// Identifies the task in `complete`, `fail` and `heartbeat` calls.
    pub task_id: String,
    /// Proves that this worker holds the task; sent back with every call about it.
    pub lease_token: String,
    /// The queue the task came from.
    pub queue: String,
    /// The workflow instance the task belongs to.
    pub instance_id: String,
    /// The step of the instance that the task performs.
    pub step_id: String,
    /// 1 for the first attempt, counting up with every retry.
    pub attempt: u32,
    /// The step's input.
    pub input: Value,
    /// Stable across the attempts of one step: use it to make side effects idempotent.
    pub idempotency_key: String,
}

/// The answer to a successful deploy, `POST /v1/definitions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployed {
    /// The definition's name.
    pub name: String,
    /// The version the server gave this source.
    pub version: u64,
    /// Fields this SDK does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An open human task, from `GET /v1/human-tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HumanTask {
    /// The task's id, to complete it with.
    pub task_id: String,
    /// The instance it belongs to.
    pub instance_id: String,
    /// The step (`approve`, or `approve~undo` for a compensation).
    pub step_id: String,
    /// What to do.
    #[serde(default)]
    pub title: Value,
    /// Who should do it.
    #[serde(default)]
    pub assignee: Option<String>,
    /// Which group may do it.
    #[serde(default)]
    pub group: Option<String>,
    /// The form's JSON Schema, if any.
    #[serde(default)]
    pub schema: Option<Value>,
    /// Fields this SDK does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Deserialize)]
pub(crate) struct HumanTaskList {
    pub tasks: Vec<HumanTask>,
}

/// One entry of `GET /v1/definitions`: the latest version of one definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionSummary {
    /// The definition's name.
    pub name: String,
    /// Its latest version.
    pub version: u64,
    /// When that version was deployed (RFC 3339).
    pub created_at: String,
    /// Fields this SDK does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One version of a definition with its source, `GET /v1/definitions/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionSource {
    /// The definition's name.
    pub name: String,
    /// The version.
    pub version: u64,
    /// The source as deployed.
    pub source: String,
    /// When the version was deployed (RFC 3339).
    pub created_at: String,
    /// Fields this SDK does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The body of `POST /v1/instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartRequest {
    /// Name of the definition to run.
    pub definition: String,
    /// Version to run; the latest when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The instance's input, `.input` in expressions.
    pub input: Value,
    /// Caller-chosen instance id. Starting the same id again returns the existing instance,
    /// which makes a start safe to retry. The server chooses one when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// The body of an operation on an instance (`POST /v1/instances/{id}/cancel`, `terminate`,
/// `pause`, `resume`, `retry`, `rerun`, `restart`); `None` fields are not sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct OperationRequest<'a> {
    /// Who asked, recorded in the instance's history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) by: Option<&'a str>,
    /// Why (terminate only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<&'a str>,
    /// The step to run again from (rerun only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) from_step: Option<&'a str>,
}

/// The answer to `POST /v1/instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    /// The instance's id.
    pub id: String,
    /// Its status when the server answered.
    pub status: InstanceStatus,
    /// True when this call created the instance (201), false when an instance with the
    /// requested id already existed (200).
    #[serde(skip)]
    pub created: bool,
    /// Fields this SDK does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A workflow instance, `GET /v1/instances/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// The instance's id.
    pub id: String,
    /// Name of the definition it runs.
    pub definition: String,
    /// Version of the definition it runs.
    pub version: u64,
    /// Where it is in its life.
    pub status: InstanceStatus,
    /// Its input.
    pub input: Value,
    /// Its output once completed, `null` before.
    #[serde(default)]
    pub output: Value,
    /// Why it failed, if it did.
    #[serde(default)]
    pub error: Option<InstanceError>,
    /// When it was started (RFC 3339).
    pub created_at: String,
    /// When its state last changed (RFC 3339).
    pub updated_at: String,
    /// Fields this SDK does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Instance {
    /// The instance this one was restarted from (set in the answer to
    /// [`Client::restart`](crate::Client::restart)).
    pub fn restarted_from(&self) -> Option<&str> {
        self.extra.get("restarted_from").and_then(Value::as_str)
    }
}

/// Why an instance (or a step) failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceError {
    /// The error's type, as reported by a worker or chosen by the engine (e.g. `timeout`).
    #[serde(rename = "type")]
    pub error_type: String,
    /// Human-readable explanation.
    pub message: String,
    /// Fields this SDK does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The status of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum InstanceStatus {
    /// Steps are being run.
    Running,
    /// Stopped by an operator, may be resumed.
    Paused,
    /// Completed steps are being undone after a failure or cancellation.
    Compensating,
    /// Ended: every step completed, the output is set.
    Completed,
    /// Ended: a step failed for good.
    Failed,
    /// Ended: cancelled on request.
    Cancelled,
    /// Ended: compensation finished.
    Compensated,
    /// Ended: stopped at once, without compensation.
    Terminated,
    /// A status this SDK does not know, as the server spelled it.
    Other(String),
}

impl InstanceStatus {
    /// The status as the API spells it.
    pub fn as_str(&self) -> &str {
        match self {
            InstanceStatus::Running => "running",
            InstanceStatus::Paused => "paused",
            InstanceStatus::Compensating => "compensating",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Cancelled => "cancelled",
            InstanceStatus::Compensated => "compensated",
            InstanceStatus::Terminated => "terminated",
            InstanceStatus::Other(other) => other,
        }
    }

    /// True when the instance has ended and its status will not change again.
    /// Unknown statuses count as not ended.
    pub fn is_ended(&self) -> bool {
        matches!(
            self,
            InstanceStatus::Completed
                | InstanceStatus::Failed
                | InstanceStatus::Cancelled
                | InstanceStatus::Compensated
                | InstanceStatus::Terminated
        )
    }
}

impl From<String> for InstanceStatus {
    fn from(text: String) -> InstanceStatus {
        match text.as_str() {
            "running" => InstanceStatus::Running,
            "paused" => InstanceStatus::Paused,
            "compensating" => InstanceStatus::Compensating,
            "completed" => InstanceStatus::Completed,
            "failed" => InstanceStatus::Failed,
            "cancelled" => InstanceStatus::Cancelled,
            "compensated" => InstanceStatus::Compensated,
            "terminated" => InstanceStatus::Terminated,
            _ => InstanceStatus::Other(text),
        }
    }
}

impl From<InstanceStatus> for String {
    fn from(status: InstanceStatus) -> String {
        status.as_str().to_owned()
    }
}

impl std::fmt::Display for InstanceStatus {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Filters for `GET /v1/instances`; `None` fields are not sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFilter {
    /// Only instances with this status.
    pub status: Option<String>,
    /// Only instances of this definition.
    pub definition: Option<String>,
    /// At most this many instances in the page.
    pub limit: Option<usize>,
    /// Continue after the page that returned this cursor.
    pub cursor: Option<String>,
}

/// One page of `GET /v1/instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstancePage {
    /// The instances of this page.
    pub instances: Vec<Instance>,
    /// Pass as [`InstanceFilter::cursor`] to get the next page; `None` on the last page.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// One event of an instance's history, `GET /v1/instances/{id}/history`.
///
/// Fields that depend on the event's type are kept in `fields`; the accessors read the
/// common ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the history, increasing.
    pub seq: u64,
    /// What happened, e.g. `step_completed`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When it happened (RFC 3339).
    pub at: String,
    /// The type-specific fields, e.g. `step_id`, `attempt`, `output`, `error`.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Event {
    /// The step the event is about, if any.
    pub fn step_id(&self) -> Option<&str> {
        self.fields.get("step_id").and_then(Value::as_str)
    }

    /// The attempt the event is about, if any.
    pub fn attempt(&self) -> Option<u64> {
        self.fields.get("attempt").and_then(Value::as_u64)
    }

    /// The `output` field, if present and not `null`.
    pub fn output(&self) -> Option<&Value> {
        self.fields.get("output").filter(|value| !value.is_null())
    }

    /// The `error` field, if present and not `null`.
    pub fn error(&self) -> Option<&Value> {
        self.fields.get("error").filter(|value| !value.is_null())
    }
}

/// `{"definitions": [...]}`.
#[derive(Deserialize)]
pub(crate) struct DefinitionList {
    pub(crate) definitions: Vec<DefinitionSummary>,
}

/// `{"events": [...]}`.
#[derive(Deserialize)]
pub(crate) struct History {
    pub(crate) events: Vec<Event>,
}

/// `{"tasks": [...]}`.
#[derive(Deserialize)]
pub(crate) struct PollResponse {
    pub(crate) tasks: Vec<PolledTask>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn polled_task_reads_the_contract() {
        // Goal: the poll response's task shape parses field by field.
        let task: PolledTask = serde_json::from_value(json!({
            "task_id": "t1", "lease_token": "l1", "queue": "payments", "instance_id": "i1",
            "step_id": "charge", "attempt": 2, "input": {"amount": 5}, "idempotency_key": "i1/charge"
        }))
        .expect("valid task");
        assert_eq!(task.task_id, "t1");
        assert_eq!(task.lease_token, "l1");
        assert_eq!(task.queue, "payments");
        assert_eq!(task.instance_id, "i1");
        assert_eq!(task.step_id, "charge");
        assert_eq!(task.attempt, 2);
        assert_eq!(task.input, json!({"amount": 5}));
        assert_eq!(task.idempotency_key, "i1/charge");
    }

    #[test]
    fn instance_round_trips_with_unknown_fields() {
        // Goal: a newer server's fields survive a parse and print; method: round trip.
        let body = json!({
            "id": "i1", "definition": "order", "version": 3, "status": "failed",
            "input": {"sku": "a"}, "output": null,
            "error": {"type": "card_declined", "message": "no funds"},
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:01Z",
            "partition": 7
        });
        let instance: Instance = serde_json::from_value(body.clone()).expect("valid instance");
        assert_eq!(instance.status, InstanceStatus::Failed);
        assert!(instance.status.is_ended());
        let error = instance.error.as_ref().expect("error present");
        assert_eq!(error.error_type, "card_declined");
        assert_eq!(instance.extra["partition"], 7);
        assert_eq!(serde_json::to_value(&instance).expect("serializable"), body);
    }

    #[test]
    fn statuses() {
        // Goal: every documented status maps both ways and unknown ones are kept verbatim.
        for (text, ended) in [
            ("running", false),
            ("paused", false),
            ("compensating", false),
            ("completed", true),
            ("failed", true),
            ("cancelled", true),
            ("compensated", true),
            ("terminated", true),
            ("hibernating", false),
        ] {
            let status = InstanceStatus::from(text.to_owned());
            assert_eq!(status.as_str(), text);
            assert_eq!(status.is_ended(), ended, "{text}");
            assert_eq!(
                serde_json::to_value(&status).expect("serializable"),
                json!(text)
            );
        }
        assert_eq!(
            InstanceStatus::from("hibernating".to_owned()),
            InstanceStatus::Other("hibernating".into())
        );
    }

    #[test]
    fn event_accessors() {
        // Goal: type-specific event fields are reachable and round-trip.
        let body = json!({"seq": 4, "type": "step_completed", "at": "2026-01-01T00:00:00Z",
                          "step_id": "reserve", "attempt": 1, "output": {"id": "r1"}});
        let event: Event = serde_json::from_value(body.clone()).expect("valid event");
        assert_eq!(event.event_type, "step_completed");
        assert_eq!(event.step_id(), Some("reserve"));
        assert_eq!(event.attempt(), Some(1));
        assert_eq!(event.output(), Some(&json!({"id": "r1"})));
        assert_eq!(event.error(), None);
        assert_eq!(serde_json::to_value(&event).expect("serializable"), body);
    }

    #[test]
    fn start_request_omits_absent_fields() {
        // Goal: optional start fields are left out, not sent as null.
        let request = StartRequest {
            definition: "order".into(),
            version: None,
            input: json!({}),
            id: None,
        };
        assert_eq!(
            serde_json::to_value(&request).expect("serializable"),
            json!({"definition": "order", "input": {}})
        );
        let request = StartRequest {
            version: Some(2),
            id: Some("o-1".into()),
            ..request
        };
        assert_eq!(
            serde_json::to_value(&request).expect("serializable"),
            json!({"definition": "order", "version": 2, "input": {}, "id": "o-1"})
        );
    }

    #[test]
    fn operation_bodies_omit_absent_fields() {
        // Goal: every operation's body carries exactly the fields given, none as null (the
        // server refuses unknown fields); method: one body per operation shape.
        let body = |request: OperationRequest| serde_json::to_value(request).expect("serializable");
        assert_eq!(body(OperationRequest::default()), json!({}));
        assert_eq!(
            body(OperationRequest {
                by: Some("alice"),
                ..OperationRequest::default()
            }),
            json!({"by": "alice"})
        );
        assert_eq!(
            body(OperationRequest {
                by: Some("alice"),
                reason: Some("stuck"),
                from_step: None,
            }),
            json!({"by": "alice", "reason": "stuck"})
        );
        assert_eq!(
            body(OperationRequest {
                by: None,
                reason: None,
                from_step: Some("charge"),
            }),
            json!({"from_step": "charge"})
        );
    }

    #[test]
    fn restarted_instances_name_their_origin() {
        let mut instance: Instance = serde_json::from_value(json!({
            "id": "i2", "definition": "order", "version": 1, "status": "running",
            "input": {}, "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z", "restarted_from": "i1"
        }))
        .expect("valid instance");
        assert_eq!(instance.restarted_from(), Some("i1"));
        instance.extra.clear();
        assert_eq!(instance.restarted_from(), None);
    }

    #[test]
    fn lists() {
        // Goal: list envelopes parse, a missing cursor means the last page.
        let page: InstancePage =
            serde_json::from_value(json!({"instances": []})).expect("valid page");
        assert_eq!(page.next_cursor, None);
        let list: DefinitionList = serde_json::from_value(json!({"definitions": [
            {"name": "order", "version": 2, "created_at": "2026-01-01T00:00:00Z"}]}))
        .expect("valid list");
        assert_eq!(list.definitions[0].version, 2);
        let history: History = serde_json::from_value(json!({"events": [
            {"seq": 1, "type": "instance_started", "at": "2026-01-01T00:00:00Z"}]}))
        .expect("valid history");
        assert_eq!(history.events[0].step_id(), None);
    }
}
