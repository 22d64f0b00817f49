//! The HTTP edge every component shares: reading a request with a size limit, request ids,
//! and turning replies and errors into responses (JSON, RFC 9457 problems).

use futures::StreamExt;
use serde_json::Value;
use sparkops_core::error::ApiError;
use spin_sdk::http::{IncomingRequest, Method, Response};

const REQUEST_ID: &str = "x-request-id";

/// Request bodies over this are `413` (API.md "Limits").
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A request, read whole (up to [`MAX_BODY_BYTES`]).
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: Method,
    pub path: String,
    pub query: String,
    /// Lowercase names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// Reads `incoming`, refusing bodies over the limit without reading them whole.
    pub async fn read(incoming: IncomingRequest) -> Result<Self, ApiError> {
        let method = incoming.method();
        let path_with_query = incoming.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = match path_with_query.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (path_with_query, String::new()),
        };
        let headers: Vec<(String, String)> = incoming
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_ascii_lowercase(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect();
        let declared = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
            return Err(ApiError::PayloadTooLarge {
                limit: MAX_BODY_BYTES,
            });
        }
        // A NUL in a query parameter can reach a `text` column or a comparison with one,
        // which Postgres refuses: a 422 naming the parameter, as for bodies.
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode_query(k);
            if name.contains('\0') || decode_query(v).contains('\0') {
                let field = format!("query.{}", name.replace('\0', "\\u0000"));
                return Err(sparkops_core::input::nul_error(&field));
            }
        }
        // An idempotency key is a stored identifier: one that could never be stored is
        // refused on every route, not only on those that store it.
        if let Some((_, key)) = headers.iter().find(|(k, _)| k == "idempotency-key") {
            crate::pipeline::check_idempotency_key("headers.idempotency-key", key)?;
        }
        let mut body = Vec::new();
        let mut stream = incoming.into_body_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| ApiError::field("body", "could not be read"))?;
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(ApiError::PayloadTooLarge {
                    limit: MAX_BODY_BYTES,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Self {
            method,
            path,
            query,
            headers,
            body,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of a query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| decode_query(v))
        })
    }

    /// The keyset page a list asks for (`limit`, `cursor`).
    pub fn page(&self) -> Result<sparkops_core::page::PageRequest, ApiError> {
        sparkops_core::page::PageRequest::parse(
            self.query_param("limit").as_deref(),
            self.query_param("cursor").as_deref(),
        )
    }

    /// The path's segments after `prefix` (which must match), e.g. `["projects", "<id>"]`.
    pub fn segments(&self, prefix: &str) -> Option<Vec<&str>> {
        let rest = self.path.strip_prefix(prefix)?;
        Some(rest.split('/').filter(|s| !s.is_empty()).collect())
    }

    /// The client's address as the host reports it (`spin-client-addr`), without the port.
    pub fn client_ip(&self) -> String {
        let addr = self.header("spin-client-addr").unwrap_or("unknown");
        match addr.rsplit_once(':') {
            Some((ip, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                ip.trim_matches(['[', ']']).to_string()
            }
            _ => addr.to_string(),
        }
    }
}

fn decode_query(v: &str) -> String {
    percent_decode(v, true)
}

/// A path segment, percent-decoded (`openai%2Fgpt-4o` is `openai/gpt-4o`).
pub fn decode_segment(v: &str) -> String {
    percent_decode(v, false)
}

/// `%XX` escapes decoded (and `+` as a space in query strings); a `%` not followed by two
/// hex digits stays as it is.
fn percent_decode(v: &str, plus_is_space: bool) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The caller's `x-request-id` when it is sane (1..=64 of `[A-Za-z0-9._-]`), else a new one.
pub fn request_id(header: Option<&str>) -> String {
    header
        .filter(|id| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| crate::random_hex(16))
}

/// What a handler answers: a status, an optional JSON body, extra headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
    pub headers: Vec<(String, String)>,
    /// A body that is not JSON, with its `content-type` among the headers.
    pub text: Option<String>,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: Some(body),
            headers: Vec::new(),
            text: None,
        }
    }

    /// A text body of `content_type`.
    pub fn text(status: u16, content_type: &str, text: String) -> Self {
        Self {
            status,
            body: None,
            headers: vec![("content-type".into(), content_type.into())],
            text: Some(text),
        }
    }

    pub fn ok(body: Value) -> Self {
        Self::json(200, body)
    }

    /// `201` with `Location`.
    pub fn created(body: Value, location: String) -> Self {
        Self {
            status: 201,
            body: Some(body),
            headers: vec![("location".into(), location)],
            text: None,
        }
    }

    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
            headers: Vec::new(),
            text: None,
        }
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn into_response(self, request_id: &str) -> Response {
        let mut b = Response::builder();
        b.status(self.status).header(REQUEST_ID, request_id);
        for (k, v) in &self.headers {
            b.header(k.as_str(), v.as_str());
        }
        match (self.body, self.text) {
            (Some(body), _) => b
                .header("content-type", "application/json")
                .body(body.to_string())
                .build(),
            (None, Some(text)) => b.body(text).build(),
            (None, None) => b.build(),
        }
    }
}

/// A JSON response with the request id.
pub fn json(status: u16, body: &Value, request_id: &str) -> Response {
    Reply::json(status, body.clone()).into_response(request_id)
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
