//! The live upgrade: a running server hands its listeners, its connections and their state, its history and
//! its admin connections to a successor process started from the binary at the server's path, and exits;
//! clients see nothing. The successor is the same program, so both ends of the protocol live here.
//!
//! - `channel`: the Unix socket between the two processes (length-prefixed messages, descriptors by
//!   `SCM_RIGHTS`);
//! - `protocol`: the messages, their order, the version, and the compatibility check (settings that cannot
//!   change across a handoff);
//! - `give`: the predecessor's side (spawn, freeze, stream, commit or roll back);
//! - `take`: the successor's side (adopt everything before serving).
//!
//! Each part of the server writes and reads its own state (`snapshot`); this module moves it. It does not
//! decide what a connection's state is (`conn`, `tls`, `fanout`, `history`, `admin`).
//!
//! Order of a freeze in the predecessor, so that nothing accepted is lost: the admin listener stops answering
//! first (every 202 already given is in a mailbox), then every reactor stops accepting (new clients wait in the
//! kernel's backlog, which moves with the listener), lets TLS handshakes in flight finish for a moment, applies
//! its whole mailbox, and reports ready; the history is then written (nothing more can be stored), and each
//! reactor streams its connections. If anything fails before the successor commits, every part resumes where
//! it stopped: the predecessor still holds every descriptor and every byte of state.

pub mod channel;
pub mod give;
pub mod protocol;
pub mod take;

use std::os::fd::RawFd;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Duration;

/// How long a reactor lets TLS handshakes in flight finish before it freezes anyway (those that have not
/// finished stay with the predecessor and are closed when it exits; their clients reconnect).
pub const TLS_HANDSHAKE_GRACE: Duration = Duration::from_millis(250);

/// What one reactor (or the admin thread) is given to take part in a freeze.
#[derive(Debug)]
pub struct Freeze {
    /// Where it sends its parts, in order: [`Part::Ready`], then (after [`Order::Export`]) its listeners, its
    /// batches, and [`Part::Done`]. Bounded, so a reactor with a million connections streams them.
    pub parts: SyncSender<Part>,
    /// What to do next: export after `Ready`; resume (rolled back) at any point. If the sender goes away
    /// without an order, the part resumes.
    pub orders: Receiver<Order>,
}

/// A piece of a frozen reactor or admin thread, for the successor.
#[derive(Debug)]
pub enum Part {
    /// The mailbox is applied (reactors) or no request will be answered any more (admin): the history can be
    /// written. Carries the last stored sequence the reactor applied.
    Ready {
        /// The reactor's applied sequence (0 for the admin thread).
        applied_seq: u64,
    },
    /// Listening sockets: ws:// and wss:// for a reactor, the admin listener for the admin thread.
    Listeners(Vec<Option<RawFd>>),
    /// A batch of at most `channel::MAX_FDS` connections: their records (`protocol`) and sockets, in order.
    Batch {
        /// The encoded records.
        payload: Vec<u8>,
        /// Their sockets, one per record, in order.
        fds: Vec<RawFd>,
    },
    /// Everything was sent.
    Done {
        /// Connections sent.
        moved: u64,
        /// Connections that could not move (TLS handshakes still running).
        stayed: u64,
    },
}

/// The predecessor's instruction to a frozen part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Stream the listeners and connections now.
    Export,
    /// The upgrade is off: carry on serving.
    Resume,
}
