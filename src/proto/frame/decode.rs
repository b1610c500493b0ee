//! The streaming decoder of client frames: turns masked wire bytes, in reads of any size, into [`Event`]s in
//! wire order, enforcing RFC 6455 §5 as it goes and failing at the first violation with a [`ProtocolError`].
//!
//! Owns: the per-connection decoding state (a partial header, a split control payload, where it is in a frame
//! and a message), the header checks (§5.1, §5.2, §5.4, §5.5) and the message size limit (§10.4). Does not own:
//! the rules for close payloads (`close`), text (`utf8`) or masking (`mask`), which it applies, nor encoding.

use std::mem;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use super::close::parse_close;
use super::mask::unmask;
use super::utf8::Utf8Carry;
use super::{Event, Feed, Limits, ProtocolError, MAX_CONTROL_PAYLOAD};

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
    /// The message in progress is compressed (RFC 7692: RSV1 on its first frame).
    compressed: bool,
    /// The next Data event is the first of its message.
    first: bool,
    /// Leading bytes of a code point split across chunks of a text message.
    utf8: Utf8Carry,
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
            compressed: false,
            first: false,
            utf8: Utf8Carry::default(),
            buf_len: 0,
            buf: [0; MAX_CONTROL_PAYLOAD],
        }
    }
}

impl Decoder {
    /// Writes a decoder that is in the middle of a frame or a message, for a successor process; returns false
    /// (writing nothing) after a Close or a violation, when the connection is ending and nothing more is read.
    pub fn snapshot(&self, w: &mut crate::snapshot::Writer) -> bool {
        let phase = match self.phase {
            Phase::Header => 0,
            Phase::DataPayload => 1,
            Phase::ControlPayload => 2,
            Phase::Closed | Phase::Failed(_) => return false,
        };
        w.u8(phase);
        w.u64(self.remaining);
        w.u64(self.msg_len);
        w.raw(&self.mask);
        // A compressed message in progress (permessage-deflate) adds 2: values a snapshot without compression
        // never has, so one written before compression existed still reads the same.
        w.u8(match self.msg {
            Message::None => 0,
            Message::Text => 1,
            Message::Binary => 2,
        } + if self.compressed { 2 } else { 0 });
        w.u8(self.opcode);
        w.bool(self.fin);
        w.bool(self.first);
        w.bytes_field(self.utf8.carried());
        w.bytes_field(&self.buf[..usize::from(self.buf_len)]);
        true
    }

    /// A decoder written by [`Decoder::snapshot`].
    pub fn restore(
        r: &mut crate::snapshot::Reader<'_>,
    ) -> Result<Decoder, crate::snapshot::SnapshotError> {
        use crate::snapshot::SnapshotError::Invalid;
        let phase = match r.u8("decoder phase")? {
            0 => Phase::Header,
            1 => Phase::DataPayload,
            2 => Phase::ControlPayload,
            _ => return Err(Invalid("decoder phase")),
        };
        let remaining = r.u64("decoder remaining")?;
        let msg_len = r.u64("decoder message length")?;
        let mask = r.raw(4, "decoder mask")?.try_into().expect("4 bytes");
        let (msg, compressed) = match r.u8("decoder message")? {
            0 => (Message::None, false),
            1 => (Message::Text, false),
            2 => (Message::Binary, false),
            3 => (Message::Text, true),
            4 => (Message::Binary, true),
            _ => return Err(Invalid("decoder message")),
        };
        let opcode = r.u8("decoder opcode")?;
        let fin = r.bool("decoder fin")?;
        let first = r.bool("decoder first")?;
        let utf8 =
            Utf8Carry::with(r.bytes_field("decoder utf8")?).ok_or(Invalid("decoder utf8"))?;
        let partial = r.bytes_field("decoder buffer")?;
        if partial.len() > MAX_CONTROL_PAYLOAD {
            return Err(Invalid("decoder buffer"));
        }
        let mut decoder = Decoder {
            remaining,
            msg_len,
            mask,
            phase,
            msg,
            opcode,
            fin,
            compressed,
            first,
            utf8,
            buf_len: partial.len() as u8,
            ..Decoder::default()
        };
        decoder.buf[..partial.len()].copy_from_slice(partial);
        Ok(decoder)
    }

    /// True between messages with no buffered partial bytes: the caller then frees the (boxed) decoder.
    /// False after a Close or an error, so that state is not lost by dropping it.
    pub fn is_idle(&self) -> bool {
        let idle = self.phase == Phase::Header && self.buf_len == 0 && self.msg == Message::None;
        debug_assert!(!idle || (self.utf8.is_empty() && self.msg_len == 0));
        idle
    }

    /// Whether a compressed message (permessage-deflate) is in progress: its DEFLATE bytes so far are kept by
    /// the caller until its last frame.
    pub fn in_compressed_message(&self) -> bool {
        self.msg != Message::None && self.compressed
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
            self.check_fixed_header(limits)?;
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
    fn check_fixed_header(&self, limits: &Limits) -> Result<(), ProtocolError> {
        let (b0, b1) = (self.buf[0], self.buf[1]);
        // §5.1: "The server MUST close the connection upon receiving a frame that is not masked."
        if b1 & 0x80 == 0 {
            return Err(ProtocolError::UnmaskedFrame);
        }
        // §5.2: RSV1-3 "MUST be 0 unless an extension is negotiated that defines meanings". permessage-deflate
        // defines RSV1 only on the first frame of a data message (RFC 7692 §6: "An endpoint MUST NOT set the
        // Per-Message Compressed bit of control frames and non-first fragments of a data message"; §6.1: the
        // receiver fails the connection on one).
        let rsv1_allowed = limits.deflate
            && matches!(
                OpCode::from(b0 & 0x0F),
                OpCode::Data(Data::Text | Data::Binary)
            );
        if b0 & 0x30 != 0 || (b0 & 0x40 != 0 && !rsv1_allowed) {
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
                    self.compressed = b0 & 0x40 != 0;
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
        // A compressed message's text is checked after it is inflated, by the inflater's caller.
        if text && !self.compressed {
            self.utf8.check(chunk, last)?;
        }
        // Zero-length continuation frames in the middle of a message carry nothing worth an event.
        if !chunk.is_empty() || self.first || last {
            on_event(Event::Data {
                text,
                chunk,
                first: self.first,
                last,
                compressed: self.compressed,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::header_len;
    use crate::proto::frame::testkit::*;
    use proptest::prelude::*;

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

    // ---- errors ----

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

    /// Feeds `wire` with permessage-deflate negotiated; the events and the result.
    fn feed_deflate(wire: &[u8]) -> (Vec<(bool, bool)>, Result<Feed, ProtocolError>) {
        let limits = Limits {
            max_message_bytes: 1 << 20,
            deflate: true,
        };
        let mut input = wire.to_vec();
        let mut seen = Vec::new();
        let result = Decoder::default().feed(&mut input, &limits, |e| {
            if let Event::Data {
                compressed, last, ..
            } = e
            {
                seen.push((compressed, last));
            }
        });
        (seen, result)
    }

    #[test]
    fn with_deflate_rsv1_marks_a_compressed_message_and_nothing_else() {
        // RFC 7692 §7.2.3.1 "Hello", compressed, RSV1 on a text frame: not UTF-8 checked here.
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        let (seen, result) = feed_deflate(&client(true, TEXT | 0x40, &hello));
        assert_eq!(result, Ok(Feed::More));
        assert_eq!(seen, vec![(true, true)]);
        // Fragmented: RSV1 on the first frame only; the continuation carries the flag along.
        let mut wire = client(false, TEXT | 0x40, &hello[..3]);
        wire.extend(client(true, 0x0, &hello[3..]));
        let (seen, result) = feed_deflate(&wire);
        assert_eq!(result, Ok(Feed::More));
        assert_eq!(seen, vec![(true, false), (true, true)]);
        // An uncompressed message still is checked as UTF-8.
        let (seen, _) = feed_deflate(&client(true, TEXT, b"hi"));
        assert_eq!(seen, vec![(false, true)]);
    }

    #[test]
    fn with_deflate_rsv1_on_control_or_continuation_frames_is_a_protocol_error() {
        // RFC 7692 §6.1.
        for frame in [client(true, 0x9 | 0x40, b""), client(true, 0x8 | 0x40, b"")] {
            assert_eq!(feed_deflate(&frame).1, Err(ProtocolError::ReservedBits));
        }
        let mut wire = client(false, BINARY, b"ab");
        wire.extend(client(true, 0x40, b"cd"));
        assert_eq!(feed_deflate(&wire).1, Err(ProtocolError::ReservedBits));
        // RSV2 and RSV3 stay reserved.
        for rsv in [0x20, 0x10] {
            assert_eq!(
                feed_deflate(&client(true, TEXT | rsv, b"hi")).1,
                Err(ProtocolError::ReservedBits)
            );
        }
        assert_eq!(ProtocolError::ReservedBits.close_code(), 1002);
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
            deflate: false,
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
            deflate: false,
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
            let limits = Limits { max_message_bytes: max, deflate: false };
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

        #[test]
        fn a_decoder_moved_to_another_process_at_any_split_decodes_the_same(
            items in prop::collection::vec(arb_item(), 0..8),
            seed in any::<u32>(),
            splits in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
        ) {
            let (mut wire, expected) = build(&items, seed);
            let mut decoder = Decoder::default();
            let mut events = Vec::new();
            let mut start = 0;
            for end in cut_points(&splits, wire.len()).into_iter().chain([wire.len()]) {
                let end = end.max(start);
                let result = decoder.feed(&mut wire[start..end], &LIMITS, |e| events.push(owned(e)));
                prop_assert_eq!(result, Ok(Feed::More));
                start = end;
                // The live upgrade: snapshot, then carry on with the restored copy only.
                let mut w = crate::snapshot::Writer::new();
                prop_assert!(decoder.snapshot(&mut w));
                decoder = Decoder::restore(&mut crate::snapshot::Reader::new(w.bytes())).unwrap();
            }
            prop_assert!(decoder.is_idle());
            prop_assert_eq!(&merge(&events), &expected);
        }
    }
}
