//! The OpenAPI 3.1 document, built from one route table so every operation gets the same
//! security, parameters and problem responses. A test checks it against API.md and
//! against the app (every documented route is served).

use serde_json::{Map, Value, json};
use sparkops_core::status::RunStatus;

/// Every run status, as the API spells it.
fn run_statuses() -> Vec<&'static str> {
    RunStatus::ALL.iter().map(|s| s.as_str()).collect()
}

/// One operation.
struct Op {
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
    query: &'static [&'static str],
    /// The request body's schema.
    body: Option<&'static str>,
    status: u16,
    /// The success body's schema.
    response: Option<&'static str>,
}

const fn op(
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
) -> Op {
    Op {
        method,
        path,
        tag,
        summary,
        query: &[],
        body: None,
        status: 200,
        response: None,
    }
}

impl Op {
    const fn query(mut self, q: &'static [&'static str]) -> Self {
        self.query = q;
        self
    }
    const fn body(mut self, schema: &'static str) -> Self {
        self.body = Some(schema);
        self
    }
    const fn answers(mut self, status: u16, schema: Option<&'static str>) -> Self {
        self.status = status;
        self.response = schema;
        self
    }
}

const LIST: &[&str] = &[
    "project_id",
    "limit",
    "cursor",
    "created_after",
    "created_before",
];

/// Operations that need no credential (a trigger's sender signs instead).
const PUBLIC: [&str; 10] = [
    "/hooks/{id}",
    "/api/v1/approvals/{token}",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/docs",
    "/redoc",
    "/api/v1/auth/register",
    "/api/v1/auth/login",
    "/api/v1/auth/refresh",
];

/// The CRUD operations of a project resource.
macro_rules! crud {
    ($base:literal, $tag:literal, $schema:literal, $input:literal, $extra:expr) => {
        [
            op("GET", $base, $tag, concat!("List ", $tag))
                .query($extra)
                .answers(200, Some(concat!($schema, "Page"))),
            op("POST", $base, $tag, concat!("Create (", $tag, ")"))
                .body($input)
                .answers(201, Some($schema)),
            op("GET", concat!($base, "/{id}"), $tag, "Get one").answers(200, Some($schema)),
            op(
                "PATCH",
                concat!($base, "/{id}"),
                $tag,
                "Change by JSON merge patch (If-Match)",
            )
            .body("MergePatch")
            .answers(200, Some($schema)),
            op("DELETE", concat!($base, "/{id}"), $tag, "Delete (soft)").answers(204, None),
        ]
    };
}

fn operations() -> Vec<Op> {
    let mut ops = vec![
        op("GET", "/healthz", "health", "Liveness").answers(200, Some("Health")),
        op(
            "GET",
            "/readyz",
            "health",
            "Readiness: Postgres, key-value and Redis",
        )
        .answers(200, Some("Health")),
        op("GET", "/openapi.json", "docs", "This document").answers(200, None),
        op("GET", "/docs", "docs", "Swagger UI").answers(200, None),
        op("GET", "/redoc", "docs", "ReDoc").answers(200, None),
        op("POST", "/api/v1/auth/register", "auth", "Register")
            .body("Register")
            .answers(201, Some("Tokens")),
        op(
            "POST",
            "/api/v1/auth/login",
            "auth",
            "Log in (JSON or OAuth2 password form)",
        )
        .body("Login")
        .answers(200, Some("Tokens")),
        op(
            "POST",
            "/api/v1/auth/refresh",
            "auth",
            "Rotate a refresh token",
        )
        .body("Refresh")
        .answers(200, Some("Tokens")),
        op(
            "POST",
            "/api/v1/auth/logout",
            "auth",
            "Revoke a refresh token",
        )
        .body("Refresh")
        .answers(204, None),
        op(
            "GET",
            "/api/v1/auth/me",
            "auth",
            "The caller and their memberships",
        )
        .answers(200, Some("Me")),
        op(
            "GET",
            "/api/v1/api-keys",
            "auth",
            "List a project's API keys",
        )
        .query(&["project_id", "limit", "cursor"])
        .answers(200, Some("ApiKeyPage")),
        op(
            "POST",
            "/api/v1/api-keys",
            "auth",
            "Create an API key (its secret is shown once)",
        )
        .body("ApiKeyInput")
        .answers(201, Some("ApiKeyCreated")),
        op(
            "DELETE",
            "/api/v1/api-keys/{id}",
            "auth",
            "Revoke an API key",
        )
        .answers(204, None),
        op(
            "GET",
            "/api/v1/projects",
            "projects",
            "The caller's projects",
        )
        .query(&["limit", "cursor"])
        .answers(200, Some("ProjectPage")),
        op(
            "POST",
            "/api/v1/projects",
            "projects",
            "Create a project (the caller becomes owner)",
        )
        .body("ProjectInput")
        .answers(201, Some("Project")),
        op("GET", "/api/v1/projects/{id}", "projects", "Get a project")
            .answers(200, Some("Project")),
        op(
            "PATCH",
            "/api/v1/projects/{id}",
            "projects",
            "Change a project",
        )
        .body("MergePatch")
        .answers(200, Some("Project")),
        op(
            "DELETE",
            "/api/v1/projects/{id}",
            "projects",
            "Delete a project (owner; soft)",
        )
        .answers(204, None),
        op(
            "GET",
            "/api/v1/projects/{id}/members",
            "projects",
            "Members",
        )
        .answers(200, Some("MemberPage")),
        op(
            "POST",
            "/api/v1/projects/{id}/members",
            "projects",
            "Add a member by email",
        )
        .body("MemberInput")
        .answers(201, Some("Member")),
        op(
            "PATCH",
            "/api/v1/projects/{id}/members/{user_id}",
            "projects",
            "Change a member's role",
        )
        .body("RoleInput")
        .answers(200, Some("Member")),
        op(
            "DELETE",
            "/api/v1/projects/{id}/members/{user_id}",
            "projects",
            "Remove a member (the last owner stays)",
        )
        .answers(204, None),
        op(
            "GET",
            "/api/v1/projects/{id}/secrets",
            "secrets",
            "Secret names and versions (never values)",
        )
        .answers(200, Some("SecretPage")),
        op(
            "PUT",
            "/api/v1/projects/{id}/secrets/{name}",
            "secrets",
            "Create or replace a secret (write-only)",
        )
        .body("SecretInput")
        .answers(204, None),
        op(
            "DELETE",
            "/api/v1/projects/{id}/secrets/{name}",
            "secrets",
            "Delete a secret",
        )
        .answers(204, None),
        op(
            "POST",
            "/api/v1/tools/{id}/test",
            "tools",
            "Make the tool's real call with a run's checks",
        )
        .body("ToolTestInput")
        .answers(200, Some("ToolTestResult")),
        op(
            "POST",
            "/api/v1/mcp-servers/{id}/refresh",
            "mcp-servers",
            "List the server's tools now (tools/list) and cache them",
        )
        .answers(200, Some("McpRefreshResult")),
        op(
            "GET",
            "/api/v1/workflows/{id}/versions",
            "workflows",
            "Every saved definition, newest first",
        )
        .query(&["limit", "cursor"])
        .answers(200, Some("WorkflowVersionPage")),
        op(
            "POST",
            "/api/v1/workflows/validate",
            "workflows",
            "Validate a definition without saving",
        )
        .body("ValidateInput")
        .answers(200, Some("ValidateResult")),
        op(
            "GET",
            "/api/v1/schedules/{id}/next",
            "schedules",
            "The next fire times",
        )
        .query(&["count"])
        .answers(200, Some("NextFireTimes")),
        op(
            "POST",
            "/api/v1/schedules/{id}/trigger",
            "schedules",
            "Start a run now (the overlap and run-start policies apply; recorded as a manual fire)",
        )
        .answers(201, Some("TriggeredRun")),
        op(
            "GET",
            "/api/v1/schedules/{id}/fires",
            "schedules",
            "What each fire time came to, latest first: its run, or why none",
        )
        .query(&["limit"])
        .answers(200, Some("ScheduleFireList")),
        op(
            "GET",
            "/api/v1/metrics/summary",
            "metrics",
            "Runs by status, success rate, p50/p95/p99 duration, tokens, cost and unpriced calls, grouped by day, workflow, agent or model",
        )
        .query(&["project_id", "from", "to", "group_by"])
        .answers(200, Some("MetricsReport")),
        op(
            "GET",
            "/api/v1/metrics/steps",
            "metrics",
            "The same figures per step kind, tool and model (by=kind: per kind alone)",
        )
        .query(&["project_id", "from", "to", "by"])
        .answers(200, Some("MetricsReport")),
        op(
            "GET",
            "/api/v1/policies/usage",
            "policies",
            "Spend, reservations and tokens against each budget in its current window",
        )
        .query(&["project_id"])
        .answers(200, Some("PolicyUsage")),
        op("GET", "/api/v1/runs", "runs", "List runs")
            .query(&[
                "project_id",
                "workflow_id",
                "schedule_id",
                "trigger_id",
                "status",
                "created_after",
                "created_before",
                "limit",
                "cursor",
            ])
            .answers(200, Some("RunPage")),
        op(
            "POST",
            "/api/v1/runs",
            "runs",
            "Start a run (queued; the orchestrator advances it)",
        )
        .body("RunInput")
        .answers(201, Some("Run")),
        op(
            "GET",
            "/api/v1/runs/{id}",
            "runs",
            "A run with its totals and step counts",
        )
        .answers(200, Some("Run")),
        op(
            "PATCH",
            "/api/v1/runs/{id}/cancel",
            "runs",
            "Cancel a run (202 cancelling; 409 when finished)",
        )
        .answers(202, Some("Run")),
        op(
            "POST",
            "/api/v1/runs/{id}/retry",
            "runs",
            "Retry a finished run as a new run (retry_of); from failed reuses succeeded steps' outputs",
        )
        .body("RetryInput")
        .answers(201, Some("Run")),
        op(
            "POST",
            "/api/v1/runs/{id}/pause",
            "runs",
            "Pause a run: no new step starts (running ones finish) and its timeouts stand still (409 when finished or cancelling)",
        )
        .answers(200, Some("Run")),
        op(
            "POST",
            "/api/v1/runs/{id}/resume",
            "runs",
            "Resume a paused run where it stopped; its deadlines move on by the time it was paused",
        )
        .answers(200, Some("Run")),
        op(
            "POST",
            "/api/v1/runs/{id}/steps/{key}/approve",
            "runs",
            "Approve or reject a waiting approval step",
        )
        .body("ApprovalInput")
        .answers(200, Some("ApprovalDecision")),
        op("GET", "/api/v1/runs/{id}/steps", "runs", "The run's steps")
            .answers(200, Some("RunStepList")),
        op(
            "GET",
            "/api/v1/runs/{id}/events",
            "runs",
            "The ordered event log; with Accept: text/event-stream, a live Server-Sent Events stream (id = seq, event = kind) that ends when the run ends and resumes after Last-Event-ID",
        )
        .query(&["after"])
        .answers(200, Some("RunEventList")),
        op(
            "GET",
            "/api/v1/models/prices",
            "prices",
            "The price table in use (with a project's overrides)",
        )
        .query(&["project_id"])
        .answers(200, Some("ModelPricePage")),
        op(
            "PUT",
            "/api/v1/models/prices/{model}",
            "prices",
            "Override a model's price for a project (admin)",
        )
        .query(&["project_id"])
        .body("ModelPriceInput")
        .answers(200, Some("ModelPrice")),
        op(
            "DELETE",
            "/api/v1/models/prices/{model}",
            "prices",
            "Back to the default price",
        )
        .query(&["project_id"])
        .answers(204, None),
    ];
    ops.extend(crud!(
        "/api/v1/agents",
        "agents",
        "Agent",
        "AgentInput",
        LIST
    ));
    ops.extend(crud!("/api/v1/tools", "tools", "Tool", "ToolInput", LIST));
    ops.extend(crud!(
        "/api/v1/mcp-servers",
        "mcp-servers",
        "McpServer",
        "McpServerInput",
        LIST
    ));
    ops.extend(crud!(
        "/api/v1/workflows",
        "workflows",
        "Workflow",
        "WorkflowInput",
        LIST
    ));
    ops.extend(crud!(
        "/api/v1/policies",
        "policies",
        "Policy",
        "PolicyInput",
        &[
            "project_id",
            "limit",
            "cursor",
            "created_after",
            "created_before",
            "enabled"
        ]
    ));
    ops.extend(crud!(
        "/api/v1/webhooks",
        "webhooks",
        "Webhook",
        "WebhookInput",
        LIST
    ));
    ops.extend([
        op(
            "POST",
            "/api/v1/webhooks/{id}/test",
            "webhooks",
            "Queue a webhook.test event for this webhook (202; 409 when disabled)",
        )
        .answers(202, Some("WebhookDelivery")),
        op(
            "POST",
            "/api/v1/webhooks/{id}/rotate-secret",
            "webhooks",
            "A new signing secret, shown once; the old one signs beside it for overlap_s",
        )
        .body("RotateSecretInput")
        .answers(200, Some("RotatedSecret")),
        op(
            "GET",
            "/api/v1/webhooks/{id}/deliveries",
            "webhooks",
            "The delivery history, newest first",
        )
        .query(&["status_delivery", "limit", "cursor"])
        .answers(200, Some("WebhookDeliveryPage")),
        op(
            "GET",
            "/api/v1/webhooks/{id}/deliveries/{delivery_id}",
            "webhooks",
            "One delivery, with the payload its attempts send",
        )
        .answers(200, Some("WebhookDelivery")),
        op(
            "GET",
            "/api/v1/approvals/{token}",
            "approvals",
            "What an approval link (from a step.waiting_approval webhook) decides; never decides (HTML for a browser)",
        )
        .answers(200, Some("ApprovalLink")),
        op(
            "POST",
            "/api/v1/workflows/{id}/quote",
            "workflows",
            "The worst-case cost of a run of the current version (per step and total) and which budgets it fits in now",
        )
        .body("QuoteInput")
        .answers(200, Some("Quote")),
        op(
            "POST",
            "/api/v1/approvals/{token}",
            "approvals",
            "Decide the step as the link says, once, without a login (401 not a link, 403 expired, 409 used or no longer waiting)",
        )
        .body("ApprovalLinkInput")
        .answers(200, Some("ApprovalDecision")),
        op(
            "POST",
            "/hooks/{id}",
            "triggers",
            "Start a run of the trigger's workflow from a signed request (no user auth; 401 when the signature fails; a redelivery answers as the first)",
        )
        .body("HookBody")
        .answers(202, Some("HookAccepted")),
    ]);
    ops.extend(crud!(
        "/api/v1/triggers",
        "triggers",
        "Trigger",
        "TriggerInput",
        LIST
    ));
    ops.extend(crud!(
        "/api/v1/schedules",
        "schedules",
        "Schedule",
        "ScheduleInput",
        &[
            "project_id",
            "limit",
            "cursor",
            "created_after",
            "created_before",
            "workflow_id",
            "enabled"
        ]
    ));
    ops
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn query_parameter(name: &str, required: bool) -> Value {
    let (schema, description) = match name {
        "limit" => (
            json!({"type": "integer", "minimum": 1, "maximum": 200, "default": 50}),
            "Page size",
        ),
        "cursor" => (
            json!({"type": "string"}),
            "The next_cursor of the previous page",
        ),
        "count" => (
            json!({"type": "integer", "minimum": 1, "maximum": 100, "default": 5}),
            "How many",
        ),
        "enabled" => (
            json!({"type": "boolean"}),
            "Only enabled (or disabled) ones",
        ),
        "status" => (json!({"enum": run_statuses()}), "Only runs in this status"),
        "status_delivery" => {
            return json!({"name": "status", "in": "query", "required": false,
                "schema": {"enum": ["pending", "delivered", "failed"]}, "description": "Only deliveries in this status"});
        }
        "after" => (
            json!({"type": "integer", "minimum": 0}),
            "Events after this sequence number (or Last-Event-ID)",
        ),
        "from" | "to" => (
            json!({"type": "string", "format": "date-time"}),
            "The range of run creation times (from inclusive, to exclusive; the last 30 days by default)",
        ),
        "group_by" => (
            json!({"enum": ["day", "agent", "workflow", "model"]}),
            "How to group; agent and model count agent steps",
        ),
        "by" => (
            json!({"enum": ["kind"]}),
            "Group steps by their kind alone (left out: by kind, tool and model)",
        ),
        "created_after" | "created_before" => {
            (json!({"type": "string", "format": "date-time"}), "RFC 3339")
        }
        "project_id" if required => (
            json!({"type": "string", "format": "uuid"}),
            "The project (an API key may leave it out for its own)",
        ),
        _ => (
            json!({"type": "string", "format": "uuid"}),
            "An id (an API key's project by default)",
        ),
    };
    json!({"name": name, "in": "query", "required": required, "schema": schema, "description": description})
}

fn operation(o: &Op) -> Value {
    let mut parameters: Vec<Value> = o
        .path
        .split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| match name {
            "model" => json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"},
                "description": "provider/model, with its slash percent-encoded (openai%2Fgpt-4o-mini)"}),
            _ => json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}),
        })
        .collect();
    // A user's token names no project: lists, reports and a project's prices need it.
    let project_required = !(o.method == "GET" && o.path == "/api/v1/models/prices");
    parameters.extend(
        o.query
            .iter()
            .map(|q| query_parameter(q, *q == "project_id" && project_required)),
    );
    let public = PUBLIC.contains(&o.path);
    let mut responses = Map::new();
    let success = match o.response {
        Some(schema) => {
            json!({"description": "Success", "content": {"application/json": {"schema": schema_ref(schema)}}})
        }
        None if o.path.starts_with("/docs") || o.path.starts_with("/redoc") => {
            json!({"description": "An HTML page", "content": {"text/html": {"schema": {"type": "string"}}}})
        }
        None if o.path == "/openapi.json" => {
            json!({"description": "This document", "content": {"application/json": {"schema": {"type": "object"}}}})
        }
        None => json!({"description": "Done"}),
    };
    responses.insert(o.status.to_string(), success);
    let mut errors: Vec<u16> = vec![422, 429, 500];
    if !public {
        errors.extend([401, 403, 404]);
    }
    if o.body.is_some() {
        errors.push(413);
    }
    if matches!(o.method, "POST" | "PATCH" | "PUT" | "DELETE") && !public {
        errors.push(409);
    }
    if o.method == "PATCH" {
        errors.push(412);
    }
    if o.path == "/readyz" {
        errors.push(503);
    }
    if matches!(o.path, "/api/v1/auth/login" | "/api/v1/auth/refresh") {
        errors.push(401);
    }
    if o.path == "/api/v1/auth/register" {
        errors.push(409);
    }
    if o.path == "/api/v1/approvals/{token}" {
        errors.extend([401, 403, 404, 409]);
    }
    if o.path == "/hooks/{id}" {
        // No user credential, but a signature: refused as 401; an unknown trigger is 404.
        errors.extend([401, 404, 409, 413]);
    }
    errors.sort_unstable();
    for status in errors {
        responses.insert(
            status.to_string(),
            json!({"$ref": format!("#/components/responses/Problem{status}")}),
        );
    }
    let mut v = json!({
        "tags": [o.tag],
        "summary": o.summary,
        "operationId": format!("{}_{}", o.method.to_lowercase(), o.path.trim_start_matches("/api/v1/").replace(['/', '{', '}', '.', '-'], "_")),
        "parameters": parameters,
        "responses": responses,
    });
    if public {
        v["security"] = json!([]);
    }
    if o.method == "PATCH" {
        v["parameters"]
            .as_array_mut()
            .expect("made as an array")
            .push(json!({"name": "If-Match", "in": "header", "required": false,
                "schema": {"type": "string", "pattern": "^\\s*(\\*|(W/)?\"[^\"]*\"(\\s*,\\s*(W/)?\"[^\"]*\")*)\\s*$"}, "description": "The version you read as a strong entity tag, e.g. \"3\" (or *); a stale one, or only weak tags (W/\"3\"), is 412"}));
    }
    if o.method == "POST" && o.status == 201 {
        v["parameters"]
            .as_array_mut()
            .expect("made as an array")
            .push(json!({"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "minLength": 1, "maxLength": 255}, "description": "Replays the first answer for 24 h"}));
    }
    if let Some(body) = o.body {
        let mut content = json!({"application/json": {"schema": schema_ref(body)}});
        if body == "Login" {
            content["application/x-www-form-urlencoded"] =
                json!({"schema": schema_ref("LoginForm")});
        }
        if body == "MergePatch" {
            content = json!({"application/merge-patch+json": {"schema": {"type": "object"}}, "application/json": {"schema": {"type": "object"}}});
        }
        v["requestBody"] = json!({"required": true, "content": content});
    }
    v
}

fn problem_responses() -> Value {
    let mut m = Map::new();
    for (status, what) in [
        (401, "No valid credential (WWW-Authenticate: Bearer)"),
        (403, "The role lacks this action"),
        (404, "Not found, or not visible to the caller"),
        (409, "Conflicts with the current state"),
        (412, "If-Match names a stale version"),
        (413, "The body is over 1 MiB"),
        (422, "Invalid input: errors name each field"),
        (429, "Rate limited (Retry-After, RateLimit-*)"),
        (500, "Our failure; the body says nothing more"),
        (503, "A dependency is down"),
    ] {
        m.insert(
            format!("Problem{status}"),
            json!({"description": what, "content": {"application/problem+json": {"schema": schema_ref("Problem")}}}),
        );
    }
    Value::Object(m)
}

fn page(item: &str) -> Value {
    json!({"type": "object", "required": ["items", "next_cursor"], "properties": {
        "items": {"type": "array", "items": schema_ref(item)},
        "next_cursor": {"type": ["string", "null"]}
    }})
}

/// Fields every project resource carries.
fn resource(fields: Value) -> Value {
    let mut props = json!({
        "id": {"type": "string", "format": "uuid"},
        "project_id": {"type": "string", "format": "uuid"},
        "version": {"type": "integer"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"}
    });
    for (k, v) in fields.as_object().expect("fields are an object") {
        props[k] = v.clone();
    }
    json!({"type": "object", "properties": props})
}

/// A create body: `project_id` plus the writable fields, some required.
fn input(fields: Value, required: &[&str]) -> Value {
    let mut props = json!({"project_id": {"type": "string", "format": "uuid", "description": "Defaults to an API key's project"}});
    for (k, v) in fields.as_object().expect("fields are an object") {
        props[k] = v.clone();
    }
    json!({"type": "object", "additionalProperties": false, "required": required, "properties": props})
}

fn schemas() -> Value {
    let s = |t: &str| json!({"type": t});
    // Text the app reads as a string must hold more than white space and fit its column.
    let text =
        |max: usize| json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": "\\S"});
    let opt_text =
        |max: usize| json!({"type": ["string", "null"], "maxLength": max, "pattern": "\\S"});
    let money = json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,6})?$", "description": "USD as a decimal string"});
    let uuid = json!({"type": "string", "format": "uuid"});
    let time = json!({"type": "string", "format": "date-time"});
    let trace_endpoint = json!({"type": ["string", "null"], "format": "uri",
        "description": "OTLP/HTTP traces endpoint (e.g. https://app.langwatch.ai/api/otel/v1/traces); \
            each finished run is exported as a trace, authorised by the project secret \
            otlp.api_key (Bearer) or otlp.authorization, with a header for each secret \
            otlp.header.<name>; null stops the export"});
    let agent = json!({
        "name": text(200), "description": opt_text(2000),
        "model": {"type": "string", "minLength": 3, "maxLength": 200, "pattern": "^[^/\\s]+/\\S+$", "description": "provider/model, e.g. openai/gpt-4o-mini"},
        "system_prompt": text(100_000), "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 200000, "default": 1024},
        "tool_ids": {"type": "array", "items": uuid},
        "max_iterations": {"type": "integer", "minimum": 1, "maximum": 50, "default": 10},
        "response_format": {"type": ["object", "null"], "description": "A JSON Schema"},
        "metadata": {"type": ["object", "null"]},
        "fallback_models": {"type": "array", "maxItems": 5, "items": s("string"),
            "description": "provider/model names tried in order when the model's provider fails, limits the rate or refuses the prompt as too long"},
        "stream": {"type": "boolean", "default": false,
            "description": "Stream model answers: their text reaches GET /runs/{id}/events subscribers as step.delta events while it comes"},
        "mcp_tools": {"type": "array", "maxItems": 64, "uniqueItems": true,
            "items": {"type": "string", "pattern": "^mcp:[a-z][a-z0-9_-]{0,63}/[A-Za-z0-9_.-]{1,128}$"},
            "description": "MCP tools as mcp:<server>/<tool>, each on its server's allowed_tools; offered to the model as mcp__<server>__<tool>"}
    });
    let mcp_server = json!({
        "name": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,63}$"}, "description": opt_text(2000),
        "url": {"type": "string", "format": "uri", "maxLength": 2048, "description": "A Streamable HTTP endpoint (https, not an internal address: the tool URL rules)"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Literals or {{ secret.NAME }}"},
        "allowed_tools": {"type": "array", "minItems": 1, "maxItems": 256, "uniqueItems": true,
            "items": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,128}$"}, "description": "The only tools agents may call"},
        "timeout_ms": {"type": "integer", "minimum": 100, "maximum": 300000, "default": 30000,
            "description": "Bounds each tool call's whole exchange with the server"}
    });
    let mut mcp_server_out = mcp_server.clone();
    mcp_server_out["tools"] = json!({"type": ["array", "null"], "description": "The last listing (null until listed)",
        "items": {"type": "object", "properties": {"name": s("string"), "description": s("string"),
            "input_schema": s("object"), "allowed": s("boolean")}}});
    mcp_server_out["tools_listed_at"] = json!({"type": ["string", "null"], "format": "date-time"});
    mcp_server_out["protocol_version"] =
        json!({"type": ["string", "null"], "description": "The revision the server settled on"});
    mcp_server_out["server_info"] = json!({"type": ["object", "null"]});
    let http = json!({"type": "object", "required": ["url"], "properties": {
        "method": {"enum": ["GET", "POST", "PUT", "PATCH", "DELETE"], "default": "POST"},
        "url": {"type": "string", "format": "uri"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Literals or {{ secret.NAME }}"},
        "timeout_ms": {"type": "integer", "minimum": 100, "maximum": 300000, "default": 30000}
    }});
    let tool = json!({
        "name": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"}, "description": text(2000),
        "input_schema": {"type": "object", "description": "JSON Schema 2020-12 of an object"},
        "output_schema": {"type": ["object", "null"]}, "http": http
    });
    let step = json!({"type": "object", "required": ["key", "kind"], "properties": {
        "key": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"},
        "kind": {"enum": ["agent", "tool", "condition", "approval"]},
        "agent_id": uuid, "tool_id": uuid, "input": {"description": "A template: {{ input.x }}, {{ steps.key.output.y }}"},
        "depends_on": {"type": "array", "items": s("string")}, "when": s("string"),
        "retry": {"type": "object", "properties": {
            "max_attempts": {"type": "integer", "minimum": 1, "maximum": 20}, "initial_interval_ms": s("integer"),
            "backoff_coefficient": {"type": "number", "minimum": 1}, "max_interval_ms": s("integer"),
            "non_retryable": {"type": "array", "items": s("string")}}},
        "timeout_ms": s("integer"),
        "approval": {"type": "object", "properties": {"timeout_s": s("integer"), "approvers": {"type": "array", "items": uuid},
            "quorum": {"type": "integer", "minimum": 1, "maximum": 20, "default": 1,
                "description": "Distinct approvals that pass the step (at most the approvers named); one rejection fails it"}}}
    }});
    let workflow = json!({
        "name": text(200), "description": opt_text(2000),
        "input_schema": {"type": ["object", "null"]}, "timeout_s": {"type": ["integer", "null"]},
        "definition": {"type": "object", "required": ["steps"], "properties": {"steps": {"type": "array", "items": schema_ref("Step")}}}
    });
    let rules = json!({"type": "object", "additionalProperties": false, "properties": {
        "budget": {"type": "object", "required": ["limit_usd", "window"], "properties": {
            "limit_usd": money, "window": {"enum": ["day", "month", "total"]}, "action": {"enum": ["block", "alert"], "default": "block"},
            "on_exhausted": {"enum": ["fail", "wait", "ask"], "default": "fail",
                "description": "What a call a blocking budget refuses does: fail its step (policy-violation); wait (the step is held until the window turns or the budget is raised, then goes on where it stopped); ask (held until a project admin approves the call past the budget, or rejects it)"}}},
        "allowed_models": {"type": "array", "items": s("string"), "description": "globs such as openai/*"},
        "allowed_tools": {"type": "array", "items": {"type": "string"},
            "description": "tool ids, and MCP tools as mcp:<server>/<tool> or mcp:<server>/*"},
        "max_steps_per_run": s("integer"), "max_tokens_per_run": s("integer"),
        "max_tokens_per_step": s("integer"), "max_concurrent_runs": s("integer")
    }});
    let policy = json!({
        "name": text(200), "enabled": {"type": "boolean", "default": true},
        "scope": {"type": "object", "properties": {"agent_id": uuid, "workflow_id": uuid}}, "rules": rules
    });
    let schedule = json!({
        "workflow_id": uuid, "cron": {"type": "string", "minLength": 1, "maxLength": 200, "description": "5 or 6 fields"},
        "timezone": {"type": "string", "minLength": 1, "maxLength": 64, "default": "UTC"}, "input": {}, "enabled": {"type": "boolean", "default": true},
        "overlap": {"enum": ["skip", "allow", "cancel_previous"], "default": "skip"},
        "catchup_window_s": {"type": "integer", "minimum": 0, "default": 0}
    });
    let mut schedule_out = schedule.clone();
    schedule_out["next_fire_at"] = json!({"type": ["string", "null"], "format": "date-time"});
    schedule_out["last_fired_at"] = json!({"type": ["string", "null"], "format": "date-time"});
    let event_types = json!({"type": "array", "minItems": 1, "uniqueItems": true, "items": {"enum": [
        "run.succeeded", "run.failed", "run.timed_out", "run.cancelled", "step.waiting_approval",
        "budget.alert", "budget.held", "schedule.skipped", "schedule.refused"]}});
    let webhook = json!({
        "url": {"type": "string", "format": "uri", "maxLength": 2048, "description": "https, not an internal address (the tool URL rules)"},
        "description": opt_text(1000),
        "event_types": event_types, "enabled": {"type": "boolean", "default": true}
    });
    let mut webhook_out = webhook.clone();
    webhook_out["disabled_reason"] = json!({"type": ["string", "null"], "description": "Why the notifier disabled it (failing for 3 days)"});
    webhook_out["failing_since"] = json!({"type": ["string", "null"], "format": "date-time"});
    webhook_out["secrets_in_use"] =
        json!({"type": "integer", "description": "2 while a rotated secret overlaps the new one"});
    webhook_out["secret"] =
        json!({"type": "string", "description": "whsec_...: in the create reply only, once"});
    let trigger = json!({
        "name": text(200), "workflow_id": uuid,
        "input_template": {"description": "JSON whose strings may hold {{ body.path }} and {{ headers.name }}; default \"{{ body }}\"", "default": "{{ body }}"},
        "verification": {"enum": ["standard_webhooks", "github", "bearer"], "default": "standard_webhooks"},
        "enabled": {"type": "boolean", "default": true},
        "secret": {"type": "string", "writeOnly": true, "maxLength": 256,
            "description": "whsec_... for standard_webhooks, 16 to 256 characters otherwise; made (and shown once) when not given"}
    });
    let mut trigger_out = trigger.clone();
    trigger_out["secret"] = json!({"type": "string", "description": "In the create reply only, when the trigger made it"});
    trigger_out["url"] = json!({"type": "string", "description": "/hooks/{id}"});
    trigger_out["refused_count"] = json!({"type": "integer"});
    trigger_out["last_refused_at"] = json!({"type": ["string", "null"], "format": "date-time"});
    trigger_out["last_refusal"] = json!({"type": ["string", "null"]});
    let price = json!({"type": "object", "properties": {
        "model": s("string"), "input_per_mtok_usd": money, "output_per_mtok_usd": money,
        "source": {"enum": ["default", "project"]}}});
    let mut m = json!({
        "Problem": {"type": "object", "required": ["type", "title", "status"], "properties": {
            "type": {"type": "string", "format": "uri"}, "title": s("string"), "status": s("integer"),
            "detail": s("string"), "instance": s("string"), "request_id": s("string"),
            "errors": {"type": "array", "items": {"type": "object", "properties": {"field": s("string"), "message": s("string")}}}}},
        "Health": {"type": "object", "properties": {"status": s("string"), "checks": s("object")}},
        "Register": {"type": "object", "required": ["email", "password", "name"], "additionalProperties": false, "properties": {
            "email": {"type": "string", "format": "email"}, "password": {"type": "string", "minLength": 8, "maxLength": 128}, "name": text(200)}},
        "Login": {"type": "object", "required": ["email", "password"], "additionalProperties": false,
            "properties": {"email": text(320), "password": text(1024)}},
        "LoginForm": {"type": "object", "required": ["username", "password"], "properties": {
            "grant_type": {"const": "password"}, "username": text(320), "password": text(1024)}},
        "Refresh": {"type": "object", "required": ["refresh_token"], "additionalProperties": false,
            "properties": {"refresh_token": text(200)}},
        "Tokens": {"type": "object", "properties": {"access_token": s("string"), "refresh_token": s("string"),
            "token_type": {"const": "bearer"}, "expires_in": s("integer"), "user": s("object")}},
        "Me": {"type": "object", "properties": {"id": uuid, "email": s("string"), "name": s("string"), "created_at": time,
            "memberships": {"type": "array", "items": {"type": "object", "properties": {"project_id": uuid, "role": s("string")}}}}},
        "ApiKeyInput": {"type": "object", "required": ["name", "project_id", "role"], "additionalProperties": false, "properties": {
            "name": text(200), "project_id": uuid, "role": {"enum": ["owner", "admin", "member", "viewer"]}, "expires_at": time}},
        "ApiKey": {"type": "object", "properties": {"id": uuid, "name": s("string"), "prefix": s("string"), "project_id": uuid,
            "role": s("string"), "expires_at": {"type": ["string", "null"]}, "created_at": time}},
        "ApiKeyCreated": {"type": "object", "properties": {"id": uuid, "prefix": s("string"), "secret": {"type": "string", "description": "Shown once"}}},
        "ProjectInput": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
            "name": text(200), "slug": {"type": "string", "pattern": "^[a-z0-9]+(-[a-z0-9]+)*$", "minLength": 3, "maxLength": 64},
            "description": opt_text(2000),
            "trace_endpoint": trace_endpoint.clone()}},
        "Project": {"type": "object", "properties": {"id": uuid, "name": s("string"), "slug": s("string"), "description": {"type": ["string", "null"]},
            "version": s("integer"), "role": s("string"), "created_at": time, "updated_at": time, "trace_endpoint": trace_endpoint}},
        "MemberInput": {"type": "object", "required": ["email", "role"], "additionalProperties": false, "properties": {"email": text(320), "role": {"enum": ["owner", "admin", "member", "viewer"]}}},
        "RoleInput": {"type": "object", "required": ["role"], "additionalProperties": false, "properties": {"role": {"enum": ["owner", "admin", "member", "viewer"]}}},
        "Member": {"type": "object", "properties": {"user_id": uuid, "email": s("string"), "name": s("string"), "role": s("string"), "created_at": time}},
        "SecretInput": {"type": "object", "required": ["value"], "additionalProperties": false, "properties": {"value": {"type": "string", "writeOnly": true}}},
        "Secret": {"type": "object", "properties": {"name": s("string"), "version": s("integer"), "created_at": time, "updated_at": time}},
        "Agent": resource(agent.clone()),
        "AgentInput": input(agent, &["name", "model", "system_prompt"]),
        "Tool": resource(tool.clone()),
        "ToolInput": input(tool, &["name", "description", "input_schema", "http"]),
        "ToolTestInput": {"type": "object", "additionalProperties": false, "properties": {"input": {"type": "object"}}},
        "ToolTestResult": {"type": "object", "properties": {"ok": s("boolean"), "status": s("integer"), "duration_ms": s("integer"),
            "output": {}, "error": {"type": "object", "properties": {"kind": s("string"), "message": s("string")}}}},
        "McpServer": resource(mcp_server_out),
        "McpServerInput": input(mcp_server, &["name", "url", "allowed_tools"]),
        "McpRefreshResult": {"type": "object", "properties": {"ok": s("boolean"), "duration_ms": s("integer"),
            "server": schema_ref("McpServer"),
            "error": {"type": "object", "properties": {"kind": s("string"), "message": s("string")}}}},
        "Step": step,
        "Workflow": resource(workflow.clone()),
        "WorkflowInput": input(workflow, &["name", "definition"]),
        "WorkflowVersion": {"type": "object", "properties": {"version": s("integer"), "definition": s("object"),
            "input_schema": {"type": ["object", "null"]}, "created_by": {"type": ["string", "null"]}, "created_at": time}},
        "ValidateInput": {"type": "object", "required": ["definition"], "additionalProperties": false, "properties": {"project_id": uuid, "definition": s("object")}},
        "ValidateResult": {"type": "object", "properties": {"valid": s("boolean"),
            "errors": {"type": "array", "items": {"type": "object", "properties": {"field": s("string"), "message": s("string")}}}}},
        "Policy": resource(policy.clone()),
        "PolicyInput": input(policy, &["name", "rules"]),
        "Schedule": resource(schedule_out),
        "ScheduleInput": input(schedule, &["workflow_id", "cron"]),
        "Webhook": resource(webhook_out),
        "WebhookInput": input(webhook, &["url", "event_types"]),
        "WebhookDelivery": {"type": "object", "properties": {
            "id": uuid, "message_id": {"type": "string", "description": "The webhook-id header of every attempt"},
            "event_type": s("string"), "status": {"enum": ["pending", "delivered", "failed"]}, "attempts": s("integer"),
            "last_response_status": {"type": ["integer", "null"]}, "last_error": {"type": ["string", "null"]},
            "created_at": time, "last_attempt_at": {"type": ["string", "null"]}, "delivered_at": {"type": ["string", "null"]},
            "next_attempt_at": {"type": ["string", "null"]},
            "payload": {"type": "object", "description": "One delivery only: {type, timestamp, data}, the bytes every attempt signs"}}},
        "RotateSecretInput": {"type": "object", "additionalProperties": false, "properties": {
            "overlap_s": {"type": "integer", "minimum": 0, "maximum": 604800, "default": 86400}}},
        "RotatedSecret": {"type": "object", "properties": {"secret": {"type": "string", "description": "Shown once"},
            "previous_secret_expires_at": {"type": ["string", "null"]}}},
        "Trigger": resource(trigger_out),
        "TriggerInput": input(trigger, &["name", "workflow_id"]),
        "HookBody": {"description": "The sender's JSON event, signed per the trigger's verification: webhook-id, webhook-timestamp and \
            webhook-signature (Standard Webhooks); X-Hub-Signature-256 and X-GitHub-Delivery (GitHub); Authorization: Bearer and an optional Idempotency-Key"},
        "ApprovalLink": {"type": "object", "properties": {"run_id": uuid, "step_key": s("string"), "workflow": s("string"),
            "approver": {"type": ["string", "null"]}, "decision": {"enum": ["approve", "reject"]}, "expires_at": time,
            "step_status": s("string"), "run_status": s("string"), "used": s("boolean")}},
        "ApprovalLinkInput": {"type": "object", "additionalProperties": false, "properties": {
            "comment": {"type": "string", "maxLength": 2000}}},
        "QuoteInput": {"type": "object", "additionalProperties": false, "properties": {
            "input": {"description": "The run input the steps' inputs are rendered from (default {})"}}},
        "Quote": {"type": "object", "properties": {"workflow_id": uuid, "version": s("integer"), "total_usd": money,
            "complete": {"type": "boolean", "description": "false when a model has no price (unpriced_models)"},
            "unpriced_models": {"type": "array", "items": s("string")},
            "steps": {"type": "array", "items": {"type": "object", "properties": {"key": s("string"), "kind": s("string"),
                "models": {"type": "array", "items": s("string")}, "prompt_tokens": s("integer"), "max_tokens": s("integer"),
                "iterations": s("integer"), "attempts": s("integer"), "calls": s("integer"), "worst_usd": money}}},
            "budgets": {"type": "array", "items": {"type": "object", "properties": {"policy_id": uuid, "name": s("string"),
                "action": {"enum": ["block", "alert"]}, "remaining_usd": money, "needed_usd": money, "fits": s("boolean")}}}}},
        "HookAccepted": {"type": "object", "properties": {"run_id": uuid, "trigger_id": uuid, "delivery_id": {"type": ["string", "null"]}}},
        "MetricsReport": {"type": "object", "properties": {"project_id": uuid, "from": time, "to": time,
            "group_by": {"type": ["string", "null"]}, "counted": {"enum": ["runs", "steps"]},
            "items": {"type": "array", "items": {"type": "object", "description": "The group's key fields, then the figures", "properties": {
                "count": s("integer"), "by_status": {"type": "object", "additionalProperties": {"type": "integer"}},
                "success_rate": {"type": ["number", "null"]},
                "duration_ms": {"type": "object", "properties": {"p50": {"type": ["integer", "null"]}, "p95": {"type": ["integer", "null"]}, "p99": {"type": ["integer", "null"]}}},
                "tokens_in": s("integer"), "tokens_out": s("integer"), "cost_usd": money, "unpriced_calls": s("integer")}}}}},
        "PolicyUsage": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
            "policy_id": uuid, "name": s("string"), "scope": s("object"), "budget": s("object"),
            "window_start": {"type": ["string", "null"]}, "spent_usd": money, "reserved_usd": money, "remaining_usd": money,
            "tokens": s("integer"), "calls": s("integer"), "exceeded": s("boolean")}}}}},
        "TriggeredRun": {"type": "object", "properties": {"id": uuid, "status": s("string"), "workflow_id": uuid,
            "schedule_id": uuid, "scheduled_for": time}},
        "ScheduleFireList": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
            "fire_at": time, "outcome": {"enum": ["started", "skipped", "refused", "failed"]}, "reason": {"type": ["string", "null"]},
            "run_id": {"type": ["string", "null"]}, "manual": s("boolean"), "missed_until": {"type": ["string", "null"]},
            "missed_count": s("integer"), "recorded_at": time}}}}},
        "NextFireTimes": {"type": "object", "properties": {"timezone": s("string"), "enabled": s("boolean"),
            "items": {"type": "array", "items": {"type": "object", "properties": {"at": time, "local": s("string")}}}}},
        "ModelPrice": price,
        "ApprovalInput": {"type": "object", "required": ["approved"], "additionalProperties": false,
            "properties": {"approved": s("boolean"), "comment": {"type": "string", "maxLength": 2000}}},
        "ApprovalDecision": {"type": "object", "properties": {"key": s("string"), "status": s("string"), "decision": s("object")}},
        "RetryInput": {"type": "object", "additionalProperties": false, "properties": {
            "from": {"enum": ["failed", "start"], "default": "failed"}}},
        "RunInput": {"type": "object", "required": ["workflow_id"], "additionalProperties": false, "properties": {
            "workflow_id": uuid, "input": {"description": "Checked against the workflow's input_schema"},
            "version": {"type": "integer", "minimum": 1, "description": "Defaults to the current version"},
            "max_cost_usd": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]{1,6})?$",
                "description": "The run's own hard budget in USD: each model call's worst case is held against what the run has left, \
                    and a call that would pass it fails its step as a policy-violation (rule max_cost_usd). A retry keeps it."}}},
        "Run": {"type": "object", "properties": {
            "id": uuid, "project_id": uuid, "workflow_id": uuid, "workflow_version": s("integer"),
            "status": {"enum": run_statuses()},
            "input": {}, "output": {}, "error": {}, "retry_of": {"type": ["string", "null"]}, "schedule_id": {"type": ["string", "null"]},
            "scheduled_for": {"type": ["string", "null"]}, "tokens_in": s("integer"), "tokens_out": s("integer"), "cost_usd": money,
            "unpriced_calls": s("integer"), "started_at": {"type": ["string", "null"]}, "finished_at": {"type": ["string", "null"]},
            "duration_ms": {"type": ["integer", "null"]}, "created_at": time, "updated_at": time,
            "steps": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "Step counts by status"},
            "payloads_pruned_at": {"type": ["string", "null"], "description": "When retention removed the steps' inputs and outputs"},
            "paused_at": {"type": ["string", "null"], "description": "Since when a paused run is paused"},
            "trigger_id": {"type": ["string", "null"], "description": "The event trigger that started it"},
            "max_cost_usd": {"type": ["string", "null"], "description": "The run's own hard budget, when it has one"},
            "reserved_usd": {"type": "string", "description": "What the run's model calls in flight hold of its budget"},
            "estimated_usd": {"type": "string", "description": "The estimated price of its calls whose provider reported no usage                 (counted in unpriced_calls, not in cost_usd); max_cost_usd counts it as spent"},
            "trace_export": {"type": ["object", "null"], "description": "GET /runs/{id} only, when the project exports traces: \
                status (pending, exported, failed), attempts, last_error, exported_at",
                "properties": {"status": {"enum": ["pending", "exported", "failed"]}, "attempts": s("integer"),
                    "last_error": {"type": ["string", "null"]}, "exported_at": {"type": ["string", "null"]}}}}},
        "RunStepList": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
            "key": s("string"), "kind": s("string"), "status": s("string"), "attempt": s("integer"), "input": {}, "output": {}, "error": {},
            "tokens_in": s("integer"), "tokens_out": s("integer"), "cost_usd": {"type": ["string", "null"]},
            "started_at": {"type": ["string", "null"]}, "finished_at": {"type": ["string", "null"]},
            "duration_ms": {"type": ["integer", "null"]}, "next_attempt_at": {"type": ["string", "null"]}}}}}},
        "RunEventList": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
            "seq": s("integer"), "kind": s("string"), "step": {"type": ["string", "null"]}, "data": s("object"), "at": time}}}}},
        "ModelPriceInput": {"type": "object", "required": ["input_per_mtok_usd", "output_per_mtok_usd"], "additionalProperties": false,
            "properties": {"input_per_mtok_usd": money, "output_per_mtok_usd": money}}
    });
    for item in [
        "Run",
        "Agent",
        "Tool",
        "McpServer",
        "Workflow",
        "Policy",
        "Schedule",
        "Project",
        "Member",
        "ApiKey",
        "Secret",
        "WorkflowVersion",
        "ModelPrice",
        "Webhook",
        "WebhookDelivery",
        "Trigger",
    ] {
        m[format!("{item}Page")] = page(item);
    }
    m
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for o in operations() {
        let entry = paths.entry(o.path.to_string()).or_insert_with(|| json!({}));
        entry[o.method.to_lowercase()] = operation(&o);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Spark-Ops control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Agents, tools, workflows and policies, run durably. Errors are RFC 9457 problems; ids are UUIDv7; money is USD as decimal strings."
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}, {"oauth2": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT or sk_ API key"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "oauth2": {"type": "oauth2", "flows": {"password": {"tokenUrl": "/api/v1/auth/login", "scopes": {}}}}
            },
            "responses": problem_responses(),
            "schemas": schemas(),
        }
    })
}
