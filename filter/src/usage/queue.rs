//! The worker's end of the usage queue: resolves the queue the sync role
//! registered and keeps messages it could not deliver yet, so usage is
//! held rather than lost while the sync role starts.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use super::{QUEUE_NAME, UsageMessage};
use crate::host::{Host, LogLevel};

/// Maximum undelivered messages a worker keeps. A slot gets a new message
/// only after the sync role drained the last one, so without a sync role
/// the backlog grows by at most one message per slot plus evictions.
pub const MAX_BACKLOG: usize = 100_000;

/// Result of sending a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Enqueued.
    Sent,
    /// Held in the worker's backlog until the queue can be resolved.
    Held,
    /// Dropped because the backlog is full.
    Dropped,
}

/// Worker side of the usage queue.
#[derive(Debug)]
pub struct UsageQueue {
    vm_id: String,
    queue_id: Cell<Option<u32>>,
    backlog: RefCell<VecDeque<Vec<u8>>>,
    warned: Cell<bool>,
}

impl UsageQueue {
    /// Creates the sender for the queue registered in VM `vm_id`.
    pub fn new(vm_id: &str) -> Self {
        Self {
            vm_id: vm_id.to_owned(),
            queue_id: Cell::new(None),
            backlog: RefCell::new(VecDeque::new()),
            warned: Cell::new(false),
        }
    }

    /// Enqueues `message`, or keeps it in the backlog while the queue is
    /// not registered.
    pub fn send(&self, host: &impl Host, message: &UsageMessage) -> Delivery {
        let bytes = message.encode();
        if self.try_enqueue(host, &bytes) {
            return Delivery::Sent;
        }
        let mut backlog = self.backlog.borrow_mut();
        if backlog.len() >= MAX_BACKLOG {
            return Delivery::Dropped;
        }
        backlog.push_back(bytes);
        Delivery::Held
    }

    /// Retries held messages; returns how many are still held.
    pub fn retry_backlog(&self, host: &impl Host) -> usize {
        loop {
            let next = self.backlog.borrow_mut().pop_front();
            let Some(bytes) = next else {
                return 0;
            };
            if !self.try_enqueue(host, &bytes) {
                let mut backlog = self.backlog.borrow_mut();
                backlog.push_front(bytes);
                return backlog.len();
            }
        }
    }

    /// Returns the number of held messages.
    pub fn backlog_len(&self) -> usize {
        self.backlog.borrow().len()
    }

    fn try_enqueue(&self, host: &impl Host, bytes: &[u8]) -> bool {
        if let Some(queue_id) = self.queue_id.get() {
            if host.enqueue_shared_queue(queue_id, bytes).is_ok() {
                return true;
            }
            // The sync role's VM was replaced; resolve the queue again.
            self.queue_id.set(None);
        }

        match host.resolve_shared_queue(&self.vm_id, QUEUE_NAME) {
            Ok(Some(queue_id)) => {
                self.queue_id.set(Some(queue_id));
                self.warned.set(false);
                host.enqueue_shared_queue(queue_id, bytes).is_ok()
            }
            _ => {
                if !self.warned.replace(true) {
                    host.log(
                        LogLevel::Warn,
                        &format!(
                            "usage queue not found, holding usage in this worker \
                             queue={QUEUE_NAME} vm_id={}; configure the veo_sync \
                             bootstrap extension with the same vm_id",
                            self.vm_id
                        ),
                    );
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::MemoryHost;

    #[test]
    fn messages_wait_until_queue_is_registered() {
        let host = MemoryHost::new(0);
        let queue = UsageQueue::new("veo_edge");
        assert_eq!(queue.send(&host, &UsageMessage::Slot(1)), Delivery::Held);
        assert_eq!(queue.send(&host, &UsageMessage::Slot(2)), Delivery::Held);
        let warnings = host
            .logs()
            .iter()
            .filter(|(level, _)| *level == LogLevel::Warn)
            .count();
        assert_eq!(warnings, 1);

        let queue_id = host.register_shared_queue(QUEUE_NAME).unwrap();
        assert_eq!(queue.retry_backlog(&host), 0);
        assert_eq!(host.queue_len(queue_id), 2);
        assert_eq!(queue.send(&host, &UsageMessage::Slot(3)), Delivery::Sent);
        assert_eq!(host.queue_len(queue_id), 3);

        let first = host.dequeue_shared_queue(queue_id).unwrap().unwrap();
        assert_eq!(UsageMessage::decode(&first), Some(UsageMessage::Slot(1)));
    }
}
