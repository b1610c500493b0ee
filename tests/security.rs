//! Security rules checked against the real server: only HS256 tokens are accepted (RFC 7519 §6 and RFC 8725
//! §3.1 on algorithm confusion), the exp/nbf leeway is configurable (RFC 7519 §4.1.4-5), tokens never reach
//! the log, and the admin API's exposure warning and request limits.

mod common;

use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use std::time::{SystemTime, UNIX_EPOCH};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with this exact header JSON and claims, signed with HMAC-SHA256 over the test secret whatever the
/// header says (`sign = false` leaves the signature empty, as `alg: none` tokens do).
fn forged(header: &serde_json::Value, claims: &serde_json::Value, sign: bool) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = if sign {
        jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap()
    } else {
        String::new()
    };
    format!("{signing_input}.{signature}")
}

fn claims() -> serde_json::Value {
    serde_json::json!({ "sub": "alice", "exp": now() + 3600 })
}

fn jwt_server(extra: &[(&str, &str)]) -> Server {
    let mut overrides = vec![("auth.mode", "jwt"), ("auth.jwt_secret", TEST_SECRET)];
    overrides.extend_from_slice(extra);
    Server::start(&overrides)
}

#[test]
fn forged_header_with_hs256_is_accepted_so_the_refusals_below_are_about_alg_only() {
    let server = jwt_server(&[]);
    let token = forged(
        &serde_json::json!({ "alg": "HS256", "typ": "JWT" }),
        &claims(),
        true,
    );
    server.connect(&format!("token={token}"));
}

#[test]
fn alg_none_is_401() {
    let server = jwt_server(&[]);
    for alg in ["none", "None", "NONE"] {
        let header = serde_json::json!({ "alg": alg, "typ": "JWT" });
        for sign in [false, true] {
            let token = forged(&header, &claims(), sign);
            assert_eq!(
                server.refused_status(&format!("token={token}"), &[]),
                401,
                "alg {alg}, signed {sign}"
            );
        }
    }
}

#[test]
fn rs256_es256_and_other_hmac_algs_signed_with_the_hmac_secret_are_401() {
    // The classic confusion: a verifier that trusts the header would check an "RS256" token with the HMAC
    // secret as if it were a public key (RFC 8725 §2.1).
    let server = jwt_server(&[]);
    for alg in ["RS256", "ES256", "PS256", "EdDSA", "HS384", "HS512"] {
        let token = forged(
            &serde_json::json!({ "alg": alg, "typ": "JWT" }),
            &claims(),
            true,
        );
        assert_eq!(
            server.refused_status(&format!("token={token}"), &[]),
            401,
            "alg {alg}"
        );
    }
}

#[test]
fn missing_alg_is_401() {
    let server = jwt_server(&[]);
    let token = forged(&serde_json::json!({ "typ": "JWT" }), &claims(), true);
    assert_eq!(server.refused_status(&format!("token={token}"), &[]), 401);
}

#[test]
fn expiry_within_the_configured_leeway_is_accepted_and_beyond_it_refused() {
    let header = serde_json::json!({ "alg": "HS256", "typ": "JWT" });
    let expired_20s_ago = forged(
        &header,
        &serde_json::json!({ "sub": "alice", "exp": now() - 20 }),
        true,
    );
    let valid_in_20s = forged(
        &header,
        &serde_json::json!({ "sub": "alice", "nbf": now() + 20, "exp": now() + 3600 }),
        true,
    );
    let lenient = jwt_server(&[("auth.leeway_secs", "60")]);
    lenient.connect(&format!("token={expired_20s_ago}"));
    lenient.connect(&format!("token={valid_in_20s}"));
    let strict = jwt_server(&[("auth.leeway_secs", "0")]);
    assert_eq!(
        strict.refused_status(&format!("token={expired_20s_ago}"), &[]),
        401
    );
    assert_eq!(
        strict.refused_status(&format!("token={valid_in_20s}"), &[]),
        401
    );
}

#[test]
fn tokens_never_appear_in_the_log_even_at_debug_level() {
    let server = jwt_server(&[("log.level", "debug")]);
    let good = server.token(&["--user", "alice", "--channels", "news"]);
    let mut ws = server.connect(&format!("token={good}"));
    let bearer = server.token(&["--user", "bob"]);
    let _ws2 = server
        .try_connect("", &[("Authorization", &format!("Bearer {bearer}"))])
        .expect("bearer upgrade");
    let bad_signature = format!("{}x", &good[..good.len() - 1]);
    let expired = forged(
        &serde_json::json!({ "alg": "HS256" }),
        &serde_json::json!({ "sub": "carol", "exp": now() - 3600 }),
        true,
    );
    let wrong_alg = forged(&serde_json::json!({ "alg": "RS256" }), &claims(), true);
    for token in [&bad_signature, &expired, &wrong_alg] {
        assert_eq!(server.refused_status(&format!("token={token}"), &[]), 401);
    }
    server.publish("/publish/user/alice", "hi");
    assert_eq!(recv_text(&mut ws), "hi");
    close_ws(ws);
    // A protocol error on a token-authenticated connection is logged at debug level: still no token.
    let mut raw = server.raw();
    upgrade_on(&mut raw, &format!("token={good}"));
    std::io::Write::write_all(&mut raw, &[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(read_frame(&mut raw).unwrap().expect("close frame").1, 0x8);
    assert!(
        wait_until(std::time::Duration::from_secs(2), || server
            .log()
            .contains("DEBUG")),
        "the log is not at debug level:\n{}",
        server.log()
    );
    let log = server.log();
    for token in [&good, &bearer, &bad_signature, &expired, &wrong_alg] {
        for (i, part) in token.split('.').enumerate() {
            assert!(
                part.len() < 8 || !log.contains(part),
                "part {i} of a token appears in the log:\n{log}"
            );
        }
    }
}

// ---- admin API -----------------------------------------------------------------------------------------

const EXPOSED_WARNING: &str = "is reachable from other hosts and has no admin.api_key";

#[test]
fn admin_listen_defaults_to_loopback() {
    let addr: std::net::SocketAddr = densepush::config::DEFAULT_ADMIN_LISTEN.parse().unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
}

#[test]
fn server_warns_at_start_when_admin_listens_beyond_loopback_without_a_key() {
    // Refused without the opt-in (tests/cli.rs); with it, the server starts and says why it is unsafe.
    let server = Server::start(&[
        ("admin.listen", "0.0.0.0:0"),
        ("auth.allow_insecure", "true"),
    ]);
    assert!(
        wait_until(std::time::Duration::from_secs(2), || server
            .log()
            .contains(EXPOSED_WARNING)),
        "no warning:\n{}",
        server.log()
    );
}

#[test]
fn no_exposure_warning_with_a_key_or_on_loopback() {
    let keyed = Server::start(&[
        ("admin.listen", "0.0.0.0:0"),
        ("admin.api_key", "k-0123456789"),
    ]);
    let loopback = Server::start(&[]);
    // Both are serving by now; the warning is logged before the listening line.
    assert_eq!(keyed.request("GET", "/healthz", b"", &[]).status, 200);
    assert_eq!(loopback.request("GET", "/healthz", b"", &[]).status, 200);
    assert!(!keyed.log().contains(EXPOSED_WARNING), "{}", keyed.log());
    assert!(
        !loopback.log().contains(EXPOSED_WARNING),
        "{}",
        loopback.log()
    );
}

#[test]
fn admin_request_with_more_than_max_request_headers_is_431() {
    let server = Server::start(&[("admin.max_request_headers", "8")]);
    let mut admin = server.admin();
    let headers: Vec<(String, String)> = (0..10).map(|i| (format!("X-H{i}"), "v".into())).collect();
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let response = admin.request("GET", "/healthz", b"", &refs);
    assert_eq!(response.status, 431, "{}", response.text());
}

#[test]
fn admin_body_over_max_publish_bytes_is_413_and_delivers_nothing() {
    let server = Server::start(&[("admin.max_publish_bytes", "1024")]);
    let mut ws = server.connect("user=u");
    let response = server.post("/publish/user/u", &"x".repeat(1025));
    assert_eq!(response.status, 413, "{}", response.text());
    server.publish("/publish/user/u", "small");
    assert_eq!(recv_text(&mut ws), "small");
}

#[test]
fn admin_unknown_route_is_404_and_wrong_method_is_405_even_with_a_key() {
    let server = Server::start(&[("admin.api_key", "k-0123456789")]);
    let auth = [("Authorization", "Bearer k-0123456789")];
    assert_eq!(server.request("GET", "/nope", b"", &auth).status, 404);
    let response = server.request("GET", "/publish/all", b"", &auth);
    assert_eq!(response.status, 405);
    assert!(response.header("Allow").is_some_and(|a| a.contains("POST")));
}

#[test]
fn admin_routes_are_not_revealed_without_the_key() {
    let server = Server::start(&[("admin.api_key", "k-0123456789")]);
    // Unknown and known routes, right or wrong method: all the same 401 without the key.
    for (method, path) in [
        ("GET", "/nope"),
        ("GET", "/publish/all"),
        ("POST", "/publish/all"),
    ] {
        let response = server.request(method, path, b"", &[]);
        assert_eq!(response.status, 401, "{method} {path}");
        assert_eq!(response.header("WWW-Authenticate"), Some("Bearer"));
    }
    assert_eq!(server.request("GET", "/healthz", b"", &[]).status, 200);
}
