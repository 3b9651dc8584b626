//! What a run measured, the machine it ran on, and how the figures are printed: a table for
//! people, one JSON object for scripts.
//!
//! The JSON keys of `seq` are stable (scripts and BENCHMARKS.md read them); every workload has
//! the common keys, and its own keys beside them.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::commits::{CommitFigures, DispatchWaits};
use super::{Ids, Workload};
use crate::cli::Output;

/// How the tasks of a run were served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WorkerKind {
    /// Example worker processes, one per node.
    Process,
    /// Workers inside the bench process (`--inproc-worker`), which also time dispatch.
    InProcess,
    /// None from the bench: the `start` workload, or `--worker-concurrency 0`.
    None,
}

impl WorkerKind {
    fn as_str(self) -> &'static str {
        match self {
            WorkerKind::Process => "process",
            WorkerKind::InProcess => "inproc",
            WorkerKind::None => "none",
        }
    }
}

/// CPU time and peak memory of one server process, from `--server-pid`.
#[derive(Debug, Clone)]
pub(super) struct ServerFigures {
    pub pid: u32,
    /// CPU time over the measured interval; `None` when /proc could not be read.
    pub cpu: Option<Duration>,
    pub rss_peak_kib: Option<u64>,
}

/// What one run measured.
#[derive(Debug)]
pub(super) struct Report {
    pub workload: Workload,
    pub nodes: Vec<String>,
    pub instances: usize,
    /// Task steps per instance (`seq`).
    pub steps: usize,
    /// Tasks per instance (`fanout`).
    pub fanout: usize,
    /// The sleep of every instance (`timers`).
    pub sleep: Duration,
    pub concurrency: usize,
    /// Who named the instances (`--ids`).
    pub ids: Ids,
    pub worker_concurrency: usize,
    pub worker_kind: WorkerKind,
    pub elapsed: Duration,
    /// Per instance: start to end (`start`: the start request alone).
    pub latencies: Vec<Duration>,
    /// Instances that ended other than `completed`.
    pub failed: usize,
    /// Per task, with `--inproc-worker`: from the request that made the task due to the task
    /// in the worker's hands (see `workers::Dispatch`).
    pub dispatch: Option<Vec<Duration>>,
    /// `start`: the run's instances still running when it ended, and their queue.
    pub pending: Option<usize>,
    pub queue: Option<String>,
    pub servers: Vec<ServerFigures>,
    /// CPU of the bench process itself (client, and the in-process worker if any).
    pub client_cpu: Option<Duration>,
    /// CPU of the example worker processes together.
    pub worker_cpu: Option<Duration>,
    /// The servers' group commits during the run, from their metrics.
    pub commits: Option<CommitFigures>,
    pub store_label: String,
}

impl Report {
    /// Tasks every instance runs: completions per instance.
    fn tasks_per_instance(&self) -> usize {
        match self.workload {
            Workload::Seq => self.steps,
            Workload::Fanout => self.fanout,
            Workload::Timers => 1,
            Workload::Start => 0,
        }
    }

    /// Server CPU summed over the nodes measured; `None` unless every node was measured.
    fn server_cpu(&self) -> Option<Duration> {
        if self.servers.is_empty() {
            return None;
        }
        self.servers.iter().map(|server| server.cpu).sum()
    }

    /// The largest peak RSS of the nodes measured (a node's size is what one sizes machines by).
    fn server_rss_peak_kib(&self) -> Option<u64> {
        self.servers
            .iter()
            .filter_map(|server| server.rss_peak_kib)
            .max()
    }

    /// At one instance in flight, where commits follow one another: the run's time per
    /// commit, and that minus the mean WAL sync (what a step costs beyond its fsync).
    fn commit_cycle(&self) -> Option<(Duration, Option<Duration>)> {
        let commits = self.commits?;
        if self.concurrency != 1 {
            return None;
        }
        let cycle = self.elapsed.div_f64(commits.commits as f64);
        let beyond = commits
            .wal_syncs
            .map(|(_, sync)| cycle.saturating_sub(sync));
        Some((cycle, beyond))
    }

    /// Timer lateness per instance: end minus start minus the sleep. The timer cannot fire
    /// before its due time, which the server computes after the start arrives, so the
    /// difference is never negative; saturation only guards against a clock surprise.
    fn lateness(&self) -> Vec<Duration> {
        let mut lateness: Vec<Duration> = self
            .latencies
            .iter()
            .map(|latency| latency.saturating_sub(self.sleep))
            .collect();
        lateness.sort();
        lateness
    }
}

/// The sample at quantile `p` (0.0 to 1.0) of a sorted list; zero for an empty list.
pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// `{"p50", "p90", "p99", "max"}` in milliseconds, of a sorted list.
fn quantiles_json(sorted: &[Duration]) -> Value {
    json!({
        "p50": ms(percentile(sorted, 0.50)),
        "p90": ms(percentile(sorted, 0.90)),
        "p99": ms(percentile(sorted, 0.99)),
        "max": ms(sorted.last().copied().unwrap_or_default()),
    })
}

/// `p50 … p90 … p99 … max …` in milliseconds, of a sorted list.
fn quantiles_text(sorted: &[Duration]) -> String {
    format!(
        "p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        ms(percentile(sorted, 0.50)),
        ms(percentile(sorted, 0.90)),
        ms(percentile(sorted, 0.99)),
        ms(sorted.last().copied().unwrap_or_default())
    )
}

/// The machine the bench runs on: cores and CPU model.
pub(super) fn machine() -> String {
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
pub(super) fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf reads a configuration value; it has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Some(Duration::from_millis((utime + stime) * 1000 / ticks.max(1)))
}

/// Peak resident set size of a process, from /proc.
pub(super) fn process_rss_peak_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The CPU a process used between two readings.
pub(super) fn cpu_between(before: Option<Duration>, after: Option<Duration>) -> Option<Duration> {
    match (before, after) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    }
}

/// The figures as one JSON object.
fn to_json(report: &Report) -> Value {
    let mut sorted = report.latencies.clone();
    sorted.sort();
    let seconds = report.elapsed.as_secs_f64();
    let instances_per_second = report.instances as f64 / seconds;
    let tasks_per_second = (report.instances * report.tasks_per_instance()) as f64 / seconds;
    // The keys of the first version (seq only) first; they keep their names and meanings.
    let mut figures = json!({
        "workload": report.workload.as_str(),
        "instances": report.instances,
        "concurrency": report.concurrency,
        "worker_concurrency": report.worker_concurrency,
        "failed": report.failed,
        "elapsed_s": seconds,
        "instances_per_s": instances_per_second,
        "latency_ms": quantiles_json(&sorted),
        "server_cpu_s": report.server_cpu().map(|d| d.as_secs_f64()),
        "server_rss_peak_mib": report.server_rss_peak_kib().map(|k| k as f64 / 1024.0),
        "durability": report.store_label,
        "machine": machine(),
    });
    let Some(object) = figures.as_object_mut() else {
        return figures;
    };
    let mut extra = Map::new();
    extra.insert("nodes".into(), json!(report.nodes));
    extra.insert("worker".into(), json!(report.worker_kind.as_str()));
    extra.insert("ids".into(), json!(report.ids.as_str()));
    extra.insert(
        "latency_of".into(),
        json!(match report.workload {
            Workload::Start => "start request",
            _ => "start to end of instance",
        }),
    );
    extra.insert(
        "client_cpu_s".into(),
        json!(report.client_cpu.map(|d| d.as_secs_f64())),
    );
    extra.insert(
        "worker_cpu_s".into(),
        json!(report.worker_cpu.map(|d| d.as_secs_f64())),
    );
    if let Some(commits) = &report.commits {
        extra.insert(
            "commits".into(),
            json!({
                "count": commits.commits,
                "mean_ms": ms(commits.commit_mean),
                "batches_per_commit": commits.batches_per_commit,
                "in_place": commits.in_place,
            }),
        );
        if let Some((count, mean)) = commits.wal_syncs {
            extra.insert(
                "wal_syncs".into(),
                json!({ "count": count, "mean_ms": ms(mean) }),
            );
        }
        if let Some(waits) = &commits.dispatch {
            extra.insert("dispatch_wait_ms".into(), dispatch_waits_json(waits));
        }
    }
    if let Some((cycle, beyond)) = report.commit_cycle() {
        extra.insert("commit_cycle_ms".into(), json!(ms(cycle)));
        extra.insert("beyond_wal_sync_ms".into(), json!(beyond.map(ms)));
    }
    if !report.servers.is_empty() {
        let servers: Vec<Value> = report
            .servers
            .iter()
            .map(|server| {
                json!({
                    "pid": server.pid,
                    "cpu_s": server.cpu.map(|d| d.as_secs_f64()),
                    "rss_peak_mib": server.rss_peak_kib.map(|k| k as f64 / 1024.0),
                })
            })
            .collect();
        extra.insert("servers".into(), json!(servers));
    }
    match report.workload {
        Workload::Seq => {
            extra.insert("steps_per_instance".into(), json!(report.steps));
            extra.insert("step_completions_per_s".into(), json!(tasks_per_second));
            extra.insert("task_completions_per_s".into(), json!(tasks_per_second));
        }
        Workload::Fanout => {
            extra.insert("fanout".into(), json!(report.fanout));
            extra.insert("task_completions_per_s".into(), json!(tasks_per_second));
        }
        Workload::Timers => {
            extra.insert("sleep_ms".into(), json!(ms(report.sleep)));
            extra.insert(
                "timer_lateness_ms".into(),
                quantiles_json(&report.lateness()),
            );
            extra.insert("task_completions_per_s".into(), json!(tasks_per_second));
        }
        Workload::Start => {
            extra.insert("starts_per_s".into(), json!(instances_per_second));
            extra.insert("pending".into(), json!(report.pending));
            extra.insert("queue".into(), json!(report.queue));
        }
    }
    if let Some(dispatch) = &report.dispatch {
        let mut sorted = dispatch.clone();
        sorted.sort();
        let mut quantiles = quantiles_json(&sorted);
        if let Some(quantiles) = quantiles.as_object_mut() {
            quantiles.insert("samples".into(), json!(sorted.len()));
        }
        extra.insert("dispatch_ms".into(), quantiles);
        extra.insert(
            "dispatch_of".into(),
            json!(dispatch_meaning(report.workload)),
        );
    }
    object.extend(extra);
    figures
}

/// The servers' dispatch waits (see [`DispatchWaits`]), in milliseconds.
fn dispatch_waits_json(waits: &DispatchWaits) -> Value {
    json!({
        "tasks": waits.count,
        "mean": ms(waits.mean),
        "p50": ms(waits.p50),
        "p90": ms(waits.p90),
        "p99": ms(waits.p99),
        "max_at_most": waits.max_at_most.map(ms),
        "of": "a task's offer on the server's board (its row committed) to a worker's lease, from weir_task_dispatch_seconds; quantiles interpolated in its buckets",
    })
}

/// What the dispatch figure of a workload measures.
fn dispatch_meaning(workload: Workload) -> &'static str {
    match workload {
        Workload::Seq => {
            "start request sent (first step) or previous step's completion sent, to the task in the worker's handler"
        }
        Workload::Fanout => "start request sent to each item's task in the worker's handler",
        Workload::Timers => "start request sent plus the sleep, to the task in the worker's handler",
        Workload::Start => "none",
    }
}

/// Prints the figures as a table or as JSON.
pub(super) fn print(report: &Report, output: Output) {
    if output == Output::Json {
        println!("{}", to_json(report));
        return;
    }
    let mut sorted = report.latencies.clone();
    sorted.sort();
    let seconds = report.elapsed.as_secs_f64();
    let instances_per_second = report.instances as f64 / seconds;
    let tasks_per_second = (report.instances * report.tasks_per_instance()) as f64 / seconds;
    let worker = match report.worker_kind {
        WorkerKind::Process => format!("worker {} tasks", report.worker_concurrency),
        WorkerKind::InProcess => format!("in-process worker {} tasks", report.worker_concurrency),
        WorkerKind::None if report.workload == Workload::Start => "no worker".to_string(),
        WorkerKind::None => "bring your own worker".to_string(),
    };
    match report.workload {
        Workload::Seq => println!(
            "workload            seq: {} instances x {} task steps",
            report.instances, report.steps
        ),
        Workload::Fanout => println!(
            "workload            fanout: {} instances x foreach of {} task steps",
            report.instances, report.fanout
        ),
        Workload::Timers => println!(
            "workload            timers: {} instances x sleep {} ms then 1 task step",
            report.instances,
            report.sleep.as_millis()
        ),
        Workload::Start => println!(
            "workload            start: {} starts of a 1-task definition, nobody polls",
            report.instances
        ),
    }
    if report.nodes.len() > 1 {
        println!(
            "nodes               {} (starts round-robin)",
            report.nodes.join(", ")
        );
    }
    println!(
        "concurrency         {} instances in flight, {worker}",
        report.concurrency
    );
    println!("instance ids        {}", report.ids.as_str());
    println!(
        "elapsed             {seconds:.2} s ({} not completed)",
        report.failed
    );
    match report.workload {
        Workload::Start => {
            println!("starts/s            {instances_per_second:.0}");
            println!("start latency (ms)  {}", quantiles_text(&sorted));
            if let (Some(pending), Some(queue)) = (report.pending, &report.queue) {
                println!(
                    "pending             {pending} instances left running, their tasks on queue {queue} (nobody polls it)"
                );
            }
        }
        workload => {
            println!("instances/s         {instances_per_second:.0}");
            if workload == Workload::Seq {
                println!("step completions/s  {tasks_per_second:.0}");
            } else {
                println!("task completions/s  {tasks_per_second:.0}");
            }
            println!("latency (ms)        {}", quantiles_text(&sorted));
            if workload == Workload::Timers {
                println!("timer lateness (ms) {}", quantiles_text(&report.lateness()));
            }
        }
    }
    if let Some(dispatch) = &report.dispatch {
        let mut sorted = dispatch.clone();
        sorted.sort();
        println!(
            "dispatch (ms)       {} ({} tasks)",
            quantiles_text(&sorted),
            sorted.len()
        );
    }
    if let Some(commits) = &report.commits {
        println!(
            "group commits       {} (mean {:.3} ms, {:.1} partition batches each, {} in place)",
            commits.commits,
            ms(commits.commit_mean),
            commits.batches_per_commit,
            commits.in_place
        );
        if let Some((count, mean)) = commits.wal_syncs {
            println!("WAL syncs           {count} (mean {:.3} ms)", ms(mean));
        }
        if let Some(waits) = &commits.dispatch {
            let max = match waits.max_at_most {
                Some(max) => format!("max ≤ {:.3}", ms(max)),
                None => "max > 60 s".to_string(),
            };
            println!(
                "dispatch wait (ms)  p50 {:.3} p90 {:.3} p99 {:.3} {max} mean {:.3} ({} tasks, on the servers' boards)",
                ms(waits.p50),
                ms(waits.p90),
                ms(waits.p99),
                ms(waits.mean),
                waits.count
            );
        }
    }
    if let Some((cycle, beyond)) = report.commit_cycle() {
        match beyond {
            Some(beyond) => println!(
                "per commit          {:.3} ms, {:.3} ms beyond its WAL sync",
                ms(cycle),
                ms(beyond)
            ),
            None => println!("per commit          {:.3} ms", ms(cycle)),
        }
    }
    if let Some(cpu) = report.server_cpu() {
        if report.servers.len() > 1 {
            println!(
                "server CPU          {:.2} s ({} nodes together)",
                cpu.as_secs_f64(),
                report.servers.len()
            );
        } else {
            println!("server CPU          {:.2} s", cpu.as_secs_f64());
        }
    }
    if let Some(rss) = report.server_rss_peak_kib() {
        if report.servers.len() > 1 {
            println!(
                "server peak RSS     {:.1} MiB (the largest node)",
                rss as f64 / 1024.0
            );
        } else {
            println!("server peak RSS     {:.1} MiB", rss as f64 / 1024.0);
        }
    }
    if let Some(cpu) = report.client_cpu {
        let what = if report.worker_kind == WorkerKind::InProcess {
            "client and in-process worker"
        } else {
            "client"
        };
        println!("bench CPU           {:.2} s ({what})", cpu.as_secs_f64());
    }
    if let Some(cpu) = report.worker_cpu {
        println!("worker CPU          {:.2} s", cpu.as_secs_f64());
    }
    println!("durability          {}", report.store_label);
    println!("machine             {}", machine());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(workload: Workload) -> Report {
        Report {
            workload,
            nodes: vec!["http://127.0.0.1:1".into()],
            instances: 4,
            steps: 3,
            fanout: 10,
            sleep: Duration::from_millis(100),
            concurrency: 2,
            ids: Ids::Sequential,
            worker_concurrency: 8,
            worker_kind: WorkerKind::Process,
            elapsed: Duration::from_secs(2),
            commits: None,
            latencies: [130, 110, 120, 101].map(Duration::from_millis).to_vec(),
            failed: 0,
            dispatch: None,
            pending: None,
            queue: None,
            servers: vec![ServerFigures {
                pid: 1,
                cpu: Some(Duration::from_secs(1)),
                rss_peak_kib: Some(2048),
            }],
            client_cpu: None,
            worker_cpu: None,
            store_label: "label".into(),
        }
    }

    #[test]
    fn seq_keeps_its_keys() {
        // Goal: every key the first version printed is still there with its meaning, so that
        // scripts reading `seq` figures keep working.
        let figures = to_json(&report(Workload::Seq));
        for key in [
            "workload",
            "instances",
            "steps_per_instance",
            "concurrency",
            "worker_concurrency",
            "failed",
            "elapsed_s",
            "instances_per_s",
            "step_completions_per_s",
            "latency_ms",
            "server_cpu_s",
            "server_rss_peak_mib",
            "durability",
            "machine",
        ] {
            assert!(figures.get(key).is_some(), "{key} missing: {figures}");
        }
        assert_eq!(figures["workload"], "seq");
        assert_eq!(figures["instances_per_s"], 2.0);
        assert_eq!(figures["step_completions_per_s"], 6.0);
        assert_eq!(figures["server_cpu_s"], 1.0);
        assert_eq!(figures["server_rss_peak_mib"], 2.0);
        assert_eq!(figures["durability"], "label");
        assert_eq!(figures["latency_ms"]["max"], 130.0);
    }

    #[test]
    fn one_instance_in_flight_reports_its_commit_cycle_beyond_the_wal_sync() {
        // Goal: the commit figures are reported, and at one instance in flight the run's
        // time per commit and that minus the mean WAL sync; not at higher concurrency,
        // where commits overlap and the division means nothing.
        let mut lone = report(Workload::Seq);
        lone.concurrency = 1;
        lone.commits = Some(CommitFigures {
            commits: 4_000,
            commit_mean: Duration::from_micros(300),
            batches_per_commit: 1.0,
            in_place: 3_900,
            wal_syncs: Some((4_100, Duration::from_micros(200))),
            dispatch: Some(DispatchWaits {
                count: 4_000,
                mean: Duration::from_micros(40),
                p50: Duration::from_micros(25),
                p90: Duration::from_micros(80),
                p99: Duration::from_micros(400),
                max_at_most: None,
            }),
        });
        let figures = to_json(&lone);
        assert_eq!(figures["dispatch_wait_ms"]["tasks"], 4_000);
        assert_eq!(figures["dispatch_wait_ms"]["p99"], 0.4);
        assert_eq!(figures["dispatch_wait_ms"]["max_at_most"], Value::Null);
        assert_eq!(figures["commits"]["count"], 4_000);
        assert_eq!(figures["commits"]["mean_ms"], 0.3);
        assert_eq!(figures["commits"]["in_place"], 3_900);
        assert_eq!(figures["wal_syncs"]["mean_ms"], 0.2);
        assert_eq!(figures["commit_cycle_ms"], 0.5);
        assert_eq!(figures["beyond_wal_sync_ms"], 0.3);
        lone.concurrency = 2;
        let figures = to_json(&lone);
        assert_eq!(figures["wal_syncs"]["count"], 4_100);
        assert!(figures.get("commit_cycle_ms").is_none());
        assert!(to_json(&report(Workload::Seq)).get("commits").is_none());
    }

    #[test]
    fn workload_keys() {
        // Goal: each workload adds its own figures, computed from the samples.
        let figures = to_json(&report(Workload::Fanout));
        assert_eq!(figures["task_completions_per_s"], 20.0);
        assert_eq!(figures["fanout"], 10);
        let figures = to_json(&report(Workload::Timers));
        assert_eq!(figures["timer_lateness_ms"]["max"], 30.0);
        assert_eq!(figures["timer_lateness_ms"]["p50"], 20.0);
        let mut start = report(Workload::Start);
        start.pending = Some(4);
        start.queue = Some("q".into());
        let figures = to_json(&start);
        assert_eq!(figures["starts_per_s"], 2.0);
        assert_eq!(figures["pending"], 4);
        assert_eq!(figures["latency_of"], "start request");
        assert!(figures.get("dispatch_ms").is_none());
        assert_eq!(figures["ids"], "sequential");
        start.ids = Ids::Engine;
        assert_eq!(to_json(&start)["ids"], "engine");
    }

    #[test]
    fn several_servers() {
        // Goal: CPU adds up over the nodes, RSS is the largest node's, and a node that could
        // not be read leaves the total unknown rather than too small.
        let mut several = report(Workload::Seq);
        several.servers.push(ServerFigures {
            pid: 2,
            cpu: Some(Duration::from_secs(2)),
            rss_peak_kib: Some(4096),
        });
        let figures = to_json(&several);
        assert_eq!(figures["server_cpu_s"], 3.0);
        assert_eq!(figures["server_rss_peak_mib"], 4.0);
        assert_eq!(figures["servers"].as_array().map(Vec::len), Some(2));
        several.servers[1].cpu = None;
        assert!(to_json(&several)["server_cpu_s"].is_null());
    }

    #[test]
    fn percentiles() {
        let sorted = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].map(Duration::from_millis);
        assert_eq!(percentile(&sorted, 0.5), Duration::from_millis(6));
        assert_eq!(percentile(&sorted, 0.99), Duration::from_millis(10));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
