//! Events: the append-only history of every instance.
//!
//! An event record is a stored format (it is what backups and replication
//! carry), so it is versioned on purpose: `EVENT_FORMAT_VERSION` goes up when a
//! field changes meaning, and readers of older versions keep working.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version of the serialized event payload.
pub const EVENT_FORMAT_VERSION: u32 = 1;

/// An error as it travels through steps and instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Machine-readable error type (`timeout`, `card_declined`, ...).
    #[serde(rename = "type")]
    pub error_type: String,
    /// Human-readable detail.
    pub message: String,
}

/// One event of an instance's history, without its log position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The instance was accepted.
    InstanceStarted {
        /// The instance this one restarts, if any.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        restarted_from: Option<String>,
        /// Who asked for the restart.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        restarted_by: Option<String>,
        /// Definition name.
        definition: String,
        /// Definition version.
        version: u32,
        /// The instance's input.
        input: Value,
    },
    /// An attempt of a step was scheduled (a task offered, a call made, a timer set).
    StepScheduled {
        /// The step.
        step_id: String,
        /// 1-based attempt number.
        attempt: u32,
        /// The evaluated input (tasks), or request (HTTP calls).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        input: Option<Value>,
    },
    /// An attempt of a step completed; its output is now the step's output.
    StepCompleted {
        /// The step.
        step_id: String,
        /// The attempt that completed.
        attempt: u32,
        /// The step's output.
        output: Value,
    },
    /// An attempt of a step failed.
    StepFailed {
        /// The step.
        step_id: String,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        error: ErrorInfo,
        /// Whether the failure could have been retried.
        retryable: bool,
    },
    /// A failed step will be tried again at `at`.
    StepRetryScheduled {
        /// The step.
        step_id: String,
        /// The attempt that will run.
        next_attempt: u32,
        /// When it will run (ms since the Unix epoch).
        fire_at: u64,
    },
    /// A `sleep` step started its durable timer.
    TimerStarted {
        /// The step.
        step_id: String,
        /// When it fires (ms since the Unix epoch).
        fire_at: u64,
    },
    /// A `sleep` step's timer fired.
    TimerFired {
        /// The step.
        step_id: String,
    },
    /// Every step completed.
    InstanceCompleted {
        /// The instance's output.
        output: Value,
    },
    /// The instance failed.
    InstanceFailed {
        /// Why.
        error: ErrorInfo,
    },
    /// The instance was cancelled (after its compensations, if any).
    InstanceCancelled {
        /// Who asked.
        by: String,
    },
    /// Someone asked to cancel; compensations run first when there are any.
    CancelRequested {
        /// Who asked.
        by: String,
    },
    /// The instance was ended at once, without compensation.
    InstanceTerminated {
        /// Who asked.
        by: String,
        /// Why.
        reason: String,
    },
    /// The instance started undoing its completed steps, in reverse completion order.
    CompensationStarted {
        /// Steps whose compensation will run, in the order they will run.
        steps: Vec<String>,
        /// Why: the error, or the cancellation.
        reason: String,
    },
    /// Every compensation ran; the instance ended compensated.
    InstanceCompensated {
        /// The error that caused the compensation.
        error: ErrorInfo,
    },
    /// A step's failure was caught by one of its handlers.
    StepCaught {
        /// The step.
        step_id: String,
        /// The error caught.
        error: ErrorInfo,
        /// Index of the handler that matched.
        handler: usize,
    },
    /// The instance was paused: no new attempt starts until it is resumed.
    InstancePaused {
        /// Who asked.
        by: String,
    },
    /// The instance was resumed.
    InstanceResumed {
        /// Who asked.
        by: String,
    },
    /// A failed instance resumes from its failed step.
    InstanceRetried {
        /// Who asked.
        by: String,
        /// The step it resumes from.
        step_id: String,
    },
    /// An instance runs again from a chosen step.
    InstanceRerun {
        /// Who asked.
        by: String,
        /// The step it runs from.
        step_id: String,
    },
    /// A human task was given to someone else: nobody completed it in time.
    HumanTaskEscalated {
        /// The step.
        step_id: String,
        /// The new assignee.
        assignee: Option<String>,
        /// The new group.
        group: Option<String>,
    },
    /// A signal arrived (kept until a `wait` step takes it).
    SignalReceived {
        /// The signal's name.
        name: String,
        /// Its payload.
        payload: Value,
    },
}

impl EventKind {
    /// The event's type name, as stored and shown in histories.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::InstanceStarted { .. } => "instance_started",
            EventKind::StepScheduled { .. } => "step_scheduled",
            EventKind::StepCompleted { .. } => "step_completed",
            EventKind::StepFailed { .. } => "step_failed",
            EventKind::StepRetryScheduled { .. } => "step_retry_scheduled",
            EventKind::TimerStarted { .. } => "timer_started",
            EventKind::TimerFired { .. } => "timer_fired",
            EventKind::InstanceCompleted { .. } => "instance_completed",
            EventKind::InstanceFailed { .. } => "instance_failed",
            EventKind::InstanceCancelled { .. } => "instance_cancelled",
            EventKind::CancelRequested { .. } => "cancel_requested",
            EventKind::InstanceTerminated { .. } => "instance_terminated",
            EventKind::CompensationStarted { .. } => "compensation_started",
            EventKind::InstanceCompensated { .. } => "instance_compensated",
            EventKind::StepCaught { .. } => "step_caught",
            EventKind::InstancePaused { .. } => "instance_paused",
            EventKind::InstanceResumed { .. } => "instance_resumed",
            EventKind::InstanceRetried { .. } => "instance_retried",
            EventKind::InstanceRerun { .. } => "instance_rerun",
            EventKind::SignalReceived { .. } => "signal_received",
            EventKind::HumanTaskEscalated { .. } => "human_task_escalated",
        }
    }
}

/// An event with its place in its partition's log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Position in the partition's log; contiguous, starting at 1.
    pub seq: u64,
    /// The instance it belongs to.
    pub instance_id: String,
    /// When it happened (ms since the Unix epoch).
    pub at: u64,
    /// What happened.
    pub kind: EventKind,
}
