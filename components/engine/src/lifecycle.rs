//! A run's transitions from outside its steps: cancelled, paused and resumed by request,
//! timed out, swept (what a periodic tick finds to do), and its payloads pruned after
//! retention.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection, Tx, Value as V, transaction};
use sparkops_core::error::ApiError;
use sparkops_core::status::{RunStatus, StepStatus, sql_list};

use crate::advance::finish;
use crate::step;
use crate::store::{event, lock_run};

/// What a cancel request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// The run is now cancelling: the next advance cancels what is left.
    Cancelling,
    /// It was cancelling or cancelled already: the same request again.
    Already,
    /// It had finished otherwise (succeeded, failed, timed out).
    Finished(RunStatus),
    /// No such run.
    NotFound,
}

/// Asks the run to stop, with `data` (the reason) on its `run.cancelling` event.
pub fn cancel<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    data: Value,
) -> Result<Cancel, ApiError> {
    Ok(match lock_run(tx, run_id)? {
        None => Cancel::NotFound,
        Some(s) if RunStatus::CANCELLABLE.contains(&s) => {
            tx.execute(
                "update runs set status = 'cancelling', updated_at = now() where run_id = $1",
                &[V::Uuid(run_id.into())],
            )?;
            event(tx, run_id, "run.cancelling", None, data)?;
            Cancel::Cancelling
        }
        Some(RunStatus::Cancelling | RunStatus::Cancelled) => Cancel::Already,
        Some(other) => Cancel::Finished(other),
    })
}

/// What a pause or resume request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Changed: the run is now paused (or, resumed, running again).
    Done,
    /// It was so already: the same request again.
    Already,
    /// The run is in a status that cannot change so (finished, cancelling, or not paused).
    Not(RunStatus),
    NotFound,
}

/// Pauses the run: no advance starts a step of it until it is resumed; steps running now
/// finish and are recorded. Its timeouts stop counting ([`resume`] moves them on).
pub fn pause<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    data: Value,
) -> Result<Pause, ApiError> {
    Ok(match lock_run(tx, run_id)? {
        None => Pause::NotFound,
        Some(RunStatus::Paused) => Pause::Already,
        Some(s) if RunStatus::PAUSABLE.contains(&s) => {
            tx.execute(
                "update runs set status = 'paused', paused_at = now(), updated_at = now() where run_id = $1",
                &[V::Uuid(run_id.into())],
            )?;
            event(tx, run_id, "run.paused", None, data)?;
            Pause::Done
        }
        Some(other) => Pause::Not(other),
    })
}

/// Resumes a paused run: its deadline and its approvals' deadlines move on by the time it
/// was paused, and it is running again (the caller then advances it, which claims what
/// became ready meanwhile, or says it is waiting).
pub fn resume<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    data: Value,
) -> Result<Pause, ApiError> {
    Ok(match lock_run(tx, run_id)? {
        None => Pause::NotFound,
        Some(RunStatus::Paused) => {
            tx.execute(
                "update run_steps s set deadline_at = s.deadline_at + (now() - r.paused_at), updated_at = now()
                 from runs r where r.run_id = $1 and s.run_id = r.run_id and s.status = 'waiting'",
                &[V::Uuid(run_id.into())],
            )?;
            tx.execute(
                "update runs set status = 'running', deadline_at = deadline_at + (now() - paused_at),
                    paused_at = null, updated_at = now()
                 where run_id = $1",
                &[V::Uuid(run_id.into())],
            )?;
            event(tx, run_id, "run.resumed", None, data)?;
            Pause::Done
        }
        Some(s) if RunStatus::PAUSABLE.contains(&s) => Pause::Already,
        Some(other) => Pause::Not(other),
    })
}

/// Ends the run as `timed_out` when it is still unfinished and its deadline passed before
/// `at`. `true` when it did.
pub fn time_out<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    at: DateTime<Utc>,
) -> Result<bool, ApiError> {
    if !matches!(lock_run(tx, run_id)?, Some(s) if RunStatus::TIMED.contains(&s)) {
        return Ok(false);
    }
    let overdue = tx.query(
        &format!("select 1 from runs where run_id = $1 and deadline_at < $2{AS_TIMESTAMPTZ}"),
        &[V::Uuid(run_id.into()), V::Timestamp(at)],
    )?;
    if overdue.is_empty() {
        return Ok(false);
    }
    finish(
        tx,
        run_id,
        RunStatus::TimedOut,
        None,
        json!({"kind": "timeout", "message": "the run passed its timeout"}),
    )?;
    Ok(true)
}

/// One periodic sweep at `at`, at most `batch` rows per kind of work: expired leases taken
/// back, due retries woken, approvals past their deadline failed, runs past theirs timed
/// out. Returns the runs to advance: those it changed, and every run with something to
/// decide (nothing in flight, or cancelling), so a lost nudge costs one tick. Each change
/// is its own transaction under the run's lock and safe to repeat: replicas all sweep.
pub fn sweep<C: Connection + ?Sized>(
    db: &C,
    at: DateTime<Utc>,
    batch: i64,
) -> Result<BTreeSet<String>, ApiError> {
    let mut touched = BTreeSet::new();
    let due = |sql: &str| -> Result<Vec<(String, String)>, ApiError> {
        db.query(
            &sql.replace("{TS}", AS_TIMESTAMPTZ),
            &[V::Timestamp(at), V::Int64(batch)],
        )?
        .iter()
        .map(|r| Ok((r.text(0)?, r.text(1)?)))
        .collect()
    };
    for (run, key) in due("select run_id::text, step_key from run_steps
         where status = 'running' and lease_expires_at < $1{TS} limit $2")?
    {
        transaction(db, |tx| step::take_back(tx, &run, &key, at))?;
        touched.insert(run);
    }
    for (run, key) in due("select run_id::text, step_key from run_steps
         where status = 'retrying' and next_attempt_at <= $1{TS} limit $2")?
    {
        transaction(db, |tx| step::wake_retry(tx, &run, &key))?;
        touched.insert(run);
    }
    // A paused run's approvals wait: its clock stands still.
    for (run, key) in due("select s.run_id::text, s.step_key from run_steps s
         join runs r on r.run_id = s.run_id
         where s.status = 'waiting' and s.deadline_at < $1{TS} and r.status <> 'paused' limit $2")?
    {
        transaction(db, |tx| step::expire_approval(tx, &run, &key))?;
        touched.insert(run);
    }
    // Steps a budget holds with `wait` go on once its window has turned, or once the
    // budget was raised, disabled or removed (the call is checked again when they run).
    // A paused run's holds wait for its resume.
    let held = db.query(
        &format!(
            "select s.run_id::text, s.step_key,
                    coalesce((s.hold ->> 'resumes_at')::timestamptz <= $1{AS_TIMESTAMPTZ}, false),
                    p.policy_id is null or not p.enabled or p.deleted_at is not null
                        or (p.rules -> 'budget' ->> 'limit_usd')::numeric is distinct from (s.hold ->> 'limit_usd')::numeric
                        or p.rules -> 'budget' ->> 'on_exhausted' is distinct from 'wait'
             from run_steps s
             join runs r on r.run_id = s.run_id
             left join policies p on p.policy_id = (s.hold ->> 'policy_id')::uuid
             where s.status = 'waiting' and s.hold ->> 'mode' = 'wait' and r.status <> 'paused'
             limit $2"
        ),
        &[V::Timestamp(at), V::Int64(batch)],
    )?;
    for row in held {
        let (run, key, turned, changed) = (row.text(0)?, row.text(1)?, row.bool(2)?, row.bool(3)?);
        if !(turned || changed) {
            continue;
        }
        let why = if turned {
            json!({"why": "the budget's window turned", "at": sparkops_core::time::rfc3339(at)})
        } else {
            json!({"why": "the budget was changed", "at": sparkops_core::time::rfc3339(at)})
        };
        transaction(db, |tx| step::resume_held(tx, &run, &key, why.clone()))?;
        touched.insert(run);
    }
    let overdue = db.query(
        &format!(
            "select run_id::text from runs
             where status in {} and deadline_at < $1{AS_TIMESTAMPTZ} limit $2",
            sql_list(RunStatus::TIMED)
        ),
        &[V::Timestamp(at), V::Int64(batch)],
    )?;
    for row in overdue {
        let run = row.text(0)?;
        transaction(db, |tx| time_out(tx, &run, at))?;
    }
    // Two reads in one statement, not one read with an `or`: Postgres reads an `or` of
    // the two through a bitmap scan of `runs_unsettled_idx`, which visits every run that
    // finished since the index was last vacuumed (each run leaves its `queued` and
    // `running` entries behind), on every tick. Apart, each is a plain index scan, which
    // marks those entries dead as it passes them, so later ticks skip them. (30,000
    // finished runs, unvacuumed: 6.3 ms and 1,776 buffers a tick before; after, 1.3-1.7 ms
    // and 297 buffers from the second tick on.)
    let undecided = db.query(
        &format!(
            "(select run_id::text from runs where status = 'cancelling' limit $1)
             union all
             (select r.run_id::text from runs r
              where r.status in ('queued', 'running') and not exists (
                  select 1 from run_steps s where s.run_id = r.run_id and s.status in {})
              limit $1)
             limit $1",
            sql_list(StepStatus::IN_FLIGHT)
        ),
        &[V::Int64(batch)],
    )?;
    for row in undecided {
        touched.insert(row.text(0)?);
    }
    Ok(touched)
}

/// Removes the inputs and outputs of the steps of runs finished before `cutoff`, at most
/// `batch` runs, marking them pruned at `now`. Returns how many runs it pruned.
pub fn prune<C: Connection + ?Sized>(
    db: &C,
    cutoff: DateTime<Utc>,
    now: DateTime<Utc>,
    batch: i64,
) -> Result<u64, ApiError> {
    Ok(db.execute(
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
        &[V::Timestamp(cutoff), V::Int64(batch), V::Timestamp(now)],
    )?)
}
