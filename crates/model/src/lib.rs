//! weir's pure model layer.
//!
//! Everything here is deterministic: no I/O, no clock, no randomness, no async.
//! The engine feeds it definitions, commands and the current time, and gets back
//! events to commit and effects to perform after the commit.
#![warn(missing_docs)]

pub mod deadline;
pub mod dsl;
pub mod duration;
pub mod event;
pub mod expr;
pub mod machine;
pub mod retry;

pub use dsl::{Definition, Problem, Step, StepKind};
pub use event::{Event, EventKind};
pub use expr::{Expr, Template};
pub use machine::{Command, Effect, InstanceState, InstanceStatus};
pub use retry::{Backoff, Jitter, RetryPolicy};
