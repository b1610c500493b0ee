//! Close frames (RFC 6455 §5.5.1) and their status codes (§7.4): which codes a peer may send, which a kick may
//! carry, how a received close payload splits into code and reason, and how long a reason may be.
//!
//! Owns: the close-code rules, the one reason limit, [`MAX_CLOSE_REASON_BYTES`] (the encoder truncates to it),
//! and the one rule for a close that comes from outside, [`check_kick_close`]: every edge that takes a kick (the
//! admin API, the cluster bus) checks it there, so no reactor is ever asked to send a code it may not. Does not
//! own: the closing handshake (who answers a close, and when), or which code the server picks for a failure
//! (`ProtocolError::close_code`).

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

/// The close codes a kick may carry, as the admin API documents them.
pub const KICK_CODES: &str = "1000 or 3000-4999";

/// Why a kick's close may not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KickCloseError {
    /// The code is not one a kick may carry.
    #[error("code {0} is not allowed in a kick: code must be {KICK_CODES}")]
    Code(u16),
    /// The reason does not fit a close frame.
    #[error("reason must be at most {MAX_CLOSE_REASON_BYTES} bytes")]
    ReasonTooLong,
}

/// Whether a close the backend asked for (a kick, from the admin API or from another node over the bus) may
/// be sent: code 1000 (normal closure) or 3000-4999, and a reason that fits a close frame.
///
/// 3000-3999 are registered with IANA for applications and libraries (3000 Unauthorized, 3003 Forbidden, 3008
/// Timeout) and 4000-4999 are for private use (§7.4.2), so a client can tell "the backend removed you" from
/// everything the server says with 1001-1014; clients, the bundled JavaScript client included, stop
/// reconnecting on exactly these codes. 1005, 1006 and 1015 must never be sent at all (§7.4.1).
pub fn check_kick_close(code: u16, reason: &str) -> Result<(), KickCloseError> {
    // 1000 (normal closure) and the application ranges: 3000-3999 registered with IANA (3000 Unauthorized,
    // 3003 Forbidden, 3008 Timeout...), 4000-4999 private (RFC 6455 §7.4.2). Nothing a kick means fits the
    // other protocol codes, and 1005/1006/1015 must never be sent (§7.4.1).
    if !(code == 1000 || (3000..=4999).contains(&code)) {
        return Err(KickCloseError::Code(code));
    }
    debug_assert!(close_code_is_valid(code));
    // A close payload is the 2-byte code and the reason, in a control frame of at most 125 bytes (§5.5).
    if reason.len() > MAX_CLOSE_REASON_BYTES {
        return Err(KickCloseError::ReasonTooLong);
    }
    Ok(())
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
    fn kicks_carry_1000_or_3000_to_4999_only() {
        for code in [1000, 3000, 3003, 3999, 4000, 4001, 4999] {
            assert_eq!(check_kick_close(code, "bye"), Ok(()), "{code}");
        }
        // 1005 and 1006 may never be sent (§7.4.1); the others mean something other than a kick.
        for code in [0, 999, 1001, 1005, 1006, 1011, 1015, 2999, 5000, 65535] {
            assert_eq!(
                check_kick_close(code, ""),
                Err(KickCloseError::Code(code)),
                "{code}"
            );
        }
    }

    #[test]
    fn a_refused_kick_code_names_the_allowed_ones() {
        let message = check_kick_close(1005, "").unwrap_err().to_string();
        assert_eq!(
            message,
            "code 1005 is not allowed in a kick: code must be 1000 or 3000-4999"
        );
    }

    #[test]
    fn kick_reason_must_fit_a_close_frame() {
        let longest = "r".repeat(MAX_CLOSE_REASON_BYTES);
        assert_eq!(check_kick_close(4000, &longest), Ok(()));
        assert_eq!(
            check_kick_close(4000, &format!("{longest}r")),
            Err(KickCloseError::ReasonTooLong)
        );
    }

    proptest! {
        #[test]
        fn every_kick_close_that_passes_may_be_sent(code in any::<u16>()) {
            if check_kick_close(code, "").is_ok() {
                prop_assert!(close_code_is_valid(code));
                prop_assert!(!matches!(code, 1005 | 1006 | 1015));
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
