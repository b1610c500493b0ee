//! The successor's side of a live upgrade: say hello through the inherited channel, then receive the history,
//! each reactor's listeners and connections, and the admin listener and connections, handing each batch to the
//! part that adopts it; commit, and start serving only on the predecessor's go.

use super::channel::Channel;
use super::give::Outcome;
use super::protocol::{self, kind, Accept, BusHandover, Facts, Hello};
use crate::config::Config;
use crate::history::{self, History};
use crate::snapshot::{Reader, SnapshotError};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the successor waits for each message of the predecessor.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the successor cannot take over; it exits and the predecessor keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// The predecessor refused this successor (a setting that cannot change, another protocol version).
    #[error("the running server refused the upgrade: {0}")]
    Refused(String),
    /// The predecessor gave up.
    #[error("the running server aborted the upgrade: {0}")]
    Aborted(String),
    /// The channel failed.
    #[error("handoff channel: {0}")]
    Io(#[from] std::io::Error),
    /// A message was malformed or out of order.
    #[error("handoff protocol: {0}")]
    Protocol(String),
}

impl From<SnapshotError> for TakeError {
    fn from(e: SnapshotError) -> Self {
        TakeError::Protocol(e.to_string())
    }
}

/// The successor's end of a handoff in progress.
pub struct Taker {
    chan: Channel,
    accept: Accept,
    started: Instant,
    moved: u64,
    bus: Option<BusHandover>,
}

impl Taker {
    /// Opens the channel the predecessor passed as `fd` and introduces this process.
    pub fn hello(fd: RawFd, config: &Config) -> Result<Taker, TakeError> {
        let mut chan = Channel::from_inherited(fd)?;
        chan.set_timeout(Some(STEP_TIMEOUT))?;
        let hello = Hello {
            version: protocol::VERSION,
            pid: std::process::id(),
            facts: Facts::of(config),
        };
        chan.send(kind::HELLO, &hello.encode(), &[])?;
        let (k, payload, _) = chan.recv()?;
        let accept = match k {
            kind::ACCEPT => Accept::decode(&payload)?,
            kind::REFUSE => return Err(TakeError::Refused(text(&payload))),
            other => return Err(unexpected("accept", other)),
        };
        Ok(Taker {
            chan,
            accept,
            started: Instant::now(),
            moved: 0,
            bus: None,
        })
    }

    /// The predecessor's upgrade counters, which this process carries on.
    pub fn accept(&self) -> Accept {
        self.accept
    }

    /// The predecessor's history, under this process's settings, and the last stored sequence every reactor
    /// of the predecessor applied.
    pub fn history(
        &mut self,
        settings: history::Settings,
    ) -> Result<(Arc<History>, u64), TakeError> {
        let payload = self.expect(kind::HISTORY, "history")?.0;
        let mut r = Reader::new(&payload);
        let (history, stored) = History::restore(settings, &mut r)?;
        let applied = r.u64("applied sequence")?;
        self.bus = BusHandover::read(&mut r)?;
        Ok((history, applied.max(stored)))
    }

    /// The predecessor's node id and bus position, read with the history (`None`: it had no cluster).
    pub fn bus(&self) -> Option<&BusHandover> {
        self.bus.as_ref()
    }

    /// The next listeners: a reactor's ws:// and wss:// ones (`kind::LISTENERS`), or the admin one
    /// (`kind::ADMIN`). Absent ones are `None`.
    pub fn listeners(
        &mut self,
        which: u8,
    ) -> Result<Vec<Option<std::net::TcpListener>>, TakeError> {
        let (payload, fds) = self.expect(which, "listeners")?;
        let mut r = Reader::new(&payload);
        let slots = r.u32("listener count")?;
        let mut fds = fds.into_iter();
        let mut out = Vec::new();
        for _ in 0..slots {
            out.push(match r.bool("listener present")? {
                true => {
                    let fd = fds
                        .next()
                        .ok_or(SnapshotError::Invalid("listener descriptor"))?;
                    let listener = std::net::TcpListener::from(fd);
                    listener.set_nonblocking(true)?;
                    Some(listener)
                }
                false => None,
            });
        }
        Ok(out)
    }

    /// Batches of `batch` kind until `done`, each handed to `adopt`; returns the connections adopted.
    pub fn batches(
        &mut self,
        batch: u8,
        done: u8,
        mut adopt: impl FnMut(&[u8], Vec<OwnedFd>) -> Result<usize, SnapshotError>,
    ) -> Result<u64, TakeError> {
        let mut adopted = 0u64;
        loop {
            let (k, payload, fds) = self.recv()?;
            if k == batch {
                adopted += adopt(&payload, fds)? as u64;
            } else if k == done {
                let (moved, _) = protocol::decode_counts(&payload)?;
                if moved != adopted {
                    return Err(TakeError::Protocol(format!(
                        "{moved} connections announced, {adopted} received"
                    )));
                }
                if done == kind::REACTOR_DONE {
                    self.moved += moved;
                }
                return Ok(adopted);
            } else {
                return Err(unexpected("a batch", k));
            }
        }
    }

    /// Everything is registered: tell systemd this is the main process now, commit, and wait for the go. Only
    /// then may this process read or write a socket it was given.
    pub fn commit(mut self) -> Result<Outcome, TakeError> {
        crate::systemd::notify_main_pid(std::process::id());
        self.chan.send(kind::COMMITTED, &[], &[])?;
        self.expect(kind::GO, "go")?;
        Ok(Outcome::Completed {
            from_pid: self.accept.pid,
            moved: self.moved,
            pause_ms: self.started.elapsed().as_millis() as u64,
            total_ms: super::give::now_ms().saturating_sub(self.accept.started_ms),
            started_ms: self.accept.started_ms,
        })
    }

    /// Gives up: the predecessor rolls back.
    pub fn abort(mut self, reason: &str) {
        let _ = self.chan.send(kind::ABORT, reason.as_bytes(), &[]);
    }

    fn recv(&mut self) -> Result<(u8, Vec<u8>, Vec<OwnedFd>), TakeError> {
        let (k, payload, fds) = self.chan.recv()?;
        if k == kind::ABORT {
            return Err(TakeError::Aborted(text(&payload)));
        }
        Ok((k, payload, fds))
    }

    fn expect(&mut self, k: u8, what: &str) -> Result<(Vec<u8>, Vec<OwnedFd>), TakeError> {
        let (got, payload, fds) = self.recv()?;
        if got != k {
            return Err(unexpected(what, got));
        }
        Ok((payload, fds))
    }
}

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

fn unexpected(what: &str, got: u8) -> TakeError {
    TakeError::Protocol(format!("expected {what}, got message {got}"))
}
