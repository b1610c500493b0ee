//! The coordinator ↔ worker protocol: one JSON object per line, commands on the worker's stdin, events on its
//! stdout (stderr is left to the terminal).
//!
//! It owns the message shapes only. A worker answers each command that asks for a result with exactly one
//! event; `Progress` events may come at any time.

use crate::checker::Stream;
use crate::stats::{LatencyData, Reasons};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

/// What a worker is told once, first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInit {
    /// This worker's number, from 0.
    pub worker: usize,
    /// The server's client listener.
    pub server: SocketAddr,
    /// The upgrade path, e.g. `/ws`.
    pub path: String,
    /// Global index of this worker's first connection.
    pub first_conn: u64,
    /// Number of connections this worker owns (indices `first_conn..first_conn + conns`).
    pub conns: u64,
    /// Connections per user: connection `i` belongs to user `u{i / conns_per_user}`.
    pub conns_per_user: u64,
    /// Number of the first user (`--first-user`): connection `i` belongs to user `first_user + i / conns_per_user`.
    #[serde(default)]
    pub first_user: u64,
    /// Channels: connection `i` joins `ch{i % channels}` (0 = none).
    pub channels: u64,
    /// Source addresses; connection `i` binds `sources[i % len]` (empty = let the kernel choose).
    pub sources: Vec<IpAddr>,
    /// Milliseconds a connection has from `connect` to a complete 101.
    pub handshake_timeout_ms: u64,
    /// Milliseconds the worker may live at all; it exits by itself after that.
    pub max_lifetime_ms: u64,
    /// Seed for mask keys and victim picks.
    pub seed: u64,
    /// Connect over TLS (`--tls`), and offer session tickets (`--tls-resume`).
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// Which connections are slow readers and how their sockets are set up (the slow-reader phase).
    #[serde(default)]
    pub slow: Option<SlowSockets>,
    /// Offer permessage-deflate (`--compression`).
    #[serde(default)]
    pub compression: bool,
}

/// Slow readers: connection `i` is one when `i % every == 0`; its socket gets a small receive buffer and a
/// mobile network's segment size before connect, so the server's writes to it block soon once it stops
/// reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowSockets {
    /// One connection in `every` is a slow reader.
    pub every: u64,
    /// `SO_RCVBUF`, bytes.
    pub receive_buffer: usize,
    /// `TCP_MAXSEG`, bytes.
    pub mss: u32,
}

impl SlowSockets {
    /// Whether connection `index` is a slow reader.
    pub fn is_slow(&self, index: u64) -> bool {
        index % self.every.max(1) == 0
    }
}

/// How the workers use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsMode {
    /// Offer tickets from earlier connections (resumed handshakes) instead of full handshakes only.
    pub resume: bool,
}

/// What a worker waits for before answering `Await`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expectation {
    /// Every open connection receives sequence numbers `0..n`.
    All(u64),
    /// Every open connection of user `first_user + k` receives `counts[k]` messages (`0..counts[k]`).
    PerUser {
        /// User number of `counts[0]`.
        first_user: u64,
        /// Messages sent to each user.
        counts: Vec<u64>,
    },
    /// Every open connection that has seen the stream receives everything from its first message to `n - 1`.
    UpTo(u64),
}

/// Coordinator → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Set up; answered by `Ready`.
    Init(WorkerInit),
    /// Open every connection at `rate_per_sec` with at most `max_inflight` handshakes at once; answered by
    /// `Connected` once each has succeeded or failed, or at `timeout_ms`.
    Connect {
        /// Connection attempts per second (0 = as fast as `max_inflight` allows).
        rate_per_sec: f64,
        /// Handshakes in flight at most.
        max_inflight: usize,
        /// Milliseconds for the whole phase.
        timeout_ms: u64,
    },
    /// Answer `Delivered` once `expect` is met on every open connection, or at `timeout_ms`.
    Await {
        /// Which stream.
        stream: Stream,
        /// What complete means.
        expect: Expectation,
        /// Milliseconds to wait at most.
        timeout_ms: u64,
        /// Leave the slow readers out (they are paused).
        #[serde(default)]
        skip_slow: bool,
    },
    /// The slow readers stop reading; answered by `Paused`.
    Pause,
    /// The slow readers read again; answered by `Resumed` once each has the `messages` of the slow stream or
    /// has ended, or at `timeout_ms`.
    Resume {
        /// Messages published on the slow stream.
        messages: u64,
        /// Milliseconds to wait at most.
        timeout_ms: u64,
    },
    /// Close and reopen connections for `duration_ms`; answered by `Churned` once the reopened ones are settled.
    Churn {
        /// Connections (of this worker) to close per second.
        closes_per_sec: f64,
        /// How long to keep churning.
        duration_ms: u64,
        /// Milliseconds after `duration_ms` to let the last reopen finish.
        settle_ms: u64,
    },
    /// Close every connection (close handshake, up to `timeout_ms`), answer `Bye` and exit.
    Shutdown {
        /// Milliseconds for the close handshakes.
        timeout_ms: u64,
    },
}

/// Result of the connect phase on one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectResult {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections upgraded and open at the end.
    pub open: u64,
    /// Failed attempts by reason (`http_503`, `reset`, `refused`, `timeout`, `eof`, `bad_upgrade`, ...).
    pub failures: Reasons,
    /// Handshake latency, connect() to a verified 101.
    pub handshake_us: LatencyData,
    /// CLOCK_MONOTONIC ns of the first attempt.
    pub first_start_ns: u64,
    /// CLOCK_MONOTONIC ns of the last success.
    pub last_done_ns: u64,
}

/// One recorded check failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Global connection index.
    pub conn: u64,
    /// Stream name.
    pub stream: String,
    /// `gap`, `reordered`, `duplicate`, `misdelivered`, `malformed` or `lost`.
    pub kind: String,
    /// The sequence number received (or, for `lost`, the first one missing).
    pub seq: u64,
    /// The sequence number expected next at that moment.
    pub expected: u64,
}

/// Delivery figures of one stream on one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeliveryResult {
    /// Whether the expectation was met before the timeout.
    pub complete: bool,
    /// Open connections checked at the end.
    pub conns_checked: u64,
    /// Messages the expectation called for: summed over checked connections, plus (churn) what connections
    /// closed since were due.
    pub expected: u64,
    /// Distinct messages received (all connections, including ones closed since).
    pub received: u64,
    /// Messages never received.
    pub lost: u64,
    /// Messages received more than once.
    pub duplicated: u64,
    /// Messages received after a later one of the same stream.
    pub reordered: u64,
    /// Messages addressed to another user.
    pub misdelivered: u64,
    /// Data frames that are not a payload of ours.
    pub malformed: u64,
    /// Publish-to-receive latency.
    pub latency_us: LatencyData,
    /// Publish-to-receive latency of sequence number 0 alone.
    pub first_message_latency_us: LatencyData,
    /// CLOCK_MONOTONIC ns of the first and last delivery (0 if none).
    pub first_ns: u64,
    /// See `first_ns`.
    pub last_ns: u64,
    /// The first few violations.
    pub violations: Vec<Violation>,
}

/// Result of the churn phase on one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnResult {
    /// Connections closed by the generator (close handshake).
    pub closed: u64,
    /// Connections reopened successfully.
    pub reopened: u64,
    /// Reopen failures by reason.
    pub failures: Reasons,
    /// Connections open at the end.
    pub open: u64,
    /// Handshake latency of the reopens.
    pub handshake_us: LatencyData,
}

/// What the slow readers found when they read again, on one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SlowResult {
    /// Slow readers that were paused.
    pub paused: u64,
    /// Still open with every message of the slow stream, in order.
    pub lossless: u64,
    /// Still open, but missing messages when the wait ended.
    pub incomplete: u64,
    /// Ended with a close frame from the server, by close code (after a gap-free prefix of the stream:
    /// gaps show as violations).
    pub closed_with_frame: Reasons,
    /// Ended without a close frame (EOF or reset): what a browser reports as 1006.
    pub ended_without_frame: Reasons,
    /// Messages the closed ones received before their end, summed.
    pub messages_before_end: u64,
    /// The other (not slow) connections the server closed meanwhile with a close frame, by code.
    pub others_closed_with_frame: Reasons,
    /// The other connections that ended meanwhile without a close frame, by how.
    pub others_ended_without_frame: Reasons,
    /// Slow-stream messages received twice or after a later one (by any slow reader).
    pub duplicated: u64,
    /// See `duplicated`.
    pub reordered: u64,
    /// The first few violations on the slow stream (a `gap` is a message missing before a later one).
    pub violations: Vec<Violation>,
}

/// Connection health over the worker's life.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Health {
    /// Pings received from the server while open.
    pub pings: u64,
    /// Pings received after our close frame (not answered).
    pub pings_after_close: u64,
    /// Pongs sent back.
    pub pongs: u64,
    /// Close frames the server started, by close code.
    pub server_closes: Reasons,
    /// Connections that ended without a close handshake (EOF or reset while open), by reason.
    pub abrupt: Reasons,
    /// Server frames that broke RFC 6455, by error.
    pub protocol_errors: Reasons,
    /// Connections still open at shutdown that did not finish the close handshake in time.
    pub close_timeouts: u64,
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Initialised.
    Ready {
        /// Open-files limit of the worker process.
        fd_limit: u64,
    },
    /// A snapshot for the progress line.
    Progress {
        /// Connections open now.
        open: u64,
        /// Attempts started so far in the current phase.
        started: u64,
        /// Attempts failed so far in the current phase.
        failed: u64,
    },
    /// Answer to `Connect`.
    Connected(ConnectResult),
    /// Answer to `Await`.
    Delivered(DeliveryResult),
    /// Answer to `Churn`.
    Churned(ChurnResult),
    /// Answer to `Pause`: how many slow readers stopped reading.
    Paused {
        /// Slow readers paused.
        slow: u64,
    },
    /// Answer to `Resume`.
    Resumed(SlowResult),
    /// Answer to `Shutdown`.
    Bye(Health),
    /// The worker cannot go on.
    Fatal {
        /// Why.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_one_line_of_tagged_json() {
        let cmd = Command::Await {
            stream: Stream::Unicast,
            expect: Expectation::PerUser {
                first_user: 3,
                counts: vec![1, 2],
            },
            timeout_ms: 5,
            skip_slow: false,
        };
        let line = serde_json::to_string(&cmd).unwrap();
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with(r#"{"cmd":"await","stream":"unicast""#),
            "{line}"
        );
        let back: Command = serde_json::from_str(&line).unwrap();
        assert!(matches!(
            back,
            Command::Await {
                expect: Expectation::PerUser { first_user: 3, .. },
                ..
            }
        ));
    }

    #[test]
    fn events_round_trip() {
        let line = serde_json::to_string(&Event::Progress {
            open: 1,
            started: 2,
            failed: 0,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"event":"progress","open":1,"started":2,"failed":0}"#
        );
        assert!(matches!(
            serde_json::from_str::<Event>(&line).unwrap(),
            Event::Progress { open: 1, .. }
        ));
    }
}
