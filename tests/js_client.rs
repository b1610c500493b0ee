//! Runs the JavaScript tests in `clients/js/test` against the real binary: the client in Node 20 with `ws`
//! (kick, restart, network drop, dead path, 401), the client in headless Chromium (kick, restart, network drop;
//! its fallback to Server-Sent Events behind a proxy that blocks upgrades; permessage-deflate negotiated by
//! Chromium) and the admin dashboard in headless Chromium. The Node harness starts and restarts the server itself on
//! fixed ports (a restart must come back where the clients reconnect), so it gets the binary's path in
//! `DP_TEST_BIN`.
//!
//! Needs `node` (20+), `npm ci` in `clients/js` and `/usr/bin/chromium`: `scripts/test.sh` installs them.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

/// One node run at a time: each starts servers and possibly Chromium, and the test machine may have 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn node_test(file: &str) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js");
    assert!(
        dir.join("node_modules/ws").is_dir() && dir.join("node_modules/playwright-core").is_dir(),
        "clients/js/node_modules is missing: run `npm ci` in clients/js (scripts/test.sh does)"
    );
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .args(["--test", "--test-reporter=spec", file])
        .env("DP_TEST_BIN", env!("CARGO_BIN_EXE_densepush"));
    let output = cmd
        .output()
        .expect("running node (Node.js 20+ must be installed)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node --test {file} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    println!("{stdout}");
}

#[test]
fn js_client_in_node() {
    node_test("test/client.test.mjs");
}

#[test]
fn js_client_in_headless_chromium() {
    node_test("test/browser.test.mjs");
}

#[test]
fn js_client_falls_back_to_sse_in_headless_chromium() {
    node_test("test/sse.test.mjs");
}

#[test]
fn dashboard_in_headless_chromium() {
    node_test("test/dashboard.test.mjs");
}
