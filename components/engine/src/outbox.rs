//! The webhook outbox: a delivery row for every enabled webhook of the project that
//! subscribes to an event, written in the same transaction as the event (so an event is
//! never told twice, and never lost when the transaction commits). The `notifier` cron
//! component sends them (`sparkops_platform::webhooks`).
//!
//! A delivery's payload is the Standard Webhooks body, fixed when it is written so every
//! attempt sends the same bytes: `{"type", "timestamp", "data"}`.

use serde_json::Value;
use sparkops_core::db::{Connection, Tx, Value as V, rfc3339_sql};
use sparkops_core::error::ApiError;

/// The Standard Webhooks body of an event of `event_type` (SQL text) with `data` (a
/// `jsonb` SQL expression), stamped now: `{"type", "timestamp", "data"}`.
pub fn payload(event_type: &str, data: &str) -> String {
    format!(
        "jsonb_build_object('type', {event_type}, 'timestamp', {}, 'data', {data})",
        rfc3339_sql("now()")
    )
}

/// The deliveries of `$type` (SQL text) with `data` (a `jsonb` SQL expression), one per
/// enabled live webhook of project `project` (a SQL expression) subscribed to it; `from`
/// adds the tables the expressions read.
pub(crate) fn insert_deliveries(event_type: &str, project: &str, data: &str, from: &str) -> String {
    let payload = payload(event_type, data);
    format!(
        "insert into webhook_deliveries (delivery_id, webhook_id, project_id, event_type, payload, next_attempt_at)
         select sparkops_uuid_v7(), w.webhook_id, w.project_id, {event_type}, {payload},
             date_trunc('second', now())
         from webhooks w{from}
         where w.project_id = {project} and w.enabled and w.deleted_at is null
           and {event_type} = any(w.event_types)"
    )
}

/// The `data` of a run's webhook event: the run as it stands, the step and what the run
/// event said. Reads `r` (the run's row); `step` and `detail` are SQL expressions (text and
/// `jsonb`).
pub(crate) fn run_event_data(step: &str, detail: &str) -> String {
    format!(
        "jsonb_build_object(
            'project_id', r.project_id, 'run_id', r.run_id, 'workflow_id', r.workflow_id,
            'workflow_version', r.workflow_version, 'schedule_id', r.schedule_id, 'status', r.status,
            'step_key', {step}, 'detail', {detail}, 'error', r.error,
            'tokens_in', r.tokens_in, 'tokens_out', r.tokens_out, 'cost_usd', r.cost_usd::text)"
    )
}

/// Queues `event_type` with `data` for the project's subscribed webhooks: for events
/// outside a run (a schedule's skipped or refused fire). Run events are queued by
/// [`crate::store::event`] in the statement that logs them.
pub fn enqueue<C: Connection + ?Sized>(
    tx: &Tx<'_, C>,
    project_id: &str,
    event_type: &str,
    data: Value,
) -> Result<u64, ApiError> {
    Ok(tx.execute(
        &insert_deliveries("$2::text", "$1", "$3::jsonb", ""),
        &[
            V::Uuid(project_id.into()),
            V::Text(event_type.into()),
            V::Json(data),
        ],
    )?)
}
