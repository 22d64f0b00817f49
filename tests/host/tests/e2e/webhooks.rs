//! Outgoing webhooks end to end: events of real runs, schedules and budgets, queued by the
//! engine and delivered by the `notifier` cron component to a fake receiver on loopback.
//! Every delivery is verified here by an implementation of the Standard Webhooks
//! specification written from the specification (HMAC-SHA256 from SHA-256, RFC 2104), not
//! with the project's signing code.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{Answer, Api, FakeServer, Recorded, User, openai};

// ---- Standard Webhooks, from the specification ---------------------------------------------

/// HMAC-SHA256 (RFC 2104) over SHA-256's 64-byte blocks.
pub(crate) fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The key of a `whsec_` secret: the base64 after the prefix.
pub(crate) fn whsec_key(secret: &str) -> Vec<u8> {
    STANDARD
        .decode(secret.strip_prefix("whsec_").expect("a whsec_ secret"))
        .unwrap()
}

/// The `v1,` signature of a message as the specification defines it.
pub(crate) fn standard_signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    format!(
        "v1,{}",
        STANDARD.encode(hmac_sha256(&whsec_key(secret), &signed))
    )
}

/// Checks a received delivery as a receiver would: the three headers, a timestamp within
/// five minutes, and a `v1` signature by `secret` among those sent. The payload.
fn verified(r: &Recorded, secret: &str) -> Value {
    let header = |name: &str| {
        r.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_string()
    };
    let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
    assert!(id.starts_with("msg_"), "{id}");
    let timestamp: i64 = timestamp.parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 300);
    let expected = standard_signature(secret, &id, timestamp, &r.body);
    assert!(
        header("webhook-signature")
            .split(' ')
            .any(|s| s == expected),
        "no signature of {id} verifies"
    );
    assert_eq!(header("content-type"), "application/json");
    serde_json::from_slice(&r.body).unwrap()
}

// ---- Helpers --------------------------------------------------------------------------------

async fn project(api: &Api, who: &User) -> String {
    api.create_project(who, json!({"name": "Hooked"})).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn webhook(api: &Api, who: &User, p: &str, url: String, types: Value) -> Value {
    let res = api
        .call(
            "POST",
            "/api/v1/webhooks",
            Some(&who.access),
            Some(json!({"project_id": p, "url": url, "event_types": types})),
        )
        .await;
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    res.json()
}

async fn workflow(api: &Api, who: &User, p: &str, extra: Value) -> String {
    let mut body = json!({"project_id": p, "name": format!("W {}", uuid::Uuid::new_v4())});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    api.create(&who.access, "/api/v1/workflows", body).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn approval_steps() -> Value {
    json!({"steps": [{"key": "gate", "kind": "approval", "input": {}, "approval": {"timeout_s": 3600}}]})
}

async fn tool(api: &Api, who: &User, p: &str, url: String) -> String {
    api.create(
        &who.access,
        "/api/v1/tools",
        json!({"project_id": p, "name": format!("t{}", uuid::Uuid::new_v4().simple()),
            "description": "a tool", "input_schema": {"type": "object"},
            "http": {"method": "POST", "url": url}}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn status_of(api: &Api, who: &User, run: &str) -> String {
    get_json(api, who, &format!("/api/v1/runs/{run}")).await["status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The deliveries the receiver got, verified, until `done` says enough arrived.
async fn received_until(
    receiver: &FakeServer,
    secret: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    crate::common::eventually_for(Duration::from_secs(30), async || {
        let got: Vec<Value> = receiver
            .received()
            .iter()
            .map(|r| verified(r, secret))
            .collect();
        done(&got).then_some(got)
    })
    .await
}

/// `GET path` as `who`: the JSON answer.
async fn get_json(api: &Api, who: &User, path: &str) -> Value {
    api.call("GET", path, Some(&who.access), None).await.json()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn test_event(api: &Api, who: &User, hook: &str) -> Value {
    let res = api
        .call(
            "POST",
            &format!("/api/v1/webhooks/{hook}/test"),
            Some(&who.access),
            None,
        )
        .await;
    assert_eq!(res.status, 202, "{}", String::from_utf8_lossy(&res.body));
    res.json()
}

async fn delivery(api: &Api, who: &User, hook: &str, id: &str) -> Value {
    get_json(
        api,
        who,
        &format!("/api/v1/webhooks/{hook}/deliveries/{id}"),
    )
    .await
}

// ---- Tests ----------------------------------------------------------------------------------

#[tokio::test]
async fn every_event_type_reaches_the_receiver_signed() {
    let provider = FakeServer::answering(vec![openai::text("ok", 0, 1000)], Duration::ZERO).await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let ada = api.register("ada").await;
    let p = project(&api, &ada).await;
    let receiver = FakeServer::start(204, json!({}), Duration::ZERO).await;
    let types = json!([
        "run.succeeded",
        "run.failed",
        "run.timed_out",
        "run.cancelled",
        "step.waiting_approval",
        "budget.alert",
        "budget.held",
        "schedule.skipped",
        "schedule.refused"
    ]);
    let hook = webhook(&api, &ada, &p, receiver.url("/in"), types.clone()).await;
    let secret = hook["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(hook["event_types"], types);

    // Succeeded and failed: a tool that answers, and one that refuses.
    let ok = FakeServer::start(200, json!({"fine": true}), Duration::ZERO).await;
    let bad = FakeServer::start(400, json!({"error": "no"}), Duration::ZERO).await;
    let step = |tool: &str| {
        json!({"steps": [{"key": "call", "kind": "tool", "tool_id": tool, "input": {},
            "retry": {"max_attempts": 1}}]})
    };
    let ok_tool = tool(&api, &ada, &p, ok.url("/")).await;
    let bad_tool = tool(&api, &ada, &p, bad.url("/")).await;
    let succeeding = workflow(&api, &ada, &p, json!({"definition": step(&ok_tool)})).await;
    let failing = workflow(&api, &ada, &p, json!({"definition": step(&bad_tool)})).await;
    let succeeded = api.run_to_end(&ada.access, &succeeding, json!({})).await;
    let failed = api.run_to_end(&ada.access, &failing, json!({})).await;
    assert_eq!(
        (&succeeded["status"], &failed["status"]),
        (&json!("succeeded"), &json!("failed"))
    );

    // A budget alert: one call costs 0.01, past the alert at 0.005.
    api.set_price(&ada.access, &p, "fake/small", "0", "10")
        .await;
    let agent = api
        .create(
            &ada.access,
            "/api/v1/agents",
            json!({"project_id": p, "name": "terse", "model": "fake/small", "system_prompt": "Be terse.", "max_tokens": 1000}),
        )
        .await;
    api.create(
        &ada.access,
        "/api/v1/policies",
        json!({"project_id": p, "name": "Watch", "rules": {"budget": {"limit_usd": "0.005", "window": "month", "action": "alert"}}}),
    )
    .await;
    let asking = workflow(&api, &ada, &p, json!({"definition": {"steps": [
        {"key": "ask", "kind": "agent", "agent_id": agent["id"], "input": "hi", "retry": {"max_attempts": 1}}]}}))
    .await;
    let alerted = api.run_to_end(&ada.access, &asking, json!({})).await;
    assert_eq!(alerted["status"], "succeeded", "{alerted}");
    // A budget hold: a blocking budget that asks, too small for the next call's worst case.
    api.create(
        &ada.access,
        "/api/v1/policies",
        json!({"project_id": p, "name": "Ask", "scope": {"workflow_id": asking},
            "rules": {"budget": {"limit_usd": "0.005", "window": "month", "on_exhausted": "ask"}}}),
    )
    .await;
    let held = api.start_run(&ada.access, &json!(asking), json!({})).await;
    let held = held["id"].as_str().unwrap().to_string();
    crate::common::eventually(async || {
        (status_of(&api, &ada, &held).await == "waiting").then_some(())
    })
    .await;

    // An approval awaited, a fire skipped by the overlap rule, one refused by a policy, and
    // a cancel.
    let gated = workflow(&api, &ada, &p, json!({"definition": approval_steps()})).await;
    let schedule = |overlap: &str| json!({"project_id": p, "workflow_id": gated, "cron": "0 0 0 1 1 *", "overlap": overlap});
    let skip = api
        .create(&ada.access, "/api/v1/schedules", schedule("skip"))
        .await;
    let allow = api
        .create(&ada.access, "/api/v1/schedules", schedule("allow"))
        .await;
    // Fires by the scheduler, at times its own ticks (now) never reach.
    let fire = async |s: &Value, at: i64| {
        let id = s["id"].as_str().unwrap();
        let at = chrono::DateTime::from_timestamp(at, 0).unwrap();
        crate::scheduler::set_next(&api, id, at).await;
        api.tick("scheduler", at.timestamp() + 1).await;
    };
    let t = now() + 3600;
    fire(&skip, t).await;
    let runs = get_json(
        &api,
        &ada,
        &format!(
            "/api/v1/runs?project_id={p}&schedule_id={}",
            skip["id"].as_str().unwrap()
        ),
    )
    .await;
    let waiting = runs["items"][0]["id"]
        .as_str()
        .expect("the first fire starts a run")
        .to_string();
    crate::common::eventually(async || {
        (status_of(&api, &ada, &waiting).await == "waiting").then_some(())
    })
    .await;
    fire(&skip, t + 60).await;
    api.create(
        &ada.access,
        "/api/v1/policies",
        json!({"project_id": p, "name": "One", "scope": {"workflow_id": gated}, "rules": {"max_concurrent_runs": 1}}),
    )
    .await;
    fire(&allow, t + 120).await;
    assert_eq!(api.cancel(&ada.access, &waiting).await.status, 202);

    // A run past its timeout.
    let slow = workflow(
        &api,
        &ada,
        &p,
        json!({"timeout_s": 60, "definition": approval_steps()}),
    )
    .await;
    let late = api.start_run(&ada.access, &json!(slow), json!({})).await;
    let late = late["id"].as_str().unwrap().to_string();
    crate::common::eventually(async || {
        (status_of(&api, &ada, &late).await == "waiting").then_some(())
    })
    .await;
    api.sweep_at(120).await;

    let all: HashSet<String> = types
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let got = received_until(&receiver, &secret, |got| {
        let seen: HashSet<String> = got
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        seen == all
    })
    .await;
    let of = |t: &str, run: &str| {
        got.iter()
            .find(|e| e["type"] == t && (run.is_empty() || e["data"]["run_id"] == run))
            .unwrap_or_else(|| panic!("no {t} for {run}"))
            .clone()
    };
    for e in &got {
        assert_eq!(e["data"]["project_id"], p, "{e}");
        assert!(chrono::DateTime::parse_from_rfc3339(e["timestamp"].as_str().unwrap()).is_ok());
    }
    let s = of("run.succeeded", succeeded["id"].as_str().unwrap());
    assert_eq!(
        (&s["data"]["status"], &s["data"]["workflow_id"]),
        (&json!("succeeded"), &json!(succeeding))
    );
    let f = of("run.failed", failed["id"].as_str().unwrap());
    assert_eq!(f["data"]["error"]["kind"], failed["error"]["kind"]);
    assert_eq!(of("run.cancelled", &waiting)["data"]["status"], "cancelled");
    assert_eq!(of("run.timed_out", &late)["data"]["status"], "timed_out");
    // Told by the run's first advance, with the run as that advance left it.
    let w = of("step.waiting_approval", &waiting);
    assert_eq!(
        (
            &w["data"]["step_key"],
            &w["data"]["detail"]["timeout_s"],
            &w["data"]["status"]
        ),
        (&json!("gate"), &json!(3600), &json!("waiting"))
    );
    let b = of("budget.alert", alerted["id"].as_str().unwrap());
    assert_eq!(b["data"]["detail"]["policy"], "Watch");
    let h = of("budget.held", &held);
    assert_eq!(
        (
            &h["data"]["step_key"],
            &h["data"]["detail"]["policy"],
            &h["data"]["detail"]["mode"]
        ),
        (&json!("ask"), &json!("Ask"), &json!("ask"))
    );
    let skipped = of("schedule.skipped", "");
    assert_eq!(
        (&skipped["data"]["schedule_id"], &skipped["data"]["manual"]),
        (&skip["id"], &json!(false))
    );
    let refused = of("schedule.refused", "");
    assert_eq!(refused["data"]["schedule_id"], allow["id"]);
    assert!(
        refused["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("max_concurrent_runs")
    );
    // Each event once per webhook: the ids differ.
    let ids: HashSet<String> = receiver
        .received()
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), receiver.received().len());
}

#[tokio::test]
async fn a_failing_receiver_gets_the_same_message_until_it_succeeds() {
    let api = Api::for_fakes(None, &[]).await;
    let ada = api.register("ada").await;
    let p = project(&api, &ada).await;
    let fail = |status: u16| Answer {
        status,
        body: json!({}),
        headers: Vec::new(),
    };
    let receiver = FakeServer::answering(
        vec![
            fail(500),
            fail(502),
            Answer {
                status: 503,
                body: json!({}),
                headers: vec![("retry-after", "120".into())],
            },
            fail(200),
        ],
        Duration::ZERO,
    )
    .await;
    let hook = webhook(
        &api,
        &ada,
        &p,
        receiver.url("/in"),
        json!(["run.succeeded"]),
    )
    .await;
    let (id, secret) = (
        hook["id"].as_str().unwrap(),
        hook["secret"].as_str().unwrap(),
    );
    let sent = test_event(&api, &ada, id).await;
    assert_eq!(
        (&sent["event_type"], &sent["status"]),
        (&json!("webhook.test"), &json!("pending"))
    );
    let d = sent["id"].as_str().unwrap();
    // The notifier's own tick makes the first attempt; the receiver has it before the
    // attempt is recorded, and until then the delivery is leased to that tick.
    crate::common::eventually(async || (receiver.received().len() == 1).then_some(())).await;
    crate::common::eventually(async || {
        let first = delivery(&api, &ada, id, d).await;
        (first["last_response_status"] == 500).then_some(())
    })
    .await;
    let t0 = now() + 3600;
    api.tick("notifier", t0).await;
    assert_eq!(receiver.received().len(), 2);
    api.tick("notifier", t0 + 60).await;
    assert_eq!(
        receiver.received().len(),
        3,
        "the third attempt after the backoff"
    );
    // The 503 said Retry-After 120: a tick before that sends nothing.
    api.tick("notifier", t0 + 120).await;
    assert_eq!(receiver.received().len(), 3);
    let pending = delivery(&api, &ada, id, d).await;
    assert_eq!(
        (
            &pending["status"],
            &pending["attempts"],
            &pending["last_response_status"]
        ),
        (&json!("pending"), &json!(3), &json!(503))
    );
    api.tick("notifier", t0 + 200).await;
    let got = receiver.received();
    assert_eq!(got.len(), 4);
    // Every attempt: the same id and the same bytes, each verifiable.
    let message = got[0].headers["webhook-id"].clone();
    assert!(
        got.iter()
            .all(|r| r.headers["webhook-id"] == message && r.body == got[0].body)
    );
    for r in &got {
        assert_eq!(verified(r, secret)["type"], "webhook.test");
    }
    assert_eq!(message.to_str().unwrap(), sent["message_id"]);
    let done = delivery(&api, &ada, id, d).await;
    assert_eq!(
        (
            &done["status"],
            &done["attempts"],
            &done["last_response_status"]
        ),
        (&json!("delivered"), &json!(4), &json!(200))
    );
    assert_eq!(
        done["payload"],
        serde_json::from_slice::<Value>(&got[0].body).unwrap()
    );
    // Delivered is final: later ticks send nothing.
    api.tick("notifier", t0 + 10_000).await;
    assert_eq!(receiver.received().len(), 4);
    let history = get_json(&api, &ada, &format!("/api/v1/webhooks/{id}/deliveries")).await;
    assert_eq!(history["items"].as_array().unwrap().len(), 1);
    assert!(history["items"][0].get("payload").is_none());
    let webhook = get_json(&api, &ada, &format!("/api/v1/webhooks/{id}")).await;
    assert_eq!(
        webhook["failing_since"],
        Value::Null,
        "a delivery clears the failing mark"
    );
}

#[tokio::test]
async fn a_webhook_failing_for_three_days_is_disabled_and_says_why() {
    let api = Api::for_fakes(None, &[]).await;
    let ada = api.register("ada").await;
    let p = project(&api, &ada).await;
    let receiver = FakeServer::start(500, json!({"down": true}), Duration::ZERO).await;
    let hook = webhook(&api, &ada, &p, receiver.url("/in"), json!(["run.failed"])).await;
    let id = hook["id"].as_str().unwrap();
    // Two deliveries, so the tick that disables the webhook claims both in one batch.
    let d = test_event(&api, &ada, id).await;
    let other = test_event(&api, &ada, id).await;
    crate::common::eventually(async || (receiver.received().len() >= 2).then_some(())).await;
    // The app's own tick recorded that first failure (the webhook failing since now) before
    // the ticks below move the clock on: a tick a day ahead that raced it would otherwise
    // record the first failure as a day later.
    let path = format!("/api/v1/webhooks/{id}");
    crate::common::eventually(async || {
        let hook = get_json(&api, &ada, &path).await;
        hook["failing_since"].is_string().then_some(())
    })
    .await;
    let day = 86_400;
    for at in [1, 2, 3].map(|n| now() + n * day - 60) {
        api.tick("notifier", at).await;
    }
    let still = get_json(&api, &ada, &format!("/api/v1/webhooks/{id}")).await;
    assert_eq!(
        (&still["enabled"], &still["disabled_reason"]),
        (&json!(true), &Value::Null)
    );
    assert!(still["failing_since"].is_string());
    let sent = receiver.received().len();
    api.tick("notifier", now() + 3 * day + 120).await;
    // The batch's first failure disabled the webhook; its other delivery reads the webhook
    // again and ends without a request.
    assert_eq!(
        receiver.received().len(),
        sent + 1,
        "one request in the tick that disabled the webhook"
    );
    let off = get_json(&api, &ada, &format!("/api/v1/webhooks/{id}")).await;
    assert_eq!(off["enabled"], false);
    let reason = off["disabled_reason"].as_str().unwrap();
    assert!(
        reason.contains("3 days") && reason.contains("500"),
        "{reason}"
    );
    for queued in [&d, &other] {
        assert_eq!(
            delivery(&api, &ada, id, queued["id"].as_str().unwrap()).await["status"],
            "failed"
        );
    }
    // Disabled: no event is queued for it; enabling it again clears the reason.
    let test = format!("/api/v1/webhooks/{id}/test");
    assert_eq!(
        api.status("POST", &test, Some(&ada.access), None).await,
        409
    );
    let on = api
        .call(
            "PATCH",
            &format!("/api/v1/webhooks/{id}"),
            Some(&ada.access),
            Some(json!({"enabled": true})),
        )
        .await
        .json();
    assert_eq!(
        (&on["enabled"], &on["disabled_reason"], &on["failing_since"]),
        (&json!(true), &Value::Null, &Value::Null)
    );
}

#[tokio::test]
async fn a_slow_receiver_holds_up_no_run() {
    let api = Api::for_fakes(None, &[("SPIN_VARIABLE_METRICS_TOKEN", "scrape-me")]).await;
    let ada = api.register("ada").await;
    let p = project(&api, &ada).await;
    let receiver = FakeServer::start(200, json!({}), Duration::from_secs(8)).await;
    let hook = webhook(
        &api,
        &ada,
        &p,
        receiver.url("/in"),
        json!(["run.succeeded"]),
    )
    .await;
    let id = hook["id"].as_str().unwrap();
    let ok = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let t = tool(&api, &ada, &p, ok.url("/")).await;
    let chain = workflow(
        &api,
        &ada,
        &p,
        json!({"definition": {"steps": [
        {"key": "a", "kind": "tool", "tool_id": t, "input": {}},
        {"key": "b", "kind": "tool", "tool_id": t, "input": {}, "depends_on": ["a"]},
        {"key": "c", "kind": "tool", "tool_id": t, "input": {}, "depends_on": ["b"]}]}}),
    )
    .await;
    let first = api.run_to_end(&ada.access, &chain, json!({})).await;
    assert_eq!(first["status"], "succeeded");
    // The receiver holds the first run's event for 8 s; a second run starts and ends
    // meanwhile, its own event queued behind.
    crate::common::eventually(async || (!receiver.received().is_empty()).then_some(())).await;
    let second = api.run_to_end(&ada.access, &chain, json!({})).await;
    assert_eq!(second["status"], "succeeded");
    let history = get_json(&api, &ada, &format!("/api/v1/webhooks/{id}/deliveries")).await;
    let statuses: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.len(), 2);
    assert!(
        !statuses.contains(&"delivered"),
        "the first is still in flight: {statuses:?}"
    );
    // Prometheus sees them waiting.
    let scraped = api.call("GET", "/metrics", Some("scrape-me"), None).await;
    let text = String::from_utf8_lossy(&scraped.body).to_string();
    assert!(
        text.contains("sparkops_webhook_deliveries{status=\"pending\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn a_rotated_secret_signs_beside_the_new_one_until_it_expires() {
    let api = Api::for_fakes(None, &[]).await;
    let ada = api.register("ada").await;
    let p = project(&api, &ada).await;
    let receiver = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let hook = webhook(&api, &ada, &p, receiver.url("/in"), json!(["run.failed"])).await;
    let (id, old) = (
        hook["id"].as_str().unwrap(),
        hook["secret"].as_str().unwrap(),
    );
    let rotated = api
        .call(
            "POST",
            &format!("/api/v1/webhooks/{id}/rotate-secret"),
            Some(&ada.access),
            Some(json!({"overlap_s": 3600})),
        )
        .await;
    assert_eq!(rotated.status, 200);
    let new = rotated.json()["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    test_event(&api, &ada, id).await;
    let got = received_until(&receiver, &new, |got| got.len() == 1).await;
    assert_eq!(got[0]["type"], "webhook.test");
    let r = &receiver.received()[0];
    assert_eq!(
        r.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .split(' ')
            .count(),
        2
    );
    verified(r, old);
    // With no overlap, the old secret stops at once.
    let again = api
        .call(
            "POST",
            &format!("/api/v1/webhooks/{id}/rotate-secret"),
            Some(&ada.access),
            Some(json!({"overlap_s": 0})),
        )
        .await
        .json();
    let newest = again["secret"].as_str().unwrap();
    test_event(&api, &ada, id).await;
    crate::common::eventually(async || (receiver.received().len() == 2).then_some(())).await;
    let last = &receiver.received()[1];
    verified(last, newest);
    assert_eq!(
        last.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .split(' ')
            .count(),
        1
    );
    // The secret is never shown again.
    let shown = api
        .call(
            "GET",
            &format!("/api/v1/webhooks/{id}"),
            Some(&ada.access),
            None,
        )
        .await;
    assert!(!String::from_utf8_lossy(&shown.body).contains("whsec_"));
    assert_eq!(shown.json()["secrets_in_use"], 1);
}

#[tokio::test]
async fn webhook_urls_follow_the_tool_url_rules_and_projects_stay_apart() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let p = project(&api, &ada).await;
    let before = api.count("webhooks").await;
    for (url, field) in [
        ("http://127.0.0.1:9/in", "url"),
        ("https://169.254.169.254/latest", "url"),
        ("http://example.com/in", "url"),
    ] {
        let res = api
            .call(
                "POST",
                "/api/v1/webhooks",
                Some(&ada.access),
                Some(json!({"project_id": p, "url": url, "event_types": ["run.failed"]})),
            )
            .await;
        assert_eq!(res.status, 422, "{url}");
        assert_eq!(res.json()["errors"][0]["field"], field);
    }
    for types in [
        json!([]),
        json!(["run.exploded"]),
        json!(["run.failed", "run.failed"]),
        json!("run.failed"),
    ] {
        let res = api
            .call(
                "POST",
                "/api/v1/webhooks",
                Some(&ada.access),
                Some(
                    json!({"project_id": p, "url": "https://example.com/in", "event_types": types}),
                ),
            )
            .await;
        assert_eq!(res.status, 422, "{types}");
    }
    assert_eq!(api.count("webhooks").await, before);
    let hook = webhook(
        &api,
        &ada,
        &p,
        "https://example.com/in".into(),
        json!(["run.failed"]),
    )
    .await;
    let id = hook["id"].as_str().unwrap();
    let eve = api.register("eve").await;
    for (method, path) in [
        ("GET", format!("/api/v1/webhooks/{id}")),
        ("GET", format!("/api/v1/webhooks/{id}/deliveries")),
        ("POST", format!("/api/v1/webhooks/{id}/test")),
        ("POST", format!("/api/v1/webhooks/{id}/rotate-secret")),
        ("DELETE", format!("/api/v1/webhooks/{id}")),
    ] {
        assert_eq!(
            api.status(method, &path, Some(&eve.access), None).await,
            404,
            "{method} {path}"
        );
    }
    assert_eq!(api.count("webhook_deliveries").await, 0);
    assert_eq!(
        api.status(
            "DELETE",
            &format!("/api/v1/webhooks/{id}"),
            Some(&ada.access),
            None
        )
        .await,
        204
    );
}

// ---- Approvals by link ----------------------------------------------------------------------

/// The path of an approval link (its host is `public_url`, not this test app's).
fn link_path(url: &Value) -> String {
    let url = url.as_str().unwrap();
    format!(
        "/api/v1/approvals/{}",
        url.split_once("/api/v1/approvals/").unwrap().1
    )
}

/// The links of the approval event for `run`.
async fn links_for(receiver: &FakeServer, secret: &str, run: &str) -> Vec<Value> {
    let got = received_until(receiver, secret, |got| {
        got.iter()
            .any(|e| e["type"] == "step.waiting_approval" && e["data"]["run_id"] == run)
    })
    .await;
    let event = got
        .into_iter()
        .find(|e| e["type"] == "step.waiting_approval" && e["data"]["run_id"] == run)
        .unwrap();
    event["data"]["links"].as_array().unwrap().clone()
}

#[tokio::test]
async fn approval_links_decide_once_each_until_the_quorum_without_a_login() {
    let api = Api::for_fakes(None, &[]).await;
    let ada = api.register("ada").await;
    let (mia, bob) = (api.register("mia").await, api.register("bob").await);
    let p = project(&api, &ada).await;
    let receiver = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let hook = webhook(
        &api,
        &ada,
        &p,
        receiver.url("/in"),
        json!(["step.waiting_approval"]),
    )
    .await;
    let secret = hook["secret"].as_str().unwrap().to_string();
    let gated = |timeout_s: u64| {
        json!({"definition": {"steps": [
            {"key": "gate", "kind": "approval", "input": {},
                "approval": {"timeout_s": timeout_s, "approvers": [mia.id, bob.id], "quorum": 2}},
            {"key": "after", "kind": "condition", "input": {"ok": "{{ steps.gate.output.approved }}"}, "depends_on": ["gate"]}]}})
    };
    let wf = workflow(&api, &ada, &p, gated(3600)).await;
    let run = api.start_run(&ada.access, &json!(wf), json!({})).await;
    let run_id = run["id"].as_str().unwrap().to_string();
    let links = links_for(&receiver, &secret, &run_id).await;
    assert_eq!(links.len(), 2);
    let of = |who: &User| {
        links
            .iter()
            .find(|l| l["approver"] == who.id.as_str())
            .unwrap()
            .clone()
    };
    let (mia_links, bob_links) = (of(&mia), of(&bob));
    assert!(mia_links["expires_at"].is_string());

    // Looking at a link decides nothing (mail scanners fetch links).
    let look = api
        .call("GET", &link_path(&mia_links["approve_url"]), None, None)
        .await;
    assert_eq!(look.status, 200);
    let view = look.json();
    assert_eq!(
        (&view["decision"], &view["step_status"], &view["used"]),
        (&json!("approve"), &json!("waiting"), &json!(false))
    );
    let page = crate::common::request(
        "GET",
        &api.url(&link_path(&mia_links["approve_url"])),
        &[("accept", "text/html")],
        None,
    )
    .await;
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("default-src 'none'")
    );
    assert!(String::from_utf8_lossy(&page.body).contains("<form method=\"post\">"));

    // Mia approves: one of two, the step waits.
    let decide = |url: &Value, body: Option<Value>| {
        let path = link_path(url);
        let api = &api;
        async move { api.call("POST", &path, None, body).await }
    };
    let res = decide(&mia_links["approve_url"], Some(json!({"comment": "lgtm"}))).await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.json()["status"], "waiting");
    // Her links are spent, both of them.
    assert_eq!(decide(&mia_links["approve_url"], None).await.status, 409);
    assert_eq!(decide(&mia_links["reject_url"], None).await.status, 409);
    // A link whose claims were changed (Bob's, for another step) is no link.
    let token = link_path(&bob_links["approve_url"])
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let (claims, mac) = token.split_once('.').unwrap();
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut forged: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    forged["s"] = json!("after");
    let forged = format!("{}.{mac}", URL_SAFE_NO_PAD.encode(forged.to_string()));
    assert_eq!(
        api.status("POST", &format!("/api/v1/approvals/{forged}"), None, None)
            .await,
        401
    );
    assert_eq!(
        api.status("POST", "/api/v1/approvals/garbage", None, None)
            .await,
        401
    );
    assert_eq!(status_of(&api, &ada, &run_id).await, "waiting");

    // Bob approves: the quorum is met and the run goes on.
    let res = decide(&bob_links["approve_url"], None).await;
    assert_eq!(res.json()["status"], "succeeded");
    let done = api.finished_run(&ada.access, &run_id).await;
    assert_eq!(done["status"], "succeeded");
    let steps = api.run_items(&ada.access, &done, "steps").await;
    let gate = steps.iter().find(|s| s["key"] == "gate").unwrap();
    let by: HashSet<&str> = gate["output"]["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["by"].as_str().unwrap())
        .collect();
    assert_eq!(by, HashSet::from([mia.id.as_str(), bob.id.as_str()]));
    assert!(
        gate["output"]["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["via"] == "link")
    );
    let comment = gate["output"]["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["by"] == mia.id.as_str())
        .unwrap();
    assert_eq!(comment["comment"], "lgtm");
    // The step is decided: Bob's reject link is spent, and so would be any other.
    assert_eq!(decide(&bob_links["reject_url"], None).await.status, 409);

    // A rejection by link fails the step at once.
    let second = api.start_run(&ada.access, &json!(wf), json!({})).await;
    let second_id = second["id"].as_str().unwrap().to_string();
    let links = links_for(&receiver, &secret, &second_id).await;
    let bob_reject = links
        .iter()
        .find(|l| l["approver"] == bob.id.as_str())
        .unwrap()["reject_url"]
        .clone();
    let res = decide(&bob_reject, Some(json!({"comment": "not now"}))).await;
    assert_eq!(res.json()["status"], "failed");
    assert_eq!(
        api.finished_run(&ada.access, &second_id).await["status"],
        "failed"
    );

    // An expired link decides nothing.
    let brief = workflow(&api, &ada, &p, gated(1)).await;
    let third = api.start_run(&ada.access, &json!(brief), json!({})).await;
    let third_id = third["id"].as_str().unwrap().to_string();
    let links = links_for(&receiver, &secret, &third_id).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(decide(&links[0]["approve_url"], None).await.status, 403);
}
