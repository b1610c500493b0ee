//! Slow consumers: a connection whose unsent bytes pass `websocket.max_outbox_bytes` is closed with 1008,
//! while connections that keep reading get every message, in order.

mod common;

use common::*;
use std::time::Duration;

const MESSAGE_BYTES: usize = 4096;

fn message(i: usize) -> String {
    let mut text = format!("seq:{i:06}:");
    text.extend(std::iter::repeat_n('p', MESSAGE_BYTES - text.len()));
    text
}

fn seq_of(text: &str) -> usize {
    text.strip_prefix("seq:")
        .and_then(|rest| rest.get(..6))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a numbered message: {:?}", &text[..text.len().min(20)]))
}

#[test]
fn client_that_stops_reading_is_closed_as_slow_consumer_while_a_reader_gets_every_message_in_order()
{
    let server = Server::start(&[
        ("websocket.max_outbox_bytes", "65536"),
        ("admin.max_publish_bytes", "65536"),
    ]);
    let mut stuck = tiny_window_stream(&server);
    upgrade_on(&mut stuck, "user=stuck");
    let mut reader_ws = server.connect("user=reader");
    let reader = std::thread::spawn(move || {
        let mut received = 0usize;
        loop {
            let text = recv_text(&mut reader_ws);
            if text == "end" {
                // The socket goes back too: the reader must stay connected for the checks below.
                return (received, reader_ws);
            }
            assert_eq!(
                seq_of(&text),
                received,
                "reader: message out of order or missing"
            );
            assert_eq!(text.len(), MESSAGE_BYTES);
            received += 1;
        }
    });

    // Publish until the stuck client is closed (its outbox passes 64 KiB), then a few more.
    let mut admin = server.admin();
    let mut published = 0usize;
    let mut after_close = None;
    while published < 4000 {
        let response = admin.request("POST", "/publish/all", message(published).as_bytes(), &[]);
        assert_eq!(response.status, 202, "{}", response.text());
        published += 1;
        if after_close.is_none()
            && published % 16 == 0
            && server.metric("densepush_slow_consumer_closes_total", &[]) > 0
        {
            after_close = Some(published);
        }
        if after_close.is_some_and(|at| published >= at + 32) {
            break;
        }
    }
    assert!(
        after_close.is_some(),
        "no slow-consumer close after {published} messages of {MESSAGE_BYTES} bytes"
    );
    server.publish("/publish/all", "end");
    let (received, _reader_ws) = reader.join().expect("reader thread");
    assert_eq!(received, published, "the reading client missed messages");
    assert_eq!(
        server.metric("densepush_slow_consumer_closes_total", &[]),
        1
    );

    // The stuck client, reading at last: a gap-free prefix of the messages, then close 1008.
    let mut next = 0usize;
    let close_code = loop {
        let (fin, opcode, payload) = read_frame(&mut stuck)
            .expect("reading the stuck connection")
            .expect("EOF before the close frame");
        assert!(fin);
        match opcode {
            0x1 => {
                let text = String::from_utf8(payload).expect("utf-8");
                assert_eq!(
                    seq_of(&text),
                    next,
                    "stuck client: gap in the messages it did get"
                );
                next += 1;
            }
            0x9 => continue,
            0x8 => break u16::from_be_bytes([payload[0], payload[1]]),
            other => panic!("unexpected opcode {other:#x}"),
        }
    };
    assert_eq!(close_code, 1008);
    assert!(
        next < published,
        "the stuck client got everything: it was not slow"
    );
    // Answer the close; the server then closes TCP.
    write_frame(&mut stuck, 0x8, &1008u16.to_be_bytes()).unwrap();
    assert_eq!(wait_end(&mut stuck), End::Eof);
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_connections_open", &[]) == 1
    }));
}

#[test]
fn slow_consumer_that_never_reads_again_is_dropped_after_close_timeout() {
    let server = Server::start(&[
        ("websocket.max_outbox_bytes", "65536"),
        ("admin.max_publish_bytes", "65536"),
        ("websocket.close_timeout_ms", "300"),
        ("websocket.timer_tick_ms", "10"),
    ]);
    let mut stuck = tiny_window_stream(&server);
    upgrade_on(&mut stuck, "user=stuck");
    let mut admin = server.admin();
    let mut published = 0;
    while server.metric("densepush_slow_consumer_closes_total", &[]) == 0 {
        assert!(
            published < 4000,
            "no slow-consumer close after {published} messages"
        );
        for _ in 0..16 {
            let response = admin.request(
                "POST",
                "/publish/user/stuck",
                message(published).as_bytes(),
                &[],
            );
            assert_eq!(response.status, 202);
            published += 1;
        }
    }
    assert!(
        wait_until(Duration::from_secs(3), || {
            server.metric("densepush_connections_open", &[]) == 0
        }),
        "slow consumer still open well after close_timeout_ms"
    );
}
