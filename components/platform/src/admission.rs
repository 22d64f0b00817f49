//! Whether a new run may start (API.md "Policies": rules "are checked ... when a run is
//! created"). The enabled policies in scope of the run (the whole project, or its
//! workflow) apply together and the most restrictive wins: `max_concurrent_runs` counts the
//! runs in scope not yet finished, and a blocking `budget` refuses once its window's spend
//! (the budget ledger, `budget_usage`) has reached the limit. A refusal names the policy and
//! the rule.
//!
//! With a concurrency limit in scope the project's row is locked first, so two starts at
//! once cannot both take the last slot.

use chrono::{DateTime, Utc};
use sparkops_core::db::{AS_TIMESTAMPTZ, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::money::Usd;

use crate::db::Db;
use crate::policies;

/// Statuses of a run that holds a concurrency slot.
const UNFINISHED: &str = "('queued', 'running', 'waiting', 'cancelling')";

/// `Ok` when a run of `workflow_id` may start now; `Err(PolicyViolation)` naming the first
/// rule that refuses it.
pub fn admit(
    tx: &Tx<'_, Db>,
    project_id: &str,
    workflow_id: &str,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let policies = policies::from_rows(&tx.query(
        policies::IN_SCOPE,
        &policies::scope_params(project_id, workflow_id, None),
    )?)?;
    if policies
        .iter()
        .any(|p| p.rules.max_concurrent_runs.is_some())
    {
        tx.query(
            "select 1 from projects where project_id = $1 for no key update",
            &[V::Uuid(project_id.into())],
        )?;
    }
    // The runs a policy's rules count: its workflow's, or the whole project's.
    let scope = |workflow_scoped: bool| {
        if workflow_scoped {
            (
                "project_id = $1 and workflow_id = $2",
                vec![V::Uuid(project_id.into()), V::Uuid(workflow_id.into())],
            )
        } else {
            ("project_id = $1", vec![V::Uuid(project_id.into())])
        }
    };
    for p in &policies {
        let (id, rules) = (&p.id, &p.rules);
        let refuse = |rule: &'static str, detail: String| {
            Err(ApiError::PolicyViolation(
                policies::violation(p, rule, detail).message(),
            ))
        };
        let (filter, params) = scope(p.workflow_scoped);
        if let Some(limit) = rules.max_concurrent_runs {
            let rows = tx.query(
                &format!("select count(*) from runs where {filter} and status in {UNFINISHED}"),
                &params,
            )?;
            let running = rows.first().map(|r| r.int(0)).transpose()?.unwrap_or(0);
            if running >= limit {
                return refuse(
                    "max_concurrent_runs",
                    format!("{running} runs are unfinished and the limit is {limit}"),
                );
            }
        }
        if let Some(budget) = rules.budget.as_ref().filter(|b| b.block) {
            // What the budget's calls have spent in its current window (the ledger the
            // engine reserves against; see `policies`).
            let start = policies::window_start(budget.window, now);
            let rows = tx.query(
                &format!(
                    "select spent_usd::text from budget_usage where policy_id = $1 and window_start = $2{AS_TIMESTAMPTZ}"
                ),
                &[V::Uuid(id.clone()), V::Timestamp(start)],
            )?;
            let spent = rows
                .first()
                .map(|r| r.usd(0))
                .transpose()?
                .unwrap_or(Usd::ZERO);
            if spent >= budget.limit_usd {
                return refuse(
                    "budget",
                    format!(
                        "{} USD spent this {} of a {} USD limit",
                        spent.to_fixed(),
                        budget.window.as_str(),
                        budget.limit_usd.to_fixed()
                    ),
                );
            }
        }
    }
    Ok(())
}
