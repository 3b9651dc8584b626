//! Partition mailboxes that count, engine-wide, the messages no actor has taken yet.
//!
//! The count says whether any command waits for a partition: when none does, a
//! partition's batch may be committed in place instead of by the committer thread
//! (see `committer`), because no other work is held up while this thread syncs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use crate::partition::Message;

/// Most commands waiting in a partition's mailbox; senders wait beyond that.
pub const MAILBOX_CAPACITY: usize = 4096;

/// Most times a stopping actor's mailbox yields to a sender finishing its message.
const DROP_WAITS_MAX: u32 = 1000;

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
        let mut waits = 0;
        loop {
            match self.receiver.try_recv() {
                Ok(_) => left += 1,
                Err(TryRecvError::Disconnected) => break,
                // A sender holds a permit taken before the close: its message is being
                // written (`MailboxSender::send` awaits nothing after the permit). Should
                // it not come after all, the count stays high, which only keeps batches
                // from committing in place.
                Err(TryRecvError::Empty) if waits < DROP_WAITS_MAX => {
                    waits += 1;
                    std::thread::yield_now();
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        self.unread.take(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Message {
        let (reply, _) = tokio::sync::oneshot::channel();
        Message::IsRunning {
            instance_id: "i".into(),
            reply,
        }
    }

    #[tokio::test]
    async fn unread_counts_what_no_actor_has_taken_in_any_mailbox() {
        // Goal: the count is every message sent and not yet taken, over all mailboxes,
        // and messages left in a stopped actor's mailbox stop counting; a send to a
        // stopped actor counts nothing. Method: two mailboxes, sends, takes, a drop.
        let unread = Unread::default();
        let (first, mut first_box) = mailbox(&unread);
        let (second, second_box) = mailbox(&unread);
        assert!(unread.none());
        first.send(message()).await.unwrap();
        first.send(message()).await.unwrap();
        second.send(message()).await.unwrap();
        assert_eq!(unread.0.load(Ordering::Acquire), 3);
        let mut taken = Vec::new();
        assert_eq!(first_box.recv_many(&mut taken, 1).await, 1);
        assert_eq!(unread.0.load(Ordering::Acquire), 2);
        assert_eq!(first_box.recv_many(&mut taken, 10).await, 1);
        assert!(
            !first_box.none_unread(),
            "the second mailbox still holds one"
        );
        drop(second_box);
        assert!(unread.none(), "a stopped actor's messages no longer wait");
        assert!(second.send(message()).await.is_err());
        assert!(unread.none(), "nor does a message sent to it");
    }
}
