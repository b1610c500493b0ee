//! One connection's TLS state: the handshake (rustls's unbuffered server connection), then only the traffic
//! keys (`record::Keys`) and, while busy, a partial inbound record or the unsent tail of a sealed one.
//!
//! Sans-IO: ciphertext comes in through [`Session::receive`], which appends plaintext for the connection's
//! machine to one buffer and bytes for the socket (handshake flights, alerts) to another; the reactor moves
//! them. Writes go through [`TlsWire`], the connection's `Transport`: it seals the machine's plaintext into
//! records straight into a reactor-wide buffer and keeps at most one record's unsent tail, so whatever else a
//! slow reader has queued stays as references to shared plaintext frames. Once the handshake is done the
//! rustls connection is dropped: an idle wss connection holds its keys (about a hundred bytes) and no buffer.

use super::record::{self, alert, content, Keys, RecordError, HEADER_LEN, MAX_PLAINTEXT};
use crate::conn::transport::{Socket, Transport};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{HandshakeKind, ServerConfig};
use std::io::{self, IoSlice, Write};
use std::sync::Arc;

/// Handshake bytes a client may have buffered before the handshake completes: a ClientHello with every
/// extension fits in a few KiB; this bounds a peer that never finishes a record.
pub const MAX_HANDSHAKE_BUFFER: usize = 2 * (HEADER_LEN + record::MAX_CIPHERTEXT);

/// What a handshaking session is charged against the buffer budget up front: the rustls connection and its
/// handshake state (measured at 1-3 KiB with a P-256 certificate), before any buffered bytes.
pub const HANDSHAKE_CHARGE: usize = 4 << 10;

/// A handshake type inside a protected record (RFC 8446 §4).
const KEY_UPDATE: u8 = 24;

/// How a completed handshake went, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// A full handshake (certificate, signature).
    Full,
    /// Resumed from a session ticket.
    Resumed,
}

/// Why a TLS connection must end; each has a metric label, and the alert (if any) was queued to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The handshake failed (rustls's error: bad ClientHello, no common suite, unsupported version...).
    #[error("handshake failed: {0}")]
    Handshake(&'static str),
    /// Plain HTTP arrived on the TLS port (answered with a plain HTTP 400).
    #[error("plain HTTP on the TLS port")]
    PlainHttp,
    /// A protected record was refused.
    #[error("bad record: {0}")]
    Record(RecordError),
    /// The peer sent a fatal alert.
    #[error("peer sent alert {0}")]
    PeerAlert(u8),
    /// The peer asked for a key update (RFC 8446 §4.6.3). Only the traffic keys are kept after the handshake,
    /// not the secrets they derive from, so the connection is closed instead (the client reconnects).
    #[error("peer sent KeyUpdate")]
    KeyUpdate,
    /// A handshake message after the handshake that is not a KeyUpdate (renegotiation does not exist in
    /// TLS 1.3, RFC 8446 §4.1.2: a ClientHello here is unexpected).
    #[error("unexpected handshake message after the handshake")]
    UnexpectedHandshake,
    /// The peer sent more handshake data than any honest handshake needs.
    #[error("handshake too large")]
    HandshakeTooLarge,
}

impl Failure {
    /// A short stable label for `densepush_tls_failures_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Handshake(_) => "handshake",
            Failure::PlainHttp => "plain_http",
            Failure::Record(e) => e.label(),
            Failure::PeerAlert(_) => "peer_alert",
            Failure::KeyUpdate => "key_update",
            Failure::UnexpectedHandshake => "unexpected_message",
            Failure::HandshakeTooLarge => "handshake_too_large",
        }
    }
}

/// Labels of [`Failure::label`], for metrics.
pub const FAILURE_LABELS: [&str; 10] = [
    "handshake",
    "plain_http",
    "unexpected_message",
    "record_overflow",
    "bad_record_mac",
    "key_exhausted",
    "peer_alert",
    "key_update",
    "handshake_too_large",
    "timeout",
];

/// What [`Session::receive`] found besides plaintext.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// The handshake completed during this call.
    pub completed: Option<Completed>,
    /// The peer sent `close_notify`: no more data will come.
    pub peer_closed: bool,
}

/// A connection's TLS state.
pub enum Session {
    /// The handshake is running.
    Handshaking(Box<Handshake>),
    /// The handshake is done: keys only.
    Established(Established),
    /// A fatal error happened; nothing more is read or written.
    Failed,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Session::Handshaking(_) => f.write_str("Session::Handshaking"),
            Session::Established(e) => f.debug_tuple("Session::Established").field(e).finish(),
            Session::Failed => f.write_str("Session::Failed"),
        }
    }
}

/// The handshake in progress: rustls's connection and the bytes around it.
pub struct Handshake {
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not yet consumed by rustls.
    inbuf: Vec<u8>,
    /// Handshake bytes the socket did not take yet.
    unsent: Vec<u8>,
}

/// After the handshake: the traffic keys, and buffers only while busy.
#[derive(Debug)]
pub struct Established {
    rx: Keys,
    tx: Keys,
    held: Option<Box<Held>>,
}

/// Bytes an established session holds only while busy.
#[derive(Debug, Default)]
struct Held {
    /// The start of an inbound record whose end has not arrived.
    partial: Vec<u8>,
    /// The unsent tail of a sealed outbound record (it must go out before anything else is sealed).
    unsent: Vec<u8>,
    /// Bytes of `unsent` already written.
    unsent_at: usize,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.partial.is_empty() && self.unsent_at >= self.unsent.len()
    }

    fn bytes(&self) -> usize {
        self.partial.capacity() + self.unsent.capacity()
    }
}

impl Established {
    /// Sessions with the same keys (tests, and a connection moved to another process).
    pub fn from_keys(rx: Keys, tx: Keys) -> Established {
        Established { rx, tx, held: None }
    }

    fn unsent(&self) -> &[u8] {
        self.held.as_ref().map_or(&[], |h| &h.unsent[h.unsent_at..])
    }
}

impl Session {
    /// A session for a freshly accepted TLS connection.
    pub fn new(config: Arc<ServerConfig>) -> Result<Session, rustls::Error> {
        Ok(Session::Handshaking(Box::new(Handshake {
            conn: UnbufferedServerConnection::new(config)?,
            inbuf: Vec::new(),
            unsent: Vec::new(),
        })))
    }

    /// True once the handshake is done.
    pub fn is_established(&self) -> bool {
        matches!(self, Session::Established(_))
    }

    /// Heap bytes the session holds now (for the budget and the `densepush_tls_bytes` gauge): the handshake
    /// estimate and its buffers, or the held buffers of an established session (its keys live in the
    /// reactor's session table and are counted there).
    pub fn held_bytes(&self) -> usize {
        match self {
            Session::Handshaking(h) => HANDSHAKE_CHARGE + h.inbuf.capacity() + h.unsent.capacity(),
            Session::Established(e) => e
                .held
                .as_ref()
                .map_or(0, |h| std::mem::size_of::<Held>() + h.bytes()),
            Session::Failed => 0,
        }
    }

    /// Bytes accepted for sending that the socket has not taken yet.
    pub fn unsent(&self) -> &[u8] {
        match self {
            Session::Handshaking(h) => &h.unsent,
            Session::Established(e) => e.unsent(),
            Session::Failed => &[],
        }
    }

    /// Takes ciphertext from the socket. Plaintext for the connection's machine is appended to `plain`, bytes
    /// for the socket (handshake flights, tickets, alerts) to `send`. On `Err` an alert (if any) is already in
    /// `send` and the connection must end.
    pub fn receive(
        &mut self,
        input: &mut [u8],
        plain: &mut Vec<u8>,
        send: &mut Vec<u8>,
    ) -> Result<Received, Failure> {
        let result = match self {
            // rustls parses what hostile peers send; should it ever panic on some input, that peer's
            // connection fails instead of the reactor thread with every connection on it.
            Session::Handshaking(_) => {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.receive_handshake(input, plain, send)
                }))
                .unwrap_or_else(|_| {
                    log::error!(
                        "tls: the handshake code panicked on a peer's input; that connection fails"
                    );
                    Err(Failure::Handshake("internal_error"))
                })
            }
            Session::Established(e) => e.receive(input, plain, send).map(|peer_closed| Received {
                completed: None,
                peer_closed,
            }),
            Session::Failed => Ok(Received::default()),
        };
        if result.is_err() {
            *self = Session::Failed;
        }
        result
    }

    fn receive_handshake(
        &mut self,
        input: &[u8],
        plain: &mut Vec<u8>,
        send: &mut Vec<u8>,
    ) -> Result<Received, Failure> {
        let Session::Handshaking(hs) = self else {
            unreachable!("called while handshaking");
        };
        if hs.inbuf.is_empty() && looks_like_plain_http(input) {
            send.extend_from_slice(&plain_http_answer());
            return Err(Failure::PlainHttp);
        }
        if hs.inbuf.len() + input.len() > MAX_HANDSHAKE_BUFFER {
            return Err(Failure::HandshakeTooLarge);
        }
        hs.inbuf.extend_from_slice(input);
        let mut received = Received::default();
        let completed = loop {
            // Once the client's Finished is in, rustls only hands over what it still has to send (its
            // tickets, which it queues on that Finished, so the call that took it returns at once): the
            // records after it are for our record layer. rustls would act on a KeyUpdate there itself and
            // then hand over keys the client no longer matches, or fail a handshake message as `handshake`.
            let unread: &mut [u8] = match hs.conn.is_handshaking() {
                true => &mut hs.inbuf,
                false => &mut [],
            };
            let UnbufferedStatus { discard, state } = hs.conn.process_tls_records(unread);
            let step = match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode_into(send, |out| data.encode(out));
                    Step::Again
                }
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    // The bytes are in `send`: the reactor writes them once this call returns, in order.
                    data.done();
                    Step::Again
                }
                Ok(ConnectionState::ReadTraffic(mut data)) => {
                    // Application data inside the handshake: not from TLS 1.3 clients (no early data, and
                    // records after the Finished are not given to rustls), kept in order all the same.
                    while let Some(record) = data.next_record() {
                        match record {
                            Ok(record) => plain.extend_from_slice(record.payload),
                            Err(_) => break,
                        }
                    }
                    Step::Again
                }
                Ok(ConnectionState::BlockedHandshake) => Step::NeedInput,
                Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Step::PeerClosed,
                // Early data is never enabled (`max_early_data_size` is 0), so this is a protocol error.
                Ok(ConnectionState::ReadEarlyData(_)) => {
                    Step::Failed("early_data", Some(alert::UNEXPECTED_MESSAGE))
                }
                Ok(_) => Step::Failed("unsupported state", Some(alert::INTERNAL_ERROR)),
                Err(e) => Step::Failed(rustls_label(&e), fallback_alert(&e)),
            };
            hs.inbuf.drain(..discard);
            match step {
                Step::Again => continue,
                Step::NeedInput => break false,
                Step::Done => break true,
                Step::PeerClosed => {
                    received.peer_closed = true;
                    break false;
                }
                Step::Failed(label, fallback) => {
                    // rustls queued a fatal alert for most errors: the next call hands it over before
                    // reporting the error. It gets the unread bytes, never an empty slice: rustls remembers how
                    // far into the buffer a handshake message split over records reaches, and indexes the slice
                    // it is given by that (an empty one panicked on a fuzzed input with such a message, then a
                    // bad record).
                    let UnbufferedStatus { state, .. } = hs.conn.process_tls_records(&mut hs.inbuf);
                    let before = send.len();
                    if let Ok(ConnectionState::EncodeTlsData(mut data)) = state {
                        encode_into(send, |out| data.encode(out));
                    }
                    // Some errors (a handshake message over rustls's size limit, records interleaved with a
                    // split handshake message) end it without one. Until the server's hello the peer reads
                    // plaintext records, so the alert is ours to send; after it, it would need the handshake
                    // keys, and the connection just closes.
                    if let Some(description) = fallback.filter(|_| send.len() == before) {
                        if hs.conn.protocol_version().is_none() {
                            // A fatal alert as a plaintext record (legacy version 3.3, level 2 = fatal).
                            send.extend_from_slice(&[content::ALERT, 3, 3, 0, 2, 2, description]);
                        }
                    }
                    return Err(Failure::Handshake(label));
                }
            }
        };
        if !completed {
            if hs.inbuf.is_empty() {
                hs.inbuf = Vec::new();
            }
            return Ok(received);
        }
        let Session::Handshaking(hs) = std::mem::replace(self, Session::Failed) else {
            unreachable!("checked above");
        };
        let Handshake {
            conn,
            inbuf: mut rest,
            unsent,
        } = *hs;
        received.completed = Some(match conn.handshake_kind() {
            Some(HandshakeKind::Resumed) => Completed::Resumed,
            _ => Completed::Full,
        });
        let (secrets, _kernel) = conn
            .dangerous_into_kernel_connection()
            .map_err(|e| Failure::Handshake(rustls_label(&e)))?;
        let (Some(rx), Some(tx)) = (
            Keys::from_rustls(secrets.rx.0, &secrets.rx.1),
            Keys::from_rustls(secrets.tx.0, &secrets.tx.1),
        ) else {
            return Err(Failure::Handshake("unsupported cipher suite"));
        };
        let mut established = Established::from_keys(rx, tx);
        if !unsent.is_empty() {
            established.held = Some(Box::new(Held {
                unsent,
                ..Held::default()
            }));
        }
        // Records that followed the client's Finished in the same read.
        let peer_closed = established.receive(&mut rest, plain, send)?;
        received.peer_closed |= peer_closed;
        *self = Session::Established(established);
        Ok(received)
    }

    /// Writes an established session for a successor process (the live upgrade): its keys and what it holds
    /// (a partial inbound record, the unsent tail of a sealed one). Returns false, writing nothing, for a session
    /// that cannot move: one still in its handshake (rustls's state stays in this process; the connection is
    /// closed and the client reconnects), or one that failed.
    pub fn snapshot(&self, w: &mut crate::snapshot::Writer) -> bool {
        let Session::Established(e) = self else {
            return false;
        };
        e.rx.snapshot(w);
        e.tx.snapshot(w);
        let (partial, unsent) = e.held.as_ref().map_or((&[][..], &[][..]), |h| {
            (&h.partial[..], &h.unsent[h.unsent_at..])
        });
        w.bytes_field(partial);
        w.bytes_field(unsent);
        true
    }

    /// A session written by [`Session::snapshot`].
    pub fn restore(
        r: &mut crate::snapshot::Reader<'_>,
    ) -> Result<Session, crate::snapshot::SnapshotError> {
        let rx = Keys::restore(r)?;
        let tx = Keys::restore(r)?;
        let partial = r.bytes_field("tls partial record")?;
        let unsent = r.bytes_field("tls unsent record")?;
        let mut e = Established::from_keys(rx, tx);
        if !partial.is_empty() || !unsent.is_empty() {
            e.held = Some(Box::new(Held {
                partial: partial.to_vec(),
                unsent: unsent.to_vec(),
                unsent_at: 0,
            }));
        }
        Ok(Session::Established(e))
    }

    /// Keeps handshake bytes the socket did not take (the first `written` of `bytes` were taken).
    pub fn hold_unsent(&mut self, bytes: &[u8]) {
        match self {
            Session::Handshaking(h) => h.unsent.extend_from_slice(bytes),
            Session::Established(e) => {
                let held = e.held.get_or_insert_with(Box::default);
                held.unsent.drain(..held.unsent_at);
                held.unsent_at = 0;
                held.unsent.extend_from_slice(bytes);
            }
            Session::Failed => {}
        }
    }

    /// Appends a `close_notify` alert (RFC 8446 §6.1) to `send`, for an established session.
    pub fn close_notify(&mut self, send: &mut Vec<u8>) {
        if let Session::Established(e) = self {
            let _ =
                e.tx.seal(content::ALERT, &[&[1, alert::CLOSE_NOTIFY]], send);
        }
    }

    /// Writes what the session holds to `socket`; `Ok(true)` when nothing is left.
    pub fn flush_unsent<W: Write + ?Sized>(&mut self, socket: &mut W) -> io::Result<bool> {
        let pending = self.unsent();
        if pending.is_empty() {
            return Ok(true);
        }
        let written = crate::conn::transport::write_some(socket, pending)?;
        match self {
            Session::Handshaking(h) => {
                h.unsent.drain(..written);
                if h.unsent.is_empty() {
                    h.unsent = Vec::new();
                }
            }
            Session::Established(e) => {
                let held = e.held.as_mut().expect("unsent bytes imply held buffers");
                held.unsent_at += written;
                if held.unsent_at >= held.unsent.len() {
                    held.unsent = Vec::new();
                    held.unsent_at = 0;
                }
                if held.is_empty() {
                    e.held = None;
                }
            }
            Session::Failed => {}
        }
        Ok(self.unsent().is_empty())
    }
}

enum Step {
    Again,
    NeedInput,
    Done,
    PeerClosed,
    /// A metric label, and the alert to send if rustls sends none.
    Failed(&'static str, Option<u8>),
}

impl Established {
    /// Opens every complete record in `input` (joining a record left partial by the previous read); returns
    /// whether the peer sent `close_notify`. A record cut off at the end of `input` is kept for the next call.
    fn receive(
        &mut self,
        input: &mut [u8],
        plain: &mut Vec<u8>,
        send: &mut Vec<u8>,
    ) -> Result<bool, Failure> {
        let mut input = input;
        if let Some(held) = self.held.as_mut().filter(|h| !h.partial.is_empty()) {
            // Complete the held record from the front of the input first.
            let mut partial = std::mem::take(&mut held.partial);
            let used = complete_record(&mut partial, input).map_err(|e| self.fail(e, send))?;
            input = &mut input[used..];
            match record::record_len(&partial) {
                Ok(Some(_)) => {
                    if self.open_one(&mut partial, plain, send)? {
                        self.release_partial();
                        return Ok(true);
                    }
                }
                Ok(None) => {
                    // Still incomplete: all of the input went into it.
                    self.held.as_mut().expect("held").partial = partial;
                    return Ok(false);
                }
                Err(e) => return Err(self.fail(e, send)),
            }
        }
        self.release_partial();
        loop {
            match record::record_len(input) {
                Ok(Some(len)) => {
                    let (record, rest) = input.split_at_mut(len);
                    if self.open_one(record, plain, send)? {
                        return Ok(true);
                    }
                    input = rest;
                }
                Ok(None) => {
                    if !input.is_empty() {
                        let held = self.held.get_or_insert_with(Box::default);
                        held.partial
                            .reserve_exact(HEADER_LEN + record::MAX_CIPHERTEXT);
                        held.partial.extend_from_slice(input);
                    }
                    return Ok(false);
                }
                Err(e) => return Err(self.fail(e, send)),
            }
        }
    }

    fn release_partial(&mut self) {
        if let Some(held) = self.held.as_mut() {
            held.partial = Vec::new();
            if held.is_empty() {
                self.held = None;
            }
        }
    }

    /// Opens one record; returns true if it was the peer's `close_notify`.
    fn open_one(
        &mut self,
        record: &mut [u8],
        plain: &mut Vec<u8>,
        send: &mut Vec<u8>,
    ) -> Result<bool, Failure> {
        let (content_type, range) = self.rx.open(record).map_err(|e| self.fail(e, send))?;
        let body = &record[range];
        match content_type {
            content::APPLICATION_DATA => {
                plain.extend_from_slice(body);
                Ok(false)
            }
            content::ALERT => match body {
                // A warning close_notify: the peer is done sending (RFC 8446 §6.1).
                [_, alert::CLOSE_NOTIFY] => Ok(true),
                [_, description] => Err(Failure::PeerAlert(*description)),
                _ => Err(self.fail_with(alert::DECODE_ERROR, Failure::PeerAlert(0), send)),
            },
            content::HANDSHAKE => match body.first() {
                Some(&KEY_UPDATE) => {
                    Err(self.fail_with(alert::UNEXPECTED_MESSAGE, Failure::KeyUpdate, send))
                }
                _ => Err(self.fail_with(
                    alert::UNEXPECTED_MESSAGE,
                    Failure::UnexpectedHandshake,
                    send,
                )),
            },
            other => Err(self.fail(RecordError::UnexpectedType(other), send)),
        }
    }

    fn fail(&mut self, error: RecordError, send: &mut Vec<u8>) -> Failure {
        self.fail_with(error.alert(), Failure::Record(error), send)
    }

    /// Queues a fatal alert (RFC 8446 §6.2) and names the failure.
    fn fail_with(&mut self, description: u8, failure: Failure, send: &mut Vec<u8>) -> Failure {
        let _ = self.tx.seal(content::ALERT, &[&[2, description]], send);
        failure
    }
}

/// Moves bytes from `input` into `partial` until it holds one whole record (or all of `input`); returns how
/// many were taken.
fn complete_record(partial: &mut Vec<u8>, input: &[u8]) -> Result<usize, RecordError> {
    let mut used = 0;
    if partial.len() < HEADER_LEN {
        let take = (HEADER_LEN - partial.len()).min(input.len());
        partial.extend_from_slice(&input[..take]);
        used = take;
    }
    if partial.len() < HEADER_LEN {
        return Ok(used);
    }
    let body = u16::from_be_bytes([partial[3], partial[4]]) as usize;
    if body > record::MAX_CIPHERTEXT {
        return Err(RecordError::Overflow);
    }
    let missing = (HEADER_LEN + body).saturating_sub(partial.len());
    let take = missing.min(input.len() - used);
    partial.extend_from_slice(&input[used..used + take]);
    Ok(used + take)
}

/// Calls rustls's `encode` with room enough, growing `send` by exactly what it wrote.
fn encode_into(
    send: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) {
    let start = send.len();
    let mut room = 4096;
    loop {
        send.resize(start + room, 0);
        match encode(&mut send[start..]) {
            Ok(n) => {
                send.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(e)) => room = e.required_size,
            Err(_) => {
                send.truncate(start);
                return;
            }
        }
    }
}

/// The answer to a plain-HTTP request on the TLS port: a human with curl learns why, a browser never sees it.
pub fn plain_http_answer() -> Vec<u8> {
    const BODY: &str = "plain HTTP sent to the TLS port: use wss:// here\n";
    format!(
        "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
}

/// A request line starts with an upper-case method; a TLS record starts with content type 22 (handshake).
fn looks_like_plain_http(input: &[u8]) -> bool {
    input.first().is_some_and(|b| b.is_ascii_uppercase())
}

/// A short label for a rustls error (never the peer's bytes).
/// The alert for a handshake error rustls may return without queuing one; none for an alert from the peer.
fn fallback_alert(error: &rustls::Error) -> Option<u8> {
    use rustls::Error as E;
    match error {
        E::AlertReceived(_) => None,
        E::InvalidMessage(_) => Some(alert::DECODE_ERROR),
        E::PeerMisbehaved(_) => Some(alert::UNEXPECTED_MESSAGE),
        _ => Some(alert::INTERNAL_ERROR),
    }
}

fn rustls_label(error: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match error {
        E::InvalidMessage(_) => "invalid_message",
        E::PeerIncompatible(_) => "peer_incompatible",
        E::PeerMisbehaved(_) => "peer_misbehaved",
        E::AlertReceived(_) => "alert_received",
        E::NoCertificatesPresented | E::InvalidCertificate(_) => "certificate",
        E::DecryptError => "decrypt_error",
        E::HandshakeNotComplete => "handshake_not_complete",
        E::NoApplicationProtocol => "no_application_protocol",
        _ => "other",
    }
}

/// The transport of an established TLS connection: seals the machine's plaintext into records and writes
/// them, holding at most the unsent tail of one record.
pub struct TlsWire<'a, S: Socket> {
    /// The connection's socket (`&TcpStream` in the reactor).
    pub socket: S,
    /// Its session (writes fail until the handshake is done).
    pub session: &'a mut Session,
    /// A reactor-wide buffer records are sealed into.
    pub seal: &'a mut Vec<u8>,
}

impl<S: Socket> Write for TlsWire<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.flush_held()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let Session::Established(est) = &mut *self.session else {
            return Err(io::Error::other("TLS handshake not complete"));
        };
        // Gather up to one record's worth of plaintext from the front of `bufs`.
        let mut parts: [&[u8]; crate::conn::outbox::MAX_IOV] = [&[]; crate::conn::outbox::MAX_IOV];
        let mut count = 0;
        let mut taken = 0;
        for buf in bufs.iter().take(parts.len()) {
            if taken == MAX_PLAINTEXT {
                break;
            }
            let take = buf.len().min(MAX_PLAINTEXT - taken);
            parts[count] = &buf[..take];
            count += 1;
            taken += take;
        }
        if taken == 0 {
            return Ok(0);
        }
        self.seal.clear();
        est.tx
            .seal(content::APPLICATION_DATA, &parts[..count], self.seal)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let written = match crate::conn::transport::write_some(&mut self.socket, self.seal) {
            Ok(n) => n,
            // The record is sealed (its sequence number is spent): it must still go out, later.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if written < self.seal.len() {
            self.session.hold_unsent(&self.seal[written..]);
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Socket> Transport for TlsWire<'_, S> {
    fn holds_unsent(&self) -> bool {
        !self.session.unsent().is_empty()
    }

    fn progress(&self) -> Option<crate::conn::transport::TcpProgress> {
        self.socket.progress()
    }

    fn make_room(&mut self, bytes: usize) -> bool {
        // The plaintext goes out sealed: one record per MAX_PLAINTEXT bytes, each with its header, content
        // type and tag; behind the held tail of the record sealed last.
        let records = bytes.div_ceil(MAX_PLAINTEXT).max(1);
        let wire =
            bytes + records * (record::MAX_SEALED - MAX_PLAINTEXT) + self.session.unsent().len();
        self.socket.make_room(wire)
    }

    fn flush_held(&mut self) -> io::Result<bool> {
        if self.session.unsent().is_empty() {
            return Ok(true);
        }
        self.session.flush_unsent(&mut self.socket)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::write_pki;
    use super::super::Tls;
    use super::*;
    use crate::config::TlsConfig;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};
    use std::io::Read;

    struct Pair {
        _dir: tempfile::TempDir,
        tls: Tls,
        client_config: Arc<ClientConfig>,
    }

    fn pair() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_pki(dir.path(), 30);
        let tls = Tls::load(&TlsConfig {
            listen: None,
            cert_file: pki.cert_file.clone(),
            key_file: pki.key_file.clone(),
        })
        .unwrap();
        let mut roots = RootCertStore::empty();
        let ca = rustls_pemfile::certs(&mut pki.ca_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        roots.add(ca).unwrap();
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Pair {
            _dir: dir,
            tls,
            client_config: Arc::new(config),
        }
    }

    fn client(p: &Pair) -> ClientConnection {
        ClientConnection::new(
            p.client_config.clone(),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap()
    }

    /// What the server side saw while bytes flowed both ways until neither had anything to send.
    #[derive(Default)]
    struct Seen {
        plain: Vec<u8>,
        completed: Option<Completed>,
        peer_closed: bool,
    }

    /// Moves bytes both ways, feeding the server `chunk` bytes at a time, until quiet.
    fn pump(c: &mut ClientConnection, s: &mut Session, chunk: usize) -> Result<Seen, Failure> {
        let mut seen = Seen::default();
        for _ in 0..100 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let mut send = Vec::new();
            if wire.is_empty() && s.unsent().is_empty() {
                return Ok(seen);
            }
            for piece in wire.chunks_mut(chunk.max(1)) {
                let r = s.receive(piece, &mut seen.plain, &mut send)?;
                seen.completed = seen.completed.or(r.completed);
                seen.peer_closed |= r.peer_closed;
            }
            send.extend_from_slice(s.unsent());
            if let Session::Handshaking(h) = s {
                h.unsent.clear();
            }
            let mut reader = send.as_slice();
            while !reader.is_empty() {
                c.read_tls(&mut reader).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        panic!("no quiet after 100 rounds");
    }

    fn established(p: &Pair) -> (ClientConnection, Session) {
        let mut c = client(p);
        let mut s = p.tls.session().unwrap();
        let seen = pump(&mut c, &mut s, usize::MAX).unwrap();
        assert_eq!(seen.completed, Some(Completed::Full));
        assert!(s.is_established() && !c.is_handshaking());
        (c, s)
    }

    /// Server-to-client through the transport, then what the client can read.
    fn send_to_client(c: &mut ClientConnection, s: &mut Session, data: &[u8]) -> Vec<u8> {
        let mut socket = Vec::new();
        let mut seal = Vec::new();
        let mut wire = TlsWire {
            socket: &mut socket,
            session: s,
            seal: &mut seal,
        };
        crate::conn::transport::write_some(&mut wire, data).unwrap();
        read_client(c, &socket)
    }

    fn read_client(c: &mut ClientConnection, mut bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            c.read_tls(&mut bytes).unwrap();
            c.process_new_packets().unwrap();
            // Drain as we go: the client buffers at most 16 KiB of plaintext.
            let _ = c.reader().read_to_end(&mut out);
        }
        out
    }

    #[test]
    fn an_established_session_moved_mid_record_keeps_talking_to_the_client() {
        let p = pair();
        let (mut c, mut s) = established(&p);
        // Half a record from the client arrives before the move.
        c.writer()
            .write_all(b"half before, half after the move")
            .unwrap();
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut plain = Vec::new();
        s.receive(&mut wire[..10], &mut plain, &mut Vec::new())
            .unwrap();
        assert!(plain.is_empty());
        let mut w = crate::snapshot::Writer::new();
        assert!(s.snapshot(&mut w));
        let bytes = w.take();
        let mut moved = Session::restore(&mut crate::snapshot::Reader::new(&bytes)).unwrap();
        moved
            .receive(&mut wire[10..], &mut plain, &mut Vec::new())
            .unwrap();
        assert_eq!(plain, b"half before, half after the move");
        // And the new process's records are the client's next ones.
        assert_eq!(
            send_to_client(&mut c, &mut moved, b"from the new process"),
            b"from the new process"
        );
        // A session still in its handshake cannot move.
        assert!(!p
            .tls
            .session()
            .unwrap()
            .snapshot(&mut crate::snapshot::Writer::new()));
    }

    #[test]
    fn after_the_handshake_only_the_keys_remain() {
        let p = pair();
        let (mut c, mut s) = established(&p);
        assert_eq!(s.held_bytes(), 0, "no buffer while idle");
        assert!(
            std::mem::size_of::<Session>() <= 128,
            "{}",
            std::mem::size_of::<Session>()
        );
        c.writer().write_all(b"GET /ws HTTP/1.1\r\n\r\n").unwrap();
        let seen = pump(&mut c, &mut s, usize::MAX).unwrap();
        assert_eq!(seen.plain, b"GET /ws HTTP/1.1\r\n\r\n");
        assert_eq!(
            send_to_client(&mut c, &mut s, b"HTTP/1.1 101\r\n\r\n"),
            b"HTTP/1.1 101\r\n\r\n"
        );
    }

    #[test]
    fn a_second_connection_resumes_from_a_ticket() {
        let p = pair();
        let (mut first, mut s1) = established(&p);
        // The client stores the tickets it received after the handshake.
        let _ = send_to_client(&mut first, &mut s1, b"x");
        let mut c = client(&p);
        let mut s = p.tls.session().unwrap();
        let seen = pump(&mut c, &mut s, usize::MAX).unwrap();
        assert_eq!(seen.completed, Some(Completed::Resumed));
    }

    #[test]
    fn a_client_hello_split_byte_by_byte_completes() {
        let p = pair();
        let mut c = client(&p);
        let mut s = p.tls.session().unwrap();
        let seen = pump(&mut c, &mut s, 1).unwrap();
        assert_eq!(seen.completed, Some(Completed::Full));
    }

    #[test]
    fn records_split_at_any_point_are_reassembled() {
        let p = pair();
        let (mut c, mut s) = established(&p);
        let message: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        for chunk in [1, 2, 5, 6, 7, 100, 1000] {
            c.writer().write_all(&message).unwrap();
            let seen = pump(&mut c, &mut s, chunk).unwrap();
            assert_eq!(seen.plain, message, "chunk {chunk}");
            assert_eq!(s.held_bytes(), 0, "partial record released");
        }
    }

    #[test]
    fn close_notify_from_the_client_is_reported() {
        let p = pair();
        let (mut c, mut s) = established(&p);
        c.send_close_notify();
        assert!(pump(&mut c, &mut s, usize::MAX).unwrap().peer_closed);
    }

    #[test]
    fn a_key_update_closes_with_a_counted_reason() {
        let p = pair();
        let (mut c, mut s) = established(&p);
        c.refresh_traffic_keys().unwrap();
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut send = Vec::new();
        let e = s
            .receive(&mut wire, &mut Vec::new(), &mut send)
            .unwrap_err();
        assert_eq!(e, Failure::KeyUpdate);
        assert!(!send.is_empty(), "an alert is sent");
        // Once failed, nothing more is processed.
        assert_eq!(
            s.receive(&mut [1, 2, 3], &mut Vec::new(), &mut send),
            Ok(Received::default())
        );
    }

    #[test]
    fn a_key_update_in_the_same_read_as_the_clients_finished_is_refused_as_key_update() {
        let p = pair();
        let mut c = client(&p);
        let mut s = p.tls.session().unwrap();
        let mut hello = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut hello).unwrap();
        }
        let mut flight = Vec::new();
        s.receive(&mut hello, &mut Vec::new(), &mut flight).unwrap();
        c.read_tls(&mut flight.as_slice()).unwrap();
        c.process_new_packets().unwrap();
        assert!(!c.is_handshaking(), "the client's Finished is queued");
        c.refresh_traffic_keys().unwrap();
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let e = s
            .receive(&mut wire, &mut Vec::new(), &mut Vec::new())
            .unwrap_err();
        assert_eq!(e, Failure::KeyUpdate);
    }

    #[test]
    fn garbage_after_the_handshake_is_a_bad_record_mac_alert_the_client_understands() {
        let p = pair();
        let (mut c, mut s) = established(&p);
        let mut junk = vec![23, 3, 3, 0, 20];
        junk.extend([0xAB; 20]);
        let mut send = Vec::new();
        let e = s
            .receive(&mut junk, &mut Vec::new(), &mut send)
            .unwrap_err();
        assert_eq!(e, Failure::Record(RecordError::BadMac));
        let mut reader = send.as_slice();
        c.read_tls(&mut reader).unwrap();
        let err = c.process_new_packets().unwrap_err();
        assert!(err.to_string().contains("BadRecordMac"), "{err}");
    }

    #[test]
    fn an_oversized_record_is_refused_from_its_header() {
        let p = pair();
        let (_c, mut s) = established(&p);
        let mut header = vec![23, 3, 3, 0xFF, 0xFF];
        let e = s
            .receive(&mut header, &mut Vec::new(), &mut Vec::new())
            .unwrap_err();
        assert_eq!(e, Failure::Record(RecordError::Overflow));
    }

    #[test]
    fn plain_http_on_the_tls_port_gets_a_plain_400() {
        let p = pair();
        let mut s = p.tls.session().unwrap();
        let mut send = Vec::new();
        let e = s
            .receive(
                &mut b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                &mut Vec::new(),
                &mut send,
            )
            .unwrap_err();
        assert_eq!(e, Failure::PlainHttp);
        let text = String::from_utf8(send).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let length: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
    }

    #[test]
    fn a_garbled_client_hello_fails_with_an_alert() {
        let p = pair();
        let mut s = p.tls.session().unwrap();
        let mut send = Vec::new();
        let mut hello = vec![22, 3, 1, 0, 8, 1, 0, 0, 4, 9, 9, 9, 9];
        let e = s
            .receive(&mut hello, &mut Vec::new(), &mut send)
            .unwrap_err();
        assert!(matches!(e, Failure::Handshake(_)), "{e:?}");
        assert_eq!(send.first(), Some(&21), "a plaintext alert record");
    }

    #[test]
    fn a_never_ending_handshake_is_bounded() {
        let p = pair();
        let mut s = p.tls.session().unwrap();
        // A handshake record header announcing 16 KiB, then its body trickling in.
        let mut header = vec![22, 3, 1, 0x40, 0x00, 1];
        assert!(s
            .receive(&mut header, &mut Vec::new(), &mut Vec::new())
            .is_ok());
        let mut fed = 0;
        let result = loop {
            let mut more = vec![0u8; 4096];
            match s.receive(&mut more, &mut Vec::new(), &mut Vec::new()) {
                Ok(_) => fed += more.len(),
                Err(e) => break e,
            }
            assert!(fed <= 2 * MAX_HANDSHAKE_BUFFER, "never refused");
        };
        assert!(matches!(
            result,
            Failure::Handshake(_) | Failure::HandshakeTooLarge
        ));
    }

    #[test]
    fn a_handshake_message_split_over_records_then_a_bad_record_fails_with_an_alert() {
        // Found by arbitrary_handshake_bytes_never_panic: a 4-byte record starting a 64 KiB handshake
        // message, then a record of content type 0. rustls panicked when asked for its alert with an empty
        // buffer; the session now fails the handshake like any other bad input.
        let p = pair();
        let mut s = p.tls.session().unwrap();
        let mut input = vec![22, 3, 0, 0, 4, 0, 1, 0, 0];
        input.resize(86, 0);
        let mut send = Vec::new();
        let e = s
            .receive(&mut input, &mut Vec::new(), &mut send)
            .unwrap_err();
        assert!(
            matches!(e, Failure::Handshake(label) if label != "internal_error"),
            "{e:?}"
        );
        assert_eq!(
            send,
            [21, 3, 3, 0, 2, 2, 50],
            "a plaintext decode_error alert"
        );
    }

    #[test]
    fn a_slow_socket_holds_at_most_one_record_and_everything_arrives_in_order() {
        let p = pair();
        let (mut c, mut s) = established(&p);
        // A socket that takes 100 bytes, then blocks.
        let mut socket = crate::conn::transport::testing::MemWire::with_window(100);
        let mut seal = Vec::new();
        let message: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = TlsWire {
            socket: &mut socket,
            session: &mut s,
            seal: &mut seal,
        };
        let taken = crate::conn::transport::write_some(&mut wire, &message).unwrap();
        // One record was sealed and partly written; its tail is held; nothing else was taken.
        assert_eq!(taken, MAX_PLAINTEXT);
        assert!(wire.holds_unsent());
        assert!(wire.session.held_bytes() < 2 * record::MAX_SEALED);
        // The socket opens: the held tail goes first, then the rest.
        wire.socket.window = usize::MAX;
        assert!(wire.flush_held().unwrap());
        let rest = crate::conn::transport::write_some(&mut wire, &message[taken..]).unwrap();
        assert_eq!(taken + rest, message.len());
        assert_eq!(read_client(&mut c, &socket.written), message);
        assert_eq!(s.held_bytes(), 0);
    }

    #[test]
    fn making_room_asks_the_socket_for_the_held_tail_and_the_records_to_come() {
        let p = pair();
        let (_c, mut s) = established(&p);
        let mut socket = crate::conn::transport::testing::MemWire::with_window(100);
        let mut seal = Vec::new();
        let mut wire = TlsWire {
            socket: &mut socket,
            session: &mut s,
            seal: &mut seal,
        };
        let message = vec![1u8; 1000];
        crate::conn::transport::write_some(&mut wire, &message).unwrap();
        let held = wire.session.unsent().len();
        assert!(held > 0);
        assert!(!wire.make_room(50), "the socket refuses");
        wire.socket.room = usize::MAX;
        assert!(wire.make_room(50));
        assert_eq!(
            socket.room_asked,
            2 * (50 + (record::MAX_SEALED - MAX_PLAINTEXT) + held)
        );
    }

    mod fuzz {
        //! The record path under arbitrary input: never a panic, and valid records split anywhere decode.
        use super::super::*;
        use crate::tls::record::Suite;
        use proptest::prelude::*;

        fn pair() -> (Keys, Keys) {
            let k = Keys::new(Suite::Aes128Gcm, &[3u8; 16], [5u8; 12], 0);
            (k.clone(), k)
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..600), 0..8)) {
                let (_, rx) = pair();
                let (tx, _) = pair();
                let mut s = Session::Established(Established::from_keys(rx, tx));
                for mut chunk in chunks {
                    let _ = s.receive(&mut chunk, &mut Vec::new(), &mut Vec::new());
                }
            }

            #[test]
            fn arbitrary_handshake_bytes_never_panic(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..6)) {
                let dir = tempfile::tempdir().unwrap();
                let pki = crate::tls::testing::write_pki(dir.path(), 30);
                let tls = crate::tls::Tls::load(&crate::config::TlsConfig {
                    listen: None,
                    cert_file: pki.cert_file,
                    key_file: pki.key_file,
                }).unwrap();
                let mut s = tls.session().unwrap();
                for mut chunk in chunks {
                    // A TLS record type first, so the bytes reach rustls rather than the plain-HTTP check.
                    if let Some(b) = chunk.first_mut() { *b = 22; }
                    let _ = s.receive(&mut chunk, &mut Vec::new(), &mut Vec::new());
                }
            }

            #[test]
            fn valid_records_split_anywhere_decode(
                messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..3000), 1..5),
                cuts in prop::collection::vec(0usize..20_000, 0..10),
            ) {
                let (mut tx, rx) = pair();
                let mut wire = Vec::new();
                for m in &messages {
                    for part in m.chunks(MAX_PLAINTEXT).chain(std::iter::once(&[][..]).take(usize::from(m.is_empty()))) {
                        tx.seal(content::APPLICATION_DATA, &[part], &mut wire).unwrap();
                    }
                }
                let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
                cuts.push(wire.len());
                cuts.sort();
                let (tx2, _) = pair();
                let mut s = Session::Established(Established::from_keys(rx, tx2));
                let mut plain = Vec::new();
                let mut at = 0;
                for cut in cuts {
                    let mut piece = wire[at..cut].to_vec();
                    s.receive(&mut piece, &mut plain, &mut Vec::new()).unwrap();
                    at = cut;
                }
                prop_assert_eq!(plain, messages.concat());
                prop_assert_eq!(s.held_bytes(), 0);
            }
        }
    }
}
