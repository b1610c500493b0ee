//! The cluster bus loses nothing silently: a real `redis-server`, real densepush nodes, real clients, and the
//! ways a node's link to Redis fails in production (an output-buffer limit, a cut link, a Redis restart, a node
//! that cannot keep up, a node killed). Each test either shows nothing was lost, duplicated or reordered, or
//! that every connection that may have missed something was told: `resync` if it opted into recovery, close
//! 1012 otherwise.

mod cluster_common;

use cluster_common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const HISTORY_USER: &str = "[history]\nuser = true\n";

fn redis() -> Redis {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    Redis::start()
}

/// Publishes `count` messages `{prefix}{i}` to `path` through one keep-alive admin connection; each must be
/// accepted.
fn publish_many(node: &Node, path: &str, prefix: &str, count: usize) {
    let mut admin = Admin::connect(node.admin);
    for i in 0..count {
        let (status, body) = admin.request("POST", path, &format!("{prefix}{i}"));
        assert_eq!(status, 202, "{prefix}{i}: {body}");
    }
}

fn expect_texts(ws: &mut Client, prefix: &str, count: usize) {
    for i in 0..count {
        assert_eq!(recv_text(ws), format!("{prefix}{i}"), "in order, once");
    }
}

/// Issue 19's four steps: a pub/sub output-buffer limit that drops subscribers no longer costs a message,
/// with history on (user stream) and off (channel stream).
#[test]
fn the_pubsub_output_buffer_limit_no_longer_loses_a_message() {
    let redis = redis();
    let a = Node::start_with(&redis, "node-a", HISTORY_USER);
    // 1. client u connects; message 1 → 202, delivered.
    let mut u = a.connect_as("u", "phone", "news");
    let (status, reply) = a.publish("/publish/user/u", "message 1");
    assert_eq!(status, 202, "{reply}");
    assert_eq!(recv_text(&mut u), "message 1");
    // 2. Redis's pub/sub output-buffer limit is lowered, as a lagging subscriber meets in production.
    redis.config_set("client-output-buffer-limit", "pubsub 1024 1024 0");
    // 3. a 4 KB message → 202 (offset 2), to the user stream (history) and to a channel (none).
    let big = "2".repeat(4096);
    let (status, reply) = a.publish("/publish/user/u", &big);
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["offset"], 2);
    let (status, _) = a.publish("/publish/channel/news", &big);
    assert_eq!(status, 202);
    // 4. the limit is restored; message 3 → 202.
    redis.config_set("client-output-buffer-limit", "pubsub 33554432 8388608 60");
    let (status, _) = a.publish("/publish/user/u", "message 3");
    assert_eq!(status, 202);
    // Everything, in order, and nothing else.
    assert_eq!(recv_text(&mut u), big);
    assert_eq!(recv_text(&mut u), big);
    assert_eq!(recv_text(&mut u), "message 3");
    assert_nothing_more(&a, &mut [&mut u]);
    assert_eq!(a.metric("densepush_cluster_missed_closes_total"), 0);
}

/// The same limit on the class the bus reader belongs to: Redis drops the reading connection itself, again and
/// again while the limit holds; each reconnection continues from the node's position.
#[test]
fn a_reader_dropped_by_its_output_buffer_limit_resumes_without_a_loss() {
    let redis = redis();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    let mut on_b = b.connect_as("u", "phone", "");
    redis.config_set("client-output-buffer-limit", "normal 1024 1024 0");
    // Past Redis's 16 KiB per-client reply buffer, which the limit does not count.
    let big = "x".repeat(64 * 1024);
    let (status, _) = a.publish("/publish/user/u", &big);
    assert_eq!(status, 202);
    // Dropped, and dropped again at each reconnection while the limit holds (resuming reads the entry too).
    b.wait_for_cluster("down");
    std::thread::sleep(Duration::from_millis(300));
    redis.config_set("client-output-buffer-limit", "normal 0 0 0");
    b.wait_for_cluster("up");
    assert_eq!(a.publish("/publish/user/u", "after").0, 202);
    assert_eq!(recv_text(&mut on_b), big);
    assert_eq!(recv_text(&mut on_b), "after");
    assert_nothing_more(&a, &mut [&mut on_b]);
    assert_eq!(
        b.metric("densepush_cluster_bus_gaps_total{reason=\"trimmed\"}"),
        0
    );
}

/// A node cut off from Redis for a while, less than the retained window: its clients get everything published
/// meanwhile, in order, once, when the link is back; nobody is told anything.
#[test]
fn a_link_cut_shorter_than_the_window_loses_nothing() {
    let redis = redis();
    let proxy = Proxy::start(redis.port);
    let a = Node::start(&redis, "node-a");
    let b = Node::start_via(&proxy.url(), "node-b", "");
    let mut plain = b.connect_as("u", "phone", "news");
    let mut recovering = b.connect("user=u&client=tab&channels=news&recover=1");
    let mut on_a = a.connect_as("u", "laptop", "");

    proxy.cut();
    b.wait_for_cluster("down");
    publish_many(&a, "/publish/user/u", "m", 300);
    expect_texts(&mut on_a, "m", 300);
    std::thread::sleep(Duration::from_millis(500));
    proxy.restore();
    b.wait_for_cluster("up");

    expect_texts(&mut plain, "m", 300);
    for i in 0..300 {
        assert_eq!(envelope_data(&mut recovering), format!("m{i}"));
    }
    assert_nothing_more(&a, &mut [&mut plain, &mut on_a]);
    assert_eq!(envelope_data(&mut recovering), "end");
    assert_eq!(b.metric("densepush_cluster_missed_closes_total"), 0);
    assert_eq!(b.metric("densepush_cluster_missed_resyncs_total"), 0);
    assert!(b.metric("densepush_cluster_connects_total") >= 2);
}

/// Cut for longer than the window (`bus_max_len = 10`, 1,000 messages meanwhile): the node knows its position
/// was trimmed away and tells every connection, before anything published afterwards. A node whose link held
/// is not affected.
#[test]
fn a_link_cut_longer_than_the_window_tells_every_connection() {
    let redis = redis();
    let proxy = Proxy::start(redis.port);
    let a = Node::start_with(&redis, "node-a", "bus_max_len = 10\n");
    let b = Node::start_via(&proxy.url(), "node-b", "bus_max_len = 10\n");
    let mut plain = b.connect_as("u", "phone", "");
    let mut recovering = b.connect("user=v&channels=news,sport&recover=1");
    let mut on_a = a.connect_as("u", "laptop", "");

    proxy.cut();
    b.wait_for_cluster("down");
    publish_many(&a, "/publish/user/u", "m", 1000);
    expect_texts(&mut on_a, "m", 1000);
    assert!(redis.bus_len("densepush") < 1000, "trimmed");
    proxy.restore();
    b.wait_for_cluster("up");

    // Told: the plain connection is closed with 1012, the recovering one gets a resync for each of its streams.
    assert_eq!(expect_close(&mut plain), 1012);
    let mut streams: Vec<String> = (0..4).map(|_| expect_resync(&mut recovering)).collect();
    streams.sort();
    assert_eq!(streams, ["all", "channel:news", "channel:sport", "user:v"]);
    // The retained tail of user u's messages is not for v: the next thing v sees is a new message.
    assert_eq!(a.publish("/publish/user/v", "after").0, 202);
    assert_eq!(envelope_data(&mut recovering), "after");
    assert_nothing_more(&a, &mut [&mut on_a]);
    assert_eq!(
        b.metric("densepush_cluster_bus_gaps_total{reason=\"trimmed\"}"),
        1
    );
    assert!(b.metric("densepush_cluster_bus_lost_entries_total") > 0);
    assert_eq!(b.metric("densepush_cluster_missed_closes_total"), 1);
    assert_eq!(b.metric("densepush_cluster_missed_resyncs_total"), 1);
    assert_eq!(a.metric("densepush_cluster_missed_closes_total"), 0);
}

/// The same for batches: each is one bus entry, so a batch trimmed away while the link was cut is a gap like any
/// other entry; the node's connections are told (close 1012, or a resync per stream), none of it is lost
/// silently, and batches published after the link is back arrive whole and in order.
#[test]
fn a_batch_trimmed_away_while_the_link_was_cut_is_told_not_lost() {
    let redis = redis();
    let proxy = Proxy::start(redis.port);
    let a = Node::start_with(&redis, "node-a", "bus_max_len = 10\n");
    let b = Node::start_via(&proxy.url(), "node-b", "bus_max_len = 10\n");
    let mut plain = b.connect_as("u", "phone", "news");
    let mut recovering = b.connect("user=v&channels=news&recover=1");
    let mut on_a = a.connect_as("u", "laptop", "");

    proxy.cut();
    b.wait_for_cluster("down");
    let mut admin = Admin::connect(a.admin);
    let mut batch = |round: &str| {
        let body = serde_json::json!({"messages": [
            {"targets": ["user/u", "channel/news"], "data": format!("{round}-1")},
            {"targets": ["user/v"], "data": format!("{round}-2")},
        ]});
        let (status, text) = admin.request("POST", "/publish/batch", &body.to_string());
        assert_eq!(status, 202, "{round}: {text}");
    };
    for i in 0..100 {
        batch(&format!("b{i}"));
    }
    for i in 0..100 {
        assert_eq!(recv_text(&mut on_a), format!("b{i}-1"));
    }
    assert!(redis.bus_len("densepush") < 100, "trimmed");
    proxy.restore();
    b.wait_for_cluster("up");

    assert_eq!(expect_close(&mut plain), 1012);
    let mut streams: Vec<String> = (0..3).map(|_| expect_resync(&mut recovering)).collect();
    streams.sort();
    assert_eq!(streams, ["all", "channel:news", "user:v"]);
    // Then the batches the bus still holds, whole and in order (both messages of each: news, then user v).
    let first = envelope_data(&mut recovering);
    let k: usize = first
        .strip_prefix('b')
        .and_then(|r| r.strip_suffix("-1"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected a retained batch, got {first}"));
    assert!(k > 0, "the first batches were trimmed");
    assert_eq!(envelope_data(&mut recovering), format!("b{k}-2"));
    for i in k + 1..100 {
        assert_eq!(envelope_data(&mut recovering), format!("b{i}-1"));
        assert_eq!(envelope_data(&mut recovering), format!("b{i}-2"));
    }
    batch("after");
    assert_eq!(envelope_data(&mut recovering), "after-1", "news");
    assert_eq!(envelope_data(&mut recovering), "after-2", "user v");
    assert_eq!(recv_text(&mut on_a), "after-1");
    assert_nothing_more(&a, &mut [&mut on_a]);
    assert_eq!(
        b.metric("densepush_cluster_bus_gaps_total{reason=\"trimmed\"}"),
        1
    );
    assert!(b.metric("densepush_cluster_bus_lost_entries_total") > 0);
    assert_eq!(b.metric("densepush_cluster_missed_closes_total"), 1);
    assert_eq!(b.metric("densepush_cluster_missed_resyncs_total"), 1);
}

/// With persistence, a Redis restart keeps the bus: the nodes continue from their positions, and nobody is
/// told anything (without persistence, `cluster.rs` shows the close 1012).
#[test]
fn a_redis_restart_with_persistence_loses_nothing_and_tells_nobody() {
    assert!(redis_available(), "redis-server is missing");
    let mut redis = Redis::start_persistent();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    let mut on_b = b.connect_as("u", "phone", "");
    publish_many(&a, "/publish/user/u", "before", 5);
    expect_texts(&mut on_b, "before", 5);
    redis.stop();
    b.wait_for_cluster("down");
    redis.restart();
    a.wait_for_cluster("up");
    b.wait_for_cluster("up");
    publish_many(&a, "/publish/user/u", "after", 5);
    expect_texts(&mut on_b, "after", 5);
    assert_nothing_more(&a, &mut [&mut on_b]);
    assert_eq!(b.metric("densepush_cluster_missed_closes_total"), 0);
}

/// A node that cannot keep up (here: frozen with SIGSTOP while 5,000 messages for its 150 connections are
/// published, then let go): it catches up from its position without any mailbox passing the 4,096-command
/// bound, pausing its reading instead, and loses nothing within the window.
#[test]
fn a_slow_node_keeps_its_mailboxes_bounded_and_catches_up() {
    const MESSAGES: usize = 5_000;
    const DRAINERS: usize = 150;
    let redis = redis();
    let a = Node::start(&redis, "node-a");
    let b = Node::start_env(
        &redis.url(),
        "node-b",
        "",
        &[("DENSEPUSH_SERVER_REACTORS", "1")],
    );
    // Many recipients per message make each publish cost the reactor far more than the reader.
    let drained: Vec<_> = (0..DRAINERS).map(|i| drain(b.client, i)).collect();
    let mut verifier = b.connect("user=verifier&channels=news");
    std::thread::sleep(Duration::from_millis(200));

    b.pause();
    publish_many(&a, "/publish/channel/news", "n", MESSAGES);
    b.resume();

    expect_texts(&mut verifier, "n", MESSAGES);
    let high_water = b.metric("densepush_cluster_bus_pending_high_water");
    assert!(high_water <= 4_096, "a mailbox held {high_water} commands");
    assert!(
        b.metric("densepush_cluster_bus_stalls_total") > 0,
        "the reader had to wait for the reactor (high water {high_water})"
    );
    assert_eq!(b.metric("densepush_cluster_missed_closes_total"), 0);
    assert_eq!(
        b.metric("densepush_slow_consumer_closes_total{reactor=\"0\"}"),
        0,
        "the drainers kept up"
    );
    drop(drained);
}

/// Batches weigh one pending command per message on the reading node too: a slow node's reader waits for room
/// for a whole batch, so its mailbox stays within the bound, and every batch arrives whole and in order.
#[test]
fn a_slow_node_keeps_its_mailboxes_bounded_under_batches() {
    const BATCHES: usize = 100;
    const PER_BATCH: usize = 100;
    const DRAINERS: usize = 150;
    let redis = redis();
    let a = Node::start(&redis, "node-a");
    let b = Node::start_env(
        &redis.url(),
        "node-b",
        "",
        &[("DENSEPUSH_SERVER_REACTORS", "1")],
    );
    let drained: Vec<_> = (0..DRAINERS).map(|i| drain(b.client, i)).collect();
    let mut verifier = b.connect("user=verifier&channels=news");
    std::thread::sleep(Duration::from_millis(200));

    b.pause();
    let mut admin = Admin::connect(a.admin);
    for round in 0..BATCHES {
        let messages: Vec<serde_json::Value> = (0..PER_BATCH)
            .map(|i| serde_json::json!({"targets": ["channel/news"], "data": format!("n{}", round * PER_BATCH + i)}))
            .collect();
        let body = serde_json::json!({ "messages": messages }).to_string();
        let (status, text) = admin.request("POST", "/publish/batch", &body);
        assert_eq!(status, 202, "{round}: {text}");
    }
    b.resume();

    expect_texts(&mut verifier, "n", BATCHES * PER_BATCH);
    let high_water = b.metric("densepush_cluster_bus_pending_high_water");
    assert!(high_water <= 4_096, "a mailbox held {high_water} commands");
    assert!(
        b.metric("densepush_cluster_bus_stalls_total") > 0,
        "the reader had to wait for the reactor (high water {high_water})"
    );
    assert_eq!(b.metric("densepush_cluster_missed_closes_total"), 0);
    drop(drained);
}

/// A raw WebSocket client on channel `news` that reads and discards everything, so a test can hold hundreds of
/// recipients cheaply.
fn drain(addr: std::net::SocketAddr, i: usize) -> std::thread::JoinHandle<()> {
    let mut stream = TcpStream::connect(addr).unwrap();
    let request = format!(
        "GET /ws?user=d{i}&channels=news HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "upgrade refused");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    })
}

/// A node killed and started again is a new node: it starts at the end of the bus (nothing from before is
/// delivered to its new clients), and nothing is lost or doubled on the node that stayed.
#[test]
fn a_node_killed_and_restarted_starts_at_the_end_of_the_bus() {
    let redis = redis();
    let a = Node::start(&redis, "node-a");
    let mut b = Node::start(&redis, "node-b");
    let mut on_a = a.connect_as("u", "laptop", "");
    let mut on_b = b.connect_as("u", "phone", "");
    publish_many(&a, "/publish/user/u", "one", 10);
    expect_texts(&mut on_a, "one", 10);
    expect_texts(&mut on_b, "one", 10);

    b.kill();
    publish_many(&a, "/publish/user/u", "two", 10);
    expect_texts(&mut on_a, "two", 10);
    let b = Node::start(&redis, "node-b");
    let mut on_b = b.connect_as("u", "phone", "");
    publish_many(&b, "/publish/user/u", "three", 5);
    expect_texts(&mut on_a, "three", 5);
    expect_texts(&mut on_b, "three", 5);
    assert_nothing_more(&a, &mut [&mut on_a, &mut on_b]);
    assert_eq!(b.metric("densepush_cluster_missed_closes_total"), 0);
}

/// A node with a smaller `admin.max_publish_bytes` than the one that accepted a message drops it, counts it,
/// and tells the connections it was for (and no others).
#[test]
fn an_oversized_bus_message_is_dropped_counted_and_its_target_told() {
    let redis = redis();
    let a = Node::start(&redis, "node-a");
    let b = Node::start_env(
        &redis.url(),
        "node-b",
        "",
        &[("DENSEPUSH_ADMIN_MAX_PUBLISH_BYTES", "1024")],
    );
    let mut plain = b.connect_as("u", "phone", "");
    let mut recovering = b.connect("user=v&channels=news&recover=1");
    let mut bystander = b.connect_as("w", "phone", "");
    let big = "x".repeat(2048);
    assert_eq!(a.publish("/publish/user/u", &big).0, 202);
    assert_eq!(a.publish("/publish/channel/news", &big).0, 202);
    assert_eq!(expect_close(&mut plain), 1012);
    assert_eq!(expect_resync(&mut recovering), "channel:news");
    assert_eq!(a.publish("/publish/all", "small").0, 202);
    assert_eq!(envelope_data(&mut recovering), "small");
    assert_eq!(recv_text(&mut bystander), "small");
    assert_eq!(b.metric("densepush_cluster_oversize_dropped_total"), 2);
    assert_eq!(a.metric("densepush_cluster_oversize_dropped_total"), 0);
}

/// A kick goes through the bus like a publish, so it keeps its place among the messages before it on every
/// node, the origin included; the origin still answers with its own count.
#[test]
fn a_kick_after_a_message_arrives_after_it_on_every_node() {
    let redis = redis();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    let mut on_a = a.connect_as("k", "laptop", "");
    let mut on_b = b.connect_as("k", "phone", "");
    let mut admin = Admin::connect(a.admin);
    for i in 0..50 {
        let (status, _) = admin.request("POST", "/publish/user/k", &format!("m{i}"));
        assert_eq!(status, 202);
    }
    let (status, body) = admin.request("DELETE", "/connections/user/k?code=4002", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json(&body)["closed"],
        1,
        "the origin counts its own connection"
    );
    for ws in [&mut on_a, &mut on_b] {
        expect_texts(ws, "m", 50);
        assert_eq!(expect_close(ws), 4002);
    }
}

/// After Redis lost the bus, whichever node publishes first starts it again under a new epoch; a node that
/// appended under the old epoch before (and would append there again) is refused by Redis and appends under
/// the new one: both nodes' messages reach every node, in order.
#[test]
fn nodes_agree_on_the_epoch_of_a_bus_started_again() {
    let mut redis = redis();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    assert_eq!(a.publish("/publish/all", "old epoch").0, 202);
    redis.stop();
    a.wait_for_cluster("down");
    // A later epoch: Redis's clock in milliseconds when the stream starts again.
    std::thread::sleep(Duration::from_millis(5));
    redis.restart();
    a.wait_for_cluster("up");
    b.wait_for_cluster("up");
    let mut on_a = a.connect_as("u", "x", "");
    let mut on_b = b.connect_as("u", "y", "");
    assert_eq!(b.publish("/publish/user/u", "first").0, 202);
    assert_eq!(a.publish("/publish/user/u", "second").0, 202);
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(recv_text(ws), "first");
        assert_eq!(recv_text(ws), "second");
    }
    assert_nothing_more(&a, &mut [&mut on_a, &mut on_b]);
}
