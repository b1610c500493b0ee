//! Server-Sent Events (WHATWG HTML §9.2, `text/event-stream`): the response head that opens a stream and the
//! events densepush writes into it, each built once and shared by every SSE recipient.
//!
//! Sans-IO bytes only. It does not parse the request (`handshake` recognises the SSE path), decide identity or
//! replay (`reactor`), or decide when a keepalive or a close event goes out (`conn::machine`).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use std::io::Write as _;

/// A comment line: ignored by EventSource, but it keeps proxies from timing the stream out and lets the server
/// notice a dead peer when the write fails (§9.2.6 "Authoring notes": a comment every 15 seconds or so).
pub static KEEPALIVE: [u8; 3] = *b":\n\n";

/// The `200` that opens a stream. The body is delimited by closing the connection (RFC 9112 §6.3 item 8), so
/// an event is written as it is, with no chunk framing: the same bytes go to every recipient. `retry_ms` is the
/// reconnection time the browser waits after the stream ends (§9.2.6 `retry`). `allow_origin`: the request's
/// Origin, when it passed the allow-list, so a page on another origin may read the stream (CORS).
pub fn response_head(retry_ms: u64, allow_origin: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache, no-transform\r\n\
         Connection: close\r\nX-Accel-Buffering: no\r\n"
    );
    if let Some(origin) = allow_origin.filter(|o| !o.contains(['\r', '\n'])) {
        let _ = write!(
            out,
            "Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n"
        );
    }
    let _ = write!(out, "\r\nretry: {retry_ms}\n\n");
    out
}

/// The event id of a message at `offset` in `stream`'s `epoch`: a `since` item (`STREAM@EPOCH:OFFSET`, see
/// `message::envelope::parse_since`) the client sends back as `Last-Event-ID`. `%`, `,` and control characters
/// in the stream name are percent-encoded: ids are one line (§9.2.6) and `since` items are comma-separated.
pub fn event_id(stream: &str, epoch: &str, offset: u64) -> String {
    let mut id = String::with_capacity(stream.len() + epoch.len() + 24);
    for c in stream.chars() {
        match c {
            '%' | ',' => id.push_str(if c == '%' { "%25" } else { "%2C" }),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    id.push_str(&format!("%{b:02X}"));
                }
            }
            c => id.push(c),
        }
    }
    let _ = std::fmt::Write::write_fmt(&mut id, format_args!("@{epoch}:{offset}"));
    id
}

/// One event: `id:` when the message has a place in its stream, `event: binary` and base64 for binary
/// payloads, and the text split into `data:` lines (§9.2.6: CRLF, LF and CR all end a line, so a payload's line
/// breaks come back as LF).
pub fn event(id: Option<&str>, name: Option<&str>, binary: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() * if binary { 2 } else { 1 } + 64);
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
    match (name, binary) {
        (Some(name), _) => {
            let _ = writeln!(out, "event: {name}");
        }
        (None, true) => out.extend_from_slice(b"event: binary\n"),
        (None, false) => {}
    }
    if binary {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(STANDARD.encode(payload).as_bytes());
        out.push(b'\n');
    } else {
        let mut rest = payload;
        loop {
            let end = rest.iter().position(|&b| b == b'\n' || b == b'\r');
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&rest[..end.unwrap_or(rest.len())]);
            out.push(b'\n');
            let Some(end) = end else { break };
            let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
                2
            } else {
                1
            };
            rest = &rest[end + skip..];
        }
    }
    out.push(b'\n');
    out
}

/// The event that ends a stream the backend closed (a kick): `event: close` with the code and reason as JSON,
/// so a client knows not to reconnect (EventSource itself would).
pub fn close_event(code: u16, reason: &str) -> Vec<u8> {
    let reason = serde_json::to_string(reason).unwrap_or_else(|_| "\"\"".into());
    let data = format!("{{\"code\":{code},\"reason\":{reason}}}");
    event(None, Some("close"), false, data.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_split_into_data_lines() {
        assert_eq!(event(None, None, false, b"hi"), b"data: hi\n\n");
        assert_eq!(
            event(Some("user:a@E:3"), None, false, b"a\nb\r\nc\rd"),
            b"id: user:a@E:3\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(event(None, None, false, b""), b"data: \n\n");
        assert_eq!(event(None, None, false, b"x\n"), b"data: x\ndata: \n\n");
    }

    #[test]
    fn binary_is_base64_with_its_own_event_name() {
        assert_eq!(
            event(None, None, true, &[0, 1, 2, 255]),
            b"event: binary\ndata: AAEC/w==\n\n"
        );
    }

    #[test]
    fn ids_are_since_items_on_one_line() {
        assert_eq!(event_id("user:42", "Ab3xYz12", 17), "user:42@Ab3xYz12:17");
        assert_eq!(
            event_id("channel:a,b%\n", "E", 1),
            "channel:a%2Cb%25%0A@E:1"
        );
        let parsed = crate::message::envelope::parse_since(&event_id("channel:a,b", "E", 9));
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].stream, "channel:a,b");
        assert_eq!(parsed[0].offset, 9);
    }

    #[test]
    fn the_head_opens_an_event_stream_and_sets_retry() {
        let head = String::from_utf8(response_head(2500, Some("https://app"))).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"));
        assert!(head.contains("Access-Control-Allow-Origin: https://app\r\n"));
        assert!(head.ends_with("\r\n\r\nretry: 2500\n\n"));
        let bare = String::from_utf8(response_head(1000, None)).unwrap();
        assert!(!bare.contains("Access-Control"));
    }

    #[test]
    fn close_event_carries_code_and_reason() {
        assert_eq!(
            close_event(4001, "bye \"x\""),
            b"event: close\ndata: {\"code\":4001,\"reason\":\"bye \\\"x\\\"\"}\n\n"
        );
    }
}
