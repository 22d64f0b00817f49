//! Run nudges: `{"run_id": "..."}` on the runs channel tells the orchestrators a run may
//! have work. Only a hint (DESIGN.md section 5): Postgres is the truth, the sweeper
//! re-nudges runs with ready work, and a lost or repeated nudge changes nothing.

use spin_sdk::redis::Connection;

/// Publishes a nudge for `run_id` on the `runs_channel` variable's channel. A failure is
/// logged and goes no further: the sweeper re-nudges runs with work, so a lost nudge only
/// delays the run.
pub fn run(run_id: &str) {
    if let Err(e) = publish(run_id) {
        crate::log_line(
            &serde_json::json!({"level": "warn", "msg": "nudge failed", "run_id": run_id, "error": e}),
        );
    }
}

fn publish(run_id: &str) -> Result<(), String> {
    let url = crate::variable("redis_url")?;
    let channel = crate::variable("runs_channel")?;
    let conn = Connection::open(&url).map_err(|e| e.to_string())?;
    let payload = serde_json::json!({"run_id": run_id}).to_string();
    conn.publish(&channel, payload.as_bytes())
        .map_err(|e| e.to_string())
}
