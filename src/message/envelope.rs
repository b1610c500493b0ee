//! The bytes a recovering client receives: message envelopes and `resync` notices, and the `since` positions
//! it sends back when it reconnects. Sans-IO.
//!
//! Owns the exact wire format documented in the README ("Missed-message recovery"); it does not frame (the
//! caller wraps the returned payload with `frame::encode_message`), store or deliver anything.
//!
//! - Text message: a JSON object `{"s":STREAM,"e":EPOCH,"o":OFFSET,"d":PAYLOAD}` in a text frame, PAYLOAD the
//!   published text as a JSON string. A stream without history gets `{"s":STREAM,"d":PAYLOAD}`.
//! - Binary message: in a binary frame, `version (u8 = 1) | stream length (u16 BE) | stream | epoch length (u8)
//!   | epoch | offset (u64 BE) | payload`. A stream without history has an empty epoch and offset 0.
//! - Resync: a text frame `{"type":"resync","s":STREAM,"e":EPOCH,"o":OFFSET}`; `e` is `""` when the server holds
//!   no history for the stream (its next message starts a new epoch).

use crate::proto::frame;
use bytes::Bytes;
use std::borrow::Cow;

/// Version byte of the binary envelope.
pub const BINARY_VERSION: u8 = 1;

/// Most positions one `since` parameter may carry; more are ignored (a connection has one user stream, at most
/// `auth.max_channels` channels and `all`, so honest clients never come near it).
pub const MAX_POSITIONS: usize = 64;

/// Where a message sits in its stream, when the stream keeps history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp<'a> {
    /// The stream's epoch.
    pub epoch: &'a str,
    /// The message's offset, from 1.
    pub offset: u64,
}

/// The envelope payload (not yet framed) of a message published to `stream`. `text` payloads must be UTF-8
/// (the admin API checked it); a non-UTF-8 one is encoded lossily rather than panicking.
pub fn encode(stream: &str, stamp: Option<Stamp<'_>>, text: bool, payload: &[u8]) -> Vec<u8> {
    let framed = prepare(stream, text, payload).finish(stamp, payload);
    frame_payload(&framed).to_vec()
}

/// An envelope with everything but its place: for text, the stream and the payload already escaped as JSON
/// strings, which is the costly part for a large payload. History prepares it before taking its lock, so the
/// lock is held only while [`Prepared::finish`] copies it into place (one allocation, one copy), not while a
/// megabyte is escaped.
#[derive(Debug)]
pub struct Prepared {
    text: bool,
    /// Text: the stream as a JSON string. Binary: the stream's bytes.
    stream: String,
    /// Text: the payload as a JSON string. Binary: empty (the payload is copied as it is).
    data: String,
}

/// Prepares the envelope of a message to `stream` (see [`Prepared`]).
pub fn prepare(stream: &str, text: bool, payload: &[u8]) -> Prepared {
    if text {
        let mut quoted = String::with_capacity(stream.len() + 2);
        push_json_str(&mut quoted, stream);
        let mut data = String::with_capacity(payload.len() + 2);
        push_json_str(&mut data, &String::from_utf8_lossy(payload));
        return Prepared {
            text,
            stream: quoted,
            data,
        };
    }
    Prepared {
        text,
        stream: stream.to_owned(),
        data: String::new(),
    }
}

impl Prepared {
    /// The envelope at `stamp`, as a whole WebSocket frame; `payload` is the one it was prepared from.
    pub fn finish(&self, stamp: Option<Stamp<'_>>, payload: &[u8]) -> Bytes {
        if self.text {
            let mut head = String::with_capacity(self.stream.len() + 64);
            head.push_str("{\"s\":");
            head.push_str(&self.stream);
            if let Some(stamp) = stamp {
                head.push_str(",\"e\":");
                push_json_str(&mut head, stamp.epoch);
                head.push_str(",\"o\":");
                head.push_str(&stamp.offset.to_string());
            }
            head.push_str(",\"d\":");
            let parts: [&[u8]; 3] = [head.as_bytes(), self.data.as_bytes(), b"}"];
            return frame::encode_message_parts(true, &parts);
        }
        let (epoch, offset) = stamp.map_or(("", 0), |s| (s.epoch, s.offset));
        debug_assert!(self.stream.len() <= u16::MAX as usize && epoch.len() <= u8::MAX as usize);
        let stream = &self.stream.as_bytes()[..self.stream.len().min(u16::MAX as usize)];
        let epoch = &epoch.as_bytes()[..epoch.len().min(u8::MAX as usize)];
        let mut head = Vec::with_capacity(12 + stream.len() + epoch.len());
        head.push(BINARY_VERSION);
        head.extend_from_slice(&(stream.len() as u16).to_be_bytes());
        head.extend_from_slice(stream);
        head.push(epoch.len() as u8);
        head.extend_from_slice(epoch);
        head.extend_from_slice(&offset.to_be_bytes());
        frame::encode_message_parts(false, &[&head, payload])
    }
}

/// The payload of a `resync` notice (a text frame).
pub fn encode_resync(stream: &str, epoch: &str, offset: u64) -> Vec<u8> {
    let mut out = String::with_capacity(stream.len() + epoch.len() + 48);
    out.push_str("{\"type\":\"resync\",\"s\":");
    push_json_str(&mut out, stream);
    out.push_str(",\"e\":");
    push_json_str(&mut out, epoch);
    out.push_str(",\"o\":");
    out.push_str(&offset.to_string());
    out.push('}');
    out.into_bytes()
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json escapes exactly what JSON requires (RFC 8259 §7); serialising a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

/// The payload of a WebSocket frame this server built (unmasked, RFC 6455 §5.2): the bytes after its header.
pub fn frame_payload(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(header..).unwrap_or(&[])
}

/// The published payload inside an envelope payload built by [`encode`]; `None` if it is not one.
pub fn decode_payload(envelope: &[u8], text: bool) -> Option<Vec<u8>> {
    if text {
        let value: serde_json::Value = serde_json::from_slice(envelope).ok()?;
        return Some(value.get("d")?.as_str()?.as_bytes().to_vec());
    }
    let (&version, rest) = envelope.split_first()?;
    if version != BINARY_VERSION {
        return None;
    }
    let stream_len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let rest = rest.get(2 + stream_len..)?;
    let (&epoch_len, rest) = rest.split_first()?;
    Some(rest.get(epoch_len as usize + 8..)?.to_vec())
}

/// A client's position in one stream: the last offset it has seen in that epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// `user:{user}`, `channel:{name}` or `all`.
    pub stream: String,
    /// The epoch the offset belongs to.
    pub epoch: String,
    /// The last offset received (0 = none yet).
    pub offset: u64,
}

/// Parses the raw (still percent-encoded) value of `since`: comma-separated `STREAM@EPOCH:OFFSET` items.
/// Each item is split on the raw commas first and percent-decoded afterwards, so a stream name containing `,`
/// is sent as `%2C`. The epoch and offset are taken from the right, so stream names may contain `@` and `:`.
/// Malformed items are skipped (the client then gets no replay for that stream, only live messages and what
/// its own refetch brings); at most [`MAX_POSITIONS`] are read.
///
/// One position per stream: when a stream is named more than once, the last item wins, in the place of the
/// first. Each position is a replay, so duplicates would send the same messages again (five copies of one
/// position replayed a stream five times). Last-wins rather than refusing the upgrade with 400, for the same
/// reason malformed items are skipped rather than refused: a client that sends a bad `since` still gets its
/// connection and live messages, instead of a refusal it would retry in a loop; and "the later value wins"
/// is how repeated query parameters usually read.
pub fn parse_since(raw: &str) -> Vec<Position> {
    let mut positions: Vec<Position> = Vec::new();
    let parsed = raw
        .split(',')
        .filter(|item| !item.is_empty())
        .take(MAX_POSITIONS)
        .filter_map(|item| {
            let item = decode(item)?;
            let (rest, offset) = item.rsplit_once(':')?;
            let (stream, epoch) = rest.rsplit_once('@')?;
            let offset = offset.parse().ok()?;
            if stream.is_empty() || !epoch.chars().all(|c| c.is_ascii_alphanumeric()) {
                return None;
            }
            Some(Position {
                stream: stream.to_owned(),
                epoch: epoch.to_owned(),
                offset,
            })
        });
    for position in parsed {
        // At most MAX_POSITIONS items, so the linear search is at most 64 × 64 comparisons.
        match positions.iter_mut().find(|p| p.stream == position.stream) {
            Some(earlier) => *earlier = position,
            None => positions.push(position),
        }
    }
    positions
}

fn decode(item: &str) -> Option<Cow<'_, str>> {
    // `+` stays `+` here: it is only a space in form encoding, and stream names are path-like.
    percent_encoding::percent_decode_str(item)
        .decode_utf8()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_envelope_is_compact_json_with_the_payload_as_a_string() {
        let stamp = Stamp {
            epoch: "Ab3xYz12",
            offset: 17,
        };
        let bytes = encode("user:42", Some(stamp), true, b"he said \"hi\"\n");
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(
            text,
            r#"{"s":"user:42","e":"Ab3xYz12","o":17,"d":"he said \"hi\"\n"}"#
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["d"], "he said \"hi\"\n");
    }

    #[test]
    fn text_envelope_without_history_has_no_epoch_or_offset() {
        let text = String::from_utf8(encode("channel:news", None, true, b"x")).unwrap();
        assert_eq!(text, r#"{"s":"channel:news","d":"x"}"#);
    }

    #[test]
    fn binary_envelope_layout() {
        let stamp = Stamp {
            epoch: "EP",
            offset: 258,
        };
        let bytes = encode("all", Some(stamp), false, &[0xff, 0x00]);
        assert_eq!(
            bytes,
            [1, 0, 3, b'a', b'l', b'l', 2, b'E', b'P', 0, 0, 0, 0, 0, 0, 1, 2, 0xff, 0x00]
        );
    }

    #[test]
    fn payloads_come_back_out_of_envelopes() {
        let stamp = Some(Stamp {
            epoch: "E",
            offset: 3,
        });
        let text = encode("user:1", stamp, true, "ünï \"q\"".as_bytes());
        assert_eq!(decode_payload(&text, true).unwrap(), "ünï \"q\"".as_bytes());
        let bin = encode("user:1", stamp, false, &[9, 8, 7]);
        assert_eq!(decode_payload(&bin, false).unwrap(), [9, 8, 7]);
        assert_eq!(decode_payload(&[2, 0], false), None);
    }

    #[test]
    fn frame_payload_skips_every_header_length() {
        assert_eq!(frame_payload(&[0x81, 2, b'h', b'i']), b"hi");
        let mut long = vec![0x82, 126, 1, 0];
        long.extend(vec![7u8; 256]);
        assert_eq!(frame_payload(&long).len(), 256);
        assert_eq!(frame_payload(&[]), b"");
    }

    #[test]
    fn resync_names_stream_epoch_and_offset() {
        let text = String::from_utf8(encode_resync("user:a\"b", "E1", 9)).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["type"], "resync");
        assert_eq!(value["s"], "user:a\"b");
        assert_eq!(value["e"], "E1");
        assert_eq!(value["o"], 9);
    }

    #[test]
    fn since_parses_several_positions() {
        let got = parse_since("user:42@EPOCH1:17,channel:news@X9:230,all@Q:0");
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0],
            Position {
                stream: "user:42".into(),
                epoch: "EPOCH1".into(),
                offset: 17
            }
        );
        assert_eq!(got[1].stream, "channel:news");
        assert_eq!(got[1].offset, 230);
        assert_eq!(got[2].stream, "all");
    }

    #[test]
    fn since_stream_names_may_hold_encoded_commas_and_literal_at_signs() {
        let got = parse_since("channel:a%2Cb@E:1,user:me@home@E2:3");
        assert_eq!(got[0].stream, "channel:a,b");
        assert_eq!(got[1].stream, "user:me@home");
        assert_eq!(got[1].epoch, "E2");
    }

    #[test]
    fn since_skips_malformed_items() {
        let got = parse_since("user:1@E:x,nope,user:2@E:5,@E:1,user:3@bad-epoch:1");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].stream, "user:2");
    }

    #[test]
    fn since_keeps_one_position_per_stream_the_last_one() {
        let got = parse_since("user:1@E:3,channel:a@F:1,user:1@E:3,user:1@E:7,channel:a@G:2");
        assert_eq!(
            got,
            [
                Position {
                    stream: "user:1".into(),
                    epoch: "E".into(),
                    offset: 7
                },
                Position {
                    stream: "channel:a".into(),
                    epoch: "G".into(),
                    offset: 2
                },
            ]
        );
    }

    #[test]
    fn since_naming_one_position_many_times_is_one_position() {
        let raw = vec!["user:42@Ab3xYz12:0"; MAX_POSITIONS].join(",");
        assert_eq!(parse_since(&raw).len(), 1);
    }

    #[test]
    fn since_duplicates_are_matched_after_percent_decoding() {
        let got = parse_since("channel:a%2Cb@E:1,channel:a%2cb@E:9");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].offset, 9);
    }

    #[test]
    fn since_reads_at_most_max_positions() {
        let raw: Vec<String> = (0..100).map(|i| format!("channel:{i}@E:1")).collect();
        assert_eq!(parse_since(&raw.join(",")).len(), MAX_POSITIONS);
    }
}
