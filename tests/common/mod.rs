//! Test harness for the integration tests: starts the real `densepush` binary on ephemeral loopback ports
//! with a generated config, and talks to it with real clients (tungstenite, raw TCP, a small HTTP/1.1 admin
//! client).
//!
//! Owns: process start/stop, config files, client helpers and timeouts. Every blocking read has a timeout,
//! so a broken server fails a test instead of hanging it. Does not own: what a test asserts.

// Each test file uses a different subset of the helpers.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection};

use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// Longest a single read may block before a test gives up on it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// A valid `Sec-WebSocket-Key` (RFC 6455 §4.1 item 7: 16 random bytes, base64).
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// A JWT secret long enough for HS256 (RFC 7518 §3.2: at least 32 bytes).
pub const TEST_SECRET: &str = "integration-test-secret-0123456789abcdef";

/// In `Server::start_with_env`'s environment: the binary to run instead of the one under test (not passed on).
pub const BINARY_ENV: &str = "TEST_DENSEPUSH_BINARY";

/// A client WebSocket over a blocking std stream with a read timeout.
pub type Ws = WebSocket<TcpStream>;

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_densepush")
}

/// A command for the binary with every `DENSEPUSH_*` variable removed, so the developer's environment
/// cannot change (or, as unknown overrides, break) the configuration a test writes.
pub fn command() -> Command {
    command_for(Path::new(bin()))
}

/// [`command`] for another binary (a copy of densepush that a test replaces, say).
pub fn command_for(binary: &Path) -> Command {
    let mut cmd = Command::new(binary);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DENSEPUSH_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs the binary to completion with these arguments.
pub fn cli(args: &[&str]) -> Output {
    cli_with_env(args, &[])
}

/// Runs the binary to completion with these arguments and extra environment variables.
pub fn cli_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    command()
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running densepush")
}

/// The base test configuration plus dotted-key overrides. A value is parsed as a TOML value when it is
/// one (`"300"` → integer, `"[\"a\"]"` → array, `"\"123\""` → string), and taken as a plain string otherwise
/// (`"jwt"`).
pub fn config_table(overrides: &[(&str, &str)]) -> toml::Table {
    let base: &[(&str, &str)] = &[
        ("server.listen", "127.0.0.1:0"),
        ("admin.listen", "127.0.0.1:0"),
        ("server.reactors", "1"),
        ("auth.mode", "none"),
        ("log.level", "debug"),
    ];
    let mut root = toml::Table::new();
    for (dotted, value) in base.iter().chain(overrides) {
        let (section, key) = dotted
            .split_once('.')
            .unwrap_or_else(|| panic!("override key {dotted:?} must be section.key"));
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String((*value).to_string()));
        root.entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("section is a table")
            .insert(key.to_string(), value);
    }
    root
}

/// Writes [`config_table`] to `path`.
pub fn write_config(path: &Path, overrides: &[(&str, &str)]) {
    let text = toml::to_string(&config_table(overrides)).expect("serialising config");
    std::fs::write(path, text).expect("writing config");
}

/// A running server process, killed (SIGKILL) on drop unless it already exited.
pub struct Server {
    /// The client WebSocket listener.
    pub client_addr: SocketAddr,
    /// The admin HTTP listener.
    pub admin_addr: SocketAddr,
    /// The wss:// listener, when `[tls]` is on.
    pub tls_addr: Option<SocketAddr>,
    /// The config file the server was started with (also usable for `densepush token`).
    pub config_path: PathBuf,
    /// The server's `densepush listening …` line, after that prefix.
    pub listening: String,
    /// The certificates of a server started with [`Server::start_tls`].
    pki: Option<Arc<TestPki>>,
    /// The TLS client configuration [`Server::connect_wss`] shares between connections, so a second
    /// connection can resume the first one's session.
    tls_client: Option<Arc<ClientConfig>>,
    child: Child,
    exited: Option<ExitStatus>,
    log_path: PathBuf,
    dir: tempfile::TempDir,
    /// Processes that took over by a live upgrade, newest last: killed with the server.
    successors: Vec<u32>,
}

impl Server {
    /// Starts a server with the base config plus `overrides`; panics (with the server's log) if it does not
    /// print its listening line in time.
    pub fn start(overrides: &[(&str, &str)]) -> Server {
        Server::start_with_env(overrides, &[])
    }

    /// [`Server::start`] with extra environment variables (e.g. `DENSEPUSH_*` overrides).
    pub fn start_with_env(overrides: &[(&str, &str)], env: &[(&str, &str)]) -> Server {
        Server::start_configured(overrides, env, |_| {})
    }

    /// [`Server::start_with_env`], letting `configure` adjust the command before it is spawned (e.g. a
    /// `pre_exec` hook that lowers a resource limit).
    pub fn start_configured(
        overrides: &[(&str, &str)],
        env: &[(&str, &str)],
        configure: impl FnOnce(&mut Command),
    ) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("config.toml");
        write_config(&config_path, overrides);
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path).expect("creating log file");
        let mut cmd = match env.iter().find(|(k, _)| *k == BINARY_ENV) {
            Some((_, binary)) => command_for(Path::new(binary)),
            None => command(),
        };
        cmd.arg("--config")
            .arg(&config_path)
            .envs(env.iter().copied().filter(|(k, _)| *k != BINARY_ENV))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("spawning densepush");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("densepush listening ") {
                    let _ = tx.send(rest.to_string());
                    break;
                }
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "server did not print its listening line ({e}); exit {status:?}; log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
        };
        // `off` for a listener that is not on.
        let field = |name: &str| -> Option<SocketAddr> {
            let value = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} field in listening line {line:?}"));
            (value != "off").then(|| {
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("bad {name} address in listening line {line:?}"))
            })
        };
        Server {
            // Unspecified (0.0.0.0:0) when ws:// is off.
            client_addr: field("client=").unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
            tls_addr: field("tls="),
            admin_addr: field("admin=").expect("the admin listener is always on"),
            config_path,
            listening: line.clone(),
            pki: None,
            tls_client: None,
            child,
            exited: None,
            log_path,
            dir,
            successors: Vec::new(),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The temporary directory holding the config and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends SIGHUP (reload the certificate pair).
    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    fn signal(&self, signal: libc::c_int) {
        assert!(self.exited.is_none(), "the server has exited");
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child, not yet reaped
        // (`wait_exit` reaps it), so it cannot name another process.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    /// The process serving now: the one started, or its latest successor.
    pub fn serving_pid(&self) -> u32 {
        self.successors.last().copied().unwrap_or(self.child.id())
    }

    /// The pid `/healthz` reports.
    pub fn healthz_pid(&self) -> u32 {
        self.request("GET", "/healthz", b"", &[]).json()["pid"]
            .as_u64()
            .expect("pid in /healthz") as u32
    }

    /// A live upgrade by SIGUSR2 to the serving process: waits until a new process serves (its pid in
    /// `/healthz`) and the old one is gone; returns the new pid. Panics with the log if it rolls back.
    pub fn upgrade(&mut self) -> u32 {
        let old = self.serving_pid();
        let since = unix_ms();
        signal_pid(old, libc::SIGUSR2);
        self.follow_upgrade(old, since)
    }

    /// Waits for the upgrade of `old` to complete (see [`Server::upgrade`]); an upgrade that started at or after
    /// `since` (Unix ms, taken before asking for it) and rolled back fails the test.
    pub fn follow_upgrade(&mut self, old: u32, since: u64) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "no successor took over from {old}"
            );
            let health = self.request("GET", "/healthz", b"", &[]).json();
            let pid = health["pid"].as_u64().unwrap_or(0) as u32;
            if pid != old && pid != 0 {
                self.successors.push(pid);
                break;
            }
            let upgrade = &health["upgrade"];
            assert!(
                upgrade["last"] != "rolled_back"
                    || upgrade["started_ms"].as_u64().unwrap_or(0) < since,
                "the upgrade rolled back: {upgrade}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The predecessor exits by itself; the first one is our child and is reaped here.
        if old == self.child.id() {
            let status = self
                .wait_exit(Duration::from_secs(10))
                .expect("the old process exits");
            assert!(status.success(), "the old process exited with {status}");
        } else {
            assert!(
                wait_until(Duration::from_secs(10), || !pid_alive(old)),
                "process {old} still runs"
            );
        }
        *self.successors.last().expect("pushed above")
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited {
                return Some(status);
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // ---- WebSocket clients -----------------------------------------------------------------------------

    /// `ws://` URL of the endpoint with this query (no leading `?`).
    pub fn ws_url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://{}/ws", self.client_addr)
        } else {
            format!("ws://{}/ws?{query}", self.client_addr)
        }
    }

    /// Connects a tungstenite client with this query; panics if the upgrade fails.
    pub fn connect(&self, query: &str) -> Ws {
        self.try_connect(query, &[])
            .unwrap_or_else(|e| panic!("connect ?{query}: {e}"))
    }

    /// Connects a tungstenite client with this query and extra request headers.
    pub fn try_connect(
        &self,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws, tungstenite::Error> {
        let mut request = self.ws_url(query).into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                tungstenite::http::HeaderValue::from_str(value).expect("header value"),
            );
        }
        let stream = TcpStream::connect(self.client_addr)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        match tungstenite::client(request, stream) {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
            Err(tungstenite::HandshakeError::Interrupted(_)) => Err(tungstenite::Error::Io(
                io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"),
            )),
        }
    }

    /// The HTTP status the server refused an upgrade with; panics if it was accepted.
    pub fn refused_status(&self, query: &str, headers: &[(&str, &str)]) -> u16 {
        match self.try_connect(query, headers) {
            Ok(_) => panic!("upgrade ?{query} was accepted, expected a refusal"),
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(e) => panic!("upgrade ?{query} failed without an HTTP status: {e}"),
        }
    }

    // ---- raw TCP ---------------------------------------------------------------------------------------

    /// A plain TCP connection to the client listener, with read and write timeouts.
    pub fn raw(&self) -> TcpStream {
        let stream = TcpStream::connect(self.client_addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
    }

    /// Sends `head` on a fresh connection and returns the status and whole response (read until the server
    /// closes, or a reset after some bytes).
    pub fn raw_exchange(&self, head: &[u8]) -> (u16, String) {
        let mut stream = self.raw();
        stream.write_all(head).expect("writing request");
        let response = read_to_close(&mut stream);
        let text = String::from_utf8_lossy(&response).into_owned();
        (status_of(&text), text)
    }

    /// A connection on which a hand-written upgrade completed; the 101 head has been read and nothing after it.
    pub fn raw_upgrade(&self, query: &str) -> TcpStream {
        let mut stream = self.raw();
        upgrade_on(&mut stream, query);
        stream
    }

    // ---- admin API -------------------------------------------------------------------------------------

    /// A keep-alive admin connection.
    pub fn admin(&self) -> Admin {
        Admin::connect(self.admin_addr)
    }

    /// One request on a fresh admin connection.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Response {
        self.admin().request(method, path, body, headers)
    }

    /// `POST path` with a text body on a fresh admin connection.
    pub fn post(&self, path: &str, body: &str) -> Response {
        self.request("POST", path, body.as_bytes(), &[])
    }

    /// `POST path` and asserts 202 Accepted.
    pub fn publish(&self, path: &str, body: &str) {
        let response = self.post(path, body);
        assert_eq!(response.status, 202, "POST {path}: {}", response.text());
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> String {
        let response = self.request("GET", "/metrics", b"", &[]);
        assert_eq!(response.status, 200, "GET /metrics: {}", response.text());
        response.text()
    }

    /// Sum of the samples of `name` whose labels include `labels`; panics if `name` has no sample at all.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        metric_in(&self.metrics_text(), name, labels)
    }

    /// Mints a token with `densepush token` run on this server's config (so with its secret).
    pub fn token(&self, args: &[&str]) -> String {
        token_with_config(&self.config_path, args)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for &pid in &self.successors {
            if pid_alive(pid) {
                signal_pid(pid, libc::SIGKILL);
            }
        }
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- server log ----\n{}---- end of server log ----",
                self.log()
            );
        }
    }
}

/// Runs `densepush --config <config> token <args>` and returns the token.
pub fn token_with_config(config: &Path, args: &[&str]) -> String {
    let config = config.to_str().expect("utf-8 path");
    let mut all = vec!["--config", config, "token"];
    all.extend_from_slice(args);
    let out = cli(&all);
    assert!(
        out.status.success(),
        "densepush token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)
        .expect("utf-8 token")
        .trim()
        .to_string();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");
    token
}

// ---- WebSocket helpers ---------------------------------------------------------------------------------

/// Whether a tungstenite error is a read timeout.
pub fn is_timeout(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

/// The next data or close message, skipping pings and pongs; panics on timeout or error. For `ws://` and
/// `wss://` clients alike.
pub fn recv<S: Read + Write>(ws: &mut WebSocket<S>) -> Message {
    loop {
        match ws.read() {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(message) => return message,
            Err(e) if is_timeout(&e) => panic!("timed out waiting for a message"),
            Err(e) => panic!("reading a message: {e}"),
        }
    }
}

/// The next message, which must be text.
pub fn recv_text<S: Read + Write>(ws: &mut WebSocket<S>) -> String {
    match recv(ws) {
        Message::Text(text) => text.as_str().to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Reads until the server's close frame, which must come before any data message, and returns it.
pub fn recv_close<S: Read + Write>(ws: &mut WebSocket<S>) -> Option<CloseFrame> {
    match recv(ws) {
        Message::Close(frame) => frame,
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// After a close frame: keeps reading (which sends tungstenite's close reply) until the connection ends.
/// Panics if it does not end within the I/O timeout.
pub fn finish_close<S: Read + Write>(ws: &mut WebSocket<S>) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(_) => continue,
            Err(e) if is_timeout(&e) => panic!("connection not closed after the close handshake"),
            Err(_) => return,
        }
    }
    panic!("connection not closed after the close handshake");
}

/// Publishes a marker to everyone and asserts it is the next message each of `clients` sees: none of them
/// received anything in between.
pub fn assert_next_is_marker<S: Read + Write>(
    server: &Server,
    clients: &mut [&mut WebSocket<S>],
    marker: &str,
) {
    server.publish("/publish/all", marker);
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(
            recv_text(ws),
            marker,
            "client #{i} received something before the marker"
        );
    }
}

/// Sends a clean close and waits for the connection to end.
pub fn close_ws<S: Read + Write>(mut ws: WebSocket<S>) {
    let _ = ws.close(None);
    let deadline = Instant::now() + IO_TIMEOUT;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(_) => continue,
            Err(_) => return,
        }
    }
}

// ---- raw TCP helpers -----------------------------------------------------------------------------------

/// A hand-written upgrade request for `/ws?query` with the usual headers and `extra` header lines
/// (each without CRLF).
/// Now as Unix milliseconds, to compare with times the server reports.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

pub fn upgrade_request(query: &str, extra: &[&str]) -> String {
    let target = if query.is_empty() {
        "/ws".to_string()
    } else {
        format!("/ws?{query}")
    };
    let mut head = format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

/// Performs an upgrade on `stream` and reads exactly the response head, which must be 101.
pub fn upgrade_on(stream: &mut TcpStream, query: &str) {
    stream
        .write_all(upgrade_request(query, &[]).as_bytes())
        .expect("writing upgrade");
    let head = read_head(stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "upgrade refused: {head}");
}

/// Reads an HTTP response head byte by byte, so nothing after it is consumed.
pub fn read_head(stream: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => panic!(
                "EOF inside response head: {:?}",
                String::from_utf8_lossy(&head)
            ),
            Ok(_) => head.push(byte[0]),
            Err(e) => panic!("reading response head: {e}"),
        }
    }
    String::from_utf8(head).expect("utf-8 head")
}

/// Reads until EOF; a reset or timeout after some bytes ends the read too (a reset can overtake the
/// tail of a response the peer wrote before closing).
pub fn read_to_close(stream: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if !out.is_empty() => {
                eprintln!("read ended with {e} after {} bytes", out.len());
                return out;
            }
            Err(e) => panic!("reading response: {e}"),
        }
    }
}

/// How a raw connection ended when read until it did.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Orderly EOF.
    Eof,
    /// Connection reset.
    Reset,
    /// Still open when the read timed out.
    TimedOut,
}

/// Reads and discards until the connection ends or a read times out.
pub fn wait_end(stream: &mut TcpStream) -> End {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return End::Eof,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return End::TimedOut
            }
            Err(_) => return End::Reset,
        }
    }
}

/// Status code from the start of an HTTP response; 0 if there is none.
pub fn status_of(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// One server frame read from a raw stream: `(fin, opcode, payload)`; `Ok(None)` on EOF at a frame
/// boundary. Server frames are never masked (RFC 6455 §5.1).
pub fn read_frame(stream: &mut impl Read) -> io::Result<Option<(bool, u8, Vec<u8>)>> {
    let mut first = [0u8; 2];
    match stream.read(&mut first[..1])? {
        0 => return Ok(None),
        _ => stream.read_exact(&mut first[1..])?,
    }
    let fin = first[0] & 0x80 != 0;
    let opcode = first[0] & 0x0f;
    assert_eq!(first[1] & 0x80, 0, "server frame is masked");
    let len = match first[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext)?;
            u64::from(u16::from_be_bytes(ext))
        }
        127 => {
            let mut ext = [0u8; 8];
            stream.read_exact(&mut ext)?;
            u64::from_be_bytes(ext)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).expect("frame length fits usize")];
    stream.read_exact(&mut payload)?;
    Ok(Some((fin, opcode, payload)))
}

/// Writes one masked client frame with FIN set (RFC 6455 §5.2, §5.3).
pub fn write_frame(stream: &mut impl Write, opcode: u8, payload: &[u8]) -> io::Result<()> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&frame)
}

// ---- admin client --------------------------------------------------------------------------------------

/// An admin HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body (Content-Length bytes).
    pub body: Vec<u8>,
}

impl Response {
    /// First value of a header, name compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// A keep-alive HTTP/1.1 connection to the admin API.
pub struct Admin {
    stream: TcpStream,
    host: String,
    /// Bytes read beyond the last response (pipelined answers).
    buf: Vec<u8>,
}

impl Admin {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> Admin {
        let stream = TcpStream::connect(addr).expect("connecting to admin");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let _ = stream.set_nodelay(true);
        Admin {
            stream,
            host: addr.to_string(),
            buf: Vec::new(),
        }
    }

    /// The bytes of one request (with Host and Content-Length) for this connection.
    pub fn encode(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Vec<u8> {
        let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }

    /// Writes raw bytes (e.g. several pipelined requests).
    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("writing to admin");
    }

    /// Sends one request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Response {
        let bytes = self.encode(method, path, body, headers);
        self.write_raw(&bytes);
        self.read_response()
    }

    /// Reads the next response (not for HEAD requests: the body length is taken from Content-Length).
    pub fn read_response(&mut self) -> Response {
        self.read_response_inner(true)
    }

    /// Reads the next response to a HEAD request: its head only, whatever Content-Length says.
    pub fn read_head_only_response(&mut self) -> Response {
        self.read_response_inner(false)
    }

    fn read_response_inner(&mut self, with_body: bool) -> Response {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill();
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("utf-8 response head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_of(status_line);
        assert_ne!(status, 0, "bad status line {status_line:?}");
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header line has a colon");
                (n.trim().to_string(), v.trim().to_string())
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().expect("numeric Content-Length"))
            .unwrap_or(0);
        let length = if with_body { length } else { 0 };
        while self.buf.len() < head_end + length {
            self.fill();
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        self.buf.drain(..head_end + length);
        Response {
            status,
            headers,
            body,
        }
    }

    /// Half-closes the connection: no more requests will follow.
    pub fn shutdown_write(&mut self) {
        self.stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown(Write)");
    }

    /// Whether the server closed this connection (reads EOF within the I/O timeout).
    pub fn is_closed_by_server(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!(
                "admin connection closed mid-response; have {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading admin response: {e}"),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---- metrics -------------------------------------------------------------------------------------------

/// Sum of the samples of `name` in Prometheus text whose labels include every pair of `labels`.
/// Panics if the text has no sample named `name`, so a renamed metric fails loudly.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut seen = false;
    let mut sum = 0u64;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        seen = true;
        let pairs: Vec<(&str, &str)> = label_text
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels.iter().all(|want| pairs.contains(want)) {
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad sample {line:?}"));
            sum += v as u64;
        }
    }
    assert!(seen, "metric {name} not found in:\n{text}");
    sum
}

/// Resident set size of a process in bytes (VmRSS in /proc/PID/status).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

// ---- processes ---------------------------------------------------------------------------------------------

/// Sends `signal` to `pid`.
pub fn signal_pid(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Whether a process with `pid` exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses; Z is a zombie (exited, not yet reaped).
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

// ---- waiting -------------------------------------------------------------------------------------------

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A raw client socket with a tiny receive buffer and a mobile network's segment size (1460 B), both set
/// before connect so the advertised window and MSS are small from the start: the server's writes to it block
/// soon (slow-consumer tests). Without the MSS, loopback's 64 KiB segments let the server's kernel take
/// megabytes before a write blocks.
pub fn tiny_window_stream(server: &Server) -> TcpStream {
    slow_reader_to(server.client_addr, 4096)
}

/// [`tiny_window_stream`] to the wss:// listener.
pub fn tiny_window_tls_stream(server: &Server) -> TcpStream {
    slow_reader_to(server.tls_addr(), 4096)
}

/// A raw client socket as a slow mobile reader has: `SO_RCVBUF` of `receive_buffer` bytes and `TCP_MAXSEG`
/// 1460, set before connect.
pub fn slow_reader_to(addr: SocketAddr, receive_buffer: usize) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(receive_buffer).unwrap();
    socket.set_mss(1460).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

// ---- wss://: a test PKI, the server with [tls] on, and TLS clients -------------------------------------

/// A throwaway certificate authority (rcgen, ECDSA P-256) that issues server certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A server certificate issued by a [`TestCa`] for `localhost` and `127.0.0.1`, as PEM, with what clients
/// recognise it by.
pub struct Leaf {
    /// The certificate, then the CA's: the chain a server sends.
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate, DER: what a client sees as the peer's first certificate.
    pub der: Vec<u8>,
    /// Base64 of the SHA-256 of its SubjectPublicKeyInfo, as Chromium's
    /// `--ignore-certificate-errors-spki-list` takes it.
    pub spki_sha256: String,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// A new CA with a new key.
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "densepush test CA");
        let cert = params.self_signed(&key).expect("self-signing the CA");
        TestCa { cert, key }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA certificate, DER.
    pub fn der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    /// Issues a server certificate with a new key for `localhost` and 127.0.0.1, named `common_name`, valid
    /// for `days` days from yesterday (negative: it expired that many days ago).
    pub fn issue(&self, common_name: &str, days: i64) -> Leaf {
        use base64::Engine as _;
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let now = time::OffsetDateTime::now_utc();
        if days >= 0 {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(days);
        } else {
            params.not_before = now + time::Duration::days(days * 2);
            params.not_after = now + time::Duration::days(days);
        }
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signing the server certificate");
        let spki = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der());
        Leaf {
            chain_pem: cert.pem() + &self.cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            spki_sha256: base64::engine::general_purpose::STANDARD.encode(spki.as_ref()),
        }
    }
}

impl Leaf {
    /// Writes the chain and the key as PEM files.
    pub fn write(&self, cert_file: &Path, key_file: &Path) {
        std::fs::write(cert_file, &self.chain_pem).expect("writing the certificate");
        std::fs::write(key_file, &self.key_pem).expect("writing the key");
    }
}

/// A CA and a server certificate written as PEM files (`server.crt`, `server.key`, `ca.crt`) in a
/// temporary directory of their own, so a server restarted with them keeps its identity.
pub struct TestPki {
    /// The CA that issued `leaf` (and can issue a renewal).
    pub ca: TestCa,
    /// The CA certificate, PEM: what clients trust.
    pub ca_file: PathBuf,
    /// `tls.cert_file`: the leaf then the CA.
    pub cert_file: PathBuf,
    /// `tls.key_file`.
    pub key_file: PathBuf,
    /// The pair first written to `cert_file` and `key_file`.
    pub leaf: Leaf,
    dir: tempfile::TempDir,
}

impl TestPki {
    /// A new CA and a server certificate for `localhost`/127.0.0.1 valid for `days` days, written out.
    pub fn new(days: i64) -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new();
        let leaf = ca.issue("densepush test server", days);
        let ca_file = dir.path().join("ca.crt");
        let cert_file = dir.path().join("server.crt");
        let key_file = dir.path().join("server.key");
        std::fs::write(&ca_file, ca.pem()).expect("writing the CA");
        leaf.write(&cert_file, &key_file);
        TestPki {
            ca,
            ca_file,
            cert_file,
            key_file,
            leaf,
            dir,
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A new rustls client configuration (ring, TLS 1.2 and 1.3 offered, ALPN `http/1.1`) trusting only the
    /// test CA, with an empty session cache of its own: its first connection makes a full handshake.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::new(self.client_config_value())
    }

    /// [`TestPki::client_config`] that lets the handshake's traffic secrets be extracted (to seal records
    /// by hand).
    pub fn extractable_client_config(&self) -> Arc<ClientConfig> {
        let mut config = self.client_config_value();
        config.enable_secret_extraction = true;
        Arc::new(config)
    }

    fn client_config_value(&self) -> ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(self.ca.der()))
            .expect("adding the test CA");
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }
}

/// A tungstenite client over TLS (rustls) over TCP.
pub type Wss = WebSocket<rustls::StreamOwned<ClientConnection, TcpStream>>;

impl Server {
    /// Starts a server with `[tls]` on (`tls.listen` on an ephemeral loopback port) with a new test PKI (30
    /// days), plus `overrides`.
    pub fn start_tls(overrides: &[(&str, &str)]) -> Server {
        Server::start_tls_with(Arc::new(TestPki::new(30)), overrides)
    }

    /// [`Server::start_tls`] with this PKI (e.g. the one of a server being restarted). `overrides` may set
    /// `tls.listen` (a fixed port) or turn ws:// off (`server.listen = ""`).
    pub fn start_tls_with(pki: Arc<TestPki>, overrides: &[(&str, &str)]) -> Server {
        let cert = pki.cert_file.to_str().expect("utf-8 path").to_string();
        let key = pki.key_file.to_str().expect("utf-8 path").to_string();
        let mut all: Vec<(&str, &str)> = vec![
            ("tls.listen", "127.0.0.1:0"),
            ("tls.cert_file", &cert),
            ("tls.key_file", &key),
        ];
        all.extend_from_slice(overrides);
        let mut server = Server::start(&all);
        assert!(
            server.tls_addr.is_some(),
            "no tls= address in {:?}",
            server.listening
        );
        server.tls_client = Some(pki.client_config());
        server.pki = Some(pki);
        server
    }

    /// The PKI of a server started with [`Server::start_tls`].
    pub fn pki(&self) -> &Arc<TestPki> {
        self.pki.as_ref().expect("a server started with start_tls")
    }

    /// The wss:// listener's address.
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_addr.expect("a server with [tls] on")
    }

    /// `wss://localhost:PORT/ws?query` (no leading `?`; none at all when `query` is empty).
    pub fn wss_url(&self, query: &str) -> String {
        let port = self.tls_addr().port();
        if query.is_empty() {
            format!("wss://localhost:{port}/ws")
        } else {
            format!("wss://localhost:{port}/ws?{query}")
        }
    }

    /// Connects a wss:// client with this query; the TLS client configuration is shared by every connection
    /// this method makes, so they resume the first one's session. Panics if the upgrade fails.
    pub fn connect_wss(&self, query: &str) -> Wss {
        let config = self
            .tls_client
            .clone()
            .expect("a server started with start_tls");
        self.try_connect_wss_with(config, query)
            .unwrap_or_else(|e| panic!("connect wss ?{query}: {e}"))
    }

    /// Connects a wss:// client with this query and TLS client configuration.
    pub fn try_connect_wss_with(
        &self,
        config: Arc<ClientConfig>,
        query: &str,
    ) -> Result<Wss, tungstenite::Error> {
        let stream = TcpStream::connect(self.tls_addr())?;
        self.wss_over(config, stream, query)
    }

    /// Runs the TLS handshake and the upgrade on an already connected TCP stream to the wss:// listener
    /// (e.g. one with a tiny receive window).
    pub fn wss_over(
        &self,
        config: Arc<ClientConfig>,
        stream: TcpStream,
        query: &str,
    ) -> Result<Wss, tungstenite::Error> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let conn = ClientConnection::new(config, localhost())
            .map_err(|e| tungstenite::Error::Io(io::Error::other(e)))?;
        let tls = rustls::StreamOwned::new(conn, stream);
        let request = self.wss_url(query).into_client_request()?;
        match tungstenite::client(request, tls) {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
            Err(tungstenite::HandshakeError::Interrupted(_)) => Err(tungstenite::Error::Io(
                io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"),
            )),
        }
    }

    /// A plain TCP connection to the wss:// listener, with read and write timeouts and no Nagle delay.
    pub fn tls_raw(&self) -> TcpStream {
        let stream = TcpStream::connect(self.tls_addr()).expect("connect to the TLS listener");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    /// A TLS connection driven by hand ([`RawTls`]) whose handshake is done, with a fresh client
    /// configuration (a full handshake).
    pub fn tls_handshake(&self) -> RawTls {
        self.tls_handshake_with(self.pki().client_config())
    }

    /// [`Server::tls_handshake`] with this client configuration.
    pub fn tls_handshake_with(&self, config: Arc<ClientConfig>) -> RawTls {
        let mut tls = RawTls::new(config, self.tls_raw());
        tls.handshake();
        tls
    }

    /// The value of a `densepush_tls_failures_total` reason.
    pub fn tls_failures(&self, reason: &str) -> u64 {
        self.metric("densepush_tls_failures_total", &[("reason", reason)])
    }
}

/// The server name every TLS client here asks for (the certificate also names 127.0.0.1).
pub fn localhost() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("localhost").expect("a DNS name")
}

/// How a TLS connection read to its end ended, from the client's side.
#[derive(Debug, PartialEq)]
pub enum TlsEnd {
    /// The server sent `close_notify` (RFC 8446 §6.1).
    CloseNotify,
    /// The server sent this fatal alert.
    Alert(rustls::AlertDescription),
    /// TCP ended (EOF or reset) without any alert.
    Closed,
    /// Still open when a read timed out.
    TimedOut,
    /// The client refused what the server sent.
    Error(rustls::Error),
}

/// A rustls client connection driven by hand over a `TcpStream` (`write_tls`/`read_tls`), so a test can put
/// any bytes on the wire between the records rustls makes.
pub struct RawTls {
    /// The client's TLS state.
    pub conn: ClientConnection,
    /// The socket.
    pub sock: TcpStream,
}

impl RawTls {
    /// A client for `localhost` on `sock`; nothing is sent yet.
    pub fn new(config: Arc<ClientConfig>, sock: TcpStream) -> RawTls {
        let conn = ClientConnection::new(config, localhost()).expect("client connection");
        RawTls { conn, sock }
    }

    /// Runs the handshake to its end; panics if it fails.
    pub fn handshake(&mut self) {
        while self.conn.is_handshaking() {
            self.conn
                .complete_io(&mut self.sock)
                .expect("TLS handshake");
        }
        self.flush();
    }

    /// Writes every record rustls has queued.
    pub fn flush(&mut self) {
        while self.conn.wants_write() {
            self.conn
                .write_tls(&mut self.sock)
                .expect("writing records");
        }
    }

    /// Encrypts `plain` as application data and sends it.
    pub fn send(&mut self, plain: &[u8]) {
        self.conn
            .writer()
            .write_all(plain)
            .expect("buffering plaintext");
        self.flush();
    }

    /// Puts raw bytes on the wire, outside rustls.
    pub fn inject(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).expect("writing raw bytes");
    }

    /// Sends an upgrade request for `/ws?query` and reads exactly the response head, which must be 101.
    pub fn upgrade(&mut self, query: &str) {
        self.send(upgrade_request(query, &[]).as_bytes());
        let head = read_head(self);
        assert!(head.starts_with("HTTP/1.1 101 "), "upgrade refused: {head}");
    }

    /// Reads until the connection ends or a read times out; returns how it ended and the plaintext that
    /// arrived before.
    pub fn read_to_end(&mut self) -> (TlsEnd, Vec<u8>) {
        let mut plain = Vec::new();
        loop {
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => return (TlsEnd::Closed, plain),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return (TlsEnd::TimedOut, plain)
                }
                Err(_) => return (TlsEnd::Closed, plain),
            }
            let state = match self.conn.process_new_packets() {
                Ok(state) => state,
                Err(rustls::Error::AlertReceived(alert)) => return (TlsEnd::Alert(alert), plain),
                Err(e) => return (TlsEnd::Error(e), plain),
            };
            let _ = self.conn.reader().read_to_end(&mut plain);
            if state.peer_has_closed() {
                return (TlsEnd::CloseNotify, plain);
            }
        }
    }
}

/// Reads plaintext (for [`read_head`] and [`read_frame`]).
impl Read for RawTls {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        rustls::Stream::new(&mut self.conn, &mut self.sock).read(buf)
    }
}

/// Writes plaintext.
impl Write for RawTls {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        rustls::Stream::new(&mut self.conn, &mut self.sock).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        rustls::Stream::new(&mut self.conn, &mut self.sock).flush()
    }
}

/// The bytes of a TLS ClientHello for `localhost` as rustls makes it with `config`.
pub fn client_hello(config: Arc<ClientConfig>) -> Vec<u8> {
    let mut conn = ClientConnection::new(config, localhost()).expect("client connection");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello)
            .expect("encoding the ClientHello");
    }
    hello
}

/// One direction's TLS 1.3 traffic keys taken from rustls after a handshake, to seal records by hand
/// (RFC 8446 §5.2-5.3) as a misbehaving client would.
pub struct Sealer {
    key: ring::aead::LessSafeKey,
    iv: [u8; ring::aead::NONCE_LEN],
    seq: u64,
}

impl Sealer {
    /// The client's sending keys of a connection whose handshake is done; the connection is consumed
    /// (rustls hands its secrets over only once). Needs [`TestPki::extractable_client_config`].
    pub fn from_client(conn: ClientConnection) -> Sealer {
        use rustls::ConnectionTrafficSecrets as S;
        let secrets = conn
            .dangerous_extract_secrets()
            .expect("extracting the traffic secrets");
        let (seq, secrets) = secrets.tx;
        let (algorithm, key, iv) = match &secrets {
            S::Aes128Gcm { key, iv } => (&ring::aead::AES_128_GCM, key, iv),
            S::Aes256Gcm { key, iv } => (&ring::aead::AES_256_GCM, key, iv),
            S::Chacha20Poly1305 { key, iv } => (&ring::aead::CHACHA20_POLY1305, key, iv),
            _ => panic!("unexpected cipher suite"),
        };
        let key = ring::aead::UnboundKey::new(algorithm, key.as_ref()).expect("AEAD key");
        Sealer {
            key: ring::aead::LessSafeKey::new(key),
            iv: iv.as_ref().try_into().expect("a 12-byte IV"),
            seq,
        }
    }

    /// A protected record (outer type application_data) carrying `payload` of the inner `content_type`.
    pub fn seal(&mut self, content_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        let mut body = payload.to_vec();
        body.push(content_type);
        let len =
            u16::try_from(body.len() + ring::aead::AES_128_GCM.tag_len()).expect("record size");
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        self.key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(header),
                &mut body,
            )
            .expect("sealing");
        let mut record = header.to_vec();
        record.extend_from_slice(&body);
        record
    }
}

// ---- real clients in child processes ------------------------------------------------------------------------

/// What to run once when a client tool is missing.
pub const TOOLS_HINT: &str =
    "run scripts/test.sh once: it installs the Python and Node test clients";

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A Python that can `import module`: the virtualenv scripts/test.sh creates, else `python3` if it can.
pub fn python_with(module: &str) -> PathBuf {
    let candidates = [
        repo().join("target/pyenv/bin/python"),
        PathBuf::from("python3"),
    ];
    for python in &candidates {
        let ok = Command::new(python)
            .args(["-c", &format!("import {module}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return python.clone();
        }
    }
    panic!("no Python that imports {module} (tried {candidates:?}); {TOOLS_HINT}");
}

/// tests/js, with its node_modules installed.
pub fn js_dir() -> PathBuf {
    let dir = repo().join("tests/js");
    for module in ["ws", "playwright-core"] {
        assert!(
            dir.join("node_modules").join(module).is_dir(),
            "tests/js/node_modules/{module} is missing; {TOOLS_HINT}"
        );
    }
    dir
}
