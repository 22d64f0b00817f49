//! Runs (API.md "Runs"): start a workflow at its current (or a chosen) version with an input
//! checked against the workflow's `input_schema`, list and inspect runs with their totals,
//! their steps and their ordered event log, cancel, retry and approve them. Each change is
//! the engine's, and the request advances the run in the same transaction and dispatches
//! the steps it made ready.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Row, Tx, Value as V, utc};
use sparkops_core::error::ApiError;
use sparkops_core::ids::parse_uuid;
use sparkops_core::input::Body;
use sparkops_core::roles::Action;
use sparkops_core::status;
use sparkops_core::time::parse_rfc3339;
use sparkops_platform::db::Db;
use sparkops_platform::engine::{self, Cancel, NewRun, Origin, Pause, RunStatus};
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, BodyStream, Ctx, Principal, ProjectAccess, Served};
use sparkops_platform::resource::{page_reply, project_of_request};
use spin_sdk::http::{IncomingRequest, Method, ResponseOutparam};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest, out: ResponseOutparam) {
    pipeline::serve_streaming(req, out, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Served, ApiError> {
    let who = ctx.authenticate(req)?;
    let segments = req.segments("/api/v1/runs").unwrap_or_default();
    let wants_stream = req
        .header("accept")
        .is_some_and(|a| a.contains("text/event-stream"));
    match (&req.method, segments.as_slice()) {
        (Method::Get, [id, "events"]) if wants_stream => stream_events(ctx, req, &who, id),
        _ => route_reply(ctx, req, &who, &segments).map(Served::Reply),
    }
}

fn route_reply(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    segments: &[&str],
) -> Result<Reply, ApiError> {
    match (&req.method, segments) {
        (Method::Get, []) => list(ctx, req, who),
        (Method::Post, []) => create(ctx, req, who),
        (Method::Get, [id]) => get(ctx, who, id),
        (Method::Patch, [id, "cancel"]) => cancel(ctx, who, id),
        (Method::Post, [id, "retry"]) => retry(ctx, req, who, id),
        (Method::Post, [id, "pause"]) => pause(ctx, who, id, true),
        (Method::Post, [id, "resume"]) => pause(ctx, who, id, false),
        (Method::Get, [id, "steps"]) => steps(ctx, who, id),
        (Method::Get, [id, "events"]) => events(ctx, req, who, id),
        (Method::Post, [id, "steps", key, "approve"]) => approve(ctx, req, who, id, key),
        (_, [_, "steps", _, "approve"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["POST"],
        }),
        (_, []) => Err(ApiError::MethodNotAllowed {
            allow: vec!["GET", "POST"],
        }),
        (_, [_]) | (_, [_, "steps" | "events"]) => {
            Err(ApiError::MethodNotAllowed { allow: vec!["GET"] })
        }
        (_, [_, "cancel"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["PATCH"],
        }),
        (_, [_, "retry" | "pause" | "resume"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["POST"],
        }),
        _ => Err(ApiError::NotFound(format!("no route {}", req.path))),
    }
}

/// The columns [`run_json`] reads, over `r` (a `runs` row), with the run's steps counted
/// by status by `$steps` (a `jsonb` SQL expression).
macro_rules! run_columns {
    ($steps:expr) => {
        concat!(
            "r.run_id::text, r.project_id::text, r.workflow_id::text, r.workflow_version, r.status, \
             r.input, r.output, r.error, r.retry_of::text, r.schedule_id::text, \
             (r.scheduled_for at time zone 'UTC'), r.tokens_in, r.tokens_out, r.cost_usd::text, r.unpriced_calls, \
             (r.started_at at time zone 'UTC'), (r.finished_at at time zone 'UTC'), \
             (r.created_at at time zone 'UTC'), (r.updated_at at time zone 'UTC'), ",
            $steps,
            ", (r.payloads_pruned_at at time zone 'UTC'), r.trigger_id::text, (r.paused_at at time zone 'UTC'), \
             r.max_cost_usd::text, r.reserved_usd::text, r.estimated_usd::text"
        )
    };
}

const RUN_COLUMNS: &str = run_columns!(
    "(select coalesce(jsonb_object_agg(s.status, s.n), '{}'::jsonb) from \
        (select status, count(*) as n from run_steps where run_id = r.run_id group by status) s)"
);

/// [`RUN_COLUMNS`] of a run as it starts, for [`engine::start_advanced`]'s answer.
const QUEUED_RUN_COLUMNS: &str = run_columns!("queued.steps");

/// The number of columns in [`RUN_COLUMNS`].
const RUN_WIDTH: usize = 26;

fn run_json(row: &Row) -> Result<Value, ApiError> {
    let duration_ms = match (row.opt_timestamp(15)?, row.opt_timestamp(16)?) {
        (Some(s), Some(f)) => Some((f - s).num_milliseconds()),
        _ => None,
    };
    Ok(json!({
        "id": row.text(0)?,
        "project_id": row.text(1)?,
        "workflow_id": row.text(2)?,
        "workflow_version": row.int(3)?,
        "status": row.text(4)?,
        "input": row.json(5)?,
        "output": row.json(6)?,
        "error": row.json(7)?,
        "retry_of": row.opt_text(8)?,
        "schedule_id": row.opt_text(9)?,
        "scheduled_for": row.time_json(10)?,
        "tokens_in": row.int(11)?,
        "tokens_out": row.int(12)?,
        "cost_usd": row.usd(13)?.to_fixed(),
        "unpriced_calls": row.int(14)?,
        "started_at": row.time_json(15)?,
        "finished_at": row.time_json(16)?,
        "duration_ms": duration_ms,
        "created_at": row.time_json(17)?,
        "updated_at": row.time_json(18)?,
        "steps": row.json(19)?,
        // Set once retention has removed the steps' inputs and outputs.
        "payloads_pruned_at": row.time_json(20)?,
        // Set for a run an event trigger started (`POST /hooks/{trigger_id}`).
        "trigger_id": row.opt_text(21)?,
        "paused_at": row.time_json(22)?,
        // The run's own hard budget, and what its calls in flight hold of it.
        "max_cost_usd": row.opt_usd(23)?.map(|c| c.to_fixed()),
        "reserved_usd": row.usd(24)?.to_fixed(),
        // The estimated price of its unpriced calls whose provider reported no usage.
        "estimated_usd": row.usd(25)?.to_fixed(),
    }))
}

/// The run `id` and its project, through the caller's membership with `action`.
fn access(
    ctx: &mut Ctx,
    who: &Principal,
    id: &str,
    action: Action,
) -> Result<(String, ProjectAccess), ApiError> {
    let id = parse_uuid(id, "run")?;
    let not_found = || ApiError::NotFound(format!("no run {id}"));
    let rows = ctx.db()?.query(
        "select project_id::text from runs where run_id = $1",
        &[V::Uuid(id.clone())],
    )?;
    let project = rows
        .first()
        .map(|r| r.text(0))
        .transpose()?
        .ok_or_else(not_found)?;
    let access = ctx.project(who, &project, action).map_err(|e| match e {
        ApiError::NotFound(_) => not_found(),
        other => other,
    })?;
    ctx.log_run(&id);
    Ok((id, access))
}

fn load(tx: &Tx<'_, Db>, id: &str) -> Result<Value, ApiError> {
    let rows = tx.query(
        &format!("select {RUN_COLUMNS} from runs r where r.run_id = $1"),
        &[V::Uuid(id.into())],
    )?;
    run_json(
        rows.first()
            .ok_or_else(|| ApiError::internal("the run just written is gone"))?,
    )
}

/// The run, its project's membership of the caller and its trace export in one query.
fn get(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let id = parse_uuid(id, "run")?;
    let not_found = || ApiError::NotFound(format!("no run {id}"));
    let rows = ctx.db()?.query(
        &format!(
            "select {RUN_COLUMNS}, m.role, t.status, t.attempts, t.last_error, {}
             from runs r
             join projects p on p.project_id = r.project_id and p.deleted_at is null
             left join memberships m on m.project_id = r.project_id and m.user_id = $2
             left join trace_exports t on t.run_id = r.run_id
             where r.run_id = $1",
            utc("t.exported_at")
        ),
        &[V::Uuid(id.clone()), V::Uuid(who.user_id.clone())],
    )?;
    let row = rows.first().ok_or_else(not_found)?;
    let member_role = row.opt_text(RUN_WIDTH)?;
    ctx.grant(who, &row.text(1)?, member_role.as_deref(), Action::Read)
        .map_err(|e| match e {
            ApiError::NotFound(_) => not_found(),
            other => other,
        })?;
    ctx.log_run(&id);
    let mut run = run_json(row)?;
    // Set when the run's project exports traces.
    run["trace_export"] = match row.opt_text(RUN_WIDTH + 1)? {
        None => Value::Null,
        Some(status) => json!({
            "status": status,
            "attempts": row.int(RUN_WIDTH + 2)?,
            "last_error": row.opt_text(RUN_WIDTH + 3)?,
            "exported_at": row.time_json(RUN_WIDTH + 4)?,
        }),
    };
    Ok(Reply::ok(run))
}

fn list(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<Reply, ApiError> {
    let access = project_of_request(ctx, who, req.query_param("project_id"), Action::Read)?;
    let page = req.page()?;
    let mut sql = format!(
        "select {RUN_COLUMNS} from runs r where r.project_id = $1 and ($2::uuid is null or r.run_id < $2::uuid)"
    );
    let mut params = vec![
        V::Uuid(access.project_id),
        page.before.clone().map(V::Uuid).unwrap_or(V::Null),
    ];
    for (param, column) in [
        ("workflow_id", "r.workflow_id"),
        ("schedule_id", "r.schedule_id"),
        ("trigger_id", "r.trigger_id"),
    ] {
        if let Some(raw) = req.query_param(param) {
            params.push(V::Uuid(parse_uuid(&raw, param)?));
            sql += &format!(" and {column} = ${}", params.len());
        }
    }
    if let Some(status) = req.query_param("status") {
        if RunStatus::parse(&status).is_none() {
            return Err(ApiError::field(
                "status",
                format!("must be one of {}", status::names(RunStatus::ALL)),
            ));
        }
        params.push(V::Text(status));
        sql += &format!(" and r.status = ${}", params.len());
    }
    for (param, op) in [("created_after", ">"), ("created_before", "<")] {
        if let Some(raw) = req.query_param(param) {
            let t = parse_rfc3339(&raw)
                .ok_or_else(|| ApiError::field(param, "must be an RFC 3339 time"))?;
            params.push(V::Timestamp(t));
            sql += &format!(" and r.created_at {op} ${}{AS_TIMESTAMPTZ}", params.len());
        }
    }
    params.push(V::Int64(page.limit + 1));
    sql += &format!(" order by r.run_id desc limit ${}", params.len());
    let rows = ctx.db()?.query(&sql, &params)?;
    page_reply(&page, &rows, run_json)
}

fn create(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<Reply, ApiError> {
    let mut b = Body::parse(&req.body)?;
    let workflow_id = b.opt_uuid("workflow_id");
    if workflow_id.is_none() && b.is_clean() {
        b.error("workflow_id", "is required");
    }
    let input = b.opt_value("input").unwrap_or_else(|| json!({}));
    let version = b.opt_int("version", 1..=i32::MAX as i64);
    let max_cost_usd = b.opt_usd("max_cost_usd");
    b.finish()?;
    let workflow_id = workflow_id.ok_or_else(ApiError::unchecked_field)?;
    let not_found = || ApiError::NotFound(format!("no workflow {workflow_id}"));
    // The workflow and the caller's membership of its project in one read.
    let found = engine::start::workflow_for(
        ctx.db()?,
        &workflow_id,
        version.map(|v| v as i32),
        Some(&who.user_id),
    )?
    .ok_or_else(not_found)?;
    ctx.grant(
        who,
        &found.project_id,
        found.member_role.as_deref(),
        Action::Write,
    )
    .map_err(|e| match e {
        ApiError::NotFound(_) => not_found(),
        other => other,
    })?;
    let workflow = found.workflow?;
    let mut claimed = Vec::new();
    let reply = ctx.create_once(req, who, |tx, ctx| {
        let id = ctx.new_id();
        let run = NewRun {
            run_id: &id,
            workflow: &workflow,
            input: &input,
            origin: Origin::Api {
                user_id: &who.user_id,
            },
            now: ctx.now,
            max_cost_usd,
        };
        let reply;
        (reply, claimed) = start(tx, &run)?;
        Ok(reply)
    })?;
    if let Some(id) = reply.body.as_ref().and_then(|b| b["id"].as_str()) {
        ctx.log_run(id);
        ctx.dispatch(id, &claimed);
    }
    Ok(reply)
}

/// Starts `run` and advances it in the same transaction, so its first steps are dispatched
/// from this request, not through the nudge channel; the `201` shows the run as it started
/// (queued), and the steps claimed.
fn start(tx: &Tx<'_, Db>, run: &NewRun<'_>) -> Result<(Reply, Vec<engine::Claim>), ApiError> {
    let started = engine::start_advanced(tx, run, Some(QUEUED_RUN_COLUMNS))?;
    let row = started
        .answer
        .ok_or_else(|| ApiError::internal("the start answered nothing"))?;
    let location = format!("/api/v1/runs/{}", run.run_id);
    Ok((Reply::created(run_json(&row)?, location), started.claimed))
}

fn cancel(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = access(ctx, who, id, Action::Write)?;
    // Cancelling twice is the same request: the second finds the run cancelling (or
    // cancelled) already and answers as the first did.
    let run = ctx.transaction(|tx, _| {
        let cancelled = engine::cancel(tx, &id, json!({}))?;
        let run = load(tx, &id)?;
        // The run as the request left it (cancelling); the advance in the same
        // transaction then cancels what is left.
        if cancelled == Cancel::Cancelling {
            engine::advance(tx, &id)?;
        }
        match cancelled {
            Cancel::Cancelling | Cancel::Already => Ok(run),
            Cancel::Finished(status) => {
                Err(ApiError::Conflict(format!("the run is already {status}")))
            }
            Cancel::NotFound => Err(ApiError::NotFound(format!("no run {id}"))),
        }
    })?;
    Ok(Reply::json(202, run))
}

/// `POST /runs/{id}/pause` and `/resume`: a paused run starts no new step (running ones
/// finish and are recorded) and its timeouts stand still; resumed, it continues where it
/// stopped. Pausing a paused run, or resuming a running one, is the same request again.
fn pause(ctx: &mut Ctx, who: &Principal, id: &str, pausing: bool) -> Result<Reply, ApiError> {
    let (id, _) = access(ctx, who, id, Action::Write)?;
    let data = json!({"by": who.user_id});
    let mut claimed = Vec::new();
    let run = ctx.transaction(|tx, _| {
        let outcome = if pausing {
            engine::pause(tx, &id, data)?
        } else {
            engine::resume(tx, &id, data)?
        };
        match outcome {
            Pause::Done if !pausing => claimed = engine::advance(tx, &id)?,
            Pause::Done | Pause::Already => {}
            Pause::Not(status) => {
                let verb = if pausing { "paused" } else { "resumed" };
                return Err(ApiError::Conflict(format!(
                    "the run is {status}: it cannot be {verb}"
                )));
            }
            Pause::NotFound => return Err(ApiError::NotFound(format!("no run {id}"))),
        }
        load(tx, &id)
    })?;
    ctx.dispatch(&id, &claimed);
    Ok(Reply::ok(run))
}

/// `POST /runs/{id}/retry {from?}`: a new run of the same workflow version and input,
/// linked by `retry_of`. `from: "failed"` (the default) keeps what the run's succeeded steps
/// produced and runs the rest; `from: "start"` runs everything again. Only a finished run
/// is retried, and only an unsuccessful one from `failed`.
fn retry(ctx: &mut Ctx, req: &HttpRequest, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = access(ctx, who, id, Action::Write)?;
    let mut b = Body::parse_or_empty(&req.body)?;
    let from = b.one_of("from", &["failed", "start"], "failed");
    b.finish()?;
    let mut claimed = Vec::new();
    let reply = ctx.create_once(req, who, |tx, ctx| {
        let rows = tx.query(
            "select r.status, r.workflow_id::text, r.workflow_version, r.input, r.payloads_pruned_at is not null,
                r.max_cost_usd::text
             from runs r where r.run_id = $1",
            &[V::Uuid(id.clone())],
        )?;
        let row = rows
            .first()
            .ok_or_else(|| ApiError::internal("the run just locked is gone"))?;
        let (status, workflow_id, version, input, pruned) = (
            row.text(0)?,
            row.text(1)?,
            row.int(2)?,
            row.json(3)?,
            row.bool(4)?,
        );
        // A retry keeps the run's own budget, for its own spend.
        let max_cost_usd = row.opt_usd(5)?;
        let conflict = |m: String| Err(ApiError::Conflict(m));
        if RunStatus::parse(&status).is_some_and(|s| !s.is_final()) {
            return conflict(format!("the run is still {status}: retry it once it has ended"));
        }
        let Some(workflow) = engine::start::workflow(tx, &workflow_id, Some(version as i32))?
        else {
            return conflict("its workflow was deleted".into());
        };
        let mut reused = std::collections::HashMap::new();
        if from == "failed" {
            if status == "succeeded" {
                return conflict(
                    "the run succeeded: nothing failed to retry (retry it with from \"start\")".into(),
                );
            }
            if pruned {
                return conflict(
                    "the run's step outputs were removed by retention: retry it with from \"start\"".into(),
                );
            }
            let rows = tx.query(
                "select step_key, input, output from run_steps where run_id = $1 and status = 'succeeded'",
                &[V::Uuid(id.clone())],
            )?;
            for r in rows {
                reused.insert(r.text(0)?, (r.json(1)?, r.json(2)?));
            }
        }
        let new_id = ctx.new_id();
        let run = NewRun {
            run_id: &new_id,
            workflow: &workflow,
            input: &input,
            origin: Origin::Retry {
                user_id: &who.user_id,
                of: &id,
                from,
                reused,
            },
            now: ctx.now,
            max_cost_usd,
        };
        let reply;
        (reply, claimed) = start(tx, &run)?;
        Ok(reply)
    })?;
    if let Some(id) = reply.body.as_ref().and_then(|b| b["id"].as_str()) {
        ctx.log_run(id);
        ctx.dispatch(id, &claimed);
    }
    Ok(reply)
}

fn steps(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = access(ctx, who, id, Action::Read)?;
    let rows = ctx.db()?.query(
        &format!(
            "select step_key, kind, status, attempt, input, output, error, tokens_in, tokens_out, cost_usd::text,
                    {}, {}, duration_ms, {}
             from run_steps where run_id = $1 order by created_at, step_key",
            utc("started_at"),
            utc("finished_at"),
            utc("next_attempt_at")
        ),
        &[V::Uuid(id)],
    )?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "key": r.text(0)?,
                "kind": r.text(1)?,
                "status": r.text(2)?,
                "attempt": r.int(3)?,
                "input": r.json(4)?,
                "output": r.json(5)?,
                "error": r.json(6)?,
                "tokens_in": r.int(7)?,
                "tokens_out": r.int(8)?,
                "cost_usd": r.opt_text(9)?,
                "started_at": r.time_json(10)?,
                "finished_at": r.time_json(11)?,
                "duration_ms": r.int(12).ok(),
                "next_attempt_at": r.time_json(13)?,
            }))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Reply::ok(json!({"items": items})))
}

/// Where a reader of the event log continues: `?after=<seq>` or `Last-Event-ID`.
fn after(req: &HttpRequest) -> Result<i32, ApiError> {
    match req
        .query_param("after")
        .or_else(|| req.header("last-event-id").map(str::to_string))
    {
        None => Ok(0),
        Some(a) => a
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::field("after", "must be an event number")),
    }
}

/// Up to `limit` events of the run after `after`, in order.
fn events_after(ctx: &mut Ctx, id: &str, after: i32, limit: i64) -> Result<Vec<Value>, ApiError> {
    let rows = ctx.db()?.query(
        &format!(
            "select seq, kind, step_key, data, {} from run_events where run_id = $1 and seq > $2 order by seq limit $3",
            utc("created_at")
        ),
        &[V::Uuid(id.into()), V::Int32(after), V::Int64(limit)],
    )?;
    rows.iter()
        .map(|r| {
            Ok(json!({
                "seq": r.int(0)?,
                "kind": r.text(1)?,
                "step": r.opt_text(2)?,
                "data": r.json(3)?,
                "at": r.time_json(4)?,
            }))
        })
        .collect()
}

/// The ordered event log; `?after=<seq>` or `Last-Event-ID` continues from a position.
fn events(ctx: &mut Ctx, req: &HttpRequest, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = access(ctx, who, id, Action::Read)?;
    let after = after(req)?;
    let items = events_after(ctx, &id, after, 1000)?;
    Ok(Reply::ok(json!({"items": items})))
}

/// `GET /runs/{id}/events` with `Accept: text/event-stream`: the log as Server-Sent Events
/// (`id` is the event's number, `event` its kind, `data` the same JSON as the log's items),
/// live until the run has ended and its last event is sent. A client that reconnects with
/// `Last-Event-ID` continues after the last event it saw. While an agent that streams is
/// answering, its text arrives as `step.delta` events (`{step, iteration, delta}`, no `id`:
/// they are a live view, not part of the log).
fn stream_events(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    id: &str,
) -> Result<Served, ApiError> {
    let (id, _) = access(ctx, who, id, Action::Read)?;
    let after = after(req)?;
    Ok(Served::Stream(Box::new(EventStream {
        run_id: id,
        after,
        opened: std::time::Instant::now(),
        quiet_since: std::time::Instant::now(),
        live: std::collections::HashMap::new(),
        redis: None,
    })))
}

struct EventStream {
    run_id: String,
    after: i32,
    opened: std::time::Instant,
    quiet_since: std::time::Instant,
    /// For each step with a streaming call: that call's id and how much of its text was sent.
    live: std::collections::HashMap<String, (String, usize)>,
    redis: Option<spin_sdk::redis::Connection>,
}

impl EventStream {
    /// How often a live stream looks for new events.
    const POLL: std::time::Duration = std::time::Duration::from_millis(200);
    /// A comment line this often keeps idle connections (and proxies) open.
    const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);
    /// A stream this old ends; the client reconnects with `Last-Event-ID`.
    const LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);
}

impl EventStream {
    /// `step.delta` events for the text streaming calls added since the last look.
    fn deltas(&mut self) -> String {
        let mut chunk = String::new();
        for (step, live) in sparkops_platform::deltas::read(&mut self.redis, &self.run_id) {
            let (Some(call), Some(text)) = (live["call"].as_str(), live["text"].as_str()) else {
                continue;
            };
            let sent = match self.live.get(&step) {
                Some((c, sent)) if c == call => *sent,
                _ => 0,
            };
            let Some(delta) = text.get(sent..).filter(|d| !d.is_empty()) else {
                continue;
            };
            let data = json!({"step": step, "iteration": live["iteration"], "delta": delta});
            chunk += &format!("event: step.delta\ndata: {data}\n\n");
            self.live.insert(step, (call.to_string(), text.len()));
        }
        chunk
    }
}

impl BodyStream for EventStream {
    fn content_type(&self) -> &'static str {
        "text/event-stream"
    }

    fn next(&mut self, ctx: &mut Ctx) -> Result<Option<Vec<u8>>, ApiError> {
        loop {
            // The status first: an event committed after this read is still found below,
            // so the stream never ends before the run's last event.
            let rows = ctx.db()?.query(
                "select status in ('succeeded', 'failed', 'timed_out', 'cancelled') from runs where run_id = $1",
                &[V::Uuid(self.run_id.clone())],
            )?;
            let ended = rows.first().map(|r| r.bool(0)).transpose()?.unwrap_or(true);
            let events = events_after(ctx, &self.run_id, self.after, 100)?;
            let mut chunk = String::new();
            if let Some(last) = events.last() {
                self.after = last["seq"].as_i64().unwrap_or_default() as i32;
                for e in &events {
                    chunk += &format!(
                        "id: {}\nevent: {}\ndata: {}\n\n",
                        e["seq"],
                        e["kind"].as_str().unwrap_or_default(),
                        e
                    );
                }
            }
            if !ended {
                chunk += &self.deltas();
            }
            if !chunk.is_empty() {
                self.quiet_since = std::time::Instant::now();
                return Ok(Some(chunk.into_bytes()));
            }
            if ended || self.opened.elapsed() > Self::LIFETIME {
                return Ok(None);
            }
            // No connection is held while waiting.
            ctx.release_db();
            if self.quiet_since.elapsed() > Self::HEARTBEAT {
                self.quiet_since = std::time::Instant::now();
                return Ok(Some(b": keep-alive\n\n".to_vec()));
            }
            sparkops_platform::sleep(Self::POLL);
        }
    }
}

/// `POST /runs/{id}/steps/{key}/approve {approved, comment?}`: decides a waiting approval
/// step. Only the step's `approvers` may, when it names any; a decision is taken once.
fn approve(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    id: &str,
    key: &str,
) -> Result<Reply, ApiError> {
    let (id, project) = access(ctx, who, id, Action::Write)?;
    let mut b = Body::parse(&req.body)?;
    let approved = match b.opt_value("approved") {
        Some(Value::Bool(v)) => Some(v),
        _ => {
            b.error("approved", "must be true or false");
            None
        }
    };
    let comment = b.opt_str("comment", 2000);
    b.finish()?;
    let approved = approved.ok_or_else(ApiError::unchecked_field)?;
    let decision = engine::step::Decision {
        user_id: &who.user_id,
        approved,
        comment: comment.as_deref(),
        via: "api",
        administers: project.role.can(Action::Administer),
    };
    let step = ctx.transaction(|tx, _| {
        let (status, decision) = engine::step::decide_approval(tx, &id, key, &decision)?;
        let claimed = engine::advance(tx, &id)?;
        Ok((
            json!({"key": key, "status": status.as_str(), "decision": decision}),
            claimed,
        ))
    })?;
    ctx.dispatch(&id, &step.1);
    Ok(Reply::ok(step.0))
}
