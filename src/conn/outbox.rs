//! A connection's queue of unsent outbound bytes.
//!
//! It owns references to shared, already-framed buffers (`Bytes`: a published frame is encoded once and every
//! queue holds the same allocation) and how far the head has been written. It does not decide when to write or
//! enforce limits; the connection does. Writing is generic over `io::Write`, so a socket and a test buffer take
//! the same path, and it gathers up to [`MAX_IOV`] segments into one `writev`.

use bytes::{Buf, Bytes};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

/// Segments gathered into one vectored write (Linux's IOV_MAX is 1024; 64 keeps the stack array small and
/// already fills a socket buffer with small frames).
pub const MAX_IOV: usize = 64;

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Everything was written.
    Drained,
    /// The writer would block; bytes remain queued.
    Blocked,
}

/// Queue of frames waiting for the socket.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Bytes>,
    bytes: usize,
    /// The head segment has been partly written, so it must be finished before any other frame may follow.
    head_started: bool,
}

impl Outbox {
    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Unsent bytes queued.
    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    /// Heap bytes the queue keeps alive: the queued frames (counted whole, as if not shared) and the
    /// queue's own slots.
    pub fn footprint(&self) -> usize {
        self.bytes + self.queue.capacity() * std::mem::size_of::<Bytes>()
    }

    /// The queued frames, oldest first (the head possibly partly written already: it is the unwritten tail),
    /// and whether the head has started going out.
    pub fn queued(&self) -> (impl Iterator<Item = &Bytes>, bool) {
        (self.queue.iter(), self.head_started)
    }

    /// A queue holding `frames` (as [`Outbox::queued`] gave them), for a connection moved from another process.
    pub fn from_queued(frames: Vec<Bytes>, head_started: bool) -> Outbox {
        let mut outbox = Outbox::default();
        for frame in frames {
            outbox.push(frame);
        }
        outbox.head_started = head_started && !outbox.queue.is_empty();
        outbox
    }

    /// Queues `frame` behind what is already queued. Empty frames are ignored.
    pub fn push(&mut self, frame: Bytes) {
        if frame.is_empty() {
            return;
        }
        self.bytes += frame.len();
        self.queue.push_back(frame);
    }

    /// Queues the unwritten tail of a frame whose first `written` bytes already went to the socket.
    pub fn push_partial(&mut self, mut frame: Bytes, written: usize) {
        debug_assert!(
            self.queue.is_empty(),
            "a partial write only happens with an empty queue"
        );
        frame.advance(written);
        self.head_started = written > 0 && !frame.is_empty();
        self.push(frame);
    }

    /// Drops every queued frame that has not started going out, keeping a partly written head so the byte
    /// stream stays well-formed for whatever is written after it (a close frame).
    pub fn drop_unstarted(&mut self) {
        let keep = usize::from(self.head_started);
        while self.queue.len() > keep {
            let dropped = self.queue.pop_back().expect("len checked");
            self.bytes -= dropped.len();
        }
    }

    /// Writes queued bytes until the queue drains or the writer would block. `Interrupted` is retried; any
    /// other error is returned with the queue left as it was after the last successful write.
    pub fn write_to<W: Write + ?Sized>(&mut self, writer: &mut W) -> io::Result<Flush> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let count = self.queue.len().min(MAX_IOV);
            for (slot, frame) in slices.iter_mut().zip(self.queue.iter()) {
                *slot = IoSlice::new(frame);
            }
            match writer.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) => return Err(e),
            }
        }
        Ok(Flush::Drained)
    }

    fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.bytes);
        self.bytes -= n;
        while n > 0 {
            let head = self.queue.front_mut().expect("wrote more than queued");
            if n < head.len() {
                head.advance(n);
                self.head_started = true;
                return;
            }
            n -= head.len();
            self.queue.pop_front();
            self.head_started = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most `budget` bytes, then reports WouldBlock, recording every call.
    struct Throttled {
        written: Vec<u8>,
        budget: usize,
        calls: usize,
        interrupt_first: bool,
    }

    impl Throttled {
        fn new(budget: usize) -> Self {
            Throttled {
                written: Vec::new(),
                budget,
                calls: 0,
                interrupt_first: false,
            }
        }
    }

    impl Write for Throttled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.interrupt_first {
                self.interrupt_first = false;
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.budget - n);
                self.written.extend_from_slice(&b[..take]);
                n += take;
                if n == self.budget {
                    break;
                }
            }
            self.budget -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn frames(outbox: &mut Outbox, parts: &[&'static [u8]]) {
        for p in parts {
            outbox.push(Bytes::from_static(p));
        }
    }

    #[test]
    fn drains_many_frames_in_one_vectored_write() {
        let mut outbox = Outbox::default();
        frames(&mut outbox, &[b"abc", b"de", b"f"]);
        let mut w = Throttled::new(100);
        assert_eq!(outbox.write_to(&mut w).unwrap(), Flush::Drained);
        assert_eq!(w.written, b"abcdef");
        assert_eq!(w.calls, 1);
        assert!(outbox.is_empty());
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[test]
    fn partial_write_resumes_mid_frame_in_order() {
        let mut outbox = Outbox::default();
        frames(&mut outbox, &[b"hello", b"world"]);
        let mut w = Throttled::new(3);
        assert_eq!(outbox.write_to(&mut w).unwrap(), Flush::Blocked);
        assert_eq!(outbox.queued_bytes(), 7);
        w.budget = 100;
        assert_eq!(outbox.write_to(&mut w).unwrap(), Flush::Drained);
        assert_eq!(w.written, b"helloworld");
    }

    #[test]
    fn interrupted_is_retried() {
        let mut outbox = Outbox::default();
        frames(&mut outbox, &[b"x"]);
        let mut w = Throttled::new(10);
        w.interrupt_first = true;
        assert_eq!(outbox.write_to(&mut w).unwrap(), Flush::Drained);
        assert_eq!(w.written, b"x");
    }

    #[test]
    fn more_than_max_iov_segments_take_several_writes() {
        let mut outbox = Outbox::default();
        for _ in 0..(MAX_IOV * 2 + 1) {
            outbox.push(Bytes::from_static(b"z"));
        }
        let mut w = Throttled::new(10_000);
        assert_eq!(outbox.write_to(&mut w).unwrap(), Flush::Drained);
        assert_eq!(w.calls, 3);
        assert_eq!(w.written.len(), MAX_IOV * 2 + 1);
    }

    #[test]
    fn drop_unstarted_keeps_a_partly_written_head() {
        let mut outbox = Outbox::default();
        frames(&mut outbox, &[b"first", b"second", b"third"]);
        let mut w = Throttled::new(2);
        outbox.write_to(&mut w).unwrap();
        outbox.drop_unstarted();
        assert_eq!(outbox.queued_bytes(), 3);
        outbox.push(Bytes::from_static(b"CLOSE"));
        w.budget = 100;
        outbox.write_to(&mut w).unwrap();
        assert_eq!(w.written, b"firstCLOSE");
    }

    #[test]
    fn drop_unstarted_drops_everything_when_nothing_started() {
        let mut outbox = Outbox::default();
        frames(&mut outbox, &[b"first", b"second"]);
        outbox.drop_unstarted();
        assert!(outbox.is_empty());
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[test]
    fn push_partial_queues_only_the_unwritten_tail() {
        let mut outbox = Outbox::default();
        outbox.push_partial(Bytes::from_static(b"abcdef"), 4);
        assert_eq!(outbox.queued_bytes(), 2);
        outbox.drop_unstarted();
        assert_eq!(outbox.queued_bytes(), 2, "a started head survives");
        let mut w = Throttled::new(100);
        outbox.write_to(&mut w).unwrap();
        assert_eq!(w.written, b"ef");
    }

    #[test]
    fn shared_frame_is_not_copied_per_queue() {
        let frame = Bytes::from(vec![7u8; 4096]);
        let mut a = Outbox::default();
        let mut b = Outbox::default();
        a.push(frame.clone());
        b.push(frame.clone());
        assert_eq!(a.queue[0].as_ptr(), b.queue[0].as_ptr());
    }
}
