//! User affinity across reactors, end to end (issue 15): a user's connections are accepted by whichever reactor
//! the kernel picks, and all live on the user's home reactor. Publishes, kicks, presence, subscriptions and
//! history replays for the user must behave exactly as they did when every reactor held some of them.

mod common;

use common::{recv_text, Server, Ws};
use std::time::Duration;

const REACTORS: &str = "2";
/// Enough connections that the kernel's SO_REUSEPORT spread puts some on each listener (the test checks it).
const CONNS: usize = 16;

fn start(extra: &[(&str, &str)]) -> Server {
    let mut overrides = vec![("server.reactors", REACTORS)];
    overrides.extend_from_slice(extra);
    Server::start(&overrides)
}

fn handed_over(server: &Server) -> u64 {
    server.metric("densepush_connections_handed_over_total", &[])
}

/// Connects `n` connections for `user` (client tokens c0, c1, …) and checks that some were handed over: the
/// kernel spread them over both reactors' listeners, and the one that is not the user's home passed its share
/// on.
fn connect_spread(server: &Server, user: &str, n: usize, extra: &str) -> Vec<Ws> {
    let before = handed_over(server);
    let conns: Vec<Ws> = (0..n)
        .map(|i| server.connect(&format!("user={user}&client=c{i}{extra}")))
        .collect();
    assert!(
        handed_over(server) > before,
        "none of {n} connections was accepted away from its home reactor"
    );
    conns
}

#[test]
fn connections_accepted_on_every_reactor_get_the_users_publishes_in_order() {
    let server = start(&[]);
    let mut conns = connect_spread(&server, "alice", CONNS, "");
    let mut admin = server.admin();
    for i in 0..300 {
        let r = admin.request(
            "POST",
            "/publish/user/alice",
            format!("m{i}").as_bytes(),
            &[],
        );
        assert_eq!(r.status, 202);
    }
    for ws in &mut conns {
        for i in 0..300 {
            assert_eq!(recv_text(ws), format!("m{i}"));
        }
    }
    let presence = server
        .request("GET", "/presence/user/alice", b"", &[])
        .json();
    assert_eq!(presence["connections"], CONNS);
    let open = server.metric("densepush_connections_open", &[]);
    assert_eq!(
        open, CONNS as u64,
        "a handed-over connection is counted once"
    );
}

#[test]
fn kick_by_user_and_by_client_reaches_every_connection_of_the_user() {
    let server = start(&[]);
    let mut conns = connect_spread(&server, "bob", CONNS, "");
    let r = server.request("DELETE", "/connections/user/bob/client/c3", b"", &[]);
    assert_eq!(r.json()["closed"], 1);
    let r = server.request("DELETE", "/connections/user/bob", b"", &[]);
    assert_eq!(r.json()["closed"], CONNS - 1);
    for ws in &mut conns {
        let close = common::recv_close(ws).expect("a close frame");
        assert_eq!(u16::from(close.code), 4000);
        common::finish_close(ws);
    }
    // Presence counts a kicked connection until its close handshake is over.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let presence = server.request("GET", "/presence/user/bob", b"", &[]).json();
        if presence["connections"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{presence}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn runtime_subscriptions_reach_every_connection_of_the_user() {
    let server = start(&[]);
    let mut conns = connect_spread(&server, "carol", CONNS, "");
    let mut others: Vec<Ws> = (0..4)
        .map(|i| server.connect(&format!("user=other{i}&channels=news")))
        .collect();
    let r = server.request("PUT", "/subscriptions/user/carol/channel/news", b"", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["connections"], CONNS);
    server.publish("/publish/channel/news", "headline");
    for ws in conns.iter_mut().chain(&mut others) {
        assert_eq!(recv_text(ws), "headline");
    }
    let r = server.request("DELETE", "/subscriptions/user/carol/channel/news", b"", &[]);
    assert_eq!(r.json()["connections"], CONNS);
    server.publish("/publish/channel/news", "second");
    server.publish("/publish/user/carol", "direct");
    for ws in &mut conns {
        assert_eq!(recv_text(ws), "direct", "left the channel");
    }
    for ws in &mut others {
        assert_eq!(recv_text(ws), "second");
    }
}

/// The point of the replay rule: connections that reconnect with `since` while a burst is being published,
/// accepted on either reactor, get every message after their position exactly once and in order — the
/// replayed ones, then the live ones — whether or not they were handed over on the way.
#[test]
fn connections_handed_over_during_a_burst_with_since_miss_nothing_and_double_nothing() {
    const BURST: u64 = 600;
    let server = start(&[("history.user", "true"), ("history.size", "2000")]);
    let mut first = server.connect("user=dave&recover=1");
    server.publish("/publish/user/dave", "m1");
    let v: serde_json::Value = serde_json::from_str(&recv_text(&mut first)).unwrap();
    let epoch = v["e"].as_str().unwrap().to_owned();
    let admin_addr = server.admin_addr;
    let burst = std::thread::spawn(move || {
        let mut admin = common::Admin::connect(admin_addr);
        for i in 2..=BURST {
            let r = admin.request(
                "POST",
                "/publish/user/dave",
                format!("m{i}").as_bytes(),
                &[],
            );
            assert_eq!(r.status, 202);
            if i % 50 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let before = handed_over(&server);
    let mut late: Vec<Ws> = (0..CONNS)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(3));
            server.connect(&format!("user=dave&client=l{i}&since=user:dave@{epoch}:1"))
        })
        .collect();
    burst.join().unwrap();
    assert!(
        handed_over(&server) > before,
        "no connection was handed over"
    );
    for ws in late.iter_mut().chain(std::iter::once(&mut first)) {
        for offset in 2..=BURST {
            let v: serde_json::Value = serde_json::from_str(&recv_text(ws)).unwrap();
            assert_eq!(v["o"], offset, "{v}");
            assert_eq!(v["d"], format!("m{offset}"));
        }
    }
    // Nothing more (no duplicate after the last).
    server.publish("/publish/user/dave", "end");
    for ws in &mut late {
        let v: serde_json::Value = serde_json::from_str(&recv_text(ws)).unwrap();
        assert_eq!(v["d"], "end");
    }
}

/// A live upgrade places every connection on its user's home reactor in the new process. With the same build on
/// both sides they are there already; `AFFINITY_PREDECESSOR_BINARY` names an older build to start from (one
/// without user affinity, e.g. main before issue 15), whose reactors hold a user's connections wherever the
/// kernel put them: the new process moves them home before it runs (`Reactor::rehome_all`).
#[test]
fn a_live_upgrade_puts_every_connection_on_its_users_home_reactor() {
    let dir = tempfile::tempdir().unwrap();
    let predecessor = std::env::var("AFFINITY_PREDECESSOR_BINARY")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| common::bin().to_owned());
    let release = dir.path().join("releases/0");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(&predecessor, release.join("densepush")).unwrap();
    let binary = dir.path().join("densepush");
    std::os::unix::fs::symlink(release.join("densepush"), &binary).unwrap();
    let older = predecessor != common::bin();
    let mut server = Server::start_with_env(
        &[("server.reactors", REACTORS), ("log.level", "info")],
        &[(common::BINARY_ENV, binary.to_str().unwrap())],
    );
    // Connections of one user until both listeners took some (counted by accepts, which every build has).
    let accepted =
        |server: &Server, r: &str| server.metric("densepush_tcp_accepted_total", &[("reactor", r)]);
    let mut conns: Vec<Ws> = Vec::new();
    while conns.len() < 8 || accepted(&server, "0") == 0 || accepted(&server, "1") == 0 {
        assert!(
            conns.len() < 200,
            "connections never spread over both listeners"
        );
        let i = conns.len();
        conns.push(server.connect(&format!("user=frank&client=c{i}")));
    }
    // The new release is this build.
    let next = release.with_file_name("1");
    std::fs::create_dir_all(&next).unwrap();
    std::fs::copy(common::bin(), next.join("densepush")).unwrap();
    let link = binary.with_extension("new");
    std::os::unix::fs::symlink(next.join("densepush"), &link).unwrap();
    std::fs::rename(&link, &binary).unwrap();
    server.upgrade();
    if older {
        // Its reactors held frank's connections where the kernel put them: some had to move.
        assert!(
            server.log().contains("moved to their users' home reactors"),
            "{}",
            server.log()
        );
    }

    let text = server.metrics_text();
    let open: Vec<u64> = ["0", "1"]
        .iter()
        .map(|r| common::metric_in(&text, "densepush_connections_open", &[("reactor", r)]))
        .collect();
    assert_eq!(open.iter().sum::<u64>(), conns.len() as u64, "{open:?}");
    assert!(
        open.contains(&0),
        "all of frank's connections on one reactor: {open:?}"
    );
    let mut admin = server.admin();
    for i in 0..100 {
        let r = admin.request(
            "POST",
            "/publish/user/frank",
            format!("m{i}").as_bytes(),
            &[],
        );
        assert_eq!(r.status, 202);
    }
    for ws in &mut conns {
        for i in 0..100 {
            assert_eq!(recv_text(ws), format!("m{i}"));
        }
    }
    let presence = server
        .request("GET", "/presence/user/frank", b"", &[])
        .json();
    assert_eq!(presence["connections"], conns.len());
    let r = server.request("DELETE", "/connections/user/frank/client/c0", b"", &[]);
    assert_eq!(r.json()["closed"], 1);
}
