//! A step's transitions after it was claimed: its attempt's result recorded (or its next
//! attempt scheduled), a model call's usage, its lease taken back when its host died, a
//! due retry woken, an approval decided or past its deadline. Each takes the run's lock
//! first and changes the step only from the status it expects, so a late or repeated
//! change finds nothing to do.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection, Tx, Value as V, rfc3339_sql};
use sparkops_core::error::ApiError;
use sparkops_core::money::Usd;
use sparkops_core::run;
use sparkops_core::status::{ErrorKind, RunStatus, StepStatus};
use sparkops_core::workflow::{RetryPolicy, StepKind};

use crate::advance::Claim;
use crate::advance::{self, Next};
use crate::policies::ToolScope;
use crate::store::{self, Changes, Known, Recording, event, json_or_null, lock_run};

/// An executor's hold on a step attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease<'a> {
    pub run_id: &'a str,
    pub step_key: &'a str,
    pub lease_id: &'a str,
}

/// The attempt a lease is for, while it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    pub attempt: i64,
    pub project_id: String,
    pub workflow_id: String,
}

/// The attempt `lease` is for and its run's project and workflow, when the lease still
/// holds (the step is running under it and it has not expired), and, in the same round
/// trip, the run as [`store::known`] reads it and, for a tool step, its [`ToolScope`]: what
/// the executor reads before it accepts a dispatched step and calls its tool.
pub fn leased_known<C: Connection + ?Sized>(
    db: &C,
    lease: &Lease<'_>,
) -> Result<Option<(Leased, Known, Option<ToolScope>)>, ApiError> {
    let read = store::known_from(
        db,
        lease.run_id,
        "select input, definition, steps, status, event_seq, project_id, workflow_id, attempt,
            scope
         from sparkops_run_known($1, $2, $3::text::uuid)",
        &[
            V::Uuid(lease.run_id.into()),
            V::Text(lease.step_key.into()),
            V::Text(lease.lease_id.into()),
        ],
    )?;
    let Some((known, also)) = read else {
        return Ok(None);
    };
    if also.0.get(2) == Some(&V::Null) {
        return Ok(None);
    }
    let leased = Leased {
        attempt: also.int(2)?,
        project_id: also.text(0)?,
        workflow_id: also.text(1)?,
    };
    // A scope that does not read (a policy stored before its rules' checks tightened) is
    // left for the step's own read, where it fails the step rather than the lease read.
    let scope = crate::policies::decode_tool_scope(&also.json(3)?).ok();
    Ok(Some((leased, known, scope)))
}

/// Renews the lease for another [`LEASE_MS`](crate::advance::LEASE_MS), never past the
/// attempt's deadline: the executor's heartbeat while a step runs. `false` when the lease
/// no longer holds (the step was cancelled, taken back or ended, or its deadline passed):
/// whatever the attempt still does will not be recorded, so its executor may stop.
pub fn renew<C: Connection + ?Sized>(db: &C, lease: &Lease<'_>) -> Result<bool, ApiError> {
    let renewed = db.execute(
        "update run_steps set lease_expires_at = least(now() + make_interval(secs => $4::float8 / 1000), deadline_at)
         where run_id = $1::text::uuid and step_key = $2 and status = 'running'
           and lease_id = $3::text::uuid and (deadline_at is null or deadline_at > now())",
        &[
            V::Text(lease.run_id.into()),
            V::Text(lease.step_key.into()),
            V::Text(lease.lease_id.into()),
            V::Float64(crate::advance::LEASE_MS as f64),
        ],
    )?;
    Ok(renewed == 1)
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
    /// No further attempt whatever the retry policy says (e.g. a policy refusal).
    pub final_attempt: bool,
    /// The least wait before another attempt that the other side asked for
    /// (`Retry-After`).
    pub retry_after_ms: Option<u64>,
    /// Not a failure but a hold: a budget refused a call and says to wait or to ask. The
    /// step waits with this record (why, and what the step needs to go on where it
    /// stopped: its `checkpoint`) instead of failing, and its attempt is not used up.
    pub hold: Option<Value>,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            final_attempt: false,
            retry_after_ms: None,
            hold: None,
        }
    }

    /// A hold, not a failure (see [`Failure::hold`]).
    pub fn held(message: impl Into<String>, hold: Value) -> Self {
        Self {
            hold: Some(hold),
            ..Self::new(ErrorKind::PolicyViolation, message).final_attempt()
        }
    }

    /// The same failure, with no further attempt.
    pub fn final_attempt(mut self) -> Self {
        self.final_attempt = true;
        self
    }

    pub fn error_json(&self) -> Value {
        json!({"kind": self.kind.as_str(), "message": self.message})
    }
}

/// How an attempt ended, as an executor reports it.
pub struct Attempt<'a> {
    pub lease: Lease<'a>,
    pub attempt: i64,
    /// The step's rendered input (`null` when it could not be rendered).
    pub input: Value,
    pub result: Result<Value, Failure>,
    pub duration_ms: i64,
    /// The step's retry policy.
    pub retry: &'a RetryPolicy,
    /// 0..=1, from the caller's randomness: spreads retries of many runs.
    pub jitter: f64,
}

/// What recording an attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Succeeded,
    /// Another attempt is scheduled.
    Retrying,
    Failed,
    /// A budget holds the step (it waits).
    Held,
    /// The lease was lost meanwhile (the run was cancelled or the step taken back): the
    /// step keeps its newer state.
    Discarded,
}

impl Recorded {
    pub fn as_str(self) -> &'static str {
        match self {
            Recorded::Succeeded => "succeeded",
            Recorded::Retrying => "retrying",
            Recorded::Failed => "failed",
            Recorded::Held => "held",
            Recorded::Discarded => "discarded",
        }
    }
}

/// Records an attempt's end, or schedules the next attempt when the retry policy allows
/// one, with its event; only while the lease holds.
pub fn record<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    a: &Attempt<'_>,
) -> Result<Recorded, ApiError> {
    lock_run(tx, a.lease.run_id)?;
    record_locked(tx, a)
}

/// Records the attempt as [`record`] does and, under the same lock, advances the run: the
/// executor's one transaction per result, whose claims it then dispatches itself. Nothing
/// is advanced for a discarded result (the step's newer state is someone else's change).
pub fn record_and_advance<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    a: &Attempt<'_>,
) -> Result<(Recorded, Vec<Claim>), ApiError> {
    let run = lock_run(tx, a.lease.run_id)?;
    let recorded = record_locked(tx, a)?;
    let claimed = match recorded {
        Recorded::Discarded => Vec::new(),
        _ => crate::advance::advance_locked(tx, a.lease.run_id, run)?,
    };
    Ok((recorded, claimed))
}

/// [`record_and_advance`] without the run's lock or a transaction, from `known`: the run
/// as the caller read it after its lease was granted, or as this wrote it for the step
/// before in a chain. The attempt, the advance it leads to (the run's end included) and
/// the claims are written in one statement, only if the run has not moved since (its
/// status and event count are still as read), which a chain's step finds unless another
/// branch, a person or the sweeper acted meanwhile.
///
/// The same statement reads the [`ToolScope`] of the first step it claims, when that step
/// calls a tool, for the caller to run next without a read of its own: `owner` is the run's
/// project and workflow.
pub fn record_and_advance_known<C: Connection + ?Sized>(
    db: &C,
    a: &Attempt<'_>,
    mut known: Known,
    owner: Owner<'_>,
) -> Result<Unlocked, ApiError> {
    let run_status = known.unmoved.status;
    let key = a.lease.step_key;
    let position =
        known.snapshot.steps.iter().position(|s| {
            s.key == key && s.status == StepStatus::Running && s.attempt == a.attempt
        });
    let (Some(position), false, RunStatus::Running | RunStatus::Waiting) =
        (position, is_hold(a), run_status)
    else {
        return Ok(Unlocked::UnderLock);
    };
    let (recording, error) = recording(a);
    let status = recording.status;
    let step = &mut known.snapshot.steps[position];
    step.status = status;
    step.output = a.result.as_ref().ok().cloned().unwrap_or(Value::Null);
    let mut changes = Changes::default();
    changes.event(
        &format!("step.{status}"),
        Some(key),
        attempt_event(a, &error),
    );
    match advance::decide(&known.snapshot, run_status, &mut changes) {
        Next::Ends(_) if status == StepStatus::Retrying => return Ok(Unlocked::UnderLock),
        Next::Ends((end, output, error)) => changes.end(end, output, error),
        Next::GoesOn => {}
    }
    let unmoved = known.unmoved;
    let order: Vec<String> = changes.claimed_keys().map(String::from).collect();
    let next_tool = order.first().and_then(|key| tool_of(&known, key));
    let after = known.after(&changes);
    let scope = next_tool
        .as_ref()
        .map(|(_, tool)| [owner.project_id, owner.workflow_id, tool.as_str()]);
    let Some((mut claimed, read)) =
        changes.write_if(db, a.lease.run_id, unmoved, &recording, scope)?
    else {
        return Ok(Unlocked::Moved);
    };
    claimed.sort_by_key(|c| order.iter().position(|k| *k == c.step_key));
    // The write has landed: a scope that does not read is left for the step's own read
    // (where it fails the step), never turned into a failed write.
    let next = next_tool.and_then(|(step_key, _)| {
        let scope = crate::policies::decode_tool_scope(&read).ok()?;
        Some(Box::new(Scoped { step_key, scope }))
    });
    Ok(Unlocked::Written {
        recorded: recorded(status),
        claimed,
        after,
        next,
    })
}

/// The run's project and workflow.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub project_id: &'a str,
    pub workflow_id: &'a str,
}

/// A claimed step with what it needs before its call, read with the claim.
#[derive(Debug)]
pub struct Scoped {
    pub step_key: String,
    pub scope: ToolScope,
}

/// Step `key` with its tool's id, when it calls a tool.
fn tool_of(known: &Known, key: &str) -> Option<(String, String)> {
    let step = known
        .snapshot
        .definition
        .steps
        .iter()
        .find(|s| s.key == key)?;
    let tool = step
        .tool_id
        .clone()
        .filter(|_| step.kind == StepKind::Tool)?;
    Some((key.to_string(), tool))
}

/// What [`record_and_advance_known`] came to.
#[derive(Debug)]
pub enum Unlocked {
    /// Written: how the attempt was recorded, the steps claimed (in the order decided),
    /// the run as written (to carry to the step claimed next), and, when the first step
    /// claimed calls a tool, that step with its scope.
    Written {
        recorded: Recorded,
        claimed: Vec<Claim>,
        after: Known,
        next: Option<Box<Scoped>>,
    },
    /// The run had moved since it was read: nothing was written. Read it again and retry,
    /// or record with [`record_and_advance`].
    Moved,
    /// Nothing was written: this attempt is recorded with [`record_and_advance`] (a hold, a
    /// retry in a run that ends, a run not running, or a step not running this attempt as
    /// read).
    UnderLock,
}

fn is_hold(a: &Attempt<'_>) -> bool {
    a.result.as_ref().err().is_some_and(|f| f.hold.is_some())
}

/// What an attempt's end makes of its step: succeeded, failed, or retrying after a wait
/// (ms) when it failed and the retry policy allows another attempt.
fn settles_as(a: &Attempt<'_>) -> (StepStatus, Option<u64>) {
    match &a.result {
        Ok(_) => (StepStatus::Succeeded, None),
        Err(f) => {
            let next = (!f.final_attempt)
                .then(|| run::retry_delay_ms(a.retry, a.attempt as u32, f.kind, a.jitter))
                .flatten()
                .map(|d| d.max(f.retry_after_ms.unwrap_or(0)));
            match next {
                Some(ms) => (StepStatus::Retrying, Some(ms)),
                None => (StepStatus::Failed, None),
            }
        }
    }
}

/// The data of an attempt's `step.<status>` event.
fn attempt_event(a: &Attempt<'_>, error: &Option<Value>) -> Value {
    let mut data = json!({"attempt": a.attempt, "duration_ms": a.duration_ms});
    if let Some(error) = error {
        data["error"] = error.clone();
    }
    data
}

fn recorded(status: StepStatus) -> Recorded {
    match status {
        StepStatus::Succeeded => Recorded::Succeeded,
        StepStatus::Retrying => Recorded::Retrying,
        _ => Recorded::Failed,
    }
}

fn record_locked<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    a: &Attempt<'_>,
) -> Result<Recorded, ApiError> {
    if let Err(Failure {
        hold: Some(hold), ..
    }) = &a.result
    {
        return hold_locked(tx, a, hold);
    }
    let (recording, error) = recording(a);
    let status = recording.status;
    let mut changes = Changes::default();
    changes.event(
        &format!("step.{status}"),
        Some(a.lease.step_key),
        attempt_event(a, &error),
    );
    if !changes.write_recorded(tx, a.lease.run_id, &recording)? {
        return Ok(Recorded::Discarded);
    }
    Ok(recorded(status))
}

/// What recording the attempt writes of its step (its status by [`settles_as`]), and its
/// error.
fn recording<'a>(a: &'a Attempt<'_>) -> (Recording<'a>, Option<Value>) {
    let (status, wait_ms) = settles_as(a);
    let error = a.result.as_ref().err().map(Failure::error_json);
    let recording = Recording {
        key: a.lease.step_key,
        lease_id: a.lease.lease_id,
        status,
        input: json_or_null(&a.input),
        output: a.result.as_ref().ok().map_or(V::Null, json_or_null),
        error: error.clone().map_or(V::Null, V::Json),
        duration_ms: a.duration_ms,
        wait_ms: wait_ms.unwrap_or(0),
    };
    (recording, error)
}

/// Holds the running step as `waiting` with `hold` (a budget's refusal that waits or asks),
/// its lease and deadline cleared and its attempt given back, with a `step.held` event; only
/// while the lease holds.
fn hold_locked<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    a: &Attempt<'_>,
    hold: &Value,
) -> Result<Recorded, ApiError> {
    let mut data = hold.clone();
    if let Some(h) = data.as_object_mut() {
        h.remove("checkpoint");
        h.insert("attempt".into(), json!(a.attempt));
    }
    let held = tx.execute(
        "update run_steps set status = 'waiting', hold = $4, input = $5, attempt = attempt - 1,
            lease_id = null, lease_expires_at = null, deadline_at = null, updated_at = now()
         where run_id = $1 and step_key = $2 and lease_id = $3 and status = 'running'",
        &[
            V::Uuid(a.lease.run_id.into()),
            V::Text(a.lease.step_key.into()),
            V::Uuid(a.lease.lease_id.into()),
            V::Json(hold.clone()),
            json_or_null(&a.input),
        ],
    )? == 1;
    if !held {
        return Ok(Recorded::Discarded);
    }
    // Through `event`, so webhooks subscribed to `budget.held` are told in the same statement.
    event(
        tx,
        a.lease.run_id,
        "step.held",
        Some(a.lease.step_key),
        data,
    )?;
    Ok(Recorded::Held)
}

/// A held step goes on: `ready` again (the next advance claims it; its executor finds the
/// hold's checkpoint and continues where it stopped), the hold marked with `resumed` (why,
/// and who decided, for an `ask`). `false` when it was not held any more.
pub fn resume_held<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    step_key: &str,
    resumed: Value,
) -> Result<bool, ApiError> {
    lock_run(tx, run_id)?;
    let woken = tx.execute(
        "update run_steps set status = 'ready', hold = hold || jsonb_build_object('resumed', $3::jsonb),
            updated_at = now()
         where run_id = $1 and step_key = $2 and status = 'waiting' and hold is not null",
        &[
            V::Uuid(run_id.into()),
            V::Text(step_key.into()),
            V::Json(resumed.clone()),
        ],
    )? == 1;
    if woken {
        event(tx, run_id, "step.resumed", Some(step_key), resumed)?;
    }
    Ok(woken)
}

/// One model call's usage.
pub struct Usage<'a> {
    pub model: &'a str,
    pub tokens_in: i64,
    pub tokens_out: i64,
    /// `None`: the model has no price (counted as an unpriced call, never as free).
    pub cost: Option<Usd>,
    /// For a call recorded as unpriced because its provider reported no usage: the price
    /// of its estimated tokens, which the run's own `max_cost_usd` counts as spent.
    pub estimated: Option<Usd>,
}

/// Adds a model call's tokens and cost to the step and the run, with a `model.called`
/// event carrying `data`.
pub fn add_usage<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    step_key: &str,
    usage: &Usage<'_>,
    data: Value,
) -> Result<(), ApiError> {
    let cost = usage.cost.map_or(V::Null, |c| V::Decimal(c.to_fixed()));
    if lock_run(tx, run_id)?.is_none() {
        return Ok(());
    }
    tx.execute(
        "update run_steps set tokens_in = tokens_in + $3, tokens_out = tokens_out + $4,
            cost_usd = case when $5::numeric is null then cost_usd else coalesce(cost_usd, 0) + $5::numeric end,
            model = $6
         where run_id = $1 and step_key = $2",
        &[
            V::Uuid(run_id.into()),
            V::Text(step_key.into()),
            V::Int64(usage.tokens_in),
            V::Int64(usage.tokens_out),
            cost.clone(),
            V::Text(usage.model.into()),
        ],
    )?;
    tx.execute(
        "update runs set tokens_in = tokens_in + $2, tokens_out = tokens_out + $3,
            cost_usd = cost_usd + coalesce($4::numeric, 0), unpriced_calls = unpriced_calls + $5,
            estimated_usd = estimated_usd + coalesce($6::numeric, 0)
         where run_id = $1",
        &[
            V::Uuid(run_id.into()),
            V::Int64(usage.tokens_in),
            V::Int64(usage.tokens_out),
            cost,
            V::Int32(i32::from(usage.cost.is_none())),
            usage
                .estimated
                .map_or(V::Null, |e| V::Decimal(e.to_fixed())),
        ],
    )?;
    event(tx, run_id, "model.called", Some(step_key), data)
}

/// What taking back an expired lease came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakenBack {
    /// The step is ready for another attempt.
    Again,
    /// No attempt left: the step failed with `timeout`.
    Failed,
    /// Not expired (any more) under the lock: recorded or taken back meanwhile.
    Nothing,
}

/// Takes back the step's lease when it expired before `at` (its host died mid-call): a new
/// attempt when the retry policy has one left (the lease's length stood in for the
/// backoff), else the step fails with a `timeout`.
pub fn take_back<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    step_key: &str,
    at: DateTime<Utc>,
) -> Result<TakenBack, ApiError> {
    if lock_run(tx, run_id)?.is_none() {
        return Ok(TakenBack::Nothing);
    }
    let rows = tx.query(
        &format!(
            "select attempt, coalesce(deadline_at < $3{AS_TIMESTAMPTZ}, false) from run_steps
             where run_id = $1 and step_key = $2
             and status = 'running' and lease_expires_at < $3{AS_TIMESTAMPTZ}"
        ),
        &[
            V::Uuid(run_id.into()),
            V::Text(step_key.into()),
            V::Timestamp(at),
        ],
    )?;
    let Some((attempt, overdue)) = rows
        .first()
        .map(|r| Ok::<_, ApiError>((r.int(0)?, r.bool(1)?)))
        .transpose()?
    else {
        return Ok(TakenBack::Nothing);
    };
    // A lease stops being renewed when its host dies, or at the attempt's deadline when
    // its executor lives but hangs.
    let why = if overdue {
        "the step ran past its timeout without an answer from its host"
    } else {
        "the step's host stopped answering before its lease ran out"
    };
    let retry = store::definition(tx, run_id)?
        .steps
        .into_iter()
        .find(|s| s.key == step_key)
        .map(|s| s.retry)
        .unwrap_or_default();
    let ids = [V::Uuid(run_id.into()), V::Text(step_key.into())];
    if run::retry_delay_ms(&retry, attempt as u32, ErrorKind::Timeout, 0.0).is_some() {
        tx.execute(
            "update run_steps set status = 'ready', lease_id = null, lease_expires_at = null, updated_at = now()
             where run_id = $1 and step_key = $2",
            &ids,
        )?;
        event(
            tx,
            run_id,
            "step.lease_expired",
            Some(step_key),
            json!({"attempt": attempt, "reason": why}),
        )?;
        return Ok(TakenBack::Again);
    }
    let error = Failure::new(ErrorKind::Timeout, why).error_json();
    let mut params = ids.to_vec();
    params.push(V::Json(error.clone()));
    tx.execute(
        "update run_steps set status = 'failed', error = $3, lease_id = null, lease_expires_at = null,
            finished_at = now(), updated_at = now(),
            duration_ms = (extract(epoch from now() - started_at) * 1000)::bigint
         where run_id = $1 and step_key = $2",
        &params,
    )?;
    event(
        tx,
        run_id,
        "step.failed",
        Some(step_key),
        json!({"attempt": attempt, "error": error}),
    )?;
    Ok(TakenBack::Failed)
}

/// A retry whose time has come goes back to `ready` (the next advance claims it as a new
/// attempt). `false` when it was not retrying any more.
pub fn wake_retry<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    step_key: &str,
) -> Result<bool, ApiError> {
    lock_run(tx, run_id)?;
    let woken = tx.execute(
        "update run_steps set status = 'ready', next_attempt_at = null, updated_at = now()
         where run_id = $1 and step_key = $2 and status = 'retrying'",
        &[V::Uuid(run_id.into()), V::Text(step_key.into())],
    )? == 1;
    if woken {
        event(tx, run_id, "step.retry_due", Some(step_key), json!({}))?;
    }
    Ok(woken)
}

/// An approval past its deadline fails with `timeout`. `false` when it was not waiting
/// any more.
pub fn expire_approval<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    step_key: &str,
) -> Result<bool, ApiError> {
    // A paused run's clock stands still: its resume moves the deadline on.
    if lock_run(tx, run_id)? == Some(RunStatus::Paused) {
        return Ok(false);
    }
    let error = Failure::new(
        ErrorKind::Timeout,
        "no decision before the approval deadline",
    )
    .error_json();
    let expired = tx.execute(
        "update run_steps set status = 'failed', finished_at = now(), updated_at = now(), error = $3
         where run_id = $1 and step_key = $2 and status = 'waiting'",
        &[
            V::Uuid(run_id.into()),
            V::Text(step_key.into()),
            V::Json(error),
        ],
    )? == 1;
    if expired {
        event(tx, run_id, "step.timed_out", Some(step_key), json!({}))?;
    }
    Ok(expired)
}

/// A project admin's decision on a step a budget holds with `ask`: approved, the step goes
/// on and its next call may pass that budget (once); rejected, it fails as `rejected`.
fn decide_hold<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    step_key: &str,
    d: &Decision<'_>,
    hold: &Value,
) -> Result<(StepStatus, Value), ApiError> {
    if hold["mode"] != "ask" {
        return Err(ApiError::Conflict(
            "the step waits for its budget to have room, not for a decision".into(),
        ));
    }
    if !d.administers {
        return Err(ApiError::Forbidden(
            "a budget's ask is decided by the project's admins".into(),
        ));
    }
    let decision = json!({"approved": d.approved, "by": d.user_id, "comment": d.comment,
        "via": d.via, "policy_id": hold["policy_id"], "estimate_usd": hold["estimate_usd"]});
    if d.approved {
        resume_held(tx, run_id, step_key, decision.clone())?;
        return Ok((StepStatus::Ready, decision));
    }
    let message = format!(
        "the project's admins refused to let the call pass budget `{}`: {}",
        hold["policy"].as_str().unwrap_or_default(),
        d.comment.unwrap_or("rejected")
    );
    let error = Failure::new(ErrorKind::Rejected, message).error_json();
    tx.execute(
        "update run_steps set status = 'failed', error = $3, finished_at = now(), updated_at = now(),
            duration_ms = (extract(epoch from now() - started_at) * 1000)::bigint
         where run_id = $1 and step_key = $2",
        &[
            V::Uuid(run_id.into()),
            V::Text(step_key.into()),
            V::Json(error),
        ],
    )?;
    event(
        tx,
        run_id,
        "step.rejected",
        Some(step_key),
        decision.clone(),
    )?;
    Ok((StepStatus::Failed, decision))
}

/// A person's decision on a waiting approval step.
pub struct Decision<'a> {
    /// The approver: a user id, or [`LINK_APPROVER`] for a link of a step that names no
    /// approvers.
    pub user_id: &'a str,
    pub approved: bool,
    pub comment: Option<&'a str>,
    /// `api` or `link`.
    pub via: &'a str,
    /// Whether the decider may administer the project (a budget's `ask` needs it).
    pub administers: bool,
}

/// Who decided through a link of a step that names no approvers.
pub const LINK_APPROVER: &str = "link";

/// Decides a waiting approval step for one approver. Only the step's `approvers` may, when
/// it names any, and each once. A rejection fails the step (`rejected`); approvals pass it
/// once `quorum` distinct approvers have approved (the output lists them), and until then
/// it keeps waiting. Returns the step's status after the decision, and the decision.
pub fn decide_approval<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    run_id: &str,
    step_key: &str,
    d: &Decision<'_>,
) -> Result<(StepStatus, Value), ApiError> {
    let no_step = || ApiError::NotFound(format!("no step {step_key} in run {run_id}"));
    lock_run(tx, run_id)?.ok_or_else(no_step)?;
    let rows = tx.query(
        "select status, hold from run_steps where run_id = $1 and step_key = $2",
        &[V::Uuid(run_id.into()), V::Text(step_key.into())],
    )?;
    let row = rows.first().ok_or_else(no_step)?;
    let status = store::step_status(row, 0)?;
    if status != StepStatus::Waiting {
        return Err(ApiError::Conflict(format!(
            "the step is {status}, not waiting for an approval"
        )));
    }
    // A step a budget holds waits for its budget, or (an `ask`) for an admin.
    let hold = row.json(1)?;
    if !hold.is_null() {
        return decide_hold(tx, run_id, step_key, d, &hold);
    }
    let approval = store::definition(tx, run_id)?
        .steps
        .into_iter()
        .find(|s| s.key == step_key)
        .and_then(|s| s.approval)
        .unwrap_or_default();
    let named = &approval.approvers;
    if !named.is_empty() && !named.iter().any(|a| a == d.user_id) {
        return Err(ApiError::Forbidden(
            "you are not an approver of this step".into(),
        ));
    }
    let recorded = tx.execute(
        "insert into run_step_approvals (run_id, step_key, approver, approved, comment, via)
         values ($1, $2, $3, $4, $5, $6) on conflict do nothing",
        &[
            V::Uuid(run_id.into()),
            V::Text(step_key.into()),
            V::Text(d.user_id.into()),
            V::Bool(d.approved),
            d.comment.map_or(V::Null, |c| V::Text(c.into())),
            V::Text(d.via.into()),
        ],
    )?;
    if recorded == 0 {
        return Err(ApiError::Conflict(
            "this approver has already decided on this step".into(),
        ));
    }
    let decision =
        json!({"approved": d.approved, "by": d.user_id, "comment": d.comment, "via": d.via});
    let approvals = tx.query(
        &format!(
            "select coalesce(jsonb_agg(jsonb_build_object('by', approver, 'comment', comment, 'via', via,
                    'at', {}) order by decided_at, approver), '[]'::jsonb)
             from run_step_approvals where run_id = $1 and step_key = $2 and approved",
            rfc3339_sql("decided_at")
        ),
        &[V::Uuid(run_id.into()), V::Text(step_key.into())],
    )?;
    let approvals = approvals
        .first()
        .map(|r| r.json(0))
        .transpose()?
        .unwrap_or_else(|| json!([]));
    let approved_by = approvals.as_array().map_or(0, Vec::len) as u32;
    let (status, output, error, kind) = if !d.approved {
        let failure = Failure::new(ErrorKind::Rejected, d.comment.unwrap_or("rejected"));
        (
            StepStatus::Failed,
            V::Null,
            V::Json(failure.error_json()),
            "step.rejected",
        )
    } else if approved_by >= approval.quorum {
        let mut output = decision.clone();
        output["approvals"] = approvals;
        (
            StepStatus::Succeeded,
            V::Json(output),
            V::Null,
            "step.approved",
        )
    } else {
        // Short of the quorum: the approval is recorded and the step keeps waiting.
        let mut data = decision.clone();
        data["approvals"] = json!(approved_by);
        data["quorum"] = json!(approval.quorum);
        event(tx, run_id, "step.approval_recorded", Some(step_key), data)?;
        return Ok((StepStatus::Waiting, decision));
    };
    tx.execute(
        "update run_steps set status = $3, output = $4, error = $5, finished_at = now(), updated_at = now(),
            duration_ms = (extract(epoch from now() - started_at) * 1000)::bigint
         where run_id = $1 and step_key = $2",
        &[
            V::Uuid(run_id.into()),
            V::Text(step_key.into()),
            V::Text(status.as_str().into()),
            output,
            error,
        ],
    )?;
    event(tx, run_id, kind, Some(step_key), decision.clone())?;
    Ok((status, decision))
}
