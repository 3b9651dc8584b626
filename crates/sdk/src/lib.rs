//! The Rust SDK of weir, the fault-tolerant workflow engine.
//!
//! Two parts:
//!
//! - [`Worker`]: a worker process's engine. It long-polls task queues on one or more weir nodes,
//!   runs a handler per task (several at once, up to a limit), heartbeats long tasks, reports
//!   results, moves to another node when one fails, and shuts down gracefully.
//! - [`Client`]: one method per HTTP API call (definitions, instances, tasks), with the same
//!   failover between nodes. The `weir` command line is built on it.
//!
//! A task may run more than once (its lease can expire while a worker is paused), so handlers
//! should make their side effects idempotent, e.g. with [`Task::idempotency_key`].
//!
//! ```no_run
//! use serde_json::json;
//! use weir_sdk::{TaskError, Worker};
//!
//! # async fn example() -> Result<(), weir_sdk::Error> {
//! let worker = Worker::builder(vec![
//!     "http://10.0.0.1:7600".into(),
//!     "http://10.0.0.2:7600".into(),
//! ])
//! .queue("inventory", |task, _heartbeat| async move {
//!     let sku = task.input["sku"]
//!         .as_str()
//!         .ok_or_else(|| TaskError::non_retryable("invalid_input", "sku must be a string"))?;
//!     Ok(json!({ "reserved": sku, "reservation": task.idempotency_key }))
//! })
//! .concurrency(64)
//! .build()?;
//! let stats = worker.stats();
//! worker
//!     .run(async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await?;
//! println!("{} tasks completed", stats.completed());
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod client;
mod error;
mod wire;
mod worker;

pub use client::{
    Client, NextTasks, SourceFormat, COMPLETIONS_BATCH_MAX, REQUEST_TIMEOUT_DEFAULT,
    SERVER_URLS_MAX,
};
pub use error::{ApiError, Error, Problem};
pub use wire::{
    DefinitionSource, DefinitionSummary, Deployed, Event, HumanTask, Instance, InstanceError,
    InstanceFilter, InstancePage, InstanceStatus, PolledTask, StartRequest, Started,
};
pub use worker::{
    Heartbeat, Task, TaskError, Worker, WorkerBuilder, WorkerStats, CONCURRENCY_MAX,
    HEARTBEAT_INTERVAL_MIN, POLL_TASKS_MAX, POLL_WAIT_MAX,
};
