//! Harness shared by the cluster tests: a real `redis-server` on a free loopback port (no persistence) and real
//! densepush nodes joined through it, with small admin and WebSocket client helpers.
//!
//! `scripts/test.sh` installs `redis-server` when it is missing; the tests start and stop their own.

// Each test file uses a different subset of the helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
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

/// A `redis-server` child on a loopback port, without persistence unless asked for.
pub struct Redis {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Append-only file with an fsync per write: a restart loses nothing.
    pub persistent: bool,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(false)
    }

    /// A Redis whose restarts keep every key (`appendonly yes`, `appendfsync always`).
    pub fn start_persistent() -> Redis {
        Redis::start_with(true)
    }

    fn start_with(persistent: bool) -> Redis {
        let mut redis = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            persistent,
        };
        redis.restart();
        redis
    }

    /// A connection through the redis crate, for commands a test sends itself.
    pub fn conn(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).unwrap();
        let conn = client.get_connection_with_timeout(WAIT).unwrap();
        conn.set_read_timeout(Some(WAIT)).unwrap();
        conn
    }

    /// Appends raw `wire` bytes to the bus of `prefix` the way a node does (the same script), so a test can put
    /// there what no node would.
    pub fn append_to_bus(&self, prefix: &str, bytes: &[u8]) -> String {
        densepush::cluster::scripts::APPEND
            .invoke(&mut self.conn(), 1, |cmd| {
                cmd.arg(format!("{prefix}:bus")).arg(100_000).arg(bytes);
            })
            .unwrap()
    }

    /// `CONFIG SET name value`.
    pub fn config_set(&self, name: &str, value: &str) {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query::<()>(&mut self.conn())
            .unwrap();
    }

    /// The bus stream's length.
    pub fn bus_len(&self, prefix: &str) -> u64 {
        redis::cmd("XLEN")
            .arg(format!("{prefix}:bus"))
            .query(&mut self.conn())
            .unwrap()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let persistence: &[&str] = if self.persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(persistence)
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

    /// Like `start`, with more configuration (whole sections, or `[cluster]` keys first thing).
    pub fn start_with(redis: &Redis, id: &str, extra: &str) -> Node {
        Node::start_via(&redis.url(), id, extra)
    }

    /// Starts a node on `redis_url` (a proxy's, say) and waits for its link.
    pub fn start_via(redis_url: &str, id: &str, extra: &str) -> Node {
        Node::start_env(redis_url, id, extra, &[])
    }

    /// Like `start_via`, with `DENSEPUSH_*` overrides in the environment (for keys of sections the harness
    /// writes itself, e.g. `DENSEPUSH_SERVER_REACTORS`).
    pub fn start_env(redis_url: &str, id: &str, extra: &str, env: &[(&str, &str)]) -> Node {
        let node = Node::launch(redis_url, id, extra, env);
        node.wait_for_cluster("up");
        node
    }

    /// Starts a node without waiting for its Redis link (which may be down).
    pub fn start_unlinked(redis_url: &str, id: &str) -> Node {
        Node::launch(redis_url, id, "", &[])
    }

    fn launch(redis_url: &str, id: &str, extra: &str, env: &[(&str, &str)]) -> Node {
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
            .envs(env.iter().copied())
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

    /// The value of a sample on this node's `/metrics` (`name` or `name{label="value"}`); panics if there is
    /// none.
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

    /// Freezes the process (SIGSTOP): a node that cannot keep up at all.
    pub fn pause(&self) {
        signal(&self.child, "-STOP");
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        signal(&self.child, "-CONT");
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(sig)
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig}");
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

// ---- a TCP proxy a test can cut ---------------------------------------------------------------------------

/// A TCP proxy in front of a port: a node's link to Redis through it can be cut (every connection closed,
/// new ones refused) and restored, like a network partition that Redis and the other nodes do not see.
pub struct Proxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

struct ProxyState {
    upstream: u16,
    cut: AtomicBool,
    stop: AtomicBool,
    open: Mutex<Vec<TcpStream>>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState {
            upstream,
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
        });
        let accepting = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accepting.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if accepting.cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", accepting.upstream)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut open = accepting.open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, state }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Closes every proxied connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

// ---- what a client is told --------------------------------------------------------------------------------

/// The next frame that is not a ping or pong.
pub fn next_message(ws: &mut Client) -> Message {
    loop {
        match ws.read() {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(other) => return other,
            Err(e) => panic!("expected a message, got {e}"),
        }
    }
}

/// Reads until the close frame and returns its code; panics on a data message first.
pub fn expect_close(ws: &mut Client) -> u16 {
    match next_message(ws) {
        Message::Close(Some(frame)) => u16::from(frame.code),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// A `resync` notice: its stream; panics on anything else.
pub fn expect_resync(ws: &mut Client) -> String {
    let text = recv_text(ws);
    let v = json(&text);
    assert_eq!(v["type"], "resync", "expected a resync, got {text}");
    v["s"].as_str().unwrap().to_owned()
}

/// The payload of an envelope (`{"s","d",...}`); panics on a resync or anything else.
pub fn envelope_data(ws: &mut Client) -> String {
    let text = recv_text(ws);
    let v = json(&text);
    assert!(v.get("type").is_none(), "expected an envelope, got {text}");
    v["d"].as_str().unwrap().to_owned()
}
