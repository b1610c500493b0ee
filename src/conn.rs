//! One client connection: its record in the reactor's slab and its writes.
//!
//! It owns the socket, the connection's phase and flags, and the heap buffers it holds only while busy (a
//! partial request head, a partial inbound frame, unsent outbound bytes). It does not parse (see `handshake`
//! and `frame`), index (see `fanout`) or schedule (see `timer`); the reactor drives it. An idle open connection
//! is 24 bytes in the slab and owns no heap memory.

use crate::frame::Decoder;
use crate::outbox::{Flush, Outbox};
use bytes::Bytes;
use std::io::{self, Write};
use std::net::TcpStream;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP accepted, waiting for a complete upgrade request.
    Handshaking,
    /// Upgraded: receives pushes, answers pings.
    Open,
    /// We sent a close frame and wait for the client's (RFC 6455 §5.5.1); nothing but the close goes out.
    Closing,
    /// Write what is queued (a close frame or an HTTP error), then close the TCP connection; read nothing more.
    Flushing,
}

/// Flag: the current timer entry is the pong check, not the next ping.
pub const FLAG_PING_SENT: u8 = 1;
/// Flag: a frame arrived from the client since the last ping.
pub const FLAG_HEARD: u8 = 2;
/// Flag: upgraded at some point (counted in `connections_open` until closed).
pub const FLAG_UPGRADED: u8 = 4;
/// Flag: the client opted into envelopes (`?recover=1`, `since`, or the `densepush.v1` subprotocol), so it gets
/// each message wrapped with its stream, epoch and offset (`history::envelope`).
pub const FLAG_RECOVER: u8 = 8;

/// Heap state of a busy connection. Boxed so an idle connection pays one null pointer for all of it.
#[derive(Debug, Default)]
pub struct Spill {
    /// Bytes of an incomplete upgrade request.
    pub head: Vec<u8>,
    /// Inbound frame state between reads (only when mid-frame or mid-message).
    pub decoder: Decoder,
    /// Unsent outbound frames.
    pub outbox: Outbox,
    /// `[diagnostics] echo` only: the client's data message assembled so far, waiting for its last fragment.
    pub echo: Vec<u8>,
}

impl Spill {
    fn is_idle(&self) -> bool {
        self.head.is_empty()
            && self.decoder.is_idle()
            && self.outbox.is_empty()
            && self.echo.is_empty()
    }
}

/// What happened to a frame handed to [`Conn::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Written to the socket or queued behind earlier frames.
    Ok,
    /// Queuing it would exceed the outbox limit; nothing was queued.
    Overflow,
    /// The socket failed; the connection must be closed.
    Failed,
}

/// A connection record in the slab.
#[derive(Debug)]
pub struct Conn {
    /// The socket (non-blocking), registered edge-triggered for read and write once. A plain std stream: mio's
    /// wrapper carries a selector id in debug builds, and the record should be the same size in every build.
    pub stream: TcpStream,
    /// Generation carried in the mio token, so a stale event for a reused slab key is recognised.
    pub generation: u32,
    /// Stamp of the connection's one live timer entry.
    pub timer_stamp: u32,
    /// Where the connection is in its life.
    pub phase: Phase,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Heap buffers, only while busy.
    pub spill: Option<Box<Spill>>,
}

impl Conn {
    /// A freshly accepted connection.
    pub fn new(stream: TcpStream, generation: u32) -> Self {
        Conn {
            stream,
            generation,
            timer_stamp: 0,
            phase: Phase::Handshaking,
            flags: 0,
            spill: None,
        }
    }

    /// True if the flag is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Sets or clears a flag.
    pub fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// The spill, allocating it on first need. Returns whether it was allocated now (for the live-buffer gauge).
    pub fn spill_mut(&mut self) -> (&mut Spill, bool) {
        let fresh = self.spill.is_none();
        (self.spill.get_or_insert_with(Box::default), fresh)
    }

    /// Frees the spill when it holds nothing; returns true if it was freed now.
    pub fn release_spill_if_idle(&mut self) -> bool {
        if self.spill.as_ref().is_some_and(|s| s.is_idle()) {
            self.spill = None;
            return true;
        }
        false
    }

    /// Unsent bytes.
    pub fn queued_bytes(&self) -> usize {
        self.spill.as_ref().map_or(0, |s| s.outbox.queued_bytes())
    }

    /// Sends a frame: straight to the socket when nothing is queued (the common, allocation-free case), else
    /// behind the queue. `written` gets the bytes handed to the kernel; `allocated` is set if a spill was made.
    /// A frame that would take the queue over `max_queued` is refused, unless the queue is empty: one message
    /// is always accepted whole so a limit below the largest message cannot starve a healthy client.
    pub fn send(
        &mut self,
        frame: &Bytes,
        max_queued: usize,
        written: &mut u64,
        allocated: &mut bool,
    ) -> Sent {
        if self.queued_bytes() == 0 {
            let mut done = 0;
            while done < frame.len() {
                match self.stream.write(&frame[done..]) {
                    Ok(0) => return Sent::Failed,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return Sent::Failed,
                }
            }
            *written += done as u64;
            if done < frame.len() {
                let (spill, fresh) = self.spill_mut();
                spill.outbox.push_partial(frame.clone(), done);
                *allocated |= fresh;
            }
            return Sent::Ok;
        }
        let spill = self.spill.as_mut().expect("queued bytes imply a spill");
        if spill.outbox.queued_bytes() + frame.len() > max_queued {
            return Sent::Overflow;
        }
        spill.outbox.push(frame.clone());
        Sent::Ok
    }

    /// Queues a frame regardless of the limit (a close frame after a slow-consumer overflow), writing at once
    /// when nothing is queued.
    pub fn send_unbounded(
        &mut self,
        frame: &Bytes,
        written: &mut u64,
        allocated: &mut bool,
    ) -> Sent {
        self.send(frame, usize::MAX, written, allocated)
    }

    /// Writes queued bytes until drained or blocked. `written` gets the bytes handed to the kernel.
    pub fn flush(&mut self, written: &mut u64) -> io::Result<Flush> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(Flush::Drained);
        };
        let before = spill.outbox.queued_bytes();
        let result = spill.outbox.write_to(&mut self.stream);
        *written += (before - spill.outbox.queued_bytes()) as u64;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connection_record_is_small() {
        // The slab entry of an idle connection is the per-connection cost we promise to keep small.
        assert!(
            std::mem::size_of::<Conn>() <= 24,
            "Conn is {} bytes",
            std::mem::size_of::<Conn>()
        );
    }
}
