//! RFC 6455 framing for the server side of a connection: a streaming, sans-IO [`Decoder`] for client frames
//! and encoders for server frames.
//!
//! Owns: frame headers (§5.2), unmasking (§5.3), fragmentation rules (§5.4), control-frame rules (§5.5),
//! close-payload validation (§5.5.1, §7.4), incremental UTF-8 validation of text (§8.1), the message size
//! limit, and the close code for each violation (§7.4.1).
//! Does not own: sockets or read buffers, whole messages (data payloads are handed out as chunks, never
//! stored), what to do with events (answering pings, the closing handshake and timers belong to the
//! connection state machine), the opening handshake, or extensions (none are negotiated, so RSV bits are 0).

use std::mem;

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Largest control-frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest close reason: a close payload is the 2-byte code then the reason (§5.5.1).
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// Why the server fails the connection (RFC 6455 §7.1.7), with the close code to send (§7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.reason())]
pub enum ProtocolError {
    /// §5.1: the client did not mask a frame.
    UnmaskedFrame,
    /// §5.2: an RSV bit was set, and no extension that defines it was negotiated.
    ReservedBits,
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
            ProtocolError::InvalidUtf8 => 1007,
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
        }
    }
}

/// Limits the decoder enforces; passed to every [`Decoder::feed`] so the decoder does not store them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole data message in bytes, summed over all its fragments.
    pub max_message_bytes: u64,
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

/// Where the decoder is inside the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// Reading a header; `buf[..buf_len]` holds the part read so far.
    #[default]
    Header,
    /// Streaming a data frame's payload; `remaining` bytes to go.
    DataPayload,
    /// Collecting a control frame's `remaining` payload bytes; `buf[..buf_len]` holds those already read.
    ControlPayload,
    /// A Close was delivered.
    Closed,
    /// A violation was reported; later feeds report it again.
    Failed(ProtocolError),
}

/// The data message in progress, if any (§5.4: a message may span several frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Message {
    #[default]
    None,
    Text,
    Binary,
}

/// Streaming decoder of client frames.
///
/// Fixed size with no heap: data payloads are streamed straight out of the caller's input, and only what
/// must survive between reads is kept inline: a partial header (at most 14 bytes) or a split control payload
/// (at most 125 bytes, sharing one buffer because a header is complete before its payload starts), and up
/// to 3 bytes of a code point split across chunks. `size_of::<Decoder>()` is 160 bytes on 64-bit targets
/// (checked by a test). Connections box it only while [`Decoder::is_idle`] is false.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// Payload bytes of the current frame not yet consumed.
    remaining: u64,
    /// Bytes announced so far for the current data message, over all its fragments.
    msg_len: u64,
    /// Masking key of the current frame, rotated so `mask[0]` applies to its next payload byte (§5.3).
    mask: [u8; 4],
    phase: Phase,
    msg: Message,
    /// Opcode nibble of the current frame.
    opcode: u8,
    /// FIN bit of the current frame.
    fin: bool,
    /// The next Data event is the first of its message.
    first: bool,
    /// Leading bytes of a code point split across chunks of a text message: `utf8[..utf8_len]`.
    utf8: [u8; 3],
    utf8_len: u8,
    /// Partial header, or partial control payload; see [`Phase`].
    buf_len: u8,
    buf: [u8; MAX_CONTROL_PAYLOAD],
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            remaining: 0,
            msg_len: 0,
            mask: [0; 4],
            phase: Phase::Header,
            msg: Message::None,
            opcode: 0,
            fin: false,
            first: false,
            utf8: [0; 3],
            utf8_len: 0,
            buf_len: 0,
            buf: [0; MAX_CONTROL_PAYLOAD],
        }
    }
}

impl Decoder {
    /// True between messages with no buffered partial bytes: the caller then frees the (boxed) decoder.
    /// False after a Close or an error, so that state is not lost by dropping it.
    pub fn is_idle(&self) -> bool {
        let idle = self.phase == Phase::Header && self.buf_len == 0 && self.msg == Message::None;
        debug_assert!(!idle || (self.utf8_len == 0 && self.msg_len == 0));
        idle
    }

    /// Feed wire bytes (masked as received). Unmasks in place (hence &mut). Calls `on_event` for each event in
    /// order. After a Close event it stops and ignores the rest (returns Ok(Feed::Closed)). Returns Err at the
    /// first violation (events before it were delivered); after an error every feed returns that error.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        limits: &Limits,
        mut on_event: impl FnMut(Event<'_>),
    ) -> Result<Feed, ProtocolError> {
        match self.phase {
            Phase::Closed => return Ok(Feed::Closed),
            Phase::Failed(err) => return Err(err),
            _ => {}
        }
        let result = self.run(input, limits, &mut on_event);
        if let Err(err) = result {
            self.phase = Phase::Failed(err);
        }
        result
    }

    fn run<F: FnMut(Event<'_>)>(
        &mut self,
        mut input: &mut [u8],
        limits: &Limits,
        on_event: &mut F,
    ) -> Result<Feed, ProtocolError> {
        while !input.is_empty() {
            let used = match self.phase {
                Phase::Header => self.read_header(input, limits, on_event)?,
                Phase::DataPayload => {
                    debug_assert!(self.remaining > 0);
                    let n =
                        usize::try_from(self.remaining).map_or(input.len(), |r| r.min(input.len()));
                    self.data_chunk(&mut input[..n], on_event)?;
                    n
                }
                Phase::ControlPayload => self.read_control(input, on_event)?,
                // A Close ends the stream (§5.5.1: no data after Close); `feed` reports a failure itself.
                Phase::Closed | Phase::Failed(_) => break,
            };
            input = &mut mem::take(&mut input)[used..];
        }
        Ok(if self.phase == Phase::Closed {
            Feed::Closed
        } else {
            Feed::More
        })
    }

    /// Buffers header bytes; returns how many of `input` it used. Starts the frame once the header is whole.
    fn read_header<F: FnMut(Event<'_>)>(
        &mut self,
        input: &[u8],
        limits: &Limits,
        on_event: &mut F,
    ) -> Result<usize, ProtocolError> {
        let mut used = 0;
        if self.buf_len < 2 {
            used = self.buffer(input, 2);
            if self.buf_len < 2 {
                return Ok(used);
            }
            // The first two bytes carry every rule that does not need the length or the key, so check them
            // now rather than after up to 12 more bytes (fail fast).
            self.check_fixed_header()?;
        }
        let need = 2 + extended_length_bytes(self.buf[1]) + 4;
        used += self.buffer(&input[used..], need);
        if usize::from(self.buf_len) == need {
            self.buf_len = 0;
            self.start_frame(need, limits, on_event)?;
        }
        Ok(used)
    }

    /// Copies from `input` into `buf` until it holds `upto` bytes; returns how many it copied.
    fn buffer(&mut self, input: &[u8], upto: usize) -> usize {
        let have = usize::from(self.buf_len);
        debug_assert!(have <= upto && upto <= self.buf.len());
        let n = (upto - have).min(input.len());
        self.buf[have..have + n].copy_from_slice(&input[..n]);
        self.buf_len += n as u8; // n <= 125
        n
    }

    /// Checks the first two header bytes, `buf[0]` and `buf[1]`.
    fn check_fixed_header(&self) -> Result<(), ProtocolError> {
        let (b0, b1) = (self.buf[0], self.buf[1]);
        // §5.1: "The server MUST close the connection upon receiving a frame that is not masked."
        if b1 & 0x80 == 0 {
            return Err(ProtocolError::UnmaskedFrame);
        }
        // §5.2: RSV1-3 "MUST be 0 unless an extension is negotiated that defines meanings"; we negotiate none.
        if b0 & 0x70 != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let fin = b0 & 0x80 != 0;
        match OpCode::from(b0 & 0x0F) {
            // §5.2: "If an unknown opcode is received, the receiving endpoint MUST _Fail the WebSocket
            // Connection_."
            OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                Err(ProtocolError::ReservedOpcode)
            }
            OpCode::Control(_) => {
                // §5.5: "All control frames MUST have a payload length of 125 bytes or less and MUST NOT be
                // fragmented." A 7-bit length of 126 or 127 announces an extended (so longer) length.
                if !fin {
                    Err(ProtocolError::FragmentedControl)
                } else if usize::from(b1 & 0x7F) > MAX_CONTROL_PAYLOAD {
                    Err(ProtocolError::ControlTooLong)
                } else {
                    Ok(())
                }
            }
            // §5.4: continuation frames only continue a message started by a text or binary frame without FIN.
            OpCode::Data(Data::Continue) if self.msg == Message::None => {
                Err(ProtocolError::UnexpectedContinuation)
            }
            // §5.4: "fragments of one message MUST NOT be interleaved between fragments of multiple messages".
            OpCode::Data(Data::Text | Data::Binary) if self.msg != Message::None => {
                Err(ProtocolError::ExpectedContinuation)
            }
            OpCode::Data(_) => Ok(()),
        }
    }

    /// Takes in the complete header `buf[..header_len]` (already checked by `check_fixed_header`).
    fn start_frame<F: FnMut(Event<'_>)>(
        &mut self,
        header_len: usize,
        limits: &Limits,
        on_event: &mut F,
    ) -> Result<(), ProtocolError> {
        let b0 = self.buf[0];
        let len = match self.buf[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
            127 => {
                let mut be = [0; 8];
                be.copy_from_slice(&self.buf[2..10]);
                let len = u64::from_be_bytes(be);
                // §5.2: "the most significant bit MUST be 0".
                if len >> 63 != 0 {
                    return Err(ProtocolError::InvalidLength);
                }
                len
            }
            short => u64::from(short),
        };
        // Non-minimal length encodings (§5.2 "the minimal number of bytes MUST be used") are accepted: the
        // RFC binds the sender, and the length is unambiguous either way.
        self.mask
            .copy_from_slice(&self.buf[header_len - 4..header_len]);
        self.fin = b0 & 0x80 != 0;
        self.opcode = b0 & 0x0F;
        self.remaining = len;
        match OpCode::from(self.opcode) {
            OpCode::Control(_) => {
                if len == 0 {
                    self.control_event(&[], on_event)?;
                } else {
                    self.phase = Phase::ControlPayload;
                }
            }
            OpCode::Data(kind) => {
                match kind {
                    Data::Text => self.msg = Message::Text,
                    Data::Binary => self.msg = Message::Binary,
                    _ => {}
                }
                if kind != Data::Continue {
                    self.first = true;
                    self.msg_len = 0;
                }
                // §10.4: endpoints limit message size. The header announces the frame's length, so reject the
                // message now rather than after receiving bytes that would be dropped anyway.
                self.msg_len = self.msg_len.saturating_add(len);
                if self.msg_len > limits.max_message_bytes {
                    return Err(ProtocolError::MessageTooBig);
                }
                if len == 0 {
                    self.data_chunk(&mut [], on_event)?;
                } else {
                    self.phase = Phase::DataPayload;
                }
            }
        }
        Ok(())
    }

    /// Unmasks, validates and hands out `chunk`, the next bytes of the current data frame's payload.
    fn data_chunk<F: FnMut(Event<'_>)>(
        &mut self,
        chunk: &mut [u8],
        on_event: &mut F,
    ) -> Result<(), ProtocolError> {
        debug_assert!(chunk.len() as u64 <= self.remaining);
        unmask(chunk, &mut self.mask);
        self.remaining -= chunk.len() as u64;
        let frame_done = self.remaining == 0;
        let last = frame_done && self.fin;
        let text = self.msg == Message::Text;
        if text {
            self.check_utf8(chunk, last)?;
        }
        // Zero-length continuation frames in the middle of a message carry nothing worth an event.
        if !chunk.is_empty() || self.first || last {
            on_event(Event::Data {
                text,
                chunk,
                first: self.first,
                last,
            });
            self.first = false;
        }
        if frame_done {
            self.phase = Phase::Header;
            if self.fin {
                self.msg = Message::None;
                self.msg_len = 0;
            }
        }
        Ok(())
    }

    /// Validates the next `chunk` of a text message, carrying a code point split across chunks (and so across
    /// fragments) in `utf8`. §8.1: invalid UTF-8 fails the connection; it is reported on the chunk holding
    /// the first byte that makes it invalid, not at the end of the message.
    fn check_utf8(&mut self, chunk: &[u8], last: bool) -> Result<(), ProtocolError> {
        let mut rest = chunk;
        if self.utf8_len > 0 {
            let have = usize::from(self.utf8_len);
            let take = (utf8_width(self.utf8[0]) - have).min(rest.len());
            let mut code_point = [0; 4];
            code_point[..have].copy_from_slice(&self.utf8[..have]);
            code_point[have..have + take].copy_from_slice(&rest[..take]);
            match std::str::from_utf8(&code_point[..have + take]) {
                Ok(_) => self.utf8_len = 0,
                // Still a valid prefix: `take` used all of `rest`.
                Err(e) if e.error_len().is_none() => self.keep_partial(&code_point[..have + take]),
                Err(_) => return Err(ProtocolError::InvalidUtf8),
            }
            rest = &rest[take..];
        }
        if let Err(e) = std::str::from_utf8(rest) {
            match e.error_len() {
                // `error_len() == None` means the input ends inside a code point that is valid so far.
                None => self.keep_partial(&rest[e.valid_up_to()..]),
                Some(_) => return Err(ProtocolError::InvalidUtf8),
            }
        }
        // §5.6, §8.1: a text message is UTF-8 as a whole, so it cannot end inside a code point.
        if last && self.utf8_len != 0 {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(())
    }

    fn keep_partial(&mut self, partial: &[u8]) {
        debug_assert!((1..=3).contains(&partial.len()));
        self.utf8[..partial.len()].copy_from_slice(partial);
        self.utf8_len = partial.len() as u8;
    }

    /// Collects the control payload (`remaining` bytes); returns how many bytes of `input` it used.
    fn read_control<F: FnMut(Event<'_>)>(
        &mut self,
        input: &mut [u8],
        on_event: &mut F,
    ) -> Result<usize, ProtocolError> {
        let len = self.remaining as usize; // <= 125, checked in check_fixed_header
        debug_assert!((1..=MAX_CONTROL_PAYLOAD).contains(&len));
        if self.buf_len == 0 && input.len() >= len {
            // Common case: the whole payload is in this read, so unmask it where it lies.
            let payload = &mut input[..len];
            unmask(payload, &mut self.mask);
            self.control_event(payload, on_event)?;
            return Ok(len);
        }
        let used = self.buffer(input, len);
        if usize::from(self.buf_len) == len {
            self.buf_len = 0;
            let mut payload = [0; MAX_CONTROL_PAYLOAD];
            payload[..len].copy_from_slice(&self.buf[..len]);
            unmask(&mut payload[..len], &mut self.mask);
            self.control_event(&payload[..len], on_event)?;
        }
        Ok(used)
    }

    /// Delivers a complete control frame and ends it.
    fn control_event<F: FnMut(Event<'_>)>(
        &mut self,
        payload: &[u8],
        on_event: &mut F,
    ) -> Result<(), ProtocolError> {
        self.remaining = 0;
        self.phase = Phase::Header;
        match OpCode::from(self.opcode) {
            OpCode::Control(Control::Ping) => on_event(Event::Ping(payload)),
            OpCode::Control(Control::Pong) => on_event(Event::Pong(payload)),
            OpCode::Control(Control::Close) => {
                let (code, reason) = parse_close(payload)?;
                on_event(Event::Close { code, reason });
                self.phase = Phase::Closed;
            }
            other => debug_assert!(false, "not a known control opcode: {other:?}"),
        }
        Ok(())
    }
}

/// Bytes of extended payload length announced by the 7-bit length in header byte 1 (§5.2).
fn extended_length_bytes(b1: u8) -> usize {
    match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
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

/// Splits and validates a close payload (§5.5.1) into code and reason.
fn parse_close(payload: &[u8]) -> Result<(Option<u16>, &str), ProtocolError> {
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
fn close_code_is_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `data` with the masking key (§5.3), 8 bytes at a time, and rotates `mask` so the next bytes of the same
/// frame continue where these stopped.
fn unmask(data: &mut [u8], mask: &mut [u8; 4]) {
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
    let len = payload.len();
    let mut out = Vec::with_capacity(header_len(len) + len);
    out.push(0x80 | u8::from(opcode));
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
    out.extend_from_slice(payload);
    // Vec::with_capacity(n) gives exactly n, and Bytes::from(Vec) keeps the buffer when len == capacity.
    debug_assert_eq!(out.len(), out.capacity());
    Bytes::from(out)
}

/// A whole text or binary message in one unfragmented server frame.
pub fn encode_message(text: bool, payload: &[u8]) -> Bytes {
    let kind = if text { Data::Text } else { Data::Binary };
    encode_frame(OpCode::Data(kind), payload)
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

/// A close frame with `code` and `reason` (§5.5.1). The reason is truncated at a char boundary to fit 123 bytes,
/// so the payload fits a control frame (§5.5).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    debug_assert!(
        close_code_is_valid(code),
        "close code {code} may not be sent"
    );
    let mut end = reason.len().min(MAX_CLOSE_REASON);
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
    use proptest::prelude::*;
    use std::io::Cursor;
    use tungstenite::protocol::frame::{Frame, FrameHeader};

    const LIMITS: Limits = Limits {
        max_message_bytes: 1 << 24,
    };
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    const TEXT: u8 = 0x1;
    const BINARY: u8 = 0x2;
    const CONTINUE: u8 = 0x0;
    const CLOSE: u8 = 0x8;
    const PING: u8 = 0x9;
    const PONG: u8 = 0xA;

    /// An owned copy of an [`Event`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>, String),
        Data {
            text: bool,
            chunk: Vec<u8>,
            first: bool,
            last: bool,
        },
    }

    /// Events with data chunks merged into whole messages, so differently split inputs compare equal.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Got {
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>, String),
        Message { text: bool, data: Vec<u8> },
    }

    fn owned(event: Event<'_>) -> Ev {
        match event {
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong(p) => Ev::Pong(p.to_vec()),
            Event::Close { code, reason } => Ev::Close(code, reason.to_owned()),
            Event::Data {
                text,
                chunk,
                first,
                last,
            } => Ev::Data {
                text,
                chunk: chunk.to_vec(),
                first,
                last,
            },
        }
    }

    /// Merges data chunks, checking the first/last flags frame the messages exactly.
    fn merge(events: &[Ev]) -> Vec<Got> {
        let mut out = Vec::new();
        let mut partial: Option<(bool, Vec<u8>)> = None;
        for event in events {
            match event {
                Ev::Ping(p) => out.push(Got::Ping(p.clone())),
                Ev::Pong(p) => out.push(Got::Pong(p.clone())),
                Ev::Close(code, reason) => out.push(Got::Close(*code, reason.clone())),
                Ev::Data {
                    text,
                    chunk,
                    first,
                    last,
                } => {
                    assert_eq!(*first, partial.is_none(), "first flag wrong in {events:?}");
                    let (kind, data) = partial.get_or_insert_with(|| (*text, Vec::new()));
                    assert_eq!(kind, text);
                    data.extend_from_slice(chunk);
                    if *last {
                        let (text, data) = partial.take().unwrap();
                        out.push(Got::Message { text, data });
                    }
                }
            }
        }
        out
    }

    /// Feeds `wire` in pieces ending at `cuts`, stopping at an error or a close.
    fn feed_cut(
        wire: &[u8],
        cuts: &[usize],
        limits: &Limits,
    ) -> (Decoder, Vec<Ev>, Result<Feed, ProtocolError>) {
        let mut wire = wire.to_vec();
        let mut decoder = Decoder::default();
        let mut events = Vec::new();
        let mut result = Ok(Feed::More);
        let mut start = 0;
        for end in cuts.iter().copied().chain([wire.len()]) {
            let end = end.clamp(start, wire.len());
            result = decoder.feed(&mut wire[start..end], limits, |e| events.push(owned(e)));
            start = end;
            if result != Ok(Feed::More) {
                break;
            }
        }
        (decoder, events, result)
    }

    fn feed_whole(wire: &[u8]) -> (Decoder, Vec<Ev>, Result<Feed, ProtocolError>) {
        feed_cut(wire, &[], &LIMITS)
    }

    fn feed_bytewise(wire: &[u8]) -> (Decoder, Vec<Ev>, Result<Feed, ProtocolError>) {
        let cuts: Vec<usize> = (1..wire.len()).collect();
        feed_cut(wire, &cuts, &LIMITS)
    }

    fn error_of(wire: &[u8]) -> ProtocolError {
        feed_whole(wire)
            .2
            .expect_err("decoder accepted invalid input")
    }

    fn mask_bytewise(data: &mut [u8], mask: [u8; 4]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }

    /// A client frame with first header byte `b0`, masked with `mask` if given; built independently of the
    /// code under test.
    fn raw_frame(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        let mut out = vec![b0];
        match payload.len() {
            n @ 0..=125 => out.push(mask_bit | n as u8),
            n @ 126..=0xFFFF => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mut body = payload.to_vec();
        if let Some(mask) = mask {
            out.extend_from_slice(&mask);
            mask_bytewise(&mut body, mask);
        }
        out.extend_from_slice(&body);
        out
    }

    /// A valid masked client frame.
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        raw_frame(if fin { 0x80 } else { 0 } | opcode, payload, Some(MASK))
    }

    /// A masked client frame built by tungstenite, as an encoder independent of this module.
    fn tungstenite_client(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let opcode = OpCode::from(opcode);
        let mut frame = match opcode {
            OpCode::Data(_) => Frame::message(payload.to_vec(), opcode, fin),
            OpCode::Control(Control::Ping) => Frame::ping(payload.to_vec()),
            OpCode::Control(_) => Frame::pong(payload.to_vec()),
        };
        frame.header_mut().mask = Some(mask);
        let mut out = Vec::new();
        frame.format(&mut out).unwrap();
        out
    }

    fn data(text: bool, chunk: &[u8], first: bool, last: bool) -> Ev {
        Ev::Data {
            text,
            chunk: chunk.to_vec(),
            first,
            last,
        }
    }

    // ---- masking ----

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

    // ---- lengths and encoders ----

    const LENGTHS: [(usize, usize); 5] = [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)];

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
    fn decoder_reads_client_frames_of_each_length_class() {
        for (len, _) in LENGTHS {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let (decoder, events, result) = feed_whole(&client(true, BINARY, &payload));
            assert_eq!(result, Ok(Feed::More), "payload {len}");
            assert_eq!(
                events,
                vec![data(false, &payload, true, true)],
                "payload {len}"
            );
            assert!(decoder.is_idle());
        }
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

    // ---- errors ----

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
        ];
        for err in all {
            let expected = match err {
                ProtocolError::InvalidUtf8 => 1007,
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

    #[test]
    fn unmasked_frame_is_rejected() {
        assert_eq!(
            error_of(&raw_frame(0x81, b"hi", None)),
            ProtocolError::UnmaskedFrame
        );
    }

    #[test]
    fn violations_in_the_first_two_bytes_fail_before_the_rest_of_the_header() {
        let (_, _, result) = feed_whole(&[0x81, 0x05]);
        assert_eq!(result, Err(ProtocolError::UnmaskedFrame));
    }

    #[test]
    fn reserved_bits_are_rejected() {
        for rsv in [0x40, 0x20, 0x10] {
            assert_eq!(
                error_of(&client(true, TEXT | rsv, b"hi")),
                ProtocolError::ReservedBits,
                "{rsv:#x}"
            );
        }
    }

    #[test]
    fn reserved_opcodes_are_rejected() {
        for opcode in (0x3..=0x7).chain(0xB..=0xF) {
            assert_eq!(
                error_of(&client(true, opcode, b"")),
                ProtocolError::ReservedOpcode,
                "{opcode:#x}"
            );
        }
    }

    #[test]
    fn fragmented_control_frame_is_rejected() {
        for opcode in [CLOSE, PING, PONG] {
            assert_eq!(
                error_of(&client(false, opcode, b"")),
                ProtocolError::FragmentedControl
            );
        }
    }

    #[test]
    fn control_payload_over_125_is_rejected() {
        for opcode in [CLOSE, PING, PONG] {
            assert_eq!(
                error_of(&client(true, opcode, &[0; 126])),
                ProtocolError::ControlTooLong
            );
        }
        // 125 is the largest allowed.
        let (_, events, result) = feed_whole(&client(true, PING, &[3; 125]));
        assert_eq!(
            (events, result),
            (vec![Ev::Ping(vec![3; 125])], Ok(Feed::More))
        );
    }

    #[test]
    fn continuation_without_a_message_is_rejected() {
        assert_eq!(
            error_of(&client(true, CONTINUE, b"x")),
            ProtocolError::UnexpectedContinuation
        );
        // Also after a message has finished.
        let wire = [client(true, TEXT, b"a"), client(true, CONTINUE, b"b")].concat();
        assert_eq!(error_of(&wire), ProtocolError::UnexpectedContinuation);
    }

    #[test]
    fn new_data_frame_inside_a_fragmented_message_is_rejected() {
        for opcode in [TEXT, BINARY] {
            let wire = [client(false, BINARY, b"a"), client(true, opcode, b"b")].concat();
            assert_eq!(error_of(&wire), ProtocolError::ExpectedContinuation);
        }
    }

    #[test]
    fn length_with_most_significant_bit_set_is_rejected() {
        let mut wire = vec![0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
        wire.extend_from_slice(&MASK);
        assert_eq!(error_of(&wire), ProtocolError::InvalidLength);
    }

    #[test]
    fn too_big_message_is_rejected_on_its_header() {
        let limits = Limits {
            max_message_bytes: 1000,
        };
        let wire = client(true, BINARY, &[0; 1001]);
        // Only the header: no payload byte is needed to decide.
        let header = &wire[..header_len(1001) + 4];
        let (_, events, result) = feed_cut(header, &[], &limits);
        assert_eq!(result, Err(ProtocolError::MessageTooBig));
        assert!(events.is_empty());
        // Exactly at the limit is fine.
        let (_, _, result) = feed_cut(&client(true, BINARY, &[0; 1000]), &[], &limits);
        assert_eq!(result, Ok(Feed::More));
    }

    #[test]
    fn too_big_message_counts_all_fragments() {
        let limits = Limits {
            max_message_bytes: 10,
        };
        let wire = [
            client(false, TEXT, b"123456"),
            client(true, CONTINUE, b"78901"),
        ]
        .concat();
        let (_, events, result) = feed_cut(&wire, &[], &limits);
        assert_eq!(result, Err(ProtocolError::MessageTooBig));
        assert_eq!(events, vec![data(true, b"123456", true, false)]);
        // The count restarts with each message.
        let wire = [client(true, TEXT, b"123456"), client(true, TEXT, b"78901")].concat();
        assert_eq!(feed_cut(&wire, &[], &limits).2, Ok(Feed::More));
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
    fn errors_are_sticky() {
        let mut decoder = Decoder::default();
        let mut wire = raw_frame(0x81, b"", None);
        assert_eq!(
            decoder.feed(&mut wire, &LIMITS, |_| {}),
            Err(ProtocolError::UnmaskedFrame)
        );
        let mut good = client(true, PING, b"");
        let mut called = false;
        assert_eq!(
            decoder.feed(&mut good, &LIMITS, |_| called = true),
            Err(ProtocolError::UnmaskedFrame)
        );
        assert!(!called && !decoder.is_idle());
    }

    // ---- streaming, fragmentation, control frames ----

    #[test]
    fn empty_text_message_is_one_event() {
        let (_, events, _) = feed_whole(&client(true, TEXT, b""));
        assert_eq!(events, vec![data(true, b"", true, true)]);
    }

    #[test]
    fn empty_middle_fragment_produces_no_event() {
        let wire = [
            client(false, BINARY, b"a"),
            client(false, CONTINUE, b""),
            client(true, CONTINUE, b""),
        ]
        .concat();
        let (_, events, _) = feed_whole(&wire);
        assert_eq!(
            events,
            vec![
                data(false, b"a", true, false),
                data(false, b"", false, true)
            ]
        );
    }

    #[test]
    fn large_frame_is_streamed_in_chunks() {
        let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        let wire = client(true, BINARY, &payload);
        let cuts: Vec<usize> = (1..)
            .map(|i| i * 65536)
            .take_while(|&c| c < wire.len())
            .collect();
        let (_, events, result) = feed_cut(&wire, &cuts, &LIMITS);
        assert_eq!(result, Ok(Feed::More));
        assert_eq!(
            events.len(),
            17,
            "one event per read (the header shifts the last bytes into a 17th read)"
        );
        assert_eq!(
            merge(&events),
            vec![Got::Message {
                text: false,
                data: payload
            }]
        );
    }

    #[test]
    fn control_frames_between_fragments_leave_the_message_intact() {
        let wire = [
            client(false, TEXT, b"hel"),
            client(true, PING, b"p1"),
            client(false, CONTINUE, b"lo "),
            client(true, PONG, b"q"),
            client(true, PING, b""),
            client(true, CONTINUE, b"world"),
            client(true, BINARY, b"\x00"),
        ]
        .concat();
        let (decoder, events, result) = feed_whole(&wire);
        assert_eq!(result, Ok(Feed::More));
        assert_eq!(
            events,
            vec![
                data(true, b"hel", true, false),
                Ev::Ping(b"p1".to_vec()),
                data(true, b"lo ", false, false),
                Ev::Pong(b"q".to_vec()),
                Ev::Ping(vec![]),
                data(true, b"world", false, true),
                data(false, b"\x00", true, true),
            ]
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

    #[test]
    fn bytewise_feeding_yields_the_same_messages_as_whole() {
        let wire = [
            client(true, PING, b"ping"),
            client(false, TEXT, "naïve ".as_bytes()),
            client(true, CONTINUE, "café ☕".as_bytes()),
            client(true, BINARY, &[0xAB; 300]),
            client(true, CLOSE, &[0x03, 0xE8, b'o', b'k']),
        ]
        .concat();
        let (_, whole, whole_result) = feed_whole(&wire);
        let (_, bytewise, bytewise_result) = feed_bytewise(&wire);
        assert_eq!(whole_result, Ok(Feed::Closed));
        assert_eq!(bytewise_result, whole_result);
        assert_eq!(merge(&bytewise), merge(&whole));
        assert_eq!(merge(&whole).len(), 4);
        // Control frames are never split into several events.
        assert_eq!(
            bytewise.iter().filter(|e| matches!(e, Ev::Ping(_))).count(),
            1
        );
    }

    #[test]
    fn control_frame_split_across_feeds_is_delivered_once() {
        let wire = client(true, PING, b"0123456789");
        let (_, events, _) = feed_cut(&wire, &[1, 4, 8, 12], &LIMITS);
        assert_eq!(events, vec![Ev::Ping(b"0123456789".to_vec())]);
    }

    #[test]
    fn input_after_close_is_ignored() {
        let wire = [
            client(true, CLOSE, b""),
            client(true, TEXT, b"late"),
            vec![0xFF, 0x00],
        ]
        .concat();
        let mut decoder = Decoder::default();
        let mut events = Vec::new();
        let mut input = wire.clone();
        let result = decoder.feed(&mut input, &LIMITS, |e| events.push(owned(e)));
        assert_eq!(result, Ok(Feed::Closed));
        assert_eq!(events, vec![Ev::Close(None, String::new())]);
        let mut more = client(true, PING, b"");
        assert_eq!(
            decoder.feed(&mut more, &LIMITS, |e| events.push(owned(e))),
            Ok(Feed::Closed)
        );
        assert_eq!(events.len(), 1);
        assert!(!decoder.is_idle());
    }

    #[test]
    fn is_idle_only_between_messages_with_nothing_buffered() {
        let mut decoder = Decoder::default();
        assert!(decoder.is_idle());
        let step = |bytes: &[u8], decoder: &mut Decoder| {
            let mut bytes = bytes.to_vec();
            assert_eq!(decoder.feed(&mut bytes, &LIMITS, |_| {}), Ok(Feed::More));
            decoder.is_idle()
        };
        let text = client(true, TEXT, b"abc");
        assert!(!step(&text[..1], &mut decoder), "partial header");
        assert!(
            !step(&text[1..6], &mut decoder),
            "header read, payload pending"
        );
        assert!(!step(&text[6..8], &mut decoder), "partial payload");
        assert!(step(&text[8..], &mut decoder), "message complete");
        let ping = client(true, PING, b"xy");
        assert!(!step(&ping[..7], &mut decoder), "partial control payload");
        assert!(step(&ping[7..], &mut decoder), "ping complete");
        assert!(
            !step(&client(false, BINARY, b"a"), &mut decoder),
            "fragmented message in progress"
        );
        assert!(
            !step(&client(true, PING, b""), &mut decoder),
            "ping inside a message"
        );
        assert!(
            step(&client(true, CONTINUE, b"b"), &mut decoder),
            "fragmented message complete"
        );
    }

    #[test]
    fn decoder_is_small() {
        // Documented on `Decoder`: no heap, 160 bytes on 64-bit.
        assert!(
            mem::size_of::<Decoder>() <= 160,
            "{}",
            mem::size_of::<Decoder>()
        );
    }

    // ---- properties ----

    /// One client message: its payload, fragment cut points and the pings to put after each fragment but the last.
    #[derive(Debug, Clone)]
    struct Msg {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<prop::sample::Index>,
        pings: Vec<Option<Vec<u8>>>,
    }

    #[derive(Debug, Clone)]
    enum Item {
        Msg(Msg),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
    }

    fn arb_payload(text: bool) -> BoxedStrategy<Vec<u8>> {
        if text {
            prop_oneof![
                9 => ".{0,60}".prop_map(String::into_bytes),
                1 => (60_000usize..70_000).prop_map(|n| "aé€😀".repeat(n / 10).into_bytes()),
            ]
            .boxed()
        } else {
            prop_oneof![
                9 => prop::collection::vec(any::<u8>(), 0..300),
                1 => (60_000usize..70_000, any::<u8>())
                    .prop_map(|(n, seed)| (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()),
            ]
            .boxed()
        }
    }

    fn arb_control() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..=MAX_CONTROL_PAYLOAD)
    }

    fn arb_item() -> impl Strategy<Value = Item> {
        let msg = any::<bool>().prop_flat_map(|text| {
            (
                arb_payload(text),
                prop::collection::vec(any::<prop::sample::Index>(), 0..4),
                prop::collection::vec(prop::option::of(arb_control()), 4),
            )
                .prop_map(move |(payload, cuts, pings)| {
                    Item::Msg(Msg {
                        text,
                        payload,
                        cuts,
                        pings,
                    })
                })
        });
        prop_oneof![6 => msg, 1 => arb_control().prop_map(Item::Ping), 1 => arb_control().prop_map(Item::Pong)]
    }

    /// Wire bytes (encoded by tungstenite, masked with keys drawn from `seed`) and the messages they hold.
    fn build(items: &[Item], seed: u32) -> (Vec<u8>, Vec<Got>) {
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        let mut key = seed;
        let mut next_mask = || {
            key = key.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            key.to_be_bytes()
        };
        for item in items {
            match item {
                Item::Ping(p) => {
                    wire.extend(tungstenite_client(true, PING, p, next_mask()));
                    expected.push(Got::Ping(p.clone()));
                }
                Item::Pong(p) => {
                    wire.extend(tungstenite_client(true, PONG, p, next_mask()));
                    expected.push(Got::Pong(p.clone()));
                }
                Item::Msg(m) => {
                    let mut bounds: Vec<usize> = m
                        .cuts
                        .iter()
                        .map(|i| i.index(m.payload.len() + 1))
                        .collect();
                    bounds.sort_unstable();
                    bounds.push(m.payload.len());
                    let mut start = 0;
                    for (n, &end) in bounds.iter().enumerate() {
                        let fin = n + 1 == bounds.len();
                        let opcode = match (n, m.text) {
                            (0, true) => TEXT,
                            (0, false) => BINARY,
                            _ => CONTINUE,
                        };
                        wire.extend(tungstenite_client(
                            fin,
                            opcode,
                            &m.payload[start..end],
                            next_mask(),
                        ));
                        start = end;
                        if let (false, Some(Some(p))) = (fin, m.pings.get(n)) {
                            wire.extend(tungstenite_client(true, PING, p, next_mask()));
                            expected.push(Got::Ping(p.clone()));
                        }
                    }
                    expected.push(Got::Message {
                        text: m.text,
                        data: m.payload.clone(),
                    });
                }
            }
        }
        (wire, expected)
    }

    fn cut_points(indices: &[prop::sample::Index], len: usize) -> Vec<usize> {
        let mut cuts: Vec<usize> = indices.iter().map(|i| i.index(len + 1)).collect();
        cuts.sort_unstable();
        cuts
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            splits in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            max in 0u64..1000,
        ) {
            let limits = Limits { max_message_bytes: max };
            let (decoder, _, result) = feed_cut(&bytes, &cut_points(&splits, bytes.len()), &limits);
            if result.is_err() {
                prop_assert!(!decoder.is_idle());
            }
        }

        #[test]
        fn corrupted_streams_never_panic_and_fail_the_same_however_split(
            items in prop::collection::vec(arb_item(), 1..6),
            seed in any::<u32>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            splits in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let (mut wire, _) = build(&items, seed);
            for (at, xor) in flips {
                let at = at.index(wire.len());
                wire[at] ^= xor;
            }
            let (_, whole, whole_result) = feed_cut(&wire, &[], &LIMITS);
            let (_, split, split_result) = feed_cut(&wire, &cut_points(&splits, wire.len()), &LIMITS);
            prop_assert_eq!(split_result, whole_result);
            if whole_result.is_ok() {
                prop_assert_eq!(merge(&split), merge(&whole));
            }
        }

        #[test]
        fn valid_frames_split_anywhere_decode_to_the_same_messages(
            items in prop::collection::vec(arb_item(), 0..8),
            seed in any::<u32>(),
            splits in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
        ) {
            let (wire, expected) = build(&items, seed);
            let (whole_decoder, whole, whole_result) = feed_cut(&wire, &[], &LIMITS);
            prop_assert_eq!(whole_result, Ok(Feed::More));
            prop_assert!(whole_decoder.is_idle());
            prop_assert_eq!(&merge(&whole), &expected);
            let (split_decoder, split, split_result) = feed_cut(&wire, &cut_points(&splits, wire.len()), &LIMITS);
            prop_assert_eq!(split_result, Ok(Feed::More));
            prop_assert!(split_decoder.is_idle());
            prop_assert_eq!(&merge(&split), &expected);
        }
    }
}
