//! The server side of the WebSocket opening handshake (RFC 6455 §4.2): parses and validates the client's
//! HTTP/1.1 Upgrade request from a byte buffer, and builds the `101` or error response bytes.
//!
//! Sans-IO: it never reads a socket. It does not decide who may connect — the caller applies
//! [`origin_allowed`] and the `auth` module to the returned [`Request`] — and it does not choose a
//! subprotocol; it only reports the raw `Sec-WebSocket-Protocol` value and echoes the caller's choice.

use std::io::Write as _;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::{Digest, Sha1};

use crate::proto::http;

/// The GUID appended to the client key before hashing (RFC 6455 §1.3, §4.2.2 item 5.4).
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only protocol version this server speaks (RFC 6455 §4.2.1 item 6, §4.4).
const WEBSOCKET_VERSION: &str = "13";

/// Header slots kept on the stack; larger `max_headers` limits fall back to a short-lived `Vec`.
const STACK_HEADER_SLOTS: usize = 32;

/// Bounds on what a client may send before the handshake is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Largest request head in bytes, request line and final CRLF CRLF included.
    pub max_head_bytes: usize,
    /// Most header fields accepted; one more is answered with 431.
    pub max_headers: usize,
    /// The only request path served, compared byte for byte without the query (e.g. `"/ws"`).
    pub path: String,
    /// The Server-Sent Events path on the same listeners (e.g. `"/sse"`), when SSE is on.
    pub sse_path: Option<String>,
}

/// What a request asks for: a WebSocket upgrade, or a Server-Sent Events stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `GET /ws` with the RFC 6455 upgrade headers.
    WebSocket,
    /// `GET /sse`: a `text/event-stream` response that stays open (WHATWG HTML §9.2).
    Sse,
}

/// A validated Upgrade request. Every field borrows from the buffer given to [`parse_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Path of the request target, without the query.
    pub path: &'a str,
    /// Raw query string after `?`, still percent-encoded; `""` when there is none.
    pub query: &'a str,
    /// `Sec-WebSocket-Key`, already checked to decode to 16 bytes.
    pub key: &'a str,
    /// `Origin`, sent by browsers (RFC 6455 §4.1 item 8, §10.2); `None` for most non-browser clients.
    pub origin: Option<&'a str>,
    /// Raw `Authorization` value.
    pub authorization: Option<&'a str>,
    /// Raw `Sec-WebSocket-Protocol` value (a comma list, RFC 6455 §4.1 item 10).
    pub protocols: Option<&'a str>,
    /// Raw `Sec-WebSocket-Extensions` value (RFC 6455 §9.1); `None` when absent or sent on several lines (then
    /// no extension is negotiated: the offers would have to be merged in order, and browsers send one line).
    pub extensions: Option<&'a str>,
    /// Raw `Last-Event-ID` (an SSE client reconnecting, WHATWG HTML §9.2.4).
    pub last_event_id: Option<&'a str>,
    /// WebSocket upgrade or SSE stream.
    pub kind: Kind,
}

/// Why a handshake is refused; each variant is one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// 400: the request is not a well-formed WebSocket handshake (RFC 6455 §4.2.1, RFC 9112).
    #[error("400 Bad Request: {0}")]
    BadRequest(&'static str),
    /// 401: missing or invalid credentials (RFC 9110 §15.5.2).
    #[error("401 Unauthorized: {0}")]
    Unauthorized(&'static str),
    /// 403: the Origin is not on the allow-list (RFC 6455 §4.2.2, §10.2).
    #[error("403 Forbidden: {0}")]
    Forbidden(&'static str),
    /// 404: the request path is not the WebSocket endpoint.
    #[error("404 Not Found")]
    NotFound,
    /// 431: the head is larger than `max_head_bytes` or has more than `max_headers` fields (RFC 6585 §5).
    #[error("431 Request Header Fields Too Large")]
    HeadTooLarge,
    /// 426: `Sec-WebSocket-Version` is missing or not 13 (RFC 6455 §4.2.2, §4.4).
    #[error("426 Upgrade Required")]
    UpgradeRequired,
    /// 503: the server sheds this connection (capacity, draining).
    #[error("503 Service Unavailable: {0}")]
    Unavailable(&'static str),
}

impl Reject {
    /// HTTP status code of the response.
    pub fn status(&self) -> u16 {
        match self {
            Reject::BadRequest(_) => 400,
            Reject::Unauthorized(_) => 401,
            Reject::Forbidden(_) => 403,
            Reject::NotFound => 404,
            Reject::UpgradeRequired => 426,
            Reject::HeadTooLarge => 431,
            Reject::Unavailable(_) => 503,
        }
    }

    /// One-line human-readable reason, used as the response body. Never contains client input.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::BadRequest(r)
            | Reject::Unauthorized(r)
            | Reject::Forbidden(r)
            | Reject::Unavailable(r) => r,
            Reject::NotFound => "not found",
            Reject::UpgradeRequired => "WebSocket version 13 required",
            Reject::HeadTooLarge => "request head too large",
        }
    }

    /// Standard reason phrase for the status line.
    fn status_phrase(&self) -> &'static str {
        match self {
            Reject::BadRequest(_) => "Bad Request",
            Reject::Unauthorized(_) => "Unauthorized",
            Reject::Forbidden(_) => "Forbidden",
            Reject::NotFound => "Not Found",
            Reject::UpgradeRequired => "Upgrade Required",
            Reject::HeadTooLarge => "Request Header Fields Too Large",
            Reject::Unavailable(_) => "Service Unavailable",
        }
    }

    /// Short stable snake_case label for metrics. `Forbidden` is only used for the Origin check, hence
    /// `"origin"`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Reject::BadRequest(_) => "bad_request",
            Reject::Unauthorized(_) => "unauthorized",
            Reject::Forbidden(_) => "origin",
            Reject::NotFound => "not_found",
            Reject::UpgradeRequired => "upgrade_required",
            Reject::HeadTooLarge => "head_too_large",
            Reject::Unavailable(_) => "unavailable",
        }
    }

    /// The complete HTTP/1.1 response: status line, headers, and a one-line `text/plain` body.
    /// The connection is always closed after it.
    pub fn response(&self) -> Vec<u8> {
        let reason = self.reason();
        debug_assert!(!reason.contains(['\r', '\n']), "reason must be one line");
        let mut out = Vec::with_capacity(192 + reason.len());
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\n",
            self.status(),
            self.status_phrase()
        );
        match self {
            // RFC 9110 §7.8: a server sending Upgrade must also list "upgrade" in Connection.
            Reject::UpgradeRequired => out.extend_from_slice(b"Connection: upgrade, close\r\n"),
            _ => out.extend_from_slice(b"Connection: close\r\n"),
        }
        match self {
            // RFC 9110 §15.5.2: a 401 must carry a challenge; RFC 6750 §3 defines Bearer's.
            Reject::Unauthorized(_) => out.extend_from_slice(b"WWW-Authenticate: Bearer\r\n"),
            // RFC 9110 §15.5.22: a 426 must name the protocol in Upgrade; RFC 6455 §4.4: and the
            // versions the server supports.
            Reject::UpgradeRequired => {
                out.extend_from_slice(b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n")
            }
            _ => {}
        }
        let _ = write!(
            out,
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{}\n",
            reason.len() + 1,
            reason
        );
        out
    }
}

/// Parses the client's opening handshake from the start of `buf` (RFC 6455 §4.2.1).
///
/// * `Ok(None)`: the head is not complete yet; read more and call again with the grown buffer.
/// * `Ok(Some((request, head_len)))`: `buf[head_len..]` is not part of the head (frames the client
///   pipelined behind it). `head_len <= limits.max_head_bytes`.
/// * `Err(reject)`: answer with [`Reject::response`] and close.
///
/// Checks run so that the most specific status wins: 431/400 for a malformed head, then 404 for the
/// path, then 426 for the version, then 400 for the missing Upgrade/Connection tokens or bad key.
pub fn parse_request<'a>(
    buf: &'a [u8],
    limits: &HandshakeLimits,
) -> Result<Option<(Request<'a>, usize)>, Reject> {
    // Only the first max_head_bytes can belong to an acceptable head: a head completing past that is
    // as too large as one that never completes.
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    let parsed = if limits.max_headers <= STACK_HEADER_SLOTS {
        let mut slots = [httparse::EMPTY_HEADER; STACK_HEADER_SLOTS];
        parse_head(window, &mut slots[..limits.max_headers])?
    } else {
        let mut slots = vec![httparse::EMPTY_HEADER; limits.max_headers];
        parse_head(window, &mut slots)?
    };
    match parsed {
        Some(head) => {
            debug_assert!(head.1 <= window.len());
            validate(head.0, limits).map(|req| Some((req, head.1)))
        }
        None if buf.len() >= limits.max_head_bytes => Err(Reject::HeadTooLarge),
        None => Ok(None),
    }
}

/// The handshake's header fields, borrowed from the buffer, before semantic checks.
struct RawHead<'a> {
    method: &'a str,
    target: &'a str,
    minor_version: u8,
    host_seen: bool,
    upgrade_websocket: bool,
    connection_upgrade: bool,
    key: Option<&'a str>,
    version: Option<&'a str>,
    origin: Option<&'a str>,
    authorization: Option<&'a str>,
    protocols: Option<&'a str>,
    extensions: Option<&'a str>,
    extension_lines: u8,
    last_event_id: Option<&'a str>,
}

/// Runs httparse and collects the fields we care about. Errors here are all "malformed" (400/431).
fn parse_head<'a>(
    window: &'a [u8],
    slots: &mut [httparse::Header<'a>],
) -> Result<Option<(RawHead<'a>, usize)>, Reject> {
    let mut req = httparse::Request::new(slots);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::HeadTooLarge),
        Err(_) => return Err(Reject::BadRequest("malformed HTTP request")),
    };
    // httparse guarantees all three on Complete; stay panic-free regardless.
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(Reject::BadRequest("malformed HTTP request"));
    };
    let mut head = RawHead {
        method,
        target,
        minor_version,
        host_seen: false,
        upgrade_websocket: false,
        connection_upgrade: false,
        key: None,
        version: None,
        origin: None,
        authorization: None,
        protocols: None,
        extensions: None,
        extension_lines: 0,
        last_event_id: None,
    };
    for header in req.headers.iter() {
        // Field names are case-insensitive (RFC 9110 §5.1).
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            // RFC 9112 §3.2: more than one Host field line must be answered with 400.
            if std::mem::replace(&mut head.host_seen, true) {
                return Err(Reject::BadRequest("duplicate Host header"));
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            // List-valued: may repeat (RFC 9110 §5.3); any line naming websocket will do.
            let value = field_str(header.value, "invalid Upgrade header")?;
            head.upgrade_websocket |= http::has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            let value = field_str(header.value, "invalid Connection header")?;
            head.connection_upgrade |= http::has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            // RFC 6455 §11.3.1: must not appear more than once.
            set_once(
                &mut head.key,
                header.value,
                "duplicate Sec-WebSocket-Key header",
                "invalid Sec-WebSocket-Key header",
            )?;
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            // RFC 6455 §11.3.5: the client's version header must not appear more than once.
            set_once(
                &mut head.version,
                header.value,
                "duplicate Sec-WebSocket-Version header",
                "invalid Sec-WebSocket-Version header",
            )?;
        } else if name.eq_ignore_ascii_case("origin") {
            // Two Origins would let a client pick which one the allow-list sees (RFC 6454 §7.3).
            set_once(
                &mut head.origin,
                header.value,
                "duplicate Origin header",
                "invalid Origin header",
            )?;
        } else if name.eq_ignore_ascii_case("authorization") {
            // Singleton: two credentials are ambiguous.
            set_once(
                &mut head.authorization,
                header.value,
                "duplicate Authorization header",
                "invalid Authorization header",
            )?;
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            // RFC 6455 §11.3.4 allows several lines, but the API hands over one raw value and browsers
            // send a single line; refuse rather than silently drop offered protocols.
            set_once(
                &mut head.protocols,
                header.value,
                "repeated Sec-WebSocket-Protocol header",
                "invalid Sec-WebSocket-Protocol header",
            )?;
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            head.extension_lines = head.extension_lines.saturating_add(1);
            head.extensions = Some(field_str(
                header.value,
                "invalid Sec-WebSocket-Extensions header",
            )?);
        } else if name.eq_ignore_ascii_case("last-event-id") {
            set_once(
                &mut head.last_event_id,
                header.value,
                "duplicate Last-Event-ID header",
                "invalid Last-Event-ID header",
            )?;
        }
    }
    Ok(Some((head, head_len)))
}

/// Semantic checks on a complete head, in the order documented on [`parse_request`].
fn validate<'a>(head: RawHead<'a>, limits: &HandshakeLimits) -> Result<Request<'a>, Reject> {
    // RFC 6455 §4.2.1 item 1: the method must be GET. (405 would need an Allow header and is not what
    // §4.2.1 asks for: a request that is not a valid handshake gets 400.)
    if head.method != "GET" {
        return Err(Reject::BadRequest("method must be GET"));
    }
    // RFC 6455 §4.2.1 item 1: HTTP/1.1 or higher. httparse only reads HTTP/1.x, so minor 0 is 1.0.
    if head.minor_version < 1 {
        return Err(Reject::BadRequest("HTTP/1.1 required"));
    }
    // RFC 9112 §3.2: a request lacking Host must be answered with 400; RFC 6455 §4.2.1 item 2.
    if !head.host_seen {
        return Err(Reject::BadRequest("missing Host header"));
    }
    // RFC 9112 §3.2.1, §3.2.2: origin-form, or absolute-form which a server must accept; anything else is 400.
    let (path, query) = http::split_target(head.target)
        .map_err(|_| Reject::BadRequest("unsupported request target"))?;
    // An SSE stream is a plain GET (WHATWG HTML §9.2): none of the upgrade headers apply.
    if limits.sse_path.as_deref() == Some(path) {
        return Ok(Request {
            path,
            query,
            key: "",
            origin: head.origin,
            authorization: head.authorization,
            protocols: None,
            extensions: None,
            last_event_id: head.last_event_id,
            kind: Kind::Sse,
        });
    }
    // RFC 6455 §4.2.1 item 1 / §3: the resource name must be one the server serves.
    if path != limits.path {
        return Err(Reject::NotFound);
    }
    // RFC 6455 §4.2.2 / §4.4: an unsupported or absent version gets 426 with our version listed.
    if head.version != Some(WEBSOCKET_VERSION) {
        return Err(Reject::UpgradeRequired);
    }
    // RFC 6455 §4.2.1 item 3: Upgrade must include the "websocket" keyword.
    if !head.upgrade_websocket {
        return Err(Reject::BadRequest("Upgrade header must include websocket"));
    }
    // RFC 6455 §4.2.1 item 4: Connection must include the "Upgrade" token.
    if !head.connection_upgrade {
        return Err(Reject::BadRequest("Connection header must include upgrade"));
    }
    // RFC 6455 §4.2.1 item 5: Sec-WebSocket-Key must base64-decode to exactly 16 bytes.
    let key = head
        .key
        .ok_or(Reject::BadRequest("missing Sec-WebSocket-Key header"))?;
    if !key_is_valid(key) {
        return Err(Reject::BadRequest(
            "Sec-WebSocket-Key must be 16 base64 bytes",
        ));
    }
    Ok(Request {
        path,
        query,
        key,
        origin: head.origin,
        authorization: head.authorization,
        protocols: head.protocols,
        extensions: head.extensions.filter(|_| head.extension_lines == 1),
        last_event_id: None,
        kind: Kind::WebSocket,
    })
}

/// Field value as trimmed text. Values we act on must be visible ASCII in practice; non-UTF-8 is 400.
fn field_str<'a>(value: &'a [u8], invalid: &'static str) -> Result<&'a str, Reject> {
    std::str::from_utf8(value)
        .map(http::trim_ows)
        .map_err(|_| Reject::BadRequest(invalid))
}

/// Stores a singleton field value, refusing a second occurrence.
fn set_once<'a>(
    slot: &mut Option<&'a str>,
    value: &'a [u8],
    duplicate: &'static str,
    invalid: &'static str,
) -> Result<(), Reject> {
    if slot.is_some() {
        return Err(Reject::BadRequest(duplicate));
    }
    *slot = Some(field_str(value, invalid)?);
    Ok(())
}

fn key_is_valid(key: &str) -> bool {
    // 16 bytes encode to exactly 24 base64 characters; checking the length first bounds the decode.
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(STANDARD.decode_slice(key, &mut decoded), Ok(16))
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key + GUID)) (RFC 6455 §4.2.2 item 5.4).
pub fn accept_key(key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(WEBSOCKET_GUID.as_bytes());
    STANDARD.encode(sha1.finalize())
}

/// The `101 Switching Protocols` response completing the handshake (RFC 6455 §4.2.2 item 5).
///
/// `protocol` must be one of the client's offered subprotocols (§4.2.2 item 5.3), chosen by the
/// caller; it must be an HTTP token. A value that is not a token is left out rather than written
/// (it would otherwise allow header injection).
pub fn accept_response(key: &str, protocol: Option<&str>, deflate: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(protocol) = protocol {
        debug_assert!(
            http::is_token(protocol),
            "subprotocol must be an HTTP token"
        );
        if http::is_token(protocol) {
            out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
            out.extend_from_slice(protocol.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if deflate {
        out.extend_from_slice(b"Sec-WebSocket-Extensions: ");
        out.extend_from_slice(DEFLATE_RESPONSE.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The one permessage-deflate answer densepush gives (RFC 7692 §7.1): neither side keeps its LZ77 window
/// between messages, so every message is compressed once for all its recipients and every client message is
/// inflated by one inflater the whole reactor shares. §7.1.1.1 and §7.1.1.2 let the server add both parameters
/// even when the offer lacks them; the windows stay at the 15-bit default, so `*_max_window_bits` are left out.
pub const DEFLATE_RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Whether to accept permessage-deflate (RFC 7692) given the client's `Sec-WebSocket-Extensions` offers: true
/// when some `permessage-deflate` offer can be honoured exactly with [`DEFLATE_RESPONSE`]. An offer is declined
/// (RFC 7692 §5: the server then negotiates no extension from it) when it
/// - names a parameter RFC 7692 does not define, or one twice (§7.1: "MUST decline");
/// - gives `server_no_context_takeover` or `client_no_context_takeover` a value (§7.1.1.1, §7.1.1.2);
/// - asks for `server_max_window_bits` below 15 (§7.1.2.1): every recipient shares one compressed frame built
///   with a 15-bit window, so a smaller window cannot be honoured without compressing again for that client;
/// - gives `server_max_window_bits` or `client_max_window_bits` a value outside 8..=15 (§7.1.2).
///
/// `client_max_window_bits` with or without a value is accepted and not answered: our inflater takes any window
/// up to 15 bits (§7.1.2.2: the server need not include it). Chrome offers
/// `permessage-deflate; client_max_window_bits`, Firefox a bare `permessage-deflate`; both are accepted.
pub fn negotiate_deflate(offers: &str) -> bool {
    http::list_items(offers).any(deflate_offer_acceptable)
}

/// One comma-separated item of `Sec-WebSocket-Extensions`: an extension name and its `;` parameters.
fn deflate_offer_acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(http::trim_ows);
    if !parts
        .next()
        .is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate"))
    {
        return false;
    }
    let mut seen = 0u8;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (http::trim_ows(n), Some(unquote(http::trim_ows(v)))),
            None => (param, None),
        };
        let bit = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 1,
            "client_no_context_takeover" if value.is_none() => 2,
            "server_max_window_bits" => match value.and_then(window_bits) {
                Some(15) => 4,
                _ => return false,
            },
            "client_max_window_bits" => match value {
                None => 8,
                Some(v) if window_bits(v).is_some() => 8,
                Some(_) => return false,
            },
            _ => return false,
        };
        if seen & bit != 0 {
            return false;
        }
        seen |= bit;
    }
    true
}

/// A window size parameter (RFC 7692 §7.1.2: a decimal 8 to 15, no leading zeros).
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.len() > 2 || value.starts_with('0') {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// An extension parameter's value with its quotes removed (RFC 6455 §9.1 allows a quoted-string).
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// Origin allow-list check (RFC 6455 §4.2.2, §10.2). An empty list allows every origin; otherwise the
/// origin must equal an entry, ASCII case-insensitively (RFC 6454 §6.1 serialises host and scheme in
/// lower case, but clients and configs vary). A request without `Origin` comes from a non-browser
/// client, which could forge any Origin anyway, so it is allowed.
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    match origin {
        None => true,
        Some(_) if allowed.is_empty() => true,
        Some(origin) => allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn limits() -> HandshakeLimits {
        HandshakeLimits {
            max_head_bytes: 4096,
            max_headers: 16,
            path: "/ws".to_string(),
            sse_path: Some("/sse".to_string()),
        }
    }

    fn good_head() -> String {
        format!(
            "GET /ws?token=abc HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
             Origin: https://app.example.com\r\n\r\n"
        )
    }

    /// A good head with the header line starting with `name:` replaced by `line` (or removed if empty).
    fn head_with(name: &str, line: &str) -> String {
        let mut out = String::new();
        for l in good_head().split_inclusive("\r\n") {
            if l.to_ascii_lowercase()
                .starts_with(&format!("{}:", name.to_ascii_lowercase()))
            {
                if !line.is_empty() {
                    out.push_str(line);
                    out.push_str("\r\n");
                }
            } else {
                out.push_str(l);
            }
        }
        out
    }

    fn parse(head: &str) -> Result<Option<(Request<'_>, usize)>, Reject> {
        parse_request(head.as_bytes(), &limits())
    }

    fn reject(head: &str) -> Reject {
        match parse(head) {
            Err(r) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn good_request_is_accepted_with_all_fields() {
        let head = head_with("Origin", "Origin: https://app.example.com\r\nAuthorization: Bearer t\r\nSec-WebSocket-Protocol: a, b");
        let (req, len) = parse(&head).unwrap().unwrap();
        assert_eq!(len, head.len());
        assert_eq!(req.path, "/ws");
        assert_eq!(req.query, "token=abc");
        assert_eq!(req.key, KEY);
        assert_eq!(req.origin, Some("https://app.example.com"));
        assert_eq!(req.authorization, Some("Bearer t"));
        assert_eq!(req.protocols, Some("a, b"));
    }

    #[test]
    fn optional_headers_absent_are_none() {
        let head = head_with("Origin", "");
        let (req, _) = parse(&head).unwrap().unwrap();
        assert_eq!(req.origin, None);
        assert_eq!(req.authorization, None);
        assert_eq!(req.protocols, None);
    }

    #[test]
    fn path_without_query_has_empty_query() {
        let head = good_head().replace("/ws?token=abc", "/ws");
        let (req, _) = parse(&head).unwrap().unwrap();
        assert_eq!(req.path, "/ws");
        assert_eq!(req.query, "");
    }

    #[test]
    fn absolute_form_target_is_accepted() {
        let head = good_head().replace("/ws?token=abc", "http://example.com/ws?token=abc");
        let (req, _) = parse(&head).unwrap().unwrap();
        assert_eq!((req.path, req.query), ("/ws", "token=abc"));
    }

    #[test]
    fn asterisk_target_is_bad_request() {
        let head = good_head().replace("/ws?token=abc", "*");
        assert_eq!(
            reject(&head),
            Reject::BadRequest("unsupported request target")
        );
    }

    #[test]
    fn empty_buffer_is_incomplete() {
        assert_eq!(parse(""), Ok(None));
    }

    #[test]
    fn tiny_partial_heads_are_incomplete() {
        for partial in [
            "G",
            "GET",
            "GET /ws HTTP/1.1\r\n",
            "GET /ws HTTP/1.1\r\nHost: a\r\n\r",
        ] {
            assert_eq!(parse(partial), Ok(None), "{partial:?}");
        }
    }

    #[test]
    fn head_fed_one_byte_at_a_time_completes_only_at_the_end() {
        let head = good_head();
        for i in 0..head.len() {
            assert_eq!(parse(&head[..i]), Ok(None), "prefix of {i} bytes");
        }
        assert!(parse(&head).unwrap().is_some());
    }

    #[test]
    fn pipelined_bytes_after_head_are_not_consumed() {
        let head = good_head();
        let mut buf = head.clone().into_bytes();
        buf.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4, 5]);
        let (_, len) = parse_request(&buf, &limits()).unwrap().unwrap();
        assert_eq!(len, head.len());
        assert_eq!(&buf[len..], &[0x81, 0x85, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn header_names_and_tokens_are_case_insensitive() {
        let head = format!(
            "GET /ws HTTP/1.1\r\nhOsT: a\r\nUPGRADE: WebSocket\r\nconnection: keep-alive, UPGRADE\r\n\
             SEC-WEBSOCKET-KEY: {KEY}\r\nsec-websocket-version: 13\r\nORIGIN: x\r\n\r\n"
        );
        let (req, _) = parse(&head).unwrap().unwrap();
        assert_eq!(req.key, KEY);
        assert_eq!(req.origin, Some("x"));
    }

    #[test]
    fn upgrade_token_found_in_comma_list() {
        let head = head_with("Upgrade", "Upgrade: h2c , websocket");
        assert!(parse(&head).unwrap().is_some());
    }

    #[test]
    fn connection_token_found_on_second_field_line() {
        let head = head_with(
            "Connection",
            "Connection: keep-alive\r\nConnection: upgrade",
        );
        assert!(parse(&head).unwrap().is_some());
    }

    #[test]
    fn upgrade_token_must_match_whole_token() {
        let head = head_with("Upgrade", "Upgrade: websocketx");
        assert_eq!(
            reject(&head),
            Reject::BadRequest("Upgrade header must include websocket")
        );
    }

    #[test]
    fn post_is_bad_request() {
        let head = good_head().replacen("GET", "POST", 1);
        assert_eq!(reject(&head), Reject::BadRequest("method must be GET"));
    }

    #[test]
    fn lowercase_get_is_bad_request() {
        // Methods are case-sensitive (RFC 9110 §9.1).
        let head = good_head().replacen("GET", "get", 1);
        assert_eq!(reject(&head), Reject::BadRequest("method must be GET"));
    }

    #[test]
    fn http_1_0_is_bad_request() {
        let head = good_head().replacen("HTTP/1.1", "HTTP/1.0", 1);
        assert_eq!(reject(&head), Reject::BadRequest("HTTP/1.1 required"));
    }

    #[test]
    fn garbage_request_line_is_bad_request() {
        assert_eq!(
            reject("GET /ws HTTP/9.9\r\n\r\n"),
            Reject::BadRequest("malformed HTTP request")
        );
        assert_eq!(reject("\x01\x02\r\n\r\n").status(), 400);
    }

    #[test]
    fn missing_host_is_bad_request() {
        let head = head_with("Host", "");
        assert_eq!(reject(&head), Reject::BadRequest("missing Host header"));
    }

    #[test]
    fn duplicate_host_is_bad_request() {
        let head = head_with("Host", "Host: a\r\nHost: b");
        assert_eq!(reject(&head), Reject::BadRequest("duplicate Host header"));
    }

    #[test]
    fn wrong_path_is_not_found() {
        let head = good_head().replace("/ws?", "/other?");
        assert_eq!(reject(&head), Reject::NotFound);
    }

    #[test]
    fn path_with_trailing_slash_is_not_found() {
        let head = good_head().replace("/ws?", "/ws/?");
        assert_eq!(reject(&head), Reject::NotFound);
    }

    #[test]
    fn missing_version_is_upgrade_required() {
        let head = head_with("Sec-WebSocket-Version", "");
        assert_eq!(reject(&head), Reject::UpgradeRequired);
    }

    #[test]
    fn version_8_is_upgrade_required() {
        let head = head_with("Sec-WebSocket-Version", "Sec-WebSocket-Version: 8");
        assert_eq!(reject(&head), Reject::UpgradeRequired);
    }

    #[test]
    fn missing_upgrade_is_bad_request() {
        let head = head_with("Upgrade", "");
        assert_eq!(
            reject(&head),
            Reject::BadRequest("Upgrade header must include websocket")
        );
    }

    #[test]
    fn missing_connection_upgrade_is_bad_request() {
        let head = head_with("Connection", "Connection: keep-alive");
        assert_eq!(
            reject(&head),
            Reject::BadRequest("Connection header must include upgrade")
        );
    }

    #[test]
    fn missing_key_is_bad_request() {
        let head = head_with("Sec-WebSocket-Key", "");
        assert_eq!(
            reject(&head),
            Reject::BadRequest("missing Sec-WebSocket-Key header")
        );
    }

    #[test]
    fn key_decoding_to_15_bytes_is_bad_request() {
        // 15 bytes -> 20 base64 chars.
        let head = head_with(
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA",
        );
        assert_eq!(
            reject(&head),
            Reject::BadRequest("Sec-WebSocket-Key must be 16 base64 bytes")
        );
    }

    #[test]
    fn key_decoding_to_17_bytes_is_bad_request() {
        let head = head_with(
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA=",
        );
        // 23 significant chars + '=' is 17 bytes: length is 24 but the decoded length is wrong.
        assert_eq!(reject(&head).status(), 400);
    }

    #[test]
    fn key_that_is_not_base64_is_bad_request() {
        let head = head_with(
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==",
        );
        assert_eq!(reject(&head).status(), 400);
    }

    #[test]
    fn duplicate_key_is_bad_request() {
        let head = head_with(
            "Sec-WebSocket-Key",
            &format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}"),
        );
        assert_eq!(
            reject(&head),
            Reject::BadRequest("duplicate Sec-WebSocket-Key header")
        );
    }

    #[test]
    fn duplicate_origin_is_bad_request() {
        let head = head_with("Origin", "Origin: https://a\r\nOrigin: https://b");
        assert_eq!(reject(&head), Reject::BadRequest("duplicate Origin header"));
    }

    #[test]
    fn malformed_wins_over_wrong_path() {
        let head = head_with("Host", "").replace("/ws?", "/nope?");
        assert_eq!(reject(&head), Reject::BadRequest("missing Host header"));
    }

    #[test]
    fn wrong_path_wins_over_missing_version() {
        let head = head_with("Sec-WebSocket-Version", "").replace("/ws?", "/nope?");
        assert_eq!(reject(&head), Reject::NotFound);
    }

    #[test]
    fn missing_version_wins_over_missing_key_and_upgrade() {
        let head = head_with("Sec-WebSocket-Version", "");
        let head = head_with_removed(&head, &["Upgrade", "Sec-WebSocket-Key"]);
        assert_eq!(reject(&head), Reject::UpgradeRequired);
    }

    fn head_with_removed(head: &str, names: &[&str]) -> String {
        head.split_inclusive("\r\n")
            .filter(|l| {
                !names.iter().any(|n| {
                    l.to_ascii_lowercase()
                        .starts_with(&format!("{}:", n.to_ascii_lowercase()))
                })
            })
            .collect()
    }

    #[test]
    fn incomplete_head_at_size_limit_is_too_large() {
        let lim = HandshakeLimits {
            max_head_bytes: 64,
            ..limits()
        };
        let mut partial = b"GET /ws HTTP/1.1\r\nX: ".to_vec();
        partial.resize(64, b'a');
        assert_eq!(parse_request(&partial, &lim), Err(Reject::HeadTooLarge));
        assert_eq!(parse_request(&partial[..63], &lim), Ok(None));
    }

    #[test]
    fn complete_head_longer_than_limit_is_too_large() {
        let head = good_head();
        let lim = HandshakeLimits {
            max_head_bytes: head.len() - 1,
            ..limits()
        };
        assert_eq!(
            parse_request(head.as_bytes(), &lim),
            Err(Reject::HeadTooLarge)
        );
        let lim = HandshakeLimits {
            max_head_bytes: head.len(),
            ..limits()
        };
        assert!(parse_request(head.as_bytes(), &lim).unwrap().is_some());
    }

    #[test]
    fn pipelined_bytes_do_not_count_against_head_limit() {
        let head = good_head();
        let lim = HandshakeLimits {
            max_head_bytes: head.len(),
            ..limits()
        };
        let mut buf = head.clone().into_bytes();
        buf.extend_from_slice(&[0u8; 100]);
        let (_, len) = parse_request(&buf, &lim).unwrap().unwrap();
        assert_eq!(len, head.len());
    }

    #[test]
    fn too_many_headers_is_too_large() {
        let head = good_head(); // 6 header fields
        let lim = HandshakeLimits {
            max_headers: 5,
            ..limits()
        };
        assert_eq!(
            parse_request(head.as_bytes(), &lim),
            Err(Reject::HeadTooLarge)
        );
        let lim = HandshakeLimits {
            max_headers: 6,
            ..limits()
        };
        assert!(parse_request(head.as_bytes(), &lim).unwrap().is_some());
    }

    #[test]
    fn header_limit_above_stack_slots_uses_heap_slots() {
        let extra: String = (0..40).map(|i| format!("X-{i}: v\r\n")).collect();
        let head = good_head().replacen("Host:", &format!("{extra}Host:"), 1);
        let lim = HandshakeLimits {
            max_headers: 64,
            ..limits()
        };
        assert!(parse_request(head.as_bytes(), &lim).unwrap().is_some());
        let lim = HandshakeLimits {
            max_headers: 45,
            ..limits()
        };
        assert_eq!(
            parse_request(head.as_bytes(), &lim),
            Err(Reject::HeadTooLarge)
        );
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accept_response_without_protocol() {
        let resp = String::from_utf8(accept_response(KEY, None, false)).unwrap();
        assert_eq!(
            resp,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
    }

    #[test]
    fn accept_response_with_protocol() {
        let resp = String::from_utf8(accept_response(KEY, Some("chat.v1"), false)).unwrap();
        assert!(resp.ends_with(
            "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat.v1\r\n\r\n"
        ));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "subprotocol must be an HTTP token")]
    fn accept_response_with_non_token_protocol_is_a_caller_bug() {
        // In release builds the header is left out instead; never written with CR/LF inside.
        let _ = accept_response(KEY, Some("chat\r\nSet-Cookie: x"), false);
    }

    #[test]
    fn statuses_cover_every_variant() {
        let cases = [
            (Reject::BadRequest("x"), 400, "bad_request"),
            (Reject::Unauthorized("x"), 401, "unauthorized"),
            (Reject::Forbidden("x"), 403, "origin"),
            (Reject::NotFound, 404, "not_found"),
            (Reject::UpgradeRequired, 426, "upgrade_required"),
            (Reject::HeadTooLarge, 431, "head_too_large"),
            (Reject::Unavailable("x"), 503, "unavailable"),
        ];
        for (r, status, label) in cases {
            assert_eq!(r.status(), status);
            assert_eq!(r.metric_label(), label);
            let resp = String::from_utf8(r.response()).unwrap();
            assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{resp}");
        }
    }

    #[test]
    fn response_is_complete_http_with_reason_body() {
        let resp = String::from_utf8(Reject::BadRequest("method must be GET").response()).unwrap();
        assert_eq!(
            resp,
            "HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\
             Content-Type: text/plain; charset=utf-8\r\nContent-Length: 19\r\n\r\n\
             method must be GET\n"
        );
    }

    #[test]
    fn response_426_names_version_13() {
        let resp = String::from_utf8(Reject::UpgradeRequired.response()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(resp.contains("\r\nUpgrade: websocket\r\n"));
    }

    #[test]
    fn response_401_carries_bearer_challenge() {
        let resp = String::from_utf8(Reject::Unauthorized("token expired").response()).unwrap();
        assert!(resp.contains("\r\nWWW-Authenticate: Bearer\r\n"));
        assert!(resp.ends_with("\r\n\r\ntoken expired\n"));
    }

    #[test]
    fn response_content_length_matches_body() {
        for r in [
            Reject::NotFound,
            Reject::HeadTooLarge,
            Reject::Forbidden("origin not allowed"),
        ] {
            let resp = r.response();
            let text = String::from_utf8(resp).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, body.len());
        }
    }

    #[test]
    fn origin_allowed_with_empty_list_allows_all() {
        assert!(origin_allowed(Some("https://evil.example"), &[]));
    }

    #[test]
    fn origin_allowed_without_origin_header() {
        assert!(origin_allowed(None, &["https://a.example".to_string()]));
    }

    #[test]
    fn origin_allowed_matches_case_insensitively_and_exactly() {
        let list = vec!["https://App.Example.com".to_string()];
        assert!(origin_allowed(Some("https://app.example.com"), &list));
        assert!(!origin_allowed(Some("https://app.example.com.evil"), &list));
        assert!(!origin_allowed(Some("http://app.example.com"), &list));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600),
                                       max_head in 0usize..700, max_headers in 0usize..40) {
            let lim = HandshakeLimits { max_head_bytes: max_head, max_headers, path: "/ws".into(), sse_path: None };
            if let Ok(Some((_, len))) = parse_request(&buf, &lim) {
                prop_assert!(len <= buf.len());
                prop_assert!(len <= max_head);
            }
        }

        #[test]
        fn good_head_with_arbitrary_tail_parses_to_head_len(tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let head = good_head();
            let mut buf = head.clone().into_bytes();
            buf.extend_from_slice(&tail);
            let (_, len) = parse_request(&buf, &limits()).unwrap().unwrap();
            prop_assert_eq!(len, head.len());
        }

        #[test]
        fn mutated_good_head_never_panics(pos in 0usize..200, byte in any::<u8>()) {
            let mut buf = good_head().into_bytes();
            let pos = pos % buf.len();
            buf[pos] = byte;
            if let Ok(Some((_, len))) = parse_request(&buf, &limits()) {
                prop_assert!(len <= buf.len());
            }
        }
    }

    // ---- permessage-deflate (RFC 7692) ----

    #[test]
    fn chrome_and_firefox_deflate_offers_are_accepted() {
        // Chrome 120+: one offer with client_max_window_bits and no value.
        assert!(negotiate_deflate(
            "permessage-deflate; client_max_window_bits"
        ));
        // Firefox: the bare offer.
        assert!(negotiate_deflate("permessage-deflate"));
        // Python websockets' default offer.
        assert!(negotiate_deflate(
            "permessage-deflate; server_max_window_bits=15; client_max_window_bits"
        ));
        // Node ws with perMessageDeflate: true.
        assert!(negotiate_deflate(
            "permessage-deflate; client_max_window_bits"
        ));
        assert!(negotiate_deflate(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ));
        assert!(negotiate_deflate(
            "permessage-deflate; client_max_window_bits=\"10\""
        ));
    }

    #[test]
    fn offers_that_cannot_be_honoured_exactly_are_declined() {
        // A smaller server window: one shared frame per message is built with 15 bits.
        assert!(!negotiate_deflate(
            "permessage-deflate; server_max_window_bits=10"
        ));
        assert!(!negotiate_deflate(
            "permessage-deflate; server_max_window_bits"
        ));
        assert!(!negotiate_deflate(
            "permessage-deflate; server_max_window_bits=16"
        ));
        assert!(!negotiate_deflate(
            "permessage-deflate; client_max_window_bits=7"
        ));
        assert!(!negotiate_deflate(
            "permessage-deflate; client_max_window_bits=010"
        ));
        // §7.1: unknown or duplicated parameters, and values on flags, are declined.
        assert!(!negotiate_deflate("permessage-deflate; foo"));
        assert!(!negotiate_deflate(
            "permessage-deflate; client_max_window_bits; client_max_window_bits"
        ));
        assert!(!negotiate_deflate(
            "permessage-deflate; server_no_context_takeover=1"
        ));
        assert!(!negotiate_deflate("x-webkit-deflate-frame"));
        assert!(!negotiate_deflate(""));
    }

    #[test]
    fn a_later_offer_is_taken_when_the_first_is_declined() {
        assert!(negotiate_deflate(
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ));
        assert!(negotiate_deflate("x-foo, PerMessage-Deflate"));
    }

    #[test]
    fn the_extension_header_is_reported_and_answered() {
        let head = good_head().replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        );
        let (req, _) = parse_request(head.as_bytes(), &limits()).unwrap().unwrap();
        assert_eq!(
            req.extensions,
            Some("permessage-deflate; client_max_window_bits")
        );
        let twice = good_head().replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Extensions: x\r\n\r\n",
        );
        let (req, _) = parse_request(twice.as_bytes(), &limits()).unwrap().unwrap();
        assert_eq!(
            req.extensions, None,
            "offers on several lines: none negotiated"
        );
        let response = String::from_utf8(accept_response(KEY, None, true)).unwrap();
        assert!(response.contains(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
        ));
        let plain = String::from_utf8(accept_response(KEY, None, false)).unwrap();
        assert!(!plain.contains("Extensions"));
    }

    // ---- Server-Sent Events ----

    #[test]
    fn an_sse_request_needs_no_upgrade_headers() {
        let head =
            "GET /sse?user=a&lastEventId=x HTTP/1.1\r\nHost: h\r\nAccept: text/event-stream\r\n\
                    Last-Event-ID: user:a@E:3\r\n\r\n";
        let (req, len) = parse_request(head.as_bytes(), &limits()).unwrap().unwrap();
        assert_eq!(len, head.len());
        assert_eq!(req.kind, Kind::Sse);
        assert_eq!(req.query, "user=a&lastEventId=x");
        assert_eq!(req.last_event_id, Some("user:a@E:3"));
        let off = HandshakeLimits {
            sse_path: None,
            ..limits()
        };
        assert_eq!(parse_request(head.as_bytes(), &off), Err(Reject::NotFound));
        let post = head.replace("GET", "POST");
        assert!(matches!(
            parse_request(post.as_bytes(), &limits()),
            Err(Reject::BadRequest(_))
        ));
        let good = good_head();
        let (ws, _) = parse_request(good.as_bytes(), &limits()).unwrap().unwrap();
        assert_eq!(ws.kind, Kind::WebSocket);
    }
}
