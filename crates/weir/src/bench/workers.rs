//! The workers of a run: example worker processes (the default), or SDK workers inside the
//! bench process (`--inproc-worker`) that also time task dispatch.
//!
//! With several nodes there is one worker per node, attached to that node first and to the
//! others after it (in the order given) for failover; `--worker-concurrency` is split among
//! them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use weir_sdk::{Heartbeat, Task, Worker};

/// How long an example worker process may take to stop after SIGTERM before it is killed.
const PROCESS_STOP_WAIT: Duration = Duration::from_secs(2);

/// How often a stopping example worker process is checked.
const PROCESS_STOP_POLL: Duration = Duration::from_millis(20);

/// How long an in-process worker waits on one poll. Short, so that stopping it after the run
/// does not wait long for a poll in progress (it is abandoned anyway).
const INPROC_POLL_WAIT: Duration = Duration::from_secs(5);

/// Splits `total` task slots among `parts` workers as evenly as possible, the first ones
/// taking the remainder. Every part gets at least one slot only if `total >= parts`, which
/// the caller checks.
pub(super) fn split(total: usize, parts: usize) -> Vec<usize> {
    if parts == 0 {
        return Vec::new();
    }
    let base = total / parts;
    let extra = total % parts;
    (0..parts)
        .map(|index| base + usize::from(index < extra))
        .collect()
}

/// The URLs a node's worker is given: its node first, then the others in order, for failover.
pub(super) fn failover_order(nodes: &[String], first: usize) -> Vec<String> {
    let mut urls = Vec::with_capacity(nodes.len());
    if let Some(node) = nodes.get(first) {
        urls.push(node.clone());
    }
    urls.extend(
        nodes
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != first)
            .map(|(_, node)| node.clone()),
    );
    urls
}

/// An example worker process, stopped when dropped.
pub(super) struct WorkerProcess(Child);

impl WorkerProcess {
    /// The process id, to read its CPU time.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // SIGTERM for a graceful stop, then make sure.
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill sends a signal to our own child, whose pid we hold (not yet reaped).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + PROCESS_STOP_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(PROCESS_STOP_POLL);
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

/// Starts one example worker process per node for `queue`, splitting `concurrency` among
/// them.
pub(super) fn spawn_processes(
    nodes: &[String],
    queue: &str,
    concurrency: usize,
) -> anyhow::Result<Vec<WorkerProcess>> {
    let binary = worker_binary()?;
    let mut workers = Vec::with_capacity(nodes.len());
    for (index, slots) in split(concurrency, nodes.len()).into_iter().enumerate() {
        let child = Command::new(&binary)
            .arg("--server")
            .arg(failover_order(nodes, index).join(","))
            .args(["--queues", queue, "--quiet", "--concurrency"])
            .arg(slots.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the example worker")?;
        workers.push(WorkerProcess(child));
    }
    Ok(workers)
}

/// Task dispatch latency as an in-process worker sees it: from the moment the request that
/// made a task due was sent to the moment the task is in the worker's handler.
///
/// Both ends are read from this process's monotonic clock, which is why this exists only for
/// the in-process worker: the example worker is a separate process and reports no per-task
/// times, and the server's clock is not ours. The figure includes one commit (the request that
/// made the task due is acknowledged only after it), the poll's delivery, and this process's
/// own scheduling (client and worker share its runtime), and the wait for a free worker slot
/// when every slot is busy. It is an upper bound on the engine's part, not the engine's part
/// alone.
///
/// What makes a task due, per workload:
/// - `seq`: the start (first step), then the completion of the previous step (`chain`);
/// - `fanout`: the start, for every item (all items run at once);
/// - `timers`: the start plus the sleep (`offset`), so the figure is the timer's lateness as
///   the worker sees it.
#[derive(Debug)]
pub(super) struct Dispatch {
    /// When each running instance's next task became due, by instance id.
    due: Mutex<HashMap<String, Instant>>,
    /// Added to the due time (the sleep of `timers`).
    offset: Duration,
    /// Whether a task's completion makes the instance's next task due (`seq`).
    chain: bool,
    samples: Mutex<Vec<Duration>>,
}

/// Locks a mutex even if a holder panicked: the maps hold plain data, still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Dispatch {
    pub fn new(offset: Duration, chain: bool) -> Dispatch {
        Dispatch {
            due: Mutex::new(HashMap::new()),
            offset,
            chain,
            samples: Mutex::new(Vec::new()),
        }
    }

    /// The start request of `instance` is about to be sent.
    pub fn starting(&self, instance: &str, at: Instant) {
        lock(&self.due).insert(instance.to_owned(), at);
    }

    /// `instance` has ended: none of its tasks is due any more.
    pub fn ended(&self, instance: &str) {
        lock(&self.due).remove(instance);
    }

    /// A task of `instance` reached the handler. Tasks of instances this run did not start
    /// (left over from an earlier run) are served but not timed.
    fn received(&self, instance: &str) {
        let now = Instant::now();
        let due = lock(&self.due).get(instance).copied();
        if let Some(due) = due {
            let sample = now.saturating_duration_since(due + self.offset);
            lock(&self.samples).push(sample);
        }
    }

    /// The completion of a task of `instance` is about to be sent.
    fn completing(&self, instance: &str) {
        if !self.chain {
            return;
        }
        let now = Instant::now();
        if let Some(due) = lock(&self.due).get_mut(instance) {
            *due = now;
        }
    }

    /// The samples so far.
    pub fn samples(&self) -> Vec<Duration> {
        lock(&self.samples).clone()
    }
}

/// SDK workers running in this process, one per node.
pub(super) struct InProcessWorkers {
    stops: Vec<oneshot::Sender<()>>,
    runs: Vec<JoinHandle<Result<(), weir_sdk::Error>>>,
}

impl InProcessWorkers {
    /// Starts one SDK worker per node for `queue`, splitting `concurrency` among them; each
    /// answers like the example worker (the same echo) and records dispatch times.
    pub fn start(
        nodes: &[String],
        queue: &str,
        concurrency: usize,
        dispatch: Arc<Dispatch>,
    ) -> anyhow::Result<InProcessWorkers> {
        let mut stops = Vec::with_capacity(nodes.len());
        let mut runs = Vec::with_capacity(nodes.len());
        for (index, slots) in split(concurrency, nodes.len()).into_iter().enumerate() {
            let dispatch = dispatch.clone();
            let worker = Worker::builder(failover_order(nodes, index))
                .worker_id(format!("weir-bench-{}-{index}", std::process::id()))
                .concurrency(slots)
                .poll_wait(INPROC_POLL_WAIT)
                .queue(queue.to_owned(), move |task, heartbeat| {
                    handle(task, heartbeat, dispatch.clone())
                })
                .build()
                .context("making the in-process worker")?;
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            runs.push(tokio::spawn(worker.run(async move {
                // A dropped sender stops the worker too.
                let _ = stopped.await;
            })));
        }
        Ok(InProcessWorkers { stops, runs })
    }

    /// Stops polling, waits for the tasks in flight to be reported.
    pub async fn stop(self) -> anyhow::Result<()> {
        for stop in self.stops {
            let _ = stop.send(());
        }
        for run in self.runs {
            run.await
                .context("in-process worker panicked")?
                .context("in-process worker")?;
        }
        Ok(())
    }
}

/// Answers a task with the example worker's echo, timing its dispatch.
async fn handle(
    task: Task,
    heartbeat: Heartbeat,
    dispatch: Arc<Dispatch>,
) -> Result<Value, weir_sdk::TaskError> {
    dispatch.received(&task.instance_id);
    let output = json!({
        "queue": task.queue,
        "step": task.step_id,
        "attempt": task.attempt,
        "id": format!("{}-{}", task.queue, task.instance_id),
        "input": task.input,
    });
    dispatch.completing(&task.instance_id);
    // Completed here rather than by returning, so that the moment the completion is sent is
    // known. If it could not be delivered the worker reports the returned output as usual
    // (with its retries); once it was, the worker ignores what is returned.
    let _ = heartbeat.complete(&output).await;
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_split_evenly() {
        assert_eq!(split(256, 1), vec![256]);
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(3, 3), vec![1, 1, 1]);
        assert_eq!(split(5, 0), Vec::<usize>::new());
        assert_eq!(split(7, 2).iter().sum::<usize>(), 7);
    }

    #[test]
    fn each_worker_starts_with_its_node() {
        let nodes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(failover_order(&nodes, 0), ["a", "b", "c"]);
        assert_eq!(failover_order(&nodes, 1), ["b", "a", "c"]);
        assert_eq!(failover_order(&nodes, 2), ["c", "a", "b"]);
        assert_eq!(failover_order(&nodes[..1], 0), ["a"]);
    }

    #[test]
    fn dispatch_rules() {
        // Goal: a chained workload times each task from the previous completion, a fan-out
        // from the start, timers from the start plus the sleep; unknown instances are not
        // timed. Method: due times set in the past, so samples are at least that old.
        let seq = Dispatch::new(Duration::ZERO, true);
        let past = Instant::now() - Duration::from_secs(10);
        seq.starting("i", past);
        seq.received("i");
        seq.completing("i");
        seq.received("i");
        seq.received("unknown");
        let samples = seq.samples();
        assert_eq!(samples.len(), 2);
        assert!(samples[0] >= Duration::from_secs(10));
        assert!(samples[1] < Duration::from_secs(10));
        seq.ended("i");
        seq.received("i");
        assert_eq!(seq.samples().len(), 2);

        let fanout = Dispatch::new(Duration::ZERO, false);
        fanout.starting("i", past);
        for _ in 0..3 {
            fanout.received("i");
            fanout.completing("i");
        }
        assert!(fanout
            .samples()
            .iter()
            .all(|sample| *sample >= Duration::from_secs(10)));

        let timers = Dispatch::new(Duration::from_secs(9), false);
        timers.starting("i", past);
        timers.received("i");
        let sample = timers.samples()[0];
        assert!(sample >= Duration::from_secs(1) && sample < Duration::from_secs(9));
    }
}
