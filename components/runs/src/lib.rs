//! Runs (API.md "Runs"): start a workflow at its current (or a chosen) version with an input
//! checked against the workflow's `input_schema`, list and inspect runs with their totals,
//! their steps and their ordered event log, and cancel them. The orchestrator advances
//! them; this component only records intent and nudges it.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Row, Tx, Value as V, utc};
use sparkops_core::error::ApiError;
use sparkops_core::ids::parse_uuid;
use sparkops_core::input::Body;
use sparkops_core::roles::Action;
use sparkops_core::time::{parse_rfc3339, rfc3339};
use sparkops_core::workflow;
use sparkops_platform::db::Db;
use sparkops_platform::engine::event;
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, Ctx, Principal, ProjectAccess};
use sparkops_platform::resource::{page_reply, project_of_request};
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    let segments = req.segments("/api/v1/runs").unwrap_or_default();
    match (&req.method, segments.as_slice()) {
        (Method::Get, []) => list(ctx, req, &who),
        (Method::Post, []) => create(ctx, req, &who),
        (Method::Get, [id]) => get(ctx, &who, id),
        (Method::Patch, [id, "cancel"]) => cancel(ctx, &who, id),
        (Method::Get, [id, "steps"]) => steps(ctx, &who, id),
        (Method::Get, [id, "events"]) => events(ctx, req, &who, id),
        (Method::Post, [id, "steps", key, "approve"]) => approve(ctx, req, &who, id, key),
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
        _ => Err(ApiError::NotFound(format!("no route {}", req.path))),
    }
}

const RUN_COLUMNS: &str = "r.run_id::text, r.project_id::text, r.workflow_id::text, r.workflow_version, r.status, \
     r.input, r.output, r.error, r.retry_of::text, r.schedule_id::text, \
     (r.scheduled_for at time zone 'UTC'), r.tokens_in, r.tokens_out, r.cost_usd::text, r.unpriced_calls, \
     (r.started_at at time zone 'UTC'), (r.finished_at at time zone 'UTC'), \
     (r.created_at at time zone 'UTC'), (r.updated_at at time zone 'UTC'), \
     (select coalesce(jsonb_object_agg(s.status, s.n), '{}'::jsonb) from \
        (select status, count(*) as n from run_steps where run_id = r.run_id group by status) s)";

/// A nullable time column as RFC 3339 or `null`.
fn time(row: &Row, i: usize) -> Result<Value, ApiError> {
    Ok(json!(row.opt_timestamp(i)?.map(rfc3339)))
}

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
        "scheduled_for": time(row, 10)?,
        "tokens_in": row.int(11)?,
        "tokens_out": row.int(12)?,
        "cost_usd": sparkops_core::money::Usd::parse(&row.text(13)?).map(|u| u.to_fixed()).map_err(ApiError::Server)?,
        "unpriced_calls": row.int(14)?,
        "started_at": time(row, 15)?,
        "finished_at": time(row, 16)?,
        "duration_ms": duration_ms,
        "created_at": time(row, 17)?,
        "updated_at": time(row, 18)?,
        "steps": row.json(19)?,
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
    Ok((id, access))
}

fn load(tx: &Tx<'_, Db>, id: &str) -> Result<Value, ApiError> {
    let rows = tx.query(
        &format!("select {RUN_COLUMNS} from runs r where r.run_id = $1"),
        &[V::Uuid(id.into())],
    )?;
    run_json(rows.first().ok_or(ApiError::Internal)?)
}

fn get(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = access(ctx, who, id, Action::Read)?;
    Ok(Reply::ok(ctx.transaction(|tx, _| load(tx, &id))?))
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
    ] {
        if let Some(raw) = req.query_param(param) {
            params.push(V::Uuid(parse_uuid(&raw, param)?));
            sql += &format!(" and {column} = ${}", params.len());
        }
    }
    if let Some(status) = req.query_param("status") {
        const STATUSES: [&str; 8] = [
            "queued",
            "running",
            "waiting",
            "succeeded",
            "failed",
            "timed_out",
            "cancelling",
            "cancelled",
        ];
        if !STATUSES.contains(&status.as_str()) {
            return Err(ApiError::field(
                "status",
                format!("must be one of {}", STATUSES.join(", ")),
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
    b.finish()?;
    let workflow_id = workflow_id.ok_or(ApiError::Internal)?;
    let not_found = || ApiError::NotFound(format!("no workflow {workflow_id}"));
    let rows = ctx.db()?.query(
        "select project_id::text, version, timeout_s from workflows where workflow_id = $1 and deleted_at is null",
        &[V::Uuid(workflow_id.clone())],
    )?;
    let row = rows.first().ok_or_else(not_found)?;
    let (project_id, current, timeout_s) = (row.text(0)?, row.int(1)?, row.int(2).ok());
    let access = ctx
        .project(who, &project_id, Action::Write)
        .map_err(|e| match e {
            ApiError::NotFound(_) => not_found(),
            other => other,
        })?;
    let version = version.unwrap_or(current);
    let rows = ctx.db()?.query(
        "select definition, input_schema from workflow_versions where workflow_id = $1 and version = $2",
        &[V::Uuid(workflow_id.clone()), V::Int32(version as i32)],
    )?;
    let row = rows.first().ok_or_else(|| {
        ApiError::field("version", format!("the workflow has no version {version}"))
    })?;
    let (definition, schema) = (row.json(0)?, row.json(1)?);
    if !schema.is_null()
        && let Err(problems) = sparkops_core::schema::validate(&schema, &input)
    {
        let errors: Vec<sparkops_core::error::FieldError> = problems
            .into_iter()
            .map(|(p, m)| sparkops_core::error::FieldError {
                field: format!("input{p}"),
                message: m,
            })
            .collect();
        return Err(ApiError::Validation {
            detail: errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            errors,
        });
    }
    let parsed = workflow::parse_saved(&definition).map_err(|e| {
        ApiError::Server(format!(
            "workflow {workflow_id} v{version} does not parse: {e:?}"
        ))
    })?;
    let reply = ctx.create_once(req, who, |tx, ctx| {
        let id = ctx.new_id();
        let deadline = timeout_s.map(|s| ctx.now + chrono::Duration::seconds(s));
        tx.execute(
            &format!(
                "insert into runs (run_id, project_id, workflow_id, workflow_version, input, created_by, deadline_at, created_at, updated_at)
                 values ($1, $2, $3, $4, $5, $6, $7{AS_TIMESTAMPTZ}, $8{AS_TIMESTAMPTZ}, $8{AS_TIMESTAMPTZ})"
            ),
            &[
                V::Uuid(id.clone()),
                V::Uuid(access.project_id.clone()),
                V::Uuid(workflow_id.clone()),
                V::Int32(version as i32),
                V::Json(input.clone()),
                V::Uuid(who.user_id.clone()),
                deadline.map(V::Timestamp).unwrap_or(V::Null),
                V::Timestamp(ctx.now),
            ],
        )?;
        for step in &parsed.steps {
            tx.execute(
                "insert into run_steps (run_id, step_key, kind) values ($1, $2, $3)",
                &[V::Uuid(id.clone()), V::Text(step.key.clone()), V::Text(step.kind.as_str().into())],
            )?;
        }
        event(tx, &id, "run.queued", None, json!({"workflow_version": version}))?;
        Ok(Reply::created(load(tx, &id)?, format!("/api/v1/runs/{id}")))
    })?;
    if let Some(id) = reply.body.as_ref().and_then(|b| b["id"].as_str()) {
        sparkops_platform::nudge::run(id);
    }
    Ok(reply)
}

fn cancel(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = access(ctx, who, id, Action::Write)?;
    // Cancelling twice is the same request: the second finds the run cancelling (or
    // cancelled) already and answers as the first did.
    let run = ctx.transaction(|tx, _| {
        let rows = tx.query(
            "update runs set status = 'cancelling', updated_at = now()
             where run_id = $1 and status in ('queued', 'running', 'waiting') returning status",
            &[V::Uuid(id.clone())],
        )?;
        let run = load(tx, &id)?;
        if !rows.is_empty() {
            event(tx, &id, "run.cancelling", None, json!({}))?;
        } else if run["status"] != "cancelling" && run["status"] != "cancelled" {
            return Err(ApiError::Conflict(format!(
                "the run is already {}",
                run["status"].as_str().unwrap_or("finished")
            )));
        }
        Ok(run)
    })?;
    sparkops_platform::nudge::run(&id);
    Ok(Reply::json(202, run))
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
                "started_at": time(r, 10)?,
                "finished_at": time(r, 11)?,
                "duration_ms": r.int(12).ok(),
                "next_attempt_at": time(r, 13)?,
            }))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Reply::ok(json!({"items": items})))
}

/// The ordered event log; `?after=<seq>` continues from a position.
fn events(ctx: &mut Ctx, req: &HttpRequest, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = access(ctx, who, id, Action::Read)?;
    let after = match req
        .query_param("after")
        .or_else(|| req.header("last-event-id").map(str::to_string))
    {
        None => 0,
        Some(a) => a
            .parse::<i32>()
            .map_err(|_| ApiError::field("after", "must be an event number"))?,
    };
    let rows = ctx.db()?.query(
        &format!(
            "select seq, kind, step_key, data, {} from run_events where run_id = $1 and seq > $2 order by seq limit 1000",
            utc("created_at")
        ),
        &[V::Uuid(id), V::Int32(after)],
    )?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "seq": r.int(0)?,
                "kind": r.text(1)?,
                "step": r.opt_text(2)?,
                "data": r.json(3)?,
                "at": time(r, 4)?,
            }))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Reply::ok(json!({"items": items})))
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
    let (id, _) = access(ctx, who, id, Action::Write)?;
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
    let approved = approved.ok_or(ApiError::Internal)?;
    let step = ctx.transaction(|tx, _| {
        let rows = tx.query(
            "select status from run_steps where run_id = $1 and step_key = $2 for update",
            &[V::Uuid(id.clone()), V::Text(key.into())],
        )?;
        let status = rows
            .first()
            .map(|r| r.text(0))
            .transpose()?
            .ok_or_else(|| ApiError::NotFound(format!("no step {key} in run {id}")))?;
        if status != "waiting" {
            return Err(ApiError::Conflict(format!(
                "the step is {status}, not waiting for an approval"
            )));
        }
        let definition = sparkops_platform::engine::definition(tx, &id)?;
        let approvers = definition
            .steps
            .iter()
            .find(|s| s.key == key)
            .and_then(|s| s.approval.as_ref())
            .map(|a| a.approvers.clone())
            .unwrap_or_default();
        if !approvers.is_empty() && !approvers.contains(&who.user_id) {
            return Err(ApiError::Forbidden("you are not an approver of this step".into()));
        }
        let decision = json!({"approved": approved, "by": who.user_id, "comment": comment});
        let (status, output, error, kind) = if approved {
            ("succeeded", V::Json(decision.clone()), V::Null, "step.approved")
        } else {
            let message = comment.clone().unwrap_or_else(|| "rejected".into());
            ("failed", V::Null, V::Json(json!({"kind": "rejected", "message": message})), "step.rejected")
        };
        tx.execute(
            "update run_steps set status = $3, output = $4, error = $5, finished_at = now(), updated_at = now(),
                duration_ms = (extract(epoch from now() - started_at) * 1000)::bigint
             where run_id = $1 and step_key = $2",
            &[V::Uuid(id.clone()), V::Text(key.into()), V::Text(status.into()), output, error],
        )?;
        event(tx, &id, kind, Some(key), decision.clone())?;
        Ok(json!({"key": key, "status": status, "decision": decision}))
    })?;
    sparkops_platform::nudge::run(&id);
    Ok(Reply::ok(step))
}
