//! The client side of the Model Context Protocol as Spark-Ops speaks it: JSON-RPC 2.0
//! messages over the Streamable HTTP transport, for listing a server's tools and calling
//! them. Pure functions over bytes and JSON; `sparkops_platform::mcp` sends them.
//!
//! Written from the specification (revisions 2025-03-26, 2025-06-18 and 2025-11-25): the
//! client proposes its latest revision in `initialize` and goes on with whichever of its
//! revisions the server answers (any other ends the exchange); every later request
//! carries `MCP-Protocol-Version` and the `Mcp-Session-Id` the server assigned, if any. A
//! POST is answered with one JSON object or an event stream (`text/event-stream`) that
//! carries the response among other messages.

use serde_json::{Value, json};

/// The revisions this client speaks, latest first.
pub const PROTOCOL_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

/// The `Accept` header of every POST: the transport requires both.
pub const ACCEPT: &str = "application/json, text/event-stream";

/// A JSON-RPC request.
pub fn request(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// A JSON-RPC notification (no id, no response).
pub fn notification(method: &str) -> Value {
    json!({"jsonrpc": "2.0", "method": method})
}

/// The `initialize` request: the latest revision, no client capabilities (Spark-Ops
/// offers a server no sampling, roots or elicitation).
pub fn initialize(id: u64) -> Value {
    request(
        id,
        "initialize",
        json!({
            "protocolVersion": PROTOCOL_VERSIONS[0],
            "capabilities": {},
            "clientInfo": {"name": "Spark-Ops", "version": env!("CARGO_PKG_VERSION")},
        }),
    )
}

/// The revision an `initialize` result settles on, when this client speaks it.
pub fn negotiated(result: &Value) -> Result<&'static str, String> {
    let answered = result["protocolVersion"].as_str().unwrap_or_default();
    PROTOCOL_VERSIONS
        .into_iter()
        .find(|v| *v == answered)
        .ok_or_else(|| {
            format!(
                "the server speaks protocol revision '{answered}', and Spark-Ops speaks {}",
                PROTOCOL_VERSIONS.join(", ")
            )
        })
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error {}: {}", self.code, self.message)
    }
}

/// The response to request `id` in a POST's answer, read as its `Content-Type` says:
/// `None` while it has not arrived (an event stream still open, or an answer without it).
/// Only complete events of a stream are read, so a partial body can be asked again as
/// more arrives.
pub fn response_in(content_type: &str, body: &[u8], id: u64) -> Option<Result<Value, RpcError>> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if media == "text/event-stream" {
        events(body)
            .filter_map(|data| serde_json::from_str::<Value>(&data).ok())
            .find_map(|message| response_to(&message, id))
    } else {
        serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|message| response_to(&message, id))
    }
}

/// The response to `id` in one message (or a batch of them, which 2025-03-26 allowed).
fn response_to(message: &Value, id: u64) -> Option<Result<Value, RpcError>> {
    if let Value::Array(batch) = message {
        return batch.iter().find_map(|m| response_to(m, id));
    }
    if message["id"].as_u64() != Some(id) || message.get("method").is_some() {
        return None;
    }
    if let Some(error) = message.get("error") {
        return Some(Err(RpcError {
            code: error["code"].as_i64().unwrap_or(0),
            message: error["message"]
                .as_str()
                .unwrap_or("no message")
                .chars()
                .take(500)
                .collect(),
        }));
    }
    message.get("result").cloned().map(Ok)
}

/// The `data` of each complete event of an event stream (lines joined by `\n`).
fn events(body: &[u8]) -> impl Iterator<Item = String> + '_ {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    let complete = match text.rfind("\n\n") {
        Some(end) => text[..end].to_string(),
        None => String::new(),
    };
    complete
        .split("\n\n")
        .map(|event| {
            event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|data| !data.is_empty())
        .collect::<Vec<_>>()
        .into_iter()
}

/// One tool as a server lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolInfo {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
}

impl ToolInfo {
    pub fn to_json(&self) -> Value {
        json!({"name": self.name, "description": self.description, "input_schema": self.input_schema})
    }
}

/// A `tools/list` result: its tools (those whose names this client can use) and the
/// cursor of the next page.
pub fn tools_page(result: &Value) -> Result<(Vec<ToolInfo>, Option<String>), String> {
    let tools = result["tools"]
        .as_array()
        .ok_or("the tools/list result has no tools array")?;
    let listed = tools
        .iter()
        .filter_map(|t| {
            let name = t["name"].as_str()?;
            check_tool_name(name).ok()?;
            let input_schema = match &t["inputSchema"] {
                Value::Object(o) => Value::Object(o.clone()),
                _ => json!({"type": "object"}),
            };
            Some(ToolInfo {
                name: name.to_string(),
                description: t["description"]
                    .as_str()
                    .or(t["title"].as_str())
                    .unwrap_or_default()
                    .chars()
                    .take(2000)
                    .collect(),
                input_schema,
            })
        })
        .collect();
    let next = result["nextCursor"]
        .as_str()
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    Ok((listed, next))
}

/// A `tools/call` result as the model reads it, and whether the tool reported an error
/// (`isError`: the tool ran and failed, which the model may correct).
pub fn tool_result(result: &Value) -> (String, bool) {
    let is_error = result["isError"] == true;
    let mut parts: Vec<String> = Vec::new();
    for item in result["content"].as_array().into_iter().flatten() {
        let part = match item["type"].as_str().unwrap_or_default() {
            "text" => item["text"].as_str().unwrap_or_default().to_string(),
            "resource" => match item["resource"]["text"].as_str() {
                Some(text) => text.to_string(),
                None => format!(
                    "[resource {}]",
                    item["resource"]["uri"].as_str().unwrap_or("?")
                ),
            },
            "resource_link" => format!("[resource {}]", item["uri"].as_str().unwrap_or("?")),
            other => format!(
                "[{other} content, {}]",
                item["mimeType"].as_str().unwrap_or("unknown type")
            ),
        };
        parts.push(part);
    }
    if parts.is_empty()
        && let Some(structured) = result.get("structuredContent")
    {
        parts.push(structured.to_string());
    }
    (parts.join("\n"), is_error)
}

/// A tool name as the specification allows it: 1 to 128 of letters, digits, `_`, `-`, `.`.
pub fn check_tool_name(name: &str) -> Result<(), &'static str> {
    if (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        Ok(())
    } else {
        Err("must be 1 to 128 letters, digits, '_', '-' or '.'")
    }
}

/// An MCP server's name in a project: `^[a-z][a-z0-9_-]{0,63}$`.
pub fn check_server_name(name: &str) -> Result<(), &'static str> {
    let mut bytes = name.bytes();
    if bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
    {
        Ok(())
    } else {
        Err("must match ^[a-z][a-z0-9_-]{0,63}$")
    }
}

/// `mcp:<server>/<tool>` as agents and policies name a server's tool: `(server, tool)`,
/// where `tool` may be `*` (every tool of the server) when `wildcard`.
pub fn parse_ref(reference: &str, wildcard: bool) -> Result<(&str, &str), &'static str> {
    const FORM: &str = "must be mcp:<server>/<tool>";
    let (server, tool) = reference
        .strip_prefix("mcp:")
        .and_then(|r| r.split_once('/'))
        .ok_or(FORM)?;
    check_server_name(server).map_err(|_| FORM)?;
    if !(wildcard && tool == "*") {
        check_tool_name(tool).map_err(|_| FORM)?;
    }
    Ok((server, tool))
}

/// Whether `allowed` (a policy's `allowed_tools` entry) covers the MCP tool `reference`.
pub fn allows(allowed: &str, reference: &str) -> bool {
    match (parse_ref(allowed, true), parse_ref(reference, false)) {
        (Ok((server, "*")), Ok((s, _))) => server == s,
        (Ok(a), Ok(r)) => a == r,
        _ => false,
    }
}

/// The function name a model is offered for a server's tool: `mcp__<server>__<tool>`, its
/// dots as `_` (providers accept `^[a-zA-Z0-9_-]{1,64}$`). `None` when that is too long.
pub fn function_name(server: &str, tool: &str) -> Option<String> {
    let name = format!("mcp__{server}__{}", tool.replace('.', "_"));
    (name.len() <= 64).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_settles_the_revision_among_the_clients() {
        assert_eq!(initialize(1)["params"]["protocolVersion"], "2025-11-25");
        assert_eq!(
            negotiated(&json!({"protocolVersion": "2025-06-18"})),
            Ok("2025-06-18")
        );
        assert!(
            negotiated(&json!({"protocolVersion": "2024-11-05"}))
                .unwrap_err()
                .contains("2024-11-05")
        );
        assert!(negotiated(&json!({})).is_err());
    }

    #[test]
    fn a_json_answer_holds_the_response_or_its_error() {
        let ok = br#"{"jsonrpc":"2.0","id":3,"result":{"tools":[]}}"#;
        assert_eq!(
            response_in("application/json", ok, 3),
            Some(Ok(json!({"tools": []})))
        );
        assert_eq!(response_in("application/json", ok, 4), None);
        let err = br#"{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"Unknown tool"}}"#;
        assert_eq!(
            response_in("application/json; charset=utf-8", err, 3),
            Some(Err(RpcError {
                code: -32602,
                message: "Unknown tool".into()
            }))
        );
        let batch = br#"[{"jsonrpc":"2.0","method":"x"},{"jsonrpc":"2.0","id":2,"result":1}]"#;
        assert_eq!(
            response_in("application/json", batch, 2),
            Some(Ok(json!(1)))
        );
    }

    #[test]
    fn an_event_stream_is_read_event_by_event_and_only_whole_events() {
        let stream = "event: message\r\nid: 1\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\r\n\r\n\
                      data: {\"jsonrpc\":\"2.0\",\"id\":7,\r\ndata: \"result\":{\"ok\":true}}\r\n\r\n";
        assert_eq!(
            response_in("text/event-stream", stream.as_bytes(), 7),
            Some(Ok(json!({"ok": true})))
        );
        // The same event cut before its blank line is not read yet.
        let cut = &stream[..stream.len() - 4];
        assert_eq!(response_in("text/event-stream", cut.as_bytes(), 7), None);
        // A request from the server with the same id is not the response.
        let request = "data: {\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"ping\"}\n\n";
        assert_eq!(
            response_in("text/event-stream", request.as_bytes(), 7),
            None
        );
    }

    #[test]
    fn tools_pages_keep_usable_names_and_the_cursor() {
        let (tools, next) = tools_page(&json!({
            "tools": [
                {"name": "search", "description": "Search", "inputSchema": {"type": "object", "required": ["q"]}},
                {"name": "bad name"},
                {"name": "fetch.page", "title": "Fetch"},
            ],
            "nextCursor": "p2",
        }))
        .unwrap();
        assert_eq!(
            tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["search", "fetch.page"]
        );
        assert_eq!(tools[1].description, "Fetch");
        assert_eq!(tools[1].input_schema, json!({"type": "object"}));
        assert_eq!(next.as_deref(), Some("p2"));
        assert!(tools_page(&json!({})).is_err());
    }

    #[test]
    fn tool_results_read_as_text_for_the_model() {
        let (text, error) = tool_result(&json!({"content": [
            {"type": "text", "text": "3 degrees"},
            {"type": "image", "data": "AAAA", "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "file:///a", "text": "inline"}},
        ]}));
        assert_eq!(text, "3 degrees\n[image content, image/png]\ninline");
        assert!(!error);
        let (text, error) =
            tool_result(&json!({"content": [], "structuredContent": {"t": 3}, "isError": true}));
        assert_eq!((text.as_str(), error), ("{\"t\":3}", true));
    }

    #[test]
    fn references_name_a_server_and_a_tool() {
        assert_eq!(parse_ref("mcp:docs/search", false), Ok(("docs", "search")));
        assert_eq!(parse_ref("mcp:docs/*", true), Ok(("docs", "*")));
        for bad in [
            "docs/search",
            "mcp:docs",
            "mcp:Docs/x",
            "mcp:docs/*",
            "mcp:docs/a b",
        ] {
            assert!(parse_ref(bad, false).is_err(), "{bad}");
        }
        assert!(allows("mcp:docs/*", "mcp:docs/search"));
        assert!(allows("mcp:docs/search", "mcp:docs/search"));
        assert!(!allows("mcp:docs/fetch", "mcp:docs/search"));
        assert!(!allows("mcp:other/*", "mcp:docs/search"));
        assert_eq!(
            function_name("docs", "fetch.page").as_deref(),
            Some("mcp__docs__fetch_page")
        );
        assert_eq!(function_name("docs", &"x".repeat(60)), None);
    }
}
