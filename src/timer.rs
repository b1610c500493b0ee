//! A hashed timing wheel of connection deadlines, one per reactor.
//!
//! It owns only `(slab key, stamp)` pairs in coarse ticks; it does not know what a deadline means or read the
//! clock (the reactor converts time to ticks). A connection never cancels an entry: it keeps the stamp of its
//! live entry, and an entry whose stamp no longer matches (rescheduled, or the slab key was reused by another
//! connection) is ignored when it fires. That keeps the cost at 8 bytes per connection and O(1) per operation.

/// One scheduled deadline: which slab entry, and the stamp it had when scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerEntry {
    /// The connection's slab key.
    pub key: u32,
    /// Reactor-unique stamp; the connection stores the stamp of its one live entry.
    pub stamp: u32,
}

/// Wheel whose span covers the longest delay, so every entry in a slot is due when the slot is reached
/// (no rounds to count).
#[derive(Debug)]
pub struct TimerWheel {
    slots: Vec<Vec<TimerEntry>>,
    /// Ticks up to and including this one have been fired.
    now_tick: u64,
    next_stamp: u32,
    len: usize,
}

impl TimerWheel {
    /// A wheel that can hold delays of up to `max_delay_ticks` ticks, starting at tick 0.
    pub fn new(max_delay_ticks: u64) -> Self {
        let slots = (max_delay_ticks.max(1) + 1) as usize;
        TimerWheel {
            slots: (0..slots).map(|_| Vec::new()).collect(),
            now_tick: 0,
            next_stamp: 1,
            len: 0,
        }
    }

    /// The last tick fired.
    pub fn now_tick(&self) -> u64 {
        self.now_tick
    }

    /// Entries scheduled and not yet fired (stale ones included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `key` to fire `delay_ticks` after the current tick (clamped to 1..=span, since a deadline in
    /// the past fires on the next tick) and returns the stamp the caller must keep.
    pub fn schedule(&mut self, key: u32, delay_ticks: u64) -> u32 {
        let span = (self.slots.len() - 1) as u64;
        let delay = delay_ticks.clamp(1, span);
        let stamp = self.next_stamp;
        // Zero is never handed out, so a connection can use it for "no timer".
        self.next_stamp = self.next_stamp.wrapping_add(1).max(1);
        let slot = ((self.now_tick + delay) % self.slots.len() as u64) as usize;
        self.slots[slot].push(TimerEntry { key, stamp });
        self.len += 1;
        stamp
    }

    /// Fires every tick after the current one up to `to_tick`, appending their entries to `out` in tick order.
    /// A jump longer than the span visits each slot once: everything in it is overdue either way.
    pub fn advance(&mut self, to_tick: u64, out: &mut Vec<TimerEntry>) {
        if to_tick <= self.now_tick {
            return;
        }
        let steps = (to_tick - self.now_tick).min(self.slots.len() as u64);
        let first = to_tick - steps + 1;
        let slots = self.slots.len() as u64;
        for tick in first..=to_tick {
            let slot = &mut self.slots[(tick % slots) as usize];
            self.len -= slot.len();
            // The slot hands its buffer over instead of keeping its capacity: a burst of connections fills
            // whichever slots its ticks hit, and slots that each kept their own peak would hold the memory of
            // every past burst at once. Idle memory returns to idle size; the next burst allocates afresh.
            let fired = std::mem::take(slot);
            if out.is_empty() {
                *out = fired;
            } else {
                out.extend(fired);
            }
        }
        self.now_tick = to_tick;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fire(wheel: &mut TimerWheel, to: u64) -> Vec<u32> {
        let mut out = Vec::new();
        wheel.advance(to, &mut out);
        out.into_iter().map(|e| e.key).collect()
    }

    #[test]
    fn entry_fires_exactly_at_its_tick() {
        let mut wheel = TimerWheel::new(10);
        wheel.schedule(7, 3);
        assert!(fire(&mut wheel, 2).is_empty());
        assert_eq!(fire(&mut wheel, 3), vec![7]);
        assert!(fire(&mut wheel, 20).is_empty());
        assert!(wheel.is_empty());
    }

    #[test]
    fn entries_fire_in_tick_order_across_one_advance() {
        let mut wheel = TimerWheel::new(10);
        wheel.schedule(1, 5);
        wheel.schedule(2, 2);
        wheel.schedule(3, 9);
        assert_eq!(fire(&mut wheel, 9), vec![2, 1, 3]);
    }

    #[test]
    fn delay_longer_than_span_is_clamped_not_lost() {
        let mut wheel = TimerWheel::new(4);
        wheel.schedule(1, 100);
        assert!(fire(&mut wheel, 3).is_empty());
        assert_eq!(fire(&mut wheel, 4), vec![1]);
    }

    #[test]
    fn zero_delay_fires_on_next_tick() {
        let mut wheel = TimerWheel::new(4);
        fire(&mut wheel, 5);
        wheel.schedule(9, 0);
        assert_eq!(fire(&mut wheel, 6), vec![9]);
    }

    #[test]
    fn jump_past_whole_span_fires_everything_once() {
        let mut wheel = TimerWheel::new(8);
        for k in 0..8 {
            wheel.schedule(k, u64::from(k) + 1);
        }
        let mut fired = fire(&mut wheel, 1_000);
        fired.sort();
        assert_eq!(fired, (0..8).collect::<Vec<_>>());
        assert_eq!(wheel.len(), 0);
    }

    #[test]
    fn wrapping_around_the_wheel_keeps_deadlines() {
        let mut wheel = TimerWheel::new(3);
        for round in 0..10u64 {
            wheel.schedule(round as u32, 3);
            assert!(fire(&mut wheel, round * 3 + 2).is_empty());
            assert_eq!(fire(&mut wheel, round * 3 + 3), vec![round as u32]);
        }
    }

    #[test]
    fn fired_slots_keep_no_capacity() {
        let mut wheel = TimerWheel::new(4);
        for k in 0..1_000 {
            wheel.schedule(k, 2);
        }
        let mut out = Vec::new();
        wheel.advance(2, &mut out);
        assert_eq!(out.len(), 1_000);
        assert!(wheel.slots.iter().all(|slot| slot.capacity() == 0));
    }

    #[test]
    fn stamps_are_unique_and_never_zero() {
        let mut wheel = TimerWheel::new(3);
        wheel.next_stamp = u32::MAX;
        let a = wheel.schedule(1, 1);
        let b = wheel.schedule(1, 1);
        assert_eq!(a, u32::MAX);
        assert_eq!(b, 1);
        let mut out = Vec::new();
        wheel.advance(1, &mut out);
        assert_eq!(
            out,
            vec![
                TimerEntry { key: 1, stamp: a },
                TimerEntry { key: 1, stamp: b }
            ]
        );
    }
}
