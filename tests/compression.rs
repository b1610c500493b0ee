//! permessage-deflate (RFC 7692) end to end with hand-built frames: what the 101 answers, compressed pushes
//! that inflate to the payload, small ones sent plain, client messages inflated (echo mode), a decompression
//! bomb refused with 1009 before it costs memory, and RSV1 where RFC 7692 §6.1 forbids it failing with 1002.
//! Real libraries (Python `websockets`, Node `ws`, Chromium) are in `interop.rs` and `js_client.rs`.

mod common;

use common::*;
use densepush::proto::deflate;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const CHROME_OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits";

fn compressing(extra: &[(&str, &str)]) -> Server {
    let mut all = vec![
        ("websocket.compression", "true"),
        ("websocket.compression_min_bytes", "64"),
    ];
    all.extend_from_slice(extra);
    Server::start(&all)
}

/// Upgrades with `offer` header lines; the 101 head.
fn upgrade_offering(server: &Server, query: &str, offer: &[&str]) -> (TcpStream, String) {
    let mut stream = server.raw();
    stream
        .write_all(upgrade_request(query, offer).as_bytes())
        .unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    (stream, head)
}

/// One server frame with its first byte whole: `(first byte, payload)`.
fn read_raw_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).expect("a frame");
    let len = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).unwrap();
            u16::from_be_bytes(ext) as usize
        }
        127 => {
            let mut ext = [0u8; 8];
            stream.read_exact(&mut ext).unwrap();
            u64::from_be_bytes(ext) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    (head[0], payload)
}

fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    deflate::inflate(payload, 1 << 24, |c| out.extend_from_slice(c)).expect("inflates");
    out
}

/// A masked client frame with any first byte (FIN, RSV bits and opcode as given).
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut frame = vec![first];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The close code of the next frame, which must be a close frame.
fn close_code(stream: &mut TcpStream) -> u16 {
    loop {
        let (first, payload) = read_raw_frame(stream);
        if first & 0x0f == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[test]
fn the_101_answers_permessage_deflate_only_when_on_and_offered_acceptably() {
    let server = compressing(&[]);
    let (_chrome, head) = upgrade_offering(&server, "user=a", &[CHROME_OFFER]);
    assert!(
        head.contains("\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"),
        "{head}"
    );
    let (_firefox, firefox) = upgrade_offering(
        &server,
        "user=a",
        &["Sec-WebSocket-Extensions: permessage-deflate"],
    );
    assert!(firefox.contains("permessage-deflate"), "{firefox}");
    let (_, small_window) = upgrade_offering(
        &server,
        "user=a",
        &["Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10"],
    );
    assert!(
        !small_window.contains("Extensions"),
        "declined: {small_window}"
    );
    let (_none, none) = upgrade_offering(&server, "user=a", &[]);
    assert!(!none.contains("Extensions"), "{none}");
    assert!(wait_until(Duration::from_secs(2), || server
        .metric("densepush_connections_deflate", &[])
        == 2));
    let off = Server::start(&[]);
    let (_, head) = upgrade_offering(&off, "user=a", &[CHROME_OFFER]);
    assert!(
        !head.contains("Extensions"),
        "compression is off by default: {head}"
    );
}

#[test]
fn pushes_arrive_compressed_and_small_ones_plain() {
    let server = compressing(&[]);
    let (mut deflating, _) = upgrade_offering(&server, "user=a", &[CHROME_OFFER]);
    let mut plain = server.raw_upgrade("user=a");
    let long = format!("{{\"title\":\"{}\"}}", "a notification body ".repeat(15));
    server.publish("/publish/user/a", &long);
    server.publish("/publish/user/a", "short");
    let (first, payload) = read_raw_frame(&mut deflating);
    assert_eq!(first, 0xC1, "FIN, RSV1 (compressed), text");
    assert!(payload.len() * 3 < long.len(), "{} bytes", payload.len());
    assert_eq!(inflate(&payload), long.as_bytes());
    let (first, payload) = read_raw_frame(&mut deflating);
    assert_eq!(
        (first, payload.as_slice()),
        (0x81, &b"short"[..]),
        "under compression_min_bytes"
    );
    let (first, payload) = read_raw_frame(&mut plain);
    assert_eq!(
        (first, payload),
        (0x81, long.into_bytes()),
        "a client that offered nothing"
    );
}

#[test]
fn a_compressed_client_message_is_inflated_and_echoed() {
    let server = compressing(&[("diagnostics.echo", "true")]);
    let (mut stream, _) = upgrade_offering(&server, "user=a", &[CHROME_OFFER]);
    let text = "héllo ".repeat(100);
    let compressed = deflate::compress(text.as_bytes(), 6);
    // In two frames: RSV1 on the first only (RFC 7692 §6.1).
    let (a, b) = compressed.split_at(compressed.len() / 2);
    stream.write_all(&client_frame(0x41, a)).unwrap();
    stream.write_all(&client_frame(0x80, b)).unwrap();
    let (first, payload) = read_raw_frame(&mut stream);
    assert_eq!(first & 0x0f, 0x1);
    assert_eq!(payload, text.as_bytes());
    assert_eq!(server.metric("densepush_messages_received_total", &[]), 1);
}

#[test]
fn a_decompression_bomb_is_closed_with_1009_before_it_costs_memory() {
    let server = compressing(&[("websocket.max_inbound_message_bytes", "65536")]);
    let rss_before = rss_bytes(server.pid());
    let (mut stream, _) = upgrade_offering(&server, "user=a", &[CHROME_OFFER]);
    // 64 MiB of zeros compress to about 64 KiB; the limit is on the inflated size.
    let bomb = deflate::compress(&vec![0u8; 64 << 20], 9);
    assert!(bomb.len() < 65536, "{}", bomb.len());
    stream.write_all(&client_frame(0xC2, &bomb)).unwrap();
    assert_eq!(close_code(&mut stream), 1009);
    assert_eq!(
        server.metric("densepush_protocol_error_closes_total", &[]),
        1
    );
    let grown = rss_bytes(server.pid()).saturating_sub(rss_before);
    assert!(grown < 8 << 20, "server grew {grown} bytes");
    // Invalid DEFLATE data is 1007.
    let (mut stream, _) = upgrade_offering(&server, "user=a", &[CHROME_OFFER]);
    stream
        .write_all(&client_frame(0xC1, &[0xff, 0xff, 0xff, 0x07]))
        .unwrap();
    assert_eq!(close_code(&mut stream), 1007);
}

#[test]
fn rsv1_on_a_control_frame_or_a_continuation_is_1002() {
    let server = compressing(&[]);
    let (mut stream, _) = upgrade_offering(&server, "user=a", &[CHROME_OFFER]);
    stream.write_all(&client_frame(0xC9, b"")).unwrap(); // ping with RSV1
    assert_eq!(close_code(&mut stream), 1002);
    let (mut stream, _) = upgrade_offering(&server, "user=a", &[CHROME_OFFER]);
    stream.write_all(&client_frame(0x01, b"ab")).unwrap();
    stream.write_all(&client_frame(0xC0, b"cd")).unwrap(); // continuation with RSV1
    assert_eq!(close_code(&mut stream), 1002);
    // Without the extension negotiated RSV1 is reserved everywhere.
    let mut stream = server.raw_upgrade("user=a");
    stream
        .write_all(&client_frame(0xC1, &deflate::compress(b"hi", 1)))
        .unwrap();
    assert_eq!(close_code(&mut stream), 1002);
    assert!(wait_until(Duration::from_secs(2), || server
        .metric("densepush_protocol_error_closes_total", &[])
        == 3));
}
