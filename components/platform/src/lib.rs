//! The thin layer between Spark-Ops components and Spin: Postgres through pg4 behind the
//! shared library's [`sparkops_core::db::Connection`], and the HTTP edge (request ids,
//! JSON and problem responses). Business logic stays in `sparkops-core`.

pub mod db;
pub mod http;

/// Reads a component variable, naming it in the error when it is missing.
pub fn variable(name: &str) -> Result<String, String> {
    spin_sdk::variables::get(name).map_err(|e| format!("variable `{name}`: {e}"))
}
