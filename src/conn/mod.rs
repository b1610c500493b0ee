//! One client connection: its record in the reactor's slab and the sans-IO machine that holds its rules.
//!
//! - `state`: the phase and flags (two bytes) and the names derived from them (`Phase`, `Timer`);
//! - `machine`: every rule — handshake steps, frames, pings and pongs, sending, the one close path;
//! - `spill`: the heap buffers held only while busy, and their charge against the buffer budget;
//! - `outbox`: unsent frames as references to shared bytes;
//! - `transport`: the seam between the machine and the socket (plain TCP; TLS goes here);
//! - `echo`: `[diagnostics] echo`.
//!
//! It does not parse requests (`handshake`), decide identities (`auth`), index (`fanout`) or read sockets and
//! clocks (`reactor`). An idle open connection is 24 bytes in the slab and owns no heap memory.

pub mod echo;
pub mod inflate;
pub mod machine;
pub mod outbox;
pub mod spill;
pub mod state;
pub mod transport;

pub use machine::{Close, Ctx, Ending, Expired, Head, Machine, Next, Rules};
pub use state::Phase;

use std::net::TcpStream;

/// A connection record in the slab.
#[derive(Debug)]
pub struct Conn {
    /// The socket (non-blocking), registered edge-triggered for read and write once. A plain std stream: mio's
    /// wrapper carries a selector id in debug builds, and the record should be the same size in every build.
    pub stream: TcpStream,
    /// Generation carried in the mio token, so a stale event for a reused slab key is recognised.
    pub generation: u32,
    /// The protocol state.
    pub machine: Machine,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connection_record_is_small() {
        // The slab entry of an idle connection is the per-connection cost we promise to keep small.
        assert!(
            std::mem::size_of::<Conn>() <= 24,
            "Conn is {} bytes",
            std::mem::size_of::<Conn>()
        );
    }
}
