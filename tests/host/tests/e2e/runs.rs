//! The runs API end to end: starting a run (input checked against the workflow's schema,
//! the version pinned, idempotent), listing and reading runs with their steps and event
//! log, cancelling, and the nudge each start publishes. Execution is the orchestrator's.

use crate::common::{Api, User};
use futures::StreamExt;
use serde_json::json;

/// A project with a two-step workflow whose input needs a `city`.
async fn workflow(api: &Api) -> (User, String, String) {
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Runs"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "W",
                "input_schema": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}},
                "definition": {"steps": [
                    {"key": "shape", "kind": "condition", "input": {"city": "{{ input.city }}"}},
                    {"key": "done", "kind": "condition", "depends_on": ["shape"], "input": {}}
                ]}}),
        )
        .await;
    (ada, p, wf["id"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn a_run_starts_queued_with_its_steps_pinned_version_and_first_event() {
    let api = Api::start().await;
    let (ada, _, wf) = workflow(&api).await;
    // Whatever goes out on the runs channel.
    let client = redis::Client::open(api.env.redis_url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(api.env.runs_channel()).await.unwrap();

    let run = api
        .start_run(&ada.access, &json!(wf), json!({"city": "Oslo"}))
        .await;
    let id = run["id"].as_str().unwrap();
    assert_eq!(
        (
            &run["status"],
            &run["workflow_version"],
            &run["input"],
            &run["steps"]
        ),
        (
            &json!("queued"),
            &json!(1),
            &json!({"city": "Oslo"}),
            &json!({"pending": 2})
        )
    );
    assert_eq!(
        (&run["cost_usd"], &run["tokens_in"]),
        (&json!("0.000000"), &json!(0))
    );
    // The request itself advanced the run and handed its first step to an executor: no
    // nudge went through the runs channel.
    let nudge = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        pubsub.on_message().next(),
    )
    .await;
    assert!(nudge.is_err(), "a nudge was published: {nudge:?}");
    let finished = api.finished_run(&ada.access, id).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");

    let steps = api
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/steps"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    let mut keys: Vec<&str> = steps["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, ["done", "shape"]);
    let events = api
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/events"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(events["items"][0]["seq"], 1);
    assert_eq!(events["items"][0]["kind"], "run.queued");

    // A later change of the workflow does not move the run off its version.
    let res = api
        .call(
            "PATCH",
            &format!("/api/v1/workflows/{wf}"),
            Some(&ada.access),
            Some(json!({"description": "v2"})),
        )
        .await;
    assert_eq!(res.status, 200);
    let again = api
        .call(
            "GET",
            &format!("/api/v1/runs/{id}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(again["workflow_version"], 1);
    let newer = api
        .start_run(&ada.access, &json!(wf), json!({"city": "Bergen"}))
        .await;
    assert_eq!(newer["workflow_version"], 2);
    let pinned = api
        .create(
            &ada.access,
            "/api/v1/runs",
            json!({"workflow_id": wf, "input": {"city": "Bergen"}, "version": 1}),
        )
        .await;
    assert_eq!(pinned["workflow_version"], 1);
}

#[tokio::test]
async fn bad_input_is_422_and_starts_nothing() {
    let api = Api::start().await;
    let (ada, _, wf) = workflow(&api).await;
    let cases = [
        (
            json!({"workflow_id": wf, "input": {"city": 3}}),
            "input/city",
        ),
        (json!({"workflow_id": wf, "input": {}}), "input"),
        (
            json!({"workflow_id": wf, "input": {"city": "x"}, "version": 9}),
            "version",
        ),
        (json!({"input": {}}), "workflow_id"),
        (json!({"workflow_id": wf, "extra": 1}), "extra"),
    ];
    for (body, field) in cases {
        let res = api
            .call(
                "POST",
                "/api/v1/runs",
                Some(&ada.access),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            res.status,
            422,
            "{body}: {}",
            String::from_utf8_lossy(&res.body)
        );
        assert_eq!(res.json()["errors"][0]["field"], field, "{body}");
    }
    assert_eq!(api.count("runs").await, 0);
    assert_eq!(api.count("run_steps").await, 0);
}

#[tokio::test]
async fn starts_are_idempotent_and_lists_filter() {
    let api = Api::start().await;
    let (ada, p, wf) = workflow(&api).await;
    let body = json!({"workflow_id": wf, "input": {"city": "Oslo"}});
    let first = |key: &'static str| {
        let body = body.clone();
        let api = &api;
        let token = ada.access.clone();
        async move {
            api.call_with(
                "POST",
                "/api/v1/runs",
                &token,
                &[("idempotency-key", key)],
                Some(body),
            )
            .await
        }
    };
    let (a, b) = (first("r1").await, first("r1").await);
    assert_eq!((a.status, b.status), (201, 201));
    assert_eq!(a.json()["id"], b.json()["id"]);
    assert_eq!(api.count("runs").await, 1);
    let second = api.create(&ada.access, "/api/v1/runs", body).await;
    let list = |q: &str| format!("/api/v1/runs?project_id={p}{q}");
    let all = api
        .call("GET", &list(""), Some(&ada.access), None)
        .await
        .json();
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    assert_eq!(all["items"][0]["id"], second["id"], "newest first");
    let done = crate::common::eventually(async || {
        let done = api
            .call("GET", &list("&status=succeeded"), Some(&ada.access), None)
            .await
            .json();
        (done["items"].as_array().unwrap().len() == 2).then_some(done)
    })
    .await;
    assert_eq!(done["items"][1]["id"], a.json()["id"]);
    let none = api
        .call("GET", &list("&status=failed"), Some(&ada.access), None)
        .await
        .json();
    assert_eq!(none["items"], json!([]));
    let bad = api
        .call("GET", &list("&status=done"), Some(&ada.access), None)
        .await;
    assert_eq!(bad.status, 422);
}

#[tokio::test]
async fn cancelling_a_running_run_abandons_its_steps_and_a_finished_run_is_409() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p, quick) = workflow(&api).await;
    let slow = crate::common::FakeServer::start(
        200,
        json!({"late": true}),
        std::time::Duration::from_secs(2),
    )
    .await;
    let tool = api
        .create(
            &ada.access,
            "/api/v1/tools",
            json!({"project_id": p, "name": "slow", "description": "s",
            "input_schema": {"type": "object"}, "http": {"method": "POST", "url": slow.url("/")}}),
        )
        .await;
    let wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "Slow", "definition": {"steps": [
                {"key": "call", "kind": "tool", "tool_id": tool["id"], "input": {}},
                {"key": "after", "kind": "condition", "depends_on": ["call"], "input": {}}
            ]}}),
        )
        .await;
    let run = api.start_run(&ada.access, &wf["id"], json!({})).await;
    let id = run["id"].as_str().unwrap();
    // Wait until the tool has the call, then cancel.
    crate::common::eventually(async || (!slow.received().is_empty()).then_some(())).await;
    let cancel = api.cancel(&ada.access, id).await;
    assert_eq!(cancel.status, 202);
    assert_eq!(cancel.json()["status"], "cancelling");
    // Asking again is the same request.
    assert_eq!(api.cancel(&ada.access, id).await.status, 202);
    let path = format!("/api/v1/runs/{id}");
    crate::common::eventually(async || {
        (api.call("GET", &path, Some(&ada.access), None).await.json()["status"] == "cancelled")
            .then_some(())
    })
    .await;
    // The tool's late answer does not bring the abandoned step back.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let steps = api
        .call("GET", &format!("{path}/steps"), Some(&ada.access), None)
        .await
        .json();
    let statuses: Vec<(&str, &str)> = steps["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["key"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert!(
        statuses.contains(&("call", "cancelled")) && statuses.contains(&("after", "cancelled")),
        "{statuses:?}"
    );
    let events = api
        .call("GET", &format!("{path}/events"), Some(&ada.access), None)
        .await
        .json();
    let kinds: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "run.cancelling").count(), 1);
    assert_eq!(kinds.last(), Some(&"run.cancelled"));
    assert!(!kinds.contains(&"step.succeeded"), "{kinds:?}");
    // Cancelling a cancelled run again answers as before; a run that finished otherwise is 409.
    assert_eq!(api.cancel(&ada.access, id).await.status, 202);
    let done = api
        .start_run(&ada.access, &json!(quick), json!({"city": "Oslo"}))
        .await;
    let done_path = format!("/api/v1/runs/{}", done["id"].as_str().unwrap());
    crate::common::eventually(async || {
        (api.call("GET", &done_path, Some(&ada.access), None)
            .await
            .json()["status"]
            == "succeeded")
            .then_some(())
    })
    .await;
    assert_eq!(
        api.status(
            "PATCH",
            &format!("{done_path}/cancel"),
            Some(&ada.access),
            None
        )
        .await,
        409
    );
}

#[tokio::test]
async fn runs_are_invisible_to_other_tenants_and_viewers_cannot_start_them() {
    let api = Api::start().await;
    let (ada, p, wf) = workflow(&api).await;
    let run = api
        .start_run(&ada.access, &json!(wf), json!({"city": "Oslo"}))
        .await;
    let id = run["id"].as_str().unwrap();
    let mallory = api.register("mallory").await;
    for (method, path) in [
        ("GET", format!("/api/v1/runs/{id}")),
        ("GET", format!("/api/v1/runs/{id}/steps")),
        ("GET", format!("/api/v1/runs/{id}/events")),
        ("PATCH", format!("/api/v1/runs/{id}/cancel")),
        ("GET", format!("/api/v1/runs?project_id={p}")),
    ] {
        assert_eq!(
            api.status(method, &path, Some(&mallory.access), None).await,
            404,
            "{method} {path}"
        );
    }
    let start = json!({"workflow_id": wf, "input": {"city": "Oslo"}});
    assert_eq!(
        api.status(
            "POST",
            "/api/v1/runs",
            Some(&mallory.access),
            Some(start.clone())
        )
        .await,
        404
    );
    let vic = api.register("vic").await;
    api.add_member(&ada, &p, &vic, "viewer").await;
    assert_eq!(
        api.status("POST", "/api/v1/runs", Some(&vic.access), Some(start))
            .await,
        403
    );
    assert_eq!(
        api.status(
            "GET",
            &format!("/api/v1/runs/{id}"),
            Some(&vic.access),
            None
        )
        .await,
        200
    );
    assert_eq!(api.cancel(&vic.access, id).await.status, 403);
    assert_eq!(api.count("runs").await, 1);
}
