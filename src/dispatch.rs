//! How work reaches the reactors: the [`Command`]s a reactor applies, each reactor's [`Mailbox`], and
//! [`Reactors`], the one handle every other part (publish path, admin API, cluster bridge, shutdown) uses.
//!
//! It owns the hand-off only, and the one routing rule: a user's connections live on the user's **home
//! reactor** ([`home`], a fixed hash of the user id), so a publish, kick, presence query or subscription change
//! for a user is sent to that one reactor, and only channel and `all` work goes to every reactor. One FIFO
//! queue per reactor, so messages sent one after another reach every connection in that order. The waker is
//! rung only when the reactor may be asleep in `poll` (it says so through [`Mailbox::going_to_sleep`]): a
//! burst of publishes to a busy reactor costs no system call at all, and a burst to an idle one one wake-up.
//! A thread that sends many commands in a row (the admin thread, over one turn of its loop) can hold its
//! wake-ups back until it is done ([`hold_wakes`]), so its answers go out before the reactors compete for the
//! cores, and each reactor is woken once for the lot. A batch publish is one command per reactor, however many
//! messages it holds, but it weighs one per message against [`MAX_PENDING_COMMANDS`], as that many single
//! publishes would, so batches cannot queue more work than the bound allows. A message waiting in mailboxes is
//! memory held like any queued frame: each mailbox holds a budget reference on its frames (`SharedFrame`, so
//! the frames count once in `websocket.max_buffered_bytes_total` however many mailboxes and outboxes hold
//! them) until its reactor has delivered it, and the bytes a mailbox holds are bounded like its length (see
//! [`Reactors::overloaded`]). Questions (kick, presence, subscription changes) go to the reactors their target
//! concerns (a user's home) and the answers are summed here, within [`REPLY_TIMEOUT`]. It does not frame, store or decide who receives a
//! message (`message`, `history`, the reactors' fanout indexes).
//!
//! A sender that must keep every mailbox within both bounds without being refused (the cluster's bus reader,
//! which waits instead) reads [`Reactors::fullest`] and [`Reactors::bytes_full`] before it sends.

use crate::auth::Identity;
use crate::budget::Budget;
use crate::message::envelope::Position;
use crate::message::missed::{Missed, Told};
use crate::message::{Message, Target};
use crate::tls::table::Slot;
use mio::Waker;
use std::cell::RefCell;
use std::ops::AddAssign;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// Commands a held wake-up ([`hold_wakes`]) lets wait in one mailbox before it rings anyway: a turn of the
/// admin loop that reads thousands of pipelined publishes must not leave a reactor idle until the bound below
/// refuses them.
pub const MAX_HELD_COMMANDS: usize = 256;

/// How long a question (kick, presence, subscription change) waits for every reactor's answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Commands a reactor may have pending before publishes are refused with 503: past it the reactor is not
/// keeping up, and queuing more would only grow memory and latency without bound. A batch counts one per
/// message (per target: each is a message to one stream).
pub const MAX_PENDING_COMMANDS: usize = 4_096;

/// Share of the buffer budget (`websocket.max_buffered_bytes_total`) that the messages waiting in one
/// reactor's mailbox may hold before publishes are refused with 503: one divided by this. Every publish goes to
/// every mailbox in order, so the messages waiting anywhere are those waiting in the longest mailbox: this
/// bounds their memory (64 MiB with the defaults; without it, 4,096 publishes of 1 MiB could wait).
pub const MAILBOX_BUDGET_SHARE: usize = 4;

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
    /// Tell the connections in `scope` that they may have missed messages: `resync` notices to those that opted
    /// into recovery, close 1012 to the others (`message::missed`); count them in `told`.
    Missed {
        /// Which connections, and which of their streams.
        scope: Arc<Missed>,
        /// Where the reactor counts the connections it told.
        told: Arc<Told>,
    },
    /// Deliver these messages in order (a batch publish: each item framed once, one message per target sharing
    /// those bytes).
    /// The reactor delivers them as that many publishes in a row (each over as many turns as it needs, so a
    /// batch that reaches huge channels cannot starve socket reads and timers).
    PublishBatch {
        /// The messages, in the order of the batch's body; shared by every reactor.
        messages: Arc<[Arc<Message>]>,
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
    /// Take over a connection another reactor accepted and authenticated, whose user this reactor is the home
    /// of, and finish its upgrade here (see [`Adoption`]).
    Adopt(Box<Adoption>),
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

/// A connection handed from the reactor that accepted it to its user's home reactor, after its upgrade request
/// was read and admitted (origin, identity, a connection slot) and before anything was answered: it has no
/// place in any index yet and has received nothing, so nothing can be lost or doubled on the way. The home
/// reactor registers the socket, answers 101 and replays history exactly as for a connection it accepted.
#[derive(Debug)]
pub struct Adoption {
    /// The socket (non-blocking, `TCP_NODELAY` set), deregistered from the accepting reactor's poll.
    pub stream: std::net::TcpStream,
    /// The TLS session of a wss:// connection (its handshake done), with its budget charge.
    pub tls: Option<Slot>,
    /// Who it is (the accepting reactor authenticated it and took a connection slot for it).
    pub identity: Identity,
    /// The answer (101, or an SSE stream's head), built from the request.
    pub response: Vec<u8>,
    /// Whether the connection receives envelopes.
    pub recover: bool,
    /// What it speaks on its socket after the answer (WebSocket, with or without permessage-deflate, or SSE).
    pub wire: crate::conn::state::Wire,
    /// Its `since` positions (empty without).
    pub since: Vec<Position>,
    /// The node's last stored sequence number, read before this adoption was queued: every stored message up
    /// to it that concerns the home reactor is ahead of the adoption in its mailbox, so the home reactor's replay
    /// may reach that far (see `Reactor::adopt`).
    pub stored_upto: u64,
    /// Bytes the client sent after its request head (its first frames, sent without waiting for the 101).
    pub rest: Vec<u8>,
}

/// A user's home reactor among `reactors`: where every connection of the user lives. A fixed function of the
/// user id (FNV-1a, then a multiplicative mix into the range), so every thread, and a new process after a live
/// upgrade, agrees on it without a table.
pub fn home(user: &str, reactors: usize) -> usize {
    if reactors <= 1 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in user.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mixed = (hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u128;
    ((mixed * reactors as u128) >> 32) as usize
}

/// Whose home reactor alone a target concerns: a user's (and a user's client token's) connections all live
/// there; channels and `all` span every reactor.
fn user_of(target: &Target) -> Option<&str> {
    match target {
        Target::User(user) | Target::UserClient(user, _) => Some(user),
        Target::Channel(_) | Target::All => None,
    }
}

thread_local! {
    /// Mailboxes whose wake-up this thread holds back, while it is inside [`hold_wakes`].
    static HELD_WAKES: RefCell<Option<Vec<Arc<Mailbox>>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's wake-ups held: commands are queued at once (so their order is what it would
/// be), but the reactors they go to are woken when `f` returns, once each. The admin thread wraps a turn of its
/// loop in it; a question that waits for answers rings the held wake-ups first ([`Reactors`] does).
pub fn hold_wakes<T>(f: impl FnOnce() -> T) -> T {
    let outer = HELD_WAKES.with(|held| {
        let mut held = held.borrow_mut();
        let outer = held.is_some();
        if !outer {
            *held = Some(Vec::new());
        }
        outer
    });
    let result = f();
    if !outer {
        ring_held_wakes();
        HELD_WAKES.with(|held| *held.borrow_mut() = None);
    }
    result
}

/// Wakes the reactors this thread's held wake-ups are for, now.
fn ring_held_wakes() {
    let pending = HELD_WAKES.with(|held| held.borrow_mut().as_mut().map(std::mem::take));
    for mailbox in pending.into_iter().flatten() {
        mailbox.wake_if_asleep();
    }
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
    /// What the publishes sent and not yet delivered by the reactor cost the budget (`Message::mailbox_charge`).
    pending_bytes: AtomicUsize,
    /// Set by the reactor just before it may sleep in `poll`, cleared by whoever wakes it (or by the reactor
    /// when it finds mail): a sender rings the waker only when it clears this flag, so a busy reactor costs its
    /// senders no system call. With `has_mail` it is the two-flag handshake that loses no wake-up (both sides
    /// write their flag, then read the other's, all `SeqCst`).
    asleep: AtomicBool,
    /// The queue is not empty.
    has_mail: AtomicBool,
}

impl Mailbox {
    /// A mailbox whose waker belongs to the reactor's `Poll`.
    pub fn new(waker: Waker) -> Arc<Self> {
        Arc::new(Mailbox {
            queue: Mutex::new(Vec::new()),
            waker,
            pending: AtomicUsize::new(0),
            pending_bytes: AtomicUsize::new(0),
            asleep: AtomicBool::new(false),
            has_mail: AtomicBool::new(false),
        })
    }

    /// The reactor is about to sleep in `poll`: returns false (and stays awake) when commands are queued, so it
    /// should poll without sleeping. Senders from now on ring the waker; [`Mailbox::awake`] ends it.
    pub fn going_to_sleep(&self) -> bool {
        self.asleep.store(true, Ordering::SeqCst);
        if self.has_mail.load(Ordering::SeqCst) {
            self.asleep.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Whether commands are queued (the reactor takes them whether or not a wake-up came).
    pub fn has_mail(&self) -> bool {
        self.has_mail.load(Ordering::SeqCst)
    }

    /// The reactor is back from `poll`: senders need not ring the waker until it sleeps again.
    pub fn awake(&self) {
        self.asleep.store(false, Ordering::Relaxed);
    }

    /// Rings the waker if the reactor may be asleep and nobody rang it since.
    fn wake_if_asleep(&self) {
        if self.asleep.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                log::error!("waking reactor failed: {e}");
            }
        }
    }

    /// Bytes of the publishes sent and not yet delivered (their frames, as the budget counts them).
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes.load(Ordering::Relaxed)
    }

    /// Sends a publish: the mailbox holds a budget reference on its frames until the reactor has delivered it
    /// ([`Mailbox::delivered`]). The frames are charged whatever the budget says: the message is already in
    /// memory, and admission is decided before it is made ([`Reactors::overloaded`]).
    pub fn send_publish(self: &Arc<Self>, message: Arc<Message>, budget: &Budget) {
        self.hold(&message, budget);
        self.send(Command::Publish(message));
    }

    /// Charges a message about to be sent to this mailbox, until [`Mailbox::delivered`].
    fn hold(&self, message: &Message, budget: &Budget) {
        for frame in message.mailbox_frames() {
            frame.force_hold(budget);
        }
        self.pending_bytes
            .fetch_add(message.mailbox_charge(), Ordering::Relaxed);
    }

    /// The reactor has delivered `message` to every recipient: its frames leave the mailbox.
    pub fn delivered(&self, message: &Message, budget: &Budget) {
        for frame in message.mailbox_frames() {
            frame.release(budget);
        }
        self.pending_bytes
            .fetch_sub(message.mailbox_charge(), Ordering::Relaxed);
    }

    /// Commands sent and not yet applied.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The reactor applied `n` commands (or messages of a batch).
    pub fn applied(&self, n: usize) {
        self.pending.fetch_sub(n, Ordering::Relaxed);
    }

    /// Queues a command and wakes the reactor if it may be asleep (when this thread holds its wake-ups, when
    /// it lets them go).
    pub fn send(self: &Arc<Self>, command: Command) {
        self.send_weighing(command, 1);
    }

    /// [`Mailbox::send`] for a command that counts as `weight` pending commands (a batch: its messages). The
    /// reactor counts one applied per command it takes, and the rest of the weight as it applies the batch.
    fn send_weighing(self: &Arc<Self>, command: Command, weight: usize) {
        debug_assert!(weight >= 1);
        self.pending.fetch_add(weight, Ordering::Relaxed);
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.push(command);
            self.has_mail.store(true, Ordering::SeqCst);
        }
        if !self.asleep.load(Ordering::SeqCst) {
            // Busy, or already rung: it takes the queue before it sleeps again (`going_to_sleep`).
            return;
        }
        let held = HELD_WAKES.with(|held| match held.borrow_mut().as_mut() {
            Some(_) if self.pending() >= MAX_HELD_COMMANDS => false,
            Some(list) => {
                if !list.iter().any(|m| Arc::ptr_eq(m, self)) {
                    list.push(self.clone());
                }
                true
            }
            None => false,
        });
        if !held {
            self.wake_if_asleep();
        }
    }

    /// Moves every queued command into `into` (which should be empty), in order.
    pub fn take_all(&self, into: &mut Vec<Command>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        self.has_mail.store(false, Ordering::SeqCst);
        std::mem::swap(&mut *queue, into);
    }
}

/// Every reactor of the node, as one handle.
#[derive(Debug, Clone)]
pub struct Reactors {
    mailboxes: Arc<[Arc<Mailbox>]>,
    /// The buffer budget the messages waiting in mailboxes are charged to.
    budget: Arc<Budget>,
    /// True once a drain began. A publish holds it for reading from its check to its last mailbox push, and
    /// [`Reactors::shutdown`] sets it under the write lock before it queues the shutdown: so every publish
    /// either reaches every mailbox ahead of the shutdown (and is delivered before the 1001) or is refused,
    /// never accepted and then queued behind the close frames.
    closed: Arc<RwLock<bool>>,
}

impl Reactors {
    /// The reactors behind these mailboxes, charging waiting messages to `budget`.
    pub fn new(mailboxes: Vec<Arc<Mailbox>>, budget: Arc<Budget>) -> Reactors {
        Reactors {
            mailboxes: mailboxes.into(),
            budget,
            closed: Arc::new(RwLock::new(false)),
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

    /// True when some reactor has [`MAX_PENDING_COMMANDS`] or more pending, or publishes waiting for it that
    /// hold a [`MAILBOX_BUDGET_SHARE`]th of the buffer budget: publishes should be refused (503) until it
    /// catches up, rather than queued without bound.
    pub fn overloaded(&self) -> bool {
        self.mailboxes
            .iter()
            .any(|m| m.pending() >= MAX_PENDING_COMMANDS)
            || self.bytes_full()
    }

    /// True when publishes waiting for some reactor hold a [`MAILBOX_BUDGET_SHARE`]th of the buffer budget: the
    /// byte half of [`Reactors::overloaded`], for a sender that waits instead of refusing (the bus reader).
    pub fn bytes_full(&self) -> bool {
        let max_bytes = self.budget.limit() / MAILBOX_BUDGET_SHARE;
        self.mailboxes
            .iter()
            .any(|m| m.pending_bytes() >= max_bytes)
    }

    /// The buffer budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The most commands pending in any one mailbox.
    pub fn fullest(&self) -> usize {
        self.mailboxes
            .iter()
            .map(|m| m.pending())
            .max()
            .unwrap_or(0)
    }

    /// Reactor `index`'s mailbox.
    pub fn mailbox(&self, index: usize) -> &Arc<Mailbox> {
        &self.mailboxes[index]
    }

    /// The home reactor of `user` (see [`home`]).
    pub fn home(&self, user: &str) -> usize {
        home(user, self.mailboxes.len())
    }

    /// Whether reactor `reactor` has anything to do with `target`: its user's home, or every reactor for a
    /// channel or `all`.
    fn concerns(&self, reactor: usize, target: &Target) -> bool {
        user_of(target).is_none_or(|user| self.home(user) == reactor)
    }

    /// The mailboxes a target concerns: its user's home reactor, or every reactor.
    fn mailboxes_for(&self, target: &Target) -> impl Iterator<Item = &Arc<Mailbox>> {
        let only = user_of(target).map(|user| self.home(user));
        self.mailboxes
            .iter()
            .enumerate()
            .filter(move |(i, _)| only.is_none_or(|home| home == *i))
            .map(|(_, m)| m)
    }

    /// Hands a message to the reactors it concerns: its user's home reactor, or every reactor.
    pub fn publish(&self, message: Arc<Message>) {
        let target = message.target().clone();
        for mailbox in self.mailboxes_for(&target) {
            mailbox.send_publish(message.clone(), &self.budget);
        }
    }

    /// Tells the connections in `scope`, on every reactor, that they may have missed messages; each reactor
    /// counts the connections it told in `told`. Queued behind everything sent before, so what was delivered
    /// before the loss reaches them first, and ahead of everything sent after.
    pub fn missed(&self, scope: Missed, told: &Arc<Told>) {
        let scope = Arc::new(scope);
        self.send_to(&Target::All, || Command::Missed {
            scope: scope.clone(),
            told: told.clone(),
        });
    }

    /// Hands a batch of messages to each reactor it concerns as one command holding the messages that reactor
    /// has recipients for (all of them, shared, when every message is for a channel or `all`), weighing one
    /// pending command per message; each reactor applies them in order.
    pub fn publish_batch(&self, messages: Arc<[Arc<Message>]>) {
        if messages.is_empty() {
            return;
        }
        for (i, mailbox) in self.mailboxes.iter().enumerate() {
            let mine: Arc<[Arc<Message>]> = if messages.iter().all(|m| self.concerns(i, m.target()))
            {
                messages.clone()
            } else {
                messages
                    .iter()
                    .filter(|m| self.concerns(i, m.target()))
                    .cloned()
                    .collect()
            };
            if mine.is_empty() {
                continue;
            }
            // Each message is held by the mailbox until delivered, as a single publish is.
            for message in mine.iter() {
                mailbox.hold(message, &self.budget);
            }
            let weight = mine.len();
            mailbox.send_weighing(Command::PublishBatch { messages: mine }, weight);
        }
    }

    /// Hands a connection over to reactor `to` (its user's home).
    pub fn adopt(&self, to: usize, adoption: Adoption) {
        self.mailboxes[to].send(Command::Adopt(Box::new(adoption)));
    }

    /// Applies a subscription change on every reactor. With `wait`, returns what changed (`None` if some reactor
    /// did not answer within [`REPLY_TIMEOUT`]); without (another node's change, nobody waits), returns the
    /// zero count at once.
    pub fn subscribe(&self, change: Subscription, wait: bool) -> Option<Subscribed> {
        let change = Arc::new(change);
        let target = change.target.clone();
        if !wait {
            self.send_to(&target, || Command::Subscribe {
                change: change.clone(),
                reply: None,
            });
            return Some(Subscribed::default());
        }
        self.ask(&target, |reply| Command::Subscribe {
            change: change.clone(),
            reply: Some(reply),
        })
        .total()
    }

    /// Applies a subscription change like [`Reactors::subscribe`], without waiting: each reactor sends its counts
    /// to `reply`, for a caller that collects them itself ([`Answers::collect`]) on another thread.
    pub fn subscribe_replying(&self, change: Subscription, reply: Sender<Subscribed>) {
        let change = Arc::new(change);
        self.send_replying(&change.target, &reply, || Command::Subscribe {
            change: change.clone(),
            reply: Some(reply.clone()),
        });
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
            self.send_to(&target, || kick(None));
            return Some(0);
        }
        self.ask(&target, |reply| kick(Some(reply))).total()
    }

    /// Closes the target's connections like [`Reactors::kick`], without waiting: each reactor sends the number
    /// it closed to `reply`, for a caller that collects them itself ([`Answers::collect`]) on another thread,
    /// expecting one answer per reactor (those the target does not concern answer 0 at once).
    pub fn kick_replying(&self, target: Target, code: u16, reason: &str, reply: Sender<usize>) {
        let target = Arc::new(target);
        let reason: Arc<str> = reason.into();
        self.send_replying(&target, &reply, || Command::Kick {
            target: target.clone(),
            code,
            reason: reason.clone(),
            reply: Some(reply.clone()),
        });
    }

    /// The user's connections (on its home reactor), if it answered within [`REPLY_TIMEOUT`].
    pub fn presence(&self, user: &str) -> Answers {
        let target = Target::User(user.to_owned());
        let user: Arc<str> = user.into();
        self.ask(&target, |reply| Command::Presence {
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

    /// Holds a drain off while a publish is handed to the mailboxes; `None` once [`Reactors::shutdown`] began
    /// (the publish must be refused: its recipients are closing).
    pub fn open(&self) -> Option<RwLockReadGuard<'_, bool>> {
        let closed = self.closed.read().unwrap_or_else(|e| e.into_inner());
        (!*closed).then_some(closed)
    }

    /// Asks every reactor to stop accepting and close its connections with 1001 within `timeout`. Publishes
    /// being handed over finish first; later ones are refused ([`Reactors::open`]).
    pub fn shutdown(&self, timeout: Duration) {
        let mut closed = self.closed.write().unwrap_or_else(|e| e.into_inner());
        *closed = true;
        self.send_to(&Target::All, || Command::Shutdown { timeout });
    }

    /// Sends one command to every reactor `target` concerns, made for each by `make`; returns how many.
    fn send_to(&self, target: &Target, make: impl Fn() -> Command) -> usize {
        let mut sent = 0;
        for mailbox in self.mailboxes_for(target) {
            mailbox.send(make());
            sent += 1;
        }
        sent
    }

    /// Sends a question made by `make` to every reactor `target` concerns, and answers the default (nothing
    /// changed, nothing closed) on `reply` for each other one, so a caller can expect one answer per reactor.
    fn send_replying<T: Default>(
        &self,
        target: &Target,
        reply: &Sender<T>,
        make: impl Fn() -> Command,
    ) {
        for (i, mailbox) in self.mailboxes.iter().enumerate() {
            if self.concerns(i, target) {
                mailbox.send(make());
            } else {
                let _ = reply.send(T::default());
            }
        }
    }

    /// Sends a question to every reactor `target` concerns and sums the answers that arrive within
    /// [`REPLY_TIMEOUT`].
    fn ask<T: Default + AddAssign>(
        &self,
        target: &Target,
        make: impl Fn(Sender<T>) -> Command,
    ) -> Answers<T> {
        let (tx, rx) = mpsc::channel();
        let asked = self.send_to(target, || make(tx.clone()));
        drop(tx);
        // Nobody answers a question whose wake-up is held back.
        ring_held_wakes();
        Answers::collect(&rx, asked, Instant::now() + REPLY_TIMEOUT)
    }
}

/// What the reactors answered to a question (kick, presence, subscription change) within [`REPLY_TIMEOUT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answers<T = usize> {
    sum: T,
    missing: usize,
}

impl<T: Default + AddAssign> Answers<T> {
    /// Sums the first `expected` answers that arrive on `rx` before `deadline`.
    pub fn collect(rx: &Receiver<T>, expected: usize, deadline: Instant) -> Answers<T> {
        let mut answers = Answers {
            sum: T::default(),
            missing: expected,
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
        (
            Reactors::new(mailboxes.clone(), Arc::new(Budget::new(1 << 30))),
            mailboxes,
            polls,
        )
    }

    /// Takes and applies a mailbox's commands as a reactor would (a publish is delivered at once).
    fn taken(mailbox: &Mailbox, budget: &Budget) -> Vec<Command> {
        let mut out = Vec::new();
        mailbox.take_all(&mut out);
        let weight = out
            .iter()
            .map(|c| match c {
                Command::PublishBatch { messages } => messages.len(),
                _ => 1,
            })
            .sum();
        mailbox.applied(weight);
        for command in &out {
            match command {
                Command::Publish(message) => mailbox.delivered(message, budget),
                Command::PublishBatch { messages } => {
                    for message in messages.iter() {
                        mailbox.delivered(message, budget);
                    }
                }
                _ => {}
            }
        }
        out
    }

    #[test]
    fn a_publish_reaches_every_reactor_as_the_same_message() {
        let (reactors, mailboxes, _polls) = reactors(3);
        let message = Arc::new(Message::new(Target::All, false, b"x"));
        reactors.publish(message.clone());
        for mailbox in &mailboxes {
            assert_eq!(mailbox.pending(), 1);
            match taken(mailbox, reactors.budget()).as_slice() {
                [Command::Publish(m)] => assert!(Arc::ptr_eq(m, &message)),
                other => panic!("{other:?}"),
            }
            assert_eq!(mailbox.pending(), 0);
        }
    }

    #[test]
    fn a_users_publish_kick_and_presence_go_to_its_home_reactor_only() {
        let (reactors, mailboxes, _polls) = reactors(3);
        let homes: Vec<usize> = (0..300).map(|i| home(&format!("u{i}"), 3)).collect();
        for r in 0..3 {
            let share = homes.iter().filter(|&&h| h == r).count();
            assert!(
                (60..=140).contains(&share),
                "reactor {r} is home of {share} of 300"
            );
        }
        let user = "u7";
        let at = reactors.home(user);
        assert_eq!(at, home(user, 3), "one function for every caller");
        reactors.publish(Arc::new(Message::new(
            Target::User(user.into()),
            false,
            b"x",
        )));
        reactors.publish(Arc::new(Message::new(
            Target::UserClient(user.into(), "c".into()),
            false,
            b"y",
        )));
        reactors.kick(Target::User(user.into()), 4000, "bye", false);
        for (i, mailbox) in mailboxes.iter().enumerate() {
            let got = taken(mailbox, reactors.budget()).len();
            assert_eq!(got, if i == at { 3 } else { 0 }, "reactor {i}");
        }
        reactors.publish(Arc::new(Message::new(
            Target::Channel("c".into()),
            false,
            b"z",
        )));
        for mailbox in &mailboxes {
            assert_eq!(
                taken(mailbox, reactors.budget()).len(),
                1,
                "a channel spans all"
            );
        }
    }

    #[test]
    fn a_batch_gives_each_reactor_only_the_messages_it_has_recipients_for() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let users: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
        let mut targets: Vec<Target> = users.iter().map(|u| Target::User(u.clone())).collect();
        targets.push(Target::All);
        let messages: Arc<[Arc<Message>]> = targets
            .into_iter()
            .map(|t| Arc::new(Message::new(t, false, b"x")))
            .collect();
        reactors.publish_batch(messages.clone());
        let mut seen = 0;
        for (i, mailbox) in mailboxes.iter().enumerate() {
            let mine = users.iter().filter(|u| home(u, 2) == i).count() + 1;
            assert_eq!(mailbox.pending(), mine);
            match taken(mailbox, reactors.budget()).as_slice() {
                [Command::PublishBatch { messages: m }] => {
                    assert_eq!(m.len(), mine);
                    assert!(
                        matches!(m.last().unwrap().target(), Target::All),
                        "order kept"
                    );
                    seen += m.len() - 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            seen,
            users.len(),
            "every user's message reached one reactor"
        );
    }

    #[test]
    fn a_sleeping_reactor_is_woken_once_and_a_busy_one_not_at_all() {
        let (reactors, mailboxes, mut polls) = reactors(1);
        let mut events = mio::Events::with_capacity(8);
        let message = || Arc::new(Message::new(Target::All, false, b"x"));
        // Awake (it has not said it may sleep): no wake-up.
        reactors.publish(message());
        polls[0]
            .poll(&mut events, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(events.is_empty(), "a busy reactor is not woken");
        assert!(mailboxes[0].has_mail());
        assert!(
            !mailboxes[0].going_to_sleep(),
            "mail is queued: do not sleep"
        );
        taken(&mailboxes[0], reactors.budget());
        assert!(mailboxes[0].going_to_sleep());
        // Held wake-ups: three publishes, one wake-up, after the scope.
        hold_wakes(|| {
            for _ in 0..3 {
                reactors.publish(message());
            }
            polls[0]
                .poll(&mut events, Some(Duration::from_millis(20)))
                .unwrap();
            assert!(events.is_empty(), "held until the scope ends");
        });
        polls[0]
            .poll(&mut events, Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(events.iter().count(), 1);
        mailboxes[0].awake();
        assert_eq!(taken(&mailboxes[0], reactors.budget()).len(), 3);
    }

    #[test]
    fn a_question_about_a_user_is_answered_by_its_home_reactor() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let answerers: Vec<_> = mailboxes
            .into_iter()
            .enumerate()
            .map(|(i, mailbox)| {
                std::thread::spawn(move || loop {
                    for command in taken(&mailbox, &Budget::new(0)) {
                        if let Command::Presence { reply, .. } = command {
                            let _ = reply.send(i + 1);
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                })
            })
            .collect();
        // A user's presence is asked of its home reactor only.
        let at = reactors.home("u");
        assert_eq!(reactors.presence("u").total(), Some(at + 1));
        drop(answerers);
    }

    #[test]
    fn a_reactor_that_does_not_answer_makes_the_total_unknown_but_not_the_partial_sum() {
        let (reactors, mailboxes, _polls) = reactors(2);
        // A channel question goes to both reactors (a subscription change of every connection of a channel
        // has no such form, so ask through `ask` directly).
        let answerer = {
            let mailbox = mailboxes[0].clone();
            std::thread::spawn(move || loop {
                for command in taken(&mailbox, &Budget::new(0)) {
                    if let Command::Presence { reply, .. } = command {
                        let _ = reply.send(5);
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            })
        };
        // The second reactor never takes its mailbox: the question waits the whole REPLY_TIMEOUT.
        let answers = reactors.ask(&Target::All, |reply| Command::Presence {
            user: "u".into(),
            reply,
        });
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
        match taken(&mailboxes[0], reactors.budget()).as_slice() {
            [Command::Kick {
                reply: None,
                code: 4000,
                ..
            }] => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_kick_with_the_callers_reply_channel_is_counted_where_the_caller_waits() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let (tx, rx) = mpsc::channel();
        reactors.kick_replying(Target::User("u".into()), 4000, "bye", tx);
        // The user's home reactor gets the kick; the other one's answer (0) is given at once, so the caller
        // still expects one answer per reactor.
        let home = reactors.home("u");
        for (i, mailbox) in mailboxes.iter().enumerate() {
            match taken(mailbox, reactors.budget()).pop() {
                Some(Command::Kick {
                    reply: Some(reply), ..
                }) if i == home => reply.send(i + 2).unwrap(),
                None if i != home => {}
                other => panic!("{other:?}"),
            }
        }
        let answers = Answers::collect(&rx, 2, Instant::now() + Duration::from_secs(1));
        assert_eq!(answers.total(), Some(home + 2));
    }

    #[test]
    fn a_missed_notice_reaches_every_reactor_with_the_shared_counters() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let told = Arc::new(Told::default());
        reactors.missed(Missed::Everything, &told);
        for mailbox in &mailboxes {
            match taken(mailbox, reactors.budget()).as_slice() {
                [Command::Missed { scope, told: t }] => {
                    assert_eq!(**scope, Missed::Everything);
                    assert!(Arc::ptr_eq(t, &told));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_batch_is_one_command_per_reactor_sharing_the_messages() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let messages: Arc<[Arc<Message>]> = (0..3)
            .map(|i| Arc::new(Message::new(Target::Channel(i.to_string()), false, b"x")))
            .collect();
        reactors.publish_batch(messages.clone());
        for mailbox in &mailboxes {
            assert_eq!(mailbox.pending(), 3, "a batch weighs one per message");
            let mut commands = Vec::new();
            mailbox.take_all(&mut commands);
            match commands.as_slice() {
                [Command::PublishBatch { messages: m }] => {
                    assert!(Arc::ptr_eq(m, &messages))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn fullest_is_the_longest_mailbox() {
        let (reactors, mailboxes, _polls) = reactors(3);
        assert_eq!(reactors.fullest(), 0);
        for _ in 0..5 {
            mailboxes[1].send(Command::Shutdown {
                timeout: Duration::ZERO,
            });
        }
        mailboxes[2].send(Command::Shutdown {
            timeout: Duration::ZERO,
        });
        assert_eq!(reactors.fullest(), 5);
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
                let budget = Budget::new(usize::MAX);
                std::thread::spawn(move || loop {
                    for command in taken(&mailbox, &budget) {
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
        // Only the user's home reactor holds its connections, so only it is asked.
        let at = reactors.home("u");
        assert_eq!(
            reactors.subscribe(change, true),
            Some(Subscribed {
                changed: at + 1,
                at_limit: at
            })
        );
        drop(answerers);
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
        taken(&mailboxes[1], reactors.budget());
        assert!(!reactors.overloaded());
    }

    #[test]
    fn waiting_messages_are_charged_once_to_the_budget_and_bound_the_mailboxes_in_bytes() {
        let (reactors, mailboxes, _polls) = reactors(2);
        let budget = reactors.budget().clone();
        let payload = vec![b'x'; 1 << 20];
        let message = Arc::new(Message::new(Target::All, false, &payload));
        let charge = message.mailbox_charge();
        reactors.publish(message.clone());
        assert_eq!(budget.used(), charge, "two mailboxes, one charge");
        assert_eq!(mailboxes[0].pending_bytes(), charge);
        // Before this bound, 4,096 messages of 1 MiB (4 GiB, plus their envelopes) could wait; now publishes are
        // refused once one mailbox holds a quarter of the budget (256 MiB here), long before the count bound.
        let mut sent = 1;
        while !reactors.overloaded() {
            reactors.publish(Arc::new(Message::new(Target::All, false, &payload)));
            sent += 1;
        }
        assert!(sent < MAX_PENDING_COMMANDS / 8, "{sent} messages of 1 MiB");
        assert!(budget.used() >= budget.limit() / MAILBOX_BUDGET_SHARE);
        // One reactor delivers: the frames are still held by the other mailbox, still charged once.
        taken(&mailboxes[0], &budget);
        assert_eq!(budget.used(), sent * charge);
        assert!(reactors.overloaded(), "the other reactor is still behind");
        taken(&mailboxes[1], &budget);
        assert_eq!(budget.used(), 0);
        assert!(!reactors.overloaded());
    }
}
