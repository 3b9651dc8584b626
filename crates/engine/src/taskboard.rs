//! The task board: tasks waiting for workers, and the leases of tasks workers hold.
//!
//! It is memory only, rebuilt from the store's task table when a partition is
//! loaded: a task is on the board exactly while its row is committed and its
//! attempt is current. Leases are not durable: after a restart or a failover the
//! new owner offers every task again under a new lease token.
//!
//! A lease token names the partition epoch it was issued under
//! (`{epoch:x}-{counter:016x}`). A token from an earlier epoch was handed out by
//! a previous owner of the partition (before a crash or a move) to a worker that
//! may still be working: it stays valid for completing, failing and
//! heartbeating the task, so failovers do not throw work away. Exactly-once
//! still holds: the state machine accepts one outcome per attempt, and a second
//! completion of the same attempt is refused as stale.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;
use weir_store::{LatencyHistogram, LatencySnapshot};

use crate::clock::Clock;

/// Most tasks one poll may return.
pub const POLL_TASKS_MAX: usize = 1024;

/// Most reservations open at once (completions waiting for their commit that asked
/// for next tasks). A completion that finds them all taken is answered without next
/// tasks: its worker polls for them as it would have anyway.
pub const RESERVATIONS_MAX: usize = 4096;

/// A task as handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOffer {
    /// Task id.
    pub task_id: String,
    /// The lease token to complete, fail or heartbeat it with.
    pub lease_token: String,
    /// Queue.
    pub queue: String,
    /// Instance.
    pub instance_id: String,
    /// Step.
    pub step_id: String,
    /// 1-based attempt.
    pub attempt: u32,
    /// Input, shared with the board's copy (a poll hands out many; copying each would
    /// cost more than the rest of the offer).
    pub input: Arc<Value>,
    /// Stable across attempts of the step.
    pub idempotency_key: String,
}

/// What the board keeps of a task.
#[derive(Debug, Clone)]
pub(crate) struct BoardTask {
    pub partition: u32,
    /// The partition's epoch when the task was offered; names its lease tokens.
    pub epoch: u64,
    pub queue: String,
    pub instance_id: String,
    pub step_id: String,
    pub attempt: u32,
    pub input: Arc<Value>,
    pub idempotency_key: String,
    /// Bound on waiting to be taken, from when it was offered.
    pub queue_timeout: Option<Duration>,
    /// Bound between heartbeats once taken.
    pub heartbeat_timeout: Option<Duration>,
}

struct Lease {
    token: String,
    expires_at: u64,
    /// When the task's heartbeat timeout passes without a heartbeat.
    heartbeat_due: Option<u64>,
}

struct Entry {
    task: BoardTask,
    /// Since when it waits for a worker: its offer, its lease's expiry, or its
    /// instance's resume. Runtime time, for the dispatch histogram only: no decision
    /// depends on it.
    waiting_since: Instant,
    lease: Option<Lease>,
    /// When the queue timeout passes if nobody takes the task.
    pickup_due: Option<u64>,
    /// A timeout was reported for it; the partition is failing the attempt.
    timed_out: bool,
}

/// A task whose queue or heartbeat timeout passed: its attempt must fail as `timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TimedOut {
    pub task_id: String,
    pub partition: u32,
    pub instance_id: String,
    pub message: String,
}

#[derive(Default)]
struct Inner {
    /// Task ids waiting per queue, oldest first. May hold ids no longer on the board
    /// (withdrawn); they are skipped when popped.
    queues: HashMap<String, VecDeque<String>>,
    entries: HashMap<String, Entry>,
    /// Leased task ids, for the expiry scan.
    leased: HashMap<String, u64>,
    token_next: u64,
    /// Paused instances: their tasks are not handed out.
    paused: std::collections::HashSet<String>,
    /// Tasks of paused instances taken off their queues, to go back on resume.
    held: HashMap<String, Vec<String>>,
    /// Open reservations, oldest first; at most [`RESERVATIONS_MAX`].
    reservations: Vec<Reservation>,
    reservation_next: u64,
}

/// Room a completing worker keeps for the tasks its completions make: a task offered
/// while the reservation is open goes to it, leased, instead of to a poll.
struct Reservation {
    id: u64,
    queues: Vec<String>,
    /// How many more tasks it takes.
    room: usize,
    taken: Vec<TaskOffer>,
}

/// The board; cheap to share.
pub(crate) struct TaskBoard {
    inner: Mutex<Inner>,
    offered: Notify,
    clock: Arc<dyn Clock>,
    lease_duration: Duration,
    /// How long each task waited on the board before a worker's lease on it.
    dispatch: LatencyHistogram,
}

/// A lease token that is not the task's current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StaleLease;

impl TaskBoard {
    pub fn new(clock: Arc<dyn Clock>, lease_duration: Duration) -> TaskBoard {
        // Tokens start at a random point so that tokens from before a restart are
        // not reissued for the same task after it.
        let token_next = rand::random::<u64>() >> 1;
        TaskBoard {
            inner: Mutex::new(Inner {
                token_next,
                ..Inner::default()
            }),
            offered: Notify::new(),
            clock,
            lease_duration,
            dispatch: LatencyHistogram::new(),
        }
    }

    /// How long tasks waited on the board, from their offer (or their lease's expiry,
    /// or their paused instance's resume) to a worker's lease: taken by a poll, or at
    /// once by a completion that asked for next tasks.
    pub fn dispatch_waits(&self) -> LatencySnapshot {
        self.dispatch.snapshot()
    }

    /// Puts a task on the board (or leaves it as it is if it is already there).
    ///
    /// An open reservation for the task's queue takes it at once, leased; otherwise it
    /// waits on its queue and polls are woken.
    pub fn offer(&self, task_id: String, task: BoardTask) {
        {
            let mut inner = self.inner.lock().expect("board lock");
            let inner = &mut *inner;
            if inner.entries.contains_key(&task_id) {
                return;
            }
            let reservation = if inner.paused.contains(&task.instance_id) {
                None
            } else {
                inner
                    .reservations
                    .iter_mut()
                    .find(|r| r.room > 0 && r.queues.contains(&task.queue))
            };
            if let Some(reservation) = reservation {
                let now = self.clock.now_ms();
                let mut entry = Entry {
                    task,
                    waiting_since: Instant::now(),
                    lease: None,
                    pickup_due: None,
                    timed_out: false,
                };
                let offer = lease(
                    &mut entry,
                    task_id.clone(),
                    now,
                    self.lease_duration,
                    &mut inner.token_next,
                    &mut inner.leased,
                );
                reservation.room -= 1;
                reservation.taken.push(offer);
                self.dispatch.record(Duration::ZERO);
                inner.entries.insert(task_id, entry);
                return;
            }
            inner
                .queues
                .entry(task.queue.clone())
                .or_default()
                .push_back(task_id.clone());
            let pickup_due = task
                .queue_timeout
                .map(|t| self.clock.now_ms() + t.as_millis() as u64);
            inner.entries.insert(
                task_id,
                Entry {
                    task,
                    waiting_since: Instant::now(),
                    lease: None,
                    pickup_due,
                    timed_out: false,
                },
            );
        }
        self.offered.notify_waiters();
    }

    /// Opens a reservation of up to `max_tasks` tasks of `queues`: what is offered
    /// from now until [`collect`](TaskBoard::collect) goes to it first. `None` when
    /// [`RESERVATIONS_MAX`] are open.
    pub fn reserve(&self, queues: &[String], max_tasks: usize) -> Option<u64> {
        let mut inner = self.inner.lock().expect("board lock");
        if inner.reservations.len() >= RESERVATIONS_MAX {
            return None;
        }
        inner.reservation_next += 1;
        let id = inner.reservation_next;
        inner.reservations.push(Reservation {
            id,
            queues: queues.to_vec(),
            room: max_tasks.clamp(1, POLL_TASKS_MAX),
            taken: Vec::new(),
        });
        Some(id)
    }

    /// Closes reservation `id` and returns what it took, topped up with tasks already
    /// waiting on its queues while it has room (as a poll that does not wait).
    pub fn collect(&self, id: u64) -> Vec<TaskOffer> {
        let reservation = {
            let mut inner = self.inner.lock().expect("board lock");
            let Some(position) = inner.reservations.iter().position(|r| r.id == id) else {
                return Vec::new();
            };
            inner.reservations.remove(position)
        };
        let mut taken = reservation.taken;
        if reservation.room > 0 {
            taken.extend(self.take(&reservation.queues, reservation.room));
        }
        taken
    }

    /// Closes reservation `id` without handing its tasks out (the request that opened
    /// it failed or went away): they are offered again, first on their queues.
    pub fn cancel(&self, id: u64) {
        {
            let mut inner = self.inner.lock().expect("board lock");
            let inner = &mut *inner;
            let Some(position) = inner.reservations.iter().position(|r| r.id == id) else {
                return;
            };
            let reservation = inner.reservations.remove(position);
            if reservation.taken.is_empty() {
                return;
            }
            let now = self.clock.now_ms();
            for offer in reservation.taken.into_iter().rev() {
                let Some(entry) = inner.entries.get_mut(&offer.task_id) else {
                    continue; // Finished or withdrawn meanwhile.
                };
                if entry.lease.as_ref().map(|l| &l.token) != Some(&offer.lease_token) {
                    continue;
                }
                entry.lease = None;
                entry.pickup_due = entry.task.queue_timeout.map(|t| now + t.as_millis() as u64);
                inner.leased.remove(&offer.task_id);
                inner
                    .queues
                    .entry(offer.queue)
                    .or_default()
                    .push_front(offer.task_id);
            }
        }
        self.offered.notify_waiters();
    }

    /// Takes a task off the board (completed, failed, withdrawn).
    pub fn remove(&self, task_id: &str) {
        let mut inner = self.inner.lock().expect("board lock");
        inner.entries.remove(task_id);
        inner.leased.remove(task_id);
    }

    /// Drops every task of a partition (its ownership ended).
    pub fn remove_partition(&self, partition: u32) {
        let mut inner = self.inner.lock().expect("board lock");
        let ids: Vec<String> = inner
            .entries
            .iter()
            .filter(|(_, entry)| entry.task.partition == partition)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            inner.entries.remove(&id);
            inner.leased.remove(&id);
        }
    }

    /// Checks that `token` is the current lease of `task_id`.
    pub fn check(&self, task_id: &str, token: &str) -> Result<u32, StaleLease> {
        let inner = self.inner.lock().expect("board lock");
        let entry = inner.entries.get(task_id).ok_or(StaleLease)?;
        match &entry.lease {
            Some(lease) if lease.token == token => Ok(entry.task.partition),
            _ if issued_before(token, entry.task.epoch) => Ok(entry.task.partition),
            _ => Err(StaleLease),
        }
    }

    /// Extends the lease `token` of `task_id`.
    pub fn heartbeat(&self, task_id: &str, token: &str) -> Result<(), StaleLease> {
        let expires_at = self.clock.now_ms() + self.lease_duration.as_millis() as u64;
        let mut inner = self.inner.lock().expect("board lock");
        let entry = inner.entries.get_mut(task_id).ok_or(StaleLease)?;
        let heartbeat_due = entry
            .task
            .heartbeat_timeout
            .map(|timeout| self.clock.now_ms() + timeout.as_millis() as u64);
        match &mut entry.lease {
            Some(lease) if lease.token == token => {
                lease.expires_at = expires_at;
                lease.heartbeat_due = heartbeat_due;
                inner.leased.insert(task_id.to_string(), expires_at);
                Ok(())
            }
            None if issued_before(token, entry.task.epoch) => {
                // A worker that took the task from the partition's previous owner is
                // still on it: it keeps the task, which is not handed out again.
                entry.lease = Some(Lease {
                    token: token.to_string(),
                    expires_at,
                    heartbeat_due,
                });
                entry.pickup_due = None;
                inner.leased.insert(task_id.to_string(), expires_at);
                Ok(())
            }
            // Taken again under the new owner meanwhile: both may finish; the first wins.
            Some(_) if issued_before(token, entry.task.epoch) => Ok(()),
            _ => Err(StaleLease),
        }
    }

    /// Takes up to `max_tasks` tasks from `queues`, waiting up to `wait` for the first.
    pub async fn poll(
        &self,
        queues: &[String],
        max_tasks: usize,
        wait: Duration,
    ) -> Vec<TaskOffer> {
        let max_tasks = max_tasks.clamp(1, POLL_TASKS_MAX);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register for wake-ups before looking, so an offer between the look
            // and the wait is not missed.
            let offered = self.offered.notified();
            tokio::pin!(offered);
            offered.as_mut().enable();
            let taken = self.take(queues, max_tasks);
            if !taken.is_empty() {
                return taken;
            }
            if tokio::time::timeout_at(deadline, offered).await.is_err() {
                return Vec::new();
            }
        }
    }

    fn take(&self, queues: &[String], max_tasks: usize) -> Vec<TaskOffer> {
        let now = self.clock.now_ms();
        let taken_at = Instant::now();
        let mut inner = self.inner.lock().expect("board lock");
        let inner = &mut *inner;
        let mut taken = Vec::new();
        for queue in queues {
            let Some(waiting) = inner.queues.get_mut(queue) else {
                continue;
            };
            while taken.len() < max_tasks {
                let Some(task_id) = waiting.pop_front() else {
                    break;
                };
                let Some(entry) = inner.entries.get_mut(&task_id) else {
                    continue; // Withdrawn or completed since it was queued.
                };
                if entry.lease.is_some() || entry.timed_out {
                    continue;
                }
                if inner.paused.contains(&entry.task.instance_id) {
                    inner
                        .held
                        .entry(entry.task.instance_id.clone())
                        .or_default()
                        .push(task_id);
                    continue;
                }
                self.dispatch
                    .record(taken_at.saturating_duration_since(entry.waiting_since));
                taken.push(lease(
                    entry,
                    task_id,
                    now,
                    self.lease_duration,
                    &mut inner.token_next,
                    &mut inner.leased,
                ));
            }
        }
        taken
    }

    /// Offers again every task whose lease expired; returns how many.
    pub fn expire_leases(&self) -> usize {
        let now = self.clock.now_ms();
        let mut expired_count = 0;
        {
            let mut inner = self.inner.lock().expect("board lock");
            let inner = &mut *inner;
            let expired: Vec<String> = inner
                .leased
                .iter()
                .filter(|(_, &expires_at)| expires_at <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for task_id in expired {
                inner.leased.remove(&task_id);
                if let Some(entry) = inner.entries.get_mut(&task_id) {
                    entry.lease = None;
                    entry.waiting_since = Instant::now();
                    // Back to the front: it has waited longest.
                    inner
                        .queues
                        .entry(entry.task.queue.clone())
                        .or_default()
                        .push_front(task_id);
                    expired_count += 1;
                }
            }
        }
        if expired_count > 0 {
            self.offered.notify_waiters();
        }
        expired_count
    }

    /// Tasks whose queue timeout (not taken in time) or heartbeat timeout (taken, but
    /// silent too long) passed. Each is reported once.
    pub fn timed_out(&self) -> Vec<TimedOut> {
        let now = self.clock.now_ms();
        let mut inner = self.inner.lock().expect("board lock");
        let mut timed_out = Vec::new();
        for (task_id, entry) in inner.entries.iter_mut() {
            if entry.timed_out {
                continue;
            }
            let message = match (&entry.lease, entry.pickup_due) {
                (None, Some(due)) if due <= now => {
                    "no worker took the task within its queue_timeout"
                }
                (
                    Some(Lease {
                        heartbeat_due: Some(due),
                        ..
                    }),
                    _,
                ) if *due <= now => "the worker sent no heartbeat within the heartbeat_timeout",
                _ => continue,
            };
            entry.timed_out = true;
            timed_out.push(TimedOut {
                task_id: task_id.clone(),
                partition: entry.task.partition,
                instance_id: entry.task.instance_id.clone(),
                message: message.to_string(),
            });
        }
        timed_out
    }

    /// Hands out no task of `instance_id` until it is resumed (a paused instance).
    pub fn pause_instance(&self, instance_id: &str) {
        self.inner
            .lock()
            .expect("board lock")
            .paused
            .insert(instance_id.to_string());
    }

    /// Hands out `instance_id`'s tasks again.
    pub fn resume_instance(&self, instance_id: &str) {
        {
            let mut inner = self.inner.lock().expect("board lock");
            let inner = &mut *inner;
            inner.paused.remove(instance_id);
            // The pause was the operator's, not a wait for a worker: the instance's tasks
            // wait from now, those held and those still on their queues alike.
            let now = Instant::now();
            for entry in inner.entries.values_mut() {
                if entry.task.instance_id == instance_id && entry.lease.is_none() {
                    entry.waiting_since = now;
                }
            }
            for task_id in inner.held.remove(instance_id).unwrap_or_default() {
                if let Some(entry) = inner.entries.get(&task_id) {
                    inner
                        .queues
                        .entry(entry.task.queue.clone())
                        .or_default()
                        .push_front(task_id);
                }
            }
        }
        self.offered.notify_waiters();
    }

    /// Every task of `queue` on the board (human tasks are listed, never polled).
    pub fn list(&self, queue: &str) -> Vec<TaskOffer> {
        let inner = self.inner.lock().expect("board lock");
        let mut tasks: Vec<TaskOffer> = inner
            .entries
            .iter()
            .filter(|(_, entry)| entry.task.queue == queue && !entry.timed_out)
            .map(|(task_id, entry)| TaskOffer {
                task_id: task_id.clone(),
                lease_token: String::new(),
                queue: entry.task.queue.clone(),
                instance_id: entry.task.instance_id.clone(),
                step_id: entry.task.step_id.clone(),
                attempt: entry.task.attempt,
                input: entry.task.input.clone(),
                idempotency_key: entry.task.idempotency_key.clone(),
            })
            .collect();
        tasks.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        tasks
    }

    /// Number of tasks on the board, leased or not.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("board lock").entries.len()
    }

    /// Number of tasks leased to workers: work whose outcome may come back at any time.
    pub fn leased_count(&self) -> usize {
        self.inner.lock().expect("board lock").leased.len()
    }
}

/// Leases `entry` (which has no lease) under a new token, records the lease's expiry in
/// `leased`, and returns its offer.
fn lease(
    entry: &mut Entry,
    task_id: String,
    now: u64,
    lease_duration: Duration,
    token_next: &mut u64,
    leased: &mut HashMap<String, u64>,
) -> TaskOffer {
    assert!(entry.lease.is_none() && !entry.timed_out);
    *token_next = token_next.wrapping_add(1);
    let token = format_token(entry.task.epoch, *token_next);
    let expires_at = now + lease_duration.as_millis() as u64;
    leased.insert(task_id.clone(), expires_at);
    entry.pickup_due = None;
    entry.lease = Some(Lease {
        token: token.clone(),
        expires_at,
        heartbeat_due: entry
            .task
            .heartbeat_timeout
            .map(|t| now + t.as_millis() as u64),
    });
    let task = &entry.task;
    TaskOffer {
        task_id,
        lease_token: token,
        queue: task.queue.clone(),
        instance_id: task.instance_id.clone(),
        step_id: task.step_id.clone(),
        attempt: task.attempt,
        input: task.input.clone(),
        idempotency_key: task.idempotency_key.clone(),
    }
}

fn format_token(epoch: u64, counter: u64) -> String {
    format!("{epoch:x}-{counter:016x}")
}

/// Whether `token` was issued under an epoch of the partition before `epoch`.
fn issued_before(token: &str, epoch: u64) -> bool {
    token
        .split_once('-')
        .and_then(|(issued, _)| u64::from_str_radix(issued, 16).ok())
        .is_some_and(|issued| issued < epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;
    use weir_store::LATENCY_BUCKETS_SECONDS;

    fn task(queue: &str) -> BoardTask {
        BoardTask {
            partition: 0,
            epoch: 1,
            queue: queue.into(),
            instance_id: "i".into(),
            step_id: "s".into(),
            attempt: 1,
            input: Arc::new(Value::Null),
            idempotency_key: "i:s".into(),
            queue_timeout: Some(Duration::from_secs(60)),
            heartbeat_timeout: Some(Duration::from_secs(10)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_lease_is_offered_again_with_a_new_token() {
        // Goal: a task whose worker vanished is offered again; the old token is stale.
        // Method: lease, advance virtual time past the lease, expire, poll again.
        let board = TaskBoard::new(
            Arc::new(TokioClock::starting_at(0)),
            Duration::from_secs(30),
        );
        board.offer("t1".into(), task("q"));
        let first = board.poll(&["q".into()], 10, Duration::ZERO).await;
        assert_eq!(first.len(), 1);
        assert!(board
            .poll(&["q".into()], 10, Duration::from_millis(10))
            .await
            .is_empty());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(board.expire_leases(), 0);
        board.heartbeat("t1", &first[0].lease_token).unwrap();
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(board.expire_leases(), 0, "the heartbeat extended the lease");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(board.expire_leases(), 1);
        let second = board.poll(&["q".into()], 10, Duration::ZERO).await;
        assert_eq!(second.len(), 1);
        assert_ne!(second[0].lease_token, first[0].lease_token);
        assert_eq!(board.check("t1", &first[0].lease_token), Err(StaleLease));
        assert_eq!(board.check("t1", &second[0].lease_token), Ok(0));
        board.remove("t1");
        assert_eq!(board.check("t1", &second[0].lease_token), Err(StaleLease));
    }

    #[tokio::test(start_paused = true)]
    async fn each_lease_counts_how_long_its_task_waited_for_it() {
        // Goal: the dispatch histogram counts, at each lease, the wait since the task's
        // offer or since its last lease expired; a reservation takes a task at once.
        // Method: virtual time; a task polled after 3 ms, one after 700 ms, the second
        // again 40 s after its lease expired, and one taken by a reservation.
        let board = TaskBoard::new(
            Arc::new(TokioClock::starting_at(0)),
            Duration::from_secs(30),
        );
        let bucket = |seconds: f64| {
            LATENCY_BUCKETS_SECONDS
                .iter()
                .position(|&bound| seconds <= bound)
                .unwrap()
        };
        board.offer("quick".into(), task("q"));
        board.offer("slow".into(), task("r"));
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(board.poll(&["q".into()], 1, Duration::ZERO).await.len(), 1);
        tokio::time::advance(Duration::from_millis(697)).await;
        assert_eq!(board.poll(&["r".into()], 1, Duration::ZERO).await.len(), 1);
        let waits = board.dispatch_waits();
        assert_eq!(waits.count(), 2);
        assert_eq!(waits.buckets[bucket(0.003)], 1);
        assert_eq!(waits.buckets[bucket(0.7)], 1);
        assert!((waits.sum_seconds - 0.703).abs() < 1e-6);

        board.remove("quick");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(board.expire_leases(), 1);
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(board.poll(&["r".into()], 1, Duration::ZERO).await.len(), 1);
        let reservation = board.reserve(&["s".into()], 1).unwrap();
        board.offer("reserved".into(), task("s"));
        assert_eq!(board.collect(reservation).len(), 1);
        let waits = board.dispatch_waits();
        assert_eq!(waits.count(), 4);
        assert_eq!(waits.buckets[bucket(40.0)], 1, "counted from the expiry");
        assert_eq!(waits.buckets[0], 1, "the reservation's lease, at once");
        assert!((waits.sum_seconds - 40.703).abs() < 1e-6);
        assert_eq!(
            board.poll(&["r".into()], 1, Duration::ZERO).await.len(),
            0,
            "a poll that takes nothing counts nothing"
        );
        assert_eq!(board.dispatch_waits().count(), 4);

        // A paused instance's tasks wait from the resume: the pause is not a dispatch.
        // One was held by a poll during the pause, the other still on its queue.
        board.pause_instance("i");
        board.offer("paused".into(), task("p"));
        board.offer("unpolled".into(), task("u"));
        assert!(board
            .poll(&["p".into()], 1, Duration::ZERO)
            .await
            .is_empty());
        tokio::time::advance(Duration::from_secs(100)).await;
        board.resume_instance("i");
        tokio::time::advance(Duration::from_millis(15)).await;
        assert_eq!(board.poll(&["p".into()], 1, Duration::ZERO).await.len(), 1);
        assert_eq!(board.poll(&["u".into()], 1, Duration::ZERO).await.len(), 1);
        let waits = board.dispatch_waits();
        assert_eq!(waits.count(), 6);
        assert_eq!(waits.buckets[bucket(0.015)], 2, "counted from the resume");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_from_the_previous_owner_stays_valid_after_a_failover() {
        // Goal: a worker that took a task from the partition's previous owner can still
        // heartbeat and complete it; a made-up or current-epoch foreign token cannot.
        // Method: lease under epoch 1, reload the task under epoch 2 (a failover).
        let clock = Arc::new(TokioClock::starting_at(0));
        let before = TaskBoard::new(clock.clone(), Duration::from_secs(30));
        before.offer("t1".into(), task("q"));
        let old = before.poll(&["q".into()], 1, Duration::ZERO).await;
        assert!(old[0].lease_token.starts_with("1-"));

        let after = TaskBoard::new(clock, Duration::from_secs(30));
        after.offer(
            "t1".into(),
            BoardTask {
                epoch: 2,
                ..task("q")
            },
        );
        after.heartbeat("t1", &old[0].lease_token).unwrap();
        assert!(
            after
                .poll(&["q".into()], 1, Duration::ZERO)
                .await
                .is_empty(),
            "the old worker's heartbeat keeps the task from being handed out twice"
        );
        assert_eq!(after.check("t1", &old[0].lease_token), Ok(0));
        assert_eq!(after.check("t1", "2-0000000000000001"), Err(StaleLease));
        assert_eq!(after.check("t1", "garbage"), Err(StaleLease));
        after.remove("t1");
        assert_eq!(after.check("t1", &old[0].lease_token), Err(StaleLease));
    }

    #[tokio::test(start_paused = true)]
    async fn queue_and_heartbeat_timeouts_are_reported_once() {
        // Goal: a task nobody takes, and a taken task whose worker goes silent, time out.
        // Method: virtual time; the queue timeout is 60 s and the heartbeat timeout 10 s.
        let board = TaskBoard::new(
            Arc::new(TokioClock::starting_at(0)),
            Duration::from_secs(30),
        );
        board.offer("waiting".into(), task("q"));
        board.offer("taken".into(), task("r"));
        let offers = board.poll(&["r".into()], 1, Duration::ZERO).await;
        tokio::time::advance(Duration::from_secs(9)).await;
        board.heartbeat("taken", &offers[0].lease_token).unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(
            board.timed_out().is_empty(),
            "the heartbeat reset the clock"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let silent = board.timed_out();
        assert_eq!(silent.len(), 1);
        assert_eq!(silent[0].task_id, "taken");
        tokio::time::advance(Duration::from_secs(40)).await;
        let unclaimed = board.timed_out();
        assert_eq!(
            unclaimed
                .iter()
                .map(|t| t.task_id.as_str())
                .collect::<Vec<_>>(),
            ["waiting"]
        );
        assert!(board.timed_out().is_empty(), "each is reported once");
        assert!(
            board
                .poll(&["q".into()], 1, Duration::ZERO)
                .await
                .is_empty(),
            "a timed-out task is not handed out"
        );
    }

    fn board() -> Arc<TaskBoard> {
        Arc::new(TaskBoard::new(
            Arc::new(TokioClock::starting_at(0)),
            Duration::from_secs(30),
        ))
    }

    fn task_of(queue: &str, instance: &str) -> BoardTask {
        BoardTask {
            instance_id: instance.into(),
            ..task(queue)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_takes_offers_before_polls_and_tops_up_from_the_queue() {
        // Goal: while a worker's completion commits, the task it makes goes to that
        // worker, not to a long poll; its room is then filled from what waits.
        let board = board();
        board.offer("waiting".into(), task_of("q", "w"));
        let poller = {
            let board = board.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                board.poll(&["q".into()], 10, Duration::from_secs(5)).await
            })
        };
        let reservation = board.reserve(&["other".into(), "q".into()], 2).unwrap();
        // The poll took what was waiting before any offer.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(poller.is_finished());
        assert_eq!(poller.await.unwrap()[0].task_id, "waiting");
        let poller = {
            let board = board.clone();
            tokio::spawn(async move { board.poll(&["q".into()], 10, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        board.offer("next-1".into(), task_of("q", "a"));
        board.offer("elsewhere".into(), task_of("z", "b"));
        board.offer("next-2".into(), task_of("other", "c"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !poller.is_finished(),
            "the poll got nothing the reservation had room for"
        );
        // Full: the next offer goes to the poll.
        board.offer("next-3".into(), task_of("q", "d"));
        let polled = poller.await.unwrap();
        let ids: Vec<&str> = polled.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["next-3"]);
        board.offer("queued".into(), task_of("q", "e"));
        let reservation_2 = board.reserve(&["q".into()], 3).unwrap();
        board.offer("next-4".into(), task_of("q", "f"));
        let taken = board.collect(reservation);
        let ids: Vec<&str> = taken.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["next-1", "next-2"]);
        let taken_2 = board.collect(reservation_2);
        let ids: Vec<&str> = taken_2.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(
            ids,
            ["next-4", "queued"],
            "what it caught, then what waited"
        );
        // Reserved tasks are leased like polled ones.
        for offer in taken.iter().chain(&taken_2) {
            assert_eq!(board.check(&offer.task_id, &offer.lease_token), Ok(0));
        }
        assert_eq!(board.collect(reservation), Vec::new(), "collected once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_reservation_offers_its_tasks_again_first() {
        // Goal: a completion that failed, or whose request went away, loses no task: what
        // its reservation caught is unleased and goes back to the front of its queue.
        let board = board();
        let reservation = board.reserve(&["q".into()], 2).unwrap();
        board.offer("r1".into(), task_of("q", "a"));
        board.offer("r2".into(), task_of("q", "b"));
        board.offer("later".into(), task_of("q", "c"));
        let poller = {
            let board = board.clone();
            tokio::spawn(async move { board.poll(&["q".into()], 10, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        let first = poller.await.unwrap();
        assert_eq!(
            first.len(),
            1,
            "only the task the reservation had no room for waited"
        );
        board.cancel(reservation);
        let again = board.poll(&["q".into()], 10, Duration::ZERO).await;
        let ids: Vec<&str> = again.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["r1", "r2"]);
        assert!(
            board.collect(reservation).is_empty(),
            "closed by the cancel"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_instance_s_task_is_not_reserved() {
        let board = board();
        board.pause_instance("p");
        let reservation = board.reserve(&["q".into()], 1).unwrap();
        board.offer("paused".into(), task_of("q", "p"));
        assert!(board.collect(reservation).is_empty());
        board.resume_instance("p");
        let polled = board.poll(&["q".into()], 1, Duration::ZERO).await;
        assert_eq!(polled[0].task_id, "paused");
    }

    #[test]
    fn reservations_are_bounded() {
        let board = TaskBoard::new(
            Arc::new(TokioClock::starting_at(0)),
            Duration::from_secs(30),
        );
        let ids: Vec<u64> = (0..RESERVATIONS_MAX)
            .map(|_| board.reserve(&["q".into()], 1).unwrap())
            .collect();
        assert!(board.reserve(&["q".into()], 1).is_none());
        board.cancel(ids[0]);
        assert!(board.reserve(&["q".into()], 1).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn poll_waits_for_an_offer() {
        let board = Arc::new(TaskBoard::new(
            Arc::new(TokioClock::starting_at(0)),
            Duration::from_secs(30),
        ));
        let poller = {
            let board = board.clone();
            tokio::spawn(async move { board.poll(&["q".into()], 10, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        board.offer("t1".into(), task("q"));
        assert_eq!(poller.await.unwrap().len(), 1);
    }
}
