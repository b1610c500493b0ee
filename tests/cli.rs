//! The command line: `check-config` (with `[tls]`: the certificate pair too) and `token`.

mod common;

use common::*;

#[test]
fn check_config_accepts_the_shipped_config_toml() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let out = cli(&["--config", shipped, "check-config"]);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_rejects_an_unknown_key_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\nlistne_backlog = 5\n",
    )
    .unwrap();
    let out = cli(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(!out.status.success(), "unknown key accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listne_backlog"),
        "error does not name the key: {stderr}"
    );
}

#[test]
fn check_config_rejects_an_unknown_section_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[sever]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = cli(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(!out.status.success(), "unknown section accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sever"),
        "error does not name the section: {stderr}"
    );
}

#[test]
fn check_config_rejects_max_publish_bytes_over_max_outbox_bytes_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(&path, &[("websocket.max_outbox_bytes", "65536")]);
    let out = cli(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(
        !out.status.success(),
        "max_publish_bytes (1 MiB default) > max_outbox_bytes accepted"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("admin.max_publish_bytes"), "{stderr}");
}

#[test]
fn check_config_accepts_the_test_base_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(&path, &[]);
    let out = cli(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn server_with_an_invalid_config_exits_non_zero_without_listening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(&path, &[("websocket.pong_timeout_ms", "40000")]);
    let out = cli(&["--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("websocket.pong_timeout_ms"));
}

#[test]
fn token_prints_an_hs256_jwt_with_the_given_claims() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(
        &path,
        &[("auth.mode", "jwt"), ("auth.jwt_secret", TEST_SECRET)],
    );
    let token = token_with_config(
        &path,
        &[
            "--user",
            "alice",
            "--client",
            "phone",
            "--channels",
            "a,b",
            "--ttl",
            "60",
        ],
    );
    let claims = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["client"], "phone");
    assert_eq!(claims["channels"], serde_json::json!(["a", "b"]));
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 60);
    // And the key verifies it.
    let key = jsonwebtoken::DecodingKey::from_secret(TEST_SECRET.as_bytes());
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_exp = true;
    jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).expect("verifies");
}

#[test]
fn unknown_environment_override_is_rejected_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(&path, &[]);
    let out = cli_with_env(
        &["--config", path.to_str().unwrap(), "check-config"],
        &[("DENSEPUSH_SERVER_LISTNE", "127.0.0.1:1")],
    );
    assert!(!out.status.success(), "unknown override accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DENSEPUSH_SERVER_LISTNE"), "{stderr}");
}

#[test]
fn environment_override_sets_the_admin_api_key() {
    let key = "key-from-env-0123";
    let server = Server::start_with_env(&[], &[("DENSEPUSH_ADMIN_API_KEY", key)]);
    assert_eq!(server.request("GET", "/metrics", b"", &[]).status, 401);
    let auth = format!("Bearer {key}");
    assert_eq!(
        server
            .request("GET", "/metrics", b"", &[("Authorization", &auth)])
            .status,
        200
    );
}

#[test]
fn jwt_secret_env_names_the_variable_holding_the_secret() {
    let env = [(
        "IT_DENSEPUSH_SECRET",
        "secret-held-in-an-environment-variable-42",
    )];
    let server = Server::start_with_env(
        &[
            ("auth.mode", "jwt"),
            ("auth.jwt_secret_env", "IT_DENSEPUSH_SECRET"),
        ],
        &env,
    );
    let config = server.config_path.to_str().unwrap();
    let out = cli_with_env(&["--config", config, "token", "--user", "alice"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut ws = server.connect(&format!("token={token}"));
    server.publish("/publish/user/alice", "signed with the env secret");
    assert_eq!(recv_text(&mut ws), "signed with the env secret");
    // A token signed with the jwt_secret key's value (the default dev secret) must not verify.
    let dev = server.dir().join("dev.toml");
    write_config(&dev, &[("auth.mode", "jwt")]);
    let dev_token = token_with_config(&dev, &["--user", "alice"]);
    assert_eq!(
        server.refused_status(&format!("token={dev_token}"), &[]),
        401
    );
}

// ---- check-config with [tls] on ---------------------------------------------------------------------------

/// Runs `check-config` on the base config with `[tls]` on and these files; returns (success, stdout and
/// stderr).
fn check_tls_config(cert_file: &std::path::Path, key_file: &std::path::Path) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(
        &path,
        &[
            ("tls.listen", "127.0.0.1:0"),
            ("tls.cert_file", cert_file.to_str().unwrap()),
            ("tls.key_file", key_file.to_str().unwrap()),
        ],
    );
    let out = cli(&["--config", path.to_str().unwrap(), "check-config"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn check_config_accepts_a_matching_unexpired_tls_pair() {
    let pki = TestPki::new(30);
    let (ok, output) = check_tls_config(&pki.cert_file, &pki.key_file);
    assert!(ok, "{output}");
    assert!(output.trim_end().ends_with(": ok"), "{output}");
}

#[test]
fn check_config_rejects_a_missing_certificate_file_naming_the_key_and_file() {
    let pki = TestPki::new(30);
    let missing = pki.dir().join("missing.crt");
    let (ok, stderr) = check_tls_config(&missing, &pki.key_file);
    assert!(!ok, "a missing certificate file was accepted");
    assert!(stderr.contains("tls.cert_file"), "{stderr}");
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
}

#[test]
fn check_config_rejects_a_key_that_does_not_match_the_certificate_naming_the_key_and_file() {
    let pki = TestPki::new(30);
    let other = TestPki::new(30);
    let (ok, stderr) = check_tls_config(&pki.cert_file, &other.key_file);
    assert!(!ok, "a key of another certificate was accepted");
    assert!(stderr.contains("tls.key_file"), "{stderr}");
    assert!(
        stderr.contains(other.key_file.to_str().unwrap()),
        "{stderr}"
    );
    assert!(stderr.contains("does not match"), "{stderr}");
}

#[test]
fn check_config_rejects_an_expired_certificate_naming_the_key_and_file() {
    let pki = TestPki::new(-3);
    let (ok, stderr) = check_tls_config(&pki.cert_file, &pki.key_file);
    assert!(!ok, "an expired certificate was accepted");
    assert!(stderr.contains("tls.cert_file"), "{stderr}");
    assert!(stderr.contains(pki.cert_file.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("expired"), "{stderr}");
}
