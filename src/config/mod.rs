//! densepush's configuration: `config.toml` (read into [`FileConfig`], where every key is optional)
//! plus `DENSEPUSH_<SECTION>_<KEY>` environment overrides, validated into a [`Config`] of plain values.
//!
//! Owns the defaults (one named constant per setting, with its unit), parsing, the environment
//! overrides, validation, the refusal of settings that open a listener beyond loopback to anyone
//! (`exposure`), and resolving the reactor count and the JWT secret. It does not bind sockets, set up
//! logging or print warnings: it exposes [`Config::uses_dev_secret`] and
//! [`Config::admin_exposed_without_key`] so `main` can warn about insecure settings that are allowed
//! (on loopback, or with `auth.allow_insecure`).
//!
//! Pipeline: text → `toml::Table` (syntax errors, with line) → overrides applied to that tree →
//! [`FileConfig`] (serde with `deny_unknown_fields`, so typos are errors, not silent defaults) →
//! [`Config`] (range and cross-field checks). Every error names the key it is about.
//!
//! This file holds the checked [`Config`], the value types it shares with the file ([`AuthMode`],
//! [`LogLevel`]), secret redaction for `Debug`, and the order of the steps. Each part owns one job:
//! `defaults` (every `DEFAULT_*`), [`limits`] (accepted ranges), `file` (the file's shape), `env`
//! (overrides), `validate` (checks, one function per section), `exposure` (the start-up refusals) and
//! `error` ([`ConfigError`] and one-line parse messages). Everything public is re-exported here, so callers only ever name `config::X`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod defaults;
mod env;
mod error;
mod exposure;
mod file;
pub mod limits;
mod validate;

pub use defaults::*;
pub use error::ConfigError;
pub use file::{
    AdminSection, AuthSection, ClusterSection, DiagnosticsSection, EventsSection, FileConfig,
    HistorySection, JwtSecretEntry, LogSection, ServerSection, TlsSection, WebSocketSection,
};

use env::{apply_env_overrides, blame_env, process_env};
use error::{shape_error, syntax_error};

/// How clients authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A JWT in the upgrade request names the user and the channels.
    Jwt,
    /// No authentication: for development and trusted networks only.
    None,
}

/// Log verbosity, least to most verbose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Informational messages and above.
    Info,
    /// Debugging detail and above.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn to_level_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// A URL with its user-info (`user:password@`) replaced, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

/// Debug stand-in for a secret: shows only its length (0 reads as "not set").
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, {} bytes>", self.0)
    }
}

/// The checked configuration the server runs with. Build it with [`Config::load`] or
/// [`Config::from_toml_str`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `[server]`
    pub server: ServerConfig,
    /// `[websocket]`
    pub websocket: WebSocketConfig,
    /// `[auth]`
    pub auth: AuthConfig,
    /// `[admin]`
    pub admin: AdminConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[cluster]`
    pub cluster: ClusterConfig,
    /// `[history]`
    pub history: HistoryConfig,
    /// `[diagnostics]`
    pub diagnostics: DiagnosticsSection,
    /// `[tls]`
    pub tls: TlsConfig,
    /// `[events]`
    pub events: EventsConfig,
}

/// `[events]`, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// Where events are POSTed (`http://` or `https://`); `None` turns events off.
    pub webhook_url: Option<String>,
    /// The `Authorization` header value of every request; visible ASCII and spaces only.
    pub authorization: Option<String>,
    /// Milliseconds an event waits at most before its request starts.
    pub batch_ms: u64,
    /// Events per request at most.
    pub max_batch: usize,
    /// Events queued at most; past it new events are dropped and counted.
    pub queue_size: usize,
    /// Milliseconds one request may take.
    pub timeout_ms: u64,
    /// Retries of a failed request before its events are dropped and counted.
    pub max_retries: u32,
    /// CA certificates for an `https` webhook; `None` for the bundled Mozilla roots.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for EventsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventsConfig")
            .field("webhook_url", &self.webhook_url.as_deref().map(redact_url))
            .field(
                "authorization",
                &self.authorization.as_ref().map(|a| Redacted(a.len())),
            )
            .field("batch_ms", &self.batch_ms)
            .field("max_batch", &self.max_batch)
            .field("queue_size", &self.queue_size)
            .field("timeout_ms", &self.timeout_ms)
            .field("max_retries", &self.max_retries)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// `[tls]`, checked: both files are named whenever the listener is on (their contents are checked by
/// `tls::Tls::load`, at start and by `check-config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// The wss:// listener; `None` when TLS is off.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain.
    pub cert_file: std::path::PathBuf,
    /// PEM private key.
    pub key_file: std::path::PathBuf,
}

/// `[history]`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryConfig {
    /// History for `user:` streams.
    pub user: bool,
    /// History for `channel:` streams.
    pub channel: bool,
    /// History for the `all` stream.
    pub all: bool,
    /// Messages kept per stream.
    pub size: usize,
    /// Seconds a message is kept.
    pub ttl_secs: u64,
    /// Bytes all streams' history may use.
    pub max_bytes: usize,
}

/// `[server]`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Client WebSocket listener (ws://); `None` when `server.listen` is empty (TLS only).
    pub listen: Option<SocketAddr>,
    /// Upgrade path; starts with '/', no query or fragment.
    pub path: String,
    /// Server-Sent Events path (same rules, distinct from `path`); `None` when SSE is off.
    pub sse_path: Option<String>,
    /// Milliseconds an EventSource waits before reconnecting (`retry:`).
    pub sse_retry_ms: u64,
    /// Reactor threads, resolved: at least 1.
    pub reactors: usize,
    /// Client connections across all reactors; at least 1.
    pub max_connections: usize,
    /// Allowed `Origin` values as `scheme://host[:port]`, ASCII-lowercased (browsers send them
    /// lowercased, RFC 6454 §6.2; compare case-insensitively anyway). Empty allows any origin.
    pub allowed_origins: Vec<String>,
    /// Milliseconds to wait for clients to close after SIGTERM.
    pub shutdown_timeout_ms: u64,
    /// Bytes in each reactor's scratch read buffer.
    pub read_buffer_bytes: usize,
}

/// `[websocket]`, checked. Every timeout is at least one tick; `pong_timeout_ms < ping_interval_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct WebSocketConfig {
    pub handshake_timeout_ms: u64,
    pub ping_interval_ms: u64,
    pub pong_timeout_ms: u64,
    pub close_timeout_ms: u64,
    pub max_inbound_message_bytes: usize,
    pub max_outbox_bytes: usize,
    pub max_handshake_bytes: usize,
    pub max_handshake_headers: usize,
    pub max_buffered_bytes_total: usize,
    pub timer_tick_ms: u64,
    /// Negotiate permessage-deflate.
    pub compression: bool,
    /// Payloads shorter than this go uncompressed.
    pub compression_min_bytes: usize,
    /// zlib level 0-9.
    pub compression_level: u32,
}

/// `[auth]`, checked, with the secret resolved. Key files are only named here; `auth::load_static_keys`
/// reads them (at start, and in `densepush check-config`).
#[derive(Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// How clients authenticate.
    pub mode: AuthMode,
    /// The HS256 secret: from the variable named by `auth.jwt_secret_env` when that is set, else
    /// `auth.jwt_secret`. At least 32 bytes, or empty when another key source is configured (always empty
    /// in `none` mode). `densepush token` signs with it.
    pub secret: Vec<u8>,
    /// `auth.jwt_secrets`: more HS256 secrets, each at least 32 bytes, kids distinct.
    pub secrets: Vec<JwtSecret>,
    /// `auth.jwt_public_key_file`.
    pub public_key_file: Option<PathBuf>,
    /// `auth.jwks_file`.
    pub jwks_file: Option<PathBuf>,
    /// `auth.jwks_url`: an `http://` or `https://` URL.
    pub jwks_url: Option<String>,
    /// Seconds between two fetches of `jwks_url`.
    pub jwks_refresh_secs: u64,
    /// Seconds between two fetches of `jwks_url` at least; at most `jwks_refresh_secs`.
    pub jwks_min_refresh_secs: u64,
    /// `auth.jwks_ca_file`.
    pub jwks_ca_file: Option<PathBuf>,
    /// `auth.issuer`: the `iss` every token must carry.
    pub issuer: Option<String>,
    /// `auth.audience`: the `aud` every token must name.
    pub audience: Option<String>,
    /// Seconds of clock skew tolerated for `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Bytes in the longest user id.
    pub max_id_bytes: usize,
    /// Channels per token.
    pub max_channels: usize,
    /// Listeners beyond loopback may be open to anyone (see `exposure`); `main` warns instead of refusing.
    pub allow_insecure: bool,
}

/// One of `auth.jwt_secrets`, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSecret {
    /// The `kid` that selects it; `None` when the entry has none.
    pub kid: Option<String>,
    /// At least 32 bytes.
    pub secret: Vec<u8>,
}

impl fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSecret")
            .field("kid", &self.kid)
            .field("secret", &Redacted(self.secret.len()))
            .finish()
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field("secret", &Redacted(self.secret.len()))
            .field("secrets", &self.secrets)
            .field("public_key_file", &self.public_key_file)
            .field("jwks_file", &self.jwks_file)
            .field("jwks_url", &self.jwks_url.as_deref().map(redact_url))
            .field("jwks_refresh_secs", &self.jwks_refresh_secs)
            .field("jwks_min_refresh_secs", &self.jwks_min_refresh_secs)
            .field("jwks_ca_file", &self.jwks_ca_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .field("max_id_bytes", &self.max_id_bytes)
            .field("max_channels", &self.max_channels)
            .field("allow_insecure", &self.allow_insecure)
            .finish()
    }
}

/// `[admin]`, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Admin HTTP listener.
    pub listen: SocketAddr,
    /// Bearer key the admin API requires; `None` means no authentication.
    pub api_key: Option<String>,
    /// Bytes in the largest publishable message body; at most `websocket.max_outbox_bytes`.
    pub max_publish_bytes: usize,
    /// Bytes in the largest batch publish body.
    pub max_batch_bytes: usize,
    /// Targets one batch publish may name.
    pub max_batch_targets: usize,
    /// Bytes in the largest admin request head.
    pub max_request_head_bytes: usize,
    /// Headers in the largest admin request.
    pub max_request_headers: usize,
    /// Admin connections held at once.
    pub max_connections: usize,
    /// Milliseconds to send a complete request head.
    pub header_timeout_ms: u64,
    /// Milliseconds an admin connection may go without progress.
    pub idle_timeout_ms: u64,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("api_key", &self.api_key.as_ref().map(|k| Redacted(k.len())))
            .field("max_publish_bytes", &self.max_publish_bytes)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("max_batch_targets", &self.max_batch_targets)
            .field("max_request_head_bytes", &self.max_request_head_bytes)
            .field("max_request_headers", &self.max_request_headers)
            .field("max_connections", &self.max_connections)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .finish()
    }
}

/// `[log]`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Least severe level printed.
    pub level: log::LevelFilter,
}

/// `[cluster]`, checked, with the node id resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis URL; `None` runs a single node.
    pub redis_url: Option<String>,
    /// Prefix of every Redis channel and key: visible ASCII, 1 to 64 bytes.
    pub channel_prefix: String,
    /// This node's id: `cluster.node_id`, or `<hostname>-<pid>` when that is empty.
    pub node_id: String,
    /// Milliseconds before the first reconnection attempt.
    pub reconnect_min_ms: u64,
    /// Milliseconds between reconnection attempts at most; at least `reconnect_min_ms`.
    pub reconnect_max_ms: u64,
    /// Milliseconds a Redis connect, read or write may take.
    pub command_timeout_ms: u64,
    /// Milliseconds between heartbeats.
    pub heartbeat_interval_ms: u64,
    /// Milliseconds an alive marker lives; more than `heartbeat_interval_ms`.
    pub node_ttl_ms: u64,
    /// Milliseconds a presence query waits for answers.
    pub presence_timeout_ms: u64,
    /// Entries the bus stream keeps (`XADD MAXLEN ~`).
    pub bus_max_len: u64,
}

impl ClusterConfig {
    /// Whether `node_id` is the default this process resolved (`cluster.node_id` empty: `<hostname>-<pid>`).
    pub fn node_id_is_default(&self) -> bool {
        self.node_id == validate::default_node_id()
    }
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("channel_prefix", &self.channel_prefix)
            .field("node_id", &self.node_id)
            .field("reconnect_min_ms", &self.reconnect_min_ms)
            .field("reconnect_max_ms", &self.reconnect_max_ms)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("node_ttl_ms", &self.node_ttl_ms)
            .field("presence_timeout_ms", &self.presence_timeout_ms)
            .field("bus_max_len", &self.bus_max_len)
            .finish()
    }
}

impl Config {
    /// Reads `path`, applies `DENSEPUSH_*` overrides from the process environment and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml_str(&text, &process_env()?)
    }

    /// Parses `text`, applies overrides from `env` and validates. `env` stands for the whole
    /// environment: `DENSEPUSH_*` entries are overrides, and `auth.jwt_secret_env` is looked up
    /// in it too. Later entries win over earlier ones with the same name.
    pub fn from_toml_str(text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut tree: toml::Table = text.parse().map_err(|e| syntax_error(text, &e))?;
        let overridden = apply_env_overrides(&mut tree, env)?;
        let file = FileConfig::deserialize(toml::Value::Table(tree))
            .map_err(|e| shape_error(text, &e, &overridden))?;
        file.validate(env).map_err(|e| blame_env(e, &overridden))
    }

    /// True when clients authenticate with the development secret shipped in `config.toml`,
    /// which anyone can read: tokens for any user can be forged.
    pub fn uses_dev_secret(&self) -> bool {
        self.auth.mode == AuthMode::Jwt && self.auth.secret == DEFAULT_JWT_SECRET.as_bytes()
    }

    /// True when JWT mode verifies tokens with an identity provider's keys (a PEM file, a JWKS file or
    /// URL), not only with HS256 secrets.
    pub fn uses_identity_provider_keys(&self) -> bool {
        self.auth.mode == AuthMode::Jwt
            && (self.auth.public_key_file.is_some()
                || self.auth.jwks_file.is_some()
                || self.auth.jwks_url.is_some())
    }

    /// The JWKS URL when it is plain `http://` to a host other than loopback: anyone on the path could
    /// swap the keys and so forge tokens.
    pub fn jwks_url_unprotected(&self) -> Option<&str> {
        let url = self.auth.jwks_url.as_deref()?;
        let rest = url.strip_prefix("http://")?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.split(':').next().unwrap_or(""),
        };
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        (!loopback).then_some(url)
    }

    /// True when the admin API listens beyond loopback without an API key, so anyone who can
    /// reach the port can publish to every client.
    pub fn admin_exposed_without_key(&self) -> bool {
        !exposure::is_loopback(&self.admin.listen) && self.admin.api_key.is_none()
    }

    /// True when clients reach the server from other hosts (`server.listen` is not loopback).
    pub fn clients_beyond_loopback(&self) -> bool {
        [self.server.listen, self.tls.listen]
            .into_iter()
            .flatten()
            .any(|a| !exposure::is_loopback(&a))
    }
}

/// What the tests of every part share: parsing from text with no environment, or with a given one.
#[cfg(test)]
mod test_support {
    use super::{Config, ConfigError};

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, &[])
    }

    pub(super) fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_toml_str(text, &env)
    }

    pub(super) fn defaults() -> Config {
        parse("").expect("defaults are valid")
    }

    /// Asserts `text` fails validation on `key` and returns the one-line message.
    pub(super) fn invalid_key(text: &str) -> (&'static str, String) {
        match parse(text) {
            Err(e @ ConfigError::Invalid { key, .. }) => (key, e.to_string()),
            other => panic!("expected ConfigError::Invalid for {text:?}, got {other:?}"),
        }
    }

    pub(super) fn parse_error(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Parse(msg)) => msg,
            other => panic!("expected ConfigError::Parse for {text:?}, got {other:?}"),
        }
    }

    pub(super) fn env_error(text: &str, env: &[(&str, &str)]) -> (String, String) {
        match parse_env(text, env) {
            Err(e @ ConfigError::Env { .. }) => {
                let msg = e.to_string();
                let ConfigError::Env { var, .. } = e else {
                    unreachable!()
                };
                (var, msg)
            }
            other => panic!("expected ConfigError::Env, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_support::*;

    #[test]
    fn uses_dev_secret_only_with_the_shipped_secret() {
        assert!(defaults().uses_dev_secret());
        let c = parse("[auth]\njwt_secret = \"a-production-secret-that-is-long-enough\"").unwrap();
        assert!(!c.uses_dev_secret());
    }

    #[test]
    fn plain_http_jwks_url_is_unprotected_unless_on_loopback() {
        let url = |u: &str| parse(&format!("[auth]\njwks_url = \"{u}\"")).unwrap();
        assert_eq!(
            url("http://idp.example/jwks").jwks_url_unprotected(),
            Some("http://idp.example/jwks")
        );
        for safe in [
            "https://idp.example/jwks",
            "http://127.0.0.1:8000/jwks",
            "http://localhost/jwks",
            "http://[::1]:9/k",
        ] {
            assert_eq!(url(safe).jwks_url_unprotected(), None, "{safe}");
        }
        assert!(url("https://idp.example/jwks").uses_identity_provider_keys());
        assert!(!defaults().uses_identity_provider_keys());
    }

    #[test]
    fn admin_is_exposed_without_key_only_off_loopback_and_keyless() {
        assert!(!defaults().admin_exposed_without_key());
        assert!(
            parse("[admin]\nlisten = \"0.0.0.0:8081\"\n[auth]\nallow_insecure = true")
                .unwrap()
                .admin_exposed_without_key()
        );
        let keyed =
            parse("[admin]\nlisten = \"0.0.0.0:8081\"\napi_key = \"k3y-abc_DEF~+/==\"").unwrap();
        assert!(!keyed.admin_exposed_without_key());
        assert!(!parse("[admin]\nlisten = \"[::1]:8081\"")
            .unwrap()
            .admin_exposed_without_key());
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let c = parse("[admin]\napi_key = \"super-secret-admin-key\"").unwrap();
        let text = format!("{c:?} {:?}", FileConfig::default());
        assert!(!text.contains(DEFAULT_JWT_SECRET), "{text}");
        assert!(!text.contains("super-secret-admin-key"), "{text}");
        assert!(text.contains("redacted"), "{text}");
    }

    #[test]
    fn load_reads_a_file() {
        let path =
            std::env::temp_dir().join(format!("densepush-config-test-{}.toml", std::process::id()));
        std::fs::write(&path, "[server]\nreactors = 2\n").unwrap();
        let result = Config::load(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(result.unwrap().server.reactors, 2);
    }

    #[test]
    fn load_of_a_missing_file_names_the_path() {
        let err = Config::load(Path::new("/nonexistent/densepush.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }));
        assert!(
            err.to_string().contains("/nonexistent/densepush.toml"),
            "{err}"
        );
    }

    #[test]
    fn redis_url_password_is_redacted_in_errors_and_debug() {
        let (_, msg) = invalid_key("[cluster]\nredis_url = \"redis://:hunter2@\"");
        assert!(!msg.contains("hunter2"), "{msg}");
        let c = parse("[cluster]\nredis_url = \"redis://:hunter2@127.0.0.1:6379\"").unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("127.0.0.1:6379"), "{text}");
    }

    #[test]
    fn redact_url_keeps_everything_but_the_credentials() {
        assert_eq!(
            redact_url("redis://user:pw@host:1/0"),
            "redis://<redacted>@host:1/0"
        );
        assert_eq!(redact_url("redis://host:1"), "redis://host:1");
        assert_eq!(redact_url("unix:///tmp/r@x.sock"), "unix:///tmp/r@x.sock");
    }
}
