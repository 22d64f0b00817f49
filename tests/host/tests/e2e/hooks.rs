//! Event-triggered runs end to end: `POST /hooks/{id}` signed the three ways a trigger
//! verifies (Standard Webhooks, GitHub's `X-Hub-Signature-256`, a bearer secret), each
//! signature made here from the specifications (`webhooks::hmac_sha256`), not with the
//! project's code; runs started through the real components with the rendered input.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Api, FakeServer, Reply, User, request_raw};
use crate::webhooks::{hmac_sha256, standard_signature};

async fn setup(api: &Api) -> (User, String, String, FakeServer) {
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Hooks"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let echo = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let tool = api
        .create(
            &ada.access,
            "/api/v1/tools",
            json!({"project_id": p, "name": "echo", "description": "echo",
                "input_schema": {"type": "object"}, "http": {"method": "POST", "url": echo.url("/echo")}}),
        )
        .await;
    let wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "On push",
                "input_schema": {"type": "object", "required": ["repo"],
                    "properties": {"repo": {"type": "string"}, "commits": {"type": "integer"}}},
                "definition": {"steps": [{"key": "call", "kind": "tool", "tool_id": tool["id"],
                    "input": {"repo": "{{ input.repo }}", "event": "{{ input.event }}"}}]}}),
        )
        .await;
    (ada, p, wf["id"].as_str().unwrap().to_string(), echo)
}

async fn trigger(api: &Api, who: &User, p: &str, wf: &str, extra: Value) -> Value {
    let mut body = json!({"project_id": p, "name": "push", "workflow_id": wf,
        "input_template": {"repo": "{{ body.repository.full_name }}",
            "commits": "{{ body.size }}", "event": "{{ headers.x-event-kind }}"}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let res = api
        .call("POST", "/api/v1/triggers", Some(&who.access), Some(body))
        .await;
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    res.json()
}

async fn post(api: &Api, id: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut headers = headers.to_vec();
    headers.push(("content-type", "application/json"));
    request_raw(
        "POST",
        &api.url(&format!("/hooks/{id}")),
        &headers,
        body.to_vec(),
    )
    .await
    .unwrap()
}

/// Headers of a Standard Webhooks message `msg` sent at `at`, signed with `secret`.
fn standard(secret: &str, msg: &str, at: i64, body: &[u8]) -> Vec<(String, String)> {
    vec![
        ("webhook-id".into(), msg.into()),
        ("webhook-timestamp".into(), at.to_string()),
        (
            "webhook-signature".into(),
            standard_signature(secret, msg, at, body),
        ),
        ("x-event-kind".into(), "push".into()),
    ]
}

fn refs(h: &[(String, String)]) -> Vec<(&str, &str)> {
    h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn refused(api: &Api, who: &User, id: &str) -> i64 {
    api.call(
        "GET",
        &format!("/api/v1/triggers/{id}"),
        Some(&who.access),
        None,
    )
    .await
    .json()["refused_count"]
        .as_i64()
        .unwrap()
}

const PUSH: &[u8] =
    br#"{"repository": {"full_name": "acme/rocket"}, "size": 3, "ref": "refs/heads/main"}"#;

#[tokio::test]
async fn a_standard_webhooks_delivery_starts_one_run_with_the_rendered_input() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p, wf, echo) = setup(&api).await;
    let t = trigger(&api, &ada, &p, &wf, json!({})).await;
    let (id, secret) = (t["id"].as_str().unwrap(), t["secret"].as_str().unwrap());
    assert_eq!(
        (&t["verification"], &t["url"]),
        (&json!("standard_webhooks"), &json!(format!("/hooks/{id}")))
    );
    let runs_before = api.count("runs").await;

    // A wrong signature, an old timestamp, no headers: 401, nothing but the counter.
    let other = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let bad = standard(other, "msg_1", now(), PUSH);
    assert_eq!(post(&api, id, &refs(&bad), PUSH).await.status, 401);
    let old = standard(secret, "msg_1", now() - 600, PUSH);
    let res = post(&api, id, &refs(&old), PUSH).await;
    assert_eq!(res.status, 401);
    assert!(res.json()["detail"].as_str().unwrap().contains("timestamp"));
    assert_eq!(post(&api, id, &[], PUSH).await.status, 401);
    // Signed for another body.
    let other_body = standard(secret, "msg_1", now(), b"{}");
    assert_eq!(post(&api, id, &refs(&other_body), PUSH).await.status, 401);
    assert_eq!(refused(&api, &ada, id).await, 4);
    assert_eq!(api.count("runs").await, runs_before);

    let good = standard(secret, "msg_1", now(), PUSH);
    let res = post(&api, id, &refs(&good), PUSH).await;
    assert_eq!(res.status, 202, "{}", String::from_utf8_lossy(&res.body));
    let run_id = res.json()["run_id"].as_str().unwrap().to_string();
    let run = api.finished_run(&ada.access, &run_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["trigger_id"], id);
    assert_eq!(
        run["input"],
        json!({"repo": "acme/rocket", "commits": 3, "event": "push"})
    );
    let calls = echo.received();
    assert_eq!(
        serde_json::from_slice::<Value>(&calls[0].body).unwrap(),
        json!({"repo": "acme/rocket", "event": "push"})
    );

    // The sender redelivers (same id, signed again later): the first answer, no new run.
    let again = standard(secret, "msg_1", now() + 5, PUSH);
    let res = post(&api, id, &refs(&again), PUSH).await;
    assert_eq!(res.status, 202);
    assert_eq!(res.header("idempotent-replayed"), Some("true"));
    assert_eq!(res.json()["run_id"], run_id.as_str());
    assert_eq!(api.count("runs").await, runs_before + 1);
    let listed = api
        .call(
            "GET",
            &format!("/api/v1/runs?project_id={p}&trigger_id={id}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);

    // An input the workflow's schema refuses: 422 naming the field, no run.
    let wrong = br#"{"repository": {"full_name": 7}, "size": 1}"#;
    let h = standard(secret, "msg_2", now(), wrong);
    let res = post(&api, id, &refs(&h), wrong).await;
    assert_eq!(res.status, 422);
    assert_eq!(res.json()["errors"][0]["field"], "input/repo");
    assert_eq!(api.count("runs").await, runs_before + 1);
    // A disabled trigger is no trigger.
    api.call(
        "PATCH",
        &format!("/api/v1/triggers/{id}"),
        Some(&ada.access),
        Some(json!({"enabled": false})),
    )
    .await;
    let h = standard(secret, "msg_3", now(), PUSH);
    assert_eq!(post(&api, id, &refs(&h), PUSH).await.status, 404);
}

#[tokio::test]
async fn github_and_bearer_triggers_verify_their_own_way() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p, wf, _) = setup(&api).await;
    let gh_secret = "a shared secret typed into GitHub";
    let gh = trigger(
        &api,
        &ada,
        &p,
        &wf,
        json!({"verification": "github", "secret": gh_secret}),
    )
    .await;
    assert!(gh.get("secret").is_none(), "a given secret is never shown");
    let gh_id = gh["id"].as_str().unwrap();
    let sign = |body: &[u8]| {
        let mac = hmac_sha256(gh_secret.as_bytes(), body);
        format!(
            "sha256={}",
            mac.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    let sig = sign(PUSH);
    let headers = [
        ("x-hub-signature-256", sig.as_str()),
        ("x-github-delivery", "d-1"),
        ("x-event-kind", "push"),
    ];
    let res = post(&api, gh_id, &headers, PUSH).await;
    assert_eq!(res.status, 202, "{}", String::from_utf8_lossy(&res.body));
    let first = res.json()["run_id"].clone();
    let res = post(&api, gh_id, &headers, PUSH).await;
    assert_eq!(res.json()["run_id"], first, "a redelivery starts nothing");
    let wrong = sign(b"{}");
    let res = post(
        &api,
        gh_id,
        &[
            ("x-hub-signature-256", wrong.as_str()),
            ("x-github-delivery", "d-2"),
        ],
        PUSH,
    )
    .await;
    assert_eq!(res.status, 401);
    assert_eq!(refused(&api, &ada, gh_id).await, 1);

    let bearer = trigger(&api, &ada, &p, &wf, json!({"verification": "bearer"})).await;
    let (b_id, b_secret) = (
        bearer["id"].as_str().unwrap(),
        bearer["secret"].as_str().unwrap(),
    );
    assert_eq!(b_secret.len(), 64);
    let auth = format!("Bearer {b_secret}");
    let res = post(&api, b_id, &[("authorization", auth.as_str())], PUSH).await;
    assert_eq!(res.status, 202);
    let res = post(&api, b_id, &[("authorization", "Bearer guess")], PUSH).await;
    assert_eq!(res.status, 401);
    // A trigger of one project is not another's to read.
    let eve = api.register("eve").await;
    assert_eq!(
        api.status(
            "GET",
            &format!("/api/v1/triggers/{b_id}"),
            Some(&eve.access),
            None
        )
        .await,
        404
    );
    // Changing the verification needs a secret that fits it.
    let res = api
        .call(
            "PATCH",
            &format!("/api/v1/triggers/{b_id}"),
            Some(&ada.access),
            Some(json!({"verification": "standard_webhooks"})),
        )
        .await;
    assert_eq!(res.status, 422);
    assert_eq!(res.json()["errors"][0]["field"], "secret");
}

#[tokio::test]
async fn bad_trigger_definitions_are_refused_and_change_nothing() {
    let api = Api::for_fakes(None, &[]).await;
    let (ada, p, wf, _) = setup(&api).await;
    let before = api.count("triggers").await;
    for (body, field) in [
        (
            json!({"name": "x", "workflow_id": wf, "input_template": {"a": "{{ input.repo }}"}}),
            "input_template.a",
        ),
        (
            json!({"name": "x", "workflow_id": wf, "verification": "hope"}),
            "verification",
        ),
        (
            json!({"name": "x", "workflow_id": wf, "secret": "whsec_short"}),
            "secret",
        ),
        (
            json!({"name": "x", "workflow_id": uuid::Uuid::new_v4().to_string()}),
            "workflow_id",
        ),
        (json!({"name": "x"}), "workflow_id"),
    ] {
        let mut body = body;
        body["project_id"] = json!(p);
        let res = api
            .call(
                "POST",
                "/api/v1/triggers",
                Some(&ada.access),
                Some(body.clone()),
            )
            .await;
        assert_eq!(res.status, 422, "{body}");
        assert_eq!(res.json()["errors"][0]["field"], field, "{body}");
    }
    assert_eq!(api.count("triggers").await, before);
    assert_eq!(api.count("signing_secrets").await, 0);
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(post(&api, &unknown, &[], PUSH).await.status, 404);
}
