//! wss:// end to end: the real binary with `[tls]` on, real TLS clients (tungstenite over rustls, and rustls
//! driven by hand where a test must put its own bytes on the wire), certificates made by the test (rcgen).
//!
//! What works over ws:// works over wss:// (every publish kind, kicks, the SIGTERM drain, recovery, big
//! messages, slow consumers); the TLS parts have their own behaviour (resumption, the byte and session
//! gauges, certificate reload on SIGHUP); and every kind of bad input ends the connection with the outcome
//! and the `densepush_tls_failures_total` reason the issue asks for.

mod common;

use common::*;
use rustls::{AlertDescription, HandshakeKind};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

/// How long a counter or gauge may take to reach the value a test waits for (the server updates them on
/// its own threads; the machine may be busy).
const SETTLE: Duration = Duration::from_secs(5);

/// Waits until the metric (summed over `labels`) equals `want`; panics with the last value otherwise.
fn wait_metric(server: &Server, name: &str, labels: &[(&str, &str)], want: u64) {
    let mut last = 0;
    let reached = wait_until(SETTLE, || {
        last = server.metric(name, labels);
        last == want
    });
    assert!(reached, "{name}{labels:?} is {last}, expected {want}");
}

/// The TLS failure counter for `reason` reaches 1, and no other reason was counted.
fn assert_only_failure(server: &Server, reason: &str) {
    wait_metric(
        server,
        "densepush_tls_failures_total",
        &[("reason", reason)],
        1,
    );
    assert_eq!(
        server.metric("densepush_tls_failures_total", &[]),
        1,
        "other failure reasons counted:\n{}",
        server.metrics_text()
    );
}

/// A hand-driven TLS connection whose WebSocket upgrade (as `user`) is done.
fn upgraded(server: &Server, user: &str) -> RawTls {
    let mut tls = server.tls_handshake();
    tls.upgrade(&format!("user={user}"));
    tls
}

/// The first certificate the server presented on a wss connection.
fn peer_certificate(ws: &Wss) -> Vec<u8> {
    ws.get_ref()
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .to_vec()
}

/// The certificate a new connection (fresh client configuration: a full handshake) is served.
fn certificate_of_a_new_connection(server: &Server) -> Vec<u8> {
    let ws = server
        .try_connect_wss_with(server.pki().client_config(), "user=probe")
        .expect("a new wss connection");
    let cert = peer_certificate(&ws);
    close_ws(ws);
    cert
}

// ---- what works over ws:// works over wss:// ------------------------------------------------------------

#[test]
fn every_publish_kind_reaches_wss_clients_and_only_them() {
    let server = Server::start_tls(&[]);
    let mut phone = server.connect_wss("user=42&client=phone&channels=news");
    let mut other = server.connect_wss("user=43");
    server.publish("/publish/user/42", "to user 42");
    server.publish("/publish/user/42/client/tablet", "to another device");
    server.publish("/publish/user/43", "to user 43");
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

    assert_eq!(recv_text(&mut phone), "to user 42");
    assert_eq!(recv_text(&mut phone), "to the phone");
    assert_eq!(recv_text(&mut phone), "breaking news");
    assert_eq!(recv(&mut phone), Message::Binary(blob.into()));
    assert_eq!(recv_text(&mut phone), "to everyone ✓");
    assert_eq!(recv_text(&mut other), "to user 43");
    assert_eq!(recv_text(&mut other), "to everyone ✓");
    assert_next_is_marker(&server, &mut [&mut phone, &mut other], "marker");
}

#[test]
fn kick_with_a_code_and_reason_reaches_the_wss_client() {
    let server = Server::start_tls(&[]);
    let mut ws = server.connect_wss("user=42&client=phone");
    let response = server.request(
        "DELETE",
        "/connections/user/42/client/phone?code=4001&reason=token+revoked",
        b"",
        &[],
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json(),
        serde_json::json!({"closed": 1, "code": 4001})
    );
    let close = recv_close(&mut ws).expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::from(4001));
    assert_eq!(close.reason, "token revoked");
    finish_close(&mut ws);
    wait_metric(&server, "densepush_connections_open", &[], 0);
}

#[test]
fn sigterm_drains_wss_clients_with_1001_then_close_notify_and_exits_0() {
    let mut server = Server::start_tls(&[]);
    let mut ws = server.connect_wss("user=42");
    server.publish("/publish/all", "last words");
    server.sigterm();
    assert_eq!(recv_text(&mut ws), "last words");
    let close = recv_close(&mut ws).expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Away);
    finish_close(&mut ws);
    // The TLS session ended cleanly: close_notify, not a bare TCP close (rustls reports that as
    // UnexpectedEof).
    let mut rest = [0u8; 64];
    match ws.get_mut().read(&mut rest) {
        Ok(0) => {}
        other => {
            panic!("expected the end of a TLS session closed with close_notify, got {other:?}")
        }
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server exits after draining");
    assert!(status.success(), "exit {status:?}");
}

#[test]
fn reconnect_over_wss_with_since_gets_the_missed_messages_in_order() {
    let server = Server::start_tls(&[("history.user", "true")]);
    let mut ws = server.connect_wss("user=42&recover=1");
    server.publish("/publish/user/42", "first");
    let envelope: serde_json::Value =
        serde_json::from_str(&recv_text(&mut ws)).expect("a JSON envelope");
    assert_eq!(
        (envelope["o"].as_u64(), envelope["d"].as_str()),
        (Some(1), Some("first"))
    );
    let epoch = envelope["e"].as_str().expect("an epoch").to_string();
    close_ws(ws);

    for i in 0..20 {
        server.publish("/publish/user/42", &format!("missed {i}"));
    }
    let mut ws = server.connect_wss(&format!("user=42&since=user:42@{epoch}:1"));
    server.publish("/publish/user/42", "live");
    let mut expected: Vec<String> = (0..20).map(|i| format!("missed {i}")).collect();
    expected.push("live".into());
    for (i, want) in expected.iter().enumerate() {
        let envelope: serde_json::Value =
            serde_json::from_str(&recv_text(&mut ws)).expect("a JSON envelope");
        assert_eq!(envelope["e"], epoch.as_str());
        assert_eq!(envelope["o"], i as u64 + 2, "no gap, no duplicate");
        assert_eq!(envelope["d"], want.as_str());
    }
    assert_eq!(server.metric("densepush_history_replayed_total", &[]), 20);
}

#[test]
fn a_1_mib_binary_publish_arrives_intact_over_wss() {
    let server = Server::start_tls(&[]);
    let mut ws = server.connect_wss("user=42");
    // Not a repeating pattern of a record's length: a misplaced record would show.
    let blob: Vec<u8> = (0..1usize << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let response = server.request(
        "POST",
        "/publish/user/42",
        &blob,
        &[("Content-Type", "application/octet-stream")],
    );
    assert_eq!(response.status, 202, "{}", response.text());
    match recv(&mut ws) {
        Message::Binary(got) => {
            assert_eq!(got.len(), blob.len());
            assert!(got[..] == blob[..], "the message arrived altered");
        }
        other => panic!("expected a binary message, got {other:?}"),
    }
    server.publish("/publish/user/42", "after");
    assert_eq!(recv_text(&mut ws), "after");
}

#[test]
fn wss_reader_that_stops_reading_is_closed_with_1008_and_its_buffers_are_given_back() {
    const MESSAGE_BYTES: usize = 4096;
    let server = Server::start_tls(&[
        ("websocket.max_outbox_bytes", "65536"),
        ("admin.max_publish_bytes", "65536"),
    ]);
    let budget_at_start = server.metric("densepush_buffered_bytes", &[]);
    let mut stuck = server
        .wss_over(
            server.pki().client_config(),
            tiny_window_tls_stream(&server),
            "user=stuck",
        )
        .expect("wss upgrade");
    let message = |i: usize| {
        let mut text = format!("seq:{i:06}:");
        text.extend(std::iter::repeat_n('p', MESSAGE_BYTES - text.len()));
        text
    };
    let mut admin = server.admin();
    let mut published = 0usize;
    while server.metric("densepush_slow_consumer_closes_total", &[]) == 0 {
        assert!(
            published < 4000,
            "no slow-consumer close after {published} messages"
        );
        for _ in 0..16 {
            let response = admin.request(
                "POST",
                "/publish/user/stuck",
                message(published).as_bytes(),
                &[],
            );
            assert_eq!(response.status, 202, "{}", response.text());
            published += 1;
        }
    }
    // Reading at last: a gap-free prefix of the messages, then close 1008.
    let mut next = 0usize;
    let close = loop {
        match recv(&mut stuck) {
            Message::Text(text) => {
                assert_eq!(text.as_str(), message(next), "a gap or a damaged message");
                next += 1;
            }
            Message::Close(frame) => break frame.expect("a close frame with a code"),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::Policy);
    assert!(next < published, "it got everything: it was not slow");
    finish_close(&mut stuck);
    wait_metric(&server, "densepush_connections_open", &[], 0);
    wait_metric(&server, "densepush_buffered_bytes", &[], budget_at_start);
    wait_metric(&server, "densepush_tls_bytes", &[], 0);
}

// ---- TLS's own behaviour --------------------------------------------------------------------------------

#[test]
fn with_server_listen_empty_ws_is_off_and_wss_works() {
    let server = Server::start_tls(&[("server.listen", "")]);
    assert!(
        server.listening.contains("client=off"),
        "listening line {:?}",
        server.listening
    );
    let mut ws = server.connect_wss("user=42");
    server.publish("/publish/user/42", "over wss only");
    assert_eq!(recv_text(&mut ws), "over wss only");
}

#[test]
fn a_second_connection_resumes_the_first_ones_tls_session() {
    let server = Server::start_tls(&[]);
    let first = server.connect_wss("user=1");
    assert_eq!(
        first.get_ref().conn.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    // Same client configuration, so the same session store holding the first connection's tickets.
    let mut second = server.connect_wss("user=2");
    assert_eq!(
        second.get_ref().conn.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    server.publish("/publish/user/2", "over a resumed session");
    assert_eq!(recv_text(&mut second), "over a resumed session");
    assert_eq!(
        server.metric("densepush_tls_handshakes_total", &[("kind", "full")]),
        1
    );
    assert_eq!(
        server.metric("densepush_tls_handshakes_total", &[("kind", "resumed")]),
        1
    );
}

#[test]
fn tls_sessions_and_bytes_return_to_zero_once_every_client_has_left() {
    let server = Server::start_tls(&[]);
    let budget_at_start = server.metric("densepush_buffered_bytes", &[]);
    assert_eq!(server.metric("densepush_tls_bytes", &[]), 0);
    let clean = server.connect_wss("user=clean");
    let vanishing = server.connect_wss("user=vanishing");
    // A third connection still in its handshake: it holds the handshake's state.
    let mut handshaking = server.tls_raw();
    handshaking
        .write_all(&client_hello(server.pki().client_config())[..20])
        .unwrap();
    wait_metric(&server, "densepush_connections_handshaking", &[], 1);
    assert_eq!(server.metric("densepush_tls_sessions", &[]), 2);
    assert!(server.metric("densepush_tls_bytes", &[]) > 0);

    close_ws(clean);
    drop(vanishing); // TCP closed without a WebSocket close or close_notify
    drop(handshaking);
    wait_metric(&server, "densepush_connections_open", &[], 0);
    wait_metric(&server, "densepush_connections_handshaking", &[], 0);
    wait_metric(&server, "densepush_tls_sessions", &[], 0);
    wait_metric(&server, "densepush_tls_bytes", &[], 0);
    wait_metric(&server, "densepush_buffered_bytes", &[], budget_at_start);
}

#[test]
fn certificate_expiry_gauge_counts_down_from_the_days_configured() {
    let server = Server::start_tls_with(Arc::new(TestPki::new(45)), &[]);
    let left = server.metric("densepush_tls_certificate_expiry_seconds", &[]);
    assert!(
        (44 * 86_400..=45 * 86_400).contains(&left),
        "{left} s left for a 45-day certificate"
    );
}

#[test]
fn sighup_serves_a_renewed_pair_to_new_connections_while_existing_ones_keep_working() {
    let server = Server::start_tls(&[]);
    let pki = server.pki().clone();
    let mut existing = server.connect_wss("user=existing");
    assert_eq!(peer_certificate(&existing), pki.leaf.der);

    let renewed = pki.ca.issue("densepush renewed server", 90);
    assert_ne!(renewed.der, pki.leaf.der);
    renewed.write(&pki.cert_file, &pki.key_file);
    server.sighup();
    wait_metric(&server, "densepush_tls_certificate_reloads_total", &[], 1);

    assert_eq!(certificate_of_a_new_connection(&server), renewed.der);
    server.publish("/publish/user/existing", "still here");
    assert_eq!(recv_text(&mut existing), "still here");
    let left = server.metric("densepush_tls_certificate_expiry_seconds", &[]);
    assert!(
        (89 * 86_400..=90 * 86_400).contains(&left),
        "the expiry gauge follows the new certificate: {left} s"
    );
    assert_eq!(
        server.metric("densepush_tls_certificate_reload_failures_total", &[]),
        0
    );
}

#[test]
fn sighup_with_a_bad_pair_is_refused_counted_and_the_pair_in_use_stays() {
    let server = Server::start_tls(&[]);
    let pki = server.pki().clone();
    let mut existing = server.connect_wss("user=existing");
    let stranger = TestCa::new().issue("densepush test server", 30);
    let expired = pki.ca.issue("densepush test server", -1);
    // Each bad pair in turn: garbage, a key that is not the certificate's, an expired certificate.
    let bad_pairs: [(&str, &str); 3] = [
        ("not a certificate", &pki.leaf.key_pem),
        (&pki.leaf.chain_pem, &stranger.key_pem),
        (&expired.chain_pem, &expired.key_pem),
    ];
    for (i, (cert, key)) in bad_pairs.into_iter().enumerate() {
        std::fs::write(&pki.cert_file, cert).unwrap();
        std::fs::write(&pki.key_file, key).unwrap();
        server.sighup();
        wait_metric(
            &server,
            "densepush_tls_certificate_reload_failures_total",
            &[],
            i as u64 + 1,
        );
        assert_eq!(
            certificate_of_a_new_connection(&server),
            pki.leaf.der,
            "bad pair #{i} replaced the certificate in use"
        );
    }
    assert_eq!(
        server.metric("densepush_tls_certificate_reloads_total", &[]),
        0
    );
    let left = server.metric("densepush_tls_certificate_expiry_seconds", &[]);
    assert!((29 * 86_400..=30 * 86_400).contains(&left), "{left}");
    server.publish("/publish/user/existing", "unaffected");
    assert_eq!(recv_text(&mut existing), "unaffected");
}

// ---- bad input ------------------------------------------------------------------------------------------

#[test]
fn plain_http_on_the_tls_port_gets_a_plain_400_counted_as_plain_http() {
    let server = Server::start_tls(&[]);
    let mut stream = server.tls_raw();
    stream
        .write_all(upgrade_request("user=42", &[]).as_bytes())
        .unwrap();
    let response = String::from_utf8_lossy(&read_to_close(&mut stream)).into_owned();
    assert!(
        response.starts_with("HTTP/1.1 400 "),
        "response {response:?}"
    );
    assert_only_failure(&server, "plain_http");
}

#[test]
fn a_tls_client_hello_on_the_plaintext_port_gets_400() {
    let server = Server::start_tls(&[]);
    let (status, response) = server.raw_exchange(&client_hello(server.pki().client_config()));
    assert_eq!(status, 400, "response {response:?}");
    assert_eq!(
        server.metric(
            "densepush_handshakes_rejected_total",
            &[("reason", "bad_request")]
        ),
        1
    );
}

#[test]
fn a_client_hello_sent_one_byte_at_a_time_completes_the_handshake() {
    let server = Server::start_tls(&[]);
    let mut tls = RawTls::new(server.pki().client_config(), server.tls_raw());
    let mut hello = Vec::new();
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut hello).unwrap();
    }
    for byte in &hello {
        tls.inject(std::slice::from_ref(byte));
        // Pacing only (no Nagle on this socket): most bytes reach the server in a read of their own.
        std::thread::sleep(Duration::from_millis(1));
    }
    tls.handshake();
    tls.upgrade("user=patient");
    server.publish("/publish/user/patient", "worth the wait");
    let (fin, opcode, payload) = read_frame(&mut tls).unwrap().expect("a frame");
    assert_eq!(
        (fin, opcode, payload.as_slice()),
        (true, 1, &b"worth the wait"[..])
    );
    assert_eq!(
        server.metric("densepush_tls_handshakes_total", &[("kind", "full")]),
        1
    );
    assert_eq!(server.metric("densepush_tls_failures_total", &[]), 0);
}

#[test]
fn a_stalled_handshake_is_closed_at_the_handshake_timeout_counted_as_timeout() {
    let server = Server::start_tls(&[
        ("websocket.handshake_timeout_ms", "300"),
        ("websocket.timer_tick_ms", "10"),
    ]);
    let mut stream = server.tls_raw();
    stream
        .write_all(&client_hello(server.pki().client_config())[..10])
        .unwrap();
    assert_eq!(wait_end(&mut stream), End::Eof);
    assert_only_failure(&server, "timeout");
    wait_metric(&server, "densepush_connections_handshaking", &[], 0);
}

#[test]
fn an_oversized_record_after_the_handshake_closes_with_record_overflow() {
    let server = Server::start_tls(&[]);
    let mut tls = upgraded(&server, "big");
    // RFC 8446 §5.2: a protected record is at most 2^14 + 256 bytes; this header announces 65535.
    tls.inject(&[23, 3, 3, 0xff, 0xff]);
    let (end, _) = tls.read_to_end();
    assert_eq!(end, TlsEnd::Alert(AlertDescription::RecordOverflow));
    assert_only_failure(&server, "record_overflow");
    wait_metric(&server, "densepush_connections_open", &[], 0);
}

#[test]
fn garbage_records_after_the_handshake_close_with_bad_record_mac() {
    let server = Server::start_tls(&[]);
    let mut tls = upgraded(&server, "noisy");
    let mut garbage = vec![23, 3, 3, 0, 40];
    garbage.extend((0..40u8).map(|i| i.wrapping_mul(37)));
    tls.inject(&garbage);
    let (end, _) = tls.read_to_end();
    assert_eq!(end, TlsEnd::Alert(AlertDescription::BadRecordMac));
    assert_only_failure(&server, "bad_record_mac");
    wait_metric(&server, "densepush_connections_open", &[], 0);
}

#[test]
fn a_client_hello_after_the_handshake_closes_with_unexpected_message() {
    let server = Server::start_tls(&[]);
    let mut tls = upgraded(&server, "renegotiating");
    // A fresh ClientHello record on the established connection: TLS 1.3 has no renegotiation (RFC 8446
    // §4.1.2), and after the handshake every record must be protected.
    tls.inject(&client_hello(server.pki().client_config()));
    let (end, _) = tls.read_to_end();
    assert_eq!(end, TlsEnd::Alert(AlertDescription::UnexpectedMessage));
    assert_only_failure(&server, "unexpected_message");
}

#[test]
fn a_client_hello_inside_a_protected_record_closes_with_unexpected_message() {
    let server = Server::start_tls(&[]);
    let mut tls = server.tls_handshake_with(server.pki().extractable_client_config());
    // After the upgrade, so densepush's record layer has the connection (not rustls, which is still
    // finishing the handshake when records arrive together with the client's Finished).
    tls.upgrade("user=renegotiating");
    let RawTls { conn, mut sock } = tls;
    let hello = client_hello(server.pki().client_config());
    let mut sealer = Sealer::from_client(conn);
    // The handshake message inside the record: the ClientHello record's body (after its 5-byte header).
    sock.write_all(&sealer.seal(22, &hello[5..])).unwrap();
    assert_eq!(wait_end(&mut sock), End::Eof);
    assert_only_failure(&server, "unexpected_message");
}

#[test]
fn key_update_from_the_client_closes_the_connection_counted_as_key_update() {
    let server = Server::start_tls(&[]);
    let mut tls = upgraded(&server, "rekeying");
    tls.conn
        .refresh_traffic_keys()
        .expect("queueing a KeyUpdate");
    tls.flush();
    let (end, _) = tls.read_to_end();
    assert_eq!(end, TlsEnd::Alert(AlertDescription::UnexpectedMessage));
    assert_only_failure(&server, "key_update");
    wait_metric(&server, "densepush_connections_open", &[], 0);
}

#[test]
fn close_notify_in_the_middle_of_a_websocket_message_is_an_abrupt_close() {
    let server = Server::start_tls(&[]);
    let mut tls = upgraded(&server, "leaving");
    // The first half of a masked text frame, then the client's close_notify.
    let mut frame = Vec::new();
    write_frame(&mut frame, 0x1, b"a message that never ends").unwrap();
    tls.send(&frame[..frame.len() / 2]);
    tls.conn.send_close_notify();
    tls.flush();
    // No WebSocket close and no TLS close_notify back: the server just drops the connection.
    let (end, _) = tls.read_to_end();
    assert_eq!(end, TlsEnd::Closed);
    wait_metric(&server, "densepush_abrupt_closes_total", &[], 1);
    wait_metric(&server, "densepush_connections_open", &[], 0);
    assert_eq!(server.metric("densepush_tls_failures_total", &[]), 0);
    assert_eq!(server.metric("densepush_messages_received_total", &[]), 0);
}
#[test]
fn a_fatal_alert_in_the_middle_of_a_websocket_message_closes_counted_as_peer_alert() {
    let server = Server::start_tls(&[]);
    let mut tls = server.tls_handshake_with(server.pki().extractable_client_config());
    tls.upgrade("user=failing");
    let RawTls { conn, mut sock } = tls;
    let mut sealer = Sealer::from_client(conn);
    let mut frame = Vec::new();
    write_frame(&mut frame, 0x1, b"a message cut by an alert").unwrap();
    let mut records = sealer.seal(23, &frame[..frame.len() / 2]);
    // A fatal internal_error alert (RFC 8446 §6: level 2, description 80).
    records.extend(sealer.seal(21, &[2, 80]));
    sock.write_all(&records).unwrap();
    assert_eq!(wait_end(&mut sock), End::Eof);
    assert_only_failure(&server, "peer_alert");
    wait_metric(&server, "densepush_connections_open", &[], 0);
    assert_eq!(server.metric("densepush_messages_received_total", &[]), 0);
}

#[test]
fn a_malformed_client_hello_gets_a_plaintext_alert_counted_as_handshake() {
    let server = Server::start_tls(&[]);
    let mut stream = server.tls_raw();
    // A handshake record holding a ClientHello header that announces 4 bytes of nonsense.
    stream
        .write_all(&[22, 3, 1, 0, 8, 1, 0, 0, 4, 9, 9, 9, 9])
        .unwrap();
    let answer = read_to_close(&mut stream);
    // An alert record (RFC 8446 §5.1 type 21, not protected yet), level fatal (§6).
    assert_eq!(
        answer.first(),
        Some(&21),
        "expected an alert record, got {answer:?}"
    );
    assert_eq!(answer.get(5), Some(&2), "a fatal alert: {answer:?}");
    assert_only_failure(&server, "handshake");
    wait_metric(&server, "densepush_connections_handshaking", &[], 0);
}

#[test]
fn a_connection_ended_by_a_tls_failure_no_longer_counts_as_a_tls_session() {
    let server = Server::start_tls(&[]);
    let mut tls = upgraded(&server, "failing");
    let _quiet = server.connect_wss("user=quiet");
    wait_metric(&server, "densepush_tls_sessions", &[], 2);
    tls.inject(&[
        23, 3, 3, 0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
    ]);
    let (end, _) = tls.read_to_end();
    assert_eq!(end, TlsEnd::Alert(AlertDescription::BadRecordMac));
    wait_metric(&server, "densepush_connections_open", &[], 1);
    wait_metric(&server, "densepush_tls_sessions", &[], 1);
}
/// A client whose handshake is done on its side, with its Finished still unsent: what a test queues now
/// goes out in the same write as the Finished.
fn finished_unsent(server: &Server) -> RawTls {
    let mut tls = RawTls::new(server.pki().client_config(), server.tls_raw());
    tls.flush(); // the ClientHello
    while tls.conn.is_handshaking() {
        let read = tls
            .conn
            .read_tls(&mut tls.sock)
            .expect("reading the server's flight");
        assert_ne!(read, 0, "the server closed during the handshake");
        tls.conn.process_new_packets().expect("the server's flight");
    }
    assert!(tls.conn.wants_write(), "the client's Finished is queued");
    tls
}

#[test]
fn an_upgrade_request_sent_with_the_clients_finished_is_served() {
    let server = Server::start_tls(&[]);
    let mut tls = finished_unsent(&server);
    tls.conn
        .writer()
        .write_all(upgrade_request("user=eager", &[]).as_bytes())
        .unwrap();
    tls.flush();
    let head = read_head(&mut tls);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    server.publish("/publish/user/eager", "served");
    let (_, opcode, payload) = read_frame(&mut tls).unwrap().expect("a frame");
    assert_eq!((opcode, payload.as_slice()), (1, &b"served"[..]));
}

#[test]
fn a_key_update_sent_with_the_clients_finished_closes_counted_as_key_update() {
    let server = Server::start_tls(&[]);
    let mut tls = finished_unsent(&server);
    tls.conn
        .refresh_traffic_keys()
        .expect("queueing a KeyUpdate");
    tls.conn
        .writer()
        .write_all(upgrade_request("user=rekeying", &[]).as_bytes())
        .unwrap();
    tls.flush();
    // Refused like a KeyUpdate on an established connection, with an alert the client can read: not
    // answered with records under keys the client does not have.
    let (end, plain) = tls.read_to_end();
    assert_eq!(
        end,
        TlsEnd::Alert(AlertDescription::UnexpectedMessage),
        "plaintext before: {:?}",
        String::from_utf8_lossy(&plain)
    );
    assert_only_failure(&server, "key_update");
    wait_metric(&server, "densepush_connections_handshaking", &[], 0);
    assert_eq!(server.metric("densepush_tls_sessions", &[]), 0);
}
