//! Atomic fixed-window counters in Redis: one `EVAL` increments the window's counter, starts
//! its expiry on the first hit and returns the count with the time left, so concurrent
//! requests on any number of replicas count exactly once each.

use spin_sdk::redis::{Connection, RedisParameter, RedisResult};

const SCRIPT: &str = "local c = redis.call('INCR', KEYS[1]) \
    if c == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end \
    return {c, redis.call('TTL', KEYS[1])}";

/// Counts one hit on `key` in a window of `window_secs`: `(count, seconds left)`.
pub fn count(key: &str, window_secs: u64) -> Result<(u64, i64), String> {
    let url = crate::variable("redis_url")?;
    let conn = Connection::open(&url).map_err(|e| e.to_string())?;
    let result = conn
        .execute(
            "EVAL",
            &[
                RedisParameter::Binary(SCRIPT.as_bytes().to_vec()),
                RedisParameter::Int64(1),
                RedisParameter::Binary(format!("sparkops:rl:{key}").into_bytes()),
                RedisParameter::Int64(window_secs as i64),
            ],
        )
        .map_err(|e| e.to_string())?;
    match result.as_slice() {
        [RedisResult::Int64(count), RedisResult::Int64(ttl)] => Ok((*count as u64, *ttl)),
        other => Err(format!("unexpected EVAL result {other:?}")),
    }
}

/// The current count and time left under `key`, without counting.
pub fn peek(key: &str) -> Result<(u64, i64), String> {
    let url = crate::variable("redis_url")?;
    let conn = Connection::open(&url).map_err(|e| e.to_string())?;
    let key = format!("sparkops:rl:{key}").into_bytes();
    let count = conn
        .execute("GET", &[RedisParameter::Binary(key.clone())])
        .map_err(|e| e.to_string())?;
    let ttl = conn
        .execute("TTL", &[RedisParameter::Binary(key)])
        .map_err(|e| e.to_string())?;
    let count = match count.as_slice() {
        [RedisResult::Binary(b)] => String::from_utf8_lossy(b).parse().unwrap_or(0),
        _ => 0,
    };
    let ttl = match ttl.as_slice() {
        [RedisResult::Int64(t)] => *t,
        _ => -1,
    };
    Ok((count, ttl))
}

/// Forgets `key`'s count (after a successful login, say).
pub fn clear(key: &str) -> Result<(), String> {
    let url = crate::variable("redis_url")?;
    let conn = Connection::open(&url).map_err(|e| e.to_string())?;
    conn.del(&[format!("sparkops:rl:{key}")])
        .map(drop)
        .map_err(|e| e.to_string())
}
