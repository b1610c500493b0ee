//! Telling connections that they may have missed messages: which streams a `resync` notice names, and the close
//! a connection that did not opt into recovery gets instead.
//!
//! It owns the notice's wording and the close code; the cluster decides *when* (a bus gap it cannot fill, a bus
//! message it had to drop) and the reactors carry it out for their connections (`dispatch::Command::Missed`).
//! A gap is never silent: a recovering connection learns which streams to refetch and keeps its connection; any
//! other connection is closed with [`MISSED_CLOSE_CODE`], on which clients reconnect, and an application that
//! refetches its state when it reconnects (as it must after any disconnection) is whole again.

use super::{envelope, stream_of, Target};
use crate::proto::frame;
use bytes::Bytes;
use std::sync::atomic::AtomicU64;

/// Close code for a connection that may have missed messages and did not opt into recovery: 1012, "Service
/// Restart" in the IANA WebSocket close code registry (RFC 6455 §11.7): the node's link to the rest of the
/// cluster restarted and could not bring back everything. Clients reconnect on it (it is neither 1000 nor a
/// 4000-4999 kick, which clients must not come back after); it is distinct from 1001 (shutdown), 1008 (slow
/// consumer) and 1013 (buffer budget), so a client or a log can tell why.
pub const MISSED_CLOSE_CODE: u16 = 1012;
/// Close reason sent with [`MISSED_CLOSE_CODE`].
pub const MISSED_CLOSE_REASON: &str = "messages may have been missed: reconnect and refetch";

/// Which connections may have missed messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missed {
    /// Every connection of the node, in every stream it receives: bus entries were lost and nobody knows for
    /// whom they were.
    Everything,
    /// The target's connections, in the target's stream: one known message could not be delivered.
    Target(Target),
}

impl Missed {
    /// Appends the `resync` notices (text frames) for a recovering connection of `user` subscribed to
    /// `channels`: one per stream of this scope that the connection receives. The epoch is empty: after a gap
    /// this node's copy of the stream's history cannot be trusted, and the next envelope carries the stream's
    /// epoch and offset again.
    ///
    /// With `sse` each notice is an `event: resync` of a Server-Sent Events stream (no id: the epoch is
    /// unknown) instead of a text frame.
    pub fn notices<'a>(
        &self,
        user: &str,
        channels: impl Iterator<Item = &'a str>,
        sse: bool,
        out: &mut Vec<Bytes>,
    ) {
        let notice = |stream: &str| -> Bytes {
            let text = envelope::encode_resync(stream, "", 0);
            match sse {
                true => Bytes::from(crate::proto::sse::event(None, Some("resync"), false, &text)),
                false => frame::encode_message(true, &text),
            }
        };
        match self {
            Missed::Target(target) => out.push(notice(&stream_of(target).0)),
            Missed::Everything => {
                out.push(notice(&format!("user:{user}")));
                out.extend(channels.map(|c| notice(&format!("channel:{c}"))));
                out.push(notice("all"));
            }
        }
    }
}

/// Connections told, counted by the reactors that told them (the cluster shows them on `/metrics`).
#[derive(Debug, Default)]
pub struct Told {
    /// Recovering connections sent `resync` notices.
    pub resynced: AtomicU64,
    /// Other connections closed with [`MISSED_CLOSE_CODE`].
    pub closed: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams(missed: &Missed, user: &str, channels: &[&str]) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        missed.notices(user, channels.iter().copied(), false, &mut out);
        out.iter()
            .map(|f| serde_json::from_slice(envelope::frame_payload(f)).unwrap())
            .collect()
    }

    #[test]
    fn a_gap_in_everything_names_every_stream_the_connection_receives() {
        let got = streams(&Missed::Everything, "42", &["news", "a\"b"]);
        let names: Vec<&str> = got.iter().map(|v| v["s"].as_str().unwrap()).collect();
        assert_eq!(names, ["user:42", "channel:news", "channel:a\"b", "all"]);
        for v in &got {
            assert_eq!(v["type"], "resync");
            assert_eq!((v["e"].as_str(), v["o"].as_u64()), (Some(""), Some(0)));
        }
    }

    #[test]
    fn a_dropped_message_names_its_own_stream_only() {
        let target = Missed::Target(Target::UserClient("7".into(), "phone".into()));
        let names: Vec<String> = streams(&target, "7", &["news"])
            .iter()
            .map(|v| v["s"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["user:7"]);
        let all = streams(&Missed::Target(Target::All), "7", &[]);
        assert_eq!(all[0]["s"], "all");
    }

    #[test]
    fn the_close_code_is_one_clients_reconnect_on_and_may_be_sent() {
        // Not 1000 nor 4000-4999 (kicks: clients stay away), not reserved (RFC 6455 §7.4.1: 1004-1006, 1015).
        assert!(!(MISSED_CLOSE_CODE == 1000 || (4000..=4999).contains(&MISSED_CLOSE_CODE)));
        assert!(![1004, 1005, 1006, 1015].contains(&MISSED_CLOSE_CODE));
        assert!(MISSED_CLOSE_REASON.len() <= frame::MAX_CLOSE_REASON_BYTES);
    }

    #[test]
    fn sse_streams_get_resync_events() {
        let mut out = Vec::new();
        Missed::Target(Target::All).notices("7", std::iter::empty(), true, &mut out);
        assert_eq!(
            &out[0][..],
            &b"event: resync\ndata: {\"type\":\"resync\",\"s\":\"all\",\"e\":\"\",\"o\":0}\n\n"[..]
        );
    }
}
