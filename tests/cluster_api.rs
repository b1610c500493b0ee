//! Runtime subscriptions and batch publishes in a cluster: a real `redis-server` and real densepush nodes. A
//! change or a batch accepted by one node reaches the connections of every node, like a kick or a publish.

mod cluster_common;

use cluster_common::*;
use serde_json::json;

fn start_two(history: bool) -> (Redis, Node, Node) {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let (a, b) = match history {
        false => (Node::start(&redis, "node-a"), Node::start(&redis, "node-b")),
        true => (
            Node::start_with_history(&redis, "node-a"),
            Node::start_with_history(&redis, "node-b"),
        ),
    };
    (redis, a, b)
}

/// The next message, which must be an envelope: `(stream, offset, payload)`.
fn envelope(ws: &mut Client) -> (String, u64, String) {
    let v = json(&recv_text(ws));
    assert!(v.get("type").is_none(), "expected an envelope, got {v}");
    (
        v["s"].as_str().unwrap().to_owned(),
        v["o"].as_u64().unwrap(),
        v["d"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn a_subscription_change_on_one_node_reaches_the_users_connections_on_every_node() {
    let (_redis, a, b) = start_two(false);
    let mut on_a = a.connect_as("alice", "laptop", "");
    let mut on_b = b.connect_as("alice", "phone", "");
    let mut other = b.connect_as("bob", "phone", "");

    let (status, body) = http(a.admin, "PUT", "/subscriptions/user/alice/channel/news", "");
    assert_eq!(status, 200, "{body}");
    let answer = json(&body);
    assert_eq!(answer["cluster"], true);
    assert_eq!(answer["connections"], 1, "this node's count");

    // Through the other node too: the change went through Redis before the answer.
    let (status, body) = b.publish("/publish/channel/news", "news for alice");
    assert_eq!(status, 202, "{body}");
    assert_eq!(recv_text(&mut on_a), "news for alice");
    assert_eq!(recv_text(&mut on_b), "news for alice");
    assert_nothing_more(&b, &mut [&mut on_a, &mut on_b, &mut other]);

    let (status, body) = http(
        b.admin,
        "DELETE",
        "/subscriptions/user/alice/client/phone/channel/news",
        "",
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = a.publish("/publish/channel/news", "laptop only");
    assert_eq!(status, 202);
    assert_eq!(recv_text(&mut on_a), "laptop only");
    assert_nothing_more(&a, &mut [&mut on_a, &mut on_b, &mut other]);
}

#[test]
fn a_batch_on_one_node_reaches_every_target_kind_on_every_node_in_order() {
    let (_redis, a, b) = start_two(false);
    let mut alice_b = b.connect_as("alice", "phone", "news");
    let mut alice_a = a.connect_as("alice", "laptop", "");
    let mut bob_b = b.connect_as("bob", "phone", "");
    let messages: Vec<serde_json::Value> = (0..50)
        .map(|i| {
            json!({
                "targets": ["user/alice/client/phone", "channel/news", "user/bob", "all"],
                "data": format!("{i}"),
            })
        })
        .collect();
    let (status, body) = http(
        a.admin,
        "POST",
        "/publish/batch",
        &json!({ "messages": messages }).to_string(),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        json(&body),
        json!({"messages": 50, "targets": 200, "cluster": true})
    );
    for i in 0..50 {
        let i = i.to_string();
        // alice's phone: as user/alice/client/phone, as a member of news, and as one of all.
        for _ in 0..3 {
            assert_eq!(recv_text(&mut alice_b), i);
        }
        for _ in 0..2 {
            assert_eq!(recv_text(&mut bob_b), i);
        }
        assert_eq!(
            recv_text(&mut alice_a),
            i,
            "the origin's own connection, once"
        );
    }
    assert_nothing_more(&b, &mut [&mut alice_a, &mut alice_b, &mut bob_b]);
}

#[test]
fn batch_offsets_come_from_redis_and_joins_with_since_replay_on_every_node() {
    let (_redis, a, b) = start_two(true);
    let mut alice_b = b.connect("user=alice&recover=1");
    let body = json!({"messages": [
        {"targets": ["user/alice", "channel/news", "all"], "data": "one"},
        {"targets": ["channel/news"], "data": "two"},
        {"targets": ["user/alice"], "data": "three"},
    ]});
    let (status, text) = http(a.admin, "POST", "/publish/batch", &body.to_string());
    assert_eq!(status, 202, "{text}");
    let answer = json(&text);
    let offsets: Vec<(u64, u64, &str, u64)> = answer["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["message"].as_u64().unwrap(),
                p["target"].as_u64().unwrap(),
                p["stream"].as_str().unwrap(),
                p["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        offsets,
        [
            (0, 0, "user:alice", 1),
            (0, 1, "channel:news", 1),
            (1, 0, "channel:news", 2),
            (2, 0, "user:alice", 2),
        ]
    );
    // Live on node b, in envelopes carrying Redis's offsets; `all` keeps no history in these nodes. The batch is
    // one bus entry, applied in the body's order across every target.
    let got: Vec<serde_json::Value> = (0..3).map(|_| json(&recv_text(&mut alice_b))).collect();
    assert_eq!(
        got,
        [
            json!({"s": "user:alice", "e": got[0]["e"], "o": 1, "d": "one"}),
            json!({"s": "all", "d": "one"}),
            json!({"s": "user:alice", "e": got[0]["e"], "o": 2, "d": "three"}),
        ]
    );
    assert_eq!(
        got[0]["e"], answer["positions"][0]["epoch"],
        "the epoch Redis gave"
    );

    // Joining news on node b from offset 1 (asked on node a, which reads the epoch from its own copy, once its
    // subscriber has stored the batch) replays offset 2 from node b's copy.
    let deadline = std::time::Instant::now() + WAIT;
    while json(&http(a.admin, "GET", "/history/channel:news", "").1)["last"] != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "node a never stored the batch"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (status, text) = http(
        a.admin,
        "PUT",
        "/subscriptions/user/alice/channel/news?since=1",
        "",
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        envelope(&mut alice_b),
        ("channel:news".into(), 2, "two".into())
    );
    let (status, _) = a.publish("/publish/channel/news", "live");
    assert_eq!(status, 202);
    assert_eq!(
        envelope(&mut alice_b),
        ("channel:news".into(), 3, "live".into())
    );
}
