//! `weir start`, `status`, `list` and `history`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use serde_json::{json, Value};
use weir_sdk::{Event, Instance, InstanceFilter, InstanceStatus, StartRequest};

use super::follow::follow;
use super::table::{compact, pairs, Table};
use super::{print_json, print_stdout, Context, Output};

/// Most instances `weir list` fetches, however many pages that takes.
pub const LIST_LIMIT_MAX: usize = 100_000;

/// Most instances asked for in one page.
const LIST_PAGE_SIZE_MAX: usize = 1_000;

/// Arguments of `weir start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Name of the definition to run.
    pub definition: String,
    /// The instance's input, as JSON (default `{}`).
    #[arg(long, value_name = "JSON", value_parser = parse_json, conflicts_with = "input_file")]
    pub input: Option<Value>,
    /// Read the input from a JSON file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub input_file: Option<PathBuf>,
    /// Instance id. Starting an id that exists returns that instance instead of a new one,
    /// which makes `start` safe to repeat.
    #[arg(long)]
    pub id: Option<String>,
    /// Version of the definition to run (default: the latest).
    #[arg(long)]
    pub version: Option<u64>,
    /// Show the instance's progress until it ends (it goes on through `paused` and
    /// `compensating`); exit 0 only if it completed, 1 if it ended otherwise.
    #[arg(long)]
    pub wait: bool,
}

/// An instance id.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// The instance's id.
    pub id: String,
}

/// Arguments of `weir list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only instances with this status: running, paused, compensating, completed, failed,
    /// compensated, cancelled or terminated.
    #[arg(long)]
    pub status: Option<String>,
    /// Only instances of this definition.
    #[arg(long)]
    pub definition: Option<String>,
    /// Most instances shown; pages are followed until this many.
    #[arg(
        long,
        default_value_t = 50,
        value_parser = clap::value_parser!(u64).range(1..=LIST_LIMIT_MAX as u64)
    )]
    pub limit: u64,
}

pub async fn start(context: &Context, args: StartArgs) -> anyhow::Result<ExitCode> {
    let input = match (args.input, &args.input_file) {
        (Some(input), _) => input,
        (None, Some(path)) => read_json_file(path, "input")?,
        (None, None) => json!({}),
    };
    let request = StartRequest {
        definition: args.definition,
        version: args.version,
        input,
        id: args.id,
    };
    let started = context.client.start(&request).await?;
    if !args.wait {
        match context.output {
            Output::Table if started.created => {
                print_stdout(&format!("started {} ({})\n", started.id, started.status))
            }
            Output::Table => print_stdout(&format!(
                "instance {} already exists ({})\n",
                started.id, started.status
            )),
            Output::Json => print_json(&started)?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    if context.output == Output::Table {
        eprintln!("started {}", started.id);
    }
    let instance = follow(&context.client, &started.id).await?;
    match context.output {
        Output::Table => print_stdout(&describe_instance(&instance)),
        Output::Json => print_json(&instance)?,
    }
    if instance.status == InstanceStatus::Completed {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

pub async fn status(context: &Context, args: &IdArgs) -> anyhow::Result<ExitCode> {
    let instance = context.client.instance(&args.id).await?;
    match context.output {
        Output::Table => print_stdout(&describe_instance(&instance)),
        Output::Json => print_json(&instance)?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(context: &Context, args: &ListArgs) -> anyhow::Result<ExitCode> {
    let limit = usize::try_from(args.limit).unwrap_or(LIST_LIMIT_MAX);
    let mut instances: Vec<Instance> = Vec::new();
    let mut filter = InstanceFilter {
        status: args.status.clone(),
        definition: args.definition.clone(),
        limit: None,
        cursor: None,
    };
    // Bounded by `limit`: every page either adds an instance or ends the loop.
    let next_cursor = loop {
        filter.limit = Some((limit - instances.len()).min(LIST_PAGE_SIZE_MAX));
        let page = context.client.instances(&filter).await?;
        let empty = page.instances.is_empty();
        instances.extend(page.instances);
        if instances.len() >= limit {
            instances.truncate(limit);
            break page.next_cursor;
        }
        match page.next_cursor {
            // An empty page that still has a cursor would loop forever; stop at it.
            Some(cursor) if !empty => filter.cursor = Some(cursor),
            cursor => break cursor,
        }
    };
    match context.output {
        Output::Json => print_json(&json!({
            "instances": instances,
            "next_cursor": next_cursor,
        }))?,
        Output::Table if instances.is_empty() => eprintln!("no instances"),
        Output::Table => {
            let mut table = Table::new(&[
                "ID",
                "DEFINITION",
                "VERSION",
                "STATUS",
                "CREATED",
                "UPDATED",
            ]);
            for instance in instances {
                table.row(vec![
                    instance.id,
                    instance.definition,
                    instance.version.to_string(),
                    instance.status.to_string(),
                    instance.created_at,
                    instance.updated_at,
                ]);
            }
            print_stdout(&table.render());
            if next_cursor.is_some() {
                eprintln!("(more instances; raise --limit to see them)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn history(context: &Context, args: &IdArgs) -> anyhow::Result<ExitCode> {
    let events = context.client.history(&args.id).await?;
    match context.output {
        Output::Json => print_json(&json!({ "events": events }))?,
        Output::Table => {
            let mut table = Table::new(&["SEQ", "AT", "TYPE", "STEP", "ATTEMPT", "DETAIL"]);
            for event in &events {
                table.row(vec![
                    event.seq.to_string(),
                    event.at.clone(),
                    event.event_type.clone(),
                    event.step_id().unwrap_or_default().to_owned(),
                    event
                        .attempt()
                        .map(|attempt| attempt.to_string())
                        .unwrap_or_default(),
                    event_detail(event),
                ]);
            }
            print_stdout(&table.render());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An instance as key-value lines.
pub fn describe_instance(instance: &Instance) -> String {
    let mut lines = vec![
        ("id", instance.id.clone()),
        (
            "definition",
            format!("{} (version {})", instance.definition, instance.version),
        ),
        ("status", instance.status.to_string()),
        ("created", instance.created_at.clone()),
        ("updated", instance.updated_at.clone()),
        ("input", instance.input.to_string()),
    ];
    if let Some(from) = instance.restarted_from() {
        lines.push(("restarted from", from.to_owned()));
    }
    if !instance.output.is_null() {
        lines.push(("output", instance.output.to_string()));
    }
    if let Some(error) = &instance.error {
        lines.push(("error", format!("{}: {}", error.error_type, error.message)));
    }
    if let Some(hint) = status_hint(instance) {
        lines.push(("hint", hint));
    }
    pairs(&lines)
}

/// What an operator can do next with an instance in its status, for the statuses that wait
/// on one.
fn status_hint(instance: &Instance) -> Option<String> {
    let id = &instance.id;
    match instance.status {
        InstanceStatus::Paused => Some(format!("no new step starts until `weir resume {id}`")),
        InstanceStatus::Compensating => {
            Some("undoing completed steps; it ends compensated or cancelled".to_owned())
        }
        InstanceStatus::Failed => Some(format!("`weir retry {id}` resumes from the failed step")),
        _ => None,
    }
}

/// The part of an event that its type does not say: its error, else its output, else its
/// other fields.
pub fn event_detail(event: &Event) -> String {
    let field = |name: &str| event.fields.get(name).map(compact).unwrap_or_default();
    match event.event_type.as_str() {
        "compensation_started" => {
            let steps: Vec<String> = event
                .fields
                .get("steps")
                .and_then(Value::as_array)
                .map(|steps| steps.iter().map(compact).collect())
                .unwrap_or_default();
            return format!("undo {} ({})", steps.join(", "), field("reason"));
        }
        "step_caught" => {
            let error = event.error().map(error_text).unwrap_or_default();
            return format!("{error} (handler {})", field("handler"));
        }
        "instance_terminated" => return format!("by {}: {}", field("by"), field("reason")),
        "signal_received" => return format!("{} {}", field("name"), field("payload")),
        "cancel_requested" | "instance_cancelled" | "instance_paused" | "instance_resumed"
        | "instance_retried" | "instance_rerun" => return format!("by {}", field("by")),
        _ => {}
    }
    if let Some(error) = event.error() {
        return error_text(error);
    }
    if let Some(output) = event.output() {
        return compact(output);
    }
    let rest: serde_json::Map<String, Value> = event
        .fields
        .iter()
        .filter(|(key, _)| {
            !matches!(
                key.as_str(),
                "step_id" | "attempt" | "instance_id" | "epoch"
            )
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if rest.is_empty() {
        String::new()
    } else {
        Value::Object(rest).to_string()
    }
}

/// `type: message` for an error object shaped as the API sends it, its JSON otherwise.
pub fn error_text(error: &Value) -> String {
    match (error["type"].as_str(), error["message"].as_str()) {
        (Some(error_type), Some(message)) => format!("{error_type}: {message}"),
        _ => compact(error),
    }
}

pub fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|error| format!("not valid JSON: {error}"))
}

/// The JSON value in file `path` (`-` for stdin); `what` names it in errors.
pub fn read_json_file(path: &PathBuf, what: &str) -> anyhow::Result<Value> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .with_context(|| format!("cannot read the {what} from stdin"))?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(value: Value) -> Event {
        serde_json::from_value(value).expect("valid event")
    }

    #[test]
    fn event_details() {
        // Goal: the history table shows what matters of each event type; method: table.
        let at = "2026-01-01T00:00:00Z";
        for (body, expected) in [
            (
                json!({"seq": 1, "type": "step_failed", "at": at, "step_id": "charge",
                       "attempt": 1, "error": {"type": "card_declined", "message": "no funds"}}),
                "card_declined: no funds",
            ),
            (
                json!({"seq": 2, "type": "step_completed", "at": at, "step_id": "reserve",
                       "attempt": 1, "output": {"id": "r1"}}),
                r#"{"id":"r1"}"#,
            ),
            (
                json!({"seq": 3, "type": "timer_started", "at": at, "step_id": "cool-off",
                       "fire_at": "2026-01-01T00:00:10Z"}),
                r#"{"fire_at":"2026-01-01T00:00:10Z"}"#,
            ),
            (
                json!({"seq": 4, "type": "instance_started", "at": at, "epoch": 1}),
                "",
            ),
            (
                json!({"seq": 5, "type": "compensation_started", "at": at,
                       "steps": ["b", "a"], "reason": "charge failed"}),
                "undo b, a (charge failed)",
            ),
            (
                json!({"seq": 6, "type": "step_caught", "at": at, "step_id": "charge",
                       "error": {"type": "card_declined", "message": "no"}, "handler": 0}),
                "card_declined: no (handler 0)",
            ),
            (
                json!({"seq": 7, "type": "instance_terminated", "at": at, "by": "alice",
                       "reason": "stuck"}),
                "by alice: stuck",
            ),
            (
                json!({"seq": 8, "type": "instance_paused", "at": at, "by": "alice"}),
                "by alice",
            ),
            (
                json!({"seq": 9, "type": "signal_received", "at": at, "name": "approve",
                       "payload": {"ok": true}}),
                r#"approve {"ok":true}"#,
            ),
        ] {
            assert_eq!(event_detail(&event(body)), expected);
        }
    }

    #[test]
    fn instance_description() {
        let instance: Instance = serde_json::from_value(json!({
            "id": "o-1", "definition": "order", "version": 2, "status": "failed",
            "input": {"sku": "a"}, "output": null,
            "error": {"type": "card_declined", "message": "no funds"},
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:02Z"
        }))
        .expect("valid instance");
        assert_eq!(
            describe_instance(&instance),
            "id          o-1\n\
             definition  order (version 2)\n\
             status      failed\n\
             created     2026-01-01T00:00:00Z\n\
             updated     2026-01-01T00:00:02Z\n\
             input       {\"sku\":\"a\"}\n\
             error       card_declined: no funds\n\
             hint        `weir retry o-1` resumes from the failed step\n"
        );
    }

    #[test]
    fn restarted_and_paused_instances() {
        let instance: Instance = serde_json::from_value(json!({
            "id": "o-2", "definition": "order", "version": 2, "status": "paused",
            "input": {}, "output": null, "error": null, "restarted_from": "o-1",
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:02Z"
        }))
        .expect("valid instance");
        let text = describe_instance(&instance);
        assert!(text.contains("restarted from  o-1\n"), "{text}");
        assert!(text.contains("status          paused\n"), "{text}");
        assert!(text.contains("`weir resume o-2`"), "{text}");
    }
}
