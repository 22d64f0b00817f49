//! The HTTP edge every component shares: request ids, JSON bodies and RFC 9457 problems.

use sparkops_core::error::ApiError;
use spin_sdk::http::{Request, Response};

const REQUEST_ID: &str = "x-request-id";

/// The caller's `x-request-id` when it is sane (1..=64 of `[A-Za-z0-9._-]`), else a new one.
pub fn request_id(req: &Request) -> String {
    req.header(REQUEST_ID)
        .and_then(|v| v.as_str())
        .filter(|id| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

fn new_request_id() -> String {
    let bytes = wasi::random::random::get_random_bytes(16);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A JSON response with the request id.
pub fn json(status: u16, body: &serde_json::Value, request_id: &str) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header(REQUEST_ID, request_id)
        .body(body.to_string())
        .build()
}

/// The problem+json response for `err`, answering the request at `instance`.
pub fn problem(err: &ApiError, instance: &str, request_id: &str) -> Response {
    let body = serde_json::to_string(&err.problem(instance, request_id)).unwrap_or_default();
    let mut builder = Response::builder();
    builder
        .status(err.status())
        .header("content-type", "application/problem+json")
        .header(REQUEST_ID, request_id);
    for (name, value) in err.headers() {
        builder.header(name, value);
    }
    builder.body(body).build()
}
