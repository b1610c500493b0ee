//! `config.toml` as written: [`FileConfig`] and one `*Section` struct per `[section]`, every key optional
//! (serde fills the `DEFAULT_*` constants in), unknown keys rejected (`deny_unknown_fields`, so a typo is an
//! error rather than a silent default), and `Debug` impls that never print a secret.
//!
//! It owns the file's shape only. Whether the values make sense is `validate`'s job, and the checked form the
//! server runs with is [`Config`](super::Config).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::defaults::*;
use super::{redact_url, AuthMode, LogLevel, Redacted};

/// `config.toml` as written: every section and key optional. See [`Config`](super::Config) for the
/// checked form.
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
    /// `[tls]`
    pub tls: TlsSection,
    /// `[events]`
    pub events: EventsSection,
}

/// `[server]` as written. Field docs are on the `DEFAULT_*` constants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [server] table")]
#[allow(missing_docs)]
pub struct ServerSection {
    pub listen: String,
    pub path: String,
    pub sse_path: String,
    pub sse_retry_ms: u64,
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
            sse_path: DEFAULT_SERVER_SSE_PATH.to_owned(),
            sse_retry_ms: DEFAULT_SERVER_SSE_RETRY_MS,
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
    pub compression: bool,
    pub compression_min_bytes: usize,
    pub compression_level: u32,
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
            compression: DEFAULT_COMPRESSION,
            compression_min_bytes: DEFAULT_COMPRESSION_MIN_BYTES,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
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
    pub jwt_secrets: Vec<JwtSecretEntry>,
    pub jwt_public_key_file: String,
    pub jwks_file: String,
    pub jwks_url: String,
    pub jwks_refresh_secs: u64,
    pub jwks_min_refresh_secs: u64,
    pub jwks_ca_file: String,
    pub issuer: String,
    pub audience: String,
    pub leeway_secs: u64,
    pub max_id_bytes: usize,
    pub max_channels: usize,
    pub allow_insecure: bool,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            mode: DEFAULT_AUTH_MODE,
            jwt_secret: DEFAULT_JWT_SECRET.to_owned(),
            jwt_secret_env: DEFAULT_JWT_SECRET_ENV.to_owned(),
            jwt_secrets: DEFAULT_JWT_SECRETS
                .iter()
                .map(|&(kid, secret)| JwtSecretEntry {
                    kid: kid.to_owned(),
                    secret: secret.to_owned(),
                })
                .collect(),
            jwt_public_key_file: DEFAULT_JWT_PUBLIC_KEY_FILE.to_owned(),
            jwks_file: DEFAULT_JWKS_FILE.to_owned(),
            jwks_url: DEFAULT_JWKS_URL.to_owned(),
            jwks_refresh_secs: DEFAULT_JWKS_REFRESH_SECS,
            jwks_min_refresh_secs: DEFAULT_JWKS_MIN_REFRESH_SECS,
            jwks_ca_file: DEFAULT_JWKS_CA_FILE.to_owned(),
            issuer: DEFAULT_JWT_ISSUER.to_owned(),
            audience: DEFAULT_JWT_AUDIENCE.to_owned(),
            leeway_secs: DEFAULT_JWT_LEEWAY_SECS,
            max_id_bytes: DEFAULT_MAX_ID_BYTES,
            max_channels: DEFAULT_MAX_CHANNELS,
            allow_insecure: DEFAULT_ALLOW_INSECURE,
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
            .field("jwt_secrets", &self.jwt_secrets)
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("jwks_file", &self.jwks_file)
            .field("jwks_url", &redact_url(&self.jwks_url))
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

/// One entry of `auth.jwt_secrets`: an HS256 secret and the `kid` that selects it (empty: none, so it is
/// tried for tokens without a known `kid`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table { kid = \"...\", secret = \"...\" }"
)]
pub struct JwtSecretEntry {
    /// The key id tokens name in their header; empty for none.
    #[serde(default)]
    pub kid: String,
    /// The secret, at least 32 bytes.
    pub secret: String,
}

impl fmt::Debug for JwtSecretEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSecretEntry")
            .field("kid", &self.kid)
            .field("secret", &Redacted(self.secret.len()))
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
    pub max_batch_bytes: usize,
    pub max_batch_targets: usize,
    pub max_request_head_bytes: usize,
    pub max_request_headers: usize,
    pub max_connections: usize,
    pub header_timeout_ms: u64,
    pub idle_timeout_ms: u64,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: DEFAULT_ADMIN_LISTEN.to_owned(),
            api_key: DEFAULT_ADMIN_API_KEY.to_owned(),
            max_publish_bytes: DEFAULT_MAX_PUBLISH_BYTES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_batch_targets: DEFAULT_MAX_BATCH_TARGETS,
            max_request_head_bytes: DEFAULT_MAX_REQUEST_HEAD_BYTES,
            max_request_headers: DEFAULT_MAX_REQUEST_HEADERS,
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            header_timeout_ms: DEFAULT_ADMIN_HEADER_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_ADMIN_IDLE_TIMEOUT_MS,
        }
    }
}

impl fmt::Debug for AdminSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminSection")
            .field("listen", &self.listen)
            .field("api_key", &Redacted(self.api_key.len()))
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
    pub bus_max_len: u64,
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
            bus_max_len: DEFAULT_CLUSTER_BUS_MAX_LEN,
        }
    }
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
            .field("bus_max_len", &self.bus_max_len)
            .finish()
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

/// `[tls]` as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [tls] table")]
pub struct TlsSection {
    /// See [`DEFAULT_TLS_LISTEN`].
    pub listen: String,
    /// See [`DEFAULT_TLS_CERT_FILE`].
    pub cert_file: String,
    /// See [`DEFAULT_TLS_KEY_FILE`].
    pub key_file: String,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            listen: DEFAULT_TLS_LISTEN.to_owned(),
            cert_file: DEFAULT_TLS_CERT_FILE.to_owned(),
            key_file: DEFAULT_TLS_KEY_FILE.to_owned(),
        }
    }
}

/// `[events]` as written. Field docs are on the `DEFAULT_EVENTS_*` constants.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [events] table")]
#[allow(missing_docs)]
pub struct EventsSection {
    pub webhook_url: String,
    pub authorization: String,
    pub batch_ms: u64,
    pub max_batch: usize,
    pub queue_size: usize,
    pub timeout_ms: u64,
    pub max_retries: u32,
    pub ca_file: String,
}

impl Default for EventsSection {
    fn default() -> Self {
        EventsSection {
            webhook_url: DEFAULT_EVENTS_WEBHOOK_URL.to_owned(),
            authorization: DEFAULT_EVENTS_AUTHORIZATION.to_owned(),
            batch_ms: DEFAULT_EVENTS_BATCH_MS,
            max_batch: DEFAULT_EVENTS_MAX_BATCH,
            queue_size: DEFAULT_EVENTS_QUEUE_SIZE,
            timeout_ms: DEFAULT_EVENTS_TIMEOUT_MS,
            max_retries: DEFAULT_EVENTS_MAX_RETRIES,
            ca_file: DEFAULT_EVENTS_CA_FILE.to_owned(),
        }
    }
}

// Hand-written so the webhook's credentials (in its URL or its Authorization header) never reach a log line.
impl fmt::Debug for EventsSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventsSection")
            .field("webhook_url", &redact_url(&self.webhook_url))
            .field("authorization", &Redacted(self.authorization.len()))
            .field("batch_ms", &self.batch_ms)
            .field("max_batch", &self.max_batch)
            .field("queue_size", &self.queue_size)
            .field("timeout_ms", &self.timeout_ms)
            .field("max_retries", &self.max_retries)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}
