//! The run engine's storage side, shared by the runs API, the orchestrator and the
//! executor: the event log, a run's pinned definition, and its steps' statuses and outputs.
//! The decisions themselves are `sparkops_core::run`'s.

use std::collections::HashMap;

use serde_json::Value;
use sparkops_core::db::{Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::run::StepStatus;
use sparkops_core::workflow::{self, Definition};

use crate::db::Db;

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
