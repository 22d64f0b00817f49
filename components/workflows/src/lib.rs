//! Workflows (API.md "Workflows"): DAGs of steps, validated whole against the project's
//! agents and tools; every save stores a new version, which runs pin.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Row, Tx, Value as V, utc};
use sparkops_core::error::ApiError;
use sparkops_core::input::Body;
use sparkops_core::llm::{self, FunctionTool};
use sparkops_core::money::Usd;
use sparkops_core::page::{self, PageRequest};
use sparkops_core::policy::parse_rules;
use sparkops_core::roles::Action;
use sparkops_core::template;
use sparkops_core::time::rfc3339;
use sparkops_core::workflow::{self, Catalog, StepKind};
use sparkops_platform::agent;
use sparkops_platform::db::Db;
use sparkops_platform::engine;
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, Ctx, Principal, Work};
use sparkops_platform::policies;
use sparkops_platform::resource::{self, Resource, Write, common_json, name_taken};
use sparkops_platform::resource_columns;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    let segments = req.segments(Workflow::PATH).unwrap_or_default();
    match (&req.method, segments.as_slice()) {
        (Method::Post, ["validate"]) => validate(ctx, req, &who),
        (_, ["validate"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["POST"],
        }),
        (Method::Get, [id, "versions"]) => versions(ctx, req, &who, id),
        (Method::Post, [id, "quote"]) => quote(ctx, req, &who, id),
        (_, [_, "quote"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["POST"],
        }),
        (_, [_, "versions"]) => Err(ApiError::MethodNotAllowed { allow: vec!["GET"] }),
        _ => resource::serve_or_404::<Workflow>(ctx, req, &who, &segments),
    }
}

struct Workflow;

/// The live agents and tools of a project, which steps may use.
fn catalog(tx: &Tx<'_, Db>, project_id: &str) -> Result<Catalog, ApiError> {
    let ids = |table: &str, column: &str| -> Result<_, ApiError> {
        tx.query(
            &format!(
                "select {column}::text from {table} where project_id = $1 and deleted_at is null"
            ),
            &[V::Uuid(project_id.into())],
        )?
        .iter()
        .map(|r| Ok(r.text(0)?))
        .collect()
    };
    Ok(Catalog {
        agents: ids("agents", "agent_id")?,
        tools: ids("tools", "tool_id")?,
    })
}

impl Resource for Workflow {
    const NOUN: &'static str = "workflow";
    const PATH: &'static str = "/api/v1/workflows";
    const TABLE: &'static str = "workflows";
    const ID: &'static str = "workflow_id";
    const FROM: &'static str = "workflows r join workflow_versions v on v.workflow_id = r.workflow_id and v.version = r.version";
    const COLUMNS: &'static str = resource_columns!(
        "workflow_id",
        "r.name, r.description, r.timeout_s, v.definition, v.input_schema"
    );
    const FIELDS: &'static [&'static str] = &[
        "name",
        "description",
        "input_schema",
        "definition",
        "timeout_s",
    ];

    fn to_json(row: &Row) -> Result<Value, ApiError> {
        let mut m = common_json(row)?;
        for (k, v) in [
            ("name", json!(row.text(5)?)),
            ("description", json!(row.opt_text(6)?)),
            ("timeout_s", json!(row.int(7).ok())),
            ("definition", row.json(8)?),
            ("input_schema", row.json(9)?),
        ] {
            m.insert(k.into(), v);
        }
        Ok(Value::Object(m))
    }

    fn save(tx: &Tx<'_, Db>, ctx: &Work, w: Write<'_>) -> Result<(), ApiError> {
        let mut b = Body::from_value(w.doc)?;
        let name = b.str("name", 200);
        let description = b.opt_str("description", 2000);
        let input_schema = b.opt_schema("input_schema", false);
        let timeout_s = b.opt_int("timeout_s", 1..=2_592_000);
        let definition = b.opt_value("definition");
        if definition.is_none() {
            b.error("definition", "is required");
        }
        b.finish()?;
        let (Some(name), Some(definition)) = (name, definition) else {
            return Err(ApiError::unchecked_field());
        };
        workflow::validate_or_422(&definition, &catalog(tx, w.project_id)?)?;
        let rows = tx
            .query(
                &format!(
                    "insert into workflows (workflow_id, project_id, name, description, timeout_s, created_at, updated_at)
                     values ($1, $2, $3, $4, $5, $6{AS_TIMESTAMPTZ}, $6{AS_TIMESTAMPTZ})
                     on conflict (workflow_id) do update set
                        name = excluded.name, description = excluded.description, timeout_s = excluded.timeout_s,
                        version = workflows.version + 1, updated_at = excluded.updated_at
                     returning version"
                ),
                &[
                    V::Uuid(w.id.into()),
                    V::Uuid(w.project_id.into()),
                    V::Text(name),
                    description.map(V::Text).unwrap_or(V::Null),
                    timeout_s.map(|t| V::Int32(t as i32)).unwrap_or(V::Null),
                    V::Timestamp(ctx.now),
                ],
            )
            .map_err(name_taken("workflow", "workflows_project_name_key"))?;
        let version = rows
            .first()
            .ok_or_else(|| ApiError::internal("the version insert returned no row"))?
            .int(0)?;
        tx.execute(
            &format!(
                "insert into workflow_versions (workflow_id, version, definition, input_schema, created_by, created_at)
                 values ($1, $2, $3, $4, $5, $6{AS_TIMESTAMPTZ})"
            ),
            &[
                V::Uuid(w.id.into()),
                V::Int32(version as i32),
                V::Json(definition),
                input_schema.map(V::Json).unwrap_or(V::Null),
                V::Uuid(w.user_id.into()),
                V::Timestamp(ctx.now),
            ],
        )?;
        Ok(())
    }

    fn in_use(tx: &Tx<'_, Db>, id: &str) -> Result<Option<String>, ApiError> {
        let rows = tx.query(
            "select count(*) from schedules where workflow_id = $1 and deleted_at is null",
            &[V::Uuid(id.into())],
        )?;
        let schedules = rows
            .first()
            .ok_or_else(|| ApiError::internal("count(*) returned no row"))?
            .int(0)?;
        Ok((schedules > 0)
            .then(|| format!("the workflow has {schedules} schedule(s); delete them first")))
    }
}

/// `POST /workflows/validate {project_id?, definition}`: the errors a save would report.
fn validate(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<Reply, ApiError> {
    let mut b = Body::parse(&req.body)?;
    let project_id = b.opt_str("project_id", 64);
    let definition = b.opt_value("definition");
    match &definition {
        None => b.error("definition", "is required"),
        // Not a workflow to judge but a malformed request: the document says an object.
        Some(d) if !d.is_object() => b.error("definition", "must be an object"),
        Some(_) => {}
    }
    b.finish()?;
    let access = resource::project_of_request(ctx, who, project_id, Action::Read)?;
    let definition = definition.ok_or_else(ApiError::unchecked_field)?;
    let catalog = ctx.transaction(|tx, _| catalog(tx, &access.project_id))?;
    let errors = match workflow::validate(&definition, &catalog) {
        Ok(_) => Vec::new(),
        Err(errors) => errors,
    };
    Ok(Reply::ok(
        json!({"valid": errors.is_empty(), "errors": errors}),
    ))
}

/// `GET /workflows/{id}/versions`: every saved definition, newest first.
fn versions(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    id: &str,
) -> Result<Reply, ApiError> {
    let (id, _) = resource::access::<Workflow>(ctx, who, id, Action::Read)?;
    let page = PageRequest::parse(req.query_param("limit").as_deref(), None)?;
    let before = match req.query_param("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            page::decode_int_cursor(&c)
                .ok_or_else(|| ApiError::field("cursor", "is not a cursor from this list"))?,
        ),
    };
    let rows = ctx.db()?.query(
        &format!(
            "select version, definition, input_schema, created_by::text, {}
             from workflow_versions where workflow_id = $1 and ($2::int4 is null or version < $2::int4)
             order by version desc limit $3",
            utc("created_at")
        ),
        &[
            V::Uuid(id),
            before.map(|v| V::Int32(v as i32)).unwrap_or(V::Null),
            V::Int64(page.limit + 1),
        ],
    )?;
    let n = rows.len().min(page.limit as usize);
    let next_cursor = (rows.len() > n)
        .then(|| rows[n - 1].int(0).map(page::encode_int_cursor))
        .transpose()?;
    let items = rows[..n]
        .iter()
        .map(|r| {
            Ok(json!({
                "version": r.int(0)?,
                "definition": r.json(1)?,
                "input_schema": r.json(2)?,
                "created_by": r.opt_text(3)?,
                "created_at": rfc3339(r.timestamp(4)?),
            }))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Reply::ok(
        json!({"items": items, "next_cursor": next_cursor}),
    ))
}

/// What quoting reads of an agent.
struct Quoted {
    models: Vec<String>,
    system_prompt: String,
    max_tokens: i64,
    max_iterations: i64,
    tools: Vec<FunctionTool>,
}

fn quoted_agent(db: &Db, project_id: &str, agent_id: &str) -> Result<Option<Quoted>, ApiError> {
    let rows = db.query(
        "select model, fallback_models, system_prompt, max_tokens, max_iterations from agents
         where agent_id = $1 and project_id = $2 and deleted_at is null",
        &[V::Uuid(agent_id.into()), V::Uuid(project_id.into())],
    )?;
    let Some(a) = rows.first() else {
        return Ok(None);
    };
    let mut models = vec![a.text(0)?];
    models.extend(
        a.json(1)?
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m.as_str().map(str::to_string)),
    );
    let tools = db
        .query(
            "select t.name, t.description, t.input_schema from agent_tools at
             join tools t on t.tool_id = at.tool_id
             where at.agent_id = $1 and t.deleted_at is null order by at.position",
            &[V::Uuid(agent_id.into())],
        )?
        .iter()
        .map(|t| {
            Ok(FunctionTool {
                name: t.text(0)?,
                description: t.text(1)?,
                parameters: t.json(2)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Some(Quoted {
        models,
        system_prompt: a.text(2)?,
        max_tokens: a.int(3)?,
        max_iterations: a.int(4)?,
        tools,
    }))
}

/// An agent as quoting reads it, with the prices of its models (`missing`: those unpriced).
struct Priced {
    agent: Quoted,
    prices: Vec<llm::Price>,
    missing: Vec<String>,
}

/// The run input and no step outputs yet: what a quote renders a step's input against.
struct InputOnly<'a>(&'a Value);

impl template::Scope for InputOnly<'_> {
    fn input(&self) -> &Value {
        self.0
    }
    fn output(&self, _: &str) -> Option<&Value> {
        None
    }
}

/// `POST /workflows/{id}/quote {input?}`: the most a run of the current version can cost
/// before it starts, per step and in total, and which budgets in scope it fits in now.
/// An agent step's worst case is every attempt its retry policy allows running every
/// iteration, each answer `max_tokens` long and each prompt the step's input (rendered
/// from `input` when given) plus the earlier answers, at the dearest model of its chain
/// (`sparkops_core::llm::worst_case`). Tool results are not counted (unknown before the
/// run); a model without a price makes the quote incomplete and is named.
fn quote(ctx: &mut Ctx, req: &HttpRequest, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, access) = resource::access::<Workflow>(ctx, who, id, Action::Read)?;
    let mut b = Body::parse_or_empty(&req.body)?;
    let input = b.opt_value("input").unwrap_or_else(|| json!({}));
    b.finish()?;
    let project = access.project_id.clone();
    let workflow = engine::start::workflow(ctx.db()?, &id, None)?
        .ok_or_else(|| ApiError::NotFound(format!("no workflow {id}")))?;
    let mut steps = Vec::new();
    let mut total = Usd::ZERO;
    let mut unpriced = Vec::new();
    let mut by_agent: HashMap<String, Usd> = HashMap::new();
    // Each agent and its models' prices, read once however many steps call it.
    let mut agents: HashMap<&str, Priced> = HashMap::new();
    for step in &workflow.definition.steps {
        let (Some(agent_id), StepKind::Agent) = (&step.agent_id, step.kind) else {
            steps.push(
                json!({"key": step.key, "kind": step.kind.as_str(), "worst_usd": "0.000000"}),
            );
            continue;
        };
        let Priced {
            agent,
            prices,
            missing,
        } = match agents.entry(agent_id.as_str()) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(slot) => {
                let db = ctx.db()?;
                let Some(agent) = quoted_agent(db, &project, agent_id)? else {
                    return Err(ApiError::Conflict(format!(
                        "step {}: its agent no longer exists",
                        step.key
                    )));
                };
                let mut prices = Vec::new();
                let mut missing = Vec::new();
                for model in &agent.models {
                    match agent::price(db, &project, model)? {
                        Some(p) => prices.push(p),
                        None => missing.push(model.clone()),
                    }
                }
                slot.insert(Priced {
                    agent,
                    prices,
                    missing,
                })
            }
        };
        let rendered = template::render(&step.input, &InputOnly(&input)).unwrap_or(Value::Null);
        let mut messages = Vec::new();
        if !agent.system_prompt.is_empty() {
            messages.push(json!({"role": "system", "content": agent.system_prompt}));
        }
        let user = match rendered {
            Value::String(s) => s,
            other => other.to_string(),
        };
        messages.push(json!({"role": "user", "content": user}));
        let base = llm::estimate_prompt_tokens(&messages, &agent.tools);
        let attempts = step.retry.max_attempts as u64;
        let worst = llm::worst_case(
            prices,
            base,
            agent.max_tokens as u64,
            agent.max_iterations as u64,
            attempts,
        );
        total = total + worst;
        let held = by_agent.entry(agent_id.clone()).or_insert(Usd::ZERO);
        *held = *held + worst;
        unpriced.extend(missing.iter().cloned());
        steps.push(json!({
            "key": step.key, "kind": "agent", "agent_id": agent_id, "models": agent.models,
            "unpriced_models": missing, "prompt_tokens": base, "max_tokens": agent.max_tokens,
            "iterations": agent.max_iterations, "attempts": attempts,
            "calls": agent.max_iterations as u64 * attempts, "worst_usd": worst.to_fixed(),
        }));
    }
    unpriced.sort();
    unpriced.dedup();
    let budgets = budgets_in_scope(ctx, &project, &id, total, &by_agent)?;
    Ok(Reply::ok(json!({
        "workflow_id": id,
        "version": workflow.version,
        "total_usd": total.to_fixed(),
        "complete": unpriced.is_empty(),
        "unpriced_models": unpriced,
        "steps": steps,
        "budgets": budgets,
    })))
}

/// Each budget that would hold the run's calls, with what is left of its window now and
/// whether the run's worst case fits: project- and workflow-scoped budgets hold every
/// call, an agent-scoped one only that agent's.
fn budgets_in_scope(
    ctx: &mut Ctx,
    project: &str,
    workflow_id: &str,
    total: Usd,
    by_agent: &HashMap<String, Usd>,
) -> Result<Vec<Value>, ApiError> {
    let now = ctx.now;
    let db = ctx.db()?;
    let rows = db.query(
        "select policy_id::text, name, rules, scope_agent_id::text from policies
         where project_id = $1 and enabled and deleted_at is null and rules ? 'budget'
           and (scope_workflow_id is null or scope_workflow_id = $2)
         order by policy_id",
        &[V::Uuid(project.into()), V::Uuid(workflow_id.into())],
    )?;
    let mut out = Vec::new();
    for row in &rows {
        let policy_id = row.text(0)?;
        let Some(budget) = parse_rules(&row.json(2)?).ok().and_then(|r| r.budget) else {
            continue;
        };
        let needed = match row.opt_text(3)? {
            None => total,
            Some(agent) => match by_agent.get(&agent) {
                Some(cost) => *cost,
                None => continue,
            },
        };
        let start = policies::window_start(budget.window, now);
        let used = db.query(
            &format!(
                "select spent_usd::text, reserved_usd::text from budget_usage
                 where policy_id = $1 and window_start = $2{AS_TIMESTAMPTZ}"
            ),
            &[V::Uuid(policy_id.clone()), V::Timestamp(start)],
        )?;
        let (spent, reserved) = match used.first() {
            Some(u) => (u.usd(0)?, u.usd(1)?),
            None => (Usd::ZERO, Usd::ZERO),
        };
        let left = (budget.limit_usd - spent - reserved).max(Usd::ZERO);
        out.push(json!({
            "policy_id": policy_id,
            "name": row.text(1)?,
            "action": if budget.block { "block" } else { "alert" },
            "remaining_usd": left.to_fixed(),
            "needed_usd": needed.to_fixed(),
            "fits": needed <= left,
        }));
    }
    Ok(out)
}
