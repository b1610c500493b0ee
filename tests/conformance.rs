//! RFC 6455 conformance at the frame level against the real server: hand-built (masked, or deliberately
//! not) client frames over raw TCP, one case for each rule that binds a server receiving frames, and the
//! close code the server must fail the connection with (§7.4.1). Every failure must also end the TCP
//! connection after the close frame (§7.1.1: the server closes TCP first).
//!
//! `tests/protocol.rs` covers what a server does with valid traffic (fragments split over writes, 1009, the
//! close timeout); the frame decoder's unit tests cover the same rules without sockets. Here the point is
//! that the running server, reactor and all, applies them.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

const MASK: [u8; 4] = [0xa1, 0x5c, 0x03, 0xe7];

/// One client frame with full control over every header bit (RFC 6455 §5.2): `b0` is FIN, RSV1-3 and the
/// opcode; the payload is masked with [`MASK`] when `masked` (§5.3).
fn frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![b0];
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A masked frame with FIN set.
fn fin(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(0x80 | opcode, payload, true)
}

/// A masked frame with FIN clear (a fragment that more must follow, §5.4).
fn more(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(opcode, payload, true)
}

/// A close payload: code then reason (§5.5.1).
fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// The code of the next server frame, which must be a close frame; panics on anything else.
fn read_close_code(stream: &mut TcpStream, case: &str) -> Option<u16> {
    match read_frame(stream) {
        Ok(Some((true, 0x8, payload))) => match payload.len() {
            0 => None,
            1 => panic!("{case}: server sent a 1-byte close payload"),
            _ => Some(u16::from_be_bytes([payload[0], payload[1]])),
        },
        Ok(Some((fin, opcode, payload))) => {
            panic!("{case}: expected a close frame, got fin={fin} opcode={opcode:#x} {payload:?}")
        }
        Ok(None) => panic!("{case}: connection ended without a close frame"),
        Err(e) => panic!("{case}: reading the close frame: {e}"),
    }
}

/// Upgrades a fresh connection, writes `bytes` in one write, and asserts the server answers with a close
/// frame carrying `code` and then ends the TCP connection.
fn assert_fails_with(server: &Server, case: &str, bytes: &[u8], code: u16) {
    let mut stream = server.raw_upgrade("user=conformance");
    stream.write_all(bytes).expect("writing frames");
    assert_eq!(read_close_code(&mut stream, case), Some(code), "{case}");
    assert_eq!(wait_end(&mut stream), End::Eof, "{case}: TCP not closed");
}

fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn control_frames_over_125_bytes_fail_with_1002() {
    // §5.5: "All control frames MUST have a payload length of 125 bytes or less".
    let server = Server::start(&[]);
    for (case, opcode) in [("ping", 0x9), ("pong", 0xa), ("close", 0x8)] {
        let mut payload = vec![b'p'; 126];
        if opcode == 0x8 {
            payload[..2].copy_from_slice(&1000u16.to_be_bytes());
        }
        assert_fails_with(&server, case, &fin(opcode, &payload), 1002);
    }
    // 125 is the limit, not over it: answered with the same payload.
    let mut stream = server.raw_upgrade("user=conformance");
    let payload = vec![b'x'; 125];
    stream.write_all(&fin(0x9, &payload)).unwrap();
    let (_, opcode, got) = read_frame(&mut stream).unwrap().expect("a pong");
    assert_eq!((opcode, got), (0xa, payload));
}

#[test]
fn fragmented_control_frames_fail_with_1002() {
    // §5.5: "Control frames MUST NOT be fragmented."
    let server = Server::start(&[]);
    for (case, opcode) in [("ping", 0x9), ("pong", 0xa), ("close", 0x8)] {
        let payload = if opcode == 0x8 {
            close_payload(1000, b"")
        } else {
            b"abc".to_vec()
        };
        assert_fails_with(&server, case, &more(opcode, &payload), 1002);
    }
}

#[test]
fn reserved_bits_fail_with_1002() {
    // §5.2: RSV1-3 "MUST be 0 unless an extension is negotiated"; none is.
    let server = Server::start(&[]);
    for (case, rsv) in [("rsv1", 0x40), ("rsv2", 0x20), ("rsv3", 0x10)] {
        for opcode in [0x1u8, 0x2, 0x9] {
            let case = format!("{case} opcode {opcode:#x}");
            assert_fails_with(
                &server,
                &case,
                &frame(0x80 | rsv | opcode, b"x", true),
                1002,
            );
        }
    }
}

#[test]
fn reserved_opcodes_fail_with_1002() {
    // §5.2: 0x3-0x7 are reserved for further non-control frames, 0xB-0xF for further control frames.
    let server = Server::start(&[]);
    for opcode in (0x3u8..=0x7).chain(0xb..=0xf) {
        assert_fails_with(
            &server,
            &format!("opcode {opcode:#x}"),
            &fin(opcode, b"x"),
            1002,
        );
    }
}

#[test]
fn unmasked_frames_fail_with_1002() {
    // §5.1: "The server MUST close the connection upon receiving a frame that is not masked."
    let server = Server::start(&[]);
    for (case, opcode, payload) in [
        ("text", 0x1u8, b"hello".as_slice()),
        ("binary", 0x2, b"\x00\x01"),
        ("ping", 0x9, b"p"),
        ("empty text", 0x1, b""),
    ] {
        assert_fails_with(&server, case, &frame(0x80 | opcode, payload, false), 1002);
    }
    // Unmasked in the middle of a message, too.
    let bytes = concat(&[more(0x1, b"ok "), frame(0x80, b"then bare", false)]);
    assert_fails_with(&server, "unmasked continuation", &bytes, 1002);
}

#[test]
fn continuation_rules_fail_with_1002() {
    // §5.4: a fragmented message is one start frame (text/binary, FIN clear), continuations, and a final
    // continuation with FIN; control frames may come between fragments, data frames may not.
    let server = Server::start(&[]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("continuation without a start", fin(0x0, b"orphan")),
        (
            "unfinished continuation without a start",
            more(0x0, b"orphan"),
        ),
        (
            "continuation after a finished message",
            concat(&[fin(0x1, b"done"), fin(0x0, b"more")]),
        ),
        (
            "text inside a text message",
            concat(&[more(0x1, b"a"), fin(0x1, b"b")]),
        ),
        (
            "binary inside a text message",
            concat(&[more(0x1, b"a"), fin(0x2, b"b")]),
        ),
        (
            "text inside a binary message, after a continuation",
            concat(&[more(0x2, b"a"), more(0x0, b"b"), more(0x1, b"c")]),
        ),
    ];
    for (case, bytes) in &cases {
        assert_fails_with(&server, case, bytes, 1002);
    }
}

#[test]
fn code_point_split_between_fragments_is_valid_utf8() {
    // §8.1 applies to the whole message, so a code point may straddle fragments (§5.6).
    let server = Server::start(&[]);
    let mut stream = server.raw_upgrade("user=split");
    let text = "é€😀"; // 2-, 3- and 4-byte code points
    let b = text.as_bytes();
    // Cut inside each code point: [c3 | a9 e2 | 82 | ac f0 9f | 98 80].
    let bytes = concat(&[
        more(0x1, &b[..1]),
        more(0x0, &b[1..3]),
        more(0x0, &b[3..4]),
        more(0x0, &b[4..7]),
        fin(0x0, &b[7..]),
    ]);
    stream.write_all(&bytes).unwrap();
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_messages_received_total", &[]) == 1
    }));
    server.publish("/publish/user/split", "still open");
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a frame");
    assert_eq!(
        (opcode, payload.as_slice()),
        (0x1, b"still open".as_slice())
    );
    assert_eq!(
        server.metric("densepush_protocol_error_closes_total", &[]),
        0
    );
}

#[test]
fn invalid_utf8_fails_with_1007_before_the_final_fragment() {
    // §8.1: invalid UTF-8 fails the connection. Each case sends only the start of a message (no FIN, or a
    // frame shorter than announced), so a close that arrives proves the server failed fast.
    let server = Server::start(&[]);
    let mut truncated = frame(
        0x81,
        &[vec![b'a'; 10], vec![0xff], vec![b'b'; 989]].concat(),
        true,
    );
    truncated.truncate(2 + 2 + 4 + 12); // header (126 form) + mask + 12 payload bytes
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("0xff in a first fragment", more(0x1, b"ok \xff")),
        (
            "0xff in a continuation",
            concat(&[more(0x1, b"fine "), more(0x0, b"then \xfe")]),
        ),
        (
            "lead byte, then a non-continuation byte in the next fragment",
            concat(&[more(0x1, b"\xc3"), more(0x0, b"(")]),
        ),
        ("overlong encoding", more(0x1, b"\xc0\xaf")),
        ("UTF-16 surrogate", more(0x1, b"\xed\xa0\x80")),
        ("code point over U+10FFFF", more(0x1, b"\xf4\x90\x80\x80")),
        ("invalid byte inside an unfinished frame", truncated),
    ];
    for (case, bytes) in &cases {
        assert_fails_with(&server, case, bytes, 1007);
    }
    // A message that ends inside a code point is invalid too (the rule is about the whole message).
    assert_fails_with(
        &server,
        "message ends inside a code point",
        &concat(&[more(0x1, b"ab"), fin(0x0, b"\xe2\x82")]),
        1007,
    );
}

#[test]
fn close_payload_of_one_byte_fails_with_1002() {
    // §5.5.1: a close body, if present, starts with a 2-byte code.
    let server = Server::start(&[]);
    assert_fails_with(&server, "1-byte close", &fin(0x8, &[0x03]), 1002);
}

#[test]
fn close_codes_a_peer_may_not_send_fail_with_1002() {
    // §7.4.1/§7.4.2: 0-999 unused; 1004 reserved; 1005, 1006 and 1015 must not be sent in a close frame;
    // 1016-2999 are for future RFCs (unassigned) — and no code is above 4999.
    let server = Server::start(&[]);
    for code in [
        0u16, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 6000, 65535,
    ] {
        assert_fails_with(
            &server,
            &format!("code {code}"),
            &fin(0x8, &close_payload(code, b"")),
            1002,
        );
    }
}

#[test]
fn valid_close_codes_are_echoed_and_tcp_is_closed_after_the_reply() {
    // §5.5.1: the endpoint answers a close with a close ("typically echoing the status code it received"),
    // then the server closes TCP (§7.1.1). 1012-1014 are IANA-registered since RFC 6455.
    let server = Server::start(&[]);
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
        4000, 4999,
    ] {
        let case = format!("code {code}");
        let mut stream = server.raw_upgrade("user=closer");
        stream
            .write_all(&fin(0x8, &close_payload(code, b"bye")))
            .unwrap();
        assert_eq!(read_close_code(&mut stream, &case), Some(code), "{case}");
        assert_eq!(wait_end(&mut stream), End::Eof, "{case}: TCP not closed");
    }
    // An empty close is answered with an empty close (§5.5.1: the body is optional).
    let mut stream = server.raw_upgrade("user=closer");
    stream.write_all(&fin(0x8, b"")).unwrap();
    assert_eq!(read_close_code(&mut stream, "empty close"), None);
    assert_eq!(
        wait_end(&mut stream),
        End::Eof,
        "empty close: TCP not closed"
    );
    assert_eq!(
        server.metric("densepush_protocol_error_closes_total", &[]),
        0
    );
}

#[test]
fn close_reason_that_is_not_utf8_fails_with_1007() {
    // §5.5.1: the reason "is not guaranteed to be human readable" but is UTF-8; §8.1 makes invalid UTF-8 a
    // 1007 failure.
    let server = Server::start(&[]);
    for (case, reason) in [
        ("0xff", b"bad \xff".as_slice()),
        ("truncated code point", b"caf\xc3"),
        ("surrogate", b"\xed\xb0\x80"),
    ] {
        assert_fails_with(&server, case, &fin(0x8, &close_payload(1000, reason)), 1007);
    }
}

#[test]
fn pings_are_answered_with_the_same_payload_even_inside_a_fragmented_message() {
    // §5.5.2: a pong carries the ping's "Application data"; §5.4: control frames may be injected in the
    // middle of a fragmented message, and the server must answer them there.
    let server = Server::start(&[]);
    let mut stream = server.raw_upgrade("user=pinger");
    for payload in [b"".as_slice(), b"x", b"\x00\xff binary \x80", &[7u8; 125]] {
        stream.write_all(&fin(0x9, payload)).unwrap();
        let (fin_bit, opcode, got) = read_frame(&mut stream).unwrap().expect("a pong");
        assert!(fin_bit);
        assert_eq!((opcode, got.as_slice()), (0xa, payload));
    }
    // Mid-message: the pong must arrive while the message is still unfinished.
    stream.write_all(&more(0x1, b"part one, ")).unwrap();
    stream.write_all(&fin(0x9, b"mid-message")).unwrap();
    let (_, opcode, got) = read_frame(&mut stream).unwrap().expect("a pong");
    assert_eq!((opcode, got.as_slice()), (0xa, b"mid-message".as_slice()));
    stream.write_all(&more(0x0, b"part two, ")).unwrap();
    stream.write_all(&fin(0x9, b"again")).unwrap();
    let (_, opcode, got) = read_frame(&mut stream).unwrap().expect("a pong");
    assert_eq!((opcode, got.as_slice()), (0xa, b"again".as_slice()));
    stream.write_all(&fin(0x0, b"the end")).unwrap();
    // The message completed normally and the connection still works.
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_messages_received_total", &[]) == 1
    }));
    server.publish("/publish/user/pinger", "after");
    let (_, opcode, got) = read_frame(&mut stream).unwrap().expect("a frame");
    assert_eq!((opcode, got.as_slice()), (0x1, b"after".as_slice()));
}

#[test]
fn unsolicited_pongs_are_ignored() {
    // §5.5.3: "A Pong frame MAY be sent unsolicited ... A response to an unsolicited Pong frame is not
    // expected."
    let server = Server::start(&[]);
    let mut stream = server.raw_upgrade("user=ponger");
    stream.write_all(&fin(0xa, b"heartbeat")).unwrap();
    stream.write_all(&fin(0xa, b"")).unwrap();
    server.publish("/publish/user/ponger", "first frame back");
    let (_, opcode, got) = read_frame(&mut stream).unwrap().expect("a frame");
    assert_eq!(
        (opcode, got.as_slice()),
        (0x1, b"first frame back".as_slice())
    );
}
