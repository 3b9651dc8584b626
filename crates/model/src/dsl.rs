//! The workflow definition language: types, parsing and validation.
//!
//! A definition is written in YAML (JSON is accepted, being a subset of YAML).
//! Parsing reports every problem found, each with a line and a column, rather
//! than stopping at the first.

use std::time::Duration;

use crate::expr::Template;
use crate::retry::RetryPolicy;

/// Largest definition source accepted, in bytes.
///
/// Definitions are held in memory by every partition that runs them; a bound keeps a
/// typo (a pasted data file) from exhausting memory.
pub const DEFINITION_SIZE_MAX: usize = 1024 * 1024;

/// Most steps one definition may contain, so that an instance's state stays small.
pub const STEPS_COUNT_MAX: usize = 1000;

/// A validated workflow definition, ready to run.
#[derive(Debug, Clone)]
pub struct Definition {
    /// The definition's name; versions share it.
    pub name: String,
    /// Bound on the whole instance, from its start.
    pub timeout: Option<Duration>,
    /// Default retry policy for every step that declares none.
    pub retry: Option<RetryPolicy>,
    /// The steps, run in order.
    pub steps: Vec<Step>,
    /// The instance's output, evaluated once every step has completed.
    /// Without it, the output is the last step's output.
    pub output: Option<Template>,
}

/// One step of a definition.
#[derive(Debug, Clone)]
pub struct Step {
    /// Unique within the definition; `.steps.<id>.output` refers to it.
    pub id: String,
    /// What the step does.
    pub kind: StepKind,
    /// Per-attempt bound (start to close).
    pub timeout: Option<Duration>,
    /// This step's retry policy, overriding the definition's.
    pub retry: Option<RetryPolicy>,
}

/// What a step does.
#[derive(Debug, Clone)]
pub enum StepKind {
    /// Hand a task to a worker polling `queue`.
    Task {
        /// The task queue's name.
        queue: String,
        /// The task's input.
        input: Template,
    },
    /// Make an HTTP call; the response is the step's output.
    Http {
        /// HTTP method, upper case (`GET`, `POST`, ...).
        method: String,
        /// Target URL.
        url: Template,
        /// Request headers, in declaration order.
        headers: Vec<(String, Template)>,
        /// Request body, sent as JSON when present.
        body: Option<Template>,
    },
    /// Wait durably for a duration.
    Sleep {
        /// How long to wait.
        duration: Duration,
    },
}

/// One problem found in a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, 0 when the problem has no position (e.g. an empty document).
    pub line: usize,
    /// 1-based column, 0 when the problem has no position.
    pub column: usize,
    /// A short reason, lower case, no final period.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

impl Definition {
    /// Looks a step up by id.
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// The index of a step by id.
    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }
}

// `parse` (below, written by the parser) turns source text into a `Definition`
// or every `Problem` it found.
