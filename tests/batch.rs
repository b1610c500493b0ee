//! `POST /publish/batch` end to end: every target kind, order per target, refusals that publish nothing (400
//! naming the message, 413 at each limit), history offsets, and a batch larger than a reactor's turn.

mod common;

use common::*;
use serde_json::json;
use tungstenite::Message;

fn batch(server: &Server, body: &serde_json::Value) -> Response {
    server.post("/publish/batch", &body.to_string())
}

#[test]
fn one_message_reaches_every_target_kind_framed_once() {
    let server = Server::start(&[("server.reactors", "2")]);
    let mut alice = server.connect("user=alice");
    let mut bob_phone = server.connect("user=bob&client=phone");
    let mut bob_web = server.connect("user=bob&client=web");
    let mut news = server.connect("user=carol&channels=news");
    let mut dave = server.connect("user=dave");

    let r = batch(
        &server,
        &json!({"messages": [
            {"targets": ["user/alice", "user/bob/client/phone", "channel/news"], "data": "hello"},
            {"targets": ["all"], "data": "everyone"},
            {"targets": ["user/dave"], "data_base64": "AAH/"},
        ]}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json(), json!({"messages": 3, "targets": 5}));

    for ws in [&mut alice, &mut bob_phone, &mut news] {
        assert_eq!(recv_text(ws), "hello");
        assert_eq!(recv_text(ws), "everyone");
    }
    assert_eq!(recv_text(&mut bob_web), "everyone");
    assert_eq!(recv_text(&mut dave), "everyone");
    match recv(&mut dave) {
        Message::Binary(bytes) => assert_eq!(&bytes[..], [0, 1, 0xff]),
        other => panic!("expected binary, got {other:?}"),
    }
    assert_next_is_marker(
        &server,
        &mut [
            &mut alice,
            &mut bob_phone,
            &mut bob_web,
            &mut news,
            &mut dave,
        ],
        "m",
    );
    assert_eq!(server.metric("densepush_batch_publishes_total", &[]), 1);
    let published = |kind| server.metric("densepush_messages_published_total", &[("target", kind)]);
    assert_eq!(
        [
            published("user"),
            published("user_client"),
            published("channel"),
            published("all")
        ],
        [2, 1, 1, 2],
        "the marker is one more to all"
    );
}

#[test]
fn each_target_gets_its_messages_in_the_order_of_the_body() {
    let server = Server::start(&[("server.reactors", "2")]);
    let mut a = server.connect("user=a&channels=c");
    let mut b = server.connect("user=b");
    let messages: Vec<serde_json::Value> = (0..200)
        .map(|i| {
            let targets = match i % 3 {
                0 => json!(["user/a", "user/b"]),
                1 => json!(["user/b", "channel/c"]),
                _ => json!(["user/a"]),
            };
            json!({"targets": targets, "data": format!("{i}")})
        })
        .collect();
    let r = batch(&server, &json!({ "messages": messages }));
    assert_eq!(r.status, 202, "{}", r.text());
    for i in 0..200 {
        // a: as user/a (i % 3 != 1) and as a member of channel c (i % 3 == 1): every message once.
        assert_eq!(recv_text(&mut a), i.to_string());
        if i % 3 != 2 {
            assert_eq!(recv_text(&mut b), i.to_string());
        }
    }
    assert_next_is_marker(&server, &mut [&mut a, &mut b], "m");
}

#[test]
fn a_malformed_message_refuses_the_batch_naming_its_index_and_nothing_is_published() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice&channels=news");
    for (body, index, why) in [
        (
            json!({"messages": [
                {"targets": ["user/alice"], "data": "would be first"},
                {"targets": ["user/alice", "nobody/x"], "data": "x"},
            ]}),
            1,
            "targets[1]",
        ),
        (
            json!({"messages": [
                {"targets": ["channel/news"], "data": "x"},
                {"targets": ["all"], "data": "y"},
                {"targets": ["all"], "data_base64": "not base64!"},
            ]}),
            2,
            "data_base64",
        ),
        (
            json!({"messages": [{"targets": [], "data": "x"}]}),
            0,
            "targets is empty",
        ),
    ] {
        let r = batch(&server, &body);
        assert_eq!(r.status, 400, "{}", r.text());
        let answer = r.json();
        assert_eq!(answer["index"], index, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains(why), "{answer}");
    }
    let r = server.post("/publish/batch", "{not json");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json().get("index").is_none());
    assert_next_is_marker(&server, &mut [&mut ws], "nothing before me");
    assert_eq!(server.metric("densepush_batch_publishes_total", &[]), 0);
}

#[test]
fn batches_over_the_limits_get_413_and_publish_nothing() {
    let server = Server::start(&[
        ("admin.max_batch_targets", "3"),
        ("admin.max_batch_bytes", "2048"),
        ("admin.max_publish_bytes", "16"),
    ]);
    let mut ws = server.connect("user=alice");
    let r = batch(
        &server,
        &json!({"messages": [
            {"targets": ["user/alice", "user/alice"], "data": "a"},
            {"targets": ["user/alice", "user/alice"], "data": "b"},
        ]}),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["index"], 1);
    assert!(
        r.text().contains("admin.max_batch_targets (3)"),
        "{}",
        r.text()
    );

    let r = batch(
        &server,
        &json!({"messages": [{"targets": ["user/alice"], "data": "seventeen bytes!!"}]}),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("admin.max_publish_bytes"), "{}", r.text());

    // A body over admin.max_batch_bytes is refused from its head, before it is read, like any oversized
    // body; the batch's limit is its own (a single publish of that size would be refused at 16 bytes).
    let big = json!({"messages": [{"targets": ["user/alice"], "data": "x".repeat(3000)}]});
    let r = batch(&server, &big);
    assert_eq!(r.status, 413, "{}", r.text());
    let r = server.post("/publish/user/alice", &"y".repeat(17));
    assert_eq!(r.status, 413, "{}", r.text());
    assert_next_is_marker(&server, &mut [&mut ws], "m");
}

#[test]
fn stored_messages_get_offsets_in_the_answer_and_replay_after_a_reconnect() {
    let server = Server::start(&[("history.user", "true"), ("history.channel", "true")]);
    let r = batch(
        &server,
        &json!({"messages": [
            {"targets": ["user/alice", "all", "channel/news"], "data": "one"},
            {"targets": ["user/alice"], "data": "two"},
        ]}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let positions = r.json()["positions"].clone();
    let epoch = positions[0]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        positions,
        json!([
            {"message": 0, "target": 0, "stream": "user:alice", "epoch": epoch, "offset": 1},
            {"message": 0, "target": 2, "stream": "channel:news", "epoch": positions[1]["epoch"], "offset": 1},
            {"message": 1, "target": 0, "stream": "user:alice", "epoch": epoch, "offset": 2},
        ]),
        "all keeps no history here"
    );
    let mut ws = server.connect(&format!("user=alice&since=user:alice@{epoch}:0"));
    for (offset, data) in [(1, "one"), (2, "two")] {
        let v: serde_json::Value = serde_json::from_str(&recv_text(&mut ws)).unwrap();
        assert_eq!(
            (v["o"].as_u64(), v["d"].as_str()),
            (Some(offset), Some(data)),
            "{v}"
        );
    }
}

#[test]
fn a_batch_larger_than_a_reactors_turn_arrives_whole_and_in_order() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    // 10,000 sends to one connection: more than a reactor applies per turn (8,192), so the batch is applied in
    // parts with socket reads and timers between them.
    let messages: Vec<serde_json::Value> = (0..10_000)
        .map(|i| json!({"targets": ["user/alice"], "data": format!("{i}")}))
        .collect();
    let r = batch(&server, &json!({ "messages": messages }));
    assert_eq!(r.status, 202, "{}", r.text());
    for i in 0..10_000 {
        assert_eq!(recv_text(&mut ws), i.to_string());
    }
    assert_next_is_marker(&server, &mut [&mut ws], "m");
    // The rest of a batch put back counts as pending until applied; nothing is left over.
    assert!(wait_until(std::time::Duration::from_secs(5), || server
        .metric("densepush_commands_pending", &[])
        == 0));
}

#[test]
fn batches_past_the_reactor_backlog_get_503_and_accepted_ones_all_arrive_in_order() {
    let server = Server::start(&[("server.reactors", "1")]);
    // Each message goes to all 100 connections: applying a batch costs the reactor far more than accepting it
    // costs the admin thread, and a batch weighs one pending command per message (4,096 at most).
    let clients: Vec<_> = (0..100)
        .map(|i| server.raw_upgrade(&format!("user=u{i}")))
        .collect();
    let mut admin = server.admin();
    let (mut accepted, mut refused) = (Vec::new(), 0);
    let mut requests = Vec::new();
    for b in 0..12 {
        let messages: Vec<serde_json::Value> = (0..1_000)
            .map(|i| json!({"targets": ["all"], "data": format!("{b}.{i}")}))
            .collect();
        requests.extend(admin.encode(
            "POST",
            "/publish/batch",
            json!({ "messages": messages }).to_string().as_bytes(),
            &[],
        ));
    }
    admin.write_raw(&requests);
    for b in 0..12 {
        let response = admin.read_response();
        match response.status {
            202 => accepted.extend((0..1_000).map(|i| format!("{b}.{i}"))),
            503 => {
                assert_eq!(response.header("Retry-After"), Some("1"));
                refused += 1;
            }
            other => panic!("batch {b}: {other}: {}", response.text()),
        }
    }
    assert!(
        refused > 0,
        "12,000 messages to 100 connections never filled the backlog"
    );
    assert!(accepted.len() >= 4_000, "only {} accepted", accepted.len());
    for (n, client) in clients.into_iter().enumerate() {
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut client = std::io::BufReader::new(client);
        for expected in &accepted {
            let (_, _, payload) = read_frame(&mut client)
                .unwrap_or_else(|e| panic!("client {n}: reading {expected}: {e}"))
                .unwrap_or_else(|| panic!("client {n}: closed before {expected}"));
            assert_eq!(String::from_utf8(payload).unwrap(), *expected, "client {n}");
        }
    }
    assert!(wait_until(std::time::Duration::from_secs(5), || server
        .metric("densepush_commands_pending", &[])
        == 0));
}
