//! The handoff protocol: message kinds, their order, the protocol version, and the settings that cannot change
//! across an upgrade. Sans-IO: encoding and checks only (`channel` moves the bytes).
//!
//! Order (P = predecessor, S = successor):
//!
//! 1. S → P `HELLO` {version, pid, facts}. P answers `REFUSE` {reason} (S exits) or `ACCEPT` {P's pid, when the
//!    upgrade started, the upgrade counters so far}.
//! 2. P freezes (the admin thread, the cluster bus reader between two entries, the reactors), then sends
//!    `HISTORY` {history snapshot, the last stored sequence applied, the cluster node id and bus position};
//! 3. per reactor, in order: `LISTENERS` (ws://, wss:// listening sockets attached), `BATCH`×n (connection
//!    records, their sockets attached), `REACTOR_DONE` {moved, stayed};
//! 4. `ADMIN` (the admin listener attached), `ADMIN_BATCH`×n (admin connections), `DONE` {totals}.
//! 5. S registers everything and answers `COMMITTED`; P answers `GO` and exits; S starts serving only on `GO`.
//!    Either side may send `ABORT` {reason} instead; P rolls back only after S is gone.

use crate::cluster::bus::BusPosition;
use crate::config::Config;
use crate::snapshot::{Reader, SnapshotError, Writer};

/// The protocol version; a successor speaking another one is refused.
pub const VERSION: u32 = 2;

/// The environment variable naming the successor's end of the channel.
pub const FD_ENV: &str = "DENSEPUSH_HANDOFF_FD";

/// Message kinds.
#[allow(missing_docs)]
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const REFUSE: u8 = 2;
    pub const ACCEPT: u8 = 3;
    pub const HISTORY: u8 = 4;
    pub const LISTENERS: u8 = 5;
    pub const BATCH: u8 = 6;
    pub const REACTOR_DONE: u8 = 7;
    pub const ADMIN: u8 = 8;
    pub const ADMIN_BATCH: u8 = 9;
    pub const DONE: u8 = 10;
    pub const COMMITTED: u8 = 11;
    pub const GO: u8 = 12;
    pub const ABORT: u8 = 13;
}

/// The settings an upgrade cannot change: the listening addresses (the sockets move as they are), the reactor
/// count (connections move reactor by reactor) and the cluster identity. Everything else is read afresh by
/// the successor and applies from the handoff on (limits and timeouts to moved connections too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    server_listen: String,
    tls_listen: String,
    admin_listen: String,
    reactors: u32,
    node_id: String,
    redis_url: String,
}

impl Facts {
    /// The facts of a configuration.
    pub fn of(config: &Config) -> Facts {
        let addr = |a: Option<std::net::SocketAddr>| a.map_or(String::new(), |a| a.to_string());
        Facts {
            server_listen: addr(config.server.listen),
            tls_listen: addr(config.tls.listen),
            admin_listen: config.admin.listen.to_string(),
            reactors: config.server.reactors as u32,
            // A default id (`<hostname>-<pid>`) names the process, not the node: it is written empty, and a
            // successor with the default too keeps its predecessor's id (`server::start`).
            node_id: match &config.cluster.redis_url {
                Some(_) if !config.cluster.node_id_is_default() => config.cluster.node_id.clone(),
                _ => String::new(),
            },
            redis_url: config.cluster.redis_url.clone().unwrap_or_default(),
        }
    }

    /// The first setting the successor's facts change, as an error naming its key; `None` when compatible.
    pub fn refuse(&self, successor: &Facts) -> Option<String> {
        let (a, b) = (self, successor);
        let reactors = (a.reactors.to_string(), b.reactors.to_string());
        let checks = [
            ("server.listen", &a.server_listen, &b.server_listen),
            ("tls.listen", &a.tls_listen, &b.tls_listen),
            ("admin.listen", &a.admin_listen, &b.admin_listen),
            ("server.reactors", &reactors.0, &reactors.1),
            ("cluster.node_id", &a.node_id, &b.node_id),
            ("cluster.redis_url", &a.redis_url, &b.redis_url),
        ];
        let refusal = checks.into_iter().find_map(|(key, ours, theirs)| {
            (ours != theirs).then(|| {
                let show = |v: &str| match (key, v) {
                    ("cluster.node_id", "") => "the default, <hostname>-<pid>".to_string(),
                    (_, "") => "off".to_string(),
                    ("cluster.redis_url", v) => crate::config::redact_url(v),
                    (_, v) => v.to_string(),
                };
                format!(
                    "{key} cannot change in an upgrade (running: {}, new config: {}); restart to change it",
                    show(ours),
                    show(theirs)
                )
            })
        });
        refusal
    }

    fn write(&self, w: &mut Writer) {
        w.str(&self.server_listen);
        w.str(&self.tls_listen);
        w.str(&self.admin_listen);
        w.u32(self.reactors);
        w.str(&self.node_id);
        w.str(&self.redis_url);
    }

    fn read(r: &mut Reader<'_>) -> Result<Facts, SnapshotError> {
        Ok(Facts {
            server_listen: r.str("server.listen")?.to_owned(),
            tls_listen: r.str("tls.listen")?.to_owned(),
            admin_listen: r.str("admin.listen")?.to_owned(),
            reactors: r.u32("server.reactors")?,
            node_id: r.str("cluster.node_id")?.to_owned(),
            redis_url: r.str("cluster.redis_url")?.to_owned(),
        })
    }
}

/// `HELLO`: who the successor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Its protocol version.
    pub version: u32,
    /// Its process id.
    pub pid: u32,
    /// Its unchangeable settings.
    pub facts: Facts,
}

impl Hello {
    /// Encoded. The version comes first, so any later version can still be told apart and refused.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(self.version);
        w.u32(self.pid);
        self.facts.write(&mut w);
        w.take()
    }

    /// Decoded; `Err` names what is malformed. A different version decodes its version only: read that
    /// first and refuse before the rest.
    pub fn decode(bytes: &[u8]) -> Result<Hello, SnapshotError> {
        let mut r = Reader::new(bytes);
        let version = r.u32("version")?;
        let pid = r.u32("pid")?;
        if version != VERSION {
            return Ok(Hello {
                version,
                pid,
                facts: Facts::empty(),
            });
        }
        Ok(Hello {
            version,
            pid,
            facts: Facts::read(&mut r)?,
        })
    }
}

impl Facts {
    fn empty() -> Facts {
        Facts {
            server_listen: String::new(),
            tls_listen: String::new(),
            admin_listen: String::new(),
            reactors: 0,
            node_id: String::new(),
            redis_url: String::new(),
        }
    }
}

/// `ACCEPT`: the predecessor's pid, when the upgrade started (ms since the epoch) and its upgrade counters,
/// which the successor carries on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accept {
    /// The predecessor's process id.
    pub pid: u32,
    /// When the upgrade started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// Upgrades started so far (this one included).
    pub started: u64,
    /// Upgrades completed so far (not this one).
    pub completed: u64,
    /// Upgrades rolled back so far.
    pub rolled_back: u64,
}

impl Accept {
    /// Encoded.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(self.pid);
        w.u64(self.started_ms);
        w.u64(self.started);
        w.u64(self.completed);
        w.u64(self.rolled_back);
        w.take()
    }

    /// Decoded.
    pub fn decode(bytes: &[u8]) -> Result<Accept, SnapshotError> {
        let mut r = Reader::new(bytes);
        Ok(Accept {
            pid: r.u32("pid")?,
            started_ms: r.u64("started")?,
            started: r.u64("upgrades started")?,
            completed: r.u64("upgrades completed")?,
            rolled_back: r.u64("upgrades rolled back")?,
        })
    }
}

/// The cluster's part of `HISTORY` (after the history and the applied sequence): the node id and where the
/// predecessor's bus reader stopped, so the successor continues the bus exactly there under the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusHandover {
    /// The predecessor's `cluster.node_id` (resolved).
    pub node_id: String,
    /// Where its reader stopped; `None` if it had never linked (the successor starts at the end of the bus,
    /// as a fresh node would).
    pub position: Option<BusPosition>,
}

impl BusHandover {
    /// Writes `bus` (`None`: the predecessor has no cluster).
    pub fn write(bus: Option<&BusHandover>, w: &mut Writer) {
        w.bool(bus.is_some());
        if let Some(bus) = bus {
            w.str(&bus.node_id);
            w.bool(bus.position.is_some());
            if let Some(p) = bus.position {
                w.u64(p.epoch);
                w.u64(p.applied);
            }
        }
    }

    /// Reads what [`BusHandover::write`] wrote.
    pub fn read(r: &mut Reader<'_>) -> Result<Option<BusHandover>, SnapshotError> {
        if !r.bool("cluster present")? {
            return Ok(None);
        }
        let node_id = r.str("cluster node id")?.to_owned();
        let position = match r.bool("bus position present")? {
            false => None,
            true => Some(BusPosition {
                epoch: r.u64("bus epoch")?,
                applied: r.u64("bus entry")?,
            }),
        };
        Ok(Some(BusHandover { node_id, position }))
    }
}

/// Two counts: connections moved, and connections that stayed behind (TLS handshakes still running).
pub fn encode_counts(moved: u64, stayed: u64) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(moved);
    w.u64(stayed);
    w.take()
}

/// Decodes [`encode_counts`].
pub fn decode_counts(bytes: &[u8]) -> Result<(u64, u64), SnapshotError> {
    let mut r = Reader::new(bytes);
    Ok((r.u64("moved")?, r.u64("stayed")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            server_listen: "0.0.0.0:8080".into(),
            tls_listen: String::new(),
            admin_listen: "127.0.0.1:8081".into(),
            reactors: 2,
            node_id: String::new(),
            redis_url: String::new(),
        }
    }

    #[test]
    fn hello_round_trips() {
        let hello = Hello {
            version: VERSION,
            pid: 42,
            facts: facts(),
        };
        assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
    }

    #[test]
    fn another_version_is_told_apart_whatever_follows() {
        let mut bytes = 99u32.to_le_bytes().to_vec();
        bytes.extend(7u32.to_le_bytes());
        bytes.extend(b"anything a future version sends");
        assert_eq!(Hello::decode(&bytes).unwrap().version, 99);
    }

    #[test]
    fn a_changed_listener_or_reactor_count_is_refused_naming_the_key() {
        let running = facts();
        assert_eq!(running.refuse(&facts()), None);
        let mut moved = facts();
        moved.server_listen = "0.0.0.0:9090".into();
        let reason = running.refuse(&moved).unwrap();
        assert!(
            reason.starts_with("server.listen cannot change"),
            "{reason}"
        );
        assert!(reason.contains("0.0.0.0:8080") && reason.contains("0.0.0.0:9090"));
        let mut more = facts();
        more.reactors = 4;
        assert!(running
            .refuse(&more)
            .unwrap()
            .starts_with("server.reactors"));
        let mut tls = facts();
        tls.tls_listen = "0.0.0.0:443".into();
        let reason = running.refuse(&tls).unwrap();
        assert!(reason.contains("running: off"), "{reason}");
    }

    #[test]
    fn a_default_cluster_node_id_is_no_fact_and_an_explicit_one_is() {
        let config = |extra: &str| {
            let toml = format!("[cluster]\nredis_url = \"redis://127.0.0.1:6379\"\n{extra}");
            Facts::of(&Config::from_toml_str(&toml, &[]).unwrap())
        };
        // `<hostname>-<pid>` differs in every process: were it a fact, no clustered node with the default id
        // could ever upgrade.
        let default = config("");
        assert_eq!(default.node_id, "");
        assert_eq!(config("node_id = \"web-1\"\n").node_id, "web-1");
        let reason = default.refuse(&config("node_id = \"web-1\"\n")).unwrap();
        assert!(
            reason.starts_with("cluster.node_id cannot change"),
            "{reason}"
        );
        assert!(reason.contains("the default"), "{reason}");
    }

    #[test]
    fn a_redis_password_is_not_shown() {
        let mut a = facts();
        a.redis_url = "redis://:secret@10.0.0.5:6379".into();
        let b = facts();
        let reason = b.refuse(&a).unwrap();
        assert!(!reason.contains("secret"), "{reason}");
    }

    #[test]
    fn accept_and_counts_round_trip() {
        let accept = Accept {
            pid: 7,
            started_ms: 1_700_000_000_000,
            started: 3,
            completed: 1,
            rolled_back: 1,
        };
        assert_eq!(Accept::decode(&accept.encode()), Ok(accept));
        assert_eq!(decode_counts(&encode_counts(5, 2)), Ok((5, 2)));
    }

    #[test]
    fn the_bus_handover_round_trips_with_and_without_a_position() {
        let cases = [
            None,
            Some(BusHandover {
                node_id: "web-1-4242".into(),
                position: None,
            }),
            Some(BusHandover {
                node_id: "node-a".into(),
                position: Some(BusPosition {
                    epoch: 1_767_225_600_000,
                    applied: 1042,
                }),
            }),
        ];
        for bus in cases {
            let mut w = Writer::new();
            BusHandover::write(bus.as_ref(), &mut w);
            let bytes = w.take();
            let mut r = Reader::new(&bytes);
            assert_eq!(BusHandover::read(&mut r), Ok(bus));
        }
        assert!(BusHandover::read(&mut Reader::new(&[1, 5, 0, 0, 0])).is_err());
    }
}
