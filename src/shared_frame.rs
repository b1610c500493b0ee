//! A frame that many queues may hold at once, charged to the buffer budget once while any of them does.
//!
//! It owns one frame's bytes and the count of queues that reference it: the outboxes of slow connections
//! (`conn::outbox`) and the reactors' mailboxes (`dispatch`). The first queue to take a reference charges the
//! frame to the [`Budget`] and the last one to let go gives the charge back, so 1,500 slow readers of the same
//! broadcast cost the frame once plus one reference each, not 1,500 copies: the budget counts the memory that
//! is really held. It does not decide when to queue, or what to do when the budget refuses (`conn::machine`).
//!
//! A frame that is written straight through to the socket is never queued and never charged: writing it takes
//! no reference, no count and no allocation.

use crate::budget::Budget;
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One encoded frame (or HTTP answer) and the number of queues holding it.
#[derive(Debug)]
struct Cell {
    bytes: Bytes,
    /// Queues (outboxes, mailboxes) holding a reference; the frame is charged to the budget while it is not 0.
    queues: AtomicUsize,
}

/// Heap bytes a charged frame costs beyond its own bytes: the reference-counted cell (with `Arc`'s two counts)
/// and the shared header `Bytes` allocates once it is cloned.
pub const FRAME_OVERHEAD: usize =
    std::mem::size_of::<Cell>() + 2 * std::mem::size_of::<usize>() + 32;

/// A frame shared by every queue that holds it (cloning clones a pointer).
#[derive(Debug, Clone)]
pub struct SharedFrame(Arc<Cell>);

impl SharedFrame {
    /// A frame no queue holds yet.
    pub fn new(bytes: Bytes) -> SharedFrame {
        SharedFrame(Arc::new(Cell {
            bytes,
            queues: AtomicUsize::new(0),
        }))
    }

    /// A frame of static bytes (a ping, an empty close).
    pub fn from_static(bytes: &'static [u8]) -> SharedFrame {
        SharedFrame::new(Bytes::from_static(bytes))
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.0.bytes
    }

    /// Length of the frame in bytes.
    pub fn len(&self) -> usize {
        self.0.bytes.len()
    }

    /// True for an empty frame.
    pub fn is_empty(&self) -> bool {
        self.0.bytes.is_empty()
    }

    /// What the frame costs the budget while some queue holds it.
    pub fn charge(&self) -> usize {
        self.len() + FRAME_OVERHEAD
    }

    /// Queues holding a reference now.
    pub fn queues(&self) -> usize {
        self.0.queues.load(Ordering::Acquire)
    }

    /// Whether two handles are the same frame.
    pub fn ptr_eq(&self, other: &SharedFrame) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// A queue takes a reference. The first one charges the frame to `budget`; if the budget refuses, nothing
    /// is taken and this returns false. Every reference taken must be given back with [`SharedFrame::release`].
    pub fn try_hold(&self, budget: &Budget) -> bool {
        self.hold(budget, false)
    }

    /// A queue takes a reference whatever the budget says (bytes that must be kept: the tail of a frame
    /// already partly written, a close frame, a publish already accepted).
    pub fn force_hold(&self, budget: &Budget) {
        let held = self.hold(budget, true);
        debug_assert!(held);
    }

    fn hold(&self, budget: &Budget, force: bool) -> bool {
        let queues = &self.0.queues;
        let mut now = queues.load(Ordering::Acquire);
        loop {
            if now == 0 {
                // Charge before the count leaves 0, so a release (which needs the count to be 1 first) can never
                // give back a charge that was not taken. Two first holders racing both charge; the loser of the
                // exchange gives its charge back.
                if force {
                    budget.force_reserve(self.charge());
                } else if !budget.try_reserve(self.charge()) {
                    return false;
                }
                match queues.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return true,
                    Err(actual) => {
                        budget.release(self.charge());
                        now = actual;
                    }
                }
            } else {
                match queues.compare_exchange(now, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return true,
                    Err(actual) => now = actual,
                }
            }
        }
    }

    /// A queue gives its reference back; the last one gives the charge back to `budget`.
    pub fn release(&self, budget: &Budget) {
        let before = self.0.queues.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "released a frame no queue held");
        if before == 1 {
            budget.release(self.charge());
        }
    }
}

impl From<Bytes> for SharedFrame {
    fn from(bytes: Bytes) -> SharedFrame {
        SharedFrame::new(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> SharedFrame {
        SharedFrame::new(Bytes::from(vec![7u8; n]))
    }

    #[test]
    fn the_first_holder_charges_and_the_last_one_releases() {
        let budget = Budget::new(usize::MAX);
        let f = frame(4096);
        assert!(f.try_hold(&budget));
        assert_eq!(budget.used(), 4096 + FRAME_OVERHEAD);
        for _ in 0..1_499 {
            assert!(f.clone().try_hold(&budget));
        }
        assert_eq!(budget.used(), f.charge(), "1,500 holders, one charge");
        for _ in 0..1_499 {
            f.release(&budget);
        }
        assert_eq!(budget.used(), f.charge());
        f.release(&budget);
        assert_eq!(budget.used(), 0);
        assert_eq!(f.queues(), 0);
    }

    #[test]
    fn a_refused_first_hold_takes_nothing_but_later_holds_of_a_charged_frame_cost_nothing() {
        let budget = Budget::new(5000);
        let big = frame(8000);
        assert!(!big.try_hold(&budget));
        assert_eq!((big.queues(), budget.used()), (0, 0));
        let small = frame(4000);
        assert!(small.try_hold(&budget));
        assert!(budget.used() > 4000);
        let other = frame(1000);
        assert!(!other.try_hold(&budget), "the budget is used up");
        // The same frame again costs the budget nothing, however full it is.
        assert!(small.try_hold(&budget));
        small.release(&budget);
        small.release(&budget);
        assert!(other.try_hold(&budget));
        other.release(&budget);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_forced_hold_passes_the_limit() {
        let budget = Budget::new(10);
        let f = frame(100);
        f.force_hold(&budget);
        assert_eq!(budget.used(), f.charge());
        f.release(&budget);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn holders_on_several_threads_leave_no_charge_behind() {
        let budget = Arc::new(Budget::new(usize::MAX));
        let frames: Vec<SharedFrame> = (0..8).map(|i| frame(100 + i)).collect();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                let frames = frames.clone();
                std::thread::spawn(move || {
                    for round in 0..20_000usize {
                        let f = &frames[round % frames.len()];
                        assert!(f.try_hold(&budget));
                        let used = budget.used();
                        assert!(used >= f.charge(), "a held frame is charged ({used})");
                        f.release(&budget);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(budget.used(), 0);
    }
}
