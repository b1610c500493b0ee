//! Accepted ranges (inclusive) for the settings that have one. Upper bounds exist to turn typos
//! into errors and to keep allocations and deadline arithmetic (`Instant + Duration`, which
//! panics on overflow) far from their limits.
//!
//! Only the bounds live here; the checks that apply them, and the cross-field rules, are in `validate`.

use std::ops::RangeInclusive;

/// Reactor threads (0 = one per core).
pub const REACTORS: RangeInclusive<usize> = 0..=1024;
/// Client connections.
pub const MAX_CONNECTIONS: RangeInclusive<usize> = 1..=usize::MAX;
/// Bytes in the scratch read buffer: at least one page, at most 64 MiB.
pub const READ_BUFFER_BYTES: RangeInclusive<usize> = 4096..=64 << 20;
/// Milliseconds per timing-wheel tick.
pub const TIMER_TICK_MS: RangeInclusive<u64> = 10..=1000;
/// Milliseconds for any timeout or interval: at most one day. The lower bound is one tick,
/// checked against `websocket.timer_tick_ms`.
pub const TIMEOUT_MS: RangeInclusive<u64> = 0..=86_400_000;
/// Bytes in the largest inbound message: at most 64 MiB.
pub const MAX_INBOUND_MESSAGE_BYTES: RangeInclusive<usize> = 1..=64 << 20;
/// `websocket.compression_level`: zlib's levels.
pub const COMPRESSION_LEVEL: RangeInclusive<u32> = 0..=9;
/// `websocket.compression_min_bytes`.
pub const COMPRESSION_MIN_BYTES: RangeInclusive<usize> = 0..=64 << 20;
/// `server.sse_retry_ms`.
pub const SSE_RETRY_MS: RangeInclusive<u64> = 0..=86_400_000;
/// Bytes in a connection's outbox: at least one page, at most 1 GiB.
pub const MAX_OUTBOX_BYTES: RangeInclusive<usize> = 4096..=1 << 30;
/// Bytes in an upgrade request head: browsers send about 0.5 to 2 KiB.
pub const MAX_HANDSHAKE_BYTES: RangeInclusive<usize> = 1024..=1 << 20;
/// Headers in an upgrade request: RFC 6455 §4.1 requires Host, Upgrade, Connection,
/// Sec-WebSocket-Key and Sec-WebSocket-Version, and browsers add Origin.
pub const MAX_HANDSHAKE_HEADERS: RangeInclusive<usize> = 6..=1024;
/// Bytes in the server-wide buffer budget: at least 64 KiB (and at least `websocket.max_outbox_bytes`,
/// checked separately), at most 1 TiB.
pub const MAX_BUFFERED_BYTES_TOTAL: RangeInclusive<usize> = 64 << 10..=1 << 40;
/// Seconds of JWT clock-skew leeway.
pub const JWT_LEEWAY_SECS: RangeInclusive<u64> = 0..=300;
/// Bytes in a JWT secret: RFC 7518 §3.2 requires an HS256 key of at least 256 bits.
pub const JWT_SECRET_BYTES: RangeInclusive<usize> = 32..=usize::MAX;
/// Entries in `auth.jwt_secrets`: a token without `kid` may be checked against each.
pub const JWT_SECRETS: RangeInclusive<usize> = 0..=16;
/// Bytes in a `kid` of `auth.jwt_secrets`.
pub const JWT_KID_BYTES: RangeInclusive<usize> = 1..=256;
/// Seconds between JWKS fetches: at least 10 s (an identity provider is not to be polled hard), at most a day.
pub const JWKS_REFRESH_SECS: RangeInclusive<u64> = 10..=86_400;
/// Seconds between two JWKS fetches at least (and at most `auth.jwks_refresh_secs`, checked separately).
pub const JWKS_MIN_REFRESH_SECS: RangeInclusive<u64> = 1..=3_600;
/// Bytes in `auth.issuer` and `auth.audience`.
pub const JWT_ISSUER_AUDIENCE_BYTES: RangeInclusive<usize> = 0..=1024;
/// Bytes in a user id.
pub const MAX_ID_BYTES: RangeInclusive<usize> = 1..=1024;
/// Channels per token (0 = user-addressed pushes only).
pub const MAX_CHANNELS: RangeInclusive<usize> = 0..=4096;
/// Bytes in a published message body: at most 64 MiB.
pub const MAX_PUBLISH_BYTES: RangeInclusive<usize> = 1..=64 << 20;
/// Bytes in a batch publish body: at most 256 MiB.
pub const MAX_BATCH_BYTES: RangeInclusive<usize> = 1024..=256 << 20;
/// Targets in one batch publish.
pub const MAX_BATCH_TARGETS: RangeInclusive<usize> = 1..=1_000_000;
/// Bytes in an admin request head.
pub const MAX_REQUEST_HEAD_BYTES: RangeInclusive<usize> = 1024..=1 << 20;
/// Headers in an admin request.
pub const MAX_REQUEST_HEADERS: RangeInclusive<usize> = 4..=1024;
/// Admin connections held at once. The listener sweeps every connection's deadline a few times a second, so
/// the cap also bounds that work.
pub const ADMIN_MAX_CONNECTIONS: RangeInclusive<usize> = 1..=65_536;
/// Milliseconds of an admin header or idle timeout: at least 100, at most one day.
pub const ADMIN_TIMEOUT_MS: RangeInclusive<u64> = 100..=86_400_000;
/// Bytes in the cluster's channel prefix.
pub const CLUSTER_CHANNEL_PREFIX_BYTES: RangeInclusive<usize> = 1..=64;
/// Bytes in a cluster node id.
pub const CLUSTER_NODE_ID_BYTES: RangeInclusive<usize> = 1..=128;
/// Milliseconds of a Redis command timeout: a blocked admin thread answers nothing meanwhile.
pub const CLUSTER_COMMAND_TIMEOUT_MS: RangeInclusive<u64> = 1..=60_000;
/// Milliseconds of reconnection backoff and heartbeat intervals.
pub const CLUSTER_INTERVAL_MS: RangeInclusive<u64> = 1..=3_600_000;
/// Milliseconds a presence query waits: the admin thread answers nothing meanwhile.
pub const CLUSTER_PRESENCE_TIMEOUT_MS: RangeInclusive<u64> = 1..=10_000;
/// Entries the bus keeps: enough for a few reads in flight, at most a billion (Redis memory is the real limit).
pub const CLUSTER_BUS_MAX_LEN: RangeInclusive<u64> = 10..=1_000_000_000;
/// Messages kept per stream.
pub const HISTORY_SIZE: RangeInclusive<usize> = 1..=1_000_000;
/// Seconds a message is kept: at most 30 days.
pub const HISTORY_TTL_SECS: RangeInclusive<u64> = 1..=2_592_000;
/// Bytes of history: at least a page, at most 1 TiB.
pub const HISTORY_MAX_BYTES: RangeInclusive<usize> = 4096..=1 << 40;
/// Milliseconds an event may wait for its request: at most a minute.
pub const EVENTS_BATCH_MS: RangeInclusive<u64> = 1..=60_000;
/// Events per request.
pub const EVENTS_MAX_BATCH: RangeInclusive<usize> = 1..=100_000;
/// Events queued at most (about 64 bytes each, allocated when the queue is made).
pub const EVENTS_QUEUE_SIZE: RangeInclusive<usize> = 1..=16_777_216;
/// Milliseconds one events request may take.
pub const EVENTS_TIMEOUT_MS: RangeInclusive<u64> = 100..=60_000;
/// Retries of a failed events request.
pub const EVENTS_MAX_RETRIES: RangeInclusive<u32> = 0..=100;
