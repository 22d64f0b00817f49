//! Spark-Ops business logic as plain types and functions. No Spin or WASI dependency: this
//! crate builds and tests natively (`cargo test -p sparkops-core`).
//!
//! Errors: handlers return [`error::ApiError`], which maps to one RFC 9457 problem
//! document; database code returns [`db::DbError`], which converts into it.

pub mod auth;
pub mod cron;
pub mod db;
pub mod dispatch;
pub mod error;
pub mod expr;
pub mod health;
pub mod ids;
pub mod input;
pub mod llm;
pub mod money;
pub mod netcheck;
pub mod otlp;
pub mod page;
pub mod patch;
pub mod policy;
pub mod ratelimit;
pub mod roles;
pub mod run;
pub mod schema;
pub mod secrets;
pub mod template;
pub mod time;
pub mod tool;
pub mod workflow;
