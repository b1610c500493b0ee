//! One reactor's TLS sessions, found by connection slab key.
//!
//! Only TLS connections have a session, so a plain ws:// connection pays nothing here. Sessions are stored
//! densely in a slab and found through a map of 4-byte indexes: a hash table of whole sessions (about 140
//! bytes each) would pay its power-of-two growth and load-factor slack on every one of them, doubling the
//! per-connection cost. It owns storage only; what a session does is `session`'s.

use super::session::Session;
use hashbrown::HashMap;
use slab::Slab;

/// A TLS connection's session and what it is charged against the buffer budget.
#[derive(Debug)]
pub struct Slot {
    /// The session.
    pub session: Session,
    /// Bytes of the session's buffers charged to the budget (the reactor settles it after every call).
    pub charged: usize,
    /// Counted in `densepush_tls_sessions`: its handshake completed. Kept apart from the session's state,
    /// which becomes `Failed` when an established session fails and must still be uncounted.
    pub counted: bool,
}

/// What one TLS connection costs in the table beyond its buffers (the slot, its index entry with slack), for
/// `densepush_tls_bytes`.
pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>() + 2 * std::mem::size_of::<(u32, u32)>();

/// The sessions of one reactor.
#[derive(Debug, Default)]
pub struct Sessions {
    slots: Slab<Slot>,
    index: HashMap<u32, u32>,
}

impl Sessions {
    /// The session of connection `key`.
    pub fn get(&self, key: u32) -> Option<&Slot> {
        self.index.get(&key).map(|&i| &self.slots[i as usize])
    }

    /// The session of connection `key`, to change it.
    pub fn get_mut(&mut self, key: u32) -> Option<&mut Slot> {
        self.index.get(&key).map(|&i| &mut self.slots[i as usize])
    }

    /// Gives connection `key` its session (it must have none).
    pub fn insert(&mut self, key: u32, slot: Slot) {
        let i = self.slots.insert(slot) as u32;
        let old = self.index.insert(key, i);
        debug_assert!(old.is_none(), "connection {key} had a session already");
    }

    /// Takes connection `key`'s session away.
    pub fn remove(&mut self, key: u32) -> Option<Slot> {
        let i = self.index.remove(&key)?;
        Some(self.slots.remove(i as usize))
    }

    /// Every session.
    pub fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().map(|(_, slot)| slot)
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_found_by_key_and_slots_are_reused() {
        let mut t = Sessions::default();
        t.insert(
            7,
            Slot {
                session: Session::Failed,
                charged: 1,
                counted: false,
            },
        );
        t.insert(
            9,
            Slot {
                session: Session::Failed,
                charged: 2,
                counted: false,
            },
        );
        assert_eq!(t.get(9).unwrap().charged, 2);
        assert_eq!(t.remove(7).unwrap().charged, 1);
        assert!(t.get(7).is_none() && t.remove(7).is_none());
        t.insert(
            11,
            Slot {
                session: Session::Failed,
                charged: 3,
                counted: false,
            },
        );
        assert_eq!(t.len(), 2);
        t.get_mut(11).unwrap().charged = 4;
        assert_eq!(t.get(11).unwrap().charged, 4);
    }

    #[test]
    fn a_slot_is_a_small_fixed_size() {
        assert!(
            std::mem::size_of::<Slot>() <= 144,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }
}
