//! Tools (API.md "Tools"): HTTP endpoints with a JSON Schema input (and optionally output).
//! URLs are checked where they point (no internal addresses unless configuration allows
//! them); header values are literals or `{{ secret.NAME }}` references, never resolved here.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Row, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::input::Body;
use sparkops_core::roles::Action;
use sparkops_core::tool::check_headers;
use sparkops_platform::db::Db;
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::outbound::check_user_url;
use sparkops_platform::pipeline::{self, Ctx, Principal, Work};
use sparkops_platform::resource::{self, Resource, Write, common_json, name_taken};
use sparkops_platform::resource_columns;
use sparkops_platform::tool_call;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

mod mcp_servers;

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    if let Some(segments) = req.segments(mcp_servers::McpServer::PATH) {
        return mcp_servers::route(ctx, req, &who, &segments);
    }
    let segments = req.segments(Tool::PATH).unwrap_or_default();
    match (&req.method, segments.as_slice()) {
        (Method::Post, [id, "test"]) => test(ctx, req, &who, id),
        (_, [_, "test"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["POST"],
        }),
        _ => resource::serve_or_404::<Tool>(ctx, req, &who, &segments),
    }
}

struct Tool;

/// A tool name: `^[a-z][a-z0-9_]{0,63}$`, usable as a model's function name.
fn check_name(name: &str) -> Result<(), &'static str> {
    let mut bytes = name.bytes();
    let ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err("must match ^[a-z][a-z0-9_]{0,63}$")
    }
}

/// The `http` object: method, URL (checked where it points), headers, timeout.
struct Http {
    method: &'static str,
    url: String,
    headers: Value,
    timeout_ms: i64,
}

fn read_http(b: &mut Body) -> Option<Http> {
    let Some(http) = b.opt_object("http") else {
        if b.is_clean() {
            b.error("http", "is required");
        }
        return None;
    };
    let mut h = match Body::from_value(Value::Object(http)) {
        Ok(h) => h,
        Err(_) => return None,
    };
    let method = h.one_of("method", &["GET", "POST", "PUT", "PATCH", "DELETE"], "POST");
    let url = h.str("url", 2048);
    let headers = h.opt_object("headers").unwrap_or_default();
    let timeout_ms = h.opt_int("timeout_ms", 100..=300_000).unwrap_or(30_000);
    let nested = h.finish().err();
    if let Some(ApiError::Validation { errors, .. }) = nested {
        for e in errors {
            b.error(&format!("http.{}", e.field), e.message);
        }
    }
    if let Some(Err(e)) = url.as_deref().map(check_user_url) {
        b.error("http.url", e);
    }
    for (field, message) in check_headers(&headers, "http.headers") {
        b.error(&field, message);
    }
    Some(Http {
        method,
        url: url?,
        headers: Value::Object(headers),
        timeout_ms,
    })
}

impl Resource for Tool {
    const NOUN: &'static str = "tool";
    const PATH: &'static str = "/api/v1/tools";
    const TABLE: &'static str = "tools";
    const ID: &'static str = "tool_id";
    const FROM: &'static str = "tools r";
    const COLUMNS: &'static str = resource_columns!(
        "tool_id",
        "r.name, r.description, r.input_schema, r.output_schema, r.method, r.url, r.headers, r.timeout_ms"
    );
    const FIELDS: &'static [&'static str] = &[
        "name",
        "description",
        "input_schema",
        "output_schema",
        "http",
    ];

    fn to_json(row: &Row) -> Result<Value, ApiError> {
        let mut m = common_json(row)?;
        for (k, v) in [
            ("name", json!(row.text(5)?)),
            ("description", json!(row.opt_text(6)?)),
            ("input_schema", row.json(7)?),
            ("output_schema", row.json(8)?),
            (
                "http",
                json!({
                    "method": row.text(9)?,
                    "url": row.text(10)?,
                    "headers": row.json(11)?,
                    "timeout_ms": row.int(12)?,
                }),
            ),
        ] {
            m.insert(k.into(), v);
        }
        Ok(Value::Object(m))
    }

    fn save(tx: &Tx<'_, Db>, ctx: &Work, w: Write<'_>) -> Result<(), ApiError> {
        let mut b = Body::from_value(w.doc)?;
        let name = b.str("name", 64);
        if let Some(Err(m)) = name.as_deref().map(check_name) {
            b.error("name", m);
        }
        let description = b.str("description", 2000);
        let input_schema = b.opt_schema("input_schema", true);
        if input_schema.is_none() && b.is_clean() {
            b.error("input_schema", "is required");
        }
        let output_schema = b.opt_schema("output_schema", false);
        let http = read_http(&mut b);
        b.finish()?;
        let (Some(name), Some(description), Some(input_schema), Some(http)) =
            (name, description, input_schema, http)
        else {
            return Err(ApiError::unchecked_field());
        };
        tx.execute(
            &format!(
                "insert into tools (tool_id, project_id, name, description, input_schema, output_schema,
                    method, url, headers, timeout_ms, created_at, updated_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11{AS_TIMESTAMPTZ}, $11{AS_TIMESTAMPTZ})
                 on conflict (tool_id) do update set
                    name = excluded.name, description = excluded.description,
                    input_schema = excluded.input_schema, output_schema = excluded.output_schema,
                    method = excluded.method, url = excluded.url, headers = excluded.headers,
                    timeout_ms = excluded.timeout_ms,
                    version = tools.version + 1, updated_at = excluded.updated_at"
            ),
            &[
                V::Uuid(w.id.into()),
                V::Uuid(w.project_id.into()),
                V::Text(name),
                V::Text(description),
                V::Json(input_schema),
                output_schema.map(V::Json).unwrap_or(V::Null),
                V::Text(http.method.into()),
                V::Text(http.url),
                V::Json(http.headers),
                V::Int32(http.timeout_ms as i32),
                V::Timestamp(ctx.now),
            ],
        )
        .map_err(name_taken("tool", "tools_project_name_key"))?;
        Ok(())
    }

    fn in_use(tx: &Tx<'_, Db>, id: &str) -> Result<Option<String>, ApiError> {
        let agents = tx.query(
            "select a.name from agent_tools t join agents a on a.agent_id = t.agent_id
             where t.tool_id = $1 and a.deleted_at is null order by a.name limit 1",
            &[V::Uuid(id.into())],
        )?;
        if let Some(row) = agents.first() {
            return Ok(Some(format!(
                "the tool is offered by agent '{}'; change the agent first",
                row.text(0)?
            )));
        }
        resource::used_by_workflows(tx, "tool_id", id, "tool")
    }
}

/// `POST /tools/{id}/test {input}`: makes the real call with the checks a run makes (see
/// [`tool_call::call`]) and answers what came back.
fn test(ctx: &mut Ctx, req: &HttpRequest, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, access) = resource::access::<Tool>(ctx, who, id, Action::Write)?;
    let tool = resource::get_json::<Tool>(ctx, &id)?;
    let mut b = Body::parse(&req.body)?;
    let input = b.opt_value("input").unwrap_or_else(|| json!({}));
    b.finish()?;
    let key = format!("tool-test-{}", ctx.new_id());
    Ok(Reply::ok(tool_call::call(
        ctx,
        &access.project_id,
        &tool,
        &input,
        &key,
    )?))
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn tool_names_are_function_names() {
        assert!(check_name("get_weather2").is_ok());
        for bad in ["", "Get", "2x", "get-weather", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
