//! permessage-deflate (RFC 7692) with no per-connection memory: compressing a message once for all its
//! recipients, and inflating a client's message with one inflater per reactor thread.
//!
//! Both directions run without context takeover (negotiated in `handshake`, [`super::handshake::DEFLATE_RESPONSE`]),
//! so each message is a DEFLATE stream of its own (§7.2.1, §7.2.2): the compressor and the inflater are reset per
//! message and can be shared by every connection a thread serves. They live in thread-locals: a reactor, the
//! only caller, is one thread. It does not decide who gets a compressed frame (`reactor`), frame bytes (`frame`)
//! or hold a client's compressed bytes between reads (`conn::machine`).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The empty stored block a sync flush ends with: the sender removes it, the receiver appends it (§7.2.1,
/// §7.2.2).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Bytes of inflated output produced per step: what the reactor's scratch holds, whatever a message inflates to.
pub const INFLATE_STEP_BYTES: usize = 16 << 10;

/// Messages compressed since the process started (every thread), for `/metrics`.
static COMPRESSIONS: AtomicU64 = AtomicU64::new(0);

/// How many payloads [`compress`] has compressed since the process started.
pub fn compressions() -> u64 {
    COMPRESSIONS.load(Relaxed)
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    static INFLATER: RefCell<Option<(Decompress, Box<[u8]>)>> = const { RefCell::new(None) };
}

/// `payload` compressed as one permessage-deflate message at `level` (0-9): raw DEFLATE, sync-flushed, without
/// its trailing `00 00 ff ff` (§7.2.1). An empty payload gives the single `00` byte §7.2.3.6 allows.
pub fn compress(payload: &[u8], level: u32) -> Vec<u8> {
    COMPRESSIONS.fetch_add(1, Relaxed);
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor = match cell.as_mut() {
            Some((l, c)) if *l == level => {
                c.reset();
                c
            }
            _ => {
                &mut cell
                    .insert((level, Compress::new(Compression::new(level), false)))
                    .1
            }
        };
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        loop {
            let read = compressor.total_in() as usize;
            // Compressing into a Vec never fails: errors come only from misuse of the stream.
            let _ = compressor.compress_vec(&payload[read..], &mut out, FlushCompress::Sync);
            if compressor.total_in() as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&SYNC_TAIL) {
            out.truncate(out.len() - SYNC_TAIL.len());
        }
        out
    })
}

/// Why a client's compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the limit (a decompression bomb, or just too big): 1009.
    TooBig,
    /// It is not a valid DEFLATE stream.
    Corrupt,
}

/// Inflates one client message (its payload bytes as they arrived, without the sync tail) with this thread's
/// shared inflater, handing the output to `sink` in steps of at most [`INFLATE_STEP_BYTES`]. Stops with
/// [`InflateError::TooBig`] as soon as the output passes `limit` bytes, so a bomb costs one step of scratch,
/// never its inflated size. Returns the inflated length.
pub fn inflate(
    compressed: &[u8],
    limit: u64,
    mut sink: impl FnMut(&[u8]),
) -> Result<u64, InflateError> {
    INFLATER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (inflater, scratch) = cell.get_or_insert_with(|| {
            (
                Decompress::new(false),
                vec![0u8; INFLATE_STEP_BYTES].into_boxed_slice(),
            )
        });
        inflater.reset(false);
        let mut total = 0u64;
        // The message, then the tail its sender removed.
        for input in [compressed, &SYNC_TAIL[..]] {
            let start = inflater.total_in();
            loop {
                let used = (inflater.total_in() - start) as usize;
                let before = inflater.total_out();
                let status = inflater
                    .decompress(&input[used..], scratch, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                let produced = (inflater.total_out() - before) as usize;
                total += produced as u64;
                if total > limit {
                    return Err(InflateError::TooBig);
                }
                sink(&scratch[..produced]);
                let consumed = (inflater.total_in() - start) as usize == input.len();
                match status {
                    // A final block ended the stream: nothing after it counts (§7.2.2 lets a sender set BFINAL).
                    Status::StreamEnd => return Ok(total),
                    _ if consumed && produced < scratch.len() => break,
                    // No progress with input left: the stream is stuck (truncated or invalid).
                    Status::BufError if produced == 0 && !consumed => {
                        return Err(InflateError::Corrupt)
                    }
                    _ => {}
                }
            }
        }
        Ok(total)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflate_all(compressed: &[u8], limit: u64) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::new();
        inflate(compressed, limit, |chunk| out.extend_from_slice(chunk))?;
        Ok(out)
    }

    #[test]
    fn rfc_7692_example_hello() {
        // §7.2.3.1: "Hello" compressed without context takeover.
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(inflate_all(&hello, 100).unwrap(), b"Hello");
        // §7.2.3.4: the same in a stored (uncompressed) block.
        let stored = [
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        assert_eq!(inflate_all(&stored, 100).unwrap(), b"Hello");
        // §7.2.3.5: with BFINAL set.
        let last = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        assert_eq!(inflate_all(&last, 100).unwrap(), b"Hello");
    }

    #[test]
    fn compress_then_inflate_round_trips_and_the_tail_is_removed() {
        let json = br#"{"type":"notification","id":12345,"title":"New comment on your post","body":"Someone replied to your comment in the thread about compression","url":"https://example.com/posts/987654#comment-12345","ts":1764567890}"#;
        for level in [0, 1, 6, 9] {
            let c = compress(json, level);
            assert!(!c.ends_with(&SYNC_TAIL));
            assert_eq!(inflate_all(&c, 1 << 20).unwrap(), json);
        }
        assert!(compress(json, 1).len() < json.len());
        assert_eq!(compress(b"", 1), vec![0x00], "§7.2.3.6: an empty message");
        assert_eq!(inflate_all(&[0x00], 10).unwrap(), b"");
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(inflate_all(&compress(&big, 1), 1 << 20).unwrap(), big);
    }

    #[test]
    fn a_bomb_stops_at_the_limit_after_one_step() {
        let zeros = vec![0u8; 50 << 20];
        let bomb = compress(&zeros, 9);
        assert!(bomb.len() < 100 << 10);
        let mut seen = 0usize;
        let result = inflate(&bomb, 1 << 20, |chunk| seen += chunk.len());
        assert_eq!(result, Err(InflateError::TooBig));
        assert!(seen <= (1 << 20), "output handed out stops at the limit");
    }

    #[test]
    fn garbage_is_corrupt_and_the_inflater_recovers() {
        assert_eq!(
            inflate_all(&[0xff, 0xff, 0xff, 0x07], 100),
            Err(InflateError::Corrupt)
        );
        assert_eq!(inflate_all(&compress(b"after", 1), 100).unwrap(), b"after");
    }
}
