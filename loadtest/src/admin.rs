//! A blocking HTTP/1.1 keep-alive client for densepush's admin API (publish, metrics), and the parsing of the
//! Prometheus text it returns.
//!
//! It owns one admin connection and request/response framing (RFC 9110/9112). It does not decide what to
//! publish; threads that publish concurrently each own an `AdminClient`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use thiserror::Error;

/// Largest response head or body we accept from the admin API.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How long one request may take.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An admin request that did not get an answer.
#[derive(Debug, Error)]
pub enum AdminError {
    /// Socket trouble (after one reconnect attempt).
    #[error("admin connection")]
    Io(#[from] io::Error),
    /// The answer is not HTTP we understand.
    #[error("admin response malformed: {0}")]
    Malformed(&'static str),
}

/// One keep-alive connection to the admin API; reconnects once if the server closed it.
pub struct AdminClient {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

/// A response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl AdminClient {
    /// A client for `addr` (connects on first use).
    pub fn new(addr: SocketAddr) -> Self {
        AdminClient {
            addr,
            stream: None,
            buf: Vec::new(),
        }
    }

    /// `POST path` with `body` (text, or binary with Content-Type: application/octet-stream).
    pub fn post(&mut self, path: &str, body: &[u8], binary: bool) -> Result<Response, AdminError> {
        let content_type = if binary {
            "application/octet-stream"
        } else {
            "text/plain; charset=utf-8"
        };
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.request(&req)
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> Result<Response, AdminError> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr).into_bytes();
        self.request(&req)
    }

    fn request(&mut self, req: &[u8]) -> Result<Response, AdminError> {
        // A kept-alive connection may have been closed by the server since: retry once on a fresh one.
        // Publishes are not idempotent, but a request the server never read was never published.
        let reused = self.stream.is_some();
        match self.try_request(req) {
            Ok(r) => Ok(r),
            Err(AdminError::Io(_)) if reused => {
                self.stream = None;
                self.try_request(req)
            }
            Err(e) => Err(e),
        }
    }

    fn try_request(&mut self, req: &[u8]) -> Result<Response, AdminError> {
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        let stream = self.stream.as_mut().expect("connected above");
        let result = exchange(stream, &mut self.buf, req);
        match &result {
            Ok((_, keep_alive)) if *keep_alive => {}
            _ => self.stream = None,
        }
        result.map(|(r, _)| r)
    }
}

/// Writes a request and reads one response; returns it and whether the connection stays open.
fn exchange(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    req: &[u8],
) -> Result<(Response, bool), AdminError> {
    stream.write_all(req)?;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some((response, used, keep_alive)) = parse_response(buf)? {
            buf.drain(..used);
            return Ok((response, keep_alive));
        }
        if buf.len() > MAX_RESPONSE_BYTES {
            return Err(AdminError::Malformed("response too large"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(AdminError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Parses one complete response from the front of `buf` (a Content-Length body; the admin API sends no
/// chunked bodies): the response, bytes used, and whether the connection stays open (RFC 9112 §9.3).
pub fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize, bool)>, AdminError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(AdminError::Malformed("bad status line or header")),
    };
    let status = resp.code.ok_or(AdminError::Malformed("no status"))?;
    let mut length = 0usize;
    let mut keep_alive = resp.version == Some(1);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(AdminError::Malformed("bad Content-Length"))?;
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(AdminError::Malformed("chunked responses are not supported"));
        }
    }
    if length > MAX_RESPONSE_BYTES {
        return Err(AdminError::Malformed("response too large"));
    }
    if buf.len() < head + length {
        return Ok(None);
    }
    let body = buf[head..head + length].to_vec();
    Ok(Some((Response { status, body }, head + length, keep_alive)))
}

/// Sums of every sample in a Prometheus text exposition, by metric name (labels summed over).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `name{labels} value [timestamp]` or `name value [timestamp]`; label values may hold spaces.
        let (name, rest) = match line.find('{') {
            Some(open) => match line[open..].find('}') {
                Some(close) => (&line[..open], &line[open + close + 1..]),
                None => continue,
            },
            None => match line.split_once(char::is_whitespace) {
                Some((name, rest)) => (name, rest),
                None => continue,
            },
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        *out.entry(name.to_string()).or_insert(0.0) += value;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_response_with_body_and_keep_alive() {
        let buf = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1";
        let (r, used, keep) = parse_response(buf).unwrap().unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), used, keep),
            (202, &b"{}"[..], 46, true)
        );
    }

    #[test]
    fn partial_body_waits() {
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn connection_close_is_honoured() {
        let buf = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert!(!parse_response(buf).unwrap().unwrap().2);
    }

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# HELP densepush_connections_open x\n# TYPE densepush_connections_open gauge\n\
                    densepush_connections_open{reactor=\"0\"} 3\n\
                    densepush_connections_open{reactor=\"1\"} 4\n\
                    densepush_frames_delivered_total 1.5e3\n\
                    weird{label=\"a b\"} 2 1700000000\n";
        let m = parse_metrics(text);
        assert_eq!(m["densepush_connections_open"], 7.0);
        assert_eq!(m["densepush_frames_delivered_total"], 1500.0);
        assert_eq!(m["weird"], 2.0);
    }

    #[test]
    fn post_and_get_share_one_keep_alive_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            while !got.ends_with(b"\r\n\r\nhi") {
                let n = s.read(&mut chunk).unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            while !(got.ends_with(b"\r\n\r\n") && got.windows(4).any(|w| w == b"GET ")) {
                let n = s.read(&mut chunk).unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nx 1")
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let mut client = AdminClient::new(addr);
        assert_eq!(
            client.post("/publish/all", b"hi", false).unwrap().status,
            202
        );
        assert_eq!(client.get("/metrics").unwrap().body, b"x 1");
        let requests = server.join().unwrap();
        assert!(requests.starts_with("POST /publish/all HTTP/1.1\r\n"));
        assert!(requests.contains("Content-Length: 2\r\n\r\nhi"));
        assert!(requests.contains("GET /metrics HTTP/1.1\r\n"));
    }
}
