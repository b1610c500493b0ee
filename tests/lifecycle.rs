//! Process lifecycle: graceful shutdown on SIGTERM, and client-initiated closes.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn sigterm_delivers_queued_messages_then_closes_1001_and_exits_0_within_shutdown_timeout() {
    const MESSAGES: usize = 50;
    let mut server = Server::start(&[("server.shutdown_timeout_ms", "3000")]);
    let mut clients: Vec<Ws> = (0..3)
        .map(|i| server.connect(&format!("user=u{i}")))
        .collect();
    let mut admin = server.admin();
    let mut requests = Vec::new();
    for i in 0..MESSAGES {
        requests.extend(admin.encode("POST", "/publish/all", format!("m{i}").as_bytes(), &[]));
    }
    admin.write_raw(&requests);
    for _ in 0..MESSAGES {
        assert_eq!(admin.read_response().status, 202);
    }
    // Nothing has been read yet: the messages are at most in flight when the signal arrives.
    let signalled = Instant::now();
    server.sigterm();
    for (c, ws) in clients.iter_mut().enumerate() {
        for i in 0..MESSAGES {
            assert_eq!(recv_text(ws), format!("m{i}"), "client {c}");
        }
        let frame = recv_close(ws).expect("close frame with a code");
        assert_eq!(frame.code, CloseCode::Away, "client {c}");
        finish_close(ws);
    }
    let status = server
        .wait_exit(Duration::from_millis(3000 + 1000))
        .expect("server still running after shutdown_timeout_ms");
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_millis(3000), "shutdown took {took:?}");
}

#[test]
fn sigterm_flushes_a_backlog_queued_in_the_outbox_before_the_1001_close() {
    const MESSAGES: usize = 600;
    let mut server = Server::start(&[
        ("server.reactors", "2"),
        ("server.shutdown_timeout_ms", "5000"),
        ("websocket.max_outbox_bytes", "8388608"),
    ]);
    let mut clients: Vec<Ws> = (0..4)
        .map(|i| server.connect(&format!("user=u{i}")))
        .collect();
    let body = "b".repeat(2048);
    let mut admin = server.admin();
    // 1.2 MB per client, unread: more than the socket buffers hold, so most waits in the server's outboxes.
    for i in 0..MESSAGES {
        let response = admin.request(
            "POST",
            "/publish/all",
            format!("{i:04}{body}").as_bytes(),
            &[],
        );
        assert_eq!(response.status, 202);
    }
    server.sigterm();
    for (c, ws) in clients.iter_mut().enumerate() {
        for i in 0..MESSAGES {
            let text = recv_text(ws);
            assert_eq!(&text[..4], format!("{i:04}"), "client {c}");
        }
        let frame = recv_close(ws).expect("close frame with a code");
        assert_eq!(frame.code, CloseCode::Away, "client {c}");
        finish_close(ws);
    }
    let status = server
        .wait_exit(Duration::from_secs(6))
        .expect("server still running after shutdown_timeout_ms");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

#[test]
fn sigterm_exits_0_by_shutdown_timeout_when_a_client_never_answers_the_close() {
    let mut server = Server::start(&[
        ("server.shutdown_timeout_ms", "500"),
        ("websocket.timer_tick_ms", "10"),
    ]);
    // Completes the upgrade, then neither reads nor answers anything.
    let _silent = server.raw_upgrade("user=silent");
    let signalled = Instant::now();
    server.sigterm();
    let status = server
        .wait_exit(Duration::from_secs(3))
        .expect("server still running 3 s after SIGTERM with shutdown_timeout_ms = 500");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(
        took >= Duration::from_millis(400),
        "exited after {took:?}, before the client could answer"
    );
    assert!(took < Duration::from_millis(1500), "shutdown took {took:?}");
}

#[test]
fn while_draining_healthz_and_publishes_answer_503() {
    let mut server = Server::start(&[
        ("server.shutdown_timeout_ms", "1500"),
        ("websocket.close_timeout_ms", "1500"),
        ("websocket.timer_tick_ms", "10"),
    ]);
    let healthz = server.request("GET", "/healthz", b"", &[]);
    assert_eq!(healthz.status, 200);
    assert_eq!(healthz.json()["status"], "ok");
    // A client that never answers the close keeps the server draining for the shutdown timeout.
    let _silent = server.raw_upgrade("user=silent");
    server.sigterm();
    assert!(
        wait_until(Duration::from_secs(1), || server
            .request("GET", "/healthz", b"", &[])
            .status
            == 503),
        "healthz did not turn 503 while draining"
    );
    let healthz = server.request("GET", "/healthz", b"", &[]);
    assert_eq!(healthz.json()["status"], "draining");
    let publish = server.post("/publish/all", "too late");
    assert_eq!(publish.status, 503);
    assert!(publish.json()["error"]
        .as_str()
        .unwrap()
        .contains("shutting down"));
    let status = server
        .wait_exit(Duration::from_secs(4))
        .expect("server did not exit");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sigterm_with_no_connections_exits_0_promptly() {
    let mut server = Server::start(&[]);
    server.sigterm();
    let status = server
        .wait_exit(Duration::from_secs(2))
        .expect("idle server did not exit within 2 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

#[test]
fn client_close_is_echoed_and_the_connection_removed() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=leaving");
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    // RFC 6455 §5.5.1: the server answers with a close frame echoing the code.
    let frame = recv_close(&mut ws).expect("close reply with a code");
    assert_eq!(frame.code, CloseCode::Normal);
    finish_close(&mut ws);
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_connections_open", &[]) == 0
    }));
    assert_eq!(server.metric("densepush_client_closes_total", &[]), 1);
    let presence = server.request("GET", "/presence/user/leaving", b"", &[]);
    assert_eq!(presence.json()["connections"], 0);
}

#[test]
fn abrupt_disconnect_is_removed_and_counted() {
    let server = Server::start(&[]);
    let ws = server.connect("user=gone");
    drop(ws);
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_connections_open", &[]) == 0
    }));
    assert_eq!(server.metric("densepush_abrupt_closes_total", &[]), 1);
    let presence = server.request("GET", "/presence/user/gone", b"", &[]);
    assert_eq!(presence.json()["connections"], 0);
}

#[test]
fn unmasked_client_frame_fails_the_connection_with_1002() {
    let server = Server::start(&[]);
    let mut stream = server.raw_upgrade("user=rude");
    use std::io::Write;
    // RFC 6455 §5.1: a server must close on an unmasked client frame.
    stream.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a close frame");
    assert_eq!(opcode, 0x8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1002);
    assert_eq!(wait_end(&mut stream), End::Eof);
    assert_eq!(
        server.metric("densepush_protocol_error_closes_total", &[]),
        1
    );
}
