//! Configured limits hold exactly at their documented boundary: the limit itself is allowed, one more is
//! refused.

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

/// An upgrade request for `user=u` padded with one `X-Pad` header to exactly `total` bytes.
fn head_of_size(total: usize) -> String {
    let bare = upgrade_request("user=u", &["X-Pad: "]);
    assert!(total > bare.len());
    let pad = "p".repeat(total - bare.len());
    let head = upgrade_request("user=u", &[&format!("X-Pad: {pad}")]);
    assert_eq!(head.len(), total);
    head
}

/// An upgrade request with `extra` additional header fields.
fn head_with_headers(extra: usize) -> String {
    let lines: Vec<String> = (0..extra).map(|i| format!("X-H{i}: v")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    upgrade_request("user=u", &refs)
}

#[test]
fn upgrade_head_of_exactly_max_handshake_bytes_is_accepted() {
    let server = Server::start(&[("websocket.max_handshake_bytes", "4096")]);
    let mut stream = server.raw();
    stream.write_all(head_of_size(4096).as_bytes()).unwrap();
    let response = read_head(&mut stream);
    assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
}

#[test]
fn upgrade_head_one_byte_over_max_handshake_bytes_is_431() {
    let server = Server::start(&[("websocket.max_handshake_bytes", "4096")]);
    let (status, response) = server.raw_exchange(head_of_size(4097).as_bytes());
    assert_eq!(status, 431, "{response}");
}

#[test]
fn upgrade_with_exactly_max_handshake_headers_is_accepted() {
    let server = Server::start(&[("websocket.max_handshake_headers", "12")]);
    // upgrade_request has 5 header fields of its own.
    let mut stream = server.raw();
    stream.write_all(head_with_headers(7).as_bytes()).unwrap();
    let response = read_head(&mut stream);
    assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
}

#[test]
fn upgrade_with_one_header_over_max_handshake_headers_is_431() {
    let server = Server::start(&[("websocket.max_handshake_headers", "12")]);
    let (status, response) = server.raw_exchange(head_with_headers(8).as_bytes());
    assert_eq!(status, 431, "{response}");
}

#[test]
fn user_id_of_max_id_bytes_is_accepted_and_one_byte_longer_is_401() {
    let server = Server::start(&[("auth.max_id_bytes", "16")]);
    let ok = "u".repeat(16);
    let mut ws = server.connect(&format!("user={ok}"));
    server.publish(&format!("/publish/user/{ok}"), "fits");
    assert_eq!(recv_text(&mut ws), "fits");
    assert_eq!(
        server.refused_status(&format!("user={}", "u".repeat(17)), &[]),
        401
    );
}

#[test]
fn max_channels_are_accepted_and_one_more_is_401() {
    let server = Server::start(&[("auth.max_channels", "3")]);
    let mut ws = server.connect("user=u&channels=a,b,c");
    server.publish("/publish/channel/c", "third channel");
    assert_eq!(recv_text(&mut ws), "third channel");
    assert_eq!(server.refused_status("user=v&channels=a,b,c,d", &[]), 401);
}

#[test]
fn client_message_of_exactly_max_inbound_message_bytes_is_accepted() {
    let server = Server::start(&[("websocket.max_inbound_message_bytes", "1024")]);
    let mut ws = server.connect("user=u");
    ws.send(Message::binary(vec![7u8; 1024])).unwrap();
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_messages_received_total", &[]) == 1
    }));
    server.publish("/publish/user/u", "still open");
    assert_eq!(recv_text(&mut ws), "still open");
}

#[test]
fn fragmented_client_message_over_max_inbound_message_bytes_in_total_is_closed_with_1009() {
    let server = Server::start(&[("websocket.max_inbound_message_bytes", "1024")]);
    let mut stream = server.raw_upgrade("user=u");
    // Two fragments of 600 bytes: each fits, the message does not (limit counts reassembled messages).
    let mut first = Vec::new();
    write_frame(&mut first, 0x2, &[1u8; 600]).unwrap();
    first[0] &= 0x7f;
    stream.write_all(&first).unwrap();
    write_frame(&mut stream, 0x0, &[2u8; 600]).unwrap();
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a close frame");
    assert_eq!(opcode, 0x8);
    assert_eq!(
        CloseCode::from(u16::from_be_bytes([payload[0], payload[1]])),
        CloseCode::Size
    );
}

#[test]
fn max_connections_is_a_total_over_reactors_not_a_per_reactor_share() {
    // config.toml: "Maximum number of client connections, summed over all reactors". With 2 of 2 slots
    // free but one taken, a new connection must be accepted whichever reactor the kernel hands it to.
    let server = Server::start(&[("server.reactors", "2"), ("server.max_connections", "2")]);
    let _held = server.connect("user=held");
    for attempt in 0..12 {
        let ws = server
            .try_connect(&format!("user=a{attempt}"), &[])
            .unwrap_or_else(|e| {
                let text = server.metrics_text();
                panic!(
                    "attempt {attempt}: second connection refused with 1 of 2 open ({e}); open per reactor: {} / {}",
                    metric_in(&text, "densepush_connections_open", &[("reactor", "0")]),
                    metric_in(&text, "densepush_connections_open", &[("reactor", "1")]),
                )
            });
        close_ws(ws);
        assert!(wait_until(Duration::from_secs(2), || {
            server.metric("densepush_connections_open", &[]) == 1
        }));
    }
}

#[test]
fn admin_request_head_over_max_request_head_bytes_is_431_and_closes() {
    let server = Server::start(&[("admin.max_request_head_bytes", "1024")]);
    let mut admin = server.admin();
    let pad = "p".repeat(1100);
    let bytes = admin.encode("GET", "/healthz", b"", &[("X-Pad", &pad)]);
    admin.write_raw(&bytes);
    let response = admin.read_response();
    assert_eq!(response.status, 431);
    assert!(admin.is_closed_by_server());
}

#[test]
fn publish_body_arriving_in_pieces_is_accepted_whole() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=u");
    let mut admin = server.admin();
    let body = "0123456789".repeat(6000);
    let bytes = admin.encode("POST", "/publish/user/u", body.as_bytes(), &[]);
    for chunk in bytes.chunks(7000) {
        admin.write_raw(chunk);
        std::thread::sleep(Duration::from_millis(5));
    }
    let response = admin.read_response();
    assert_eq!(response.status, 202, "{}", response.text());
    assert_eq!(response.json()["bytes"], body.len());
    assert_eq!(recv_text(&mut ws), body);
}
