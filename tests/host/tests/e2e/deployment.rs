//! The app split the way a SpinKube deployment runs it: the HTTP and Redis components on the
//! shim (which refuses a cron trigger), the periodic (cron) components as a second
//! deployment of the Spin CLI, both over one database and Redis. Runs and schedules still
//! complete with the parts running separately.

use chrono::{Duration, Utc};
use serde_json::json;
use sparkops_host::RunningApp;
use sparkops_host::manifest::Manifest;

use crate::common::{Api, free_local_address, workspace};

/// The app's components, split into those with a cron trigger and the rest.
fn parts() -> (Vec<String>, Vec<String>) {
    let (manifest, _) = Manifest::load(&workspace().join("spin.toml")).unwrap();
    let periodic: Vec<String> = manifest
        .trigger
        .cron
        .iter()
        .map(|t| t.component.clone())
        .collect();
    let rest = manifest
        .component
        .keys()
        .filter(|id| !periodic.contains(id))
        .cloned()
        .collect();
    (rest, periodic)
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
async fn split_in_two_deployments_runs_finish_and_schedules_fire() {
    let (api_part, periodic) = parts();
    assert_eq!(
        periodic.len(),
        3,
        "scheduler, sweeper, exporter: {periodic:?}"
    );
    let api = Api::start_adjusted(&[], |o| {
        o.components = api_part.clone();
        o.like_spinkube = true;
    })
    .await;
    // The periodic part: only the cron components, the same database and Redis, handing
    // steps to the API part's executor route.
    let mut options = api.env.options(
        "spin.toml",
        Some(&format!(
            "[key_value_store.default]\ntype = \"redis\"\nurl = \"{}\"\n",
            api.env.redis_url
        )),
    );
    options.listen = free_local_address();
    options
        .env
        .insert("SPIN_VARIABLE_DISPATCH_URL".into(), api.app.url(""));
    options.components = periodic;
    let cron_part = RunningApp::start(&options)
        .await
        .expect("the periodic part starts");
    // Neither part serves the other's work: the periodic part has no routes.
    let probe = crate::common::get(&cron_part, "/healthz").await;
    assert_eq!(probe.status, 404);

    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Split"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "w", "definition": {"steps": [
                {"key": "a", "kind": "condition", "input": {}},
                {"key": "b", "kind": "condition", "input": {}, "depends_on": ["a"]}]}}),
        )
        .await["id"]
        .clone();

    // A run started by the API part finishes through the API part's orchestrator.
    let run = api.start_run(&ada.access, &wf, json!({})).await;
    let done = api
        .finished_run(&ada.access, run["id"].as_str().unwrap())
        .await;
    assert_eq!(done["status"], "succeeded");

    // A schedule fires only when the periodic part ticks, and its run finishes.
    let schedule = api
        .create(
            &ada.access,
            "/api/v1/schedules",
            json!({"project_id": p, "workflow_id": wf, "cron": "0 3 * * *", "input": {}}),
        )
        .await;
    let due = Utc::now() + Duration::days(400);
    crate::scheduler::set_next(&api, schedule["id"].as_str().unwrap(), due).await;
    cron_part
        .inner
        .handle_cron("scheduler", (due + Duration::seconds(1)).timestamp() as u64)
        .await
        .unwrap();
    let fired = api
        .env
        .db()
        .await
        .query_one(
            "select run_id::text from runs where schedule_id = $1::text::uuid",
            &[&schedule["id"].as_str().unwrap()],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    let done = api.finished_run(&ada.access, &fired).await;
    assert_eq!(done["status"], "succeeded");
    cron_part.shutdown().await;
}
