//! Public keys from PEM text (`auth.jwt_public_key_file`): each `PUBLIC KEY` block (X.509
//! SubjectPublicKeyInfo, RFC 5280 §4.1.2.7) or `RSA PUBLIC KEY` block (PKCS #1, RFC 8017 §A.1.1) becomes one
//! [`Key`] without `kid`, its kind read from the key's own algorithm identifier and curve.
//!
//! It owns the few DER structures a public key needs (a minimal reader, no general ASN.1); it reads no
//! file (see `mod.rs`) and knows nothing of tokens. Private keys and certificates are refused with a hint,
//! so a wrong file is a clear error at start rather than every token failing later.

use jsonwebtoken::DecodingKey;

use super::keys::{Key, KeyKind, KeySource, MAX_KEYS_PER_SOURCE, MAX_RSA_BITS, MIN_RSA_BITS};

/// Why a PEM text gave no keys. The text never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// Not PEM at all, or a block is damaged.
    #[error("not PEM text ({0})")]
    NotPem(String),
    /// No block in the text.
    #[error("holds no PEM block")]
    Empty,
    /// More keys than one source may hold.
    #[error("holds more than {MAX_KEYS_PER_SOURCE} keys")]
    TooMany,
    /// A block that is not a public key; the text says what it is and what to do.
    #[error("block {index} ({tag}) {why}")]
    Unsupported {
        /// 1-based position of the block.
        index: usize,
        /// Its `BEGIN` label.
        tag: String,
        /// What is wrong.
        why: String,
    },
}

/// Every public key in `text`, in order, each without `kid`.
pub fn parse_pem_keys(text: &[u8]) -> Result<Vec<Key>, PemError> {
    let blocks = pem::parse_many(text).map_err(|e| PemError::NotPem(e.to_string()))?;
    if blocks.is_empty() {
        return Err(PemError::Empty);
    }
    if blocks.len() > MAX_KEYS_PER_SOURCE {
        return Err(PemError::TooMany);
    }
    blocks
        .iter()
        .enumerate()
        .map(|(i, block)| {
            let unsupported = |why: String| PemError::Unsupported {
                index: i + 1,
                tag: block.tag().to_owned(),
                why,
            };
            let (kind, decoding) = match block.tag() {
                "PUBLIC KEY" => spki_key(block.contents()).map_err(unsupported)?,
                "RSA PUBLIC KEY" => rsa_key(block.contents()).map_err(unsupported)?,
                tag if tag.contains("PRIVATE KEY") => {
                    return Err(unsupported(
                        "is a private key: give the public key (`openssl pkey -pubout`)".into(),
                    ))
                }
                "CERTIFICATE" => {
                    return Err(unsupported(
                        "is a certificate: give its public key (`openssl x509 -pubkey -noout`)"
                            .into(),
                    ))
                }
                _ => return Err(unsupported("is not a public key".into())),
            };
            Ok(Key::public(
                None,
                kind,
                None,
                decoding,
                KeySource::PublicKeyFile,
            ))
        })
        .collect()
}

// DER-encoded object identifiers (RFC 5480 §2.1.1, RFC 8017 §A.1, RFC 8410 §3).
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_RSASSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
const OID_ED448: &[u8] = &[0x2b, 0x65, 0x71];

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;

/// SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT STRING }
/// (RFC 5280 §4.1), AlgorithmIdentifier ::= SEQUENCE { algorithm OID, parameters ANY OPTIONAL }.
fn spki_key(der: &[u8]) -> Result<(KeyKind, DecodingKey), String> {
    let spki = Der::new(der).only(TAG_SEQUENCE)?;
    let mut fields = Der::new(spki);
    let mut algorithm = Der::new(fields.next(TAG_SEQUENCE)?);
    let oid = algorithm.next(TAG_OID)?;
    let bits = fields.next(TAG_BIT_STRING)?;
    fields.end()?;
    // A key is whole bytes: the first content byte counts unused bits and must be 0.
    let key = match bits.split_first() {
        Some((0, key)) => key,
        _ => return Err("has a malformed key bit string".into()),
    };
    match oid {
        OID_RSA_ENCRYPTION => rsa_key(key),
        OID_EC_PUBLIC_KEY => {
            // RFC 5480 §2.1.1: the parameters name the curve; the key is an uncompressed point
            // (0x04 || x || y, SEC 1 §2.3.3), which is what ring verifies with.
            let (kind, coordinate_bytes) = match algorithm.next(TAG_OID)? {
                OID_P256 => (KeyKind::EcP256, 32),
                OID_P384 => (KeyKind::EcP384, 48),
                OID_P521 => return Err("is a P-521 key (ES512), which is not supported".into()),
                _ => return Err("is an EC key on an unsupported curve".into()),
            };
            if key.len() != 1 + 2 * coordinate_bytes || key[0] != 0x04 {
                return Err("is not an uncompressed EC point of its curve".into());
            }
            Ok((kind, DecodingKey::from_ec_der(key)))
        }
        OID_ED25519 => {
            // RFC 8410 §4: the key is the 32 raw bytes.
            if key.len() != 32 {
                return Err("is not a 32-byte Ed25519 key".into());
            }
            Ok((KeyKind::Ed25519, DecodingKey::from_ed_der(key)))
        }
        OID_ED448 => Err("is an Ed448 key, which is not supported".into()),
        OID_RSASSA_PSS => Err(
            "is an RSASSA-PSS-only key; give it as a plain RSA key (rsaEncryption), which PS256/384/512 accept"
                .into(),
        ),
        _ => Err("has an unsupported key algorithm".into()),
    }
}

/// RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER } (RFC 8017 §A.1.1), with a
/// modulus of [`MIN_RSA_BITS`] to [`MAX_RSA_BITS`].
fn rsa_key(der: &[u8]) -> Result<(KeyKind, DecodingKey), String> {
    let mut fields = Der::new(Der::new(der).only(TAG_SEQUENCE)?);
    let modulus = fields.next(TAG_INTEGER)?;
    fields.next(TAG_INTEGER)?;
    fields.end()?;
    check_rsa_modulus(modulus)?;
    Ok((KeyKind::Rsa, DecodingKey::from_rsa_der(der)))
}

/// The modulus size rule shared with JWKs: big-endian bytes, leading zeros ignored.
pub(super) fn check_rsa_modulus(modulus: &[u8]) -> Result<(), String> {
    let bits = modulus_bits(modulus);
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(format!(
            "is a {bits}-bit RSA key; {MIN_RSA_BITS} to {MAX_RSA_BITS} bits are accepted (RFC 7518 §3.3)"
        ));
    }
    Ok(())
}

fn modulus_bits(modulus: &[u8]) -> usize {
    match modulus.iter().position(|&b| b != 0) {
        Some(i) => (modulus.len() - i) * 8 - modulus[i].leading_zeros() as usize,
        None => 0,
    }
}

/// Reads DER TLVs (X.690 §8.1) one after another; definite lengths only, as DER requires.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Der { rest: bytes }
    }

    /// The content of the next element, which must have `tag`.
    fn next(&mut self, tag: u8) -> Result<&'a [u8], String> {
        let malformed = || "is malformed DER".to_string();
        let (&found, rest) = self.rest.split_first().ok_or_else(malformed)?;
        if found != tag {
            return Err(malformed());
        }
        let (&first, mut rest) = rest.split_first().ok_or_else(malformed)?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            // Long form: the low bits count the length bytes; 0x80 (indefinite) is not DER. Three bytes
            // (16 MiB) is far beyond any public key.
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 3 || rest.len() < count {
                return Err(malformed());
            }
            let (len_bytes, after) = rest.split_at(count);
            rest = after;
            len_bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        if rest.len() < len {
            return Err(malformed());
        }
        let (content, after) = rest.split_at(len);
        self.rest = after;
        Ok(content)
    }

    /// The content of the only element, which must have `tag`.
    fn only(mut self, tag: u8) -> Result<&'a [u8], String> {
        let content = self.next(tag)?;
        self.end()?;
        Ok(content)
    }

    /// Fails unless everything was read.
    fn end(&self) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err("has trailing bytes after its DER".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testkeys::*;
    use proptest::prelude::*;

    fn kinds(text: &str) -> Vec<KeyKind> {
        parse_pem_keys(text.as_bytes())
            .unwrap()
            .iter()
            .map(|k| k.kind())
            .collect()
    }

    fn error(text: &str) -> String {
        parse_pem_keys(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn each_supported_public_key_is_read_with_its_kind() {
        assert_eq!(kinds(RSA_PUBLIC), [KeyKind::Rsa]);
        assert_eq!(kinds(RSA_PUBLIC_PKCS1), [KeyKind::Rsa]);
        assert_eq!(kinds(P256_PUBLIC), [KeyKind::EcP256]);
        assert_eq!(kinds(P384_PUBLIC), [KeyKind::EcP384]);
        assert_eq!(kinds(ED25519_PUBLIC), [KeyKind::Ed25519]);
    }

    #[test]
    fn several_blocks_give_several_keys_in_order() {
        let text = format!("{RSA_PUBLIC}\n{ED25519_PUBLIC}{P384_PUBLIC}");
        assert_eq!(
            kinds(&text),
            [KeyKind::Rsa, KeyKind::Ed25519, KeyKind::EcP384]
        );
        let keys = parse_pem_keys(text.as_bytes()).unwrap();
        assert!(keys
            .iter()
            .all(|k| k.kid().is_none() && k.source() == KeySource::PublicKeyFile));
    }

    #[test]
    fn private_keys_are_refused_with_a_hint() {
        let msg = error(RSA_PRIVATE);
        assert!(
            msg.contains("block 1 (PRIVATE KEY) is a private key"),
            "{msg}"
        );
        assert!(msg.contains("openssl pkey -pubout"), "{msg}");
        // The message never carries key material.
        assert!(!msg.contains("MII"), "{msg}");
    }

    #[test]
    fn a_small_rsa_key_is_refused() {
        let msg = error(RSA1024_PUBLIC);
        assert!(msg.contains("1024-bit RSA key"), "{msg}");
    }

    #[test]
    fn p521_is_refused_as_unsupported() {
        assert!(error(P521_PUBLIC).contains("P-521"));
    }

    #[test]
    fn not_pem_or_empty_or_certificate_is_refused() {
        assert_eq!(
            parse_pem_keys(b"just some text\n").unwrap_err(),
            PemError::Empty
        );
        assert!(matches!(
            parse_pem_keys(b"-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n"),
            Err(PemError::NotPem(_))
        ));
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(error(cert).contains("is a certificate"));
    }

    #[test]
    fn a_truncated_key_is_malformed() {
        let der = pem::parse(RSA_PUBLIC).unwrap().into_contents();
        let cut = pem::encode(&pem::Pem::new("PUBLIC KEY", &der[..der.len() - 10]));
        assert!(error(&cut).contains("malformed DER"), "{}", error(&cut));
    }

    #[test]
    fn modulus_bits_ignore_leading_zeros() {
        assert_eq!(modulus_bits(&[0, 0x80, 0]), 16);
        assert_eq!(modulus_bits(&[0x01, 0]), 9);
        assert_eq!(modulus_bits(&[0, 0]), 0);
    }

    #[test]
    fn der_long_form_lengths_are_read() {
        let mut bytes = vec![TAG_SEQUENCE, 0x82, 0x01, 0x00];
        bytes.extend(std::iter::repeat_n(7, 256));
        assert_eq!(Der::new(&bytes).only(TAG_SEQUENCE).unwrap().len(), 256);
        assert!(Der::new(&[TAG_SEQUENCE, 0x80, 0, 0])
            .next(TAG_SEQUENCE)
            .is_err());
        assert!(Der::new(&[TAG_SEQUENCE, 0x05, 0])
            .next(TAG_SEQUENCE)
            .is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_der_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = spki_key(&bytes);
            let _ = rsa_key(&bytes);
        }

        #[test]
        fn arbitrary_pem_text_never_panics(text in "(-----BEGIN PUBLIC KEY-----\n)?[A-Za-z0-9+/=\n]{0,200}(-----END PUBLIC KEY-----\n)?") {
            let _ = parse_pem_keys(text.as_bytes());
        }
    }
}
