//! Agent steps end to end: a fake OpenAI-compatible provider on loopback (chat completions
//! with function tools, usage, errors, `Retry-After`), fake tools, the real components, a
//! real Postgres and Redis. Tokens, costs, policies and budgets as a run records them.

use std::time::Duration;

use crate::common::{Answer, Api, FakeServer, User, openai};
use serde_json::{Value, json};

async fn project(api: &Api) -> (User, String) {
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Agents"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    (ada, p)
}

async fn tool(api: &Api, who: &User, p: &str, name: &str, url: String) -> String {
    let t = api
        .create(
            &who.access,
            "/api/v1/tools",
            json!({"project_id": p, "name": name, "description": format!("the {name} tool"),
                "input_schema": {"type": "object"}, "http": {"method": "POST", "url": url}}),
        )
        .await;
    t["id"].as_str().unwrap().to_string()
}

async fn agent(api: &Api, who: &User, p: &str, extra: Value) -> String {
    let mut body = json!({"project_id": p, "name": format!("A {}", uuid::Uuid::new_v4()),
        "model": "fake/small", "system_prompt": "You are terse."});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    api.create(&who.access, "/api/v1/agents", body).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A workflow of agent steps, each `{key, agent, input}`; `retry` on each.
async fn workflow(api: &Api, who: &User, p: &str, steps: &[(&str, &str)], retry: Value) -> String {
    let steps: Vec<Value> = steps
        .iter()
        .map(|(key, agent)| {
            json!({"key": key, "kind": "agent", "agent_id": agent, "input": "{{ input.q }}", "retry": retry})
        })
        .collect();
    api.create(
        &who.access,
        "/api/v1/workflows",
        json!({"project_id": p, "name": format!("W {}", uuid::Uuid::new_v4()), "definition": {"steps": steps}}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn body(r: &crate::common::Recorded) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test]
async fn an_agent_calls_two_tools_then_answers_with_its_tokens_and_cost_recorded() {
    let provider = FakeServer::answering(
        vec![
            openai::tool_calls(&[("c1", "city", json!({"q": "north"}))], 100, 20),
            openai::tool_calls(&[("c2", "weather", json!({"city": "Oslo"}))], 150, 25),
            openai::text("It is 3 degrees in Oslo.", 200, 30),
        ],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    let city_fake = FakeServer::start(200, json!({"city": "Oslo"}), Duration::ZERO).await;
    let weather_fake = FakeServer::start(200, json!({"temp": 3}), Duration::ZERO).await;
    let city = tool(&api, &ada, &p, "city", city_fake.url("/")).await;
    let weather = tool(&api, &ada, &p, "weather", weather_fake.url("/")).await;
    api.set_price(&ada.access, &p, "fake/small", "2", "8").await;
    let a = agent(&api, &ada, &p, json!({"tool_ids": [city, weather]})).await;
    let wf = workflow(&api, &ada, &p, &[("ask", &a)], json!({"max_attempts": 1})).await;
    let run = api
        .run_to_end(
            &ada.access,
            &wf,
            json!({"q": "What is the weather up north?"}),
        )
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!({"ask": "It is 3 degrees in Oslo."}));
    let run_id = run["id"].as_str().unwrap();

    // The provider saw the real protocol: tools offered, then each result fed back.
    let sent = provider.received();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0].uri, "/v1/chat/completions");
    assert_eq!(sent[0].headers["authorization"], "Bearer sk-app-key");
    let first = body(&sent[0]);
    assert_eq!(first["model"], "small");
    assert_eq!(
        first["messages"],
        json!([{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "What is the weather up north?"}])
    );
    let offered: Vec<&str> = first["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(offered, vec!["city", "weather"]);
    let last = body(&sent[2]);
    let tool_messages: Vec<(&str, Value)> = last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| {
            (
                m["tool_call_id"].as_str().unwrap(),
                serde_json::from_str(m["content"].as_str().unwrap()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tool_messages,
        vec![("c1", json!({"city": "Oslo"})), ("c2", json!({"temp": 3}))]
    );
    // Each tool ran once, with the model's arguments and a key of its own.
    assert_eq!(body(&city_fake.received()[0]), json!({"q": "north"}));
    assert_eq!(
        city_fake.idempotency_keys(),
        vec![format!("{run_id}:ask:c1")]
    );
    assert_eq!(
        weather_fake.idempotency_keys(),
        vec![format!("{run_id}:ask:c2")]
    );

    // Tokens and cost: 450 in, 75 out; 450 * 2 + 75 * 8 = 1500 micro-dollars.
    assert_eq!(
        (
            &run["tokens_in"],
            &run["tokens_out"],
            &run["cost_usd"],
            &run["unpriced_calls"]
        ),
        (&json!(450), &json!(75), &json!("0.001500"), &json!(0))
    );
    let step = &api.run_items(&ada.access, &run, "steps").await[0];
    assert_eq!(
        (&step["tokens_in"], &step["tokens_out"], &step["cost_usd"]),
        (&json!(450), &json!(75), &json!("0.001500"))
    );
    let events = api.run_items(&ada.access, &run, "events").await;
    let calls: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "model.called")
        .collect();
    assert_eq!(calls.len(), 3);
    assert_eq!(
        (
            &calls[2]["data"]["tokens_in"],
            &calls[2]["data"]["cost_usd"]
        ),
        (&json!(200), &json!("0.000640"))
    );
    assert_eq!(
        events.iter().filter(|e| e["kind"] == "tool.called").count(),
        2
    );
    // No key ever reaches the run's record.
    assert!(
        !serde_json::to_string(&events)
            .unwrap()
            .contains("sk-app-key")
    );

    // A project secret overrides the provider key for that project.
    let res = api
        .call(
            "PUT",
            &format!("/api/v1/projects/{p}/secrets/provider.fake.api_key"),
            Some(&ada.access),
            Some(json!({"value": "sk-project-key"})),
        )
        .await;
    assert_eq!(res.status, 204, "{}", String::from_utf8_lossy(&res.body));
    let again = api
        .run_to_end(&ada.access, &wf, json!({"q": "again"}))
        .await;
    assert_eq!(again["status"], "succeeded");
    assert_eq!(
        provider.received()[3].headers["authorization"],
        "Bearer sk-project-key"
    );
    let logs = api.guest_logs();
    assert!(!logs.contains("sk-project-key") && !logs.contains("sk-app-key"));
    // One JSON line per step attempt, with ids and outcome but never the step's content.
    let step_line: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["msg"] == "step" && l["run_id"] == run_id)
        .expect("a step log line");
    assert_eq!(
        (
            &step_line["step"],
            &step_line["status"],
            &step_line["attempt"],
            &step_line["project_id"],
        ),
        (&json!("ask"), &json!("succeeded"), &json!(1), &json!(p))
    );
    assert!(
        step_line["request_id"]
            .as_str()
            .is_some_and(|r| r.contains(run_id))
    );
    assert!(step_line["duration_ms"].as_i64().is_some());
    // How long the result took to record, in milliseconds with two decimals.
    assert!(step_line["record_ms"].as_f64().is_some_and(|ms| ms > 0.0));
    assert!(step_line.get("input").is_none() && step_line.get("output").is_none());
    // Request lines name the project and run they were about.
    let run_path = format!("/api/v1/runs/{run_id}");
    let request_line: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["msg"] == "request" && l["path"] == run_path.as_str())
        .expect("a request log line");
    assert_eq!(
        (
            &request_line["project_id"],
            &request_line["run_id"],
            &request_line["status"]
        ),
        (&json!(p), &json!(run_id), &json!(200))
    );
    assert!(!logs.contains("weather up north") && !logs.contains("3 degrees"));
}

#[tokio::test]
async fn step_contents_are_logged_only_when_the_operator_opts_in() {
    let provider = FakeServer::answering(
        vec![openai::text("It is 3 degrees in Oslo.", 10, 5)],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(
        Some(&provider),
        &[("SPIN_VARIABLE_LOG_STEP_PAYLOADS", "true")],
    )
    .await;
    let (ada, p) = project(&api).await;
    let a = agent(&api, &ada, &p, json!({})).await;
    let wf = workflow(&api, &ada, &p, &[("ask", &a)], json!({"max_attempts": 1})).await;
    let run = api
        .run_to_end(&ada.access, &wf, json!({"q": "Weather in Oslo?"}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let logs = api.guest_logs();
    let step_line: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["msg"] == "step" && l["run_id"] == run["id"])
        .expect("a step log line");
    assert_eq!(step_line["input"], "Weather in Oslo?");
    assert_eq!(step_line["output"], "It is 3 degrees in Oslo.");
    assert!(!logs.contains("sk-app-key"), "keys stay out either way");
}

#[tokio::test]
async fn an_agent_that_never_stops_calling_tools_fails_at_max_iterations() {
    let provider = FakeServer::answering(
        vec![openai::tool_calls(&[("c", "echo", json!({}))], 10, 5)],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    let echo = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let echo = tool(&api, &ada, &p, "echo", echo.url("/")).await;
    let a = agent(
        &api,
        &ada,
        &p,
        json!({"tool_ids": [echo], "max_iterations": 2}),
    )
    .await;
    let wf = workflow(&api, &ada, &p, &[("loop", &a)], json!({"max_attempts": 3})).await;
    let run = api.run_to_end(&ada.access, &wf, json!({"q": "go"})).await;
    assert_eq!(run["status"], "failed");
    let step = &api.run_items(&ada.access, &run, "steps").await[0];
    // Not retried: another attempt would loop the same way.
    assert_eq!(
        (&step["error"]["kind"], &step["attempt"]),
        (&json!("max-iterations"), &json!(1))
    );
    assert_eq!(provider.received().len(), 2);
    // The model's name has no price: the calls are recorded as unpriced, never free.
    assert_eq!(
        (&run["unpriced_calls"], &run["tokens_in"]),
        (&json!(2), &json!(20))
    );
}

#[tokio::test]
async fn an_agent_whose_run_is_cancelled_mid_step_makes_no_further_model_call() {
    // The model would go on calling the slow tool for ever.
    let provider = FakeServer::answering(
        vec![openai::tool_calls(&[("c", "slow", json!({}))], 10, 5)],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    let slow = FakeServer::start(200, json!({}), Duration::from_secs(7)).await;
    let slow_id = tool(&api, &ada, &p, "slow", slow.url("/")).await;
    let a = agent(
        &api,
        &ada,
        &p,
        json!({"tool_ids": [slow_id], "max_iterations": 5}),
    )
    .await;
    let wf = workflow(&api, &ada, &p, &[("loop", &a)], json!({"max_attempts": 1})).await;
    let run = api
        .start_run(&ada.access, &json!(wf), json!({"q": "go"}))
        .await;
    let id = run["id"].as_str().unwrap();
    crate::common::eventually(async || (!slow.received().is_empty()).then_some(())).await;
    let cancel = api.cancel(&ada.access, id).await;
    assert_eq!(cancel.status, 202);
    // The heartbeat during the tool call (5 s in) finds the lease gone; when the tool
    // answers (7 s), the agent stops instead of asking the model again.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(provider.received().len(), 1);
    assert_eq!(slow.received().len(), 1);
    let run = api.finished_run(&ada.access, id).await;
    assert_eq!(run["status"], "cancelled");
}

#[tokio::test]
async fn a_structured_answer_is_checked_against_response_format() {
    let provider = FakeServer::answering(
        vec![
            openai::text(r#"{"answer": "yes", "confidence": 0.9}"#, 10, 5),
            openai::text(r#"{"answer": 42}"#, 10, 5),
        ],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    let schema = json!({"type": "object", "required": ["answer"],
        "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}}});
    let a = agent(&api, &ada, &p, json!({"response_format": schema})).await;
    let wf = workflow(&api, &ada, &p, &[("judge", &a)], json!({"max_attempts": 1})).await;
    let good = api
        .run_to_end(&ada.access, &wf, json!({"q": "is it?"}))
        .await;
    assert_eq!(good["status"], "succeeded", "{good}");
    assert_eq!(
        good["output"],
        json!({"judge": {"answer": "yes", "confidence": 0.9}})
    );
    assert_eq!(
        body(&provider.received()[0])["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema}})
    );
    let bad = api
        .run_to_end(&ada.access, &wf, json!({"q": "is it?"}))
        .await;
    assert_eq!(bad["status"], "failed");
    let step = &api.run_items(&ada.access, &bad, "steps").await[0];
    assert_eq!(step["error"]["kind"], "validation");
    assert!(
        step["error"]["message"]
            .as_str()
            .unwrap()
            .contains("response_format"),
        "{step}"
    );
}

#[tokio::test]
async fn provider_rate_limits_and_errors_are_retried_with_backoff_and_a_bad_request_is_not() {
    let provider = FakeServer::answering(
        vec![
            openai::error(429, Some("30")),
            openai::error(500, None),
            openai::text("done", 3, 1),
            openai::error(400, None),
        ],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    let a = agent(&api, &ada, &p, json!({})).await;
    let retry = json!({"max_attempts": 5, "initial_interval_ms": 1000, "backoff_coefficient": 2, "max_interval_ms": 60000});
    let wf = workflow(&api, &ada, &p, &[("ask", &a)], retry).await;
    let run = api
        .start_run(&ada.access, &json!(wf), json!({"q": "hi"}))
        .await;
    let id = run["id"].as_str().unwrap().to_string();
    let step = || async {
        let s = api
            .call(
                "GET",
                &format!("/api/v1/runs/{id}/steps"),
                Some(&ada.access),
                None,
            )
            .await
            .json();
        s["items"][0].clone()
    };
    let first = crate::common::eventually(async || {
        let s = step().await;
        (s["status"] == "retrying").then_some(s)
    })
    .await;
    assert_eq!(first["error"]["kind"], "rate-limited");
    // Retry-After (30 s) outweighs the 1 s backoff.
    let next =
        chrono::DateTime::parse_from_rfc3339(first["next_attempt_at"].as_str().unwrap()).unwrap();
    assert!(
        next.timestamp() - chrono::Utc::now().timestamp() >= 25,
        "{first}"
    );
    api.sweep_at(10).await;
    assert_eq!(step().await["attempt"], 1);
    api.sweep_at(40).await;
    let second = crate::common::eventually(async || {
        let s = step().await;
        (s["status"] == "retrying" && s["attempt"] == 2).then_some(s)
    })
    .await;
    assert_eq!(second["error"]["kind"], "provider-error");
    api.sweep_at(120).await;
    let done = crate::common::eventually(async || {
        let s = step().await;
        (s["status"] == "succeeded").then_some(s)
    })
    .await;
    assert_eq!(
        (&done["attempt"], &done["output"]),
        (&json!(3), &json!("done"))
    );
    // A 400 is the request's fault: failed at once, no retry.
    let bad = api.run_to_end(&ada.access, &wf, json!({"q": "bad"})).await;
    assert_eq!(bad["status"], "failed");
    let s = &api.run_items(&ada.access, &bad, "steps").await[0];
    assert_eq!(
        (&s["error"]["kind"], &s["attempt"]),
        (&json!("validation"), &json!(1))
    );
    assert_eq!(provider.received().len(), 4);
}

#[tokio::test]
async fn fifty_agent_steps_at_once_never_spend_past_a_blocking_budget() {
    // Each call costs exactly its worst case: 1000 completion tokens at 10 USD/M = 0.01.
    let provider =
        FakeServer::answering(vec![openai::text("ok", 0, 1000)], Duration::from_millis(50)).await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    api.set_price(&ada.access, &p, "fake/small", "0", "10")
        .await;
    let a = agent(&api, &ada, &p, json!({"max_tokens": 1000})).await;
    let policy = api
        .create(
            &ada.access,
            "/api/v1/policies",
            json!({"project_id": p, "name": "Ten calls", "rules": {"budget": {"limit_usd": "0.10", "window": "day", "action": "block"}}}),
        )
        .await;
    let wf = json!(workflow(&api, &ada, &p, &[("ask", &a)], json!({"max_attempts": 1})).await);
    let runs: Vec<String> = futures::future::join_all(
        (0..50).map(|_| api.start_run(&ada.access, &wf, json!({"q": "x"}))),
    )
    .await
    .iter()
    .map(|r| r["id"].as_str().unwrap().to_string())
    .collect();
    let db = api.env.db().await;
    let mut finished = 0;
    for _ in 0..600 {
        finished = db
            .query_one(
                "select count(*) from runs where finished_at is not null",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if finished == 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(finished, 50);
    let row = db
        .query_one(
            "select count(*) filter (where status = 'succeeded'), count(*) filter (where status = 'failed'),
                    sum(cost_usd)::text from runs",
            &[],
        )
        .await
        .unwrap();
    let (ok, failed, spent): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((ok, failed, spent.as_str()), (10, 40, "0.100000"));
    assert_eq!(provider.received().len(), 10);
    let violations: i64 = db
        .query_one(
            "select count(*) from run_steps where error->>'kind' = 'policy-violation'
               and error->>'message' like '%Ten calls%budget%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(violations, 40);
    let usage = db
        .query_one(
            "select spent_usd::text, reserved_usd::text, calls from budget_usage where policy_id = $1::text::uuid",
            &[&policy["id"].as_str().unwrap()],
        )
        .await
        .unwrap();
    let (spent, reserved, calls): (String, String, i64) =
        (usage.get(0), usage.get(1), usage.get(2));
    assert_eq!(
        (spent.as_str(), reserved.as_str(), calls),
        ("0.100000", "0.000000", 10)
    );
    assert_eq!(runs.len(), 50);
}

#[tokio::test]
async fn each_policy_rule_refuses_exactly_what_it_names_across_scopes() {
    let provider = FakeServer::answering(
        vec![
            openai::tool_calls(
                &[("c1", "allowed", json!({})), ("c2", "forbidden", json!({}))],
                60,
                10,
            ),
            openai::text("fine", 60, 10),
        ],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    let allowed_fake = FakeServer::start(200, json!({"ok": 1}), Duration::ZERO).await;
    let forbidden_fake = FakeServer::start(200, json!({"ok": 2}), Duration::ZERO).await;
    let allowed = tool(&api, &ada, &p, "allowed", allowed_fake.url("/")).await;
    let forbidden = tool(&api, &ada, &p, "forbidden", forbidden_fake.url("/")).await;
    let a = agent(&api, &ada, &p, json!({"tool_ids": [allowed, forbidden]})).await;
    let big = agent(&api, &ada, &p, json!({"model": "fake/big"})).await;
    let policy = |name: &str, scope: Value, rules: Value| json!({"project_id": p, "name": name, "scope": scope, "rules": rules});
    // Project-wide: fake models only; a second, stricter one: only fake/small. The most
    // restrictive wins.
    api.create(
        &ada.access,
        "/api/v1/policies",
        policy("Fakes", json!({}), json!({"allowed_models": ["fake/*"]})),
    )
    .await;
    api.create(
        &ada.access,
        "/api/v1/policies",
        policy(
            "Small only",
            json!({}),
            json!({"allowed_models": ["fake/small"]}),
        ),
    )
    .await;
    // Agent-scoped: one tool only.
    api.create(
        &ada.access,
        "/api/v1/policies",
        policy(
            "One tool",
            json!({"agent_id": a}),
            json!({"allowed_tools": [allowed]}),
        ),
    )
    .await;

    let refusal = |run: Value| {
        let api = &api;
        let ada = &ada;
        async move {
            assert_eq!(run["status"], "failed", "{run}");
            let steps = api.run_items(&ada.access, &run, "steps").await;
            let failed = steps
                .iter()
                .find(|s| s["status"] == "failed")
                .unwrap()
                .clone();
            assert_eq!(failed["error"]["kind"], "policy-violation");
            let events = api.run_items(&ada.access, &run, "events").await;
            let v = events
                .iter()
                .find(|e| e["kind"] == "policy.violation")
                .unwrap()
                .clone();
            (
                failed["error"]["message"].as_str().unwrap().to_string(),
                v["data"].clone(),
            )
        }
    };

    // The model rule: refused before any call.
    let wf = workflow(&api, &ada, &p, &[("ask", &big)], json!({"max_attempts": 1})).await;
    let (message, data) = refusal(api.run_to_end(&ada.access, &wf, json!({"q": "x"})).await).await;
    assert!(
        message.contains("Small only") && message.contains("allowed_models"),
        "{message}"
    );
    assert_eq!(
        (&data["policy"], &data["rule"]),
        (&json!("Small only"), &json!("allowed_models"))
    );
    assert_eq!(provider.received().len(), 0);

    // The tool rule: the allowed tool runs, the other is refused and never called.
    let wf = workflow(&api, &ada, &p, &[("ask", &a)], json!({"max_attempts": 1})).await;
    let (message, data) = refusal(api.run_to_end(&ada.access, &wf, json!({"q": "x"})).await).await;
    assert!(
        message.contains("One tool") && message.contains(&forbidden),
        "{message}"
    );
    assert_eq!(data["rule"], "allowed_tools");
    assert_eq!(
        (
            allowed_fake.received().len(),
            forbidden_fake.received().len()
        ),
        (1, 0)
    );

    // Workflow-scoped token and step limits.
    let plain = agent(&api, &ada, &p, json!({})).await;
    let wf = workflow(
        &api,
        &ada,
        &p,
        &[("one", &plain), ("two", &plain)],
        json!({"max_attempts": 1}),
    )
    .await;
    api.create(
        &ada.access,
        "/api/v1/policies",
        policy(
            "One step",
            json!({"workflow_id": wf}),
            json!({"max_steps_per_run": 1}),
        ),
    )
    .await;
    let (message, data) = refusal(api.run_to_end(&ada.access, &wf, json!({"q": "x"})).await).await;
    assert!(
        message.contains("One step") && message.contains("max_steps_per_run"),
        "{message}"
    );
    assert_eq!(data["rule"], "max_steps_per_run");

    // Two steps in a chain under a run-wide token limit: the first (70 tokens) uses it up,
    // the second is refused before it calls the model.
    let tokens_wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "Chain", "definition": {"steps": [
                {"key": "one", "kind": "agent", "agent_id": plain, "input": "x", "retry": {"max_attempts": 1}},
                {"key": "two", "kind": "agent", "agent_id": plain, "input": "y", "depends_on": ["one"], "retry": {"max_attempts": 1}}]}}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.create(
        &ada.access,
        "/api/v1/policies",
        policy(
            "Few tokens",
            json!({"workflow_id": tokens_wf}),
            json!({"max_tokens_per_run": 50}),
        ),
    )
    .await;
    let before = provider.received().len();
    let run = api
        .run_to_end(&ada.access, &tokens_wf, json!({"q": "x"}))
        .await;
    let (message, _) = refusal(run.clone()).await;
    assert!(
        message.contains("Few tokens") && message.contains("max_tokens_per_run"),
        "{message}"
    );
    assert_eq!(provider.received().len(), before + 1);
    assert_eq!(
        run["tokens_in"].as_i64().unwrap() + run["tokens_out"].as_i64().unwrap(),
        70
    );
    // A workflow the token policy does not scope is not limited by it.
    let free = workflow(
        &api,
        &ada,
        &p,
        &[("one", &plain)],
        json!({"max_attempts": 1}),
    )
    .await;
    assert_eq!(
        api.run_to_end(&ada.access, &free, json!({"q": "x"})).await["status"],
        "succeeded"
    );
}

#[tokio::test]
async fn tool_steps_meet_the_same_tool_and_step_rules() {
    let provider = FakeServer::start(500, json!({}), Duration::ZERO).await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    let ok_fake = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let no_fake = FakeServer::start(200, json!({"ok": false}), Duration::ZERO).await;
    let ok = tool(&api, &ada, &p, "ok_tool", ok_fake.url("/")).await;
    let no = tool(&api, &ada, &p, "no_tool", no_fake.url("/")).await;
    let wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "Tools", "definition": {"steps": [
                {"key": "a", "kind": "tool", "tool_id": ok, "input": {}},
                {"key": "b", "kind": "tool", "tool_id": no, "input": {}, "depends_on": ["a"]}]}}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.create(
        &ada.access,
        "/api/v1/policies",
        json!({"project_id": p, "name": "Only ok", "scope": {"workflow_id": wf}, "rules": {"allowed_tools": [ok]}}),
    )
    .await;
    let run = api.run_to_end(&ada.access, &wf, json!({"q": "x"})).await;
    assert_eq!(run["status"], "failed");
    let steps = api.run_items(&ada.access, &run, "steps").await;
    let b = steps.iter().find(|s| s["key"] == "b").unwrap();
    assert_eq!(
        (&b["error"]["kind"], &b["attempt"]),
        (&json!("policy-violation"), &json!(1))
    );
    assert!(b["error"]["message"].as_str().unwrap().contains("Only ok"));
    assert_eq!((ok_fake.received().len(), no_fake.received().len()), (1, 0));
    assert!(
        api.run_items(&ada.access, &run, "events")
            .await
            .iter()
            .any(|e| e["kind"] == "policy.violation" && e["step"] == "b")
    );
}

#[tokio::test]
async fn an_alert_budget_never_blocks_and_alerts_once_when_crossed() {
    let provider = FakeServer::answering(vec![openai::text("ok", 0, 1000)], Duration::ZERO).await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    api.set_price(&ada.access, &p, "fake/small", "0", "10")
        .await;
    let a = agent(&api, &ada, &p, json!({"max_tokens": 1000})).await;
    api.create(
        &ada.access,
        "/api/v1/policies",
        json!({"project_id": p, "name": "Watch", "rules": {"budget": {"limit_usd": "0.015", "window": "month", "action": "alert"}}}),
    )
    .await;
    let wf = workflow(&api, &ada, &p, &[("ask", &a)], json!({"max_attempts": 1})).await;
    let mut alerts = Vec::new();
    for _ in 0..3 {
        let run = api.run_to_end(&ada.access, &wf, json!({"q": "x"})).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        alerts.push(
            api.run_items(&ada.access, &run, "events")
                .await
                .iter()
                .filter(|e| e["kind"] == "budget.alert")
                .count(),
        );
    }
    // 0.01, then 0.02 (crossing 0.015: one alert), then 0.03 (already past: none).
    assert_eq!(alerts, vec![0, 1, 0]);
    let usage = api
        .call(
            "GET",
            &format!("/api/v1/policies/usage?project_id={p}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(
        (
            &usage["items"][0]["spent_usd"],
            &usage["items"][0]["exceeded"]
        ),
        (&json!("0.030000"), &json!(true))
    );
}

#[tokio::test]
async fn a_hold_whose_call_never_settled_is_released_by_the_sweeper() {
    let provider = FakeServer::answering(vec![openai::text("ok", 0, 100)], Duration::ZERO).await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    api.set_price(&ada.access, &p, "fake/small", "0", "10")
        .await;
    let a = agent(&api, &ada, &p, json!({"max_tokens": 100})).await;
    let policy = api
        .create(
            &ada.access,
            "/api/v1/policies",
            json!({"project_id": p, "name": "Cap", "rules": {"budget": {"limit_usd": "1", "window": "total"}}}),
        )
        .await;
    let policy_id = policy["id"].as_str().unwrap().to_string();
    let wf = workflow(&api, &ada, &p, &[("ask", &a)], json!({"max_attempts": 1})).await;
    assert_eq!(
        api.run_to_end(&ada.access, &wf, json!({"q": "x"})).await["status"],
        "succeeded"
    );
    // A call whose host died after reserving: its hold stays until it expires.
    let db = api.env.db().await;
    db.batch_execute(&format!(
        "insert into budget_reservations (reservation_id, policy_id, window_start, amount_usd, expires_at)
         values (gen_random_uuid(), '{policy_id}', 'epoch', 0.5, now() + interval '10 minutes');
         update budget_usage set reserved_usd = reserved_usd + 0.5 where policy_id = '{policy_id}';"
    ))
    .await
    .unwrap();
    let reserved = || async {
        let usage = api
            .call(
                "GET",
                &format!("/api/v1/policies/usage?project_id={p}"),
                Some(&ada.access),
                None,
            )
            .await
            .json();
        usage["items"][0]["reserved_usd"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(reserved().await, "0.500000");
    api.sweep_at(60).await;
    assert_eq!(reserved().await, "0.500000");
    api.sweep_at(3600).await;
    assert_eq!(reserved().await, "0.000000");
    // What was spent stays spent.
    let spent: String = db
        .query_one(
            "select spent_usd::text from budget_usage where policy_id = $1::text::uuid",
            &[&policy_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(spent, "0.001000");
}

#[tokio::test]
async fn a_step_token_limit_cuts_max_tokens_and_refuses_the_call_after_it_is_used() {
    let provider = FakeServer::answering(
        vec![
            openai::tool_calls(&[("c1", "echo", json!({}))], 300, 100),
            openai::text("never", 1, 1),
        ],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    let echo_fake = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let echo = tool(&api, &ada, &p, "echo", echo_fake.url("/")).await;
    let a = agent(
        &api,
        &ada,
        &p,
        json!({"tool_ids": [echo], "max_tokens": 1024}),
    )
    .await;
    api.create(
        &ada.access,
        "/api/v1/policies",
        json!({"project_id": p, "name": "Short steps", "scope": {"agent_id": a}, "rules": {"max_tokens_per_step": 400}}),
    )
    .await;
    let wf = workflow(&api, &ada, &p, &[("ask", &a)], json!({"max_attempts": 1})).await;
    let run = api.run_to_end(&ada.access, &wf, json!({"q": "x"})).await;
    assert_eq!(run["status"], "failed");
    // The one call allowed asked for no more than the 400 tokens the step may use.
    let sent = provider.received();
    assert_eq!(sent.len(), 1);
    let asked = body(&sent[0])["max_tokens"].as_i64().unwrap();
    assert!((1..400).contains(&asked), "max_tokens {asked}");
    // It used all 400: the next call is refused.
    let step = &api.run_items(&ada.access, &run, "steps").await[0];
    assert_eq!(step["error"]["kind"], "policy-violation");
    let message = step["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Short steps") && message.contains("max_tokens_per_step"),
        "{message}"
    );
    assert_eq!(echo_fake.received().len(), 1);
}

// ---- Model fallbacks -----------------------------------------------------------------------

/// The `model` of each chat request the provider received.
fn models_asked(provider: &FakeServer) -> Vec<String> {
    provider
        .received()
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.body).unwrap()["model"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn a_failing_model_falls_back_to_the_next_and_the_answering_model_is_recorded() {
    for first in [
        openai::error(503, None),
        openai::error(429, Some("7")),
        Answer {
            status: 400,
            body: json!({"error": {"message": "This model's maximum context length is 8192 tokens.",
                "type": "invalid_request_error", "code": "context_length_exceeded"}}),
            headers: Vec::new(),
        },
    ] {
        let status = first.status;
        let provider = FakeServer::answering(
            vec![first, openai::text("from the fallback", 100, 10)],
            Duration::ZERO,
        )
        .await;
        let api = Api::for_fakes(Some(&provider), &[]).await;
        let (ada, p) = project(&api).await;
        api.set_price(&ada.access, &p, "fake/small", "1", "1").await;
        api.set_price(&ada.access, &p, "fake/large", "10", "10")
            .await;
        let a = agent(&api, &ada, &p, json!({"fallback_models": ["fake/large"]})).await;
        let wf = workflow(&api, &ada, &p, &[("ask", &a)], json!({"max_attempts": 1})).await;
        let run = api.run_to_end(&ada.access, &wf, json!({"q": "x"})).await;
        assert_eq!(run["status"], "succeeded", "{status}: {run}");
        assert_eq!(run["output"]["ask"], "from the fallback");
        assert_eq!(models_asked(&provider), ["small", "large"], "{status}");
        // The answering model's price: 110 tokens at 10 USD per million.
        assert_eq!(run["cost_usd"], "0.001100");
        let events = api.run_items(&ada.access, &run, "events").await;
        let fallback = events
            .iter()
            .find(|e| e["kind"] == "model.fallback")
            .unwrap();
        assert_eq!(
            (&fallback["data"]["from"], &fallback["data"]["to"]),
            (&json!("fake/small"), &json!("fake/large"))
        );
        let called: Vec<&Value> = events
            .iter()
            .filter(|e| e["kind"] == "model.called")
            .collect();
        assert_eq!(called.len(), 1);
        assert_eq!(
            (&called[0]["data"]["model"], &called[0]["data"]["fallback"]),
            (&json!("fake/large"), &json!(true))
        );
    }
}

#[tokio::test]
async fn a_fallback_the_policies_refuse_is_skipped_and_a_bad_request_does_not_fall_back() {
    let provider = FakeServer::answering(
        vec![openai::error(503, None), openai::error(400, None)],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    let a = agent(
        &api,
        &ada,
        &p,
        json!({"fallback_models": ["fake/forbidden", "fake/large"]}),
    )
    .await;
    api.create(
        &ada.access,
        "/api/v1/policies",
        json!({"project_id": p, "name": "Known models", "rules": {"allowed_models": ["fake/small", "fake/large"]}}),
    )
    .await;
    let wf = workflow(&api, &ada, &p, &[("ask", &a)], json!({"max_attempts": 1})).await;
    let run = api.run_to_end(&ada.access, &wf, json!({"q": "x"})).await;
    assert_eq!(run["status"], "failed");
    // small failed (503) and moved on past the refused fallback to large, whose 400 is
    // the request's own fault: no further model would do better.
    assert_eq!(models_asked(&provider), ["small", "large"]);
    let steps = api.run_items(&ada.access, &run, "steps").await;
    assert_eq!(steps[0]["error"]["kind"], "validation");
    let events = api.run_items(&ada.access, &run, "events").await;
    let skipped = events
        .iter()
        .find(|e| e["kind"] == "model.skipped")
        .unwrap();
    assert_eq!(skipped["data"]["model"], "fake/forbidden");
    assert_eq!(
        events
            .iter()
            .filter(|e| e["kind"] == "model.fallback")
            .count(),
        1
    );
    // The chain is checked when saved.
    for bad in [
        json!(["fake/small"]),
        json!(["nope"]),
        json!(["fake/a", "fake/a"]),
        json!("fake/a"),
    ] {
        let res = api
            .call(
                "POST",
                "/api/v1/agents",
                Some(&ada.access),
                Some(json!({"project_id": p, "name": "x", "model": "fake/small", "system_prompt": "s",
                    "fallback_models": bad})),
            )
            .await;
        assert_eq!(res.status, 422, "{bad}");
    }
}

// ---- Cost quotes ---------------------------------------------------------------------------

#[tokio::test]
async fn a_quote_is_the_worst_case_of_every_attempt_and_iteration_checked_by_hand() {
    let provider = FakeServer::answering(vec![openai::text("ok", 1, 1)], Duration::ZERO).await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    api.set_price(&ada.access, &p, "fake/small", "1", "2").await;
    let a = agent(
        &api,
        &ada,
        &p,
        json!({"max_tokens": 100, "max_iterations": 2}),
    )
    .await;
    let echo = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let t = tool(&api, &ada, &p, "echo", echo.url("/")).await;
    let wf = api
        .create(&ada.access, "/api/v1/workflows", json!({"project_id": p, "name": "Three", "definition": {"steps": [
            {"key": "ask", "kind": "agent", "agent_id": a, "input": "{{ input.q }}", "retry": {"max_attempts": 3}},
            {"key": "save", "kind": "tool", "tool_id": t, "input": {}, "depends_on": ["ask"]},
            {"key": "check", "kind": "approval", "input": {}, "depends_on": ["save"]}]}}))
        .await;
    let wf = wf["id"].as_str().unwrap();
    api.create(
        &ada.access,
        "/api/v1/policies",
        json!({"project_id": p, "name": "Tiny", "rules": {"budget": {"limit_usd": "0.001", "window": "month"}}}),
    )
    .await;
    let quote = |input: Value| {
        let path = format!("/api/v1/workflows/{wf}/quote");
        let token = ada.access.clone();
        let api = &api;
        async move {
            api.call("POST", &path, Some(&token), Some(json!({"input": input})))
                .await
        }
    };
    let res = quote(json!({"q": "short"})).await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let q = res.json();
    let ask = &q["steps"][0];
    let prompt = ask["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 0);
    assert_eq!(
        (&ask["iterations"], &ask["attempts"], &ask["calls"]),
        (&json!(2), &json!(3), &json!(6))
    );
    // By hand: per attempt, call 1 is `prompt` in and 100 out, call 2 is `prompt + 100` in
    // and 100 out, at 1 and 2 USD per million: 2 * prompt + 500 micro-dollars; 3 attempts.
    let micro = 3 * (2 * prompt + 500);
    let expected = format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000);
    assert_eq!(ask["worst_usd"], expected.as_str());
    assert_eq!(q["total_usd"], expected.as_str());
    assert_eq!(
        (&q["steps"][1]["worst_usd"], &q["steps"][2]["worst_usd"]),
        (&json!("0.000000"), &json!("0.000000"))
    );
    assert_eq!(q["complete"], true);
    // The budget has 0.001 left: the worst case (at least 0.0015) does not fit.
    let budget = &q["budgets"][0];
    assert_eq!(budget["name"], "Tiny");
    assert_eq!(
        (
            &budget["remaining_usd"],
            &budget["needed_usd"],
            &budget["fits"]
        ),
        (&json!("0.001000"), &json!(expected), &json!(false))
    );
    // A longer input makes a longer prompt; an unpriced fallback makes the quote incomplete.
    let longer = quote(json!({"q": "a much longer question ".repeat(20)}))
        .await
        .json();
    assert!(longer["steps"][0]["prompt_tokens"].as_u64().unwrap() > prompt);
    api.call(
        "PATCH",
        &format!("/api/v1/agents/{a}"),
        Some(&ada.access),
        Some(json!({"fallback_models": ["fake/unpriced"]})),
    )
    .await;
    let partial = quote(json!({"q": "short"})).await.json();
    assert_eq!(
        (&partial["complete"], &partial["unpriced_models"]),
        (&json!(false), &json!(["fake/unpriced"]))
    );
    // Two steps of one agent: each is quoted in full, and the total is both.
    let twice = api
        .create(&ada.access, "/api/v1/workflows", json!({"project_id": p, "name": "Twice", "definition": {"steps": [
            {"key": "first", "kind": "agent", "agent_id": a, "input": "{{ input.q }}", "retry": {"max_attempts": 3}},
            {"key": "again", "kind": "agent", "agent_id": a, "input": "{{ input.q }}", "retry": {"max_attempts": 3}, "depends_on": ["first"]}]}}))
        .await;
    let both = api
        .call(
            "POST",
            &format!("/api/v1/workflows/{}/quote", twice["id"].as_str().unwrap()),
            Some(&ada.access),
            Some(json!({"input": {"q": "short"}})),
        )
        .await
        .json();
    let micro = |usd: &Value| {
        usd.as_str()
            .unwrap()
            .replace('.', "")
            .parse::<u64>()
            .unwrap()
    };
    for step in [&both["steps"][0], &both["steps"][1]] {
        assert_eq!(step["worst_usd"], partial["steps"][0]["worst_usd"]);
        assert_eq!(step["unpriced_models"], json!(["fake/unpriced"]));
        assert_eq!(step["models"], json!(["fake/small", "fake/unpriced"]));
    }
    assert_eq!(
        micro(&both["total_usd"]),
        2 * micro(&partial["steps"][0]["worst_usd"])
    );
    assert_eq!(both["budgets"][0]["needed_usd"], both["total_usd"]);
    assert_eq!(
        (&both["complete"], &both["unpriced_models"]),
        (&json!(false), &json!(["fake/unpriced"]))
    );
    // Quoting runs nothing.
    assert!(provider.received().is_empty() && echo.received().is_empty());
    assert_eq!(api.count("runs").await, 0);
}

/// `POST /runs {max_cost_usd}`: the run's own hard budget. Each model call's worst case
/// (prompt estimate and `max_tokens` at the price) is held against what the run has left;
/// the second call here would pass it, so the step fails as a policy violation of the rule
/// `max_cost_usd` before the provider is asked, and nothing stays held. A retry keeps the
/// cap; a bad cap is a 422 that starts nothing.
#[tokio::test]
async fn a_runs_own_max_cost_refuses_the_call_that_would_pass_it() {
    let provider = FakeServer::answering(
        vec![
            openai::tool_calls(&[("c1", "city", json!({"q": "north"}))], 1000, 500),
            openai::text("never asked", 10, 5),
        ],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    let city_fake = FakeServer::start(200, json!({"city": "Oslo"}), Duration::ZERO).await;
    let city = tool(&api, &ada, &p, "city", city_fake.url("/")).await;
    // $0.02 per 1,000 prompt tokens, $0.08 per 500 completion tokens: the first call costs
    // $0.10; each call's worst case is about $0.08 (500 completion tokens at most).
    api.set_price(&ada.access, &p, "fake/small", "20", "160")
        .await;
    let a = agent(
        &api,
        &ada,
        &p,
        json!({"tool_ids": [city], "max_tokens": 500}),
    )
    .await;
    let wf = workflow(&api, &ada, &p, &[("ask", &a)], json!({"max_attempts": 1})).await;

    for bad in [json!("-1"), json!(0.1), json!("ten")] {
        let res = api
            .call(
                "POST",
                "/api/v1/runs",
                Some(&ada.access),
                Some(json!({"workflow_id": wf, "input": {"q": "x"}, "max_cost_usd": bad})),
            )
            .await;
        assert_eq!(res.status, 422, "{bad}");
        assert_eq!(res.json()["errors"][0]["field"], "max_cost_usd");
    }
    assert_eq!(api.count("runs").await, 0);

    let res = api
        .call(
            "POST",
            "/api/v1/runs",
            Some(&ada.access),
            Some(json!({"workflow_id": wf, "input": {"q": "weather up north?"}, "max_cost_usd": "0.15"})),
        )
        .await;
    assert_eq!(res.status, 201);
    assert_eq!(res.json()["max_cost_usd"], "0.150000");
    let id = res.json()["id"].as_str().unwrap().to_string();
    let run = api.finished_run(&ada.access, &id).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["cost_usd"], "0.100000");
    assert_eq!(run["reserved_usd"], "0.000000", "nothing stays held");
    assert_eq!(
        provider.received().len(),
        1,
        "the second call was never sent"
    );
    let steps = api.run_items(&ada.access, &run, "steps").await;
    assert_eq!(steps[0]["error"]["kind"], "policy-violation", "{steps:?}");
    let message = steps[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("max_cost_usd") && message.contains("0.150000"),
        "{message}"
    );

    let retried = api
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/retry"),
            Some(&ada.access),
            Some(json!({"from": "start"})),
        )
        .await;
    assert_eq!(retried.status, 201);
    assert_eq!(retried.json()["max_cost_usd"], "0.150000");
}

/// The race a run's own budget has: twenty agent steps of one run at once against a cap
/// of five calls. Each call costs exactly its worst case (1,000 completion tokens at
/// $10/M, prompts free), so the holds decide: never more than five calls are sent, the
/// run's spend is exactly what they cost and never over its cap, and nothing stays held.
#[tokio::test]
async fn twenty_steps_of_one_run_at_once_never_spend_past_its_own_budget() {
    let provider = FakeServer::answering(
        vec![openai::text("ok", 0, 1000)],
        Duration::from_millis(300),
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let (ada, p) = project(&api).await;
    api.set_price(&ada.access, &p, "fake/small", "0", "10")
        .await;
    let a = agent(&api, &ada, &p, json!({"max_tokens": 1000})).await;
    let keys: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    let steps: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), a.as_str())).collect();
    let wf = workflow(&api, &ada, &p, &steps, json!({"max_attempts": 1})).await;
    let res = api
        .call(
            "POST",
            "/api/v1/runs",
            Some(&ada.access),
            Some(json!({"workflow_id": wf, "input": {"q": "x"}, "max_cost_usd": "0.05"})),
        )
        .await;
    assert_eq!(res.status, 201);
    let id = res.json()["id"].as_str().unwrap().to_string();
    let run = api.finished_run(&ada.access, &id).await;
    // Calls in flight when the first refusal failed the run still answer, and each is
    // recorded with its hold released in one transaction: wait until nothing is held.
    let db = api.env.db().await;
    crate::common::eventually(async || {
        let held: String = db
            .query_one(
                "select reserved_usd::text from runs where run_id = $1::text::uuid",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        (held == "0.000000").then_some(())
    })
    .await;
    let row = db
        .query_one(
            "select cost_usd::text, reserved_usd::text from runs where run_id = $1::text::uuid",
            &[&id],
        )
        .await
        .unwrap();
    let (spent, held): (String, String) = (row.get(0), row.get(1));
    let calls = provider.received().len();
    // A refusal means five holds stood at that moment, each a call then sent.
    assert_eq!(calls, 5, "calls sent against a cap of five");
    assert_eq!(spent, format!("{:.6}", calls as f64 * 0.01), "{run}");
    assert_eq!(held, "0.000000");
    assert_eq!(run["status"], "failed", "{run}");
    let refused: i64 = db
        .query_one(
            "select count(*) from run_steps where run_id = $1::text::uuid
               and error->>'kind' = 'policy-violation' and error->>'message' like '%max_cost_usd%'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        refused >= 1,
        "at least one call was refused by the run's budget"
    );
}

/// Starts a run of `wf` and waits until a budget holds its step; the run and its events.
async fn held_run(api: &Api, who: &User, wf: &str) -> (String, Vec<Value>) {
    let run = api
        .start_run(&who.access, &json!(wf), json!({"q": "x"}))
        .await;
    let id = run["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/runs/{id}");
    let run = crate::common::eventually(async || {
        let run = api.call("GET", &path, Some(&who.access), None).await.json();
        (run["status"] == "waiting").then_some(run)
    })
    .await;
    (id, api.run_items(&who.access, &run, "events").await)
}

#[tokio::test]
async fn a_budget_that_waits_or_asks_holds_the_step_and_it_goes_on_where_it_stopped() {
    // Each run: a tool call whose 100,000 prompt tokens spend 0.10 USD of a 0.05 budget,
    // so the step's second call is refused; then the answer once it may go on.
    let provider = FakeServer::answering(
        vec![
            openai::tool_calls(&[("c1", "lookup", json!({"q": "a"}))], 100_000, 20),
            openai::text("done after the wait", 10, 5),
            openai::tool_calls(&[("c2", "lookup", json!({"q": "b"}))], 100_000, 20),
            openai::text("done after the ask", 10, 5),
            // (The ask that is rejected never reaches the provider: its budget is spent.)
            openai::tool_calls(&[("c4", "lookup", json!({"q": "d"}))], 100_000, 20),
            openai::text("done in the next window", 10, 5),
        ],
        Duration::ZERO,
    )
    .await;
    let api = Api::for_fakes(
        Some(&provider),
        &[("SPIN_VARIABLE_METRICS_TOKEN", "operator-token-123")],
    )
    .await;
    let lookup = FakeServer::start(200, json!({"found": true}), Duration::ZERO).await;
    let (ada, p) = project(&api).await;
    let setup = async |p: &str, on_exhausted: &str| {
        api.set_price(&ada.access, p, "fake/small", "1", "1").await;
        let policy = api
            .create(
                &ada.access,
                "/api/v1/policies",
                json!({"project_id": p, "name": "daily", "rules": {"budget":
                    {"limit_usd": "0.05", "window": "day", "on_exhausted": on_exhausted}}}),
            )
            .await;
        assert_eq!(policy["rules"]["budget"]["on_exhausted"], on_exhausted);
        let t = tool(&api, &ada, p, "lookup", lookup.url("/")).await;
        let a = agent(&api, &ada, p, json!({"tool_ids": [t]})).await;
        let wf = workflow(&api, &ada, p, &[("ask", &a)], json!({"max_attempts": 1})).await;
        (policy["id"].as_str().unwrap().to_string(), wf)
    };

    // wait: held, the run waiting, shown in events and metrics; not on by itself while the
    // window stands, on once the budget is raised, from where it stopped.
    let (policy, wf) = setup(&p, "wait").await;
    let (run, events) = held_run(&api, &ada, &wf).await;
    let held = events
        .iter()
        .find(|e| e["kind"] == "step.held")
        .expect("a step.held event");
    assert_eq!(
        (
            &held["step"],
            &held["data"]["mode"],
            &held["data"]["policy_id"]
        ),
        (&json!("ask"), &json!("wait"), &json!(policy))
    );
    assert!(held["data"]["resumes_at"].is_string() && held["data"]["estimate_usd"].is_string());
    assert!(!events.iter().any(|e| e["kind"] == "step.failed"));
    let metrics = crate::common::request(
        "GET",
        &api.app.url("/metrics"),
        &[("authorization", "Bearer operator-token-123")],
        None,
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        text.contains("sparkops_steps_held{mode=\"wait\"} 1"),
        "{text}"
    );
    api.sweep_at(0).await;
    let run_path = format!("/api/v1/runs/{run}");
    let still = api
        .call("GET", &run_path, Some(&ada.access), None)
        .await
        .json();
    assert_eq!(still["status"], "waiting");
    assert_eq!(provider.received().len(), 1);
    let res = api
        .call(
            "PATCH",
            &format!("/api/v1/policies/{policy}"),
            Some(&ada.access),
            Some(json!({"rules": {"budget": {"limit_usd": "10", "window": "day", "on_exhausted": "wait"}}})),
        )
        .await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    api.sweep_at(0).await;
    let done = api.finished_run(&ada.access, &run).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"]["ask"], "done after the wait");
    // It went on where it stopped: the tool ran once, and the call after the hold carried
    // its result; the first call was not made again.
    assert_eq!(lookup.received().len(), 1);
    let sent = provider.received();
    assert_eq!(sent.len(), 2);
    let second = body(&sent[1]);
    assert!(
        second["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["role"] == "tool" && m["tool_call_id"] == "c1"),
        "{second}"
    );
    assert_eq!(done["tokens_in"], json!(100_010));
    let events = api.run_items(&ada.access, &done, "events").await;
    let resumed = events.iter().find(|e| e["kind"] == "step.resumed").unwrap();
    assert_eq!(resumed["data"]["why"], "the budget was changed");

    // ask: only an admin decides; approved, the refused call passes the budget once.
    let p2 = api.create_project(&ada, json!({"name": "Asks"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (asking, wf) = setup(&p2, "ask").await;
    let receiver = FakeServer::start(204, json!({}), Duration::ZERO).await;
    let hook = api
        .call(
            "POST",
            "/api/v1/webhooks",
            Some(&ada.access),
            Some(json!({"project_id": p2, "url": receiver.url("/in"), "event_types": ["budget.held"]})),
        )
        .await;
    assert_eq!(hook.status, 201, "{}", String::from_utf8_lossy(&hook.body));
    let (run, events) = held_run(&api, &ada, &wf).await;
    let held = events.iter().find(|e| e["kind"] == "step.held").unwrap();
    assert_eq!(held["data"]["mode"], "ask");
    // The project's admins are told through the webhook.
    api.tick("notifier", chrono::Utc::now().timestamp()).await;
    let told = crate::common::eventually(async || {
        receiver
            .received()
            .first()
            .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap())
    })
    .await;
    assert_eq!(told["type"], "budget.held");
    assert_eq!(
        (
            &told["data"]["run_id"],
            &told["data"]["step_key"],
            &told["data"]["detail"]["mode"]
        ),
        (&json!(run), &json!("ask"), &json!("ask"))
    );
    assert_eq!(told["data"]["detail"]["policy_id"], json!(asking));
    let bea = api.register("bea").await;
    api.add_member(&ada, &p2, &bea, "member").await;
    let approve = format!("/api/v1/runs/{run}/steps/ask/approve");
    let res = api
        .call(
            "POST",
            &approve,
            Some(&bea.access),
            Some(json!({"approved": true})),
        )
        .await;
    assert_eq!(res.status, 403, "{}", String::from_utf8_lossy(&res.body));
    let res = api
        .call(
            "POST",
            &approve,
            Some(&ada.access),
            Some(json!({"approved": true, "comment": "worth it"})),
        )
        .await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let done = api.finished_run(&ada.access, &run).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"]["ask"], "done after the ask");
    let usage = api
        .call(
            "GET",
            &format!("/api/v1/policies/usage?project_id={p2}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    let item = usage["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["policy_id"] == asking.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        item["spent_usd"], "0.100035",
        "both calls are counted: {item}"
    );
    assert_eq!(item["reserved_usd"], "0.000000");

    // ask rejected: the step fails as rejected, and nothing more is asked of the provider.
    let (run, _) = held_run(&api, &ada, &wf).await;
    let before = provider.received().len();
    let res = api
        .call(
            "POST",
            &format!("/api/v1/runs/{run}/steps/ask/approve"),
            Some(&ada.access),
            Some(json!({"approved": false, "comment": "not today"})),
        )
        .await;
    assert_eq!(res.status, 200);
    let done = api.finished_run(&ada.access, &run).await;
    assert_eq!(done["status"], "failed");
    let step = &api.run_items(&ada.access, &done, "steps").await[0];
    assert_eq!(step["error"]["kind"], "rejected", "{step}");
    assert!(
        step["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not today")
    );
    assert_eq!(provider.received().len(), before);

    // wait, and the window turns: the sweeper's clock moves past the window's end, and the
    // new window has no spend (its row is what a new day starts without).
    let p3 = api.create_project(&ada, json!({"name": "Days"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (daily, wf) = setup(&p3, "wait").await;
    let (run, events) = held_run(&api, &ada, &wf).await;
    let held = events.iter().find(|e| e["kind"] == "step.held").unwrap();
    let resumes_at =
        chrono::DateTime::parse_from_rfc3339(held["data"]["resumes_at"].as_str().unwrap())
            .unwrap()
            .timestamp();
    api.tick("sweeper", resumes_at - 1).await;
    let still = api
        .call(
            "GET",
            &format!("/api/v1/runs/{run}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(still["status"], "waiting", "not before the window ends");
    let db = api.env.db().await;
    db.execute(
        "delete from budget_usage where policy_id = $1",
        &[&uuid::Uuid::parse_str(&daily).unwrap()],
    )
    .await
    .unwrap();
    api.tick("sweeper", resumes_at).await;
    let done = api.finished_run(&ada.access, &run).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"]["ask"], "done in the next window");
    let events = api.run_items(&ada.access, &done, "events").await;
    let resumed = events.iter().find(|e| e["kind"] == "step.resumed").unwrap();
    assert_eq!(resumed["data"]["why"], "the budget's window turned");
}
