//! The whole app under the real Spin CLI (3.6.3, the version SpinKube's shim embeds, with the
//! trigger-cron plugin) from `../shared/tools` beside the checkout, or `SPARKOPS_SPIN`: the
//! same `spin.toml`, a real Postgres and Redis, a fake tool on loopback, driven through the
//! public API only. Where the host and Spin disagree, this is the test that says so.
//!
//! A clone without the tool skips it and says so on stderr (`infra/dev test` repeats it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{Client, FakeServer, TestEnv, eventually};
use crate::engine::{tool_named, wait_status, workflow};
use serde_json::json;

fn spin_binary() -> Option<PathBuf> {
    let path = std::env::var_os("SPARKOPS_SPIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::common::workspace().join("../shared/tools/spin"));
    path.is_file().then_some(path)
}

/// The trigger-cron plugin, installed from beside the binary when it is missing.
fn ensure_cron_plugin(spin: &PathBuf) {
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

/// `spin up` and the trigger processes it starts, stopped (as one process group) on drop.
struct SpinUp {
    child: Child,
    log: PathBuf,
}

impl SpinUp {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SpinUp {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

async fn spin_up(spin: &PathBuf, env: &TestEnv) -> (SpinUp, Client) {
    use std::os::unix::process::CommandExt;
    let config = format!(
        "[key_value_store.default]\ntype = \"redis\"\nurl = \"{}\"\n",
        env.redis_url
    );
    let options = env.options("spin.toml", Some(&config));
    let log = options.state_dir.join("spin.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(spin)
        .arg("up")
        .arg("--from")
        .arg(&options.manifest)
        .arg("--runtime-config-file")
        .arg(options.runtime_config.as_ref().unwrap())
        .arg("--listen")
        .arg(options.listen.to_string())
        .arg("--state-dir")
        .arg(options.state_dir.join("spin"))
        .envs(&options.env)
        .env("SPIN_VARIABLE_TOOLS_ALLOW_HTTP", "true")
        .env("SPIN_VARIABLE_TOOLS_ALLOW_PRIVATE_HOSTS", "true")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0)
        .spawn()
        .expect("spin up starts");
    let mut up = SpinUp { child, log };
    let client = Client::new(format!("http://{}", options.listen));
    // The first start compiles every component; later ones read Spin's cache.
    for _ in 0..600 {
        let listening = tokio::net::TcpStream::connect(options.listen).await.is_ok();
        if listening && client.status("GET", "/healthz", None, None).await == 200 {
            return (up, client);
        }
        if let Ok(Some(status)) = up.child.try_wait() {
            panic!("spin up exited with {status}:\n{}", up.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("spin up did not answer /healthz:\n{}", up.log());
}

#[tokio::test]
async fn the_app_runs_end_to_end_under_real_spin() {
    let Some(spin) = spin_binary() else {
        eprintln!("SKIPPED the real-Spin smoke: ../shared/tools/spin is not beside the checkout");
        return;
    };
    ensure_cron_plugin(&spin);
    let env = TestEnv::new().await;
    let (up, api) = spin_up(&spin, &env).await;
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Smoke"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();

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
    let res = api
        .call(
            "PATCH",
            &format!("/api/v1/runs/{oid}/cancel"),
            Some(&ada.access),
            None,
        )
        .await;
    assert_eq!(res.status, 202, "{}", String::from_utf8_lossy(&res.body));
    wait_status(&api, &ada, oid, "cancelled").await;

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

    // The cron components run under the plugin: a schedule fires a run by itself.
    let sched = api
        .create(
            &ada.access,
            "/api/v1/schedules",
            json!({"project_id": p, "workflow_id": gate, "cron": "* * * * * *",
                "overlap": "allow", "input": {}}),
        )
        .await;
    let path = format!(
        "/api/v1/runs?project_id={p}&schedule_id={}",
        sched["id"].as_str().unwrap()
    );
    eventually(async || {
        let runs = api.call("GET", &path, Some(&ada.access), None).await.json();
        (!runs["items"].as_array()?.is_empty()).then_some(())
    })
    .await;
    drop(up);
}
