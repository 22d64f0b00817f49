//! MCP servers as tools end to end: a fake MCP server on loopback speaking the Streamable
//! HTTP transport as the specification (2025-06-18) describes it — `initialize` answered
//! with a session id and the server's own revision, every later request checked for that
//! session and the negotiated `MCP-Protocol-Version`, notifications answered `202`, answers
//! as JSON or as an event stream (which it keeps open after the response), `DELETE` ending
//! the session — written here, not with the project's client. A fake provider drives the
//! agent; the real components run against a real Postgres and Redis.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};

use crate::common::{Api, FakeServer, User, openai};

/// The revision the fake speaks: older than the client's latest, so the client must take it.
const REVISION: &str = "2025-06-18";
pub(crate) const TOKEN: &str = "mcp-token-7f3a";

/// One request the fake received.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    /// The JSON-RPC method (`None` for a DELETE or a body that is not JSON-RPC).
    rpc: Option<String>,
    params: Value,
    session: Option<String>,
    version: Option<String>,
}

#[derive(Default)]
struct State {
    sessions: HashSet<String>,
    log: Vec<Received>,
}

pub(crate) struct FakeMcp {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, body: Value, session: Option<&str>) -> http::Response<Body> {
    let mut res = http::Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if let Some(s) = session {
        res.headers_mut()
            .insert("mcp-session-id", s.parse().unwrap());
    }
    res
}

fn empty(status: u16) -> http::Response<Body> {
    let mut res = http::Response::new(Full::new(Bytes::new()).boxed());
    *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
    res
}

/// An event stream: a progress notification, then `response`, then the stream held open
/// for a minute (the specification lets a server keep it; a client must not wait for it).
fn stream(response: Value) -> http::Response<Body> {
    let events = [
        json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "working"}}),
        response,
    ]
    .map(|m| {
        Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
            "event: message\ndata: {m}\n\n"
        ))))
    });
    let held = futures::stream::once(async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(Frame::data(Bytes::new()))
    });
    let body = StreamBody::new(futures::StreamExt::chain(
        futures::stream::iter(events),
        held,
    ));
    let mut res = http::Response::new(BodyExt::boxed(body));
    res.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    res
}

fn tool(name: &str, schema: Value) -> Value {
    json!({"name": name, "description": format!("The {name} tool"), "inputSchema": schema})
}

fn result(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

impl FakeMcp {
    pub(crate) async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            async move { Ok::<_, hyper::Error>(Self::answer(&state, req).await) }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    fn log(&self) -> Vec<Received> {
        self.state.lock().unwrap().log.clone()
    }

    /// The tools called, in order, with their arguments.
    pub(crate) fn calls(&self) -> Vec<(String, Value)> {
        self.log()
            .into_iter()
            .filter(|r| r.rpc.as_deref() == Some("tools/call"))
            .map(|r| {
                (
                    r.params["name"].as_str().unwrap().to_string(),
                    r.params["arguments"].clone(),
                )
            })
            .collect()
    }

    async fn answer(
        state: &Mutex<State>,
        req: http::Request<hyper::body::Incoming>,
    ) -> http::Response<Body> {
        let (parts, body) = req.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let message: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let session = header("mcp-session-id");
        state.lock().unwrap().log.push(Received {
            method: parts.method.to_string(),
            rpc: message["method"].as_str().map(str::to_string),
            params: message["params"].clone(),
            session: session.clone(),
            version: header("mcp-protocol-version"),
        });
        if parts.uri.path() != "/mcp" {
            return empty(404);
        }
        if header("authorization").as_deref() != Some(&format!("Bearer {TOKEN}")) {
            return empty(401);
        }
        let known = |s: &Option<String>| {
            s.as_ref()
                .is_some_and(|s| state.lock().unwrap().sessions.contains(s))
        };
        match parts.method.as_str() {
            "DELETE" => {
                let Some(s) = &session else { return empty(400) };
                return if state.lock().unwrap().sessions.remove(s) {
                    empty(200)
                } else {
                    empty(404)
                };
            }
            "POST" => {}
            _ => return empty(405),
        }
        // The transport: a POST accepts both answer forms, and says it sends JSON.
        let accept = header("accept").unwrap_or_default();
        if !(accept.contains("application/json") && accept.contains("text/event-stream")) {
            return empty(406);
        }
        if !header("content-type").is_some_and(|c| c.starts_with("application/json")) {
            return empty(415);
        }
        let id = message["id"].clone();
        if message["method"] == "initialize" {
            let session = uuid::Uuid::new_v4().to_string();
            state.lock().unwrap().sessions.insert(session.clone());
            // The client proposes its latest; this server answers the one it speaks.
            let body = result(
                &id,
                json!({"protocolVersion": REVISION,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": "fake-docs", "version": "1.2.0"}}),
            );
            return full(200, body, Some(&session));
        }
        if session.is_none() {
            return empty(400);
        }
        if !known(&session) {
            return empty(404);
        }
        if header("mcp-protocol-version").as_deref() != Some(REVISION) {
            return full(
                400,
                json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32600, "message": "bad MCP-Protocol-Version"}}),
                None,
            );
        }
        if id.is_null() {
            // A notification (notifications/initialized).
            return empty(202);
        }
        let params = &message["params"];
        match message["method"].as_str().unwrap_or_default() {
            "tools/list" => match params["cursor"].as_str() {
                None => full(
                    200,
                    result(
                        &id,
                        json!({"tools": [tool("search", json!({"type": "object",
                            "properties": {"query": {"type": "string"}}, "required": ["query"]}))],
                            "nextCursor": "page-2"}),
                    ),
                    None,
                ),
                Some("page-2") => stream(result(
                    &id,
                    json!({"tools": [
                        tool("fetch.page", json!({"type": "object", "properties": {"url": {"type": "string"}}})),
                        tool("broken", json!({"type": "object"})),
                        tool("slow", json!({"type": "object"})),
                        tool("delete_all", json!({"type": "object"})),
                    ]}),
                )),
                Some(_) => full(
                    200,
                    json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": "bad cursor"}}),
                    None,
                ),
            },
            "tools/call" => match params["name"].as_str().unwrap_or_default() {
                "search" => stream(result(
                    &id,
                    json!({"content": [{"type": "text",
                        "text": format!("3 results for {}", params["arguments"]["query"].as_str().unwrap_or("?"))}],
                        "isError": false}),
                )),
                "fetch.page" => full(
                    200,
                    result(
                        &id,
                        json!({"content": [{"type": "text", "text": "404: no such page"}], "isError": true}),
                    ),
                    None,
                ),
                "broken" => full(
                    200,
                    json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": "the index is on fire"}}),
                    None,
                ),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    full(
                        200,
                        result(&id, json!({"content": [{"type": "text", "text": "late"}]})),
                        None,
                    )
                }
                _ => full(
                    200,
                    json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": "Unknown tool"}}),
                    None,
                ),
            },
            _ => full(
                200,
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "Method not found"}}),
                None,
            ),
        }
    }
}

async fn project(api: &Api) -> (User, String) {
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "MCP"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    (ada, p)
}

async fn put_secret(api: &Api, who: &User, p: &str, name: &str, value: &str) {
    let res = api
        .call(
            "PUT",
            &format!("/api/v1/projects/{p}/secrets/{name}"),
            Some(&who.access),
            Some(json!({"value": value})),
        )
        .await;
    assert_eq!(res.status, 204, "{}", String::from_utf8_lossy(&res.body));
}

/// Registers the fake as server `name` with `allowed` and `timeout_ms`.
async fn server(
    api: &Api,
    who: &User,
    p: &str,
    fake: &FakeMcp,
    name: &str,
    allowed: Value,
    timeout_ms: u64,
) -> String {
    api.create(
        &who.access,
        "/api/v1/mcp-servers",
        json!({"project_id": p, "name": name, "url": fake.url(), "allowed_tools": allowed,
            "headers": {"Authorization": "{{ secret.MCP_TOKEN }}"}, "timeout_ms": timeout_ms}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn agent_workflow(api: &Api, who: &User, p: &str, mcp_tools: Value) -> (String, String) {
    let agent = api
        .create(
            &who.access,
            "/api/v1/agents",
            json!({"project_id": p, "name": format!("A {}", uuid::Uuid::new_v4()), "model": "fake/small",
                "system_prompt": "Use the tools.", "mcp_tools": mcp_tools}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let wf = api
        .create(
            &who.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": format!("W {}", uuid::Uuid::new_v4()), "definition": {"steps": [
                {"key": "ask", "kind": "agent", "agent_id": agent, "input": "{{ input.q }}", "retry": {"max_attempts": 1}}]}}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    (agent, wf)
}

fn tool_events(events: &[Value]) -> Vec<(String, bool, Value)> {
    events
        .iter()
        .filter(|e| e["kind"] == "tool.called")
        .map(|e| {
            (
                e["data"]["tool"].as_str().unwrap().to_string(),
                e["data"]["ok"].as_bool().unwrap(),
                e["data"]["error"]["kind"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_server_is_registered_checked_listed_and_kept_in_use() {
    let fake = FakeMcp::start().await;
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let create = |body: Value| {
        let mut full = json!({"project_id": p, "name": "docs", "url": fake.url(), "allowed_tools": ["search"]});
        for (k, v) in body.as_object().unwrap() {
            full[k] = v.clone();
        }
        api.call("POST", "/api/v1/mcp-servers", Some(&ada.access), Some(full))
    };
    // Bad registrations are refused, each at its field, and store nothing.
    for (body, field) in [
        (json!({"name": "Docs"}), "name"),
        (json!({"url": "ftp://example.com/mcp"}), "url"),
        (json!({"allowed_tools": []}), "allowed_tools"),
        (json!({"allowed_tools": ["a b"]}), "allowed_tools[0]"),
        (
            json!({"headers": {"Authorization": "Bearer literal"}}),
            "headers.Authorization",
        ),
        (
            json!({"headers": {"Mcp-Session-Id": "x"}}),
            "headers.Mcp-Session-Id",
        ),
        (json!({"timeout_ms": 5}), "timeout_ms"),
    ] {
        let res = create(body.clone()).await;
        assert_eq!(res.status, 422, "{body}");
        assert_eq!(res.json()["errors"][0]["field"], field, "{body}");
    }
    let res = api
        .call(
            "POST",
            "/api/v1/mcp-servers",
            Some(&ada.access),
            Some(json!({"project_id": p, "name": "docs", "url": fake.url()})),
        )
        .await;
    assert_eq!(res.json()["errors"][0]["field"], "allowed_tools");
    assert_eq!(api.count("mcp_servers").await, 0);
    assert!(fake.log().is_empty());

    let id = server(
        &api,
        &ada,
        &p,
        &fake,
        "docs",
        json!(["search", "fetch.page"]),
        5000,
    )
    .await;
    let got = api
        .call(
            "GET",
            &format!("/api/v1/mcp-servers/{id}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(got["tools"], Value::Null);
    assert_eq!(
        got["headers"],
        json!({"Authorization": "{{ secret.MCP_TOKEN }}"})
    );

    // Without the secret its header names, nothing is sent.
    let refresh = format!("/api/v1/mcp-servers/{id}/refresh");
    let res = api.call("POST", &refresh, Some(&ada.access), None).await;
    assert_eq!(res.status, 200);
    let failed = res.json();
    assert_eq!(failed["ok"], false, "{failed}");
    assert_eq!(failed["error"]["kind"], "validation");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MCP_TOKEN")
    );
    assert!(fake.log().is_empty());

    put_secret(&api, &ada, &p, "MCP_TOKEN", &format!("Bearer {TOKEN}")).await;
    let res = api.call("POST", &refresh, Some(&ada.access), None).await;
    let listed = res.json();
    assert_eq!(listed["ok"], true, "{listed}");
    let s = &listed["server"];
    assert_eq!(s["protocol_version"], REVISION);
    assert_eq!(s["server_info"]["name"], "fake-docs");
    assert!(s["tools_listed_at"].is_string());
    let tools: Vec<(&str, bool)> = s["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["allowed"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        tools,
        [
            ("search", true),
            ("fetch.page", true),
            ("broken", false),
            ("slow", false),
            ("delete_all", false)
        ]
    );
    assert_eq!(s["tools"][0]["input_schema"]["required"], json!(["query"]));
    // The exchange as the specification has it: the client's latest revision proposed,
    // the server's taken; the session and revision on every later request; both pages;
    // the session ended.
    let log = fake.log();
    let seen: Vec<(&str, Option<&str>)> = log
        .iter()
        .map(|r| (r.method.as_str(), r.rpc.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            ("POST", Some("initialize")),
            ("POST", Some("notifications/initialized")),
            ("POST", Some("tools/list")),
            ("POST", Some("tools/list")),
            ("DELETE", None),
        ]
    );
    assert_eq!(log[0].params["protocolVersion"], "2025-11-25");
    assert_eq!(log[0].session, None);
    let session = log[1].session.clone().expect("the session id");
    for r in &log[1..] {
        assert_eq!(r.session.as_ref(), Some(&session));
        assert_eq!(r.version.as_deref(), Some(REVISION));
    }
    assert_eq!(log[3].params["cursor"], "page-2");
    assert!(fake.state.lock().unwrap().sessions.is_empty());
    // The secret is never answered or logged.
    let text = api
        .call(
            "GET",
            &format!("/api/v1/mcp-servers?project_id={p}"),
            Some(&ada.access),
            None,
        )
        .await;
    assert!(!String::from_utf8_lossy(&text.body).contains(TOKEN));
    assert!(!api.guest_logs().contains(TOKEN));

    // An agent may name only tools on the allow-list of a server the project has.
    let agent = |mcp: Value| {
        api.call(
            "POST",
            "/api/v1/agents",
            Some(&ada.access),
            Some(
                json!({"project_id": p, "name": format!("A {mcp}"), "model": "fake/small",
                "system_prompt": "x", "mcp_tools": mcp}),
            ),
        )
    };
    for (mcp, message) in [
        (json!(["mcp:docs/delete_all"]), "allowed_tools"),
        (json!(["mcp:wiki/search"]), "no MCP server 'wiki'"),
        (json!(["docs/search"]), "mcp:<server>/<tool>"),
        (json!(["mcp:docs/search", "mcp:docs/search"]), "repeated"),
    ] {
        let res = agent(mcp.clone()).await;
        assert_eq!(res.status, 422, "{mcp}");
        assert!(
            res.json()["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "{mcp}: {}",
            res.json()
        );
    }
    let res = agent(json!(["mcp:docs/search"])).await;
    assert_eq!(res.status, 201);
    assert_eq!(res.json()["mcp_tools"], json!(["mcp:docs/search"]));
    // A server an agent uses cannot go; a listing is of one URL.
    let res = api
        .call(
            "DELETE",
            &format!("/api/v1/mcp-servers/{id}"),
            Some(&ada.access),
            None,
        )
        .await;
    assert_eq!(res.status, 409);
    let res = api
        .call(
            "PATCH",
            &format!("/api/v1/mcp-servers/{id}"),
            Some(&ada.access),
            Some(json!({"url": format!("http://{}/other", fake.addr)})),
        )
        .await;
    assert_eq!(res.status, 200);
    assert_eq!(res.json()["tools"], Value::Null);
    // Policies name MCP tools by reference, and nothing else that looks like one.
    let res = api
        .call(
            "POST",
            "/api/v1/policies",
            Some(&ada.access),
            Some(json!({"project_id": p, "name": "mcp", "rules": {"allowed_tools": ["mcp:docs/*", "mcp:Docs/x"]}})),
        )
        .await;
    assert_eq!(res.status, 422);
    assert_eq!(res.json()["errors"][0]["field"], "rules.allowed_tools[1]");
}

#[tokio::test]
async fn an_agent_calls_mcp_tools_with_a_runs_checks_and_a_servers_error_fails_its_step() {
    let provider = FakeServer::answering(
        vec![
            // Run 1: a search (answered on an event stream kept open), a fetch the tool
            // fails, a search without its required argument, then the answer.
            openai::tool_calls(
                &[("c1", "mcp__docs__search", json!({"query": "lease renewal"}))],
                10,
                5,
            ),
            openai::tool_calls(
                &[("c2", "mcp__docs__fetch_page", json!({"url": "/gone"}))],
                10,
                5,
            ),
            openai::tool_calls(&[("c3", "mcp__docs__search", json!({}))], 10, 5),
            openai::text("Found 3.", 10, 5),
            // Run 2: the server's JSON-RPC error.
            openai::tool_calls(&[("c4", "mcp__ops__broken", json!({}))], 10, 5),
            // Run 3: a call the server does not answer in time.
            openai::tool_calls(&[("c5", "mcp__ops__slow", json!({}))], 10, 5),
            // Run 4: search after the allow-list dropped it; then the policy refuses fetch.
            openai::tool_calls(&[("c6", "mcp__docs__search", json!({"query": "x"}))], 10, 5),
            openai::tool_calls(
                &[("c7", "mcp__docs__fetch_page", json!({"url": "/a"}))],
                10,
                5,
            ),
        ],
        Duration::ZERO,
    )
    .await;
    let fake = FakeMcp::start().await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    put_secret(&api, &ada, &p, "MCP_TOKEN", &format!("Bearer {TOKEN}")).await;
    let docs = server(
        &api,
        &ada,
        &p,
        &fake,
        "docs",
        json!(["search", "fetch.page"]),
        10_000,
    )
    .await;
    server(
        &api,
        &ada,
        &p,
        &fake,
        "ops",
        json!(["broken", "slow"]),
        1_000,
    )
    .await;
    let (_, wf) = agent_workflow(
        &api,
        &ada,
        &p,
        json!(["mcp:docs/search", "mcp:docs/fetch.page"]),
    )
    .await;

    // Never listed: the step lists the tools first, then offers them with their schemas.
    let run = api
        .run_to_end(&ada.access, &wf, json!({"q": "How are leases renewed?"}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"]["ask"], "Found 3.");
    let asked = provider.received();
    let first: Value = serde_json::from_slice(&asked[0].body).unwrap();
    let offered: Vec<(&str, &Value)> = first["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["function"]["name"].as_str().unwrap(),
                &t["function"]["parameters"],
            )
        })
        .collect();
    assert_eq!(offered.len(), 2);
    assert_eq!(offered[0].0, "mcp__docs__search");
    assert_eq!(offered[0].1["required"], json!(["query"]));
    assert_eq!(offered[1].0, "mcp__docs__fetch_page");
    // What went back to the model: the result, the tool's own error, the schema's refusal.
    let last: Value = serde_json::from_slice(&asked[3].body).unwrap();
    let fed: Vec<String> = last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(fed[0], "3 results for lease renewal");
    assert_eq!(
        serde_json::from_str::<Value>(&fed[1]).unwrap(),
        json!({"error": "404: no such page"})
    );
    assert!(fed[2].contains("query"), "{}", fed[2]);
    // The server saw one session for the step and two calls: the bad arguments never left.
    assert_eq!(
        fake.calls(),
        [
            ("search".to_string(), json!({"query": "lease renewal"})),
            ("fetch.page".to_string(), json!({"url": "/gone"})),
        ]
    );
    let inits = fake
        .log()
        .iter()
        .filter(|r| r.rpc.as_deref() == Some("initialize"))
        .count();
    assert_eq!(inits, 2, "one to list the tools, one for the step's calls");
    assert!(fake.state.lock().unwrap().sessions.is_empty());
    let events = api.run_items(&ada.access, &run, "events").await;
    assert_eq!(
        tool_events(&events),
        [
            ("mcp:docs/search".into(), true, Value::Null),
            ("mcp:docs/fetch.page".into(), false, json!("tool-error")),
            ("mcp:docs/search".into(), false, json!("validation")),
        ]
    );
    let called = events.iter().find(|e| e["kind"] == "tool.called").unwrap();
    assert_eq!(called["data"]["mcp_server_id"], docs);
    assert!(called["data"]["duration_ms"].as_u64().is_some());

    // The server's JSON-RPC error is the step's typed error.
    let (_, broken) = agent_workflow(&api, &ada, &p, json!(["mcp:ops/broken"])).await;
    let run = api
        .run_to_end(&ada.access, &broken, json!({"q": "x"}))
        .await;
    assert_eq!(run["status"], "failed", "{run}");
    let step = &api.run_items(&ada.access, &run, "steps").await[0];
    assert_eq!(step["error"]["kind"], "tool-error", "{step}");
    let message = step["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("-32603") && message.contains("the index is on fire"),
        "{message}"
    );

    // A call past the server's timeout fails the step as a timeout.
    let (_, slow) = agent_workflow(&api, &ada, &p, json!(["mcp:ops/slow"])).await;
    let run = api.run_to_end(&ada.access, &slow, json!({"q": "x"})).await;
    assert_eq!(run["status"], "failed", "{run}");
    let step = &api.run_items(&ada.access, &run, "steps").await[0];
    assert_eq!(step["error"]["kind"], "timeout", "{step}");

    // Taken off the allow-list after the agent was saved: not offered, and a call for it
    // is refused without reaching the server. Then a policy refuses fetch.page.
    let res = api
        .call(
            "PATCH",
            &format!("/api/v1/mcp-servers/{docs}"),
            Some(&ada.access),
            Some(json!({"allowed_tools": ["fetch.page"]})),
        )
        .await;
    assert_eq!(res.status, 200);
    let res = api
        .call(
            "POST",
            "/api/v1/policies",
            Some(&ada.access),
            Some(json!({"project_id": p, "name": "only search", "rules": {"allowed_tools": ["mcp:docs/search"]}})),
        )
        .await;
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let before = fake.calls().len();
    let run = api.run_to_end(&ada.access, &wf, json!({"q": "x"})).await;
    assert_eq!(run["status"], "failed", "{run}");
    let step = &api.run_items(&ada.access, &run, "steps").await[0];
    assert_eq!(step["error"]["kind"], "policy-violation", "{step}");
    assert_eq!(
        fake.calls().len(),
        before,
        "nothing refused reached the server"
    );
    let asked = provider.received();
    let offered: Value = serde_json::from_slice(&asked[asked.len() - 2].body).unwrap();
    assert_eq!(
        offered["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["mcp__docs__fetch_page"]
    );
    let events = api.run_items(&ada.access, &run, "events").await;
    assert_eq!(
        tool_events(&events),
        [("mcp:docs/search".into(), false, json!("denied"))]
    );
    assert!(events.iter().any(|e| e["kind"] == "policy.violation"));
}
