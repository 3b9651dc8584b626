//! `weir-example-worker`: a worker for demos and tests that answers every task with a
//! deterministic echo of it, so that outputs can be checked as they flow between steps.
//!
//! The output of a task is
//! `{"queue": Q, "step": STEP_ID, "attempt": N, "input": INPUT, "id": "<Q>-<INSTANCE_ID>"}`.
//!
//! Chaos flags make it misbehave on purpose, for tests of the engine's guarantees. For every
//! task (except those of `--never-fail-queues`) four independent random draws are made, in
//! this order, from one RNG seeded by `--seed`:
//!
//! 1. `--fatal-rate`: fail with `{"type": "fatal", "retryable": false}`;
//! 2. else `--fail-rate`: fail with `{"type": "flaky", "retryable": true}`;
//! 3. `--stall-rate`: sleep `--stall-ms` before completing (the step's timeout may expire
//!    meanwhile; the late completion's 409 counts as a lost lease);
//! 4. `--duplicate-rate`: complete twice in a row; the second completion's 409 is expected
//!    and counted as `duplicates_refused`.
//!
//! On exit (unless `--quiet`) one line on stderr sums up:
//! `<worker id>: done: completed=N failed_retryable=N failed_fatal=N stalled=N
//! duplicates_refused=N lease_lost=N duplicates_accepted=N unreported=N`.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use weir_sdk::{Heartbeat, Task, TaskError, Worker, WorkerStats};

/// mimalloc, as in the server: a worker allocates a few small short-lived objects per
/// task (requests, JSON values), and glibc's allocator took about 10% of this worker's CPU
/// at 16 instances in flight (BENCHMARKS.md, "Thirteenth optimisation pass").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Threads of the async runtime. One is enough for handlers that await rather than
    /// compute, and hands each task between fewer threads than several would.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: u16,
    /// Takes every task from a poll: completions ask for no next task in their answers.
    #[arg(long)]
    no_next_on_completion: bool,
    /// Name given to the server (default: weir-example-worker-<process id>).
    #[arg(long)]
    worker_id: Option<String>,
    /// Fraction of tasks failed on purpose with a retryable error of type `flaky`, from 0.0
    /// to 1.0.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    fail_rate: f64,
    /// Fraction of tasks failed on purpose with a non-retryable error of type `fatal`
    /// (drawn before `--fail-rate`).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    fatal_rate: f64,
    /// Fraction of tasks whose handler sleeps `--stall-ms` before completing.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    stall_rate: f64,
    /// How long a stalled task sleeps, in milliseconds.
    #[arg(long, default_value_t = 3000, value_name = "MS")]
    stall_ms: u64,
    /// Fraction of tasks completed twice, the second completion right after the first.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    duplicate_rate: f64,
    /// Seed of the chaos RNG (default: random); printed at start.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Queues whose tasks never fail, stall or complete twice (e.g. compensation queues),
    /// comma-separated; they are served even when `--queues` does not name them.
    #[arg(long, value_delimiter = ',', value_name = "QUEUES")]
    never_fail_queues: Vec<String>,
    /// Print no progress and no summary (the seed is printed still).
    #[arg(long)]
    quiet: bool,
}

/// The chaos to inflict, shared by every handler.
#[derive(Debug)]
struct Chaos {
    fatal_rate: f64,
    fail_rate: f64,
    stall_rate: f64,
    stall: Duration,
    duplicate_rate: f64,
    never_fail: BTreeSet<String>,
    rng: Mutex<StdRng>,
    counts: ChaosCounts,
}

/// What the chaos did, beyond the worker's own counters.
#[derive(Debug, Default)]
struct ChaosCounts {
    stalled: AtomicU64,
    duplicates_refused: AtomicU64,
    /// Second completions the server accepted: should stay 0.
    duplicates_accepted: AtomicU64,
}

/// What happens to one task.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Decision {
    fatal: bool,
    fail: bool,
    stall: bool,
    duplicate: bool,
}

impl Chaos {
    /// Draws the fate of a task of `queue`: four independent draws, in the order fatal, fail,
    /// stall, duplicate; none for a never-fail queue.
    fn decide(&self, queue: &str) -> Decision {
        if self.never_fail.contains(queue) {
            return Decision::default();
        }
        // A poisoned lock only means a handler panicked while drawing; the RNG is still fine.
        let mut rng = self
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut draw = |rate: f64| rng.random::<f64>() < rate;
        Decision {
            fatal: draw(self.fatal_rate),
            fail: draw(self.fail_rate),
            stall: draw(self.stall_rate),
            duplicate: draw(self.duplicate_rate),
        }
    }
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
        .worker_threads(usize::from(options.threads))
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
    let never_fail: BTreeSet<String> = names(&options.never_fail_queues).collect();
    let mut queues: Vec<String> = names(&options.queues).collect();
    for queue in &never_fail {
        if !queues.contains(queue) {
            queues.push(queue.clone());
        }
    }
    if queues.is_empty() {
        anyhow::bail!("--queues names no queue");
    }
    let worker_id = options
        .worker_id
        .unwrap_or_else(|| format!("weir-example-worker-{}", std::process::id()));
    let seed = options.seed.unwrap_or_else(rand::random);
    eprintln!("{worker_id}: chaos seed {seed}");
    let chaos = Arc::new(Chaos {
        fatal_rate: options.fatal_rate,
        fail_rate: options.fail_rate,
        stall_rate: options.stall_rate,
        stall: Duration::from_millis(options.stall_ms),
        duplicate_rate: options.duplicate_rate,
        never_fail,
        rng: Mutex::new(StdRng::seed_from_u64(seed)),
        counts: ChaosCounts::default(),
    });
    let mut builder = Worker::builder(options.servers)
        .worker_id(worker_id.clone())
        .concurrency(options.concurrency)
        .next_on_completion(!options.no_next_on_completion);
    for queue in &queues {
        let chaos = chaos.clone();
        builder = builder.queue(queue.clone(), move |task, heartbeat| {
            handle(task, heartbeat, chaos.clone())
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
        let worker_id = worker_id.clone();
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
    let result = worker.run(shutdown).await;
    if !options.quiet {
        eprintln!("{worker_id}: done: {}", summary(&stats, &chaos.counts));
    }
    result?;
    Ok(())
}

/// The non-empty trimmed names of a comma-separated list.
fn names(list: &[String]) -> impl Iterator<Item = String> + '_ {
    list.iter()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

/// The exit summary: `key=value` pairs, the keys fixed (tests read them).
fn summary(stats: &WorkerStats, counts: &ChaosCounts) -> String {
    format!(
        "completed={} failed_retryable={} failed_fatal={} stalled={} duplicates_refused={} \
         lease_lost={} duplicates_accepted={} unreported={}",
        stats.completed(),
        stats.failed_retryable(),
        stats.failed_non_retryable(),
        counts.stalled.load(Ordering::Relaxed),
        counts.duplicates_refused.load(Ordering::Relaxed),
        stats.lease_lost(),
        counts.duplicates_accepted.load(Ordering::Relaxed),
        stats.unreported(),
    )
}

async fn handle(task: Task, heartbeat: Heartbeat, chaos: Arc<Chaos>) -> Result<Value, TaskError> {
    let decision = chaos.decide(&task.queue);
    if decision.fatal {
        return Err(TaskError::non_retryable(
            "fatal",
            format!("failed on purpose (--fatal-rate {})", chaos.fatal_rate),
        ));
    }
    if decision.fail {
        return Err(TaskError::retryable(
            "flaky",
            format!("failed on purpose (--fail-rate {})", chaos.fail_rate),
        ));
    }
    if decision.stall {
        chaos.counts.stalled.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(chaos.stall).await;
    }
    let output = echo(task);
    if decision.duplicate {
        complete_twice(&heartbeat, &output, &chaos.counts).await;
    }
    // After a completion by `complete_twice` the worker ignores this; otherwise (the first
    // completion could not be sent) it reports it as usual.
    Ok(output)
}

/// Completes the task, then at once again. The second completion must be refused (409): a
/// server that accepts it is counted and logged.
async fn complete_twice(heartbeat: &Heartbeat, output: &Value, counts: &ChaosCounts) {
    // A lost lease or an unreachable server: no duplicate to make; the worker accounts for it.
    if heartbeat.complete(output).await.is_err() {
        return;
    }
    match heartbeat.complete(output).await {
        Err(error) if error.is_stale_lease() => {
            counts.duplicates_refused.fetch_add(1, Ordering::Relaxed);
        }
        Ok(()) => {
            counts.duplicates_accepted.fetch_add(1, Ordering::Relaxed);
            tracing::error!("the server accepted a duplicate completion");
        }
        Err(error) => tracing::warn!(%error, "duplicate completion not delivered"),
    }
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
        assert!(!options.no_next_on_completion);
        assert_eq!(options.stall_ms, 3000);
        assert_eq!(options.seed, None);
        assert!(options.never_fail_queues.is_empty());
        assert_eq!(
            (
                options.fatal_rate,
                options.fail_rate,
                options.stall_rate,
                options.duplicate_rate
            ),
            (0.0, 0.0, 0.0, 0.0)
        );

        let options = Options::try_parse_from([
            "weir-example-worker",
            "--fail-rate",
            "0.3",
            "--fatal-rate",
            "0.05",
            "--stall-rate",
            "0.01",
            "--stall-ms",
            "1500",
            "--duplicate-rate",
            "0.05",
            "--seed",
            "7",
            "--never-fail-queues",
            "inventory-release,payments-refund",
        ])
        .expect("valid chaos options");
        assert_eq!(
            (
                options.fatal_rate,
                options.fail_rate,
                options.stall_rate,
                options.duplicate_rate
            ),
            (0.05, 0.3, 0.01, 0.05)
        );
        assert_eq!(options.stall_ms, 1500);
        assert_eq!(options.seed, Some(7));
        assert_eq!(
            options.never_fail_queues,
            vec!["inventory-release", "payments-refund"]
        );
        assert!(Options::try_parse_from(["weir-example-worker", "--duplicate-rate", "2"]).is_err());
    }

    fn chaos(rates: [f64; 4], seed: u64) -> Chaos {
        Chaos {
            fatal_rate: rates[0],
            fail_rate: rates[1],
            stall_rate: rates[2],
            stall: Duration::from_millis(1),
            duplicate_rate: rates[3],
            never_fail: ["safe".to_owned()].into(),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            counts: ChaosCounts::default(),
        }
    }

    #[test]
    fn decisions_are_seeded_independent_draws() {
        // Goal: one seed gives one sequence of decisions; each rate is met about as often as
        // asked, independently of the others; never-fail queues draw nothing. Method: 20,000
        // decisions with distinct rates.
        let rates = [0.1, 0.3, 0.05, 0.2];
        let first = chaos(rates, 42);
        let second = chaos(rates, 42);
        let mut counts = [0usize; 4];
        let mut both_fatal_and_fail = 0;
        let draws = 20_000;
        for _ in 0..draws {
            let decision = first.decide("q");
            assert_eq!(decision, second.decide("q"));
            for (count, drawn) in counts.iter_mut().zip([
                decision.fatal,
                decision.fail,
                decision.stall,
                decision.duplicate,
            ]) {
                *count += usize::from(drawn);
            }
            both_fatal_and_fail += usize::from(decision.fatal && decision.fail);
        }
        for (count, rate) in counts.iter().zip(rates) {
            let share = *count as f64 / draws as f64;
            assert!((share - rate).abs() < 0.02, "{share} for {rate}");
        }
        // Independent: fatal and fail both drawn about rate × rate of the time.
        let share = both_fatal_and_fail as f64 / draws as f64;
        assert!((share - 0.03).abs() < 0.01, "{share}");
        assert_eq!(first.decide("safe"), Decision::default());
        let all = chaos([1.0; 4], 1).decide("q");
        assert!(all.fatal && all.fail && all.stall && all.duplicate);
        assert_eq!(chaos([0.0; 4], 1).decide("q"), Decision::default());
    }

    #[tokio::test]
    async fn handler_follows_its_decision() {
        // Goal: fatal wins over flaky, with the documented error types; a stall still
        // completes with the echo. Method: certain decisions, a detached lease.
        let task = || Task {
            task_id: "t1".into(),
            queue: "q".into(),
            instance_id: "o-1".into(),
            step_id: "s".into(),
            attempt: 1,
            input: json!(null),
            idempotency_key: "k".into(),
        };
        let error = handle(task(), Heartbeat::detached(), Arc::new(chaos([1.0; 4], 1)))
            .await
            .expect_err("fatal");
        assert_eq!(
            (error.error_type.as_str(), error.retryable),
            ("fatal", false)
        );
        let error = handle(
            task(),
            Heartbeat::detached(),
            Arc::new(chaos([0.0, 1.0, 0.0, 0.0], 1)),
        )
        .await
        .expect_err("flaky");
        assert_eq!(
            (error.error_type.as_str(), error.retryable),
            ("flaky", true)
        );
        let stalling = Arc::new(chaos([0.0, 0.0, 1.0, 0.0], 1));
        let output = handle(task(), Heartbeat::detached(), stalling.clone())
            .await
            .expect("completes after the stall");
        assert_eq!(output, echo(task()));
        assert_eq!(stalling.counts.stalled.load(Ordering::Relaxed), 1);
        let mut safe = task();
        safe.queue = "safe".into();
        assert!(
            handle(safe, Heartbeat::detached(), Arc::new(chaos([1.0; 4], 1)))
                .await
                .is_ok()
        );
    }

    #[test]
    fn summary_names_every_count() {
        let text = summary(&WorkerStats::default(), &ChaosCounts::default());
        assert_eq!(
            text,
            "completed=0 failed_retryable=0 failed_fatal=0 stalled=0 duplicates_refused=0 \
             lease_lost=0 duplicates_accepted=0 unreported=0"
        );
    }
}
