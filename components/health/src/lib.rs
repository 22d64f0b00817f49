//! `GET /healthz` (liveness) and `GET /readyz` (Postgres, key-value and Redis reachable).
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use sparkops_core::db::{Connection, DbError};
use sparkops_core::error::ApiError;
use sparkops_core::health::Readiness;
use sparkops_platform::db::Db;
use sparkops_platform::http::{json, problem, request_id};
use spin_sdk::http::{Method, Request, Response};
use spin_sdk::http_component;
use spin_sdk::{key_value, redis};

#[http_component]
fn handle(req: Request) -> Response {
    let id = request_id(req.header("x-request-id").and_then(|v| v.as_str()));
    let path = req.path();
    let readable = matches!(req.method(), Method::Get | Method::Head);
    match (readable, path) {
        (true, "/healthz") => json(200, &serde_json::json!({"status": "ok"}), &id),
        (true, "/readyz") => readiness(path, &id),
        (false, "/healthz" | "/readyz") => problem(
            &ApiError::MethodNotAllowed {
                allow: vec!["GET", "HEAD"],
            },
            path,
            &id,
        ),
        _ => problem(&ApiError::NotFound(format!("no route {path}")), path, &id),
    }
}

fn readiness(path: &str, id: &str) -> Response {
    let mut ready = Readiness::default();
    ready.record("postgres", postgres_up());
    ready.record("key_value", key_value_up());
    ready.record("redis", redis_up());
    match ready.outcome() {
        Ok(body) => json(200, &body, id),
        Err(err) => {
            let mut res = problem(&err, path, id);
            let mut body: serde_json::Value =
                serde_json::from_slice(res.body()).unwrap_or_default();
            body["checks"] = ready.checks_json();
            *res.body_mut() = body.to_string().into_bytes();
            res
        }
    }
}

fn postgres_up() -> bool {
    // Reading the probe row checks the database is reachable and migrated.
    let up = Db::open_default()
        .and_then(|db| {
            db.query(
                "select service_probe_id from service_probe where service_probe_id = 1",
                &[],
            )
        })
        .and_then(|rows| match rows.len() {
            1 => Ok(()),
            _ => Err(DbError::new(
                "",
                "the service_probe row is missing: run the migrations",
            )),
        });
    log_down("postgres", up.as_ref().err())
}

fn key_value_up() -> bool {
    let up = key_value::Store::open_default().and_then(|s| s.exists("sparkops:readyz"));
    log_down("key_value", up.as_ref().err())
}

fn redis_up() -> bool {
    let up = sparkops_platform::variable("redis_url").and_then(|url| {
        let conn = redis::Connection::open(&url).map_err(|e| e.to_string())?;
        conn.execute("PING", &[]).map_err(|e| e.to_string())
    });
    log_down("redis", up.as_ref().err())
}

/// Logs why a dependency is down (the response only names it) and says whether it is up.
fn log_down(name: &str, err: Option<&impl std::fmt::Display>) -> bool {
    if let Some(e) = err {
        sparkops_platform::log_line(&serde_json::json!({"level": "warn",
            "msg": "readiness check failed", "check": name, "error": e.to_string()}));
    }
    err.is_none()
}
