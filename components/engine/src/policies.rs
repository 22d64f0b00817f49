//! Policies enforced before every model and tool call of a run (API.md "Policies", DESIGN.md
//! section 5). The enabled policies in scope of a step (the whole project, the run's
//! workflow, the step's agent) apply together and the most restrictive wins. A refusal is a
//! [`Violation`] naming the policy and the rule; the step fails with `policy-violation`.
//!
//! Budgets: before a model call its worst-case cost is reserved against every budget in
//! scope (`reserve`), one conditional update per budget window in one transaction, so
//! concurrent calls never push a blocking budget past its limit; after the call the
//! reservation is settled to the real cost (`settle`). A model without a price is refused
//! by a blocking budget, never counted as free.
//!
//! A run's own `max_cost_usd` is held the same way, in the same transaction: the call's
//! worst case against what the run has left, refused as the rule `max_cost_usd` of the
//! policy `run`; the hold is released in the transaction that adds the call's real cost to
//! the run (`settle_in`), so the run's spend plus its holds never undercount.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde_json::{Value, json};
use sparkops_core::db::{self as core_db, AS_TIMESTAMPTZ, Connection, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::money::Usd;
use sparkops_core::policy::{self, Rules, Window, glob_matches};

/// One enabled policy in scope.
#[derive(Debug, Clone)]
pub struct Policy {
    pub id: String,
    pub name: String,
    pub rules: Rules,
    /// Scoped to a workflow (its counts are that workflow's runs, not the project's).
    pub workflow_scoped: bool,
}

/// A rule that refused a call.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub policy_id: String,
    pub policy: String,
    pub rule: &'static str,
    pub detail: String,
    /// For a call a blocking budget refused whose policy says `wait` or `ask`: how the
    /// step is held instead of failed.
    pub hold: Option<Box<BudgetHold>>,
}

/// A budget's refusal that holds the step rather than failing it.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetHold {
    pub mode: policy::OnExhausted,
    pub limit_usd: Usd,
    pub window: Window,
    /// What the refused call would have held.
    pub estimate_usd: Usd,
    /// When the window turns (`None` for a `total` budget: only raising it helps).
    pub resumes_at: Option<DateTime<Utc>>,
}

impl BudgetHold {
    /// As recorded on the held step and its event.
    pub fn to_json(&self, v: &Violation) -> Value {
        json!({"reason": "budget", "mode": self.mode.as_str(), "policy_id": v.policy_id,
            "policy": v.policy, "detail": v.detail, "limit_usd": self.limit_usd.to_fixed(),
            "window": self.window.as_str(), "estimate_usd": self.estimate_usd.to_fixed(),
            "resumes_at": self.resumes_at.map(sparkops_core::time::rfc3339)})
    }
}

impl Violation {
    pub fn message(&self) -> String {
        format!(
            "policy `{}` ({}), rule {}: {}",
            self.policy, self.policy_id, self.rule, self.detail
        )
    }

    /// The run event that records it.
    pub fn event(&self) -> Value {
        json!({"policy_id": self.policy_id, "policy": self.policy, "rule": self.rule, "detail": self.detail})
    }
}

pub fn violation(p: &Policy, rule: &'static str, detail: String) -> Violation {
    Violation {
        policy_id: p.id.clone(),
        policy: p.name.clone(),
        rule,
        detail,
        hold: None,
    }
}

/// The enabled policies of a project that apply to a run of `$2` (the workflow) and, for
/// an agent step, to the agent `$3` (`null` otherwise: agent-scoped policies then never
/// match), by id (the database function `sparkops_policies_in_scope`, migrations 0021 and
/// 0022). Read with [`scope_params`], parsed with [`from_rows`].
const IN_SCOPE: &str = "select * from sparkops_policies_in_scope($1, $2, $3::text::uuid)
     order by policy_id";

/// The parameters of [`IN_SCOPE`].
fn scope_params(project_id: &str, workflow_id: &str, agent_id: Option<&str>) -> [V; 3] {
    [
        V::Uuid(project_id.into()),
        V::Uuid(workflow_id.into()),
        agent_id.map_or(V::Null, |a| V::Text(a.into())),
    ]
}

/// The policies [`IN_SCOPE`] read.
fn from_rows(rows: &[sparkops_core::db::Row]) -> Result<Vec<Policy>, ApiError> {
    rows.iter()
        .map(|r| parse(r.text(0)?, r.text(1)?, &r.json(2)?, r.bool(3)?))
        .collect()
}

fn parse(
    id: String,
    name: String,
    rules: &Value,
    workflow_scoped: bool,
) -> Result<Policy, ApiError> {
    let rules = policy::parse_rules(rules)
        .map_err(|e| ApiError::Internal(format!("policy {id} does not parse: {e:?}")))?;
    Ok(Policy {
        id,
        name,
        rules,
        workflow_scoped,
    })
}

/// The enabled policies in scope of a step of `workflow_id` (and, for an agent step, of
/// `agent_id`).
pub fn in_scope<R: sparkops_core::db::Read + ?Sized>(
    db: &R,
    project_id: &str,
    workflow_id: &str,
    agent_id: Option<&str>,
) -> Result<Vec<Policy>, ApiError> {
    from_rows(&db.read(IN_SCOPE, &scope_params(project_id, workflow_id, agent_id))?)
}

/// What a tool step needs before its call: the policies in scope and its tool.
#[derive(Debug, Clone)]
pub struct ToolScope {
    pub policies: Vec<Policy>,
    /// `None` when the project has no such live tool.
    pub tool: Option<StepTool>,
}

/// A tool as a step calls it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTool {
    pub method: String,
    pub url: String,
    pub headers: Value,
    pub timeout_ms: i64,
    pub input_schema: Value,
    /// `null` when the tool checks no output.
    pub output_schema: Value,
}

/// The SQL expression (`jsonb`) of the [`ToolScope`] of tool `tool` for a step of workflow
/// `workflow` in project `project` (each SQL): the function `sparkops_tool_scope`
/// (migration 0021), which can ride along another statement.
pub(crate) fn tool_scope_sql(project: &str, workflow: &str, tool: &str) -> String {
    format!("sparkops_tool_scope({project}, {workflow}, {tool})")
}

/// The [`ToolScope`] of `tool_id` for a step of `workflow_id`: the executor's read before a
/// tool call, in one round trip.
pub fn tool_scope<R: sparkops_core::db::Read + ?Sized>(
    db: &R,
    project_id: &str,
    workflow_id: &str,
    tool_id: &str,
) -> Result<ToolScope, ApiError> {
    let rows = db.read(
        &format!("select {}", tool_scope_sql("$1", "$2", "$3")),
        &[
            V::Uuid(project_id.into()),
            V::Uuid(workflow_id.into()),
            V::Uuid(tool_id.into()),
        ],
    )?;
    let read = rows
        .first()
        .ok_or_else(|| ApiError::Internal("the tool scope read no row".into()))?;
    decode_tool_scope(&read.json(0)?)
}

/// A [`ToolScope`] as `sparkops_tool_scope` answers it.
pub(crate) fn decode_tool_scope(scope: &Value) -> Result<ToolScope, ApiError> {
    let bad = |what: &str| ApiError::Internal(format!("a tool scope's {what} does not read"));
    let policies = scope["policies"]
        .as_array()
        .ok_or_else(|| bad("policies"))?
        .iter()
        .map(|p| {
            let text = |k: &str| p[k].as_str().map(String::from).ok_or_else(|| bad(k));
            let scoped = p["workflow_scoped"]
                .as_bool()
                .ok_or_else(|| bad("workflow_scoped"))?;
            parse(text("id")?, text("name")?, &p["rules"], scoped)
        })
        .collect::<Result<_, _>>()?;
    let tool = match &scope["tool"] {
        Value::Null => None,
        t => {
            let text = |k: &str| t[k].as_str().map(String::from).ok_or_else(|| bad(k));
            Some(StepTool {
                method: text("method")?,
                url: text("url")?,
                headers: t["headers"].clone(),
                timeout_ms: t["timeout_ms"].as_i64().ok_or_else(|| bad("timeout_ms"))?,
                input_schema: t["input_schema"].clone(),
                output_schema: t["output_schema"].clone(),
            })
        }
    };
    Ok(ToolScope { policies, tool })
}

/// Every policy naming allowed models must allow `model`.
pub fn check_model(policies: &[Policy], model: &str) -> Result<(), Violation> {
    for p in policies {
        if let Some(globs) = &p.rules.allowed_models
            && !globs.iter().any(|g| glob_matches(g, model))
        {
            return Err(violation(
                p,
                "allowed_models",
                format!("{model} is not among {}", globs.join(", ")),
            ));
        }
    }
    Ok(())
}

/// Every policy naming allowed tools must allow `tool_id`: a tool's id, or an MCP tool as
/// `mcp:<server>/<tool>` (allowed by that name or by `mcp:<server>/*`).
pub fn check_tool(policies: &[Policy], tool_id: &str) -> Result<(), Violation> {
    let mcp = tool_id.starts_with("mcp:");
    for p in policies {
        if let Some(tools) = &p.rules.allowed_tools
            && !tools
                .iter()
                .any(|t| t == tool_id || (mcp && sparkops_core::mcp::allows(t, tool_id)))
        {
            return Err(violation(
                p,
                "allowed_tools",
                format!("tool {tool_id} is not allowed"),
            ));
        }
    }
    Ok(())
}

/// The run's started steps as [`check_steps`] needs them: counted only when a policy limits
/// them, since the count is a query on the path of every call.
pub fn started_steps<R: sparkops_core::db::Read + ?Sized>(
    db: &R,
    policies: &[Policy],
    run_id: &str,
) -> Result<i64, ApiError> {
    if policies.iter().any(|p| p.rules.max_steps_per_run.is_some()) {
        crate::store::started_steps(db, run_id)
    } else {
        Ok(0)
    }
}

/// `max_steps_per_run`: the run may have started at most this many steps, this one included.
pub fn check_steps(policies: &[Policy], started: i64) -> Result<(), Violation> {
    for p in policies {
        if let Some(limit) = p.rules.max_steps_per_run
            && started > limit
        {
            return Err(violation(
                p,
                "max_steps_per_run",
                format!("this would be step {started} of the run; the limit is {limit}"),
            ));
        }
    }
    Ok(())
}

/// The tokens a model call may still use under `max_tokens_per_step` and
/// `max_tokens_per_run` (`None`: no limit), or the rule already used up.
pub fn token_room(
    policies: &[Policy],
    step_used: i64,
    run_used: i64,
) -> Result<Option<i64>, Violation> {
    let mut room: Option<i64> = None;
    for p in policies {
        for (rule, limit, used) in [
            (
                "max_tokens_per_step",
                p.rules.max_tokens_per_step,
                step_used,
            ),
            ("max_tokens_per_run", p.rules.max_tokens_per_run, run_used),
        ] {
            let Some(limit) = limit else { continue };
            if used >= limit {
                return Err(violation(p, rule, format!("{used} tokens used of {limit}")));
            }
            room = Some(room.map_or(limit - used, |r| r.min(limit - used)));
        }
    }
    Ok(room)
}

/// Budget windows reserved for one call, released or settled by [`settle`].
#[derive(Debug, Default)]
pub struct Reservation {
    id: String,
    /// The budgets held: their policy, window and rule.
    windows: Vec<Held>,
    amount: Option<Usd>,
    /// Whether the run's `max_cost_usd` holds `amount` too.
    run_held: bool,
}

/// The rule a run's own cap is refused under, as the policy [`RUN_CAP`].
pub const RUN_CAP_RULE: &str = "max_cost_usd";
/// The name a run's own cap goes by in a [`Violation`] (its id is the run's).
pub const RUN_CAP: &str = "run";

/// Holds `amount` against the run's `max_cost_usd`, when it has one: `Ok(true)` held,
/// `Ok(false)` no cap. One statement, no write for a run without a cap.
fn hold_run<C: Connection + ?Sized>(
    tx: &core_db::Tx<'_, C>,
    run_id: &str,
    worst: Option<Usd>,
) -> Result<bool, Hold> {
    let rows = tx.query(
        "with held as (
            update runs set reserved_usd = reserved_usd + $2::numeric
            where run_id = $1 and max_cost_usd is not null and $2::numeric is not null
              and cost_usd + estimated_usd + reserved_usd + $2::numeric <= max_cost_usd
            returning 1)
         select max_cost_usd::text, (cost_usd + estimated_usd)::text, reserved_usd::text,
                exists (select 1 from held)
         from runs where run_id = $1",
        &[
            V::Uuid(run_id.into()),
            worst.map_or(V::Null, |w| V::Decimal(w.to_fixed())),
        ],
    )?;
    let Some(r) = rows.first() else {
        return Ok(false);
    };
    let Some(cap) = r.opt_text(0)? else {
        return Ok(false);
    };
    if r.bool(3)? {
        return Ok(true);
    }
    let refused = |detail: String| {
        Hold::Refused(Violation {
            policy_id: run_id.to_string(),
            policy: RUN_CAP.into(),
            rule: RUN_CAP_RULE,
            detail,
            hold: None,
        })
    };
    Err(match worst {
        None => refused(format!(
            "the model has no price, so its cost cannot be held to the run's {cap} USD"
        )),
        Some(w) => refused(format!(
            "a call costing up to {} USD would pass the run's {cap} USD ({} spent, {} held)",
            w.to_fixed(),
            r.opt_text(1)?.unwrap_or_default(),
            r.opt_text(2)?.unwrap_or_default(),
        )),
    })
}

/// Where the budget window that contains `now` began (UTC); the Unix epoch for `total`,
/// which has one window for ever. `budget_usage` rows are keyed by it.
pub fn window_start(window: Window, now: DateTime<Utc>) -> DateTime<Utc> {
    let start = match window {
        Window::Total => None,
        Window::Day => Utc
            .with_ymd_and_hms(now.year(), now.month(), now.day(), 0, 0, 0)
            .single(),
        Window::Month => Utc
            .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
            .single(),
    };
    start.unwrap_or(DateTime::UNIX_EPOCH)
}

/// Reserves, as `reservation_id` (a fresh UUID), `worst` (the call's worst-case cost; `None` when the model has no price)
/// against every budget in scope, atomically: all or none. A blocking budget refuses an
/// unpriced call and a call that would take spend plus reservations past its limit. The
/// hold is recorded until `expires_at`, when the sweeper releases it if the call never
/// settled (its host died). `waived` names a blocking budget a project admin let this one
/// call pass (an `ask` approved): it is held and counted, never refused.
#[allow(clippy::too_many_arguments)]
pub fn reserve<C: Connection + ?Sized>(
    db: &C,
    reservation_id: String,
    run_id: &str,
    policies: &[Policy],
    now: DateTime<Utc>,
    worst: Option<Usd>,
    expires_at: DateTime<Utc>,
    waived: Option<&str>,
) -> Result<Reservation, RefusedOr> {
    let budgets: Vec<&Policy> = policies
        .iter()
        .filter(|p| p.rules.budget.is_some())
        .collect();
    for p in &budgets {
        let budget = p.rules.budget.as_ref().expect("filtered");
        if budget.block && worst.is_none() {
            return Err(RefusedOr::Refused(violation(
                p,
                "budget",
                "the model has no price, so its cost cannot be held to the budget".into(),
            )));
        }
    }
    let amount = worst.unwrap_or(Usd::ZERO);
    let id = reservation_id;
    let mut windows = Vec::new();
    let mut run_held = false;
    let result = core_db::transaction(db, |tx| {
        if hold_run(tx, run_id, worst)? {
            tx.execute(
                &format!(
                    "insert into run_cost_reservations (reservation_id, run_id, amount_usd, expires_at)
                     values ($1, $2, $3, $4{AS_TIMESTAMPTZ})"
                ),
                &[
                    V::Uuid(id.clone()),
                    V::Uuid(run_id.into()),
                    V::Decimal(amount.to_fixed()),
                    V::Timestamp(expires_at),
                ],
            )?;
            run_held = true;
        }
        for p in &budgets {
            let budget = p.rules.budget.as_ref().expect("filtered");
            let start = window_start(budget.window, now);
            tx.execute(
                &format!(
                    "insert into budget_usage (policy_id, window_start) values ($1, $2{AS_TIMESTAMPTZ})
                     on conflict do nothing"
                ),
                &[V::Uuid(p.id.clone()), V::Timestamp(start)],
            )?;
            let held = tx.execute(
                &format!(
                    "update budget_usage set reserved_usd = reserved_usd + $3, updated_at = now()
                     where policy_id = $1 and window_start = $2{AS_TIMESTAMPTZ}
                       and ($4 = false or spent_usd + reserved_usd + $3 <= $5)"
                ),
                &[
                    V::Uuid(p.id.clone()),
                    V::Timestamp(start),
                    V::Decimal(amount.to_fixed()),
                    V::Bool(budget.block && waived != Some(p.id.as_str())),
                    V::Decimal(budget.limit_usd.to_fixed()),
                ],
            )?;
            if held == 0 {
                let mut v = violation(
                    p,
                    "budget",
                    format!(
                        "a call costing up to {} USD would pass the {} USD {} limit",
                        amount.to_fixed(),
                        budget.limit_usd.to_fixed(),
                        budget.window.as_str()
                    ),
                );
                if budget.on_exhausted != policy::OnExhausted::Fail {
                    v.hold = Some(Box::new(BudgetHold {
                        mode: budget.on_exhausted,
                        limit_usd: budget.limit_usd,
                        window: budget.window,
                        estimate_usd: amount,
                        resumes_at: budget.window.end_after(now),
                    }));
                }
                return Err(Hold::Refused(v));
            }
            tx.execute(
                &format!(
                    "insert into budget_reservations (reservation_id, policy_id, window_start, amount_usd, expires_at)
                     values ($1, $2, $3{AS_TIMESTAMPTZ}, $4, $5{AS_TIMESTAMPTZ})"
                ),
                &[
                    V::Uuid(id.clone()),
                    V::Uuid(p.id.clone()),
                    V::Timestamp(start),
                    V::Decimal(amount.to_fixed()),
                    V::Timestamp(expires_at),
                ],
            )?;
            windows.push(Held {
                policy: (*p).clone(),
                window_start: start,
            });
        }
        Ok(())
    });
    match result {
        Ok(()) => Ok(Reservation {
            id,
            windows,
            amount: Some(amount),
            run_held,
        }),
        Err(Hold::Refused(v)) => Err(RefusedOr::Refused(v)),
        Err(Hold::Db(e)) => Err(RefusedOr::Error(e)),
    }
}

/// Why a reservation failed.
#[derive(Debug)]
pub enum RefusedOr {
    Refused(Violation),
    Error(ApiError),
}

enum Hold {
    Refused(Violation),
    Db(ApiError),
}

impl From<sparkops_core::db::DbError> for Hold {
    fn from(e: sparkops_core::db::DbError) -> Self {
        Hold::Db(e.into())
    }
}

/// One budget window a reservation holds.
#[derive(Debug, Clone)]
struct Held {
    policy: Policy,
    window_start: DateTime<Utc>,
}

/// Turns a reservation into spend: `cost` (`None`: the call failed before costing
/// anything, or the model is unpriced) and `tokens`. Returns the `alert` budgets this call
/// took past their limit (each alerts once per window, when it is crossed).
pub fn settle<C: Connection + ?Sized>(
    db: &C,
    reservation: &Reservation,
    cost: Option<Usd>,
    tokens: i64,
) -> Result<Vec<Violation>, ApiError> {
    core_db::transaction(db, |tx| settle_in(tx, reservation, cost, tokens))
}

/// [`settle`] inside the caller's transaction: the one that adds the call's cost to the
/// run, so the run's hold is released as its spend is counted.
pub fn settle_in<C: Connection + ?Sized>(
    tx: &core_db::Tx<'_, C>,
    reservation: &Reservation,
    cost: Option<Usd>,
    tokens: i64,
) -> Result<Vec<Violation>, ApiError> {
    let held = reservation.amount.unwrap_or(Usd::ZERO);
    let cost = cost.unwrap_or(Usd::ZERO);
    if reservation.run_held {
        tx.query(
            &release_run_holds("reservation_id = $1"),
            &[V::Uuid(reservation.id.clone())],
        )?;
    }
    let mut alerts = Vec::new();
    for h in &reservation.windows {
        // The hold is released here, unless the sweeper already released it.
        let still_held = tx.execute(
            "delete from budget_reservations where reservation_id = $1 and policy_id = $2",
            &[
                V::Uuid(reservation.id.clone()),
                V::Uuid(h.policy.id.clone()),
            ],
        )? == 1;
        let held = if still_held { held } else { Usd::ZERO };
        let rows = tx.query(
            &format!(
                "update budget_usage set reserved_usd = greatest(reserved_usd - $3, 0),
                    spent_usd = spent_usd + $4, tokens = tokens + $5, calls = calls + 1, updated_at = now()
                 where policy_id = $1 and window_start = $2{AS_TIMESTAMPTZ}
                 returning spent_usd::text"
            ),
            &[
                V::Uuid(h.policy.id.clone()),
                V::Timestamp(h.window_start),
                V::Decimal(held.to_fixed()),
                V::Decimal(cost.to_fixed()),
                V::Int64(tokens),
            ],
        )?;
        let Some(budget) = h.policy.rules.budget.as_ref().filter(|b| !b.block) else {
            continue;
        };
        let Some(spent) = rows.first().map(|r| r.usd(0)).transpose()? else {
            continue;
        };
        if spent >= budget.limit_usd && spent - cost < budget.limit_usd {
            alerts.push(violation(
                &h.policy,
                "budget",
                format!(
                    "{} USD spent this {} passes the {} USD alert limit",
                    spent.to_fixed(),
                    budget.window.as_str(),
                    budget.limit_usd.to_fixed()
                ),
            ));
        }
    }
    Ok(alerts)
}

/// The statement that releases the runs' holds `which` (a condition on
/// `run_cost_reservations`) back to their runs, answering how many it released.
fn release_run_holds(which: &str) -> String {
    format!(
        "with released as (delete from run_cost_reservations where {which} returning run_id, amount_usd),
         per_run as (select run_id, sum(amount_usd) as amount from released group by run_id),
         back as (update runs r set reserved_usd = greatest(r.reserved_usd - per_run.amount, 0)
             from per_run where r.run_id = per_run.run_id)
         select count(*) from released"
    )
}

/// Releases the holds of calls that never settled (their host died) once they expire:
/// what they reserved is free again (budget and run holds; answers how many). The sweeper
/// calls it.
pub fn release_expired<C: Connection + ?Sized>(
    db: &C,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<u64, ApiError> {
    core_db::transaction(db, |tx| {
        let released = tx.query(
            &format!(
                "delete from budget_reservations where (reservation_id, policy_id) in (
                    select reservation_id, policy_id from budget_reservations
                    where expires_at < $1{AS_TIMESTAMPTZ} order by policy_id limit $2 for update skip locked)
                 returning policy_id::text, (window_start at time zone 'UTC'), amount_usd::text"
            ),
            &[V::Timestamp(now), V::Int64(limit)],
        )?;
        for r in &released {
            tx.execute(
                &format!(
                    "update budget_usage set reserved_usd = greatest(reserved_usd - $3, 0), updated_at = now()
                     where policy_id = $1 and window_start = $2{AS_TIMESTAMPTZ}"
                ),
                &[
                    V::Uuid(r.text(0)?),
                    V::Timestamp(r.timestamp(1)?),
                    V::Decimal(r.text(2)?),
                ],
            )?;
        }
        // Runs' own caps: each expired hold back to its run, in one statement.
        let runs = tx.query(
            &release_run_holds(&format!(
                "reservation_id in (select reservation_id from run_cost_reservations
                    where expires_at < $1{AS_TIMESTAMPTZ} order by reservation_id limit $2 for update skip locked)"
            )),
            &[V::Timestamp(now), V::Int64(limit)],
        )?;
        let runs = runs.first().map(|r| r.int(0)).transpose()?.unwrap_or(0);
        Ok(released.len() as u64 + runs as u64)
    })
}
