//! A connection's queue of unsent outbound bytes.
//!
//! It owns references to shared, already-framed buffers ([`SharedFrame`]: a published frame is encoded once and
//! every queue holds the same allocation) and how far the head has been written. Each entry is one pointer;
//! only the head can be partly written, so one offset serves the whole queue. Every entry holds a reference on
//! its frame's budget charge ([`SharedFrame::try_hold`]), taken when it is queued and given back when it is
//! written or dropped, so every way out of the queue takes the budget. It does not decide when to write or
//! enforce the outbox limit; the connection does. Writing is generic over `io::Write`, so a socket and a test
//! buffer take the same path, and it gathers up to [`MAX_IOV`] segments into one `writev`.

use crate::budget::Budget;
use crate::shared_frame::SharedFrame;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

/// Segments gathered into one vectored write (Linux's IOV_MAX is 1024; 64 keeps the stack array small and
/// already fills a socket buffer with small frames).
pub const MAX_IOV: usize = 64;

/// What one queued frame costs its queue: a slot of one pointer (the frame itself is charged once, however
/// many queues hold it).
pub const ENTRY_BYTES: usize = std::mem::size_of::<SharedFrame>();

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
    /// Frames in the order they go out; each holds a reference on its frame's budget charge.
    queue: VecDeque<SharedFrame>,
    /// Bytes of the head frame already written (0 when the head has not started).
    head_written: usize,
    /// Unsent bytes, over every queued frame.
    bytes: usize,
}

impl Outbox {
    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Unsent bytes queued (the logical backlog: a frame shared with other queues counts whole here).
    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    /// Frames queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// The queued frames, oldest first, and how many bytes of the head have been written already.
    pub fn queued(&self) -> (impl Iterator<Item = &SharedFrame>, usize) {
        (self.queue.iter(), self.head_written)
    }

    /// A queue holding `frames` (as [`Outbox::queued`] gave them), for a connection moved from another
    /// process; each frame is charged to `budget` by force (its bytes are held already).
    pub fn from_queued(frames: Vec<SharedFrame>, head_written: usize, budget: &Budget) -> Outbox {
        let mut outbox = Outbox::default();
        for (i, frame) in frames.iter().enumerate() {
            let written = if i == 0 { head_written } else { 0 };
            outbox.force_push(frame, written, budget);
        }
        outbox
    }

    /// Heap bytes the queue itself holds: its slots. The frames are charged on their own, once each.
    pub fn footprint(&self) -> usize {
        self.queue.capacity() * ENTRY_BYTES
    }

    /// True when the head frame has been partly written, so it must be finished before any other byte.
    pub fn head_started(&self) -> bool {
        self.head_written > 0
    }

    /// Queues `frame` behind what is queued if the budget can take it (a frame already queued elsewhere costs
    /// it nothing); false, with nothing queued, if it cannot. Empty frames are ignored.
    pub fn try_push(&mut self, frame: &SharedFrame, budget: &Budget) -> bool {
        if frame.is_empty() {
            return true;
        }
        if !frame.try_hold(budget) {
            return false;
        }
        self.bytes += frame.len();
        self.queue.push_back(frame.clone());
        true
    }

    /// Queues the unwritten part of `frame`, whose first `written` bytes already went to the socket (0 for a
    /// frame queued behind others), whatever the budget says: the bytes must go out for the stream to stay
    /// well-formed (a started frame, a close frame). Returns whether the budget could take it (false: it was
    /// charged by force).
    pub fn force_push(&mut self, frame: &SharedFrame, written: usize, budget: &Budget) -> bool {
        debug_assert!(
            written == 0 || self.queue.is_empty(),
            "a partial write only happens with an empty queue"
        );
        if written >= frame.len() {
            return true;
        }
        let fits = frame.try_hold(budget);
        if !fits {
            frame.force_hold(budget);
        }
        if self.queue.is_empty() {
            self.head_written = written;
        }
        self.bytes += frame.len() - written;
        self.queue.push_back(frame.clone());
        fits
    }

    /// Drops every queued frame that has not started going out, keeping a partly written head so the byte
    /// stream stays well-formed for whatever is written after it (a close frame).
    pub fn drop_unstarted(&mut self, budget: &Budget) {
        let keep = usize::from(self.head_started());
        while self.queue.len() > keep {
            let dropped = self.queue.pop_back().expect("len checked");
            self.bytes -= dropped.len();
            dropped.release(budget);
        }
    }

    /// Like [`Outbox::drop_unstarted`], but keeps the last frame too (the close frame queued behind the rest).
    pub fn drop_unstarted_but_last(&mut self, budget: &Budget) {
        if self.queue.len() < 2 {
            return;
        }
        let last = self.queue.pop_back().expect("len checked");
        self.drop_unstarted(budget);
        self.queue.push_back(last);
    }

    /// Drops everything queued and gives every reference back (the connection is going away).
    pub fn clear(&mut self, budget: &Budget) {
        for frame in self.queue.drain(..) {
            frame.release(budget);
        }
        self.bytes = 0;
        self.head_written = 0;
    }

    /// Writes queued bytes until the queue drains or the writer would block. `Interrupted` is retried; any
    /// other error is returned with the queue left as it was after the last successful write. Frames written
    /// whole give their budget reference back.
    pub fn write_to<W: Write + ?Sized>(
        &mut self,
        writer: &mut W,
        budget: &Budget,
    ) -> io::Result<Flush> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let count = self.queue.len().min(MAX_IOV);
            for (i, (slot, frame)) in slices.iter_mut().zip(self.queue.iter()).enumerate() {
                let skip = if i == 0 { self.head_written } else { 0 };
                *slot = IoSlice::new(&frame.bytes()[skip..]);
            }
            match writer.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n, budget),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) => return Err(e),
            }
        }
        Ok(Flush::Drained)
    }

    fn advance(&mut self, mut n: usize, budget: &Budget) {
        debug_assert!(n <= self.bytes);
        self.bytes -= n;
        while n > 0 {
            let head = self.queue.front().expect("wrote more than queued");
            let left = head.len() - self.head_written;
            if n < left {
                self.head_written += n;
                return;
            }
            n -= left;
            self.queue.pop_front().expect("head").release(budget);
            self.head_written = 0;
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // Every entry holds a budget reference that only `clear` (or writing it) gives back.
        if !std::thread::panicking() {
            debug_assert!(
                self.queue.is_empty(),
                "an outbox was dropped holding {} frames: clear it with the budget first",
                self.queue.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most `window` bytes, then reports WouldBlock, recording every call.
    struct Throttled {
        written: Vec<u8>,
        window: usize,
        calls: usize,
        interrupt_first: bool,
    }

    impl Throttled {
        fn new(window: usize) -> Self {
            Throttled {
                written: Vec::new(),
                window,
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

    fn unlimited() -> Budget {
        Budget::new(usize::MAX)
    }

    fn frames(outbox: &mut Outbox, budget: &Budget, parts: &[&'static [u8]]) {
        for p in parts {
            assert!(outbox.try_push(&SharedFrame::from_static(p), budget));
        }
    }

    #[test]
    fn an_entry_is_one_pointer() {
        assert_eq!(ENTRY_BYTES, std::mem::size_of::<usize>());
    }

    #[test]
    fn drains_many_frames_in_one_vectored_write_and_gives_the_charges_back() {
        let budget = unlimited();
        let mut outbox = Outbox::default();
        frames(&mut outbox, &budget, &[b"abc", b"de", b"f"]);
        assert!(budget.used() > 6);
        let mut w = Throttled::new(100);
        assert_eq!(outbox.write_to(&mut w, &budget).unwrap(), Flush::Drained);
        assert_eq!(w.written, b"abcdef");
        assert_eq!(w.calls, 1);
        assert!(outbox.is_empty());
        assert_eq!(outbox.queued_bytes(), 0);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn partial_write_resumes_mid_frame_in_order() {
        let budget = unlimited();
        let mut outbox = Outbox::default();
        frames(&mut outbox, &budget, &[b"hello", b"world"]);
        let mut w = Throttled::new(3);
        assert_eq!(outbox.write_to(&mut w, &budget).unwrap(), Flush::Blocked);
        assert_eq!(outbox.queued_bytes(), 7);
        assert!(outbox.head_started());
        w.window = 100;
        assert_eq!(outbox.write_to(&mut w, &budget).unwrap(), Flush::Drained);
        assert_eq!(w.written, b"helloworld");
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn interrupted_is_retried() {
        let budget = unlimited();
        let mut outbox = Outbox::default();
        frames(&mut outbox, &budget, &[b"x"]);
        let mut w = Throttled::new(10);
        w.interrupt_first = true;
        assert_eq!(outbox.write_to(&mut w, &budget).unwrap(), Flush::Drained);
        assert_eq!(w.written, b"x");
    }

    #[test]
    fn more_than_max_iov_segments_take_several_writes() {
        let budget = unlimited();
        let mut outbox = Outbox::default();
        for _ in 0..(MAX_IOV * 2 + 1) {
            assert!(outbox.try_push(&SharedFrame::from_static(b"z"), &budget));
        }
        let mut w = Throttled::new(10_000);
        assert_eq!(outbox.write_to(&mut w, &budget).unwrap(), Flush::Drained);
        assert_eq!(w.calls, 3);
        assert_eq!(w.written.len(), MAX_IOV * 2 + 1);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn drop_unstarted_keeps_a_partly_written_head() {
        let budget = unlimited();
        let mut outbox = Outbox::default();
        frames(&mut outbox, &budget, &[b"first", b"second", b"third"]);
        let mut w = Throttled::new(2);
        outbox.write_to(&mut w, &budget).unwrap();
        outbox.drop_unstarted(&budget);
        assert_eq!(outbox.queued_bytes(), 3);
        assert!(outbox.force_push(&SharedFrame::from_static(b"CLOSE"), 0, &budget));
        w.window = 100;
        outbox.write_to(&mut w, &budget).unwrap();
        assert_eq!(w.written, b"firstCLOSE");
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn drop_unstarted_drops_everything_when_nothing_started() {
        let budget = unlimited();
        let mut outbox = Outbox::default();
        frames(&mut outbox, &budget, &[b"first", b"second"]);
        outbox.drop_unstarted(&budget);
        assert!(outbox.is_empty());
        assert_eq!(outbox.queued_bytes(), 0);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn drop_unstarted_but_last_keeps_the_started_head_and_the_close_frame_behind() {
        let budget = unlimited();
        for started in [false, true] {
            let mut outbox = Outbox::default();
            frames(&mut outbox, &budget, &[b"first", b"second", b"third"]);
            assert!(outbox.force_push(&SharedFrame::from_static(b"CLOSE"), 0, &budget));
            let mut w = Throttled::new(if started { 2 } else { 0 });
            outbox.write_to(&mut w, &budget).unwrap();
            outbox.drop_unstarted_but_last(&budget);
            w.window = 100;
            outbox.write_to(&mut w, &budget).unwrap();
            let expected: &[u8] = if started { b"firstCLOSE" } else { b"CLOSE" };
            assert_eq!(w.written, expected);
            assert_eq!(budget.used(), 0);
        }
    }

    #[test]
    fn force_push_queues_only_the_unwritten_tail() {
        let budget = unlimited();
        let mut outbox = Outbox::default();
        assert!(outbox.force_push(&SharedFrame::from_static(b"abcdef"), 4, &budget));
        assert_eq!(outbox.queued_bytes(), 2);
        outbox.drop_unstarted(&budget);
        assert_eq!(outbox.queued_bytes(), 2, "a started head survives");
        let mut w = Throttled::new(100);
        outbox.write_to(&mut w, &budget).unwrap();
        assert_eq!(w.written, b"ef");
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_frame_shared_by_many_queues_is_charged_once_and_not_copied() {
        let budget = unlimited();
        let frame = SharedFrame::new(bytes::Bytes::from(vec![7u8; 4096]));
        let mut queues: Vec<Outbox> = (0..100).map(|_| Outbox::default()).collect();
        for q in &mut queues {
            assert!(q.try_push(&frame, &budget));
        }
        assert_eq!(budget.used(), frame.charge());
        assert!(queues[0].queue[0].ptr_eq(&queues[99].queue[0]));
        assert_eq!(queues[0].queue[0].bytes().as_ptr(), frame.bytes().as_ptr());
        for q in &mut queues {
            q.clear(&budget);
        }
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_budget_that_cannot_take_a_new_frame_refuses_it_and_queues_nothing() {
        let budget = Budget::new(100);
        let mut outbox = Outbox::default();
        let big = SharedFrame::new(bytes::Bytes::from(vec![1u8; 200]));
        assert!(!outbox.try_push(&big, &budget));
        assert!(outbox.is_empty());
        assert_eq!(budget.used(), 0);
    }
}
