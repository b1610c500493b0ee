//! The bytes densepush nodes exchange through Redis: encoding and decoding, sans-IO.
//!
//! It owns the message layout only; it does not append, read, subscribe or deliver. Publishes, batches, kicks and
//! subscription changes travel as the `m` field of bus stream entries (`cluster::bus`); presence queries and
//! answers as pub/sub messages.
//! Every message is
//! `version (u8) | kind (u8) | origin node id (str) | body`, where a `str` is a big-endian `u32` length followed
//! by that many UTF-8 bytes. Bodies by kind:
//!
//! - publish: `target | flags (u8, bit 0 = binary) | payload (the rest)`; the payload is not framed, so a 1 MiB
//!   message costs 1 MiB on Redis, and each receiving node frames it once for all of its connections;
//! - kick: `request id (u64) | target | code (u16) | reason (str)`; the origin waits for its own reactors'
//!   count under the request id (0: nobody waits); a code or reason `frame::check_kick_close` refuses is a
//!   decode error, so such a kick is dropped and counted like any undecodable message;
//! - presence query: `request id (u64) | user (str)`; answered on the origin's reply channel;
//! - presence answer: `request id (u64) | connections (u64)`;
//! - stamped publish (a message of a stream that keeps history): `target | flags (u8) | epoch length (u8) |
//!   epoch | offset (ASCII decimal) | '\n' | payload (the rest)`. Redis builds the part after the flags in the
//!   publish script (`cluster::scripts`), where the epoch and offset are assigned, hence the text offset (a
//!   *place*: `epoch length (u8) | epoch | offset (ASCII decimal) | '\n'`);
//! - subscription change: `request id (u64) | target (a user or a user's client token) | channel (str) |
//!   join (u8, 1 or 0) | since (u8: 0 none, 1 followed by epoch (str) | offset (u64))`; the request id works as
//!   a kick's;
//! - batch publish, a whole batch in one entry: `count (u32)`, then per message `flags (u8) | payload (u32
//!   length, bytes) | target count (u32)` and per target `kept (u8: 1 when Redis places it in its stream's
//!   shared history) | target`; after the last message, one place per kept target, in order. The node encodes
//!   the part before the places ([`encode_batch_head`]); the batch script appends them as it assigns them.
//!
//! A target is `tag (u8: 0 user, 1 user+client, 2 channel, 3 all)` followed by its strings.

use crate::dispatch::Subscription;
use crate::message::envelope::Position;
use crate::message::Target;
use crate::publish::BatchItem;
use std::ops::Range;

/// Layout version; a node drops messages of another version instead of misreading them. Version 2 is the
/// stream bus (kicks and subscription changes carry a request id, a batch carries the places of its kept
/// messages); version 1 nodes used pub/sub and must not share a prefix with it.
pub const VERSION: u8 = 2;

const KIND_PUBLISH: u8 = 0;
const KIND_KICK: u8 = 1;
const KIND_PRESENCE_QUERY: u8 = 2;
const KIND_PRESENCE_ANSWER: u8 = 3;
const KIND_STAMPED: u8 = 4;
const KIND_SUBSCRIBE: u8 = 5;
const KIND_BATCH: u8 = 6;

const TAG_USER: u8 = 0;
const TAG_USER_CLIENT: u8 = 1;
const TAG_CHANNEL: u8 = 2;
const TAG_ALL: u8 = 3;

const FLAG_BINARY: u8 = 1;

/// What one node tells the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Deliver a message to the target's connections.
    Publish {
        /// Recipients.
        target: Target,
        /// Binary frame (true) or text frame (false).
        binary: bool,
        /// The message payload, unframed.
        payload: Vec<u8>,
    },
    /// Close the target's connections.
    Kick {
        /// Chosen by the origin to collect its own reactors' count when the kick comes back from the bus; 0
        /// when nobody waits.
        request: u64,
        /// A user, or a user's client token.
        target: Target,
        /// Close code (1000 or 3000-4999, checked by [`decode`]).
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// Count the user's connections and answer on the origin's reply channel.
    PresenceQuery {
        /// Chosen by the origin to match answers to its question.
        request: u64,
        /// The user.
        user: String,
    },
    /// Deliver a message of a stream that keeps history, with the epoch and offset Redis assigned.
    Stamped {
        /// Recipients.
        target: Target,
        /// Binary (true) or text frame (false).
        binary: bool,
        /// The stream's epoch.
        epoch: String,
        /// The message's offset in its stream.
        offset: u64,
        /// The message payload, unframed.
        payload: Vec<u8>,
    },
    /// Subscribe a user's (or client token's) connections to a channel, or unsubscribe them.
    Subscribe {
        /// Chosen by the origin to collect its own reactors' counts when the change comes back from the bus; 0
        /// when nobody waits.
        request: u64,
        /// The change.
        change: Subscription,
    },
    /// Deliver a batch's messages, in order.
    Batch {
        /// The messages, in the order of the batch's body.
        items: Vec<BatchItem>,
        /// One per target of every item, in order: where Redis placed that message in its stream's shared
        /// history, or `None` for a stream the origin keeps no history of.
        places: Vec<Option<Place>>,
    },
    /// One node's answer to a presence query.
    PresenceAnswer {
        /// The query's request id.
        request: u64,
        /// The user's connections on the answering node.
        connections: u64,
    },
}

/// Where Redis placed a message in its stream's shared history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The stream's epoch.
    pub epoch: String,
    /// The message's offset in its stream.
    pub offset: u64,
}

/// A decoded message: who sent it and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The node id of the sender.
    pub origin: String,
    /// The content.
    pub body: Body,
}

/// Why bytes from Redis are not a message. Another program publishing on our channels, or a node of another
/// version, gets its message dropped and counted, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message ended before a field did.
    #[error("message truncated")]
    Truncated,
    /// The version byte is not [`VERSION`].
    #[error("unsupported message version {0}")]
    Version(u8),
    /// Unknown kind byte.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// Unknown target tag, or a target a kick cannot have.
    #[error("bad target tag {0}")]
    Target(u8),
    /// A string field is not UTF-8, or a text payload is not UTF-8.
    #[error("invalid UTF-8 in {0}")]
    Utf8(&'static str),
    /// Bytes after the last field of a fixed-size body.
    #[error("trailing bytes after the message")]
    Trailing,
    /// A kick whose close code or reason may not be sent.
    #[error("kick: {0}")]
    Kick(#[from] crate::proto::frame::KickCloseError),
}

/// Encodes a message; infallible (lengths are `u32`, and no field the admin API accepts comes near 4 GiB).
pub fn encode(origin: &str, body: &Body) -> Vec<u8> {
    let payload_len = match body {
        Body::Publish { payload, .. } | Body::Stamped { payload, .. } => payload.len(),
        _ => 0,
    };
    let mut out = Vec::with_capacity(64 + origin.len() + payload_len);
    out.push(VERSION);
    match body {
        Body::Publish {
            target,
            binary,
            payload,
        } => {
            out.push(KIND_PUBLISH);
            put_str(&mut out, origin);
            put_target(&mut out, target);
            out.push(if *binary { FLAG_BINARY } else { 0 });
            out.extend_from_slice(payload);
        }
        Body::Stamped {
            target,
            binary,
            epoch,
            offset,
            payload,
        } => {
            out = encode_stamped_head(origin, target, *binary);
            put_place(&mut out, epoch, *offset);
            out.extend_from_slice(payload);
        }
        Body::Kick {
            request,
            target,
            code,
            reason,
        } => {
            out.push(KIND_KICK);
            put_str(&mut out, origin);
            out.extend_from_slice(&request.to_be_bytes());
            put_target(&mut out, target);
            out.extend_from_slice(&code.to_be_bytes());
            put_str(&mut out, reason);
        }
        Body::Subscribe { request, change } => {
            out.push(KIND_SUBSCRIBE);
            put_str(&mut out, origin);
            out.extend_from_slice(&request.to_be_bytes());
            put_target(&mut out, &change.target);
            put_str(&mut out, &change.channel);
            out.push(u8::from(change.join));
            match &change.since {
                None => out.push(0),
                Some(position) => {
                    out.push(1);
                    put_str(&mut out, &position.epoch);
                    out.extend_from_slice(&position.offset.to_be_bytes());
                }
            }
        }
        Body::Batch { items, places } => {
            let kept: Vec<bool> = places.iter().map(Option::is_some).collect();
            out = encode_batch_head(origin, items, &kept).0;
            for place in places.iter().flatten() {
                put_place(&mut out, &place.epoch, place.offset);
            }
        }
        Body::PresenceQuery { request, user } => {
            out.push(KIND_PRESENCE_QUERY);
            put_str(&mut out, origin);
            out.extend_from_slice(&request.to_be_bytes());
            put_str(&mut out, user);
        }
        Body::PresenceAnswer {
            request,
            connections,
        } => {
            out.push(KIND_PRESENCE_ANSWER);
            put_str(&mut out, origin);
            out.extend_from_slice(&request.to_be_bytes());
            out.extend_from_slice(&connections.to_be_bytes());
        }
    }
    out
}

/// A batch message up to its places, from borrowed items: what the batch script appends the places to, or the
/// whole message when no target is `kept` (one flag per target of every item, in order). Also returns where
/// each item's payload lies in the bytes, so the script can log it without the payload being sent twice.
pub fn encode_batch_head(
    origin: &str,
    items: &[BatchItem],
    kept: &[bool],
) -> (Vec<u8>, Vec<Range<usize>>) {
    debug_assert_eq!(
        kept.len(),
        items.iter().map(|i| i.targets.len()).sum::<usize>()
    );
    let size: usize = items.iter().map(|i| i.payload.len() + 64).sum();
    let mut out = Vec::with_capacity(64 + origin.len() + size);
    let mut payloads = Vec::with_capacity(items.len());
    out.push(VERSION);
    out.push(KIND_BATCH);
    put_str(&mut out, origin);
    out.extend_from_slice(&(items.len() as u32).to_be_bytes());
    let mut kept = kept.iter();
    for item in items {
        out.push(if item.binary { FLAG_BINARY } else { 0 });
        out.extend_from_slice(&(item.payload.len() as u32).to_be_bytes());
        payloads.push(out.len()..out.len() + item.payload.len());
        out.extend_from_slice(&item.payload);
        out.extend_from_slice(&(item.targets.len() as u32).to_be_bytes());
        for target in &item.targets {
            out.push(u8::from(kept.next().copied().unwrap_or(false)));
            put_target(&mut out, target);
        }
    }
    (out, payloads)
}

/// The start of a stamped publish, up to and including its flags; the publish script appends the rest.
pub fn encode_stamped_head(origin: &str, target: &Target, binary: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + origin.len());
    out.push(VERSION);
    out.push(KIND_STAMPED);
    put_str(&mut out, origin);
    put_target(&mut out, target);
    out.push(if binary { FLAG_BINARY } else { 0 });
    out
}

/// Decodes a message. A text publish's payload is checked to be UTF-8 here, so a malformed message from
/// Redis can never make clients fail the connection with 1007 (RFC 6455 §8.1).
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    let mut r = Reader { rest: bytes };
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind = r.u8()?;
    let origin = r.string("origin")?;
    let body = match kind {
        KIND_PUBLISH => {
            let target = r.target()?;
            let flags = r.u8()?;
            let binary = flags & FLAG_BINARY != 0;
            let payload = r.rest.to_vec();
            r.rest = &[];
            if !binary && std::str::from_utf8(&payload).is_err() {
                return Err(WireError::Utf8("text payload"));
            }
            Body::Publish {
                target,
                binary,
                payload,
            }
        }
        KIND_STAMPED => {
            let target = r.target()?;
            let binary = r.u8()? & FLAG_BINARY != 0;
            let Place { epoch, offset } = r.place()?;
            let payload = std::mem::take(&mut r.rest).to_vec();
            if !binary && std::str::from_utf8(&payload).is_err() {
                return Err(WireError::Utf8("text payload"));
            }
            Body::Stamped {
                target,
                binary,
                epoch,
                offset,
                payload,
            }
        }
        KIND_KICK => {
            let request = u64::from_be_bytes(r.array()?);
            let target = r.target()?;
            if matches!(target, Target::Channel(_) | Target::All) {
                return Err(WireError::Target(target_tag(&target)));
            }
            let code = u16::from_be_bytes(r.array()?);
            let reason = r.string("reason")?;
            // The same rule as the admin API's: a code no kick may carry (1005, say, which must never be sent,
            // RFC 6455 §7.4.1) is dropped here, before any reactor sees it.
            crate::proto::frame::check_kick_close(code, &reason)?;
            Body::Kick {
                request,
                target,
                code,
                reason,
            }
        }
        KIND_SUBSCRIBE => {
            let request = u64::from_be_bytes(r.array()?);
            let target = r.target()?;
            if matches!(target, Target::Channel(_) | Target::All) {
                return Err(WireError::Target(target_tag(&target)));
            }
            let channel = r.string("channel")?;
            let join = r.u8()? != 0;
            let since = match r.u8()? {
                0 => None,
                _ => Some(Position {
                    stream: format!("channel:{channel}"),
                    epoch: r.string("epoch")?,
                    offset: u64::from_be_bytes(r.array()?),
                }),
            };
            Body::Subscribe {
                request,
                change: Subscription {
                    target,
                    channel,
                    join,
                    since,
                },
            }
        }
        KIND_BATCH => {
            let count = u32::from_be_bytes(r.array()?) as usize;
            // Each message takes at least 9 bytes: a count larger than what is left is a lie, not an
            // allocation to make.
            let mut items = Vec::with_capacity(count.min(r.rest.len() / 9));
            let mut kept = Vec::new();
            for _ in 0..count {
                let binary = r.u8()? & FLAG_BINARY != 0;
                let len = u32::from_be_bytes(r.array()?) as usize;
                let payload = r.take(len)?.to_vec();
                if !binary && std::str::from_utf8(&payload).is_err() {
                    return Err(WireError::Utf8("text payload"));
                }
                let targets_len = u32::from_be_bytes(r.array()?) as usize;
                // At least 2 bytes each (the kept flag and the tag).
                let mut targets = Vec::with_capacity(targets_len.min(r.rest.len() / 2));
                for _ in 0..targets_len {
                    kept.push(r.u8()? != 0);
                    targets.push(r.target()?);
                }
                items.push(BatchItem {
                    targets,
                    binary,
                    payload,
                });
            }
            let places = kept
                .into_iter()
                .map(|kept| kept.then(|| r.place()).transpose())
                .collect::<Result<_, _>>()?;
            Body::Batch { items, places }
        }
        KIND_PRESENCE_QUERY => {
            let request = u64::from_be_bytes(r.array()?);
            let user = r.string("user")?;
            Body::PresenceQuery { request, user }
        }
        KIND_PRESENCE_ANSWER => {
            let request = u64::from_be_bytes(r.array()?);
            let connections = u64::from_be_bytes(r.array()?);
            Body::PresenceAnswer {
                request,
                connections,
            }
        }
        other => return Err(WireError::Kind(other)),
    };
    if !r.rest.is_empty() {
        return Err(WireError::Trailing);
    }
    Ok(Message { origin, body })
}

/// A place: `epoch length (u8) | epoch | offset (ASCII decimal) | '\n'`, as the scripts write it.
fn put_place(out: &mut Vec<u8>, epoch: &str, offset: u64) {
    debug_assert!(epoch.len() <= u8::MAX as usize);
    out.push(epoch.len() as u8);
    out.extend_from_slice(epoch.as_bytes());
    out.extend_from_slice(offset.to_string().as_bytes());
    out.push(b'\n');
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(u32::try_from(s.len()).is_ok());
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn target_tag(target: &Target) -> u8 {
    match target {
        Target::User(_) => TAG_USER,
        Target::UserClient(..) => TAG_USER_CLIENT,
        Target::Channel(_) => TAG_CHANNEL,
        Target::All => TAG_ALL,
    }
}

fn put_target(out: &mut Vec<u8>, target: &Target) {
    out.push(target_tag(target));
    match target {
        Target::User(user) => put_str(out, user),
        Target::UserClient(user, client) => {
            put_str(out, user);
            put_str(out, client);
        }
        Target::Channel(channel) => put_str(out, channel),
        Target::All => {}
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| WireError::Utf8(what))
    }

    fn place(&mut self) -> Result<Place, WireError> {
        let epoch_len = self.u8()? as usize;
        let epoch = std::str::from_utf8(self.take(epoch_len)?)
            .map_err(|_| WireError::Utf8("epoch"))?
            .to_owned();
        let digits = self.rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let offset = std::str::from_utf8(self.take(digits)?)
            .ok()
            .and_then(|d| d.parse::<u64>().ok())
            .ok_or(WireError::Truncated)?;
        if self.u8()? != b'\n' {
            return Err(WireError::Truncated);
        }
        Ok(Place { epoch, offset })
    }

    fn target(&mut self) -> Result<Target, WireError> {
        Ok(match self.u8()? {
            TAG_USER => Target::User(self.string("user")?),
            TAG_USER_CLIENT => Target::UserClient(self.string("user")?, self.string("client")?),
            TAG_CHANNEL => Target::Channel(self.string("channel")?),
            TAG_ALL => Target::All,
            other => return Err(WireError::Target(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(body: Body) {
        let bytes = encode("node-a", &body);
        assert_eq!(
            decode(&bytes),
            Ok(Message {
                origin: "node-a".into(),
                body
            })
        );
    }

    #[test]
    fn publish_to_each_target_kind_round_trips() {
        for target in [
            Target::User("42".into()),
            Target::UserClient("42".into(), "phone".into()),
            Target::Channel("news".into()),
            Target::All,
        ] {
            round_trip(Body::Publish {
                target,
                binary: false,
                payload: b"hello".to_vec(),
            });
        }
    }

    #[test]
    fn stamped_publish_round_trips() {
        round_trip(Body::Stamped {
            target: Target::UserClient("42".into(), "phone".into()),
            binary: true,
            epoch: "Ab3xYz12".into(),
            offset: 1234567,
            payload: vec![b'\n', 0, 1],
        });
    }

    #[test]
    fn stamped_publish_is_the_head_plus_what_the_script_appends() {
        let mut bytes = encode_stamped_head("n", &Target::All, false);
        bytes.extend_from_slice(b"\x02EP17\nhi");
        assert_eq!(
            decode(&bytes).unwrap().body,
            Body::Stamped {
                target: Target::All,
                binary: false,
                epoch: "EP".into(),
                offset: 17,
                payload: b"hi".to_vec()
            }
        );
    }

    #[test]
    fn stamped_publish_without_an_offset_is_refused() {
        let mut bytes = encode_stamped_head("n", &Target::All, false);
        bytes.extend_from_slice(b"\x02EP\nhi");
        assert!(decode(&bytes).is_err());
    }

    #[test]
    fn binary_publish_keeps_arbitrary_bytes() {
        round_trip(Body::Publish {
            target: Target::User("u".into()),
            binary: true,
            payload: vec![0xff, 0x00, 0xfe],
        });
    }

    #[test]
    fn empty_payload_round_trips() {
        round_trip(Body::Publish {
            target: Target::All,
            binary: false,
            payload: Vec::new(),
        });
    }

    #[test]
    fn kick_round_trips() {
        round_trip(Body::Kick {
            request: 77,
            target: Target::UserClient("u".into(), "c".into()),
            code: 4001,
            reason: "bye".into(),
        });
    }

    #[test]
    fn subscription_changes_round_trip() {
        round_trip(Body::Subscribe {
            request: 9,
            change: Subscription {
                target: Target::UserClient("u".into(), "phone".into()),
                channel: "news".into(),
                join: true,
                since: Some(Position {
                    stream: "channel:news".into(),
                    epoch: "Ab3xYz12".into(),
                    offset: 17,
                }),
            },
        });
        round_trip(Body::Subscribe {
            request: 0,
            change: Subscription {
                target: Target::User("u".into()),
                channel: "a:b".into(),
                join: false,
                since: None,
            },
        });
    }

    #[test]
    fn a_subscription_change_for_a_channel_or_everyone_is_rejected() {
        for target in [Target::Channel("c".into()), Target::All] {
            let tag = target_tag(&target);
            let bytes = encode(
                "n",
                &Body::Subscribe {
                    request: 1,
                    change: Subscription {
                        target,
                        channel: "x".into(),
                        join: true,
                        since: None,
                    },
                },
            );
            assert_eq!(decode(&bytes), Err(WireError::Target(tag)));
        }
    }

    fn place(epoch: &str, offset: u64) -> Option<Place> {
        Some(Place {
            epoch: epoch.into(),
            offset,
        })
    }

    fn two_items() -> Vec<BatchItem> {
        vec![
            BatchItem {
                targets: vec![
                    Target::User("42".into()),
                    Target::UserClient("42".into(), "phone".into()),
                    Target::Channel("news".into()),
                    Target::All,
                ],
                binary: false,
                payload: b"hello".to_vec(),
            },
            BatchItem {
                targets: vec![Target::User("43".into())],
                binary: true,
                payload: vec![0, 0xff, b'\n'],
            },
        ]
    }

    #[test]
    fn batches_round_trip_with_every_target_kind_kept_or_not() {
        round_trip(Body::Batch {
            items: two_items(),
            places: vec![None; 5],
        });
        round_trip(Body::Batch {
            items: two_items(),
            places: vec![place("EP", 7), None, place("Q", 1), None, place("EP", 8)],
        });
        round_trip(Body::Batch {
            items: Vec::new(),
            places: Vec::new(),
        });
    }

    #[test]
    fn a_batch_is_its_head_plus_the_places_the_script_appends() {
        let items = two_items();
        let kept = [true, false, false, false, true];
        let (mut bytes, payloads) = encode_batch_head("n", &items, &kept);
        assert_eq!(&bytes[payloads[0].clone()], b"hello");
        assert_eq!(&bytes[payloads[1].clone()], &[0, 0xff, b'\n']);
        assert!(decode(&bytes).is_err(), "kept targets need their places");
        bytes.extend_from_slice(b"\x02EP17\n\x02EP18\n");
        assert_eq!(
            decode(&bytes).unwrap().body,
            Body::Batch {
                items,
                places: vec![place("EP", 17), None, None, None, place("EP", 18)],
            }
        );
        bytes.push(b'x');
        assert_eq!(decode(&bytes), Err(WireError::Trailing));
    }

    #[test]
    fn a_batch_with_a_text_payload_that_is_not_utf8_or_a_lying_count_is_rejected() {
        let bad = encode(
            "n",
            &Body::Batch {
                items: vec![BatchItem {
                    targets: vec![Target::All],
                    binary: false,
                    payload: vec![0xff],
                }],
                places: vec![None],
            },
        );
        assert_eq!(decode(&bad), Err(WireError::Utf8("text payload")));
        let mut lying = encode(
            "n",
            &Body::Batch {
                items: Vec::new(),
                places: Vec::new(),
            },
        );
        let at = lying.len() - 4;
        lying[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&lying), Err(WireError::Truncated));
    }

    #[test]
    fn presence_query_and_answer_round_trip() {
        round_trip(Body::PresenceQuery {
            request: u64::MAX,
            user: "a/b".into(),
        });
        round_trip(Body::PresenceAnswer {
            request: 7,
            connections: 12345,
        });
    }

    #[test]
    fn publish_layout_is_compact() {
        let bytes = encode(
            "n",
            &Body::Publish {
                target: Target::User("u".into()),
                binary: false,
                payload: b"hi".to_vec(),
            },
        );
        // version, kind, origin (4+1), tag, user (4+1), flags, payload (2)
        assert_eq!(bytes.len(), 1 + 1 + 5 + 1 + 5 + 1 + 2);
        assert_eq!(&bytes[..2], &[VERSION, KIND_PUBLISH]);
    }

    #[test]
    fn other_version_is_rejected() {
        let mut bytes = encode(
            "n",
            &Body::PresenceAnswer {
                request: 1,
                connections: 1,
            },
        );
        bytes[0] = VERSION + 1;
        assert_eq!(decode(&bytes), Err(WireError::Version(VERSION + 1)));
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let mut bytes = encode(
            "n",
            &Body::PresenceAnswer {
                request: 1,
                connections: 1,
            },
        );
        bytes[1] = 9;
        assert_eq!(decode(&bytes), Err(WireError::Kind(9)));
    }

    #[test]
    fn unknown_target_tag_is_rejected() {
        let mut bytes = encode(
            "n",
            &Body::Publish {
                target: Target::All,
                binary: true,
                payload: Vec::new(),
            },
        );
        bytes[2 + 4 + 1] = 7; // the tag follows version, kind and the origin "n"
        assert_eq!(decode(&bytes), Err(WireError::Target(7)));
    }

    #[test]
    fn kick_of_a_channel_is_rejected() {
        let bytes = encode(
            "n",
            &Body::Kick {
                request: 0,
                target: Target::Channel("c".into()),
                code: 4000,
                reason: String::new(),
            },
        );
        assert_eq!(decode(&bytes), Err(WireError::Target(TAG_CHANNEL)));
    }

    #[test]
    fn kick_with_a_code_no_kick_may_carry_is_rejected() {
        use crate::proto::frame::KickCloseError;
        for code in [1005, 1006, 1001, 2999, 5000, 0] {
            let bytes = encode(
                "n",
                &Body::Kick {
                    request: 0,
                    target: Target::User("u".into()),
                    code,
                    reason: String::new(),
                },
            );
            assert_eq!(
                decode(&bytes),
                Err(WireError::Kick(KickCloseError::Code(code))),
                "{code}"
            );
        }
    }

    #[test]
    fn kick_with_a_reason_too_long_for_a_close_frame_is_rejected() {
        use crate::proto::frame::{KickCloseError, MAX_CLOSE_REASON_BYTES};
        let bytes = encode(
            "n",
            &Body::Kick {
                request: 0,
                target: Target::User("u".into()),
                code: 4000,
                reason: "r".repeat(MAX_CLOSE_REASON_BYTES + 1),
            },
        );
        assert_eq!(
            decode(&bytes),
            Err(WireError::Kick(KickCloseError::ReasonTooLong))
        );
    }

    #[test]
    fn text_payload_that_is_not_utf8_is_rejected() {
        let bytes = encode(
            "n",
            &Body::Publish {
                target: Target::All,
                binary: false,
                payload: vec![0xff],
            },
        );
        assert_eq!(decode(&bytes), Err(WireError::Utf8("text payload")));
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = encode(
            "node",
            &Body::Kick {
                request: 0,
                target: Target::User("user".into()),
                code: 4000,
                reason: "why".into(),
            },
        );
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "prefix of {len} bytes");
        }
    }

    #[test]
    fn trailing_bytes_after_a_fixed_body_are_rejected() {
        let mut bytes = encode(
            "n",
            &Body::PresenceAnswer {
                request: 1,
                connections: 1,
            },
        );
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(WireError::Trailing));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_of_a_batch_or_subscription_prefix_never_panics(
            kind in prop_oneof![Just(KIND_SUBSCRIBE), Just(KIND_BATCH)],
            rest in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            let mut bytes = vec![VERSION, kind, 0, 0, 0, 1, b'n'];
            bytes.extend_from_slice(&rest);
            let _ = decode(&bytes);
        }

        #[test]
        fn publishes_round_trip(
            origin in ".{0,16}",
            user in ".{0,16}",
            client in ".{0,16}",
            payload in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let body = Body::Publish {
                target: Target::UserClient(user, client),
                binary: true,
                payload,
            };
            let decoded = decode(&encode(&origin, &body)).unwrap();
            prop_assert_eq!(decoded, Message { origin, body });
        }
    }
}
