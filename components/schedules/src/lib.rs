//! Schedules (API.md "Schedules"): a workflow started on a cron expression read in an IANA
//! time zone, with an overlap policy and a catch-up window. This component defines them and
//! answers their next fire times; the scheduler component fires them.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use sparkops_core::cron::Schedule as Cron;
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Row, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::input::Body;
use sparkops_core::roles::Action;
use sparkops_core::time::rfc3339;
use sparkops_platform::db::Db;
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, Ctx, Principal, Work};
use sparkops_platform::resource::{self, Filter, FilterType, Resource, Write, common_json};
use sparkops_platform::resource_columns;
use sparkops_platform::schedule_fire::{self, Fired};
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    let segments = req.segments(Schedule::PATH).unwrap_or_default();
    match (&req.method, segments.as_slice()) {
        (Method::Get, [id, "next"]) => next(ctx, req, &who, id),
        (Method::Get, [id, "fires"]) => fires(ctx, req, &who, id),
        (Method::Post, [id, "trigger"]) => trigger(ctx, req, &who, id),
        (_, [_, "next" | "fires"]) => Err(ApiError::MethodNotAllowed { allow: vec!["GET"] }),
        (_, [_, "trigger"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["POST"],
        }),
        _ => resource::serve_or_404::<Schedule>(ctx, req, &who, &segments),
    }
}

struct Schedule;

impl Resource for Schedule {
    const NOUN: &'static str = "schedule";
    const PATH: &'static str = "/api/v1/schedules";
    const TABLE: &'static str = "schedules";
    const ID: &'static str = "schedule_id";
    const FROM: &'static str = "schedules r";
    const COLUMNS: &'static str = resource_columns!(
        "schedule_id",
        "r.workflow_id::text, r.cron, r.timezone, r.input, r.enabled, r.overlap, r.catchup_window_s, \
         (r.next_fire_at at time zone 'UTC'), (r.last_fired_at at time zone 'UTC')"
    );
    const FIELDS: &'static [&'static str] = &[
        "workflow_id",
        "cron",
        "timezone",
        "input",
        "enabled",
        "overlap",
        "catchup_window_s",
    ];
    const FILTERS: &'static [Filter] = &[
        Filter {
            param: "workflow_id",
            column: "r.workflow_id",
            kind: FilterType::Uuid,
        },
        Filter {
            param: "enabled",
            column: "r.enabled",
            kind: FilterType::Bool,
        },
    ];

    fn to_json(row: &Row) -> Result<Value, ApiError> {
        let mut m = common_json(row)?;
        for (k, v) in [
            ("workflow_id", json!(row.text(5)?)),
            ("cron", json!(row.text(6)?)),
            ("timezone", json!(row.text(7)?)),
            ("input", row.json(8)?),
            ("enabled", json!(row.bool(9)?)),
            ("overlap", json!(row.text(10)?)),
            ("catchup_window_s", json!(row.int(11)?)),
            ("next_fire_at", row.time_json(12)?),
            ("last_fired_at", row.time_json(13)?),
        ] {
            m.insert(k.into(), v);
        }
        Ok(Value::Object(m))
    }

    fn save(tx: &Tx<'_, Db>, ctx: &Work, w: Write<'_>) -> Result<(), ApiError> {
        let mut b = Body::from_value(w.doc)?;
        let workflow_id = b.opt_uuid("workflow_id");
        if workflow_id.is_none() && b.is_clean() {
            b.error("workflow_id", "is required");
        }
        let cron = b.str("cron", 200);
        let timezone = b.opt_str("timezone", 64).unwrap_or_else(|| "UTC".into());
        let input = b.opt_value("input").unwrap_or_else(|| json!({}));
        let enabled = b.bool_or("enabled", true);
        let overlap = b.one_of("overlap", &["skip", "allow", "cancel_previous"], "skip");
        let catchup = b.opt_int("catchup_window_s", 0..=2_592_000).unwrap_or(0);
        if timezone.parse::<chrono_tz::Tz>().is_err() {
            b.error(
                "timezone",
                format!("`{timezone}` is not an IANA time zone, e.g. Europe/Berlin"),
            );
        }
        let mut next_fire_at = None;
        if let Some(expr) = &cron
            && b.is_clean()
        {
            match Cron::parse(expr, &timezone) {
                Ok(c) => match c.next_after(ctx.now) {
                    Some(t) => next_fire_at = enabled.then_some(t),
                    None => b.error("cron", "never fires"),
                },
                Err(m) => b.error("cron", m),
            }
        }
        if let Some(id) = &workflow_id {
            check_workflow_input(tx, w.project_id, id, &input, &mut b)?;
        }
        b.finish()?;
        let (Some(workflow_id), Some(cron)) = (workflow_id, cron) else {
            return Err(ApiError::unchecked_field());
        };
        tx.execute(
            &format!(
                "insert into schedules (schedule_id, project_id, workflow_id, cron, timezone, input, enabled,
                    overlap, catchup_window_s, next_fire_at, created_at, updated_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10{AS_TIMESTAMPTZ}, $11{AS_TIMESTAMPTZ}, $11{AS_TIMESTAMPTZ})
                 on conflict (schedule_id) do update set
                    workflow_id = excluded.workflow_id, cron = excluded.cron, timezone = excluded.timezone,
                    input = excluded.input, enabled = excluded.enabled, overlap = excluded.overlap,
                    catchup_window_s = excluded.catchup_window_s, next_fire_at = excluded.next_fire_at,
                    version = schedules.version + 1, updated_at = excluded.updated_at"
            ),
            &[
                V::Uuid(w.id.into()),
                V::Uuid(w.project_id.into()),
                V::Uuid(workflow_id),
                V::Text(cron),
                V::Text(timezone),
                V::Json(input),
                V::Bool(enabled),
                V::Text(overlap.into()),
                V::Int32(catchup as i32),
                next_fire_at.map(V::Timestamp).unwrap_or(V::Null),
                V::Timestamp(ctx.now),
            ],
        )?;
        Ok(())
    }
}

/// The workflow must be a live one of the project, and `input` must satisfy its current
/// `input_schema` (a schedule that could never start a run is refused when saved).
fn check_workflow_input(
    tx: &Tx<'_, Db>,
    project_id: &str,
    workflow_id: &str,
    input: &Value,
    b: &mut Body,
) -> Result<(), ApiError> {
    let rows = tx.query(
        "select v.input_schema from workflows w
         join workflow_versions v on v.workflow_id = w.workflow_id and v.version = w.version
         where w.workflow_id = $1 and w.project_id = $2 and w.deleted_at is null",
        &[V::Uuid(workflow_id.into()), V::Uuid(project_id.into())],
    )?;
    let Some(row) = rows.first() else {
        b.error("workflow_id", "is not a workflow of this project");
        return Ok(());
    };
    let schema = row.json(0)?;
    if !schema.is_null()
        && let Err(problems) = sparkops_core::schema::validate_saved(&schema, input)
    {
        for (pointer, message) in problems {
            b.error(&format!("input{pointer}"), message);
        }
    }
    Ok(())
}

/// `GET /schedules/{id}/next?count=5`: the coming fire times, in UTC and in the zone.
fn next(ctx: &mut Ctx, req: &HttpRequest, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let count = match req.query_param("count") {
        None => 5,
        Some(c) => c
            .parse::<usize>()
            .ok()
            .filter(|c| (1..=100).contains(c))
            .ok_or_else(|| ApiError::field("count", "must be an integer from 1 to 100"))?,
    };
    let (id, _) = resource::access::<Schedule>(ctx, who, id, Action::Read)?;
    let schedule = resource::get_json::<Schedule>(ctx, &id)?;
    let cron = Cron::parse(
        schedule["cron"].as_str().unwrap_or_default(),
        schedule["timezone"].as_str().unwrap_or_default(),
    )
    .map_err(|e| ApiError::Internal(format!("a stored schedule does not parse: {e}")))?;
    let items: Vec<Value> = cron
        .upcoming(ctx.now, count)
        .into_iter()
        .map(|t| json!({"at": rfc3339(t), "local": cron.local(t)}))
        .collect();
    Ok(Reply::ok(json!({
        "timezone": schedule["timezone"],
        "enabled": schedule["enabled"],
        "items": items,
    })))
}

/// `POST /schedules/{id}/trigger`: starts a run now, as a fire at this moment would (the
/// overlap policy and the run-start policies apply; a refusal is an error and changes
/// nothing). The fire is recorded as manual. `Idempotency-Key` makes it once.
fn trigger(ctx: &mut Ctx, req: &HttpRequest, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = resource::access::<Schedule>(ctx, who, id, Action::Write)?;
    let mut nudges = Vec::new();
    let reply = ctx.create_once(req, who, |tx, ctx| {
        let rows = tx.query(
            "select project_id::text, workflow_id::text, input, overlap from schedules
             where schedule_id = $1 and deleted_at is null for no key update",
            &[V::Uuid(id.clone())],
        )?;
        let row = rows
            .first()
            .ok_or_else(|| ApiError::NotFound(format!("no schedule {id}")))?;
        let schedule = schedule_fire::Schedule {
            schedule_id: id.clone(),
            project_id: row.text(0)?,
            workflow_id: row.text(1)?,
            input: row.json(2)?,
            overlap: row.text(3)?,
        };
        let (fired, more) = schedule_fire::fire(tx, &schedule, ctx.now, ctx.now, true)?;
        nudges = more;
        match fired {
            Fired::Started { run_id } => Ok(Reply::created(
                json!({
                    "id": run_id,
                    "status": "queued",
                    "workflow_id": schedule.workflow_id,
                    "schedule_id": id,
                    "scheduled_for": rfc3339(ctx.now),
                }),
                format!("/api/v1/runs/{run_id}"),
            )),
            Fired::Skipped(reason) => Err(ApiError::Conflict(reason)),
            Fired::Gone => Err(ApiError::Conflict(
                "the schedule's workflow was deleted".into(),
            )),
            Fired::Refused(reason) => Err(ApiError::PolicyViolation(reason)),
            Fired::Failed(reason) => Err(ApiError::Conflict(reason)),
        }
    })?;
    for run in nudges {
        sparkops_platform::nudge::run(&run);
    }
    Ok(reply)
}

/// `GET /schedules/{id}/fires?limit=50`: what each fire time came to, latest first: the run
/// it started, or why none (overlap, a policy, missed beyond the catch-up window).
fn fires(ctx: &mut Ctx, req: &HttpRequest, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let limit = match req.query_param("limit") {
        None => 50,
        Some(c) => c
            .parse::<i64>()
            .ok()
            .filter(|c| (1..=200).contains(c))
            .ok_or_else(|| ApiError::field("limit", "must be an integer from 1 to 200"))?,
    };
    let (id, _) = resource::access::<Schedule>(ctx, who, id, Action::Read)?;
    let rows = ctx.db()?.query(
        "select (fire_at at time zone 'UTC'), outcome, reason, run_id::text, manual,
                (missed_until at time zone 'UTC'), missed_count, (recorded_at at time zone 'UTC')
         from schedule_fires where schedule_id = $1 order by fire_at desc limit $2",
        &[V::Uuid(id), V::Int64(limit)],
    )?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "fire_at": r.time_json(0)?,
                "outcome": r.text(1)?,
                "reason": r.opt_text(2)?,
                "run_id": r.opt_text(3)?,
                "manual": r.bool(4)?,
                "missed_until": r.time_json(5)?,
                "missed_count": r.int(6)?,
                "recorded_at": r.time_json(7)?,
            }))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Reply::ok(json!({"items": items})))
}
