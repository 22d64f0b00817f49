//! Reading and locking a run: its row lock, its event log, the definition it pinned and
//! its steps, decoded into structs.

use std::collections::HashMap;

use serde_json::Value;
use sparkops_core::db::{Connection, DbError, Read, Row, Tx, Value as V};
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

/// Changes to a run, gathered and then written in one statement by [`Changes::write`]
/// (the caller holds the run's lock) or [`Changes::write_if`] (it does not): its steps'
/// changes, its events in order (numbered from the run's `event_seq`, with a delivery for
/// every webhook told of one), its status and, when it ends, its end (output and error,
/// its unfinished steps cancelled, its trace queued for export). The run's row is updated
/// once, however many events there are.
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
    /// The run ends with this output and error (its final status in `status`).
    pub(crate) ending: Option<(Option<Value>, Value)>,
}

/// A step attempt's result, written with the changes it led to ([`Changes::write_if`]):
/// only while the step runs under `lease_id`.
#[derive(Debug)]
pub(crate) struct Recording<'a> {
    pub key: &'a str,
    pub lease_id: &'a str,
    pub status: StepStatus,
    pub input: V,
    pub output: V,
    pub error: V,
    pub duration_ms: i64,
    /// The wait before the next attempt (`retrying`).
    pub wait_ms: u64,
}

/// What [`Changes::write_if`] expects of the run: its status and event count as the caller
/// read them. Every change to a run or its steps logs an event or changes its status, so
/// a run that still has both has not moved.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unmoved {
    pub status: RunStatus,
    pub event_seq: i64,
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

    /// The run ends with `status` (a final one), after the changes gathered so far: its
    /// output and error are set, its steps not finished are cancelled, the end is its last
    /// event, and its trace is queued for export when its project exports traces.
    pub fn end(&mut self, status: RunStatus, output: Option<Value>, error: Value) {
        debug_assert!(status.is_final());
        self.status = Some(status);
        self.event(&format!("run.{status}"), None, error.clone());
        self.ending = Some((output, error));
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

    /// The keys of the steps these changes claim for executors, in the order claimed.
    pub(crate) fn claimed_keys(&self) -> impl Iterator<Item = &str> {
        self.steps
            .iter()
            .filter(|s| s["status"] == "running")
            .filter_map(|s| s["key"].as_str())
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
        let written = self.statement(|sql, p| tx.query(sql, p), run_id, None, None, None)?;
        let (claimed, _) =
            written.ok_or_else(|| ApiError::Internal(format!("run {run_id} is gone")))?;
        Ok(claimed)
    }

    /// Writes `recording` and the changes in one statement of its own, without the run's
    /// lock, only if the run is as `unmoved` says; the steps claimed, or `None` when the
    /// run had moved (nothing is written then). A step found other than expected (which
    /// an unmoved run rules out) fails the statement, so it writes all or nothing. With
    /// `scope` (project, workflow, tool), the same statement reads that tool's
    /// [`ToolScope`](crate::policies::ToolScope) for the step run next.
    pub(crate) fn write_if<C: Connection + ?Sized>(
        self,
        db: &C,
        run_id: &str,
        unmoved: Unmoved,
        recording: &Recording<'_>,
        scope: Option<[&str; 3]>,
    ) -> Result<Option<(Vec<Claim>, Value)>, ApiError> {
        self.statement(
            |sql, p| db.query(sql, p),
            run_id,
            Some(unmoved),
            Some(recording),
            scope,
        )
    }

    /// Writes `recording` and the changes in one call, under the run's lock (the caller
    /// holds it); `false`, with nothing written, when the lease no longer held.
    pub(crate) fn write_recorded<C: Connection + ?Sized>(
        self,
        tx: &Tx<'_, C>,
        run_id: &str,
        recording: &Recording<'_>,
    ) -> Result<bool, ApiError> {
        let written = self.statement(
            |sql, p| tx.query(sql, p),
            run_id,
            None,
            Some(recording),
            None,
        )?;
        Ok(written.is_some())
    }

    /// The one call of `sparkops_run_write` (migration 0021), run by `query`: the claims and
    /// the tool scope `scope` asks for (`null` without), or `None` when nothing was written.
    /// A function, not a statement composed here: Spin plans every statement it sends on
    /// every call, and a function's statements keep their plans for the server session.
    fn statement(
        self,
        query: impl FnOnce(&str, &[V]) -> Result<Vec<Row>, DbError>,
        run_id: &str,
        unmoved: Option<Unmoved>,
        recording: Option<&Recording<'_>>,
        scope: Option<[&str; 3]>,
    ) -> Result<Option<(Vec<Claim>, Value)>, ApiError> {
        // The steps that end with this call, kept from the cancelling of a run's end.
        let mut settled: Vec<Value> = self.steps.iter().map(|s| s["key"].clone()).collect();
        settled.extend(recording.map(|r| Value::String(r.key.into())));
        let (ending, output, error) = match self.ending {
            Some((output, error)) => (true, output.map_or(V::Null, V::Json), json_or_null(&error)),
            None => (false, V::Null, V::Null),
        };
        let unfinished = StepStatus::UNFINISHED
            .iter()
            .map(|s| Value::from(s.as_str()));
        let or_null = |v: Option<V>| v.unwrap_or(V::Null);
        let mut params = vec![
            V::Uuid(run_id.into()),
            or_null(self.status.map(|s| V::Text(s.as_str().into()))),
            V::Bool(self.started),
            V::Json(Value::Array(self.events)),
            V::Bool(self.told),
            or_null(unmoved.map(|u| V::Text(u.status.as_str().into()))),
            or_null(unmoved.map(|u| V::Int64(u.event_seq))),
            or_null(recording.map(|r| V::Text(r.key.into()))),
            or_null(recording.map(|r| V::Uuid(r.lease_id.into()))),
            or_null(recording.map(|r| V::Text(r.status.as_str().into()))),
            or_null(recording.map(|r| r.input.clone())),
            or_null(recording.map(|r| r.output.clone())),
            or_null(recording.map(|r| r.error.clone())),
            or_null(recording.map(|r| V::Int64(r.duration_ms))),
            or_null(recording.map(|r| V::Float64(r.wait_ms as f64))),
            V::Json(Value::Array(self.steps)),
            V::Bool(ending),
            output,
            error,
            V::Json(Value::Array(settled)),
            V::Json(unfinished.collect()),
        ];
        let placeholders: Vec<String> = (1..=params.len()).map(|i| format!("${i}")).collect();
        let also = match scope {
            Some(ids) => {
                let at = params.len();
                params.extend(ids.map(|id| V::Uuid(id.into())));
                let [p, w, t] = [1, 2, 3].map(|i| format!("${}", at + i));
                crate::policies::tool_scope_sql(&p, &w, &t)
            }
            None => "null::jsonb".into(),
        };
        let rows = query(
            &format!(
                "select sparkops_run_write({}), {also}",
                placeholders.join(", ")
            ),
            &params,
        )?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        match row.json(0)? {
            Value::Null => Ok(None),
            claimed => Ok(Some((claims(run_id, &claimed)?, row.json(1)?))),
        }
    }
}

/// The claims a statement answered as a `jsonb` array of `[step_key, attempt, lease_id]`.
pub(crate) fn claims(run_id: &str, answered: &Value) -> Result<Vec<Claim>, ApiError> {
    let bad = || ApiError::Internal(format!("run {run_id}: a claim does not read"));
    let Value::Array(items) = answered else {
        return Err(bad());
    };
    items
        .iter()
        .map(|c| {
            Ok(Claim {
                step_key: c[0].as_str().ok_or_else(bad)?.to_string(),
                attempt: c[1].as_i64().ok_or_else(bad)?,
                lease_id: c[2].as_str().ok_or_else(bad)?.to_string(),
            })
        })
        .collect()
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
/// its value. The start's insert uses these; an advance's update is `sparkops_run_write`'s
/// (migration 0021), which spells the same rules in SQL and is tested with them.
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
            &format!("{run} r, ev, "),
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

/// A run as read without its lock: its [`Snapshot`], with the status and event count it
/// had then, which a write without the lock checks it still has
/// ([`crate::step::record_and_advance_known`]).
#[derive(Debug)]
pub struct Known {
    pub snapshot: Snapshot,
    pub(crate) unmoved: Unmoved,
}

impl Known {
    /// The run as it is once `changes` (decided from this) are written.
    pub(crate) fn after(mut self, changes: &Changes) -> Known {
        for change in &changes.steps {
            let key = change["key"].as_str();
            let status = change["status"].as_str().and_then(StepStatus::parse);
            let step = self
                .snapshot
                .steps
                .iter_mut()
                .find(|s| Some(s.key.as_str()) == key);
            if let (Some(step), Some(status)) = (step, status) {
                step.status = status;
                if matches!(status, StepStatus::Waiting | StepStatus::Running) {
                    step.attempt += 1;
                }
            }
        }
        // A run's end cancels what had not finished.
        if changes.ending.is_some() {
            for step in &mut self.snapshot.steps {
                if StepStatus::UNFINISHED.contains(&step.status) {
                    step.status = StepStatus::Cancelled;
                }
            }
        }
        self.unmoved = Unmoved {
            status: changes.status.unwrap_or(self.unmoved.status),
            event_seq: self.unmoved.event_seq + changes.events.len() as i64,
        };
        self
    }
}

/// The run's input, pinned definition and steps, in one round trip.
pub fn snapshot<R: Read + ?Sized>(db: &R, run_id: &str) -> Result<Snapshot, ApiError> {
    known(db, run_id).map(|k| k.snapshot)
}

/// The run's [`Snapshot`] with its status and event count, in one round trip.
pub fn known<R: Read + ?Sized>(db: &R, run_id: &str) -> Result<Known, ApiError> {
    known_from(db, run_id, KNOWN, &[V::Uuid(run_id.into())])?
        .map(|(known, _)| known)
        .ok_or_else(|| ApiError::Internal(format!("run {run_id} has no pinned definition")))
}

/// The run as [`known`] reads it: the columns of `sparkops_run_known` that
/// [`known_from`] decodes, in its order (migration 0022).
const KNOWN: &str =
    "select input, definition, steps, status, event_seq from sparkops_run_known($1)";

/// The run as [`known`] reads it, from `statement`, whose row begins with [`KNOWN`]'s
/// columns; the rest of its row comes back beside it. `None` when there is no such run.
pub(crate) fn known_from<R: Read + ?Sized>(
    db: &R,
    run_id: &str,
    statement: &str,
    params: &[V],
) -> Result<Option<(Known, Row)>, ApiError> {
    let rows = db.read(statement, params)?;
    let Some(mut row) = rows.into_iter().next() else {
        return Ok(None);
    };
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
    let known = Known {
        snapshot: Snapshot {
            input: row.json(0)?,
            definition: parse_definition(run_id, &row.json(1)?)?,
            steps,
        },
        unmoved: Unmoved {
            status: run_status(&row, 3)?,
            event_seq: row.int(4)?,
        },
    };
    let also = Row(row.0.split_off(5));
    Ok(Some((known, also)))
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
