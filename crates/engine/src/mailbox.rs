//! Partition mailboxes that count, engine-wide, the messages no actor has taken yet.
//!
//! The count says whether any command waits for a partition: when none does, a
//! partition's batch may be committed in place instead of by the committer thread
//! (see `committer`), because no other work is held up while this thread syncs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::partition::Message;

/// Most commands waiting in a partition's mailbox; senders wait beyond that.
pub const MAILBOX_CAPACITY: usize = 4096;

/// Messages sent to the engine's partitions that no actor has taken yet, a sender
/// waiting for room included.
#[derive(Clone, Default)]
pub(crate) struct Unread(Arc<AtomicUsize>);

impl Unread {
    /// Whether no message waits for any partition.
    pub fn none(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }

    fn add(&self, count: usize) {
        self.0.fetch_add(count, Ordering::AcqRel);
    }

    fn take(&self, count: usize) {
        let before = self.0.fetch_sub(count, Ordering::AcqRel);
        assert!(before >= count, "more messages taken than were sent");
    }
}

/// A new partition's mailbox, counted in `unread`.
pub(crate) fn mailbox(unread: &Unread) -> (MailboxSender, Mailbox) {
    let (sender, receiver) = mpsc::channel(MAILBOX_CAPACITY);
    (
        MailboxSender {
            sender,
            unread: unread.clone(),
        },
        Mailbox {
            receiver,
            unread: unread.clone(),
        },
    )
}

/// Sends to one partition's actor.
#[derive(Clone)]
pub(crate) struct MailboxSender {
    sender: mpsc::Sender<Message>,
    unread: Unread,
}

impl MailboxSender {
    /// Sends, waiting for room; `Err` when the actor has stopped.
    pub async fn send(&self, message: Message) -> Result<(), Stopped> {
        self.unread.add(1);
        match self.sender.send(message).await {
            Ok(()) => Ok(()),
            Err(_) => {
                self.unread.take(1);
                Err(Stopped)
            }
        }
    }
}

/// The partition's actor has stopped; the message was dropped.
#[derive(Debug)]
pub(crate) struct Stopped;

/// The receiving end, owned by the partition's actor.
pub(crate) struct Mailbox {
    receiver: mpsc::Receiver<Message>,
    unread: Unread,
}

impl Mailbox {
    /// Takes up to `limit` messages into `messages`, waiting for one; 0 once every
    /// sender is gone.
    pub async fn recv_many(&mut self, messages: &mut Vec<Message>, limit: usize) -> usize {
        let received = self.receiver.recv_many(messages, limit).await;
        self.unread.take(received);
        received
    }

    /// Whether no message waits for any partition of the engine.
    pub fn none_unread(&self) -> bool {
        self.unread.none()
    }
}

impl Drop for Mailbox {
    /// Messages left when the actor stops are dropped (their callers see the actor
    /// gone) and no longer count as waiting.
    fn drop(&mut self) {
        self.receiver.close();
        let mut left = 0;
        while self.receiver.try_recv().is_ok() {
            left += 1;
        }
        self.unread.take(left);
    }
}
