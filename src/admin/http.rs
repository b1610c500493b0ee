//! Sans-IO HTTP/1.1 server-side message framing for the admin API: turns bytes read from an admin
//! connection into request [`Head`]s and [`Request`]s (keep-alive and pipelining included) and appends
//! responses to an output buffer.
//!
//! Owns: request-head parsing (via `httparse`), body framing by `Content-Length`, the connection
//! persistence decision, and response serialisation. Does not own: sockets, buffers, timeouts (the
//! connection state, `admin::conn`), routing (`admin::route`), authentication, or what a response says.
//! A head is complete before its body: [`parse_head`] hands it out alone, so the caller can refuse a
//! request (401) before a byte of its body is buffered.
//!
//! Deliberate limits of this small server:
//! - No `Transfer-Encoding` (so no chunked request bodies): such requests get 501 and the connection is
//!   closed. Admin clients send `Content-Length`.
//! - `Expect: 100-continue` is ignored: we never send `100 Continue`. RFC 9110 §10.1.1 lets a client
//!   send the body anyway after a wait; curl waits 1 s, which is acceptable for the admin API.
//! - No `Date` header is written (sans-IO: no clock here); the I/O shell may pass one in
//!   `extra_headers`.

use std::io::Write as _;

use thiserror::Error;

/// Default cap on the request head (request line + header fields + the empty line), in bytes.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 8 * 1024;
/// Default cap on the number of header fields in one request.
pub const DEFAULT_MAX_HEADERS: usize = 32;
/// Default cap on a request body, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// Size limits applied while framing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head accepted, in bytes (431 beyond it).
    pub max_head_bytes: usize,
    /// Most header fields accepted in one request (431 beyond it).
    pub max_headers: usize,
    /// Largest `Content-Length` accepted, in bytes (413 beyond it).
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// The request methods the admin API distinguishes; method names are case-sensitive (RFC 9110 §9.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`
    Get,
    /// `POST`
    Post,
    /// `DELETE`
    Delete,
    /// `PUT`
    Put,
    /// `HEAD`
    Head,
    /// Any other syntactically valid method; the router answers it with 405.
    Other,
}

impl Method {
    fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            "PUT" => Method::Put,
            "HEAD" => Method::Head,
            _ => Method::Other,
        }
    }
}

/// One complete request: head fields the admin API uses, plus the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request method.
    pub method: Method,
    /// Raw (still percent-encoded) path, without the query; always starts with `/`.
    pub path: String,
    /// Raw query without the leading `?`; empty when absent.
    pub query: String,
    /// `Content-Type` value, whitespace-trimmed.
    pub content_type: Option<String>,
    /// `Authorization` value, whitespace-trimmed (e.g. `Bearer <jwt>`).
    pub authorization: Option<String>,
    /// Exactly `Content-Length` bytes; empty when there was none.
    pub body: Vec<u8>,
    /// Whether the connection may stay open after the response (RFC 9112 §9.3).
    pub keep_alive: bool,
}

/// A complete request head: what the admin API reads before the body, and how long the body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The request method.
    pub method: Method,
    /// Raw (still percent-encoded) path, without the query; always starts with `/`.
    pub path: String,
    /// Raw query without the leading `?`; empty when absent.
    pub query: String,
    /// `Content-Type` value, whitespace-trimmed.
    pub content_type: Option<String>,
    /// `Authorization` value, whitespace-trimmed (e.g. `Bearer <jwt>`).
    pub authorization: Option<String>,
    /// Whether the connection may stay open after the response (RFC 9112 §9.3).
    pub keep_alive: bool,
    /// Bytes of the head, its final empty line included.
    pub len: usize,
    /// Bytes of body after the head (`Content-Length`, at most `Limits::max_body_bytes`; 0 without one).
    pub body_len: usize,
}

impl Head {
    /// The request this head starts, with its body (exactly [`Head::body_len`] bytes).
    pub fn into_request(self, body: Vec<u8>) -> Request {
        debug_assert_eq!(body.len(), self.body_len);
        Request {
            method: self.method,
            path: self.path,
            query: self.query,
            content_type: self.content_type,
            authorization: self.authorization,
            body,
            keep_alive: self.keep_alive,
        }
    }
}

/// Why a request could not be framed. After any of these the caller answers with
/// [`HttpError::status`] / [`HttpError::message`] and closes the connection, since the framing of any
/// following bytes is unknown.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpError {
    /// 400: malformed request.
    #[error("{0}")]
    BadRequest(&'static str),
    /// 431: request head or header count over the limit (RFC 6585 §5).
    #[error("request header fields too large")]
    HeadTooLarge,
    /// 413: `Content-Length` over the limit (RFC 9110 §15.5.14).
    #[error("request body too large")]
    BodyTooLarge,
    /// 411: a POST without `Content-Length` (RFC 9110 §15.5.12).
    #[error("Content-Length required")]
    LengthRequired,
    /// 501: a feature this server does not implement, such as `Transfer-Encoding`.
    #[error("{0}")]
    NotImplemented(&'static str),
    /// 505: an HTTP version other than 1.0 and 1.1 (RFC 9110 §15.6.6).
    #[error("HTTP version not supported")]
    VersionNotSupported,
}

impl HttpError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::LengthRequired => 411,
            HttpError::NotImplemented(_) => 501,
            HttpError::VersionNotSupported => 505,
        }
    }

    /// A short human-readable explanation, suitable for an error body.
    pub fn message(&self) -> &'static str {
        match self {
            HttpError::BadRequest(m) | HttpError::NotImplemented(m) => m,
            HttpError::HeadTooLarge => "request header fields too large",
            HttpError::BodyTooLarge => "request body too large",
            HttpError::LengthRequired => "Content-Length required",
            HttpError::VersionNotSupported => "only HTTP/1.0 and HTTP/1.1 are supported",
        }
    }
}

/// Frames the first request in `buf`: [`parse_head`], then its body.
///
/// `Ok(None)`: need more bytes. `Ok(Some((req, consumed)))`: one full request (head + `Content-Length`
/// body) was consumed; more pipelined requests may follow in `buf[consumed..]`. After an `Err` the caller
/// answers and closes the connection.
///
/// The head is re-parsed on each call until the whole body has arrived; a connection that keeps its state
/// calls [`parse_head`] once and waits for [`Head::body_len`] bytes instead.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Option<(Request, usize)>, HttpError> {
    let Some(head) = parse_head(buf, limits)? else {
        return Ok(None);
    };
    let Some(total) = head.len.checked_add(head.body_len) else {
        return Err(HttpError::BodyTooLarge);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let body = buf[head.len..total].to_vec();
    Ok(Some((head.into_request(body), total)))
}

/// Parses the request head at the start of `buf`; the body (if any) is not looked at.
///
/// `Ok(None)`: the head is not complete yet. `Ok(Some(head))`: `buf[..head.len]` is the head and
/// `head.body_len` bytes of body follow it (some may not have arrived). After an `Err` the caller answers
/// and closes the connection. Only the first `limits.max_head_bytes` bytes are ever scanned.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Head>, HttpError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Scanning only a window of `max_head_bytes` both bounds the work per call and turns "head still
    // incomplete at the limit" into 431 (RFC 6585 §5) without waiting for the rest of the head.
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    let mut header_slots = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut parsed = httparse::Request::new(&mut header_slots);
    let head_len = match parsed.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(HttpError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(httparse::Error::Version) => return Err(version_error(window)),
        Err(e) => return Err(HttpError::BadRequest(httparse_message(e))),
    };
    debug_assert!(head_len <= window.len());

    let (Some(method), Some(target), Some(minor_version)) =
        (parsed.method, parsed.path, parsed.version)
    else {
        return Err(HttpError::BadRequest("incomplete request line"));
    };
    let method = Method::from_token(method);
    let http11 = minor_version == 1;
    let (path, query) = split_target(target)?;
    let fields = HeadFields::collect(parsed.headers)?;

    // RFC 9112 §3.2: an HTTP/1.1 request without Host, or with more than one, MUST get 400.
    if fields.host_count > 1 || (http11 && fields.host_count == 0) {
        return Err(HttpError::BadRequest(
            "HTTP/1.1 requests need exactly one Host header",
        ));
    }
    // RFC 9112 §6.1 / §6.3: Transfer-Encoding overrides Content-Length and we implement no transfer
    // coding; rejecting outright also closes the CL+TE request-smuggling hole (RFC 9112 §11.2).
    if fields.transfer_encoding {
        return Err(HttpError::NotImplemented(
            "Transfer-Encoding (chunked) is not supported; use Content-Length",
        ));
    }
    let body_len = match fields.content_length {
        Some(digits) => body_length(digits, limits)?,
        // RFC 9110 §15.5.12: we need the length up front to frame a POST body.
        None if method == Method::Post => return Err(HttpError::LengthRequired),
        // RFC 9112 §6.3 rule 7: no Content-Length and no Transfer-Encoding means no body.
        None => 0,
    };

    // RFC 9112 §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 persists only with "keep-alive".
    let keep_alive = !fields.connection_close && (http11 || fields.connection_keep_alive);
    Ok(Some(Head {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        content_type: fields.content_type.map(str::to_owned),
        authorization: fields.authorization.map(str::to_owned),
        keep_alive,
        len: head_len,
        body_len,
    }))
}

/// The header fields framing cares about, borrowed from the parsed head.
#[derive(Default)]
struct HeadFields<'a> {
    host_count: usize,
    transfer_encoding: bool,
    /// Normalised (leading zeros stripped) decimal digits of the agreed Content-Length.
    content_length: Option<&'a [u8]>,
    connection_close: bool,
    connection_keep_alive: bool,
    content_type: Option<&'a str>,
    authorization: Option<&'a str>,
}

impl<'a> HeadFields<'a> {
    fn collect(headers: &[httparse::Header<'a>]) -> Result<Self, HttpError> {
        let mut fields = HeadFields::default();
        for header in headers {
            let name = header.name;
            let value = trim_ows(header.value);
            if name.eq_ignore_ascii_case("host") {
                fields.host_count += 1;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                fields.transfer_encoding = true;
            } else if name.eq_ignore_ascii_case("content-length") {
                fields.add_content_length(value)?;
            } else if name.eq_ignore_ascii_case("connection") {
                // RFC 9110 §7.6.1: Connection is a comma-separated list of case-insensitive options.
                for option in value.split(|&b| b == b',').map(trim_ows) {
                    if option.eq_ignore_ascii_case(b"close") {
                        fields.connection_close = true;
                    } else if option.eq_ignore_ascii_case(b"keep-alive") {
                        fields.connection_keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("content-type") {
                // RFC 9110 §5.3: a singleton field; two values are ambiguous.
                if fields.content_type.is_some() {
                    return Err(HttpError::BadRequest("duplicate Content-Type header"));
                }
                fields.content_type = Some(
                    std::str::from_utf8(value)
                        .map_err(|_| HttpError::BadRequest("Content-Type is not valid UTF-8"))?,
                );
            } else if name.eq_ignore_ascii_case("authorization") {
                // RFC 9110 §5.3: a singleton field; refusing duplicates avoids checking one credential
                // while something downstream trusts the other.
                if fields.authorization.is_some() {
                    return Err(HttpError::BadRequest("duplicate Authorization header"));
                }
                fields.authorization = Some(
                    std::str::from_utf8(value)
                        .map_err(|_| HttpError::BadRequest("Authorization is not valid UTF-8"))?,
                );
            }
        }
        Ok(fields)
    }

    /// RFC 9110 §8.6: Content-Length = 1*DIGIT. Repeated fields, or a list in one field, are accepted
    /// only when every value is the same (RFC 9112 §6.3 rule 5); anything else is a framing error.
    fn add_content_length(&mut self, value: &'a [u8]) -> Result<(), HttpError> {
        for item in value.split(|&b| b == b',').map(trim_ows) {
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err(HttpError::BadRequest("invalid Content-Length"));
            }
            let first_nonzero = item.iter().position(|&b| b != b'0').unwrap_or(item.len());
            let digits = &item[first_nonzero..];
            match self.content_length {
                Some(seen) if seen != digits => {
                    return Err(HttpError::BadRequest("conflicting Content-Length values"))
                }
                _ => self.content_length = Some(digits),
            }
        }
        Ok(())
    }
}

/// Converts validated Content-Length digits to a byte count, enforcing the body limit as soon as the
/// head is complete (RFC 9110 §15.5.14) so an oversized body is never buffered.
fn body_length(digits: &[u8], limits: &Limits) -> Result<usize, HttpError> {
    debug_assert!(digits.iter().all(u8::is_ascii_digit));
    let mut value: u64 = 0;
    for &d in digits {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or(HttpError::BodyTooLarge)?;
    }
    match usize::try_from(value) {
        Ok(len) if len <= limits.max_body_bytes => Ok(len),
        _ => Err(HttpError::BodyTooLarge),
    }
}

/// Splits a request-target into raw path and query (RFC 9112 §3.2) with the admin API's statuses: origin-form
/// and absolute-form are split by [`crate::proto::http::split_target`]; asterisk- and authority-form are
/// meaningless for the admin API and get 400, as does a fragment.
fn split_target(target: &str) -> Result<(&str, &str), HttpError> {
    // RFC 9112 §3.2: the request-target never carries a fragment.
    if target.contains('#') {
        return Err(HttpError::BadRequest("fragment in request-target"));
    }
    crate::proto::http::split_target(target)
        .map_err(|_| HttpError::BadRequest("request-target must be an absolute path"))
}

/// httparse reports both "HTTP/2.0" and garbage as a version error; a well-formed `HTTP/<digit>`
/// version we do not speak deserves 505 (RFC 9110 §15.6.6), anything else 400.
fn version_error(window: &[u8]) -> HttpError {
    let start = window
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(window.len());
    let line = &window[start..];
    let line = &line[..line
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(line.len())];
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or(&[]);
    let looks_like_version = version.strip_prefix(b"HTTP/").is_some_and(|rest| {
        matches!(rest, [major, ..] if major.is_ascii_digit())
            && rest[1..].iter().all(|&b| b == b'.' || b.is_ascii_digit())
    });
    if looks_like_version {
        HttpError::VersionNotSupported
    } else {
        HttpError::BadRequest("invalid HTTP version")
    }
}

fn httparse_message(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid request line",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Status => "malformed request",
    }
}

/// Strips optional whitespace (SP / HTAB) from both ends of a field value (RFC 9110 §5.6.3).
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Standard reason phrases (RFC 9110 §15, RFC 6585) for the statuses the admin API can send. The
/// phrase is informational (RFC 9112 §4), so an unlisted code gets an empty one.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Appends a full response to `out`: status line with the standard reason phrase, `Content-Type`
/// (omitted when empty), `Content-Length`, `Connection: keep-alive` or `close`, `extra_headers`
/// (e.g. `("Allow", "POST")`), then `body`.
///
/// For 1xx and 204 no content headers and no body are written (RFC 9110 §8.6, §15.3.5). For a HEAD
/// request use [`write_response_head`] with the length the GET body would have.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) {
    write_response_head(
        out,
        status,
        content_type,
        extra_headers,
        body.len(),
        keep_alive,
    );
    if status_allows_content(status) {
        out.extend_from_slice(body);
    } else {
        debug_assert!(body.is_empty(), "status {status} carries no content");
    }
}

/// Appends only the status line and header section of a response, announcing `content_length` bytes
/// of content. This is the answer to HEAD (RFC 9110 §9.3.2: same header fields as GET, no content);
/// [`write_response`] is this plus the body.
pub fn write_response_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    content_length: usize,
    keep_alive: bool,
) {
    debug_assert!(
        (100..=999).contains(&status),
        "status {status} is not 3 digits"
    );
    // Writing into a Vec cannot fail, so the io::Result is discarded.
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    if status_allows_content(status) {
        if !content_type.is_empty() {
            push_field(out, "Content-Type", content_type);
        }
        let _ = write!(out, "Content-Length: {content_length}\r\n");
    }
    push_field(
        out,
        "Connection",
        if keep_alive { "keep-alive" } else { "close" },
    );
    for (name, value) in extra_headers {
        push_field(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Convenience: a JSON error response `{"error": message}` with the message serde_json-escaped.
pub fn write_error(
    out: &mut Vec<u8>,
    status: u16,
    message: &str,
    extra_headers: &[(&str, &str)],
    keep_alive: bool,
) {
    let body = serde_json::json!({ "error": message }).to_string();
    write_response(
        out,
        status,
        "application/json",
        extra_headers,
        body.as_bytes(),
        keep_alive,
    );
}

/// RFC 9110 §8.6 / §15.3.5: 1xx and 204 responses carry no content and no Content-Length.
fn status_allows_content(status: u16) -> bool {
    !(100..200).contains(&status) && status != 204
}

/// Appends `name: value\r\n`. Field values MUST NOT contain CR, LF or NUL (RFC 9110 §5.5); those are
/// dropped so a caller mistake cannot split the response.
fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    debug_assert!(
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':'),
        "invalid header name {name:?}"
    );
    debug_assert!(
        !value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)),
        "header value {value:?} contains CR, LF or NUL"
    );
    let clean = |b: &u8| !matches!(b, b'\r' | b'\n' | 0);
    out.extend(name.as_bytes().iter().filter(|b| clean(b) && **b != b':'));
    out.extend_from_slice(b": ");
    out.extend(value.as_bytes().iter().filter(|b| clean(b)));
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            max_head_bytes: 1024,
            max_headers: 16,
            max_body_bytes: 64,
        }
    }

    fn parse(raw: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
        parse_request(raw, &limits())
    }

    fn parse_one(raw: &[u8]) -> Request {
        let (req, consumed) = parse(raw).expect("valid").expect("complete");
        assert_eq!(consumed, raw.len());
        req
    }

    fn parse_err(raw: &[u8]) -> HttpError {
        parse(raw).expect_err("should be rejected")
    }

    #[test]
    fn get_is_parsed_with_path_query_and_no_body() {
        let req = parse_one(b"GET /presence/user/a%20b?x=1&y HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path, "/presence/user/a%20b");
        assert_eq!(req.query, "x=1&y");
        assert!(req.body.is_empty());
        assert_eq!(req.content_type, None);
        assert_eq!(req.authorization, None);
    }

    #[test]
    fn post_body_content_type_and_authorization_are_returned() {
        let req = parse_one(
            b"POST /publish/all HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
              Authorization: Bearer abc.def\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
        );
        assert_eq!(req.method, Method::Post);
        assert_eq!(req.body, b"{\"a\":1}");
        assert_eq!(req.content_type.as_deref(), Some("application/json"));
        assert_eq!(req.authorization.as_deref(), Some("Bearer abc.def"));
    }

    #[test]
    fn methods_are_recognised_case_sensitively() {
        let method_of =
            |m: &str| parse_one(format!("{m} / HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes()).method;
        assert_eq!(method_of("GET"), Method::Get);
        assert_eq!(method_of("DELETE"), Method::Delete);
        assert_eq!(method_of("HEAD"), Method::Head);
        assert_eq!(method_of("PUT"), Method::Put);
        assert_eq!(method_of("PATCH"), Method::Other);
        assert_eq!(method_of("get"), Method::Other);
    }

    #[test]
    fn pipelined_requests_in_one_buffer_are_framed_in_order() {
        let raw: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n\
            POST /publish/all HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
            DELETE /connections/user/u HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
        let mut rest = raw;
        let mut seen = Vec::new();
        while let Some((req, consumed)) = parse(rest).unwrap() {
            seen.push((req.method, req.path, req.body, req.keep_alive));
            rest = &rest[consumed..];
        }
        assert!(rest.is_empty());
        assert_eq!(
            seen,
            vec![
                (Method::Get, "/healthz".to_owned(), vec![], true),
                (
                    Method::Post,
                    "/publish/all".to_owned(),
                    b"hello".to_vec(),
                    true
                ),
                (
                    Method::Delete,
                    "/connections/user/u".to_owned(),
                    vec![],
                    false
                ),
            ]
        );
    }

    #[test]
    fn partial_pipelined_request_after_a_complete_one_needs_more_bytes() {
        let raw = b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\nGET /met";
        let (_, consumed) = parse(raw).unwrap().unwrap();
        assert_eq!(parse(&raw[consumed..]), Ok(None));
    }

    #[test]
    fn request_split_one_byte_at_a_time_completes_only_at_the_last_byte() {
        let raw: &[u8] =
            b"POST /publish/user/u HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc";
        for end in 0..raw.len() {
            assert_eq!(parse(&raw[..end]), Ok(None), "prefix of {end} bytes");
        }
        let (req, consumed) = parse(raw).unwrap().unwrap();
        assert_eq!(consumed, raw.len());
        assert_eq!(req.body, b"abc");
    }

    #[test]
    fn empty_lines_before_a_request_line_are_skipped() {
        // RFC 9112 §2.2: clients may send a stray CRLF after a POST body.
        let req = parse_one(b"\r\nGET /healthz HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(req.path, "/healthz");
    }

    #[test]
    fn http11_defaults_to_keep_alive() {
        assert!(parse_one(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").keep_alive);
    }

    #[test]
    fn http11_with_connection_close_closes() {
        assert!(!parse_one(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").keep_alive);
    }

    #[test]
    fn http10_defaults_to_close() {
        assert!(!parse_one(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
    }

    #[test]
    fn http10_with_connection_keep_alive_stays_open() {
        assert!(parse_one(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn connection_options_are_a_case_insensitive_list() {
        let req = parse_one(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: TE, CLOSE\r\n\r\n");
        assert!(!req.keep_alive);
    }

    #[test]
    fn close_wins_over_keep_alive() {
        let req =
            parse_one(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n");
        assert!(!req.keep_alive);
    }

    #[test]
    fn oversized_content_length_is_413_before_the_body_arrives() {
        let err = parse_err(b"POST /publish/all HTTP/1.1\r\nHost: h\r\nContent-Length: 65\r\n\r\n");
        assert_eq!(err, HttpError::BodyTooLarge);
        assert_eq!(err.status(), 413);
    }

    #[test]
    fn content_length_beyond_u64_is_413() {
        let err = parse_err(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        );
        assert_eq!(err, HttpError::BodyTooLarge);
    }

    #[test]
    fn body_exactly_at_the_limit_is_accepted() {
        let mut raw = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 64\r\n\r\n".to_vec();
        raw.extend_from_slice(&[b'x'; 64]);
        assert_eq!(parse_one(&raw).body.len(), 64);
    }

    #[test]
    fn body_extending_past_the_head_limit_is_not_a_large_head() {
        let small_head = Limits {
            max_head_bytes: 64,
            ..limits()
        };
        let mut raw = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 64\r\n\r\n".to_vec();
        raw.extend_from_slice(&[b'x'; 32]);
        assert_eq!(parse_request(&raw, &small_head), Ok(None));
        raw.extend_from_slice(&[b'x'; 32]);
        let (req, consumed) = parse_request(&raw, &small_head).unwrap().unwrap();
        assert_eq!((req.body.len(), consumed), (64, raw.len()));
    }

    #[test]
    fn head_is_complete_before_its_body_arrives() {
        let raw = b"POST /publish/all HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer k\r\nContent-Length: 64\r\n\r\n";
        let head = parse_head(raw, &limits()).unwrap().expect("complete head");
        assert_eq!(head.method, Method::Post);
        assert_eq!(head.path, "/publish/all");
        assert_eq!(head.authorization.as_deref(), Some("Bearer k"));
        assert_eq!((head.len, head.body_len), (raw.len(), 64));
        // The whole request still needs its body.
        assert_eq!(parse(raw), Ok(None));
    }

    #[test]
    fn head_and_body_give_the_same_request_as_parse_request() {
        let raw = b"POST /p?q HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET";
        let head = parse_head(raw, &limits()).unwrap().unwrap();
        let end = head.len + head.body_len;
        let body = raw[head.len..end].to_vec();
        let (whole, consumed) = parse(raw).unwrap().unwrap();
        assert_eq!(consumed, end);
        assert_eq!(head.into_request(body), whole);
    }

    #[test]
    fn an_oversized_body_is_refused_with_the_head() {
        let raw = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 65\r\n\r\n";
        assert_eq!(parse_head(raw, &limits()), Err(HttpError::BodyTooLarge));
    }

    #[test]
    fn body_waits_until_content_length_bytes_are_buffered() {
        let raw = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nabc";
        assert_eq!(parse(raw), Ok(None));
    }

    #[test]
    fn post_without_content_length_is_411() {
        let err = parse_err(b"POST /publish/all HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(err, HttpError::LengthRequired);
        assert_eq!(err.status(), 411);
    }

    #[test]
    fn delete_without_content_length_has_empty_body() {
        let req = parse_one(b"DELETE /connections/user/u HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(req.method, Method::Delete);
        assert!(req.body.is_empty());
    }

    #[test]
    fn get_with_content_length_consumes_its_body() {
        let raw = b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nokGET";
        let (req, consumed) = parse(raw).unwrap().unwrap();
        assert_eq!(req.body, b"ok");
        assert_eq!(&raw[consumed..], b"GET");
    }

    #[test]
    fn chunked_transfer_encoding_is_501_pointing_to_content_length() {
        let err = parse_err(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(err.status(), 501);
        assert!(
            err.message().contains("use Content-Length"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn transfer_encoding_with_content_length_is_501() {
        let err = parse_err(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        );
        assert_eq!(err.status(), 501);
    }

    #[test]
    fn unterminated_head_at_the_limit_is_431() {
        let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: ".to_vec();
        raw.resize(1024, b'a');
        assert_eq!(parse_err(&raw), HttpError::HeadTooLarge);
        assert_eq!(parse(&raw[..1023]), Ok(None));
    }

    #[test]
    fn complete_head_longer_than_the_limit_is_431() {
        let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: ".to_vec();
        raw.resize(2000, b'a');
        raw.extend_from_slice(b"\r\n\r\n");
        let err = parse_err(&raw);
        assert_eq!(err, HttpError::HeadTooLarge);
        assert_eq!(err.status(), 431);
    }

    #[test]
    fn head_exactly_at_the_limit_is_accepted() {
        let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: ".to_vec();
        raw.resize(1024 - 4, b'a');
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(raw.len(), 1024);
        assert_eq!(parse_one(&raw).path, "/");
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
        for i in 0..16 {
            raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        assert_eq!(parse_err(&raw), HttpError::HeadTooLarge);
    }

    #[test]
    fn header_count_at_the_limit_is_accepted() {
        let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
        for i in 0..15 {
            raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        assert_eq!(parse_one(&raw).method, Method::Get);
    }

    #[test]
    fn malformed_content_length_is_400() {
        for bad in ["abc", "-1", "+5", "5 5", "", "0x10", "1.0"] {
            let raw = format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(
                parse_err(raw.as_bytes()),
                HttpError::BadRequest("invalid Content-Length"),
                "Content-Length: {bad:?}"
            );
        }
    }

    #[test]
    fn conflicting_content_lengths_are_400() {
        let err = parse_err(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        );
        assert_eq!(err.status(), 400);
        assert_eq!(
            parse_err(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 4\r\n\r\nabcd").status(),
            400
        );
    }

    #[test]
    fn repeated_identical_content_lengths_are_one_length() {
        let req = parse_one(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 003, 3\r\n\r\nabc",
        );
        assert_eq!(req.body, b"abc");
    }

    #[test]
    fn malformed_request_line_is_400() {
        assert_eq!(parse_err(b"GET\x01 / HTTP/1.1\r\n\r\n").status(), 400);
        assert_eq!(parse_err(b"GET  HTTP/1.1\r\n\r\n").status(), 400);
    }

    #[test]
    fn header_without_colon_is_400() {
        assert_eq!(parse_err(b"GET / HTTP/1.1\r\nHost h\r\n\r\n").status(), 400);
    }

    #[test]
    fn whitespace_before_header_colon_is_400() {
        // RFC 9112 §5.1: a server MUST reject such a request with 400.
        assert_eq!(
            parse_err(b"GET / HTTP/1.1\r\nHost : h\r\n\r\n").status(),
            400
        );
    }

    #[test]
    fn http2_version_is_505() {
        let err = parse_err(b"GET / HTTP/2.0\r\n\r\n");
        assert_eq!(err, HttpError::VersionNotSupported);
        assert_eq!(err.status(), 505);
    }

    #[test]
    fn http2_prior_knowledge_preface_is_505() {
        assert_eq!(
            parse_err(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            HttpError::VersionNotSupported
        );
    }

    #[test]
    fn garbage_version_is_400() {
        assert_eq!(parse_err(b"GET / FTP/1.1\r\n\r\n").status(), 400);
    }

    #[test]
    fn http11_without_host_is_400() {
        assert_eq!(parse_err(b"GET / HTTP/1.1\r\n\r\n").status(), 400);
    }

    #[test]
    fn duplicate_host_is_400() {
        assert_eq!(
            parse_err(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").status(),
            400
        );
    }

    #[test]
    fn duplicate_authorization_is_400() {
        let raw = b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n";
        assert_eq!(
            parse_err(raw),
            HttpError::BadRequest("duplicate Authorization header")
        );
    }

    #[test]
    fn absolute_form_target_is_reduced_to_path_and_query() {
        let req = parse_one(b"GET http://admin:9090/metrics?x HTTP/1.1\r\nHost: admin\r\n\r\n");
        assert_eq!(req.path, "/metrics");
        assert_eq!(req.query, "x");
        let req = parse_one(b"GET HTTP://admin HTTP/1.1\r\nHost: admin\r\n\r\n");
        assert_eq!(req.path, "/");
    }

    #[test]
    fn asterisk_form_target_is_400() {
        assert_eq!(
            parse_err(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").status(),
            400
        );
    }

    #[test]
    fn expect_100_continue_is_ignored() {
        let req = parse_one(
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
        );
        assert_eq!(req.body, b"hi");
    }

    #[test]
    fn error_status_codes_match_the_brief() {
        let cases = [
            (HttpError::BadRequest("x"), 400),
            (HttpError::HeadTooLarge, 431),
            (HttpError::BodyTooLarge, 413),
            (HttpError::LengthRequired, 411),
            (HttpError::NotImplemented("x"), 501),
            (HttpError::VersionNotSupported, 505),
        ];
        for (err, status) in cases {
            assert_eq!(err.status(), status, "{err:?}");
        }
    }

    #[test]
    fn write_response_produces_exact_bytes() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            405,
            "text/plain",
            &[("Allow", "POST")],
            b"no",
            true,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\
              Connection: keep-alive\r\nAllow: POST\r\n\r\nno"
        );
    }

    #[test]
    fn write_response_appends_after_existing_output() {
        let mut out = b"previous".to_vec();
        write_response(&mut out, 200, "", &[], b"", false);
        assert_eq!(
            out,
            b"previousHTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn no_content_response_has_no_content_length() {
        let mut out = Vec::new();
        write_response(&mut out, 204, "application/json", &[], b"", true);
        assert_eq!(
            out,
            b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn unknown_status_gets_an_empty_reason_phrase() {
        let mut out = Vec::new();
        write_response(&mut out, 299, "", &[], b"", true);
        assert!(out.starts_with(b"HTTP/1.1 299 \r\n"));
    }

    #[test]
    fn response_head_for_head_announces_length_without_body() {
        let mut out = Vec::new();
        write_response_head(&mut out, 200, "text/plain", &[], 42, true);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 42\r\n\
              Connection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn write_error_is_escaped_json() {
        let mut out = Vec::new();
        write_error(&mut out, 400, "bad \"x\"\n", &[], false);
        let body = br#"{"error":"bad \"x\"\n"}"#;
        let mut expected = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        expected.extend_from_slice(body);
        assert_eq!(out, expected);
    }

    #[test]
    fn response_round_trips_through_httparse() {
        let mut out = Vec::new();
        write_error(&mut out, 431, HttpError::HeadTooLarge.message(), &[], false);
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(&out).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("incomplete response"),
        };
        assert_eq!(resp.code, Some(431));
        assert_eq!(resp.reason, Some("Request Header Fields Too Large"));
        let value: serde_json::Value = serde_json::from_slice(&out[head_len..]).unwrap();
        assert_eq!(value["error"], "request header fields too large");
    }

    /// One syntactically valid request and its expected framing.
    fn arb_request() -> impl Strategy<Value = (Vec<u8>, Method, String, Vec<u8>)> {
        let method = prop_oneof![
            Just(Method::Get),
            Just(Method::Post),
            Just(Method::Delete),
            Just(Method::Head)
        ];
        (
            method,
            "/[a-z0-9%]{0,12}",
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(method, path, body)| {
                let name = match method {
                    Method::Get => "GET",
                    Method::Post => "POST",
                    Method::Delete => "DELETE",
                    _ => "HEAD",
                };
                let mut raw = format!(
                    "{name} {path} HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                raw.extend_from_slice(&body);
                (raw, method, path, body)
            })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_consume_at_most_the_buffer(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            if let Ok(Some((_, consumed))) = parse_request(&bytes, &limits()) {
                prop_assert!(consumed > 0);
                prop_assert!(consumed <= bytes.len());
            }
        }

        #[test]
        fn mutated_requests_never_panic_and_consume_at_most_the_buffer(
            (raw, ..) in arb_request(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let mut raw = raw;
            for (at, byte) in flips {
                let i = at.index(raw.len());
                raw[i] = byte;
            }
            if let Ok(Some((_, consumed))) = parse_request(&raw, &limits()) {
                prop_assert!(consumed <= raw.len());
            }
        }

        #[test]
        fn pipelined_requests_frame_identically_however_the_bytes_arrive(
            requests in proptest::collection::vec(arb_request(), 1..5),
            chunk in 1usize..64,
        ) {
            let stream: Vec<u8> = requests.iter().flat_map(|(raw, ..)| raw.clone()).collect();
            let mut buf = Vec::new();
            let mut framed = Vec::new();
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some((req, consumed)) = parse_request(&buf, &limits()).unwrap() {
                    framed.push((req.method, req.path, req.body));
                    buf.drain(..consumed);
                }
            }
            prop_assert!(buf.is_empty());
            let expected: Vec<_> =
                requests.into_iter().map(|(_, m, p, b)| (m, p, b)).collect();
            prop_assert_eq!(framed, expected);
        }
    }
}
