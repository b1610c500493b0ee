//! The live upgrade, end to end: the real binary hands its listeners, its ws:// and wss:// connections, its
//! history and its admin connections to a new process (SIGUSR2 or `densepush upgrade`) while a publisher keeps
//! publishing; and when the new process cannot take over, the old one keeps serving with nothing lost.

mod cluster_common;
mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Users (and client tokens) of the clients; client `j` is user `u{j}` with client token `c{j}`.
const USERS: usize = 10;

/// What client `j` must receive, in this order, when `rounds` rounds were published: each round `i` publishes
/// to user `u{i % USERS}`, to that user's client token, to channel `news` and to everyone, one after another.
fn expected(j: usize, rounds: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..rounds {
        if i % USERS == j {
            out.push(format!("u:{i}"));
            out.push(format!("c:{i}"));
        }
        out.push(format!("n:{i}"));
        out.push(format!("a:{i}"));
    }
    out
}

/// A message's payload: the envelope's `d` for a client that opted into recovery.
fn payload(text: &str) -> String {
    if text.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        v["d"].as_str().unwrap().to_string()
    } else {
        text.to_string()
    }
}

/// A client in a child process, Python `websockets` (tests/clients/ws_client.py) or Node `ws`
/// (tests/js/ws_client.mjs), and the text messages it reported, in order. Killed on drop.
struct ChildClient {
    child: std::process::Child,
    /// Text messages, in order.
    texts: Arc<Mutex<Vec<String>>>,
    /// Whether it reported `open`; the `close` or `error` event that ended it, if any.
    state: Arc<Mutex<(bool, Option<String>)>>,
}

impl ChildClient {
    fn spawn(python: bool, url: &str, ca: Option<&Path>) -> ChildClient {
        let mut command = if python {
            let mut c = std::process::Command::new(python_with("websockets.sync.client"));
            c.arg(repo().join("tests/clients/ws_client.py"));
            c
        } else {
            let mut c = std::process::Command::new("node");
            c.current_dir(js_dir()).arg("ws_client.mjs");
            c
        };
        command.arg(url);
        if let Some(ca) = ca {
            command.arg("--ca").arg(ca);
        }
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting a client: {e}; {TOOLS_HINT}"));
        let texts: Arc<Mutex<Vec<String>>> = Arc::default();
        let state: Arc<Mutex<(bool, Option<String>)>> = Arc::default();
        let stdout = child.stdout.take().unwrap();
        let (t, st) = (Arc::clone(&texts), Arc::clone(&state));
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                let mut state = st.lock().unwrap();
                match event["event"].as_str() {
                    Some("open") => state.0 = true,
                    Some("message") if event["type"] == "text" => {
                        let text = event["data"].as_str().unwrap().to_string();
                        t.lock().unwrap().push(text);
                    }
                    Some("ping") => {}
                    _ => state.1 = Some(line),
                }
            }
        });
        ChildClient {
            child,
            texts,
            state,
        }
    }

    fn opened(&self) -> bool {
        self.state.lock().unwrap().0
    }

    fn ended(&self) -> Option<String> {
        self.state.lock().unwrap().1.clone()
    }

    /// Waits for `count` messages; fails if the connection ends or they do not come in time.
    fn wait_for(&self, count: usize, timeout: Duration) -> Vec<String> {
        let arrived = wait_until(timeout, || {
            self.texts.lock().unwrap().len() >= count || self.ended().is_some()
        });
        let texts = self.texts.lock().unwrap().clone();
        assert!(
            self.ended().is_none(),
            "after {} messages: {:?}",
            texts.len(),
            self.ended()
        );
        assert!(
            arrived,
            "{} of {count} messages in {timeout:?}",
            texts.len()
        );
        texts
    }
}

impl Drop for ChildClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes `rounds` rounds over one keep-alive admin connection, calling `at(i)` before round `i`.
fn publish_rounds(admin: std::net::SocketAddr, rounds: usize, mut at: impl FnMut(usize)) {
    let mut conn = Admin::connect(admin);
    for i in 0..rounds {
        at(i);
        let u = i % USERS;
        for (path, body) in [
            (format!("/publish/user/u{u}"), format!("u:{i}")),
            (format!("/publish/user/u{u}/client/c{u}"), format!("c:{i}")),
            ("/publish/channel/news".to_string(), format!("n:{i}")),
            ("/publish/all".to_string(), format!("a:{i}")),
        ] {
            let r = conn.request("POST", &path, body.as_bytes(), &[]);
            assert_eq!(r.status, 202, "round {i} {path}: {}", r.text());
        }
    }
}

#[test]
fn two_upgrades_in_a_row_move_ws_and_wss_clients_history_and_admin_with_nothing_lost() {
    const ROUNDS: usize = 300;
    let mut server = Server::start_tls(&[
        ("server.reactors", "2"),
        ("history.user", "true"),
        ("history.channel", "true"),
    ]);
    let first_pid = server.pid();
    // Clients in child processes: Python `websockets` and Node `ws`, each over ws:// and wss://; two of them
    // opted into recovery (envelopes, with history positions).
    let ca = server.pki().ca_file.clone();
    let clients: Vec<ChildClient> = (0..USERS)
        .map(|j| {
            let recover = if j < 2 { "&recover=1" } else { "" };
            let query = format!("user=u{j}&client=c{j}&channels=news{recover}");
            let (python, url, ca) = match j % 4 {
                0 => (true, server.ws_url(&query), None),
                1 => (false, server.wss_url(&query), Some(ca.as_path())),
                2 => (false, server.ws_url(&query), None),
                _ => (true, server.wss_url(&query), Some(ca.as_path())),
            };
            ChildClient::spawn(python, &url, ca)
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || clients
            .iter()
            .all(|c| c.opened())),
        "clients did not open: {:?}",
        clients.iter().map(|c| c.ended()).collect::<Vec<_>>()
    );
    assert!(wait_until(Duration::from_secs(10), || {
        server.metric("densepush_connections_open", &[]) == USERS as u64
    }));
    // /healthz answers 200 throughout on one keep-alive connection: during the freeze it waits and is answered
    // by the new process. The thread records which process answered.
    let stop = Arc::new(AtomicBool::new(false));
    let answered_by = Arc::new(Mutex::new(Vec::<u64>::new()));
    let health = {
        let (stop, answered_by, admin) = (stop.clone(), answered_by.clone(), server.admin_addr);
        std::thread::spawn(move || {
            let mut conn = Admin::connect(admin);
            while !stop.load(Relaxed) {
                let r = conn.request("GET", "/healthz", b"", &[]);
                assert_eq!(r.status, 200, "{}", r.text());
                let pid = r.json()["pid"].as_u64().unwrap();
                let mut pids = answered_by.lock().unwrap();
                if pids.last() != Some(&pid) {
                    pids.push(pid);
                }
                drop(pids);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let answered_by_now = || answered_by.lock().unwrap().clone();
    assert!(wait_until(Duration::from_secs(10), || !answered_by_now().is_empty()));
    let admin = server.admin_addr;
    let (first_upgrade, second_upgrade) = (ROUNDS / 3, 2 * ROUNDS / 3);
    let (tx, rx) = std::sync::mpsc::channel();
    let publisher = std::thread::spawn(move || {
        publish_rounds(admin, ROUNDS, |i| {
            if i == first_upgrade || i == second_upgrade {
                tx.send(i).unwrap();
            }
        })
    });
    // First upgrade by SIGUSR2, the second with `densepush upgrade`, both while the publisher publishes.
    assert_eq!(rx.recv().unwrap(), first_upgrade);
    let second_pid = server.upgrade();
    assert_eq!(rx.recv().unwrap(), second_upgrade);
    let since = unix_ms();
    let cli = std::process::Command::new(bin())
        .args(["upgrade", "--config", server.config_path.to_str().unwrap()])
        .args(["--admin", &server.admin_addr.to_string()])
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "densepush upgrade: {}{}",
        String::from_utf8_lossy(&cli.stdout),
        String::from_utf8_lossy(&cli.stderr)
    );
    let third_pid = server.follow_upgrade(second_pid, since);
    assert!(
        String::from_utf8_lossy(&cli.stdout).contains(&format!("process {third_pid} took over"))
    );
    publisher.join().unwrap();
    // Every connection is open in the third process, with its TLS session; the counters carried across.
    assert_eq!(
        server.metric("densepush_connections_open", &[]),
        USERS as u64
    );
    assert_eq!(
        server.metric("densepush_tls_sessions", &[]),
        (USERS / 2) as u64
    );
    assert_eq!(server.metric("densepush_upgrades_completed_total", &[]), 2);
    assert_eq!(server.metric("densepush_upgrades_started_total", &[]), 2);
    assert_eq!(
        server.metric("densepush_upgrade_connections_moved", &[]),
        USERS as u64
    );
    for (j, client) in clients.iter().enumerate() {
        let expected = expected(j, ROUNDS);
        let got = client.wait_for(expected.len(), Duration::from_secs(60));
        let got: Vec<String> = got.iter().map(|t| payload(t)).collect();
        assert_eq!(got, expected, "client {j}: lost, duplicated or reordered");
    }
    let pids = [first_pid, second_pid, third_pid].map(u64::from).to_vec();
    assert!(
        wait_until(Duration::from_secs(10), || answered_by_now() == pids),
        "one admin connection, answered by each process in turn: {:?}",
        answered_by_now()
    );
    stop.store(true, Relaxed);
    health.join().unwrap();
    assert!(!pid_alive(first_pid) && !pid_alive(second_pid) && pid_alive(third_pid));
    assert_eq!(server.healthz_pid(), third_pid);

    // History moved too: a client reconnecting from a position before the upgrades gets its replay, not a
    // resync.
    let page = server.request("GET", "/history/user:u0", b"", &[]).json();
    let epoch = page["epoch"].as_str().unwrap();
    let mut late = server.connect(&format!("user=u0&since=user:u0@{epoch}:10"));
    let first: serde_json::Value = serde_json::from_str(&recv_text(&mut late)).unwrap();
    assert!(
        first.get("type").is_none(),
        "expected a replay, got {first}"
    );
    assert_eq!(first["o"], 11);
}

/// The path the server is started by: a symlink to a release directory holding a copy of the binary, the way
/// many deploys lay releases out (`current -> releases/1`).
fn binary_copy(dir: &Path) -> PathBuf {
    let release = dir.join("releases/0");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(bin(), release.join("densepush")).unwrap();
    let current = dir.join("densepush");
    std::os::unix::fs::symlink(release.join("densepush"), &current).unwrap();
    current
}

/// Deploys `contents` as a new release: writes it to a new release directory and swaps the symlink at `path`
/// atomically (a new link renamed over it). The upgrade must start this release, not the one running.
fn replace(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let releases = path.parent().unwrap().join("releases");
    let release = releases.join(std::fs::read_dir(&releases).unwrap().count().to_string());
    std::fs::create_dir_all(&release).unwrap();
    let file = release.join("densepush");
    std::fs::write(&file, contents).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = path.with_extension("new");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    std::fs::rename(&link, path).unwrap();
}

/// Sends SIGUSR2 and waits for `/healthz` to report a rollback started since; returns (reason, detail).
fn rolled_back(server: &Server) -> (String, String) {
    let since = unix_ms();
    signal_pid(server.serving_pid(), libc::SIGUSR2);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no rollback reported");
        let h = server.request("GET", "/healthz", b"", &[]).json();
        assert_eq!(h["pid"], server.serving_pid(), "another process took over");
        let u = &h["upgrade"];
        if u["last"] == "rolled_back" && u["started_ms"].as_u64().unwrap() >= since {
            return (
                u["reason"].as_str().unwrap().to_string(),
                u["detail"].as_str().unwrap().to_string(),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fake successor (Python): reads the channel the server passed it, says hello with handoff `version` and
/// these facts, then reads `then_read` messages and exits abruptly (as a successor dying mid-handoff).
fn fake_successor(version: u32, facts: &[&str], reactors: u32, then_read: usize) -> Vec<u8> {
    let strings: Vec<String> = facts.iter().map(|f| format!("{f:?}")).collect();
    format!(
        r#"#!/usr/bin/env python3
import os, socket, struct
fd = int(os.environ["DENSEPUSH_HANDOFF_FD"])
s = socket.socket(fileno=fd)
def string(v):
    b = v.encode()
    return struct.pack("<I", len(b)) + b
facts = [{facts}]
payload = struct.pack("<II", {version}, os.getpid())
payload += string(facts[0]) + string(facts[1]) + string(facts[2]) + struct.pack("<I", {reactors})
payload += string(facts[3]) + string(facts[4])
s.sendall(struct.pack("<IBH", len(payload), 1, 0) + payload)
for _ in range({then_read}):
    head = b""
    while len(head) < 7:
        chunk, _, _, _ = socket.recv_fds(s, 7 - len(head), 300)
        if not chunk:
            os._exit(5)
        head += chunk
    length = struct.unpack("<I", head[:4])[0]
    left = length
    while left:
        left -= len(s.recv(min(left, 65536)))
os._exit(4)
"#,
        facts = strings.join(", ")
    )
    .into_bytes()
}

#[test]
fn a_failed_upgrade_rolls_back_and_the_old_process_keeps_serving_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let binary = binary_copy(dir.path());
    let real = std::fs::read(&binary).unwrap();
    let server = Server::start_with_env(
        &[("server.reactors", "1")],
        &[(BINARY_ENV, binary.to_str().unwrap())],
    );
    let mut ws = server.connect("user=alice&channels=news");
    let n = std::cell::Cell::new(0);
    let check = |server: &Server, ws: &mut Ws| {
        n.set(n.get() + 1);
        server.publish("/publish/channel/news", &format!("still here {}", n.get()));
        assert_eq!(recv_text(ws), format!("still here {}", n.get()));
    };
    check(&server, &mut ws);

    // A new binary that exits at once.
    replace(&binary, b"#!/bin/sh\nexit 3\n");
    let (reason, detail) = rolled_back(&server);
    assert_eq!(reason, "exited", "{detail}");
    check(&server, &mut ws);

    // A new config that moves a listener: refused, naming the key.
    replace(&binary, &real);
    let config = std::fs::read_to_string(&server.config_path).unwrap();
    std::fs::write(
        &server.config_path,
        config.replace("reactors = 1", "reactors = 2"),
    )
    .unwrap();
    let (reason, detail) = rolled_back(&server);
    assert_eq!(reason, "refused", "{detail}");
    assert!(
        detail.starts_with("server.reactors cannot change"),
        "{detail}"
    );
    check(&server, &mut ws);
    std::fs::write(&server.config_path, &config).unwrap();

    // A new config that moves the client listener to another address: refused, naming the key.
    let mut moved: toml::Table = config.parse().unwrap();
    moved["server"]["listen"] = toml::Value::from("127.0.0.2:0");
    std::fs::write(&server.config_path, toml::to_string(&moved).unwrap()).unwrap();
    let (reason, detail) = rolled_back(&server);
    assert_eq!(reason, "refused", "{detail}");
    assert!(
        detail.starts_with("server.listen cannot change"),
        "{detail}"
    );
    check(&server, &mut ws);
    std::fs::write(&server.config_path, &config).unwrap();

    // A successor that speaks another handoff version.
    let facts = ["127.0.0.1:0", "", "127.0.0.1:0", "", ""];
    replace(&binary, &fake_successor(99, &facts, 1, 0));
    let (reason, detail) = rolled_back(&server);
    assert_eq!(reason, "version", "{detail}");
    check(&server, &mut ws);

    // A successor that is accepted, lets the server freeze, takes the history and a few messages, and dies:
    // every part resumes.
    replace(
        &binary,
        &fake_successor(densepush::handoff::protocol::VERSION, &facts, 1, 3),
    );
    let (reason, detail) = rolled_back(&server);
    assert_eq!(reason, "exited", "{detail}");
    check(&server, &mut ws);
    let rolled = |reason| {
        server.metric(
            "densepush_upgrades_rolled_back_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(
        (rolled("exited"), rolled("refused"), rolled("version")),
        (2, 2, 1)
    );
    assert_eq!(server.metric("densepush_upgrades_started_total", &[]), 5);

    // New clients are still accepted (accepting resumed after each freeze), and a real upgrade then works.
    let mut bob = server.connect("user=bob&channels=news");
    check(&server, &mut ws);
    assert_eq!(recv_text(&mut bob), format!("still here {}", n.get()));
    replace(&binary, &real);
    let mut server = server;
    server.upgrade();
    check(&server, &mut ws);
    assert_eq!(recv_text(&mut bob), format!("still here {}", n.get()));
}

#[test]
fn an_admin_request_cut_in_half_by_the_upgrade_is_answered_by_the_new_process() {
    let mut server = Server::start(&[]);
    let mut ws = server.connect("user=carol");
    let body = "published across the upgrade";
    let head = format!(
        "POST /publish/user/carol HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut admin = TcpStream::connect(server.admin_addr).unwrap();
    admin.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    admin.write_all(head.as_bytes()).unwrap();
    admin.write_all(&body.as_bytes()[..10]).unwrap();
    // Let the server read the first half before it freezes.
    std::thread::sleep(Duration::from_millis(200));
    let old = server.pid();
    server.upgrade();
    assert_ne!(server.healthz_pid(), old);
    admin.write_all(&body.as_bytes()[10..]).unwrap();
    let response = read_head(&mut admin);
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    assert_eq!(recv_text(&mut ws), body);
}

#[test]
fn systemd_hears_ready_from_the_first_process_and_the_new_main_pid_from_its_successor() {
    // A Type=notify unit with NotifyAccess=all: the service manager listens on $NOTIFY_SOCKET.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let manager = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut server = Server::start_with_env(&[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let heard = || {
        let mut buf = [0u8; 256];
        let n = manager.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(heard(), "READY=1");
    let mut ws = server.connect("user=dana");
    let new_pid = server.upgrade();
    assert_eq!(heard(), format!("MAINPID={new_pid}\nREADY=1"));
    server.publish("/publish/user/dana", "after");
    assert_eq!(recv_text(&mut ws), "after");
}

/// In a cluster, the bus reader stops for the handoff (so the successor can continue it from the exact entry);
/// when the upgrade then rolls back, the old process's reader carries on from where it stopped, and the
/// publishes made meanwhile (they went to the bus) still arrive, in order.
#[test]
fn a_rolled_back_upgrade_resumes_the_cluster_bus_where_it_stopped() {
    assert!(
        cluster_common::redis_available(),
        "redis-server is missing; {TOOLS_HINT}"
    );
    let redis = cluster_common::Redis::start();
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let binary = binary_copy(dir.path());
    let server = Server::start_with_env(
        &[
            ("server.reactors", "1"),
            ("cluster.redis_url", &format!("{url:?}")),
            ("cluster.node_id", "node-a"),
        ],
        &[(BINARY_ENV, binary.to_str().unwrap())],
    );
    // The link may come up after the server serves when the machine is busy (the server waits for it only up
    // to cluster.command_timeout_ms); publishes before it are refused, not lost.
    let link_up = |server: &Server| {
        assert!(
            wait_until(Duration::from_secs(20), || server
                .request("GET", "/healthz", b"", &[])
                .json()["cluster"]
                == "up"),
            "the cluster link never came up"
        );
    };
    link_up(&server);
    let mut ws = server.connect("user=alice&channels=news");
    server.publish("/publish/channel/news", "before");
    assert_eq!(recv_text(&mut ws), "before");

    // Accepted, lets the server freeze (the bus reader stops), takes the history and a few messages, dies.
    let facts = ["127.0.0.1:0", "", "127.0.0.1:0", "node-a", url.as_str()];
    replace(
        &binary,
        &fake_successor(densepush::handoff::protocol::VERSION, &facts, 1, 3),
    );
    let (reason, detail) = rolled_back(&server);
    assert_eq!(reason, "exited", "{detail}");
    // The resumed reader links again (the link is down while it is stopped: publishes are refused, not lost).
    link_up(&server);
    for i in 0..20 {
        server.publish("/publish/channel/news", &format!("after {i}"));
    }
    for i in 0..20 {
        assert_eq!(recv_text(&mut ws), format!("after {i}"));
    }
    assert_eq!(
        server.metric("densepush_cluster_missed_closes_total", &[]),
        0
    );
}

/// An SSE stream and a WebSocket with permessage-deflate (issue 17) keep what they speak across the upgrade:
/// the SSE stream gets the next publish as an event, the compressing connection a compressed frame, and the new
/// process counts both in its gauges.
#[test]
fn sse_streams_and_compressing_connections_move_as_what_they_are() {
    let mut server = Server::start(&[
        ("websocket.compression", "true"),
        ("websocket.compression_min_bytes", "16"),
    ]);
    let mut sse = server.raw();
    sse.write_all(b"GET /sse?user=erin HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(read_head(&mut sse).starts_with("HTTP/1.1 200"));
    let mut deflate = server.raw();
    deflate
        .write_all(
            upgrade_request(
                "user=erin",
                &["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"],
            )
            .as_bytes(),
        )
        .unwrap();
    assert!(read_head(&mut deflate).contains("permessage-deflate"));
    let old = server.pid();
    server.upgrade();
    assert_ne!(server.healthz_pid(), old);
    assert_eq!(server.metric("densepush_connections_sse", &[]), 1);
    assert_eq!(server.metric("densepush_connections_deflate", &[]), 1);
    let text = "after the upgrade, compressed after the upgrade, compressed";
    server.publish("/publish/user/erin", text);
    // The SSE stream: its retry preamble, then the event.
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let want = format!("data: {text}\n\n");
    while !String::from_utf8_lossy(&got).ends_with(&want) {
        assert_eq!(std::io::Read::read(&mut sse, &mut byte).unwrap(), 1);
        got.push(byte[0]);
    }
    let mut head = [0u8; 2];
    std::io::Read::read_exact(&mut deflate, &mut head).unwrap();
    assert_eq!(head[0], 0xC1, "FIN, RSV1, text: compressed");
    let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
    std::io::Read::read_exact(&mut deflate, &mut payload).unwrap();
    let mut inflated = Vec::new();
    densepush::proto::deflate::inflate(&payload, 1 << 20, |c| inflated.extend_from_slice(c))
        .unwrap();
    assert_eq!(inflated, text.as_bytes());
}
