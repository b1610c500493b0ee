//! Public keys from a JSON Web Key Set (RFC 7517 §5), as `auth.jwks_file` holds it and `auth.jwks_url`
//! serves it: RSA, EC (P-256, P-384) and OKP (Ed25519, RFC 8037) signing keys, each with its `kid` and, when
//! the JWK names one, its single `alg`.
//!
//! Identity providers publish more than densepush can use (encryption keys, other curves, certificates
//! only), so each key that does not fit is skipped with a reason instead of failing the whole set; a set
//! with no usable key at all is an error. Symmetric (`oct`) keys are always skipped: HMAC secrets come only
//! from the config, never from a key set. Sans-IO: bytes in, keys out.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::DecodingKey;
use serde_json::{Map, Value};

use super::keys::{Key, KeyKind, KeySource, MAX_KEYS_PER_SOURCE};
use super::pem_keys::check_rsa_modulus;

/// Longest `kid` kept, in bytes; a longer one skips its key (kids are short names or thumbprints).
pub const MAX_KID_BYTES: usize = 256;

/// A parsed key set: the usable keys, and one line per skipped key saying why.
#[derive(Debug)]
pub struct ParsedJwks {
    /// Usable keys, in the set's order.
    pub keys: Vec<Key>,
    /// `key N (kid "x"): reason` for each key left out.
    pub skipped: Vec<String>,
}

/// Why a key set could not be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Not JSON, or not an object with a `keys` array (RFC 7517 §5.1).
    #[error("is not a JWK Set (a JSON object with a \"keys\" array): {0}")]
    NotJwks(String),
    /// More entries than one source may hold.
    #[error("has more than {MAX_KEYS_PER_SOURCE} keys")]
    TooMany,
    /// No entry is a usable signing key; the skipped reasons follow.
    #[error("has no usable signing key ({})", .0.join("; "))]
    NoUsableKey(Vec<String>),
}

/// The usable keys of a JWK Set, tagged with `source`.
pub fn parse_jwks(bytes: &[u8], source: KeySource) -> Result<ParsedJwks, JwksError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| JwksError::NotJwks(e.to_string()))?;
    let Some(Value::Array(entries)) = value.get("keys") else {
        return Err(JwksError::NotJwks("no \"keys\" array".into()));
    };
    if entries.len() > MAX_KEYS_PER_SOURCE {
        return Err(JwksError::TooMany);
    }
    let mut parsed = ParsedJwks {
        keys: Vec::with_capacity(entries.len()),
        skipped: Vec::new(),
    };
    for (i, entry) in entries.iter().enumerate() {
        let kid = entry.get("kid").and_then(Value::as_str);
        match parse_jwk(entry) {
            Ok(key) => parsed.keys.push(key.with_source(source)),
            Err(why) => parsed.skipped.push(match kid {
                Some(kid) => format!("key {} (kid {:?}): {why}", i + 1, truncate(kid)),
                None => format!("key {}: {why}", i + 1),
            }),
        }
    }
    if parsed.keys.is_empty() {
        return Err(JwksError::NoUsableKey(parsed.skipped));
    }
    Ok(parsed)
}

/// One JWK (RFC 7517 §4, RFC 7518 §6), or why it is not a usable signing key.
fn parse_jwk(entry: &Value) -> Result<Key, String> {
    let Value::Object(jwk) = entry else {
        return Err("is not a JSON object".into());
    };
    let kid = match jwk.get("kid") {
        None => None,
        Some(Value::String(kid)) if kid.len() <= MAX_KID_BYTES => Some(kid.clone()),
        Some(Value::String(_)) => return Err(format!("kid is over {MAX_KID_BYTES} bytes")),
        Some(_) => return Err("kid is not a string".into()),
    };
    // RFC 7517 §4.2: "sig" or "enc"; an encryption key must not verify signatures.
    match jwk.get("use") {
        None => {}
        Some(Value::String(u)) if u == "sig" => {}
        Some(_) => return Err("is not a signing key (\"use\" is not \"sig\")".into()),
    }
    // RFC 7517 §4.3: when key_ops is given, it must allow "verify".
    if let Some(ops) = jwk.get("key_ops") {
        let verify = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op == "verify"));
        if !verify {
            return Err("key_ops does not include \"verify\"".into());
        }
    }
    // Any private member (RFC 7518 §6.2.2, §6.3.2, RFC 8037 §2) means the publisher leaked a private key:
    // refuse it loudly rather than use it quietly.
    if jwk.contains_key("d") {
        return Err("holds private key material (\"d\"); publish only public keys".into());
    }
    let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or("");
    let (kind, decoding) = match kty {
        "RSA" => {
            let n = b64_member(jwk, "n")?;
            let e = b64_member(jwk, "e")?;
            check_rsa_modulus(&n)?;
            (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        "EC" => {
            let (kind, size) = match jwk.get("crv").and_then(Value::as_str) {
                Some("P-256") => (KeyKind::EcP256, 32),
                Some("P-384") => (KeyKind::EcP384, 48),
                Some("P-521") => return Err("P-521 (ES512) is not supported".into()),
                _ => return Err("has an unsupported EC curve".into()),
            };
            let x = b64_member(jwk, "x")?;
            let y = b64_member(jwk, "y")?;
            // RFC 7518 §6.2.1.2: each coordinate is exactly the curve's size.
            if x.len() != size || y.len() != size {
                return Err("has EC coordinates of the wrong length for its curve".into());
            }
            // SEC 1 §2.3.3 uncompressed point, what ring verifies with.
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (kind, DecodingKey::from_ec_der(&point))
        }
        "OKP" => {
            if jwk.get("crv").and_then(Value::as_str) != Some("Ed25519") {
                return Err("is an OKP key on a curve other than Ed25519".into());
            }
            let x = b64_member(jwk, "x")?;
            if x.len() != 32 {
                return Err("is not a 32-byte Ed25519 key".into());
            }
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
        }
        "oct" => {
            return Err(
                "is a symmetric key; HMAC secrets are taken only from auth.jwt_secret(s)".into(),
            )
        }
        _ => return Err("has an unsupported kty".into()),
    };
    // RFC 7517 §4.4: a JWK's alg names the one algorithm it is for; it must fit the key's kind.
    let pinned = match jwk.get("alg") {
        None => None,
        Some(Value::String(name)) => match super::jws::algorithm(name) {
            Some(alg) if kind.algorithms().contains(&alg) => Some(alg),
            _ => {
                return Err(format!(
                    "alg {:?} does not fit a {}",
                    truncate(name),
                    kind.name()
                ))
            }
        },
        Some(_) => return Err("alg is not a string".into()),
    };
    Ok(Key::public(
        kid,
        kind,
        pinned,
        decoding,
        KeySource::JwksFile,
    ))
}

/// A base64url member (RFC 7518 §6.3.1: without padding; padding is tolerated).
fn b64_member(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = jwk
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("has no {name:?} member"))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("{name:?} is not base64url"))
}

/// At most 64 characters of a value from the set, for a log line.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testkeys::*;
    use jsonwebtoken::Algorithm::{self, *};

    /// The algorithms a key accepts.
    fn pinned(key: &Key) -> Vec<Algorithm> {
        crate::auth::jws::SUPPORTED
            .iter()
            .copied()
            .filter(|&a| key.accepts(a))
            .collect()
    }

    /// `jwk` with extra members merged in.
    fn with(jwk: &str, extra: Value) -> Value {
        let mut v: Value = serde_json::from_str(jwk).unwrap();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn set(keys: &[Value]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
    }

    fn one(jwk: Value) -> Result<Key, String> {
        parse_jwk(&jwk)
    }

    #[test]
    fn every_supported_kty_and_curve_is_read() {
        let keys = parse_jwks(
            &set(&[
                with(RSA_JWK, serde_json::json!({"kid": "r"})),
                with(P256_JWK, serde_json::json!({"kid": "e256"})),
                with(P384_JWK, serde_json::json!({"kid": "e384"})),
                with(ED25519_JWK, serde_json::json!({"kid": "ed"})),
            ]),
            KeySource::JwksUrl,
        )
        .unwrap();
        assert!(keys.skipped.is_empty(), "{:?}", keys.skipped);
        let got: Vec<_> = keys.keys.iter().map(|k| (k.kid(), k.kind())).collect();
        assert_eq!(
            got,
            [
                (Some("r"), KeyKind::Rsa),
                (Some("e256"), KeyKind::EcP256),
                (Some("e384"), KeyKind::EcP384),
                (Some("ed"), KeyKind::Ed25519),
            ]
        );
        assert!(keys.keys.iter().all(|k| k.source() == KeySource::JwksUrl));
    }

    #[test]
    fn alg_pins_the_key_to_one_algorithm() {
        let key = one(with(RSA_JWK, serde_json::json!({"alg": "PS384"}))).unwrap();
        assert_eq!(pinned(&key), [PS384]);
        let key = one(serde_json::from_str(RSA_JWK).unwrap()).unwrap();
        assert_eq!(pinned(&key), [RS256, RS384, RS512, PS256, PS384, PS512]);
    }

    #[test]
    fn alg_that_does_not_fit_the_key_skips_it() {
        for (jwk, alg) in [
            (RSA_JWK, "HS256"),
            (RSA_JWK, "ES256"),
            (P256_JWK, "ES384"),
            (ED25519_JWK, "none"),
            (RSA_JWK, "RSA-OAEP"),
        ] {
            let err = one(with(jwk, serde_json::json!({ "alg": alg }))).unwrap_err();
            assert!(
                err.starts_with(&format!("alg {alg:?} does not fit")),
                "{err}"
            );
        }
    }

    #[test]
    fn encryption_keys_and_keys_without_verify_are_skipped() {
        assert!(one(with(RSA_JWK, serde_json::json!({"use": "enc"}))).is_err());
        assert!(one(with(RSA_JWK, serde_json::json!({"key_ops": ["encrypt"]}))).is_err());
        assert!(one(with(
            RSA_JWK,
            serde_json::json!({"use": "sig", "key_ops": ["verify"]})
        ))
        .is_ok());
    }

    #[test]
    fn symmetric_and_private_keys_are_skipped() {
        let err = one(serde_json::json!({"kty": "oct", "k": "c2VjcmV0"})).unwrap_err();
        assert!(err.contains("symmetric"), "{err}");
        let err = one(with(P256_JWK, serde_json::json!({"d": "AAAA"}))).unwrap_err();
        assert!(err.contains("private"), "{err}");
    }

    #[test]
    fn unsupported_curves_and_bad_members_are_skipped() {
        let cases = [
            with(P256_JWK, serde_json::json!({"crv": "P-521"})),
            with(P256_JWK, serde_json::json!({"crv": "P-384"})),
            with(ED25519_JWK, serde_json::json!({"crv": "Ed448"})),
            with(RSA_JWK, serde_json::json!({"n": "!!"})),
            with(RSA_JWK, serde_json::json!({"n": "AQAB"})),
            with(RSA_JWK, serde_json::json!({"kid": 7})),
            serde_json::json!({"kty": "RSA"}),
            serde_json::json!({"kty": "XYZ"}),
            serde_json::json!("not an object"),
        ];
        for jwk in cases {
            assert!(one(jwk.clone()).is_err(), "{jwk}");
        }
    }

    #[test]
    fn a_set_with_some_unusable_keys_keeps_the_others_and_says_why() {
        let parsed = parse_jwks(
            &set(&[
                with(RSA_JWK, serde_json::json!({"kid": "enc-key", "use": "enc"})),
                with(P256_JWK, serde_json::json!({"kid": "good"})),
            ]),
            KeySource::JwksFile,
        )
        .unwrap();
        assert_eq!(parsed.keys.len(), 1);
        assert_eq!(parsed.skipped.len(), 1);
        assert!(
            parsed.skipped[0].starts_with("key 1 (kid \"enc-key\"): is not a signing key"),
            "{:?}",
            parsed.skipped
        );
    }

    #[test]
    fn a_set_without_usable_keys_is_an_error_listing_why() {
        let err = parse_jwks(
            &set(&[serde_json::json!({"kty": "oct", "k": "c2VjcmV0"})]),
            KeySource::JwksFile,
        )
        .unwrap_err();
        assert!(matches!(err, JwksError::NoUsableKey(_)));
        assert!(err.to_string().contains("symmetric"), "{err}");
        assert!(matches!(
            parse_jwks(&set(&[]), KeySource::JwksFile),
            Err(JwksError::NoUsableKey(_))
        ));
    }

    #[test]
    fn not_a_set_is_an_error() {
        for text in ["", "[]", "{\"keys\": {}}", "{\"key\": []}", "nope"] {
            assert!(
                matches!(
                    parse_jwks(text.as_bytes(), KeySource::JwksFile),
                    Err(JwksError::NotJwks(_))
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn too_many_keys_is_an_error() {
        let keys: Vec<Value> = (0..=MAX_KEYS_PER_SOURCE)
            .map(|i| with(ED25519_JWK, serde_json::json!({ "kid": i.to_string() })))
            .collect();
        assert_eq!(
            parse_jwks(&set(&keys), KeySource::JwksUrl).unwrap_err(),
            JwksError::TooMany
        );
    }

    #[test]
    fn padded_base64_is_tolerated() {
        let mut jwk: Value = serde_json::from_str(ED25519_JWK).unwrap();
        let x = format!("{}=", jwk["x"].as_str().unwrap());
        jwk["x"] = Value::String(x);
        assert!(one(jwk).is_ok());
    }
}
