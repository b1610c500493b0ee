//! A byte queue for one admin connection's input or output: bytes are appended at the back and consumed from
//! the front by advancing an offset. Sans-IO.
//!
//! It owns the one rule that keeps pipelining linear: consuming never moves the bytes behind it, except when the
//! consumed prefix is at least half the allocation, and then the few bytes left are moved once. Each byte is
//! therefore moved at most once per byte consumed before it, so N requests of a pipelined burst cost O(N) in
//! all (draining the front once per request cost O(N²): 40,000 `/healthz` took 0.51 s). It does not read or
//! write sockets, and knows nothing of HTTP.

/// Consumed prefix below which no compaction happens: moving a few bytes back costs more than it saves.
const COMPACT_MIN_BYTES: usize = 4096;

/// Bytes queued for parsing or for sending.
#[derive(Debug, Default)]
pub struct ByteQueue {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    start: usize,
    /// Bytes moved by compaction since creation: tests check it stays linear in the bytes consumed.
    #[cfg(test)]
    moved: usize,
}

impl ByteQueue {
    /// Unconsumed bytes.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True when every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The unconsumed bytes, oldest first.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Bytes allocated, consumed ones included.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Appends `bytes` at the back.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The vector to append to (e.g. with `http::write_response`); only its end may be written.
    pub fn back(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Consumes the first `n` unconsumed bytes.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len(), "consuming {n} of {} bytes", self.len());
        self.start += n.min(self.len());
        if self.start == self.buf.len() {
            // Everything consumed: start over at the front of the same allocation, moving nothing.
            self.buf.clear();
            self.start = 0;
        } else if self.start >= COMPACT_MIN_BYTES && self.start * 2 >= self.buf.len() {
            // What is left is no larger than what was consumed, so this move is paid for by those bytes.
            #[cfg(test)]
            {
                self.moved += self.buf.len() - self.start;
            }
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// Consumes the first `n` unconsumed bytes and returns them.
    pub fn take_front(&mut self, n: usize) -> Vec<u8> {
        let taken = self.as_slice()[..n].to_vec();
        self.consume(n);
        taken
    }

    /// Drops every byte, and the allocation with them.
    pub fn clear(&mut self) {
        *self = ByteQueue::default();
    }

    /// When empty, gives back an allocation larger than `keep` bytes: an idle connection should not hold the
    /// peak of its last burst.
    pub fn shrink_when_empty(&mut self, keep: usize) {
        if self.is_empty() && self.buf.capacity() > keep {
            self.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_out_in_the_order_they_went_in() {
        let mut q = ByteQueue::default();
        q.extend(b"hello ");
        q.back().extend_from_slice(b"world");
        assert_eq!(q.as_slice(), b"hello world");
        q.consume(6);
        assert_eq!(q.as_slice(), b"world");
        assert_eq!(q.take_front(3), b"wor");
        assert_eq!(q.as_slice(), b"ld");
        q.consume(2);
        assert!(q.is_empty());
    }

    #[test]
    fn consuming_everything_keeps_the_allocation_and_moves_nothing() {
        let mut q = ByteQueue::default();
        q.extend(&[7; 100_000]);
        let capacity = q.capacity();
        q.consume(100_000);
        assert_eq!((q.len(), q.capacity(), q.moved), (0, capacity, 0));
    }

    #[test]
    fn a_pipelined_burst_costs_moves_linear_in_its_size() {
        // 40,000 requests of 40 bytes arrive in 16 KiB reads and are consumed one by one, as the admin
        // connection does. Draining the front per request would move ~32 GB; the offset moves at most as many
        // bytes as were consumed.
        let request = [b'x'; 40];
        let stream: Vec<u8> = request.repeat(40_000);
        let mut q = ByteQueue::default();
        let mut consumed = 0;
        for chunk in stream.chunks(16 * 1024) {
            q.extend(chunk);
            while q.len() >= request.len() {
                q.consume(request.len());
                consumed += request.len();
            }
        }
        assert_eq!(consumed, stream.len());
        assert!(q.moved <= consumed, "moved {} for {consumed}", q.moved);
    }

    #[test]
    fn writes_drained_in_small_pieces_move_linearly_too() {
        let mut q = ByteQueue::default();
        let mut total = 0;
        for _ in 0..1000 {
            q.extend(&[1; 997]);
            total += 997;
            // The socket takes a little less than was queued each time.
            q.consume(q.len().min(900));
        }
        let left = q.len();
        q.consume(left);
        assert!(q.moved <= total, "moved {} for {total}", q.moved);
    }

    #[test]
    fn an_empty_queue_gives_back_a_large_allocation_only() {
        let mut q = ByteQueue::default();
        q.extend(&[0; 100_000]);
        q.shrink_when_empty(16 * 1024);
        assert!(q.capacity() >= 100_000, "not empty yet: kept");
        q.consume(100_000);
        q.shrink_when_empty(16 * 1024);
        assert_eq!(q.capacity(), 0);
        q.extend(&[0; 100]);
        q.consume(100);
        let small = q.capacity();
        q.shrink_when_empty(16 * 1024);
        assert_eq!(q.capacity(), small);
    }
}
