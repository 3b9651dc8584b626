//! The instance state machine.
//!
//! Given an instance's state, its definition, a command and the current time, it
//! returns the events to append and the effects to perform once those events are
//! durable. It never performs an effect itself and never reads a clock, so every
//! transition can be replayed and tested in virtual time.
//!
//! The central guarantee is that a state transition is applied at most once: a
//! command about an attempt that is no longer current (a duplicate completion, a
//! late completion after a retry or a timeout, a stale timer) is rejected and
//! changes nothing.
//!
//! An instance runs its main steps in order. A step that fails beyond its retries
//! may be caught by a handler (whose steps run instead), or fails the instance.
//! A failing or cancelled instance compensates: the `compensate` steps of the main
//! steps that completed run one at a time, in exactly the reverse order of completion.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::dsl::{
    CatchThen, Definition, EscalationAction, Join, OnFailure, Step, StepKind, HUMAN_QUEUE,
};
use crate::event::{ErrorInfo, EventKind};
use crate::expr::EvalError;
use crate::retry::RetryPolicy;

/// Error type of a step attempt, step or instance that ran out of time.
pub const ERROR_TYPE_TIMEOUT: &str = "timeout";
/// Error type of an expression that failed at run time.
pub const ERROR_TYPE_EXPRESSION: &str = "expression_error";
/// Signals kept per name while no `wait` step takes them.
pub const SIGNALS_BUFFERED_MAX: usize = 1000;

/// Lifecycle of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Steps are running or waiting.
    Running,
    /// No new attempt starts until resumed.
    Paused,
    /// Every step completed.
    Completed,
    /// A step failed beyond its retries and was not caught (or a compensation failed).
    Failed,
    /// Undoing completed steps after a failure or a cancel.
    Compensating,
    /// Failed, and every completed step was compensated.
    Compensated,
    /// Cancelled on request (after compensating).
    Cancelled,
    /// Ended at once on request, without compensation.
    Terminated,
}

impl InstanceStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [InstanceStatus; 8] = [
        InstanceStatus::Running,
        InstanceStatus::Paused,
        InstanceStatus::Completed,
        InstanceStatus::Failed,
        InstanceStatus::Compensating,
        InstanceStatus::Compensated,
        InstanceStatus::Cancelled,
        InstanceStatus::Terminated,
    ];

    /// The status name used in the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Running => "running",
            InstanceStatus::Paused => "paused",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Compensating => "compensating",
            InstanceStatus::Compensated => "compensated",
            InstanceStatus::Cancelled => "cancelled",
            InstanceStatus::Terminated => "terminated",
        }
    }

    /// Parses a status name.
    pub fn parse(text: &str) -> Option<InstanceStatus> {
        InstanceStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether the instance has ended (it may still be retried or rerun on request).
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            InstanceStatus::Running | InstanceStatus::Paused | InstanceStatus::Compensating
        )
    }
}

/// Which step of a definition runs: a main step, its compensation, or a step of one of
/// its catch handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum StepRef {
    /// `steps[index]`.
    Main {
        /// Index in the definition's steps.
        index: usize,
    },
    /// `steps[index].compensate`.
    Undo {
        /// Index of the step it compensates.
        index: usize,
    },
    /// A step of the branch a `switch` took: `cases[case].steps[step]`, or
    /// `default[step]` when `case` is the number of cases.
    Branch {
        /// Index of the switch step.
        index: usize,
        /// Which case.
        case: usize,
        /// Which of its steps.
        step: usize,
    },
    /// A step of a lane of a `parallel` (its branch `lane`) or `foreach` (its item `lane`).
    Lane {
        /// Index of the fan-out step.
        index: usize,
        /// Which branch or item.
        lane: usize,
        /// Which of the lane's steps.
        step: usize,
    },
    /// `steps[index].catch[handler].steps[step]`.
    Handler {
        /// Index of the step whose failure was caught.
        index: usize,
        /// Which handler.
        handler: usize,
        /// Which of its steps.
        step: usize,
    },
}

impl StepRef {
    /// The step this refers to.
    pub fn resolve(self, definition: &Definition) -> &Step {
        match self {
            StepRef::Main { index } => &definition.steps[index],
            StepRef::Undo { index } => definition.steps[index]
                .compensate
                .as_deref()
                .expect("undo refs point at steps with a compensation"),
            StepRef::Handler {
                index,
                handler,
                step,
            } => &definition.steps[index].catch[handler].steps[step],
            StepRef::Lane { index, lane, step } => &lane_steps(definition, index, lane)[step],
            StepRef::Branch { index, case, step } => match &definition.steps[index].kind {
                StepKind::Switch { cases, default } => match cases.get(case) {
                    Some(taken) => &taken.steps[step],
                    None => &default[step],
                },
                _ => unreachable!("branch refs point into switch steps"),
            },
        }
    }

    /// The id shown in histories and task ids: `reserve`, `reserve~undo`, `charge~catch0.1`.
    /// `~` never appears in a declared id, so these never clash.
    pub fn step_id(self, definition: &Definition) -> String {
        match self {
            StepRef::Main { index } => definition.steps[index].id.clone(),
            StepRef::Undo { index } => format!("{}~undo", definition.steps[index].id),
            StepRef::Handler {
                index,
                handler,
                step,
            } => format!("{}~catch{handler}.{step}", definition.steps[index].id),
            StepRef::Branch { index, case, step } => {
                format!("{}~case{case}.{step}", definition.steps[index].id)
            }
            StepRef::Lane { index, lane, step } => {
                format!("{}~lane{lane}.{step}", definition.steps[index].id)
            }
        }
    }

    /// A compact key, unique within the instance, for timers.
    fn key(self) -> String {
        match self {
            StepRef::Main { index } => format!("{index}"),
            StepRef::Undo { index } => format!("{index}u"),
            StepRef::Handler {
                index,
                handler,
                step,
            } => format!("{index}h{handler}.{step}"),
            StepRef::Branch { index, case, step } => format!("{index}c{case}.{step}"),
            StepRef::Lane { index, lane, step } => format!("{index}l{lane}.{step}"),
        }
    }

    fn parse_key(key: &str) -> Option<StepRef> {
        if let Some(index) = key.strip_suffix('u') {
            return Some(StepRef::Undo {
                index: index.parse().ok()?,
            });
        }
        if let Some((index, rest)) = key.split_once('l') {
            let (lane, step) = rest.split_once('.')?;
            return Some(StepRef::Lane {
                index: index.parse().ok()?,
                lane: lane.parse().ok()?,
                step: step.parse().ok()?,
            });
        }
        if let Some((index, rest)) = key.split_once('c') {
            let (case, step) = rest.split_once('.')?;
            return Some(StepRef::Branch {
                index: index.parse().ok()?,
                case: case.parse().ok()?,
                step: step.parse().ok()?,
            });
        }
        if let Some((index, rest)) = key.split_once('h') {
            let (handler, step) = rest.split_once('.')?;
            return Some(StepRef::Handler {
                index: index.parse().ok()?,
                handler: handler.parse().ok()?,
                step: step.parse().ok()?,
            });
        }
        Some(StepRef::Main {
            index: key.parse().ok()?,
        })
    }
}

/// What the current step is waiting for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "on", rename_all = "snake_case")]
pub enum Wait {
    /// Nothing (the instance has ended, or is between steps).
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
    /// A named signal.
    Signal {
        /// Its name.
        name: String,
    },
    /// The instance is paused; the current attempt starts when it is resumed.
    Paused,
    /// The lanes of a fan-out step (`parallel`, `foreach`).
    Lanes,
    /// A child instance to end.
    Child {
        /// The child's id.
        child_id: String,
    },
}

/// The fields of the step running in one lane of work. The main lane's are the
/// instance's own (`current`, `attempt`, ...); a fan-out's lanes keep theirs here and are
/// swapped in while a command for them is applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lane {
    /// The step running.
    pub current: Option<StepRef>,
    /// Its attempt.
    pub attempt: u32,
    /// The attempt its run started at.
    pub attempt_first: u32,
    /// When its run started.
    pub step_started_at: u64,
    /// What it waits for.
    pub wait: Wait,
}

/// A running `parallel` or `foreach` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanOut {
    /// The fan-out step's index.
    pub index: usize,
    /// Lanes running, by lane number.
    pub lanes: BTreeMap<usize, Lane>,
    /// Outputs of the lanes that completed.
    pub outputs: BTreeMap<usize, Value>,
    /// Errors of the lanes that failed.
    pub failures: BTreeMap<usize, ErrorInfo>,
    /// The next lane to start.
    pub next: usize,
    /// Lanes in all.
    pub total: usize,
    /// A `foreach`'s items (`.item` of lane `n` is `items[n]`).
    pub items: Vec<Value>,
}

/// Why the instance compensates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum CompensationReason {
    /// A failure; the instance ends `compensated` with this error.
    Failed {
        /// The error.
        error: ErrorInfo,
    },
    /// A cancel; the instance ends `cancelled`.
    Cancelled {
        /// Who asked.
        by: String,
    },
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
    /// What expressions see: `{"input", "steps": {id: {"output"}}, "vars"}`. Its step
    /// entries change only through `set_step_entry` and `remove_step_entry`, which keep
    /// [`InstanceState::entry_texts`] true.
    #[serde(serialize_with = "serialize_context")]
    pub context: Value,
    /// The next main step to run once the current one (or its handler) is done.
    pub cursor: usize,
    /// The step running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<StepRef>,
    /// Current attempt number of the current step; grows across retries and reruns so
    /// that every attempt's task id is unique.
    pub attempt: u32,
    /// The attempt number this run of the current step started at.
    pub attempt_first: u32,
    /// Highest attempt number issued per step (by step key).
    pub attempts: BTreeMap<String, u32>,
    /// When the current step's first attempt started (ms since the epoch).
    pub step_started_at: u64,
    /// What the current step waits for.
    pub wait: Wait,
    /// Main steps completed, in completion order.
    pub completed: Vec<usize>,
    /// Compensations still to run; the last runs next.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compensating: Vec<usize>,
    /// Why the instance compensates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_reason: Option<CompensationReason>,
    /// The error a catch handler is handling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caught: Option<ErrorInfo>,
    /// The status to return to on resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_from: Option<InstanceStatus>,
    /// The step that failed the instance (what a retry resumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<StepRef>,
    /// Signals received and not yet taken by a `wait` step, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub signals: BTreeMap<String, VecDeque<Value>>,
    /// The instance this one restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_from: Option<String>,
    /// The running fan-out step's lanes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fanout: Option<FanOut>,
    /// The instance this one is a child of (told when this one ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// How the lane being applied ended, if it did; only set inside one command.
    #[serde(skip)]
    pub lane_result: Option<Result<Value, ErrorInfo>>,
    /// The instance's output once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why the instance failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// When the instance started (ms since the epoch).
    pub created_at: u64,
    /// When the state last changed (ms since the epoch).
    pub updated_at: u64,
    /// Whether the step entries of the context are stored apart from the state (see
    /// [`InstanceState::to_stored`]); once they are, they stay apart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub steps_apart: bool,
    /// Steps whose entry in `context.steps` was set or removed since the engine last
    /// stored the state (see [`InstanceState::to_stored`]).
    #[serde(skip)]
    pub steps_changed: StepsChanged,
    /// The JSON text of step entries already serialized, by step id, while the entries
    /// are stored inside the state: an entry never changes once set (a rerun sets it
    /// anew), so a stored state copies it instead of serializing it again at every step.
    #[serde(skip)]
    pub entry_texts: EntryTexts,
}

/// The serialized step entries of a state (see [`InstanceState::entry_texts`]).
///
/// Not part of a state's value, like [`StepsChanged`].
#[derive(Debug, Clone, Default)]
pub struct EntryTexts(BTreeMap<String, Box<serde_json::value::RawValue>>);

impl PartialEq for EntryTexts {
    fn eq(&self, _: &EntryTexts) -> bool {
        true
    }
}

thread_local! {
    /// The entry texts of the state [`InstanceState::to_stored`] is serializing on this
    /// thread, lent to [`serialize_context`] (a field's serializer sees only its field).
    static ENTRY_TEXTS_LENT: std::cell::RefCell<Option<EntryTexts>> =
        const { std::cell::RefCell::new(None) };
}

/// Entry texts lent to [`serialize_context`] on this thread; dropped, it takes them
/// back even if serializing panicked, so that no other state's serialization sees them.
struct LentEntryTexts(());

impl LentEntryTexts {
    fn lend(texts: EntryTexts) -> LentEntryTexts {
        ENTRY_TEXTS_LENT.with(|lent| *lent.borrow_mut() = Some(texts));
        LentEntryTexts(())
    }

    fn take_back(self) -> EntryTexts {
        ENTRY_TEXTS_LENT
            .with(|lent| lent.borrow_mut().take())
            .unwrap_or_default()
    }
}

impl Drop for LentEntryTexts {
    fn drop(&mut self) {
        ENTRY_TEXTS_LENT.with(|lent| lent.borrow_mut().take());
    }
}

/// Serializes a context; while [`InstanceState::to_stored`] lends the state's entry
/// texts, its step entries are copied from them. The output is the same either way.
fn serialize_context<S: serde::Serializer>(
    context: &Value,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    ENTRY_TEXTS_LENT.with(|lent| match (&*lent.borrow(), context) {
        (Some(texts), Value::Object(fields)) => {
            serializer.collect_map(fields.iter().map(|(key, value)| {
                let value = match (key.as_str(), value) {
                    ("steps", Value::Object(entries)) => ContextField::Steps(entries, texts),
                    _ => ContextField::Value(value),
                };
                (key, value)
            }))
        }
        _ => context.serialize(serializer),
    })
}

/// One field of a context being stored.
enum ContextField<'a> {
    Value(&'a Value),
    Steps(&'a Map<String, Value>, &'a EntryTexts),
}

impl Serialize for ContextField<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ContextField::Value(value) => value.serialize(serializer),
            ContextField::Steps(entries, texts) => {
                serializer.collect_map(entries.iter().map(|(step_id, entry)| {
                    let text = texts.0.get(step_id).map(|text| &**text);
                    (step_id, EntryText { text, entry })
                }))
            }
        }
    }
}

/// A step entry: its text when known, else the entry itself.
struct EntryText<'a> {
    text: Option<&'a serde_json::value::RawValue>,
    entry: &'a Value,
}

impl Serialize for EntryText<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.text {
            Some(text) => text.serialize(serializer),
            None => self.entry.serialize(serializer),
        }
    }
}

/// Largest stored state that keeps its step entries inside it. A state that would be
/// larger is stored without them from then on, and each entry is stored apart, once:
/// rewriting every output at every step made a step's write grow with the steps before
/// it, while storing an entry apart costs a row of its own, more than a small state
/// saves (BENCHMARKS.md, "Sixth optimisation pass").
pub const STORED_STATE_INLINE_MAX: usize = 2048;

/// The ids of the steps whose entry in the context changed and is still to be stored.
///
/// Not part of a state's value: two states that differ only in what is still to be
/// stored compare equal.
#[derive(Debug, Clone, Default)]
pub struct StepsChanged(Vec<String>);

impl PartialEq for StepsChanged {
    fn eq(&self, _: &StepsChanged) -> bool {
        true
    }
}

impl InstanceState {
    /// The state as the engine stores it. Up to [`STORED_STATE_INLINE_MAX`] bytes it is
    /// the whole state; beyond, and from then on, it leaves out the step entries of its
    /// context (`context.steps`), which the engine stores apart, each when it changes
    /// ([`InstanceState::take_steps_changed`]), so that a step's write does not grow with
    /// the steps before it.
    pub fn to_stored(&mut self) -> String {
        if !self.steps_apart {
            // Entries set since the last call are serialized once, here.
            for (step_id, entry) in steps_mut(&mut self.context).iter() {
                if !self.entry_texts.0.contains_key(step_id) {
                    let text = serde_json::value::to_raw_value(entry).expect("values serialize");
                    self.entry_texts.0.insert(step_id.clone(), text);
                }
            }
            let lent = LentEntryTexts::lend(std::mem::take(&mut self.entry_texts));
            let text = serde_json::to_string(self);
            self.entry_texts = lent.take_back();
            let text = text.expect("states serialize");
            if text.len() <= STORED_STATE_INLINE_MAX {
                self.steps_changed.0.clear();
                return text;
            }
            // Every entry moves out now, and their texts are needed no more.
            self.entry_texts = EntryTexts::default();
            self.steps_apart = true;
            self.steps_changed.0 = steps_mut(&mut self.context).keys().cloned().collect();
        }
        let context = self
            .context
            .as_object_mut()
            .expect("the context is an object");
        let steps = context.remove("steps");
        let text = serde_json::to_string(self).expect("states serialize");
        if let Some(steps) = steps {
            self.context
                .as_object_mut()
                .expect("the context is an object")
                .insert("steps".to_string(), steps);
        }
        text
    }

    /// Reads a state stored by [`InstanceState::to_stored`]; when its step entries are
    /// stored apart ([`InstanceState::steps_apart`]), they are added with
    /// [`InstanceState::add_stored_entries`]. States stored by versions that kept every
    /// entry inside read as they are.
    pub fn from_stored(text: &str) -> Result<InstanceState, serde_json::Error> {
        let mut state: InstanceState = serde_json::from_str(text)?;
        let context = state
            .context
            .as_object_mut()
            .ok_or_else(|| serde::de::Error::custom("the context is not an object"))?;
        let steps = context
            .entry("steps")
            .or_insert_with(|| Value::Object(Map::new()));
        if !steps.is_object() {
            return Err(serde::de::Error::custom(
                "the context's steps are not an object",
            ));
        }
        Ok(state)
    }

    /// Puts the step entries stored apart (`(step id, entry)`, the entry as JSON text)
    /// back into the context.
    pub fn add_stored_entries(
        &mut self,
        entries: Vec<(String, String)>,
    ) -> Result<(), serde_json::Error> {
        let steps = steps_mut(&mut self.context);
        for (step_id, entry) in entries {
            self.entry_texts.0.remove(&step_id);
            steps.insert(step_id, serde_json::from_str(&entry)?);
        }
        Ok(())
    }

    /// The ids of the steps whose entry was set or removed since the last call, each
    /// once, when the entries are stored apart (empty otherwise): the engine stores the
    /// entries of those still in `context.steps` and deletes the others. Call it after
    /// [`InstanceState::to_stored`].
    pub fn take_steps_changed(&mut self) -> Vec<String> {
        let mut changed = std::mem::take(&mut self.steps_changed.0);
        changed.sort_unstable();
        changed.dedup();
        changed
    }

    /// Sets a step's entry in the context.
    fn set_step_entry(&mut self, step_id: &str, entry: Value) {
        self.entry_texts.0.remove(step_id);
        steps_mut(&mut self.context).insert(step_id.to_string(), entry);
        self.steps_changed.0.push(step_id.to_string());
    }

    /// Removes a step's entry from the context.
    fn remove_step_entry(&mut self, step_id: &str) {
        self.entry_texts.0.remove(step_id);
        if steps_mut(&mut self.context).remove(step_id).is_some() {
            self.steps_changed.0.push(step_id.to_string());
        }
    }
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
    /// A worker failed a task (or the engine did, for a missed heartbeat or pickup).
    FailTask {
        /// The task.
        task_id: String,
        /// Why.
        error: ErrorInfo,
        /// Whether a retry may succeed.
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
    /// Cancel gracefully: compensate, then end `cancelled`.
    Cancel {
        /// Who asked.
        by: String,
    },
    /// End at once, without compensation.
    Terminate {
        /// Who asked.
        by: String,
        /// Why.
        reason: String,
    },
    /// Start no new attempt until resumed.
    Pause {
        /// Who asked.
        by: String,
    },
    /// Undo a pause.
    Resume {
        /// Who asked.
        by: String,
    },
    /// Resume a failed instance from its failed step; what succeeded is not run again.
    Retry {
        /// Who asked.
        by: String,
    },
    /// Run an ended instance again from a chosen main step.
    Rerun {
        /// Who asked.
        by: String,
        /// The step's id.
        from_step: String,
    },
    /// A person completed a human task with form data.
    CompleteHuman {
        /// The task.
        task_id: String,
        /// Who.
        by: String,
        /// The form data, checked against the step's schema.
        data: Value,
    },
    /// A child instance ended.
    ChildEnded {
        /// The child.
        child_id: String,
        /// Its final status name.
        status: String,
        /// Its output (when completed).
        output: Option<Value>,
        /// Its error (otherwise).
        error: Option<ErrorInfo>,
    },
    /// A named signal with its payload.
    Signal {
        /// The signal's name.
        name: String,
        /// Its payload.
        payload: Value,
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
        /// The step.
        step: StepRef,
        /// Its attempt.
        attempt: u32,
    },
    /// The delay before attempt `attempt` of a step.
    Retry {
        /// The step.
        step: StepRef,
        /// The attempt that will run.
        attempt: u32,
    },
    /// The per-attempt timeout of a step (also bounds a `wait`).
    AttemptTimeout {
        /// The step.
        step: StepRef,
        /// The attempt it bounds.
        attempt: u32,
    },
    /// The whole step's timeout or deadline, retries included.
    StepExpiry {
        /// The step.
        step: StepRef,
        /// The first attempt of the run it bounds.
        attempt_first: u32,
    },
    /// A human task's escalation.
    Escalate {
        /// The step.
        step: StepRef,
        /// Its attempt.
        attempt: u32,
    },
    /// The whole instance's timeout.
    InstanceTimeout,
    /// The whole instance's deadline.
    InstanceDeadline,
}

impl TimerId {
    /// A stable textual key, unique within the instance.
    pub fn key(&self) -> String {
        match self {
            TimerId::Sleep { step, attempt } => format!("sleep:{}:{attempt}", step.key()),
            TimerId::Retry { step, attempt } => format!("retry:{}:{attempt}", step.key()),
            TimerId::AttemptTimeout { step, attempt } => {
                format!("attempt:{}:{attempt}", step.key())
            }
            TimerId::StepExpiry {
                step,
                attempt_first,
            } => format!("step:{}:{attempt_first}", step.key()),
            TimerId::Escalate { step, attempt } => format!("escalate:{}:{attempt}", step.key()),
            TimerId::InstanceTimeout => "instance".to_string(),
            TimerId::InstanceDeadline => "deadline".to_string(),
        }
    }

    /// Parses `key()`'s output.
    pub fn parse(key: &str) -> Option<TimerId> {
        match key {
            "instance" => return Some(TimerId::InstanceTimeout),
            "deadline" => return Some(TimerId::InstanceDeadline),
            _ => {}
        }
        let mut parts = key.split(':');
        let kind = parts.next()?;
        let step = StepRef::parse_key(parts.next()?)?;
        let attempt: u32 = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(match kind {
            "sleep" => TimerId::Sleep { step, attempt },
            "retry" => TimerId::Retry { step, attempt },
            "attempt" => TimerId::AttemptTimeout { step, attempt },
            "escalate" => TimerId::Escalate { step, attempt },
            "step" => TimerId::StepExpiry {
                step,
                attempt_first: attempt,
            },
            _ => return None,
        })
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
    /// Start a child instance (idempotent: its id is fixed by the parent's step and
    /// attempt); report its end with `Command::ChildEnded`.
    StartChild {
        /// The child's id.
        child_id: String,
        /// Its definition.
        definition: String,
        /// Its version (the latest if `None`).
        version: Option<u32>,
        /// Its input.
        input: Value,
    },
    /// Cancel a child instance (with its compensations).
    CancelChild {
        /// The child's id.
        child_id: String,
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
    /// Attempt number.
    pub attempt: u32,
    /// The evaluated input.
    pub input: Value,
    /// Stable across attempts of the step, for workers to deduplicate side effects.
    pub idempotency_key: String,
    /// Bound on waiting for a worker to take it.
    pub queue_timeout: Option<Duration>,
    /// Bound between heartbeats once taken.
    pub heartbeat_timeout: Option<Duration>,
    /// Whether [`resume_effects`] offers this task again from the instance's state
    /// alone, so that it needs no stored row of its own. True for a main-lane `task`
    /// step: nothing changes the context it was evaluated on while it waits. False for
    /// a lane's task (a `set` step in another lane may change `.vars` meanwhile) and for
    /// a human task (an escalation rewrites its assignee).
    pub restorable: bool,
}

/// An HTTP call to make for a step.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequest {
    /// The step.
    pub step_id: String,
    /// Attempt number.
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
    /// The operation makes no sense in the instance's status.
    #[error("cannot {operation} an instance that is {status}")]
    NotAllowed {
        /// What was asked.
        operation: &'static str,
        /// The instance's status.
        status: &'static str,
    },
    /// The request names something the definition does not have.
    #[error("{0}")]
    BadRequest(String),
    /// Form data does not match the human task's schema: (JSON pointer, message) each.
    #[error("form data does not match the schema ({} problems)", .0.len())]
    InvalidData(Vec<(String, String)>),
}

/// Separates a child instance's id from its parent's. Users cannot put it in ids,
/// so the part before the first one is always a root instance's id.
pub const CHILD_SEPARATOR: char = '~';

/// Longest child instance id kept readable; longer ones are shortened with a hash.
const CHILD_ID_READABLE_MAX: usize = 192;

/// The id of the child instance an attempt of a `workflow` step starts:
/// `{parent}~{step}~{attempt}`, readable, and starting with the root instance's id so
/// that a whole family of instances lives in one partition (see [`partition_key`]).
pub fn child_id(parent_id: &str, step_id: &str, attempt: u32) -> String {
    let readable = format!(
        "{parent_id}{CHILD_SEPARATOR}{}{CHILD_SEPARATOR}{attempt}",
        step_id.replace(CHILD_SEPARATOR, "_")
    );
    if readable.len() <= CHILD_ID_READABLE_MAX {
        return readable;
    }
    format!(
        "{}{CHILD_SEPARATOR}{:016x}{CHILD_SEPARATOR}{attempt}",
        partition_key(parent_id),
        jitter_sample(parent_id, step_id, attempt)
    )
}

/// The part of an instance id that decides its partition: the root instance's id.
/// Children share their root's partition, so a parent and its children are always
/// on the same node and talk without crossing the network.
pub fn partition_key(instance_id: &str) -> &str {
    instance_id
        .split_once(CHILD_SEPARATOR)
        .map_or(instance_id, |(root, _)| root)
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
    start_restarted(definition, version, id, input, None, now)
}

/// Where a restarted instance comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    /// The instance it restarts.
    pub from: String,
    /// Who asked.
    pub by: String,
}

/// Starts an instance, restarting another one or not.
pub fn start_restarted(
    definition: &Definition,
    version: u32,
    id: &str,
    input: Value,
    restart: Option<Restart>,
    now: u64,
) -> (InstanceState, Transition) {
    let (restarted_from, restarted_by) = match restart {
        Some(restart) => (Some(restart.from), Some(restart.by)),
        None => (None, None),
    };
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
        current: None,
        attempt: 0,
        attempt_first: 0,
        attempts: BTreeMap::new(),
        step_started_at: now,
        wait: Wait::Nothing,
        completed: Vec::new(),
        compensating: Vec::new(),
        compensation_reason: None,
        caught: None,
        paused_from: None,
        failed_at: None,
        signals: BTreeMap::new(),
        restarted_from: restarted_from.clone(),
        fanout: None,
        parent: None,
        lane_result: None,
        output: None,
        error: None,
        created_at: now,
        updated_at: now,
        steps_apart: false,
        steps_changed: StepsChanged::default(),
        entry_texts: EntryTexts::default(),
    };
    let mut t = Transition::default();
    t.events.push(EventKind::InstanceStarted {
        restarted_from,
        restarted_by,
        definition: definition.name.clone(),
        version,
        input,
    });
    if let Some(timeout) = definition.timeout {
        t.effects.push(Effect::StartTimer {
            timer: TimerId::InstanceTimeout,
            fire_at: now.saturating_add(millis(timeout)),
        });
    }
    if let Some(deadline) = &definition.deadline {
        match eval_deadline(deadline, &state.context) {
            Ok(fire_at) => t.effects.push(Effect::StartTimer {
                timer: TimerId::InstanceDeadline,
                fire_at,
            }),
            Err(message) => {
                let error = ErrorInfo {
                    error_type: ERROR_TYPE_EXPRESSION.to_string(),
                    message: format!("instance deadline: {message}"),
                };
                end(&mut state, InstanceStatus::Failed, now);
                state.error = Some(error.clone());
                t.events.push(EventKind::InstanceFailed { error });
                return (state, t);
            }
        }
    }
    begin(
        &mut state,
        definition,
        StepRef::Main { index: 0 },
        now,
        &mut t,
    );
    (state, t)
}

/// Applies a command to an instance.
///
/// On `Err` the state is unchanged.
pub fn handle(
    state: &mut InstanceState,
    definition: &Definition,
    command: Command,
    now: u64,
) -> Result<Transition, Rejection> {
    assert_eq!(state.definition, definition.name);
    assert!(state.lane_result.is_none());
    let mut t = Transition::default();
    match state
        .fanout
        .as_ref()
        .and_then(|f| lane_target(f, definition, &command))
    {
        Some(lane) => {
            let mut result = Ok(());
            run_in_lane(state, definition, lane, &mut t, |state, t| {
                result = dispatch(state, definition, command, now, t);
            });
            result?;
            settle(state, definition, now, &mut t);
        }
        None => dispatch(state, definition, command, now, &mut t)?,
    }
    state.updated_at = now;
    Ok(t)
}

/// Applies a command to the step whose fields are in `state` now (the main step, or a
/// lane swapped in by `run_in_lane`).
fn dispatch(
    state: &mut InstanceState,
    definition: &Definition,
    command: Command,
    now: u64,
    t: &mut Transition,
) -> Result<(), Rejection> {
    match command {
        Command::CompleteTask { task_id, output } => {
            check_running(state)?;
            current_task(state, &task_id)?;
            complete_step(state, definition, output, now, t);
        }
        Command::ChildEnded {
            child_id,
            status,
            output,
            error,
        } => {
            check_running(state)?;
            if !matches!(&state.wait, Wait::Child { child_id: current } if *current == child_id) {
                return Err(Rejection::NotCurrent);
            }
            if status == InstanceStatus::Completed.as_str() {
                complete_step(state, definition, output.unwrap_or(Value::Null), now, t);
            } else {
                let cause = error
                    .map(|e| format!("{}: {}", e.error_type, e.message))
                    .unwrap_or_default();
                let error = ErrorInfo {
                    error_type: format!("child_{status}"),
                    message: format!("child instance {child_id} ended {status} {cause}")
                        .trim()
                        .to_string(),
                };
                // The child retried its own steps already; the step's policy decides again.
                attempt_failed(state, definition, error, true, now, t);
            }
        }
        Command::CompleteHuman { task_id, by, data } => {
            check_running(state)?;
            current_task(state, &task_id)?;
            let current = state.current.expect("a task belongs to a current step");
            let StepKind::Human { form, .. } = &current.resolve(definition).kind else {
                return Err(Rejection::NotCurrent);
            };
            if let Some(form) = form {
                let problems = form.check(&data);
                if !problems.is_empty() {
                    return Err(Rejection::InvalidData(problems));
                }
            }
            complete_step(state, definition, json!({ "by": by, "data": data }), now, t);
        }
        Command::FailTask {
            task_id,
            error,
            retryable,
        } => {
            check_running(state)?;
            current_task(state, &task_id)?;
            attempt_failed(state, definition, error, retryable, now, t);
        }
        Command::HttpResult {
            step_id,
            attempt,
            result,
        } => {
            check_running(state)?;
            let current = state.current.ok_or(Rejection::NotCurrent)?;
            if state.wait != Wait::Http
                || current.step_id(definition) != step_id
                || state.attempt != attempt
            {
                return Err(Rejection::NotCurrent);
            }
            match result {
                Ok(output) => complete_step(state, definition, output, now, t),
                Err(failure) => {
                    attempt_failed(state, definition, failure.error, failure.retryable, now, t)
                }
            }
        }
        Command::FireTimer { timer } => {
            check_running(state)?;
            fire_timer(state, definition, timer, now, t)?;
        }
        Command::Signal { name, payload } => {
            check_running(state)?;
            let waiting = matches!(&state.wait, Wait::Signal { name: waiting } if *waiting == name);
            let buffered = state.signals.get(&name).map_or(0, VecDeque::len);
            if !waiting && buffered >= SIGNALS_BUFFERED_MAX {
                return Err(Rejection::BadRequest(format!(
                    "{SIGNALS_BUFFERED_MAX} signals `{name}` are already waiting to be taken"
                )));
            }
            t.events.push(EventKind::SignalReceived {
                name: name.clone(),
                payload: payload.clone(),
            });
            if waiting {
                complete_step(state, definition, payload, now, t);
            } else {
                state.signals.entry(name).or_default().push_back(payload);
            }
        }
        Command::Cancel { by } => {
            if state.status.is_terminal() {
                return Err(Rejection::InstanceEnded(state.status.as_str()));
            }
            if state.status == InstanceStatus::Compensating
                || state.paused_from == Some(InstanceStatus::Compensating)
            {
                return Err(not_allowed("cancel", state.status));
            }
            t.events.push(EventKind::CancelRequested { by: by.clone() });
            stop_current_step(state, definition, t);
            state.paused_from = None;
            state.status = InstanceStatus::Running;
            compensate_or_end(
                state,
                definition,
                CompensationReason::Cancelled { by },
                now,
                t,
            );
        }
        Command::Terminate { by, reason } => {
            if state.status.is_terminal() {
                return Err(Rejection::InstanceEnded(state.status.as_str()));
            }
            stop_current_step(state, definition, t);
            cancel_instance_timers(definition, t);
            end(state, InstanceStatus::Terminated, now);
            state.error = Some(ErrorInfo {
                error_type: "terminated".to_string(),
                message: reason.clone(),
            });
            t.events.push(EventKind::InstanceTerminated { by, reason });
        }
        Command::Pause { by } => {
            if !matches!(
                state.status,
                InstanceStatus::Running | InstanceStatus::Compensating
            ) {
                return Err(not_allowed("pause", state.status));
            }
            state.paused_from = Some(state.status);
            state.status = InstanceStatus::Paused;
            t.events.push(EventKind::InstancePaused { by });
        }
        Command::Resume { by } => {
            if state.status != InstanceStatus::Paused {
                return Err(not_allowed("resume", state.status));
            }
            state.status = state
                .paused_from
                .take()
                .expect("a paused instance remembers its status");
            t.events.push(EventKind::InstanceResumed { by });
            if state.wait == Wait::Paused {
                schedule_attempt(state, definition, now, t);
            }
            if state.wait == Wait::Lanes {
                let paused: Vec<usize> = state
                    .fanout
                    .iter()
                    .flat_map(|f| f.lanes.iter())
                    .filter(|(_, lane)| lane.wait == Wait::Paused)
                    .map(|(number, _)| *number)
                    .collect();
                for number in paused {
                    run_in_lane(state, definition, number, t, |state, t| {
                        schedule_attempt(state, definition, now, t);
                    });
                }
                settle(state, definition, now, t);
            }
        }
        Command::Retry { by } => {
            if state.status != InstanceStatus::Failed {
                return Err(not_allowed("retry", state.status));
            }
            let Some(failed_at) = state.failed_at else {
                // Failed before any step ran (a bad deadline expression): nothing to resume.
                return Err(not_allowed("retry", state.status));
            };
            state.error = None;
            let from = match failed_at {
                StepRef::Undo { .. } => {
                    state.status = InstanceStatus::Compensating;
                    failed_at
                }
                // A failed handler or branch step retries its main step from its start.
                StepRef::Main { index }
                | StepRef::Handler { index, .. }
                | StepRef::Branch { index, .. }
                | StepRef::Lane { index, .. } => {
                    state.status = InstanceStatus::Running;
                    state.caught = None;
                    state.cursor = index;
                    StepRef::Main { index }
                }
            };
            state.failed_at = None;
            t.events.push(EventKind::InstanceRetried {
                by,
                step_id: from.step_id(definition),
            });
            begin(state, definition, from, now, t);
        }
        Command::Rerun { by, from_step } => {
            if !state.status.is_terminal() {
                return Err(not_allowed("rerun", state.status));
            }
            let Some(index) = definition.step_index(&from_step) else {
                return Err(Rejection::BadRequest(format!(
                    "the definition has no step `{from_step}`"
                )));
            };
            // Forget what the re-run steps produced; keep what came before.
            for step in &definition.steps[index..] {
                state.remove_step_entry(&step.id);
            }
            state.completed.retain(|&done| done < index);
            state.compensating.clear();
            state.compensation_reason = None;
            state.caught = None;
            state.failed_at = None;
            state.output = None;
            state.error = None;
            state.status = InstanceStatus::Running;
            state.cursor = index;
            t.events.push(EventKind::InstanceRerun {
                by,
                step_id: from_step,
            });
            begin(state, definition, StepRef::Main { index }, now, t);
        }
    }
    Ok(())
}

/// The steps of lane `lane` of the fan-out step at `index`.
fn lane_steps(definition: &Definition, index: usize, lane: usize) -> &[Step] {
    match &definition.steps[index].kind {
        StepKind::Parallel { branches, .. } => &branches[lane],
        StepKind::Foreach { steps, .. } => steps,
        _ => unreachable!("lane refs point into fan-out steps"),
    }
}

/// The lane a command is for, if it is for one of the running lanes.
fn lane_target(fanout: &FanOut, definition: &Definition, command: &Command) -> Option<usize> {
    let find = |matches: &dyn Fn(&Lane) -> bool| {
        fanout
            .lanes
            .iter()
            .find(|(_, lane)| matches(lane))
            .map(|(number, _)| *number)
    };
    match command {
        Command::CompleteTask { task_id, .. } | Command::FailTask { task_id, .. } => find(
            &|lane| matches!(&lane.wait, Wait::Task { task_id: current } if current == task_id),
        ),
        Command::HttpResult {
            step_id, attempt, ..
        } => find(&|lane| {
            lane.wait == Wait::Http
                && lane.attempt == *attempt
                && lane
                    .current
                    .is_some_and(|c| c.step_id(definition) == *step_id)
        }),
        Command::FireTimer { timer } => {
            let step = match timer {
                TimerId::Sleep { step, .. }
                | TimerId::Retry { step, .. }
                | TimerId::AttemptTimeout { step, .. }
                | TimerId::StepExpiry { step, .. }
                | TimerId::Escalate { step, .. } => *step,
                TimerId::InstanceTimeout | TimerId::InstanceDeadline => return None,
            };
            match step {
                StepRef::Lane { lane, .. } if fanout.lanes.contains_key(&lane) => Some(lane),
                _ => None,
            }
        }
        Command::Signal { name, .. } => {
            find(&|lane| matches!(&lane.wait, Wait::Signal { name: waiting } if waiting == name))
        }
        Command::ChildEnded { child_id, .. } => find(
            &|lane| matches!(&lane.wait, Wait::Child { child_id: current } if current == child_id),
        ),
        _ => None,
    }
}

fn take_lane_fields(state: &mut InstanceState) -> Lane {
    Lane {
        current: state.current.take(),
        attempt: state.attempt,
        attempt_first: state.attempt_first,
        step_started_at: state.step_started_at,
        wait: std::mem::replace(&mut state.wait, Wait::Nothing),
    }
}

fn put_lane_fields(state: &mut InstanceState, lane: Lane) {
    state.current = lane.current;
    state.attempt = lane.attempt;
    state.attempt_first = lane.attempt_first;
    state.step_started_at = lane.step_started_at;
    state.wait = lane.wait;
}

/// Runs `f` with lane `number`'s fields swapped in (a new lane when it does not run yet),
/// then swaps them out and records the lane's end if `f` ended it.
fn run_in_lane(
    state: &mut InstanceState,
    _definition: &Definition,
    number: usize,
    t: &mut Transition,
    f: impl FnOnce(&mut InstanceState, &mut Transition),
) {
    let mut fanout = state.fanout.take().expect("lanes run inside a fan-out");
    let lane = fanout.lanes.remove(&number).unwrap_or(Lane {
        current: None,
        attempt: 0,
        attempt_first: 0,
        step_started_at: 0,
        wait: Wait::Nothing,
    });
    let item = fanout.items.get(number).cloned();
    let main = take_lane_fields(state);
    put_lane_fields(state, lane);
    if let (Some(item), Value::Object(context)) = (item, &mut state.context) {
        context.insert("item".to_string(), item);
    }
    // The fan-out is out of the state while the lane runs: lane steps never touch it.
    f(state, t);
    if let Value::Object(context) = &mut state.context {
        context.remove("item");
    }
    let lane = take_lane_fields(state);
    match state.lane_result.take() {
        Some(Ok(output)) => {
            fanout.outputs.insert(number, output);
        }
        Some(Err(error)) => {
            fanout.failures.insert(number, error);
        }
        None => {
            fanout.lanes.insert(number, lane);
        }
    }
    put_lane_fields(state, main);
    state.fanout = Some(fanout);
}

/// Starts a fan-out step's lanes.
fn start_fanout(
    state: &mut InstanceState,
    definition: &Definition,
    index: usize,
    items: Vec<Value>,
    total: usize,
    now: u64,
    t: &mut Transition,
) {
    state.wait = Wait::Lanes;
    state.fanout = Some(FanOut {
        index,
        lanes: BTreeMap::new(),
        outputs: BTreeMap::new(),
        failures: BTreeMap::new(),
        next: 0,
        total,
        items,
    });
    settle(state, definition, now, t);
}

/// Starts lanes up to the limit, and ends the fan-out step once its join is decided.
fn settle(state: &mut InstanceState, definition: &Definition, now: u64, t: &mut Transition) {
    loop {
        let Some(fanout) = state.fanout.as_ref() else {
            return;
        };
        let index = fanout.index;
        let (join, limit) = match &definition.steps[index].kind {
            StepKind::Parallel { join, branches } => (*join, branches.len()),
            StepKind::Foreach { concurrency, .. } => (Join::All, *concurrency),
            _ => unreachable!("a fan-out is a parallel or foreach step"),
        };
        let done = fanout.outputs.len();
        let failed = fanout.failures.len();
        let needed = match join {
            Join::All => fanout.total,
            Join::Any => 1.min(fanout.total),
            Join::Count(n) => n,
        };
        if done >= needed {
            let output = match join {
                Join::Any => fanout
                    .outputs
                    .values()
                    .next()
                    .cloned()
                    .unwrap_or(Value::Null),
                _ => Value::Array(fanout.outputs.values().cloned().collect()),
            };
            return finish_fanout(state, definition, Ok(output), now, t);
        }
        if fanout.total - failed < needed {
            let (lane, error) = fanout.failures.iter().next_back().expect("a lane failed");
            let error = ErrorInfo {
                error_type: error.error_type.clone(),
                message: format!("lane {lane}: {}", error.message),
            };
            return finish_fanout(state, definition, Err(error), now, t);
        }
        if fanout.lanes.len() >= limit || fanout.next >= fanout.total {
            return;
        }
        let number = fanout.next;
        if let Some(fanout) = state.fanout.as_mut() {
            fanout.next += 1;
        }
        run_in_lane(state, definition, number, t, |state, t| {
            begin(
                state,
                definition,
                StepRef::Lane {
                    index,
                    lane: number,
                    step: 0,
                },
                now,
                t,
            );
        });
    }
}

/// Stops every running lane (their tasks withdrawn, their timers cancelled).
fn stop_lanes(state: &mut InstanceState, definition: &Definition, t: &mut Transition) {
    let lanes: Vec<usize> = match &state.fanout {
        Some(fanout) => fanout.lanes.keys().copied().collect(),
        None => return,
    };
    for number in lanes {
        run_in_lane(state, definition, number, t, |state, t| {
            stop_current_step(state, definition, t);
        });
        if let Some(fanout) = state.fanout.as_mut() {
            fanout.lanes.remove(&number);
        }
    }
    state.fanout = None;
}

/// Ends the fan-out step: the remaining lanes stop, and the step completes or fails.
fn finish_fanout(
    state: &mut InstanceState,
    definition: &Definition,
    result: Result<Value, ErrorInfo>,
    now: u64,
    t: &mut Transition,
) {
    stop_lanes(state, definition, t);
    state.wait = Wait::Nothing;
    match result {
        Ok(output) => complete_step(state, definition, output, now, t),
        Err(error) => step_failed(state, definition, error, now, t),
    }
}

fn check_running(state: &InstanceState) -> Result<(), Rejection> {
    if state.status.is_terminal() {
        return Err(Rejection::InstanceEnded(state.status.as_str()));
    }
    Ok(())
}

fn not_allowed(operation: &'static str, status: InstanceStatus) -> Rejection {
    Rejection::NotAllowed {
        operation,
        status: status.as_str(),
    }
}

/// Checks that `task_id` is the task of the current attempt.
fn current_task(state: &InstanceState, task_id: &str) -> Result<(), Rejection> {
    let Some((instance_id, _, attempt)) = parse_task_id(task_id) else {
        return Err(Rejection::UnknownTask);
    };
    if instance_id != state.id {
        return Err(Rejection::UnknownTask);
    }
    match &state.wait {
        Wait::Task { task_id: current } if current == task_id => {
            assert_eq!(attempt, state.attempt);
            Ok(())
        }
        _ => Err(Rejection::NotCurrent),
    }
}

fn fire_timer(
    state: &mut InstanceState,
    definition: &Definition,
    timer: TimerId,
    now: u64,
    t: &mut Transition,
) -> Result<(), Rejection> {
    let is_current = |step: StepRef| state.current == Some(step);
    match timer {
        TimerId::Sleep { step, attempt } => {
            if !is_current(step) || state.wait != Wait::Sleep || state.attempt != attempt {
                return Err(Rejection::NotCurrent);
            }
            t.events.push(EventKind::TimerFired {
                step_id: step.step_id(definition),
            });
            complete_step(state, definition, Value::Null, now, t);
        }
        TimerId::Retry { step, attempt } => {
            if !is_current(step) || state.wait != Wait::Retry || attempt != state.attempt {
                return Err(Rejection::NotCurrent);
            }
            schedule_attempt(state, definition, now, t);
        }
        TimerId::AttemptTimeout { step, attempt } => {
            let running = matches!(
                state.wait,
                Wait::Task { .. } | Wait::Http | Wait::Signal { .. } | Wait::Child { .. }
            );
            if !is_current(step) || attempt != state.attempt || !running {
                return Err(Rejection::NotCurrent);
            }
            withdraw_attempt(state, t);
            let error = ErrorInfo {
                error_type: ERROR_TYPE_TIMEOUT.to_string(),
                message: format!(
                    "attempt {attempt} of step `{}` timed out",
                    step.step_id(definition)
                ),
            };
            // The timer has fired: nothing to cancel.
            state.wait = Wait::Nothing;
            attempt_failed_after_cancel(state, definition, error, true, now, t);
        }
        TimerId::StepExpiry {
            step,
            attempt_first,
        } => {
            if !is_current(step) || attempt_first != state.attempt_first {
                return Err(Rejection::NotCurrent);
            }
            // The step's whole time is up: its attempt stops and no retry follows.
            withdraw_attempt(state, t);
            cancel_attempt_timers(state, definition, t);
            state.wait = Wait::Nothing;
            let error = ErrorInfo {
                error_type: ERROR_TYPE_TIMEOUT.to_string(),
                message: format!("step `{}` ran out of time", step.step_id(definition)),
            };
            t.events.push(EventKind::StepFailed {
                step_id: step.step_id(definition),
                attempt: state.attempt,
                error: error.clone(),
                retryable: false,
            });
            step_failed(state, definition, error, now, t);
        }
        TimerId::Escalate { step, attempt } => {
            let Wait::Task { task_id } = state.wait.clone() else {
                return Err(Rejection::NotCurrent);
            };
            if !is_current(step) || attempt != state.attempt {
                return Err(Rejection::NotCurrent);
            }
            let StepKind::Human {
                escalation: Some(escalation),
                ..
            } = &step.resolve(definition).kind
            else {
                return Err(Rejection::NotCurrent);
            };
            match &escalation.action {
                EscalationAction::Reassign { assignee, group } => {
                    let mut spec = human_task(state, definition, step, attempt)
                        .map_err(|_| Rejection::NotCurrent)?;
                    spec.input["assignee"] = json!(assignee);
                    spec.input["group"] = json!(group);
                    t.events.push(EventKind::HumanTaskEscalated {
                        step_id: step.step_id(definition),
                        assignee: assignee.clone(),
                        group: group.clone(),
                    });
                    t.effects.push(Effect::WithdrawTask { task_id });
                    t.effects.push(Effect::OfferTask(spec));
                }
                EscalationAction::Fail => {
                    t.effects.push(Effect::WithdrawTask { task_id });
                    cancel_attempt_timers(state, definition, t);
                    state.wait = Wait::Nothing;
                    let error = ErrorInfo {
                        error_type: ERROR_TYPE_TIMEOUT.to_string(),
                        message: format!("nobody completed `{}` in time", step.step_id(definition)),
                    };
                    attempt_failed_after_cancel(state, definition, error, false, now, t);
                }
            }
        }
        TimerId::InstanceTimeout | TimerId::InstanceDeadline => {
            let error = ErrorInfo {
                error_type: ERROR_TYPE_TIMEOUT.to_string(),
                message: if timer == TimerId::InstanceTimeout {
                    "instance timed out".to_string()
                } else {
                    "instance passed its deadline".to_string()
                },
            };
            if state.status == InstanceStatus::Compensating
                || state.paused_from == Some(InstanceStatus::Compensating)
            {
                // Compensations are the way out; they run to their end.
                return Err(Rejection::NotCurrent);
            }
            let failed_at = state.current;
            stop_current_step(state, definition, t);
            state.paused_from = None;
            state.status = InstanceStatus::Running;
            state.failed_at = failed_at;
            fail_instance(state, definition, error, now, t, true);
        }
    }
    Ok(())
}

/// Starts a new run of `step`: its first attempt, and its step-wide timers.
fn begin(
    state: &mut InstanceState,
    definition: &Definition,
    step: StepRef,
    now: u64,
    t: &mut Transition,
) {
    let issued = state.attempts.get(&step.key()).copied().unwrap_or(0);
    state.current = Some(step);
    state.attempt_first = issued + 1;
    state.attempt = issued + 1;
    state.step_started_at = now;
    let definition_step = step.resolve(definition);
    let mut expiry: Option<u64> = definition_step
        .step_timeout
        .map(|timeout| now.saturating_add(millis(timeout)));
    if let Some(deadline) = &definition_step.deadline {
        match eval_deadline(deadline, &state.context) {
            Ok(at) => expiry = Some(expiry.map_or(at, |e| e.min(at))),
            Err(message) => return expression_failed(state, definition, &message, now, t),
        }
    }
    if let Some(fire_at) = expiry {
        t.effects.push(Effect::StartTimer {
            timer: TimerId::StepExpiry {
                step,
                attempt_first: state.attempt_first,
            },
            fire_at,
        });
    }
    schedule_attempt(state, definition, now, t);
}

/// Schedules attempt `state.attempt` of the current step.
fn schedule_attempt(
    state: &mut InstanceState,
    definition: &Definition,
    now: u64,
    t: &mut Transition,
) {
    let current = state.current.expect("an attempt belongs to a current step");
    if state.status == InstanceStatus::Paused {
        state.wait = Wait::Paused;
        return;
    }
    let step = current.resolve(definition);
    let step_id = current.step_id(definition);
    let attempt = state.attempt;
    state.attempts.insert(current.key(), attempt);
    let timeout_timer = step.timeout.map(|timeout| Effect::StartTimer {
        timer: TimerId::AttemptTimeout {
            step: current,
            attempt,
        },
        fire_at: now.saturating_add(millis(timeout)),
    });
    match &step.kind {
        StepKind::Task { .. } => {
            let spec = match queue_task(state, definition, current, attempt) {
                Ok(spec) => spec,
                Err(err) => return expression_failed(state, definition, &err.message, now, t),
            };
            t.events.push(EventKind::StepScheduled {
                step_id,
                attempt,
                input: Some(spec.input.clone()),
            });
            state.wait = Wait::Task {
                task_id: spec.task_id.clone(),
            };
            t.effects.push(Effect::OfferTask(spec));
            t.effects.extend(timeout_timer);
        }
        StepKind::Http { .. } => {
            let request = match http_request(step, &step_id, attempt, &state.context) {
                Ok(request) => request,
                Err(err) => return expression_failed(state, definition, &err.message, now, t),
            };
            t.events.push(EventKind::StepScheduled {
                step_id,
                attempt,
                input: Some(
                    json!({ "method": request.method, "url": request.url, "body": request.body }),
                ),
            });
            t.effects.push(Effect::CallHttp(request));
            t.effects.extend(timeout_timer);
            state.wait = Wait::Http;
        }
        StepKind::Sleep { duration } => {
            let fire_at = now.saturating_add(millis(*duration));
            t.events.push(EventKind::StepScheduled {
                step_id: step_id.clone(),
                attempt,
                input: None,
            });
            t.events.push(EventKind::TimerStarted { step_id, fire_at });
            t.effects.push(Effect::StartTimer {
                timer: TimerId::Sleep {
                    step: current,
                    attempt,
                },
                fire_at,
            });
            state.wait = Wait::Sleep;
        }
        StepKind::Set { vars } => {
            let value = match vars.eval(&state.context) {
                Ok(value) => value,
                Err(err) => return expression_failed(state, definition, &err.message, now, t),
            };
            t.events.push(EventKind::StepScheduled {
                step_id,
                attempt,
                input: Some(value.clone()),
            });
            if let (Some(Value::Object(target)), Value::Object(source)) =
                (state.context.get_mut("vars"), &value)
            {
                for (key, item) in source {
                    target.insert(key.clone(), item.clone());
                }
            }
            complete_step(state, definition, value, now, t);
        }
        StepKind::Fail {
            error_type,
            message,
        } => {
            let message = match message.eval(&state.context) {
                Ok(Value::String(text)) => text,
                Ok(other) => other.to_string(),
                Err(err) => return expression_failed(state, definition, &err.message, now, t),
            };
            t.events.push(EventKind::StepScheduled {
                step_id,
                attempt,
                input: None,
            });
            let error = ErrorInfo {
                error_type: error_type.clone(),
                message,
            };
            // A `fail` step means it: never retried (it may be caught).
            attempt_failed_after_cancel(state, definition, error, false, now, t);
        }
        StepKind::Workflow {
            definition: child_definition,
            version,
            input,
        } => {
            let input = match input.eval(&state.context) {
                Ok(value) => value,
                Err(err) => return expression_failed(state, definition, &err.message, now, t),
            };
            let child_id = child_id(&state.id, &step_id, attempt);
            t.events.push(EventKind::StepScheduled {
                step_id,
                attempt,
                input: Some(
                    json!({ "child_id": child_id, "definition": child_definition, "input": input }),
                ),
            });
            t.effects.push(Effect::StartChild {
                child_id: child_id.clone(),
                definition: child_definition.clone(),
                version: *version,
                input,
            });
            t.effects.extend(timeout_timer);
            state.wait = Wait::Child { child_id };
        }
        StepKind::Parallel { branches, .. } => {
            t.events.push(EventKind::StepScheduled {
                step_id,
                attempt,
                input: Some(json!({ "branches": branches.len() })),
            });
            let StepRef::Main { index } = current else {
                unreachable!("a parallel step is a main step")
            };
            start_fanout(state, definition, index, Vec::new(), branches.len(), now, t);
        }
        StepKind::Foreach { items, .. } => {
            let items = match items.eval(&state.context) {
                Ok(Value::Array(items)) if items.len() <= crate::dsl::LANES_MAX => items,
                Ok(Value::Array(items)) => {
                    let message = format!(
                        "{} items, more than the {} allowed",
                        items.len(),
                        crate::dsl::LANES_MAX
                    );
                    return expression_failed(state, definition, &message, now, t);
                }
                Ok(other) => {
                    let message = format!("foreach items must be an array, not {other}");
                    return expression_failed(state, definition, &message, now, t);
                }
                Err(err) => return expression_failed(state, definition, &err.message, now, t),
            };
            t.events.push(EventKind::StepScheduled {
                step_id,
                attempt,
                input: Some(json!({ "items": items.len() })),
            });
            let StepRef::Main { index } = current else {
                unreachable!("a foreach step is a main step")
            };
            let total = items.len();
            start_fanout(state, definition, index, items, total, now, t);
        }
        StepKind::Switch { cases, default } => {
            let mut taken = cases.len();
            for (index, case) in cases.iter().enumerate() {
                match case.when.eval(&state.context) {
                    Ok(Value::Null | Value::Bool(false)) => {}
                    Ok(_) => {
                        taken = index;
                        break;
                    }
                    Err(err) => return expression_failed(state, definition, &err.message, now, t),
                }
            }
            t.events.push(EventKind::StepScheduled {
                step_id,
                attempt,
                input: Some(json!({ "case": if taken < cases.len() { json!(taken) } else { json!("default") } })),
            });
            let branch = cases.get(taken).map_or(default, |c| &c.steps);
            let StepRef::Main { index } = current else {
                unreachable!("a switch is a main step")
            };
            if branch.is_empty() {
                return complete_step(state, definition, Value::Null, now, t);
            }
            begin(
                state,
                definition,
                StepRef::Branch {
                    index,
                    case: taken,
                    step: 0,
                },
                now,
                t,
            );
        }
        StepKind::Human { escalation, .. } => {
            let spec = match human_task(state, definition, current, attempt) {
                Ok(spec) => spec,
                Err(message) => return expression_failed(state, definition, &message, now, t),
            };
            t.events.push(EventKind::StepScheduled {
                step_id,
                attempt,
                input: Some(spec.input.clone()),
            });
            state.wait = Wait::Task {
                task_id: spec.task_id.clone(),
            };
            t.effects.push(Effect::OfferTask(spec));
            t.effects.extend(timeout_timer);
            if let Some(escalation) = escalation {
                t.effects.push(Effect::StartTimer {
                    timer: TimerId::Escalate {
                        step: current,
                        attempt,
                    },
                    fire_at: now.saturating_add(millis(escalation.after)),
                });
            }
        }
        StepKind::Wait { signal } => {
            t.events.push(EventKind::StepScheduled {
                step_id,
                attempt,
                input: Some(json!({ "signal": signal })),
            });
            let early = state.signals.get_mut(signal).and_then(VecDeque::pop_front);
            if state.signals.get(signal).is_some_and(VecDeque::is_empty) {
                state.signals.remove(signal);
            }
            match early {
                // A signal that arrived before the wait is taken now.
                Some(payload) => complete_step(state, definition, payload, now, t),
                None => {
                    t.effects.extend(timeout_timer);
                    state.wait = Wait::Signal {
                        name: signal.clone(),
                    };
                }
            }
        }
    }
}

/// The task a human step offers: on the human queue, its input what people see.
fn human_task(
    state: &InstanceState,
    definition: &Definition,
    step: StepRef,
    attempt: u32,
) -> Result<TaskSpec, String> {
    let StepKind::Human {
        title,
        assignee,
        group,
        form,
        ..
    } = &step.resolve(definition).kind
    else {
        unreachable!("only human steps have human tasks")
    };
    let title = match title.eval(&state.context).map_err(|err| err.message)? {
        Value::String(text) => text,
        other => other.to_string(),
    };
    let step_id = step.step_id(definition);
    Ok(TaskSpec {
        task_id: task_id(&state.id, &step_id, attempt),
        queue: HUMAN_QUEUE.to_string(),
        idempotency_key: format!("{}:{step_id}", state.id),
        input: json!({
            "title": title,
            "assignee": assignee,
            "group": group,
            "schema": form.as_ref().map(|f| f.schema.clone()),
        }),
        step_id,
        attempt,
        queue_timeout: None,
        heartbeat_timeout: None,
        restorable: false,
    })
}

/// The task of a `task` step's `attempt`, its input evaluated against the context.
fn queue_task(
    state: &InstanceState,
    definition: &Definition,
    step: StepRef,
    attempt: u32,
) -> Result<TaskSpec, EvalError> {
    let resolved = step.resolve(definition);
    let StepKind::Task { queue, input } = &resolved.kind else {
        unreachable!("only task steps have queue tasks")
    };
    let input = input.eval(&state.context)?;
    let step_id = step.step_id(definition);
    Ok(TaskSpec {
        task_id: task_id(&state.id, &step_id, attempt),
        queue: queue.clone(),
        idempotency_key: format!("{}:{step_id}", state.id),
        step_id,
        attempt,
        input,
        queue_timeout: resolved.queue_timeout,
        heartbeat_timeout: resolved.heartbeat_timeout,
        restorable: !matches!(step, StepRef::Lane { .. }),
    })
}

/// Evaluates an HTTP step's request for `attempt` against `context`.
fn http_request(
    step: &Step,
    step_id: &str,
    attempt: u32,
    context: &Value,
) -> Result<HttpRequest, EvalError> {
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
        step_id: step_id.to_string(),
        attempt,
        method: method.clone(),
        url: text(url.eval(context)?),
        headers: evaluated,
        body: body.as_ref().map(|b| b.eval(context)).transpose()?,
        timeout: step.timeout,
    })
}

/// Effects a running instance needs again after its partition is loaded from the
/// store: those not kept in the store's task and timer tables (HTTP calls in flight,
/// and the offers of [restorable](TaskSpec::restorable) tasks, which have no rows).
pub fn resume_effects(state: &InstanceState, definition: &Definition) -> Vec<Effect> {
    if state.status.is_terminal() {
        return Vec::new();
    }
    if state.wait == Wait::Lanes {
        // HTTP calls of lanes: each lane's request, evaluated as when it was made.
        let mut effects = Vec::new();
        let lanes: Vec<usize> = state
            .fanout
            .iter()
            .flat_map(|f| f.lanes.keys().copied())
            .collect();
        for number in lanes {
            let mut copy = state.clone();
            let mut t = Transition::default();
            run_in_lane(&mut copy, definition, number, &mut t, |lane_state, _| {
                effects.extend(resume_effects(lane_state, definition));
            });
        }
        return effects;
    }
    if let Wait::Child { child_id } = &state.wait {
        // The child may not have been started, or its end not reported, before a crash:
        // starting it again is idempotent and reports an end that already happened.
        let current = state.current.expect("a child wait has a current step");
        if let StepKind::Workflow {
            definition: child_definition,
            version,
            input,
        } = &current.resolve(definition).kind
        {
            if let Ok(input) = input.eval(&state.context) {
                return vec![Effect::StartChild {
                    child_id: child_id.clone(),
                    definition: child_definition.clone(),
                    version: *version,
                    input,
                }];
            }
        }
        return Vec::new();
    }
    if let Wait::Task { task_id } = &state.wait {
        let current = state.current.expect("a task wait has a current step");
        if !matches!(current.resolve(definition).kind, StepKind::Task { .. }) {
            return Vec::new();
        }
        return match queue_task(state, definition, current, state.attempt) {
            Ok(spec) if spec.restorable => {
                assert_eq!(
                    &spec.task_id, task_id,
                    "a restored task is the one waited on"
                );
                vec![Effect::OfferTask(spec)]
            }
            // A lane's task has its stored row.
            Ok(_) => Vec::new(),
            // It evaluated when the attempt was scheduled and the context has not changed since.
            Err(err) => unreachable!("a task's input that evaluated once fails now: {err}"),
        };
    }
    if state.wait != Wait::Http {
        return Vec::new();
    }
    let current = state.current.expect("an HTTP wait has a current step");
    let step = current.resolve(definition);
    match http_request(
        step,
        &current.step_id(definition),
        state.attempt,
        &state.context,
    ) {
        Ok(request) => vec![Effect::CallHttp(request)],
        // It evaluated when the attempt was scheduled and the context has not changed since.
        Err(err) => unreachable!("an HTTP request that evaluated once fails now: {err}"),
    }
}

/// The current step completed with `output`.
fn complete_step(
    state: &mut InstanceState,
    definition: &Definition,
    output: Value,
    now: u64,
    t: &mut Transition,
) {
    let current = state.current.expect("a completing step is current");
    cancel_attempt_timers(state, definition, t);
    cancel_step_expiry(state, definition, t);
    t.events.push(EventKind::StepCompleted {
        step_id: current.step_id(definition),
        attempt: state.attempt,
        output: output.clone(),
    });
    state.wait = Wait::Nothing;
    state.current = None;
    match current {
        StepRef::Main { index } => {
            assert_eq!(index, state.cursor);
            assert!(
                !state.completed.contains(&index),
                "a step completes once per run"
            );
            state.set_step_entry(&definition.steps[index].id, output_entry(output));
            state.completed.push(index);
            state.cursor = index + 1;
            advance(state, definition, now, t);
        }
        StepRef::Handler {
            index,
            handler,
            step,
        } => {
            let catch = &definition.steps[index].catch[handler];
            if step + 1 < catch.steps.len() {
                begin(
                    state,
                    definition,
                    StepRef::Handler {
                        index,
                        handler,
                        step: step + 1,
                    },
                    now,
                    t,
                );
                return;
            }
            let error = state
                .caught
                .take()
                .expect("a handler runs for a caught error");
            match catch.then {
                CatchThen::Continue => {
                    // The handler's last output stands in for the step's; the step itself
                    // did not complete, so it has nothing to compensate.
                    state.set_step_entry(&definition.steps[index].id, output_entry(output));
                    state.cursor = index + 1;
                    advance(state, definition, now, t);
                }
                CatchThen::Fail => {
                    state.failed_at = Some(StepRef::Main { index });
                    fail_instance(state, definition, error, now, t, true);
                }
            }
        }
        StepRef::Lane { index, lane, step } => {
            if step + 1 < lane_steps(definition, index, lane).len() {
                begin(
                    state,
                    definition,
                    StepRef::Lane {
                        index,
                        lane,
                        step: step + 1,
                    },
                    now,
                    t,
                );
                return;
            }
            state.lane_result = Some(Ok(output));
        }
        StepRef::Branch { index, case, step } => {
            let StepKind::Switch { cases, default } = &definition.steps[index].kind else {
                unreachable!("branch refs point into switch steps")
            };
            let branch = cases.get(case).map_or(default, |c| &c.steps);
            if step + 1 < branch.len() {
                begin(
                    state,
                    definition,
                    StepRef::Branch {
                        index,
                        case,
                        step: step + 1,
                    },
                    now,
                    t,
                );
                return;
            }
            // The branch is done: the switch step completes with its last output.
            resume_switch(state, index);
            complete_step(state, definition, output, now, t);
        }
        StepRef::Undo { index } => {
            let done = state.compensating.pop();
            assert_eq!(done, Some(index), "compensations run in order");
            next_compensation(state, definition, now, t);
        }
    }
}

/// A step's entry in the context's `steps`: `{"output": output}`, built around the value
/// (`json!` would copy it through a serializer).
fn output_entry(output: Value) -> Value {
    let mut entry = Map::with_capacity(1);
    entry.insert("output".to_string(), output);
    Value::Object(entry)
}

/// Makes the switch step at `index` current again, as it was when its branch began.
fn resume_switch(state: &mut InstanceState, index: usize) {
    let main = StepRef::Main { index };
    let attempt = state
        .attempts
        .get(&main.key())
        .copied()
        .expect("a switch that branched was scheduled");
    state.current = Some(main);
    state.attempt = attempt;
    state.attempt_first = attempt;
    state.wait = Wait::Nothing;
}

/// Runs the next main step, or completes the instance.
fn advance(state: &mut InstanceState, definition: &Definition, now: u64, t: &mut Transition) {
    if state.cursor < definition.steps.len() {
        begin(
            state,
            definition,
            StepRef::Main {
                index: state.cursor,
            },
            now,
            t,
        );
        return;
    }
    let output = match &definition.output {
        None => state.context["steps"][&definition.steps[definition.steps.len() - 1].id]["output"]
            .clone(),
        Some(template) => match template.eval(&state.context) {
            Ok(value) => value,
            Err(err) => {
                let error = ErrorInfo {
                    error_type: ERROR_TYPE_EXPRESSION.to_string(),
                    message: format!("instance output: {err}"),
                };
                return fail_instance(state, definition, error, now, t, false);
            }
        },
    };
    cancel_instance_timers(definition, t);
    end(state, InstanceStatus::Completed, now);
    state.output = Some(output.clone());
    t.events.push(EventKind::InstanceCompleted { output });
}

/// The current attempt failed: retry after a delay, or fail the step.
fn attempt_failed(
    state: &mut InstanceState,
    definition: &Definition,
    error: ErrorInfo,
    retryable: bool,
    now: u64,
    t: &mut Transition,
) {
    cancel_attempt_timers(state, definition, t);
    attempt_failed_after_cancel(state, definition, error, retryable, now, t);
}

fn attempt_failed_after_cancel(
    state: &mut InstanceState,
    definition: &Definition,
    error: ErrorInfo,
    retryable: bool,
    now: u64,
    t: &mut Transition,
) {
    let current = state
        .current
        .expect("a failing attempt belongs to a current step");
    let step_id = current.step_id(definition);
    let attempt = state.attempt;
    t.events.push(EventKind::StepFailed {
        step_id: step_id.clone(),
        attempt,
        error: error.clone(),
        retryable,
    });
    let step = current.resolve(definition);
    let default_policy = RetryPolicy::default();
    let policy = step
        .retry
        .as_ref()
        .or(definition.retry.as_ref())
        .unwrap_or(&default_policy);
    // The policy counts this run's attempts, from 1.
    let run_attempt = attempt - state.attempt_first + 1;
    let delay = policy.delay(run_attempt, jitter_sample(&state.id, &step_id, attempt));
    let elapsed = Duration::from_millis(now.saturating_sub(state.step_started_at));
    if policy.should_retry(run_attempt, &error.error_type, retryable, elapsed, delay) {
        let fire_at = now.saturating_add(millis(delay));
        state.attempt = attempt + 1;
        state.wait = Wait::Retry;
        t.events.push(EventKind::StepRetryScheduled {
            step_id,
            next_attempt: attempt + 1,
            fire_at,
        });
        t.effects.push(Effect::StartTimer {
            timer: TimerId::Retry {
                step: current,
                attempt: attempt + 1,
            },
            fire_at,
        });
        return;
    }
    cancel_step_expiry(state, definition, t);
    step_failed(state, definition, error, now, t);
}

/// The current step failed for good: catch it, or fail the instance.
fn step_failed(
    state: &mut InstanceState,
    definition: &Definition,
    error: ErrorInfo,
    now: u64,
    t: &mut Transition,
) {
    let current = state.current.expect("a failing step is current");
    state.wait = Wait::Nothing;
    match current {
        StepRef::Main { index } => {
            let handler = definition.steps[index]
                .catch
                .iter()
                .position(|c| c.errors.is_empty() || c.errors.contains(&error.error_type));
            if let Some(handler) = handler {
                t.events.push(EventKind::StepCaught {
                    step_id: current.step_id(definition),
                    error: error.clone(),
                    handler,
                });
                let catch = &definition.steps[index].catch[handler];
                state.current = None;
                state.caught = Some(error.clone());
                if catch.steps.is_empty() {
                    state.caught = None;
                    match catch.then {
                        CatchThen::Continue => {
                            state.set_step_entry(
                                &definition.steps[index].id,
                                json!({ "output": null, "error": { "type": error.error_type, "message": error.message } }),
                            );
                            state.cursor = index + 1;
                            advance(state, definition, now, t);
                        }
                        CatchThen::Fail => {
                            state.failed_at = Some(current);
                            fail_instance(state, definition, error, now, t, true);
                        }
                    }
                    return;
                }
                begin(
                    state,
                    definition,
                    StepRef::Handler {
                        index,
                        handler,
                        step: 0,
                    },
                    now,
                    t,
                );
                return;
            }
            state.failed_at = Some(current);
            let error = ErrorInfo {
                error_type: error.error_type,
                message: format!(
                    "step `{}` failed: {}",
                    current.step_id(definition),
                    error.message
                ),
            };
            fail_instance(state, definition, error, now, t, true);
        }
        StepRef::Lane { .. } => {
            // The lane ends; the fan-out's join decides what that means for the step.
            state.current = None;
            state.lane_result = Some(Err(error));
        }
        StepRef::Branch { index, .. } => {
            // A failed branch step fails the switch step, which its own catch may handle.
            resume_switch(state, index);
            step_failed(state, definition, error, now, t);
        }
        StepRef::Handler { .. } => {
            state.failed_at = Some(current);
            let error = ErrorInfo {
                error_type: error.error_type,
                message: format!(
                    "handler step `{}` failed: {}",
                    current.step_id(definition),
                    error.message
                ),
            };
            fail_instance(state, definition, error, now, t, true);
        }
        StepRef::Undo { .. } => {
            // A compensation that exhausted its retries fails the instance; a retry
            // resumes the compensations from this one.
            state.failed_at = Some(current);
            state.current = None;
            cancel_instance_timers(definition, t);
            end(state, InstanceStatus::Failed, now);
            let error = ErrorInfo {
                error_type: error.error_type,
                message: format!(
                    "compensation `{}` failed: {}",
                    current.step_id(definition),
                    error.message
                ),
            };
            state.error = Some(error.clone());
            t.events.push(EventKind::InstanceFailed { error });
        }
    }
}

/// Fails the instance, compensating first when the definition says so.
fn fail_instance(
    state: &mut InstanceState,
    definition: &Definition,
    error: ErrorInfo,
    now: u64,
    t: &mut Transition,
    may_compensate: bool,
) {
    state.current = None;
    state.wait = Wait::Nothing;
    if may_compensate && compensates(definition) {
        return compensate_or_end(
            state,
            definition,
            CompensationReason::Failed { error },
            now,
            t,
        );
    }
    cancel_instance_timers(definition, t);
    end(state, InstanceStatus::Failed, now);
    state.error = Some(error.clone());
    t.events.push(EventKind::InstanceFailed { error });
}

/// Whether failures compensate.
fn compensates(definition: &Definition) -> bool {
    match definition.on_failure {
        Some(OnFailure::Compensate) => true,
        Some(OnFailure::Fail) => false,
        None => definition.steps.iter().any(|s| s.compensate.is_some()),
    }
}

/// Starts compensating the completed steps (reverse completion order), or ends at once
/// when there is nothing to compensate.
fn compensate_or_end(
    state: &mut InstanceState,
    definition: &Definition,
    reason: CompensationReason,
    now: u64,
    t: &mut Transition,
) {
    state.current = None;
    state.wait = Wait::Nothing;
    let pending: Vec<usize> = state
        .completed
        .iter()
        .copied()
        .filter(|&index| definition.steps[index].compensate.is_some())
        .collect();
    // A failure always ends `compensated` when the definition compensates, even with
    // nothing to undo; a cancel with nothing to undo just ends `cancelled`.
    let failed = matches!(reason, CompensationReason::Failed { .. });
    if failed || !pending.is_empty() {
        let order: Vec<String> = pending
            .iter()
            .rev()
            .map(|&i| definition.steps[i].id.clone())
            .collect();
        t.events.push(EventKind::CompensationStarted {
            steps: order,
            reason: match &reason {
                CompensationReason::Failed { error } => {
                    format!("failed: {}: {}", error.error_type, error.message)
                }
                CompensationReason::Cancelled { by } => format!("cancelled by {by}"),
            },
        });
        state.status = InstanceStatus::Compensating;
        state.compensating = pending;
    }
    state.compensation_reason = Some(reason);
    next_compensation(state, definition, now, t);
}

/// Runs the next pending compensation, or ends the instance.
fn next_compensation(
    state: &mut InstanceState,
    definition: &Definition,
    now: u64,
    t: &mut Transition,
) {
    if let Some(&index) = state.compensating.last() {
        begin(state, definition, StepRef::Undo { index }, now, t);
        return;
    }
    cancel_instance_timers(definition, t);
    match state
        .compensation_reason
        .take()
        .expect("compensating has a reason")
    {
        CompensationReason::Failed { error } => {
            end(state, InstanceStatus::Compensated, now);
            state.error = Some(error.clone());
            t.events.push(EventKind::InstanceCompensated { error });
        }
        CompensationReason::Cancelled { by } => {
            end(state, InstanceStatus::Cancelled, now);
            t.events.push(EventKind::InstanceCancelled { by });
        }
    }
}

/// An input expression failed: a bug in the definition, not worth retrying.
fn expression_failed(
    state: &mut InstanceState,
    definition: &Definition,
    message: &str,
    now: u64,
    t: &mut Transition,
) {
    let current = state
        .current
        .expect("expressions are evaluated for a current step");
    let error = ErrorInfo {
        error_type: ERROR_TYPE_EXPRESSION.to_string(),
        message: format!("step `{}`: {message}", current.step_id(definition)),
    };
    attempt_failed_after_cancel(state, definition, error, false, now, t);
}

/// Withdraws the current attempt's task, if it has one.
fn withdraw_attempt(state: &InstanceState, t: &mut Transition) {
    if let Wait::Task { task_id } = &state.wait {
        t.effects.push(Effect::WithdrawTask {
            task_id: task_id.clone(),
        });
    }
    if let Wait::Child { child_id } = &state.wait {
        t.effects.push(Effect::CancelChild {
            child_id: child_id.clone(),
        });
    }
}

/// Stops whatever the current step is doing, and its timers.
fn stop_current_step(state: &mut InstanceState, definition: &Definition, t: &mut Transition) {
    if state.wait == Wait::Lanes {
        stop_lanes(state, definition, t);
    }
    withdraw_attempt(state, t);
    if state.current.is_some() {
        cancel_attempt_timers(state, definition, t);
        cancel_step_expiry(state, definition, t);
    }
    state.current = None;
    state.wait = Wait::Nothing;
}

/// Cancels the timers of the current attempt (its timeout, its sleep, the retry wait).
fn cancel_attempt_timers(state: &InstanceState, definition: &Definition, t: &mut Transition) {
    let Some(step) = state.current else { return };
    let attempt = state.attempt;
    t.effects.push(Effect::CancelTimer {
        timer: TimerId::AttemptTimeout { step, attempt },
    });
    if let StepKind::Human {
        escalation: Some(_),
        ..
    } = &step.resolve(definition).kind
    {
        t.effects.push(Effect::CancelTimer {
            timer: TimerId::Escalate { step, attempt },
        });
    }
    match state.wait {
        Wait::Sleep => t.effects.push(Effect::CancelTimer {
            timer: TimerId::Sleep { step, attempt },
        }),
        Wait::Retry => t.effects.push(Effect::CancelTimer {
            timer: TimerId::Retry { step, attempt },
        }),
        _ => {}
    }
}

fn cancel_step_expiry(state: &InstanceState, definition: &Definition, t: &mut Transition) {
    let Some(step) = state.current else { return };
    let declared = step.resolve(definition);
    if declared.step_timeout.is_some() || declared.deadline.is_some() {
        t.effects.push(Effect::CancelTimer {
            timer: TimerId::StepExpiry {
                step,
                attempt_first: state.attempt_first,
            },
        });
    }
}

fn cancel_instance_timers(definition: &Definition, t: &mut Transition) {
    if definition.timeout.is_some() {
        t.effects.push(Effect::CancelTimer {
            timer: TimerId::InstanceTimeout,
        });
    }
    if definition.deadline.is_some() {
        t.effects.push(Effect::CancelTimer {
            timer: TimerId::InstanceDeadline,
        });
    }
}

fn end(state: &mut InstanceState, status: InstanceStatus, now: u64) {
    assert!(status.is_terminal());
    state.status = status;
    state.current = None;
    state.wait = Wait::Nothing;
    state.paused_from = None;
    state.updated_at = now;
}

fn eval_deadline(template: &crate::expr::Template, context: &Value) -> Result<u64, String> {
    let value = template.eval(context).map_err(|err| err.message)?;
    crate::deadline::deadline_ms(&value)
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
