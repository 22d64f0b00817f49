//! The resource APIs end to end: agents, tools, workflows, policies, schedules, model prices
//! and project secrets, through the real components and a real Postgres.

use crate::common::{Api, User, column};
use serde_json::{Value, json};

/// A project owned by a new user, with the owner.
async fn project(api: &Api) -> (User, String) {
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Agents"})).await;
    (ada, p["id"].as_str().unwrap().to_string())
}

fn weather_tool(p: &str) -> Value {
    json!({
        "project_id": p,
        "name": "get_weather",
        "description": "Current weather for a city",
        "input_schema": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}},
        "http": {"method": "GET", "url": "https://api.weather.example/v1/now", "headers": {"Authorization": "{{ secret.WEATHER_KEY }}"}}
    })
}

fn fields(res: &crate::common::Reply) -> Vec<String> {
    assert_eq!(res.status, 422, "{}", String::from_utf8_lossy(&res.body));
    let body = res.json();
    assert_eq!(body["type"], "https://sparkops.dev/problems/validation");
    body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e["field"].as_str().unwrap(),
                e["message"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn an_agent_is_created_read_patched_with_if_match_and_soft_deleted() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let tool = api
        .create(&ada.access, "/api/v1/tools", weather_tool(&p))
        .await;
    let agent = api
        .create(
            &ada.access,
            "/api/v1/agents",
            json!({
                "project_id": p, "name": "Forecaster", "description": "says the weather",
                "model": "openai/gpt-4o-mini", "system_prompt": "Be brief.", "temperature": 0.2,
                "tool_ids": [tool["id"]], "metadata": {"team": "ops"}
            }),
        )
        .await;
    let id = agent["id"].as_str().unwrap();
    assert_eq!(
        (
            &agent["version"],
            &agent["max_iterations"],
            &agent["max_tokens"],
            &agent["temperature"]
        ),
        (&json!(1), &json!(10), &json!(1024), &json!(0.2))
    );
    assert_eq!(agent["tool_ids"], json!([tool["id"]]));
    let path = format!("/api/v1/agents/{id}");
    assert_eq!(
        api.call("GET", &path, Some(&ada.access), None).await.json(),
        agent
    );

    // A merge patch: `null` clears, other fields keep their values.
    let patch = json!({"description": null, "max_iterations": 3});
    let stale = api
        .call_with(
            "PATCH",
            &path,
            &ada.access,
            &[("if-match", "\"7\"")],
            Some(patch.clone()),
        )
        .await;
    assert_eq!(stale.status, 412);
    // If-Match compares strongly (RFC 9110 13.1.1): a weak tag of the current version does
    // not match; a malformed one is a 422.
    for (tag, status) in [("W/\"1\"", 412), ("1", 422)] {
        let res = api
            .call_with(
                "PATCH",
                &path,
                &ada.access,
                &[("if-match", tag)],
                Some(patch.clone()),
            )
            .await;
        assert_eq!(res.status, status, "{tag}");
    }
    let res = api
        .call_with(
            "PATCH",
            &path,
            &ada.access,
            &[("if-match", "W/\"1\", \"1\"")],
            Some(patch),
        )
        .await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let updated = res.json();
    assert_eq!(res.header("etag"), Some("\"2\""));
    assert_eq!(
        (
            &updated["version"],
            &updated["description"],
            &updated["max_iterations"],
            &updated["model"]
        ),
        (
            &json!(2),
            &Value::Null,
            &json!(3),
            &json!("openai/gpt-4o-mini")
        )
    );
    // The same stale version again is refused: nothing moved.
    let again = api
        .call_with(
            "PATCH",
            &path,
            &ada.access,
            &[("if-match", "\"1\"")],
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(again.status, 412);

    // A tool an agent offers cannot be deleted from under it.
    let tool_path = format!("/api/v1/tools/{}", tool["id"].as_str().unwrap());
    let busy = api
        .call("DELETE", &tool_path, Some(&ada.access), None)
        .await;
    assert_eq!(busy.status, 409, "{}", String::from_utf8_lossy(&busy.body));

    assert_eq!(
        api.status("DELETE", &path, Some(&ada.access), None).await,
        204
    );
    assert_eq!(api.status("GET", &path, Some(&ada.access), None).await, 404);
    assert_eq!(
        api.status("DELETE", &tool_path, Some(&ada.access), None)
            .await,
        204
    );
    // Soft: the rows stay for the runs that refer to them.
    assert_eq!(api.count("agents where deleted_at is not null").await, 1);
}

#[tokio::test]
async fn bad_agents_are_422_with_every_field_and_nothing_is_written() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let (bob, other) = project(&api).await;
    let foreign = api
        .create(&bob.access, "/api/v1/tools", weather_tool(&other))
        .await;
    let res = api
        .call(
            "POST",
            "/api/v1/agents",
            Some(&ada.access),
            Some(json!({
                "project_id": p, "name": "", "model": "gpt-4o", "system_prompt": "x",
                "temperature": 3, "max_iterations": 51, "tool_ids": [foreign["id"], "nope"],
                "response_format": {"type": "nonsense"}, "colour": "blue"
            })),
        )
        .await;
    let got = fields(&res);
    for want in [
        "name: must not be empty",
        "model: must be provider/model, e.g. openai/gpt-4o-mini",
        "temperature: must be a number from 0 to 2",
        "tool_ids[1]: must be an id",
        "tool_ids[0]: is not a tool of this project",
        "max_iterations: must be an integer from 1 to 50",
        "colour: unknown field",
    ] {
        assert!(got.iter().any(|g| g == want), "missing {want:?} in {got:?}");
    }
    assert!(
        got.iter()
            .any(|g| g.starts_with("response_format: is not a valid JSON Schema")),
        "{got:?}"
    );
    assert_eq!(api.count("agents").await, 0);
    // Updates take the same checks and change nothing when they fail.
    let agent = api
        .create(
            &ada.access,
            "/api/v1/agents",
            json!({"project_id": p, "name": "A", "model": "openai/gpt-4o", "system_prompt": "x"}),
        )
        .await;
    let path = format!("/api/v1/agents/{}", agent["id"].as_str().unwrap());
    let bad = api
        .call(
            "PATCH",
            &path,
            Some(&ada.access),
            Some(json!({"model": "bad", "project_id": other})),
        )
        .await;
    assert_eq!(fields(&bad), ["project_id: cannot be changed"]);
    let bad = api
        .call(
            "PATCH",
            &path,
            Some(&ada.access),
            Some(json!({"model": "bad"})),
        )
        .await;
    assert_eq!(
        fields(&bad),
        ["model: must be provider/model, e.g. openai/gpt-4o-mini"]
    );
    assert_eq!(
        api.call("GET", &path, Some(&ada.access), None).await.json(),
        agent
    );
}

#[tokio::test]
async fn tool_urls_headers_and_schemas_are_checked() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let tool = api
        .create(&ada.access, "/api/v1/tools", weather_tool(&p))
        .await;
    // The secret reference is stored and answered as written, never resolved.
    assert_eq!(
        tool["http"]["headers"],
        json!({"Authorization": "{{ secret.WEATHER_KEY }}"})
    );
    assert_eq!(tool["http"]["timeout_ms"], 30000);
    let cases = [
        (
            json!({"url": "http://127.0.0.1:8080/x"}),
            "http.url: points at an internal address (127.0.0.1); only public hosts may be called",
        ),
        (
            json!({"url": "https://2130706433/x"}),
            "http.url: points at an internal address (127.0.0.1); only public hosts may be called",
        ),
        (
            json!({"url": "https://[::ffff:10.0.0.1]/"}),
            "http.url: points at an internal address ([::ffff:a00:1]); only public hosts may be called",
        ),
        (
            json!({"url": "https://169.254.169.254/latest/meta-data"}),
            "http.url: points at an internal address (169.254.169.254); only public hosts may be called",
        ),
        (
            json!({"url": "http://api.weather.example/"}),
            "http.url: must use https",
        ),
        (
            json!({"url": "ftp://api.weather.example/"}),
            "http.url: must use http or https",
        ),
        (
            json!({"url": "https://u:p@api.weather.example/"}),
            "http.url: must not carry a user name or password",
        ),
        (
            json!({"url": "https://api.weather.example/", "headers": {"Authorization": "Bearer sk-live"}}),
            "http.headers.Authorization: carries a credential: store it as a project secret and write {{ secret.NAME }}",
        ),
        (
            json!({"url": "https://api.weather.example/", "timeout_ms": 50}),
            "http.timeout_ms: must be an integer from 100 to 300000",
        ),
        (
            json!({"url": "https://api.weather.example/", "method": "TRACE"}),
            "http.method: must be one of GET, POST, PUT, PATCH, DELETE",
        ),
    ];
    for (http, want) in cases {
        let mut body = weather_tool(&p);
        body["name"] = json!("other");
        body["http"] = http;
        let res = api
            .call("POST", "/api/v1/tools", Some(&ada.access), Some(body))
            .await;
        assert_eq!(fields(&res), [want]);
    }
    let mut body = weather_tool(&p);
    body["name"] = json!("Bad-Name");
    body["input_schema"] = json!({"type": "string"});
    let res = api
        .call("POST", "/api/v1/tools", Some(&ada.access), Some(body))
        .await;
    assert_eq!(
        fields(&res),
        [
            "name: must match ^[a-z][a-z0-9_]{0,63}$",
            "input_schema: must describe an object (\"type\": \"object\")"
        ]
    );
    // A name is unique among a project's live tools.
    let dup = api
        .call(
            "POST",
            "/api/v1/tools",
            Some(&ada.access),
            Some(weather_tool(&p)),
        )
        .await;
    assert_eq!(dup.status, 409);
    assert_eq!(api.count("tools").await, 1);
}

#[tokio::test]
async fn internal_tool_urls_are_allowed_only_by_configuration() {
    let api = Api::start_with(&[
        ("SPIN_VARIABLE_TOOLS_ALLOW_HTTP", "true"),
        ("SPIN_VARIABLE_TOOLS_ALLOW_PRIVATE_HOSTS", "true"),
    ])
    .await;
    let (ada, p) = project(&api).await;
    let mut body = weather_tool(&p);
    body["http"]["url"] = json!("http://127.0.0.1:9/hook");
    let tool = api.create(&ada.access, "/api/v1/tools", body).await;
    assert_eq!(tool["http"]["url"], "http://127.0.0.1:9/hook");
}

#[tokio::test]
async fn testing_a_tool_makes_the_real_call_with_its_secret_and_checks() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake =
        crate::common::FakeServer::start(200, json!({"temp_c": 4.5}), std::time::Duration::ZERO)
            .await;
    let mut body = weather_tool(&p);
    body["http"] = json!({"method": "POST", "url": fake.url("/weather?units=metric"),
        "headers": {"Authorization": "{{ secret.WEATHER_KEY }}", "X-Team": "ops"}});
    body["output_schema"] = json!({"type": "object", "required": ["temp_c"], "properties": {"temp_c": {"type": "number"}}});
    let tool = api.create(&ada.access, "/api/v1/tools", body).await;
    let test = format!("/api/v1/tools/{}/test", tool["id"].as_str().unwrap());

    // The secret is not set yet: refused before any call.
    let res = api
        .call(
            "POST",
            &test,
            Some(&ada.access),
            Some(json!({"input": {"city": "Oslo"}})),
        )
        .await;
    assert_eq!(
        fields(&res),
        [
            "http.headers.Authorization: names the secret WEATHER_KEY, which this project does not have"
        ]
    );
    let res = api
        .call(
            "POST",
            &test,
            Some(&ada.access),
            Some(json!({"input": {"city": 7}})),
        )
        .await;
    assert!(fields(&res).iter().any(|f| f.starts_with("input/city:")));
    assert!(fake.received().is_empty());

    let value = "Bearer wx-SECRET-42";
    let put = api
        .call(
            "PUT",
            &format!("/api/v1/projects/{p}/secrets/WEATHER_KEY"),
            Some(&ada.access),
            Some(json!({"value": value})),
        )
        .await;
    assert_eq!(put.status, 204);
    let res = api
        .call(
            "POST",
            &test,
            Some(&ada.access),
            Some(json!({"input": {"city": "Oslo"}})),
        )
        .await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let out = res.json();
    assert_eq!(
        (&out["ok"], &out["status"], &out["output"]),
        (&json!(true), &json!(200), &json!({"temp_c": 4.5}))
    );
    assert!(!String::from_utf8_lossy(&res.body).contains("SECRET"));
    assert!(!api.guest_logs().contains("SECRET"));
    let got = fake.received();
    assert_eq!(got.len(), 1);
    let call = &got[0];
    assert_eq!(
        (call.method.as_str(), call.uri.as_str()),
        ("POST", "/weather?units=metric")
    );
    assert_eq!(call.headers["authorization"], value);
    assert_eq!(call.headers["x-team"], "ops");
    assert!(
        call.headers["idempotency-key"]
            .to_str()
            .unwrap()
            .starts_with("tool-test-")
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&call.body).unwrap(),
        json!({"city": "Oslo"})
    );
}

#[tokio::test]
async fn a_tool_test_reports_bad_statuses_bad_outputs_and_timeouts() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let failing =
        crate::common::FakeServer::start(503, json!({"error": "down"}), std::time::Duration::ZERO)
            .await;
    let wrong =
        crate::common::FakeServer::start(200, json!({"temp": "warm"}), std::time::Duration::ZERO)
            .await;
    let slow =
        crate::common::FakeServer::start(200, json!({}), std::time::Duration::from_secs(3)).await;
    let cases = [
        ("failing", failing.url("/"), 30_000, "http-status"),
        ("wrong", wrong.url("/"), 30_000, "validation"),
        ("slow", slow.url("/"), 200, "timeout"),
    ];
    for (name, url, timeout_ms, kind) in cases {
        let mut body = weather_tool(&p);
        body["name"] = json!(name);
        body["http"] = json!({"method": "GET", "url": url, "timeout_ms": timeout_ms});
        body["output_schema"] = json!({"type": "object", "required": ["temp_c"]});
        let tool = api.create(&ada.access, "/api/v1/tools", body).await;
        let res = api
            .call(
                "POST",
                &format!("/api/v1/tools/{}/test", tool["id"].as_str().unwrap()),
                Some(&ada.access),
                Some(json!({"input": {"city": "Oslo"}})),
            )
            .await;
        assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
        let out = res.json();
        assert_eq!(
            (&out["ok"], &out["error"]["kind"]),
            (&json!(false), &json!(kind)),
            "{name}: {out}"
        );
    }
    // GET sends the input as the query.
    assert_eq!(failing.received()[0].uri, "/?city=Oslo");
}

async fn agent_and_tool(api: &Api, who: &User, p: &str) -> (String, String) {
    let tool = api
        .create(&who.access, "/api/v1/tools", weather_tool(p))
        .await;
    let agent = api
        .create(
            &who.access,
            "/api/v1/agents",
            json!({"project_id": p, "name": "A", "model": "openai/gpt-4o", "system_prompt": "x"}),
        )
        .await;
    (
        agent["id"].as_str().unwrap().into(),
        tool["id"].as_str().unwrap().into(),
    )
}

#[tokio::test]
async fn workflow_definitions_are_validated_with_the_path_of_each_error() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let (agent, tool) = agent_and_tool(&api, &ada, &p).await;
    let (bob, other) = project(&api).await;
    let (foreign_agent, _) = agent_and_tool(&api, &bob, &other).await;
    let step = |key: &str, deps: Value, input: Value| json!({"key": key, "kind": "tool", "tool_id": tool, "input": input, "depends_on": deps});
    let foreign_message = format!("steps[0].agent_id: no agent {foreign_agent} in this project");
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"steps": []}),
            "steps: must be a list of 1 to 200 steps",
        ),
        (
            json!({"steps": [step("a", json!(["zzz"]), json!({}))]}),
            "steps[0].depends_on[0]: unknown step 'zzz'",
        ),
        (
            json!({"steps": [step("a", json!(["b"]), json!({})), step("b", json!(["a"]), json!({}))]}),
            "steps[0].depends_on: cycle: a -> b -> a",
        ),
        (
            json!({"steps": [step("a", json!([]), json!({})), step("a", json!([]), json!({}))]}),
            "steps[1].key: 'a' is also the key of steps[0]",
        ),
        (
            json!({"steps": [step("a", json!([]), json!({})), step("b", json!([]), json!({"q": "{{ steps.a.output.x }}"}))]}),
            "steps[1].input.q: reads step 'a', which is not an ancestor of this step",
        ),
        (
            json!({"steps": [{"key": "a", "kind": "agent", "agent_id": foreign_agent, "input": {}, "depends_on": []}]}),
            &foreign_message,
        ),
    ];
    for (definition, want) in cases {
        let res = api
            .call(
                "POST",
                "/api/v1/workflows",
                Some(&ada.access),
                Some(json!({"project_id": p, "name": "W", "definition": definition})),
            )
            .await;
        let got = fields(&res);
        let saved_want = format!("definition.{want}");
        assert!(
            got.contains(&saved_want),
            "{definition}: want {saved_want:?}, got {got:?}"
        );
        // validate answers the same, relative to the definition, without saving.
        let v = api
            .call(
                "POST",
                "/api/v1/workflows/validate",
                Some(&ada.access),
                Some(json!({"project_id": p, "definition": definition})),
            )
            .await;
        assert_eq!(v.status, 200);
        let v = v.json();
        assert_eq!(v["valid"], false);
        assert!(v["errors"].as_array().unwrap().iter().any(|e| format!(
            "{}: {}",
            e["field"].as_str().unwrap(),
            e["message"].as_str().unwrap()
        ) == want));
    }
    assert_eq!(api.count("workflows").await, 0);
    assert_eq!(api.count("workflow_versions").await, 0);
    let good = json!({"steps": [
        {"key": "think", "kind": "agent", "agent_id": agent, "input": {"q": "{{ input.question }}"}, "depends_on": []},
        step("fetch", json!(["think"]), json!({"city": "{{ steps.think.output.city }}"}))
    ]});
    let v = api
        .call(
            "POST",
            "/api/v1/workflows/validate",
            Some(&ada.access),
            Some(json!({"project_id": p, "definition": good})),
        )
        .await
        .json();
    assert_eq!(v, json!({"valid": true, "errors": []}));
    assert_eq!(api.count("workflows").await, 0);
}

#[tokio::test]
async fn every_workflow_update_keeps_the_old_definition_as_a_version() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let (agent, tool) = agent_and_tool(&api, &ada, &p).await;
    let def = |n: u64| json!({"steps": [{"key": "a", "kind": "agent", "agent_id": agent, "input": {"n": n}, "depends_on": []}]});
    let wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "W", "definition": def(1),
            "input_schema": {"type": "object", "properties": {"question": {"type": "string"}}}}),
        )
        .await;
    let path = format!("/api/v1/workflows/{}", wf["id"].as_str().unwrap());
    for n in 2..=4 {
        let res = api
            .call(
                "PATCH",
                &path,
                Some(&ada.access),
                Some(json!({"definition": def(n)})),
            )
            .await;
        assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
        assert_eq!(res.json()["version"], n);
    }
    let current = api.call("GET", &path, Some(&ada.access), None).await.json();
    assert_eq!(
        (&current["version"], &current["definition"]),
        (&json!(4), &def(4))
    );
    assert_eq!(
        current["input_schema"]["properties"]["question"]["type"],
        "string"
    );
    // Newest first, in pages.
    let page1 = api
        .call(
            "GET",
            &format!("{path}/versions?limit=3"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    let versions: Vec<i64> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [4, 3, 2]);
    assert_eq!(page1["items"][2]["definition"], def(2));
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2 = api
        .call(
            "GET",
            &format!("{path}/versions?limit=3&cursor={cursor}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(page2["items"][0]["version"], 1);
    assert_eq!(page2["items"][0]["definition"], def(1));
    assert_eq!(page2["next_cursor"], Value::Null);
    // The agent and tool a live workflow uses cannot be deleted.
    let agent_del = api
        .call(
            "DELETE",
            &format!("/api/v1/agents/{agent}"),
            Some(&ada.access),
            None,
        )
        .await;
    assert_eq!(
        agent_del.status,
        409,
        "{}",
        String::from_utf8_lossy(&agent_del.body)
    );
    assert_eq!(
        api.status(
            "DELETE",
            &format!("/api/v1/tools/{tool}"),
            Some(&ada.access),
            None
        )
        .await,
        204
    );
}

#[tokio::test]
async fn policies_are_for_admins_and_their_rules_are_checked() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let mia = api.register("mia").await;
    api.add_member(&ada, &p, &mia, "member").await;
    let (_, tool) = agent_and_tool(&api, &ada, &p).await;
    let body = json!({"project_id": p, "name": "Spend", "rules": {
        "budget": {"limit_usd": "25.5", "window": "month"}, "allowed_models": ["openai/*"], "allowed_tools": [tool]
    }});
    let res = api
        .call(
            "POST",
            "/api/v1/policies",
            Some(&mia.access),
            Some(body.clone()),
        )
        .await;
    assert_eq!(res.status, 403);
    let policy = api.create(&ada.access, "/api/v1/policies", body).await;
    assert_eq!(
        (
            &policy["enabled"],
            &policy["scope"],
            &policy["rules"]["budget"]
        ),
        (
            &json!(true),
            &json!({}),
            &json!({"limit_usd": "25.500000", "window": "month", "action": "block", "on_exhausted": "fail"})
        )
    );
    // Members read policies.
    let list = api
        .call(
            "GET",
            &format!("/api/v1/policies?project_id={p}"),
            Some(&mia.access),
            None,
        )
        .await;
    assert_eq!(list.json()["items"][0]["id"], policy["id"]);
    let res = api
        .call(
            "POST",
            "/api/v1/policies",
            Some(&ada.access),
            Some(json!({"project_id": p, "name": "Bad",
            "scope": {"agent_id": tool, "workflow_id": tool},
            "rules": {"budget": {"limit_usd": 0.5, "window": "week"}, "max_steps_per_run": -1}})),
        )
        .await;
    assert_eq!(
        fields(&res),
        [
            "scope: names an agent or a workflow, not both",
            "scope.agent_id: is not of this project",
            "scope.workflow_id: is not of this project",
            "rules.budget.limit_usd: must be a decimal string, e.g. \"12.50\" (floats are not exact)",
            "rules.budget.window: must be one of day, month, total",
            "rules.max_steps_per_run: must be a positive integer",
        ]
    );
    assert_eq!(api.count("policies").await, 1);
}

#[tokio::test]
async fn schedules_validate_cron_zone_and_input_and_show_next_fire_times() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let (agent, _) = agent_and_tool(&api, &ada, &p).await;
    let wf = api
        .create(&ada.access, "/api/v1/workflows", json!({"project_id": p, "name": "W",
            "input_schema": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}},
            "definition": {"steps": [{"key": "a", "kind": "agent", "agent_id": agent, "input": {}, "depends_on": []}]}}))
        .await;
    let bad = api
        .call("POST", "/api/v1/schedules", Some(&ada.access), Some(json!({"project_id": p, "workflow_id": wf["id"],
            "cron": "0 9 * * * * *", "timezone": "Mars/Olympus", "input": {"city": 3}, "overlap": "queue"})))
        .await;
    let got = fields(&bad);
    for want in [
        "timezone: `Mars/Olympus` is not an IANA time zone, e.g. Europe/Berlin",
        "overlap: must be one of skip, allow, cancel_previous",
        "input/city: 3 is not of type \"string\"",
    ] {
        assert!(got.iter().any(|g| g == want), "missing {want:?} in {got:?}");
    }
    let bad = api
        .call(
            "POST",
            "/api/v1/schedules",
            Some(&ada.access),
            Some(json!({"project_id": p, "workflow_id": wf["id"],
            "cron": "0 9 * *", "input": {"city": "Oslo"}})),
        )
        .await;
    assert_eq!(
        fields(&bad),
        ["cron: a cron expression has 5 or 6 fields, not 4"]
    );
    let s = api
        .create(
            &ada.access,
            "/api/v1/schedules",
            json!({"project_id": p, "workflow_id": wf["id"],
            "cron": "30 9 * * *", "timezone": "Europe/Berlin", "input": {"city": "Oslo"}}),
        )
        .await;
    assert_eq!(
        (&s["overlap"], &s["catchup_window_s"], &s["enabled"]),
        (&json!("skip"), &json!(0), &json!(true))
    );
    assert!(s["next_fire_at"].is_string());
    let next = api
        .call(
            "GET",
            &format!(
                "/api/v1/schedules/{}/next?count=3",
                s["id"].as_str().unwrap()
            ),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    let items = next["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["at"], s["next_fire_at"]);
    for item in items {
        let local = item["local"].as_str().unwrap();
        assert!(
            local.contains("T09:30:00+01:00") || local.contains("T09:30:00+02:00"),
            "{local}"
        );
    }
    // Pausing clears the next fire time; a workflow with schedules cannot be deleted.
    let path = format!("/api/v1/schedules/{}", s["id"].as_str().unwrap());
    let paused = api
        .call(
            "PATCH",
            &path,
            Some(&ada.access),
            Some(json!({"enabled": false})),
        )
        .await
        .json();
    assert_eq!(
        (&paused["enabled"], &paused["next_fire_at"]),
        (&json!(false), &Value::Null)
    );
    let wf_path = format!("/api/v1/workflows/{}", wf["id"].as_str().unwrap());
    assert_eq!(
        api.status("DELETE", &wf_path, Some(&ada.access), None)
            .await,
        409
    );
    let list = api
        .call(
            "GET",
            &format!("/api/v1/schedules?project_id={p}&enabled=false"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn model_prices_have_defaults_and_per_project_overrides() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let mia = api.register("mia").await;
    api.add_member(&ada, &p, &mia, "member").await;
    let price = |table: &Value, model: &str| {
        table["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["model"] == model)
            .cloned()
            .unwrap()
    };
    let defaults = api
        .call("GET", "/api/v1/models/prices", Some(&ada.access), None)
        .await
        .json();
    assert_eq!(
        price(&defaults, "openai/gpt-4o-mini"),
        json!({"model": "openai/gpt-4o-mini", "input_per_mtok_usd": "0.150000", "output_per_mtok_usd": "0.600000", "source": "default"})
    );
    let path = format!("/api/v1/models/prices/openai/gpt-4o-mini?project_id={p}");
    let body = json!({"input_per_mtok_usd": "0.1", "output_per_mtok_usd": "0.4"});
    assert_eq!(
        api.status("PUT", &path, Some(&mia.access), Some(body.clone()))
            .await,
        403
    );
    let set = api.call("PUT", &path, Some(&ada.access), Some(body)).await;
    assert_eq!(set.status, 200, "{}", String::from_utf8_lossy(&set.body));
    let mine = api
        .call(
            "GET",
            &format!("/api/v1/models/prices?project_id={p}"),
            Some(&mia.access),
            None,
        )
        .await
        .json();
    assert_eq!(
        price(&mine, "openai/gpt-4o-mini"),
        json!({"model": "openai/gpt-4o-mini", "input_per_mtok_usd": "0.100000", "output_per_mtok_usd": "0.400000", "source": "project"})
    );
    // The name may also come percent-encoded as one segment, as clients encode path values.
    let encoded = format!("/api/v1/models/prices/openai%2Fgpt-4o-mini?project_id={p}");
    let body = json!({"input_per_mtok_usd": "0.2", "output_per_mtok_usd": "0.8"});
    let set = api
        .call("PUT", &encoded, Some(&ada.access), Some(body))
        .await;
    assert_eq!(set.status, 200, "{}", String::from_utf8_lossy(&set.body));
    let mine = api
        .call(
            "GET",
            &format!("/api/v1/models/prices?project_id={p}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(
        price(&mine, "openai/gpt-4o-mini")["input_per_mtok_usd"],
        "0.200000"
    );
    // Other projects still see the default.
    let defaults_again = api
        .call("GET", "/api/v1/models/prices", Some(&ada.access), None)
        .await
        .json();
    assert_eq!(
        price(&defaults_again, "openai/gpt-4o-mini")["source"],
        "default"
    );
    let bad = api
        .call(
            "PUT",
            &path,
            Some(&ada.access),
            Some(json!({"input_per_mtok_usd": 0.1, "output_per_mtok_usd": "-1"})),
        )
        .await;
    assert_eq!(
        fields(&bad),
        [
            "input_per_mtok_usd: must be a decimal string, e.g. \"12.50\" (floats are not exact)",
            "output_per_mtok_usd: must not be negative"
        ]
    );
    assert_eq!(
        api.status("DELETE", &path, Some(&ada.access), None).await,
        204
    );
    assert_eq!(
        api.status("DELETE", &path, Some(&ada.access), None).await,
        404
    );
}

#[tokio::test]
async fn secrets_are_write_only_and_sealed_at_rest() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let mia = api.register("mia").await;
    api.add_member(&ada, &p, &mia, "member").await;
    let value = "sk-live-VERY-SECRET-0123456789";
    let path = format!("/api/v1/projects/{p}/secrets/WEATHER_KEY");
    assert_eq!(
        api.status(
            "PUT",
            &path,
            Some(&mia.access),
            Some(json!({"value": value}))
        )
        .await,
        403
    );
    let put = api
        .call(
            "PUT",
            &path,
            Some(&ada.access),
            Some(json!({"value": value})),
        )
        .await;
    assert_eq!(put.status, 204, "{}", String::from_utf8_lossy(&put.body));
    assert_eq!(
        api.status(
            "PUT",
            &path,
            Some(&ada.access),
            Some(json!({"value": value}))
        )
        .await,
        204
    );
    let list = api
        .call(
            "GET",
            &format!("/api/v1/projects/{p}/secrets"),
            Some(&mia.access),
            None,
        )
        .await;
    let items = list.json()["items"].clone();
    assert_eq!(
        (items[0]["name"].as_str(), items[0]["version"].as_i64()),
        (Some("WEATHER_KEY"), Some(2))
    );
    assert!(!String::from_utf8_lossy(&list.body).contains(value));
    // At rest: a ciphertext under the current key, never the value.
    let row = api
        .env
        .db()
        .await
        .query_one("select ciphertext, key_id from project_secrets", &[])
        .await
        .unwrap();
    let (ciphertext, key_id): (Vec<u8>, String) = (row.get(0), row.get(1));
    assert_eq!(key_id, "test1");
    assert!(
        !ciphertext
            .windows(value.len())
            .any(|w| w == value.as_bytes())
    );
    // Bad names and values are refused without echoing the value.
    let bad = api
        .call(
            "PUT",
            &format!("/api/v1/projects/{p}/secrets/1bad"),
            Some(&ada.access),
            Some(json!({"value": value})),
        )
        .await;
    assert!(!String::from_utf8_lossy(&bad.body).contains(value));
    assert_eq!(bad.status, 422);
    assert_eq!(
        api.status("DELETE", &path, Some(&ada.access), None).await,
        204
    );
    assert_eq!(
        api.status("DELETE", &path, Some(&ada.access), None).await,
        404
    );
    // Nor is it ever logged: the components' logs hold these requests, and no value.
    let logs = api.guest_logs();
    assert!(
        logs.contains("/secrets/WEATHER_KEY"),
        "the requests were not logged: {logs}"
    );
    assert!(!logs.contains(value));
}

#[tokio::test]
async fn creates_are_idempotent_and_pages_hold_under_concurrent_inserts() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let body =
        json!({"project_id": p, "name": "A", "model": "openai/gpt-4o", "system_prompt": "x"});
    let first = api
        .call_with(
            "POST",
            "/api/v1/agents",
            &ada.access,
            &[("idempotency-key", "k1")],
            Some(body.clone()),
        )
        .await;
    let second = api
        .call_with(
            "POST",
            "/api/v1/agents",
            &ada.access,
            &[("idempotency-key", "k1")],
            Some(body.clone()),
        )
        .await;
    assert_eq!((first.status, second.status), (201, 201));
    assert_eq!(first.json(), second.json());
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    let mut other = body.clone();
    other["name"] = json!("B");
    let clash = api
        .call_with(
            "POST",
            "/api/v1/agents",
            &ada.access,
            &[("idempotency-key", "k1")],
            Some(other),
        )
        .await;
    assert_eq!(clash.status, 422);
    assert_eq!(api.count("agents").await, 1);

    // Page through while others insert: every item present at the start is seen once.
    for i in 0..9 {
        let mut b = body.clone();
        b["name"] = json!(format!("seed{i}"));
        api.create(&ada.access, "/api/v1/agents", b).await;
    }
    let at_start: Vec<String> = column(
        &api.env.db().await,
        "select agent_id::text from agents",
        &[],
    )
    .await;
    assert_eq!(at_start.len(), 10);
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut inserted = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("/api/v1/agents?project_id={p}&limit=3&cursor={c}"),
            None => format!("/api/v1/agents?project_id={p}&limit=3"),
        };
        let (page, _) = tokio::join!(api.call("GET", &url, Some(&ada.access), None), async {
            let mut b = body.clone();
            b["name"] = json!(format!("late{inserted}"));
            api.call("POST", "/api/v1/agents", Some(&ada.access), Some(b))
                .await
        });
        inserted += 1;
        let page = page.json();
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "an item was repeated");
    for id in &at_start {
        assert!(
            seen.contains(id),
            "{id} was present at the start and skipped"
        );
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(sorted, seen, "newest first");
}

/// Every route of this suite's areas, as (method, path, body) for a caller.
fn resource_routes(p: &str, ids: &Ids) -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", format!("/api/v1/agents?project_id={p}"), None),
        ("GET", format!("/api/v1/agents/{}", ids.agent), None),
        (
            "PATCH",
            format!("/api/v1/agents/{}", ids.agent),
            Some(json!({"name": "x"})),
        ),
        ("DELETE", format!("/api/v1/agents/{}", ids.agent), None),
        ("GET", format!("/api/v1/tools/{}", ids.tool), None),
        (
            "PATCH",
            format!("/api/v1/tools/{}", ids.tool),
            Some(json!({"description": "x"})),
        ),
        ("GET", format!("/api/v1/workflows/{}", ids.workflow), None),
        (
            "GET",
            format!("/api/v1/workflows/{}/versions", ids.workflow),
            None,
        ),
        (
            "POST",
            "/api/v1/workflows/validate".to_string(),
            Some(json!({"project_id": p, "definition": {"steps": []}})),
        ),
        ("GET", format!("/api/v1/policies/{}", ids.policy), None),
        (
            "PATCH",
            format!("/api/v1/policies/{}", ids.policy),
            Some(json!({"enabled": false})),
        ),
        ("GET", format!("/api/v1/schedules/{}", ids.schedule), None),
        (
            "GET",
            format!("/api/v1/schedules/{}/next", ids.schedule),
            None,
        ),
        (
            "DELETE",
            format!("/api/v1/schedules/{}", ids.schedule),
            None,
        ),
        ("GET", format!("/api/v1/models/prices?project_id={p}"), None),
        (
            "PUT",
            format!("/api/v1/models/prices/openai/gpt-4o?project_id={p}"),
            Some(json!({"input_per_mtok_usd": "1", "output_per_mtok_usd": "2"})),
        ),
        ("GET", format!("/api/v1/projects/{p}/secrets"), None),
        (
            "PUT",
            format!("/api/v1/projects/{p}/secrets/K"),
            Some(json!({"value": "v"})),
        ),
        (
            "POST",
            "/api/v1/agents".to_string(),
            Some(
                json!({"project_id": p, "name": "Z", "model": "openai/gpt-4o", "system_prompt": "x"}),
            ),
        ),
    ]
}

struct Ids {
    agent: String,
    tool: String,
    workflow: String,
    policy: String,
    schedule: String,
}

/// A project with one of each resource.
async fn populated(api: &Api) -> (User, String, Ids) {
    let (ada, p) = project(api).await;
    let (agent, _) = agent_and_tool(api, &ada, &p).await;
    let tool = api
        .create(&ada.access, "/api/v1/tools", {
            let mut t = weather_tool(&p);
            t["name"] = json!("spare");
            t
        })
        .await;
    let wf = api
        .create(&ada.access, "/api/v1/workflows", json!({"project_id": p, "name": "W",
            "definition": {"steps": [{"key": "a", "kind": "agent", "agent_id": agent, "input": {}, "depends_on": []}]}}))
        .await;
    let policy = api
        .create(
            &ada.access,
            "/api/v1/policies",
            json!({"project_id": p, "name": "P", "rules": {"max_steps_per_run": 5}}),
        )
        .await;
    let schedule = api
        .create(
            &ada.access,
            "/api/v1/schedules",
            json!({"project_id": p, "workflow_id": wf["id"], "cron": "0 * * * *"}),
        )
        .await;
    let id = |v: &Value| v["id"].as_str().unwrap().to_string();
    // The agent is in the workflow: make a spare one for the routes that change it.
    let spare = api
        .create(&ada.access, "/api/v1/agents", json!({"project_id": p, "name": "Spare", "model": "openai/gpt-4o", "system_prompt": "x"}))
        .await;
    let ids = Ids {
        agent: id(&spare),
        tool: id(&tool),
        workflow: id(&wf),
        policy: id(&policy),
        schedule: id(&schedule),
    };
    (ada, p, ids)
}

#[tokio::test]
async fn another_tenant_gets_404_on_every_resource_route_and_changes_nothing() {
    let api = Api::start().await;
    // The scheduler's own ticks change schedule rows (the hourly one fires on the hour):
    // only the requests are under test.
    api.app
        .inner
        .faults()
        .pause_cron
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (_, p, ids) = populated(&api).await;
    let mallory = api.register("mallory").await;
    let before = api.snapshot().await;
    for (method, path, body) in resource_routes(&p, &ids) {
        let res = api.call(method, &path, Some(&mallory.access), body).await;
        assert_eq!(
            res.status,
            404,
            "{method} {path}: {}",
            String::from_utf8_lossy(&res.body)
        );
    }
    assert_eq!(api.snapshot().await, before);
}

#[tokio::test]
async fn each_role_gets_exactly_the_resource_actions_of_api_md() {
    // Viewers read; members write agents, tools, workflows, schedules; admins also policies,
    // prices and secrets. Statuses in `resource_routes` order.
    let expected: [(&str, [u16; 19]); 3] = [
        (
            "viewer",
            [
                200, 200, 403, 403, 200, 403, 200, 200, 200, 200, 403, 200, 200, 403, 200, 403,
                403, 403, 403,
            ],
        ),
        (
            "member",
            [
                200, 200, 200, 204, 200, 200, 200, 200, 200, 200, 403, 200, 200, 204, 200, 403,
                200, 403, 201,
            ],
        ),
        (
            "admin",
            [
                200, 200, 200, 204, 200, 200, 200, 200, 200, 200, 200, 200, 200, 204, 200, 200,
                200, 204, 201,
            ],
        ),
    ];
    for (role, statuses) in expected {
        let api = Api::start().await;
        let (ada, p, ids) = populated(&api).await;
        let caller = api.register(role).await;
        api.add_member(&ada, &p, &caller, role).await;
        for ((method, path, body), want) in resource_routes(&p, &ids).into_iter().zip(statuses) {
            let res = api.call(method, &path, Some(&caller.access), body).await;
            assert_eq!(
                res.status,
                want,
                "{role}: {method} {path}: {}",
                String::from_utf8_lossy(&res.body)
            );
        }
    }
}
