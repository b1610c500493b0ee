//! The opening handshake: refused upgrades get the documented HTTP status (RFC 6455 §4.2.1, §4.2.2), the
//! connection limit answers 503, and a client that never finishes its request is dropped.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

/// Status of a hand-written request on a fresh connection.
fn status(server: &Server, head: &str) -> u16 {
    let (status, response) = server.raw_exchange(head.as_bytes());
    assert_ne!(status, 0, "no HTTP status in {response:?}");
    status
}

#[test]
fn well_formed_raw_upgrade_gets_101_with_the_accept_key() {
    let server = Server::start(&[]);
    let mut stream = server.raw();
    stream
        .write_all(upgrade_request("user=u", &[]).as_bytes())
        .unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    // RFC 6455 §1.3 worked example: this key's accept value.
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "missing Sec-WebSocket-Accept: {head}"
    );
}

#[test]
fn missing_key_is_400() {
    let server = Server::start(&[]);
    let head = "GET /ws?user=u HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(status(&server, head), 400);
    assert_eq!(
        server.metric(
            "densepush_handshakes_rejected_total",
            &[("reason", "bad_request")]
        ),
        1
    );
}

#[test]
fn key_not_decoding_to_16_bytes_is_400() {
    let server = Server::start(&[]);
    let head = "GET /ws?user=u HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                Connection: Upgrade\r\nSec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(status(&server, head), 400);
}

#[test]
fn non_get_method_is_400() {
    let server = Server::start(&[]);
    let head = upgrade_request("user=u", &[]).replacen("GET ", "POST ", 1);
    assert_eq!(status(&server, &head), 400);
}

#[test]
fn origin_not_in_allowed_origins_is_403() {
    let server = Server::start(&[("server.allowed_origins", r#"["https://good.example"]"#)]);
    assert_eq!(
        server.refused_status("user=u", &[("Origin", "https://evil.example")]),
        403
    );
    assert_eq!(
        server.metric(
            "densepush_handshakes_rejected_total",
            &[("reason", "forbidden")]
        ),
        1
    );
}

#[test]
fn origin_in_allowed_origins_is_accepted() {
    let server = Server::start(&[("server.allowed_origins", r#"["https://good.example"]"#)]);
    let mut ws = server
        .try_connect("user=u", &[("Origin", "https://good.example")])
        .expect("allowed origin must connect");
    server.publish("/publish/user/u", "welcome");
    assert_eq!(recv_text(&mut ws), "welcome");
}

#[test]
fn wrong_path_is_404() {
    let server = Server::start(&[]);
    let head = upgrade_request("user=u", &[]).replacen("GET /ws?", "GET /other?", 1);
    assert_eq!(status(&server, &head), 404);
}

#[test]
fn websocket_version_8_is_426_naming_version_13() {
    let server = Server::start(&[]);
    let head = upgrade_request("user=u", &[])
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let (status, response) = server.raw_exchange(head.as_bytes());
    assert_eq!(status, 426, "{response}");
    // RFC 6455 §4.4: the refusal lists the versions the server speaks.
    assert!(
        response
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{response}"
    );
}

#[test]
fn head_over_max_handshake_bytes_is_431() {
    let server = Server::start(&[]);
    let padding = format!("X-Padding: {}", "a".repeat(9000));
    let head = upgrade_request("user=u", &[&padding]);
    assert_eq!(status(&server, &head), 431);
}

#[test]
fn third_connection_over_max_connections_2_is_503_and_the_first_two_still_receive() {
    let server = Server::start(&[("server.max_connections", "2")]);
    let mut first = server.connect("user=a");
    let mut second = server.connect("user=b");
    assert_eq!(server.refused_status("user=c", &[]), 503);
    server.publish("/publish/all", "still here");
    assert_eq!(recv_text(&mut first), "still here");
    assert_eq!(recv_text(&mut second), "still here");
    assert_eq!(
        server.metric(
            "densepush_handshakes_rejected_total",
            &[("reason", "unavailable")]
        ),
        1
    );
}

#[test]
fn slot_freed_under_max_connections_is_usable_again() {
    let server = Server::start(&[("server.max_connections", "1")]);
    let first = server.connect("user=a");
    assert_eq!(server.refused_status("user=b", &[]), 503);
    close_ws(first);
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_connections_open", &[]) == 0
    }));
    let mut again = server.connect("user=b");
    server.publish("/publish/user/b", "in");
    assert_eq!(recv_text(&mut again), "in");
}

#[test]
fn silent_tcp_connection_is_closed_after_handshake_timeout() {
    let server = Server::start(&[
        ("websocket.handshake_timeout_ms", "300"),
        ("websocket.timer_tick_ms", "10"),
    ]);
    let mut stream = server.raw();
    let start = Instant::now();
    let end = wait_end(&mut stream);
    let elapsed = start.elapsed();
    assert_ne!(end, End::TimedOut, "still open after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_millis(2000),
        "closed after {elapsed:?}, expected about 300 ms"
    );
    assert_eq!(
        server.metric(
            "densepush_handshakes_rejected_total",
            &[("reason", "timeout")]
        ),
        1
    );
    assert_eq!(server.metric("densepush_connections_handshaking", &[]), 0);
}

#[test]
fn partial_request_head_is_closed_after_handshake_timeout() {
    let server = Server::start(&[
        ("websocket.handshake_timeout_ms", "300"),
        ("websocket.timer_tick_ms", "10"),
    ]);
    let mut stream = server.raw();
    let start = Instant::now();
    stream
        .write_all(b"GET /ws?user=u HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let end = wait_end(&mut stream);
    let elapsed = start.elapsed();
    assert_ne!(end, End::TimedOut, "still open after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_millis(2000),
        "closed after {elapsed:?}, expected about 300 ms"
    );
}

#[test]
fn request_head_split_over_several_writes_completes_the_upgrade() {
    let server = Server::start(&[]);
    let mut stream = server.raw();
    let _ = stream.set_nodelay(true);
    let head = upgrade_request("user=slow", &[]);
    for chunk in head.as_bytes().chunks(7) {
        stream.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let response = read_head(&mut stream);
    assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
    server.publish("/publish/user/slow", "arrived");
    let (fin, opcode, payload) = read_frame(&mut stream).unwrap().expect("a frame");
    assert!(fin);
    assert_eq!(opcode, 0x1);
    assert_eq!(payload, b"arrived");
}
