//! The partition actor: one task per owned partition, the only writer of its state.
//!
//! It drains its mailbox (starts, completions, failures, cancels) and its due
//! timers, runs the pure state machine for each, commits the resulting events,
//! instance states, tasks and timers as one batch, and only then replies to
//! callers and releases effects (tasks onto the board, timers armed, HTTP calls
//! made). Acknowledged means durable.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use weir_model::machine::{
    self, Command, Effect, InstanceState, InstanceStatus, Rejection, TaskSpec, TimerId,
};
use weir_model::Definition;
use weir_store::{
    EventRecord, InstanceRecord, PartitionBatch, Refusal, StepOutputRecord, TaskRecord, TimerRecord,
};

use crate::committer::{CommitOutcome, CommitResult, Committer};
use crate::mailbox::{Mailbox, MailboxSender};
use crate::taskboard::BoardTask;
use crate::{http_call, Error, Shared};

/// Most commands one batch takes from the mailbox.
pub const BATCH_COMMANDS_MAX: usize = 2048;
// A batch's starts are checked for existence in one store call.
const _: () = assert!(BATCH_COMMANDS_MAX <= weir_store::EXISTENCE_CHECK_MAX);
/// Most batches of one partition committing at once. The actor builds its next batch
/// while earlier ones commit, so that it and the committer work at the same time instead
/// of in turn. Each batch's replies and effects still wait until that batch is durable,
/// and batches become durable in order: the store refuses a batch whose predecessor it
/// does not hold (the log's `last_seq` guard).
pub const BATCHES_COMMITTING_MAX: usize = 4;
/// Ended instance ids remembered per partition, so that a start with a known id
/// that raced with the instance's end is still answered with that instance.
const ENDED_REMEMBERED_MAX: usize = 4096;

/// A message to a partition actor.
pub(crate) enum Message {
    Start {
        definition: Arc<Definition>,
        version: u32,
        id: String,
        input: Value,
        restart: Option<machine::Restart>,
        parent: Option<String>,
        /// The id came from the caller (or is a child's), so an instance with it may
        /// already be stored; generated ids are new by construction.
        check_existing: bool,
        reply: oneshot::Sender<Result<StartOutcome, Error>>,
    },
    Apply {
        instance_id: String,
        command: Command,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    /// Whether an instance is `running` in this partition's memory (not paused or
    /// compensating, not ended, not parked): a waiter then needs no store read
    /// before it waits (the same status a stored view must have), as the end
    /// will be announced after its commit. Answered between batches.
    IsRunning {
        instance_id: String,
        reply: oneshot::Sender<bool>,
    },
    /// A command for an instance that may have ended (retry, rerun): `state` is its
    /// committed state, used when the partition no longer holds it in memory.
    Revive {
        state: Box<InstanceState>,
        definition: Arc<Definition>,
        command: Command,
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// What a start did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    /// A new instance was created.
    Created,
    /// An instance with that id existed; nothing was started.
    Existing,
}

struct Active {
    state: InstanceState,
    definition: Arc<Definition>,
    /// Batches touching this instance that are not yet durable. Only an instance with
    /// none may leave memory (park or end): the store holds its current state then.
    batches_committing: u32,
}

impl Active {
    fn new(state: InstanceState, definition: Arc<Definition>) -> Active {
        Active {
            state,
            definition,
            batches_committing: 0,
        }
    }
}

type Reply = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// What one batch accumulates before its commit.
#[derive(Default)]
struct Pending {
    events: Vec<EventRecord>,
    /// Instances touched, in first-touch order.
    touched: Vec<String>,
    touched_set: HashSet<String>,
    /// Task rows: `Some` to put, `None` to delete; the last word wins.
    tasks: HashMap<String, Option<TaskRecord>>,
    /// Timer rows by (instance, key): `Some(fire_at)` to put, `None` to delete.
    timers: HashMap<(String, String), Option<u64>>,
    effects: Vec<(String, Effect)>,
    /// Tasks finished by this batch (completed or failed): off the board after commit.
    finished_tasks: Vec<String>,
    replies: Vec<(Reply, Result<(), Error>)>,
}

/// A batch handed to the committer, and what waits for it to be durable.
struct Committing {
    outcome: CommitOutcome,
    after: AfterCommit,
}

/// What a batch does once it is durable.
#[derive(Default)]
struct AfterCommit {
    touched: Vec<String>,
    effects: Vec<(String, Effect)>,
    finished_tasks: Vec<String>,
    replies: Vec<(Reply, Result<(), Error>)>,
    /// The earliest timer each instance armed in this batch, to tell short naps (not
    /// worth parking) from long sleeps.
    next_timer: HashMap<String, u64>,
    /// The instances this batch ended: their final view, for waiters, and for a child
    /// the command that tells its parent. Taken when the batch is built, as a later batch
    /// may change the state in memory before this one is durable (a rerun).
    ended: Vec<Ended>,
}

/// An instance a batch ended, as it was when the batch was built.
struct Ended {
    id: String,
    view: crate::InstanceView,
    /// The parent's id and the command that tells it, for a child.
    parent: Option<(String, Command)>,
}

impl Pending {
    /// Sized for `commands` commands of one or two events and an instance each, so
    /// that a batch's collections are allocated once instead of growing step by step.
    fn with_capacity(commands: usize) -> Pending {
        Pending {
            events: Vec::with_capacity(2 * commands),
            touched: Vec::with_capacity(commands),
            touched_set: HashSet::with_capacity(commands),
            // Only tasks that are not restorable have rows: few.
            tasks: HashMap::new(),
            timers: HashMap::new(),
            effects: Vec::with_capacity(commands),
            finished_tasks: Vec::with_capacity(commands),
            replies: Vec::with_capacity(commands),
        }
    }
}

pub(crate) struct PartitionActor {
    partition: u32,
    epoch: u64,
    last_seq: u64,
    shared: Arc<Shared>,
    committer: Committer,
    instances: HashMap<String, Active>,
    /// Armed timers, by due time.
    timers: BTreeSet<(u64, String, String)>,
    timer_due: HashMap<(String, String), u64>,
    ended: HashSet<String>,
    ended_order: VecDeque<String>,
    /// Running instances waiting only for a timer (a sleep, a retry backoff, a wait's
    /// timeout): their state is left in the store, not in memory, and loaded back when
    /// a timer fires or a command arrives. This keeps a partition's memory bounded by
    /// what is busy, not by what is asleep.
    parked: HashSet<String>,
    /// The tasks that have a stored row: those not [restorable](machine::TaskSpec::restorable)
    /// (a lane's, a human's), and any a version that stored every task left behind. Only
    /// these have a row to delete when they finish; a restorable task's offer is derived
    /// again from its instance's state when the partition loads.
    stored_tasks: HashSet<String>,
    mailbox: Mailbox,
    /// Where HTTP results come back to.
    sender: MailboxSender,
}

impl PartitionActor {
    /// Loads a partition from the store and builds its actor.
    pub async fn load(
        partition: u32,
        epoch: u64,
        shared: Arc<Shared>,
        committer: Committer,
        mailbox: Mailbox,
        sender: MailboxSender,
    ) -> Result<PartitionActor, Error> {
        let store = shared.store.clone();
        let now = shared.clock.now_ms();
        // Rows are parsed as they are read: the states of instances that wait only for
        // a timer or a signal are dropped at once (parked), so the load's memory is that
        // of the instances kept, not of every row.
        let loaded = tokio::task::spawn_blocking(move || {
            let mut kept: Vec<InstanceState> = Vec::new();
            let mut parked: Vec<String> = Vec::new();
            let mut corrupt: Option<String> = None;
            let snapshot = store.load_partition(partition, &mut |record| {
                match InstanceState::from_stored(&record.state) {
                    // A short nap is parked too; its timer loads it back when due.
                    Ok(state) if parkable(&state, None, now) => parked.push(state.id),
                    Ok(state) => kept.push(state),
                    Err(err) => {
                        corrupt.get_or_insert_with(|| format!("instance {}: {err}", record.id));
                    }
                }
            })?;
            // Only the instances kept in memory need their step outputs back; a parked
            // one gets them when it is read again. Nothing writes this partition until
            // its actor runs, so this second read sees what the first did.
            if let Err(err) = add_step_outputs(store.as_ref(), kept.iter_mut())? {
                corrupt.get_or_insert(err);
            }
            Ok::<_, weir_store::Error>((snapshot, kept, parked, corrupt))
        })
        .await
        .map_err(|err| Error::Unavailable(format!("loading partition {partition}: {err}")))??;
        let (snapshot, kept, parked, corrupt) = loaded;
        if let Some(corrupt) = corrupt {
            return Err(Error::Corrupt(corrupt));
        }
        let mut actor = PartitionActor {
            partition,
            epoch,
            last_seq: snapshot.last_seq,
            shared: shared.clone(),
            committer,
            instances: HashMap::with_capacity(kept.len()),
            timers: BTreeSet::new(),
            timer_due: HashMap::new(),
            ended: HashSet::new(),
            ended_order: VecDeque::new(),
            parked: parked.into_iter().collect(),
            stored_tasks: HashSet::with_capacity(snapshot.tasks.len()),
            mailbox,
            sender,
        };
        let mut resume = Vec::new();
        for state in kept {
            let definition = shared
                .definitions
                .get(&state.definition, state.version)
                .await?;
            for effect in machine::resume_effects(&state, &definition) {
                resume.push((state.id.clone(), effect));
            }
            if state.status == machine::InstanceStatus::Paused {
                shared.board.pause_instance(&state.id);
            }
            actor
                .instances
                .insert(state.id.clone(), Active::new(state, definition));
        }
        for task in snapshot.tasks {
            let offer: StoredTask = StoredTask::parse(&task.payload)
                .ok_or_else(|| Error::Corrupt(format!("task {}", task.task_id)))?;
            actor.stored_tasks.insert(task.task_id.clone());
            // The board keeps the first offer of an id: a restorable task a row was left
            // for is offered once, here, and its resumed offer below is ignored.
            shared.board.offer(
                task.task_id,
                offer.into_board_task(partition, epoch, task.instance_id),
            );
        }
        for timer in snapshot.timers {
            actor.arm_timer(timer.instance_id, timer.key, timer.fire_at);
        }
        for (instance_id, effect) in resume {
            actor.release(instance_id, effect);
        }
        tracing::debug!(
            partition,
            epoch,
            instances = actor.instances.len(),
            "partition loaded"
        );
        Ok(actor)
    }

    /// Runs until shutdown or until the partition is fenced.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut messages = Vec::with_capacity(64);
        let mut committing: VecDeque<Committing> = VecDeque::new();
        let mut healthy = loop {
            let room = committing.len() < BATCHES_COMMITTING_MAX;
            let next_timer = self.timers.first().map(|(due, _, _)| *due);
            let sleep = match next_timer {
                Some(due) => Duration::from_millis(due.saturating_sub(self.shared.clock.now_ms())),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                biased;
                _ = shutdown.changed() => break true,
                outcome = oldest_outcome(&mut committing) => {
                    let done = committing.pop_front().expect("an outcome came from it");
                    if !self.finish(outcome, done.after) {
                        break false;
                    }
                    continue;
                }
                received = self.mailbox.recv_many(&mut messages, BATCH_COMMANDS_MAX), if room => {
                    if received == 0 {
                        break true;
                    }
                }
                _ = tokio::time::sleep(sleep), if room => {}
            }
            let now = self.shared.clock.now_ms();
            let existing = match self.read_before(&messages, now).await {
                Ok(existing) => existing,
                Err(err) => {
                    tracing::error!(partition = self.partition, error = %err, "reading parked or existing instances failed; stopping partition");
                    break false;
                }
            };
            let answered = messages.len();
            let pending = self.process(std::mem::take(&mut messages), &existing, now);
            // Only a lone message may commit in place (see `Committer::submit`): the
            // board's lock is not taken for the batches of a loaded engine.
            let mut quiet = answered == 1 && self.quiet(&pending);
            if quiet {
                // The runtime runs a task it has just woken before the others it has
                // ready, so a lone message may have overtaken requests whose tasks are
                // about to send theirs: concurrent starts, which no leased task tells
                // of, were committed in place one by one. Yielding lets every ready
                // task run (and the runtime poll its sockets) before asking again.
                tokio::task::yield_now().await;
                quiet = self.quiet(&pending);
            }
            if let Some(batch) = self
                .submit(pending, committing.is_empty(), answered, quiet)
                .await
            {
                committing.push_back(batch);
            }
        };
        // Every batch handed over gets its outcome, so that every caller gets an answer.
        while let Some(done) = committing.pop_front() {
            let outcome = done.outcome.await;
            if healthy {
                healthy = self.finish(outcome, done.after);
            } else {
                for (reply, _) in done.after.replies {
                    reply(Err(Error::Unavailable(format!(
                        "partition {} stopped; retry",
                        self.partition
                    ))));
                }
            }
        }
        self.shared.board.remove_partition(self.partition);
    }

    /// Reads what this batch needs from the store, in one trip to a reader: the
    /// parked instances that `messages` or the timers due at `now` concern (loaded
    /// back into memory), and which of the ids that starts ask for are stored
    /// already (returned). A start's id known to memory needs no read: an instance
    /// of this partition is stored only if this actor (or the owner it took over
    /// from, before the load) committed it, and those are running, parked or ended.
    async fn read_before(
        &mut self,
        messages: &[Message],
        now: u64,
    ) -> Result<HashSet<String>, Error> {
        let mut wanted: Vec<String> = Vec::new();
        let mut starts: Vec<String> = Vec::new();
        for message in messages {
            match message {
                Message::Apply { instance_id, .. } if self.parked.contains(instance_id) => {
                    wanted.push(instance_id.clone())
                }
                Message::Revive { state, .. } if self.parked.contains(&state.id) => {
                    wanted.push(state.id.clone())
                }
                Message::Start {
                    id,
                    check_existing: true,
                    ..
                } if !self.instances.contains_key(id)
                    && !self.ended.contains(id)
                    && !self.parked.contains(id) =>
                {
                    starts.push(id.clone())
                }
                _ => {}
            }
        }
        for (due, instance_id, _) in &self.timers {
            if *due > now {
                break;
            }
            if self.parked.contains(instance_id) {
                wanted.push(instance_id.clone());
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        starts.sort_unstable();
        starts.dedup();
        if wanted.is_empty() && starts.is_empty() {
            return Ok(HashSet::new());
        }
        let store = self.shared.store.clone();
        let ids = wanted.clone();
        let (states, exist) = tokio::task::spawn_blocking(move || {
            let states = match read_states(store.as_ref(), &ids)? {
                Ok(states) => states,
                Err(corrupt) => return Ok(Err(corrupt)),
            };
            let exist = if starts.is_empty() {
                Vec::new()
            } else {
                store.instances_exist(&starts)?
            };
            Ok::<_, weir_store::Error>(Ok((states, starts.into_iter().zip(exist))))
        })
        .await
        .map_err(|err| Error::Unavailable(format!("reading instances: {err}")))??
        .map_err(Error::Corrupt)?;
        for (id, state) in wanted.into_iter().zip(states) {
            self.parked.remove(&id);
            let state = state
                .ok_or_else(|| Error::Corrupt(format!("parked instance {id} is not stored")))?;
            assert_eq!(state.id, id);
            let definition = self
                .shared
                .definitions
                .get(&state.definition, state.version)
                .await?;
            self.instances.insert(id, Active::new(state, definition));
        }
        Ok(exist
            .filter_map(|(id, exists)| exists.then_some(id))
            .collect())
    }

    /// Runs the batch's commands through the state machine; `existing` holds the
    /// start ids found stored by [`Self::read_before`].
    fn process(&mut self, messages: Vec<Message>, existing: &HashSet<String>, now: u64) -> Pending {
        let mut pending = Pending::with_capacity(messages.len());
        for message in messages {
            match message {
                Message::IsRunning { instance_id, reply } => {
                    let running = self
                        .instances
                        .get(&instance_id)
                        .is_some_and(|active| active.state.status == InstanceStatus::Running);
                    let _ = reply.send(running);
                }
                Message::Start {
                    definition,
                    version,
                    id,
                    input,
                    restart,
                    parent,
                    check_existing: _,
                    reply,
                } => {
                    if self.instances.contains_key(&id)
                        || self.ended.contains(&id)
                        || self.parked.contains(&id)
                        || existing.contains(&id)
                    {
                        // Answered with the batch, not at once: the instance may be in a
                        // batch still committing, and the caller reads it back.
                        pending.replies.push((
                            Box::new(move |result: Result<(), Error>| {
                                let _ = reply.send(result.map(|()| StartOutcome::Existing));
                            }),
                            Ok(()),
                        ));
                        continue;
                    }
                    let (mut state, transition) =
                        machine::start_restarted(&definition, version, &id, input, restart, now);
                    state.parent = parent;
                    self.instances
                        .insert(id.clone(), Active::new(state, definition));
                    self.record(&mut pending, &id, transition, now);
                    pending.replies.push((
                        Box::new(move |result: Result<(), Error>| {
                            let _ = reply.send(result.map(|()| StartOutcome::Created));
                        }),
                        Ok(()),
                    ));
                }
                Message::Revive {
                    state,
                    definition,
                    command,
                    reply,
                } => {
                    let id = state.id.clone();
                    if !self.instances.contains_key(&id) {
                        // Not in memory means ended and committed: the store's state is current.
                        self.ended.remove(&id);
                        self.instances
                            .insert(id.clone(), Active::new(*state, definition));
                    }
                    let active = self.instances.get_mut(&id).expect("inserted above");
                    let outcome =
                        machine::handle(&mut active.state, &active.definition, command, now)
                            .map_err(rejection_error);
                    let result = match outcome {
                        Ok(transition) => {
                            self.record(&mut pending, &id, transition, now);
                            Ok(())
                        }
                        Err(err) => {
                            // Refused: put an ended instance back out of memory, unless
                            // its end is still committing (that batch's completion does).
                            if self.instances.get(&id).is_some_and(|a| {
                                a.state.status.is_terminal() && a.batches_committing == 0
                            }) {
                                self.instances.remove(&id);
                                self.remember_ended(id);
                            }
                            Err(err)
                        }
                    };
                    pending.replies.push((
                        Box::new(move |result| {
                            let _ = reply.send(result);
                        }),
                        result,
                    ));
                }
                Message::Apply {
                    instance_id,
                    command,
                    reply,
                } => {
                    let finished_task = match &command {
                        Command::CompleteTask { task_id, .. }
                        | Command::CompleteHuman { task_id, .. }
                        | Command::FailTask { task_id, .. } => Some(task_id.clone()),
                        _ => None,
                    };
                    let outcome = match self.instances.get_mut(&instance_id) {
                        None => {
                            if self.ended.contains(&instance_id) {
                                Err(Error::Conflict("instance has already ended".into()))
                            } else {
                                Err(Error::NotFound(format!(
                                    "instance {instance_id} is not running"
                                )))
                            }
                        }
                        Some(active) => {
                            machine::handle(&mut active.state, &active.definition, command, now)
                                .map_err(rejection_error)
                        }
                    };
                    let result = match outcome {
                        Ok(transition) => {
                            if let Some(task_id) = finished_task {
                                if self.stored_tasks.remove(&task_id) {
                                    pending.tasks.insert(task_id.clone(), None);
                                }
                                pending.finished_tasks.push(task_id);
                            }
                            self.record(&mut pending, &instance_id, transition, now);
                            Ok(())
                        }
                        Err(err) => Err(err),
                    };
                    if let Some(reply) = reply {
                        pending.replies.push((
                            Box::new(move |result| {
                                let _ = reply.send(result);
                            }),
                            result,
                        ));
                    }
                }
            }
        }
        // Due timers, oldest first.
        while let Some((due, _, _)) = self.timers.first() {
            if *due > now {
                break;
            }
            let (_, instance_id, key) = self.timers.pop_first().expect("checked non-empty");
            self.timer_due.remove(&(instance_id.clone(), key.clone()));
            pending
                .timers
                .insert((instance_id.clone(), key.clone()), None);
            let Some(timer) = TimerId::parse(&key) else {
                tracing::error!(%instance_id, %key, "unknown timer key; dropping it");
                continue;
            };
            if let Some(active) = self.instances.get_mut(&instance_id) {
                if let Ok(transition) = machine::handle(
                    &mut active.state,
                    &active.definition,
                    Command::FireTimer { timer },
                    now,
                ) {
                    self.record(&mut pending, &instance_id, transition, now);
                }
            }
        }
        pending
    }

    /// Adds a transition's events, state and effects to the batch.
    fn record(
        &mut self,
        pending: &mut Pending,
        instance_id: &str,
        transition: machine::Transition,
        now: u64,
    ) {
        for event in transition.events {
            self.last_seq += 1;
            pending.events.push(EventRecord {
                partition: self.partition,
                seq: self.last_seq,
                epoch: self.epoch,
                instance_id: instance_id.to_string(),
                at: now,
                event_type: event.type_name().to_string(),
                payload: serde_json::to_string(&event).expect("events serialize"),
            });
        }
        for effect in transition.effects {
            match &effect {
                Effect::StartChild { .. } | Effect::CancelChild { .. } => {}
                Effect::OfferTask(spec) if spec.restorable => {}
                Effect::OfferTask(spec) => {
                    self.stored_tasks.insert(spec.task_id.clone());
                    pending.tasks.insert(
                        spec.task_id.clone(),
                        Some(TaskRecord {
                            task_id: spec.task_id.clone(),
                            partition: self.partition,
                            queue: spec.queue.clone(),
                            instance_id: instance_id.to_string(),
                            payload: StoredTask::render(spec),
                        }),
                    );
                }
                Effect::WithdrawTask { task_id } => {
                    if self.stored_tasks.remove(task_id) {
                        pending.tasks.insert(task_id.clone(), None);
                    }
                }
                Effect::StartTimer { timer, fire_at } => {
                    pending
                        .timers
                        .insert((instance_id.to_string(), timer.key()), Some(*fire_at));
                }
                Effect::CancelTimer { timer } => {
                    pending
                        .timers
                        .insert((instance_id.to_string(), timer.key()), None);
                }
                Effect::CallHttp(_) => {}
            }
            pending.effects.push((instance_id.to_string(), effect));
        }
        if pending.touched_set.insert(instance_id.to_string()) {
            pending.touched.push(instance_id.to_string());
        }
    }

    /// Whether nothing is likely to need the runtime's thread while `pending`'s commit
    /// syncs, so that it may commit in place (see `committer`): no message waits for any
    /// partition, and workers hold no task but those this batch finishes, whose
    /// completions could arrive meanwhile. Only a batch that answers a message asks: a
    /// batch of due timers is often one of several partitions' made at once, which are
    /// better merged by the committer than committed one by one.
    fn quiet(&self, pending: &Pending) -> bool {
        self.mailbox.none_unread()
            && self.shared.board.leased_count() <= pending.finished_tasks.len()
    }

    /// Hands the batch to the committer. A batch that writes nothing is answered at once
    /// when no batch is committing (`alone`), and otherwise waits its turn behind them:
    /// its answers may depend on their changes (a start answered "exists"). A `quiet`
    /// batch may be committed in place.
    async fn submit(
        &mut self,
        pending: Pending,
        alone: bool,
        answered: usize,
        quiet: bool,
    ) -> Option<Committing> {
        if pending.touched.is_empty() && pending.tasks.is_empty() && pending.timers.is_empty() {
            if alone {
                for (reply, result) in pending.replies {
                    reply(result);
                }
                return None;
            }
            return Some(Committing {
                outcome: Box::pin(std::future::ready(Ok(Ok(())))),
                after: AfterCommit {
                    replies: pending.replies,
                    ..AfterCommit::default()
                },
            });
        }
        let seq_before = self.last_seq - pending.events.len() as u64;
        let mut batch = PartitionBatch {
            partition: self.partition,
            epoch: self.epoch,
            seq_before,
            events: pending.events,
            ..PartitionBatch::default()
        };
        let mut ended = Vec::new();
        for id in &pending.touched {
            let active = self
                .instances
                .get_mut(id)
                .expect("touched instances are in memory");
            active.batches_committing += 1;
            batch
                .instances
                .push(instance_record(self.partition, &mut active.state));
            let changed = active.state.take_steps_changed();
            let steps = &active.state.context["steps"];
            for step_id in changed {
                match steps.get(&step_id) {
                    Some(entry) => batch.outputs_put.push(StepOutputRecord {
                        instance_id: id.clone(),
                        step_id,
                        entry: entry.to_string(),
                    }),
                    None => batch.outputs_delete.push((id.clone(), step_id)),
                }
            }
            if active.state.status.is_terminal() {
                let parent = active
                    .state
                    .parent
                    .clone()
                    .map(|parent| (parent, crate::child_ended_command(&active.state)));
                ended.push(Ended {
                    id: id.clone(),
                    view: crate::view_of_state(&active.state),
                    parent,
                });
            }
        }
        for (task_id, row) in pending.tasks {
            match row {
                Some(row) => batch.tasks_put.push(row),
                None => batch.tasks_delete.push(task_id),
            }
        }
        for ((instance_id, key), fire_at) in pending.timers {
            match fire_at {
                Some(fire_at) => batch.timers_put.push(TimerRecord {
                    partition: self.partition,
                    instance_id,
                    key,
                    fire_at,
                }),
                None => batch.timers_delete.push((instance_id, key)),
            }
        }
        let mut next_timer: HashMap<String, u64> = HashMap::new();
        for timer in &batch.timers_put {
            let due = next_timer
                .entry(timer.instance_id.clone())
                .or_insert(u64::MAX);
            *due = (*due).min(timer.fire_at);
        }
        let outcome = self.committer.submit(batch, answered, quiet).await;
        Some(Committing {
            outcome,
            after: AfterCommit {
                touched: pending.touched,
                effects: pending.effects,
                finished_tasks: pending.finished_tasks,
                replies: pending.replies,
                next_timer,
                ended,
            },
        })
    }

    /// Completes a batch whose outcome is known: once durable, releases its effects and
    /// replies. Returns false if it was refused (fenced) or failed.
    fn finish(&mut self, outcome: CommitResult, after: AfterCommit) -> bool {
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(Refusal::Fenced { .. })) => {
                for (reply, _) in after.replies {
                    reply(Err(Error::Unavailable(format!(
                        "partition {} moved to another node; retry",
                        self.partition
                    ))));
                }
                return false;
            }
            Err(err) => {
                // The store failed: nothing of this batch is durable. The in-memory state
                // is ahead of the store now, so the only safe course is to reload it.
                tracing::error!(partition = self.partition, error = %err, "commit failed; stopping partition");
                for (reply, _) in after.replies {
                    reply(Err(Error::Unavailable(format!("store failed: {err}"))));
                }
                return false;
            }
        }
        for task_id in after.finished_tasks {
            self.shared.board.remove(&task_id);
        }
        for (instance_id, effect) in after.effects {
            self.release(instance_id, effect);
        }
        for (reply, result) in after.replies {
            reply(result);
        }
        for Ended { id, view, parent } in after.ended {
            self.shared.waiters.ended(&id, move || view);
            if let (Some((parent, command)), Some(engine)) = (parent, self.shared.engine()) {
                tokio::spawn(async move { engine.tell_parent(&parent, command).await });
            }
        }
        let now = self.shared.clock.now_ms();
        for id in after.touched {
            let Some(active) = self.instances.get_mut(&id) else {
                debug_assert!(false, "a committing instance left memory");
                continue;
            };
            assert!(active.batches_committing > 0);
            active.batches_committing -= 1;
            if active.batches_committing > 0 {
                // A later batch changed it again; that batch's completion decides.
                continue;
            }
            if active.state.status.is_terminal() {
                self.instances.remove(&id);
                self.remember_ended(id);
            } else if parkable(&active.state, after.next_timer.get(&id).copied(), now) {
                self.instances.remove(&id);
                self.parked.insert(id);
            }
        }
        true
    }

    /// Performs an effect whose cause is durable.
    fn release(&mut self, instance_id: String, effect: Effect) {
        match effect {
            Effect::StartChild {
                child_id,
                definition,
                version,
                input,
            } => {
                if let Some(engine) = self.shared.engine() {
                    tokio::spawn(engine.start_child(
                        instance_id,
                        child_id,
                        definition,
                        version,
                        input,
                    ));
                }
            }
            Effect::CancelChild { child_id } => {
                if let Some(engine) = self.shared.engine() {
                    let by = format!("parent {instance_id}");
                    tokio::spawn(async move {
                        if let Err(err) = engine.cancel(&child_id, &by).await {
                            tracing::debug!(child = %child_id, error = %err, "cancelling a child was refused");
                        }
                    });
                }
            }
            Effect::OfferTask(spec) => {
                let task_id = spec.task_id.clone();
                self.shared.board.offer(
                    task_id,
                    BoardTask {
                        partition: self.partition,
                        epoch: self.epoch,
                        queue: spec.queue,
                        instance_id,
                        step_id: spec.step_id,
                        attempt: spec.attempt,
                        input: Arc::new(spec.input),
                        idempotency_key: spec.idempotency_key,
                        queue_timeout: spec.queue_timeout,
                        heartbeat_timeout: spec.heartbeat_timeout,
                    },
                );
            }
            Effect::WithdrawTask { task_id } => self.shared.board.remove(&task_id),
            Effect::StartTimer { timer, fire_at } => {
                self.arm_timer(instance_id, timer.key(), fire_at)
            }
            Effect::CancelTimer { timer } => {
                let key = (instance_id, timer.key());
                if let Some(due) = self.timer_due.remove(&key) {
                    self.timers.remove(&(due, key.0, key.1));
                }
            }
            Effect::CallHttp(request) => {
                let sender = self.sender.clone();
                let client = self.shared.http.clone();
                tokio::spawn(async move {
                    let step_id = request.step_id.clone();
                    let attempt = request.attempt;
                    let result = http_call::call(&client, request).await;
                    let message = Message::Apply {
                        instance_id,
                        command: Command::HttpResult {
                            step_id,
                            attempt,
                            result,
                        },
                        reply: None,
                    };
                    // The partition may have stopped; its successor calls again.
                    let _ = sender.send(message).await;
                });
            }
        }
    }

    fn arm_timer(&mut self, instance_id: String, key: String, fire_at: u64) {
        if let Some(previous) = self
            .timer_due
            .insert((instance_id.clone(), key.clone()), fire_at)
        {
            self.timers
                .remove(&(previous, instance_id.clone(), key.clone()));
        }
        self.timers.insert((fire_at, instance_id, key));
    }

    fn remember_ended(&mut self, id: String) {
        if self.ended_order.len() >= ENDED_REMEMBERED_MAX {
            if let Some(oldest) = self.ended_order.pop_front() {
                self.ended.remove(&oldest);
            }
        }
        self.ended.insert(id.clone());
        self.ended_order.push_back(id);
    }
}

/// Shortest wait worth parking for: an instance whose next timer is sooner stays in
/// memory, as loading it back would cost more than keeping it.
const PARK_AFTER_MS: u64 = 5_000;

/// Whether an instance waits only for a timer or a signal (a sleep, a retry's backoff,
/// a `wait` step), so that its state can stay in the store until a timer fires or a
/// command arrives. Instances waiting for a task, an HTTP call, a child or lanes stay
/// in memory: their next event is frequent and should not cost a read. `next_timer` is
/// its earliest timer when known.
fn parkable(state: &InstanceState, next_timer: Option<u64>, now: u64) -> bool {
    state.status == machine::InstanceStatus::Running
        && matches!(
            state.wait,
            machine::Wait::Sleep | machine::Wait::Retry | machine::Wait::Signal { .. }
        )
        && next_timer.is_none_or(|due| due >= now.saturating_add(PARK_AFTER_MS))
}

fn rejection_error(rejection: Rejection) -> Error {
    match rejection {
        Rejection::InstanceEnded(status) => {
            Error::Conflict(format!("instance has already ended ({status})"))
        }
        Rejection::NotCurrent => {
            Error::StaleLease("the task's attempt is no longer current".into())
        }
        Rejection::UnknownTask => Error::StaleLease("unknown task".into()),
        Rejection::NotAllowed { .. } => Error::Conflict(rejection.to_string()),
        Rejection::BadRequest(message) => Error::BadRequest(message),
        Rejection::InvalidData(problems) => Error::InvalidData(problems),
    }
}

/// The input, output and error columns of a state, before they become text.
pub(crate) struct RecordFields<'a> {
    pub input: &'a Value,
    pub output: Option<&'a Value>,
    pub error: Option<Value>,
}

pub(crate) fn instance_record_fields(state: &InstanceState) -> RecordFields<'_> {
    RecordFields {
        input: &state.context["input"],
        output: state.output.as_ref(),
        error: state
            .error
            .as_ref()
            .map(|e| json!({"type": e.error_type, "message": e.message})),
    }
}

/// The instance row for a state; its step outputs are stored apart (see
/// [`InstanceState::to_stored`]).
pub(crate) fn instance_record(partition: u32, state: &mut InstanceState) -> InstanceRecord {
    let stored = state.to_stored();
    let fields = instance_record_fields(state);
    InstanceRecord {
        id: state.id.clone(),
        partition,
        definition: state.definition.clone(),
        version: state.version,
        status: state.status.as_str().to_string(),
        active: !state.status.is_terminal(),
        input: fields.input.to_string(),
        output: fields.output.map(Value::to_string),
        error: fields.error.as_ref().map(Value::to_string),
        created_at: state.created_at,
        updated_at: state.updated_at,
        state: stored,
    }
}

/// The step outputs stored apart of each of `ids`, in order, read in chunks of at most
/// [`weir_store::EXISTENCE_CHECK_MAX`].
fn step_outputs(
    store: &dyn weir_store::Store,
    ids: &[String],
) -> Result<Vec<Vec<(String, String)>>, weir_store::Error> {
    let mut outputs = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(weir_store::EXISTENCE_CHECK_MAX) {
        outputs.extend(store.step_outputs(chunk)?);
    }
    Ok(outputs)
}

/// Reads the stored states of `ids`, in order (`None` for an id not stored), with their
/// step outputs stored apart. The inner error names a corrupt state or entry.
pub(crate) fn read_states(
    store: &dyn weir_store::Store,
    ids: &[String],
) -> Result<Result<Vec<Option<InstanceState>>, String>, weir_store::Error> {
    let mut states = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(record) = store.instance(id)? else {
            states.push(None);
            continue;
        };
        match InstanceState::from_stored(&record.state) {
            Ok(state) => states.push(Some(state)),
            Err(err) => return Ok(Err(format!("instance {id}: {err}"))),
        }
    }
    if let Err(corrupt) = add_step_outputs(store, states.iter_mut().flatten())? {
        return Ok(Err(corrupt));
    }
    Ok(Ok(states))
}

/// Puts the step outputs stored apart back into those of `states` that have them
/// (`steps_apart`). The inner error names a corrupt entry.
fn add_step_outputs<'a>(
    store: &dyn weir_store::Store,
    states: impl IntoIterator<Item = &'a mut InstanceState>,
) -> Result<Result<(), String>, weir_store::Error> {
    let mut apart: Vec<&mut InstanceState> = states
        .into_iter()
        .filter(|state| state.steps_apart)
        .collect();
    let ids: Vec<String> = apart.iter().map(|state| state.id.clone()).collect();
    for (state, outputs) in apart.iter_mut().zip(step_outputs(store, &ids)?) {
        if let Err(err) = state.add_stored_entries(outputs) {
            return Ok(Err(format!("instance {}'s step outputs: {err}", state.id)));
        }
    }
    Ok(Ok(()))
}

/// The stored form of a task row's payload.
struct StoredTask {
    queue_timeout: Option<Duration>,
    heartbeat_timeout: Option<Duration>,
    step_id: String,
    attempt: u32,
    input: Value,
    idempotency_key: String,
    queue: String,
}

impl StoredTask {
    fn render(spec: &TaskSpec) -> String {
        json!({
            "queue": spec.queue,
            "step_id": spec.step_id,
            "attempt": spec.attempt,
            "input": spec.input,
            "idempotency_key": spec.idempotency_key,
            "queue_timeout_ms": spec.queue_timeout.map(|d| d.as_millis() as u64),
            "heartbeat_timeout_ms": spec.heartbeat_timeout.map(|d| d.as_millis() as u64),
        })
        .to_string()
    }

    fn parse(payload: &str) -> Option<StoredTask> {
        let mut value: Value = serde_json::from_str(payload).ok()?;
        let millis = |key: &str| {
            value
                .get(key)
                .and_then(Value::as_u64)
                .map(Duration::from_millis)
        };
        let (queue_timeout, heartbeat_timeout) =
            (millis("queue_timeout_ms"), millis("heartbeat_timeout_ms"));
        Some(StoredTask {
            queue_timeout,
            heartbeat_timeout,
            queue: value.get("queue")?.as_str()?.to_string(),
            step_id: value.get("step_id")?.as_str()?.to_string(),
            attempt: u32::try_from(value.get("attempt")?.as_u64()?).ok()?,
            idempotency_key: value.get("idempotency_key")?.as_str()?.to_string(),
            input: value
                .get_mut("input")
                .map(Value::take)
                .unwrap_or(Value::Null),
        })
    }

    fn into_board_task(self, partition: u32, epoch: u64, instance_id: String) -> BoardTask {
        BoardTask {
            partition,
            epoch,
            queue: self.queue,
            instance_id,
            step_id: self.step_id,
            attempt: self.attempt,
            input: Arc::new(self.input),
            idempotency_key: self.idempotency_key,
            queue_timeout: self.queue_timeout,
            heartbeat_timeout: self.heartbeat_timeout,
        }
    }
}

/// The outcome of the oldest batch committing; never resolves when none is.
async fn oldest_outcome(committing: &mut VecDeque<Committing>) -> CommitResult {
    match committing.front_mut() {
        Some(oldest) => (&mut oldest.outcome).await,
        None => std::future::pending().await,
    }
}
