//! The Lua scripts that append to the cluster bus when a plain `XADD` cannot, and how scripts are run
//! (`EVALSHA`, falling back to `EVAL` the first time a Redis has not seen the script, or after it restarted).
//!
//! Owns the one rule every bus entry follows (`bus_append`, shared by both scripts, and mirrored by
//! `Cluster::append`'s fast path): its id is `{epoch}-*`, so Redis numbers it one more than the last entry of the
//! epoch; the epoch is the last entry's, or, when the stream does not exist, Redis's time in milliseconds, so a
//! stream that was lost and started again never continues an old epoch's numbering. Reading that sequence is
//! `bus`'s job; the stamped-history script's other keys are `history`'s.

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
    r#"
local epoch = redis.call('GET', KEYS[1])
-- A lost offset counter (evicted on its own) would restart offsets under the old epoch: start over instead.
if not epoch or redis.call('EXISTS', KEYS[2]) == 0 then
  epoch = ARGV[3]
  redis.call('SET', KEYS[1], epoch)
  redis.call('DEL', KEYS[2], KEYS[3])
end
local offset = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], offset .. '-1', 'c', ARGV[6], 'b', ARGV[7], 'p', ARGV[2])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
bus_append(KEYS[4], ARGV[8], ARGV[1] .. string.char(#epoch) .. epoch .. offset .. '\n' .. ARGV[2])
return {epoch, offset}
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
    fn both_scripts_share_the_one_append_rule() {
        for script in [&APPEND, &STAMPED] {
            assert_eq!(
                script.text().matches("local function bus_append").count(),
                1
            );
            assert!(script.text().contains("epoch .. '-*'"));
        }
        assert!(STAMPED.text().contains("bus_append(KEYS[4]"));
    }

    #[test]
    fn the_sha_is_redis_script_id() {
        // SHA1 of "return 1", as `SCRIPT LOAD "return 1"` answers.
        let one = Script::new("return 1");
        assert_eq!(one.sha(), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
        assert_eq!(APPEND.sha().len(), 40);
        assert_ne!(APPEND.sha(), STAMPED.sha());
    }
}
