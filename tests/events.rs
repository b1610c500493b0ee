//! Connection events end to end: the real binary POSTs batched JSON to a real HTTP receiver (a small
//! keep-alive HTTP/1.1 server on a thread of this test). Storms of thousands of connects and disconnects arrive
//! as a few requests holding every event; a receiver that is down or never answers makes densepush drop and
//! count events, while publishes keep flowing and the queue stays within its bound.

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the receiver does with each request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers 200.
    Ok,
    /// Reads the request and never answers.
    Silent,
}

/// One request the receiver got.
struct Received {
    authorization: Option<String>,
    events: Vec<serde_json::Value>,
}

/// A webhook receiver on a loopback port; requests are kept in order.
struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(mode: Mode) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let shared = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let shared = shared.clone();
                std::thread::spawn(move || serve(stream, mode, &shared));
            }
        });
        Receiver { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn requests(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Every event received so far, in order.
    fn events(&self) -> Vec<serde_json::Value> {
        let requests = self.requests.lock().unwrap();
        requests.iter().flat_map(|r| r.events.clone()).collect()
    }

    /// Waits until `n` events have arrived (panics after `timeout`).
    fn wait_for(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} events arrived",
                events.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Serves one keep-alive connection: reads requests (Content-Length bodies), records them, answers 200.
fn serve(stream: TcpStream, mode: Mode, requests: &Mutex<Vec<Received>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        assert!(request_line.starts_with("POST /hook "), "{request_line:?}");
        let mut length = 0;
        let mut authorization = None;
        let mut content_type = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "authorization" => authorization = Some(value.trim().to_owned()),
                "content-type" => content_type = Some(value.trim().to_owned()),
                _ => {}
            }
        }
        assert_eq!(content_type.as_deref(), Some("application/json"));
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let events = json["events"].as_array().unwrap().clone();
        requests.lock().unwrap().push(Received {
            authorization,
            events,
        });
        match mode {
            Mode::Ok => {
                let stream = reader.get_mut();
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .unwrap();
            }
            Mode::Silent => std::thread::sleep(Duration::from_secs(3600)),
        }
    }
}

fn start(url: &str, extra: &[(&str, &str)]) -> Server {
    let url = format!("\"{url}\"");
    let mut overrides = vec![
        ("events.webhook_url", url.as_str()),
        ("server.reactors", "2"),
        ("log.level", "info"),
    ];
    overrides.extend_from_slice(extra);
    Server::start(&overrides)
}

fn count(events: &[serde_json::Value], kind: &str) -> usize {
    events.iter().filter(|e| e["type"] == kind).count()
}

#[test]
fn connect_and_disconnect_storms_arrive_as_a_few_batched_requests_with_every_event() {
    const USERS: usize = 1_500;
    let receiver = Receiver::start(Mode::Ok);
    let server = start(
        &receiver.url(),
        &[
            ("events.batch_ms", "300"),
            ("events.authorization", "\"Bearer hook-secret\""),
            ("cluster.node_id", "\"node-7\""),
        ],
    );
    // Two connections per user: one with a client token, one without.
    let mut conns = Vec::new();
    for u in 0..USERS {
        conns.push(server.raw_upgrade(&format!("user=u{u}&client=phone")));
        conns.push(server.raw_upgrade(&format!("user=u{u}")));
    }
    let events = receiver.wait_for(3 * USERS, Duration::from_secs(20));
    assert_eq!(count(&events, "connect"), 2 * USERS);
    assert_eq!(count(&events, "online"), USERS);

    // Half close cleanly (a close frame with 4321), half vanish (EOF without a close frame).
    for (i, mut stream) in conns.into_iter().enumerate() {
        if i % 2 == 0 {
            write_frame(&mut stream, 0x8, &4321u16.to_be_bytes()).unwrap();
        }
        drop(stream);
    }
    let events = receiver.wait_for(6 * USERS, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(700));
    let events_now = receiver.events();
    assert_eq!(
        events_now.len(),
        events.len(),
        "nothing more than every event"
    );
    assert_eq!(count(&events, "disconnect"), 2 * USERS);
    assert_eq!(count(&events, "offline"), USERS);

    // A few requests, not one per event: batched by events.batch_ms and events.max_batch (1000).
    let requests = receiver.requests();
    assert!(requests <= 6 * USERS / 1000 + 8, "{requests} requests");
    for request in receiver.requests.lock().unwrap().iter() {
        assert_eq!(request.authorization.as_deref(), Some("Bearer hook-secret"));
        assert!(request.events.len() <= 1000);
    }

    // Every event names its node and time; per user: connect before online, disconnect before offline.
    let mut per_user: HashMap<String, Vec<&serde_json::Value>> = HashMap::new();
    for e in &events {
        assert_eq!(e["node"], "node-7", "{e}");
        assert!(e["at"].as_u64().unwrap() > 1_600_000_000_000, "{e}");
        per_user
            .entry(e["user"].as_str().unwrap().to_owned())
            .or_default()
            .push(e);
    }
    assert_eq!(per_user.len(), USERS);
    for (user, events) in &per_user {
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "connect").count(),
            2,
            "{user}: {kinds:?}"
        );
        let online = kinds.iter().position(|k| *k == "online").unwrap();
        let offline = kinds.iter().position(|k| *k == "offline").unwrap();
        assert!(kinds[..online].contains(&"connect"), "{user}: {kinds:?}");
        assert_eq!(
            offline,
            kinds.len() - 1,
            "{user}: offline comes last: {kinds:?}"
        );
        let mut codes: Vec<(Option<&str>, u64)> = events
            .iter()
            .filter(|e| e["type"] == "disconnect")
            .map(|e| (e["client"].as_str(), e["code"].as_u64().unwrap()))
            .collect();
        codes.sort();
        // The token's connection closed with 4321, the other vanished (1006).
        assert_eq!(codes, [(None, 1006), (Some("phone"), 4321)], "{user}");
        assert!(events
            .iter()
            .filter(|e| e["type"] == "online" || e["type"] == "offline")
            .all(|e| e.get("client").is_none() && e.get("code").is_none()));
    }
    assert_eq!(
        server.metric("densepush_events_sent_total", &[]),
        6 * USERS as u64
    );
    assert_eq!(server.metric("densepush_events_dropped_total", &[]), 0);
}

/// Opens `n` connections and closes them abruptly, as fast as it can: a storm of 2n events.
fn storm(server: &Server, n: usize) {
    let conns: Vec<TcpStream> = (0..n)
        .map(|i| server.raw_upgrade(&format!("user=s{i}")))
        .collect();
    drop(conns);
}

/// Publishes to a user while the events queue is full and checks the message arrives promptly.
fn publishes_still_flow(server: &Server) {
    let mut ws = server.connect("user=probe");
    let started = Instant::now();
    server.publish("/publish/user/probe", "still flowing");
    assert_eq!(recv_text(&mut ws), "still flowing");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_receiver_that_is_down_makes_densepush_drop_and_count_never_stall() {
    // A port nothing listens on: every request fails at once and is retried after jittered delays.
    let down = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", down.local_addr().unwrap());
    drop(down);
    let server = start(
        &url,
        &[
            ("events.queue_size", "100"),
            ("events.max_batch", "50"),
            ("events.max_retries", "2"),
        ],
    );
    storm(&server, 2_000);
    publishes_still_flow(&server);
    let dropped = server.metric(
        "densepush_events_dropped_total",
        &[("reason", "queue_full")],
    );
    assert!(dropped > 0, "the queue overflowed and it was counted");
    assert!(server.metric("densepush_events_queued", &[]) <= 100);
    assert_eq!(server.metric("densepush_events_queue_capacity", &[]), 100);
    // Batches that failed every retry are dropped and counted too, and nothing is held beyond the bound.
    assert!(wait_until(Duration::from_secs(20), || {
        server.metric("densepush_events_dropped_total", &[("reason", "failed")]) > 0
    }));
    assert!(server.metric("densepush_events_requests_total", &[("result", "failed")]) >= 3);
    assert_eq!(server.metric("densepush_events_sent_total", &[]), 0);
}

#[test]
fn a_receiver_that_never_answers_makes_densepush_drop_and_count_never_stall_or_grow() {
    let receiver = Receiver::start(Mode::Silent);
    let server = start(
        &receiver.url(),
        &[
            ("events.queue_size", "100"),
            ("events.max_batch", "50"),
            ("events.timeout_ms", "500"),
            ("events.max_retries", "0"),
        ],
    );
    let heap_before = server.metric("densepush_heap_allocated_bytes", &[]);
    for _ in 0..3 {
        storm(&server, 1_000);
        publishes_still_flow(&server);
    }
    let dropped = server.metric(
        "densepush_events_dropped_total",
        &[("reason", "queue_full")],
    );
    assert!(dropped >= 6_000 - 100 - 50 * 20, "dropped {dropped}");
    assert!(server.metric("densepush_events_queued", &[]) <= 100);
    // Nothing grows with the events that could not be sent: the heap is back near where it started once the
    // storms' connections are gone (held events are at most the queue and one batch).
    assert!(wait_until(Duration::from_secs(5), || server
        .metric("densepush_connections_open", &[])
        == 0));
    let heap_after = server.metric("densepush_heap_allocated_bytes", &[]);
    assert!(
        heap_after < heap_before + 4 * 1024 * 1024,
        "heap {heap_before} -> {heap_after}"
    );
    assert!(wait_until(Duration::from_secs(10), || server.metric(
        "densepush_events_requests_total",
        &[("result", "failed")]
    ) >= 2));
}

#[test]
fn the_disconnects_of_a_shutdown_are_sent_before_the_process_exits() {
    let receiver = Receiver::start(Mode::Ok);
    let mut server = start(&receiver.url(), &[("events.batch_ms", "60000")]);
    let _a = server.connect("user=a");
    let _b = server.connect("user=b&client=tab");
    // batch_ms is a minute: the connects are still waiting when SIGTERM comes.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(receiver.requests(), 0);
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let events = receiver.events();
    assert_eq!(count(&events, "connect"), 2, "{events:?}");
    let codes: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "disconnect")
        .map(|e| e["code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [1001, 1001], "{events:?}");
    assert_eq!(count(&events, "offline"), 2);
}

#[test]
fn across_a_live_upgrade_each_event_is_sent_once_by_the_process_that_saw_it() {
    use tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let receiver = Receiver::start(Mode::Ok);
    let mut server = start(&receiver.url(), &[("events.batch_ms", "60000")]);
    let mut a = server.connect("user=a");
    let mut b1 = server.connect("user=b&client=one");
    let _b2 = server.connect("user=b&client=two");
    // batch_ms is a minute: the connects wait in the old process's queue when the upgrade starts. It sends them
    // before it exits; the new process knows a and b are online without announcing them again.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(receiver.requests(), 0);
    server.upgrade();
    let events = receiver.events();
    assert_eq!(
        (count(&events, "connect"), count(&events, "online")),
        (3, 2),
        "{events:?}"
    );
    // In the new process: a leaves (its offline follows), one of b's two connections leaves (b stays online).
    for ws in [&mut a, &mut b1] {
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .unwrap();
        while ws.read().is_ok() {}
    }
    assert!(wait_until(Duration::from_secs(10), || {
        server.metric("densepush_connections_open", &[]) == 1
    }));
    // A drain of the new process sends what it queued: a's and b1's disconnects, a's offline, then b2's 1001
    // and b's offline.
    let pid = server.serving_pid();
    signal_pid(pid, libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(20), || !pid_alive(pid)));
    let events = receiver.events();
    let codes: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "disconnect")
        .map(|e| e["code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [1000, 1000, 1001], "{events:?}");
    assert_eq!(
        (
            count(&events, "connect"),
            count(&events, "online"),
            count(&events, "offline")
        ),
        (3, 2, 2),
        "{events:?}"
    );
    let offline: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "offline")
        .map(|e| e["user"].as_str().unwrap())
        .collect();
    assert_eq!(offline, ["a", "b"]);
}
