//! How work reaches the reactors: the [`Command`]s a reactor applies, each reactor's [`Mailbox`], and
//! [`Reactors`], the one handle every other part (publish path, admin API, cluster bridge, shutdown) uses.
//!
//! It owns the hand-off only. One FIFO queue per reactor, so messages sent one after another reach every
//! connection in that order; the waker is rung only when a queue goes from empty to non-empty, so a burst of
//! publishes costs one wake-up, not one per message. A batch publish is one command per reactor, however many
//! messages it holds, but it weighs one per message against [`MAX_PENDING_COMMANDS`], as that many single
//! publishes would, so batches cannot queue more work than the bound allows. Questions (kick,
//! presence, subscription changes) go to every reactor and the answers are summed here, within
//! [`REPLY_TIMEOUT`]. It does not frame, store or decide who receives a message
//! (`message`, `history`, the reactors' fanout indexes).

use crate::message::envelope::Position;
use crate::message::{Message, Target};
use mio::Waker;
use std::ops::AddAssign;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a question (kick, presence) waits for every reactor's answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Commands a reactor may have pending before publishes are refused with 503: past it the reactor is not
/// keeping up, and queuing more would only grow memory and latency without bound. A batch counts one per
/// message (per target: each is a message to one stream).
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
    /// Deliver these messages in order (a batch publish: each item framed once, one message per target sharing
    /// those bytes).
    PublishBatch {
        /// The messages, in the order of the batch's body; shared by every reactor.
        messages: Arc<[Arc<Message>]>,
        /// The first message not applied yet. A reactor that reaches its turn's send budget part-way through a
        /// large batch puts the rest back at the front of its backlog, so one batch cannot starve socket reads
        /// and timers.
        next: usize,
    },
    /// Subscribe the target's connections to a channel, or unsubscribe them; reply with what changed.
    Subscribe {
        /// What to change.
        change: Arc<Subscription>,
        /// Receives this reactor's counts, if anyone waits for them.
        reply: Option<Sender<Subscribed>>,
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

/// A runtime subscription change for the connections of a user, or of one of its client tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Whose connections: [`Target::User`] or [`Target::UserClient`].
    pub target: Target,
    /// The channel.
    pub channel: String,
    /// Subscribe (true) or unsubscribe (false).
    pub join: bool,
    /// For a subscribe, where in the channel's stream the connections are: a connection that joins gets what
    /// history holds after it (or a `resync`) before anything live.
    pub since: Option<Position>,
}

/// What a subscription change did, summed over reactors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subscribed {
    /// Connections whose membership changed (joined, or left).
    pub changed: usize,
    /// Connections that were not subscribed because they hold `auth.max_channels` channels already.
    pub at_limit: usize,
}

impl AddAssign for Subscribed {
    fn add_assign(&mut self, other: Subscribed) {
        self.changed += other.changed;
        self.at_limit += other.at_limit;
    }
}

/// A reactor's inbox: a queue plus the `mio::Waker` of its poll.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<Vec<Command>>,
    waker: Waker,
    /// Commands sent and not yet applied by the reactor (queued here or in its backlog), a batch's messages
    /// counted one by one.
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

    /// The reactor applied `n` commands (or messages of a batch).
    pub fn applied(&self, n: usize) {
        self.pending.fetch_sub(n, Ordering::Relaxed);
    }

    /// Queues a command and wakes the reactor if it may be asleep.
    pub fn send(&self, command: Command) {
        self.send_weighing(command, 1);
    }

    /// [`Mailbox::send`] for a command that counts as `weight` pending commands (a batch: its messages). The
    /// reactor counts one applied per command it takes, and the rest of the weight as it applies the batch.
    fn send_weighing(&self, command: Command, weight: usize) {
        debug_assert!(weight >= 1);
        self.pending.fetch_add(weight, Ordering::Relaxed);
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

    /// Hands a batch of messages to every reactor as one command, weighing one pending command per message;
    /// each reactor applies them in order.
    pub fn publish_batch(&self, messages: Arc<[Arc<Message>]>) {
        if messages.is_empty() {
            return;
        }
        for mailbox in self.mailboxes.iter() {
            let batch = Command::PublishBatch {
                messages: messages.clone(),
                next: 0,
            };
            mailbox.send_weighing(batch, messages.len());
        }
    }

    /// Applies a subscription change on every reactor. With `wait`, returns what changed (`None` if some reactor
    /// did not answer within [`REPLY_TIMEOUT`]); without (another node's change, nobody waits), returns the
    /// zero count at once.
    pub fn subscribe(&self, change: Subscription, wait: bool) -> Option<Subscribed> {
        let change = Arc::new(change);
        if !wait {
            self.send_all(|| Command::Subscribe {
                change: change.clone(),
                reply: None,
            });
            return Some(Subscribed::default());
        }
        self.ask(|reply| Command::Subscribe {
            change: change.clone(),
            reply: Some(reply),
        })
        .total()
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
    fn ask<T: Default + AddAssign>(&self, make: impl Fn(Sender<T>) -> Command) -> Answers<T> {
        let (tx, rx) = mpsc::channel();
        self.send_all(|| make(tx.clone()));
        drop(tx);
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut answers = Answers {
            sum: T::default(),
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

/// What the reactors answered to a question (kick, presence, subscription change) within [`REPLY_TIMEOUT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answers<T = usize> {
    sum: T,
    missing: usize,
}

impl<T> Answers<T> {
    /// The sum, when every reactor answered: what a caller that must be exact (the admin API) reports.
    pub fn total(self) -> Option<T> {
        (self.missing == 0).then_some(self.sum)
    }

    /// The sum of the answers that came, a reactor that did not answer counting 0: for a caller that is itself
    /// answering under its own deadline (another node's presence query).
    pub fn partial(self) -> T {
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
    fn a_batch_is_one_command_per_reactor_sharing_the_messages() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let messages: Arc<[Arc<Message>]> = (0..3)
            .map(|i| Arc::new(Message::new(Target::User(i.to_string()), false, b"x")))
            .collect();
        reactors.publish_batch(messages.clone());
        for mailbox in &mailboxes {
            assert_eq!(mailbox.pending(), 3, "a batch weighs one per message");
            let mut commands = Vec::new();
            mailbox.take_all(&mut commands);
            match commands.as_slice() {
                [Command::PublishBatch {
                    messages: m,
                    next: 0,
                }] => {
                    assert!(Arc::ptr_eq(m, &messages))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn batches_fill_the_pending_bound_by_their_messages() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let messages: Arc<[Arc<Message>]> = (0..MAX_PENDING_COMMANDS)
            .map(|_| Arc::new(Message::new(Target::All, false, b"x")))
            .collect();
        reactors.publish_batch(messages.clone());
        assert!(
            reactors.overloaded(),
            "one batch of MAX_PENDING_COMMANDS messages fills it"
        );
        // A reactor counts the command applied (one) and its other messages as it applies them.
        for mailbox in &mailboxes {
            mailbox.applied(1);
            mailbox.applied(MAX_PENDING_COMMANDS - 1);
            assert_eq!(mailbox.pending(), 0);
        }
        assert!(!reactors.overloaded());
    }

    #[test]
    fn subscription_answers_are_summed_field_by_field() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let answerers: Vec<_> = mailboxes
            .into_iter()
            .enumerate()
            .map(|(i, mailbox)| {
                std::thread::spawn(move || loop {
                    for command in taken(&mailbox) {
                        if let Command::Subscribe {
                            reply: Some(reply), ..
                        } = command
                        {
                            let _ = reply.send(Subscribed {
                                changed: i + 1,
                                at_limit: i,
                            });
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                })
            })
            .collect();
        let change = Subscription {
            target: Target::User("u".into()),
            channel: "c".into(),
            join: true,
            since: None,
        };
        assert_eq!(
            reactors.subscribe(change, true),
            Some(Subscribed {
                changed: 3,
                at_limit: 1
            })
        );
        for a in answerers {
            a.join().unwrap();
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
