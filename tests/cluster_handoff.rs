//! What a live upgrade (issue 13) needs from the cluster: the bus position a process hands over, and a successor
//! that starts from it applies exactly the entries after it — none lost, none twice — however many were
//! published between the two. The two "processes" are two `Cluster`s in this test over real mailboxes (no
//! reactors drain them, so the test reads what each would deliver), against a real `redis-server` and a real
//! densepush node that publishes.

mod cluster_common;

use cluster_common::*;
use densepush::budget::Budget;
use densepush::cluster::bus::BusPosition;
use densepush::cluster::Cluster;
use densepush::config::Config;
use densepush::dispatch::{Command, Mailbox, Reactors};
use densepush::history::store::Limits;
use densepush::history::{History, Settings};
use densepush::publish::Publisher;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One node's cluster side over one mailbox, starting at `resume` (or the end of the bus).
struct Process {
    cluster: Arc<Cluster>,
    mailbox: Arc<Mailbox>,
    _poll: mio::Poll,
}

impl Process {
    fn start(redis: &Redis, resume: Option<BusPosition>) -> Process {
        let poll = mio::Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).unwrap();
        let mailbox = Mailbox::new(waker);
        let history = History::new(Settings {
            user: false,
            channel: false,
            all: false,
            limits: Limits {
                size: 1,
                ttl_ms: 1_000,
                max_bytes: 4096,
            },
        });
        let publisher = Publisher::new(
            history,
            Reactors::new(vec![mailbox.clone()], Arc::new(Budget::new(1 << 30))),
        );
        let toml = format!(
            "[cluster]\nredis_url = \"{}\"\nnode_id = \"upgrading\"\nreconnect_min_ms = 50\nheartbeat_interval_ms = 200\n\
             node_ttl_ms = 1500\n",
            redis.url()
        );
        let config = Config::from_toml_str(&toml, &[]).unwrap();
        let cluster = Cluster::start(&config.cluster, 1 << 20, publisher, resume)
            .unwrap()
            .expect("a redis_url was given");
        assert!(cluster.wait_until_up(WAIT), "link never came up");
        Process {
            cluster,
            mailbox,
            _poll: poll,
        }
    }

    /// The payloads of the next `n` publishes queued for the reactors, in order.
    fn delivered(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        while out.len() < n {
            let mut commands = Vec::new();
            self.mailbox.take_all(&mut commands);
            self.mailbox.applied(commands.len());
            for command in commands {
                match command {
                    Command::Publish(m) => {
                        out.push(String::from_utf8(m.payload().to_vec()).unwrap())
                    }
                    // The first link's notice to connections opened before it (there are none here).
                    Command::Missed { .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert!(Instant::now() < deadline, "only {out:?} of {n}");
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    }

    fn nothing_more(&self) {
        std::thread::sleep(Duration::from_millis(300));
        let mut commands = Vec::new();
        self.mailbox.take_all(&mut commands);
        assert!(commands.is_empty(), "more was delivered: {commands:?}");
    }
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

#[test]
fn a_successor_started_from_the_handed_over_position_applies_exactly_what_followed() {
    assert!(redis_available(), "redis-server is missing");
    let redis = Redis::start();
    let publisher = Node::start(&redis, "publisher");
    let publish = |prefix: &str, range: std::ops::Range<usize>| {
        let mut admin = Admin::connect(publisher.admin);
        for body in numbered(prefix, range) {
            assert_eq!(admin.request("POST", "/publish/all", &body).0, 202);
        }
    };

    let predecessor = Process::start(&redis, None);
    publish("m", 0..20);
    assert_eq!(predecessor.delivered(20), numbered("m", 0..20));
    let position = predecessor
        .cluster
        .hand_over(WAIT)
        .expect("the reader stops in time")
        .expect("it had linked");
    // What is published during the cut waits in the bus.
    publish("m", 20..50);
    predecessor.nothing_more();

    // The position crosses the process boundary as text.
    let handed: BusPosition = position.to_string().parse().unwrap();
    let successor = Process::start(&redis, Some(handed));
    publish("m", 50..55);
    assert_eq!(successor.delivered(35), numbered("m", 20..55));
    successor.nothing_more();
    assert_eq!(
        successor
            .cluster
            .metrics
            .told
            .closed
            .load(std::sync::atomic::Ordering::Relaxed)
            + successor
                .cluster
                .metrics
                .gaps_trimmed
                .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// Kills a process by pid when dropped: the successor of an upgraded node is not a child of the test.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-9")
            .arg(self.0.to_string())
            .status();
    }
}

fn serving_pid(node: &Node) -> Option<u32> {
    let (status, body) = http(node.admin, "GET", "/healthz", "");
    (status == 200).then(|| json(&body)["pid"].as_u64().unwrap() as u32)
}

/// The whole path with real processes: node A, one of two, is upgraded (SIGUSR2) while node B publishes to A's
/// client without a pause. The new process continues A's bus reader from the exact entry the old one stopped
/// at: every message arrives once and in order, nobody is told to resync or closed with 1012, and A keeps its
/// node id (B counts two nodes, not three).
#[test]
fn a_node_upgraded_in_the_middle_of_a_stream_of_cluster_publishes_loses_nothing() {
    assert!(redis_available(), "redis-server is missing");
    let redis = Redis::start();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    let mut client = a.connect_as("u", "phone", "news");
    // Both nodes are in the cluster before anything is published.
    assert!(wait_for(|| nodes(&b) == 2), "nodes never saw each other");
    const TOTAL: usize = 1_500;
    let published = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publisher = {
        let (admin, published) = (b.admin, published.clone());
        std::thread::spawn(move || {
            let mut admin = Admin::connect(admin);
            for i in 0..TOTAL {
                let (path, body) = match i % 2 {
                    0 => ("/publish/user/u", format!("u{i}")),
                    _ => ("/publish/channel/news", format!("n{i}")),
                };
                let (status, reply) = admin.request("POST", path, &body);
                assert_eq!(status, 202, "{body}: {reply}");
                published.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    assert!(wait_for(|| published
        .load(std::sync::atomic::Ordering::SeqCst)
        >= 200));
    let old = a.child.id();
    let status = std::process::Command::new("kill")
        .args(["-USR2", &old.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut new = None;
    assert!(
        wait_for(|| {
            new = serving_pid(&a).filter(|&pid| pid != old);
            new.is_some()
        }),
        "no new process took over:\n{}",
        a.log()
    );
    let _successor = KillOnDrop(new.unwrap());
    let at_takeover = published.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        at_takeover < TOTAL,
        "the upgrade must happen while B publishes ({at_takeover} of {TOTAL} were out)"
    );
    publisher.join().unwrap();
    for i in 0..TOTAL {
        let expected = match i % 2 {
            0 => format!("u{i}"),
            _ => format!("n{i}"),
        };
        assert_eq!(recv_text(&mut client), expected, "once, in order");
    }
    assert_nothing_more(&a, &mut [&mut client]);
    assert_eq!(a.metric("densepush_cluster_missed_closes_total"), 0);
    assert_eq!(a.metric("densepush_cluster_missed_resyncs_total"), 0);
    assert_eq!(nodes(&b), 2, "A kept its node id");
    // And B still finds u's connection on A, the moved one.
    assert_eq!(b.presence("u")["connections"], 1);
}

/// Nodes alive in the cluster as `node` sees them (the dashboard's count).
fn nodes(node: &Node) -> u64 {
    let (status, body) = http(node.admin, "GET", "/stats", "");
    assert_eq!(status, 200, "{body}");
    json(&body)["cluster"]["nodes"].as_u64().unwrap_or(0)
}

fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
