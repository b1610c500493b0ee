//! Interoperability with the clients people really use, against the real server, over ws:// and wss://:
//! Python `websockets` (tests/clients/ws_client.py), Node `ws` (tests/js/ws_client.mjs), headless Chromium
//! running examples/browser.html (driven by tests/js/browser.mjs through playwright-core), the JavaScript
//! client of clients/js in Node (tests/js/densepush_client.mjs), `openssl s_client`, and the README's own
//! quick-start command lines (curl and the `websockets` interactive client).
//!
//! The clients print one JSON line per event (open, message, ping, close); these tests start the server,
//! start the clients, publish and kick through the admin API, and assert what each client saw. Over wss://
//! the server has a certificate from a CA the test makes (tests/common's `TestPki`) and no ws:// listener,
//! so a client that got through did TLS; each client trusts the test CA its own way (`--ca`,
//! `NODE_EXTRA_CA_CERTS`, `-CAfile`, Chromium's `--ignore-certificate-errors-spki-list`).
//!
//! The tools come from `scripts/test.sh`, which installs them on a fresh machine: a virtualenv with
//! `websockets` in target/pyenv, `ws` and `playwright-core` in tests/js/node_modules, the Debian `chromium`
//! and `openssl` packages. A missing tool fails the test with that hint rather than skipping it.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a client may take to report the next event (Chromium's first start is the slowest).
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
const HINT: &str = "run scripts/test.sh once: it installs the interop test tools";

/// A Python that has `websockets`.
fn python() -> PathBuf {
    python_with("websockets.sync.client")
}

/// A jwt-mode server (as shipped), with a known secret and these overrides.
fn jwt_server(overrides: &[(&str, &str)]) -> Server {
    let mut all = vec![("auth.mode", "jwt"), ("auth.jwt_secret", TEST_SECRET)];
    all.extend_from_slice(overrides);
    Server::start(&all)
}

/// A jwt-mode server with wss:// on (a new test PKI) and ws:// off, with these overrides.
fn jwt_tls_server(overrides: &[(&str, &str)]) -> Server {
    jwt_tls_server_with(Arc::new(TestPki::new(30)), overrides)
}

/// [`jwt_tls_server`] with this PKI (a server restarted with the same certificate).
fn jwt_tls_server_with(pki: Arc<TestPki>, overrides: &[(&str, &str)]) -> Server {
    let mut all = vec![
        ("auth.mode", "jwt"),
        ("auth.jwt_secret", TEST_SECRET),
        ("server.listen", ""),
    ];
    all.extend_from_slice(overrides);
    Server::start_tls_with(pki, &all)
}

/// The token the README mints: user 42 on client "phone", subscribed to "news".
fn phone_token(server: &Server) -> String {
    server.token(&["--user", "42", "--client", "phone", "--channels", "news"])
}

// ---- client processes ------------------------------------------------------------------------------------

/// A client process that prints one JSON event per line on stdout. Dropping it kills it, except the browser
/// driver: that one gets its stdin closed, closes Chromium and exits (and is killed only if it does not).
struct Client {
    name: String,
    graceful: bool,
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<Value>,
    seen: Vec<Value>,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Client {
    fn spawn(name: &str, mut command: Command) -> Client {
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr_path = dir.path().join("stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}; {HINT}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, events) = mpsc::channel();
        let label = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(value) => {
                        if tx.send(value).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("{label}: non-JSON output {line:?}"),
                }
            }
        });
        Client {
            name: name.to_string(),
            graceful: false,
            stdin: child.stdin.take(),
            child,
            events,
            seen: Vec::new(),
            stderr_path,
            _dir: dir,
        }
    }

    /// The Python `websockets` client; `ca`: the only CA it trusts for wss://.
    fn python(url: &str, bearer: Option<&str>, ca: Option<&Path>) -> Client {
        let mut command = Command::new(python());
        command
            .arg(repo().join("tests/clients/ws_client.py"))
            .arg(url);
        if let Some(token) = bearer {
            command.args(["--bearer", token]);
        }
        if let Some(ca) = ca {
            command.arg("--ca").arg(ca);
        }
        Client::spawn("python websockets", command)
    }

    /// The Node `ws` client; `ca`: the only CA it trusts for wss://.
    fn node(url: &str, bearer: Option<&str>, ca: Option<&Path>) -> Client {
        let mut command = Command::new("node");
        command.current_dir(js_dir()).arg("ws_client.mjs").arg(url);
        if let Some(token) = bearer {
            command.args(["--bearer", token]);
        }
        if let Some(ca) = ca {
            command.arg("--ca").arg(ca);
        }
        Client::spawn("node ws", command)
    }

    /// The JavaScript client of clients/js in Node with `ws`, behind a gate the test opens and shuts
    /// ([`Client::send_line`] "refuse" / "allow"), trusting `ca` too (`NODE_EXTRA_CA_CERTS`).
    fn js(url: &str, token: &str, ca: &Path) -> Client {
        let mut command = Command::new("node");
        command
            .current_dir(js_dir())
            .args(["densepush_client.mjs", url, token])
            .env("NODE_EXTRA_CA_CERTS", ca)
            // clients/js/test/harness.mjs (the gate) insists on knowing the binary under test.
            .env("DP_TEST_BIN", bin());
        Client::spawn("densepush js client", command)
    }

    /// Headless Chromium on `page_url`.
    fn browser(page_url: &str) -> Client {
        Client::browser_with_flags(page_url, &[])
    }

    /// Headless Chromium on `page_url`, started with these extra flags.
    fn browser_with_flags(page_url: &str, flags: &[&str]) -> Client {
        assert!(
            Path::new("/usr/bin/chromium").exists(),
            "/usr/bin/chromium is missing; {HINT}"
        );
        let mut command = Command::new("node");
        command
            .current_dir(js_dir())
            .args(["browser.mjs", page_url, "90"])
            .args(flags);
        let mut client = Client::spawn("chromium", command);
        client.graceful = true;
        client.expect("driver-ready");
        client
    }

    /// Writes one line to the client's stdin.
    fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the client's stdin is open");
        writeln!(stdin, "{line}").expect("writing to the client");
        stdin.flush().expect("flushing the client's stdin");
    }

    fn failure(&self, what: &str) -> String {
        format!(
            "{}: {what}; events so far: {:?}; stderr:\n{}",
            self.name,
            self.seen,
            std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
        )
    }

    /// The next event other than a keepalive ping, within `timeout`; `None` if there is none.
    fn next_within(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.events.recv_timeout(left).ok()?;
            self.seen.push(event.clone());
            if event["event"] != "ping" {
                return Some(event);
            }
        }
    }

    /// The next event other than a ping; panics if none comes in time.
    fn next(&mut self) -> Value {
        match self.next_within(EVENT_TIMEOUT) {
            Some(event) => event,
            None => panic!("{}", self.failure("no event in time")),
        }
    }

    /// The next event, which must be of kind `kind`.
    fn expect(&mut self, kind: &str) -> Value {
        let event = self.next();
        if event["event"] != kind {
            panic!(
                "{}",
                self.failure(&format!("expected {kind:?}, got {event}"))
            );
        }
        event
    }

    /// The next event, which must be this text message.
    fn expect_text(&mut self, text: &str) {
        let event = self.expect("message");
        assert_eq!(
            event,
            json!({"event": "message", "type": "text", "data": text}),
            "{}",
            self.failure("wrong message")
        );
    }

    /// The next event, which must be this binary message.
    fn expect_binary(&mut self, bytes: &[u8]) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let event = self.expect("message");
        assert_eq!(
            event,
            json!({"event": "message", "type": "binary", "hex": hex}),
            "{}",
            self.failure("wrong message")
        );
    }

    /// The next event, which must be a close with this code; returns the event.
    fn expect_close(&mut self, code: u16) -> Value {
        let event = self.expect("close");
        assert_eq!(event["code"], code, "{}", self.failure("wrong close code"));
        event
    }

    /// Pings seen so far (only the Node client reports them).
    fn pings_seen(&self) -> usize {
        self.seen.iter().filter(|e| e["event"] == "ping").count()
    }

    /// Waits for the process to exit by itself and returns whether it succeeded.
    fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{}", self.failure("did not exit"));
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let grace = if self.graceful { 10_000 } else { 0 };
        let deadline = Instant::now() + Duration::from_millis(grace);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which library a shared scenario runs with.
#[derive(Clone, Copy, Debug)]
enum Lib {
    Python,
    Node,
}

/// Which scheme a shared scenario runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    /// ws:// to the server's plaintext listener.
    Ws,
    /// wss:// to a server with only its TLS listener on, trusting the test CA.
    Wss,
}

impl Scheme {
    /// A jwt-mode server for this scheme, with these overrides.
    fn server(self, overrides: &[(&str, &str)]) -> Server {
        match self {
            Scheme::Ws => jwt_server(overrides),
            Scheme::Wss => jwt_tls_server(overrides),
        }
    }
}

impl Lib {
    fn connect(self, server: &Server, scheme: Scheme, token: &str, bearer: bool) -> Client {
        let query = if bearer {
            String::new()
        } else {
            format!("token={token}")
        };
        let (url, ca) = match scheme {
            Scheme::Ws => (server.ws_url(&query), None),
            Scheme::Wss => (server.wss_url(&query), Some(server.pki().ca_file.as_path())),
        };
        let header = bearer.then_some(token);
        let mut client = match self {
            Lib::Python => Client::python(&url, header, ca),
            Lib::Node => Client::node(&url, header, ca),
        };
        client.expect("open");
        client
    }
}

// ---- scenarios shared by the Python and Node clients -------------------------------------------------------

/// Each publish kind reaches the client, in order, text and binary; publishes for others do not.
fn receives_every_publish_kind(lib: Lib, scheme: Scheme) {
    let server = scheme.server(&[]);
    let token = phone_token(&server);
    // One client presents the token as a bearer header, the other in the query: both must work.
    let mut bearer = lib.connect(&server, scheme, &token, true);
    let mut query = lib.connect(&server, scheme, &token, false);
    server.publish("/publish/user/42", "to user 42");
    server.publish("/publish/user/42/client/tablet", "to another device");
    server.publish("/publish/user/43", "to another user");
    server.publish("/publish/user/42/client/phone", "to the phone");
    server.publish("/publish/channel/sports", "to another channel");
    server.publish("/publish/channel/news", "breaking news");
    let blob: Vec<u8> = (0u8..=255).chain([0, 0xff, 0x80]).collect();
    let response = server.request(
        "POST",
        "/publish/user/42",
        &blob,
        &[("Content-Type", "application/octet-stream")],
    );
    assert_eq!(response.status, 202, "{}", response.text());
    server.publish("/publish/all", "to everyone ✓");
    for client in [&mut bearer, &mut query] {
        client.expect_text("to user 42");
        client.expect_text("to the phone");
        client.expect_text("breaking news");
        client.expect_binary(&blob);
        client.expect_text("to everyone ✓");
    }
}

/// With a 400 ms ping interval the client answers every ping and stays connected for several intervals.
fn answers_pings_across_several_intervals(lib: Lib) {
    let server = jwt_server(&[
        ("websocket.ping_interval_ms", "400"),
        ("websocket.pong_timeout_ms", "350"),
        ("websocket.timer_tick_ms", "10"),
    ]);
    let mut client = lib.connect(&server, Scheme::Ws, &phone_token(&server), false);
    // Nothing but pings for five and a half intervals: a client that missed one pong would be cut.
    assert_eq!(client.next_within(Duration::from_millis(2200)), None);
    assert!(
        server.metric("densepush_pings_sent_total", &[]) >= 4,
        "too few pings sent"
    );
    assert!(
        server.metric("densepush_pongs_received_total", &[]) >= 4,
        "{}",
        client.failure("the client did not answer the pings")
    );
    assert_eq!(server.metric("densepush_pong_timeouts_total", &[]), 0);
    if matches!(lib, Lib::Node) {
        assert!(client.pings_seen() >= 4, "{}", client.failure("pings"));
    }
    server.publish("/publish/user/42", "still connected");
    client.expect_text("still connected");
}

/// A client-initiated close gets its code echoed (RFC 6455 §5.5.1) and the client exits cleanly.
fn client_close_is_echoed(lib: Lib) {
    let server = jwt_server(&[]);
    for code in [1000u16, 4321] {
        let mut client = lib.connect(&server, Scheme::Ws, &phone_token(&server), false);
        let order = format!("please-close:{code}");
        server.publish("/publish/user/42", &order);
        client.expect_text(&order);
        let close = client.expect_close(code);
        assert_eq!(close["by"], "client", "{close}");
        assert!(client.wait_exit(), "{}", client.failure("exit status"));
    }
    assert!(wait_until(Duration::from_secs(2), || {
        server.metric("densepush_client_closes_total", &[]) == 2
            && server.metric("densepush_connections_open", &[]) == 0
    }));
}

/// Kicks: 4000 "disconnected by server" by default, the requested code and reason otherwise.
fn kicked_client_sees_the_close_code(lib: Lib, scheme: Scheme) {
    let server = scheme.server(&[]);
    let mut plain = lib.connect(&server, scheme, &phone_token(&server), false);
    let other = server.token(&["--user", "7", "--client", "laptop"]);
    let mut custom = lib.connect(&server, scheme, &other, true);
    let response = server.request("DELETE", "/connections/user/42", b"", &[]);
    assert_eq!(response.json(), json!({"closed": 1, "code": 4000}));
    let close = plain.expect_close(4000);
    assert_eq!(close["reason"], "disconnected by server");
    assert_eq!(close["by"], "server");
    let response = server.request(
        "DELETE",
        "/connections/user/7/client/laptop?code=4001&reason=token+revoked",
        b"",
        &[],
    );
    assert_eq!(response.json(), json!({"closed": 1, "code": 4001}));
    let close = custom.expect_close(4001);
    assert_eq!(close["reason"], "token revoked");
    assert!(plain.wait_exit() && custom.wait_exit());
}

/// SIGTERM: the client gets what was published before, then 1001, and the server exits 0.
fn server_shutdown_is_1001(lib: Lib, scheme: Scheme) {
    let mut server = scheme.server(&[]);
    let mut client = lib.connect(&server, scheme, &phone_token(&server), false);
    server.publish("/publish/all", "last words");
    server.sigterm();
    client.expect_text("last words");
    let close = client.expect_close(1001);
    assert_eq!(close["by"], "server");
    assert!(client.wait_exit());
    let status = server.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "server exit {status:?}");
}

/// With `websocket.compression` on the library negotiates permessage-deflate (its default offer) and receives
/// every publish kind compressed, each message compressed once however many clients receive it; a client that
/// reconnects with `since` gets the replay from history, compressed too.
fn compressed_client_receives_every_publish_kind_and_replays(lib: Lib) {
    let server = jwt_server(&[
        ("websocket.compression", "true"),
        ("websocket.compression_min_bytes", "0"),
        ("history.user", "true"),
        ("history.channel", "true"),
        ("history.all", "true"),
    ]);
    let token = phone_token(&server);
    let mut bearer = lib.connect(&server, Scheme::Ws, &token, true);
    let mut query = lib.connect(&server, Scheme::Ws, &token, false);
    for client in [&bearer, &query] {
        let open = &client.seen[0];
        let extensions = open["extensions"].as_str().unwrap_or_default();
        assert!(
            extensions.starts_with("permessage-deflate"),
            "{}",
            client.failure("permessage-deflate not negotiated")
        );
    }
    assert_eq!(server.metric("densepush_connections_deflate", &[]), 2);
    let before = server.metric("densepush_deflate_compressions_total", &[]);
    let long = format!(
        "{{\"kind\":\"notification\",\"body\":\"{}\"}}",
        "compress me ".repeat(40)
    );
    let first = server.post("/publish/user/42", &long);
    assert_eq!(first.status, 202, "{}", first.text());
    let history = server.request("GET", "/history/user:42", b"", &[]).json();
    let epoch = history["epoch"]
        .as_str()
        .expect("user history is on")
        .to_owned();
    server.publish("/publish/user/42/client/phone", "to the phone");
    server.publish("/publish/channel/news", "breaking news");
    let blob: Vec<u8> = (0u8..=255).chain([0, 0xff, 0x80]).collect();
    let response = server.request(
        "POST",
        "/publish/user/42",
        &blob,
        &[("Content-Type", "application/octet-stream")],
    );
    assert_eq!(response.status, 202, "{}", response.text());
    server.publish("/publish/all", "to everyone ✓");
    for client in [&mut bearer, &mut query] {
        client.expect_text(&long);
        client.expect_text("to the phone");
        client.expect_text("breaking news");
        client.expect_binary(&blob);
        client.expect_text("to everyone ✓");
    }
    assert_eq!(
        server.metric("densepush_deflate_compressions_total", &[]) - before,
        5,
        "each message compressed once for both clients"
    );
    // A reconnect from the start of the user stream: the replay arrives enveloped and compressed.
    let since = format!("token={token}&since=user:42@{epoch}:0");
    let mut back = match lib {
        Lib::Python => Client::python(&server.ws_url(&since), None, None),
        Lib::Node => Client::node(&server.ws_url(&since), None, None),
    };
    back.expect("open");
    for expected in [long.as_str(), "to the phone"] {
        let got = back.expect("message");
        let envelope: Value = serde_json::from_str(got["data"].as_str().unwrap()).unwrap();
        assert_eq!(envelope["d"], expected, "{got}");
        assert_eq!(envelope["s"], "user:42");
    }
    back.expect("message"); // the binary envelope
    server.publish("/publish/user/42", "live after the replay");
    let got = back.expect("message");
    assert!(
        got["data"]
            .as_str()
            .unwrap()
            .contains("live after the replay"),
        "{got}"
    );
}

#[test]
fn python_websockets_with_compression_receives_every_publish_kind_and_replays() {
    compressed_client_receives_every_publish_kind_and_replays(Lib::Python);
}

#[test]
fn node_ws_with_compression_receives_every_publish_kind_and_replays() {
    compressed_client_receives_every_publish_kind_and_replays(Lib::Node);
}

#[test]
fn python_websockets_receives_every_publish_kind() {
    receives_every_publish_kind(Lib::Python, Scheme::Ws);
}

#[test]
fn node_ws_receives_every_publish_kind() {
    receives_every_publish_kind(Lib::Node, Scheme::Ws);
}

#[test]
fn python_websockets_answers_pings_and_stays_connected() {
    answers_pings_across_several_intervals(Lib::Python);
}

#[test]
fn node_ws_answers_pings_and_stays_connected() {
    answers_pings_across_several_intervals(Lib::Node);
}

#[test]
fn python_websockets_close_is_echoed() {
    client_close_is_echoed(Lib::Python);
}

#[test]
fn node_ws_close_is_echoed() {
    client_close_is_echoed(Lib::Node);
}

#[test]
fn python_websockets_sees_kick_codes() {
    kicked_client_sees_the_close_code(Lib::Python, Scheme::Ws);
}

#[test]
fn node_ws_sees_kick_codes() {
    kicked_client_sees_the_close_code(Lib::Node, Scheme::Ws);
}

#[test]
fn python_websockets_sees_1001_on_sigterm() {
    server_shutdown_is_1001(Lib::Python, Scheme::Ws);
}

#[test]
fn node_ws_sees_1001_on_sigterm() {
    server_shutdown_is_1001(Lib::Node, Scheme::Ws);
}

#[test]
fn python_websockets_over_wss_receives_every_publish_kind() {
    receives_every_publish_kind(Lib::Python, Scheme::Wss);
}

#[test]
fn node_ws_over_wss_receives_every_publish_kind() {
    receives_every_publish_kind(Lib::Node, Scheme::Wss);
}

#[test]
fn python_websockets_over_wss_sees_kick_codes() {
    kicked_client_sees_the_close_code(Lib::Python, Scheme::Wss);
}

#[test]
fn node_ws_over_wss_sees_kick_codes() {
    kicked_client_sees_the_close_code(Lib::Node, Scheme::Wss);
}

#[test]
fn python_websockets_over_wss_sees_1001_on_sigterm() {
    server_shutdown_is_1001(Lib::Python, Scheme::Wss);
}

#[test]
fn node_ws_over_wss_sees_1001_on_sigterm() {
    server_shutdown_is_1001(Lib::Node, Scheme::Wss);
}

// ---- the browser -------------------------------------------------------------------------------------------

/// Serves examples/ over HTTP/1.1 on a loopback port, one request per connection, until the test ends.
/// Returns the origin (`http://127.0.0.1:PORT`).
fn serve_examples() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the page server");
    let origin = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || serve_one(&mut stream));
        }
    });
    origin
}

fn serve_one(stream: &mut TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let file = path
        .split('?')
        .next()
        .unwrap_or("/")
        .trim_start_matches('/');
    let body = (!file.contains("..") && !file.is_empty())
        .then(|| std::fs::read(repo().join("examples").join(file)).ok())
        .flatten();
    let response = match body {
        Some(body) => {
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(&body);
            r
        }
        None => {
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
        }
    };
    let _ = stream.write_all(&response);
}

/// The URL of examples/browser.html on `origin`, pointed at `server` with `token`.
fn page_url(origin: &str, ws_url: &str, token: &str) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    format!(
        "{origin}/browser.html?url={}&token={}",
        enc(ws_url),
        enc(token)
    )
}

/// A free loopback port (bound, then released) for a server that must be restarted on the same address.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn browser_example_receives_text_and_binary_and_reconnects_after_a_restart_with_backoff() {
    let origin = serve_examples();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let allowed = format!(r#"["{origin}"]"#);
    let overrides = [
        ("server.listen", listen.as_str()),
        ("server.allowed_origins", allowed.as_str()),
    ];
    let mut server = jwt_server(&overrides);
    let token = phone_token(&server);
    let mut browser = Client::browser(&page_url(&origin, &server.ws_url(""), &token));
    browser.expect("open");
    server.publish("/publish/user/42", "hello browser");
    server.publish("/publish/channel/news", "ünïcödé news ✓");
    let blob = [0u8, 1, 2, 0xfe, 0xff];
    let response = server.request(
        "POST",
        "/publish/user/42/client/phone",
        &blob,
        &[("Content-Type", "application/octet-stream")],
    );
    assert_eq!(response.status, 202);
    server.publish("/publish/all", "to everyone");
    browser.expect_text("hello browser");
    browser.expect_text("ünïcödé news ✓");
    browser.expect_binary(&blob);
    browser.expect_text("to everyone");

    // A restart: the page sees 1001, schedules a jittered retry, and reconnects to the new server.
    server.sigterm();
    browser.expect_close(1001);
    let retry = browser.expect("retry");
    let delay = retry["delay_ms"].as_u64().expect("delay_ms");
    assert!(
        delay <= 500,
        "first retry delay {delay} ms over its 500 ms cap"
    );
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    let server = jwt_server(&overrides);
    // Attempts made before the new server listened fail (1006) and back off further; one then succeeds.
    loop {
        let event = browser.next();
        match event["event"].as_str() {
            Some("open") => break,
            Some("close") => assert_eq!(event["code"], 1006, "{event}"),
            Some("retry" | "console-error") => {}
            _ => panic!("{}", browser.failure("unexpected event while reconnecting")),
        }
    }
    server.publish("/publish/user/42", "welcome back");
    browser.expect_text("welcome back");

    // A kick is deliberate: the page reports it and does not reconnect.
    let response = server.request(
        "DELETE",
        "/connections/user/42?code=4001&reason=bye",
        b"",
        &[],
    );
    assert_eq!(response.json()["closed"], 1);
    let close = browser.expect_close(4001);
    assert_eq!(close["reason"], "bye");
    assert_eq!(browser.next_within(Duration::from_millis(1500)), None);
    assert_eq!(server.metric("densepush_connections_open", &[]), 0);
}

#[test]
fn browser_page_from_an_origin_not_in_allowed_origins_is_refused_and_from_an_allowed_one_connects()
{
    let allowed_origin = serve_examples();
    let other_origin = serve_examples(); // another port: another origin (RFC 6454 §4)
    let allowed = format!(r#"["{allowed_origin}"]"#);
    let server = jwt_server(&[("server.allowed_origins", allowed.as_str())]);
    let token = phone_token(&server);

    let mut refused = Client::browser(&page_url(&other_origin, &server.ws_url(""), &token));
    // Chromium logs the refused handshake's status; the page sees close 1006, as for any failed handshake.
    let error = refused.expect("console-error");
    assert!(
        error["text"].as_str().unwrap_or("").contains("403"),
        "{error}"
    );
    refused.expect_close(1006);
    assert!(
        server.metric(
            "densepush_handshakes_rejected_total",
            &[("reason", "forbidden")]
        ) >= 1,
        "the server did not refuse the origin: {}",
        server.log()
    );
    drop(refused);

    let mut accepted = Client::browser(&page_url(&allowed_origin, &server.ws_url(""), &token));
    accepted.expect("open");
    server.publish("/publish/user/42", "from the right origin");
    accepted.expect_text("from the right origin");
    assert_eq!(server.metric("densepush_handshakes_accepted_total", &[]), 1);
}

#[test]
fn browser_example_receives_text_and_binary_over_wss() {
    let origin = serve_examples();
    let allowed = format!(r#"["{origin}"]"#);
    let server = jwt_tls_server(&[("server.allowed_origins", allowed.as_str())]);
    let token = phone_token(&server);
    // Chromium does not know the test CA: it accepts the server's certificate by its key instead.
    let trust = format!(
        "--ignore-certificate-errors-spki-list={}",
        server.pki().leaf.spki_sha256
    );
    let mut browser = Client::browser_with_flags(
        &page_url(&origin, &server.wss_url(""), &token),
        &[trust.as_str()],
    );
    browser.expect("open");
    server.publish("/publish/user/42", "hello over wss");
    server.publish("/publish/channel/news", "ünïcödé news ✓");
    let blob = [0u8, 1, 2, 0xfe, 0xff];
    let response = server.request(
        "POST",
        "/publish/user/42/client/phone",
        &blob,
        &[("Content-Type", "application/octet-stream")],
    );
    assert_eq!(response.status, 202);
    server.publish("/publish/all", "to everyone");
    browser.expect_text("hello over wss");
    browser.expect_text("ünïcödé news ✓");
    browser.expect_binary(&blob);
    browser.expect_text("to everyone");
    assert_eq!(
        server.metric("densepush_tls_handshakes_total", &[]),
        server.metric("densepush_handshakes_accepted_total", &[]),
        "every upgrade came over TLS"
    );
}

// ---- openssl s_client ----------------------------------------------------------------------------------------

#[test]
fn openssl_s_client_completes_the_upgrade_over_wss_and_receives_a_push() {
    let server = jwt_tls_server(&[]);
    let token = phone_token(&server);
    let stderr = tempfile::tempfile().expect("a file for stderr");
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(server.tls_addr().to_string())
        .args(["-servername", "localhost", "-alpn", "http/1.1", "-CAfile"])
        .arg(&server.pki().ca_file)
        // Fail the handshake unless the chain verifies against the CA; print nothing but the data.
        .args(["-verify_return_error", "-quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting openssl s_client: {e}; {HINT}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = child.stdout.take().expect("piped stdout");
    // Reads happen on a thread: a stuck s_client then fails the test at a timeout instead of hanging it.
    let (heads, head_rx) = mpsc::channel();
    let (frames, frame_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = heads.send(read_head(&mut stdout));
        let _ = frames.send(read_frame(&mut stdout).ok().flatten());
    });
    stdin
        .write_all(upgrade_request(&format!("token={token}"), &[]).as_bytes())
        .unwrap();
    stdin.flush().unwrap();
    let stderr_text = || {
        use std::io::Seek;
        let mut file = stderr.try_clone().unwrap();
        let mut text = String::new();
        let _ = file.rewind();
        let _ = file.read_to_string(&mut text);
        text
    };
    let head = head_rx.recv_timeout(EVENT_TIMEOUT);
    assert!(
        head.as_ref().is_ok_and(|h| h.starts_with("HTTP/1.1 101 ")),
        "response head {head:?}; s_client stderr:\n{}",
        stderr_text()
    );
    server.publish("/publish/user/42", "hello openssl");
    let frame = frame_rx.recv_timeout(EVENT_TIMEOUT);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        frame,
        Ok(Some((true, 1, b"hello openssl".to_vec()))),
        "the push as one text frame; s_client stderr:\n{}",
        stderr_text()
    );
    assert_eq!(
        server.metric("densepush_tls_handshakes_total", &[("kind", "full")]),
        1
    );
}

// ---- the JavaScript client -----------------------------------------------------------------------------------

#[test]
fn js_client_in_node_over_wss_receives_and_recovers_after_a_server_restart() {
    let pki = Arc::new(TestPki::new(30));
    let listen = format!("127.0.0.1:{}", free_port());
    let overrides = [("tls.listen", listen.as_str()), ("history.user", "true")];
    let mut server = jwt_tls_server_with(pki.clone(), &overrides);
    let token = phone_token(&server);
    let mut client = Client::js(&server.wss_url(""), &token, &pki.ca_file);
    client.expect("open");
    server.publish("/publish/user/42", "m1");
    let message = client.expect("message");
    assert_eq!(
        (message["stream"].as_str(), message["data"].as_str()),
        (Some("user:42"), Some("m1"))
    );

    // The server restarts; the client is kept out until messages were published on the new one.
    client.send_line("refuse");
    client.expect("gate");
    server.sigterm();
    client.expect_close(1001);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    let server = jwt_tls_server_with(pki, &overrides);
    server.publish("/publish/user/42", "m2");
    server.publish("/publish/user/42", "m3");
    client.send_line("allow");

    // It reconnects, learns that the stream has a new epoch, and gets it from its start.
    let mut got = Vec::new();
    let mut resynced = false;
    while got.len() < 2 {
        let event = client.next();
        match event["event"].as_str() {
            Some("message") => got.push(event["data"].as_str().unwrap_or_default().to_string()),
            Some("resync") => resynced |= event["stream"] == "user:42",
            Some("open" | "close" | "gate") => {}
            _ => panic!("{}", client.failure("unexpected event while recovering")),
        }
    }
    assert_eq!(
        got,
        ["m2", "m3"],
        "{}",
        client.failure("recovered messages")
    );
    assert!(resynced, "{}", client.failure("no resync for user:42"));
    server.publish("/publish/user/42", "m4");
    loop {
        let event = client.next();
        match event["event"].as_str() {
            Some("message") => {
                assert_eq!(
                    event["data"],
                    "m4",
                    "{}",
                    client.failure("live after recovery")
                );
                break;
            }
            Some("open" | "close" | "resync") => {}
            _ => panic!("{}", client.failure("unexpected event after recovery")),
        }
    }
    assert!(server.metric("densepush_tls_handshakes_total", &[]) >= 1);
}

// ---- the README's command lines ------------------------------------------------------------------------------

/// The shell lines of the README's quick start (the fenced `sh` blocks before "### In a browser").
fn readme_quick_start_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let start = readme
        .find("## Quick start")
        .expect("a Quick start section");
    let end = readme[start..]
        .find("### In a browser")
        .map_or(readme.len(), |i| start + i);
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in readme[start..end].lines() {
        if line.starts_with("```") {
            in_sh = line.trim() == "```sh";
            continue;
        }
        if in_sh && !line.trim().is_empty() {
            lines.push(line.to_string());
        }
    }
    lines
}

/// The comment at the end of a README line (`# …`), if any.
fn trailing_comment(line: &str) -> Option<&str> {
    line.rsplit_once("  # ").map(|(_, c)| c.trim())
}

#[test]
fn readme_quick_start_token_client_and_curl_lines_work_as_written() {
    let lines = readme_quick_start_lines();
    // The server as the quick start runs it, on ephemeral ports instead of 8080/8081.
    let server = jwt_server(&[]);
    let client_port = server.client_addr.to_string();
    let admin_port = server.admin_addr.to_string();
    let substitute = |line: &str| -> String {
        line.replace("127.0.0.1:8080", &client_port)
            .replace("127.0.0.1:8081", &admin_port)
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("blob.bin"), [0xde, 0xad, 0xbe, 0xef, 0x00]).unwrap();
    let bash = |script: &str| -> std::process::Output {
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("running bash")
    };

    // 1. The token line: `cargo run --release -q --` is the binary just built, on this server's config.
    let token_line = lines
        .iter()
        .find(|l| l.starts_with("TOKEN=$("))
        .expect("a TOKEN= line");
    let bin = format!("'{}' --config '{}'", bin(), server.config_path.display());
    let script = format!(
        "{}\nprintf %s \"$TOKEN\"",
        token_line.replace("cargo run --release -q --", &bin)
    );
    let out = bash(&script);
    assert!(out.status.success(), "{token_line}: {out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");

    // 2. The client line, with the Python that has `websockets`.
    let client_line = lines
        .iter()
        .find(|l| l.contains("-m websockets"))
        .expect("a `python3 -m websockets` client line");
    let command_part = client_line.split("  #").next().unwrap().trim();
    assert!(
        command_part.starts_with("python3 -m websockets "),
        "{client_line}"
    );
    let script = substitute(command_part).replacen("python3", &python().display().to_string(), 1);
    let mut client = Command::new("bash")
        .args(["-c", &script])
        .env("TOKEN", &token)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::piped()) // kept open: the interactive client reads what to send from it
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the README client");
    let _keep_stdin = client.stdin.take();
    let mut stdout = client.stdout.take().unwrap();
    let (tx, output) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut chunk) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&chunk[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = |needle: &str| {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while !seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match output.recv_timeout(left) {
                Ok(text) => seen.push_str(&text),
                Err(_) => panic!("README client never printed {needle:?}; output so far: {seen:?}"),
            }
        }
    };
    wait_for("Connected to ws://");

    // 3. Every curl line, in order; what each sends must reach the client, what each prints must match
    //    the README's comment.
    let curl_lines: Vec<&String> = lines.iter().filter(|l| l.starts_with("curl ")).collect();
    assert!(
        curl_lines.len() >= 7,
        "expected the README's curl lines: {curl_lines:?}"
    );
    for line in curl_lines {
        let command_part = line.split("  #").next().unwrap().trim();
        let out = bash(&format!(
            "{} --silent --show-error --fail",
            substitute(command_part)
        ));
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(comment) = trailing_comment(line).filter(|c| c.starts_with('{')) {
            let want: Value = serde_json::from_str(comment).expect("README comment is JSON");
            let got: Value = serde_json::from_str(&printed)
                .unwrap_or_else(|e| panic!("{line}: printed {printed:?}: {e}"));
            assert_eq!(got, want, "{line}");
        }
        if let Some(body) = command_part
            .split("--data '")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
        {
            wait_for(&format!("< {body}"));
        } else if command_part.contains("@blob.bin") {
            wait_for("< (binary) deadbeef00");
        } else if command_part.starts_with("curl -X DELETE") {
            wait_for("Connection closed: 4000");
        }
    }
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while client.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "README client did not exit after the kick"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The body of the README's first fenced block in `language` that contains `needle`.
fn readme_block(language: &str, needle: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let fence = format!("```{language}\n");
    readme
        .split(&fence)
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or_default())
        .find(|body| body.contains(needle))
        .unwrap_or_else(|| panic!("no ```{language} block with {needle:?} in README.md"))
        .to_string()
}

#[test]
fn readme_python_and_node_snippets_receive_a_push() {
    let server = jwt_server(&[]);
    let token = phone_token(&server);
    let url = server.ws_url("");
    let python_code = format!(
        "token = {token:?}\n{}",
        readme_block("python", "websockets")
    )
    .replace("ws://127.0.0.1:8080/ws", &url);
    let node_code = format!(
        "const token = {token:?};\n{}",
        readme_block("js", "from \"ws\"")
    )
    .replace("ws://127.0.0.1:8080/ws", &url);
    let spawn = |mut command: Command| {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting a README snippet")
    };
    let mut python_cmd = Command::new(python());
    python_cmd.args(["-u", "-c", &python_code]);
    let mut node_cmd = Command::new("node");
    node_cmd
        .current_dir(js_dir())
        .args(["--input-type=module", "-e", &node_code]);
    let snippets = [spawn(python_cmd), spawn(node_cmd)];
    if !wait_until(EVENT_TIMEOUT, || {
        server.metric("densepush_connections_open", &[]) == 2
    }) {
        for (name, mut child) in ["python", "node"].into_iter().zip(snippets) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("snippet output");
            eprintln!("{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        panic!("the README snippets did not connect");
    }
    server.publish("/publish/user/42", "pushed to the snippet");
    // A kick ends both loops (Python raises ConnectionClosedError for 4000, which is fine here).
    let response = server.request("DELETE", "/connections/user/42", b"", &[]);
    assert_eq!(response.json()["closed"], 2);
    for (name, child) in ["python", "node"].into_iter().zip(snippets) {
        let out = child.wait_with_output().expect("snippet output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("pushed to the snippet"),
            "{name} snippet printed {stdout:?}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
