//! Webhooks and triggers (the README's "Webhooks and triggers"), both ways of signed HTTP
//! between a project and other systems.
//!
//! A **webhook** is an endpoint told of the project's runs' ends, approvals awaited, budget
//! alerts and schedule fires that started nothing, signed per Standard Webhooks. Its secret
//! is made here and shown once (at create and at rotation); the delivery history and a test
//! event show whether the receiver gets them. Deliveries are the `notifier`'s
//! (`sparkops_platform::webhooks`).
//!
//! A **trigger** starts a run of a workflow from another system's signed request
//! (`POST /hooks/{id}`, the `hooks` component): here its workflow, input template and
//! verification are defined, and its secret set (given, or made and shown once).
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use serde_json::{Map, Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Row, Tx, Value as V, utc};
use sparkops_core::error::ApiError;
use sparkops_core::ids::parse_uuid;
use sparkops_core::input::Body;
use sparkops_core::roles::Action;
use sparkops_core::webhook::{self, EVENT_TYPES, TEST_EVENT};
use sparkops_platform::db::Db;
use sparkops_platform::engine::outbox;
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, Ctx, Principal, Work};
use sparkops_platform::resource::{self, Resource, Write, common_json, page_reply};
use sparkops_platform::resource_columns;
use sparkops_platform::webhooks::{self as delivery, DEFAULT_OVERLAP_S};
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    if let Some(segments) = req.segments(Trigger::PATH) {
        return resource::serve_or_404::<Trigger>(ctx, req, &who, &segments);
    }
    let segments = req.segments(Webhook::PATH).unwrap_or_default();
    match (&req.method, segments.as_slice()) {
        (Method::Post, [id, "test"]) => test(ctx, &who, id),
        (Method::Post, [id, "rotate-secret"]) => rotate(ctx, req, &who, id),
        (Method::Get, [id, "deliveries"]) => deliveries(ctx, req, &who, id),
        (Method::Get, [id, "deliveries", delivery]) => one_delivery(ctx, &who, id, delivery),
        (_, [_, "test" | "rotate-secret"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["POST"],
        }),
        (_, [_, "deliveries", ..]) => Err(ApiError::MethodNotAllowed { allow: vec!["GET"] }),
        _ => resource::serve_or_404::<Webhook>(ctx, req, &who, &segments),
    }
}

struct Webhook;

/// The event types of a body: a non-empty list of known types, without repeats.
fn read_event_types(b: &mut Body) -> Option<Vec<String>> {
    let field = "event_types";
    let Some(value) = b.opt_value(field) else {
        if b.is_clean() {
            b.error(field, "is required");
        }
        return None;
    };
    let known = || format!("must be a non-empty list of: {}", EVENT_TYPES.join(", "));
    let Value::Array(items) = value else {
        b.error(field, known());
        return None;
    };
    let mut types: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.as_str().filter(|t| EVENT_TYPES.contains(t)) {
            Some(t) if !types.iter().any(|s| s == t) => types.push(t.to_string()),
            Some(_) => b.error(&format!("{field}[{i}]"), "is listed twice"),
            None => b.error(&format!("{field}[{i}]"), known()),
        }
    }
    if types.is_empty() && items.is_empty() {
        b.error(field, known());
    }
    Some(types)
}

impl Resource for Webhook {
    const NOUN: &'static str = "webhook";
    const PATH: &'static str = "/api/v1/webhooks";
    const TABLE: &'static str = "webhooks";
    const ID: &'static str = "webhook_id";
    const FROM: &'static str = "webhooks r";
    const COLUMNS: &'static str = resource_columns!(
        "webhook_id",
        "r.url, r.description, to_jsonb(r.event_types), r.enabled, r.disabled_reason, \
         (r.failing_since at time zone 'UTC'), \
         (select count(*) from signing_secrets s where s.owner_id = r.webhook_id \
            and (s.expires_at is null or s.expires_at > now()))"
    );
    const FIELDS: &'static [&'static str] = &["url", "description", "event_types", "enabled"];

    fn to_json(row: &Row) -> Result<Value, ApiError> {
        let mut m = common_json(row)?;
        for (k, v) in [
            ("url", json!(row.text(5)?)),
            ("description", json!(row.opt_text(6)?)),
            ("event_types", row.json(7)?),
            ("enabled", json!(row.bool(8)?)),
            ("disabled_reason", json!(row.opt_text(9)?)),
            ("failing_since", row.time_json(10)?),
            ("secrets_in_use", json!(row.int(11)?)),
        ] {
            m.insert(k.into(), v);
        }
        Ok(Value::Object(m))
    }

    fn save(tx: &Tx<'_, Db>, ctx: &Work, w: Write<'_>) -> Result<(), ApiError> {
        let mut b = Body::from_value(w.doc)?;
        let url = b.str("url", 2048);
        if let Some(Err(e)) = url
            .as_deref()
            .map(sparkops_platform::outbound::check_user_url)
        {
            b.error("url", e);
        }
        let description = b.opt_str("description", 1000);
        let event_types = read_event_types(&mut b);
        let enabled = b.bool_or("enabled", true);
        b.finish()?;
        let (Some(url), Some(event_types)) = (url, event_types) else {
            return Err(ApiError::unchecked_field());
        };
        // Enabling again clears what the notifier said when it disabled the webhook.
        tx.execute(
            &format!(
                "insert into webhooks (webhook_id, project_id, url, description, event_types, enabled,
                    created_by, created_at, updated_at)
                 values ($1, $2, $3, $4, string_to_array($5, ','), $6, $7, $8{AS_TIMESTAMPTZ}, $8{AS_TIMESTAMPTZ})
                 on conflict (webhook_id) do update set
                    url = excluded.url, description = excluded.description,
                    event_types = excluded.event_types, enabled = excluded.enabled,
                    disabled_reason = case when excluded.enabled then null else webhooks.disabled_reason end,
                    failing_since = case when excluded.enabled and not webhooks.enabled then null
                        else webhooks.failing_since end,
                    version = webhooks.version + 1, updated_at = excluded.updated_at"
            ),
            &[
                V::Uuid(w.id.into()),
                V::Uuid(w.project_id.into()),
                V::Text(url),
                description.map_or(V::Null, V::Text),
                V::Text(event_types.join(",")),
                V::Bool(enabled),
                V::Uuid(w.user_id.into()),
                V::Timestamp(ctx.now),
            ],
        )?;
        Ok(())
    }

    fn reveal_on_create(
        tx: &Tx<'_, Db>,
        project_id: &str,
        id: &str,
    ) -> Result<Map<String, Value>, ApiError> {
        let secret = webhook::new_secret(sparkops_platform::random_array());
        delivery::set_secret(tx, project_id, id, &secret, 0)?;
        Ok(Map::from_iter([("secret".to_string(), json!(secret))]))
    }
}

/// `POST /webhooks/{id}/rotate-secret {overlap_s?}`: a new secret, shown once; the old one
/// keeps signing beside it for `overlap_s` seconds (default a day, at most a week), so a
/// receiver can switch without losing a delivery.
fn rotate(ctx: &mut Ctx, req: &HttpRequest, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, access) = resource::access::<Webhook>(ctx, who, id, Action::Write)?;
    let mut b = Body::parse_or_empty(&req.body)?;
    let overlap_s = b
        .opt_int("overlap_s", 0..=7 * 86_400)
        .unwrap_or(DEFAULT_OVERLAP_S);
    b.finish()?;
    let secret = webhook::new_secret(sparkops_platform::random_array());
    let previous_until = ctx.transaction(|tx, _| {
        delivery::set_secret(tx, &access.project_id, &id, &secret, overlap_s)?;
        let rows = tx.query(
            &format!(
                "select {} from signing_secrets where owner_id = $1 and expires_at > now()
                 order by expires_at desc limit 1",
                utc("expires_at")
            ),
            &[V::Uuid(id.clone())],
        )?;
        Ok(rows.first().map(|r| r.time_json(0)).transpose()?)
    })?;
    Ok(Reply::ok(json!({
        "secret": secret,
        "previous_secret_expires_at": previous_until.unwrap_or(Value::Null),
    })))
}

/// `POST /webhooks/{id}/test`: queues a `webhook.test` event for this webhook alone; the
/// notifier sends it within a second or two, and its delivery shows in the history.
fn test(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = resource::access::<Webhook>(ctx, who, id, Action::Write)?;
    let delivery_id = ctx.new_id();
    let row = ctx.transaction(|tx, _| {
        let rows = tx.query(
            &format!(
                "insert into webhook_deliveries (delivery_id, webhook_id, project_id, event_type, payload, next_attempt_at)
                 select $1, webhook_id, project_id, $3, {}, date_trunc('second', now())
                 from webhooks where webhook_id = $2 and deleted_at is null and enabled
                 returning {DELIVERY_COLUMNS}",
                outbox::payload(
                    "$3::text",
                    "jsonb_build_object('project_id', project_id, 'webhook_id', webhook_id, 'requested_by', $4::text)"
                )
            ),
            &[
                V::Uuid(delivery_id.clone()),
                V::Uuid(id.clone()),
                V::Text(TEST_EVENT.into()),
                V::Text(who.user_id.clone()),
            ],
        )?;
        rows.into_iter().next().ok_or_else(|| {
            ApiError::Conflict("the webhook is disabled: enable it to send it events".into())
        })
    })?;
    Ok(Reply::json(202, delivery_json(&row, true)?))
}

const DELIVERY_COLUMNS: &str = "delivery_id::text, event_type, status, attempts, last_response_status, last_error, \
     (created_at at time zone 'UTC'), (last_attempt_at at time zone 'UTC'), \
     (delivered_at at time zone 'UTC'), (next_attempt_at at time zone 'UTC'), payload";

fn delivery_json(row: &Row, with_payload: bool) -> Result<Value, ApiError> {
    let status = row.text(2)?;
    let mut v = json!({
        "id": row.text(0)?,
        // The `webhook-id` header its attempts carried.
        "message_id": format!("msg_{}", row.text(0)?.replace('-', "")),
        "event_type": row.text(1)?,
        "status": status,
        "attempts": row.int(3)?,
        "last_response_status": row.int(4).ok(),
        "last_error": row.opt_text(5)?,
        "created_at": row.time_json(6)?,
        "last_attempt_at": row.time_json(7)?,
        "delivered_at": row.time_json(8)?,
        "next_attempt_at": if status == "pending" { row.time_json(9)? } else { Value::Null },
    });
    if with_payload {
        v["payload"] = row.json(10)?;
    }
    Ok(v)
}

/// `GET /webhooks/{id}/deliveries?status=`: the delivery history, newest first.
fn deliveries(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    id: &str,
) -> Result<Reply, ApiError> {
    let (id, _) = resource::access::<Webhook>(ctx, who, id, Action::Read)?;
    let page = req.page()?;
    let mut sql = format!(
        "select {DELIVERY_COLUMNS} from webhook_deliveries
         where webhook_id = $1 and ($2::uuid is null or delivery_id < $2::uuid)"
    );
    let mut params = vec![
        V::Uuid(id),
        page.before.clone().map(V::Uuid).unwrap_or(V::Null),
    ];
    if let Some(status) = req.query_param("status") {
        if !["pending", "delivered", "failed"].contains(&status.as_str()) {
            return Err(ApiError::field(
                "status",
                "must be one of pending, delivered, failed",
            ));
        }
        params.push(V::Text(status));
        sql += &format!(" and status = ${}", params.len());
    }
    params.push(V::Int64(page.limit + 1));
    sql += &format!(" order by delivery_id desc limit ${}", params.len());
    let rows = ctx.db()?.query(&sql, &params)?;
    page_reply(&page, &rows, |r| delivery_json(r, false))
}

/// `GET /webhooks/{id}/deliveries/{delivery_id}`: one delivery, with the payload it sends.
fn one_delivery(
    ctx: &mut Ctx,
    who: &Principal,
    id: &str,
    delivery: &str,
) -> Result<Reply, ApiError> {
    let (id, _) = resource::access::<Webhook>(ctx, who, id, Action::Read)?;
    let delivery = parse_uuid(delivery, "delivery")?;
    let rows = ctx.db()?.query(
        &format!("select {DELIVERY_COLUMNS} from webhook_deliveries where webhook_id = $1 and delivery_id = $2"),
        &[V::Uuid(id), V::Uuid(delivery.clone())],
    )?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::NotFound(format!("no delivery {delivery}")))?;
    Ok(Reply::ok(delivery_json(row, true)?))
}

struct Trigger;

/// What a trigger's input template may read: the request's JSON body and its headers.
pub const TEMPLATE_ROOTS: &[&str] = &["body", "headers"];
const VERIFICATIONS: &[&str] = &["standard_webhooks", "github", "bearer"];

/// Whether `secret` suits `verification`.
fn check_secret(verification: &str, secret: &str) -> Result<(), String> {
    match verification {
        "standard_webhooks" => webhook::secret_key(secret)
            .map(|_| ())
            .map_err(str::to_string),
        _ if !(16..=256).contains(&secret.len()) => Err("must be 16 to 256 characters".into()),
        _ => Ok(()),
    }
}

/// A new secret for `verification`: `whsec_...`, or 64 hex characters.
fn new_trigger_secret(verification: &str) -> String {
    if verification == "standard_webhooks" {
        webhook::new_secret(sparkops_platform::random_array())
    } else {
        sparkops_platform::random_hex(32)
    }
}

impl Resource for Trigger {
    const NOUN: &'static str = "trigger";
    const PATH: &'static str = "/api/v1/triggers";
    const TABLE: &'static str = "triggers";
    const ID: &'static str = "trigger_id";
    const FROM: &'static str = "triggers r";
    const COLUMNS: &'static str = resource_columns!(
        "trigger_id",
        "r.name, r.workflow_id::text, r.input_template, r.verification, r.enabled, \
         r.refused_count, (r.last_refused_at at time zone 'UTC'), r.last_refusal"
    );
    /// `secret` is written, never shown (but once, when the trigger made it).
    const FIELDS: &'static [&'static str] = &[
        "name",
        "workflow_id",
        "input_template",
        "verification",
        "enabled",
        "secret",
    ];

    fn to_json(row: &Row) -> Result<Value, ApiError> {
        let mut m = common_json(row)?;
        let id = row.text(0)?;
        for (k, v) in [
            ("name", json!(row.text(5)?)),
            ("workflow_id", json!(row.text(6)?)),
            ("input_template", row.json(7)?),
            ("verification", json!(row.text(8)?)),
            ("enabled", json!(row.bool(9)?)),
            ("url", json!(format!("/hooks/{id}"))),
            ("refused_count", json!(row.int(10)?)),
            ("last_refused_at", row.time_json(11)?),
            ("last_refusal", json!(row.opt_text(12)?)),
        ] {
            m.insert(k.into(), v);
        }
        Ok(Value::Object(m))
    }

    fn save(tx: &Tx<'_, Db>, ctx: &Work, w: Write<'_>) -> Result<(), ApiError> {
        let mut b = Body::from_value(w.doc)?;
        let name = b.str("name", 200);
        let workflow_id = b.opt_uuid("workflow_id");
        if workflow_id.is_none() && b.is_clean() {
            b.error("workflow_id", "is required");
        }
        let template = b
            .opt_value("input_template")
            .unwrap_or_else(|| json!("{{ body }}"));
        if let Err(errors) = sparkops_core::template::check_document(&template, TEMPLATE_ROOTS) {
            for (path, message) in errors {
                let field = if path.is_empty() {
                    "input_template".to_string()
                } else {
                    format!("input_template.{path}")
                };
                b.error(&field, message);
            }
        }
        let verification = b.one_of("verification", VERIFICATIONS, "standard_webhooks");
        let enabled = b.bool_or("enabled", true);
        let secret = b.opt_str("secret", 256);
        if let Some(Err(m)) = secret.as_deref().map(|s| check_secret(verification, s)) {
            b.error("secret", m);
        }
        if let Some(id) = &workflow_id {
            let live = resource::live_ids(
                tx,
                "workflows",
                "workflow_id",
                w.project_id,
                std::slice::from_ref(id),
            )?;
            if !live.contains(id) {
                b.error("workflow_id", "is not a live workflow of this project");
            }
        }
        if !w.created && secret.is_none() {
            let rows = tx.query(
                "select verification from triggers where trigger_id = $1",
                &[V::Uuid(w.id.into())],
            )?;
            let before = rows.first().map(|r| r.text(0)).transpose()?;
            if before.as_deref().is_some_and(|v| v != verification) {
                b.error("secret", "is required when the verification changes");
            }
        }
        b.finish()?;
        let (Some(name), Some(workflow_id)) = (name, workflow_id) else {
            return Err(ApiError::unchecked_field());
        };
        tx.execute(
            &format!(
                "insert into triggers (trigger_id, project_id, name, workflow_id, input_template, verification,
                    enabled, created_by, created_at, updated_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9{AS_TIMESTAMPTZ}, $9{AS_TIMESTAMPTZ})
                 on conflict (trigger_id) do update set
                    name = excluded.name, workflow_id = excluded.workflow_id,
                    input_template = excluded.input_template, verification = excluded.verification,
                    enabled = excluded.enabled, version = triggers.version + 1, updated_at = excluded.updated_at"
            ),
            &[
                V::Uuid(w.id.into()),
                V::Uuid(w.project_id.into()),
                V::Text(name),
                V::Uuid(workflow_id),
                V::Json(template),
                V::Text(verification.into()),
                V::Bool(enabled),
                V::Uuid(w.user_id.into()),
                V::Timestamp(ctx.now),
            ],
        )?;
        if let Some(secret) = secret {
            delivery::set_secret(tx, w.project_id, w.id, &secret, 0)?;
        }
        Ok(())
    }

    /// A trigger created without a secret gets one, shown once.
    fn reveal_on_create(
        tx: &Tx<'_, Db>,
        project_id: &str,
        id: &str,
    ) -> Result<Map<String, Value>, ApiError> {
        let rows = tx.query(
            "select t.verification, exists (select 1 from signing_secrets s where s.owner_id = t.trigger_id)
             from triggers t where t.trigger_id = $1",
            &[V::Uuid(id.into())],
        )?;
        let row = rows
            .first()
            .ok_or_else(|| ApiError::internal("the trigger just written is gone"))?;
        if row.bool(1)? {
            return Ok(Map::new());
        }
        let secret = new_trigger_secret(&row.text(0)?);
        delivery::set_secret(tx, project_id, id, &secret, 0)?;
        Ok(Map::from_iter([("secret".to_string(), json!(secret))]))
    }
}
