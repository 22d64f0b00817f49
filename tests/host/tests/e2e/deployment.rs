//! The app split the way `infra/kubernetes` deploys it (parts read from the manifests):
//! the API and the engine as SpinApps on the shim (which refuses a cron trigger), the
//! periodic components under the Spin CLI, each part with its own runtime config, all over
//! one database and Redis. Runs and schedules complete with the parts running separately,
//! replicas of a part duplicate nothing, and the exporter part's `block_networks` holds where
//! the app's own URL rules are switched off.

use std::time::Duration as StdDuration;

use chrono::{Duration, Utc};
use serde_json::json;
use sparkops_host::RunningApp;

use crate::common::{Api, FakeServer, TestEnv, column, free_local_address};
use crate::kubernetes::{Part, part_running};

/// Starts one replica of `part` against `env`'s services, handing steps to `api`, with the
/// app's own URL rules switched off (a forgotten setting) so only the runtime config blocks.
async fn start_part(env: &TestEnv, part: &Part, api: &RunningApp) -> RunningApp {
    let mut options = env.options("spin.toml", Some(&part.runtime_config_for(&env.redis_url)));
    options.listen = free_local_address();
    options
        .env
        .insert("SPIN_VARIABLE_DISPATCH_URL".into(), api.url(""));
    for rule in ["TOOLS_ALLOW_HTTP", "TOOLS_ALLOW_PRIVATE_HOSTS"] {
        options
            .env
            .insert(format!("SPIN_VARIABLE_{rule}"), "true".into());
    }
    options.components = part.components.clone();
    options.like_spinkube = part.on_shim();
    RunningApp::start(&options)
        .await
        .unwrap_or_else(|e| panic!("{} starts: {e:#}", part.name))
}

#[tokio::test]
async fn the_whole_app_is_refused_like_spinkube_refuses_a_cron_trigger() {
    let env = crate::common::TestEnv::new().await;
    let mut options = env.options("spin.toml", None);
    options.like_spinkube = true;
    let err = RunningApp::start(&options)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert_eq!(
        err,
        "Only Http, Redis, MQTT, SQS, and Command triggers are currently supported. Found unsupported trigger: \"cron\""
    );
}

#[tokio::test]
async fn selecting_a_component_that_does_not_exist_is_refused() {
    let env = crate::common::TestEnv::new().await;
    let mut options = env.options("spin.toml", None);
    options.components = vec!["runs".into(), "nope".into()];
    let err = RunningApp::start(&options)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert_eq!(err, "Specified component \"nope\" not found in application");
}

#[tokio::test]
async fn the_deployed_parts_finish_runs_and_fire_schedules_once() {
    let (api_part, engine, ticks, exporter) = (
        part_running("executor"),
        part_running("orchestrator"),
        part_running("scheduler"),
        part_running("exporter"),
    );
    assert!(api_part.on_shim() && engine.on_shim());
    assert!(!ticks.on_shim() && !exporter.on_shim());
    // The app's own URL rules off (a forgotten setting): the runtime config still blocks.
    let api = Api::start_adjusted(
        &[
            ("SPIN_VARIABLE_TOOLS_ALLOW_HTTP", "true"),
            ("SPIN_VARIABLE_TOOLS_ALLOW_PRIVATE_HOSTS", "true"),
        ],
        |o| {
            let redis = o.env["SPIN_VARIABLE_REDIS_URL"].clone();
            let path = o.state_dir.join("api-runtime-config.toml");
            std::fs::write(&path, api_part.runtime_config_for(&redis)).unwrap();
            o.runtime_config = Some(path);
            o.components = api_part.components.clone();
            o.like_spinkube = true;
        },
    )
    .await;
    // Two engine replicas (each receives every nudge), three of the ticks, one exporter.
    let mut others = Vec::new();
    for part in [&engine, &engine, &ticks, &ticks, &ticks, &exporter] {
        others.push(start_part(&api.env, part, &api.app).await);
    }
    // A part without HTTP components serves nothing.
    assert_eq!(crate::common::get(&others[0], "/healthz").await.status, 404);

    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Split"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let chain = crate::engine::workflow(
        &api,
        &ada,
        &p,
        json!([
        {"key": "a", "kind": "condition", "input": {}},
        {"key": "b", "kind": "condition", "input": {}, "depends_on": ["a"]},
        {"key": "c", "kind": "condition", "input": {}, "depends_on": ["b"]}]),
    )
    .await;
    let chain = json!(chain);

    // Runs started on the API part finish through the engine part; with two engine
    // replicas every step still ran exactly once.
    let mut runs = Vec::new();
    for _ in 0..4 {
        runs.push(api.start_run(&ada.access, &chain, json!({})).await["id"].clone());
    }
    for run in &runs {
        let done = api.finished_run(&ada.access, run.as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded");
    }
    let db = api.env.db().await;
    let attempts: Vec<i32> = column(&db, "select attempt from run_steps", &[]).await;
    assert_eq!(attempts, vec![1; 12], "every step of 4 runs once");
    let started = crate::common::count(
        &db,
        "select count(*) from run_events where kind = 'step.started'",
    )
    .await;
    assert_eq!(started, 12);

    // Three ticks replicas firing the same second make one run of a due schedule.
    let schedule = api
        .create(
            &ada.access,
            "/api/v1/schedules",
            json!({"project_id": p, "workflow_id": chain, "cron": "0 3 * * *", "input": {}}),
        )
        .await;
    let id = schedule["id"].as_str().unwrap();
    let due = Utc::now() + Duration::days(400);
    crate::scheduler::set_next(&api, id, due).await;
    let at = (due + Duration::seconds(1)).timestamp() as u64;
    let fires = others[2..5]
        .iter()
        .map(|replica| replica.inner.handle_cron("scheduler", at));
    for fired in futures::future::join_all(fires).await {
        fired.unwrap();
    }
    let fired: Vec<String> = column(
        &db,
        "select run_id::text from runs where schedule_id = $1::text::uuid",
        &[&id],
    )
    .await;
    assert_eq!(fired.len(), 1, "one run for one fire time: {fired:?}");
    let done = api.finished_run(&ada.access, &fired[0]).await;
    assert_eq!(done["status"], "succeeded");

    // The exporter part's block_networks: an OTLP endpoint on a private address is refused
    // when the trace goes out, though the app's own URL rules (switched off here) let the
    // project save it; nothing reaches the address.
    let collector = FakeServer::start(200, json!({}), StdDuration::ZERO).await;
    api.set_trace_endpoint(&ada, &p, &collector.url("/v1/traces"))
        .await;
    let traced = api
        .run_to_end(&ada.access, chain.as_str().unwrap(), json!({}))
        .await;
    // The part's own exporter ticks every 2 s too: whichever tick claims the export first
    // records it (the other finds it leased), so the outcome is awaited, not assumed.
    let at = Utc::now().timestamp() as u64 + 5;
    others[5].inner.handle_cron("exporter", at).await.unwrap();
    let (status, error) = crate::common::eventually(async || {
        let row = db
            .query_one(
                "select status, last_error from trace_exports where run_id = $1::text::uuid",
                &[&traced["id"].as_str().unwrap()],
            )
            .await
            .unwrap();
        let (status, error): (String, Option<String>) = (row.get(0), row.get(1));
        (status != "pending").then_some((status, error))
    })
    .await;
    assert_eq!(status, "failed", "{error:?}");
    assert!(error.unwrap().contains("blocked network"));
    assert!(collector.received().is_empty());
    for part in others {
        part.shutdown().await;
    }
}
