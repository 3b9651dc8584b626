//! `weir bench`: a benchmark harness that runs workloads against a server over HTTP,
//! with the example worker in a separate process, and prints figures.
//!
//! It measures; it asserts nothing. Every figure in BENCHMARKS.md names the command
//! that produced it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cli::{Global, Output};

/// Most in-flight instances a run may ask for.
const CONCURRENCY_MAX: usize = 100_000;

/// Flags of `weir bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Workload: `seq` (N instances of K sequential task steps with a no-op worker).
    #[arg(long, default_value = "seq")]
    workload: String,
    /// Instances to run.
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Task steps per instance.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Instances in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Start the example worker (a separate process) with this many tasks in flight; 0 to
    /// bring your own worker for the queue `bench`.
    #[arg(long, default_value_t = 256)]
    worker_concurrency: usize,
    /// The server's pid, to report its CPU time and peak RSS.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// What one run measured.
struct Report {
    instances: usize,
    steps: usize,
    concurrency: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    failed: usize,
    server_cpu: Option<Duration>,
    server_rss_peak_kib: Option<u64>,
}

/// Runs `weir bench`.
pub fn run(global: Global, args: BenchArgs) -> anyhow::Result<()> {
    if args.workload != "seq" {
        bail!(
            "unknown workload `{}`: only `seq` exists yet",
            args.workload
        );
    }
    if args.concurrency == 0 || args.concurrency > CONCURRENCY_MAX {
        bail!("concurrency must be from 1 to {CONCURRENCY_MAX}");
    }
    if args.steps == 0 || args.steps > 100 {
        bail!("steps must be from 1 to 100");
    }
    let base = global
        .servers
        .first()
        .cloned()
        .context("no server URL")?
        .trim_end_matches('/')
        .to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run_seq(&base, &args))?;
    print_report(&report, global.output, &args);
    Ok(())
}

struct WorkerProcess(Child);

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // SIGTERM for a graceful stop, then make sure.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("weir-example-worker");
    if !path.exists() {
        bail!(
            "{} not found; build it (cargo build --release) or pass --worker-concurrency 0",
            path.display()
        );
    }
    Ok(path)
}

async fn run_seq(base: &str, args: &BenchArgs) -> anyhow::Result<Report> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let name = format!("bench-seq-{}", args.steps);
    let mut definition = format!("name: {name}\nsteps:\n");
    for step in 0..args.steps {
        definition.push_str(&format!(
            "  - id: s{step}\n    task: bench\n    input: {{ n: \"${{ .input.n }}\" }}\n"
        ));
    }
    let response = client
        .post(format!("{base}/v1/definitions"))
        .header("content-type", "application/yaml")
        .body(definition)
        .send()
        .await
        .with_context(|| format!("deploying to {base}"))?;
    if response.status().as_u16() != 201 {
        bail!(
            "deploy answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }

    let _worker = if args.worker_concurrency > 0 {
        let child = Command::new(worker_binary()?)
            .args([
                "--server",
                base,
                "--queues",
                "bench",
                "--quiet",
                "--concurrency",
            ])
            .arg(args.worker_concurrency.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the example worker")?;
        Some(WorkerProcess(child))
    } else {
        None
    };

    let run_id = format!("{:08x}", rand::random::<u32>());
    let cpu_before = args.server_pid.and_then(process_cpu);
    let progress = indicatif::ProgressBar::new(args.instances as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} instances {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut loops = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency.min(args.instances) {
        let client = client.clone();
        let next = next.clone();
        let base = base.to_string();
        let name = name.clone();
        let run_id = run_id.clone();
        let progress = progress.clone();
        let total = args.instances;
        loops.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let id = format!("bench-{run_id}-{n}");
                let begin = Instant::now();
                let status = run_one(&client, &base, &name, &id, n).await?;
                latencies.push(begin.elapsed());
                if status != "completed" {
                    failed += 1;
                }
                progress.inc(1);
            }
            Ok::<_, anyhow::Error>((latencies, failed))
        }));
    }
    let mut latencies = Vec::with_capacity(args.instances);
    let mut failed = 0;
    for handle in loops {
        let (mut part, part_failed) = handle.await??;
        latencies.append(&mut part);
        failed += part_failed;
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let server_cpu = match (cpu_before, args.server_pid.and_then(process_cpu)) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    Ok(Report {
        instances: args.instances,
        steps: args.steps,
        concurrency: args.concurrency,
        elapsed,
        latencies,
        failed,
        server_cpu,
        server_rss_peak_kib: args.server_pid.and_then(process_rss_peak_kib),
    })
}

/// Starts one instance and waits for its end; returns its final status.
async fn run_one(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    id: &str,
    n: usize,
) -> anyhow::Result<String> {
    let body = json!({ "definition": name, "id": id, "input": { "n": n } });
    let response = client
        .post(format!("{base}/v1/instances"))
        .json(&body)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!(
            "start answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    loop {
        let response = client
            .get(format!("{base}/v1/instances/{id}?wait_ms=30000"))
            .send()
            .await?;
        let instance: Value = response.json().await?;
        match instance["status"].as_str() {
            Some("running") => continue,
            Some(status) => return Ok(status.to_string()),
            None => bail!("unexpected answer: {instance}"),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {model}")
}

/// User plus system CPU time of a process, from /proc.
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Some(Duration::from_millis((utime + stime) * 1000 / ticks.max(1)))
}

/// Peak resident set size of a process, from /proc.
fn process_rss_peak_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn print_report(report: &Report, output: Output, args: &BenchArgs) {
    let mut sorted = report.latencies.clone();
    sorted.sort();
    let seconds = report.elapsed.as_secs_f64();
    let instances_per_second = report.instances as f64 / seconds;
    let steps_per_second = (report.instances * report.steps) as f64 / seconds;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let figures = json!({
        "workload": "seq",
        "instances": report.instances,
        "steps_per_instance": report.steps,
        "concurrency": report.concurrency,
        "worker_concurrency": args.worker_concurrency,
        "failed": report.failed,
        "elapsed_s": seconds,
        "instances_per_s": instances_per_second,
        "step_completions_per_s": steps_per_second,
        "latency_ms": {
            "p50": ms(percentile(&sorted, 0.50)),
            "p90": ms(percentile(&sorted, 0.90)),
            "p99": ms(percentile(&sorted, 0.99)),
            "max": ms(sorted.last().copied().unwrap_or_default()),
        },
        "server_cpu_s": report.server_cpu.map(|d| d.as_secs_f64()),
        "server_rss_peak_mib": report.server_rss_peak_kib.map(|k| k as f64 / 1024.0),
        "durability": "SQLite WAL, synchronous=FULL (fsync per group commit)",
        "machine": machine(),
    });
    match output {
        Output::Json => println!("{figures}"),
        Output::Table => {
            println!(
                "workload            seq: {} instances x {} task steps",
                report.instances, report.steps
            );
            println!(
                "concurrency         {} instances in flight, worker {} tasks",
                report.concurrency, args.worker_concurrency
            );
            println!(
                "elapsed             {seconds:.2} s ({} not completed)",
                report.failed
            );
            println!("instances/s         {instances_per_second:.0}");
            println!("step completions/s  {steps_per_second:.0}");
            println!(
                "latency (ms)        p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
                ms(percentile(&sorted, 0.50)),
                ms(percentile(&sorted, 0.90)),
                ms(percentile(&sorted, 0.99)),
                ms(sorted.last().copied().unwrap_or_default())
            );
            if let Some(cpu) = report.server_cpu {
                println!("server CPU          {:.2} s", cpu.as_secs_f64());
            }
            if let Some(rss) = report.server_rss_peak_kib {
                println!("server peak RSS     {:.1} MiB", rss as f64 / 1024.0);
            }
            println!("durability          SQLite WAL, synchronous=FULL (fsync per group commit)");
            println!("machine             {}", machine());
        }
    }
}
