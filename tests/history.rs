//! Missed-message recovery on a single node, end to end: the real binary, tungstenite clients that opt into
//! envelopes, reconnect with `since`, and the admin API's `/history` routes.

mod common;

use common::{recv, recv_text, Server, Ws};
use std::time::Duration;
use tungstenite::Message;

/// An envelope or resync notice, parsed.
fn json(ws: &mut Ws) -> serde_json::Value {
    let text = recv_text(ws);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

/// The next message, which must be an envelope: `(epoch, offset, payload)`.
fn envelope(ws: &mut Ws) -> (String, u64, String) {
    let v = json(ws);
    assert!(v.get("type").is_none(), "expected an envelope, got {v}");
    (
        v["e"].as_str().expect("epoch").to_owned(),
        v["o"].as_u64().expect("offset"),
        v["d"].as_str().expect("payload").to_owned(),
    )
}

/// The next message, which must be a resync notice for `stream`: `(epoch, offset)`.
fn resync(ws: &mut Ws, stream: &str) -> (String, u64) {
    let v = json(ws);
    assert_eq!(v["type"], "resync", "expected a resync, got {v}");
    assert_eq!(v["s"], stream);
    (
        v["e"].as_str().unwrap().to_owned(),
        v["o"].as_u64().unwrap(),
    )
}

fn start(history: &[(&str, &str)]) -> Server {
    let mut overrides = vec![("server.reactors", "2")];
    overrides.extend_from_slice(history);
    Server::start(&overrides)
}

#[test]
fn reconnect_gets_exactly_the_missed_messages_in_order_then_live_ones_once() {
    let server = start(&[("history.user", "true"), ("history.size", "1000")]);
    let mut ws = server.connect("user=42&recover=1");
    server.publish("/publish/user/42", "first");
    let (epoch, position, payload) = envelope(&mut ws);
    assert_eq!((position, payload.as_str()), (1, "first"));
    common::close_ws(ws);

    let mut admin = server.admin();
    for i in 0..100 {
        let r = admin.request(
            "POST",
            "/publish/user/42",
            format!("missed {i}").as_bytes(),
            &[],
        );
        assert_eq!(r.status, 202);
    }
    // Messages published while the reconnection and its replay are under way.
    let addr = server.admin_addr;
    let during = std::thread::spawn(move || {
        let mut admin = common::Admin::connect(addr);
        for i in 0..50 {
            let r = admin.request(
                "POST",
                "/publish/user/42",
                format!("during {i}").as_bytes(),
                &[],
            );
            assert_eq!(r.status, 202);
        }
    });
    let mut ws = server.connect(&format!("user=42&since=user:42@{epoch}:{position}"));
    during.join().unwrap();
    server.publish("/publish/user/42", "live");

    let mut expected: Vec<String> = (0..100).map(|i| format!("missed {i}")).collect();
    expected.extend((0..50).map(|i| format!("during {i}")));
    expected.push("live".into());
    for (i, want) in expected.iter().enumerate() {
        let (e, offset, payload) = envelope(&mut ws);
        assert_eq!(e, epoch);
        assert_eq!(
            offset,
            i as u64 + 2,
            "offsets are consecutive, no gap, no duplicate"
        );
        assert_eq!(&payload, want);
    }
    assert!(server.metric("densepush_history_replayed_total", &[]) >= 100);
    assert_eq!(server.metric("densepush_history_resyncs_total", &[]), 0);
}

#[test]
fn client_token_messages_replay_only_to_that_clients_connections() {
    let server = start(&[("history.user", "true")]);
    let mut phone = server.connect("user=7&client=phone&recover=1");
    let mut laptop = server.connect("user=7&client=laptop&recover=1");
    server.publish("/publish/user/7", "hello");
    let (epoch, _, _) = envelope(&mut phone);
    envelope(&mut laptop);
    common::close_ws(phone);
    common::close_ws(laptop);

    server.publish("/publish/user/7/client/phone", "for the phone");
    server.publish("/publish/user/7/client/laptop", "for the laptop");
    server.publish("/publish/user/7", "for both");
    let since = format!("since=user:7@{epoch}:1");
    let mut phone = server.connect(&format!("user=7&client=phone&{since}"));
    let mut laptop = server.connect(&format!("user=7&client=laptop&{since}"));
    let mut bare = server.connect(&format!("user=7&{since}"));
    server.publish("/publish/user/7", "marker");

    let got = |ws: &mut Ws| -> Vec<(u64, String)> {
        let mut out = Vec::new();
        loop {
            let (_, o, d) = envelope(ws);
            let done = d == "marker";
            out.push((o, d));
            if done {
                return out;
            }
        }
    };
    let s = |v: &str| v.to_string();
    assert_eq!(
        got(&mut phone),
        [
            (2, s("for the phone")),
            (4, s("for both")),
            (5, s("marker"))
        ]
    );
    assert_eq!(
        got(&mut laptop),
        [
            (3, s("for the laptop")),
            (4, s("for both")),
            (5, s("marker"))
        ]
    );
    assert_eq!(got(&mut bare), [(4, s("for both")), (5, s("marker"))]);
}

#[test]
fn a_position_named_five_times_is_replayed_once() {
    let server = start(&[("history.user", "true")]);
    let mut ws = server.connect("user=42&recover=1");
    for i in 1..=3 {
        server.publish("/publish/user/42", &format!("m{i}"));
    }
    let (epoch, _, _) = envelope(&mut ws);
    common::close_ws(ws);

    // The same position five times: one replay of 3 messages, not 15 frames.
    let since = vec![format!("user:42@{epoch}:0"); 5].join(",");
    let mut ws = server.connect(&format!("user=42&since={since}"));
    server.publish("/publish/user/42", "marker");
    let mut got = Vec::new();
    loop {
        let (_, offset, payload) = envelope(&mut ws);
        if payload == "marker" {
            break;
        }
        got.push((offset, payload));
    }
    let want: Vec<(u64, String)> = (1..=3).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(got, want, "exactly 3 frames before the marker");
    assert_eq!(server.metric("densepush_history_replayed_total", &[]), 3);
}

#[test]
fn position_evicted_by_size_gets_resync_then_live_messages() {
    let server = start(&[("history.user", "true"), ("history.size", "3")]);
    let mut ws = server.connect("user=1&recover=1");
    server.publish("/publish/user/1", "a");
    let (epoch, _, _) = envelope(&mut ws);
    common::close_ws(ws);
    for i in 0..5 {
        server.publish("/publish/user/1", &format!("m{i}"));
    }
    let mut ws = server.connect(&format!("user=1&since=user:1@{epoch}:1"));
    assert_eq!(resync(&mut ws, "user:1"), (epoch.clone(), 6));
    server.publish("/publish/user/1", "live");
    assert_eq!(envelope(&mut ws), (epoch, 7, "live".into()));
    assert_eq!(
        server.metric("densepush_history_evicted_total", &[("reason", "size")]),
        4,
        "7 messages in a stream of size 3"
    );
}

#[test]
fn unknown_epoch_gets_resync_with_the_current_epoch() {
    let server = start(&[("history.user", "true")]);
    server.publish("/publish/user/1", "a");
    server.publish("/publish/user/1", "b");
    let mut ws = server.connect("user=1&since=user:1@NOTTHAT1:1");
    let (epoch, offset) = resync(&mut ws, "user:1");
    assert_eq!((epoch.len(), offset), (8, 2));
    // The epoch it names is the one live messages carry, and with it the position now works.
    server.publish("/publish/user/1", "c");
    assert_eq!(envelope(&mut ws), (epoch.clone(), 3, "c".into()));
    let mut again = server.connect(&format!("user=1&since=user:1@{epoch}:1"));
    assert_eq!(envelope(&mut again).2, "b");
    assert_eq!(envelope(&mut again).2, "c");
}

#[test]
fn expired_position_gets_resync() {
    let server = start(&[("history.user", "true"), ("history.ttl_secs", "1")]);
    server.publish("/publish/user/1", "old");
    let mut probe = server.connect("user=1&since=user:1@X:0");
    let (epoch, _) = resync(&mut probe, "user:1");
    server.publish("/publish/user/1", "also old");
    std::thread::sleep(Duration::from_millis(1_300));
    let mut ws = server.connect(&format!("user=1&since=user:1@{epoch}:1"));
    // Everything expired, so the stream is gone: its next message starts a new epoch.
    assert_eq!(resync(&mut ws, "user:1"), (String::new(), 0));
    assert!(server.metric("densepush_history_evicted_total", &[("reason", "ttl")]) >= 2);
}

#[test]
fn a_flood_into_many_streams_stays_inside_max_bytes() {
    let max_bytes = 65_536u64;
    let server = start(&[
        ("history.user", "true"),
        ("history.channel", "true"),
        ("history.max_bytes", "65536"),
    ]);
    server.publish("/publish/user/1", "keep me?");
    let mut probe = server.connect("user=1&since=user:1@X:0");
    let (epoch, _) = resync(&mut probe, "user:1");
    let mut admin = server.admin();
    let body = vec![b'x'; 200];
    for i in 0..2_000 {
        let r = admin.request("POST", &format!("/publish/channel/c{i}"), &body, &[]);
        assert_eq!(r.status, 202);
        if i % 250 == 0 {
            assert!(server.metric("densepush_history_bytes", &[]) <= max_bytes);
        }
    }
    let bytes = server.metric("densepush_history_bytes", &[]);
    assert!(
        bytes <= max_bytes && bytes > max_bytes / 2,
        "history bytes {bytes}"
    );
    assert!(server.metric("densepush_history_evicted_total", &[("reason", "bytes")]) > 1_000);
    assert!(server.metric("densepush_history_streams", &[]) < 2_000);
    // The oldest message of all, in another stream, went first.
    let mut ws = server.connect(&format!("user=1&since=user:1@{epoch}:0"));
    resync(&mut ws, "user:1");
}

#[test]
fn binary_messages_arrive_in_binary_envelopes() {
    let server = start(&[("history.all", "true")]);
    let mut ws = server.connect("user=1&recover=1");
    let r = server.request(
        "POST",
        "/publish/all",
        &[0xde, 0xad],
        &[("Content-Type", "application/octet-stream")],
    );
    assert_eq!(r.status, 202);
    let Message::Binary(bytes) = recv(&mut ws) else {
        panic!("expected a binary frame");
    };
    assert_eq!(&bytes[..6], &[1, 0, 3, b'a', b'l', b'l']);
    assert_eq!(bytes[6], 8, "epoch length");
    assert_eq!(&bytes[15..23], &1u64.to_be_bytes());
    assert_eq!(&bytes[23..], &[0xde, 0xad]);
}

#[test]
fn connections_that_do_not_opt_in_get_bare_payloads() {
    let server = start(&[("history.user", "true")]);
    let mut plain = server.connect("user=1");
    let mut wrapped = server.connect("user=1&recover=1");
    server.publish("/publish/user/1", "hi");
    assert_eq!(recv_text(&mut plain), "hi");
    assert_eq!(envelope(&mut wrapped).2, "hi");
}

#[test]
fn without_history_recover_gets_stream_only_envelopes_and_since_is_ignored() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=1&recover=1&since=user:1@E:3");
    server.publish("/publish/channel/none", "x"); // not subscribed: nothing
    server.publish("/publish/user/1", "hi");
    let v = json(&mut ws);
    assert_eq!(v, serde_json::json!({ "s": "user:1", "d": "hi" }));
    let r = server.request("GET", "/history/user:1", b"", &[]);
    assert_eq!(r.status, 404);
}

#[test]
fn the_subprotocol_opts_in_and_is_echoed() {
    let server = start(&[("history.user", "true")]);
    let mut request =
        tungstenite::client::IntoClientRequest::into_client_request(server.ws_url("user=1"))
            .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "densepush.v1".parse().unwrap());
    let stream = std::net::TcpStream::connect(server.client_addr).unwrap();
    stream.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    let (mut ws, response) = tungstenite::client(request, stream).unwrap();
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "densepush.v1"
    );
    server.publish("/publish/user/1", "hi");
    assert_eq!(envelope(&mut ws).1, 1);
}

#[test]
fn a_connection_cannot_recover_streams_it_does_not_receive() {
    let server = start(&[("history.user", "true"), ("history.channel", "true")]);
    server.publish("/publish/user/2", "secret");
    server.publish("/publish/channel/vip", "secret");
    let r = server.request("GET", "/history/user:2", b"", &[]).json();
    let epoch = r["epoch"].as_str().unwrap().to_owned();
    let mut ws = server.connect(&format!(
        "user=1&channels=news&since=user:2@{epoch}:0,channel:vip@{epoch}:0"
    ));
    server.publish("/publish/user/1", "mine");
    assert_eq!(envelope(&mut ws).2, "mine");
}

#[test]
fn admin_reads_and_deletes_history() {
    let server = start(&[("history.user", "true")]);
    server.publish("/publish/user/42", "one");
    let r = server.request(
        "POST",
        "/publish/user/42/client/phone",
        &[0, 1, 2],
        &[("Content-Type", "application/octet-stream")],
    );
    assert_eq!(r.status, 202);
    server.publish("/publish/user/42", "three");

    let page = server.request("GET", "/history/user:42?since=1&limit=1", b"", &[]);
    assert_eq!(page.status, 200, "{}", page.text());
    let page = page.json();
    assert_eq!(
        (page["first"].as_u64(), page["last"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(
        page["messages"],
        serde_json::json!([{ "o": 2, "client": "phone", "binary": true, "data": "AAEC" }])
    );
    let all = server.request("GET", "/history/user%3A42", b"", &[]).json();
    assert_eq!(all["messages"][2]["data"], "three");
    let epoch = all["epoch"].as_str().unwrap().to_owned();

    assert_eq!(
        server
            .request("GET", "/history/user:42?limit=0", b"", &[])
            .status,
        400
    );
    assert_eq!(server.request("GET", "/history/nope", b"", &[]).status, 404);
    assert_eq!(
        server.request("GET", "/history/channel:x", b"", &[]).status,
        404
    );
    assert_eq!(
        server.request("POST", "/history/user:42", b"", &[]).status,
        405
    );

    let deleted = server
        .request("DELETE", "/history/user:42", b"", &[])
        .json();
    assert_eq!(deleted["deleted"], true);
    assert_eq!(
        server.request("GET", "/history/user:42", b"", &[]).status,
        404
    );
    server.publish("/publish/user/42", "fresh");
    let after = server.request("GET", "/history/user:42", b"", &[]).json();
    assert_ne!(
        after["epoch"].as_str().unwrap(),
        epoch,
        "a deleted stream restarts with a new epoch"
    );
    assert_eq!(after["messages"][0]["o"], 1);
}

#[test]
fn idle_recovering_connections_hold_no_buffers() {
    let server = start(&[("history.user", "true")]);
    for i in 0..20 {
        server.publish(&format!("/publish/user/u{i}"), "m");
    }
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut ws = server.connect(&format!("user=u{i}&since=user:u{i}@X:0"));
        resync(&mut ws, &format!("user:u{i}"));
        clients.push(ws);
    }
    assert!(common::wait_until(Duration::from_secs(5), || {
        server.metric("densepush_buffers_live", &[]) == 0
    }));
}

/// The figure in docs/BENCHMARKS.md: process RSS per idle connection with history off, and with history on and
/// every connection recovering (envelopes, one replayed message) before going idle. Ignored by default (it
/// opens 2 × 4,000 sockets); run with `cargo test --test history -- --ignored --nocapture idle_connection_cost`.
#[test]
#[ignore]
fn idle_connection_cost() {
    const N: usize = 4_000;
    let mut figures = Vec::new();
    for history_on in [false, true] {
        let flag = if history_on { "true" } else { "false" };
        let server = Server::start(&[
            ("server.reactors", "2"),
            ("log.level", "warn"),
            ("history.user", flag),
            ("history.all", flag),
        ]);
        server.publish("/publish/all", "before everyone connected");
        for i in 0..200 {
            server.publish(&format!("/publish/user/u{i}"), "some history");
        }
        let warm: Vec<_> = (0..100)
            .map(|i| server.raw_upgrade(&format!("user=w{i}")))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let before = server.metric("densepush_process_resident_bytes", &[]);
        let query = |i: usize| {
            if history_on {
                format!("user=u{i}&since=all@X:0,user:u{i}@X:0")
            } else {
                format!("user=u{i}")
            }
        };
        let conns: Vec<_> = (0..N).map(|i| server.raw_upgrade(&query(i))).collect();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            server.metric("densepush_connections_open", &[]),
            (N + 100) as u64
        );
        assert_eq!(server.metric("densepush_buffers_live", &[]), 0);
        let after = server.metric("densepush_process_resident_bytes", &[]);
        let per_conn = (after.saturating_sub(before)) as f64 / N as f64;
        figures.push((history_on, per_conn));
        eprintln!(
            "history {flag}: {N} idle connections, RSS +{} bytes = {per_conn:.0} bytes per connection; history bytes {}",
            after.saturating_sub(before),
            if history_on {
                server.metric("densepush_history_bytes", &[])
            } else {
                0
            }
        );
        drop(conns);
        drop(warm);
    }
}

#[test]
fn reconnecting_again_and_again_during_a_flood_never_skips_or_repeats() {
    const TOTAL: u64 = 1_500;
    let server = start(&[("history.user", "true"), ("history.size", "5000")]);
    server.publish("/publish/user/9", "0");
    let page = server.request("GET", "/history/user:9", b"", &[]).json();
    let epoch = page["epoch"].as_str().unwrap().to_owned();
    let addr = server.admin_addr;
    let flood = std::thread::spawn(move || {
        let mut admin = common::Admin::connect(addr);
        for i in 1..TOTAL {
            let r = admin.request("POST", "/publish/user/9", i.to_string().as_bytes(), &[]);
            assert_eq!(r.status, 202);
        }
    });
    let mut last = 0u64;
    let mut sessions = 0;
    while last < TOTAL {
        let mut ws = server.connect(&format!("user=9&since=user:9@{epoch}:{last}"));
        sessions += 1;
        for _ in 0..(7 + sessions % 50) {
            if last == TOTAL {
                break;
            }
            let (e, offset, payload) = envelope(&mut ws);
            assert_eq!(e, epoch);
            assert_eq!(offset, last + 1, "session {sessions}: gap or duplicate");
            assert_eq!(payload, last.to_string());
            last = offset;
        }
        drop(ws); // abrupt, like a phone losing its network
    }
    flood.join().unwrap();
    assert!(sessions > 20, "only {sessions} reconnections");
}
