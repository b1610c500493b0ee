//! The channel between a server and the successor it hands over to: a Unix stream socket carrying
//! length-prefixed messages, each with up to [`MAX_FDS`] file descriptors passed by `SCM_RIGHTS`.
//!
//! It owns framing and descriptor passing only; what the messages say is `protocol`'s. A message is a 7-byte
//! header (payload length `u32`, kind `u8`, descriptor count `u16`) sent with the descriptors attached in one
//! `sendmsg`, then the payload. Descriptors received are owned (`OwnedFd`) and close themselves if unused, so a
//! failed handoff leaks none.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Descriptors one message may carry: the kernel's `SCM_MAX_FD` is 253.
pub const MAX_FDS: usize = 250;
/// Largest payload accepted: a batch of connection records and the frames they queue is far below it.
pub const MAX_PAYLOAD: usize = 256 << 20;

const HEADER: usize = 7;

/// One end of the handoff channel.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
}

impl Channel {
    /// A connected pair: this process's end (close-on-exec), and the end to give the successor, which must
    /// survive `exec` (its close-on-exec flag is cleared).
    pub fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (ours, theirs) = UnixStream::pair()?;
        let theirs = OwnedFd::from(theirs);
        // SAFETY: fcntl on a descriptor we own, with a plain integer argument.
        let rc = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((Channel { sock: ours }, theirs))
    }

    /// The successor's end, from the descriptor number its predecessor gave it.
    pub fn from_inherited(fd: RawFd) -> io::Result<Channel> {
        // SAFETY: the predecessor passed this descriptor for exactly this purpose; it is ours from now on.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        // Ours from here on: close it on our own exec (we are the next predecessor).
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        sock.set_nonblocking(false)?;
        Ok(Channel { sock })
    }

    /// Waits at most `timeout` for each read (`None`: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(timeout)?;
        self.sock.set_write_timeout(timeout)
    }

    /// Sends one message with `fds` attached (at most [`MAX_FDS`]; they stay open here).
    pub fn send(&mut self, kind: u8, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        if fds.len() > MAX_FDS || payload.len() > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "message too large",
            ));
        }
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[4] = kind;
        header[5..].copy_from_slice(&(fds.len() as u16).to_le_bytes());
        self.send_with_fds(&header, fds)?;
        self.sock.write_all(payload)
    }

    /// Receives one message: its kind, payload and descriptors.
    pub fn recv(&mut self) -> io::Result<(u8, Vec<u8>, Vec<OwnedFd>)> {
        let mut header = [0u8; HEADER];
        let mut fds = Vec::new();
        let mut got = 0;
        while got < HEADER {
            let n = self.recv_with_fds(&mut header[got..], &mut fds)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let count = u16::from_le_bytes(header[5..].try_into().expect("2 bytes")) as usize;
        if len > MAX_PAYLOAD || count != fds.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "bad message header: {len} bytes, {count} descriptors announced, {} received",
                    fds.len()
                ),
            ));
        }
        let mut payload = vec![0u8; len];
        self.sock.read_exact(&mut payload)?;
        Ok((header[4], payload, fds))
    }

    fn send_with_fds(&mut self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let space = cmsg_space(fds.len());
        let mut control = vec![0u8; space];
        let mut sent = 0;
        while sent < bytes.len() {
            let mut iov = libc::iovec {
                iov_base: bytes[sent..].as_ptr() as *mut libc::c_void,
                iov_len: bytes.len() - sent,
            };
            // SAFETY: msghdr is plain data; every pointer set below points into buffers that outlive the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            // The descriptors go with the first bytes only.
            if sent == 0 && !fds.is_empty() {
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                // SAFETY: the control buffer is CMSG_SPACE(n fds) bytes, so the first header and its data fit.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(&msg);
                    (*cmsg).cmsg_level = libc::SOL_SOCKET;
                    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
                    std::ptr::copy_nonoverlapping(
                        fds.as_ptr(),
                        libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                        fds.len(),
                    );
                }
            }
            // SAFETY: msg points at valid buffers (above); MSG_NOSIGNAL keeps a closed peer from raising SIGPIPE.
            let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            sent += n as usize;
        }
        Ok(())
    }

    fn recv_with_fds(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        let space = cmsg_space(MAX_FDS + 3);
        let mut control = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; its pointers point into buffers that outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = loop {
            // SAFETY: as above; MSG_CMSG_CLOEXEC marks received descriptors close-on-exec at once.
            let n =
                unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data_len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let count = data_len / std::mem::size_of::<RawFd>();
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many descriptors in one message",
            ));
        }
        Ok(n)
    }
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn messages_carry_their_payload_and_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = Channel { sock: a };
        let mut rx = Channel { sock: b };
        // Descriptors that mean something on the other side: one end of a pipe each.
        let pipes: Vec<(std::io::PipeReader, std::io::PipeWriter)> =
            (0..MAX_FDS).map(|_| std::io::pipe().unwrap()).collect();
        let fds: Vec<RawFd> = pipes.iter().map(|(_, w)| w.as_raw_fd()).collect();
        let payload = vec![7u8; 100_000];
        let sender = std::thread::spawn(move || {
            tx.send(3, &payload, &fds).unwrap();
            tx.send(4, b"no fds", &[]).unwrap();
            (tx, pipes)
        });
        let (kind, got, received) = rx.recv().unwrap();
        assert_eq!((kind, got.len(), received.len()), (3, 100_000, MAX_FDS));
        let (kind, got, none) = rx.recv().unwrap();
        assert_eq!((kind, &got[..], none.len()), (4, &b"no fds"[..], 0));
        let (_tx, mut pipes) = sender.join().unwrap();
        // A received descriptor is the same pipe end: writing through it reaches the original reader.
        let mut writer = std::fs::File::from(received.into_iter().nth(9).unwrap());
        writer.write_all(b"through the passed descriptor").unwrap();
        drop(writer);
        let (reader, _) = &mut pipes[9];
        let mut buf = [0u8; 29];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"through the passed descriptor");
    }

    #[test]
    fn a_peer_that_goes_away_is_an_error_not_a_hang() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let mut rx = Channel { sock: b };
        assert_eq!(rx.recv().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
