//! One client connection: its record in the reactor's slab and its writes.
//!
//! It owns the socket, the connection's phase and flags, and the heap buffers it holds only while busy (a
//! partial request head, a partial inbound frame, unsent outbound bytes). It does not parse (see `handshake`
//! and `frame`), index (see `fanout`) or schedule (see `timer`); the reactor drives it. An idle open connection
//! is 24 bytes in the slab and owns no heap memory.

use crate::budget::Budget;
use crate::outbox::{Flush, Outbox};
use crate::proto::frame::Decoder;
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
    /// Bytes this spill holds against the server-wide buffer budget; given back when it is freed.
    pub charged: usize,
    /// `[diagnostics] echo` only: the client's data message assembled so far, waiting for its last fragment.
    pub echo: Vec<u8>,
}

/// What a spill costs before it holds any bytes: the box itself (with the fixed-size frame decoder).
pub const SPILL_BYTES: usize = std::mem::size_of::<Spill>();

impl Spill {
    fn is_idle(&self) -> bool {
        self.head.is_empty()
            && self.decoder.is_idle()
            && self.outbox.is_empty()
            && self.echo.is_empty()
    }

    /// Heap bytes this spill holds: the box, the head's allocation and the queued frames. Queued frames are
    /// counted whole per connection even when shared (`Bytes`): what bounds memory per slow reader is how much
    /// each one keeps alive, and a shared frame outlives the publish only through such queues.
    fn footprint(&self) -> usize {
        SPILL_BYTES + self.head.capacity() + self.outbox.footprint()
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

    /// Frees the spill when it holds nothing, giving its charge back; returns true if it was freed now.
    pub fn release_spill_if_idle(&mut self, budget: &Budget) -> bool {
        if self.spill.as_ref().is_some_and(|s| s.is_idle()) {
            return self.drop_spill(budget);
        }
        false
    }

    /// Reserves `extra` bytes of the budget for a buffer this connection is about to grow, plus the spill
    /// itself if it has none yet, and allocates the spill. `None` when the budget is exhausted (nothing was
    /// reserved or allocated); otherwise whether the spill was allocated now (for the live-buffer gauge).
    /// Call [`Conn::settle`] once the buffer has grown.
    pub fn try_grow(&mut self, budget: &Budget, extra: usize) -> Option<bool> {
        let need = extra + if self.spill.is_none() { SPILL_BYTES } else { 0 };
        if !budget.try_reserve(need) {
            return None;
        }
        let (spill, fresh) = self.spill_mut();
        spill.charged += need;
        Some(fresh)
    }

    /// Brings the spill's charge in line with what it really holds: gives back what was freed, and charges
    /// (forcibly: the bytes are already held) what a growth cost beyond its reservation.
    pub fn settle(&mut self, budget: &Budget) {
        let Some(spill) = self.spill.as_mut() else {
            return;
        };
        let actual = spill.footprint();
        if actual > spill.charged {
            budget.force_reserve(actual - spill.charged);
        } else {
            budget.release(spill.charged - actual);
        }
        spill.charged = actual;
    }

    /// Frees the spill whatever it holds (the connection is going away) and gives its charge back.
    pub fn drop_spill(&mut self, budget: &Budget) -> bool {
        match self.spill.take() {
            Some(spill) => {
                budget.release(spill.charged);
                true
            }
            None => false,
        }
    }

    /// Unsent bytes.
    pub fn queued_bytes(&self) -> usize {
        self.spill.as_ref().map_or(0, |s| s.outbox.queued_bytes())
    }

    /// Sends a frame: straight to the socket when nothing is queued (the common, allocation-free case), else
    /// behind the queue. `written` gets the bytes handed to the kernel; `allocated` is set if a spill was made.
    /// A frame that would take the queue over `max_queued`, or the server over its buffer budget, is refused,
    /// unless the queue is empty: one message is always accepted whole so a limit below the largest message
    /// cannot starve a healthy client. The unwritten tail of a partly written frame must be kept for the byte
    /// stream to stay well-formed, so it is queued even when the budget is exhausted, and `Overflow` then says
    /// the connection must go as a slow consumer.
    pub fn send(
        &mut self,
        frame: &Bytes,
        max_queued: usize,
        budget: &Budget,
        written: &mut u64,
        allocated: &mut bool,
    ) -> Sent {
        self.send_inner(frame, Some(max_queued), budget, written, allocated)
    }

    /// Queues a frame regardless of the limit and the budget (a close frame after a slow-consumer overflow, at
    /// most 127 bytes), writing at once when nothing is queued.
    pub fn send_unbounded(
        &mut self,
        frame: &Bytes,
        budget: &Budget,
        written: &mut u64,
        allocated: &mut bool,
    ) -> Sent {
        self.send_inner(frame, None, budget, written, allocated)
    }

    fn send_inner(
        &mut self,
        frame: &Bytes,
        max_queued: Option<usize>,
        budget: &Budget,
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
            if done == frame.len() {
                return Sent::Ok;
            }
            let tail = frame.len() - done;
            let within_budget = max_queued.is_none()
                || budget.try_reserve(tail + if self.spill.is_none() { SPILL_BYTES } else { 0 });
            let (spill, fresh) = self.spill_mut();
            if within_budget {
                spill.charged += tail + if fresh { SPILL_BYTES } else { 0 };
            }
            spill.outbox.push_partial(frame.clone(), done);
            *allocated |= fresh;
            // An unreserved tail is charged here, by force.
            self.settle(budget);
            return if within_budget {
                Sent::Ok
            } else {
                Sent::Overflow
            };
        }
        let spill = self.spill.as_mut().expect("queued bytes imply a spill");
        if let Some(max) = max_queued {
            if spill.outbox.queued_bytes() + frame.len() > max || !budget.try_reserve(frame.len()) {
                return Sent::Overflow;
            }
            spill.charged += frame.len();
        }
        spill.outbox.push(frame.clone());
        self.settle(budget);
        Sent::Ok
    }

    /// Writes queued bytes until drained or blocked. `written` gets the bytes handed to the kernel.
    /// Written bytes are given back to `budget`.
    pub fn flush(&mut self, budget: &Budget, written: &mut u64) -> io::Result<Flush> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(Flush::Drained);
        };
        let before = spill.outbox.queued_bytes();
        let result = spill.outbox.write_to(&mut self.stream);
        *written += (before - spill.outbox.queued_bytes()) as u64;
        self.settle(budget);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::TcpListener;

    /// A connection whose peer never reads, and the peer (kept so the socket stays open).
    fn stuck_conn() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (Conn::new(server, 1), client)
    }

    /// A frame far larger than any socket buffer, so writing it always leaves a tail.
    fn huge_frame() -> Bytes {
        Bytes::from(vec![0u8; 32 << 20])
    }

    #[test]
    fn queued_tail_is_charged_to_the_budget_and_given_back_when_the_spill_is_dropped() {
        let budget = Budget::new(usize::MAX);
        let (mut conn, _peer) = stuck_conn();
        let (mut written, mut allocated) = (0, false);
        let sent = conn.send(
            &huge_frame(),
            1 << 30,
            &budget,
            &mut written,
            &mut allocated,
        );
        assert_eq!(sent, Sent::Ok);
        assert!(allocated);
        let queued = conn.queued_bytes();
        assert!(queued > 0);
        assert!(
            budget.used() >= queued + SPILL_BYTES,
            "{} < {queued}",
            budget.used()
        );
        assert_eq!(budget.used(), conn.spill.as_ref().unwrap().charged);
        assert!(conn.drop_spill(&budget));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn frame_behind_a_queue_is_refused_when_the_budget_is_exhausted_and_nothing_is_charged() {
        let budget = Budget::new(usize::MAX);
        let (mut conn, _peer) = stuck_conn();
        let (mut written, mut allocated) = (0, false);
        conn.send(
            &huge_frame(),
            1 << 30,
            &budget,
            &mut written,
            &mut allocated,
        );
        let used = budget.used();
        let tight = Budget::new(used + 10);
        tight.force_reserve(used);
        let sent = conn.send(
            &Bytes::from_static(&[1u8; 100]),
            1 << 30,
            &tight,
            &mut written,
            &mut allocated,
        );
        assert_eq!(sent, Sent::Overflow);
        assert_eq!(tight.used(), used);
    }

    #[test]
    fn tail_over_an_exhausted_budget_is_kept_but_reported_as_overflow() {
        let budget = Budget::new(64 << 10);
        let (mut conn, _peer) = stuck_conn();
        let (mut written, mut allocated) = (0, false);
        let sent = conn.send(
            &huge_frame(),
            1 << 30,
            &budget,
            &mut written,
            &mut allocated,
        );
        assert_eq!(sent, Sent::Overflow, "the tail did not fit the budget");
        // The tail stays queued (the stream must stay well-formed) and is charged by force.
        assert!(conn.queued_bytes() > 0);
        assert_eq!(budget.used(), conn.spill.as_ref().unwrap().charged);
        assert!(conn.drop_spill(&budget));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn try_grow_reserves_the_spill_and_the_bytes_or_nothing() {
        let budget = Budget::new(SPILL_BYTES + 100);
        let (mut conn, _peer) = stuck_conn();
        assert_eq!(conn.try_grow(&budget, 200), None);
        assert!(conn.spill.is_none());
        assert_eq!(budget.used(), 0);
        assert_eq!(conn.try_grow(&budget, 100), Some(true));
        assert_eq!(budget.used(), SPILL_BYTES + 100);
        // Nothing was buffered after all: settling gives the unused reservation back.
        conn.settle(&budget);
        assert_eq!(budget.used(), SPILL_BYTES);
        assert!(conn.release_spill_if_idle(&budget));
        assert_eq!(budget.used(), 0);
    }

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
