//! The Lua scripts that append to the cluster bus when a plain `XADD` cannot, and how scripts are run
//! (`EVALSHA`, falling back to `EVAL` the first time a Redis has not seen the script, or after it restarted).
//!
//! Owns the one rule every bus entry follows (`bus_append`, shared by every script, and mirrored by
//! `Cluster::append`'s fast path): its id is `{epoch}-*`, so Redis numbers it one more than the last entry of the
//! epoch; the epoch is the last entry's, or, when the stream does not exist, Redis's time in milliseconds, so a
//! stream that was lost and started again never continues an old epoch's numbering. And the one rule that places
//! a message in its stream's shared history (`stamp`, shared by the single and the batch script). Reading the
//! bus is `bus`'s job; the history keys are `history`'s.

use sha1::{Digest, Sha1};
use std::sync::OnceLock;

/// The Lua function both scripts use to append one message to the bus: `bus_append(bus_key, maxlen, message)`
/// returns the entry's id. The epoch is read from the last entry itself, not from a key of its own, so it cannot
/// drift apart from the stream: if the stream is lost, so is its epoch.
macro_rules! bus_append_lua {
    () => {
        r#"
local function bus_append(bus, maxlen, message)
  local last = redis.call('XREVRANGE', bus, '+', '-', 'COUNT', 1)
  local epoch
  if #last > 0 then
    epoch = string.match(last[1][1], '^(%d+)-')
  else
    -- Emptied by hand (XTRIM 0), it would keep its last id: start it over.
    redis.call('DEL', bus)
    local now = redis.call('TIME')
    epoch = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
  end
  return redis.call('XADD', bus, 'MAXLEN', '~', maxlen, epoch .. '-*', 'm', message)
end
"#
    };
}

/// The Lua function both stamping scripts use to place one message in its stream's shared history:
/// `stamp(epoch_key, offset_key, log_key, candidate_epoch, log_maxlen, ttl_ms, client, binary, payload)` returns
/// the stream's epoch and the message's offset, and `place(epoch, offset)` the bytes `wire` reads them from.
macro_rules! stamp_lua {
    () => {
        r#"
local function stamp(epoch_key, offset_key, log_key, candidate, log_maxlen, ttl, client, binary, payload)
  local epoch = redis.call('GET', epoch_key)
  -- A lost offset counter (evicted on its own) would restart offsets under the old epoch: start over instead.
  if not epoch or redis.call('EXISTS', offset_key) == 0 then
    epoch = candidate
    redis.call('SET', epoch_key, epoch)
    redis.call('DEL', offset_key, log_key)
  end
  local offset = redis.call('INCR', offset_key)
  redis.call('XADD', log_key, 'MAXLEN', '~', log_maxlen, offset .. '-1', 'c', client, 'b', binary, 'p', payload)
  redis.call('PEXPIRE', epoch_key, ttl)
  redis.call('PEXPIRE', offset_key, ttl)
  redis.call('PEXPIRE', log_key, ttl)
  return epoch, offset
end
local function place(epoch, offset)
  return string.char(#epoch) .. epoch .. offset .. '\n'
end
"#
    };
}

/// `KEYS`: bus. `ARGV`: `MAXLEN ~` of the bus, message (`wire` bytes). Returns the entry's id. The slow path of
/// `Cluster::append`: when the stream does not exist, or the epoch that node knew is not the stream's.
pub static APPEND: Script = Script::new(concat!(
    bus_append_lua!(),
    "return bus_append(KEYS[1], ARGV[1], ARGV[2])\n"
));

/// `KEYS`: the stream's epoch, offset and log keys (`history::keys`), then the bus. `ARGV`: message head
/// (`wire::encode_stamped_head`), payload, candidate stream epoch (used when the stream has none), `MAXLEN ~` of
/// the log, TTL in ms, client tag (`""` for none), binary flag (`"1"`/`"0"`), `MAXLEN ~` of the bus. Returns
/// `{epoch, offset}`: the stream's, which the publish answer carries.
///
/// The stream's epoch and offset are assigned, the message logged for backfill and appended to the bus in one
/// atomic step, so the bus order is the offset order on every node.
pub static STAMPED: Script = Script::new(concat!(
    bus_append_lua!(),
    stamp_lua!(),
    r#"
local epoch, offset = stamp(KEYS[1], KEYS[2], KEYS[3], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[2])
bus_append(KEYS[4], ARGV[8], ARGV[1] .. place(epoch, offset) .. ARGV[2])
return {epoch, offset}
"#
));

/// `KEYS`: the bus, then the epoch, offset and log keys (`history::keys`) of each kept target, in the batch's
/// order. `ARGV`: the batch message up to its places (`wire::encode_batch_head`), candidate stream epoch, `MAXLEN
/// ~` of the logs, TTL in ms, `MAXLEN ~` of the bus, then per kept target: its payload's first and last byte in
/// the message (1-based, inclusive: the payload is sent once however many targets it has), client tag (`""` for
/// none), binary flag. Returns `{epoch, offset}` per kept target, in order.
///
/// A whole batch is one script and one bus entry: its kept messages are placed one after another, each stream's
/// offsets in the batch's order, and the bus entry carries every message with the places appended. Every node
/// applies the batch at one point of the bus, in the body's order.
pub static STAMPED_BATCH: Script = Script::new(concat!(
    bus_append_lua!(),
    stamp_lua!(),
    r#"
local message = ARGV[1]
local places, answer, payloads = {}, {}, {}
for i = 1, (#KEYS - 1) / 3 do
  local k, a = 3 * i - 1, 4 * i + 2
  local first = tonumber(ARGV[a])
  local payload = payloads[first]
  if not payload then
    payload = string.sub(message, first, tonumber(ARGV[a + 1]))
    payloads[first] = payload
  end
  local epoch, offset = stamp(KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[2], ARGV[3], ARGV[4], ARGV[a + 2], ARGV[a + 3],
    payload)
  places[i] = place(epoch, offset)
  answer[i] = {epoch, offset}
end
bus_append(KEYS[1], ARGV[5], message .. table.concat(places))
return answer
"#
));

/// A Lua script and its SHA1, computed once.
pub struct Script {
    text: &'static str,
    sha: OnceLock<String>,
}

impl Script {
    const fn new(text: &'static str) -> Script {
        Script {
            text,
            sha: OnceLock::new(),
        }
    }

    /// The script's source.
    pub fn text(&self) -> &'static str {
        self.text
    }

    /// The hex SHA1 Redis knows the script by.
    pub fn sha(&self) -> &str {
        self.sha.get_or_init(|| {
            Sha1::digest(self.text.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
    }

    /// Runs the script with `keys` keys, `args` adding the keys and then the arguments: by its SHA1, so a
    /// publish sends a few bytes of script instead of the whole text, and by its text when Redis answers
    /// `NOSCRIPT` (first use, or a Redis that restarted).
    pub fn invoke<T: redis::FromRedisValue>(
        &self,
        conn: &mut redis::Connection,
        keys: usize,
        args: impl Fn(&mut redis::Cmd),
    ) -> redis::RedisResult<T> {
        let mut by_sha = redis::cmd("EVALSHA");
        by_sha.arg(self.sha()).arg(keys);
        args(&mut by_sha);
        match by_sha.query(conn) {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                let mut by_text = redis::cmd("EVAL");
                by_text.arg(self.text).arg(keys);
                args(&mut by_text);
                by_text.query(conn)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_shares_the_one_append_rule_and_stamping_ones_the_one_stamp_rule() {
        for script in [&APPEND, &STAMPED, &STAMPED_BATCH] {
            assert_eq!(
                script.text().matches("local function bus_append").count(),
                1
            );
            assert!(script.text().contains("epoch .. '-*'"));
        }
        assert!(STAMPED.text().contains("bus_append(KEYS[4]"));
        for script in [&STAMPED, &STAMPED_BATCH] {
            assert_eq!(script.text().matches("local function stamp").count(), 1);
        }
    }

    #[test]
    fn the_sha_is_redis_script_id() {
        // SHA1 of "return 1", as `SCRIPT LOAD "return 1"` answers.
        let one = Script::new("return 1");
        assert_eq!(one.sha(), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
        assert_eq!(APPEND.sha().len(), 40);
        assert_ne!(APPEND.sha(), STAMPED.sha());
        assert_ne!(STAMPED.sha(), STAMPED_BATCH.sha());
    }
}
