//! The admin dashboard's HTTP side: the page at `/` and `/dashboard`, and `GET /stats` (the browser side is
//! tested in `clients/js/test/dashboard.test.mjs`, run by `tests/js_client.rs`).

mod common;

use common::*;
use std::time::Duration;

#[test]
fn root_and_dashboard_serve_the_self_contained_page() {
    let server = Server::start(&[]);
    for path in ["/", "/dashboard"] {
        let page = server.request("GET", path, b"", &[]);
        assert_eq!(page.status, 200, "{path}");
        assert!(page
            .header("content-type")
            .unwrap()
            .starts_with("text/html"));
        let html = page.text();
        assert!(html.contains("<canvas id=\"chart-deliveries\""));
        // No network at run time: nothing is loaded from anywhere else.
        assert!(
            !html.contains("http://") && !html.contains("https://") && !html.contains("src=\"")
        );
        assert!(page
            .header("content-security-policy")
            .unwrap()
            .contains("connect-src 'self'"));
    }
}

#[test]
fn stats_counts_connections_deliveries_and_publishes() {
    let server = Server::start(&[("server.reactors", "2")]);
    let mut a = server.connect("user=a&channels=news");
    let mut b = server.connect("user=b&channels=news");
    server.publish("/publish/channel/news", "hi");
    assert_eq!(recv_text(&mut a), "hi");
    assert_eq!(recv_text(&mut b), "hi");
    // A reactor adds its deliveries once per publish, after writing to every recipient: a client can hold
    // the frame a moment before the counter moves.
    assert!(wait_until(IO_TIMEOUT, || server
        .metric("densepush_frames_delivered_total", &[])
        == 2));
    let stats = server.request("GET", "/stats", b"", &[]).json();
    assert_eq!(stats["connections"]["open"], 2.0);
    assert_eq!(
        stats["connections"]["per_reactor"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(stats["frames_delivered"], 2.0);
    assert_eq!(stats["published"]["channel"], 1.0);
    assert_eq!(stats["handshakes"]["accepted"], 2.0);
    assert!(stats["handshakes"]["rejected"].as_object().unwrap().len() >= 8);
    assert!(stats["rss_bytes"].as_f64().unwrap() > 0.0);
    assert!(stats["bytes_per_connection"].as_f64().unwrap() > 0.0);
    assert!(stats["cluster"].is_null());
    assert!(stats["time_ms"].as_u64().unwrap() > 1_600_000_000_000);
}

#[test]
fn stats_follows_closes() {
    let server = Server::start(&[]);
    let ws = server.connect("user=gone");
    close_ws(ws);
    assert!(wait_until(Duration::from_secs(2), || {
        server.request("GET", "/stats", b"", &[]).json()["connections"]["open"] == 0.0
    }));
    let stats = server.request("GET", "/stats", b"", &[]).json();
    assert_eq!(stats["closes"]["client"], 1.0);
}

#[test]
fn with_api_key_stats_needs_it_but_the_page_does_not() {
    let key = "k-123";
    let server = Server::start(&[("admin.api_key", key)]);
    assert_eq!(server.request("GET", "/", b"", &[]).status, 200);
    assert_eq!(server.request("GET", "/stats", b"", &[]).status, 401);
    let bearer = format!("Bearer {key}");
    let stats = server.request("GET", "/stats", b"", &[("Authorization", &bearer)]);
    assert_eq!(stats.status, 200);
    assert_eq!(stats.json()["connections"]["open"], 0.0);
}

#[test]
fn history_memory_is_reported_when_history_is_on() {
    let server = Server::start(&[("history.all", "true")]);
    server.publish("/publish/all", "kept");
    let stats = server.request("GET", "/stats", b"", &[]).json();
    assert!(stats["history"]["bytes"].as_f64().unwrap() > 0.0);
    assert_eq!(stats["history"]["messages"], 1.0);
}
