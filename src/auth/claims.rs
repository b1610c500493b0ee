//! What a verified token (or, in `none` mode, the query) says about a connection, and the rules on it:
//! `exp` and `nbf` with leeway (RFC 7519 §4.1.4-5), `iss` and `aud` against the configured issuer and
//! audience (§4.1.1, §4.1.3), and `sub`, `client` and `channels` bounded into an [`Identity`].
//!
//! It owns the claim rules only; whether the token's signature holds is `jws`' job. Time is an argument, so
//! every rule is a unit test.

use serde::Deserialize;
use serde_json::Value;

use super::{AuthError, AuthLimits, Identity};
use crate::proto::http::query_param;

/// Claims as sent, kept untyped so each bad claim gets its own error after the signature verifies.
/// serde refuses duplicate keys, so a claim cannot be given twice with different values.
#[derive(Debug, Deserialize)]
pub struct RawClaims {
    sub: Option<Value>,
    client: Option<Value>,
    channels: Option<Value>,
    exp: Option<Value>,
    nbf: Option<Value>,
    iss: Option<Value>,
    aud: Option<Value>,
}

/// The claim checks that do not depend on the key: time, issuer and audience.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClaimRules {
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// `auth.issuer`: when set, `iss` must equal it.
    pub issuer: Option<String>,
    /// `auth.audience`: when set, `aud` must name it; when not, a token with any `aud` is refused.
    pub audience: Option<String>,
}

impl ClaimRules {
    /// Every rule, in a fixed order (time first, as before issuer and audience existed).
    pub fn check(&self, claims: &RawClaims, now_unix_secs: u64) -> Result<(), AuthError> {
        check_times(claims, now_unix_secs, self.leeway_secs)?;
        self.check_issuer(claims)?;
        self.check_audience(claims)
    }

    /// RFC 7519 §4.1.1: a case-sensitive string. Without a configured issuer, `iss` is not looked at.
    fn check_issuer(&self, claims: &RawClaims) -> Result<(), AuthError> {
        let Some(issuer) = &self.issuer else {
            return Ok(());
        };
        match &claims.iss {
            Some(Value::String(iss)) if iss == issuer => Ok(()),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                Err(AuthError::BadClaim("token issuer not accepted"))
            }
            Some(_) => Err(AuthError::BadClaim("iss claim must be a string")),
        }
    }

    /// RFC 7519 §4.1.3: `aud` is a string or an array of strings, and a recipient that does not identify
    /// itself with a value in it must reject the token. So with no audience configured, any `aud` is
    /// refused; with one, `aud` must be present and name it.
    fn check_audience(&self, claims: &RawClaims) -> Result<(), AuthError> {
        let refused = Err(AuthError::BadClaim("token audience not accepted"));
        let names = |aud: &Value| -> Result<bool, AuthError> {
            let Some(audience) = &self.audience else {
                return Ok(false);
            };
            match aud {
                Value::String(one) => Ok(one == audience),
                Value::Array(many) => {
                    let mut found = false;
                    for item in many {
                        let Value::String(one) = item else {
                            return Err(AuthError::BadClaim(
                                "aud claim must be a string or an array of strings",
                            ));
                        };
                        found |= one == audience;
                    }
                    Ok(found)
                }
                _ => Err(AuthError::BadClaim(
                    "aud claim must be a string or an array of strings",
                )),
            }
        };
        match (&claims.aud, &self.audience) {
            (None | Some(Value::Null), None) => Ok(()),
            (None | Some(Value::Null), Some(_)) => refused,
            (Some(aud), _) => {
                if names(aud)? {
                    Ok(())
                } else {
                    refused
                }
            }
        }
    }
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

/// The identity a verified token names: `sub` (required), `client`, `channels`.
pub fn identity_from_claims(claims: RawClaims, limits: &AuthLimits) -> Result<Identity, AuthError> {
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

/// `none` mode: `?user=U&client=C&channels=a,b`, with the same bounds as claims.
pub fn identity_from_query(query: &str, limits: &AuthLimits) -> Result<Identity, AuthError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(json: &str) -> RawClaims {
        serde_json::from_str(json).unwrap()
    }

    fn rules(issuer: Option<&str>, audience: Option<&str>) -> ClaimRules {
        ClaimRules {
            leeway_secs: 0,
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
        }
    }

    const ISSUER_REFUSED: AuthError = AuthError::BadClaim("token issuer not accepted");
    const AUDIENCE_REFUSED: AuthError = AuthError::BadClaim("token audience not accepted");

    #[test]
    fn issuer_must_match_exactly_when_configured() {
        let r = rules(Some("https://idp.example/"), None);
        assert_eq!(
            r.check(&claims(r#"{"iss":"https://idp.example/"}"#), 0),
            Ok(())
        );
        for bad in [
            r#"{"iss":"https://idp.example"}"#,
            r#"{"iss":"HTTPS://IDP.EXAMPLE/"}"#,
            r#"{}"#,
            r#"{"iss":null}"#,
        ] {
            assert_eq!(r.check(&claims(bad), 0), Err(ISSUER_REFUSED), "{bad}");
        }
        assert_eq!(
            r.check(&claims(r#"{"iss":["https://idp.example/"]}"#), 0),
            Err(AuthError::BadClaim("iss claim must be a string"))
        );
    }

    #[test]
    fn issuer_is_ignored_when_not_configured() {
        assert_eq!(rules(None, None).check(&claims(r#"{"iss":5}"#), 0), Ok(()));
    }

    #[test]
    fn audience_must_be_named_when_configured() {
        let r = rules(None, Some("densepush"));
        for good in [r#"{"aud":"densepush"}"#, r#"{"aud":["api","densepush"]}"#] {
            assert_eq!(r.check(&claims(good), 0), Ok(()), "{good}");
        }
        for bad in [
            r#"{"aud":"api"}"#,
            r#"{"aud":[]}"#,
            r#"{}"#,
            r#"{"aud":["Densepush"]}"#,
        ] {
            assert_eq!(r.check(&claims(bad), 0), Err(AUDIENCE_REFUSED), "{bad}");
        }
        assert_eq!(
            r.check(&claims(r#"{"aud":["densepush",1]}"#), 0),
            Err(AuthError::BadClaim(
                "aud claim must be a string or an array of strings"
            ))
        );
    }

    #[test]
    fn any_audience_is_refused_when_none_is_configured() {
        let r = rules(None, None);
        assert_eq!(r.check(&claims(r#"{"aud":"x"}"#), 0), Err(AUDIENCE_REFUSED));
        assert_eq!(r.check(&claims(r#"{"aud":[]}"#), 0), Err(AUDIENCE_REFUSED));
        assert_eq!(r.check(&claims(r#"{"aud":null}"#), 0), Ok(()));
    }

    #[test]
    fn time_is_checked_before_issuer_and_audience() {
        let r = rules(Some("i"), Some("a"));
        assert_eq!(
            r.check(&claims(r#"{"exp":10,"iss":"x","aud":"y"}"#), 100),
            Err(AuthError::Expired)
        );
    }
}
