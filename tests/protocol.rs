//! Frames from clients (RFC 6455 §5): data is read and discarded, violations fail the connection with the
//! matching close code (§7.4.1), and the close handshake is timed.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

#[test]
fn client_data_messages_are_counted_and_do_not_disturb_delivery() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=chatty");
    ws.send(Message::text("hello server")).unwrap();
    ws.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_messages_received_total", &[]) == 2
    }));
    server.publish("/publish/user/chatty", "reply");
    assert_eq!(recv_text(&mut ws), "reply");
}

#[test]
fn fragmented_client_message_split_over_writes_is_accepted() {
    let server = Server::start(&[]);
    let mut stream = server.raw_upgrade("user=frag");
    let _ = stream.set_nodelay(true);
    // A text message in three fragments (RFC 6455 §5.4), each frame written in two pieces.
    let mut frames = Vec::new();
    let mut first = Vec::new();
    write_frame(&mut first, 0x1, b"hel").unwrap();
    first[0] &= 0x7f; // FIN off
    frames.push(first);
    let mut middle = Vec::new();
    write_frame(&mut middle, 0x0, b"lo ").unwrap();
    middle[0] &= 0x7f;
    frames.push(middle);
    let mut last = Vec::new();
    write_frame(&mut last, 0x0, b"world").unwrap();
    frames.push(last);
    for frame in &frames {
        let (a, b) = frame.split_at(frame.len() / 2);
        stream.write_all(a).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        stream.write_all(b).unwrap();
    }
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_messages_received_total", &[]) == 1
    }));
    server.publish("/publish/user/frag", "ok");
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a frame");
    assert_eq!((opcode, payload.as_slice()), (0x1, b"ok".as_slice()));
    assert_eq!(
        server.metric("densepush_protocol_error_closes_total", &[]),
        0
    );
}

#[test]
fn client_message_over_max_inbound_message_bytes_is_closed_with_1009() {
    let server = Server::start(&[("websocket.max_inbound_message_bytes", "1024")]);
    let mut ws = server.connect("user=big");
    ws.send(Message::binary(vec![0u8; 2000])).unwrap();
    let frame = recv_close(&mut ws).expect("close frame with a code");
    assert_eq!(frame.code, CloseCode::Size);
    assert_eq!(
        server.metric("densepush_protocol_error_closes_total", &[]),
        1
    );
}

#[test]
fn client_text_that_is_not_utf8_is_closed_with_1007() {
    let server = Server::start(&[]);
    let mut stream = server.raw_upgrade("user=bad-text");
    write_frame(&mut stream, 0x1, &[b'o', b'k', 0xff, 0xfe]).unwrap();
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a close frame");
    assert_eq!(opcode, 0x8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1007);
    assert_eq!(wait_end(&mut stream), End::Eof);
}

#[test]
fn kicked_client_that_never_answers_the_close_is_dropped_after_close_timeout() {
    let server = Server::start(&[
        ("websocket.close_timeout_ms", "300"),
        ("websocket.timer_tick_ms", "10"),
    ]);
    let mut stream = server.raw_upgrade("user=deaf");
    let response = server.request("DELETE", "/connections/user/deaf", b"", &[]);
    assert_eq!(response.json()["closed"], 1);
    let kicked = Instant::now();
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a close frame");
    assert_eq!(opcode, 0x8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 4000);
    // No close reply: the server gives up after close_timeout_ms.
    let end = wait_end(&mut stream);
    let took = kicked.elapsed();
    assert_ne!(end, End::TimedOut);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(2000),
        "dropped after {took:?}, expected about 300 ms"
    );
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_connections_open", &[]) == 0
    }));
}

#[test]
fn nothing_is_delivered_after_the_close_frame_of_a_kick() {
    let server = Server::start(&[]);
    let mut stream = server.raw_upgrade("user=k");
    let response = server.request("DELETE", "/connections/user/k", b"", &[]);
    assert_eq!(response.json()["closed"], 1);
    // Published while the close handshake is pending: must not follow the close frame (RFC 6455 §5.5.1).
    server.publish("/publish/user/k", "too late");
    server.publish("/publish/all", "too late for all");
    let (_, opcode, _) = read_frame(&mut stream).unwrap().expect("a close frame");
    assert_eq!(opcode, 0x8);
    write_frame(&mut stream, 0x8, &4000u16.to_be_bytes()).unwrap();
    let rest = read_to_close_or_empty(&mut stream);
    assert!(rest.is_empty(), "bytes after the close frame: {rest:?}");
}

fn read_to_close_or_empty(stream: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn kick_with_code_1000_and_encoded_reason_sends_them() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    let response = server.request(
        "DELETE",
        "/connections/user/alice?code=1000&reason=see+you%21",
        b"",
        &[],
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let frame = recv_close(&mut ws).expect("close frame with a code");
    assert_eq!(frame.code, CloseCode::Normal);
    assert_eq!(frame.reason.as_str(), "see you!");
}

#[test]
fn kick_reason_over_123_bytes_is_400() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    let reason = "r".repeat(124);
    let response = server.request(
        "DELETE",
        &format!("/connections/user/alice?reason={reason}"),
        b"",
        &[],
    );
    assert_eq!(response.status, 400, "{}", response.text());
    assert_next_is_marker(&server, &mut [&mut ws], "marker");
}

#[test]
fn percent_encoded_names_match_between_query_and_admin_path() {
    let server = Server::start(&[]);
    let mut cafe = server.connect("user=caf%C3%A9&channels=a%2Fb");
    let mut slash = server.connect("user=team%2F1");
    server.publish("/publish/user/caf%C3%A9", "for café");
    assert_eq!(recv_text(&mut cafe), "for café");
    server.publish("/publish/channel/a%2Fb", "for a/b");
    assert_eq!(recv_text(&mut cafe), "for a/b");
    server.publish("/publish/user/team%2F1", "for team/1");
    assert_eq!(recv_text(&mut slash), "for team/1");
    assert_next_is_marker(&server, &mut [&mut cafe, &mut slash], "marker");
}

#[test]
fn many_connections_on_two_reactors_all_receive_a_publish_to_all_and_their_channel() {
    const CLIENTS: usize = 300;
    let server = Server::start(&[("server.reactors", "2")]);
    let mut clients: Vec<Ws> = (0..CLIENTS)
        .map(|i| {
            let channel = if i % 2 == 0 { "even" } else { "odd" };
            server.connect(&format!("user=u{i}&channels={channel}"))
        })
        .collect();
    server.publish("/publish/channel/even", "even only");
    server.publish("/publish/all", "everyone");
    for (i, ws) in clients.iter_mut().enumerate() {
        if i % 2 == 0 {
            assert_eq!(recv_text(ws), "even only", "client {i}");
        }
        assert_eq!(recv_text(ws), "everyone", "client {i}");
    }
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_frames_delivered_total", &[]) == (CLIENTS + CLIENTS / 2) as u64
    }));
}
