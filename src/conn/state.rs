//! The few bytes that say where a connection is: its phase and its flags, and the names derived from them.
//!
//! It owns the encoding of those two bytes and nothing else: [`Phase`] and [`Timer`] are views computed from
//! them, so an idle connection pays for no separate field per meaning (the way quinn-proto names its timers).
//! The rules that move a connection from one phase to the next live in `machine`.

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// TCP accepted, waiting for a complete upgrade request.
    Handshaking = 0,
    /// Upgraded: receives pushes, answers pings.
    Open = 1,
    /// We sent a close frame and wait for the client's (RFC 6455 §5.5.1); nothing but the close goes out.
    Closing = 2,
    /// Write what is queued (a close frame or an HTTP error), then close the TCP connection; read nothing more.
    Flushing = 3,
}

/// What the connection's one timer entry means, derived from its phase and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// The upgrade request must be complete by then (`websocket.handshake_timeout_ms`).
    Handshake,
    /// Time to ping (`websocket.ping_interval_ms` after the last ping was answered).
    Ping,
    /// A ping is out: some frame must have arrived by then (`websocket.pong_timeout_ms`).
    Pong,
    /// The close handshake or the final flush must be done by then (`websocket.close_timeout_ms`).
    Close,
}

/// A boolean property of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Flag {
    /// The live timer entry is the pong check, not the next ping.
    PingSent = 1,
    /// A frame arrived from the client since the last ping.
    Heard = 2,
    /// Upgraded at some point (counted among open connections until closed).
    Upgraded = 4,
    /// The client opted into envelopes (`?recover=1`, `since`, or the `densepush.v1` subprotocol), so it gets
    /// each message wrapped with its stream, epoch and offset (`history::envelope`).
    Recover = 8,
    /// The connection came in on the TLS listener: its transport is its TLS session (kept by the reactor).
    /// The machine's rules do not depend on it; it lives here because these bits are already paid for.
    Tls = 16,
    /// A close frame the server started (not the echo of the client's) is queued or held by the transport and
    /// not yet handed whole to the socket: when the connection goes it counts as given up.
    CloseUnsent = 32,
    /// Queued bytes went to the socket since the last ping: a client behind on reading is still reading.
    Drained = 64,
    /// The machine's acknowledgement mark was taken at a pong deadline of the current ping (not before).
    Marked = 128,
}

/// What the connection speaks once open, decided at the upgrade and fixed from then on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Wire {
    /// RFC 6455 frames, uncompressed.
    WebSocket = 0,
    /// RFC 6455 frames with permessage-deflate (RFC 7692) negotiated.
    WebSocketDeflate = 1,
    /// A Server-Sent Events stream (`text/event-stream`): events out, nothing in.
    Sse = 2,
}

/// Bits of the phase byte that hold the phase; the two above them hold the [`Wire`] (the flags byte is full,
/// and the phase needs two bits of its eight, so an idle connection pays nothing for the wire).
const PHASE_BITS: u8 = 0b11;
const WIRE_SHIFT: u8 = 2;

/// Phase, wire and flags in two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// The [`Phase`] in the low two bits, the [`Wire`] in the next two.
    phase: u8,
    flags: u8,
}

impl State {
    /// A connection just accepted: handshaking, plain WebSocket until decided otherwise, no flags.
    pub const fn new() -> State {
        State {
            phase: Phase::Handshaking as u8,
            flags: 0,
        }
    }

    /// The phase.
    pub fn phase(self) -> Phase {
        match self.phase & PHASE_BITS {
            0 => Phase::Handshaking,
            1 => Phase::Open,
            2 => Phase::Closing,
            _ => Phase::Flushing,
        }
    }

    /// Moves to another phase.
    pub fn set_phase(&mut self, phase: Phase) {
        self.phase = (self.phase & !PHASE_BITS) | phase as u8;
    }

    /// What the connection speaks.
    pub fn wire(self) -> Wire {
        match self.phase >> WIRE_SHIFT {
            0 => Wire::WebSocket,
            1 => Wire::WebSocketDeflate,
            _ => Wire::Sse,
        }
    }

    /// Sets what the connection speaks (at the upgrade).
    pub fn set_wire(&mut self, wire: Wire) {
        self.phase = (self.phase & PHASE_BITS) | ((wire as u8) << WIRE_SHIFT);
    }

    /// The phase and the wire in one byte, for a snapshot of the connection.
    pub fn phase_byte(self) -> u8 {
        self.phase
    }

    /// A state with the phase and wire of `byte` (from [`State::phase_byte`]) and no flags; `None` for a wire
    /// that does not exist.
    pub fn from_phase_byte(byte: u8) -> Option<State> {
        (byte >> WIRE_SHIFT <= Wire::Sse as u8).then_some(State {
            phase: byte,
            flags: 0,
        })
    }

    /// True if the flag is set.
    pub fn has(self, flag: Flag) -> bool {
        self.flags & flag as u8 != 0
    }

    /// Sets or clears a flag.
    pub fn set(&mut self, flag: Flag, on: bool) {
        if on {
            self.flags |= flag as u8;
        } else {
            self.flags &= !(flag as u8);
        }
    }

    /// The flag bits, for a snapshot.
    pub fn flags(self) -> u8 {
        self.flags
    }

    /// Sets every flag bit at once, from a snapshot (unknown bits are dropped).
    pub fn set_flags(&mut self, flags: u8) {
        self.flags = flags & 0b1_1111;
    }

    /// What the live timer entry means.
    pub fn timer(self) -> Timer {
        match self.phase() {
            Phase::Handshaking => Timer::Handshake,
            Phase::Open if self.has(Flag::PingSent) => Timer::Pong,
            Phase::Open => Timer::Ping,
            Phase::Closing | Phase::Flushing => Timer::Close,
        }
    }
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_two_bytes() {
        assert_eq!(std::mem::size_of::<State>(), 2);
    }

    #[test]
    fn timer_meaning_follows_phase_and_ping_flag() {
        let mut s = State::new();
        assert_eq!(s.timer(), Timer::Handshake);
        s.set_phase(Phase::Open);
        assert_eq!(s.timer(), Timer::Ping);
        s.set(Flag::PingSent, true);
        assert_eq!(s.timer(), Timer::Pong);
        s.set_phase(Phase::Closing);
        assert_eq!(s.timer(), Timer::Close);
        s.set_phase(Phase::Flushing);
        assert_eq!(s.timer(), Timer::Close);
    }

    #[test]
    fn wire_and_phase_share_a_byte_without_touching_each_other() {
        let mut s = State::new();
        assert_eq!(s.wire(), Wire::WebSocket);
        for wire in [Wire::Sse, Wire::WebSocketDeflate, Wire::WebSocket] {
            s.set_wire(wire);
            for phase in [
                Phase::Open,
                Phase::Closing,
                Phase::Flushing,
                Phase::Handshaking,
            ] {
                s.set_phase(phase);
                assert_eq!((s.phase(), s.wire()), (phase, wire));
            }
        }
    }

    #[test]
    fn flags_are_independent() {
        let mut s = State::new();
        s.set(Flag::Heard, true);
        s.set(Flag::Recover, true);
        s.set(Flag::Heard, false);
        assert!(!s.has(Flag::Heard));
        assert!(s.has(Flag::Recover));
        assert!(!s.has(Flag::Upgraded));
    }
}
