//! The heap state of a busy connection, and its charge against the server-wide buffer budget.
//!
//! It owns the buffers a connection holds only while busy — a partial request head, a partial inbound frame,
//! unsent outbound frames, an echo message being assembled — behind one pointer that is null while the
//! connection is idle, and the bookkeeping that keeps `Budget` equal to what those buffers hold: the spill
//! charges its own bytes (the box, the head, the echo message, the outbox's slots); queued frames are charged
//! by themselves, once however many outboxes hold them (`shared_frame`). It also keeps the reactor's gauge of
//! unsent bytes (the logical backlog, where a shared frame counts once per connection). It does not decide
//! when to buffer or what to do when the budget refuses; the connection's machine does.

use super::outbox::Outbox;
use crate::budget::Budget;
use crate::proto::frame::Decoder;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Heap state of a busy connection. Boxed so an idle connection pays one null pointer for all of it.
#[derive(Debug, Default)]
pub struct Spill {
    /// Bytes of an incomplete upgrade request.
    pub head: Vec<u8>,
    /// Inbound frame state between reads (only when mid-frame or mid-message).
    pub decoder: Decoder,
    /// Unsent outbound frames.
    pub outbox: Outbox,
    /// Bytes this spill holds against the server-wide buffer budget for itself (not its queued frames); given
    /// back when it is freed.
    pub charged: usize,
    /// Unsent bytes this spill has added to the reactor's backlog gauge.
    pub counted: usize,
    /// `[diagnostics] echo` only: the client's data message assembled so far, waiting for its last fragment.
    pub echo: Vec<u8>,
    /// permessage-deflate only: the DEFLATE bytes of a compressed client message that straddles reads, kept
    /// until its last frame arrives and it is inflated (`conn::inflate`).
    pub deflated: Vec<u8>,
}

/// What a spill costs before it holds any bytes: the box itself (with the fixed-size frame decoder).
pub const SPILL_BYTES: usize = std::mem::size_of::<Spill>();

impl Spill {
    fn is_idle(&self) -> bool {
        self.head.is_empty()
            && self.decoder.is_idle()
            && self.outbox.is_empty()
            && self.echo.is_empty()
            && self.deflated.is_empty()
    }

    /// Heap bytes this spill holds itself: the box, the head's and the echo message's allocations and the
    /// outbox's slots. The frames the outbox references are charged by themselves (`SharedFrame`).
    fn footprint(&self) -> usize {
        SPILL_BYTES
            + self.head.capacity()
            + self.echo.capacity()
            + self.deflated.capacity()
            + self.outbox.footprint()
    }
}

/// A connection's spill pointer and the rules for growing, settling and freeing it.
#[derive(Debug, Default)]
pub struct Buffers(Option<Box<Spill>>);

impl Buffers {
    /// True while a spill exists.
    pub fn is_allocated(&self) -> bool {
        self.0.is_some()
    }

    /// The spill, if any.
    pub fn get(&self) -> Option<&Spill> {
        self.0.as_deref()
    }

    /// The spill, if any, for changing it in place.
    pub fn get_mut(&mut self) -> Option<&mut Spill> {
        self.0.as_deref_mut()
    }

    /// A spill moved from another process (`machine::Machine::restore`), charged whole to the budget by force:
    /// its bytes are held already. `None` gives no spill. Returns whether one was installed.
    pub fn install(&mut self, spill: Option<Spill>, budget: &Budget, backlog: &AtomicU64) -> bool {
        debug_assert!(self.0.is_none());
        match spill {
            Some(spill) if !spill.is_idle() => {
                self.0 = Some(Box::new(spill));
                self.settle(budget, backlog);
                true
            }
            _ => false,
        }
    }

    /// The spill, allocating it on first need. Returns whether it was allocated now (for the live-buffer gauge).
    pub fn spill_mut(&mut self) -> (&mut Spill, bool) {
        let fresh = self.0.is_none();
        (self.0.get_or_insert_with(Box::default), fresh)
    }

    /// Unsent bytes.
    pub fn queued_bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.outbox.queued_bytes())
    }

    /// Reserves `extra` bytes of the budget for a buffer about to grow, plus the spill itself if there is none
    /// yet, and allocates the spill. `None` when the budget is exhausted (nothing was reserved or allocated);
    /// otherwise whether the spill was allocated now. Call [`Buffers::settle`] once the buffer has grown.
    pub fn try_grow(&mut self, budget: &Budget, extra: usize) -> Option<bool> {
        let need = extra + if self.0.is_none() { SPILL_BYTES } else { 0 };
        if !budget.try_reserve(need) {
            return None;
        }
        let (spill, fresh) = self.spill_mut();
        spill.charged += need;
        Some(fresh)
    }

    /// Reserves `bytes` for the spill's own growth (an outbox slot); false (nothing reserved) when the budget is
    /// used up. The spill must exist.
    pub fn try_charge(&mut self, budget: &Budget, bytes: usize) -> bool {
        let spill = self.0.as_mut().expect("charging implies a spill");
        if !budget.try_reserve(bytes) {
            return false;
        }
        spill.charged += bytes;
        true
    }

    /// Brings the spill's charge in line with what it really holds — gives back what was freed, and charges
    /// (forcibly: the bytes are already held) what a growth cost beyond its reservation — and the backlog
    /// gauge in line with its unsent bytes.
    pub fn settle(&mut self, budget: &Budget, backlog: &AtomicU64) {
        let Some(spill) = self.0.as_mut() else {
            return;
        };
        let actual = spill.footprint();
        if actual > spill.charged {
            budget.force_reserve(actual - spill.charged);
        } else {
            budget.release(spill.charged - actual);
        }
        spill.charged = actual;
        let queued = spill.outbox.queued_bytes();
        if queued > spill.counted {
            backlog.fetch_add((queued - spill.counted) as u64, Relaxed);
        } else if queued < spill.counted {
            backlog.fetch_sub((spill.counted - queued) as u64, Relaxed);
        }
        spill.counted = queued;
    }

    /// Frees the spill when it holds nothing, else settles its charge; returns true if it was freed now.
    pub fn release_if_idle(&mut self, budget: &Budget, backlog: &AtomicU64) -> bool {
        if self.0.as_ref().is_some_and(|s| s.is_idle()) {
            return self.free(budget, backlog);
        }
        self.settle(budget, backlog);
        false
    }

    /// Frees the spill whatever it holds (the connection is going away): gives its charge and every queued
    /// frame's reference back; returns true if there was one.
    pub fn free(&mut self, budget: &Budget, backlog: &AtomicU64) -> bool {
        match self.0.take() {
            Some(mut spill) => {
                spill.outbox.clear(budget);
                budget.release(spill.charged);
                backlog.fetch_sub(spill.counted as u64, Relaxed);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_grow_reserves_the_spill_and_the_bytes_or_nothing() {
        let budget = Budget::new(SPILL_BYTES + 100);
        let gauge = AtomicU64::new(0);
        let mut buffers = Buffers::default();
        assert_eq!(buffers.try_grow(&budget, 200), None);
        assert!(!buffers.is_allocated());
        assert_eq!(budget.used(), 0);
        assert_eq!(buffers.try_grow(&budget, 100), Some(true));
        assert_eq!(budget.used(), SPILL_BYTES + 100);
        // Nothing was buffered after all: settling gives the unused reservation back.
        buffers.settle(&budget, &gauge);
        assert_eq!(budget.used(), SPILL_BYTES);
        assert!(buffers.release_if_idle(&budget, &gauge));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn settle_charges_growth_beyond_the_reservation_and_free_returns_all() {
        let budget = Budget::new(usize::MAX);
        let gauge = AtomicU64::new(0);
        let mut buffers = Buffers::default();
        buffers.try_grow(&budget, 0);
        let (spill, _) = buffers.spill_mut();
        spill.head.reserve_exact(1000);
        spill.head.extend_from_slice(&[1; 1000]);
        buffers.settle(&budget, &gauge);
        assert!(budget.used() >= SPILL_BYTES + 1000);
        assert!(
            !buffers.release_if_idle(&budget, &gauge),
            "a head is not idle"
        );
        assert!(buffers.free(&budget, &gauge));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn try_charge_refuses_past_the_budget_and_reserves_nothing() {
        let budget = Budget::new(SPILL_BYTES + 10);
        let mut buffers = Buffers::default();
        buffers.try_grow(&budget, 0);
        assert!(!buffers.try_charge(&budget, 11));
        assert_eq!(budget.used(), SPILL_BYTES);
        assert!(buffers.try_charge(&budget, 10));
        assert_eq!(budget.used(), SPILL_BYTES + 10);
    }

    #[test]
    fn an_echo_message_being_assembled_is_charged() {
        let budget = Budget::new(usize::MAX);
        let gauge = AtomicU64::new(0);
        let mut buffers = Buffers::default();
        buffers.try_grow(&budget, 5000);
        buffers.spill_mut().0.echo = vec![0u8; 5000];
        buffers.settle(&budget, &gauge);
        assert!(budget.used() >= SPILL_BYTES + 5000, "{}", budget.used());
        assert!(
            !buffers.release_if_idle(&budget, &gauge),
            "an echo message is not idle"
        );
        assert!(buffers.free(&budget, &gauge));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_backlog_gauge_follows_unsent_bytes_and_a_shared_frame_is_charged_once() {
        use crate::shared_frame::SharedFrame;
        let budget = Budget::new(usize::MAX);
        let gauge = AtomicU64::new(0);
        let frame = SharedFrame::new(bytes::Bytes::from(vec![1u8; 1000]));
        let mut a = Buffers::default();
        let mut b = Buffers::default();
        for buffers in [&mut a, &mut b] {
            buffers.try_grow(&budget, 0);
            assert!(buffers.spill_mut().0.outbox.try_push(&frame, &budget));
            buffers.settle(&budget, &gauge);
        }
        assert_eq!(
            gauge.load(Relaxed),
            2000,
            "the logical backlog counts the frame per connection"
        );
        let spills = budget.used() - frame.charge();
        assert!(
            spills < 2 * (SPILL_BYTES + 64),
            "the frame itself is charged once ({spills})"
        );
        assert!(a.free(&budget, &gauge) && b.free(&budget, &gauge));
        assert_eq!((gauge.load(Relaxed), budget.used()), (0, 0));
    }
}
