//! The run lifecycle (DESIGN.md section 5; API.md "Runs"): every transition of a run and
//! its steps, and nothing else. No Spin or WASI here: each function takes a
//! [`sparkops_core::db::Connection`] (or a [`Tx`] of one), so components call it over
//! pg4 and the native suite (`tests/engine.rs`) over a real Postgres.
//!
//! | Transition | Function | Who calls it |
//! |---|---|---|
//! | start (input check, admission, insert, first advance) | [`start::start_advanced`], [`start::start`] | `POST /runs`, retry, triggers; schedule fires |
//! | advance (decide, finish, claim) | [`advance::advance`] | orchestrator, sweeper |
//! | record an attempt, schedule a retry | [`step::record`] | executor (its advance failing) |
//! | record and advance, under the lock | [`step::record_and_advance`] | executor (the run moved) |
//! | record and advance in one statement, from the run as read | [`step::record_and_advance_known`] | executor |
//! | a model call's usage | [`step::add_usage`] | agent steps |
//! | take back an expired lease | [`step::take_back`] | sweeper |
//! | wake a due retry | [`step::wake_retry`] | sweeper |
//! | approve or reject | [`step::decide_approval`] | `POST /runs/{id}/steps/{key}/approve` |
//! | an approval's deadline | [`step::expire_approval`] | sweeper |
//! | cancel | [`lifecycle::cancel`] | `POST /runs/{id}/cancel`, schedule overlap |
//! | pause, resume | [`lifecycle::pause`], [`lifecycle::resume`] | `POST /runs/{id}/pause`, `/resume` |
//! | time out | [`lifecycle::time_out`] | sweeper |
//! | finish | [`advance::finish`] | advance, time out |
//! | prune payloads | [`lifecycle::prune`] | sweeper |
//! | queue webhook deliveries | [`store::event`], [`outbox::enqueue`] | every event webhooks hear of |
//!
//! Lock order, the same everywhere so transitions queue and never deadlock: the project's
//! row (only admission under a concurrency limit), then the run's row
//! ([`store::lock_run`], the first statement of every change to a run or its steps), then
//! its step rows. The one change made without that lock first,
//! [`step::record_and_advance_known`], is one statement (a call of the SQL function
//! `sparkops_run_write`, migration 0021, which writes every change set of a run) whose
//! update of the run's row (conditional on the run's status and event count as read) comes
//! before its step rows. Every change to a step is conditional on the status it expects,
//! so a repeated, late or raced transition changes nothing.
//!
//! The statements a run sends per step and per start (its write, its lease read, the
//! workflow and the policies it reads) call database functions (migrations 0021 and 0022),
//! each keeping one plan for every call: Spin prepares and plans every statement it is sent,
//! on every call, and a function's statements are planned once per server session.
//!
//! Statuses and error kinds are [`RunStatus`], [`StepStatus`] and [`ErrorKind`] (in
//! `sparkops_core::status`, where workflow validation reads them too).

pub mod advance;
pub mod lifecycle;
#[cfg(feature = "native")]
pub mod native;
pub mod outbox;
pub mod policies;
pub mod start;
pub mod step;
pub mod store;

pub use advance::{Claim, advance, finish};
pub use lifecycle::{Cancel, Pause, cancel, pause, resume};
pub use sparkops_core::db::Tx;
pub use sparkops_core::status::{ErrorKind, RunStatus, StepStatus};
pub use start::{NewRun, Origin, StartError, Started, Workflow, start, start_advanced};
pub use store::{event, lock_run, note};
