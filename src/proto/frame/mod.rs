//! RFC 6455 framing for the server side of a connection: a streaming, sans-IO [`Decoder`] for client frames
//! and encoders for server frames.
//!
//! Owns: frame headers (§5.2), unmasking (§5.3), fragmentation rules (§5.4), control-frame rules (§5.5),
//! close-payload validation (§5.5.1, §7.4), incremental UTF-8 validation of text (§8.1), the message size
//! limit, and the close code for each violation (§7.4.1). This file holds the public vocabulary (limits,
//! events, errors); the parts live beside it: `decode` (the [`Decoder`]), `encode` (server frames), `close`
//! (close payloads and codes), `utf8` (text validation across chunks) and `mask` (unmasking).
//! Does not own: sockets or read buffers, whole messages (data payloads are handed out as chunks, never
//! stored), what to do with events (answering pings, the closing handshake and timers belong to the
//! connection state machine), the opening handshake, or extensions (none are negotiated, so RSV bits are 0).

mod close;
mod decode;
mod encode;
mod mask;
#[cfg(test)]
mod testkit;
mod utf8;

pub use close::{
    check_kick_close, close_code_is_valid, KickCloseError, KICK_CODES, MAX_CLOSE_REASON_BYTES,
};
pub use decode::Decoder;
pub use encode::{
    encode_close, encode_compressed_message, encode_message, encode_message_parts, encode_ping,
    encode_pong, header_len, EMPTY_CLOSE_FRAME, PING_FRAME,
};
pub use utf8::Utf8Carry;

/// Largest control-frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Why the server fails the connection (RFC 6455 §7.1.7), with the close code to send (§7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.reason())]
pub enum ProtocolError {
    /// §5.1: the client did not mask a frame.
    UnmaskedFrame,
    /// §5.2: an RSV bit was set, and no extension that defines it was negotiated (or, with permessage-deflate,
    /// RSV1 on a control frame or a continuation frame, RFC 7692 §6.1).
    ReservedBits,
    /// RFC 7692 §8: a compressed message that does not inflate (invalid DEFLATE data).
    BadCompression,
    /// §5.2: opcode 0x3-0x7 or 0xB-0xF.
    ReservedOpcode,
    /// §5.5: a control frame without FIN.
    FragmentedControl,
    /// §5.5: a control frame longer than [`MAX_CONTROL_PAYLOAD`].
    ControlTooLong,
    /// §5.4: a continuation frame with no fragmented message in progress.
    UnexpectedContinuation,
    /// §5.4: a text or binary frame while a fragmented message is in progress.
    ExpectedContinuation,
    /// §5.2: a 64-bit payload length with its most significant bit set.
    /// (Not in the original API sketch: no other variant describes this violation.)
    InvalidLength,
    /// §5.5.1: a close payload of exactly 1 byte (half a status code).
    InvalidClosePayload,
    /// §7.4: a close code a peer may not send.
    InvalidCloseCode,
    /// §8.1: text (message or close reason) that is not UTF-8.
    InvalidUtf8,
    /// §10.4: the whole message would exceed [`Limits::max_message_bytes`].
    MessageTooBig,
}

impl ProtocolError {
    /// The close code to send when failing the connection for this reason (§7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            // 1007: "data within a message that was not consistent with the type of the message".
            ProtocolError::InvalidUtf8 | ProtocolError::BadCompression => 1007,
            // 1009: "a message that is too big for it to process".
            ProtocolError::MessageTooBig => 1009,
            // 1002: "terminating the connection due to a protocol error".
            _ => 1002,
        }
    }

    /// Short ASCII text (at most 60 bytes) for the reason field of the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            ProtocolError::UnmaskedFrame => "client frame not masked",
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::ReservedOpcode => "reserved opcode",
            ProtocolError::FragmentedControl => "fragmented control frame",
            ProtocolError::ControlTooLong => "control frame payload over 125 bytes",
            ProtocolError::UnexpectedContinuation => "continuation frame outside a message",
            ProtocolError::ExpectedContinuation => "new data frame inside a fragmented message",
            ProtocolError::InvalidLength => "payload length has its top bit set",
            ProtocolError::InvalidClosePayload => "close payload of 1 byte",
            ProtocolError::InvalidCloseCode => "invalid close code",
            ProtocolError::InvalidUtf8 => "invalid UTF-8 in text",
            ProtocolError::MessageTooBig => "message too big",
            ProtocolError::BadCompression => "compressed message does not inflate",
        }
    }
}

/// Limits the decoder enforces; passed to every [`Decoder::feed`] so the decoder does not store them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole data message in bytes, summed over all its fragments (for a compressed message, its
    /// compressed bytes here; whoever inflates it bounds the inflated size the same way).
    pub max_message_bytes: u64,
    /// permessage-deflate was negotiated (RFC 7692 §6): RSV1 on the first frame of a data message marks it
    /// compressed. Per connection: the caller sets it for each feed.
    pub deflate: bool,
}

/// What the decoder found in the input, in wire order. Slices borrow the fed input (unmasked in place) or
/// the decoder's inline control buffer, so they live only for the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// Unmasked ping payload, to be echoed in a pong (§5.5.2).
    Ping(&'a [u8]),
    /// Unmasked pong payload (§5.5.3).
    Pong(&'a [u8]),
    /// A validated close frame (§5.5.1, §7.4); `code` is `None` for an empty payload.
    Close {
        /// Status code, `None` when the close frame had no payload.
        code: Option<u16>,
        /// UTF-8 reason, empty when absent.
        reason: &'a str,
    },
    /// A streamed, unmasked chunk of a data message. `first` is set on the message's first chunk and `last` on
    /// its final one. A chunk is empty only for a zero-length frame that starts or ends a message (so an empty
    /// message is one event with `first` and `last` both set). Text chunks are UTF-8 as a whole message, but a
    /// code point may straddle two chunks.
    Data {
        /// Text (opcode 0x1) rather than binary (0x2) message.
        text: bool,
        /// Unmasked payload bytes.
        chunk: &'a [u8],
        /// First chunk of the message.
        first: bool,
        /// Last chunk of the message.
        last: bool,
        /// The message is compressed (RSV1 on its first frame, RFC 7692 §6): `chunk` is DEFLATE data, not yet
        /// checked as UTF-8 (the inflater's caller checks the inflated text).
        compressed: bool,
    },
}

/// What [`Decoder::feed`] did with its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// All input consumed; feed more when it arrives.
    More,
    /// A Close event was delivered; the rest of the input (and any later input) is ignored.
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_close_codes_and_reasons() {
        let all = [
            ProtocolError::UnmaskedFrame,
            ProtocolError::ReservedBits,
            ProtocolError::ReservedOpcode,
            ProtocolError::FragmentedControl,
            ProtocolError::ControlTooLong,
            ProtocolError::UnexpectedContinuation,
            ProtocolError::ExpectedContinuation,
            ProtocolError::InvalidLength,
            ProtocolError::InvalidClosePayload,
            ProtocolError::InvalidCloseCode,
            ProtocolError::InvalidUtf8,
            ProtocolError::MessageTooBig,
            ProtocolError::BadCompression,
        ];
        for err in all {
            let expected = match err {
                ProtocolError::InvalidUtf8 | ProtocolError::BadCompression => 1007,
                ProtocolError::MessageTooBig => 1009,
                _ => 1002,
            };
            assert_eq!(err.close_code(), expected, "{err:?}");
            let reason = err.reason();
            assert!(
                !reason.is_empty() && reason.len() <= 60 && reason.is_ascii(),
                "{err:?}"
            );
            assert_eq!(err.to_string(), reason);
        }
    }
}
