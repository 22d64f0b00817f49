//! Reading and locking a run: its row lock, its event log, the definition it pinned and
//! its steps, decoded into structs.

use std::collections::HashMap;

use serde_json::Value;
use sparkops_core::db::{Connection, Read, Row, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::status::{RunStatus, StepStatus};
use sparkops_core::webhook;
use sparkops_core::workflow::{self, Definition};

use crate::advance::Claim;
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
    let mut changes = Changes::default();
    changes.event(kind, step, data);
    changes.write(tx, run_id).map(drop)
}

/// Changes to a run whose lock the caller holds, gathered and then written in one
/// statement by [`Changes::write`]: its steps' changes, its events in order (numbered from
/// the run's `event_seq`, with a delivery for every webhook told of one), and its status.
/// The run's row is updated once, however many events there are.
#[derive(Debug, Default)]
pub struct Changes {
    pub(crate) status: Option<RunStatus>,
    pub(crate) started: bool,
    /// The steps' changes: `{key, status, error, deadline_s, lease_s}`.
    pub(crate) steps: Vec<Value>,
    /// `{kind, step, data, told}`, `told` the webhook event type or `null`.
    pub(crate) events: Vec<Value>,
    /// Whether any event is told to webhooks.
    pub(crate) told: bool,
}

impl Changes {
    /// The run's status becomes `status`.
    pub fn set_status(&mut self, status: RunStatus) {
        self.status = Some(status);
    }

    /// The run starts now (`started_at`).
    pub fn start(&mut self) {
        self.started = true;
    }

    /// Appends an event; webhooks subscribed to its type are told of it.
    pub fn event(&mut self, kind: &str, step: Option<&str>, data: Value) {
        let told = webhook::event_type_of(kind);
        self.told |= told.is_some();
        self.events
            .push(serde_json::json!({"kind": kind, "step": step, "data": data, "told": told}));
    }

    /// A pending step is skipped for `reason` (its `error`).
    pub fn skip(&mut self, key: &str, reason: &Value) {
        self.steps
            .push(serde_json::json!({"key": key, "status": "skipped", "error": reason}));
    }

    /// A ready approval step waits for its decision until `timeout_s` from now.
    pub fn wait(&mut self, key: &str, timeout_s: f64) {
        self.steps
            .push(serde_json::json!({"key": key, "status": "waiting", "deadline_s": timeout_s}));
    }

    /// A ready step is claimed for an executor: a new attempt with a fresh lease of
    /// `lease_s`, inside an attempt deadline `deadline_s` from now.
    pub fn claim(&mut self, key: &str, deadline_s: f64, lease_s: f64) {
        self.steps
            .push(serde_json::json!({"key": key, "status": "running",
            "deadline_s": deadline_s, "lease_s": lease_s}));
    }

    /// Writes the changes in one statement; the steps claimed for executors, with their
    /// leases. A step that is not pending or ready any more (which the run's lock rules out)
    /// fails the write.
    pub fn write<C: Connection + ?Sized>(
        self,
        tx: &Tx<'_, C>,
        run_id: &str,
    ) -> Result<Vec<Claim>, ApiError> {
        if self.status.is_none() && !self.started && self.steps.is_empty() && self.events.is_empty()
        {
            return Ok(Vec::new());
        }
        let planned = self.steps.len();
        let mut params = vec![
            V::Uuid(run_id.into()),
            self.status.map_or(V::Null, |s| V::Text(s.as_str().into())),
            V::Bool(self.started),
            V::Json(Value::Array(self.events)),
        ];
        let steps = if planned == 0 {
            String::new()
        } else {
            params.push(V::Json(Value::Array(self.steps)));
            let set: Vec<String> = planned_step_columns(|column| format!("s.{column}"))
                .into_iter()
                .map(|(column, value)| format!("{column} = {value}"))
                .collect();
            format!(
                "changed as (
                    update run_steps s set {}, updated_at = now()
                    from {}
                    where s.run_id = $1 and s.step_key = p.key and s.status in ('pending', 'ready')
                    returning s.step_key, s.attempt, s.lease_id::text
                 ), ",
                set.join(", "),
                planned_steps("$5")
            )
        };
        let logged = log_events("$4", "r", "r.base", self.told);
        let answer = if planned == 0 {
            "select null, null, null where false"
        } else {
            "select step_key, attempt, lease_id from changed"
        };
        let rows = tx.query(
            &format!(
                "with {steps}r as (
                    update runs set event_seq = event_seq + jsonb_array_length($4),
                        status = coalesce($2::text, status),
                        started_at = case when $3 then now() else started_at end,
                        updated_at = case when $2::text is not null or $3 then now() else updated_at end
                    where run_id = $1
                    returning project_id, run_id, workflow_id, workflow_version, schedule_id, status, error,
                        tokens_in, tokens_out, cost_usd, event_seq - jsonb_array_length($4) as base
                 ){logged}
                 {answer}"
            ),
            &params,
        )?;
        if rows.len() != planned {
            return Err(ApiError::Internal(format!(
                "run {run_id}: {} of {planned} steps changed under the run's lock",
                rows.len()
            )));
        }
        let mut claimed = Vec::new();
        for r in &rows {
            if let Some(lease_id) = r.opt_text(2)? {
                claimed.push(Claim {
                    step_key: r.text(0)?,
                    attempt: r.int(1)?,
                    lease_id,
                });
            }
        }
        Ok(claimed)
    }
}

/// The planned changes of steps in SQL: `p`, the records of `param` (a `jsonb` array of
/// [`Changes`]' steps).
pub(crate) fn planned_steps(param: &str) -> String {
    format!(
        "jsonb_to_recordset({param}) as p(key text, status text, error jsonb, deadline_s float8, lease_s float8)"
    )
}

/// What a planned change `p` ([`planned_steps`]) makes of a step's columns, given the SQL of
/// each column's value before it (`old`): a skipped step gets its reason and keeps its
/// attempt and times; a waiting or claimed one starts an attempt (with its deadline); a
/// claimed one gets a fresh lease. With no change planned (`p` null) every column keeps
/// its value, so the start's insert and an advance's update share these.
pub(crate) fn planned_step_columns(old: impl Fn(&str) -> String) -> [(&'static str, String); 7] {
    [
        ("status", format!("coalesce(p.status, {})", old("status"))),
        (
            "error",
            format!(
                "case when p.status = 'skipped' then p.error else {} end",
                old("error")
            ),
        ),
        (
            "attempt",
            format!(
                "{} + case when p.status in ('waiting', 'running') then 1 else 0 end",
                old("attempt")
            ),
        ),
        (
            "lease_id",
            format!(
                "case when p.status = 'running' then gen_random_uuid() else {} end",
                old("lease_id")
            ),
        ),
        (
            "deadline_at",
            format!(
                "coalesce(now() + make_interval(secs => p.deadline_s), {})",
                old("deadline_at")
            ),
        ),
        (
            "lease_expires_at",
            format!(
                "coalesce(now() + make_interval(secs => p.lease_s), {})",
                old("lease_expires_at")
            ),
        ),
        (
            "started_at",
            format!(
                "case when p.status in ('waiting', 'running') then coalesce({0}, now()) else {0} end",
                old("started_at")
            ),
        ),
    ]
}

/// The common table expressions that log the events of `events` (SQL: a `jsonb` array of
/// [`Changes`]' events) for `run` (a common table expression with the run's columns),
/// numbered on from `base` (SQL), and, when `told`, queue the deliveries of those webhooks
/// are told of, in the events' order: `, ev as (..), logged as (..)[, told as (..)]`.
pub(crate) fn log_events(events: &str, run: &str, base: &str, told: bool) -> String {
    let told = if told {
        let deliveries = outbox::insert_deliveries(
            "ev.told",
            "r.project_id",
            &outbox::run_event_data("ev.step", "ev.data"),
            &format!(", {run} r, ev"),
        );
        format!(", told as ({deliveries} order by ev.n)")
    } else {
        String::new()
    };
    format!(
        ", ev as (
            select e.n, e.value->>'kind' as kind, e.value->>'step' as step, e.value->'data' as data,
                e.value->>'told' as told
            from jsonb_array_elements({events}) with ordinality as e(value, n)
         ), logged as (
            insert into run_events (run_id, seq, kind, step_key, data)
            select {run}.run_id, {base} + ev.n, ev.kind, ev.step, ev.data from {run}, ev
         ){told}"
    )
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
