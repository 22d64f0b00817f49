//! MCP servers (`/api/v1/mcp-servers`): a project's Streamable HTTP endpoints whose tools
//! agents may call as `mcp:<server>/<tool>`. The URL is checked where it points, header
//! values are literals or `{{ secret.NAME }}` references, and `allowed_tools` names the
//! only tools any agent may call. `POST /mcp-servers/{id}/refresh` lists the server's
//! tools now (`tools/list`) and caches them on the row, where runs read them.

use std::time::Instant;

use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Row, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::input::Body;
use sparkops_core::mcp::{check_server_name, check_tool_name};
use sparkops_core::roles::Action;
use sparkops_core::tool::check_headers;
use sparkops_platform::db::Db;
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::mcp;
use sparkops_platform::outbound::check_user_url;
use sparkops_platform::pipeline::{Ctx, Principal, Work};
use sparkops_platform::resource::{self, Resource, Write, common_json, name_taken};
use sparkops_platform::resource_columns;
use spin_sdk::http::Method;

pub fn route(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    segments: &[&str],
) -> Result<Reply, ApiError> {
    match (&req.method, segments) {
        (Method::Post, [id, "refresh"]) => refresh(ctx, who, id),
        (_, [_, "refresh"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["POST"],
        }),
        _ => resource::serve_or_404::<McpServer>(ctx, req, who, segments),
    }
}

pub struct McpServer;

/// Headers the transport sets itself.
const PROTOCOL_HEADERS: [&str; 4] = [
    "accept",
    "content-type",
    "mcp-session-id",
    "mcp-protocol-version",
];

/// `allowed_tools`: 1 to 256 distinct tool names.
fn read_allowed_tools(b: &mut Body) -> Option<Vec<String>> {
    let field = "allowed_tools";
    let Some(value) = b.opt_value(field) else {
        if b.is_clean() {
            b.error(field, "is required: the tools agents may call");
        }
        return None;
    };
    let Some(items) = value.as_array().filter(|a| (1..=256).contains(&a.len())) else {
        b.error(field, "must be a list of 1 to 256 tool names");
        return None;
    };
    let mut names: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{field}[{i}]");
        match item.as_str().map(|n| (n, check_tool_name(n))) {
            Some((_, Err(m))) => b.error(&at, m),
            None => b.error(&at, "must be a tool name"),
            Some((n, Ok(()))) if names.iter().any(|x| x == n) => b.error(&at, "is repeated"),
            Some((n, Ok(()))) => names.push(n.to_string()),
        }
    }
    Some(names)
}

impl Resource for McpServer {
    const NOUN: &'static str = "MCP server";
    const PATH: &'static str = "/api/v1/mcp-servers";
    const TABLE: &'static str = "mcp_servers";
    const ID: &'static str = "mcp_server_id";
    const FROM: &'static str = "mcp_servers r";
    const COLUMNS: &'static str = resource_columns!(
        "mcp_server_id",
        "r.name, r.description, r.url, r.headers, r.allowed_tools, r.timeout_ms, r.tools, \
         (r.tools_listed_at at time zone 'UTC'), r.protocol_version, r.server_info"
    );
    const FIELDS: &'static [&'static str] = &[
        "name",
        "description",
        "url",
        "headers",
        "allowed_tools",
        "timeout_ms",
    ];

    fn to_json(row: &Row) -> Result<Value, ApiError> {
        let mut m = common_json(row)?;
        let allowed = row.json(9)?;
        let tools = match row.json(11)? {
            Value::Array(listed) => Value::Array(
                listed
                    .into_iter()
                    .map(|mut t| {
                        let on_list = allowed.as_array().is_some_and(|a| a.contains(&t["name"]));
                        t["allowed"] = json!(on_list);
                        t
                    })
                    .collect(),
            ),
            _ => Value::Null,
        };
        let listed_at = row.opt_timestamp(12)?.map(sparkops_core::time::rfc3339);
        for (k, v) in [
            ("name", json!(row.text(5)?)),
            ("description", json!(row.opt_text(6)?)),
            ("url", json!(row.text(7)?)),
            ("headers", row.json(8)?),
            ("allowed_tools", allowed),
            ("timeout_ms", json!(row.int(10)?)),
            ("tools", tools),
            ("tools_listed_at", json!(listed_at)),
            ("protocol_version", json!(row.opt_text(13)?)),
            ("server_info", row.json(14)?),
        ] {
            m.insert(k.into(), v);
        }
        Ok(Value::Object(m))
    }

    fn save(tx: &Tx<'_, Db>, ctx: &Work, w: Write<'_>) -> Result<(), ApiError> {
        let mut b = Body::from_value(w.doc)?;
        let name = b.str("name", 64);
        if let Some(Err(m)) = name.as_deref().map(check_server_name) {
            b.error("name", m);
        }
        let description = b.opt_str("description", 2000);
        let url = b.str("url", 2048);
        if let Some(Err(e)) = url.as_deref().map(check_user_url) {
            b.error("url", e);
        }
        let headers = b.opt_object("headers").unwrap_or_default();
        for (field, message) in check_headers(&headers, "headers") {
            b.error(&field, message);
        }
        for name in headers.keys() {
            if PROTOCOL_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                b.error(
                    &format!("headers.{name}"),
                    "is set by the MCP transport and cannot be configured",
                );
            }
        }
        let allowed_tools = read_allowed_tools(&mut b);
        let timeout_ms = b.opt_int("timeout_ms", 100..=300_000).unwrap_or(30_000);
        b.finish()?;
        let (Some(name), Some(url), Some(allowed_tools)) = (name, url, allowed_tools) else {
            return Err(ApiError::unchecked_field());
        };
        // A listing is of one endpoint: a new URL forgets it.
        tx.execute(
            &format!(
                "insert into mcp_servers (mcp_server_id, project_id, name, description, url, headers,
                    allowed_tools, timeout_ms, created_at, updated_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9{AS_TIMESTAMPTZ}, $9{AS_TIMESTAMPTZ})
                 on conflict (mcp_server_id) do update set
                    name = excluded.name, description = excluded.description, url = excluded.url,
                    headers = excluded.headers, allowed_tools = excluded.allowed_tools,
                    timeout_ms = excluded.timeout_ms,
                    tools = case when mcp_servers.url = excluded.url then mcp_servers.tools end,
                    tools_listed_at = case when mcp_servers.url = excluded.url
                        then mcp_servers.tools_listed_at end,
                    version = mcp_servers.version + 1, updated_at = excluded.updated_at"
            ),
            &[
                V::Uuid(w.id.into()),
                V::Uuid(w.project_id.into()),
                V::Text(name),
                description.map(V::Text).unwrap_or(V::Null),
                V::Text(url),
                V::Json(Value::Object(headers)),
                V::Json(json!(allowed_tools)),
                V::Int32(timeout_ms as i32),
                V::Timestamp(ctx.now),
            ],
        )
        .map_err(name_taken("MCP server", "mcp_servers_project_name_key"))?;
        Ok(())
    }

    fn in_use(tx: &Tx<'_, Db>, id: &str) -> Result<Option<String>, ApiError> {
        let rows = tx.query(
            "select a.name from mcp_servers s
             join agents a on a.project_id = s.project_id and a.deleted_at is null
             where s.mcp_server_id = $1
               and exists (select 1 from jsonb_array_elements_text(a.mcp_tools) t
                           where t like 'mcp:' || s.name || '/%')
             order by a.name limit 1",
            &[V::Uuid(id.into())],
        )?;
        Ok(rows.first().map(|r| r.text(0)).transpose()?.map(|agent| {
            format!("the server's tools are offered by agent '{agent}'; change the agent first")
        }))
    }
}

/// `POST /mcp-servers/{id}/refresh`: lists the server's tools now and stores the listing.
/// Answers `{ok, duration_ms, server}` or, when the server could not be listed,
/// `{ok: false, duration_ms, error: {kind, message}}` (the last listing stays).
fn refresh(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, access) = resource::access::<McpServer>(ctx, who, id, Action::Write)?;
    let server =
        mcp::load(ctx, &id)?.ok_or_else(|| ApiError::NotFound(format!("no MCP server {id}")))?;
    let started = Instant::now();
    let listed = mcp::refresh(ctx, &access.project_id, &server)?;
    let duration_ms = started.elapsed().as_millis() as u64;
    Ok(Reply::ok(match listed {
        Ok(_) => json!({
            "ok": true,
            "duration_ms": duration_ms,
            "server": resource::get_json::<McpServer>(ctx, &id)?,
        }),
        Err(e) => json!({
            "ok": false,
            "duration_ms": duration_ms,
            "error": {"kind": e.kind().as_str(), "message": format!("MCP server {}: {e}", server.name)},
        }),
    }))
}
