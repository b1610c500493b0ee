//! A small binary format for moving live state from one process to its successor (the live upgrade,
//! `handoff`): a [`Writer`] that appends fixed-width integers and length-prefixed byte strings, a [`Reader`]
//! that takes them back and names what was malformed, and [`FrameTable`], which sends each shared frame once
//! however many connections queue it.
//!
//! It owns the encoding only. Each module writes and reads its own state with it (`snapshot`/`restore` next to
//! the struct they describe), so a state's format lives with the state. Integers are little-endian; lengths are
//! `u32`. Nothing here allocates per field beyond the output buffer.

use crate::shared_frame::SharedFrame;
use std::collections::HashMap;

/// Why a snapshot could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The input ended inside a field.
    #[error("snapshot truncated reading {0}")]
    Truncated(&'static str),
    /// A field had a value the reader does not accept.
    #[error("snapshot has an invalid {0}")]
    Invalid(&'static str),
}

/// Appends fields to a byte buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Writer {
        Writer::default()
    }

    /// The bytes written so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The written bytes, leaving the writer empty.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// A boolean as one byte.
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }

    /// Two bytes.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Four bytes.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Eight bytes.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A length (`u32`) then the bytes.
    pub fn bytes_field(&mut self, v: &[u8]) {
        debug_assert!(v.len() <= u32::MAX as usize);
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }

    /// A UTF-8 string as [`Writer::bytes_field`].
    pub fn str(&mut self, v: &str) {
        self.bytes_field(v.as_bytes());
    }

    /// An optional string: a presence byte, then the string.
    pub fn opt_str(&mut self, v: Option<&str>) {
        self.bool(v.is_some());
        if let Some(v) = v {
            self.str(v);
        }
    }

    /// Raw bytes with no length (for fixed-size arrays).
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
}

/// Takes fields back out of a snapshot, in the order they were written.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    /// True when every byte was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next `n` bytes.
    pub fn raw(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SnapshotError> {
        if self.buf.len() < n {
            return Err(SnapshotError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, SnapshotError> {
        Ok(self.raw(1, what)?[0])
    }

    /// A boolean (0 or 1).
    pub fn bool(&mut self, what: &'static str) -> Result<bool, SnapshotError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(SnapshotError::Invalid(what)),
        }
    }

    /// Two bytes.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(
            self.raw(2, what)?.try_into().expect("2 bytes"),
        ))
    }

    /// Four bytes.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(
            self.raw(4, what)?.try_into().expect("4 bytes"),
        ))
    }

    /// Eight bytes.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(
            self.raw(8, what)?.try_into().expect("8 bytes"),
        ))
    }

    /// A length-prefixed byte string.
    pub fn bytes_field(&mut self, what: &'static str) -> Result<&'a [u8], SnapshotError> {
        let len = self.u32(what)? as usize;
        self.raw(len, what)
    }

    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self, what: &'static str) -> Result<&'a str, SnapshotError> {
        std::str::from_utf8(self.bytes_field(what)?).map_err(|_| SnapshotError::Invalid(what))
    }

    /// An optional string.
    pub fn opt_str(&mut self, what: &'static str) -> Result<Option<&'a str>, SnapshotError> {
        Ok(if self.bool(what)? {
            Some(self.str(what)?)
        } else {
            None
        })
    }
}

/// Frames shared by many connections' queues, each sent once. The sender numbers a frame the first time a
/// queue names it and collects it to send ahead of the records that refer to it; the receiver rebuilds each
/// frame once, so connections share it again after the move as they did before.
#[derive(Debug, Default)]
pub struct FrameTable {
    ids: HashMap<(usize, usize), u32>,
    /// Frames numbered but not yet sent: `(id, bytes)`.
    fresh: Vec<(u32, SharedFrame)>,
    /// Receiver side: frames by id, each one `SharedFrame` however many queues name it, so the budget counts it
    /// once in the successor as it did here.
    known: Vec<SharedFrame>,
}

impl FrameTable {
    /// The id of `frame`, numbering it (and keeping it to send) if it is new. Two queues holding the same bytes
    /// at the same position share an id.
    pub fn id(&mut self, frame: &SharedFrame) -> u32 {
        let key = (frame.bytes().as_ptr() as usize, frame.len());
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let id = self.ids.len() as u32;
        self.ids.insert(key, id);
        self.fresh.push((id, frame.clone()));
        id
    }

    /// Writes the frames numbered since the last call (to go ahead of the records that name them) and forgets
    /// their bytes (their ids stay known, so later records can still name them).
    pub fn write_fresh(&mut self, w: &mut Writer) {
        w.u32(self.fresh.len() as u32);
        for (id, frame) in self.fresh.drain(..) {
            w.u32(id);
            w.bytes_field(frame.bytes());
        }
    }

    /// Receiver: takes frames written by [`FrameTable::write_fresh`].
    pub fn read_fresh(&mut self, r: &mut Reader<'_>) -> Result<(), SnapshotError> {
        let count = r.u32("frame count")?;
        for _ in 0..count {
            let id = r.u32("frame id")? as usize;
            if id != self.known.len() {
                return Err(SnapshotError::Invalid("frame id"));
            }
            let bytes = bytes::Bytes::copy_from_slice(r.bytes_field("frame")?);
            self.known.push(SharedFrame::new(bytes));
        }
        Ok(())
    }

    /// Receiver: the frame with `id`.
    pub fn frame(&self, id: u32) -> Result<SharedFrame, SnapshotError> {
        self.known
            .get(id as usize)
            .cloned()
            .ok_or(SnapshotError::Invalid("frame reference"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_in_order() {
        let mut w = Writer::new();
        w.u8(7);
        w.bool(true);
        w.u16(0xBEEF);
        w.u32(123_456);
        w.u64(u64::MAX - 1);
        w.str("héllo");
        w.opt_str(None);
        w.opt_str(Some("x"));
        w.bytes_field(&[1, 2, 3]);
        let bytes = w.take();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8("a"), Ok(7));
        assert_eq!(r.bool("b"), Ok(true));
        assert_eq!(r.u16("c"), Ok(0xBEEF));
        assert_eq!(r.u32("d"), Ok(123_456));
        assert_eq!(r.u64("e"), Ok(u64::MAX - 1));
        assert_eq!(r.str("f"), Ok("héllo"));
        assert_eq!(r.opt_str("g"), Ok(None));
        assert_eq!(r.opt_str("h"), Ok(Some("x")));
        assert_eq!(r.bytes_field("i"), Ok(&[1u8, 2, 3][..]));
        assert!(r.is_empty());
    }

    #[test]
    fn truncation_and_bad_values_are_named() {
        let mut w = Writer::new();
        w.str("abcdef");
        let bytes = w.take();
        assert_eq!(
            Reader::new(&bytes[..5]).str("user"),
            Err(SnapshotError::Truncated("user"))
        );
        assert_eq!(
            Reader::new(&[2]).bool("flag"),
            Err(SnapshotError::Invalid("flag"))
        );
        assert_eq!(
            Reader::new(&[1, 0, 0, 0, 0xFF]).str("name"),
            Err(SnapshotError::Invalid("name"))
        );
    }

    #[test]
    fn a_frame_shared_by_many_queues_is_sent_once_and_shared_again() {
        let shared = SharedFrame::new(bytes::Bytes::from(vec![9u8; 4096]));
        let other = SharedFrame::from_static(b"other");
        let mut sender = FrameTable::default();
        let ids: Vec<u32> = [&shared, &shared, &other, &shared]
            .iter()
            .map(|f| sender.id(f))
            .collect();
        assert_eq!(ids, vec![0, 0, 1, 0]);
        let mut w = Writer::new();
        sender.write_fresh(&mut w);
        // Later references to a known frame send nothing again.
        assert_eq!(sender.id(&shared), 0);
        let mut again = Writer::new();
        sender.write_fresh(&mut again);
        assert_eq!(again.len(), 4, "just a zero count");

        let bytes = w.take();
        let mut receiver = FrameTable::default();
        receiver.read_fresh(&mut Reader::new(&bytes)).unwrap();
        let a = receiver.frame(0).unwrap();
        let b = receiver.frame(0).unwrap();
        assert_eq!(a.bytes(), shared.bytes());
        assert!(a.ptr_eq(&b), "rebuilt once, shared");
        assert_eq!(receiver.frame(1).unwrap().bytes(), other.bytes());
        assert!(receiver.frame(2).is_err());
    }
}
