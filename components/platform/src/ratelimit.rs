//! Atomic fixed-window counters in Redis: one `EVAL` increments each window's counter,
//! starts its expiry on the first hit and returns the count with the time left, so
//! concurrent requests on any number of replicas count exactly once each, and the counters
//! of one request (its address and its caller) cost one round trip.

use spin_sdk::redis::{Connection, RedisParameter, RedisResult};

const SCRIPT: &str = "local out = {} \
    for i, key in ipairs(KEYS) do \
        local c = redis.call('INCR', key) \
        if c == 1 then redis.call('EXPIRE', key, ARGV[i]) end \
        out[#out + 1] = c \
        out[#out + 1] = redis.call('TTL', key) \
    end \
    return out";

/// Counts one hit on `key` in a window of `window_secs`: `(count, seconds left)`.
pub fn count(key: &str, window_secs: u64) -> Result<(u64, i64), String> {
    Ok(count_all(&[(key, window_secs)])?[0])
}

/// Counts one hit on each `(key, window_secs)`, in one round trip: `(count, seconds left)`
/// for each, in order.
pub fn count_all(keys: &[(&str, u64)]) -> Result<Vec<(u64, i64)>, String> {
    let url = crate::variable("redis_url")?;
    let conn = Connection::open(&url).map_err(|e| e.to_string())?;
    let mut args = vec![
        RedisParameter::Binary(SCRIPT.as_bytes().to_vec()),
        RedisParameter::Int64(keys.len() as i64),
    ];
    args.extend(
        keys.iter()
            .map(|(key, _)| RedisParameter::Binary(format!("sparkops:rl:{key}").into_bytes())),
    );
    args.extend(
        keys.iter()
            .map(|(_, window)| RedisParameter::Int64(*window as i64)),
    );
    let result = conn.execute("EVAL", &args).map_err(|e| e.to_string())?;
    let counted: Vec<(u64, i64)> = result
        .chunks(2)
        .map(|pair| match pair {
            [RedisResult::Int64(count), RedisResult::Int64(ttl)] => Ok((*count as u64, *ttl)),
            other => Err(format!("unexpected EVAL result {other:?}")),
        })
        .collect::<Result<_, _>>()?;
    if counted.len() != keys.len() {
        return Err(format!(
            "EVAL counted {} of {} keys",
            counted.len(),
            keys.len()
        ));
    }
    Ok(counted)
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
