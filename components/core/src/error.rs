//! The one API error type and its RFC 9457 `application/problem+json` form.
//!
//! Layers: the database helper returns [`crate::db::DbError`]; handlers return [`ApiError`];
//! the HTTP layer turns an `ApiError` into a problem document with [`ApiError::problem`].
//! Server-side causes are logged by the caller and never echoed in a body.

use serde::Serialize;

/// Where problem `type` URIs live.
pub const PROBLEM_BASE: &str = "https://sparkops.dev/problems/";

/// A field-level validation message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Every error a handler can answer with.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    Validation {
        detail: String,
        errors: Vec<FieldError>,
    },
    Unauthenticated(String),
    Forbidden(String),
    NotFound(String),
    MethodNotAllowed {
        allow: Vec<&'static str>,
    },
    Conflict(String),
    PreconditionFailed(String),
    PayloadTooLarge {
        limit: usize,
    },
    RateLimited {
        retry_after_secs: u64,
    },
    PolicyViolation(String),
    /// A dependency is down; `detail` names which (never how).
    Unavailable(String),
    /// The caller sent something the route cannot take (a bad `Content-Type`, say).
    BadRequest(String),
    /// Something broke on our side: the cause is for the log line (the pipeline writes it
    /// with the request id); the body says nothing more.
    Internal(String),
}

/// The JSON body of a problem response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub instance: String,
    pub request_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl ApiError {
    /// A validation error about one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let (field, message) = (field.into(), message.into());
        ApiError::Validation {
            detail: format!("{field}: {message}"),
            errors: vec![FieldError { field, message }],
        }
    }

    /// A validation error about several fields, each named in the detail.
    pub fn fields(errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError::Validation { detail, errors }
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiError::Validation { .. } => 422,
            ApiError::Unauthenticated(_) => 401,
            ApiError::Forbidden(_) | ApiError::PolicyViolation(_) => 403,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Conflict(_) => 409,
            ApiError::PreconditionFailed(_) => 412,
            ApiError::PayloadTooLarge { .. } => 413,
            ApiError::RateLimited { .. } => 429,
            ApiError::Unavailable(_) => 503,
            ApiError::BadRequest(_) => 400,
            ApiError::Internal(_) => 500,
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::Validation { .. } => ("validation", "Your request is not valid."),
            ApiError::Unauthenticated(_) => ("unauthenticated", "Authentication is required."),
            ApiError::Forbidden(_) => ("forbidden", "Your role does not allow this action."),
            ApiError::NotFound(_) => ("not-found", "The resource was not found."),
            ApiError::MethodNotAllowed { .. } => {
                ("method-not-allowed", "The method is not allowed here.")
            }
            ApiError::Conflict(_) => ("conflict", "The request conflicts with the current state."),
            ApiError::PreconditionFailed(_) => ("precondition-failed", "The resource has changed."),
            ApiError::PayloadTooLarge { .. } => {
                ("payload-too-large", "The request body is too large.")
            }
            ApiError::RateLimited { .. } => ("rate-limited", "Too many requests."),
            ApiError::PolicyViolation(_) => ("policy-violation", "A policy forbids this action."),
            ApiError::Unavailable(_) => (
                "unavailable",
                "A service the app depends on is unavailable.",
            ),
            ApiError::BadRequest(_) => ("bad-request", "The request cannot be processed."),
            ApiError::Internal(_) => ("internal", "Something went wrong on our side."),
        }
    }

    fn detail(&self) -> String {
        match self {
            ApiError::Validation { detail, .. }
            | ApiError::Unauthenticated(detail)
            | ApiError::Forbidden(detail)
            | ApiError::NotFound(detail)
            | ApiError::Conflict(detail)
            | ApiError::PreconditionFailed(detail)
            | ApiError::PolicyViolation(detail)
            | ApiError::Unavailable(detail)
            | ApiError::BadRequest(detail) => detail.clone(),
            ApiError::MethodNotAllowed { allow } => {
                format!("allowed methods: {}", allow.join(", "))
            }
            ApiError::PayloadTooLarge { limit } => format!("the limit is {limit} bytes"),
            ApiError::RateLimited { retry_after_secs } => {
                format!("retry after {retry_after_secs} s")
            }
            ApiError::Internal(_) => "the error has been logged".into(),
        }
    }

    /// The problem document for this error, answering the request at `instance`.
    pub fn problem(&self, instance: &str, request_id: &str) -> Problem {
        let (slug, title) = self.kind();
        Problem {
            type_uri: format!("{PROBLEM_BASE}{slug}"),
            title,
            status: self.status(),
            detail: self.detail(),
            instance: instance.to_string(),
            request_id: request_id.to_string(),
            errors: match self {
                ApiError::Validation { errors, .. } => errors.clone(),
                _ => Vec::new(),
            },
        }
    }

    /// Headers the error's status calls for (`Allow`, `Retry-After`, `WWW-Authenticate`).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            ApiError::MethodNotAllowed { allow } => vec![("allow", allow.join(", "))],
            ApiError::RateLimited { retry_after_secs } => {
                vec![("retry-after", retry_after_secs.to_string())]
            }
            ApiError::Unauthenticated(_) => vec![("www-authenticate", "Bearer".into())],
            // A dependency that is down is usually back within seconds (a restart, a
            // failover).
            ApiError::Unavailable(_) => {
                vec![("retry-after", UNAVAILABLE_RETRY_AFTER_S.to_string())]
            }
            _ => Vec::new(),
        }
    }
}

/// The `Retry-After` of a `503`.
pub const UNAVAILABLE_RETRY_AFTER_S: u64 = 2;

impl ApiError {
    /// A `500` for `cause`.
    pub fn internal(cause: impl Into<String>) -> Self {
        ApiError::Internal(cause.into())
    }

    /// A `500` for a required field that passed the body's checks without a value: the
    /// checks and the handler disagree, which is a bug of ours.
    pub fn unchecked_field() -> Self {
        ApiError::internal("a required field passed the body's checks without a value")
    }

    /// The server-side cause to log, for a `500`.
    pub fn cause(&self) -> Option<&str> {
        match self {
            ApiError::Internal(cause) => Some(cause),
            _ => None,
        }
    }
}

#[cfg(feature = "full")]
impl From<crate::db::DbError> for ApiError {
    /// An unreachable database is a `503` the client may retry; anything else is ours.
    fn from(e: crate::db::DbError) -> Self {
        if e.is_unavailable() {
            ApiError::Unavailable(format!("the database is unavailable ({})", e.code))
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_that_cannot_be_reached_is_a_503_to_retry_and_other_failures_a_500() {
        for code in ["08001", "08006", "57P01", "57P03", "53300"] {
            let e = ApiError::from(crate::db::DbError::new(code, "gone"));
            assert_eq!(e.status(), 503, "{code}");
            assert_eq!(e.headers(), [("retry-after", "2".to_string())]);
        }
        for code in ["", "23505", "42P01", "40001"] {
            let e = ApiError::from(crate::db::DbError::new(code, "broken"));
            assert_eq!(e.status(), 500, "{code}");
            assert!(e.headers().is_empty());
        }
    }

    #[test]
    fn a_field_error_is_a_422_problem_naming_the_field() {
        let p = ApiError::field("steps[2].depends_on", "unknown step 'fetch'")
            .problem("/api/v1/workflows", "req-1");
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "https://sparkops.dev/problems/validation",
                "title": "Your request is not valid.",
                "status": 422,
                "detail": "steps[2].depends_on: unknown step 'fetch'",
                "instance": "/api/v1/workflows",
                "request_id": "req-1",
                "errors": [{"field": "steps[2].depends_on", "message": "unknown step 'fetch'"}]
            })
        );
    }

    #[test]
    #[cfg(feature = "full")]
    fn an_internal_error_says_nothing_about_its_cause() {
        let p = ApiError::from(crate::db::DbError::new(
            "42P01",
            "relation \"secrets\" does not exist",
        ))
        .problem("/x", "r");
        assert_eq!(
            (p.status, p.detail.as_str()),
            (500, "the error has been logged")
        );
        assert!(!serde_json::to_string(&p).unwrap().contains("secrets"));
    }

    #[test]
    fn statuses_carry_their_headers() {
        assert_eq!(
            ApiError::RateLimited {
                retry_after_secs: 3
            }
            .headers(),
            vec![("retry-after", "3".to_string())]
        );
        assert_eq!(
            ApiError::MethodNotAllowed {
                allow: vec!["GET", "HEAD"]
            }
            .headers(),
            vec![("allow", "GET, HEAD".to_string())]
        );
    }
}
