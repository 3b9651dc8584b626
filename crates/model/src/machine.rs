//! The instance state machine.
//!
//! Given an instance's state, its definition, a command and the current time, it
//! returns the events to append and the effects to perform once those events are
//! durable. It never performs an effect itself and never reads a clock, so every
//! transition can be replayed and tested in virtual time.
//!
//! The central guarantee is that a state transition is applied at most once: a
//! command about an attempt that is no longer current (a duplicate completion, a
//! late completion after a retry, a stale timer) is rejected and changes nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::dsl::{Definition, Step, StepKind};
use crate::event::{ErrorInfo, EventKind};
use crate::expr::EvalError;
use crate::retry::RetryPolicy;

/// Error type of a step attempt or instance that ran out of time.
pub const ERROR_TYPE_TIMEOUT: &str = "timeout";
/// Error type of an expression that failed at run time.
pub const ERROR_TYPE_EXPRESSION: &str = "expression_error";

/// Lifecycle of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Steps are running or waiting.
    Running,
    /// Every step completed.
    Completed,
    /// A step failed beyond its retries, or the instance timed out.
    Failed,
    /// Cancelled on request.
    Cancelled,
}

impl InstanceStatus {
    /// The status name used in the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Running => "running",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a status name.
    pub fn parse(text: &str) -> Option<InstanceStatus> {
        Some(match text {
            "running" => InstanceStatus::Running,
            "completed" => InstanceStatus::Completed,
            "failed" => InstanceStatus::Failed,
            "cancelled" => InstanceStatus::Cancelled,
            _ => return None,
        })
    }

    /// Whether the instance has ended for good.
    pub fn is_terminal(self) -> bool {
        !matches!(self, InstanceStatus::Running)
    }
}

/// What the current step is waiting for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "on", rename_all = "snake_case")]
pub enum Wait {
    /// Nothing (the instance has ended).
    Nothing,
    /// A worker to complete or fail the task.
    Task {
        /// The task's id.
        task_id: String,
    },
    /// The engine to report an HTTP call's result.
    Http,
    /// A `sleep` step's timer.
    Sleep,
    /// The timer before the next attempt.
    Retry,
}

/// The durable state of one instance.
///
/// Stored as a snapshot beside the event log; the format is versioned with the
/// event format (`crate::event::EVENT_FORMAT_VERSION`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceState {
    /// Instance id.
    pub id: String,
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
    /// Lifecycle status.
    pub status: InstanceStatus,
    /// What expressions see: `{"input", "steps": {id: {"output"}}, "vars"}`.
    pub context: Value,
    /// Index of the current step; equals the step count once all completed.
    pub cursor: usize,
    /// Current attempt of the current step (1-based).
    pub attempt: u32,
    /// When the first attempt of the current step started (ms since the epoch).
    pub step_started_at: u64,
    /// What the current step waits for.
    pub wait: Wait,
    /// The instance's output once completed.
    pub output: Option<Value>,
    /// Why the instance failed.
    pub error: Option<ErrorInfo>,
    /// When the instance started (ms since the epoch).
    pub created_at: u64,
    /// When the state last changed (ms since the epoch).
    pub updated_at: u64,
}

/// An input to the state machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// A worker completed a task.
    CompleteTask {
        /// The task.
        task_id: String,
        /// Its output.
        output: Value,
    },
    /// A worker failed a task.
    FailTask {
        /// The task.
        task_id: String,
        /// Why.
        error: ErrorInfo,
        /// Whether the worker thinks a retry may succeed.
        retryable: bool,
    },
    /// The engine finished an HTTP step's call.
    HttpResult {
        /// The step.
        step_id: String,
        /// The attempt the call was made for.
        attempt: u32,
        /// The response (`{"status","headers","body"}`) or why the call failed.
        result: Result<Value, HttpFailure>,
    },
    /// A durable timer fired.
    FireTimer {
        /// The timer.
        timer: TimerId,
    },
    /// Someone asked to cancel the instance.
    Cancel {
        /// Who asked.
        by: String,
    },
}

/// Why an HTTP step's call failed.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpFailure {
    /// The error.
    pub error: ErrorInfo,
    /// Whether a retry may succeed (network errors, 5xx, 429).
    pub retryable: bool,
}

/// Identifies a durable timer of an instance; at most one of each exists at a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TimerId {
    /// A `sleep` step's wait.
    Sleep {
        /// Step index.
        step: usize,
    },
    /// The delay before attempt `attempt` of a step.
    Retry {
        /// Step index.
        step: usize,
        /// The attempt that will run.
        attempt: u32,
    },
    /// The per-attempt timeout of a step.
    AttemptTimeout {
        /// Step index.
        step: usize,
        /// The attempt it bounds.
        attempt: u32,
    },
    /// The whole instance's timeout.
    InstanceTimeout,
}

impl TimerId {
    /// A stable textual key, unique within the instance.
    pub fn key(&self) -> String {
        match self {
            TimerId::Sleep { step } => format!("sleep:{step}"),
            TimerId::Retry { step, attempt } => format!("retry:{step}:{attempt}"),
            TimerId::AttemptTimeout { step, attempt } => format!("attempt:{step}:{attempt}"),
            TimerId::InstanceTimeout => "instance".to_string(),
        }
    }

    /// Parses `key()`'s output.
    pub fn parse(key: &str) -> Option<TimerId> {
        let mut parts = key.split(':');
        let kind = parts.next()?;
        let mut number = || parts.next().and_then(|p| p.parse::<u64>().ok());
        let timer = match kind {
            "sleep" => TimerId::Sleep {
                step: number()? as usize,
            },
            "retry" => TimerId::Retry {
                step: number()? as usize,
                attempt: number()? as u32,
            },
            "attempt" => TimerId::AttemptTimeout {
                step: number()? as usize,
                attempt: number()? as u32,
            },
            "instance" => TimerId::InstanceTimeout,
            _ => return None,
        };
        Some(timer)
    }
}

/// Something to do once the transition's events are durable.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Offer a task to workers (and store it, so it survives a crash).
    OfferTask(TaskSpec),
    /// Withdraw a task: it is no longer wanted.
    WithdrawTask {
        /// The task.
        task_id: String,
    },
    /// Make an HTTP call and report it back with `Command::HttpResult`.
    CallHttp(HttpRequest),
    /// Arm a durable timer (and store it).
    StartTimer {
        /// Which timer.
        timer: TimerId,
        /// When (ms since the epoch).
        fire_at: u64,
    },
    /// Disarm a durable timer.
    CancelTimer {
        /// Which timer.
        timer: TimerId,
    },
}

/// A task to offer to workers.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// Unique per attempt: `{instance}:{step}:{attempt}`.
    pub task_id: String,
    /// The queue.
    pub queue: String,
    /// The step's id.
    pub step_id: String,
    /// 1-based attempt.
    pub attempt: u32,
    /// The evaluated input.
    pub input: Value,
    /// Stable across attempts of the step, for workers to deduplicate side effects.
    pub idempotency_key: String,
}

/// An HTTP call to make for a step.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequest {
    /// The step.
    pub step_id: String,
    /// 1-based attempt.
    pub attempt: u32,
    /// Method.
    pub method: String,
    /// URL.
    pub url: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// JSON body.
    pub body: Option<Value>,
    /// Bound on the call.
    pub timeout: Option<Duration>,
}

/// What a command changed: events to append, effects to perform after the commit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transition {
    /// Events, in order.
    pub events: Vec<EventKind>,
    /// Effects, in order.
    pub effects: Vec<Effect>,
}

impl Transition {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.effects.is_empty()
    }
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The instance has ended.
    #[error("instance has already ended ({0})")]
    InstanceEnded(&'static str),
    /// The command is about an attempt, task or timer that is not current.
    #[error("not the current attempt of a running step")]
    NotCurrent,
    /// The task id is malformed or not of this instance.
    #[error("unknown task")]
    UnknownTask,
}

/// Builds the task id of an attempt.
pub fn task_id(instance_id: &str, step_id: &str, attempt: u32) -> String {
    format!("{instance_id}:{step_id}:{attempt}")
}

/// Splits a task id into instance id, step id and attempt.
///
/// Instance and step ids never contain `:`, so the split is unambiguous.
pub fn parse_task_id(task_id: &str) -> Option<(&str, &str, u32)> {
    let mut parts = task_id.rsplitn(3, ':');
    let attempt = parts.next()?.parse().ok()?;
    let step_id = parts.next()?;
    let instance_id = parts.next()?;
    if instance_id.is_empty() || step_id.is_empty() {
        return None;
    }
    Some((instance_id, step_id, attempt))
}

/// Starts an instance: its first state and the transition that schedules its first step.
pub fn start(
    definition: &Definition,
    version: u32,
    id: &str,
    input: Value,
    now: u64,
) -> (InstanceState, Transition) {
    assert!(
        !definition.steps.is_empty(),
        "a validated definition has steps"
    );
    let mut state = InstanceState {
        id: id.to_string(),
        definition: definition.name.clone(),
        version,
        status: InstanceStatus::Running,
        context: json!({ "input": input.clone(), "steps": {}, "vars": {} }),
        cursor: 0,
        attempt: 1,
        step_started_at: now,
        wait: Wait::Nothing,
        output: None,
        error: None,
        created_at: now,
        updated_at: now,
    };
    let mut transition = Transition::default();
    transition.events.push(EventKind::InstanceStarted {
        definition: definition.name.clone(),
        version,
        input,
    });
    if let Some(timeout) = definition.timeout {
        transition.effects.push(Effect::StartTimer {
            timer: TimerId::InstanceTimeout,
            fire_at: now.saturating_add(millis(timeout)),
        });
    }
    schedule_attempt(&mut state, definition, now, &mut transition);
    (state, transition)
}

/// Applies a command to a running instance.
///
/// On `Err` the state is unchanged.
pub fn handle(
    state: &mut InstanceState,
    definition: &Definition,
    command: Command,
    now: u64,
) -> Result<Transition, Rejection> {
    assert_eq!(state.definition, definition.name);
    if state.status.is_terminal() {
        return Err(Rejection::InstanceEnded(state.status.as_str()));
    }
    assert!(
        state.cursor < definition.steps.len(),
        "a running instance has a current step"
    );
    let mut transition = Transition::default();
    match command {
        Command::CompleteTask { task_id, output } => {
            let (attempt, step_id) = current_task(state, definition, &task_id)?;
            complete_step(
                state,
                definition,
                step_id,
                attempt,
                output,
                now,
                &mut transition,
            );
        }
        Command::FailTask {
            task_id,
            error,
            retryable,
        } => {
            let (attempt, step_id) = current_task(state, definition, &task_id)?;
            fail_attempt(
                state,
                definition,
                step_id,
                attempt,
                error,
                retryable,
                now,
                &mut transition,
            );
        }
        Command::HttpResult {
            step_id,
            attempt,
            result,
        } => {
            let step = &definition.steps[state.cursor];
            if state.wait != Wait::Http || step.id != step_id || state.attempt != attempt {
                return Err(Rejection::NotCurrent);
            }
            match result {
                Ok(output) => complete_step(
                    state,
                    definition,
                    step_id,
                    attempt,
                    output,
                    now,
                    &mut transition,
                ),
                Err(failure) => fail_attempt(
                    state,
                    definition,
                    step_id,
                    attempt,
                    failure.error,
                    failure.retryable,
                    now,
                    &mut transition,
                ),
            }
        }
        Command::FireTimer { timer } => match timer {
            TimerId::Sleep { step } => {
                if step != state.cursor || state.wait != Wait::Sleep {
                    return Err(Rejection::NotCurrent);
                }
                let step_id = definition.steps[step].id.clone();
                transition.events.push(EventKind::TimerFired {
                    step_id: step_id.clone(),
                });
                let attempt = state.attempt;
                complete_step(
                    state,
                    definition,
                    step_id,
                    attempt,
                    Value::Null,
                    now,
                    &mut transition,
                );
            }
            TimerId::Retry { step, attempt } => {
                if step != state.cursor || state.wait != Wait::Retry || attempt != state.attempt {
                    return Err(Rejection::NotCurrent);
                }
                schedule_attempt(state, definition, now, &mut transition);
            }
            TimerId::AttemptTimeout { step, attempt } => {
                let running = matches!(state.wait, Wait::Task { .. } | Wait::Http);
                if step != state.cursor || attempt != state.attempt || !running {
                    return Err(Rejection::NotCurrent);
                }
                let step_id = definition.steps[step].id.clone();
                let error = ErrorInfo {
                    error_type: ERROR_TYPE_TIMEOUT.to_string(),
                    message: format!("attempt {attempt} of step `{step_id}` timed out"),
                };
                fail_attempt(
                    state,
                    definition,
                    step_id,
                    attempt,
                    error,
                    true,
                    now,
                    &mut transition,
                );
            }
            TimerId::InstanceTimeout => {
                let error = ErrorInfo {
                    error_type: ERROR_TYPE_TIMEOUT.to_string(),
                    message: "instance timed out".to_string(),
                };
                end_current_step(state, definition, &mut transition);
                finish(state, InstanceStatus::Failed, &mut transition, now);
                state.error = Some(error.clone());
                transition.events.push(EventKind::InstanceFailed { error });
            }
        },
        Command::Cancel { by } => {
            end_current_step(state, definition, &mut transition);
            if definition.timeout.is_some() {
                transition.effects.push(Effect::CancelTimer {
                    timer: TimerId::InstanceTimeout,
                });
            }
            finish(state, InstanceStatus::Cancelled, &mut transition, now);
            transition.events.push(EventKind::InstanceCancelled { by });
        }
    }
    state.updated_at = now;
    Ok(transition)
}

/// Checks that `task_id` is the task of the current attempt; returns its attempt and step id.
fn current_task(
    state: &InstanceState,
    definition: &Definition,
    task_id: &str,
) -> Result<(u32, String), Rejection> {
    let Some((instance_id, step_id, attempt)) = parse_task_id(task_id) else {
        return Err(Rejection::UnknownTask);
    };
    if instance_id != state.id || definition.step_index(step_id).is_none() {
        return Err(Rejection::UnknownTask);
    }
    match &state.wait {
        Wait::Task { task_id: current } if current == task_id => {
            assert_eq!(attempt, state.attempt);
            Ok((attempt, step_id.to_string()))
        }
        _ => Err(Rejection::NotCurrent),
    }
}

/// Records a step's output and moves on to the next step or completes the instance.
fn complete_step(
    state: &mut InstanceState,
    definition: &Definition,
    step_id: String,
    attempt: u32,
    output: Value,
    now: u64,
    transition: &mut Transition,
) {
    assert_eq!(definition.steps[state.cursor].id, step_id);
    cancel_attempt_timeout(state, definition, transition);
    steps_mut(&mut state.context).insert(step_id.clone(), json!({ "output": output.clone() }));
    transition.events.push(EventKind::StepCompleted {
        step_id,
        attempt,
        output,
    });
    state.cursor += 1;
    state.attempt = 1;
    state.step_started_at = now;
    state.wait = Wait::Nothing;
    if state.cursor < definition.steps.len() {
        schedule_attempt(state, definition, now, transition);
        return;
    }
    let output = match &definition.output {
        None => state.context["steps"][&definition.steps[state.cursor - 1].id]["output"].clone(),
        Some(template) => match template.eval(&state.context) {
            Ok(value) => value,
            Err(err) => {
                let error = ErrorInfo {
                    error_type: ERROR_TYPE_EXPRESSION.to_string(),
                    message: format!("instance output: {err}"),
                };
                cancel_instance_timeout(definition, transition);
                finish(state, InstanceStatus::Failed, transition, now);
                state.error = Some(error.clone());
                transition.events.push(EventKind::InstanceFailed { error });
                return;
            }
        },
    };
    cancel_instance_timeout(definition, transition);
    finish(state, InstanceStatus::Completed, transition, now);
    state.output = Some(output.clone());
    transition
        .events
        .push(EventKind::InstanceCompleted { output });
}

/// Handles the failure of the current attempt: retry after a delay, or fail the instance.
#[allow(clippy::too_many_arguments)] // One call per failure source; a struct would only rename them.
fn fail_attempt(
    state: &mut InstanceState,
    definition: &Definition,
    step_id: String,
    attempt: u32,
    error: ErrorInfo,
    retryable: bool,
    now: u64,
    transition: &mut Transition,
) {
    assert_eq!(definition.steps[state.cursor].id, step_id);
    assert_eq!(state.attempt, attempt);
    cancel_attempt_timeout(state, definition, transition);
    transition.events.push(EventKind::StepFailed {
        step_id: step_id.clone(),
        attempt,
        error: error.clone(),
        retryable,
    });
    let step = &definition.steps[state.cursor];
    let default_policy = RetryPolicy::default();
    let policy = step
        .retry
        .as_ref()
        .or(definition.retry.as_ref())
        .unwrap_or(&default_policy);
    let delay = policy.delay(attempt, jitter_sample(&state.id, &step_id, attempt));
    let elapsed = Duration::from_millis(now.saturating_sub(state.step_started_at));
    if policy.should_retry(attempt, &error.error_type, retryable, elapsed, delay) {
        let fire_at = now.saturating_add(millis(delay));
        state.attempt = attempt + 1;
        state.wait = Wait::Retry;
        transition.events.push(EventKind::StepRetryScheduled {
            step_id,
            next_attempt: attempt + 1,
            fire_at,
        });
        transition.effects.push(Effect::StartTimer {
            timer: TimerId::Retry {
                step: state.cursor,
                attempt: attempt + 1,
            },
            fire_at,
        });
        return;
    }
    cancel_instance_timeout(definition, transition);
    finish(state, InstanceStatus::Failed, transition, now);
    let error = ErrorInfo {
        error_type: error.error_type,
        message: format!("step `{step_id}` failed: {}", error.message),
    };
    state.error = Some(error.clone());
    transition.events.push(EventKind::InstanceFailed { error });
}

/// Schedules attempt `state.attempt` of the current step.
fn schedule_attempt(
    state: &mut InstanceState,
    definition: &Definition,
    now: u64,
    transition: &mut Transition,
) {
    let step = &definition.steps[state.cursor];
    let attempt = state.attempt;
    let timeout_timer = step.timeout.map(|timeout| Effect::StartTimer {
        timer: TimerId::AttemptTimeout {
            step: state.cursor,
            attempt,
        },
        fire_at: now.saturating_add(millis(timeout)),
    });
    match &step.kind {
        StepKind::Task { queue, input } => {
            let input = match input.eval(&state.context) {
                Ok(value) => value,
                Err(err) => {
                    return expression_failed(state, definition, &err.message, now, transition)
                }
            };
            let task_id = task_id(&state.id, &step.id, attempt);
            transition.events.push(EventKind::StepScheduled {
                step_id: step.id.clone(),
                attempt,
                input: Some(input.clone()),
            });
            transition.effects.push(Effect::OfferTask(TaskSpec {
                task_id: task_id.clone(),
                queue: queue.clone(),
                step_id: step.id.clone(),
                attempt,
                input,
                idempotency_key: format!("{}:{}", state.id, step.id),
            }));
            transition.effects.extend(timeout_timer);
            state.wait = Wait::Task { task_id };
        }
        StepKind::Http { .. } => {
            let request = match http_request(step, attempt, &state.context) {
                Ok(request) => request,
                Err(err) => {
                    return expression_failed(state, definition, &err.message, now, transition)
                }
            };
            transition.events.push(EventKind::StepScheduled {
                step_id: step.id.clone(),
                attempt,
                input: Some(
                    json!({ "method": request.method, "url": request.url, "body": request.body }),
                ),
            });
            transition.effects.push(Effect::CallHttp(request));
            transition.effects.extend(timeout_timer);
            state.wait = Wait::Http;
        }
        StepKind::Sleep { duration } => {
            let fire_at = now.saturating_add(millis(*duration));
            transition.events.push(EventKind::StepScheduled {
                step_id: step.id.clone(),
                attempt,
                input: None,
            });
            transition.events.push(EventKind::TimerStarted {
                step_id: step.id.clone(),
                fire_at,
            });
            transition.effects.push(Effect::StartTimer {
                timer: TimerId::Sleep { step: state.cursor },
                fire_at,
            });
            state.wait = Wait::Sleep;
        }
    }
}

/// Evaluates an HTTP step's request for `attempt` against `context`.
fn http_request(step: &Step, attempt: u32, context: &Value) -> Result<HttpRequest, EvalError> {
    let StepKind::Http {
        method,
        url,
        headers,
        body,
    } = &step.kind
    else {
        unreachable!("only HTTP steps have requests")
    };
    let text = |value: Value| match value {
        Value::String(text) => text,
        other => other.to_string(),
    };
    let mut evaluated = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        evaluated.push((name.clone(), text(value.eval(context)?)));
    }
    Ok(HttpRequest {
        step_id: step.id.clone(),
        attempt,
        method: method.clone(),
        url: text(url.eval(context)?),
        headers: evaluated,
        body: body.as_ref().map(|b| b.eval(context)).transpose()?,
        timeout: step.timeout,
    })
}

/// Effects a running instance needs again after its partition is loaded from the
/// store: those not kept in the store's task and timer tables (HTTP calls in flight).
pub fn resume_effects(state: &InstanceState, definition: &Definition) -> Vec<Effect> {
    if state.status.is_terminal() || state.wait != Wait::Http {
        return Vec::new();
    }
    match http_request(
        &definition.steps[state.cursor],
        state.attempt,
        &state.context,
    ) {
        Ok(request) => vec![Effect::CallHttp(request)],
        // It evaluated when the attempt was scheduled and the context has not changed since.
        Err(err) => unreachable!("an HTTP request that evaluated once fails now: {err}"),
    }
}

/// An input expression failed: that is a bug in the definition, not worth retrying.
fn expression_failed(
    state: &mut InstanceState,
    definition: &Definition,
    message: &str,
    now: u64,
    transition: &mut Transition,
) {
    let step_id = definition.steps[state.cursor].id.clone();
    let error = ErrorInfo {
        error_type: ERROR_TYPE_EXPRESSION.to_string(),
        message: format!("step `{step_id}`: {message}"),
    };
    transition.events.push(EventKind::StepFailed {
        step_id,
        attempt: state.attempt,
        error: error.clone(),
        retryable: false,
    });
    cancel_instance_timeout(definition, transition);
    finish(state, InstanceStatus::Failed, transition, now);
    state.error = Some(error.clone());
    transition.events.push(EventKind::InstanceFailed { error });
}

/// Withdraws whatever the current step is waiting on.
fn end_current_step(state: &InstanceState, definition: &Definition, transition: &mut Transition) {
    let step = state.cursor;
    match &state.wait {
        Wait::Task { task_id } => {
            transition.effects.push(Effect::WithdrawTask {
                task_id: task_id.clone(),
            });
            cancel_attempt_timeout(state, definition, transition);
        }
        Wait::Http => cancel_attempt_timeout(state, definition, transition),
        Wait::Sleep => transition.effects.push(Effect::CancelTimer {
            timer: TimerId::Sleep { step },
        }),
        Wait::Retry => transition.effects.push(Effect::CancelTimer {
            timer: TimerId::Retry {
                step,
                attempt: state.attempt,
            },
        }),
        Wait::Nothing => {}
    }
}

fn cancel_attempt_timeout(
    state: &InstanceState,
    definition: &Definition,
    transition: &mut Transition,
) {
    if definition.steps[state.cursor].timeout.is_some() {
        transition.effects.push(Effect::CancelTimer {
            timer: TimerId::AttemptTimeout {
                step: state.cursor,
                attempt: state.attempt,
            },
        });
    }
}

fn cancel_instance_timeout(definition: &Definition, transition: &mut Transition) {
    if definition.timeout.is_some() {
        transition.effects.push(Effect::CancelTimer {
            timer: TimerId::InstanceTimeout,
        });
    }
}

fn finish(
    state: &mut InstanceState,
    status: InstanceStatus,
    _transition: &mut Transition,
    now: u64,
) {
    assert!(!state.status.is_terminal(), "an instance ends once");
    assert!(status.is_terminal());
    state.status = status;
    state.wait = Wait::Nothing;
    state.updated_at = now;
}

fn steps_mut(context: &mut Value) -> &mut Map<String, Value> {
    match context.get_mut("steps") {
        Some(Value::Object(steps)) => steps,
        _ => unreachable!("the context always has a `steps` object"),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A deterministic 64-bit sample for jitter, so that replaying gives the same delays.
fn jitter_sample(instance_id: &str, step_id: &str, attempt: u32) -> u64 {
    // FNV-1a over the identifying parts, then a splitmix64 finaliser to spread the bits.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in instance_id
        .bytes()
        .chain([0])
        .chain(step_id.bytes())
        .chain([0])
        .chain(attempt.to_le_bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests;
