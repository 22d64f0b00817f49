//! Chaos: a batch of runs (chains and diamonds of tool steps) while the app's host process
//! is killed with SIGKILL and restarted, Redis is killed and restarted (the host then ends,
//! as `spin up` does on a lost subscription, and is restarted as a supervisor would), and
//! Postgres is restarted, all of the test's own. Then every run is final, every step's
//! recorded output is one the tool gave for that step, and a step was executed again only
//! as a recorded new attempt after its lease was taken back. The figures are printed.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::process::{OwnPostgres, OwnRedis, Process, free_service_port, wait_for_health};
use crate::common::{
    Answer, Client, FakeServer, OPEN_URL_RULES, TEST_JWT_SECRET, TEST_MASTER_KEY, TempDir, User,
    connect, eventually_for, every_run_finished, request_raw, workspace,
};

const CHAINS: usize = 12;
const DIAMONDS: usize = 12;

/// `sparkops up` on the test's own Postgres and Redis at a fixed address, restartable.
struct Host {
    args: Vec<String>,
    vars: HashMap<String, String>,
    dir: TempDir,
    listen: std::net::SocketAddr,
    starts: usize,
}

impl Host {
    fn new(pg: &OwnPostgres, redis: &OwnRedis) -> Self {
        let dir = TempDir::new();
        let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_service_port())
            .parse()
            .unwrap();
        let config = dir.path().join("runtime-config.toml");
        std::fs::write(
            &config,
            format!(
                "[key_value_store.default]\ntype = \"redis\"\nurl = \"{}\"\n",
                redis.url
            ),
        )
        .unwrap();
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let args = vec![
            "up".into(),
            "--manifest".into(),
            path(&workspace().join("spin.toml")),
            "--runtime-config-file".into(),
            path(&config),
            "--listen".into(),
            listen.to_string(),
            "--state-dir".into(),
            path(&dir.path().join("state")),
            "--cache-dir".into(),
            path(&workspace().join("target/host-test-cache")),
            "--database-url".into(),
            pg.url.clone(),
            "--migrations".into(),
            path(&workspace().join("migrations")),
        ];
        let host_port = |u: &str| {
            let u = url::Url::parse(u).unwrap();
            format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
        };
        let vars = [
            ("DATABASE_URL", pg.url.clone()),
            ("DATABASE_HOST", host_port(&pg.url)),
            ("REDIS_URL", redis.url.clone()),
            ("REDIS_HOST", host_port(&redis.url)),
            ("JWT_SECRET", TEST_JWT_SECRET.into()),
            ("SECRETS_MASTER_KEY", TEST_MASTER_KEY.into()),
            ("DISPATCH_URL", format!("http://{listen}")),
            ("RATE_LIMIT_IP_PER_MINUTE", "1000000".into()),
            ("RATE_LIMIT_PER_MINUTE", "1000000".into()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("SPIN_VARIABLE_{k}"), v))
        .chain(OPEN_URL_RULES.map(|(k, v)| (k.into(), v.into())))
        .collect();
        Self {
            args,
            vars,
            dir,
            listen,
            starts: 0,
        }
    }

    /// Starts it and waits until it answers.
    async fn start(&mut self) -> Process {
        self.starts += 1;
        let name = format!("host-{}", self.starts);
        let program = Path::new(env!("CARGO_BIN_EXE_sparkops"));
        let mut up = Process::spawn(&name, program, &self.args, &self.vars, self.dir.path());
        wait_for_health(self.listen, &mut [&mut up]).await;
        up
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }
}

/// A run started the way a careful client does while the service has faults: the same
/// `Idempotency-Key` on every try, tried again on no answer, 5xx or 429.
async fn start_run(host_url: &str, who: &User, workflow: &Value, key: &str) -> String {
    let auth = format!("Bearer {}", who.access);
    let headers = [
        ("authorization", auth.as_str()),
        ("idempotency-key", key),
        ("content-type", "application/json"),
    ];
    let body = json!({"workflow_id": workflow, "input": {}}).to_string();
    for _ in 0..600 {
        match request_raw("POST", host_url, &headers, body.clone().into_bytes()).await {
            Ok(r) if r.status == 201 || r.status == 200 => {
                return r.json()["id"].as_str().unwrap().to_string();
            }
            Ok(r) if r.status >= 500 || r.status == 429 => {}
            Ok(r) => panic!("{}: {}", r.status, String::from_utf8_lossy(&r.body)),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("run {key} never started");
}

/// A pause of 0.5 to 2 s, different on every run of the test.
fn random_pause() -> Duration {
    Duration::from_millis(500 + (uuid::Uuid::new_v4().as_u128() % 1500) as u64)
}

#[tokio::test]
async fn runs_survive_a_killed_host_and_restarted_redis_and_postgres_with_every_output_as_answered()
{
    let pg = OwnPostgres::start();
    let mut redis = OwnRedis::start().await;
    // Every answer is different ({"n": i} for the i-th call), so a recorded output names
    // the call it came from.
    let answers = (0..10_000)
        .map(|n| Answer {
            status: 200,
            body: json!({ "n": n }),
            headers: Vec::new(),
        })
        .collect();
    let tool = FakeServer::answering(answers, Duration::from_millis(300)).await;
    let mut host = Host::new(&pg, &redis);
    let mut up = host.start().await;
    let api = Client::new(host.url(""));
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Chaos"})).await["id"].clone();
    let t = api
        .create(
            &ada.access,
            "/api/v1/tools",
            json!({"project_id": p, "name": "numbered", "description": "n",
                "input_schema": {"type": "object"}, "http": {"method": "POST", "url": tool.url("/")}}),
        )
        .await["id"]
        .clone();
    let step = |key: &str, deps: &[&str]| {
        json!({"key": key, "kind": "tool", "tool_id": t, "input": {}, "depends_on": deps,
            "retry": {"max_attempts": 6, "initial_interval_ms": 100}})
    };
    let workflow = async |name: &str, steps: Value| {
        api.create(
            &ada.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": name, "definition": {"steps": steps}}),
        )
        .await["id"]
            .clone()
    };
    let chain = workflow(
        "Chain",
        json!([step("a", &[]), step("b", &["a"]), step("c", &["b"])]),
    )
    .await;
    let diamond = workflow(
        "Diamond",
        json!([
            step("a", &[]),
            step("b", &["a"]),
            step("c", &["a"]),
            step("d", &["b", "c"])
        ]),
    )
    .await;

    // Runs start throughout the faults, from a client of their own.
    let runs_url = host.url("/api/v1/runs");
    let starter = {
        let (who, chain, diamond) = (ada.clone(), chain.clone(), diamond.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..CHAINS + DIAMONDS {
                let wf = if i % 2 == 0 { &chain } else { &diamond };
                let key = format!("chaos-{i}");
                ids.push(start_run(&runs_url, &who, wf, &key).await);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            ids
        })
    };

    // The host dies mid-batch, and comes back.
    tokio::time::sleep(random_pause()).await;
    up.kill();
    let mut kills = 1;
    up = host.start().await;
    // Redis dies: the host ends with its lost subscription; both come back.
    tokio::time::sleep(random_pause()).await;
    let port = redis.port();
    drop(redis);
    eventually_for(Duration::from_secs(15), async || {
        up.has_exited().then_some(())
    })
    .await;
    let ended_with = up.log();
    assert!(ended_with.contains("disconnected from"), "{ended_with}");
    redis = OwnRedis::start_on(port).await;
    up = host.start().await;
    // Postgres restarts under it.
    tokio::time::sleep(random_pause()).await;
    pg.restart();
    let last_fault = Instant::now();

    let ids = tokio::time::timeout(Duration::from_secs(120), starter)
        .await
        .expect("every run started")
        .unwrap();
    let db = connect(&pg.url).await;
    every_run_finished(&db, Duration::from_secs(180)).await;
    let settled = last_fault.elapsed();
    kills += 1; // the host Redis ended

    // Every run is final, and succeeded: the tool never failed.
    let statuses: Vec<(String, String)> = db
        .query(
            "select run_id::text, status from runs order by created_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(statuses.len(), ids.len(), "one run per client key");
    for (run, status) in &statuses {
        assert_eq!(status, "succeeded", "run {run}\n{}", up.log());
    }

    // What the tool answered, by step (its Idempotency-Key is `<run>:<step>`).
    let mut answered: HashMap<String, Vec<Value>> = HashMap::new();
    for (n, r) in tool.received().iter().enumerate() {
        let key = r.headers["idempotency-key"].to_str().unwrap().to_string();
        answered.entry(key).or_default().push(json!({ "n": n }));
    }
    let steps = db
        .query(
            "select s.run_id::text, s.step_key, s.output, s.attempt,
                    (select count(*) from run_events e where e.run_id = s.run_id
                       and e.step_key = s.step_key and e.kind = 'step.lease_expired'),
                    (select count(*) from run_events e where e.run_id = s.run_id
                       and e.step_key = s.step_key and e.kind = 'step.retrying')
             from run_steps s",
            &[],
        )
        .await
        .unwrap();
    let (mut taken_backs, mut retries, mut repeated_calls) = (0, 0, 0);
    for s in &steps {
        let (run, key): (String, String) = (s.get(0), s.get(1));
        let (output, attempt): (Value, i32) = (s.get(2), s.get(3));
        let (taken_back, retried): (i64, i64) = (s.get(4), s.get(5));
        let calls = answered
            .get(&format!("{run}:{key}"))
            .cloned()
            .unwrap_or_default();
        assert!(
            calls.contains(&output),
            "{run}/{key} recorded {output}, the tool answered {calls:?}"
        );
        // A step ran again only as a recorded new attempt: never two calls in one attempt,
        // and every extra attempt is a take-back of a lost lease or a recorded retry (a
        // failure to run it while Postgres restarted).
        assert!(
            calls.len() <= attempt as usize,
            "{run}/{key}: {} calls in {attempt} attempts",
            calls.len()
        );
        assert_eq!(i64::from(attempt) - 1, taken_back + retried, "{run}/{key}");
        taken_backs += taken_back;
        retries += retried;
        repeated_calls += calls.len() - 1;
    }
    assert_eq!(steps.len(), CHAINS * 3 + DIAMONDS * 4);
    eprintln!(
        "chaos: {} runs, {} steps; host ended {kills} times (1 SIGKILL, 1 lost Redis), Redis \
         restarted once, Postgres once; {taken_backs} attempts taken back, {retries} retried, \
         {repeated_calls} tool calls repeated (same key); settled {:.1} s after the last fault",
        ids.len(),
        steps.len(),
        settled.as_secs_f64()
    );
    drop(redis);
}
