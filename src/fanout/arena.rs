//! Short strings of one reactor (user ids, client tokens) packed into one byte vector, addressed by 4-byte
//! offsets: the index records hold offsets instead of `String`s or inline 24-byte strings, so a name costs its
//! bytes rounded up to 8 instead of a heap allocation (glibc: its size rounded up to 32 bytes, plus an 8-byte
//! header) or 24 bytes whether used or not.
//!
//! A string is stored in a cell of 8-byte units: a length byte (or `0xff` and a 4-byte length, for the rare
//! string of 255 bytes or more), then the bytes. A freed cell goes on the free list of its size, threaded
//! through the cells themselves, and the next string of that size takes it; so churn among names of a few sizes
//! does not grow the vector. It does not hash or look up names (the fanout tables do); it owns their bytes.

/// Offset of a string in the arena.
pub type Offset = u32;

/// Cells are this many bytes, so a freed cell can hold its free-list link.
const UNIT: usize = 8;
/// Length byte that announces a 4-byte length.
const LONG: u8 = 0xff;
/// "No cell" in a free list.
const NONE: u32 = u32::MAX;

/// One reactor's string arena.
#[derive(Debug, Default)]
pub struct Arena {
    bytes: Vec<u8>,
    /// Free cells by size in units (index 0 unused); each head links to the next through the cell's first 4 bytes.
    free: Vec<u32>,
    /// Bytes held by live strings' cells.
    live: usize,
}

impl Arena {
    /// An empty arena with address space reserved for `bytes` (not touched, so not resident until used).
    pub fn with_capacity(bytes: usize) -> Arena {
        Arena {
            bytes: Vec::with_capacity(bytes),
            free: Vec::new(),
            live: 0,
        }
    }

    fn header_len(len: usize) -> usize {
        if len < LONG as usize {
            1
        } else {
            5
        }
    }

    fn units(len: usize) -> usize {
        (Self::header_len(len) + len).div_ceil(UNIT)
    }

    /// Stores `s`, returning its offset.
    pub fn insert(&mut self, s: &str) -> Offset {
        let units = Self::units(s.len());
        let at = match self.free.get(units).copied().filter(|&head| head != NONE) {
            Some(head) => {
                let at = head as usize;
                self.free[units] = u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap());
                at
            }
            None => {
                let at = self.bytes.len();
                assert!(
                    at + units * UNIT <= u32::MAX as usize,
                    "string arena over 4 GiB"
                );
                self.bytes.resize(at + units * UNIT, 0);
                at
            }
        };
        let body = if s.len() < LONG as usize {
            self.bytes[at] = s.len() as u8;
            at + 1
        } else {
            self.bytes[at] = LONG;
            self.bytes[at + 1..at + 5].copy_from_slice(&(s.len() as u32).to_le_bytes());
            at + 5
        };
        self.bytes[body..body + s.len()].copy_from_slice(s.as_bytes());
        self.live += units * UNIT;
        at as Offset
    }

    /// The string at `at`.
    pub fn get(&self, at: Offset) -> &str {
        let at = at as usize;
        let (len, body) = match self.bytes[at] {
            LONG => (
                u32::from_le_bytes(self.bytes[at + 1..at + 5].try_into().unwrap()) as usize,
                at + 5,
            ),
            len => (len as usize, at + 1),
        };
        // Only whole `&str`s are copied in, so the bytes are UTF-8; checked, not assumed.
        std::str::from_utf8(&self.bytes[body..body + len]).unwrap_or_default()
    }

    /// Frees the string at `at`; its cell is reused by the next string of its size.
    pub fn remove(&mut self, at: Offset) {
        let units = Self::units(self.get(at).len());
        if self.free.len() <= units {
            self.free.resize(units + 1, NONE);
        }
        let a = at as usize;
        self.bytes[a..a + 4].copy_from_slice(&self.free[units].to_le_bytes());
        self.free[units] = at;
        self.live -= units * UNIT;
    }

    /// Bytes held by live strings (cells included).
    pub fn live_bytes(&self) -> usize {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_come_back_as_stored_short_long_and_empty() {
        let mut a = Arena::default();
        let long = "x".repeat(300);
        let ids: Vec<_> = ["u1", "", "c12345", &long, "ünïcode"]
            .iter()
            .map(|s| (a.insert(s), s.to_string()))
            .collect();
        for (id, s) in &ids {
            assert_eq!(a.get(*id), s);
        }
    }

    #[test]
    fn a_short_name_costs_one_unit() {
        let mut a = Arena::default();
        a.insert("c12345");
        a.insert("u1234");
        assert_eq!(a.live_bytes(), 16);
        assert_eq!(a.bytes.len(), 16);
    }

    #[test]
    fn freed_cells_are_reused_by_strings_of_their_size() {
        let mut a = Arena::default();
        let x = a.insert("aaaa");
        let y = a.insert(&"b".repeat(20));
        a.remove(x);
        a.remove(y);
        let len = a.bytes.len();
        let z = a.insert("cccccc");
        let w = a.insert(&"d".repeat(17));
        assert_eq!((z, w), (x, y), "same sizes, same cells");
        assert_eq!(a.bytes.len(), len, "no growth");
        assert_eq!(a.get(z), "cccccc");
        assert_eq!(a.get(w), "d".repeat(17));
    }

    #[test]
    fn churn_against_a_model() {
        let mut a = Arena::default();
        let mut live: Vec<(Offset, String)> = Vec::new();
        let mut seed = 0x1234_5678_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..5_000 {
            if live.len() > 50 || (next() % 3 == 0 && !live.is_empty()) {
                let (at, _) = live.swap_remove((next() % live.len() as u64) as usize);
                a.remove(at);
            } else {
                let s = format!("{i}-{}", "y".repeat((next() % 40) as usize));
                live.push((a.insert(&s), s));
            }
            for (at, s) in &live {
                assert_eq!(a.get(*at), s);
            }
        }
        assert!(a.bytes.len() <= 64 * 56, "{} bytes", a.bytes.len());
    }
}
