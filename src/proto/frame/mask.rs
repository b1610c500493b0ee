//! Client-to-server masking (RFC 6455 §5.3): every payload byte a client sends is XORed with a 4-byte key
//! from the frame header, and the decoder undoes it in place, across reads of any size.
//!
//! Owns: the XOR and carrying the key's position from one chunk of a frame to the next. Does not own: reading
//! the key or refusing unmasked frames (the decoder, §5.1), or masking (a server never masks, §5.1).

/// XORs `data` with the masking key (§5.3), 8 bytes at a time, and rotates `mask` so the next bytes of the same
/// frame continue where these stopped.
pub(super) fn unmask(data: &mut [u8], mask: &mut [u8; 4]) {
    let m = *mask;
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut words = data.chunks_exact_mut(8);
    for word in &mut words {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
    }
    // 8 is a multiple of 4, so the tail starts at key offset 0.
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= m[i % 4];
    }
    mask.rotate_left(data.len() % 4);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::testkit::*;
    use crate::proto::frame::Feed;

    #[test]
    fn unmask_matches_bytewise_xor_at_every_length_and_key_offset() {
        let original: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37)).collect();
        for len in 0..original.len() {
            for offset in 0..4 {
                let mut key = MASK;
                key.rotate_left(offset);
                let mut expected = original[..len].to_vec();
                mask_bytewise(&mut expected, key);
                let mut got = original[..len].to_vec();
                let mut rolling = key;
                unmask(&mut got, &mut rolling);
                assert_eq!(got, expected, "len {len} offset {offset}");
                // Masking is an involution: applying the same key again restores the input.
                unmask(&mut got, &mut key);
                assert_eq!(got, &original[..len]);
            }
        }
    }

    #[test]
    fn unmask_continues_the_key_across_chunks() {
        let original: Vec<u8> = (0..100u8).collect();
        let mut expected = original.clone();
        mask_bytewise(&mut expected, MASK);
        for split in [1, 3, 7, 8, 9, 13, 50] {
            let mut got = original.clone();
            let mut key = MASK;
            let (a, rest) = got.split_at_mut(split);
            unmask(a, &mut key);
            let (b, c) = rest.split_at_mut(5);
            unmask(b, &mut key);
            unmask(c, &mut key);
            assert_eq!(got, expected, "split at {split}");
        }
    }

    #[test]
    fn decoder_unmasks_a_frame_masked_by_tungstenite() {
        let payload: Vec<u8> = (0..=255u8).collect();
        let wire = tungstenite_client(true, BINARY, &payload, [1, 2, 3, 4]);
        let (_, events, result) = feed_whole(&wire);
        assert_eq!(result, Ok(Feed::More));
        assert_eq!(events, vec![data(false, &payload, true, true)]);
    }
}
