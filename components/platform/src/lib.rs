//! The thin layer between Spark-Ops components and Spin: Postgres through pg4 behind the
//! shared library's [`sparkops_core::db::Connection`], the HTTP edge, and the request
//! pipeline every API component runs. Business logic stays in `sparkops-core`, and the run
//! lifecycle in `sparkops-engine` (re-exported here as [`engine`] and [`policies`]).

pub use sparkops_engine as engine;
pub use sparkops_engine::policies;

pub mod agent;
pub mod db;
pub mod deltas;
pub mod heartbeat;
pub mod http;
pub mod mcp;
pub mod nudge;
pub mod orchestrate;
pub mod outbound;
pub mod pipeline;
pub mod ratelimit;
pub mod resource;
pub mod schedule_fire;
pub mod tool_call;
pub mod traces;
pub mod webhooks;
pub mod work;

/// A cron component's tick: `work` as at the tick's time (`timestamp`, Unix seconds), its
/// failure as the text the cron handler answers with.
pub fn on_tick(
    timestamp: u64,
    work: impl FnOnce(chrono::DateTime<chrono::Utc>) -> Result<(), sparkops_core::error::ApiError>,
) -> Result<(), String> {
    let now = chrono::DateTime::from_timestamp(timestamp as i64, 0)
        .ok_or("the tick's time is out of range")?;
    work(now).map_err(|e| format!("{e:?}"))
}

/// Writes one JSON log line to stderr in a single write, so lines of instances running at
/// once never splice into each other (a formatted `eprintln!` writes in pieces).
pub fn log_line(line: &serde_json::Value) {
    use std::io::Write;
    let mut text = line.to_string();
    text.push('\n');
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// The app's settings, read from this component's variables on first use (one instance
/// serves one request, so they are read once per request at most); a setting the
/// component does not declare takes its default.
pub fn settings() -> &'static sparkops_core::settings::Settings {
    static SETTINGS: std::sync::OnceLock<sparkops_core::settings::Settings> =
        std::sync::OnceLock::new();
    SETTINGS.get_or_init(|| sparkops_core::settings::Settings::read(|name| variable(name).ok()))
}

/// Reads a component variable, naming it in the error when it is missing.
pub fn variable(name: &str) -> Result<String, String> {
    spin_sdk::variables::get(name).map_err(|e| format!("variable `{name}`: {e}"))
}

/// `n` random bytes from the host (`wasi:random`).
pub fn random_bytes(n: usize) -> Vec<u8> {
    wasi::random::random::get_random_bytes(n as u64)
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    sparkops_core::ids::hex(&random_bytes(n))
}

/// `N` random bytes as an array.
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&random_bytes(N));
    out
}

/// Blocks this instance for `d` (a `wasi:clocks` timer), for work that polls.
pub fn sleep(d: std::time::Duration) {
    wasi::clocks::monotonic_clock::subscribe_duration(d.as_nanos().min(u64::MAX as u128) as u64)
        .block();
}

/// A new UUIDv7 (time-ordered) for a row made outside a request.
pub fn new_id() -> String {
    id_at(chrono::Utc::now())
}

/// A new UUIDv7 of the time `at` (see [`sparkops_core::ids::uuid_v7`]).
pub fn id_at(at: chrono::DateTime<chrono::Utc>) -> String {
    let unix_nanos = at.timestamp_nanos_opt().unwrap_or_default().max(0) as u64;
    sparkops_core::ids::uuid_v7(unix_nanos, random_array())
}
