//! Missed-message recovery in a cluster: offsets assigned by Redis, so a client that leaves one node and
//! reconnects to another recovers exactly what it missed; when Redis is down, publishes get 503, a node replays
//! what it has applied, and a bus Redis lost gets a resync, never a silent gap. A real `redis-server` and real
//! densepush processes, as in `cluster.rs`.

mod cluster_common;

use cluster_common::*;
use std::time::Duration;

/// An envelope: `(epoch, offset, payload)`; panics on anything else.
fn envelope(ws: &mut Client) -> (String, u64, String) {
    let v = json(&recv_text(ws));
    assert!(v.get("type").is_none(), "expected an envelope, got {v}");
    (
        v["e"].as_str().unwrap().to_owned(),
        v["o"].as_u64().unwrap(),
        v["d"].as_str().unwrap().to_owned(),
    )
}

fn resync(ws: &mut Client, stream: &str) -> (String, u64) {
    let v = json(&recv_text(ws));
    assert_eq!(v["type"], "resync", "expected a resync, got {v}");
    assert_eq!(v["s"], stream);
    (
        v["e"].as_str().unwrap().to_owned(),
        v["o"].as_u64().unwrap(),
    )
}

fn close(mut ws: Client) {
    let _ = ws.close(None);
    while ws.read().is_ok() {}
}

#[test]
fn position_taken_on_one_node_recovers_on_another() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start_with_history(&redis, "node-a");
    let b = Node::start_with_history(&redis, "node-b");
    let mut ws = a.connect("user=42&recover=1");
    let (status, reply) = a.publish("/publish/user/42", "first");
    assert_eq!(status, 202, "{reply}");
    let (epoch, position, _) = envelope(&mut ws);
    assert_eq!(reply["epoch"], epoch.as_str());
    assert_eq!(reply["offset"], position);
    close(ws);

    // Published through both nodes: Redis orders them all.
    let mut admins = [Admin::connect(a.admin), Admin::connect(b.admin)];
    for i in 0..100 {
        let (status, body) =
            admins[i % 2].request("POST", "/publish/user/42", &format!("missed {i}"));
        assert_eq!(status, 202, "{body}");
    }
    let during = {
        let addr = a.admin;
        std::thread::spawn(move || {
            let mut admin = Admin::connect(addr);
            for i in 0..30 {
                let (status, body) =
                    admin.request("POST", "/publish/user/42", &format!("during {i}"));
                assert_eq!(status, 202, "{body}");
            }
        })
    };
    // Node B has the messages once its subscriber has them; by the time a real phone reconnects it has.
    std::thread::sleep(Duration::from_millis(200));
    let mut ws = b.connect(&format!("user=42&since=user:42@{epoch}:{position}"));
    during.join().unwrap();
    let (status, _) = b.publish("/publish/user/42", "live");
    assert_eq!(status, 202);

    let mut expected: Vec<String> = (0..100).map(|i| format!("missed {i}")).collect();
    expected.extend((0..30).map(|i| format!("during {i}")));
    expected.push("live".into());
    for (i, want) in expected.iter().enumerate() {
        let (e, offset, payload) = envelope(&mut ws);
        assert_eq!(e, epoch);
        assert_eq!(
            offset,
            position + 1 + i as u64,
            "consecutive offsets: no gap, no duplicate"
        );
        assert_eq!(&payload, want);
    }
    // Both nodes hold the same history once each has the last message from the bus (the one published
    // through B reaches A's copy a moment after B's answer).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, page_a) = http(a.admin, "GET", "/history/user:42?limit=1000", "");
        let (_, page_b) = http(b.admin, "GET", "/history/user:42?limit=1000", "");
        let (page_a, page_b) = (json(&page_a), json(&page_b));
        if page_a["last"] == 132 && page_b["last"] == 132 {
            assert_eq!(page_a["messages"], page_b["messages"]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "history copies differ: {page_a} / {page_b}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn client_token_messages_recover_only_on_that_clients_connections_across_nodes() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start_with_history(&redis, "node-a");
    let b = Node::start_with_history(&redis, "node-b");
    let (status, reply) = a.publish("/publish/user/7", "hello");
    assert_eq!(status, 202, "{reply}");
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        a.publish("/publish/user/7/client/phone", "phone only").0,
        202
    );
    assert_eq!(
        a.publish("/publish/user/7/client/laptop", "laptop only").0,
        202
    );
    std::thread::sleep(Duration::from_millis(200));
    let mut phone = b.connect(&format!("user=7&client=phone&since=user:7@{epoch}:1"));
    assert_eq!(
        envelope(&mut phone),
        (epoch.clone(), 2, "phone only".into())
    );
    assert_eq!(b.publish("/publish/user/7", "marker").0, 202);
    assert_eq!(envelope(&mut phone).2, "marker");
}

#[test]
fn redis_down_gives_503_replays_what_the_node_has_and_a_lost_bus_gets_resync() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let mut redis = Redis::start();
    let a = Node::start_with_history(&redis, "node-a");
    let b = Node::start_with_history(&redis, "node-b");
    let (status, reply) = a.publish("/publish/channel/news", "before");
    assert_eq!(status, 202, "{reply}");
    let epoch = reply["epoch"].as_str().unwrap().to_owned();

    redis.stop();
    let (status, reply) = a.publish("/publish/channel/news", "lost");
    assert_eq!(status, 503, "{reply}");
    b.wait_for_cluster("down");
    // B replays what it has applied: anything published after it would reach the client live once B's link is
    // back, or the client would be told.
    let mut ws = b.connect(&format!(
        "user=1&channels=news&since=channel:news@{epoch}:0"
    ));
    assert_eq!(envelope(&mut ws), (epoch.clone(), 1, "before".into()));

    redis.restart();
    a.wait_for_cluster("up");
    b.wait_for_cluster("up");
    // Redis came back without the bus (no persistence): what followed B's position is unknowable, so every
    // stream this recovering connection receives gets a resync, before anything published afterwards.
    let mut told: Vec<String> = (0..3).map(|_| expect_resync(&mut ws)).collect();
    told.sort();
    assert_eq!(told, ["all", "channel:news", "user:1"]);
    // Redis lost everything (no persistence): the stream starts over with a new epoch.
    let (status, reply) = a.publish("/publish/channel/news", "after");
    assert_eq!(status, 202, "{reply}");
    assert_ne!(reply["epoch"], epoch.as_str());
    assert_eq!(reply["offset"], 1);
    let (e, o, d) = envelope(&mut ws);
    assert_eq!((o, d.as_str()), (1, "after"));
    assert_ne!(e, epoch);
}

#[test]
fn streams_without_history_keep_the_old_cluster_path() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start_with_history(&redis, "node-a");
    let b = Node::start_with_history(&redis, "node-b");
    let mut ws = b.connect("user=1&recover=1");
    let (status, reply) = a.publish("/publish/all", "to all");
    assert_eq!(status, 202, "{reply}");
    assert!(reply.get("offset").is_none(), "{reply}");
    assert_eq!(
        json(&recv_text(&mut ws)),
        serde_json::json!({"s": "all", "d": "to all"})
    );
}

#[test]
fn a_node_that_joins_later_backfills_from_the_shared_log() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start_with_history(&redis, "node-a");
    let (status, reply) = a.publish("/publish/user/5", "first");
    assert_eq!(status, 202, "{reply}");
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    let mut admin = Admin::connect(a.admin);
    for i in 0..50 {
        let (status, body) =
            admin.request("POST", "/publish/user/5/client/phone", &format!("m{i}"));
        assert_eq!(status, 202, "{body}");
    }
    // B starts after all of that: it has never seen the stream.
    let b = Node::start_with_history(&redis, "node-b");
    let mut early = b.connect(&format!("user=5&client=phone&since=user:5@{epoch}:1"));
    assert_eq!(resync(&mut early, "user:5"), (String::new(), 0));
    // The next message shows B the gap; it fetches offsets 1..=51 from Redis before delivering it.
    let (status, _) = a.publish("/publish/user/5", "trigger");
    assert_eq!(status, 202);
    assert_eq!(envelope(&mut early), (epoch.clone(), 52, "trigger".into()));
    let mut ws = b.connect(&format!("user=5&client=phone&since=user:5@{epoch}:1"));
    for i in 0..50 {
        assert_eq!(envelope(&mut ws), (epoch.clone(), 2 + i, format!("m{i}")));
    }
    assert_eq!(envelope(&mut ws), (epoch.clone(), 52, "trigger".into()));
    // Tagged messages stay tagged after the trip through Redis.
    let mut other = b.connect(&format!("user=5&client=laptop&since=user:5@{epoch}:1"));
    assert_eq!(b.publish("/publish/user/5", "marker").0, 202);
    assert_eq!(envelope(&mut other).2, "trigger");
    assert_eq!(envelope(&mut other).2, "marker");
}
