//! JWT authentication of the upgrade (RFC 7519, HS256): refusals are 401, a valid token from the query or
//! from `Authorization: Bearer` names the connection's user, client and channels.

mod common;

use common::*;
use std::time::{SystemTime, UNIX_EPOCH};

fn jwt_server() -> Server {
    Server::start(&[("auth.mode", "jwt"), ("auth.jwt_secret", TEST_SECRET)])
}

#[test]
fn missing_token_is_401_with_a_bearer_challenge() {
    let server = jwt_server();
    let (status, response) = server.raw_exchange(upgrade_request("", &[]).as_bytes());
    assert_eq!(status, 401, "{response}");
    // RFC 9110 §15.5.2: a 401 carries a challenge.
    assert!(
        response
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{response}"
    );
}

#[test]
fn token_signed_with_another_secret_is_401() {
    let server = jwt_server();
    let other = server.dir().join("other.toml");
    write_config(
        &other,
        &[
            ("auth.mode", "jwt"),
            (
                "auth.jwt_secret",
                "a-different-secret-that-is-long-enough-0000",
            ),
        ],
    );
    let forged = token_with_config(&other, &["--user", "alice"]);
    assert_eq!(server.refused_status(&format!("token={forged}"), &[]), 401);
}

#[test]
fn token_with_tampered_claims_is_401() {
    let server = jwt_server();
    let token = server.token(&["--user", "alice"]);
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let other = server.token(&["--user", "mallory"]);
    // Mallory's claims under Alice's signature.
    parts[1] = other.split('.').nth(1).unwrap().to_string();
    assert_eq!(
        server.refused_status(&format!("token={}", parts.join(".")), &[]),
        401
    );
}

#[test]
fn expired_token_is_401() {
    let server = jwt_server();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({ "sub": "alice", "iat": now - 7200, "exp": now - 3600 });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(server.refused_status(&format!("token={token}"), &[]), 401);
    // The same claims, not yet expired, are accepted: only the expiry made the difference.
    let fresh = serde_json::json!({ "sub": "alice", "iat": now, "exp": now + 3600 });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &fresh,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap();
    server.connect(&format!("token={token}"));
}

#[test]
fn valid_token_in_query_connects_and_receives_its_users_and_channels_publishes() {
    let server = jwt_server();
    let token = server.token(&["--user", "alice", "--channels", "news,weather"]);
    let mut ws = server.connect(&format!("token={token}"));
    server.publish("/publish/user/alice", "for alice");
    assert_eq!(recv_text(&mut ws), "for alice");
    server.publish("/publish/channel/news", "news item");
    assert_eq!(recv_text(&mut ws), "news item");
    server.publish("/publish/channel/weather", "rain");
    assert_eq!(recv_text(&mut ws), "rain");
    server.publish("/publish/channel/sports", "not subscribed");
    server.publish("/publish/user/bob", "not alice");
    assert_next_is_marker(&server, &mut [&mut ws], "marker");
}

#[test]
fn valid_token_in_bearer_header_connects_and_receives_its_users_and_channels_publishes() {
    let server = jwt_server();
    let token = server.token(&["--user", "alice", "--channels", "news"]);
    let mut ws = server
        .try_connect("", &[("Authorization", &format!("Bearer {token}"))])
        .expect("bearer token must connect");
    server.publish("/publish/user/alice", "for alice");
    assert_eq!(recv_text(&mut ws), "for alice");
    server.publish("/publish/channel/news", "news item");
    assert_eq!(recv_text(&mut ws), "news item");
}

#[test]
fn client_claim_scopes_user_client_publishes() {
    let server = jwt_server();
    let phone = server.token(&["--user", "alice", "--client", "phone"]);
    let web = server.token(&["--user", "alice", "--client", "web"]);
    let mut on_phone = server.connect(&format!("token={phone}"));
    let mut on_web = server.connect(&format!("token={web}"));
    server.publish("/publish/user/alice/client/phone", "phone only");
    assert_eq!(recv_text(&mut on_phone), "phone only");
    assert_next_is_marker(&server, &mut [&mut on_phone, &mut on_web], "marker");
}

#[test]
fn jwt_mode_ignores_user_client_and_channels_in_the_query() {
    let server = jwt_server();
    let token = server.token(&["--user", "alice"]);
    let mut ws = server.connect(&format!(
        "token={token}&user=mallory&client=evil&channels=secret"
    ));
    server.publish("/publish/user/mallory", "for mallory");
    server.publish("/publish/user/mallory/client/evil", "for mallory's client");
    server.publish("/publish/channel/secret", "secret channel");
    server.publish("/publish/user/alice", "for alice");
    assert_eq!(recv_text(&mut ws), "for alice");
    assert_next_is_marker(&server, &mut [&mut ws], "marker");
    let presence = server.request("GET", "/presence/user/mallory", b"", &[]);
    assert_eq!(presence.json()["connections"], 0);
}

#[test]
fn user_query_without_token_is_401_in_jwt_mode() {
    let server = jwt_server();
    assert_eq!(server.refused_status("user=alice", &[]), 401);
}

#[test]
fn token_in_both_query_and_header_is_401() {
    let server = jwt_server();
    let token = server.token(&["--user", "alice"]);
    let bearer = format!("Bearer {token}");
    assert_eq!(
        server.refused_status(&format!("token={token}"), &[("Authorization", &bearer)]),
        401
    );
}

#[test]
fn refused_tokens_are_counted_as_unauthorized() {
    let server = jwt_server();
    assert_eq!(
        server.metric(
            "densepush_handshakes_rejected_total",
            &[("reason", "unauthorized")]
        ),
        0
    );
    assert_eq!(server.refused_status("", &[]), 401);
    assert_eq!(server.refused_status("token=not.a.jwt", &[]), 401);
    assert_eq!(
        server.metric(
            "densepush_handshakes_rejected_total",
            &[("reason", "unauthorized")]
        ),
        2
    );
    assert_eq!(server.metric("densepush_handshakes_accepted_total", &[]), 0);
    assert_eq!(server.metric("densepush_connections_open", &[]), 0);
}
