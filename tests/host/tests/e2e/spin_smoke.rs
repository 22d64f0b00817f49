//! The whole app under the real Spin CLI (3.6.3, the version SpinKube's shim embeds, with the
//! trigger-cron plugin) from `../shared/tools` beside the checkout, or `SPARKOPS_SPIN`: the
//! same `spin.toml`, a real Postgres and Redis, a fake tool on loopback, driven through the
//! public API only. Where the host and Spin disagree, this is the test that says so.
//!
//! A clone without the tool skips it and says so on stderr (`infra/dev test` repeats it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::process::{Process, wait_for_health};
use crate::common::{
    Client, FakeServer, OPEN_URL_RULES, TempDir, TestEnv, User, eventually_for, openai,
};
use crate::engine::{tool_named, wait_status, workflow};
use crate::kubernetes::{Part, part_running};
use crate::mcp::FakeMcp;
use crate::streaming::{Script, StreamingProvider};
use serde_json::{Value, json};

/// How long a cron component under Spin may take to do what a test waits for: the parts
/// start (and on a cold cache compile) concurrently.
const SPIN_CRON_WAIT: Duration = Duration::from_secs(120);

fn spin_binary() -> Option<PathBuf> {
    let path = std::env::var_os("SPARKOPS_SPIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::common::workspace().join("../shared/tools/spin"));
    path.is_file().then_some(path)
}

/// The trigger-cron plugin, installed from beside the binary when it is missing. One test
/// at a time: two installs at once (the suites run in parallel) rewrite the plugin while the
/// other test's `spin up` runs it, and on a fresh machine that `spin up` failed (its cron
/// trigger given `--listen`, which only the HTTP trigger takes).
fn ensure_cron_plugin(spin: &PathBuf) {
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    let installed = |spin: &PathBuf| {
        let out = Command::new(spin)
            .args(["plugins", "list", "--installed"])
            .output()
            .expect("spin runs");
        String::from_utf8_lossy(&out.stdout).contains("trigger-cron")
    };
    if installed(spin) {
        return;
    }
    let script = spin.with_file_name("install-trigger-cron.sh");
    let status = Command::new("bash")
        .arg(&script)
        .stdout(Stdio::null())
        .status()
        .expect("the plugin installer runs");
    assert!(
        status.success() && installed(spin),
        "cannot install trigger-cron"
    );
}

async fn spin_up(spin: &Path, env: &TestEnv, extra: &[(&str, &str)]) -> (Process, Client) {
    let config = format!(
        "[key_value_store.default]\ntype = \"redis\"\nurl = \"{}\"\n",
        env.redis_url
    );
    let options = env.options("spin.toml", Some(&config));
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let args = [
        "up".into(),
        "--from".into(),
        path(&options.manifest),
        "--runtime-config-file".into(),
        path(options.runtime_config.as_ref().unwrap()),
        "--listen".into(),
        options.listen.to_string(),
        "--state-dir".into(),
        path(&options.state_dir.join("spin")),
    ];
    let mut vars = options.env.clone();
    vars.extend(OPEN_URL_RULES.map(|(k, v)| (k.into(), v.into())));
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut up = Process::spawn("spin", spin, &args, &vars, &options.state_dir);
    let client = wait_for_health(options.listen, &mut [&mut up]).await;
    (up, client)
}

#[tokio::test]
async fn the_app_runs_end_to_end_under_real_spin() {
    let Some(spin) = spin_binary() else {
        eprintln!("SKIPPED the real-Spin smoke: ../shared/tools/spin is not beside the checkout");
        return;
    };
    ensure_cron_plugin(&spin);
    let env = TestEnv::new().await;
    // Two model providers: one answering whole (an agent calling an MCP tool), one
    // streaming (an agent whose text a subscriber reads while it comes).
    let provider = FakeServer::answering(
        vec![
            openai::tool_calls(
                &[("c1", "mcp__docs__search", json!({"query": "spin"}))],
                10,
                5,
            ),
            openai::text("found it", 10, 5),
        ],
        Duration::ZERO,
    )
    .await;
    let streaming = StreamingProvider::start(vec![Script {
        before: vec!["Under ", "Spin "],
        after: vec!["too."],
        usage: Some((40, 3)),
    }])
    .await;
    let mcp = FakeMcp::start().await;
    let providers = format!(
        "fake={};live=http://{}/v1",
        provider.url("/v1"),
        streaming.addr
    );
    let (up, api) = spin_up(
        &spin,
        &env,
        &[
            ("SPIN_VARIABLE_MODEL_PROVIDERS", providers.as_str()),
            (
                "SPIN_VARIABLE_MODEL_PROVIDER_KEYS",
                "fake=sk-app-key;live=sk-app-key",
            ),
        ],
    )
    .await;
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Smoke"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();

    // A webhook: the notifier delivers under Spin's cron trigger.
    let receiver = FakeServer::start(204, json!({}), Duration::ZERO).await;
    let hook = api
        .call(
            "POST",
            "/api/v1/webhooks",
            Some(&ada.access),
            Some(json!({"project_id": p, "url": receiver.url("/in"),
                "event_types": ["run.succeeded", "step.waiting_approval"]})),
        )
        .await;
    assert_eq!(hook.status, 201, "{}", String::from_utf8_lossy(&hook.body));
    let secret = hook.json()["secret"].as_str().unwrap().to_string();

    // A chain, a fan-out/fan-in and a condition, each tool called exactly once.
    let fake = FakeServer::start(200, json!({"temp_c": 21}), Duration::ZERO).await;
    let t = tool_named(&api, &ada, &p, "weather", fake.url("/weather")).await["id"].clone();
    let wf = json!(workflow(&api, &ada, &p, json!([
        {"key": "fetch", "kind": "tool", "tool_id": t, "input": {"city": "{{ input.city }}"}},
        {"key": "left", "kind": "tool", "tool_id": t, "depends_on": ["fetch"], "input": {"side": "left"}},
        {"key": "right", "kind": "tool", "tool_id": t, "depends_on": ["fetch"], "input": {"side": "right"}},
        {"key": "hot", "kind": "condition", "depends_on": ["left", "right"],
         "when": "steps.fetch.output.temp_c > 30", "input": {}},
        {"key": "report", "kind": "condition", "depends_on": ["left", "right"],
         "input": {"t": "{{ steps.right.output.temp_c }}"}},
    ]))
    .await);
    let run = api
        .start_run(&ada.access, &wf, json!({"city": "Oslo"}))
        .await;
    let id = run["id"].as_str().unwrap();
    let done = wait_status(&api, &ada, id, "succeeded").await;
    assert_eq!(
        done["output"]["report"],
        json!({"t": 21}),
        "{done}\n{}",
        up.log()
    );
    let keys = fake.idempotency_keys();
    assert_eq!(keys.len(), 3, "{keys:?}");
    let unique: std::collections::HashSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), 3, "each tool step called once: {keys:?}");
    let steps = api.run_items(&ada.access, &done, "steps").await;
    let hot = steps.iter().find(|s| s["key"] == "hot").unwrap();
    assert_eq!(hot["status"], "skipped");

    // An approval: the run waits, is approved, and goes on.
    let gate = json!(workflow(&api, &ada, &p, json!([
        {"key": "gate", "kind": "approval", "input": {}, "approval": {"timeout_s": 3600}},
        {"key": "after", "kind": "condition", "depends_on": ["gate"], "input": {"ok": "{{ steps.gate.output.approved }}"}},
    ]))
    .await);
    let waiting = api.start_run(&ada.access, &gate, json!({})).await;
    let wid = waiting["id"].as_str().unwrap();
    wait_status(&api, &ada, wid, "waiting").await;
    let path = format!("/api/v1/runs/{wid}/steps/gate/approve");
    let res = api
        .call(
            "POST",
            &path,
            Some(&ada.access),
            Some(json!({"approved": true})),
        )
        .await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let approved = wait_status(&api, &ada, wid, "succeeded").await;
    assert_eq!(approved["output"], json!({"after": {"ok": true}}));

    // Cancel: a waiting run ends cancelled.
    let other = api.start_run(&ada.access, &gate, json!({})).await;
    let oid = other["id"].as_str().unwrap();
    wait_status(&api, &ada, oid, "waiting").await;
    let res = api.cancel(&ada.access, oid).await;
    assert_eq!(res.status, 202, "{}", String::from_utf8_lossy(&res.body));
    wait_status(&api, &ada, oid, "cancelled").await;

    // Webhooks: the first run's end, signed (checked by the spec's own construction), and
    // an approval decided by the link its event carries.
    let linked = api.start_run(&ada.access, &gate, json!({})).await;
    let linked_id = linked["id"].as_str().unwrap().to_string();
    let events = eventually_for(SPIN_CRON_WAIT, async || {
        let got: Vec<Value> = receiver
            .received()
            .iter()
            .map(|r| {
                let h = |n: &str| r.headers[n].to_str().unwrap().to_string();
                let expected = crate::webhooks::standard_signature(
                    &secret,
                    &h("webhook-id"),
                    h("webhook-timestamp").parse().unwrap(),
                    &r.body,
                );
                assert!(h("webhook-signature").split(' ').any(|s| s == expected));
                serde_json::from_slice(&r.body).unwrap()
            })
            .collect();
        let has = |t: &str, run: &str| {
            got.iter()
                .any(|e| e["type"] == t && e["data"]["run_id"] == run)
        };
        (has("run.succeeded", id) && has("step.waiting_approval", &linked_id)).then_some(got)
    })
    .await;
    let approval = events
        .iter()
        .find(|e| e["type"] == "step.waiting_approval" && e["data"]["run_id"] == linked_id.as_str())
        .unwrap();
    let url = approval["data"]["links"][0]["approve_url"]
        .as_str()
        .unwrap();
    let path = format!(
        "/api/v1/approvals/{}",
        url.split_once("/api/v1/approvals/").unwrap().1
    );
    let res = api.call("POST", &path, None, None).await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    wait_status(&api, &ada, &linked_id, "succeeded").await;

    // A trigger: a signed request from another system starts a run.
    let trigger = api
        .call(
            "POST",
            "/api/v1/triggers",
            Some(&ada.access),
            Some(json!({"project_id": p, "name": "city", "workflow_id": wf,
                "verification": "bearer", "input_template": {"city": "{{ body.city }}"}})),
        )
        .await
        .json();
    let auth = format!("Bearer {}", trigger["secret"].as_str().unwrap());
    let res = crate::common::request(
        "POST",
        &api.url(&format!("/hooks/{}", trigger["id"].as_str().unwrap())),
        &[("authorization", auth.as_str())],
        Some(json!({"city": "Bergen"})),
    )
    .await;
    assert_eq!(res.status, 202, "{}", String::from_utf8_lossy(&res.body));
    let started = res.json()["run_id"].as_str().unwrap().to_string();
    let hooked = wait_status(&api, &ada, &started, "succeeded").await;
    assert_eq!(hooked["input"], json!({"city": "Bergen"}));

    // Retry from failed: the tool fails once, the retried run calls it again and succeeds.
    let flaky = FakeServer::scripted(
        vec![(500, json!({"error": "down"})), (200, json!({"ok": true}))],
        Duration::ZERO,
    )
    .await;
    let f = tool_named(&api, &ada, &p, "flaky", flaky.url("/flaky")).await["id"].clone();
    let retried_wf = json!(workflow(&api, &ada, &p, json!([
        {"key": "call", "kind": "tool", "tool_id": f, "input": {}, "retry": {"max_attempts": 1}},
    ]))
    .await);
    let failed = api.start_run(&ada.access, &retried_wf, json!({})).await;
    let fid = failed["id"].as_str().unwrap();
    wait_status(&api, &ada, fid, "failed").await;
    let res = api
        .call(
            "POST",
            &format!("/api/v1/runs/{fid}/retry"),
            Some(&ada.access),
            Some(json!({"from": "failed"})),
        )
        .await;
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let retry = res.json();
    assert_eq!(retry["retry_of"], json!(fid));
    wait_status(&api, &ada, retry["id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(flaky.received().len(), 2);

    // A call longer than the first renewal: the executor's heartbeat (a wasi poll over the
    // call and a timer) renews the step's lease beyond its first 15 s under Spin too.
    let slow = FakeServer::start(200, json!({"slow": true}), Duration::from_secs(7)).await;
    let s = tool_named(&api, &ada, &p, "slow", slow.url("/slow")).await["id"].clone();
    let slow_wf = json!(
        workflow(
            &api,
            &ada,
            &p,
            json!([
                {"key": "call", "kind": "tool", "tool_id": s, "input": {}},
            ])
        )
        .await
    );
    let long = api.start_run(&ada.access, &slow_wf, json!({})).await;
    let lid = long["id"].as_str().unwrap();
    crate::common::eventually(async || (!slow.received().is_empty()).then_some(())).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let db = env.db().await;
    let leased_for: f64 = db
        .query_one(
            "select extract(epoch from lease_expires_at - started_at)::float8 from run_steps
             where run_id = $1::text::uuid",
            &[&lid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(leased_for > 15.0, "not renewed: {leased_for}\n{}", up.log());
    let done = wait_status(&api, &ada, lid, "succeeded").await;
    assert_eq!(done["output"], json!({"call": {"slow": true}}));
    assert_eq!(slow.received().len(), 1);

    agents_reach_further_under_spin(&api, &ada, &p, (&streaming, &mcp), &up).await;
    assert_eq!(provider.received().len(), 2);

    // The cron components run under the plugin: a schedule fires a run by itself.
    fires_by_itself(&api, &ada, &p, &gate, "queued,running,waiting,succeeded").await;
    drop(up);
}

/// Spin's outbound Redis (the live text of a streaming call) and an answer read as it
/// streams in (the provider's chunks, an MCP server's event stream it keeps open).
async fn agents_reach_further_under_spin(
    api: &Client,
    ada: &User,
    p: &str,
    (streaming, mcp): (&StreamingProvider, &FakeMcp),
    up: &Process,
) {
    let res = api
        .call(
            "PUT",
            &format!("/api/v1/projects/{p}/secrets/MCP_TOKEN"),
            Some(&ada.access),
            Some(json!({"value": format!("Bearer {}", crate::mcp::TOKEN)})),
        )
        .await;
    assert_eq!(res.status, 204);
    let res = api
        .call(
            "POST",
            "/api/v1/mcp-servers",
            Some(&ada.access),
            Some(json!({"project_id": p, "name": "docs", "url": mcp.url(), "allowed_tools": ["search"],
                "headers": {"Authorization": "{{ secret.MCP_TOKEN }}"}})),
        )
        .await;
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let agent = |model: &str, extra: Value| {
        let mut body = json!({"project_id": p, "name": format!("agent {model}"), "model": model,
            "system_prompt": "x"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        api.call("POST", "/api/v1/agents", Some(&ada.access), Some(body))
    };
    let searcher = agent("fake/small", json!({"mcp_tools": ["mcp:docs/search"]}))
        .await
        .json();
    let speaker = agent("live/small", json!({"stream": true})).await.json();
    let one_step = async |agent: &Value| {
        json!(
            workflow(
                api,
                ada,
                p,
                json!([{"key": "say", "kind": "agent", "agent_id": agent["id"], "input": "go",
                    "retry": {"max_attempts": 1}}])
            )
            .await
        )
    };
    let wf = one_step(&searcher).await;
    let run = api.start_run(&ada.access, &wf, json!({})).await;
    let done = wait_status(api, ada, run["id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(
        done["output"]["say"],
        "found it",
        "{done}
{}",
        up.log()
    );
    assert_eq!(
        mcp.calls(),
        [("search".to_string(), json!({"query": "spin"}))]
    );

    let wf = one_step(&speaker).await;
    let run = api.start_run(&ada.access, &wf, json!({})).await;
    let id = run["id"].as_str().unwrap().to_string();
    let auth = format!("Bearer {}", ada.access);
    let live = crate::common::read_sse(
        &api.url(&format!("/api/v1/runs/{id}/events")),
        &[("authorization", &auth)],
        |events| events.iter().any(|e| e.event == "step.delta"),
    )
    .await;
    let seen: String = live
        .events
        .iter()
        .filter(|e| e.event == "step.delta")
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect();
    assert!(
        !seen.is_empty() && "Under Spin ".starts_with(&seen),
        "{seen:?}"
    );
    streaming.gate.add_permits(1);
    let done = wait_status(api, ada, &id, "succeeded").await;
    assert_eq!(done["output"]["say"], "Under Spin too.");
    assert_eq!(
        (&done["tokens_in"], &done["tokens_out"]),
        (&json!(40), &json!(3))
    );
}

/// Schedules `workflow` every second and waits until the running cron components have
/// fired it: a run of the schedule in one of `statuses` (comma-separated).
async fn fires_by_itself(api: &Client, who: &User, p: &str, workflow: &Value, statuses: &str) {
    let sched = api
        .create(
            &who.access,
            "/api/v1/schedules",
            json!({"project_id": p, "workflow_id": workflow, "cron": "* * * * * *",
                "overlap": "allow", "input": {}}),
        )
        .await;
    let schedule = sched["id"].as_str().unwrap();
    let path = format!("/api/v1/runs?project_id={p}&schedule_id={schedule}");
    eventually_for(SPIN_CRON_WAIT, async || {
        let runs = api.call("GET", &path, Some(&who.access), None).await.json();
        let fired = runs["items"]
            .as_array()?
            .iter()
            .any(|r| statuses.split(',').any(|s| r["status"] == s));
        fired.then_some(())
    })
    .await;
}

/// The parts of `infra/kubernetes` under the real Spin CLI, one process each, as deployed:
/// the API and engine parts (on SpinKube, the shim; here Spin's own selective deployment)
/// and the periodic parts through the spin-cron image's entry point with the arguments
/// spin-operator gives it, each with its runtime config.
#[tokio::test]
async fn the_deployed_parts_work_together_under_real_spin() {
    let Some(spin) = spin_binary() else {
        eprintln!(
            "SKIPPED the real-Spin deployment: ../shared/tools/spin is not beside the checkout"
        );
        return;
    };
    ensure_cron_plugin(&spin);
    let (api_part, engine, ticks, exporter) = (
        part_running("executor"),
        part_running("orchestrator"),
        part_running("scheduler"),
        part_running("exporter"),
    );
    let env = TestEnv::new().await;
    let manifest = crate::common::workspace()
        .join("spin.toml")
        .to_string_lossy()
        .into_owned();
    let listen = crate::common::free_local_address();
    // Every part gets the same settings: where steps go, the app's own URL rules off (the
    // project may point traces at loopback: the exporter's block_networks is what refuses),
    // and Spin on the PATH for the spin-cron entry point.
    let mut vars = env.variables();
    vars.insert(
        "SPIN_VARIABLE_DISPATCH_URL".into(),
        format!("http://{listen}"),
    );
    vars.extend(OPEN_URL_RULES.map(|(k, v)| (k.into(), v.into())));
    vars.insert(
        "PATH".into(),
        format!(
            "{}:{}",
            spin.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    let dirs = TempDir::new();
    // `lead` and then the part's runtime config, a state folder, and `flag <component>` for
    // each of its components.
    let start = |program: &Path, lead: &[&str], flag: &str, part: &Part| {
        let dir = dirs.path().join(&part.name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("runtime-config.toml");
        std::fs::write(&config, part.runtime_config_for(&env.redis_url)).unwrap();
        let mut args: Vec<String> = lead.iter().map(|a| a.to_string()).collect();
        args.extend([
            "--runtime-config-file".into(),
            config.to_string_lossy().into_owned(),
            "--state-dir".into(),
            dir.join("spin").to_string_lossy().into_owned(),
        ]);
        for c in &part.components {
            args.extend([flag.to_string(), c.clone()]);
        }
        Process::spawn("spin", program, &args, &vars, &dir)
    };
    let address = listen.to_string();
    let mut api_up = start(
        &spin,
        &["up", "--from", &manifest, "--listen", &address],
        "-c",
        &api_part,
    );
    // The engine part has no HTTP trigger, so no --listen (Spin refuses it there).
    let mut engine_up = start(&spin, &["up", "--from", &manifest], "-c", &engine);
    // spin-operator's arguments for a Spin-CLI executor, through the image's entry point.
    let entry = crate::common::workspace().join("infra/spin-cron/spin-up-periodic");
    let operator = ["up", "--listen", "0.0.0.0:80", "-f", &manifest];
    let mut ticks_up = start(&entry, &operator, "--component-id", &ticks);
    let mut exporter_up = start(&entry, &operator, "--component-id", &exporter);
    let api = wait_for_health(
        listen,
        &mut [&mut api_up, &mut engine_up, &mut ticks_up, &mut exporter_up],
    )
    .await;
    // The engine part listens for nudges before the first run starts.
    let redis = redis::Client::open(env.redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let channel = env.runs_channel();
    eventually_for(SPIN_CRON_WAIT, async || {
        let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        (subscribers > 0).then_some(())
    })
    .await;
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Parts"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();

    // The engine part hands steps to the API part over a loopback (private) address.
    let chain = json!(
        workflow(
            &api,
            &ada,
            &p,
            json!([
        {"key": "a", "kind": "condition", "input": {}},
        {"key": "b", "kind": "condition", "depends_on": ["a"], "input": {}}])
        )
        .await
    );
    let run = api.start_run(&ada.access, &chain, json!({})).await;
    let logs = || {
        [&api_up, &engine_up, &ticks_up, &exporter_up]
            .map(|u| u.log())
            .join("\n")
    };
    let done = wait_status(&api, &ada, run["id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(done["status"], "succeeded", "{}", logs());

    // The exporter part runs behind block_networks: a trace to a private address is refused
    // (by Spin, after the app's own rules let the project save it), while Postgres on
    // loopback serves it all along.
    let collector = FakeServer::start(200, json!({}), Duration::ZERO).await;
    api.set_trace_endpoint(&ada, &p, &collector.url("/v1/traces"))
        .await;
    let traced = api.start_run(&ada.access, &chain, json!({})).await;
    wait_status(&api, &ada, traced["id"].as_str().unwrap(), "succeeded").await;
    let db = env.db().await;
    let error: String = eventually_for(SPIN_CRON_WAIT, async || {
        let row = db
            .query_opt(
                "select last_error from trace_exports where run_id = $1::text::uuid and status = 'failed'",
                &[&traced["id"].as_str().unwrap()],
            )
            .await
            .unwrap()?;
        row.get(0)
    })
    .await;
    assert!(error.contains("blocked network"), "{error}\n{}", logs());
    assert!(collector.received().is_empty());

    // The periodic part fires a schedule by itself, and the engine finishes its run.
    fires_by_itself(&api, &ada, &p, &chain, "succeeded").await;
    drop((api_up, engine_up, ticks_up, exporter_up));
}
