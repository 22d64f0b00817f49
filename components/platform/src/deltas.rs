//! The live text of streamed model calls, for the run's event stream (`step.delta`): kept
//! in Redis, one hash per run (`deltas:<run>`, a field per step holding the text of its
//! current call so far), written at most every [`FLUSH`] while a call streams and expiring
//! on its own. Only a view: the durable record is the call's final message and usage, so a
//! lost write costs a subscriber some liveness, never data.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spin_sdk::redis::{Connection, RedisParameter, RedisResult};

/// How often a streaming call writes its text.
pub const FLUSH: Duration = Duration::from_millis(100);

/// How long a run's live text outlives its last write.
const TTL_S: i64 = 600;

fn key(run_id: &str) -> String {
    format!("deltas:{run_id}")
}

fn open() -> Option<Connection> {
    let url = crate::variable("redis_url").ok()?;
    Connection::open(&url).ok()
}

/// The text of one streaming model call, published as it grows.
pub struct Publisher {
    run_id: String,
    step_key: String,
    /// This call's id: a subscriber starts over when it changes.
    call: String,
    iteration: i64,
    text: String,
    flushed: usize,
    last_flush: Option<Instant>,
    conn: Option<Connection>,
}

impl Publisher {
    pub fn new(run_id: &str, step_key: &str, iteration: i64) -> Self {
        Publisher {
            run_id: run_id.to_string(),
            step_key: step_key.to_string(),
            call: crate::new_id(),
            iteration,
            text: String::new(),
            flushed: 0,
            last_flush: None,
            conn: None,
        }
    }

    /// Adds `delta`, writing the text when the last write is [`FLUSH`] old.
    pub fn push(&mut self, delta: &str) {
        self.text.push_str(delta);
        if self.last_flush.is_none_or(|t| t.elapsed() >= FLUSH) {
            self.flush();
        }
    }

    /// Writes the text if it grew since the last write.
    pub fn flush(&mut self) {
        if self.text.len() == self.flushed {
            return;
        }
        self.last_flush = Some(Instant::now());
        if self.conn.is_none() {
            self.conn = open();
        }
        let Some(conn) = &self.conn else {
            return;
        };
        let value = json!({"call": self.call, "iteration": self.iteration, "text": self.text});
        let key = key(&self.run_id);
        let written = conn
            .execute(
                "HSET",
                &[
                    RedisParameter::Binary(key.clone().into_bytes()),
                    RedisParameter::Binary(self.step_key.clone().into_bytes()),
                    RedisParameter::Binary(value.to_string().into_bytes()),
                ],
            )
            .and_then(|_| {
                conn.execute(
                    "EXPIRE",
                    &[
                        RedisParameter::Binary(key.into_bytes()),
                        RedisParameter::Int64(TTL_S),
                    ],
                )
            });
        if written.is_ok() {
            self.flushed = self.text.len();
        } else {
            // A broken connection is opened again on the next write.
            self.conn = None;
        }
    }
}

/// The live text of each step of `run_id` with a streaming call: `(step, {call,
/// iteration, text})`. Empty when there is none or Redis cannot be reached.
pub fn read(conn: &mut Option<Connection>, run_id: &str) -> Vec<(String, Value)> {
    if conn.is_none() {
        *conn = open();
    }
    let Some(c) = conn.as_ref() else {
        return Vec::new();
    };
    let Ok(items) = c.execute(
        "HGETALL",
        &[RedisParameter::Binary(key(run_id).into_bytes())],
    ) else {
        *conn = None;
        return Vec::new();
    };
    let text = |r: &RedisResult| match r {
        RedisResult::Binary(b) => String::from_utf8(b.clone()).ok(),
        RedisResult::Status(s) => Some(s.clone()),
        _ => None,
    };
    items
        .chunks(2)
        .filter_map(|pair| {
            let [field, value] = pair else { return None };
            let value = serde_json::from_str(&text(value)?).ok()?;
            Some((text(field)?, value))
        })
        .collect()
}
