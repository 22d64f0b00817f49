//! Outgoing HTTP calls to tools and model providers through `wasi:http/outgoing-handler`,
//! with what `spin_sdk::http::send` does not give: per-call timeouts (the request options
//! of WASI HTTP) and a cap on the response size, read as it streams in.
//!
//! The host still decides whether a call may leave: `allowed_outbound_hosts` and the
//! runtime config's `block_networks` refuse it before any byte is sent.
//!
//! URLs users set (tools, collectors, webhook receivers) are checked again here before
//! every call: what the URL says ([`check_user_url`]), and where a host *name* points.
//! A guest cannot resolve a name under Spin (3.6.3 refuses `wasi:sockets/ip-name-lookup`
//! to every component, whatever its allowed hosts), so a name is called only when
//! something that does resolve it refuses private addresses: the runtime's
//! `block_networks` (probed once per instance) or, as the operator declares with
//! `network_blocks_private`, the network around it (a Kubernetes NetworkPolicy). Otherwise
//! the call is refused as `denied`, never made. A redirect is never followed; one that
//! points at an internal address is answered as `denied`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sparkops_core::netcheck::check_tool_url;

use wasi::clocks::monotonic_clock;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
    http_error_code,
};
use wasi::io::poll::{self, Pollable};
use wasi::io::streams::StreamError;

use crate::heartbeat;

/// Header names and values, in order.
pub type Headers = Vec<(String, String)>;

/// The value of header `name` (lowercase, as answers carry them) among `headers`.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Who chose where a call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    /// The operator (model providers, the app's own dispatch): trusted as configured.
    ByOperator,
    /// A user (tool URLs, trace endpoints, webhook URLs): the private-network guard applies.
    ByUser,
}

/// One outgoing request.
pub struct Call<'a> {
    pub method: &'a str,
    pub url: &'a url::Url,
    pub chosen: Chosen,
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
    /// The destination may not be called (the app's URL rules, `allowed_outbound_hosts`).
    Denied(String),
    /// The runtime refused the address the host resolved to (`block_networks`).
    Blocked,
    Timeout,
    /// Connection refused, DNS failure, reset, TLS failure, protocol error.
    Connection(String),
    TooLarge {
        limit: usize,
    },
}

impl CallError {
    /// Whether the destination was refused (by the app's rules or the runtime's), as
    /// opposed to failing: a refusal is not worth trying again.
    pub fn refused(&self) -> bool {
        matches!(self, CallError::Denied(_) | CallError::Blocked)
    }

    /// The error kind a step records.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Denied(_) | CallError::Blocked => "denied",
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
            CallError::Blocked => write!(
                f,
                "the destination is not allowed: the address is in a blocked network"
            ),
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
        ErrorCode::DestinationIpProhibited => CallError::Blocked,
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

/// A URL a user sets (tool, trace endpoint, webhook), if the deployment lets it be called:
/// `http(s)`, no credentials, no internal address in any spelling (unless
/// `tools_allow_private_hosts`), `https` unless `tools_allow_http`. Checked when saved and
/// again before every call.
pub fn check_user_url(raw: &str) -> Result<url::Url, String> {
    let settings = crate::settings();
    let url = check_tool_url(raw, settings.tools_allow_private_hosts).map_err(|e| e.to_string())?;
    if url.scheme() == "http" && !settings.tools_allow_http {
        return Err("must use https".into());
    }
    Ok(url)
}

/// Whether a user-chosen `url` may be called now: what it says, and for a host name, that
/// something which resolves it refuses private addresses.
fn guard(url: &url::Url) -> Result<(), CallError> {
    let settings = crate::settings();
    if settings.tools_allow_private_hosts {
        return Ok(());
    }
    check_user_url(url.as_str()).map_err(|e| CallError::Denied(format!("the url {e}")))?;
    let named = matches!(url.host(), Some(url::Host::Domain(_)));
    if named && !settings.network_blocks_private && !runtime_blocks_private() {
        return Err(CallError::Denied(format!(
            "{} is a host name and nothing here checks where it points: the runtime \
             config sets no block_networks and network_blocks_private is not set \
             (README: Outbound calls)",
            url.host_str().unwrap_or_default()
        )));
    }
    Ok(())
}

/// Whether the runtime refuses private addresses (`block_networks`), asked once per
/// instance: a call to `0.0.0.0`, in every list of private networks and never a real
/// destination, is refused by such a runtime before it connects and otherwise finds
/// nothing listening.
fn runtime_blocks_private() -> bool {
    static BLOCKS: OnceLock<bool> = OnceLock::new();
    *BLOCKS.get_or_init(|| {
        let probe = url::Url::parse("http://0.0.0.0:1/").expect("a valid URL");
        let answer = send(Call {
            method: "GET",
            url: &probe,
            chosen: Chosen::ByOperator,
            headers: Vec::new(),
            body: None,
            timeout: Duration::from_secs(2),
            max_response_bytes: 0,
        });
        matches!(answer, Err(CallError::Blocked))
    })
}

/// Where a redirect points, if `answer` is one whose target is internal.
fn internal_redirect(url: &url::Url, answer: &Answer) -> Option<String> {
    if !(300..400).contains(&answer.status) {
        return None;
    }
    let location = header(&answer.headers, "location")?;
    let target = url.join(location).ok()?;
    check_tool_url(target.as_str(), false)
        .is_err()
        .then(|| target.host_str().unwrap_or_default().to_string())
}

/// Makes the call, blocking this instance until it answers, fails or times out. A URL a
/// user chose is guarded first (module docs); a redirect is returned, never followed.
pub fn send(call: Call<'_>) -> Result<Answer, CallError> {
    send_until(call, |_, _| false)
}

/// [`send`], reading the answer only until `enough(headers, body so far)` says it holds
/// what the caller needs (an event stream the server may keep open): the rest is dropped.
pub fn send_until(
    call: Call<'_>,
    mut enough: impl FnMut(&[(String, String)], &[u8]) -> bool,
) -> Result<Answer, CallError> {
    if call.chosen == Chosen::ByOperator {
        return send_unguarded(call, &mut enough);
    }
    guard(call.url)?;
    let url = call.url;
    let answer = send_unguarded(call, &mut enough)?;
    if !crate::settings().tools_allow_private_hosts
        && let Some(host) = internal_redirect(url, &answer)
    {
        return Err(CallError::Denied(format!(
            "answered {} with a redirect to an internal address ({host}), not followed",
            answer.status
        )));
    }
    Ok(answer)
}

type Enough<'a> = &'a mut dyn FnMut(&[(String, String)], &[u8]) -> bool;

fn send_unguarded(call: Call<'_>, enough: Enough<'_>) -> Result<Answer, CallError> {
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
    let declared = header(&headers, "content-length").and_then(|v| v.parse::<usize>().ok());
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
                if !chunk.is_empty() && enough(&headers, &body) {
                    break;
                }
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                // A read timeout between bytes is a timeout, not a broken connection.
                return Err(match http_error_code(&e) {
                    Some(code @ ErrorCode::ConnectionReadTimeout) => from_code(code),
                    _ => CallError::Connection(format!(
                        "reading the answer: {}",
                        e.to_debug_string()
                    )),
                });
            }
        }
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}
