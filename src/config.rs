//! densepush's configuration: `config.toml` (read into [`FileConfig`], where every key is optional)
//! plus `DENSEPUSH_<SECTION>_<KEY>` environment overrides, validated into a [`Config`] of plain values.
//!
//! Owns the defaults (one named constant per setting, with its unit), parsing, the environment
//! overrides, validation, and resolving the reactor count and the JWT secret. It does not bind
//! sockets, set up logging or print warnings: it exposes [`Config::uses_dev_secret`] and
//! [`Config::admin_exposed_without_key`] so `main` can warn about insecure settings.
//!
//! Pipeline: text → `toml::Table` (syntax errors, with line) → overrides applied to that tree →
//! [`FileConfig`] (serde with `deny_unknown_fields`, so typos are errors, not silent defaults) →
//! [`Config`] (range and cross-field checks). Every error names the key it is about.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Defaults. `config.toml` at the repository root lists every one of these; a test keeps them equal.
// ---------------------------------------------------------------------------------------------

/// Address (IP:port) of the client WebSocket listener. Loopback, for local development.
pub const DEFAULT_SERVER_LISTEN: &str = "127.0.0.1:8080";
/// HTTP request path on which clients upgrade to WebSocket.
pub const DEFAULT_SERVER_PATH: &str = "/ws";
/// Reactor threads; 0 means one per available core.
pub const DEFAULT_REACTORS: usize = 0;
/// Client connections, summed over all reactors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_000_000;
/// Browser `Origin` values allowed to connect; empty allows any origin.
pub const DEFAULT_ALLOWED_ORIGINS: &[&str] = &[];
/// Milliseconds to wait for clients to close after SIGTERM before dropping them.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// Bytes in each reactor's shared scratch read buffer.
pub const DEFAULT_READ_BUFFER_BYTES: usize = 65_536;

/// Milliseconds a client has to complete the HTTP upgrade after connecting.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Milliseconds between server pings on an otherwise idle connection.
pub const DEFAULT_PING_INTERVAL_MS: u64 = 30_000;
/// Milliseconds to wait for the pong that answers a ping before closing the connection.
pub const DEFAULT_PONG_TIMEOUT_MS: u64 = 10_000;
/// Milliseconds to wait for the client's close frame and the final flush after the server closes.
pub const DEFAULT_CLOSE_TIMEOUT_MS: u64 = 3_000;
/// Bytes in the largest message a client may send (after reassembling fragments).
pub const DEFAULT_MAX_INBOUND_MESSAGE_BYTES: usize = 65_536;
/// Bytes queued but unsent on one connection before it is closed as a slow consumer.
pub const DEFAULT_MAX_OUTBOX_BYTES: usize = 1_048_576;
/// Bytes in the largest accepted upgrade request head (request line plus headers).
pub const DEFAULT_MAX_HANDSHAKE_BYTES: usize = 8_192;
/// Headers in the largest accepted upgrade request.
pub const DEFAULT_MAX_HANDSHAKE_HEADERS: usize = 32;
/// Bytes all connections together may hold in heap buffers (partial request heads, partial inbound frames,
/// unsent outbound bytes); past it new buffering is refused. 256 MiB: 256 slow consumers at the default
/// `max_outbox_bytes`, or 32,768 partial request heads of the default `max_handshake_bytes`.
pub const DEFAULT_MAX_BUFFERED_BYTES_TOTAL: usize = 256 << 20;
/// Milliseconds per tick of the timing wheel; every timeout is rounded up to whole ticks.
pub const DEFAULT_TIMER_TICK_MS: u64 = 100;

/// How clients authenticate (a JWT in the upgrade request, or not at all).
pub const DEFAULT_AUTH_MODE: AuthMode = AuthMode::Jwt;
/// DEVELOPMENT ONLY: the HS256 secret shipped in `config.toml`, public to anyone who has read this
/// file. [`Config::uses_dev_secret`] lets `main` warn when it is still in use.
pub const DEFAULT_JWT_SECRET: &str = "densepush-development-secret-change-me";
/// Name of an environment variable holding the JWT secret; empty means use `auth.jwt_secret`.
pub const DEFAULT_JWT_SECRET_ENV: &str = "";
/// Seconds of clock skew tolerated when checking a token's `exp` and `nbf` claims.
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 5;
/// Bytes in the longest user id a token may carry.
pub const DEFAULT_MAX_ID_BYTES: usize = 128;
/// Channels one token may subscribe its connection to.
pub const DEFAULT_MAX_CHANNELS: usize = 32;

/// Address (IP:port) of the admin HTTP API (publish, metrics). Loopback, for local development.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
/// Bearer key the admin API requires; empty means no authentication.
pub const DEFAULT_ADMIN_API_KEY: &str = "";
/// Bytes in the largest message body the admin API accepts for publishing.
pub const DEFAULT_MAX_PUBLISH_BYTES: usize = 1_048_576;
/// Bytes in the largest admin HTTP request head (request line plus headers).
pub const DEFAULT_MAX_REQUEST_HEAD_BYTES: usize = 8_192;
/// Headers in the largest admin HTTP request.
pub const DEFAULT_MAX_REQUEST_HEADERS: usize = 32;

/// Least severe log level that is printed.
pub const DEFAULT_LOG_LEVEL: LogLevel = LogLevel::Info;

/// Redis URL of the cluster bus (`redis://[:password@]host:port[/db]` or `unix:///path`); empty runs a
/// single node with no Redis at all.
pub const DEFAULT_CLUSTER_REDIS_URL: &str = "";
/// Prefix of every Redis channel and key the cluster uses, so several clusters can share one Redis.
pub const DEFAULT_CLUSTER_CHANNEL_PREFIX: &str = "densepush";
/// This node's id, unique in the cluster; empty means `<hostname>-<pid>`.
pub const DEFAULT_CLUSTER_NODE_ID: &str = "";
/// Milliseconds before the first reconnection attempt after the Redis link fails; doubled per failure.
pub const DEFAULT_CLUSTER_RECONNECT_MIN_MS: u64 = 100;
/// Milliseconds between reconnection attempts at most.
pub const DEFAULT_CLUSTER_RECONNECT_MAX_MS: u64 = 5_000;
/// Milliseconds a Redis connect, read or write may take before the link counts as down.
pub const DEFAULT_CLUSTER_COMMAND_TIMEOUT_MS: u64 = 1_000;
/// Milliseconds between a node's heartbeats (its alive marker in Redis, and a ping of the subscription).
pub const DEFAULT_CLUSTER_HEARTBEAT_INTERVAL_MS: u64 = 2_000;
/// Milliseconds a node's alive marker outlives its last heartbeat; a dead node stops counting as known then.
pub const DEFAULT_CLUSTER_NODE_TTL_MS: u64 = 10_000;
/// Milliseconds a cluster presence query waits for the other nodes' answers.
pub const DEFAULT_CLUSTER_PRESENCE_TIMEOUT_MS: u64 = 300;

/// Keep history for `user:{user}` streams (publishes to a user and to its client tokens).
pub const DEFAULT_HISTORY_USER: bool = false;
/// Keep history for `channel:{name}` streams.
pub const DEFAULT_HISTORY_CHANNEL: bool = false;
/// Keep history for the `all` stream.
pub const DEFAULT_HISTORY_ALL: bool = false;
/// Messages kept per stream.
pub const DEFAULT_HISTORY_SIZE: usize = 100;
/// Seconds a message is kept.
pub const DEFAULT_HISTORY_TTL_SECS: u64 = 3_600;
/// Bytes all streams' history may use together; the oldest messages of any stream are evicted first.
pub const DEFAULT_HISTORY_MAX_BYTES: usize = 67_108_864;

/// Send every complete data message a client sends back to it unchanged (for conformance suites).
pub const DEFAULT_DIAGNOSTICS_ECHO: bool = false;

/// Prefix of the environment variables that override settings: `DENSEPUSH_<SECTION>_<KEY>`.
pub const ENV_PREFIX: &str = "DENSEPUSH_";
/// Variables that carry [`ENV_PREFIX`] but are not overrides, so they are not rejected as unknown
/// keys: `DENSEPUSH_CONFIG` names the config file and `DENSEPUSH_LOG` is an env_logger filter (both read by
/// `main`).
pub const ENV_NOT_OVERRIDES: &[&str] = &["DENSEPUSH_CONFIG", "DENSEPUSH_LOG"];

/// Accepted ranges (inclusive) for the settings that have one. Upper bounds exist to turn typos
/// into errors and to keep allocations and deadline arithmetic (`Instant + Duration`, which
/// panics on overflow) far from their limits.
pub mod limits {
    use std::ops::RangeInclusive;

    /// Reactor threads (0 = one per core).
    pub const REACTORS: RangeInclusive<usize> = 0..=1024;
    /// Client connections.
    pub const MAX_CONNECTIONS: RangeInclusive<usize> = 1..=usize::MAX;
    /// Bytes in the scratch read buffer: at least one page, at most 64 MiB.
    pub const READ_BUFFER_BYTES: RangeInclusive<usize> = 4096..=64 << 20;
    /// Milliseconds per timing-wheel tick.
    pub const TIMER_TICK_MS: RangeInclusive<u64> = 10..=1000;
    /// Milliseconds for any timeout or interval: at most one day. The lower bound is one tick,
    /// checked against `websocket.timer_tick_ms`.
    pub const TIMEOUT_MS: RangeInclusive<u64> = 0..=86_400_000;
    /// Bytes in the largest inbound message: at most 64 MiB.
    pub const MAX_INBOUND_MESSAGE_BYTES: RangeInclusive<usize> = 1..=64 << 20;
    /// Bytes in a connection's outbox: at least one page, at most 1 GiB.
    pub const MAX_OUTBOX_BYTES: RangeInclusive<usize> = 4096..=1 << 30;
    /// Bytes in an upgrade request head: browsers send about 0.5 to 2 KiB.
    pub const MAX_HANDSHAKE_BYTES: RangeInclusive<usize> = 1024..=1 << 20;
    /// Headers in an upgrade request: RFC 6455 §4.1 requires Host, Upgrade, Connection,
    /// Sec-WebSocket-Key and Sec-WebSocket-Version, and browsers add Origin.
    pub const MAX_HANDSHAKE_HEADERS: RangeInclusive<usize> = 6..=1024;
    /// Bytes in the server-wide buffer budget: at least 64 KiB (and at least `websocket.max_outbox_bytes`,
    /// checked separately), at most 1 TiB.
    pub const MAX_BUFFERED_BYTES_TOTAL: RangeInclusive<usize> = 64 << 10..=1 << 40;
    /// Seconds of JWT clock-skew leeway.
    pub const JWT_LEEWAY_SECS: RangeInclusive<u64> = 0..=300;
    /// Bytes in a JWT secret: RFC 7518 §3.2 requires an HS256 key of at least 256 bits.
    pub const JWT_SECRET_BYTES: RangeInclusive<usize> = 32..=usize::MAX;
    /// Bytes in a user id.
    pub const MAX_ID_BYTES: RangeInclusive<usize> = 1..=1024;
    /// Channels per token (0 = user-addressed pushes only).
    pub const MAX_CHANNELS: RangeInclusive<usize> = 0..=4096;
    /// Bytes in a published message body: at most 64 MiB.
    pub const MAX_PUBLISH_BYTES: RangeInclusive<usize> = 1..=64 << 20;
    /// Bytes in an admin request head.
    pub const MAX_REQUEST_HEAD_BYTES: RangeInclusive<usize> = 1024..=1 << 20;
    /// Headers in an admin request.
    pub const MAX_REQUEST_HEADERS: RangeInclusive<usize> = 4..=1024;
    /// Bytes in the cluster's channel prefix.
    pub const CLUSTER_CHANNEL_PREFIX_BYTES: RangeInclusive<usize> = 1..=64;
    /// Bytes in a cluster node id.
    pub const CLUSTER_NODE_ID_BYTES: RangeInclusive<usize> = 1..=128;
    /// Milliseconds of a Redis command timeout: a blocked admin thread answers nothing meanwhile.
    pub const CLUSTER_COMMAND_TIMEOUT_MS: RangeInclusive<u64> = 1..=60_000;
    /// Milliseconds of reconnection backoff and heartbeat intervals.
    pub const CLUSTER_INTERVAL_MS: RangeInclusive<u64> = 1..=3_600_000;
    /// Milliseconds a presence query waits: the admin thread answers nothing meanwhile.
    pub const CLUSTER_PRESENCE_TIMEOUT_MS: RangeInclusive<u64> = 1..=10_000;
    /// Messages kept per stream.
    pub const HISTORY_SIZE: RangeInclusive<usize> = 1..=1_000_000;
    /// Seconds a message is kept: at most 30 days.
    pub const HISTORY_TTL_SECS: RangeInclusive<u64> = 1..=2_592_000;
    /// Bytes of history: at least a page, at most 1 TiB.
    pub const HISTORY_MAX_BYTES: RangeInclusive<usize> = 4096..=1 << 40;
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a configuration could not be loaded. `Display` is one line that names the key or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not TOML, or a key is unknown or has the wrong type. The message is toml's,
    /// flattened to one line, with the key path and the line number when known.
    #[error("{0}")]
    Parse(String),
    /// A value is out of range or inconsistent with another; `reason` follows the key in `Display`.
    #[error("{key} {reason}")]
    Invalid {
        /// The dotted key, e.g. `websocket.pong_timeout_ms`.
        key: &'static str,
        /// What is wrong, starting with the offending value.
        reason: String,
    },
    /// A `DENSEPUSH_*` variable names no setting, or its value does not fit the setting's type.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The file's shape: every field optional, defaults from the constants above.
// ---------------------------------------------------------------------------------------------

/// How clients authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A JWT (HS256) in the upgrade request names the user and the channels.
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

/// `config.toml` as written: every section and key optional. See [`Config`] for the checked form.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// `[server]`
    pub server: ServerSection,
    /// `[websocket]`
    pub websocket: WebSocketSection,
    /// `[auth]`
    pub auth: AuthSection,
    /// `[admin]`
    pub admin: AdminSection,
    /// `[log]`
    pub log: LogSection,
    /// `[cluster]`
    pub cluster: ClusterSection,
    /// `[history]`
    pub history: HistorySection,
    /// `[diagnostics]`
    pub diagnostics: DiagnosticsSection,
}

/// `[server]` as written. Field docs are on the `DEFAULT_*` constants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [server] table")]
#[allow(missing_docs)]
pub struct ServerSection {
    pub listen: String,
    pub path: String,
    pub reactors: usize,
    pub max_connections: usize,
    pub allowed_origins: Vec<String>,
    pub shutdown_timeout_ms: u64,
    pub read_buffer_bytes: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: DEFAULT_SERVER_LISTEN.to_owned(),
            path: DEFAULT_SERVER_PATH.to_owned(),
            reactors: DEFAULT_REACTORS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            allowed_origins: DEFAULT_ALLOWED_ORIGINS
                .iter()
                .map(|&o| o.to_owned())
                .collect(),
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            read_buffer_bytes: DEFAULT_READ_BUFFER_BYTES,
        }
    }
}

/// `[websocket]` as written. Field docs are on the `DEFAULT_*` constants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [websocket] table")]
#[allow(missing_docs)]
pub struct WebSocketSection {
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
}

impl Default for WebSocketSection {
    fn default() -> Self {
        WebSocketSection {
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            ping_interval_ms: DEFAULT_PING_INTERVAL_MS,
            pong_timeout_ms: DEFAULT_PONG_TIMEOUT_MS,
            close_timeout_ms: DEFAULT_CLOSE_TIMEOUT_MS,
            max_inbound_message_bytes: DEFAULT_MAX_INBOUND_MESSAGE_BYTES,
            max_outbox_bytes: DEFAULT_MAX_OUTBOX_BYTES,
            max_handshake_bytes: DEFAULT_MAX_HANDSHAKE_BYTES,
            max_handshake_headers: DEFAULT_MAX_HANDSHAKE_HEADERS,
            max_buffered_bytes_total: DEFAULT_MAX_BUFFERED_BYTES_TOTAL,
            timer_tick_ms: DEFAULT_TIMER_TICK_MS,
        }
    }
}

/// `[auth]` as written. Field docs are on the `DEFAULT_*` constants.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [auth] table")]
#[allow(missing_docs)]
pub struct AuthSection {
    pub mode: AuthMode,
    pub jwt_secret: String,
    pub jwt_secret_env: String,
    pub leeway_secs: u64,
    pub max_id_bytes: usize,
    pub max_channels: usize,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            mode: DEFAULT_AUTH_MODE,
            jwt_secret: DEFAULT_JWT_SECRET.to_owned(),
            jwt_secret_env: DEFAULT_JWT_SECRET_ENV.to_owned(),
            leeway_secs: DEFAULT_JWT_LEEWAY_SECS,
            max_id_bytes: DEFAULT_MAX_ID_BYTES,
            max_channels: DEFAULT_MAX_CHANNELS,
        }
    }
}

// Hand-written so the secret never reaches a log line through `{:?}`.
impl fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSection")
            .field("mode", &self.mode)
            .field("jwt_secret", &Redacted(self.jwt_secret.len()))
            .field("jwt_secret_env", &self.jwt_secret_env)
            .field("leeway_secs", &self.leeway_secs)
            .field("max_id_bytes", &self.max_id_bytes)
            .field("max_channels", &self.max_channels)
            .finish()
    }
}

/// `[admin]` as written. Field docs are on the `DEFAULT_*` constants.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [admin] table")]
#[allow(missing_docs)]
pub struct AdminSection {
    pub listen: String,
    pub api_key: String,
    pub max_publish_bytes: usize,
    pub max_request_head_bytes: usize,
    pub max_request_headers: usize,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: DEFAULT_ADMIN_LISTEN.to_owned(),
            api_key: DEFAULT_ADMIN_API_KEY.to_owned(),
            max_publish_bytes: DEFAULT_MAX_PUBLISH_BYTES,
            max_request_head_bytes: DEFAULT_MAX_REQUEST_HEAD_BYTES,
            max_request_headers: DEFAULT_MAX_REQUEST_HEADERS,
        }
    }
}

impl fmt::Debug for AdminSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminSection")
            .field("listen", &self.listen)
            .field("api_key", &Redacted(self.api_key.len()))
            .field("max_publish_bytes", &self.max_publish_bytes)
            .field("max_request_head_bytes", &self.max_request_head_bytes)
            .field("max_request_headers", &self.max_request_headers)
            .finish()
    }
}

/// `[log]` as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [log] table")]
pub struct LogSection {
    /// See [`DEFAULT_LOG_LEVEL`].
    pub level: LogLevel,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: DEFAULT_LOG_LEVEL,
        }
    }
}

/// `[cluster]` as written. Field docs are on the `DEFAULT_CLUSTER_*` constants.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [cluster] table")]
#[allow(missing_docs)]
pub struct ClusterSection {
    pub redis_url: String,
    pub channel_prefix: String,
    pub node_id: String,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub command_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub node_ttl_ms: u64,
    pub presence_timeout_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            redis_url: DEFAULT_CLUSTER_REDIS_URL.to_owned(),
            channel_prefix: DEFAULT_CLUSTER_CHANNEL_PREFIX.to_owned(),
            node_id: DEFAULT_CLUSTER_NODE_ID.to_owned(),
            reconnect_min_ms: DEFAULT_CLUSTER_RECONNECT_MIN_MS,
            reconnect_max_ms: DEFAULT_CLUSTER_RECONNECT_MAX_MS,
            command_timeout_ms: DEFAULT_CLUSTER_COMMAND_TIMEOUT_MS,
            heartbeat_interval_ms: DEFAULT_CLUSTER_HEARTBEAT_INTERVAL_MS,
            node_ttl_ms: DEFAULT_CLUSTER_NODE_TTL_MS,
            presence_timeout_ms: DEFAULT_CLUSTER_PRESENCE_TIMEOUT_MS,
        }
    }
}

/// `[history]` as written. Field docs are on the `DEFAULT_HISTORY_*` constants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [history] table")]
#[allow(missing_docs)]
pub struct HistorySection {
    pub user: bool,
    pub channel: bool,
    pub all: bool,
    pub size: usize,
    pub ttl_secs: u64,
    pub max_bytes: usize,
}

impl Default for HistorySection {
    fn default() -> Self {
        HistorySection {
            user: DEFAULT_HISTORY_USER,
            channel: DEFAULT_HISTORY_CHANNEL,
            all: DEFAULT_HISTORY_ALL,
            size: DEFAULT_HISTORY_SIZE,
            ttl_secs: DEFAULT_HISTORY_TTL_SECS,
            max_bytes: DEFAULT_HISTORY_MAX_BYTES,
        }
    }
}

impl HistorySection {
    fn validate(self) -> Result<HistoryConfig, ConfigError> {
        Ok(HistoryConfig {
            user: self.user,
            channel: self.channel,
            all: self.all,
            size: check_range("history.size", self.size, limits::HISTORY_SIZE)?,
            ttl_secs: check_range("history.ttl_secs", self.ttl_secs, limits::HISTORY_TTL_SECS)?,
            max_bytes: check_range(
                "history.max_bytes",
                self.max_bytes,
                limits::HISTORY_MAX_BYTES,
            )?,
        })
    }
}

/// `[diagnostics]` as written (and as checked: a flag needs no validation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [diagnostics] table")]
pub struct DiagnosticsSection {
    /// See [`DEFAULT_DIAGNOSTICS_ECHO`].
    pub echo: bool,
}

impl Default for DiagnosticsSection {
    fn default() -> Self {
        DiagnosticsSection {
            echo: DEFAULT_DIAGNOSTICS_ECHO,
        }
    }
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

// Hand-written so a password in the Redis URL never reaches a log line through `{:?}`.
impl fmt::Debug for ClusterSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSection")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("channel_prefix", &self.channel_prefix)
            .field("node_id", &self.node_id)
            .field("reconnect_min_ms", &self.reconnect_min_ms)
            .field("reconnect_max_ms", &self.reconnect_max_ms)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("node_ttl_ms", &self.node_ttl_ms)
            .field("presence_timeout_ms", &self.presence_timeout_ms)
            .finish()
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

// ---------------------------------------------------------------------------------------------
// The validated configuration
// ---------------------------------------------------------------------------------------------

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
}

/// `[server]`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Client WebSocket listener.
    pub listen: SocketAddr,
    /// Upgrade path; starts with '/', no query or fragment.
    pub path: String,
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
}

/// `[auth]`, checked, with the secret resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// How clients authenticate.
    pub mode: AuthMode,
    /// The HS256 secret: from the variable named by `auth.jwt_secret_env` when that is set, else
    /// `auth.jwt_secret`. At least 32 bytes in `jwt` mode; empty in `none` mode.
    pub secret: Vec<u8>,
    /// Seconds of clock skew tolerated for `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Bytes in the longest user id.
    pub max_id_bytes: usize,
    /// Channels per token.
    pub max_channels: usize,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field("secret", &Redacted(self.secret.len()))
            .field("leeway_secs", &self.leeway_secs)
            .field("max_id_bytes", &self.max_id_bytes)
            .field("max_channels", &self.max_channels)
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
    /// Bytes in the largest admin request head.
    pub max_request_head_bytes: usize,
    /// Headers in the largest admin request.
    pub max_request_headers: usize,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("api_key", &self.api_key.as_ref().map(|k| Redacted(k.len())))
            .field("max_publish_bytes", &self.max_publish_bytes)
            .field("max_request_head_bytes", &self.max_request_head_bytes)
            .field("max_request_headers", &self.max_request_headers)
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

    /// True when the admin API listens beyond loopback without an API key, so anyone who can
    /// reach the port can publish to every client.
    pub fn admin_exposed_without_key(&self) -> bool {
        !self.admin.listen.ip().is_loopback() && self.admin.api_key.is_none()
    }
}

/// The process environment as UTF-8 pairs. `std::env::vars` would panic on a non-UTF-8 entry;
/// such entries are skipped unless they carry our prefix, which is an error.
fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => env.push((name, value)),
            (Ok(name), Err(_)) if name.starts_with(ENV_PREFIX) => {
                return Err(ConfigError::Env {
                    var: name,
                    reason: "value is not valid UTF-8".into(),
                });
            }
            _ => {}
        }
    }
    Ok(env)
}

// ---------------------------------------------------------------------------------------------
// Environment overrides
// ---------------------------------------------------------------------------------------------

/// Every section and key with its default value, whose TOML type is the key's type.
fn schema() -> toml::Table {
    // Serializing our own plain structs cannot fail; `schema_lists_every_section` covers it.
    toml::Table::try_from(FileConfig::default()).expect("FileConfig::default() serializes to TOML")
}

fn type_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array like [\"a\", \"b\"]",
        toml::Value::Table(_) => "a table",
    }
}

fn join_keys(table: &toml::Table) -> String {
    table
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes each `DENSEPUSH_<SECTION>_<KEY>` from `env` into `tree`. Returns `(dotted key, variable)`
/// for each override so later validation errors can say where a value came from.
fn apply_env_overrides(
    tree: &mut toml::Table,
    env: &[(String, String)],
) -> Result<Vec<(String, String)>, ConfigError> {
    let schema = schema();
    let mut overridden = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if ENV_NOT_OVERRIDES.contains(&var.as_str()) {
            continue;
        }
        let env_err = |reason: String| ConfigError::Env {
            var: var.clone(),
            reason,
        };
        let Some((section, key)) = rest
            .split_once('_')
            .filter(|(s, k)| !s.is_empty() && !k.is_empty())
        else {
            return Err(env_err(format!(
                "expected {ENV_PREFIX}<SECTION>_<KEY>, e.g. DENSEPUSH_SERVER_LISTEN"
            )));
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let Some(toml::Value::Table(keys)) = schema.get(&section) else {
            return Err(env_err(format!(
                "unknown section [{section}]; sections are {}",
                join_keys(&schema)
            )));
        };
        let Some(default) = keys.get(&key) else {
            return Err(env_err(format!(
                "unknown key `{key}` in [{section}]; keys are {}",
                join_keys(keys)
            )));
        };
        let value = match default {
            // A string setting takes the text verbatim, even when it looks like a number.
            toml::Value::String(_) => toml::Value::String(raw.clone()),
            _ => toml::Value::deserialize(toml::de::ValueDeserializer::new(raw))
                .unwrap_or_else(|_| toml::Value::String(raw.clone())),
        };
        if std::mem::discriminant(&value) != std::mem::discriminant(default) {
            return Err(env_err(format!(
                "{section}.{key} must be {}, got `{raw}`",
                type_name(default)
            )));
        }
        // A section the file wrote as a non-table is left alone: deserializing reports it.
        if let toml::Value::Table(table) = tree
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            table.insert(key.clone(), value);
        }
        overridden.push((format!("{section}.{key}"), var.clone()));
    }
    Ok(overridden)
}

/// Adds the overriding variable's name to a validation error about an overridden key.
fn blame_env(error: ConfigError, overridden: &[(String, String)]) -> ConfigError {
    match error {
        ConfigError::Invalid { key, reason } => {
            match overridden.iter().rev().find(|(k, _)| k == key) {
                Some((_, var)) => ConfigError::Invalid {
                    key,
                    reason: format!("{reason} (set by {var})"),
                },
                None => ConfigError::Invalid { key, reason },
            }
        }
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Parse errors, flattened to one line
// ---------------------------------------------------------------------------------------------

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

fn syntax_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim();
    match error.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            ConfigError::Parse(format!(
                "TOML syntax error at line {line}, column {col}: {message}"
            ))
        }
        None => ConfigError::Parse(format!("TOML syntax error: {message}")),
    }
}

/// A serde error from the merged tree carries the key path (toml prints it as a final
/// "in `a.b`" line) but no position; the same error from the original text carries the position.
/// When the key was overridden, the variable is named instead.
fn shape_error(
    text: &str,
    error: &toml::de::Error,
    overridden: &[(String, String)],
) -> ConfigError {
    let message = error.message().trim();
    let display = error.to_string();
    let path = display
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("in `"))
        .and_then(|l| l.strip_suffix('`'))
        .filter(|p| !p.is_empty());
    let mut out = match path {
        // serde reports an unknown key against the table that holds it.
        Some(table) if message.starts_with("unknown field") => {
            format!(
                "{} in [{table}]",
                message.replacen("unknown field", "unknown key", 1)
            )
        }
        Some(key) => format!("{key}: {message}"),
        None if message.starts_with("unknown field") => {
            message.replacen("unknown field", "unknown section", 1)
        }
        None => message.to_owned(),
    };
    let from_env = path.and_then(|p| overridden.iter().rev().find(|(k, _)| k == p));
    if let Some((_, var)) = from_env {
        out.push_str(&format!(" (set by {var})"));
    } else if let Err(original) = toml::from_str::<FileConfig>(text) {
        // The line is only known when the offending value came from the file.
        if let Some(span) = original
            .span()
            .filter(|_| original.message().trim() == message)
        {
            out.push_str(&format!(" (line {})", line_col(text, span.start).0));
        }
    }
    debug_assert!(!out.contains('\n'));
    ConfigError::Parse(out.replace('\n', " "))
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn check_range<T: PartialOrd + fmt::Display + Copy>(
    key: &'static str,
    value: T,
    range: RangeInclusive<T>,
) -> Result<T, ConfigError> {
    if value < *range.start() {
        Err(invalid(
            key,
            format!("({value}) must be at least {}", range.start()),
        ))
    } else if value > *range.end() {
        Err(invalid(
            key,
            format!("({value}) must be at most {}", range.end()),
        ))
    } else {
        Ok(value)
    }
}

fn parse_listen(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(
            key,
            format!(
                "(`{text}`) must be an IP:port socket address such as 127.0.0.1:8080 or [::]:8080 \
                 (host names are not resolved)"
            ),
        )
    })
}

/// The upgrade path is matched against the request-target's path (RFC 9110 §7.1, RFC 3986 §3.3):
/// absolute, visible ASCII, no query or fragment.
fn check_path(path: &str) -> Result<String, ConfigError> {
    if !path.starts_with('/') {
        return Err(invalid(
            "server.path",
            format!("(`{path}`) must start with '/'"),
        ));
    }
    if let Some(bad) = path
        .chars()
        .find(|&c| !c.is_ascii_graphic() || c == '?' || c == '#')
    {
        return Err(invalid(
            "server.path",
            format!("(`{path}`) must be visible ASCII without '?' or '#', found {bad:?}"),
        ));
    }
    Ok(path.to_owned())
}

/// Checks one allow-list entry against the serialized-origin form `scheme "://" host [ ":" port ]`
/// (RFC 6454 §6.2) and returns it lowercased.
fn check_origin(origin: &str) -> Result<String, String> {
    let err = |why: &str| {
        Err(format!(
            "entry `{origin}` {why}; expected scheme://host[:port], e.g. https://example.com"
        ))
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return err("has no scheme");
    };
    // RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok {
        return err("has an invalid scheme");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return err("has an unclosed '['");
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return err("has an invalid IPv6 address");
        }
        match after {
            "" => (addr, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (addr, Some(port)),
                None => return err("has text after the IPv6 address"),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    // Browsers send hosts in ASCII (IDNs as punycode); anything else is a path, userinfo, etc.
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
    {
        return err("has an invalid host (no path, trailing '/', userinfo or wildcard)");
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.chars().all(|c| c.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p > 0);
        if !valid {
            return err("has an invalid port");
        }
    }
    Ok(origin.to_ascii_lowercase())
}

/// RFC 6750 §2.1: a Bearer credential is a b64token, so any other key could never be sent.
fn check_api_key(key: &str) -> Result<(), ConfigError> {
    let body = key.trim_end_matches('=');
    let ok = !body.is_empty()
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~+/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "admin.api_key",
            "must be a Bearer token (RFC 6750 §2.1): letters, digits and -._~+/ with optional trailing '='",
        ))
    }
}

/// Checks a cluster name (prefix or node id): visible ASCII, so it embeds in Redis channel and key names and
/// in log lines unambiguously.
fn check_cluster_name(
    key: &'static str,
    value: &str,
    bytes: RangeInclusive<usize>,
) -> Result<String, ConfigError> {
    check_range(key, value.len(), bytes.clone()).map_err(|_| {
        invalid(
            key,
            format!(
                "(`{value}`) must be {} to {} bytes long",
                bytes.start(),
                bytes.end()
            ),
        )
    })?;
    if let Some(bad) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(invalid(
            key,
            format!("(`{value}`) must be visible ASCII, found {bad:?}"),
        ));
    }
    Ok(value.to_owned())
}

/// `<hostname>-<pid>`: unique per process on a host, and readable in logs.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "densepush".to_owned());
    format!("{host}-{}", std::process::id())
}

impl ClusterSection {
    fn validate(self) -> Result<ClusterConfig, ConfigError> {
        let redis_url = match self.redis_url.as_str() {
            "" => None,
            url => {
                // The redis crate parses the URL as it would to connect; TLS (rediss://) is not built in.
                if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url) {
                    return Err(invalid(
                        "cluster.redis_url",
                        format!(
                            "(`{}`) is not a usable Redis URL ({e}); expected redis://[:password@]host:port[/db] \
                             or unix:///path/to/redis.sock",
                            redact_url(url)
                        ),
                    ));
                }
                Some(self.redis_url.clone())
            }
        };
        let channel_prefix = check_cluster_name(
            "cluster.channel_prefix",
            &self.channel_prefix,
            limits::CLUSTER_CHANNEL_PREFIX_BYTES,
        )?;
        let node_id = match self.node_id.as_str() {
            "" => default_node_id(),
            id => check_cluster_name("cluster.node_id", id, limits::CLUSTER_NODE_ID_BYTES)?,
        };
        let interval =
            |key: &'static str, ms: u64| check_range(key, ms, limits::CLUSTER_INTERVAL_MS);
        let reconnect_min_ms = interval("cluster.reconnect_min_ms", self.reconnect_min_ms)?;
        let reconnect_max_ms = interval("cluster.reconnect_max_ms", self.reconnect_max_ms)?;
        if reconnect_max_ms < reconnect_min_ms {
            return Err(invalid(
                "cluster.reconnect_max_ms",
                format!(
                    "({reconnect_max_ms}) must be at least cluster.reconnect_min_ms ({reconnect_min_ms})"
                ),
            ));
        }
        let heartbeat_interval_ms =
            interval("cluster.heartbeat_interval_ms", self.heartbeat_interval_ms)?;
        let node_ttl_ms = interval("cluster.node_ttl_ms", self.node_ttl_ms)?;
        // A marker that expires before the next heartbeat renews it would make a live node look dead.
        if node_ttl_ms <= heartbeat_interval_ms {
            return Err(invalid(
                "cluster.node_ttl_ms",
                format!(
                    "({node_ttl_ms}) must be more than cluster.heartbeat_interval_ms ({heartbeat_interval_ms})"
                ),
            ));
        }
        Ok(ClusterConfig {
            redis_url,
            channel_prefix,
            node_id,
            reconnect_min_ms,
            reconnect_max_ms,
            command_timeout_ms: check_range(
                "cluster.command_timeout_ms",
                self.command_timeout_ms,
                limits::CLUSTER_COMMAND_TIMEOUT_MS,
            )?,
            heartbeat_interval_ms,
            node_ttl_ms,
            presence_timeout_ms: check_range(
                "cluster.presence_timeout_ms",
                self.presence_timeout_ms,
                limits::CLUSTER_PRESENCE_TIMEOUT_MS,
            )?,
        })
    }
}

fn default_reactors() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl FileConfig {
    /// Checks every value and resolves the reactor count and the secret (looked up in `env`).
    fn validate(self, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let FileConfig {
            server,
            websocket: ws,
            auth,
            admin,
            log,
            cluster,
            history,
            diagnostics,
        } = self;

        let server = ServerConfig {
            listen: parse_listen("server.listen", &server.listen)?,
            path: check_path(&server.path)?,
            reactors: match check_range("server.reactors", server.reactors, limits::REACTORS)? {
                0 => default_reactors(),
                n => n,
            },
            max_connections: check_range(
                "server.max_connections",
                server.max_connections,
                limits::MAX_CONNECTIONS,
            )?,
            allowed_origins: server
                .allowed_origins
                .iter()
                .map(|o| {
                    check_origin(o).map_err(|reason| invalid("server.allowed_origins", reason))
                })
                .collect::<Result<_, _>>()?,
            shutdown_timeout_ms: check_range(
                "server.shutdown_timeout_ms",
                server.shutdown_timeout_ms,
                limits::TIMEOUT_MS,
            )?,
            read_buffer_bytes: check_range(
                "server.read_buffer_bytes",
                server.read_buffer_bytes,
                limits::READ_BUFFER_BYTES,
            )?,
        };

        let tick = check_range(
            "websocket.timer_tick_ms",
            ws.timer_tick_ms,
            limits::TIMER_TICK_MS,
        )?;
        // A timeout shorter than a tick would fire on the next tick anyway, i.e. up to a whole tick
        // late; requiring at least one tick keeps the configured value meaningful.
        let timeout = |key: &'static str, ms: u64| -> Result<u64, ConfigError> {
            check_range(key, ms, limits::TIMEOUT_MS)?;
            if ms < tick {
                return Err(invalid(
                    key,
                    format!("({ms}) must be at least websocket.timer_tick_ms ({tick})"),
                ));
            }
            Ok(ms)
        };
        let websocket = WebSocketConfig {
            handshake_timeout_ms: timeout(
                "websocket.handshake_timeout_ms",
                ws.handshake_timeout_ms,
            )?,
            ping_interval_ms: timeout("websocket.ping_interval_ms", ws.ping_interval_ms)?,
            pong_timeout_ms: timeout("websocket.pong_timeout_ms", ws.pong_timeout_ms)?,
            close_timeout_ms: timeout("websocket.close_timeout_ms", ws.close_timeout_ms)?,
            max_inbound_message_bytes: check_range(
                "websocket.max_inbound_message_bytes",
                ws.max_inbound_message_bytes,
                limits::MAX_INBOUND_MESSAGE_BYTES,
            )?,
            max_outbox_bytes: check_range(
                "websocket.max_outbox_bytes",
                ws.max_outbox_bytes,
                limits::MAX_OUTBOX_BYTES,
            )?,
            max_handshake_bytes: check_range(
                "websocket.max_handshake_bytes",
                ws.max_handshake_bytes,
                limits::MAX_HANDSHAKE_BYTES,
            )?,
            max_handshake_headers: check_range(
                "websocket.max_handshake_headers",
                ws.max_handshake_headers,
                limits::MAX_HANDSHAKE_HEADERS,
            )?,
            max_buffered_bytes_total: check_range(
                "websocket.max_buffered_bytes_total",
                ws.max_buffered_bytes_total,
                limits::MAX_BUFFERED_BYTES_TOTAL,
            )?,
            timer_tick_ms: tick,
        };
        // A budget below one connection's outbox limit would close every slow reader on the budget, not on
        // its own limit, and make max_outbox_bytes meaningless.
        if websocket.max_buffered_bytes_total < websocket.max_outbox_bytes {
            return Err(invalid(
                "websocket.max_buffered_bytes_total",
                format!(
                    "({}) must be at least websocket.max_outbox_bytes ({})",
                    websocket.max_buffered_bytes_total, websocket.max_outbox_bytes
                ),
            ));
        }
        // The next ping is due before the pong for the previous one is overdue otherwise, and the
        // liveness check would never fire.
        if websocket.pong_timeout_ms >= websocket.ping_interval_ms {
            return Err(invalid(
                "websocket.pong_timeout_ms",
                format!(
                    "({}) must be less than websocket.ping_interval_ms ({})",
                    websocket.pong_timeout_ms, websocket.ping_interval_ms
                ),
            ));
        }

        let secret = match auth.mode {
            AuthMode::None => Vec::new(),
            AuthMode::Jwt => {
                let (key, secret) = if auth.jwt_secret_env.is_empty() {
                    ("auth.jwt_secret", auth.jwt_secret)
                } else {
                    let name = &auth.jwt_secret_env;
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) if !v.is_empty() => ("auth.jwt_secret_env", v.clone()),
                        Some(_) => {
                            return Err(invalid(
                                "auth.jwt_secret_env",
                                format!("names environment variable {name}, which is empty"),
                            ))
                        }
                        None => {
                            return Err(invalid(
                                "auth.jwt_secret_env",
                                format!("names environment variable {name}, which is not set (or not UTF-8)"),
                            ))
                        }
                    }
                };
                // RFC 7518 §3.2: an HS256 key MUST be at least as long as the hash output (256 bits).
                if secret.len() < *limits::JWT_SECRET_BYTES.start() {
                    return Err(invalid(
                        key,
                        format!(
                            "gives a {}-byte secret; HS256 needs at least {} bytes (RFC 7518 §3.2)",
                            secret.len(),
                            limits::JWT_SECRET_BYTES.start()
                        ),
                    ));
                }
                secret.into_bytes()
            }
        };
        let auth = AuthConfig {
            mode: auth.mode,
            secret,
            leeway_secs: check_range(
                "auth.leeway_secs",
                auth.leeway_secs,
                limits::JWT_LEEWAY_SECS,
            )?,
            max_id_bytes: check_range(
                "auth.max_id_bytes",
                auth.max_id_bytes,
                limits::MAX_ID_BYTES,
            )?,
            max_channels: check_range(
                "auth.max_channels",
                auth.max_channels,
                limits::MAX_CHANNELS,
            )?,
        };

        let admin_listen = parse_listen("admin.listen", &admin.listen)?;
        // Port 0 asks the OS for a free port, so two of them never clash.
        if admin_listen == server.listen && admin_listen.port() != 0 {
            return Err(invalid(
                "admin.listen",
                format!(
                    "({admin_listen}) must differ from server.listen ({})",
                    server.listen
                ),
            ));
        }
        let api_key = match admin.api_key.as_str() {
            "" => None,
            key => {
                check_api_key(key)?;
                Some(admin.api_key)
            }
        };
        let max_publish_bytes = check_range(
            "admin.max_publish_bytes",
            admin.max_publish_bytes,
            limits::MAX_PUBLISH_BYTES,
        )?;
        // A message larger than an outbox would close every recipient as a slow consumer.
        if max_publish_bytes > websocket.max_outbox_bytes {
            return Err(invalid(
                "admin.max_publish_bytes",
                format!(
                    "({max_publish_bytes}) must be at most websocket.max_outbox_bytes ({})",
                    websocket.max_outbox_bytes
                ),
            ));
        }
        let admin = AdminConfig {
            listen: admin_listen,
            api_key,
            max_publish_bytes,
            max_request_head_bytes: check_range(
                "admin.max_request_head_bytes",
                admin.max_request_head_bytes,
                limits::MAX_REQUEST_HEAD_BYTES,
            )?,
            max_request_headers: check_range(
                "admin.max_request_headers",
                admin.max_request_headers,
                limits::MAX_REQUEST_HEADERS,
            )?,
        };

        Ok(Config {
            server,
            websocket,
            auth,
            admin,
            log: LogConfig {
                level: log.level.to_level_filter(),
            },
            cluster: cluster.validate()?,
            history: history.validate()?,
            diagnostics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../config.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, &[])
    }

    fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_toml_str(text, &env)
    }

    fn defaults() -> Config {
        parse("").expect("defaults are valid")
    }

    /// Asserts `text` fails validation on `key` and returns the one-line message.
    fn invalid_key(text: &str) -> (&'static str, String) {
        match parse(text) {
            Err(e @ ConfigError::Invalid { key, .. }) => (key, e.to_string()),
            other => panic!("expected ConfigError::Invalid for {text:?}, got {other:?}"),
        }
    }

    fn parse_error(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Parse(msg)) => msg,
            other => panic!("expected ConfigError::Parse for {text:?}, got {other:?}"),
        }
    }

    fn env_error(text: &str, env: &[(&str, &str)]) -> (String, String) {
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

    #[test]
    fn empty_file_gives_defaults() {
        let c = defaults();
        assert_eq!(
            c.server.listen,
            DEFAULT_SERVER_LISTEN.parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.server.path, DEFAULT_SERVER_PATH);
        assert_eq!(c.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert!(c.server.allowed_origins.is_empty());
        assert_eq!(c.server.shutdown_timeout_ms, DEFAULT_SHUTDOWN_TIMEOUT_MS);
        assert_eq!(c.server.read_buffer_bytes, DEFAULT_READ_BUFFER_BYTES);
        assert_eq!(
            c.websocket.handshake_timeout_ms,
            DEFAULT_HANDSHAKE_TIMEOUT_MS
        );
        assert_eq!(c.websocket.ping_interval_ms, DEFAULT_PING_INTERVAL_MS);
        assert_eq!(c.websocket.pong_timeout_ms, DEFAULT_PONG_TIMEOUT_MS);
        assert_eq!(c.websocket.close_timeout_ms, DEFAULT_CLOSE_TIMEOUT_MS);
        assert_eq!(
            c.websocket.max_inbound_message_bytes,
            DEFAULT_MAX_INBOUND_MESSAGE_BYTES
        );
        assert_eq!(c.websocket.max_outbox_bytes, DEFAULT_MAX_OUTBOX_BYTES);
        assert_eq!(c.websocket.max_handshake_bytes, DEFAULT_MAX_HANDSHAKE_BYTES);
        assert_eq!(
            c.websocket.max_handshake_headers,
            DEFAULT_MAX_HANDSHAKE_HEADERS
        );
        assert_eq!(
            c.websocket.max_buffered_bytes_total,
            DEFAULT_MAX_BUFFERED_BYTES_TOTAL
        );
        assert_eq!(c.websocket.timer_tick_ms, DEFAULT_TIMER_TICK_MS);
        assert_eq!(c.auth.mode, AuthMode::Jwt);
        assert_eq!(c.auth.secret, DEFAULT_JWT_SECRET.as_bytes());
        assert_eq!(c.auth.leeway_secs, DEFAULT_JWT_LEEWAY_SECS);
        assert_eq!(c.auth.max_id_bytes, DEFAULT_MAX_ID_BYTES);
        assert_eq!(c.auth.max_channels, DEFAULT_MAX_CHANNELS);
        assert_eq!(
            c.admin.listen,
            DEFAULT_ADMIN_LISTEN.parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.admin.api_key, None);
        assert_eq!(c.admin.max_publish_bytes, DEFAULT_MAX_PUBLISH_BYTES);
        assert_eq!(
            c.admin.max_request_head_bytes,
            DEFAULT_MAX_REQUEST_HEAD_BYTES
        );
        assert_eq!(c.admin.max_request_headers, DEFAULT_MAX_REQUEST_HEADERS);
        assert_eq!(c.log.level, log::LevelFilter::Info);
    }

    #[test]
    fn shipped_config_toml_equals_defaults() {
        let shipped: FileConfig = toml::from_str(SHIPPED).expect("shipped config.toml parses");
        assert_eq!(shipped, FileConfig::default());
        assert_eq!(
            parse(SHIPPED).expect("shipped config.toml validates"),
            defaults()
        );
    }

    #[test]
    fn shipped_config_toml_sets_every_key() {
        let shipped: toml::Table = SHIPPED.parse().unwrap();
        let schema = schema();
        assert_eq!(join_keys(&shipped), join_keys(&schema), "sections");
        for (section, keys) in &schema {
            let (Some(toml::Value::Table(file)), toml::Value::Table(keys)) =
                (shipped.get(section), keys)
            else {
                panic!("[{section}] is not a table");
            };
            let mut want: Vec<_> = keys.keys().collect();
            let mut got: Vec<_> = file.keys().collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "keys of [{section}] in config.toml");
        }
    }

    #[test]
    fn schema_lists_every_section() {
        assert_eq!(
            join_keys(&schema()),
            "admin, auth, cluster, diagnostics, history, log, server, websocket"
        );
    }

    #[test]
    fn zero_reactors_resolves_to_at_least_one() {
        assert!(parse("[server]\nreactors = 0").unwrap().server.reactors >= 1);
        assert_eq!(parse("[server]\nreactors = 3").unwrap().server.reactors, 3);
    }

    #[test]
    fn pong_timeout_not_below_ping_interval_is_rejected() {
        let (key, msg) =
            invalid_key("[websocket]\nping_interval_ms = 10000\npong_timeout_ms = 15000");
        assert_eq!(key, "websocket.pong_timeout_ms");
        assert_eq!(
            msg,
            "websocket.pong_timeout_ms (15000) must be less than websocket.ping_interval_ms (10000)"
        );
    }

    #[test]
    fn each_validation_error_names_its_key() {
        let cases: &[(&str, &str)] = &[
            ("[server]\nlisten = \"localhost:8080\"", "server.listen"),
            ("[server]\npath = \"ws\"", "server.path"),
            ("[server]\npath = \"/ws?x=1\"", "server.path"),
            ("[server]\nreactors = 5000", "server.reactors"),
            ("[server]\nmax_connections = 0", "server.max_connections"),
            (
                "[server]\nallowed_origins = [\"example.com\"]",
                "server.allowed_origins",
            ),
            (
                "[server]\nallowed_origins = [\"https://example.com/\"]",
                "server.allowed_origins",
            ),
            (
                "[server]\nallowed_origins = [\"*\"]",
                "server.allowed_origins",
            ),
            (
                "[server]\nallowed_origins = [\"https://a.com:0\"]",
                "server.allowed_origins",
            ),
            (
                "[server]\nshutdown_timeout_ms = 100000000",
                "server.shutdown_timeout_ms",
            ),
            (
                "[server]\nread_buffer_bytes = 4095",
                "server.read_buffer_bytes",
            ),
            ("[websocket]\ntimer_tick_ms = 9", "websocket.timer_tick_ms"),
            (
                "[websocket]\ntimer_tick_ms = 1001",
                "websocket.timer_tick_ms",
            ),
            (
                "[websocket]\nhandshake_timeout_ms = 99",
                "websocket.handshake_timeout_ms",
            ),
            (
                "[websocket]\nclose_timeout_ms = 0",
                "websocket.close_timeout_ms",
            ),
            (
                "[websocket]\nping_interval_ms = 50\npong_timeout_ms = 20",
                "websocket.ping_interval_ms",
            ),
            (
                "[websocket]\npong_timeout_ms = 30000",
                "websocket.pong_timeout_ms",
            ),
            (
                "[websocket]\nmax_inbound_message_bytes = 0",
                "websocket.max_inbound_message_bytes",
            ),
            (
                "[websocket]\nmax_outbox_bytes = 4095",
                "websocket.max_outbox_bytes",
            ),
            (
                "[websocket]\nmax_handshake_bytes = 100",
                "websocket.max_handshake_bytes",
            ),
            (
                "[websocket]\nmax_handshake_headers = 5",
                "websocket.max_handshake_headers",
            ),
            (
                "[websocket]\nmax_buffered_bytes_total = 65535",
                "websocket.max_buffered_bytes_total",
            ),
            (
                "[websocket]\nmax_buffered_bytes_total = 100000",
                "websocket.max_buffered_bytes_total",
            ),
            ("[auth]\njwt_secret = \"short\"", "auth.jwt_secret"),
            ("[auth]\njwt_secret = \"\"", "auth.jwt_secret"),
            ("[auth]\nleeway_secs = 301", "auth.leeway_secs"),
            ("[auth]\nmax_id_bytes = 0", "auth.max_id_bytes"),
            ("[auth]\nmax_channels = 5000", "auth.max_channels"),
            ("[admin]\nlisten = \"127.0.0.1\"", "admin.listen"),
            ("[admin]\nlisten = \"127.0.0.1:8080\"", "admin.listen"),
            ("[admin]\napi_key = \"has space\"", "admin.api_key"),
            ("[admin]\nmax_publish_bytes = 0", "admin.max_publish_bytes"),
            (
                "[admin]\nmax_publish_bytes = 2000000",
                "admin.max_publish_bytes",
            ),
            (
                "[admin]\nmax_request_head_bytes = 10",
                "admin.max_request_head_bytes",
            ),
            (
                "[admin]\nmax_request_headers = 2",
                "admin.max_request_headers",
            ),
        ];
        for (text, want) in cases {
            let (key, msg) = invalid_key(text);
            assert_eq!(key, *want, "for {text:?}");
            assert!(
                msg.starts_with(want),
                "message {msg:?} should start with {want}"
            );
        }
    }

    #[test]
    fn out_of_range_message_gives_value_and_bound() {
        let (_, msg) = invalid_key("[server]\nread_buffer_bytes = 100");
        assert_eq!(msg, "server.read_buffer_bytes (100) must be at least 4096");
    }

    #[test]
    fn timeout_below_one_tick_is_rejected_naming_the_tick() {
        let (_, msg) = invalid_key("[websocket]\ntimer_tick_ms = 200\nhandshake_timeout_ms = 150");
        assert_eq!(
            msg,
            "websocket.handshake_timeout_ms (150) must be at least websocket.timer_tick_ms (200)"
        );
    }

    #[test]
    fn same_port_zero_for_both_listeners_is_allowed() {
        let c =
            parse("[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"").unwrap();
        assert_eq!(c.admin.listen.port(), 0);
    }

    #[test]
    fn allowed_origins_are_accepted_and_lowercased() {
        let c = parse(
            "[server]\nallowed_origins = [\"HTTPS://App.Example.com\", \"http://localhost:3000\", \"http://[::1]:8000\"]",
        )
        .unwrap();
        assert_eq!(
            c.server.allowed_origins,
            [
                "https://app.example.com",
                "http://localhost:3000",
                "http://[::1]:8000"
            ]
        );
    }

    #[test]
    fn unknown_key_is_rejected_naming_key_and_section() {
        let msg = parse_error("[websocket]\nping_interval_ms = 30000\npong_timout_ms = 10000\n");
        assert!(msg.starts_with("unknown key `pong_timout_ms`"), "{msg}");
        assert!(msg.contains("in [websocket]"), "{msg}");
        assert!(msg.contains("(line 3)"), "{msg}");
    }

    #[test]
    fn unknown_section_is_rejected_naming_it() {
        let msg = parse_error("[sever]\nlisten = \"0.0.0.0:80\"\n");
        assert!(msg.starts_with("unknown section `sever`"), "{msg}");
        assert!(msg.contains("(line 1)"), "{msg}");
    }

    #[test]
    fn wrong_type_is_rejected_naming_key_and_line() {
        let msg = parse_error("[server]\npath = \"/ws\"\nreactors = \"four\"\n");
        assert!(
            msg.starts_with("server.reactors: invalid type: string \"four\""),
            "{msg}"
        );
        assert!(msg.ends_with("(line 3)"), "{msg}");
    }

    #[test]
    fn wrong_type_in_array_is_rejected_naming_key() {
        let msg = parse_error("[server]\nallowed_origins = [1]\n");
        assert!(msg.starts_with("server.allowed_origins"), "{msg}");
    }

    #[test]
    fn negative_integer_is_rejected_naming_key() {
        let msg = parse_error("[websocket]\nping_interval_ms = -1\n");
        assert!(
            msg.starts_with("websocket.ping_interval_ms: invalid value"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_enum_value_is_rejected_listing_choices() {
        let msg = parse_error("[log]\nlevel = \"verbose\"\n");
        assert!(
            msg.starts_with("log.level: unknown variant `verbose`"),
            "{msg}"
        );
        assert!(msg.contains("`trace`"), "{msg}");
        let msg = parse_error("[auth]\nmode = \"JWT\"\n");
        assert!(msg.starts_with("auth.mode:"), "{msg}");
    }

    #[test]
    fn syntax_error_reports_line_and_column() {
        let msg = parse_error("[server]\nreactors 4\n");
        assert!(
            msg.starts_with("TOML syntax error at line 2, column "),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_key_is_rejected() {
        let msg = parse_error("[server]\nreactors = 1\nreactors = 2\n");
        assert!(msg.contains("reactors"), "{msg}");
    }

    #[test]
    fn every_error_displays_on_one_line() {
        let errors = [
            parse("[server]\nreactors 4").unwrap_err(),
            parse("[websocket]\npong_timout_ms = 1").unwrap_err(),
            parse("[server]\nreactors = \"x\"").unwrap_err(),
            parse("[server]\nmax_connections = 0").unwrap_err(),
            parse_env("", &[("DENSEPUSH_SERVER_NOPE", "1")]).unwrap_err(),
            Config::load(Path::new("/nonexistent/densepush.toml")).unwrap_err(),
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(!msg.contains('\n') && !msg.is_empty(), "{msg:?}");
        }
    }

    #[test]
    fn env_overrides_a_string_key() {
        let c = parse_env(
            "[server]\nlisten = \"127.0.0.1:9000\"",
            &[("DENSEPUSH_SERVER_LISTEN", "0.0.0.0:7000")],
        )
        .unwrap();
        assert_eq!(
            c.server.listen,
            "0.0.0.0:7000".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn env_overrides_an_integer_key() {
        let c = parse_env("", &[("DENSEPUSH_SERVER_REACTORS", "7")]).unwrap();
        assert_eq!(c.server.reactors, 7);
    }

    #[test]
    fn env_overrides_an_array_key() {
        let c = parse_env(
            "",
            &[(
                "DENSEPUSH_SERVER_ALLOWED_ORIGINS",
                r#"["https://a.example", "https://b.example"]"#,
            )],
        )
        .unwrap();
        assert_eq!(
            c.server.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
    }

    #[test]
    fn env_keeps_numeric_text_as_a_string_for_string_keys() {
        let c = parse_env("", &[("DENSEPUSH_ADMIN_API_KEY", "12345")]).unwrap();
        assert_eq!(c.admin.api_key.as_deref(), Some("12345"));
    }

    #[test]
    fn env_overrides_an_enum_key() {
        let c = parse_env(
            "",
            &[
                ("DENSEPUSH_LOG_LEVEL", "debug"),
                ("DENSEPUSH_AUTH_MODE", "none"),
            ],
        )
        .unwrap();
        assert_eq!(c.log.level, log::LevelFilter::Debug);
        assert_eq!(c.auth.mode, AuthMode::None);
    }

    #[test]
    fn env_override_of_jwt_secret_replaces_the_dev_secret() {
        let secret = "an-operator-chosen-secret-of-40-bytes-xx";
        let c = parse_env("", &[("DENSEPUSH_AUTH_JWT_SECRET", secret)]).unwrap();
        assert_eq!(c.auth.secret, secret.as_bytes());
        assert!(!c.uses_dev_secret());
    }

    #[test]
    fn env_unknown_key_is_rejected_naming_the_variable() {
        let (var, msg) = env_error("", &[("DENSEPUSH_SERVER_LISTNE", "0.0.0.0:1")]);
        assert_eq!(var, "DENSEPUSH_SERVER_LISTNE");
        assert!(msg.contains("unknown key `listne` in [server]"), "{msg}");
    }

    #[test]
    fn env_unknown_section_is_rejected_naming_the_variable() {
        let (var, msg) = env_error("", &[("DENSEPUSH_SERVR_LISTEN", "0.0.0.0:1")]);
        assert_eq!(var, "DENSEPUSH_SERVR_LISTEN");
        assert!(msg.contains("unknown section [servr]"), "{msg}");
    }

    #[test]
    fn env_variable_without_a_key_is_rejected() {
        let (var, _) = env_error("", &[("DENSEPUSH_SERVER", "x")]);
        assert_eq!(var, "DENSEPUSH_SERVER");
    }

    #[test]
    fn env_wrong_type_is_rejected_naming_the_variable_and_key() {
        let (var, msg) = env_error("", &[("DENSEPUSH_SERVER_REACTORS", "four")]);
        assert_eq!(var, "DENSEPUSH_SERVER_REACTORS");
        assert!(
            msg.contains("server.reactors must be an integer, got `four`"),
            "{msg}"
        );
    }

    #[test]
    fn env_value_failing_to_deserialize_names_the_variable() {
        let msg = match parse_env("", &[("DENSEPUSH_LOG_LEVEL", "loud")]) {
            Err(ConfigError::Parse(msg)) => msg,
            other => panic!("{other:?}"),
        };
        assert!(
            msg.starts_with("log.level: unknown variant `loud`"),
            "{msg}"
        );
        assert!(msg.ends_with("(set by DENSEPUSH_LOG_LEVEL)"), "{msg}");
    }

    #[test]
    fn section_that_is_not_a_table_is_rejected_naming_it() {
        let msg = parse_error("server = 5\n");
        assert!(
            msg.starts_with("server: invalid type: integer `5`, expected a [server] table"),
            "{msg}"
        );
    }

    #[test]
    fn env_config_path_variable_is_not_an_override() {
        assert!(parse_env("", &[("DENSEPUSH_CONFIG", "/etc/densepush.toml")]).is_ok());
    }

    #[test]
    fn env_log_filter_variable_is_not_an_override() {
        assert!(parse_env("", &[("DENSEPUSH_LOG", "densepush=debug")]).is_ok());
    }

    #[test]
    fn env_ignores_variables_without_the_prefix() {
        assert!(parse_env("", &[("HOME", "/root"), ("densepush_server_reactors", "x")]).is_ok());
    }

    #[test]
    fn validation_error_on_an_env_value_names_the_variable() {
        let (key, msg) = match parse_env("", &[("DENSEPUSH_SERVER_MAX_CONNECTIONS", "0")]) {
            Err(e @ ConfigError::Invalid { key, .. }) => (key, e.to_string()),
            other => panic!("{other:?}"),
        };
        assert_eq!(key, "server.max_connections");
        assert!(
            msg.ends_with("(set by DENSEPUSH_SERVER_MAX_CONNECTIONS)"),
            "{msg}"
        );
    }

    #[test]
    fn jwt_secret_env_is_read_and_wins_over_jwt_secret() {
        let text = "[auth]\njwt_secret = \"file-secret-that-is-long-enough-for-hs256\"\njwt_secret_env = \"MY_JWT_SECRET\"";
        let c = parse_env(
            text,
            &[("MY_JWT_SECRET", "env-secret-that-is-long-enough-for-hs256")],
        )
        .unwrap();
        assert_eq!(c.auth.secret, b"env-secret-that-is-long-enough-for-hs256");
    }

    #[test]
    fn jwt_secret_env_naming_a_missing_variable_is_rejected() {
        let (key, msg) = match parse_env("[auth]\njwt_secret_env = \"MY_JWT_SECRET\"", &[]) {
            Err(e @ ConfigError::Invalid { key, .. }) => (key, e.to_string()),
            other => panic!("{other:?}"),
        };
        assert_eq!(key, "auth.jwt_secret_env");
        assert!(msg.contains("MY_JWT_SECRET, which is not set"), "{msg}");
    }

    #[test]
    fn jwt_secret_env_naming_an_empty_variable_is_rejected() {
        let err = parse_env(
            "[auth]\njwt_secret_env = \"MY_JWT_SECRET\"",
            &[("MY_JWT_SECRET", "")],
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "auth.jwt_secret_env",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn jwt_secret_env_with_a_short_secret_is_rejected_naming_it() {
        let err = parse_env("[auth]\njwt_secret_env = \"S\"", &[("S", "short")]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "auth.jwt_secret_env",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn mode_none_needs_no_secret() {
        let c = parse("[auth]\nmode = \"none\"\njwt_secret = \"\"\njwt_secret_env = \"UNSET_VAR\"")
            .unwrap();
        assert!(c.auth.secret.is_empty());
        assert!(!c.uses_dev_secret());
    }

    #[test]
    fn uses_dev_secret_only_with_the_shipped_secret() {
        assert!(defaults().uses_dev_secret());
        let c = parse("[auth]\njwt_secret = \"a-production-secret-that-is-long-enough\"").unwrap();
        assert!(!c.uses_dev_secret());
    }

    #[test]
    fn admin_is_exposed_without_key_only_off_loopback_and_keyless() {
        assert!(!defaults().admin_exposed_without_key());
        assert!(parse("[admin]\nlisten = \"0.0.0.0:8081\"")
            .unwrap()
            .admin_exposed_without_key());
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
    fn cluster_is_disabled_by_default_with_a_resolved_node_id() {
        let c = defaults().cluster;
        assert_eq!(c.redis_url, None);
        assert_eq!(c.channel_prefix, DEFAULT_CLUSTER_CHANNEL_PREFIX);
        assert!(
            c.node_id.ends_with(&format!("-{}", std::process::id())),
            "{}",
            c.node_id
        );
        assert_eq!(c.reconnect_min_ms, DEFAULT_CLUSTER_RECONNECT_MIN_MS);
        assert_eq!(c.reconnect_max_ms, DEFAULT_CLUSTER_RECONNECT_MAX_MS);
        assert_eq!(c.command_timeout_ms, DEFAULT_CLUSTER_COMMAND_TIMEOUT_MS);
        assert_eq!(
            c.heartbeat_interval_ms,
            DEFAULT_CLUSTER_HEARTBEAT_INTERVAL_MS
        );
        assert_eq!(c.node_ttl_ms, DEFAULT_CLUSTER_NODE_TTL_MS);
        assert_eq!(c.presence_timeout_ms, DEFAULT_CLUSTER_PRESENCE_TIMEOUT_MS);
    }

    #[test]
    fn echo_is_off_by_default_and_can_be_switched_on() {
        assert!(!defaults().diagnostics.echo);
        assert!(
            parse("[diagnostics]\necho = true")
                .unwrap()
                .diagnostics
                .echo
        );
        assert!(parse_error("[diagnostics]\necho = 1").contains("echo"));
    }

    #[test]
    fn history_is_off_by_default() {
        let h = defaults().history;
        assert!(!h.user && !h.channel && !h.all);
        assert_eq!(h.size, DEFAULT_HISTORY_SIZE);
        assert_eq!(h.max_bytes, DEFAULT_HISTORY_MAX_BYTES);
    }

    #[test]
    fn history_settings_are_read_and_checked() {
        let h = parse("[history]\nuser = true\nsize = 5\nttl_secs = 60\nmax_bytes = 100000")
            .unwrap()
            .history;
        assert!(h.user && !h.channel);
        assert_eq!((h.size, h.ttl_secs, h.max_bytes), (5, 60, 100_000));
        for (body, key) in [
            ("size = 0", "history.size"),
            ("ttl_secs = 0", "history.ttl_secs"),
            ("max_bytes = 10", "history.max_bytes"),
        ] {
            let (got, _) = invalid_key(&format!("[history]\n{body}"));
            assert_eq!(got, key, "{body}");
        }
    }

    #[test]
    fn cluster_settings_are_read() {
        let c = parse(
            "[cluster]\nredis_url = \"redis://127.0.0.1:6379/2\"\nnode_id = \"node-a\"\nchannel_prefix = \"dp\"",
        )
        .unwrap()
        .cluster;
        assert_eq!(c.redis_url.as_deref(), Some("redis://127.0.0.1:6379/2"));
        assert_eq!(c.node_id, "node-a");
        assert_eq!(c.channel_prefix, "dp");
    }

    #[test]
    fn cluster_redis_url_can_come_from_the_environment() {
        let c = parse_env(
            "",
            &[("DENSEPUSH_CLUSTER_REDIS_URL", "redis://10.0.0.1:6380")],
        )
        .unwrap()
        .cluster;
        assert_eq!(c.redis_url.as_deref(), Some("redis://10.0.0.1:6380"));
    }

    #[test]
    fn each_cluster_validation_error_names_its_key() {
        let cases: &[(&str, &str)] = &[
            ("redis_url = \"http://x\"", "cluster.redis_url"),
            ("redis_url = \"rediss://x:6379\"", "cluster.redis_url"),
            ("channel_prefix = \"\"", "cluster.channel_prefix"),
            ("channel_prefix = \"a b\"", "cluster.channel_prefix"),
            ("node_id = \"n\\u00e9\"", "cluster.node_id"),
            ("reconnect_min_ms = 0", "cluster.reconnect_min_ms"),
            (
                "reconnect_min_ms = 500\nreconnect_max_ms = 100",
                "cluster.reconnect_max_ms",
            ),
            ("command_timeout_ms = 0", "cluster.command_timeout_ms"),
            ("heartbeat_interval_ms = 0", "cluster.heartbeat_interval_ms"),
            (
                "heartbeat_interval_ms = 1000\nnode_ttl_ms = 1000",
                "cluster.node_ttl_ms",
            ),
            ("presence_timeout_ms = 60000", "cluster.presence_timeout_ms"),
        ];
        for (body, want) in cases {
            let (key, msg) = invalid_key(&format!("[cluster]\n{body}"));
            assert_eq!(key, *want, "{body}: {msg}");
        }
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
