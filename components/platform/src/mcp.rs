//! MCP servers as tools: a project's Streamable HTTP endpoints (`/api/v1/mcp-servers`),
//! their tools listed (`tools/list`, cached on the server's row) and called (`tools/call`)
//! with the checks of any tool call: the URL rules at call time ([`outbound`] as a URL a
//! user chose), `{{ secret.NAME }}` headers resolved only for the call, the server's
//! timeout over the whole exchange, an answer cap, and the tool's `inputSchema` checked
//! before anything is sent. The protocol's messages are `sparkops_core::mcp`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Read, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::mcp::{self as protocol, RpcError, ToolInfo};
use sparkops_engine::ErrorKind;
use sparkops_engine::step::Failure;

use crate::outbound::{self, Call, CallError, Chosen, Headers, check_user_url, header};
use crate::tool_call::{self, MAX_RESPONSE_BYTES};
use crate::work::Work;

/// The most `tools/list` pages read in one listing.
const MAX_PAGES: usize = 20;

/// A registered MCP server, as a call needs it.
#[derive(Debug, Clone)]
pub struct Server {
    pub id: String,
    pub name: String,
    pub url: String,
    /// Header values as configured (literals or secret references).
    pub headers: Value,
    pub allowed_tools: Vec<String>,
    pub timeout: Duration,
    /// The last listing, if any.
    pub tools: Option<Vec<ToolInfo>>,
}

impl Server {
    /// Whether the server's allow-list names `tool`.
    pub fn allows(&self, tool: &str) -> bool {
        self.allowed_tools.iter().any(|t| t == tool)
    }

    /// The listed tool `name`, if the last listing has it.
    pub fn tool(&self, name: &str) -> Option<&ToolInfo> {
        self.tools.as_ref()?.iter().find(|t| t.name == name)
    }
}

/// The select list [`Server::from_row`] reads.
const COLUMNS: &str = "mcp_server_id::text, name, url, headers, allowed_tools, timeout_ms, tools";

impl Server {
    fn from_row(r: &sparkops_core::db::Row) -> Result<Self, ApiError> {
        let strings = |v: Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let tools = match r.json(6)? {
            Value::Array(items) => Some(
                items
                    .iter()
                    .map(|t| ToolInfo {
                        name: t["name"].as_str().unwrap_or_default().to_string(),
                        description: t["description"].as_str().unwrap_or_default().to_string(),
                        input_schema: t["input_schema"].clone(),
                    })
                    .collect(),
            ),
            _ => None,
        };
        Ok(Server {
            id: r.text(0)?,
            name: r.text(1)?,
            url: r.text(2)?,
            headers: r.json(3)?,
            allowed_tools: strings(r.json(4)?),
            timeout: Duration::from_millis(r.int(5)? as u64),
            tools,
        })
    }
}

/// The live servers of `project_id` named in `names`.
pub fn load_named<R: Read + ?Sized>(
    db: &R,
    project_id: &str,
    names: &[&str],
) -> Result<Vec<Server>, ApiError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    db.read(
        &format!(
            "select {COLUMNS} from mcp_servers
             where project_id = $1 and deleted_at is null and name = any(string_to_array($2, ','))"
        ),
        &[V::Uuid(project_id.into()), V::Text(names.join(","))],
    )?
    .iter()
    .map(Server::from_row)
    .collect()
}

/// The live server `id` (the caller has checked access).
pub fn load(ctx: &mut Work, id: &str) -> Result<Option<Server>, ApiError> {
    ctx.db()?
        .query(
            &format!(
                "select {COLUMNS} from mcp_servers where mcp_server_id = $1 and deleted_at is null"
            ),
            &[V::Uuid(id.into())],
        )?
        .first()
        .map(Server::from_row)
        .transpose()
}

/// Why an exchange with a server failed.
#[derive(Debug)]
pub enum McpError {
    /// The call was refused, timed out or failed on the way.
    Call(CallError),
    /// An HTTP error status without a JSON-RPC error in it.
    Status { status: u16, detail: String },
    /// The server's JSON-RPC error.
    Rpc(RpcError),
    /// Not the protocol: no response, a revision this client does not speak, a bad result.
    Protocol(String),
    /// The server's configuration cannot be used (a header's secret is missing).
    Config(String),
    /// The control plane's own failure (its database), not the server's.
    Internal(ApiError),
}

impl McpError {
    /// The step error kind it makes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            McpError::Call(CallError::Timeout) => ErrorKind::Timeout,
            McpError::Call(e) if e.refused() => ErrorKind::PolicyViolation,
            McpError::Config(_) => ErrorKind::Validation,
            McpError::Internal(_) => ErrorKind::Internal,
            _ => ErrorKind::ToolError,
        }
    }

    /// The step failure it makes, its message `message`: no further attempt when another
    /// cannot do better (a refused destination, a configuration that lacks a secret).
    pub fn failure(&self, message: String) -> Failure {
        let failure = Failure::new(self.kind(), message);
        match self {
            McpError::Call(e) if e.refused() => failure.final_attempt(),
            McpError::Config(_) => failure.final_attempt(),
            _ => failure,
        }
    }
}

impl std::fmt::Display for McpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            McpError::Call(e) => write!(f, "{e}"),
            McpError::Status { status, detail } => write!(f, "answered {status}: {detail}"),
            McpError::Rpc(e) => write!(f, "{e}"),
            McpError::Protocol(m) | McpError::Config(m) => f.write_str(m),
            McpError::Internal(e) => write!(f, "{e:?}"),
        }
    }
}

/// A server's URL and headers, resolved for calls (secrets included: never logged).
struct Endpoint {
    url: url::Url,
    headers: Vec<(String, String)>,
}

/// One protocol session with a server: initialized once, then used for any number of
/// requests, each within the deadline it is given.
pub struct Session {
    endpoint: Endpoint,
    session_id: Option<String>,
    pub protocol_version: &'static str,
    pub server_info: Value,
    next_id: u64,
}

impl Session {
    /// Resolves the server's headers and URL and initializes a session, by `deadline`.
    pub fn open(
        ctx: &mut Work,
        project_id: &str,
        server: &Server,
        deadline: Instant,
    ) -> Result<Session, McpError> {
        let url = check_user_url(&server.url)
            .map_err(|e| McpError::Call(CallError::Denied(format!("the url {e}"))))?;
        let headers = tool_call::resolve_headers(ctx, project_id, &server.headers, "headers")
            .map_err(McpError::Internal)?
            .map_err(|problems| {
                McpError::Config(
                    problems
                        .into_iter()
                        .map(|p| format!("{}: {}", p.field, p.message))
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            })?;
        // No connection is held while the server takes its time.
        ctx.release_db();
        let mut session = Session {
            endpoint: Endpoint { url, headers },
            session_id: None,
            protocol_version: protocol::PROTOCOL_VERSIONS[0],
            server_info: Value::Null,
            next_id: 0,
        };
        session.initialize(deadline)?;
        Ok(session)
    }

    fn initialize(&mut self, deadline: Instant) -> Result<(), McpError> {
        self.session_id = None;
        self.next_id += 1;
        let (result, headers) = self.post(
            &protocol::initialize(self.next_id),
            Some(self.next_id),
            deadline,
        )?;
        let result = result.ok_or_else(|| McpError::Protocol("no initialize result".into()))?;
        self.protocol_version = protocol::negotiated(&result).map_err(McpError::Protocol)?;
        self.server_info = result["serverInfo"].clone();
        self.session_id = header(&headers, "mcp-session-id").map(str::to_string);
        self.post(
            &protocol::notification("notifications/initialized"),
            None,
            deadline,
        )?;
        Ok(())
    }

    /// Sends `method` with `params` and answers its result. A session the server has
    /// forgotten (`404` to a request that carries its id) is initialized again once.
    pub fn request(
        &mut self,
        method: &str,
        params: Value,
        deadline: Instant,
    ) -> Result<Value, McpError> {
        for fresh in [false, true] {
            self.next_id += 1;
            let id = self.next_id;
            match self.post(
                &protocol::request(id, method, params.clone()),
                Some(id),
                deadline,
            ) {
                Err(McpError::Status { status: 404, .. })
                    if !fresh && self.session_id.is_some() =>
                {
                    self.initialize(deadline)?;
                }
                Err(e) => return Err(e),
                Ok((result, _)) => {
                    return result.ok_or_else(|| {
                        McpError::Protocol(format!("the answer to {method} holds no response"))
                    });
                }
            }
        }
        Err(McpError::Protocol(
            "the server forgot the session twice".into(),
        ))
    }

    /// Every tool the server lists (up to [`MAX_PAGES`] pages).
    pub fn list_tools(&mut self, deadline: Instant) -> Result<Vec<ToolInfo>, McpError> {
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let result = self.request("tools/list", params, deadline)?;
            let (page, next) = protocol::tools_page(&result).map_err(McpError::Protocol)?;
            tools.extend(page);
            match next {
                Some(n) => cursor = Some(n),
                None => return Ok(tools),
            }
        }
        Ok(tools)
    }

    /// Ends the session (`DELETE`), best effort: a server may refuse (`405`).
    pub fn close(self) {
        let Some(id) = &self.session_id else {
            return;
        };
        let mut headers = self.endpoint.headers.clone();
        headers.push(("mcp-session-id".into(), id.clone()));
        headers.push(("mcp-protocol-version".into(), self.protocol_version.into()));
        let _ = outbound::send(Call {
            method: "DELETE",
            url: &self.endpoint.url,
            chosen: Chosen::ByUser,
            headers,
            body: None,
            timeout: Duration::from_secs(2),
            max_response_bytes: 4096,
        });
    }

    /// POSTs one message; for a request (`id`), reads the answer until its response and
    /// answers the result (a JSON-RPC error as [`McpError::Rpc`]).
    fn post(
        &self,
        message: &Value,
        id: Option<u64>,
        deadline: Instant,
    ) -> Result<(Option<Value>, Headers), McpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(McpError::Call(CallError::Timeout));
        }
        let mut headers = self.endpoint.headers.clone();
        headers.push(("content-type".into(), "application/json".into()));
        headers.push(("accept".into(), protocol::ACCEPT.into()));
        headers.push(("user-agent".into(), "Spark-Ops".into()));
        if let Some(session) = &self.session_id {
            headers.push(("mcp-session-id".into(), session.clone()));
        }
        if message["method"] != "initialize" {
            headers.push(("mcp-protocol-version".into(), self.protocol_version.into()));
        }
        let content_type =
            |h: &[(String, String)]| header(h, "content-type").unwrap_or_default().to_string();
        let answer = outbound::send_until(
            Call {
                method: "POST",
                url: &self.endpoint.url,
                chosen: Chosen::ByUser,
                headers,
                body: Some(message.to_string().into_bytes()),
                timeout: left,
                max_response_bytes: MAX_RESPONSE_BYTES,
            },
            // An event stream may stay open after the response: stop reading at it.
            |h, body| {
                id.is_some_and(|id| protocol::response_in(&content_type(h), body, id).is_some())
            },
        )
        .map_err(McpError::Call)?;
        let response = id
            .and_then(|id| protocol::response_in(&content_type(&answer.headers), &answer.body, id));
        match response {
            Some(Err(e)) => Err(McpError::Rpc(e)),
            _ if !(200..300).contains(&answer.status) => Err(McpError::Status {
                status: answer.status,
                detail: String::from_utf8_lossy(&answer.body)
                    .chars()
                    .take(300)
                    .collect(),
            }),
            Some(Ok(result)) => Ok((Some(result), answer.headers)),
            None => Ok((None, answer.headers)),
        }
    }
}

/// Lists the server's tools now and stores the listing on its row; the listing.
pub fn refresh(
    ctx: &mut Work,
    project_id: &str,
    server: &Server,
) -> Result<Result<Vec<ToolInfo>, McpError>, ApiError> {
    let deadline = Instant::now() + server.timeout;
    let listed = Session::open(ctx, project_id, server, deadline).and_then(|mut session| {
        let tools = session.list_tools(deadline);
        let info = (session.protocol_version, session.server_info.clone());
        session.close();
        tools.map(|t| (t, info))
    });
    let (tools, (version, info)) = match listed {
        Ok(l) => l,
        Err(McpError::Internal(e)) => return Err(e),
        Err(e) => return Ok(Err(e)),
    };
    let listing: Vec<Value> = tools.iter().map(ToolInfo::to_json).collect();
    let now = ctx.now;
    ctx.db()?.execute(
        &format!(
            "update mcp_servers set tools = $2, tools_listed_at = $3{AS_TIMESTAMPTZ},
                protocol_version = $4, server_info = $5
             where mcp_server_id = $1 and deleted_at is null"
        ),
        &[
            V::Uuid(server.id.clone()),
            V::Json(Value::Array(listing)),
            V::Timestamp(now),
            V::Text(version.into()),
            V::Json(info),
        ],
    )?;
    Ok(Ok(tools))
}

/// The sessions one agent step holds, one per server, opened on first use and closed
/// when the step is done with them.
#[derive(Default)]
pub struct Sessions(HashMap<String, Session>);

impl Sessions {
    /// Calls `tool` of `server` with `arguments` (already checked against its schema):
    /// the tool's result as `(text for the model, whether the tool reported an error)`.
    pub fn call_tool(
        &mut self,
        ctx: &mut Work,
        project_id: &str,
        server: &Server,
        tool: &str,
        arguments: &Value,
        step_deadline: Instant,
    ) -> Result<(String, bool), McpError> {
        let deadline = step_deadline.min(Instant::now() + server.timeout);
        if !self.0.contains_key(&server.id) {
            let session = Session::open(ctx, project_id, server, deadline)?;
            self.0.insert(server.id.clone(), session);
        }
        let session = self.0.get_mut(&server.id).expect("opened above");
        let result = session.request(
            "tools/call",
            json!({"name": tool, "arguments": arguments}),
            deadline,
        );
        if result.is_err() {
            // A session that failed a call is not trusted with the next.
            if let Some(s) = self.0.remove(&server.id) {
                s.close();
            }
        }
        Ok(protocol::tool_result(&result?))
    }

    /// Ends every session.
    pub fn close(self) {
        for (_, session) in self.0 {
            session.close();
        }
    }
}
