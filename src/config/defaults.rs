//! The default of every setting, one named constant each whose doc gives the unit, and the names of the
//! environment variables that override settings.
//!
//! `config.toml` at the repository root lists every one of these; a test keeps them equal. It does not say
//! which values are acceptable (that is [`limits`](super::limits) and `validate`) nor read anything.

use super::{AuthMode, LogLevel};

/// Address (IP:port) of the client WebSocket listener. Loopback, for local development.
pub const DEFAULT_SERVER_LISTEN: &str = "127.0.0.1:8080";
/// HTTP request path on which clients upgrade to WebSocket.
pub const DEFAULT_SERVER_PATH: &str = "/ws";
/// HTTP request path of the Server-Sent Events stream on the same listeners; empty turns SSE off.
pub const DEFAULT_SERVER_SSE_PATH: &str = "/sse";
/// Milliseconds an EventSource waits before reconnecting after its stream ends (the `retry:` field).
pub const DEFAULT_SERVER_SSE_RETRY_MS: u64 = 3_000;
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
/// Milliseconds to wait for the client's close frame and the final flush after the server closes (a drain's
/// queued messages, a close frame the socket could not take yet); then the connection goes.
pub const DEFAULT_CLOSE_TIMEOUT_MS: u64 = 3_000;
/// Bytes in the largest message a client may send (after reassembling fragments).
pub const DEFAULT_MAX_INBOUND_MESSAGE_BYTES: usize = 65_536;
/// Bytes queued but unsent on one connection before it is closed as a slow consumer: how far one reader may
/// lag, counted per connection (logical: a frame shared with other connections counts whole here).
pub const DEFAULT_MAX_OUTBOX_BYTES: usize = 1_048_576;
/// Bytes in the largest accepted upgrade request head (request line plus headers).
pub const DEFAULT_MAX_HANDSHAKE_BYTES: usize = 8_192;
/// Headers in the largest accepted upgrade request.
pub const DEFAULT_MAX_HANDSHAKE_HEADERS: usize = 32;
/// Bytes the server really holds in buffers (partial request heads and inbound frames, echo messages, TLS
/// buffers, queued frames — each distinct frame once, however many outboxes and mailboxes hold it — plus one
/// 8-byte slot per queued reference); past it new buffering is refused. 256 MiB: 32,768 partial request heads
/// of the default `max_handshake_bytes`, or 256 slow readers each 1 MiB behind on frames of their own (readers
/// of the same broadcasts share theirs).
pub const DEFAULT_MAX_BUFFERED_BYTES_TOTAL: usize = 256 << 20;
/// Negotiate permessage-deflate (RFC 7692) with clients that offer it. Off: see `config.toml` for why.
pub const DEFAULT_COMPRESSION: bool = false;
/// Bytes below which a message (its payload, or its envelope) is sent uncompressed even to compressing
/// clients.
pub const DEFAULT_COMPRESSION_MIN_BYTES: usize = 128;
/// zlib compression level, 0 (stored) to 9; each message is compressed once whatever its recipient count.
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 1;
/// Milliseconds per tick of the timing wheel; every timeout is rounded up to whole ticks.
pub const DEFAULT_TIMER_TICK_MS: u64 = 100;

/// How clients authenticate (a JWT in the upgrade request, or not at all).
pub const DEFAULT_AUTH_MODE: AuthMode = AuthMode::Jwt;
/// DEVELOPMENT ONLY: the HS256 secret shipped in `config.toml`, public to anyone who has read this
/// file. [`Config::uses_dev_secret`](super::Config::uses_dev_secret) lets `main` warn when it is still
/// in use.
pub const DEFAULT_JWT_SECRET: &str = "densepush-development-secret-change-me";
/// Name of an environment variable holding the JWT secret; empty means use `auth.jwt_secret`.
pub const DEFAULT_JWT_SECRET_ENV: &str = "";
/// More HS256 secrets, for rotation: each `{ kid = "...", secret = "..." }`; a token whose `kid` names one
/// is checked with it. None by default.
pub const DEFAULT_JWT_SECRETS: &[(&str, &str)] = &[];
/// PEM file of the identity provider's public keys (RSA, P-256, P-384, Ed25519); empty means none.
pub const DEFAULT_JWT_PUBLIC_KEY_FILE: &str = "";
/// File holding a JSON Web Key Set (RFC 7517) of public keys; empty means none.
pub const DEFAULT_JWKS_FILE: &str = "";
/// URL of the identity provider's JSON Web Key Set (`http://` or `https://`); empty means none.
pub const DEFAULT_JWKS_URL: &str = "";
/// Seconds between two fetches of `auth.jwks_url`.
pub const DEFAULT_JWKS_REFRESH_SECS: u64 = 300;
/// Seconds between two fetches of `auth.jwks_url` at least, however many tokens name an unknown `kid`; also
/// the first delay of the backoff after a failed fetch.
pub const DEFAULT_JWKS_MIN_REFRESH_SECS: u64 = 10;
/// PEM file of the CA certificates to trust for an `https` `auth.jwks_url`; empty means the bundled Mozilla
/// roots.
pub const DEFAULT_JWKS_CA_FILE: &str = "";
/// The issuer a token's `iss` claim must equal; empty means `iss` is not checked.
pub const DEFAULT_JWT_ISSUER: &str = "";
/// The audience a token's `aud` claim must name; empty means a token with any `aud` is refused.
pub const DEFAULT_JWT_AUDIENCE: &str = "";
/// Seconds of clock skew tolerated when checking a token's `exp` and `nbf` claims.
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 5;
/// Bytes in the longest user id a token may carry.
pub const DEFAULT_MAX_ID_BYTES: usize = 128;
/// Channels one token may subscribe its connection to.
pub const DEFAULT_MAX_CHANNELS: usize = 32;
/// Start even when a listener beyond loopback is open to anyone: the development secret or `auth.mode = "none"`
/// with `server.listen` beyond loopback, or `admin.listen` beyond loopback without `admin.api_key`. For trusted
/// networks only; otherwise such a configuration is refused.
pub const DEFAULT_ALLOW_INSECURE: bool = false;

/// Address (IP:port) of the admin HTTP API (publish, metrics). Loopback, for local development.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
/// Bearer key the admin API requires; empty means no authentication.
pub const DEFAULT_ADMIN_API_KEY: &str = "";
/// Bytes in the largest message body the admin API accepts for publishing.
pub const DEFAULT_MAX_PUBLISH_BYTES: usize = 1_048_576;
/// Bytes in the largest `POST /publish/batch` body (its JSON, before base64 payloads are decoded). As large as
/// one publish by default, so the admin listener's worst-case memory (a body per connection) stays the same.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1_048_576;
/// Targets one `POST /publish/batch` may name, summed over its messages.
pub const DEFAULT_MAX_BATCH_TARGETS: usize = 10_000;
/// Bytes in the largest admin HTTP request head (request line plus headers).
pub const DEFAULT_MAX_REQUEST_HEAD_BYTES: usize = 8_192;
/// Headers in the largest admin HTTP request.
pub const DEFAULT_MAX_REQUEST_HEADERS: usize = 32;
/// Admin connections held at once; past it a new one is answered 503 and closed. Admin sockets share the
/// process's descriptors with client sockets.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 256;
/// Milliseconds an admin client has to send a complete request head, from its first byte (from the accept, for
/// the first request); nginx's `client_header_timeout`.
pub const DEFAULT_ADMIN_HEADER_TIMEOUT_MS: u64 = 60_000;
/// Milliseconds an admin connection may go without progress: between requests (keep-alive), inside a request
/// body, or with answers its client does not read; nginx's `keepalive_timeout`.
pub const DEFAULT_ADMIN_IDLE_TIMEOUT_MS: u64 = 75_000;

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
/// Milliseconds between a node's heartbeats (its alive marker in Redis, and a check of the bus and the
/// presence subscription).
pub const DEFAULT_CLUSTER_HEARTBEAT_INTERVAL_MS: u64 = 2_000;
/// Milliseconds a node's alive marker outlives its last heartbeat; a dead node stops counting as known then.
pub const DEFAULT_CLUSTER_NODE_TTL_MS: u64 = 10_000;
/// Milliseconds a cluster presence query waits for the other nodes' answers.
pub const DEFAULT_CLUSTER_PRESENCE_TIMEOUT_MS: u64 = 300;
/// Entries the bus stream keeps (Redis `XADD MAXLEN ~`, so a little more): a node whose link is cut, or that
/// reads slower than the cluster publishes, continues without a loss while it is less than this many entries
/// behind. At 1,000 publishes/s through the cluster, 100,000 entries are 100 s; Redis holds about the messages'
/// payload plus ~50 bytes per entry.
pub const DEFAULT_CLUSTER_BUS_MAX_LEN: u64 = 100_000;

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

/// Address for wss:// (TLS); empty = no TLS listener.
pub const DEFAULT_TLS_LISTEN: &str = "";
/// PEM file with the certificate chain, leaf first.
pub const DEFAULT_TLS_CERT_FILE: &str = "";
/// PEM file with the private key (ECDSA P-256/P-384, RSA, or Ed25519; PKCS#8, SEC1 or PKCS#1).
pub const DEFAULT_TLS_KEY_FILE: &str = "";

/// URL connection events are POSTed to (`http://` or `https://`); empty turns events off.
pub const DEFAULT_EVENTS_WEBHOOK_URL: &str = "";
/// `Authorization` header value sent with every events request (e.g. `Bearer <token>`); empty sends none.
pub const DEFAULT_EVENTS_AUTHORIZATION: &str = "";
/// Milliseconds an event waits at most before the request carrying it starts (a full batch goes at once).
pub const DEFAULT_EVENTS_BATCH_MS: u64 = 1_000;
/// Events per request at most.
pub const DEFAULT_EVENTS_MAX_BATCH: usize = 1_000;
/// Events waiting to be sent at most; past it new events are dropped and counted
/// (`densepush_events_dropped_total{reason="queue_full"}`). About 64 bytes each while queued.
pub const DEFAULT_EVENTS_QUEUE_SIZE: usize = 65_536;
/// Milliseconds one events request may take, connection and TLS handshake included.
pub const DEFAULT_EVENTS_TIMEOUT_MS: u64 = 5_000;
/// Times a failed events request is retried (after a jittered, doubling delay) before its events are dropped
/// and counted.
pub const DEFAULT_EVENTS_MAX_RETRIES: u32 = 3;
/// PEM file of the CA certificates to trust for an `https` webhook; empty means the bundled Mozilla roots.
pub const DEFAULT_EVENTS_CA_FILE: &str = "";

/// Prefix of the environment variables that override settings: `DENSEPUSH_<SECTION>_<KEY>`.
pub const ENV_PREFIX: &str = "DENSEPUSH_";
/// Variables that carry [`ENV_PREFIX`] but are not overrides, so they are not rejected as unknown
/// keys: `DENSEPUSH_CONFIG` names the config file and `DENSEPUSH_LOG` is an env_logger filter (both read by
/// `main`).
pub const ENV_NOT_OVERRIDES: &[&str] =
    &["DENSEPUSH_CONFIG", "DENSEPUSH_LOG", "DENSEPUSH_HANDOFF_FD"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env::{join_keys, schema};
    use crate::config::test_support::*;
    use crate::config::FileConfig;
    use std::net::SocketAddr;

    /// `config.toml` at the repository root, which must list every default.
    const SHIPPED: &str = include_str!("../../config.toml");

    #[test]
    fn empty_file_gives_defaults() {
        let c = defaults();
        assert_eq!(
            c.server.listen,
            Some(DEFAULT_SERVER_LISTEN.parse::<SocketAddr>().unwrap())
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
        assert!(c.auth.secrets.is_empty());
        assert_eq!(c.auth.public_key_file, None);
        assert_eq!(c.auth.jwks_file, None);
        assert_eq!(c.auth.jwks_url, None);
        assert_eq!(c.auth.jwks_refresh_secs, DEFAULT_JWKS_REFRESH_SECS);
        assert_eq!(c.auth.jwks_min_refresh_secs, DEFAULT_JWKS_MIN_REFRESH_SECS);
        assert_eq!(c.auth.jwks_ca_file, None);
        assert_eq!(
            (c.auth.issuer.as_deref(), c.auth.audience.as_deref()),
            (None, None)
        );
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
        assert_eq!(c.admin.max_connections, DEFAULT_ADMIN_MAX_CONNECTIONS);
        assert_eq!(c.admin.header_timeout_ms, DEFAULT_ADMIN_HEADER_TIMEOUT_MS);
        assert_eq!(c.admin.idle_timeout_ms, DEFAULT_ADMIN_IDLE_TIMEOUT_MS);
        assert_eq!(c.admin.max_batch_bytes, DEFAULT_MAX_BATCH_BYTES);
        assert_eq!(c.admin.max_batch_targets, DEFAULT_MAX_BATCH_TARGETS);
        assert!(!c.auth.allow_insecure);
        assert_eq!(c.log.level, log::LevelFilter::Info);
        assert_eq!(c.events.webhook_url, None);
        assert_eq!(c.events.authorization, None);
        assert_eq!(c.events.batch_ms, DEFAULT_EVENTS_BATCH_MS);
        assert_eq!(c.events.max_batch, DEFAULT_EVENTS_MAX_BATCH);
        assert_eq!(c.events.queue_size, DEFAULT_EVENTS_QUEUE_SIZE);
        assert_eq!(c.events.timeout_ms, DEFAULT_EVENTS_TIMEOUT_MS);
        assert_eq!(c.events.max_retries, DEFAULT_EVENTS_MAX_RETRIES);
        assert_eq!(c.events.ca_file, None);
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
        assert_eq!(c.bus_max_len, DEFAULT_CLUSTER_BUS_MAX_LEN);
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
}
