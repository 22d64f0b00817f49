//! The scheduler (DESIGN.md section 5), a cron component ticking every second: it finds the
//! schedules whose `next_fire_at` has come and fires each due time
//! (`sparkops_platform::schedule_fire`). "Now" is the tick's time, so tests fire it at the
//! times they choose.
//!
//! - A fire later than its catch-up window (`catchup_window_s`, at least a minute of grace
//!   for a slow tick) is not run; a stretch of such misses is recorded as one skipped row
//!   with its reason. Fires inside the window run late, in order.
//! - Each schedule is fired under its row lock and its `next_fire_at` moves on in the same
//!   transaction; a second scheduler waits for the lock and then finds the time taken. So
//!   schedulers on every replica can tick together and each fire time still makes at most
//!   one run.
//! - A schedule whose workflow or project was deleted stops (disabled, with the reason
//!   recorded).
// wit-bindgen's export glue is `unsafe` by nature.
#![allow(unsafe_code)]

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use sparkops_core::cron::Schedule as Cron;
use sparkops_core::db::{self as core_db, AS_TIMESTAMPTZ, Connection as _, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_platform::db::Db;
use sparkops_platform::schedule_fire::{self, Fired, Schedule};

wit_bindgen::generate!({
    path: "../wit",
    world: "fermyon:spin-cron/spin-cron",
});

struct Scheduler;

impl Guest for Scheduler {
    fn handle_cron_event(metadata: Metadata) -> Result<(), Error> {
        sparkops_platform::on_tick(metadata.timestamp, tick).map_err(Error::Other)
    }
}

export!(Scheduler);

/// Schedules one tick takes on; the next tick takes the rest.
const BATCH: i64 = 200;
/// Runs one schedule may start in one tick (a long catch-up goes on next tick).
const MAX_STARTS: usize = 100;
/// Fires passed over in one tick while counting a long stretch of misses.
const MAX_MISSES: i64 = 1_000_000;
/// A fire this late is still on time, whatever the catch-up window.
const GRACE_S: i64 = 60;

fn tick(now: DateTime<Utc>) -> Result<(), ApiError> {
    let db = Db::open_default()?;
    let due = db.query(
        &format!(
            "select schedule_id::text from schedules
             where enabled and deleted_at is null and next_fire_at <= $1{AS_TIMESTAMPTZ}
             order by next_fire_at limit $2"
        ),
        &[V::Timestamp(now), V::Int64(BATCH)],
    )?;
    for row in due {
        let id = row.text(0)?;
        match core_db::transaction(&db, |tx| fire_due(tx, &id, now)) {
            Ok(nudges) => nudges.iter().for_each(|r| sparkops_platform::nudge::run(r)),
            Err(e) => sparkops_platform::log_line(
                &json!({"level": "warn", "msg": "firing a schedule", "schedule_id": id,
                    "error": format!("{e:?}")}),
            ),
        }
    }
    Ok(())
}

/// Fires every due time of the schedule `id` up to `now`; the runs to nudge.
fn fire_due(tx: &Tx<'_, Db>, id: &str, now: DateTime<Utc>) -> Result<Vec<String>, ApiError> {
    let rows = tx.query(
        &format!(
            "select project_id::text, workflow_id::text, cron, timezone, input, overlap, catchup_window_s,
                    (next_fire_at at time zone 'UTC')
             from schedules
             where schedule_id = $1 and enabled and deleted_at is null and next_fire_at <= $2{AS_TIMESTAMPTZ}
             for no key update"
        ),
        &[V::Uuid(id.into()), V::Timestamp(now)],
    )?;
    // No longer due: another scheduler fired it while this one waited for the lock (the
    // condition is checked again on the row it committed).
    let Some(row) = rows.first() else {
        return Ok(Vec::new());
    };
    let schedule = Schedule {
        schedule_id: id.to_string(),
        project_id: row.text(0)?,
        workflow_id: row.text(1)?,
        input: row.json(4)?,
        overlap: row.text(5)?,
    };
    let window_s = row.int(6)?;
    let first = row
        .opt_timestamp(7)?
        .ok_or_else(|| ApiError::internal("a due schedule has no next fire time"))?;
    let cron = Cron::parse(&row.text(2)?, &row.text(3)?)
        .map_err(|e| ApiError::Internal(format!("schedule {id}: its cron does not parse: {e}")))?;
    let late_limit = Duration::seconds(window_s.max(GRACE_S));
    let mut nudges = Vec::new();
    let (mut at, mut starts) = (Some(first), 0);
    // A stretch of missed fires: first, last, count.
    let mut missed: Option<(DateTime<Utc>, DateTime<Utc>, i64)> = None;
    while let Some(t) = at.filter(|t| *t <= now) {
        if now - t > late_limit {
            let m = missed.get_or_insert((t, t, 0));
            (m.1, m.2) = (t, m.2 + 1);
            if m.2 >= MAX_MISSES {
                at = cron.next_after(t);
                break;
            }
        } else {
            if starts == MAX_STARTS {
                break;
            }
            if let Some((a, b, n)) = missed.take() {
                schedule_fire::record_missed(tx, id, a, b, n, window_s)?;
            }
            let (fired, mut more) = schedule_fire::fire(tx, &schedule, t, now, false)?;
            nudges.append(&mut more);
            starts += 1;
            if fired == Fired::Gone {
                tx.execute(
                    "update schedules set enabled = false, next_fire_at = null, updated_at = now(), version = version + 1
                     where schedule_id = $1",
                    &[V::Uuid(id.into())],
                )?;
                return Ok(nudges);
            }
        }
        at = cron.next_after(t);
    }
    if let Some((a, b, n)) = missed {
        schedule_fire::record_missed(tx, id, a, b, n, window_s)?;
    }
    tx.execute(
        &format!("update schedules set next_fire_at = $2{AS_TIMESTAMPTZ} where schedule_id = $1"),
        &[V::Uuid(id.into()), at.map_or(V::Null, V::Timestamp)],
    )?;
    Ok(nudges)
}
