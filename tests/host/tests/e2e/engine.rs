//! The run engine end to end: runs started by the API are advanced by the Redis-triggered
//! orchestrator and their steps run by the private executor, against a real Postgres and
//! Redis and fake tools on loopback.

use std::time::Duration;

use crate::common::{Api, Client, FakeServer, User};
use serde_json::{Value, json};

async fn project(api: &Api) -> (User, String) {
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Engine"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    (ada, p)
}

pub(crate) async fn workflow(api: &Client, who: &User, p: &str, steps: Value) -> String {
    let wf = api
        .create(
            &who.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": format!("W {}", uuid::Uuid::new_v4()), "definition": {"steps": steps}}),
        )
        .await;
    wf["id"].as_str().unwrap().to_string()
}

async fn step_statuses(api: &Api, who: &User, run: &Value) -> Vec<(String, String)> {
    let steps = api
        .call(
            "GET",
            &format!("/api/v1/runs/{}/steps", run["id"].as_str().unwrap()),
            Some(&who.access),
            None,
        )
        .await
        .json();
    let mut out: Vec<(String, String)> = steps["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["key"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn cond(key: &str, deps: &[&str], input: Value) -> Value {
    json!({"key": key, "kind": "condition", "depends_on": deps, "input": input})
}

#[tokio::test]
async fn a_diamond_fans_out_and_in_to_the_right_output() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let wf = workflow(&api, &ada, &p, json!([
        cond("start", &[], json!({"n": "{{ input.n }}"})),
        cond("left", &["start"], json!({"from": "left", "n": "{{ steps.start.output.n }}"})),
        cond("right", &["start"], json!({"from": "right"})),
        cond("join", &["left", "right"], json!({"l": "{{ steps.left.output.from }}", "r": "{{ steps.right.output.from }}", "n": "{{ steps.left.output.n }}"})),
    ]))
    .await;
    let run = api.run_to_end(&ada.access, &wf, json!({"n": 7})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        run["output"],
        json!({"join": {"l": "left", "r": "right", "n": 7}})
    );
    assert_eq!(run["steps"], json!({"succeeded": 4}));
    let events = api
        .call(
            "GET",
            &format!("/api/v1/runs/{}/events", run["id"].as_str().unwrap()),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    let kinds: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"run.queued"));
    assert_eq!(kinds.last(), Some(&"run.succeeded"));
    assert_eq!(kinds.iter().filter(|k| **k == "step.succeeded").count(), 4);
    let seqs: Vec<i64> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "numbered without gaps"
    );
}

#[tokio::test]
async fn when_skips_the_branch_not_taken_and_its_dependants() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let wf = workflow(&api, &ada, &p, json!([
        cond("check", &[], json!({"big": "{{ input.big }}"})),
        {"key": "yes", "kind": "condition", "depends_on": ["check"], "when": "steps.check.output.big == true", "input": {"said": "big"}},
        {"key": "no", "kind": "condition", "depends_on": ["check"], "when": "steps.check.output.big == false", "input": {"said": "small"}},
        cond("after_no", &["no"], json!({})),
        cond("join", &["yes", "no"], json!({"yes": "{{ steps.yes.output.said }}"})),
    ]))
    .await;
    let run = api.run_to_end(&ada.access, &wf, json!({"big": true})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        step_statuses(&api, &ada, &run).await,
        [
            ("after_no", "skipped"),
            ("check", "succeeded"),
            ("join", "succeeded"),
            ("no", "skipped"),
            ("yes", "succeeded")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(run["output"]["join"], json!({"yes": "big"}));
}

#[tokio::test]
async fn a_tool_step_calls_the_tool_once_with_a_stable_idempotency_key_despite_repeated_nudges() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::start(200, json!({"temp_c": 4.5}), Duration::from_millis(300)).await;
    let tool = api
        .create(
            &ada.access,
            "/api/v1/tools",
            json!({"project_id": p, "name": "weather", "description": "w",
            "input_schema": {"type": "object", "required": ["city"]},
            "http": {"method": "POST", "url": fake.url("/weather")}}),
        )
        .await;
    let wf = workflow(&api, &ada, &p, json!([
        {"key": "fetch", "kind": "tool", "tool_id": tool["id"], "input": {"city": "{{ input.city }}"}},
        cond("report", &["fetch"], json!({"t": "{{ steps.fetch.output.temp_c }}"})),
    ]))
    .await;
    let run = api
        .start_run(&ada.access, &json!(wf), json!({"city": "Oslo"}))
        .await;
    let id = run["id"].as_str().unwrap().to_string();
    // Four more nudges while the tool call is in flight: nothing runs twice.
    let client = redis::Client::open(api.env.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..4 {
        let _: i64 = redis::AsyncCommands::publish(
            &mut conn,
            api.env.runs_channel(),
            json!({"run_id": id}).to_string(),
        )
        .await
        .unwrap();
    }
    let path = format!("/api/v1/runs/{id}");
    let run = crate::common::eventually(async || {
        let run = api.call("GET", &path, Some(&ada.access), None).await.json();
        (run["status"] == "succeeded" || run["status"] == "failed").then_some(run)
    })
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!({"report": {"t": 4.5}}));
    let calls = fake.received();
    assert_eq!(calls.len(), 1, "the tool was called {} times", calls.len());
    assert_eq!(calls[0].headers["idempotency-key"], format!("{id}:fetch"));
    assert_eq!(
        serde_json::from_slice::<Value>(&calls[0].body).unwrap(),
        json!({"city": "Oslo"})
    );
    let steps = api
        .call("GET", &format!("{path}/steps"), Some(&ada.access), None)
        .await
        .json();
    let fetch = steps["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "fetch")
        .unwrap()
        .clone();
    assert_eq!(
        (&fetch["attempt"], &fetch["input"], &fetch["output"]),
        (&json!(1), &json!({"city": "Oslo"}), &json!({"temp_c": 4.5}))
    );
}

#[tokio::test]
async fn a_tool_that_rejects_the_call_fails_the_step_and_the_run_without_retrying() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::start(400, json!({"error": "bad city"}), Duration::ZERO).await;
    let tool = api
        .create(&ada.access, "/api/v1/tools", json!({"project_id": p, "name": "weather", "description": "w",
            "input_schema": {"type": "object"}, "http": {"method": "POST", "url": fake.url("/weather")}}))
        .await;
    let wf = workflow(
        &api,
        &ada,
        &p,
        json!([
            {"key": "fetch", "kind": "tool", "tool_id": tool["id"], "input": {}},
            cond("after", &["fetch"], json!({})),
        ]),
    )
    .await;
    let run = api.run_to_end(&ada.access, &wf, json!({})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(
        step_statuses(&api, &ada, &run).await,
        [("after", "cancelled"), ("fetch", "failed")].map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(fake.received().len(), 1);
    let steps = api
        .call(
            "GET",
            &format!("/api/v1/runs/{}/steps", run["id"].as_str().unwrap()),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    let fetch = steps["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "fetch")
        .unwrap()
        .clone();
    assert_eq!(fetch["error"]["kind"], "validation");
}

// ---- The sweeper: retries, lost hosts, timeouts -----------------------------------------------

async fn tool(api: &Api, who: &User, p: &str, url: String) -> Value {
    tool_named(api, who, p, "weather", url).await
}

pub(crate) async fn tool_named(
    api: &Client,
    who: &User,
    p: &str,
    name: &str,
    url: String,
) -> Value {
    api.create(
        &who.access,
        "/api/v1/tools",
        json!({"project_id": p, "name": name, "description": "w",
        "input_schema": {"type": "object"}, "http": {"method": "POST", "url": url}}),
    )
    .await
}

async fn step_of(api: &Api, who: &User, run_id: &str, key: &str) -> Value {
    let steps = api
        .call(
            "GET",
            &format!("/api/v1/runs/{run_id}/steps"),
            Some(&who.access),
            None,
        )
        .await
        .json();
    steps["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == key)
        .unwrap()
        .clone()
}

pub(crate) async fn wait_status(api: &Client, who: &User, run_id: &str, want: &str) -> Value {
    let path = format!("/api/v1/runs/{run_id}");
    crate::common::eventually(async || {
        let run = api.call("GET", &path, Some(&who.access), None).await.json();
        (run["status"] == want).then_some(run)
    })
    .await
}

#[tokio::test]
async fn a_failed_call_is_retried_after_its_backoff_and_the_run_succeeds() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::scripted(
        vec![(503, json!({"error": "busy"})), (200, json!({"ok": 1}))],
        Duration::ZERO,
    )
    .await;
    let tool = tool(&api, &ada, &p, fake.url("/")).await;
    let wf = workflow(&api, &ada, &p, json!([{"key": "call", "kind": "tool", "tool_id": tool["id"], "input": {},
        "retry": {"max_attempts": 3, "initial_interval_ms": 60000, "backoff_coefficient": 2, "max_interval_ms": 600000}}]))
    .await;
    let run = api.start_run(&ada.access, &json!(wf), json!({})).await;
    let id = run["id"].as_str().unwrap();
    let waiting = crate::common::eventually(async || {
        let s = step_of(&api, &ada, id, "call").await;
        (s["status"] == "retrying").then_some(s)
    })
    .await;
    assert_eq!(
        (&waiting["attempt"], &waiting["error"]["kind"]),
        (&json!(1), &json!("tool-error"))
    );
    // Before the backoff has passed the sweeper leaves it; after, the second attempt runs.
    api.sweep_at(30).await;
    assert_eq!(step_of(&api, &ada, id, "call").await["status"], "retrying");
    api.sweep_at(120).await;
    let run = wait_status(&api, &ada, id, "succeeded").await;
    assert_eq!(run["output"], json!({"call": {"ok": 1}}));
    let step = step_of(&api, &ada, id, "call").await;
    assert_eq!(
        (&step["attempt"], &step["error"]),
        (&json!(2), &Value::Null)
    );
    // Both attempts carry the same key, so the tool can tell the second is a repeat.
    assert_eq!(fake.idempotency_keys(), vec![format!("{id}:call"); 2]);
}

#[tokio::test]
async fn a_step_whose_host_died_is_taken_back_and_run_again_once() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    // The first call hangs past its lease (its host "dies"); the second answers at once.
    let fake = FakeServer::scripted(
        vec![(200, json!({"attempt": "first"}))],
        Duration::from_secs(3),
    )
    .await;
    let tool = tool(&api, &ada, &p, fake.url("/")).await;
    let wf = workflow(
        &api,
        &ada,
        &p,
        json!([{"key": "call", "kind": "tool", "tool_id": tool["id"], "input": {}}]),
    )
    .await;
    let run = api.start_run(&ada.access, &json!(wf), json!({})).await;
    let id = run["id"].as_str().unwrap().to_string();
    crate::common::eventually(async || (!fake.received().is_empty()).then_some(())).await;
    // Its host renews the lease no more: a lease later (15 s, however long the step's
    // timeout), the sweeper gives the step a new attempt.
    api.sweep_at(LEASE_S + 1).await;
    let run = wait_status(&api, &ada, &id, "succeeded").await;
    assert_eq!(run["status"], "succeeded");
    let step = step_of(&api, &ada, &id, "call").await;
    assert_eq!(step["attempt"], 2);
    let events = api
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/events"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    let kinds: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"step.lease_expired"), "{kinds:?}");
    // The first attempt's late answer, when it comes, changes nothing: one success recorded.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let events = api
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/events"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    let successes = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "step.succeeded")
        .count();
    assert_eq!(successes, 1);
    // Both attempts carry the same key, so the tool can tell the second is a repeat.
    assert_eq!(fake.idempotency_keys(), vec![format!("{id}:call"); 2]);
}

/// A claimed step's lease, as the engine grants and renews it (`LEASE_MS`).
pub(crate) const LEASE_S: i64 = 15;

#[tokio::test]
async fn a_call_longer_than_a_lease_keeps_its_step_through_the_executors_heartbeat() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::start(200, json!({"slow": true}), Duration::from_secs(8)).await;
    let tool = tool(&api, &ada, &p, fake.url("/")).await;
    let wf = workflow(
        &api,
        &ada,
        &p,
        json!([{"key": "call", "kind": "tool", "tool_id": tool["id"], "input": {}}]),
    )
    .await;
    api.app
        .inner
        .faults()
        .pause_cron
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let run = api.start_run(&ada.access, &json!(wf), json!({})).await;
    let id = run["id"].as_str().unwrap().to_string();
    crate::common::eventually(async || (!fake.received().is_empty()).then_some(())).await;
    // Past the first renewal (5 s into the call), a sweep as at 17 s after the claim finds
    // the lease renewed to 20 s: the step stays with its live host. Unrenewed, it would
    // have run out at 15 s and the step would have been run a second time.
    tokio::time::sleep(Duration::from_secs(6)).await;
    api.sweep_at(LEASE_S - 4).await;
    let run = wait_status(&api, &ada, &id, "succeeded").await;
    assert_eq!(run["output"], json!({"call": {"slow": true}}));
    let step = step_of(&api, &ada, &id, "call").await;
    assert_eq!(step["attempt"], 1, "{step}");
    assert_eq!(fake.received().len(), 1);
}

#[tokio::test]
async fn a_run_past_its_timeout_ends_timed_out() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::start(200, json!({}), Duration::from_secs(2)).await;
    let tool = tool(&api, &ada, &p, fake.url("/")).await;
    let wf = api
        .create(&ada.access, "/api/v1/workflows", json!({"project_id": p, "name": "T", "timeout_s": 60,
            "definition": {"steps": [{"key": "call", "kind": "tool", "tool_id": tool["id"], "input": {}}]}}))
        .await;
    let run = api.start_run(&ada.access, &wf["id"], json!({})).await;
    let id = run["id"].as_str().unwrap();
    crate::common::eventually(async || (!fake.received().is_empty()).then_some(())).await;
    api.sweep_at(30).await;
    assert_eq!(
        api.call(
            "GET",
            &format!("/api/v1/runs/{id}"),
            Some(&ada.access),
            None
        )
        .await
        .json()["status"],
        "running"
    );
    api.sweep_at(120).await;
    let run = wait_status(&api, &ada, id, "timed_out").await;
    assert_eq!(run["error"]["kind"], "timeout");
    assert_eq!(step_of(&api, &ada, id, "call").await["status"], "cancelled");
}

// ---- Approvals ------------------------------------------------------------------------------

/// A run waiting at `gate` (an approval step between two condition steps).
async fn waiting_run(api: &Api, who: &User, p: &str, approval: Value) -> String {
    let wf = workflow(api, who, p, json!([
        cond("before", &[], json!({})),
        {"key": "gate", "kind": "approval", "depends_on": ["before"], "input": {}, "approval": approval},
        cond("after", &["gate"], json!({"ok": "{{ steps.gate.output.approved }}"})),
    ]))
    .await;
    let run = api.start_run(&who.access, &json!(wf), json!({})).await;
    let id = run["id"].as_str().unwrap().to_string();
    wait_status(api, who, &id, "waiting").await;
    assert_eq!(step_of(api, who, &id, "gate").await["status"], "waiting");
    id
}

#[tokio::test]
async fn an_approval_holds_the_run_until_approved_or_rejected() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let id = waiting_run(&api, &ada, &p, json!({"timeout_s": 3600})).await;
    let approve = |id: &str, body: Value| {
        let path = format!("/api/v1/runs/{id}/steps/gate/approve");
        let token = ada.access.clone();
        let api = &api;
        async move { api.call("POST", &path, Some(&token), Some(body)).await }
    };
    let res = approve(&id, json!({"approved": true, "comment": "looks right"})).await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let run = wait_status(&api, &ada, &id, "succeeded").await;
    assert_eq!(run["output"], json!({"after": {"ok": true}}));
    // Decided once.
    assert_eq!(approve(&id, json!({"approved": false})).await.status, 409);

    let id = waiting_run(&api, &ada, &p, json!({"timeout_s": 3600})).await;
    assert_eq!(approve(&id, json!({"approved": "yes"})).await.status, 422);
    assert_eq!(
        approve(&id, json!({"approved": false, "comment": "not today"}))
            .await
            .status,
        200
    );
    let run = wait_status(&api, &ada, &id, "failed").await;
    assert_eq!(run["status"], "failed");
    let gate = step_of(&api, &ada, &id, "gate").await;
    assert_eq!(
        gate["error"],
        json!({"kind": "rejected", "message": "not today"})
    );
    assert_eq!(
        step_of(&api, &ada, &id, "after").await["status"],
        "cancelled"
    );
}

#[tokio::test]
async fn only_named_approvers_decide_and_an_undecided_approval_times_out() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let mia = api.register("mia").await;
    api.add_member(&ada, &p, &mia, "member").await;
    let id = waiting_run(
        &api,
        &ada,
        &p,
        json!({"timeout_s": 600, "approvers": [mia.id]}),
    )
    .await;
    let path = format!("/api/v1/runs/{id}/steps/gate/approve");
    assert_eq!(
        api.status(
            "POST",
            &path,
            Some(&ada.access),
            Some(json!({"approved": true}))
        )
        .await,
        403
    );
    // Nobody decides: past the deadline the sweeper fails the step, and the run with it.
    api.sweep_at(300).await;
    assert_eq!(step_of(&api, &ada, &id, "gate").await["status"], "waiting");
    api.sweep_at(900).await;
    let run = wait_status(&api, &ada, &id, "failed").await;
    assert_eq!(run["status"], "failed");
    assert_eq!(
        step_of(&api, &ada, &id, "gate").await["error"]["kind"],
        "timeout"
    );
    assert_eq!(
        api.status(
            "POST",
            &path,
            Some(&mia.access),
            Some(json!({"approved": true}))
        )
        .await,
        409
    );
}

// ---- Step timeouts and lost hosts out of attempts -------------------------------------------

#[tokio::test]
async fn a_step_timeout_shorter_than_the_tools_bounds_the_call() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::start(200, json!({"late": true}), Duration::from_secs(3)).await;
    let tool = tool(&api, &ada, &p, fake.url("/")).await;
    let wf = workflow(
        &api,
        &ada,
        &p,
        json!([{"key": "call", "kind": "tool", "tool_id": tool["id"], "input": {},
        "timeout_ms": 300, "retry": {"max_attempts": 1}}]),
    )
    .await;
    let run = api.run_to_end(&ada.access, &wf, json!({})).await;
    assert_eq!(run["status"], "failed", "{run}");
    let step = step_of(&api, &ada, run["id"].as_str().unwrap(), "call").await;
    assert_eq!(step["error"]["kind"], "timeout", "{step}");
    assert_eq!(fake.received().len(), 1);
}

#[tokio::test]
async fn a_lost_host_uses_up_an_attempt_and_the_last_one_fails_the_step() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::start(200, json!({}), Duration::from_secs(3)).await;
    let tool = tool(&api, &ada, &p, fake.url("/")).await;
    let wf = workflow(
        &api,
        &ada,
        &p,
        json!([{"key": "call", "kind": "tool", "tool_id": tool["id"], "input": {},
        "retry": {"max_attempts": 1}}]),
    )
    .await;
    let run = api.start_run(&ada.access, &json!(wf), json!({})).await;
    let id = run["id"].as_str().unwrap().to_string();
    crate::common::eventually(async || (!fake.received().is_empty()).then_some(())).await;
    // The only attempt's lease is long gone: no new attempt, the step and the run fail.
    api.sweep_at(3600).await;
    let run = wait_status(&api, &ada, &id, "failed").await;
    assert_eq!(run["status"], "failed");
    let step = step_of(&api, &ada, &id, "call").await;
    assert_eq!(
        (&step["status"], &step["attempt"], &step["error"]["kind"]),
        (&json!("failed"), &json!(1), &json!("timeout"))
    );
    // The late answer of the lost attempt changes nothing.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(step_of(&api, &ada, &id, "call").await["status"], "failed");
    assert_eq!(fake.received().len(), 1);
}

// ---- Retry of a run ---------------------------------------------------------------------------

#[tokio::test]
async fn retry_from_failed_reuses_what_succeeded_and_from_start_runs_everything() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let first = FakeServer::start(200, json!({"city": "Oslo"}), Duration::ZERO).await;
    // The second tool refuses the first call (not retried) and answers every later one.
    let second = FakeServer::scripted(
        vec![(400, json!({"error": "no"})), (200, json!({"temp": 3}))],
        Duration::ZERO,
    )
    .await;
    let lookup = tool_named(&api, &ada, &p, "lookup", first.url("/")).await;
    let weather = tool_named(&api, &ada, &p, "weather", second.url("/")).await;
    let wf = workflow(&api, &ada, &p, json!([
        {"key": "lookup", "kind": "tool", "tool_id": lookup["id"], "input": {"q": "{{ input.q }}"}},
        {"key": "weather", "kind": "tool", "tool_id": weather["id"], "depends_on": ["lookup"],
         "input": {"city": "{{ steps.lookup.output.city }}"}},
    ]))
    .await;
    let failed = api
        .run_to_end(&ada.access, &wf, json!({"q": "north"}))
        .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let failed_id = failed["id"].as_str().unwrap();
    let retry_path = format!("/api/v1/runs/{failed_id}/retry");

    // Bad input changes nothing.
    let before = api.count("runs").await;
    let res = api
        .call(
            "POST",
            &retry_path,
            Some(&ada.access),
            Some(json!({"from": "middle"})),
        )
        .await;
    assert_eq!(res.status, 422);
    assert_eq!(res.json()["errors"][0]["field"], "from");
    assert_eq!(api.count("runs").await, before);

    let res = api
        .call_with(
            "POST",
            &retry_path,
            &ada.access,
            &[("idempotency-key", "retry-1")],
            None,
        )
        .await;
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let retried = res.json();
    assert_eq!(retried["retry_of"], failed_id);
    assert_eq!(retried["input"], json!({"q": "north"}));
    // The same key is the same retry.
    let again = api
        .call_with(
            "POST",
            &retry_path,
            &ada.access,
            &[("idempotency-key", "retry-1")],
            None,
        )
        .await;
    assert_eq!(again.json()["id"], retried["id"]);
    let retried_id = retried["id"].as_str().unwrap();
    let run = wait_status(&api, &ada, retried_id, "succeeded").await;
    assert_eq!(run["output"], json!({"weather": {"temp": 3}}));
    // `lookup` was not called again; its output fed `weather` as before.
    assert_eq!(first.received().len(), 1);
    assert_eq!(second.received().len(), 2);
    assert_eq!(
        serde_json::from_slice::<Value>(&second.received()[1].body).unwrap(),
        json!({"city": "Oslo"})
    );
    let reused = step_of(&api, &ada, retried_id, "lookup").await;
    assert_eq!(
        (&reused["status"], &reused["attempt"]),
        (&json!("succeeded"), &json!(0))
    );
    let events = api
        .call(
            "GET",
            &format!("/api/v1/runs/{retried_id}/events"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(
        events["items"][0]["data"],
        json!({"workflow_version": 1, "retry_of": failed_id, "from": "failed", "reused": ["lookup"]})
    );

    // A run that succeeded has nothing failed to retry; from the start it runs all again.
    assert_eq!(
        api.status(
            "POST",
            &format!("/api/v1/runs/{retried_id}/retry"),
            Some(&ada.access),
            Some(json!({}))
        )
        .await,
        409
    );
    let res = api
        .call(
            "POST",
            &format!("/api/v1/runs/{retried_id}/retry"),
            Some(&ada.access),
            Some(json!({"from": "start"})),
        )
        .await;
    assert_eq!(res.status, 201);
    wait_status(&api, &ada, res.json()["id"].as_str().unwrap(), "succeeded").await;
    assert_eq!((first.received().len(), second.received().len()), (2, 3));
}

#[tokio::test]
async fn only_a_finished_run_is_retried_and_only_by_a_writer_of_its_project() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let id = waiting_run(&api, &ada, &p, json!({"timeout_s": 3600})).await;
    let path = format!("/api/v1/runs/{id}/retry");
    let res = api.call("POST", &path, Some(&ada.access), None).await;
    assert_eq!(res.status, 409, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    let eve = api.register("eve").await;
    assert_eq!(
        api.status("POST", &path, Some(&eve.access), None).await,
        404
    );
    let viewer = api.register("vic").await;
    api.add_member(&ada, &p, &viewer, "viewer").await;
    // Cancelled, it can be retried, but not by a viewer.
    api.cancel(&ada.access, &id).await;
    wait_status(&api, &ada, &id, "cancelled").await;
    assert_eq!(
        api.status("POST", &path, Some(&viewer.access), None).await,
        403
    );
    let before = api.count("runs").await;
    assert_eq!(
        api.status("POST", &path, Some(&ada.access), None).await,
        201
    );
    assert_eq!(api.count("runs").await, before + 1);
}

// ---- The live event stream ------------------------------------------------------------------

#[tokio::test]
async fn a_run_and_its_event_log_read_whole_go_out_with_their_length_not_chunked() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let id = waiting_run(&api, &ada, &p, json!({"timeout_s": 3600})).await;
    let auth = format!("Bearer {}", ada.access);
    for path in [
        format!("/api/v1/runs/{id}"),
        format!("/api/v1/runs/{id}/events"),
    ] {
        let res = crate::common::request(
            "GET",
            &api.app.url(&path),
            &[("authorization", &auth)],
            None,
        )
        .await;
        assert_eq!(res.status, 200, "{path}");
        assert_eq!(
            res.header("content-length"),
            Some(res.body.len().to_string().as_str()),
            "{path}"
        );
        assert_eq!(res.header("transfer-encoding"), None, "{path}");
    }
    let missing = crate::common::request(
        "GET",
        &api.app
            .url("/api/v1/runs/01a2388f-7bf7-7c56-a17b-0f995731430c"),
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(missing.status, 404);
    assert_eq!(
        missing.header("content-length"),
        Some(missing.body.len().to_string().as_str())
    );
}

#[tokio::test]
async fn the_event_stream_delivers_every_event_in_order_and_resumes_after_a_disconnect() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let id = waiting_run(&api, &ada, &p, json!({"timeout_s": 3600})).await;
    let url = api.app.url(&format!("/api/v1/runs/{id}/events"));
    let auth = format!("Bearer {}", ada.access);
    // Live: the client reads up to the approval wait, then hangs up.
    let first = crate::common::read_sse(&url, &[("authorization", &auth)], |events| {
        events.iter().any(|e| e.event == "step.waiting")
    })
    .await;
    assert_eq!(first.status, 200);
    assert_eq!(first.content_type, "text/event-stream");
    assert!(!first.ended);
    let last_seen = first.events.last().unwrap().id.clone();
    // Meanwhile the run goes on.
    let res = api
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/steps/gate/approve"),
            Some(&ada.access),
            Some(json!({"approved": true})),
        )
        .await;
    assert_eq!(res.status, 200);
    // Resumed after the last event seen, the stream delivers the rest and ends with the run.
    let rest = crate::common::read_sse(
        &url,
        &[("authorization", &auth), ("last-event-id", &last_seen)],
        |_| false,
    )
    .await;
    assert!(rest.ended);
    assert_eq!(rest.events.last().unwrap().event, "run.succeeded");
    let streamed: Vec<crate::common::SseEvent> =
        first.events.into_iter().chain(rest.events).collect();
    // Exactly the stored log, in order, each once.
    let log = api
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/events"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    let stored: Vec<(String, String, Value)> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq"].to_string(),
                e["kind"].as_str().unwrap().to_string(),
                e.clone(),
            )
        })
        .collect();
    let seen: Vec<(String, String, Value)> = streamed
        .into_iter()
        .map(|e| (e.id, e.event, e.data))
        .collect();
    assert_eq!(seen, stored);
    // A finished run's stream is its whole log, then the end.
    let replay = crate::common::read_sse(&url, &[("authorization", &auth)], |_| false).await;
    assert!(replay.ended);
    assert_eq!(replay.events.len(), stored.len());
    // No access, no stream.
    let eve = api.register("eve").await;
    let denied = crate::common::read_sse(
        &url,
        &[("authorization", &format!("Bearer {}", eve.access))],
        |_| false,
    )
    .await;
    assert_eq!((denied.status, denied.events.len()), (404, 0));
}

// ---- Durability and concurrency ----------------------------------------------------------

#[tokio::test]
async fn with_every_nudge_and_the_first_dispatches_lost_runs_still_finish_through_the_sweeper() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let tool = tool(&api, &ada, &p, fake.url("/")).await;
    let wf = workflow(
        &api,
        &ada,
        &p,
        json!([
            {"key": "a", "kind": "tool", "tool_id": tool["id"], "input": {}},
            {"key": "b", "kind": "tool", "tool_id": tool["id"], "input": {}, "depends_on": ["a"]},
            cond("c", &["b"], json!({"done": "{{ steps.b.output.ok }}"})),
        ]),
    )
    .await;
    let faults = api.app.inner.faults();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    faults.drop_redis_publishes.store(true, relaxed);
    faults.drop_dispatches.store(true, relaxed);
    // The sweeper moves only when this test fires it, not on its own 5-second schedule.
    faults.pause_cron.store(true, relaxed);
    let wf = json!(wf);
    let runs: Vec<String> =
        futures::future::join_all((0..3).map(|_| api.start_run(&ada.access, &wf, json!({}))))
            .await
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
    // Each run's first step is claimed, and its hand-off to an executor is lost: nothing
    // runs, and a sweep before the lease runs out leaves the claim alone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.sweep_at(0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fake.received().is_empty());
    // Executors answer again (nudges stay lost): one sweep past the lease takes the steps
    // back and dispatches them, and each result dispatches what comes next.
    faults.drop_dispatches.store(false, relaxed);
    api.sweep_at(LEASE_S + 1).await;
    let ticks = 1;
    for _ in 0..100 {
        let mut done = 0;
        for id in &runs {
            let run = api
                .call(
                    "GET",
                    &format!("/api/v1/runs/{id}"),
                    Some(&ada.access),
                    None,
                )
                .await
                .json();
            if run["status"] == "succeeded" {
                done += 1;
            }
        }
        if done == runs.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in &runs {
        let run = api
            .call(
                "GET",
                &format!("/api/v1/runs/{id}"),
                Some(&ada.access),
                None,
            )
            .await
            .json();
        assert_eq!(run["status"], "succeeded", "after {ticks} ticks: {run}");
        assert_eq!(run["output"], json!({"c": {"done": true}}));
    }
    // Each tool step ran once.
    let mut keys = fake.idempotency_keys();
    keys.sort();
    let mut want: Vec<String> = runs
        .iter()
        .flat_map(|r| [format!("{r}:a"), format!("{r}:b")])
        .collect();
    want.sort();
    assert_eq!(keys, want);
}

#[tokio::test]
async fn a_chain_goes_on_in_the_executor_that_ran_its_previous_step_without_a_dispatch() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::start(200, json!({"ok": true}), Duration::from_millis(500)).await;
    let tool = tool(&api, &ada, &p, fake.url("/")).await;
    let wf = workflow(
        &api,
        &ada,
        &p,
        json!([
            {"key": "a", "kind": "tool", "tool_id": tool["id"], "input": {}},
            {"key": "b", "kind": "tool", "tool_id": tool["id"], "input": {}, "depends_on": ["a"]},
            {"key": "c", "kind": "tool", "tool_id": tool["id"], "input": {}, "depends_on": ["b"]},
        ]),
    )
    .await;
    let faults = api.app.inner.faults();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    faults.pause_cron.store(true, relaxed);
    faults.drop_redis_publishes.store(true, relaxed);
    let run = api.start_run(&ada.access, &json!(wf), json!({})).await;
    let id = run["id"].as_str().unwrap().to_string();
    // Once the first step's executor has it, no hand-off can arrive any more: no nudge, no
    // sweep, no dispatch. The chain finishes in that executor all the same.
    crate::common::eventually(async || (!fake.received().is_empty()).then_some(())).await;
    faults.drop_dispatches.store(true, relaxed);
    let run = wait_status(&api, &ada, &id, "succeeded").await;
    assert_eq!(run["output"], json!({"c": {"ok": true}}));
    assert_eq!(
        fake.idempotency_keys(),
        ["a", "b", "c"].map(|s| format!("{id}:{s}"))
    );
}

#[tokio::test]
async fn two_hundred_runs_started_at_once_all_finish_with_every_step_run_once() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let tool = tool(&api, &ada, &p, fake.url("/")).await;
    let wf = workflow(&api, &ada, &p, json!([
        {"key": "a", "kind": "tool", "tool_id": tool["id"], "input": {"n": "{{ input.n }}"}},
        {"key": "b", "kind": "tool", "tool_id": tool["id"], "input": {"n": "{{ input.n }}"}, "depends_on": ["a"]},
    ]))
    .await;
    let wf = json!(wf);
    let runs: Vec<String> = futures::future::join_all(
        (0..200).map(|n| api.start_run(&ada.access, &wf, json!({"n": n}))),
    )
    .await
    .iter()
    .map(|r| r["id"].as_str().unwrap().to_string())
    .collect();
    let db = api.env.db().await;
    // Bounded: two minutes at most, polled from the database.
    let mut finished = 0;
    for _ in 0..1200 {
        finished = db
            .query_one("select count(*) from runs where status = 'succeeded'", &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
        if finished == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(finished, 200);
    let mut keys = fake.idempotency_keys();
    keys.sort();
    let mut want: Vec<String> = runs
        .iter()
        .flat_map(|r| [format!("{r}:a"), format!("{r}:b")])
        .collect();
    want.sort();
    assert_eq!(keys, want, "every step called exactly once");
    let attempts: i64 = db
        .query_one(
            "select count(*) from run_steps where attempt <> 1 or status <> 'succeeded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 0);
    let successes: i64 = db
        .query_one(
            "select count(*) from run_events where kind = 'step.succeeded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(successes, 400);
}

#[tokio::test]
async fn a_slow_tool_in_one_run_does_not_hold_up_another_runs_steps() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let slow = FakeServer::start(200, json!({"slow": true}), Duration::from_secs(5)).await;
    let fast = FakeServer::start(200, json!({"fast": true}), Duration::ZERO).await;
    let slow_tool = tool_named(&api, &ada, &p, "slow", slow.url("/")).await;
    let fast_tool = tool_named(&api, &ada, &p, "fast", fast.url("/")).await;
    let slow_wf = workflow(
        &api,
        &ada,
        &p,
        json!([{"key": "wait", "kind": "tool", "tool_id": slow_tool["id"], "input": {}}]),
    )
    .await;
    let fast_wf = workflow(&api, &ada, &p, json!([
        {"key": "one", "kind": "tool", "tool_id": fast_tool["id"], "input": {}},
        {"key": "two", "kind": "tool", "tool_id": fast_tool["id"], "input": {}, "depends_on": ["one"]},
        {"key": "three", "kind": "tool", "tool_id": fast_tool["id"], "input": {}, "depends_on": ["two"]},
    ]))
    .await;
    let slow_run = api.start_run(&ada.access, &json!(slow_wf), json!({})).await;
    let slow_id = slow_run["id"].as_str().unwrap();
    // The slow call is in flight...
    crate::common::eventually(async || (!slow.received().is_empty()).then_some(())).await;
    let fast_run = api.start_run(&ada.access, &json!(fast_wf), json!({})).await;
    // ...and the other run's three steps all finish while it still is.
    let done = wait_status(&api, &ada, fast_run["id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(done["steps"], json!({"succeeded": 3}));
    let slow_now = api
        .call(
            "GET",
            &format!("/api/v1/runs/{slow_id}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(slow_now["status"], "running");
    assert_eq!(fast.received().len(), 3);
    wait_status(&api, &ada, slow_id, "succeeded").await;
}

// ---- Retention ------------------------------------------------------------------------------

#[tokio::test]
async fn retention_removes_old_step_payloads_and_keeps_the_record() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p) = project(&api).await;
    let wf = workflow(
        &api,
        &ada,
        &p,
        json!([cond("only", &[], json!({"secret-ish": "{{ input.v }}"}))]),
    )
    .await;
    let run = api.run_to_end(&ada.access, &wf, json!({"v": 42})).await;
    let id = run["id"].as_str().unwrap();
    // Inside the 30 days of the default retention, nothing is removed.
    api.sweep_at(29 * 86_400).await;
    let step = step_of(&api, &ada, id, "only").await;
    assert_eq!(step["output"], json!({"secret-ish": 42}));
    api.sweep_at(31 * 86_400).await;
    let step = step_of(&api, &ada, id, "only").await;
    assert_eq!(
        (&step["status"], &step["input"], &step["output"]),
        (&json!("succeeded"), &Value::Null, &Value::Null)
    );
    let run = api
        .call(
            "GET",
            &format!("/api/v1/runs/{id}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert!(run["payloads_pruned_at"].is_string(), "{run}");
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["output"], json!({"only": {"secret-ish": 42}}));
}

// ---- Pause and resume -----------------------------------------------------------------------

#[tokio::test]
async fn a_paused_chain_finishes_its_running_step_starts_nothing_and_resumes_where_it_stopped() {
    let api = Api::for_fakes(None, &[("SPIN_VARIABLE_METRICS_TOKEN", "operator-token")]).await;
    let (ada, p) = project(&api).await;
    let fake = FakeServer::start(200, json!({"ok": true}), Duration::from_millis(1500)).await;
    let tool = tool(&api, &ada, &p, fake.url("/")).await;
    let step = |key: &str, after: &[&str]| json!({"key": key, "kind": "tool", "tool_id": tool["id"], "input": {"step": key}, "depends_on": after});
    let wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "Chain", "timeout_s": 60,
            "definition": {"steps": [step("a", &[]), step("b", &["a"]), step("c", &["b"])]}}),
        )
        .await;
    let run = api.start_run(&ada.access, &wf["id"], json!({})).await;
    let id = run["id"].as_str().unwrap();
    crate::common::eventually(async || (fake.received().len() == 1).then_some(())).await;
    let call = |verb: &str| {
        let path = format!("/api/v1/runs/{id}/{verb}");
        let token = ada.access.clone();
        let api = &api;
        async move { api.call("POST", &path, Some(&token), None).await }
    };
    let paused = call("pause").await;
    assert_eq!(paused.status, 200);
    assert_eq!(paused.json()["status"], "paused");
    assert!(paused.json()["paused_at"].is_string());
    // The running step finishes and is recorded; the next one does not start, whatever
    // the sweeper finds, and the run's timeout stands still.
    crate::common::eventually(async || {
        (step_of(&api, &ada, id, "a").await["status"] == "succeeded").then_some(())
    })
    .await;
    api.sweep_at(0).await;
    api.sweep_at(120).await;
    let run = api
        .call(
            "GET",
            &format!("/api/v1/runs/{id}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(run["status"], "paused");
    assert_eq!(step_of(&api, &ada, id, "b").await["status"], "pending");
    // The operator's metrics count it among the active runs, as paused.
    let metrics = crate::common::request(
        "GET",
        &api.app.url("/metrics"),
        &[("authorization", "Bearer operator-token")],
        None,
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l == "sparkops_runs_active{status=\"paused\"} 1"),
        "{text}"
    );
    assert_eq!(fake.received().len(), 1);
    assert_eq!(
        call("pause").await.status,
        200,
        "pausing twice is the same request"
    );

    let resumed = call("resume").await;
    assert_eq!(resumed.status, 200);
    let run = api.finished_run(&ada.access, id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["paused_at"], Value::Null);
    // Every step once, in order.
    let steps: Vec<String> = fake
        .received()
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.body).unwrap()["step"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(steps, ["a", "b", "c"]);
    let events: Vec<String> = api
        .run_items(&ada.access, &run, "events")
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    let at = |k: &str| events.iter().position(|e| e == k).unwrap();
    assert!(at("run.paused") < at("run.resumed") && at("run.resumed") < at("run.succeeded"));
    // A finished run is neither paused nor resumed.
    assert_eq!(call("pause").await.status, 409);
    assert_eq!(call("resume").await.status, 409);
    let eve = api.register("eve").await;
    let path = format!("/api/v1/runs/{id}/pause");
    assert_eq!(
        api.status("POST", &path, Some(&eve.access), None).await,
        404
    );
}
