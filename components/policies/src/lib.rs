//! Policies (API.md "Policies": budgets, allowed models and tools, limits, scoped to the
//! project, a workflow or an agent) and the model price table with per-project overrides
//! (API.md "Model prices"): the two halves of cost control, in one component.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Row, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::input::Body;
use sparkops_core::money::Usd;
use sparkops_core::policy::{check_model_name, parse_rules};
use sparkops_core::roles::Action;
use sparkops_platform::db::Db;
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, Ctx, Principal, Work};
use sparkops_platform::resource::{
    self, Filter, FilterType, Resource, Write, common_json, live_ids,
};
use sparkops_platform::resource_columns;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    if let Some(segments) = req.segments("/api/v1/models/prices") {
        // A model's name holds a slash (`openai/gpt-4o-mini`): it may come as two segments
        // or percent-encoded as one (`openai%2Fgpt-4o-mini`), as clients encode path values.
        let model = segments
            .iter()
            .map(|s| sparkops_platform::http::decode_segment(s))
            .collect::<Vec<_>>()
            .join("/");
        return match (&req.method, model.is_empty()) {
            (Method::Get, true) => prices(ctx, req, &who),
            (Method::Put, false) => set_price(ctx, req, &who, &model),
            (Method::Delete, false) => remove_price(ctx, req, &who, &model),
            (_, true) => Err(ApiError::MethodNotAllowed { allow: vec!["GET"] }),
            (_, false) => Err(ApiError::MethodNotAllowed {
                allow: vec!["PUT", "DELETE"],
            }),
        };
    }
    let segments = req.segments(Policy::PATH).unwrap_or_default();
    match (&req.method, segments.as_slice()) {
        (Method::Get, ["usage"]) => usage(ctx, req, &who),
        (_, ["usage"]) => Err(ApiError::MethodNotAllowed { allow: vec!["GET"] }),
        _ => resource::serve_or_404::<Policy>(ctx, req, &who, &segments),
    }
}

/// `GET /policies/usage?project_id`: every enabled budget of the project against its
/// current window: spent (settled calls), reserved (calls in flight), what is left.
fn usage(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<Reply, ApiError> {
    let access =
        resource::project_of_request(ctx, who, req.query_param("project_id"), Action::Read)?;
    let now = ctx.now;
    let rows = ctx.db()?.query(
        "select policy_id::text, name, rules, scope_agent_id::text, scope_workflow_id::text from policies
         where project_id = $1 and enabled and deleted_at is null and rules ? 'budget'
         order by policy_id",
        &[V::Uuid(access.project_id.clone())],
    )?;
    let mut items = Vec::new();
    for row in &rows {
        let id = row.text(0)?;
        let rules = parse_rules(&row.json(2)?)
            .map_err(|e| ApiError::Internal(format!("policy {id} does not parse: {e:?}")))?;
        let Some(budget) = rules.budget else { continue };
        let start = sparkops_platform::policies::window_start(budget.window, now);
        let used = ctx.db()?.query(
            &format!(
                "select spent_usd::text, reserved_usd::text, tokens, calls from budget_usage
                 where policy_id = $1 and window_start = $2{AS_TIMESTAMPTZ}"
            ),
            &[V::Uuid(id.clone()), V::Timestamp(start)],
        )?;
        let (spent, reserved, tokens, calls) = match used.first() {
            Some(u) => (u.usd(0)?, u.usd(1)?, u.int(2)?, u.int(3)?),
            None => (Usd::ZERO, Usd::ZERO, 0, 0),
        };
        let left = (budget.limit_usd - spent - reserved).max(Usd::ZERO);
        items.push(json!({
            "policy_id": id,
            "name": row.text(1)?,
            "scope": {"agent_id": row.opt_text(3)?, "workflow_id": row.opt_text(4)?},
            "budget": {"limit_usd": budget.limit_usd.to_fixed(), "window": budget.window.as_str(),
                "action": if budget.block { "block" } else { "alert" }},
            "window_start": (budget.window.as_str() != "total").then(|| sparkops_core::time::rfc3339(start)),
            "spent_usd": spent.to_fixed(),
            "reserved_usd": reserved.to_fixed(),
            "remaining_usd": left.to_fixed(),
            "tokens": tokens,
            "calls": calls,
            "exceeded": spent >= budget.limit_usd,
        }));
    }
    Ok(Reply::ok(json!({"items": items})))
}

struct Policy;

impl Resource for Policy {
    const NOUN: &'static str = "policy";
    const PATH: &'static str = "/api/v1/policies";
    const TABLE: &'static str = "policies";
    const ID: &'static str = "policy_id";
    const FROM: &'static str = "policies r";
    const COLUMNS: &'static str = resource_columns!(
        "policy_id",
        "r.name, r.enabled, r.scope_agent_id::text, r.scope_workflow_id::text, r.rules"
    );
    const FIELDS: &'static [&'static str] = &["name", "enabled", "scope", "rules"];
    const WRITE: Action = Action::Administer;
    const FILTERS: &'static [Filter] = &[Filter {
        param: "enabled",
        column: "r.enabled",
        kind: FilterType::Bool,
    }];

    fn to_json(row: &Row) -> Result<Value, ApiError> {
        let mut m = common_json(row)?;
        let scope = match (row.opt_text(7)?, row.opt_text(8)?) {
            (Some(agent), _) => json!({"agent_id": agent}),
            (_, Some(workflow)) => json!({"workflow_id": workflow}),
            _ => json!({}),
        };
        for (k, v) in [
            ("name", json!(row.text(5)?)),
            ("enabled", json!(row.bool(6)?)),
            ("scope", scope),
            ("rules", row.json(9)?),
        ] {
            m.insert(k.into(), v);
        }
        Ok(Value::Object(m))
    }

    fn save(tx: &Tx<'_, Db>, ctx: &Work, w: Write<'_>) -> Result<(), ApiError> {
        let mut b = Body::from_value(w.doc)?;
        let name = b.str("name", 200);
        let enabled = b.bool_or("enabled", true);
        let (agent, workflow) = read_scope(tx, w.project_id, &mut b)?;
        let rules = match b.opt_value("rules") {
            None => {
                b.error("rules", "is required");
                None
            }
            Some(raw) => match parse_rules(&raw) {
                Ok(rules) => Some(rules),
                Err(errors) => {
                    for e in errors {
                        b.error(&e.field, e.message);
                    }
                    None
                }
            },
        };
        if let Some(tools) = rules.as_ref().and_then(|r| r.allowed_tools.as_ref()) {
            // MCP tools are named, not stored: a server may be registered after its policy.
            let ids: Vec<String> = tools
                .iter()
                .filter(|t| !t.starts_with("mcp:"))
                .cloned()
                .collect();
            let known = live_ids(tx, "tools", "tool_id", w.project_id, &ids)?;
            for (i, id) in tools.iter().enumerate() {
                if !id.starts_with("mcp:") && !known.contains(id) {
                    b.error(
                        &format!("rules.allowed_tools[{i}]"),
                        "is not a tool of this project",
                    );
                }
            }
        }
        b.finish()?;
        let (Some(name), Some(rules)) = (name, rules) else {
            return Err(ApiError::unchecked_field());
        };
        tx.execute(
            &format!(
                "insert into policies (policy_id, project_id, name, enabled, scope_agent_id, scope_workflow_id,
                    rules, created_at, updated_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $8{AS_TIMESTAMPTZ}, $8{AS_TIMESTAMPTZ})
                 on conflict (policy_id) do update set
                    name = excluded.name, enabled = excluded.enabled,
                    scope_agent_id = excluded.scope_agent_id, scope_workflow_id = excluded.scope_workflow_id,
                    rules = excluded.rules, version = policies.version + 1, updated_at = excluded.updated_at"
            ),
            &[
                V::Uuid(w.id.into()),
                V::Uuid(w.project_id.into()),
                V::Text(name),
                V::Bool(enabled),
                agent.map(V::Uuid).unwrap_or(V::Null),
                workflow.map(V::Uuid).unwrap_or(V::Null),
                V::Json(rules.to_json()),
                V::Timestamp(ctx.now),
            ],
        )?;
        Ok(())
    }
}

/// `scope`: `{}` (the whole project), `{agent_id}` or `{workflow_id}` of this project.
fn read_scope(
    tx: &Tx<'_, Db>,
    project_id: &str,
    b: &mut Body,
) -> Result<(Option<String>, Option<String>), ApiError> {
    let Some(scope) = b.opt_object("scope") else {
        return Ok((None, None));
    };
    let Ok(mut s) = Body::from_value(Value::Object(scope)) else {
        return Ok((None, None));
    };
    let agent = s.opt_uuid("agent_id");
    let workflow = s.opt_uuid("workflow_id");
    if let Err(ApiError::Validation { errors, .. }) = s.finish() {
        for e in errors {
            b.error(&format!("scope.{}", e.field), e.message);
        }
    }
    if agent.is_some() && workflow.is_some() {
        b.error("scope", "names an agent or a workflow, not both");
    }
    for (field, table, column, id) in [
        ("scope.agent_id", "agents", "agent_id", &agent),
        ("scope.workflow_id", "workflows", "workflow_id", &workflow),
    ] {
        if let Some(id) = id
            && !live_ids(tx, table, column, project_id, std::slice::from_ref(id))?.contains(id)
        {
            b.error(field, "is not of this project");
        }
    }
    Ok((agent, workflow))
}

// ---- Model prices ---------------------------------------------------------------------------

fn price_json(row: &Row) -> Result<Value, ApiError> {
    let usd = |i: usize| -> Result<String, ApiError> { Ok(row.usd(i)?.to_fixed()) };
    Ok(json!({
        "model": row.text(0)?,
        "input_per_mtok_usd": usd(1)?,
        "output_per_mtok_usd": usd(2)?,
        "source": if row.bool(3)? { "project" } else { "default" },
    }))
}

/// `GET /models/prices[?project_id]`: the default table, with a project's overrides in
/// place of the defaults they replace.
fn prices(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<Reply, ApiError> {
    let project = match req.query_param("project_id") {
        Some(id) => Some(ctx.project(who, &id, Action::Read)?.project_id),
        None => None,
    };
    let rows = ctx.db()?.query(
        "select distinct on (model) model, input_per_mtok::text, output_per_mtok::text, project_id is not null
         from model_prices
         where project_id is null or project_id = $1
         order by model, project_id nulls last",
        &[project.map(V::Uuid).unwrap_or(V::Null)],
    )?;
    let items = rows.iter().map(price_json).collect::<Result<Vec<_>, _>>()?;
    Ok(Reply::ok(json!({"items": items, "next_cursor": null})))
}

fn price_project(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<String, ApiError> {
    let id = req.query_param("project_id").ok_or_else(|| {
        ApiError::field(
            "project_id",
            "is required: prices are overridden per project",
        )
    })?;
    Ok(ctx.project(who, &id, Action::Administer)?.project_id)
}

/// `PUT /models/prices/{provider/model}?project_id`: a project's own price for a model.
fn set_price(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    model: &str,
) -> Result<Reply, ApiError> {
    let project_id = price_project(ctx, req, who)?;
    let mut b = Body::parse(&req.body)?;
    if let Err(m) = check_model_name(model) {
        b.error("model", m);
    }
    let amount = |b: &mut Body, field: &str| match b.opt_value(field).map(|v| Usd::from_json(&v)) {
        None => {
            b.error(field, "is required");
            None
        }
        Some(Err(m)) => {
            b.error(field, m);
            None
        }
        Some(Ok(u)) if u.is_negative() => {
            b.error(field, "must not be negative");
            None
        }
        Some(Ok(u)) => Some(u),
    };
    let input = amount(&mut b, "input_per_mtok_usd");
    let output = amount(&mut b, "output_per_mtok_usd");
    b.finish()?;
    let (Some(input), Some(output)) = (input, output) else {
        return Err(ApiError::unchecked_field());
    };
    let id = ctx.new_id();
    let rows = ctx.transaction(|tx, ctx| {
        Ok(tx.query(
            &format!(
                "insert into model_prices (model_price_id, project_id, model, input_per_mtok, output_per_mtok, created_at, updated_at)
                 values ($1, $2, $3, $4::numeric, $5::numeric, $6{AS_TIMESTAMPTZ}, $6{AS_TIMESTAMPTZ})
                 on conflict (project_id, model) where project_id is not null do update set
                    input_per_mtok = excluded.input_per_mtok, output_per_mtok = excluded.output_per_mtok,
                    updated_at = excluded.updated_at
                 returning model, input_per_mtok::text, output_per_mtok::text, true"
            ),
            &[
                V::Uuid(id),
                V::Uuid(project_id.clone()),
                V::Text(model.into()),
                V::Decimal(input.to_fixed()),
                V::Decimal(output.to_fixed()),
                V::Timestamp(ctx.now),
            ],
        )?)
    })?;
    Ok(Reply::ok(price_json(rows.first().ok_or_else(|| {
        ApiError::internal("the price upsert returned no row")
    })?)?))
}

/// `DELETE /models/prices/{provider/model}?project_id`: back to the default price.
fn remove_price(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    model: &str,
) -> Result<Reply, ApiError> {
    let project_id = price_project(ctx, req, who)?;
    let removed = ctx.db()?.execute(
        "delete from model_prices where project_id = $1 and model = $2",
        &[V::Uuid(project_id), V::Text(model.into())],
    )?;
    if removed == 0 {
        return Err(ApiError::NotFound(format!(
            "this project has no price of its own for {model}"
        )));
    }
    Ok(Reply::no_content())
}
