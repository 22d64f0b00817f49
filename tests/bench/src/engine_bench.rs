//! The run engine's benchmark: run latency (`POST /runs` to `succeeded`) and steps per
//! second for 1-step and 10-step workflows of no-op tool calls on loopback, through the real
//! app (spin.toml) on this host, with the CPU each step cost this process, Postgres and
//! Redis; beside two Postgres ceilings in the same run: `pgbench` running the statements of
//! one chained step, and whole 10-step runs of the engine's own statements on native
//! connections ([`ceiling`]). The side-by-side rounds of the 10-step chain run twice: with
//! every process sharing every core, then with Postgres on cores of its own, as deployed
//! ([`placement`]).
//!
//! The 10-step batch again over two replicas of the app on the same database and Redis,
//! with counts of the work done (each step once, nudges, trigger handlers per replica).
//!
//! Then `/metrics/summary` and `/metrics/steps` latency over a million generated steps.
//!
//! Usage: engine_bench (from the workspace root; `DATABASE_URL` and `REDIS_URL` name the
//! servers; a fresh database is made and dropped). `RUNS` sets the throughput batch (400;
//! a batch of each workflow warms the app up first); `BATCH_POLL_MS` how often a batch's end
//! is polled for (50); `ROUNDS` the rounds of the side-by-side ratios (3); `ENGINE_ONLY=1`
//! skips the metrics part; `SPIN=<the spin CLI>` then runs the 10-step chain under real
//! Spin too (the host stopped), beside the native ceiling; `STATEMENTS=<a superuser's
//! database URL>` writes each batch's costliest statements (see [`Statements`]).
//! Bounded: every wait has a limit, and every address is loopback.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use sparkops_host::{AppOptions, RunningApp};

mod ceiling;
mod cpu;
mod placement;

/// The client concurrency of the throughput runs and of pgbench.
const CLIENTS: usize = 8;
const LATENCY_SAMPLES: usize = 30;
/// How long each ceiling runs for its row of the table.
const CEILING_PERIOD: Duration = Duration::from_secs(10);
/// How long each ceiling runs in a round of the side-by-side comparison: about as long as
/// the app's batch takes.
const ROUND_PERIOD: Duration = Duration::from_secs(3);

/// The bench's setting `name` from the environment, or `default` when unset or unreadable.
fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Clears the dead rows the parts before left, so that no part of a round pays for
/// another's vacuum: an autovacuum that earlier rows set off used to land in the next part's
/// time and CPU (the app's batch right after the native ceiling's long row often showed
/// Postgres at 1.2-2.0 ms a step, against about 1.0 in the other rounds). It also clears the
/// dead versions of the 400 rows `pgbench` updates, so each of its rounds starts as its
/// first did.
async fn vacuum_before_part(db: &tokio_postgres::Client) -> Result<()> {
    db.batch_execute("vacuum runs, run_steps, run_events")
        .await
        .context("vacuum before a part of a round")
}

/// The rounds of the side-by-side comparison: `ROUNDS`, or 3.
fn rounds() -> usize {
    setting("ROUNDS", 3)
}

/// Steps per second of `runs` runs of `steps` steps each, done in `elapsed`.
fn steps_per_second(runs: usize, steps: usize, elapsed: Duration) -> f64 {
    (runs * steps) as f64 / elapsed.as_secs_f64()
}

/// How often a batch's end is polled for, unless `BATCH_POLL_MS` says. A batch's time is
/// read from the database's record of its last run's end, so the poll need not be
/// frequent, and a frequent one loads the Postgres it measures (see the README).
const BATCH_POLL_MS: u64 = 50;

/// The app's address, fixed because the app dispatches steps to itself through it.
const BENCH_LISTEN: &str = "127.0.0.1:3102";
/// A second replica's, for the replicas row.
const SECOND_LISTEN: &str = "127.0.0.1:3103";

#[global_allocator]
static ALLOCATOR: sparkops_host::Allocator = sparkops_host::Allocator;

#[tokio::main]
async fn main() -> Result<()> {
    let admin_url = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
    let redis_url = std::env::var("REDIS_URL").context("REDIS_URL")?;
    let batch: usize = setting("RUNS", 400);
    let root = std::env::current_dir()?;
    let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let admin = connect(&admin_url).await?;
    admin
        .batch_execute(&format!("create database {name}"))
        .await?;
    let mut url = url::Url::parse(&admin_url)?;
    url.set_path(&name);
    let database_url = url.to_string();
    let result = bench(&root, &database_url, &redis_url, &name, batch).await;
    admin
        .batch_execute(&format!("drop database if exists {name} with (force)"))
        .await?;
    result
}

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

fn host_port(url: &str) -> Result<String> {
    let u = url::Url::parse(url)?;
    Ok(format!(
        "{}:{}",
        u.host_str().context("a host")?,
        u.port().context("a port")?
    ))
}

async fn bench(
    root: &std::path::Path,
    database_url: &str,
    redis_url: &str,
    name: &str,
    batch: usize,
) -> Result<()> {
    sparkops_ops::migrate::run(database_url, &root.join("migrations")).await?;
    let state = std::env::temp_dir().join(format!("sparkops-{name}"));
    std::fs::create_dir_all(&state)?;
    let config = state.join("runtime-config.toml");
    std::fs::write(
        &config,
        format!("[key_value_store.default]\ntype = \"redis\"\nurl = \"{redis_url}\"\n"),
    )?;
    let env: HashMap<String, String> = [
        ("DATABASE_URL", database_url.to_string()),
        ("DATABASE_HOST", host_port(database_url)?),
        ("REDIS_URL", redis_url.to_string()),
        ("REDIS_HOST", host_port(redis_url)?),
        (
            "JWT_SECRET",
            "bench-secret-0123456789abcdef0123456789abcdef".into(),
        ),
        (
            "SECRETS_MASTER_KEY",
            "bench1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
        ),
        ("RUNS_CHANNEL", format!("runs-{name}")),
        ("TOOLS_ALLOW_HTTP", "true".into()),
        ("TOOLS_ALLOW_PRIVATE_HOSTS", "true".into()),
        ("RATE_LIMIT_PER_MINUTE", "100000000".into()),
        ("RATE_LIMIT_IP_PER_MINUTE", "100000000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("SPIN_VARIABLE_{k}"), v))
    .collect();
    // A replica of the app at `listen`, handing claimed steps to its own executor.
    let replica = |listen: &str| -> Result<AppOptions> {
        let mut env = env.clone();
        env.insert(
            "SPIN_VARIABLE_DISPATCH_URL".into(),
            format!("http://{listen}"),
        );
        Ok(AppOptions {
            manifest: root.join("spin.toml"),
            runtime_config: Some(config.clone()),
            listen: listen.parse()?,
            state_dir: state.join(listen.replace(':', "-")),
            cache_dir: Some(root.join("target/host-test-cache")),
            env,
            guest_output: false,
            components: Vec::new(),
            like_spinkube: false,
        })
    };
    let app = RunningApp::start(&replica(BENCH_LISTEN)?).await?;
    let (tool_addr, tool_calls) = noop_tool().await?;
    let client = Client {
        base: app.url(""),
        token: String::new(),
    };
    let registered = client
        .call(
            "POST",
            "/api/v1/auth/register",
            json!({"email": format!("bench-{name}@example.com"), "password": "bench-password-1", "name": "bench"}),
        )
        .await?;
    let client = Client {
        token: registered["access_token"]
            .as_str()
            .context("a token")?
            .to_string(),
        ..client
    };
    let project = client
        .call("POST", "/api/v1/projects", json!({"name": "Bench"}))
        .await?["id"]
        .clone();
    let tool = client
        .call(
            "POST",
            "/api/v1/tools",
            json!({"project_id": project, "name": "noop", "description": "answers {}",
                "input_schema": {"type": "object"}, "http": {"method": "POST", "url": format!("http://{tool_addr}/")}}),
        )
        .await?["id"]
        .clone();
    let mut workflows = Vec::new();
    for steps in [1usize, 10] {
        let definition: Vec<Value> = (0..steps)
            .map(|i| {
                let deps: Vec<String> = if i == 0 { vec![] } else { vec![format!("s{}", i - 1)] };
                json!({"key": format!("s{i}"), "kind": "tool", "tool_id": tool, "input": {}, "depends_on": deps})
            })
            .collect();
        let wf = client
            .call(
                "POST",
                "/api/v1/workflows",
                json!({"project_id": project, "name": format!("{steps} steps"), "definition": {"steps": definition}}),
            )
            .await?;
        workflows.push((steps, wf["id"].clone()));
    }
    let db = connect(database_url).await?;
    // Warm-up, a batch of each workflow: compiled code cached, the pool's connections open
    // with their statements prepared and planned (Postgres plans a prepared statement five
    // times per connection before it keeps a generic plan), and the tables past the sizes
    // at which their first automatic analyses invalidate every connection's plans. A
    // ceiling that runs for 10 s gets over all that in its first moments.
    for (_, wf) in &workflows {
        throughput(&db, &client, wf, batch).await?;
    }

    println!(
        "machine: {} cores, {}; {CLIENTS} clients; no-op tool on loopback",
        std::thread::available_parallelism()?.get(),
        cpu_model()
    );
    println!(
        "| case | runs | p50 latency | p95 latency | p50 POST answered | p50 recorded | steps/s | CPU ms per step: this process / Postgres / Redis |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (steps, wf) in &workflows {
        let samples = latency(database_url, &client, wf).await?;
        let p50 = |pick: fn(&Sample) -> Duration| percentile(&samples, pick, 50);
        let before = cpu::Cpu::now();
        let (runs, elapsed) = throughput(&db, &client, wf, batch).await?;
        let cpu = cpu::Cpu::now().per_step_since(&before, runs * steps);
        println!(
            "| engine: {steps}-step workflow | {runs} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} | {cpu} |",
            ms(p50(|s| s.seen)),
            ms(percentile(&samples, |s| s.seen, 95)),
            ms(p50(|s| s.answered)),
            ms(p50(|s| s.recorded)),
            steps_per_second(runs, *steps, elapsed)
        );
    }
    let second = RunningApp::start(&replica(SECOND_LISTEN)?).await?;
    let clients = [
        client.clone(),
        Client {
            base: second.url(""),
            ..client.clone()
        },
    ];
    let work = Work {
        db: &db,
        redis_url,
        tool_calls: &tool_calls,
    };
    replicas(&work, [&app, &second], &clients, &workflows[1].1, batch).await?;
    second.shutdown().await;
    diamond(&work, &client, &project, &tool).await?;
    webhooks(&db, &client, &project, &workflows[0].1, batch).await?;
    traces(
        &app,
        &db,
        &client,
        &project,
        &workflows[1].1,
        tool_addr,
        batch,
    )
    .await?;
    let script = pgbench_script(&db, &state, &tool).await?;
    let before = cpu::Cpu::now();
    let (tps, transactions) = pgbench(database_url, &script, CEILING_PERIOD)?;
    let cpu = cpu_after(&db, "pgbench")
        .await?
        .per_step_since(&before, transactions);
    println!(
        "| Postgres ceiling: pgbench, one step's statements per transaction | | | | | | {tps:.0} | {cpu} |"
    );
    let (steps, chain) = (workflows[1].0, &workflows[1].1);
    let before = cpu::Cpu::now();
    let statements = Statements::reset().await?;
    let ran = engine_ceiling(&db, database_url, chain, &tool, CEILING_PERIOD).await?;
    if let Some(statements) = statements {
        statements
            .report(ran.runs, ran.elapsed.as_micros() as i64)
            .await?;
    }
    let cpu = cpu_after(&db, CEILING_APPLICATION)
        .await?
        .per_step_since(&before, ran.steps);
    println!(
        "| Postgres ceiling: the engine's statements, 10-step runs, native | {} | | | | | {:.0} | {cpu} |",
        ran.runs,
        ran.steps_per_second()
    );
    let side = Chain {
        database_url,
        client: &client,
        wf: chain,
        steps,
        tool: &tool,
        script: &script,
        batch,
    };
    side_by_side(&db, &side).await?;
    // Then with Postgres on cores of its own, as deployed (see [`placement`]).
    match split(&db).await {
        Ok(applied) => {
            println!();
            println!("Split: {}.", applied.describe());
            side_by_side(&db, &side).await?;
        }
        Err(e) => println!("\nNo split rounds: {e:#}."),
    }
    // `ENGINE_ONLY=1`: the engine's figures alone (for side-by-side runs of two builds).
    if std::env::var("ENGINE_ONLY").is_err() {
        metrics(&db, &client, &project, &workflows[1].1).await?;
    }
    app.shutdown().await;
    // `SPIN=<the spin CLI>`: the same 10-step batches under real Spin, the host stopped.
    if let Ok(spin) = std::env::var("SPIN") {
        let under = UnderSpin {
            spin: PathBuf::from(spin),
            root,
            state: &state,
            config: &config,
            env: &env,
        };
        let native = Native {
            db: &db,
            database_url,
            chain,
            steps,
            tool: &tool,
        };
        under_spin(&under, &native, &client, batch).await?;
    }
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}

/// Postgres (the server `db` is a client of) on cores of its own, the rest on the others,
/// until the returned guard is dropped ([`placement`]).
async fn split(db: &tokio_postgres::Client) -> Result<placement::Applied> {
    let backend: i32 = db.query_one("select pg_backend_pid()", &[]).await?.get(0);
    placement::Split::new(backend)?.apply()
}

/// The 10-step chain as the side-by-side rounds run it.
struct Chain<'a> {
    database_url: &'a str,
    client: &'a Client,
    wf: &'a Value,
    steps: usize,
    tool: &'a Value,
    /// `pgbench`'s script of one step's statements.
    script: &'a std::path::Path,
    batch: usize,
}

/// Rounds in which the app's 10-step batch and both ceilings run right after one another,
/// each for about as long, the order turned each round: this machine's speed drifts by half
/// within minutes (its neighbours' load), so each ratio comes from one round.
async fn side_by_side(db: &tokio_postgres::Client, chain: &Chain<'_>) -> Result<()> {
    println!();
    println!(
        "| round | app, 10-step chain, steps/s | native ceiling | pgbench ceiling | app / native | app / pgbench | app's CPU ms per step: this process / Postgres / Redis |"
    );
    println!("|---|---|---|---|---|---|---|");
    for round in 1..=rounds() {
        let mut parts = [0.0f64; 3];
        let mut app_cpu = String::new();
        for turn in 0..3 {
            let part = (turn + round) % 3;
            vacuum_before_part(db).await?;
            parts[part] = match part {
                0 => {
                    let before = cpu::Cpu::now();
                    let (runs, elapsed) =
                        throughput(db, chain.client, chain.wf, chain.batch).await?;
                    app_cpu = cpu::Cpu::now().per_step_since(&before, runs * chain.steps);
                    steps_per_second(runs, chain.steps, elapsed)
                }
                1 => engine_ceiling(db, chain.database_url, chain.wf, chain.tool, ROUND_PERIOD)
                    .await?
                    .steps_per_second(),
                _ => pgbench(chain.database_url, chain.script, ROUND_PERIOD)?.0,
            };
        }
        let [app, native, pgbench] = parts;
        println!(
            "| {round} | {app:.0} | {native:.0} | {pgbench:.0} | {:.0}% | {:.0}% | {app_cpu} |",
            100.0 * app / native,
            100.0 * app / pgbench
        );
    }
    Ok(())
}

/// How the app is started under the Spin CLI: the same manifest, runtime config and
/// variables as the host's, its own listen address and state.
struct UnderSpin<'a> {
    spin: PathBuf,
    root: &'a std::path::Path,
    state: &'a std::path::Path,
    config: &'a std::path::Path,
    env: &'a HashMap<String, String>,
}

/// The native ceiling of the 10-step chain, for the ratios.
struct Native<'a> {
    db: &'a tokio_postgres::Client,
    database_url: &'a str,
    chain: &'a Value,
    /// The chain's steps.
    steps: usize,
    tool: &'a Value,
}

/// Sessions Postgres has opened on this database so far, once its statistics are flushed
/// (they are at most a second behind).
async fn sessions(db: &tokio_postgres::Client) -> Result<i64> {
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    Ok(db
        .query_one(
            "select sessions from pg_stat_database where datname = current_database()",
            &[],
        )
        .await?
        .get(0))
}

/// The app's address under Spin.
const SPIN_LISTEN: &str = "127.0.0.1:3104";

/// The 10-step chain under `spin up` (the host stopped, so Spin's app alone takes the
/// nudges and ticks): warmed up by a batch, then latency, steps/s with CPU, and rounds beside
/// the native ceiling as for the host. `client` is a client of the stopped host; the same
/// token serves (same key).
async fn under_spin(
    under: &UnderSpin<'_>,
    native: &Native<'_>,
    client: &Client,
    batch: usize,
) -> Result<()> {
    let mut vars = under.env.clone();
    vars.insert(
        "SPIN_VARIABLE_DISPATCH_URL".into(),
        format!("http://{SPIN_LISTEN}"),
    );
    let log = std::fs::File::create(under.state.join("spin.log"))?;
    let mut up = tokio::process::Command::new(&under.spin)
        .current_dir(under.root)
        .args(["up", "--from", "spin.toml", "--listen", SPIN_LISTEN])
        .arg("--runtime-config-file")
        .arg(under.config)
        .arg("--state-dir")
        .arg(under.state.join("spin"))
        .envs(&vars)
        .stdout(log.try_clone()?)
        .stderr(log)
        // A group of its own: `spin up` runs each trigger in a child process, which a kill
        // of `spin` alone would leave serving.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("starting spin (SPIN names the Spin CLI)")?;
    let client = Client {
        base: format!("http://{SPIN_LISTEN}"),
        ..client.clone()
    };
    let result = async {
        let started = Instant::now();
        while client.get("/healthz").await.is_err() {
            if let Some(status) = up.try_wait()? {
                bail!(
                    "spin up exited ({status}); see {}",
                    under.state.join("spin.log").display()
                );
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("spin up did not answer /healthz within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let version = std::process::Command::new(&under.spin)
            .arg("--version")
            .output()?;
        let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
        throughput(native.db, &client, native.chain, batch).await?;
        let samples = latency(native.database_url, &client, native.chain).await?;
        let sessions_before = sessions(native.db).await?;
        let before = cpu::Cpu::now();
        let (runs, elapsed) = throughput(native.db, &client, native.chain, batch).await?;
        let cpu = cpu::Cpu::now().per_step_since(&before, runs * native.steps);
        let opened = sessions(native.db).await? - sessions_before;
        println!();
        println!("under {version}:");
        println!(
            "| engine under Spin: 10-step workflow | {runs} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} | {cpu} |",
            ms(percentile(&samples, |s| s.seen, 50)),
            ms(percentile(&samples, |s| s.seen, 95)),
            ms(percentile(&samples, |s| s.answered, 50)),
            ms(percentile(&samples, |s| s.recorded, 50)),
            steps_per_second(runs, native.steps, elapsed)
        );
        println!(
            "Postgres sessions opened during that batch: {opened} ({:.1} a run)",
            opened as f64 / runs as f64
        );
        spin_rounds(native, &client, batch).await?;
        match split(native.db).await {
            Ok(applied) => {
                println!();
                println!("Split: {}.", applied.describe());
                spin_rounds(native, &client, batch).await?;
            }
            Err(e) => println!("\nNo split rounds under Spin: {e:#}."),
        }
        Ok(())
    }
    .await;
    // The whole group: `spin up` and its triggers, told to stop, then made to.
    let group = format!("-{}", up.id().context("spin's pid")?);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", "--", &group])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(10), up.wait()).await;
    // Whatever of the group is left (a trigger slow to stop) ends now.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &group])
        .stderr(std::process::Stdio::null())
        .status();
    result
}

/// Rounds of the 10-step chain under Spin beside the native ceiling, as [`side_by_side`].
async fn spin_rounds(native: &Native<'_>, client: &Client, batch: usize) -> Result<()> {
    println!();
    println!("| round | under Spin, steps/s | native ceiling | under Spin / native |");
    println!("|---|---|---|---|");
    for round in 1..=rounds() {
        let mut parts = [0.0f64; 2];
        for turn in 0..2 {
            let part = (turn + round) % 2;
            vacuum_before_part(native.db).await?;
            parts[part] = if part == 0 {
                let (runs, elapsed) = throughput(native.db, client, native.chain, batch).await?;
                steps_per_second(runs, native.steps, elapsed)
            } else {
                engine_ceiling(
                    native.db,
                    native.database_url,
                    native.chain,
                    native.tool,
                    ROUND_PERIOD,
                )
                .await?
                .steps_per_second()
            };
        }
        let [app, ceiling] = parts;
        println!(
            "| {round} | {app:.0} | {ceiling:.0} | {:.0}% |",
            100.0 * app / ceiling
        );
    }
    Ok(())
}

/// One run's latency, each from the moment its `POST` was sent.
struct Sample {
    /// Until a poll (every millisecond) found it succeeded.
    seen: Duration,
    /// Until the `201` was read.
    answered: Duration,
    /// Until its end was written, by the database's clock (the same machine's): the
    /// statement's start, so without the poll's delay and the statement's own time.
    recorded: Duration,
}

/// The `p`th percentile of what `pick` takes from each sample.
fn percentile(samples: &[Sample], pick: fn(&Sample) -> Duration, p: usize) -> Duration {
    let mut values: Vec<Duration> = samples.iter().map(pick).collect();
    values.sort();
    values[values.len() * p / 100]
}

/// Latency: one run at a time, from the POST until the database says succeeded. Sampled on
/// a thread and runtime of its own (with its own connection), so its polls wait for the
/// operating system's scheduler, not behind the host's tasks on the runtime they share.
async fn latency(database_url: &str, client: &Client, wf: &Value) -> Result<Vec<Sample>> {
    let (url, client, wf) = (database_url.to_string(), client.clone(), wf.clone());
    let sampler = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let db = connect(&url).await?;
                let mut samples = Vec::new();
                for _ in 0..LATENCY_SAMPLES {
                    let (started, sent) = (Instant::now(), chrono::Utc::now());
                    let id = client.start(&wf).await?;
                    let answered = started.elapsed();
                    let poll = Duration::from_millis(1);
                    wait_succeeded(
                        &db,
                        std::slice::from_ref(&id),
                        poll,
                        Duration::from_secs(30),
                    )
                    .await?;
                    let seen = started.elapsed();
                    let ended = db
                        .query_one(
                            "select (extract(epoch from finished_at) * 1e6)::int8 from runs
                             where run_id = $1",
                            &[&id.parse::<uuid::Uuid>()?],
                        )
                        .await?;
                    let micros = ended.get::<_, i64>(0) - sent.timestamp_micros();
                    let recorded = Duration::from_micros(micros.max(0) as u64);
                    samples.push(Sample {
                        seen,
                        answered,
                        recorded,
                    });
                }
                Ok(samples)
            })
    });
    tokio::task::spawn_blocking(move || sampler.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the latency sampler panicked"))?
}

/// Throughput: `batch` runs of `wf` started by CLIENTS concurrent clients, until all have
/// succeeded. The runs, and how long they took.
async fn throughput(
    db: &tokio_postgres::Client,
    client: &Client,
    wf: &Value,
    batch: usize,
) -> Result<(usize, Duration)> {
    throughput_over(db, std::slice::from_ref(client), CLIENTS, wf, batch).await
}

/// [`throughput`] with `clients` concurrent clients spread over `targets` (replicas) in
/// turn.
async fn throughput_over(
    db: &tokio_postgres::Client,
    targets: &[Client],
    clients: usize,
    wf: &Value,
    batch: usize,
) -> Result<(usize, Duration)> {
    let statements = Statements::reset().await?;
    let sent = chrono::Utc::now();
    let mut ids = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (client, wf) = (targets[c % targets.len()].clone(), wf.clone());
        let count = batch / clients + usize::from(c < batch % clients);
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..count {
                ids.push(client.start(&wf).await?);
            }
            Ok::<_, anyhow::Error>(ids)
        });
    }
    while let Some(r) = tasks.join_next().await {
        ids.extend(r??);
    }
    let poll = Duration::from_millis(setting("BATCH_POLL_MS", BATCH_POLL_MS));
    wait_succeeded(db, &ids, poll, Duration::from_secs(300)).await?;
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|i| i.parse()).collect::<Result<_, _>>()?;
    let ended = db
        .query_one(
            "select (extract(epoch from max(finished_at)) * 1e6)::int8 from runs
             where run_id = any($1)",
            &[&uuids],
        )
        .await?;
    let micros = ended.get::<_, i64>(0) - sent.timestamp_micros();
    if let Some(statements) = statements {
        statements.report(ids.len(), micros).await?;
    }
    Ok((ids.len(), Duration::from_micros(micros.max(1) as u64)))
}

/// `STATEMENTS=<a superuser's database URL>`: each batch, and the native ceiling's own row
/// (numbered in turn with them), resets `pg_stat_statements` (the server started with it
/// preloaded; `pg_stat_statements.track = all` shows inside the engine's functions too) and
/// writes its costliest statements, planning and running, to
/// `target/bench-statements-<batch>.txt`: calls, ms planning, ms running, µs a call, the
/// statement.
struct Statements(tokio_postgres::Client);

impl Statements {
    async fn reset() -> Result<Option<Statements>> {
        let Ok(url) = std::env::var("STATEMENTS") else {
            return Ok(None);
        };
        let db = connect(&url).await?;
        db.batch_execute("select pg_stat_statements_reset()")
            .await?;
        Ok(Some(Statements(db)))
    }

    async fn report(&self, runs: usize, micros: i64) -> Result<()> {
        static BATCH: AtomicUsize = AtomicUsize::new(0);
        let batch = BATCH.fetch_add(1, Relaxed);
        let rows = self
            .0
            .query(
                "select calls, round(total_plan_time::numeric, 1)::text,
                    round(total_exec_time::numeric, 1)::text,
                    round((mean_exec_time * 1000)::numeric, 1)::text,
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 120)
                 from pg_stat_statements
                 order by total_plan_time + total_exec_time desc limit 40",
                &[],
            )
            .await?;
        let mut out = format!("batch {batch}: {runs} runs in {} ms\n", micros / 1000);
        for r in rows {
            out += &format!(
                "{:>7} {:>9} {:>9} {:>9} {}\n",
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4)
            );
        }
        std::fs::write(format!("target/bench-statements-{batch}.txt"), out)?;
        Ok(())
    }
}

/// What the replicas row counts with.
struct Work<'a> {
    db: &'a tokio_postgres::Client,
    redis_url: &'a str,
    /// Requests the no-op tool has answered.
    tool_calls: &'a AtomicUsize,
}

/// The 10-step batch over two replicas (two apps, each with its own address, executor and
/// Redis subscription, on one database and Redis), clients alternating between them; then
/// what was done: tool calls and step claims against the batch's steps (each once), the
/// nudges published (each reaches every replica), and each replica's trigger handlers run
/// (nudges and cron ticks).
async fn replicas(
    work: &Work<'_>,
    apps: [&RunningApp; 2],
    clients: &[Client],
    wf: &Value,
    batch: usize,
) -> Result<()> {
    let (claims, calls) = (step_claims(work.db).await?, work.tool_calls.load(Relaxed));
    let publishes = redis_publishes(work.redis_url).await?;
    let handled = apps.map(|a| a.inner.activity.handled());
    let (runs, elapsed) = throughput_over(work.db, clients, CLIENTS, wf, batch).await?;
    println!(
        "| engine: 10-step workflow, 2 replicas | {runs} | | | {:.0} |",
        steps_per_second(runs, 10, elapsed)
    );
    let handled: Vec<usize> = apps
        .iter()
        .zip(handled)
        .map(|(a, before)| a.inner.activity.handled() - before)
        .collect();
    println!();
    println!(
        "Replicas: {} steps; {} tool calls, {} step claims; {} nudges published; trigger \
         handlers (nudges and ticks) per replica: {} and {}, in {:.1} s",
        runs * 10,
        work.tool_calls.load(Relaxed) - calls,
        step_claims(work.db).await? - claims,
        redis_publishes(work.redis_url).await? - publishes,
        handled[0],
        handled[1],
        elapsed.as_secs_f64()
    );
    println!();
    Ok(())
}

/// 200 runs of a 5-step diamond (one step, three in parallel, one joining them) started by
/// 16 concurrent clients: the total time, with each step claimed and called once, and the
/// memory of this process (the host runs in it) after the load.
async fn diamond(work: &Work<'_>, client: &Client, project: &Value, tool: &Value) -> Result<()> {
    const RUNS: usize = 200;
    const DIAMOND_CLIENTS: usize = 16;
    let step = |key: &str, deps: &[&str]| json!({"key": key, "kind": "tool", "tool_id": tool, "input": {}, "depends_on": deps});
    let wf = client
        .call(
            "POST",
            "/api/v1/workflows",
            json!({"project_id": project, "name": "diamond", "definition": {"steps": [
                step("a", &[]), step("b", &["a"]), step("c", &["a"]), step("d", &["a"]),
                step("e", &["b", "c", "d"]),
            ]}}),
        )
        .await?["id"]
        .clone();
    let (claimed, called) = (step_claims(work.db).await?, work.tool_calls.load(Relaxed));
    let (runs, elapsed) = throughput_over(
        work.db,
        std::slice::from_ref(client),
        DIAMOND_CLIENTS,
        &wf,
        RUNS,
    )
    .await?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    println!(
        "Diamond: {runs} runs of 5 steps by {DIAMOND_CLIENTS} clients in {:.1} s ({:.0} steps/s); \
         {} step claims, {} tool calls; this process (the host and the bench's clients): \
         resident {}, peak {}",
        elapsed.as_secs_f64(),
        steps_per_second(runs, 5, elapsed),
        step_claims(work.db).await? - claimed,
        work.tool_calls.load(Relaxed) - called,
        field("VmRSS:"),
        field("VmHWM:")
    );
    println!();
    Ok(())
}

/// Steps claimed so far (each claim is a `step.started` event).
async fn step_claims(db: &tokio_postgres::Client) -> Result<i64> {
    let row = db
        .query_one(
            "select count(*) from run_events where kind = 'step.started'",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// PUBLISH commands the Redis server has run so far (`INFO commandstats`).
async fn redis_publishes(redis_url: &str) -> Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = host_port(redis_url)?;
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream.write_all(b"INFO commandstats\r\n").await?;
    // A bulk string: `$<length>\r\n<text>\r\n`.
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    let text = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await??;
        if n == 0 {
            bail!("redis closed the connection");
        }
        reply.extend_from_slice(&chunk[..n]);
        let head = reply.iter().position(|b| *b == b'\n');
        if let Some(head) = head {
            let length: usize = std::str::from_utf8(&reply[1..head])?.trim().parse()?;
            if reply.len() >= head + 1 + length {
                break String::from_utf8_lossy(&reply[head + 1..head + 1 + length]).into_owned();
            }
        }
    };
    // `cmdstat_publish:calls=12,usec=...`; absent before the first publish.
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(Ok(0), str::parse)?)
}

/// The 10-step workflow again with the project exporting traces (to a no-op collector on
/// loopback), beside the rows above; then how fast one exporter drains the outbox when
/// fired back to back (the app's own 2 s ticks run too).
async fn traces(
    app: &RunningApp,
    db: &tokio_postgres::Client,
    client: &Client,
    project: &Value,
    wf: &Value,
    collector: std::net::SocketAddr,
    batch: usize,
) -> Result<()> {
    let project = project.as_str().context("a project")?;
    client
        .call(
            "PATCH",
            &format!("/api/v1/projects/{project}"),
            json!({"trace_endpoint": format!("http://{collector}/v1/traces")}),
        )
        .await?;
    let (runs, elapsed) = throughput(db, client, wf, batch).await?;
    println!(
        "| engine: 10-step workflow, traces exported | {runs} | | | {:.0} |",
        steps_per_second(runs, 10, elapsed)
    );
    // The app's own ticks have sent some already: send them all again, timed.
    db.batch_execute(
        "update trace_exports set status = 'pending', attempts = 0, exported_at = null,
            next_attempt_at = now() - interval '1 second'",
    )
    .await?;
    let started = Instant::now();
    loop {
        app.inner
            .handle_cron("exporter", chrono::Utc::now().timestamp() as u64)
            .await?;
        let row = db
            .query_one(
                "select count(*) filter (where status = 'pending'),
                        count(*) filter (where status = 'exported'),
                        count(*) filter (where status = 'failed')
                 from trace_exports",
                &[],
            )
            .await?;
        let (pending, exported, failed): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if failed > 0 {
            bail!("{failed} trace exports failed");
        }
        if pending == 0 {
            let secs = started.elapsed().as_secs_f64();
            println!();
            println!(
                "Trace export: {exported} runs (11 spans each) drained in {:.0} ms: {:.0} runs/s, {:.0} spans/s",
                secs * 1000.0,
                exported as f64 / secs,
                (exported * 11) as f64 / secs
            );
            // The rounds after this measure the plain chain, as the ceilings run it.
            client
                .call(
                    "PATCH",
                    &format!("/api/v1/projects/{project}"),
                    json!({"trace_endpoint": null}),
                )
                .await?;
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(120) {
            let error: Option<String> = db
                .query_one("select max(last_error) from trace_exports", &[])
                .await?
                .get(0);
            bail!("{pending} trace exports still pending after 120 s: {error:?}");
        }
    }
}

/// Deliveries queued at once for the outbox's drain rate.
const DRAIN: i64 = 2000;

/// Webhook delivery with the notifier ticking every second as deployed: the latency from
/// each run's end (its `run.succeeded` event, written in the transaction that ends it) to
/// the receiver, p50 and p95; then the outbox's drain rate, [`DRAIN`] deliveries queued at
/// once until all are delivered.
async fn webhooks(
    db: &tokio_postgres::Client,
    client: &Client,
    project: &Value,
    wf: &Value,
    batch: usize,
) -> Result<()> {
    let (addr, arrivals) = receiver().await?;
    let hook = client
        .call(
            "POST",
            "/api/v1/webhooks",
            json!({"project_id": project, "url": format!("http://{addr}/in"), "event_types": ["run.succeeded"]}),
        )
        .await?;
    let hook_id = hook["id"].as_str().context("a webhook id")?.to_string();
    let (runs, _) = throughput(db, client, wf, batch).await?;
    let limit = Instant::now() + Duration::from_secs(60);
    while arrivals.lock().unwrap().len() < runs {
        if Instant::now() > limit {
            bail!(
                "{} of {runs} run.succeeded events arrived",
                arrivals.lock().unwrap().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let arrived: Vec<(String, f64)> = arrivals.lock().unwrap().drain(..).collect();
    let (p50, p95) = delivery_latency(db, &arrived).await?;
    println!();
    println!(
        "Webhook delivery: {} run.succeeded events of runs started by {CLIENTS} clients, run end to receiver: p50 {p50:.0} ms, p95 {p95:.0} ms",
        arrived.len(),
    );
    // One run at a time: the delivery's own latency, without a queue of others.
    for _ in 0..LATENCY_SAMPLES {
        let run = client.start(wf).await?;
        let limit = Instant::now() + Duration::from_secs(30);
        while !arrivals.lock().unwrap().iter().any(|(r, _)| *r == run) {
            if Instant::now() > limit {
                bail!("no run.succeeded for {run}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let arrived: Vec<(String, f64)> = arrivals.lock().unwrap().drain(..).collect();
    let (p50, p95) = delivery_latency(db, &arrived).await?;
    println!(
        "Webhook delivery: {} run.succeeded events, one run at a time, run end to receiver: p50 {p50:.0} ms, p95 {p95:.0} ms",
        arrived.len(),
    );
    db.execute(
        "insert into webhook_deliveries (delivery_id, webhook_id, project_id, event_type, payload, next_attempt_at)
         select sparkops_uuid_v7(), d.webhook_id, d.project_id, d.event_type, d.payload, now()
         from (select * from webhook_deliveries where webhook_id = $1::text::uuid limit 1) d, generate_series(1, $2::bigint)",
        &[&hook_id, &DRAIN],
    )
    .await?;
    let started = Instant::now();
    let pending = "select count(*) from webhook_deliveries
                   where webhook_id = $1::text::uuid and status = 'pending'";
    let poll = (Duration::from_millis(20), Duration::from_secs(120));
    until_none(
        db,
        pending,
        &hook_id,
        poll,
        "webhook deliveries still pending",
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "Webhook outbox: {DRAIN} deliveries drained in {:.0} ms: {:.0} deliveries/s (signed, one connection each)",
        secs * 1000.0,
        DRAIN as f64 / secs
    );
    client
        .call(
            "PATCH",
            &format!("/api/v1/webhooks/{hook_id}"),
            json!({"enabled": false}),
        )
        .await?;
    Ok(())
}

/// p50 and p95, in ms, of each event's arrival after its run's `finished_at`.
async fn delivery_latency(
    db: &tokio_postgres::Client,
    arrived: &[(String, f64)],
) -> Result<(f64, f64)> {
    let mut latencies = Vec::new();
    for (run_id, at) in arrived {
        let row = db
            .query_one(
                "select extract(epoch from finished_at)::float8 from runs where run_id = $1::text::uuid",
                &[run_id],
            )
            .await?;
        latencies.push((at - row.get::<_, f64>(0)) * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Ok((pct(0.5), pct(0.95)))
}

/// A webhook receiver on loopback: answers 204 and records each event's run and arrival
/// (Unix seconds).
async fn receiver() -> Result<(
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<(String, f64)>>>,
)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = arrivals.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let at = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or_default();
                        if let Ok(event) = serde_json::from_slice::<Value>(&body)
                            && let Some(run) = event["data"]["run_id"].as_str()
                        {
                            log.lock().unwrap().push((run.to_string(), at));
                        }
                        let mut res = http::Response::new(Full::new(Bytes::new()));
                        *res.status_mut() = http::StatusCode::NO_CONTENT;
                        Ok::<_, hyper::Error>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, arrivals))
}

/// `/metrics/summary` and `/metrics/steps` over a million generated steps (100,000 runs of
/// ten steps over 30 days, statuses, durations, tokens, costs and four models varied), one
/// request at a time: p50 and p95 of 20 requests per query.
async fn metrics(
    db: &tokio_postgres::Client,
    client: &Client,
    project: &Value,
    workflow: &Value,
) -> Result<()> {
    let (project, workflow) = (
        project.as_str().context("a project")?,
        workflow.as_str().context("a workflow")?,
    );
    let started = Instant::now();
    db.batch_execute(&format!(
        "insert into runs (run_id, project_id, workflow_id, workflow_version, input, status, tokens_in, tokens_out,
                           cost_usd, started_at, finished_at, created_at)
         select gen_random_uuid(), '{project}', '{workflow}', 1, '{{}}'::jsonb,
                (array['succeeded', 'succeeded', 'succeeded', 'failed', 'timed_out'])[1 + n % 5],
                1000, 500, 0.01, t, t + (n % 997) * interval '1 millisecond', t
         from generate_series(1, 100000) n, lateral (select now() - (n % 30) * interval '1 day' - n * interval '1 second' as t) x;
         insert into run_steps (run_id, step_key, kind, status, attempt, model, tokens_in, tokens_out, cost_usd, duration_ms)
         select r.run_id, 's' || i, case when i % 3 = 0 then 'tool' else 'agent' end,
                (array['succeeded', 'succeeded', 'failed'])[1 + (i + length(r.run_id::text)) % 3], 1,
                case when i % 3 = 0 then null else (array['openai/gpt-4o', 'openai/gpt-4o-mini', 'anthropic/claude-3-5-haiku-latest', 'local/llama'])[1 + i % 4] end,
                100, 50, 0.001, (i * 37) % 5000
         from runs r, generate_series(0, 9) i where r.project_id = '{project}' and r.input = '{{}}'::jsonb
           and not exists (select 1 from run_steps s where s.run_id = r.run_id);
         analyze runs; analyze run_steps;"
    ))
    .await?;
    let steps: i64 = db
        .query_one("select count(*) from run_steps", &[])
        .await?
        .get(0);
    println!();
    println!(
        "Metrics over {steps} steps in 100,000 runs (generated in {:.0} s), 20 requests each, one at a time:",
        started.elapsed().as_secs_f64()
    );
    println!("| query | p50 | p95 |");
    println!("|---|---|---|");
    for query in [
        "summary",
        "summary&group_by=day",
        "summary&group_by=model",
        "summary&group_by=workflow",
        "steps",
    ] {
        let (path, extra) = query.split_once('&').unwrap_or((query, ""));
        let url = format!("/api/v1/metrics/{path}?project_id={project}&{extra}");
        let mut samples = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            client.get(&url).await?;
            samples.push(t.elapsed());
        }
        samples.sort();
        println!(
            "| GET /metrics/{query} | {:.1} ms | {:.1} ms |",
            ms(samples[10]),
            ms(samples[19])
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Waits until every run of `ids` has succeeded, asking every `poll`.
async fn wait_succeeded(
    db: &tokio_postgres::Client,
    ids: &[String],
    poll: Duration,
    limit: Duration,
) -> Result<()> {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|i| i.parse()).collect::<Result<_, _>>()?;
    let started = Instant::now();
    loop {
        let row = db
            .query_one(
                "select count(*) filter (where status = 'succeeded'),
                        count(*) filter (where status in ('failed', 'timed_out', 'cancelled'))
                 from runs where run_id = any($1)",
                &[&ids],
            )
            .await?;
        let (done, bad): (i64, i64) = (row.get(0), row.get(1));
        if bad > 0 {
            bail!("{bad} runs did not succeed");
        }
        if done as usize == ids.len() {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("{done} of {} runs succeeded within {limit:?}", ids.len());
        }
        tokio::time::sleep(poll).await;
    }
}

/// Loads `pgbench` with the statements of one chained step as the executor runs them: its
/// read (the policies in scope with the tool), then the one statement that records its result,
/// claims the next step and logs both events (the run as the executor carries it along the
/// chain is not read again). Over 200 runs of two steps; each transaction records the
/// first step and claims the second again (their conditions admit the repeat, so every
/// transaction does the same work). The script's path, for [`pgbench`].
async fn pgbench_script(
    db: &tokio_postgres::Client,
    state: &std::path::Path,
    tool: &Value,
) -> Result<PathBuf> {
    // Run `n` is `RUN_ID` with `n` in its last twelve digits, so no statement looks it up.
    const RUN_ID: &str = "('00000000-0000-0000-0000-' || lpad(:n::text, 12, '0'))::uuid";
    let run_ids = RUN_ID.replace(":n", "n");
    db.batch_execute(&format!(
        "with w as (select workflow_id, project_id from workflows where name = '10 steps')
         insert into runs (run_id, project_id, workflow_id, workflow_version, input, status)
         select {run_ids}, w.project_id, w.workflow_id, 1, '{{}}'::jsonb, 'running'
         from w, generate_series(1, 200) n;
         insert into run_steps (run_id, step_key, kind, status, attempt, lease_id)
         select {run_ids}, 's0', 'tool', 'running', 1, gen_random_uuid() from generate_series(1, 200) n;
         insert into run_steps (run_id, step_key, kind, status)
         select {run_ids}, 's1', 'tool', 'pending' from generate_series(1, 200) n;"
    ))
    .await?;
    let tool_id = tool.as_str().context("a tool id")?;
    let ids = db
        .query_one(
            "select project_id::text, workflow_id::text from workflows where name = '10 steps'",
            &[],
        )
        .await?;
    let (project_id, workflow_id): (String, String) = (ids.get(0), ids.get(1));
    let events = r#"[{"kind": "step.succeeded", "step": "s0", "data": {"attempt": 1, "duration_ms": 1}, "told": null},
        {"kind": "step.started", "step": "s1", "data": {"attempt": 1}, "told": null}]"#;
    let planned = r#"[{"key": "s1", "status": "running", "deadline_s": 330, "lease_s": 15}]"#;
    let script = format!(
        r#"\set n random(1, 200)
select p.*, a.* from (select 1) one left join lateral (select policy_id::text, name, rules, scope_workflow_id is not null from policies where project_id = '{project_id}' and enabled and deleted_at is null and (scope_workflow_id is null or scope_workflow_id = '{workflow_id}') and (scope_agent_id is null or scope_agent_id = null::text::uuid) order by policy_id) p on true left join lateral (select true, x.* from (select method, url, headers, timeout_ms, input_schema, output_schema from tools where tool_id = '{tool_id}' and project_id = '{project_id}' and deleted_at is null) x) a on true order by p.policy_id;
with r as (update runs set event_seq = event_seq + jsonb_array_length('{events}'), status = coalesce(null::text, status), started_at = started_at, updated_at = updated_at where run_id = {RUN_ID} and status = 'running' and event_seq >= 0::bigint returning project_id, run_id, workflow_id, workflow_version, schedule_id, status, error, tokens_in, tokens_out, cost_usd, event_seq - jsonb_array_length('{events}') as base), rec as (update run_steps s set status = 'succeeded', input = '{{}}', output = '{{}}', error = null, duration_ms = 1, lease_id = null, lease_expires_at = null, updated_at = now(), finished_at = case when 'succeeded' = 'retrying' then null else now() end, next_attempt_at = case when 'succeeded' = 'retrying' then now() + make_interval(secs => 0::float8 / 1000) else null end from r where s.run_id = r.run_id and s.step_key = 's0' and s.status in ('running', 'succeeded') returning 1), changed as (update run_steps s set status = coalesce(p.status, s.status), error = case when p.status = 'skipped' then p.error else s.error end, attempt = s.attempt + case when p.status in ('waiting', 'running') then 1 else 0 end, lease_id = case when p.status = 'running' then gen_random_uuid() else s.lease_id end, deadline_at = coalesce(now() + make_interval(secs => p.deadline_s), s.deadline_at), lease_expires_at = coalesce(now() + make_interval(secs => p.lease_s), s.lease_expires_at), started_at = case when p.status in ('waiting', 'running') then coalesce(s.started_at, now()) else s.started_at end, updated_at = now() from jsonb_to_recordset('{planned}') as p(key text, status text, error jsonb, deadline_s float8, lease_s float8), r where s.run_id = r.run_id and s.step_key = p.key and s.status in ('pending', 'ready', 'running') returning s.step_key, s.attempt, s.lease_id::text), ev as (select e.n, e.value->>'kind' as kind, e.value->>'step' as step, e.value->'data' as data, e.value->>'told' as told from jsonb_array_elements('{events}') with ordinality as e(value, n)), logged as (insert into run_events (run_id, seq, kind, step_key, data) select r.run_id, r.base + ev.n, ev.kind, ev.step, ev.data from r, ev) select (select coalesce(jsonb_agg(jsonb_build_array(step_key, attempt, lease_id)), '[]') from changed where lease_id is not null), 1 / case when true and (select count(*) from rec) = 1 and (select count(*) from changed) = 1 then 1 else 0 end from r;
"#,
        events = events.replace('\n', " "),
    );
    let path: PathBuf = state.join("step.sql");
    std::fs::write(&path, script)?;
    Ok(path)
}

/// `pgbench` running `script` with CLIENTS clients for `period`: its transactions per second
/// (the Postgres ceiling for steps per second) and its transactions.
fn pgbench(database_url: &str, script: &std::path::Path, period: Duration) -> Result<(f64, usize)> {
    let out = std::process::Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &CLIENTS.to_string(),
            "-j",
            "2",
            "-T",
            &period.as_secs().to_string(),
            "-f",
        ])
        .arg(script)
        .arg(database_url)
        .output()
        .context("running pgbench (apt-get install postgresql-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `tps = 5104.2 (without initial connection time)`, and
    // `number of transactions actually processed: 51074`.
    let number = |prefix: &str, word: usize| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(word))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let said = || {
        format!(
            "pgbench said:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let tps = number("tps = ", 2).with_context(said)?;
    let transactions = number("number of transactions actually processed", 5).with_context(said)?;
    Ok((tps, transactions as usize))
}

/// The `application_name` of the native ceiling's connections.
const CEILING_APPLICATION: &str = "sparkops-ceiling";

/// Waits until `count` (one text parameter, `arg`) answers 0, asking every `poll.0`; fails
/// after `poll.1`, saying how many `what` are left.
async fn until_none(
    db: &tokio_postgres::Client,
    count: &str,
    arg: &str,
    poll: (Duration, Duration),
    what: &str,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let left: i64 = db.query_one(count, &[&arg]).await?.get(0);
        if left == 0 {
            return Ok(());
        }
        if started.elapsed() > poll.1 {
            bail!("{left} {what} after {:?}", poll.1);
        }
        tokio::time::sleep(poll.0).await;
    }
}

/// CPU so far, once the backends of `application` (a ceiling's clients, just closed) are
/// gone. An ended backend's time moves to the postmaster's when the postmaster reaps it, and
/// `/proc` is read in pid order, postmaster first: a reap between the two reads would count
/// that time nowhere (it once showed a ceiling's Postgres CPU as 0).
async fn cpu_after(db: &tokio_postgres::Client, application: &str) -> Result<cpu::Cpu> {
    let open = "select count(*) from pg_stat_activity where application_name = $1";
    let poll = (Duration::from_millis(10), Duration::from_secs(10));
    let what = format!("connections of {application} still open");
    until_none(db, open, application, poll, &what).await?;
    // Gone from the view, a backend may still be exiting: a moment for the reap.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(cpu::Cpu::now())
}

/// [`ceiling::run_for`] for `workflow` of `tool`, CLIENTS connections for `period` (as
/// pgbench).
async fn engine_ceiling(
    db: &tokio_postgres::Client,
    database_url: &str,
    workflow: &Value,
    tool: &Value,
    period: Duration,
) -> Result<ceiling::Ran> {
    let workflow_id = workflow.as_str().context("a workflow id")?.to_string();
    let owner = db
        .query_one(
            "select p.owner_id::text from workflows w join projects p using (project_id)
             where w.workflow_id = $1::text::uuid",
            &[&workflow_id],
        )
        .await?;
    let user_id: String = owner.get(0);
    let owner_id = user_id.clone();
    let began: String = db.query_one("select now()::text", &[]).await?.get(0);
    let tool_id = tool.as_str().context("a tool id")?.to_string();
    let mut url = url::Url::parse(database_url)?;
    url.query_pairs_mut()
        .append_pair("application_name", CEILING_APPLICATION);
    let database_url = url.to_string();
    let ran = tokio::task::spawn_blocking(move || {
        let target = ceiling::Target {
            database_url: &database_url,
            workflow_id: &workflow_id,
            tool_id: &tool_id,
            user_id: &user_id,
        };
        ceiling::run_for(&target, CLIENTS, period)
    })
    .await??;
    // The ceiling's runs (those of its user since it began) ended as the app's do.
    let ended = db
        .query_one(
            "select count(*) filter (where status = 'succeeded'), count(*) from runs
             where created_by = $1::text::uuid and created_at >= $2::text::timestamptz",
            &[&owner_id, &began],
        )
        .await?;
    let (succeeded, all): (i64, i64) = (ended.get(0), ended.get(1));
    if succeeded != all || all as usize != ran.runs {
        bail!(
            "{succeeded} of {all} runs succeeded, of {} started",
            ran.runs
        );
    }
    Ok(ran)
}

/// A tool (and an OTLP collector) that reads the request and answers `{}`, on loopback;
/// it counts the requests it answers.
async fn noop_tool() -> Result<(std::net::SocketAddr, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let count = count.clone();
                    async move {
                        req.into_body().collect().await?;
                        count.fetch_add(1, Relaxed);
                        let mut res = http::Response::new(Full::new(Bytes::from_static(b"{}")));
                        res.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, hyper::Error>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, answered))
}

#[derive(Clone)]
struct Client {
    base: String,
    token: String,
}

impl Client {
    async fn get(&self, path: &str) -> Result<Value> {
        self.call("GET", path, Value::Null).await
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Result<Value> {
        let uri: http::Uri = format!("{}{path}", self.base).parse()?;
        let authority = uri.authority().context("an authority")?.to_string();
        let stream = tokio::net::TcpStream::connect(&authority).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &authority)
            .header("content-type", "application/json");
        if !self.token.is_empty() {
            req = req.header("authorization", format!("Bearer {}", self.token));
        }
        let res = sender
            .send_request(req.body(Full::new(Bytes::from(body.to_string())))?)
            .await?;
        let status = res.status();
        let bytes = res.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "{method} {path}: {status} {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Starts a run; its id.
    async fn start(&self, workflow: &Value) -> Result<String> {
        let run = self
            .call(
                "POST",
                "/api/v1/runs",
                json!({"workflow_id": workflow, "input": {}}),
            )
            .await?;
        Ok(run["id"].as_str().context("a run id")?.to_string())
    }
}
