//! Metrics (API.md "Metrics"), computed in SQL over one project's runs in a time range
//! (`from` inclusive, `to` exclusive, by the run's creation; the last 30 days by default):
//!
//! - `GET /metrics/summary?group_by=day|workflow` (or none): runs by status, success rate,
//!   p50/p95/p99 duration, tokens in and out, cost and unpriced calls, per group;
//!   `group_by=agent|model` gives the same over the agent steps of those runs.
//! - `GET /metrics/steps`: the same per step kind, tool and model.
//!
//! Only the caller's project is ever counted. `runs_project_created_idx` and the steps'
//! primary key keep the scans to the project and the range.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::money::Usd;
use sparkops_core::roles::Action;
use sparkops_core::time::{parse_rfc3339, rfc3339};
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, Ctx, Principal};
use sparkops_platform::resource::project_of_request;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    let segments = req.segments("/api/v1/metrics").unwrap_or_default();
    match (&req.method, segments.as_slice()) {
        (Method::Get, ["summary"]) => summary(ctx, req, &who),
        (Method::Get, ["steps"]) => steps(ctx, req, &who),
        (_, ["summary" | "steps"]) => Err(ApiError::MethodNotAllowed { allow: vec!["GET"] }),
        _ => Err(ApiError::NotFound(format!("no route {}", req.path))),
    }
}

/// What is counted and how: a row source, the group key (a JSON object), and the columns
/// of each figure.
struct Shape {
    from: &'static str,
    key: &'static str,
    status: &'static str,
    duration_ms: &'static str,
    tokens_in: &'static str,
    tokens_out: &'static str,
    cost: &'static str,
    unpriced: &'static str,
    filter: &'static str,
    finals: &'static str,
}

const RUN_FINALS: &str = "('succeeded', 'failed', 'timed_out', 'cancelled')";
const STEP_FINALS: &str = "('succeeded', 'failed', 'cancelled')";

fn runs(key: &'static str) -> Shape {
    Shape {
        from: "runs r",
        key,
        status: "r.status",
        duration_ms: "(extract(epoch from r.finished_at - r.started_at) * 1000)::float8",
        tokens_in: "r.tokens_in",
        tokens_out: "r.tokens_out",
        cost: "r.cost_usd",
        unpriced: "r.unpriced_calls",
        filter: "",
        finals: RUN_FINALS,
    }
}

fn steps_of(key: &'static str, filter: &'static str) -> Shape {
    Shape {
        from: "run_steps s join runs r on r.run_id = s.run_id",
        key,
        status: "s.status",
        duration_ms: "(case when s.status in ('succeeded', 'failed') then s.duration_ms end)::float8",
        tokens_in: "s.tokens_in",
        tokens_out: "s.tokens_out",
        cost: "coalesce(s.cost_usd, 0)",
        unpriced: "(case when s.model is not null and s.cost_usd is null and s.tokens_in + s.tokens_out > 0 then 1 else 0 end)",
        filter,
        finals: STEP_FINALS,
    }
}

/// The project and the range of the request.
fn scope(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
) -> Result<(String, DateTime<Utc>, DateTime<Utc>), ApiError> {
    let access = project_of_request(ctx, who, req.query_param("project_id"), Action::Read)?;
    let time = |name: &str| -> Result<Option<DateTime<Utc>>, ApiError> {
        req.query_param(name)
            .map(|raw| {
                parse_rfc3339(&raw).ok_or_else(|| ApiError::field(name, "must be an RFC 3339 time"))
            })
            .transpose()
    };
    let to = time("to")?.unwrap_or(ctx.now);
    let from = time("from")?.unwrap_or(to - Duration::days(30));
    if from >= to {
        return Err(ApiError::field("from", "must be before `to`"));
    }
    Ok((access.project_id, from, to))
}

fn summary(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<Reply, ApiError> {
    let group_by = req.query_param("group_by");
    let shape = match group_by.as_deref() {
        None => runs("'{}'::jsonb"),
        Some("day") => runs(
            "jsonb_build_object('day', to_char(r.created_at at time zone 'UTC', 'YYYY-MM-DD'))",
        ),
        Some("workflow") => runs("jsonb_build_object('workflow_id', r.workflow_id)"),
        Some("agent") => steps_of(
            "jsonb_build_object('agent_id', s.agent_id)",
            "and s.kind = 'agent'",
        ),
        Some("model") => steps_of(
            "jsonb_build_object('model', s.model)",
            "and s.model is not null",
        ),
        Some(_) => {
            return Err(ApiError::field(
                "group_by",
                "must be one of day, agent, workflow, model",
            ));
        }
    };
    let (project, from, to) = scope(ctx, req, who)?;
    let items = aggregate(ctx, &shape, &project, from, to)?;
    let counted = if matches!(group_by.as_deref(), Some("agent" | "model")) {
        "steps"
    } else {
        "runs"
    };
    Ok(Reply::ok(json!({
        "project_id": project, "from": rfc3339(from), "to": rfc3339(to),
        "group_by": group_by, "counted": counted, "items": items,
    })))
}

fn steps(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<Reply, ApiError> {
    let (project, from, to) = scope(ctx, req, who)?;
    let shape = steps_of(
        "jsonb_build_object('kind', s.kind, 'tool_id', s.tool_id, 'model', s.model)",
        "",
    );
    let items = aggregate(ctx, &shape, &project, from, to)?;
    Ok(Reply::ok(json!({
        "project_id": project, "from": rfc3339(from), "to": rfc3339(to),
        "counted": "steps", "items": items,
    })))
}

/// One item per group: its key's fields, counts by status, success rate (succeeded of
/// those finished), duration percentiles, tokens, cost and unpriced calls.
fn aggregate(
    ctx: &mut Ctx,
    shape: &Shape,
    project: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<Value>, ApiError> {
    let rows_sql = format!(
        "select {key} as k, {status} as st, {dur} as dur, {tin} as tin, {tout} as tout, {cost} as cost,
                {unpriced} as unpriced
         from {from}
         where r.project_id = $1 and r.created_at >= $2{TS} and r.created_at < $3{TS} {filter}",
        key = shape.key,
        status = shape.status,
        dur = shape.duration_ms,
        tin = shape.tokens_in,
        tout = shape.tokens_out,
        cost = shape.cost,
        unpriced = shape.unpriced,
        from = shape.from,
        filter = shape.filter,
        TS = AS_TIMESTAMPTZ,
    );
    let params = [
        V::Uuid(project.into()),
        V::Timestamp(from),
        V::Timestamp(to),
    ];
    let pct = |p: f64| {
        format!(
            "round(percentile_cont({p}) within group (order by dur) filter (where dur is not null))::bigint"
        )
    };
    let figures = ctx.db()?.query(
        &format!(
            "select k, count(*), count(*) filter (where st = 'succeeded'),
                    count(*) filter (where st in {finals}), {p50}, {p95}, {p99},
                    coalesce(sum(tin), 0)::bigint, coalesce(sum(tout), 0)::bigint,
                    coalesce(sum(cost), 0)::text, coalesce(sum(unpriced), 0)::bigint
             from ({rows_sql}) x group by k order by k::text",
            finals = shape.finals,
            p50 = pct(0.5),
            p95 = pct(0.95),
            p99 = pct(0.99),
        ),
        &params,
    )?;
    let by_status = ctx.db()?.query(
        &format!("select k, st, count(*) from ({rows_sql}) x group by k, st"),
        &params,
    )?;
    figures
        .iter()
        .map(|r| {
            let key = r.json(0)?;
            let mut statuses = Map::new();
            for s in &by_status {
                if s.json(0)? == key {
                    statuses.insert(s.text(1)?, json!(s.int(2)?));
                }
            }
            let (succeeded, finished) = (r.int(2)?, r.int(3)?);
            let cost = Usd::parse(&r.text(9)?).map_err(ApiError::Server)?;
            let mut item = match key {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            for (k, v) in [
                ("count", json!(r.int(1)?)),
                ("by_status", Value::Object(statuses)),
                (
                    "success_rate",
                    if finished == 0 {
                        Value::Null
                    } else {
                        json!(succeeded as f64 / finished as f64)
                    },
                ),
                (
                    "duration_ms",
                    json!({"p50": r.int(4).ok(), "p95": r.int(5).ok(), "p99": r.int(6).ok()}),
                ),
                ("tokens_in", json!(r.int(7)?)),
                ("tokens_out", json!(r.int(8)?)),
                ("cost_usd", json!(cost.to_fixed())),
                ("unpriced_calls", json!(r.int(10)?)),
            ] {
                item.insert(k.into(), v);
            }
            Ok(Value::Object(item))
        })
        .collect()
}
