//! Advancing a run (DESIGN.md section 5), shared by the orchestrator (on each nudge) and
//! the sweeper (for runs whose nudges were lost). In one transaction under the run's row
//! lock it finishes a cancelling run, marks pending steps ready or skipped
//! (`sparkops_core::run::decide`), finishes the run when nothing is left, and claims the
//! ready steps with a lease; then it hands each claimed step to the executor (a signed
//! request to the app's own endpoint) and never calls a model or a tool itself. Advancing
//! twice finds nothing new to claim the second time.

use std::time::Duration;

use serde_json::{Value, json};
use sparkops_core::db::{self as core_db, Tx, Value as V};
use sparkops_core::dispatch;
use sparkops_core::error::ApiError;
use sparkops_core::run::{self, Decision, Outcome, RunScope, StepStatus};
use sparkops_core::workflow::{Approval, StepKind};

use crate::db::Db;
use crate::engine;
use crate::outbound::{self, Call};

/// How long a claimed step may run before the sweeper takes it back, beyond its timeout.
const LEASE_MARGIN_MS: i64 = 30_000;
/// An approval step's wait when its definition sets none: a day.
const DEFAULT_APPROVAL_S: u64 = 86_400;
/// A step's timeout when its definition sets none.
pub const DEFAULT_STEP_TIMEOUT_MS: i64 = 300_000;

/// Advances `run_id` and hands what it claimed to the executor.
pub fn advance_run(db: &Db, run_id: &str) -> Result<(), ApiError> {
    let claimed = core_db::transaction(db, |tx| advance(tx, run_id))?;
    if claimed.is_empty() {
        return Ok(());
    }
    // The settings are read once for every step this advance claimed.
    match Dispatcher::from_settings() {
        Ok(dispatcher) => {
            for (step, lease) in &claimed {
                dispatcher.send(run_id, step, lease);
            }
        }
        Err(e) => {
            crate::log_line(
                &json!({"level": "warn", "msg": "cannot dispatch", "run_id": run_id,
                "steps": claimed.len(), "detail": e}),
            );
        }
    }
    Ok(())
}

/// Hands claimed steps to the executor: a signed `POST` to the app's own public endpoint
/// (`dispatch_url`; see [`sparkops_core::dispatch`] for why not service chaining). A failed
/// hand-off leaves the step claimed: its lease runs out and the sweeper gives it a new
/// attempt.
struct Dispatcher {
    url: url::Url,
    key: [u8; 32],
}

impl Dispatcher {
    /// The executor's URL under `dispatch_url`, and the key derived from `jwt_secret`.
    fn from_settings() -> Result<Self, String> {
        let base = crate::variable("dispatch_url")?;
        let url = url::Url::parse(base.trim_end_matches('/'))
            .and_then(|u| u.join(dispatch::PATH))
            .map_err(|e| format!("variable `dispatch_url`: {e}"))?;
        let key = dispatch::key(&crate::variable("jwt_secret")?);
        Ok(Self { url, key })
    }

    fn send(&self, run_id: &str, step: &str, lease: &str) {
        let warn = |msg: &str, detail: Value| {
            crate::log_line(
                &json!({"level": "warn", "msg": msg, "run_id": run_id, "step": step, "detail": detail}),
            )
        };
        let body = json!({"run_id": run_id, "step_key": step, "lease_id": lease})
            .to_string()
            .into_bytes();
        let signature = dispatch::sign(&self.key, chrono::Utc::now().timestamp(), &body);
        match outbound::send(Call {
            method: "POST",
            url: &self.url,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                (dispatch::HEADER.into(), signature),
            ],
            body: Some(body),
            timeout: Duration::from_secs(10),
            max_response_bytes: 4096,
        }) {
            Ok(res) if res.status == 202 => {}
            Ok(res) => warn("executor refused a step", json!(res.status)),
            Err(e) => warn("executor unreachable", json!(e.to_string())),
        }
    }
}

/// Advances the run; the steps claimed, with their lease ids.
pub fn advance(tx: &Tx<'_, Db>, run_id: &str) -> Result<Vec<(String, String)>, ApiError> {
    let rows = tx.query(
        "select status, input from runs where run_id = $1 for no key update",
        &[V::Uuid(run_id.into())],
    )?;
    let Some(row) = rows.first() else {
        return Ok(Vec::new());
    };
    let (status, input) = (row.text(0)?, row.json(1)?);
    match status.as_str() {
        "cancelling" => {
            finish(
                tx,
                run_id,
                "cancelled",
                None,
                json!({"reason": "cancelled by request"}),
            )?;
            return Ok(Vec::new());
        }
        "queued" => {
            tx.execute(
                "update runs set status = 'running', started_at = now(), updated_at = now() where run_id = $1",
                &[V::Uuid(run_id.into())],
            )?;
            engine::event(tx, run_id, "run.started", None, json!({}))?;
        }
        "running" | "waiting" => {}
        _ => return Ok(Vec::new()),
    }
    let definition = engine::definition(tx, run_id)?;
    // The steps are read once: under the run's lock nothing else changes them, so each
    // decision is applied to the copy here as well as to the table.
    let (mut statuses, outputs) = engine::steps(tx, run_id)?;
    let scope = RunScope {
        input: &input,
        outputs: &outputs,
    };
    // Skipping a step can settle its dependants, so decide until nothing changes.
    loop {
        let decisions = run::decide(&definition, &statuses, &scope);
        if decisions.is_empty() {
            break;
        }
        for (key, decision) in decisions {
            let (status, new, reason) = match decision {
                Decision::Ready => ("ready", StepStatus::Ready, Value::Null),
                Decision::Skip(why) => ("skipped", StepStatus::Skipped, json!({"reason": why})),
            };
            let changed = tx.execute(
                "update run_steps set status = $3, error = $4, updated_at = now()
                 where run_id = $1 and step_key = $2 and status = 'pending'",
                &[
                    V::Uuid(run_id.into()),
                    V::Text(key.clone()),
                    V::Text(status.into()),
                    if reason.is_null() {
                        V::Null
                    } else {
                        V::Json(reason.clone())
                    },
                ],
            )?;
            if changed != 1 {
                return Err(ApiError::Server(format!(
                    "step {key} of run {run_id} changed under the run's lock"
                )));
            }
            if new == StepStatus::Skipped {
                engine::event(tx, run_id, "step.skipped", Some(&key), reason)?;
            }
            statuses.insert(key, new);
        }
    }
    match run::outcome(&statuses) {
        Some(Outcome::Succeeded) => {
            // The run's output: what the steps no other step depends on produced.
            let leaves: serde_json::Map<String, Value> = definition
                .steps
                .iter()
                .filter(|s| {
                    !definition
                        .steps
                        .iter()
                        .any(|o| o.depends_on.contains(&s.key))
                })
                .filter_map(|s| outputs.get(&s.key).map(|o| (s.key.clone(), o.clone())))
                .collect();
            finish(
                tx,
                run_id,
                "succeeded",
                Some(Value::Object(leaves)),
                Value::Null,
            )?;
            return Ok(Vec::new());
        }
        Some(Outcome::Failed) => {
            let failed: Vec<&String> = statuses
                .iter()
                .filter(|(_, s)| **s == StepStatus::Failed)
                .map(|(k, _)| k)
                .collect();
            finish(
                tx,
                run_id,
                "failed",
                None,
                json!({"reason": "a step failed", "steps": failed}),
            )?;
            return Ok(Vec::new());
        }
        None => {}
    }
    let mut ready: Vec<String> = statuses
        .into_iter()
        .filter(|(_, s)| *s == StepStatus::Ready)
        .map(|(k, _)| k)
        .collect();
    ready.sort();
    claim(tx, run_id, &definition, ready)
}

/// Claims the `ready` steps with a fresh lease, as one conditional update per step.
fn claim(
    tx: &Tx<'_, Db>,
    run_id: &str,
    definition: &sparkops_core::workflow::Definition,
    ready: Vec<String>,
) -> Result<Vec<(String, String)>, ApiError> {
    let mut claimed = Vec::new();
    for key in ready {
        let step = definition.steps.iter().find(|s| s.key == key);
        // An approval step needs no executor: it waits for a person, until its deadline.
        let approval = match step {
            Some(s) if s.kind == StepKind::Approval => {
                Some(s.approval.clone().unwrap_or(Approval {
                    timeout_s: DEFAULT_APPROVAL_S,
                    approvers: Vec::new(),
                }))
            }
            _ => None,
        };
        if let Some(approval) = approval {
            let waiting = tx.execute(
                "update run_steps set status = 'waiting', attempt = attempt + 1,
                    deadline_at = now() + make_interval(secs => $3::float8),
                    started_at = coalesce(started_at, now()), updated_at = now()
                 where run_id = $1 and step_key = $2 and status = 'ready'",
                &[
                    V::Uuid(run_id.into()),
                    V::Text(key.clone()),
                    V::Float64(approval.timeout_s as f64),
                ],
            )?;
            if waiting == 1 {
                engine::event(
                    tx,
                    run_id,
                    "step.waiting",
                    Some(&key),
                    json!({"timeout_s": approval.timeout_s, "approvers": approval.approvers}),
                )?;
            }
            continue;
        }
        let timeout = step
            .and_then(|s| s.timeout_ms)
            .map(|t| t as i64)
            .unwrap_or(DEFAULT_STEP_TIMEOUT_MS);
        let lease = crate::new_id();
        let rows = tx.query(
            "update run_steps set status = 'running', attempt = attempt + 1, lease_id = $3,
                lease_expires_at = now() + make_interval(secs => $4::float8 / 1000),
                started_at = coalesce(started_at, now()), updated_at = now()
             where run_id = $1 and step_key = $2 and status = 'ready'
             returning attempt",
            &[
                V::Uuid(run_id.into()),
                V::Text(key.clone()),
                V::Uuid(lease.clone()),
                V::Float64((timeout + LEASE_MARGIN_MS) as f64),
            ],
        )?;
        if let Some(r) = rows.first() {
            engine::event(
                tx,
                run_id,
                "step.started",
                Some(&key),
                json!({"attempt": r.int(0)?}),
            )?;
            claimed.push((key, lease));
        }
    }
    // A run with nothing in flight but a step awaiting approval is waiting.
    tx.execute(
        "update runs r set status = case when exists (
                select 1 from run_steps s where s.run_id = r.run_id and s.status = 'waiting')
            and not exists (
                select 1 from run_steps s where s.run_id = r.run_id and s.status in ('ready', 'running', 'retrying'))
            then 'waiting' else 'running' end, updated_at = now()
         where r.run_id = $1 and r.status in ('running', 'waiting')",
        &[V::Uuid(run_id.into())],
    )?;
    Ok(claimed)
}

/// Ends the run: steps not finished are cancelled, the run's end is an event, and its trace
/// is queued for export when the project exports traces.
pub fn finish(
    tx: &Tx<'_, Db>,
    run_id: &str,
    status: &str,
    output: Option<Value>,
    error: Value,
) -> Result<(), ApiError> {
    tx.execute(
        "update run_steps set status = 'cancelled', lease_id = null, finished_at = now(), updated_at = now()
         where run_id = $1 and status in ('pending', 'ready', 'running', 'retrying', 'waiting')",
        &[V::Uuid(run_id.into())],
    )?;
    tx.execute(
        "update runs set status = $2, output = $3, error = $4, finished_at = now(), updated_at = now()
         where run_id = $1",
        &[
            V::Uuid(run_id.into()),
            V::Text(status.into()),
            output.map(V::Json).unwrap_or(V::Null),
            if error.is_null() { V::Null } else { V::Json(error.clone()) },
        ],
    )?;
    engine::event(tx, run_id, &format!("run.{status}"), None, error)?;
    crate::traces::enqueue(tx, run_id)
}
