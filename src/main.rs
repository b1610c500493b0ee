//! The `densepush` binary: run the server, mint a development token, or check a config file.

use anyhow::Context;
use clap::{Parser, Subcommand};
use densepush::config::{AuthMode, Config};
use std::path::PathBuf;

/// Counts heap bytes for the `densepush_heap_allocated_bytes` gauge without taking the allocator's locks
/// (`metrics::heap`).
#[global_allocator]
static ALLOCATOR: densepush::metrics::heap::CountingAllocator =
    densepush::metrics::heap::CountingAllocator;

#[derive(Parser)]
#[command(
    name = "densepush",
    version,
    about = "WebSocket push server for millions of mostly idle connections"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "DENSEPUSH_CONFIG",
        default_value = "config.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (the default).
    Run,
    /// Print an HS256 JWT signed with auth.jwt_secret, for connecting a client in development.
    Token {
        /// The user id (`sub` claim).
        #[arg(long)]
        user: String,
        /// The client/device token (`client` claim).
        #[arg(long)]
        client: Option<String>,
        /// Channels to subscribe to, comma separated (`channels` claim).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Validate the configuration file and exit.
    CheckConfig,
    /// Hand every connection of the running server over to a new process started from the binary at its path,
    /// with the same arguments and a fresh read of the config (a deploy, or a config change, without dropping
    /// anyone). Finds the server through admin.listen in the config; prints the outcome.
    Upgrade {
        /// Signal this process id instead of asking the admin API for it.
        #[arg(long)]
        pid: Option<u32>,
        /// The admin API's address, when admin.listen does not give it (port 0, say).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Seconds to wait for the outcome.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("densepush: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config =
        Config::load(&cli.config).with_context(|| format!("config {}", cli.config.display()))?;
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::CheckConfig => {
            // The key files too: a bad PEM or JWKS file fails here, naming the key and the file.
            densepush::auth::load_static_keys(&config.auth)?;
            // The events webhook's CA file too, when one is named.
            densepush::events::Events::check(&config.events)?;
            // The certificate pair too: present, parsable, matching, not expired.
            if config.tls.listen.is_some() {
                densepush::tls::Tls::load(&config.tls)
                    .with_context(|| format!("config {}", cli.config.display()))?;
            }
            println!("{}: ok", cli.config.display());
            Ok(())
        }
        Cmd::Token {
            user,
            client,
            channels,
            ttl,
        } => {
            let channels: Vec<String> = channels.into_iter().filter(|c| !c.is_empty()).collect();
            if config.auth.secret.is_empty() {
                anyhow::bail!(
                    "densepush token signs with auth.jwt_secret (or auth.jwt_secret_env), which is empty in this config; \
                     tokens for it come from your identity provider"
                );
            }
            let token = densepush::auth::issue_token(
                &config.auth.secret,
                &user,
                client.as_deref(),
                &channels,
                ttl,
            )?;
            println!("{token}");
            Ok(())
        }
        Cmd::Run => serve(&config),
        Cmd::Upgrade {
            pid,
            admin,
            timeout,
        } => upgrade(&config, pid, admin, timeout),
    }
}

/// `densepush upgrade`: SIGUSR2 to the running server, then its admin API's `/healthz` until the pid changes
/// (the successor serves) or it reports this upgrade rolled back.
fn upgrade(
    config: &Config,
    pid: Option<u32>,
    admin: Option<std::net::SocketAddr>,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(5)))
            .http_status_as_error(false)
            .build(),
    );
    let url = format!("http://{}/healthz", admin.unwrap_or(config.admin.listen));
    let health = || -> anyhow::Result<serde_json::Value> {
        let mut request = agent.get(&url);
        if let Some(key) = &config.admin.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = request
            .call()
            .with_context(|| format!("asking {url} (admin.listen)"))?;
        let text = response.body_mut().read_to_string()?;
        serde_json::from_str(&text).with_context(|| format!("{url} answered {text:?}"))
    };
    let pid = match pid {
        Some(pid) => pid,
        None => health()?["pid"]
            .as_u64()
            .context("the server's /healthz has no pid: is it older than `densepush upgrade`?")?
            as u32,
    };
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // SAFETY: kill with a plain pid and signal number.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR2) } != 0 {
        anyhow::bail!(
            "signalling process {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        // During the handoff the admin listener is frozen: no answer yet is not an answer.
        let Ok(health) = health() else { continue };
        let upgrade = &health["upgrade"];
        let now_pid = health["pid"].as_u64().unwrap_or(0) as u32;
        if now_pid != pid && upgrade["last"] == "completed" {
            println!(
                "upgraded: process {now_pid} took over {} connections from {pid} in {} ms (deliveries paused {} ms)",
                upgrade["moved"], upgrade["total_ms"], upgrade["pause_ms"]
            );
            return Ok(());
        }
        if now_pid == pid
            && upgrade["last"] == "rolled_back"
            && upgrade["started_ms"].as_u64().unwrap_or(0) >= started_ms
        {
            anyhow::bail!(
                "upgrade rolled back ({}): {}; process {pid} keeps serving",
                upgrade["reason"].as_str().unwrap_or("?"),
                upgrade["detail"].as_str().unwrap_or("")
            );
        }
    }
    anyhow::bail!("no outcome within {timeout_secs} s; check the server's log")
}

fn serve(config: &Config) -> anyhow::Result<()> {
    env_logger::Builder::new()
        .filter_level(config.log.level)
        // The JWKS client's own request traces would drown densepush's debug lines; DENSEPUSH_LOG can
        // still ask for them (e.g. DENSEPUSH_LOG=ureq=debug).
        .filter_module("ureq", log::LevelFilter::Warn.min(config.log.level))
        .filter_module("ureq_proto", log::LevelFilter::Warn.min(config.log.level))
        .filter_module("rustls", log::LevelFilter::Warn.min(config.log.level))
        .parse_env("DENSEPUSH_LOG")
        .format_timestamp_millis()
        .init();
    warn_about_unsafe_settings(config);

    // Installed before any thread starts, so a signal arriving during start-up is not lost.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGUSR2,
    ])
    .context("installing signal handlers")?;
    // A live upgrade started this process: take the predecessor's connections instead of binding.
    let taker = match std::env::var(densepush::handoff::protocol::FD_ENV) {
        Ok(fd) => {
            let fd: i32 = fd
                .parse()
                .with_context(|| format!("{}={fd}", densepush::handoff::protocol::FD_ENV))?;
            // Our own successors must not inherit the variable.
            std::env::remove_var(densepush::handoff::protocol::FD_ENV);
            Some(densepush::handoff::take::Taker::hello(fd, config)?)
        }
        Err(_) => None,
    };
    let successor = taker.is_some();
    let running = densepush::server::start(config, taker)?;
    if !successor {
        densepush::systemd::notify("READY=1");
    }
    let show =
        |addr: Option<std::net::SocketAddr>| addr.map_or("off".to_string(), |a| a.to_string());
    log::info!(
        "densepush {} listening: clients ws://{}{} wss://{}{} admin http://{} reactors {}",
        env!("CARGO_PKG_VERSION"),
        show(running.client_addr),
        config.server.path,
        show(running.tls_addr),
        config.server.path,
        running.admin_addr,
        config.server.reactors
    );
    // One machine-readable line on stdout, so scripts and tests can find ports chosen by the OS.
    println!(
        "densepush listening client={} admin={} tls={}",
        show(running.client_addr),
        running.admin_addr,
        show(running.tls_addr)
    );

    for signal in signals.forever() {
        if signal == signal_hook::consts::SIGHUP {
            // Certificate renewal (certbot's deploy hook): new handshakes use the new pair.
            running.reload_tls();
            continue;
        }
        if signal == signal_hook::consts::SIGUSR2 {
            // A deploy: hand everything over to the binary at our path. Returns only if it rolled back.
            running.upgrade();
            continue;
        }
        log::info!(
            "signal {signal}: closing connections (up to {} ms)",
            config.server.shutdown_timeout_ms
        );
        break;
    }
    running.shutdown();
    running.join();
    log::info!("all connections closed, exiting");
    Ok(())
}

/// Settings that are allowed but unsafe: on loopback, or beyond it with `auth.allow_insecure = true` (the
/// configuration refuses them otherwise, see `config::exposure`).
fn warn_about_unsafe_settings(config: &Config) {
    let opted_in = "; started only because auth.allow_insecure = true";
    let clients_note = if config.clients_beyond_loopback() {
        opted_in
    } else {
        ""
    };
    if config.auth.mode == AuthMode::None {
        log::warn!(
            "auth.mode = \"none\": anyone who can reach {} picks their own user id; use it only on trusted networks{clients_note}",
            [config.server.listen, config.tls.listen]
                .into_iter()
                .flatten()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        );
    } else if config.uses_dev_secret() {
        if config.uses_identity_provider_keys() {
            log::warn!(
                "auth.jwt_secret is the shipped development secret and is still accepted beside your identity \
                 provider's keys: set auth.jwt_secret = \"\" to accept only the provider's tokens{clients_note}"
            );
        } else {
            log::warn!("auth.jwt_secret is the shipped development secret: set DENSEPUSH_AUTH_JWT_SECRET in production{clients_note}");
        }
    }
    if let Some(url) = config.jwks_url_unprotected() {
        log::warn!(
            "auth.jwks_url {} is plain http to another host: whoever can alter that traffic can replace the keys and forge tokens; use https",
            densepush::config::redact_url(url)
        );
    }
    if config.admin_exposed_without_key() {
        log::warn!(
            "admin API on {} is reachable from other hosts and has no admin.api_key: anyone there can publish{opted_in}",
            config.admin.listen
        );
    }
}
