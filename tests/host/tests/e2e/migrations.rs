//! The migration runner against a real Postgres.

use std::time::Duration;

use crate::common::{TempDir, TestEnv, column, connect};
use sparkops_ops::migrate;

fn dir_with(files: &[(&str, &str)]) -> TempDir {
    let dir = TempDir::new();
    for (name, sql) in files {
        std::fs::write(dir.path().join(name), sql).unwrap();
    }
    dir
}

async fn empty_database() -> (TestEnv, String) {
    // TestEnv migrates its database; make a second, empty one beside it.
    let env = TestEnv::new().await;
    let name = format!("{}_empty", env.database_name);
    env.db()
        .await
        .batch_execute(&format!("create database {name}"))
        .await
        .unwrap();
    let mut url = url::Url::parse(&env.database_url).unwrap();
    url.set_path(&name);
    (env, url.to_string())
}

async fn versions(url: &str) -> Vec<i32> {
    column(
        &connect(url).await,
        "select version from schema_migrations order by version",
        &[],
    )
    .await
}

#[tokio::test]
async fn migrations_apply_in_order_once() {
    let (_env, url) = empty_database().await;
    let dir = dir_with(&[
        (
            "0002_b.sql",
            "create table b (a_id int references a (a_id));",
        ),
        ("0001_a.sql", "create table a (a_id int primary key);"),
    ]);
    let first = migrate::run(&url, dir.path()).await.unwrap();
    assert_eq!(first.applied, ["0001_a", "0002_b"]);
    let again = migrate::run(&url, dir.path()).await.unwrap();
    assert_eq!((again.applied.len(), again.already), (0, 2));
    assert_eq!(versions(&url).await, [1, 2]);
}

#[tokio::test]
async fn a_changed_applied_migration_is_refused() {
    let (_env, url) = empty_database().await;
    let dir = dir_with(&[("0001_a.sql", "create table a (x int);")]);
    migrate::run(&url, dir.path()).await.unwrap();
    std::fs::write(dir.path().join("0001_a.sql"), "create table a (x bigint);").unwrap();
    let err = migrate::run(&url, dir.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0001_a.sql was changed after it was applied"),
        "{err}"
    );
}

#[tokio::test]
async fn a_failing_migration_changes_nothing_and_stops_the_run() {
    let (_env, url) = empty_database().await;
    let dir = dir_with(&[
        ("0001_a.sql", "create table a (x int);"),
        (
            "0002_bad.sql",
            "create table half (x int); insert into nowhere values (1);",
        ),
        ("0003_c.sql", "create table c (x int);"),
    ]);
    let err = migrate::run(&url, dir.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0002_bad.sql failed") && err.contains("42P01"),
        "{err}"
    );
    assert_eq!(versions(&url).await, [1]);
    let half: i64 = connect(&url)
        .await
        .query_one(
            "select count(*) from information_schema.tables where table_name in ('half', 'c')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(half, 0);
}

#[tokio::test]
async fn concurrent_runs_apply_each_migration_exactly_once() {
    let (_env, url) = empty_database().await;
    let dir = dir_with(&[
        ("0001_a.sql", "create table a (x int);"),
        ("0002_b.sql", "create table b (x int);"),
    ]);
    let path = dir.path().to_path_buf();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let (url, path) = (url.clone(), path.clone());
            tokio::spawn(async move { migrate::run(&url, &path).await.unwrap() })
        })
        .collect();
    let mut applied = 0;
    for r in runs {
        applied += r.await.unwrap().applied.len();
    }
    assert_eq!(applied, 2);
    assert_eq!(versions(&url).await, [1, 2]);
}

#[tokio::test]
async fn badly_named_files_are_refused() {
    let dir = dir_with(&[("first.sql", "select 1;")]);
    let err = migrate::read_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("NNNN_<name>.sql"), "{err}");
    let dup = dir_with(&[("0001_a.sql", ""), ("0001_b.sql", "")]);
    assert!(
        migrate::read_dir(dup.path())
            .unwrap_err()
            .to_string()
            .contains("share number 0001")
    );
}

#[tokio::test]
async fn the_projects_migrations_apply_cleanly() {
    let (_env, url) = empty_database().await;
    let report = migrate::run(&url, &crate::common::workspace().join("migrations"))
        .await
        .unwrap();
    assert!(!report.applied.is_empty());
}

#[tokio::test]
async fn an_unreachable_database_is_one_clear_line_without_the_password() {
    let dir = dir_with(&[("0001_a.sql", "select 1;")]);
    // Port 9 (discard) on loopback: nothing listens there.
    let err = migrate::run("postgres://u:hunter2@127.0.0.1:9/db", dir.path())
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.starts_with("cannot connect to Postgres (postgres://u:***@127.0.0.1:9/db)"),
        "{msg}"
    );
    assert!(!msg.contains("hunter2") && !msg.contains('\n'), "{msg}");
}

// ---- down and status ----------------------------------------------------------------------

async fn table_exists(url: &str, table: &str) -> bool {
    connect(url)
        .await
        .query_one("select to_regclass($1) is not null", &[&table])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn down_undoes_the_newest_first_and_up_applies_them_again() {
    let (_env, url) = empty_database().await;
    let dir = dir_with(&[
        ("0001_a.sql", "create table a (a_id int primary key);"),
        ("0001_a.down.sql", "drop table a;"),
        (
            "0002_b.sql",
            "create table b (a_id int references a (a_id)); insert into a values (1); insert into b values (1);",
        ),
        ("0002_b.down.sql", "drop table b;"),
    ]);
    migrate::run(&url, dir.path()).await.unwrap();

    assert_eq!(
        migrate::down(&url, dir.path(), 1).await.unwrap(),
        ["0002_b"]
    );
    assert_eq!(versions(&url).await, [1]);
    assert!(!table_exists(&url, "b").await && table_exists(&url, "a").await);

    // More steps than applied migrations undoes what there is.
    assert_eq!(
        migrate::down(&url, dir.path(), 9).await.unwrap(),
        ["0001_a"]
    );
    assert_eq!(versions(&url).await, Vec::<i32>::new());
    assert!(!table_exists(&url, "a").await);

    let again = migrate::run(&url, dir.path()).await.unwrap();
    assert_eq!(again.applied, ["0001_a", "0002_b"]);
}

#[tokio::test]
async fn an_irreversible_or_missing_down_file_stops_down_before_anything_is_undone() {
    let (_env, url) = empty_database().await;
    let mut files = vec![
        ("0001_a.sql", "create table a (x int);"),
        ("0001_a.down.sql", "drop table a;"),
        ("0002_b.sql", "create table b (x int);"),
        ("0002_b.down.sql", "-- irreversible\ndrop table b;"),
        ("0003_c.sql", "create table c (x int);"),
    ];
    let dir = dir_with(&files);
    migrate::run(&url, dir.path()).await.unwrap();

    let err = migrate::down(&url, dir.path(), 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("0003_c.sql has no down file"), "{err}");
    assert_eq!(versions(&url).await, [1, 2, 3]);

    files.push(("0003_c.down.sql", "drop table c;"));
    let dir = dir_with(&files);
    let err = migrate::down(&url, dir.path(), 3)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("0002_b is marked irreversible"), "{err}");
    // Not even 0003, which comes first and could be undone.
    assert_eq!(versions(&url).await, [1, 2, 3]);
    assert!(table_exists(&url, "c").await);

    assert_eq!(
        migrate::down(&url, dir.path(), 1).await.unwrap(),
        ["0003_c"]
    );
}

#[tokio::test]
async fn a_down_file_without_its_migration_is_refused() {
    let dir = dir_with(&[
        ("0001_a.sql", "select 1;"),
        ("0002_b.down.sql", "select 1;"),
    ]);
    let err = migrate::read_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("0002_b.down.sql has no 0002_b.sql"), "{err}");
}

#[tokio::test]
async fn status_names_applied_pending_changed_and_missing_migrations() {
    let (_env, url) = empty_database().await;
    let dir = dir_with(&[
        ("0001_a.sql", "select 1;"),
        ("0001_a.down.sql", "select 1;"),
        ("0002_b.sql", "select 2;"),
        ("0002_b.down.sql", "-- irreversible\n"),
    ]);
    migrate::run(&url, dir.path()).await.unwrap();
    // 0001 changes after it was applied, 0002 is gone, 0003 is new.
    let later = dir_with(&[
        ("0001_a.sql", "select 1; -- edited"),
        ("0001_a.down.sql", "select 1;"),
        ("0003_c.sql", "select 3;"),
    ]);
    let status = migrate::status(&url, later.path()).await.unwrap();
    let summary: Vec<(&str, bool, bool, bool, bool)> = status
        .iter()
        .map(|s| {
            (
                s.label.as_str(),
                s.applied_at.is_some(),
                s.drifted,
                s.missing,
                s.reversible,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("0001_a", true, true, false, true),
            ("0002_b", true, false, true, false),
            ("0003_c", false, false, false, false),
        ]
    );
}

/// `pg_dump --schema-only` of `url`: what up, down and up again must leave unchanged.
fn schema_dump(url: &str) -> String {
    let out = std::process::Command::new("pg_dump")
        .args(["--schema-only", "--no-owner", "--no-privileges", url])
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // pg_dump 15.14 and later fences its output with a random `\restrict` key.
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn every_migration_has_a_down_file_and_up_down_up_keeps_the_schema_with_rows_in_every_table()
{
    let dir = crate::common::workspace().join("migrations");
    for m in migrate::read_dir(&dir).unwrap() {
        let label = m.label();
        let down = m.down.unwrap_or_else(|| panic!("{label} has no down file"));
        assert!(!down.irreversible, "{label} is irreversible");
    }

    let api = crate::common::Api::for_fakes(None, &[]).await;
    let url = api.env.database_url.clone();
    fill_every_table(&api).await;
    let db = api.env.db().await;
    let tables: Vec<String> = db
        .query(
            "select table_name::text from information_schema.tables
             where table_schema = 'public' and table_type = 'BASE TABLE'
               and table_name <> 'schema_migrations' order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let mut without_rows = Vec::new();
    for table in &tables {
        let n: i64 = db
            .query_one(&format!("select count(*) from {table}"), &[])
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            without_rows.push(table.clone());
        }
    }
    assert!(
        without_rows.is_empty(),
        "tables without rows: {without_rows:?}"
    );
    api.app.shutdown().await;

    let before = schema_dump(&url);
    let count = migrate::read_dir(&dir).unwrap().len();
    let undone = migrate::down(&url, &dir, count).await.unwrap();
    assert_eq!(undone.len(), count);
    let left: i64 = db
        .query_one(
            "select count(*) from information_schema.tables
             where table_schema = 'public' and table_name <> 'schema_migrations'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "down all leaves only schema_migrations");
    migrate::run(&url, &dir).await.unwrap();
    let after = schema_dump(&url);
    let lost: Vec<&str> = before.lines().filter(|l| !after.contains(l)).collect();
    let gained: Vec<&str> = after.lines().filter(|l| !before.contains(l)).collect();
    assert!(
        lost.is_empty() && gained.is_empty() && after == before,
        "the schema changed: lost {lost:#?}, gained {gained:#?}"
    );
}

/// Puts at least one row in every table, through the API where it can.
async fn fill_every_table(api: &crate::common::Api) {
    use serde_json::json;
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Rows"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.create(
        &ada.access,
        "/api/v1/api-keys",
        json!({"name": "ci", "project_id": p, "role": "viewer"}),
    )
    .await;
    let res = api
        .call(
            "PUT",
            &format!("/api/v1/projects/{p}/secrets/token"),
            Some(&ada.access),
            Some(json!({"value": "s3cret"})),
        )
        .await;
    assert_eq!(res.status, 204);
    let collector = crate::common::FakeServer::start(200, json!({}), Duration::ZERO).await;
    api.set_trace_endpoint(&ada, &p, &collector.url("/v1/traces"))
        .await;
    api.set_price(&ada.access, &p, "fake/small", "1", "1").await;
    let tool = api
        .create(
            &ada.access,
            "/api/v1/tools",
            json!({"project_id": p, "name": "echo", "description": "echo",
                   "input_schema": {"type": "object"},
                   "http": {"method": "POST", "url": collector.url("/echo")}}),
        )
        .await["id"]
        .clone();
    api.create(
        &ada.access,
        "/api/v1/mcp-servers",
        json!({"project_id": p, "name": "docs", "url": collector.url("/mcp"),
               "allowed_tools": ["search"]}),
    )
    .await;
    api.create(
        &ada.access,
        "/api/v1/agents",
        json!({"project_id": p, "name": "a", "model": "fake/small", "system_prompt": "x",
               "tool_ids": [tool], "mcp_tools": ["mcp:docs/search"], "stream": true}),
    )
    .await;
    api.create(
        &ada.access,
        "/api/v1/policies",
        json!({"project_id": p, "name": "budget",
               "rules": {"budget": {"limit_usd": "100", "window": "day", "action": "alert"}}}),
    )
    .await;
    let wf = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "w", "definition": {"steps": [
                {"key": "call", "kind": "tool", "tool_id": tool, "input": {}}]}}),
        )
        .await["id"]
        .clone();
    let res = api
        .call_with(
            "POST",
            "/api/v1/runs",
            &ada.access,
            &[("idempotency-key", "fill-1")],
            Some(json!({"workflow_id": wf, "input": {}})),
        )
        .await;
    assert_eq!(res.status, 201);
    api.finished_run(&ada.access, res.json()["id"].as_str().unwrap())
        .await;
    api.create(
        &ada.access,
        "/api/v1/schedules",
        json!({"project_id": p, "workflow_id": wf, "cron": "* * * * *", "input": {}}),
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    api.tick("scheduler", now + 120).await;
    // A webhook (and its secret) with a queued delivery, and a trigger.
    let hook = api
        .create(
            &ada.access,
            "/api/v1/webhooks",
            json!({"project_id": p, "url": collector.url("/hook"), "event_types": ["run.failed"]}),
        )
        .await;
    let test = format!("/api/v1/webhooks/{}/test", hook["id"].as_str().unwrap());
    assert_eq!(
        api.status("POST", &test, Some(&ada.access), None).await,
        202
    );
    api.create(
        &ada.access,
        "/api/v1/triggers",
        json!({"project_id": p, "name": "t", "workflow_id": wf}),
    )
    .await;
    // An approval decided.
    let gated = api
        .create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": "gated", "definition": {"steps": [
                {"key": "gate", "kind": "approval", "input": {}}]}}),
        )
        .await["id"]
        .clone();
    let run = api.start_run(&ada.access, &gated, json!({})).await;
    let run = run["id"].as_str().unwrap();
    crate::engine::wait_status(api, &ada, run, "waiting").await;
    let approve = format!("/api/v1/runs/{run}/steps/gate/approve");
    let res = api
        .call(
            "POST",
            &approve,
            Some(&ada.access),
            Some(json!({"approved": true})),
        )
        .await;
    assert_eq!(res.status, 200);
    // What no API call leaves behind for long: a budget's spend and an open reservation.
    let db = api.env.db().await;
    db.batch_execute(&format!(
        "insert into budget_usage (policy_id, window_start, spent_usd)
           select policy_id, now(), 0 from policies where project_id = '{p}'
           on conflict do nothing;
         insert into budget_reservations (reservation_id, policy_id, window_start, amount_usd, expires_at)
           select gen_random_uuid(), policy_id, now(), 0, now() from policies where project_id = '{p}';
         insert into run_cost_reservations (reservation_id, run_id, amount_usd, expires_at)
           select gen_random_uuid(), run_id, 0, now() from runs where project_id = '{p}' limit 1;"
    ))
    .await
    .unwrap();
}

/// Migration 0018 takes the API key out of the replies kept before keys were sealed in
/// them, and leaves the rest of each reply, and every other reply, as it was.
#[tokio::test]
async fn the_idempotency_expiry_migration_takes_clear_keys_out_of_kept_replies() {
    let env = TestEnv::new().await;
    let dir = crate::common::workspace().join("migrations");
    // Back to just before 0018, whatever came after it.
    let after: Vec<String> = migrate::read_dir(&dir)
        .unwrap()
        .iter()
        .filter(|m| m.version >= 18)
        .map(|m| m.label())
        .collect();
    let undone = migrate::down(&env.database_url, &dir, after.len())
        .await
        .unwrap();
    assert_eq!(
        undone.last().map(String::as_str),
        Some("0018_idempotency_expiry")
    );
    let db = env.db().await;
    let kept = [
        (
            "with-key",
            r#"{"id": "k1", "prefix": "sk_abc", "secret": "sk_abc_clear"}"#,
        ),
        ("without-key", r#"{"id": "p1", "name": "Project"}"#),
    ];
    for (key, response) in kept {
        db.execute(
            "insert into idempotency_keys (principal, route, key, request_hash, status, response)
             values ('u1', 'POST /api/v1/api-keys', $1, 'h', 201, $2::text::jsonb)",
            &[&key, &response],
        )
        .await
        .unwrap();
    }
    let applied = migrate::run(&env.database_url, &dir).await.unwrap().applied;
    assert_eq!(applied, after);
    let replies: Vec<String> = column(
        &db,
        "select response::text from idempotency_keys order by key",
        &[],
    )
    .await;
    assert_eq!(
        replies,
        [
            r#"{"id": "k1", "prefix": "sk_abc"}"#,
            r#"{"id": "p1", "name": "Project"}"#
        ]
    );
}
