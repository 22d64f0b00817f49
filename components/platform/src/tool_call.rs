//! One call of an HTTP tool with the checks of a run: the input against `input_schema`,
//! the URL where it points (internal addresses and plain http only when configuration
//! allows them), `{{ secret.NAME }}` headers resolved at call time (never logged or
//! answered), the tool's timeout and an answer cap, and the output against `output_schema`.
//! `POST /tools/{id}/test` and the executor's tool steps both call it.

use serde_json::{Value, json};
use sparkops_core::error::{ApiError, FieldError};
use sparkops_core::tool::secret_reference;

use crate::outbound::{self, Call, Chosen, Headers, check_user_url};
use crate::pipeline::project_secrets;
use crate::work::Work;

/// The largest answer a tool call reads.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Calls `tool` (as the tools API answers it) with `input`. `Err(422)` when the call may
/// not be made (bad input, URL, missing secret); otherwise what happened:
/// `{"ok", "status"?, "duration_ms", "output"?, "error"?: {"kind", "message"}}`.
pub fn call(
    ctx: &mut Work,
    project_id: &str,
    tool: &Value,
    input: &Value,
    idempotency_key: &str,
) -> Result<Value, ApiError> {
    let mut errors = Vec::new();
    let error = |field: String, message: String| FieldError { field, message };
    if let Err(problems) = sparkops_core::schema::validate_saved(&tool["input_schema"], input) {
        for (pointer, message) in problems {
            errors.push(error(format!("input{pointer}"), message));
        }
    }
    let http = &tool["http"];
    let url = match check_user_url(http["url"].as_str().unwrap_or_default()) {
        Ok(u) => Some(u),
        Err(e) => {
            errors.push(error("http.url".into(), e));
            None
        }
    };
    let mut headers = match resolve_headers(ctx, project_id, &http["headers"], "http.headers")? {
        Ok(h) => h,
        Err(problems) => {
            errors.extend(problems);
            Vec::new()
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::fields(errors));
    }
    let mut url = url.ok_or_else(ApiError::unchecked_field)?;
    let method = http["method"].as_str().unwrap_or("POST");
    let body = if matches!(method, "GET" | "DELETE") {
        if let Some(fields) = input.as_object() {
            let mut query = url.query_pairs_mut();
            for (k, v) in fields {
                query.append_pair(
                    k,
                    &v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string()),
                );
            }
        }
        None
    } else {
        headers.push(("content-type".into(), "application/json".into()));
        Some(input.to_string().into_bytes())
    };
    headers.push(("idempotency-key".into(), idempotency_key.to_string()));
    headers.push(("user-agent".into(), "Spark-Ops".into()));
    // No connection is held while the tool takes its time.
    ctx.release_db();
    let started = std::time::Instant::now();
    let result = outbound::send(Call {
        method,
        url: &url,
        chosen: Chosen::ByUser,
        headers,
        body,
        timeout: std::time::Duration::from_millis(http["timeout_ms"].as_u64().unwrap_or(30_000)),
        max_response_bytes: MAX_RESPONSE_BYTES,
    });
    let duration_ms = started.elapsed().as_millis() as u64;
    Ok(match result {
        Err(e) => json!({
            "ok": false,
            "duration_ms": duration_ms,
            "error": {"kind": e.kind(), "message": e.to_string()},
        }),
        Ok(answer) => {
            let output = serde_json::from_slice::<Value>(&answer.body).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&answer.body).into_owned())
            });
            let output_errors: Vec<Value> = if tool["output_schema"].is_null() {
                Vec::new()
            } else {
                sparkops_core::schema::validate_saved(&tool["output_schema"], &output)
                    .err()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(path, message)| json!({"field": format!("output{path}"), "message": message}))
                    .collect()
            };
            let success = (200..300).contains(&answer.status);
            let mut reply = json!({
                "ok": success && output_errors.is_empty(),
                "status": answer.status,
                "duration_ms": duration_ms,
                "output": output,
            });
            if !success {
                reply["error"] = json!({"kind": "http-status", "message": format!("the tool answered {}", answer.status)});
            } else if !output_errors.is_empty() {
                reply["error"] = json!({"kind": "validation", "message": "the output does not match output_schema", "errors": output_errors});
            }
            reply
        }
    })
}

/// Configured headers (the object at field path `at`) with their `{{ secret.NAME }}`
/// references resolved from the project's secrets: `Err` naming each secret it lacks.
pub fn resolve_headers(
    ctx: &mut Work,
    project_id: &str,
    configured: &Value,
    at: &str,
) -> Result<Result<Headers, Vec<FieldError>>, ApiError> {
    let configured: Vec<(String, String)> = configured
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let wanted: Vec<String> = configured
        .iter()
        .filter_map(|(_, v)| secret_reference(v).map(str::to_string))
        .collect();
    let secrets = project_secrets(ctx, project_id, &wanted)?;
    let mut headers = Vec::new();
    let mut missing = Vec::new();
    for (name, value) in configured {
        match secret_reference(&value) {
            Some(secret) => match secrets.get(secret) {
                Some(v) => headers.push((name, v.clone())),
                None => missing.push(FieldError {
                    field: format!("{at}.{name}"),
                    message: format!("names the secret {secret}, which this project does not have"),
                }),
            },
            None => headers.push((name, value)),
        }
    }
    Ok(if missing.is_empty() {
        Ok(headers)
    } else {
        Err(missing)
    })
}
