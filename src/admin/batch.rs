//! The body of `POST /publish/batch`, sans-IO: JSON in, the batch's messages out, or why not.
//!
//! It owns the body's format and its per-batch limits: `{"messages":[{"targets":["user/42","all",…],"data":"…"}
//! | {"targets":[…],"data_base64":"…"},…]}`, targets in the single publish routes' syntax (`route::
//! publish_target`). The whole body is checked before anything is published: one malformed message refuses the
//! batch with 400 naming its index and why; a batch over `admin.max_batch_targets`, or a message over
//! `admin.max_publish_bytes`, gets 413. It does not publish (`api`, through `publish`) and does not bound the
//! body's bytes (the listener refuses a `Content-Length` over `admin.max_batch_bytes` before reading it).

use super::route;
use crate::message::Target;
use crate::publish::BatchItem;
use base64::Engine as _;
use serde_json::{Map, Value};

/// The limits one batch is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Targets over all messages (`admin.max_batch_targets`).
    pub max_targets: usize,
    /// Bytes in one message's payload, after base64 decoding (`admin.max_publish_bytes`).
    pub max_payload_bytes: usize,
}

/// Why a batch is refused, and the answer's status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// 400: the body is not a batch (not JSON, no `messages` array, an unknown key, no message).
    #[error("{0}")]
    Body(String),
    /// 400: message `index` is malformed.
    #[error("messages[{index}]: {why}")]
    Message {
        /// The message's index in `messages`.
        index: usize,
        /// What is wrong with it.
        why: String,
    },
    /// 413: message `index`'s payload is over `admin.max_publish_bytes`.
    #[error(
        "messages[{index}]: payload of {bytes} bytes is over admin.max_publish_bytes ({limit})"
    )]
    PayloadTooLarge {
        /// The message's index.
        index: usize,
        /// Its payload's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// 413: the batch names more than `admin.max_batch_targets` targets (counted up to message `index`).
    #[error("more than admin.max_batch_targets ({limit}) targets (messages[{index}] goes over)")]
    TooManyTargets {
        /// The message whose targets went over.
        index: usize,
        /// The limit.
        limit: usize,
    },
}

impl BatchError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            BatchError::Body(_) | BatchError::Message { .. } => 400,
            BatchError::PayloadTooLarge { .. } | BatchError::TooManyTargets { .. } => 413,
        }
    }

    /// The index of the message at fault, when one is.
    pub fn index(&self) -> Option<usize> {
        match self {
            BatchError::Body(_) => None,
            BatchError::Message { index, .. }
            | BatchError::PayloadTooLarge { index, .. }
            | BatchError::TooManyTargets { index, .. } => Some(*index),
        }
    }
}

/// Parses and checks a whole batch body; nothing in it may be published unless this returns `Ok`.
pub fn parse(body: &[u8], limits: &Limits) -> Result<Vec<BatchItem>, BatchError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| BatchError::Body(format!("body is not JSON: {e}")))?;
    let Value::Object(mut top) = value else {
        return Err(BatchError::Body(
            "body must be an object {\"messages\": [...]}".into(),
        ));
    };
    let Some(Value::Array(messages)) = top.remove("messages") else {
        return Err(BatchError::Body("messages must be an array".into()));
    };
    if let Some(key) = top.keys().next() {
        return Err(BatchError::Body(format!("unknown key {key:?}")));
    }
    if messages.is_empty() {
        return Err(BatchError::Body("messages is empty".into()));
    }
    let mut targets_seen = 0usize;
    let mut items = Vec::with_capacity(messages.len());
    for (index, message) in messages.into_iter().enumerate() {
        let bad = |why: String| BatchError::Message { index, why };
        let Value::Object(message) = message else {
            return Err(bad(
                "must be an object with targets and data or data_base64".into(),
            ));
        };
        // Counted before the targets are parsed, so an oversized batch is refused before the rest of it is
        // looked at.
        let count = match message.get("targets") {
            Some(Value::Array(targets)) => targets.len(),
            _ => 0,
        };
        targets_seen = targets_seen.saturating_add(count);
        if targets_seen > limits.max_targets {
            return Err(BatchError::TooManyTargets {
                index,
                limit: limits.max_targets,
            });
        }
        let item = parse_message(message).map_err(bad)?;
        if item.payload.len() > limits.max_payload_bytes {
            return Err(BatchError::PayloadTooLarge {
                index,
                bytes: item.payload.len(),
                limit: limits.max_payload_bytes,
            });
        }
        items.push(item);
    }
    Ok(items)
}

/// One message: `targets` (a non-empty array of target strings) and exactly one of `data` (text) and
/// `data_base64` (binary); any other key is refused, so a misspelled one is not silently ignored.
fn parse_message(mut message: Map<String, Value>) -> Result<BatchItem, String> {
    let targets = match message.remove("targets") {
        Some(Value::Array(targets)) if !targets.is_empty() => targets,
        Some(Value::Array(_)) => return Err("targets is empty".into()),
        Some(_) => return Err("targets must be an array of strings".into()),
        None => return Err("targets is missing".into()),
    };
    let targets = targets
        .iter()
        .enumerate()
        .map(|(j, target)| {
            let Value::String(raw) = target else {
                return Err(format!("targets[{j}] must be a string"));
            };
            route::publish_target(raw).map_err(|why| format!("targets[{j}] ({raw:?}): {why}"))
        })
        .collect::<Result<Vec<Target>, String>>()?;
    let (binary, payload) = match (message.remove("data"), message.remove("data_base64")) {
        (Some(Value::String(text)), None) => (false, text.into_bytes()),
        (None, Some(Value::String(encoded))) => {
            let payload = base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map_err(|e| format!("data_base64 is not base64: {e}"))?;
            (true, payload)
        }
        (Some(_), Some(_)) => return Err("has both data and data_base64".into()),
        (None, None) => return Err("needs data (text) or data_base64 (binary)".into()),
        _ => return Err("data and data_base64 must be strings".into()),
    };
    if let Some(key) = message.keys().next() {
        return Err(format!("unknown key {key:?}"));
    }
    Ok(BatchItem {
        targets,
        binary,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_targets: 10,
        max_payload_bytes: 8,
    };

    fn parse_str(body: &str) -> Result<Vec<BatchItem>, BatchError> {
        parse(body.as_bytes(), &LIMITS)
    }

    #[test]
    fn every_target_kind_and_both_payload_kinds_are_read_in_order() {
        let items = parse_str(
            r#"{"messages":[
                {"targets":["user/42","user/43/client/phone","channel/news","all"],"data":"hi"},
                {"targets":["user/a%2Fb"],"data_base64":"AP8="}
            ]}"#,
        )
        .unwrap();
        assert_eq!(
            items,
            [
                BatchItem {
                    targets: vec![
                        Target::User("42".into()),
                        Target::UserClient("43".into(), "phone".into()),
                        Target::Channel("news".into()),
                        Target::All,
                    ],
                    binary: false,
                    payload: b"hi".to_vec(),
                },
                BatchItem {
                    targets: vec![Target::User("a/b".into())],
                    binary: true,
                    payload: vec![0, 0xff],
                },
            ]
        );
    }

    #[test]
    fn a_malformed_message_is_refused_with_its_index_and_why() {
        let cases = [
            (
                r#"{"messages":[{"targets":["all"],"data":"x"}, 3]}"#,
                1,
                "object",
            ),
            (r#"{"messages":[{"data":"x"}]}"#, 0, "targets is missing"),
            (
                r#"{"messages":[{"targets":[],"data":"x"}]}"#,
                0,
                "targets is empty",
            ),
            (r#"{"messages":[{"targets":"all","data":"x"}]}"#, 0, "array"),
            (
                r#"{"messages":[{"targets":["all",7],"data":"x"}]}"#,
                0,
                "targets[1] must be a string",
            ),
            (
                r#"{"messages":[{"targets":["all"],"data":"x"},{"targets":["users/1"],"data":"x"}]}"#,
                1,
                "targets[0]",
            ),
            (
                r#"{"messages":[{"targets":["user//client/c"],"data":"x"}]}"#,
                0,
                "empty path segment",
            ),
            (r#"{"messages":[{"targets":["all"]}]}"#, 0, "needs data"),
            (
                r#"{"messages":[{"targets":["all"],"data":"x","data_base64":"eA=="}]}"#,
                0,
                "both",
            ),
            (
                r#"{"messages":[{"targets":["all"],"data":1}]}"#,
                0,
                "must be strings",
            ),
            (
                r#"{"messages":[{"targets":["all"],"data_base64":"!!"}]}"#,
                0,
                "not base64",
            ),
            (
                r#"{"messages":[{"targets":["all"],"data":"x","dat":"y"}]}"#,
                0,
                "unknown key \"dat\"",
            ),
        ];
        for (body, index, why) in cases {
            let err = parse_str(body).unwrap_err();
            assert_eq!(err.status(), 400, "{body}");
            assert_eq!(err.index(), Some(index), "{body}: {err}");
            assert!(err.to_string().contains(why), "{body}: {err}");
            assert!(
                err.to_string().starts_with(&format!("messages[{index}]")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_body_that_is_no_batch_is_refused_without_an_index() {
        for (body, why) in [
            ("not json", "not JSON"),
            ("[]", "object"),
            (r#"{"message":[]}"#, "messages must be an array"),
            (r#"{"messages":{}}"#, "messages must be an array"),
            (r#"{"messages":[]}"#, "empty"),
            (
                r#"{"messages":[{"targets":["all"],"data":"x"}],"x":1}"#,
                "unknown key",
            ),
        ] {
            let err = parse_str(body).unwrap_err();
            assert_eq!((err.status(), err.index()), (400, None), "{body}");
            assert!(err.to_string().contains(why), "{body}: {err}");
        }
    }

    #[test]
    fn limits_give_413_naming_the_message_that_crossed_them() {
        let nine =
            r#"{"targets":["all","all","all","all","all","all","all","all","all"],"data":"x"}"#;
        let two = r#"{"targets":["all","all"],"data":"x"}"#;
        let err = parse_str(&format!(r#"{{"messages":[{nine},{two}]}}"#)).unwrap_err();
        assert_eq!((err.status(), err.index()), (413, Some(1)));
        assert!(
            err.to_string().contains("admin.max_batch_targets (10)"),
            "{err}"
        );
        let many: Vec<String> = (0..11).map(|_| "\"all\"".to_string()).collect();
        let err = parse_str(&format!(
            r#"{{"messages":[{{"targets":[{}],"data":"x"}}]}}"#,
            many.join(",")
        ))
        .unwrap_err();
        assert_eq!((err.status(), err.index()), (413, Some(0)));
        let err =
            parse_str(r#"{"messages":[{"targets":["all"],"data":"123456789"}]}"#).unwrap_err();
        assert_eq!((err.status(), err.index()), (413, Some(0)));
        assert!(err.to_string().contains("9 bytes"), "{err}");
        // Exactly at the limits is fine.
        let ten: Vec<String> = (0..10).map(|_| "\"all\"".to_string()).collect();
        let ok = format!(
            r#"{{"messages":[{{"targets":[{}],"data":"12345678"}}]}}"#,
            ten.join(",")
        );
        assert_eq!(parse_str(&ok).unwrap()[0].targets.len(), 10);
    }
}
