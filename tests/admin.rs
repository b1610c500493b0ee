//! The admin API: kicks, presence, HTTP/1.1 pipelining, routing errors, and the API key.

mod common;

use common::*;
use std::time::Duration;
use tungstenite::protocol::frame::coding::CloseCode;

fn delete(server: &Server, path: &str) -> Response {
    server.request("DELETE", path, b"", &[])
}

fn presence(server: &Server, user: &str) -> u64 {
    let response = server.request("GET", &format!("/presence/user/{user}"), b"", &[]);
    assert_eq!(response.status, 200, "{}", response.text());
    let json = response.json();
    assert_eq!(json["user"], user);
    json["connections"]
        .as_u64()
        .expect("connections is a number")
}

// ---- kicks ---------------------------------------------------------------------------------------------

#[test]
fn kick_user_closes_all_of_that_users_connections_with_4000_and_nobody_elses() {
    let server = Server::start(&[]);
    let mut alice_1 = server.connect("user=alice&client=phone");
    let mut alice_2 = server.connect("user=alice&client=web");
    let mut bob = server.connect("user=bob");
    let response = delete(&server, "/connections/user/alice");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["closed"], 2);
    assert_eq!(response.json()["code"], 4000);
    for ws in [&mut alice_1, &mut alice_2] {
        let frame = recv_close(ws).expect("close frame with a code");
        assert_eq!(frame.code, CloseCode::from(4000));
        assert_eq!(frame.reason.as_str(), "disconnected by server");
        finish_close(ws);
    }
    assert_next_is_marker(&server, &mut [&mut bob], "marker");
    assert!(wait_until(Duration::from_secs(2), || presence(
        &server, "alice"
    ) == 0));
    assert_eq!(presence(&server, "bob"), 1);
    assert_eq!(server.metric("densepush_kicked_total", &[]), 2);
}

#[test]
fn kick_user_client_closes_only_that_tokens_connections() {
    let server = Server::start(&[]);
    let mut phone_1 = server.connect("user=alice&client=phone");
    let mut phone_2 = server.connect("user=alice&client=phone");
    let mut web = server.connect("user=alice&client=web");
    let mut bob_phone = server.connect("user=bob&client=phone");
    let response = delete(&server, "/connections/user/alice/client/phone");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["closed"], 2);
    for ws in [&mut phone_1, &mut phone_2] {
        let frame = recv_close(ws).expect("close frame with a code");
        assert_eq!(frame.code, CloseCode::from(4000));
        finish_close(ws);
    }
    assert_next_is_marker(&server, &mut [&mut web, &mut bob_phone], "marker");
    assert!(wait_until(Duration::from_secs(2), || presence(
        &server, "alice"
    ) == 1));
}

#[test]
fn kick_uses_the_code_and_reason_given_in_the_query() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    let response = delete(&server, "/connections/user/alice?code=4001&reason=bye");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["closed"], 1);
    assert_eq!(response.json()["code"], 4001);
    let frame = recv_close(&mut ws).expect("close frame with a code");
    assert_eq!(frame.code, CloseCode::from(4001));
    assert_eq!(frame.reason.as_str(), "bye");
    finish_close(&mut ws);
}

#[test]
fn kick_with_a_code_outside_1000_and_3000_to_4999_is_400_and_closes_nothing() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    for code in ["1001", "1005", "2999", "5000", "abc", "-1", ""] {
        let response = delete(&server, &format!("/connections/user/alice?code={code}"));
        assert_eq!(response.status, 400, "code={code}: {}", response.text());
        assert!(response.json()["error"].is_string());
    }
    assert_next_is_marker(&server, &mut [&mut ws], "marker");
    assert_eq!(presence(&server, "alice"), 1);
}

#[test]
fn kick_with_a_registered_application_code_reaches_the_client() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    let response = delete(
        &server,
        "/connections/user/alice?code=3003&reason=forbidden",
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let frame = recv_close(&mut ws).expect("a close frame");
    assert_eq!(frame.code, CloseCode::from(3003));
    assert_eq!(frame.reason.as_str(), "forbidden");
}

#[test]
fn kick_of_a_user_without_connections_closes_zero() {
    let server = Server::start(&[]);
    let mut bob = server.connect("user=bob");
    let response = delete(&server, "/connections/user/nobody");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["closed"], 0);
    assert_next_is_marker(&server, &mut [&mut bob], "marker");
}

#[test]
fn kicked_connection_receives_messages_published_before_the_kick_then_the_close() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    let mut admin = server.admin();
    for i in 0..20 {
        let response = admin.request(
            "POST",
            "/publish/user/alice",
            format!("m{i}").as_bytes(),
            &[],
        );
        assert_eq!(response.status, 202);
    }
    let response = admin.request("DELETE", "/connections/user/alice", b"", &[]);
    assert_eq!(response.json()["closed"], 1);
    for i in 0..20 {
        assert_eq!(recv_text(&mut ws), format!("m{i}"));
    }
    let frame = recv_close(&mut ws).expect("close frame with a code");
    assert_eq!(frame.code, CloseCode::from(4000));
}

// ---- presence ------------------------------------------------------------------------------------------

#[test]
fn presence_sums_a_users_connections_over_both_reactors_and_drops_after_disconnect() {
    let server = Server::start(&[("server.reactors", "2")]);
    let mut alice: Vec<Ws> = Vec::new();
    let on_reactor =
        |server: &Server, r: &str| server.metric("densepush_tcp_accepted_total", &[("reactor", r)]);
    // Open alice connections until both reactors accepted some (the kernel picks the listener by hash; they
    // all live on alice's home reactor).
    while alice.len() < 6 || on_reactor(&server, "0") == 0 || on_reactor(&server, "1") == 0 {
        assert!(
            alice.len() < 200,
            "connections never spread over both reactors"
        );
        alice.push(server.connect("user=alice"));
    }
    let _bob = server.connect("user=bob");
    let total = alice.len() as u64;
    assert_eq!(presence(&server, "alice"), total);
    assert_eq!(presence(&server, "bob"), 1);
    assert_eq!(presence(&server, "carol"), 0);

    // A clean close and an abrupt one both count.
    close_ws(alice.pop().unwrap());
    drop(alice.pop().unwrap());
    assert!(
        wait_until(Duration::from_secs(2), || presence(&server, "alice")
            == total - 2),
        "presence {} after two disconnects of {total}",
        presence(&server, "alice")
    );
    for ws in alice.drain(..) {
        drop(ws);
    }
    assert!(wait_until(Duration::from_secs(2), || presence(
        &server, "alice"
    ) == 0));
    assert_eq!(presence(&server, "bob"), 1);
}

// ---- HTTP ----------------------------------------------------------------------------------------------

#[test]
fn pipelined_requests_in_one_write_are_answered_in_order() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=p");
    let mut admin = server.admin();
    let mut bytes = Vec::new();
    bytes.extend(admin.encode("GET", "/healthz", b"", &[]));
    bytes.extend(admin.encode("POST", "/publish/user/p", b"first", &[]));
    bytes.extend(admin.encode("GET", "/no/such/route", b"", &[]));
    bytes.extend(admin.encode("GET", "/presence/user/p", b"", &[]));
    bytes.extend(admin.encode("GET", "/publish/all", b"", &[]));
    bytes.extend(admin.encode("POST", "/publish/user/p", b"second", &[]));
    bytes.extend(admin.encode("DELETE", "/connections/user/nobody", b"", &[]));
    admin.write_raw(&bytes);

    let healthz = admin.read_response();
    assert_eq!(healthz.status, 200);
    assert_eq!(healthz.json()["status"], "ok");
    let first = admin.read_response();
    assert_eq!(first.status, 202);
    assert_eq!(first.json()["bytes"], 5);
    assert_eq!(admin.read_response().status, 404);
    let presence = admin.read_response();
    assert_eq!(presence.status, 200);
    assert_eq!(presence.json()["user"], "p");
    assert_eq!(presence.json()["connections"], 1);
    assert_eq!(admin.read_response().status, 405);
    let second = admin.read_response();
    assert_eq!(second.status, 202);
    assert_eq!(second.json()["bytes"], 6);
    let kick = admin.read_response();
    assert_eq!(kick.status, 200);
    assert_eq!(kick.json()["closed"], 0);

    assert_eq!(recv_text(&mut ws), "first");
    assert_eq!(recv_text(&mut ws), "second");
}

#[test]
fn keep_alive_connection_serves_sequential_requests() {
    let server = Server::start(&[]);
    let mut admin = server.admin();
    for _ in 0..5 {
        assert_eq!(admin.request("GET", "/healthz", b"", &[]).status, 200);
    }
}

#[test]
fn unknown_route_is_404_json() {
    let server = Server::start(&[]);
    for path in ["/nope", "/publish", "/publish/user/u/", "/healthz/extra"] {
        let response = server.request("GET", path, b"", &[]);
        assert_eq!(response.status, 404, "{path}");
        assert!(response.json()["error"].is_string(), "{path}");
    }
}

#[test]
fn wrong_method_is_405_with_allow() {
    let server = Server::start(&[]);
    let get_publish = server.request("GET", "/publish/all", b"", &[]);
    assert_eq!(get_publish.status, 405);
    assert_eq!(get_publish.header("allow"), Some("POST"));
    let post_healthz = server.request("POST", "/healthz", b"", &[]);
    assert_eq!(post_healthz.status, 405);
    assert_eq!(post_healthz.header("allow"), Some("GET, HEAD"));
    let get_kick = server.request("GET", "/connections/user/u", b"", &[]);
    assert_eq!(get_kick.status, 405);
    assert_eq!(get_kick.header("allow"), Some("DELETE"));
}

#[test]
fn api_key_is_required_as_bearer_on_publish() {
    let key = "admin-key-0123456789";
    let server = Server::start(&[("admin.api_key", key)]);
    let mut ws = server.connect("user=u");

    let none = server.post("/publish/user/u", "no key");
    assert_eq!(none.status, 401, "{}", none.text());
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let wrong = server.request(
        "POST",
        "/publish/user/u",
        b"wrong key",
        &[("Authorization", "Bearer admin-key-0123456780")],
    );
    assert_eq!(wrong.status, 401);
    let not_bearer = server.request(
        "POST",
        "/publish/user/u",
        b"basic",
        &[("Authorization", &format!("Basic {key}"))],
    );
    assert_eq!(not_bearer.status, 401);
    let right = server.request(
        "POST",
        "/publish/user/u",
        b"with key",
        &[("Authorization", &format!("Bearer {key}"))],
    );
    assert_eq!(right.status, 202, "{}", right.text());
    // Only the authorised publish arrived.
    assert_eq!(recv_text(&mut ws), "with key");
}

#[test]
fn api_key_guards_metrics_presence_and_kicks_but_not_healthz() {
    let key = "admin-key-0123456789";
    let server = Server::start(&[("admin.api_key", key)]);
    let _ws = server.connect("user=u");
    assert_eq!(server.request("GET", "/healthz", b"", &[]).status, 200);
    assert_eq!(server.request("GET", "/metrics", b"", &[]).status, 401);
    assert_eq!(
        server.request("GET", "/presence/user/u", b"", &[]).status,
        401
    );
    assert_eq!(
        server
            .request("DELETE", "/connections/user/u", b"", &[])
            .status,
        401
    );
    let auth = format!("Bearer {key}");
    let presence = server.request("GET", "/presence/user/u", b"", &[("Authorization", &auth)]);
    assert_eq!(presence.status, 200);
    assert_eq!(presence.json()["connections"], 1);
}

#[test]
fn post_without_content_length_is_411_and_closes_the_connection() {
    let server = Server::start(&[]);
    let mut admin = server.admin();
    admin.write_raw(b"POST /publish/all HTTP/1.1\r\nHost: x\r\n\r\n");
    let response = admin.read_response();
    assert_eq!(response.status, 411);
    assert!(admin.is_closed_by_server());
}

#[test]
fn head_on_healthz_has_content_length_and_no_body() {
    let server = Server::start(&[]);
    let mut admin = server.admin();
    let mut bytes = admin.encode("HEAD", "/healthz", b"", &[]);
    bytes.extend(admin.encode("GET", "/healthz", b"", &[]));
    admin.write_raw(&bytes);
    // RFC 9110 §9.3.2: HEAD gets GET's headers, Content-Length included, and no body; so the bytes right
    // after HEAD's head must be the GET response.
    let head = admin.read_head_only_response();
    assert_eq!(head.status, 200);
    let get = admin.read_response();
    assert_eq!(get.status, 200, "HEAD response carried a body?");
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
}

#[test]
fn request_with_connection_close_is_answered_then_the_connection_closed() {
    let server = Server::start(&[]);
    let mut admin = server.admin();
    let bytes = admin.encode("GET", "/healthz", b"", &[("Connection", "close")]);
    admin.write_raw(&bytes);
    let response = admin.read_response();
    assert_eq!(response.status, 200);
    assert!(admin.is_closed_by_server());
}

#[test]
fn http_1_0_request_is_answered_then_the_connection_closed() {
    let server = Server::start(&[]);
    let mut admin = server.admin();
    admin.write_raw(b"GET /healthz HTTP/1.0\r\n\r\n");
    let response = admin.read_response();
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["status"], "ok");
    assert!(admin.is_closed_by_server());
}

#[test]
fn requests_followed_by_a_half_close_are_still_answered() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=h");
    let mut admin = server.admin();
    let mut bytes = admin.encode("POST", "/publish/user/h", b"one", &[]);
    bytes.extend(admin.encode("POST", "/publish/user/h", b"two", &[]));
    admin.write_raw(&bytes);
    admin.shutdown_write();
    assert_eq!(admin.read_response().status, 202);
    assert_eq!(admin.read_response().status, 202);
    assert!(admin.is_closed_by_server());
    assert_eq!(recv_text(&mut ws), "one");
    assert_eq!(recv_text(&mut ws), "two");
}
