//! Tokens from identity providers, against the real server: RS256/384/512, PS256/384/512, ES256/384 and
//! EdDSA tokens signed by Python `cryptography` (tests/clients/jose_sign.py, not the library densepush
//! verifies with), keys from a PEM file, a JWKS file and a JWKS URL served by a test HTTP server; HS256
//! rotation by `kid`; algorithm confusion and `none` refused; an unknown `kid` that brings a new key through a
//! rate-limited refresh; a JWKS endpoint that is down at start or fails later; `iss` and `aud`; https with a
//! private CA.
//!
//! The Python comes from `scripts/test.sh` (a virtualenv with `cryptography` in target/pyenv); a `python3`
//! that has `cryptography` works too. Without either, the tests fail with that hint.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const HINT: &str = "run scripts/test.sh once: it installs Python `cryptography` into target/pyenv";

/// A Python that has `cryptography`.
fn python() -> PathBuf {
    python_with("cryptography.x509")
}

fn script() -> PathBuf {
    repo().join("tests/clients/jose_sign.py")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `user`, valid for ten minutes.
fn claims(user: &str) -> Value {
    json!({ "sub": user, "iat": now(), "exp": now() + 600 })
}

/// A key pair made by the signer.
#[derive(Clone)]
struct KeyPair {
    private_pem: String,
    public_pem: String,
    jwk: Value,
}

impl KeyPair {
    /// The public JWK with `kid` and any extra members.
    fn jwk(&self, kid: &str, extra: Value) -> Value {
        let mut jwk = self.jwk.clone();
        jwk["kid"] = json!(kid);
        for (k, v) in extra.as_object().unwrap() {
            jwk[k] = v.clone();
        }
        jwk
    }
}

/// The Python signer process (one per test), answering one JSON line per request.
struct Signer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Signer {
    fn start() -> Signer {
        let mut child = Command::new(python())
            .arg(script())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting jose_sign.py: {e}; {HINT}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Signer {
            child,
            stdin,
            stdout,
        }
    }

    fn call(&mut self, request: Value) -> Value {
        writeln!(self.stdin, "{request}").expect("writing to jose_sign.py");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading from jose_sign.py");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("jose_sign.py answered {line:?} ({e}) to {request}"))
    }

    fn keygen(&mut self, kind: &str) -> KeyPair {
        let v = self.call(json!({ "op": "keygen", "kind": kind }));
        KeyPair {
            private_pem: v["private_pem"].as_str().unwrap().to_string(),
            public_pem: v["public_pem"].as_str().unwrap().to_string(),
            jwk: v["jwk"].clone(),
        }
    }

    /// A token with header `{"alg": alg, "typ": "JWT"} + header`, signed with `key` as `alg`.
    fn sign(&mut self, alg: &str, key: &KeyPair, header: Value, claims: Value) -> String {
        self.sign_raw(json!({
            "alg": alg, "header": header, "claims": claims, "private_pem": key.private_pem,
        }))
    }

    /// An HS* token signed with `secret`.
    fn sign_hmac(&mut self, alg: &str, secret: &str, header: Value, claims: Value) -> String {
        self.sign_raw(json!({ "alg": alg, "header": header, "claims": claims, "secret": secret }))
    }

    fn sign_raw(&mut self, mut request: Value) -> String {
        request["op"] = json!("sign");
        self.call(request)["token"].as_str().unwrap().to_string()
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JWKS endpoint on loopback: answers every GET with the current body and status, and records when.
struct JwksServer {
    port: u16,
    body: Arc<Mutex<String>>,
    status: Arc<AtomicU16>,
    hits: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl JwksServer {
    /// A free loopback port with nothing listening on it (yet).
    fn reserve_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    /// Serves `body` on `port` (0 for any).
    fn start(port: u16, body: Value) -> JwksServer {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("binding the JWKS server");
        let server = JwksServer {
            port: listener.local_addr().unwrap().port(),
            body: Arc::new(Mutex::new(body.to_string())),
            status: Arc::new(AtomicU16::new(200)),
            hits: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (body, status, hits, stop) = (
            server.body.clone(),
            server.status.clone(),
            server.hits.clone(),
            server.stop.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                hits.lock().unwrap().push(Instant::now());
                let _ = answer(
                    &mut stream,
                    &body.lock().unwrap(),
                    status.load(Ordering::SeqCst),
                );
            }
        });
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/.well-known/jwks.json", self.port)
    }

    fn set_body(&self, body: Value) {
        *self.body.lock().unwrap() = body.to_string();
    }

    fn set_raw_body(&self, body: &str) {
        *self.body.lock().unwrap() = body.to_string();
    }

    fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn hits(&self) -> Vec<Instant> {
        self.hits.lock().unwrap().clone()
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one request head and answers it; one request per connection.
fn answer(stream: &mut TcpStream, body: &str, status: u16) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16_384 {
        if stream.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let body = if status == 200 { body } else { "unavailable" };
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn jwks(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

/// A server in JWT mode with HS256 off (`jwt_secret = ""`) plus `overrides`.
fn idp_server(overrides: &[(&str, &str)]) -> Server {
    let mut all = vec![("auth.mode", "jwt"), ("auth.jwt_secret", "\"\"")];
    all.extend_from_slice(overrides);
    Server::start(&all)
}

/// Writes `contents` into the test's directory and returns the path as text.
fn write_file(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_string()
}

/// Whether the upgrade with this token succeeds.
fn accepted(server: &Server, token: &str) -> bool {
    server.try_connect(&format!("token={token}"), &[]).is_ok()
}

/// The status and the reason line of a refused upgrade.
fn refusal(server: &Server, token: &str) -> (u16, String) {
    let (status, response) =
        server.raw_exchange(upgrade_request(&format!("token={token}"), &[]).as_bytes());
    let reason = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    (status, reason)
}

/// Retries the upgrade every 100 ms until it is accepted or `timeout` passes.
fn accepted_within(server: &Server, token: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if accepted(server, token) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn presence(server: &Server, user: &str) -> u64 {
    server
        .request("GET", &format!("/presence/user/{user}"), b"", &[])
        .json()["connections"]
        .as_u64()
        .unwrap()
}

#[test]
fn every_algorithm_is_accepted_with_a_key_of_its_own_type() {
    let mut idp = Signer::start();
    let rsa = idp.keygen("rsa");
    let p256 = idp.keygen("p256");
    let p384 = idp.keygen("p384");
    let ed = idp.keygen("ed25519");
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "jwks.json",
        &jwks(&[
            rsa.jwk("rsa", json!({})),
            p256.jwk("p256", json!({})),
            p384.jwk("p384", json!({})),
            ed.jwk("ed", json!({})),
        ])
        .to_string(),
    );
    let server = idp_server(&[("auth.jwks_file", &file)]);
    let cases = [
        ("RS256", &rsa, "rsa"),
        ("RS384", &rsa, "rsa"),
        ("RS512", &rsa, "rsa"),
        ("PS256", &rsa, "rsa"),
        ("PS384", &rsa, "rsa"),
        ("PS512", &rsa, "rsa"),
        ("ES256", &p256, "p256"),
        ("ES384", &p384, "p384"),
        ("EdDSA", &ed, "ed"),
    ];
    let mut open = Vec::new();
    for (alg, key, kid) in cases {
        let user = format!("user-{alg}");
        let token = idp.sign(alg, key, json!({ "kid": kid }), claims(&user));
        let ws = server
            .try_connect(&format!("token={token}"), &[])
            .unwrap_or_else(|e| panic!("{alg} token refused: {e}"));
        open.push(ws);
        assert_eq!(presence(&server, &user), 1, "{alg}");
    }
    // The identity is the token's: a publish to one of them reaches its connection.
    server.publish("/publish/user/user-EdDSA", "hello ed");
    assert_eq!(recv_text(open.last_mut().unwrap()), "hello ed");
    assert_eq!(
        server.metric("densepush_auth_keys", &[("source", "jwks_file")]),
        4
    );
}

#[test]
fn a_pem_public_key_file_verifies_tokens_with_or_without_kid() {
    let mut idp = Signer::start();
    let rsa = idp.keygen("rsa");
    let ed = idp.keygen("ed25519");
    let dir = tempfile::tempdir().unwrap();
    let pem = write_file(
        dir.path(),
        "idp.pem",
        &format!("{}{}", rsa.public_pem, ed.public_pem),
    );
    let server = idp_server(&[("auth.jwt_public_key_file", &pem)]);
    let rs = idp.sign("RS256", &rsa, json!({}), claims("pem-rs"));
    let ps = idp.sign("PS512", &rsa, json!({}), claims("pem-ps"));
    // PEM keys have no kid: a token naming one still verifies with them.
    let ed_token = idp.sign("EdDSA", &ed, json!({ "kid": "whatever" }), claims("pem-ed"));
    for token in [&rs, &ps, &ed_token] {
        assert!(accepted(&server, token), "{token}");
    }
    let other = idp.keygen("rsa");
    let foreign = idp.sign("RS256", &other, json!({}), claims("pem-rs"));
    assert_eq!(
        refusal(&server, &foreign),
        (401, "bad token signature".into())
    );
    assert_eq!(
        server.metric("densepush_auth_keys", &[("source", "public_key_file")]),
        2
    );
}

#[test]
fn an_alg_that_does_not_match_the_keys_type_is_refused() {
    let mut idp = Signer::start();
    let rsa = idp.keygen("rsa");
    let pinned = idp.keygen("rsa");
    let p256 = idp.keygen("p256");
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "jwks.json",
        &jwks(&[
            rsa.jwk("rsa", json!({})),
            pinned.jwk("pinned", json!({ "alg": "RS256" })),
            p256.jwk("p256", json!({})),
        ])
        .to_string(),
    );
    let pem = write_file(dir.path(), "rsa.pem", &rsa.public_pem);
    let server = idp_server(&[
        ("auth.jwks_file", &file),
        ("auth.jwt_public_key_file", &pem),
    ]);
    // Controls: the right algorithm with each key is accepted.
    assert!(accepted(
        &server,
        &idp.sign("ES256", &p256, json!({"kid": "p256"}), claims("u"))
    ));
    assert!(accepted(
        &server,
        &idp.sign("RS256", &pinned, json!({"kid": "pinned"}), claims("u"))
    ));
    let forged = [
        // An EC signature under the RSA key's kid.
        idp.sign("ES256", &p256, json!({"kid": "rsa"}), claims("u")),
        // An RSA signature under the EC key's kid.
        idp.sign("RS256", &rsa, json!({"kid": "p256"}), claims("u")),
        // The pinned key's own signature, but PS256 where its JWK says RS256.
        idp.sign("PS256", &pinned, json!({"kid": "pinned"}), claims("u")),
        // RFC 8725 §2.1: HS256 keyed with the RSA public key's PEM text, with and without its kid.
        idp.sign_hmac("HS256", &rsa.public_pem, json!({"kid": "rsa"}), claims("u")),
        idp.sign_hmac("HS256", &rsa.public_pem, json!({}), claims("u")),
        // P-256 signature claimed as ES384.
        idp.sign_raw(json!({
            "alg": "ES384", "sign_as": "ES256", "header": {"kid": "p256"},
            "claims": claims("u"), "private_pem": p256.private_pem,
        })),
    ];
    for token in &forged {
        assert_eq!(
            refusal(&server, token),
            (401, "token algorithm not accepted".into()),
            "{token}"
        );
    }
}

#[test]
fn alg_none_is_always_refused() {
    let mut idp = Signer::start();
    let rsa = idp.keygen("rsa");
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "jwks.json",
        &jwks(&[rsa.jwk("rsa", json!({}))]).to_string(),
    );
    let server = idp_server(&[("auth.jwks_file", &file), ("auth.jwt_secret", TEST_SECRET)]);
    for (alg, header) in [
        ("none", json!({})),
        ("none", json!({"kid": "rsa"})),
        ("None", json!({})),
        ("NONE", json!({"kid": "rsa"})),
    ] {
        let token = idp.sign_raw(json!({
            "alg": alg, "header": header, "claims": claims("u"), "none": true,
        }));
        assert!(token.ends_with('.'), "{token}");
        assert_eq!(
            refusal(&server, &token),
            (401, "token algorithm not accepted".into()),
            "{alg}"
        );
    }
}

#[test]
fn hs256_secrets_rotate_by_kid() {
    const OLD: &str = "rotation-secret-2027-01-long-enough-aaaaaaaa";
    const NEW: &str = "rotation-secret-2027-06-long-enough-bbbbbbbb";
    let secrets = format!(
        r#"[{{ kid = "2027-01", secret = "{OLD}" }}, {{ kid = "2027-06", secret = "{NEW}" }}]"#
    );
    let server = Server::start(&[
        ("auth.mode", "jwt"),
        ("auth.jwt_secret", TEST_SECRET),
        ("auth.jwt_secrets", &secrets),
    ]);
    let mut idp = Signer::start();
    let mut hs = |secret: &str, header: Value| idp.sign_hmac("HS256", secret, header, claims("u"));
    // Each kid selects its own secret.
    assert!(accepted(&server, &hs(NEW, json!({"kid": "2027-06"}))));
    assert!(accepted(&server, &hs(OLD, json!({"kid": "2027-01"}))));
    assert_eq!(
        refusal(&server, &hs(OLD, json!({"kid": "2027-06"}))),
        (401, "bad token signature".into())
    );
    // A token without kid is checked with each secret; one with an unknown kid with the secrets that have
    // no kid (auth.jwt_secret), so tokens minted before the rotation keep working.
    assert!(accepted(&server, &hs(TEST_SECRET, json!({}))));
    assert!(accepted(&server, &hs(NEW, json!({}))));
    assert!(accepted(
        &server,
        &hs(TEST_SECRET, json!({"kid": "legacy"}))
    ));
    assert_eq!(
        refusal(&server, &hs(NEW, json!({"kid": "2028-01"}))),
        (401, "token key id not known".into())
    );
    // `densepush token` still mints with auth.jwt_secret.
    assert!(accepted(&server, &server.token(&["--user", "dev"])));
    assert_eq!(
        server.metric("densepush_auth_keys", &[("source", "secret")]),
        3
    );
}

#[test]
fn an_unknown_kid_refreshes_the_jwks_and_the_new_key_is_accepted() {
    let mut idp = Signer::start();
    let k1 = idp.keygen("rsa");
    let k2 = idp.keygen("ed25519");
    let endpoint = JwksServer::start(0, jwks(&[k1.jwk("k1", json!({}))]));
    let server = idp_server(&[
        ("auth.jwks_url", &endpoint.url()),
        ("auth.jwks_refresh_secs", "3600"),
        ("auth.jwks_min_refresh_secs", "1"),
    ]);
    // Fetched at start, before the server said it was listening.
    assert_eq!(endpoint.hits().len(), 1);
    assert!(accepted(
        &server,
        &idp.sign("RS256", &k1, json!({"kid": "k1"}), claims("u1"))
    ));
    // The provider rotates: k2 appears in its set, and a token signed with it arrives.
    endpoint.set_body(jwks(&[k1.jwk("k1", json!({})), k2.jwk("k2", json!({}))]));
    let new = idp.sign("EdDSA", &k2, json!({"kid": "k2"}), claims("u2"));
    assert_eq!(
        refusal(&server, &new),
        (401, "token key id not known".into())
    );
    assert!(
        accepted_within(&server, &new, Duration::from_secs(5)),
        "the k2 token was never accepted"
    );
    assert_eq!(endpoint.hits().len(), 2, "one refresh for the unknown kid");
    assert_eq!(
        server.metric("densepush_auth_jwks_unknown_kid_refreshes_total", &[]),
        1
    );
    assert_eq!(
        server.metric("densepush_auth_jwks_refreshes_total", &[("result", "ok")]),
        2
    );
    assert_eq!(
        server.metric("densepush_auth_keys", &[("source", "jwks_url")]),
        2
    );
}

#[test]
fn unknown_kid_refreshes_are_rate_limited() {
    let mut idp = Signer::start();
    let key = idp.keygen("p256");
    let endpoint = JwksServer::start(0, jwks(&[key.jwk("k", json!({}))]));
    let server = idp_server(&[
        ("auth.jwks_url", &endpoint.url()),
        ("auth.jwks_refresh_secs", "3600"),
        ("auth.jwks_min_refresh_secs", "3"),
    ]);
    let burst = |idp: &mut Signer| {
        for i in 0..20 {
            let token = idp.sign(
                "ES256",
                &key,
                json!({"kid": format!("nope-{i}")}),
                claims("u"),
            );
            assert_eq!(refusal(&server, &token).0, 401);
        }
    };
    burst(&mut idp);
    // Twenty unknown kids make one fetch, no sooner than 3 s after the one at start.
    assert!(wait_until(Duration::from_secs(8), || endpoint.hits().len() >= 2));
    std::thread::sleep(Duration::from_millis(1500));
    let hits = endpoint.hits();
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert!(hits[1] - hits[0] >= Duration::from_millis(2900), "{hits:?}");
    // Another burst right away waits its turn again.
    burst(&mut idp);
    assert!(wait_until(Duration::from_secs(8), || endpoint.hits().len() >= 3));
    let hits = endpoint.hits();
    assert!(hits[2] - hits[1] >= Duration::from_millis(2900), "{hits:?}");
    // Counted once the fetch is applied, a moment after the endpoint answered.
    assert!(wait_until(Duration::from_secs(5), || {
        server.metric("densepush_auth_jwks_unknown_kid_refreshes_total", &[]) == 2
    }));
}

#[test]
fn a_jwks_endpoint_down_at_start_is_used_once_it_comes_up() {
    let mut idp = Signer::start();
    let key = idp.keygen("rsa");
    let port = JwksServer::reserve_port();
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    // Nothing listens on the port: the server starts all the same.
    let server = idp_server(&[
        ("auth.jwks_url", &url),
        ("auth.jwks_refresh_secs", "3600"),
        ("auth.jwks_min_refresh_secs", "1"),
    ]);
    let token = idp.sign("PS256", &key, json!({"kid": "k"}), claims("late"));
    assert_eq!(
        refusal(&server, &token),
        (401, "token key id not known".into())
    );
    // Refused tokens ask again (at most once a second); each attempt fails and is counted...
    assert!(wait_until(Duration::from_secs(5), || {
        let _ = refusal(&server, &token);
        server.metric(
            "densepush_auth_jwks_refreshes_total",
            &[("result", "failed")],
        ) >= 3
    }));
    // ...but logged once.
    assert_eq!(
        server.log().matches("fetch failed (").count(),
        1,
        "{}",
        server.log()
    );
    assert_eq!(
        server.metric("densepush_auth_keys", &[("source", "jwks_url")]),
        0
    );
    let _endpoint = JwksServer::start(port, jwks(&[key.jwk("k", json!({}))]));
    assert!(
        accepted_within(&server, &token, Duration::from_secs(5)),
        "the token was never accepted after the endpoint came up"
    );
    assert!(
        server.log().contains("fetched 1 keys again after"),
        "{}",
        server.log()
    );
}

#[test]
fn a_failed_refresh_keeps_the_last_good_keys() {
    let mut idp = Signer::start();
    let key = idp.keygen("ed25519");
    let endpoint = JwksServer::start(0, jwks(&[key.jwk("k", json!({}))]));
    let server = idp_server(&[
        ("auth.jwks_url", &endpoint.url()),
        ("auth.jwks_refresh_secs", "3600"),
        ("auth.jwks_min_refresh_secs", "1"),
    ]);
    let good = idp.sign("EdDSA", &key, json!({"kid": "k"}), claims("u"));
    assert!(accepted(&server, &good));
    let failed = || {
        server.metric(
            "densepush_auth_jwks_refreshes_total",
            &[("result", "failed")],
        )
    };
    // The endpoint answers 503, then garbage: each refresh (asked for by an unknown kid) fails.
    endpoint.set_status(503);
    let unknown = idp.sign("EdDSA", &key, json!({"kid": "other"}), claims("u"));
    assert_eq!(refusal(&server, &unknown).0, 401);
    assert!(wait_until(Duration::from_secs(5), || failed() >= 1));
    assert!(accepted(&server, &good), "keys lost after a 503");
    endpoint.set_status(200);
    endpoint.set_raw_body("<html>maintenance</html>");
    assert!(wait_until(Duration::from_secs(5), || {
        let _ = refusal(&server, &unknown);
        failed() >= 2
    }));
    assert!(accepted(&server, &good), "keys lost after a bad body");
    assert_eq!(
        server.metric("densepush_auth_keys", &[("source", "jwks_url")]),
        1
    );
}

#[test]
fn issuer_and_audience_are_checked() {
    let mut idp = Signer::start();
    let key = idp.keygen("p384");
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "jwks.json",
        &jwks(&[key.jwk("k", json!({}))]).to_string(),
    );
    let server = idp_server(&[
        ("auth.jwks_file", &file),
        ("auth.issuer", "https://idp.test/realms/main"),
        ("auth.audience", "densepush"),
    ]);
    let with = |idp: &mut Signer, extra: Value| {
        let mut c = claims("u");
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        idp.sign("ES384", &key, json!({"kid": "k"}), c)
    };
    let iss = "https://idp.test/realms/main";
    for good in [
        json!({"iss": iss, "aud": "densepush"}),
        json!({"iss": iss, "aud": ["account", "densepush"]}),
    ] {
        assert!(accepted(&server, &with(&mut idp, good.clone())), "{good}");
    }
    for (bad, reason) in [
        (
            json!({"iss": "https://evil.test/", "aud": "densepush"}),
            "token issuer not accepted",
        ),
        (json!({"aud": "densepush"}), "token issuer not accepted"),
        (
            json!({"iss": iss, "aud": "account"}),
            "token audience not accepted",
        ),
        (json!({"iss": iss}), "token audience not accepted"),
    ] {
        assert_eq!(
            refusal(&server, &with(&mut idp, bad.clone())),
            (401, reason.to_string()),
            "{bad}"
        );
    }
}

#[test]
fn an_https_jwks_url_is_fetched_over_tls_trusting_the_configured_ca() {
    let mut idp = Signer::start();
    let key = idp.keygen("rsa");
    let dir = tempfile::tempdir().unwrap();
    let tls = idp.call(json!({ "op": "tls", "dir": dir.path() }));
    write_file(
        dir.path(),
        "jwks.json",
        &jwks(&[key.jwk("k", json!({}))]).to_string(),
    );
    let mut https = Command::new(python())
        .arg(script())
        .args(["serve-https", dir.path().to_str().unwrap()])
        .args([tls["cert"].as_str().unwrap(), tls["key"].as_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the https server");
    let mut line = String::new();
    BufReader::new(https.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("port ")
        .expect("a port line")
        .to_string();
    let url = format!("https://127.0.0.1:{port}/jwks.json");
    let token = idp.sign("RS384", &key, json!({"kid": "k"}), claims("tls"));

    let trusting = idp_server(&[
        ("auth.jwks_url", &url),
        ("auth.jwks_ca_file", tls["ca"].as_str().unwrap()),
    ]);
    assert!(accepted(&trusting, &token), "{}", trusting.log());

    // The bundled Mozilla roots do not know the test CA: the fetch fails, and so does the token.
    let untrusting = idp_server(&[("auth.jwks_url", &url)]);
    assert_eq!(refusal(&untrusting, &token).0, 401);
    assert!(
        untrusting.metric(
            "densepush_auth_jwks_refreshes_total",
            &[("result", "failed")]
        ) >= 1
    );
    let log = untrusting.log();
    assert!(log.contains("UnknownIssuer"), "{log}");
    let _ = https.kill();
    let _ = https.wait();
}

#[test]
fn bad_key_files_stop_the_server_naming_the_key_and_the_file() {
    let mut idp = Signer::start();
    let key = idp.keygen("rsa");
    let dir = tempfile::tempdir().unwrap();
    let private = write_file(dir.path(), "private.pem", &key.private_pem);
    let missing = dir
        .path()
        .join("missing.json")
        .to_str()
        .unwrap()
        .to_string();
    for (setting, path, why) in [
        ("auth.jwt_public_key_file", &private, "is a private key"),
        ("auth.jwks_file", &missing, "No such file"),
        ("auth.jwks_ca_file", &private, "holds a private key"),
    ] {
        let config = dir.path().join("config.toml");
        let mut overrides = vec![("auth.mode", "jwt"), (setting, path.as_str())];
        if setting == "auth.jwks_ca_file" {
            overrides.push(("auth.jwks_url", "https://127.0.0.1:9/jwks.json"));
        }
        write_config(&config, &overrides);
        let config = config.to_str().unwrap();
        // check-config reads the key files (the CA file is read when the refresher starts).
        let mut runs = vec![vec!["--config", config]];
        if setting != "auth.jwks_ca_file" {
            runs.push(vec!["--config", config, "check-config"]);
        }
        for args in runs {
            let out = cli(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&format!("{setting} {path}: ")) && stderr.contains(why),
                "{args:?}: {stderr}"
            );
        }
    }
}

#[test]
fn the_token_command_needs_the_hs256_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    write_config(
        &config,
        &[
            ("auth.mode", "jwt"),
            ("auth.jwt_secret", "\"\""),
            ("auth.jwks_url", "https://idp.test/jwks.json"),
        ],
    );
    let out = cli(&["--config", config.to_str().unwrap(), "token", "--user", "u"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.jwt_secret"));
}
