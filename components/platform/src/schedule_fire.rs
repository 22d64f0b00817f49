//! One fire of a schedule (API.md "Schedules"), shared by the scheduler (cron fires) and
//! `POST /schedules/{id}/trigger` (manual ones): the overlap policy, then the engine's one
//! start path (the input against the workflow's current `input_schema`, the run-start
//! policies, the run pinned to the workflow's current version and marked with its schedule
//! and fire time). Every outcome,
//! a run or the reason there is none, is recorded in `schedule_fires`.
//!
//! The caller holds the schedule's row lock, so a fire time is handled once even when
//! schedulers on several hosts tick together; the unique `(schedule_id, scheduled_for)` of
//! runs backs that up.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::status::{RunStatus, sql_list};
use sparkops_engine::{self as engine, Cancel, NewRun, Origin, StartError};

use crate::db::Db;

/// A schedule, as firing it needs it.
pub struct Schedule {
    pub schedule_id: String,
    pub project_id: String,
    pub workflow_id: String,
    pub input: Value,
    /// `skip`, `allow` or `cancel_previous`.
    pub overlap: String,
}

/// What a fire came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Fired {
    Started {
        run_id: String,
    },
    /// By the overlap policy.
    Skipped(String),
    /// The workflow or the project was deleted: the schedule stops.
    Gone,
    /// By a policy on starting runs.
    Refused(String),
    /// The run could not be made (its input no longer fits the workflow).
    Failed(String),
}

impl Fired {
    fn outcome(&self) -> (&'static str, Option<&str>, Option<&str>) {
        match self {
            Fired::Started { run_id } => ("started", None, Some(run_id)),
            Fired::Skipped(r) => ("skipped", Some(r), None),
            Fired::Gone => (
                "skipped",
                Some("its workflow or project was deleted; the schedule stops"),
                None,
            ),
            Fired::Refused(r) => ("refused", Some(r), None),
            Fired::Failed(r) => ("failed", Some(r), None),
        }
    }
}

/// Fires `schedule` for the time `at`. Returns the outcome and the runs to nudge (the new
/// one, and those `cancel_previous` cancelled).
pub fn fire(
    tx: &Tx<'_, Db>,
    schedule: &Schedule,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
    manual: bool,
) -> Result<(Fired, Vec<String>), ApiError> {
    let mut nudges = Vec::new();
    let fired = start(tx, schedule, at, now, &mut nudges)?;
    record(tx, &schedule.schedule_id, at, &fired, manual)?;
    Ok((fired, nudges))
}

fn start(
    tx: &Tx<'_, Db>,
    s: &Schedule,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
    nudges: &mut Vec<String>,
) -> Result<Fired, ApiError> {
    let Some(workflow) = engine::start::workflow(tx, &s.workflow_id, None)? else {
        return Ok(Fired::Gone);
    };
    let unfinished: Vec<String> = tx
        .query(
            &format!(
                "select run_id::text from runs where schedule_id = $1 and status in {} order by run_id",
                sql_list(RunStatus::UNFINISHED)
            ),
            &[V::Uuid(s.schedule_id.clone())],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<_, _>>()?;
    match (s.overlap.as_str(), unfinished.first()) {
        ("skip", Some(run)) => {
            return Ok(Fired::Skipped(format!(
                "overlap: run {run} of this schedule has not finished"
            )));
        }
        ("cancel_previous", Some(_)) => {
            let reason =
                json!({"reason": "a later fire of its schedule (overlap cancel_previous)"});
            for run in &unfinished {
                if engine::cancel(tx, run, reason.clone())? == Cancel::Cancelling {
                    nudges.push(run.clone());
                }
            }
        }
        _ => {}
    }
    let run_id = crate::new_id();
    let run = NewRun {
        run_id: &run_id,
        workflow: &workflow,
        input: &s.input,
        origin: Origin::Schedule {
            schedule_id: &s.schedule_id,
            at,
        },
        now,
        max_cost_usd: None,
    };
    // Not advanced here: the fire's nudge advances it after the commit.
    match engine::start(tx, &run) {
        Ok(_) => {}
        Err(StartError::Refused(m)) => return Ok(Fired::Refused(m)),
        Err(StartError::BadInput(problems)) => {
            let detail: Vec<String> = problems
                .into_iter()
                .map(|p| format!("{}: {}", p.field, p.message))
                .collect();
            return Ok(Fired::Failed(format!(
                "the schedule's input does not fit the workflow: {}",
                detail.join("; ")
            )));
        }
        Err(StartError::Failed(e)) => return Err(e),
    }
    tx.execute(
        &format!(
            "update schedules set last_fired_at = greatest(last_fired_at, $2{AS_TIMESTAMPTZ}) where schedule_id = $1"
        ),
        &[V::Uuid(s.schedule_id.clone()), V::Timestamp(at)],
    )?;
    nudges.push(run_id.clone());
    Ok(Fired::Started { run_id })
}

fn record(
    tx: &Tx<'_, Db>,
    schedule_id: &str,
    at: DateTime<Utc>,
    fired: &Fired,
    manual: bool,
) -> Result<(), ApiError> {
    let (outcome, reason, run_id) = fired.outcome();
    let told = match fired {
        Fired::Started { .. } => None,
        Fired::Skipped(_) | Fired::Gone => Some("schedule.skipped"),
        Fired::Refused(_) | Fired::Failed(_) => Some("schedule.refused"),
    };
    if let Some(event_type) = told {
        tell(tx, schedule_id, event_type, at, outcome, reason, manual)?;
    }
    tx.execute(
        &format!(
            "insert into schedule_fires (schedule_id, fire_at, outcome, reason, run_id, manual)
             values ($1, $2{AS_TIMESTAMPTZ}, $3, $4, $5, $6) on conflict do nothing"
        ),
        &[
            V::Uuid(schedule_id.into()),
            V::Timestamp(at),
            V::Text(outcome.into()),
            reason.map_or(V::Null, |r| V::Text(r.into())),
            run_id.map_or(V::Null, |r| V::Uuid(r.into())),
            V::Bool(manual),
        ],
    )?;
    Ok(())
}

/// Queues the webhook deliveries of a fire that started no run, in the fire's transaction.
fn tell(
    tx: &Tx<'_, Db>,
    schedule_id: &str,
    event_type: &str,
    at: DateTime<Utc>,
    outcome: &str,
    reason: Option<&str>,
    manual: bool,
) -> Result<(), ApiError> {
    let rows = tx.query(
        "select project_id::text, workflow_id::text, cron, timezone from schedules where schedule_id = $1",
        &[V::Uuid(schedule_id.into())],
    )?;
    let Some(r) = rows.first() else {
        return Ok(());
    };
    let data = json!({
        "project_id": r.text(0)?,
        "schedule_id": schedule_id,
        "workflow_id": r.text(1)?,
        "cron": r.text(2)?,
        "timezone": r.text(3)?,
        "fire_at": sparkops_core::time::rfc3339(at),
        "outcome": outcome,
        "reason": reason,
        "manual": manual,
    });
    engine::outbox::enqueue(tx, &r.text(0)?, event_type, data)?;
    Ok(())
}

/// Records fires missed beyond the catch-up window, `first` to `last`, as one row.
pub fn record_missed(
    tx: &Tx<'_, Db>,
    schedule_id: &str,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    count: i64,
    window_s: i64,
) -> Result<(), ApiError> {
    let reason = if window_s == 0 {
        "missed while the scheduler was not running; the schedule does not catch up (catchup_window_s 0)".to_string()
    } else {
        format!("missed by more than the catch-up window of {window_s} s")
    };
    tell(
        tx,
        schedule_id,
        "schedule.skipped",
        first,
        "skipped",
        Some(&reason),
        false,
    )?;
    tx.execute(
        &format!(
            "insert into schedule_fires (schedule_id, fire_at, outcome, reason, missed_until, missed_count)
             values ($1, $2{AS_TIMESTAMPTZ}, 'skipped', $3, $4{AS_TIMESTAMPTZ}, $5) on conflict do nothing"
        ),
        &[
            V::Uuid(schedule_id.into()),
            V::Timestamp(first),
            V::Text(reason),
            V::Timestamp(last),
            V::Int32(count.min(i32::MAX as i64) as i32),
        ],
    )?;
    Ok(())
}
