//! The sweeper (DESIGN.md section 5), a cron component: every tick it takes back steps whose
//! lease expired (their host died mid-call) for a new attempt, wakes retries whose
//! `next_attempt_at` has come, fails approvals past their deadline, times out runs past
//! their deadline, and nudges every run
//! with work, so losing every Redis message slows a run and never loses it. "Now" is the
//! tick's time, so tests fire it at the times they choose. Everything it does is safe to do
//! twice: replicas all sweep, and each change is a conditional update.
// wit-bindgen's export glue is `unsafe` by nature.
#![allow(unsafe_code)]

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde_json::json;
use sparkops_core::db::{self as core_db, AS_TIMESTAMPTZ, Connection as _, Value as V};
use sparkops_core::error::ApiError;
use sparkops_platform::db::Db;
use sparkops_platform::engine;

wit_bindgen::generate!({
    path: "../wit",
    world: "fermyon:spin-cron/spin-cron",
});

struct Sweeper;

impl Guest for Sweeper {
    fn handle_cron_event(metadata: Metadata) -> Result<(), Error> {
        let now = DateTime::<Utc>::from_timestamp(metadata.timestamp as i64, 0)
            .ok_or_else(|| Error::Other("the tick's time is out of range".into()))?;
        sweep(now).map_err(|e| Error::Other(format!("{e:?} {:?}", e.cause())))
    }
}

export!(Sweeper);

/// The most rows one tick takes on per kind of work; the next tick takes the rest.
const BATCH: i64 = 500;

fn sweep(now: DateTime<Utc>) -> Result<(), ApiError> {
    let db = Db::open_default()?;
    let mut nudge: BTreeSet<String> = BTreeSet::new();
    let at = V::Timestamp(now);
    // Expired leases and due retries go back to `ready`: the orchestrator claims them as a
    // new attempt.
    for (sql, kind) in [
        (
            "update run_steps set status = 'ready', lease_id = null, lease_expires_at = null, updated_at = now()
             where (run_id, step_key) in (
                select run_id, step_key from run_steps
                where status = 'running' and lease_expires_at < $1{TS} limit $2 for update skip locked)
             returning run_id::text, step_key",
            "step.lease_expired",
        ),
        (
            "update run_steps set status = 'ready', next_attempt_at = null, updated_at = now()
             where (run_id, step_key) in (
                select run_id, step_key from run_steps
                where status = 'retrying' and next_attempt_at <= $1{TS} limit $2 for update skip locked)
             returning run_id::text, step_key",
            "step.retry_due",
        ),
        (
            "update run_steps set status = 'failed', finished_at = now(), updated_at = now(),
                error = '{\"kind\": \"timeout\", \"message\": \"no decision before the approval deadline\"}'::jsonb
             where (run_id, step_key) in (
                select run_id, step_key from run_steps
                where status = 'waiting' and deadline_at < $1{TS} limit $2 for update skip locked)
             returning run_id::text, step_key",
            "step.timed_out",
        ),
    ] {
        let sql = sql.replace("{TS}", AS_TIMESTAMPTZ);
        core_db::transaction(&db, |tx| {
            for row in tx.query(&sql, &[at.clone(), V::Int64(BATCH)])? {
                let (run, step) = (row.text(0)?, row.text(1)?);
                engine::event(tx, &run, kind, Some(&step), json!({}))?;
                nudge.insert(run);
            }
            Ok::<_, ApiError>(())
        })?;
    }
    // Runs past their deadline end as timed out; the orchestrator never claims for them again.
    let overdue = db.query(
        &format!(
            "select run_id::text from runs
             where status in ('queued', 'running', 'waiting') and deadline_at < $1{AS_TIMESTAMPTZ} limit $2"
        ),
        &[at.clone(), V::Int64(BATCH)],
    )?;
    for row in overdue {
        let run = row.text(0)?;
        core_db::transaction(&db, |tx| {
            let timed_out = tx.execute(
                "update runs set status = 'timed_out', error = $2, finished_at = now(), updated_at = now()
                 where run_id = $1 and status in ('queued', 'running', 'waiting')",
                &[V::Uuid(run.clone()), V::Json(json!({"kind": "timeout", "message": "the run passed its timeout"}))],
            )?;
            if timed_out == 1 {
                tx.execute(
                    "update run_steps set status = 'cancelled', lease_id = null, finished_at = now(), updated_at = now()
                     where run_id = $1 and status in ('pending', 'ready', 'running', 'retrying', 'waiting')",
                    &[V::Uuid(run.clone())],
                )?;
                engine::event(tx, &run, "run.timed_out", None, json!({}))?;
            }
            Ok::<_, ApiError>(())
        })?;
    }
    // Every run with something to decide (nothing in flight, or cancelling) gets a nudge,
    // so a lost nudge costs one tick.
    let waiting = db.query(
        "select r.run_id::text from runs r
         where r.status = 'cancelling'
            or (r.status in ('queued', 'running') and not exists (
                select 1 from run_steps s where s.run_id = r.run_id and s.status in ('running', 'retrying', 'waiting')))
         limit $1",
        &[V::Int64(BATCH)],
    )?;
    for row in waiting {
        nudge.insert(row.text(0)?);
    }
    for run in nudge {
        sparkops_platform::nudge::run(&run);
    }
    Ok(())
}
