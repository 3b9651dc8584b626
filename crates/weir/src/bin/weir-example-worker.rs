//! `weir-example-worker`: a worker for demos and tests that answers every task with a
//! deterministic echo of it, so that outputs can be checked as they flow between steps.
//!
//! The output of a task is
//! `{"queue": Q, "step": STEP_ID, "attempt": N, "input": INPUT, "id": "<Q>-<INSTANCE_ID>"}`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};
use weir_sdk::{Heartbeat, Task, TaskError, Worker, WorkerStats};

/// A weir worker that echoes every task it gets.
#[derive(Debug, Parser)]
#[command(name = "weir-example-worker", version, about)]
struct Options {
    /// Node URL of the weir cluster; several (comma-separated or repeated) are tried in order.
    #[arg(
        long = "server",
        env = "WEIR_SERVER",
        default_value = "http://127.0.0.1:7600",
        value_delimiter = ',',
        value_name = "URL"
    )]
    servers: Vec<String>,
    /// Task queues to serve, comma-separated.
    #[arg(
        long,
        default_value = "inventory,payments,shipping",
        value_delimiter = ','
    )]
    queues: Vec<String>,
    /// Most tasks handled at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Name given to the server (default: weir-example-worker-<process id>).
    #[arg(long)]
    worker_id: Option<String>,
    /// Fraction of tasks failed on purpose with a retryable error, from 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    fail_rate: f64,
    /// Do not print the per-second summary.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let options = Options::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> anyhow::Result<()> {
    let queues: Vec<String> = options
        .queues
        .iter()
        .map(|queue| queue.trim().to_owned())
        .filter(|queue| !queue.is_empty())
        .collect();
    if queues.is_empty() {
        anyhow::bail!("--queues names no queue");
    }
    let worker_id = options
        .worker_id
        .unwrap_or_else(|| format!("weir-example-worker-{}", std::process::id()));
    let fail_rate = options.fail_rate;
    let mut builder = Worker::builder(options.servers)
        .worker_id(worker_id.clone())
        .concurrency(options.concurrency);
    for queue in &queues {
        builder = builder.queue(queue.clone(), move |task, heartbeat| {
            handle(task, heartbeat, fail_rate)
        });
    }
    let worker = builder.build()?;
    let stats = worker.stats();
    if !options.quiet {
        eprintln!(
            "{worker_id}: serving {} with {} slots",
            queues.join(", "),
            options.concurrency
        );
        tokio::spawn(summarize(worker_id.clone(), stats.clone()));
    }
    let shutdown = {
        let stats = stats.clone();
        async move {
            shutdown_signal().await;
            eprintln!(
                "{worker_id}: shutting down, finishing {} tasks in flight (press Ctrl-C again to quit now)",
                stats.in_flight()
            );
            tokio::spawn(async {
                shutdown_signal().await;
                std::process::exit(130);
            });
        }
    };
    worker.run(shutdown).await?;
    if !options.quiet {
        eprintln!(
            "done: {} completed, {} failed, {} lease lost, {} unreported",
            stats.completed(),
            stats.failed(),
            stats.lease_lost(),
            stats.unreported()
        );
    }
    Ok(())
}

async fn handle(task: Task, _heartbeat: Heartbeat, fail_rate: f64) -> Result<Value, TaskError> {
    if fail_rate > 0.0 && rand::random::<f64>() < fail_rate {
        return Err(TaskError::retryable(
            "injected_failure",
            format!("failed on purpose (--fail-rate {fail_rate})"),
        ));
    }
    Ok(echo(task))
}

/// The output of every task: the task itself, in a stable shape.
fn echo(task: Task) -> Value {
    json!({
        "queue": task.queue,
        "step": task.step_id,
        "attempt": task.attempt,
        "id": format!("{}-{}", task.queue, task.instance_id),
        "input": task.input,
    })
}

/// Prints a line a second while there is work: the rate and the totals. Runs until the process
/// ends.
async fn summarize(worker_id: String, stats: WorkerStats) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut done_before = 0;
    let mut was_busy = false;
    loop {
        ticker.tick().await;
        let done = stats.completed() + stats.failed() + stats.lease_lost();
        let busy = done != done_before || stats.in_flight() > 0;
        if busy || was_busy {
            eprintln!(
                "{worker_id}: {} tasks/s, {} completed, {} failed, {} lease lost, {} in flight",
                done - done_before,
                stats.completed(),
                stats.failed(),
                stats.lease_lost(),
                stats.in_flight()
            );
        }
        done_before = done;
        was_busy = busy;
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    let fraction: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !(0.0..=1.0).contains(&fraction) {
        return Err(format!("{fraction} is not between 0.0 and 1.0"));
    }
    Ok(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_shape() {
        // Goal: the output is the documented echo, field by field.
        let task = Task {
            task_id: "t1".into(),
            queue: "payments".into(),
            instance_id: "o-1".into(),
            step_id: "charge".into(),
            attempt: 2,
            input: json!({"amount": 5}),
            idempotency_key: "o-1/charge".into(),
        };
        assert_eq!(
            echo(task),
            json!({"queue": "payments", "step": "charge", "attempt": 2,
                   "input": {"amount": 5}, "id": "payments-o-1"})
        );
    }

    #[test]
    fn fractions() {
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("-0.1").is_err());
        assert!(parse_fraction("NaN").is_err());
        assert!(parse_fraction("lots").is_err());
    }

    #[test]
    fn options() {
        let options = Options::try_parse_from([
            "weir-example-worker",
            "--server",
            "http://a:1,http://b:2",
            "--queues",
            "x,y",
        ])
        .expect("valid options");
        assert_eq!(options.servers, vec!["http://a:1", "http://b:2"]);
        assert_eq!(options.queues, vec!["x", "y"]);
        assert_eq!(options.concurrency, 64);
    }
}
