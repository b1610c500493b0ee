//! Shared history in a cluster: the Redis script that stamps a message with its stream's epoch and next
//! offset, keeps it in a capped Redis stream, and publishes it to every node, all in one atomic step.
//!
//! Owns the script and the key names; the admin thread runs it (`Cluster::publish_stamped`), and each node's
//! subscriber stores what the script published in its local history (`history::History::publish_stamped`), in
//! the order Redis ran the scripts, which is the order of the offsets. Does not own delivery or the local store.
//!
//! Keys per stream (the stream name last, so names holding `:` cannot collide):
//! `{prefix}:history:epoch:{stream}` (string), `{prefix}:history:offset:{stream}` (counter) and
//! `{prefix}:history:log:{stream}` (a Redis stream with entry ids `{offset}-1` and fields `c` client, `b` binary,
//! `p` payload). All three get the history TTL again on every publish, so they expire together: a stream idle
//! for `ttl_secs` starts over with a new epoch, exactly as on a single node.

/// `KEYS`: epoch, offset, log. `ARGV`: bus channel, message head (`wire::encode_stamped_head`), payload,
/// candidate epoch (used when the stream has none), `MAXLEN ~` of the log, TTL in ms, client tag (`""` for
/// none), binary flag (`"1"`/`"0"`). Returns `{epoch, offset}`.
pub const PUBLISH_SCRIPT: &str = r#"
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[1], epoch)
  redis.call('DEL', KEYS[2], KEYS[3])
end
local offset = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], offset .. '-1', 'c', ARGV[7], 'b', ARGV[8], 'p', ARGV[3])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
redis.call('PUBLISH', ARGV[1], ARGV[2] .. string.char(#epoch) .. epoch .. offset .. '\n' .. ARGV[3])
return {epoch, offset}
"#;

/// The epoch, offset and log keys of `stream` under `prefix`.
pub fn keys(prefix: &str, stream: &str) -> [String; 3] {
    [
        format!("{prefix}:history:epoch:{stream}"),
        format!("{prefix}:history:offset:{stream}"),
        format!("{prefix}:history:log:{stream}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

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
