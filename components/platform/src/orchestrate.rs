//! Advancing a run and handing what it claimed to executors: the executor after each
//! result, the runs API after a start, a cancel or an approval, the orchestrator on each
//! nudge and the sweeper for runs whose dispatch or nudge was lost. The advance itself is
//! the engine's ([`sparkops_engine::advance`]); this is its Spin side: one transaction over
//! pg4, then a signed request per claimed step to the app's own endpoint.

use std::time::Duration;

use serde_json::{Value, json};
use sparkops_core::db as core_db;
use sparkops_core::dispatch;
use sparkops_core::error::ApiError;
use sparkops_engine::Claim;

use crate::db::Db;
use crate::outbound::{self, Call, Chosen};

/// Advances `run_id` and hands what it claimed to executors.
pub fn advance_run(db: &Db, run_id: &str) -> Result<(), ApiError> {
    let claimed = core_db::transaction(db, |tx| sparkops_engine::advance(tx, run_id))?;
    dispatch(run_id, &claimed);
    Ok(())
}

/// Hands the steps an advance of `run_id` claimed to executors, once its transaction has
/// committed. A failed hand-off is logged: the step stays claimed until its lease runs out
/// and the sweeper gives it another attempt.
pub fn dispatch(run_id: &str, claimed: &[Claim]) {
    if claimed.is_empty() {
        return;
    }
    // The settings are read once for every step this advance claimed.
    match Dispatcher::from_settings() {
        Ok(dispatcher) => {
            for claim in claimed {
                dispatcher.send(run_id, claim);
            }
        }
        Err(e) => {
            crate::log_line(
                &json!({"level": "warn", "msg": "cannot dispatch", "run_id": run_id,
                "steps": claimed.len(), "detail": e}),
            );
        }
    }
}

/// Hands claimed steps to the executor: a signed `POST` to the app's own public endpoint
/// (`dispatch_url`; see [`sparkops_core::dispatch`] for why not service chaining). A failed
/// hand-off leaves the step claimed: its lease runs out and the sweeper gives it a new
/// attempt.
struct Dispatcher {
    url: url::Url,
    key: [u8; 32],
}

impl Dispatcher {
    /// The executor's URL under `dispatch_url`, and the key derived from `jwt_secret`.
    fn from_settings() -> Result<Self, String> {
        let base = crate::variable("dispatch_url")?;
        let url = url::Url::parse(base.trim_end_matches('/'))
            .and_then(|u| u.join(dispatch::PATH))
            .map_err(|e| format!("variable `dispatch_url`: {e}"))?;
        let key = dispatch::key(&crate::variable("jwt_secret")?);
        Ok(Self { url, key })
    }

    fn send(&self, run_id: &str, claim: &Claim) {
        let (step, lease) = (&claim.step_key, &claim.lease_id);
        let warn = |msg: &str, detail: Value| {
            crate::log_line(
                &json!({"level": "warn", "msg": msg, "run_id": run_id, "step": step, "detail": detail}),
            )
        };
        let body = json!({"run_id": run_id, "step_key": step, "lease_id": lease})
            .to_string()
            .into_bytes();
        let signature = dispatch::sign(&self.key, chrono::Utc::now().timestamp(), &body);
        match outbound::send(Call {
            method: "POST",
            url: &self.url,
            chosen: Chosen::ByOperator,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                (dispatch::HEADER.into(), signature),
            ],
            body: Some(body),
            timeout: Duration::from_secs(10),
            max_response_bytes: 4096,
        }) {
            Ok(res) if res.status == 202 => {}
            Ok(res) => warn("executor refused a step", json!(res.status)),
            Err(e) => warn("executor unreachable", json!(e.to_string())),
        }
    }
}
