//! densepush: a WebSocket push server that holds millions of mostly idle connections per host.
//!
//! Reactor threads (`reactor`) each own a `SO_REUSEPORT` listener, a slab of connections (`conn`), a fanout
//! index (`fanout`) and a timing wheel (`timer`). Every publish, from the admin API (`admin`) or another node
//! (`cluster`), takes one path (`publish`): framed once as a shared `message`, stored in `history` when its
//! stream keeps it, and handed to every reactor through `dispatch`, the one way to reach them. Protocol logic is
//! sans-IO: `proto` (HTTP helpers, the opening handshake, the frame codec), `auth`, `outbox`, `fanout` and
//! `timer` never touch a socket or a clock. Several nodes form a cluster through a Redis stream (`cluster`).
//! Clients that reconnect recover what they missed from per-stream history (`history`). Connection events go to
//! the backend's webhook from a bounded queue and a thread of their own (`events`).
#![deny(missing_docs)]

pub mod accept;
pub mod admin;
pub mod auth;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod dispatch;
pub mod events;
pub mod fanout;
pub mod handoff;
pub mod history;
pub mod message;
pub mod metrics;
pub mod proto;
pub mod publish;
pub mod reactor;
pub mod server;
pub mod shared_frame;
pub mod snapshot;
pub mod systemd;
pub mod timer;
pub mod tls;
