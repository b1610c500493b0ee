//! A densepush cluster end to end: a real `redis-server` on a loopback port and two or three real densepush
//! processes joined through it, driven with real WebSocket clients and admin HTTP requests.
//!
//! `scripts/test.sh` installs `redis-server` when it is missing; these tests start and stop their own.

mod cluster_common;

use cluster_common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::Message;

// ---- tests -----------------------------------------------------------------------------------------------

#[test]
fn publish_on_one_node_reaches_user_client_channel_and_all_on_another_exactly_once() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    let mut on_b = b.connect_as("u1", "phone", "news");
    let mut on_a = a.connect_as("u1", "laptop", "other");

    for (path, body) in [
        ("/publish/user/u1", "to-user"),
        ("/publish/user/u1/client/phone", "to-client"),
        ("/publish/channel/news", "to-channel"),
        ("/publish/all", "to-all"),
    ] {
        let (status, reply) = a.publish(path, body);
        assert_eq!(status, 202, "{path}: {reply}");
        assert_eq!(reply["cluster"], true);
    }
    for want in ["to-user", "to-client", "to-channel", "to-all"] {
        assert_eq!(recv_text(&mut on_b), want);
    }
    // The origin's own connection gets its messages once, not again from Redis.
    for want in ["to-user", "to-all"] {
        assert_eq!(recv_text(&mut on_a), want);
    }
    assert_nothing_more(&b, &mut [&mut on_a, &mut on_b]);
}

#[test]
fn burst_of_5000_keeps_order_on_every_node() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    let mut on_a = a.connect_as("burst", "x", "");
    let mut on_b = b.connect_as("burst", "y", "");

    let mut admin = Admin::connect(a.admin);
    for i in 0..5_000 {
        let (status, body) = admin.request("POST", "/publish/user/burst", &format!("m{i}"));
        assert_eq!(status, 202, "message {i}: {body}");
    }
    for (name, ws) in [("node a", &mut on_a), ("node b", &mut on_b)] {
        for i in 0..5_000 {
            assert_eq!(recv_text(ws), format!("m{i}"), "{name}");
        }
    }
    assert_nothing_more(&a, &mut [&mut on_a, &mut on_b]);
}

#[test]
fn kick_through_one_node_closes_the_users_connection_on_another() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    let mut victim = b.connect_as("kicked", "phone", "");
    let mut bystander = b.connect_as("stays", "phone", "");

    let (status, body) = http(a.admin, "DELETE", "/connections/user/kicked?code=4001", "");
    assert_eq!(status, 200, "{body}");
    let reply = json(&body);
    assert_eq!(reply["closed"], 0, "no connection of the user on node a");
    assert_eq!(reply["cluster"], true);

    loop {
        match victim.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 4001);
                break;
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    let (status, _) = a.publish("/publish/user/stays", "still here");
    assert_eq!(status, 202);
    assert_eq!(recv_text(&mut bystander), "still here");
}

/// A kick in the bus's wire format (`cluster::wire`), built by hand so a test can send what no node would.
fn hand_built_kick(origin: &str, user: &str, code: u16, reason: &str) -> Vec<u8> {
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let mut out = vec![2, 1]; // version 2, kind 1 (kick)
    string(&mut out, origin);
    out.extend_from_slice(&0u64.to_be_bytes()); // request id: nobody waits
    out.push(0); // target: a user
    string(&mut out, user);
    out.extend_from_slice(&code.to_be_bytes());
    string(&mut out, reason);
    out
}

#[test]
fn a_kick_on_the_bus_with_a_code_that_may_not_be_sent_is_dropped_and_counted() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start(&redis, "node-a");
    let mut victim = a.connect_as("victim", "phone", "");
    let mut control = a.connect_as("control", "phone", "");
    let invalid_before = a.metric("densepush_cluster_invalid_messages_total");

    // 1005 means "no status code present" and must never be sent in a close frame (RFC 6455 §7.4.1).
    let bad = hand_built_kick("elsewhere", "victim", 1005, "no");
    redis.append_to_bus("densepush", &bad);
    // The same bytes with a code a kick may carry do close a connection: the hand-built message is right, and
    // since the node applies the bus in order, the bad one has been handled by the time this arrives.
    let good = hand_built_kick("elsewhere", "control", 4001, "ok");
    redis.append_to_bus("densepush", &good);
    loop {
        match control.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 4001);
                break;
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            other => panic!("expected the control kick, got {other:?}"),
        }
    }
    assert_eq!(
        a.metric("densepush_cluster_invalid_messages_total"),
        invalid_before + 1
    );
    // The victim is still open: the next thing it sees is a message, not a close.
    let (status, _) = a.publish("/publish/user/victim", "still open");
    assert_eq!(status, 202);
    assert_eq!(recv_text(&mut victim), "still open");
}

#[test]
fn presence_counts_every_node_and_drops_a_killed_node() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    let mut c = Node::start(&redis, "node-c");
    let _on_a = a.connect_as("p", "1", "");
    let _on_b1 = b.connect_as("p", "2", "");
    let _on_b2 = b.connect_as("p", "3", "");
    let _on_c = c.connect_as("p", "4", "");

    // Every node sends its first heartbeat right after connecting; a slow machine may need a few tries.
    let answer = wait_presence(&a, "p", |v| v["nodes_known"] == 3 && v["nodes"] == 3);
    assert_eq!(answer["connections"], 4, "{answer}");
    assert_eq!(b.presence("p")["connections"], 4);
    assert_eq!(a.presence("nobody")["connections"], 0);

    c.kill();
    let killed = Instant::now();
    // A killed node answers no more: its connections leave the count while its alive marker lingers.
    let answer = wait_presence(&a, "p", |v| v["nodes"] == 2);
    assert_eq!(answer["connections"], 3, "{answer}");
    // After its TTL it is not known any more either.
    let answer = wait_presence(&a, "p", |v| v["nodes_known"] == 2);
    assert_eq!(answer["connections"], 3, "{answer}");
    assert_eq!(answer["nodes"], 2, "{answer}");
    assert!(
        killed.elapsed() >= Duration::from_millis(NODE_TTL_MS - 1_000),
        "dropped before its marker could have expired"
    );
}

/// Asks `node` for the user's presence until `done` holds (or fails after a while).
fn wait_presence(
    node: &Node,
    user: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT + Duration::from_millis(NODE_TTL_MS);
    loop {
        let answer = node.presence(user);
        if done(&answer) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "presence never settled: {answer}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn redis_outage_gives_503_keeps_connections_and_recovers() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let mut redis = Redis::start();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    let mut on_b = b.connect_as("r", "phone", "");
    let (status, _) = a.publish("/publish/user/r", "before");
    assert_eq!(status, 202);
    assert_eq!(recv_text(&mut on_b), "before");

    redis.stop();
    // Never a 202 for a message that went nowhere, from the first publish after Redis went away.
    for _ in 0..3 {
        let (status, reply) = a.publish("/publish/user/r", "lost");
        assert_eq!(status, 503, "{reply}");
        let error = reply["error"].as_str().unwrap();
        assert!(error.starts_with("cluster link down"), "{error}");
    }
    let (status, body) = http(a.admin, "DELETE", "/connections/user/r", "");
    assert_eq!(status, 503, "{body}");
    a.wait_for_cluster("down");
    b.wait_for_cluster("down");
    let (_, metrics) = http(a.admin, "GET", "/metrics", "");
    assert!(
        metrics.contains("\ndensepush_cluster_link_up 0\n"),
        "{metrics}"
    );

    // Local connections stay up: the client still gets its pong.
    on_b.send(Message::Ping(b"alive?".to_vec().into())).unwrap();
    loop {
        match on_b.read().expect("connection still open") {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"alive?");
                break;
            }
            Message::Ping(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }

    redis.restart();
    a.wait_for_cluster("up");
    b.wait_for_cluster("up");
    // Without persistence the restarted Redis has no bus: whatever followed "before" is unknowable, so the
    // connection is told (it did not opt into recovery: close 1012, on which clients reconnect and refetch).
    assert_eq!(expect_close(&mut on_b), 1012);
    assert_eq!(b.metric("densepush_cluster_missed_closes_total"), 1);
    assert_eq!(
        b.metric("densepush_cluster_bus_gaps_total{reason=\"new_epoch\"}"),
        1
    );
    let mut on_b = b.connect_as("r", "phone", "");
    let (status, reply) = a.publish("/publish/user/r", "after");
    assert_eq!(status, 202, "{reply}");
    assert_eq!(recv_text(&mut on_b), "after");
    let (_, metrics) = http(a.admin, "GET", "/metrics", "");
    assert!(
        metrics.contains("\ndensepush_cluster_link_up 1\n"),
        "{metrics}"
    );
    // One line per state change, not one per failed reconnection attempt.
    let log = a.log();
    assert_eq!(log.matches("cluster link down").count(), 1, "{log}");
    assert_eq!(log.matches("cluster link up").count(), 2, "{log}");
}

#[test]
fn node_starts_without_redis_and_joins_when_it_appears() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let mut redis = Redis::start();
    redis.stop();
    let a = Node::start_unlinked(&redis.url(), "node-a");
    a.wait_for_cluster("down");
    let mut local = a.connect_as("early", "x", "");
    let (status, _) = a.publish("/publish/user/early", "nowhere");
    assert_eq!(status, 503);

    redis.restart();
    a.wait_for_cluster("up");
    // It connected while the node could not read the bus: what other nodes published meanwhile may be lost
    // for it, so the first link tells it (close 1012: it did not opt into recovery).
    assert_eq!(expect_close(&mut local), 1012);
    let mut local = a.connect_as("early", "x", "");
    let (status, _) = a.publish("/publish/user/early", "now");
    assert_eq!(status, 202);
    assert_eq!(recv_text(&mut local), "now");
}

#[test]
fn single_node_reports_cluster_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nreactors = 1\n[auth]\nmode = \"none\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_densepush"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (_, admin) = read_ports(child.stdout.take().unwrap());
    let (status, body) = http(admin, "GET", "/healthz", "");
    let (_, metrics) = http(admin, "GET", "/metrics", "");
    let (_, presence) = http(admin, "GET", "/presence/user/u", "");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
    assert_eq!(json(&body)["cluster"], "disabled");
    assert!(!metrics.contains("densepush_cluster_"), "{metrics}");
    assert_eq!(json(&presence)["connections"], 0);
    assert!(json(&presence).get("nodes").is_none());
}

#[test]
fn dashboard_stats_show_the_link_and_the_node_count() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start(&redis, "node-a");
    let _b = Node::start(&redis, "node-b");
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let (status, body) = http(a.admin, "GET", "/stats", "");
        assert_eq!(status, 200, "{body}");
        let stats = json(&body);
        if stats["cluster"]["nodes"] == 2 || Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(stats["cluster"]["link_up"], true, "{stats}");
    assert_eq!(stats["cluster"]["nodes"], 2, "{stats}");
    // Asking for the node count is not a failed cluster request.
    let (_, metrics) = http(a.admin, "GET", "/metrics", "");
    assert!(
        metrics.contains("densepush_cluster_failed_total 0"),
        "{metrics}"
    );
}
