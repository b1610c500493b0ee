//! Slow readers, with real sockets set up as a slow mobile client's (`SO_RCVBUF` and `TCP_MAXSEG` 1460 set
//! before connect): a reader that lags past `websocket.max_outbox_bytes` is told why with a 1008 close frame
//! that arrives even when it reads only after the server gave up on it; every other server-initiated close
//! (kick, drain) gets its frame through a full socket too, or is counted as given up; and the buffer budget
//! counts the memory really held — a frame queued for 1,500 readers once — and returns to zero after them.
//!
//! Sizes: `SLOW_READERS` (default 1,500) slow readers in the budget test.

mod common;

use common::*;
use socket2::SockRef;
use std::io::Write;
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Serialises the tests that hold many sockets.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const MESSAGE_BYTES: usize = 4096;

/// Message `i`: its number, padded to [`MESSAGE_BYTES`].
fn numbered(i: usize) -> String {
    let mut text = format!("seq:{i:06}:");
    text.extend(std::iter::repeat_n('p', MESSAGE_BYTES - text.len()));
    text
}

fn seq_of(payload: &[u8]) -> usize {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|t| t.strip_prefix("seq:"))
        .and_then(|rest| rest.get(..6))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "not a numbered message: {:?}",
                &payload[..payload.len().min(20)]
            )
        })
}

/// An upgraded raw connection of `user` with an 8 KiB receive buffer and a 1460-byte MSS, that reads nothing
/// until the test makes it.
fn slow_reader(server: &Server, user: &str) -> TcpStream {
    let mut stream = slow_reader_to(server.client_addr, 8192);
    upgrade_on(&mut stream, &format!("user={user}"));
    stream
}

/// What a slow reader found when it read at last.
#[derive(Debug, PartialEq, Eq)]
struct Backlog {
    /// Data messages, all numbered in order from 0 (asserted), each complete.
    messages: usize,
    /// The close frame's code, if one came.
    close: Option<u16>,
    /// The connection ended (EOF or reset) after what was read.
    ended: bool,
}

/// Reads a slow reader's backlog: numbered messages in order, then a close frame or the end. Stops after the
/// close frame, or after `expect` messages when `expect` is not 0.
fn read_backlog(stream: &mut TcpStream, expect: usize) -> Backlog {
    let mut read = Backlog {
        messages: 0,
        close: None,
        ended: false,
    };
    while expect == 0 || read.messages < expect {
        match read_frame(stream) {
            Ok(Some((fin, 0x1, payload))) => {
                assert!(fin);
                assert_eq!(seq_of(&payload), read.messages, "a gap in the backlog");
                assert_eq!(payload.len(), MESSAGE_BYTES);
                read.messages += 1;
            }
            Ok(Some((_, 0x9, _))) => continue,
            Ok(Some((_, 0x8, payload))) => {
                read.close = Some(u16::from_be_bytes([payload[0], payload[1]]));
                return read;
            }
            Ok(Some((_, opcode, _))) => panic!("unexpected opcode {opcode:#x}"),
            Ok(None) => {
                read.ended = true;
                return read;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the backlog stopped short: {read:?}");
            }
            // A frame cut short by the end of the connection, or a reset.
            Err(_) => {
                read.ended = true;
                return read;
            }
        }
    }
    read
}

/// After the close frame: what comes next is the end of the connection.
fn assert_ends(stream: &mut TcpStream) {
    assert!(
        matches!(wait_end(stream), End::Eof | End::Reset),
        "the connection stayed open after the close frame"
    );
}

/// Publishes numbered messages to `path` until the counter `metric` passes `before`, then `extra` more;
/// returns how many were published.
fn publish_until(server: &Server, path: &str, metric: &str, before: u64, extra: usize) -> usize {
    let mut admin = server.admin();
    let mut published = 0;
    let mut after = None;
    while after.is_none_or(|at| published < at + extra) {
        assert!(published < 10_000, "{metric} never moved");
        let response = admin.request("POST", path, numbered(published).as_bytes(), &[]);
        assert_eq!(response.status, 202, "{}", response.text());
        published += 1;
        if after.is_none() && server.metric(metric, &[]) > before {
            after = Some(published);
        }
    }
    published
}

#[test]
fn a_reader_that_lags_past_max_outbox_gets_its_backlog_to_a_frame_boundary_then_1008_even_after_the_server_gave_up(
) {
    let server = Server::start(&[
        ("websocket.max_outbox_bytes", "65536"),
        ("admin.max_publish_bytes", "4096"),
        ("websocket.close_timeout_ms", "300"),
        ("websocket.timer_tick_ms", "10"),
        ("log.level", "info"),
    ]);
    let mut slow = slow_reader(&server, "slow");
    let published = publish_until(
        &server,
        "/publish/user/slow",
        "densepush_slow_consumer_closes_total",
        0,
        16,
    );
    // The client answers nothing: at close_timeout_ms the server closes TCP. The close frame is already in
    // the socket's send buffer, grown to take it.
    assert!(
        wait_until(Duration::from_secs(3), || server
            .metric("densepush_connections_open", &[])
            == 0),
        "the slow reader was not dropped at the close deadline"
    );
    assert_eq!(
        server.metric("densepush_close_frames_written_total", &[]),
        1
    );
    assert_eq!(
        server.metric("densepush_close_frames_given_up_total", &[]),
        0
    );
    // Reading at last: every message up to a frame boundary, then the reason, then the end.
    let read = read_backlog(&mut slow, 0);
    assert_eq!(read.close, Some(1008), "{read:?}");
    assert!(read.messages > 0 && read.messages < published, "{read:?}");
    assert_ends(&mut slow);
    eprintln!(
        "lagging reader: {published} published, {} received whole, then 1008",
        read.messages
    );
    assert_eq!(server.metric("densepush_buffered_bytes", &[]), 0);
    assert_eq!(server.metric("densepush_outbox_bytes", &[]), 0);
}

#[test]
fn slow_readers_of_the_same_broadcasts_keep_the_budget_near_the_distinct_frames_and_lose_nothing() {
    let _heavy = heavy();
    let readers = env_count("SLOW_READERS", 1_500);
    let messages = 200usize;
    let server = Server::start(&[("server.reactors", "2"), ("log.level", "info")]);
    let pid = server.pid();
    let mut slow: Vec<TcpStream> = (0..readers)
        .map(|i| slow_reader(&server, &format!("slow{i}")))
        .collect();
    let mut healthy: Vec<Ws> = (0..4)
        .map(|i| server.connect(&format!("user=healthy{i}")))
        .collect();
    let healthy_readers: Vec<_> = healthy
        .drain(..)
        .map(|mut ws| {
            std::thread::spawn(move || {
                for i in 0..messages {
                    assert_eq!(
                        recv_text(&mut ws),
                        numbered(i),
                        "a healthy reader lost a message"
                    );
                }
                ws
            })
        })
        .collect();
    let rss_before = rss_bytes(pid);
    let mut admin = server.admin();
    let mut peak_budget = 0;
    for i in 0..messages {
        let response = admin.request("POST", "/publish/all", numbered(i).as_bytes(), &[]);
        assert_eq!(response.status, 202, "{}", response.text());
        if i % 20 == 19 {
            peak_budget = peak_budget.max(server.metric("densepush_buffered_bytes", &[]));
        }
    }
    for reader in healthy_readers {
        healthy.push(reader.join().expect("healthy reader"));
    }
    assert!(wait_until(Duration::from_secs(30), || {
        server.metric("densepush_commands_pending", &[]) == 0
    }));
    let text = server.metrics_text();
    let budget = metric_in(&text, "densepush_buffered_bytes", &[]);
    let logical = metric_in(&text, "densepush_outbox_bytes", &[]);
    peak_budget = peak_budget.max(budget);
    let rss_growth = rss_bytes(pid).saturating_sub(rss_before);
    // What is really held: each distinct frame once (with its cell), plus per reader its spill and one slot per
    // queued reference (at most 256 slots for 200 frames, 8 bytes each).
    let distinct = messages as u64 * (MESSAGE_BYTES as u64 + 4 + 128);
    let per_reader = 512 + 256 * 8;
    let bound = distinct + readers as u64 * per_reader;
    eprintln!(
        "{readers} slow readers x {messages} x {MESSAGE_BYTES} B: budget {budget} B (peak {peak_budget}, bound {bound}, \
         distinct frames ~{distinct}), logical backlog {logical} B, server RSS +{rss_growth} B"
    );
    assert!(
        peak_budget <= bound,
        "budget use {peak_budget} over {bound}"
    );
    assert!(
        logical > 20 * budget,
        "the readers were not slow: {logical} B queued"
    );
    assert_eq!(
        server.metric("densepush_slow_consumer_closes_total", &[]),
        0
    );
    assert_eq!(server.metric("densepush_budget_closes_total", &[]), 0);
    assert!(
        rss_growth < bound + (24 << 20),
        "RSS grew {rss_growth} B for {budget} B held"
    );
    // Every slow reader, reading at last, gets every message in order: kept open, and lossless.
    let chunks: Vec<Vec<TcpStream>> = {
        let mut chunks: Vec<Vec<TcpStream>> = (0..4).map(|_| Vec::new()).collect();
        for (i, s) in slow.drain(..).enumerate() {
            chunks[i % 4].push(s);
        }
        chunks
    };
    let drained: Vec<_> = chunks
        .into_iter()
        .map(|mut chunk| {
            std::thread::spawn(move || {
                for s in &mut chunk {
                    let read = read_backlog(s, messages);
                    assert_eq!(read.messages, messages, "{read:?}");
                    assert_eq!((read.close, read.ended), (None, false));
                }
                chunk
            })
        })
        .collect();
    for d in drained {
        slow.extend(d.join().expect("slow reader thread"));
    }
    assert_eq!(
        server.metric("densepush_connections_open", &[]) as usize,
        readers + healthy.len()
    );
    // They go: the budget's charge returns to zero.
    drop(slow);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let text = server.metrics_text();
            [
                "densepush_buffered_bytes",
                "densepush_outbox_bytes",
                "densepush_buffers_live",
            ]
            .iter()
            .all(|m| metric_in(&text, m, &[]) == 0)
        }),
        "charge left behind: {}",
        server.metrics_text()
    );
}

#[test]
fn readers_that_leave_with_their_backlog_queued_leave_no_charge_behind() {
    let _heavy = heavy();
    let server = Server::start(&[("log.level", "info")]);
    let mut leaving: Vec<TcpStream> = (0..200)
        .map(|i| slow_reader(&server, &format!("leaving{i}")))
        .collect();
    let mut staying = server.connect("user=staying");
    let mut admin = server.admin();
    for i in 0..100 {
        let response = admin.request("POST", "/publish/all", numbered(i).as_bytes(), &[]);
        assert_eq!(response.status, 202);
        assert_eq!(recv_text(&mut staying), numbered(i));
    }
    // 202 means queued for the reactor, which applies it on its own thread: wait until it has.
    assert!(
        wait_until(Duration::from_secs(5), || server
            .metric("densepush_outbox_bytes", &[])
            > 0),
        "nothing queued"
    );
    assert!(server.metric("densepush_buffered_bytes", &[]) > 0);
    // Half reset, half send a close and leave without reading the answer.
    for (i, stream) in leaving.drain(..).enumerate() {
        if i % 2 == 0 {
            let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        } else {
            let mut stream = stream;
            let _ = write_frame(&mut stream, 0x8, &1000u16.to_be_bytes());
            let _ = stream.flush();
        }
    }
    assert!(
        wait_until(Duration::from_secs(10), || {
            let text = server.metrics_text();
            [
                "densepush_buffered_bytes",
                "densepush_outbox_bytes",
                "densepush_buffers_live",
            ]
            .iter()
            .all(|m| metric_in(&text, m, &[]) == 0)
        }),
        "charge left behind: {}",
        server.metrics_text()
    );
    // The one that stayed still gets messages.
    server.publish("/publish/all", "after");
    assert_eq!(recv_text(&mut staying), "after");
}

#[test]
fn sigterm_flushes_queued_backlogs_within_the_shutdown_timeout_then_1001_for_every_reader() {
    let mut server = Server::start(&[
        ("server.shutdown_timeout_ms", "3000"),
        ("websocket.close_timeout_ms", "1000"),
        ("websocket.timer_tick_ms", "10"),
        ("log.level", "info"),
    ]);
    let messages = 100;
    let mut late = slow_reader(&server, "late");
    let mut never = slow_reader(&server, "never");
    let mut admin = server.admin();
    for i in 0..messages {
        let response = admin.request("POST", "/publish/all", numbered(i).as_bytes(), &[]);
        assert_eq!(response.status, 202);
    }
    assert!(wait_until(Duration::from_secs(5), || {
        server.metric("densepush_commands_pending", &[]) == 0
    }));
    // 202 means queued for the reactor, which applies it on its own thread: wait until it has.
    assert!(
        wait_until(Duration::from_secs(5), || server
            .metric("densepush_outbox_bytes", &[])
            > 0),
        "nothing queued"
    );
    let signalled = Instant::now();
    server.sigterm();
    // One reader comes back within the close deadline: everything, then 1001.
    std::thread::sleep(Duration::from_millis(300));
    let read = read_backlog(&mut late, messages);
    assert_eq!(read.messages, messages, "{read:?}");
    let after = read_backlog(&mut late, 0);
    assert_eq!((after.messages, after.close), (0, Some(1001)), "{after:?}");
    write_frame(&mut late, 0x8, &1001u16.to_be_bytes()).unwrap();
    assert_ends(&mut late);
    // The other never read: the server gave up on it at its close deadline and exited, yet its 1001 is in
    // the socket, behind a whole number of messages.
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("server still running after shutdown_timeout_ms");
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_millis(3500));
    let read = read_backlog(&mut never, 0);
    assert_eq!(read.close, Some(1001), "{read:?}");
    assert!(read.messages < messages, "{read:?}");
    assert_ends(&mut never);
}

#[test]
fn a_kicked_slow_reader_gets_its_close_code_at_once_behind_its_started_message() {
    let server = Server::start(&[
        ("websocket.close_timeout_ms", "300"),
        ("websocket.timer_tick_ms", "10"),
        ("log.level", "info"),
    ]);
    let mut slow = slow_reader(&server, "slow");
    let mut admin = server.admin();
    for i in 0..100 {
        let response = admin.request("POST", "/publish/user/slow", numbered(i).as_bytes(), &[]);
        assert_eq!(response.status, 202);
    }
    // 202 means queued for the reactor, which applies it on its own thread: wait until it has.
    assert!(
        wait_until(Duration::from_secs(5), || server
            .metric("densepush_outbox_bytes", &[])
            > 0),
        "nothing queued"
    );
    let response = server.request(
        "DELETE",
        "/connections/user/slow?code=4001&reason=moved",
        b"",
        &[],
    );
    assert_eq!(response.status, 200, "{}", response.text());
    // The queue is dropped at once and the close frame is in the kernel: nothing is held for the reader.
    assert_eq!(
        server.metric("densepush_close_frames_written_total", &[]),
        1
    );
    assert_eq!(server.metric("densepush_outbox_bytes", &[]), 0);
    assert_eq!(server.metric("densepush_buffered_bytes", &[]), 0);
    let read = read_backlog(&mut slow, 0);
    assert_eq!(read.close, Some(4001), "{read:?}");
    assert!(read.messages < 100);
    write_frame(&mut slow, 0x8, &4001u16.to_be_bytes()).unwrap();
    assert_ends(&mut slow);
}

#[test]
fn a_close_behind_a_remainder_too_large_to_hand_over_is_given_up_at_the_deadline_and_counted() {
    let server = Server::start(&[
        ("websocket.close_timeout_ms", "300"),
        ("websocket.timer_tick_ms", "10"),
        ("log.level", "info"),
    ]);
    let mut slow = slow_reader(&server, "slow");
    // One message of 512 KiB: the socket takes a part; the rest (far over 64 KiB) must wait for the reader.
    let big = "b".repeat(512 << 10);
    server.publish("/publish/user/slow", &big);
    // 202 means queued for the reactor, which applies it on its own thread: wait until it has.
    assert!(wait_until(Duration::from_secs(5), || server
        .metric("densepush_outbox_bytes", &[])
        > 64 << 10));
    let response = server.request("DELETE", "/connections/user/slow", b"", &[]);
    assert_eq!(response.status, 200);
    assert!(
        wait_until(Duration::from_secs(3), || server
            .metric("densepush_connections_open", &[])
            == 0),
        "not dropped at the close deadline"
    );
    assert_eq!(
        server.metric("densepush_close_frames_given_up_total", &[]),
        1
    );
    assert_eq!(
        server.metric("densepush_close_frames_written_total", &[]),
        0
    );
    assert_eq!(server.metric("densepush_buffered_bytes", &[]), 0);
    // The reader gets part of the message and then the end: no close frame could follow it.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut slow, &mut rest);
    assert!(rest.len() < big.len(), "{} bytes", rest.len());
}

#[test]
fn a_ping_waiting_behind_a_backlog_does_not_drop_a_reader_that_reads_and_one_that_stops_gets_1008()
{
    let server = Server::start(&[
        ("websocket.ping_interval_ms", "1000"),
        ("websocket.pong_timeout_ms", "500"),
        ("websocket.close_timeout_ms", "300"),
        ("websocket.max_outbox_bytes", "4194304"),
        ("websocket.timer_tick_ms", "10"),
        ("log.level", "info"),
    ]);
    let mut reading = slow_reader(&server, "reading");
    let mut stopped = slow_reader(&server, "stopped");
    // 1.6 MB each, published before the first ping (1 s after the upgrade), which goes behind all of it.
    let messages = 400;
    let mut admin = server.admin();
    for i in 0..messages {
        let response = admin.request("POST", "/publish/all", numbered(i).as_bytes(), &[]);
        assert_eq!(response.status, 202);
    }
    // 202 means queued for the reactor, which applies it on its own thread: wait until it has.
    assert!(
        wait_until(Duration::from_secs(5), || server
            .metric("densepush_outbox_bytes", &[])
            > 0),
        "nothing queued"
    );
    // One reads about 800 KB/s: it reaches its ping more than one pong timeout after the ping was due. It
    // keeps reading until it has answered a ping.
    let started = Instant::now();
    let (mut received, mut pongs) = (0, 0);
    while received < messages || pongs == 0 {
        let (_, opcode, payload) = read_frame(&mut reading)
            .expect("reading")
            .expect("EOF: the reading client was dropped");
        match opcode {
            0x1 => {
                assert_eq!(seq_of(&payload), received);
                received += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            0x9 => {
                write_frame(&mut reading, 0xA, &payload).unwrap();
                pongs += 1;
            }
            other => panic!("opcode {other:#x} after {received} messages"),
        }
    }
    let took = started.elapsed();
    assert!(
        took > Duration::from_millis(1600),
        "read in {took:?}: too fast to pass a pong deadline"
    );
    assert_eq!(server.metric("densepush_pong_timeouts_total", &[]), 0);
    // The other read nothing: closed as a slow consumer with a frame that tells it, not dropped as silent
    // (at the second pong deadline: the first only notes what it had acknowledged).
    assert!(wait_until(Duration::from_secs(3), || server
        .metric("densepush_slow_consumer_closes_total", &[])
        == 1));
    let read = read_backlog(&mut stopped, 0);
    assert_eq!(read.close, Some(1008), "{read:?}");
    assert_ends(&mut stopped);
    assert_eq!(server.metric("densepush_connections_open", &[]), 1);
}
