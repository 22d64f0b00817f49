//! The app as separate `sparkops up` processes on one Postgres and Redis, as replicas run in
//! a cluster: a host killed with SIGKILL in the middle of a step, and two hosts sharing a
//! batch of runs. Each process has its own address, executor and Redis subscription, and
//! hands claimed steps to its own executor (`dispatch_url`).

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use sparkops_host::RunningApp;

use crate::common::process::{Process, wait_for_health};
use crate::common::{Client, FakeServer, OPEN_URL_RULES, TestEnv, User, count, every_run_finished};
use crate::engine::{LEASE_S, tool_named, wait_status, workflow};

/// The app's Redis-backed key-value store, as every test app has it.
fn runtime_config(env: &TestEnv) -> String {
    format!(
        "[key_value_store.default]\ntype = \"redis\"\nurl = \"{}\"\n",
        env.redis_url
    )
}

/// `sparkops up` as a process of its own, serving the app on `env`'s database and Redis;
/// compiled components come from the tests' shared cache.
async fn host_process(env: &TestEnv, name: &str) -> (Process, Client) {
    let options = env.options("spin.toml", Some(&runtime_config(env)));
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let args = [
        "up".into(),
        "--manifest".into(),
        path(&options.manifest),
        "--runtime-config-file".into(),
        path(options.runtime_config.as_ref().unwrap()),
        "--listen".into(),
        options.listen.to_string(),
        "--state-dir".into(),
        path(&options.state_dir.join("host")),
        "--cache-dir".into(),
        path(options.cache_dir.as_ref().unwrap()),
        // Named, not left to an inherited `DATABASE_URL` (the test command exports the
        // server's): the test's database, already migrated, so nothing to apply.
        "--database-url".into(),
        env.database_url.clone(),
        "--migrations".into(),
        path(&crate::common::workspace().join("migrations")),
    ];
    let mut vars = options.env.clone();
    vars.extend(OPEN_URL_RULES.map(|(k, v)| (k.into(), v.into())));
    let program = Path::new(env!("CARGO_BIN_EXE_sparkops"));
    let mut up = Process::spawn(name, program, &args, &vars, &options.state_dir);
    let client = wait_for_health(options.listen, &mut [&mut up]).await;
    (up, client)
}

async fn project(api: &Client) -> (User, String) {
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Replicas"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    (ada, p)
}

async fn events(api: &Client, who: &User, run_id: &str) -> Vec<Value> {
    let path = format!("/api/v1/runs/{run_id}/events");
    let events = api.call("GET", &path, Some(&who.access), None).await.json();
    events["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_host_killed_mid_step_gives_the_step_back_a_lease_later_and_the_run_finishes() {
    let env = TestEnv::new().await;
    let (mut doomed, api) = host_process(&env, "doomed").await;
    let (ada, p) = project(&api).await;
    // The first call never gets its answer to the host that made it.
    let fake = FakeServer::start(200, json!({"ok": true}), Duration::from_secs(2)).await;
    let tool = tool_named(&api, &ada, &p, "slow", fake.url("/")).await;
    let wf = workflow(
        &api,
        &ada,
        &p,
        json!([
            {"key": "call", "kind": "tool", "tool_id": tool["id"], "input": {}},
            {"key": "after", "kind": "condition", "depends_on": ["call"],
             "input": {"ok": "{{ steps.call.output.ok }}"}},
        ]),
    )
    .await;
    let run = api.start_run(&ada.access, &json!(wf), json!({})).await;
    let id = run["id"].as_str().unwrap().to_string();
    crate::common::eventually(async || (!fake.received().is_empty()).then_some(())).await;
    doomed.kill();

    // Another host on the same database; its sweeper runs only when the test fires it.
    let mut options = env.options("spin.toml", Some(&runtime_config(&env)));
    for (k, v) in OPEN_URL_RULES {
        options.env.insert(k.into(), v.into());
    }
    let survivor = RunningApp::start(&options).await.expect("the app starts");
    survivor
        .inner
        .faults()
        .pause_cron
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let api = Client::new(survivor.url(""));
    let sweep_at = async |at: i64| {
        survivor
            .inner
            .handle_cron("sweeper", at as u64)
            .await
            .unwrap();
    };
    // The lease the dead host last held: one lease from its claim or last renewal, though
    // the step's timeout (the default 300 s) is far off.
    let db = env.db().await;
    let (leased_for, expires_at): (f64, f64) = {
        let row = db
            .query_one(
                "select extract(epoch from lease_expires_at - started_at)::float8,
                        extract(epoch from lease_expires_at)::float8
                 from run_steps where run_id = $1::text::uuid and step_key = 'call'",
                &[&id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(leased_for <= LEASE_S as f64, "{leased_for}");
    // Within the lease the step is still the dead host's; just past it, it comes back.
    sweep_at(expires_at as i64 - 2).await;
    assert_eq!(fake.received().len(), 1);
    sweep_at(expires_at as i64 + 1).await;
    let done = wait_status(&api, &ada, &id, "succeeded").await;
    assert_eq!(done["output"], json!({"after": {"ok": true}}));
    let events = events(&api, &ada, &id).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let taken_back: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "step.lease_expired")
        .collect();
    assert_eq!(taken_back.len(), 1, "{kinds:?}");
    assert!(
        taken_back[0]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("stopped answering"),
        "{taken_back:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "step.succeeded").count(),
        2,
        "call once, after once: {kinds:?}"
    );
    // Both attempts carried the same key: the tool can tell the second is a repeat.
    assert_eq!(fake.idempotency_keys(), vec![format!("{id}:call"); 2]);
}

#[tokio::test]
async fn two_hosts_on_one_database_run_two_hundred_runs_with_every_step_once() {
    let env = TestEnv::new().await;
    let (first, one) = host_process(&env, "one").await;
    let (second, two) = host_process(&env, "two").await;
    let (ada, p) = project(&one).await;
    let fake = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let tool = tool_named(&one, &ada, &p, "echo", fake.url("/")).await;
    let wf = json!(
        workflow(
            &one,
            &ada,
            &p,
            json!([
                {"key": "a", "kind": "tool", "tool_id": tool["id"], "input": {}},
                {"key": "b", "kind": "tool", "tool_id": tool["id"], "input": {}, "depends_on": ["a"]},
                {"key": "c", "kind": "tool", "tool_id": tool["id"], "input": {}, "depends_on": ["a"]},
                {"key": "d", "kind": "condition", "depends_on": ["b", "c"], "input": {}},
            ]),
        )
        .await
    );
    // Sixteen clients at a time, alternating between the hosts.
    let ids: Vec<String> = futures::stream::iter(0..200)
        .map(|i| {
            let (api, ada, wf) = (if i % 2 == 0 { &one } else { &two }, &ada, &wf);
            async move {
                api.start_run(&ada.access, wf, json!({})).await["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        })
        .buffered(16)
        .collect()
        .await;
    let db = env.db().await;
    every_run_finished(&db, Duration::from_secs(120)).await;
    let succeeded = count(&db, "select count(*) from runs where status = 'succeeded'").await;
    assert_eq!(succeeded, 200, "{}\n{}", first.log(), second.log());
    // Every tool step called once (its key is its run and step), every step started once.
    let mut keys = fake.idempotency_keys();
    keys.sort();
    let mut want: Vec<String> = ids
        .iter()
        .flat_map(|r| ["a", "b", "c"].map(|s| format!("{r}:{s}")))
        .collect();
    want.sort();
    assert_eq!(keys, want);
    let started = count(
        &db,
        "select count(*) from run_events where kind = 'step.started'",
    )
    .await;
    assert_eq!(started, 200 * 4);
    // Both hosts ran steps: each executes what its own requests and results claim.
    let steps_run = |log: String| log.matches(r#""msg":"step""#).count();
    let (by_one, by_two) = (steps_run(first.log()), steps_run(second.log()));
    assert_eq!(by_one + by_two, 200 * 4, "one {by_one}, two {by_two}");
    assert!(by_one > 0 && by_two > 0, "one {by_one}, two {by_two}");
}
