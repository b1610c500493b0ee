//! Command-line options of the generator.
//!
//! It owns argument names, defaults and their validation rules; it does not run anything. The hidden `worker`
//! subcommand is how the coordinator re-executes its own binary for each worker process.

use clap::builder::TypedValueParser as _;
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The phases, in the order they always run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Open every connection; handshakes/s, failures by reason, handshake latency.
    Connect,
    /// Hold the connections idle; server RSS and kernel memory per connection.
    Idle,
    /// Publish to /publish/all; deliveries/s, end-to-end latency, exactly-once in-order check.
    Broadcast,
    /// Concurrent publishers to random users; publishes/s, latency, per-user check.
    Unicast,
    /// Batch publishes naming `--batch-targets` users each, every user once per round; targets delivered/s
    /// against the unicast phase's single publishes.
    Batch,
    /// Close and reopen connections while publishing to all; memory after.
    Churn,
    /// A fraction of the connections (slow mobile sockets) stop reading while broadcasts go out, then read
    /// again: how many got a close frame, a bare end, or stayed open lossless; server memory and budget.
    Slow,
}

#[derive(Debug, Parser)]
#[command(
    name = "densepush-loadtest",
    version,
    about = "Load generator for densepush: N WebSocket clients from a few event-driven worker processes",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Cmd>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Internal: a worker process driven over stdin/stdout by the coordinator.
    #[command(hide = true)]
    Worker,
}

/// Options of a load test run.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Client WebSocket listener of the server (IP:PORT).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub server: SocketAddr,
    /// Admin API of the server (IP:PORT).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub admin: SocketAddr,
    /// Upgrade path.
    #[arg(long, default_value = "/ws")]
    pub path: String,
    /// PID of the server, for RSS and CPU samples from /proc (without it those figures are absent).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Allow a server address outside loopback (127.0.0.0/8, ::1).
    #[arg(long)]
    pub allow_remote: bool,
    /// Connect with TLS 1.3 (wss://): `--server` is then the server's TLS listener. Certificates are not
    /// verified (the generator only loads a server it was pointed at).
    #[arg(long)]
    pub tls: bool,
    /// With --tls: resume sessions from tickets earlier connections received (resumed handshakes); without
    /// it every handshake is full.
    #[arg(long, requires = "tls")]
    pub tls_resume: bool,

    /// Number of connections.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub conns: u64,
    /// Worker processes (0 = as few as the open-files limit allows).
    #[arg(short = 'w', long, default_value_t = 0)]
    pub workers: usize,
    /// Source addresses 127.0.0.2 .. 127.0.0.(K+1), bound before connect; 0 = let the kernel choose.
    #[arg(long, default_value_t = 4)]
    pub source_ips: u8,
    /// Connections per user: connection i belongs to user u{i / K}.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::PossibleValuesParser::new(["1", "2", "5", "10", "100"])
        .map(|s| s.parse::<u64>().expect("listed values are numbers")))]
    pub conns_per_user: u64,
    /// Number of the first user: connection i belongs to user u{F + i / K}. Generators that share a cluster
    /// (clients on different nodes, publishing through one) use disjoint user ranges, so each checks only the
    /// messages it published.
    #[arg(long, default_value_t = 0)]
    pub first_user: u64,
    /// Channels: connection i joins ch{i % K} (0 = none).
    #[arg(long, default_value_t = 16)]
    pub channels: u64,
    /// Phases to run (always in the order connect, idle, broadcast, unicast, batch, churn, slow; all but connect
    /// need it). `slow` is not in the default list: its sockets are set up at connect, which changes the other
    /// phases' figures.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "connect,idle,broadcast,unicast,batch,churn"
    )]
    pub phases: Vec<Phase>,

    /// Connection attempts per second, over all workers (0 = as fast as --max-inflight allows).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Handshakes in flight at once per worker.
    #[arg(long, default_value_t = 1024)]
    pub max_inflight: usize,
    /// Milliseconds from connect() to a verified 101 before the attempt counts as timed out.
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,

    /// Seconds to hold the connections idle before sampling memory.
    #[arg(long, default_value_t = 10.0)]
    pub idle_secs: f64,

    /// Bytes in each published payload (the header is never cut, so tiny sizes grow to fit it).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Publish payloads as binary frames (Content-Type: application/octet-stream) instead of text.
    #[arg(long)]
    pub binary: bool,
    /// Pad payloads as a JSON notification (a realistic 3-5x compression ratio) instead of dots (which
    /// compress about 30x).
    #[arg(long)]
    pub json_payload: bool,
    /// Offer permessage-deflate (`permessage-deflate; client_max_window_bits`, as Chrome does) and inflate
    /// what arrives compressed; the server must have `websocket.compression` on to accept it.
    #[arg(long)]
    pub compression: bool,
    /// Messages published to /publish/all in the broadcast phase.
    #[arg(long, default_value_t = 20)]
    pub broadcast_messages: u64,
    /// Milliseconds between broadcast publishes (0 = back to back).
    #[arg(long, default_value_t = 0)]
    pub broadcast_interval_ms: u64,

    /// Concurrent publishers (keep-alive admin connections) in the unicast phase.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Messages published to random users in the unicast phase, over all publishers.
    #[arg(long, default_value_t = 10_000)]
    pub unicast_messages: u64,
    /// Unicast publishes per second over all publishers (0 = back to back): at a fixed rate, latencies of
    /// different servers or topologies compare at the same load.
    #[arg(long, default_value_t = 0.0)]
    pub unicast_rate: f64,

    /// Rounds of the batch phase: each reaches every user once, through batches of `--batch-targets` users,
    /// sent by `--publishers` concurrent publishers.
    #[arg(long, default_value_t = 10)]
    pub batch_rounds: u64,
    /// User targets per batch publish (one message per batch, framed once for all of them).
    #[arg(long, default_value_t = 1000)]
    pub batch_targets: u64,

    /// Seconds of churn.
    #[arg(long, default_value_t = 10.0)]
    pub churn_secs: f64,
    /// Fraction of the connections closed and reopened per second during churn.
    #[arg(long, default_value_t = 0.02)]
    pub churn_fraction: f64,
    /// Milliseconds between publishes to /publish/all during churn.
    #[arg(long, default_value_t = 1000)]
    pub churn_publish_interval_ms: u64,

    /// Fraction of the connections that are slow readers in the slow phase (one in round(1/F), from
    /// connection 0).
    #[arg(long, default_value_t = 0.1)]
    pub slow_fraction: f64,
    /// SO_RCVBUF of a slow reader's socket, set before connect, bytes.
    #[arg(long, default_value_t = 8192)]
    pub slow_receive_buffer: usize,
    /// TCP_MAXSEG of a slow reader's socket, set before connect, bytes (a mobile network's 1460).
    #[arg(long, default_value_t = 1460)]
    pub slow_mss: u32,
    /// Messages published to /publish/all while the slow readers do not read.
    #[arg(long, default_value_t = 200)]
    pub slow_messages: u64,
    /// Bytes in each of those payloads.
    #[arg(long, default_value_t = 4096)]
    pub slow_payload_bytes: usize,
    /// Milliseconds the slow readers stay paused after every other connection received those messages (past
    /// the server's websocket.close_timeout_ms, 3 s by default, a reader it closed has been given up on).
    #[arg(long, default_value_t = 5000)]
    pub slow_pause_ms: u64,

    /// Seconds each phase may take at most (connect, each delivery wait, churn settling).
    #[arg(long, default_value_t = 60)]
    pub phase_timeout_secs: u64,
    /// Seconds the whole run may take; phases still to run are skipped and the report says so.
    #[arg(long, default_value_t = 240)]
    pub max_seconds: u64,

    /// Print the report as JSON on stdout (the human summary goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub json_file: Option<PathBuf>,
    /// No progress line, even on a terminal.
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    /// Whether `phase` was asked for.
    pub fn has(&self, phase: Phase) -> bool {
        self.phases.contains(&phase)
    }

    /// Checks what clap cannot; the message names the option.
    pub fn validate(&self) -> Result<(), String> {
        let local = self.server.ip().is_loopback() && self.admin.ip().is_loopback();
        if !(self.allow_remote || local) {
            return Err(
                "--server and --admin must be loopback addresses (127.0.0.0/8, ::1) unless --allow-remote is given"
                    .into(),
            );
        }
        if self.conns == 0 {
            return Err("--conns must be at least 1".into());
        }
        if !self.has(Phase::Connect) && self.phases.iter().any(|p| *p != Phase::Connect) {
            return Err("every phase needs connections: include connect in --phases".into());
        }
        if self.source_ips as u16 + 1 > 255 {
            return Err("--source-ips must be at most 254".into());
        }
        if self.unicast_rate < 0.0 || !self.unicast_rate.is_finite() {
            return Err("--unicast-rate must be a non-negative number".into());
        }
        if self.rate < 0.0 || !self.rate.is_finite() {
            return Err("--rate must be a non-negative number".into());
        }
        if !(self.slow_fraction > 0.0 && self.slow_fraction <= 1.0) {
            return Err("--slow-fraction must be above 0 and at most 1".into());
        }
        if !(0.0..=1.0).contains(&self.churn_fraction) {
            return Err("--churn-fraction must be between 0 and 1".into());
        }
        if !self.idle_secs.is_finite() || self.idle_secs < 0.0 {
            return Err("--idle-secs must be a non-negative number".into());
        }
        if !self.churn_secs.is_finite() || self.churn_secs < 0.0 {
            return Err("--churn-secs must be a non-negative number".into());
        }
        if self.publishers == 0 {
            return Err("--publishers must be at least 1".into());
        }
        if self.batch_targets == 0 {
            return Err("--batch-targets must be at least 1".into());
        }
        if !self.path.starts_with('/') {
            return Err("--path must start with '/'".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> RunArgs {
        let mut all = vec!["densepush-loadtest"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().run
    }

    #[test]
    fn defaults_run_every_phase_against_loopback() {
        let args = parse(&[]);
        assert_eq!(args.phases.len(), 6);
        assert!(args.validate().is_ok());
    }

    #[test]
    fn remote_targets_need_the_flag() {
        let args = parse(&["--server", "10.0.0.1:80"]);
        assert!(args.validate().unwrap_err().contains("--allow-remote"));
        assert!(parse(&["--server", "10.0.0.1:80", "--allow-remote"])
            .validate()
            .is_ok());
        assert!(parse(&["--server", "[::1]:80", "--admin", "127.0.0.9:1"])
            .validate()
            .is_ok());
    }

    #[test]
    fn conns_per_user_accepts_only_listed_values() {
        assert_eq!(parse(&["--conns-per-user", "5"]).conns_per_user, 5);
        assert_eq!(parse(&["--conns-per-user", "100"]).conns_per_user, 100);
        let mut argv = vec!["x", "--conns-per-user", "3"];
        assert!(Cli::try_parse_from(argv.drain(..)).is_err());
    }

    #[test]
    fn the_slow_phase_runs_last_and_only_when_asked() {
        assert!(!parse(&[]).has(Phase::Slow));
        let args = parse(&["--phases", "slow,connect"]);
        assert!(args.validate().is_ok());
        assert!(Phase::Slow > Phase::Churn);
        assert!(parse(&["--phases", "connect,slow", "--slow-fraction", "0"])
            .validate()
            .is_err());
    }

    #[test]
    fn phases_without_connect_are_refused() {
        assert!(parse(&["--phases", "idle"]).validate().is_err());
        assert!(parse(&["--phases", "connect"]).validate().is_ok());
    }

    #[test]
    fn worker_subcommand_is_hidden_but_parses() {
        let cli = Cli::try_parse_from(["x", "worker"]).unwrap();
        assert!(matches!(cli.command, Some(Cmd::Worker)));
    }
}
