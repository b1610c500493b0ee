//! The accept loop shared by the reactors' client listeners and the admin listener.
//!
//! It owns one rule set: accept until the listener would block, retry `Interrupted`, skip a connection that
//! died in the backlog (`ECONNABORTED` and the like), and pause on descriptor or memory exhaustion (EMFILE,
//! ENFILE, ENOBUFS, ENOMEM) instead of spinning. A paused listener is retried by its owner on a timer: with
//! edge-triggered readiness no new event comes for connections already waiting in the kernel's backlog, and
//! they stay there until descriptors free up. It does not decide what to do with an accepted socket.

use mio::net::{TcpListener, TcpStream};
use std::io;

/// Accept state of one listener.
#[derive(Debug, Default)]
pub struct Acceptor {
    paused: bool,
}

impl Acceptor {
    /// True after exhaustion stopped the last accept loop: the owner should call [`Acceptor::accept_all`] again
    /// on its next timer tick.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Accepts every waiting connection and hands each to `admit`. On exhaustion it logs once per pause (naming
    /// `what`), calls `exhausted` (for a counter), and stops.
    pub fn accept_all(
        &mut self,
        listener: &TcpListener,
        what: &str,
        mut admit: impl FnMut(TcpStream),
        mut exhausted: impl FnMut(),
    ) {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    self.paused = false;
                    admit(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_resource_exhaustion(&e) => {
                    if !self.paused {
                        log::warn!("{what}: accept failed ({e}); pausing accepts until descriptors free up");
                    }
                    exhausted();
                    self.paused = true;
                    return;
                }
                // The peer went away between SYN and accept (ECONNABORTED) and the like: next one.
                Err(_) => continue,
            }
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_everything_waiting_then_stops_at_would_block() {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = TcpListener::from_std(std_listener);
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut acceptor = Acceptor::default();
        let mut accepted = 0;
        // Connections complete asynchronously on loopback; give the backlog a moment.
        for _ in 0..100 {
            acceptor.accept_all(
                &listener,
                "test",
                |_| accepted += 1,
                || panic!("not exhausted"),
            );
            if accepted == clients.len() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(accepted, 3);
        assert!(!acceptor.is_paused());
    }

    #[test]
    fn exhaustion_is_recognised_by_errno() {
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_resource_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
