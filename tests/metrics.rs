//! `/metrics`: the Prometheus counters and gauges move with what the server does.

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let server = Server::start(&[]);
    let response = server.request("GET", "/metrics", b"", &[]);
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("text/plain") && ct.contains("version=0.0.4")),
        "{:?}",
        response.headers
    );
    assert!(response
        .text()
        .contains("# TYPE densepush_connections_open gauge"));
}

#[test]
fn connections_open_follows_connects_and_disconnects() {
    let server = Server::start(&[]);
    assert_eq!(server.metric("densepush_connections_open", &[]), 0);
    let a = server.connect("user=a");
    let _b = server.connect("user=b");
    let _c = server.connect("user=c");
    assert_eq!(server.metric("densepush_connections_open", &[]), 3);
    close_ws(a);
    assert!(
        wait_until(Duration::from_secs(2), || server
            .metric("densepush_connections_open", &[])
            == 2),
        "connections_open = {}",
        server.metric("densepush_connections_open", &[])
    );
}

#[test]
fn handshakes_accepted_counts_every_upgrade_and_never_decreases() {
    let server = Server::start(&[]);
    let a = server.connect("user=a");
    let b = server.connect("user=b");
    assert_eq!(server.metric("densepush_handshakes_accepted_total", &[]), 2);
    close_ws(a);
    drop(b);
    let _c = server.connect("user=c");
    assert_eq!(server.metric("densepush_handshakes_accepted_total", &[]), 3);
    assert_eq!(server.metric("densepush_tcp_accepted_total", &[]), 3);
}

#[test]
fn frames_delivered_counts_one_per_message_per_recipient() {
    let server = Server::start(&[]);
    let mut a1 = server.connect("user=a");
    let mut a2 = server.connect("user=a");
    let mut b = server.connect("user=b&channels=ch");
    server.publish("/publish/user/a", "to a");
    server.publish("/publish/channel/ch", "to ch");
    server.publish("/publish/all", "to all");
    server.publish("/publish/user/nobody", "to nobody");
    for ws in [&mut a1, &mut a2] {
        assert_eq!(recv_text(ws), "to a");
        assert_eq!(recv_text(ws), "to all");
    }
    assert_eq!(recv_text(&mut b), "to ch");
    assert_eq!(recv_text(&mut b), "to all");
    // 2 (user a) + 1 (channel) + 3 (all) + 0 (nobody).
    assert!(
        wait_until(Duration::from_secs(2), || {
            server.metric("densepush_frames_delivered_total", &[]) == 6
        }),
        "frames_delivered = {}",
        server.metric("densepush_frames_delivered_total", &[])
    );
}

#[test]
fn messages_published_counts_accepted_publishes_by_target_kind() {
    let server = Server::start(&[]);
    let publish_n = |path: &str, n: usize| {
        for _ in 0..n {
            server.publish(path, "x");
        }
    };
    publish_n("/publish/user/u", 1);
    publish_n("/publish/user/u/client/c", 2);
    publish_n("/publish/channel/ch", 3);
    publish_n("/publish/all", 4);
    // A refused publish is not counted.
    let refused = server.request("POST", "/publish/all", &[0xff], &[]);
    assert_eq!(refused.status, 400);
    let text = server.metrics_text();
    let published = |target: &str| {
        metric_in(
            &text,
            "densepush_messages_published_total",
            &[("target", target)],
        )
    };
    assert_eq!(published("user"), 1);
    assert_eq!(published("user_client"), 2);
    assert_eq!(published("channel"), 3);
    assert_eq!(published("all"), 4);
}

#[test]
fn handshakes_rejected_counts_unauthorized_upgrades() {
    let server = Server::start(&[("auth.mode", "jwt"), ("auth.jwt_secret", TEST_SECRET)]);
    assert_eq!(server.refused_status("", &[]), 401);
    assert_eq!(server.refused_status("token=abc", &[]), 401);
    assert_eq!(server.refused_status("user=someone", &[]), 401);
    assert_eq!(
        server.metric(
            "densepush_handshakes_rejected_total",
            &[("reason", "unauthorized")]
        ),
        3
    );
    assert_eq!(server.metric("densepush_handshakes_rejected_total", &[]), 3);
}

#[test]
fn connections_open_is_reported_per_reactor_and_sums_to_the_total() {
    let server = Server::start(&[("server.reactors", "2")]);
    let clients: Vec<Ws> = (0..10)
        .map(|i| server.connect(&format!("user=u{i}")))
        .collect();
    let text = server.metrics_text();
    let r0 = metric_in(&text, "densepush_connections_open", &[("reactor", "0")]);
    let r1 = metric_in(&text, "densepush_connections_open", &[("reactor", "1")]);
    assert_eq!(r0 + r1, clients.len() as u64);
}

#[test]
fn busy_connections_give_their_buffers_back_once_idle() {
    // Per-connection memory is the product: an idle open connection owns no heap buffer, whatever it did.
    let server = Server::start(&[]);
    // A request head split over writes (held in a buffer between reads).
    let mut split = server.raw();
    let head = upgrade_request("user=split", &[]);
    let (a, b) = head.as_bytes().split_at(30);
    split.write_all(a).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    split.write_all(b).unwrap();
    assert!(read_head(&mut split).starts_with("HTTP/1.1 101 "));
    // A client frame split over writes (decoder state held between reads).
    let mut partial = server.raw_upgrade("user=partial");
    let mut frame = Vec::new();
    write_frame(&mut frame, 0x1, b"half and half").unwrap();
    partial.write_all(&frame[..5]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    partial.write_all(&frame[5..]).unwrap();
    // A burst larger than the socket buffers to a client that reads it all later (outbox).
    let mut reader = server.connect("user=reader");
    let body = "z".repeat(32 * 1024);
    let mut admin = server.admin();
    for _ in 0..64 {
        let response = admin.request("POST", "/publish/user/reader", body.as_bytes(), &[]);
        assert_eq!(response.status, 202);
    }
    for _ in 0..64 {
        assert_eq!(recv_text(&mut reader).len(), body.len());
    }
    assert!(
        wait_until(Duration::from_secs(2), || {
            server.metric("densepush_messages_received_total", &[]) == 1
                && server.metric("densepush_buffers_live", &[]) == 0
        }),
        "buffers_live = {} with every connection idle",
        server.metric("densepush_buffers_live", &[])
    );
    assert_eq!(server.metric("densepush_connections_open", &[]), 3);
}

#[test]
fn refused_and_timed_out_handshakes_leave_no_handshaking_connection_counted() {
    let server = Server::start(&[
        ("websocket.handshake_timeout_ms", "200"),
        ("websocket.timer_tick_ms", "10"),
    ]);
    let (status, _) = server.raw_exchange(upgrade_request("", &[]).as_bytes());
    assert_eq!(status, 401);
    let (status, _) = server.raw_exchange(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 404);
    let mut silent = server.raw();
    assert_ne!(wait_end(&mut silent), End::TimedOut);
    assert!(
        wait_until(Duration::from_secs(2), || {
            server.metric("densepush_connections_handshaking", &[]) == 0
        }),
        "connections_handshaking = {}",
        server.metric("densepush_connections_handshaking", &[])
    );
    assert_eq!(server.metric("densepush_connections_open", &[]), 0);
    assert_eq!(server.metric("densepush_buffers_live", &[]), 0);
}

#[test]
fn index_gauges_count_distinct_users_tokened_connections_and_channels() {
    let server = Server::start(&[("websocket.timer_tick_ms", "10")]);
    let a1 = server.connect("user=a&client=phone&channels=x,y");
    let a2 = server.connect("user=a&client=web&channels=x");
    let b = server.connect("user=b&client=phone");
    let gauges = || {
        let text = server.metrics_text();
        (
            metric_in(&text, "densepush_index_users", &[]),
            metric_in(&text, "densepush_index_clients", &[]),
            metric_in(&text, "densepush_index_channels", &[]),
        )
    };
    // Users a, b; three connections carrying a client token (tokens are per connection, not interned);
    // channels x, y.
    assert!(
        wait_until(Duration::from_secs(2), || gauges() == (2, 3, 2)),
        "users, clients, channels = {:?}",
        gauges()
    );
    close_ws(a1);
    close_ws(a2);
    close_ws(b);
    assert!(
        wait_until(Duration::from_secs(2), || gauges() == (0, 0, 0)),
        "index not emptied: {:?}",
        gauges()
    );
}
