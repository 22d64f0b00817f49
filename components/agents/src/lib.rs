//! Agents (API.md "Agents"): an OpenAI-compatible model named `provider/model`, a system
//! prompt, the project's tools it may call, and its limits.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Row, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::input::Body;
use sparkops_core::mcp;
use sparkops_core::policy::check_model_name;
use sparkops_platform::db::Db;
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, Ctx, Work};
use sparkops_platform::resource::{self, Resource, Write, common_json, live_ids, name_taken};
use sparkops_platform::resource_columns;
use spin_sdk::http::{IncomingRequest, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    let segments = req.segments(Agent::PATH).unwrap_or_default();
    resource::serve_or_404::<Agent>(ctx, req, &who, &segments)
}

struct Agent;

/// `fallback_models`: up to five `provider/model` names, none repeated, none the agent's
/// own model.
fn read_fallbacks(b: &mut Body, model: Option<&str>) -> Vec<String> {
    let field = "fallback_models";
    let mut out: Vec<String> = Vec::new();
    match b.opt_value(field) {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.len() <= 5 => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("{field}[{i}]");
                match item.as_str() {
                    None => b.error(&at, "must be a provider/model name"),
                    Some(name) => match check_model_name(name) {
                        Err(m) => b.error(&at, m),
                        Ok(()) if Some(name) == model || out.iter().any(|o| o == name) => b.error(
                            &at,
                            "is already in the chain (the model or an earlier fallback)",
                        ),
                        Ok(()) => out.push(name.to_string()),
                    },
                }
            }
        }
        Some(_) => b.error(field, "must be a list of at most 5 provider/model names"),
    }
    out
}

/// `mcp_tools`: up to 64 `mcp:<server>/<tool>` names, each a tool on the allow-list of a
/// live MCP server of the project, offered to the model under a function name no other
/// tool of the agent has.
fn read_mcp_tools(
    tx: &Tx<'_, Db>,
    b: &mut Body,
    project_id: &str,
    tool_ids: &[String],
) -> Result<Vec<String>, ApiError> {
    let field = "mcp_tools";
    let items = match b.opt_value(field) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) if items.len() <= 64 => items,
        Some(_) => {
            b.error(
                field,
                "must be a list of at most 64 mcp:<server>/<tool> names",
            );
            return Ok(Vec::new());
        }
    };
    let mut refs: Vec<(usize, String, String, String)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{field}[{i}]");
        match item.as_str().map(|r| (r, mcp::parse_ref(r, false))) {
            None => b.error(&at, "must be an mcp:<server>/<tool> name"),
            Some((_, Err(m))) => b.error(&at, m),
            Some((r, Ok(_))) if refs.iter().any(|(_, x, _, _)| x == r) => {
                b.error(&at, "is repeated")
            }
            Some((r, Ok((server, tool)))) => {
                refs.push((i, r.to_string(), server.to_string(), tool.to_string()))
            }
        }
    }
    let mut names: Vec<&str> = refs.iter().map(|(_, _, s, _)| s.as_str()).collect();
    names.dedup();
    let servers = sparkops_platform::mcp::load_named(tx, project_id, &names)?;
    // The HTTP tools' names, which the functions offered must not repeat.
    let mut functions: Vec<String> = if tool_ids.is_empty() {
        Vec::new()
    } else {
        tx.query(
            "select name from tools where tool_id::text = any(string_to_array($1, ','))",
            &[V::Text(tool_ids.join(","))],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<_, _>>()?
    };
    for (i, _, server, tool) in &refs {
        let at = format!("{field}[{i}]");
        let Some(s) = servers.iter().find(|s| &s.name == server) else {
            b.error(
                &at,
                format!("names no MCP server '{server}' of this project"),
            );
            continue;
        };
        if !s.allows(tool) {
            b.error(
                &at,
                format!("is not on the allowed_tools of MCP server '{server}'"),
            );
            continue;
        }
        match mcp::function_name(server, tool) {
            None => b.error(
                &at,
                "makes a function name (mcp__<server>__<tool>) longer than the 64 characters providers take",
            ),
            Some(f) if functions.contains(&f) => {
                b.error(&at, format!("is offered as {f}, which another tool of the agent is named"))
            }
            Some(f) => functions.push(f),
        }
    }
    Ok(refs.into_iter().map(|(_, r, _, _)| r).collect())
}

impl Resource for Agent {
    const NOUN: &'static str = "agent";
    const PATH: &'static str = "/api/v1/agents";
    const TABLE: &'static str = "agents";
    const ID: &'static str = "agent_id";
    const FROM: &'static str = "agents r";
    const COLUMNS: &'static str = resource_columns!(
        "agent_id",
        "r.name, r.description, r.model, r.system_prompt, r.max_iterations, r.max_tokens, \
         r.temperature, r.response_format, r.metadata, \
         (select coalesce(jsonb_agg(t.tool_id::text order by t.position), '[]'::jsonb) \
          from agent_tools t where t.agent_id = r.agent_id), r.fallback_models, r.mcp_tools, r.stream"
    );
    const FIELDS: &'static [&'static str] = &[
        "name",
        "description",
        "model",
        "system_prompt",
        "temperature",
        "max_tokens",
        "tool_ids",
        "max_iterations",
        "response_format",
        "metadata",
        "fallback_models",
        "mcp_tools",
        "stream",
    ];

    fn to_json(row: &Row) -> Result<Value, ApiError> {
        let mut m = common_json(row)?;
        let temperature = row.opt_text(11)?.and_then(|t| t.parse::<f64>().ok());
        for (k, v) in [
            ("name", json!(row.text(5)?)),
            ("description", json!(row.opt_text(6)?)),
            ("model", json!(row.text(7)?)),
            ("system_prompt", json!(row.text(8)?)),
            ("max_iterations", json!(row.int(9)?)),
            ("max_tokens", json!(row.int(10)?)),
            ("temperature", json!(temperature)),
            ("response_format", row.json(12)?),
            ("metadata", row.json(13)?),
            ("tool_ids", row.json(14)?),
            ("fallback_models", row.json(15)?),
            ("mcp_tools", row.json(16)?),
            ("stream", json!(row.bool(17)?)),
        ] {
            m.insert(k.into(), v);
        }
        Ok(Value::Object(m))
    }

    fn save(tx: &Tx<'_, Db>, ctx: &Work, w: Write<'_>) -> Result<(), ApiError> {
        let mut b = Body::from_value(w.doc)?;
        let name = b.str("name", 200);
        let description = b.opt_str("description", 2000);
        let model = b.str("model", 200);
        if let Some(Err(m)) = model.as_deref().map(check_model_name) {
            b.error("model", m);
        }
        let system_prompt = b.str("system_prompt", 100_000);
        let temperature = b.opt_value("temperature");
        let temperature = match temperature
            .as_ref()
            .map(|t| t.as_f64().filter(|t| (0.0..=2.0).contains(t)))
        {
            None => None,
            Some(Some(t)) => Some(t),
            Some(None) => {
                b.error("temperature", "must be a number from 0 to 2");
                None
            }
        };
        let max_tokens = b.opt_int("max_tokens", 1..=200_000).unwrap_or(1024);
        let tool_ids = b.opt_uuids("tool_ids", 64).unwrap_or_default();
        let known = live_ids(tx, "tools", "tool_id", w.project_id, &tool_ids)?;
        for (i, id) in tool_ids.iter().enumerate() {
            if !known.contains(id) {
                b.error(&format!("tool_ids[{i}]"), "is not a tool of this project");
            }
        }
        let max_iterations = b.opt_int("max_iterations", 1..=50).unwrap_or(10);
        let response_format = b.opt_schema("response_format", false);
        let metadata = b.opt_object("metadata");
        let fallbacks = read_fallbacks(&mut b, model.as_deref());
        let mcp_tools = read_mcp_tools(tx, &mut b, w.project_id, &tool_ids)?;
        let stream = b.bool_or("stream", false);
        b.finish()?;
        let (Some(name), Some(model), Some(system_prompt)) = (name, model, system_prompt) else {
            return Err(ApiError::unchecked_field());
        };
        tx.execute(
            &format!(
                "insert into agents (agent_id, project_id, name, description, model, system_prompt,
                    max_iterations, max_tokens, temperature, response_format, metadata, created_at, updated_at,
                    fallback_models, mcp_tools, stream)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9::numeric, $10, $11, $12{AS_TIMESTAMPTZ}, $12{AS_TIMESTAMPTZ}, $13, $14, $15)
                 on conflict (agent_id) do update set
                    name = excluded.name, description = excluded.description, model = excluded.model,
                    system_prompt = excluded.system_prompt, max_iterations = excluded.max_iterations,
                    max_tokens = excluded.max_tokens, temperature = excluded.temperature,
                    response_format = excluded.response_format, metadata = excluded.metadata,
                    fallback_models = excluded.fallback_models, mcp_tools = excluded.mcp_tools,
                    stream = excluded.stream,
                    version = agents.version + 1, updated_at = excluded.updated_at"
            ),
            &[
                V::Uuid(w.id.into()),
                V::Uuid(w.project_id.into()),
                V::Text(name),
                description.map(V::Text).unwrap_or(V::Null),
                V::Text(model),
                V::Text(system_prompt),
                V::Int32(max_iterations as i32),
                V::Int32(max_tokens as i32),
                temperature.map(|t| V::Decimal(t.to_string())).unwrap_or(V::Null),
                response_format.map(V::Json).unwrap_or(V::Null),
                metadata.map(|m| V::Json(m.into())).unwrap_or(V::Null),
                V::Timestamp(ctx.now),
                V::Json(json!(fallbacks)),
                V::Json(json!(mcp_tools)),
                V::Bool(stream),
            ],
        )
        .map_err(name_taken("agent", "agents_project_name_key"))?;
        tx.execute(
            "delete from agent_tools where agent_id = $1",
            &[V::Uuid(w.id.into())],
        )?;
        for (position, tool_id) in tool_ids.iter().enumerate() {
            tx.execute(
                "insert into agent_tools (agent_id, tool_id, position) values ($1, $2, $3)",
                &[
                    V::Uuid(w.id.into()),
                    V::Uuid(tool_id.clone()),
                    V::Int32(position as i32),
                ],
            )?;
        }
        Ok(())
    }

    fn in_use(tx: &Tx<'_, Db>, id: &str) -> Result<Option<String>, ApiError> {
        resource::used_by_workflows(tx, "agent_id", id, "agent")
    }
}
