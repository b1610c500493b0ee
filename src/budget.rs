//! The server-wide byte budget over per-connection buffers (`websocket.max_buffered_bytes_total`).
//!
//! It owns one number, the bytes every connection's heap buffers hold together, and the rule that a new
//! reservation fails once it would pass the limit. It does not know what the bytes are or what to do when a
//! reservation fails; the connection and the reactor decide that (503 for a handshake, close 1013 for an
//! inbound frame, close 1008 for an outbox). One `Budget` is shared by every reactor, so it is a single atomic
//! updated with compare-and-swap: a reservation that fits is never lost to a race, one that does not is refused.
//!
//! Why a global budget: `max_outbox_bytes` and `max_handshake_bytes` bound one connection, but a million
//! connections each holding a little under their limit can still take the host's memory. The budget bounds
//! the sum.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// A byte budget shared by every reactor.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes, none used.
    pub fn new(limit: usize) -> Self {
        Budget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// Reserves `n` bytes if the total stays within the limit; returns whether it did.
    pub fn try_reserve(&self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        self.used
            .fetch_update(Relaxed, Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Reserves `n` bytes whatever the limit: for bytes that must be held for the byte stream to stay
    /// well-formed (the tail of a frame already partly written, a close frame). Callers keep these small.
    pub fn force_reserve(&self, n: usize) {
        if n != 0 {
            self.used.fetch_add(n, Relaxed);
        }
    }

    /// Gives back `n` bytes reserved earlier.
    pub fn release(&self, n: usize) {
        if n != 0 {
            let before = self.used.fetch_sub(n, Relaxed);
            debug_assert!(before >= n, "released {n} bytes of {before} reserved");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_within_the_limit_succeeds_and_is_counted() {
        let budget = Budget::new(100);
        assert!(budget.try_reserve(60));
        assert!(budget.try_reserve(40));
        assert_eq!(budget.used(), 100);
    }

    #[test]
    fn reservation_past_the_limit_fails_and_reserves_nothing() {
        let budget = Budget::new(100);
        assert!(budget.try_reserve(90));
        assert!(!budget.try_reserve(11));
        assert_eq!(budget.used(), 90);
    }

    #[test]
    fn released_bytes_can_be_reserved_again() {
        let budget = Budget::new(100);
        assert!(budget.try_reserve(100));
        budget.release(30);
        assert_eq!(budget.used(), 70);
        assert!(budget.try_reserve(30));
        assert!(!budget.try_reserve(1));
    }

    #[test]
    fn forced_reservation_passes_the_limit_and_blocks_later_ones() {
        let budget = Budget::new(100);
        assert!(budget.try_reserve(95));
        budget.force_reserve(10);
        assert_eq!(budget.used(), 105);
        assert!(!budget.try_reserve(1));
        budget.release(10);
        assert!(budget.try_reserve(5));
    }

    #[test]
    fn zero_byte_reservation_always_succeeds_even_when_full() {
        let budget = Budget::new(10);
        assert!(budget.try_reserve(10));
        assert!(budget.try_reserve(0));
        assert_eq!(budget.used(), 10);
    }

    #[test]
    fn huge_reservation_does_not_overflow_the_counter() {
        let budget = Budget::new(usize::MAX);
        assert!(budget.try_reserve(10));
        assert!(!budget.try_reserve(usize::MAX));
        assert_eq!(budget.used(), 10);
    }

    #[test]
    fn concurrent_reservations_never_pass_the_limit() {
        let budget = std::sync::Arc::new(Budget::new(1000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || (0..1000).filter(|_| budget.try_reserve(3)).count())
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 333);
        assert_eq!(budget.used(), 999);
    }
}
