//! How work reaches the reactors: the [`Command`]s a reactor applies, each reactor's [`Mailbox`], and
//! [`Reactors`], the one handle every other part (publish path, admin API, cluster bridge, shutdown) uses.
//!
//! It owns the hand-off only. One FIFO queue per reactor, so messages sent one after another reach every
//! connection in that order; the waker is rung only when a queue goes from empty to non-empty, so a burst of
//! publishes costs one wake-up, not one per message. Questions (kick, presence) go to every reactor and the
//! answers are summed here, within [`REPLY_TIMEOUT`]. It does not frame, store or decide who receives a message
//! (`message`, `history`, the reactors' fanout indexes).

use crate::message::{Message, Target};
use mio::Waker;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a question (kick, presence) waits for every reactor's answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Commands a reactor may have pending before publishes are refused with 503: past it the reactor is not
/// keeping up, and queuing more would only grow memory and latency without bound.
pub const MAX_PENDING_COMMANDS: usize = 4_096;

/// Work for a reactor.
#[derive(Debug)]
pub enum Command {
    /// Deliver a message (framed once, shared by every reactor and recipient).
    Publish(Arc<Message>),
    /// Close the target's connections with this close code and reason; reply with how many.
    Kick {
        /// Whose connections (a user, or a user's client token).
        target: Arc<Target>,
        /// Close code (1000 or 3000-4999).
        code: u16,
        /// Close reason (UTF-8, at most 123 bytes).
        reason: Arc<str>,
        /// Receives the number of connections closed in this reactor, if anyone waits for it.
        reply: Option<Sender<usize>>,
    },
    /// Reply with the number of connections of a user in this reactor.
    Presence {
        /// The user.
        user: Arc<str>,
        /// Receives the count.
        reply: Sender<usize>,
    },
    /// The live upgrade: stop accepting, let TLS handshakes in flight finish (briefly), apply the rest of the
    /// mailbox, then hand this reactor's listeners and connections to the successor through `freeze` (see
    /// `handoff`) and wait to be told to resume (the upgrade rolled back) or for the process to exit.
    Freeze(crate::handoff::Freeze),
    /// Stop accepting, close every connection with 1001, exit when they are gone or the deadline passes.
    Shutdown {
        /// How long to wait for clients to finish the close handshake.
        timeout: Duration,
    },
}

/// A reactor's inbox: a queue plus the `mio::Waker` of its poll.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<Vec<Command>>,
    waker: Waker,
    /// Commands sent and not yet applied by the reactor (queued here or in its backlog).
    pending: AtomicUsize,
}

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

/// Every reactor of the node, as one handle.
#[derive(Debug, Clone)]
pub struct Reactors {
    mailboxes: Arc<[Arc<Mailbox>]>,
}

impl Reactors {
    /// The reactors behind these mailboxes.
    pub fn new(mailboxes: Vec<Arc<Mailbox>>) -> Reactors {
        Reactors {
            mailboxes: mailboxes.into(),
        }
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.mailboxes.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.mailboxes.is_empty()
    }

    /// True when some reactor has [`MAX_PENDING_COMMANDS`] or more pending: publishes should be refused (503)
    /// until it catches up, rather than queued without bound.
    pub fn overloaded(&self) -> bool {
        self.mailboxes
            .iter()
            .any(|m| m.pending() >= MAX_PENDING_COMMANDS)
    }

    /// Hands a message to every reactor.
    pub fn publish(&self, message: Arc<Message>) {
        self.send_all(|| Command::Publish(message.clone()));
    }

    /// Closes the target's connections on every reactor with `code` and `reason`. With `wait`, returns how
    /// many were closed (`None` if some reactor did not answer within [`REPLY_TIMEOUT`]); without, returns
    /// `Some(0)` at once.
    pub fn kick(&self, target: Target, code: u16, reason: &str, wait: bool) -> Option<usize> {
        let target = Arc::new(target);
        let reason: Arc<str> = reason.into();
        let kick = |reply| Command::Kick {
            target: target.clone(),
            code,
            reason: reason.clone(),
            reply,
        };
        if !wait {
            self.send_all(|| kick(None));
            return Some(0);
        }
        self.ask(|reply| kick(Some(reply))).total()
    }

    /// The user's connections, summed over the reactors that answered within [`REPLY_TIMEOUT`].
    pub fn presence(&self, user: &str) -> Answers {
        let user: Arc<str> = user.into();
        self.ask(|reply| Command::Presence {
            user: user.clone(),
            reply,
        })
    }

    /// Sends each reactor its part of a live upgrade's freeze, in reactor order.
    pub fn freeze(&self, freezes: Vec<crate::handoff::Freeze>) {
        debug_assert_eq!(freezes.len(), self.mailboxes.len());
        for (mailbox, freeze) in self.mailboxes.iter().zip(freezes) {
            mailbox.send(Command::Freeze(freeze));
        }
    }

    /// Asks every reactor to stop accepting and close its connections with 1001 within `timeout`.
    pub fn shutdown(&self, timeout: Duration) {
        self.send_all(|| Command::Shutdown { timeout });
    }

    /// Sends one command to every reactor, made for each by `make`.
    fn send_all(&self, make: impl Fn() -> Command) {
        for mailbox in self.mailboxes.iter() {
            mailbox.send(make());
        }
    }

    /// Sends a question to every reactor and sums the answers that arrive within [`REPLY_TIMEOUT`].
    fn ask(&self, make: impl Fn(Sender<usize>) -> Command) -> Answers {
        let (tx, rx) = mpsc::channel();
        self.send_all(|| make(tx.clone()));
        drop(tx);
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut answers = Answers {
            sum: 0,
            missing: self.mailboxes.len(),
        };
        while answers.missing > 0 {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(n) => {
                    answers.sum += n;
                    answers.missing -= 1;
                }
                Err(_) => break,
            }
        }
        answers
    }
}

/// What the reactors answered to a question (kick, presence) within [`REPLY_TIMEOUT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answers {
    sum: usize,
    missing: usize,
}

impl Answers {
    /// The sum, when every reactor answered: what a caller that must be exact (the admin API) reports.
    pub fn total(self) -> Option<usize> {
        (self.missing == 0).then_some(self.sum)
    }

    /// The sum of the answers that came, a reactor that did not answer counting 0: for a caller that is itself
    /// answering under its own deadline (another node's presence query).
    pub fn partial(self) -> usize {
        self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Poll, Token};

    /// Mailboxes with real wakers, and the polls that keep them valid.
    fn reactors(n: usize) -> (Reactors, Vec<Arc<Mailbox>>, Vec<Poll>) {
        let polls: Vec<Poll> = (0..n).map(|_| Poll::new().unwrap()).collect();
        let mailboxes: Vec<Arc<Mailbox>> = polls
            .iter()
            .map(|p| Mailbox::new(Waker::new(p.registry(), Token(0)).unwrap()))
            .collect();
        (Reactors::new(mailboxes.clone()), mailboxes, polls)
    }

    fn taken(mailbox: &Mailbox) -> Vec<Command> {
        let mut out = Vec::new();
        mailbox.take_all(&mut out);
        mailbox.applied(out.len());
        out
    }

    #[test]
    fn a_publish_reaches_every_reactor_as_the_same_message() {
        let (reactors, mailboxes, _polls) = reactors(3);
        let message = Arc::new(Message::new(Target::All, false, b"x"));
        reactors.publish(message.clone());
        for mailbox in &mailboxes {
            assert_eq!(mailbox.pending(), 1);
            match taken(mailbox).as_slice() {
                [Command::Publish(m)] => assert!(Arc::ptr_eq(m, &message)),
                other => panic!("{other:?}"),
            }
            assert_eq!(mailbox.pending(), 0);
        }
    }

    #[test]
    fn questions_sum_every_reactors_answer() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let answerers: Vec<_> = mailboxes
            .into_iter()
            .enumerate()
            .map(|(i, mailbox)| {
                std::thread::spawn(move || loop {
                    for command in taken(&mailbox) {
                        if let Command::Presence { reply, .. } = command {
                            let _ = reply.send(i + 1);
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                })
            })
            .collect();
        assert_eq!(reactors.presence("u").total(), Some(3));
        for a in answerers {
            a.join().unwrap();
        }
    }

    #[test]
    fn a_reactor_that_does_not_answer_makes_the_total_unknown_but_not_the_partial_sum() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let answerer = {
            let mailbox = mailboxes[0].clone();
            std::thread::spawn(move || loop {
                for command in taken(&mailbox) {
                    if let Command::Presence { reply, .. } = command {
                        let _ = reply.send(5);
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            })
        };
        // The second reactor never takes its mailbox: the question waits the whole REPLY_TIMEOUT.
        let answers = reactors.presence("u");
        answerer.join().unwrap();
        assert_eq!((answers.total(), answers.partial()), (None, 5));
    }

    #[test]
    fn a_kick_nobody_waits_for_carries_no_reply() {
        let (reactors, mailboxes, _polls) = reactors(1);
        assert_eq!(
            reactors.kick(Target::User("u".into()), 4000, "bye", false),
            Some(0)
        );
        match taken(&mailboxes[0]).as_slice() {
            [Command::Kick {
                reply: None,
                code: 4000,
                ..
            }] => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn overloaded_once_a_reactor_is_max_pending_behind() {
        let (reactors, mailboxes, _polls) = reactors(2);
        assert!(!reactors.overloaded());
        for _ in 0..MAX_PENDING_COMMANDS {
            mailboxes[1].send(Command::Shutdown {
                timeout: Duration::ZERO,
            });
        }
        assert!(reactors.overloaded());
        taken(&mailboxes[1]);
        assert!(!reactors.overloaded());
    }
}
