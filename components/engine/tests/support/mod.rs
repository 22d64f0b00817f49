//! The native suite's footing: a real Postgres (`SPARKOPS_TEST_DATABASE_URL`), one fresh
//! database per test copied from a migrated template, over the engine's native [`Pg`].

use std::sync::{Mutex, OnceLock};

use chrono::Utc;
use postgres::{Client, NoTls};
use serde_json::{Value, json};
use sparkops_core::db::{self, Connection, Value as V};
pub use sparkops_engine::native::Pg;
use sparkops_engine::{Claim, RunStatus, StepStatus};

/// What the suite asks of a connection besides the engine's calls.
pub trait Ask {
    /// Runs `sql` and returns the first column of the first row as text (`None` for no
    /// row or SQL `null`).
    fn scalar(&self, sql: &str, params: &[V]) -> Option<String>;
    fn count(&self, sql: &str, params: &[V]) -> i64;
    /// Another connection to the same database (another host, another instance).
    fn another(&self) -> Pg;
}

impl Ask for Pg {
    fn scalar(&self, sql: &str, params: &[V]) -> Option<String> {
        let rows = self.query(sql, params).expect(sql);
        rows.first()
            .and_then(|r| r.opt_text(0).expect("a text column"))
    }

    fn count(&self, sql: &str, params: &[V]) -> i64 {
        self.query(sql, params).expect(sql)[0]
            .int(0)
            .expect("a count")
    }

    fn another(&self) -> Pg {
        Pg::connect(&self.url).expect("connect to the test database")
    }
}

/// A fresh, migrated database of its own for one test.
pub fn database() -> Pg {
    static TEMPLATE: OnceLock<String> = OnceLock::new();
    // CREATE DATABASE ... TEMPLATE refuses while another copy of the template is made.
    static COPYING: Mutex<()> = Mutex::new(());
    let base = std::env::var("SPARKOPS_TEST_DATABASE_URL").expect(
        "SPARKOPS_TEST_DATABASE_URL names a Postgres the suite may create databases in \
         (infra/dev test sets it)",
    );
    let template = TEMPLATE.get_or_init(|| {
        let name = format!("test_engine_template_{}", short_id());
        admin(&base)
            .batch_execute(&format!("create database {name}"))
            .expect("create the template");
        let mut client = Client::connect(&with_database(&base, &name), NoTls).expect("connect");
        for sql in migrations() {
            client.batch_execute(&sql).expect("a migration applies");
        }
        name
    });
    let name = format!("test_engine_{}", short_id());
    {
        let _one = COPYING.lock().unwrap_or_else(|e| e.into_inner());
        admin(&base)
            .batch_execute(&format!("create database {name} template {template}"))
            .expect("copy the template");
    }
    Pg::connect(&with_database(&base, &name)).expect("connect to the test database")
}

fn admin(base: &str) -> Client {
    Client::connect(base, NoTls).expect("connect to SPARKOPS_TEST_DATABASE_URL")
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

fn with_database(url: &str, name: &str) -> String {
    let (head, _) = url.rsplit_once('/').expect("a database URL ends in /name");
    let query = url
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{head}/{name}{query}")
}

/// The project's migrations, up files in order.
fn migrations() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("the migrations folder")
        .map(|e| e.expect("a migration").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .filter(|p| !p.to_string_lossy().ends_with(".down.sql"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("a readable migration"))
        .collect()
}

/// A user and a project of theirs.
pub fn project(db: &Pg) -> String {
    let user = db
        .scalar(
            "insert into users (user_id, email, name, password_hash) values (gen_random_uuid(), $1, 'Ada', 'x') returning user_id::text",
            &[V::Text(format!("{}@example.com", short_id()))],
        )
        .expect("a user");
    db.scalar(
        "insert into projects (project_id, owner_id, name, slug) values (gen_random_uuid(), $1, 'P', $2) returning project_id::text",
        &[V::Uuid(user), V::Text(format!("p-{}", short_id()))],
    )
    .expect("a project")
}

/// A webhook of `project` hearing `event_types` (a Postgres array literal such as
/// `{run.succeeded}`), so the deliveries a transition queues can be read.
pub fn webhook(db: &Pg, project: &str, event_types: &str) {
    db.execute(
        "insert into webhooks (webhook_id, project_id, url, event_types)
         values (gen_random_uuid(), $1, 'https://example.com/hook', $2::text::text[])",
        &[V::Uuid(project.into()), V::Text(event_types.into())],
    )
    .expect("a webhook");
}

/// A workflow of `project` at version 1 with `definition` and `input_schema`.
pub fn workflow(
    db: &Pg,
    project: &str,
    definition: Value,
    input_schema: Value,
    timeout_s: Option<i32>,
) -> sparkops_engine::Workflow {
    let id = db
        .scalar(
            "insert into workflows (workflow_id, project_id, name, timeout_s) values (gen_random_uuid(), $1, 'W', $2) returning workflow_id::text",
            &[V::Uuid(project.into()), timeout_s.map_or(V::Null, V::Int32)],
        )
        .expect("a workflow");
    db.execute(
        "insert into workflow_versions (workflow_id, version, definition, input_schema) values ($1, 1, $2, $3)",
        &[
            V::Uuid(id.clone()),
            V::Json(definition),
            if input_schema.is_null() { V::Null } else { V::Json(input_schema) },
        ],
    )
    .expect("a version");
    sparkops_engine::start::workflow(db, &id, None)
        .expect("read")
        .expect("the workflow")
}

/// A fresh database with a project and a workflow of it with `definition` (no input
/// schema, no timeout).
pub fn setup(definition: Value) -> (Pg, sparkops_engine::Workflow) {
    let db = database();
    let project = project(&db);
    let w = workflow(&db, &project, definition, Value::Null, None);
    (db, w)
}

/// A definition of condition steps: `(key, depends_on)`.
pub fn chain(steps: &[(&str, &[&str])]) -> Value {
    let steps: Vec<Value> = steps
        .iter()
        .map(|(key, deps)| json!({"key": key, "kind": "condition", "input": {"step": key}, "depends_on": deps}))
        .collect();
    json!({"steps": steps})
}

/// Starts a run of `w` by the API and returns its id.
pub fn start(db: &Pg, w: &sparkops_engine::Workflow, input: Value) -> String {
    start_capped(db, w, input, None)
}

/// [`start`] with the run's own `max_cost_usd`.
pub fn start_capped(
    db: &Pg,
    w: &sparkops_engine::Workflow,
    input: Value,
    max_cost_usd: Option<sparkops_core::money::Usd>,
) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let user = db
        .scalar(
            "select owner_id::text from projects where project_id = $1",
            &[V::Uuid(w.project_id.clone())],
        )
        .expect("the owner");
    let run = sparkops_engine::NewRun {
        run_id: &id,
        workflow: w,
        input: &input,
        origin: sparkops_engine::Origin::Api { user_id: &user },
        now: Utc::now(),
        max_cost_usd,
    };
    db::transaction(db, |tx| sparkops_engine::start(tx, &run)).expect("the run starts");
    id
}

/// One advance in its own transaction.
pub fn advance(db: &Pg, run: &str) -> Vec<Claim> {
    db::transaction(db, |tx| sparkops_engine::advance(tx, run)).expect("the run advances")
}

pub fn run_status(db: &Pg, run: &str) -> RunStatus {
    let s = db
        .scalar(
            "select status from runs where run_id = $1",
            &[V::Uuid(run.into())],
        )
        .expect("the run");
    RunStatus::parse(&s).expect("a run status")
}

pub fn step_status(db: &Pg, run: &str, key: &str) -> StepStatus {
    let s = db
        .scalar(
            "select status from run_steps where run_id = $1 and step_key = $2",
            &[V::Uuid(run.into()), V::Text(key.into())],
        )
        .expect("the step");
    StepStatus::parse(&s).expect("a step status")
}

/// The run's events as `(seq, kind, step)`, in order.
pub fn events(db: &Pg, run: &str) -> Vec<(i64, String, Option<String>)> {
    db.query(
        "select seq, kind, step_key from run_events where run_id = $1 order by seq",
        &[V::Uuid(run.into())],
    )
    .expect("events")
    .iter()
    .map(|r| {
        (
            r.int(0).unwrap(),
            r.text(1).unwrap(),
            r.opt_text(2).unwrap(),
        )
    })
    .collect()
}

/// The kinds of the run's events, in order.
pub fn kinds(db: &Pg, run: &str) -> Vec<String> {
    events(db, run).into_iter().map(|(_, k, _)| k).collect()
}

/// Waits (bounded) until some session of `db`'s database waits for a lock: how a test
/// knows a concurrent transaction is queued behind another without sleeping a guess.
pub fn wait_for_a_blocked_session(db: &Pg) {
    for _ in 0..2_000 {
        if db.count(
            "select count(*) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'",
            &[],
        ) > 0
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("no session came to wait for a lock within 10 s");
}
