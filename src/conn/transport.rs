//! The seam between a connection's protocol machine and its socket.
//!
//! A [`Transport`] takes the machine's plaintext (handshake answers, frames) and puts it on the wire. Plain
//! TCP passes bytes through ([`Plain`]); a TLS transport seals them into records and may hold the unsent tail
//! of a record it has already sealed. The machine writes only through this trait and keeps what a transport
//! would not take as references to shared frames in its outbox, so a transport never copies a queued frame.
//! The reactor builds the transport for one call around the connection's socket; it is the only code that
//! reads from a socket.
//!
//! One more thing a transport can do: [`Transport::make_room`] grows the socket's kernel send buffer so the
//! last bytes of a closing connection (a started frame's tail, the close frame) fit at once. Bytes in the
//! kernel survive `close()`, so a close frame handed over this way reaches a client that reads again after the
//! server gave up on it, and the connection holds no buffer of its own while it waits.

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

    /// What the kernel says about the bytes it took from this connection, when it can say (see
    /// [`TcpProgress`]).
    fn progress(&self) -> Option<TcpProgress> {
        None
    }

    /// Grows the socket's send buffer so that `bytes` more of the machine's plaintext (plus whatever the
    /// transport holds and adds, such as TLS record overhead) fit in it now; false if it could not. Only for a
    /// closing connection's last bytes: the kernel memory it adds is the caller's bound to keep.
    fn make_room(&mut self, bytes: usize) -> bool {
        let _ = bytes;
        false
    }
}

/// What the kernel says about a connection's outbound bytes: whether the client is taking them. A ping queued
/// behind a backlog reaches the client only once it has read the backlog, so silence after it says the client
/// is behind, not that it is gone, as long as the backlog moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpProgress {
    /// Bytes the client's TCP acknowledged since the connection began (it acknowledges past its small
    /// receive window only as its application reads).
    pub acked: u64,
    /// The kernel still holds bytes for the client beyond a single segment (a lone ping): unsent, or sent
    /// and not acknowledged.
    pub holding: bool,
}

/// What a transport writes to: the socket, and growing its kernel send buffer.
pub trait Socket: Write {
    /// See [`Transport::make_room`]; `bytes` are bytes on the wire.
    fn make_room(&mut self, bytes: usize) -> bool {
        let _ = bytes;
        false
    }

    /// See [`Transport::progress`].
    fn progress(&self) -> Option<TcpProgress> {
        None
    }
}

impl Socket for &TcpStream {
    fn make_room(&mut self, bytes: usize) -> bool {
        grow_send_buffer(self, bytes)
    }

    fn progress(&self) -> Option<TcpProgress> {
        tcp_progress(self)
    }
}

/// `TCP_INFO` of `stream`, as [`TcpProgress`].
pub fn tcp_progress(stream: &TcpStream) -> Option<TcpProgress> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid descriptor, and a pointer to a tcp_info with its size, as getsockopt requires; the kernel
    // writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    Some(TcpProgress {
        acked: info.tcpi_bytes_acked,
        holding: info.tcpi_notsent_bytes > 0 || info.tcpi_unacked > 1,
    })
}

impl Socket for &mut Vec<u8> {}

/// Kernel bookkeeping per queued segment that a send buffer must leave room for beyond the bytes themselves
/// (an `sk_buff` and its shared info are under 1 KiB; two of them, as a write may start a new segment).
const SEGMENT_SLACK: usize = 2 << 10;

/// Grows `stream`'s kernel send buffer (`SO_SNDBUF`) by enough for `bytes` more bytes to be written now; false
/// if the kernel would not: it caps the size it is given at `net.core.wmem_max`, and a socket whose buffer
/// autotuning already grew past that is left alone rather than shrunk. Setting the size turns the kernel's
/// send-buffer autotuning off for this socket, which only matters for a connection that is closing.
pub fn grow_send_buffer(stream: &TcpStream, bytes: usize) -> bool {
    let socket = socket2::SockRef::from(stream);
    let Ok(now) = socket.send_buffer_size() else {
        return false;
    };
    // Linux reports (and enforces) twice the size it is given, to leave room for its bookkeeping; the socket
    // is full, so what it holds is about `now`.
    let want = now + 2 * bytes + SEGMENT_SLACK;
    if wmem_max().is_some_and(|max| want / 2 > max) {
        return false;
    }
    if socket.set_send_buffer_size(want / 2).is_err() {
        return false;
    }
    socket
        .send_buffer_size()
        .is_ok_and(|got| got >= now + bytes + SEGMENT_SLACK / 2)
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

impl Transport for Plain<'_> {
    fn make_room(&mut self, bytes: usize) -> bool {
        grow_send_buffer(self.0, bytes)
    }

    fn progress(&self) -> Option<TcpProgress> {
        tcp_progress(self.0)
    }
}

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

/// `net.core.wmem_max`, read once: the largest `SO_SNDBUF` an unprivileged process may set.
fn wmem_max() -> Option<usize> {
    static WMEM_MAX: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *WMEM_MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
pub mod testing {
    //! An in-memory transport for the machine's unit tests: a peer with a receive window.

    use super::{Socket, TcpProgress, Transport};
    use std::io::{self, IoSlice, Write};

    /// Accepts up to `window` bytes, then reports `WouldBlock` until the test opens the window again; can be
    /// made to fail like a reset socket, and can grow its window by up to `room` bytes when asked to make room
    /// (a kernel send buffer that may grow by that much).
    #[derive(Debug, Default)]
    pub struct MemWire {
        /// Everything written, in order.
        pub written: Vec<u8>,
        /// Bytes it still takes before blocking.
        pub window: usize,
        /// Every write fails (connection reset).
        pub broken: bool,
        /// Bytes [`Transport::make_room`] may still add to the window.
        pub room: usize,
        /// Bytes it was asked to make room for, over all calls.
        pub room_asked: usize,
        /// What it reports as the kernel's view of the client (`None`: unknown, as for a transport that
        /// cannot tell).
        pub tcp: Option<TcpProgress>,
    }

    impl MemWire {
        fn grow(&mut self, bytes: usize) -> bool {
            self.room_asked += bytes;
            if bytes > self.room {
                return false;
            }
            self.room -= bytes;
            self.window = self.window.saturating_add(bytes);
            true
        }
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

    impl Transport for MemWire {
        fn make_room(&mut self, bytes: usize) -> bool {
            self.grow(bytes)
        }

        fn progress(&self) -> Option<TcpProgress> {
            self.tcp
        }
    }

    impl Socket for &mut MemWire {
        fn make_room(&mut self, bytes: usize) -> bool {
            self.grow(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_full_socket_takes_a_close_frame_once_its_send_buffer_grew() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // A client that never reads, with a small window.
        let client =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        client.set_recv_buffer_size(4096).unwrap();
        client
            .connect(&listener.local_addr().unwrap().into())
            .unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let chunk = vec![b'x'; 4096];
        let mut plain = Plain(&server);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // Fill it: the kernel keeps taking while it sends into the client's window; stop once it has blocked
        // for a while.
        let mut blocked_since = None;
        while std::time::Instant::now() < deadline {
            match write_some(&mut plain, &chunk).unwrap() {
                0 => {
                    let since = *blocked_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > std::time::Duration::from_millis(200) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                _ => blocked_since = None,
            }
        }
        assert_eq!(
            write_some(&mut plain, b"close").unwrap(),
            0,
            "the socket is full"
        );
        let last = vec![b'c'; 4200];
        assert!(plain.make_room(last.len()));
        assert_eq!(write_some(&mut plain, &last).unwrap(), last.len());
    }
}
