//! Agents that stream: a fake OpenAI-compatible provider on loopback that answers
//! `stream: true` with `chat.completion.chunk` events as the API documents them (text
//! deltas, then a usage chunk when `stream_options.include_usage` asks, then `[DONE]`),
//! holding the rest of its answer until the test lets it go, so what a subscriber of the
//! run's event stream sees before the step ends is checked without any timing.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::common::{Api, OPEN_URL_RULES, SseEvent, read_sse};

/// A streaming provider: the n-th request gets the n-th script; each answer sends its
/// first deltas, waits for a permit of `gate`, then sends the rest.
pub(crate) struct StreamingProvider {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) gate: Arc<Semaphore>,
    requests: Arc<Mutex<Vec<Value>>>,
}

pub(crate) struct Script {
    pub(crate) before: Vec<&'static str>,
    pub(crate) after: Vec<&'static str>,
    /// `(prompt, completion)` tokens of the final usage chunk, when it is sent.
    pub(crate) usage: Option<(u64, u64)>,
}

fn chunk(delta: Value) -> String {
    let c = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_767_000_000,
        "model": "fake-model", "choices": [{"index": 0, "delta": delta, "finish_reason": null}]});
    format!("data: {c}\n\n")
}

impl StreamingProvider {
    pub(crate) async fn start(scripts: Vec<Script>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Semaphore::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let scripts = Arc::new(scripts);
        let (g, r) = (gate.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (gate, requests, scripts) = (g.clone(), r.clone(), scripts.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (gate, requests, scripts) =
                                (gate.clone(), requests.clone(), scripts.clone());
                            async move {
                                let body = req.into_body().collect().await?.to_bytes();
                                let body: Value = serde_json::from_slice(&body).unwrap();
                                let n = {
                                    let mut log = requests.lock().unwrap();
                                    log.push(body.clone());
                                    log.len() - 1
                                };
                                let script = &scripts[n.min(scripts.len() - 1)];
                                let first: String = std::iter::once(chunk(
                                    json!({"role": "assistant", "content": ""}),
                                ))
                                .chain(script.before.iter().map(|t| chunk(json!({"content": t}))))
                                .collect();
                                let mut rest: String = script
                                    .after
                                    .iter()
                                    .map(|t| chunk(json!({"content": t})))
                                    .collect();
                                rest += &format!(
                                    "data: {}\n\n",
                                    json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                                );
                                let wants_usage = body["stream_options"]["include_usage"] == true;
                                if let (Some((p, c)), true) = (script.usage, wants_usage) {
                                    rest += &format!(
                                        "data: {}\n\n",
                                        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                        "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
                                    );
                                }
                                rest += "data: [DONE]\n\n";
                                let later = async move {
                                    gate.acquire().await.unwrap().forget();
                                    Ok::<_, Infallible>(Frame::data(Bytes::from(rest)))
                                };
                                let frames = futures::StreamExt::chain(
                                    futures::stream::once(async move {
                                        Ok::<_, Infallible>(Frame::data(Bytes::from(first)))
                                    }),
                                    futures::stream::once(later),
                                );
                                let mut res =
                                    http::Response::new(BodyExt::boxed(StreamBody::new(frames)));
                                res.headers_mut()
                                    .insert("content-type", "text/event-stream".parse().unwrap());
                                Ok::<_, hyper::Error>(res)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            gate,
            requests,
        }
    }
}

#[tokio::test]
async fn a_streaming_agent_shows_its_text_live_and_records_usage_from_the_final_chunk_or_an_estimate()
 {
    let provider = StreamingProvider::start(vec![
        Script {
            before: vec!["Leases ", "are "],
            after: vec!["renewed ", "by heartbeats."],
            usage: Some((120, 9)),
        },
        // A provider that never sends usage, whatever it is asked.
        Script {
            before: vec!["No "],
            after: vec!["usage here."],
            usage: None,
        },
    ])
    .await;
    let providers = format!("fake=http://{}/v1", provider.addr);
    let mut vars = OPEN_URL_RULES.to_vec();
    vars.push(("SPIN_VARIABLE_MODEL_PROVIDERS", &providers));
    vars.push(("SPIN_VARIABLE_MODEL_PROVIDER_KEYS", "fake=sk-app-key"));
    let api = Api::start_with(&vars).await;
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Streams"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.set_price(&ada.access, &p, "fake/small", "2", "8").await;
    let budget = api
        .create(
            &ada.access,
            "/api/v1/policies",
            json!({"project_id": p, "name": "watch", "rules": {"budget": {"limit_usd": "100", "window": "day", "action": "alert"}}}),
        )
        .await;
    assert!(budget["id"].is_string());
    let agent = api
        .create(
            &ada.access,
            "/api/v1/agents",
            json!({"project_id": p, "name": "streamer", "model": "fake/small", "system_prompt": "Be brief.", "stream": true}),
        )
        .await;
    assert_eq!(agent["stream"], true);
    let wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "w", "definition": {"steps": [
                {"key": "say", "kind": "agent", "agent_id": agent["id"], "input": "{{ input.q }}", "retry": {"max_attempts": 1}}]}}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();

    let run = api
        .start_run(&ada.access, &json!(wf), json!({"q": "How?"}))
        .await;
    let id = run["id"].as_str().unwrap().to_string();
    let url = api.app.url(&format!("/api/v1/runs/{id}/events"));
    let auth = format!("Bearer {}", ada.access);
    // The provider holds the rest of its answer: what a subscriber sees now came while
    // the step was still running.
    let live = read_sse(&url, &[("authorization", &auth)], |events| {
        events.iter().any(|e| e.event == "step.delta")
    })
    .await;
    assert!(!live.ended);
    let deltas: Vec<&SseEvent> = live
        .events
        .iter()
        .filter(|e| e.event == "step.delta")
        .collect();
    assert!(
        deltas
            .iter()
            .all(|e| e.id.is_empty() && e.data["step"] == "say")
    );
    let seen: String = deltas
        .iter()
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect();
    assert!(
        !seen.is_empty() && "Leases are ".starts_with(&seen),
        "only what the provider has sent: {seen:?}"
    );
    let steps = api
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/steps"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(steps["items"][0]["status"], "running");
    provider.gate.add_permits(1);
    let run = api.finished_run(&ada.access, &id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"]["say"], "Leases are renewed by heartbeats.");
    // The request asked for the stream and its usage.
    let asked = provider.requests.lock().unwrap()[0].clone();
    assert_eq!(asked["stream"], true);
    assert_eq!(asked["stream_options"]["include_usage"], true);
    // Usage from the final chunk: 120 * 2 + 9 * 8 = 312 micro-dollars.
    assert_eq!(
        (
            &run["tokens_in"],
            &run["tokens_out"],
            &run["cost_usd"],
            &run["unpriced_calls"]
        ),
        (&json!(120), &json!(9), &json!("0.000312"), &json!(0))
    );
    // The deltas were a live view: the run's log holds the call, not its pieces.
    let db = api.env.db().await;
    let stored = crate::common::count(
        &db,
        &format!("select count(*) from run_events where run_id = '{id}' and kind = 'step.delta'"),
    )
    .await;
    assert_eq!(stored, 0);
    let replay = read_sse(&url, &[("authorization", &auth)], |_| false).await;
    assert!(replay.ended);
    assert!(replay.events.iter().all(|e| e.event != "step.delta"));
    assert!(replay.events.iter().any(|e| e.event == "model.called"));

    // A stream without its usage chunk: tokens estimated, the call unpriced (never $0),
    // and the budget charged the estimate's price.
    provider.gate.add_permits(1);
    let run = api
        .run_to_end(&ada.access, &wf, json!({"q": "Again?"}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"]["say"], "No usage here.");
    assert_eq!(
        (&run["cost_usd"], &run["unpriced_calls"]),
        (&json!("0.000000"), &json!(1))
    );
    assert!(run["tokens_in"].as_i64().unwrap() > 0 && run["tokens_out"].as_i64().unwrap() > 0);
    let events = api.run_items(&ada.access, &run, "events").await;
    let called = events.iter().find(|e| e["kind"] == "model.called").unwrap();
    assert_eq!(called["data"]["usage"], "estimated");
    assert_eq!(called["data"]["cost_usd"], Value::Null);
    let estimated = called["data"]["estimated_cost_usd"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(estimated, "0.000000");
    assert_eq!(
        run["estimated_usd"],
        json!(estimated),
        "the run keeps the estimate apart"
    );
    let usage = api
        .call(
            "GET",
            &format!("/api/v1/policies/usage?project_id={p}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    let spent = usage["items"][0]["spent_usd"].as_str().unwrap();
    let expected = rust_decimal::Decimal::from_str_exact("0.000312").unwrap()
        + rust_decimal::Decimal::from_str_exact(&estimated).unwrap();
    assert_eq!(
        rust_decimal::Decimal::from_str_exact(spent).unwrap(),
        expected,
        "the budget counts the reported call and the estimate"
    );
}
