//! The workflow definition language: types, parsing and validation.
//!
//! A definition is written in YAML (JSON is accepted, being a subset of YAML).
//! Parsing reports every problem found, each with a line and a column, rather
//! than stopping at the first.

use std::collections::HashMap;
use std::time::Duration;

use saphyr_parser::{Event, Parser, ScalarStyle, Tag};
use serde_json::Value;

use crate::duration;
use crate::expr::{self, Expr, Template};
use crate::retry::{Backoff, Jitter, RetryPolicy};

/// Largest definition source accepted, in bytes.
///
/// Definitions are held in memory by every partition that runs them; a bound keeps a
/// typo (a pasted data file) from exhausting memory.
pub const DEFINITION_SIZE_MAX: usize = 1024 * 1024;

/// Most steps one definition may contain, so that an instance's state stays small.
pub const STEPS_COUNT_MAX: usize = 1000;

/// Longest name (of a definition, a step or a queue), in characters.
pub const NAME_LENGTH_MAX: usize = 128;

/// Deepest nesting of YAML collections, aliases expanded.
///
/// Templates are built and evaluated recursively; a bound keeps a hostile document
/// from overflowing the stack.
pub const YAML_DEPTH_MAX: usize = 64;

/// Most YAML nodes in a definition, aliases expanded, so that a small document of
/// nested aliases (a "billion laughs") cannot expand to gigabytes.
pub const YAML_NODES_MAX: usize = 100_000;

/// The HTTP methods an `http` step may use.
pub const HTTP_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// The kinds of step, each the key that introduces it.
pub const STEP_KINDS: [&str; 11] = [
    "task", "http", "sleep", "set", "fail", "wait", "human", "switch", "parallel", "foreach",
    "workflow",
];

const DEFINITION_KEYS: [&str; 8] = [
    "name",
    "description",
    "timeout",
    "deadline",
    "on_failure",
    "retry",
    "steps",
    "output",
];
const STEP_KEYS: [&str; 21] = [
    "workflow",
    "parallel",
    "foreach",
    "switch",
    "human",
    "id",
    "task",
    "http",
    "sleep",
    "set",
    "fail",
    "wait",
    "input",
    "timeout",
    "queue_timeout",
    "heartbeat_timeout",
    "step_timeout",
    "deadline",
    "retry",
    "compensate",
    "catch",
];
/// Keys of a `compensate:` block: a step without an id.
const COMPENSATE_KEYS: [&str; 10] = [
    "task",
    "http",
    "sleep",
    "set",
    "fail",
    "wait",
    "input",
    "timeout",
    "retry",
    "step_timeout",
];
const FAIL_KEYS: [&str; 2] = ["type", "message"];
const SWITCH_KEYS: [&str; 2] = ["cases", "default"];
const WORKFLOW_KEYS: [&str; 3] = ["definition", "version", "input"];
const PARALLEL_KEYS: [&str; 2] = ["branches", "join"];
const BRANCH_KEYS: [&str; 1] = ["steps"];
const FOREACH_KEYS: [&str; 3] = ["items", "concurrency", "steps"];

/// Most branches of a `parallel` and most items of a `foreach`: every lane is part of
/// the instance's state.
pub const LANES_MAX: usize = 10_000;

/// When a `parallel` step is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// Every branch completed (the first failure fails the step).
    All,
    /// One branch completed (the others are stopped); fails when all failed.
    Any,
    /// This many branches completed (the others are stopped); fails when too few can.
    Count(usize),
}
const CASE_KEYS: [&str; 2] = ["when", "steps"];

/// One case of a `switch`.
#[derive(Debug, Clone)]
pub struct Case {
    /// The condition: the case is taken when it is neither `null` nor `false`.
    pub when: Template,
    /// Steps run when it is taken (leaf step kinds, in order).
    pub steps: Vec<Step>,
}
const HUMAN_KEYS: [&str; 5] = ["title", "assignee", "group", "schema", "escalation"];
const ESCALATION_KEYS: [&str; 4] = ["after", "reassign_to", "reassign_group", "fail"];

/// The task queue of human tasks; `~` keeps it out of reach of workers' polls.
pub const HUMAN_QUEUE: &str = "~human";

/// A JSON Schema for a human task's form, compiled once.
#[derive(Clone)]
pub struct FormSchema {
    /// The schema as written.
    pub schema: Value,
    validator: std::sync::Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for FormSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FormSchema({})", self.schema)
    }
}

impl FormSchema {
    /// Compiles a schema, or says why it is not one.
    pub fn compile(schema: Value) -> Result<FormSchema, String> {
        let validator = jsonschema::validator_for(&schema).map_err(|err| err.to_string())?;
        Ok(FormSchema {
            schema,
            validator: std::sync::Arc::new(validator),
        })
    }

    /// Every problem of `data`, each as (JSON pointer, message); empty when valid.
    pub fn check(&self, data: &Value) -> Vec<(String, String)> {
        self.validator
            .iter_errors(data)
            .map(|err| (err.instance_path.to_string(), err.to_string()))
            .collect()
    }
}

/// What happens when a human task is not completed in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EscalationAction {
    /// Give the task to someone else.
    Reassign {
        /// The new assignee.
        assignee: Option<String>,
        /// The new group.
        group: Option<String>,
    },
    /// Fail the step with error type `timeout`.
    Fail,
}

/// A human task's escalation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    /// How long after the task is offered.
    pub after: Duration,
    /// What then.
    pub action: EscalationAction,
}
const CATCH_KEYS: [&str; 3] = ["errors", "steps", "then"];

/// Most compensating or catching levels: a compensation or handler step cannot itself
/// declare one, which keeps undo and recovery one level deep.
pub const CATCH_HANDLERS_MAX: usize = 16;

/// What happens when an instance fails (after retries, uncaught).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Run the compensations of completed steps in reverse completion order.
    Compensate,
    /// Fail at once.
    Fail,
}

/// What a catch handler does after its steps ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchThen {
    /// Go on with the step after the failed one; the handler's last output is the step's output.
    Continue,
    /// Fail the instance with the caught error.
    Fail,
}

/// A catch handler of a step.
#[derive(Debug, Clone)]
pub struct Catch {
    /// Error types it matches; empty matches all.
    pub errors: Vec<String>,
    /// Steps run when it matches, in order (leaf kinds only).
    pub steps: Vec<Step>,
    /// What then.
    pub then: CatchThen,
}
const HTTP_KEYS: [&str; 4] = ["method", "url", "headers", "body"];
const RETRY_KEYS: [&str; 9] = [
    "max_attempts",
    "backoff",
    "interval",
    "initial_interval",
    "multiplier",
    "max_interval",
    "jitter",
    "max_duration",
    "non_retryable",
];

/// A validated workflow definition, ready to run.
#[derive(Debug, Clone)]
pub struct Definition {
    /// The definition's name; versions share it.
    pub name: String,
    /// Bound on the whole instance, from its start.
    pub timeout: Option<Duration>,
    /// Absolute bound on the whole instance: an RFC 3339 timestamp, or an expression
    /// over the input yielding one (or ms since the Unix epoch).
    pub deadline: Option<Template>,
    /// What a failure does; `None` means compensate when any step declares a compensation.
    pub on_failure: Option<OnFailure>,
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
    /// Bound on waiting for a worker to take the task (task steps).
    pub queue_timeout: Option<Duration>,
    /// Bound between a running task's heartbeats (task steps).
    pub heartbeat_timeout: Option<Duration>,
    /// Bound on the whole step, retries included.
    pub step_timeout: Option<Duration>,
    /// Absolute bound on the step: RFC 3339, or an expression yielding one.
    pub deadline: Option<Template>,
    /// The step's undo, run when the instance compensates and this step had completed.
    pub compensate: Option<Box<Step>>,
    /// Handlers of this step's failure (after its retries), tried in order.
    pub catch: Vec<Catch>,
}

impl Step {
    /// A step of `kind` with every option unset.
    pub fn new(id: impl Into<String>, kind: StepKind) -> Step {
        Step {
            id: id.into(),
            kind,
            timeout: None,
            retry: None,
            queue_timeout: None,
            heartbeat_timeout: None,
            step_timeout: None,
            deadline: None,
            compensate: None,
            catch: Vec::new(),
        }
    }
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
    /// Set instance variables: the object is merged into `.vars`; the step's output is it.
    Set {
        /// An object template.
        vars: Template,
    },
    /// End the instance with an error (compensating first when it compensates).
    Fail {
        /// Error type.
        error_type: String,
        /// Message template (a string, or anything rendered as JSON).
        message: Template,
    },
    /// Wait for a named signal; its payload is the step's output. `timeout` bounds the wait.
    Wait {
        /// The signal's name.
        signal: String,
    },
    /// Runs the steps of the first case whose condition holds, or the default steps; the
    /// last of them gives the step's output (`null` when none ran).
    Switch {
        /// The cases, tried in order.
        cases: Vec<Case>,
        /// Steps run when no case holds.
        default: Vec<Step>,
    },
    /// Runs branches at once; the output is the completed branches' outputs, in branch
    /// order (`any`: the winning branch's output).
    Parallel {
        /// Each branch's steps (leaf kinds, in order).
        branches: Vec<Vec<Step>>,
        /// When the step is done.
        join: Join,
    },
    /// Runs `steps` once per item of `items`, at most `concurrency` at a time; `.item` is
    /// the item. The output is the array of each item's last output, in item order.
    Foreach {
        /// An expression yielding an array.
        items: Template,
        /// Most items in progress at once.
        concurrency: usize,
        /// Steps run per item (leaf kinds, in order).
        steps: Vec<Step>,
    },
    /// Runs a child instance of another definition and waits for its end; its output is
    /// the step's output, its failure the step's failure, and cancelling the step cancels it.
    Workflow {
        /// The child's definition.
        definition: String,
        /// Its version; the latest when the step starts if `None`.
        version: Option<u32>,
        /// The child's input.
        input: Template,
    },
    /// A task for people: completed through the API with form data (`{"by", "data"}` is
    /// the step's output). `timeout` bounds it.
    Human {
        /// What to do, shown to people (a template).
        title: Template,
        /// Who should do it.
        assignee: Option<String>,
        /// Which group may do it.
        group: Option<String>,
        /// The form's JSON Schema; data that does not match is refused.
        form: Option<FormSchema>,
        /// Escalation when nobody completes it in time.
        escalation: Option<Escalation>,
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

/// Whether `text` is a valid definition name, step id or queue name:
/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
pub fn is_valid_name(text: &str) -> bool {
    let mut bytes = text.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && text.len() <= NAME_LENGTH_MAX
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Parses and validates a definition written in YAML or JSON.
///
/// On failure, returns every problem found, ordered by position, so that a user
/// fixes them in one round. Callers prefix a file name when they have one.
pub fn parse(source: &str) -> Result<Definition, Vec<Problem>> {
    if source.len() > DEFINITION_SIZE_MAX {
        return Err(vec![Problem {
            line: 0,
            column: 0,
            message: format!(
                "definition is {} bytes, more than the {DEFINITION_SIZE_MAX} allowed",
                source.len()
            ),
        }]);
    }
    let mut checker = Checker::default();
    let Some(root) = load(source, &mut checker.problems) else {
        if checker.problems.is_empty() {
            checker.problems.push(Problem {
                line: 0,
                column: 0,
                message: "empty definition".to_string(),
            });
        }
        return Err(checker.problems);
    };
    let definition = checker.definition(&root);
    let mut problems = checker.problems;
    if problems.is_empty() {
        return Ok(definition);
    }
    // Stable: problems at one position keep the order they were found in.
    problems.sort_by_key(|p| (p.line, p.column));
    Err(problems)
}

// ---------------------------------------------------------------------------
// YAML to a tree of positioned nodes
// ---------------------------------------------------------------------------

/// A YAML node with the 1-based position where it starts.
///
/// Built from the parser's events rather than taken from a YAML library's document
/// type so that every key keeps its position and duplicate keys are seen, not merged.
#[derive(Debug, Clone)]
struct Node {
    line: usize,
    column: usize,
    data: Data,
}

#[derive(Debug, Clone)]
enum Data {
    Null,
    Bool(bool),
    /// Wide enough for every i64 and u64, which JSON numbers can hold exactly.
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// What the node is, for "expected …, found …".
    fn describe(&self) -> &'static str {
        match self.data {
            Data::Null => "null",
            Data::Bool(_) => "a boolean",
            Data::Int(_) => "an integer",
            Data::Float(_) => "a number",
            Data::Str(_) => "a string",
            Data::Seq(_) => "a sequence",
            Data::Map(_) => "a mapping",
        }
    }

    /// The node as plain JSON (no expressions).
    fn to_json(&self) -> Value {
        match &self.data {
            Data::Null => Value::Null,
            Data::Bool(b) => Value::Bool(*b),
            Data::Int(i) => int_json(*i),
            Data::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Data::Str(s) => Value::String(s.clone()),
            Data::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Data::Map(entries) => Value::Object(
                entries
                    .iter()
                    .filter_map(|(k, v)| Some((scalar_text(k)?, v.to_json())))
                    .collect(),
            ),
        }
    }

    /// Nodes in this subtree, and its depth.
    fn measure(&self) -> (usize, usize) {
        match &self.data {
            Data::Seq(items) => items.iter().fold((1, 1), |(n, d), item| {
                let (n2, d2) = item.measure();
                (n + n2, d.max(d2 + 1))
            }),
            Data::Map(entries) => entries.iter().fold((1, 1), |(n, d), (k, v)| {
                let (nk, dk) = k.measure();
                let (nv, dv) = v.measure();
                (n + nk + nv, d.max(dk.max(dv) + 1))
            }),
            _ => (1, 1),
        }
    }
}

fn int_json(i: i128) -> Value {
    if let Ok(i) = i64::try_from(i) {
        Value::from(i)
    } else if let Ok(u) = u64::try_from(i) {
        Value::from(u)
    } else {
        serde_json::Number::from_f64(i as f64).map_or(Value::Null, Value::Number)
    }
}

/// The text of a scalar used as a mapping key; JSON keys are strings, so `1: x` has key `1`.
fn scalar_text(node: &Node) -> Option<String> {
    match &node.data {
        Data::Str(s) => Some(s.clone()),
        Data::Null => Some("null".to_string()),
        Data::Bool(b) => Some(b.to_string()),
        Data::Int(i) => Some(i.to_string()),
        Data::Float(f) => Some(f.to_string()),
        Data::Seq(_) | Data::Map(_) => None,
    }
}

enum Frame {
    Seq(Node, usize),
    /// The mapping, its anchor, and a key waiting for its value.
    Map(Node, usize, Option<Node>),
}

fn problem(line: usize, column: usize, message: impl Into<String>) -> Problem {
    Problem {
        line,
        column,
        message: message.into(),
    }
}

/// Builds the tree of the source's single document, recording problems. `None`
/// when there is no document or it cannot be read at all.
fn load(source: &str, problems: &mut Vec<Problem>) -> Option<Node> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, (Node, usize, usize)> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    let mut nodes = 0usize;
    for event in Parser::new_from_str(source) {
        let (event, span) = match event {
            Ok(event) => event,
            Err(error) => {
                let at = error.marker();
                problems.push(problem(
                    at.line(),
                    at.col() + 1,
                    format!("invalid yaml: {}", error.info()),
                ));
                return None;
            }
        };
        let (line, column) = (span.start.line(), span.start.col() + 1);
        let new = |data| Node { line, column, data };
        let (node, anchor) = match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    problems.push(problem(line, column, "only one yaml document is allowed"));
                    return None;
                }
                continue;
            }
            Event::Scalar(text, style, anchor, tag) => {
                let data = match scalar(&text, style, tag.as_deref()) {
                    Ok(data) => data,
                    Err(message) => {
                        problems.push(problem(line, column, message));
                        Data::Str(text.into_owned())
                    }
                };
                nodes += 1;
                (new(data), anchor)
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if stack.len() >= YAML_DEPTH_MAX {
                    problems.push(problem(
                        line,
                        column,
                        format!("yaml nests deeper than {YAML_DEPTH_MAX} levels"),
                    ));
                    return None;
                }
                nodes += 1;
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq(new(Data::Seq(Vec::new())), anchor)
                } else {
                    Frame::Map(new(Data::Map(Vec::new())), anchor, None)
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq(node, anchor) | Frame::Map(node, anchor, _)) => (node, anchor),
                None => continue,
            },
            Event::Alias(id) => {
                let Some((node, size, depth)) = anchors.get(&id) else {
                    problems.push(problem(line, column, "unknown yaml alias"));
                    return None;
                };
                if stack.len() + depth > YAML_DEPTH_MAX {
                    problems.push(problem(
                        line,
                        column,
                        format!("yaml nests deeper than {YAML_DEPTH_MAX} levels"),
                    ));
                    return None;
                }
                nodes += size;
                (node.clone(), 0)
            }
            _ => continue,
        };
        if nodes > YAML_NODES_MAX {
            problems.push(problem(
                line,
                column,
                format!("yaml has more than {YAML_NODES_MAX} nodes, aliases expanded"),
            ));
            return None;
        }
        if anchor != 0 {
            let (size, depth) = node.measure();
            anchors.insert(anchor, (node.clone(), size, depth));
        }
        match stack.last_mut() {
            Some(Frame::Seq(parent, _)) => {
                if let Data::Seq(items) = &mut parent.data {
                    items.push(node);
                }
            }
            Some(Frame::Map(parent, _, pending)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => {
                    if let Data::Map(entries) = &mut parent.data {
                        entries.push((key, node));
                    }
                }
            },
            None => root = Some(node),
        }
    }
    root
}

/// Resolves a scalar by the YAML 1.2 core schema: quoted scalars are strings, plain
/// ones may be null, booleans or numbers.
fn scalar(text: &str, style: ScalarStyle, tag: Option<&Tag>) -> Result<Data, String> {
    if let Some(tag) = tag {
        return match (tag.is_yaml_core_schema(), tag.suffix.as_str()) {
            (true, "str") => Ok(Data::Str(text.to_string())),
            (true, "null" | "bool" | "int" | "float") => Ok(plain(text)),
            // The non-specific tag `!`: a string.
            (false, "") if tag.handle == "!" => Ok(Data::Str(text.to_string())),
            (true, suffix) => Err(format!("unsupported yaml tag `!!{suffix}`")),
            _ => Err(format!(
                "unsupported yaml tag `{}{}`",
                tag.handle, tag.suffix
            )),
        };
    }
    if style != ScalarStyle::Plain {
        return Ok(Data::Str(text.to_string()));
    }
    Ok(plain(text))
}

fn plain(text: &str) -> Data {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Data::Null,
        "true" | "True" | "TRUE" => return Data::Bool(true),
        "false" | "False" | "FALSE" => return Data::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Data::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Data::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Data::Float(f64::NAN),
        _ => {}
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<i128>() {
            Ok(i) => Data::Int(i),
            Err(_) => Data::Float(text.parse().unwrap_or(f64::NAN)),
        };
    }
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(i) = i128::from_str_radix(hex, 16) {
            return Data::Int(i);
        }
    }
    if let Some(octal) = text.strip_prefix("0o") {
        if let Ok(i) = i128::from_str_radix(octal, 8) {
            return Data::Int(i);
        }
    }
    if is_float(unsigned) {
        if let Ok(f) = text.parse::<f64>() {
            return Data::Float(f);
        }
    }
    Data::Str(text.to_string())
}

/// `(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`, the core schema's float without sign.
fn is_float(text: &str) -> bool {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], Some(&text[at + 1..])),
        None => (text, None),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => {
            digits(whole) && digits(fraction) && !(whole.is_empty() && fraction.is_empty())
        }
        None => !mantissa.is_empty() && digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// A mapping entry whose key is a scalar.
struct Entry<'n> {
    key: String,
    key_node: &'n Node,
    value: &'n Node,
}

fn get<'a, 'n>(entries: &'a [Entry<'n>], key: &str) -> Option<&'a Entry<'n>> {
    entries.iter().find(|e| e.key == key)
}

/// A literal `.steps.<id>` path in an expression, checked once all ids are known.
struct Reference {
    line: usize,
    column: usize,
    step: String,
    /// Index of the step whose expression it is; `None` for the definition's output.
    from: Option<usize>,
}

#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
    references: Vec<Reference>,
}

impl Checker {
    fn report(&mut self, node: &Node, message: impl Into<String>) {
        self.problems.push(problem(node.line, node.column, message));
    }

    fn expected(&mut self, node: &Node, what: &str) {
        self.report(node, format!("expected {what}, found {}", node.describe()));
    }

    /// The entries of a mapping; reports a non-mapping, non-scalar keys and duplicate
    /// keys (keeping the first).
    fn mapping<'n>(&mut self, node: &'n Node) -> Option<Vec<Entry<'n>>> {
        let Data::Map(pairs) = &node.data else {
            self.expected(node, "a mapping");
            return None;
        };
        let mut entries: Vec<Entry<'n>> = Vec::with_capacity(pairs.len());
        for (key_node, value) in pairs {
            let Some(key) = scalar_text(key_node) else {
                self.report(key_node, "mapping keys must be scalars");
                continue;
            };
            if let Some(first) = get(&entries, &key) {
                let line = first.key_node.line;
                self.report(
                    key_node,
                    format!("duplicate key `{key}` (first at line {line})"),
                );
                continue;
            }
            entries.push(Entry {
                key,
                key_node,
                value,
            });
        }
        Some(entries)
    }

    fn unknown_keys(&mut self, entries: &[Entry<'_>], known: &[&str]) {
        for entry in entries {
            if !known.contains(&entry.key.as_str()) {
                let hint = suggest(&entry.key, known);
                self.report(entry.key_node, format!("unknown key `{}`{hint}", entry.key));
            }
        }
    }

    fn require<'a, 'n>(
        &mut self,
        node: &Node,
        entries: &'a [Entry<'n>],
        key: &str,
    ) -> Option<&'a Entry<'n>> {
        let entry = get(entries, key);
        if entry.is_none() {
            self.report(node, format!("missing key `{key}`"));
        }
        entry
    }

    fn string<'n>(&mut self, node: &'n Node) -> Option<&'n str> {
        match &node.data {
            Data::Str(s) => Some(s),
            _ => {
                self.expected(node, "a string");
                None
            }
        }
    }

    /// A name, step id or queue name.
    fn name(&mut self, node: &Node, what: &str) -> Option<String> {
        let text = self.string(node)?;
        if text.is_empty() {
            self.report(node, format!("empty {what}"));
            return None;
        }
        if !is_valid_name(text) {
            self.report(
                node,
                format!(
                    "bad {what} `{text}`: use letters, digits, `_`, `.` and `-`, \
                     starting with a letter or digit, at most {NAME_LENGTH_MAX} characters"
                ),
            );
            return None;
        }
        Some(text.to_string())
    }

    fn duration(&mut self, node: &Node) -> Option<Duration> {
        let Data::Str(text) = &node.data else {
            self.expected(node, "a duration such as `30s`");
            return None;
        };
        match duration::parse(text) {
            Ok(d) => Some(d),
            Err(reason) => {
                self.report(node, reason);
                None
            }
        }
    }

    /// A timeout: a duration that is not zero.
    fn timeout(&mut self, node: &Node) -> Option<Duration> {
        let d = self.duration(node)?;
        if d.is_zero() {
            self.report(node, "timeout must be more than zero");
            return None;
        }
        Some(d)
    }

    /// Builds a template, compiling expressions and noting their step references.
    fn template(&mut self, node: &Node, from: Option<usize>) -> Template {
        match &node.data {
            Data::Str(text) => match expr::embedded(text) {
                Some(source) => self.expression(node, source, from).map_or_else(
                    // Never used: the definition is rejected.
                    || Template::Literal(Value::Null),
                    Template::Expr,
                ),
                None => Template::Literal(Value::String(text.clone())),
            },
            Data::Seq(items) => {
                Template::array(items.iter().map(|item| self.template(item, from)).collect())
            }
            Data::Map(_) => {
                let entries = self.mapping(node).unwrap_or_default();
                Template::object(
                    entries
                        .iter()
                        .map(|e| (e.key.clone(), self.template(e.value, from)))
                        .collect(),
                )
            }
            _ => Template::Literal(node.to_json()),
        }
    }

    fn expression(&mut self, node: &Node, source: &str, from: Option<usize>) -> Option<Expr> {
        match Expr::compile(source) {
            Ok(expr) => {
                for step in expr.step_references() {
                    self.references.push(Reference {
                        line: node.line,
                        column: node.column,
                        step,
                        from,
                    });
                }
                Some(expr)
            }
            Err(reason) => {
                self.report(node, format!("bad expression `{source}`: {reason}"));
                // `.steps.cool-off` fails as `.steps.cool - off`; the reference check
                // explains why.
                for step in expr::step_references(source) {
                    self.references.push(Reference {
                        line: node.line,
                        column: node.column,
                        step,
                        from,
                    });
                }
                None
            }
        }
    }

    fn definition(&mut self, root: &Node) -> Definition {
        let mut definition = Definition {
            name: String::new(),
            timeout: None,
            deadline: None,
            on_failure: None,
            retry: None,
            steps: Vec::new(),
            output: None,
        };
        let Data::Map(_) = root.data else {
            self.report(
                root,
                format!(
                    "expected a mapping at the top level, found {}",
                    root.describe()
                ),
            );
            return definition;
        };
        let entries = self.mapping(root).unwrap_or_default();
        self.unknown_keys(&entries, &DEFINITION_KEYS);
        if let Some(entry) = self.require(root, &entries, "name") {
            definition.name = self.name(entry.value, "name").unwrap_or_default();
        }
        if let Some(entry) = get(&entries, "description") {
            self.string(entry.value);
        }
        if let Some(entry) = get(&entries, "timeout") {
            definition.timeout = self.timeout(entry.value);
        }
        if let Some(entry) = get(&entries, "retry") {
            definition.retry = self.retry(entry.value);
        }
        if let Some(entry) = get(&entries, "deadline") {
            definition.deadline = self.deadline(entry.value, None);
        }
        if let Some(entry) = get(&entries, "on_failure") {
            match self.string(entry.value) {
                Some("compensate") => definition.on_failure = Some(OnFailure::Compensate),
                Some("fail") => definition.on_failure = Some(OnFailure::Fail),
                Some(other) => self.report(
                    entry.value,
                    format!("unknown on_failure `{other}` (expected compensate or fail)"),
                ),
                None => {}
            }
        }
        // Step ids with the index and line of their first declaration.
        let mut ids: HashMap<String, (usize, usize)> = HashMap::new();
        if let Some(entry) = self.require(root, &entries, "steps") {
            definition.steps = self.steps(entry.value, &mut ids);
        }
        if let Some(entry) = get(&entries, "output") {
            definition.output = Some(self.template(entry.value, None));
        }
        self.check_references(&ids, &definition.steps);
        definition
    }

    fn steps(&mut self, node: &Node, ids: &mut HashMap<String, (usize, usize)>) -> Vec<Step> {
        let Data::Seq(items) = &node.data else {
            self.expected(node, "a sequence of steps");
            return Vec::new();
        };
        if items.is_empty() {
            self.report(node, "`steps` is empty");
        }
        if items.len() > STEPS_COUNT_MAX {
            self.report(
                node,
                format!(
                    "{} steps, more than the {STEPS_COUNT_MAX} allowed",
                    items.len()
                ),
            );
        }
        let mut steps = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let step = self.step(item, index);
            if let Some((id, id_node)) = &step.1 {
                match ids.get(id) {
                    Some((_, line)) => self.report(
                        id_node,
                        format!("duplicate step id `{id}` (first at line {line})"),
                    ),
                    None => {
                        ids.insert(id.clone(), (index, id_node.line));
                    }
                }
            }
            steps.push(step.0);
        }
        steps
    }

    /// A step, and its id with the id's node when valid. Invalid steps come back as
    /// placeholders so that step indexes stay those of the source.
    fn step<'n>(&mut self, node: &'n Node, index: usize) -> (Step, Option<(String, &'n Node)>) {
        let mut step = Step::new(
            String::new(),
            StepKind::Sleep {
                duration: Duration::ZERO,
            },
        );
        let Some(entries) = self.mapping(node) else {
            return (step, None);
        };
        self.kind_and_options(node, &entries, &STEP_KEYS, Some(index), &mut step);
        let id = match self.require(node, &entries, "id") {
            Some(entry) => self
                .name(entry.value, "step id")
                .map(|id| (id, entry.value)),
            None => None,
        };
        if let Some((id, _)) = &id {
            step.id = id.clone();
        }
        if let Some(entry) = get(&entries, "queue_timeout") {
            step.queue_timeout = self.timeout(entry.value);
        }
        if let Some(entry) = get(&entries, "heartbeat_timeout") {
            step.heartbeat_timeout = self.timeout(entry.value);
        }
        if let Some(entry) = get(&entries, "deadline") {
            step.deadline = self.deadline(entry.value, Some(index));
        }
        for key in ["queue_timeout", "heartbeat_timeout"] {
            if let Some(entry) = get(&entries, key) {
                if !matches!(step.kind, StepKind::Task { .. }) {
                    self.report(
                        entry.key_node,
                        format!("`{key}` applies only to `task` steps"),
                    );
                }
            }
        }
        if let Some(entry) = get(&entries, "compensate") {
            if let Some(undo_entries) = self.mapping(entry.value) {
                let mut undo = Step::new(
                    String::new(),
                    StepKind::Sleep {
                        duration: Duration::ZERO,
                    },
                );
                // A compensation may read every step's output, its own step's included.
                self.kind_and_options(
                    entry.value,
                    &undo_entries,
                    &COMPENSATE_KEYS,
                    None,
                    &mut undo,
                );
                step.compensate = Some(Box::new(undo));
            }
        }
        if let Some(entry) = get(&entries, "catch") {
            step.catch = self.catch(entry.value, index);
        }
        (step, id)
    }

    /// The kind and the options every step may have; `from` is the step's index for
    /// reference checks (`None`: may refer to any step).
    fn kind_and_options(
        &mut self,
        node: &Node,
        entries: &[Entry<'_>],
        known: &[&str],
        from: Option<usize>,
        step: &mut Step,
    ) {
        let kinds: Vec<&Entry<'_>> = entries
            .iter()
            .filter(|e| STEP_KINDS.contains(&e.key.as_str()))
            .collect();
        let known_kinds = "`task`, `http`, `sleep`, `set`, `fail` or `wait`";
        if kinds.is_empty() {
            // Without a kind, a stray key is most likely a kind weir does not know.
            let mut unknown = 0;
            for entry in entries {
                if !known.contains(&entry.key.as_str()) {
                    unknown += 1;
                    let hint = suggest(&entry.key, known);
                    self.report(
                        entry.key_node,
                        format!(
                            "unknown step kind `{}`{hint}: a step needs one of {known_kinds}",
                            entry.key
                        ),
                    );
                }
            }
            if unknown == 0 {
                self.report(node, format!("step has no kind: add one of {known_kinds}"));
            }
        } else {
            self.unknown_keys(entries, known);
            for extra in &kinds[1..] {
                self.report(
                    extra.key_node,
                    format!(
                        "step has two kinds, `{}` and `{}`: keep one",
                        kinds[0].key, extra.key
                    ),
                );
            }
        }
        if let Some(entry) = get(entries, "timeout") {
            step.timeout = self.timeout(entry.value);
        }
        if let Some(entry) = get(entries, "step_timeout") {
            step.step_timeout = self.timeout(entry.value);
        }
        if let Some(entry) = get(entries, "retry") {
            step.retry = self.retry(entry.value);
        }
        let kind = kinds.first().map(|e| e.key.as_str());
        if let Some(entry) = get(entries, "input") {
            if kind.is_some_and(|k| k != "task") {
                self.report(entry.key_node, "`input` applies only to `task` steps");
            }
        }
        let Some(kind) = kinds.first() else {
            return;
        };
        let value = kind.value;
        match kind.key.as_str() {
            "task" => {
                let queue = self.name(value, "queue name").unwrap_or_default();
                let input = match get(entries, "input") {
                    Some(entry) => self.template(entry.value, from),
                    None => Template::Literal(Value::Object(serde_json::Map::new())),
                };
                step.kind = StepKind::Task { queue, input };
            }
            "http" => {
                if let Some(http) = self.http(value, from) {
                    step.kind = http;
                }
            }
            "set" => {
                if !matches!(value.data, Data::Map(_)) {
                    self.expected(value, "a mapping of variables");
                } else {
                    step.kind = StepKind::Set {
                        vars: self.template(value, from),
                    };
                }
            }
            "fail" => {
                let Some(fail_entries) = self.mapping(value) else {
                    return;
                };
                self.unknown_keys(&fail_entries, &FAIL_KEYS);
                let error_type = match self.require(value, &fail_entries, "type") {
                    Some(entry) => self.name(entry.value, "error type").unwrap_or_default(),
                    None => String::new(),
                };
                let message = match get(&fail_entries, "message") {
                    Some(entry) => self.template(entry.value, from),
                    None => Template::Literal(Value::String(String::new())),
                };
                step.kind = StepKind::Fail {
                    error_type,
                    message,
                };
            }
            "wait" => {
                if let Some(signal) = self.name(value, "signal name") {
                    step.kind = StepKind::Wait { signal };
                }
            }
            "human" => {
                if let Some(kind) = self.human(value, from) {
                    step.kind = kind;
                }
            }
            "switch" => {
                if let Some(kind) = self.switch(value, from) {
                    step.kind = kind;
                }
            }
            "parallel" => {
                if let Some(kind) = self.parallel(value, from) {
                    step.kind = kind;
                }
            }
            "foreach" => {
                if let Some(kind) = self.foreach(value, from) {
                    step.kind = kind;
                }
            }
            "workflow" => {
                let Some(entries) = self.mapping(value) else {
                    return;
                };
                self.unknown_keys(&entries, &WORKFLOW_KEYS);
                let definition = match self.require(value, &entries, "definition") {
                    Some(e) => self.name(e.value, "definition name").unwrap_or_default(),
                    None => String::new(),
                };
                let version = match get(&entries, "version").map(|e| (e, &e.value.data)) {
                    None => None,
                    Some((_, Data::Int(n))) if *n >= 1 && *n <= i128::from(u32::MAX) => {
                        Some(*n as u32)
                    }
                    Some((e, _)) => {
                        self.report(e.value, "version must be a positive integer");
                        None
                    }
                };
                let input = match get(&entries, "input") {
                    Some(e) => self.template(e.value, from),
                    None => Template::Literal(Value::Object(serde_json::Map::new())),
                };
                step.kind = StepKind::Workflow {
                    definition,
                    version,
                    input,
                };
            }
            _ => {
                if let Some(duration) = self.duration(value) {
                    step.kind = StepKind::Sleep { duration };
                }
            }
        }
    }

    fn human(&mut self, node: &Node, from: Option<usize>) -> Option<StepKind> {
        let entries = self.mapping(node)?;
        self.unknown_keys(&entries, &HUMAN_KEYS);
        let title = match self.require(node, &entries, "title") {
            Some(entry) => self.template(entry.value, from),
            None => Template::Literal(Value::Null),
        };
        let assignee = get(&entries, "assignee").and_then(|e| self.name(e.value, "assignee"));
        let group = get(&entries, "group").and_then(|e| self.name(e.value, "group"));
        let form = match get(&entries, "schema") {
            None => None,
            Some(entry) => match FormSchema::compile(entry.value.to_json()) {
                Ok(form) => Some(form),
                Err(message) => {
                    self.report(entry.value, format!("bad JSON Schema: {message}"));
                    None
                }
            },
        };
        let escalation = match get(&entries, "escalation") {
            None => None,
            Some(entry) => {
                let escalation_entries = self.mapping(entry.value)?;
                self.unknown_keys(&escalation_entries, &ESCALATION_KEYS);
                let after = self
                    .require(entry.value, &escalation_entries, "after")
                    .and_then(|e| self.timeout(e.value));
                let assignee = get(&escalation_entries, "reassign_to")
                    .and_then(|e| self.name(e.value, "assignee"));
                let group = get(&escalation_entries, "reassign_group")
                    .and_then(|e| self.name(e.value, "group"));
                let fail = get(&escalation_entries, "fail")
                    .is_some_and(|e| matches!(e.value.data, Data::Bool(true)));
                let action = match (assignee.is_some() || group.is_some(), fail) {
                    (true, false) => EscalationAction::Reassign { assignee, group },
                    (false, true) => EscalationAction::Fail,
                    _ => {
                        self.report(entry.value, "an escalation either reassigns (`reassign_to`, `reassign_group`) or fails (`fail: true`)");
                        return None;
                    }
                };
                after.map(|after| Escalation { after, action })
            }
        };
        Some(StepKind::Human {
            title,
            assignee,
            group,
            form,
            escalation,
        })
    }

    fn catch(&mut self, node: &Node, index: usize) -> Vec<Catch> {
        let Data::Seq(items) = &node.data else {
            self.expected(node, "a sequence of handlers");
            return Vec::new();
        };
        if items.len() > CATCH_HANDLERS_MAX {
            self.report(node, format!("more than {CATCH_HANDLERS_MAX} handlers"));
        }
        let mut handlers = Vec::with_capacity(items.len());
        for item in items {
            let Some(entries) = self.mapping(item) else {
                continue;
            };
            self.unknown_keys(&entries, &CATCH_KEYS);
            let mut handler = Catch {
                errors: Vec::new(),
                steps: Vec::new(),
                then: CatchThen::Continue,
            };
            if let Some(entry) = get(&entries, "errors") {
                match &entry.value.data {
                    Data::Seq(types) => {
                        for t in types {
                            if let Some(name) = self.name(t, "error type") {
                                handler.errors.push(name);
                            }
                        }
                    }
                    _ if scalar_text(entry.value).as_deref() == Some("all") => {}
                    _ => self.expected(entry.value, "a list of error types, or `all`"),
                }
            }
            if let Some(entry) = get(&entries, "then") {
                match self.string(entry.value) {
                    Some("continue") => handler.then = CatchThen::Continue,
                    Some("fail") => handler.then = CatchThen::Fail,
                    Some(other) => self.report(
                        entry.value,
                        format!("unknown then `{other}` (expected continue or fail)"),
                    ),
                    None => {}
                }
            }
            if let Some(entry) = get(&entries, "steps") {
                // Handler steps may read the failed step's predecessors.
                handler.steps = self.nested_steps(entry.value, Some(index));
            }
            handlers.push(handler);
        }
        handlers
    }

    fn switch(&mut self, node: &Node, from: Option<usize>) -> Option<StepKind> {
        let entries = self.mapping(node)?;
        self.unknown_keys(&entries, &SWITCH_KEYS);
        let mut cases = Vec::new();
        if let Some(entry) = self.require(node, &entries, "cases") {
            let Data::Seq(items) = &entry.value.data else {
                self.expected(entry.value, "a sequence of cases");
                return None;
            };
            for item in items {
                let Some(case_entries) = self.mapping(item) else {
                    continue;
                };
                self.unknown_keys(&case_entries, &CASE_KEYS);
                let when = match self.require(item, &case_entries, "when") {
                    Some(e) => self.template(e.value, from),
                    None => Template::Literal(Value::Null),
                };
                let steps = match get(&case_entries, "steps") {
                    Some(e) => self.nested_steps(e.value, from),
                    None => Vec::new(),
                };
                cases.push(Case { when, steps });
            }
        }
        let default = match get(&entries, "default") {
            Some(e) => self.nested_steps(e.value, from),
            None => Vec::new(),
        };
        Some(StepKind::Switch { cases, default })
    }

    fn parallel(&mut self, node: &Node, from: Option<usize>) -> Option<StepKind> {
        let entries = self.mapping(node)?;
        self.unknown_keys(&entries, &PARALLEL_KEYS);
        let mut branches = Vec::new();
        if let Some(entry) = self.require(node, &entries, "branches") {
            let Data::Seq(items) = &entry.value.data else {
                self.expected(entry.value, "a sequence of branches");
                return None;
            };
            if items.is_empty() || items.len() > LANES_MAX {
                self.report(
                    entry.value,
                    format!("a parallel step needs 1 to {LANES_MAX} branches"),
                );
            }
            for item in items {
                let Some(branch_entries) = self.mapping(item) else {
                    continue;
                };
                self.unknown_keys(&branch_entries, &BRANCH_KEYS);
                let steps = match self.require(item, &branch_entries, "steps") {
                    Some(e) => self.nested_steps(e.value, from),
                    None => Vec::new(),
                };
                if steps.is_empty() {
                    self.report(item, "a branch needs at least one step");
                }
                branches.push(steps);
            }
        }
        let mut join = Join::All;
        if let Some(entry) = get(&entries, "join") {
            match (&entry.value.data, scalar_text(entry.value).as_deref()) {
                (Data::Int(n), _) if *n >= 1 && (*n as usize) <= branches.len() => {
                    join = Join::Count(*n as usize)
                }
                (Data::Int(_), _) => self.report(
                    entry.value,
                    format!("join must count from 1 to {} branches", branches.len()),
                ),
                (_, Some("all")) => join = Join::All,
                (_, Some("any")) => join = Join::Any,
                _ => self.report(
                    entry.value,
                    "join must be `all`, `any` or a number of branches",
                ),
            }
        }
        Some(StepKind::Parallel { branches, join })
    }

    fn foreach(&mut self, node: &Node, from: Option<usize>) -> Option<StepKind> {
        let entries = self.mapping(node)?;
        self.unknown_keys(&entries, &FOREACH_KEYS);
        let items = match self.require(node, &entries, "items") {
            Some(e) => self.template(e.value, from),
            None => Template::Literal(Value::Array(Vec::new())),
        };
        let mut concurrency = 1;
        if let Some(entry) = get(&entries, "concurrency") {
            match entry.value.data {
                Data::Int(n) if n >= 1 && (n as usize) <= LANES_MAX => concurrency = n as usize,
                _ => self.report(
                    entry.value,
                    format!("concurrency must be from 1 to {LANES_MAX}"),
                ),
            }
        }
        let steps = match self.require(node, &entries, "steps") {
            Some(e) => self.nested_steps(e.value, from),
            None => Vec::new(),
        };
        if steps.is_empty() {
            self.report(node, "a foreach needs at least one step");
        }
        Some(StepKind::Foreach {
            items,
            concurrency,
            steps,
        })
    }

    /// Steps nested in another step (catch handlers, switch branches): leaf kinds, no ids.
    fn nested_steps(&mut self, node: &Node, from: Option<usize>) -> Vec<Step> {
        let Data::Seq(items) = &node.data else {
            self.expected(node, "a sequence of steps");
            return Vec::new();
        };
        let mut steps = Vec::with_capacity(items.len());
        for item in items {
            let Some(entries) = self.mapping(item) else {
                continue;
            };
            let mut step = Step::new(
                String::new(),
                StepKind::Sleep {
                    duration: Duration::ZERO,
                },
            );
            self.kind_and_options(item, &entries, &COMPENSATE_KEYS, from, &mut step);
            steps.push(step);
        }
        steps
    }

    /// A deadline: an RFC 3339 timestamp or an expression yielding one.
    fn deadline(&mut self, node: &Node, from: Option<usize>) -> Option<Template> {
        let text = self.string(node)?;
        if expr::embedded(text).is_none() && crate::deadline::parse_rfc3339_ms(text).is_none() {
            self.report(
                node,
                format!("bad deadline `{text}`: expected an RFC 3339 timestamp or an expression"),
            );
            return None;
        }
        Some(self.template(node, from))
    }

    fn http(&mut self, node: &Node, from: Option<usize>) -> Option<StepKind> {
        let entries = self.mapping(node)?;
        self.unknown_keys(&entries, &HTTP_KEYS);
        let mut method = "GET".to_string();
        if let Some(entry) = get(&entries, "method") {
            if let Some(text) = self.string(entry.value) {
                method = text.to_ascii_uppercase();
                if !HTTP_METHODS.contains(&method.as_str()) {
                    self.report(
                        entry.value,
                        format!(
                            "unknown http method `{text}` (expected {})",
                            HTTP_METHODS.join(", ")
                        ),
                    );
                }
            }
        }
        let mut url = Template::Literal(Value::Null);
        if let Some(entry) = self.require(node, &entries, "url") {
            if let Some(text) = self.string(entry.value) {
                let is_expression = expr::embedded(text).is_some();
                let is_http = text.starts_with("http://") || text.starts_with("https://");
                if !(is_expression || is_http) {
                    self.report(entry.value, "url must start with http:// or https://");
                }
                url = self.template(entry.value, from);
            }
        }
        let mut headers = Vec::new();
        if let Some(entry) = get(&entries, "headers") {
            for header in self.mapping(entry.value).unwrap_or_default() {
                if !is_header_name(&header.key) {
                    self.report(header.key_node, format!("bad header name `{}`", header.key));
                }
                if self.string(header.value).is_some() {
                    headers.push((header.key.clone(), self.template(header.value, from)));
                }
            }
        }
        let body = get(&entries, "body").map(|entry| self.template(entry.value, from));
        Some(StepKind::Http {
            method,
            url,
            headers,
            body,
        })
    }

    fn retry(&mut self, node: &Node) -> Option<RetryPolicy> {
        let entries = self.mapping(node)?;
        self.unknown_keys(&entries, &RETRY_KEYS);
        let mut policy = RetryPolicy::default();
        let before = self.problems.len();
        if let Some(entry) = get(&entries, "max_attempts") {
            match entry.value.data {
                Data::Int(n) if n < 1 => {
                    self.report(entry.value, "max_attempts must be at least 1")
                }
                Data::Int(n) => match u32::try_from(n) {
                    Ok(n) => policy.max_attempts = n,
                    Err(_) => self.report(entry.value, "max_attempts is too large"),
                },
                _ => self.expected(entry.value, "an integer"),
            }
        }
        if let Some(entry) = get(&entries, "backoff") {
            if let Some(text) = self.string(entry.value) {
                match text {
                    "fixed" => policy.backoff = Backoff::Fixed,
                    "exponential" => policy.backoff = Backoff::Exponential,
                    "linear" => policy.backoff = Backoff::Linear,
                    _ => self.report(
                        entry.value,
                        format!(
                            "unknown backoff `{text}` (expected `fixed`, `exponential` or `linear`)"
                        ),
                    ),
                }
            }
        }
        // `initial_interval` reads better for exponential backoff; both set one field.
        match (get(&entries, "interval"), get(&entries, "initial_interval")) {
            (Some(_), Some(second)) => self.report(
                second.key_node,
                "`interval` and `initial_interval` are the same setting: keep one",
            ),
            (Some(entry), None) | (None, Some(entry)) => {
                if let Some(d) = self.duration(entry.value) {
                    policy.interval = d;
                }
            }
            (None, None) => {}
        }
        if let Some(entry) = get(&entries, "multiplier") {
            let value = match entry.value.data {
                Data::Int(i) => Some(i as f64),
                Data::Float(f) => Some(f),
                _ => None,
            };
            match value {
                Some(m) if m.is_finite() && m >= 1.0 => policy.multiplier = m,
                Some(_) => self.report(entry.value, "multiplier must be a number of at least 1"),
                None => self.expected(entry.value, "a number"),
            }
        }
        match get(&entries, "max_interval") {
            Some(entry) => policy.max_interval = self.duration(entry.value),
            // Without a cap of its own, a block's delays may grow to 100 × its interval
            // (as Temporal's do): the default policy's 1 min cap would silently cut an
            // `interval: 1h` down to a minute.
            None => policy.max_interval = Some(policy.interval.saturating_mul(100)),
        }
        if let Some(entry) = get(&entries, "jitter") {
            if let Some(text) = self.string(entry.value) {
                match text {
                    "none" => policy.jitter = Jitter::None,
                    "full" => policy.jitter = Jitter::Full,
                    "equal" => policy.jitter = Jitter::Equal,
                    _ => self.report(
                        entry.value,
                        format!("unknown jitter `{text}` (expected `none`, `full` or `equal`)"),
                    ),
                }
            }
        }
        if let Some(entry) = get(&entries, "max_duration") {
            policy.max_duration = self.duration(entry.value);
        }
        if let Some(entry) = get(&entries, "non_retryable") {
            match &entry.value.data {
                Data::Seq(items) => {
                    for item in items {
                        match self.string(item) {
                            Some("") => self.report(item, "empty error type"),
                            Some(text) => policy.non_retryable.push(text.to_string()),
                            None => {}
                        }
                    }
                }
                _ => self.expected(entry.value, "a sequence of error types"),
            }
        }
        (self.problems.len() == before).then_some(policy)
    }

    fn check_references(&mut self, ids: &HashMap<String, (usize, usize)>, steps: &[Step]) {
        for reference in std::mem::take(&mut self.references) {
            let name = &reference.step;
            let message = match (ids.get(name), reference.from) {
                (None, _) => {
                    let candidates: Vec<&str> = ids.keys().map(String::as_str).collect();
                    let mut hint = suggest(name, &candidates);
                    // `.steps.cool-off` reads as `.steps.cool - off` in jq.
                    let mut longer: Vec<&&str> = candidates
                        .iter()
                        .filter(|id| {
                            id.strip_prefix(name.as_str())
                                .is_some_and(|rest| rest.starts_with(['-', '.']))
                        })
                        .collect();
                    longer.sort();
                    if let Some(id) = longer.first() {
                        hint = format!(" (write `.steps[\"{id}\"]` for an id with `-` or `.`)");
                    }
                    format!("reference to unknown step `{name}`{hint}")
                }
                (Some(&(target, _)), Some(from)) if target == from => {
                    format!("step `{name}` cannot refer to its own output")
                }
                (Some(&(target, _)), Some(from)) if target > from => format!(
                    "step `{name}` runs after step `{}`, so its output is not there yet",
                    steps[from].id
                ),
                _ => continue,
            };
            self.problems
                .push(problem(reference.line, reference.column, message));
        }
    }
}

/// RFC 9110 token characters.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// ` (did you mean `x`?)` for the closest candidate, if one is close.
fn suggest(word: &str, candidates: &[&str]) -> String {
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        let distance = edit_distance(word, candidate);
        // About a third of the word may be wrong (`tiemout` is one swap away from
        // `timeout`), but never all of it: `x` is not a typo of `a`.
        let length = word.chars().count();
        let close = distance < length && distance <= (length / 3).max(1);
        if close && best.is_none_or(|(d, c)| (distance, *candidate) < (d, c)) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// Edit distance counting a swap of neighbours as one edit (optimal string alignment).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Parses `source` and compares the rendered problems (`line:column: message`).
    fn check(source: &str, expected: &[&str]) {
        let rendered: Vec<String> = match parse(source) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.iter().map(Problem::to_string).collect(),
        };
        assert_eq!(rendered, expected, "\n{source}");
    }

    /// A valid definition around `steps` (a YAML sequence, indented by two).
    fn with_steps(steps: &str) -> String {
        format!("name: w\nsteps:\n{steps}")
    }

    #[test]
    fn fault_tolerance_keys() {
        let source = r#"
name: saga
on_failure: compensate
deadline: "2030-01-01T00:00:00Z"
steps:
  - id: reserve
    task: inventory
    queue_timeout: 1m
    heartbeat_timeout: 10s
    step_timeout: 5m
    deadline: "${ .input.due }"
    compensate: { task: inventory-release, input: { id: "${ .steps.reserve.output.id }" }, retry: { max_attempts: 9 } }
  - id: charge
    task: payments
    catch:
      - errors: [card_declined]
        steps:
          - set: { declined: true }
        then: continue
      - errors: all
        then: fail
  - id: approval
    wait: approved
    timeout: 1d
  - id: stop
    fail: { type: rejected, message: "${ .vars.declined | tostring }" }
"#;
        let definition = parse(source).unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(definition.on_failure, Some(OnFailure::Compensate));
        let reserve = &definition.steps[0];
        assert_eq!(reserve.queue_timeout, Some(Duration::from_secs(60)));
        assert_eq!(reserve.heartbeat_timeout, Some(Duration::from_secs(10)));
        assert_eq!(reserve.step_timeout, Some(Duration::from_secs(300)));
        assert!(reserve.deadline.is_some());
        let undo = reserve.compensate.as_ref().unwrap();
        assert!(matches!(&undo.kind, StepKind::Task { queue, .. } if queue == "inventory-release"));
        assert_eq!(undo.retry.as_ref().unwrap().max_attempts, 9);
        let catch = &definition.steps[1].catch;
        assert_eq!(catch.len(), 2);
        assert_eq!(catch[0].errors, ["card_declined"]);
        assert_eq!(catch[0].then, CatchThen::Continue);
        assert!(catch[1].errors.is_empty());
        assert_eq!(catch[1].then, CatchThen::Fail);
        assert!(
            matches!(&definition.steps[2].kind, StepKind::Wait { signal } if signal == "approved")
        );
        assert!(
            matches!(&definition.steps[3].kind, StepKind::Fail { error_type, .. } if error_type == "rejected")
        );
    }

    #[test]
    fn fan_out_problems() {
        check(
            "name: w\nsteps:\n  - id: p\n    parallel: { join: 4, branches: [{ steps: [{ task: q }] }, { steps: [] }] }\n  - id: f\n    foreach: { items: \"${ .input.xs }\", concurrency: 0, steps: [{ parallel: { branches: [] } }] }\n",
            &[
                "4:23: join must count from 1 to 2 branches",
                "4:63: a branch needs at least one step",
                "6:54: concurrency must be from 1 to 10000",
                "6:67: unknown key `parallel`",
                "6:89: a parallel step needs 1 to 10000 branches",
            ],
        );
    }

    #[test]
    fn fault_tolerance_problems() {
        check(
            "name: w\non_failure: retry\ndeadline: tomorrow\nsteps:\n  - id: a\n    sleep: 1s\n    queue_timeout: 5s\n    compensate: { id: x, task: q }\n    catch:\n      - errors: 5\n        then: maybe\n  - id: b\n    set: 5\n  - id: c\n    fail: { message: hi }\n",
            &[
                "2:13: unknown on_failure `retry` (expected compensate or fail)",
                "3:11: bad deadline `tomorrow`: expected an RFC 3339 timestamp or an expression",
                "7:5: `queue_timeout` applies only to `task` steps",
                "8:19: unknown key `id`",
                "10:17: expected a list of error types, or `all`, found an integer",
                "11:15: unknown then `maybe` (expected continue or fail)",
                "13:10: expected a mapping of variables, found an integer",
                "15:11: missing key `type`",
            ],
        );
    }

    const SKETCH: &str = r#"name: order-fulfilment
timeout: 1h                         # relative to the start
retry: { max_attempts: 5, backoff: exponential, initial_interval: 1s, multiplier: 2, max_interval: 1m, jitter: full }
steps:
  - id: reserve
    task: inventory                 # a worker queue
    input: { sku: "${ .input.sku }", qty: "${ .input.qty }" }
    timeout: 30s                    # per attempt
  - id: charge
    task: payments
    retry: { max_attempts: 3, backoff: fixed, interval: 2s, non_retryable: [card_declined] }
  - id: cool-off
    sleep: 10s
  - id: notify
    http: { method: POST, url: "http://127.0.0.1:9000/hooks/shipped", body: "${ .steps.charge.output }" }
output: { reservation: "${ .steps.reserve.output }", receipt: "${ .steps.charge.output }" }
"#;

    fn assert_sketch(definition: &Definition) {
        assert_eq!(definition.name, "order-fulfilment");
        assert_eq!(definition.timeout, Some(Duration::from_secs(3600)));
        assert_eq!(
            definition.retry,
            Some(RetryPolicy {
                max_attempts: 5,
                backoff: Backoff::Exponential,
                interval: Duration::from_secs(1),
                multiplier: 2.0,
                max_interval: Some(Duration::from_secs(60)),
                jitter: Jitter::Full,
                max_duration: None,
                non_retryable: vec![],
            })
        );
        let ids: Vec<&str> = definition.steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["reserve", "charge", "cool-off", "notify"]);
        assert_eq!(definition.step_index("cool-off"), Some(2));

        let context = json!({"input": {"sku": "A-1", "qty": 2}, "steps": {
            "reserve": {"output": {"id": "r-1"}}, "charge": {"output": {"receipt": 9}}}});
        let reserve = &definition.steps[0];
        assert_eq!(reserve.timeout, Some(Duration::from_secs(30)));
        assert_eq!(reserve.retry, None);
        let StepKind::Task { queue, input } = &reserve.kind else {
            panic!("{:?}", reserve.kind)
        };
        assert_eq!(queue, "inventory");
        assert_eq!(
            input.eval(&context).unwrap(),
            json!({"sku": "A-1", "qty": 2})
        );

        let charge = definition.step("charge").unwrap();
        let StepKind::Task { queue, input } = &charge.kind else {
            panic!("{:?}", charge.kind)
        };
        assert_eq!(queue, "payments");
        assert_eq!(input.eval(&context).unwrap(), json!({}));
        assert_eq!(
            charge.retry,
            Some(RetryPolicy {
                max_attempts: 3,
                backoff: Backoff::Fixed,
                interval: Duration::from_secs(2),
                // A block without its own cap gets 100 × its interval.
                max_interval: Some(Duration::from_secs(200)),
                non_retryable: vec!["card_declined".to_string()],
                ..RetryPolicy::default()
            })
        );

        assert!(matches!(
            definition.steps[2].kind,
            StepKind::Sleep { duration } if duration == Duration::from_secs(10)
        ));

        let StepKind::Http {
            method,
            url,
            headers,
            body,
        } = &definition.steps[3].kind
        else {
            panic!("{:?}", definition.steps[3].kind)
        };
        assert_eq!(method, "POST");
        assert_eq!(
            url.eval(&context).unwrap(),
            json!("http://127.0.0.1:9000/hooks/shipped")
        );
        assert!(headers.is_empty());
        assert_eq!(
            body.as_ref().unwrap().eval(&context).unwrap(),
            json!({"receipt": 9})
        );

        let output = definition.output.as_ref().unwrap();
        assert_eq!(
            output.eval(&context).unwrap(),
            json!({"reservation": {"id": "r-1"}, "receipt": {"receipt": 9}})
        );
    }

    #[test]
    fn parses_the_design_sketch() {
        assert_sketch(&parse(SKETCH).unwrap());
    }

    #[test]
    fn parses_json() {
        let source = serde_json::to_string_pretty(&json!({
            "name": "order-fulfilment",
            "timeout": "1h",
            "retry": {"max_attempts": 5, "backoff": "exponential", "initial_interval": "1s",
                      "multiplier": 2, "max_interval": "1m", "jitter": "full"},
            "steps": [
                {"id": "reserve", "task": "inventory", "timeout": "30s",
                 "input": {"sku": "${ .input.sku }", "qty": "${ .input.qty }"}},
                {"id": "charge", "task": "payments",
                 "retry": {"max_attempts": 3, "backoff": "fixed", "interval": "2s",
                           "non_retryable": ["card_declined"]}},
                {"id": "cool-off", "sleep": "10s"},
                {"id": "notify", "http": {"method": "POST",
                 "url": "http://127.0.0.1:9000/hooks/shipped", "body": "${ .steps.charge.output }"}}
            ],
            "output": {"reservation": "${ .steps.reserve.output }", "receipt": "${ .steps.charge.output }"}
        }))
        .unwrap();
        assert_sketch(&parse(&source).unwrap());
        // Tabs are JSON whitespace; inside flow collections YAML accepts them too.
        let tabbed = "{\n\t\"name\": \"w\",\n\t\"steps\": [{\"id\": \"a\", \"sleep\": \"1s\"}]\n}";
        check(tabbed, &[]);
        check(
            "{\"name\": \"w\", \"steps\": [{\"id\": \"a\", \"sleep\": 1}]}",
            &["1:46: expected a duration such as `30s`, found an integer"],
        );
    }

    #[test]
    fn http_details_and_literals() {
        let source = with_steps(
            r#"  - id: call
    http:
      method: put
      url: "${ \"http://svc/items/\\(.input.id)\" }"
      headers: { X-Request-Id: "${ .input.id | tostring }", Accept: application/json }
      body: [1, 2.5, true, null, ~, 0x1f, 1e3, "x", { k: "${ .input.id }" }]
  - id: plain
    http: { url: "https://example.com" }
"#,
        );
        let definition = parse(&source).unwrap();
        let context = json!({"input": {"id": 7}});
        let StepKind::Http {
            method,
            url,
            headers,
            body,
        } = &definition.steps[0].kind
        else {
            panic!()
        };
        assert_eq!(method, "PUT");
        assert_eq!(url.eval(&context).unwrap(), json!("http://svc/items/7"));
        let headers: Vec<(String, Value)> = headers
            .iter()
            .map(|(k, t)| (k.clone(), t.eval(&context).unwrap()))
            .collect();
        assert_eq!(
            headers,
            [
                ("X-Request-Id".to_string(), json!("7")),
                ("Accept".to_string(), json!("application/json"))
            ]
        );
        assert_eq!(
            body.as_ref().unwrap().eval(&context).unwrap(),
            json!([1, 2.5, true, null, null, 31, 1000.0, "x", {"k": 7}])
        );
        let StepKind::Http { method, body, .. } = &definition.steps[1].kind else {
            panic!()
        };
        assert_eq!(method, "GET");
        assert!(body.is_none());
    }

    #[test]
    fn yaml_problems() {
        check("", &["0:0: empty definition"]);
        check("# only a comment\n", &["0:0: empty definition"]);
        check(
            "name: w\nsteps: [\n",
            &["3:1: invalid yaml: while parsing a node, did not find expected node content"],
        );
        check(
            "name: w\n  bad: indent\n",
            &["2:6: invalid yaml: mapping values are not allowed in this context"],
        );
        check(
            "name: a\n---\nname: b\n",
            &["2:1: only one yaml document is allowed"],
        );
        check(
            "- a\n- b\n",
            &["1:1: expected a mapping at the top level, found a sequence"],
        );
        check(
            "just text\n",
            &["1:1: expected a mapping at the top level, found a string"],
        );
        check(
            "name: w\nname: v\nsteps:\n  - { id: a, sleep: 1s, sleep: 2s }\n",
            &[
                "2:1: duplicate key `name` (first at line 1)",
                "4:25: duplicate key `sleep` (first at line 4)",
            ],
        );
        check(
            &with_steps(
                "  - id: a\n    sleep: !!binary 1s\n  - id: b\n    task: q\n    input: !custom q\n",
            ),
            &[
                "4:12: unsupported yaml tag `!!binary`",
                "7:12: unsupported yaml tag `!custom`",
            ],
        );
        check(&with_steps("  - id: a\n    sleep: !!str 1s\n"), &[]);
        check(
            &with_steps("  - id: a\n    task: q\n    input: { [1]: 2 }\n"),
            &["5:14: mapping keys must be scalars"],
        );
    }

    #[test]
    fn size_limits() {
        let big = format!(
            "name: w\ndescription: \"{}\"\n",
            "x".repeat(DEFINITION_SIZE_MAX)
        );
        check(
            &big,
            &["0:0: definition is 1048600 bytes, more than the 1048576 allowed"],
        );
        let deep = format!("name: w\nsteps: {}{}\n", "[".repeat(70), "]".repeat(70));
        check(&deep, &["2:71: yaml nests deeper than 64 levels"]);
        let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let prev = format!("*a{}", i - 1);
            laughs.push_str(&format!(
                "a{i}: &a{i} [{}]\n",
                [prev.as_str(); 10].join(", ")
            ));
        }
        check(
            &laughs,
            &["5:45: yaml has more than 100000 nodes, aliases expanded"],
        );
        let many: String = (0..=STEPS_COUNT_MAX)
            .map(|i| format!("  - {{ id: s{i}, sleep: 1s }}\n"))
            .collect();
        check(
            &with_steps(&many),
            &["3:3: 1001 steps, more than the 1000 allowed"],
        );
    }

    #[test]
    fn name_problems() {
        check(
            "steps:\n  - { id: a, sleep: 1s }\n",
            &["1:1: missing key `name`"],
        );
        check(
            "name: \"\"\nsteps: [{ id: a, sleep: 1s }]\n",
            &["1:7: empty name"],
        );
        check(
            "name: a b\nsteps: [{ id: a, sleep: 1s }]\n",
            &["1:7: bad name `a b`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most 128 characters"],
        );
        check(
            &format!("name: {}\nsteps: [{{ id: a, sleep: 1s }}]\n", "a".repeat(129)),
            &[&format!("1:7: bad name `{}`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most 128 characters", "a".repeat(129))],
        );
        check(
            &format!(
                "name: {}\nsteps: [{{ id: a, sleep: 1s }}]\n",
                "a".repeat(128)
            ),
            &[],
        );
        check(
            "name: 5\nsteps: [{ id: a, sleep: 1s }]\n",
            &["1:7: expected a string, found an integer"],
        );
        check(
            "name: w\ndescription: [x]\nsteps: [{ id: a, sleep: 1s }]\n",
            &["2:14: expected a string, found a sequence"],
        );
    }

    #[test]
    fn steps_problems() {
        check("name: w\n", &["1:1: missing key `steps`"]);
        check("name: w\nsteps: []\n", &["2:8: `steps` is empty"]);
        check(
            "name: w\nsteps:\n",
            &["2:6: expected a sequence of steps, found null"],
        );
        check(
            "name: w\nsteps: 5\n",
            &["2:8: expected a sequence of steps, found an integer"],
        );
        check(
            &with_steps("  - just-a-string\n"),
            &["3:5: expected a mapping, found a string"],
        );
        check(&with_steps("  - sleep: 1s\n"), &["3:5: missing key `id`"]);
        check(
            &with_steps("  - id: -a\n    sleep: 1s\n  - id: 7\n    sleep: 1s\n"),
            &[
                "3:9: bad step id `-a`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most 128 characters",
                "5:9: expected a string, found an integer",
            ],
        );
        check(
            &with_steps(
                "  - id: a\n    sleep: 1s\n  - id: b\n    sleep: 1s\n  - id: a\n    sleep: 1s\n",
            ),
            &["7:9: duplicate step id `a` (first at line 3)"],
        );
    }

    #[test]
    fn step_kind_problems() {
        check(
            &with_steps("  - id: a\n    loop: 5s\n"),
            &["4:5: unknown step kind `loop`: a step needs one of `task`, `http`, `sleep`, `set`, `fail` or `wait`"],
        );
        check(
            &with_steps("  - id: a\n    tsak: q\n"),
            &["4:5: unknown step kind `tsak` (did you mean `task`?): a step needs one of `task`, `http`, `sleep`, `set`, `fail` or `wait`"],
        );
        check(
            &with_steps("  - id: a\n    timeout: 5s\n"),
            &["3:5: step has no kind: add one of `task`, `http`, `sleep`, `set`, `fail` or `wait`"],
        );
        check(
            &with_steps("  - id: a\n    task: q\n    sleep: 5s\n    http: { url: http://x }\n"),
            &[
                "5:5: step has two kinds, `task` and `sleep`: keep one",
                "6:5: step has two kinds, `task` and `http`: keep one",
            ],
        );
        check(
            &with_steps("  - id: a\n    task: bad queue\n"),
            &["4:11: bad queue name `bad queue`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most 128 characters"],
        );
        check(
            &with_steps("  - id: a\n    sleep: 1s\n    input: {}\n"),
            &["5:5: `input` applies only to `task` steps"],
        );
    }

    #[test]
    fn unknown_keys() {
        check(
            "name: w\ntiemout: 1h\nsteps:\n  - id: a\n    task: q\n    tiemout: 5s\n    compensate: { task: q }\n    retry: { max_attempt: 2, backof: fixed, colour: red }\ncatch: []\n",
            &[
                "2:1: unknown key `tiemout` (did you mean `timeout`?)",
                "6:5: unknown key `tiemout` (did you mean `timeout`?)",
                "8:14: unknown key `max_attempt` (did you mean `max_attempts`?)",
                "8:30: unknown key `backof` (did you mean `backoff`?)",
                "8:45: unknown key `colour`",
                "9:1: unknown key `catch`",
            ],
        );
        check(
            &with_steps("  - id: a\n    http: { url: \"http://x\", metod: GET, parallel: 2 }\n"),
            &[
                "4:30: unknown key `metod` (did you mean `method`?)",
                "4:42: unknown key `parallel`",
            ],
        );
    }

    #[test]
    fn duration_problems() {
        check(
            "name: w\ntimeout: 5x\nsteps:\n  - id: a\n    sleep: 10\n    timeout: [1]\n  - id: b\n    sleep: 1s\n    timeout: 0s\n  - id: c\n    sleep: -1s\n",
            &[
                "2:10: bad duration `5x`: unknown unit `x` (expected ms, s, m, h or d)",
                "5:12: expected a duration such as `30s`, found an integer",
                "6:14: expected a duration such as `30s`, found a sequence",
                "9:14: timeout must be more than zero",
                "11:12: negative duration `-1s`",
            ],
        );
    }

    #[test]
    fn retry_problems() {
        check(
            &with_steps(
                "  - id: a\n    task: q\n    retry:\n      max_attempts: 0\n      backoff: random\n      multiplier: 0.5\n      jitter: some\n      interval: 1x\n      max_interval: [1]\n      non_retryable: card_declined\n",
            ),
            &[
                "6:21: max_attempts must be at least 1",
                "7:16: unknown backoff `random` (expected `fixed`, `exponential` or `linear`)",
                "8:19: multiplier must be a number of at least 1",
                "9:15: unknown jitter `some` (expected `none`, `full` or `equal`)",
                "10:17: bad duration `1x`: unknown unit `x` (expected ms, s, m, h or d)",
                "11:21: expected a duration such as `30s`, found a sequence",
                "12:22: expected a sequence of error types, found a string",
            ],
        );
        check(
            "name: w\nretry: { max_attempts: \"3\", multiplier: x, non_retryable: [1, \"\"], interval: 1s, initial_interval: 2s }\nsteps: [{ id: a, sleep: 1s }]\nretry: 5\n",
            &[
                "2:24: expected an integer, found a string",
                "2:41: expected a number, found a string",
                "2:60: expected a string, found an integer",
                "2:63: empty error type",
                "2:82: `interval` and `initial_interval` are the same setting: keep one",
                "4:1: duplicate key `retry` (first at line 2)",
            ],
        );
        check(
            "name: w\nretry: { max_attempts: 99999999999 }\nsteps: [{ id: a, sleep: 1s, retry: [] }]\n",
            &[
                "2:24: max_attempts is too large",
                "3:36: expected a mapping, found a sequence",
            ],
        );
        // Missing fields take the defaults.
        let definition = parse(
            "name: w\nretry: { jitter: equal, multiplier: 1.5 }\nsteps: [{ id: a, sleep: 1s }]\n",
        )
        .unwrap();
        assert_eq!(
            definition.retry,
            Some(RetryPolicy {
                max_interval: Some(Duration::from_secs(100)),
                jitter: Jitter::Equal,
                multiplier: 1.5,
                ..RetryPolicy::default()
            })
        );
    }

    #[test]
    fn http_problems() {
        check(
            &with_steps(
                "  - id: a\n    http:\n      method: FETCH\n      headers: { \"Bad Header\": x, X-Num: 5 }\n      body: \"${ .x + }\"\n  - id: b\n    http: { url: ftp://x }\n  - id: c\n    http: https://x\n  - id: d\n    http: { url: [1] }\n",
            ),
            &[
                "5:7: missing key `url`",
                "5:15: unknown http method `FETCH` (expected GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS)",
                "6:18: bad header name `Bad Header`",
                "6:42: expected a string, found an integer",
                "7:13: bad expression `.x +`: expected term at the end",
                "9:18: url must start with http:// or https://",
                "11:11: expected a mapping, found a string",
                "13:18: expected a string, found a sequence",
            ],
        );
    }

    #[test]
    fn expression_problems() {
        check(
            &with_steps(
                "  - id: a\n    task: q\n    input:\n      x: \"${ .input.x +  }\"\n      y: [\"${ now }\", \"${ nosuch(1) }\"]\n      z: \"${ (.a }\"\n",
            ),
            &[
                "6:10: bad expression `.input.x +`: expected term at the end",
                "7:11: bad expression `now`: `now/0` is not available: expressions must be deterministic",
                "7:23: bad expression `nosuch(1)`: undefined filter `nosuch/1`",
                "8:10: bad expression `(.a`: unclosed `(`",
            ],
        );
    }

    #[test]
    fn reference_problems() {
        check(
            &with_steps(
                "  - id: a\n    task: q\n    input: { me: \"${ .steps.a.output }\", later: \"${ .steps.b.output }\" }\n  - id: b\n    task: q\n    input:\n      earlier: \"${ .steps.a.output.id }\"\n      nobody: \"${ .steps.nobody.output }\"\n      typo: \"${ [.steps.aa, .steps[\\\"cool\\\"]] }\"\n      dash: \"${ .steps.cool-off.output }\"\n  - id: cool-off\n    sleep: 1s\noutput: \"${ [.steps.a, .steps[\\\"cool-off\\\"], .steps.zz] }\"\n",
            ),
            &[
                "5:18: step `a` cannot refer to its own output",
                "5:49: step `b` runs after step `a`, so its output is not there yet",
                "10:15: reference to unknown step `nobody`",
                "11:13: reference to unknown step `aa` (did you mean `a`?)",
                "11:13: reference to unknown step `cool` (write `.steps[\"cool-off\"]` for an id with `-` or `.`)",
                "12:13: bad expression `.steps.cool-off.output`: undefined filter `off/0`",
                "12:13: reference to unknown step `cool` (write `.steps[\"cool-off\"]` for an id with `-` or `.`)",
                "15:9: reference to unknown step `zz`",
            ],
        );
    }

    #[test]
    fn many_problems_at_once() {
        check(
            "name: bad name\nsteps:\n  - id: a\n    task: q\n    timeout: soon\n  - id: a\n    loop: 1s\n  - task: q\n    input: \"${ .steps.x }\"\n",
            &[
                "1:7: bad name `bad name`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most 128 characters",
                "5:14: bad duration `soon`: expected a number such as `30s`",
                "6:9: duplicate step id `a` (first at line 3)",
                "7:5: unknown step kind `loop`: a step needs one of `task`, `http`, `sleep`, `set`, `fail` or `wait`",
                "8:5: missing key `id`",
                "9:12: reference to unknown step `x`",
            ],
        );
    }

    #[test]
    fn names_and_suggestions() {
        assert!(is_valid_name("order-fulfilment"));
        assert!(is_valid_name("a.b_c-9"));
        assert!(is_valid_name("9"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("_a"));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name("é"));
        assert_eq!(edit_distance("tiemout", "timeout"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(
            suggest("tiemout", &DEFINITION_KEYS),
            " (did you mean `timeout`?)"
        );
        assert_eq!(suggest("xyz", &DEFINITION_KEYS), "");
        assert_eq!(suggest("x", &["a"]), "");
        assert_eq!(suggest("aa", &["a"]), " (did you mean `a`?)");
    }

    #[test]
    fn yaml_scalars() {
        let cases = [
            ("~", json!(null)),
            ("null", json!(null)),
            ("true", json!(true)),
            ("False", json!(false)),
            ("yes", json!("yes")),
            ("12", json!(12)),
            ("-12", json!(-12)),
            ("+12", json!(12)),
            ("0x1F", json!(31)),
            ("0xZZ", json!("0xZZ")),
            ("0x1f", json!(31)),
            ("0o17", json!(15)),
            ("1.5", json!(1.5)),
            (".5", json!(0.5)),
            ("1e3", json!(1000.0)),
            ("1.", json!(1.0)),
            ("18446744073709551615", json!(18446744073709551615u64)),
            ("1.2.3", json!("1.2.3")),
            ("1e", json!("1e")),
            (".", json!(".")),
            ("\"12\"", json!("12")),
            ("'true'", json!("true")),
            ("30s", json!("30s")),
        ];
        for (text, expected) in cases {
            let source = format!("name: w\nsteps: [{{ id: a, task: q, input: {text} }}]\n");
            let definition = parse(&source).unwrap();
            let StepKind::Task { input, .. } = &definition.steps[0].kind else {
                panic!()
            };
            assert_eq!(input.eval(&json!({})).unwrap(), expected, "{text}");
        }
    }

    proptest::proptest! {
        /// Whatever the text, parsing reports problems rather than panicking.
        #[test]
        fn never_panics(source in "[a-z:{}\\[\\],\\- \n\"'$.&*!|#0-9]{0,80}") {
            let _ = parse(&source);
        }

        #[test]
        fn never_panics_inside_a_valid_shape(
            value in "[a-z:{}\\[\\],\\- \"'$.&*!|#0-9()+]{0,30}",
        ) {
            let source = format!(
                "name: w\nsteps:\n  - id: a\n    task: q\n    input: {value}\n    timeout: {value}\n"
            );
            let _ = parse(&source);
            let _ = parse(&format!("name: w\nsteps:\n  - id: a\n    task: q\n    input: \"${{ {value} }}\"\n"));
        }
    }

    #[test]
    fn anchors_and_block_scalars() {
        let source = r#"name: w
retry: &policy { max_attempts: 4 }
steps:
  - id: a
    task: q
    retry: *policy
    input:
      shared: &shared { k: "${ .input.k }" }
      again: *shared
      text: |
        ${ .input.k
           | tostring }
"#;
        let definition = parse(source).unwrap();
        assert_eq!(definition.steps[0].retry.as_ref().unwrap().max_attempts, 4);
        let StepKind::Task { input, .. } = &definition.steps[0].kind else {
            panic!()
        };
        assert_eq!(
            input.eval(&json!({"input": {"k": 1}})).unwrap(),
            json!({"shared": {"k": 1}, "again": {"k": 1}, "text": "1"})
        );
    }
}
