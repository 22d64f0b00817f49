//! The webhook outbox: a delivery row for every enabled webhook of the project that
//! subscribes to an event, written in the same transaction as the event (so an event is
//! never told twice, and never lost when the transaction commits). The `notifier` cron
//! component sends them (`sparkops_platform::webhooks`).
//!
//! A delivery's payload is the Standard Webhooks body, fixed when it is written so every
//! attempt sends the same bytes: `{"type", "timestamp", "data"}`.

use serde_json::Value;
use sparkops_core::db::{Connection, Tx, Value as V};
use sparkops_core::error::ApiError;

/// The Standard Webhooks body of an event of `event_type` (SQL text) with `data` (a
/// `jsonb` SQL expression), stamped now: `{"type", "timestamp", "data"}` (the SQL function
/// `sparkops_webhook_payload`, migration 0021).
pub fn payload(event_type: &str, data: &str) -> String {
    format!("sparkops_webhook_payload({event_type}, {data})")
}

/// The deliveries of `$type` (SQL text) with `data` (a `jsonb` SQL expression), one per
/// enabled live webhook of project `project` (a SQL expression) subscribed to it; `from`
/// lists the tables the expressions read, each followed by a comma.
pub(crate) fn insert_deliveries(event_type: &str, project: &str, data: &str, from: &str) -> String {
    let payload = payload(event_type, data);
    format!(
        "insert into webhook_deliveries (delivery_id, webhook_id, project_id, event_type, payload, next_attempt_at)
         select sparkops_uuid_v7(), w.webhook_id, w.project_id, {event_type}, {payload},
             date_trunc('second', now())
         from {from}sparkops_webhooks_told({project}, {event_type}) w"
    )
}

/// The `data` of a run's webhook event: the run as it stands, the step and what the run
/// event said (the SQL function `sparkops_run_event_data`, migration 0021). Reads `r` (the
/// run's row); `step` and `detail` are SQL expressions (text and `jsonb`).
pub(crate) fn run_event_data(step: &str, detail: &str) -> String {
    format!(
        "sparkops_run_event_data(r.project_id, r.run_id, r.workflow_id, r.workflow_version,
            r.schedule_id, r.status, {step}, {detail}, r.error, r.tokens_in, r.tokens_out, r.cost_usd)"
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
