//! Trace export end to end: runs through the real components, the `exporter` cron
//! component, and a fake OTLP/HTTP collector on loopback (LangWatch's
//! `/api/otel/v1/traces`). Every payload is read by a strict model of the OTLP JSON
//! encoding (`ExportTraceServiceRequest`): unknown fields, wrong value types, malformed
//! ids or times fail the test.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::{Answer, Api, FakeServer, User, openai};
use serde::Deserialize;
use serde_json::{Value, json};

// ---- The OTLP/HTTP JSON encoding, strictly -------------------------------------------------

#[allow(dead_code)] // Fields the schema allows are accepted; not all are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExportTraceServiceRequest {
    resource_spans: Vec<ResourceSpans>,
}

#[allow(dead_code)] // Fields the schema allows are accepted; not all are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ResourceSpans {
    resource: Resource,
    scope_spans: Vec<ScopeSpans>,
    #[serde(default)]
    schema_url: String,
}

#[allow(dead_code)] // Fields the schema allows are accepted; not all are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Resource {
    attributes: Vec<KeyValue>,
    #[serde(default)]
    dropped_attributes_count: u32,
}

#[allow(dead_code)] // Fields the schema allows are accepted; not all are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScopeSpans {
    scope: Scope,
    spans: Vec<Span>,
    #[serde(default)]
    schema_url: String,
}

#[allow(dead_code)] // Fields the schema allows are accepted; not all are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Scope {
    name: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    attributes: Vec<KeyValue>,
}

#[allow(dead_code)] // Fields the schema allows are accepted; not all are checked.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Span {
    trace_id: String,
    span_id: String,
    #[serde(default)]
    parent_span_id: String,
    #[serde(default)]
    trace_state: String,
    name: String,
    kind: i32,
    /// fixed64: a decimal string in the JSON encoding.
    start_time_unix_nano: String,
    end_time_unix_nano: String,
    #[serde(default)]
    attributes: Vec<KeyValue>,
    #[serde(default)]
    events: Vec<Value>,
    #[serde(default)]
    links: Vec<Value>,
    #[serde(default)]
    status: Status,
    #[serde(default)]
    flags: u32,
    #[serde(default)]
    dropped_attributes_count: u32,
    #[serde(default)]
    dropped_events_count: u32,
    #[serde(default)]
    dropped_links_count: u32,
}

#[allow(dead_code)] // Fields the schema allows are accepted; not all are checked.
#[derive(Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
struct Status {
    #[serde(default)]
    code: i32,
    #[serde(default)]
    message: String,
}

#[allow(dead_code)] // Fields the schema allows are accepted; not all are checked.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct KeyValue {
    key: String,
    value: AnyValue,
}

#[allow(dead_code)] // Fields the schema allows are accepted; not all are checked.
#[derive(Deserialize, Clone, Debug, PartialEq)]
enum AnyValue {
    #[serde(rename = "stringValue")]
    Str(String),
    #[serde(rename = "boolValue")]
    Bool(bool),
    /// int64: a decimal string in the JSON encoding.
    #[serde(rename = "intValue")]
    Int(String),
    #[serde(rename = "doubleValue")]
    Double(f64),
    #[serde(rename = "arrayValue")]
    Array { values: Vec<AnyValue> },
    #[serde(rename = "kvlistValue")]
    Kvlist { values: Vec<Value> },
    #[serde(rename = "bytesValue")]
    Bytes(String),
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

impl Span {
    fn start(&self) -> u64 {
        self.start_time_unix_nano.parse().unwrap()
    }

    fn end(&self) -> u64 {
        self.end_time_unix_nano.parse().unwrap()
    }

    fn attr(&self, key: &str) -> Option<&AnyValue> {
        self.attributes
            .iter()
            .find(|a| a.key == key)
            .map(|a| &a.value)
    }

    fn int(&self, key: &str) -> i64 {
        match self.attr(key) {
            Some(AnyValue::Int(s)) => s.parse().unwrap(),
            other => panic!("{}: {key} is {other:?}", self.name),
        }
    }

    fn double(&self, key: &str) -> f64 {
        match self.attr(key) {
            Some(AnyValue::Double(d)) => *d,
            other => panic!("{}: {key} is {other:?}", self.name),
        }
    }

    fn str(&self, key: &str) -> &str {
        match self.attr(key) {
            Some(AnyValue::Str(s)) => s,
            other => panic!("{}: {key} is {other:?}", self.name),
        }
    }
}

/// One export request, checked against the OTLP encoding: the resource's attributes and
/// every span.
fn parse_export(body: &[u8]) -> (HashMap<String, AnyValue>, Vec<Span>) {
    let req: ExportTraceServiceRequest =
        serde_json::from_slice(body).expect("the body is an OTLP ExportTraceServiceRequest");
    assert_eq!(req.resource_spans.len(), 1);
    let rs = &req.resource_spans[0];
    let resource: HashMap<String, AnyValue> = rs
        .resource
        .attributes
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    let mut spans = vec![];
    for ss in &rs.scope_spans {
        assert!(!ss.scope.name.is_empty());
        spans.extend(ss.spans.iter().cloned());
    }
    for s in &spans {
        assert!(is_hex(&s.trace_id, 32), "traceId {}", s.trace_id);
        assert!(is_hex(&s.span_id, 16), "spanId {}", s.span_id);
        assert!(
            s.parent_span_id.is_empty() || is_hex(&s.parent_span_id, 16),
            "parentSpanId {}",
            s.parent_span_id
        );
        assert!((0..=5).contains(&s.kind), "kind {}", s.kind);
        assert!((0..=2).contains(&s.status.code), "status {:?}", s.status);
        assert!(s.start() > 1_700_000_000_000_000_000, "{}", s.name);
        assert!(s.end() >= s.start(), "{} ends before it starts", s.name);
        assert!(!s.name.is_empty());
        for kv in &s.attributes {
            if let AnyValue::Int(i) = &kv.value {
                i.parse::<i64>().expect("intValue is an int64 string");
            }
        }
    }
    (resource, spans)
}

/// The spans of one trace as a tree: its root, and each span's children by start time.
struct Tree {
    root: Span,
    children: HashMap<String, Vec<Span>>,
}

impl Tree {
    fn of(trace_id: &str, spans: &[Span]) -> Self {
        let spans: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        assert_eq!(ids.len(), spans.len(), "span ids are unique");
        let roots: Vec<&&Span> = spans
            .iter()
            .filter(|s| s.parent_span_id.is_empty())
            .collect();
        assert_eq!(roots.len(), 1, "one root span");
        let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), *s)).collect();
        let mut children: HashMap<String, Vec<Span>> = HashMap::new();
        for s in spans.iter().filter(|s| !s.parent_span_id.is_empty()) {
            let parent = by_id
                .get(s.parent_span_id.as_str())
                .unwrap_or_else(|| panic!("{}'s parent is not in the trace", s.name));
            assert!(
                s.start() >= parent.start() && s.end() <= parent.end(),
                "{} [{}, {}] lies outside its parent {} [{}, {}]",
                s.name,
                s.start(),
                s.end(),
                parent.name,
                parent.start(),
                parent.end()
            );
            children
                .entry(s.parent_span_id.clone())
                .or_default()
                .push((*s).clone());
        }
        for c in children.values_mut() {
            c.sort_by_key(|s| (s.start(), s.name.clone()));
        }
        Self {
            root: (**roots[0]).clone(),
            children,
        }
    }

    fn children(&self, of: &Span) -> Vec<Span> {
        self.children.get(&of.span_id).cloned().unwrap_or_default()
    }
}

// ---- Helpers -------------------------------------------------------------------------------

const LANGWATCH_PATH: &str = "/api/otel/v1/traces";
const METRICS_TOKEN: &str = "operator-token-0123456789";

/// The value of a sample line of the Prometheus page, e.g. `sparkops_x{a="b"}`.
async fn gauge(api: &Api, sample: &str) -> f64 {
    let page = api.call("GET", "/metrics", Some(METRICS_TOKEN), None).await;
    assert_eq!(page.status, 200);
    let text = String::from_utf8(page.body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {sample}"))
        .parse()
        .unwrap()
}

async fn api(provider: Option<&FakeServer>) -> Api {
    Api::for_fakes(provider, &[("SPIN_VARIABLE_METRICS_TOKEN", METRICS_TOKEN)]).await
}

async fn project(api: &Api, who: &User, name: &str) -> String {
    api.create_project(who, json!({"name": name})).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Points the project's traces at `collector` and stores `secret` as project secret `name`.
async fn export_to(api: &Api, who: &User, p: &str, collector: &FakeServer, secret: (&str, &str)) {
    let res = api
        .call(
            "PATCH",
            &format!("/api/v1/projects/{p}"),
            Some(&who.access),
            Some(json!({"trace_endpoint": collector.url(LANGWATCH_PATH)})),
        )
        .await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let res = api
        .call(
            "PUT",
            &format!("/api/v1/projects/{p}/secrets/{}", secret.0),
            Some(&who.access),
            Some(json!({"value": secret.1})),
        )
        .await;
    assert_eq!(res.status, 204);
}

async fn create(api: &Api, who: &User, path: &str, body: Value) -> String {
    api.create(&who.access, path, body).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A tool named `name` that POSTs to `url`.
async fn tool(api: &Api, who: &User, p: &str, name: &str, url: String) -> String {
    create(
        api,
        who,
        "/api/v1/tools",
        json!({"project_id": p, "name": name, "description": format!("the {name} tool"),
            "input_schema": {"type": "object"}, "http": {"method": "POST", "url": url}}),
    )
    .await
}

/// A succeeded run of a new workflow with one tool step calling `url`.
async fn tool_run(api: &Api, who: &User, p: &str, url: String) -> Value {
    let tool = tool(api, who, p, "echo", url).await;
    let wf = create(
        api,
        who,
        "/api/v1/workflows",
        json!({"project_id": p, "name": "echo once", "definition": {"steps": [
            {"key": "echo", "kind": "tool", "tool_id": tool, "input": {}}]}}),
    )
    .await;
    let run = api.run_to_end(&who.access, &wf, json!({})).await;
    assert_eq!(run["status"], "succeeded");
    run
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The outbox row of a run: (status, attempts, last_error, seconds from `from` to the next
/// attempt).
async fn export_row(api: &Api, run: &Value, from: i64) -> (String, i32, Option<String>, i64) {
    let id = uuid::Uuid::parse_str(run["id"].as_str().unwrap()).unwrap();
    let row = api
        .env
        .db()
        .await
        .query_one(
            "select status, attempts, last_error, extract(epoch from next_attempt_at)::int8
             from trace_exports where run_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get::<_, i64>(3) - from,
    )
}

/// [`export_row`] once an attempt has been recorded: the app's own exporter ticks every
/// 2 s as well, and when one of its ticks made the attempt, the test's tick found the row
/// leased and returned before the outcome was written.
async fn attempted_export_row(
    api: &Api,
    run: &Value,
    from: i64,
) -> (String, i32, Option<String>, i64) {
    crate::common::eventually(async || {
        let row = export_row(api, run, from).await;
        (row.0 != "pending" || row.2.is_some()).then_some(row)
    })
    .await
}

fn trace_id(run: &Value) -> String {
    run["id"].as_str().unwrap().replace('-', "")
}

// ---- Tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_finished_run_reaches_the_collector_once_as_a_well_formed_trace() {
    let provider = FakeServer::answering(
        vec![
            openai::tool_calls(&[("c1", "weather", json!({"city": "Oslo"}))], 100, 20),
            openai::text("It is 3 degrees in Oslo.", 150, 30),
        ],
        Duration::ZERO,
    )
    .await;
    let weather = FakeServer::start(200, json!({"temp": 3}), Duration::ZERO).await;
    let collector = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let api = api(Some(&provider)).await;
    let ada = api.register("ada").await;
    let p = project(&api, &ada, "Traced").await;
    export_to(
        &api,
        &ada,
        &p,
        &collector,
        ("otlp.api_key", "lw-project-key-123"),
    )
    .await;
    api.set_price(&ada.access, &p, "fake/small", "1", "2").await;
    let tool = tool(&api, &ada, &p, "weather", weather.url("/w")).await;
    let agent = create(
        &api,
        &ada,
        "/api/v1/agents",
        json!({"project_id": p, "name": "forecaster", "model": "fake/small",
            "system_prompt": "Be terse.", "tool_ids": [tool]}),
    )
    .await;
    let wf = create(
        &api,
        &ada,
        "/api/v1/workflows",
        json!({"project_id": p, "name": "forecast", "definition": {"steps": [
            {"key": "ask", "kind": "agent", "agent_id": agent, "input": "{{ input.q }}"},
            {"key": "log", "kind": "tool", "tool_id": tool, "input": {"city": "Oslo"}, "depends_on": ["ask"]}]}}),
    )
    .await;
    let run = api
        .run_to_end(&ada.access, &wf, json!({"q": "Weather in Oslo?"}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");

    api.tick("exporter", now()).await;
    let sent = crate::common::eventually(async || {
        let r = collector.received();
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(sent.len(), 1);
    let req = &sent[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.uri, LANGWATCH_PATH);
    assert_eq!(req.headers["authorization"], "Bearer lw-project-key-123");
    assert_eq!(req.headers["content-type"], "application/json");

    let (resource, spans) = parse_export(&req.body);
    assert_eq!(resource["service.name"], AnyValue::Str("sparkops".into()));
    assert_eq!(resource["sparkops.project_id"], AnyValue::Str(p.clone()));
    assert!(spans.iter().all(|s| s.trace_id == trace_id(&run)));
    let tree = Tree::of(&trace_id(&run), &spans);
    assert_eq!(spans.len(), 6, "run, 2 steps, 2 model calls, 1 tool call");

    // The root: the run, with its totals.
    let root = &tree.root;
    assert_eq!(root.name, "workflow forecast");
    assert_eq!(root.status.code, 1);
    assert_eq!(root.str("sparkops.run_id"), run["id"].as_str().unwrap());
    assert_eq!(root.int("gen_ai.usage.input_tokens"), 250);
    assert_eq!(root.int("gen_ai.usage.output_tokens"), 50);
    // 250 tokens at 1 USD and 50 at 2 USD per million.
    assert!((root.double("sparkops.cost_usd") - 0.00035).abs() < 1e-12);

    // The steps, in order, under the root.
    let steps = tree.children(root);
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["invoke_agent forecaster", "execute_tool weather"]);
    let (ask, log) = (&steps[0], &steps[1]);
    assert_eq!(ask.str("sparkops.step.key"), "ask");
    assert_eq!(ask.str("gen_ai.agent.id"), agent);
    assert_eq!(ask.str("gen_ai.request.model"), "small");
    assert_eq!(ask.int("gen_ai.usage.input_tokens"), 250);
    assert_eq!(log.str("sparkops.step.key"), "log");
    assert_eq!(log.str("gen_ai.tool.name"), "weather");
    assert!(log.start() >= ask.end(), "log depends on ask");
    assert!(tree.children(log).is_empty());

    // Under the agent step: model call, tool call, model call.
    let calls = tree.children(ask);
    let names: Vec<&str> = calls.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["chat small", "execute_tool weather", "chat small"]);
    assert!(calls.iter().all(|c| c.kind == 3), "calls are client spans");
    assert_eq!(calls[0].int("gen_ai.usage.input_tokens"), 100);
    assert_eq!(calls[0].int("gen_ai.usage.output_tokens"), 20);
    assert_eq!(calls[2].int("gen_ai.usage.input_tokens"), 150);
    assert_eq!(calls[0].str("gen_ai.provider.name"), "fake");
    assert!((calls[0].double("sparkops.cost_usd") - 0.00014).abs() < 1e-12);
    assert!((calls[2].double("sparkops.cost_usd") - 0.00021).abs() < 1e-12);
    assert_eq!(calls[1].str("gen_ai.tool.call.id"), "c1");
    assert_eq!(calls[1].status.code, 1);

    // The key is never in the trace or the logs; the export happens once.
    let body = String::from_utf8_lossy(&req.body);
    assert!(!body.contains("lw-project-key-123"));
    assert!(!body.contains("sk-app-key"));
    assert!(!api.guest_logs().contains("lw-project-key-123"));
    assert_eq!(export_row(&api, &run, 0).await.0, "exported");
    api.tick("exporter", now() + 3600).await;
    assert_eq!(collector.received().len(), 1);
}

#[tokio::test]
async fn a_failing_collector_is_retried_with_backoff_and_never_fails_the_run() {
    let collector = FakeServer::answering(
        vec![
            Answer {
                status: 503,
                body: json!({"message": "overloaded"}),
                headers: vec![("retry-after", "30".into())],
            },
            Answer {
                status: 503,
                body: json!({"message": "still overloaded"}),
                headers: vec![],
            },
            Answer {
                status: 200,
                body: json!({"partialSuccess": {}}),
                headers: vec![],
            },
        ],
        Duration::ZERO,
    )
    .await;
    let echo = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let api = api(None).await;
    let ada = api.register("ada").await;
    let p = project(&api, &ada, "Flaky collector").await;
    export_to(&api, &ada, &p, &collector, ("otlp.api_key", "k")).await;
    let run = tool_run(&api, &ada, &p, echo.url("/echo")).await;

    // The exporter's own ticks run too: whichever tick comes first makes attempt 1, within
    // a couple of seconds of t0.
    let t0 = now();
    api.tick("exporter", t0).await;
    crate::common::eventually(async || (collector.received().len() == 1).then_some(())).await;
    let (status, attempts, error, next) = attempted_export_row(&api, &run, t0).await;
    assert_eq!((status.as_str(), attempts), ("pending", 1));
    assert!(error.unwrap().contains("503"));
    assert!(
        (27..=33).contains(&next),
        "Retry-After: 30 is honoured ({next})"
    );

    assert_eq!(
        gauge(&api, "sparkops_trace_exports{status=\"pending\"}").await,
        1.0
    );
    api.tick("exporter", t0 + 20).await;
    assert_eq!(collector.received().len(), 1, "not due before Retry-After");
    api.tick("exporter", t0 + 35).await;
    assert_eq!(collector.received().len(), 2);
    let (status, attempts, _, next) = export_row(&api, &run, t0 + 35).await;
    assert_eq!((status.as_str(), attempts), ("pending", 2));
    assert_eq!(next, 10, "second retry waits 5 s * 2");
    api.tick("exporter", t0 + 40).await;
    assert_eq!(collector.received().len(), 2);
    api.tick("exporter", t0 + 46).await;
    let sent = collector.received();
    assert_eq!(sent.len(), 3);
    assert_eq!(export_row(&api, &run, 0).await.0, "exported");
    // Every attempt sent the same spans, so a collector that did get an earlier one
    // de-duplicates them.
    assert_eq!(sent[0].body, sent[2].body);
    let run = api
        .finished_run(&ada.access, run["id"].as_str().unwrap())
        .await;
    assert_eq!(run["status"], "succeeded");
    assert!(run["error"].is_null());
    // The run shows where its export stands.
    let export = &run["trace_export"];
    assert_eq!(
        (&export["status"], &export["attempts"]),
        (&json!("exported"), &json!(3))
    );
    assert!(export["last_error"].is_null() && export["exported_at"].is_string());
}

#[tokio::test]
async fn an_unreachable_collector_is_given_up_after_the_last_attempt() {
    // A port nothing listens on: connection refused on every attempt.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}{LANGWATCH_PATH}", closed.local_addr().unwrap());
    drop(closed);
    let echo = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let api = api(None).await;
    let ada = api.register("ada").await;
    let p = project(&api, &ada, "Gone collector").await;
    let res = api
        .call(
            "PATCH",
            &format!("/api/v1/projects/{p}"),
            Some(&ada.access),
            Some(json!({"trace_endpoint": endpoint})),
        )
        .await;
    assert_eq!(res.status, 200);
    let run = tool_run(&api, &ada, &p, echo.url("/echo")).await;
    let t0 = now();
    api.tick("exporter", t0).await;
    let (status, attempts, error, _) = attempted_export_row(&api, &run, t0).await;
    assert_eq!((status.as_str(), attempts), ("pending", 1));
    assert!(
        error.unwrap().contains("failed"),
        "a connection error is retried"
    );
    // Nine more attempts, each after its backoff (at most 300 s).
    for i in 1..=9 {
        api.tick("exporter", t0 + 301 * i).await;
    }
    let (status, attempts, _, _) = export_row(&api, &run, t0).await;
    assert_eq!((status.as_str(), attempts), ("failed", 10));
    api.tick("exporter", t0 + 10_000).await;
    assert_eq!(
        export_row(&api, &run, t0).await.1,
        10,
        "no attempt after giving up"
    );
    let run = api
        .finished_run(&ada.access, run["id"].as_str().unwrap())
        .await;
    assert_eq!(run["status"], "succeeded");
}

#[tokio::test]
async fn a_refusing_collector_is_not_retried_and_each_project_sends_only_its_own_runs() {
    let refusing = FakeServer::start(401, json!({"error": "bad key"}), Duration::ZERO).await;
    let accepting = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let echo = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let api = api(None).await;
    let ada = api.register("ada").await;
    let (a, b, c) = (
        project(&api, &ada, "A").await,
        project(&api, &ada, "B").await,
        project(&api, &ada, "C").await,
    );
    export_to(&api, &ada, &a, &refusing, ("otlp.api_key", "wrong-key")).await;
    // Langfuse-style: the whole Authorization value, and Langfuse's ingestion header as a
    // `otlp.header.` secret (one naming a header the export owns is not sent).
    export_to(
        &api,
        &ada,
        &b,
        &accepting,
        ("otlp.authorization", "Basic cGs6c2s="),
    )
    .await;
    for (name, value) in [
        ("otlp.header.X-Langfuse-Ingestion-Version", "4"),
        ("otlp.header.content-type", "text/plain"),
    ] {
        let res = api
            .call(
                "PUT",
                &format!("/api/v1/projects/{b}/secrets/{name}"),
                Some(&ada.access),
                Some(json!({"value": value})),
            )
            .await;
        assert_eq!(res.status, 204);
    }
    let mut runs = HashMap::new();
    for p in [&a, &b, &c] {
        let run = tool_run(&api, &ada, p, echo.url("/echo")).await;
        runs.insert(p.clone(), run);
    }
    let t0 = now();
    api.tick("exporter", t0).await;
    crate::common::eventually(async || {
        (refusing.received().len() == 1 && accepting.received().len() == 1).then_some(())
    })
    .await;

    let run_a = api
        .finished_run(&ada.access, runs[&a]["id"].as_str().unwrap())
        .await;
    let export = &run_a["trace_export"];
    assert_eq!(
        (&export["status"], &export["attempts"]),
        (&json!("failed"), &json!(1))
    );
    assert!(export["last_error"].as_str().unwrap().contains("401"));
    assert!(export["exported_at"].is_null());
    let (_, spans) = parse_export(&refusing.received()[0].body);
    assert!(spans.iter().all(|s| s.trace_id == trace_id(&runs[&a])));

    let sent = &accepting.received()[0];
    assert_eq!(sent.headers["authorization"], "Basic cGs6c2s=");
    assert_eq!(sent.headers["x-langfuse-ingestion-version"], "4");
    assert_eq!(sent.headers["content-type"], "application/json");
    assert_eq!(sent.headers.get_all("content-type").iter().count(), 1);
    let other = &refusing.received()[0];
    assert!(other.headers.get("x-langfuse-ingestion-version").is_none());
    let (resource, spans) = parse_export(&sent.body);
    assert_eq!(resource["sparkops.project_id"], AnyValue::Str(b.clone()));
    assert!(!spans.is_empty());
    assert!(spans.iter().all(|s| s.trace_id == trace_id(&runs[&b])));
    assert_eq!(export_row(&api, &runs[&b], t0).await.0, "exported");
    // Langfuse's trace-level attributes on every span, not only the root: who started
    // the run, its session (a run of its own: its id), the trace's name and project.
    let run_b = runs[&b]["id"].as_str().unwrap().to_string();
    let str_attr = |s: &Span, key: &str| match s.attr(key) {
        Some(AnyValue::Str(v)) => v.clone(),
        other => panic!("{}: {key} is {other:?}", s.name),
    };
    assert!(spans.len() >= 2, "a root and a step at least");
    for s in &spans {
        assert_eq!(str_attr(s, "user.id"), ada.id);
        assert_eq!(str_attr(s, "langfuse.user.id"), ada.id);
        assert_eq!(str_attr(s, "session.id"), run_b);
        assert_eq!(str_attr(s, "langfuse.session.id"), run_b);
        assert_eq!(str_attr(s, "langfuse.trace.name"), "workflow echo once");
        assert_eq!(str_attr(s, "langfuse.trace.metadata.project_id"), b);
    }
    // A retry of a retry belongs to the first run's session.
    let mut last = run_b.clone();
    for _ in 0..2 {
        let retry = api
            .call(
                "POST",
                &format!("/api/v1/runs/{last}/retry"),
                Some(&ada.access),
                Some(json!({"from": "start"})),
            )
            .await;
        assert_eq!(
            retry.status,
            201,
            "{}",
            String::from_utf8_lossy(&retry.body)
        );
        last = retry.json()["id"].as_str().unwrap().to_string();
        api.finished_run(&ada.access, &last).await;
    }
    api.tick("exporter", t0 + 1).await;
    let sent = crate::common::eventually(async || {
        accepting.received().into_iter().find(|r| {
            parse_export(&r.body)
                .1
                .iter()
                .any(|s| s.trace_id == trace_id(&json!({"id": last})))
        })
    })
    .await;
    let (_, spans) = parse_export(&sent.body);
    let retried: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == trace_id(&json!({"id": last})))
        .collect();
    assert!(!retried.is_empty());
    assert!(retried.iter().all(|s| str_attr(s, "session.id") == run_b));

    // C exports nothing: no outbox row at all.
    let c_rows: i64 = api
        .env
        .db()
        .await
        .query_one(
            "select count(*) from trace_exports where project_id = $1",
            &[&uuid::Uuid::parse_str(&c).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(c_rows, 0);
    let run_c = api
        .finished_run(&ada.access, runs[&c]["id"].as_str().unwrap())
        .await;
    assert!(run_c["trace_export"].is_null());

    for at in [t0 + 600, t0 + 7200] {
        api.tick("exporter", at).await;
    }
    assert_eq!(refusing.received().len(), 1, "a 401 is not retried");
    // The first run and its two retries, each sent once (the retries may share a request
    // or not, as the host's own exporter ticks fall).
    let mut roots: HashMap<String, usize> = HashMap::new();
    for sent in accepting.received() {
        for s in parse_export(&sent.body).1 {
            if s.parent_span_id.is_empty() {
                *roots.entry(s.trace_id).or_default() += 1;
            }
        }
    }
    assert_eq!(roots.len(), 3, "{roots:?}");
    assert!(roots.values().all(|n| *n == 1), "{roots:?}");
    assert_eq!(
        gauge(&api, "sparkops_trace_exports{status=\"failed\"}").await,
        1.0
    );
    assert_eq!(
        gauge(&api, "sparkops_trace_exports{status=\"pending\"}").await,
        0.0
    );
}

#[tokio::test]
async fn the_trace_endpoint_is_checked_and_only_admins_set_it() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let bob = api.register("bob").await;
    let p = project(&api, &ada, "Settings").await;
    api.add_member(&ada, &p, &bob, "member").await;
    let path = format!("/api/v1/projects/{p}");
    let patch = async |who: &User, endpoint: Value| {
        api.call(
            "PATCH",
            &path,
            Some(&who.access),
            Some(json!({"trace_endpoint": endpoint})),
        )
        .await
    };
    let good = "https://app.langwatch.ai/api/otel/v1/traces";
    let res = patch(&ada, json!(good)).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.json()["trace_endpoint"], good);

    for (bad, says) in [
        (json!("not a url"), "not a valid URL"),
        (
            json!("ftp://collector.example.com/v1/traces"),
            "http or https",
        ),
        (json!("http://collector.example.com/v1/traces"), "https"),
        (
            json!("https://127.0.0.1:4318/v1/traces"),
            "internal address",
        ),
        (
            json!("https://user:pw@collector.example.com/"),
            "user name or password",
        ),
        (json!(42), "trace_endpoint"),
    ] {
        let res = patch(&ada, bad.clone()).await;
        assert_eq!(res.status, 422, "{bad}");
        let problem = res.json();
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains("trace_endpoint") && detail.contains(says),
            "{bad}: {detail}"
        );
    }
    assert_eq!(
        patch(&bob, json!("https://evil.example.com/")).await.status,
        403
    );
    let shown = api.call("GET", &path, Some(&bob.access), None).await.json();
    assert_eq!(
        shown["trace_endpoint"], good,
        "refused changes changed nothing"
    );

    let res = patch(&ada, Value::Null).await;
    assert_eq!(res.status, 200);
    assert!(res.json()["trace_endpoint"].is_null());
}

#[tokio::test]
async fn a_large_batch_goes_in_requests_of_whole_traces_under_the_span_limit() {
    let collector = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let echo = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let api = api(None).await;
    let ada = api.register("ada").await;
    let p = project(&api, &ada, "Wide runs").await;
    export_to(&api, &ada, &p, &collector, ("otlp.api_key", "k")).await;
    let tool = tool(&api, &ada, &p, "echo", echo.url("/")).await;
    // 50 independent steps: 51 spans a run, so ten runs fill a request of 512 and the
    // eleventh needs another.
    let steps: Vec<Value> = (0..50)
        .map(|i| json!({"key": format!("s{i}"), "kind": "tool", "tool_id": tool, "input": {}}))
        .collect();
    let wf = create(
        &api,
        &ada,
        "/api/v1/workflows",
        json!({"project_id": p, "name": "wide", "definition": {"steps": steps}}),
    )
    .await;
    let mut runs = HashSet::new();
    for _ in 0..11 {
        let run = api.start_run(&ada.access, &json!(wf), json!({})).await;
        runs.insert(run["id"].as_str().unwrap().to_string());
    }
    for id in &runs {
        assert_eq!(
            api.finished_run(&ada.access, id).await["status"],
            "succeeded"
        );
    }
    // The exporter's own ticks may have sent some as they finished: send all again at once.
    crate::common::eventually(async || {
        let pending: i64 = api
            .env
            .db()
            .await
            .query_one(
                "select count(*) from trace_exports where status = 'pending'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (pending == 0).then_some(())
    })
    .await;
    let before = collector.received().len();
    api.env
        .db()
        .await
        .execute(
            "update trace_exports set status = 'pending', attempts = 0, exported_at = null,
                next_attempt_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    api.tick("exporter", now()).await;
    let sent = crate::common::eventually(async || {
        let r = collector.received();
        (r.len() >= before + 2).then_some(r)
    })
    .await;
    let requests = &sent[before..];
    assert_eq!(requests.len(), 2, "eleven runs in two requests");
    let mut seen = HashSet::new();
    for r in requests {
        let (_, spans) = parse_export(&r.body);
        assert!(spans.len() <= 512, "{} spans in one request", spans.len());
        let ids: HashSet<String> = spans.iter().map(|s| s.trace_id.clone()).collect();
        for id in ids {
            // Whole traces: every run's 51 spans travel together.
            assert_eq!(spans.iter().filter(|s| s.trace_id == id).count(), 51);
            assert!(seen.insert(id), "a run is sent once");
        }
    }
    let expected: HashSet<String> = runs.iter().map(|r| r.replace('-', "")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_project_whose_export_cannot_be_prepared_holds_up_no_other() {
    let broken = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let fine = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let echo = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let api = api(None).await;
    let ada = api.register("ada").await;
    let (a, b) = (
        project(&api, &ada, "Broken key").await,
        project(&api, &ada, "Fine").await,
    );
    export_to(&api, &ada, &a, &broken, ("otlp.api_key", "sealed-key-a")).await;
    export_to(&api, &ada, &b, &fine, ("otlp.api_key", "sealed-key-b")).await;
    // A's sealed key no longer opens (as after a master key was dropped too early).
    api.env
        .db()
        .await
        .execute(
            "update project_secrets set ciphertext = '\\x00112233'::bytea where project_id = $1",
            &[&uuid::Uuid::parse_str(&a).unwrap()],
        )
        .await
        .unwrap();
    let mut runs = HashMap::new();
    for p in [&a, &b] {
        let run = tool_run(&api, &ada, p, echo.url("/echo")).await;
        runs.insert(p.clone(), run);
    }
    let t0 = now();
    api.tick("exporter", t0).await;
    crate::common::eventually(async || (fine.received().len() == 1).then_some(())).await;
    assert_eq!(
        fine.received()[0].headers["authorization"],
        "Bearer sealed-key-b"
    );
    assert!(broken.received().is_empty());
    let run_a = api
        .finished_run(&ada.access, runs[&a]["id"].as_str().unwrap())
        .await;
    let export = &run_a["trace_export"];
    assert_eq!(
        export["status"], "pending",
        "retried, so its attempts run out"
    );
    assert!(export["attempts"].as_i64().unwrap() >= 1);
    assert!(
        export["last_error"]
            .as_str()
            .unwrap()
            .contains("could not be prepared")
    );
    assert!(api.guest_logs().contains("preparing a trace export"));
    assert!(!api.guest_logs().contains("sealed-key"));
}

#[tokio::test]
async fn a_tick_stops_starting_requests_after_its_budget_and_postpones_the_rest() {
    // Every request to this collector times out (10 s), so three fill a tick's 30 s.
    let slow = FakeServer::start(200, json!({}), Duration::from_secs(12)).await;
    let echo = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let api = api(None).await;
    let ada = api.register("ada").await;
    let mut projects = Vec::new();
    for i in 0..4 {
        let p = project(&api, &ada, &format!("Slow {i}")).await;
        tool_run(&api, &ada, &p, echo.url("/echo")).await;
        export_to(&api, &ada, &p, &slow, ("otlp.api_key", "k")).await;
        projects.push(p);
    }
    // The runs finished before their projects exported traces: queue them by hand, due an
    // hour from now, when only the test's own tick comes.
    let at = now() + 3600;
    api.env
        .db()
        .await
        .execute(
            "insert into trace_exports (run_id, project_id, next_attempt_at)
             select run_id, project_id, to_timestamp($1) from runs",
            &[&(at as f64)],
        )
        .await
        .unwrap();
    api.tick("exporter", at).await;
    assert_eq!(
        slow.received().len(),
        3,
        "no request starts after the budget"
    );
    let rows = api
        .env
        .db()
        .await
        .query(
            "select attempts, last_error, extract(epoch from next_attempt_at)::int8 - $1
             from trace_exports order by attempts",
            &[&at],
        )
        .await
        .unwrap();
    let rows: Vec<(i32, Option<String>, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // Postponed: no attempt counted, due at once.
    assert_eq!(rows[0], (0, None, 0));
    for (attempts, error, next) in &rows[1..] {
        assert_eq!(*attempts, 1);
        assert!(error.as_deref().unwrap().contains("timeout"), "{error:?}");
        assert!(*next >= 5, "retried after backoff");
    }
}
