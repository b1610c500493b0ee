//! A published message: who it is for, its stream, and its encodings, each built at most once.
//!
//! It owns `Target` (who a publish or kick is for), the stream naming rules (`user:{user}`, `channel:{name}`,
//! `all`), the client-facing wire formats (`envelope`: envelopes, `resync` notices, `since` positions; `missed`:
//! what connections that may have missed messages are told) and
//! [`Message`]: the payload framed once as a bare WebSocket frame when it is made, plus every other encoding
//! built lazily the first time some recipient needs it and then shared by every reactor and every recipient
//! (each encoding is a [`SharedFrame`]: reference-counted, and charged to the buffer budget once while any
//! queue holds it). Encodings added later (compressed, Server-Sent Events) are one more
//! [`Encoding`] variant and one more lazily built slot here. It does not store (`history`), route (`dispatch`,
//! the reactors' fanout indexes) or send anything.

pub mod envelope;
pub mod missed;

use crate::proto::frame;
use crate::shared_frame::SharedFrame;
use bytes::Bytes;
use envelope::Stamp;
use std::sync::{Arc, OnceLock};

/// Who a publish or kick is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connection of the user.
    User(String),
    /// The connections of the user holding this client token.
    UserClient(String, String),
    /// Every connection subscribed to the channel.
    Channel(String),
    /// Every connection.
    All,
}

impl Target {
    /// The kind of stream it publishes to (what [`stream_of`] says, without building the stream's name).
    pub fn kind(&self) -> Kind {
        match self {
            Target::User(_) | Target::UserClient(..) => Kind::User,
            Target::Channel(_) => Kind::Channel,
            Target::All => Kind::All,
        }
    }

    /// The target in the same stream for a message tagged with `client`, or with no tag: how a message read back
    /// from the shared log (`history::Backfill`) is addressed. Only `user` streams carry client tags.
    pub fn with_client(&self, client: Option<&str>) -> Target {
        match (self, client) {
            (Target::User(user) | Target::UserClient(user, _), Some(client)) => {
                Target::UserClient(user.clone(), client.to_owned())
            }
            (Target::User(user) | Target::UserClient(user, _), None) => Target::User(user.clone()),
            (other, _) => other.clone(),
        }
    }
}

/// The kinds of stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `user:{user}` (publishes to a user's client token included).
    User,
    /// `channel:{name}`.
    Channel,
    /// `all`.
    All,
}

/// The stream a publish target belongs to, its kind, and the client tag of a client-token publish.
pub fn stream_of(target: &Target) -> (String, Kind, Option<&str>) {
    match target {
        Target::User(user) => (format!("user:{user}"), Kind::User, None),
        Target::UserClient(user, client) => (format!("user:{user}"), Kind::User, Some(client)),
        Target::Channel(channel) => (format!("channel:{channel}"), Kind::Channel, None),
        Target::All => ("all".to_owned(), Kind::All, None),
    }
}

/// The kind of a stream name; `None` for a name that is no stream.
pub fn kind_of(stream: &str) -> Option<Kind> {
    match stream {
        "all" => Some(Kind::All),
        s if s.len() > 5 && s.starts_with("user:") => Some(Kind::User),
        s if s.len() > 8 && s.starts_with("channel:") => Some(Kind::Channel),
        _ => None,
    }
}

/// The forms in which a message reaches a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The payload as it was published, in one text or binary frame.
    Bare = 0,
    /// The payload in its envelope (stream, epoch, offset: [`envelope`]), for connections that opted into
    /// recovery.
    Envelope = 1,
    /// [`Encoding::Bare`] compressed (permessage-deflate, RFC 7692), for connections that negotiated it.
    BareDeflate = 2,
    /// [`Encoding::Envelope`] compressed.
    EnvelopeDeflate = 3,
    /// A Server-Sent Event (`proto::sse`): `id:` the message's position when it has one, the payload as
    /// `data:` lines (base64 for binary).
    Sse = 4,
}

impl Encoding {
    /// Number of encodings: a caller that resolves each at most once keeps an array this long, indexed by
    /// `encoding as usize`.
    pub const COUNT: usize = 5;

    /// The encoding a connection takes: SSE, or a WebSocket frame that is enveloped or not and compressed or
    /// not.
    pub fn pick(sse: bool, envelope: bool, deflate: bool) -> Encoding {
        match (sse, envelope, deflate) {
            (true, _, _) => Encoding::Sse,
            (false, false, false) => Encoding::Bare,
            (false, true, false) => Encoding::Envelope,
            (false, false, true) => Encoding::BareDeflate,
            (false, true, true) => Encoding::EnvelopeDeflate,
        }
    }
}

/// How the lazily built encodings are made; the same for every message of a server (`[websocket]` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    /// zlib level 0-9 (`websocket.compression_level`).
    pub level: u32,
    /// Payloads (bare or enveloped) shorter than this are sent uncompressed (RSV1 clear) even to connections
    /// that negotiated compression (`websocket.compression_min_bytes`): their compressed form would save little
    /// or nothing.
    pub min_bytes: usize,
}

impl Default for Codec {
    fn default() -> Codec {
        Codec {
            level: 1,
            min_bytes: 0,
        }
    }
}

/// The encodings fewer recipients need, behind one pointer built the first time any of them is wanted, so a
/// message nobody compresses or streams over SSE pays 16 bytes for all three.
#[derive(Debug, Default)]
struct Lazy {
    bare_deflate: OnceLock<SharedFrame>,
    envelope_deflate: OnceLock<SharedFrame>,
    sse: OnceLock<SharedFrame>,
}

/// Where a message sits in its stream, once it has a place there.
#[derive(Debug)]
struct Place {
    epoch: Arc<str>,
    offset: u64,
}

/// A published message, shared (`Arc`) by every reactor, by history and by every recipient's queue.
#[derive(Debug)]
pub struct Message {
    target: Target,
    binary: bool,
    /// Its epoch and offset when its stream keeps history (here or in the cluster).
    place: Option<Place>,
    /// Publish sequence number when stored and delivered live (`history`), else 0.
    seq: u64,
    /// The bare frame, built at once: most recipients take it, and the payload is read from it.
    bare: SharedFrame,
    envelope: OnceLock<SharedFrame>,
    /// Compressed and SSE encodings, each built at most once, when some recipient first needs it.
    lazy: OnceLock<Box<Lazy>>,
}

impl Message {
    /// A message with no place in a stream yet: framed bare at once, its envelope left for the first recipient
    /// that wants it.
    pub fn new(target: Target, binary: bool, payload: &[u8]) -> Message {
        Message {
            target,
            binary,
            place: None,
            seq: 0,
            bare: SharedFrame::new(frame::encode_message(!binary, payload)),
            envelope: OnceLock::new(),
            lazy: OnceLock::new(),
        }
    }

    /// A message for `target` whose bare frame is `bare`, already built for another target of the same batch
    /// item: the payload is framed once however many targets it has, and every target's message shares
    /// those bytes. Only the envelope, which names the stream, is built per target (lazily, as with
    /// [`Message::new`]).
    pub fn sharing(target: Target, binary: bool, bare: SharedFrame) -> Message {
        // RFC 6455 §5.2: opcode 0x1 text, 0x2 binary, in the low bits of the first byte.
        debug_assert_eq!(
            bare.bytes().first().map(|b| b & 0x0f),
            Some(if binary { 2 } else { 1 })
        );
        Message {
            target,
            binary,
            place: None,
            seq: 0,
            bare,
            envelope: OnceLock::new(),
            lazy: OnceLock::new(),
        }
    }

    /// The same message with its place in its stream (`epoch`, `offset`: from `history`, or from the cluster)
    /// and its publish sequence number (`history`; 0 for a message no reactor receives live in sequence: a
    /// backfilled one, or one whose stream this node keeps no history for). Its envelope is built now: a
    /// stored message is replayed in it, and its size counts against history's budget from the start.
    pub fn stamped(self, epoch: Arc<str>, offset: u64, seq: u64) -> Message {
        let prepared = self.prepare_envelope();
        self.stamped_prepared(epoch, offset, seq, &prepared)
    }

    /// The part of its envelope that does not depend on its place (see [`envelope::Prepared`]): built before
    /// history's lock is taken, then handed to [`Message::stamped_prepared`] under it.
    pub fn prepare_envelope(&self) -> envelope::Prepared {
        let (stream, _, _) = stream_of(&self.target);
        envelope::prepare(&stream, !self.binary, self.payload())
    }

    /// [`Message::stamped`] with its envelope prepared beforehand by [`Message::prepare_envelope`].
    pub fn stamped_prepared(
        mut self,
        epoch: Arc<str>,
        offset: u64,
        seq: u64,
        prepared: &envelope::Prepared,
    ) -> Message {
        self.place = Some(Place { epoch, offset });
        self.seq = seq;
        let framed = prepared.finish(self.stamp(), self.payload());
        self.envelope = OnceLock::from(SharedFrame::new(framed));
        self
    }

    /// Who it is for.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Binary (true) or text.
    pub fn is_binary(&self) -> bool {
        self.binary
    }

    /// Its epoch and offset, if it has a place in its stream.
    pub fn stamp(&self) -> Option<Stamp<'_>> {
        self.place.as_ref().map(|p| Stamp {
            epoch: &p.epoch,
            offset: p.offset,
        })
    }

    /// Publish sequence number when stored and delivered live, else 0.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The published payload.
    pub fn payload(&self) -> &[u8] {
        envelope::frame_payload(self.bare.bytes())
    }

    /// The message in `encoding`, built on first use and shared afterwards.
    pub fn frame(&self, encoding: Encoding) -> &Bytes {
        self.shared(encoding).bytes()
    }

    /// The message in `encoding` as queues hold it (built on first use and shared afterwards), with the
    /// default [`Codec`].
    pub fn shared(&self, encoding: Encoding) -> &SharedFrame {
        self.shared_in(encoding, &Codec::default())
    }

    /// The message in `encoding` as queues hold it, built on first use with `codec` and shared afterwards by
    /// every reactor and recipient: each encoding is compressed or formatted at most once per message.
    pub fn shared_in(&self, encoding: Encoding, codec: &Codec) -> &SharedFrame {
        match encoding {
            Encoding::Bare => &self.bare,
            Encoding::Envelope => self.envelope.get_or_init(|| {
                SharedFrame::new(self.prepare_envelope().finish(self.stamp(), self.payload()))
            }),
            Encoding::BareDeflate => self
                .lazy()
                .bare_deflate
                .get_or_init(|| self.deflated(&self.bare, codec)),
            Encoding::EnvelopeDeflate => self.lazy().envelope_deflate.get_or_init(|| {
                let plain = self.shared_in(Encoding::Envelope, codec);
                self.deflated(plain, codec)
            }),
            Encoding::Sse => self.lazy().sse.get_or_init(|| {
                let id = self.place.as_ref().map(|p| {
                    crate::proto::sse::event_id(&stream_of(&self.target).0, &p.epoch, p.offset)
                });
                SharedFrame::new(Bytes::from(crate::proto::sse::event(
                    id.as_deref(),
                    None,
                    self.binary,
                    self.payload(),
                )))
            }),
        }
    }

    fn lazy(&self) -> &Lazy {
        self.lazy.get_or_init(Box::default)
    }

    /// The compressed form of `plain` (a frame of this message): `plain` itself (the same shared bytes) when its
    /// payload is under `codec.min_bytes` or compressing it would not make it smaller.
    fn deflated(&self, plain: &SharedFrame, codec: &Codec) -> SharedFrame {
        let payload = envelope::frame_payload(plain.bytes());
        if payload.len() < codec.min_bytes {
            return plain.clone();
        }
        let compressed = crate::proto::deflate::compress(payload, codec.level);
        if compressed.len() >= payload.len() {
            return plain.clone();
        }
        SharedFrame::new(frame::encode_compressed_message(!self.binary, &compressed))
    }

    /// The frames a reactor's mailbox holds a budget reference on while the message waits there: the bare
    /// frame, and the envelope of a stamped message (built when it was stamped). An envelope built later, by a
    /// reactor applying the message, is not one of them, so the answer never changes while it is queued.
    pub fn mailbox_frames(&self) -> impl Iterator<Item = &SharedFrame> {
        let envelope = self.place.as_ref().and_then(|_| self.envelope.get());
        std::iter::once(&self.bare).chain(envelope)
    }

    /// What the message's mailbox frames cost the budget while some queue holds them.
    pub fn mailbox_charge(&self) -> usize {
        self.mailbox_frames().map(SharedFrame::charge).sum()
    }

    /// Heap bytes the message holds in the encodings built so far and its names, plus its own record. Its
    /// epoch is not counted: it is shared with its stream (`history` charges it there).
    pub fn footprint(&self) -> usize {
        let lazy = self.lazy.get().map_or(0, |l| {
            let own = |slot: &OnceLock<SharedFrame>, plain: &SharedFrame| {
                slot.get()
                    .filter(|f| !f.ptr_eq(plain))
                    .map_or(0, SharedFrame::len)
            };
            let envelope = self.envelope.get();
            std::mem::size_of::<Lazy>()
                + own(&l.bare_deflate, &self.bare)
                + envelope.map_or(0, |e| own(&l.envelope_deflate, e))
                + l.sse.get().map_or(0, SharedFrame::len)
        });
        std::mem::size_of::<Message>()
            + lazy
            + self.bare.len()
            + self.envelope.get().map_or(0, SharedFrame::len)
            + match &self.target {
                Target::User(a) | Target::Channel(a) => a.len(),
                Target::UserClient(a, b) => a.len() + b.len(),
                Target::All => 0,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_map_to_streams() {
        let t = Target::UserClient("42".into(), "phone".into());
        assert_eq!(stream_of(&t), ("user:42".into(), Kind::User, Some("phone")));
        assert_eq!(stream_of(&Target::Channel("n".into())).0, "channel:n");
        assert_eq!(stream_of(&Target::All).0, "all");
    }

    #[test]
    fn a_targets_kind_is_its_streams() {
        for t in [
            Target::User("u".into()),
            Target::UserClient("u".into(), "c".into()),
            Target::Channel("n".into()),
            Target::All,
        ] {
            assert_eq!(t.kind(), stream_of(&t).1);
        }
    }

    #[test]
    fn stream_kinds_need_a_name() {
        assert_eq!(kind_of("user:1"), Some(Kind::User));
        assert_eq!(kind_of("channel:x"), Some(Kind::Channel));
        assert_eq!(kind_of("all"), Some(Kind::All));
        assert_eq!(kind_of("user:"), None);
        assert_eq!(kind_of("group:x"), None);
    }

    #[test]
    fn bare_frame_carries_the_payload_and_its_kind() {
        let text = Message::new(Target::All, false, b"hi");
        assert_eq!(
            text.frame(Encoding::Bare),
            &frame::encode_message(true, b"hi")
        );
        assert_eq!(text.payload(), b"hi");
        let binary = Message::new(Target::All, true, &[0, 1]);
        assert_eq!(
            binary.frame(Encoding::Bare),
            &frame::encode_message(false, &[0, 1])
        );
    }

    #[test]
    fn backfilled_messages_keep_their_stream_and_take_their_own_client_tag() {
        let live = Target::UserClient("42".into(), "phone".into());
        assert_eq!(live.with_client(None), Target::User("42".into()));
        assert_eq!(
            Target::User("42".into()).with_client(Some("tab")),
            Target::UserClient("42".into(), "tab".into())
        );
        assert_eq!(
            Target::Channel("n".into()).with_client(None),
            Target::Channel("n".into())
        );
        assert_eq!(Target::All.with_client(None), Target::All);
    }

    #[test]
    fn messages_sharing_a_frame_share_its_bytes_and_keep_their_own_stream() {
        let first = Message::new(Target::User("42".into()), false, b"hi");
        let shared = first.shared(Encoding::Bare).clone();
        let bare = shared.bytes().clone();
        let second = Message::sharing(Target::Channel("n".into()), false, shared);
        assert_eq!(second.frame(Encoding::Bare).as_ptr(), bare.as_ptr());
        assert_eq!(second.payload(), b"hi");
        let expected =
            frame::encode_message(true, &envelope::encode("channel:n", None, true, b"hi"));
        assert_eq!(second.frame(Encoding::Envelope), &expected);
    }

    #[test]
    fn envelope_is_built_once_and_shared() {
        let m = Message::new(Target::Channel("n".into()), false, b"x");
        assert!(m.envelope.get().is_none(), "not built until needed");
        let a = m.frame(Encoding::Envelope).clone();
        let b = m.frame(Encoding::Envelope).clone();
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert!(m
            .shared(Encoding::Envelope)
            .ptr_eq(m.shared(Encoding::Envelope)));
        assert_eq!(
            m.mailbox_frames().count(),
            1,
            "an envelope built by a reactor is not a mailbox frame"
        );
        let expected =
            frame::encode_message(true, &envelope::encode("channel:n", None, true, b"x"));
        assert_eq!(a, expected);
    }

    #[test]
    fn lazy_envelope_matches_the_eager_one() {
        let target = Target::Channel("n".into());
        for (text, payload) in [(true, &b"hi"[..]), (false, &[0u8, 1, 2][..])] {
            let lazy = Message::new(target.clone(), !text, payload);
            let eager =
                frame::encode_message(text, &envelope::encode("channel:n", None, text, payload));
            assert_eq!(lazy.frame(Encoding::Envelope), &eager);
        }
    }

    #[test]
    fn a_stored_message_is_enveloped_with_its_position() {
        let m =
            Message::new(Target::User("42".into()), true, &[9]).stamped("Ab3xYz12".into(), 17, 5);
        assert_eq!(m.seq(), 5);
        let stamp = Stamp {
            epoch: "Ab3xYz12",
            offset: 17,
        };
        assert_eq!(m.stamp(), Some(stamp));
        assert!(m.envelope.get().is_some(), "built when stamped");
        assert_eq!(
            m.mailbox_frames().count(),
            2,
            "a stamped message waits with its envelope"
        );
        let expected = frame::encode_message(
            false,
            &envelope::encode("user:42", Some(stamp), false, &[9]),
        );
        assert_eq!(m.frame(Encoding::Envelope), &expected);
        assert!(m.footprint() >= m.frame(Encoding::Bare).len() + expected.len());
    }

    #[test]
    fn a_message_stays_small() {
        // Stored by history for every message it keeps: the lazy encodings cost one pointer until built.
        assert!(
            std::mem::size_of::<Message>() <= 136,
            "{}",
            std::mem::size_of::<Message>()
        );
    }

    #[test]
    fn compressed_encodings_are_built_once_and_shared() {
        let payload = br#"{"type":"notification","title":"New comment on your post","body":"Someone replied to your comment in the thread about compression"}"#;
        let m = Message::new(Target::Channel("n".into()), false, payload);
        assert!(
            m.lazy.get().is_none(),
            "nothing built until a recipient needs it"
        );
        let codec = Codec::default();
        let a = m.shared_in(Encoding::BareDeflate, &codec).clone();
        assert!(a.ptr_eq(m.shared_in(Encoding::BareDeflate, &codec)));
        assert_eq!(
            a.bytes()[0],
            0xC1,
            "FIN, RSV1 and the text opcode (RFC 7692 §6)"
        );
        assert!(a.len() < m.frame(Encoding::Bare).len());
        let mut inflated = Vec::new();
        crate::proto::deflate::inflate(envelope::frame_payload(a.bytes()), 1 << 20, |c| {
            inflated.extend_from_slice(c)
        })
        .unwrap();
        assert_eq!(inflated, payload);
        let e = m.shared_in(Encoding::EnvelopeDeflate, &codec);
        let mut inflated = Vec::new();
        crate::proto::deflate::inflate(envelope::frame_payload(e.bytes()), 1 << 20, |c| {
            inflated.extend_from_slice(c)
        })
        .unwrap();
        assert_eq!(
            &inflated[..],
            envelope::frame_payload(m.frame(Encoding::Envelope))
        );
    }

    #[test]
    fn small_or_incompressible_payloads_share_the_plain_frame() {
        let codec = Codec {
            level: 1,
            min_bytes: 64,
        };
        let small = Message::new(Target::All, false, b"hi");
        assert!(small
            .shared_in(Encoding::BareDeflate, &codec)
            .ptr_eq(small.shared_in(Encoding::Bare, &codec)));
        let noise: Vec<u8> = (0..256u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let random = Message::new(Target::All, true, &noise);
        let f = random.shared_in(Encoding::BareDeflate, &Codec::default());
        assert!(f.ptr_eq(random.shared_in(Encoding::Bare, &codec)) || f.bytes()[0] & 0x40 != 0);
    }

    #[test]
    fn the_sse_event_carries_the_position_when_stored() {
        let m = Message::new(Target::User("42".into()), false, b"a\nb").stamped("Ep".into(), 7, 1);
        assert_eq!(
            m.frame(Encoding::Sse),
            &Bytes::from_static(b"id: user:42@Ep:7\ndata: a\ndata: b\n\n")
        );
        let live = Message::new(Target::All, true, &[1, 2]);
        assert_eq!(
            live.frame(Encoding::Sse),
            &Bytes::from_static(b"event: binary\ndata: AQI=\n\n")
        );
        assert_eq!(Encoding::pick(true, true, true), Encoding::Sse);
        assert_eq!(Encoding::pick(false, true, true), Encoding::EnvelopeDeflate);
    }
}
