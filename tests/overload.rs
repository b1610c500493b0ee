//! A reactor that falls behind: publishes beyond its pending-command bound get 503 with Retry-After, and every
//! publish that got 202 still reaches every connection, in order.

mod common;

use common::{read_frame, Server};
use std::io::BufReader;
use std::time::Duration;

#[test]
fn publishes_past_the_reactor_backlog_get_503_and_accepted_ones_all_arrive_in_order() {
    let server = Server::start(&[("server.reactors", "1")]);
    // Enough recipients that one publish costs the reactor far more than it costs the admin thread to accept.
    let clients: Vec<_> = (0..300)
        .map(|i| server.raw_upgrade(&format!("user=u{i}")))
        .collect();
    let mut admin = server.admin();

    let total = 12_000;
    let batch = 500;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for start in (0..total).step_by(batch) {
        let mut bytes = Vec::new();
        for i in start..start + batch {
            bytes.extend(admin.encode("POST", "/publish/all", i.to_string().as_bytes(), &[]));
        }
        admin.write_raw(&bytes);
        for i in start..start + batch {
            let response = admin.read_response();
            match response.status {
                202 => accepted.push(i.to_string()),
                503 => {
                    assert_eq!(response.header("Retry-After"), Some("1"));
                    assert!(response.json()["error"]
                        .as_str()
                        .unwrap()
                        .contains("overloaded"));
                    refused += 1;
                }
                other => panic!(
                    "publish {i}: unexpected status {other}: {}",
                    response.text()
                ),
            }
        }
    }
    assert!(
        refused > 0,
        "12,000 fast publishes to 300 connections never filled the 4,096-command backlog"
    );
    assert!(
        accepted.len() >= 4_096,
        "only {} publishes accepted",
        accepted.len()
    );

    for (n, client) in clients.into_iter().enumerate() {
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut client = BufReader::new(client);
        for expected in &accepted {
            let (_, opcode, payload) = read_frame(&mut client)
                .unwrap_or_else(|e| panic!("client {n}: reading {expected}: {e}"))
                .unwrap_or_else(|| panic!("client {n}: closed before {expected}"));
            assert_eq!(opcode, 1, "client {n}: text frame expected");
            assert_eq!(
                String::from_utf8(payload).unwrap(),
                *expected,
                "client {n}: out of order or lost"
            );
        }
    }
    assert_eq!(
        server.metric("densepush_slow_consumer_closes_total", &[]),
        0
    );
}

#[test]
fn one_publish_to_more_connections_than_a_turn_sends_pauses_for_sockets_and_still_reaches_everyone()
{
    // One reactor applies about 8,192 sends per turn of its loop; a publish to more connections than that
    // used to be applied whole, without a read or a timer in between. Now it is delivered over several turns.
    let server = Server::start(&[("server.reactors", "1"), ("log.level", "info")]);
    let count = 9_000;
    let mut clients: Vec<_> = (0..count)
        .map(|i| server.raw_upgrade(&format!("user=u{i}")))
        .collect();
    server.publish("/publish/all", "to everyone");
    assert!(common::wait_until(Duration::from_secs(20), || {
        server.metric("densepush_frames_delivered_total", &[]) == count as u64
    }));
    assert!(server.metric("densepush_fanout_yields_total", &[]) >= 1);
    for (i, client) in clients.iter_mut().enumerate() {
        let (_, opcode, payload) = read_frame(client).unwrap().expect("a frame");
        assert_eq!(
            (opcode, payload.as_slice()),
            (0x1, &b"to everyone"[..]),
            "client {i}"
        );
    }
    // A publish that fits in one turn does not pause.
    let yields = server.metric("densepush_fanout_yields_total", &[]);
    server.publish("/publish/user/u1", "one");
    let (_, _, payload) = read_frame(&mut clients[1]).unwrap().expect("a frame");
    assert_eq!(payload, b"one");
    assert_eq!(server.metric("densepush_fanout_yields_total", &[]), yields);
}
