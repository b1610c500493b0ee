//! The admin API: HTTP/1.1 on its own listener and thread, keep-alive and pipelining.
//!
//! It owns the admin sockets and what each request does: publishes (single and batch) go through the one publish
//! path (`publish`), kicks, presence and runtime subscriptions through the reactors' handle (`dispatch`). It does not touch client
//! connections; presence and kicks are answered by the reactors that own them. Request framing, the
//! per-connection state with its bounds and timeouts, routing and the batch body are sans-IO (`http`, `buffer`,
//! `conn`, `route`, `batch`); `server` is the I/O around them.

pub mod api;
pub mod batch;
pub mod buffer;
pub mod conn;
pub mod http;
pub mod route;
pub mod server;
pub mod stats;

pub use api::{constant_time_eq, Api, ApiSettings};
pub use server::{AdminHandle, AdminServer};
