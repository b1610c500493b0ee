//! The protocols a client connection speaks, as sans-IO code: HTTP/1.1 syntax shared by every request parser
//! (`http`), the WebSocket opening handshake (`handshake`) and RFC 6455 framing (`frame`).
//!
//! Owns wire syntax and the RFC rules about it. Does not own sockets, clocks, configuration or what a request
//! is for: imports point down, so nothing here uses `admin`, `history`, `reactor` or `cluster`; they use this.

pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod http;
pub mod sse;
