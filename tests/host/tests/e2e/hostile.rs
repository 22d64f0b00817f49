//! Hostile input at the edge: strings Postgres cannot store are refused with a `422` that
//! names the field, before anything is written, on unauthenticated routes too.

use crate::common::Api;
use serde_json::{Value, json};

fn field_of(res: &crate::common::Reply) -> String {
    let body = res.json();
    assert_eq!(res.status, 422, "{body}");
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    body["errors"][0]["field"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_nul_character_is_a_422_naming_the_field_and_changes_nothing() {
    let api = Api::start().await;
    let users = api.count("users").await;
    let login = json!({"email": "a\u{0}b@example.com", "password": "whatever-long-enough"});
    let res = api
        .call("POST", "/api/v1/auth/login", None, Some(login))
        .await;
    assert_eq!(field_of(&res), "email");
    let register =
        json!({"email": "n@example.com", "password": "pw-correct-horse", "name": "N\u{0}"});
    let res = api
        .call("POST", "/api/v1/auth/register", None, Some(register))
        .await;
    assert_eq!(field_of(&res), "name");
    assert_eq!(api.count("users").await, users, "nothing was written");

    let ada = api.register("ada").await;
    let res = api
        .call(
            "POST",
            "/api/v1/projects",
            Some(&ada.access),
            Some(json!({"name": "P\u{0}"})),
        )
        .await;
    assert_eq!(field_of(&res), "name");
    let p = api.create_project(&ada, json!({"name": "P"})).await["id"].clone();
    let steps = json!([{"key": "a", "kind": "condition", "input": {"x": "{{ input.x }}"}}]);
    let wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "W", "definition": {"steps": steps}}),
        )
        .await;
    let runs = api.count("runs").await;
    let body = json!({"workflow_id": wf["id"], "input": {"x": ["ok", {"deep": "\u{0}"}]}});
    let res = api
        .call("POST", "/api/v1/runs", Some(&ada.access), Some(body))
        .await;
    assert_eq!(field_of(&res), "input.x[1].deep");
    assert_eq!(api.count("runs").await, runs);
    // Query parameters too.
    let res = api
        .call(
            "GET",
            "/api/v1/runs?project_id=%00",
            Some(&ada.access),
            None,
        )
        .await;
    assert_eq!(field_of(&res), "query.project_id");
    // The request id is on the refusal, as on every answer.
    let res = api
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "\u{0}"})),
        )
        .await;
    let problem: Value = res.json();
    assert_eq!(res.header("x-request-id"), problem["request_id"].as_str());
}

#[tokio::test]
async fn log_lines_of_concurrent_instances_never_splice() {
    let api = Api::start().await;
    // 200 requests, 50 at a time: each writes its request line while others write theirs.
    let paths: Vec<String> = (0..200)
        .map(|i| format!("/api/v1/projects?limit={i}"))
        .collect();
    for batch in paths.chunks(50) {
        let calls = batch.iter().map(|p| api.call("GET", p, None, None));
        for res in futures::future::join_all(calls).await {
            assert_eq!(res.status, 401);
        }
    }
    let logs = api.guest_logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 200, "{} lines", lines.len());
    for line in lines {
        let parsed: Result<Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "a spliced or broken line: {line}");
    }
}
