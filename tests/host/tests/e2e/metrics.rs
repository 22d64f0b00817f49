//! The metrics APIs against runs whose numbers are known: made through the API, with a fake
//! OpenAI-compatible provider whose usage and a project price fix every token and cent.

use std::time::Duration;

use crate::common::{Api, FakeServer, User, openai};
use serde_json::{Value, json};

async fn project(api: &Api, name: &str) -> (User, String) {
    let who = api.register(name).await;
    let p = api.create_project(&who, json!({"name": name})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    (who, p)
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
    api.set_price(&who.access, &p, "fake/small", "1", "2").await;
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
            api.run_to_end(&who.access, &agent_wf, json!({})).await["status"],
            "succeeded"
        );
    }
    assert_eq!(
        api.run_to_end(&who.access, &tool_wf, json!({})).await["status"],
        "failed"
    );
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
    let api = Api::for_fakes(Some(&provider), &[]).await;
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

    // Per kind alone: the tools and models of a kind folded together.
    let kinds = report(&api, &ada, &format!("steps?project_id={p}&by=kind")).await;
    let mut by_kind: Vec<(String, Value, Value)> = kinds["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert!(
                i.get("tool_id").is_none() && i.get("model").is_none(),
                "{i}"
            );
            (
                i["kind"].as_str().unwrap().to_string(),
                i["count"].clone(),
                i["by_status"].clone(),
            )
        })
        .collect();
    by_kind.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(by_kind[0].0, "agent");
    assert_eq!(by_kind[0].1, json!(3));
    assert_eq!(
        by_kind[1],
        ("tool".to_string(), json!(1), json!({"failed": 1}))
    );
    let bad = api
        .call(
            "GET",
            &format!("/api/v1/metrics/steps?project_id={p}&by=model"),
            Some(&ada.access),
            None,
        )
        .await;
    assert_eq!(bad.status, 422);

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

type Samples = std::collections::BTreeMap<(String, Vec<(String, String)>), f64>;

/// A strict reader of the Prometheus text exposition format (0.0.4): `# HELP` and `# TYPE`
/// lines, each sample after its family's `# TYPE` and named for it (histograms' `_bucket`,
/// `_sum`, `_count`), valid metric and label names, quoted label values with escapes, float
/// values; histogram buckets rise with `le` up to `+Inf`, which equals `_count`.
fn parse_prometheus(text: &str) -> Samples {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut types: std::collections::HashMap<String, String> = Default::default();
    let mut samples = Samples::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, tail) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap_or(""),
            );
            assert!(valid_name(name), "bad family name in {line:?}");
            match kind {
                "HELP" => assert!(!tail.is_empty()),
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&tail),
                        "{line:?}"
                    );
                    assert!(
                        types.insert(name.to_string(), tail.to_string()).is_none(),
                        "{name} typed twice"
                    );
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let (name_labels, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels, Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels = Vec::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    assert!(
                        valid_name(&key) && !key.contains(':'),
                        "bad label name in {line:?}"
                    );
                    assert_eq!(chars.next(), Some('"'), "unquoted label value in {line:?}");
                    let mut value = String::new();
                    loop {
                        match chars
                            .next()
                            .unwrap_or_else(|| panic!("unterminated value in {line:?}"))
                        {
                            '\\' => match chars.next() {
                                Some('n') => value.push('\n'),
                                Some(c @ ('\\' | '"')) => value.push(c),
                                other => panic!("bad escape {other:?} in {line:?}"),
                            },
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.push((key, value));
                    match chars.next() {
                        None => break,
                        Some(',') => {}
                        other => panic!("expected , or }} not {other:?} in {line:?}"),
                    }
                }
                (name, labels)
            }
        };
        assert!(valid_name(name), "bad metric name in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} has no # TYPE before it");
        assert!(
            samples.insert((name.to_string(), labels), value).is_none(),
            "duplicate sample {line:?}"
        );
    }
    // Histograms: cumulative buckets ending at +Inf = _count.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let bucket = format!("{family}_bucket");
        let series: std::collections::BTreeSet<Vec<(String, String)>> = samples
            .keys()
            .filter(|(n, _)| *n == bucket)
            .map(|(_, l)| l.iter().filter(|(k, _)| k != "le").cloned().collect())
            .collect();
        for labels in series {
            let mut buckets: Vec<(f64, f64)> = samples
                .iter()
                .filter(|((n, l), _)| {
                    *n == bucket
                        && l.iter()
                            .filter(|(k, _)| k != "le")
                            .cloned()
                            .collect::<Vec<_>>()
                            == labels
                })
                .map(|((_, l), v)| {
                    let le = &l.iter().find(|(k, _)| k == "le").unwrap().1;
                    (
                        if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().unwrap()
                        },
                        *v,
                    )
                })
                .collect();
            buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family} buckets fall"
            );
            assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
            assert_eq!(
                Some(&buckets.last().unwrap().1),
                samples.get(&(format!("{family}_count"), labels.clone()))
            );
        }
    }
    samples
}

fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let key = (
        name.to_string(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>(),
    );
    samples.get(&key).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn the_prometheus_endpoint_parses_and_its_counters_move_as_runs_happen() {
    let provider = FakeServer::answering(vec![openai::text("ok", 100, 50)], Duration::ZERO).await;
    let api = Api::for_fakes(
        Some(&provider),
        &[("SPIN_VARIABLE_METRICS_TOKEN", "operator-token-123")],
    )
    .await;
    let scrape = || async {
        let res = crate::common::request(
            "GET",
            &api.app.url("/metrics"),
            &[("authorization", "Bearer operator-token-123")],
            None,
        )
        .await;
        assert_eq!(res.status, 200);
        assert!(
            res.header("content-type")
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        parse_prometheus(std::str::from_utf8(&res.body).unwrap())
    };
    // Operators only.
    assert_eq!(
        crate::common::request("GET", &api.app.url("/metrics"), &[], None)
            .await
            .status,
        401
    );
    assert_eq!(
        crate::common::request(
            "GET",
            &api.app.url("/metrics"),
            &[("authorization", "Bearer operator-token-124")],
            None
        )
        .await
        .status,
        401
    );
    let before = scrape().await;
    known_runs(&api, "ada").await;
    let after = scrape().await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(moved("sparkops_runs_started_total", &[]), 4.0);
    assert_eq!(
        moved("sparkops_runs_finished_total", &[("status", "succeeded")]),
        3.0
    );
    assert_eq!(
        moved("sparkops_runs_finished_total", &[("status", "failed")]),
        1.0
    );
    assert_eq!(
        moved(
            "sparkops_model_tokens_total",
            &[("model", "fake/small"), ("direction", "in")]
        ),
        300.0
    );
    assert_eq!(
        moved(
            "sparkops_model_tokens_total",
            &[("model", "fake/small"), ("direction", "out")]
        ),
        150.0
    );
    assert!(
        (moved("sparkops_model_cost_usd_total", &[("model", "fake/small")]) - 0.0006).abs() < 1e-9
    );
    assert_eq!(
        moved("sparkops_step_duration_seconds_count", &[("kind", "agent")]),
        3.0
    );
    assert_eq!(
        moved("sparkops_step_duration_seconds_count", &[("kind", "tool")]),
        1.0
    );
    assert_eq!(value(&after, "sparkops_ready_steps", &[]), 0.0);
    assert_eq!(
        value(&after, "sparkops_runs_active", &[("status", "running")]),
        0.0
    );
}
