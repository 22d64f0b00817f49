//! The run engine's storage side, shared by the runs API, the orchestrator and the
//! executor: the event log, a run's pinned definition, and its steps' statuses and outputs.
//! The decisions themselves are `sparkops_core::run`'s.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use serde_json::json;
use sparkops_core::db::{AS_TIMESTAMPTZ, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::run::StepStatus;
use sparkops_core::workflow::{self, Definition};

use crate::db::Db;

/// Takes the run's row lock: the first lock of every change to a run and its steps (the
/// orchestrator's, the executor's, the sweeper's, the API's), so they queue and never
/// deadlock. `false` when there is no such run. (`no key update`: the lock of a row whose
/// key stays; it leaves alone the key-share locks foreign-key checks of the run's steps and
/// events take.)
pub fn lock_run(tx: &Tx<'_, Db>, run_id: &str) -> Result<bool, ApiError> {
    let rows = tx.query(
        "select 1 from runs where run_id = $1 for no key update",
        &[V::Uuid(run_id.into())],
    )?;
    Ok(!rows.is_empty())
}

/// Appends an event to the run's log, numbered under the run's row lock (so a reader
/// resuming after a number never misses one that commits later).
pub fn event(
    tx: &Tx<'_, Db>,
    run_id: &str,
    kind: &str,
    step: Option<&str>,
    data: Value,
) -> Result<(), ApiError> {
    tx.execute(
        "update runs set event_seq = event_seq + 1 where run_id = $1",
        &[V::Uuid(run_id.into())],
    )?;
    tx.execute(
        "insert into run_events (run_id, seq, kind, step_key, data)
         select run_id, event_seq, $2, $3, $4 from runs where run_id = $1",
        &[
            V::Uuid(run_id.into()),
            V::Text(kind.into()),
            step.map(|s| V::Text(s.into())).unwrap_or(V::Null),
            V::Json(data),
        ],
    )?;
    Ok(())
}

/// The definition a run pinned.
pub fn definition(tx: &Tx<'_, Db>, run_id: &str) -> Result<Definition, ApiError> {
    let rows = tx.query(
        "select v.definition from runs r
         join workflow_versions v on v.workflow_id = r.workflow_id and v.version = r.workflow_version
         where r.run_id = $1",
        &[V::Uuid(run_id.into())],
    )?;
    let raw = rows.first().ok_or(ApiError::Internal)?.json(0)?;
    workflow::parse_saved(&raw).map_err(|e| {
        ApiError::Server(format!(
            "run {run_id}: its definition does not parse: {e:?}"
        ))
    })
}

/// A run's steps: every status, and the outputs of those that succeeded.
pub type StepStates = (HashMap<String, StepStatus>, HashMap<String, Value>);

/// Every step's status, and the outputs of those that succeeded.
pub fn steps(tx: &Tx<'_, Db>, run_id: &str) -> Result<StepStates, ApiError> {
    let rows = tx.query(
        "select step_key, status, output from run_steps where run_id = $1",
        &[V::Uuid(run_id.into())],
    )?;
    let mut statuses = HashMap::new();
    let mut outputs = HashMap::new();
    for r in &rows {
        let key = r.text(0)?;
        let status = StepStatus::parse(&r.text(1)?).ok_or(ApiError::Internal)?;
        if status == StepStatus::Succeeded {
            outputs.insert(key.clone(), r.json(2)?);
        }
        statuses.insert(key, status);
    }
    Ok((statuses, outputs))
}

/// A run to start: the workflow version it pins, its input, and where it came from.
pub struct NewRun<'a> {
    pub run_id: &'a str,
    pub project_id: &'a str,
    pub workflow_id: &'a str,
    pub version: i32,
    pub definition: &'a Definition,
    pub input: &'a Value,
    pub created_by: Option<&'a str>,
    pub now: DateTime<Utc>,
    /// The workflow's run timeout.
    pub timeout_s: Option<i64>,
    pub retry_of: Option<&'a str>,
    /// `(schedule_id, fire time)` of a scheduled run.
    pub schedule: Option<(&'a str, DateTime<Utc>)>,
    /// Steps that start succeeded with these `(input, output)`: a retry from `failed`
    /// reuses what the earlier run's succeeded steps produced (their cost is not counted
    /// again).
    pub reused: HashMap<String, (Value, Value)>,
}

/// Inserts a queued run with its steps and its first event, `run.queued` with `data`.
pub fn insert_run(tx: &Tx<'_, Db>, run: &NewRun<'_>, mut data: Value) -> Result<(), ApiError> {
    let id = || V::Uuid(run.run_id.into());
    let deadline = run
        .timeout_s
        .map(|s| run.now + chrono::Duration::seconds(s));
    tx.execute(
        &format!(
            "insert into runs (run_id, project_id, workflow_id, workflow_version, input, created_by,
                deadline_at, retry_of, schedule_id, scheduled_for, created_at, updated_at)
             values ($1, $2, $3, $4, $5, $6, $7{AS_TIMESTAMPTZ}, $8, $9, $10{AS_TIMESTAMPTZ},
                $11{AS_TIMESTAMPTZ}, $11{AS_TIMESTAMPTZ})"
        ),
        &[
            id(),
            V::Uuid(run.project_id.into()),
            V::Uuid(run.workflow_id.into()),
            V::Int32(run.version),
            V::Json(run.input.clone()),
            run.created_by.map(|u| V::Uuid(u.into())).unwrap_or(V::Null),
            deadline.map(V::Timestamp).unwrap_or(V::Null),
            run.retry_of.map(|r| V::Uuid(r.into())).unwrap_or(V::Null),
            run.schedule
                .map(|(s, _)| V::Uuid(s.into()))
                .unwrap_or(V::Null),
            run.schedule
                .map(|(_, t)| V::Timestamp(t))
                .unwrap_or(V::Null),
            V::Timestamp(run.now),
        ],
    )?;
    let json_or_null = |v: &Value| {
        if v.is_null() {
            V::Null
        } else {
            V::Json(v.clone())
        }
    };
    let mut reused = Vec::new();
    for step in &run.definition.steps {
        let kind = V::Text(step.kind.as_str().into());
        // What the metrics group steps by.
        let agent = || step.agent_id.clone().map_or(V::Null, V::Text);
        let tool = || step.tool_id.clone().map_or(V::Null, V::Text);
        match run.reused.get(&step.key) {
            None => tx.execute(
                "insert into run_steps (run_id, step_key, kind, agent_id, tool_id)
                 values ($1, $2, $3, $4::text::uuid, $5::text::uuid)",
                &[id(), V::Text(step.key.clone()), kind, agent(), tool()],
            )?,
            Some((input, output)) => {
                reused.push(step.key.clone());
                tx.execute(
                    "insert into run_steps (run_id, step_key, kind, agent_id, tool_id, status, input, output, finished_at)
                     values ($1, $2, $3, $4::text::uuid, $5::text::uuid, 'succeeded', $6, $7, now())",
                    &[
                        id(),
                        V::Text(step.key.clone()),
                        kind,
                        agent(),
                        tool(),
                        json_or_null(input),
                        json_or_null(output),
                    ],
                )?
            }
        };
    }
    if !reused.is_empty() {
        data["reused"] = json!(reused);
    }
    event(tx, run.run_id, "run.queued", None, data)
}

/// How many steps of the run have started (at least one attempt), for `max_steps_per_run`.
pub fn started_steps(db: &Db, run_id: &str) -> Result<i64, ApiError> {
    use sparkops_core::db::Connection as _;
    let rows = db.query(
        "select count(*) from run_steps where run_id = $1 and attempt > 0",
        &[V::Uuid(run_id.into())],
    )?;
    Ok(rows.first().map(|r| r.int(0)).transpose()?.unwrap_or(0))
}
