//! Event-triggered runs: `POST /hooks/{trigger_id}` (no user auth: the sender's signature
//! is the auth) verifies the request as its trigger says (Standard Webhooks, GitHub's
//! `X-Hub-Signature-256`, or a bearer secret), renders the workflow's input from the
//! request's JSON body and headers, and starts the run through the engine's one start path
//! (the input schema, the policies on starting runs), advancing it at once as `POST /runs`
//! does. A request that fails verification records nothing but the trigger's refusal
//! counter. The sender's delivery id (`webhook-id`, `X-GitHub-Delivery`, or
//! `Idempotency-Key`) makes a redelivery answer what the first delivery did, starting
//! nothing.
//!
//! The same component serves approval links (`/api/v1/approvals/{token}`, [`approval`]):
//! signed, like a trigger's requests, instead of logged in.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

mod approval;

use serde_json::{Map, Value, json};
use sparkops_core::db::{Connection as _, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::ids::parse_uuid;
use sparkops_core::template;
use sparkops_core::webhook::{self, Refusal};
use sparkops_platform::engine::{self, NewRun, Origin};
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, Ctx};
use sparkops_platform::webhooks::secrets_in_use;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    if let Some(segments) = req.segments("/api/v1/approvals") {
        return match (&req.method, segments.as_slice()) {
            (Method::Get, [token]) => approval::show(ctx, req, token),
            (Method::Post, [token]) => approval::decide(ctx, req, token),
            (_, [_]) => Err(ApiError::MethodNotAllowed {
                allow: vec!["GET", "POST"],
            }),
            _ => Err(ApiError::NotFound(format!("no route {}", req.path))),
        };
    }
    match (
        &req.method,
        req.segments("/hooks").unwrap_or_default().as_slice(),
    ) {
        (Method::Post, [id]) => deliver(ctx, req, id),
        (_, [_]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["POST"],
        }),
        _ => Err(ApiError::NotFound(format!("no route {}", req.path))),
    }
}

/// A trigger as a delivery needs it.
struct Trigger {
    id: String,
    project_id: String,
    workflow_id: String,
    template: Value,
    verification: String,
}

/// Headers the input template never sees: credentials and signatures.
const HIDDEN_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    "webhook-signature",
    "x-hub-signature",
    "x-hub-signature-256",
];

fn deliver(ctx: &mut Ctx, req: &HttpRequest, id: &str) -> Result<Reply, ApiError> {
    let id = parse_uuid(id, "trigger")?;
    let trigger = load(ctx, &id)?.ok_or_else(|| ApiError::NotFound(format!("no trigger {id}")))?;
    // The signature first: nothing about the trigger's runs is answered to a stranger.
    if let Err(refusal) = verify(ctx, req, &trigger)? {
        ctx.db()?.execute(
            "update triggers set refused_count = refused_count + 1, last_refused_at = now(), last_refusal = $2
             where trigger_id = $1",
            &[V::Uuid(trigger.id.clone()), V::Text(refusal.message().into())],
        )?;
        return Err(ApiError::Unauthenticated(refusal.message().into()));
    }
    let (header, delivery_id) = match trigger.verification.as_str() {
        "standard_webhooks" => ("webhook-id", req.header("webhook-id")),
        "github" => ("X-GitHub-Delivery", req.header("x-github-delivery")),
        _ => ("Idempotency-Key", req.header("idempotency-key")),
    };
    let delivery_id = delivery_id.map(str::to_string);
    let body: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::field("body", format!("must be JSON: {e}")))?
    };
    let headers: Map<String, Value> = req
        .headers
        .iter()
        .filter(|(k, _)| !HIDDEN_HEADERS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let event = json!({"body": body, "headers": headers});
    let input = template::render_document(&trigger.template, &event, &["body", "headers"])
        .map_err(|m| ApiError::field("input_template", m))?;
    let workflow = engine::start::workflow(ctx.db()?, &trigger.workflow_id, None)?
        .filter(|w| w.project_id == trigger.project_id)
        .ok_or_else(|| ApiError::Conflict("the trigger's workflow was deleted".into()))?;
    let mut claimed = Vec::new();
    let principal = format!("trigger:{}", trigger.id);
    let reply = ctx.create_once_as(req, principal, (header, delivery_id.clone()), |tx, ctx| {
        let run_id = ctx.new_id();
        let run = NewRun {
            run_id: &run_id,
            workflow: &workflow,
            input: &input,
            origin: Origin::Trigger {
                trigger_id: &trigger.id,
                delivery_id: delivery_id.as_deref(),
            },
            now: ctx.now,
            max_cost_usd: None,
        };
        claimed = engine::start_advanced(tx, &run, None)?.claimed;
        Ok(Reply::json(
            202,
            json!({"run_id": run_id, "trigger_id": trigger.id, "delivery_id": delivery_id}),
        )
        .header("location", format!("/api/v1/runs/{run_id}")))
    })?;
    if let Some(run_id) = reply.body.as_ref().and_then(|b| b["run_id"].as_str()) {
        ctx.log_run(run_id);
        ctx.dispatch(run_id, &claimed);
    }
    Ok(reply)
}

/// The enabled live trigger `id` of a live project.
fn load(ctx: &mut Ctx, id: &str) -> Result<Option<Trigger>, ApiError> {
    let rows = ctx.db()?.query(
        "select t.project_id::text, t.workflow_id::text, t.input_template, t.verification
         from triggers t join projects p on p.project_id = t.project_id
         where t.trigger_id = $1 and t.enabled and t.deleted_at is null and p.deleted_at is null",
        &[V::Uuid(id.into())],
    )?;
    rows.first()
        .map(|r| {
            Ok(Trigger {
                id: id.to_string(),
                project_id: r.text(0)?,
                workflow_id: r.text(1)?,
                template: r.json(2)?,
                verification: r.text(3)?,
            })
        })
        .transpose()
}

/// Checks the request against every secret of the trigger in use.
fn verify(ctx: &mut Ctx, req: &HttpRequest, t: &Trigger) -> Result<Result<(), Refusal>, ApiError> {
    let secrets = secrets_in_use(ctx.db()?, &t.project_id, &t.id)?;
    let now = ctx.now.timestamp();
    let mut outcome = Err(Refusal::BadSignature);
    for secret in &secrets {
        outcome = match t.verification.as_str() {
            "standard_webhooks" => match webhook::secret_key(secret) {
                Ok(key) => webhook::verify(
                    &key,
                    req.header("webhook-id"),
                    req.header("webhook-timestamp"),
                    req.header("webhook-signature"),
                    &req.body,
                    now,
                ),
                Err(_) => Err(Refusal::BadSignature),
            },
            "github" => webhook::verify_github(
                secret.as_bytes(),
                req.header("x-hub-signature-256"),
                &req.body,
            ),
            _ => webhook::verify_bearer(secret, req.header("authorization")),
        };
        // Only a signature that does not match is worth another secret.
        if outcome != Err(Refusal::BadSignature) {
            break;
        }
    }
    Ok(outcome)
}
