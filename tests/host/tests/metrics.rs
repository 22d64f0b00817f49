//! The metrics APIs against runs whose numbers are known: made through the API, with a fake
//! OpenAI-compatible provider whose usage and a project price fix every token and cent.

mod common;

use std::time::Duration;

use common::{Api, FakeServer, User, openai};
use serde_json::{Value, json};

async fn project(api: &Api, name: &str) -> (User, String) {
    let who = api.register(name).await;
    let p = api.create_project(&who, json!({"name": name})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    (who, p)
}

async fn run_to_end(api: &Api, who: &User, wf: &str) -> Value {
    let run = api.start_run(&who.access, &json!(wf), json!({})).await;
    let path = format!("/api/v1/runs/{}", run["id"].as_str().unwrap());
    common::eventually(async || {
        let run = api.call("GET", &path, Some(&who.access), None).await.json();
        (["succeeded", "failed"].contains(&run["status"].as_str().unwrap())).then_some(run)
    })
    .await
}

async fn create(api: &Api, who: &User, path: &str, body: Value) -> String {
    api.create(&who.access, path, body).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A project with three succeeded agent runs (100 + 50 tokens each, at 1 and 2 USD per
/// million: 0.0002 a run) and one failed tool run. Returns (user, project, agent workflow,
/// tool workflow, agent, tool).
async fn known_runs(api: &Api, name: &str) -> (User, String, String, String, String, String) {
    let (who, p) = project(api, name).await;
    let res = api
        .call(
            "PUT",
            &format!("/api/v1/models/prices/fake/small?project_id={p}"),
            Some(&who.access),
            Some(json!({"input_per_mtok_usd": "1", "output_per_mtok_usd": "2"})),
        )
        .await;
    assert!(res.status < 300);
    let agent = create(
        api,
        &who,
        "/api/v1/agents",
        json!({"project_id": p, "name": "A", "model": "fake/small", "system_prompt": "Be brief."}),
    )
    .await;
    let refusing = FakeServer::start(400, json!({"no": true}), Duration::ZERO).await;
    let tool = create(
        api,
        &who,
        "/api/v1/tools",
        json!({"project_id": p, "name": "t", "description": "t",
        "input_schema": {"type": "object"}, "http": {"method": "POST", "url": refusing.url("/")}}),
    )
    .await;
    let agent_wf = create(api, &who, "/api/v1/workflows", json!({"project_id": p, "name": "Agentic",
        "definition": {"steps": [{"key": "ask", "kind": "agent", "agent_id": agent, "input": "hi"}]}})).await;
    let tool_wf = create(
        api,
        &who,
        "/api/v1/workflows",
        json!({"project_id": p, "name": "Tooling",
        "definition": {"steps": [{"key": "call", "kind": "tool", "tool_id": tool, "input": {}}]}}),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            run_to_end(api, &who, &agent_wf).await["status"],
            "succeeded"
        );
    }
    assert_eq!(run_to_end(api, &who, &tool_wf).await["status"], "failed");
    (who, p, agent_wf, tool_wf, agent, tool)
}

async fn report(api: &Api, who: &User, query: &str) -> Value {
    let res = api
        .call(
            "GET",
            &format!("/api/v1/metrics/{query}"),
            Some(&who.access),
            None,
        )
        .await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    res.json()
}

fn only(report: &Value) -> Value {
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{report}");
    items[0].clone()
}

#[tokio::test]
async fn summaries_count_exactly_the_runs_made_in_each_grouping_range_and_tenant() {
    let provider = FakeServer::answering(vec![openai::text("ok", 100, 50)], Duration::ZERO).await;
    let providers = format!("fake={}", provider.url("/v1"));
    let api = Api::start_with(&[
        ("SPIN_VARIABLE_TOOLS_ALLOW_HTTP", "true"),
        ("SPIN_VARIABLE_TOOLS_ALLOW_PRIVATE_HOSTS", "true"),
        ("SPIN_VARIABLE_MODEL_PROVIDERS", providers.as_str()),
    ])
    .await;
    let (ada, p, agent_wf, tool_wf, agent, tool) = known_runs(&api, "ada").await;
    // Another tenant's runs never count in ada's figures.
    let (bob, q, ..) = known_runs(&api, "bob").await;

    let all = only(&report(&api, &ada, &format!("summary?project_id={p}")).await);
    assert_eq!(
        (&all["count"], &all["by_status"], &all["success_rate"]),
        (
            &json!(4),
            &json!({"succeeded": 3, "failed": 1}),
            &json!(0.75)
        )
    );
    assert_eq!(
        (
            &all["tokens_in"],
            &all["tokens_out"],
            &all["cost_usd"],
            &all["unpriced_calls"]
        ),
        (&json!(300), &json!(150), &json!("0.000600"), &json!(0))
    );
    assert!(all["duration_ms"]["p50"].as_i64().unwrap() >= 0);
    assert!(all["duration_ms"]["p99"].as_i64() >= all["duration_ms"]["p50"].as_i64());

    let by_workflow = report(
        &api,
        &ada,
        &format!("summary?project_id={p}&group_by=workflow"),
    )
    .await;
    let items = by_workflow["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let of = |wf: &str| {
        items
            .iter()
            .find(|i| i["workflow_id"] == wf)
            .unwrap()
            .clone()
    };
    assert_eq!(
        (&of(&agent_wf)["count"], &of(&agent_wf)["cost_usd"]),
        (&json!(3), &json!("0.000600"))
    );
    assert_eq!(
        (&of(&tool_wf)["by_status"], &of(&tool_wf)["success_rate"]),
        (&json!({"failed": 1}), &json!(0.0))
    );

    let by_model = only(
        &report(
            &api,
            &ada,
            &format!("summary?project_id={p}&group_by=model"),
        )
        .await,
    );
    assert_eq!(
        (
            &by_model["model"],
            &by_model["count"],
            &by_model["tokens_in"],
            &by_model["cost_usd"]
        ),
        (
            &json!("fake/small"),
            &json!(3),
            &json!(300),
            &json!("0.000600")
        )
    );
    let by_agent = only(
        &report(
            &api,
            &ada,
            &format!("summary?project_id={p}&group_by=agent"),
        )
        .await,
    );
    assert_eq!(
        (&by_agent["agent_id"], &by_agent["count"]),
        (&json!(agent), &json!(3))
    );
    let by_day = only(&report(&api, &ada, &format!("summary?project_id={p}&group_by=day")).await);
    assert_eq!(
        by_day["day"],
        chrono::Utc::now().format("%Y-%m-%d").to_string()
    );
    assert_eq!(by_day["count"], 4);

    // Per step kind, tool and model.
    let steps = report(&api, &ada, &format!("steps?project_id={p}")).await;
    let items = steps["items"].as_array().unwrap();
    let agent_steps = items.iter().find(|i| i["kind"] == "agent").unwrap();
    assert_eq!(
        (
            &agent_steps["model"],
            &agent_steps["count"],
            &agent_steps["tokens_out"]
        ),
        (&json!("fake/small"), &json!(3), &json!(150))
    );
    let tool_steps = items.iter().find(|i| i["kind"] == "tool").unwrap();
    assert_eq!(
        (&tool_steps["tool_id"], &tool_steps["by_status"]),
        (&json!(tool), &json!({"failed": 1}))
    );

    // A range after the runs holds none; one around them holds them all.
    let at = |hours: i64| {
        (chrono::Utc::now() + chrono::Duration::hours(hours))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let (earlier, later, latest) = (at(-1), at(1), at(2));
    let empty = report(
        &api,
        &ada,
        &format!("summary?project_id={p}&from={later}&to={latest}"),
    )
    .await;
    assert_eq!(empty["items"], json!([]));
    assert_eq!(
        only(
            &report(
                &api,
                &ada,
                &format!("summary?project_id={p}&from={earlier}&to={later}")
            )
            .await
        )["count"],
        4
    );

    // Tenancy and bad input.
    assert_eq!(
        api.status(
            "GET",
            &format!("/api/v1/metrics/summary?project_id={q}"),
            Some(&ada.access),
            None
        )
        .await,
        404
    );
    assert_eq!(
        only(&report(&api, &bob, &format!("summary?project_id={q}")).await)["count"],
        4
    );
    let res = api
        .call(
            "GET",
            &format!("/api/v1/metrics/summary?project_id={p}&group_by=week"),
            Some(&ada.access),
            None,
        )
        .await;
    assert_eq!(
        (res.status, res.json()["errors"][0]["field"].clone()),
        (422, json!("group_by"))
    );
    let res = api
        .call(
            "GET",
            &format!("/api/v1/metrics/summary?project_id={p}&from={later}&to={earlier}"),
            Some(&ada.access),
            None,
        )
        .await;
    assert_eq!(res.status, 422);
}
