//! A client's compressed messages (permessage-deflate, RFC 7692): inflated once whole, with the reactor
//! thread's shared inflater (`proto::deflate`), never with per-connection compression state.
//!
//! It owns what happens to a compressed message's inflated bytes: counted against
//! `websocket.max_inbound_message_bytes` as they come out of the inflater (a decompression bomb is refused with
//! 1009 after one step of scratch, RFC 6455 §10.4), checked as UTF-8 when it is text (§8.1, RFC 7692 §6), and
//! handed to echo mode whole. Gathering the DEFLATE bytes of a message that straddles reads is the machine's
//! (`Spill::deflated`), like any partial message.

use super::echo::Echo;
use crate::proto::deflate::{self, InflateError};
use crate::proto::frame::{ProtocolError, Utf8Carry};

/// Inflates one whole compressed client message (`deflated`: its payload bytes over all its frames), checks
/// it, and gives it to `echo` when echo mode is on.
pub fn message(
    deflated: &[u8],
    text: bool,
    limit: u64,
    echo: Option<&mut Echo>,
) -> Result<(), ProtocolError> {
    let mut utf8 = Utf8Carry::default();
    let mut bad_text = false;
    let mut whole = Vec::new();
    let result = deflate::inflate(deflated, limit, |chunk| {
        if text && !bad_text && utf8.check(chunk, false).is_err() {
            bad_text = true;
        }
        if echo.is_some() {
            whole.extend_from_slice(chunk);
        }
    });
    match result {
        Err(InflateError::TooBig) => return Err(ProtocolError::MessageTooBig),
        Err(InflateError::Corrupt) => return Err(ProtocolError::BadCompression),
        Ok(_) => {}
    }
    if text && (bad_text || utf8.check(&[], true).is_err()) {
        return Err(ProtocolError::InvalidUtf8);
    }
    if let Some(echo) = echo {
        echo.chunk(text, &whole, true);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_checked_after_inflating() {
        let good = deflate::compress("héllo".as_bytes(), 1);
        assert_eq!(message(&good, true, 100, None), Ok(()));
        let bad = deflate::compress(&[0x68, 0xff, 0x69], 1);
        assert_eq!(
            message(&bad, true, 100, None),
            Err(ProtocolError::InvalidUtf8)
        );
        assert_eq!(
            message(&bad, false, 100, None),
            Ok(()),
            "binary is not text"
        );
        // A code point cut at the end of the message.
        let cut = deflate::compress(&[0x68, 0xc3], 1);
        assert_eq!(
            message(&cut, true, 100, None),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn a_bomb_is_too_big_and_garbage_is_bad_compression() {
        let bomb = deflate::compress(&vec![b'a'; 10 << 20], 9);
        assert_eq!(
            message(&bomb, true, 65_536, None),
            Err(ProtocolError::MessageTooBig)
        );
        assert_eq!(ProtocolError::MessageTooBig.close_code(), 1009);
        assert_eq!(
            message(&[0xff, 0xff, 0xff], false, 100, None),
            Err(ProtocolError::BadCompression)
        );
    }
}
