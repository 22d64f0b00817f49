//! The sweeper (DESIGN.md section 5), a cron component. Every tick it
//! - takes back steps whose lease expired (their host died mid-call): a new attempt when
//!   the step's retry policy has one left, else the step fails with a `timeout`;
//! - wakes retries whose `next_attempt_at` has come;
//! - fails approvals past their deadline and times out runs past theirs;
//! - advances every run with something to decide itself, as the orchestrator would, so
//!   losing every Redis message slows a run and never loses it;
//! - releases budget holds of model calls that never settled (their host died);
//! - removes the step payloads of runs finished longer ago than the retention allows.
//!
//! "Now" is the tick's time, so tests fire it at the times they choose. Everything it does
//! is safe to do twice: replicas all sweep, and each change is a conditional update.
// wit-bindgen's export glue is `unsafe` by nature.
#![allow(unsafe_code)]

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde_json::json;
use sparkops_core::db::{self as core_db, AS_TIMESTAMPTZ, Connection as _, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::run;
use sparkops_core::workflow::Definition;
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
    let mut touched: BTreeSet<String> = BTreeSet::new();
    let at = V::Timestamp(now);
    take_back_expired(&db, &at, &mut touched)?;
    // Due retries go back to `ready` (the orchestrator claims them as a new attempt);
    // approvals past their deadline fail.
    for (due, change, kind) in [
        (
            "select run_id::text, step_key from run_steps
             where status = 'retrying' and next_attempt_at <= $1{TS} limit $2",
            "update run_steps set status = 'ready', next_attempt_at = null, updated_at = now()
             where run_id = $1 and step_key = $2 and status = 'retrying'",
            "step.retry_due",
        ),
        (
            "select run_id::text, step_key from run_steps
             where status = 'waiting' and deadline_at < $1{TS} limit $2",
            "update run_steps set status = 'failed', finished_at = now(), updated_at = now(),
                error = '{\"kind\": \"timeout\", \"message\": \"no decision before the approval deadline\"}'::jsonb
             where run_id = $1 and step_key = $2 and status = 'waiting'",
            "step.timed_out",
        ),
    ] {
        let due = due.replace("{TS}", AS_TIMESTAMPTZ);
        for row in db.query(&due, &[at.clone(), V::Int64(BATCH)])? {
            let (run, step) = (row.text(0)?, row.text(1)?);
            under_run_lock(&db, &run, |tx| {
                if tx.execute(change, &[V::Uuid(run.clone()), V::Text(step.clone())])? == 1 {
                    engine::event(tx, &run, kind, Some(&step), json!({}))?;
                }
                Ok(())
            })?;
            touched.insert(run);
        }
    }
    time_out_runs(&db, &at)?;
    // Every run with something to decide (nothing in flight, or cancelling) is advanced
    // here, so a lost nudge costs one tick.
    let undecided = db.query(
        "select r.run_id::text from runs r
         where r.status = 'cancelling'
            or (r.status in ('queued', 'running') and not exists (
                select 1 from run_steps s where s.run_id = r.run_id and s.status in ('running', 'retrying', 'waiting')))
         limit $1",
        &[V::Int64(BATCH)],
    )?;
    for row in undecided {
        touched.insert(row.text(0)?);
    }
    for run in &touched {
        if let Err(e) = orchestrate::advance_run(&db, run) {
            sparkops_platform::log_line(
                &json!({"level": "warn", "msg": "advancing a run", "run_id": run, "error": format!("{e:?} {:?}", e.cause())}),
            );
        }
    }
    sparkops_platform::policies::release_expired(&db, now, BATCH)?;
    prune(&db, now)
}

/// Runs `f` in a transaction holding the run's row lock: the lock every change to a run
/// takes first (as the orchestrator does), so the sweeper never deadlocks with it.
fn under_run_lock(
    db: &Db,
    run_id: &str,
    f: impl FnOnce(&Tx<'_, Db>) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    core_db::transaction(db, |tx| {
        engine::lock_run(tx, run_id)?;
        f(tx)
    })
}

/// Steps whose lease ran out: their attempt is over. Another attempt when the retry policy
/// has one left (the lease's length stood in for the backoff), else the step fails.
fn take_back_expired(db: &Db, at: &V, touched: &mut BTreeSet<String>) -> Result<(), ApiError> {
    let expired = db.query(
        &format!(
            "select run_id::text, step_key from run_steps
             where status = 'running' and lease_expires_at < $1{AS_TIMESTAMPTZ} limit $2"
        ),
        &[at.clone(), V::Int64(BATCH)],
    )?;
    let mut definitions: HashMap<String, Definition> = HashMap::new();
    for row in expired {
        let (run_id, key) = (row.text(0)?, row.text(1)?);
        under_run_lock(db, &run_id, |tx| {
            // Still expired under the lock: the executor may have recorded it meanwhile.
            let rows = tx.query(
                &format!(
                    "select attempt from run_steps where run_id = $1 and step_key = $2
                     and status = 'running' and lease_expires_at < $3{AS_TIMESTAMPTZ}"
                ),
                &[V::Uuid(run_id.clone()), V::Text(key.clone()), at.clone()],
            )?;
            let Some(attempt) = rows.first().map(|r| r.int(0)).transpose()? else {
                return Ok(());
            };
            if !definitions.contains_key(&run_id) {
                definitions.insert(run_id.clone(), engine::definition(tx, &run_id)?);
            }
            let retry = definitions[&run_id]
                .steps
                .iter()
                .find(|s| s.key == key)
                .map(|s| s.retry.clone())
                .unwrap_or_default();
            let again = run::retry_delay_ms(&retry, attempt as u32, "timeout", 0.0).is_some();
            let ids = [V::Uuid(run_id.clone()), V::Text(key.clone())];
            if again {
                tx.execute(
                    "update run_steps set status = 'ready', lease_id = null, lease_expires_at = null, updated_at = now()
                     where run_id = $1 and step_key = $2",
                    &ids,
                )?;
                return engine::event(
                    tx,
                    &run_id,
                    "step.lease_expired",
                    Some(&key),
                    json!({"attempt": attempt}),
                );
            }
            let error = json!({"kind": "timeout", "message": "the step's host stopped answering before its lease ran out"});
            let mut params = ids.to_vec();
            params.push(V::Json(error.clone()));
            tx.execute(
                "update run_steps set status = 'failed', error = $3, lease_id = null, lease_expires_at = null,
                    finished_at = now(), updated_at = now(),
                    duration_ms = (extract(epoch from now() - started_at) * 1000)::bigint
                 where run_id = $1 and step_key = $2",
                &params,
            )?;
            engine::event(
                tx,
                &run_id,
                "step.failed",
                Some(&key),
                json!({"attempt": attempt, "error": error}),
            )
        })?;
        touched.insert(run_id);
    }
    Ok(())
}

/// Runs past their deadline end as timed out; the orchestrator never claims for them again.
fn time_out_runs(db: &Db, at: &V) -> Result<(), ApiError> {
    let overdue = db.query(
        &format!(
            "select run_id::text from runs
             where status in ('queued', 'running', 'waiting') and deadline_at < $1{AS_TIMESTAMPTZ} limit $2"
        ),
        &[at.clone(), V::Int64(BATCH)],
    )?;
    for row in overdue {
        let run = row.text(0)?;
        core_db::transaction(db, |tx| {
            let still = tx.query(
                "select 1 from runs where run_id = $1 and status in ('queued', 'running', 'waiting') for no key update",
                &[V::Uuid(run.clone())],
            )?;
            if !still.is_empty() {
                orchestrate::finish(
                    tx,
                    &run,
                    "timed_out",
                    None,
                    json!({"kind": "timeout", "message": "the run passed its timeout"}),
                )?;
            }
            Ok::<_, ApiError>(())
        })?;
    }
    Ok(())
}

/// Removes the inputs and outputs of the steps of runs finished before the retention
/// (`step_payload_retention_days`, "0" = keep forever), a batch per tick.
fn prune(db: &Db, now: DateTime<Utc>) -> Result<(), ApiError> {
    let days = sparkops_platform::pipeline::var_u64("step_payload_retention_days", 30);
    if days == 0 {
        return Ok(());
    }
    let cutoff = now - chrono::Duration::days(days.min(36_500) as i64);
    db.execute(
        &format!(
            "with victims as (
                select run_id from runs
                where finished_at is not null and payloads_pruned_at is null and finished_at < $1{AS_TIMESTAMPTZ}
                order by finished_at limit $2 for update skip locked
             ), steps as (
                update run_steps s set input = null, output = null, updated_at = now()
                from victims v where s.run_id = v.run_id
             )
             update runs r set payloads_pruned_at = $3{AS_TIMESTAMPTZ} from victims v where r.run_id = v.run_id"
        ),
        &[V::Timestamp(cutoff), V::Int64(BATCH), V::Timestamp(now)],
    )?;
    Ok(())
}
