//! A contract fuzz of the whole API, driven by its own `/openapi.json`: for every operation
//! the document lists, requests built from the document's schemas (valid ones, and the
//! same mutated: wrong types, missing and unknown fields, NUL characters, huge numbers,
//! junk ids and headers), sent to the real app. Whatever comes in, the app answers no 5xx,
//! and every error is an RFC 9457 problem (`application/problem+json` whose `status` is
//! the answer's). Bounded: a fixed seed and a fixed number of cases per operation.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::common::{Api, User, request};

/// Cases per operation.
const CASES: usize = 24;

/// A small deterministic generator (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Strings that have broken parsers before, and ordinary ones.
const NASTY: &[&str] = &[
    "",
    " ",
    "a\u{0}b",
    "\u{0}",
    "x",
    "ok name",
    "💥🦀",
    "%00",
    "%",
    "'; drop table runs; --",
    "{{ secret.X }}",
    "{{",
    "../../etc/passwd",
    "\u{202e}abc",
    "-1",
    "1e400",
    "9999999999999999999999",
    "null",
    "W/\"1\"",
    "*/1 * * * *",
    "0 0 31 2 *",
    "openai/gpt-4o-mini",
    "https://example.com/x",
    "http://127.0.0.1:1/",
];

/// The document's schema at `r`, following `$ref`s.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

fn text(rng: &mut Rng, schema: &Value, ids: &[String]) -> Value {
    if let Some(values) = schema["enum"].as_array() {
        return rng.pick(values).clone();
    }
    let s = match schema["format"].as_str() {
        Some("uuid") if !ids.is_empty() && !rng.chance(4) => rng.pick(ids).clone(),
        Some("uuid") => uuid::Uuid::now_v7().to_string(),
        Some("date-time") => rng
            .pick(&[
                "2026-01-01T00:00:00Z",
                "2030-12-31T23:59:59+02:00",
                "yesterday",
            ])
            .to_string(),
        Some("uri") => rng
            .pick(&["https://example.com/hook", "ftp://x", "not a url"])
            .to_string(),
        _ if schema["pattern"].is_string() => rng
            .pick(&["get_weather", "0.5", "12", "a-b", "x"])
            .to_string(),
        _ => rng.pick(NASTY).to_string(),
    };
    Value::String(s)
}

/// A value for `schema`, valid by it most of the time.
fn generate(doc: &Value, rng: &mut Rng, schema: &Value, ids: &[String], depth: usize) -> Value {
    let schema = resolve(doc, schema);
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(values) = schema["enum"].as_array() {
        return rng.pick(values).clone();
    }
    let kind = match &schema["type"] {
        Value::String(t) => t.clone(),
        Value::Array(ts) => rng.pick(ts).as_str().unwrap_or("null").to_string(),
        _ if schema["properties"].is_object() => "object".into(),
        _ => rng
            .pick(&["string", "integer", "object", "null"])
            .to_string(),
    };
    match kind.as_str() {
        "null" => Value::Null,
        "boolean" => Value::Bool(rng.chance(2)),
        "integer" | "number" => {
            let lo = schema["minimum"].as_i64().unwrap_or(-5);
            let hi = schema["maximum"]
                .as_i64()
                .unwrap_or(lo.saturating_add(1000));
            let span = (hi - lo).max(0) as u64 + 1;
            json!(lo + (rng.next() % span) as i64)
        }
        "string" => text(rng, schema, ids),
        "array" => {
            let n = if depth > 3 { 0 } else { rng.below(3) };
            (0..n)
                .map(|_| generate(doc, rng, &schema["items"], ids, depth + 1))
                .collect()
        }
        _ => {
            let mut object = Map::new();
            if depth > 4 {
                return Value::Object(object);
            }
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(props) = schema["properties"].as_object() {
                for (name, prop) in props {
                    if required.contains(&name.as_str()) || rng.chance(2) {
                        object.insert(name.clone(), generate(doc, rng, prop, ids, depth + 1));
                    }
                }
            }
            Value::Object(object)
        }
    }
}

/// The same value broken in one of the ways clients break them.
fn mutate(rng: &mut Rng, value: Value) -> Value {
    match (rng.below(8), value) {
        (0, _) => json!([1, "two", null]),
        (1, _) => json!("a string where an object goes"),
        (2, Value::Object(mut m)) => {
            m.insert("unknown_field".into(), json!(true));
            Value::Object(m)
        }
        (3, Value::Object(mut m)) => {
            if let Some(k) = m.keys().next().cloned() {
                m.remove(&k);
            }
            Value::Object(m)
        }
        (4, Value::Object(mut m)) => {
            for v in m.values_mut() {
                *v = match rng.below(5) {
                    0 => json!(1e308),
                    1 => json!(-9_223_372_036_854_775_808i64),
                    2 => json!("nul \u{0} inside"),
                    3 => json!({"nested": [[[[{}]]]]}),
                    _ => json!(null),
                };
            }
            Value::Object(m)
        }
        (5, Value::Object(mut m)) => {
            m.insert("a\u{0}key".into(), json!(1));
            Value::Object(m)
        }
        (_, v) => v,
    }
}

/// The path with its `{params}` filled in: mostly the fixture of the resource the path
/// names (the segment before), else any id, a fresh one or junk.
fn fill_path(rng: &mut Rng, path: &str, ids: &[String], named: &BTreeMap<&str, String>) -> String {
    let mut before = "";
    path.split('/')
        .map(|segment| {
            let previous = std::mem::replace(&mut before, segment);
            if !segment.starts_with('{') {
                return segment.to_string();
            }
            if let Some(id) = named.get(previous)
                && !rng.chance(3)
            {
                return id.clone();
            }
            match rng.below(6) {
                0 => uuid::Uuid::now_v7().to_string(),
                1 => rng
                    .pick(&[
                        "not-a-uuid",
                        "%00",
                        "%zz",
                        "x%2Fy",
                        "..",
                        "openai%2Fgpt-4o-mini",
                    ])
                    .to_string(),
                2 => "9".repeat(300),
                _ if ids.is_empty() => uuid::Uuid::now_v7().to_string(),
                _ => rng.pick(ids).clone(),
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Project resources for the cases to point at: ids that exist, by the path segment that
/// names their kind.
async fn fixtures(api: &Api, ada: &User) -> BTreeMap<&'static str, String> {
    let p = api.create_project(ada, json!({"name": "Fuzz"})).await;
    let p = p["id"].as_str().unwrap().to_string();
    let tool =
        crate::engine::tool_named(api, ada, &p, "echo", "https://example.com/echo".into()).await;
    let wf = crate::engine::workflow(
        api,
        ada,
        &p,
        json!([{"key": "a", "kind": "condition", "input": {}}]),
    )
    .await;
    let run = api.start_run(&ada.access, &json!(wf), json!({})).await;
    let schedule = api
        .create(
            &ada.access,
            "/api/v1/schedules",
            json!({"project_id": p, "workflow_id": wf, "cron": "0 3 * * *"}),
        )
        .await;
    let id = |v: &Value| v["id"].as_str().unwrap().to_string();
    let mut named = BTreeMap::from([
        ("projects", p.clone()),
        ("workflows", wf.clone()),
        ("runs", id(&run)),
        ("tools", id(&tool)),
        ("schedules", id(&schedule)),
        ("models", "openai%2Fgpt-4o-mini".to_string()),
        ("secrets", "otlp.api_key".to_string()),
    ]);
    for (kind, body) in [
        (
            "policies",
            json!({"project_id": p, "name": "cap", "rules": {"budget": {"limit_usd": "1", "window": "day", "action": "alert"}}}),
        ),
        (
            "webhooks",
            json!({"project_id": p, "url": "https://example.com/hook", "event_types": ["run.failed"]}),
        ),
        (
            "triggers",
            json!({"project_id": p, "name": "gh", "workflow_id": wf}),
        ),
        (
            "api-keys",
            json!({"project_id": p, "name": "ci", "role": "member"}),
        ),
    ] {
        let res = api
            .call(
                "POST",
                &format!("/api/v1/{kind}"),
                Some(&ada.access),
                Some(body),
            )
            .await;
        assert_eq!(
            res.status,
            201,
            "{kind}: {}",
            String::from_utf8_lossy(&res.body)
        );
        named.insert(kind, id(&res.json()));
    }
    let member = api.register("bob").await;
    api.add_member(ada, &p, &member, "member").await;
    named.insert("members", member.id.clone());
    named
}

#[tokio::test]
async fn whatever_the_documented_operations_receive_they_answer_no_5xx_and_errors_as_problems() {
    let api = Api::start_with(&[
        ("SPIN_VARIABLE_RATE_LIMIT_PER_MINUTE", "1000000"),
        ("SPIN_VARIABLE_LOGIN_FAILURES_PER_ACCOUNT", "1000000"),
    ])
    .await;
    let ada = api.register("ada").await;
    let named = fixtures(&api, &ada).await;
    let ids: Vec<String> = named.values().cloned().collect();
    let doc = api.call("GET", "/openapi.json", None, None).await.json();
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let mut tally: BTreeMap<u16, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut operations = 0;
    // What ends the fixtures or the session (deletes, logout) goes last, so the rest reach
    // existing resources.
    let mut ops: Vec<(&String, String, &Value)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().unwrap();
            methods
                .iter()
                .map(move |(m, op)| (path, m.to_uppercase(), op))
        })
        .collect();
    ops.sort_by_key(|(path, method, _)| (method == "DELETE" || path.ends_with("/logout"), *path));
    for (path, method, op) in ops {
        {
            operations += 1;
            for case in 0..CASES {
                let mut url = fill_path(&mut rng, path, &ids, &named);
                let mut query = Vec::new();
                let mut headers: Vec<(String, String)> = Vec::new();
                for p in op["parameters"].as_array().into_iter().flatten() {
                    let p = resolve(&doc, p);
                    let name = p["name"].as_str().unwrap();
                    if p["in"] == "path" || (p["required"] != true && rng.chance(2)) {
                        continue;
                    }
                    let value = match generate(&doc, &mut rng, &p["schema"], &ids, 0) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    match p["in"].as_str() {
                        Some("query") => query.push(format!("{}={}", encode(name), encode(&value))),
                        Some("header") if !value.contains('\u{0}') => {
                            headers.push((name.to_string(), value))
                        }
                        _ => {}
                    }
                }
                if rng.chance(4) {
                    let junk = rng.pick(NASTY).to_string();
                    query.push(format!("junk={}", encode(&junk)));
                }
                if !query.is_empty() {
                    url = format!("{url}?{}", query.join("&"));
                }
                let schema = &op["requestBody"]["content"]["application/json"]["schema"];
                let body = if schema.is_null() {
                    None
                } else {
                    let valid = generate(&doc, &mut rng, schema, &ids, 0);
                    Some(if case % 2 == 0 {
                        valid
                    } else {
                        mutate(&mut rng, valid)
                    })
                };
                let auth = format!("Bearer {}", ada.access);
                let mut sent: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                if !rng.chance(8) {
                    sent.push(("authorization", auth.as_str()));
                }
                if rng.chance(6) {
                    sent.push(("idempotency-key", "k"));
                }
                let res = request(&method, &api.url(&url), &sent, body.clone()).await;
                *tally.entry(res.status).or_default() += 1;
                let what = || format!("{method} {url} {body:?} -> {}", res.status);
                if res.status >= 500 {
                    failures.push(format!("{} {}", what(), String::from_utf8_lossy(&res.body)));
                } else if res.status >= 400 {
                    let problem = res.header("content-type") == Some("application/problem+json");
                    let parsed: Option<Value> = serde_json::from_slice(&res.body).ok();
                    let status_ok = parsed
                        .as_ref()
                        .is_some_and(|p| p["status"] == res.status && p["title"].is_string());
                    if !problem || !status_ok {
                        failures.push(format!(
                            "{}: not a problem: {:?} {}",
                            what(),
                            res.header("content-type"),
                            String::from_utf8_lossy(&res.body)
                        ));
                    }
                }
            }
        }
    }
    println!(
        "contract fuzz: {operations} operations x {CASES} cases, answers by status: {tally:?}"
    );
    assert!(operations > 80, "the document lists every operation");
    assert!(
        failures.is_empty(),
        "{} of {} requests broke the contract:\n{}",
        failures.len(),
        operations * CASES,
        failures.join("\n")
    );
}

/// What a contract fuzzer (schemathesis) found the document under-stating, now said by the
/// document and held by the app.
#[tokio::test]
async fn the_document_says_what_the_app_enforces() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Doc"})).await;
    let p = p["id"].as_str().unwrap();
    let doc = api.call("GET", "/openapi.json", None, None).await.json();
    let op = |path: &str, method: &str| doc["paths"][path][method].clone();

    // A user's list names its project: required by the document, 422 without it.
    let list = op("/api/v1/agents", "get");
    let project = list["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "project_id")
        .unwrap()
        .clone();
    assert_eq!(project["required"], true);
    let res = api
        .call("GET", "/api/v1/agents", Some(&ada.access), None)
        .await;
    assert_eq!(res.status, 422);

    // Answers the auth routes give are documented.
    for (path, status) in [
        ("/api/v1/auth/login", "401"),
        ("/api/v1/auth/refresh", "401"),
        ("/api/v1/auth/register", "409"),
    ] {
        assert!(
            op(path, "post")["responses"][status].is_object(),
            "{path} {status}"
        );
    }
    // Non-blank names and unknown fields refused, as the schemas say.
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["AgentInput"]["properties"]["name"]["minLength"], 1);
    assert_eq!(schemas["Login"]["additionalProperties"], false);
    let res = api
        .call(
            "POST",
            "/api/v1/projects",
            Some(&ada.access),
            Some(json!({"name": "   "})),
        )
        .await;
    assert_eq!(res.status, 422);
    // If-Match is an entity-tag list, not any string.
    let patch = op("/api/v1/agents/{id}", "patch");
    let if_match = patch["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "If-Match")
        .unwrap()
        .clone();
    assert!(if_match["schema"]["pattern"].is_string());

    // An idempotency key that could never be stored is refused on any route.
    let long = "k".repeat(256);
    let res = crate::common::request(
        "POST",
        &api.url("/api/v1/auth/login"),
        &[("idempotency-key", long.as_str())],
        Some(json!({"email": ada.email, "password": ada.password})),
    )
    .await;
    assert_eq!(res.status, 422, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.json()["errors"][0]["field"], "headers.idempotency-key");

    // A definition that is not an object is a malformed request, not an invalid workflow.
    let res = api
        .call(
            "POST",
            "/api/v1/workflows/validate",
            Some(&ada.access),
            Some(json!({"project_id": p, "definition": []})),
        )
        .await;
    assert_eq!(res.status, 422, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.json()["errors"][0]["field"], "definition");
}
