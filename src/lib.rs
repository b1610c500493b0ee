//! densepush: a WebSocket push server that holds millions of mostly idle connections per host.
//!
//! Reactor threads (`reactor`) each own a `SO_REUSEPORT` listener, a slab of connections (`conn`), a fanout
//! index (`fanout`) and a timing wheel (`timer`). The admin API (`admin`) frames a published message once
//! (`proto::frame`) and hands the shared bytes to every reactor through its `mailbox`. Protocol logic is
//! sans-IO: `proto` (HTTP helpers, the opening handshake, the frame codec), `auth`, `outbox`, `fanout` and
//! `timer` never touch a socket or a clock. Several nodes form a cluster over Redis pub/sub (`cluster`).
//! Clients that reconnect recover what they missed from per-stream history (`history`).
#![deny(missing_docs)]

pub mod accept;
pub mod admin;
pub mod auth;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod fanout;
pub mod history;
pub mod mailbox;
pub mod metrics;
pub mod proto;
pub mod reactor;
pub mod server;
pub mod timer;
pub mod tls;
