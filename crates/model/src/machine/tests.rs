//! State machine scenarios and properties, in virtual time (time is an argument).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::dsl::{Definition, Step, StepKind};
use crate::expr::Template;
use crate::retry::{Backoff, Jitter, RetryPolicy};

fn task_step(id: &str) -> Step {
    Step {
        id: id.into(),
        kind: StepKind::Task {
            queue: "q".into(),
            input: Template::Literal(json!({ "step": id })),
        },
        timeout: None,
        retry: None,
    }
}

fn three_steps() -> Definition {
    Definition {
        name: "d".into(),
        timeout: None,
        retry: Some(RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::Fixed,
            interval: Duration::from_secs(1),
            multiplier: 1.0,
            max_interval: None,
            jitter: Jitter::None,
            max_duration: None,
            non_retryable: vec!["fatal".into()],
        }),
        steps: vec![task_step("a"), task_step("b"), task_step("c")],
        output: None,
    }
}

fn offered(transition: &Transition) -> Vec<String> {
    transition
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::OfferTask(spec) => Some(spec.task_id.clone()),
            _ => None,
        })
        .collect()
}

fn timers(transition: &Transition) -> Vec<(TimerId, u64)> {
    transition
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::StartTimer { timer, fire_at } => Some((timer.clone(), *fire_at)),
            _ => None,
        })
        .collect()
}

fn types(transition: &Transition) -> Vec<&'static str> {
    transition.events.iter().map(EventKind::type_name).collect()
}

#[test]
fn a_happy_run_completes_every_step_in_order() {
    let definition = three_steps();
    let (mut state, transition) = start(&definition, 1, "i1", json!({"x": 1}), 0);
    assert_eq!(types(&transition), ["instance_started", "step_scheduled"]);
    assert_eq!(offered(&transition), ["i1:a:1"]);
    let t = handle(
        &mut state,
        &definition,
        Command::CompleteTask {
            task_id: "i1:a:1".into(),
            output: json!(1),
        },
        5,
    )
    .unwrap();
    assert_eq!(types(&t), ["step_completed", "step_scheduled"]);
    let t = handle(
        &mut state,
        &definition,
        Command::CompleteTask {
            task_id: "i1:b:1".into(),
            output: json!(2),
        },
        6,
    )
    .unwrap();
    assert_eq!(offered(&t), ["i1:c:1"]);
    let t = handle(
        &mut state,
        &definition,
        Command::CompleteTask {
            task_id: "i1:c:1".into(),
            output: json!(3),
        },
        7,
    )
    .unwrap();
    assert_eq!(types(&t), ["step_completed", "instance_completed"]);
    assert_eq!(state.status, InstanceStatus::Completed);
    assert_eq!(state.output, Some(json!(3)));
    assert_eq!(state.context["steps"]["a"]["output"], json!(1));
}

#[test]
fn retries_wait_for_their_timer_then_offer_a_new_attempt() {
    let definition = three_steps();
    let (mut state, _) = start(&definition, 1, "i1", json!({}), 0);
    let error = ErrorInfo {
        error_type: "flaky".into(),
        message: "m".into(),
    };
    let t = handle(
        &mut state,
        &definition,
        Command::FailTask {
            task_id: "i1:a:1".into(),
            error: error.clone(),
            retryable: true,
        },
        10,
    )
    .unwrap();
    assert_eq!(types(&t), ["step_failed", "step_retry_scheduled"]);
    assert_eq!(
        timers(&t),
        [(
            TimerId::Retry {
                step: 0,
                attempt: 2
            },
            1010
        )]
    );
    // The failed attempt's task is no longer current.
    let before = state.clone();
    let late = handle(
        &mut state,
        &definition,
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
        &definition,
        Command::FireTimer {
            timer: TimerId::Retry {
                step: 0,
                attempt: 2,
            },
        },
        1010,
    )
    .unwrap();
    assert_eq!(offered(&t), ["i1:a:2"]);
    // A non-retryable error type ends the instance at once.
    let fatal = ErrorInfo {
        error_type: "fatal".into(),
        message: "no".into(),
    };
    let t = handle(
        &mut state,
        &definition,
        Command::FailTask {
            task_id: "i1:a:2".into(),
            error: fatal,
            retryable: true,
        },
        1020,
    )
    .unwrap();
    assert_eq!(types(&t), ["step_failed", "instance_failed"]);
    assert_eq!(state.status, InstanceStatus::Failed);
    assert_eq!(state.error.as_ref().unwrap().error_type, "fatal");
}

#[test]
fn attempt_timeouts_and_sleeps_run_on_virtual_time() {
    let mut definition = three_steps();
    definition.steps[0].timeout = Some(Duration::from_secs(30));
    definition.steps[1] = Step {
        id: "nap".into(),
        kind: StepKind::Sleep {
            duration: Duration::from_secs(60),
        },
        timeout: None,
        retry: None,
    };
    let (mut state, t) = start(&definition, 1, "i1", json!({}), 0);
    assert_eq!(
        timers(&t),
        [(
            TimerId::AttemptTimeout {
                step: 0,
                attempt: 1
            },
            30_000
        )]
    );
    let t = handle(
        &mut state,
        &definition,
        Command::FireTimer {
            timer: TimerId::AttemptTimeout {
                step: 0,
                attempt: 1,
            },
        },
        30_000,
    )
    .unwrap();
    assert_eq!(types(&t), ["step_failed", "step_retry_scheduled"]);
    let t = handle(
        &mut state,
        &definition,
        Command::FireTimer {
            timer: TimerId::Retry {
                step: 0,
                attempt: 2,
            },
        },
        31_000,
    )
    .unwrap();
    assert_eq!(offered(&t), ["i1:a:2"]);
    let t = handle(
        &mut state,
        &definition,
        Command::CompleteTask {
            task_id: "i1:a:2".into(),
            output: json!(1),
        },
        32_000,
    )
    .unwrap();
    assert!(t.effects.contains(&Effect::CancelTimer {
        timer: TimerId::AttemptTimeout {
            step: 0,
            attempt: 2
        }
    }));
    assert_eq!(timers(&t), [(TimerId::Sleep { step: 1 }, 92_000)]);
    // The first attempt's timeout timer firing late changes nothing.
    let stale = handle(
        &mut state,
        &definition,
        Command::FireTimer {
            timer: TimerId::AttemptTimeout {
                step: 0,
                attempt: 1,
            },
        },
        92_000,
    );
    assert_eq!(stale, Err(Rejection::NotCurrent));
    let t = handle(
        &mut state,
        &definition,
        Command::FireTimer {
            timer: TimerId::Sleep { step: 1 },
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
fn cancel_withdraws_the_current_task_and_ends_the_instance() {
    let definition = three_steps();
    let (mut state, _) = start(&definition, 1, "i1", json!({}), 0);
    let t = handle(
        &mut state,
        &definition,
        Command::Cancel { by: "me".into() },
        1,
    )
    .unwrap();
    assert_eq!(
        t.effects,
        [Effect::WithdrawTask {
            task_id: "i1:a:1".into()
        }]
    );
    assert_eq!(types(&t), ["instance_cancelled"]);
    let again = handle(
        &mut state,
        &definition,
        Command::Cancel { by: "me".into() },
        2,
    );
    assert_eq!(again, Err(Rejection::InstanceEnded("cancelled")));
}

#[test]
fn task_ids_round_trip() {
    assert_eq!(
        parse_task_id(&task_id("a.b-c", "s_1", 7)),
        Some(("a.b-c", "s_1", 7))
    );
    assert_eq!(parse_task_id("nope"), None);
    assert_eq!(parse_task_id(":s:1"), None);
    for timer in [
        TimerId::Sleep { step: 3 },
        TimerId::Retry {
            step: 1,
            attempt: 2,
        },
        TimerId::AttemptTimeout {
            step: 0,
            attempt: 9,
        },
        TimerId::InstanceTimeout,
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

    /// Goal: no transition applies twice and refused commands change nothing.
    /// Method: drive one instance with arbitrary interleavings of current, stale and
    /// duplicate completions, failures, timer firings and cancels; check the history.
    #[test]
    fn no_transition_applies_twice(ops in prop::collection::vec(op(), 1..80)) {
        let mut definition = three_steps();
        definition.steps[1].timeout = Some(Duration::from_millis(1500));
        let (mut state, first) = start(&definition, 1, "i", json!({}), 0);
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
                let before = state.clone();
                match handle(&mut state, &definition, command, now) {
                    Ok(t) => {
                        prop_assert!(!t.events.is_empty(), "an accepted command records what it did");
                        track(&t, &mut tasks, &mut armed);
                        events.extend(t.events);
                    }
                    Err(_) => prop_assert_eq!(&state, &before, "a refused command changed the state"),
                }
            }
        }
        // Each step completes at most once, in definition order.
        let completed: Vec<&str> = events.iter().filter_map(|e| match e {
            EventKind::StepCompleted { step_id, .. } => Some(step_id.as_str()),
            _ => None,
        }).collect();
        let order: Vec<&str> = definition.steps.iter().map(|s| s.id.as_str()).take(completed.len()).collect();
        prop_assert_eq!(&completed, &order);
        // At most one terminal event, and nothing after it.
        let terminal: Vec<usize> = events.iter().enumerate().filter(|(_, e)| matches!(e,
            EventKind::InstanceCompleted { .. } | EventKind::InstanceFailed { .. } | EventKind::InstanceCancelled { .. })).map(|(i, _)| i).collect();
        prop_assert!(terminal.len() <= 1);
        if let Some(&last) = terminal.first() {
            prop_assert_eq!(last, events.len() - 1);
            prop_assert!(state.status.is_terminal());
        }
        prop_assert_eq!(state.status == InstanceStatus::Completed, completed.len() == 3);
        // No step ran more attempts than its policy allows.
        let mut attempts: HashMap<&str, u32> = HashMap::new();
        for e in &events {
            if let EventKind::StepScheduled { step_id, attempt, .. } = e {
                let seen = attempts.entry(step_id.as_str()).or_default();
                prop_assert_eq!(*attempt, *seen + 1, "attempts are scheduled in order, once each");
                *seen = *attempt;
                prop_assert!(*attempt <= 3);
            }
        }
        let _ = Value::Null;
    }
}
