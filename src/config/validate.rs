//! Validation: checks a [`FileConfig`] into a [`Config`], one function per section for ranges and
//! formats, plus the cross-field rules (every timeout against the tick, the buffer budget and the
//! publish size against one outbox, the admin listener against the client one). Also resolves what an
//! unset value means at run time: the reactor count, the cluster node id and the JWT secret (read from
//! the environment handed in).
//!
//! It does not parse text or apply environment overrides (`env` and `error` do that). It reports the
//! first problem only, as a [`ConfigError::Invalid`] naming the dotted key; sections are checked in a
//! fixed order (server, websocket, auth, admin, log, cluster, history), then the start-up refusals
//! (`exposure`), so which error a bad file gets is stable.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use super::error::invalid;
use super::exposure;
use super::file::{
    AdminSection, AuthSection, ClusterSection, DiagnosticsSection, EventsSection, FileConfig,
    HistorySection, JwtSecretEntry, LogSection, ServerSection, TlsSection, WebSocketSection,
};
use super::{
    limits, redact_url, AdminConfig, AuthConfig, AuthMode, ClusterConfig, Config, ConfigError,
    EventsConfig, HistoryConfig, JwtSecret, LogConfig, ServerConfig, TlsConfig, WebSocketConfig,
};

impl FileConfig {
    /// Checks every value and resolves the reactor count and the secret (looked up in `env`).
    pub(super) fn validate(self, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let FileConfig {
            server,
            websocket,
            auth,
            admin,
            log,
            cluster,
            history,
            diagnostics,
            tls,
            events,
        } = self;
        // The order is part of the behaviour: admin is checked against the checked server and websocket
        // sections, and the first error is the one reported.
        let server = validate_server(server)?;
        let websocket = validate_websocket(websocket)?;
        let auth = validate_auth(auth, env)?;
        let admin = validate_admin(admin, &server, &websocket)?;
        let listeners = Listeners {
            server: server.listen,
            admin: admin.listen,
        };
        let config = Config {
            server,
            websocket,
            auth,
            admin,
            log: validate_log(log),
            cluster: validate_cluster(cluster)?,
            history: validate_history(history)?,
            diagnostics: validate_diagnostics(diagnostics),
            tls: validate_tls(tls, &listeners)?,
            events: validate_events(events)?,
        };
        // Last: every value is well-formed by now, and the refusals pair settings of several sections.
        exposure::check(&config)?;
        Ok(config)
    }
}

/// `[server]`: the listener, the upgrade path, the reactor count (0 resolves to one per core), the origin
/// allow-list (lowercased) and the sizes.
fn validate_server(server: ServerSection) -> Result<ServerConfig, ConfigError> {
    Ok(ServerConfig {
        // Empty turns plain ws:// off (wss:// only, `[tls]`).
        listen: match server.listen.trim() {
            "" => None,
            text => Some(parse_listen("server.listen", text)?),
        },
        path: check_path("server.path", &server.path)?,
        sse_path: match server.sse_path.as_str() {
            "" => None,
            p if p == server.path => {
                return Err(invalid(
                    "server.sse_path",
                    format!("(`{p}`) must differ from server.path"),
                ))
            }
            p => Some(check_path("server.sse_path", p)?),
        },
        sse_retry_ms: check_range(
            "server.sse_retry_ms",
            server.sse_retry_ms,
            limits::SSE_RETRY_MS,
        )?,
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
            .map(|o| check_origin(o).map_err(|reason| invalid("server.allowed_origins", reason)))
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
    })
}

/// `[websocket]`: the tick first, since every timeout must be at least one tick; then the sizes, the buffer
/// budget against one outbox, and the pong timeout against the ping interval.
fn validate_websocket(ws: WebSocketSection) -> Result<WebSocketConfig, ConfigError> {
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
        handshake_timeout_ms: timeout("websocket.handshake_timeout_ms", ws.handshake_timeout_ms)?,
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
        compression: ws.compression,
        compression_min_bytes: check_range(
            "websocket.compression_min_bytes",
            ws.compression_min_bytes,
            limits::COMPRESSION_MIN_BYTES,
        )?,
        compression_level: check_range(
            "websocket.compression_level",
            ws.compression_level,
            limits::COMPRESSION_LEVEL,
        )?,
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
    Ok(websocket)
}

/// `[auth]`: resolves the secret (see [`jwt_secret`]; `none` mode has none), checks the extra secrets, the
/// key sources' form (files are read at start, by `auth::load_static_keys`), the JWKS intervals and the
/// issuer and audience.
fn validate_auth(auth: AuthSection, env: &[(String, String)]) -> Result<AuthConfig, ConfigError> {
    let other_sources = !auth.jwt_secrets.is_empty()
        || !auth.jwt_public_key_file.is_empty()
        || !auth.jwks_file.is_empty()
        || !auth.jwks_url.is_empty();
    let jwt = auth.mode == AuthMode::Jwt;
    let secret = if jwt {
        jwt_secret(auth.jwt_secret, &auth.jwt_secret_env, env, other_sources)?
    } else {
        Vec::new()
    };
    let secrets = jwt_secrets(&auth.jwt_secrets)?;
    let path = |p: &str| (!p.is_empty()).then(|| PathBuf::from(p));
    let jwks_url = match auth.jwks_url.as_str() {
        "" => None,
        url => Some(check_jwks_url(url)?),
    };
    let jwks_refresh_secs = check_range(
        "auth.jwks_refresh_secs",
        auth.jwks_refresh_secs,
        limits::JWKS_REFRESH_SECS,
    )?;
    let jwks_min_refresh_secs = check_range(
        "auth.jwks_min_refresh_secs",
        auth.jwks_min_refresh_secs,
        limits::JWKS_MIN_REFRESH_SECS,
    )?;
    // The periodic fetch would then happen more often than the rate limit allows any fetch.
    if jwks_min_refresh_secs > jwks_refresh_secs {
        return Err(invalid(
            "auth.jwks_min_refresh_secs",
            format!(
                "({jwks_min_refresh_secs}) must be at most auth.jwks_refresh_secs ({jwks_refresh_secs})"
            ),
        ));
    }
    let claim = |key: &'static str, value: String| -> Result<Option<String>, ConfigError> {
        check_range(key, value.len(), limits::JWT_ISSUER_AUDIENCE_BYTES)
            .map_err(|_| invalid(key, "must be at most 1024 bytes"))?;
        Ok((!value.is_empty()).then_some(value))
    };
    // In `none` mode no key is used: the sources are checked for form only, then dropped.
    let keep = |v| if jwt { v } else { None };
    Ok(AuthConfig {
        mode: auth.mode,
        secret,
        secrets: if jwt { secrets } else { Vec::new() },
        public_key_file: keep(path(&auth.jwt_public_key_file)),
        jwks_file: keep(path(&auth.jwks_file)),
        jwks_url: if jwt { jwks_url } else { None },
        jwks_refresh_secs,
        jwks_min_refresh_secs,
        jwks_ca_file: keep(path(&auth.jwks_ca_file)),
        issuer: claim("auth.issuer", auth.issuer)?,
        audience: claim("auth.audience", auth.audience)?,
        leeway_secs: check_range(
            "auth.leeway_secs",
            auth.leeway_secs,
            limits::JWT_LEEWAY_SECS,
        )?,
        max_id_bytes: check_range("auth.max_id_bytes", auth.max_id_bytes, limits::MAX_ID_BYTES)?,
        max_channels: check_range("auth.max_channels", auth.max_channels, limits::MAX_CHANNELS)?,
        allow_insecure: auth.allow_insecure,
    })
}

/// The HS256 secret: the variable named by `jwt_secret_env` (looked up in `env`) when that is set, else
/// `jwt_secret`; at least 256 bits either way. An empty `jwt_secret` is allowed when another key source is
/// configured (`other_sources`): that is how HS256 is switched off for an identity provider's tokens.
fn jwt_secret(
    jwt_secret: String,
    jwt_secret_env: &str,
    env: &[(String, String)],
    other_sources: bool,
) -> Result<Vec<u8>, ConfigError> {
    let (key, secret) = if jwt_secret_env.is_empty() {
        ("auth.jwt_secret", jwt_secret)
    } else {
        let name = jwt_secret_env;
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
    if secret.is_empty() && other_sources {
        return Ok(Vec::new());
    }
    // RFC 7518 §3.2: an HS256 key MUST be at least as long as the hash output (256 bits).
    if secret.len() < *limits::JWT_SECRET_BYTES.start() {
        let hint = if secret.is_empty() {
            "; or leave it empty and configure auth.jwt_secrets, auth.jwt_public_key_file, auth.jwks_file \
             or auth.jwks_url"
        } else {
            ""
        };
        return Err(invalid(
            key,
            format!(
                "gives a {}-byte secret; HS256 needs at least {} bytes (RFC 7518 §3.2){hint}",
                secret.len(),
                limits::JWT_SECRET_BYTES.start()
            ),
        ));
    }
    Ok(secret.into_bytes())
}

/// `auth.jwt_secrets`: a bounded list, each secret long enough for HS256, each `kid` visible text and
/// named once (a token's `kid` must select one secret).
fn jwt_secrets(entries: &[JwtSecretEntry]) -> Result<Vec<JwtSecret>, ConfigError> {
    const KEY: &str = "auth.jwt_secrets";
    check_range(KEY, entries.len(), limits::JWT_SECRETS).map_err(|_| {
        invalid(
            KEY,
            format!(
                "has {} entries; at most {} are allowed",
                entries.len(),
                limits::JWT_SECRETS.end()
            ),
        )
    })?;
    let mut checked: Vec<JwtSecret> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let n = i + 1;
        let kid = match entry.kid.as_str() {
            "" => None,
            kid => {
                if !limits::JWT_KID_BYTES.contains(&kid.len()) || kid.chars().any(char::is_control)
                {
                    return Err(invalid(
                        KEY,
                        format!(
                            "entry {n}: kid must be 1 to {} bytes without control characters",
                            limits::JWT_KID_BYTES.end()
                        ),
                    ));
                }
                if checked.iter().any(|s| s.kid.as_deref() == Some(kid)) {
                    return Err(invalid(
                        KEY,
                        format!("entry {n}: kid {kid:?} is given twice"),
                    ));
                }
                Some(kid.to_owned())
            }
        };
        if entry.secret.len() < *limits::JWT_SECRET_BYTES.start() {
            return Err(invalid(
                KEY,
                format!(
                    "entry {n}: a {}-byte secret; HS256 needs at least {} bytes (RFC 7518 §3.2)",
                    entry.secret.len(),
                    limits::JWT_SECRET_BYTES.start()
                ),
            ));
        }
        checked.push(JwtSecret {
            kid,
            secret: entry.secret.clone().into_bytes(),
        });
    }
    Ok(checked)
}

/// `auth.jwks_url`: an absolute `http` or `https` URL with a host (as the HTTP client will parse it).
fn check_jwks_url(url: &str) -> Result<String, ConfigError> {
    check_http_url(
        "auth.jwks_url",
        url,
        "https://idp.example.com/.well-known/jwks.json",
    )
}

/// An absolute `http` or `https` URL with a host (as the HTTP client will parse it); `example` shows one.
fn check_http_url(key: &'static str, url: &str, example: &str) -> Result<String, ConfigError> {
    let uri = url.parse::<ureq::http::Uri>();
    let ok = uri.as_ref().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
    });
    if !ok {
        return Err(invalid(
            key,
            format!(
                "(`{}`) must be an http:// or https:// URL, e.g. {example}",
                redact_url(url)
            ),
        ));
    }
    Ok(url.to_owned())
}

/// `[admin]`: the listener (distinct from `server.listen`), the API key's form, and a publish size no larger
/// than one outbox.
fn validate_admin(
    admin: AdminSection,
    server: &ServerConfig,
    websocket: &WebSocketConfig,
) -> Result<AdminConfig, ConfigError> {
    let admin_listen = parse_listen("admin.listen", &admin.listen)?;
    // Port 0 asks the OS for a free port, so two of them never clash.
    if server.listen == Some(admin_listen) && admin_listen.port() != 0 {
        return Err(invalid(
            "admin.listen",
            format!("({admin_listen}) must differ from server.listen ({admin_listen})"),
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
    Ok(AdminConfig {
        listen: admin_listen,
        api_key,
        max_publish_bytes,
        max_batch_bytes: check_range(
            "admin.max_batch_bytes",
            admin.max_batch_bytes,
            limits::MAX_BATCH_BYTES,
        )?,
        max_batch_targets: check_range(
            "admin.max_batch_targets",
            admin.max_batch_targets,
            limits::MAX_BATCH_TARGETS,
        )?,
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
        max_connections: check_range(
            "admin.max_connections",
            admin.max_connections,
            limits::ADMIN_MAX_CONNECTIONS,
        )?,
        header_timeout_ms: check_range(
            "admin.header_timeout_ms",
            admin.header_timeout_ms,
            limits::ADMIN_TIMEOUT_MS,
        )?,
        idle_timeout_ms: check_range(
            "admin.idle_timeout_ms",
            admin.idle_timeout_ms,
            limits::ADMIN_TIMEOUT_MS,
        )?,
    })
}

/// `[log]`: any level is valid; only its type changes.
fn validate_log(log: LogSection) -> LogConfig {
    LogConfig {
        level: log.level.to_level_filter(),
    }
}

/// `[cluster]`: the Redis URL (empty runs a single node), the names, and the intervals with their ordering
/// rules; an empty node id resolves to `<hostname>-<pid>`.
fn validate_cluster(cluster: ClusterSection) -> Result<ClusterConfig, ConfigError> {
    let redis_url = match cluster.redis_url.as_str() {
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
            Some(cluster.redis_url.clone())
        }
    };
    let channel_prefix = check_cluster_name(
        "cluster.channel_prefix",
        &cluster.channel_prefix,
        limits::CLUSTER_CHANNEL_PREFIX_BYTES,
    )?;
    let node_id = match cluster.node_id.as_str() {
        "" => default_node_id(),
        id => check_cluster_name("cluster.node_id", id, limits::CLUSTER_NODE_ID_BYTES)?,
    };
    let interval = |key: &'static str, ms: u64| check_range(key, ms, limits::CLUSTER_INTERVAL_MS);
    let reconnect_min_ms = interval("cluster.reconnect_min_ms", cluster.reconnect_min_ms)?;
    let reconnect_max_ms = interval("cluster.reconnect_max_ms", cluster.reconnect_max_ms)?;
    if reconnect_max_ms < reconnect_min_ms {
        return Err(invalid(
            "cluster.reconnect_max_ms",
            format!(
                "({reconnect_max_ms}) must be at least cluster.reconnect_min_ms ({reconnect_min_ms})"
            ),
        ));
    }
    let heartbeat_interval_ms = interval(
        "cluster.heartbeat_interval_ms",
        cluster.heartbeat_interval_ms,
    )?;
    let node_ttl_ms = interval("cluster.node_ttl_ms", cluster.node_ttl_ms)?;
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
            cluster.command_timeout_ms,
            limits::CLUSTER_COMMAND_TIMEOUT_MS,
        )?,
        heartbeat_interval_ms,
        node_ttl_ms,
        presence_timeout_ms: check_range(
            "cluster.presence_timeout_ms",
            cluster.presence_timeout_ms,
            limits::CLUSTER_PRESENCE_TIMEOUT_MS,
        )?,
        bus_max_len: check_range(
            "cluster.bus_max_len",
            cluster.bus_max_len,
            limits::CLUSTER_BUS_MAX_LEN,
        )?,
    })
}

/// `[history]`: the per-stream size, the age and the byte budget.
fn validate_history(history: HistorySection) -> Result<HistoryConfig, ConfigError> {
    Ok(HistoryConfig {
        user: history.user,
        channel: history.channel,
        all: history.all,
        size: check_range("history.size", history.size, limits::HISTORY_SIZE)?,
        ttl_secs: check_range(
            "history.ttl_secs",
            history.ttl_secs,
            limits::HISTORY_TTL_SECS,
        )?,
        max_bytes: check_range(
            "history.max_bytes",
            history.max_bytes,
            limits::HISTORY_MAX_BYTES,
        )?,
    })
}

/// `[tls]`: a listener needs both files, an address of its own, and at least one client listener must be on.
/// (The files' contents are checked by `tls::Tls::load`, which `check-config` runs too.)
fn validate_tls(tls: TlsSection, listeners: &Listeners) -> Result<TlsConfig, ConfigError> {
    let listen = match tls.listen.trim() {
        "" => None,
        text => Some(parse_listen("tls.listen", text)?),
    };
    match listen {
        None if listeners.server.is_none() => {
            return Err(invalid(
                "server.listen",
                "is empty and so is tls.listen: at least one client listener must be on",
            ))
        }
        None => {}
        Some(addr) => {
            for (other, key) in [
                (listeners.server, "server.listen"),
                (Some(listeners.admin), "admin.listen"),
            ] {
                if other == Some(addr) && addr.port() != 0 {
                    return Err(invalid(
                        "tls.listen",
                        format!("({addr}) must differ from {key}"),
                    ));
                }
            }
            for (file, key) in [
                (&tls.cert_file, "tls.cert_file"),
                (&tls.key_file, "tls.key_file"),
            ] {
                if file.trim().is_empty() {
                    return Err(invalid(key, "must name a PEM file when tls.listen is set"));
                }
            }
        }
    }
    Ok(TlsConfig {
        listen,
        cert_file: tls.cert_file.trim().into(),
        key_file: tls.key_file.trim().into(),
    })
}

/// The client and admin listeners, for the checks of sections that add another.
struct Listeners {
    server: Option<SocketAddr>,
    admin: SocketAddr,
}

/// `[events]`: the webhook URL (empty turns events off), a header value that can be sent as it is, and the
/// sizes and times with their ranges.
fn validate_events(events: EventsSection) -> Result<EventsConfig, ConfigError> {
    let webhook_url = match events.webhook_url.trim() {
        "" => None,
        url => Some(check_http_url(
            "events.webhook_url",
            url,
            "https://backend.example.com/densepush/events",
        )?),
    };
    let authorization = match events.authorization.as_str() {
        "" => None,
        // RFC 9110 §5.5: a field value is visible characters, spaces and tabs; a CR or LF would end the header
        // and let the value inject others.
        value if value.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic()) => {
            Some(value.to_owned())
        }
        _ => {
            return Err(invalid(
                "events.authorization",
                "must be visible ASCII, spaces and tabs (an HTTP header value), e.g. \"Bearer <token>\"",
            ))
        }
    };
    Ok(EventsConfig {
        webhook_url,
        authorization,
        batch_ms: check_range("events.batch_ms", events.batch_ms, limits::EVENTS_BATCH_MS)?,
        max_batch: check_range(
            "events.max_batch",
            events.max_batch,
            limits::EVENTS_MAX_BATCH,
        )?,
        queue_size: check_range(
            "events.queue_size",
            events.queue_size,
            limits::EVENTS_QUEUE_SIZE,
        )?,
        timeout_ms: check_range(
            "events.timeout_ms",
            events.timeout_ms,
            limits::EVENTS_TIMEOUT_MS,
        )?,
        max_retries: check_range(
            "events.max_retries",
            events.max_retries,
            limits::EVENTS_MAX_RETRIES,
        )?,
        ca_file: match events.ca_file.trim() {
            "" => None,
            path => Some(PathBuf::from(path)),
        },
    })
}

/// `[diagnostics]`: flags only, so nothing to check; kept as a step so every section has one.
fn validate_diagnostics(diagnostics: DiagnosticsSection) -> DiagnosticsSection {
    diagnostics
}

// ---------------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------------

/// `value` if it lies in `range`, else an error giving the value and the bound it crossed.
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

/// A listener address, IP:port only: host names are not resolved.
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
fn check_path(key: &'static str, path: &str) -> Result<String, ConfigError> {
    if !path.starts_with('/') {
        return Err(invalid(key, format!("(`{path}`) must start with '/'")));
    }
    if let Some(bad) = path
        .chars()
        .find(|&c| !c.is_ascii_graphic() || c == '?' || c == '#')
    {
        return Err(invalid(
            key,
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
pub(super) fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "densepush".to_owned());
    format!("{host}-{}", std::process::id())
}

/// One reactor per available core, for `server.reactors = 0`.
fn default_reactors() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

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
            ("[auth]\njwks_url = \"ftp://idp/keys\"", "auth.jwks_url"),
            ("[auth]\njwks_url = \"idp.example/keys\"", "auth.jwks_url"),
            ("[auth]\njwks_refresh_secs = 5", "auth.jwks_refresh_secs"),
            (
                "[auth]\njwks_min_refresh_secs = 0",
                "auth.jwks_min_refresh_secs",
            ),
            (
                "[auth]\njwks_refresh_secs = 60\njwks_min_refresh_secs = 61",
                "auth.jwks_min_refresh_secs",
            ),
            (
                "[auth]\njwt_secrets = [{ kid = \"a\", secret = \"short\" }]",
                "auth.jwt_secrets",
            ),
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
            ("[admin]\nmax_batch_bytes = 10", "admin.max_batch_bytes"),
            ("[admin]\nmax_batch_targets = 0", "admin.max_batch_targets"),
            ("[events]\nwebhook_url = \"ftp://x/\"", "events.webhook_url"),
            ("[events]\nwebhook_url = \"http://\"", "events.webhook_url"),
            (
                "[events]\nauthorization = \"Bearer a\\r\\nX-Evil: 1\"",
                "events.authorization",
            ),
            ("[events]\nbatch_ms = 0", "events.batch_ms"),
            ("[events]\nmax_batch = 0", "events.max_batch"),
            ("[events]\nqueue_size = 0", "events.queue_size"),
            ("[events]\ntimeout_ms = 50", "events.timeout_ms"),
            ("[events]\nmax_retries = 101", "events.max_retries"),
            ("[admin]\nmax_connections = 0", "admin.max_connections"),
            ("[admin]\nmax_connections = 65537", "admin.max_connections"),
            ("[admin]\nheader_timeout_ms = 99", "admin.header_timeout_ms"),
            ("[admin]\nidle_timeout_ms = 0", "admin.idle_timeout_ms"),
            (
                "[admin]\nidle_timeout_ms = 86400001",
                "admin.idle_timeout_ms",
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

    const LONG_A: &str = "secret-a-that-is-long-enough-for-hs256-0000";
    const LONG_B: &str = "secret-b-that-is-long-enough-for-hs256-1111";

    #[test]
    fn jwt_secrets_are_read_with_their_kids() {
        let c = parse(&format!(
            "[auth]\njwt_secrets = [{{ kid = \"2027-01\", secret = \"{LONG_A}\" }}, {{ secret = \"{LONG_B}\" }}]"
        ))
        .unwrap();
        let got: Vec<_> = c
            .auth
            .secrets
            .iter()
            .map(|s| (s.kid.as_deref(), s.secret.as_slice()))
            .collect();
        assert_eq!(
            got,
            [
                (Some("2027-01"), LONG_A.as_bytes()),
                (None, LONG_B.as_bytes())
            ]
        );
        // The primary secret stays, for `densepush token` and tokens without a known kid.
        assert!(c.uses_dev_secret());
    }

    #[test]
    fn a_kid_given_twice_in_jwt_secrets_is_refused() {
        let (key, msg) = invalid_key(&format!(
            "[auth]\njwt_secrets = [{{ kid = \"k\", secret = \"{LONG_A}\" }}, {{ kid = \"k\", secret = \"{LONG_B}\" }}]"
        ));
        assert_eq!(key, "auth.jwt_secrets");
        assert!(msg.contains("entry 2: kid \"k\" is given twice"), "{msg}");
    }

    #[test]
    fn an_unknown_key_in_a_jwt_secrets_entry_is_a_parse_error() {
        let msg = parse_error(&format!(
            "[auth]\njwt_secrets = [{{ id = \"k\", secret = \"{LONG_A}\" }}]"
        ));
        assert!(msg.contains("id"), "{msg}");
    }

    #[test]
    fn empty_jwt_secret_is_allowed_only_with_another_key_source() {
        let (_, msg) = invalid_key("[auth]\njwt_secret = \"\"");
        assert!(msg.contains("or leave it empty and configure"), "{msg}");
        for other in [
            "jwks_url = \"https://idp.example/jwks\"",
            "jwks_file = \"/etc/densepush/jwks.json\"",
            "jwt_public_key_file = \"/etc/densepush/idp.pem\"",
        ] {
            let c = parse(&format!("[auth]\njwt_secret = \"\"\n{other}")).unwrap();
            assert!(c.auth.secret.is_empty(), "{other}");
            assert!(c.uses_identity_provider_keys(), "{other}");
        }
    }

    #[test]
    fn identity_provider_settings_are_read() {
        let c = parse(
            "[auth]\njwks_url = \"https://idp.example/jwks\"\njwks_refresh_secs = 600\n\
             jwks_min_refresh_secs = 30\njwks_ca_file = \"/etc/ca.pem\"\nissuer = \"https://idp.example/\"\n\
             audience = \"densepush\"\njwks_file = \"/k.json\"\njwt_public_key_file = \"/k.pem\"",
        )
        .unwrap()
        .auth;
        assert_eq!(c.jwks_url.as_deref(), Some("https://idp.example/jwks"));
        assert_eq!((c.jwks_refresh_secs, c.jwks_min_refresh_secs), (600, 30));
        assert_eq!(c.jwks_ca_file, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.jwks_file, Some(PathBuf::from("/k.json")));
        assert_eq!(c.public_key_file, Some(PathBuf::from("/k.pem")));
        assert_eq!(c.issuer.as_deref(), Some("https://idp.example/"));
        assert_eq!(c.audience.as_deref(), Some("densepush"));
    }

    #[test]
    fn jwks_url_credentials_never_reach_an_error() {
        let (_, msg) = invalid_key("[auth]\njwks_url = \"ftp://user:hunter2@idp/keys\"");
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn key_sources_are_dropped_in_none_mode() {
        let c = parse(
            "[auth]\nmode = \"none\"\njwks_url = \"https://idp.example/jwks\"\njwks_file = \"/k.json\"",
        )
        .unwrap();
        assert!(!c.uses_identity_provider_keys());
        assert_eq!((c.auth.jwks_url, c.auth.jwks_file), (None, None));
    }

    #[test]
    fn mode_none_needs_no_secret() {
        let c = parse("[auth]\nmode = \"none\"\njwt_secret = \"\"\njwt_secret_env = \"UNSET_VAR\"")
            .unwrap();
        assert!(c.auth.secret.is_empty());
        assert!(!c.uses_dev_secret());
    }

    #[test]
    fn events_settings_are_read() {
        let e = parse(
            "[events]\nwebhook_url = \"https://h.example/ev\"\nauthorization = \"Bearer t0k\"\nmax_batch = 10",
        )
        .unwrap()
        .events;
        assert_eq!(e.webhook_url.as_deref(), Some("https://h.example/ev"));
        assert_eq!(e.authorization.as_deref(), Some("Bearer t0k"));
        assert_eq!(e.max_batch, 10);
        let text = format!("{e:?}");
        assert!(!text.contains("t0k"), "{text}");
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
            ("bus_max_len = 9", "cluster.bus_max_len"),
        ];
        for (body, want) in cases {
            let (key, msg) = invalid_key(&format!("[cluster]\n{body}"));
            assert_eq!(key, *want, "{body}: {msg}");
        }
    }
}
