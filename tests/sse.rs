//! Server-Sent Events end to end: `GET /sse` on the client listener with the same identity rules as `/ws`,
//! every publish kind as events (`curl -N` and a raw socket), ids and resume through `Last-Event-ID` or
//! `?lastEventId=`, `resync`, keepalive comments, kick (`event: close`), drain (SIGTERM), and a slow reader
//! whose stream ends and is counted. Chromium's EventSource is in `js_client.rs`.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Opens `/sse?query` with `extra` header lines; the stream after the response head, and the head.
fn open_sse(server: &Server, query: &str, extra: &[&str]) -> (TcpStream, String) {
    let mut stream = server.raw();
    let mut head =
        format!("GET /sse?{query} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n");
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let response = read_head(&mut stream);
    (stream, response)
}

/// A stream that opened with 200; its `retry:` preamble read.
fn sse(server: &Server, query: &str, extra: &[&str]) -> TcpStream {
    let (mut stream, head) = open_sse(server, query, extra);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/event-stream\r\n"),
        "{head}"
    );
    let preamble = read_event(&mut stream).expect("retry");
    assert!(preamble.starts_with("retry: "), "{preamble}");
    stream
}

/// The next event (or comment) block, without its blank line; `None` at EOF.
fn read_event(stream: &mut TcpStream) -> Option<String> {
    let mut block = Vec::new();
    let mut byte = [0u8; 1];
    while !block.ends_with(b"\n\n") {
        match stream.read(&mut byte) {
            Ok(0) => return None,
            Ok(_) => block.push(byte[0]),
            Err(e) => panic!(
                "reading an event after {:?}: {e}",
                String::from_utf8_lossy(&block)
            ),
        }
    }
    block.truncate(block.len() - 2);
    Some(String::from_utf8(block).unwrap())
}

/// The next event that is not a keepalive comment.
fn next_event(stream: &mut TcpStream) -> Option<String> {
    loop {
        let event = read_event(stream)?;
        if !event.starts_with(':') {
            return Some(event);
        }
    }
}

fn field<'a>(event: &'a str, name: &str) -> Option<&'a str> {
    event
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": ")))
}

#[test]
fn every_publish_kind_arrives_as_an_event() {
    let server = Server::start(&[]);
    let mut stream = sse(&server, "user=42&client=phone&channels=news", &[]);
    server.publish("/publish/user/42", "to user 42");
    server.publish("/publish/user/42/client/tablet", "to another device");
    server.publish("/publish/user/42/client/phone", "line one\nline two");
    server.publish("/publish/channel/sports", "to another channel");
    server.publish("/publish/channel/news", "breaking news");
    let response = server.request(
        "POST",
        "/publish/user/42",
        &[0, 1, 2, 255],
        &[("Content-Type", "application/octet-stream")],
    );
    assert_eq!(response.status, 202);
    server.publish("/publish/all", "to everyone ✓");
    assert_eq!(next_event(&mut stream).unwrap(), "data: to user 42");
    assert_eq!(
        next_event(&mut stream).unwrap(),
        "data: line one\ndata: line two"
    );
    assert_eq!(next_event(&mut stream).unwrap(), "data: breaking news");
    assert_eq!(
        next_event(&mut stream).unwrap(),
        "event: binary\ndata: AAEC/w=="
    );
    assert_eq!(next_event(&mut stream).unwrap(), "data: to everyone ✓");
    assert_eq!(server.metric("densepush_connections_sse", &[]), 1);
    assert_eq!(server.metric("densepush_connections_open", &[]), 1);
}

#[test]
fn curl_follows_the_stream() {
    let server = Server::start(&[]);
    let url = format!("http://{}/sse?user=7", server.client_addr);
    let mut curl = Command::new("curl")
        .args(["-N", "-s", "--max-time", "20", &url])
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let mut lines = BufReader::new(curl.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("retry: "));
    assert!(wait_until(Duration::from_secs(5), || server
        .metric("densepush_connections_sse", &[])
        == 1));
    server.publish("/publish/user/7", "hello curl");
    server.publish("/publish/all", "{\"to\":\"all\"}");
    let mut data = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            data.push(d.to_owned());
            if data.len() == 2 {
                break;
            }
        }
    }
    assert_eq!(data, ["hello curl", "{\"to\":\"all\"}"]);
    let _ = curl.kill();
    let _ = curl.wait();
}

#[test]
fn the_same_identity_rules_refuse_with_the_same_statuses() {
    let server = Server::start(&[
        ("auth.mode", "jwt"),
        ("auth.jwt_secret", "0123456789abcdef0123456789abcdef-sse"),
        ("server.allowed_origins", "[\"https://app.example.com\"]"),
    ]);
    let (_, head) = open_sse(&server, "token=nope", &[]);
    assert_eq!(status_of(&head), 401, "{head}");
    let token = server.token(&["--user", "42"]);
    let (_, head) = open_sse(
        &server,
        &format!("token={token}"),
        &["Origin: https://evil.example.com"],
    );
    assert_eq!(status_of(&head), 403, "{head}");
    let mut ok = sse(
        &server,
        "",
        &[
            &format!("Authorization: Bearer {token}"),
            "Origin: https://app.example.com",
        ],
    );
    server.publish("/publish/user/42", "bearer works");
    assert_eq!(next_event(&mut ok).unwrap(), "data: bearer works");
    let (_, head) = open_sse(
        &server,
        &format!("token={token}"),
        &["Origin: https://app.example.com"],
    );
    assert!(
        head.contains("\r\nAccess-Control-Allow-Origin: https://app.example.com\r\n"),
        "{head}"
    );
    let off = Server::start(&[("server.sse_path", "")]);
    let (_, head) = open_sse(&off, "user=a", &[]);
    assert_eq!(status_of(&head), 404, "{head}");
}

#[test]
fn ids_resume_through_last_event_id_or_the_query_and_stale_ones_resync() {
    let server = Server::start(&[("history.user", "true"), ("server.sse_retry_ms", "1234")]);
    let (mut first, _) = open_sse(&server, "user=42", &[]);
    assert_eq!(read_event(&mut first).unwrap(), "retry: 1234");
    for i in 1..=3 {
        server.publish("/publish/user/42", &format!("m{i}"));
    }
    let one = next_event(&mut first).unwrap();
    let id = field(&one, "id")
        .expect("an id when history is on")
        .to_owned();
    assert!(id.starts_with("user:42@") && id.ends_with(":1"), "{id}");
    drop(first);
    // The browser's header after a cut: what followed m1, then live.
    let mut back = sse(&server, "user=42", &[&format!("Last-Event-ID: {id}")]);
    let two = next_event(&mut back).unwrap();
    assert!(two.ends_with("data: m2"), "{two}");
    assert!(next_event(&mut back).unwrap().ends_with("data: m3"));
    server.publish("/publish/user/42", "m4");
    assert!(next_event(&mut back).unwrap().ends_with("data: m4"));
    // The query form, for clients that cannot set headers.
    let three = id.replace(":1", ":3");
    let mut query = sse(
        &server,
        &format!(
            "user=42&lastEventId={}",
            three.replace(':', "%3A").replace('@', "%40")
        ),
        &[],
    );
    assert!(next_event(&mut query).unwrap().ends_with("data: m4"));
    // An epoch the server does not know: one resync event, whose id is where the stream goes on.
    let mut stale = sse(&server, "user=42", &["Last-Event-ID: user:42@Zz9Zz9Zz:2"]);
    let resync = next_event(&mut stale).unwrap();
    assert_eq!(field(&resync, "event"), Some("resync"), "{resync}");
    assert!(field(&resync, "data")
        .unwrap()
        .contains("\"type\":\"resync\""));
    assert!(field(&resync, "id").unwrap().ends_with(":4"), "{resync}");
}

#[test]
fn keepalive_comments_flow_every_ping_interval() {
    let server = Server::start(&[
        ("websocket.ping_interval_ms", "200"),
        ("websocket.pong_timeout_ms", "100"),
        ("websocket.timer_tick_ms", "10"),
    ]);
    let mut stream = sse(&server, "user=a", &[]);
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(read_event(&mut stream).unwrap(), ":");
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
    // Nobody answers a keepalive, and nobody is cut for it.
    assert_eq!(server.metric("densepush_pong_timeouts_total", &[]), 0);
    server.publish("/publish/user/a", "still here");
    assert_eq!(next_event(&mut stream).unwrap(), "data: still here");
}

#[test]
fn a_kick_ends_the_stream_with_a_close_event() {
    let server = Server::start(&[]);
    let mut stream = sse(&server, "user=42", &[]);
    let response = server.request(
        "DELETE",
        "/connections/user/42?code=4001&reason=token+revoked",
        b"",
        &[],
    );
    assert_eq!(response.json()["closed"], 1);
    let close = next_event(&mut stream).unwrap();
    assert_eq!(
        close,
        "event: close\ndata: {\"code\":4001,\"reason\":\"token revoked\"}"
    );
    assert_eq!(next_event(&mut stream), None, "the stream ends");
    assert!(wait_until(Duration::from_secs(2), || server
        .metric("densepush_connections_sse", &[])
        == 0));
}

#[test]
fn a_drain_flushes_then_ends_the_stream() {
    let mut server = Server::start(&[]);
    let mut stream = sse(&server, "user=42", &[]);
    server.publish("/publish/all", "last words");
    server.sigterm();
    assert_eq!(next_event(&mut stream).unwrap(), "data: last words");
    assert_eq!(
        next_event(&mut stream),
        None,
        "ends without a close event: EventSource reconnects"
    );
    let status = server.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_slow_reader_is_ended_and_counted() {
    let server = Server::start(&[
        ("websocket.max_outbox_bytes", "65536"),
        ("admin.max_publish_bytes", "65536"),
    ]);
    let mut stream = tiny_window_stream(&server);
    stream
        .write_all(b"GET /sse?user=slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut healthy = sse(&server, "user=fast", &[]);
    assert!(wait_until(Duration::from_secs(2), || server
        .metric("densepush_connections_sse", &[])
        == 2));
    let body = "x".repeat(16 << 10);
    for _ in 0..64 {
        server.publish("/publish/all", &body);
        if server.metric("densepush_sse_slow_consumer_closes_total", &[]) == 1 {
            break;
        }
    }
    assert!(wait_until(Duration::from_secs(5), || server
        .metric("densepush_sse_slow_consumer_closes_total", &[])
        == 1));
    assert_eq!(
        server.metric("densepush_slow_consumer_closes_total", &[]),
        1
    );
    // The healthy reader is untouched.
    assert!(next_event(&mut healthy).unwrap().starts_with("data: xxx"));
    // The slow one reads what got through, then the end of the stream.
    let rest = read_to_close(&mut stream);
    assert!(
        rest.starts_with(b"HTTP/1.1 200 OK"),
        "{:?}",
        &rest[..rest.len().min(40)]
    );
}
