//! Outgoing HTTP calls to tools and model providers through `wasi:http/outgoing-handler`,
//! with what `spin_sdk::http::send` does not give: per-call timeouts (the request options
//! of WASI HTTP) and a cap on the response size, read as it streams in.
//!
//! The host still decides whether a call may leave: `allowed_outbound_hosts` and the
//! runtime config's `block_networks` refuse it before any byte is sent.

use std::time::{Duration, Instant};

use wasi::clocks::monotonic_clock;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasi::io::poll::{self, Pollable};
use wasi::io::streams::StreamError;

use crate::heartbeat;

/// One outgoing request.
pub struct Call<'a> {
    pub method: &'a str,
    pub url: &'a url::Url,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// The whole call, connection to last byte.
    pub timeout: Duration,
    pub max_response_bytes: usize,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Lowercase names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why a call produced no answer, as error kinds of a step.
#[derive(Debug, PartialEq)]
pub enum CallError {
    /// The host refused the destination (`allowed_outbound_hosts`, `block_networks`).
    Denied(String),
    Timeout,
    /// Connection refused, DNS failure, reset, TLS failure, protocol error.
    Connection(String),
    TooLarge {
        limit: usize,
    },
}

impl CallError {
    /// The error kind a step records.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Denied(_) => "denied",
            CallError::Timeout => "timeout",
            CallError::Connection(_) => "connection",
            CallError::TooLarge { .. } => "response-too-large",
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Denied(m) => write!(f, "the destination is not allowed: {m}"),
            CallError::Timeout => write!(f, "no complete answer within the timeout"),
            CallError::Connection(m) => write!(f, "the call failed: {m}"),
            CallError::TooLarge { limit } => write!(f, "the answer is larger than {limit} bytes"),
        }
    }
}

fn from_code(code: ErrorCode) -> CallError {
    match code {
        ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout => CallError::Timeout,
        ErrorCode::HttpRequestDenied => CallError::Denied("refused by the runtime".into()),
        ErrorCode::DestinationIpProhibited => {
            CallError::Denied("the address is in a blocked network".into())
        }
        other => CallError::Connection(format!("{other:?}")),
    }
}

fn method(m: &str) -> Method {
    match m {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "PATCH" => Method::Patch,
        "DELETE" => Method::Delete,
        "HEAD" => Method::Head,
        other => Method::Other(other.to_string()),
    }
}

/// Blocks until `ready` is, renewing meanwhile the lease of the step this instance runs
/// (a long call must not look like a dead host).
fn wait(ready: &Pollable) {
    while let Some(due) = heartbeat::due_in() {
        let timer = monotonic_clock::subscribe_duration(due.as_nanos() as u64);
        if poll::poll(&[ready, &timer]).contains(&0) {
            return;
        }
        heartbeat::beat();
    }
    ready.block();
}

/// Makes the call, blocking this instance until it answers, fails or times out.
pub fn send(call: Call<'_>) -> Result<Answer, CallError> {
    let started = Instant::now();
    let bad = |what: &str| CallError::Connection(format!("the request could not be built: {what}"));
    let mut entries: Vec<(String, Vec<u8>)> = call
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    // wasi-http sends a body chunked unless it has a length, and some servers and gateways
    // read a chunked body as empty: every body here is whole, so say how long it is.
    if let Some(bytes) = &call.body
        && !call
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        entries.push((
            "content-length".into(),
            bytes.len().to_string().into_bytes(),
        ));
    }
    let headers = Fields::from_list(&entries).map_err(|e| bad(&format!("{e:?}")))?;
    let request = OutgoingRequest::new(headers);
    let url = call.url;
    let scheme = match url.scheme() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_string()),
    };
    let authority = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    request
        .set_method(&method(call.method))
        .map_err(|_| bad("method"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|_| bad("scheme"))?;
    request
        .set_authority(Some(&authority))
        .map_err(|_| bad("authority"))?;
    request
        .set_path_with_query(Some(&path))
        .map_err(|_| bad("path"))?;
    let body = request.body().map_err(|_| bad("body"))?;
    let options = RequestOptions::new();
    let nanos = Some(call.timeout.as_nanos().min(u64::MAX.into()) as u64);
    // Each bound alone is the whole timeout; the total is checked while reading below.
    let _ = options.set_connect_timeout(nanos);
    let _ = options.set_first_byte_timeout(nanos);
    let _ = options.set_between_bytes_timeout(nanos);
    let pending = outgoing_handler::handle(request, Some(options)).map_err(from_code)?;
    if let Some(bytes) = &call.body {
        let stream = body.write().map_err(|_| bad("body stream"))?;
        // WASI streams take at most 4096 bytes per blocking write.
        for chunk in bytes.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| CallError::Connection(format!("sending the body: {e:?}")))?;
        }
    }
    OutgoingBody::finish(body, None).map_err(from_code)?;
    wait(&pending.subscribe());
    let response = match pending.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(code))) => return Err(from_code(code)),
        _ => return Err(CallError::Connection("no response".into())),
    };
    let status = response.status();
    let headers = response
        .headers()
        .entries()
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect::<Vec<_>>();
    let declared = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > call.max_response_bytes) {
        return Err(CallError::TooLarge {
            limit: call.max_response_bytes,
        });
    }
    let incoming = response.consume().map_err(|_| bad("response body"))?;
    let stream = incoming.stream().map_err(|_| bad("response stream"))?;
    let mut body = Vec::new();
    loop {
        if started.elapsed() > call.timeout {
            return Err(CallError::Timeout);
        }
        wait(&stream.subscribe());
        match stream.read(64 * 1024) {
            Ok(chunk) => {
                if body.len() + chunk.len() > call.max_response_bytes {
                    return Err(CallError::TooLarge {
                        limit: call.max_response_bytes,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(CallError::Connection(format!(
                    "reading the answer: {}",
                    e.to_debug_string()
                )));
            }
        }
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}
