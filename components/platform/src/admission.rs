//! Whether a new run may start (API.md "Policies": rules "are checked ... when a run is
//! created"). The enabled policies in scope of the run (the whole project, or its
//! workflow) apply together and the most restrictive wins: `max_concurrent_runs` counts the
//! runs in scope not yet finished, and a blocking `budget` refuses once its window's spend
//! (the budget ledger, `budget_usage`) has reached the limit. A refusal names the policy and
//! the rule.
//!
//! With a concurrency limit in scope the project's row is locked first, so two starts at
//! once cannot both take the last slot.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use sparkops_core::db::{AS_TIMESTAMPTZ, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::money::Usd;
use sparkops_core::policy::{self, Window};

use crate::db::Db;

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
    let rows = tx.query(
        "select policy_id::text, name, rules, scope_workflow_id is not null from policies
         where project_id = $1 and enabled and deleted_at is null and scope_agent_id is null
           and (scope_workflow_id is null or scope_workflow_id = $2)
         order by policy_id",
        &[V::Uuid(project_id.into()), V::Uuid(workflow_id.into())],
    )?;
    let mut policies = Vec::new();
    for row in &rows {
        let id = row.text(0)?;
        let rules = policy::parse_rules(&row.json(2)?)
            .map_err(|e| ApiError::Server(format!("policy {id} does not parse: {e:?}")))?;
        policies.push((id, row.text(1)?, rules, row.bool(3)?));
    }
    if policies
        .iter()
        .any(|(_, _, r, _)| r.max_concurrent_runs.is_some())
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
    for (id, name, rules, workflow_scoped) in &policies {
        let refuse = |rule: &str, detail: String| {
            Err(ApiError::PolicyViolation(format!(
                "policy `{name}` ({id}), rule {rule}: {detail}"
            )))
        };
        let (filter, params) = scope(*workflow_scoped);
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
            let start = window_start(budget.window, now).unwrap_or(DateTime::UNIX_EPOCH);
            let rows = tx.query(
                &format!(
                    "select spent_usd::text from budget_usage where policy_id = $1 and window_start = $2{AS_TIMESTAMPTZ}"
                ),
                &[V::Uuid(id.clone()), V::Timestamp(start)],
            )?;
            let spent = rows
                .first()
                .map(|r| r.text(0))
                .transpose()?
                .map(|s| Usd::parse(&s))
                .transpose()
                .map_err(ApiError::Server)?
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

/// Where a budget window that contains `now` began (UTC); `None` for `total`.
pub fn window_start(window: Window, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match window {
        Window::Total => None,
        Window::Day => Utc
            .with_ymd_and_hms(now.year(), now.month(), now.day(), 0, 0, 0)
            .single(),
        Window::Month => Utc
            .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
            .single(),
    }
}
