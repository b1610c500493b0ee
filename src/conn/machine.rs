//! The connection machine: every rule about one client connection — its phases, what its timer means, what it
//! writes, and how it closes — in one sans-IO state machine with its tests beside it.
//!
//! Inputs: client bytes (`handle_frames`, and during the handshake `join_head`/`keep_head`/`accept`), the
//! socket becoming writable (`handle_writable`) or failing (`handle_broken`), a timer entry firing
//! (`handle_timeout`), and the reactor's commands (`send` a frame, `close` for a [`Close`] reason). Outputs:
//! bytes written through the [`Transport`] it is handed for the call, entries armed in the reactor's timing
//! wheel, and a [`Next`] saying whether the reactor must remove the connection. It never reads a socket or a
//! clock and never touches the fanout index: the reactor does those and is the only caller.
//!
//! Memory is the point of its shape: the machine is a timer stamp, two state bytes and one pointer to heap
//! buffers ([`Buffers`]) that is null while the connection is idle. Frames are written straight through when
//! nothing is queued; only what the transport does not take is queued, as references to the shared frame.
//!
//! Every close goes through [`Machine::close`], whatever its reason: the reason decides the counter, the close
//! frame (RFC 6455 §5.5.1, §7.4) and whether the server then waits for the client's close (`Closing`) or
//! closes TCP once its last bytes are out (`Flushing`, RFC 6455 §7.1.1: the server closes TCP first).
//!
//! A close frame the server sends must arrive, even on a full socket (a slow reader): the connection keeps only
//! the rest of a partly written frame, drops the rest of its queue at once (a drain at shutdown flushes it
//! first, within the close deadline), queues the close frame behind that remainder and, if the socket cannot
//! take them, grows the socket's kernel send buffer by their size (up to [`CLOSE_ROOM_BYTES`]) so they are
//! handed over at once and the connection holds no payload while it waits for the client's close. Bytes in the
//! kernel survive the close of the socket, so a client that reads again later still gets the close frame. Each
//! server close frame ends counted as written or, when the deadline passes first, given up.

use super::echo::Echo;
use super::outbox::{Flush, Outbox, ENTRY_BYTES};
use super::spill::{Buffers, Spill};
use super::state::{Flag, Phase, State, Timer, Wire};
use super::transport::{write_some, Transport};
use crate::budget::Budget;
use crate::metrics::{ReactorMetrics, RejectKind};
use crate::proto::frame::Decoder;
use crate::proto::frame::{self, Event, Feed, ProtocolError, EMPTY_CLOSE_FRAME, PING_FRAME};
use crate::proto::handshake::Reject;
use crate::proto::sse;
use crate::shared_frame::SharedFrame;
use crate::snapshot::{FrameTable, Reader, SnapshotError, Writer};
use crate::timer::TimerWheel;
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;

/// Reason given when the server-wide buffer budget (`websocket.max_buffered_bytes_total`) refuses a buffer.
pub const BUDGET_EXHAUSTED: &str = "server busy: buffer budget exhausted";
/// Close reason for a slow consumer (code 1008).
pub const SLOW_CONSUMER: &str = "slow consumer: outbox limit exceeded";
/// Close reason at shutdown (code 1001).
pub const SHUTTING_DOWN: &str = "server shutting down";

/// The most unsent bytes (a started frame's tail and the close frame behind it) a closing connection hands to
/// the kernel at once by growing its socket's send buffer ([`Transport::make_room`]). A larger remainder waits
/// for the client to read, until the close deadline. This bounds the kernel memory a closing slow reader can
/// add; a slow reader of 4 KiB messages needs about 4 KiB.
pub const CLOSE_ROOM_BYTES: usize = 64 << 10;

/// The connection rules that come from the configuration, shared by every connection of a reactor.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Ticks a client has to complete the upgrade.
    pub handshake_timeout_ticks: u64,
    /// Ticks between pings.
    pub ping_interval_ticks: u64,
    /// Ticks a client has to send any frame after a ping.
    pub pong_timeout_ticks: u64,
    /// Ticks to wait for the client's close frame or the final flush.
    pub close_timeout_ticks: u64,
    /// Inbound frame limits.
    pub frame_limits: frame::Limits,
    /// Unsent bytes per connection before it is closed as a slow consumer.
    pub max_outbox_bytes: usize,
    /// `[diagnostics] echo`: send each complete client data message back.
    pub echo: bool,
}

impl Rules {
    /// The longest delay a timing wheel must hold for these rules.
    pub fn max_delay_ticks(&self) -> u64 {
        [
            self.handshake_timeout_ticks,
            self.ping_interval_ticks,
            self.pong_timeout_ticks,
            self.close_timeout_ticks,
        ]
        .into_iter()
        .max()
        .unwrap_or(1)
    }
}

/// What the machine needs from its reactor for one call.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The connection's slab key (timer entries carry it).
    pub key: u32,
    /// The configured rules.
    pub rules: &'a Rules,
    /// The server-wide buffer budget.
    pub budget: &'a Budget,
    /// The reactor's timing wheel.
    pub wheel: &'a mut TimerWheel,
    /// The reactor's counters.
    pub metrics: &'a ReactorMetrics,
}

/// Why a connection ends, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Close handshake done, HTTP error sent, a deadline passed: already counted where it was decided.
    Done,
    /// EOF or a socket error without a close handshake (counted as an abrupt close).
    Abrupt,
}

/// What the reactor must do after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Next {
    /// Keep the connection.
    Continue,
    /// Remove it now: out of the index, socket closed.
    Remove(Ending),
}

/// What a fired timer entry asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Expired {
    /// The entry is not the connection's live one (rescheduled since): nothing to do.
    Stale,
    /// Handled; carry on as this says.
    Next(Next),
    /// The pong deadline passed with nothing heard. Read what the socket holds (under load a pong can sit
    /// unread past its deadline), then call [`Machine::pong_deadline`].
    Silent,
}

/// Why the server closes (or refuses) a connection. Every close takes this one path.
#[derive(Debug, Clone, Copy)]
pub enum Close<'a> {
    /// The client's close frame arrived (RFC 6455 §5.5.1) with this code (`None`: it had no payload).
    Peer(Option<u16>),
    /// The client broke the protocol (RFC 6455 §7.1.7).
    Protocol(ProtocolError),
    /// A frame straddles reads but the buffer budget refused its state: 1013 Try Again Later.
    Budget,
    /// Unsent data passed `max_outbox_bytes`: 1008.
    SlowConsumer,
    /// The backend asked (1000 or 3000-4999).
    Kick {
        /// Close code.
        code: u16,
        /// Close reason (UTF-8).
        reason: &'a str,
    },
    /// The server is draining: 1001.
    Shutdown,
    /// The upgrade request is refused with an HTTP status (handshake phase only).
    Refuse(&'a Reject),
}

/// Request-head bytes to keep until the rest arrives.
#[derive(Debug)]
pub enum Head<'a> {
    /// Bytes read just now (in the reactor's scratch buffer): copied into the connection's buffer.
    Fresh(&'a [u8]),
    /// The buffer [`Machine::join_head`] returned, grown by the latest read: kept as it is.
    Joined(Vec<u8>),
}

/// A frame to transmit: one shared with other connections (a published message, charged once however many
/// queues hold it), or one of the connection's own (a pong, a ping, a close frame, an HTTP answer), which
/// becomes a shared frame of one holder only if it has to be queued.
#[derive(Debug)]
enum Out<'a> {
    Shared(&'a SharedFrame),
    Own(Bytes),
}

impl Out<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Out::Shared(frame) => frame.bytes(),
            Out::Own(bytes) => bytes,
        }
    }

    /// The frame as queues hold it.
    fn to_shared(&self) -> SharedFrame {
        match self {
            Out::Shared(frame) => (*frame).clone(),
            Out::Own(bytes) => SharedFrame::new(bytes.clone()),
        }
    }
}

/// What happened to a frame handed to the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Written, or queued behind earlier frames.
    Ok,
    /// Over the outbox limit or the budget; the connection must go as a slow consumer.
    Overflow,
    /// The socket failed.
    Failed,
}

/// One connection's protocol state: 16 bytes while idle.
#[derive(Debug)]
pub struct Machine {
    /// Stamp of the connection's one live timer entry.
    timer_stamp: u32,
    state: State,
    /// Two meanings that never overlap in time, in bytes that would be padding (the record stays 16 bytes):
    /// while open, the client's acknowledged bytes at the last pong deadline that found it behind
    /// (`Flag::Marked`), in KiB, wrapping: whether it has been reading its backlog since ([`acked_mark`]); once
    /// closing, the code of the first close frame exchanged (ours, or the client's), for the disconnect event.
    /// The pong deadline is armed only while open, and the close code is written only when leaving `Open`.
    mark: u16,
    buffers: Buffers,
}

/// Acknowledged bytes as the machine remembers them: KiB, wrapping at 64 MiB. A client that reads less than
/// 1 KiB in a pong timeout counts as not reading; one that read a multiple of exactly 64 MiB in one is the
/// only other miss.
fn acked_mark(acked: u64) -> u16 {
    (acked >> 10) as u16
}

impl Machine {
    /// A connection just accepted (on the TLS listener if `tls`): handshaking, with the handshake deadline
    /// armed. For TLS the deadline covers the TLS handshake and the upgrade together.
    pub fn new(cx: &mut Ctx<'_>, tls: bool) -> Machine {
        let mut machine = Machine {
            timer_stamp: 0,
            state: State::new(),
            mark: 0,
            buffers: Buffers::default(),
        };
        machine.state.set(Flag::Tls, tls);
        machine.arm(cx, cx.rules.handshake_timeout_ticks);
        machine
    }

    /// Whether a timer entry with `stamp` is this connection's live one.
    pub fn owns_timer(&self, stamp: u32) -> bool {
        stamp == self.timer_stamp
    }

    /// Whether the connection's transport is TLS.
    pub fn is_tls(&self) -> bool {
        self.state.has(Flag::Tls)
    }

    /// Where the connection is in its life.
    pub fn phase(&self) -> Phase {
        self.state.phase()
    }

    /// Upgraded and not closing: it receives pushes.
    pub fn is_open(&self) -> bool {
        self.phase() == Phase::Open
    }

    /// Whether the reactor should read from the socket (not once the connection only flushes its last bytes).
    pub fn reads(&self) -> bool {
        self.phase() != Phase::Flushing
    }

    /// Whether the client opted into envelopes.
    pub fn wants_envelopes(&self) -> bool {
        self.state.has(Flag::Recover)
    }

    /// What the connection speaks (decided at the upgrade).
    pub fn wire(&self) -> Wire {
        self.state.wire()
    }

    /// Whether the connection is a Server-Sent Events stream.
    pub fn is_sse(&self) -> bool {
        self.state.wire() == Wire::Sse
    }

    /// Whether the connection negotiated permessage-deflate.
    pub fn deflates(&self) -> bool {
        self.state.wire() == Wire::WebSocketDeflate
    }

    /// The code the connection's close handshake began with (the first close frame, ours or the client's;
    /// 1005 for a client close without a code, RFC 6455 §7.4.1); `None` when it ends without one (EOF, a reset,
    /// a silent client), which RFC 6455 §7.1.5 reports as 1006.
    pub fn close_code(&self) -> Option<u16> {
        let closing = matches!(self.phase(), Phase::Closing | Phase::Flushing);
        (closing && self.mark != 0).then_some(self.mark)
    }

    /// Whether the connection was upgraded at some point (so it counts among open connections).
    pub fn was_upgraded(&self) -> bool {
        self.state.has(Flag::Upgraded)
    }

    /// Whether the connection holds heap buffers now.
    pub fn holds_buffers(&self) -> bool {
        self.buffers.is_allocated()
    }

    /// Unsent bytes queued.
    pub fn queued_bytes(&self) -> usize {
        self.buffers.queued_bytes()
    }

    // ---- handshake ---------------------------------------------------------------------------------------

    /// Joins `data` to the partial request head kept from earlier reads, if any (`Ok(None)`: nothing kept, parse
    /// `data` where it is). The caller parses the joined head, then hands it back with [`Machine::keep_head`]
    /// if it is still incomplete. `Err` when the buffer budget refuses the growth (the connection is answered
    /// 503).
    pub fn join_head<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        data: &[u8],
    ) -> Result<Option<Vec<u8>>, Next> {
        if self.buffers.get().is_none_or(|s| s.head.is_empty()) {
            return Ok(None);
        }
        if self.buffers.try_grow(cx.budget, data.len()).is_none() {
            return Err(self.refuse_busy(cx, t));
        }
        let spill = self.buffers.get_mut().expect("a head is buffered");
        let mut head = std::mem::take(&mut spill.head);
        head.reserve_exact(data.len());
        head.extend_from_slice(data);
        Ok(Some(head))
    }

    /// Keeps an incomplete request head until more bytes arrive (the handshake deadline still runs). A fresh
    /// head the buffer budget cannot hold is answered 503.
    pub fn keep_head<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        head: Head<'_>,
    ) -> Next {
        match head {
            Head::Fresh(bytes) => {
                let Some(fresh) = self.buffers.try_grow(cx.budget, bytes.len()) else {
                    return self.refuse_busy(cx, t);
                };
                let (spill, _) = self.buffers.spill_mut();
                spill.head.reserve_exact(bytes.len());
                spill.head.extend_from_slice(bytes);
                if fresh {
                    cx.metrics.buffers_live.fetch_add(1, Relaxed);
                }
            }
            Head::Joined(head) => self.buffers.spill_mut().0.head = head,
        }
        self.settle(cx);
        Next::Continue
    }

    /// The upgrade was accepted: writes the `101` answer, opens the connection and arms the first ping.
    /// `recover` opts the connection into envelopes. Frames the client sent behind its request go to
    /// [`Machine::handle_frames`] next.
    pub fn accept<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        response: Vec<u8>,
        recover: bool,
    ) -> Next {
        self.accept_as(cx, t, response, recover, Wire::WebSocket)
    }

    /// [`Machine::accept`] for a connection that speaks `wire`: a WebSocket with permessage-deflate, or an SSE
    /// stream (`response` is then the `200` head and the stream's first bytes; its pings become keepalive
    /// comments).
    pub fn accept_as<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        response: Vec<u8>,
        recover: bool,
        wire: Wire,
    ) -> Next {
        debug_assert_eq!(self.phase(), Phase::Handshaking);
        self.state.set_wire(wire);
        self.state.set_phase(Phase::Open);
        self.state.set(Flag::Upgraded, true);
        self.state.set(Flag::Recover, recover);
        self.arm(cx, cx.rules.ping_interval_ticks);
        if let Some(spill) = self.buffers.get_mut() {
            spill.head = Vec::new();
        }
        match self.deliver(cx, t, Out::Own(Bytes::from(response)), true) {
            Next::Continue => {
                self.release_if_idle(cx);
                Next::Continue
            }
            gone => gone,
        }
    }

    fn refuse_busy<T: Transport + ?Sized>(&mut self, cx: &mut Ctx<'_>, t: &mut T) -> Next {
        self.close(cx, t, Close::Refuse(&Reject::Unavailable(BUDGET_EXHAUSTED)))
    }

    // ---- data ----------------------------------------------------------------------------------------------

    /// Sends a data frame (a push, a replayed message) within the outbox limit; a connection over it is closed
    /// as a slow consumer. Nothing is sent unless the connection is open: once our close frame is out nothing
    /// may follow it (RFC 6455 §5.5.1).
    pub fn send<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        frame: &SharedFrame,
    ) -> Next {
        if !self.is_open() {
            return Next::Continue;
        }
        self.deliver(cx, t, Out::Shared(frame), true)
    }

    /// Decodes client frames: answers pings, echoes data in echo mode, and closes on a close frame or a
    /// protocol violation.
    pub fn handle_frames<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        data: &mut [u8],
    ) -> Next {
        self.state.set(Flag::Heard, true);
        if self.is_sse() {
            // An SSE client sends nothing after its request (HTTP/1.1 without pipelining): whatever comes is
            // read and dropped; its EOF ends the stream.
            return Next::Continue;
        }
        let limits = frame::Limits {
            deflate: self.deflates(),
            ..cx.rules.frame_limits
        };
        // The DEFLATE bytes of a compressed message that straddled reads.
        let mut deflated = self
            .buffers
            .get_mut()
            .map(|s| std::mem::take(&mut s.deflated))
            .unwrap_or_default();
        let mut inflate_error: Option<ProtocolError> = None;
        // The decoder lives on the stack unless a frame straddles reads; then it waits in the spill.
        let mut decoder = self
            .buffers
            .get_mut()
            .map(|s| std::mem::take(&mut s.decoder))
            .unwrap_or_default();
        let mut pongs: Vec<Bytes> = Vec::new();
        let mut peer_close: Option<Option<u16>> = None;
        let (mut pings, mut pongs_in, mut messages) = (0u64, 0u64, 0u64);
        let mut echo = cx.rules.echo.then(|| Echo::resume(self.buffers.get_mut()));
        let max_message_bytes = limits.max_message_bytes;
        let result = decoder.feed(data, &limits, |event| match event {
            // After a compressed message failed, the connection is closing with its code: nothing more counts.
            _ if inflate_error.is_some() => {}
            Event::Ping(payload) => {
                pings += 1;
                pongs.push(frame::encode_pong(payload));
            }
            Event::Pong(_) => pongs_in += 1,
            Event::Close { code, .. } => peer_close = Some(code),
            Event::Data {
                text,
                chunk,
                last,
                compressed: true,
                ..
            } => {
                deflated.extend_from_slice(chunk);
                if last {
                    messages += 1;
                    let result =
                        super::inflate::message(&deflated, text, max_message_bytes, echo.as_mut());
                    inflate_error = result.err();
                    deflated = Vec::new();
                }
            }
            Event::Data {
                text, chunk, last, ..
            } => {
                messages += u64::from(last);
                if let Some(echo) = echo.as_mut() {
                    echo.chunk(text, chunk, last);
                }
            }
        });
        let result = match inflate_error {
            Some(error) => Err(error),
            None => result,
        };
        ReactorMetrics::add(&cx.metrics.pings_received, pings);
        ReactorMetrics::add(&cx.metrics.pongs_received, pongs_in);
        ReactorMetrics::add(&cx.metrics.messages_received, messages);
        // A frame straddles reads: its state needs the spill, which the budget may refuse. (After an error or a
        // close the state no longer matters: the connection is ending with its own code.)
        if !decoder.is_idle() && matches!(result, Ok(Feed::More)) {
            let Some(fresh) = self.buffers.try_grow(cx.budget, deflated.capacity()) else {
                return self.close(cx, t, Close::Budget);
            };
            let spill = self.buffers.get_mut().expect("try_grow allocates");
            spill.decoder = decoder;
            spill.deflated = deflated;
            if fresh {
                cx.metrics.buffers_live.fetch_add(1, Relaxed);
            }
        }
        let echoes = match echo {
            Some(echo) => {
                let (frames, partial) = echo.suspend();
                if !partial.is_empty() {
                    // The unfinished message waits in the spill, charged like any buffer: the charge of the one it
                    // replaces (taken out by `Echo::resume`) goes back first.
                    self.settle(cx);
                    let Some(fresh) = self.buffers.try_grow(cx.budget, partial.capacity()) else {
                        return self.close(cx, t, Close::Budget);
                    };
                    self.buffers.spill_mut().0.echo = partial;
                    if fresh {
                        cx.metrics.buffers_live.fetch_add(1, Relaxed);
                    }
                }
                frames
            }
            None => Vec::new(),
        };
        for answer in pongs.into_iter().chain(echoes) {
            // Once our close frame is out, nothing else may follow it (RFC 6455 §5.5.1), pongs included.
            if !self.is_open() {
                break;
            }
            if let Next::Remove(ending) = self.deliver(cx, t, Out::Own(answer), true) {
                return Next::Remove(ending);
            }
        }
        match result {
            Err(error) => self.close(cx, t, Close::Protocol(error)),
            Ok(Feed::Closed) => self.close(cx, t, Close::Peer(peer_close.flatten())),
            Ok(Feed::More) => {
                self.release_if_idle(cx);
                Next::Continue
            }
        }
    }

    /// The socket can take more: writes what is queued.
    pub fn handle_writable<T: Transport + ?Sized>(&mut self, cx: &mut Ctx<'_>, t: &mut T) -> Next {
        self.flush(cx, t)
    }

    /// The client went away (EOF) or the socket failed.
    pub fn handle_broken(&self) -> Next {
        Next::Remove(self.ending(Ending::Abrupt))
    }

    // ---- time ----------------------------------------------------------------------------------------------

    /// A timer entry with `stamp` fired for this connection.
    pub fn handle_timeout<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        stamp: u32,
    ) -> Expired {
        if stamp != self.timer_stamp {
            return Expired::Stale;
        }
        match self.state.timer() {
            Timer::Handshake => {
                cx.metrics.reject(RejectKind::Timeout);
                Expired::Next(Next::Remove(Ending::Done))
            }
            Timer::Ping if self.is_sse() => {
                // EventSource answers nothing: a comment keeps proxies from timing the stream out, and a dead
                // peer shows when the kernel gives up on it (or as a slow consumer once the outbox fills).
                self.arm(cx, cx.rules.ping_interval_ticks);
                ReactorMetrics::inc(&cx.metrics.pings_sent);
                let keepalive = Out::Own(Bytes::from_static(&sse::KEEPALIVE));
                Expired::Next(self.deliver(cx, t, keepalive, true))
            }
            Timer::Ping => {
                self.state.set(Flag::PingSent, true);
                self.state.set(Flag::Heard, false);
                self.state.set(Flag::Drained, false);
                self.state.set(Flag::Marked, false);
                self.arm(cx, cx.rules.pong_timeout_ticks);
                ReactorMetrics::inc(&cx.metrics.pings_sent);
                Expired::Next(self.deliver(cx, t, Out::Own(Bytes::from_static(&PING_FRAME)), true))
            }
            Timer::Pong if self.state.has(Flag::Heard) => {
                self.back_to_pinging(cx);
                Expired::Next(Next::Continue)
            }
            Timer::Pong => Expired::Silent,
            // The client did not finish the close handshake, or did not read our last bytes, in time.
            Timer::Close => Expired::Next(self.close_deadline(cx, t)),
        }
    }

    /// After [`Expired::Silent`] and a last read: a connection that still sent nothing since the ping is dead
    /// (no close frame would arrive); one that did goes back to the ping rhythm.
    ///
    /// Unless our ping may still wait behind bytes the client has not read (queued here, or held by the kernel):
    /// then the client may not have seen it, and its silence says only that it is behind on reading, which
    /// `max_outbox_bytes` judges. The check is repeated one pong timeout later as long as it keeps reading
    /// (queued bytes went out, or its TCP acknowledged more since the last check; the first check only takes
    /// that reading, so the kernel is asked only about clients found silent, not at every ping); one that read
    /// nothing between two checks is closed as a slow consumer, with a close frame that tells it why (and
    /// arrives if it ever reads again), not dropped as silent.
    pub fn pong_deadline<T: Transport + ?Sized>(&mut self, cx: &mut Ctx<'_>, t: &mut T) -> Next {
        if self.state.timer() != Timer::Pong {
            return Next::Continue; // the read changed its phase (it closed)
        }
        if self.state.has(Flag::Heard) {
            self.back_to_pinging(cx);
            return Next::Continue;
        }
        let kernel = t.progress();
        let behind = self.buffers.queued_bytes() > 0
            || t.holds_unsent()
            || kernel.is_some_and(|p| p.holding);
        if behind {
            let now = kernel.map(|p| acked_mark(p.acked));
            let marked = self.state.has(Flag::Marked);
            let reading =
                self.state.has(Flag::Drained) || !marked || now.is_some_and(|now| now != self.mark);
            if reading {
                self.state.set(Flag::Drained, false);
                self.state.set(Flag::Marked, true);
                self.mark = now.unwrap_or(self.mark);
                self.arm(cx, cx.rules.pong_timeout_ticks);
                return Next::Continue;
            }
            log::debug!(
                "connection {}: read nothing of its backlog for a pong timeout: slow consumer",
                cx.key
            );
            return self.close(cx, t, Close::SlowConsumer);
        }
        log::debug!("connection {}: no pong: closed", cx.key);
        ReactorMetrics::inc(&cx.metrics.pong_timeouts);
        Next::Remove(Ending::Done)
    }

    fn back_to_pinging(&mut self, cx: &mut Ctx<'_>) {
        self.state.set(Flag::PingSent, false);
        let rules = cx.rules;
        self.arm(
            cx,
            rules
                .ping_interval_ticks
                .saturating_sub(rules.pong_timeout_ticks),
        );
    }

    fn arm(&mut self, cx: &mut Ctx<'_>, ticks: u64) {
        self.timer_stamp = cx.wheel.schedule(cx.key, ticks);
    }

    // ---- closing -------------------------------------------------------------------------------------------

    /// Starts closing the connection for `why`: the one close path. Open connections get a close frame; a
    /// handshaking one gets its HTTP refusal, or is dropped if it never upgraded.
    ///
    /// What was queued and has not started going out is dropped at once, except at a drain (`Shutdown`),
    /// which sends it first: the close frame goes behind at most the rest of one partly written frame. When the
    /// socket cannot take those last bytes, its send buffer is grown to take them (up to
    /// [`CLOSE_ROOM_BYTES`]), so the frame arrives even if the client reads only after the server gave up.
    pub fn close<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        why: Close<'_>,
    ) -> Next {
        let phase = self.phase();
        match (phase, why) {
            // Its last bytes are already on their way.
            (Phase::Flushing, _) => return Next::Continue,
            (Phase::Handshaking, Close::Refuse(reject)) => return self.refuse(cx, t, reject),
            // Never upgraded: there is nobody to send a close frame to.
            (Phase::Handshaking, _) => return Next::Remove(Ending::Done),
            // Our close frame is already out; the client's close or the close deadline ends it.
            (Phase::Closing, Close::Kick { .. } | Close::Shutdown | Close::SlowConsumer) => {
                return Next::Continue
            }
            (_, Close::Refuse(_)) => {
                debug_assert!(false, "refusals happen only during the handshake");
                return Next::Continue;
            }
            _ => {}
        }
        let was_open = phase == Phase::Open;
        let metrics = cx.metrics;
        // The close frame, and whether the server then waits for the client's close (`Closing`) or closes TCP
        // once its last bytes are out (`Flushing`).
        let (code, reason, mut next) = match why {
            Close::Peer(code) => {
                if was_open {
                    ReactorMetrics::inc(&metrics.client_closes);
                }
                // Echo the code the client sent (RFC 6455 §5.5.1); an empty close is answered empty.
                (code, "", Phase::Flushing)
            }
            Close::Protocol(error) => {
                ReactorMetrics::inc(&metrics.protocol_error_closes);
                log::debug!("connection {}: protocol error: {error}", cx.key);
                (Some(error.close_code()), error.reason(), Phase::Flushing)
            }
            Close::Budget => {
                ReactorMetrics::inc(&metrics.budget_closes);
                log::debug!(
                    "connection {}: buffer budget exhausted, closing with 1013",
                    cx.key
                );
                // 1013 Try Again Later (RFC 6455 §7.4.1 via the IANA registry, §11.7).
                (Some(1013), BUDGET_EXHAUSTED, Phase::Flushing)
            }
            Close::SlowConsumer => {
                ReactorMetrics::inc(&metrics.slow_consumer_closes);
                if self.is_sse() {
                    ReactorMetrics::inc(&metrics.sse_slow_consumer_closes);
                }
                (Some(1008), SLOW_CONSUMER, Phase::Closing)
            }
            Close::Kick { code, reason } => (Some(code), reason, Phase::Closing),
            Close::Shutdown => (Some(1001), SHUTTING_DOWN, Phase::Closing),
            Close::Refuse(_) => unreachable!("handled above"),
        };
        // An SSE stream has no close handshake: it ends when its last bytes are out (a drain's queued events
        // first), the client's EventSource reconnecting by itself unless told otherwise by `event: close`.
        let sse = self.is_sse();
        if sse {
            next = Phase::Flushing;
        }
        if was_open {
            // The first close decides the code; the other side's echo (which finds us `Closing`) does not
            // change it. From here on `mark` is the close code, no longer an acknowledgement mark.
            self.mark = code.unwrap_or(1005);
        }
        // A drain delivers what was accepted before saying goodbye (within the close deadline); every other
        // close keeps only what must finish (a partly written frame) and frees the rest now: the connection is
        // ending and says why, accepted messages are not dropped silently.
        let drain = matches!(why, Close::Shutdown);
        if was_open && !drain {
            if let Some(spill) = self.buffers.get_mut() {
                spill.outbox.drop_unstarted(cx.budget);
            }
            self.settle(cx);
        }
        self.state.set_phase(next);
        self.arm(cx, cx.rules.close_timeout_ticks);
        let close_event = match why {
            // A kick tells the client not to come back; any other end lets EventSource reconnect (a drain, a
            // slow reader whose stream resumes from its last id).
            Close::Kick { code, reason } => Some(Bytes::from(sse::close_event(code, reason))),
            _ => None,
        };
        if was_open && sse {
            if let Some(event) = close_event {
                if let Sent::Failed = self.transmit(cx, t, Out::Own(event), false) {
                    return Next::Remove(self.ending(Ending::Abrupt));
                }
                if !drain {
                    self.make_room(t);
                }
            }
        } else if was_open {
            let frame = match code {
                Some(code) => frame::encode_close(code, reason),
                None => Bytes::from_static(&EMPTY_CLOSE_FRAME),
            };
            // Unbounded: a close frame (at most 127 bytes) must go out whatever the outbox holds.
            let server = !matches!(why, Close::Peer(_));
            if let Sent::Failed = self.transmit(cx, t, Out::Own(frame), false) {
                if server {
                    ReactorMetrics::inc(&metrics.close_frames_given_up);
                }
                return Next::Remove(self.ending(Ending::Abrupt));
            }
            if server {
                self.state.set(Flag::CloseUnsent, true);
                if !drain {
                    self.make_room(t);
                }
            }
        }
        self.flush(cx, t)
    }

    /// The close deadline passed (`websocket.close_timeout_ms` after the close began, or the end of a drain):
    /// the connection goes. A close frame still unsent gets a last chance — what has not started going out is
    /// dropped and the socket's buffer grown for the rest — and is counted written or given up.
    pub fn close_deadline<T: Transport + ?Sized>(&mut self, cx: &mut Ctx<'_>, t: &mut T) -> Next {
        if self.state.has(Flag::CloseUnsent) {
            if let Some(spill) = self.buffers.get_mut() {
                spill.outbox.drop_unstarted_but_last(cx.budget);
            }
            self.settle(cx);
            if self.make_room(t) {
                let _ = self.flush(cx, t);
            }
            self.give_up_close(cx);
        }
        Next::Remove(Ending::Done)
    }

    /// Grows the socket's send buffer so the connection's last bytes (what is queued and what the transport
    /// holds) go out now, if they are at most [`CLOSE_ROOM_BYTES`]; true if they fit or there was nothing left.
    /// The caller flushes.
    fn make_room<T: Transport + ?Sized>(&mut self, t: &mut T) -> bool {
        let queued = self.buffers.queued_bytes();
        if queued == 0 && !t.holds_unsent() {
            return true;
        }
        queued <= CLOSE_ROOM_BYTES && t.make_room(queued)
    }

    /// Counts a server close frame that never reached the socket (the connection is going).
    fn give_up_close(&mut self, cx: &Ctx<'_>) {
        if self.state.has(Flag::CloseUnsent) {
            self.state.set(Flag::CloseUnsent, false);
            ReactorMetrics::inc(&cx.metrics.close_frames_given_up);
        }
    }

    /// Answers a refused upgrade with its HTTP status and closes once it is written.
    fn refuse<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        reject: &Reject,
    ) -> Next {
        cx.metrics.reject(RejectKind::from_status(reject.status()));
        self.state.set_phase(Phase::Flushing);
        if let Some(spill) = self.buffers.get_mut() {
            spill.head = Vec::new();
        }
        self.arm(cx, cx.rules.close_timeout_ticks);
        // Unbounded: a refusal is a short answer that must go out even when the buffer budget is what refused
        // (a bounded send over budget would answer an HTTP client with a WebSocket close frame).
        match self.deliver(cx, t, Out::Own(Bytes::from(reject.response())), false) {
            Next::Continue => self.flush(cx, t),
            gone => gone,
        }
    }

    /// Frees the connection's buffers (it is being removed) and gives their budget back. A close frame still
    /// unsent is counted as given up.
    pub fn teardown(&mut self, cx: &Ctx<'_>) {
        self.give_up_close(cx);
        if self.buffers.free(cx.budget, &cx.metrics.outbox_bytes) {
            cx.metrics.buffers_live.fetch_sub(1, Relaxed);
        }
    }

    // ---- moving to another process ---------------------------------------------------------------------

    /// Writes what a successor process needs to carry on with this connection (the live upgrade): phase and
    /// flags, a partial request head, a frame in progress, the queued frames (by reference to `frames`, which
    /// sends each shared frame once), an echo message in progress. The timer is not written: the successor arms
    /// the one its phase calls for, afresh.
    pub fn snapshot(&self, w: &mut Writer, frames: &mut FrameTable) {
        // The phase with the wire (WebSocket, with permessage-deflate, or SSE) in the bits above it: a snapshot
        // written before there were wires has 0 there, a plain WebSocket.
        w.u8(self.state.phase_byte());
        w.u8(self.state.flags());
        // Whatever `mark` means in this phase (an acknowledgement mark, or the close code), it means the same
        // in the successor, which restores the phase with it.
        w.u16(self.mark);
        let spill = self.buffers.get();
        w.bytes_field(spill.map_or(&[][..], |s| &s.head));
        let mut decoder = Writer::new();
        let moved = spill.is_some_and(|s| !s.decoder.is_idle() && s.decoder.snapshot(&mut decoder));
        w.bool(moved);
        if moved {
            w.raw(decoder.bytes());
            // The DEFLATE bytes of a compressed message in progress follow its decoder (only then, so a
            // snapshot written before compression existed reads the same).
            if let Some(s) = spill.filter(|s| s.decoder.in_compressed_message()) {
                w.bytes_field(&s.deflated);
            }
        }
        match spill {
            Some(s) => {
                let (queued, head_written) = s.outbox.queued();
                let ids: Vec<u32> = queued.map(|f| frames.id(f)).collect();
                w.u32(ids.len() as u32);
                if !ids.is_empty() {
                    // Only the head can be partly written (at most a frame's length: it fits).
                    w.u32(head_written as u32);
                }
                for id in ids {
                    w.u32(id);
                }
                w.bytes_field(&s.echo);
            }
            None => {
                w.u32(0);
                w.bytes_field(&[]);
            }
        }
    }

    /// A connection written by [`Machine::snapshot`], with its buffers charged to the budget and the timer its
    /// phase calls for armed in `cx`'s wheel.
    pub fn restore(
        cx: &mut Ctx<'_>,
        r: &mut Reader<'_>,
        frames: &FrameTable,
    ) -> Result<Machine, SnapshotError> {
        let state_byte = r.u8("phase")?;
        let mut state =
            State::from_phase_byte(state_byte).ok_or(SnapshotError::Invalid("phase"))?;
        state.set_flags(r.u8("flags")?);
        let mark = r.u16("mark")?;
        let head = r.bytes_field("head")?.to_vec();
        let decoder = match r.bool("decoder present")? {
            true => Some(Decoder::restore(r)?),
            false => None,
        };
        let deflated = match &decoder {
            Some(d) if d.in_compressed_message() => r.bytes_field("deflated")?.to_vec(),
            _ => Vec::new(),
        };
        let count = r.u32("outbox length")?;
        let head_written = match count {
            0 => 0,
            _ => r.u32("outbox head written")? as usize,
        };
        let mut queued = Vec::with_capacity(count.min(1 << 16) as usize);
        for _ in 0..count {
            queued.push(frames.frame(r.u32("outbox frame")?)?);
        }
        if queued
            .first()
            .is_some_and(|head| head_written >= head.len())
        {
            return Err(SnapshotError::Invalid("outbox head written"));
        }
        let echo = r.bytes_field("echo")?.to_vec();
        let spill = Spill {
            head,
            decoder: decoder.unwrap_or_default(),
            outbox: Outbox::from_queued(queued, head_written, cx.budget),
            charged: 0,
            counted: 0,
            echo,
            deflated,
        };
        let mut machine = Machine {
            timer_stamp: 0,
            state,
            mark,
            buffers: Buffers::default(),
        };
        if machine
            .buffers
            .install(Some(spill), cx.budget, &cx.metrics.outbox_bytes)
        {
            cx.metrics.buffers_live.fetch_add(1, Relaxed);
        }
        let rules = cx.rules;
        let ticks = match machine.state.timer() {
            Timer::Handshake => rules.handshake_timeout_ticks,
            Timer::Ping => rules.ping_interval_ticks,
            Timer::Pong => rules.pong_timeout_ticks,
            Timer::Close => rules.close_timeout_ticks,
        };
        machine.arm(cx, ticks);
        Ok(machine)
    }

    // ---- writing -------------------------------------------------------------------------------------------

    /// Transmits a frame and says what follows: a failed socket removes the connection, an overflow closes it
    /// as a slow consumer.
    fn deliver<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        frame: Out<'_>,
        bounded: bool,
    ) -> Next {
        match self.transmit(cx, t, frame, bounded) {
            Sent::Ok => Next::Continue,
            Sent::Failed => Next::Remove(self.ending(Ending::Abrupt)),
            Sent::Overflow => self.close(cx, t, Close::SlowConsumer),
        }
    }

    /// Writes `frame` straight through when nothing is queued (the common case: no allocation, no reference,
    /// no charge), else queues it behind the queue. `bounded`: a frame that would take the queue over
    /// `max_outbox_bytes`, or that the buffer budget cannot take, is refused, unless the queue is empty: one
    /// message is always accepted whole so a limit below the largest message cannot starve a healthy client.
    /// The budget is charged for real bytes: a frame once however many queues hold it, plus one slot per
    /// queue. The unwritten tail of a partly written frame must be kept for the byte stream to stay
    /// well-formed, so it is queued even when the budget is exhausted, and `Overflow` then says the connection
    /// must go. Unbounded frames (close frames, HTTP refusals, at most a few hundred bytes) are always queued.
    fn transmit<T: Transport + ?Sized>(
        &mut self,
        cx: &mut Ctx<'_>,
        t: &mut T,
        frame: Out<'_>,
        bounded: bool,
    ) -> Sent {
        if self.buffers.queued_bytes() == 0 && !t.holds_unsent() {
            let bytes = frame.bytes();
            let done = match write_some(t, bytes) {
                Ok(done) => done,
                Err(_) => return Sent::Failed,
            };
            ReactorMetrics::add(&cx.metrics.bytes_written, done as u64);
            if done == bytes.len() {
                return Sent::Ok;
            }
            let fresh = !self.buffers.is_allocated();
            let slot_fits = self.buffers.try_grow(cx.budget, ENTRY_BYTES).is_some();
            let (spill, _) = self.buffers.spill_mut();
            let frame_fits = spill.outbox.force_push(&frame.to_shared(), done, cx.budget);
            if fresh {
                cx.metrics.buffers_live.fetch_add(1, Relaxed);
            }
            // A slot the budget did not reserve is charged here, by force.
            self.settle(cx);
            return if !bounded || (slot_fits && frame_fits) {
                Sent::Ok
            } else {
                Sent::Overflow
            };
        }
        let fresh = !self.buffers.is_allocated();
        if bounded {
            if self.buffers.queued_bytes() + frame.bytes().len() > cx.rules.max_outbox_bytes {
                return Sent::Overflow;
            }
            if self.buffers.try_grow(cx.budget, ENTRY_BYTES).is_none() {
                return Sent::Overflow;
            }
            let queued = self
                .buffers
                .spill_mut()
                .0
                .outbox
                .try_push(&frame.to_shared(), cx.budget);
            if fresh {
                cx.metrics.buffers_live.fetch_add(1, Relaxed);
            }
            self.settle(cx);
            return if queued { Sent::Ok } else { Sent::Overflow };
        }
        self.buffers
            .spill_mut()
            .0
            .outbox
            .force_push(&frame.to_shared(), 0, cx.budget);
        if fresh {
            cx.metrics.buffers_live.fetch_add(1, Relaxed);
        }
        self.settle(cx);
        Sent::Ok
    }

    /// Writes what is queued; a flushing connection is removed once drained, an idle one frees its buffers.
    /// Once everything is out, a server close frame that was waiting counts as written.
    fn flush<T: Transport + ?Sized>(&mut self, cx: &mut Ctx<'_>, t: &mut T) -> Next {
        if t.holds_unsent() {
            match t.flush_held() {
                Ok(true) => {}
                Ok(false) => return Next::Continue,
                Err(_) => return Next::Remove(self.ending(Ending::Abrupt)),
            }
        }
        if let Some(spill) = self.buffers.get_mut() {
            let before = spill.outbox.queued_bytes();
            let result = spill.outbox.write_to(t, cx.budget);
            let written = before - spill.outbox.queued_bytes();
            ReactorMetrics::add(&cx.metrics.bytes_written, written as u64);
            if written > 0 {
                self.state.set(Flag::Drained, true);
            }
            self.settle(cx);
            match result {
                Ok(Flush::Drained) => {}
                Ok(Flush::Blocked) => return Next::Continue,
                Err(_) => return Next::Remove(self.ending(Ending::Abrupt)),
            }
        }
        // A transport that seals (TLS) may still hold the tail of the last record it sealed.
        if t.holds_unsent() {
            return Next::Continue;
        }
        if self.state.has(Flag::CloseUnsent) {
            self.state.set(Flag::CloseUnsent, false);
            ReactorMetrics::inc(&cx.metrics.close_frames_written);
        }
        if self.phase() == Phase::Flushing {
            return Next::Remove(Ending::Done);
        }
        self.release_if_idle(cx);
        Next::Continue
    }

    /// Brings the buffers' budget charge and the backlog gauge up to date.
    fn settle(&mut self, cx: &Ctx<'_>) {
        self.buffers.settle(cx.budget, &cx.metrics.outbox_bytes);
    }

    /// Frees the spill if it holds nothing, else brings its budget charge up to date.
    fn release_if_idle(&mut self, cx: &Ctx<'_>) {
        if self
            .buffers
            .release_if_idle(cx.budget, &cx.metrics.outbox_bytes)
        {
            cx.metrics.buffers_live.fetch_sub(1, Relaxed);
        }
    }

    /// A connection that breaks while flushing its last bytes ended as planned.
    fn ending(&self, ending: Ending) -> Ending {
        match (ending, self.phase()) {
            (Ending::Abrupt, Phase::Flushing) => Ending::Done,
            _ => ending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::spill::SPILL_BYTES;
    use super::super::transport::testing::MemWire;
    use super::*;

    /// A data frame as the reactor hands it to `send`.
    fn msg(text: bool, payload: &[u8]) -> SharedFrame {
        SharedFrame::new(frame::encode_message(text, payload))
    }

    const KEY: u32 = 7;

    /// A reactor's worth of surroundings for one machine, with virtual time.
    struct Rig {
        rules: Rules,
        budget: Budget,
        wheel: TimerWheel,
        metrics: ReactorMetrics,
        wire: MemWire,
        tick: u64,
    }

    impl Rig {
        fn new() -> Rig {
            let rules = Rules {
                handshake_timeout_ticks: 50,
                ping_interval_ticks: 300,
                pong_timeout_ticks: 100,
                close_timeout_ticks: 30,
                frame_limits: frame::Limits {
                    max_message_bytes: 1 << 16,
                    deflate: false,
                },
                max_outbox_bytes: 1 << 12,
                echo: false,
            };
            Rig {
                wheel: TimerWheel::new(rules.max_delay_ticks()),
                rules,
                budget: Budget::new(usize::MAX),
                metrics: ReactorMetrics::default(),
                wire: MemWire::open(),
                tick: 0,
            }
        }

        /// Runs `f` with the machine's context and the wire.
        fn with<R>(&mut self, f: impl FnOnce(&mut Ctx<'_>, &mut MemWire) -> R) -> R {
            let mut cx = Ctx {
                key: KEY,
                rules: &self.rules,
                budget: &self.budget,
                wheel: &mut self.wheel,
                metrics: &self.metrics,
            };
            f(&mut cx, &mut self.wire)
        }

        fn machine(&mut self) -> Machine {
            self.with(|cx, _| Machine::new(cx, false))
        }

        /// An upgraded connection; the wire is cleared of the 101.
        fn open(&mut self, recover: bool) -> Machine {
            let mut m = self.machine();
            let next =
                self.with(|cx, w| m.accept(cx, w, b"HTTP/1.1 101\r\n\r\n".to_vec(), recover));
            assert_eq!(next, Next::Continue);
            self.wire.written.clear();
            m
        }

        /// Advances virtual time to `tick` and fires every entry of `m` that is due.
        fn advance(&mut self, m: &mut Machine, tick: u64) -> Vec<Expired> {
            let mut fired = Vec::new();
            self.wheel.advance(tick, &mut fired);
            self.tick = tick;
            fired
                .into_iter()
                .map(|e| self.with(|cx, w| m.handle_timeout(cx, w, e.stamp)))
                .filter(|e| *e != Expired::Stale)
                .collect()
        }

        /// Frames the server wrote so far, as (opcode, payload), and clears the wire.
        fn frames(&mut self) -> Vec<(u8, Vec<u8>)> {
            let bytes = std::mem::take(&mut self.wire.written);
            parse_server_frames(&bytes)
        }
    }

    /// Splits unmasked server frames (RFC 6455 §5.2).
    fn parse_server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let opcode = bytes[0] & 0x0f;
            let (len, header) = match bytes[1] & 0x7f {
                126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            out.push((opcode, bytes[header..header + len].to_vec()));
            bytes = &bytes[header + len..];
        }
        out
    }

    /// A masked client frame (RFC 6455 §5.3).
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![0x80 | opcode];
        assert!(payload.len() < 126);
        out.push(0x80 | payload.len() as u8);
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn close_payload(code: u16, reason: &str) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        p
    }

    #[test]
    fn idle_machine_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Machine>(), 16);
    }

    #[test]
    fn accept_writes_the_answer_and_arms_the_first_ping() {
        let mut rig = Rig::new();
        let mut m = rig.machine();
        let next = rig.with(|cx, w| m.accept(cx, w, b"HTTP/1.1 101\r\n\r\n".to_vec(), true));
        assert_eq!(next, Next::Continue);
        assert_eq!(rig.wire.written, b"HTTP/1.1 101\r\n\r\n");
        assert!(m.is_open() && m.was_upgraded() && m.wants_envelopes());
        assert!(!m.holds_buffers());
        rig.wire.written.clear();
        // The handshake deadline is no longer live: only the ping fires.
        assert!(rig.advance(&mut m, 299).is_empty());
        assert_eq!(
            rig.advance(&mut m, 300),
            vec![Expired::Next(Next::Continue)]
        );
        assert_eq!(rig.frames(), vec![(0x9, vec![])]);
    }

    #[test]
    fn handshake_deadline_removes_and_counts_a_timeout() {
        let mut rig = Rig::new();
        let mut m = rig.machine();
        assert_eq!(
            rig.advance(&mut m, 50),
            vec![Expired::Next(Next::Remove(Ending::Done))]
        );
        let timeouts = &rig.metrics.handshakes_rejected[RejectKind::Timeout as usize];
        assert_eq!(timeouts.load(Relaxed), 1);
    }

    #[test]
    fn an_answered_ping_returns_to_the_ping_rhythm() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        assert_eq!(
            rig.advance(&mut m, 300),
            vec![Expired::Next(Next::Continue)]
        );
        let mut pong = client_frame(0xA, b"");
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut pong)),
            Next::Continue
        );
        assert_eq!(
            rig.advance(&mut m, 400),
            vec![Expired::Next(Next::Continue)]
        );
        // Next ping one interval after the previous one, not after the pong deadline.
        assert!(rig.advance(&mut m, 599).is_empty());
        assert_eq!(
            rig.advance(&mut m, 600),
            vec![Expired::Next(Next::Continue)]
        );
        assert_eq!(rig.frames(), vec![(0x9, vec![]), (0x9, vec![])]);
        assert_eq!(rig.metrics.pongs_received.load(Relaxed), 1);
    }

    #[test]
    fn silence_after_a_ping_removes_the_connection_after_a_last_read() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        let _ = rig.advance(&mut m, 300);
        assert_eq!(rig.advance(&mut m, 400), vec![Expired::Silent]);
        assert_eq!(
            rig.with(|cx, w| m.pong_deadline(cx, w)),
            Next::Remove(Ending::Done)
        );
        assert_eq!(rig.metrics.pong_timeouts.load(Relaxed), 1);
    }

    #[test]
    fn a_pong_found_by_the_last_read_saves_the_connection() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        let _ = rig.advance(&mut m, 300);
        assert_eq!(rig.advance(&mut m, 400), vec![Expired::Silent]);
        let mut pong = client_frame(0xA, b"");
        let _ = rig.with(|cx, w| m.handle_frames(cx, w, &mut pong));
        assert_eq!(rig.with(|cx, w| m.pong_deadline(cx, w)), Next::Continue);
        assert_eq!(rig.metrics.pong_timeouts.load(Relaxed), 0);
        assert_eq!(
            rig.advance(&mut m, 600),
            vec![Expired::Next(Next::Continue)]
        );
    }

    #[test]
    fn client_pings_are_answered_with_their_payload() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        let mut ping = client_frame(0x9, b"abc");
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut ping)),
            Next::Continue
        );
        assert_eq!(rig.frames(), vec![(0xA, b"abc".to_vec())]);
    }

    #[test]
    fn client_close_is_echoed_and_ends_the_connection_once_written() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        let mut close = client_frame(0x8, &close_payload(4001, "bye"));
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut close)),
            Next::Remove(Ending::Done)
        );
        assert_eq!(rig.frames(), vec![(0x8, 4001u16.to_be_bytes().to_vec())]);
        assert_eq!(rig.metrics.client_closes.load(Relaxed), 1);
    }

    #[test]
    fn the_first_close_decides_the_close_code() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        assert_eq!(m.close_code(), None);
        let kick = Close::Kick {
            code: 4002,
            reason: "",
        };
        let _ = rig.with(|cx, w| m.close(cx, w, kick));
        let mut echo = client_frame(0x8, &close_payload(1000, ""));
        let _ = rig.with(|cx, w| m.handle_frames(cx, w, &mut echo));
        assert_eq!(
            m.close_code(),
            Some(4002),
            "the client's echo does not change it"
        );
        let mut m = rig.open(false);
        let mut empty = client_frame(0x8, b"");
        let _ = rig.with(|cx, w| m.handle_frames(cx, w, &mut empty));
        assert_eq!(m.close_code(), Some(1005), "a close without a code");
    }

    #[test]
    fn an_empty_client_close_is_answered_empty() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        let mut close = client_frame(0x8, b"");
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut close)),
            Next::Remove(Ending::Done)
        );
        assert_eq!(rig.frames(), vec![(0x8, vec![])]);
    }

    #[test]
    fn server_close_waits_for_the_clients_close_then_ends() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        let kick = Close::Kick {
            code: 4000,
            reason: "go",
        };
        assert_eq!(rig.with(|cx, w| m.close(cx, w, kick)), Next::Continue);
        assert_eq!(m.phase(), Phase::Closing);
        assert_eq!(rig.frames(), vec![(0x8, close_payload(4000, "go"))]);
        // Nothing may follow our close frame: pushes and pongs are dropped.
        let push = msg(true, b"late");
        assert_eq!(rig.with(|cx, w| m.send(cx, w, &push)), Next::Continue);
        let mut ping = client_frame(0x9, b"");
        let _ = rig.with(|cx, w| m.handle_frames(cx, w, &mut ping));
        assert!(rig.frames().is_empty());
        // A second close reason changes nothing.
        assert_eq!(
            rig.with(|cx, w| m.close(cx, w, Close::Shutdown)),
            Next::Continue
        );
        assert!(rig.frames().is_empty());
        let mut close = client_frame(0x8, &close_payload(4000, ""));
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut close)),
            Next::Remove(Ending::Done)
        );
        assert!(rig.frames().is_empty(), "our close was already sent");
        assert_eq!(rig.metrics.client_closes.load(Relaxed), 0);
    }

    #[test]
    fn a_client_that_never_answers_our_close_is_dropped_at_the_close_deadline() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        let _ = rig.with(|cx, w| m.close(cx, w, Close::Shutdown));
        assert_eq!(
            rig.frames(),
            vec![(0x8, close_payload(1001, SHUTTING_DOWN))]
        );
        assert!(rig.advance(&mut m, 29).is_empty());
        assert_eq!(
            rig.advance(&mut m, 30),
            vec![Expired::Next(Next::Remove(Ending::Done))]
        );
    }

    #[test]
    fn protocol_error_sends_its_code_and_closes_once_written() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        // Unmasked client frame: RFC 6455 §5.1 requires 1002.
        let mut bad = vec![0x81, 0x01, b'x'];
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut bad)),
            Next::Remove(Ending::Done)
        );
        let frames = rig.frames();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, 0x8);
        assert_eq!(&frames[0].1[..2], &1002u16.to_be_bytes());
        assert_eq!(rig.metrics.protocol_error_closes.load(Relaxed), 1);
    }

    #[test]
    fn slow_consumer_keeps_the_started_frame_then_closes_with_1008() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        rig.wire.window = 10;
        let big = msg(false, &[7u8; 3000]);
        assert_eq!(rig.with(|cx, w| m.send(cx, w, &big)), Next::Continue);
        assert!(m.holds_buffers());
        // Queued behind the started frame until the limit (4 KiB) is passed.
        let small = msg(false, &[1u8; 1000]);
        assert_eq!(rig.with(|cx, w| m.send(cx, w, &small)), Next::Continue);
        assert_eq!(rig.with(|cx, w| m.send(cx, w, &small)), Next::Continue);
        assert_eq!(m.phase(), Phase::Closing);
        assert_eq!(rig.metrics.slow_consumer_closes.load(Relaxed), 1);
        // The client reads again: the rest of the started frame, then the close; the queued one is gone.
        rig.wire.window = usize::MAX;
        assert_eq!(rig.with(|cx, w| m.handle_writable(cx, w)), Next::Continue);
        let frames = rig.frames();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], (0x2, vec![7u8; 3000]));
        assert_eq!(frames[1], (0x8, close_payload(1008, SLOW_CONSUMER)));
        assert!(!m.holds_buffers(), "drained buffers are freed");
        assert_eq!(rig.budget.used(), 0);
    }

    #[test]
    fn one_message_larger_than_the_limit_is_accepted_whole_on_an_empty_queue() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        rig.wire.window = 0;
        let huge = msg(false, &[1u8; 10_000]);
        assert_eq!(rig.with(|cx, w| m.send(cx, w, &huge)), Next::Continue);
        assert!(m.is_open());
        assert_eq!(m.queued_bytes(), huge.len());
        rig.with(|cx, _| m.teardown(cx));
        assert_eq!(rig.budget.used(), 0);
    }

    #[test]
    fn budget_refusing_a_partial_frame_closes_with_1013() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        rig.budget = Budget::new(0);
        let mut half = client_frame(0x1, b"hello");
        half.truncate(5);
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut half)),
            Next::Remove(Ending::Done)
        );
        let frames = rig.frames();
        assert_eq!(frames[0].0, 0x8);
        assert_eq!(&frames[0].1[..2], &1013u16.to_be_bytes());
        assert_eq!(rig.metrics.budget_closes.load(Relaxed), 1);
    }

    #[test]
    fn a_frame_split_across_reads_waits_in_the_spill_and_frees_it_when_done() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        let mut ping = client_frame(0x9, b"split");
        let mut tail = ping.split_off(4);
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut ping)),
            Next::Continue
        );
        assert!(m.holds_buffers());
        assert_eq!(rig.metrics.buffers_live.load(Relaxed), 1);
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut tail)),
            Next::Continue
        );
        assert!(!m.holds_buffers());
        assert_eq!(rig.metrics.buffers_live.load(Relaxed), 0);
        assert_eq!(rig.budget.used(), 0);
        assert_eq!(rig.frames(), vec![(0xA, b"split".to_vec())]);
    }

    #[test]
    fn every_refusal_answers_its_status_and_closes_once_written() {
        let rejects = [
            Reject::BadRequest("bad"),
            Reject::Unauthorized("who"),
            Reject::Forbidden("origin not allowed"),
            Reject::NotFound,
            Reject::UpgradeRequired,
            Reject::HeadTooLarge,
            Reject::Unavailable("full"),
        ];
        for reject in rejects {
            let mut rig = Rig::new();
            let mut m = rig.machine();
            let next = rig.with(|cx, w| m.close(cx, w, Close::Refuse(&reject)));
            assert_eq!(next, Next::Remove(Ending::Done), "{reject}");
            let status = format!("HTTP/1.1 {} ", reject.status());
            assert!(rig.wire.written.starts_with(status.as_bytes()), "{reject}");
            let kind = RejectKind::from_status(reject.status());
            assert_eq!(
                rig.metrics.handshakes_rejected[kind as usize].load(Relaxed),
                1
            );
        }
    }

    #[test]
    fn a_refusal_the_socket_cannot_take_waits_for_writability_then_closes() {
        let mut rig = Rig::new();
        let mut m = rig.machine();
        rig.wire.window = 5;
        let reject = Reject::NotFound;
        let next = rig.with(|cx, w| m.close(cx, w, Close::Refuse(&reject)));
        assert_eq!(next, Next::Continue);
        assert!(!m.reads(), "nothing more is read from a refused client");
        rig.wire.window = usize::MAX;
        assert_eq!(
            rig.with(|cx, w| m.handle_writable(cx, w)),
            Next::Remove(Ending::Done)
        );
        assert_eq!(rig.wire.written, reject.response());
        rig.with(|cx, _| m.teardown(cx));
        assert_eq!(rig.budget.used(), 0);
    }

    #[test]
    fn a_partial_head_is_kept_joined_and_refused_when_the_budget_is_out() {
        let mut rig = Rig::new();
        // Room for the spill and 8 bytes of head.
        rig.budget = Budget::new(SPILL_BYTES + 8);
        let mut m = rig.machine();
        assert_eq!(rig.with(|cx, w| m.join_head(cx, w, b"GET")), Ok(None));
        assert_eq!(
            rig.with(|cx, w| m.keep_head(cx, w, Head::Fresh(b"GET"))),
            Next::Continue
        );
        let joined = rig.with(|cx, w| m.join_head(cx, w, b" /ws")).unwrap();
        assert_eq!(joined.as_deref(), Some(&b"GET /ws"[..]));
        let _ = rig.with(|cx, w| m.keep_head(cx, w, Head::Joined(joined.unwrap())));
        // The budget runs out: the next growth is answered 503.
        let refused = rig.with(|cx, w| m.join_head(cx, w, b" HTTP/1.1"));
        assert_eq!(refused, Err(Next::Remove(Ending::Done)));
        assert!(rig.wire.written.starts_with(b"HTTP/1.1 503 "));
    }

    #[test]
    fn kick_or_shutdown_before_the_upgrade_just_drops_the_connection() {
        let mut rig = Rig::new();
        let mut m = rig.machine();
        assert_eq!(
            rig.with(|cx, w| m.close(cx, w, Close::Shutdown)),
            Next::Remove(Ending::Done)
        );
        assert!(rig.wire.written.is_empty());
    }

    #[test]
    fn a_broken_socket_is_abrupt_unless_the_connection_was_flushing() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        assert_eq!(m.handle_broken(), Next::Remove(Ending::Abrupt));
        rig.wire.broken = true;
        let push = msg(true, b"x");
        assert_eq!(
            rig.with(|cx, w| m.send(cx, w, &push)),
            Next::Remove(Ending::Abrupt)
        );
        let mut close = client_frame(0x8, b"");
        rig.wire.broken = false;
        rig.wire.window = 0;
        let _ = rig.with(|cx, w| m.handle_frames(cx, w, &mut close));
        assert_eq!(m.phase(), Phase::Flushing);
        assert_eq!(m.handle_broken(), Next::Remove(Ending::Done));
        rig.with(|cx, _| m.teardown(cx));
        assert_eq!(rig.budget.used(), 0);
        assert_eq!(rig.metrics.buffers_live.load(Relaxed), 0);
    }

    #[test]
    fn replayed_frames_sent_after_accept_precede_live_ones_in_order() {
        let mut rig = Rig::new();
        let mut m = rig.open(true);
        rig.wire.window = 3;
        for body in [&b"replay-1"[..], b"replay-2", b"live-3"] {
            let frame = msg(true, body);
            assert_eq!(rig.with(|cx, w| m.send(cx, w, &frame)), Next::Continue);
        }
        rig.wire.window = usize::MAX;
        let _ = rig.with(|cx, w| m.handle_writable(cx, w));
        let bodies: Vec<Vec<u8>> = rig.frames().into_iter().map(|f| f.1).collect();
        assert_eq!(
            bodies,
            vec![
                b"replay-1".to_vec(),
                b"replay-2".to_vec(),
                b"live-3".to_vec()
            ]
        );
    }

    #[test]
    fn a_busy_connection_moved_to_a_new_process_carries_on_exactly() {
        let mut old = Rig::new();
        let mut m = old.open(true);
        // Two frames queued behind a blocked socket, the first partly written; a ping half received.
        old.wire.window = 3;
        let first = SharedFrame::new(frame::encode_message(true, b"first message"));
        let second = SharedFrame::new(frame::encode_message(false, &[1, 2, 3]));
        assert_eq!(old.with(|cx, w| m.send(cx, w, &first)), Next::Continue);
        assert_eq!(old.with(|cx, w| m.send(cx, w, &second)), Next::Continue);
        let mut ping = client_frame(0x9, b"hey");
        let mut tail = ping.split_off(4);
        assert_eq!(
            old.with(|cx, w| m.handle_frames(cx, w, &mut ping)),
            Next::Continue
        );
        let sent_before = std::mem::take(&mut old.wire.written);

        let mut w = Writer::new();
        let mut frames = FrameTable::default();
        m.snapshot(&mut w, &mut frames);
        let mut table = Writer::new();
        frames.write_fresh(&mut table);

        // The successor: its own wheel, budget and counters.
        let mut new = Rig::new();
        let mut received = FrameTable::default();
        received
            .read_fresh(&mut Reader::new(table.bytes()))
            .unwrap();
        let bytes = w.take();
        // The old process lets go of its copy (its references to the queued frames go back to its budget).
        old.with(|cx, _| m.teardown(cx));
        let mut moved = new
            .with(|cx, _| Machine::restore(cx, &mut Reader::new(&bytes), &received))
            .unwrap();
        assert!(moved.is_open() && moved.wants_envelopes() && moved.holds_buffers());
        assert_eq!(new.metrics.buffers_live.load(Relaxed), 1);
        assert!(
            new.budget.used() > 0,
            "its buffers are charged in the new process"
        );
        // The rest of the ping completes it; the queue goes out in order, then the pong.
        assert_eq!(
            new.with(|cx, w| moved.handle_frames(cx, w, &mut tail)),
            Next::Continue
        );
        assert_eq!(
            new.with(|cx, w| moved.handle_writable(cx, w)),
            Next::Continue
        );
        let mut all = sent_before;
        all.extend_from_slice(&new.wire.written);
        assert_eq!(
            parse_server_frames(&all),
            vec![
                (0x1, b"first message".to_vec()),
                (0x2, vec![1, 2, 3]),
                (0xA, b"hey".to_vec())
            ]
        );
        assert!(!moved.holds_buffers());
        assert_eq!(new.budget.used(), 0);
        // The ping timer runs afresh in the new process.
        new.wire.written.clear();
        assert_eq!(
            new.advance(&mut moved, 300),
            vec![Expired::Next(Next::Continue)]
        );
        assert_eq!(new.frames(), vec![(0x9, vec![])]);
    }

    #[test]
    fn an_idle_connection_moves_with_a_few_bytes_and_no_buffer() {
        let mut old = Rig::new();
        let m = old.open(false);
        let mut w = Writer::new();
        m.snapshot(&mut w, &mut FrameTable::default());
        // Phase, flags, mark (or close code), and empty fields: the descriptor is most of what an idle connection costs to move.
        assert!(w.len() <= 20, "{} bytes", w.len());
        let mut new = Rig::new();
        let bytes = w.take();
        let moved = new
            .with(|cx, _| Machine::restore(cx, &mut Reader::new(&bytes), &FrameTable::default()))
            .unwrap();
        assert!(moved.is_open() && !moved.holds_buffers() && !moved.wants_envelopes());
        assert_eq!(new.budget.used(), 0);
    }

    /// A connection of `wire`, upgraded; the wire is cleared of the answer.
    fn open_as(rig: &mut Rig, wire: Wire) -> Machine {
        let mut m = rig.machine();
        let next =
            rig.with(|cx, w| m.accept_as(cx, w, b"HTTP/1.1 101\r\n\r\n".to_vec(), true, wire));
        assert_eq!(next, Next::Continue);
        rig.wire.written.clear();
        m
    }

    #[test]
    fn a_compressed_message_half_received_moves_with_its_wire_and_is_echoed_whole() {
        let mut old = Rig::new();
        old.rules.echo = true;
        let mut m = open_as(&mut old, Wire::WebSocketDeflate);
        let deflated = crate::proto::deflate::compress(b"hello hello hello", 1);
        let (a, b) = deflated.split_at(deflated.len() / 2);
        let mut first = client_frame(0x41, a);
        first[0] &= 0x7f; // no FIN: the message goes on
        assert_eq!(
            old.with(|cx, w| m.handle_frames(cx, w, &mut first)),
            Next::Continue
        );
        let mut w = Writer::new();
        m.snapshot(&mut w, &mut FrameTable::default());
        let mut new = Rig::new();
        new.rules.echo = true;
        let bytes = w.take();
        let mut moved = new
            .with(|cx, _| Machine::restore(cx, &mut Reader::new(&bytes), &FrameTable::default()))
            .unwrap();
        assert_eq!(moved.wire(), Wire::WebSocketDeflate);
        let mut rest = client_frame(0x0, b);
        assert_eq!(
            new.with(|cx, w| moved.handle_frames(cx, w, &mut rest)),
            Next::Continue
        );
        assert_eq!(new.frames(), vec![(0x1, b"hello hello hello".to_vec())]);
    }

    #[test]
    fn an_sse_stream_keeps_alive_with_comments_and_ends_a_kick_with_a_close_event() {
        let mut rig = Rig::new();
        let mut m = open_as(&mut rig, Wire::Sse);
        assert!(m.is_sse());
        // Bytes from the client are ignored; the ping timer writes a comment and expects nothing back.
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut b"junk".to_vec())),
            Next::Continue
        );
        assert_eq!(
            rig.advance(&mut m, 300),
            vec![Expired::Next(Next::Continue)]
        );
        assert_eq!(
            rig.advance(&mut m, 600),
            vec![Expired::Next(Next::Continue)]
        );
        assert_eq!(std::mem::take(&mut rig.wire.written), b":\n\n:\n\n");
        // It moves as an SSE stream.
        let mut w = Writer::new();
        m.snapshot(&mut w, &mut FrameTable::default());
        let bytes = w.take();
        let mut m = rig
            .with(|cx, _| Machine::restore(cx, &mut Reader::new(&bytes), &FrameTable::default()))
            .unwrap();
        assert!(m.is_sse());
        let kick = Close::Kick {
            code: 4001,
            reason: "bye",
        };
        assert_eq!(
            rig.with(|cx, w| m.close(cx, w, kick)),
            Next::Remove(Ending::Done)
        );
        assert_eq!(
            rig.wire.written,
            b"event: close\ndata: {\"code\":4001,\"reason\":\"bye\"}\n\n"
        );
        assert_eq!(m.close_code(), Some(4001));
    }

    #[test]
    fn echo_mode_sends_each_message_back_even_across_reads() {
        let mut rig = Rig::new();
        rig.rules.echo = true;
        let mut m = rig.open(false);
        // A fragmented text message: "he" (FIN clear), then "llo" (continuation, FIN set).
        let mut first = client_frame(0x1, b"he");
        first[0] &= 0x7f;
        let mut rest = client_frame(0x0, b"llo");
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut first)),
            Next::Continue
        );
        assert!(rig.frames().is_empty());
        assert!(m.holds_buffers());
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut rest)),
            Next::Continue
        );
        assert_eq!(rig.frames(), vec![(0x1, b"hello".to_vec())]);
        assert!(!m.holds_buffers());
    }

    // ---- closes that meet a full socket, and the budget of real bytes ---------------------------------

    /// An open connection whose socket took the first 10 bytes of a 3,000-byte message and then filled up,
    /// with `queued` more messages of 1,000 bytes queued behind it.
    fn stalled(rig: &mut Rig, queued: usize) -> Machine {
        let mut m = rig.open(false);
        rig.wire.window = 10;
        let big = msg(false, &[7u8; 3000]);
        assert_eq!(rig.with(|cx, w| m.send(cx, w, &big)), Next::Continue);
        for _ in 0..queued {
            let small = msg(false, &[1u8; 1000]);
            assert_eq!(rig.with(|cx, w| m.send(cx, w, &small)), Next::Continue);
        }
        m
    }

    #[test]
    fn a_close_on_a_full_socket_grows_its_send_buffer_so_the_frame_goes_out_at_once() {
        let mut rig = Rig::new();
        let mut m = stalled(&mut rig, 1);
        rig.wire.room = 1 << 20;
        let kick = Close::Kick {
            code: 4001,
            reason: "bye",
        };
        assert_eq!(rig.with(|cx, w| m.close(cx, w, kick)), Next::Continue);
        assert_eq!(m.phase(), Phase::Closing);
        // Room was asked for the started frame's tail and the close frame only: the queued message was dropped.
        let close = close_payload(4001, "bye");
        assert_eq!(rig.wire.room_asked, (4 + 3000 - 10) + (2 + close.len()));
        assert_eq!(rig.metrics.close_frames_written.load(Relaxed), 1);
        // Waiting for the client's close, it holds nothing.
        assert!(!m.holds_buffers());
        assert_eq!(rig.budget.used(), 0);
        assert_eq!(rig.metrics.outbox_bytes.load(Relaxed), 0);
        assert_eq!(
            rig.frames(),
            vec![(0x2, vec![7u8; 3000]), (0x8, close.clone())]
        );
        let mut answer = client_frame(0x8, &close);
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut answer)),
            Next::Remove(Ending::Done)
        );
        rig.with(|cx, _| m.teardown(cx));
        assert_eq!(rig.metrics.close_frames_given_up.load(Relaxed), 0);
    }

    #[test]
    fn a_slow_consumer_gets_its_1008_at_once_when_the_socket_can_grow() {
        let mut rig = Rig::new();
        rig.wire.room = 1 << 20;
        // 3,000 + 1,000 fit under the 4 KiB limit; the next 1,000 pass it.
        let mut m = stalled(&mut rig, 2);
        assert_eq!(m.phase(), Phase::Closing);
        assert_eq!(rig.metrics.slow_consumer_closes.load(Relaxed), 1);
        assert_eq!(rig.metrics.close_frames_written.load(Relaxed), 1);
        assert!(!m.holds_buffers());
        assert_eq!(rig.budget.used(), 0);
        assert_eq!(
            rig.frames(),
            vec![
                (0x2, vec![7u8; 3000]),
                (0x8, close_payload(1008, SLOW_CONSUMER))
            ]
        );
        // The client never answers: the deadline ends it; nothing was given up.
        assert_eq!(
            rig.advance(&mut m, 30),
            vec![Expired::Next(Next::Remove(Ending::Done))]
        );
        rig.with(|cx, _| m.teardown(cx));
        assert_eq!(rig.metrics.close_frames_given_up.load(Relaxed), 0);
    }

    #[test]
    fn a_remainder_over_close_room_bytes_waits_and_is_given_up_at_the_deadline() {
        let mut rig = Rig::new();
        rig.rules.max_outbox_bytes = 1 << 20;
        rig.wire.room = usize::MAX;
        let mut m = rig.open(false);
        rig.wire.window = 10;
        let huge = msg(false, &vec![3u8; CLOSE_ROOM_BYTES + 1000]);
        assert_eq!(rig.with(|cx, w| m.send(cx, w, &huge)), Next::Continue);
        assert_eq!(
            rig.with(|cx, w| m.close(cx, w, Close::Protocol(ProtocolError::UnmaskedFrame))),
            Next::Continue
        );
        assert_eq!(rig.wire.room_asked, 0, "no room asked past the bound");
        assert!(m.holds_buffers());
        assert_eq!(
            rig.advance(&mut m, 30),
            vec![Expired::Next(Next::Remove(Ending::Done))]
        );
        rig.with(|cx, _| m.teardown(cx));
        assert_eq!(rig.metrics.close_frames_given_up.load(Relaxed), 1);
        assert_eq!(rig.metrics.close_frames_written.load(Relaxed), 0);
        assert_eq!(rig.budget.used(), 0);
    }

    #[test]
    fn a_drain_sends_what_was_queued_before_its_1001() {
        let mut rig = Rig::new();
        let mut m = stalled(&mut rig, 1);
        assert_eq!(
            rig.with(|cx, w| m.close(cx, w, Close::Shutdown)),
            Next::Continue
        );
        assert!(
            m.holds_buffers(),
            "the queue is kept for the client to read"
        );
        rig.wire.window = usize::MAX;
        assert_eq!(rig.with(|cx, w| m.handle_writable(cx, w)), Next::Continue);
        assert_eq!(
            rig.frames(),
            vec![
                (0x2, vec![7u8; 3000]),
                (0x2, vec![1u8; 1000]),
                (0x8, close_payload(1001, SHUTTING_DOWN))
            ]
        );
        assert_eq!(rig.metrics.close_frames_written.load(Relaxed), 1);
        assert!(!m.holds_buffers());
        rig.with(|cx, _| m.teardown(cx));
    }

    #[test]
    fn a_drain_the_client_does_not_read_in_time_still_gets_its_1001_at_the_deadline() {
        let mut rig = Rig::new();
        let mut m = stalled(&mut rig, 1);
        let _ = rig.with(|cx, w| m.close(cx, w, Close::Shutdown));
        rig.wire.room = 1 << 20;
        assert_eq!(
            rig.advance(&mut m, 30),
            vec![Expired::Next(Next::Remove(Ending::Done))]
        );
        // The message that had not started was dropped; the started one and the close frame went out.
        assert_eq!(
            rig.frames(),
            vec![
                (0x2, vec![7u8; 3000]),
                (0x8, close_payload(1001, SHUTTING_DOWN))
            ]
        );
        rig.with(|cx, _| m.teardown(cx));
        assert_eq!(rig.metrics.close_frames_written.load(Relaxed), 1);
        assert_eq!(rig.metrics.close_frames_given_up.load(Relaxed), 0);
        assert_eq!(rig.budget.used(), 0);
    }

    #[test]
    fn a_close_frame_still_queued_when_the_socket_breaks_is_given_up() {
        let mut rig = Rig::new();
        let mut m = stalled(&mut rig, 0);
        let _ = rig.with(|cx, w| m.close(cx, w, Close::SlowConsumer));
        assert_eq!(m.handle_broken(), Next::Remove(Ending::Abrupt));
        rig.with(|cx, _| m.teardown(cx));
        assert_eq!(rig.metrics.close_frames_given_up.load(Relaxed), 1);
        assert_eq!(rig.metrics.close_frames_written.load(Relaxed), 0);
        assert_eq!(rig.metrics.outbox_bytes.load(Relaxed), 0);
        assert_eq!(rig.budget.used(), 0);
    }

    #[test]
    fn the_echo_of_a_clients_close_is_not_counted_as_a_server_close() {
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        let mut close = client_frame(0x8, b"");
        let _ = rig.with(|cx, w| m.handle_frames(cx, w, &mut close));
        assert_eq!(rig.metrics.close_frames_written.load(Relaxed), 0);
        assert_eq!(rig.metrics.close_frames_given_up.load(Relaxed), 0);
    }

    #[test]
    fn a_frame_queued_by_many_connections_is_charged_once_and_the_backlog_gauge_counts_each() {
        let mut rig = Rig::new();
        let frames: Vec<SharedFrame> = (0..4).map(|i| msg(false, &[i; 1000])).collect();
        let mut machines: Vec<Machine> = (0..100).map(|_| rig.open(false)).collect();
        rig.wire.window = 0;
        for m in &mut machines {
            for f in &frames {
                assert_eq!(rig.with(|cx, w| m.send(cx, w, f)), Next::Continue);
            }
        }
        let distinct: usize = frames.iter().map(SharedFrame::charge).sum();
        let used = rig.budget.used();
        let per_connection = (used - distinct) / 100;
        assert!(
            per_connection <= SPILL_BYTES + 8 * ENTRY_BYTES,
            "{per_connection} B per connection beyond the frames"
        );
        assert_eq!(
            rig.metrics.outbox_bytes.load(Relaxed),
            100 * frames.iter().map(SharedFrame::len).sum::<usize>() as u64
        );
        for m in &mut machines {
            rig.with(|cx, _| m.teardown(cx));
        }
        assert_eq!(rig.budget.used(), 0);
        assert_eq!(rig.metrics.outbox_bytes.load(Relaxed), 0);
        assert!(frames.iter().all(|f| f.queues() == 0));
    }

    #[test]
    fn a_budget_that_cannot_take_a_new_frame_closes_the_reader_but_not_for_a_frame_already_held() {
        let mut rig = Rig::new();
        let shared = msg(false, &[5u8; 1000]);
        let mut a = rig.open(false);
        let mut b = rig.open(false);
        rig.wire.window = 0;
        // Room for both spills, a frame, and slots: not for a second distinct frame.
        rig.budget = Budget::new(2 * SPILL_BYTES + shared.charge() + 200);
        assert_eq!(rig.with(|cx, w| a.send(cx, w, &shared)), Next::Continue);
        assert_eq!(rig.with(|cx, w| b.send(cx, w, &shared)), Next::Continue);
        assert!(
            a.is_open() && b.is_open(),
            "the shared frame is charged once"
        );
        let other = msg(false, &[6u8; 1000]);
        assert_eq!(rig.with(|cx, w| b.send(cx, w, &other)), Next::Continue);
        assert_eq!(
            b.phase(),
            Phase::Closing,
            "a new distinct frame is over budget"
        );
        assert!(a.is_open());
        rig.with(|cx, _| a.teardown(cx));
        rig.with(|cx, _| b.teardown(cx));
        assert_eq!(rig.budget.used(), 0);
    }

    #[test]
    fn an_echo_message_waiting_for_its_last_fragment_is_charged_and_refused_with_1013_past_the_budget(
    ) {
        let mut rig = Rig::new();
        rig.rules.echo = true;
        let mut m = rig.open(false);
        let mut first = client_frame(0x1, &[b'a'; 100]);
        first[0] &= 0x7f;
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut first)),
            Next::Continue
        );
        assert!(
            rig.budget.used() >= SPILL_BYTES + 100,
            "{}",
            rig.budget.used()
        );
        rig.with(|cx, _| m.teardown(cx));
        assert_eq!(rig.budget.used(), 0);

        let mut m = rig.open(false);
        rig.budget = Budget::new(SPILL_BYTES + 50);
        let mut first = client_frame(0x1, &[b'a'; 100]);
        first[0] &= 0x7f;
        assert_eq!(
            rig.with(|cx, w| m.handle_frames(cx, w, &mut first)),
            Next::Remove(Ending::Done)
        );
        let frames = rig.frames();
        assert_eq!(&frames[0].1[..2], &1013u16.to_be_bytes());
        rig.with(|cx, _| m.teardown(cx));
        assert_eq!(rig.budget.used(), 0);
    }

    #[test]
    fn a_ping_stuck_behind_a_backlog_is_no_silence_while_the_client_reads_and_1008_once_it_stops() {
        let mut rig = Rig::new();
        let mut m = stalled(&mut rig, 1);
        rig.wire.room = 1 << 20;
        // The ping goes behind the backlog; the client has not seen it at the pong deadline.
        assert_eq!(
            rig.advance(&mut m, 300),
            vec![Expired::Next(Next::Continue)]
        );
        // It reads a little meanwhile: the check is repeated later, the connection stays.
        rig.wire.window = 100;
        assert_eq!(rig.with(|cx, w| m.handle_writable(cx, w)), Next::Continue);
        assert_eq!(rig.advance(&mut m, 400), vec![Expired::Silent]);
        assert_eq!(rig.with(|cx, w| m.pong_deadline(cx, w)), Next::Continue);
        assert!(m.is_open());
        // Then it reads nothing for a whole pong timeout: a slow consumer, told why, not dropped as silent.
        assert_eq!(rig.advance(&mut m, 500), vec![Expired::Silent]);
        assert_eq!(rig.with(|cx, w| m.pong_deadline(cx, w)), Next::Continue);
        assert_eq!(m.phase(), Phase::Closing);
        assert_eq!(rig.metrics.slow_consumer_closes.load(Relaxed), 1);
        assert_eq!(rig.metrics.pong_timeouts.load(Relaxed), 0);
        assert_eq!(rig.metrics.close_frames_written.load(Relaxed), 1);
        let frames = rig.frames();
        assert_eq!(
            frames.last(),
            Some(&(0x8, close_payload(1008, SLOW_CONSUMER)))
        );
        rig.with(|cx, _| m.teardown(cx));
    }

    #[test]
    fn a_ping_held_by_the_kernel_behind_data_the_client_keeps_acknowledging_is_no_silence() {
        use super::super::transport::TcpProgress;
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        // Everything went to the kernel, which still holds it: the ping is behind it there.
        let kernel = |acked| {
            Some(TcpProgress {
                acked,
                holding: true,
            })
        };
        rig.wire.tcp = kernel(0);
        let _ = rig.advance(&mut m, 300);
        assert!(!m.holds_buffers());
        // The first deadline only takes a reading of what the client acknowledged.
        rig.wire.tcp = kernel(50_000);
        assert_eq!(rig.advance(&mut m, 400), vec![Expired::Silent]);
        assert_eq!(rig.with(|cx, w| m.pong_deadline(cx, w)), Next::Continue);
        // It acknowledged more by the next one: it is reading, the check moves on.
        rig.wire.tcp = kernel(90_000);
        assert_eq!(rig.advance(&mut m, 500), vec![Expired::Silent]);
        assert_eq!(rig.with(|cx, w| m.pong_deadline(cx, w)), Next::Continue);
        assert!(m.is_open());
        // It stops acknowledging: a slow consumer, told why.
        assert_eq!(rig.advance(&mut m, 600), vec![Expired::Silent]);
        assert_eq!(rig.with(|cx, w| m.pong_deadline(cx, w)), Next::Continue);
        assert_eq!(m.phase(), Phase::Closing);
        assert_eq!(rig.metrics.slow_consumer_closes.load(Relaxed), 1);
        assert_eq!(rig.metrics.pong_timeouts.load(Relaxed), 0);
        rig.with(|cx, _| m.teardown(cx));
    }

    #[test]
    fn a_silent_client_with_nothing_but_the_ping_in_flight_still_times_out() {
        use super::super::transport::TcpProgress;
        let mut rig = Rig::new();
        let mut m = rig.open(false);
        rig.wire.tcp = Some(TcpProgress {
            acked: 0,
            holding: false,
        });
        let _ = rig.advance(&mut m, 300);
        assert_eq!(rig.advance(&mut m, 400), vec![Expired::Silent]);
        assert_eq!(
            rig.with(|cx, w| m.pong_deadline(cx, w)),
            Next::Remove(Ending::Done)
        );
        assert_eq!(rig.metrics.pong_timeouts.load(Relaxed), 1);
    }
}
