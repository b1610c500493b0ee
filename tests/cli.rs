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

// ---- refusals: listeners beyond loopback open to anyone ---------------------------------------------------

/// Runs the server on a config of the test base plus `overrides`, expecting it to refuse to start: returns its
/// exit status and stderr. Killed after a while if it started after all, so a regression fails instead of
/// hanging the test.
fn refused_start(overrides: &[(&str, &str)]) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(&path, overrides);
    let mut child = command()
        .arg("--config")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `check-config` on the same config: its exit status and stderr.
fn check_config(overrides: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(&path, overrides);
    let out = cli(&["--config", path.to_str().unwrap(), "check-config"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each unsafe setting beyond loopback, and the key its refusal must name.
const REFUSALS: &[(&str, &[(&str, &str)])] = &[
    (
        "auth.jwt_secret",
        &[("auth.mode", "jwt"), ("server.listen", "0.0.0.0:0")],
    ),
    ("auth.mode", &[("server.listen", "0.0.0.0:0")]),
    ("admin.api_key", &[("admin.listen", "0.0.0.0:0")]),
];

#[test]
fn unsafe_settings_beyond_loopback_refuse_to_start_naming_the_key_and_the_fix() {
    for (key, overrides) in REFUSALS {
        let (status, stdout, stderr) = refused_start(overrides);
        assert_eq!(status.code(), Some(2), "{key}: {status:?} {stderr}");
        assert!(!stdout.contains("listening"), "{key}: started: {stdout}");
        let line = stderr.trim();
        assert!(line.contains(&format!("{key} ")), "{key} not named: {line}");
        assert!(line.contains("auth.allow_insecure = true"), "{line}");
        assert!(line.contains("loopback"), "{line}");
    }
}

#[test]
fn the_development_secret_refusal_says_which_variable_to_set() {
    let (_, _, stderr) = refused_start(REFUSALS[0].1);
    assert!(stderr.contains("DENSEPUSH_AUTH_JWT_SECRET"), "{stderr}");
    let (_, _, stderr) = refused_start(REFUSALS[2].1);
    assert!(stderr.contains("DENSEPUSH_ADMIN_API_KEY"), "{stderr}");
}

#[test]
fn check_config_reports_the_same_refusals() {
    for (key, overrides) in REFUSALS {
        let (ok, stderr) = check_config(overrides);
        assert!(!ok, "{key}: check-config accepted it");
        assert!(stderr.contains(&format!("{key} ")), "{key}: {stderr}");
    }
}

#[test]
fn allow_insecure_starts_each_refused_config_with_a_warning() {
    for (key, overrides) in REFUSALS {
        let mut opted_in = overrides.to_vec();
        opted_in.push(("auth.allow_insecure", "true"));
        assert!(
            check_config(&opted_in).0,
            "{key}: check-config refused the opt-in"
        );
        let server = Server::start(&opted_in);
        assert_eq!(server.request("GET", "/healthz", b"", &[]).status, 200);
        assert!(
            wait_until(std::time::Duration::from_secs(2), || server
                .log()
                .contains("started only because auth.allow_insecure = true")),
            "{key}: no warning:\n{}",
            server.log()
        );
    }
}

#[test]
fn the_same_settings_on_loopback_still_start() {
    // The quick start: the shipped development secret and an admin listener without a key, on loopback.
    let server = Server::start(&[("auth.mode", "jwt")]);
    assert_eq!(server.request("GET", "/healthz", b"", &[]).status, 200);
    assert!(server.log().contains("shipped development secret"));
}

#[test]
fn a_secret_of_your_own_and_an_admin_key_start_beyond_loopback() {
    let server = Server::start(&[
        ("auth.mode", "jwt"),
        ("auth.jwt_secret", TEST_SECRET),
        ("server.listen", "0.0.0.0:0"),
        ("admin.listen", "0.0.0.0:0"),
        ("admin.api_key", "k-0123456789"),
    ]);
    let auth = [("Authorization", "Bearer k-0123456789")];
    assert_eq!(server.request("GET", "/metrics", b"", &auth).status, 200);
}

#[test]
fn the_systemd_unit_fails_to_start_without_its_secrets_file() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/densepush.service"
    ))
    .unwrap();
    let files: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("EnvironmentFile="))
        .collect();
    // systemd skips a missing file only when its path starts with "-".
    assert_eq!(files, ["/etc/densepush/env"], "{unit}");
}
