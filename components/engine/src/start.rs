//! Starting a run: one path for `POST /runs`, retries and schedule fires, with one order of
//! checks. The input against the workflow version's `input_schema` first (it reads
//! nothing), then the policies on starting runs (API.md "Policies": rules "are checked ...
//! when a run is created"), then the run with its steps and its `run.queued` event.
//!
//! Admission: the enabled policies in scope of the run (the whole project, or its
//! workflow) apply together and the most restrictive wins: `max_concurrent_runs` counts
//! the runs in scope not yet finished, and a blocking `budget` refuses once its window's
//! spend (the ledger, `budget_usage`) has reached the limit. With a concurrency limit in
//! scope the project's row is locked first, so two starts at once cannot both take the
//! last slot.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection, DbError, Read, Row, Tx, Value as V};
use sparkops_core::error::{ApiError, FieldError};
use sparkops_core::money::Usd;
use sparkops_core::status::{RunStatus, StepStatus, sql_list};
use sparkops_core::workflow::{self, Definition};

use crate::advance::{self, Claim};
use crate::policies;
use crate::store::{self, Changes, Snapshot, StepRow};

/// A workflow version a run can pin.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub workflow_id: String,
    pub project_id: String,
    pub version: i32,
    pub definition: Definition,
    pub input_schema: Value,
    /// The workflow's run timeout.
    pub timeout_s: Option<i64>,
}

/// Reads version `version` (the current one when `None`) of a workflow that is not
/// deleted, in a project that is not deleted. `Ok(None)` when there is no such workflow;
/// `Err` naming the field `version` when the workflow has no such version.
pub fn workflow<R: Read + ?Sized>(
    db: &R,
    workflow_id: &str,
    version: Option<i32>,
) -> Result<Option<Workflow>, ApiError> {
    workflow_for(db, workflow_id, version, None)?
        .map(|found| found.workflow)
        .transpose()
}

/// A workflow [`workflow_for`] found, with what its caller may do with it.
pub struct Found {
    pub project_id: String,
    /// The caller's membership role in the workflow's project, `None` when not a member.
    pub member_role: Option<String>,
    /// The version asked for, or why there is none (checked after the caller's access).
    pub workflow: Result<Workflow, ApiError>,
}

/// [`workflow`] and `user_id`'s membership of its project in the same query (the database
/// function `sparkops_workflow_for`, migration 0022).
pub fn workflow_for<R: Read + ?Sized>(
    db: &R,
    workflow_id: &str,
    version: Option<i32>,
    user_id: Option<&str>,
) -> Result<Option<Found>, ApiError> {
    let rows = db.read(
        "select project_id, version, timeout_s, definition, input_schema, role
         from sparkops_workflow_for($1, $2, $3)",
        &[
            V::Uuid(workflow_id.into()),
            version.map_or(V::Null, V::Int32),
            user_id.map_or(V::Null, |u| V::Uuid(u.into())),
        ],
    )?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let project_id = row.text(0)?;
    let member_role = row.opt_text(5)?;
    let Ok(pinned) = row.int(1) else {
        let version = version.unwrap_or_default();
        return Ok(Some(Found {
            project_id,
            member_role,
            workflow: Err(ApiError::field(
                "version",
                format!("the workflow has no version {version}"),
            )),
        }));
    };
    let definition = workflow::parse_saved(&row.json(3)?).map_err(|e| {
        ApiError::Internal(format!(
            "workflow {workflow_id} v{pinned} does not parse: {e:?}"
        ))
    })?;
    Ok(Some(Found {
        workflow: Ok(Workflow {
            workflow_id: workflow_id.into(),
            project_id: project_id.clone(),
            version: pinned as i32,
            definition,
            input_schema: row.json(4)?,
            timeout_s: row.int(2).ok(),
        }),
        project_id,
        member_role,
    }))
}

/// Where a run comes from.
#[derive(Debug, Clone)]
pub enum Origin<'a> {
    /// `POST /runs` by a user.
    Api { user_id: &'a str },
    /// `POST /runs/{id}/retry`.
    Retry {
        user_id: &'a str,
        of: &'a str,
        /// `failed` or `start`.
        from: &'a str,
        /// Steps that start succeeded with these `(input, output)`: a retry from `failed`
        /// reuses what the earlier run's succeeded steps produced (their cost is not
        /// counted again).
        reused: HashMap<String, (Value, Value)>,
    },
    /// A fire of a schedule for the time `at`.
    Schedule {
        schedule_id: &'a str,
        at: DateTime<Utc>,
    },
    /// `POST /hooks/{trigger_id}`: another system's event, with the sender's delivery id.
    Trigger {
        trigger_id: &'a str,
        delivery_id: Option<&'a str>,
    },
}

/// A run to start.
pub struct NewRun<'a> {
    pub run_id: &'a str,
    pub workflow: &'a Workflow,
    pub input: &'a Value,
    pub origin: Origin<'a>,
    pub now: DateTime<Utc>,
    /// The run's own hard budget (`POST /runs {max_cost_usd}`), held call by call.
    pub max_cost_usd: Option<sparkops_core::money::Usd>,
}

/// Why a run did not start.
#[derive(Debug)]
pub enum StartError {
    /// The input does not fit the workflow's `input_schema`: `(path under input, message)`.
    BadInput(Vec<FieldError>),
    /// A policy on starting runs refused it: the policy, rule and detail.
    Refused(String),
    Failed(ApiError),
}

impl From<DbError> for StartError {
    fn from(e: DbError) -> Self {
        StartError::Failed(e.into())
    }
}

impl From<ApiError> for StartError {
    fn from(e: ApiError) -> Self {
        StartError::Failed(e)
    }
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::BadInput(problems) => ApiError::fields(problems),
            StartError::Refused(m) => ApiError::PolicyViolation(m),
            StartError::Failed(e) => e,
        }
    }
}

/// Starts `run` queued: checks its input and the policies, then inserts it with its steps
/// and its `run.queued` event. For a caller that cannot dispatch (a schedule's fire): the
/// engine's nudge advances it after the commit. [`start_advanced`] also takes its first
/// steps.
pub fn start<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run: &NewRun<'_>,
) -> Result<Started, StartError> {
    admit_checked(tx, run)?;
    let (steps, written) = step_rows(run);
    let (answer, _) = insert(tx, run, &steps, &written, None, None)?;
    debug_assert!(answer.is_none());
    Ok(Started {
        run_id: run.run_id.to_string(),
        claimed: Vec::new(),
        answer: None,
    })
}

/// Starts `run` and advances it in the same transaction: checks its input and the
/// policies, decides its first moves from what it is about to write, and, when the run goes
/// on, writes the run, its steps and its events already advanced, in one statement (a run
/// that ends at once is inserted queued and then ended). `answer`: columns the caller wants
/// of the run *as queued*, SQL over `r` (a `runs` row) and `queued.steps` (its steps counted
/// by status, as written).
pub fn start_advanced<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run: &NewRun<'_>,
    answer: Option<&str>,
) -> Result<Started, StartError> {
    admit_checked(tx, run)?;
    let (steps, written) = step_rows(run);
    let snapshot = Snapshot {
        input: run.input.clone(),
        definition: run.workflow.definition.clone(),
        steps: written,
    };
    let mut changes = Changes::default();
    let next = advance::decide(&snapshot, RunStatus::Queued, &mut changes);
    let (answer, claimed) = match next {
        advance::Next::GoesOn => insert(tx, run, &steps, &snapshot.steps, Some(changes), answer)?,
        advance::Next::Ends(ending) => {
            let inserted = insert(tx, run, &steps, &snapshot.steps, None, answer)?;
            advance::end(tx, run.run_id, changes, ending)?;
            inserted
        }
    };
    Ok(Started {
        run_id: run.run_id.to_string(),
        claimed,
        answer,
    })
}

/// A run [`start`] or [`start_advanced`] inserted.
#[derive(Debug)]
pub struct Started {
    pub run_id: String,
    /// The steps its first advance claimed for executors: dispatch them after the commit.
    pub claimed: Vec<Claim>,
    /// The caller's `answer` over the run as queued.
    pub answer: Option<Row>,
}

/// The input against the workflow's `input_schema`, then the policies on starting runs.
fn admit_checked<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run: &NewRun<'_>,
) -> Result<(), StartError> {
    let w = run.workflow;
    if !w.input_schema.is_null()
        && let Err(problems) = sparkops_core::schema::validate_saved(&w.input_schema, run.input)
    {
        return Err(StartError::BadInput(
            problems
                .into_iter()
                .map(|(path, message)| FieldError {
                    field: format!("input{path}"),
                    message,
                })
                .collect(),
        ));
    }
    admit(tx, &w.project_id, &w.workflow_id, run.now)
}

/// The run's steps as rows to insert (one JSON array) and as written, for its first
/// advance: pending, or, for a step a retry from `failed` reuses, succeeded already with its
/// input and output.
fn step_rows(run: &NewRun<'_>) -> (Value, Vec<StepRow>) {
    let reused = match &run.origin {
        Origin::Retry { reused, .. } => Some(reused),
        _ => None,
    };
    let (rows, written): (Vec<Value>, Vec<StepRow>) = run
        .workflow
        .definition
        .steps
        .iter()
        .map(|step| {
            let mut row = json!({
                "key": step.key,
                "kind": step.kind.as_str(),
                // What the metrics group steps by.
                "agent_id": step.agent_id,
                "tool_id": step.tool_id,
            });
            let mut written = StepRow {
                key: step.key.clone(),
                status: StepStatus::Pending,
                attempt: 0,
                output: Value::Null,
            };
            if let Some((input, output)) = reused.and_then(|r| r.get(&step.key)) {
                written.status = StepStatus::Succeeded;
                written.output = output.clone();
                row["status"] = json!(written.status.as_str());
                row["input"] = input.clone();
                row["output"] = output.clone();
            }
            (row, written)
        })
        .unzip();
    (Value::Array(rows), written)
}

/// Inserts the run, its steps and its events in one statement: queued with its `run.queued`
/// event (numbered 1), or, given its first advance's `first` changes, already advanced (its
/// status, its steps waiting or claimed with their leases, its events after `run.queued`,
/// and the deliveries of those webhooks are told of). The caller's `answer` over the run as
/// queued, and the steps claimed.
fn insert<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run: &NewRun<'_>,
    steps: &Value,
    written: &[StepRow],
    first: Option<Changes>,
    answer: Option<&str>,
) -> Result<(Option<Row>, Vec<Claim>), ApiError> {
    let w = run.workflow;
    let id = || V::Uuid(run.run_id.into());
    let deadline = w.timeout_s.map(|s| run.now + chrono::Duration::seconds(s));
    let trigger = match &run.origin {
        Origin::Trigger { trigger_id, .. } => Some(*trigger_id),
        _ => None,
    };
    let (created_by, retry_of, schedule, mut data) = match &run.origin {
        Origin::Api { user_id } => (
            Some(*user_id),
            None,
            None,
            json!({"workflow_version": w.version}),
        ),
        Origin::Retry {
            user_id, of, from, ..
        } => (
            Some(*user_id),
            Some(*of),
            None,
            json!({"workflow_version": w.version, "retry_of": of, "from": from}),
        ),
        Origin::Schedule { schedule_id, at } => (
            None,
            None,
            Some((*schedule_id, *at)),
            json!({"workflow_version": w.version, "schedule_id": schedule_id,
                "scheduled_for": sparkops_core::time::rfc3339(*at)}),
        ),
        Origin::Trigger {
            trigger_id,
            delivery_id,
        } => (
            None,
            None,
            None,
            json!({"workflow_version": w.version, "trigger_id": trigger_id,
                "delivery_id": delivery_id}),
        ),
    };
    let mut counts = std::collections::BTreeMap::<&str, i64>::new();
    let mut reused_keys = Vec::new();
    for step in written {
        *counts.entry(step.status.as_str()).or_default() += 1;
        if step.status == StepStatus::Succeeded {
            reused_keys.push(step.key.clone());
        }
    }
    if !reused_keys.is_empty() {
        data["reused"] = json!(reused_keys);
    }
    // Its first event, `run.queued`, numbered 1 (no webhook is told of a queued run); the
    // first advance's after it.
    debug_assert!(sparkops_core::webhook::event_type_of("run.queued").is_none());
    let first = first.unwrap_or_default();
    let mut events = vec![json!({"kind": "run.queued", "data": data})];
    events.extend(first.events);
    let status = first.status.unwrap_or(RunStatus::Queued);
    let logged = store::log_events("$15", "run", "0", first.told);
    // A step as the definition writes it (pending, or reused), then as its first advance
    // changes it.
    let (columns, values): (Vec<&str>, Vec<String>) =
        store::planned_step_columns(|column| match column {
            "status" => "coalesce(s.status, 'pending')".into(),
            "attempt" => "0".into(),
            _ => "null".into(),
        })
        .into_iter()
        .unzip();
    // The run as queued, whatever the first advance made of it, for the caller's answer: a
    // function in `from`, computed once (as `(f(..)).*` in the select list it would run once
    // per column).
    let answer = answer.unwrap_or("null");
    let (columns, values, planned) = (
        columns.join(", "),
        values.join(", "),
        store::planned_steps("$18"),
    );
    let rows = tx.query(
        &format!(
            "with run as (
                insert into runs (run_id, project_id, workflow_id, workflow_version, input, created_by,
                    deadline_at, retry_of, schedule_id, scheduled_for, trigger_id, max_cost_usd, created_at, updated_at,
                    status, started_at, event_seq)
                values ($1, $2, $3, $4, $5, $6, $7{AS_TIMESTAMPTZ}, $8, $9, $10{AS_TIMESTAMPTZ}, $12, $13,
                    $11{AS_TIMESTAMPTZ}, $11{AS_TIMESTAMPTZ}, $16, case when $17 then now() end,
                    jsonb_array_length($15))
                returning *
             ), steps as (
                insert into run_steps (run_id, step_key, kind, agent_id, tool_id, input, output, finished_at,
                    {columns})
                select run.run_id, s.key, s.kind, s.agent_id::uuid, s.tool_id::uuid, s.input, s.output,
                    case when s.status is not null then now() end, {values}
                from run, jsonb_to_recordset($14) as s(key text, kind text, agent_id text, tool_id text,
                        status text, input jsonb, output jsonb)
                    left join {planned} on p.key = s.key
                returning step_key, attempt, lease_id::text
             ){logged}
             select {answer}, (select coalesce(jsonb_agg(jsonb_build_array(step_key, attempt, lease_id)
                    order by step_key), '[]') from steps where lease_id is not null)
             from run, jsonb_populate_record(null::runs, to_jsonb(run) || jsonb_build_object(
                    'status', 'queued', 'started_at', null, 'event_seq', 1)) r,
                (select $19::jsonb as steps) queued"
        ),
        &[
            id(),
            V::Uuid(w.project_id.clone()),
            V::Uuid(w.workflow_id.clone()),
            V::Int32(w.version),
            V::Json(run.input.clone()),
            created_by.map_or(V::Null, |u| V::Uuid(u.into())),
            deadline.map_or(V::Null, V::Timestamp),
            retry_of.map_or(V::Null, |r| V::Uuid(r.into())),
            schedule.map_or(V::Null, |(s, _)| V::Uuid(s.into())),
            schedule.map_or(V::Null, |(_, t)| V::Timestamp(t)),
            V::Timestamp(run.now),
            trigger.map_or(V::Null, |t| V::Uuid(t.into())),
            run.max_cost_usd.map_or(V::Null, |c| V::Decimal(c.to_fixed())),
            V::Json(steps.clone()),
            V::Json(Value::Array(events)),
            V::Text(status.as_str().into()),
            V::Bool(first.started),
            V::Json(Value::Array(first.steps)),
            V::Json(json!(counts)),
        ],
    )?;
    let mut row = rows.into_iter().next().ok_or_else(|| {
        ApiError::Internal(format!("run {}: its insert answered nothing", run.run_id))
    })?;
    // The claims are the last column, after the caller's answer.
    let last = row.0.len() - 1;
    let claims = store::claims(run.run_id, &row.json(last)?)?;
    row.0.truncate(last);
    let answer = (answer != "null").then_some(row);
    Ok((answer, claims))
}

/// `Ok` when a run of `workflow_id` may start now; `Refused` naming the first rule that
/// refuses it.
fn admit<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    project_id: &str,
    workflow_id: &str,
    now: DateTime<Utc>,
) -> Result<(), StartError> {
    let policies = policies::in_scope(tx, project_id, workflow_id, None)?;
    if policies
        .iter()
        .any(|p| p.rules.max_concurrent_runs.is_some())
    {
        tx.query(
            "select 1 from projects where project_id = $1 for no key update",
            &[V::Uuid(project_id.into())],
        )?;
    }
    let unfinished = sql_list(RunStatus::UNFINISHED);
    for p in &policies {
        let rules = &p.rules;
        let refuse = |rule: &'static str, detail: String| {
            Err(StartError::Refused(
                policies::violation(p, rule, detail).message(),
            ))
        };
        // The runs a policy's rules count: its workflow's, or the whole project's.
        let (filter, params) = if p.workflow_scoped {
            (
                "project_id = $1 and workflow_id = $2",
                vec![V::Uuid(project_id.into()), V::Uuid(workflow_id.into())],
            )
        } else {
            ("project_id = $1", vec![V::Uuid(project_id.into())])
        };
        if let Some(limit) = rules.max_concurrent_runs {
            let rows = tx.query(
                &format!("select count(*) from runs where {filter} and status in {unfinished}"),
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
        // A spent budget refuses new runs, unless it holds calls instead of failing
        // them (`on_exhausted: wait | ask`): then the run starts and its call waits.
        if let Some(budget) = rules
            .budget
            .as_ref()
            .filter(|b| b.block && b.on_exhausted == sparkops_core::policy::OnExhausted::Fail)
        {
            let start = policies::window_start(budget.window, now);
            let rows = tx.query(
                &format!(
                    "select spent_usd::text from budget_usage where policy_id = $1 and window_start = $2{AS_TIMESTAMPTZ}"
                ),
                &[V::Uuid(p.id.clone()), V::Timestamp(start)],
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
