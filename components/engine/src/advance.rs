//! Advancing a run (DESIGN.md section 5): in one transaction under the run's row lock it
//! finishes a cancelling run, marks pending steps ready or skipped
//! ([`sparkops_core::run::decide`]), finishes the run when nothing is left, and claims the
//! ready steps: a short lease and an attempt deadline for each step an executor runs, a
//! deadline for each approval. It never calls a model or a tool. Advancing twice finds
//! nothing new to claim the second time.

use serde_json::{Value, json};
use sparkops_core::db::{Connection, Tx};
use sparkops_core::error::ApiError;
use sparkops_core::run::{self, Decision, Outcome, RunScope};
use sparkops_core::status::{RunStatus, StepStatus};
use sparkops_core::workflow::{Definition, StepKind};

use crate::store::{self, Changes};

/// How long a claim holds without news from its executor: the executor renews it every
/// [`HEARTBEAT_MS`] while the step runs, so a dead host's step is taken back within a lease
/// and a sweep (about 20 s) whatever the step's timeout.
pub const LEASE_MS: i64 = 15_000;
/// How often a running step's executor renews its lease ([`crate::step::renew`]): three
/// renewals fit in a lease, so one slow one does not lose it.
pub const HEARTBEAT_MS: i64 = 5_000;
/// How long an attempt may hold its lease beyond its timeout, renewed or not: the executor
/// enforces the timeout itself, and this bounds an attempt whose executor lives but hangs.
pub const LEASE_MARGIN_MS: i64 = 30_000;
/// A step's timeout when its definition sets none.
pub const DEFAULT_STEP_TIMEOUT_MS: i64 = 300_000;

/// A step an advance claimed for an executor: dispatch it with its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub step_key: String,
    pub lease_id: String,
    /// The attempt the lease is for (1 for a first run).
    pub attempt: i64,
}

/// Advances the run; the steps claimed for executors.
pub fn advance<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
) -> Result<Vec<Claim>, ApiError> {
    let status = store::lock_run(tx, run_id)?;
    advance_locked(tx, run_id, status)
}

/// [`advance`] for a caller that already holds the run's lock and read its `status` (`None`:
/// no such run).
pub(crate) fn advance_locked<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    status: Option<RunStatus>,
) -> Result<Vec<Claim>, ApiError> {
    decide_and_claim(tx, run_id, status, None)
}

/// The advance of a run whose lock this transaction holds, from `known` when the caller
/// has what a [`store::snapshot`] would read. What it decides is written in one statement
/// ([`Changes`]), or, when the run ends, before [`finish`].
fn decide_and_claim<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    status: Option<RunStatus>,
    known: Option<store::Snapshot>,
) -> Result<Vec<Claim>, ApiError> {
    let mut changes = Changes::default();
    let status = match status {
        Some(RunStatus::Cancelling) => {
            finish(
                tx,
                run_id,
                RunStatus::Cancelled,
                None,
                json!({"reason": "cancelled by request"}),
            )?;
            return Ok(Vec::new());
        }
        Some(s @ (RunStatus::Queued | RunStatus::Running | RunStatus::Waiting)) => s,
        _ => return Ok(Vec::new()),
    };
    let snapshot = match known {
        Some(snapshot) => snapshot,
        None => store::snapshot(tx, run_id)?,
    };
    match decide(&snapshot, status, &mut changes) {
        Next::Ends(ending) => {
            end(tx, run_id, changes, ending)?;
            Ok(Vec::new())
        }
        Next::GoesOn => changes.write(tx, run_id),
    }
}

/// What deciding a run found next.
pub(crate) enum Next {
    /// The run ends: its final status, output and error.
    Ends((RunStatus, Option<Value>, Value)),
    /// The run goes on with what [`decide`] gathered.
    GoesOn,
}

/// Decides the next moves of a run that is `status` (queued, running or waiting) and holds
/// `snapshot`, gathering them in `changes`: a queued run starts; pending steps become ready
/// or are skipped; the run ends when nothing is left, or else its ready steps are claimed
/// and its status follows (waiting when only approvals are in flight). Reads and writes
/// nothing.
pub(crate) fn decide(snapshot: &store::Snapshot, status: RunStatus, changes: &mut Changes) -> Next {
    let store::Snapshot {
        input,
        definition,
        steps,
    } = snapshot;
    if status == RunStatus::Queued {
        changes.start();
        changes.event("run.started", None, json!({}));
    }
    // The steps are read once: under the run's lock nothing else changes them, so each
    // decision is applied to the copy here and written with the others at the end.
    let (mut statuses, outputs) = store::states(steps);
    let scope = RunScope {
        input,
        outputs: &outputs,
    };
    // Skipping a step can settle its dependants, so decide until nothing changes.
    loop {
        let decisions = run::decide(definition, &statuses, &scope);
        if decisions.is_empty() {
            break;
        }
        for (key, decision) in decisions {
            match decision {
                // Claimed below, straight from `pending`: no write of its own.
                Decision::Ready => {
                    statuses.insert(key, StepStatus::Ready);
                }
                Decision::Skip(why) => {
                    let reason = json!({"reason": why});
                    changes.skip(&key, &reason);
                    changes.event("step.skipped", Some(&key), reason);
                    statuses.insert(key, StepStatus::Skipped);
                }
            }
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
            return Next::Ends((
                RunStatus::Succeeded,
                Some(Value::Object(leaves)),
                Value::Null,
            ));
        }
        Some(Outcome::Failed) => {
            let mut failed: Vec<&String> = statuses
                .iter()
                .filter(|(_, s)| **s == StepStatus::Failed)
                .map(|(k, _)| k)
                .collect();
            failed.sort();
            let error = json!({"reason": "a step failed", "steps": failed});
            return Next::Ends((RunStatus::Failed, None, error));
        }
        None => {}
    }
    let mut ready: Vec<String> = statuses
        .iter()
        .filter(|(_, s)| **s == StepStatus::Ready)
        .map(|(k, _)| k.clone())
        .collect();
    ready.sort();
    for key in ready {
        let attempt = steps.iter().find(|s| s.key == key).map_or(0, |s| s.attempt) + 1;
        let new = claim(changes, definition, &key, attempt);
        statuses.insert(key, new);
    }
    // A run with nothing in flight but a step awaiting approval is waiting.
    let waiting = statuses.values().any(|s| *s == StepStatus::Waiting)
        && !statuses.values().any(|s| {
            matches!(
                s,
                StepStatus::Ready | StepStatus::Running | StepStatus::Retrying
            )
        });
    let now = if waiting {
        RunStatus::Waiting
    } else {
        RunStatus::Running
    };
    if status != now {
        changes.set_status(now);
    }
    Next::GoesOn
}

/// Ends a run whose lock this transaction holds, with what was decided before the end, in
/// one statement.
pub(crate) fn end<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    mut changes: Changes,
    (status, output, error): (RunStatus, Option<Value>, Value),
) -> Result<(), ApiError> {
    changes.end(status, output, error);
    changes.write(tx, run_id).map(drop)
}

/// Claims the ready step `key` for its `attempt`: an approval step starts waiting until its
/// deadline, any other gets a short lease, renewed while the step runs, inside the
/// attempt's deadline. What the step becomes.
fn claim(changes: &mut Changes, definition: &Definition, key: &str, attempt: i64) -> StepStatus {
    let step = definition.steps.iter().find(|s| s.key == key);
    if let Some(s) = step.filter(|s| s.kind == StepKind::Approval) {
        let approval = s.approval.clone().unwrap_or_default();
        changes.wait(key, approval.timeout_s as f64);
        changes.event(
            "step.waiting",
            Some(key),
            json!({"timeout_s": approval.timeout_s, "approvers": approval.approvers,
                "quorum": approval.quorum}),
        );
        return StepStatus::Waiting;
    }
    let timeout = step
        .and_then(|s| s.timeout_ms)
        .map_or(DEFAULT_STEP_TIMEOUT_MS, |t| t as i64);
    let deadline_ms = timeout + LEASE_MARGIN_MS;
    changes.claim(
        key,
        deadline_ms as f64 / 1000.0,
        deadline_ms.min(LEASE_MS) as f64 / 1000.0,
    );
    changes.event("step.started", Some(key), json!({"attempt": attempt}));
    StepStatus::Running
}

/// Ends the run with `status` (a final one): steps not finished are cancelled, the end is
/// an event, and the run's trace is queued for export when its project exports traces
/// ([`Changes::end`]). The caller holds the run's lock.
pub fn finish<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    status: RunStatus,
    output: Option<Value>,
    error: Value,
) -> Result<(), ApiError> {
    end(tx, run_id, Changes::default(), (status, output, error))
}
