//! `weir bench`: a benchmark harness that runs workloads against a server (or several nodes)
//! over HTTP, with the example worker in a separate process, and prints figures.
//!
//! It measures; it asserts nothing. Every figure in BENCHMARKS.md names the command
//! that produced it.
//!
//! Workloads:
//! - `seq`: N instances of K task steps in a row;
//! - `fanout`: N instances of one `foreach` step over M items, each a task, all at once;
//! - `timers`: N instances that sleep T, then run one task; reports the timers' lateness;
//! - `start`: N starts of a one-task definition nobody serves; start throughput alone.
//!
//! With several `--server` URLs, starts go round-robin over the nodes, each instance is
//! awaited through the node it was started on, and one worker runs per node.
//!
//! Task dispatch latency (the request that made a task due, to the task in a worker's hands)
//! is only measured with `--inproc-worker`: the example worker process reports no per-task
//! times (see `workers::Dispatch`). With any worker, the servers' own histogram of how long
//! each task waited on their boards, from its offer to a worker's lease
//! (`weir_task_dispatch_seconds`), gives the run's dispatch waits (see `commits`).

mod commits;
mod report;
mod workers;
mod workloads;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::cli::Global;
use report::{cpu_between, process_cpu, process_rss_peak_kib, Report, ServerFigures, WorkerKind};
use workers::{Dispatch, InProcessWorkers};

/// Most in-flight instances a run may ask for.
const CONCURRENCY_MAX: usize = 100_000;

/// Most instances one run may ask for.
const INSTANCES_MAX: usize = 100_000_000;

/// Most task steps per `seq` instance.
const STEPS_MAX: usize = 100;

/// Most tasks per `fanout` instance: the most items a `foreach` may have.
const FANOUT_MAX: usize = weir_model::dsl::LANES_MAX;

/// Longest sleep of a `timers` instance: a benchmark that waits longer is not a benchmark.
const SLEEP_MS_MAX: u64 = 3_600_000;

/// The durability line printed when `--store-label` is not given: the embedded store's.
const STORE_LABEL_DEFAULT: &str = "SQLite WAL, synchronous=FULL (fsync per group commit)";

/// The queue the workers of `seq`, `fanout` and `timers` serve.
const QUEUE: &str = "bench";

/// A benchmark workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// N instances of K sequential task steps (`--steps`) with a no-op worker.
    Seq,
    /// N instances of one `foreach` step fanning out to M task steps at once (`--fanout`).
    Fanout,
    /// N instances that sleep T (`--sleep-ms`), then run one task step. Timer lateness is end
    /// minus start minus T, so it includes that task step; give the worker at least
    /// `--concurrency` slots, or tasks wait for one.
    Timers,
    /// N starts of a one-task definition whose queue nobody polls: start throughput alone.
    Start,
}

/// Who names the instances a run starts (`--ids`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ids {
    /// The bench, in order: `bench-<run>-<n>`, as a client that names its instances after
    /// an order number does. The server looks for an instance of each id before it starts one.
    Sequential,
    /// The bench, at random: 32 random hex digits each, as a client that names its
    /// instances with random UUIDs does. The server looks for each one first too.
    Random,
    /// The engine: starts carry no id, as from a client that does not retry them.
    Engine,
}

impl Ids {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Ids::Sequential => "sequential",
            Ids::Random => "random",
            Ids::Engine => "engine",
        }
    }

    /// The id of the run's instance number `n`; `None` for one the engine names.
    fn of(self, run_id: &str, n: usize) -> Option<String> {
        match self {
            Ids::Sequential => Some(format!("bench-{run_id}-{n}")),
            Ids::Random => Some(format!("{:032x}", rand::random::<u128>())),
            Ids::Engine => None,
        }
    }
}

impl Workload {
    fn as_str(self) -> &'static str {
        match self {
            Workload::Seq => "seq",
            Workload::Fanout => "fanout",
            Workload::Timers => "timers",
            Workload::Start => "start",
        }
    }
}

/// Flags of `weir bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Workload.
    #[arg(long, value_enum, default_value_t = Workload::Seq)]
    workload: Workload,
    /// Instances to run.
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// `seq`: task steps per instance.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// `fanout`: task steps per instance, all in progress at once.
    #[arg(long, default_value_t = 10, value_name = "M")]
    fanout: usize,
    /// `timers`: how long each instance sleeps, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    sleep_ms: u64,
    /// Instances in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Start the example worker (a separate process; one per node) with this many tasks in
    /// flight in all; 0 to bring your own worker for the queue `bench`.
    #[arg(long, default_value_t = 256)]
    worker_concurrency: usize,
    /// Serve the tasks with workers inside the bench process instead of example worker
    /// processes, and report task dispatch latency.
    #[arg(long)]
    inproc_worker: bool,
    /// Who names the instances. A client that retries starts safely names them, and the
    /// server then looks for an instance of each id before it starts one.
    #[arg(long, value_enum, default_value_t = Ids::Sequential)]
    ids: Ids,
    /// The server's pid, to report its CPU time and peak RSS; several (comma-separated) for
    /// several nodes on this machine.
    #[arg(long, value_delimiter = ',', value_name = "PID")]
    server_pid: Vec<u32>,
    /// The durability settings of the server(s), printed as the durability line.
    #[arg(long, default_value = STORE_LABEL_DEFAULT, value_name = "TEXT")]
    store_label: String,
}

/// Runs `weir bench`.
pub fn run(global: Global, args: BenchArgs) -> anyhow::Result<()> {
    if args.instances == 0 || args.instances > INSTANCES_MAX {
        bail!("instances must be from 1 to {INSTANCES_MAX}");
    }
    if args.concurrency == 0 || args.concurrency > CONCURRENCY_MAX {
        bail!("concurrency must be from 1 to {CONCURRENCY_MAX}");
    }
    if args.steps == 0 || args.steps > STEPS_MAX {
        bail!("steps must be from 1 to {STEPS_MAX}");
    }
    if args.fanout == 0 || args.fanout > FANOUT_MAX {
        bail!("fanout must be from 1 to {FANOUT_MAX}");
    }
    if args.sleep_ms == 0 || args.sleep_ms > SLEEP_MS_MAX {
        bail!("sleep-ms must be from 1 to {SLEEP_MS_MAX}");
    }
    let nodes: Vec<String> = global
        .servers
        .iter()
        .map(|url| url.trim().trim_end_matches('/').to_string())
        .filter(|url| !url.is_empty())
        .collect();
    if nodes.is_empty() {
        bail!("no server URL");
    }
    if nodes.len() > weir_sdk::SERVER_URLS_MAX {
        bail!("at most {} server URLs", weir_sdk::SERVER_URLS_MAX);
    }
    let worker_kind = worker_kind(&args, nodes.len())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(execute(nodes, &args, worker_kind))?;
    report::print(&report, global.output);
    Ok(())
}

/// Which workers the run starts, after checking the worker flags.
fn worker_kind(args: &BenchArgs, nodes: usize) -> anyhow::Result<WorkerKind> {
    if args.workload == Workload::Start {
        // Nobody serves the start workload's queue: that is the point.
        return Ok(WorkerKind::None);
    }
    if args.inproc_worker && args.ids == Ids::Engine {
        bail!("--inproc-worker follows instances by the ids the bench gives them: not with --ids engine");
    }
    if args.worker_concurrency == 0 {
        if args.inproc_worker {
            bail!("--inproc-worker needs --worker-concurrency of at least 1");
        }
        return Ok(WorkerKind::None);
    }
    if args.worker_concurrency < nodes {
        bail!("worker-concurrency must be at least the number of nodes ({nodes}): one worker runs per node");
    }
    let per_worker = args.worker_concurrency.div_ceil(nodes);
    if per_worker > weir_sdk::CONCURRENCY_MAX {
        bail!(
            "worker-concurrency of {} over {nodes} node(s) is more than {} per worker",
            args.worker_concurrency,
            weir_sdk::CONCURRENCY_MAX
        );
    }
    Ok(if args.inproc_worker {
        WorkerKind::InProcess
    } else {
        WorkerKind::Process
    })
}

/// What every instance loop of a run shares.
struct Shared {
    client: reqwest::Client,
    nodes: Vec<String>,
    /// The definition every instance runs.
    name: String,
    run_id: String,
    total: usize,
    /// Whether each instance is awaited to its end (all workloads but `start`).
    wait: bool,
    /// Who names the instances (`--ids`).
    ids: Ids,
    dispatch: Option<Arc<Dispatch>>,
    /// The next instance number to start.
    next: AtomicUsize,
    progress: indicatif::ProgressBar,
}

/// What one instance loop measured: per-instance latencies and how many did not complete.
type LoopResult = anyhow::Result<(Vec<Duration>, usize)>;

/// Starts instances one after another until the run's total is reached.
async fn instance_loop(shared: Arc<Shared>) -> LoopResult {
    let mut latencies = Vec::new();
    let mut failed = 0;
    loop {
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        if n >= shared.total {
            break;
        }
        let node = &shared.nodes[n % shared.nodes.len()];
        let id = shared.ids.of(&shared.run_id, n);
        let begin = Instant::now();
        // The in-process workers follow instances by the ids they were given; they never
        // run with engine-made ids (see `worker_kind`).
        let followed = shared.dispatch.as_ref().zip(id.as_deref());
        if let Some((dispatch, id)) = followed {
            dispatch.starting(id, begin);
        }
        if shared.wait {
            let status =
                workloads::start_and_wait(&shared.client, node, &shared.name, id.as_deref(), n)
                    .await?;
            latencies.push(begin.elapsed());
            if status != "completed" {
                failed += 1;
            }
        } else {
            workloads::start(&shared.client, node, &shared.name, id.as_deref(), n).await?;
            latencies.push(begin.elapsed());
        }
        if let Some((dispatch, id)) = followed {
            dispatch.ended(id);
        }
        shared.progress.inc(1);
    }
    Ok((latencies, failed))
}

async fn execute(
    nodes: Vec<String>,
    args: &BenchArgs,
    worker_kind: WorkerKind,
) -> anyhow::Result<Report> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let run_id = format!("{:08x}", rand::random::<u32>());
    let sleep = Duration::from_millis(args.sleep_ms);
    let (queue, (name, source)) = match args.workload {
        Workload::Seq => (QUEUE.to_owned(), workloads::seq_definition(args.steps)),
        Workload::Fanout => (QUEUE.to_owned(), workloads::fanout_definition(args.fanout)),
        Workload::Timers => (QUEUE.to_owned(), workloads::timers_definition(sleep)),
        Workload::Start => {
            let queue = format!("bench-start-{run_id}");
            let definition = workloads::start_definition(&queue);
            (queue, definition)
        }
    };
    workloads::deploy(&client, &nodes, &name, &source).await?;

    let dispatch = (worker_kind == WorkerKind::InProcess).then(|| {
        let (offset, chain) = match args.workload {
            Workload::Timers => (sleep, false),
            Workload::Seq => (Duration::ZERO, true),
            Workload::Fanout | Workload::Start => (Duration::ZERO, false),
        };
        Arc::new(Dispatch::new(offset, chain))
    });
    let processes = match worker_kind {
        WorkerKind::Process => workers::spawn_processes(&nodes, &queue, args.worker_concurrency)?,
        _ => Vec::new(),
    };
    let in_process = match &dispatch {
        Some(dispatch) => Some(InProcessWorkers::start(
            &nodes,
            &queue,
            args.worker_concurrency,
            dispatch.clone(),
        )?),
        None => None,
    };

    let servers_before: Vec<Option<Duration>> = args
        .server_pid
        .iter()
        .map(|pid| process_cpu(*pid))
        .collect();
    let client_before = process_cpu(std::process::id());
    let commits_before = commits::scrape(&client, &nodes).await;
    let workers_before = sum_cpu(processes.iter().map(|worker| worker.pid()));
    let what = match args.workload {
        Workload::Start => "starts",
        _ => "instances",
    };
    let progress = indicatif::ProgressBar::new(args.instances as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {what} {{per_sec}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let shared = Arc::new(Shared {
        client: client.clone(),
        nodes: nodes.clone(),
        name: name.clone(),
        run_id,
        total: args.instances,
        wait: args.workload != Workload::Start,
        ids: args.ids,
        dispatch: dispatch.clone(),
        next: AtomicUsize::new(0),
        progress: progress.clone(),
    });
    let started = Instant::now();
    let loops: Vec<_> = (0..args.concurrency.min(args.instances))
        .map(|_| tokio::spawn(instance_loop(shared.clone())))
        .collect();
    let mut latencies = Vec::with_capacity(args.instances);
    let mut failed = 0;
    for handle in loops {
        let (mut part, part_failed) = handle.await??;
        latencies.append(&mut part);
        failed += part_failed;
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let commits = match commits_before {
        Some(before) => commits::scrape(&client, &nodes)
            .await
            .and_then(|after| commits::between(&before, &after)),
        None => None,
    };

    let servers: Vec<ServerFigures> = args
        .server_pid
        .iter()
        .zip(servers_before)
        .map(|(pid, before)| ServerFigures {
            pid: *pid,
            cpu: cpu_between(before, process_cpu(*pid)),
            rss_peak_kib: process_rss_peak_kib(*pid),
        })
        .collect();
    let client_cpu = cpu_between(client_before, process_cpu(std::process::id()));
    let worker_cpu = cpu_between(
        workers_before,
        sum_cpu(processes.iter().map(|worker| worker.pid())),
    );
    // Measured; now the workers may go.
    drop(processes);
    if let Some(in_process) = in_process {
        in_process.stop().await?;
    }
    let pending = match args.workload {
        Workload::Start => {
            Some(workloads::count_running(&client, &nodes, &name, args.instances).await?)
        }
        _ => None,
    };
    Ok(Report {
        workload: args.workload,
        nodes,
        instances: args.instances,
        steps: args.steps,
        fanout: args.fanout,
        sleep,
        concurrency: args.concurrency,
        ids: args.ids,
        worker_concurrency: match worker_kind {
            WorkerKind::None => 0,
            _ => args.worker_concurrency,
        },
        worker_kind,
        elapsed,
        latencies,
        failed,
        dispatch: dispatch.map(|dispatch| dispatch.samples()),
        pending,
        queue: (args.workload == Workload::Start).then_some(queue),
        servers,
        client_cpu,
        worker_cpu,
        commits,
        store_label: args.store_label.clone(),
    })
}

/// CPU time of several processes together; `None` if any cannot be read, or there are none.
fn sum_cpu(pids: impl Iterator<Item = u32>) -> Option<Duration> {
    let mut total: Option<Duration> = None;
    for pid in pids {
        total = Some(total.unwrap_or_default() + process_cpu(pid)?);
    }
    total
}
