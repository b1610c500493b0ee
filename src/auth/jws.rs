//! The JWS compact serialisation of a token (RFC 7515 §7.1): its protected header (`alg`, `kid`, `crit`)
//! read before any key is touched, and the signature checked with the keys [`keys::select`] allows.
//!
//! It owns the header rules and the verification loop; the claims are `claims`' and the keys `keys`'.
//! `none` is not an algorithm here (RFC 8725 §3.1): it, an unknown `alg` or a `crit` header are refused
//! before verification.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;

use super::claims::RawClaims;
use super::keys::{self, KeySet, Selection};
use super::AuthError;

/// Every algorithm a key may accept (RFC 7518 §3.1), in [`Validations`]' order. HS384 and HS512 are
/// recognised only to be refused: no key accepts them.
pub const SUPPORTED: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The algorithm an `alg` value names: exact, case-sensitive (RFC 7515 §4.1.1). `none` and anything
/// unknown are `None`.
pub fn algorithm(name: &str) -> Option<Algorithm> {
    SUPPORTED.iter().copied().find(|alg| alg_name(*alg) == name)
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
    }
}

/// What the protected header says, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The signing algorithm.
    pub alg: Algorithm,
    /// The key id, if any (RFC 7515 §4.1.4).
    pub kid: Option<String>,
}

/// Reads and checks the header: three base64url parts, a JSON object header with a known `alg`, a string
/// `kid` if any, and no `crit`.
pub fn parse_header(token: &str) -> Result<Header, AuthError> {
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
    let alg = fields
        .get("alg")
        .and_then(Value::as_str)
        .and_then(algorithm)
        .ok_or(AuthError::WrongAlgorithm)?;
    // RFC 7515 §4.1.11: extensions listed in `crit` must be understood; we understand none.
    if fields.contains_key("crit") {
        return Err(AuthError::WrongAlgorithm);
    }
    let kid = match fields.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(AuthError::Malformed),
    };
    Ok(Header { alg, kid })
}

/// jsonwebtoken settings for each algorithm, built once: signature only. Time, issuer and audience are
/// `claims`' job, with an injected clock, so the library reads no clock and requires no claim.
pub struct Validations([Validation; SUPPORTED.len()]);

impl Validations {
    /// One `Validation` per [`SUPPORTED`] algorithm.
    pub fn new() -> Self {
        Validations(SUPPORTED.map(|alg| {
            let mut v = Validation::new(alg);
            v.required_spec_claims.clear();
            v.validate_exp = false;
            v.validate_nbf = false;
            v.validate_aud = false;
            v
        }))
    }

    fn get(&self, alg: Algorithm) -> &Validation {
        let i = SUPPORTED.iter().position(|a| *a == alg);
        // Every Algorithm jsonwebtoken 9 has is in SUPPORTED.
        &self.0[i.expect("alg is in SUPPORTED")]
    }
}

impl Default for Validations {
    fn default() -> Self {
        Self::new()
    }
}

/// The result of verifying: the claims, or why not; and whether a JWKS refresh might help.
#[derive(Debug)]
pub struct Verified {
    /// The claims, once a key verified the signature.
    pub claims: Result<RawClaims, AuthError>,
    /// No key was found for the token's `kid` (or, without `kid`, for its `alg`) and `alg` is a public-key
    /// algorithm: the issuer may have published a new key since the last fetch.
    pub key_missing: bool,
}

/// Verifies `token` (whose header is `header`) with the first key of `sets` that [`keys::select`] allows
/// and that verifies it.
pub fn verify(
    token: &str,
    header: &Header,
    sets: &[&KeySet],
    validations: &Validations,
) -> Verified {
    let public_alg = !matches!(
        header.alg,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    );
    let (keys, kid_unknown) = match keys::select(sets, header.kid.as_deref(), header.alg) {
        Selection::Try { keys, kid_unknown } => (keys, kid_unknown),
        Selection::UnknownKid => {
            return Verified {
                claims: Err(AuthError::UnknownKey),
                key_missing: public_alg,
            }
        }
        Selection::WrongAlgorithm => {
            return Verified {
                claims: Err(AuthError::WrongAlgorithm),
                key_missing: public_alg && header.kid.is_none(),
            }
        }
    };
    let validation = validations.get(header.alg);
    for key in keys {
        match jsonwebtoken::decode::<RawClaims>(token, key.decoding(), validation) {
            Ok(data) => {
                return Verified {
                    claims: Ok(data.claims),
                    key_missing: false,
                }
            }
            // Another key of the same kind may be the one (rotation without kids).
            Err(e) if *e.kind() == ErrorKind::InvalidSignature => continue,
            Err(e) => {
                let error = match e.kind() {
                    // select() already matched the key's kind to alg; the library checks it again.
                    ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
                        AuthError::WrongAlgorithm
                    }
                    // Anything else (bad base64, claims that are not a JSON object) is the token's.
                    _ => AuthError::Malformed,
                };
                return Verified {
                    claims: Err(error),
                    key_missing: false,
                };
            }
        }
    }
    // A kid no key has, that the keys without kid did not verify either: the issuer's new key, most likely.
    if kid_unknown {
        return Verified {
            claims: Err(AuthError::UnknownKey),
            key_missing: public_alg,
        };
    }
    Verified {
        claims: Err(AuthError::BadSignature),
        key_missing: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwk::parse_jwks;
    use crate::auth::keys::{Key, KeySource};
    use crate::auth::testkeys::*;
    use jsonwebtoken::EncodingKey;

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    fn signing_key(alg: Algorithm) -> EncodingKey {
        match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                EncodingKey::from_secret(b"secret")
            }
            Algorithm::ES256 => EncodingKey::from_ec_pem(P256_PRIVATE.as_bytes()).unwrap(),
            Algorithm::ES384 => EncodingKey::from_ec_pem(P384_PRIVATE.as_bytes()).unwrap(),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(ED25519_PRIVATE.as_bytes()).unwrap(),
            _ => EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        }
    }

    /// A token with this header, signed with `alg` using the test key of that kind.
    fn token(header: &str, alg: Algorithm) -> String {
        let message = format!("{}.{}", b64(header), b64(r#"{"sub":"a"}"#));
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &signing_key(alg), alg).unwrap();
        format!("{message}.{sig}")
    }

    fn jwks_set() -> KeySet {
        let jwks = format!(
            r#"{{"keys":[{},{},{},{}]}}"#,
            RSA_JWK.replacen('{', r#"{"kid":"rsa","#, 1),
            P256_JWK.replacen('{', r#"{"kid":"p256","#, 1),
            P384_JWK.replacen('{', r#"{"kid":"p384","#, 1),
            ED25519_JWK.replacen('{', r#"{"kid":"ed","#, 1),
        );
        KeySet::new(
            parse_jwks(jwks.as_bytes(), KeySource::JwksUrl)
                .unwrap()
                .keys,
        )
    }

    fn run(token: &str, sets: &[&KeySet]) -> Verified {
        let header = parse_header(token).unwrap();
        verify(token, &header, sets, &Validations::new())
    }

    #[test]
    fn every_public_key_algorithm_verifies_with_its_key() {
        let set = jwks_set();
        for (alg, kid) in [
            (Algorithm::RS256, "rsa"),
            (Algorithm::RS384, "rsa"),
            (Algorithm::RS512, "rsa"),
            (Algorithm::PS256, "rsa"),
            (Algorithm::PS384, "rsa"),
            (Algorithm::PS512, "rsa"),
            (Algorithm::ES256, "p256"),
            (Algorithm::ES384, "p384"),
            (Algorithm::EdDSA, "ed"),
        ] {
            let name = alg_name(alg);
            let with_kid = token(&format!(r#"{{"alg":"{name}","kid":"{kid}"}}"#), alg);
            assert!(run(&with_kid, &[&set]).claims.is_ok(), "{name} with kid");
            let without = token(&format!(r#"{{"alg":"{name}"}}"#), alg);
            assert!(run(&without, &[&set]).claims.is_ok(), "{name} without kid");
        }
    }

    #[test]
    fn hmac_over_a_public_keys_bytes_is_wrong_algorithm() {
        // The RFC 8725 §2.1 attack: HS256 "signed" with the public key's own text as the secret.
        let set = KeySet::new(vec![]);
        let pem_set = {
            let mut keys = crate::auth::pem_keys::parse_pem_keys(RSA_PUBLIC.as_bytes()).unwrap();
            KeySet::new(vec![keys.remove(0)])
        };
        let message = format!("{}.{}", b64(r#"{"alg":"HS256"}"#), b64(r#"{"sub":"a"}"#));
        let key = EncodingKey::from_secret(RSA_PUBLIC.as_bytes());
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
        let forged = format!("{message}.{sig}");
        for sets in [&[&pem_set][..], &[&set, &jwks_set()][..]] {
            let v = run(&forged, sets);
            assert_eq!(v.claims.unwrap_err(), AuthError::WrongAlgorithm);
            assert!(!v.key_missing);
        }
    }

    #[test]
    fn a_kid_of_one_kind_with_another_kinds_alg_is_wrong_algorithm() {
        let set = jwks_set();
        let cases = [
            (r#"{"alg":"ES256","kid":"rsa"}"#, Algorithm::ES256),
            (r#"{"alg":"RS256","kid":"p256"}"#, Algorithm::RS256),
            (r#"{"alg":"ES384","kid":"p256"}"#, Algorithm::ES384),
            (r#"{"alg":"EdDSA","kid":"rsa"}"#, Algorithm::EdDSA),
            (r#"{"alg":"HS256","kid":"rsa"}"#, Algorithm::HS256),
        ];
        for (header, alg) in cases {
            let v = run(&token(header, alg), &[&set]);
            assert_eq!(v.claims.unwrap_err(), AuthError::WrongAlgorithm, "{header}");
            assert!(!v.key_missing, "{header}");
        }
    }

    #[test]
    fn an_unknown_kid_asks_for_the_key() {
        let set = jwks_set();
        let v = run(
            &token(r#"{"alg":"RS256","kid":"new"}"#, Algorithm::RS256),
            &[&set],
        );
        assert_eq!(v.claims.unwrap_err(), AuthError::UnknownKey);
        assert!(v.key_missing);
    }

    #[test]
    fn an_unknown_kid_that_the_keys_without_kid_do_not_verify_asks_for_the_key() {
        // A PEM key (no kid) beside a JWKS: the provider's new kid falls back to the PEM key, which fails.
        let pem =
            KeySet::new(crate::auth::pem_keys::parse_pem_keys(RSA_PUBLIC.as_bytes()).unwrap());
        let t = token(r#"{"alg":"EdDSA","kid":"new"}"#, Algorithm::EdDSA);
        let ed_pem =
            KeySet::new(crate::auth::pem_keys::parse_pem_keys(P256_PUBLIC.as_bytes()).unwrap());
        let v = run(&t, &[&pem, &ed_pem]);
        assert_eq!(v.claims.unwrap_err(), AuthError::UnknownKey);
        assert!(v.key_missing);
        // The same with an RSA token: the kid-less RSA key is tried, fails, and the key is asked for.
        let rsa_token = {
            let message = format!(
                "{}.{}",
                b64(r#"{"alg":"RS256","kid":"new"}"#),
                b64(r#"{"sub":"a"}"#)
            );
            let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
            let sig =
                jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::RS256).unwrap();
            // Signed by the right key: the fallback verifies it, and nothing is missing.
            format!("{message}.{sig}")
        };
        let v = run(&rsa_token, &[&pem]);
        assert!(v.claims.is_ok());
        assert!(!v.key_missing);
        let parts: Vec<&str> = rsa_token.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], b64(r#"{"sub":"b"}"#), parts[2]);
        let v = run(&tampered, &[&pem]);
        assert_eq!(v.claims.unwrap_err(), AuthError::UnknownKey);
        assert!(v.key_missing);
    }

    #[test]
    fn no_key_of_the_kind_asks_for_keys_only_for_public_algorithms() {
        let secrets = KeySet::new(vec![Key::hmac(None, b"secret")]);
        let v = run(&token(r#"{"alg":"ES256"}"#, Algorithm::ES256), &[&secrets]);
        assert_eq!(v.claims.unwrap_err(), AuthError::WrongAlgorithm);
        assert!(v.key_missing);
        let v = run(&token(r#"{"alg":"HS512"}"#, Algorithm::HS512), &[&secrets]);
        assert_eq!(v.claims.unwrap_err(), AuthError::WrongAlgorithm);
        assert!(!v.key_missing);
    }

    #[test]
    fn a_tampered_payload_is_bad_signature() {
        let set = jwks_set();
        for (header, alg) in [
            (r#"{"alg":"ES256","kid":"p256"}"#, Algorithm::ES256),
            (r#"{"alg":"PS256"}"#, Algorithm::PS256),
            (r#"{"alg":"EdDSA","kid":"ed"}"#, Algorithm::EdDSA),
        ] {
            let t = token(header, alg);
            let parts: Vec<&str> = t.split('.').collect();
            let forged = format!("{}.{}.{}", parts[0], b64(r#"{"sub":"admin"}"#), parts[2]);
            assert_eq!(
                run(&forged, &[&set]).claims.unwrap_err(),
                AuthError::BadSignature,
                "{header}"
            );
        }
    }

    #[test]
    fn header_rules() {
        let ok = |h: &str| parse_header(&format!("{}.e30.c2ln", b64(h)));
        assert_eq!(
            ok(r#"{"alg":"RS256","kid":"k"}"#).unwrap(),
            Header {
                alg: Algorithm::RS256,
                kid: Some("k".into())
            }
        );
        assert_eq!(ok(r#"{"alg":"EdDSA","kid":null}"#).unwrap().kid, None);
        for bad in [
            r#"{"alg":"none"}"#,
            r#"{"alg":"None"}"#,
            r#"{"alg":"rs256"}"#,
            r#"{"alg":"ES512"}"#,
            r#"{"alg":"RS256","crit":["exp"]}"#,
            r#"{"typ":"JWT"}"#,
            r#"{"alg":1}"#,
        ] {
            assert_eq!(ok(bad), Err(AuthError::WrongAlgorithm), "{bad}");
        }
        assert_eq!(ok(r#"{"alg":"RS256","kid":7}"#), Err(AuthError::Malformed));
        assert_eq!(ok("[]"), Err(AuthError::Malformed));
    }

    #[test]
    fn algorithm_names_round_trip() {
        for alg in SUPPORTED {
            assert_eq!(algorithm(alg_name(alg)), Some(alg));
        }
        assert_eq!(algorithm("none"), None);
    }
}
