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
use sparkops_core::roles::Action;
use sparkops_core::status::{RunStatus, sql_array};
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
    if req.path == "/metrics" {
        return match req.method {
            Method::Get => prometheus(ctx, req),
            _ => Err(ApiError::MethodNotAllowed { allow: vec!["GET"] }),
        };
    }
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
    // Per kind, tool and model; `by=kind` folds the tools and models of a kind together
    // (its percentiles over all its steps, as the console's usage page shows them).
    let key = match req.query_param("by").as_deref() {
        None => "jsonb_build_object('kind', s.kind, 'tool_id', s.tool_id, 'model', s.model)",
        Some("kind") => "jsonb_build_object('kind', s.kind)",
        Some(_) => return Err(ApiError::field("by", "must be kind (or left out)")),
    };
    let (project, from, to) = scope(ctx, req, who)?;
    let shape = steps_of(key, "");
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
    // One pass: grouping sets give each group's figures (status null) and its counts by
    // status (status set) from the same sort.
    let rows = ctx.db()?.query(
        &format!(
            "select k, st, grouping(st), count(*), count(*) filter (where st = 'succeeded'),
                    count(*) filter (where st in {finals}), {p50}, {p95}, {p99},
                    coalesce(sum(tin), 0)::bigint, coalesce(sum(tout), 0)::bigint,
                    coalesce(sum(cost), 0)::text, coalesce(sum(unpriced), 0)::bigint
             from ({rows_sql}) x group by grouping sets ((k), (k, st)) order by k::text, grouping(st) desc",
            finals = shape.finals,
            p50 = pct(0.5),
            p95 = pct(0.95),
            p99 = pct(0.99),
        ),
        &params,
    )?;
    let mut items: Vec<Value> = Vec::new();
    for r in &rows {
        if r.int(2)? == 0 {
            // A status count of the group just opened.
            if let Some(Value::Object(item)) = items.last_mut()
                && let Some(Value::Object(statuses)) = item.get_mut("by_status")
            {
                statuses.insert(r.text(1)?, json!(r.int(3)?));
            }
            continue;
        }
        let (succeeded, finished) = (r.int(4)?, r.int(5)?);
        let cost = r.usd(11)?;
        let mut item = match r.json(0)? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        for (k, v) in [
            ("count", json!(r.int(3)?)),
            ("by_status", Value::Object(Map::new())),
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
                json!({"p50": r.int(6).ok(), "p95": r.int(7).ok(), "p99": r.int(8).ok()}),
            ),
            ("tokens_in", json!(r.int(9)?)),
            ("tokens_out", json!(r.int(10)?)),
            ("cost_usd", json!(cost.to_fixed())),
            ("unpriced_calls", json!(r.int(12)?)),
        ] {
            item.insert(k.into(), v);
        }
        items.push(Value::Object(item));
    }
    Ok(items)
}

/// Step duration histogram buckets, in seconds.
const BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// `GET /metrics` (operators, `Authorization: Bearer <metrics_token>`): the Prometheus text
/// exposition format. Components keep nothing between requests, so every figure is read
/// from the database at scrape time and stays right with any number of replicas.
fn prometheus(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let token = sparkops_platform::variable("metrics_token").unwrap_or_default();
    let given = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Constant-time comparison of equal-length strings; an unset token closes the endpoint.
    let same = token.len() == given.len()
        && token
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if token.is_empty() || !same {
        return Err(ApiError::Unauthenticated(
            "the metrics token is required".into(),
        ));
    }
    let db = ctx.db()?;
    let mut out = Exposition::default();
    let one =
        |sql: &str| -> Result<Vec<sparkops_core::db::Row>, ApiError> { Ok(db.query(sql, &[])?) };

    out.family("sparkops_runs_started_total", "counter", "Runs created.");
    for r in one("select count(*) from runs")? {
        out.sample("sparkops_runs_started_total", &[], r.int(0)? as f64);
    }
    out.counts(
        "sparkops_runs_finished_total",
        "counter",
        "Runs ended, by status.",
        "status",
        &one(&format!(
            "select s, (select count(*) from runs where status = s) from unnest({}) s",
            sql_array(RunStatus::FINAL)
        ))?,
    )?;
    out.counts(
        "sparkops_runs_active",
        "gauge",
        "Runs not finished, by status.",
        "status",
        &one(&format!(
            "select s, (select count(*) from runs where status = s) from unnest({}) s",
            sql_array(RunStatus::UNFINISHED)
        ))?,
    )?;
    out.counts(
        "sparkops_steps_held",
        "gauge",
        "Steps a blocking budget holds, by what they wait for (wait: the window or a raise; ask: an admin).",
        "mode",
        &one(
            "select m, (select count(*) from run_steps where status = 'waiting' and hold ->> 'mode' = m)
             from unnest(array['wait', 'ask']) m",
        )?,
    )?;
    out.counts(
        "sparkops_webhook_deliveries",
        "gauge",
        "Webhook deliveries kept (30 days), by status: pending ones are due or backing off.",
        "status",
        &one(
            "select s, (select count(*) from webhook_deliveries where status = s)
             from unnest(array['pending', 'delivered', 'failed']) s",
        )?,
    )?;
    out.family(
        "sparkops_step_duration_seconds",
        "histogram",
        "Durations of finished step attempts, by step kind.",
    );
    let buckets: Vec<String> = BUCKETS
        .iter()
        .map(|b| format!("count(*) filter (where duration_ms <= {})", b * 1000.0))
        .collect();
    for r in one(&format!(
        "select kind, {}, count(*), coalesce(sum(duration_ms), 0)::bigint from run_steps
         where duration_ms is not null group by kind order by kind",
        buckets.join(", ")
    ))? {
        let kind = r.text(0)?;
        for (i, le) in BUCKETS.iter().enumerate() {
            out.sample(
                "sparkops_step_duration_seconds_bucket",
                &[("kind", &kind), ("le", &le.to_string())],
                r.int(1 + i)? as f64,
            );
        }
        let count = r.int(1 + BUCKETS.len())? as f64;
        out.sample(
            "sparkops_step_duration_seconds_bucket",
            &[("kind", &kind), ("le", "+Inf")],
            count,
        );
        out.sample(
            "sparkops_step_duration_seconds_sum",
            &[("kind", &kind)],
            r.int(2 + BUCKETS.len())? as f64 / 1000.0,
        );
        out.sample(
            "sparkops_step_duration_seconds_count",
            &[("kind", &kind)],
            count,
        );
    }
    let by_model = one(
        "select model, coalesce(sum(tokens_in), 0)::bigint, coalesce(sum(tokens_out), 0)::bigint,
                coalesce(sum(cost_usd), 0)::text,
                count(*) filter (where cost_usd is null and tokens_in + tokens_out > 0)
         from run_steps where model is not null group by model order by model",
    )?;
    out.family(
        "sparkops_model_tokens_total",
        "counter",
        "Tokens used, by model and direction.",
    );
    for r in &by_model {
        let model = r.text(0)?;
        out.sample(
            "sparkops_model_tokens_total",
            &[("model", &model), ("direction", "in")],
            r.int(1)? as f64,
        );
        out.sample(
            "sparkops_model_tokens_total",
            &[("model", &model), ("direction", "out")],
            r.int(2)? as f64,
        );
    }
    out.family(
        "sparkops_model_cost_usd_total",
        "counter",
        "Cost of model calls in USD, by model.",
    );
    for r in &by_model {
        let cost: f64 = r.text(3)?.parse().unwrap_or(0.0);
        out.sample(
            "sparkops_model_cost_usd_total",
            &[("model", &r.text(0)?)],
            cost,
        );
    }
    out.family(
        "sparkops_model_unpriced_steps_total",
        "counter",
        "Steps that used a model without a price.",
    );
    for r in &by_model {
        out.sample(
            "sparkops_model_unpriced_steps_total",
            &[("model", &r.text(0)?)],
            r.int(4)? as f64,
        );
    }
    out.family(
        "sparkops_policy_violations_total",
        "counter",
        "Calls and steps refused by a policy.",
    );
    for r in one("select count(*) from run_events where kind = 'policy.violation'")? {
        out.sample("sparkops_policy_violations_total", &[], r.int(0)? as f64);
    }
    out.family(
        "sparkops_ready_steps",
        "gauge",
        "Steps ready and waiting to be claimed.",
    );
    out.family(
        "sparkops_oldest_ready_step_age_seconds",
        "gauge",
        "How long the oldest ready step has waited.",
    );
    for r in one(
        "select count(*), coalesce(extract(epoch from now() - min(updated_at)), 0)::float8::text
         from run_steps where status = 'ready'",
    )? {
        out.sample("sparkops_ready_steps", &[], r.int(0)? as f64);
        out.sample(
            "sparkops_oldest_ready_step_age_seconds",
            &[],
            r.text(1)?.parse().unwrap_or(0.0),
        );
    }
    out.counts(
        "sparkops_schedule_fires_total",
        "counter",
        "Schedule fire times, by outcome.",
        "outcome",
        &one(
            "select o, (select coalesce(sum(missed_count), 0) from schedule_fires where outcome = o)::bigint
             from unnest(array['started', 'skipped', 'refused', 'failed']) o",
        )?,
    )?;
    out.counts(
        "sparkops_trace_exports",
        "gauge",
        "Run traces waiting to be exported (pending) and given up (failed, kept 7 days).",
        "status",
        &one(
            "select s, (select count(*) from trace_exports where status = s)
             from unnest(array['pending', 'failed']) s",
        )?,
    )?;
    Ok(Reply::text(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        out.text,
    ))
}

/// The Prometheus text format, written family by family.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.text += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    /// A family with one sample per row: the label `label` from column 0, the count from
    /// column 1.
    fn counts(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        rows: &[sparkops_core::db::Row],
    ) -> Result<(), ApiError> {
        self.family(name, kind, help);
        for r in rows {
            self.sample(name, &[(label, &r.text(0)?)], r.int(1)? as f64);
        }
        Ok(())
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| {
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                format!("{k}=\"{v}\"")
            })
            .collect();
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.join(","))
        };
        self.text += &format!("{name}{labels} {value}\n");
    }
}
