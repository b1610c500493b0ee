//! The start-up refusals: settings that are harmless on loopback but hand the server to anyone once it listens
//! on another address. The development secret, `auth.mode = "none"` on a client listener beyond loopback, or an
//! admin listener beyond loopback without `admin.api_key`, make the configuration invalid unless
//! `auth.allow_insecure = true` says the network is trusted.
//!
//! It owns these rules and their wording (each error names the key and how to fix it); it does not log the
//! warnings an opted-in server prints (`main` does, through [`Config::uses_dev_secret`] and friends).

use std::net::SocketAddr;

use super::error::invalid;
use super::{AuthMode, Config, ConfigError};

/// The opt-in every refusal mentions.
const OPT_IN: &str = "or set auth.allow_insecure = true (for trusted networks only)";

/// Whether only this host can reach `addr`. IPv4-mapped IPv6 loopback (`::ffff:127.0.0.1`) counts.
pub(super) fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The first rule `config` breaks, unless `auth.allow_insecure` is set. Checked after every section, since each
/// rule pairs an `[auth]` or `[admin]` setting with a listener.
pub(super) fn check(config: &Config) -> Result<(), ConfigError> {
    if config.auth.allow_insecure {
        return Ok(());
    }
    // The first client listener (ws:// or wss://) that is reachable from elsewhere, by its key.
    let exposed = [
        ("server.listen", config.server.listen),
        ("tls.listen", config.tls.listen),
    ]
    .into_iter()
    .find_map(|(key, addr)| addr.filter(|a| !is_loopback(a)).map(|a| (key, a)));
    if let (AuthMode::None, Some((key, clients))) = (config.auth.mode, exposed) {
        return Err(invalid(
            "auth.mode",
            format!(
                "is \"none\" and {key} ({clients}) is not a loopback address: anyone who can reach it \
                 connects as any user. Use auth.mode = \"jwt\" with a secret of your own, listen on loopback, \
                 {OPT_IN}"
            ),
        ));
    }
    if let (true, Some((key, clients))) = (config.uses_dev_secret(), exposed) {
        return Err(invalid(
            "auth.jwt_secret",
            format!(
                "is the public development secret shipped in config.toml and {key} ({clients}) is not a \
                 loopback address: anyone can mint a token for any user. Set DENSEPUSH_AUTH_JWT_SECRET (or \
                 auth.jwt_secret_env) to a secret of at least 32 bytes, listen on loopback, {OPT_IN}"
            ),
        ));
    }
    let admin = config.admin.listen;
    if config.admin.api_key.is_none() && !is_loopback(&admin) {
        return Err(invalid(
            "admin.api_key",
            format!(
                "is empty and admin.listen ({admin}) is not a loopback address: anyone who can reach it can \
                 publish to and disconnect every client. Set DENSEPUSH_ADMIN_API_KEY (or admin.api_key), keep \
                 admin.listen on loopback, {OPT_IN}"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    use crate::config::test_support::*;

    const SECRET: &str = "[auth]\njwt_secret = \"a-production-secret-that-is-long-enough\"\n";

    #[test]
    fn the_shipped_defaults_on_loopback_are_accepted() {
        assert!(defaults().uses_dev_secret());
        assert!(parse("[auth]\nmode = \"none\"").is_ok());
        assert!(
            parse("[server]\nlisten = \"127.0.0.2:8080\"\n[admin]\nlisten = \"[::1]:8081\"")
                .is_ok()
        );
        assert!(parse("[server]\nlisten = \"[::ffff:127.0.0.1]:8080\"").is_ok());
    }

    #[test]
    fn the_development_secret_beyond_loopback_is_refused_naming_the_key_and_the_fix() {
        let (key, msg) = invalid_key("[server]\nlisten = \"0.0.0.0:8080\"");
        assert_eq!(key, "auth.jwt_secret");
        assert!(msg.contains("development secret"), "{msg}");
        assert!(msg.contains("0.0.0.0:8080"), "{msg}");
        assert!(msg.contains("DENSEPUSH_AUTH_JWT_SECRET"), "{msg}");
        assert!(msg.contains("auth.allow_insecure = true"), "{msg}");
        assert!(parse(&format!("{SECRET}[server]\nlisten = \"0.0.0.0:8080\"")).is_ok());
    }

    #[test]
    fn mode_none_beyond_loopback_is_refused_naming_the_key() {
        let (key, msg) = invalid_key("[server]\nlisten = \"[::]:8080\"\n[auth]\nmode = \"none\"");
        assert_eq!(key, "auth.mode");
        assert!(msg.contains("auth.allow_insecure = true"), "{msg}");
    }

    #[test]
    fn an_admin_listener_beyond_loopback_without_a_key_is_refused_naming_the_key() {
        let (key, msg) = invalid_key("[admin]\nlisten = \"10.0.0.5:8081\"");
        assert_eq!(key, "admin.api_key");
        assert!(msg.contains("10.0.0.5:8081"), "{msg}");
        assert!(msg.contains("DENSEPUSH_ADMIN_API_KEY"), "{msg}");
        assert!(parse("[admin]\nlisten = \"10.0.0.5:8081\"\napi_key = \"k-0123456789\"").is_ok());
    }

    #[test]
    fn allow_insecure_accepts_each_refusal() {
        for text in [
            "[server]\nlisten = \"0.0.0.0:8080\"",
            "[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\nmode = \"none\"",
            "[admin]\nlisten = \"0.0.0.0:8081\"",
        ] {
            assert!(parse(text).is_err(), "{text}");
            let opted_in = if text.contains("[auth]") {
                text.replace("[auth]", "[auth]\nallow_insecure = true")
            } else {
                format!("{text}\n[auth]\nallow_insecure = true")
            };
            let config = parse(&opted_in).unwrap_or_else(|e| panic!("{opted_in}: {e}"));
            assert!(config.auth.allow_insecure);
        }
    }

    #[test]
    fn a_refusal_caused_by_an_override_names_the_variable() {
        let err = parse_env(
            "",
            &[
                ("DENSEPUSH_AUTH_MODE", "none"),
                ("DENSEPUSH_SERVER_LISTEN", "0.0.0.0:1"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("auth.mode "), "{err}");
        assert!(err.contains("DENSEPUSH_AUTH_MODE"), "{err}");
    }
}
