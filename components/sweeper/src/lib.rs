//! The sweeper (DESIGN.md section 5), a cron component: the engine's periodic work
//! ([`sparkops_engine::lifecycle::sweep`]) on each tick. Every tick it
//! - takes back steps whose lease expired (their host died mid-call): a new attempt when
//!   the step's retry policy has one left, else the step fails with a `timeout`;
//! - wakes retries whose `next_attempt_at` has come;
//! - fails approvals past their deadline and times out runs past theirs;
//! - advances every run with something to decide itself, as the orchestrator would, so
//!   losing every Redis message slows a run and never loses it;
//! - releases budget holds of model calls that never settled (their host died);
//! - removes the step payloads of runs finished longer ago than the retention allows;
//! - removes the replies kept for `Idempotency-Key`s past their 24 hours.
//!
//! "Now" is the tick's time, so tests fire it at the times they choose. Everything it does
//! is safe to do twice: replicas all sweep, and each change is a conditional update.
// wit-bindgen's export glue is `unsafe` by nature.
#![allow(unsafe_code)]

use chrono::{DateTime, Utc};
use serde_json::json;
use sparkops_core::error::ApiError;
use sparkops_platform::db::Db;
use sparkops_platform::{engine, orchestrate};

wit_bindgen::generate!({
    path: "../wit",
    world: "fermyon:spin-cron/spin-cron",
});

struct Sweeper;

impl Guest for Sweeper {
    fn handle_cron_event(metadata: Metadata) -> Result<(), Error> {
        sparkops_platform::on_tick(metadata.timestamp, sweep).map_err(Error::Other)
    }
}

export!(Sweeper);

/// The most rows one tick takes on per kind of work; the next tick takes the rest.
const BATCH: i64 = 500;

fn sweep(now: DateTime<Utc>) -> Result<(), ApiError> {
    let db = Db::open_default()?;
    for run in &engine::lifecycle::sweep(&db, now, BATCH)? {
        if let Err(e) = orchestrate::advance_run(&db, run) {
            sparkops_platform::log_line(
                &json!({"level": "warn", "msg": "advancing a run", "run_id": run, "error": format!("{e:?}")}),
            );
        }
    }
    sparkops_platform::policies::release_expired(&db, now, BATCH)?;
    // The step payloads of runs finished longer ago than the retention allows
    // (`step_payload_retention_days`, "0" = keep forever), a batch per tick.
    let days = sparkops_platform::settings().step_payload_retention_days;
    if days > 0 {
        let cutoff = now - chrono::Duration::days(days.min(36_500) as i64);
        engine::lifecycle::prune(&db, cutoff, now, BATCH)?;
    }
    sparkops_platform::pipeline::prune_idempotency_keys(&db, now, BATCH)?;
    Ok(())
}
