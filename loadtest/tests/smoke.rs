//! Smoke test of the whole chain: the real densepush server on ephemeral loopback ports (auth none) and the
//! real generator at 500 connections over 2 workers, phases connect, idle (1 s), broadcast and unicast, with
//! the JSON report checked: everyone connected, every message delivered exactly once and in order, and the
//! documented fields present.
//!
//! The server binary is `$DENSEPUSH_BIN` if set, else the workspace's `target/{debug,release}/densepush`
//! (or under `$CARGO_TARGET_DIR`), whichever was built last. The workspace's test script builds it first; if
//! it is missing the test fails and says how to build it.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CONNS: u64 = 500;
const BROADCASTS: u64 = 10;
const UNICASTS: u64 = 2_000;

fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("DENSEPUSH_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "DENSEPUSH_BIN={} is not a file",
            path.display()
        );
        return path;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        dirs.push(if dir.is_absolute() {
            dir
        } else {
            manifest.join("..").join(dir)
        });
    }
    dirs.push(manifest.join("../target"));
    let candidates: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| [d.join("debug/densepush"), d.join("release/densepush")])
        .collect();
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "densepush server binary not found (looked at {candidates:?}); build it first with \
                 `cargo build -p densepush` from the workspace root, or set DENSEPUSH_BIN"
            )
        })
}

/// The server process; killed if the test fails before stopping it.
struct Server {
    child: Option<Child>,
    client: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        // Pings every second, so the generator's pong answers are exercised within the run.
        Server::start_with("[websocket]\nping_interval_ms = 1000\npong_timeout_ms = 900\n[admin]\n")
    }

    /// A server whose config has `sections` (ending in an `[admin]` header the listen address goes under).
    fn start_with(sections: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nreactors = 2\nshutdown_timeout_ms = 3000\n\
                 [auth]\nmode = \"none\"\n[log]\nlevel = \"warn\"\n{sections}listen = \"127.0.0.1:0\"\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new(server_binary());
        cmd.arg("--config").arg(&config);
        // The server takes every DENSEPUSH_* variable as a config override and refuses unknown ones
        // (DENSEPUSH_BIN among them), so none of ours may reach it.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("DENSEPUSH_") {
                cmd.env_remove(name);
            }
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting densepush");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("densepush printed no listening line within 15 s");
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_string()
        };
        assert!(line.starts_with("densepush listening "), "{line}");
        Server {
            client: field("client="),
            admin: field("admin="),
            child: Some(child),
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: sending a signal to our own child process by its pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("densepush did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn u(v: &Value, path: &str) -> u64 {
    let mut at = v;
    for key in path.split('.') {
        at = at
            .get(key)
            .unwrap_or_else(|| panic!("{path}: {key} missing"));
    }
    at.as_u64()
        .unwrap_or_else(|| panic!("{path} is not a count: {at}"))
}

fn has_keys(v: &Value, section: &str, keys: &[&str]) {
    let obj = if section.is_empty() { v } else { &v[section] };
    for key in keys {
        assert!(
            obj.get(key).is_some(),
            "{section}.{key} missing from the report"
        );
    }
}

fn assert_exactly_once(report: &Value, section: &str, expected: u64) {
    let d = &report[section]["delivery"];
    assert_eq!(
        d["complete"],
        Value::Bool(true),
        "{section} incomplete: {d}"
    );
    assert_eq!(u(d, "conns_checked"), CONNS, "{section}");
    assert_eq!(u(d, "expected"), expected, "{section}");
    assert_eq!(u(d, "received"), expected, "{section}");
    for counter in [
        "lost",
        "duplicated",
        "reordered",
        "misdelivered",
        "malformed",
    ] {
        assert_eq!(u(d, counter), 0, "{section}.{counter}: {d}");
    }
    assert_eq!(
        d["violations"].as_array().map(Vec::len),
        Some(0),
        "{section}"
    );
    assert!(d["latency"]["p99_us"].is_u64(), "{section} latency");
}

#[test]
fn five_hundred_connections_get_every_message_exactly_once_in_order() {
    let server = Server::start();
    let out = Command::new(env!("CARGO_BIN_EXE_densepush-loadtest"))
        .args(["--server", &server.client, "--admin", &server.admin])
        .args(["--server-pid", &server.pid().to_string()])
        .args(["--conns", &CONNS.to_string(), "--workers", "2"])
        .args([
            "--phases",
            "connect,idle,broadcast,unicast",
            "--idle-secs",
            "1",
        ])
        .args(["--broadcast-messages", &BROADCASTS.to_string()])
        .args([
            "--unicast-messages",
            &UNICASTS.to_string(),
            "--publishers",
            "3",
        ])
        .args([
            "--max-seconds",
            "90",
            "--phase-timeout-secs",
            "30",
            "--json",
            "--quiet",
        ])
        .output()
        .expect("running densepush-loadtest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not the JSON report ({e}); status {:?}; stderr:\n{stderr}",
            out.status
        )
    });
    assert!(
        out.status.success(),
        "generator failed ({:?}):\n{stderr}",
        out.status
    );

    has_keys(
        &report,
        "",
        &[
            "version",
            "ok",
            "aborted",
            "config",
            "headline",
            "connect",
            "memory",
            "broadcast",
            "unicast",
            "churn",
            "health",
            "server_metrics",
            "elapsed_secs",
        ],
    );
    has_keys(
        &report,
        "headline",
        &[
            "server_rss_bytes_per_conn",
            "kernel_bytes_per_conn",
            "handshakes_per_sec",
            "broadcast_deliveries_per_sec",
            "broadcast_p99_us",
            "unicast_publishes_per_sec",
            "unicast_publish_p99_us",
            "unicast_delivery_p99_us",
            "cpu_ns_per_delivery",
            "lost",
            "duplicated",
            "reordered",
            "misdelivered",
        ],
    );
    has_keys(
        &report,
        "connect",
        &[
            "attempted",
            "open",
            "failed",
            "failures",
            "handshakes_per_sec",
            "handshake_latency",
        ],
    );
    has_keys(
        &report,
        "memory",
        &[
            "before",
            "after",
            "server_rss_bytes_per_conn",
            "kernel_bytes_per_conn",
            "held_secs",
        ],
    );
    has_keys(
        &report,
        "broadcast",
        &[
            "messages",
            "delivery",
            "deliveries_per_sec",
            "cpu_ns_per_delivery",
            "buffers_live_settled",
        ],
    );
    has_keys(
        &report,
        "unicast",
        &[
            "publishers",
            "published",
            "publishes_per_sec",
            "publish_latency",
            "delivery",
        ],
    );

    assert_eq!(report["ok"], Value::Bool(true), "report not ok:\n{stderr}");
    assert!(report["aborted"].is_null());
    assert!(report["churn"].is_null(), "churn was not asked for");
    assert_eq!(u(&report, "connect.open"), CONNS);
    assert_eq!(u(&report, "connect.failed"), 0);
    assert_eq!(u(&report, "broadcast.messages"), BROADCASTS);
    assert_exactly_once(&report, "broadcast", CONNS * BROADCASTS);
    assert_eq!(u(&report, "unicast.published"), UNICASTS);
    // One connection per user: each unicast message reaches exactly one connection.
    assert_exactly_once(&report, "unicast", UNICASTS);
    for counter in ["lost", "duplicated", "reordered", "misdelivered"] {
        assert_eq!(u(&report["headline"], counter), 0, "headline.{counter}");
    }
    assert!(report["headline"]["server_rss_bytes_per_conn"].is_f64());
    assert!(report["headline"]["cpu_ns_per_delivery"].is_f64());
    // Pings every second: answered by the workers, and no connection lost to a pong timeout.
    let pings = u(&report, "health.pings");
    assert!(pings > 0, "no server pings seen");
    assert_eq!(u(&report, "health.pongs"), pings);
    assert_eq!(
        report["server_metrics"]["pong_timeouts_total"].as_f64(),
        Some(0.0)
    );

    let status = server.stop();
    assert!(
        status.success(),
        "densepush exited with {status} after SIGTERM"
    );
}

#[test]
fn slow_readers_that_lag_past_the_outbox_limit_are_told_with_1008_and_the_others_lose_nothing() {
    // 64 KiB of lag allowed, a 500 ms close deadline, and readers that stay away 1.5 s: every slow reader
    // lags past the limit and reads only after the server gave up on it, yet each finds its 1008.
    let server = Server::start_with(
        "[websocket]\nmax_outbox_bytes = 65536\nclose_timeout_ms = 500\ntimer_tick_ms = 10\n\
         [admin]\nmax_publish_bytes = 65536\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_densepush-loadtest"))
        .args(["--server", &server.client, "--admin", &server.admin])
        .args(["--server-pid", &server.pid().to_string()])
        .args(["--conns", &CONNS.to_string(), "--workers", "2"])
        .args(["--phases", "connect,slow", "--slow-fraction", "0.1"])
        .args(["--slow-messages", "100", "--slow-pause-ms", "1500"])
        .args([
            "--max-seconds",
            "90",
            "--phase-timeout-secs",
            "30",
            "--json",
            "--quiet",
        ])
        .output()
        .expect("running densepush-loadtest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not the JSON report ({e}); status {:?}; stderr:\n{stderr}",
            out.status
        )
    });
    assert!(
        out.status.success(),
        "generator failed ({:?}):\n{stderr}",
        out.status
    );
    let slow = &report["slow"];
    has_keys(
        &report,
        "slow",
        &[
            "slow_readers",
            "lossless",
            "closed_with_frame",
            "ended_without_frame",
            "buffered_bytes_peak",
            "outbox_bytes_peak",
            "server_rss_peak",
            "close_frames_written",
            "close_frames_given_up",
            "healthy",
        ],
    );
    assert_eq!(u(slow, "slow_readers"), CONNS / 10);
    assert_eq!(u(slow, "closed_with_frame.1008"), CONNS / 10, "{slow}");
    assert_eq!(slow["ended_without_frame"], serde_json::json!({}), "{slow}");
    assert_eq!(u(slow, "close_frames_written"), CONNS / 10);
    assert_eq!(u(slow, "close_frames_given_up"), 0);
    assert_eq!(u(slow, "healthy.conns_checked"), CONNS - CONNS / 10);
    assert_eq!(u(slow, "healthy.lost"), 0);
    assert_eq!(server.stop().code(), Some(0));
}
