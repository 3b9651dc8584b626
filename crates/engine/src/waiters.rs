//! Callers waiting for instances to end (`GET /v1/instances/{id}?wait_ms=`).
//!
//! A waiter registers before it reads the instance, and partitions notify after
//! the commit that ended it, so an end between the read and the wait is not missed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::InstanceView;

/// What a waiter sees: nothing while the instance runs, its final view once it ended.
pub(crate) type Ending = Option<Arc<InstanceView>>;

/// Most instances waited on at once; beyond it, waits degrade to a plain read.
pub const WAITED_INSTANCES_MAX: usize = 100_000;

#[derive(Default)]
pub(crate) struct Waiters {
    by_instance: Mutex<HashMap<String, (watch::Sender<Ending>, usize)>>,
}

/// A registration; deregisters on drop.
pub(crate) struct Waiter<'a> {
    waiters: &'a Waiters,
    id: String,
    pub receiver: Option<watch::Receiver<Ending>>,
}

impl Waiters {
    pub fn register(&self, id: &str) -> Waiter<'_> {
        let mut map = self.by_instance.lock().expect("waiters lock");
        let receiver = if let Some((sender, count)) = map.get_mut(id) {
            *count += 1;
            Some(sender.subscribe())
        } else if map.len() < WAITED_INSTANCES_MAX {
            let (sender, receiver) = watch::channel(None);
            map.insert(id.to_string(), (sender, 1));
            Some(receiver)
        } else {
            None
        };
        Waiter {
            waiters: self,
            id: id.to_string(),
            receiver,
        }
    }

    /// An instance ended (its end is committed); `view` makes its final view, called
    /// only when someone waits for it.
    pub fn ended(&self, id: &str, view: impl FnOnce() -> InstanceView) {
        let map = self.by_instance.lock().expect("waiters lock");
        if let Some((sender, _)) = map.get(id) {
            sender.send_replace(Some(Arc::new(view())));
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.receiver.is_none() {
            return;
        }
        let mut map = self.waiters.by_instance.lock().expect("waiters lock");
        if let Some((_, count)) = map.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.id);
            }
        }
    }
}
