//! Liveness: server pings (RFC 6455 §5.5.2), the pong timeout, and pongs answering client pings (§5.5.3).

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};
use tungstenite::{Bytes, Message};

const FAST_PINGS: &[(&str, &str)] = &[
    ("websocket.ping_interval_ms", "300"),
    ("websocket.pong_timeout_ms", "200"),
    ("websocket.timer_tick_ms", "10"),
];

#[test]
fn reading_client_stays_connected_across_ping_intervals_and_receives_pings() {
    let server = Server::start(FAST_PINGS);
    let mut ws = server.connect("user=alive");
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let start = Instant::now();
    let mut pings = 0;
    // Five ping intervals: tungstenite answers each ping with a pong on its next read.
    while start.elapsed() < Duration::from_millis(1500) {
        match ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("connection lost after {:?}: {e}", start.elapsed()),
        }
    }
    assert!(
        pings >= 3,
        "only {pings} pings in 1.5 s with a 300 ms interval"
    );
    ws.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    server.publish("/publish/user/alive", "still here");
    assert_eq!(recv_text(&mut ws), "still here");
    assert_eq!(server.metric("densepush_pong_timeouts_total", &[]), 0);
    assert_eq!(server.metric("densepush_connections_open", &[]), 1);
    assert!(server.metric("densepush_pongs_received_total", &[]) >= 3);
}

#[test]
fn client_that_never_answers_pings_is_closed_after_ping_interval_plus_pong_timeout() {
    let server = Server::start(FAST_PINGS);
    let mut stream = server.raw_upgrade("user=silent");
    let start = Instant::now();
    // The first thing the server sends is a ping with no payload.
    let (fin, opcode, payload) = read_frame(&mut stream)
        .expect("reading the ping")
        .expect("a ping before EOF");
    assert!(fin);
    assert_eq!(opcode, 0x9, "expected a ping");
    assert!(payload.is_empty());
    let end = wait_end(&mut stream);
    let elapsed = start.elapsed();
    assert_ne!(end, End::TimedOut, "still open after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_millis(2000),
        "closed after {elapsed:?}, expected about 500 ms (ping 300 + pong timeout 200)"
    );
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_pong_timeouts_total", &[]) == 1
    }));
    assert_eq!(server.metric("densepush_connections_open", &[]), 0);
}

#[test]
fn raw_client_answering_pings_with_pongs_stays_connected() {
    let server = Server::start(FAST_PINGS);
    let mut stream = server.raw_upgrade("user=polite");
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1200) {
        let (_, opcode, payload) = read_frame(&mut stream)
            .expect("reading")
            .expect("connection closed while answering pings");
        assert_eq!(opcode, 0x9, "expected only pings");
        pings += 1;
        write_frame(&mut stream, 0xA, &payload).unwrap();
    }
    assert!(pings >= 3, "{pings} pings");
    assert_eq!(server.metric("densepush_pong_timeouts_total", &[]), 0);
    server.publish("/publish/user/polite", "ok");
    loop {
        let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("frame");
        if opcode == 0x9 {
            write_frame(&mut stream, 0xA, &payload).unwrap();
            continue;
        }
        assert_eq!((opcode, payload.as_slice()), (0x1, b"ok".as_slice()));
        break;
    }
}

#[test]
fn client_ping_is_answered_with_a_pong_carrying_the_same_payload() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=pinger");
    ws.send(Message::Ping(Bytes::from_static(b"hello-123")))
        .unwrap();
    loop {
        match ws.read() {
            Ok(Message::Pong(payload)) => {
                assert_eq!(payload.as_ref(), b"hello-123");
                break;
            }
            Ok(Message::Ping(_)) => continue,
            Ok(other) => panic!("expected a pong, got {other:?}"),
            Err(e) => panic!("waiting for the pong: {e}"),
        }
    }
    assert_eq!(server.metric("densepush_pings_received_total", &[]), 1);
}

#[test]
fn client_ping_sent_with_the_upgrade_request_is_answered() {
    let server = Server::start(&[]);
    let mut stream = server.raw();
    // Frames pipelined behind the request head, before the 101 arrives.
    let mut bytes = upgrade_request("user=eager", &[]).into_bytes();
    write_frame(&mut bytes, 0x9, b"early").unwrap();
    stream.write_all(&bytes).unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let (fin, opcode, payload) = read_frame(&mut stream).unwrap().expect("a pong");
    assert!(fin);
    assert_eq!(opcode, 0xA);
    assert_eq!(payload, b"early");
}
