//! Who a connection is: turns the handshake's query string and `Authorization` value into an
//! [`Identity`], either by verifying an HS256 JWT (RFC 7519) or, in development mode, by trusting
//! `?user=&client=&channels=` as given.
//!
//! It owns token verification and identity validation; it does not read the request (see `proto::handshake`)
//! nor decide what an identity may do beyond the channels it names. The `*_at` functions take the time
//! as an argument so every rule is testable; the plain ones read the system clock for convenience.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::proto::http::{self, query_param};

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
    /// The header's `alg` is missing or not HS256, or the header has a `crit` we do not understand.
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    /// The HMAC does not verify.
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
            AuthError::BadSignature => "auth_bad_signature",
            AuthError::Expired => "auth_expired",
            AuthError::NotYetValid => "auth_not_yet_valid",
            AuthError::MissingSub => "auth_missing_sub",
            AuthError::BadClaim(_) => "auth_bad_claim",
            AuthError::Signing => "auth_signing",
        }
    }
}

/// Bounds on identity strings, applied in both modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthLimits {
    /// Longest user, client or channel name in bytes (e.g. 128).
    pub max_id_bytes: usize,
    /// Most distinct channels one connection may name (e.g. 32).
    pub max_channels: usize,
}

/// How connections are authenticated. Build it with [`Authenticator::jwt`] or [`Authenticator::none`].
// One instance per server, so the size gap between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Authenticator {
    /// HS256 JWTs signed with a shared secret.
    Jwt {
        /// Verification key from the shared secret.
        key: DecodingKey,
        /// jsonwebtoken settings: HS256 only; time claims are checked here, with an injected clock.
        validation: Validation,
        /// Clock skew tolerated on `exp` and `nbf`, in seconds.
        leeway_secs: u64,
        /// Identity bounds.
        limits: AuthLimits,
    },
    /// No authentication: the query names the identity. For development and trusted networks only.
    None {
        /// Identity bounds.
        limits: AuthLimits,
    },
}

impl std::fmt::Debug for Authenticator {
    // Hand-written so the secret never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::Jwt {
                leeway_secs,
                limits,
                ..
            } => f
                .debug_struct("Jwt")
                .field("leeway_secs", leeway_secs)
                .field("limits", limits)
                .finish_non_exhaustive(),
            Authenticator::None { limits } => {
                f.debug_struct("None").field("limits", limits).finish()
            }
        }
    }
}

impl Authenticator {
    /// JWT mode with an HS256 shared secret and `leeway_secs` of tolerated clock skew.
    pub fn jwt(secret: &[u8], leeway_secs: u64, limits: AuthLimits) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // exp/nbf are checked in `check_times` against the caller's clock, so the library must not
        // read the system clock or require exp (tokens without exp are accepted by design).
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        // Kept on: with no audience configured, a token carrying `aud` is refused, as RFC 7519 §4.1.3
        // requires of a recipient that does not identify itself with the audience.
        validation.validate_aud = true;
        Authenticator::Jwt {
            key: DecodingKey::from_secret(secret),
            validation,
            leeway_secs,
            limits,
        }
    }

    /// No authentication: `?user=U&client=C&channels=a,b` is taken at its word.
    pub fn none(limits: AuthLimits) -> Self {
        Authenticator::None { limits }
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
            Authenticator::Jwt {
                key,
                validation,
                leeway_secs,
                limits,
            } => {
                let token = find_token(query, authorization)?;
                let claims = verify_token(&token, key, validation)?;
                check_times(&claims, now_unix_secs, *leeway_secs)?;
                identity_from_claims(claims, limits)
            }
            Authenticator::None { limits } => identity_from_query(query, limits),
        }
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

/// Claims as sent, kept untyped so each bad claim gets its own error after the signature verifies.
/// serde refuses duplicate keys, so a claim cannot be given twice with different values.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<Value>,
    client: Option<Value>,
    channels: Option<Value>,
    exp: Option<Value>,
    nbf: Option<Value>,
}

/// Header check, then signature check, then claims parse.
fn verify_token(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<RawClaims, AuthError> {
    check_header(token)?;
    match jsonwebtoken::decode::<RawClaims>(token, key, validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthError::WrongAlgorithm,
            ErrorKind::InvalidAudience => AuthError::BadClaim("token audience not accepted"),
            _ => AuthError::Malformed,
        }),
    }
}

/// Refuses any `alg` but HS256 before the signature is looked at, so `none`, other HMAC sizes and
/// public-key algorithms can never reach verification (RFC 8725 §3.1, §2.1; RFC 7518 §3.1).
fn check_header(token: &str) -> Result<(), AuthError> {
    // JWS compact serialisation: exactly three base64url parts (RFC 7515 §7.1).
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(AuthError::Malformed);
    };
    // Case-sensitive, as every JOSE value (RFC 7515 §4.1.1).
    if fields.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(AuthError::WrongAlgorithm);
    }
    // RFC 7515 §4.1.11: extensions listed in `crit` must be understood; we understand none.
    if fields.contains_key("crit") {
        return Err(AuthError::WrongAlgorithm);
    }
    Ok(())
}

/// `exp` and `nbf`, each optional, with `leeway_secs` of skew allowed on both.
fn check_times(claims: &RawClaims, now: u64, leeway_secs: u64) -> Result<(), AuthError> {
    // NumericDate may be non-integer (RFC 7519 §2); f64 is exact for any plausible timestamp.
    let now = now as f64;
    let leeway = leeway_secs as f64;
    if let Some(exp) = numeric_date(&claims.exp, "exp claim must be a number")? {
        // RFC 7519 §4.1.4: valid only while now is before exp.
        if now >= exp + leeway {
            return Err(AuthError::Expired);
        }
    }
    if let Some(nbf) = numeric_date(&claims.nbf, "nbf claim must be a number")? {
        // RFC 7519 §4.1.5: valid from nbf on.
        if now + leeway < nbf {
            return Err(AuthError::NotYetValid);
        }
    }
    Ok(())
}

fn numeric_date(v: &Option<Value>, wrong_type: &'static str) -> Result<Option<f64>, AuthError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(AuthError::BadClaim(wrong_type)),
        Some(_) => Err(AuthError::BadClaim(wrong_type)),
    }
}

fn identity_from_claims(claims: RawClaims, limits: &AuthLimits) -> Result<Identity, AuthError> {
    let user = match claims.sub {
        None | Some(Value::Null) => return Err(AuthError::MissingSub),
        Some(Value::String(s)) => s,
        Some(_) => return Err(AuthError::BadClaim("sub claim must be a string")),
    };
    check_id(&user, limits, "invalid sub claim")?;
    let client = match claims.client {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            check_id(&s, limits, "invalid client claim")?;
            Some(s)
        }
        Some(_) => return Err(AuthError::BadClaim("client claim must be a string")),
    };
    let channels = match claims.channels {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut names = Vec::with_capacity(items.len().min(limits.max_channels));
            for item in items {
                let Value::String(name) = item else {
                    return Err(AuthError::BadClaim("channels claim must be strings"));
                };
                push_channel(&mut names, name, limits)?;
            }
            names
        }
        Some(_) => return Err(AuthError::BadClaim("channels claim must be an array")),
    };
    Ok(Identity {
        user,
        client,
        channels,
    })
}

fn identity_from_query(query: &str, limits: &AuthLimits) -> Result<Identity, AuthError> {
    let user = query_param(query, "user").ok_or(AuthError::Missing)?;
    check_id(&user, limits, "invalid user")?;
    let client = match query_param(query, "client") {
        None => None,
        Some(c) => {
            check_id(&c, limits, "invalid client")?;
            Some(c.into_owned())
        }
    };
    let mut channels = Vec::new();
    if let Some(list) = query_param(query, "channels") {
        for name in list.split(',').filter(|n| !n.is_empty()) {
            push_channel(&mut channels, name.to_owned(), limits)?;
        }
    }
    Ok(Identity {
        user: user.into_owned(),
        client,
        channels,
    })
}

/// Appends a channel unless already present; fails once more than `max_channels` distinct names are
/// seen, so the work stays bounded by the limit whatever the input size.
fn push_channel(
    channels: &mut Vec<String>,
    name: String,
    limits: &AuthLimits,
) -> Result<(), AuthError> {
    check_id(&name, limits, "invalid channel name")?;
    if channels.contains(&name) {
        return Ok(());
    }
    if channels.len() >= limits.max_channels {
        return Err(AuthError::BadClaim("too many channels"));
    }
    channels.push(name);
    Ok(())
}

/// Identity strings: non-empty, at most `max_id_bytes`, no control characters (they end up in logs
/// and in the fanout index).
fn check_id(s: &str, limits: &AuthLimits, invalid: &'static str) -> Result<(), AuthError> {
    if s.is_empty() || s.len() > limits.max_id_bytes || s.chars().any(char::is_control) {
        return Err(AuthError::BadClaim(invalid));
    }
    Ok(())
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
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
