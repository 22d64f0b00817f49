//! Spark-Ops business logic as plain types and functions. No Spin or WASI dependency: this
//! crate builds and tests natively (`cargo test -p sparkops-core`).
//!
//! Errors: handlers return [`error::ApiError`], which maps to one RFC 9457 problem
//! document; database code returns [`db::DbError`], which converts into it.
//!
//! Without the default `full` feature only `cron`, `error`, `ids`, `status` and `time` remain: what
//! the native host needs, without JSON Schema, JWT, Argon2 or AES-GCM in its build.

#[cfg(feature = "full")]
pub mod auth;
pub mod cron;
#[cfg(feature = "full")]
pub mod db;
#[cfg(feature = "full")]
pub mod dispatch;
pub mod error;
#[cfg(feature = "full")]
pub mod expr;
#[cfg(feature = "full")]
pub mod health;
pub mod ids;
#[cfg(feature = "full")]
pub mod input;
#[cfg(feature = "full")]
pub mod llm;
#[cfg(feature = "full")]
pub mod mcp;
#[cfg(feature = "full")]
pub mod money;
#[cfg(feature = "full")]
pub mod netcheck;
#[cfg(feature = "full")]
pub mod otlp;
#[cfg(feature = "full")]
pub mod page;
#[cfg(feature = "full")]
pub mod patch;
#[cfg(feature = "full")]
pub mod policy;
#[cfg(feature = "full")]
pub mod ratelimit;
#[cfg(feature = "full")]
pub mod roles;
#[cfg(feature = "full")]
pub mod run;
#[cfg(feature = "full")]
pub mod schema;
#[cfg(feature = "full")]
pub mod secrets;
pub mod settings;
pub mod status;
#[cfg(feature = "full")]
pub mod template;
pub mod time;
#[cfg(feature = "full")]
pub mod tool;
#[cfg(feature = "full")]
pub mod webhook;
#[cfg(feature = "full")]
pub mod workflow;
