//! The run console (`components/console`): its own routes (assets with their types,
//! compression and caching, the app shell for every other path, the Content-Security-Policy),
//! and the pages in a real browser: `tests/browser/console.test.mjs`, Playwright driving
//! Debian's Chromium headless against the real app, with the model provider and tools as
//! fakes on loopback. Screenshots of each page land in `target/console-screenshots`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Api, FakeServer, User, openai, request, workspace};
use crate::engine::workflow;

const CSP_MUST_HOLD: [&str; 4] = [
    "default-src 'none'",
    "script-src 'self'",
    "connect-src 'self'",
    "frame-ancestors 'none'",
];

fn csp_of(reply: &crate::common::Reply) -> String {
    reply
        .header("content-security-policy")
        .unwrap_or_default()
        .to_string()
}

/// The shell's asset paths, in the order it names them.
fn assets_named_in(shell: &str) -> Vec<String> {
    shell
        .split('"')
        .filter(|s| s.starts_with("/console/assets/"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_console_serves_its_shell_for_app_paths_and_hashed_assets_compressed_and_cached() {
    let api = Api::start().await;
    let shell = request("GET", &api.url("/console/runs/whatever?x=1"), &[], None).await;
    assert_eq!(shell.status, 200);
    assert_eq!(
        shell.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(shell.header("cache-control"), Some("no-cache"));
    let csp = csp_of(&shell);
    for rule in CSP_MUST_HOLD {
        assert!(csp.contains(rule), "{rule} in {csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(shell.header("x-content-type-options"), Some("nosniff"));
    let html = String::from_utf8_lossy(&shell.body).to_string();
    assert!(!html.contains("<script>"), "no inline script: {html}");

    // Every path under /console is the same shell; the validator answers 304.
    let root = request("GET", &api.url("/console"), &[], None).await;
    assert_eq!(root.body, shell.body);
    let etag = shell.header("etag").expect("an etag").to_string();
    let again = request(
        "GET",
        &api.url("/console/p/x/usage"),
        &[("if-none-match", &etag)],
        None,
    )
    .await;
    assert_eq!(again.status, 304);
    // The app's front page is the console.
    let front = request("GET", &api.url("/"), &[], None).await;
    assert_eq!(front.status, 302);
    assert_eq!(front.header("location"), Some("/console/"));

    let named = assets_named_in(&html);
    assert_eq!(named.len(), 3, "favicon, style and script: {named:?}");
    let mut first_load = 0;
    for path in &named {
        let plain = request("GET", &api.url(path), &[], None).await;
        let packed = request(
            "GET",
            &api.url(path),
            &[("accept-encoding", "gzip, br")],
            None,
        )
        .await;
        assert_eq!(plain.status, 200, "{path}");
        assert_eq!(packed.status, 200, "{path}");
        let want = match path.rsplit('.').next() {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            _ => "image/svg+xml",
        };
        assert_eq!(plain.header("content-type"), Some(want), "{path}");
        assert_eq!(plain.header("content-encoding"), None, "{path}");
        assert_eq!(packed.header("content-encoding"), Some("gzip"), "{path}");
        assert_eq!(packed.header("vary"), Some("accept-encoding"), "{path}");
        assert_eq!(
            gunzip(&packed.body),
            plain.body.to_vec(),
            "{path}: the same bytes"
        );
        if path.contains("/main-") {
            assert_eq!(
                plain.header("cache-control"),
                Some("public, max-age=31536000, immutable"),
                "{path}"
            );
        }
        first_load += packed.body.len();
    }
    first_load += shell.body.len();
    println!("console first load, compressed: {first_load} bytes");
    assert!(
        first_load < 300 * 1024,
        "the first load is {first_load} bytes"
    );

    // A stale asset name is a 404 (never the shell, which would run as a script); only GET
    // and HEAD are served.
    let stale = request("GET", &api.url("/console/assets/main-OLD.js"), &[], None).await;
    assert_eq!(stale.status, 404);
    let post = request("POST", &api.url("/console/runs"), &[], Some(json!({}))).await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    let head = request("HEAD", &api.url("/console/"), &[], None).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
}

/// `gzip -d` of `bytes` (the system's gzip, not the project's code).
fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip runs");
    let mut stdin = child.stdin.take().unwrap();
    let bytes = bytes.to_vec();
    // Written from a thread while the output is read, so neither pipe can fill up.
    let writer = std::thread::spawn(move || stdin.write_all(&bytes));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "a gzip body");
    out.stdout
}

/// Debian's Chromium (`SPARKOPS_CHROMIUM` names another).
fn chromium() -> PathBuf {
    let path = std::env::var_os("SPARKOPS_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "no Chromium at {} (apt-get install chromium, as infra/dev test does, or set SPARKOPS_CHROMIUM)",
        path.display()
    );
    path
}

/// `tests/browser`'s packages (playwright-core), installed from its lock file when missing.
fn browser_packages() -> PathBuf {
    let dir = workspace().join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm ci in tests/browser");
    }
    dir
}

async fn create(api: &Api, who: &User, path: &str, body: Value) -> String {
    api.create(&who.access, path, body).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn the_console_in_a_real_browser() {
    let browser = chromium();
    let tests = browser_packages();
    // A model answering with usage, and tools: one that answers, one that fails once.
    let provider = FakeServer::answering(
        vec![openai::text("a plan", 1000, 500)],
        Duration::from_millis(700),
    )
    .await;
    let tool = FakeServer::start(200, json!({"ok": true}), Duration::from_millis(700)).await;
    let flaky = FakeServer::scripted(
        vec![(500, json!({"error": "down"})), (200, json!({"ok": true}))],
        Duration::from_millis(100),
    )
    .await;
    let api = Api::for_fakes(Some(&provider), &[]).await;
    let ada = api.register("ada").await;
    let project = api.create_project(&ada, json!({"name": "Console"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let eve = api.register("eve").await;
    let elsewhere = api.create_project(&eve, json!({"name": "Elsewhere"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // $0.02 for 1,000 prompt tokens and $0.08 for 500 completion tokens: $0.10 a call.
    api.set_price(&ada.access, &project, "fake/small", "20.00", "160.00")
        .await;
    let agent = create(
        &api,
        &ada,
        "/api/v1/agents",
        json!({"project_id": project, "name": "planner",
        "model": "fake/small", "system_prompt": "Plan."}),
    )
    .await;
    let tool_body = |name: &str, url: String| {
        json!({"project_id": project, "name": name, "description": name,
            "input_schema": {"type": "object"}, "http": {"method": "POST", "url": url}})
    };
    let ok_tool = create(
        &api,
        &ada,
        "/api/v1/tools",
        tool_body("lookup", tool.url("/lookup")),
    )
    .await;
    let flaky_tool = create(
        &api,
        &ada,
        "/api/v1/tools",
        tool_body("flaky", flaky.url("/flaky")),
    )
    .await;
    let once = json!({"max_attempts": 1});
    let diamond = workflow(&api, &ada, &project, json!([
        {"key": "plan", "kind": "agent", "agent_id": agent, "input": {"prompt": "plan it"}},
        {"key": "left", "kind": "tool", "tool_id": ok_tool, "depends_on": ["plan"], "input": {}},
        {"key": "right", "kind": "condition", "depends_on": ["plan"], "when": "input.deep == true", "input": {}},
        {"key": "join", "kind": "condition", "depends_on": ["left", "right"], "input": {}},
    ]))
    .await;
    let flaky_wf = workflow(
        &api,
        &ada,
        &project,
        json!([
            {"key": "fetch", "kind": "tool", "tool_id": flaky_tool, "retry": once, "input": {}},
            {"key": "after", "kind": "condition", "depends_on": ["fetch"], "input": {}},
        ]),
    )
    .await;
    let approval = workflow(
        &api,
        &ada,
        &project,
        json!([
            {"key": "before", "kind": "condition", "input": {}},
            {"key": "gate", "kind": "approval", "depends_on": ["before"], "input": {}},
            {"key": "after", "kind": "condition", "depends_on": ["gate"], "input": {}},
        ]),
    )
    .await;
    // 200 steps (the most a workflow may have): 20 layers of 10, each step after two of
    // the layer before.
    let wide: Vec<Value> = (0..200)
        .map(|i| {
            let (layer, at) = (i / 10, i % 10);
            let deps: Vec<String> = if layer == 0 {
                Vec::new()
            } else {
                vec![format!("s{}_{at}", layer - 1), format!("s{}_{}", layer - 1, (at + 1) % 10)]
            };
            json!({"key": format!("s{layer}_{at}"), "kind": "condition", "depends_on": deps, "input": {}})
        })
        .collect();
    let wide = workflow(&api, &ada, &project, Value::Array(wide)).await;
    let schedule = create(
        &api,
        &ada,
        "/api/v1/schedules",
        json!({"project_id": project,
        "workflow_id": approval, "cron": "0 9 1 1 *", "timezone": "Europe/Paris", "input": {}}),
    )
    .await;
    create(
        &api,
        &ada,
        "/api/v1/policies",
        json!({"project_id": project, "name": "monthly",
        "rules": {"budget": {"limit_usd": "5.00", "window": "month", "action": "block"}}}),
    )
    .await;

    let fixture = json!({
        "owner": {"email": ada.email, "password": ada.password},
        "outsider": {"email": eve.email, "password": eve.password},
        "project": project, "outsiderProject": elsewhere, "schedule": schedule,
        "workflows": {"diamond": diamond, "flaky": flaky_wf, "approval": approval, "wide": wide},
    });
    let shots = workspace().join("target/console-screenshots");
    let out = tokio::process::Command::new("node")
        .args(["--test", "--test-reporter=spec", "console.test.mjs"])
        .current_dir(&tests)
        .env("CONSOLE_URL", api.url("").trim_end_matches('/'))
        .env("CONSOLE_FIXTURE", fixture.to_string())
        .env("CHROMIUM", &browser)
        .env("SCREENSHOTS", &shots)
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs the browser tests");
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{report}");
    assert!(out.status.success(), "the browser tests failed:\n{report}");
    assert!(report.contains("ℹ fail 0"), "{report}");
    assert!(Path::new(&shots).join("run-diamond.png").exists());

    // What the pages did, as the database saw it.
    let db = api.env.db().await;
    let row = db
        .query_one(
            "select approved, comment, via from run_step_approvals a join runs r using (run_id)
             where r.workflow_id = $1::text::uuid and a.step_key = 'gate'",
            &[&approval],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("Looks good from the browser")
    );
    assert_eq!(row.get::<_, String>(2), "api");
    let retried: i64 = db
        .query_one(
            "select count(*) from runs where workflow_id = $1::text::uuid and retry_of is not null and status = 'succeeded'",
            &[&flaky_wf],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(retried, 1, "one retry from failed, and it succeeded");
    assert_eq!(
        flaky.received().len(),
        2,
        "the failed call, then the retried one"
    );
}
