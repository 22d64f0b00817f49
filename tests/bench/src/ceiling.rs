//! The Postgres ceiling for the engine's own statements: whole runs driven through the
//! engine's functions in the order `POST /runs` and the executor call them, on native
//! connections, with no wasm, HTTP, tool or Redis in between. What the database allows for
//! exactly the statements the app sends, fresh rows and the run's start and end included.
//! One difference: the start answers three of the run's columns where `POST /runs` answers
//! all it shows (read from the row the same statement inserts).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use sparkops_core::db;
use sparkops_core::error::ApiError;
use sparkops_core::workflow::RetryPolicy;
use sparkops_engine::native::Pg;
use sparkops_engine::policies::ToolScope;
use sparkops_engine::step::{Attempt, Lease, Owner, Recorded, Unlocked};
use sparkops_engine::{NewRun, Origin, policies};

/// What the ceiling runs: the workflow, its tool, and the user who starts the runs.
pub struct Target<'a> {
    pub database_url: &'a str,
    pub workflow_id: &'a str,
    pub tool_id: &'a str,
    pub user_id: &'a str,
}

/// What [`run_for`] came to.
pub struct Ran {
    pub runs: usize,
    pub steps: usize,
    pub elapsed: Duration,
}

impl Ran {
    pub fn steps_per_second(&self) -> f64 {
        self.steps as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs of `target`'s workflow, one after another on each of `clients` connections, for
/// `period`.
pub fn run_for(target: &Target<'_>, clients: usize, period: Duration) -> Result<Ran> {
    let started = Instant::now();
    let counts = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| -> Result<(usize, usize)> {
                    let db = Pg::connect(target.database_url)?;
                    let (mut runs, mut steps) = (0, 0);
                    while started.elapsed() < period {
                        steps += run(&db, target)?;
                        runs += 1;
                    }
                    Ok((runs, steps))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a ceiling client panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let elapsed = started.elapsed();
    let (runs, steps) = counts
        .iter()
        .fold((0, 0), |(r, s), (runs, steps)| (r + runs, s + steps));
    Ok(Ran {
        runs,
        steps,
        elapsed,
    })
}

/// One run of the target's workflow of tool steps, each answered `{}` at once: the steps
/// it ran.
fn run(db: &Pg, target: &Target<'_>) -> Result<usize> {
    // `POST /runs`: the workflow with the caller's membership, then the start.
    let found =
        sparkops_engine::start::workflow_for(db, target.workflow_id, None, Some(target.user_id))
            .map_err(failed)?
            .context("the workflow")?;
    let workflow = found.workflow.map_err(failed)?;
    let now = chrono::Utc::now();
    let nanos = now.timestamp_nanos_opt().context("a time")? as u64;
    let run_id =
        sparkops_core::ids::uuid_v7(nanos, uuid::Uuid::new_v4().as_bytes()[..8].try_into()?);
    let input = json!({});
    let run = NewRun {
        run_id: &run_id,
        workflow: &workflow,
        input: &input,
        origin: Origin::Api {
            user_id: target.user_id,
        },
        now,
        max_cost_usd: None,
    };
    let started = db::transaction(db, |tx| {
        sparkops_engine::start_advanced(tx, &run, Some("r.run_id::text, r.status, queued.steps"))
    })
    .map_err(|e| failed(e.into()))?;
    let Some(first) = started.claimed.into_iter().next() else {
        bail!("the start claimed no step");
    };
    // The executor: the lease and the run in one read, then each step of the chain.
    let (leased, mut known, mut scope) =
        sparkops_engine::step::leased_known(db, &lease(&run_id, &first))
            .map_err(failed)?
            .context("the lease")?;
    let retry = RetryPolicy::default();
    let owner = Owner {
        project_id: &leased.project_id,
        workflow_id: &leased.workflow_id,
    };
    // Each step's policies and tool come with the read or write that claimed it.
    let (mut next, mut steps) = (Some(first), 0);
    while let Some(claim) = next.take() {
        let ToolScope { policies, tool } = match scope.take() {
            Some(scope) => scope,
            None => policies::tool_scope(db, owner.project_id, owner.workflow_id, target.tool_id)
                .map_err(failed)?,
        };
        let started = policies::started_steps(db, &policies, &run_id).map_err(failed)?;
        if tool.is_none() || policies::check_steps(&policies, started).is_err() {
            bail!("the step would not run");
        }
        let attempt = Attempt {
            lease: lease(&run_id, &claim),
            attempt: claim.attempt,
            input: json!({}),
            result: Ok(json!({})),
            duration_ms: 1,
            retry: &retry,
            jitter: 0.5,
        };
        match sparkops_engine::step::record_and_advance_known(db, &attempt, known, owner)
            .map_err(failed)?
        {
            Unlocked::Written {
                recorded: Recorded::Succeeded,
                claimed,
                after,
                next: read,
            } => {
                next = claimed.into_iter().next();
                scope = read.map(|r| r.scope);
                known = after;
            }
            other => bail!("a chain's result was not written in one statement: {other:?}"),
        }
        steps += 1;
    }
    // Every step ran, so the last result ended the run (as the app's chain does).
    if steps != workflow.definition.steps.len() {
        bail!("{steps} of {} steps ran", workflow.definition.steps.len());
    }
    Ok(steps)
}

/// An engine error as the bench reports it.
fn failed(e: ApiError) -> anyhow::Error {
    anyhow::anyhow!("{e:?}")
}

/// The lease `claim` holds on a step of `run_id`.
fn lease<'a>(run_id: &'a str, claim: &'a sparkops_engine::Claim) -> Lease<'a> {
    Lease {
        run_id,
        step_key: &claim.step_key,
        lease_id: &claim.lease_id,
    }
}
