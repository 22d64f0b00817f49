//! The executor (DESIGN.md section 5): a route of the app's own endpoint that runs a claimed
//! step for a signed dispatch ([`sparkops_core::dispatch`]) and nothing else. It checks the
//! signature and the step's lease, answers `202` at once, and goes on to run the step
//! (Spin keeps a guest running after it has set its response), so steps of many runs
//! proceed in parallel instances. The result, with an event, is written in one transaction
//! that only lands while the lease still holds: a step cancelled or taken back meanwhile
//! keeps its newer state. Then it nudges the run.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use std::time::Instant;

use futures::SinkExt;
use serde_json::{Value, json};
use sparkops_core::db::{Connection as _, Value as V};
use sparkops_core::dispatch;
use sparkops_core::error::ApiError;
use sparkops_core::run::{self, RunScope};
use sparkops_core::template;
use sparkops_core::workflow::{Step, StepKind};
use sparkops_platform::engine;
use sparkops_platform::pipeline::Ctx;
use sparkops_platform::tool_call::{self, setting};
use sparkops_platform::variable;
use sparkops_platform::{agent, policies};
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
        Err(e) => return refuse(out, &ApiError::Server(e), &request_id).await,
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
    let mut ctx = Ctx::new(format!("step-{run_id}-{step}"));
    let (attempt, project_id) = match holds_lease(&mut ctx, run_id, step, lease) {
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
    let started = Instant::now();
    let done = execute(&mut ctx, run_id, step).unwrap_or_else(|e| {
        log(
            "running a step",
            run_id,
            step,
            &format!("{e:?} {:?}", e.cause()),
        );
        Done {
            input: Value::Null,
            result: fail("internal", "the step could not be run"),
            final_attempt: false,
            retry: Default::default(),
            retry_after_ms: None,
        }
    });
    let elapsed = started.elapsed().as_millis() as i64;
    let error_kind = done.result.as_ref().err().map(|(k, _)| k.clone());
    // Contents (prompts, answers, tool data) are logged only when the operator opts in.
    let payloads = setting("log_step_payloads")
        .then(|| (done.input.clone(), done.result.as_ref().ok().cloned()));
    match record(&mut ctx, run_id, step, lease, attempt, done, elapsed) {
        // One line per step attempt: ids, outcome and timing.
        Ok(status) => {
            let mut line = json!({"level": "info", "msg": "step", "request_id": ctx.request_id,
                "project_id": project_id, "run_id": run_id, "step": step, "attempt": attempt,
                "status": status, "error_kind": error_kind, "duration_ms": elapsed});
            if let Some((input, output)) = payloads {
                line["input"] = input;
                line["output"] = output.unwrap_or_default();
            }
            sparkops_platform::log_line(&line);
        }
        Err(e) => log("recording a step", run_id, step, &format!("{e:?}")),
    }
    sparkops_platform::nudge::run(run_id);
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

/// The attempt the lease is for and the run's project, while the lease holds.
fn holds_lease(
    ctx: &mut Ctx,
    run_id: &str,
    step: &str,
    lease: &str,
) -> Result<Option<(i64, String)>, ApiError> {
    let rows = ctx.db()?.query(
        "select s.attempt, r.project_id::text from run_steps s join runs r on r.run_id = s.run_id
         where s.run_id = $1::text::uuid and s.step_key = $2 and s.status = 'running'
           and s.lease_id = $3::text::uuid and s.lease_expires_at > now()",
        &[
            V::Text(run_id.into()),
            V::Text(step.into()),
            V::Text(lease.into()),
        ],
    )?;
    Ok(match rows.first() {
        Some(r) => Some((r.int(0)?, r.text(1)?)),
        None => None,
    })
}

/// How a step ended: its rendered input, and its output or `(error kind, message)`.
struct Done {
    input: Value,
    result: Result<Value, (String, String)>,
    /// The step's retry policy allows no further attempt whatever the kind.
    final_attempt: bool,
    retry: sparkops_core::workflow::RetryPolicy,
    /// The least wait before another attempt that the other side asked for (`Retry-After`).
    retry_after_ms: Option<u64>,
}

/// An agent step's time limit when the step sets none (the orchestrator's lease allows it).
const DEFAULT_STEP_TIMEOUT_MS: u64 = sparkops_platform::orchestrate::DEFAULT_STEP_TIMEOUT_MS as u64;

fn fail(kind: &str, message: impl Into<String>) -> Result<Value, (String, String)> {
    Err((kind.to_string(), message.into()))
}

fn execute(ctx: &mut Ctx, run_id: &str, key: &str) -> Result<Done, ApiError> {
    let (definition, (_, outputs), input, project_id, workflow_id) = ctx.transaction(|tx, _| {
        let rows = tx.query(
            "select input, project_id::text, workflow_id::text from runs where run_id = $1",
            &[V::Uuid(run_id.into())],
        )?;
        let row = rows.first().ok_or(ApiError::Internal)?;
        Ok((
            engine::definition(tx, run_id)?,
            engine::steps(tx, run_id)?,
            row.json(0)?,
            row.text(1)?,
            row.text(2)?,
        ))
    })?;
    let step = definition
        .steps
        .iter()
        .find(|s| s.key == key)
        .cloned()
        .ok_or(ApiError::Internal)?;
    let scope = RunScope {
        input: &input,
        outputs: &outputs,
    };
    let done = |input: Value, result, final_attempt| Done {
        input,
        result,
        final_attempt,
        retry: step.retry.clone(),
        retry_after_ms: None,
    };
    let rendered = match template::render(&step.input, &scope) {
        Ok(v) => v,
        Err(m) => return Ok(done(Value::Null, fail("validation", m), true)),
    };
    Ok(match step.kind {
        StepKind::Condition => done(rendered.clone(), Ok(rendered), false),
        StepKind::Tool => {
            // The policies in scope first: the tool must be allowed, the run within its steps.
            let tool_id = step.tool_id.clone().unwrap_or_default();
            let policies = policies::in_scope(ctx.db()?, &project_id, &workflow_id, None)?;
            let started = policies::started_steps(ctx.db()?, &policies, run_id)?;
            if let Err(v) = policies::check_steps(&policies, started)
                .and_then(|()| policies::check_tool(&policies, &tool_id))
            {
                ctx.transaction(|tx, _| {
                    engine::lock_run(tx, run_id)?;
                    engine::event(tx, run_id, "policy.violation", Some(key), v.event())
                })?;
                return Ok(done(rendered, fail("policy-violation", v.message()), true));
            }
            let result = call_tool(ctx, &project_id, &step, run_id, &rendered)?;
            done(rendered, result, false)
        }
        StepKind::Agent => {
            let scope = agent::StepScope {
                project_id: &project_id,
                workflow_id: &workflow_id,
                run_id,
                step_key: key,
                agent_id: step.agent_id.as_deref().unwrap_or_default(),
                deadline: Instant::now()
                    + std::time::Duration::from_millis(
                        step.timeout_ms.unwrap_or(DEFAULT_STEP_TIMEOUT_MS),
                    ),
            };
            let outcome = agent::run(ctx, &scope, &rendered)?;
            Done {
                input: rendered,
                result: outcome.result,
                final_attempt: outcome.final_attempt,
                retry: step.retry.clone(),
                retry_after_ms: outcome.retry_after_ms,
            }
        }
        StepKind::Approval => done(
            rendered,
            fail(
                "not-implemented",
                format!(
                    "{} steps are not available in this version",
                    step.kind.as_str()
                ),
            ),
            true,
        ),
    })
}

/// One tool call, its failures sorted into the error kinds retry policies name.
fn call_tool(
    ctx: &mut Ctx,
    project_id: &str,
    step: &Step,
    run_id: &str,
    input: &Value,
) -> Result<Result<Value, (String, String)>, ApiError> {
    let tool_id = step.tool_id.clone().unwrap_or_default();
    let rows = ctx.db()?.query(
        "select method, url, headers, timeout_ms, input_schema, output_schema from tools
         where tool_id = $1 and project_id = $2 and deleted_at is null",
        &[V::Uuid(tool_id.clone()), V::Uuid(project_id.into())],
    )?;
    let Some(t) = rows.first() else {
        return Ok(fail(
            "validation",
            format!("tool {tool_id} no longer exists"),
        ));
    };
    // The step's own timeout, when shorter, bounds the call too.
    let tool_timeout_ms = t.int(3)?;
    let timeout_ms = step
        .timeout_ms
        .map_or(tool_timeout_ms, |s| tool_timeout_ms.min(s as i64));
    let tool = json!({
        "http": {"method": t.text(0)?, "url": t.text(1)?, "headers": t.json(2)?, "timeout_ms": timeout_ms},
        "input_schema": t.json(4)?,
        "output_schema": t.json(5)?,
    });
    // The same key on every attempt, so the tool can make a repeated call harmless.
    let key = format!("{run_id}:{}", step.key);
    let answer = match tool_call::call(ctx, project_id, &tool, input, &key) {
        Ok(a) => a,
        Err(ApiError::Validation { detail, .. }) => return Ok(fail("validation", detail)),
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
        (Some("timeout"), _) => "timeout",
        (Some("http-status"), Some(429)) => "rate-limited",
        (Some("http-status"), Some(s)) if (400..500).contains(&s) && s != 408 => "validation",
        (Some("validation"), _) => "validation",
        // A destination the runtime refuses (`block_networks`, allowed hosts) is refused
        // on every attempt: a policy matter, not retried by default.
        (Some("denied"), _) => "policy-violation",
        _ => "tool-error",
    };
    Ok(fail(kind, message))
}

/// Writes the step's end (or its next attempt) and an event, while the lease holds.
fn record(
    ctx: &mut Ctx,
    run_id: &str,
    key: &str,
    lease: &str,
    attempt: i64,
    done: Done,
    duration_ms: i64,
) -> Result<&'static str, ApiError> {
    let (status, error, next_ms) = match &done.result {
        Ok(_) => ("succeeded", Value::Null, None),
        Err((kind, message)) => {
            let jitter = sparkops_platform::random_array::<1>()[0] as f64 / 255.0;
            let next = if done.final_attempt {
                None
            } else {
                run::retry_delay_ms(&done.retry, attempt as u32, kind, jitter)
                    .map(|d| d.max(done.retry_after_ms.unwrap_or(0)))
            };
            let status = if next.is_some() { "retrying" } else { "failed" };
            (status, json!({"kind": kind, "message": message}), next)
        }
    };
    let params = [
        V::Uuid(run_id.into()),
        V::Text(key.into()),
        V::Uuid(lease.into()),
        V::Text(status.into()),
        done.input.into_json(),
        done.result.ok().into_json(),
        Some(error.clone()).filter(|e| !e.is_null()).into_json(),
        V::Int64(duration_ms),
        V::Float64(next_ms.unwrap_or(0) as f64),
    ];
    ctx.transaction(|tx, _| {
        engine::lock_run(tx, run_id)?;
        let updated = tx.execute(
            "update run_steps set status = $4, input = $5, output = $6, error = $7, duration_ms = $8,
                lease_id = null, lease_expires_at = null, updated_at = now(),
                finished_at = case when $4 = 'retrying' then null else now() end,
                next_attempt_at = case when $4 = 'retrying' then now() + make_interval(secs => $9::float8 / 1000) else null end
             where run_id = $1 and step_key = $2 and lease_id = $3 and status = 'running'",
            &params,
        )?;
        if updated == 1 {
            let mut data = json!({"attempt": attempt, "duration_ms": duration_ms});
            if !error.is_null() {
                data["error"] = error;
            }
            engine::event(tx, run_id, &format!("step.{status}"), Some(key), data)?;
            return Ok(status);
        }
        // The lease was lost meanwhile (cancelled, taken back): the result is not recorded.
        Ok("discarded")
    })
}

/// A JSON value bound as `jsonb`, SQL `null` for JSON `null`.
trait IntoJson {
    fn into_json(self) -> V;
}

impl IntoJson for Value {
    fn into_json(self) -> V {
        if self.is_null() {
            V::Null
        } else {
            V::Json(self)
        }
    }
}

impl IntoJson for Option<Value> {
    fn into_json(self) -> V {
        self.map(IntoJson::into_json).unwrap_or(V::Null)
    }
}
