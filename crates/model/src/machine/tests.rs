//! State machine scenarios and properties, in virtual time (time is an argument).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::dsl::{Catch, CatchThen, Definition, OnFailure, Step, StepKind};
use crate::expr::Template;
use crate::retry::{Backoff, Jitter, RetryPolicy};

fn task_step(id: &str) -> Step {
    Step::new(
        id,
        StepKind::Task {
            queue: "q".into(),
            input: Template::Literal(json!({ "step": id })),
        },
    )
}

fn undo(id: &str) -> Option<Box<Step>> {
    Some(Box::new(Step::new(
        "",
        StepKind::Task {
            queue: "undo".into(),
            input: Template::Literal(json!({ "undo": id })),
        },
    )))
}

fn main(index: usize) -> StepRef {
    StepRef::Main { index }
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        backoff: Backoff::Fixed,
        interval: Duration::from_secs(1),
        multiplier: 1.0,
        max_interval: None,
        jitter: Jitter::None,
        max_duration: None,
        non_retryable: vec!["fatal".into()],
    }
}

fn three_steps() -> Definition {
    Definition {
        name: "d".into(),
        timeout: None,
        deadline: None,
        on_failure: None,
        retry: Some(policy(3)),
        steps: vec![task_step("a"), task_step("b"), task_step("c")],
        output: None,
    }
}

/// Three steps, each with a compensation.
fn saga() -> Definition {
    let mut definition = three_steps();
    for step in &mut definition.steps {
        step.compensate = undo(&step.id);
    }
    definition
}

fn offered(t: &Transition) -> Vec<String> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::OfferTask(spec) => Some(spec.task_id.clone()),
            _ => None,
        })
        .collect()
}

fn timers(t: &Transition) -> Vec<(TimerId, u64)> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::StartTimer { timer, fire_at } => Some((timer.clone(), *fire_at)),
            _ => None,
        })
        .collect()
}

fn types(t: &Transition) -> Vec<&'static str> {
    t.events.iter().map(EventKind::type_name).collect()
}

fn complete(state: &mut InstanceState, d: &Definition, task: &str, now: u64) -> Transition {
    let command = Command::CompleteTask {
        task_id: task.into(),
        output: json!({ "done": task }),
    };
    handle(state, d, command, now).unwrap_or_else(|err| panic!("completing {task}: {err}"))
}

fn fail(
    state: &mut InstanceState,
    d: &Definition,
    task: &str,
    error_type: &str,
    retryable: bool,
    now: u64,
) -> Transition {
    let command = Command::FailTask {
        task_id: task.into(),
        error: ErrorInfo {
            error_type: error_type.into(),
            message: "m".into(),
        },
        retryable,
    };
    handle(state, d, command, now).unwrap_or_else(|err| panic!("failing {task}: {err}"))
}

fn by() -> String {
    "tester".to_string()
}

#[test]
fn a_happy_run_completes_every_step_in_order() {
    let d = three_steps();
    let (mut state, t) = start(&d, 1, "i1", json!({"x": 1}), 0);
    assert_eq!(types(&t), ["instance_started", "step_scheduled"]);
    assert_eq!(offered(&t), ["i1:a:1"]);
    let t = complete(&mut state, &d, "i1:a:1", 5);
    assert_eq!(types(&t), ["step_completed", "step_scheduled"]);
    complete(&mut state, &d, "i1:b:1", 6);
    let t = complete(&mut state, &d, "i1:c:1", 7);
    assert_eq!(types(&t), ["step_completed", "instance_completed"]);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(state.output, Some(json!({"done": "i1:c:1"})));
    assert_eq!(
        state.context["steps"]["a"]["output"],
        json!({"done": "i1:a:1"})
    );
}

#[test]
fn retries_wait_for_their_timer_then_offer_a_new_attempt() {
    let d = three_steps();
    let (mut state, _) = start(&d, 1, "i1", json!({}), 0);
    let t = fail(&mut state, &d, "i1:a:1", "flaky", true, 10);
    assert_eq!(types(&t), ["step_failed", "step_retry_scheduled"]);
    assert_eq!(
        timers(&t),
        [(
            TimerId::Retry {
                step: main(0),
                attempt: 2
            },
            1010
        )]
    );
    // The failed attempt's task is no longer current.
    let before = state.clone();
    let late = handle(
        &mut state,
        &d,
        Command::CompleteTask {
            task_id: "i1:a:1".into(),
            output: json!(1),
        },
        11,
    );
    assert_eq!(late, Err(Rejection::NotCurrent));
    assert_eq!(state, before);
    let t = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::Retry {
                step: main(0),
                attempt: 2,
            },
        },
        1010,
    )
    .unwrap();
    assert_eq!(offered(&t), ["i1:a:2"]);
    // A non-retryable error type ends the instance at once.
    let t = fail(&mut state, &d, "i1:a:2", "fatal", true, 1020);
    assert_eq!(types(&t), ["step_failed", "instance_failed"]);
    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(state.error.as_ref().unwrap().error_type, "fatal");
}

#[test]
fn attempt_timeouts_and_sleeps_run_on_virtual_time() {
    let mut d = three_steps();
    d.steps[0].timeout = Some(Duration::from_secs(30));
    d.steps[1] = Step::new(
        "nap",
        StepKind::Sleep {
            duration: Duration::from_secs(60),
        },
    );
    let (mut state, t) = start(&d, 1, "i1", json!({}), 0);
    assert_eq!(
        timers(&t),
        [(
            TimerId::AttemptTimeout {
                step: main(0),
                attempt: 1
            },
            30_000
        )]
    );
    let t = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::AttemptTimeout {
                step: main(0),
                attempt: 1,
            },
        },
        30_000,
    )
    .unwrap();
    assert_eq!(types(&t), ["step_failed", "step_retry_scheduled"]);
    assert!(t.effects.contains(&Effect::WithdrawTask {
        task_id: "i1:a:1".into()
    }));
    // A worker's late completion of the timed-out attempt changes nothing.
    let late = handle(
        &mut state,
        &d,
        Command::CompleteTask {
            task_id: "i1:a:1".into(),
            output: json!(1),
        },
        30_001,
    );
    assert_eq!(late, Err(Rejection::NotCurrent));
    let t = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::Retry {
                step: main(0),
                attempt: 2,
            },
        },
        31_000,
    )
    .unwrap();
    assert_eq!(offered(&t), ["i1:a:2"]);
    let t = complete(&mut state, &d, "i1:a:2", 32_000);
    assert!(t.effects.contains(&Effect::CancelTimer {
        timer: TimerId::AttemptTimeout {
            step: main(0),
            attempt: 2
        }
    }));
    assert_eq!(
        timers(&t),
        [(
            TimerId::Sleep {
                step: main(1),
                attempt: 1
            },
            92_000
        )]
    );
    let stale = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::AttemptTimeout {
                step: main(0),
                attempt: 1,
            },
        },
        92_000,
    );
    assert_eq!(stale, Err(Rejection::NotCurrent));
    let t = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::Sleep {
                step: main(1),
                attempt: 1,
            },
        },
        92_000,
    )
    .unwrap();
    assert_eq!(
        types(&t),
        ["timer_fired", "step_completed", "step_scheduled"]
    );
}

#[test]
fn step_timeout_bounds_the_step_with_its_retries() {
    let mut d = three_steps();
    d.steps[0].step_timeout = Some(Duration::from_millis(2500));
    d.retry = Some(policy(10));
    let (mut state, t) = start(&d, 1, "i1", json!({}), 0);
    let expiry = TimerId::StepExpiry {
        step: main(0),
        attempt_first: 1,
    };
    assert!(timers(&t).contains(&(expiry.clone(), 2500)));
    fail(&mut state, &d, "i1:a:1", "flaky", true, 100);
    handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::Retry {
                step: main(0),
                attempt: 2,
            },
        },
        1100,
    )
    .unwrap();
    let t = handle(&mut state, &d, Command::FireTimer { timer: expiry }, 2500).unwrap();
    assert_eq!(types(&t), ["step_failed", "instance_failed"]);
    assert!(t.effects.contains(&Effect::WithdrawTask {
        task_id: "i1:a:2".into()
    }));
    assert_eq!(state.error.as_ref().unwrap().error_type, ERROR_TYPE_TIMEOUT);
    let late = handle(
        &mut state,
        &d,
        Command::CompleteTask {
            task_id: "i1:a:2".into(),
            output: json!(1),
        },
        2600,
    );
    assert_eq!(late, Err(Rejection::InstanceEnded("failed")));
}

#[test]
fn deadlines_come_from_timestamps_or_expressions() {
    let mut d = three_steps();
    d.steps[1].deadline = Some(Template::from_value(json!("${ .input.due }")).unwrap());
    d.deadline = Some(Template::Literal(json!("1970-01-01T00:01:00Z")));
    let (mut state, t) = start(&d, 1, "i1", json!({"due": 5000}), 0);
    assert!(timers(&t).contains(&(TimerId::InstanceDeadline, 60_000)));
    let t = complete(&mut state, &d, "i1:a:1", 10);
    assert!(timers(&t).contains(&(
        TimerId::StepExpiry {
            step: main(1),
            attempt_first: 1
        },
        5000
    )));
    let t = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::InstanceDeadline,
        },
        60_000,
    )
    .unwrap();
    assert_eq!(types(&t), ["instance_failed"]);
    assert!(t.effects.contains(&Effect::WithdrawTask {
        task_id: "i1:b:1".into()
    }));
}

#[test]
fn compensations_run_in_reverse_completion_order() {
    let d = saga();
    let (mut state, _) = start(&d, 1, "s", json!({}), 0);
    complete(&mut state, &d, "s:a:1", 1);
    complete(&mut state, &d, "s:b:1", 2);
    let t = fail(&mut state, &d, "s:c:1", "fatal", false, 3);
    assert_eq!(
        types(&t),
        ["step_failed", "compensation_started", "step_scheduled"]
    );
    assert_eq!(state.status, InstanceStatus::Compensating);
    assert_eq!(
        offered(&t),
        ["s:b~undo:1"],
        "the last completed step is undone first"
    );
    let t = complete(&mut state, &d, "s:b~undo:1", 4);
    assert_eq!(offered(&t), ["s:a~undo:1"]);
    let t = complete(&mut state, &d, "s:a~undo:1", 5);
    assert_eq!(types(&t), ["step_completed", "instance_compensated"]);
    assert_eq!(state.status, InstanceStatus::Compensated);
    assert_eq!(state.error.as_ref().unwrap().error_type, "fatal");
}

#[test]
fn a_failed_compensation_fails_the_instance_and_retry_resumes_it() {
    let mut d = saga();
    d.steps[0].compensate.as_mut().unwrap().retry = Some(policy(1));
    let (mut state, _) = start(&d, 1, "s", json!({}), 0);
    complete(&mut state, &d, "s:a:1", 1);
    fail(&mut state, &d, "s:b:1", "fatal", false, 2);
    let t = fail(&mut state, &d, "s:a~undo:1", "broken", false, 3);
    assert_eq!(types(&t), ["step_failed", "instance_failed"]);
    assert_eq!(state.status, InstanceStatus::Failed);
    assert!(state
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("compensation `a~undo` failed"));
    let t = handle(&mut state, &d, Command::Retry { by: by() }, 10).unwrap();
    assert_eq!(state.status, InstanceStatus::Compensating);
    assert_eq!(
        offered(&t),
        ["s:a~undo:2"],
        "a new attempt number, so the old task id stays stale"
    );
    let t = complete(&mut state, &d, "s:a~undo:2", 11);
    assert_eq!(types(&t), ["step_completed", "instance_compensated"]);
}

#[test]
fn cancel_compensates_then_ends_cancelled() {
    let d = saga();
    let (mut state, _) = start(&d, 1, "s", json!({}), 0);
    complete(&mut state, &d, "s:a:1", 1);
    let t = handle(&mut state, &d, Command::Cancel { by: by() }, 2).unwrap();
    assert_eq!(
        types(&t),
        ["cancel_requested", "compensation_started", "step_scheduled"]
    );
    assert!(t.effects.contains(&Effect::WithdrawTask {
        task_id: "s:b:1".into()
    }));
    assert_eq!(offered(&t), ["s:a~undo:1"]);
    let refused = handle(&mut state, &d, Command::Cancel { by: by() }, 3);
    assert!(matches!(refused, Err(Rejection::NotAllowed { .. })));
    let t = complete(&mut state, &d, "s:a~undo:1", 4);
    assert_eq!(types(&t), ["step_completed", "instance_cancelled"]);
    assert_eq!(state.status, InstanceStatus::Cancelled);
}

#[test]
fn terminate_ends_at_once_without_compensation() {
    let d = saga();
    let (mut state, _) = start(&d, 1, "s", json!({}), 0);
    complete(&mut state, &d, "s:a:1", 1);
    let t = handle(
        &mut state,
        &d,
        Command::Terminate {
            by: by(),
            reason: "stop".into(),
        },
        2,
    )
    .unwrap();
    assert_eq!(types(&t), ["instance_terminated"]);
    assert!(offered(&t).is_empty());
    assert_eq!(state.status, InstanceStatus::Terminated);
}

#[test]
fn on_failure_fail_skips_compensation() {
    let mut d = saga();
    d.on_failure = Some(OnFailure::Fail);
    let (mut state, _) = start(&d, 1, "s", json!({}), 0);
    complete(&mut state, &d, "s:a:1", 1);
    let t = fail(&mut state, &d, "s:b:1", "fatal", false, 2);
    assert_eq!(types(&t), ["step_failed", "instance_failed"]);
}

#[test]
fn catch_routes_by_error_type_then_continues_or_fails() {
    let mut d = three_steps();
    d.steps[1].catch = vec![
        Catch {
            errors: vec!["card_declined".into()],
            steps: vec![Step::new(
                "",
                StepKind::Set {
                    vars: Template::Literal(json!({"declined": true})),
                },
            )],
            then: CatchThen::Continue,
        },
        Catch {
            errors: vec![],
            steps: vec![],
            then: CatchThen::Fail,
        },
    ];
    let (mut state, _) = start(&d, 1, "c", json!({}), 0);
    complete(&mut state, &d, "c:a:1", 1);
    let t = fail(&mut state, &d, "c:b:1", "card_declined", false, 2);
    assert_eq!(
        types(&t),
        [
            "step_failed",
            "step_caught",
            "step_scheduled",
            "step_completed",
            "step_scheduled"
        ],
        "the handler's set step ran, then the next main step was scheduled"
    );
    assert_eq!(state.context["vars"]["declined"], json!(true));
    assert_eq!(offered(&t), ["c:c:1"]);

    let (mut other, _) = start(&d, 1, "o", json!({}), 0);
    complete(&mut other, &d, "o:a:1", 1);
    let t = fail(&mut other, &d, "o:b:1", "fatal", false, 2);
    assert_eq!(types(&t), ["step_failed", "step_caught", "instance_failed"]);
}

#[test]
fn retry_resumes_from_the_failed_step_without_rerunning_completed_ones() {
    let d = three_steps();
    let (mut state, _) = start(&d, 1, "r", json!({}), 0);
    complete(&mut state, &d, "r:a:1", 1);
    fail(&mut state, &d, "r:b:1", "fatal", false, 2);
    assert_eq!(state.status, InstanceStatus::Failed);
    let t = handle(&mut state, &d, Command::Retry { by: by() }, 3).unwrap();
    assert_eq!(types(&t), ["instance_retried", "step_scheduled"]);
    assert_eq!(offered(&t), ["r:b:2"]);
    complete(&mut state, &d, "r:b:2", 4);
    complete(&mut state, &d, "r:c:1", 5);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(state.completed, [0, 1, 2]);
    // Retrying a completed instance makes no sense.
    let refused = handle(&mut state, &d, Command::Retry { by: by() }, 6);
    assert_eq!(
        refused,
        Err(Rejection::NotAllowed {
            operation: "retry",
            status: "completed"
        })
    );
}

#[test]
fn rerun_runs_again_from_a_chosen_step() {
    let d = three_steps();
    let (mut state, _) = start(&d, 1, "r", json!({}), 0);
    for task in ["r:a:1", "r:b:1", "r:c:1"] {
        complete(&mut state, &d, task, 1);
    }
    let unknown = handle(
        &mut state,
        &d,
        Command::Rerun {
            by: by(),
            from_step: "zz".into(),
        },
        2,
    );
    assert!(matches!(unknown, Err(Rejection::BadRequest(_))));
    let t = handle(
        &mut state,
        &d,
        Command::Rerun {
            by: by(),
            from_step: "b".into(),
        },
        2,
    )
    .unwrap();
    assert_eq!(offered(&t), ["r:b:2"]);
    assert!(state.context["steps"].get("b").is_none() && state.context["steps"].get("a").is_some());
    assert_eq!(state.completed, [0]);
}

#[test]
fn a_paused_instance_starts_no_new_attempt_until_resumed() {
    let d = three_steps();
    let (mut state, _) = start(&d, 1, "p", json!({}), 0);
    handle(&mut state, &d, Command::Pause { by: by() }, 1).unwrap();
    assert_eq!(state.status, InstanceStatus::Paused);
    // The running task may finish; the next step waits.
    let t = complete(&mut state, &d, "p:a:1", 2);
    assert!(offered(&t).is_empty());
    assert_eq!(state.wait, Wait::Paused);
    let twice = handle(&mut state, &d, Command::Pause { by: by() }, 3);
    assert!(matches!(twice, Err(Rejection::NotAllowed { .. })));
    let t = handle(&mut state, &d, Command::Resume { by: by() }, 4).unwrap();
    assert_eq!(offered(&t), ["p:b:1"]);
    assert_eq!(state.status, InstanceStatus::Running);
}

#[test]
fn signals_that_arrive_early_are_kept() {
    let mut d = three_steps();
    d.steps[1] = Step::new(
        "approval",
        StepKind::Wait {
            signal: "approved".into(),
        },
    );
    let (mut state, _) = start(&d, 1, "w", json!({}), 0);
    let t = handle(
        &mut state,
        &d,
        Command::Signal {
            name: "approved".into(),
            payload: json!({"by": "ann"}),
        },
        1,
    )
    .unwrap();
    assert_eq!(types(&t), ["signal_received"]);
    let t = complete(&mut state, &d, "w:a:1", 2);
    assert_eq!(
        types(&t),
        [
            "step_completed",
            "step_scheduled",
            "step_completed",
            "step_scheduled"
        ]
    );
    assert_eq!(
        state.context["steps"]["approval"]["output"],
        json!({"by": "ann"})
    );
    assert!(state.signals.is_empty());
}

#[test]
fn a_wait_times_out() {
    let mut d = three_steps();
    d.steps[0] = Step::new(
        "approval",
        StepKind::Wait {
            signal: "ok".into(),
        },
    );
    d.steps[0].timeout = Some(Duration::from_secs(5));
    d.steps[0].retry = Some(policy(1));
    let (mut state, t) = start(&d, 1, "w", json!({}), 0);
    assert_eq!(
        timers(&t),
        [(
            TimerId::AttemptTimeout {
                step: main(0),
                attempt: 1
            },
            5000
        )]
    );
    let t = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::AttemptTimeout {
                step: main(0),
                attempt: 1,
            },
        },
        5000,
    )
    .unwrap();
    assert_eq!(types(&t), ["step_failed", "instance_failed"]);
}

#[test]
fn fail_steps_are_not_retried() {
    let mut d = three_steps();
    d.steps[0] = Step::new(
        "stop",
        StepKind::Fail {
            error_type: "rejected".into(),
            message: Template::Literal(json!("no")),
        },
    );
    let (state, t) = start(&d, 1, "f", json!({}), 0);
    assert_eq!(
        types(&t),
        [
            "instance_started",
            "step_scheduled",
            "step_failed",
            "instance_failed"
        ]
    );
    assert_eq!(state.error.unwrap().error_type, "rejected");
}

#[test]
fn task_ids_and_timer_keys_round_trip() {
    assert_eq!(
        parse_task_id(&task_id("a.b-c", "s_1~undo", 7)),
        Some(("a.b-c", "s_1~undo", 7))
    );
    assert_eq!(parse_task_id("nope"), None);
    assert_eq!(parse_task_id(":s:1"), None);
    for timer in [
        TimerId::Sleep {
            step: main(3),
            attempt: 1,
        },
        TimerId::Retry {
            step: StepRef::Undo { index: 1 },
            attempt: 2,
        },
        TimerId::AttemptTimeout {
            step: StepRef::Handler {
                index: 0,
                handler: 2,
                step: 3,
            },
            attempt: 9,
        },
        TimerId::StepExpiry {
            step: main(4),
            attempt_first: 7,
        },
        TimerId::InstanceTimeout,
        TimerId::InstanceDeadline,
    ] {
        assert_eq!(TimerId::parse(&timer.key()), Some(timer));
    }
}

/// A worker outcome or other input, chosen by proptest.
#[derive(Debug, Clone)]
enum Op {
    /// Complete the task `index` (modulo) of all tasks ever offered.
    Complete(usize),
    /// Fail a task, retryable or not.
    Fail(usize, bool),
    /// Time passes: every due timer fires.
    Advance(u64),
    /// Cancel.
    Cancel,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<usize>().prop_map(Op::Complete),
        3 => (any::<usize>(), prop::bool::weighted(0.8)).prop_map(|(i, r)| Op::Fail(i, r)),
        3 => (0u64..5_000).prop_map(Op::Advance),
        1 => Just(Op::Cancel),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Goal: no transition applies twice, refused commands change nothing, the instance
    /// ends only in a state its policies allow, and compensations run exactly for the
    /// steps that completed, in reverse order.
    /// Method: drive a saga with arbitrary interleavings of current, stale and duplicate
    /// completions, failures, stalls (timeouts), timer firings and cancels; check the history.
    #[test]
    fn no_transition_applies_twice(ops in prop::collection::vec(op(), 1..120)) {
        let mut d = saga();
        d.steps[1].timeout = Some(Duration::from_millis(1500));
        for step in &mut d.steps {
            // Compensations retry generously so that they always finish.
            step.compensate.as_mut().unwrap().retry = Some(RetryPolicy { max_attempts: 1000, ..policy(1000) });
        }
        let (mut state, first) = start(&d, 1, "i", json!({}), 0);
        let mut now = 0u64;
        let mut tasks: Vec<String> = offered(&first);
        let mut armed: BTreeMap<String, (u64, TimerId)> = BTreeMap::new();
        let mut events: Vec<EventKind> = first.events.clone();
        let track = |t: &Transition, tasks: &mut Vec<String>, armed: &mut BTreeMap<String, (u64, TimerId)>| {
            tasks.extend(offered(t));
            for effect in &t.effects {
                match effect {
                    Effect::StartTimer { timer, fire_at } => { armed.insert(timer.key(), (*fire_at, timer.clone())); }
                    Effect::CancelTimer { timer } => { armed.remove(&timer.key()); }
                    _ => {}
                }
            }
        };
        track(&first, &mut tasks, &mut armed);
        let run = |state: &mut InstanceState, command: Command, now: u64, tasks: &mut Vec<String>, armed: &mut BTreeMap<String, (u64, TimerId)>, events: &mut Vec<EventKind>| -> Result<(), TestCaseError> {
            let before = state.clone();
            match handle(state, &d, command, now) {
                Ok(t) => {
                    prop_assert!(!t.events.is_empty(), "an accepted command records what it did");
                    track(&t, tasks, armed);
                    events.extend(t.events);
                }
                Err(_) => prop_assert_eq!(&*state, &before, "a refused command changed the state"),
            }
            Ok(())
        };
        for op in ops {
            let mut commands = Vec::new();
            match op {
                Op::Complete(i) => commands.push(Command::CompleteTask { task_id: tasks[i % tasks.len()].clone(), output: json!(i) }),
                Op::Fail(i, retryable) => commands.push(Command::FailTask {
                    task_id: tasks[i % tasks.len()].clone(),
                    error: ErrorInfo { error_type: "e".into(), message: String::new() },
                    retryable,
                }),
                Op::Advance(by) => {
                    now += by;
                    let due: Vec<String> = armed.iter().filter(|(_, (at, _))| *at <= now).map(|(k, _)| k.clone()).collect();
                    for key in due {
                        let (_, timer) = armed.remove(&key).unwrap();
                        commands.push(Command::FireTimer { timer });
                    }
                }
                Op::Cancel => commands.push(Command::Cancel { by: "prop".into() }),
            }
            for command in commands {
                run(&mut state, command, now, &mut tasks, &mut armed, &mut events)?;
            }
        }
        // Drain: finish whatever runs (compensations included) with successes.
        for _ in 0..100 {
            if state.status.is_terminal() {
                break;
            }
            match state.wait.clone() {
                Wait::Task { task_id } => run(&mut state, Command::CompleteTask { task_id, output: json!("drain") }, now, &mut tasks, &mut armed, &mut events)?,
                _ => {
                    now += 10_000;
                    let due: Vec<(String, (u64, TimerId))> = armed.iter().filter(|(_, (at, _))| *at <= now).map(|(k, v)| (k.clone(), v.clone())).collect();
                    for (key, (_, timer)) in due {
                        armed.remove(&key);
                        run(&mut state, Command::FireTimer { timer }, now, &mut tasks, &mut armed, &mut events)?;
                    }
                }
            }
        }
        prop_assert!(state.status.is_terminal(), "the instance ends: {:?}", state.status);
        // A saga ends completed, compensated or cancelled; it ends failed only when a
        // worker failed a compensation as not retryable.
        let compensation_failed = state.status == InstanceStatus::Failed
            && state.error.as_ref().is_some_and(|e| e.message.starts_with("compensation `"));
        prop_assert!(
            matches!(state.status, InstanceStatus::Completed | InstanceStatus::Compensated | InstanceStatus::Cancelled)
                || compensation_failed,
            "ended {:?}: {:?}", state.status, state.error
        );
        // Each main step completes at most once, in definition order.
        let completed: Vec<&str> = events.iter().filter_map(|e| match e {
            EventKind::StepCompleted { step_id, .. } if !step_id.contains('~') => Some(step_id.as_str()),
            _ => None,
        }).collect();
        let order: Vec<&str> = d.steps.iter().map(|s| s.id.as_str()).take(completed.len()).collect();
        prop_assert_eq!(&completed, &order);
        // Compensations ran exactly for completed steps, in reverse order, each once.
        let undone: Vec<String> = events.iter().filter_map(|e| match e {
            EventKind::StepCompleted { step_id, .. } => step_id.strip_suffix("~undo").map(str::to_string),
            _ => None,
        }).collect();
        let expected: Vec<String> = if state.status == InstanceStatus::Completed {
            Vec::new()
        } else {
            completed.iter().rev().map(|s| s.to_string()).collect()
        };
        if compensation_failed {
            prop_assert!(expected.starts_with(&undone), "{:?} is not a prefix of {:?}", undone, expected);
        } else {
            prop_assert_eq!(undone, expected);
        }
        // One terminal event, the last.
        let terminal: Vec<usize> = events.iter().enumerate().filter(|(_, e)| matches!(e,
            EventKind::InstanceCompleted { .. } | EventKind::InstanceFailed { .. } | EventKind::InstanceCancelled { .. }
            | EventKind::InstanceCompensated { .. } | EventKind::InstanceTerminated { .. })).map(|(i, _)| i).collect();
        prop_assert_eq!(terminal.len(), 1);
        prop_assert_eq!(terminal[0], events.len() - 1);
        // Attempts are scheduled in order, once each, within the policy.
        let mut attempts: HashMap<&str, u32> = HashMap::new();
        for e in &events {
            if let EventKind::StepScheduled { step_id, attempt, .. } = e {
                let seen = attempts.entry(step_id.as_str()).or_default();
                prop_assert_eq!(*attempt, *seen + 1, "attempts are scheduled in order, once each");
                *seen = *attempt;
                if !step_id.contains('~') {
                    prop_assert!(*attempt <= 3);
                }
            }
        }
    }
}

fn approval_step(escalation: Option<crate::dsl::Escalation>) -> Step {
    Step::new(
        "approve",
        StepKind::Human {
            title: Template::from_value(json!("${ \"Approve \" + .input.order }")).unwrap(),
            assignee: Some("ann".into()),
            group: Some("managers".into()),
            form: Some(
                crate::dsl::FormSchema::compile(json!({
                    "type": "object",
                    "required": ["approved"],
                    "properties": { "approved": { "type": "boolean" } }
                }))
                .unwrap(),
            ),
            escalation,
        },
    )
}

#[test]
fn human_tasks_check_their_form_and_escalate() {
    use crate::dsl::{Escalation, EscalationAction};
    let mut d = three_steps();
    d.steps[0] = approval_step(Some(Escalation {
        after: Duration::from_secs(3600),
        action: EscalationAction::Reassign {
            assignee: Some("bob".into()),
            group: None,
        },
    }));
    let (mut state, t) = start(&d, 1, "h", json!({"order": "o-7"}), 0);
    let Effect::OfferTask(spec) = &t.effects[0] else {
        panic!("{t:?}")
    };
    assert_eq!(spec.queue, crate::dsl::HUMAN_QUEUE);
    assert_eq!(spec.input["title"], json!("Approve o-7"));
    assert_eq!(spec.input["assignee"], json!("ann"));
    assert!(timers(&t).contains(&(
        TimerId::Escalate {
            step: main(0),
            attempt: 1
        },
        3_600_000
    )));
    // Invalid data is refused with a pointer per problem, and changes nothing.
    let before = state.clone();
    let bad = handle(
        &mut state,
        &d,
        Command::CompleteHuman {
            task_id: "h:approve:1".into(),
            by: "ann".into(),
            data: json!({"approved": "yes"}),
        },
        5,
    );
    let Err(Rejection::InvalidData(problems)) = bad else {
        panic!("{bad:?}")
    };
    assert_eq!(problems[0].0, "/approved");
    assert_eq!(state, before);
    // Escalation reassigns.
    let t = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::Escalate {
                step: main(0),
                attempt: 1,
            },
        },
        3_600_000,
    )
    .unwrap();
    assert_eq!(types(&t), ["human_task_escalated"]);
    let Some(Effect::OfferTask(reassigned)) = t.effects.last() else {
        panic!("{t:?}")
    };
    assert_eq!(reassigned.input["assignee"], json!("bob"));
    let t = handle(
        &mut state,
        &d,
        Command::CompleteHuman {
            task_id: "h:approve:1".into(),
            by: "bob".into(),
            data: json!({"approved": true}),
        },
        3_600_001,
    )
    .unwrap();
    assert_eq!(types(&t), ["step_completed", "step_scheduled"]);
    assert_eq!(
        state.context["steps"]["approve"]["output"],
        json!({"by": "bob", "data": {"approved": true}})
    );
}

#[test]
fn a_human_task_nobody_completes_fails_on_escalation() {
    use crate::dsl::{Escalation, EscalationAction};
    let mut d = three_steps();
    d.steps[0] = approval_step(Some(Escalation {
        after: Duration::from_secs(60),
        action: EscalationAction::Fail,
    }));
    let (mut state, _) = start(&d, 1, "h", json!({"order": "o-8"}), 0);
    let t = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::Escalate {
                step: main(0),
                attempt: 1,
            },
        },
        60_000,
    )
    .unwrap();
    assert_eq!(types(&t), ["step_failed", "instance_failed"]);
    assert!(t.effects.contains(&Effect::WithdrawTask {
        task_id: "h:approve:1".into()
    }));
    assert_eq!(state.error.unwrap().error_type, ERROR_TYPE_TIMEOUT);
}

#[test]
fn switch_runs_the_first_matching_branch() {
    let source = r#"
name: route
steps:
  - id: a
    task: q
  - id: route
    switch:
      cases:
        - when: "${ .input.qty > 10 }"
          steps:
            - task: approvals
            - set: { big: true }
        - when: "${ .input.express }"
          steps:
            - task: express
      default:
        - set: { big: false }
  - id: ship
    task: shipping
    input: { route: "${ .steps.route.output }" }
"#;
    let d = crate::dsl::parse(source).unwrap();
    let (mut state, _) = start(&d, 1, "s", json!({"qty": 20}), 0);
    let t = complete(&mut state, &d, "s:a:1", 1);
    assert_eq!(offered(&t), ["s:route~case0.0:1"]);
    let t = complete(&mut state, &d, "s:route~case0.0:1", 2);
    // The set step ran, the switch completed with its output, and the next step got it.
    assert_eq!(
        state.context["steps"]["route"]["output"],
        json!({"big": true})
    );
    let Some(Effect::OfferTask(ship)) =
        t.effects.iter().find(|e| matches!(e, Effect::OfferTask(_)))
    else {
        panic!()
    };
    assert_eq!(ship.input, json!({"route": {"big": true}}));

    let (mut other, _) = start(&d, 1, "o", json!({"qty": 1, "express": false}), 0);
    let t = complete(&mut other, &d, "o:a:1", 1);
    assert_eq!(offered(&t), ["o:ship:1"], "the default branch ran at once");
    assert_eq!(other.context["vars"]["big"], json!(false));

    // A failing branch step fails the switch step.
    let (mut failing, _) = start(&d, 1, "f", json!({"qty": 1, "express": true}), 0);
    complete(&mut failing, &d, "f:a:1", 1);
    let t = fail(&mut failing, &d, "f:route~case1.0:1", "fatal", false, 2);
    assert_eq!(types(&t), ["step_failed", "instance_failed"]);
    assert_eq!(failing.failed_at, Some(main(1)));
    let t = handle(&mut failing, &d, Command::Retry { by: by() }, 3).unwrap();
    assert_eq!(
        offered(&t),
        ["f:route~case1.0:2"],
        "retry runs the switch again"
    );
}

fn withdrawn(t: &Transition) -> Vec<String> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::WithdrawTask { task_id } => Some(task_id.clone()),
            _ => None,
        })
        .collect()
}

const FANOUT: &str = r#"
name: fan
steps:
  - id: split
    parallel:
      join: JOIN
      branches:
        - steps: [{ task: a }]
        - steps: [{ task: b }, { set: { b: done } }]
        - steps: [{ task: c }]
  - id: after
    task: next
    input: "${ .steps.split.output }"
"#;

fn fanout(join: &str) -> Definition {
    crate::dsl::parse(&FANOUT.replace("JOIN", join)).unwrap()
}

#[test]
fn parallel_join_all_waits_for_every_branch_and_keeps_branch_order() {
    let d = fanout("all");
    let (mut state, t) = start(&d, 1, "p", json!({}), 0);
    assert_eq!(
        offered(&t),
        [
            "p:split~lane0.0:1",
            "p:split~lane1.0:1",
            "p:split~lane2.0:1"
        ]
    );
    complete(&mut state, &d, "p:split~lane2.0:1", 1);
    let t = complete(&mut state, &d, "p:split~lane1.0:1", 2);
    assert!(offered(&t).is_empty(), "branch 0 still runs");
    let duplicate = handle(
        &mut state,
        &d,
        Command::CompleteTask {
            task_id: "p:split~lane2.0:1".into(),
            output: json!(1),
        },
        3,
    );
    assert_eq!(
        duplicate,
        Err(Rejection::NotCurrent),
        "a finished lane's task is stale"
    );
    let t = complete(&mut state, &d, "p:split~lane0.0:1", 4);
    let Some(Effect::OfferTask(next)) =
        t.effects.iter().find(|e| matches!(e, Effect::OfferTask(_)))
    else {
        panic!("{t:?}")
    };
    assert_eq!(
        next.input,
        json!([{"done": "p:split~lane0.0:1"}, {"b": "done"}, {"done": "p:split~lane2.0:1"}]),
        "outputs in branch order, each branch's last output"
    );
    assert!(state.fanout.is_none());
}

#[test]
fn parallel_join_any_stops_the_losers() {
    let d = fanout("any");
    let (mut state, _) = start(&d, 1, "p", json!({}), 0);
    let t = complete(&mut state, &d, "p:split~lane2.0:1", 1);
    let mut stopped = withdrawn(&t);
    stopped.sort();
    assert_eq!(stopped, ["p:split~lane0.0:1", "p:split~lane1.0:1"]);
    assert_eq!(offered(&t).len(), 1, "the next step starts");
    assert_eq!(
        state.context["steps"]["split"]["output"],
        json!({"done": "p:split~lane2.0:1"})
    );
}

#[test]
fn parallel_join_n_of_m_fails_once_too_few_can_complete() {
    let d = fanout("2");
    let (mut state, _) = start(&d, 1, "p", json!({}), 0);
    fail(&mut state, &d, "p:split~lane0.0:1", "fatal", false, 1);
    assert_eq!(
        state.status,
        InstanceStatus::Running,
        "two of the three can still complete"
    );
    let t = fail(&mut state, &d, "p:split~lane2.0:1", "fatal", false, 2);
    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(withdrawn(&t), ["p:split~lane1.0:1"]);
    // Retry runs the whole parallel step again.
    let t = handle(&mut state, &d, Command::Retry { by: by() }, 3).unwrap();
    assert_eq!(offered(&t).len(), 3);
}

#[test]
fn foreach_keeps_to_its_concurrency_and_item_order() {
    let source = r#"
name: each
steps:
  - id: lines
    foreach:
      items: "${ .input.lines }"
      concurrency: 2
      steps:
        - task: pick
          input: { sku: "${ .item.sku }" }
"#;
    let d = crate::dsl::parse(source).unwrap();
    let input = json!({"lines": [{"sku": "a"}, {"sku": "b"}, {"sku": "c"}]});
    let (mut state, t) = start(&d, 1, "f", input, 0);
    assert_eq!(
        offered(&t),
        ["f:lines~lane0.0:1", "f:lines~lane1.0:1"],
        "two at a time"
    );
    let Effect::OfferTask(first) = &t.effects[0] else {
        panic!()
    };
    assert_eq!(
        first.input,
        json!({"sku": "a"}),
        "`.item` is the lane's item"
    );
    let t = complete(&mut state, &d, "f:lines~lane1.0:1", 1);
    assert_eq!(
        offered(&t),
        ["f:lines~lane2.0:1"],
        "a free slot starts the next item"
    );
    complete(&mut state, &d, "f:lines~lane2.0:1", 2);
    let t = complete(&mut state, &d, "f:lines~lane0.0:1", 3);
    assert_eq!(
        types(&t),
        ["step_completed", "step_completed", "instance_completed"]
    );
    let outputs: Vec<Value> = state.output.unwrap().as_array().unwrap().clone();
    let ids: Vec<&str> = outputs
        .iter()
        .map(|o| o["done"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "f:lines~lane0.0:1",
            "f:lines~lane1.0:1",
            "f:lines~lane2.0:1"
        ],
        "outputs in item order"
    );
    assert!(
        state.context.get("item").is_none(),
        "`.item` exists only inside lanes"
    );

    let (empty, _) = start(&d, 1, "e", json!({"lines": []}), 0);
    assert_eq!(empty.status, InstanceStatus::Completed);
    assert_eq!(empty.output, Some(json!([])));
    let (bad, _) = start(&d, 1, "x", json!({"lines": 5}), 0);
    assert_eq!(bad.error.unwrap().error_type, ERROR_TYPE_EXPRESSION);
}

#[test]
fn lanes_retry_pause_and_cancel() {
    let mut d = fanout("all");
    d.steps[0].compensate = undo("split");
    let (mut state, _) = start(&d, 1, "p", json!({}), 0);
    // A lane's retry is the lane's own.
    let t = fail(&mut state, &d, "p:split~lane0.0:1", "flaky", true, 1);
    assert_eq!(types(&t), ["step_failed", "step_retry_scheduled"]);
    handle(&mut state, &d, Command::Pause { by: by() }, 2).unwrap();
    let t = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::Retry {
                step: StepRef::Lane {
                    index: 0,
                    lane: 0,
                    step: 0,
                },
                attempt: 2,
            },
        },
        1001,
    )
    .unwrap();
    assert!(offered(&t).is_empty(), "paused: the retry waits");
    let t = handle(&mut state, &d, Command::Resume { by: by() }, 1002).unwrap();
    assert_eq!(offered(&t), ["p:split~lane0.0:2"]);
    // Cancel stops every lane; the parallel step never completed, so nothing compensates.
    let t = handle(&mut state, &d, Command::Cancel { by: by() }, 1003).unwrap();
    let mut stopped = withdrawn(&t);
    stopped.sort();
    assert_eq!(
        stopped,
        [
            "p:split~lane0.0:2",
            "p:split~lane1.0:1",
            "p:split~lane2.0:1"
        ]
    );
    assert_eq!(state.status, InstanceStatus::Cancelled);
    assert!(state.fanout.is_none());
}

#[test]
fn child_workflows_start_report_back_and_are_cancelled_with_their_parent() {
    let source = r#"
name: parent
retry: { max_attempts: 2, backoff: fixed, interval: 1s }
steps:
  - id: child
    workflow: { definition: kid, input: { n: "${ .input.n }" } }
  - id: after
    task: q
    input: "${ .steps.child.output }"
"#;
    let d = crate::dsl::parse(source).unwrap();
    let (mut state, t) = start(&d, 1, "p", json!({"n": 3}), 0);
    assert_eq!(
        t.effects[0],
        Effect::StartChild {
            child_id: "p~child~1".into(),
            definition: "kid".into(),
            version: None,
            input: json!({"n": 3})
        }
    );
    assert_eq!(
        resume_effects(&state, &d),
        vec![t.effects[0].clone()],
        "after a crash the start is repeated (idempotent)"
    );
    let ended = |status: &str, output| Command::ChildEnded {
        child_id: "p~child~1".into(),
        status: status.into(),
        output,
        error: None,
    };
    let t = handle(&mut state, &d, ended("failed", None), 1).unwrap();
    assert_eq!(types(&t), ["step_failed", "step_retry_scheduled"]);
    let stale = handle(&mut state, &d, ended("completed", Some(json!(1))), 2);
    assert_eq!(
        stale,
        Err(Rejection::NotCurrent),
        "the first child's late end is not current"
    );
    let t = handle(
        &mut state,
        &d,
        Command::FireTimer {
            timer: TimerId::Retry {
                step: main(0),
                attempt: 2,
            },
        },
        1001,
    )
    .unwrap();
    assert!(
        matches!(&t.effects[0], Effect::StartChild { child_id, .. } if child_id == "p~child~2")
    );
    let t = handle(&mut state, &d, Command::Cancel { by: by() }, 1002).unwrap();
    assert!(
        t.effects.contains(&Effect::CancelChild {
            child_id: "p~child~2".into()
        }),
        "cancellation propagates"
    );

    let (mut other, _) = start(&d, 1, "o", json!({"n": 1}), 0);
    let done = Command::ChildEnded {
        child_id: "o~child~1".into(),
        status: "completed".into(),
        output: Some(json!({"k": 1})),
        error: None,
    };
    let t = handle(&mut other, &d, done, 1).unwrap();
    let Some(Effect::OfferTask(next)) =
        t.effects.iter().find(|e| matches!(e, Effect::OfferTask(_)))
    else {
        panic!()
    };
    assert_eq!(
        next.input,
        json!({"k": 1}),
        "the child's output is the step's output"
    );
}

/// Goal: a stored state carries no empty fields (fewer bytes written per step), and states
/// stored before, with every field spelled out, still load to the same state.
/// Method: a state is serialized at each point of a run and read back; a state in the
/// earlier format (a real row of a `seq` instance) is read and written again.
#[test]
fn stored_states_omit_empty_fields_and_older_ones_still_load() {
    let d = three_steps();
    let (mut state, t) = start(&d, 1, "i1", json!({"x": 1}), 0);
    let mut task = offered(&t).remove(0);
    for now in 1..=3 {
        let text = serde_json::to_string(&state).unwrap();
        assert!(!text.contains("null"), "{text}");
        for empty in ["compensating", "signals", "caught", "fanout", "parent"] {
            assert!(!text.contains(empty), "{empty} in {text}");
        }
        let read: InstanceState = serde_json::from_str(&text).unwrap();
        assert_eq!(read, state);
        let t = complete(&mut state, &d, &task, now);
        if let Some(next) = offered(&t).first() {
            task = next.clone();
        }
    }
    assert_eq!(state.status, InstanceStatus::Completed);
    let text = serde_json::to_string(&state).unwrap();
    assert_eq!(serde_json::from_str::<InstanceState>(&text).unwrap(), state);

    let earlier = r#"{"id":"bench-4f9c5bfe-0","definition":"bench-seq-3","version":1,"status":"completed","context":{"input":{"n":0},"steps":{"s0":{"output":{"n":0}}},"vars":{}},"cursor":3,"current":null,"attempt":1,"attempt_first":1,"attempts":{"0":1,"1":1,"2":1},"step_started_at":1795915183749,"wait":{"on":"nothing"},"completed":[0,1,2],"compensating":[],"compensation_reason":null,"caught":null,"paused_from":null,"failed_at":null,"signals":{},"restarted_from":null,"fanout":null,"parent":null,"output":{"n":0},"error":null,"created_at":1795915183740,"updated_at":1795915183750}"#;
    let read: InstanceState = serde_json::from_str(earlier).unwrap();
    assert_eq!(read.status, InstanceStatus::Completed);
    assert_eq!(read.output, Some(json!({"n": 0})));
    assert_eq!(read.completed, vec![0, 1, 2]);
    let written = serde_json::to_string(&read).unwrap();
    assert!(written.len() < earlier.len() - 150, "{written}");
    assert_eq!(
        serde_json::from_str::<InstanceState>(&written).unwrap(),
        read
    );
}

/// Goal: a small state is stored whole; once it would pass `STORED_STATE_INLINE_MAX`, it is
/// stored without its step entries, every entry is reported changed once (to be stored
/// apart), later ones as they come, a rerun's removals too; and a state read back with
/// its entries is the state that was stored.
#[test]
fn large_states_store_their_step_outputs_apart() {
    let d = three_steps();
    let (mut state, t) = start(&d, 1, "i1", json!({"x": 1}), 0);
    let task = offered(&t).remove(0);
    let t = complete(&mut state, &d, &task, 1);
    let text = state.to_stored();
    assert!(text.contains("\"steps\":{\"a\""), "{text}");
    assert!(!state.steps_apart);
    assert!(state.take_steps_changed().is_empty(), "kept inside");
    assert_eq!(InstanceState::from_stored(&text).unwrap(), state);

    // A large output: from now on the entries are stored apart, all of them.
    let task = offered(&t).remove(0);
    let big = json!({ "blob": "x".repeat(STORED_STATE_INLINE_MAX) });
    let command = Command::CompleteTask {
        task_id: task,
        output: big.clone(),
    };
    let t = handle(&mut state, &d, command, 2).unwrap();
    let text = state.to_stored();
    assert!(state.steps_apart);
    assert!(!text.contains("\"steps\""), "{text}");
    assert!(text.len() < STORED_STATE_INLINE_MAX, "{text}");
    assert_eq!(state.take_steps_changed(), ["a", "b"]);
    let entries = |state: &InstanceState, ids: &[&str]| -> Vec<(String, String)> {
        ids.iter()
            .map(|id| (id.to_string(), state.context["steps"][id].to_string()))
            .collect()
    };
    let mut read = InstanceState::from_stored(&text).unwrap();
    assert_eq!(read.context["steps"], json!({}));
    read.add_stored_entries(entries(&state, &["a", "b"]))
        .unwrap();
    assert_eq!(read, state);
    assert_eq!(read.context["steps"]["b"]["output"], big);

    // The next entry alone is reported; a rerun reports what it removes.
    let task = offered(&t).remove(0);
    complete(&mut state, &d, &task, 3);
    assert_eq!(state.status, InstanceStatus::Completed);
    let _ = state.to_stored();
    assert_eq!(state.take_steps_changed(), ["c"]);
    let rerun = Command::Rerun {
        by: "me".into(),
        from_step: "b".into(),
    };
    handle(&mut state, &d, rerun, 4).unwrap();
    let text = state.to_stored();
    assert_eq!(state.take_steps_changed(), ["b", "c"]);
    assert_eq!(
        state.context["steps"],
        json!({"a": {"output": {"done": "i1:a:1"}}})
    );
    let mut read = InstanceState::from_stored(&text).unwrap();
    read.add_stored_entries(entries(&state, &["a"])).unwrap();
    assert_eq!(read, state);
}

/// Goal: a stored state copies the texts of its step entries instead of serializing them
/// again, and is still exactly what serializing the state afresh gives: after new
/// entries, and after a rerun removed entries and set them anew with other outputs (a
/// text kept from before would show the old output).
#[test]
fn stored_states_copy_entry_texts_and_match_a_fresh_serialization() {
    let fresh = |state: &InstanceState| {
        let mut fresh = state.clone();
        fresh.entry_texts = EntryTexts::default();
        serde_json::to_string(&fresh).unwrap()
    };
    let d = three_steps();
    let (mut state, mut t) = start(&d, 1, "i1", json!({"x": 1}), 0);
    let mut now = 1;
    for _ in 0..3 {
        let task = offered(&t).remove(0);
        t = complete(&mut state, &d, &task, now);
        now += 1;
        let expected = fresh(&state);
        assert_eq!(state.to_stored(), expected);
        assert_eq!(state.to_stored(), expected, "from the texts alone");
    }
    assert_eq!(state.entry_texts.0.len(), 3);
    assert_eq!(state.status, InstanceStatus::Completed);
    // The texts are what is copied: one changed behind the state's back shows.
    let mut probe = state.clone();
    let seven = serde_json::value::RawValue::from_string(r#"{"output":7}"#.into()).unwrap();
    probe.entry_texts.0.insert("a".into(), seven);
    assert!(probe.to_stored().contains(r#""a":{"output":7}"#));
    let rerun = Command::Rerun {
        by: "me".into(),
        from_step: "b".into(),
    };
    t = handle(&mut state, &d, rerun, now).unwrap();
    assert_eq!(state.to_stored(), fresh(&state));
    for _ in 0..2 {
        let task = offered(&t).remove(0);
        t = complete(&mut state, &d, &task, now);
        now += 1;
        assert_eq!(state.to_stored(), fresh(&state));
    }
    assert_eq!(
        state.context["steps"]["b"]["output"],
        json!({"done": "i1:b:2"})
    );
    let read = InstanceState::from_stored(&state.to_stored()).unwrap();
    assert_eq!(read, state);
    assert_eq!(serde_json::to_string(&read).unwrap(), fresh(&state));
}
