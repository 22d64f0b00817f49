//! Trace export to the project's OTLP/HTTP collector (LangWatch, Langfuse, Jaeger, an
//! OpenTelemetry collector), off every run's critical path.
//!
//! A run that finishes in a project with a `trace_endpoint` gets a row in `trace_exports`
//! in the same transaction ([`enqueue`]), so no finished run is missed and none is queued
//! twice. The `exporter` cron component calls [`export_due`]: it claims due rows under a
//! lease (replicas never send the same row at once; a crashed exporter's rows come back
//! when the lease ends), sends each project's runs in OTLP requests of at most 512 spans, and
//! records the outcome: exported; retried with exponential backoff (honouring
//! `Retry-After`) after a transient failure; or given up after a refusal or too many
//! attempts. The run itself is never touched.
//!
//! The key comes from the project secret `otlp.api_key` (sent as a bearer token, as
//! LangWatch expects) or `otlp.authorization` (the whole `Authorization` value, e.g.
//! Langfuse's `Basic ...`); secrets `otlp.header.<name>` add headers a collector wants (e.g.
//! Langfuse's `x-langfuse-ingestion-version`). None is ever logged.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Row, Value as V, utc};
use sparkops_core::error::ApiError;
use sparkops_core::llm;
use sparkops_core::otlp::{self, CallRecord, RunRecord, StepRecord, Trace};

use crate::db::Db;
use crate::outbound::{self, Call, CallError, Chosen, check_user_url};
use crate::pipeline::project_secrets_and_prefixed;
use crate::work::Work;

/// Runs one tick takes on at most; the next tick takes the rest.
const PER_TICK: usize = 1000;
/// Runs claimed, read and prepared together.
const RUNS_PER_BATCH: usize = 50;
/// Spans per OTLP request at most (as OpenTelemetry's batch processors send), unless one
/// run's trace alone is larger.
const SPANS_PER_REQUEST: usize = 512;
/// How long a claimed row is held before another exporter may take it.
const LEASE_S: i64 = 60;
/// Attempts before an export is given up.
pub const MAX_ATTEMPTS: i32 = 10;
/// The first retry waits this long; each next one twice as long, up to [`MAX_BACKOFF_S`].
const FIRST_BACKOFF_S: i64 = 5;
const MAX_BACKOFF_S: i64 = 300;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a tick starts new requests; with one request's timeout on top, well inside
/// [`LEASE_S`].
const TICK_BUDGET: Duration = Duration::from_secs(30);

/// What became of one request's runs.
#[derive(Debug)]
enum Outcome {
    Exported,
    /// Try again, not before `after_s` seconds.
    Retry {
        error: String,
        after_s: i64,
    },
    GiveUp(String),
    /// Not tried: the tick ran out of time. Not counted as an attempt.
    Postponed,
}

/// Sends every due export, as at `now`: a batch claimed at a time, for at most
/// [`TICK_BUDGET`] (what is left is postponed to the next tick, so no claim outlives its
/// lease while this tick still holds it).
pub fn export_due(ctx: &mut Work, now: DateTime<Utc>) -> Result<(), ApiError> {
    let deadline = Instant::now() + TICK_BUDGET;
    let mut taken = 0;
    while taken < PER_TICK && Instant::now() < deadline {
        let claimed = claim(ctx.db()?, now)?;
        if claimed.is_empty() {
            break;
        }
        taken += claimed.len();
        let mut by_project: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (project_id, run_id) in claimed {
            by_project.entry(project_id).or_default().push(run_id);
        }
        for (project_id, runs) in by_project {
            // A batch that cannot even be prepared (a secret that no longer opens, a
            // database error) is retried like a failed send, so its attempts run out, and
            // the other projects' exports go on.
            let results = export(ctx, &project_id, &runs, deadline).unwrap_or_else(|e| {
                crate::log_line(&json!({"level": "warn", "msg": "preparing a trace export", "project_id": project_id,
                        "error": format!("{e:?}")})
                );
                let error = "the export could not be prepared (the exporter's log says why)";
                vec![(runs.clone(), Outcome::Retry { error: error.into(), after_s: 0 })]
            });
            for (runs, outcome) in results {
                log(&project_id, &runs, &outcome);
                record(ctx.db()?, &runs, &outcome, now)?;
            }
        }
    }
    ctx.db()?.execute(
        &format!(
            "delete from trace_exports
             where (status = 'exported' and exported_at < $1{AS_TIMESTAMPTZ} - interval '1 day')
                or (status = 'failed' and created_at < $1{AS_TIMESTAMPTZ} - interval '7 days')"
        ),
        &[V::Timestamp(now)],
    )?;
    Ok(())
}

/// The prefix of the project secrets sent as extra export headers.
const HEADER_SECRET: &str = "otlp.header.";
/// Headers the export sets itself, or the connection owns, which no secret replaces.
const RESERVED_HEADERS: [&str; 7] = [
    "authorization",
    "connection",
    "content-length",
    "content-type",
    "host",
    "te",
    "transfer-encoding",
];

/// Claims up to [`RUNS_PER_BATCH`] due exports for one attempt each, under a lease:
/// `(project, run)` pairs.
fn claim(db: &Db, now: DateTime<Utc>) -> Result<Vec<(String, String)>, ApiError> {
    let rows = db.query(
        &format!(
            "with due as (
                select run_id from trace_exports
                where status = 'pending' and next_attempt_at <= $1{AS_TIMESTAMPTZ}
                order by next_attempt_at limit $2 for update skip locked)
             update trace_exports t
             set attempts = t.attempts + 1,
                 next_attempt_at = $1{AS_TIMESTAMPTZ} + make_interval(secs => $3)
             from due where t.run_id = due.run_id
             returning t.project_id::text, t.run_id::text"
        ),
        &[
            V::Timestamp(now),
            V::Int64(RUNS_PER_BATCH as i64),
            V::Float64(LEASE_S as f64),
        ],
    )?;
    rows.iter().map(|r| Ok((r.text(0)?, r.text(1)?))).collect()
}

fn log(project_id: &str, runs: &[String], outcome: &Outcome) {
    let (level, result, error) = match outcome {
        Outcome::Exported => ("info", "exported", None),
        Outcome::Retry { error, .. } => ("warn", "retry", Some(error)),
        Outcome::GiveUp(error) => ("warn", "given up", Some(error)),
        Outcome::Postponed => ("info", "postponed", None),
    };
    crate::log_line(
        &json!({"level": level, "msg": "trace export", "project_id": project_id,
            "runs": runs.len(), "first_run_id": runs.first(), "result": result, "error": error}),
    );
}

fn record(db: &Db, runs: &[String], outcome: &Outcome, now: DateTime<Utc>) -> Result<(), ApiError> {
    let ids = V::Text(runs.join(","));
    let at = V::Timestamp(now);
    match outcome {
        Outcome::Exported => db.execute(
            &format!(
                "update trace_exports set status = 'exported', exported_at = $2{AS_TIMESTAMPTZ}, last_error = null
                 where run_id = any(string_to_array($1, ',')::uuid[]) and status = 'pending'"
            ),
            &[ids, at],
        )?,
        Outcome::Retry { error, after_s } => db.execute(
            &format!(
                "update trace_exports set last_error = $3,
                    status = case when attempts >= $4 then 'failed' else 'pending' end,
                    next_attempt_at = $2{AS_TIMESTAMPTZ} + make_interval(secs =>
                        greatest($5, least($6, $7 * power(2, attempts - 1))))
                 where run_id = any(string_to_array($1, ',')::uuid[]) and status = 'pending'"
            ),
            &[
                ids,
                at,
                V::Text(error.clone()),
                V::Int32(MAX_ATTEMPTS),
                V::Float64(*after_s as f64),
                V::Float64(MAX_BACKOFF_S as f64),
                V::Float64(FIRST_BACKOFF_S as f64),
            ],
        )?,
        Outcome::Postponed => db.execute(
            &format!(
                "update trace_exports set attempts = attempts - 1, next_attempt_at = $2{AS_TIMESTAMPTZ}
                 where run_id = any(string_to_array($1, ',')::uuid[]) and status = 'pending'"
            ),
            &[ids, at],
        )?,
        Outcome::GiveUp(error) => db.execute(
            "update trace_exports set status = 'failed', last_error = $2
             where run_id = any(string_to_array($1, ',')::uuid[]) and status = 'pending'",
            &[ids, V::Text(error.clone())],
        )?,
    };
    Ok(())
}

/// Sends a batch of a project's runs, in requests of at most [`SPANS_PER_REQUEST`] spans (a
/// run's trace is never split); what became of each request's runs.
fn export(
    ctx: &mut Work,
    project_id: &str,
    runs: &[String],
    deadline: Instant,
) -> Result<Vec<(Vec<String>, Outcome)>, ApiError> {
    let everyone = |outcome| Ok(vec![(runs.to_vec(), outcome)]);
    let endpoint = ctx
        .db()?
        .query(
            "select trace_endpoint from projects where project_id = $1 and deleted_at is null",
            &[V::Uuid(project_id.into())],
        )?
        .first()
        .map(|r| r.opt_text(0))
        .transpose()?
        .flatten();
    let Some(endpoint) = endpoint else {
        return everyone(Outcome::GiveUp(
            "the project no longer exports traces".into(),
        ));
    };
    let url = match check_user_url(&endpoint) {
        Ok(url) => url,
        Err(e) => return everyone(Outcome::GiveUp(format!("trace_endpoint {e}"))),
    };
    // Extra headers a collector wants (Langfuse: `x-langfuse-ingestion-version: 4`) are
    // project secrets `otlp.header.<name>`.
    let names = ["otlp.authorization".to_string(), "otlp.api_key".to_string()];
    let secrets = project_secrets_and_prefixed(ctx, project_id, &names, Some(HEADER_SECRET))?;
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    if let Some(auth) = secrets.get("otlp.authorization") {
        headers.push(("authorization".into(), auth.clone()));
    } else if let Some(key) = secrets.get("otlp.api_key") {
        headers.push(("authorization".into(), format!("Bearer {key}")));
    }
    let mut extra: Vec<(String, String)> = secrets
        .iter()
        .filter_map(|(name, value)| {
            let header = name.strip_prefix(HEADER_SECRET)?.to_ascii_lowercase();
            let allowed = !header.is_empty() && !RESERVED_HEADERS.contains(&header.as_str());
            allowed.then(|| (header, value.clone()))
        })
        .collect();
    extra.sort();
    headers.extend(extra);
    let traces = load(ctx.db()?, runs)?;
    // No connection is held while collectors answer.
    ctx.release_db();
    let mut results = Vec::new();
    let missing: Vec<String> = runs
        .iter()
        .filter(|r| !traces.iter().any(|(id, _)| id == *r))
        .cloned()
        .collect();
    if !missing.is_empty() {
        results.push((missing, Outcome::GiveUp("the run is not finished".into())));
    }
    for request in otlp::requests(traces, SPANS_PER_REQUEST) {
        let ids: Vec<String> = request.iter().map(|(id, _)| id.clone()).collect();
        if Instant::now() >= deadline {
            results.push((ids, Outcome::Postponed));
            continue;
        }
        let traces: Vec<Trace> = request.into_iter().map(|(_, t)| t).collect();
        let body = otlp::export_request(project_id, &traces).to_string();
        let answer = outbound::send(Call {
            method: "POST",
            url: &url,
            chosen: Chosen::ByUser,
            headers: headers.clone(),
            body: Some(body.into_bytes()),
            timeout: REQUEST_TIMEOUT,
            max_response_bytes: 64 << 10,
        });
        results.push((ids, outcome(project_id, answer)));
    }
    Ok(results)
}

/// What a collector's answer means for the runs it was sent (OTLP/HTTP's rules).
fn outcome(project_id: &str, answer: Result<outbound::Answer, CallError>) -> Outcome {
    match answer {
        Ok(a) if (200..300).contains(&a.status) => {
            if let Some(rejected) = rejected_spans(&a.body) {
                // A partial success is not retried; the collector said why.
                crate::log_line(
                    &json!({"level": "warn", "msg": "the collector rejected spans",
                        "project_id": project_id, "rejected_spans": rejected}),
                );
            }
            Outcome::Exported
        }
        Ok(a) => {
            let detail: String = String::from_utf8_lossy(&a.body).chars().take(200).collect();
            let error = format!("the collector answered {}: {detail}", a.status);
            if otlp::retryable(a.status) {
                let retry_after = crate::outbound::header(&a.headers, "retry-after");
                let wait_ms = llm::classify(a.status, retry_after).1.unwrap_or(0);
                Outcome::Retry {
                    error,
                    after_s: (wait_ms / 1000) as i64,
                }
            } else {
                Outcome::GiveUp(error)
            }
        }
        Err(e) if e.refused() => Outcome::GiveUp(e.to_string()),
        Err(e) => Outcome::Retry {
            error: e.to_string(),
            after_s: 0,
        },
    }
}

fn rejected_spans(body: &[u8]) -> Option<i64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let n = &v["partialSuccess"]["rejectedSpans"];
    n.as_i64()
        .or_else(|| n.as_str().and_then(|s| s.parse().ok()))
        .filter(|n| *n > 0)
}

fn opt_json(row: &Row, i: usize) -> Result<Option<Value>, ApiError> {
    Ok(Some(row.json(i)?).filter(|v| !v.is_null()))
}

/// The runs' records, as traces, by run id.
fn load(db: &Db, runs: &[String]) -> Result<Vec<(String, Trace)>, ApiError> {
    let ids = V::Text(runs.join(","));
    let run_rows = db.query(
        &format!(
            "select r.run_id::text, r.workflow_id::text, w.name, r.workflow_version, r.status, r.error,
                {}, {}, r.tokens_in, r.tokens_out, r.cost_usd::text, r.unpriced_calls,
                r.schedule_id::text, r.retry_of::text, r.project_id::text, r.created_by::text,
                coalesce(r.schedule_id, r.trigger_id, (
                    with recursive chain (id, prev) as (
                        select r.run_id, r.retry_of
                        union all
                        select p.run_id, p.retry_of from runs p join chain c on p.run_id = c.prev
                    )
                    select id from chain where prev is null
                ))::text
             from runs r join workflows w on w.workflow_id = r.workflow_id
             where r.run_id = any(string_to_array($1, ',')::uuid[]) and r.finished_at is not null",
            utc("r.created_at"),
            utc("r.finished_at"),
        ),
        std::slice::from_ref(&ids),
    )?;
    let step_rows = db.query(
        &format!(
            "select s.run_id::text, s.step_key, s.kind, s.status, s.attempt, {}, {},
                s.tokens_in, s.tokens_out, s.cost_usd::text, s.error,
                s.agent_id::text, a.name, s.tool_id::text, t.name, s.model
             from run_steps s
             left join agents a on a.agent_id = s.agent_id
             left join tools t on t.tool_id = s.tool_id
             where s.run_id = any(string_to_array($1, ',')::uuid[]) and s.started_at is not null
             order by s.started_at, s.step_key",
            utc("s.started_at"),
            utc("s.finished_at"),
        ),
        std::slice::from_ref(&ids),
    )?;
    let call_rows = db.query(
        &format!(
            "select run_id::text, seq, step_key, kind, {}, data from run_events
             where run_id = any(string_to_array($1, ',')::uuid[])
               and kind in ('model.called', 'tool.called') and step_key is not null
             order by seq",
            utc("created_at"),
        ),
        &[ids],
    )?;
    let mut steps: BTreeMap<String, Vec<StepRecord>> = BTreeMap::new();
    for r in &step_rows {
        let named = |id: usize, name: usize| -> Result<Option<(String, String)>, ApiError> {
            Ok(match (r.opt_text(id)?, r.opt_text(name)?) {
                (Some(id), Some(name)) => Some((id, name)),
                _ => None,
            })
        };
        steps.entry(r.text(0)?).or_default().push(StepRecord {
            key: r.text(1)?,
            kind: r.text(2)?,
            status: r.text(3)?,
            attempt: r.int(4)?,
            started_at: r.timestamp(5)?,
            finished_at: r.opt_timestamp(6)?,
            tokens_in: r.int(7)?,
            tokens_out: r.int(8)?,
            cost_usd: r.opt_usd(9)?,
            error: opt_json(r, 10)?,
            agent: named(11, 12)?,
            tool: named(13, 14)?,
            model: r.opt_text(15)?,
        });
    }
    let mut calls: BTreeMap<String, Vec<CallRecord>> = BTreeMap::new();
    for r in &call_rows {
        calls.entry(r.text(0)?).or_default().push(CallRecord {
            seq: r.int(1)?,
            step_key: r.text(2)?,
            kind: r.text(3)?,
            at: r.timestamp(4)?,
            data: r.json(5)?,
        });
    }
    let mut traces = Vec::with_capacity(run_rows.len());
    for r in &run_rows {
        let run = RunRecord {
            run_id: r.text(0)?,
            project_id: r.text(14)?,
            created_by: r.opt_text(15)?,
            session_id: r.text(16)?,
            workflow_id: r.text(1)?,
            workflow_name: r.text(2)?,
            workflow_version: r.int(3)?,
            status: r.text(4)?,
            error: opt_json(r, 5)?,
            created_at: r.timestamp(6)?,
            finished_at: r.timestamp(7)?,
            tokens_in: r.int(8)?,
            tokens_out: r.int(9)?,
            cost_usd: r.usd(10)?,
            unpriced_calls: r.int(11)?,
            schedule_id: r.opt_text(12)?,
            retry_of: r.opt_text(13)?,
        };
        let trace = otlp::run_trace(
            &run,
            steps.get(&run.run_id).map_or(&[], Vec::as_slice),
            calls.get(&run.run_id).map_or(&[], Vec::as_slice),
        );
        traces.push((run.run_id, trace));
    }
    Ok(traces)
}
