//! Opening-handshake robustness against the real server: request heads that arrive a byte at a time,
//! client frames pipelined behind the head, the head size and header count limits (431, RFC 6585 §5), and
//! the case-insensitivity HTTP requires of header names (RFC 9110 §5.1) and of the `Upgrade` and
//! `Connection` tokens (RFC 6455 §4.2.1 items 3-4, RFC 9110 §7.6.1, §7.8).
//!
//! `tests/handshake.rs` covers each refusal status and a head split over a few writes; this file covers
//! the hostile-but-legal shapes of a request.

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;

/// A masked client frame with FIN set.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, opcode, payload).unwrap();
    out
}

/// Asserts the connection is upgraded and delivers a publish to `user`.
fn assert_upgraded_and_delivering(server: &Server, stream: &mut std::net::TcpStream, user: &str) {
    let head = read_head(stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    server.publish(&format!("/publish/user/{user}"), "delivered");
    let (_, opcode, payload) = read_frame(stream).unwrap().expect("a frame");
    assert_eq!((opcode, payload.as_slice()), (0x1, b"delivered".as_slice()));
}

#[test]
fn request_head_sent_one_byte_per_write_completes_the_upgrade() {
    let server = Server::start(&[]);
    let mut stream = server.raw();
    stream.set_nodelay(true).unwrap();
    let head = upgrade_request("user=trickle", &["Origin: http://localhost"]);
    for byte in head.as_bytes() {
        stream.write_all(std::slice::from_ref(byte)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_upgraded_and_delivering(&server, &mut stream, "trickle");
    // The partial head was buffered and then released: no connection holds a buffer now.
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_buffers_live", &[]) == 0
    }));
}

#[test]
fn terminating_crlf_split_across_writes_completes_the_upgrade() {
    let server = Server::start(&[]);
    let head = upgrade_request("user=edge", &[]);
    // Cut inside the final CRLF CRLF at every position.
    for cut in 1..4 {
        let mut stream = server.raw();
        stream.set_nodelay(true).unwrap();
        let (a, b) = head.as_bytes().split_at(head.len() - cut);
        stream.write_all(a).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        stream.write_all(b).unwrap();
        let response = read_head(&mut stream);
        assert!(
            response.starts_with("HTTP/1.1 101 "),
            "cut {cut}: {response}"
        );
    }
}

#[test]
fn ping_pipelined_in_the_same_write_as_the_head_is_answered_after_the_101() {
    let server = Server::start(&[]);
    let mut stream = server.raw();
    let mut bytes = upgrade_request("user=eager", &[]).into_bytes();
    bytes.extend_from_slice(&client_frame(0x9, b"early bird"));
    stream.write_all(&bytes).unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a pong");
    assert_eq!(
        (opcode, payload.as_slice()),
        (0xa, b"early bird".as_slice())
    );
}

#[test]
fn frames_pipelined_behind_a_head_that_arrived_in_pieces_are_decoded() {
    // The head's last piece and the first frames share one write, after the rest of the head was
    // buffered: the bytes behind the head must still be decoded as frames, not dropped with the head.
    let server = Server::start(&[]);
    let mut stream = server.raw();
    stream.set_nodelay(true).unwrap();
    let head = upgrade_request("user=eager2", &[]);
    let (a, b) = head.as_bytes().split_at(head.len() / 2);
    stream.write_all(a).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let mut rest = b.to_vec();
    rest.extend_from_slice(&client_frame(0x1, b"hello"));
    rest.extend_from_slice(&client_frame(0x9, b"second"));
    stream.write_all(&rest).unwrap();
    let response = read_head(&mut stream);
    assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a pong");
    assert_eq!((opcode, payload.as_slice()), (0xa, b"second".as_slice()));
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_messages_received_total", &[]) == 1
    }));
}

#[test]
fn pipelined_close_is_answered_after_the_101_and_tcp_closes() {
    let server = Server::start(&[]);
    let mut stream = server.raw();
    let mut bytes = upgrade_request("user=brief", &[]).into_bytes();
    bytes.extend_from_slice(&client_frame(0x8, &1000u16.to_be_bytes()));
    stream.write_all(&bytes).unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a close");
    assert_eq!(
        (opcode, payload.as_slice()),
        (0x8, 1000u16.to_be_bytes().as_slice())
    );
    assert_eq!(wait_end(&mut stream), End::Eof);
}

#[test]
fn head_over_configured_max_handshake_bytes_is_431_and_one_under_is_accepted() {
    const LIMIT: usize = 1024;
    let server = Server::start(&[("websocket.max_handshake_bytes", "1024")]);
    let base = upgrade_request("user=big", &["X-Pad: "]).len();
    // A head of exactly LIMIT bytes is accepted ...
    let fits = format!("X-Pad: {}", "a".repeat(LIMIT - base));
    let head = upgrade_request("user=big", &[&fits]);
    assert_eq!(head.len(), LIMIT);
    let mut stream = server.raw();
    stream.write_all(head.as_bytes()).unwrap();
    assert_upgraded_and_delivering(&server, &mut stream, "big");
    // ... one byte more is not.
    let over = format!("X-Pad: {}", "a".repeat(LIMIT - base + 1));
    let (status, response) = server.raw_exchange(upgrade_request("user=big", &[&over]).as_bytes());
    assert_eq!(status, 431, "{response}");
    assert_eq!(
        server.metric(
            "densepush_handshakes_rejected_total",
            &[("reason", "head_too_large")]
        ),
        1
    );
}

#[test]
fn endless_head_is_431_as_soon_as_it_passes_the_limit_without_waiting_for_its_end() {
    // A client that never ends its head must not make the server buffer more than the limit.
    let server = Server::start(&[("websocket.max_handshake_bytes", "1024")]);
    let mut stream = server.raw();
    stream
        .write_all(b"GET /ws?user=u HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    for _ in 0..20 {
        // 20 x 100 bytes, no blank line: the server must answer before the client stops.
        let line = format!("X-Filler: {}\r\n", "f".repeat(88));
        if stream.write_all(line.as_bytes()).is_err() {
            break; // already refused and closed
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let response = String::from_utf8_lossy(&read_to_close(&mut stream)).into_owned();
    assert_eq!(status_of(&response), 431, "{response}");
}

#[test]
fn header_count_over_max_handshake_headers_is_431_and_at_the_limit_is_accepted() {
    let server = Server::start(&[("websocket.max_handshake_headers", "8")]);
    // upgrade_request has 5 fields (Host, Upgrade, Connection, Key, Version).
    let extra: Vec<String> = (0..4).map(|i| format!("X-Extra-{i}: {i}")).collect();
    let at_limit: Vec<&str> = extra[..3].iter().map(String::as_str).collect();
    let mut stream = server.raw();
    stream
        .write_all(upgrade_request("user=many", &at_limit).as_bytes())
        .unwrap();
    assert_upgraded_and_delivering(&server, &mut stream, "many");
    let over: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (status, response) = server.raw_exchange(upgrade_request("user=many", &over).as_bytes());
    assert_eq!(status, 431, "{response}");
}

#[test]
fn header_names_and_tokens_are_case_insensitive_and_connection_may_list_several_tokens() {
    let server = Server::start(&[("server.allowed_origins", r#"["http://app.example"]"#)]);
    let variants: [(&str, &str); 5] = [
        (
            "what Firefox sends",
            "host: localhost\r\nconnection: keep-alive, Upgrade\r\nUPGRADE: WebSocket\r\n",
        ),
        (
            "all upper case",
            "HOST: localhost\r\nCONNECTION: UPGRADE\r\nUPGRADE: WEBSOCKET\r\n",
        ),
        (
            "token list without spaces, upgrade last",
            "Host: localhost\r\nConnection: close,keep-alive,upgrade\r\nUpgrade: websocket\r\n",
        ),
        (
            "tabs and spaces around the value",
            "Host: localhost\r\nConnection:\t Upgrade \t\r\nupgrade:  websocket\r\n",
        ),
        (
            "Connection repeated as two fields",
            "Host: localhost\r\nConnection: keep-alive\r\nConnection: upgrade\r\nUpgrade: websocket\r\n",
        ),
    ];
    for (i, (case, fields)) in variants.iter().enumerate() {
        let user = format!("case{i}");
        let head = format!(
            "GET /ws?user={user} HTTP/1.1\r\n{fields}sec-websocket-key: {WS_KEY}\r\n\
             SEC-WEBSOCKET-VERSION: 13\r\norigin: http://app.example\r\n\r\n"
        );
        let mut stream = server.raw();
        stream.write_all(head.as_bytes()).unwrap();
        let response = read_head(&mut stream);
        assert!(response.starts_with("HTTP/1.1 101 "), "{case}: {response}");
        assert!(
            response.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{case}: wrong accept key: {response}"
        );
        server.publish(&format!("/publish/user/{user}"), "hi");
        let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a frame");
        assert_eq!(
            (opcode, payload.as_slice()),
            (0x1, b"hi".as_slice()),
            "{case}"
        );
    }
}

#[test]
fn connection_without_the_upgrade_token_is_400_even_with_a_similar_token() {
    // `Connection: upgraded` or `keep-alive` alone do not carry the "Upgrade" token (RFC 6455 §4.2.1 4).
    let server = Server::start(&[]);
    for value in ["keep-alive", "upgraded", "keep-alive upgrade"] {
        let head = upgrade_request("user=u", &[])
            .replace("Connection: Upgrade", &format!("Connection: {value}"));
        let (status, response) = server.raw_exchange(head.as_bytes());
        assert_eq!(status, 400, "Connection: {value}: {response}");
    }
}
