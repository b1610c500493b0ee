//! wss:// built in: the server's TLS configuration, its certificate (replaceable while running), and the
//! per-connection parts (`session`, `record`).
//!
//! Design: rustls runs each handshake (TLS 1.3 only, ring provider, stateless session tickets with rotating
//! keys), then hands over the traffic keys and is dropped; densepush's own record layer (`record`) seals and
//! opens application records with those keys, expanding the AEAD key schedule only per record. So an idle
//! wss connection holds about a hundred bytes of key material and no buffer, instead of a TLS library's
//! connection object. It owns loading and checking the certificate pair, the SIGHUP reload and the TLS
//! counters; it does not own sockets (the reactor) or what runs over TLS (the connection machine).
//!
//! TLS 1.2 is not offered: after the handshake the record layer is densepush's, and TLS 1.2 would need a
//! second record format (explicit nonces, other additional data) for clients that every current browser
//! and mobile OS has outgrown. kTLS is not used (this project's kernels are built without it); the state
//! kept after the handshake is exactly what kTLS would take.

pub mod record;
pub mod session;
pub mod table;

use crate::config::TlsConfig;
use crate::metrics::{Exposition, MetricType};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub use session::{Completed, Failure, Session, TlsWire};

/// Why the certificate pair cannot be used; the message names the config key and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{key} {}: {error}", path.display())]
    Read {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// A file's contents are not what the key needs.
    #[error("{key} {}: {reason}", path.display())]
    Invalid {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// TLS counters and gauges, shared by every reactor.
#[derive(Debug, Default)]
pub struct TlsMetrics {
    /// Counter: full handshakes completed.
    pub handshakes_full: AtomicU64,
    /// Counter: handshakes resumed from a session ticket.
    pub handshakes_resumed: AtomicU64,
    /// Counter: connections ended by a TLS failure, by [`session::FAILURE_LABELS`].
    pub failures: [AtomicU64; session::FAILURE_LABELS.len()],
    /// Gauge: established TLS connections.
    pub sessions: AtomicU64,
    /// Gauge: bytes held for TLS: session records (keys) and buffers of handshakes and busy connections.
    pub bytes: AtomicU64,
    /// Counter: certificate reloads that took effect.
    pub reloads: AtomicU64,
    /// Counter: certificate reloads refused (the previous pair stays in use).
    pub reload_failures: AtomicU64,
}

impl TlsMetrics {
    /// Counts a connection ended by `failure`.
    pub fn fail(&self, label: &str) {
        if let Some(i) = session::FAILURE_LABELS.iter().position(|l| *l == label) {
            self.failures[i].fetch_add(1, Relaxed);
        }
    }
}

/// The certificate in use, swapped whole on reload; handshakes in progress keep the one they started with.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The server's TLS side: one rustls configuration shared by every reactor.
#[derive(Debug)]
pub struct Tls {
    config: Arc<ServerConfig>,
    resolver: Arc<Resolver>,
    cert_file: PathBuf,
    key_file: PathBuf,
    /// Seconds since the epoch at which the certificate in use expires.
    not_after: AtomicI64,
    /// The counters.
    pub metrics: TlsMetrics,
}

impl Tls {
    /// Loads and checks the certificate pair (the key matches the leaf certificate, which has not expired) and
    /// builds the configuration.
    pub fn load(config: &TlsConfig) -> Result<Tls, TlsError> {
        let (key, not_after) = load_pair(&config.cert_file, &config.key_file)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(key)),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let invalid = |reason: String| TlsError::Invalid {
            key: "tls.cert_file",
            path: config.cert_file.clone(),
            reason,
        };
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // WebSocket upgrades are HTTP/1.1 (RFC 6455 §4.1); a client offering only h2 is refused in the
        // handshake rather than after it.
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Resumption by stateless tickets whose keys rotate (rustls's ticketer: a new key every six hours,
        // the previous one still accepted), and no server-side session cache: no memory per session.
        server.ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|e| invalid(e.to_string()))?;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        // After the handshake only the traffic keys are kept (`record`).
        server.enable_secret_extraction = true;
        Ok(Tls {
            config: Arc::new(server),
            resolver,
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            not_after: AtomicI64::new(not_after),
            metrics: TlsMetrics::default(),
        })
    }

    /// The configuration new handshakes use.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// A session for a newly accepted connection.
    pub fn session(&self) -> Result<Session, rustls::Error> {
        Session::new(self.config())
    }

    /// Reads the certificate pair again (SIGHUP, after a renewal); new handshakes use it. A pair that does not
    /// load or check is refused, logged and counted, and the one in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        match load_pair(&self.cert_file, &self.key_file) {
            Ok((key, not_after)) => {
                *self
                    .resolver
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                self.not_after.store(not_after, Relaxed);
                self.metrics.reloads.fetch_add(1, Relaxed);
                log::info!(
                    "tls: certificate reloaded from {}; it expires in {} days",
                    self.cert_file.display(),
                    self.seconds_left() / 86_400
                );
                Ok(())
            }
            Err(e) => {
                self.metrics.reload_failures.fetch_add(1, Relaxed);
                log::error!("tls: certificate reload refused, the previous one stays in use: {e}");
                Err(e)
            }
        }
    }

    /// Seconds until the certificate in use expires (negative once it has).
    pub fn seconds_left(&self) -> i64 {
        self.not_after.load(Relaxed) - unix_now()
    }

    /// Appends the TLS numbers to a Prometheus exposition.
    pub fn render_metrics(&self, text: &mut String) {
        let m = &self.metrics;
        let mut out = Exposition::new(text);
        out.family(
            "densepush_tls_handshakes_total",
            "TLS handshakes completed, by kind (resumed = from a session ticket).",
            MetricType::Counter,
            "kind",
            [
                ("full", m.handshakes_full.load(Relaxed)),
                ("resumed", m.handshakes_resumed.load(Relaxed)),
            ],
        );
        out.family(
            "densepush_tls_failures_total",
            "TLS connections ended by a failure, by reason (the alert sent, or what the peer did).",
            MetricType::Counter,
            "reason",
            session::FAILURE_LABELS
                .iter()
                .zip(&m.failures)
                .map(|(label, n)| (*label, n.load(Relaxed))),
        );
        out.gauge(
            "densepush_tls_sessions",
            "Established TLS connections.",
            m.sessions.load(Relaxed),
        );
        out.gauge(
            "densepush_tls_bytes",
            "Bytes held for TLS: per-connection keys, and buffers of handshakes and busy connections.",
            m.bytes.load(Relaxed),
        );
        out.gauge(
            "densepush_tls_certificate_expiry_seconds",
            "Seconds until the certificate in use expires (0 once it has).",
            self.seconds_left().max(0) as u64,
        );
        out.counter(
            "densepush_tls_certificate_reloads_total",
            "Certificate reloads (SIGHUP) that took effect.",
            m.reloads.load(Relaxed),
        );
        out.counter(
            "densepush_tls_certificate_reload_failures_total",
            "Certificate reloads refused; the previous certificate stays in use.",
            m.reload_failures.load(Relaxed),
        );
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reads and checks a certificate chain and its key: the key parses with the ring provider and matches the
/// leaf certificate's public key, and the leaf is within its validity period. Returns the pair and the leaf's
/// expiry (seconds since the epoch).
fn load_pair(cert_file: &Path, key_file: &Path) -> Result<(CertifiedKey, i64), TlsError> {
    let read = |key: &'static str, path: &Path| {
        std::fs::read(path).map_err(|error| TlsError::Read {
            key,
            path: path.to_owned(),
            error,
        })
    };
    let cert_invalid = |reason: String| TlsError::Invalid {
        key: "tls.cert_file",
        path: cert_file.to_owned(),
        reason,
    };
    let key_invalid = |reason: String| TlsError::Invalid {
        key: "tls.key_file",
        path: key_file.to_owned(),
        reason,
    };
    let cert_pem = read("tls.cert_file", cert_file)?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| cert_invalid(format!("not a PEM certificate chain: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_invalid("holds no CERTIFICATE block".into()));
    };
    let (not_before, not_after) = validity(leaf).map_err(cert_invalid)?;
    let now = unix_now();
    if now > not_after {
        return Err(cert_invalid(format!(
            "the certificate expired {} days ago",
            (now - not_after) / 86_400
        )));
    }
    if now < not_before {
        return Err(cert_invalid("the certificate is not valid yet".into()));
    }
    let key_pem = read("tls.key_file", key_file)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| key_invalid(format!("not a PEM private key: {e}")))?
        .ok_or_else(|| key_invalid("holds no PRIVATE KEY block".into()))?;
    let provider: CryptoProvider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => key_invalid(format!(
            "does not match the certificate in {}",
            cert_file.display()
        )),
        other => key_invalid(format!("unusable key: {other}")),
    })?;
    Ok((certified, not_after))
}

/// The leaf certificate's notBefore and notAfter, in seconds since the epoch.
fn validity(cert: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("the first certificate does not parse: {e}"))?;
    let validity = parsed.validity();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

#[cfg(test)]
pub mod testing {
    //! A throwaway certificate authority and server certificate for tests (rcgen), written to PEM files.

    use std::path::{Path, PathBuf};

    /// Paths of a test pair, and the CA certificate that signed it (PEM).
    pub struct TestPki {
        /// Server certificate chain file.
        pub cert_file: PathBuf,
        /// Server key file.
        pub key_file: PathBuf,
        /// The CA certificate, PEM.
        pub ca_pem: String,
    }

    /// Writes a P-256 CA and a server certificate for `localhost`/127.0.0.1 valid for `days` days (negative:
    /// already expired) into `dir`.
    pub fn write_pki(dir: &Path, days: i64) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "densepush test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        if days >= 0 {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(days);
        } else {
            params.not_before = now + time::Duration::days(days * 2);
            params.not_after = now + time::Duration::days(days);
        }
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let cert_file = dir.join("server.crt");
        let key_file = dir.join("server.key");
        std::fs::write(&cert_file, cert.pem() + &ca.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        TestPki {
            cert_file,
            key_file,
            ca_pem: ca.pem(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::write_pki;
    use super::*;

    fn config(pki: &testing::TestPki) -> TlsConfig {
        TlsConfig {
            listen: None,
            cert_file: pki.cert_file.clone(),
            key_file: pki.key_file.clone(),
        }
    }

    #[test]
    fn a_valid_pair_loads_and_reports_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_pki(dir.path(), 30);
        let tls = Tls::load(&config(&pki)).unwrap();
        let left = tls.seconds_left();
        assert!((29 * 86_400..=30 * 86_400).contains(&left), "{left}");
    }

    #[test]
    fn an_expired_certificate_is_refused_naming_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_pki(dir.path(), -2);
        let e = Tls::load(&config(&pki)).unwrap_err().to_string();
        assert!(e.starts_with("tls.cert_file"), "{e}");
        assert!(e.contains("server.crt") && e.contains("expired"), "{e}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let pki = write_pki(dir.path(), 30);
        let stranger = write_pki(other.path(), 30);
        let mismatched = TlsConfig {
            listen: None,
            cert_file: pki.cert_file.clone(),
            key_file: stranger.key_file.clone(),
        };
        let e = Tls::load(&mismatched).unwrap_err().to_string();
        assert!(
            e.starts_with("tls.key_file") && e.contains("does not match"),
            "{e}"
        );
    }

    #[test]
    fn missing_or_garbage_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_pki(dir.path(), 30);
        let missing = TlsConfig {
            listen: None,
            cert_file: dir.path().join("nope.crt"),
            key_file: pki.key_file.clone(),
        };
        assert!(Tls::load(&missing)
            .unwrap_err()
            .to_string()
            .starts_with("tls.cert_file"));
        std::fs::write(&pki.key_file, "not a key").unwrap();
        let e = Tls::load(&config(&pki)).unwrap_err().to_string();
        assert!(e.starts_with("tls.key_file"), "{e}");
    }

    #[test]
    fn a_bad_reload_keeps_the_pair_in_use_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_pki(dir.path(), 30);
        let tls = Tls::load(&config(&pki)).unwrap();
        let before = tls.resolver.current.read().unwrap().clone();
        std::fs::write(&pki.cert_file, "garbage").unwrap();
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&before, &tls.resolver.current.read().unwrap()));
        assert_eq!(tls.metrics.reload_failures.load(Relaxed), 1);
        // A renewed pair takes effect.
        write_pki(dir.path(), 90);
        tls.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &tls.resolver.current.read().unwrap()));
        assert!(tls.seconds_left() > 80 * 86_400);
        assert_eq!(tls.metrics.reloads.load(Relaxed), 1);
    }
}
