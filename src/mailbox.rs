//! Cross-thread work for a reactor: a queue plus a `mio::Waker`.
//!
//! It owns the hand-off only: the admin thread (and later the cluster bridge) pushes commands, the reactor
//! takes them all at once. One queue per reactor, FIFO, so messages published one after another to the same
//! target reach every connection in that order. The waker is rung only when the queue goes from empty to
//! non-empty: a burst of publishes costs one wake-up, not one per message.

use bytes::Bytes;
use mio::Waker;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

/// Who a publish or kick is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connection of the user.
    User(String),
    /// The connections of the user holding this client token.
    UserClient(String, String),
    /// Every connection subscribed to the channel.
    Channel(String),
    /// Every connection.
    All,
}

/// Work for a reactor.
#[derive(Debug)]
pub enum Command {
    /// Deliver an already framed message.
    Publish {
        /// Recipients.
        target: Arc<Target>,
        /// The frame, encoded once and shared by every recipient.
        frame: Bytes,
        /// The same message in its envelope (`history::envelope`), for connections that opted in; also shared.
        envelope: Bytes,
        /// Its publish sequence number when its stream keeps history (`history`), else 0.
        seq: u64,
    },
    /// Close the target's connections with this close code and reason; reply with how many.
    Kick {
        /// Whose connections (a user, or a user's client token).
        target: Arc<Target>,
        /// Close code (1000 or 4000-4999).
        code: u16,
        /// Close reason (UTF-8, at most [`crate::proto::frame::MAX_CLOSE_REASON_BYTES`], 123 bytes).
        reason: Arc<str>,
        /// Receives the number of connections closed in this reactor.
        reply: Sender<usize>,
    },
    /// Reply with the number of connections of a user in this reactor.
    Presence {
        /// The user.
        user: Arc<str>,
        /// Receives the count.
        reply: Sender<usize>,
    },
    /// Stop accepting, close every connection with 1001, exit when they are gone or the deadline passes.
    Shutdown {
        /// How long to wait for clients to finish the close handshake.
        timeout: std::time::Duration,
    },
}

/// A reactor's inbox.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<Vec<Command>>,
    waker: Waker,
    /// Commands sent and not yet applied by the reactor (queued here or in its backlog).
    pending: AtomicUsize,
}

/// Commands a reactor may have pending before the admin API refuses new publishes with 503: past it the
/// reactor is not keeping up, and queuing more would only grow memory and latency without bound.
pub const MAX_PENDING_COMMANDS: usize = 4_096;

impl Mailbox {
    /// A mailbox whose waker belongs to the reactor's `Poll`.
    pub fn new(waker: Waker) -> Arc<Self> {
        Arc::new(Mailbox {
            queue: Mutex::new(Vec::new()),
            waker,
            pending: AtomicUsize::new(0),
        })
    }

    /// Commands sent and not yet applied.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The reactor applied `n` commands.
    pub fn applied(&self, n: usize) {
        self.pending.fetch_sub(n, Ordering::Relaxed);
    }

    /// Queues a command and wakes the reactor if it may be asleep.
    pub fn send(&self, command: Command) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let was_empty = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let was_empty = queue.is_empty();
            queue.push(command);
            was_empty
        };
        // A non-empty queue means a wake-up is already pending and the reactor has not yet taken the queue.
        if was_empty {
            if let Err(e) = self.waker.wake() {
                log::error!("waking reactor failed: {e}");
            }
        }
    }

    /// Moves every queued command into `into` (which should be empty), in order.
    pub fn take_all(&self, into: &mut Vec<Command>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *queue, into);
    }
}
