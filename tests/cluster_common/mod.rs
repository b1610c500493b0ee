//! Harness shared by the cluster tests: a real `redis-server` on a free loopback port (no persistence) and real
//! densepush nodes joined through it, with small admin and WebSocket client helpers.
//!
//! `scripts/test.sh` installs `redis-server` when it is missing; the tests start and stop their own.

// Each test file uses a different subset of the helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub type Client = WebSocket<MaybeTlsStream<TcpStream>>;

pub const WAIT: Duration = Duration::from_secs(10);
/// Alive markers in these tests expire quickly, so a killed node's absence shows within seconds.
pub const NODE_TTL_MS: u64 = 1_500;

// ---- harness ---------------------------------------------------------------------------------------------

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` child on a loopback port, without persistence.
pub struct Redis {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let mut redis = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
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

    /// `PUBLISH channel bytes` over a raw RESP connection (the bytes may be anything); returns the number of
    /// subscribers that got it.
    pub fn publish_raw(&self, channel: &str, bytes: &[u8]) -> i64 {
        let mut command = format!(
            "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{channel}\r\n${}\r\n",
            channel.len(),
            bytes.len()
        )
        .into_bytes();
        command.extend_from_slice(bytes);
        command.extend_from_slice(b"\r\n");
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(&command).unwrap();
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        reply
            .strip_prefix(':')
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("PUBLISH answered {reply:?}"))
    }

    pub fn stop(&mut self) {
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
pub struct Node {
    pub child: Child,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    pub _dir: tempfile::TempDir,
}

impl Node {
    /// Starts a node on ephemeral loopback ports with `auth.mode = "none"`, and waits for its Redis link.
    pub fn start(redis: &Redis, id: &str) -> Node {
        Node::start_with(redis, id, "")
    }

    /// Like `start`, with user and channel history on (1,000 messages per stream).
    pub fn start_with_history(redis: &Redis, id: &str) -> Node {
        Node::start_with(redis, id, HISTORY_TOML)
    }

    fn start_with(redis: &Redis, id: &str, extra: &str) -> Node {
        let node = Node::launch(&redis.url(), id, extra);
        node.wait_for_cluster("up");
        node
    }

    /// Starts a node without waiting for its Redis link (which may be down).
    pub fn start_unlinked(redis_url: &str, id: &str) -> Node {
        Node::launch(redis_url, id, "")
    }

    fn launch(redis_url: &str, id: &str, extra: &str) -> Node {
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
{extra}"#
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn wait_for_cluster(&self, state: &str) {
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

    /// Connects as `user` with a client token and channels (auth mode none).
    pub fn connect_as(&self, user: &str, client: &str, channels: &str) -> Client {
        self.connect(&format!("user={user}&client={client}&channels={channels}"))
    }

    /// Connects with a raw query string.
    pub fn connect(&self, query: &str) -> Client {
        let url = format!("ws://{}/ws?{query}", self.client);
        let (mut ws, _) = tungstenite::connect(url).expect("websocket connect");
        if let MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        ws
    }

    pub fn publish(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, text) = http(self.admin, "POST", path, body);
        (status, json(&text))
    }

    pub fn presence(&self, user: &str) -> serde_json::Value {
        let (status, body) = http(self.admin, "GET", &format!("/presence/user/{user}"), "");
        assert_eq!(status, 200, "{body}");
        json(&body)
    }

    /// The value of an unlabelled sample on this node's `/metrics`; panics if there is none.
    pub fn metric(&self, name: &str) -> u64 {
        let (status, text) = http(self.admin, "GET", "/metrics", "");
        assert_eq!(status, 200, "{text}");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
    }

    pub fn kill(&mut self) {
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
pub fn read_ports(stdout: std::process::ChildStdout) -> (SocketAddr, SocketAddr) {
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

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A keep-alive admin HTTP/1.1 connection.
pub struct Admin {
    reader: BufReader<TcpStream>,
}

impl Admin {
    pub fn connect(addr: SocketAddr) -> Admin {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Admin {
            reader: BufReader::new(stream),
        }
    }

    pub fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
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

pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    Admin::connect(addr).request(method, path, body)
}

/// The next text message, skipping control frames.
pub fn recv_text(ws: &mut Client) -> String {
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
pub fn assert_nothing_more(node: &Node, clients: &mut [&mut Client]) {
    let (status, body) = node.publish("/publish/all", "end");
    assert_eq!(status, 202, "{body}");
    for ws in clients.iter_mut() {
        assert_eq!(recv_text(ws), "end", "a message arrived twice or late");
    }
}

pub fn redis_available() -> bool {
    Path::new("/usr/bin/redis-server").exists()
        || Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok()
}

/// The `[history]` section of nodes started with `Node::start_with_history`.
pub const HISTORY_TOML: &str = "[history]\nuser = true\nchannel = true\nsize = 1000\n";
