//! Close frames (RFC 6455 §5.5.1) and their status codes (§7.4): which codes a peer may send, how a received
//! close payload splits into code and reason, and how long a reason may be.
//!
//! Owns: the close-code rules and the one reason limit, [`MAX_CLOSE_REASON_BYTES`]: the encoder truncates to it,
//! and code that takes a reason from outside checks against it. Does not own: the closing handshake (who answers
//! a close, and when), or which code the server picks for a failure (`ProtocolError::close_code`).

use super::{ProtocolError, MAX_CONTROL_PAYLOAD};

/// Longest close reason in bytes: a close payload is the 2-byte code then the UTF-8 reason, and a control
/// frame carries at most [`MAX_CONTROL_PAYLOAD`] bytes (§5.5, §5.5.1).
pub const MAX_CLOSE_REASON_BYTES: usize = MAX_CONTROL_PAYLOAD - 2;

/// Splits and validates a close payload (§5.5.1) into code and reason.
pub(super) fn parse_close(payload: &[u8]) -> Result<(Option<u16>, &str), ProtocolError> {
    match payload {
        // §5.5.1: "The Close frame MAY contain a body".
        [] => Ok((None, "")),
        // §5.5.1: "If there is a body, the first two bytes of the body MUST be a 2-byte unsigned integer".
        [_] => Err(ProtocolError::InvalidClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_is_valid(code) {
                return Err(ProtocolError::InvalidCloseCode);
            }
            // §5.5.1: the reason "is not guaranteed to be human readable" but is UTF-8; §8.1 makes bad UTF-8
            // a 1007.
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok((Some(code), reason))
        }
    }
}

/// Whether a peer may put `code` in a Close frame (§7.4).
///
/// Accepted: 1000-1003 and 1007-1011 (§7.4.1), 1012-1014 (registered with IANA after RFC 6455: service
/// restart, try again later, bad gateway; browsers and servers send them), and 3000-4999 (§7.4.2: libraries,
/// frameworks, applications). Rejected: 0-999 (§7.4.2: "not used"), 1004 (reserved), 1005, 1006 and 1015
/// (§7.4.1: "MUST NOT be set as a status code in a Close control frame"), 1016-2999 (reserved for future
/// RFCs), and 5000 and above (undefined).
pub fn close_code_is_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::testkit::*;
    use crate::proto::frame::{encode_close, Feed};
    use proptest::prelude::*;

    #[test]
    fn parse_close_splits_code_and_reason() {
        assert_eq!(parse_close(b""), Ok((None, "")));
        assert_eq!(parse_close(&[0x03, 0xE8]), Ok((Some(1000), "")));
        assert_eq!(
            parse_close(&[0x0F, 0xA0, b'h', b'i']),
            Ok((Some(4000), "hi"))
        );
        assert_eq!(
            parse_close(&[0x03]),
            Err(ProtocolError::InvalidClosePayload)
        );
        // 1005 means "no status code" and may only be reported locally (§7.4.1).
        assert_eq!(
            parse_close(&[0x03, 0xED]),
            Err(ProtocolError::InvalidCloseCode)
        );
    }

    #[test]
    fn longest_reason_fills_a_control_frame() {
        assert_eq!(2 + MAX_CLOSE_REASON_BYTES, MAX_CONTROL_PAYLOAD);
        let reason = "r".repeat(MAX_CLOSE_REASON_BYTES);
        let frame = encode_close(1000, &reason);
        assert_eq!(parse_close(&frame[2..]), Ok((Some(1000), reason.as_str())));
    }

    fn valid_code() -> impl Strategy<Value = u16> {
        prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999]
    }

    proptest! {
        #[test]
        fn parse_close_never_panics_on_any_control_payload(
            payload in prop::collection::vec(any::<u8>(), 0..=MAX_CONTROL_PAYLOAD),
        ) {
            if let Ok((code, reason)) = parse_close(&payload) {
                prop_assert_eq!(code.is_none(), payload.is_empty());
                prop_assert!(code.is_none_or(close_code_is_valid));
                prop_assert_eq!(reason.len(), payload.len().saturating_sub(2));
            }
        }

        #[test]
        fn encoded_closes_parse_back_with_the_reason_cut_to_the_limit(
            code in valid_code(),
            reason in ".{0,80}",
        ) {
            let frame = encode_close(code, &reason);
            let (parsed_code, parsed_reason) = parse_close(&frame[2..]).unwrap();
            prop_assert_eq!(parsed_code, Some(code));
            prop_assert!(reason.starts_with(parsed_reason));
            prop_assert!(parsed_reason.len() <= MAX_CLOSE_REASON_BYTES);
            if reason.len() <= MAX_CLOSE_REASON_BYTES {
                prop_assert_eq!(parsed_reason, reason.as_str());
            }
        }
    }

    #[test]
    fn close_payload_of_one_byte_is_rejected() {
        assert_eq!(
            error_of(&client(true, CLOSE, &[3])),
            ProtocolError::InvalidClosePayload
        );
    }

    #[test]
    fn close_codes_valid_and_invalid() {
        let valid: [u16; 16] = [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ];
        let invalid: [u16; 13] = [
            0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ];
        for code in valid {
            let (_, events, result) = feed_whole(&client(true, CLOSE, &code.to_be_bytes()));
            assert_eq!(result, Ok(Feed::Closed), "{code}");
            assert_eq!(events, vec![Ev::Close(Some(code), String::new())]);
        }
        for code in invalid {
            assert_eq!(
                error_of(&client(true, CLOSE, &code.to_be_bytes())),
                ProtocolError::InvalidCloseCode,
                "{code}"
            );
        }
    }

    #[test]
    fn close_with_empty_payload_has_no_code() {
        let (_, events, result) = feed_whole(&client(true, CLOSE, b""));
        assert_eq!(
            (events, result),
            (vec![Ev::Close(None, String::new())], Ok(Feed::Closed))
        );
    }

    #[test]
    fn close_reason_is_delivered() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice("bye €".as_bytes());
        let (_, events, _) = feed_whole(&client(true, CLOSE, &payload));
        assert_eq!(events, vec![Ev::Close(Some(1000), "bye €".to_owned())]);
    }

    #[test]
    fn close_reason_with_invalid_utf8_is_rejected() {
        assert_eq!(
            error_of(&client(true, CLOSE, &[0x03, 0xE8, b'a', 0xFF])),
            ProtocolError::InvalidUtf8
        );
    }
}
