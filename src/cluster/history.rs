//! Shared history in a cluster: the Redis keys of a stream's epoch, offset counter and log, and reading the log
//! back for a node that lacks earlier messages of a stream (backfill).
//!
//! The script that stamps a message with its stream's epoch and next offset, logs it and appends it to the bus
//! in one atomic step is `scripts::STAMPED`; each node's bus reader stores what it appended in its local
//! history (`publish::Publisher::publish_stamped`), in bus order, which is the order of the offsets. Does not
//! own delivery or the local store.
//!
//! Keys per stream (the stream name last, so names holding `:` cannot collide):
//! `{prefix}:history:epoch:{stream}` (string), `{prefix}:history:offset:{stream}` (counter) and
//! `{prefix}:history:log:{stream}` (a Redis stream with entry ids `{offset}-1` and fields `c` client, `b` binary,
//! `p` payload). All three get the history TTL again on every publish, so they expire together: a stream idle
//! for `ttl_secs` starts over with a new epoch, exactly as on a single node.

use crate::history::Backfill;

/// The epoch, offset and log keys of `stream` under `prefix`.
pub fn keys(prefix: &str, stream: &str) -> [String; 3] {
    [
        format!("{prefix}:history:epoch:{stream}"),
        format!("{prefix}:history:offset:{stream}"),
        format!("{prefix}:history:log:{stream}"),
    ]
}

/// One entry of `XRANGE` on a log key: its id and its flat field/value list.
pub type LogEntry = (String, Vec<Vec<u8>>);

/// Turns `XRANGE` entries into messages to backfill, in order. Entries that do not have the layout the publish
/// script writes (another program's, or a text payload that is not UTF-8) end the backfill there: what follows
/// would not be contiguous.
pub fn parse_log(entries: &[LogEntry]) -> Vec<Backfill> {
    let mut out = Vec::with_capacity(entries.len());
    for (id, fields) in entries {
        let Some(offset) = id.strip_suffix("-1").and_then(|o| o.parse::<u64>().ok()) else {
            break;
        };
        let field = |name: &[u8]| {
            fields
                .chunks_exact(2)
                .find(|kv| kv[0] == name)
                .map(|kv| kv[1].as_slice())
        };
        let (Some(client), Some(binary), Some(payload)) = (field(b"c"), field(b"b"), field(b"p"))
        else {
            break;
        };
        let binary = binary == b"1";
        if !binary && std::str::from_utf8(payload).is_err() {
            break;
        }
        let client = match std::str::from_utf8(client) {
            Ok("") => None,
            Ok(c) => Some(c.to_owned()),
            Err(_) => break,
        };
        out.push(Backfill {
            offset,
            client,
            binary,
            payload: payload.to_vec(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, c: &str, b: &str, p: &[u8]) -> LogEntry {
        (
            id.into(),
            vec![
                b"c".to_vec(),
                c.as_bytes().to_vec(),
                b"b".to_vec(),
                b.as_bytes().to_vec(),
                b"p".to_vec(),
                p.to_vec(),
            ],
        )
    }

    #[test]
    fn log_entries_become_backfill_in_order() {
        let got = parse_log(&[
            entry("4-1", "", "0", b"hi"),
            entry("5-1", "phone", "1", &[0xff]),
        ]);
        assert_eq!(
            got,
            [
                Backfill {
                    offset: 4,
                    client: None,
                    binary: false,
                    payload: b"hi".to_vec()
                },
                Backfill {
                    offset: 5,
                    client: Some("phone".into()),
                    binary: true,
                    payload: vec![0xff]
                }
            ]
        );
    }

    #[test]
    fn a_foreign_log_entry_ends_the_backfill() {
        let got = parse_log(&[
            entry("4-1", "", "0", b"ok"),
            entry("5-0", "", "0", b"not ours"),
            entry("6-1", "", "0", b"after"),
        ]);
        assert_eq!(got.len(), 1);
        assert!(parse_log(&[entry("4-1", "", "0", &[0xff])]).is_empty());
    }

    #[test]
    fn keys_put_the_stream_name_last() {
        assert_eq!(
            keys("dp", "user:a:b"),
            [
                "dp:history:epoch:user:a:b",
                "dp:history:offset:user:a:b",
                "dp:history:log:user:a:b"
            ]
        );
    }
}
