//! Graceful operation under load: SIGTERM with 15,000 connections and messages in flight, then a reconnect
//! storm of all of them against the restarted server.
//!
//! The clients live in two child processes (this test binary run again as `swarm_client`, an ignored test
//! that does nothing unless `SWARM_ADDR` is set), so neither process comes near the 20,000 open-file cap.
//! Size: `LOAD_TEST_CLIENTS` (default 15,000; the server holds them all, so keep it under ~19,000). On a
//! 2-core machine the whole file takes about 15-30 s.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

const MESSAGES: usize = 3;
/// Clients per swarm beyond `max_connections` in the storm: each must get 503, nothing else may fail.
const STORM_EXTRA: usize = 50;

fn clients() -> usize {
    std::env::var("LOAD_TEST_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15_000)
}

// ---- the client swarm (child process side) -------------------------------------------------------------

/// Reads a response head; `None` on EOF, reset or timeout.
fn try_read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    String::from_utf8(head).ok()
}

/// Connects and upgrades `count` clients on `threads` threads started together; returns the open ones and
/// how many were refused with 503 and how many failed otherwise.
fn connect_many(
    addr: SocketAddr,
    first: usize,
    count: usize,
    threads: usize,
) -> (Vec<TcpStream>, usize, usize) {
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut open = Vec::new();
                let (mut refused, mut failed) = (0, 0);
                barrier.wait();
                for i in (t..count).step_by(threads) {
                    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(20))
                    else {
                        failed += 1;
                        continue;
                    };
                    stream
                        .set_read_timeout(Some(Duration::from_secs(20)))
                        .unwrap();
                    let request =
                        upgrade_request(&format!("user=u{}&channels=all", first + i), &[]);
                    if stream.write_all(request.as_bytes()).is_err() {
                        failed += 1;
                        continue;
                    }
                    match try_read_head(&mut stream) {
                        Some(head) if head.starts_with("HTTP/1.1 101 ") => open.push(stream),
                        Some(head) if head.starts_with("HTTP/1.1 503 ") => refused += 1,
                        _ => failed += 1,
                    }
                }
                (open, refused, failed)
            })
        })
        .collect();
    let mut all = Vec::new();
    let (mut refused, mut failed) = (0, 0);
    for worker in workers {
        let (open, r, f) = worker.join().expect("connect thread");
        all.extend(open);
        refused += r;
        failed += f;
    }
    (all, refused, failed)
}

/// Reads each connection until its close frame, answers the close, and counts what arrived.
fn collect(streams: Vec<TcpStream>) -> (usize, usize, usize) {
    let (mut messages, mut closes_1001, mut other) = (0, 0, 0);
    for mut stream in streams {
        loop {
            match read_frame(&mut stream) {
                Ok(Some((_, 0x1 | 0x2, _))) => messages += 1,
                Ok(Some((_, 0x8, payload))) => {
                    if payload.len() >= 2 && u16::from_be_bytes([payload[0], payload[1]]) == 1001 {
                        closes_1001 += 1;
                    } else {
                        other += 1;
                    }
                    let _ = write_frame(&mut stream, 0x8, &payload[..payload.len().min(2)]);
                    break;
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => {
                    other += 1;
                    break;
                }
            }
        }
    }
    (messages, closes_1001, other)
}

/// The child-process side: connect, report, collect what the shutdown delivers, then storm on command.
#[test]
#[ignore = "a helper process of sigterm_under_load_..., run by it"]
fn swarm_client() {
    let Ok(addr) = std::env::var("SWARM_ADDR") else {
        return;
    };
    let addr: SocketAddr = addr.parse().unwrap();
    let count: usize = std::env::var("SWARM_COUNT").unwrap().parse().unwrap();
    let first: usize = std::env::var("SWARM_FIRST").unwrap().parse().unwrap();
    let (open, refused, failed) = connect_many(addr, first, count, 4);
    println!(
        "SWARM ready ok={} refused={refused} failed={failed}",
        open.len()
    );
    let (messages, closes_1001, other) = collect(open);
    println!("SWARM collected messages={messages} close1001={closes_1001} other={other}");
    let mut lines = std::io::stdin().lock().lines();
    let Some(Ok(line)) = lines.next() else {
        return;
    };
    let addr: SocketAddr = line
        .strip_prefix("storm ")
        .expect("storm command")
        .parse()
        .unwrap();
    let started = Instant::now();
    let (open, refused, failed) = connect_many(addr, first, count + STORM_EXTRA, 8);
    println!(
        "SWARM storm ok={} refused={refused} failed={failed} ms={}",
        open.len(),
        started.elapsed().as_millis()
    );
    // Hold the connections until the test is done with them.
    for _ in lines {}
    drop(open);
}

// ---- the test (parent side) ----------------------------------------------------------------------------

struct Swarm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Swarm {
    fn spawn(addr: SocketAddr, first: usize, count: usize) -> Swarm {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "swarm_client",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SWARM_ADDR", addr.to_string())
            .env("SWARM_COUNT", count.to_string())
            .env("SWARM_FIRST", first.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning a swarm");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may print "test swarm_client ... " on the same line before the first report.
                if let Some(at) = line.find("SWARM ") {
                    let _ = tx.send(line[at + "SWARM ".len()..].to_string());
                }
            }
        });
        Swarm {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    /// The next report, as `key=value` pairs after its first word (which must be `kind`).
    fn report(&self, kind: &str, timeout: Duration) -> Vec<(String, usize)> {
        let line = self
            .lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no {kind} report from a swarm: {e}"));
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some(kind), "{line}");
        words
            .map(|w| {
                let (k, v) = w.split_once('=').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn field(report: &[(String, usize)], key: &str) -> usize {
    report
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key} in {report:?}"))
        .1
}

fn sum(reports: &[Vec<(String, usize)>], key: &str) -> usize {
    reports.iter().map(|r| field(r, key)).sum()
}

#[test]
fn sigterm_under_load_flushes_and_closes_every_client_with_1001_then_all_reconnect_in_a_storm() {
    let n = clients();
    let shutdown_timeout = Duration::from_secs(20);
    let overrides = |listen: &str| {
        vec![
            ("server.listen".to_string(), listen.to_string()),
            ("server.reactors".to_string(), "2".to_string()),
            ("server.max_connections".to_string(), n.to_string()),
            (
                "server.shutdown_timeout_ms".to_string(),
                shutdown_timeout.as_millis().to_string(),
            ),
            (
                "websocket.handshake_timeout_ms".to_string(),
                "30000".to_string(),
            ),
            ("log.level".to_string(), "info".to_string()),
        ]
    };
    let first_overrides = overrides("127.0.0.1:0");
    let refs: Vec<(&str, &str)> = first_overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut server = Server::start(&refs);
    let addr = server.client_addr;

    let started = Instant::now();
    let half = n / 2;
    let mut swarms = [
        Swarm::spawn(addr, 0, half),
        Swarm::spawn(addr, half, n - half),
    ];
    let ready: Vec<_> = swarms
        .iter()
        .map(|s| s.report("ready", Duration::from_secs(60)))
        .collect();
    assert_eq!(
        sum(&ready, "ok"),
        n,
        "not every client connected: {ready:?}"
    );
    assert_eq!(server.metric("densepush_connections_open", &[]) as usize, n);
    eprintln!("load: {n} clients connected in {:?}", started.elapsed());

    // Messages in flight, then SIGTERM at once.
    let mut admin = server.admin();
    for i in 0..MESSAGES {
        let target = if i % 2 == 0 {
            "/publish/all"
        } else {
            "/publish/channel/all"
        };
        let response = admin.request("POST", target, format!("message {i}").as_bytes(), &[]);
        assert_eq!(response.status, 202);
    }
    let term_at = Instant::now();
    server.sigterm();
    let status = server
        .wait_exit(shutdown_timeout + Duration::from_secs(5))
        .expect("the server did not exit");
    let exit_after = term_at.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        exit_after < shutdown_timeout,
        "exit took {exit_after:?}, over shutdown_timeout_ms"
    );
    let collected: Vec<_> = swarms
        .iter()
        .map(|s| s.report("collected", Duration::from_secs(30)))
        .collect();
    eprintln!(
        "load: SIGTERM with {n} clients: exit 0 after {exit_after:?}; clients received {} messages, {} closes 1001, {} other endings",
        sum(&collected, "messages"),
        sum(&collected, "close1001"),
        sum(&collected, "other")
    );
    assert_eq!(sum(&collected, "messages"), n * MESSAGES, "messages lost");
    assert_eq!(sum(&collected, "close1001"), n, "not every client got 1001");
    assert_eq!(sum(&collected, "other"), 0);

    // Restart on the same address; everyone reconnects at once, plus a few over the limit.
    let second_overrides = overrides(&addr.to_string());
    let refs: Vec<(&str, &str)> = second_overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let server = Server::start(&refs);
    assert_eq!(server.client_addr, addr);
    let storm_at = Instant::now();
    for swarm in &mut swarms {
        swarm.send(&format!("storm {addr}"));
    }
    let storm: Vec<_> = swarms
        .iter()
        .map(|s| s.report("storm", Duration::from_secs(60)))
        .collect();
    eprintln!(
        "load: reconnect storm of {} clients ({} over max_connections {n}) in {:?}: {} connected, {} refused 503, {} failed",
        n + 2 * STORM_EXTRA,
        2 * STORM_EXTRA,
        storm_at.elapsed(),
        sum(&storm, "ok"),
        sum(&storm, "refused"),
        sum(&storm, "failed")
    );
    assert_eq!(sum(&storm, "failed"), 0, "{storm:?}");
    assert_eq!(sum(&storm, "ok"), n, "{storm:?}");
    assert_eq!(sum(&storm, "refused"), 2 * STORM_EXTRA, "{storm:?}");
    assert_eq!(server.metric("densepush_connections_open", &[]) as usize, n);
    // Everyone reconnected is served.
    server.publish("/publish/all", "welcome back");
    assert!(
        wait_until(Duration::from_secs(10), || server
            .metric("densepush_frames_delivered_total", &[])
            as usize
            == n),
        "the publish after the storm did not reach every client"
    );
    drop(swarms);
}
