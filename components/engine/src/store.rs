//! Reading and locking a run: its row lock, its event log, the definition it pinned and
//! its steps, decoded into structs.

use std::collections::HashMap;

use serde_json::Value;
use sparkops_core::db::{Connection, Read, Row, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::status::{RunStatus, StepStatus};
use sparkops_core::webhook;
use sparkops_core::workflow::{self, Definition};

use crate::outbox;

/// Takes the run's row lock and reads its status: the first lock of every change to a run
/// and its steps, so changes queue and never deadlock. `None` when there is no such run.
/// (`no key update`: the lock of a row whose key stays; it leaves alone the key-share
/// locks that foreign-key checks of the run's steps and events take.)
pub fn lock_run<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
) -> Result<Option<RunStatus>, ApiError> {
    let rows = tx.query(
        "select status from runs where run_id = $1 for no key update",
        &[V::Uuid(run_id.into())],
    )?;
    rows.first().map(|r| run_status(r, 0)).transpose()
}

/// Appends an event to the run's log, numbered under the run's row lock (so a reader
/// resuming after a number never misses one that commits later). The caller holds the lock.
pub fn event<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    kind: &str,
    step: Option<&str>,
    data: Value,
) -> Result<(), ApiError> {
    event_setting(tx, run_id, kind, step, data, "")
}

/// [`event`], with the run's row changed by the same statement: `also_set` is more
/// `column = value` assignments (`, status = 'running'`, say) over no parameters.
pub fn event_setting<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    kind: &str,
    step: Option<&str>,
    data: Value,
    also_set: &str,
) -> Result<(), ApiError> {
    let mut params = vec![
        V::Uuid(run_id.into()),
        V::Text(kind.into()),
        step.map_or(V::Null, |s| V::Text(s.into())),
        V::Json(data),
    ];
    // An event webhooks are told of has its deliveries queued by the same statement.
    let told = match webhook::event_type_of(kind) {
        None => String::new(),
        Some(event_type) => {
            params.push(V::Text(event_type.into()));
            let deliveries = outbox::insert_deliveries(
                "$5::text",
                "r.project_id",
                outbox::RUN_EVENT_DATA,
                ", runs r",
            );
            format!(", told as ({deliveries} and r.run_id = $1)")
        }
    };
    tx.execute(
        &format!(
            "with seq as (update runs set event_seq = event_seq + 1{also_set} where run_id = $1 returning event_seq),
             logged as (insert into run_events (run_id, seq, kind, step_key, data)
                 select $1, event_seq, $2, $3, $4 from seq){told}
             select 1"
        ),
        &params,
    )?;
    Ok(())
}

/// One statement that makes `change` to a step (a data-modifying statement with a
/// `returning` list) and, when it changed a row, appends the event [`event`] would, numbered
/// the same way; it answers `select {answer} from changed`. `kind`, `step` and `data` are
/// SQL over the parameters and `changed`'s columns; `$1` is the run's id. The caller holds
/// the run's lock.
pub(crate) fn change_with_event(
    change: &str,
    kind: &str,
    step: &str,
    data: &str,
    answer: &str,
) -> String {
    format!(
        "with changed as ({change}), seq as (
            update runs set event_seq = event_seq + 1
            where run_id = $1 and exists (select 1 from changed)
            returning event_seq
         ), logged as (
            insert into run_events (run_id, seq, kind, step_key, data)
            select $1, seq.event_seq, {kind}, {step}, {data} from seq, changed
         )
         select {answer} from changed"
    )
}

/// Takes the run's lock and appends an event: for what happens beside a step's attempt
/// (a policy refusal, a model call, a budget alert). Nothing when the run is gone.
pub fn note<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    kind: &str,
    step: Option<&str>,
    data: Value,
) -> Result<(), ApiError> {
    if lock_run(tx, run_id)?.is_some() {
        event(tx, run_id, kind, step, data)?;
    }
    Ok(())
}

/// What deciding a run reads: its input, the definition it pinned and its steps.
#[derive(Debug)]
pub struct Snapshot {
    pub input: Value,
    pub definition: Definition,
    pub steps: Vec<StepRow>,
}

/// The run's input, pinned definition and steps, in one round trip.
pub fn snapshot<R: Read + ?Sized>(db: &R, run_id: &str) -> Result<Snapshot, ApiError> {
    let rows = db.read(
        "select r.input, v.definition, coalesce((
                select jsonb_agg(jsonb_build_array(s.step_key, s.status, s.attempt,
                    case when s.status = 'succeeded' then s.output end) order by s.step_key)
                from run_steps s where s.run_id = r.run_id), '[]'::jsonb)
         from runs r
         join workflow_versions v on v.workflow_id = r.workflow_id and v.version = r.workflow_version
         where r.run_id = $1",
        &[V::Uuid(run_id.into())],
    )?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::Internal(format!("run {run_id} has no pinned definition")))?;
    let bad =
        |what: &str| ApiError::Internal(format!("run {run_id}: a step's {what} does not read"));
    let steps = match row.json(2)? {
        Value::Array(items) => items
            .into_iter()
            .map(|item| {
                let key = item[0].as_str().ok_or_else(|| bad("key"))?;
                let status = item[1].as_str().and_then(StepStatus::parse);
                Ok(StepRow {
                    key: key.to_string(),
                    status: status.ok_or_else(|| bad("status"))?,
                    attempt: item[2].as_i64().ok_or_else(|| bad("attempt"))?,
                    output: item[3].clone(),
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?,
        _ => return Err(bad("list")),
    };
    Ok(Snapshot {
        input: row.json(0)?,
        definition: parse_definition(run_id, &row.json(1)?)?,
        steps,
    })
}

/// The definition a run pinned.
pub fn definition<R: Read + ?Sized>(db: &R, run_id: &str) -> Result<Definition, ApiError> {
    let rows = db.read(
        "select v.definition from runs r
         join workflow_versions v on v.workflow_id = r.workflow_id and v.version = r.workflow_version
         where r.run_id = $1",
        &[V::Uuid(run_id.into())],
    )?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::Internal(format!("run {run_id} has no pinned definition")))?;
    parse_definition(run_id, &row.json(0)?)
}

fn parse_definition(run_id: &str, raw: &Value) -> Result<Definition, ApiError> {
    workflow::parse_saved(raw).map_err(|e| {
        ApiError::Internal(format!(
            "run {run_id}: its definition does not parse: {e:?}"
        ))
    })
}

/// One step of a run as the engine reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    pub key: String,
    pub status: StepStatus,
    pub attempt: i64,
    /// What it produced, when it succeeded (`null` otherwise).
    pub output: Value,
}

/// Steps' statuses by key, and the outputs of those that succeeded: what deciding reads.
pub fn states(steps: &[StepRow]) -> (HashMap<String, StepStatus>, HashMap<String, Value>) {
    let statuses = steps.iter().map(|s| (s.key.clone(), s.status)).collect();
    let outputs = steps
        .iter()
        .filter(|s| s.status == StepStatus::Succeeded)
        .map(|s| (s.key.clone(), s.output.clone()))
        .collect();
    (statuses, outputs)
}

/// How many steps of the run have started (at least one attempt), for `max_steps_per_run`.
pub fn started_steps<R: Read + ?Sized>(db: &R, run_id: &str) -> Result<i64, ApiError> {
    let rows = db.read(
        "select count(*) from run_steps where run_id = $1 and attempt > 0",
        &[V::Uuid(run_id.into())],
    )?;
    Ok(rows.first().map(|r| r.int(0)).transpose()?.unwrap_or(0))
}

pub(crate) fn run_status(row: &Row, i: usize) -> Result<RunStatus, ApiError> {
    let s = row.text(i)?;
    RunStatus::parse(&s).ok_or_else(|| ApiError::Internal(format!("unknown run status {s:?}")))
}

pub(crate) fn step_status(row: &Row, i: usize) -> Result<StepStatus, ApiError> {
    let s = row.text(i)?;
    StepStatus::parse(&s).ok_or_else(|| ApiError::Internal(format!("unknown step status {s:?}")))
}

/// A JSON value bound as `jsonb`; SQL `null` for JSON `null`.
pub(crate) fn json_or_null(v: &Value) -> V {
    if v.is_null() {
        V::Null
    } else {
        V::Json(v.clone())
    }
}
