//! A finished run as an OpenTelemetry trace, in the OTLP/HTTP JSON encoding that LangWatch
//! (`/api/otel/v1/traces`), Langfuse, Jaeger and OpenTelemetry collectors accept.
//!
//! The trace id is the run id; span ids are derived from the run id and the span's place in
//! the run, so sending a trace twice (an export retried after a lost answer) sends the same
//! spans, which backends de-duplicate. One root span covers the run; under it, one span per
//! step that started; under an agent step, one span per model call and per tool call, from
//! the run's `model.called` and `tool.called` events. Attributes follow the OpenTelemetry
//! GenAI semantic conventions (`gen_ai.*`), plus `sparkops.*` for what they do not name
//! (cost, run and step identity). No inputs, outputs or secrets are exported.

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::llm::split_model;
use crate::money::Usd;

/// An attribute value (OTLP `AnyValue`, the scalar kinds).
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
}

impl Attr {
    fn json(&self) -> Value {
        match self {
            Attr::Str(s) => json!({"stringValue": s}),
            // The protobuf JSON mapping writes 64-bit integers as strings.
            Attr::Int(i) => json!({"intValue": i.to_string()}),
            Attr::Double(d) => json!({"doubleValue": d}),
            Attr::Bool(b) => json!({"boolValue": b}),
        }
    }
}

impl From<&str> for Attr {
    fn from(s: &str) -> Self {
        Attr::Str(s.to_string())
    }
}

impl From<String> for Attr {
    fn from(s: String) -> Self {
        Attr::Str(s)
    }
}

impl From<i64> for Attr {
    fn from(i: i64) -> Self {
        Attr::Int(i)
    }
}

/// `SpanKind` of the OTLP protocol.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Internal = 1,
    Client = 3,
}

/// A span's outcome (`Status`): unset, ok, or an error with its message.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Unset,
    Ok,
    Error(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// 16 hex digits.
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub kind: Kind,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub attributes: Vec<(&'static str, Attr)>,
    pub status: Status,
}

/// One run's spans under its trace id (32 hex digits).
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub trace_id: String,
    pub spans: Vec<Span>,
}

/// The trace id of a run: its UUID's 32 hex digits, so a run is found by its id.
pub fn trace_id(run_id: &str) -> String {
    run_id.replace('-', "").to_ascii_lowercase()
}

/// A span id that depends only on the run and the span's place in it (`path`); never all
/// zeros (an invalid id in OTLP).
pub fn span_id(run_id: &str, path: &str) -> String {
    let digest = Sha256::new()
        .chain_update(run_id.as_bytes())
        .chain_update([0])
        .chain_update(path.as_bytes())
        .finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    crate::ids::hex(&id)
}

fn nanos(t: DateTime<Utc>) -> String {
    // Times before 1970 or after 2262 do not occur in a run; clamp rather than fail.
    t.timestamp_nanos_opt()
        .unwrap_or_default()
        .max(0)
        .to_string()
}

fn attributes(attrs: &[(&str, Attr)]) -> Value {
    Value::Array(
        attrs
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v.json()}))
            .collect(),
    )
}

impl Span {
    fn json(&self, trace_id: &str) -> Value {
        let mut span = json!({
            "traceId": trace_id,
            "spanId": self.span_id,
            "name": self.name,
            "kind": self.kind as i32,
            "startTimeUnixNano": nanos(self.start),
            "endTimeUnixNano": nanos(self.end.max(self.start)),
            "attributes": attributes(&self.attributes),
            "status": match &self.status {
                Status::Unset => json!({}),
                Status::Ok => json!({"code": 1}),
                Status::Error(message) => json!({"code": 2, "message": message}),
            },
        });
        if let Some(parent) = &self.parent_span_id {
            span["parentSpanId"] = json!(parent);
        }
        span
    }
}

/// The body of `POST /v1/traces` (`ExportTraceServiceRequest`) for one project's traces.
pub fn export_request(project_id: &str, traces: &[Trace]) -> Value {
    let spans: Vec<Value> = traces
        .iter()
        .flat_map(|t| t.spans.iter().map(|s| s.json(&t.trace_id)))
        .collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": attributes(&[
                ("service.name", "sparkops".into()),
                ("service.version", env!("CARGO_PKG_VERSION").into()),
                ("sparkops.project_id", project_id.into()),
            ])},
            "scopeSpans": [{
                "scope": {"name": "sparkops", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    })
}

// ---- A run as a trace --------------------------------------------------------------------

/// A finished run, as the trace needs it.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub run_id: String,
    pub project_id: String,
    /// The user who started it (a person or an API key's creator); none for schedules.
    pub created_by: Option<String>,
    /// The runs it belongs with: its schedule's, its trigger's, or its retry chain's first
    /// run's id (its own when it is none of these).
    pub session_id: String,
    pub workflow_id: String,
    pub workflow_name: String,
    pub workflow_version: i64,
    pub status: String,
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub cost_usd: Usd,
    pub unpriced_calls: i64,
    pub schedule_id: Option<String>,
    pub retry_of: Option<String>,
}

/// A step that started.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub key: String,
    pub kind: String,
    pub status: String,
    pub attempt: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub cost_usd: Option<Usd>,
    pub error: Option<Value>,
    pub agent: Option<(String, String)>,
    pub tool: Option<(String, String)>,
    pub model: Option<String>,
}

/// A `model.called` or `tool.called` event of the run.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub seq: i64,
    pub step_key: String,
    pub kind: String,
    /// When the event was recorded: the end of the call.
    pub at: DateTime<Utc>,
    pub data: Value,
}

fn usd(u: Usd) -> Attr {
    Attr::Double(u.to_fixed().parse().unwrap_or(0.0))
}

fn error_of(error: &Option<Value>, fallback: &str) -> (Status, Option<String>) {
    let kind = error
        .as_ref()
        .and_then(|e| e["kind"].as_str())
        .map(str::to_string);
    let message = error
        .as_ref()
        .and_then(|e| e["message"].as_str())
        .unwrap_or(fallback)
        .to_string();
    (Status::Error(message), kind)
}

fn run_span(run: &RunRecord) -> Span {
    let mut attrs: Vec<(&'static str, Attr)> = vec![
        ("sparkops.run_id", run.run_id.as_str().into()),
        ("sparkops.workflow_id", run.workflow_id.as_str().into()),
        ("sparkops.workflow_version", run.workflow_version.into()),
        ("sparkops.run.status", run.status.as_str().into()),
        ("gen_ai.operation.name", "invoke_workflow".into()),
        ("gen_ai.usage.input_tokens", run.tokens_in.into()),
        ("gen_ai.usage.output_tokens", run.tokens_out.into()),
        ("sparkops.cost_usd", usd(run.cost_usd)),
        ("sparkops.unpriced_calls", run.unpriced_calls.into()),
        ("langwatch.span.type", "workflow".into()),
    ];
    if let Some(s) = &run.schedule_id {
        attrs.push(("sparkops.schedule_id", s.as_str().into()));
    }
    if let Some(r) = &run.retry_of {
        attrs.push(("sparkops.retry_of", r.as_str().into()));
    }
    let status = match run.status.as_str() {
        "succeeded" => Status::Ok,
        "cancelled" => Status::Unset,
        other => {
            let (status, kind) = error_of(&run.error, other);
            attrs.push(("error.type", kind.unwrap_or_else(|| other.into()).into()));
            status
        }
    };
    Span {
        span_id: span_id(&run.run_id, "run"),
        parent_span_id: None,
        name: format!("workflow {}", run.workflow_name),
        kind: Kind::Internal,
        start: run.created_at,
        end: run.finished_at,
        attributes: attrs,
        status,
    }
}

fn step_span(run: &RunRecord, root: &str, step: &StepRecord) -> Span {
    let mut attrs: Vec<(&'static str, Attr)> = vec![
        ("sparkops.step.key", step.key.as_str().into()),
        ("sparkops.step.kind", step.kind.as_str().into()),
        ("sparkops.step.status", step.status.as_str().into()),
        ("sparkops.step.attempt", step.attempt.into()),
    ];
    let name = match (&step.agent, &step.tool) {
        (Some((id, name)), _) if step.kind == "agent" => {
            attrs.extend([
                ("gen_ai.operation.name", "invoke_agent".into()),
                ("gen_ai.agent.id", id.as_str().into()),
                ("gen_ai.agent.name", name.as_str().into()),
                ("gen_ai.usage.input_tokens", step.tokens_in.into()),
                ("gen_ai.usage.output_tokens", step.tokens_out.into()),
                ("langwatch.span.type", "agent".into()),
            ]);
            if let Some(model) = &step.model {
                attrs.push(("gen_ai.request.model", model_name(model).into()));
            }
            if let Some(cost) = step.cost_usd {
                attrs.push(("sparkops.cost_usd", usd(cost)));
            }
            format!("invoke_agent {name}")
        }
        (_, Some((id, name))) if step.kind == "tool" => {
            attrs.extend([
                ("gen_ai.operation.name", "execute_tool".into()),
                ("gen_ai.tool.name", name.as_str().into()),
                ("sparkops.tool_id", id.as_str().into()),
                ("langwatch.span.type", "tool".into()),
            ]);
            format!("execute_tool {name}")
        }
        _ => format!("{} {}", step.kind, step.key),
    };
    let status = match step.status.as_str() {
        "succeeded" => Status::Ok,
        "failed" => {
            let (status, kind) = error_of(&step.error, "failed");
            attrs.push(("error.type", kind.unwrap_or_else(|| "failed".into()).into()));
            status
        }
        _ => Status::Unset,
    };
    Span {
        span_id: span_id(&run.run_id, &format!("step/{}", step.key)),
        parent_span_id: Some(root.to_string()),
        name,
        kind: Kind::Internal,
        start: step.started_at,
        end: step.finished_at.unwrap_or(run.finished_at),
        attributes: attrs,
        status,
    }
}

/// The model part of `provider/model`.
fn model_name(model: &str) -> &str {
    split_model(model).map_or(model, |(_, m)| m)
}

fn call_span(run: &RunRecord, parent: &str, call: &CallRecord) -> Option<Span> {
    let d = &call.data;
    let took = Duration::milliseconds(d["duration_ms"].as_i64().unwrap_or(0).max(0));
    let (name, attrs, status) = match call.kind.as_str() {
        "model.called" => {
            let model = d["model"].as_str().unwrap_or_default();
            let (provider, name) = split_model(model).unwrap_or(("unknown", model));
            let mut attrs: Vec<(&'static str, Attr)> = vec![
                ("gen_ai.operation.name", "chat".into()),
                ("gen_ai.provider.name", provider.into()),
                ("gen_ai.system", provider.into()),
                ("gen_ai.request.model", name.into()),
                (
                    "gen_ai.usage.input_tokens",
                    d["tokens_in"].as_i64().unwrap_or(0).into(),
                ),
                (
                    "gen_ai.usage.output_tokens",
                    d["tokens_out"].as_i64().unwrap_or(0).into(),
                ),
                (
                    "sparkops.iteration",
                    d["iteration"].as_i64().unwrap_or(0).into(),
                ),
                ("langwatch.span.type", "llm".into()),
            ];
            match d["cost_usd"].as_str().map(Usd::parse) {
                Some(Ok(cost)) => attrs.push(("sparkops.cost_usd", usd(cost))),
                _ => attrs.push(("sparkops.unpriced", Attr::Bool(true))),
            }
            (format!("chat {name}"), attrs, Status::Ok)
        }
        "tool.called" => {
            let tool = d["tool"].as_str().unwrap_or_default();
            let mut attrs: Vec<(&'static str, Attr)> = vec![
                ("gen_ai.operation.name", "execute_tool".into()),
                ("gen_ai.tool.name", tool.into()),
                ("langwatch.span.type", "tool".into()),
            ];
            if let Some(id) = d["call_id"].as_str() {
                attrs.push(("gen_ai.tool.call.id", id.into()));
            }
            if let Some(code) = d["status"].as_i64() {
                attrs.push(("http.response.status_code", code.into()));
            }
            let status = if d["ok"] == true {
                Status::Ok
            } else {
                let message = d["error"]["message"]
                    .as_str()
                    .or(d["error"].as_str())
                    .unwrap_or("the tool call failed");
                Status::Error(message.to_string())
            };
            (format!("execute_tool {tool}"), attrs, status)
        }
        _ => return None,
    };
    Some(Span {
        span_id: span_id(&run.run_id, &format!("event/{}", call.seq)),
        parent_span_id: Some(parent.to_string()),
        name,
        kind: Kind::Client,
        start: call.at - took,
        end: call.at,
        attributes: attrs,
        status,
    })
}

/// What every span of a run's trace carries, not only the root: Langfuse (v4) aggregates
/// and filters observations by the attributes each one has (user, session, trace name and
/// metadata), and other backends read the plain `user.id` and `session.id`.
fn trace_attributes(run: &RunRecord) -> Vec<(&'static str, Attr)> {
    let mut attrs: Vec<(&'static str, Attr)> = vec![
        ("session.id", run.session_id.as_str().into()),
        ("langfuse.session.id", run.session_id.as_str().into()),
        (
            "langfuse.trace.name",
            format!("workflow {}", run.workflow_name).into(),
        ),
        (
            "langfuse.trace.metadata.project_id",
            run.project_id.as_str().into(),
        ),
        (
            "langfuse.trace.metadata.workflow_id",
            run.workflow_id.as_str().into(),
        ),
        ("langfuse.trace.metadata.run_id", run.run_id.as_str().into()),
        ("sparkops.project_id", run.project_id.as_str().into()),
    ];
    if let Some(user) = &run.created_by {
        attrs.push(("user.id", user.as_str().into()));
        attrs.push(("langfuse.user.id", user.as_str().into()));
    }
    attrs
}

/// The run's trace: its root span, its steps' spans, their calls' spans.
pub fn run_trace(run: &RunRecord, steps: &[StepRecord], calls: &[CallRecord]) -> Trace {
    let root = run_span(run);
    let mut spans = vec![];
    for step in steps {
        let span = step_span(run, &root.span_id, step);
        for call in calls.iter().filter(|c| c.step_key == step.key) {
            spans.extend(call_span(run, &span.span_id, call));
        }
        spans.push(span);
    }
    spans.insert(0, root);
    let shared = trace_attributes(run);
    for span in &mut spans {
        span.attributes.extend(shared.iter().cloned());
    }
    Trace {
        trace_id: trace_id(&run.run_id),
        spans,
    }
}

/// Traces grouped, in order, into requests of at most `max_spans` spans; a trace larger than
/// that goes alone. A trace is never split, so each request's outcome is its runs' outcome.
pub fn requests<K>(traces: Vec<(K, Trace)>, max_spans: usize) -> Vec<Vec<(K, Trace)>> {
    let mut requests: Vec<Vec<(K, Trace)>> = Vec::new();
    let mut spans = 0;
    for (key, trace) in traces {
        let n = trace.spans.len();
        match requests.last_mut() {
            Some(last) if spans + n <= max_spans => {
                spans += n;
                last.push((key, trace));
            }
            _ => {
                spans = n;
                requests.push(vec![(key, trace)]);
            }
        }
    }
    requests
}

/// Whether an exporter should try again after the collector answered `status`, per the
/// OTLP/HTTP specification (429, 502, 503 and 504 are transient; any other error is not).
pub fn retryable(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        crate::time::parse_rfc3339(s).unwrap()
    }

    fn run() -> RunRecord {
        RunRecord {
            run_id: "0190f5c2-1111-7000-8000-000000000001".into(),
            project_id: "proj".into(),
            created_by: Some("user-1".into()),
            session_id: "sched-1".into(),
            workflow_id: "wf".into(),
            workflow_name: "triage".into(),
            workflow_version: 2,
            status: "failed".into(),
            error: Some(json!({"kind": "provider-error", "message": "boom"})),
            created_at: at("2026-01-01T00:00:00Z"),
            finished_at: at("2026-01-01T00:00:05Z"),
            tokens_in: 30,
            tokens_out: 12,
            cost_usd: Usd::parse("0.000123").unwrap(),
            unpriced_calls: 0,
            schedule_id: None,
            retry_of: None,
        }
    }

    fn step(key: &str) -> StepRecord {
        StepRecord {
            key: key.into(),
            kind: "agent".into(),
            status: "succeeded".into(),
            attempt: 1,
            started_at: at("2026-01-01T00:00:01Z"),
            finished_at: Some(at("2026-01-01T00:00:04Z")),
            tokens_in: 30,
            tokens_out: 12,
            cost_usd: Some(Usd::parse("0.000123").unwrap()),
            error: None,
            agent: Some(("a1".into(), "writer".into())),
            tool: None,
            model: Some("openai/gpt-4o-mini".into()),
        }
    }

    fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
        &span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == key)
            .unwrap_or_else(|| panic!("no attribute {key}"))["value"]
    }

    #[test]
    fn ids_are_hex_of_the_right_length_and_stable() {
        let r = run();
        assert_eq!(trace_id(&r.run_id), "0190f5c2111170008000000000000001");
        let a = span_id(&r.run_id, "step/a");
        assert_eq!(a.len(), 16);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(a, span_id(&r.run_id, "step/a"));
        assert_ne!(a, span_id(&r.run_id, "step/b"));
        assert_ne!(a, span_id("0190f5c2-1111-7000-8000-000000000002", "step/a"));
    }

    #[test]
    fn a_run_becomes_a_root_with_steps_and_calls_under_it() {
        let r = run();
        let calls = [CallRecord {
            seq: 4,
            step_key: "a".into(),
            kind: "model.called".into(),
            at: at("2026-01-01T00:00:03Z"),
            data: json!({"model": "openai/gpt-4o-mini", "duration_ms": 1500, "tokens_in": 30,
                "tokens_out": 12, "cost_usd": "0.000123", "iteration": 1}),
        }];
        let trace = run_trace(&r, &[step("a")], &calls);
        let body = export_request("p1", &[trace]);
        let spans = body["resourceSpans"][0]["scopeSpans"][0]["spans"]
            .as_array()
            .unwrap();
        assert_eq!(spans.len(), 3);
        let (root, call, step) = (&spans[0], &spans[1], &spans[2]);
        assert!(root.get("parentSpanId").is_none());
        assert_eq!(step["parentSpanId"], root["spanId"]);
        assert_eq!(call["parentSpanId"], step["spanId"]);
        assert_eq!(root["status"], json!({"code": 2, "message": "boom"}));
        assert_eq!(
            attr(root, "error.type"),
            &json!({"stringValue": "provider-error"})
        );
        assert_eq!(root["startTimeUnixNano"], "1767225600000000000");
        assert_eq!(call["startTimeUnixNano"], "1767225601500000000");
        assert_eq!(call["endTimeUnixNano"], "1767225603000000000");
        assert_eq!(call["name"], "chat gpt-4o-mini");
        assert_eq!(call["kind"], 3);
        assert_eq!(
            attr(call, "gen_ai.usage.input_tokens"),
            &json!({"intValue": "30"})
        );
        assert_eq!(
            attr(call, "sparkops.cost_usd"),
            &json!({"doubleValue": 0.000123})
        );
        assert_eq!(
            attr(call, "gen_ai.provider.name"),
            &json!({"stringValue": "openai"})
        );
        assert_eq!(step["name"], "invoke_agent writer");
        assert_eq!(step["status"], json!({"code": 1}));
        // The trace's user, session, name and project on every span, not only the root.
        for span in spans {
            for (key, value) in [
                ("user.id", "user-1"),
                ("langfuse.user.id", "user-1"),
                ("session.id", "sched-1"),
                ("langfuse.session.id", "sched-1"),
                ("langfuse.trace.name", "workflow triage"),
                ("langfuse.trace.metadata.project_id", "proj"),
            ] {
                assert_eq!(attr(span, key), &json!({"stringValue": value}), "{key}");
            }
        }
        let unattributed = RunRecord {
            created_by: None,
            ..run()
        };
        let trace = run_trace(&unattributed, &[], &[]);
        assert!(
            trace.spans[0]
                .attributes
                .iter()
                .all(|(k, _)| !k.ends_with("user.id")),
            "no user, no user attributes"
        );
    }

    #[test]
    fn an_unpriced_call_says_so_instead_of_costing_zero() {
        let r = run();
        let calls = [CallRecord {
            seq: 1,
            step_key: "a".into(),
            kind: "model.called".into(),
            at: at("2026-01-01T00:00:03Z"),
            data: json!({"model": "local/llama", "duration_ms": 10, "tokens_in": 1,
                "tokens_out": 1, "cost_usd": null}),
        }];
        let trace = run_trace(&r, &[step("a")], &calls);
        let call = &trace.spans[1];
        assert!(
            call.attributes
                .contains(&("sparkops.unpriced", Attr::Bool(true)))
        );
        assert!(
            !call
                .attributes
                .iter()
                .any(|(k, _)| *k == "sparkops.cost_usd")
        );
    }

    #[test]
    fn requests_hold_whole_traces_up_to_the_span_limit() {
        let trace = |n: usize| Trace {
            trace_id: "t".into(),
            spans: vec![run_span(&run()); n],
        };
        let sizes = |reqs: Vec<Vec<(usize, Trace)>>| -> Vec<Vec<usize>> {
            reqs.into_iter()
                .map(|r| r.into_iter().map(|(k, _)| k).collect())
                .collect()
        };
        let traces = vec![
            (0, trace(3)),
            (1, trace(2)),
            (2, trace(1)),
            (3, trace(9)),
            (4, trace(4)),
        ];
        // 3+2+1 fit in 6; 9 is alone though over the limit; then 4.
        assert_eq!(
            sizes(requests(traces, 6)),
            vec![vec![0, 1, 2], vec![3], vec![4]]
        );
        assert!(requests(Vec::<(usize, Trace)>::new(), 6).is_empty());
    }

    #[test]
    fn only_transient_answers_are_retried() {
        for s in [429, 502, 503, 504] {
            assert!(retryable(s), "{s}");
        }
        for s in [400, 401, 403, 404, 413, 500] {
            assert!(!retryable(s), "{s}");
        }
    }
}
