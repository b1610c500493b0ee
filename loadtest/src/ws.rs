//! The client side of RFC 6455, as bytes in and bytes out: the upgrade request, the check of the server's 101,
//! decoding of server frames and encoding of masked client frames.
//!
//! It owns wire formats only; it does not read sockets, keep per-connection state or pick mask keys (the caller
//! passes them in). Server frames are small pushes, so decoding borrows from the caller's buffer.

use base64::Engine as _;
use sha1::{Digest, Sha1};
use thiserror::Error;

/// The GUID appended to the key for Sec-WebSocket-Accept (RFC 6455 §1.3).
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest response head we wait for before giving up on it.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// The Sec-WebSocket-Key header value for 16 random bytes (RFC 6455 §4.1, item 7).
pub fn handshake_key(nonce: [u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

/// The Sec-WebSocket-Accept value a server must answer `key` with (RFC 6455 §4.2.2, item 5.4).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The upgrade request (RFC 6455 §4.1): a GET with the upgrade headers; `target` is the path and query.
#[cfg(test)]
pub fn handshake_request(host: &str, target: &str, key: &str) -> Vec<u8> {
    handshake_request_offering(host, target, key, false)
}

/// [`handshake_request`], offering permessage-deflate (RFC 7692) as Chrome does when `deflate`.
pub fn handshake_request_offering(host: &str, target: &str, key: &str, deflate: bool) -> Vec<u8> {
    let offer = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    )
    .into_bytes()
}

/// Inflates one permessage-deflate message (RFC 7692 §7.2.2: the payload plus the `00 00 ff ff` its sender
/// removed), with one inflater per thread, reset per message (the server takes no context over).
pub fn inflate(payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    use flate2::{Decompress, FlushDecompress};
    thread_local! {
        static INFLATER: std::cell::RefCell<Decompress> = std::cell::RefCell::new(Decompress::new(false));
    }
    INFLATER.with(|cell| {
        let mut inflater = cell.borrow_mut();
        inflater.reset(false);
        out.clear();
        out.reserve(payload.len() * 4 + 64);
        for input in [payload, &[0x00, 0x00, 0xff, 0xff][..]] {
            let start = inflater.total_in();
            loop {
                let used = (inflater.total_in() - start) as usize;
                let status = inflater
                    .decompress_vec(&input[used..], out, FlushDecompress::Sync)
                    .map_err(|_| FrameError::Reserved)?;
                let done = (inflater.total_in() - start) as usize == input.len();
                if matches!(status, flate2::Status::StreamEnd)
                    || (done && out.len() < out.capacity())
                {
                    break;
                }
                if out.len() as u64 > MAX_FRAME_PAYLOAD {
                    return Err(FrameError::TooLong);
                }
                out.reserve(out.capacity().max(1024));
            }
        }
        Ok(())
    })
}

/// Why an upgrade did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The server answered with another status (a refusal, e.g. 401 or 503).
    #[error("HTTP status {0}")]
    Status(u16),
    /// 101 without the upgrade headers or with a wrong accept value (RFC 6455 §4.1, client checks 1-4).
    #[error("bad upgrade response: {0}")]
    BadUpgrade(&'static str),
    /// Not HTTP, or a head larger than `MAX_RESPONSE_HEAD`.
    #[error("malformed response")]
    Malformed,
}

/// Checks the server's answer to the upgrade in `buf`. `Ok(None)` means the head is incomplete; `Ok(Some(n))`
/// means the upgrade succeeded and the first `n` bytes were the head (frames may follow in the same buffer).
pub fn parse_handshake_response(buf: &[u8], key: &str) -> Result<Option<usize>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        _ => return Err(HandshakeError::Malformed),
    };
    let status = response.code.ok_or(HandshakeError::Malformed)?;
    // §4.1: anything but 101 means the handshake has not completed; the status says why.
    if status != 101 {
        return Err(HandshakeError::Status(status));
    }
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    // §4.1 client check 2: Upgrade must be "websocket", case-insensitively.
    if !header("Upgrade").is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket")) {
        return Err(HandshakeError::BadUpgrade("Upgrade is not websocket"));
    }
    // §4.1 client check 3: Connection must contain the token "Upgrade".
    if !header("Connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    }) {
        return Err(HandshakeError::BadUpgrade("Connection lacks Upgrade"));
    }
    // §4.1 client check 4: the accept value proves the server read our key.
    if header("Sec-WebSocket-Accept").map(str::trim) != Some(accept_key(key).as_str()) {
        return Err(HandshakeError::BadUpgrade("wrong Sec-WebSocket-Accept"));
    }
    Ok(Some(head_len))
}

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0
    Continuation,
    /// 0x1
    Text,
    /// 0x2
    Binary,
    /// 0x8
    Close,
    /// 0x9
    Ping,
    /// 0xA
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Control frames are close, ping and pong (RFC 6455 §5.5).
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A decoded server frame, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Last fragment of its message.
    pub fin: bool,
    /// What it is.
    pub opcode: OpCode,
    /// RSV1 on a data frame with permessage-deflate negotiated: the payload is compressed.
    pub compressed: bool,
    /// Payload (servers do not mask).
    pub payload: &'a [u8],
}

/// A server frame the client must fail the connection for (RFC 6455 §7.1.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// §5.1: a server must not mask frames it sends to the client.
    #[error("masked server frame")]
    Masked,
    /// §5.2: RSV bits set without a negotiated extension.
    #[error("reserved bits set")]
    Reserved,
    /// §5.2: opcodes 0x3-0x7 and 0xB-0xF are reserved.
    #[error("reserved opcode")]
    BadOpCode,
    /// §5.5: control frames carry at most 125 bytes and are never fragmented.
    #[error("bad control frame")]
    BadControl,
    /// §5.2: the 64-bit length has its most significant bit set, or exceeds what we accept.
    #[error("frame too long")]
    TooLong,
}

/// Largest server frame payload the generator accepts (it publishes small payloads).
pub const MAX_FRAME_PAYLOAD: u64 = 16 * 1024 * 1024;

/// Decodes one frame from the front of `buf`: `Ok(None)` if incomplete, else the frame and its length in bytes.
#[cfg(test)]
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    decode_frame_with(buf, false)
}

/// [`decode_frame`]; with `deflate` (permessage-deflate offered) RSV1 marks a compressed data frame.
pub fn decode_frame_with(
    buf: &[u8],
    deflate: bool,
) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let rsv1_ok = deflate && matches!(b0 & 0x0F, 0x1 | 0x2);
    if b0 & 0x30 != 0 || (b0 & 0x40 != 0 && !rsv1_ok) {
        return Err(FrameError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::BadOpCode)?;
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let (len, header) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut be = [0u8; 8];
            be.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(be);
            // §5.2: the most significant bit of a 64-bit length must be 0.
            if len >> 63 != 0 {
                return Err(FrameError::TooLong);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (len > 125 || !fin) {
        return Err(FrameError::BadControl);
    }
    if len > MAX_FRAME_PAYLOAD {
        return Err(FrameError::TooLong);
    }
    let total = header + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            fin,
            opcode,
            compressed: b0 & 0x40 != 0,
            payload: &buf[header..total],
        },
        total,
    )))
}

/// Appends one complete (FIN) client frame to `out`, masked with `mask` as every client frame must be
/// (RFC 6455 §5.3).
pub fn encode_client_frame(opcode: OpCode, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.push(0x80 | opcode.bits());
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    // §5.3: octet i of the payload is XORed with octet i mod 4 of the key.
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// The payload of a close frame with a status code and no reason (RFC 6455 §5.5.1).
pub fn close_payload(code: u16) -> [u8; 2] {
    code.to_be_bytes()
}

/// The status code in a close frame's payload, if it has one (RFC 6455 §5.5.1).
pub fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key and accept value from RFC 6455 §1.3.
    const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn ok_response(accept: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(accept_key(RFC_KEY), RFC_ACCEPT);
    }

    #[test]
    fn handshake_key_is_base64_of_sixteen_bytes() {
        assert_eq!(handshake_key(*b"the sample nonce"), RFC_KEY);
    }

    #[test]
    fn request_carries_the_upgrade_headers() {
        let req = String::from_utf8(handshake_request("h:1", "/ws?user=u1", RFC_KEY)).unwrap();
        assert!(req.starts_with("GET /ws?user=u1 HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(req.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
        assert!(req.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }

    #[test]
    fn good_101_is_accepted_and_reports_head_length() {
        let mut buf = ok_response(RFC_ACCEPT);
        let head = buf.len();
        buf.extend_from_slice(&[0x81, 0x00]);
        assert_eq!(parse_handshake_response(&buf, RFC_KEY), Ok(Some(head)));
    }

    #[test]
    fn partial_head_waits() {
        let buf = ok_response(RFC_ACCEPT);
        assert_eq!(
            parse_handshake_response(&buf[..buf.len() - 3], RFC_KEY),
            Ok(None)
        );
    }

    #[test]
    fn refusal_reports_its_status() {
        let buf = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            parse_handshake_response(buf, RFC_KEY),
            Err(HandshakeError::Status(503))
        );
    }

    #[test]
    fn wrong_accept_is_rejected() {
        let buf = ok_response("AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        assert!(matches!(
            parse_handshake_response(&buf, RFC_KEY),
            Err(HandshakeError::BadUpgrade(_))
        ));
    }

    #[test]
    fn missing_upgrade_header_is_rejected() {
        let buf = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {RFC_ACCEPT}\r\n\r\n"
        );
        assert!(matches!(
            parse_handshake_response(buf.as_bytes(), RFC_KEY),
            Err(HandshakeError::BadUpgrade(_))
        ));
    }

    #[test]
    fn garbage_response_is_malformed() {
        assert_eq!(
            parse_handshake_response(b"SSH-2.0-OpenSSH\r\n\r\n", RFC_KEY),
            Err(HandshakeError::Malformed)
        );
    }

    #[test]
    fn decodes_short_text_frame() {
        let buf = [0x81, 0x03, b'a', b'b', b'c', 0xFF];
        let (frame, used) = decode_frame(&buf).unwrap().unwrap();
        assert_eq!(used, 5);
        assert_eq!(
            frame,
            Frame {
                fin: true,
                opcode: OpCode::Text,
                compressed: false,
                payload: b"abc"
            }
        );
    }

    #[test]
    fn decodes_16_bit_length() {
        let mut buf = vec![0x82, 126, 0x01, 0x00];
        buf.extend(std::iter::repeat_n(7u8, 256));
        let (frame, used) = decode_frame(&buf).unwrap().unwrap();
        assert_eq!((frame.payload.len(), used), (256, 260));
    }

    #[test]
    fn decodes_64_bit_length() {
        let mut buf = vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0];
        buf.extend(std::iter::repeat_n(1u8, 65536));
        let (frame, used) = decode_frame(&buf).unwrap().unwrap();
        assert_eq!((frame.payload.len(), used), (65536, 65546));
    }

    #[test]
    fn incomplete_frame_waits_at_every_cut() {
        let mut buf = vec![0x82, 126, 0x00, 200];
        buf.extend(std::iter::repeat_n(0u8, 200));
        for cut in 0..buf.len() {
            assert_eq!(decode_frame(&buf[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn masked_server_frame_is_an_error() {
        assert_eq!(
            decode_frame(&[0x81, 0x80, 1, 2, 3, 4]),
            Err(FrameError::Masked)
        );
    }

    #[test]
    fn reserved_bits_and_opcodes_are_errors() {
        assert_eq!(decode_frame(&[0xC1, 0x00]), Err(FrameError::Reserved));
        assert_eq!(decode_frame(&[0x83, 0x00]), Err(FrameError::BadOpCode));
    }

    #[test]
    fn long_or_fragmented_control_frame_is_an_error() {
        assert_eq!(
            decode_frame(&[0x89, 126, 0, 126]),
            Err(FrameError::BadControl)
        );
        assert_eq!(decode_frame(&[0x09, 0x00]), Err(FrameError::BadControl));
    }

    #[test]
    fn length_with_top_bit_is_an_error() {
        let buf = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(decode_frame(&buf), Err(FrameError::TooLong));
    }

    #[test]
    fn client_frame_is_masked_and_unmasks_back() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = Vec::new();
        encode_client_frame(OpCode::Text, b"Hello", mask, &mut out);
        // The masked "Hello" example of RFC 6455 §5.7.
        assert_eq!(
            out,
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
    }

    #[test]
    fn client_frame_uses_extended_lengths() {
        let mut out = Vec::new();
        encode_client_frame(OpCode::Binary, &[0u8; 300], [0; 4], &mut out);
        assert_eq!(&out[..4], &[0x82, 0x80 | 126, 0x01, 0x2C]);
        assert_eq!(out.len(), 4 + 4 + 300);
        let mut big = Vec::new();
        encode_client_frame(OpCode::Binary, &[0u8; 70_000], [0; 4], &mut big);
        assert_eq!(big[1], 0x80 | 127);
        assert_eq!(big.len(), 10 + 4 + 70_000);
    }

    #[test]
    fn close_code_round_trips() {
        assert_eq!(close_code(&close_payload(1001)), Some(1001));
        assert_eq!(close_code(&[]), None);
    }
}
