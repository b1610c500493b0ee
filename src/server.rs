//! Wiring: binds the listeners (or takes them, and every connection, from a predecessor in a live upgrade),
//! builds the reactors and the admin server from a validated `Config`, starts their threads, and stops or hands
//! them over.
//!
//! It owns start-up, upgrade and shutdown order only; every request is handled by the threads it starts.

use crate::admin::{
    conn::Timeouts, http, server as admin_server, AdminHandle, AdminServer, Api, ApiSettings,
};
use crate::auth::Authenticator;
use crate::budget::Budget;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::conn::Rules;
use crate::dispatch::{Mailbox, Reactors};
use crate::events::Events;
use crate::handoff::{
    self,
    give::{Giver, Outcome, UpgradeState},
    protocol::Facts,
    take::Taker,
};
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
use std::time::{Duration, Instant};

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
    /// What a live upgrade hands over from here.
    successor: Successor,
}

/// What a live upgrade needs of a running server (see `handoff::give`).
struct Successor {
    /// The binary's path at start: replacing the file and upgrading starts the new binary.
    exe: std::path::PathBuf,
    /// This server's arguments.
    args: Vec<std::ffi::OsString>,
    facts: Facts,
    admin: AdminHandle,
    history: Arc<History>,
    state: Arc<UpgradeState>,
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

    /// Starts a successor from the binary at this server's path and hands every listener and connection to it
    /// (SIGUSR2, `densepush upgrade`). On success the process exits here; on failure this returns and the
    /// server carries on as before, the failure logged and counted.
    pub fn upgrade(&self) {
        let s = &self.successor;
        Giver {
            events: self.events.clone(),
            finish_within: self.shutdown_timeout,
            exe: s.exe.clone(),
            args: s.args.clone(),
            facts: s.facts.clone(),
            reactors: self.reactors.clone(),
            admin: s.admin.clone(),
            history: s.history.clone(),
            cluster: self.cluster.clone(),
            state: s.state.clone(),
        }
        .upgrade();
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

/// Binds everything and starts the threads; or, with `taker`, takes the listeners, connections, history and
/// admin connections of the predecessor handing over to this process, and starts only once it let go.
pub fn start(config: &Config, mut taker: Option<Taker>) -> anyhow::Result<Running> {
    let reactor_count = config.server.reactors;
    // Reads the key files and, with auth.jwks_url, waits (bounded) for the first fetch of the key set.
    let auth = Arc::new(Authenticator::from_config(&config.auth)?);
    let tls = match config.tls.listen {
        Some(_) => Some(Arc::new(Tls::load(&config.tls)?)),
        None => None,
    };
    let upgrade = Arc::new(UpgradeState::default());
    let (history, applied_seq) = match taker.as_mut() {
        None => (History::new(history_settings(config)), 0),
        Some(taker) => {
            let accept = taker.accept();
            upgrade.started.store(accept.started, Ordering::Relaxed);
            upgrade.completed.store(accept.completed, Ordering::Relaxed);
            taker.history(history_settings(config))?
        }
    };
    // A successor keeps its predecessor's cluster name when its own is the default (`<hostname>-<pid>`, which
    // names the process, not the node): the other nodes go on seeing one node, not one leaving and one joining.
    let mut cluster_config = config.cluster.clone();
    if let Some(bus) = taker.as_ref().and_then(|t| t.bus()) {
        if config.cluster.node_id_is_default() {
            cluster_config.node_id = bus.node_id.clone();
        }
    }
    // Every reactor gets a clone of these settings, and with it the same shared open-connection counter.
    let events = Events::start(&config.events, &cluster_config.node_id)?;
    let settings = reactor_settings(config, history.clone(), tls.clone(), events.clone());

    // One listener per reactor and scheme: the first settles the port (it may be 0); the others share it
    // through SO_REUSEPORT, and the kernel spreads incoming connections over them. A successor receives the
    // predecessor's, with the clients waiting in their backlogs.
    let (mut client_addr, mut plain, mut tls_addr, mut secure) =
        (None, Vec::new(), None, Vec::new());
    if taker.is_none() {
        (client_addr, plain) =
            bind_listeners(config.server.listen, reactor_count, "server.listen")?;
        (tls_addr, secure) = bind_listeners(config.tls.listen, reactor_count, "tls.listen")?;
    }

    // Every reactor reaches the others (to hand a connection to its user's home reactor), so the mailboxes and
    // their handle exist before the reactors.
    let mut polls = Vec::new();
    let mut mailboxes = Vec::new();
    for _ in 0..reactor_count {
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), Reactor::WAKER_TOKEN)?;
        mailboxes.push(Mailbox::new(waker));
        polls.push(poll);
    }
    let reactors = Reactors::new(mailboxes.clone(), settings.budget.clone());
    let mut reactor_metrics = Vec::new();
    let mut built = Vec::new();
    for (i, poll) in polls.into_iter().enumerate() {
        let (listener, tls_listener) = match taker.as_mut() {
            None => (plain.pop(), secure.pop()),
            Some(taker) => {
                let mut given = taker.listeners(handoff::protocol::kind::LISTENERS)?;
                given.resize_with(2, || None);
                (given[0].take(), given[1].take())
            }
        };
        if client_addr.is_none() {
            client_addr = listener.as_ref().map(|l| l.local_addr()).transpose()?;
        }
        if tls_addr.is_none() {
            tls_addr = tls_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        }
        let metrics = Arc::new(ReactorMetrics::default());
        let mut reactor = Reactor::new(
            poll,
            listener,
            tls_listener,
            (i, reactors.clone()),
            auth.clone(),
            metrics.clone(),
            settings.clone(),
        )?;
        if let Some(taker) = taker.as_mut() {
            use handoff::protocol::kind;
            let (started, mut registering) = (Instant::now(), Duration::ZERO);
            let adopted = taker.batches(kind::BATCH, kind::REACTOR_DONE, |payload, fds| {
                let t = Instant::now();
                let n = reactor.adopt(payload, fds);
                registering += t.elapsed();
                n
            })?;
            log::info!(
                "upgrade: reactor {i}: {adopted} connections in {} ms ({} ms registering them)",
                started.elapsed().as_millis(),
                registering.as_millis()
            );
        }
        reactor_metrics.push(metrics);
        built.push(reactor);
    }
    if taker.is_some() {
        // The predecessor's reactor i handed its connections to reactor i here; those whose user is homed on
        // another reactor (a predecessor without affinity, or another home function) move there now, before any
        // reactor runs, through the same snapshot as the upgrade itself.
        let moved = Reactor::rehome_all(&mut built)?;
        if moved > 0 {
            log::info!("upgrade: {moved} connections moved to their users' home reactors");
        }
        for reactor in &mut built {
            reactor.adopted(applied_seq);
        }
    }

    let publisher = Publisher::new(history.clone(), reactors.clone());
    let admin_listener = match taker.as_mut() {
        None => {
            let listener = std::net::TcpListener::bind(config.admin.listen)
                .with_context(|| format!("binding admin.listen {}", config.admin.listen))?;
            listener.set_nonblocking(true)?;
            listener
        }
        Some(taker) => taker
            .listeners(handoff::protocol::kind::ADMIN)?
            .into_iter()
            .flatten()
            .next()
            .context("the predecessor sent no admin listener")?,
    };
    let admin_addr = admin_listener.local_addr()?;
    let draining = Arc::new(AtomicBool::new(false));
    let admin_metrics = Arc::new(AdminMetrics {
        buffer_budget: Some(settings.budget.clone()),
        keys: auth.key_metrics(),
        ..AdminMetrics::default()
    });
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
    // The cluster bridge starts once this process serves (it publishes into the reactors' mailboxes).
    let mut cluster_slot = None;
    let api = |cluster: Option<Arc<Cluster>>| {
        Api::new(
            publisher.clone(),
            reactor_metrics.clone(),
            admin_metrics.clone(),
            ApiSettings {
                api_key: config.admin.api_key.clone(),
                draining: draining.clone(),
                max_publish_bytes: config.admin.max_publish_bytes,
                max_batch_bytes: config.admin.max_batch_bytes,
                max_batch_targets: config.admin.max_batch_targets,
                max_id_bytes: config.auth.max_id_bytes,
            },
            cluster,
        )
        .with_tls(tls.clone())
        .with_events(events.clone())
        .with_upgrade(upgrade.clone())
    };
    let mut admin = if taker.is_none() {
        let cluster = Cluster::start(
            &cluster_config,
            config.admin.max_publish_bytes,
            publisher.clone(),
            None,
        )?;
        if let Some(cluster) = &cluster {
            // Clients wait in the listeners' backlog until the node knows where it is in the bus, so none is told
            // it may have missed messages published before it even connected. Redis down: start anyway, and
            // the first link tells the connections made meanwhile.
            let wait = Duration::from_millis(config.cluster.command_timeout_ms);
            if !cluster.wait_until_up(wait) {
                log::warn!(
                    "cluster link not up after {} ms; serving clients anyway (they are told to resync when it comes up)",
                    wait.as_millis()
                );
            }
        }
        cluster_slot = Some(cluster.clone());
        AdminServer::new(
            admin_listener,
            admin_settings,
            api(cluster),
            admin_metrics.clone(),
        )?
    } else {
        AdminServer::new(
            admin_listener,
            admin_settings,
            api(None),
            admin_metrics.clone(),
        )?
    };
    let admin_handle = admin.handle()?;
    if let Some(mut taker) = taker {
        use handoff::protocol::kind;
        if let Err(e) = taker.batches(kind::ADMIN_BATCH, kind::DONE, |payload, fds| {
            admin.adopt(payload, fds)
        }) {
            taker.abort(&e.to_string());
            return Err(e.into());
        }
        let position = taker.bus().and_then(|bus| bus.position);
        let outcome = taker.commit()?;
        if let Outcome::Completed {
            moved, pause_ms, ..
        } = outcome
        {
            upgrade.completed.fetch_add(1, Ordering::Relaxed);
            upgrade.moved.store(moved, Ordering::Relaxed);
            upgrade.pause_ms.store(pause_ms, Ordering::Relaxed);
            log::info!(
                "upgrade: took over {moved} connections; serving ({pause_ms} ms since the freeze)"
            );
        }
        *upgrade.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        // Serving now: the bus reader continues from exactly where the predecessor's stopped, delivering into
        // the mailboxes of the reactors that hold the moved connections. (The admin API of this process reports
        // the cluster once it is up.)
        let cluster = Cluster::start(
            &cluster_config,
            config.admin.max_publish_bytes,
            publisher.clone(),
            position,
        )?;
        admin.set_cluster(cluster.clone());
        cluster_slot = Some(cluster);
    }
    let cluster = cluster_slot.flatten();

    let mut handles = Vec::new();
    for (id, reactor) in built.into_iter().enumerate() {
        handles.push(
            std::thread::Builder::new()
                .name(format!("reactor-{id}"))
                .spawn(move || reactor.run())?,
        );
    }
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
        successor: Successor {
            exe: own_path()?,
            args: std::env::args_os().skip(1).collect(),
            facts: Facts::of(config),
            admin: admin_handle,
            history,
            state: upgrade,
        },
        events,
    })
}

/// The path a live upgrade starts the successor from: the one this process was started by (argv[0], made
/// absolute), so a deploy that swaps a symlink (`/opt/densepush/current -> releases/42`) upgrades to the new
/// release; `/proc/self/exe` would name the old one. A bare name (found on `$PATH`) falls back to it.
fn own_path() -> anyhow::Result<std::path::PathBuf> {
    let arg0 = std::env::args_os().next().map(std::path::PathBuf::from);
    match arg0 {
        Some(path) if path.components().count() > 1 => Ok(std::env::current_dir()
            .context("finding the working directory")?
            .join(path)),
        _ => std::env::current_exe().context("finding this binary's path"),
    }
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
