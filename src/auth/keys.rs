//! Verification keys and the one rule that keeps algorithms apart: **the key decides the algorithm**. Each
//! [`Key`] has a [`KeyKind`] (an HMAC secret, an RSA, P-256, P-384 or Ed25519 public key) that accepts a
//! fixed set of JWS algorithms (RFC 7518 §3.1), narrowed to one when its JWK names an `alg`. A token's `alg`
//! only selects among the keys that accept it, so an RSA key's bytes can never become an HMAC secret
//! (RFC 8725 §2.1, §3.1) and `none` matches no key at all.
//!
//! It owns [`KeySet`] (kid matching) and the choice of the keys a token may be verified with
//! ([`select`]); parsing keys is `pem` and `jwk`, verifying a token `jws`, fetching a JWKS `jwks`.

use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey};

use crate::metrics::KEY_SOURCE_LABELS;

/// Keys one source may hold (one JWKS, one PEM file, the HS256 secrets): a token without `kid` may be
/// tried against each key of a source, so this bounds the work one handshake can cause.
pub const MAX_KEYS_PER_SOURCE: usize = 32;

/// Smallest RSA modulus accepted, in bits (RFC 7518 §3.3 and §3.5: 2048 or larger).
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted, in bits (what ring verifies).
pub const MAX_RSA_BITS: usize = 8192;

/// What a key is, and so which algorithms it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// An HS256 shared secret (only from `auth.jwt_secret` and `auth.jwt_secrets`).
    Hmac,
    /// An RSA public key: RS256/384/512 (PKCS #1 v1.5) and PS256/384/512 (PSS).
    Rsa,
    /// A P-256 public key: ES256.
    EcP256,
    /// A P-384 public key: ES384.
    EcP384,
    /// An Ed25519 public key: EdDSA (RFC 8037).
    Ed25519,
}

impl KeyKind {
    /// The JWS algorithms a key of this kind accepts.
    pub fn algorithms(self) -> &'static [Algorithm] {
        use Algorithm::*;
        match self {
            // HS256 only, as before: one secret must not verify under several hash sizes.
            KeyKind::Hmac => &[HS256],
            KeyKind::Rsa => &[RS256, RS384, RS512, PS256, PS384, PS512],
            KeyKind::EcP256 => &[ES256],
            KeyKind::EcP384 => &[ES384],
            KeyKind::Ed25519 => &[EdDSA],
        }
    }

    /// Short name for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Hmac => "HMAC secret",
            KeyKind::Rsa => "RSA key",
            KeyKind::EcP256 => "P-256 key",
            KeyKind::EcP384 => "P-384 key",
            KeyKind::Ed25519 => "Ed25519 key",
        }
    }
}

/// Where a key came from: the config key that named it. Its index is the label's in
/// [`KEY_SOURCE_LABELS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `auth.jwt_secret`, `auth.jwt_secret_env` or `auth.jwt_secrets`.
    Secret = 0,
    /// `auth.jwt_public_key_file`.
    PublicKeyFile = 1,
    /// `auth.jwks_file`.
    JwksFile = 2,
    /// `auth.jwks_url`.
    JwksUrl = 3,
}

impl KeySource {
    /// The metric label, e.g. `jwks_url`.
    pub fn label(self) -> &'static str {
        KEY_SOURCE_LABELS[self as usize]
    }
}

/// One verification key.
pub struct Key {
    kid: Option<String>,
    kind: KeyKind,
    /// The one algorithm this key is for, when its JWK says so (RFC 7517 §4.4).
    pinned: Option<Algorithm>,
    decoding: DecodingKey,
    source: KeySource,
}

impl Key {
    /// An HS256 key from a shared secret.
    pub fn hmac(kid: Option<String>, secret: &[u8]) -> Key {
        Key {
            kid,
            kind: KeyKind::Hmac,
            pinned: None,
            decoding: DecodingKey::from_secret(secret),
            source: KeySource::Secret,
        }
    }

    /// A public key. `pinned`, when given, must be one of `kind`'s algorithms (the parsers check).
    pub(super) fn public(
        kid: Option<String>,
        kind: KeyKind,
        pinned: Option<Algorithm>,
        decoding: DecodingKey,
        source: KeySource,
    ) -> Key {
        debug_assert!(kind != KeyKind::Hmac, "public keys are never HMAC secrets");
        debug_assert!(pinned.is_none_or(|alg| kind.algorithms().contains(&alg)));
        Key {
            kid,
            kind,
            pinned,
            decoding,
            source,
        }
    }

    /// Whether a token signed with `alg` may be verified with this key.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        match self.pinned {
            Some(pinned) => pinned == alg,
            None => self.kind.algorithms().contains(&alg),
        }
    }

    /// The key id (`kid`), if the key has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// What the key is.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// Where it came from.
    pub fn source(&self) -> KeySource {
        self.source
    }

    /// The key in the form jsonwebtoken verifies with.
    pub fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }

    /// Sets the source (parsers build keys before they know which config key they serve).
    pub(super) fn with_source(mut self, source: KeySource) -> Key {
        self.source = source;
        self
    }
}

// Hand-written so key material (a secret above all) never reaches a log.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("pinned", &self.pinned)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Keys from one or more sources, in order.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// A set of these keys.
    pub fn new(keys: Vec<Key>) -> KeySet {
        KeySet { keys }
    }

    /// Adds keys at the end.
    pub fn extend(&mut self, keys: impl IntoIterator<Item = Key>) {
        self.keys.extend(keys);
    }

    /// Every key, in order.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keys from `source`.
    pub fn count(&self, source: KeySource) -> usize {
        self.keys.iter().filter(|k| k.source == source).count()
    }

    fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// Which keys a token may be verified with, given its header's `kid` and `alg`, over several sets (the
/// static keys and the last JWKS fetched).
#[derive(Debug)]
pub enum Selection<'a> {
    /// Try these keys, in order; the first that verifies wins. `kid_unknown` says they are the fallback
    /// for a `kid` no key has: if none verifies, the key is missing rather than the signature bad.
    Try {
        /// The keys, in order.
        keys: Vec<&'a Key>,
        /// The token's `kid` matched no key.
        kid_unknown: bool,
    },
    /// Some key has the token's `kid` (or, without `kid`, some key exists) but none accepts its `alg`:
    /// an algorithm-confusion attempt or a misconfigured issuer.
    WrongAlgorithm,
    /// The token names a `kid` no key has, and no key without a `kid` accepts its `alg`. A JWKS refresh
    /// may bring the key.
    UnknownKid,
}

/// The keys for a token:
/// - with a `kid` some key has: the keys with that `kid`;
/// - with a `kid` no key has: the keys without a `kid` (a PEM key, a plain secret), so tokens from
///   issuers that add a `kid` of their own still verify with such keys;
/// - without a `kid`: every key (RFC 7515 §4.1.4 makes `kid` optional).
///
/// In each case only the keys that accept `alg` are kept.
pub fn select<'a>(sets: &[&'a KeySet], kid: Option<&str>, alg: Algorithm) -> Selection<'a> {
    let kid_known = kid.is_some_and(|kid| sets.iter().any(|s| s.has_kid(kid)));
    let eligible = |key: &Key| match kid {
        Some(kid) if kid_known => key.kid.as_deref() == Some(kid),
        Some(_) => key.kid.is_none(),
        None => true,
    };
    let keys: Vec<&Key> = sets
        .iter()
        .flat_map(|s| s.keys.iter())
        .filter(|k| eligible(k) && k.accepts(alg))
        .collect();
    let kid_unknown = kid.is_some() && !kid_known;
    if !keys.is_empty() {
        Selection::Try { keys, kid_unknown }
    } else if kid_unknown {
        Selection::UnknownKid
    } else {
        Selection::WrongAlgorithm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::pem_keys::parse_pem_keys;
    use crate::auth::testkeys::*;
    use Algorithm::*;

    fn public(kid: &str, pem: &str) -> Key {
        let mut keys = parse_pem_keys(pem.as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        let key = keys.remove(0);
        Key {
            kid: Some(kid.to_owned()),
            ..key
        }
    }

    fn kids(selection: Selection<'_>) -> Vec<Option<&str>> {
        match selection {
            Selection::Try { keys, .. } => keys.iter().map(|k| k.kid()).collect(),
            other => panic!("expected keys to try, got {other:?}"),
        }
    }

    #[test]
    fn each_kind_accepts_only_its_own_algorithms() {
        let all = [
            HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
        ];
        let expect = [
            (KeyKind::Hmac, vec![HS256]),
            (KeyKind::Rsa, vec![RS256, RS384, RS512, PS256, PS384, PS512]),
            (KeyKind::EcP256, vec![ES256]),
            (KeyKind::EcP384, vec![ES384]),
            (KeyKind::Ed25519, vec![EdDSA]),
        ];
        for (kind, accepted) in expect {
            for alg in all {
                assert_eq!(
                    kind.algorithms().contains(&alg),
                    accepted.contains(&alg),
                    "{kind:?} {alg:?}"
                );
            }
        }
    }

    #[test]
    fn a_pinned_key_accepts_only_its_algorithm() {
        let key = Key {
            pinned: Some(PS256),
            ..public("r", RSA_PUBLIC)
        };
        assert!(key.accepts(PS256));
        assert!(!key.accepts(RS256));
    }

    #[test]
    fn a_known_kid_selects_only_that_key() {
        let set = KeySet::new(vec![
            public("a", RSA_PUBLIC),
            public("b", RSA_PUBLIC),
            Key::hmac(None, b"secret"),
        ]);
        assert_eq!(kids(select(&[&set], Some("b"), RS256)), [Some("b")]);
    }

    #[test]
    fn a_known_kid_with_another_kinds_alg_is_wrong_algorithm() {
        // The classic confusion: the RSA key's kid with HS256, or with an EC algorithm.
        let set = KeySet::new(vec![public("a", RSA_PUBLIC), Key::hmac(None, b"secret")]);
        for alg in [HS256, ES256, EdDSA] {
            assert!(
                matches!(select(&[&set], Some("a"), alg), Selection::WrongAlgorithm),
                "{alg:?}"
            );
        }
    }

    #[test]
    fn an_unknown_kid_falls_back_to_keys_without_kid() {
        let set = KeySet::new(vec![public("a", RSA_PUBLIC), Key::hmac(None, b"secret")]);
        assert_eq!(kids(select(&[&set], Some("zzz"), HS256)), [None]);
        assert!(matches!(
            select(&[&set], Some("zzz"), RS256),
            Selection::UnknownKid
        ));
    }

    #[test]
    fn no_kid_tries_every_key_of_the_right_kind_across_sets() {
        let first = KeySet::new(vec![public("a", RSA_PUBLIC), public("e", P256_PUBLIC)]);
        let second = KeySet::new(vec![public("b", RSA_PUBLIC)]);
        assert_eq!(
            kids(select(&[&first, &second], None, PS384)),
            [Some("a"), Some("b")]
        );
        assert_eq!(kids(select(&[&first, &second], None, ES256)), [Some("e")]);
        assert!(matches!(
            select(&[&first, &second], None, EdDSA),
            Selection::WrongAlgorithm
        ));
    }

    #[test]
    fn a_kid_in_the_second_set_is_known() {
        let first = KeySet::new(vec![Key::hmac(None, b"secret")]);
        let second = KeySet::new(vec![public("b", RSA_PUBLIC)]);
        assert_eq!(
            kids(select(&[&first, &second], Some("b"), RS512)),
            [Some("b")]
        );
    }

    #[test]
    fn debug_never_prints_key_material() {
        let key = Key::hmac(Some("k".into()), b"do-not-print-this-secret");
        let text = format!("{:?}", KeySet::new(vec![key]));
        assert!(!text.contains("do-not-print"), "{text}");
        assert!(text.contains("Hmac"), "{text}");
    }

    #[test]
    fn counts_keys_by_source() {
        let set = KeySet::new(vec![
            Key::hmac(None, b"s"),
            public("a", RSA_PUBLIC).with_source(KeySource::JwksUrl),
        ]);
        assert_eq!(set.count(KeySource::Secret), 1);
        assert_eq!(set.count(KeySource::JwksUrl), 1);
        assert_eq!(set.count(KeySource::JwksFile), 0);
        assert_eq!(KeySource::JwksUrl.label(), "jwks_url");
    }
}
