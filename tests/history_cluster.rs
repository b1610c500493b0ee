//! Missed-message recovery in a cluster: offsets assigned by Redis, so a client that leaves one node and
//! reconnects to another recovers exactly what it missed; when Redis is down, publishes get 503 and recovery
//! gets a resync, never a silent gap. A real `redis-server` and real densepush processes, as in `cluster.rs`.

// The harness is a copy of `cluster.rs`'s; some of its helpers are not used here.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

type Client = WebSocket<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);
/// Alive markers in these tests expire quickly, so a killed node's absence shows within seconds.
const NODE_TTL_MS: u64 = 1_500;

// ---- harness ---------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` child on a loopback port, without persistence.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let mut redis = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and waits until it answers PING.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: run scripts/test.sh, or apt-get install -y redis-server",
            );
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").is_ok()
                    && matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A densepush process in a cluster.
struct Node {
    child: Child,
    client: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts a node on ephemeral loopback ports with `auth.mode = "none"`, and waits for its Redis link.
    fn start(redis: &Redis, id: &str) -> Node {
        let node = Node::start_unlinked(&redis.url(), id);
        node.wait_for_cluster("up");
        node
    }

    fn start_unlinked(redis_url: &str, id: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = "127.0.0.1:0"
reactors = 2
[auth]
mode = "none"
[admin]
listen = "127.0.0.1:0"
[log]
level = "info"
[cluster]
redis_url = "{redis_url}"
node_id = "{id}"
reconnect_min_ms = 50
reconnect_max_ms = 400
command_timeout_ms = 500
heartbeat_interval_ms = 200
node_ttl_ms = {NODE_TTL_MS}
presence_timeout_ms = 500
[history]
user = true
channel = true
size = 1000
"#
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_densepush"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let (client, admin) = read_ports(child.stdout.take().unwrap());
        Node {
            child,
            client,
            admin,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn wait_for_cluster(&self, state: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = http(self.admin, "GET", "/healthz", "");
            assert_eq!(status, 200, "{body}");
            if json(&body)["cluster"] == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster never {state}: {body}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn connect(&self, query: &str) -> Client {
        let url = format!("ws://{}/ws?{query}", self.client);
        let (mut ws, _) = tungstenite::connect(url).expect("websocket connect");
        if let MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        ws
    }

    fn publish(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, text) = http(self.admin, "POST", path, body);
        (status, json(&text))
    }

    fn presence(&self, user: &str) -> serde_json::Value {
        let (status, body) = http(self.admin, "GET", &format!("/presence/user/{user}"), "");
        assert_eq!(status, 200, "{body}");
        json(&body)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the "densepush listening client=… admin=…" line; the rest of stdout is drained in the background.
fn read_ports(stdout: std::process::ChildStdout) -> (SocketAddr, SocketAddr) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if !sent {
                if let Some(rest) = line.strip_prefix("densepush listening ") {
                    let mut client = None;
                    let mut admin = None;
                    for part in rest.split_whitespace() {
                        if let Some(a) = part.strip_prefix("client=") {
                            client = a.parse::<SocketAddr>().ok();
                        } else if let Some(a) = part.strip_prefix("admin=") {
                            admin = a.parse::<SocketAddr>().ok();
                        }
                    }
                    let _ = tx.send((client.unwrap(), admin.unwrap()));
                    sent = true;
                }
            }
        }
    });
    rx.recv_timeout(WAIT).expect("densepush did not start")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A keep-alive admin HTTP/1.1 connection.
struct Admin {
    reader: BufReader<TcpStream>,
}

impl Admin {
    fn connect(addr: SocketAddr) -> Admin {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Admin {
            reader: BufReader::new(stream),
        }
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).unwrap();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"))
            .parse()
            .unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    Admin::connect(addr).request(method, path, body)
}

/// The next text message, skipping control frames.
fn recv_text(ws: &mut Client) -> String {
    loop {
        match ws.read().expect("read a message") {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Publishes a marker to everyone through `node` and checks it is the next message of each client: nothing
/// was delivered twice before it.
fn assert_nothing_more(node: &Node, clients: &mut [&mut Client]) {
    let (status, body) = node.publish("/publish/all", "end");
    assert_eq!(status, 202, "{body}");
    for ws in clients.iter_mut() {
        assert_eq!(recv_text(ws), "end", "a message arrived twice or late");
    }
}

fn redis_available() -> bool {
    Path::new("/usr/bin/redis-server").exists()
        || Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok()
}

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
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
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
    // Both nodes hold the same history.
    let (_, page_a) = http(a.admin, "GET", "/history/user:42?limit=1000", "");
    let (_, page_b) = http(b.admin, "GET", "/history/user:42?limit=1000", "");
    assert_eq!(json(&page_a)["messages"], json(&page_b)["messages"]);
    assert_eq!(json(&page_a)["last"], 132);
}

#[test]
fn client_token_messages_recover_only_on_that_clients_connections_across_nodes() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let redis = Redis::start();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
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
fn redis_down_gives_503_and_recovery_gets_resync() {
    assert!(
        redis_available(),
        "redis-server is missing: run scripts/test.sh"
    );
    let mut redis = Redis::start();
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
    let (status, reply) = a.publish("/publish/channel/news", "before");
    assert_eq!(status, 202, "{reply}");
    let epoch = reply["epoch"].as_str().unwrap().to_owned();

    redis.stop();
    let (status, reply) = a.publish("/publish/channel/news", "lost");
    assert_eq!(status, 503, "{reply}");
    b.wait_for_cluster("down");
    // B may have missed messages while its link was down: it must not claim to have everything.
    let mut ws = b.connect(&format!(
        "user=1&channels=news&since=channel:news@{epoch}:0"
    ));
    resync(&mut ws, "channel:news");

    redis.restart();
    a.wait_for_cluster("up");
    b.wait_for_cluster("up");
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
    let a = Node::start(&redis, "node-a");
    let b = Node::start(&redis, "node-b");
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
    let a = Node::start(&redis, "node-a");
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
    let b = Node::start(&redis, "node-b");
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
