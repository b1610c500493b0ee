//! Streaming UTF-8 validation of text messages (RFC 6455 §8.1). A text message reaches the decoder in chunks
//! (reads and fragments), and a code point may straddle two of them, so up to 3 leading bytes are carried
//! from one chunk to the next.
//!
//! Owns: that carry and the per-chunk check. Does not own: which chunks are text (the decoder), or close
//! reasons, which arrive whole and are checked with `str::from_utf8` (`close`).

use super::ProtocolError;

/// Leading bytes of a code point split across chunks of a text message: `bytes[..len]`. Four bytes inline,
/// so the decoder stays small.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Utf8Carry {
    bytes: [u8; 3],
    len: u8,
}

impl Utf8Carry {
    /// The carried bytes (at most 3), for a snapshot.
    pub(super) fn carried(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// A carry holding `bytes` (at most 3), from a snapshot.
    pub(super) fn with(bytes: &[u8]) -> Option<Utf8Carry> {
        if bytes.len() > 3 {
            return None;
        }
        let mut carry = Utf8Carry::default();
        carry.bytes[..bytes.len()].copy_from_slice(bytes);
        carry.len = bytes.len() as u8;
        Some(carry)
    }

    /// True when no code point is waiting for its continuation bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Validates the next `chunk` of a text message, carrying a code point split across chunks (and so across
    /// fragments). `last` is set on the message's final chunk. §8.1: invalid UTF-8 fails the connection; it is
    /// reported on the chunk holding the first byte that makes it invalid, not at the end of the message.
    pub fn check(&mut self, chunk: &[u8], last: bool) -> Result<(), ProtocolError> {
        let mut rest = chunk;
        if self.len > 0 {
            let have = usize::from(self.len);
            let take = (utf8_width(self.bytes[0]) - have).min(rest.len());
            let mut code_point = [0; 4];
            code_point[..have].copy_from_slice(&self.bytes[..have]);
            code_point[have..have + take].copy_from_slice(&rest[..take]);
            match std::str::from_utf8(&code_point[..have + take]) {
                Ok(_) => self.len = 0,
                // Still a valid prefix: `take` used all of `rest`.
                Err(e) if e.error_len().is_none() => self.keep(&code_point[..have + take]),
                Err(_) => return Err(ProtocolError::InvalidUtf8),
            }
            rest = &rest[take..];
        }
        if let Err(e) = std::str::from_utf8(rest) {
            match e.error_len() {
                // `error_len() == None` means the input ends inside a code point that is valid so far.
                None => self.keep(&rest[e.valid_up_to()..]),
                Some(_) => return Err(ProtocolError::InvalidUtf8),
            }
        }
        // §5.6, §8.1: a text message is UTF-8 as a whole, so it cannot end inside a code point.
        if last && self.len != 0 {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(())
    }

    fn keep(&mut self, partial: &[u8]) {
        debug_assert!((1..=3).contains(&partial.len()));
        self.bytes[..partial.len()].copy_from_slice(partial);
        self.len = partial.len() as u8;
    }
}

/// Length of the UTF-8 sequence a valid lead byte starts (RFC 3629 §4).
fn utf8_width(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::testkit::*;
    use crate::proto::frame::Feed;
    use proptest::prelude::*;

    #[test]
    fn carry_holds_a_split_code_point_until_it_completes() {
        let mut carry = Utf8Carry::default();
        // U+1F600 is F0 9F 98 80, here over three chunks.
        assert_eq!(carry.check(b"a\xF0\x9F", false), Ok(()));
        assert!(!carry.is_empty());
        assert_eq!(carry.check(b"\x98", false), Ok(()));
        assert!(!carry.is_empty());
        assert_eq!(carry.check(b"", false), Ok(()));
        assert_eq!(carry.check(b"\x80b", true), Ok(()));
        assert!(carry.is_empty());
    }

    #[test]
    fn carry_rejects_a_bad_continuation_and_an_unfinished_message() {
        let mut carry = Utf8Carry::default();
        assert_eq!(carry.check(b"\xE2\x82", false), Ok(()));
        assert_eq!(carry.check(b"(", false), Err(ProtocolError::InvalidUtf8));
        let mut carry = Utf8Carry::default();
        assert_eq!(
            carry.check(b"\xE2\x82", true),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    proptest! {
        #[test]
        fn chunked_check_agrees_with_whole_message_validation(
            bytes in prop_oneof![
                ".{0,20}".prop_map(String::into_bytes),
                prop::collection::vec(any::<u8>(), 0..40),
            ],
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut bounds: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            bounds.sort_unstable();
            bounds.push(bytes.len());
            let mut carry = Utf8Carry::default();
            let mut start = 0;
            let mut verdict = Ok(());
            for (n, &end) in bounds.iter().enumerate() {
                verdict = carry.check(&bytes[start..end], n + 1 == bounds.len());
                if verdict.is_err() {
                    break;
                }
                start = end;
            }
            prop_assert_eq!(verdict.is_ok(), std::str::from_utf8(&bytes).is_ok());
        }
    }

    #[test]
    fn invalid_utf8_fails_before_the_message_ends() {
        // Non-final frame whose first chunk already holds an invalid byte: no Data event for it.
        let wire = client(false, TEXT, b"ok \xFF more");
        let (_, events, result) = feed_whole(&wire);
        assert_eq!(result, Err(ProtocolError::InvalidUtf8));
        assert!(events.is_empty());
        // Streamed: the valid first read is delivered, the read holding the bad byte fails.
        let wire = client(true, TEXT, b"hello\xC3\x28world");
        let header = 6;
        let (_, events, result) = feed_cut(&wire, &[header + 5, header + 7], &LIMITS);
        assert_eq!(result, Err(ProtocolError::InvalidUtf8));
        assert_eq!(events, vec![data(true, b"hello", true, false)]);
    }

    #[test]
    fn overlong_and_surrogate_encodings_are_rejected() {
        for bad in [
            &b"\xC0\xAF"[..],
            b"\xE0\x80\xAF",
            b"\xED\xA0\x80",
            b"\xF4\x90\x80\x80",
            b"\xF8",
        ] {
            assert_eq!(
                error_of(&client(true, TEXT, bad)),
                ProtocolError::InvalidUtf8,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn invalid_continuation_of_a_split_code_point_is_rejected() {
        // E2 82 | 28: the code point started in one fragment is broken in the next.
        let wire = [
            client(false, TEXT, b"\xE2\x82"),
            client(true, CONTINUE, b"("),
        ]
        .concat();
        assert_eq!(error_of(&wire), ProtocolError::InvalidUtf8);
    }

    #[test]
    fn text_ending_inside_a_code_point_is_rejected() {
        assert_eq!(
            error_of(&client(true, TEXT, b"a\xE2\x82")),
            ProtocolError::InvalidUtf8
        );
        let wire = [
            client(false, TEXT, b"a\xF0\x9F"),
            client(true, CONTINUE, b"\x98"),
        ]
        .concat();
        assert_eq!(error_of(&wire), ProtocolError::InvalidUtf8);
        // Binary messages are not UTF-8 checked.
        assert_eq!(
            feed_whole(&client(true, BINARY, b"a\xE2\x82")).2,
            Ok(Feed::More)
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_valid() {
        let text = "€😀";
        let bytes = text.as_bytes(); // E2 82 AC F0 9F 98 80
        let wire = [
            client(false, TEXT, &bytes[..1]),
            client(false, CONTINUE, &bytes[1..4]),
            client(false, CONTINUE, &bytes[4..5]),
            client(false, CONTINUE, b""),
            client(false, CONTINUE, &bytes[5..6]),
            client(true, CONTINUE, &bytes[6..]),
        ]
        .concat();
        let (decoder, events, result) = feed_whole(&wire);
        assert_eq!(result, Ok(Feed::More));
        assert_eq!(
            merge(&events),
            vec![Got::Message {
                text: true,
                data: bytes.to_vec()
            }]
        );
        assert!(decoder.is_idle());
    }

    #[test]
    fn ping_between_halves_of_a_split_code_point_is_fine() {
        let wire = [
            client(false, TEXT, b"\xE2\x82"),
            client(true, PING, b"x"),
            client(true, CONTINUE, b"\xAC"),
        ]
        .concat();
        let (_, events, result) = feed_bytewise(&wire);
        assert_eq!(result, Ok(Feed::More));
        assert_eq!(
            merge(&events),
            vec![
                Got::Ping(b"x".to_vec()),
                Got::Message {
                    text: true,
                    data: "€".as_bytes().to_vec()
                }
            ]
        );
    }
}
