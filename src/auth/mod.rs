//! Who a connection is: turns the handshake's query string and `Authorization` value into an
//! [`Identity`], either by verifying a JWT (RFC 7519) or, in development mode, by trusting
//! `?user=&client=&channels=` as given.
//!
//! Tokens are verified with HS256 secrets from the config and with the public keys of an identity provider
//! (RS256/384/512, PS256/384/512, ES256/384, EdDSA), from a PEM file, a JWKS file or a JWKS URL. The key
//! decides the algorithm (`keys`), so no token chooses how it is checked.
//!
//! This file owns the public face ([`Authenticator`], [`Identity`], [`AuthError`]), finding the token in the
//! request, and building the key sets from the config. Its parts each own one job: `jws` (header and
//! signature), `keys` (which key, which algorithm), `pem_keys` and `jwk` (parsing keys), `jwks` (the refresher
//! thread), `claims` (time, issuer, audience, identity). It does not read the request (see
//! `proto::handshake`) nor decide what an identity may do beyond the channels it names. The `*_at` functions
//! take the time as an argument so every rule is testable; the plain ones read the system clock.

mod claims;
mod jwk;
mod jwks;
mod jws;
mod keys;
mod pem_keys;
#[cfg(test)]
mod testkeys;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::config::{AuthConfig, AuthMode};
use crate::metrics::KeyMetrics;
use crate::proto::http::{self, query_param};

pub use claims::ClaimRules;
pub use jwks::{FETCH_TIMEOUT as JWKS_FETCH_TIMEOUT, MAX_JWKS_BYTES};
pub use keys::{Key, KeyKind, KeySet, KeySource, MAX_KEYS_PER_SOURCE};

use claims::{identity_from_claims, identity_from_query};
use jwks::{JwksSettings, RemoteKeys};
use jws::Validations;

/// Largest key file read (`auth.jwt_public_key_file`, `auth.jwks_file`, `auth.jwks_ca_file`), in bytes.
pub const MAX_KEY_FILE_BYTES: u64 = 1 << 20;

/// The authenticated (or, in `None` mode, claimed) identity of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user (`sub` claim or `?user=`).
    pub user: String,
    /// Which client/device of the user, when given.
    pub client: Option<String>,
    /// Channels to subscribe, deduplicated, in first-seen order.
    pub channels: Vec<String>,
}

/// Why a connection could not be authenticated. Messages never contain the token or claim values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token (JWT mode) or no `user` (None mode).
    #[error("missing credentials")]
    Missing,
    /// Token in both `?token=` and `Authorization: Bearer` (RFC 6750 §2: at most one method).
    #[error("token given more than once")]
    Ambiguous,
    /// Not a JWS compact serialisation with JSON header and claims (RFC 7515 §7.1, RFC 7519 §7.2).
    #[error("malformed token")]
    Malformed,
    /// The header's `alg` is missing, `none`, unknown, or not accepted by the key the token names (or by
    /// any key, without `kid`); or the header has a `crit` we do not understand.
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    /// The header's `kid` names no key we have (a JWKS refresh is requested when one is configured).
    #[error("token key id not known")]
    UnknownKey,
    /// No key that may verify the token does.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` is in the past, beyond the leeway (RFC 7519 §4.1.4).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future, beyond the leeway (RFC 7519 §4.1.5).
    #[error("token not yet valid")]
    NotYetValid,
    /// The token has no `sub` claim.
    #[error("token has no subject")]
    MissingSub,
    /// A claim or query parameter has the wrong type or an invalid value; the text says which.
    #[error("{0}")]
    BadClaim(&'static str),
    /// Signing a token failed (only from [`issue_token`]).
    #[error("could not sign token")]
    Signing,
}

impl AuthError {
    /// One line for the 401 body. Never echoes the token.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing credentials",
            AuthError::Ambiguous => "token given more than once",
            AuthError::Malformed => "malformed token",
            AuthError::WrongAlgorithm => "token algorithm not accepted",
            AuthError::UnknownKey => "token key id not known",
            AuthError::BadSignature => "bad token signature",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
            AuthError::MissingSub => "token has no subject",
            AuthError::BadClaim(what) => what,
            AuthError::Signing => "could not sign token",
        }
    }

    /// Short stable snake_case label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AuthError::Missing => "auth_missing",
            AuthError::Ambiguous => "auth_ambiguous",
            AuthError::Malformed => "auth_malformed",
            AuthError::WrongAlgorithm => "auth_wrong_algorithm",
            AuthError::UnknownKey => "auth_unknown_key",
            AuthError::BadSignature => "auth_bad_signature",
            AuthError::Expired => "auth_expired",
            AuthError::NotYetValid => "auth_not_yet_valid",
            AuthError::MissingSub => "auth_missing_sub",
            AuthError::BadClaim(_) => "auth_bad_claim",
            AuthError::Signing => "auth_signing",
        }
    }
}

/// Why the key sets could not be built at start. Each message names the config key and, for a file, its
/// path; none carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A key file is unreadable or does not hold what its key needs.
    #[error("{key} {}: {why}", path.display())]
    File {
        /// The config key naming the file, e.g. `auth.jwks_file`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The JWKS refresher thread could not be started.
    #[error("starting the auth.jwks_url refresher thread: {0}")]
    Thread(std::io::Error),
}

/// Bounds on identity strings, applied in both modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthLimits {
    /// Longest user, client or channel name in bytes (e.g. 128).
    pub max_id_bytes: usize,
    /// Most distinct channels one connection may name (e.g. 32).
    pub max_channels: usize,
}

/// How connections are authenticated. Build it with [`Authenticator::from_config`], [`Authenticator::jwt`]
/// or [`Authenticator::none`].
pub enum Authenticator {
    /// JWTs verified with the configured keys.
    Jwt(Box<JwtVerifier>),
    /// No authentication: the query names the identity. For development and trusted networks only.
    None {
        /// Identity bounds.
        limits: AuthLimits,
    },
}

/// JWT mode's state: the keys, the claim rules and their numbers.
pub struct JwtVerifier {
    /// Keys from the config and its files, fixed at start.
    static_keys: KeySet,
    /// Keys from `auth.jwks_url`, replaced by the refresher.
    remote: Option<Arc<RemoteKeys>>,
    validations: Validations,
    rules: ClaimRules,
    limits: AuthLimits,
    metrics: Arc<KeyMetrics>,
}

impl std::fmt::Debug for Authenticator {
    // Hand-written so no key material reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::Jwt(v) => f
                .debug_struct("Jwt")
                .field("static_keys", &v.static_keys)
                .field("remote", &v.remote)
                .field("rules", &v.rules)
                .field("limits", &v.limits)
                .finish_non_exhaustive(),
            Authenticator::None { limits } => {
                f.debug_struct("None").field("limits", limits).finish()
            }
        }
    }
}

impl Authenticator {
    /// JWT mode with one HS256 shared secret and `leeway_secs` of tolerated clock skew.
    pub fn jwt(secret: &[u8], leeway_secs: u64, limits: AuthLimits) -> Self {
        let rules = ClaimRules {
            leeway_secs,
            ..ClaimRules::default()
        };
        Self::with_keys(KeySet::new(vec![Key::hmac(None, secret)]), rules, limits)
    }

    /// JWT mode with these keys (no JWKS URL).
    pub fn with_keys(keys: KeySet, rules: ClaimRules, limits: AuthLimits) -> Self {
        let metrics = Arc::new(KeyMetrics::new(None));
        count_keys(&metrics, &keys);
        Authenticator::Jwt(Box::new(JwtVerifier {
            static_keys: keys,
            remote: None,
            validations: Validations::new(),
            rules,
            limits,
            metrics,
        }))
    }

    /// No authentication: `?user=U&client=C&channels=a,b` is taken at its word.
    pub fn none(limits: AuthLimits) -> Self {
        Authenticator::None { limits }
    }

    /// The authenticator the config describes: in JWT mode, reads the key files (see [`load_static_keys`])
    /// and starts the `auth.jwks_url` refresher, waiting for its first fetch (at most
    /// [`JWKS_FETCH_TIMEOUT`] and a second; the server starts without those keys if it fails).
    pub fn from_config(config: &AuthConfig) -> Result<Self, SetupError> {
        let limits = AuthLimits {
            max_id_bytes: config.max_id_bytes,
            max_channels: config.max_channels,
        };
        if config.mode == AuthMode::None {
            return Ok(Authenticator::none(limits));
        }
        let static_keys = load_static_keys(config)?;
        let metrics = Arc::new(KeyMetrics::new(
            config.jwks_url.as_ref().map(|_| unix_now_ms()),
        ));
        count_keys(&metrics, &static_keys);
        let remote = match &config.jwks_url {
            None => None,
            Some(url) => Some(jwks::start(
                JwksSettings {
                    url: url.clone(),
                    refresh: Duration::from_secs(config.jwks_refresh_secs),
                    min_gap: Duration::from_secs(config.jwks_min_refresh_secs),
                    ca_file: config.jwks_ca_file.clone(),
                },
                metrics.clone(),
            )?),
        };
        Ok(Authenticator::Jwt(Box::new(JwtVerifier {
            static_keys,
            remote,
            validations: Validations::new(),
            rules: ClaimRules {
                leeway_secs: config.leeway_secs,
                issuer: config.issuer.clone(),
                audience: config.audience.clone(),
            },
            limits,
            metrics,
        })))
    }

    /// The key numbers for `/metrics` (JWT mode only).
    pub fn key_metrics(&self) -> Option<Arc<KeyMetrics>> {
        match self {
            Authenticator::Jwt(v) => Some(v.metrics.clone()),
            Authenticator::None { .. } => None,
        }
    }

    /// [`Self::authenticate_at`] with the system clock.
    pub fn authenticate(
        &self,
        query: &str,
        authorization: Option<&str>,
    ) -> Result<Identity, AuthError> {
        self.authenticate_at(query, authorization, unix_now_secs())
    }

    /// Identity of a connection from the raw query string and `Authorization` value, at time
    /// `now_unix_secs`.
    ///
    /// JWT mode: the token comes from `?token=` or `Authorization: Bearer <t>`; the query's
    /// user/client/channels parameters are ignored (the `channels` claim is the only way to subscribe).
    /// None mode: `?user=U&client=C&channels=a,b`; `Authorization` is ignored.
    pub fn authenticate_at(
        &self,
        query: &str,
        authorization: Option<&str>,
        now_unix_secs: u64,
    ) -> Result<Identity, AuthError> {
        match self {
            Authenticator::Jwt(v) => {
                let token = find_token(query, authorization)?;
                v.verify(&token, now_unix_secs)
            }
            Authenticator::None { limits } => identity_from_query(query, limits),
        }
    }
}

impl JwtVerifier {
    /// Header, then signature (with the keys the header may use), then claims.
    fn verify(&self, token: &str, now_unix_secs: u64) -> Result<Identity, AuthError> {
        let header = jws::parse_header(token)?;
        // A lock-free load; the guard lives only as long as this verification.
        let remote = self.remote.as_ref().map(|r| r.load());
        let verified = match &remote {
            Some(remote_keys) => jws::verify(
                token,
                &header,
                &[&self.static_keys, remote_keys],
                &self.validations,
            ),
            None => jws::verify(token, &header, &[&self.static_keys], &self.validations),
        };
        if verified.key_missing {
            if let Some(remote) = &self.remote {
                remote.request_refresh();
            }
        }
        let claims = verified.claims?;
        self.rules.check(&claims, now_unix_secs)?;
        identity_from_claims(claims, &self.limits)
    }
}

/// The keys fixed at start: the HS256 secrets (`auth.jwt_secret` or `auth.jwt_secret_env`, then
/// `auth.jwt_secrets`), `auth.jwt_public_key_file` and `auth.jwks_file`. Also what `densepush check-config`
/// loads, so a bad file is found before a deploy.
pub fn load_static_keys(config: &AuthConfig) -> Result<KeySet, SetupError> {
    let mut keys = KeySet::default();
    if !config.secret.is_empty() {
        keys.extend([Key::hmac(None, &config.secret)]);
    }
    keys.extend(
        config
            .secrets
            .iter()
            .map(|s| Key::hmac(s.kid.clone(), &s.secret)),
    );
    if let Some(path) = &config.public_key_file {
        let key = "auth.jwt_public_key_file";
        let bytes = read_key_file(key, path)?;
        let parsed = pem_keys::parse_pem_keys(&bytes).map_err(|e| SetupError::File {
            key,
            path: path.clone(),
            why: e.to_string(),
        })?;
        keys.extend(parsed);
    }
    if let Some(path) = &config.jwks_file {
        let key = "auth.jwks_file";
        let bytes = read_key_file(key, path)?;
        let parsed =
            jwk::parse_jwks(&bytes, KeySource::JwksFile).map_err(|e| SetupError::File {
                key,
                path: path.clone(),
                why: e.to_string(),
            })?;
        for skipped in &parsed.skipped {
            log::warn!("{key} {}: skipped {skipped}", path.display());
        }
        keys.extend(parsed.keys);
    }
    Ok(keys)
}

fn read_key_file(key: &'static str, path: &Path) -> Result<Vec<u8>, SetupError> {
    read_bounded(path).map_err(|e| SetupError::File {
        key,
        path: path.to_owned(),
        why: e.to_string(),
    })
}

/// A file's bytes, at most [`MAX_KEY_FILE_BYTES`] (a key file is never large; a wrong path such as a device
/// must not be read forever).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "is larger than {MAX_KEY_FILE_BYTES} bytes"
        )));
    }
    Ok(bytes)
}

fn count_keys(metrics: &KeyMetrics, keys: &KeySet) {
    use std::sync::atomic::Ordering::Relaxed;
    for source in [
        KeySource::Secret,
        KeySource::PublicKeyFile,
        KeySource::JwksFile,
    ] {
        metrics.keys[source as usize].store(keys.count(source) as u64, Relaxed);
    }
}

/// The token from exactly one of `?token=` and `Authorization: Bearer` (RFC 6750 §2.1, §2.3).
/// An `Authorization` value with another scheme is not ours and is ignored.
fn find_token<'a>(
    query: &'a str,
    authorization: Option<&'a str>,
) -> Result<std::borrow::Cow<'a, str>, AuthError> {
    let from_query = query_param(query, "token");
    // `Bearer <token>`: scheme case-insensitive (RFC 9110 §11.1), one or more spaces (RFC 6750 §2.1).
    let from_header = authorization.and_then(|value| http::credentials(value, "bearer"));
    match (from_query, from_header) {
        // RFC 6750 §2: clients must not use more than one method in a request.
        (Some(_), Some(_)) => Err(AuthError::Ambiguous),
        (Some(t), None) => non_empty(t),
        (None, Some(t)) => non_empty(std::borrow::Cow::Borrowed(t)),
        (None, None) => Err(AuthError::Missing),
    }
}

fn non_empty(t: std::borrow::Cow<'_, str>) -> Result<std::borrow::Cow<'_, str>, AuthError> {
    if t.is_empty() {
        Err(AuthError::Missing)
    } else {
        Ok(t)
    }
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    channels: &'a [String],
    iat: u64,
    exp: u64,
}

/// [`issue_token_at`] with the system clock.
pub fn issue_token(
    secret: &[u8],
    user: &str,
    client: Option<&str>,
    channels: &[String],
    ttl_secs: u64,
) -> Result<String, AuthError> {
    issue_token_at(secret, user, client, channels, ttl_secs, unix_now_secs())
}

/// Signs an HS256 token with `sub`, `client` (if any), `channels` (if non-empty), `iat` and
/// `exp = now_unix_secs + ttl_secs`. An empty `user` is refused: such a token would never verify.
pub fn issue_token_at(
    secret: &[u8],
    user: &str,
    client: Option<&str>,
    channels: &[String],
    ttl_secs: u64,
    now_unix_secs: u64,
) -> Result<String, AuthError> {
    if user.is_empty() {
        return Err(AuthError::MissingSub);
    }
    let claims = IssuedClaims {
        sub: user,
        client,
        channels,
        iat: now_unix_secs,
        exp: now_unix_secs.saturating_add(ttl_secs),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|_| AuthError::Signing)
}

/// Seconds since the Unix epoch; 0 if the clock is set before it.
fn unix_now_secs() -> u64 {
    unix_now_ms() / 1000
}

/// Milliseconds since the Unix epoch; 0 if the clock is set before it.
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use serde_json::Value;

    const SECRET: &[u8] = b"test-secret-please-ignore";
    const NOW: u64 = 1_700_000_000;
    const LIMITS: AuthLimits = AuthLimits {
        max_id_bytes: 16,
        max_channels: 3,
    };

    fn jwt() -> Authenticator {
        Authenticator::jwt(SECRET, 30, LIMITS)
    }

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    /// A token with any header and claims, HMAC-SHA256-signed with `secret` whatever the header says.
    fn hand_signed(header: &str, claims: &str, secret: &[u8]) -> String {
        let message = format!("{}.{}", b64(header), b64(claims));
        let key = EncodingKey::from_secret(secret);
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{message}.{sig}")
    }

    fn token_with_claims(claims: &str) -> String {
        hand_signed(r#"{"alg":"HS256","typ":"JWT"}"#, claims, SECRET)
    }

    fn auth_query(token: &str) -> Result<Identity, AuthError> {
        jwt().authenticate_at(&format!("token={token}"), None, NOW)
    }

    #[test]
    fn valid_token_with_all_claims() {
        let channels = vec!["news".to_string(), "sport".to_string(), "news".to_string()];
        let token = issue_token_at(SECRET, "alice", Some("phone"), &channels, 60, NOW).unwrap();
        let id = auth_query(&token).unwrap();
        assert_eq!(
            id,
            Identity {
                user: "alice".into(),
                client: Some("phone".into()),
                channels: vec!["news".into(), "sport".into()],
            }
        );
    }

    #[test]
    fn issued_token_without_client_or_channels_omits_them() {
        let token = issue_token_at(SECRET, "bob", None, &[], 60, NOW).unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"sub": "bob", "iat": NOW, "exp": NOW + 60})
        );
        let id = auth_query(&token).unwrap();
        assert_eq!((id.client, id.channels.len()), (None, 0));
    }

    #[test]
    fn token_from_bearer_header() {
        let token = issue_token_at(SECRET, "alice", None, &[], 60, NOW).unwrap();
        let id = jwt()
            .authenticate_at("", Some(&format!("bearer  {token}")), NOW)
            .unwrap();
        assert_eq!(id.user, "alice");
    }

    #[test]
    fn non_bearer_authorization_is_ignored() {
        assert_eq!(
            jwt().authenticate_at("", Some("Basic YTpi"), NOW),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn token_in_query_and_header_is_ambiguous() {
        let token = issue_token_at(SECRET, "alice", None, &[], 60, NOW).unwrap();
        let result = jwt().authenticate_at(
            &format!("token={token}"),
            Some(&format!("Bearer {token}")),
            NOW,
        );
        assert_eq!(result, Err(AuthError::Ambiguous));
    }

    #[test]
    fn no_token_is_missing() {
        assert_eq!(
            jwt().authenticate_at("user=alice", None, NOW),
            Err(AuthError::Missing)
        );
        assert_eq!(
            jwt().authenticate_at("token=", None, NOW),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn expired_token_is_refused() {
        let token = issue_token_at(SECRET, "alice", None, &[], 60, NOW - 1000).unwrap();
        assert_eq!(auth_query(&token), Err(AuthError::Expired));
    }

    #[test]
    fn expired_within_leeway_is_accepted() {
        // exp = NOW - 10, leeway 30.
        let token = issue_token_at(SECRET, "alice", None, &[], 50, NOW - 60).unwrap();
        assert!(auth_query(&token).is_ok());
    }

    #[test]
    fn expiry_boundary_is_exclusive() {
        // exp + leeway == now: RFC 7519 §4.1.4 requires now to be before exp.
        let token = token_with_claims(&format!(r#"{{"sub":"a","exp":{}}}"#, NOW - 30));
        assert_eq!(auth_query(&token), Err(AuthError::Expired));
        let token = token_with_claims(&format!(r#"{{"sub":"a","exp":{}}}"#, NOW - 29));
        assert!(auth_query(&token).is_ok());
    }

    #[test]
    fn nbf_in_future_is_refused() {
        let token = token_with_claims(&format!(r#"{{"sub":"a","nbf":{}}}"#, NOW + 31));
        assert_eq!(auth_query(&token), Err(AuthError::NotYetValid));
    }

    #[test]
    fn nbf_within_leeway_is_accepted() {
        let token = token_with_claims(&format!(r#"{{"sub":"a","nbf":{}}}"#, NOW + 30));
        assert!(auth_query(&token).is_ok());
    }

    #[test]
    fn fractional_exp_is_honoured() {
        let token = token_with_claims(&format!(r#"{{"sub":"a","exp":{}.5}}"#, NOW - 31));
        assert_eq!(auth_query(&token), Err(AuthError::Expired));
    }

    #[test]
    fn string_exp_is_bad_claim() {
        let token = token_with_claims(r#"{"sub":"a","exp":"tomorrow"}"#);
        assert_eq!(
            auth_query(&token),
            Err(AuthError::BadClaim("exp claim must be a number"))
        );
    }

    #[test]
    fn token_without_exp_is_accepted() {
        let token = token_with_claims(r#"{"sub":"a"}"#);
        assert_eq!(auth_query(&token).unwrap().user, "a");
    }

    #[test]
    fn hs512_with_same_secret_is_wrong_algorithm() {
        let claims = IssuedClaims {
            sub: "alice",
            client: None,
            channels: &[],
            iat: NOW,
            exp: NOW + 60,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(auth_query(&token), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn alg_none_token_is_wrong_algorithm() {
        let token = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(r#"{"sub":"a"}"#)
        );
        assert_eq!(auth_query(&token), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn rs256_header_is_wrong_algorithm_even_with_hmac_signature() {
        let token = hand_signed(r#"{"alg":"RS256","typ":"JWT"}"#, r#"{"sub":"a"}"#, SECRET);
        assert_eq!(auth_query(&token), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn es256_and_hs384_headers_are_wrong_algorithm() {
        for alg in ["ES256", "HS384", "hs256"] {
            let token = hand_signed(&format!(r#"{{"alg":"{alg}"}}"#), r#"{"sub":"a"}"#, SECRET);
            assert_eq!(auth_query(&token), Err(AuthError::WrongAlgorithm), "{alg}");
        }
    }

    #[test]
    fn missing_alg_is_wrong_algorithm() {
        let token = hand_signed(r#"{"typ":"JWT"}"#, r#"{"sub":"a"}"#, SECRET);
        assert_eq!(auth_query(&token), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn crit_header_is_refused() {
        let token = hand_signed(
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            r#"{"sub":"a"}"#,
            SECRET,
        );
        assert_eq!(auth_query(&token), Err(AuthError::WrongAlgorithm));
    }

    #[test]
    fn hand_signed_hs256_token_verifies() {
        // Guards the helper the wrong-algorithm tests rely on: with HS256 it must produce a good token.
        let token = hand_signed(r#"{"alg":"HS256"}"#, r#"{"sub":"a"}"#, SECRET);
        assert_eq!(auth_query(&token).unwrap().user, "a");
    }

    #[test]
    fn other_secret_is_bad_signature() {
        let token = issue_token_at(b"another-secret", "alice", None, &[], 60, NOW).unwrap();
        assert_eq!(auth_query(&token), Err(AuthError::BadSignature));
    }

    #[test]
    fn tampered_claims_are_bad_signature() {
        let token = issue_token_at(SECRET, "alice", None, &[], 60, NOW).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged = b64(&format!(r#"{{"sub":"admin","exp":{}}}"#, NOW + 60));
        let token = format!("{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(auth_query(&token), Err(AuthError::BadSignature));
    }

    #[test]
    fn garbage_tokens_are_malformed() {
        for t in [
            "abc",
            "a.b",
            "a.b.c.d",
            "!!!.b.c",
            &format!("{}.x.y", b64("[1]")),
        ] {
            assert_eq!(auth_query(t), Err(AuthError::Malformed), "{t}");
        }
    }

    #[test]
    fn missing_sub_is_refused() {
        let token = token_with_claims(&format!(r#"{{"exp":{}}}"#, NOW + 60));
        assert_eq!(auth_query(&token), Err(AuthError::MissingSub));
    }

    #[test]
    fn non_string_sub_is_bad_claim() {
        let token = token_with_claims(r#"{"sub":42}"#);
        assert_eq!(
            auth_query(&token),
            Err(AuthError::BadClaim("sub claim must be a string"))
        );
    }

    #[test]
    fn empty_sub_is_bad_claim() {
        let token = token_with_claims(r#"{"sub":""}"#);
        assert_eq!(
            auth_query(&token),
            Err(AuthError::BadClaim("invalid sub claim"))
        );
    }

    #[test]
    fn sub_with_control_char_is_bad_claim() {
        let token = token_with_claims(r#"{"sub":"a\nb"}"#);
        assert_eq!(
            auth_query(&token),
            Err(AuthError::BadClaim("invalid sub claim"))
        );
    }

    #[test]
    fn over_long_sub_is_bad_claim() {
        let token = token_with_claims(r#"{"sub":"seventeen-bytes!!"}"#);
        assert_eq!(
            auth_query(&token),
            Err(AuthError::BadClaim("invalid sub claim"))
        );
    }

    #[test]
    fn non_array_channels_is_bad_claim() {
        let token = token_with_claims(r#"{"sub":"a","channels":"news"}"#);
        assert_eq!(
            auth_query(&token),
            Err(AuthError::BadClaim("channels claim must be an array"))
        );
    }

    #[test]
    fn too_many_distinct_channels_is_bad_claim() {
        let token = token_with_claims(r#"{"sub":"a","channels":["1","2","3","4"]}"#);
        assert_eq!(
            auth_query(&token),
            Err(AuthError::BadClaim("too many channels"))
        );
    }

    #[test]
    fn duplicate_channels_do_not_count_against_limit() {
        let token = token_with_claims(r#"{"sub":"a","channels":["1","2","1","3","2"]}"#);
        assert_eq!(auth_query(&token).unwrap().channels, ["1", "2", "3"]);
    }

    #[test]
    fn non_string_client_is_bad_claim() {
        let token = token_with_claims(r#"{"sub":"a","client":7}"#);
        assert_eq!(
            auth_query(&token),
            Err(AuthError::BadClaim("client claim must be a string"))
        );
    }

    #[test]
    fn token_with_audience_is_refused() {
        let token = token_with_claims(r#"{"sub":"a","aud":"other-service"}"#);
        assert_eq!(
            auth_query(&token),
            Err(AuthError::BadClaim("token audience not accepted"))
        );
    }

    #[test]
    fn duplicate_claim_key_is_malformed() {
        let token = token_with_claims(r#"{"sub":"a","sub":"b"}"#);
        assert_eq!(auth_query(&token), Err(AuthError::Malformed));
    }

    #[test]
    fn jwt_mode_ignores_query_identity_params() {
        let token = issue_token_at(SECRET, "alice", None, &[], 60, NOW).unwrap();
        let query = format!("user=mallory&client=x&channels=admin&token={token}");
        let id = jwt().authenticate_at(&query, None, NOW).unwrap();
        assert_eq!(
            id,
            Identity {
                user: "alice".into(),
                client: None,
                channels: vec![]
            }
        );
    }

    #[test]
    fn authenticate_uses_the_system_clock() {
        let token = issue_token(SECRET, "alice", None, &[], 600).unwrap();
        assert_eq!(
            jwt()
                .authenticate(&format!("token={token}"), None)
                .unwrap()
                .user,
            "alice"
        );
        let stale = issue_token_at(SECRET, "alice", None, &[], 60, NOW).unwrap();
        assert_eq!(
            jwt().authenticate(&format!("token={stale}"), None),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn issue_token_refuses_empty_user() {
        assert_eq!(
            issue_token_at(SECRET, "", None, &[], 60, NOW),
            Err(AuthError::MissingSub)
        );
    }

    #[test]
    fn none_mode_parses_percent_encoded_query() {
        let auth = Authenticator::none(LIMITS);
        let id = auth
            .authenticate_at(
                "user=J%C3%B6rg+M&client=web%2F1&channels=a%2Cb,,c,a",
                None,
                NOW,
            )
            .unwrap();
        assert_eq!(
            id,
            Identity {
                user: "Jörg M".into(),
                client: Some("web/1".into()),
                channels: vec!["a".into(), "b".into(), "c".into()],
            }
        );
    }

    #[test]
    fn none_mode_without_user_is_missing() {
        let auth = Authenticator::none(LIMITS);
        assert_eq!(
            auth.authenticate_at("channels=a", None, NOW),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn none_mode_ignores_authorization() {
        let auth = Authenticator::none(LIMITS);
        let id = auth
            .authenticate_at("user=u", Some("Bearer x.y.z"), NOW)
            .unwrap();
        assert_eq!(
            id,
            Identity {
                user: "u".into(),
                client: None,
                channels: vec![]
            }
        );
    }

    #[test]
    fn none_mode_rejects_control_chars_and_long_names() {
        let auth = Authenticator::none(LIMITS);
        assert_eq!(
            auth.authenticate_at("user=a%00b", None, NOW),
            Err(AuthError::BadClaim("invalid user"))
        );
        assert_eq!(
            auth.authenticate_at("user=u&channels=aaaaaaaaaaaaaaaaa", None, NOW),
            Err(AuthError::BadClaim("invalid channel name"))
        );
        assert_eq!(
            auth.authenticate_at("user=u&client=", None, NOW),
            Err(AuthError::BadClaim("invalid client"))
        );
    }

    #[test]
    fn none_mode_limits_channel_count() {
        let auth = Authenticator::none(LIMITS);
        assert_eq!(
            auth.authenticate_at("user=u&channels=a,b,c,d", None, NOW),
            Err(AuthError::BadClaim("too many channels"))
        );
    }

    #[test]
    fn reasons_never_echo_the_token() {
        let token = token_with_claims(r#"{"sub":42}"#);
        let err = auth_query(&token).unwrap_err();
        assert!(!err.reason().contains(&token[..10]));
        assert!(!err.to_string().contains(&token[..10]));
        assert!(!err.reason().contains('\n'));
    }

    #[test]
    fn debug_does_not_print_the_secret() {
        let printed = format!("{:?}", jwt());
        assert!(!printed.contains("test-secret"));
        assert!(printed.contains("leeway_secs"));
    }

    // ---- keys from the config ------------------------------------------------------------------------

    const SECRET_A: &[u8] = b"rotation-secret-a-that-is-long-enough-0000";
    const SECRET_B: &[u8] = b"rotation-secret-b-that-is-long-enough-1111";
    const PRIMARY: &[u8] = b"primary-secret-that-is-long-enough-for-hs256";

    fn config(text: &str) -> AuthConfig {
        crate::config::Config::from_toml_str(text, &[])
            .unwrap()
            .auth
    }

    #[test]
    fn hs256_secrets_rotate_by_kid() {
        let auth = Authenticator::from_config(&config(&format!(
            "[auth]\njwt_secret = \"{}\"\njwt_secrets = [{{ kid = \"a\", secret = \"{}\" }}, {{ kid = \"b\", secret = \"{}\" }}]",
            std::str::from_utf8(PRIMARY).unwrap(),
            std::str::from_utf8(SECRET_A).unwrap(),
            std::str::from_utf8(SECRET_B).unwrap(),
        )))
        .unwrap();
        let check = |header: &str, secret: &[u8]| {
            auth.authenticate_at(
                &format!("token={}", hand_signed(header, r#"{"sub":"u"}"#, secret)),
                None,
                NOW,
            )
        };
        assert!(check(r#"{"alg":"HS256","kid":"b"}"#, SECRET_B).is_ok());
        assert!(check(r#"{"alg":"HS256","kid":"a"}"#, SECRET_A).is_ok());
        // A kid selects its secret only: the other rotation secret does not verify under it.
        assert_eq!(
            check(r#"{"alg":"HS256","kid":"b"}"#, SECRET_A),
            Err(AuthError::BadSignature)
        );
        // Without kid, or with a kid no key has, the secrets without kid are tried (here the primary one).
        assert!(check(r#"{"alg":"HS256"}"#, PRIMARY).is_ok());
        assert!(check(r#"{"alg":"HS256","kid":"other"}"#, PRIMARY).is_ok());
        assert_eq!(
            check(r#"{"alg":"HS256","kid":"other"}"#, SECRET_A),
            Err(AuthError::UnknownKey)
        );
    }

    #[test]
    fn secrets_without_kid_are_all_tried() {
        let keys = KeySet::new(vec![Key::hmac(None, SECRET_A), Key::hmac(None, SECRET_B)]);
        let auth = Authenticator::with_keys(keys, ClaimRules::default(), LIMITS);
        let token = issue_token_at(SECRET_B, "u", None, &[], 60, NOW).unwrap();
        assert_eq!(
            auth.authenticate_at(&format!("token={token}"), None, NOW)
                .unwrap()
                .user,
            "u"
        );
    }

    #[test]
    fn public_key_and_jwks_files_are_loaded_and_used() {
        let dir = tempfile::tempdir().unwrap();
        let pem_path = dir.path().join("idp.pem");
        std::fs::write(&pem_path, testkeys::ED25519_PUBLIC).unwrap();
        let jwks_path = dir.path().join("jwks.json");
        let jwk = testkeys::P256_JWK.replacen('{', r#"{"kid":"p","#, 1);
        std::fs::write(&jwks_path, format!(r#"{{"keys":[{jwk}]}}"#)).unwrap();
        let auth = Authenticator::from_config(&config(&format!(
            "[auth]\njwt_secret = \"\"\njwt_public_key_file = {:?}\njwks_file = {:?}",
            pem_path.display().to_string(),
            jwks_path.display().to_string()
        )))
        .unwrap();
        let sign = |alg: Algorithm, header: &str, private: &str| {
            let key = match alg {
                Algorithm::EdDSA => EncodingKey::from_ed_pem(private.as_bytes()).unwrap(),
                _ => EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
            };
            let message = format!("{}.{}", b64(header), b64(r#"{"sub":"idp-user"}"#));
            let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg).unwrap();
            format!("token={message}.{sig}")
        };
        let ed = sign(
            Algorithm::EdDSA,
            r#"{"alg":"EdDSA"}"#,
            testkeys::ED25519_PRIVATE,
        );
        assert_eq!(
            auth.authenticate_at(&ed, None, NOW).unwrap().user,
            "idp-user"
        );
        let es = sign(
            Algorithm::ES256,
            r#"{"alg":"ES256","kid":"p"}"#,
            testkeys::P256_PRIVATE,
        );
        assert_eq!(
            auth.authenticate_at(&es, None, NOW).unwrap().user,
            "idp-user"
        );
        // HS256 is off: jwt_secret is empty, so no key accepts it.
        let hs = issue_token_at(SECRET, "u", None, &[], 60, NOW).unwrap();
        assert_eq!(
            auth.authenticate_at(&format!("token={hs}"), None, NOW),
            Err(AuthError::WrongAlgorithm)
        );
        let metrics = auth.key_metrics().unwrap();
        let count =
            |s: KeySource| metrics.keys[s as usize].load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            (
                count(KeySource::Secret),
                count(KeySource::PublicKeyFile),
                count(KeySource::JwksFile)
            ),
            (0, 1, 1)
        );
    }

    #[test]
    fn bad_key_files_are_errors_naming_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private.pem");
        std::fs::write(&private, testkeys::RSA_PRIVATE).unwrap();
        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, "{\"keys\": 5}").unwrap();
        let missing = dir.path().join("missing.json");
        let cases = [
            ("jwt_public_key_file", &private, "is a private key"),
            ("jwks_file", &garbage, "is not a JWK Set"),
            ("jwks_file", &missing, "No such file"),
        ];
        for (key, path, why) in cases {
            let err = load_static_keys(&config(&format!(
                "[auth]\n{key} = {:?}",
                path.display().to_string()
            )))
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with(&format!("auth.{key} {}: ", path.display())),
                "{err}"
            );
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn issuer_and_audience_from_the_config_are_enforced() {
        let auth = Authenticator::from_config(&config(&format!(
            "[auth]\njwt_secret = \"{}\"\nissuer = \"https://idp/\"\naudience = \"push\"",
            std::str::from_utf8(PRIMARY).unwrap()
        )))
        .unwrap();
        let check = |claims: &str| {
            let token = hand_signed(r#"{"alg":"HS256"}"#, claims, PRIMARY);
            auth.authenticate_at(&format!("token={token}"), None, NOW)
        };
        assert!(check(r#"{"sub":"a","iss":"https://idp/","aud":["x","push"]}"#).is_ok());
        assert_eq!(
            check(r#"{"sub":"a","iss":"https://evil/","aud":"push"}"#),
            Err(AuthError::BadClaim("token issuer not accepted"))
        );
        assert_eq!(
            check(r#"{"sub":"a","iss":"https://idp/"}"#),
            Err(AuthError::BadClaim("token audience not accepted"))
        );
    }

    #[test]
    fn none_mode_from_the_config_has_no_key_metrics() {
        let auth = Authenticator::from_config(&config("[auth]\nmode = \"none\"")).unwrap();
        assert!(auth.key_metrics().is_none());
        assert!(auth.authenticate_at("user=u", None, NOW).is_ok());
    }
}
