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
