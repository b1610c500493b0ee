//! The admin API: HTTP/1.1 on its own listener and thread, keep-alive and pipelining.
//!
//! It owns the admin sockets and what each request does: publishes go through the one publish path
//! (`publish`), kicks and presence through the reactors' handle (`dispatch`). It does not touch client
//! connections; presence and kicks are answered by the reactors that own them. Request framing and routing are
//! sans-IO (`http`, `route`).

pub mod api;
pub mod http;
pub mod route;
pub mod server;
pub mod stats;

pub use api::{constant_time_eq, Api, ApiSettings};
pub use server::AdminServer;
