//! A densepush cluster end to end: a real `redis-server` on a loopback port and two or three real densepush
//! processes joined through it, driven with real WebSocket clients and admin HTTP requests.
//!
//! `scripts/test.sh` installs `redis-server` when it is missing; these tests start and stop their own.

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

    fn connect(&self, user: &str, client: &str, channels: &str) -> Client {
        let url = format!(
            "ws://{}/ws?user={user}&client={client}&channels={channels}",
            self.client
        );
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
    let mut on_b = b.connect("u1", "phone", "news");
    let mut on_a = a.connect("u1", "laptop", "other");

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
    let mut on_a = a.connect("burst", "x", "");
    let mut on_b = b.connect("burst", "y", "");

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
    let mut victim = b.connect("kicked", "phone", "");
    let mut bystander = b.connect("stays", "phone", "");

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
    let _on_a = a.connect("p", "1", "");
    let _on_b1 = b.connect("p", "2", "");
    let _on_b2 = b.connect("p", "3", "");
    let _on_c = c.connect("p", "4", "");

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
    let mut on_b = b.connect("r", "phone", "");
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
    let mut local = a.connect("early", "x", "");
    let (status, _) = a.publish("/publish/user/early", "nowhere");
    assert_eq!(status, 503);

    redis.restart();
    a.wait_for_cluster("up");
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
