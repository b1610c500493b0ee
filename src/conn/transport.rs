//! The seam between a connection's protocol machine and its socket.
//!
//! A [`Transport`] takes the machine's plaintext (handshake answers, frames) and puts it on the wire. Plain
//! TCP passes bytes through ([`Plain`]); a TLS transport seals them into records and may hold the unsent tail
//! of a record it has already sealed. The machine writes only through this trait and keeps what a transport
//! would not take as references to shared frames in its outbox, so a transport never copies a queued frame.
//! The reactor builds the transport for one call around the connection's socket; it is the only code that
//! reads from a socket.

use std::io::{self, IoSlice, Write};
use std::net::TcpStream;

/// Where a connection's bytes go. `write`/`write_vectored` follow `io::Write`: `Ok(n)` means `n` bytes of the
/// input were taken (they will reach the peer in order), `WouldBlock` means none were.
pub trait Transport: Write {
    /// True while the transport holds bytes it accepted but has not yet handed to the socket. The machine
    /// calls [`Transport::flush_held`] before anything else when the socket becomes writable.
    fn holds_unsent(&self) -> bool {
        false
    }

    /// Writes what the transport holds; `Ok(true)` when nothing is left.
    fn flush_held(&mut self) -> io::Result<bool> {
        Ok(true)
    }
}

/// Plain TCP: bytes go to the socket as they are.
#[derive(Debug)]
pub struct Plain<'a>(pub &'a TcpStream);

impl Write for Plain<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&mut &*self.0).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&mut &*self.0).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Plain<'_> {}

/// Writes `bytes` until all are taken or the writer would block; returns how many were taken. A write of
/// zero bytes is an error (`WriteZero`): the peer is gone.
pub fn write_some<W: Write + ?Sized>(transport: &mut W, bytes: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < bytes.len() {
        match transport.write(&bytes[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
pub mod testing {
    //! An in-memory transport for the machine's unit tests: a peer with a receive window.

    use super::Transport;
    use std::io::{self, IoSlice, Write};

    /// Accepts up to `window` bytes, then reports `WouldBlock` until the test opens the window again; can be
    /// made to fail like a reset socket.
    #[derive(Debug, Default)]
    pub struct MemWire {
        /// Everything written, in order.
        pub written: Vec<u8>,
        /// Bytes it still takes before blocking.
        pub window: usize,
        /// Every write fails (connection reset).
        pub broken: bool,
    }

    impl MemWire {
        /// A wire that takes everything.
        pub fn open() -> MemWire {
            MemWire {
                window: usize::MAX,
                ..MemWire::default()
            }
        }

        /// A wire that takes `window` bytes, then blocks.
        pub fn with_window(window: usize) -> MemWire {
            MemWire {
                window,
                ..MemWire::default()
            }
        }
    }

    impl Write for MemWire {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.broken {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            if self.window == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.window - n);
                self.written.extend_from_slice(&b[..take]);
                n += take;
                if n == self.window {
                    break;
                }
            }
            self.window -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Transport for MemWire {}
}
