//! A running step's heartbeat. While an executor instance works on a step, the waits of its
//! outgoing calls ([`crate::outbound`]) and the gaps between an agent's calls renew the
//! step's lease every [`HEARTBEAT_MS`]: the lease can then be short, so a dead host's step is
//! taken back within about 20 s, while the step itself runs as long as its timeout allows.
//!
//! An executor instance runs one step (Spin makes an instance per request), so the lease it
//! holds is the instance's own state, kept here rather than threaded through every call
//! that may wait.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::db::Db;
use crate::engine::advance::HEARTBEAT_MS;
use crate::engine::step::{self, Lease};

struct Held {
    run_id: String,
    step_key: String,
    lease_id: String,
    last: Instant,
    lost: bool,
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

const EVERY: Duration = Duration::from_millis(HEARTBEAT_MS as u64);

/// This instance now works under `lease`: its waits renew it until [`release`].
pub fn hold(lease: &Lease<'_>) {
    HELD.set(Some(Held {
        run_id: lease.run_id.into(),
        step_key: lease.step_key.into(),
        lease_id: lease.lease_id.into(),
        last: Instant::now(),
        lost: false,
    }));
}

/// The work is done (its result is about to be recorded): nothing more to renew.
pub fn release() {
    HELD.set(None);
}

/// How long until the next renewal is due; `None` when there is nothing to renew.
pub fn due_in() -> Option<Duration> {
    HELD.with_borrow(|held| {
        held.as_ref()
            .filter(|h| !h.lost)
            .map(|h| EVERY.saturating_sub(h.last.elapsed()))
    })
}

/// Renews the lease if a renewal is due. A renewal the database could not make is tried
/// again at the next one (a lease outlasts three); one the engine refuses means the lease
/// is lost: the step was cancelled, taken back or ran past its deadline.
pub fn beat() {
    if due_in() != Some(Duration::ZERO) {
        return;
    }
    HELD.with_borrow_mut(|held| {
        let Some(h) = held.as_mut() else { return };
        h.last = Instant::now();
        let lease = Lease {
            run_id: &h.run_id,
            step_key: &h.step_key,
            lease_id: &h.lease_id,
        };
        // A connection of its own: the step's work may hold one mid-transaction or none.
        let renewed = Db::open_default()
            .map_err(sparkops_core::error::ApiError::from)
            .and_then(|db| step::renew(&db, &lease));
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                h.lost = true;
                log(
                    "the step's lease is lost: its work will not be recorded",
                    h,
                    "",
                );
            }
            Err(e) => log("renewing a lease", h, &format!("{e:?}")),
        }
    });
}

/// Whether the lease was lost: whatever the attempt still does will not be recorded, so it
/// should stop spending (no further model or tool calls).
pub fn lost() -> bool {
    HELD.with_borrow(|held| held.as_ref().is_some_and(|h| h.lost))
}

fn log(msg: &str, h: &Held, error: &str) {
    crate::log_line(&json!({"level": "warn", "msg": msg, "run_id": h.run_id,
        "step": h.step_key, "error": error}));
}
