//! `weir start --wait`: shows an instance's progress live until it ends.
//!
//! An instance that is `paused` or `compensating` has not ended: following goes on through
//! both. Compensation steps (`<step>~undo`) show as `↺ undo <step>`.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use weir_sdk::{Client, Event, Instance, InstanceStatus};

use super::instances::error_text;

/// Time between two looks at the instance (its status, then its history).
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// What an event changes on screen.
#[derive(Debug, PartialEq, Eq)]
enum Shown {
    /// A line that stays, above the spinner.
    Line(String),
    /// The spinner's message: what the instance is doing now.
    Now(String),
    /// Nothing.
    Nothing,
}

/// Follows instance `id` until it ends, showing its steps as they happen on stderr, and returns
/// the ended instance.
pub async fn follow(client: &Client, id: &str) -> anyhow::Result<Instance> {
    let progress = ProgressBar::new_spinner();
    let style = ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    progress.set_style(style);
    progress.enable_steady_tick(Duration::from_millis(100));
    progress.set_message("starting");
    let mut seq_seen = 0;
    // Runs until the instance ends or the server refuses a request; Ctrl-C stops it earlier.
    loop {
        // Status first, then history: when the status says ended, the history read after it
        // holds every event up to the end.
        let looked = async {
            let instance = client.instance(id).await?;
            let events = client.history(id).await?;
            Ok::<_, weir_sdk::Error>((instance, events))
        }
        .await;
        match looked {
            Ok((instance, events)) => {
                for event in &events {
                    if event.seq <= seq_seen {
                        continue;
                    }
                    seq_seen = event.seq;
                    match show(event) {
                        Shown::Line(line) if progress.is_hidden() => eprintln!("{line}"),
                        Shown::Line(line) => progress.println(line),
                        Shown::Now(message) => progress.set_message(message),
                        Shown::Nothing => {}
                    }
                }
                if instance.status.is_ended() {
                    progress.finish_and_clear();
                    return Ok(instance);
                }
                if instance.status == InstanceStatus::Paused {
                    progress.set_message(format!("paused; `weir resume {id}` to go on"));
                }
            }
            // Reads are safe to repeat: an unreachable or unavailable node (e.g. one taking
            // over partitions) is waited out.
            Err(error @ weir_sdk::Error::Transport { .. }) => {
                progress.set_message(format!("{error}, retrying"));
            }
            Err(error) if error.status() == Some(503) => {
                progress.set_message(format!("{error}, retrying"));
            }
            Err(error) => {
                progress.finish_and_clear();
                return Err(error.into());
            }
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
    }
}

/// How a step id reads on screen: a compensation `reserve~undo` as `undo reserve`; the
/// steps of catch handlers (`charge~catch0.1`) as they are.
fn step_name(step_id: &str) -> (String, bool) {
    match step_id.strip_suffix("~undo") {
        Some(step) => (format!("undo {step}"), true),
        None => (step_id.to_owned(), false),
    }
}

fn show(event: &Event) -> Shown {
    let (step, undo) = step_name(event.step_id().unwrap_or("?"));
    let attempt = event
        .attempt()
        .map(|attempt| format!(" (attempt {attempt})"))
        .unwrap_or_default();
    let field = |name: &str| {
        event
            .fields
            .get(name)
            .map(super::table::compact)
            .unwrap_or_default()
    };
    let by = field("by");
    match event.event_type.as_str() {
        "instance_started" => Shown::Now("started".into()),
        "step_scheduled" if undo => Shown::Now(format!("↺ {step}{attempt}")),
        "step_scheduled" => Shown::Now(format!("{step}: waiting for a worker{attempt}")),
        "task_started" => Shown::Now(format!("{step}: running{attempt}")),
        "step_completed" if undo => Shown::Line(format!("↺ {step}{attempt}")),
        "step_completed" => Shown::Line(format!("✓ {step}{attempt}")),
        "step_failed" => {
            let error = event.error().map(error_text).unwrap_or_default();
            Shown::Line(format!("✗ {step}{attempt}: {error}"))
        }
        "step_caught" => {
            let error = event.error().map(error_text).unwrap_or_default();
            Shown::Line(format!("⤷ {step}: caught {error}"))
        }
        "step_retry_scheduled" => match event
            .fields
            .get("next_attempt")
            .and_then(serde_json::Value::as_u64)
        {
            Some(next) => Shown::Now(format!("{step}: waiting to retry (attempt {next})")),
            None => Shown::Now(format!("{step}: waiting to retry")),
        },
        "timer_started" => Shown::Now(format!("{step}: waiting for a timer")),
        "timer_fired" => Shown::Now(format!("{step}: timer fired")),
        "compensation_started" => {
            let steps: Vec<String> = event
                .fields
                .get("steps")
                .and_then(serde_json::Value::as_array)
                .map(|steps| steps.iter().map(super::table::compact).collect())
                .unwrap_or_default();
            Shown::Line(format!(
                "↺ compensating ({}): undo {}",
                field("reason"),
                steps.join(", ")
            ))
        }
        "cancel_requested" => Shown::Line(format!("■ cancel requested by {by}")),
        "instance_terminated" => Shown::Line(format!("■ terminated by {by}: {}", field("reason"))),
        "instance_paused" => Shown::Line(format!("‖ paused by {by}")),
        "instance_resumed" => Shown::Line(format!("▶ resumed by {by}")),
        "instance_retried" => Shown::Line(format!("▶ retried by {by} from {step}")),
        "instance_rerun" => Shown::Line(format!("▶ rerun by {by} from {step}")),
        "signal_received" => {
            Shown::Line(format!("✉ signal {} {}", field("name"), field("payload")))
        }
        "instance_completed"
        | "instance_failed"
        | "instance_cancelled"
        | "instance_compensated" => Shown::Nothing,
        other => Shown::Now(format!("{step}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(body: serde_json::Value, expected: Shown) {
        let event: Event = serde_json::from_value(body).expect("valid event");
        assert_eq!(show(&event), expected);
    }

    #[test]
    fn events_on_screen() {
        // Goal: each event type shows as intended; method: one event of each kind.
        let at = "2026-01-01T00:00:00Z";
        check(
            json!({"seq": 2, "type": "step_completed", "at": at, "step_id": "reserve", "attempt": 1}),
            Shown::Line("✓ reserve (attempt 1)".into()),
        );
        check(
            json!({"seq": 3, "type": "step_failed", "at": at, "step_id": "charge", "attempt": 2,
                   "error": {"type": "timeout", "message": "no answer in 30s"}}),
            Shown::Line("✗ charge (attempt 2): timeout: no answer in 30s".into()),
        );
        check(
            json!({"seq": 4, "type": "step_scheduled", "at": at, "step_id": "charge", "attempt": 3}),
            Shown::Now("charge: waiting for a worker (attempt 3)".into()),
        );
        check(
            json!({"seq": 5, "type": "step_retry_scheduled", "at": at, "step_id": "charge",
                   "next_attempt": 2, "fire_at": 1795315824713u64}),
            Shown::Now("charge: waiting to retry (attempt 2)".into()),
        );
        check(
            json!({"seq": 5, "type": "instance_completed", "at": at}),
            Shown::Nothing,
        );
        check(
            json!({"seq": 6, "type": "step_sliced", "at": at, "step_id": "approve"}),
            Shown::Now("approve: step_sliced".into()),
        );
    }

    #[test]
    fn compensations_and_operations_on_screen() {
        // Goal: compensations read as undoing, operators' actions as lines; method: one event
        // of each kind.
        let at = "2026-01-01T00:00:00Z";
        check(
            json!({"seq": 1, "type": "compensation_started", "at": at, "steps": ["ship", "reserve"],
                   "reason": "charge failed"}),
            Shown::Line("↺ compensating (charge failed): undo ship, reserve".into()),
        );
        check(
            json!({"seq": 2, "type": "step_scheduled", "at": at, "step_id": "reserve~undo",
                   "attempt": 1}),
            Shown::Now("↺ undo reserve (attempt 1)".into()),
        );
        check(
            json!({"seq": 3, "type": "step_completed", "at": at, "step_id": "reserve~undo",
                   "attempt": 1, "output": null}),
            Shown::Line("↺ undo reserve (attempt 1)".into()),
        );
        check(
            json!({"seq": 4, "type": "step_failed", "at": at, "step_id": "reserve~undo",
                   "attempt": 2, "error": {"type": "flaky", "message": "oops"}}),
            Shown::Line("✗ undo reserve (attempt 2): flaky: oops".into()),
        );
        check(
            json!({"seq": 5, "type": "step_caught", "at": at, "step_id": "charge",
                   "error": {"type": "card_declined", "message": "no"}, "handler": 0}),
            Shown::Line("⤷ charge: caught card_declined: no".into()),
        );
        check(
            json!({"seq": 6, "type": "step_completed", "at": at, "step_id": "charge~catch0.1",
                   "attempt": 1}),
            Shown::Line("✓ charge~catch0.1 (attempt 1)".into()),
        );
        check(
            json!({"seq": 7, "type": "instance_paused", "at": at, "by": "alice"}),
            Shown::Line("‖ paused by alice".into()),
        );
        check(
            json!({"seq": 8, "type": "instance_retried", "at": at, "by": "alice",
                   "step_id": "charge"}),
            Shown::Line("▶ retried by alice from charge".into()),
        );
        check(
            json!({"seq": 9, "type": "instance_terminated", "at": at, "by": "bob",
                   "reason": "stuck"}),
            Shown::Line("■ terminated by bob: stuck".into()),
        );
        check(
            json!({"seq": 10, "type": "signal_received", "at": at, "name": "approve",
                   "payload": {"ok": true}}),
            Shown::Line(r#"✉ signal approve {"ok":true}"#.into()),
        );
        check(
            json!({"seq": 11, "type": "instance_compensated", "at": at,
                   "error": {"type": "x", "message": "y"}}),
            Shown::Nothing,
        );
    }
}
