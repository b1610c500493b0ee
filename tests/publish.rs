//! Publishing through the admin API: each target kind reaches exactly its connections, message types and
//! size limits, ordering under a burst, and delivery across reactors.

mod common;

use common::*;
use std::time::Duration;
use tungstenite::Message;

#[test]
fn publish_to_user_reaches_every_connection_of_that_user_and_no_other() {
    let server = Server::start(&[]);
    let mut alice_phone = server.connect("user=alice&client=phone");
    let mut alice_web = server.connect("user=alice&client=web");
    let mut alice_bare = server.connect("user=alice");
    let mut bob = server.connect("user=bob");
    let mut alice2 = server.connect("user=alice2");

    let response = server.post("/publish/user/alice", "hello alice");
    assert_eq!(response.status, 202, "{}", response.text());
    let json = response.json();
    assert_eq!(json["accepted"], true);
    assert_eq!(json["target"], "user");

    for ws in [&mut alice_phone, &mut alice_web, &mut alice_bare] {
        assert_eq!(recv_text(ws), "hello alice");
    }
    assert_next_is_marker(
        &server,
        &mut [
            &mut alice_phone,
            &mut alice_web,
            &mut alice_bare,
            &mut bob,
            &mut alice2,
        ],
        "marker",
    );
}

#[test]
fn publish_to_user_client_reaches_only_that_tokens_connections_of_that_user() {
    let server = Server::start(&[]);
    let mut phone_1 = server.connect("user=alice&client=phone");
    let mut phone_2 = server.connect("user=alice&client=phone");
    let mut web = server.connect("user=alice&client=web");
    let mut no_client = server.connect("user=alice");
    let mut bob_phone = server.connect("user=bob&client=phone");

    let response = server.post("/publish/user/alice/client/phone", "to alice's phone");
    assert_eq!(response.status, 202, "{}", response.text());
    assert_eq!(response.json()["target"], "user_client");

    assert_eq!(recv_text(&mut phone_1), "to alice's phone");
    assert_eq!(recv_text(&mut phone_2), "to alice's phone");
    assert_next_is_marker(
        &server,
        &mut [
            &mut phone_1,
            &mut phone_2,
            &mut web,
            &mut no_client,
            &mut bob_phone,
        ],
        "marker",
    );
}

#[test]
fn publish_to_channel_reaches_subscribers_only() {
    let server = Server::start(&[]);
    let mut both = server.connect("user=u1&channels=news,sports");
    let mut news = server.connect("user=u2&channels=news");
    let mut sports = server.connect("user=u3&channels=sports");
    let mut none = server.connect("user=u4");
    let mut named_news = server.connect("user=news");

    let response = server.post("/publish/channel/news", "breaking");
    assert_eq!(response.status, 202, "{}", response.text());
    assert_eq!(response.json()["target"], "channel");

    assert_eq!(recv_text(&mut both), "breaking");
    assert_eq!(recv_text(&mut news), "breaking");
    assert_next_is_marker(
        &server,
        &mut [
            &mut both,
            &mut news,
            &mut sports,
            &mut none,
            &mut named_news,
        ],
        "marker",
    );
}

#[test]
fn publish_to_all_reaches_every_connection() {
    let server = Server::start(&[]);
    let mut clients = vec![
        server.connect("user=a"),
        server.connect("user=a&client=x"),
        server.connect("user=b&channels=c1"),
        server.connect("user=c"),
    ];
    let response = server.post("/publish/all", "everyone");
    assert_eq!(response.status, 202, "{}", response.text());
    assert_eq!(response.json()["target"], "all");
    for ws in &mut clients {
        assert_eq!(recv_text(ws), "everyone");
    }
    // Exactly once each.
    let mut refs: Vec<&mut Ws> = clients.iter_mut().collect();
    assert_next_is_marker(&server, &mut refs, "marker");
}

#[test]
fn publish_to_a_user_with_no_connections_is_accepted_and_delivers_nothing() {
    let server = Server::start(&[]);
    let mut bob = server.connect("user=bob");
    server.publish("/publish/user/nobody", "lost");
    assert_next_is_marker(&server, &mut [&mut bob], "marker");
}

#[test]
fn octet_stream_publish_arrives_as_a_binary_frame() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    let payload: Vec<u8> = vec![0x00, 0x9f, 0x92, 0x96, 0xff, 0xfe, b'a'];
    let response = server.request(
        "POST",
        "/publish/user/alice",
        &payload,
        &[("Content-Type", "application/octet-stream")],
    );
    assert_eq!(response.status, 202, "{}", response.text());
    assert_eq!(response.json()["binary"], true);
    match recv(&mut ws) {
        Message::Binary(bytes) => assert_eq!(bytes.as_ref(), payload.as_slice()),
        other => panic!("expected a binary message, got {other:?}"),
    }
}

#[test]
fn utf8_publish_without_content_type_arrives_as_a_text_frame() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    server.publish("/publish/user/alice", "héllo ✓");
    match recv(&mut ws) {
        Message::Text(text) => assert_eq!(text.as_str(), "héllo ✓"),
        other => panic!("expected a text message, got {other:?}"),
    }
}

#[test]
fn non_utf8_body_without_octet_stream_is_rejected_with_400_json() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    let response = server.request(
        "POST",
        "/publish/user/alice",
        &[0xff, 0xfe, 0x00],
        &[("Content-Type", "text/plain")],
    );
    assert_eq!(response.status, 400);
    assert!(
        response
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json")),
        "{:?}",
        response.headers
    );
    assert!(response.json()["error"].is_string(), "{}", response.text());
    assert_next_is_marker(&server, &mut [&mut ws], "marker");
}

#[test]
fn body_over_max_publish_bytes_is_rejected_with_413() {
    let server = Server::start(&[("admin.max_publish_bytes", "1024")]);
    let mut ws = server.connect("user=alice");
    let response = server.post("/publish/user/alice", &"x".repeat(1025));
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(response.json()["error"].is_string());
    assert_next_is_marker(&server, &mut [&mut ws], "marker");
}

#[test]
fn body_of_exactly_max_publish_bytes_is_accepted() {
    let server = Server::start(&[("admin.max_publish_bytes", "1024")]);
    let mut ws = server.connect("user=alice");
    let body = "y".repeat(1024);
    server.publish("/publish/user/alice", &body);
    assert_eq!(recv_text(&mut ws), body);
}

#[test]
fn burst_of_10000_messages_to_one_user_arrives_complete_and_in_order() {
    const COUNT: usize = 10_000;
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    let mut admin = server.admin();
    // All requests pipelined in one write on one keep-alive connection.
    let mut requests = Vec::new();
    for i in 0..COUNT {
        requests.extend(admin.encode(
            "POST",
            "/publish/user/alice",
            format!("m{i}").as_bytes(),
            &[],
        ));
    }
    admin.write_raw(&requests);
    for i in 0..COUNT {
        let response = admin.read_response();
        assert_eq!(response.status, 202, "request {i}: {}", response.text());
    }
    for i in 0..COUNT {
        let text = recv_text(&mut ws);
        assert_eq!(text, format!("m{i}"), "message {i} out of order or missing");
    }
    assert_next_is_marker(&server, &mut [&mut ws], "marker");
}

#[test]
fn two_reactor_server_delivers_to_users_on_both_reactors() {
    let server = Server::start(&[("server.reactors", "2")]);
    let mut clients: Vec<Ws> = Vec::new();
    // The kernel spreads connections over the two SO_REUSEPORT listeners by hash; open until both hold some.
    let spread = |server: &Server| {
        let text = server.metrics_text();
        let r0 = metric_in(&text, "densepush_connections_open", &[("reactor", "0")]);
        let r1 = metric_in(&text, "densepush_connections_open", &[("reactor", "1")]);
        (r0, r1)
    };
    loop {
        if clients.len() >= 20 {
            let (r0, r1) = spread(&server);
            if (r0 > 0 && r1 > 0) || clients.len() >= 200 {
                break;
            }
        }
        let i = clients.len();
        clients.push(server.connect(&format!("user=u{i}")));
    }
    let (r0, r1) = spread(&server);
    assert!(
        r0 > 0 && r1 > 0,
        "connections not spread: reactor0={r0} reactor1={r1}"
    );
    assert_eq!(r0 + r1, clients.len() as u64);

    for i in 0..clients.len() {
        server.publish(&format!("/publish/user/u{i}"), &format!("for u{i}"));
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(recv_text(ws), format!("for u{i}"), "user u{i}");
    }
    server.publish("/publish/all", "all of you");
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(recv_text(ws), "all of you", "user u{i}");
    }
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_frames_delivered_total", &[]) == 2 * clients.len() as u64
    }));
}

/// Connections of `query` until both reactors of a 2-reactor server accepted at least `min_each` (the kernel
/// picks the listener; a user's connections then all live on its home reactor, the others handed over).
fn spread_over_two_reactors(server: &Server, query: &str, min_each: u64) -> Vec<Ws> {
    let mut clients = Vec::new();
    loop {
        let text = server.metrics_text();
        let r0 = metric_in(&text, "densepush_tcp_accepted_total", &[("reactor", "0")]);
        let r1 = metric_in(&text, "densepush_tcp_accepted_total", &[("reactor", "1")]);
        if r0 >= min_each && r1 >= min_each {
            return clients;
        }
        assert!(clients.len() < 200, "connections never spread: {r0} / {r1}");
        clients.push(server.connect(query));
    }
}

#[test]
fn one_users_connections_on_both_reactors_all_receive_user_client_and_channel_publishes() {
    let server = Server::start(&[("server.reactors", "2")]);
    let mut alice = spread_over_two_reactors(&server, "user=alice&client=phone&channels=news", 2);
    let mut bob = server.connect("user=bob&client=phone");
    for (path, body) in [
        ("/publish/user/alice", "to alice"),
        ("/publish/user/alice/client/phone", "to alice's phone"),
        ("/publish/channel/news", "news"),
    ] {
        server.publish(path, body);
        for (i, ws) in alice.iter_mut().enumerate() {
            assert_eq!(recv_text(ws), body, "alice connection {i}");
        }
    }
    assert_next_is_marker(&server, &mut [&mut bob], "marker");
}

#[test]
fn kick_reaches_a_users_connections_on_both_reactors() {
    let server = Server::start(&[("server.reactors", "2")]);
    let mut alice = spread_over_two_reactors(&server, "user=alice", 1);
    let response = server.request("DELETE", "/connections/user/alice", b"", &[]);
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["closed"], alice.len());
    for ws in &mut alice {
        let frame = recv_close(ws).expect("close frame with a code");
        assert_eq!(u16::from(frame.code), 4000);
    }
}

#[test]
fn messages_to_different_targets_keep_publish_order_on_each_connection() {
    let server = Server::start(&[("server.reactors", "2")]);
    let mut clients = spread_over_two_reactors(&server, "user=alice&client=phone&channels=c", 1);
    let mut admin = server.admin();
    let targets = [
        "/publish/user/alice",
        "/publish/all",
        "/publish/channel/c",
        "/publish/user/alice/client/phone",
    ];
    for i in 0..200 {
        let response = admin.request(
            "POST",
            targets[i % targets.len()],
            format!("{i}").as_bytes(),
            &[],
        );
        assert_eq!(response.status, 202);
    }
    for (c, ws) in clients.iter_mut().enumerate() {
        for i in 0..200 {
            assert_eq!(recv_text(ws), i.to_string(), "connection {c}");
        }
    }
}
