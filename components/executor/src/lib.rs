//! The executor (DESIGN.md section 5): a route of the app's own endpoint that runs a claimed
//! step for a signed dispatch ([`sparkops_core::dispatch`]) and nothing else. It checks the
//! signature and the step's lease, answers `202` at once, and goes on to run the step
//! (Spin keeps a guest running after it has set its response), so steps of many runs
//! proceed in parallel instances. While the step runs, its waits renew the lease
//! ([`sparkops_platform::heartbeat`]). The result, with an event, is written in one transaction
//! that only lands while the lease still holds: a step cancelled or taken back meanwhile
//! keeps its newer state; the same transaction advances the run. Of the steps it made
//! ready, the first runs next in this same instance (a chain costs no hand-off) and the
//! others are dispatched from here. A tool step's policies and tool come with the lease
//! read (the first step) or the write that claimed it (the next ones in the chain), so it
//! starts its call without a read of its own.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use std::time::Instant;

use futures::SinkExt;
use serde_json::{Value, json};
use sparkops_core::dispatch;
use sparkops_core::error::ApiError;
use sparkops_core::run::RunScope;
use sparkops_core::template;
use sparkops_core::workflow::{Step, StepKind};
use sparkops_platform::engine::policies::{StepTool, ToolScope};
use sparkops_platform::engine::step::{Failure, Lease, Leased, Owner, Recorded, Unlocked};
use sparkops_platform::engine::store::Known;
use sparkops_platform::engine::{self, Claim, ErrorKind, store};
use sparkops_platform::tool_call;
use sparkops_platform::work::Work;
use sparkops_platform::{agent, policies};
use sparkops_platform::{heartbeat, variable};
use spin_sdk::http::{Fields, IncomingRequest, Method, OutgoingResponse, ResponseOutparam};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest, out: ResponseOutparam) {
    let request_id = sparkops_platform::http::request_id(None);
    let req = match sparkops_platform::http::HttpRequest::read(req).await {
        Ok(r) => r,
        Err(e) => return refuse(out, &e, &request_id).await,
    };
    if req.path != dispatch::PATH {
        let e = ApiError::NotFound("no such route".into());
        return refuse(out, &e, &request_id).await;
    }
    if req.method != Method::Post {
        let e = ApiError::MethodNotAllowed {
            allow: vec!["POST"],
        };
        return refuse(out, &e, &request_id).await;
    }
    let key = match variable("jwt_secret") {
        Ok(secret) => dispatch::key(&secret),
        Err(e) => return refuse(out, &ApiError::Internal(e), &request_id).await,
    };
    let now = chrono::Utc::now().timestamp();
    if let Err(refusal) = dispatch::verify(&key, req.header(dispatch::HEADER), &req.body, now) {
        let e = ApiError::Unauthenticated(format!("not a signed dispatch ({refusal:?})"));
        return refuse(out, &e, &request_id).await;
    }
    let claim: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let (Some(run_id), Some(step), Some(lease)) = (
        claim["run_id"].as_str(),
        claim["step_key"].as_str(),
        claim["lease_id"].as_str(),
    ) else {
        let e = ApiError::BadRequest("run_id, step_key and lease_id are required".into());
        return refuse(out, &e, &request_id).await;
    };
    let mut ctx = Work::new(format!("step-{run_id}-{step}"));
    let lease = Lease {
        run_id,
        step_key: step,
        lease_id: lease,
    };
    // The lease, the run as the step will start from and (a tool step) its policies and
    // tool, in one read.
    let held = ctx
        .db()
        .and_then(|db| engine::step::leased_known(db, &lease));
    let (
        Leased {
            attempt,
            project_id,
            workflow_id,
        },
        known,
        mut scope,
    ) = match held {
        Ok(Some(held)) => held,
        Ok(None) => {
            let e = ApiError::Conflict("the lease is not held".into());
            return refuse(out, &e, &request_id).await;
        }
        Err(e) => {
            log("checking a lease", run_id, step, &format!("{e:?}"));
            return refuse(out, &e, &request_id).await;
        }
    };
    let accepted = json!({"accepted": true}).to_string();
    let headers = vec![("content-type", "application/json".to_string())];
    respond(out, 202, headers, accepted, &request_id).await;
    // The first step each result makes ready runs next here, in this instance: a chain
    // moves on without a dispatch, a fresh instance or a lease check (the claim is this
    // instance's own). The others go to executors.
    let run = RunOf {
        run_id,
        project_id: &project_id,
        workflow_id: &workflow_id,
    };
    let mut next = Some(Claim {
        step_key: step.into(),
        lease_id: lease.lease_id.into(),
        attempt,
    });
    // The run as this instance last read or wrote it, carried along the chain, and the
    // tool scope of the step that runs next, read with the lease or the claim.
    let mut known = Some(known);
    while let Some(claim) = next.take() {
        ctx.request_id = format!("step-{run_id}-{}", claim.step_key);
        ctx.now = chrono::Utc::now();
        let settled = run_step(&mut ctx, &run, &claim, known.take(), scope.take());
        let mut claimed = settled.claimed.into_iter();
        next = claimed.next();
        scope = settled.scope;
        known = settled.after;
        ctx.dispatch(run_id, &claimed.collect::<Vec<_>>());
    }
}

/// What recording a step came to, for the chain: the steps claimed (the first runs next
/// here), the run as written (when nothing else had moved it), and the first step's tool
/// scope, when it calls a tool, read with the claims.
#[derive(Default)]
struct Settled {
    claimed: Vec<Claim>,
    after: Option<Known>,
    scope: Option<ToolScope>,
}

/// The run a step belongs to.
struct RunOf<'a> {
    run_id: &'a str,
    project_id: &'a str,
    workflow_id: &'a str,
}

/// Runs the claimed step and records its result (`known`: the run as this instance wrote it
/// for the step before, if it still stands; `scope`: the step's tool scope, when the lease
/// read or the write that claimed it read it).
fn run_step(
    ctx: &mut Work,
    run: &RunOf<'_>,
    claim: &Claim,
    known: Option<Known>,
    scope: Option<ToolScope>,
) -> Settled {
    let (run_id, step) = (run.run_id, claim.step_key.as_str());
    let lease = Lease {
        run_id,
        step_key: step,
        lease_id: &claim.lease_id,
    };
    // From here the step's waits renew its lease, so it may run as long as its timeout.
    heartbeat::hold(&lease);
    let started = Instant::now();
    let known = match known {
        Some(known) => Ok(known),
        None => ctx.db().and_then(|db| store::known(db, run_id)),
    };
    let (done, known) = match known {
        Ok(known) => (execute(ctx, run, step, &known.snapshot, scope), Some(known)),
        Err(e) => (Err(e), None),
    };
    let done = done.unwrap_or_else(|e| {
        log("running a step", run_id, step, &format!("{e:?}"));
        Done {
            input: Value::Null,
            result: Err(Failure::new(
                ErrorKind::Internal,
                "the step could not be run",
            )),
            retry: Default::default(),
        }
    });
    heartbeat::release();
    let elapsed = started.elapsed().as_millis() as i64;
    let error_kind = done.result.as_ref().err().map(|f| f.kind.as_str());
    // Contents (prompts, answers, tool data) are logged only when the operator opts in.
    let payloads = sparkops_platform::settings()
        .log_step_payloads
        .then(|| (done.input.clone(), done.result.as_ref().ok().cloned()));
    let attempt = engine::step::Attempt {
        lease,
        attempt: claim.attempt,
        input: done.input,
        result: done.result,
        duration_ms: elapsed,
        retry: &done.retry,
        jitter: sparkops_platform::random_array::<1>()[0] as f64 / 255.0,
    };
    let recording = Instant::now();
    let owner = Owner {
        project_id: run.project_id,
        workflow_id: run.workflow_id,
    };
    match settle(ctx, &attempt, known, owner) {
        // One line per step attempt: ids, outcome and timing (the step's, and how long its
        // result took to record with the run's advance).
        Ok((recorded, settled)) => {
            let record_ms = recording.elapsed().as_secs_f64() * 1e3;
            let mut line = json!({"level": "info", "msg": "step", "request_id": ctx.request_id,
                "project_id": run.project_id, "run_id": run_id, "step": step,
                "attempt": claim.attempt, "status": recorded.as_str(), "error_kind": error_kind,
                "duration_ms": elapsed, "record_ms": (record_ms * 100.0).round() / 100.0});
            if let Some((input, output)) = payloads {
                line["input"] = input;
                line["output"] = output.unwrap_or_default();
            }
            sparkops_platform::log_line(&line);
            settled
        }
        Err(e) => {
            log("recording a step", run_id, step, &format!("{e:?}"));
            sparkops_platform::nudge::run(run_id);
            Settled::default()
        }
    }
}

/// Tries of the one statement (the run read again after each that finds it moved) before
/// the result is recorded under the run's lock.
const UNLOCKED_TRIES: usize = 3;

/// Waits before each new try of a result's transaction: long enough together (4.2 s) for a
/// database that restarts or fails over to come back.
const SETTLE_BACKOFF_MS: [u64; 3] = [200, 1_000, 3_000];

/// Records the attempt and advances the run; the steps that became ready, claimed, so the
/// next step starts without a hop through the nudge channel. From the run as this instance
/// knows it, that is one statement ([`engine::step::record_and_advance_known`]), and the
/// run as written is carried on; when the run moved meanwhile (another branch's result
/// landed), the run is read again and the statement tried again. After a few tries, or for
/// a result only the lock may write, it is one transaction under the run's lock. A failed
/// transaction (the database restarting, a lost connection) is tried again on a fresh
/// connection; when it keeps failing, the result alone is recorded and the run nudged, so
/// a result is never lost to the decision after it.
fn settle(
    ctx: &mut Work,
    a: &engine::step::Attempt<'_>,
    known: Option<Known>,
    owner: Owner<'_>,
) -> Result<(Recorded, Settled), ApiError> {
    let run_id = a.lease.run_id;
    let mut known = known;
    for _ in 0..UNLOCKED_TRIES {
        let Some(read) = known.take() else { break };
        match ctx
            .db()
            .and_then(|db| engine::step::record_and_advance_known(db, a, read, owner))
        {
            Ok(Unlocked::Written {
                recorded,
                claimed,
                after,
                next,
            }) => {
                let (after, scope) = (Some(after), next.map(|n| n.scope));
                return Ok((
                    recorded,
                    Settled {
                        claimed,
                        after,
                        scope,
                    },
                ));
            }
            // Another branch's result landed first: read the run again.
            Ok(Unlocked::Moved) => match ctx.db().and_then(|db| store::known(db, run_id)) {
                Ok(read) => known = Some(read),
                Err(e) => {
                    log(
                        "reading a moved run again (will record under the run's lock)",
                        run_id,
                        a.lease.step_key,
                        &format!("{e:?}"),
                    );
                    break;
                }
            },
            Ok(Unlocked::UnderLock) => break,
            // All or nothing: the transaction below finds what is left to do.
            Err(e) => {
                log(
                    "recording a step in one statement (will record under the run's lock)",
                    run_id,
                    a.lease.step_key,
                    &format!("{e:?}"),
                );
                break;
            }
        }
    }
    let together =
        |ctx: &mut Work| ctx.transaction(|tx, _| engine::step::record_and_advance(tx, a));
    let mut outcome = together(ctx);
    for wait_ms in SETTLE_BACKOFF_MS {
        let Err(e) = &outcome else { break };
        log(
            "recording a step (will try again)",
            run_id,
            a.lease.step_key,
            &format!("{e:?}"),
        );
        ctx.release_db();
        sparkops_platform::sleep(std::time::Duration::from_millis(wait_ms));
        outcome = together(ctx);
    }
    let (recorded, claimed) = match outcome {
        Ok(written) => written,
        Err(_) => {
            ctx.release_db();
            let recorded = ctx.transaction(|tx, _| engine::step::record(tx, a))?;
            sparkops_platform::nudge::run(run_id);
            (recorded, Vec::new())
        }
    };
    Ok((
        recorded,
        Settled {
            claimed,
            ..Settled::default()
        },
    ))
}

fn log(doing: &str, run_id: &str, step: &str, error: &str) {
    sparkops_platform::log_line(
        &json!({"level": "warn", "msg": doing, "run_id": run_id, "step": step, "error": error}),
    );
}

/// Answers with `err` as problem+json, like every other route.
async fn refuse(out: ResponseOutparam, err: &ApiError, request_id: &str) {
    let body = serde_json::to_string(&err.problem(dispatch::PATH, request_id)).unwrap_or_default();
    let mut headers = vec![("content-type", "application/problem+json".to_string())];
    headers.extend(err.headers());
    respond(out, err.status(), headers, body, request_id).await
}

async fn respond(
    out: ResponseOutparam,
    status: u16,
    headers: Vec<(&str, String)>,
    body: String,
    request_id: &str,
) {
    let entries: Vec<(String, Vec<u8>)> = headers
        .into_iter()
        .chain([("x-request-id", request_id.to_string())])
        .map(|(k, v)| (k.to_string(), v.into_bytes()))
        .collect();
    let response = OutgoingResponse::new(Fields::from_list(&entries).expect("valid headers"));
    let _ = response.set_status_code(status);
    let mut sink = response.take_body();
    out.set(response);
    let _ = sink.send(body.into_bytes()).await;
    // End the body now: the caller has its answer while the step runs on.
    let _ = sink.close().await;
}

/// How a step ended: its rendered input, its output or failure, and its retry policy.
struct Done {
    input: Value,
    result: Result<Value, Failure>,
    retry: sparkops_core::workflow::RetryPolicy,
}

/// An agent step's time limit when the step sets none (the engine's lease allows it).
const DEFAULT_STEP_TIMEOUT_MS: u64 = engine::advance::DEFAULT_STEP_TIMEOUT_MS as u64;

fn execute(
    ctx: &mut Work,
    run: &RunOf<'_>,
    key: &str,
    snapshot: &store::Snapshot,
    tool_scope: Option<ToolScope>,
) -> Result<Done, ApiError> {
    let RunOf {
        run_id,
        project_id,
        workflow_id,
    } = *run;
    let store::Snapshot {
        input,
        definition,
        steps,
    } = snapshot;
    let (_, outputs) = store::states(steps);
    let step = definition
        .steps
        .iter()
        .find(|s| s.key == key)
        .cloned()
        .ok_or_else(|| ApiError::Internal(format!("run {run_id} has no step {key}")))?;
    let scope = RunScope {
        input,
        outputs: &outputs,
    };
    let done = |input: Value, result| Done {
        input,
        result,
        retry: step.retry.clone(),
    };
    let rendered = match template::render(&step.input, &scope) {
        Ok(v) => v,
        Err(m) => {
            let failure = Failure::new(ErrorKind::Validation, m).final_attempt();
            return Ok(done(Value::Null, Err(failure)));
        }
    };
    Ok(match step.kind {
        StepKind::Condition => done(rendered.clone(), Ok(rendered)),
        StepKind::Tool => {
            // The policies in scope first: the tool must be allowed, the run within its steps.
            // And the tool, in the same read (or read with the claim).
            let tool_id = step.tool_id.clone().unwrap_or_default();
            let ToolScope { policies, tool } = match tool_scope {
                Some(scope) => scope,
                None => policies::tool_scope(ctx.db()?, project_id, workflow_id, &tool_id)?,
            };
            let started = policies::started_steps(ctx.db()?, &policies, run_id)?;
            if let Err(v) = policies::check_steps(&policies, started)
                .and_then(|()| policies::check_tool(&policies, &tool_id))
            {
                ctx.transaction(|tx, _| {
                    engine::note(tx, run_id, "policy.violation", Some(key), v.event())
                })?;
                let failure = Failure::new(ErrorKind::PolicyViolation, v.message()).final_attempt();
                return Ok(done(rendered, Err(failure)));
            }
            let result = call_tool(ctx, project_id, &step, tool, run_id, &rendered)?;
            done(rendered, result)
        }
        StepKind::Agent => {
            let scope = agent::StepScope {
                project_id,
                workflow_id,
                run_id,
                step_key: key,
                agent_id: step.agent_id.as_deref().unwrap_or_default(),
                deadline: Instant::now()
                    + std::time::Duration::from_millis(
                        step.timeout_ms.unwrap_or(DEFAULT_STEP_TIMEOUT_MS),
                    ),
            };
            let result = agent::run(ctx, &scope, &rendered)?;
            done(rendered, result)
        }
        // The engine never leases an approval step (it waits for a person), so a dispatch
        // of one is a bug somewhere else.
        StepKind::Approval => {
            return Err(ApiError::Internal(format!(
                "step {key} of run {run_id} is an approval: it is decided, not run"
            )));
        }
    })
}

/// One call of `tool` (`None` when it is gone), its failures sorted into the error kinds
/// retry policies name.
fn call_tool(
    ctx: &mut Work,
    project_id: &str,
    step: &Step,
    tool: Option<StepTool>,
    run_id: &str,
    input: &Value,
) -> Result<Result<Value, Failure>, ApiError> {
    let tool_id = step.tool_id.clone().unwrap_or_default();
    let Some(t) = tool else {
        let gone = Failure::new(
            ErrorKind::Validation,
            format!("tool {tool_id} no longer exists"),
        );
        return Ok(Err(gone));
    };
    // The step's own timeout, when shorter, bounds the call too.
    let timeout_ms = step
        .timeout_ms
        .map_or(t.timeout_ms, |s| t.timeout_ms.min(s as i64));
    let tool = json!({
        "http": {"method": t.method, "url": t.url, "headers": t.headers, "timeout_ms": timeout_ms},
        "input_schema": t.input_schema,
        "output_schema": t.output_schema,
    });
    // The same key on every attempt, so the tool can make a repeated call harmless.
    let key = format!("{run_id}:{}", step.key);
    let answer = match tool_call::call(ctx, project_id, &tool, input, &key) {
        Ok(a) => a,
        Err(ApiError::Validation { detail, .. }) => {
            return Ok(Err(Failure::new(ErrorKind::Validation, detail)));
        }
        Err(e) => return Err(e),
    };
    if answer["ok"] == true {
        return Ok(Ok(answer["output"].clone()));
    }
    let message = answer["error"]["message"]
        .as_str()
        .unwrap_or("the call failed")
        .to_string();
    let status = answer["status"].as_u64();
    let kind = match (answer["error"]["kind"].as_str(), status) {
        (Some("timeout"), _) => ErrorKind::Timeout,
        (Some("http-status"), Some(429)) => ErrorKind::RateLimited,
        (Some("http-status"), Some(s)) if (400..500).contains(&s) && s != 408 => {
            ErrorKind::Validation
        }
        (Some("validation"), _) => ErrorKind::Validation,
        // A destination the runtime refuses (`block_networks`, allowed hosts) is refused
        // on every attempt: a policy matter, not retried by default.
        (Some("denied"), _) => ErrorKind::PolicyViolation,
        _ => ErrorKind::ToolError,
    };
    Ok(Err(Failure::new(kind, message)))
}
