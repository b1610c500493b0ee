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
