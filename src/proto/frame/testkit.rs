//! Test-only helpers shared by the frame tests: client frames built independently of the code under test
//! (by hand, or by tungstenite), and a driver that feeds them to a [`Decoder`] in pieces and records owned
//! copies of the events.

use tungstenite::protocol::frame::coding::{Control, OpCode};
use tungstenite::protocol::frame::Frame;

use super::{Decoder, Event, Feed, Limits, ProtocolError};

pub(super) const LIMITS: Limits = Limits {
    max_message_bytes: 1 << 24,
    deflate: false,
};
pub(super) const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
pub(super) const TEXT: u8 = 0x1;
pub(super) const BINARY: u8 = 0x2;
pub(super) const CONTINUE: u8 = 0x0;
pub(super) const CLOSE: u8 = 0x8;
pub(super) const PING: u8 = 0x9;
pub(super) const PONG: u8 = 0xA;

/// An owned copy of an [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ev {
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
pub(super) enum Got {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
    Message { text: bool, data: Vec<u8> },
}

pub(super) fn owned(event: Event<'_>) -> Ev {
    match event {
        Event::Ping(p) => Ev::Ping(p.to_vec()),
        Event::Pong(p) => Ev::Pong(p.to_vec()),
        Event::Close { code, reason } => Ev::Close(code, reason.to_owned()),
        Event::Data {
            text,
            chunk,
            first,
            last,
            ..
        } => Ev::Data {
            text,
            chunk: chunk.to_vec(),
            first,
            last,
        },
    }
}

/// Merges data chunks, checking the first/last flags frame the messages exactly.
pub(super) fn merge(events: &[Ev]) -> Vec<Got> {
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
pub(super) fn feed_cut(
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

pub(super) fn feed_whole(wire: &[u8]) -> (Decoder, Vec<Ev>, Result<Feed, ProtocolError>) {
    feed_cut(wire, &[], &LIMITS)
}

pub(super) fn feed_bytewise(wire: &[u8]) -> (Decoder, Vec<Ev>, Result<Feed, ProtocolError>) {
    let cuts: Vec<usize> = (1..wire.len()).collect();
    feed_cut(wire, &cuts, &LIMITS)
}

pub(super) fn error_of(wire: &[u8]) -> ProtocolError {
    feed_whole(wire)
        .2
        .expect_err("decoder accepted invalid input")
}

pub(super) fn mask_bytewise(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// A client frame with first header byte `b0`, masked with `mask` if given; built independently of the
/// code under test.
pub(super) fn raw_frame(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
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
pub(super) fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(if fin { 0x80 } else { 0 } | opcode, payload, Some(MASK))
}

/// A masked client frame built by tungstenite, as an encoder independent of this module.
pub(super) fn tungstenite_client(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
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

pub(super) fn data(text: bool, chunk: &[u8], first: bool, last: bool) -> Ev {
    Ev::Data {
        text,
        chunk: chunk.to_vec(),
        first,
        last,
    }
}

/// Payload lengths at the edges of the three length encodings (§5.2), with the server header length of each.
pub(super) const LENGTHS: [(usize, usize); 5] =
    [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)];
