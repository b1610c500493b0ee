//! `[diagnostics] echo`: complete client data messages come back unchanged when it is on, and nothing comes
//! back when it is off (the default).

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;
use tungstenite::Message;

const ECHO_ON: &[(&str, &str)] = &[("diagnostics.echo", "true")];

#[test]
fn text_message_is_echoed_as_text() {
    let server = Server::start(ECHO_ON);
    let mut ws = server.connect("user=e");
    ws.send(Message::text("héllo")).unwrap();
    assert_eq!(recv(&mut ws), Message::text("héllo"));
}

#[test]
fn binary_message_is_echoed_as_binary() {
    // Larger than a read buffer, so the message straddles reads and waits in the spill.
    let server = Server::start(&[
        ("diagnostics.echo", "true"),
        ("websocket.max_inbound_message_bytes", "300000"),
    ]);
    let mut ws = server.connect("user=e");
    let payload: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    ws.send(Message::binary(payload.clone())).unwrap();
    assert_eq!(recv(&mut ws), Message::binary(payload));
}

#[test]
fn fragmented_message_split_over_writes_is_echoed_whole_and_in_order() {
    let server = Server::start(ECHO_ON);
    let mut stream = server.raw_upgrade("user=frag");
    let _ = stream.set_nodelay(true);
    // RFC 6455 §5.4: a text message in three fragments, each frame written in two pieces.
    let mut bytes = Vec::new();
    for (opcode, part, fin) in [
        (0x1, "hel", false),
        (0x0, "lo ", false),
        (0x0, "wörld", true),
    ] {
        let mut frame = Vec::new();
        write_frame(&mut frame, opcode, part.as_bytes()).unwrap();
        if !fin {
            frame[0] &= 0x7f;
        }
        bytes.push(frame);
    }
    for frame in &bytes {
        let (a, b) = frame.split_at(frame.len() / 2);
        stream.write_all(a).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        stream.write_all(b).unwrap();
    }
    // A second, unfragmented binary message right behind it.
    write_frame(&mut stream, 0x2, &[9, 8, 7]).unwrap();
    let (fin, opcode, payload) = read_frame(&mut stream).unwrap().expect("echo");
    assert!(fin);
    assert_eq!(
        (opcode, payload.as_slice()),
        (0x1, "hello wörld".as_bytes())
    );
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("echo");
    assert_eq!((opcode, payload.as_slice()), (0x2, [9u8, 8, 7].as_slice()));
    assert_eq!(
        server.metric("densepush_protocol_error_closes_total", &[]),
        0
    );
}

#[test]
fn pushes_still_arrive_next_to_echoes() {
    let server = Server::start(ECHO_ON);
    let mut ws = server.connect("user=mix");
    ws.send(Message::text("ping-ish")).unwrap();
    assert_eq!(recv_text(&mut ws), "ping-ish");
    server.publish("/publish/user/mix", "pushed");
    assert_eq!(recv_text(&mut ws), "pushed");
}

#[test]
fn nothing_is_echoed_by_default() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=quiet");
    ws.send(Message::text("hello?")).unwrap();
    ws.send(Message::binary(vec![1u8, 2])).unwrap();
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_messages_received_total", &[]) == 2
    }));
    // The next thing the client reads is the push, not an echo.
    server.publish("/publish/user/quiet", "only this");
    assert_eq!(recv(&mut ws), Message::text("only this"));
}

#[test]
fn a_message_waiting_for_its_last_fragment_is_charged_to_the_buffer_budget_and_refused_past_it() {
    let server = Server::start(&[
        ("diagnostics.echo", "true"),
        ("websocket.max_inbound_message_bytes", "300000"),
        ("websocket.max_buffered_bytes_total", "131072"),
        ("websocket.max_outbox_bytes", "65536"),
        ("admin.max_publish_bytes", "4096"),
    ]);
    let mut stream = server.raw_upgrade("user=frag");
    // A first fragment of 60 KB: the message waits in the connection's buffers for the rest.
    let mut first = Vec::new();
    write_frame(&mut first, 0x2, &[7u8; 60_000]).unwrap();
    first[0] &= 0x7f;
    stream.write_all(&first).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || {
            server.metric("densepush_buffered_bytes", &[]) >= 60_000
        }),
        "the message being assembled is not counted: {}",
        server.metric("densepush_buffered_bytes", &[])
    );
    // Two more fragments of 60 KB would pass the 128 KiB budget: refused with 1013.
    for _ in 0..2 {
        let mut more = Vec::new();
        write_frame(&mut more, 0x0, &[7u8; 60_000]).unwrap();
        more[0] &= 0x7f;
        let _ = stream.write_all(&more);
    }
    let (_, opcode, payload) = read_frame(&mut stream).unwrap().expect("a close frame");
    assert_eq!(opcode, 0x8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1013);
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_buffered_bytes", &[]) == 0
    }));
}
