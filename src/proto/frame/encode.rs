//! Server frames (RFC 6455 §5.2): whole text and binary messages, pings, pongs and closes, each encoded once
//! into a shared [`Bytes`] of exactly its size so one publish can be written to any number of sockets.
//!
//! Owns: the header layout of frames the server sends (FIN set, RSV 0, unmasked, minimal length encoding).
//! Does not own: fragmentation (the server never fragments), when to send a control frame, or decoding.

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use super::close::{close_code_is_valid, MAX_CLOSE_REASON_BYTES};
use super::MAX_CONTROL_PAYLOAD;

/// A ping with no payload (§5.5.2): FIN and opcode 0x9, then length 0, unmasked. The same two bytes serve every
/// connection: send them as `Bytes::from_static(&PING_FRAME)`, which shares them without allocating.
pub static PING_FRAME: [u8; 2] = [0x89, 0x00];

/// A close frame with no payload (§5.5.1: "The Close frame MAY contain a body"): FIN and opcode 0x8, then
/// length 0. The reply to a client close that carried no code; send it as
/// `Bytes::from_static(&EMPTY_CLOSE_FRAME)`.
pub static EMPTY_CLOSE_FRAME: [u8; 2] = [0x88, 0x00];

/// Header length of a server frame with a `payload_len`-byte payload: 7-bit, 16-bit or 64-bit length, no key
/// (§5.2).
pub fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// A server frame: FIN set (the server never fragments), RSV 0, never masked (§5.1: "A server MUST NOT mask
/// any frames"), in one allocation of exactly its size.
fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    encode_frame_with(0, opcode, &[payload])
}

/// A frame with `rsv` (bits 0x40, 0x20, 0x10 of the first byte) set as an extension defines them, whose
/// payload is `parts` one after another: one allocation of exactly its size, each part copied once.
fn encode_frame_with(rsv: u8, opcode: OpCode, parts: &[&[u8]]) -> Bytes {
    let len = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(header_len(len) + len);
    out.push(0x80 | rsv | u8::from(opcode));
    // §5.2: the minimal length encoding.
    match len {
        0..=125 => out.push(len as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    for part in parts {
        out.extend_from_slice(part);
    }
    // Vec::with_capacity(n) gives exactly n, and Bytes::from(Vec) keeps the buffer when len == capacity.
    debug_assert_eq!(out.len(), out.capacity());
    Bytes::from(out)
}

/// A whole text or binary message in one unfragmented server frame.
pub fn encode_message(text: bool, payload: &[u8]) -> Bytes {
    let kind = if text { Data::Text } else { Data::Binary };
    encode_frame(OpCode::Data(kind), payload)
}

/// [`encode_message`] of the concatenation of `parts`, without building it first.
pub fn encode_message_parts(text: bool, parts: &[&[u8]]) -> Bytes {
    let kind = if text { Data::Text } else { Data::Binary };
    encode_frame_with(0, OpCode::Data(kind), parts)
}

/// A whole message compressed by permessage-deflate (`deflated`: the DEFLATE bytes without their final
/// `00 00 ff ff`), in one unfragmented frame with RSV1 set: "the Per-Message Compressed bit" (RFC 7692 §6).
pub fn encode_compressed_message(text: bool, deflated: &[u8]) -> Bytes {
    let kind = if text { Data::Text } else { Data::Binary };
    encode_frame_with(0x40, OpCode::Data(kind), &[deflated])
}

/// A ping. `payload` must be at most [`MAX_CONTROL_PAYLOAD`] bytes (§5.5); longer is truncated in release builds
/// so the frame stays valid.
pub fn encode_ping(payload: &[u8]) -> Bytes {
    debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
    encode_frame(
        OpCode::Control(Control::Ping),
        &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)],
    )
}

/// A pong, normally echoing a ping's payload (§5.5.3). Same length rule as [`encode_ping`].
pub fn encode_pong(payload: &[u8]) -> Bytes {
    debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
    encode_frame(
        OpCode::Control(Control::Pong),
        &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)],
    )
}

/// A close frame with `code` and `reason` (§5.5.1). The reason is truncated at a char boundary to fit
/// [`MAX_CLOSE_REASON_BYTES`] (123), so the payload fits a control frame (§5.5).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    debug_assert!(
        close_code_is_valid(code),
        "close code {code} may not be sent"
    );
    let mut end = reason.len().min(MAX_CLOSE_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    encode_frame(OpCode::Control(Control::Close), &payload[..2 + end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::testkit::LENGTHS;
    use std::io::Cursor;
    use tungstenite::protocol::frame::FrameHeader;

    #[test]
    fn header_len_grows_at_126_and_65536() {
        for (len, header) in LENGTHS {
            assert_eq!(header_len(len), header, "payload {len}");
            let frame = encode_message(false, &vec![7; len]);
            assert_eq!(frame.len(), header + len, "payload {len}");
        }
    }

    #[test]
    fn encode_message_writes_fin_opcode_unmasked_length() {
        let frame = encode_message(true, &[b'a'; 126]);
        assert_eq!(&frame[..4], &[0x81, 126, 0, 126]);
        let frame = encode_message(false, &vec![0; 65536]);
        assert_eq!(&frame[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(&encode_message(true, b"hi")[..], &[0x81, 2, b'h', b'i']);
    }

    #[test]
    fn encoded_frames_parse_with_tungstenite_to_the_same_opcode_and_length() {
        let cases: Vec<(Bytes, OpCode, usize)> = LENGTHS
            .iter()
            .flat_map(|&(len, _)| {
                [
                    (
                        encode_message(true, &vec![b'x'; len]),
                        OpCode::Data(Data::Text),
                        len,
                    ),
                    (
                        encode_message(false, &vec![0; len]),
                        OpCode::Data(Data::Binary),
                        len,
                    ),
                ]
            })
            .chain([
                (encode_ping(b"abc"), OpCode::Control(Control::Ping), 3),
                (encode_pong(&[9; 125]), OpCode::Control(Control::Pong), 125),
                (
                    encode_close(1000, "bye"),
                    OpCode::Control(Control::Close),
                    5,
                ),
            ])
            .collect();
        for (frame, opcode, len) in cases {
            let mut cursor = Cursor::new(&frame[..]);
            let (header, parsed_len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert_eq!(header.opcode, opcode);
            assert_eq!(parsed_len, len as u64);
            assert!(header.is_final && header.mask.is_none());
            assert!(!header.rsv1 && !header.rsv2 && !header.rsv3);
            assert_eq!(cursor.position() as usize, header_len(len));
        }
    }

    #[test]
    fn encoded_buffers_have_exact_capacity_sized_contents() {
        // `Bytes` hides its capacity; its length must equal header + payload with nothing spare.
        assert_eq!(encode_ping(b"").len(), 2);
        assert_eq!(encode_pong(b"12345").len(), 7);
        assert_eq!(&encode_ping(b"p")[..], &[0x89, 1, b'p']);
        assert_eq!(&encode_pong(b"p")[..], &[0x8A, 1, b'p']);
    }

    #[test]
    fn static_frames_are_what_the_encoders_write() {
        assert_eq!(PING_FRAME, [0x89, 0x00]);
        assert_eq!(EMPTY_CLOSE_FRAME, [0x88, 0x00]);
        assert_eq!(&encode_ping(b"")[..], &PING_FRAME);
        let mut cursor = Cursor::new(&EMPTY_CLOSE_FRAME[..]);
        let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        assert_eq!(header.opcode, OpCode::Control(Control::Close));
        assert!(header.is_final && header.mask.is_none() && len == 0);
    }

    #[test]
    fn encode_close_writes_code_then_reason() {
        assert_eq!(
            &encode_close(1001, "away")[..],
            &[0x88, 6, 0x03, 0xE9, b'a', b'w', b'a', b'y']
        );
    }

    #[test]
    fn encode_close_truncates_reason_at_a_char_boundary() {
        // 61 two-byte chars = 122 bytes; the 62nd would end at byte 124 > 123.
        let reason = "é".repeat(70);
        let frame = encode_close(1000, &reason);
        assert_eq!(frame[1] as usize, 2 + 122);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
        let ascii = "a".repeat(200);
        assert_eq!(encode_close(1000, &ascii)[1] as usize, MAX_CONTROL_PAYLOAD);
    }
}
