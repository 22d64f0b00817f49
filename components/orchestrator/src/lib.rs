//! The orchestrator (DESIGN.md section 5): on each nudge `{"run_id"}` it advances that run
//! (`sparkops_platform::orchestrate`) and returns in milliseconds: it decides, claims and
//! dispatches, and never calls a model or a tool itself. A repeated nudge finds nothing new
//! to claim.
// `#[redis_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use serde_json::Value;
use sparkops_core::error::ApiError;
use sparkops_platform::db::Db;
use sparkops_platform::orchestrate;
use spin_sdk::redis_component;

#[redis_component]
async fn on_nudge(message: bytes::Bytes) -> anyhow::Result<()> {
    let nudge: Value = serde_json::from_slice(&message)?;
    let Some(run_id) = nudge["run_id"].as_str() else {
        anyhow::bail!("a nudge without run_id");
    };
    let run_id =
        sparkops_core::ids::parse_uuid(run_id, "run").map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let db = Db::open_default()?;
    orchestrate::advance_run(&db, &run_id)
        .map_err(|e: ApiError| anyhow::anyhow!("advancing run {run_id}: {e:?}"))
}
