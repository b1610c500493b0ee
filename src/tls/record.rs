//! The TLS 1.3 record layer after the handshake (RFC 8446 §5): sealing and opening application records with
//! the connection's traffic keys, and finding record boundaries in a byte stream. Sans-IO.
//!
//! It owns the per-direction key material as plain data — the AEAD key, the IV and the sequence number, about
//! fifty bytes — and expands the AEAD key schedule only while a record is sealed or opened, so an idle
//! connection keeps no cipher state (the same state a kernel with kTLS would hold). It does not run the
//! handshake (rustls does, in `session`), hold buffers, or touch sockets.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

/// Bytes of a record header: type, legacy version, length (RFC 8446 §5.1).
pub const HEADER_LEN: usize = 5;
/// Bytes of the AEAD tag (all three TLS 1.3 AEADs use 16).
pub const TAG_LEN: usize = 16;
/// Largest plaintext in one record (RFC 8446 §5.1: 2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest ciphertext a peer may send in one record (RFC 8446 §5.2: 2^14 + 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Largest whole record we produce: header, a full plaintext, the inner content type, the tag.
pub const MAX_SEALED: usize = HEADER_LEN + MAX_PLAINTEXT + 1 + TAG_LEN;

/// Records sealed or opened with one key before the connection is closed rather than re-keyed: well under the
/// AES-GCM confidentiality limit of 2^24.5 full-size records (RFC 8446 §5.5). A push connection that reaches
/// it has received millions of messages; it reconnects and gets fresh keys.
pub const MAX_RECORDS_PER_KEY: u64 = 1 << 23;

/// TLS content types (RFC 8446 §5.1).
pub mod content {
    /// `alert`
    pub const ALERT: u8 = 21;
    /// `handshake`
    pub const HANDSHAKE: u8 = 22;
    /// `application_data`, also the outer type of every protected record
    pub const APPLICATION_DATA: u8 = 23;
}

/// Alert descriptions we send or recognise (RFC 8446 §6).
pub mod alert {
    /// `close_notify`
    pub const CLOSE_NOTIFY: u8 = 0;
    /// `unexpected_message`
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    /// `bad_record_mac`
    pub const BAD_RECORD_MAC: u8 = 20;
    /// `record_overflow`
    pub const RECORD_OVERFLOW: u8 = 22;
    /// `decode_error`
    pub const DECODE_ERROR: u8 = 50;
    /// `internal_error`
    pub const INTERNAL_ERROR: u8 = 80;
}

/// The AEAD a connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// TLS_AES_128_GCM_SHA256
    Aes128Gcm,
    /// TLS_AES_256_GCM_SHA384
    Aes256Gcm,
    /// TLS_CHACHA20_POLY1305_SHA256
    Chacha20Poly1305,
}

impl Suite {
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn key_len(self) -> usize {
        match self {
            Suite::Aes128Gcm => 16,
            Suite::Aes256Gcm | Suite::Chacha20Poly1305 => 32,
        }
    }
}

/// Why a record could not be processed; each maps to the alert we send before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The record header is not a protected TLS 1.3 record.
    #[error("unexpected record type {0}")]
    UnexpectedType(u8),
    /// Longer than RFC 8446 allows.
    #[error("record too long")]
    Overflow,
    /// Authentication failed: tampered, or not encrypted with our keys.
    #[error("record failed authentication")]
    BadMac,
    /// No content type inside the record (all padding).
    #[error("record has no content type")]
    NoContentType,
    /// The key has protected [`MAX_RECORDS_PER_KEY`] records.
    #[error("key use limit reached")]
    KeyExhausted,
}

impl RecordError {
    /// The alert description to send (RFC 8446 §6.2).
    pub fn alert(self) -> u8 {
        match self {
            RecordError::UnexpectedType(_) | RecordError::NoContentType => {
                alert::UNEXPECTED_MESSAGE
            }
            RecordError::Overflow => alert::RECORD_OVERFLOW,
            RecordError::BadMac => alert::BAD_RECORD_MAC,
            RecordError::KeyExhausted => alert::INTERNAL_ERROR,
        }
    }

    /// A short stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            RecordError::UnexpectedType(_) | RecordError::NoContentType => "unexpected_message",
            RecordError::Overflow => "record_overflow",
            RecordError::BadMac => "bad_record_mac",
            RecordError::KeyExhausted => "key_exhausted",
        }
    }
}

/// One direction's traffic keys: the AEAD key, the IV and the next sequence number (RFC 8446 §5.3).
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    suite: Suite,
    key: [u8; 32],
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Keys")
            .field("suite", &self.suite)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Keys from raw material; `key` must be the suite's key length.
    pub fn new(suite: Suite, key: &[u8], iv: [u8; NONCE_LEN], seq: u64) -> Keys {
        debug_assert_eq!(key.len(), suite.key_len());
        let mut k = [0u8; 32];
        k[..key.len()].copy_from_slice(key);
        Keys {
            suite,
            key: k,
            iv,
            seq,
        }
    }

    /// Keys from what rustls hands over after the handshake; `None` for a suite this layer does not
    /// implement (rustls may add some).
    pub fn from_rustls(seq: u64, secrets: &ConnectionTrafficSecrets) -> Option<Keys> {
        let (suite, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Suite::Chacha20Poly1305, key, iv)
            }
            _ => return None,
        };
        let key = key.as_ref();
        if key.len() != suite.key_len() {
            return None;
        }
        Some(Keys::new(suite, key, iv.as_ref().try_into().ok()?, seq))
    }

    /// Writes the keys for a successor process (the live upgrade). This is key material: it only ever travels
    /// over the Unix socket between the two processes of one server.
    pub fn snapshot(&self, w: &mut crate::snapshot::Writer) {
        w.u8(match self.suite {
            Suite::Aes128Gcm => 1,
            Suite::Aes256Gcm => 2,
            Suite::Chacha20Poly1305 => 3,
        });
        w.raw(&self.key[..self.suite.key_len()]);
        w.raw(&self.iv);
        w.u64(self.seq);
    }

    /// Keys written by [`Keys::snapshot`].
    pub fn restore(
        r: &mut crate::snapshot::Reader<'_>,
    ) -> Result<Keys, crate::snapshot::SnapshotError> {
        let suite = match r.u8("tls suite")? {
            1 => Suite::Aes128Gcm,
            2 => Suite::Aes256Gcm,
            3 => Suite::Chacha20Poly1305,
            _ => return Err(crate::snapshot::SnapshotError::Invalid("tls suite")),
        };
        let key = r.raw(suite.key_len(), "tls key")?;
        let iv = r
            .raw(NONCE_LEN, "tls iv")?
            .try_into()
            .expect("nonce length");
        let seq = r.u64("tls sequence")?;
        Ok(Keys::new(suite, key, iv, seq))
    }

    /// The negotiated AEAD.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// The sequence number of the next record.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The per-record nonce: the IV XORed with the sequence number, left-padded (RFC 8446 §5.3).
    fn nonce(&self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        Nonce::assume_unique_for_key(nonce)
    }

    /// The expanded key schedule, built for one record and dropped after it.
    fn aead(&self) -> LessSafeKey {
        let unbound = UnboundKey::new(self.suite.algorithm(), &self.key[..self.suite.key_len()])
            .expect("key length checked at construction");
        LessSafeKey::new(unbound)
    }

    /// Refuses to protect another record once the key has done its share (checked before each record).
    fn check_limit(&self) -> Result<(), RecordError> {
        if self.seq >= MAX_RECORDS_PER_KEY {
            return Err(RecordError::KeyExhausted);
        }
        Ok(())
    }

    /// Appends one protected record carrying `plaintext` (at most [`MAX_PLAINTEXT`] bytes, given as parts
    /// that are concatenated) with inner content type `content_type` to `out`.
    pub fn seal(
        &mut self,
        content_type: u8,
        plaintext: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        self.check_limit()?;
        let len: usize = plaintext.iter().map(|p| p.len()).sum();
        debug_assert!(len <= MAX_PLAINTEXT);
        let sealed_len = len + 1 + TAG_LEN;
        let start = out.len();
        out.reserve(HEADER_LEN + sealed_len);
        out.push(content::APPLICATION_DATA);
        out.extend_from_slice(&[0x03, 0x03]);
        out.extend_from_slice(&(sealed_len as u16).to_be_bytes());
        for part in plaintext {
            out.extend_from_slice(part);
        }
        out.push(content_type);
        let header: [u8; HEADER_LEN] = out[start..start + HEADER_LEN]
            .try_into()
            .expect("header written");
        let nonce = self.nonce();
        let tag = self
            .aead()
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER_LEN..])
            .map_err(|_| RecordError::Overflow)?;
        out.extend_from_slice(tag.as_ref());
        self.seq += 1;
        Ok(())
    }

    /// Opens one complete protected record (`record` = header and body, as framed by [`record_len`]) in
    /// place; returns the inner content type and the plaintext's range within `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(u8, std::ops::Range<usize>), RecordError> {
        let header: [u8; HEADER_LEN] = record[..HEADER_LEN].try_into().expect("framed record");
        if header[0] != content::APPLICATION_DATA {
            return Err(RecordError::UnexpectedType(header[0]));
        }
        if record.len() - HEADER_LEN > MAX_CIPHERTEXT {
            return Err(RecordError::Overflow);
        }
        self.check_limit()?;
        let nonce = self.nonce();
        let plain_len = self
            .aead()
            .open_in_place(nonce, Aad::from(header), &mut record[HEADER_LEN..])
            .map_err(|_| RecordError::BadMac)?
            .len();
        self.seq += 1;
        // TLSInnerPlaintext: content, then the real type, then zero padding (RFC 8446 §5.2).
        let inner = &record[HEADER_LEN..HEADER_LEN + plain_len];
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::NoContentType);
        };
        if type_at > MAX_PLAINTEXT {
            return Err(RecordError::Overflow);
        }
        Ok((inner[type_at], HEADER_LEN..HEADER_LEN + type_at))
    }
}

/// Whether `input` starts with a complete record: `Ok(Some(len))` its whole length, `Ok(None)` more bytes are
/// needed, `Err` when the announced length is more than a peer may send (checked as soon as the header is
/// there, so an oversized record is refused before it is buffered).
pub fn record_len(input: &[u8]) -> Result<Option<usize>, RecordError> {
    if input.len() < HEADER_LEN {
        return Ok(None);
    }
    let body = u16::from_be_bytes([input[3], input[4]]) as usize;
    if body > MAX_CIPHERTEXT {
        return Err(RecordError::Overflow);
    }
    let len = HEADER_LEN + body;
    Ok((input.len() >= len).then_some(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(suite: Suite) -> (Keys, Keys) {
        let key = [7u8; 32];
        let iv = [9u8; NONCE_LEN];
        let k = Keys::new(suite, &key[..suite.key_len()], iv, 0);
        (k.clone(), k)
    }

    #[test]
    fn keys_are_plain_data_of_a_few_dozen_bytes() {
        assert!(
            std::mem::size_of::<Keys>() <= 64,
            "{}",
            std::mem::size_of::<Keys>()
        );
    }

    #[test]
    fn sealed_records_open_with_the_same_keys_for_every_suite() {
        for suite in [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305] {
            let (mut tx, mut rx) = pair(suite);
            let mut wire = Vec::new();
            tx.seal(content::APPLICATION_DATA, &[b"hello ", b"world"], &mut wire)
                .unwrap();
            tx.seal(content::APPLICATION_DATA, &[b"again"], &mut wire)
                .unwrap();
            let first = record_len(&wire).unwrap().unwrap();
            assert_eq!(first, HEADER_LEN + 11 + 1 + TAG_LEN);
            let (head, tail) = wire.split_at_mut(first);
            let (ty, range) = rx.open(head).unwrap();
            assert_eq!(
                (ty, &head[range]),
                (content::APPLICATION_DATA, &b"hello world"[..])
            );
            let (_, range) = rx.open(tail).unwrap();
            assert_eq!(&tail[range], b"again");
            assert_eq!((tx.seq(), rx.seq()), (2, 2));
        }
    }

    #[test]
    fn a_record_opened_out_of_sequence_fails_authentication() {
        let (mut tx, mut rx) = pair(Suite::Aes128Gcm);
        let mut one = Vec::new();
        let mut two = Vec::new();
        tx.seal(content::APPLICATION_DATA, &[b"1"], &mut one)
            .unwrap();
        tx.seal(content::APPLICATION_DATA, &[b"2"], &mut two)
            .unwrap();
        // A replayed or reordered record uses another nonce.
        assert_eq!(rx.open(&mut two), Err(RecordError::BadMac));
    }

    #[test]
    fn tampering_anywhere_is_detected() {
        let (mut tx, rx) = pair(Suite::Chacha20Poly1305);
        let mut wire = Vec::new();
        tx.seal(content::APPLICATION_DATA, &[b"payload"], &mut wire)
            .unwrap();
        for i in 3..wire.len() {
            let mut copy = wire.clone();
            copy[i] ^= 1;
            let mut rx = rx.clone();
            assert!(rx.open(&mut copy).is_err(), "byte {i}");
        }
    }

    #[test]
    fn inner_content_type_and_padding_are_recovered() {
        let (mut tx, mut rx) = pair(Suite::Aes256Gcm);
        let mut wire = Vec::new();
        // An alert with two bytes of zero padding after its type, as a peer may send (RFC 8446 §5.4).
        tx.seal(content::ALERT, &[&[1, alert::CLOSE_NOTIFY]], &mut wire)
            .unwrap();
        let (ty, range) = rx.open(&mut wire).unwrap();
        assert_eq!(ty, content::ALERT);
        assert_eq!(&wire[range], &[1, 0]);
    }

    #[test]
    fn record_len_waits_for_the_whole_record_and_refuses_oversize_at_once() {
        assert_eq!(record_len(&[23, 3, 3]), Ok(None));
        assert_eq!(record_len(&[23, 3, 3, 0, 2, 0]), Ok(None));
        assert_eq!(record_len(&[23, 3, 3, 0, 2, 0, 0, 9]), Ok(Some(7)));
        let too_long = (MAX_CIPHERTEXT as u16 + 1).to_be_bytes();
        assert_eq!(
            record_len(&[23, 3, 3, too_long[0], too_long[1]]),
            Err(RecordError::Overflow)
        );
    }

    #[test]
    fn a_plaintext_record_after_the_handshake_is_unexpected() {
        let (_, mut rx) = pair(Suite::Aes128Gcm);
        let mut plain_alert = vec![content::ALERT, 3, 3, 0, 2, 2, 40];
        assert_eq!(
            rx.open(&mut plain_alert),
            Err(RecordError::UnexpectedType(content::ALERT))
        );
    }

    #[test]
    fn a_key_is_retired_after_its_record_limit() {
        let (mut tx, _) = pair(Suite::Aes128Gcm);
        tx.seq = MAX_RECORDS_PER_KEY - 1;
        let mut out = Vec::new();
        assert!(tx
            .seal(content::APPLICATION_DATA, &[b"x"], &mut out)
            .is_ok());
        let sealed = out.len();
        assert_eq!(
            tx.seal(content::APPLICATION_DATA, &[b"x"], &mut out),
            Err(RecordError::KeyExhausted)
        );
        assert_eq!(out.len(), sealed, "nothing is sealed past the limit");
    }
}
