//! The API documentation: `/openapi.json` checked both ways against the contract the repo
//! carries (`components/docs/API.md`) and against the app itself, and the Swagger UI and
//! ReDoc pages with their own scripts.

use std::collections::BTreeSet;

use crate::common::Api;
use serde_json::Value;

/// Routes of API.md that later issues build (the run engine, schedules that fire, budgets'
/// usage, metrics); the document describes only what the app serves.
const NOT_YET_SERVED: [&str; 0] = [];

/// Root routes of API.md that are not under `/api/v1`.
const ROOT: [&str; 6] = [
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/docs",
    "/redoc",
    "/metrics",
];

/// Every `METHOD /path` of API.md's code blocks, as served paths.
fn contract_routes() -> BTreeSet<String> {
    let path = crate::common::workspace().join("components/docs/API.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut routes = BTreeSet::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            let methods: Vec<&str> = pair[0].split('|').collect();
            let known = methods
                .iter()
                .all(|m| ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(m));
            if !known || !pair[1].starts_with('/') {
                continue;
            }
            let route = pair[1].split('?').next().unwrap();
            let route = if ROOT.contains(&route) {
                route.to_string()
            } else {
                format!("/api/v1{route}")
            };
            for m in methods {
                routes.insert(format!("{m} {route}"));
            }
        }
    }
    routes
}

fn operations(doc: &Value) -> BTreeSet<String> {
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect()
}

/// API.md names path parameters freely (`{user_id}`, `{model}`); compare shapes.
fn shape(route: &str) -> String {
    route
        .split('/')
        .map(|s| if s.starts_with('{') { "{}" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn the_openapi_document_matches_the_contract_and_the_app() {
    let api = Api::start().await;
    let res = api.call("GET", "/openapi.json", None, None).await;
    assert_eq!(res.status, 200);
    let doc = res.json();
    assert_eq!(doc["openapi"], "3.1.0");
    // Every reference resolves inside the document.
    let text = doc.to_string();
    assert!(text.matches("\"$ref\":\"#").count() > 50);
    for piece in text.split("\"$ref\":\"#").skip(1) {
        let pointer = &piece[..piece.find('"').unwrap()];
        assert!(doc.pointer(pointer).is_some(), "{pointer} is missing");
    }
    // Sign-in routes are public; the rest need a credential and say so.
    assert_eq!(
        doc["paths"]["/api/v1/auth/login"]["post"]["security"],
        serde_json::json!([])
    );
    assert!(
        doc["paths"]["/api/v1/agents"]["get"]
            .get("security")
            .is_none()
    );
    assert!(doc["paths"]["/api/v1/agents"]["get"]["responses"]["401"].is_object());
    let documented: BTreeSet<String> = operations(&doc).iter().map(|r| shape(r)).collect();
    let contract: BTreeSet<String> = contract_routes().iter().map(|r| shape(r)).collect();
    assert!(contract.len() > 50, "API.md was not read: {contract:?}");
    let pending: BTreeSet<String> = NOT_YET_SERVED.iter().map(|r| shape(r)).collect();
    // The operator's Prometheus endpoint comes with metrics; it is not part of the API.
    let outside: BTreeSet<String> = ["GET /metrics".to_string()].into();
    let missing: Vec<&String> = contract
        .iter()
        .filter(|r| !documented.contains(*r) && !pending.contains(*r) && !outside.contains(*r))
        .collect();
    assert!(
        missing.is_empty(),
        "API.md routes the document lacks: {missing:?}"
    );
    // Routes beyond API.md are the app's own additions, named here so each is deliberate.
    let extra: BTreeSet<String> = documented.difference(&contract).cloned().collect();
    assert_eq!(
        extra,
        BTreeSet::from(
            [
                "DELETE /api/v1/models/prices/{}",
                "GET /api/v1/schedules/{}/fires",
                // Webhooks and triggers (the README's "Webhooks and triggers").
                "GET /api/v1/webhooks",
                "POST /api/v1/webhooks",
                "GET /api/v1/webhooks/{}",
                "PATCH /api/v1/webhooks/{}",
                "DELETE /api/v1/webhooks/{}",
                "POST /api/v1/webhooks/{}/test",
                "POST /api/v1/webhooks/{}/rotate-secret",
                "GET /api/v1/webhooks/{}/deliveries",
                "GET /api/v1/webhooks/{}/deliveries/{}",
                "GET /api/v1/triggers",
                "POST /api/v1/triggers",
                "GET /api/v1/triggers/{}",
                "PATCH /api/v1/triggers/{}",
                "DELETE /api/v1/triggers/{}",
                "POST /hooks/{}",
                "POST /api/v1/runs/{}/pause",
                "GET /api/v1/approvals/{}",
                "POST /api/v1/workflows/{}/quote",
                "POST /api/v1/approvals/{}",
                "POST /api/v1/runs/{}/resume",
                // MCP servers as tools (the README's "MCP servers").
                "GET /api/v1/mcp-servers",
                "POST /api/v1/mcp-servers",
                "GET /api/v1/mcp-servers/{}",
                "PATCH /api/v1/mcp-servers/{}",
                "DELETE /api/v1/mcp-servers/{}",
                "POST /api/v1/mcp-servers/{}/refresh",
            ]
            .map(String::from)
        )
    );
    for route in &pending {
        assert!(
            !documented.contains(route),
            "{route} is documented before it is served"
        );
    }
    // Every documented operation reaches a component: the host's router answers an
    // unrouted path with an empty 404, a component never does.
    for route in operations(&doc) {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path
            .replace("{id}", "0191e7a2-1f6e-7fff-bfff-ffffffffffff")
            .replace("{user_id}", "0191e7a2-1f6e-7fff-bfff-ffffffffffff")
            .replace("{name}", "KEY")
            .replace("{key}", "step")
            .replace("{delivery_id}", "0191e7a2-1f6e-7fff-bfff-ffffffffffff")
            .replace("{model}", "openai/gpt-4o");
        let res = api.call(method, &path, None, None).await;
        assert!(
            res.status != 404 || !res.body.is_empty(),
            "{route} is not served"
        );
    }
}

#[tokio::test]
async fn swagger_ui_and_redoc_are_served_with_their_own_scripts() {
    let api = Api::start().await;
    for (page, assets) in [
        (
            "/docs",
            vec![
                "/docs/swagger-ui.css",
                "/docs/swagger-ui-bundle.js",
                "/docs/swagger-ui-standalone-preset.js",
            ],
        ),
        ("/redoc", vec!["/redoc/redoc.standalone.js"]),
    ] {
        let res = api.call("GET", page, None, None).await;
        assert_eq!(res.status, 200);
        assert_eq!(res.header("content-type"), Some("text/html; charset=utf-8"));
        let html = String::from_utf8_lossy(&res.body).to_string();
        assert!(html.contains("/openapi.json"));
        assert!(
            !html.contains("https://"),
            "{page} loads something from outside: {html}"
        );
        for asset in assets {
            assert!(html.contains(asset), "{page} does not load {asset}");
            let res = api.call("GET", asset, None, None).await;
            assert_eq!(res.status, 200, "{asset}");
            assert!(
                res.body.len() > 10_000,
                "{asset} is only {} bytes",
                res.body.len()
            );
        }
    }
    assert_eq!(
        api.call("GET", "/docs/nope.js", None, None).await.status,
        404
    );
    // The Authorize button signs in through the login route's password flow.
    let doc = api.call("GET", "/openapi.json", None, None).await.json();
    assert_eq!(
        doc["components"]["securitySchemes"]["oauth2"]["flows"]["password"]["tokenUrl"],
        "/api/v1/auth/login"
    );
    assert!(doc["paths"]["/api/v1/auth/login"]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"].is_object());
}
