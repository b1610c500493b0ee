//! The admin listener's bounds against hostile or careless clients, on the real binary: pipelined requests
//! from a client that never reads, bodies sent without the key, silent and idle connections, the connection
//! cap, and a long pipelined burst. Each test asserts a bound (memory, a count, a close), never a duration.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const KEY: &str = "admin-key-0123456789";

/// A raw connection to the admin listener, with the harness's I/O timeouts.
fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.admin_addr).expect("connecting to admin");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// Reads until the server closes the connection; panics if it stays open for the I/O timeout.
fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "the server kept the connection open; got {:?}",
                    String::from_utf8_lossy(&got)
                )
            }
            // A reset after the answer counts as closed too.
            Err(_) => return got,
        }
    }
}

/// Counts `needle` in a stream read in chunks, carrying a partial match over chunk boundaries.
struct Counter {
    needle: &'static [u8],
    tail: Vec<u8>,
    count: usize,
}

impl Counter {
    fn feed(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        let n = self.needle.len();
        let mut i = 0;
        while i + n <= self.tail.len() {
            if &self.tail[i..i + n] == self.needle {
                self.count += 1;
                i += n;
            } else {
                i += 1;
            }
        }
        // What is left after `i` is shorter than the needle: it may be the start of one.
        self.tail.drain(..i);
    }
}

/// Waits until the server's count of 2xx admin answers stops moving, and returns it, not counting the
/// `/metrics` requests this makes (each is counted once answered, so a settled count moves by exactly one).
fn settled_2xx(server: &Server) -> u64 {
    let mut admin = server.admin();
    let mut read = || {
        let text = admin.request("GET", "/metrics", b"", &[]).text();
        metric_in(&text, "densepush_admin_requests_total", &[("class", "2xx")])
    };
    let first = read();
    let (mut mine, mut last) = (0, first);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = read();
        mine += 1;
        if now == last + 1 {
            return now - mine;
        }
        last = now;
    }
}

#[test]
fn pipelined_requests_from_a_client_that_never_reads_keep_memory_bounded() {
    let server = Server::start(&[]);
    // Warm the path (the dashboard page, metrics) so the baseline includes what one answer costs.
    assert_eq!(server.request("GET", "/", b"", &[]).status, 200);
    let before_2xx = settled_2xx(&server);
    let before = rss_bytes(server.pid());

    // 4,000 pipelined requests for the 12 KB dashboard page in one write (108 KB), never reading: answered in
    // full they would be 48 MB.
    let mut stream = connect(&server);
    stream
        .write_all(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(4000))
        .unwrap();
    let answered = settled_2xx(&server) - before_2xx;
    let grown = rss_bytes(server.pid()).saturating_sub(before);
    eprintln!(
        "while unread: {answered} answered (into the kernel's socket buffers), RSS +{grown} B"
    );
    assert!(
        answered < 4000,
        "answered everything without reads: {answered}"
    );
    assert!(grown < 8 << 20, "server RSS grew by {grown} bytes");

    // Once the client reads, the rest is answered: a bound, not a loss.
    let mut pages = Counter {
        needle: b"HTTP/1.1 200 OK\r\n",
        tail: Vec::new(),
        count: 0,
    };
    let mut chunk = vec![0u8; 64 * 1024];
    while pages.count < 4000 {
        let n = stream.read(&mut chunk).expect("reading answers");
        assert_ne!(n, 0, "closed after {} answers", pages.count);
        pages.feed(&chunk[..n]);
    }
    assert_eq!(pages.count, 4000);
}

#[test]
fn bodies_without_the_key_are_refused_at_the_head_and_never_buffered() {
    let server = Server::start(&[("admin.api_key", KEY)]);
    assert_eq!(server.request("GET", "/healthz", b"", &[]).status, 200);
    let before = rss_bytes(server.pid());
    let head = b"POST /publish/all HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n";
    let body = vec![b'x'; (1 << 20) - 1];

    // Ten send the head and wait: the 401 comes before any byte of the body.
    let mut waiting: Vec<TcpStream> = (0..10).map(|_| connect(&server)).collect();
    for stream in &mut waiting {
        stream.write_all(head).unwrap();
        let answer = read_head(stream);
        assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
        assert!(answer.contains("Connection: close"), "{answer}");
    }
    // Ten send the head and a near-complete body at once, as the probe did, and read afterwards.
    let mut eager: Vec<TcpStream> = (0..10).map(|_| connect(&server)).collect();
    for stream in &mut eager {
        stream.write_all(head).unwrap();
        // The server discards what follows a refused head; a reset once it stops discarding is fine too.
        let _ = stream.write_all(&body);
    }
    // The first ten send their bodies late: discarded too.
    for stream in &mut waiting {
        let _ = stream.write_all(&body);
    }
    let grown = rss_bytes(server.pid()).saturating_sub(before);
    eprintln!("20 refused 1 MiB bodies: RSS +{grown} B");
    assert!(grown < 4 << 20, "server RSS grew by {grown} bytes");
    for stream in &mut eager {
        let answer = String::from_utf8_lossy(&read_until_closed(stream)).into_owned();
        assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    }
    for stream in &mut waiting {
        read_until_closed(stream);
    }
    let auth = format!("Bearer {KEY}");
    let text = server
        .request("GET", "/metrics", b"", &[("Authorization", &auth)])
        .text();
    assert!(metric_in(&text, "densepush_admin_requests_total", &[("class", "4xx")]) >= 20);
    // And with the key, the same request is accepted.
    let response = server.request("POST", "/publish/all", b"ok", &[("Authorization", &auth)]);
    assert_eq!(response.status, 202, "{}", response.text());
}

#[test]
fn silent_connections_and_slow_heads_are_closed_at_the_header_timeout() {
    let server = Server::start(&[("admin.header_timeout_ms", "300")]);
    let mut silent: Vec<TcpStream> = (0..5).map(|_| connect(&server)).collect();
    let mut slow = connect(&server);
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHos").unwrap();
    for stream in silent.iter_mut().chain([&mut slow]) {
        assert_eq!(read_until_closed(stream), b"", "closed without an answer");
    }
    let header = [("kind", "header")];
    assert_eq!(server.metric("densepush_admin_timeouts_total", &header), 6);
    // A client that sends its request in time is served as before.
    assert_eq!(server.request("GET", "/healthz", b"", &[]).status, 200);
}

#[test]
fn idle_keep_alive_connections_are_closed_at_the_idle_timeout() {
    let server = Server::start(&[("admin.idle_timeout_ms", "300")]);
    let mut admin = server.admin();
    assert_eq!(admin.request("GET", "/healthz", b"", &[]).status, 200);
    assert_eq!(admin.request("GET", "/healthz", b"", &[]).status, 200);
    assert!(
        admin.is_closed_by_server(),
        "still open after the idle timeout"
    );
    assert_eq!(
        server.metric("densepush_admin_timeouts_total", &[("kind", "idle")]),
        1
    );
}

#[test]
fn connections_over_the_cap_get_503_and_are_closed() {
    let server = Server::start(&[("admin.max_connections", "3")]);
    let mut metrics = server.admin();
    let mut held: Vec<Admin> = (0..2).map(|_| server.admin()).collect();
    for admin in &mut held {
        assert_eq!(admin.request("GET", "/healthz", b"", &[]).status, 200);
    }
    for _ in 0..2 {
        let mut over = connect(&server);
        let answer = String::from_utf8_lossy(&read_until_closed(&mut over)).into_owned();
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("Retry-After: 1"), "{answer}");
    }
    let text = metrics.request("GET", "/metrics", b"", &[]).text();
    assert_eq!(
        metric_in(&text, "densepush_admin_connections_refused_total", &[]),
        2
    );
    assert_eq!(metric_in(&text, "densepush_admin_connections", &[]), 3);

    // A slot that frees up is taken by the next connection.
    drop(held.pop());
    assert!(wait_until(Duration::from_secs(5), || {
        let text = metrics.request("GET", "/metrics", b"", &[]).text();
        metric_in(&text, "densepush_admin_connections", &[]) == 2
    }));
    assert_eq!(server.request("GET", "/healthz", b"", &[]).status, 200);
}

#[test]
fn forty_thousand_pipelined_requests_are_all_answered() {
    let server = Server::start(&[]);
    const REQUESTS: usize = 40_000;
    let mut stream = connect(&server);
    let mut writer = stream.try_clone().unwrap();
    // The client writes while it reads: the server stops reading whenever 64 KiB of answers wait.
    let sender = std::thread::spawn(move || {
        writer
            .write_all(&b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(REQUESTS))
            .unwrap();
    });
    let mut answers = Counter {
        needle: b"HTTP/1.1 200 OK\r\n",
        tail: Vec::new(),
        count: 0,
    };
    let mut chunk = vec![0u8; 64 * 1024];
    while answers.count < REQUESTS {
        let n = stream.read(&mut chunk).expect("reading answers");
        assert_ne!(n, 0, "closed after {} answers", answers.count);
        answers.feed(&chunk[..n]);
    }
    sender.join().unwrap();
    assert_eq!(answers.count, REQUESTS);
    assert!(
        server.metric("densepush_admin_requests_total", &[("class", "2xx")]) >= REQUESTS as u64
    );
}
