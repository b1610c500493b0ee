//! Wiring: binds the listeners, builds the reactors and the admin server from a validated `Config`, starts
//! their threads, and stops them.
//!
//! It owns start-up and shutdown order only; every request is handled by the threads it starts.

use crate::admin::{conn::Timeouts, http, server as admin_server, AdminServer, Api, ApiSettings};
use crate::auth::Authenticator;
use crate::budget::Budget;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::conn::Rules;
use crate::dispatch::{Mailbox, Reactors};
use crate::events::Events;
use crate::history::{self, store::Limits, History};
use crate::metrics::{AdminMetrics, ReactorMetrics};
use crate::proto::frame;
use crate::proto::handshake::HandshakeLimits;
use crate::publish::Publisher;
use crate::reactor::{Reactor, Settings};
use crate::tls::Tls;
use anyhow::Context;
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Listen backlog; the kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: i32 = 65_535;

/// Sockets a reactor may track beyond `max_connections`, for handshakes in flight (each answered with 503 when
/// over the limit) before new sockets are simply closed.
const HANDSHAKE_HEADROOM: usize = 1_024;

/// A started server.
pub struct Running {
    /// The ws:// listener's address (the real port when the config asked for port 0), if on.
    pub client_addr: Option<SocketAddr>,
    /// The wss:// listener's address, if on.
    pub tls_addr: Option<SocketAddr>,
    /// The TLS configuration, for reloading the certificate (SIGHUP).
    pub tls: Option<Arc<Tls>>,
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    reactors: Reactors,
    threads: Vec<JoinHandle<()>>,
    shutdown_timeout: Duration,
    cluster: Option<Arc<Cluster>>,
    /// Shared with the admin server: set when draining starts.
    draining: Arc<AtomicBool>,
    /// The connection events sender, when `events.webhook_url` is set.
    events: Option<Arc<Events>>,
}

impl Running {
    /// Asks every reactor to stop accepting and close its connections with 1001.
    pub fn shutdown(&self) {
        self.draining.store(true, Ordering::Relaxed);
        if let Some(cluster) = &self.cluster {
            cluster.leave();
        }
        self.reactors.shutdown(self.shutdown_timeout);
    }

    /// Reloads the TLS certificate pair from its files (SIGHUP); a bad pair is refused and the old one kept.
    pub fn reload_tls(&self) {
        match &self.tls {
            Some(tls) => {
                let _ = tls.reload();
            }
            None => log::info!("SIGHUP: no [tls] listener, nothing to reload"),
        }
    }

    /// Waits for every reactor to finish, then gives the events sender a last chance to send the disconnect
    /// events of the drain (within `server.shutdown_timeout_ms` again, one attempt per request).
    pub fn join(self) {
        for handle in self.threads {
            let _ = handle.join();
        }
        if let Some(events) = &self.events {
            events.finish(self.shutdown_timeout);
        }
    }
}

/// Binds everything and starts the threads.
pub fn start(config: &Config) -> anyhow::Result<Running> {
    let reactor_count = config.server.reactors;
    // Reads the key files and, with auth.jwks_url, waits (bounded) for the first fetch of the key set.
    let auth = Arc::new(Authenticator::from_config(&config.auth)?);
    let tls = match config.tls.listen {
        Some(_) => Some(Arc::new(Tls::load(&config.tls)?)),
        None => None,
    };
    // Every reactor gets a clone of these settings, and with it the same shared open-connection counter.
    let history = History::new(history_settings(config));
    let events = Events::start(&config.events, &config.cluster.node_id)?;
    let settings = reactor_settings(config, history.clone(), tls.clone(), events.clone());

    // One listener per reactor and scheme: the first settles the port (it may be 0); the others share it
    // through SO_REUSEPORT, and the kernel spreads incoming connections over them.
    let (client_addr, mut plain) =
        bind_listeners(config.server.listen, reactor_count, "server.listen")?;
    let (tls_addr, mut secure) = bind_listeners(config.tls.listen, reactor_count, "tls.listen")?;

    let mut mailboxes = Vec::new();
    let mut reactor_metrics = Vec::new();
    let mut built = Vec::new();
    for _ in 0..reactor_count {
        let (listener, tls_listener) = (plain.pop(), secure.pop());
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), Reactor::WAKER_TOKEN)?;
        let mailbox = Mailbox::new(waker);
        let metrics = Arc::new(ReactorMetrics::default());
        let reactor = Reactor::new(
            poll,
            listener,
            tls_listener,
            mailbox.clone(),
            auth.clone(),
            metrics.clone(),
            settings.clone(),
        )?;
        mailboxes.push(mailbox);
        reactor_metrics.push(metrics);
        built.push(reactor);
    }

    let reactors = Reactors::new(mailboxes, settings.budget.clone());
    let publisher = Publisher::new(history, reactors.clone());
    let cluster = Cluster::start(
        &config.cluster,
        config.admin.max_publish_bytes,
        publisher.clone(),
        None,
    )?;
    if let Some(cluster) = &cluster {
        // Clients wait in the listeners' backlog until the node knows where it is in the bus, so none is told it
        // may have missed messages published before it even connected. Redis down: start anyway, and the first
        // link tells the connections made meanwhile.
        let wait = Duration::from_millis(config.cluster.command_timeout_ms);
        if !cluster.wait_until_up(wait) {
            log::warn!(
                "cluster link not up after {} ms; serving clients anyway (they are told to resync when it comes up)",
                wait.as_millis()
            );
        }
    }
    let mut handles = Vec::new();
    for (id, reactor) in built.into_iter().enumerate() {
        handles.push(
            std::thread::Builder::new()
                .name(format!("reactor-{id}"))
                .spawn(move || reactor.run())?,
        );
    }
    let admin_listener = std::net::TcpListener::bind(config.admin.listen)
        .with_context(|| format!("binding admin.listen {}", config.admin.listen))?;
    admin_listener.set_nonblocking(true)?;
    let admin_addr = admin_listener.local_addr()?;
    let draining = Arc::new(AtomicBool::new(false));
    let admin_metrics = Arc::new(AdminMetrics {
        buffer_budget: Some(settings.budget.clone()),
        keys: auth.key_metrics(),
        ..AdminMetrics::default()
    });
    let api = Api::new(
        publisher,
        reactor_metrics,
        admin_metrics.clone(),
        ApiSettings {
            api_key: config.admin.api_key.clone(),
            draining: draining.clone(),
            max_publish_bytes: config.admin.max_publish_bytes,
            max_batch_bytes: config.admin.max_batch_bytes,
            max_batch_targets: config.admin.max_batch_targets,
            max_id_bytes: config.auth.max_id_bytes,
        },
        cluster.clone(),
    )
    .with_tls(tls.clone())
    .with_events(events.clone());
    let admin_settings = admin_server::Settings {
        limits: http::Limits {
            max_head_bytes: config.admin.max_request_head_bytes,
            max_headers: config.admin.max_request_headers,
            // The larger of the two: each route's own limit is checked once its head is in (`Api::admit`).
            max_body_bytes: config
                .admin
                .max_publish_bytes
                .max(config.admin.max_batch_bytes),
        },
        max_connections: config.admin.max_connections,
        timeouts: Timeouts {
            header: Duration::from_millis(config.admin.header_timeout_ms),
            idle: Duration::from_millis(config.admin.idle_timeout_ms),
        },
    };
    let admin = AdminServer::new(admin_listener, admin_settings, api, admin_metrics)?;
    // The admin thread is not joined: it serves until the process exits after the reactors drain.
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || admin.run())?;

    Ok(Running {
        client_addr,
        tls_addr,
        tls,
        admin_addr,
        reactors,
        threads: handles,
        shutdown_timeout: Duration::from_millis(config.server.shutdown_timeout_ms),
        cluster,
        draining,
        events,
    })
}

fn history_settings(config: &Config) -> history::Settings {
    let h = &config.history;
    history::Settings {
        user: h.user,
        channel: h.channel,
        all: h.all,
        limits: Limits {
            size: h.size,
            ttl_ms: h.ttl_secs.saturating_mul(1000),
            max_bytes: h.max_bytes,
        },
    }
}

fn reactor_settings(
    config: &Config,
    history: Arc<History>,
    tls: Option<Arc<Tls>>,
    events: Option<Arc<Events>>,
) -> Settings {
    let ws = &config.websocket;
    let tick_ms = ws.timer_tick_ms.max(1);
    // Round up: a deadline never fires early.
    let ticks = |ms: u64| ms.div_ceil(tick_ms).max(1);
    Settings {
        handshake: HandshakeLimits {
            max_head_bytes: ws.max_handshake_bytes,
            max_headers: ws.max_handshake_headers,
            path: config.server.path.clone(),
            sse_path: config.server.sse_path.clone(),
        },
        allowed_origins: config.server.allowed_origins.clone(),
        max_open: config.server.max_connections,
        open_total: Arc::new(AtomicUsize::new(0)),
        // One reactor may be handed most connections, so each may track up to the whole limit.
        max_tracked: (config.server.max_connections + HANDSHAKE_HEADROOM)
            .min(crate::reactor::MAX_KEY as usize),
        tick: Duration::from_millis(tick_ms),
        rules: Rules {
            handshake_timeout_ticks: ticks(ws.handshake_timeout_ms),
            ping_interval_ticks: ticks(ws.ping_interval_ms),
            pong_timeout_ticks: ticks(ws.pong_timeout_ms),
            close_timeout_ticks: ticks(ws.close_timeout_ms),
            frame_limits: frame::Limits {
                max_message_bytes: ws.max_inbound_message_bytes as u64,
                deflate: false,
            },
            max_outbox_bytes: ws.max_outbox_bytes,
            echo: config.diagnostics.echo,
        },
        read_buffer_bytes: config.server.read_buffer_bytes,
        history,
        budget: Arc::new(Budget::new(ws.max_buffered_bytes_total)),
        tls,
        max_channels: config.auth.max_channels,
        events,
        compression: ws.compression,
        codec: crate::message::Codec {
            level: ws.compression_level,
            min_bytes: ws.compression_min_bytes,
        },
        sse_retry_ms: config.server.sse_retry_ms,
    }
}

/// `count` listeners on `addr` (none when it is off), and the address they got.
fn bind_listeners(
    addr: Option<SocketAddr>,
    count: usize,
    key: &str,
) -> anyhow::Result<(Option<SocketAddr>, Vec<std::net::TcpListener>)> {
    let Some(addr) = addr else {
        return Ok((None, Vec::new()));
    };
    let first = bind_reuseport(addr).with_context(|| format!("binding {key} {addr}"))?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(bind_reuseport(bound).with_context(|| format!("binding {bound} again"))?);
    }
    Ok((Some(bound), listeners))
}

/// A non-blocking listener with SO_REUSEPORT, so each reactor can have its own on the same port.
fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}
